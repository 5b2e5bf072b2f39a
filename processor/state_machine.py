"""The ledger state machine: applies a batch of operations to the in-memory ledger and produces their
outcomes and the batch's durable record (a BatchWrite), synchronously, with no I/O and no await.

The committer (processor/pipeline.py) owns the queue, the reads a batch needs from Postgres, the write
and the answers; this class owns the state a batch changes: the fast path's Ledger (balances, holds,
resident transactions, each with an undo log), the program rules' ProgramState, the merchants, the id
allocator, the operator's account ids, the account ids reserved for accounts a batch opens, and the
per-merchant quotas of new members and holds. The money rules themselves are in processor/rules.py,
processor/program.py and fastpath.

A batch is applied by apply(), which opens an undo batch on the ledger and the program state; the
committer then calls commit() once the batch is durable, or rollback() (every open batch) after a failed
write. Two batches may be open at once: the one being written and the next, applied on top of it.
"""

from __future__ import annotations

import array
import dataclasses
import gc
from typing import Any


import fastpath
from processor import domain, metrics, rules, velocity
from processor.config import Settings
from processor.domain import Code, InvariantViolation, Method, Operation, Outcome, Rejection, require
from processor.program import OWNER_HOLD, OWNER_TRANSACTION, EarnRecord, ProgramState, SplitRecord, VoucherHold
from processor.outcomes import ledger_rejection
from processor.member_postings import METHODS as MEMBER_METHODS
from processor.member_postings import MemberPostingsMixin, MemberRegistry
from processor.postings import PostingsMixin, _entries
from processor.rules_kernel import EarnRedeemRun, KernelTables, RulesKernelMixin
from processor.quotas import MerchantQuotas
from processor.store import BatchWrite, HoldRow, MerchantRow, StoredOutcome, TransactionRow, from_micros


