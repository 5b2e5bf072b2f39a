# cython: language_level=3
"""SubmitBatch's intake and answer in C (processor/servicer.py): the loop over a decoded request's
operations that validates earns and redeems, takes their merchants' rate-limit tokens and builds their
Operations; and the loop that fills the response's results from the decided Operations.

Why: in Python these two loops cost ~8-10 µs an operation (the interpreter around ~10 upb reads and
setters, ~20 stores of a dataclass __init__, a tuple and a dict store per rate-limit token), where the
upb calls themselves cost ~1-2.

What it does, and what it leaves: `Intake.run` handles the common case only, an earn or a redeem that
passes every check, whose merchant is in memory, ready and permitted. At anything else (another kind, an
empty operation, any field the checks refuse, a merchant not in memory or not permitted, the service
recovering, a program that may require member presence for a redeem) it stops and returns that
operation's index: the servicer's Python path (PointsServicer._earn_now, _redeem_now and the async
builders, the twin of this one) builds or refuses that operation with its own messages, then calls run
again for the rest. So every refusal's message and code comes from one place, the Python path; the
checks here accept exactly what it accepts (tests/unit/test_servicer_intake.py compares the two on
random batches, operation by operation and byte for byte).

The rate limit: the same arithmetic as domain.TokenBuckets.take, in doubles, per operation at its own
time.monotonic() reading (clock_gettime(CLOCK_MONOTONIC), converted as CPython converts it), on a copy
of each merchant's bucket held for the run and written back to the TokenBuckets' dict when the run ends
or an operation is refused (no await happens in between, so nothing else reads the dict meanwhile).

The Operations: domain.Operation stays the slots dataclass every caller uses; this module allocates one
(tp_alloc, as object.__new__ does: tracked by the cyclic collector like any other) and stores its twenty
fields through the offsets of its member descriptors, read once at construction and checked against the
dataclass's fields (Intake.__init__ refuses a type whose fields are not its twenty slots in that order).
That is ~50 ns against ~500 for calling its __init__ with twenty arguments. The answer reads each
Operation's outcome and the Outcome's code, replayed and fields by offset too, as _merchant reads a
merchant's row: fastpath/slots.pxd, the one place both the layout checks and the reads are written.
"""

cimport cython
from libc.stdint cimport int64_t

from fastpath.slots cimport SlotReader, new_with_slots, put, slot_offsets, slot_read


cdef extern from "Python.h":
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    bint PyUnicode_IS_ASCII(object)
    const unsigned char* PyUnicode_1BYTE_DATA(object)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clock_id, timespec* tp)
    int CLOCK_MONOTONIC


# The Operation fields in order (processor/domain.py); the servicer checks the same list at import.
OPERATION_FIELDS = (
    "method merchant_id merchant_slot idempotency_key request member_id points purchase_amount hold_ttl_seconds "
    "authorization_id transaction_id referrer_id merchant_points vouchers at_merchant_id refusal future enqueued_at "
    "call outcome"
).split()
DEF FIELD_COUNT = 20
cdef tuple _OPERATION_FIELDS = tuple(OPERATION_FIELDS)

# what respond_encoded() reads of each decided Operation and its Outcome, and _merchant of a merchant's row
# (store.MerchantRow), by offset when they are those slots classes (fastpath/slots.pxd)
cdef tuple _OPERATION_READ = ("outcome",)
cdef tuple _OUTCOME_READ = ("code", "replayed", "fields")
cdef tuple _MERCHANT_READ = ("merchant_slot", "give_back_bps")
cdef SlotReader _operation_reader
cdef SlotReader _outcome_reader
cdef SlotReader _merchant_reader

# Which bytes an identifier may hold ([A-Za-z0-9_.:@-], processor/servicer.py's _ID_PATTERN) and an
# idempotency key (printable ASCII without space, 0x21..0x7e, Validator.idempotency_key)
cdef unsigned char _ID_BYTE[256]
cdef unsigned char _KEY_BYTE[256]


