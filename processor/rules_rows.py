"""The program rules' rows of consecutive batches, each row at its latest state (issue 14, the projection).

When the projector lags, it writes several batches in one transaction (Store._write_many with a group).
The rules' tables that hold a current state — member_programs, lots, lot_consumptions, earn_rules,
split_tenders, promotion_budgets — are then written once for the group, not once per batch: a member
who earned in three batches is one member_programs row (the third batch's), a lot created and consumed
within the group is never written, an owner's consumed pieces are replaced once. What the tables hold
after the group is exactly what writing the batches one after the other leaves (compared row for row in
tests/integration/test_rules_group_write.py and test_copy_binary.py); the rows that record events
(tier_events, voucher holds, dividends posted) stay per batch, in order (Store._write_rules_events).
Recovery's projection of the log's tail goes through the same groups.

Pure: no asyncpg. `coalesce` returns what Store._write_rules writes (its `rows`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from processor.domain import require

if TYPE_CHECKING:
    from processor.program import EarnRecord, MemberRules, RulesWrite, SplitRecord
    from processor.rules import Lot

# (member_id, lot_id, expires_at_us): the lots table's key (a stored lot expires: Lot.expires_at_us is
# None only for the pieces of never-expiring points, which lot_consumptions stores as NEVER_US)
LotKey = tuple[str, int, int | None]
LotRow = tuple[str, int, int | None, str, int]  # LotKey + (issuer_id, amount), the lots table's columns
Owner = tuple[int, int]  # (owner_kind, owner_id) of lot_consumptions


@dataclasses.dataclass(slots=True)
class RulesRows:
    """The rules' rows of one batch or of several consecutive ones, each at its state after the last."""

    # member_id -> its rules after the last batch that changed them
    members: dict[str, MemberRules]
    # member_id -> the time of the first batch of the group in which the member's row has an acquirer:
    # the row's linked_at if Postgres has none yet (a link's time is kept once set)
    linked_at: dict[str, dt.datetime]
    # lots Postgres may hold that are gone after the group (deleted by key)
    lots_gone: list[LotKey]
    # lots the group created that are still there after it (Postgres holds no such row: inserted)
    lots_created: list[LotRow]
    # other lots new or changed (upserted: a restore may bring back a lot an earlier batch deleted)
    lots_changed: list[LotRow]
    # (owner_kind, owner_id) -> its pieces after the group (replaced; empty: deleted)
    pieces: dict[Owner, tuple[Lot, ...]]
    # owners among `pieces` whose ids the group handed out: Postgres holds no pieces of theirs
    pieces_new: set[Owner] | frozenset[Owner]
    # program_id -> promotion_id -> granted in all, after the group
    budgets: dict[str, dict[str, int]]
    # transaction_id -> earn record after the group; those among earns_new are inserted, the others'
    # refunded_base updated
    earns: dict[int, EarnRecord]
    earns_new: set[int] | frozenset[int]
    # transaction_id -> split tender after the group; likewise inserted or its refunded updated
    splits: dict[int, SplitRecord]
    splits_new: set[int] | frozenset[int]


def coalesce(writes: Sequence[tuple[RulesWrite, dt.datetime]]) -> RulesRows:
    """The rows of consecutive batches' RulesWrites (oldest first, each with its batch's time), each at
    its latest state. One batch's are its own (no copy); several are merged, later batches winning."""
    require(len(writes) > 0, "coalesce: no batches")
    if len(writes) == 1:
        return _one(*writes[0])
    # each batch's own rows (what it alone would write), then merged, later batches winning. Within a
    # batch a key is never both gone and created (gone: it was there before the batch; created: it was
    # not), so a batch's own gone keys cannot hide its created lots. Most lots are created and never
    # touched again within the group, so only the keys a batch deleted or changed are looked up (a
    # dict of every lot's key cost ~0.8 µs an operation more at 16 batches a group)
    ones = [_one(r, at) for r, at in writes]
    members: dict[str, MemberRules] = {}
    linked_at: dict[str, dt.datetime] = {}
    later: dict[LotKey, LotRow | None] = {}  # keys deleted or changed -> the row after the group, None: gone
    pieces: dict[Owner, tuple[Lot, ...]] = {}
    pieces_new: set[Owner] = set()
    budgets: dict[str, dict[str, int]] = {}
    earns: dict[int, EarnRecord] = {}
    earns_new: set[int] = set()
    splits: dict[int, SplitRecord] = {}
    splits_new: set[int] = set()
    for one in ones:
        members.update(one.members)
        for m, at in one.linked_at.items():
            linked_at.setdefault(m, at)  # the first batch's
        for key in one.lots_gone:
            later[key] = None
        for row in one.lots_changed:
            later[row[:3]] = row  # a LotRow's first three items are its LotKey
        pieces.update(one.pieces)
        pieces_new |= one.pieces_new
        for program_id, granted in one.budgets.items():
            budgets.setdefault(program_id, {}).update(granted)
        earns.update(one.earns)
        earns_new |= one.earns_new
        splits.update(one.splits)
        splits_new |= one.splits_new
    lots_created: list[LotRow] = []
    for one in ones:
        if not later:
            lots_created.extend(one.lots_created)
            continue
        for row in one.lots_created:
            key = row[:3]
            if key not in later:
                lots_created.append(row)
            else:  # created, then changed or gone: its state after the group, inserted if any
                last = later.pop(key)
                if last is not None:
                    lots_created.append(last)
    # the keys left were not created by the group: Postgres may hold them
    lots_gone = [key for key, row in later.items() if row is None]
    lots_changed = [row for row in later.values() if row is not None]
    return RulesRows(
        members=members,
        linked_at=linked_at,
        lots_gone=lots_gone,
        lots_created=lots_created,
        lots_changed=lots_changed,
        pieces=pieces,
        pieces_new=pieces_new,
        budgets=budgets,
        earns=earns,
        earns_new=earns_new,
        splits=splits,
        splits_new=splits_new,
    )


def _one(r: RulesWrite, at: dt.datetime) -> RulesRows:
    """One batch's rows: its RulesWrite's own mappings, the lots split by what the batch created."""
    lots_gone: list[LotKey] = []
    lots_created: list[LotRow] = []
    lots_changed: list[LotRow] = []
    new_lots = r.new_lots
    created, changed_ = lots_created.append, lots_changed.append
    for m, (gone, changed) in r.lots.items():
        if gone:
            lots_gone.extend([(m, lot_id, expires_at_us) for lot_id, expires_at_us in gone])
        new = new_lots.get(m)
        if not new:  # a member who created no lot in the batch (a redeem's): every lot changed
            lots_changed.extend([(m, lot.lot_id, lot.expires_at_us, lot.issuer_id, lot.amount) for lot in changed])
            continue
        for lot in changed:
            row = (m, lot.lot_id, lot.expires_at_us, lot.issuer_id, lot.amount)
            (created if lot.key in new else changed_)(row)
    return RulesRows(
        members=r.members,
        linked_at={m: at for m, v in r.members.items() if v.acquirer_id is not None},
        lots_gone=lots_gone,
        lots_created=lots_created,
        lots_changed=lots_changed,
        pieces=r.pieces,
        pieces_new=r.new_pieces,
        budgets={r.program_id: r.budgets} if r.budgets else {},
        earns=r.earns,
        earns_new=r.new_earns,
        splits=r.splits,
        splits_new=r.new_splits,
    )
