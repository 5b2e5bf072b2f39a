"""The compiled fast path: members, holds and refundable transactions in typed C arrays.

The contract is `_core.pyi`; `_reference.py` is the pure-Python twin that must behave identically.
`def` methods only convert what crosses from Python (strictly: see _int64) and build result tuples;
`cdef` kernels validate, resolve ids to slots through the dict indexes, and decide and write with C
integers. Every write to an existing member, hold or transaction goes through a _set_* method, which
records the old value while a batch is open. apply_batch() runs the same kernels over int64 buffers:
one crossing per batch instead of one per operation.
"""
from cpython cimport array as c_array
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport INT32_MAX, int32_t, int64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memmove, memset

from fastpath.records cimport Earn, EarnRecord, Lot, make_earn, make_earn_record, make_lot
from fastpath.slots cimport SlotReader, new_with_slots, put, slot_offsets, slot_read

# 2**62: sums of two balances still fit in int64_t, so the overflow checks cannot overflow themselves.
cdef int64_t balance_max = 4611686018427387904
BALANCE_MAX = balance_max

# Arrays start this small so that an idle ledger sized for millions costs nothing until used.
cdef int64_t capacity_initial = 16


import array as _array

# what int64_column clones: an empty array of int64 ("q")
cdef c_array.array _INT64_EMPTY = _array.array("q")


class LedgerInvariantError(Exception):
    """An invariant of the ledger does not hold: a bug. The caller stops serving."""


cdef extern from *:
    # gcc and clang's checked addition: true when a + b overflows (then *result is not the sum)
    bint __builtin_add_overflow(int64_t a, int64_t b, int64_t* result) nogil

cdef int _grow(void** array, int64_t count, size_t item_size) except -1:
    cdef void* grown = realloc(array[0], <size_t>count * item_size)
    if grown == NULL:
        raise MemoryError(f"cannot grow a ledger array to {count} items")
    array[0] = grown
    return 0


cdef inline int64_t _capacity_next(int64_t capacity, int64_t needed, int64_t maximum) noexcept:
    cdef int64_t grown = capacity * 2 if capacity > 0 else capacity_initial
    if grown < needed:
        grown = needed
    if grown > maximum:
        grown = maximum
    return grown


cdef inline int64_t _int64(object value) except? -1:
    # A typed `int64_t` parameter would take 1.5 as 1: Cython converts through __int__. Amounts and
    # ids must be integers, so anything that is not one is refused the way operator.index does.
    if not isinstance(value, int):
        value = PyNumber_Index(value)
    return value


cdef inline int _check_merchant(int64_t merchant) except -1:
    if merchant < 0 or merchant > INT32_MAX:
        raise ValueError(f"merchant {merchant} is not a merchant slot (0..{INT32_MAX})")
    return 0


cdef inline int _check_positive(int64_t points) except -1:
    if points <= 0:
        raise ValueError(f"points must be > 0, got {points}")
    return 0


# apply_earn_redeem(): the bounds that keep its products in int64 (points * multiplier_bps <= 2**62,
# purchase * acquiring_bps <= 2**62); the caller sends larger amounts down its per-operation path.
cdef int64_t MULTIPLIER_BPS_MAX = 100000
cdef int64_t LEVELS_MAX = 63
cdef int64_t EARN_POINTS_MAX = 46116860184273  # 2**62 // MULTIPLIER_BPS_MAX
cdef int64_t PURCHASE_MAX = 461168601842738  # 2**62 // 10000
RULES_EARN_POINTS_MAX = EARN_POINTS_MAX
RULES_PURCHASE_MAX = PURCHASE_MAX
RULES_LEVELS_MAX = LEVELS_MAX


cdef inline int64_t _level_for(int64_t qualifying, const int64_t[:] threshold, int64_t levels) noexcept:
    # rules.level_for: the last level whose threshold the qualifying points reach (level 0 if none)
    cdef int64_t level, reached = 0
    for level in range(levels):
        if qualifying >= threshold[level]:
            reached = level
    return reached


cdef int _check_column(str name, Py_ssize_t length, int64_t count, bint exact) except -1:
    # apply_batch(): inputs have one item per operation; outputs at least that many.
    if exact and length != count:
        raise ValueError(f"{name} has {length} items; method has {count}")
    if not exact and length < count:
        raise ValueError(f"{name} has {length} items, fewer than the {count} operations")
    return 0


# --- outcomes built in C (Ledger.earn_redeem_rows), and what the per-operation loops read ---

# processor.domain.Outcome's fields in order, and the default of each after `code` and `fields`; the
# layout is read from the class once (_outcome_layout, fastpath/slots.pxd) and checked against these
_OUTCOME_SLOTS = ("code", "fields", "message", "replayed", "recorded", "reason", "retry_after_seconds", "quota")
cdef Py_ssize_t _outcome_offsets[8]
cdef type _outcome_class = None
cdef tuple _outcome_defaults = ()

# what idempotency_records and earn_redeem_rows read of each Operation, Outcome and merchant's row
# (processor.store.MerchantRow): by offset when their exact class has these slots, else by getattr
# (slots.pxd's SlotReader: ~60 instructions a read by getattr from here, a few by offset)
cdef tuple _OPERATION_READ = (
    "merchant_id", "idempotency_key", "method", "request", "member_id", "points", "purchase_amount"
)
cdef enum:
    _OP_MERCHANT_ID, _OP_IDEMPOTENCY_KEY, _OP_METHOD, _OP_REQUEST, _OP_MEMBER_ID, _OP_POINTS, _OP_PURCHASE_AMOUNT
cdef tuple _OUTCOME_READ = ("code", "recorded", "fields", "message", "quota")
cdef enum:
    _OUTCOME_CODE, _OUTCOME_RECORDED, _OUTCOME_FIELDS, _OUTCOME_MESSAGE, _OUTCOME_QUOTA
cdef tuple _MERCHANT_READ = (
    "give_back_bps", "fees_account_id", "issued_account_id", "redeemed_account_id", "acquiring_account_id"
)
cdef enum:
    _MERCHANT_GIVE_BACK_BPS, _MERCHANT_FEES, _MERCHANT_ISSUED, _MERCHANT_REDEEMED, _MERCHANT_ACQUIRING
# what the batch loop's first pass (Ledger.first_pass_plain, first_pass_run) reads besides _OPERATION_READ
cdef tuple _PASS_READ = ("refusal", "vouchers", "transaction_id", "referrer_id", "authorization_id", "merchant_slot")
cdef enum:
    _PASS_REFUSAL, _PASS_VOUCHERS, _PASS_TRANSACTION_ID, _PASS_REFERRER_ID, _PASS_AUTHORIZATION_ID, _PASS_MERCHANT_SLOT
cdef tuple _MERCHANT_PASS_READ = ("status", "give_back_bps", "fee_issued_bps", "fee_redeemed_bps")
cdef enum:
    _MERCHANT_STATUS, _MERCHANT_PASS_GIVE_BACK_BPS, _MERCHANT_FEE_ISSUED, _MERCHANT_FEE_REDEEMED
cdef SlotReader _pass_reader
# points whose fee at any rate up to 10,000 bps is an int64 product (plain_rows; larger: the caller's path)
cdef int64_t _FEE_POINTS_MAX = 922337203685477
cdef SlotReader _merchant_pass_reader
cdef SlotReader _operation_reader
cdef SlotReader _outcome_reader
cdef SlotReader _merchant_reader


cdef int _outcome_layout(type outcome_class) except -1:
    """Reads where each slot of `outcome_class` (processor.domain.Outcome, a slots dataclass) lives in its
    objects, and the defaults of its fields after `code` and `fields`; a class whose slots are not
    _OUTCOME_SLOTS is refused (a field added to Outcome must be added here)."""
    global _outcome_class, _outcome_defaults
    slot_offsets(outcome_class, _OUTCOME_SLOTS, _outcome_offsets, "fastpath/_core.pyx's _OUTCOME_SLOTS")
    fields = outcome_class.__dataclass_fields__
    defaults = tuple(fields[name].default for name in _OUTCOME_SLOTS[2:])
    if any(type(default).__name__ == "_MISSING_TYPE" for default in defaults):
        raise TypeError(f"{outcome_class!r}: every field after code and fields needs a plain default")
    _outcome_defaults = defaults
    _outcome_class = outcome_class
    return 0


cdef object _outcome(object outcome_class, object code, dict fields):
    """outcome_class(code, fields), its slots filled in C rather than by the dataclass's __init__ (a
    Python call, ~0.2 µs: one outcome an operation). The same object: every other slot its default."""
    cdef Py_ssize_t index
    if outcome_class is not _outcome_class:
        _outcome_layout(outcome_class)
    outcome = new_with_slots(_outcome_class)
    put(outcome, _outcome_offsets[0], code)
    put(outcome, _outcome_offsets[1], fields)
    for index in range(6):
        put(outcome, _outcome_offsets[index + 2], _outcome_defaults[index])
    return outcome


cdef extern from "Python.h":
    bint _gc_is_tracked "PyObject_GC_IsTracked"(object value)
    void _gc_untrack "PyObject_GC_UnTrack"(object value)
    bint _gc_is_tracked_item "PyObject_GC_IsTracked"(PyObject* value)
    PyObject* _row_item "PyTuple_GET_ITEM"(object row, Py_ssize_t index)
    Py_ssize_t _row_size "PyTuple_GET_SIZE"(object row)
    ctypedef struct _TypedObject "PyObject":
        void* ob_type
    void* _int_type "&PyLong_Type"
    void* _str_type "&PyUnicode_Type"
    PyObject* _none "Py_None"


cdef inline int _append_row(list rows, tuple row) except -1:
    """rows.append(row), the row untracked by the cyclic collector when none of its items is tracked (ints,
    str, None: every transaction and entry row): what the first young pass after the apply would do to
    it, done at birth, so that no pass walks the batch's rows (~4.3 of the ~8.4 tracked objects an
    operation an apply left to the young pass with the program, loadtest/gc_survivors.py). An int, str or
    None is told by its type's address (PyObject_GC_IsTracked is a call: ~2x the instructions)."""
    cdef Py_ssize_t index
    cdef PyObject* item
    cdef void* kind
    for index in range(_row_size(row)):
        item = _row_item(row, index)
        kind = (<_TypedObject*>item).ob_type
        if kind != _int_type and kind != _str_type and item != _none and _gc_is_tracked_item(item):
            break
    else:
        _gc_untrack(row)
    rows.append(row)
    return 0


cdef inline int _fee_rows(list entries, object created, object merchant, object fee_revenue, int64_t fee,
                         object fee_object) except -1:
    # a transaction's fee legs (plain_rows, earn_redeem_rows): the merchant's fees account pays, the
    # operator's fee revenue account receives
    _append_row(entries, (created, slot_read(&_merchant_reader, merchant, _MERCHANT_FEES, _MERCHANT_READ), -fee))
    _append_row(entries, (created, fee_revenue, fee_object))
    return 0


cdef inline object _redeem_rows(list transactions, list entries, object created, object merchant_id,
                                object member_id, object points_object, int64_t points, object key,
                                object fee_object, int64_t member_account, object merchant, object outcome_type,
                                object ok_code, int64_t posted, int64_t available):
    # a redemption decided OK (plain_rows, earn_redeem_rows): its transaction row, its two legs, and its
    # outcome, returned
    _append_row(transactions, (created, KIND_REDEEM, merchant_id, member_id, points_object, None, None, None, key,
                               fee_object))
    _append_row(entries, (created, member_account, -points))
    _append_row(entries, (created, slot_read(&_merchant_reader, merchant, _MERCHANT_REDEEMED, _MERCHANT_READ),
                          points_object))
    return _outcome(outcome_type, ok_code, {
        "transaction_id": created,
        "points": points_object,
        "balance": posted,
        "available": available,
    })


cdef extern from "Python.h":
    object _vectorcall "PyObject_Vectorcall"(object function, PyObject** args, size_t nargsf, object kwnames)
    object _decode_utf8 "PyUnicode_DecodeUTF8"(const char* data, Py_ssize_t size, const char* errors)
    char* _bytes_data "PyBytes_AS_STRING"(object value)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(object value)

cdef tuple _OPTION_KEYWORD = ("option",)