cdef void _tables():
    cdef int c
    for c in range(256):
        _ID_BYTE[c] = (
            (c >= ord("a") and c <= ord("z")) or (c >= ord("A") and c <= ord("Z")) or (c >= ord("0") and c <= ord("9"))
            or c == ord("_") or c == ord(".") or c == ord(":") or c == ord("@") or c == ord("-")
        )
        _KEY_BYTE[c] = 0x21 <= c <= 0x7E


_tables()


cdef inline bint _valid(str value, Py_ssize_t limit, unsigned char* table):
    """1..limit characters, every one an ASCII character the table allows."""
    cdef Py_ssize_t length = PyUnicode_GET_LENGTH(value), i
    cdef const unsigned char* data
    if length == 0 or length > limit or not PyUnicode_IS_ASCII(value):
        return False
    data = PyUnicode_1BYTE_DATA(value)
    for i in range(length):
        if not table[data[i]]:
            return False
    return True


cdef inline double _monotonic():
    """time.monotonic(), as CPython computes it: nanoseconds from CLOCK_MONOTONIC, as a double / 1e9."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    cdef int64_t ns = <int64_t>now.tv_sec * 1_000_000_000 + now.tv_nsec
    return (<double>ns) / 1e9


cdef class _Merchant:
    """A merchant during one run: its row's values and its rate-limit bucket (as TokenBuckets keeps it)."""
    cdef object merchant_id
    cdef object slot
    cdef int64_t give_back_bps
    cdef bint fresh  # no bucket yet: the first take starts from a full burst
    cdef bint touched  # a token taken (or refused): written back at the run's end
    cdef double tokens
    cdef double at


cdef object _ZERO = 0
cdef object _EMPTY = ""
cdef object _ZERO_SECONDS = 0.0
cdef int64_t _BPS_DENOMINATOR = 10_000
cdef int64_t _INT64_MAX = 0x7FFFFFFFFFFFFFFF