class LedgerStateMachine(PostingsMixin, MemberPostingsMixin, RulesKernelMixin):
    def __init__(self, settings: Settings, quotas: MerchantQuotas | None = None):
        self.settings = settings
        self.merchants = Merchants([])
        self.ledger: Any = None  # a fastpath.Ledger, set by recovery (or a test)
        self.program = ProgramState()  # the program rules' state, beside the fast path
        self.ids = IdAllocator(1, 1)
        self.operator_accounts: dict[str, int] = {}
        # account ids taken from Postgres's accounts sequence for members the next batches create
        self.account_ids: list[int] = []
        # rule transactions with no member (a merchant's dividend or voucher spend) that a refund of the
        # batch names: transaction id -> merchant id (set by load_prefetched)
        self.not_refundable: dict[int, str] = {}
        self.quotas = quotas if quotas is not None else MerchantQuotas(settings)
        self.members = MemberRegistry()  # frozen and closed members, reversals (processor/member_postings.py)
        self.fee_version: rules.ProgramVersion | None = None  # the version in force for the batch being applied
        self._one = ([array.array("q", [0]) for _ in range(7)], [array.array("q", [0]) for _ in range(6)])
        # the compiled rules path for plain earns and redeems (processor/rules_kernel.py); False sends
        # them through the per-operation rules path (the differential tests compare the two)
        self.rules_kernel = True
        self._kernel_tables: KernelTables | None = None
        # the fast path's first pass and plain rows (Ledger.first_pass_plain, first_pass_run, plain_rows)
        # for the common earn and redeem; False has the batch loop and _applied decide every operation
        # (tests/unit/test_first_pass.py compares the two)
        self.first_pass = True

    # --- the batch ---

    def apply(
        self,
        batch: list[Operation],
        stored: dict[tuple[str, str], StoredOutcome],
        now_us: int,
        expired: list[int] | None = None,
        dividends: list[Any] | None = None,
    ) -> tuple[list[Outcome], BatchWrite]:
        """Applies a batch at `now_us` inside a new undo batch (nested on any batch still open) and returns
        each operation's outcome, aligned by index, and the batch's durable record. `stored`: the stored
        outcomes of the batch's idempotency keys, (merchant_id, key) -> record (a retry replays it);
        `expired`: holds already released in memory whose rows follow with this batch; `dividends`: a
        chunk of a decided round's allocations to post. On any exception the undo batch is rolled back
        and the exception propagates."""
        # The cyclic collector waits until the batch is applied: the batch makes ~15 container objects an
        # operation (rows, outcomes, records) that all live until it is written, so collecting while it
        # is applied only walks them again and again, and promotes them into the older generations whose
        # passes walk the ledger's whole state. Measured (loadtest/bench_state_machine.py, program in
        # force): 28 -> 19 µs/op of CPU for the apply; the collections move to after it, one per batch.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._apply(batch, stored, now_us, expired, dividends)
        finally:
            if collecting:
                gc.enable()

    def _apply(
        self,
        batch: list[Operation],
        stored: dict[tuple[str, str], StoredOutcome],
        now_us: int,
        expired: list[int] | None,
        dividends: list[Any] | None,
    ) -> tuple[list[Outcome], BatchWrite]:
        settings, ledger = self.settings, self.ledger
        write = BatchWrite(created_at=from_micros(now_us))
        self.fee_version = self.program.version(now_us)  # its star rebates apply to every fee of the batch
        ledger.begin()
        self.program.begin()
        self.members.begin()
        try:
            write.expired_holds = list(expired or ()) + ledger.expire_holds(
                now_us, settings.holds_expired_per_batch_max
            )
            for authorization_id in write.expired_holds:
                self._restore_hold(authorization_id, now_us)
            for authorization_id in self.program.voucher_holds_due(now_us, settings.holds_expired_per_batch_max):
                self.program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_EXPIRED)
            self._expire_lots(write, now_us)
            if dividends:
                self._post_dividends(write, dividends, now_us)
            outcomes = self._apply_batch(batch, stored, write, now_us)
            # each decided operation's record, in compiled code (a replay keeps its record; a refusal
            # about the service's state is not one): its request and fields as they are, their JSON
            # made once for the batch by its append (processor/idempotency_records.encode)
            fastpath.Ledger.idempotency_records(batch, outcomes, stored, NOT_RECORDED, Code.OK, None, write.idempotency)
            self.program.check_lots(ledger)
            write.rules = self.program.flush()
            write.last_transaction_id = self.ids.next_transaction_id - 1
            write.last_authorization_id = self.ids.next_authorization_id - 1
            _check_balanced(write)
        except BaseException:
            self.rollback_newest()
            raise
        return outcomes, write

    def commit(self) -> None:
        """The oldest open batch is durable: its undo log is dropped."""
        self.ledger.commit()
        self.program.commit()
        self.members.commit()

    def rollback_newest(self) -> None:
        """Undoes the newest open batch (one that failed while being applied)."""
        self.ledger.rollback_newest()
        self.program.rollback_newest()
        self.members.rollback_newest()

    def rollback(self) -> None:
        """Undoes every open batch (after a failed write): the state is what Postgres holds."""
        self.ledger.rollback()
        self.program.rollback()
        self.members.rollback()

    def forget_resolved(self) -> None:
        """Drops resolved holds and resident transactions (no batch may be open): a later batch that
        names one has it prefetched from Postgres again."""
        self.ledger.forget_resolved()
        self.program.forget_resolved_holds()
        self.program.earns.clear()  # earn records come back by prefetch when a refund needs one

    def balance(self, member_id: str) -> tuple[int, int] | None:
        """A member's (posted, held) point-units in memory (uncommitted batches included), or None."""
        slot = self.ledger.member_slot(member_id)
        return None if slot < 0 else tuple(self.ledger.balance(slot))

    # --- what a batch needs from Postgres ---

    def missing(self, batch: list[Operation]) -> tuple[set[int], set[int], set[int], set[int]]:
        """What the batch refers to that is not resident, for the committer to read before apply():
        (hold ids, split-tender hold ids, transaction ids whose earn or split record a refund needs,
        transaction ids)."""
        ledger, program = self.ledger, self.program
        hold_ids = {
            op.authorization_id
            for op in batch
            if (op.method is _CAPTURE or op.method is _VOID) and not ledger.has_hold(op.authorization_id)
        }
        transaction_ids = {
            op.transaction_id for op in batch if op.method is _REFUND and not ledger.has_transaction(op.transaction_id)
        }
        voucher_hold_ids: set[int] = set()
        record_ids: set[int] = set()
        if program.program is not None:
            # resolved split-tender holds forgotten since (open ones are all resident)
            voucher_hold_ids = {a for a in hold_ids if a not in program.voucher_holds}
            record_ids = {
                op.transaction_id
                for op in batch
                if op.method is _REFUND
                and op.transaction_id not in program.earns
                and op.transaction_id not in program.splits
            }
        return hold_ids, voucher_hold_ids, record_ids, transaction_ids

    def load_prefetched(
        self,
        now_us: int,
        holds: list[HoldRow],
        voucher_holds: list[tuple[int, VoucherHold]],
        earns: list[tuple[int, EarnRecord]],
        splits: list[tuple[int, SplitRecord]],
        transactions: list[TransactionRow],
    ) -> list[int]:
        """Loads what missing() named, as read from Postgres (committed state: outside any undo batch).
        Returns the ids of the holds that were open in Postgres and have expired since: their rows follow
        with the next batch."""
        ledger, program, merchants = self.ledger, self.program, self.merchants.by_id
        self.not_refundable = {}
        expired: list[int] = []
        for hold in holds:
            status = hold.status
            if status == fastpath.HOLD_OPEN and hold.expires_at_us <= now_us:
                status = fastpath.HOLD_STATUS_EXPIRED
                expired.append(hold.authorization_id)
            ledger.load_hold(
                hold.authorization_id,
                ledger.member_slot(hold.member_id),
                merchants[hold.merchant_id].merchant_slot,
                hold.amount,
                hold.expires_at_us,
                status,
            )
        for authorization_id, voucher_hold in voucher_holds:
            program.load_voucher_hold(authorization_id, voucher_hold)
        for transaction_id, record in earns:
            program.load_earn(transaction_id, record)
        for transaction_id, split in splits:
            program.splits[transaction_id] = split
        for t in transactions:
            merchant = merchants.get(t.merchant_id)
            member_slot = ledger.member_slot(t.member_id)
            refunded_split = program.splits.get(t.transaction_id)
            if t.kind == rules.KIND_SPLIT_REDEEM and refunded_split is not None and refunded_split.points:
                # its points part, as the fast path refunds it
                if merchant is None:
                    raise InvariantViolation(f"transaction {t.transaction_id} of unknown merchant {t.merchant_id!r}")
                points_refunded = refunded_split.refunded - rules.proportional_share(
                    refunded_split.vouchers, refunded_split.vouchers + refunded_split.points, 0, refunded_split.refunded
                )
                ledger.load_transaction(
                    t.transaction_id,
                    fastpath.KIND_REDEEM,
                    member_slot,
                    merchant.merchant_slot,
                    refunded_split.points,
                    points_refunded,
                )
                continue
            if t.kind > fastpath.KIND_REFUND_EARN:
                # a transaction the program rules set off: never refundable by a merchant (the fast
                # path answers NOT_REFUNDABLE, or WRONG_MERCHANT to another merchant)
                if merchant is None or member_slot < 0:
                    self.not_refundable[t.transaction_id] = t.merchant_id
                    continue
                ledger.load_transaction(
                    t.transaction_id, fastpath.KIND_REFUND_EARN, member_slot, merchant.merchant_slot, t.amount, 0
                )
                continue
            if merchant is None:
                raise InvariantViolation(f"transaction {t.transaction_id} of unknown merchant {t.merchant_id!r}")
            ledger.load_transaction(t.transaction_id, t.kind, member_slot, merchant.merchant_slot, t.amount, t.refunded)
        return expired

    # --- the batch on the fast path ---

    def _apply_batch(
        self, batch: list[Operation], stored: dict[tuple[str, str], StoredOutcome], write: BatchWrite, now_us: int
    ) -> list[Outcome]:
        """Applies the batch's operations to the fast path in one kernel call (Ledger.apply_batch, a loop
        over int64 arrays in C): a first pass decides replays and suspended merchants and resolves ids to
        slots, the kernel decides every balance check in order, and a second pass turns its rows into
        journal rows and outcomes. With a program in force, plain earns and redeems are decided a run at a
        time by Ledger.apply_earn_redeem (processor/rules_kernel.py) and the other operations one at a
        time with the rules around them, in the batch's order.

        The first pass takes the common operation in C (Ledger.first_pass_plain, first_pass_run: an earn
        or redeem of a known member at an active merchant, nothing to replay, route or refuse), a stretch
        of them a call, and leaves the first one it does not take to the loop here; the second pass
        builds the plain earns' and redeems' rows in C (Ledger.plain_rows) and leaves the rest to
        _applied. Measured (callgrind, loadtest.bench_state_machine --apply-only, instructions an
        operation of the apply): 32.8k -> 20.2k with no program, 46.9k -> 42.7k with one, together with
        the records' JSON (store.JSON_OPTIONS)."""
        ledger = self.ledger
        merchants = self.merchants.by_id
        ids = self.ids
        version = self.program.version(now_us)
        outcomes: list[Outcome | None] = [None] * len(batch)
        applied: list[int] = []  # positions in the batch of the operations given to the kernel
        holds_taken: list[int] = []  # positions of authorizes counted against their merchant's open holds
        # the plain operations' columns, gathered as lists and made arrays in C at flush() (an array's
        # append stores its item through PyArg_Parse, ~200 instructions: callgrind)
        columns: list[list[int]] = [[] for _ in range(7)]
        int64_column = fastpath.Ledger.int64_column
        # plain earns and redeems under a version the kernel implements: decided a run at a time by one
        # compiled call (processor/rules_kernel.py); rules_kernel = False keeps them per operation (the
        # run then stays empty)
        tables = self._tables(version) if version is not None and self.rules_kernel else None
        run = EarnRedeemRun()
        # Everything the loop below uses for each operation is read once here (for the batch) or in
        # _run_parts (for a run): attributes, bound methods, constants. The loop runs once an operation;
        # a look-up here is one a batch (measured: loadtest/bench_state_machine, callgrind's --apply-only).
        run_position, run_op, run_slot, run_row, run_fee_bps, tier_row, tier_demand = _run_parts(run)
        give_back_min = tables.version.give_back_bps_min if tables is not None else 0
        give_back_max = tables.version.give_back_bps_max if tables is not None else 0
        earn, redeem, convert, link, authorize = _EARN, _REDEEM, _CONVERT, _LINK, _AUTHORIZE
        points_max, purchase_max = fastpath.RULES_EARN_POINTS_MAX, fastpath.RULES_PURCHASE_MAX
        operator_id, member_methods = domain.OPERATOR_ID, MEMBER_METHODS
        member_slot, member_account = ledger.member_slot, ledger.member_account
        transaction_id = ids.transaction
        add_applied = applied.append
        add_method, add_member, add_merchant, add_points, add_ref_id, add_new_id, add_expires = (
            column.append for column in columns
        )
        op_code = _OP_CODE_BY_VALUE
        # route() acts only on a refund, a link or a member in `routed` (processor/member_postings.py:
        # MemberRegistry.needs_route is this test): the common operation skips the call
        route, routed = self.members.route, self.members.routed
        stored_get = stored.get if stored else None

        # Ledger.plain_rows builds the plain earns' and redeems' rows as _applied and _fee do, with no star
        # rebate of the fee (none with no version in force) and the operator's fee revenue account known
        plain_rows = ledger.plain_rows
        fee_revenue = self.operator_accounts.get(domain.ACCOUNT_OPERATOR_FEE_REVENUE)
        fee_version = self.fee_version
        rows_numbers = (
            (now_us, fee_revenue, earn, redeem)
            if self.first_pass
            and fee_revenue is not None
            and (fee_version is None or not fee_version.star_fee_rebate_bps)
            else None
        )

        def flush() -> None:
            # the plain operations gathered so far (no program), through the kernel in one call: before any
            # operation applied on its own, so operations take effect in batch order, which is id order (an
            # earlier redeem never succeeds on a later credit; the change feed's balance after each is exact)
            if not applied:
                return
            zeros = bytes(8 * len(applied))
            # the kernel's answers, a column each
            statuses, slots, amounts, posteds, availables, kinds_done = rows = [
                array.array("q", zeros) for _ in range(6)
            ]
            arrays = [int64_column(column) for column in columns]
            ledger.apply_batch(*arrays, now_us, *rows)
            # the rows of the earns and redeems decided OK are built in C, a stretch a call (Ledger.plain_rows);
            # the first one it leaves (a refusal, another method, a fee it does not compute) is _applied's
            createds = arrays[5]
            applied_one = self._applied
            index, count = 0, len(applied)
            while True:
                if rows_numbers is not None:
                    index = plain_rows(
                        batch,
                        applied,
                        index,
                        createds,
                        statuses,
                        slots,
                        posteds,
                        availables,
                        merchants,
                        rows_numbers,
                        _PLAIN_CLASSES,
                        write.transactions,
                        write.entries,
                        outcomes,
                    )
                if index >= count:
                    break
                position = applied[index]
                outcomes[position] = applied_one(
                    batch[position],
                    write,
                    now_us,
                    createds[index],
                    statuses[index],
                    slots[index],
                    amounts[index],
                    posteds[index],
                    availables[index],
                    kinds_done[index],
                )
                index += 1
            applied.clear()
            for column in columns:
                del column[:]

        # The common operation (an earn or redeem of a known member at an active merchant, nothing to
        # replay, route or refuse) is taken by the fast path's first pass, a stretch of them a call: into
        # the plain columns with no program, into the rules kernel's run under a program it implements.
        # It stops at the first operation it does not take, which the loop below decides as before (the
        # pass has changed nothing for it but, under a program, the run's row of its member, which the
        # loop would add first too); then the pass goes on after it.
        plain_pass = run_pass = None
        count = len(batch)
        stored_pass = stored if stored else None
        if self.first_pass and version is None:
            plain_pass = (merchants, routed, stored_pass, earn, redeem, applied, *columns)
        elif self.first_pass and tables is not None:
            run_pass = self._run_pass(run, tables, now_us, merchants, routed, stored_pass)
        first_pass_plain, first_pass_run = ledger.first_pass_plain, ledger.first_pass_run
        position = -1
        while True:
            position += 1
            if plain_pass is not None and position < count:
                position, ids.next_transaction_id = first_pass_plain(
                    plain_pass, batch, position, ids.next_transaction_id
                )
            elif run_pass is not None and position < count:
                position = first_pass_run(run_pass, batch, position)
            if position >= count:
                break
            op = batch[position]
            if stored_get is not None:
                previous = stored_get((op.merchant_id, op.idempotency_key))
                if previous is not None:
                    outcomes[position] = replay(
                        previous.method,
                        previous.request,
                        Outcome(Code(previous.outcome), previous.response or {}, previous.message),
                        op,
                    )
                    continue
            if op.refusal is not None:  # decided before queueing (member presence); a retry above still replays
                outcomes[position] = op.refusal
                continue
            kind = op.method
            if op.merchant_id == operator_id and kind in member_methods:  # processor/member_postings.py
                # what was gathered before it takes effect first (batch order is id order)
                if run.tier_members and tables is not None:
                    self._kernel_run(run, tables, write, now_us, outcomes)
                    run = EarnRedeemRun()
                    run_position, run_op, run_slot, run_row, run_fee_bps, tier_row, tier_demand = _run_parts(run)
                    run_pass = self._run_pass(run, tables, now_us, merchants, routed, stored_pass)
                flush()
                outcomes[position] = self._member_admin(op, write, now_us)
                continue
            # aliases, households; a frozen member's spend, a closed member (see needs_route)
            if op.member_id in routed or op.transaction_id or op.referrer_id:
                refusal = route(op)
                if refusal is not None:
                    outcomes[position] = refusal
                    continue
            merchant_row = merchants[op.merchant_id]
            if merchant_row.status != "active" and kind in _NEW_BUSINESS:
                # decided here, after the idempotency look-up, so a retry of an earlier call still replays
                metrics.rejections.labels("merchant_suspended").inc()
                outcomes[position] = Outcome(
                    Code.FAILED_PRECONDITION,
                    recorded=False,
                    message=f"merchant {op.merchant_id!r} is {merchant_row.status}: it cannot earn, authorize or "
                    "redeem; it may still capture, void and refund. Contact the operator",
                )
                continue
            row = -1  # the operation's tier row in the kernel's run, or -1: it goes the other paths
            if (
                tables is not None
                # an operation the kernel may decide, before its member is looked at: a plain earn or
                # redeem (no vouchers) within the kernel's bounds (op.refusal is None: answered above)
                and (
                    # an earn at a merchant outside the version's give-back bounds is refused by the rules path
                    (kind is earn and give_back_min <= merchant_row.give_back_bps <= give_back_max) or kind is redeem
                )
                and not op.vouchers
                and 0 <= op.points <= points_max
                and 0 <= op.purchase_amount <= purchase_max
            ):
                row = tier_row(op.member_id, -1)  # the member's row if the run has it already
                if row < 0:
                    row = self._kernel_member(run, tables, op, now_us)
            if row < 0 and run.tier_members and tables is not None:
                # the run so far is decided before this operation takes ids or changes state, and the
                # next run reads its members' rules afresh (this operation may change them)
                self._kernel_run(run, tables, write, now_us, outcomes)
                run = EarnRedeemRun()
                run_position, run_op, run_slot, run_row, run_fee_bps, tier_row, tier_demand = _run_parts(run)
                run_pass = self._run_pass(run, tables, now_us, merchants, routed, stored_pass)
            slot = reference = created = expires = 0
            if kind is earn or kind is convert or kind is link:
                slot = member_slot(op.member_id)
                if slot < 0:  # a new member: within the merchant's quota only
                    refusal = self.quotas.new_member(op.merchant_id, op.points if kind is earn else None, now_us)
                    if refusal is not None:
                        outcomes[position] = refusal
                        continue
                    slot = ledger.ensure_member(op.member_id)
                    if slot < 0:
                        outcomes[position] = ledger_rejection(fastpath.CAPACITY, op)
                        continue
                if member_account(slot) == 0:  # created just now: its account row goes with the batch
                    account_id = self.account_ids.pop()
                    ledger.set_member_account(slot, account_id)
                    write.new_members.append((op.member_id, account_id))
                    self._signup(write, op, version, now_us)  # enrolled now: its sign-up bonus (seed 003)
                if row >= 0:  # the run takes it (its columns are built when it is decided)
                    run_position(position)
                    run_op(op)
                    run_slot(slot)
                    run_row(row)
                    run_fee_bps(merchant_row.fee_issued_bps)
                    continue
                created = transaction_id() if kind is not link else 0
            elif kind is redeem or kind is authorize:
                slot = member_slot(op.member_id)
                if slot < 0:
                    metrics.rejections.labels("unknown_member").inc()
                    outcomes[position] = Outcome(
                        Code.NOT_FOUND,
                        message=(
                            f"member {op.member_id!r} has no points account; a member is created by its first Earn"
                        ),
                    )
                    continue
                if kind is authorize:
                    refusal = self.quotas.take_hold(op.merchant_id)
                    if refusal is not None:
                        outcomes[position] = refusal
                        continue
                    holds_taken.append(position)
                    created = ids.authorization()
                    expires = now_us + op.hold_ttl_seconds * 1_000_000
                elif row >= 0:  # the run takes it (its columns are built when it is decided)
                    run_position(position)
                    run_op(op)
                    run_slot(slot)
                    run_row(row)
                    run_fee_bps(merchant_row.fee_redeemed_bps)
                    tier_demand[row] += op.points
                    continue
                else:
                    created = transaction_id()
            elif kind is _CAPTURE:
                reference, created = op.authorization_id, transaction_id()
            elif kind is _VOID:
                reference = op.authorization_id
            elif kind is _REFUND:
                owner = self.not_refundable.get(op.transaction_id)
                if owner is not None:  # a rule's transaction with no member (a merchant's vouchers)
                    outcomes[position] = ledger_rejection(
                        fastpath.NOT_REFUNDABLE if owner == op.merchant_id else fastpath.WRONG_MERCHANT, op
                    )
                    continue
                reference, created = op.transaction_id, transaction_id()
            elif kind is Method.SPEND_VOUCHERS:
                created = transaction_id()
            if (
                version is not None
                or kind._value_ in _RULES_ONLY
                or op.vouchers
                or (kind is _REFUND and op.transaction_id in self.program.splits)
                or (op.authorization_id and op.authorization_id in self.program.voucher_holds)
            ):
                # under a program, what the rules kernel does not decide goes through the kernel on its
                # own, with the rules evaluated around it in order (an earn's bonuses change what the next
                # operation sees); the kernel's run before it was decided above
                flush()
                outcomes[position] = self._apply_capped(op, write, now_us, version, slot, reference, created, expires)
                continue
            add_applied(position)
            add_method(op_code[kind._value_])
            add_member(slot)
            add_merchant(op.merchant_slot)
            add_points(op.points)
            add_ref_id(reference)
            add_new_id(created)
            add_expires(expires)
        if run and tables is not None:
            self._kernel_run(run, tables, write, now_us, outcomes)
        flush()
        answered = [outcome for outcome in outcomes if outcome is not None]
        require(len(answered) == len(batch), "every operation of the batch has an outcome")
        for position in holds_taken:
            if answered[position].code is not Code.OK:
                self.quotas.hold_not_opened(batch[position].merchant_id)
        return answered

    def _run_pass(
        self,
        run: EarnRedeemRun,
        tables: KernelTables,
        now_us: int,
        merchants: dict[str, MerchantRow],
        routed: set[str],
        stored: dict[tuple[str, str], StoredOutcome] | None,
    ) -> tuple[Any, ...]:
        """What Ledger.first_pass_run reads and fills for `run` (fastpath/_core.pyi): the batch's look-ups,
        the kernel's bounds, the run's lists, and _kernel_member with its arguments."""
        version = tables.version
        return (
            merchants,
            routed,
            stored,
            _EARN,
            _REDEEM,
            version.give_back_bps_min,
            version.give_back_bps_max,
            fastpath.RULES_EARN_POINTS_MAX,
            fastpath.RULES_PURCHASE_MAX,
            run.positions,
            run.ops,
            run.slots,
            run.rows,
            run.fee_bps,
            run.tier_rows,
            run.tier_demand,
            self._kernel_member,
            run,
            tables,
            now_us,
        )

    def _applied(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        created: int,
        status: int,
        slot: int,
        amount: int,
        posted: int,
        available: int,
        kind: int,
    ) -> Outcome:
        """One row of the kernel: the journal rows of an applied operation and its outcome."""
        ledger = self.ledger
        method = op.method
        if status == fastpath.HOLD_EXPIRED:
            write.expired_holds.append(op.authorization_id)  # the kernel marked it; Postgres follows
        if status != fastpath.OK:
            expires = held = 0
            if (method is _CAPTURE or method is _VOID) and ledger.has_hold(op.authorization_id):
                _, _, _, held, expires = ledger.hold(op.authorization_id)
            return ledger_rejection(status, op, available, expires, held)
        merchant = self.merchants.by_id[op.merchant_id]
        if method is _EARN:
            fee = self._fee(write, created, merchant, op.points, "fee_issued_bps")
            write.transactions.append(
                (
                    created,
                    fastpath.KIND_EARN,
                    op.merchant_id,
                    op.member_id,
                    op.points,
                    op.purchase_amount,
                    None,
                    None,
                    op.idempotency_key,
                    fee,
                )
            )
            if op.points:
                write.entries.append((created, ledger.member_account(slot), op.points))
                write.entries.append((created, merchant.issued_account_id, -op.points))
            return Outcome(
                Code.OK,
                {
                    "transaction_id": created,
                    "points": op.points,
                    "balance": posted,
                    "give_back_bps": merchant.give_back_bps,
                    "created_at_us": now_us,
                },
            )
        if method is _AUTHORIZE:
            expires = now_us + op.hold_ttl_seconds * 1_000_000
            write.new_holds.append(
                (created, op.merchant_id, op.member_id, op.points, from_micros(expires), op.idempotency_key)
            )
            return Outcome(
                Code.OK,
                {"authorization_id": created, "available": available, "points": op.points, "expires_at_us": expires},
            )
        if method is _CAPTURE:
            held = ledger.hold(op.authorization_id)[3]
            write.resolved_holds.append(
                (op.authorization_id, fastpath.HOLD_STATUS_CAPTURED, amount, created if amount else None)
            )
            if amount:
                fee = self._fee(write, created, merchant, amount, "fee_redeemed_bps")
                write.transactions.append(
                    (
                        created,
                        fastpath.KIND_CAPTURE,
                        op.merchant_id,
                        ledger.member_id(slot),
                        amount,
                        None,
                        op.authorization_id,
                        None,
                        op.idempotency_key,
                        fee,
                    )
                )
                write.entries.append((created, ledger.member_account(slot), -amount))
                write.entries.append((created, merchant.redeemed_account_id, amount))
            return Outcome(
                Code.OK,
                {
                    "transaction_id": created if amount else 0,
                    "points": amount,
                    "released": held - amount,
                    "balance": posted,
                    "available": available,
                },
            )
        if method is _VOID:
            write.resolved_holds.append((op.authorization_id, fastpath.HOLD_STATUS_VOIDED, 0, None))
            return Outcome(Code.OK, {"released": amount, "available": available})
        if method is _REDEEM:
            fee = self._fee(write, created, merchant, op.points, "fee_redeemed_bps")
            write.transactions.append(
                (
                    created,
                    fastpath.KIND_REDEEM,
                    op.merchant_id,
                    op.member_id,
                    op.points,
                    None,
                    None,
                    None,
                    op.idempotency_key,
                    fee,
                )
            )
            write.entries.append((created, ledger.member_account(slot), -op.points))
            write.entries.append((created, merchant.redeemed_account_id, op.points))
            return Outcome(
                Code.OK, {"transaction_id": created, "points": op.points, "balance": posted, "available": available}
            )
        member_account = ledger.member_account(slot)
        write.transactions.append(
            (
                created,
                kind,
                op.merchant_id,
                ledger.member_id(slot),
                op.points,
                None,
                None,
                op.transaction_id,
                op.idempotency_key,
                0,
            )
        )
        write.refunds.append((op.transaction_id, op.points))
        if kind == fastpath.KIND_REFUND_REDEMPTION:
            write.entries.append((created, merchant.redeemed_account_id, -op.points))
            write.entries.append((created, member_account, op.points))
        else:
            require(kind == fastpath.KIND_REFUND_EARN, f"refund kind {kind}")
            write.entries.append((created, member_account, -op.points))
            write.entries.append((created, merchant.issued_account_id, op.points))
        return Outcome(
            Code.OK,
            {"transaction_id": created, "points": op.points, "kind": kind, "balance": posted, "available": available},
        )

    def _fee(self, write: BatchWrite, transaction_id: int, merchant: MerchantRow, points: int, schedule: str) -> int:
        """The operator's fee on a transaction, posted in it: merchant's fees account to fee revenue."""
        fee = domain.fee_point_units(points, getattr(merchant, schedule))
        version = self.fee_version
        if fee and version is not None and version.star_fee_rebate_bps:  # star rebates (issue 16): no call otherwise
            fee -= rules.star_fee_rebate(version, merchant.merchant_id, fee)
        if fee:
            write.entries.append((transaction_id, merchant.fees_account_id, -fee))
            write.entries.append((transaction_id, self.operator_accounts[domain.ACCOUNT_OPERATOR_FEE_REVENUE], fee))
        return fee

    def _apply_capped(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        slot: int,
        reference: int,
        created: int,
        expires: int,
    ) -> Outcome:
        """_apply_with_rules under the program's spending caps (processor/velocity.py): a Redeem or
        Authorize past a cap is refused before anything moves; the points a Redeem or Capture took count."""
        method, program = op.method, self.program
        if (
            version is not None
            and (method is _REDEEM or method is _AUTHORIZE)
            and op.points
            and (version.member_points_spent_per_hour_max or version.member_points_spent_per_day_max)
        ):
            refusal = velocity.refusal(
                program.spends.get(op.member_id, ()),
                now_us,
                op.member_id,
                self.ledger.balance(slot)[1],
                op.points,
                version.member_points_spent_per_hour_max,
                version.member_points_spent_per_day_max,
            )
            if refusal is not None:
                metrics.rejections.labels("spending_cap").inc()
                return refusal
        member_id = op.member_id
        if method is _CAPTURE:  # whose hold it is, before the capture resolves it
            hold = program.voucher_holds.get(op.authorization_id)
            if hold is not None:
                member_id = hold.member_id
            elif self.ledger.has_hold(op.authorization_id):
                member_id = self.ledger.member_id(self.ledger.hold(op.authorization_id)[1])
        outcome = self._apply_with_rules(op, write, now_us, version, slot, reference, created, expires)
        if outcome.code is Code.OK and (method is _REDEEM or method is _CAPTURE) and member_id:
            program.spend(member_id, outcome.fields.get("points", 0), now_us)
        return outcome

    def _apply_with_rules(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        slot: int,
        reference: int,
        created: int,
        expires: int,
    ) -> Outcome:
        method = op.method
        try:
            if method is _LINK:
                return self._link(op)
            if method is _CONVERT:
                return self._convert(op, write, now_us, version, slot, created)
            if method is Method.SPEND_VOUCHERS:
                return self._spend_vouchers(op, write, now_us, version, created)
            if method is _REDEEM and op.vouchers:
                return self._split_redeem(op, write, now_us, version, slot, created)
            if method is _AUTHORIZE and op.vouchers:
                return self._split_authorize(op, write, now_us, version, slot, created, expires)
            if method is _CAPTURE or method is _VOID:
                hold = self.program.voucher_holds.get(op.authorization_id)
                if hold is not None:
                    return self._split_resolve(op, write, now_us, version, created, hold)
                if op.vouchers:
                    if not self.ledger.has_hold(op.authorization_id):
                        return ledger_rejection(fastpath.UNKNOWN_HOLD, op)
                    raise Rejection(
                        Code.INVALID_ARGUMENT,
                        (
                            f"authorization {domain.format_authorization_id(op.authorization_id)} holds no vouchers; "
                            "capture points only (vouchers = 0)"
                        ),
                    )
            if method is _REFUND and op.transaction_id in self.program.splits:
                return self._split_refund(op, write, now_us, version, created)
            points, plan, refund = op.points, None, None
            if method is _EARN and version is not None:
                rules.check_give_back(version, op.merchant_id, self.merchants.by_id[op.merchant_id].give_back_bps)
                plan = self.program.plan_earn(version, op.member_id, op.merchant_id, op.points, now_us)
                points = plan.total
            elif method is _REDEEM or method is _AUTHORIZE:
                self._expire_member(write, op.member_id, now_us)  # expired points are not spendable
            elif method is _REFUND:
                refund = self.program.refund_plan(op.transaction_id, op.points)
                if refund is not None:
                    points = refund[1].total
        except Rejection as rejection:
            metrics.rejections.labels("program_rule").inc()
            return Outcome(rejection.code, message=rejection.message)
        status, slot, amount, posted, available, kind = self._kernel_one(
            op, slot, points, reference, created, expires, now_us
        )
        if status != fastpath.OK:
            if status == fastpath.HOLD_EXPIRED:
                self._restore_hold(op.authorization_id, now_us)
            return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
        program = self.program
        if method is _EARN and plan is not None:
            if version is None:
                raise InvariantViolation("an earn planned under the program with no version in force")
            return self._earned(op, write, now_us, version, plan, created, slot)
        if method is _REFUND and kind == fastpath.KIND_REFUND_EARN:
            return self._earn_refunded(op, write, now_us, refund, created, slot, amount, available)
        hold = self.ledger.hold(op.authorization_id) if (method is _CAPTURE or method is _VOID) else None
        outcome = self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
        member_id = self.ledger.member_id(slot)
        grace = version.restore_grace_us if version is not None else 0
        if method is _AUTHORIZE or method is _REDEEM:
            owner = (OWNER_HOLD, created) if method is _AUTHORIZE else (OWNER_TRANSACTION, created)
            program.consume(member_id, owner, amount, available + amount, now_us)
        elif method is _CAPTURE:
            if hold is None:
                raise InvariantViolation(f"capture of {op.authorization_id}, which the fast path does not hold")
            released = hold[3] - amount
            program.restore(
                member_id,
                (OWNER_HOLD, op.authorization_id),
                released,
                available - released,
                now_us,
                grace,
                keep_as=(OWNER_TRANSACTION, created) if amount else None,
            )
        elif method is _VOID:
            program.restore(member_id, (OWNER_HOLD, op.authorization_id), None, available - amount, now_us, grace)
        elif method is _REFUND:  # of a capture or redeem: the lots it consumed come back
            program.restore(
                member_id, (OWNER_TRANSACTION, op.transaction_id), amount, available - amount, now_us, grace
            )
        return outcome

    def _kernel_one(
        self,
        op: Operation,
        slot: int,
        points: int,
        reference: int,
        created: int,
        expires: int,
        now_us: int,
        method: Method | None = None,
    ) -> tuple[int, ...]:
        # one operation through the batch kernel, in arrays of length 1 kept for the purpose (measured:
        # building 13 arrays per operation was a tenth of the rules path's CPU); each item set and read
        # by name, not by a zip and a generator (two objects and a frame an operation), and the method's
        # code by its str value (an Enum member's hash is a Python call)
        arrays, rows = self._one
        codes, slots, merchants, amounts, references, createds, expirations = arrays
        codes[0] = _OP_CODE_BY_VALUE[(method or op.method)._value_]
        slots[0] = slot
        merchants[0] = op.merchant_slot
        amounts[0] = points
        references[0] = reference
        createds[0] = created
        expirations[0] = expires
        self.ledger.apply_batch(*arrays, now_us, *rows)
        statuses, slots_out, amounts_out, posteds, availables, kinds = rows
        return (statuses[0], slots_out[0], amounts_out[0], posteds[0], availables[0], kinds[0])

    def _earned(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion",
        plan: "rules.Earn",
        created: int,
        slot: int,
    ) -> Outcome:
        """An earn under a program: its postings (base from the merchant, uplift from the operator,
        each promotion from its sponsor), then what it set off: level bonuses, the referrer's bonus, the
        acquiring merchant's reward, each a transaction of its own kind in the same batch."""
        ledger, operator = self.ledger, self.operator_accounts
        merchant = self.merchants.by_id[op.merchant_id]
        fee = self._fee(write, created, merchant, plan.base, "fee_issued_bps")
        fee += self._sale_fee(write, created, merchant, version, op.purchase_amount)
        write.transactions.append(
            (
                created,
                fastpath.KIND_EARN,
                op.merchant_id,
                op.member_id,
                plan.total,
                op.purchase_amount,
                None,
                None,
                op.idempotency_key,
                fee,
                version.version,
            )
        )
        self._earn_entries(write, created, ledger.member_account(slot), merchant, plan, 1)
        effects = self.program.earned(version, created, op.member_id, op.merchant_id, plan, op.purchase_amount, now_us)
        bonus_points = plan.total - plan.base
        for level, bonus in effects.bonuses:
            self._credit(
                write,
                rules.KIND_TIER_BONUS,
                op.merchant_id,
                op.member_id,
                bonus,
                operator[rules.ACCOUNT_OPERATOR_TIER_REWARDS],
                f"tier:{op.member_id}:{level}",
                version,
                now_us,
                created,
            )
            bonus_points += bonus
        if effects.referral is not None:
            referrer, bonus = effects.referral
            self._credit(
                write,
                rules.KIND_REFERRAL_BONUS,
                op.merchant_id,
                referrer,
                bonus,
                operator[rules.ACCOUNT_OPERATOR_REFERRALS],
                f"referral:{op.member_id}",
                version,
                now_us,
                created,
            )
        if effects.acquiring is not None and version.acquiring_reward_asset == rules.ASSET_VOUCHERS:
            acquirer, reward = effects.acquiring  # 众店's fan reward in vouchers (issue 16)
            self._fan_reward(write, version, acquirer, op.member_id, reward, created)
        elif effects.acquiring is not None:
            acquirer, reward = effects.acquiring
            self._post(
                write,
                rules.KIND_ACQUIRING_REWARD,
                acquirer,
                op.member_id,
                reward,
                [
                    (operator[rules.ACCOUNT_OPERATOR_ACQUIRING], -reward),
                    (self.merchants.by_id[acquirer].acquiring_account_id, reward),
                ],
                f"acquiring:{created}",
                version,
                original=created,
            )
        self._match(write, op, version, plan.base, created)
        posted, held = ledger.balance(slot)
        fields = {
            "transaction_id": created,
            "points": plan.base,
            "balance": posted,
            "give_back_bps": merchant.give_back_bps,
            "created_at_us": now_us,
            "bonus_points": bonus_points,
            "level": self.program.level(op.member_id, now_us),
        }
        return Outcome(Code.OK, fields)

    def _earn_entries(
        self,
        write: BatchWrite,
        transaction_id: int,
        member_account: int,
        merchant: MerchantRow,
        earn: "rules.Earn",
        sign: int,
    ) -> None:
        """An earn's entries (sign 1), or a refund's (sign -1, with the portion taken back)."""
        operator = self.operator_accounts
        entries = [
            (member_account, earn.total),
            (merchant.issued_account_id, -earn.base),
            (operator[rules.ACCOUNT_OPERATOR_TIER_REWARDS], -earn.uplift),
        ]
        for grant in earn.grants:
            if grant.sponsor_id == domain.OPERATOR_ID:
                entries.append((operator[rules.ACCOUNT_OPERATOR_PROMOTIONS], -grant.amount))
            else:
                entries.append((self.merchants.by_id[grant.sponsor_id].issued_account_id, -grant.amount))
        _entries(write, transaction_id, [(account_id, sign * amount) for account_id, amount in entries])

    def _earn_refunded(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        refund: tuple[EarnRecord, rules.Earn, int] | None,
        created: int,
        slot: int,
        taken: int,
        available: int,
    ) -> Outcome:
        merchant = self.merchants.by_id[op.merchant_id]
        member_id = self.ledger.member_id(slot)
        record, portion, reversal = refund if refund is not None else (None, rules.Earn(taken), 0)
        write.transactions.append(
            (
                created,
                fastpath.KIND_REFUND_EARN,
                op.merchant_id,
                member_id,
                taken,
                None,
                None,
                op.transaction_id,
                op.idempotency_key,
                0,
                record.version if record is not None else None,
            )
        )
        write.refunds.append((op.transaction_id, taken))
        self._earn_entries(write, created, self.ledger.member_account(slot), merchant, portion, -1)
        version = self.program.version_numbered(record.version) if record is not None else None
        if (
            reversal
            and record is not None
            and record.acquirer_id is not None
            and version is not None
            and version.acquiring_reward_asset == rules.ASSET_VOUCHERS
        ):  # 众店's fan reward in vouchers (issue 16)
            self._fan_reward_reversal(
                write, version, record.acquirer_id, member_id, reversal, op.transaction_id, created
            )
        elif reversal and record is not None and record.acquirer_id is not None:  # a reversal has an acquirer
            operator = self.operator_accounts
            self._post(
                write,
                rules.KIND_ACQUIRING_REVERSAL,
                record.acquirer_id,
                member_id,
                reversal,
                [
                    (operator[rules.ACCOUNT_OPERATOR_ACQUIRING], reversal),
                    (self.merchants.by_id[record.acquirer_id].acquiring_account_id, -reversal),
                ],
                f"acquiring-reversal:{created}",
                version,
                original=op.transaction_id,
            )
        self._reverse_match(write, version, record, member_id, portion.base, op.transaction_id, created)
        self.program.refunded_earn(
            version, op.transaction_id, record, member_id, portion.base, taken, available + taken, now_us
        )
        posted, _ = self.ledger.balance(slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "points": taken,
                "kind": fastpath.KIND_REFUND_EARN,
                "balance": posted,
                "available": available,
                "bonus_points": portion.total - portion.base,
            },
        )


