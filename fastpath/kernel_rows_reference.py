"""The pure-Python twin of fastpath/kernel_rows.pyx: each member's lots as a run of the rules kernel left
them (processor/rules_kernel.py's write-back), built from the run's pool of lots and what the kernel left
of each. The compiled module is used unless POINTS_FASTPATH=python; tests/unit/test_kernel_rows.py feeds
both the same random pools and compares their rows (and tests/unit/test_rules_kernel_differential.py
holds the whole kernel path to the per-operation path).

A member's row (processor/program.py's KernelLots): (member id, its lots after the run, the keys the run
touched, the keys of the lots it created, (keys gone, lots new or changed) since the run began, its lots
when the run began, Σ amounts after − Σ amounts before). A member's lots are a tuple of a few, a
LotChain of many (fastpath/lot_chain.pyx); () for none.
"""

from __future__ import annotations

import array
import heapq
import operator
from collections.abc import Sequence
from typing import Any

from fastpath.lot_chain import LotChain
from fastpath.lot_chain_reference import spliced
from fastpath.records import Lot


class KernelRowsError(Exception):
    """The run's pool disagrees with the kernel's rows (a lot the kernel names was never made): a bug."""


def lots_after_run(
    taken_rows: set[int],
    new_by_row: dict[int, list[int]],
    tier_members: list[tuple[str, Any, tuple[Lot, ...] | LotChain]],
    prefixes: list[tuple[int, int]],
    pool_lots: list[Lot | None],
    lot_amount: Sequence[int],
) -> list[tuple[Any, ...]]:
    """Per tier row whose redeems took pieces (`taken_rows`) or whose earns made lots (`new_by_row`: the
    row's new lots in the pool, in order), in row order, the member's lots after the run: what it passed
    (its pool slice `prefixes[row]` = (start, count), less what was taken: `lot_amount` holds what the
    kernel left of each pool lot), the lots it did not pass as they were, then its new lots that have
    points left. A lot left untouched stays the same object; of a member's LotChain, the chunks the run
    neither passed nor appended to are shared with its chain before (spliced)."""
    rows: list[tuple[Any, ...]] = []
    for row in sorted(taken_rows | new_by_row.keys()):
        member_id, _, before_lots = tier_members[row]
        start, passed = prefixes[row]
        keys: set[tuple[int, int | None]] = set()
        gone: list[tuple[int, int | None]] = []
        changed: list[Lot] = []
        kept: list[Lot] = []
        delta = 0  # Σ amounts after − before
        for index in range(start, start + passed):
            lot, left = pool_lots[index], lot_amount[index]
            if lot is None:
                raise KernelRowsError(f"lot {index} of the run's pool was never made")
            if left == lot.amount:  # untouched: the same object
                kept.append(lot)
                continue
            key = (lot.lot_id, lot.expires_at_us)
            keys.add(key)
            delta += left - lot.amount
            if left:
                lot = Lot(lot.lot_id, left, lot.expires_at_us, lot.issuer_id)
                kept.append(lot)
                changed.append(lot)
            else:
                gone.append(key)
        created_keys: set[tuple[int, int | None]] = set()
        made = new_by_row.get(row)
        if made is not None:
            made_lots: list[Lot] = []
            for index in made:
                lot, left = pool_lots[index], lot_amount[index]
                if lot is None:
                    raise KernelRowsError(f"lot {index} of the run's pool was never made")
                created_keys.add((lot.lot_id, lot.expires_at_us))
                delta += left
                if left:
                    if left != lot.amount:
                        lot = Lot(lot.lot_id, left, lot.expires_at_us, lot.issuer_id)
                    made_lots.append(lot)
                    changed.append(lot)
            keys |= created_keys
        else:
            made_lots = []
        # the lots it did not pass, as they were: shared, not copied (a member may hold thousands of lots)
        after = spliced(before_lots, passed, kept, made_lots) if passed or made_lots else before_lots
        rows.append((member_id, after, keys, created_keys, (gone, changed), before_lots, delta))
    return rows