cdef inline object _dumps_text(object dumps, object value, object option, object fallback):
    """dumps(value, option=option) as str: its UTF-8 bytes decoded (orjson.dumps answers bytes); a str
    answer is kept. On a TypeError (orjson's JSONEncodeError) and a fallback not None: dumps(value,
    option=fallback) instead. With option None: dumps(value), its answer as it is. With dumps None: the
    value itself (its JSON is made once a batch: processor/idempotency_records.encode)."""
    if dumps is None:
        return value
    if option is None:
        return dumps(value)
    cdef PyObject* args[2]
    args[0] = <PyObject*>value
    args[1] = <PyObject*>option
    try:
        made = _vectorcall(dumps, args, 1, _OPTION_KEYWORD)
    except TypeError:
        if fallback is None:
            raise
        args[1] = <PyObject*>fallback
        made = _vectorcall(dumps, args, 1, _OPTION_KEYWORD)
    if type(made) is bytes:
        return _decode_utf8(_bytes_data(made), _bytes_size(made), NULL)
    return made


cdef int _records_with_option(list batch, list outcomes, dict stored, frozenset not_recorded, object ok,
                              object dumps, list records, object option, object fallback) except -1:
    # Ledger.idempotency_records' loop: dumps(value, option=option) called by vectorcall, its bytes
    # decoded (_dumps_text), or dumps(value) with option None, or the value itself with dumps None.
    # With dumps None the cyclic collector is also told to stop watching what cannot be in a cycle (see
    # Ledger.idempotency_records): a record tuple whose request and fields it does not track (dicts of
    # str, int, bool and None: the servicer's requests, the outcomes' fields), and an outcome of the
    # laid-out class whose fields it does not track and that has no quota. Both are referred to only by
    # the batch's lists and refer to nothing that could refer back (an enum member, str, int, bool,
    # None, untracked dicts), which is what a young pass checks before it untracks a tuple of atomic items.
    cdef Py_ssize_t index
    cdef bint untrack = dumps is None
    if len(outcomes) != len(batch):
        raise ValueError(f"{len(outcomes)} outcomes for {len(batch)} operations")
    for index in range(len(batch)):
        op = batch[index]
        outcome = outcomes[index]
        code = slot_read(&_outcome_reader, outcome, _OUTCOME_CODE, _OUTCOME_READ)
        fields = slot_read(&_outcome_reader, outcome, _OUTCOME_FIELDS, _OUTCOME_READ)
        if (untrack and _gc_is_tracked(outcome) and _is_outcome_class(type(outcome))
                and not _gc_is_tracked(fields)
                and slot_read(&_outcome_reader, outcome, _OUTCOME_QUOTA, _OUTCOME_READ) is None):
            _gc_untrack(outcome)
        if ((code is not ok and code in not_recorded)
                or not slot_read(&_outcome_reader, outcome, _OUTCOME_RECORDED, _OUTCOME_READ)):
            continue  # a refusal about the service's state is not recorded
        merchant_id = slot_read(&_operation_reader, op, _OP_MERCHANT_ID, _OPERATION_READ)
        key = slot_read(&_operation_reader, op, _OP_IDEMPOTENCY_KEY, _OPERATION_READ)
        if stored and (merchant_id, key) in stored:
            continue  # a replay keeps its record
        request = slot_read(&_operation_reader, op, _OP_REQUEST, _OPERATION_READ)
        record = (
            merchant_id, key, slot_read(&_operation_reader, op, _OP_METHOD, _OPERATION_READ)._value_,
            _dumps_text(dumps, request, option, fallback),
            code._value_,
            _dumps_text(dumps, fields, option, fallback) if code is ok else None,
            slot_read(&_outcome_reader, outcome, _OUTCOME_MESSAGE, _OUTCOME_READ),
        )
        if untrack and not _gc_is_tracked(request) and (code is not ok or not _gc_is_tracked(fields)):
            _gc_untrack(record)
        records.append(record)
    return 0


cdef inline bint _is_outcome_class(type kind) except -1:
    """kind is the outcome class _outcome() builds (processor.domain.Outcome: its slots exactly
    _OUTCOME_SLOTS, _outcome_layout checks), laid out here if no outcome was built yet."""
    if kind is _outcome_class:
        return True
    if _outcome_class is not None or kind.__name__ != "Outcome":
        return False
    try:
        _outcome_layout(kind)
    except (TypeError, ValueError):
        return False
    return kind is _outcome_class


cdef extern from "Python.h":
    long long _long_as_int64 "PyLong_AsLongLongAndOverflow"(object value, int* overflow) except? -1


cdef inline bint _int_within(object value, int64_t low, int64_t high, int64_t* out) except -1:
    """True, with *out set, when value is an int (exactly) within low..high; False otherwise (no error)."""
    cdef int overflow = 0
    cdef long long number
    if type(value) is not int:
        return False
    number = _long_as_int64(value, &overflow)
    if overflow or number < low or number > high:
        return False
    out[0] = number
    return True


cdef object _first_pass_merchant(object op, dict merchants, set routed, dict stored, object earn,
                                 object redeem):
    """The merchant row of `op` when the batch loop's first pass may take it (an earn or redeem of an active
    merchant, no replay, refusal, route, vouchers or hold), else None: the batch loop decides it (twin:
    fastpath/_reference.py's _first_pass_merchant)."""
    if stored:
        if stored.get((slot_read(&_operation_reader, op, _OP_MERCHANT_ID, _OPERATION_READ),
                       slot_read(&_operation_reader, op, _OP_IDEMPOTENCY_KEY, _OPERATION_READ))) is not None:
            return None
    method = slot_read(&_operation_reader, op, _OP_METHOD, _OPERATION_READ)
    if (slot_read(&_pass_reader, op, _PASS_REFUSAL, _PASS_READ) is not None
            or (method is not earn and method is not redeem)):
        return None
    member_id = slot_read(&_operation_reader, op, _OP_MEMBER_ID, _OPERATION_READ)
    if (type(member_id) is not str or member_id in routed
            or slot_read(&_pass_reader, op, _PASS_TRANSACTION_ID, _PASS_READ)
            or slot_read(&_pass_reader, op, _PASS_REFERRER_ID, _PASS_READ)):
        return None
    if (slot_read(&_pass_reader, op, _PASS_VOUCHERS, _PASS_READ)
            or slot_read(&_pass_reader, op, _PASS_AUTHORIZATION_ID, _PASS_READ)):
        return None
    merchant = merchants.get(slot_read(&_operation_reader, op, _OP_MERCHANT_ID, _OPERATION_READ))
    if merchant is None:
        return None
    status = slot_read(&_merchant_pass_reader, merchant, _MERCHANT_STATUS, _MERCHANT_PASS_READ)
    if type(status) is not str or <str>status != "active":  # a str's compare in C, no rich compare
        return None
    return merchant