@cython.auto_pickle(False)  # its offsets, callbacks and buckets are this process's: not a value to copy
cdef class Intake:
    """One per servicer: the limits it checks against and the callbacks into the servicer for what is
    decided once per merchant and run (admit) or is rare (rate_limited)."""

    cdef Py_ssize_t offsets[FIELD_COUNT]
    cdef type operation_class
    cdef object earn_method
    cdef object redeem_method
    cdef int64_t purchase_amount_max
    cdef int64_t points_max
    cdef Py_ssize_t id_max
    cdef Py_ssize_t key_max
    cdef object rate_limits
    cdef object admit
    cdef object rate_limited
    cdef readonly Py_ssize_t position  # the operation run() is at (the servicer's answer if it raises)

    def __init__(
        self, operation, earn_method, redeem_method, settings, rate_limits, admit, rate_limited
    ):
        try:
            slot_offsets(operation, _OPERATION_FIELDS, self.offsets, "fastpath/intake.pyx's OPERATION_FIELDS")
        except TypeError as error:  # ImportError, as before slots.pxd: the servicer cannot use this module
            raise ImportError(f"fastpath.intake: {error}") from error
        self.operation_class = operation
        self.earn_method = earn_method
        self.redeem_method = redeem_method
        self.purchase_amount_max = settings.purchase_amount_max
        self.points_max = settings.points_max
        self.id_max = settings.id_bytes_max
        self.key_max = settings.idempotency_key_bytes_max
        self.rate_limits = rate_limits
        self.admit = admit
        self.rate_limited = rate_limited
        self.position = 0

    cdef object _operation(
        self, object method, object merchant_id, object slot, object key, object request, object member_id,
        object points, object purchase_amount, object vouchers,
    ):
        """An Operation as the positional constructor makes it in _earn_now / _redeem_now."""
        cdef Py_ssize_t* o = self.offsets
        op = new_with_slots(self.operation_class)
        put(op, o[0], method)
        put(op, o[1], merchant_id)
        put(op, o[2], slot)
        put(op, o[3], key)
        put(op, o[4], request)
        put(op, o[5], member_id)
        put(op, o[6], points)
        put(op, o[7], purchase_amount)
        put(op, o[8], _ZERO)  # hold_ttl_seconds
        put(op, o[9], _ZERO)  # authorization_id
        put(op, o[10], _ZERO)  # transaction_id
        put(op, o[11], _EMPTY)  # referrer_id
        put(op, o[12], _ZERO)  # merchant_points
        put(op, o[13], vouchers)
        put(op, o[14], _EMPTY)  # at_merchant_id
        put(op, o[15], None)  # refusal
        put(op, o[16], None)  # future
        put(op, o[17], _ZERO_SECONDS)  # enqueued_at
        put(op, o[18], None)  # call
        put(op, o[19], None)  # outcome
        return op

    cdef _Merchant _merchant(self, dict run, dict checked, str merchant_id, str key):
        """The run's record of a merchant, or None when the Python path must decide (the merchant's id or
        the key refused, the merchant not in memory, not ready, not permitted)."""
        cdef _Merchant merchant = run.get(merchant_id)
        if merchant is not None:
            return merchant
        row = checked.get(merchant_id)
        if row is None:
            # the checks _checked_merchant makes before the merchant's admission, in its order
            if not _valid(merchant_id, self.id_max, _ID_BYTE) or not _valid(key, self.key_max, _KEY_BYTE):
                return None
            row = self.admit(merchant_id, checked)
            if row is None:
                return None
        merchant = _Merchant.__new__(_Merchant)
        merchant.merchant_id = merchant_id
        merchant.slot = slot_read(&_merchant_reader, row, 0, _MERCHANT_READ)
        bps = slot_read(&_merchant_reader, row, 1, _MERCHANT_READ)
        merchant.give_back_bps = bps if 1 <= bps <= _BPS_DENOMINATOR else 0  # 0: the Python path's invariant
        merchant.fresh = True
        merchant.touched = False
        bucket = self.rate_limits._buckets.get(merchant_id)
        if bucket is not None:
            merchant.fresh = False
            merchant.tokens, merchant.at = bucket
        run[merchant_id] = merchant
        return merchant

    cdef void _write_back(self, dict run) except *:
        buckets = self.rate_limits._buckets
        cdef _Merchant merchant
        for merchant in run.values():
            if merchant.touched:
                buckets[merchant.merchant_id] = (merchant.tokens, merchant.at)
                merchant.touched = False

    def run(
        self, operations, Py_ssize_t start, dict checked, list results, list indexes, list kinds, list ops,
        bint redeems,
    ):
        """Builds the operations from `start` on into (indexes, kinds, ops) and stops at the first it does
        not decide; returns that one's index (len(operations): none left). A token refused is answered in
        `results` (the servicer's rate_limited). `redeems`: False when the program in force may require a
        member presence check, which the Python path makes: then a redeem stops the run."""
        cdef Py_ssize_t count = len(operations), index
        cdef dict run = {}
        cdef _Merchant merchant
        cdef int64_t amount = 0, vouchers = 0, points = 0, low
        cdef double rate = self.rate_limits.rate, burst = float(self.rate_limits.burst), now, tokens
        cdef bint limited = rate > 0
        cdef str kind, member_id, merchant_id, key
        earn_method, redeem_method = self.earn_method, self.redeem_method
        try:
            for index in range(start, count):
                self.position = index
                operation = operations[index]
                # which of the oneof is set, without WhichOneof (~0.2 µs): an unset member reads as its
                # empty default, so an earn whose member_id is not empty is the operation's earn; an
                # empty member_id (unset, or refused by the Python path anyway) looks at the redeem
                request = operation.earn
                member_id = request.member_id
                if PyUnicode_GET_LENGTH(member_id) != 0:
                    kind = "earn"
                    if not _valid(member_id, self.id_max, _ID_BYTE):
                        return index
                    amount = request.purchase_amount
                    if not 1 <= amount <= self.purchase_amount_max:
                        return index
                elif redeems:
                    request = operation.redeem
                    member_id = request.member_id
                    if not _valid(member_id, self.id_max, _ID_BYTE):
                        return index  # empty too: another kind, an empty operation, or refused
                    kind = "redeem"
                    vouchers = request.vouchers
                    if not 0 <= vouchers <= self.points_max:
                        return index
                    points = request.points
                    low = 0 if vouchers > 0 else 1
                    if not low <= points <= self.points_max:
                        return index
                else:
                    return index
                merchant_id = request.merchant_id
                key = request.idempotency_key
                merchant = self._merchant(run, checked, merchant_id, key)
                if merchant is None:
                    return index
                if not _valid(key, self.key_max, _KEY_BYTE):
                    return index
                if kind == "earn" and (
                    merchant.give_back_bps == 0 or amount > _INT64_MAX // merchant.give_back_bps
                ):
                    return index  # the Python path: its invariant, or Python ints past int64
                if limited:  # domain.TokenBuckets.take, the same arithmetic
                    now = _monotonic()
                    if merchant.fresh:
                        tokens = burst
                        merchant.fresh = False
                    else:
                        tokens = merchant.tokens + (now - merchant.at) * rate
                        if tokens > burst:
                            tokens = burst
                    merchant.touched = True
                    merchant.at = now
                    if tokens < 1.0:
                        merchant.tokens = tokens
                        self._write_back(run)  # retry_seconds reads the bucket
                        results[index] = self.rate_limited(merchant_id, now, kind)
                        continue
                    merchant.tokens = tokens - 1.0
                if kind == "earn":
                    op = self._operation(
                        earn_method, merchant_id, merchant.slot, key,
                        {"member_id": member_id, "purchase_amount": amount}, member_id,
                        amount * merchant.give_back_bps // _BPS_DENOMINATOR, amount, _ZERO,
                    )
                else:
                    if vouchers:
                        fields = {"member_id": member_id, "points": points, "vouchers": vouchers}
                    else:
                        fields = {"member_id": member_id, "points": points}
                    op = self._operation(
                        redeem_method, merchant_id, merchant.slot, key, fields, member_id, points, _ZERO, vouchers
                    )
                indexes.append(index)
                kinds.append(kind)
                ops.append(op)
            return count
        finally:
            self._write_back(run)

    def respond_encoded(self, list refused not None, list indexes not None, list kinds not None,
                        list ops not None, to_result, ok, int64_t applied, str prefix not None):
        """SubmitBatchResponse's bytes, for SubmitBatchResponse.FromString: the message
        PointsServicer._batch_response's Python path fills with upb's setters (the same fields, so the
        same bytes once parsed and serialized again; tests/unit/test_servicer_response.py), each APPLIED
        earn and redeem written here as wire bytes rather than by ~10 setters from Python (measured,
        1,000 results, 70% earns: the setters from C 0.85 µs an operation, this and FromString ~0.15),
        every other result as its message's SerializeToString(). In request order: an APPLIED earn or
        redeem from its outcome's fields, any other queued operation's result from `to_result(kind,
        outcome)`, the refused ones (and empty) from `refused` at their indexes. `ok` is Code.OK,
        `applied` OPERATION_OUTCOME_APPLIED, `prefix` "txn_"."""
        return _respond_encoded(refused, indexes, kinds, ops, to_result, ok, applied, prefix)