def lots_written(
    rows: list[tuple[Any, ...]],
    table: dict[str, tuple[Lot, ...] | LotChain],
    flushed: dict[str, tuple[Lot, ...] | LotChain],
    touched: dict[str, set[Any] | None],
    created_by: dict[str, set[Any]],
    diffs: dict[str, Any],
    dirty: set[str],
    totals: dict[str, tuple[tuple[Lot, ...] | LotChain, int]],
    due: list[tuple[int, str]],
    missing: object,
) -> list[Any]:
    """ProgramState.written_by_kernel's lots (processor/program.py, whose docstring says what each of
    its tables holds): per row of lots_after_run, in order, the member's lots become the row's, with
    what _touch, _set(lots) and _schedule would record for the change: the touched and created keys,
    the lots as the last flush left them, the flush rows of the run (`diffs`, when the run is the
    member's first change since that flush), the Σ kept for check_lots (`totals`, carried by `delta`
    while it is that of `before`) and an expiry heap entry when the member's soonest expiry moves
    (`due`). Returns each row's member's lots before, for the undo log (`missing`: it had none, as
    ProgramState's undo log spells it)."""
    olds: list[Any] = []
    for member_id, after, keys, created, diff, before, delta in rows:
        current = table.get(member_id, missing)
        had = () if current is missing else current
        summed = totals.get(member_id)
        if summed is not None and summed[0] is before and before is had:
            totals[member_id] = (after, summed[1] + delta)
        first = member_id not in flushed
        # _touch: which of the member's lots changed (the keys are the run's own set: not copied)
        if member_id in touched:
            known = touched[member_id]
            if known is not None:
                known.update(keys)
        elif member_id in dirty:
            touched[member_id] = None  # changed before, by a path that does not say which
        else:
            touched[member_id] = keys
        if created:
            made = created_by.get(member_id)
            if made is None:
                created_by[member_id] = created
            else:
                made.update(created)
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
            soonest = after[0].expires_at_us
            if soonest is not None and (not had or had[0].expires_at_us != soonest):
                heapq.heappush(due, (soonest, member_id))
    return olds


def operation_columns(
    ops: list[Any], earn: object, op_earn: int, op_redeem: int
) -> tuple[array.array[int], array.array[int], array.array[int], array.array[int]]:
    """A kernel run's operation columns (processor/rules_kernel.py's _kernel_run): each operation's
    method code (`op_earn` when its method is `earn`, `op_redeem` else), merchant slot, points and
    purchase amount, as int64 arrays."""
    return (
        array.array("q", [op_earn if op.method is earn else op_redeem for op in ops]),
        array.array("q", [operator.index(op.merchant_slot) for op in ops]),
        array.array("q", [operator.index(op.points) for op in ops]),
        array.array("q", [operator.index(op.purchase_amount) for op in ops]),
    )


def lots_checked(
    dirty: set[str],
    table: dict[str, tuple[Lot, ...] | LotChain],
    totals: dict[str, tuple[tuple[Lot, ...] | LotChain, int]],
    keep_from: int,
    ledger: Any,
) -> tuple[str, int, int, int] | None:
    """ProgramState.check_lots' loop (processor/program.py): for every member in `dirty`, Σ of its lots
    in `table` against its posted − held (the fast path's `ledger`: member_slot, balance). The sum is
    taken from `totals` while the entry's lots are the member's very tuple, else summed, and kept there
    for a member with `keep_from` lots or more (dropped for one with fewer). Returns the first member
    whose lots exceed its spendable points, as (member id, Σ lots, posted, held), or None."""
    for member_id in dirty:
        posted, held = ledger.balance(ledger.member_slot(member_id))
        lots = table.get(member_id, ())
        summed = totals.get(member_id)
        if summed is not None and summed[0] is lots:
            total = summed[1]  # carried forward by the kernel runs that made `lots`
        else:
            total = sum(map(_AMOUNT, lots))
            if len(lots) >= keep_from:
                totals[member_id] = (lots, total)
            elif summed is not None:
                del totals[member_id]
        if total > posted - held:
            return (member_id, total, posted, held)
    return None


_AMOUNT = operator.attrgetter("amount")


_ABSENT = object()


def rows_of(keys: set[Any], table: dict[Any, Any], default: Any = _ABSENT) -> dict[Any, Any]:
    """ProgramState.flush's rows of a table (processor/program.py): `table`'s value at each of `keys`
    that it has, or with a `default`, at each of `keys` (the default where it has none); in the keys'
    order."""
    if default is _ABSENT:
        return {key: table[key] for key in keys if key in table}
    return {key: table.get(key, default) for key in keys}


def lots_rows(keys: set[str], diffs: dict[str, Any], changed: Any) -> dict[str, Any]:
    """ProgramState.flush's lots rows: each member's diff as a kernel run left it, or changed(member)."""
    return {member_id: diffs.get(member_id) or changed(member_id) for member_id in keys}


def created_rows(created: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """ProgramState.flush's new lots: `created`'s entries of the members among `keys`, in its order."""
    return {member_id: made for member_id, made in created.items() if member_id in keys}
