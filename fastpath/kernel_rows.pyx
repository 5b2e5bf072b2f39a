# cython: language_level=3
"""Each member's lots as a run of the rules kernel left them (processor/rules_kernel.py's write-back), and
ProgramState.written_by_kernel's loop over them (processor/program.py), in C: the first ~1.0-1.3 → ~0.6 µs
an operation, written_by_kernel ~0.7-0.9 → ~0.4-0.5 (loadtest/bench_state_machine, a CPU timer around
each, minimum of 5 runs on a loaded machine). A member's lots are a tuple of a few, a LotChain of many
(fastpath/lot_chain.pyx): a run builds the chunks of a chain it passed or appended to and
shares the others (until the twelfth session every member's whole tuple of lots was copied each run that
touched it, a reference count written a lot, ~15 lots an operation by batch 40 of the bench).

Same results as the twin fastpath/kernel_rows_reference.py (its docstrings say what each function takes
and returns; tests/unit/test_kernel_rows.py compares the two).
"""

cimport cython
from cpython cimport array as c_array
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int64_t

from fastpath._core cimport Ledger
from fastpath.lot_chain cimport LotChain, splice
from fastpath.records cimport Lot, MemberRules, make_lot
from fastpath.slots cimport SlotReader, slot_read

import array as _array
from heapq import heappush

from fastpath.kernel_rows_reference import KernelRowsError


cdef inline object _first_lot(object lots):
    # lots[0] of a member's non-empty lots (a tuple, or a LotChain)
    if type(lots) is LotChain:
        return (<tuple>(<LotChain>lots).chunks[0])[0]
    return lots[0]


cdef inline object _last_lot(object lots):
    # lots[-1] of a member's non-empty lots
    cdef tuple chunk
    if type(lots) is LotChain:
        chunk = (<LotChain>lots).chunks[len((<LotChain>lots).chunks) - 1]
        return chunk[len(chunk) - 1]
    return lots[len(lots) - 1]


cdef inline Lot _pool_lot(list pool_lots, Py_ssize_t index):
    cdef object found = pool_lots[index]
    if found is None:
        raise KernelRowsError(f"lot {index} of the run's pool was never made")
    return <Lot?>found


def lots_after_run(set taken_rows not None, dict new_by_row not None, list tier_members not None,
                   list prefixes not None, list pool_lots not None, const int64_t[:] lot_amount not None):
    cdef list rows = []
    cdef list kept, gone, changed, made_lots
    cdef set keys, created_keys
    cdef tuple member
    cdef object before_lots, after, made, key, index_object
    cdef Lot lot
    cdef Py_ssize_t start, passed, index, pool
    cdef int64_t left, amount, delta
    pool = len(pool_lots)
    if lot_amount.shape[0] < pool:
        raise ValueError(f"lot_amount has {lot_amount.shape[0]} items for a pool of {pool} lots")
    for row in sorted(taken_rows | new_by_row.keys()):
        member = tier_members[row]
        member_id = member[0]
        before_lots = member[2]
        start, passed = prefixes[row]
        if start < 0 or passed < 0 or start + passed > pool or passed > len(before_lots):
            raise KernelRowsError(f"tier row {row}: pool slice {start}+{passed} of {pool} lots, "
                                  f"{len(before_lots)} lots of its own")
        keys = set()
        gone = []
        changed = []
        kept = []
        delta = 0  # Σ amounts after − before
        for index in range(start, start + passed):
            lot = _pool_lot(pool_lots, index)
            left = lot_amount[index]
            amount = lot.amount
            if left == amount:  # untouched: the same object
                kept.append(lot)
                continue
            key = (lot.lot_id, lot.expires_at_us)
            keys.add(key)
            delta += left - amount
            if left:
                lot = make_lot(lot.lot_id, left, lot.expires_at_us, lot.issuer_id)
                kept.append(lot)
                changed.append(lot)
            else:
                gone.append(key)
        created_keys = set()
        made_lots = []
        made = new_by_row.get(row)
        if made is not None:
            for index_object in <list?>made:
                index = index_object
                if index < 0 or index >= pool:
                    raise KernelRowsError(f"tier row {row}: new lot {index} outside the pool of {pool}")
                lot = _pool_lot(pool_lots, index)
                left = lot_amount[index]
                created_keys.add((lot.lot_id, lot.expires_at_us))
                delta += left
                if left:
                    if left != <int64_t>lot.amount:
                        lot = make_lot(lot.lot_id, left, lot.expires_at_us, lot.issuer_id)
                    made_lots.append(lot)
                    changed.append(lot)
            keys |= created_keys
        # the lots it passed that are left, the ones it did not pass as they were (shared chunks: the members
        # a run touches may hold thousands of lots), its new lots with points left
        after = splice(before_lots, passed, kept, made_lots) if passed or made_lots else before_lots
        rows.append((member_id, after, keys, created_keys, (gone, changed), before_lots, delta))
    return rows