# --- the response as protobuf wire bytes (Intake.respond_encoded) ---

# SubmitBatchResponse.results (1), OperationResult.outcome (1), .earn (4), .redeem (8); EarnResponse and
# RedeemResponse's fields 1..7, Timestamp's seconds (1) and nanos (2): proto/points/v1/points.proto.
# Tags are (field << 3) | wire type: 0 a varint, 2 length-delimited.
DEF TAG_RESULT = 0x0A
DEF TAG_OUTCOME = 0x08
DEF TAG_EARN = 0x22
DEF TAG_REDEEM = 0x42
DEF TAG_STRING_1 = 0x0A
DEF TAG_CREATED_AT = 0x2A
DEF TAG_LEVEL = 0x3A
DEF DIGITS_MAX = 20  # "-9223372036854775808"
DEF PREFIX_MAX = 32


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    object PyBytes_FromStringAndSize(const char*, Py_ssize_t)
    char* PyBytes_AS_STRING(object)
    Py_ssize_t PyBytes_GET_SIZE(object)
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1

from libc.stdint cimport uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy


cdef inline int _varint_size(uint64_t value) noexcept:
    cdef int size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


cdef inline int _int_field_size(int64_t value) noexcept:
    # an int64 or int32 field's tag and varint (a negative one is 10 bytes: its 64-bit two's complement,
    # sign-extended for int32); 0 is not written (proto3: no presence)
    return 0 if value == 0 else 1 + _varint_size(<uint64_t>value)