cdef class Ledger:
    def __cinit__(self, members_max, holds_max, transactions_max):
        self.members_max = _int64(members_max)
        self.holds_max = _int64(holds_max)
        self.transactions_max = _int64(transactions_max)
        if self.members_max < 1 or self.holds_max < 1 or self.transactions_max < 1:
            raise ValueError("members_max, holds_max and transactions_max must each be >= 1, got "
                             f"{members_max}, {holds_max}, {transactions_max}")
        self.member_slots = {}
        self.member_ids = []
        self.hold_slots = {}
        self.transaction_slots = {}

    def __dealloc__(self):
        free(self.member_posted)
        free(self.member_held)
        free(self.member_accounts)
        free(self.hold_ids)
        free(self.hold_member)
        free(self.hold_amount)
        free(self.hold_expires_at_us)
        free(self.hold_merchant)
        free(self.hold_status)
        free(self.transaction_ids)
        free(self.transaction_member)
        free(self.transaction_amount)
        free(self.transaction_refunded)
        free(self.transaction_merchant)
        free(self.transaction_kind)
        free(self.heap_expires_at_us)
        free(self.heap_hold)
        free(self.undo_field)
        free(self.undo_slot)
        free(self.undo_old)
        free(self.batch_marks)

    # --- storage ---------------------------------------------------------------------------------
    # Every operation reserves all it may need before its first write, so a MemoryError never leaves
    # half an operation behind. A failed realloc leaves the old, still valid array in place.

    cdef int _reserve_members(self, int64_t needed) except -1:
        if needed <= self.members_capacity:
            return 0
        if needed > self.members_max:
            raise LedgerInvariantError(f"members reserved beyond members_max {self.members_max}")
        cdef int64_t capacity = _capacity_next(self.members_capacity, needed, self.members_max)
        _grow(<void**>&self.member_posted, capacity, sizeof(int64_t))
        _grow(<void**>&self.member_held, capacity, sizeof(int64_t))
        _grow(<void**>&self.member_accounts, capacity, sizeof(int64_t))
        self.members_capacity = capacity
        return 0

    cdef int _reserve_holds(self, int64_t needed) except -1:
        if needed <= self.holds_capacity:
            return 0
        if needed > self.holds_max:
            raise LedgerInvariantError(f"holds reserved beyond holds_max {self.holds_max}")
        cdef int64_t capacity = _capacity_next(self.holds_capacity, needed, self.holds_max)
        _grow(<void**>&self.hold_ids, capacity, sizeof(int64_t))
        _grow(<void**>&self.hold_member, capacity, sizeof(int64_t))
        _grow(<void**>&self.hold_amount, capacity, sizeof(int64_t))
        _grow(<void**>&self.hold_expires_at_us, capacity, sizeof(int64_t))
        _grow(<void**>&self.hold_merchant, capacity, sizeof(int32_t))
        _grow(<void**>&self.hold_status, capacity, sizeof(int32_t))
        _grow(<void**>&self.heap_expires_at_us, capacity, sizeof(int64_t))
        _grow(<void**>&self.heap_hold, capacity, sizeof(int64_t))
        self.holds_capacity = capacity
        return 0

    cdef int _reserve_transactions(self, int64_t needed) except -1:
        if needed <= self.transactions_capacity:
            return 0
        if needed > self.transactions_max:
            raise LedgerInvariantError(f"transactions reserved beyond transactions_max {self.transactions_max}")
        cdef int64_t capacity = _capacity_next(self.transactions_capacity, needed,
                                               self.transactions_max)
        _grow(<void**>&self.transaction_ids, capacity, sizeof(int64_t))
        _grow(<void**>&self.transaction_member, capacity, sizeof(int64_t))
        _grow(<void**>&self.transaction_amount, capacity, sizeof(int64_t))
        _grow(<void**>&self.transaction_refunded, capacity, sizeof(int64_t))
        _grow(<void**>&self.transaction_merchant, capacity, sizeof(int32_t))
        _grow(<void**>&self.transaction_kind, capacity, sizeof(int32_t))
        self.transactions_capacity = capacity
        return 0

    cdef int _reserve_undo(self, int64_t records) except -1:
        # The log has no maximum of its own: it is bounded by the batches the caller has open between
        # begin() and commit(), and those are bounded in config.
        if self.batches_open == 0:
            return 0
        cdef int64_t needed = self.undo_count + records
        if needed <= self.undo_capacity:
            return 0
        cdef int64_t capacity = _capacity_next(self.undo_capacity, needed, needed * 2)
        _grow(<void**>&self.undo_field, capacity, sizeof(int32_t))
        _grow(<void**>&self.undo_slot, capacity, sizeof(int64_t))
        _grow(<void**>&self.undo_old, capacity, sizeof(int64_t))
        self.undo_capacity = capacity
        return 0

    cdef int _reserve_batches(self, int64_t needed) except -1:
        # Bounded like the undo log: by how many batches the caller keeps in flight.
        if needed <= self.batches_capacity:
            return 0
        cdef int64_t capacity = _capacity_next(self.batches_capacity, needed, needed * 2)
        _grow(<void**>&self.batch_marks, capacity, sizeof(BatchMark))
        self.batches_capacity = capacity
        return 0

    # --- recorded writes: the only way existing members, holds and transactions change ------------

    cdef int _record(self, int32_t field, int64_t slot, int64_t old_value) except -1:
        if self.batches_open == 0:
            return 0
        if self.undo_count >= self.undo_capacity:
            raise LedgerInvariantError("undo log written past its reservation")
        self.undo_field[self.undo_count] = field
        self.undo_slot[self.undo_count] = slot
        self.undo_old[self.undo_count] = old_value
        self.undo_count += 1
        return 0

    cdef int _set_posted(self, int64_t member, int64_t value) except -1:
        self._record(UNDO_MEMBER_POSTED, member, self.member_posted[member])
        self.member_posted[member] = value
        return 0

    cdef int _set_held(self, int64_t member, int64_t value) except -1:
        self._record(UNDO_MEMBER_HELD, member, self.member_held[member])
        self.member_held[member] = value
        return 0

    cdef int _set_hold_status(self, int64_t hold, int32_t status) except -1:
        self._record(UNDO_HOLD_STATUS, hold, self.hold_status[hold])
        if self.hold_status[hold] == HOLD_OPEN:
            self.holds_open_count -= 1
        if status == HOLD_OPEN:
            self.holds_open_count += 1
        self.hold_status[hold] = status
        return 0

    cdef int _set_refunded(self, int64_t transaction, int64_t value) except -1:
        self._record(UNDO_TRANSACTION_REFUNDED, transaction, self.transaction_refunded[transaction])
        self.transaction_refunded[transaction] = value
        return 0

    # --- undo log: batch_marks[0] is the oldest open batch; its records run from its undo_count to
    #     the next mark's, the newest batch's to undo_count ---------------------------------------------

    cdef int _compact_undo(self) except -1:
        # After commit() the records below the oldest mark are dead. A pipelined caller always has a
        # batch open, so they would pile up; moving the live ones down once the dead outnumber them
        # moves each record O(1) times on average.
        cdef int64_t dead = self.batch_marks[0].undo_count if self.batches_open > 0 else self.undo_count
        cdef int64_t live = self.undo_count - dead
        cdef int64_t batch
        if dead == 0 or dead < live:
            return 0
        if live > 0:
            memmove(self.undo_field, self.undo_field + dead, <size_t>live * sizeof(int32_t))
            memmove(self.undo_slot, self.undo_slot + dead, <size_t>live * sizeof(int64_t))
            memmove(self.undo_old, self.undo_old + dead, <size_t>live * sizeof(int64_t))
        for batch in range(self.batches_open):
            self.batch_marks[batch].undo_count -= dead
        self.undo_count = live
        if self.batches_open > 0 and self.batch_marks[0].undo_count != 0:
            raise LedgerInvariantError("undo log compacted, but the oldest batch does not start at 0")
        return 0

    cdef int _rollback_to(self, int64_t batch) except -1:
        # Restores the state at the begin() of open batch `batch` and closes it and every newer one.
        if batch < 0 or batch >= self.batches_open:
            raise LedgerInvariantError(f"rollback to batch {batch} of {self.batches_open} open")
        cdef BatchMark mark = self.batch_marks[batch]
        cdef int64_t record
        cdef int64_t slot
        cdef int64_t old_value
        cdef int32_t field
        if (mark.undo_count > self.undo_count or mark.members_count > self.members_count
                or mark.holds_resident_count > self.holds_resident_count
                or mark.transactions_resident_count > self.transactions_resident_count):
            raise LedgerInvariantError(f"batch {batch} begins beyond the ledger's present counts")
        for record in range(self.undo_count - 1, mark.undo_count - 1, -1):
            field = self.undo_field[record]
            slot = self.undo_slot[record]
            old_value = self.undo_old[record]
            if field == UNDO_MEMBER_POSTED:
                self.member_posted[slot] = old_value
            elif field == UNDO_MEMBER_HELD:
                self.member_held[slot] = old_value
            elif field == UNDO_HOLD_STATUS:
                self.hold_status[slot] = <int32_t>old_value
            elif field == UNDO_TRANSACTION_REFUNDED:
                self.transaction_refunded[slot] = old_value
            else:
                raise LedgerInvariantError(f"undo record {record} has unknown field {field}")
        for slot in range(mark.members_count, self.members_count):
            del self.member_slots[self.member_ids[slot]]
        del self.member_ids[mark.members_count:]
        for slot in range(mark.holds_resident_count, self.holds_resident_count):
            del self.hold_slots[self.hold_ids[slot]]
        for slot in range(mark.transactions_resident_count, self.transactions_resident_count):
            del self.transaction_slots[self.transaction_ids[slot]]
        self.members_count = mark.members_count
        self.holds_resident_count = mark.holds_resident_count
        self.holds_open_count = mark.holds_open_count
        self.transactions_resident_count = mark.transactions_resident_count
        self._heap_rebuild()
        self.batches_open = batch
        self.undo_count = mark.undo_count
        if batch == 0:
            self.undo_count = 0  # what is left below the oldest mark is dead
        return 0

    # --- creation: appended at the end, so rollback() removes them by cutting back to the counts
    #     remembered at begin() ----------------------------------------------------------------------

    cdef int64_t _add_member(self, str member_id, int64_t posted, int64_t account_id) except -1:
        cdef int64_t member = self.members_count
        self.member_ids.append(member_id)
        self.member_slots[member_id] = member
        self.member_posted[member] = posted
        self.member_held[member] = 0
        # Always written: the slot may be one a rolled-back batch had used with another account.
        self.member_accounts[member] = account_id
        self.members_count = member + 1
        return member

    cdef int64_t _add_hold(self, int64_t hold_id, int64_t member, int32_t merchant, int64_t amount,
                           int64_t expires_at_us, int32_t status) except -1:
        cdef int64_t hold = self.holds_resident_count
        self.hold_slots[hold_id] = hold
        self.hold_ids[hold] = hold_id
        self.hold_member[hold] = member
        self.hold_merchant[hold] = merchant
        self.hold_amount[hold] = amount
        self.hold_expires_at_us[hold] = expires_at_us
        self.hold_status[hold] = status
        self.holds_resident_count = hold + 1
        if status == HOLD_OPEN:
            self.holds_open_count += 1
            self._heap_push(expires_at_us, hold)
        return hold

    cdef int64_t _add_transaction(self, int64_t transaction_id, int32_t kind, int64_t member,
                                  int32_t merchant, int64_t amount, int64_t refunded) except -1:
        cdef int64_t transaction = self.transactions_resident_count
        self.transaction_slots[transaction_id] = transaction
        self.transaction_ids[transaction] = transaction_id
        self.transaction_kind[transaction] = kind
        self.transaction_member[transaction] = member
        self.transaction_merchant[transaction] = merchant
        self.transaction_amount[transaction] = amount
        self.transaction_refunded[transaction] = refunded
        self.transactions_resident_count = transaction + 1
        return transaction

    # --- checks ------------------------------------------------------------------------------------

    cdef int _check_member_slot(self, int64_t member_slot) except -1:
        if member_slot < 0 or member_slot >= self.members_count:
            raise IndexError(f"member slot {member_slot} is not in 0..{self.members_count - 1}")
        return 0

    cdef int _check_member_after(self, int64_t member, int64_t posted, int64_t held) except -1:
        # Checked on the values an operation is about to write, before it writes any of them.
        if posted < 0 or posted > balance_max or held < 0 or held > posted:
            raise LedgerInvariantError(
                f"member {self.member_ids[member]!r} (slot {member}) would have posted {posted}, "
                f"held {held}; was posted {self.member_posted[member]}, held {self.member_held[member]}")
        return 0

    # --- kernels: validate, decide and write with C integers; the def methods below only convert
    #     arguments and build the result tuples ------------------------------------------------------

    cdef int _release_hold(self, int64_t hold, int32_t status) except -1:
        cdef int64_t member = self.hold_member[hold]
        cdef int64_t held = self.member_held[member] - self.hold_amount[hold]
        self._check_member_after(member, self.member_posted[member], held)
        self._set_hold_status(hold, status)
        self._set_held(member, held)
        return 0

    cdef int32_t _resolvable(self, int64_t hold, int64_t merchant, int64_t now_us) except -1:
        # Wrong merchant first: another merchant learns nothing about the hold, and does not get to
        # expire it either.
        if self.hold_merchant[hold] != merchant:
            return WRONG_MERCHANT
        cdef int32_t status = self.hold_status[hold]
        if status == HOLD_STATUS_CAPTURED:
            return HOLD_CAPTURED
        if status == HOLD_STATUS_VOIDED:
            return HOLD_VOIDED
        if status == HOLD_STATUS_EXPIRED:
            return HOLD_EXPIRED
        if self.hold_expires_at_us[hold] <= now_us:
            self._reserve_undo(2)
            self._release_hold(hold, HOLD_STATUS_EXPIRED)
            return HOLD_EXPIRED
        return OK

    cdef int _check_new_transaction(self, int64_t transaction_id) except -1:
        if transaction_id in self.transaction_slots:
            raise KeyError(f"transaction {transaction_id} is resident already")
        return 0

    cdef int64_t _load_member(self, str member_id, int64_t posted, int64_t account_id) except -1:
        if posted < 0 or posted > balance_max:
            raise OverflowError(f"posted {posted} of member {member_id!r} is outside 0..{balance_max}")
        if account_id < 0:
            raise ValueError(f"account_id of member {member_id!r} must be >= 0 (0: not known), "
                             f"got {account_id}")
        found = self.member_slots.get(member_id)
        if found is not None:
            self._reserve_undo(1)
            self._set_posted(found, posted)
            # Not recorded in the undo log: an account id is a fact from Postgres, true whatever the
            # batch; 0 means the caller did not say, so the id already known stays.
            if account_id != 0:
                self.member_accounts[<int64_t>found] = account_id
            return found
        if self.members_count >= self.members_max:
            raise OverflowError(f"members_max {self.members_max} reached; cannot load {member_id!r}")
        self._reserve_members(self.members_count + 1)
        return self._add_member(member_id, posted, account_id)

    cdef int64_t _ensure_member(self, str member_id) except -2:
        # -1 (CAPACITY) is an answer here, not an error, so errors are -2.
        found = self.member_slots.get(member_id)
        if found is not None:
            return found
        if self.members_count >= self.members_max:
            return -1
        self._reserve_members(self.members_count + 1)
        return self._add_member(member_id, 0, 0)

    cdef int _load_hold(self, int64_t hold_id, int64_t member_slot, int64_t merchant, int64_t amount,
                        int64_t expires_at_us, int64_t status) except -1:
        self._check_member_slot(member_slot)
        _check_merchant(merchant)
        if amount <= 0 or amount > balance_max:
            raise ValueError(f"hold {hold_id}: amount {amount} is outside 1..{balance_max}")
        if status < HOLD_OPEN or status > HOLD_STATUS_EXPIRED:
            raise ValueError(f"hold {hold_id}: status {status} is not a hold status")
        if hold_id in self.hold_slots:
            raise KeyError(f"hold {hold_id} is resident already")
        if self.holds_resident_count >= self.holds_max:
            raise OverflowError(f"holds_max {self.holds_max} reached; cannot load hold {hold_id}")
        cdef int64_t held = self.member_held[member_slot]
        if status == HOLD_OPEN:
            if amount > balance_max - held:
                raise OverflowError(f"hold {hold_id}: held of member slot {member_slot} would exceed "
                                    f"{balance_max}")
            held += amount
        self._reserve_holds(self.holds_resident_count + 1)
        self._reserve_undo(1)
        self._add_hold(hold_id, member_slot, <int32_t>merchant, amount, expires_at_us,
                       <int32_t>status)
        if status == HOLD_OPEN:
            self._set_held(member_slot, held)
        return 0

    cdef int _load_transaction(self, int64_t transaction_id, int64_t kind, int64_t member_slot,
                               int64_t merchant, int64_t amount, int64_t refunded) except -1:
        self._check_member_slot(member_slot)
        _check_merchant(merchant)
        if kind < KIND_EARN or kind > KIND_REFUND_EARN:
            raise ValueError(f"transaction {transaction_id}: kind {kind} is not a transaction kind")
        if amount < 0 or amount > balance_max:
            raise ValueError(f"transaction {transaction_id}: amount {amount} is outside 0..{balance_max}")
        if refunded < 0 or refunded > amount:
            raise ValueError(f"transaction {transaction_id}: refunded {refunded} is outside 0..{amount}")
        self._check_new_transaction(transaction_id)
        if self.transactions_resident_count >= self.transactions_max:
            raise OverflowError(f"transactions_max {self.transactions_max} reached; cannot load "
                                f"transaction {transaction_id}")
        self._reserve_transactions(self.transactions_resident_count + 1)
        self._add_transaction(transaction_id, <int32_t>kind, member_slot, <int32_t>merchant, amount,
                              refunded)
        return 0

    cdef int32_t _earn(self, str member_id, int64_t member, int64_t merchant, int64_t points,
                       int64_t transaction_id, Outcome* outcome) except -1:
        # member is the resident slot of member_id, or -1 to create member_id: earn() looks the id up,
        # apply_batch() already has the slot (and passes no id).
        _check_merchant(merchant)
        if points < 0:
            raise ValueError(f"points must be >= 0, got {points}")
        self._check_new_transaction(transaction_id)
        cdef int64_t posted = 0
        cdef int64_t held = 0
        if member >= 0:
            posted = self.member_posted[member]
            held = self.member_held[member]
            outcome.involved = member
        if points > balance_max - posted:
            return OVERFLOW
        if member < 0 and self.members_count >= self.members_max:
            return CAPACITY
        if self.transactions_resident_count >= self.transactions_max:
            return CAPACITY
        if member < 0:
            self._reserve_members(self.members_count + 1)
        self._reserve_transactions(self.transactions_resident_count + 1)
        self._reserve_undo(1)
        if member < 0:
            if member_id is None:
                raise LedgerInvariantError("earn of a new member without its id")
            member = self._add_member(member_id, 0, 0)
            outcome.involved = member
        posted += points
        self._check_member_after(member, posted, held)
        self._set_posted(member, posted)
        self._add_transaction(transaction_id, KIND_EARN, member, <int32_t>merchant, points, 0)
        outcome.member = member
        outcome.amount = points
        outcome.posted = posted
        outcome.available = posted - held
        outcome.kind = KIND_EARN
        return OK

    cdef int32_t _authorize(self, int64_t member_slot, int64_t merchant, int64_t points,
                            int64_t hold_id, int64_t expires_at_us, Outcome* outcome) except -1:
        _check_positive(points)
        _check_merchant(merchant)
        if member_slot != -1:
            self._check_member_slot(member_slot)
        if hold_id in self.hold_slots:
            raise KeyError(f"hold {hold_id} is resident already")
        outcome.involved = member_slot
        if member_slot == -1:
            return UNKNOWN_MEMBER
        cdef int64_t posted = self.member_posted[member_slot]
        cdef int64_t held = self.member_held[member_slot]
        if points > posted - held:
            return INSUFFICIENT_POINTS
        if self.holds_resident_count >= self.holds_max:
            return CAPACITY
        self._reserve_holds(self.holds_resident_count + 1)
        self._reserve_undo(1)
        held += points
        self._check_member_after(member_slot, posted, held)
        self._add_hold(hold_id, member_slot, <int32_t>merchant, points, expires_at_us, HOLD_OPEN)
        self._set_held(member_slot, held)
        outcome.member = member_slot
        outcome.amount = points
        outcome.posted = posted
        outcome.available = posted - held
        return OK

    cdef int32_t _capture(self, int64_t hold_id, int64_t merchant, int64_t points,
                          int64_t transaction_id, int64_t now_us, Outcome* outcome) except -1:
        _check_merchant(merchant)
        if points < 0:
            raise ValueError(f"points must be >= 0 (0 captures the whole hold), got {points}")
        self._check_new_transaction(transaction_id)
        found = self.hold_slots.get(hold_id)
        if found is None:
            return UNKNOWN_HOLD
        cdef int64_t hold = found
        cdef int32_t status = self._resolvable(hold, merchant, now_us)
        if status != WRONG_MERCHANT:
            outcome.involved = self.hold_member[hold]
        if status != OK:
            return status
        cdef int64_t amount = self.hold_amount[hold]
        cdef int64_t captured = amount if points == 0 else points
        if captured > amount:
            return CAPTURE_EXCEEDS_HOLD
        if self.transactions_resident_count >= self.transactions_max:
            return CAPACITY
        cdef int64_t member = self.hold_member[hold]
        cdef int64_t posted = self.member_posted[member] - captured
        cdef int64_t held = self.member_held[member] - amount
        self._check_member_after(member, posted, held)
        self._reserve_transactions(self.transactions_resident_count + 1)
        self._reserve_undo(3)
        self._release_hold(hold, HOLD_STATUS_CAPTURED)
        self._set_posted(member, posted)
        self._add_transaction(transaction_id, KIND_CAPTURE, member, <int32_t>merchant, captured, 0)
        outcome.amount = captured
        outcome.member = member
        outcome.posted = posted
        outcome.available = posted - held
        outcome.kind = KIND_CAPTURE
        return OK

    cdef int32_t _void(self, int64_t hold_id, int64_t merchant, int64_t now_us,
                       Outcome* outcome) except -1:
        _check_merchant(merchant)
        found = self.hold_slots.get(hold_id)
        if found is None:
            return UNKNOWN_HOLD
        cdef int64_t hold = found
        cdef int32_t status = self._resolvable(hold, merchant, now_us)
        if status != WRONG_MERCHANT:
            outcome.involved = self.hold_member[hold]
        if status != OK:
            return status
        cdef int64_t member = self.hold_member[hold]
        self._reserve_undo(2)
        self._release_hold(hold, HOLD_STATUS_VOIDED)
        outcome.amount = self.hold_amount[hold]
        outcome.member = member
        outcome.posted = self.member_posted[member]
        outcome.available = self.member_posted[member] - self.member_held[member]
        return OK

    cdef int32_t _redeem(self, int64_t member_slot, int64_t merchant, int64_t points,
                         int64_t transaction_id, Outcome* outcome) except -1:
        _check_positive(points)
        _check_merchant(merchant)
        if member_slot != -1:
            self._check_member_slot(member_slot)
        self._check_new_transaction(transaction_id)
        outcome.involved = member_slot
        if member_slot == -1:
            return UNKNOWN_MEMBER
        cdef int64_t posted = self.member_posted[member_slot]
        cdef int64_t held = self.member_held[member_slot]
        if points > posted - held:
            return INSUFFICIENT_POINTS
        if self.transactions_resident_count >= self.transactions_max:
            return CAPACITY
        posted -= points
        self._check_member_after(member_slot, posted, held)
        self._reserve_transactions(self.transactions_resident_count + 1)
        self._reserve_undo(1)
        self._set_posted(member_slot, posted)
        self._add_transaction(transaction_id, KIND_REDEEM, member_slot, <int32_t>merchant, points, 0)
        outcome.member = member_slot
        outcome.amount = points
        outcome.posted = posted
        outcome.available = posted - held
        outcome.kind = KIND_REDEEM
        return OK

    cdef int32_t _refund(self, int64_t transaction_id, int64_t merchant, int64_t points,
                         int64_t refund_transaction_id, Outcome* outcome) except -1:
        _check_positive(points)
        _check_merchant(merchant)
        self._check_new_transaction(refund_transaction_id)
        found = self.transaction_slots.get(transaction_id)
        if found is None:
            return UNKNOWN_TRANSACTION
        cdef int64_t transaction = found
        if self.transaction_merchant[transaction] != merchant:
            return WRONG_MERCHANT
        outcome.involved = self.transaction_member[transaction]
        cdef int32_t kind = self.transaction_kind[transaction]
        if kind != KIND_EARN and kind != KIND_CAPTURE and kind != KIND_REDEEM:
            return NOT_REFUNDABLE
        cdef int64_t refunded = self.transaction_refunded[transaction]
        if points > self.transaction_amount[transaction] - refunded:
            return REFUND_EXCEEDS_REMAINING
        cdef int64_t member = self.transaction_member[transaction]
        cdef int64_t posted = self.member_posted[member]
        cdef int64_t held = self.member_held[member]
        cdef int32_t refund_kind
        if kind == KIND_EARN:
            if points > posted - held:
                return INSUFFICIENT_POINTS
            refund_kind = KIND_REFUND_EARN
            posted -= points
        else:
            if points > balance_max - posted:
                return OVERFLOW
            refund_kind = KIND_REFUND_REDEMPTION
            posted += points
        if self.transactions_resident_count >= self.transactions_max:
            return CAPACITY
        self._check_member_after(member, posted, held)
        self._reserve_transactions(self.transactions_resident_count + 1)
        self._reserve_undo(2)
        self._set_refunded(transaction, refunded + points)
        self._set_posted(member, posted)
        self._add_transaction(refund_transaction_id, refund_kind, member, <int32_t>merchant, points,
                              0)
        outcome.kind = refund_kind
        outcome.member = member
        outcome.amount = points
        outcome.posted = posted
        outcome.available = posted - held
        return OK

    cdef int64_t _apply_batch(self, int64_t count, const int64_t[:] method, const int64_t[:] member,
                              const int64_t[:] merchant, const int64_t[:] points,
                              const int64_t[:] ref_id, const int64_t[:] new_id,
                              const int64_t[:] expires_at_us, int64_t now_us,
                              int64_t[:] out_status, int64_t[:] out_member, int64_t[:] out_amount,
                              int64_t[:] out_posted, int64_t[:] out_available,
                              int64_t[:] out_kind) except -1:
        # The per-operation kernels in order, as the def methods would call them; a caller bug
        # raises from the kernel and leaves the operations before it applied (the caller rolls back).
        cdef Outcome outcome
        cdef int32_t status
        cdef int64_t operation
        cdef int64_t code
        for operation in range(count):
            memset(&outcome, 0, sizeof(Outcome))
            outcome.involved = -1
            code = method[operation]
            if code == OP_EARN:
                # earn() of the member's id: the slot must be resident (ensure_member() creates).
                self._check_member_slot(member[operation])
                status = self._earn(None, member[operation], merchant[operation], points[operation],
                                    new_id[operation], &outcome)
            elif code == OP_AUTHORIZE:
                status = self._authorize(member[operation], merchant[operation], points[operation],
                                         new_id[operation], expires_at_us[operation], &outcome)
            elif code == OP_CAPTURE:
                status = self._capture(ref_id[operation], merchant[operation], points[operation],
                                       new_id[operation], now_us, &outcome)
            elif code == OP_VOID:
                status = self._void(ref_id[operation], merchant[operation], now_us, &outcome)
            elif code == OP_REDEEM:
                status = self._redeem(member[operation], merchant[operation], points[operation],
                                      new_id[operation], &outcome)
            elif code == OP_REFUND:
                status = self._refund(ref_id[operation], merchant[operation], points[operation],
                                      new_id[operation], &outcome)
            else:
                raise LedgerInvariantError(f"operation {operation}: method {code} passed the check")
            if status == OK and outcome.member != outcome.involved:
                raise LedgerInvariantError(f"operation {operation}: member {outcome.member} but "
                                           f"involved {outcome.involved}")
            if status == INSUFFICIENT_POINTS and outcome.involved >= 0:
                # the balances the refusal saw: the caller's message states them
                outcome.posted = self.member_posted[outcome.involved]
                outcome.available = outcome.posted - self.member_held[outcome.involved]
            out_status[operation] = status
            out_member[operation] = outcome.involved
            out_amount[operation] = outcome.amount
            out_posted[operation] = outcome.posted
            out_available[operation] = outcome.available
            out_kind[operation] = outcome.kind
        return count

    cdef int _apply_earn_redeem(self, int64_t count, const int64_t[:] method,
                                const int64_t[:] member, const int64_t[:] merchant,
                                const int64_t[:] points, const int64_t[:] purchase,
                                const int64_t[:] fee_bps, const int64_t[:] tier,
                                int64_t[:] tier_qualifying, int64_t[:] tier_reached,
                                const int64_t[:] tier_acquirer, const int64_t[:] tier_acquiring_bps,
                                int64_t[:] tier_lot_head, int64_t[:] tier_lot_tail,
                                int64_t[:] tier_lot_total, int64_t[:] lot_amount,
                                int64_t[:] lot_expires_at_us, int64_t[:] lot_next,
                                const int64_t[:] level_threshold,
                                const int64_t[:] level_multiplier_bps,
                                int64_t new_lot_expires_at_us, int64_t* next_transaction_id,
                                int64_t* lots_used, int64_t* pieces_used,
                                int64_t[:] out_status, int64_t[:] out_created,
                                int64_t[:] out_posted, int64_t[:] out_available,
                                int64_t[:] out_total, int64_t[:] out_fee,
                                int64_t[:] out_level_before, int64_t[:] out_level_after,
                                int64_t[:] out_reward, int64_t[:] out_reward_id, int64_t[:] out_lot,
                                int64_t[:] out_piece_start, int64_t[:] out_piece_end,
                                int64_t[:] out_due_at_us, int64_t[:] piece_lot,
                                int64_t[:] piece_amount) except -1:
        # The program's earn and redeem rules (processor/rules.py: level_for, earn_with_rules,
        # tier_bonuses, acquiring_reward, domain.fee_point_units; program.py: credit_lot, consume)
        # around the same kernels as apply_batch(), in order: an earn's qualifying points change the
        # level the next earn of the member sees, and its lot what a later redeem consumes.
        cdef Outcome outcome
        cdef int32_t status
        cdef int64_t operation, row, level, levels = level_threshold.shape[0]
        cdef int64_t created, base, total, qualifying, reached, reward, acquirer
        cdef int64_t lot, taken, left, spendable, lots_before, soonest_before
        cdef int64_t lots_capacity = lot_amount.shape[0]
        cdef int64_t pieces_capacity = piece_lot.shape[0]
        for operation in range(count):
            memset(&outcome, 0, sizeof(Outcome))
            outcome.involved = -1
            created = next_transaction_id[0]
            next_transaction_id[0] += 1
            out_created[operation] = created
            out_total[operation] = 0
            out_fee[operation] = 0
            out_level_before[operation] = 0
            out_level_after[operation] = 0
            out_reward[operation] = 0
            out_reward_id[operation] = 0
            out_lot[operation] = -1
            out_piece_start[operation] = pieces_used[0]
            out_piece_end[operation] = pieces_used[0]
            out_due_at_us[operation] = 0
            row = tier[operation]
            if method[operation] == OP_EARN:
                qualifying = tier_qualifying[row]
                level = _level_for(qualifying, level_threshold, levels)
                base = points[operation]
                # floor(base * multiplier / 10000): base + the uplift, in the operator's favour; the
                # caller keeps base <= EARN_POINTS_MAX so the product fits
                total = base * level_multiplier_bps[level] // 10000
                out_level_before[operation] = level
                out_level_after[operation] = level
                self._check_member_slot(member[operation])
                status = self._earn(None, member[operation], merchant[operation], total, created,
                                    &outcome)
                if status == OK:
                    out_total[operation] = total
                    out_fee[operation] = base * fee_bps[operation] // 10000
                    qualifying += base
                    tier_qualifying[row] = qualifying
                    out_level_after[operation] = _level_for(qualifying, level_threshold, levels)
                    reached = tier_reached[row]
                    for level in range(1, levels):  # every level reached counts once (its bonus)
                        if qualifying >= level_threshold[level]:
                            reached |= (<int64_t>1) << level
                    tier_reached[row] = reached
                    acquirer = tier_acquirer[row]
                    if acquirer >= 0 and acquirer != merchant[operation] and base > 0:
                        reward = purchase[operation] * tier_acquiring_bps[row] // 10000
                        if reward > 0:
                            out_reward[operation] = reward
                            out_reward_id[operation] = next_transaction_id[0]
                            next_transaction_id[0] += 1
                    if total > 0 and new_lot_expires_at_us > 0:
                        # the earn's lot expires after every lot of the member (the caller checked),
                        # so it goes last in the member's chain
                        lot = lots_used[0]
                        if lot >= lots_capacity:
                            raise LedgerInvariantError(f"operation {operation}: no room for its lot")
                        lots_used[0] += 1
                        lot_amount[lot] = total
                        lot_expires_at_us[lot] = new_lot_expires_at_us
                        lot_next[lot] = -1
                        if tier_lot_tail[row] >= 0:
                            lot_next[tier_lot_tail[row]] = lot
                        else:
                            tier_lot_head[row] = lot
                        tier_lot_tail[row] = lot
                        if tier_lot_total[row] >= 0:
                            tier_lot_total[row] += total
                        out_lot[operation] = lot
            else:
                spendable = -1
                if member[operation] >= 0:
                    self._check_member_slot(member[operation])
                    spendable = self.member_posted[member[operation]] - self.member_held[member[operation]]
                status = self._redeem(member[operation], merchant[operation], points[operation],
                                      created, &outcome)
                if status == OK:
                    out_fee[operation] = points[operation] * fee_bps[operation] // 10000
                    # the soonest-expiring points first, ties by lot id: the chain's order
                    left = points[operation]
                    lots_before = tier_lot_total[row]
                    lot = tier_lot_head[row]
                    soonest_before = lot_expires_at_us[lot] if lot >= 0 else 0
                    while left > 0 and lot >= 0:
                        taken = lot_amount[lot] if lot_amount[lot] < left else left
                        if pieces_used[0] >= pieces_capacity:
                            raise LedgerInvariantError(f"operation {operation}: no room for its pieces")
                        piece_lot[pieces_used[0]] = lot
                        piece_amount[pieces_used[0]] = taken
                        pieces_used[0] += 1
                        lot_amount[lot] -= taken
                        left -= taken
                        if lots_before >= 0:
                            tier_lot_total[row] -= taken
                        if lot_amount[lot] == 0:
                            lot = lot_next[lot]
                    tier_lot_head[row] = lot
                    if lot < 0:
                        tier_lot_tail[row] = -1
                    if left > 0:
                        # every lot taken: the rest is the member's never-expiring points, posted -
                        # held - its lots (which the caller passed whole when a redeem could get here)
                        if lots_before < 0 or left > spendable - lots_before:
                            raise LedgerInvariantError(f"operation {operation}: the member's lots do not "
                                                       "cover what its never-expiring points cannot")
                        if pieces_used[0] >= pieces_capacity:
                            raise LedgerInvariantError(f"operation {operation}: no room for its pieces")
                        piece_lot[pieces_used[0]] = -1
                        piece_amount[pieces_used[0]] = left
                        pieces_used[0] += 1
                    out_piece_end[operation] = pieces_used[0]
                    if (out_piece_start[operation] < out_piece_end[operation]
                            and piece_lot[out_piece_start[operation]] >= 0 and lot >= 0
                            and lot_expires_at_us[lot] != soonest_before):
                        # the member's soonest expiry moved: the expiry job needs an entry for it
                        out_due_at_us[operation] = lot_expires_at_us[lot]
                elif status == INSUFFICIENT_POINTS and outcome.involved >= 0:
                    outcome.posted = self.member_posted[outcome.involved]
                    outcome.available = outcome.posted - self.member_held[outcome.involved]
            out_status[operation] = status
            out_posted[operation] = outcome.posted
            out_available[operation] = outcome.available
        return 0

    cdef list _expire_holds(self, int64_t now_us, int64_t limit):
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        cdef list expired = []
        cdef int64_t count = 0
        cdef int64_t hold
        while count < limit and self.heap_count > 0 and self.heap_expires_at_us[0] <= now_us:
            self._reserve_undo(2)
            hold = self.heap_hold[0]
            self._heap_pop()
            if self.hold_status[hold] != HOLD_OPEN:
                continue
            self._release_hold(hold, HOLD_STATUS_EXPIRED)
            expired.append(self.hold_ids[hold])
            count += 1
        return expired

    # --- expiry heap: min on (expires_at_us, hold slot); entries of resolved holds are skipped when
    #     they reach the top instead of being searched for when the hold resolves ------------------

    cdef bint _heap_less(self, int64_t left, int64_t right) noexcept:
        if self.heap_expires_at_us[left] != self.heap_expires_at_us[right]:
            return self.heap_expires_at_us[left] < self.heap_expires_at_us[right]
        return self.heap_hold[left] < self.heap_hold[right]

    cdef void _heap_swap(self, int64_t left, int64_t right) noexcept:
        cdef int64_t expires_at_us = self.heap_expires_at_us[left]
        cdef int64_t hold = self.heap_hold[left]
        self.heap_expires_at_us[left] = self.heap_expires_at_us[right]
        self.heap_hold[left] = self.heap_hold[right]
        self.heap_expires_at_us[right] = expires_at_us
        self.heap_hold[right] = hold

    cdef int _heap_push(self, int64_t expires_at_us, int64_t hold) except -1:
        if self.heap_count >= self.holds_capacity:
            raise LedgerInvariantError(
                f"expiry heap full ({self.heap_count} entries) with {self.holds_resident_count} holds")
        cdef int64_t position = self.heap_count
        cdef int64_t parent
        self.heap_expires_at_us[position] = expires_at_us
        self.heap_hold[position] = hold
        self.heap_count += 1
        while position > 0:
            parent = (position - 1) // 2
            if not self._heap_less(position, parent):
                break
            self._heap_swap(position, parent)
            position = parent
        return 0

    cdef void _heap_pop(self) noexcept:
        self.heap_count -= 1
        if self.heap_count > 0:
            self.heap_expires_at_us[0] = self.heap_expires_at_us[self.heap_count]
            self.heap_hold[0] = self.heap_hold[self.heap_count]
            self._heap_sift_down(0)

    cdef void _heap_sift_down(self, int64_t position) noexcept:
        cdef int64_t child
        while True:
            child = 2 * position + 1
            if child >= self.heap_count:
                return
            if child + 1 < self.heap_count and self._heap_less(child + 1, child):
                child += 1
            if not self._heap_less(child, position):
                return
            self._heap_swap(position, child)
            position = child

    cdef void _heap_rebuild(self) noexcept:
        # After rollback() or forget_resolved() hold slots and statuses change wholesale; one O(n)
        # heapify is simpler and cheaper than replaying each change into the heap.
        cdef int64_t hold
        cdef int64_t position
        self.heap_count = 0
        for hold in range(self.holds_resident_count):
            if self.hold_status[hold] == HOLD_OPEN:
                self.heap_expires_at_us[self.heap_count] = self.hold_expires_at_us[hold]
                self.heap_hold[self.heap_count] = hold
                self.heap_count += 1
        for position in range(self.heap_count // 2 - 1, -1, -1):
            self._heap_sift_down(position)

    # --- the Python surface: convert arguments strictly (see _int64), call a kernel, build the
    #     tuple. members_count, holds_resident_count, holds_open_count and
    #     transactions_resident_count are `readonly` attributes declared in _core.pxd. -------------

    def load_member(self, str member_id not None, posted, account_id=0):
        return self._load_member(member_id, _int64(posted), _int64(account_id))

    def ensure_member(self, str member_id not None):
        return self._ensure_member(member_id)

    def load_hold(self, hold_id, member_slot, merchant, amount, expires_at_us, status):
        self._load_hold(_int64(hold_id), _int64(member_slot), _int64(merchant), _int64(amount),
                        _int64(expires_at_us), _int64(status))

    def load_transaction(self, transaction_id, kind, member_slot, merchant, amount, refunded):
        self._load_transaction(_int64(transaction_id), _int64(kind), _int64(member_slot),
                               _int64(merchant), _int64(amount), _int64(refunded))

    def member_slot(self, str member_id not None):
        return self.member_slots.get(member_id, -1)

    def member_id(self, member_slot):
        cdef int64_t member = _int64(member_slot)
        self._check_member_slot(member)
        return self.member_ids[member]

    def has_hold(self, hold_id):
        return _int64(hold_id) in self.hold_slots

    def has_transaction(self, transaction_id):
        return _int64(transaction_id) in self.transaction_slots

    def balance(self, member_slot):
        cdef int64_t member = _int64(member_slot)
        self._check_member_slot(member)
        return (self.member_posted[member], self.member_held[member])

    def member_account(self, member_slot):
        cdef int64_t member = _int64(member_slot)
        self._check_member_slot(member)
        return self.member_accounts[member]

    def set_member_account(self, member_slot, account_id):
        cdef int64_t member = _int64(member_slot)
        cdef int64_t account = _int64(account_id)
        if account < 1:
            raise ValueError(f"account_id must be >= 1, got {account}")
        self._check_member_slot(member)
        # Not recorded in the undo log (see _load_member).
        self.member_accounts[member] = account

    def hold(self, hold_id):
        cdef int64_t hold = self.hold_slots[_int64(hold_id)]
        return (self.hold_status[hold], self.hold_member[hold], self.hold_merchant[hold],
                self.hold_amount[hold], self.hold_expires_at_us[hold])

    def begin(self):
        self._reserve_batches(self.batches_open + 1)
        cdef BatchMark* mark = &self.batch_marks[self.batches_open]
        mark.undo_count = self.undo_count
        mark.members_count = self.members_count
        mark.holds_resident_count = self.holds_resident_count
        mark.holds_open_count = self.holds_open_count
        mark.transactions_resident_count = self.transactions_resident_count
        self.batches_open += 1

    def commit(self):
        if self.batches_open == 0:
            raise RuntimeError("commit() called without begin()")
        # The oldest batch's records lie below the next mark: dead now (all are, if none is left).
        self.batches_open -= 1
        memmove(self.batch_marks, self.batch_marks + 1, <size_t>self.batches_open * sizeof(BatchMark))
        if self.batches_open == 0:
            self.undo_count = 0
        self._compact_undo()

    def rollback(self):
        if self.batches_open == 0:
            raise RuntimeError("rollback() called without begin()")
        self._rollback_to(0)

    def rollback_newest(self):
        if self.batches_open == 0:
            raise RuntimeError("rollback_newest() called without begin()")
        self._rollback_to(self.batches_open - 1)

    def earn(self, str member_id not None, merchant, points, transaction_id):
        cdef Outcome outcome
        memset(&outcome, 0, sizeof(Outcome))
        cdef int32_t status = self._earn(member_id, self.member_slots.get(member_id, -1),
                                         _int64(merchant), _int64(points), _int64(transaction_id),
                                         &outcome)
        return (status, outcome.member, outcome.posted)

    def authorize(self, member_slot, merchant, points, hold_id, expires_at_us):
        cdef Outcome outcome
        memset(&outcome, 0, sizeof(Outcome))
        cdef int32_t status = self._authorize(_int64(member_slot), _int64(merchant), _int64(points),
                                              _int64(hold_id), _int64(expires_at_us), &outcome)
        return (status, outcome.available)

    def capture(self, hold_id, merchant, points, transaction_id, now_us):
        cdef Outcome outcome
        memset(&outcome, 0, sizeof(Outcome))
        cdef int32_t status = self._capture(_int64(hold_id), _int64(merchant), _int64(points),
                                            _int64(transaction_id), _int64(now_us), &outcome)
        return (status, outcome.amount, outcome.member, outcome.posted, outcome.available)

    def void(self, hold_id, merchant, now_us):
        cdef Outcome outcome
        memset(&outcome, 0, sizeof(Outcome))
        cdef int32_t status = self._void(_int64(hold_id), _int64(merchant), _int64(now_us), &outcome)
        return (status, outcome.amount, outcome.member, outcome.available)

    def redeem(self, member_slot, merchant, points, transaction_id):
        cdef Outcome outcome
        memset(&outcome, 0, sizeof(Outcome))
        cdef int32_t status = self._redeem(_int64(member_slot), _int64(merchant), _int64(points),
                                           _int64(transaction_id), &outcome)
        return (status, outcome.posted, outcome.available)

    def refund(self, transaction_id, merchant, points, refund_transaction_id):
        cdef Outcome outcome
        memset(&outcome, 0, sizeof(Outcome))
        cdef int32_t status = self._refund(_int64(transaction_id), _int64(merchant), _int64(points),
                                           _int64(refund_transaction_id), &outcome)
        return (status, outcome.kind, outcome.member, outcome.posted, outcome.available)

    def expire_holds(self, now_us, limit):
        return self._expire_holds(_int64(now_us), _int64(limit))

    def apply_batch(self, const int64_t[:] method not None, const int64_t[:] member not None,
                    const int64_t[:] merchant not None, const int64_t[:] points not None,
                    const int64_t[:] ref_id not None, const int64_t[:] new_id not None,
                    const int64_t[:] expires_at_us not None, now_us,
                    int64_t[:] out_status not None, int64_t[:] out_member not None,
                    int64_t[:] out_amount not None, int64_t[:] out_posted not None,
                    int64_t[:] out_available not None, int64_t[:] out_kind not None):
        cdef int64_t now = _int64(now_us)
        cdef int64_t count = method.shape[0]
        cdef int64_t operation
        _check_column("member", member.shape[0], count, True)
        _check_column("merchant", merchant.shape[0], count, True)
        _check_column("points", points.shape[0], count, True)
        _check_column("ref_id", ref_id.shape[0], count, True)
        _check_column("new_id", new_id.shape[0], count, True)
        _check_column("expires_at_us", expires_at_us.shape[0], count, True)
        _check_column("out_status", out_status.shape[0], count, False)
        _check_column("out_member", out_member.shape[0], count, False)
        _check_column("out_amount", out_amount.shape[0], count, False)
        _check_column("out_posted", out_posted.shape[0], count, False)
        _check_column("out_available", out_available.shape[0], count, False)
        _check_column("out_kind", out_kind.shape[0], count, False)
        # Checked before the first operation, so a batch with an unknown code changes nothing.
        for operation in range(count):
            if method[operation] < OP_EARN or method[operation] > OP_REFUND:
                raise ValueError(f"operation {operation}: method {method[operation]} is not an OP_* code")
        return self._apply_batch(count, method, member, merchant, points, ref_id, new_id,
                                 expires_at_us, now, out_status, out_member, out_amount, out_posted,
                                 out_available, out_kind)

    def apply_earn_redeem(self, const int64_t[:] method not None, const int64_t[:] member not None,
                          const int64_t[:] merchant not None, const int64_t[:] points not None,
                          const int64_t[:] purchase not None, const int64_t[:] fee_bps not None,
                          const int64_t[:] tier not None, int64_t[:] tier_qualifying not None,
                          int64_t[:] tier_reached not None, const int64_t[:] tier_acquirer not None,
                          const int64_t[:] tier_acquiring_bps not None,
                          int64_t[:] tier_lot_head not None, int64_t[:] tier_lot_tail not None,
                          int64_t[:] tier_lot_total not None, int64_t[:] lot_amount not None,
                          int64_t[:] lot_expires_at_us not None, int64_t[:] lot_next not None,
                          lots_used, const int64_t[:] level_threshold not None,
                          const int64_t[:] level_multiplier_bps not None, new_lot_expires_at_us,
                          next_transaction_id,
                          int64_t[:] out_status not None, int64_t[:] out_created not None,
                          int64_t[:] out_posted not None, int64_t[:] out_available not None,
                          int64_t[:] out_total not None, int64_t[:] out_fee not None,
                          int64_t[:] out_level_before not None, int64_t[:] out_level_after not None,
                          int64_t[:] out_reward not None, int64_t[:] out_reward_id not None,
                          int64_t[:] out_lot not None, int64_t[:] out_piece_start not None,
                          int64_t[:] out_piece_end not None, int64_t[:] out_due_at_us not None,
                          int64_t[:] piece_lot not None, int64_t[:] piece_amount not None):
        cdef int64_t next_id = _int64(next_transaction_id)
        cdef int64_t lots = _int64(lots_used)
        cdef int64_t pieces = 0
        cdef int64_t new_lot_expires = _int64(new_lot_expires_at_us)
        cdef int64_t count = method.shape[0]
        cdef int64_t tiers = tier_qualifying.shape[0]
        cdef int64_t levels = level_threshold.shape[0]
        cdef int64_t pool = lot_amount.shape[0]
        cdef int64_t operation, level, row, lot
        for name, length in (("member", member.shape[0]), ("merchant", merchant.shape[0]),
                             ("points", points.shape[0]), ("purchase", purchase.shape[0]),
                             ("fee_bps", fee_bps.shape[0]), ("tier", tier.shape[0])):
            _check_column(name, length, count, True)
        for name, length in (("out_status", out_status.shape[0]), ("out_created", out_created.shape[0]),
                             ("out_posted", out_posted.shape[0]),
                             ("out_available", out_available.shape[0]),
                             ("out_total", out_total.shape[0]), ("out_fee", out_fee.shape[0]),
                             ("out_level_before", out_level_before.shape[0]),
                             ("out_level_after", out_level_after.shape[0]),
                             ("out_reward", out_reward.shape[0]),
                             ("out_reward_id", out_reward_id.shape[0]), ("out_lot", out_lot.shape[0]),
                             ("out_piece_start", out_piece_start.shape[0]),
                             ("out_piece_end", out_piece_end.shape[0]),
                             ("out_due_at_us", out_due_at_us.shape[0])):
            _check_column(name, length, count, False)
        for length in (tier_reached.shape[0], tier_acquirer.shape[0], tier_acquiring_bps.shape[0],
                       tier_lot_head.shape[0], tier_lot_tail.shape[0], tier_lot_total.shape[0]):
            if length != tiers:
                raise ValueError("the tier_* columns must have one item per tier row")
        if lot_expires_at_us.shape[0] != pool or lot_next.shape[0] != pool:
            raise ValueError("lot_amount, lot_expires_at_us and lot_next must have one item per lot")
        if piece_amount.shape[0] != piece_lot.shape[0]:
            raise ValueError("piece_lot and piece_amount must have the same length")
        if lots < 0 or lots > pool or new_lot_expires < 0:
            raise ValueError(f"lots_used must be 0..{pool} and new_lot_expires_at_us >= 0")
        for row in range(tiers):
            if (tier_lot_head[row] < -1 or tier_lot_head[row] >= lots or tier_lot_tail[row] < -1
                    or tier_lot_tail[row] >= lots or (tier_lot_head[row] < 0) != (tier_lot_tail[row] < 0)):
                raise ValueError(f"tier row {row}: lot head and tail must both be -1 or lots in use")
        for lot in range(lots):
            if lot_amount[lot] <= 0 or lot_next[lot] < -1 or lot_next[lot] >= lots or lot_next[lot] == lot:
                raise ValueError(f"lot {lot}: amount must be > 0 and next -1 or another lot in use")
        if levels < 1 or levels > LEVELS_MAX or level_multiplier_bps.shape[0] != levels:
            raise ValueError(f"level_threshold and level_multiplier_bps must have the same 1..{LEVELS_MAX} "
                             "items")
        for level in range(levels):
            if (level_threshold[level] < 0 or level_multiplier_bps[level] < 10000
                    or level_multiplier_bps[level] > MULTIPLIER_BPS_MAX):
                raise ValueError(f"level {level}: threshold must be >= 0 and multiplier_bps "
                                 f"10000..{MULTIPLIER_BPS_MAX}")
        # Checked before the first operation, so a call with a bad row changes nothing.
        for operation in range(count):
            if method[operation] != OP_EARN and method[operation] != OP_REDEEM:
                raise ValueError(f"operation {operation}: method {method[operation]} is not OP_EARN "
                                 "or OP_REDEEM")
            if tier[operation] < 0 or tier[operation] >= tiers:
                raise IndexError(f"operation {operation}: tier row {tier[operation]} of {tiers}")
            if points[operation] < 0 or points[operation] > EARN_POINTS_MAX:
                raise ValueError(f"operation {operation}: points must be 0..{EARN_POINTS_MAX}")
            if purchase[operation] < 0 or purchase[operation] > PURCHASE_MAX:
                raise ValueError(f"operation {operation}: purchase must be 0..{PURCHASE_MAX}")
            if fee_bps[operation] < 0 or fee_bps[operation] > 10000:
                raise ValueError(f"operation {operation}: fee_bps must be 0..10000")
            if (tier_acquiring_bps[tier[operation]] < 0
                    or tier_acquiring_bps[tier[operation]] > 10000):
                raise ValueError(f"tier row {tier[operation]}: acquiring_bps must be 0..10000")
        self._apply_earn_redeem(count, method, member, merchant, points, purchase, fee_bps, tier,
                                tier_qualifying, tier_reached, tier_acquirer, tier_acquiring_bps,
                                tier_lot_head, tier_lot_tail, tier_lot_total, lot_amount,
                                lot_expires_at_us, lot_next, level_threshold, level_multiplier_bps,
                                new_lot_expires, &next_id, &lots, &pieces, out_status, out_created,
                                out_posted, out_available, out_total, out_fee, out_level_before,
                                out_level_after, out_reward, out_reward_id, out_lot,
                                out_piece_start, out_piece_end, out_due_at_us, piece_lot,
                                piece_amount)
        return (next_id, lots, pieces)

    @staticmethod
    def unbalanced_entries(list entries not None, str points_asset not None):
        # Every entry of every batch passes here. A transaction's entries are nearly always adjacent,
        # so they are summed in C a run at a time; only a run that does not sum to zero (a transaction
        # whose entries are apart), an entry naming its asset or a sum past int64 goes into a dict.
        cdef Py_ssize_t index, count = len(entries)
        cdef int64_t run_id = 0, run_sum = 0, transaction_id, amount, summed
        cdef bint running = False
        cdef tuple entry
        cdef dict points = {}  # transaction id -> its points entries' sum, of the runs not summing to 0
        cdef dict other = {}  # (transaction id, asset) -> sum, of entries naming their asset
        for index in range(count):
            entry = <tuple?>entries[index]
            if not entry[1] > 0:
                return f"transaction {entry[0]} posts to an account without an id"
            if len(entry) != 3:
                key = (entry[0], entry[3])
                other[key] = other.get(key, 0) + entry[2]
                continue
            transaction_id = entry[0]
            amount = entry[2]
            if running and transaction_id == run_id and not __builtin_add_overflow(run_sum, amount, &summed):
                run_sum = summed
                continue
            if running and run_sum != 0:
                points[run_id] = points.get(run_id, 0) + run_sum
            running, run_id, run_sum = True, transaction_id, amount
        if running and run_sum != 0:
            points[run_id] = points.get(run_id, 0) + run_sum
        for key, total in other.items():  # named points count with the others
            if key[1] == points_asset:
                points[key[0]] = points.get(key[0], 0) + total
        for key, total in points.items():
            if total:
                return f"transaction {key} entries of {points_asset} sum to {total}"
        for key, total in other.items():
            if key[1] != points_asset and total:
                return f"transaction {key[0]} entries of {key[1]} sum to {total}"
        return None

    @staticmethod
    def int64_column(values):
        # The state machine's columns (an item an operation, a lot, a member) as arrays for the kernels:
        # array.array("q", values) stores each item through PyArg_Parse (~200 instructions an item,
        # ~16 items an operation with the program: callgrind); here each is converted in C.
        cdef list items = values if type(values) is list else list(values)
        cdef Py_ssize_t count = len(items)
        cdef Py_ssize_t index
        cdef c_array.array column = c_array.clone(_INT64_EMPTY, count, False)
        cdef long long* data = column.data.as_longlongs
        for index in range(count):
            data[index] = _int64(items[index])
        return column

    @staticmethod
    def idempotency_records(list batch not None, list outcomes not None, dict stored not None,
                            frozenset not_recorded not None, object ok, object dumps, list records not None,
                            object dumps_option=None, object dumps_option_fallback=None):
        # One record an operation of every batch, so the loop is here rather than in Python (the JSON is
        # dumps', orjson: a flat encoder written here cost more instructions than orjson's, callgrind).
        # With dumps_option, dumps is orjson.dumps called here with its option and its bytes decoded here:
        # store.to_json's Python call, its look-ups and its decode() were ~3k instructions an operation
        # of the state machine's apply (two records' JSON), callgrind. With dumps None (the state
        # machine's) the request and fields are recorded as they are, and their JSON is one orjson call
        # a batch (processor/idempotency_records.encode): two calls, two bytes and two str an operation
        # were ~7.9k of the apply's ~36.5k instructions an operation with the program, callgrind.
        _records_with_option(batch, outcomes, stored, not_recorded, ok, dumps, records, dumps_option,
                             dumps_option_fallback)

    def first_pass_plain(self, tuple context not None, list batch not None, Py_ssize_t position,
                         next_transaction_id):
        # The batch loop's common operation with no program (an earn or redeem of a known member at an
        # active merchant) into the kernel's columns here, a run of them a call, rather than by the
        # loop's few dozen bytecodes and C calls an operation; the first one it does not take is the
        # loop's (contract: _core.pyi).
        cdef dict merchants, stored
        cdef set routed
        cdef list applied, codes, members, merchant_slots, points, references, createds, expirations
        (merchants, routed, stored, earn, redeem, applied, codes, members, merchant_slots, points, references,
         createds, expirations) = context
        cdef Py_ssize_t count = len(batch)
        cdef int64_t slot
        cdef bint is_earn
        zero = 0
        while position < count:
            op = batch[position]
            merchant = _first_pass_merchant(op, merchants, routed, stored, earn, redeem)
            if merchant is None:
                break
            found = self.member_slots.get(slot_read(&_operation_reader, op, _OP_MEMBER_ID, _OPERATION_READ))
            if found is None:
                break
            slot = found
            is_earn = slot_read(&_operation_reader, op, _OP_METHOD, _OPERATION_READ) is earn
            if is_earn and self.member_accounts[slot] == 0:
                break
            applied.append(position)
            codes.append(OP_EARN if is_earn else OP_REDEEM)
            members.append(found)
            merchant_slots.append(slot_read(&_pass_reader, op, _PASS_MERCHANT_SLOT, _PASS_READ))
            points.append(slot_read(&_operation_reader, op, _OP_POINTS, _OPERATION_READ))
            references.append(zero)
            createds.append(next_transaction_id)
            expirations.append(zero)
            next_transaction_id = next_transaction_id + 1
            position += 1
        return position, next_transaction_id

    def first_pass_run(self, tuple context not None, list batch not None, Py_ssize_t position):
        # The batch loop's common operation under a program the rules kernel implements (a plain earn or
        # redeem within its bounds, of a known member the run can take) into the run here, a stretch of
        # them a call; the first one it does not take is the loop's (contract: _core.pyi).
        cdef dict merchants, tier_rows, stored
        cdef set routed
        cdef list positions, ops, slots, rows, fee_bps, tier_demand
        (merchants, routed, stored, earn, redeem, give_back_min, give_back_max, points_max, purchase_max,
         positions, ops, slots, rows, fee_bps, tier_rows, tier_demand, kernel_member, run, tables, now_us) = context
        cdef Py_ssize_t count = len(batch)
        cdef int64_t slot, number
        cdef Py_ssize_t row
        cdef bint is_earn
        # the bounds as C integers (each an int64: the version's give-back bounds are bps, the others
        # the kernel's constants)
        cdef int64_t give_back_low = give_back_min, give_back_high = give_back_max
        cdef int64_t points_high = points_max, purchase_high = purchase_max
        while position < count:
            op = batch[position]
            merchant = _first_pass_merchant(op, merchants, routed, stored, earn, redeem)
            if merchant is None:
                break
            is_earn = slot_read(&_operation_reader, op, _OP_METHOD, _OPERATION_READ) is earn
            if is_earn and not _int_within(
                    slot_read(&_merchant_pass_reader, merchant, _MERCHANT_PASS_GIVE_BACK_BPS, _MERCHANT_PASS_READ),
                    give_back_low, give_back_high, &number):
                break
            points = slot_read(&_operation_reader, op, _OP_POINTS, _OPERATION_READ)
            if (not _int_within(points, 0, points_high, &number)
                    or not _int_within(slot_read(&_operation_reader, op, _OP_PURCHASE_AMOUNT, _OPERATION_READ),
                                       0, purchase_high, &number)):
                break
            member_id = slot_read(&_operation_reader, op, _OP_MEMBER_ID, _OPERATION_READ)
            row_object = tier_rows.get(member_id)
            if row_object is None or row_object < 0:
                row_object = kernel_member(run, tables, op, now_us)
                if row_object < 0:
                    break
            row = row_object
            found = self.member_slots.get(member_id)
            if found is None:
                break
            slot = found
            if is_earn and self.member_accounts[slot] == 0:
                break
            positions.append(position)
            ops.append(op)
            slots.append(found)
            rows.append(row_object)
            if is_earn:
                fee_bps.append(slot_read(&_merchant_pass_reader, merchant, _MERCHANT_FEE_ISSUED, _MERCHANT_PASS_READ))
            else:
                fee_bps.append(slot_read(&_merchant_pass_reader, merchant, _MERCHANT_FEE_REDEEMED, _MERCHANT_PASS_READ))
                tier_demand[row] = tier_demand[row] + points
            position += 1
        return position

    def plain_rows(self, list batch not None, list applied not None, Py_ssize_t index,
                   const int64_t[:] created not None, const int64_t[:] status not None,
                   const int64_t[:] member not None, const int64_t[:] posted not None,
                   const int64_t[:] available not None, dict merchants not None, tuple numbers not None,
                   tuple classes not None, list transactions not None, list entries not None,
                   list outcomes not None):
        # The journal rows and outcome of each plain earn or redeem apply_batch() decided OK, built here
        # rather than by the state machine's _applied, a Python call an operation (its fee, its rows, a
        # dict and an Outcome); the first row it does not build is the caller's (contract: _core.pyi).
        cdef Py_ssize_t count = len(applied)
        cdef int64_t slot, points, bps, fee
        cdef bint is_earn
        now_us, fee_revenue, earn, redeem = numbers
        outcome_type, ok_code = classes
        if (created.shape[0] < count or status.shape[0] < count or member.shape[0] < count
                or posted.shape[0] < count or available.shape[0] < count):
            raise ValueError("created, status, member, posted and available need an item per applied operation")
        while index < count:
            if status[index] != OK:
                break
            op = batch[<Py_ssize_t>applied[index]]
            method = slot_read(&_operation_reader, op, _OP_METHOD, _OPERATION_READ)
            if method is earn:
                is_earn = True
            elif method is redeem:
                is_earn = False
            else:
                break
            merchant_id = slot_read(&_operation_reader, op, _OP_MERCHANT_ID, _OPERATION_READ)
            merchant = merchants.get(merchant_id)
            if merchant is None:
                break
            points_object = slot_read(&_operation_reader, op, _OP_POINTS, _OPERATION_READ)
            bps_object = slot_read(&_merchant_pass_reader, merchant,
                                   _MERCHANT_FEE_ISSUED if is_earn else _MERCHANT_FEE_REDEEMED, _MERCHANT_PASS_READ)
            # domain.fee_point_units: floor(points * bps / 10000), points >= 0 and 0 <= bps <= 10000 (else
            # the caller's path raises); points * bps within int64
            if (not _int_within(points_object, 0, _FEE_POINTS_MAX, &points)
                    or not _int_within(bps_object, 0, 10000, &bps)):
                break
            slot = member[index]
            self._check_member_slot(slot)
            fee = points * bps // 10000
            created_object = created[index]
            fee_object = fee
            if fee:
                _fee_rows(entries, created_object, merchant, fee_revenue, fee, fee_object)
            member_id = slot_read(&_operation_reader, op, _OP_MEMBER_ID, _OPERATION_READ)
            key = slot_read(&_operation_reader, op, _OP_IDEMPOTENCY_KEY, _OPERATION_READ)
            if is_earn:
                _append_row(transactions, (created_object, KIND_EARN, merchant_id, member_id, points_object,
                                           slot_read(&_operation_reader, op, _OP_PURCHASE_AMOUNT, _OPERATION_READ),
                                           None, None, key, fee_object))
                if points:
                    _append_row(entries, (created_object, self.member_accounts[slot], points_object))
                    _append_row(entries, (created_object,
                                          slot_read(&_merchant_reader, merchant, _MERCHANT_ISSUED, _MERCHANT_READ),
                                          -points))
                outcomes[<Py_ssize_t>applied[index]] = _outcome(outcome_type, ok_code, {
                    "transaction_id": created_object,
                    "points": points_object,
                    "balance": posted[index],
                    "give_back_bps": slot_read(&_merchant_reader, merchant, _MERCHANT_GIVE_BACK_BPS, _MERCHANT_READ),
                    "created_at_us": now_us,
                })
            else:
                outcomes[<Py_ssize_t>applied[index]] = _redeem_rows(
                    transactions, entries, created_object, merchant_id, member_id, points_object, points, key,
                    fee_object, self.member_accounts[slot], merchant, outcome_type, ok_code, posted[index],
                    available[index])
            index += 1
        return index

    def earn_redeem_rows(self, list ops not None, list positions not None,
                         const int64_t[:] method not None, const int64_t[:] member not None,
                         const int64_t[:] tier not None, out not None,
                         const int64_t[:] piece_lot not None, const int64_t[:] piece_amount not None,
                         list pool_lots not None, dict merchants not None,
                         list tier_acquirer_ids not None, tuple level_names not None,
                         tuple numbers not None, tuple classes not None,
                         list transactions not None, list entries not None, list outcomes not None,
                         int64_t[:] earned_level not None, set taken_rows not None,
                         dict new_lots_by_row not None, list earn_records not None,
                         list tier_events not None, list consumed not None, dict spent not None):
        # The Python objects of a run, built here rather than by the caller's loop: per operation a
        # transaction row, 2-5 entry rows, an outcome, an earn record with its lot or a redemption's
        # pieces; the records (fastpath/records.pyx) built with no __init__, their fields set in C.
        cdef int64_t count = method.shape[0]
        cdef int64_t index, code, slot, row, status, created, total, fee, level_before, level_after
        cdef int64_t reward, reward_id, new_lot, start, end, k, source, taken, uplift, points
        cdef const int64_t[:] out_status, out_created, out_posted, out_available, out_total, out_fee
        cdef const int64_t[:] out_level_before, out_level_after, out_reward, out_reward_id, out_lot
        cdef const int64_t[:] out_piece_start, out_piece_end
        cdef list made, pieces
        cdef object op, merchant, merchant_id, member_id, key, acquirer_id, base, source_lot, fee_object
        cdef object created_object, old
        cdef Lot lot
        if (len(ops) != count or len(positions) != count or member.shape[0] != count
                or tier.shape[0] != count):
            raise ValueError("ops, positions, method, member and tier must have one item per operation")
        if len(out) < 13:
            raise ValueError("out must hold apply_earn_redeem()'s 13 output columns (out_status ..)")
        for column in out[:13]:
            _check_column("out", len(column), count, False)
        out_status = out[0]
        out_created = out[1]
        out_posted = out[2]
        out_available = out[3]
        out_total = out[4]
        out_fee = out[5]
        out_level_before = out[6]
        out_level_after = out[7]
        out_reward = out[8]
        out_reward_id = out[9]
        out_lot = out[10]
        out_piece_start = out[11]
        out_piece_end = out[12]
        if piece_amount.shape[0] != piece_lot.shape[0]:
            raise ValueError("piece_lot and piece_amount must have the same length")
        (version_number, now_us, new_lot_expires_at_us, fee_revenue, tier_rewards, acquiring,
         kind_acquiring_reward, owner_transaction, permanent_lot_id) = numbers
        outcome_type, ok_code, lot_type, earn_type, record_type = classes
        if lot_type is not Lot or earn_type is not Earn or record_type is not EarnRecord:
            raise TypeError("classes: the compiled rows build fastpath.records' Lot, Earn and EarnRecord "
                            f"only, not {lot_type!r}, {earn_type!r}, {record_type!r}")
        no_grants = ()
        failed = []
        for index in range(count):
            status = out_status[index]
            if status != OK:
                failed.append(index)
                continue
            row = tier[index]
            if row < 0 or row >= earned_level.shape[0]:
                raise IndexError(f"operation {index}: tier row {row} of {earned_level.shape[0]}")
            slot = member[index]
            self._check_member_slot(slot)
            op = ops[index]
            code = method[index]
            created = out_created[index]
            created_object = created
            fee = out_fee[index]
            fee_object = fee
            merchant_id = slot_read(&_operation_reader, op, _OP_MERCHANT_ID, _OPERATION_READ)
            member_id = slot_read(&_operation_reader, op, _OP_MEMBER_ID, _OPERATION_READ)
            key = slot_read(&_operation_reader, op, _OP_IDEMPOTENCY_KEY, _OPERATION_READ)
            merchant = merchants[merchant_id]
            if fee:
                _fee_rows(entries, created_object, merchant, fee_revenue, fee, fee_object)
            if code == OP_EARN:
                base = slot_read(&_operation_reader, op, _OP_POINTS, _OPERATION_READ)
                total = out_total[index]
                uplift = total - <int64_t>base
                _append_row(transactions, (created_object, KIND_EARN, merchant_id, member_id, total,
                                           slot_read(&_operation_reader, op, _OP_PURCHASE_AMOUNT, _OPERATION_READ),
                                           None, None, key, fee_object, version_number))
                if total:
                    _append_row(entries, (created_object, self.member_accounts[slot], total))
                if base:
                    _append_row(entries, (created_object,
                                          slot_read(&_merchant_reader, merchant, _MERCHANT_ISSUED, _MERCHANT_READ),
                                          -base))
                if uplift:
                    _append_row(entries, (created_object, tier_rewards, -uplift))
                level_before = out_level_before[index]
                level_after = out_level_after[index]
                earned_level[row] = level_after
                new_lot = out_lot[index]
                if new_lot >= 0:  # the earn's lot (the kernel made one only for total > 0)
                    pool_lots[new_lot] = make_lot(created_object, total, new_lot_expires_at_us, merchant_id)
                    made = new_lots_by_row.get(row)
                    if made is None:
                        new_lots_by_row[row] = [new_lot]
                    else:
                        made.append(new_lot)
                reward = out_reward[index]
                acquirer_id = tier_acquirer_ids[row] if reward else None
                record = make_earn_record(member_id, merchant_id, version_number,
                                         make_earn(base, uplift, no_grants), acquirer_id, reward, 0, now_us)
                earn_records.append((created_object, record))
                if level_before != level_after:
                    tier_events.append((created_object, member_id, level_names[level_before],
                                        level_names[level_after]))
                if acquirer_id is not None:
                    reward_id = out_reward_id[index]
                    _append_row(transactions, (reward_id, kind_acquiring_reward, acquirer_id, member_id, reward,
                                               None, None, created_object, f"acquiring:{created}", 0,
                                               version_number))
                    _append_row(entries, (reward_id, acquiring, -reward))
                    _append_row(entries, (reward_id, slot_read(&_merchant_reader, merchants[acquirer_id],
                                                               _MERCHANT_ACQUIRING, _MERCHANT_READ), reward))
                outcomes[positions[index]] = _outcome(outcome_type, ok_code, {
                    "transaction_id": created_object,
                    "points": base,
                    "balance": out_posted[index],
                    "give_back_bps": slot_read(&_merchant_reader, merchant, _MERCHANT_GIVE_BACK_BPS, _MERCHANT_READ),
                    "created_at_us": now_us,
                    "bonus_points": uplift,
                    "level": level_names[level_after],
                })
                continue
            points_object = slot_read(&_operation_reader, op, _OP_POINTS, _OPERATION_READ)
            points = points_object
            outcomes[positions[index]] = _redeem_rows(
                transactions, entries, created_object, merchant_id, member_id, points_object, points, key, fee_object,
                self.member_accounts[slot], merchant, outcome_type, ok_code, out_posted[index], out_available[index])
            pieces = []
            start = out_piece_start[index]
            end = out_piece_end[index]
            if end > start:
                if start < 0 or end > piece_lot.shape[0]:
                    raise IndexError(f"operation {index}: pieces {start}..{end} of {piece_lot.shape[0]}")
                taken_rows.add(row)
                for k in range(start, end):
                    taken = piece_amount[k]
                    source = piece_lot[k]
                    if source < 0:  # never-expiring points
                        pieces.append(make_lot(permanent_lot_id, taken, None, ""))
                        continue
                    source_lot = pool_lots[source]
                    if source_lot is None:
                        raise LedgerInvariantError(
                            f"operation {index} of the run took from lot {source}, which no earn made")
                    lot = <Lot?>source_lot  # records.Lot (rules.Lot): its fields read in C, not by getattr
                    if taken == lot.amount:
                        pieces.append(lot)
                    else:
                        pieces.append(make_lot(lot.lot_id, taken, lot.expires_at_us, lot.issuer_id))
            consumed.append(((owner_transaction, created_object), tuple(pieces)))
            if points > 0:
                old = spent.get(member_id)
                spent[member_id] = points_object if old is None else old + points_object
        return failed

    def forget_resolved(self):
        if self.batches_open > 0:
            raise RuntimeError("forget_resolved() called between begin() and commit()")
        cdef int64_t hold
        cdef int64_t kept = 0
        for hold in range(self.holds_resident_count):
            if self.hold_status[hold] != HOLD_OPEN:
                del self.hold_slots[self.hold_ids[hold]]
                continue
            if kept != hold:
                self.hold_ids[kept] = self.hold_ids[hold]
                self.hold_member[kept] = self.hold_member[hold]
                self.hold_merchant[kept] = self.hold_merchant[hold]
                self.hold_amount[kept] = self.hold_amount[hold]
                self.hold_expires_at_us[kept] = self.hold_expires_at_us[hold]
                self.hold_status[kept] = self.hold_status[hold]
                self.hold_slots[self.hold_ids[kept]] = kept
            kept += 1
        self.holds_resident_count = kept
        self._heap_rebuild()
        self.transaction_slots.clear()
        self.transactions_resident_count = 0

    def check_invariants(self):
        cdef int64_t member
        cdef int64_t hold
        cdef int64_t transaction
        cdef int64_t position
        cdef int64_t posted
        cdef int64_t held
        cdef int64_t open_count = 0
        cdef int64_t* held_sums = NULL
        cdef char* in_heap = NULL
        if (len(self.member_slots) != self.members_count or len(self.member_ids) != self.members_count
                or len(self.hold_slots) != self.holds_resident_count
                or len(self.transaction_slots) != self.transactions_resident_count):
            raise LedgerInvariantError(
                f"indexes disagree with counts: {len(self.member_slots)} member ids, "
                f"{len(self.member_ids)} member slots, {self.members_count} members; "
                f"{len(self.hold_slots)} hold ids, {self.holds_resident_count} holds; "
                f"{len(self.transaction_slots)} transaction ids, "
                f"{self.transactions_resident_count} transactions")
        for member in range(self.members_count):
            posted = self.member_posted[member]
            held = self.member_held[member]
            if (posted < 0 or posted > balance_max or held < 0 or held > posted
                    or self.member_accounts[member] < 0):
                raise LedgerInvariantError(
                    f"member {self.member_ids[member]!r} (slot {member}): posted {posted}, held "
                    f"{held}, account {self.member_accounts[member]}")
        if self.batches_open > 0 and (self.batch_marks[0].undo_count < 0
                                      or self.batch_marks[self.batches_open - 1].undo_count
                                      > self.undo_count):
            raise LedgerInvariantError(f"batch marks outside the undo log of {self.undo_count} records")
        if self.batches_open == 0 and self.undo_count != 0:
            raise LedgerInvariantError(f"{self.undo_count} undo records with no batch open")
        held_sums = <int64_t*>calloc(self.members_count + 1, sizeof(int64_t))
        in_heap = <char*>calloc(self.holds_resident_count + 1, sizeof(char))
        if held_sums == NULL or in_heap == NULL:
            free(held_sums)
            free(in_heap)
            raise MemoryError("cannot allocate the scratch arrays of check_invariants")
        try:
            for hold in range(self.holds_resident_count):
                member = self.hold_member[hold]
                if (member < 0 or member >= self.members_count or self.hold_amount[hold] <= 0
                        or self.hold_amount[hold] > balance_max
                        or self.hold_status[hold] < HOLD_OPEN
                        or self.hold_status[hold] > HOLD_STATUS_EXPIRED
                        or self.hold_slots.get(self.hold_ids[hold]) != hold):
                    raise LedgerInvariantError(
                        f"hold {self.hold_ids[hold]} (slot {hold}): member slot {member}, amount "
                        f"{self.hold_amount[hold]}, status {self.hold_status[hold]}")
                if self.hold_status[hold] == HOLD_OPEN:
                    open_count += 1
                    held_sums[member] += self.hold_amount[hold]
                    if held_sums[member] > balance_max:
                        raise LedgerInvariantError(
                            f"open holds of member slot {member} sum beyond {balance_max}")
            if open_count != self.holds_open_count:
                raise LedgerInvariantError(
                    f"{open_count} open holds, but holds_open_count is {self.holds_open_count}")
            for member in range(self.members_count):
                if held_sums[member] != self.member_held[member]:
                    raise LedgerInvariantError(
                        f"member {self.member_ids[member]!r} (slot {member}): held "
                        f"{self.member_held[member]} but its open holds sum to {held_sums[member]}")
            for position in range(self.heap_count):
                hold = self.heap_hold[position]
                if (hold < 0 or hold >= self.holds_resident_count or in_heap[hold]
                        or self.heap_expires_at_us[position] != self.hold_expires_at_us[hold]
                        or (position > 0 and self._heap_less(position, (position - 1) // 2))):
                    raise LedgerInvariantError(f"expiry heap entry {position} (hold slot {hold}) is "
                                               "out of order, stale or repeated")
                in_heap[hold] = 1
            for hold in range(self.holds_resident_count):
                if self.hold_status[hold] == HOLD_OPEN and not in_heap[hold]:
                    raise LedgerInvariantError(
                        f"open hold {self.hold_ids[hold]} is missing from the expiry heap")
            for transaction in range(self.transactions_resident_count):
                if (self.transaction_kind[transaction] < KIND_EARN
                        or self.transaction_kind[transaction] > KIND_REFUND_EARN
                        or self.transaction_refunded[transaction] < 0
                        or self.transaction_refunded[transaction] > self.transaction_amount[transaction]
                        or self.transaction_member[transaction] < 0
                        or self.transaction_member[transaction] >= self.members_count
                        or self.transaction_slots.get(self.transaction_ids[transaction]) != transaction):
                    raise LedgerInvariantError(
                        f"transaction {self.transaction_ids[transaction]} (slot {transaction}): kind "
                        f"{self.transaction_kind[transaction]}, amount "
                        f"{self.transaction_amount[transaction]}, refunded "
                        f"{self.transaction_refunded[transaction]}")
        finally:
            free(held_sums)
            free(in_heap)