def lots_written(list rows not None, dict table not None, dict flushed not None, dict touched not None,
                 dict created_by not None, dict diffs not None, set dirty not None, dict totals not None,
                 list due not None, object missing):
    # the twin's loop (fastpath/kernel_rows_reference.py, where its docstring says what it records),
    # with the same dict and set operations in the same order
    cdef tuple row
    cdef object had, after, before
    cdef object member_id, keys, created, diff, delta, current, summed, known, made, soonest
    cdef bint first
    cdef list olds = []
    for row in rows:
        if len(row) != 7:
            raise ValueError(f"a kernel run's lots row has 7 fields, not {len(row)}")
        member_id = row[0]
        after = row[1]
        keys = row[2]
        created = row[3]
        diff = row[4]
        before = row[5]
        delta = row[6]
        current = table.get(member_id, missing)
        had = () if current is missing else current
        summed = totals.get(member_id)
        if summed is not None and (<tuple?>summed)[0] is before and before is had:
            totals[member_id] = (after, (<tuple>summed)[1] + delta)
        first = member_id not in flushed
        # _touch: which of the member's lots changed (the keys are the run's own set: not copied)
        if member_id in touched:
            known = touched[member_id]
            if known is not None:
                (<set?>known).update(keys)
        elif member_id in dirty:
            touched[member_id] = None  # changed before, by a path that does not say which
        else:
            touched[member_id] = keys
        if created:
            made = created_by.get(member_id)
            if made is None:
                created_by[member_id] = created
            else:
                (<set?>made).update(created)
        # _set(lots, member_id, after or None, "lots")
        if first:
            flushed[member_id] = had
        elif diffs:
            diffs.pop(member_id, None)
        olds.append(current)
        if after:
            table[member_id] = after
        else:
            table.pop(member_id, None)
        dirty.add(member_id)
        if first and had is before:
            diffs[member_id] = diff
        # _schedule: an entry at the member's soonest expiry when the run moved it
        if after:
            soonest = (<Lot?>_first_lot(after)).expires_at_us
            if soonest is not None and (not had or (<Lot?>_first_lot(had)).expires_at_us != soonest):
                heappush(due, (soonest, member_id))
    return olds


# --- the run's operation columns (processor/rules_kernel.py's _kernel_run) ---

cdef tuple _OPERATION_READ = ("method", "merchant_slot", "points", "purchase_amount", "member_id")
cdef enum:
    _OP_METHOD, _OP_MERCHANT_SLOT, _OP_POINTS, _OP_PURCHASE_AMOUNT, _OP_MEMBER_ID
cdef SlotReader _operation_reader
cdef c_array.array _INT64_EMPTY = _array.array("q")


cdef inline int64_t _int64(object value) except? -1:
    # as fastpath/_core.pyx's (Ledger.int64_column's items): an integer, or what operator.index makes one
    if not isinstance(value, int):
        value = PyNumber_Index(value)
    return value


