"""Plain earns and redeems under a program, decided by one compiled call per run (issue 14 stage 2).

The state machine's batch loop (processor/state_machine.py) gathers consecutive operations that this
module can decide into a run: plain EARN and REDEEM (no vouchers) of a version `kernel_supports()`
accepts, of members whose rules need nothing the kernel lacks (no referral bonus still to pay, an
acquirer the service knows, no lot past its expiry waiting to be collected, no lot that would sort after
a new one). Anything else ends the run and goes through the per-operation rules path as before, so the
order of the batch is kept.

`Ledger.apply_earn_redeem` (fastpath/_core.pyx, twin in fastpath/_reference.py) decides, over int64
columns: the member's level and multiplier before each earn, the earn's total (base + uplift), the fee,
the balance checks, qualifying points, levels reached and level changes, the acquiring reward, the
transaction ids in the order the per-operation path takes them, and the lots: each earn's new lot and
what each redeem takes, soonest-expiring first (ties by lot id), then never-expiring points. This module
builds the columns (one tier row per member of the run, read from ProgramState; of a member's lots only
those its redeems of the run can reach, plus one) and turns the kernel's rows into the batch's journal
rows, outcomes and ProgramState changes, exactly as the per-operation path does
(tests/unit/test_rules_kernel_differential.py holds the two paths and the twin to that).

ProgramState stays the single truth: the kernel's tier and lot columns live for one run, and what the run
changed is written back once per member through ProgramState's undo-logged setters (with the touched lot
keys and expiry-heap entries credit_lot and consume would have left), so rollback, flush and the rare
Python paths see one state. The write-back hands ProgramState the rows flush() writes for each member's
lots (keys gone, lots new or changed), which the run knows from its pool: flush() uses them when the run
was the member's only change since the last flush, rather than looking each touched key up again.
"""

from __future__ import annotations

import array
import dataclasses
from typing import Any

import fastpath
from fastpath.kernel_rows_reference import KernelRowsError
from processor import domain, rules
from processor.domain import Code, InvariantViolation, Method, Operation, Outcome
from processor.program import (
    NO_RULES,
    OWNER_TRANSACTION,
    PERMANENT_LOT_ID,
    EarnRecord,
    KernelLots,
    MemberLots,
    MemberRules,
)
from processor.machine_parts import MachineParts
from processor.store import BatchWrite

# each member's lots after a run, in C with the compiled fast path (fastpath/kernel_rows.pyx, which says
# what it saves and what is left); POINTS_FASTPATH=python runs its twin
# (and the run's operation columns, each Operation's slots read by offset; the tier row of an operation's
# member, whose twin is RulesKernelMixin._kernel_member below)
_compiled_kernel_member: Any = None
_compiled_kernel_lots: Any = None
if fastpath.IMPLEMENTATION == "cython":
    from fastpath.kernel_rows import kernel_lots as _compiled_kernel_lots
    from fastpath.kernel_rows import kernel_member as _compiled_kernel_member
    from fastpath.kernel_rows import lots_after_run as _lots_after_run
    from fastpath.kernel_rows import operation_columns as _operation_columns
else:
    from fastpath.kernel_rows_reference import lots_after_run as _lots_after_run
    from fastpath.kernel_rows_reference import operation_columns as _operation_columns

# The ProgramVersion fields the kernel takes whatever their value (levels are checked one by one). A
# version whose other fields differ from their defaults (a new option added to rules.py) goes down the
# per-operation path until the kernel learns it.
_FIELDS_ANY = frozenset(
    {
        "program_id",
        "version",
        "effective_from_us",
        "expiry_period_us",  # lots are ProgramState's
        "restore_grace_us",  # used by restores, which are not kernel operations
        "acquiring_share_bps",
        "merchant_terms",  # acquiring share per acquirer (and conversion rates, not used here)
        "referral_bonus_point_units",  # a member with a bonus still to pay goes the Python path
        "referral_minimum_purchase",
        "operator_store_merchant_id",  # voucher spends are not kernel operations
        "member_verification",  # decided before queueing (Operation.refusal)
        "verification_failures_max",
        "verification_lockout_seconds",
    }
)