cdef inline bint _int64_of(object value, int64_t* out) noexcept:
    """True with *out set when value is an int (exactly) that fits an int64."""
    cdef int overflow = 0
    cdef long long number
    if type(value) is not int:
        return False
    number = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        return False
    out[0] = number
    return True


cdef struct _Writer:
    char* data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _reserve(_Writer* writer, Py_ssize_t more) except -1:
    cdef Py_ssize_t capacity = writer.capacity if writer.capacity > 0 else 4096
    cdef char* grown
    if writer.size + more <= writer.capacity:
        return 0
    while capacity < writer.size + more:
        capacity *= 2
    grown = <char*>realloc(writer.data, <size_t>capacity)
    if grown == NULL:
        raise MemoryError()
    writer.data = grown
    writer.capacity = capacity
    return 0


cdef inline void _put_byte(_Writer* writer, unsigned char value) noexcept:
    writer.data[writer.size] = <char>value
    writer.size += 1


cdef inline void _put_varint(_Writer* writer, uint64_t value) noexcept:
    while value >= 0x80:
        writer.data[writer.size] = <char>((value & 0x7F) | 0x80)
        writer.size += 1
        value >>= 7
    writer.data[writer.size] = <char>value
    writer.size += 1


cdef inline void _put_int_field(_Writer* writer, unsigned char tag, int64_t value) noexcept:
    if value != 0:
        _put_byte(writer, tag)
        _put_varint(writer, <uint64_t>value)


cdef inline void _put_bytes(_Writer* writer, const char* data, Py_ssize_t size) noexcept:
    memcpy(writer.data + writer.size, data, <size_t>size)
    writer.size += size


cdef inline int _decimal(int64_t value, char* out) noexcept:
    """value's decimal digits (with a leading '-' if negative) into out, as str(value); their count."""
    cdef char digits[DIGITS_MAX]
    cdef int count = 0, size = 0
    cdef uint64_t magnitude = <uint64_t>value
    if value < 0:
        magnitude = (~magnitude) + 1
        out[0] = b"-"
        size = 1
    while True:
        digits[count] = <char>(48 + magnitude % 10)
        count += 1
        magnitude //= 10
        if magnitude == 0:
            break
    while count > 0:
        count -= 1
        out[size] = digits[count]
        size += 1
    return size


cdef int _put_message(_Writer* writer, object message) except -1:
    # a result built by the Python path (refused, another kind, a replay, a refusal): its own bytes
    encoded = message.SerializeToString()
    cdef Py_ssize_t size = PyBytes_GET_SIZE(encoded)
    _reserve(writer, 1 + 10 + size)
    _put_byte(writer, TAG_RESULT)
    _put_varint(writer, <uint64_t>size)
    _put_bytes(writer, PyBytes_AS_STRING(encoded), size)
    return 0