def operation_columns(list ops not None, object earn, int64_t op_earn, int64_t op_redeem):
    # The twin's four columns in one pass, each Operation's slots read by offset (fastpath/slots.pxd): a
    # map of an attrgetter and Ledger.int64_column cost ~150 instructions an item (callgrind)
    cdef Py_ssize_t count = len(ops)
    cdef Py_ssize_t index
    cdef c_array.array method = c_array.clone(_INT64_EMPTY, count, False)
    cdef c_array.array merchant_slot = c_array.clone(_INT64_EMPTY, count, False)
    cdef c_array.array points = c_array.clone(_INT64_EMPTY, count, False)
    cdef c_array.array purchase = c_array.clone(_INT64_EMPTY, count, False)
    cdef object op
    for index in range(count):
        op = ops[index]
        method.data.as_longlongs[index] = (
            op_earn if slot_read(&_operation_reader, op, _OP_METHOD, _OPERATION_READ) is earn else op_redeem)
        merchant_slot.data.as_longlongs[index] = _int64(
            slot_read(&_operation_reader, op, _OP_MERCHANT_SLOT, _OPERATION_READ))
        points.data.as_longlongs[index] = _int64(slot_read(&_operation_reader, op, _OP_POINTS, _OPERATION_READ))
        purchase.data.as_longlongs[index] = _int64(
            slot_read(&_operation_reader, op, _OP_PURCHASE_AMOUNT, _OPERATION_READ))
    return method, merchant_slot, points, purchase


# --- ProgramState.check_lots (processor/program.py) ---

cdef extern from *:
    """
    #define fastpath_add_overflow(a, b, r) __builtin_add_overflow(a, b, r)
    """
    bint _add_overflow "fastpath_add_overflow"(int64_t a, int64_t b, int64_t* result) nogil


cdef object _amount_total(object lots):
    # Σ of the lots' amounts as sum(map(attrgetter("amount"), lots)) gives it: in C while every lot is a
    # records.Lot with an int64 amount and the sum stays in int64, else by the twin's sum
    cdef int64_t total = 0, amount
    cdef object lot, value
    cdef tuple chunks
    cdef Py_ssize_t index, count
    if type(lots) is LotChain:
        chunks = (<LotChain>lots).chunks
        count = len(chunks)
    elif type(lots) is tuple:
        chunks = <tuple>lots  # (one chunk: no tuple made for it)
        count = 1
    else:
        return sum([item.amount for item in lots])
    for index in range(count):
        chunk = chunks if type(lots) is tuple else chunks[index]
        for lot in <tuple?>chunk:
            if type(lot) is not Lot:
                return sum([item.amount for item in lots])
            value = (<Lot>lot).amount
            if type(value) is not int:
                return sum([item.amount for item in lots])
            try:
                amount = value
            except OverflowError:
                return sum([item.amount for item in lots])
            if _add_overflow(total, amount, &total):
                return sum([item.amount for item in lots])
    return total


def lots_checked(set dirty not None, dict table not None, dict totals not None, Py_ssize_t keep_from,
                 object ledger):
    # the twin's loop, with the same dict operations in the same order; a compiled Ledger's balances
    # read from its arrays (its member_slot and balance: two calls and a tuple a member)
    cdef object member_id, summed, total, lots
    cdef tuple balance
    cdef Ledger compiled = ledger if type(ledger) is Ledger else None
    cdef int64_t slot
    cdef object posted, held
    for member_id in dirty:
        if compiled is not None:
            if type(member_id) is not str:
                raise TypeError(f"a member id is a str, not {type(member_id).__name__}")
            slot = compiled.member_slots.get(member_id, -1)
            compiled._check_member_slot(slot)
            posted = compiled.member_posted[slot]
            held = compiled.member_held[slot]
        else:
            balance = tuple(ledger.balance(ledger.member_slot(member_id)))
            posted, held = balance
        lots = table.get(member_id, ())
        summed = totals.get(member_id)
        if summed is not None and (<tuple?>summed)[0] is lots:
            total = (<tuple>summed)[1]  # carried forward by the kernel runs that made `lots`
        else:
            total = _amount_total(lots)
            if len(lots) >= keep_from:
                totals[member_id] = (lots, total)
            elif summed is not None:
                del totals[member_id]
        if total > posted - held:
            return (member_id, total, posted, held)
    return None


# --- the tier row of an operation's member (processor/rules_kernel.py's RulesKernelMixin._kernel_member) ---