def kernel_supports(version: rules.ProgramVersion | None) -> bool:
    """True when every rule of `version` that an earn or redeem meets is one the kernel implements:
    levels without bonuses (a bonus credits the member a transaction of its own), qualifying points
    in total (no tier window), no promotions, no dividend pool, no spending caps."""
    if version is None or not _defaults_beyond(version, _FIELDS_ANY | {"levels"}):
        return False
    names = [level.name for level in version.levels]
    return (
        0 < len(version.levels) <= fastpath.RULES_LEVELS_MAX
        and len(set(names)) == len(names)
        and all(_defaults_beyond(level, _LEVEL_FIELDS) for level in version.levels)
        and all(_defaults_beyond(terms, _TERMS_FIELDS) for terms in version.merchant_terms)
    )


# Of a level, the kernel implements its threshold and multiplier (no bonus: a bonus is a transaction of
# its own); of merchant terms, the acquiring share (a conversion rate is not used by earns or redeems).
_LEVEL_FIELDS = frozenset({"name", "threshold_point_units", "multiplier_bps"})
_TERMS_FIELDS = frozenset({"merchant_id", "acquiring_share_bps", "conversion_rate"})


def _defaults_beyond(value: Any, implemented: frozenset[str]) -> bool:
    """Every field of the dataclass `value` outside `implemented` has its default (a field with no
    plain default, e.g. one added with a default_factory, counts as set)."""
    return all(
        field.name in implemented or getattr(value, field.name) == field.default for field in dataclasses.fields(value)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class KernelTables:
    """A version's levels as the kernel's columns, and its acquiring shares by acquirer."""

    version: rules.ProgramVersion
    level_threshold: array.array[int]
    level_multiplier_bps: array.array[int]
    level_names: tuple[str, ...]
    acquiring_bps: dict[str, int]

    @classmethod
    def of(cls, version: rules.ProgramVersion) -> KernelTables:
        return cls(
            version,
            array.array("q", [level.threshold_point_units for level in version.levels]),
            array.array("q", [level.multiplier_bps for level in version.levels]),
            tuple(level.name for level in version.levels),
            {},
        )

    def acquiring_share_bps(self, acquirer_id: str) -> int:
        share = self.acquiring_bps.get(acquirer_id)
        if share is None:
            share = self.acquiring_bps[acquirer_id] = self.version.acquiring_share_bps_for(acquirer_id)
        return share


class EarnRedeemRun:
    """The operations of one run and the tier row of each of its members. The operations' columns are
    built in bulk when the run is decided (_kernel_run), not appended field by field as they come."""

    __slots__ = (
        "positions",
        "ops",
        "slots",
        "rows",
        "fee_bps",
        "tier_rows",
        "tier_members",
        "tier_qualifying",
        "tier_reached",
        "tier_acquirer",
        "tier_acquiring_bps",
        "tier_demand",
        "program_tables",
    )

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.ops: list[Operation] = []
        self.slots: list[int] = []  # each operation's member slot
        self.rows: list[int] = []  # each operation's tier row
        self.fee_bps: list[int] = []  # each operation's merchant fee (issued for an earn, redeemed else)
        self.tier_rows: dict[str, int] = {}
        # per tier row: (member id, its rules and its lots when the run began, () for none)
        self.tier_members: list[tuple[str, MemberRules, MemberLots]] = []
        # per tier row, the kernel's tier columns (made int64 arrays when the run is decided)
        self.tier_qualifying: list[int] = []
        self.tier_reached: list[int] = []
        self.tier_acquirer: list[int] = []
        self.tier_acquiring_bps: list[int] = []
        self.tier_demand: list[int] = []  # point-units the member's redeems of the run ask for
        # ProgramState's members and lots tables, as the compiled _kernel_member (fastpath/kernel_rows.pyx)
        # read them on the run's first member (a run is decided within one batch, which replaces neither)
        self.program_tables: tuple[dict[str, MemberRules], dict[str, MemberLots]] | None = None

    def __len__(self) -> int:
        return len(self.positions)


# What a kernel run builds per member: compiled values (fastpath/records.pyx), whose
# constructors run in C
_new_member_rules = MemberRules  # _MEMBER_FIELDS checks its fields' order
_EARN, _OP_EARN, _OP_REDEEM = Method.EARN, fastpath.OP_EARN, fastpath.OP_REDEEM
_KIND_ACQUIRING_REWARD = rules.KIND_ACQUIRING_REWARD
_column = fastpath.Ledger.int64_column


# the value types the compiled rows are built as (Ledger.earn_redeem_rows)
_CLASSES = (Outcome, Code.OK, rules.Lot, rules.Earn, EarnRecord)


class RulesKernelMixin(MachineParts):
    """The kernel path of LedgerStateMachine for plain earns and redeems under a program."""

    _kernel_tables: KernelTables | None  # set by LedgerStateMachine

    def _tables(self, version: rules.ProgramVersion | None) -> KernelTables | None:
        """The kernel's tables of `version`, or None when the kernel does not implement it."""
        tables = self._kernel_tables
        if tables is not None and tables.version is version:
            return tables
        if version is None or not kernel_supports(version):
            return None
        self._kernel_tables = tables = KernelTables.of(version)
        return tables

    def _kernel_member(self, run: EarnRedeemRun, tables: KernelTables, op: Operation, now_us: int) -> int:
        """The tier row of op's member in the run (added on its first operation), or -1 when the
        member's rules need the per-operation path. With the compiled fast path the method is
        fastpath/kernel_rows.pyx's kernel_member (bound below the class), which does the same in C: this
        is its twin (tests/unit/test_kernel_rows.py compares them)."""
        member_id = op.member_id
        row = run.tier_rows.get(member_id)
        if row is not None:
            return row
        program = self.program
        member = program.members.get(member_id) or NO_RULES
        if member.referrer_id and not member.referral_paid:
            return -1  # its first qualifying earn pays the referrer a bonus: a transaction of its own
        acquirer_slot = -1
        share = 0
        if member.acquirer_id is not None:
            acquirer = self.merchants.by_id.get(member.acquirer_id)
            if acquirer is None:
                return -1  # the per-operation path refuses what it cannot post
            acquirer_slot = acquirer.merchant_slot
            share = tables.acquiring_share_bps(member.acquirer_id)
        lots = program.lots.get(member_id, ())
        if lots:
            soonest, last = lots[0].expires_at_us, lots[-1].expires_at_us
            if soonest is not None and soonest <= now_us:
                return -1  # a lot past its expiry: the per-operation path posts its expiry first
            period = tables.version.expiry_period_us
            if period is not None and (last is None or last > now_us + period):
                return -1  # a new lot would not sort last (a restored lot outlives it): credit_lot inserts
        row = len(run.tier_members)
        run.tier_rows[member_id] = row
        run.tier_members.append((member_id, member, lots))
        run.tier_demand.append(0)
        run.tier_qualifying.append(member.qualifying)
        run.tier_reached.append(member.levels_reached)
        run.tier_acquirer.append(acquirer_slot)
        run.tier_acquiring_bps.append(share)
        return row

    def _kernel_run(
        self,
        run: EarnRedeemRun,
        tables: KernelTables,
        write: BatchWrite,
        now_us: int,
        outcomes: list[Outcome | None],
    ) -> None:
        """Decides the run in one kernel call and turns its rows into journal rows, outcomes and
        program state, in the run's order."""
        count = len(run)
        if not count:
            return
        version = tables.version
        ops = run.ops
        # the operations' columns in one pass over the run (in C with the compiled fast path, the slots read
        # by offset: a map of an attrgetter a column cost ~150 instructions an item), the others made
        # arrays by _column (in C: array.array("q", ...) parses each item as an argument)
        column = _column
        method, merchant_slots, points, purchases = _operation_columns(ops, _EARN, _OP_EARN, _OP_REDEEM)
        earns = method.count(_OP_EARN)
        lots_in, heads, tails, totals, prefixes = self._kernel_lots(run)
        pool = len(lots_in)
        capacity = pool + earns
        lot_amount = column([lot.amount for lot in lots_in])
        lot_amount.frombytes(bytes(8 * earns))
        lot_expires = column([lot.expires_at_us or 0 for lot in lots_in])
        lot_expires.frombytes(bytes(8 * earns))
        lot_next = array.array("q", [-1]) * capacity
        for row in range(len(heads)):  # each member's passed lots in a chain, soonest first
            head, tail = heads[row], tails[row]
            if head >= 0:
                lot_next[head:tail] = column(range(head + 1, tail + 1))
        pieces_capacity = capacity + 2 * (count - earns)
        piece_lot, piece_amount = (
            array.array("q", bytes(8 * pieces_capacity)),
            array.array("q", bytes(8 * pieces_capacity)),
        )
        zeros = bytes(8 * count)
        columns = [array.array("q", zeros) for _ in range(14)]
        (
            statuses,
            createds,
            posteds,
            availables,
            totals_out,
            fees,
            levels_before,
            levels_after,
            rewards,
            reward_ids,
            new_lots,
            piece_starts,
            piece_ends,
            _dues,  # the kernel's per-redeem soonest expiry: unused (the heap entry is decided per run)
        ) = columns
        period = version.expiry_period_us
        new_lot_expires_at_us = now_us + period if period is not None else 0
        slots, tiers = column(run.slots), column(run.rows)
        qualifying, reached = column(run.tier_qualifying), column(run.tier_reached)  # updated by the kernel
        ids = self.ids
        ids.next_transaction_id, _, _ = self.ledger.apply_earn_redeem(
            method,
            slots,
            merchant_slots,
            points,
            purchases,
            column(run.fee_bps),
            tiers,
            qualifying,
            reached,
            column(run.tier_acquirer),
            column(run.tier_acquiring_bps),
            heads,
            tails,
            totals,
            lot_amount,
            lot_expires,
            lot_next,
            pool,
            tables.level_threshold,
            tables.level_multiplier_bps,
            new_lot_expires_at_us,
            ids.next_transaction_id,
            *columns,
            piece_lot,
            piece_amount,
        )
        ledger, program = self.ledger, self.program
        operator = self.operator_accounts
        tier_members = run.tier_members
        pool_lots: list[rules.Lot | None] = [*lots_in, *([None] * earns)]
        # tier row -> the kernel's level index after the row's last applied earn (the member's level:
        # qualifying points change only on earns; -1: no earn), for the tier write-back
        earned_level = array.array("q", [-1]) * len(tier_members)
        # tier rows whose redeems took pieces (of lots, or of never-expiring points): which lots they took
        # is read back from the pool (a lot taken from has less left than it had)
        taken_rows: set[int] = set()
        new_by_row: dict[int, list[int]] = {}  # tier row -> its new lots in the pool, in order
        earn_records: list[tuple[int, EarnRecord]] = []  # recorded in ProgramState once, after the rows
        tier_events: list[tuple[int, str, str, str]] = []
        consumed: list[tuple[tuple[int, int], tuple[rules.Lot, ...]]] = []
        spent: dict[str, int] = {}  # member -> point-units its redeems of the run took (one velocity bucket)
        # the run's journal rows, outcomes, earn records, new lots and pieces, in the run's order, built by
        # the compiled module in one call (a loop here cost ~3 µs an operation: loadtest/bench_state_machine)
        try:
            failed = ledger.earn_redeem_rows(
                ops,
                run.positions,
                method,
                slots,
                tiers,
                columns,
                piece_lot,
                piece_amount,
                pool_lots,
                self.merchants.by_id,
                [member[1].acquirer_id for member in tier_members],
                tables.level_names,
                (
                    version.version,
                    now_us,
                    new_lot_expires_at_us,
                    operator[domain.ACCOUNT_OPERATOR_FEE_REVENUE],
                    operator[rules.ACCOUNT_OPERATOR_TIER_REWARDS],
                    operator[rules.ACCOUNT_OPERATOR_ACQUIRING],
                    _KIND_ACQUIRING_REWARD,
                    OWNER_TRANSACTION,
                    PERMANENT_LOT_ID,
                ),
                _CLASSES,
                write.transactions,
                write.entries,
                outcomes,
                earned_level,
                taken_rows,
                new_by_row,
                earn_records,
                tier_events,
                consumed,
                spent,
            )
        except fastpath.LedgerInvariantError as error:
            raise InvariantViolation(f"a kernel run's rows: {error}") from error
        for index in failed:  # refused by the kernel (not enough points): no rows, the ledger's refusal
            outcomes[run.positions[index]] = self._applied(
                ops[index],
                write,
                now_us,
                createds[index],
                statuses[index],
                run.slots[index],
                0,
                posteds[index],
                availables[index],
                0,
            )
        program.recorded_by_kernel(earn_records, tier_events, consumed, list(spent.items()), now_us)
        # each member's lots as the run left them: what it passed (less what was taken), the lots it
        # did not need, the run's new lots (all sorted: new lots expire last, and their ids, the earns'
        # transaction ids, are above every older lot's): of a member with many lots, a new LotChain that
        # shares the chunks of the old one the run neither passed nor appended to. Its new lots' keys are touched and created; one
        # expiry heap entry for all of them (they expire at one instant; consume()'s entries follow from
        # its redeems). Built with the rows flush() writes for the member (the keys gone, the lots new or
        # changed, in key order: what ProgramState._lots_changed would find), so flush() need not look
        # each key up again when the run is the member's only change since the last flush.
        try:
            lots_rows: list[KernelLots] = _lots_after_run(
                taken_rows, new_by_row, tier_members, prefixes, pool_lots, lot_amount
            )
        except KernelRowsError as error:
            raise InvariantViolation(f"a kernel run's lots: {error}") from error
        # the run's tier state, once per member that earned (qualifying in total: no day buckets; its
        # level is the one the kernel found after the member's last earn of the run)
        names = tables.level_names
        members = [
            (
                member_id,
                _new_member_rules(  # a replace()'s result, built by position, fields in _MEMBER_FIELDS' order
                    rules_before.acquirer_id,
                    rules_before.referrer_id,
                    rules_before.referral_paid,
                    names[level],
                    reached[row],
                    qualifying[row],
                    (),
                ),
            )
            for row, ((member_id, rules_before, _), level) in enumerate(zip(tier_members, earned_level))
            if level >= 0
        ]
        program.written_by_kernel(lots_rows, members)

    def _kernel_lots(
        self, run: EarnRedeemRun
    ) -> tuple[list[rules.Lot], array.array[int], array.array[int], array.array[int], list[tuple[int, int]]]:
        """The lots the run's redeems may take, as the kernel's pool: per member that redeems, its lots
        soonest first until they cover what its redeems ask (all of them if they do not), plus one
        more (the member's soonest lot once those are taken). Returns the pool's lots, each tier row's
        head, tail and total (Σ of the member's lots, or -1 when not all were passed) and its (start,
        count) in the pool. With the compiled fast path the method is fastpath/kernel_rows.pyx's
        kernel_lots (bound below the class): this is its twin (tests/unit/test_kernel_rows.py)."""
        pool: list[rules.Lot] = []
        rows = len(run.tier_members)
        heads, tails, totals = [-1] * rows, [-1] * rows, [-1] * rows
        prefixes: list[tuple[int, int]] = []
        for row, (_, _, lots) in enumerate(run.tier_members):
            demand = run.tier_demand[row]
            start = len(pool)
            if not lots:
                totals[row] = 0
                prefixes.append((start, 0))
                continue
            if not demand:
                prefixes.append((start, 0))
                continue
            covered = 0
            passed = 0
            for lot in lots:
                pool.append(lot)
                passed += 1
                covered += lot.amount
                if covered >= demand:
                    break
            if passed < len(lots):
                pool.append(lots[passed])
                passed += 1
                covered += lots[passed - 1].amount
            heads[row], tails[row] = start, start + passed - 1
            totals[row] = covered if passed == len(lots) else -1
            prefixes.append((start, passed))
        return pool, _column(heads), _column(tails), _column(totals), prefixes


# a member new to the run cost ~4.4k instructions in _kernel_member, ~1.3k compiled; the pool ~0.9k an
# operation in _kernel_lots (callgrind)
RulesKernelMixin._kernel_member_twin = RulesKernelMixin._kernel_member  # type: ignore[attr-defined]
RulesKernelMixin._kernel_lots_twin = RulesKernelMixin._kernel_lots  # type: ignore[attr-defined]
if _compiled_kernel_member is not None:
    RulesKernelMixin._kernel_member = _compiled_kernel_member  # type: ignore[method-assign]
    RulesKernelMixin._kernel_lots = _compiled_kernel_lots  # type: ignore[method-assign]


# The fields of MemberRules the kernel's write-back sets (it builds the value by position: a replace
# by keyword costs more); a field added to MemberRules must be added there too, or this fails at import.
_MEMBER_FIELDS = ("acquirer_id", "referrer_id", "referral_paid", "level", "levels_reached", "qualifying", "day_buckets")
if MemberRules._fields != _MEMBER_FIELDS:
    raise ImportError("processor.rules_kernel: MemberRules has fields the kernel's write-back does not set")