class Merchants:
    """The merchants the service knows: id → row, slot → id. Refreshed from Postgres on a miss, so a
    merchant added by the CLI while the service runs is found."""

    def __init__(self, rows: list[MerchantRow]):
        self.by_id: dict[str, MerchantRow] = {}
        self.by_slot: dict[int, MerchantRow] = {}
        for row in rows:
            self.add(row)

    def add(self, row: MerchantRow) -> None:
        self.by_id[row.merchant_id] = row
        self.by_slot[row.merchant_slot] = row


@dataclasses.dataclass(slots=True)
class IdAllocator:
    next_transaction_id: int
    next_authorization_id: int

    def transaction(self) -> int:
        value = self.next_transaction_id
        self.next_transaction_id += 1
        return value

    def authorization(self) -> int:
        value = self.next_authorization_id
        self.next_authorization_id += 1
        return value


_OP_CODE = {
    Method.EARN: fastpath.OP_EARN,
    Method.AUTHORIZE: fastpath.OP_AUTHORIZE,
    Method.CAPTURE: fastpath.OP_CAPTURE,
    Method.VOID: fastpath.OP_VOID,
    Method.REDEEM: fastpath.OP_REDEEM,
    Method.REFUND: fastpath.OP_REFUND,
}

_OP_CODE_BY_VALUE = {method.value: code for method, code in _OP_CODE.items()}  # by str: see _RULES_ONLY