cdef tuple _RUN_READ = (
    "tier_rows", "tier_members", "tier_demand", "tier_qualifying", "tier_reached", "tier_acquirer",
    "tier_acquiring_bps", "program_tables",
)
cdef enum:
    _RUN_TIER_ROWS, _RUN_TIER_MEMBERS, _RUN_TIER_DEMAND, _RUN_TIER_QUALIFYING, _RUN_TIER_REACHED, \
        _RUN_TIER_ACQUIRER, _RUN_TIER_ACQUIRING_BPS, _RUN_PROGRAM_TABLES
cdef SlotReader _run_reader
cdef tuple _TABLES_READ = ("version",)
cdef SlotReader _tables_reader
cdef MemberRules _NO_RULES = MemberRules()  # == processor.program.NO_RULES


cdef inline object _expires_at_us(object lot):
    return (<Lot>lot).expires_at_us if type(lot) is Lot else lot.expires_at_us


def kernel_member(object machine, object run, object tables, object op, object now_us):
    # The twin is the Python method itself (processor/rules_kernel.py's _kernel_member, whose docstring
    # says what it returns), with the same reads and the same appends in the same order; here the run's,
    # the operation's and the tables' slots are read by offset and a member's rules and lots in C
    # (~4.4k instructions a member new to the run in Python: callgrind)
    cdef object member_id = slot_read(&_operation_reader, op, _OP_MEMBER_ID, _OPERATION_READ)
    cdef dict tier_rows = slot_read(&_run_reader, run, _RUN_TIER_ROWS, _RUN_READ)
    cdef object row = tier_rows.get(member_id)
    cdef object program_tables, member, referrer_id, acquirer_id, qualifying, levels_reached
    cdef dict members_table, lots_table
    cdef object acquirer, lots, soonest, last, period
    cdef object acquirer_slot = -1
    cdef object share = 0
    cdef list tier_members
    cdef MemberRules rules
    if row is not None:
        return row
    # the program's tables, read once a run (each a generic getattr and a method call of get a member)
    program_tables = slot_read(&_run_reader, run, _RUN_PROGRAM_TABLES, _RUN_READ)
    if program_tables is None:
        program = machine.program
        program_tables = (program.members, program.lots)
        setattr(run, "program_tables", program_tables)
    members_table = (<tuple?>program_tables)[0]
    lots_table = (<tuple>program_tables)[1]
    member = members_table.get(member_id)
    if not member:
        member = _NO_RULES
    rules = member if type(member) is MemberRules else None  # else its fields read by getattr
    referrer_id = rules.referrer_id if rules is not None else member.referrer_id
    if referrer_id and not (rules.referral_paid if rules is not None else member.referral_paid):
        return -1  # its first qualifying earn pays the referrer a bonus: a transaction of its own
    acquirer_id = rules.acquirer_id if rules is not None else member.acquirer_id
    if acquirer_id is not None:
        acquirer = machine.merchants.by_id.get(acquirer_id)
        if acquirer is None:
            return -1  # the per-operation path refuses what it cannot post
        acquirer_slot = acquirer.merchant_slot
        share = tables.acquiring_share_bps(acquirer_id)
    lots = lots_table.get(member_id, ())
    if lots:
        soonest, last = _expires_at_us(_first_lot(lots)), _expires_at_us(_last_lot(lots))
        if soonest is not None and soonest <= now_us:
            return -1  # a lot past its expiry: the per-operation path posts its expiry first
        period = slot_read(&_tables_reader, tables, 0, _TABLES_READ).expiry_period_us
        if period is not None and (last is None or last > now_us + period):
            return -1  # a new lot would not sort last (a restored lot outlives it): credit_lot inserts
    qualifying = rules.qualifying if rules is not None else member.qualifying
    levels_reached = rules.levels_reached if rules is not None else member.levels_reached
    tier_members = slot_read(&_run_reader, run, _RUN_TIER_MEMBERS, _RUN_READ)
    row = len(tier_members)
    tier_rows[member_id] = row
    tier_members.append((member_id, member, lots))
    (<list?>slot_read(&_run_reader, run, _RUN_TIER_DEMAND, _RUN_READ)).append(0)
    (<list?>slot_read(&_run_reader, run, _RUN_TIER_QUALIFYING, _RUN_READ)).append(qualifying)
    (<list?>slot_read(&_run_reader, run, _RUN_TIER_REACHED, _RUN_READ)).append(levels_reached)
    (<list?>slot_read(&_run_reader, run, _RUN_TIER_ACQUIRER, _RUN_READ)).append(acquirer_slot)
    (<list?>slot_read(&_run_reader, run, _RUN_TIER_ACQUIRING_BPS, _RUN_READ)).append(share)
    return row