cdef int _put_head(_Writer* writer, int64_t applied, unsigned char kind_tag, Py_ssize_t body_size,
                   const char* tid, Py_ssize_t tid_size, int64_t points, int64_t balance) except -1:
    # a result's head, room reserved for its whole body (body_size: the earn or redeem message's): the
    # result and its outcome, the kind's message tag and size, then the fields every kind starts with
    # (transaction id, points, balance); the caller writes the rest of the body
    cdef Py_ssize_t result_size = _int_field_size(applied) + 1 + _varint_size(<uint64_t>body_size) + body_size
    _reserve(writer, 1 + _varint_size(<uint64_t>result_size) + result_size)
    _put_byte(writer, TAG_RESULT)
    _put_varint(writer, <uint64_t>result_size)
    _put_int_field(writer, TAG_OUTCOME, applied)
    _put_byte(writer, kind_tag)
    _put_varint(writer, <uint64_t>body_size)
    _put_byte(writer, TAG_STRING_1)
    _put_varint(writer, <uint64_t>tid_size)
    _put_bytes(writer, tid, tid_size)
    _put_int_field(writer, 0x10, points)
    _put_int_field(writer, 0x18, balance)
    return 0


cdef bint _put_earn(_Writer* writer, dict f, int64_t applied, const char* prefix, Py_ssize_t prefix_size) except -1:
    """An APPLIED earn's result, as respond's setters make it (_fill_earn_response), written as
    SubmitBatchResponse.results' next element; False (nothing written) when its fields are not what
    the setters take without a question (a missing key, a value not an int64 or int32, a level not a
    str): the Python path answers for that one."""
    cdef int64_t transaction_id, points, balance, give_back_bps, created_at_us, seconds, nanos, bonus = 0
    cdef char tid[PREFIX_MAX + DIGITS_MAX]
    cdef Py_ssize_t tid_size, level_size = 0, created_size, earn_size
    cdef const char* level_data = NULL
    if not (_int64_of(f.get("transaction_id"), &transaction_id) and _int64_of(f.get("points"), &points)
            and _int64_of(f.get("balance"), &balance) and _int64_of(f.get("give_back_bps"), &give_back_bps)
            and _int64_of(f.get("created_at_us"), &created_at_us)):
        return False
    if give_back_bps < -2147483648 or give_back_bps > 2147483647:
        return False
    bonus_points = f.get("bonus_points")
    if bonus_points and not _int64_of(bonus_points, &bonus):
        return False
    level = f.get("level")
    if level:
        if type(level) is not str:
            return False
        level_data = PyUnicode_AsUTF8AndSize(level, &level_size)
    # Python's floor division and modulo (the setters' created_at_us // 1_000_000, % 1_000_000)
    seconds = created_at_us // 1_000_000
    nanos = created_at_us % 1_000_000
    if nanos < 0:
        nanos += 1_000_000
        seconds -= 1
    nanos *= 1000
    memcpy(tid, prefix, <size_t>prefix_size)
    tid_size = prefix_size + _decimal(transaction_id, tid + prefix_size)
    created_size = _int_field_size(seconds) + _int_field_size(nanos)
    earn_size = (1 + _varint_size(<uint64_t>tid_size) + tid_size + _int_field_size(points)
                 + _int_field_size(balance) + _int_field_size(give_back_bps)
                 + 1 + _varint_size(<uint64_t>created_size) + created_size + _int_field_size(bonus)
                 + (1 + _varint_size(<uint64_t>level_size) + level_size if level_size else 0))
    _put_head(writer, applied, TAG_EARN, earn_size, tid, tid_size, points, balance)
    _put_int_field(writer, 0x20, give_back_bps)
    _put_byte(writer, TAG_CREATED_AT)
    _put_varint(writer, <uint64_t>created_size)
    _put_int_field(writer, 0x08, seconds)
    _put_int_field(writer, 0x10, nanos)
    _put_int_field(writer, 0x30, bonus)
    if level_size:
        _put_byte(writer, TAG_LEVEL)
        _put_varint(writer, <uint64_t>level_size)
        _put_bytes(writer, level_data, level_size)
    return True


