"""The program rules' in-memory state, beside the fast path: what the committer needs to apply the rules
of processor/rules.py inside a batch without a Postgres read (docs/RULES.md, "Pipeline" paragraphs).

Per member: its links (acquirer, referrer), tier state and expiring lots; per hold or redemption: the
lot pieces it consumed; per promotion: the points granted; per earn made under a program: what it was
given beyond its base (for refunds). Postgres holds the same state (migration 0004), written in the
same transaction as the journal rows it goes with: `flush()` turns what a batch changed into rows of
that transaction.

Undo log: like the fast path's, batches nest (`begin`), `commit` makes the oldest permanent,
`rollback` undoes every open batch and `rollback_newest` the newest. Every change goes through
`_set`, which records the value it replaces.

Lots hold only points that expire. A member's never-expiring points are implicit: posted − held −
Σ lots. Where rules.py's lot functions need them, they are passed as one virtual never-expiring lot
(lot id 0) that is taken out of the result again. A hold consumes lots when it is authorized, so
`Σ lots + permanent = posted − held` for every member, and the expiry job never takes points a hold
promised to a merchant.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import operator
from collections.abc import Sequence
from typing import Any

import fastpath
from fastpath import records
from fastpath.lot_chain import LotChain
from processor import rules, velocity
from processor.domain import Code, Rejection, require

HOLD_OPEN, HOLD_CAPTURED, HOLD_VOIDED, HOLD_EXPIRED = 1, 2, 3, 4  # as holds.status and the fast path's
NEVER_US = 2**63 - 1  # a consumed piece of never-expiring points, as lot_consumptions stores it
OWNER_HOLD = 1
OWNER_TRANSACTION = 2
_PERMANENT = 0  # lot id of the virtual lot of a member's never-expiring points
PERMANENT_LOT_ID = _PERMANENT  # as a consumption's piece of never-expiring points names it
_MISSING = object()
_NEW_KEYS = object()  # an undo entry's key: its "old value" is a list of keys new to the table, to pop
# an undo entry's key: its "old value" is (keys, their old values), two lists of one item a key, restored
# in reverse as one _set entry a key would be. A kernel run's write-back leaves one such entry a table
# rather than a (table, key, old) tuple a member: those tuples hold the table, so the collector tracks
# every one until the batch commits (it is written first: young passes move them to older generations)
_OLD_VALUES = object()
DAY_US = rules.DAY_US


# MemberRules(acquirer_id=None, referrer_id=None, referral_paid=False, level="", levels_reached=0,
# qualifying=0, day_buckets=()): a member's links and tier state (member_programs). Immutable: a change is
# a new value, so the undo log can keep the old one. levels_reached: bit i, levels[i] reached once (its
# bonus paid); qualifying: base point-units net of refunds, in total; day_buckets: (day since epoch, base
# point-units), oldest first. A compiled value the cyclic garbage collector does not track, one per
# member changed since recovery (fastpath/records.pyx).
MemberRules = records.MemberRules


# A member's lots as a run of the kernel left them (ProgramState.written_by_kernel): (member id, its lots,
# the keys the run touched, the keys it created, (keys gone, lots new or changed) since `before`, its lots
# when the run began, and Σ amounts after − Σ amounts before)
KernelLots = tuple[
    str,
    "MemberLots",
    set[tuple[int, int | None]],
    set[tuple[int, int | None]],
    tuple[list[tuple[int, int | None]], list["rules.Lot"]],
    "MemberLots",
    int,
]
# A member's lots, sorted by rules._order (soonest-expiring first): a tuple of a few, a LotChain of many
# (fastpath/lot_chain.pyx: chunks a change copies only where it changes them), as chained / spliced build
# them; read alike (len, iteration, indexing, ==)
MemberLots = tuple["rules.Lot", ...] | LotChain

# ProgramState.check_lots, written_by_kernel's lots and flush()'s rows, in C with the compiled fast path;
# POINTS_FASTPATH=python runs the twins (fastpath/kernel_rows_reference.py); a member's lots (MemberLots) are
# built by the compiled chained/spliced or their twins (fastpath/lot_chain_reference.py)
if fastpath.IMPLEMENTATION == "cython":
    from fastpath.lot_chain import chained as _chained
    from fastpath.lot_chain import spliced as _spliced
    from fastpath.kernel_rows import created_rows as _created_rows
    from fastpath.kernel_rows import lots_checked as _lots_checked
    from fastpath.kernel_rows import lots_rows as _lots_rows
    from fastpath.kernel_rows import lots_written as _lots_written
    from fastpath.kernel_rows import rows_of as _rows_of
else:
    from fastpath.lot_chain_reference import chained as _chained
    from fastpath.lot_chain_reference import spliced as _spliced
    from fastpath.kernel_rows_reference import created_rows as _created_rows
    from fastpath.kernel_rows_reference import lots_checked as _lots_checked
    from fastpath.kernel_rows_reference import lots_rows as _lots_rows
    from fastpath.kernel_rows_reference import lots_written as _lots_written
    from fastpath.kernel_rows_reference import rows_of as _rows_of

# A member with no rules state yet (immutable, so one value serves all: building one cost ~1 µs a member)
NO_RULES = MemberRules()


# EarnRecord(member_id, merchant_id, version, earn, acquirer_id, acquiring, refunded_base=0, made_at_us=0): an
# earn made under a program, what its refunds take back in proportion (earn_rules). A compiled immutable
# value the cyclic garbage collector does not track, one per earn for its refund window
# (fastpath/records.pyx: why, and its docstring).
EarnRecord = records.EarnRecord


@dataclasses.dataclass(frozen=True, slots=True)
class SplitRecord:
    """A redeem paid with vouchers and/or points (split_tenders): refunded in proportion, as one unit."""

    member_id: str
    merchant_id: str
    vouchers: int
    points: int
    from_credit: int
    refunded: int = 0

    @property
    def tender(self) -> rules.Tender:
        return rules.Tender(self.vouchers, self.points)


@dataclasses.dataclass(frozen=True, slots=True)
class VoucherHold:
    """The vouchers of a split-tender hold (voucher_holds): reserved, not posted, until the hold is
    captured (a SPLIT_REDEEM), voided or expires. Its points, if any, are an ordinary hold of the fast
    path under the same authorization id. from_credit: voucher-units reserved on the member's credit."""

    member_id: str
    merchant_id: str
    vouchers: int
    from_credit: int
    points: int
    expires_at_us: int
    status: int = HOLD_OPEN
    transaction_id: int | None = None  # the capture's SPLIT_REDEEM

    @property
    def from_balance(self) -> int:
        return self.vouchers - self.from_credit


@dataclasses.dataclass(slots=True)
class EarnEffects:
    """What an earn set off beyond its own postings, for the pipeline to post in the same batch."""

    bonuses: list[tuple[str, int]]  # (level reached, bonus point-units), lowest first
    level_change: tuple[str, str] | None  # (from, to)
    referral: tuple[str, int] | None  # (referrer member id, bonus point-units)
    acquiring: tuple[str, int] | None  # (acquirer merchant id, reward point-units)