# the methods the batch loop and _applied test for each operation, as module names (one look-up, not two)
_EARN, _REDEEM, _AUTHORIZE, _CAPTURE, _VOID, _REFUND = (
    Method.EARN,
    Method.REDEEM,
    Method.AUTHORIZE,
    Method.CAPTURE,
    Method.VOID,
    Method.REFUND,
)
_CONVERT, _LINK = Method.CONVERT, Method.LINK


def _run_parts(run: EarnRedeemRun) -> tuple[Any, Any, Any, Any, Any, Any, list[int]]:
    """What the batch loop adds to a run with, bound once per run: the appends of its positions, ops,
    slots, tier rows and fees, its members' tier rows' get, and its tier demand."""
    return (
        run.positions.append,
        run.ops.append,
        run.slots.append,
        run.rows.append,
        run.fee_bps.append,
        run.tier_rows.get,
        run.tier_demand,
    )


# A suspended merchant may finish what it started (capture, void, refund) but start nothing new.
_NEW_BUSINESS = frozenset(
    {Method.EARN, Method.AUTHORIZE, Method.REDEEM, Method.CONVERT, Method.LINK, Method.SPEND_VOUCHERS}
)


# operations only the rules path applies (with or without a program version in force)
# (by value: an Enum member's hash is a Python call, a str's is cached)
_RULES_ONLY = frozenset({Method.CONVERT.value, Method.LINK.value, Method.SPEND_VOUCHERS.value})