# --- ProgramState.flush's rows (processor/program.py) ---

cdef object _ABSENT = object()


def rows_of(set keys not None, dict table not None, object default=_ABSENT):
    # {key: table[key] for key in keys if key in table}, or with a default {key: table.get(key, default)
    # for key in keys}: the twin's comprehensions, one lookup a key
    cdef dict rows = {}
    cdef object key, value
    for key in keys:
        value = table.get(key, default)
        if value is not _ABSENT:
            rows[key] = value
    return rows


def lots_rows(set keys not None, dict diffs not None, object changed):
    # {member: diffs.get(member) or changed(member) for member in keys}
    cdef dict rows = {}
    cdef object member_id, diff
    for member_id in keys:
        diff = diffs.get(member_id)
        rows[member_id] = diff if diff else changed(member_id)
    return rows


def created_rows(dict created not None, set keys not None):
    # {member: made for member, made in created.items() if member in keys}
    cdef dict rows = {}
    cdef object member_id, made
    for member_id, made in created.items():
        if member_id in keys:
            rows[member_id] = made
    return rows


# --- the run's pool of lots (processor/rules_kernel.py's RulesKernelMixin._kernel_lots) ---

cdef inline object _amount_of(object lot):
    return (<Lot>lot).amount if type(lot) is Lot else lot.amount


def kernel_lots(object machine, object run):
    # The twin is the Python method itself (processor/rules_kernel.py's _kernel_lots, whose docstring says
    # what it returns), the same walk in C: ~0.9k instructions an operation in Python (callgrind)
    cdef list tier_members = slot_read(&_run_reader, run, _RUN_TIER_MEMBERS, _RUN_READ)
    cdef list tier_demand = slot_read(&_run_reader, run, _RUN_TIER_DEMAND, _RUN_READ)
    cdef Py_ssize_t rows = len(tier_members)
    cdef Py_ssize_t row, start, passed, count
    cdef list pool = []
    cdef list prefixes = []
    cdef c_array.array heads = c_array.clone(_INT64_EMPTY, rows, False)
    cdef c_array.array tails = c_array.clone(_INT64_EMPTY, rows, False)
    cdef c_array.array totals = c_array.clone(_INT64_EMPTY, rows, False)
    cdef object lots, demand, covered, lot
    cdef tuple chunks, chunk
    cdef Py_ssize_t chunk_index, position, size
    cdef bint enough
    for row in range(rows):
        heads.data.as_longlongs[row] = -1
        tails.data.as_longlongs[row] = -1
        totals.data.as_longlongs[row] = -1
        lots = (<tuple?>tier_members[row])[2]
        demand = tier_demand[row]
        start = len(pool)
        if not lots:
            totals.data.as_longlongs[row] = 0
            prefixes.append((start, 0))
            continue
        if not demand:
            prefixes.append((start, 0))
            continue
        count = len(lots)
        chunks = (<LotChain>lots).chunks if type(lots) is LotChain else <tuple?>lots
        covered = 0
        passed = 0
        enough = False  # the lots passed cover the demand: one more is passed, then the walk stops
        for chunk_index in range(len(chunks) if type(lots) is LotChain else 1):
            chunk = chunks[chunk_index] if type(lots) is LotChain else chunks
            size = len(chunk)
            for position in range(size):
                lot = chunk[position]
                pool.append(lot)
                passed += 1
                covered += _amount_of(lot)
                if enough:
                    break
                if covered >= demand:
                    enough = True
            else:
                continue
            break
        heads.data.as_longlongs[row] = start
        tails.data.as_longlongs[row] = start + passed - 1
        totals.data.as_longlongs[row] = _int64(covered) if passed == count else -1
        prefixes.append((start, passed))
    return pool, heads, tails, totals, prefixes