@dataclasses.dataclass(slots=True)
class RulesWrite:
    """The rules' rows of one batch (written by Store.write_batch in the batch's transaction)."""

    program_id: str = ""
    # member_id -> MemberRules to upsert
    members: dict[str, MemberRules] = dataclasses.field(default_factory=dict)
    # member_id -> (keys (lot_id, expires_at_us) of its lots that are gone, its lots new or changed): only
    # what changed, so an earn costs one row whatever the member's history of lots
    lots: dict[str, tuple[list[tuple[int, int]], list[rules.Lot]]] = dataclasses.field(default_factory=dict)
    # member_id -> keys of its lots among `lots` that the batch created (lot ids are the batch's new
    # transaction ids, so Postgres holds no such row): inserted without an upsert
    new_lots: dict[str, set[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    # (owner_kind, owner_id) -> its pieces now (replaced; empty: deleted)
    pieces: dict[tuple[int, int], tuple[rules.Lot, ...]] = dataclasses.field(default_factory=dict)
    # owners among `pieces` that are the batch's own transactions (their ids were never handed out
    # before), so Postgres holds no pieces of theirs to replace: inserted without a DELETE first
    new_pieces: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    # promotion_id -> granted in all
    budgets: dict[str, int] = dataclasses.field(default_factory=dict)
    # transaction_id -> EarnRecord (inserted, or its refunded_base updated)
    earns: dict[int, EarnRecord] = dataclasses.field(default_factory=dict)
    new_earns: set[int] = dataclasses.field(default_factory=set)
    # (transaction_id, member_id, from_level, to_level)
    tier_events: list[tuple[int, str, str, str]] = dataclasses.field(default_factory=list)
    # transaction_id -> SplitRecord (inserted, or its refunded updated)
    splits: dict[int, SplitRecord] = dataclasses.field(default_factory=dict)
    new_splits: set[int] = dataclasses.field(default_factory=set)
    # (round_number, holder_kind, holder_id, transaction_id): dividend allocations posted by this batch
    dividends_posted: list[tuple[int, str, str, int]] = dataclasses.field(default_factory=list)
    # authorization_id -> VoucherHold now (upserted)
    voucher_holds: dict[int, VoucherHold] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.members
            or self.lots
            or self.pieces
            or self.budgets
            or self.earns
            or self.tier_events
            or self.splits
            or self.dividends_posted
            or self.voucher_holds
        )


class ProgramState:
    def __init__(self, program: rules.Program | None = None):
        self.program = program
        self.members: dict[str, MemberRules] = {}
        # member -> its lots, never empty (MemberLots: a member with many is a LotChain, whose chunks a change
        # copies only where it changes them, not its whole history of lots: fastpath/lot_chain.pyx)
        self.lots: dict[str, MemberLots] = {}
        self.pieces: dict[tuple[int, int], tuple[rules.Lot, ...]] = {}
        self.granted: dict[str, int] = {}
        self.earns: dict[int, EarnRecord] = {}
        # vouchers (the second asset): (holder kind, holder id) -> voucher-units held; member -> credit
        # used (voucher-units spent on credit, >= 0); (account kind, owner) -> account id of voucher accounts
        self.vouchers: dict[tuple[str, str], int] = {}
        self.credit: dict[str, int] = {}
        self.voucher_accounts: dict[tuple[str, str], int] = {}
        self.splits: dict[int, SplitRecord] = {}
        # issue 16: merchant -> voucher-units it owes (merchant_voucher_credit, kept >= 0 here), and merchant ->
        # point-units it holds from the merchant match (merchant_points: its holding for voucher credit)
        self.merchant_credit: dict[str, int] = {}
        self.merchant_points: dict[str, int] = {}
        # split-tender holds: open ones (all of them, loaded at start-up) and resolved ones the batches
        # touched since the last forget_resolved(); member -> (own vouchers, credit) reserved by its open
        # holds; (expires_at_us, authorization_id) of open holds, for the expiry sweep
        self.voucher_holds: dict[int, VoucherHold] = {}
        self.vouchers_held: dict[str, tuple[int, int]] = {}
        self._holds_due: list[tuple[int, int]] = []
        self.rounds = 0  # dividend rounds decided so far
        self.dividends_unposted = False  # a decided round has allocations still to post
        self._dividends_posted: list[tuple[int, str, str, int]] = []
        # (expires_at_us, member_id): the expiry job's schedule. Invariant: every member with a lot that
        # expires has an entry at its soonest expiry (pushed whenever that soonest changes, and only
        # then: the heap holds about one entry per member, not one per lot or per earn). Other entries
        # are stale (the soonest moved on) and are dropped when popped.
        self._due: list[tuple[int, str]] = []
        # spending caps: member -> its spends of the last 24 hours in minute buckets (processor/velocity.py);
        # kept in memory only (rebuilt from the journal at start-up), so flush() writes nothing for them
        self.spends: dict[str, velocity.Spends] = {}
        self._spends_pruned_us = 0
        self._undo: list[list[tuple[dict, Any, Any]]] = []
        # member -> its lots as the last flush left them (what Postgres holds once the batches before
        # commit), for the members whose lots changed since: flush() writes the difference
        self._lots_flushed: dict[str, MemberLots] = {}
        # member -> keys of the lots that credit_lot / consume changed since the last flush (flush() looks
        # only those up), or None: some other change, flush() compares the member's whole lots
        self._lots_touched: dict[str, set | None] = {}
        # member -> keys of the lots credit_lot / the kernel created since the last flush: new transaction
        # ids, so not among what Postgres holds, and flush() need not look them up there
        self._lots_created: dict[str, set] = {}
        # member -> the rows flush() writes for its lots (keys gone, lots new or changed), as a kernel run
        # that was the member's only change of its lots since the last flush found them
        # (written_by_kernel); any other change of the member's lots drops it (_set)
        self._lots_diff: dict[str, tuple[list[tuple[int, int | None]], list[rules.Lot]]] = {}
        # member -> (its lots, Σ of their amounts): as check_lots last summed them, or a kernel run carried
        # the sum forward by what it took and credited. Valid only while the member's lots are that very
        # value (checked by identity), so a change by any other path or a rollback makes check_lots sum
        # again: check_lots then costs O(what changed) for a member only kernel runs changed, not O(lots).
        # Kept only for members with _SUM_KEPT_FROM_LOTS lots or more.
        self._lot_totals: dict[str, tuple[MemberLots, int]] = {}
        self.sum_kept_from_lots = _SUM_KEPT_FROM_LOTS  # (a test keeps every member's sum)
        self._dirty: dict[str, set] = {
            "members": set(),
            "lots": set(),
            "pieces": set(),
            # owners of pieces that are transactions of the batch: no rows of theirs in Postgres yet
            "new_pieces": set(),
            "budgets": set(),
            "earns": set(),
            "new_earns": set(),
            "vouchers": set(),
            "credit": set(),
            "accounts": set(),
            "splits": set(),
            "new_splits": set(),
            "voucher_holds": set(),
            "vouchers_held": set(),
            "spends": set(),
            "merchant_credit": set(),
            "merchant_points": set(),
        }
        self._tier_events: list[tuple[int, str, str, str]] = []

    # --- versions ---

    def version(self, when_us: int) -> rules.ProgramVersion | None:
        """The version in force at when_us; None without a program (or before its first version)."""
        if self.program is None or self.program.versions[0].effective_from_us > when_us:
            return None
        return self.program.at(when_us)

    def version_numbered(self, number: int | None) -> rules.ProgramVersion | None:
        if self.program is None or not number:
            return None
        return self.program.versions[number - 1]

    # --- undo log ---

    def begin(self) -> None:
        self._undo.append([])

    def commit(self) -> None:
        require(bool(self._undo), "program state: commit with no batch open")
        self._undo.pop(0)

    def rollback(self) -> None:
        while self._undo:
            self.rollback_newest()

    def rollback_newest(self) -> None:
        require(bool(self._undo), "program state: rollback with no batch open")
        for table, key, old in reversed(self._undo.pop()):
            if key is _NEW_KEYS:  # keys a kernel run added (recorded_by_kernel)
                for added in old:
                    table.pop(added, None)
                continue
            if key is _OLD_VALUES:  # the values a kernel run replaced (recorded_by_kernel, written_by_kernel)
                keys, olds = old
                require(len(keys) == len(olds), "program state: an undo entry's keys and old values differ")
                for key, old in zip(reversed(keys), reversed(olds)):
                    self._restore(table, key, old)
                continue
            self._restore(table, key, old)
        for dirty in self._dirty.values():
            dirty.clear()
        self._lots_flushed.clear()
        self._lots_touched.clear()
        self._lots_created.clear()
        self._lots_diff.clear()
        self._tier_events.clear()
        self._dividends_posted.clear()

    def _restore(self, table: dict, key, old) -> None:
        """Undoes one change of `table` at `key` (a rollback): `old`, its value before, or _MISSING."""
        if old is _MISSING:
            table.pop(key, None)
        else:
            table[key] = old
            if table is self.lots and old and old[0].expires_at_us is not None:
                # the expiry job may have popped the entry at its soonest: it comes back
                heapq.heappush(self._due, (old[0].expires_at_us, key))
            elif table is self.voucher_holds and old.status == HOLD_OPEN:  # so may the hold sweep
                heapq.heappush(self._holds_due, (old.expires_at_us, key))

    def _set(self, table: dict, key, value, dirty: str) -> None:
        if table is self.lots:
            if key not in self._lots_flushed:
                self._lots_flushed[key] = table.get(key, ())
            elif self._lots_diff:
                self._lots_diff.pop(key, None)  # a second change: flush() compares what it must
        if self._undo:
            self._undo[-1].append((table, key, table.get(key, _MISSING)))
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        self._dirty[dirty].add(key)

    def flush(self) -> RulesWrite:
        """What changed since the last flush, as rows for the batch's transaction."""
        d = self._dirty
        # each table's rows in the order of its dirty keys, by compiled loops with the compiled fast path
        # (fastpath/kernel_rows.pyx; the comprehensions are their twins): ~2 rows an operation
        write = RulesWrite(
            program_id=self.program.program_id if self.program is not None else "",
            members=_rows_of(d["members"], self.members),
            lots=_lots_rows(d["lots"], self._lots_diff, self._lots_changed),
            # the sets themselves, not copies: _lots_created is cleared below and nothing else holds them
            new_lots=_created_rows(self._lots_created, d["lots"]),
            pieces=_rows_of(d["pieces"], self.pieces, ()),
            new_pieces=set(d["new_pieces"]),
            budgets=_rows_of(d["budgets"], self.granted, 0),
            earns=_rows_of(d["earns"], self.earns),
            new_earns=set(d["new_earns"]),
            tier_events=list(self._tier_events),
            splits=_rows_of(d["splits"], self.splits),
            new_splits=set(d["new_splits"]),
            dividends_posted=list(self._dividends_posted),
            voucher_holds=_rows_of(d["voucher_holds"], self.voucher_holds),
        )
        for dirty in d.values():
            dirty.clear()
        self._lots_flushed.clear()
        self._lots_touched.clear()
        self._lots_created.clear()
        self._lots_diff.clear()
        self._tier_events = []
        self._dividends_posted = []
        return write

    def _lots_changed(self, member_id: str) -> tuple[list[tuple[int, int]], list[rules.Lot]]:
        touched = self._lots_touched.get(member_id)
        if touched is not None:  # only credit_lot / consume changed the member's lots: look those keys up
            before_lots, after_lots = self._lots_flushed.get(member_id, ()), self.lots.get(member_id, ())
            created = self._lots_created.get(member_id, ())
            gone, changed = [], []
            # the batch's new lots are (almost always) the member's last ones: found by a walk from the
            # end rather than a bisect each (~10 calls of rules._order a key; ~700 new lots a batch)
            tail = {}
            if created:
                for lot in reversed(after_lots):
                    key = (lot.lot_id, lot.expires_at_us)
                    if key not in created:
                        break
                    tail[key] = lot
            # (one key, the common case of a member one earn or spend changed: no sort; a new lot is
            # changed without the Python-level Lot.__eq__ that `None != lot` falls back through)
            for key in sorted(touched, key=_key_order) if len(touched) > 1 else touched:
                old = None if key in created else _find(before_lots, key)
                new = tail.get(key) or _find(after_lots, key)
                if new is None:
                    if old is not None:
                        gone.append(key)
                elif old is None or old != new:
                    changed.append(new)
            return gone, changed
        before = {lot.key: lot for lot in self._lots_flushed.get(member_id, ())}
        after = {lot.key: lot for lot in self.lots.get(member_id, ())}
        return (
            [key for key in before if key not in after],
            [lot for key, lot in after.items() if before.get(key) != lot],
        )

    # --- loading (start-up; prefetch) ---

    def load_member(self, member_id: str, value: MemberRules) -> None:
        self.members[member_id] = value

    def load_lots(self, member_id: str, lots: tuple[rules.Lot, ...]) -> None:
        """The member's lots as Postgres holds them (sorted by rules._order)."""
        if lots:
            self.lots[member_id] = _chained(lots)
        else:
            self.lots.pop(member_id, None)
        self._lots_diff.pop(member_id, None)
        soonest = min((lot.expires_at_us for lot in lots if lot.expires_at_us is not None), default=None)
        if soonest is not None:
            heapq.heappush(self._due, (soonest, member_id))

    def load_pieces(self, owner: tuple[int, int], pieces: tuple[rules.Lot, ...]) -> None:
        self.pieces[owner] = pieces

    def load_earn(self, transaction_id: int, record: EarnRecord) -> None:
        self.earns[transaction_id] = record

    # --- links ---

    def member(self, member_id: str) -> MemberRules:
        return self.members.get(member_id) or NO_RULES

    def link(self, member_id: str, acquirer_id: str, referrer_id: str | None) -> None:
        self._set(
            self.members,
            member_id,
            self.member(member_id).replace(acquirer_id=acquirer_id, referrer_id=referrer_id),
            "members",
        )

    # --- earns ---

    def plan_earn(
        self, version: rules.ProgramVersion, member_id: str, merchant_id: str, base: int, now_us: int
    ) -> rules.Earn:
        """The earn's uplift and promotion grants at the member's level before it (nothing changes)."""
        level = self._level(version, self.member(member_id), now_us)
        budget_left = {
            p.promotion_id: max(0, p.budget_point_units - self.granted.get(p.promotion_id, 0))
            for p in version.promotions
        }
        return rules.earn_with_rules(version, rules.EarnContext(merchant_id, level, now_us), base, budget_left)

    def earned(
        self,
        version: rules.ProgramVersion,
        transaction_id: int,
        member_id: str,
        merchant_id: str,
        earn: rules.Earn,
        purchase_amount: int,
        now_us: int,
    ) -> EarnEffects:
        """Records a committed-to-the-batch earn: grants against budgets, the earn's lot, the tier, the
        referral and acquiring links. Returns what the pipeline posts besides the earn."""
        for grant in earn.grants:
            granted = self.granted.get(grant.promotion_id, 0) + grant.amount
            promotion = next(p for p in version.promotions if p.promotion_id == grant.promotion_id)
            require(granted <= promotion.budget_point_units, f"promotion {grant.promotion_id} over its budget")
            self._set(self.granted, grant.promotion_id, granted, "budgets")
        if earn.total:
            self.credit_lot(version, member_id, transaction_id, earn.total, merchant_id, now_us)
        before = self.member(member_id)
        level_before = self._level(version, before, now_us)
        after = self._count_qualifying(version, before, rules.level_point_units(version, earn), now_us, now_us)
        level_after = self._level(version, after, now_us)
        names = [level.name for level in version.levels]
        reached = {names[i] for i in range(len(names)) if after.levels_reached >> i & 1}
        bonuses = rules.tier_bonuses(version.levels, self._qualifying(version, after, now_us), reached)
        mask = after.levels_reached
        for name, _ in bonuses:
            mask |= 1 << names.index(name)
        referral = None
        bonus = rules.referral_bonus(version, before.referrer_id, before.referral_paid, purchase_amount, earn.base)
        if bonus:
            referral = (before.referrer_id, bonus)
        after = after.replace(
            levels_reached=mask,
            level=level_after,
            referral_paid=before.referral_paid
            or bool(bonus)
            or (bool(before.referrer_id) and earn.base > 0 and purchase_amount >= version.referral_minimum_purchase),
        )
        self._set(self.members, member_id, after, "members")
        reward = rules.acquiring_reward(version, before.acquirer_id, merchant_id, purchase_amount, earn.base)
        record = EarnRecord(
            member_id, merchant_id, version.version, earn, before.acquirer_id if reward else None, reward, 0, now_us
        )
        self._set(self.earns, transaction_id, record, "earns")
        self._dirty["new_earns"].add(transaction_id)
        change = (level_before, level_after) if level_before != level_after else None
        if change:
            self._tier_events.append((transaction_id, member_id, *change))
        return EarnEffects(
            [(n, b) for n, b in bonuses if b > 0], change, referral, (before.acquirer_id, reward) if reward else None
        )

    def recorded_by_kernel(
        self,
        earns: list[tuple[int, EarnRecord]],
        tier_events: list[tuple[int, str, str, str]],
        pieces: list[tuple[tuple[int, int], tuple[rules.Lot, ...]]],
        spends: list[tuple[str, int]],
        now_us: int,
    ) -> None:
        """What a run of the compiled kernel (processor/rules_kernel.py) records besides lots and tier
        state, in the run's order: each earn's record (what earned() records; the kernel runs no
        promotions, so no budget moves) and level change, what each redemption consumed (what consume()
        keeps) and each redemption's spend (spend()). Their lots and the members' tier state follow
        once per member (written_by_kernel). One call a run rather than three an operation:
        the dirty sets get exactly what _set would give them, the undo log one entry a table
        (_OLD_VALUES, _NEW_KEYS) that a rollback undoes as it would _set's."""
        undo = self._undo[-1] if self._undo else None
        # each table in bulk (its keys are the run's new transaction ids, none twice): the undo entries
        # in the run's order, as one _set a record would leave them
        for table, rows, dirty_name, new_name in (
            (self.earns, earns, "earns", "new_earns"),
            (self.pieces, pieces, "pieces", "new_pieces"),  # the run's redemptions: new ids
        ):
            keys = list(map(_FIRST, rows))
            if undo is not None and keys:
                # one undo entry for the run's keys (none in the table before it: checked), rather than
                # one an operation that a commit then frees
                require(table.keys().isdisjoint(keys), "a kernel run's new transaction ids are in use")
                undo.append((table, _NEW_KEYS, keys))
            table.update(rows)
            self._dirty[dirty_name].update(keys)
            self._dirty[new_name].update(keys)
        self._tier_events.extend(tier_events)
        spent, dirty = self.spends, self._dirty["spends"]
        spending = [(member_id, points) for member_id, points in spends if points > 0]
        if not spending:
            return
        spenders = list(map(_FIRST, spending))
        olds = [spent.get(member_id, _MISSING) for member_id in spenders]
        if undo is not None:
            undo.append((spent, _OLD_VALUES, (spenders, olds)))
        for (member_id, points), old in zip(spending, olds):
            spent[member_id] = velocity.add(() if old is _MISSING else old, points, now_us)
        dirty.update(spenders)

    def written_by_kernel(
        self,
        lots: list[KernelLots],
        members: list[tuple[str, MemberRules]],
    ) -> None:
        """What a run of the kernel left of its members' lots and tier state, in one call (rather than a
        _touch and a _set a member, and a _set a member that earned): the dirty sets, touched and created
        lot keys get exactly what those calls would give them, the undo log one _OLD_VALUES entry a table
        (a rollback restores what their entries would have); the expiry heap gets an entry
        for a member whose soonest expiry the run moved (those calls may push more entries, stale ones).

        `lots`, per member whose lots the run changed: its lots as the run left them (sorted; credited
        and consumed there, as credit_lot and consume would have, at `keys`; `created`: the keys of its
        new lots), and `diff`, the rows flush() writes for the
        change from `before` (the member's lots when the run began), kept when `before` is what the last
        flush left, and the change of the Σ of its lots' amounts (which carries check_lots' sum forward).
        `members`: each member that earned, its tier state after the run."""
        undo = self._undo[-1] if self._undo else None
        # the lots' loop (a member at a time: _touch, _set and _schedule's records) in C with the compiled
        # fast path, ~0.9 µs an operation in Python (fastpath/kernel_rows.pyx; its twin kernel_rows_reference.py)
        olds = _lots_written(
            lots,
            self.lots,
            self._lots_flushed,
            self._lots_touched,
            self._lots_created,
            self._lots_diff,
            self._dirty["lots"],
            self._lot_totals,
            self._due,
            _MISSING,
        )
        if undo is not None and lots:
            undo.append((self.lots, _OLD_VALUES, (list(map(_FIRST, lots)), olds)))
        rules_table = self.members
        if undo is not None and members:
            get = rules_table.get
            keys = list(map(_FIRST, members))
            undo.append((rules_table, _OLD_VALUES, (keys, [get(member_id, _MISSING) for member_id in keys])))
        rules_table.update(members)
        self._dirty["members"].update(map(_FIRST, members))

    def refund_plan(self, transaction_id: int, base_points: int) -> tuple[EarnRecord, rules.Earn, int] | None:
        """For a refund of `base_points` of an earn made under a program: (its record, the portion to
        take back, the acquiring reward to reverse). None for an earn made without a program."""
        record = self.earns.get(transaction_id)
        if record is None:
            return None
        if base_points > record.earn.base - record.refunded_base:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                f"refund of {base_points} point-units exceeds the {record.earn.base - record.refunded_base} "
                f"base point-units that remain unrefunded of txn_{transaction_id} (its bonus points "
                f"are taken back in proportion, not asked for)",
            )
        portion = rules.earn_refund(record.earn, record.refunded_base, base_points)
        reversal = rules.acquiring_reversal(record.acquiring, record.earn.base, record.refunded_base, base_points)
        return record, portion, reversal

    def refunded_earn(
        self,
        version: rules.ProgramVersion | None,
        transaction_id: int,
        record: EarnRecord | None,
        member_id: str,
        base_points: int,
        taken: int,
        spendable: int,
        now_us: int,
    ) -> None:
        """A refund of an earn took `taken` point-units back from the member (base_points of its base)."""
        if record is not None:
            self._set(
                self.earns,
                transaction_id,
                record.replace(refunded_base=record.refunded_base + base_points),
                "earns",
            )
            if version is not None:
                member = self.member(member_id)
                # what the earn's refunded portion had counted: its base, or all it took back ("total")
                counted = base_points if version.level_points == rules.LEVEL_POINTS_BASE else taken
                self._set(
                    self.members,
                    member_id,
                    self._count_qualifying(version, member, -counted, record.made_at_us, now_us),
                    "members",
                )
        self._take(member_id, taken, spendable, now_us, own_lot=transaction_id)

    # --- vouchers ---

    def move_vouchers(self, holder: tuple[str, str], delta: int) -> int:
        balance = self.vouchers.get(holder, 0) + delta
        require(balance >= 0, f"voucher balance of {holder} would be {balance}")
        self._set(self.vouchers, holder, balance, "vouchers")
        return balance

    def move_credit(self, member_id: str, delta: int) -> int:
        used = self.credit.get(member_id, 0) + delta
        require(used >= 0, f"voucher credit of {member_id!r} would be {used}")
        self._set(self.credit, member_id, used or None, "credit")
        return used

    def move_merchant_credit(self, merchant_id: str, delta: int) -> int:
        """Issue 16: the vouchers a merchant owes grow (a spend on credit, a reversal beyond what it holds) or
        shrink (repaid out of vouchers it receives)."""
        used = self.merchant_credit.get(merchant_id, 0) + delta
        require(used >= 0, f"voucher credit of merchant {merchant_id!r} would be {used}")
        self._set(self.merchant_credit, merchant_id, used or None, "merchant_credit")
        return used

    def move_merchant_points(self, merchant_id: str, delta: int) -> int:
        """Issue 16: the points a merchant holds from the merchant match."""
        held = self.merchant_points.get(merchant_id, 0) + delta
        require(held >= 0, f"points held by merchant {merchant_id!r} would be {held}")
        self._set(self.merchant_points, merchant_id, held or None, "merchant_points")
        return held

    def merchant_credit_headroom(self, version: rules.ProgramVersion | None, merchant_id: str) -> int:
        """Issue 16: voucher-units a merchant may still spend on credit (merchant_voucher_credit): the
        credit limit on the points it holds from the match, less what it owes."""
        if version is None or not version.merchant_voucher_credit:
            return 0
        limit = self.credit_limit(version, self.merchant_points.get(merchant_id, 0))
        return max(0, limit - self.merchant_credit.get(merchant_id, 0))

    def voucher_available(self, member_id: str) -> int:
        """The member's own voucher-units not reserved by an open split-tender hold."""
        return self.vouchers.get((rules.HOLDER_MEMBER, member_id), 0) - self.vouchers_held.get(member_id, (0, 0))[0]

    def credit_headroom(self, version: rules.ProgramVersion | None, member_id: str, holding: int) -> int:
        """Voucher-units the member may still spend on credit: its limit less what it owes and what its
        open holds reserve."""
        reserved = self.credit.get(member_id, 0) + self.vouchers_held.get(member_id, (0, 0))[1]
        return max(0, self.credit_limit(version, holding) - reserved)

    def load_voucher_hold(self, authorization_id: int, hold: VoucherHold) -> None:
        self.voucher_holds[authorization_id] = hold
        if hold.status == HOLD_OPEN:
            own, credit = self.vouchers_held.get(hold.member_id, (0, 0))
            self.vouchers_held[hold.member_id] = (own + hold.from_balance, credit + hold.from_credit)
            heapq.heappush(self._holds_due, (hold.expires_at_us, authorization_id))

    def hold_vouchers(self, authorization_id: int, hold: VoucherHold) -> None:
        require(
            hold.status == HOLD_OPEN and authorization_id not in self.voucher_holds,
            f"voucher hold {authorization_id} exists already",
        )
        require(
            hold.from_balance <= self.voucher_available(hold.member_id),
            f"voucher hold {authorization_id} reserves more vouchers than {hold.member_id!r} has",
        )
        self._set(self.voucher_holds, authorization_id, hold, "voucher_holds")
        self._reserve(hold, 1)
        heapq.heappush(self._holds_due, (hold.expires_at_us, authorization_id))

    def resolve_voucher_hold(self, authorization_id: int, status: int, transaction_id: int | None = None) -> None:
        hold = self.voucher_holds[authorization_id]
        require(
            hold.status == HOLD_OPEN and status != HOLD_OPEN,
            f"voucher hold {authorization_id}: resolving it from status {hold.status} to {status}",
        )
        self._set(
            self.voucher_holds,
            authorization_id,
            dataclasses.replace(hold, status=status, transaction_id=transaction_id),
            "voucher_holds",
        )
        self._reserve(hold, -1)

    def _reserve(self, hold: VoucherHold, sign: int) -> None:
        own, credit = self.vouchers_held.get(hold.member_id, (0, 0))
        own, credit = own + sign * hold.from_balance, credit + sign * hold.from_credit
        require(own >= 0 and credit >= 0, f"vouchers held by {hold.member_id!r} would be {own}, {credit}")
        self._set(self.vouchers_held, hold.member_id, (own, credit) if own or credit else None, "vouchers_held")

    def voucher_holds_due(self, now_us: int, limit: int) -> list[int]:
        """Up to `limit` open split-tender holds expired at now_us (the sweep resolves them)."""
        due: list[int] = []
        heap = self._holds_due
        while heap and heap[0][0] <= now_us and len(due) < limit:
            _, authorization_id = heapq.heappop(heap)
            hold = self.voucher_holds.get(authorization_id)
            if hold is not None and hold.status == HOLD_OPEN and hold.expires_at_us <= now_us:
                due.append(authorization_id)
        return due

    def forget_resolved_holds(self) -> None:
        """Drops resolved split-tender holds (between batches, with the fast path's forget_resolved):
        Postgres keeps them, and a later capture or void of one reads it again."""
        require(not self._undo, "forget_resolved_holds() with a batch open")
        self.voucher_holds = {a: h for a, h in self.voucher_holds.items() if h.status == HOLD_OPEN}

    def set_voucher_account(self, key: tuple[str, str], account_id: int) -> None:
        self._set(self.voucher_accounts, key, account_id, "accounts")

    def credit_limit(self, version: rules.ProgramVersion | None, holding: int) -> int:
        """Voucher-units a member may owe: credit_limit_bps of its expected next dividend on its points."""
        if version is None or version.dividends is None:
            return 0
        rate = rules.dividend_rate_bps(version.dividends, self.rounds + 1)
        return rules.voucher_credit_limit(holding, rate, version.dividends.credit_limit_bps)

    def split(self, transaction_id: int, record: SplitRecord, new: bool = False) -> None:
        self._set(self.splits, transaction_id, record, "splits")
        if new:
            self._dirty["new_splits"].add(transaction_id)

    def dividend_posted(self, round_number: int, holder_kind: str, holder_id: str, transaction_id: int) -> None:
        self._dividends_posted.append((round_number, holder_kind, holder_id, transaction_id))

    # --- spending caps (processor/velocity.py) ---

    def spend(self, member_id: str, points: int, now_us: int) -> None:
        """The member's Redeem or Capture took `points` point-units at now_us."""
        if points > 0:
            self._set(self.spends, member_id, velocity.add(self.spends.get(member_id, ()), points, now_us), "spends")

    def load_spend(self, member_id: str, points: int, at_us: int) -> None:
        self.spends[member_id] = velocity.add(self.spends.get(member_id, ()), points, at_us)

    def prune_spends(self, now_us: int) -> None:
        """Forgets spends older than the longest window (between batches, at most once a minute)."""
        require(not self._undo, "prune_spends() with a batch open")
        if now_us - self._spends_pruned_us < velocity.BUCKET_US:
            return
        self._spends_pruned_us = now_us
        self.spends = {m: kept for m, spends in self.spends.items() if (kept := velocity.pruned(spends, now_us))}

    # --- tiers ---

    def _qualifying(self, version: rules.ProgramVersion, member: MemberRules, now_us: int) -> int:
        if version.tier_window_us is None:
            return member.qualifying
        first_day = (now_us - version.tier_window_us) // DAY_US + 1
        return sum(amount for day, amount in member.day_buckets if day >= first_day)

    def _level(self, version: rules.ProgramVersion, member: MemberRules, now_us: int) -> str:
        return rules.level_for(self._qualifying(version, member, now_us), version.levels).name

    def _count_qualifying(
        self, version: rules.ProgramVersion, member: MemberRules, base: int, dated_us: int, now_us: int
    ) -> MemberRules:
        """The member with `base` point-units (negative for a refund) counted on the day of dated_us,
        and day buckets older than the window dropped (the window has day granularity)."""
        buckets = dict(member.day_buckets)
        day = dated_us // DAY_US
        buckets[day] = buckets.get(day, 0) + base
        if version.tier_window_us is not None:
            first_day = (now_us - version.tier_window_us) // DAY_US + 1
            buckets = {d: a for d, a in buckets.items() if d >= first_day}
        else:
            buckets = {}
        return member.replace(
            qualifying=member.qualifying + base,
            day_buckets=tuple(sorted((d, a) for d, a in buckets.items() if a)),
        )

    def level(self, member_id: str, now_us: int) -> str:
        version = self.version(now_us)
        if version is None:
            return ""
        return self._level(version, self.member(member_id), now_us)

    # --- lots ---

    def credit_lot(
        self,
        version: rules.ProgramVersion | None,
        member_id: str,
        transaction_id: int,
        amount: int,
        issuer_id: str,
        now_us: int,
    ) -> None:
        """Points credited to the member by a transaction: a lot if they expire under the version."""
        if version is None or version.expiry_period_us is None or amount <= 0:
            return
        lot = rules.new_lot(version, transaction_id, amount, now_us, issuer_id)
        before = self.lots.get(member_id, ())
        order = rules._order(lot)
        if not before or rules._order(before[-1]) < order:
            # a new earn's lot almost always expires last; sorting after every lot, its key (which
            # _order includes) is none of theirs, so no search is needed to know it is new
            lots = _spliced(before, 0, (), (lot,))
        else:
            require(_find(before, lot.key) is None, f"member {member_id!r}: lot {lot.key} exists already")
            flat = tuple(before)
            position = bisect.bisect_right(flat, order, key=rules._order)
            lots = _chained(flat[:position] + (lot,) + flat[position:])
        self._touch(member_id, (lot.key,))
        self._lots_created.setdefault(member_id, set()).add(lot.key)
        self._set(self.lots, member_id, lots, "lots")
        self._schedule(member_id, before, lots)  # a new lot almost always expires last: no entry

    def _touch(self, member_id: str, keys) -> None:
        """Records which of the member's lots a change touches (before the _set that makes it)."""
        if member_id in self._lots_touched:
            touched = self._lots_touched[member_id]
            if touched is not None:
                touched.update(keys)
        elif member_id in self._dirty["lots"]:
            self._lots_touched[member_id] = None  # changed before, by a path that does not say which
        else:
            self._lots_touched[member_id] = set(keys)

    def _with_permanent(self, member_id: str, spendable: int) -> list[rules.Lot]:
        """The member's lots plus the virtual lot of its never-expiring points, given its spendable
        points (posted − held) before the operation."""
        lots = list(self.lots.get(member_id, ()))
        permanent = spendable - sum(lot.amount for lot in lots)
        require(permanent >= 0, f"member {member_id!r}: lots exceed its spendable points")
        if permanent:
            lots.append(rules.Lot(_PERMANENT, permanent, None, ""))
        return lots

    def _store_lots(self, member_id: str, lots) -> None:
        kept = tuple(lot for lot in lots if lot.lot_id != _PERMANENT and lot.amount > 0)
        before = self.lots.get(member_id, ())
        if kept != before:
            self._lots_touched[member_id] = None  # flush() compares the member's whole lots
            self._set(self.lots, member_id, _chained(kept) if kept else None, "lots")
            # The expiry job needs an entry at (or before) each member's soonest expiry: every lot that
            # becomes a member's soonest gets one here (or in credit_lot / load_lots / a rollback), and
            # a popped entry is either stale or expires that lot. Pushing every kept lot on every change
            # grew the heap by the member's lot count per spend, without bound.
            soonest = min((lot.expires_at_us for lot in kept), default=None)
            if soonest is not None and soonest != min((lot.expires_at_us for lot in before), default=None):
                heapq.heappush(self._due, (soonest, member_id))

    def consume(self, member_id: str, owner: tuple[int, int], amount: int, spendable: int, now_us: int) -> None:
        """A hold or redemption of `amount` takes the soonest-expiring points first; its pieces are kept
        for a refund, void or partial capture to restore."""
        if amount <= 0:
            return
        rules._check_int(amount, "amount")
        lots = self.lots.get(member_id, ())
        # The stored lots are sorted by rules._order and were checked when stored: the expired ones are a
        # prefix, the live ones follow soonest first; a spend walks only the expired prefix and the lots it
        # takes, and _spliced puts what is left of them before the rest (of a LotChain: its chunks shared).
        head = []  # the lots from the first through the last one taken
        start = 0  # of which the expired prefix
        pieces = []
        left = amount
        for lot in lots:
            if not left:
                break
            head.append(lot)
            if _expired(lot, now_us):
                start += 1
                continue
            piece = min(lot.amount, left)
            pieces.append(lot if piece == lot.amount else lot.replace(amount=piece))
            left -= piece
        end = len(head)
        kept = head[:start]
        if left:  # every live lot is taken: the rest comes from the never-expiring points
            total = sum(lot.amount for lot in lots)
            permanent = spendable - total
            require(permanent >= 0, f"member {member_id!r}: lots exceed its spendable points")
            if left > permanent:
                available = amount - left + permanent
                raise rules.InsufficientBalance(rules.ASSET_POINTS, available, amount)
            pieces.append(rules.Lot(_PERMANENT, left, None, ""))
        else:
            last = head[end - 1]
            remainder = last.amount - pieces[-1].amount
            if remainder:
                kept.append(last.replace(amount=remainder))
        if end > start:
            after = _spliced(lots, end, kept, ())
            self._replace_lots(member_id, lots, after, [lot.key for lot in head[start:end]])
        self._set(self.pieces, owner, tuple(pieces), "pieces")
        # every caller consumes for a transaction or hold the batch just created (a new id): its pieces
        # have no rows in Postgres yet
        self._dirty["new_pieces"].add(owner)

    def restore(
        self,
        member_id: str,
        owner: tuple[int, int],
        amount: int | None,
        spendable: int,
        now_us: int,
        grace_us: int,
        keep_as: tuple[int, int] | None = None,
    ) -> None:
        """Puts back `amount` (None: all) of what `owner` consumed; what is left stays with the owner, or
        moves to keep_as (a capture keeps what it captured)."""
        pieces = self.pieces.get(owner)
        if pieces is None:
            return  # consumed before lots were kept (or without a program): nothing to restore
        total = sum(piece.amount for piece in pieces)
        amount = total if amount is None else min(amount, total)
        rules._check_int(amount, "amount", 0, total)
        rules._check_int(grace_us, "grace_us")
        # rules.restore's semantics over the sorted lots, touching only the lots the pieces go back to
        # (a binary search each): last piece first; a piece of a live lot goes back to it, one whose lot
        # expired comes back expiring at now + grace; never-expiring points are implicit (not stored).
        before = self.lots.get(member_id, ())
        lots = tuple(before)  # (a restore is rare: its lots as one tuple, chained again after)
        left = list(pieces)
        touched = []
        remaining = amount
        while remaining:
            piece = left.pop()
            back = min(piece.amount, remaining)
            if back < piece.amount:
                left.append(piece.replace(amount=piece.amount - back))
            remaining -= back
            if piece.lot_id == _PERMANENT:
                continue
            expires = piece.expires_at_us if piece.live(now_us) else now_us + grace_us
            returned = piece.replace(amount=back, expires_at_us=expires)
            order = rules._order(returned)
            position = bisect.bisect_left(lots, order, key=rules._order)
            if position < len(lots) and lots[position].key == returned.key:
                existing = lots[position]
                require(existing.issuer_id == returned.issuer_id, f"lot {returned.lot_id} has two issuers")
                lots = lots[:position] + (existing.replace(amount=existing.amount + back),) + lots[position + 1 :]
            else:
                lots = lots[:position] + (returned,) + lots[position:]
            touched.append(returned.key)
        if touched:
            self._replace_lots(member_id, before, _chained(lots), touched)
        left = tuple(left)
        self._set(self.pieces, owner, None, "pieces")
        if left:
            self._set(self.pieces, keep_as or owner, left, "pieces")

    def _take(self, member_id: str, amount: int, spendable: int, now_us: int, own_lot: int) -> None:
        """Points taken back from the member by a refund of an earn (`spendable`: posted − held before
        it): the earn's own lot first, then the member's other live lots, never-expiring points last.
        The fast path checked the member holds `amount`; if lots past their expiry and not yet collected
        by the expiry job stand in the way, they are taken after all others (they were about to go)."""
        if amount <= 0 or not self.lots.get(member_id):
            return
        candidates = self._with_permanent(member_id, spendable)
        try:
            after = rules.take_back_earn(candidates, own_lot, amount, now_us)
        except rules.InsufficientBalance:
            order = sorted(candidates, key=lambda lot: (lot.lot_id != own_lot, not lot.live(now_us), rules._order(lot)))
            after = rules._take(candidates, order, amount)
        self._store_lots(member_id, after.lots)

    def expiring_within(self, member_id: str, now_us: int, window_us: int) -> list[tuple[int, int]]:
        return rules.expiring_within(self.lots.get(member_id, ()), now_us, window_us)

    def next_due_us(self) -> int | None:
        return self._due[0][0] if self._due else None

    def due(self, now_us: int, limit: int) -> list[tuple[str, rules.Lot]]:
        """Takes up to `limit` expired lots off their members: (member_id, lot) for the expiry job to
        post, soonest first."""
        taken: list[tuple[str, rules.Lot]] = []
        while self._due and self._due[0][0] <= now_us and len(taken) < limit:
            at_us, member_id = heapq.heappop(self._due)
            lots = self.lots.get(member_id, ())
            if not lots or lots[0].expires_at_us != at_us:
                # stale: the member's soonest expiry moved, and its entry there is on the heap (the
                # invariant). Skipped even when the member has lots due, so members expire in the order
                # of their soonest expiries whatever stale entries a path left (the kernel and the
                # per-operation path leave different ones; the transaction ids must not differ)
                continue
            # the expired prefix, as much of it as the limit leaves room for
            room = limit - len(taken)
            pieces = []
            more = False  # due lots left for the next batch
            for lot in lots:
                if not _expired(lot, now_us):
                    break
                if len(pieces) == room:
                    more = True
                    break
                pieces.append(lot)
            if not pieces:
                continue  # a stale entry: the lot was spent, restored or expired already
            after = _spliced(lots, len(pieces), (), ())
            self._replace_lots(member_id, lots, after, [lot.key for lot in pieces])
            if more:  # their entry stays
                heapq.heappush(self._due, (after[0].expires_at_us, member_id))
            taken += [(member_id, piece) for piece in pieces]
        return taken

    def expire_member(self, member_id: str, now_us: int) -> list[rules.Lot]:
        """Takes a member's expired lots off it (before an operation that spends its points)."""
        lots = self.lots.get(member_id, ())
        due = []  # the expired prefix
        for lot in lots:
            if not _expired(lot, now_us):
                break
            due.append(lot)
        if due:
            self._replace_lots(member_id, lots, _spliced(lots, len(due), (), ()), [lot.key for lot in due])
        return due

    def _replace_lots(self, member_id: str, before: MemberLots, after: MemberLots, keys) -> None:
        """The member's lots become `after` (sorted), changed only at `keys`; the expiry heap gets an
        entry when the member's soonest expiry changes (as _store_lots)."""
        self._touch(member_id, keys)
        self._set(self.lots, member_id, after or None, "lots")
        self._schedule(member_id, before, after)

    def _schedule(self, member_id: str, before: Sequence[rules.Lot], after: Sequence[rules.Lot]) -> None:
        """The expiry heap's invariant (see _due): an entry at the member's soonest expiry whenever its
        lots (sorted, soonest first) go from `before` to `after` and that soonest changes."""
        if after:
            soonest = after[0].expires_at_us
            if soonest is not None and (not before or before[0].expires_at_us != soonest):
                heapq.heappush(self._due, (soonest, member_id))

    # --- member administration: a merge (processor/member_postings.py) ---

    def lots_collide(self, source: str, target: str) -> bool:
        """Whether a lot of `source` has the key of one of `target`'s (a merge could not keep both)."""
        keys = {lot.key for lot in self.lots.get(target, ())}
        return any(lot.key in keys for lot in self.lots.get(source, ()))

    def merge_members(self, source: str, target: str) -> None:
        """`source`'s expiry lots and qualifying points become `target`'s (its points move in the same
        batch): the lots keep their expiry and issuer; the qualifying points count toward target's level."""
        source_lots = self.lots.get(source, ())
        if source_lots:
            merged = tuple(sorted((*self.lots.get(target, ()), *source_lots), key=rules._order))
            require(len({lot.key for lot in merged}) == len(merged), f"merge of {source!r}: a lot key collides")
            for member_id in (source, target):
                self._lots_touched[member_id] = None  # flush() compares each member's whole lots
            self._set(self.lots, source, None, "lots")
            self._set(self.lots, target, _chained(merged), "lots")
            if merged[0].expires_at_us is not None:
                heapq.heappush(self._due, (merged[0].expires_at_us, target))
        moved = self.member(source)
        if moved.qualifying or moved.day_buckets:
            kept = self.member(target)
            buckets = dict(kept.day_buckets)
            for day, amount in moved.day_buckets:
                buckets[day] = buckets.get(day, 0) + amount
            self._set(
                self.members,
                target,
                kept.replace(
                    qualifying=kept.qualifying + moved.qualifying,
                    day_buckets=tuple(sorted((d, a) for d, a in buckets.items() if a)),
                ),
                "members",
            )
            self._set(self.members, source, moved.replace(qualifying=0, day_buckets=()), "members")

    def credit_lots(self, member_id: str, lots: list[rules.Lot]) -> None:
        """Lots of their own keys credited to the member (a transfer's receiver gets the expiries of the
        points it received, processor/member_postings.py); each key must be new to the member."""
        lots = [lot for lot in lots if lot.amount > 0]
        if not lots:
            return
        before = self.lots.get(member_id, ())
        after = tuple(sorted((*before, *lots), key=rules._order))
        require(len({lot.key for lot in after}) == len(after), f"member {member_id!r}: a credited lot key exists")
        self._replace_lots(member_id, before, _chained(after), [lot.key for lot in lots])

    def check_lots(self, ledger) -> None:
        """For every member whose lots changed since the last flush: Σ lots ≤ posted − held (the lots
        are a part of the member's spendable points), posted and held as the fast path's `ledger` has
        them (its member_slot and balance). The loop is fastpath/kernel_rows.pyx's lots_checked with the
        compiled fast path (~2.4k instructions an operation in Python, most of it a call of
        member_slot and of balance a member: callgrind), its twin's with POINTS_FASTPATH=python."""
        failed = _lots_checked(self._dirty["lots"], self.lots, self._lot_totals, self.sum_kept_from_lots, ledger)
        if failed is not None:  # the message only on a failure: this runs for every member a batch changed
            member_id, total, posted, held = failed
            require(False, f"member {member_id!r}: lots {total} exceed posted {posted} − held {held}")


