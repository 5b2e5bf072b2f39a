# cython: language_level=3
"""Each member's lots as a run of the rules kernel left them (processor/rules_kernel.py's write-back), and
ProgramState.written_by_kernel's loop over them (processor/program.py), in C: the first ~1.0-1.3 → ~0.6 µs
an operation, written_by_kernel ~0.7-0.9 → ~0.4-0.5 (loadtest/bench_state_machine, a CPU timer around
each, minimum of 5 runs on a loaded machine). What is left of the first is memory, not instructions
(~350 of its own an operation under callgrind): a member's tuple of lots is copied whole each run that
touches it, and each lot's reference count is written, a cache line a lot (~5.5 lots an operation on the
Zipf workload, more as members gather lots); only another layout of the lots (columns, or chunks that a
run appends to) would remove it.

Same results as the twin fastpath/kernel_rows_reference.py (its docstrings say what each function takes
and returns; tests/unit/test_kernel_rows.py compares the two), with one difference that is not seen: a
member's new tuple of lots is filled in one pass, where the twin copies its old lots two or three times
(slice, then concatenations).
"""

cimport cython
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int64_t

from fastpath.records cimport Lot, make_lot

from heapq import heappush

from fastpath.kernel_rows_reference import KernelRowsError


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
    cdef tuple before_lots, after, member
    cdef object made, key, index_object
    cdef Lot lot
    cdef Py_ssize_t start, passed, index, pool, size, position, kept_count, made_count, rest
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
        made_lots = None
        made = new_by_row.get(row)
        if made is not None:
            made_lots = []
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
        # the new tuple in one pass: the lots it passed that are left, the ones it did not pass as they
        # were (the members a run touches may hold thousands of lots), its new lots with points left
        kept_count = len(kept)
        made_count = len(made_lots) if made_lots is not None else 0
        rest = len(before_lots) - passed
        if not kept_count and not made_count and passed == 0:
            after = before_lots
        else:
            size = kept_count + rest + made_count
            after = PyTuple_New(size)
            position = 0
            for item in kept:
                Py_INCREF(item)
                PyTuple_SET_ITEM(after, position, item)
                position += 1
            for index in range(passed, passed + rest):
                item = before_lots[index]
                Py_INCREF(item)
                PyTuple_SET_ITEM(after, position, item)
                position += 1
            if made_count:
                for item in made_lots:
                    Py_INCREF(item)
                    PyTuple_SET_ITEM(after, position, item)
                    position += 1
            if position != size:
                raise KernelRowsError(f"tier row {row}: {position} lots written of {size}")
        rows.append((member_id, after, keys, created_keys, (gone, changed), before_lots, delta))
    return rows


def lots_written(list rows not None, dict table not None, dict flushed not None, dict touched not None,
                 dict created_by not None, dict diffs not None, set dirty not None, dict totals not None,
                 list due not None, object missing):
    # the twin's loop (fastpath/kernel_rows_reference.py, where its docstring says what it records),
    # with the same dict and set operations in the same order
    cdef tuple row, had, after, before
    cdef object member_id, keys, created, diff, delta, current, summed, known, made, soonest
    cdef bint first
    cdef list olds = []
    for row in rows:
        if len(row) != 7:
            raise ValueError(f"a kernel run's lots row has 7 fields, not {len(row)}")
        member_id = row[0]
        after = <tuple?>row[1]
        keys = row[2]
        created = row[3]
        diff = row[4]
        before = <tuple?>row[5]
        delta = row[6]
        current = table.get(member_id, missing)
        had = () if current is missing else <tuple?>current
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
            soonest = (<Lot?>after[0]).expires_at_us
            if soonest is not None and (not had or (<Lot?>had[0]).expires_at_us != soonest):
                heappush(due, (soonest, member_id))
    return olds