cdef bint _put_redeem(_Writer* writer, dict f, int64_t applied, const char* prefix,
                      Py_ssize_t prefix_size) except -1:
    """An APPLIED redeem's result, as respond's setters make it (_fill_redeem_response); False as
    _put_earn."""
    cdef int64_t transaction_id, points, balance, available, vouchers = 0, voucher_balance = 0, credit_used = 0
    cdef char tid[PREFIX_MAX + DIGITS_MAX]
    cdef Py_ssize_t tid_size, redeem_size
    if not (_int64_of(f.get("transaction_id"), &transaction_id) and _int64_of(f.get("points"), &points)
            and _int64_of(f.get("balance"), &balance) and _int64_of(f.get("available"), &available)):
        return False
    if len(f) > 4 and not (_int64_of(f.get("vouchers", 0), &vouchers)
                           and _int64_of(f.get("voucher_balance", 0), &voucher_balance)
                           and _int64_of(f.get("voucher_credit_used", 0), &credit_used)):
        return False
    memcpy(tid, prefix, <size_t>prefix_size)
    tid_size = prefix_size + _decimal(transaction_id, tid + prefix_size)
    redeem_size = (1 + _varint_size(<uint64_t>tid_size) + tid_size + _int_field_size(points)
                   + _int_field_size(balance) + _int_field_size(available) + _int_field_size(vouchers)
                   + _int_field_size(voucher_balance) + _int_field_size(credit_used))
    _put_head(writer, applied, TAG_REDEEM, redeem_size, tid, tid_size, points, balance)
    _put_int_field(writer, 0x20, available)
    _put_int_field(writer, 0x28, vouchers)
    _put_int_field(writer, 0x30, voucher_balance)
    _put_int_field(writer, 0x38, credit_used)
    return True


cdef object _respond_encoded(list refused, list indexes, list kinds, list ops, to_result, ok, int64_t applied,
                             str prefix):
    # Intake.respond_encoded (its docstring)
    cdef _Writer writer
    cdef Py_ssize_t position = 0, index, i, count = len(indexes), prefix_size
    cdef const char* prefix_data = PyUnicode_AsUTF8AndSize(prefix, &prefix_size)
    cdef str kind
    cdef bint written
    if prefix_size > PREFIX_MAX:
        raise ValueError(f"a transaction id prefix of at most {PREFIX_MAX} bytes, not {prefix!r}")
    writer.data = NULL
    writer.size = 0
    writer.capacity = 0
    try:
        _reserve(&writer, 64 * (count + 1))
        for i in range(count):
            index = indexes[i]
            kind = kinds[i]
            while position < index:  # refused before it was queued (or empty): its result as it is
                _put_message(&writer, refused[position])
                position += 1
            position = index + 1
            outcome = slot_read(&_operation_reader, ops[i], 0, _OPERATION_READ)
            written = False
            if (slot_read(&_outcome_reader, outcome, 0, _OUTCOME_READ) is ok
                    and not slot_read(&_outcome_reader, outcome, 1, _OUTCOME_READ)):
                f = slot_read(&_outcome_reader, outcome, 2, _OUTCOME_READ)
                if type(f) is dict:
                    if kind == "earn":
                        written = _put_earn(&writer, <dict>f, applied, prefix_data, prefix_size)
                    elif kind == "redeem":
                        written = _put_redeem(&writer, <dict>f, applied, prefix_data, prefix_size)
            if not written:
                _put_message(&writer, to_result(kind, outcome))
        for i in range(position, len(refused)):
            _put_message(&writer, refused[i])
        return PyBytes_FromStringAndSize(writer.data, writer.size)
    finally:
        free(writer.data)