# check_lots keeps a member's sum (ProgramState._lot_totals) from this many lots: a short tuple is summed
# faster than the entry costs in memory for every member with a few lots
_SUM_KEPT_FROM_LOTS = 16
_FIRST = operator.itemgetter(0)


def _expired(lot: rules.Lot, now_us: int) -> bool:
    """Past its expiry at now_us (the lots sorted by rules._order: a prefix of them)."""
    return lot.expires_at_us is not None and lot.expires_at_us <= now_us


def _key_order(key: tuple[int, int | None]) -> tuple:
    return (key[1] is None, key[1] or 0, key[0])


def _find(lots: MemberLots, key: tuple[int, int | None]) -> rules.Lot | None:
    """The lot keyed `key` in lots sorted by rules._order (a binary search of the chunks' last lots, then
    of the chunk), or None."""
    if not lots:
        return None
    order = _key_order(key)
    chunks = lots.chunks if type(lots) is LotChain else (lots,)
    index = bisect.bisect_left(chunks, order, key=_last_order)  # the first chunk not all before it
    if index == len(chunks):
        return None
    chunk = chunks[index]
    position = bisect.bisect_left(chunk, order, key=rules._order)
    if position < len(chunk) and chunk[position].key == key:
        return chunk[position]
    return None


def _last_order(chunk: tuple[rules.Lot, ...]) -> tuple:
    return rules._order(chunk[-1])