# what Ledger.plain_rows builds its outcomes as
_PLAIN_CLASSES = (Outcome, Code.OK)


# Outcomes about the service's state, not the request: a retry may succeed, so the key stays free.
NOT_RECORDED = frozenset({Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.INTERNAL})


def _check_balanced(write: BatchWrite) -> None:
    """Every transaction's entries sum to zero per asset and name an account (checked before the batch
    is written): by the fast path's Ledger.unbalanced_entries, which sums a transaction's adjacent
    entries in C (in Python this loop over every entry was ~0.9 µs an operation with the program)."""
    problem = fastpath.Ledger.unbalanced_entries(write.entries, domain.ASSET_POINTS)
    if problem is not None:
        require(False, problem)


def replay(stored_method: str, stored_request: dict[str, Any], outcome: Outcome, op: Operation) -> Outcome:
    """The outcome for a retry under a key already used: the original one if the request is the same."""
    field = domain.differing_field(stored_request, op.method.value, op.request, stored_method)
    if field is not None:
        return Outcome(
            Code.ALREADY_EXISTS,
            message=f"idempotency key {op.idempotency_key!r} was first used for a different "
            f"request ({field} differs); use a new key for a new operation",
        )
    return Outcome(outcome.code, outcome.fields, outcome.message, replayed=True)
