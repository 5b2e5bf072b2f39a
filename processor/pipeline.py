"""The commit pipeline: bounded queue → batch → fast path → one Postgres transaction → answers.

This is the one place ledger state changes. A single committer task takes up to
`batch_operations_max` queued operations (waiting `batch_linger_seconds` for more after the first),
and for the batch:

  1. looks up, in one query, the idempotency keys it has not seen in flight: a stored outcome is
     replayed (or, if the request differs, refused with ALREADY_EXISTS naming the field);
  2. prefetches the holds and transactions the batch refers to that the fast path does not hold;
  3. opens the fast path's undo log, releases expired holds, and applies every operation there
     (microseconds each, no I/O), collecting journal rows, hold changes and idempotency records;
  4. writes all of it in one Postgres transaction and compares the member balances Postgres returns
     with the fast path's;
  5. only then answers every call of the batch.

If the write fails, the undo log puts the fast path back to what Postgres holds and every call of
the batch gets UNAVAILABLE (nothing of it was committed, a retry with the same key is safe). If the
failure leaves it unknown whether COMMIT happened (the connection broke), the fast path is rebuilt
from Postgres before the next batch, and the retry finds the outcome if it was committed.
"""
from __future__ import annotations

import array
import asyncio
import collections
import dataclasses
import json
import logging
import time
from typing import Any

import asyncpg

import fastpath
from processor import domain, kinds, metrics, rules, velocity
from processor.quotas import MerchantQuotas
from processor.program import (
    OWNER_HOLD, OWNER_TRANSACTION, EarnRecord, MemberRules, ProgramState, SplitRecord, VoucherHold)
from processor.config import Settings
from processor.domain import Code, Method, Operation, Outcome, Rejection, require
from processor.presence_store import PresenceStore
from processor.store import (NEVER_US, BatchWrite, MerchantRow, Store, StoreError, WriterFenced, WriterLockLost,
                             from_micros, micros, to_json)

log = logging.getLogger("points.pipeline")



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


async def load_ledger(store: Store, settings: Settings, merchants: Merchants, now_us: int):
    """Rebuilds the fast path from Postgres: every member's posted balance and every open hold."""
    ledger = fastpath.Ledger(settings.members_max, settings.holds_max, settings.transactions_resident_max)
    async for chunk in store.member_balances():
        for member_id, balance, account_id in chunk:
            ledger.load_member(member_id, balance, account_id)
    for hold in await store.open_holds(from_micros(now_us)):
        ledger.load_hold(hold.authorization_id, ledger.member_slot(hold.member_id),
                         merchants.by_id[hold.merchant_id].merchant_slot, hold.amount,
                         hold.expires_at_us, fastpath.HOLD_OPEN)
    ledger.check_invariants()
    return ledger


async def load_program(store: Store, settings: Settings) -> ProgramState:
    """The program's versions and the rules' state (links, tiers, lots, consumed pieces, budgets)."""
    state = ProgramState(await store.program(settings.program_id))
    rows = await store.program_state(settings.program_id)
    for r in rows["members"]:
        buckets = tuple(sorted((int(day), amount) for day, amount in json.loads(r["day_buckets"]).items()))
        state.load_member(r["member_id"], MemberRules(r["acquirer_id"], r["referrer_id"], r["referral_paid"],
                                                      r["level"], r["levels_reached"], r["qualifying_point_units"],
                                                      buckets))
    lots: dict[str, list] = collections.defaultdict(list)
    for r in rows["lots"]:
        lots[r["member_id"]].append(rules.Lot(r["lot_id"], r["amount"], r["expires_at_us"], r["issuer_id"]))
    for member_id, member_lots in lots.items():
        state.load_lots(member_id, tuple(sorted(member_lots, key=rules._order)))
    pieces: dict[tuple[int, int], list] = collections.defaultdict(list)
    for r in rows["pieces"]:
        expires = None if r["expires_at_us"] == NEVER_US else r["expires_at_us"]
        pieces[(r["owner_kind"], r["owner_id"])].append(rules.Lot(r["lot_id"], r["amount"], expires, r["issuer_id"]))
    for owner, owner_pieces in pieces.items():
        state.load_pieces(owner, tuple(owner_pieces))
    state.granted = {r["promotion_id"]: r["granted"] for r in rows["budgets"]}
    vouchers = await store.voucher_state(settings.program_id)
    for r in vouchers["accounts"]:
        kind, owner, balance = r["kind"], r["owner_id"], r["balance"]
        state.voucher_accounts[(kind, owner)] = r["account_id"]
        if kind == domain.ACCOUNT_MEMBER:
            state.vouchers[(rules.HOLDER_MEMBER, owner)] = balance
        elif kind == rules.ACCOUNT_MERCHANT_VOUCHERS:
            state.vouchers[(rules.HOLDER_MERCHANT, owner)] = balance
        elif kind == rules.ACCOUNT_MEMBER_VOUCHER_CREDIT and balance:
            state.credit[owner] = -balance
    for r in await store.voucher_holds():
        state.load_voucher_hold(r["authorization_id"], voucher_hold(r))
    for member_id, at_us, points in await PresenceStore(store).spends_since(now_micros() - velocity.WINDOW_US_MAX):
        state.load_spend(member_id, points, at_us)
    state.rounds = vouchers["rounds"][0]["round_number"] if vouchers["rounds"] else 0
    state.dividends_unposted = vouchers["unposted"] > 0
    return state


def voucher_hold(r) -> VoucherHold:
    return VoucherHold(r["member_id"], r["merchant_id"], r["vouchers"], r["from_credit"], r["points"],
                       r["expires_at_us"], r["status"], r["transaction_id"])


def earn_record(r) -> EarnRecord:
    grants = tuple(rules.Grant(p, sponsor, amount) for p, sponsor, amount in json.loads(r["grants"]))
    return EarnRecord(r["member_id"], r["merchant_id"], r["program_version"],
                      rules.Earn(r["base_point_units"], r["uplift_point_units"], grants), r["acquirer_id"],
                      r["acquiring_point_units"], r["refunded_base_point_units"], micros(r["created_at"]))


@dataclasses.dataclass(slots=True)
class _Prepared:
    """A batch applied to the fast path (its undo batch open), not yet answered."""
    batch: list[Operation]
    outcomes: list[Outcome]
    write: BatchWrite
    dated_us: int
    task: asyncio.Task | None = None  # its Postgres write
    started: float = 0.0


def all_done(futures: list[asyncio.Future]) -> asyncio.Future:
    """A future that is done when every one of `futures` is; cancelling it cancels none of them."""
    done = asyncio.get_running_loop().create_future()
    remaining = len(futures)

    def one_done(_: asyncio.Future) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not done.done():
            done.set_result(None)
    for future in futures:
        future.add_done_callback(one_done)
    if not futures:
        done.set_result(None)
    return done


def now_micros() -> int:
    return time.time_ns() // 1000


class Pipeline:
    def __init__(self, settings: Settings, store: Store | None):
        self.settings = settings
        self.store = store
        self.merchants = Merchants([])
        self.ledger: Any = None
        self.program = ProgramState()   # the program rules' state, beside the fast path
        self._listening = False
        self.ids = IdAllocator(1, 1)
        self._queue: collections.deque[Operation] = collections.deque()
        self._queued = asyncio.Event()
        self._inflight: dict[tuple[str, str], Operation] = {}
        # batches applied to the fast path and not yet answered, oldest first (at most two: the one
        # being written and the next)
        self._open: collections.deque[_Prepared] = collections.deque()
        self._finished: asyncio.Event | None = None
        self._readers_waiting = 0
        self._forget_due = False
        # rule transactions with no member (a merchant's dividend or voucher spend) that a refund of the
        # batch names: transaction id -> merchant id (set by _prefetch)
        self._not_refundable: dict[int, str] = {}
        self._one = ([array.array("q", [0]) for _ in range(7)], [array.array("q", [0]) for _ in range(6)])
        self._wake_at = 1   # submit() wakes the committer once this many operations are queued
        # account_id -> sum of its committed entries since the last balance checkpoint, and the newest
        # committed transaction id they include: what the next checkpoint folds into accounts.balance
        self._pending_deltas: dict[int, int] = {}
        self._pending_through = 0
        self._checkpoint_due_at = 0.0
        self._checkpoint: asyncio.Task | None = None  # the checkpoint being written, if any
        self._expired_pending: list[int] = []
        # account ids taken from Postgres's accounts sequence for members the next batches create
        self._account_ids: list[int] = []
        self.operator_accounts: dict[str, int] = {}
        # No batch is dated before this (microseconds): the clock never runs backwards, and never
        # before the newest settlement cut or, after a (re)start, the newest batch in Postgres.
        self._clock_floor_us = 0
        self._task: asyncio.Task | None = None
        self._dividends: asyncio.Task | None = None
        self._reloads: set[asyncio.Task] = set()
        self._stopping = False
        self.draining = False       # shutting down: new operations are refused, queued ones commit
        self._resync_requested = False
        self.ready = False          # recovery done and Postgres reachable
        self.quotas = MerchantQuotas(settings)  # per-merchant shares of the queue, holds and new members

    # --- lifecycle ---

    async def recover(self) -> None:
        """Loads merchants, balances, open holds and id high-water marks from Postgres."""
        self.ready = False
        if not await self.store.writer_lock_alive():
            # Postgres restarted (or the lock connection broke): the lock is ours again or the start fails
            await self.store.release_writer_lock()
            await self.store.acquire_writer_lock()
        self.merchants = Merchants(await self.store.merchants())
        self.ledger = await load_ledger(self.store, self.settings, self.merchants, now_micros())
        self.program = await load_program(self.store, self.settings)
        if not self._listening:
            # a version stored by the CLI (or another service instance's admin call) is loaded at once
            await self.store.listen_program_changes(self._program_changed)
            self._listening = True
        last_transaction, last_authorization = await self.store.id_high_water_marks()
        self.ids = IdAllocator(last_transaction + 1, last_authorization + 1)
        self.operator_accounts = await self.store.operator_account_ids()
        self._pending_deltas, self._pending_through = await self.store.tail_deltas(
            await self.store.checkpoint_through())
        self._checkpoint_due_at = time.monotonic() + self.settings.balance_checkpoint_seconds
        latest_cut = await self.store.latest_cut_off()
        if latest_cut is not None:
            self._clock_floor_us = max(self._clock_floor_us, micros(latest_cut))
        latest_batch = await self.store.latest_batch_time()  # a clock stepped back while the service was down
        if latest_batch is not None:
            self._clock_floor_us = max(self._clock_floor_us, micros(latest_batch))
        if self._clock_floor_us > now_micros() + 1_000_000:
            log.warning("the clock is behind the newest batch or cut; batches are dated at that time until the "
                        "clock passes it", extra={"floor": from_micros(self._clock_floor_us).isoformat()})
        self._expired_pending = []
        self.ready = True
        log.info("recovered ledger from postgres", extra={
            "members": self.ledger.members_count, "holds_open": self.ledger.holds_open_count,
            "merchants": len(self.merchants.by_id)})

    async def reload_program(self) -> None:
        """Re-reads the program's versions (after a new one was stored); the state stays."""
        program = await self.ready_store().program(self.settings.program_id)
        self.program.program = program
        log.info("program versions loaded", extra={
            "program": self.settings.program_id, "versions": len(program.versions) if program else 0})

    def _program_changed(self, program_id: str) -> None:
        if program_id == self.settings.program_id and self.ready:
            task = asyncio.get_running_loop().create_task(self.reload_program(), name="program-reload")
            self._reloads.add(task)  # a task nobody references may be collected before it runs
            task.add_done_callback(self._reloads.discard)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="committer")
        self._dividends = loop.create_task(self._dividend_loop(), name="dividend-rounds")

    async def stop(self) -> None:
        """Commits what is queued, then stops the committer."""
        self._stopping = True
        self._queued.set()
        if self._dividends is not None:
            self._dividends.cancel()
        if self._task is not None:
            await self._task
        if self._checkpoint is not None:
            await asyncio.wait({self._checkpoint})
        if self.ready and self.store is not None:
            # a last checkpoint, so the next start replays no journal tail
            try:
                await self.store.fold_checkpoint_now()
            except Exception as error:  # the next start replays the tail instead
                log.warning("final balance checkpoint not written", extra={"error": repr(error)})

    # --- merchants ---

    def ready_store(self) -> Store:
        """The store, once recovery is done; UNAVAILABLE (retryable) before, or while recovering."""
        if self.store is None or not self.ready:
            raise Rejection(Code.UNAVAILABLE, "the service is starting or recovering; retry shortly")
        return self.store

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        store = self.ready_store()
        row = self.merchants.by_id.get(merchant_id)
        if row is None:
            row = await store.merchant(merchant_id)
            if row is not None:
                self.merchants.add(row)
        return row

    # --- calls ---

    async def submit(self, op: Operation) -> Outcome:
        """Queues a mutating operation and returns its outcome once durable (or replayed)."""
        key = (op.merchant_id, op.idempotency_key)
        while (first := self._inflight.get(key)) is not None:
            # The same key is in flight: wait for its outcome rather than posting twice.
            outcome = await asyncio.shield(first.future)
            if outcome.code is Code.ALREADY_EXISTS or outcome.code in _NOT_RECORDED or not outcome.recorded:
                # That call decided nothing for the key (it was refused as a conflicting retry, or not
                # recorded): this one is decided on its own, against the stored record if there is one.
                continue
            return _replay(first.method.value, first.request, outcome, op)
        # shield: a caller that goes away does not cancel the operation; its batch still resolves it
        return await asyncio.shield(self._enqueue(op))

    def enqueue(self, op: Operation) -> asyncio.Future:
        """What submit() does, without a coroutine, a task and a shield per operation (a batch of a
        thousand operations costs a thousand futures, nothing more): returns a future of the outcome.
        Raises Rejection as submit() does. The caller must not cancel the future (it is the operation's
        own; wait for it through a future of your own, e.g. all_done())."""
        if (op.merchant_id, op.idempotency_key) in self._inflight:
            return asyncio.ensure_future(self.submit(op))  # rare: waits for the call in flight first
        return self._enqueue(op)

    def _enqueue(self, op: Operation) -> asyncio.Future:
        if not self.ready:
            raise Rejection(Code.UNAVAILABLE, "the ledger is recovering from a database failure; retry shortly")
        if self.draining or self._stopping:
            raise Rejection(Code.UNAVAILABLE, "the service is shutting down; retry with the same idempotency key")
        if len(self._queue) >= self.settings.queue_operations_max:
            metrics.operations_shed.inc()
            raise Rejection(Code.RESOURCE_EXHAUSTED,
                            f"the service is at capacity ({len(self._queue)} operations waiting to commit); "
                            "retry with exponential backoff")
        self.quotas.enqueue(op.merchant_id)  # RESOURCE_EXHAUSTED beyond the merchant's share of the queue
        op.future = asyncio.get_running_loop().create_future()
        op.future.add_done_callback(lambda _, merchant_id=op.merchant_id: self.quotas.dequeued(merchant_id))
        op.enqueued_at = time.monotonic()
        self._inflight[(op.merchant_id, op.idempotency_key)] = op
        self._queue.append(op)
        if len(self._queue) >= self._wake_at:
            self._queued.set()
        return op.future

    def request_resync(self) -> None:
        """Stops new work (UNAVAILABLE) until the committer has rebuilt the fast path from Postgres."""
        self.ready = False
        self._resync_requested = True
        self._queued.set()

    async def committed_view(self):
        """Waits until every batch applied to the fast path is committed, so what it shows is durable.
        While a reader waits, the committer answers the batch being written before it applies the
        next (the pipelining pauses for that moment). Releases holds that expired since the last batch
        (their Postgres rows follow with the next batch)."""
        self._readers_waiting += 1
        try:
            while self._open:
                self._queued.set()  # the committer may be waiting for the next batch to grow
                await self._finished_event().wait()
        finally:
            self._readers_waiting -= 1
        if not self.ready:
            raise Rejection(Code.UNAVAILABLE, "the ledger is recovering from a database failure; retry shortly")
        expired = self.ledger.expire_holds(now_micros(), self.settings.holds_expired_per_batch_max)
        self._expired_pending.extend(expired)
        if expired:
            self._queued.set()
        return self.ledger

    async def settle_before(self, cut_off_us: int) -> None:
        """Makes every transaction dated before cut_off durable and every later one dated at or after it:
        the point where a settlement period can be closed at cut_off while traffic goes on."""
        if cut_off_us > now_micros():
            raise Rejection(Code.INVALID_ARGUMENT, "cut_off is in the future; a period closes at or before now")
        self._clock_floor_us = max(self._clock_floor_us, cut_off_us)
        # batches applied from now on are dated at or after cut_off; wait for those dated before it
        while self._open and self._open[0].dated_us < cut_off_us:
            await self._finished_event().wait()

    def _finished_event(self) -> asyncio.Event:
        """An event set when the next batch is answered (committed or failed)."""
        if self._finished is None:
            self._finished = asyncio.Event()
        return self._finished

    def _signal_finished(self) -> None:
        if self._finished is not None:
            self._finished.set()
            self._finished = None

    # --- the committer ---
    #
    # Two batches overlap: while batch N is written to Postgres (a task on its own connection), the
    # committer reads and applies batch N+1 to the fast path on top of N (a nested undo batch). N+1's
    # write starts only once N is answered, so commits stay in order and each call is answered after
    # its own commit. If N's write fails, the fast path is rolled back past both, and N+1's calls are
    # answered UNAVAILABLE (nothing of them was written; a retry with the same key is safe).

    async def _run(self) -> None:
        settings = self.settings
        while True:
            writing = self._open[0] if self._open else None
            if writing is not None and (writing.task is None or writing.task.done() or self._must_drain()
                                        or (not self._queue and not self._expired_pending)):
                await self._finish(writing)
                continue
            if self._forget_due and writing is None:
                self._forget_due = False
                self.ledger.forget_resolved()
                self.program.forget_resolved_holds()
                self.program.earns.clear()  # earn records come back by prefetch when a refund needs one
            if writing is None and self.program.spends:
                self.program.prune_spends(now_micros())  # at most once a minute
            if self._resync_requested:
                self._resync_requested = False
                self._fail([self._queue.popleft() for _ in range(len(self._queue))], Code.UNAVAILABLE,
                           "the service is resynchronising with the ledger database; retry with the same "
                           "idempotency key")
                await self._resync()
                continue
            if not self._queue and not self._expired_pending and not self._lots_due() \
                    and not self.program.dividends_unposted:
                if self._stopping:
                    return
                self._queued.clear()
                self._wake_for_lots()
                await self._queued.wait()
                continue
            if writing is not None:
                # let the next batch grow to the size of the one being written, or until that write ends
                wanted = min(settings.batch_operations_max, len(writing.batch))
                if len(self._queue) < wanted and not self._stopping:
                    self._wake_at = wanted
                    self._queued.clear()
                    await self._queued.wait()
                    self._wake_at = 1
                    continue
            elif settings.batch_linger_seconds and len(self._queue) < settings.batch_operations_max \
                    and not self._stopping:
                await asyncio.sleep(settings.batch_linger_seconds)
            size = min(len(self._queue), settings.batch_operations_max)
            batch = [self._queue.popleft() for _ in range(size)]
            try:
                prepared = await self._prepare(batch)
                if prepared is None:
                    continue
                if self._open[0] is not prepared and not await self._finish(self._open[0]):
                    continue  # the write before it failed: it was rolled back and answered with it
                self._start_write(prepared)
            except domain.InvariantViolation as error:
                log.critical("ledger invariant violated; stopping", extra={"error": str(error)})
                self._fail_open(Code.INTERNAL, _INTERNAL_MESSAGE)
                self._fail(batch, Code.INTERNAL, _INTERNAL_MESSAGE)
                self.ready = False
                raise
            except Exception:  # a bug, not a database fault: keep serving, answer INTERNAL
                log.exception("batch failed unexpectedly")
                self._fail(batch, Code.INTERNAL, _INTERNAL_MESSAGE)

    def _must_drain(self) -> bool:
        """Whether the batch being written must be answered before the next is applied."""
        return bool(self._readers_waiting or self._forget_due or self._resync_requested or self._stopping
                    or self._open[0].dated_us < self._clock_floor_us)

    async def _prepare(self, batch: list[Operation]) -> "_Prepared | None":
        """Reads what the batch needs from Postgres, then applies it to the fast path in one go (no
        await from taking its time until it is in self._open). None if the reads failed (the batch's
        calls are answered)."""
        settings = self.settings
        started = time.monotonic()
        for op in batch:
            metrics.queue_wait_seconds.observe(started - op.enqueued_at)
        try:
            stored = await self.store.stored_outcomes([(op.merchant_id, op.idempotency_key) for op in batch])
            await self._prefetch(batch, now_micros())
            dividends = []
            if self.program.dividends_unposted and not self._open:
                # only with no batch in flight: a chunk read now is not being posted by a batch unanswered
                dividends = await self.store.unposted_allocations(self.settings.program_id,
                                                                  settings.batch_operations_max)
                self.program.dividends_unposted = bool(dividends)
            # account ids for what the batch may open: a new member's account, and under the rules up to
            # three voucher accounts per operation or allocation
            need = len(batch) + (3 * (len(batch) + len(dividends)) if self.program.program is not None else 0)
            if len(self._account_ids) < need:
                self._account_ids.extend(await self.store.reserve_account_ids(
                    max(need, settings.batch_operations_max)))
        except domain.InvariantViolation:
            raise
        except Exception as error:  # reads only: nothing of this batch was written
            # the batch being written is answered first: a resync must not rebuild the fast path under it
            if self._open and not await self._finish(self._open[0]):
                self._fail(batch, Code.UNAVAILABLE, _NOT_APPLIED_MESSAGE)
                return None
            await self._database_failed(batch, error, ambiguous=False)
            return None
        if self._open and (self._must_drain() or not self.ready):
            # a reader, a settlement cut or a resync arrived during the reads: the batch being written
            # is answered first, so nothing uncommitted is visible when this one is applied
            if not await self._finish(self._open[0]):
                self._fail(batch, Code.UNAVAILABLE, _NOT_APPLIED_MESSAGE)
                return None
            await asyncio.sleep(0)  # readers woken by that answer run now
        if not self.ready:
            self._fail(batch, Code.UNAVAILABLE, "the ledger is recovering from a database failure; retry shortly")
            return None

        # The batch's time is taken here and the batch joins self._open with no await in between, so a
        # settlement cut (settle_before) sees every batch dated before it as committed or in self._open.
        now_us = self._clock_floor_us = max(now_micros(), self._clock_floor_us)
        ledger = self.ledger
        write = BatchWrite(created_at=from_micros(now_us))
        ledger.begin()
        self.program.begin()
        try:
            expired, self._expired_pending = self._expired_pending, []
            write.expired_holds = expired + ledger.expire_holds(now_us, settings.holds_expired_per_batch_max)
            for authorization_id in write.expired_holds:
                self._restore_hold(authorization_id, now_us)
            for authorization_id in self.program.voucher_holds_due(now_us, settings.holds_expired_per_batch_max):
                self.program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_EXPIRED)
            self._expire_lots(write, now_us)
            if dividends:
                self._post_dividends(write, dividends, now_us)
            outcomes = self._apply_batch(batch, stored, write, now_us)
            for op, outcome in zip(batch, outcomes):
                key = (op.merchant_id, op.idempotency_key)
                if key in stored or outcome.code in _NOT_RECORDED or not outcome.recorded:
                    continue  # a replay keeps its record; a refusal about the service's state is not one
                write.idempotency.append((
                    op.merchant_id, op.idempotency_key, op.method.value, to_json(op.request),
                    outcome.code.value, to_json(outcome.fields) if outcome.code is Code.OK else None,
                    outcome.message))
            self.program.check_lots(lambda member_id: ledger.balance(ledger.member_slot(member_id)))
            write.rules = self.program.flush()
            write.last_transaction_id = self.ids.next_transaction_id - 1
            write.last_authorization_id = self.ids.next_authorization_id - 1
            _check_balanced(write)
        except BaseException:
            ledger.rollback_newest()
            self.program.rollback_newest()
            raise
        prepared = _Prepared(batch, outcomes, write, now_us)
        self._open.append(prepared)
        return prepared

    def _start_write(self, prepared: "_Prepared") -> None:
        if prepared.write.empty:
            return  # answered by _finish without a round trip
        prepared.started = time.monotonic()
        prepared.task = asyncio.get_running_loop().create_task(
            self.store.write_batch(prepared.write, self.settings.commit_timeout_seconds), name="batch-write")
        prepared.task.add_done_callback(lambda _: self._queued.set())

    async def _finish(self, prepared: "_Prepared") -> bool:
        """Waits for the oldest open batch's write and answers its calls. On a failed write the fast
        path is rolled back past every open batch, and all their calls are answered; returns False."""
        ledger = self.ledger
        require(self._open and self._open[0] is prepared, "batches are answered in the order they were applied")
        try:
            if prepared.task is not None:
                await prepared.task
                metrics.commit_seconds.observe(time.monotonic() - prepared.started)
        except domain.InvariantViolation:
            ledger.rollback()
            self.program.rollback()
            self._fail_open(Code.INTERNAL, _INTERNAL_MESSAGE)
            raise
        except Exception as error:
            ledger.rollback()
            self.program.rollback()
            batch = prepared.batch
            self._open.popleft()
            self._fail_open(Code.UNAVAILABLE, _NOT_APPLIED_MESSAGE)
            await self._database_failed(batch, error, ambiguous=_commit_may_have_happened(error))
            return False
        ledger.commit()
        self.program.commit()
        self._open.popleft()
        self._committed(prepared.write)
        metrics.batches.labels("committed").inc()
        metrics.batch_operations.observe(len(prepared.batch))
        _count_committed(prepared.write, ledger)
        if ledger.transactions_resident_count > self.settings.transactions_resident_max // 2:
            self._forget_due = True
        for op, outcome in zip(prepared.batch, prepared.outcomes):
            self._resolve(op, outcome)
        self._signal_finished()
        return True

    def _committed(self, write: BatchWrite) -> None:
        """Adds a committed batch's entries to what the next balance checkpoint folds in, and starts
        that checkpoint when it is due."""
        pending = self._pending_deltas
        for entry in write.entries:
            account_id = entry[1]
            pending[account_id] = pending.get(account_id, 0) + entry[2]
        if write.transactions:
            self._pending_through = max(self._pending_through, max(t[0] for t in write.transactions))
        self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        pending = self._pending_deltas
        if self._checkpoint is None and pending and self.ready and not (self._resync_requested or self._stopping) and (
                time.monotonic() >= self._checkpoint_due_at
                or len(pending) >= self.settings.balance_checkpoint_accounts_max):
            # every batch up to _pending_through is committed and no later one is: the pending sums
            # are exactly the journal from the last checkpoint through it
            self._checkpoint = asyncio.get_running_loop().create_task(
                self._write_checkpoint(pending, self._pending_through), name="balance-checkpoint")
            self._pending_deltas = {}

    async def _write_checkpoint(self, deltas: dict[int, int], through: int) -> None:
        """Writes one checkpoint beside the batches (its own transaction: a batch never waits for it)."""
        try:
            await self.store.write_checkpoint(deltas, through, self.settings.commit_timeout_seconds)
        except Exception as error:
            log.warning("balance checkpoint not written; the next one includes its accounts",
                        extra={"error": repr(error)})
            if _commit_may_have_happened(error):
                # only Postgres knows whether it was folded: rebuild from it rather than fold twice
                self.request_resync()
            else:
                pending = self._pending_deltas
                for account_id, delta in deltas.items():
                    pending[account_id] = pending.get(account_id, 0) + delta
        else:
            metrics.checkpoints.inc()
            metrics.checkpoint_accounts.observe(len(deltas))
        finally:
            self._checkpoint = None
            interval = self.settings.balance_checkpoint_seconds
            self._checkpoint_due_at = time.monotonic() + interval
            # what committed meanwhile is folded by the next one even if no batch comes to start it
            asyncio.get_running_loop().call_later(interval, self._maybe_checkpoint)

    def _fail_open(self, code: Code, message: str) -> None:
        """Answers every batch still open (after a rollback of all of them)."""
        while self._open:
            self._fail(self._open.popleft().batch, code, message)
        self._signal_finished()

    def _resolve(self, op: Operation, outcome: Outcome) -> None:
        self._inflight.pop((op.merchant_id, op.idempotency_key), None)
        if op.future is not None and not op.future.done():
            op.future.set_result(outcome)

    def _fail(self, batch: list[Operation], code: Code, message: str) -> None:
        for op in batch:
            self._resolve(op, Outcome(code, message=message))

    async def _database_failed(self, batch: list[Operation], error: BaseException, ambiguous: bool) -> None:
        metrics.batches.labels("failed").inc()
        log.error("batch not committed", extra={"error": repr(error), "operations": len(batch),
                                                "ambiguous": ambiguous})
        if ambiguous:
            message = ("the ledger database connection broke while this operation was being committed; "
                       "its outcome is unknown. Retry with the same idempotency key to learn it")
        else:
            message = _NOT_APPLIED_MESSAGE
        self._fail(batch, Code.UNAVAILABLE, message)
        if _divergent(error):
            # The fast path and Postgres disagree (an id already taken) or another service may be the
            # writer now: retrying the same batch would fail again or worse. Rebuild from Postgres (or
            # stop, if the writer lock is another's).
            log.critical("batch refused as divergent from the ledger database; resynchronising",
                         extra={"error": repr(error)})
            await self._resync()
        elif ambiguous or not await self.store.reachable():
            # Until Postgres answers again the service cannot commit: calls get UNAVAILABLE at once
            # and health says NOT_SERVING; then the fast path is rebuilt from Postgres.
            await self._resync()

    async def _resync(self) -> None:
        """Rebuilds the fast path from Postgres, retrying until Postgres answers. Calls arriving
        meanwhile get UNAVAILABLE."""
        require(not self._open, "resync with a batch still open: its write must be answered first")
        if self._checkpoint is not None:  # recovery reads the checkpoint: let the one in flight land first
            await asyncio.wait({self._checkpoint})
        self.ready = False
        metrics.resyncs.inc()
        delay = 0.05
        while True:
            try:
                # a bounded probe first: recovery's own reads would wait out a stalled server
                if await self.store.reachable():
                    await self.recover()
                    return
                raise TimeoutError("Postgres is unreachable")
            except (domain.InvariantViolation, fastpath.LedgerInvariantError, StoreError):
                raise  # a bug, or another writer took the ledger while Postgres was away: stop
            except Exception as error:
                log.warning("resync from postgres failed; retrying", extra={"error": repr(error)})
                # fail what queued up meanwhile, so callers do not wait on a dead database
                self._fail([self._queue.popleft() for _ in range(len(self._queue))], Code.UNAVAILABLE,
                           "the ledger database is unreachable; retry with the same idempotency key")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _prefetch(self, batch: list[Operation], now_us: int) -> None:
        """Loads into the fast path the holds and transactions the batch refers to, from Postgres."""
        ledger = self.ledger
        self._not_refundable = {}
        hold_ids = {op.authorization_id for op in batch
                    if op.method in (Method.CAPTURE, Method.VOID) and not ledger.has_hold(op.authorization_id)}
        transaction_ids = {op.transaction_id for op in batch
                           if op.method is Method.REFUND and not ledger.has_transaction(op.transaction_id)}
        if hold_ids:
            for hold in await self.store.holds(hold_ids):
                status = hold.status
                if status == fastpath.HOLD_OPEN and hold.expires_at_us <= now_us:
                    status = fastpath.HOLD_STATUS_EXPIRED
                    self._expired_pending.append(hold.authorization_id)
                ledger.load_hold(hold.authorization_id, ledger.member_slot(hold.member_id),
                                 self.merchants.by_id[hold.merchant_id].merchant_slot, hold.amount,
                                 hold.expires_at_us, status)
        if self.program.program is not None:
            wanted = {a for a in hold_ids if a not in self.program.voucher_holds}
            if wanted:  # resolved split-tender holds forgotten since (open ones are all resident)
                for r in await self.store.voucher_holds(wanted):
                    self.program.load_voucher_hold(r["authorization_id"], voucher_hold(r))
            wanted = {op.transaction_id for op in batch
                      if op.method is Method.REFUND and op.transaction_id not in self.program.earns
                      and op.transaction_id not in self.program.splits}
            if wanted:
                for r in await self.store.earn_records(wanted):
                    self.program.load_earn(r["transaction_id"], earn_record(r))
                for r in await self.store.split_records(wanted):
                    self.program.splits[r["transaction_id"]] = SplitRecord(
                        r["member_id"], r["merchant_id"], r["vouchers"], r["points"], r["from_credit"], r["refunded"])
        if transaction_ids:
            for t in await self.store.transactions(transaction_ids):
                merchant = self.merchants.by_id.get(t.merchant_id)
                member_slot = ledger.member_slot(t.member_id)
                split = self.program.splits.get(t.transaction_id)
                if t.kind == rules.KIND_SPLIT_REDEEM and split is not None and split.points:
                    # its points part, as the fast path refunds it
                    points_refunded = split.refunded - rules.proportional_share(
                        split.vouchers, split.vouchers + split.points, 0, split.refunded)
                    ledger.load_transaction(t.transaction_id, fastpath.KIND_REDEEM, member_slot,
                                            merchant.merchant_slot, split.points, points_refunded)
                    continue
                if t.kind > fastpath.KIND_REFUND_EARN:
                    # a transaction the program rules set off: never refundable by a merchant (the fast
                    # path answers NOT_REFUNDABLE, or WRONG_MERCHANT to another merchant)
                    if merchant is None or member_slot < 0:
                        self._not_refundable[t.transaction_id] = t.merchant_id
                        continue
                    ledger.load_transaction(t.transaction_id, fastpath.KIND_REFUND_EARN, member_slot,
                                            merchant.merchant_slot, t.amount, 0)
                    continue
                ledger.load_transaction(t.transaction_id, t.kind, member_slot, merchant.merchant_slot, t.amount,
                                        t.refunded)

    # --- the batch on the fast path ---

    def _apply_batch(self, batch: list[Operation], stored: dict, write: BatchWrite, now_us: int) -> list[Outcome]:
        """Applies the batch's operations to the fast path in one kernel call (Ledger.apply_batch, a loop
        over int64 arrays in C): a first pass decides replays and suspended merchants and resolves ids to
        slots, the kernel decides every balance check in order, and a second pass turns its rows into
        journal rows and outcomes."""
        ledger = self.ledger
        merchants = self.merchants.by_id
        ids = self.ids
        version = self.program.version(now_us)
        outcomes: list[Outcome | None] = [None] * len(batch)
        applied: list[int] = []  # positions in the batch of the operations given to the kernel
        holds_taken: list[int] = []  # positions of authorizes counted against their merchant's open holds
        method, member, merchant, points, ref_id, new_id, expires_at_us = (array.array("q") for _ in range(7))
        for position, op in enumerate(batch):
            previous = stored.get((op.merchant_id, op.idempotency_key))
            if previous is not None:
                outcomes[position] = _replay(previous.method, previous.request, Outcome(
                    Code(previous.outcome), previous.response or {}, previous.message), op)
                continue
            if op.refusal is not None:  # decided before queueing (member presence); a retry above still replays
                outcomes[position] = op.refusal
                continue
            kind = op.method
            status = merchants[op.merchant_id].status
            if status != "active" and kind in _NEW_BUSINESS:
                # decided here, after the idempotency look-up, so a retry of an earlier call still replays
                metrics.rejections.labels("merchant_suspended").inc()
                outcomes[position] = Outcome(
                    Code.FAILED_PRECONDITION, recorded=False,
                    message=f"merchant {op.merchant_id!r} is {status}: it cannot earn, authorize or redeem; "
                            "it may still capture, void and refund. Contact the operator")
                continue
            slot = reference = created = expires = 0
            if kind is Method.EARN or kind is Method.CONVERT or kind is Method.LINK:
                if ledger.member_slot(op.member_id) < 0:  # a new member: within the merchant's quota only
                    refusal = self.quotas.new_member(op.merchant_id, op.points if kind is Method.EARN else None,
                                                     now_us)
                    if refusal is not None:
                        outcomes[position] = refusal
                        continue
                slot = ledger.ensure_member(op.member_id)
                if slot < 0:
                    outcomes[position] = _ledger_rejection(fastpath.CAPACITY, op)
                    continue
                if ledger.member_account(slot) == 0:  # created just now: its account row goes with the batch
                    account_id = self._account_ids.pop()
                    ledger.set_member_account(slot, account_id)
                    write.new_members.append((op.member_id, account_id))
                created = ids.transaction() if kind is not Method.LINK else 0
            elif kind is Method.REDEEM or kind is Method.AUTHORIZE:
                slot = ledger.member_slot(op.member_id)
                if slot < 0:
                    metrics.rejections.labels("unknown_member").inc()
                    outcomes[position] = Outcome(Code.NOT_FOUND, message=(
                        f"member {op.member_id!r} has no points account; a member is created by its first Earn"))
                    continue
                if kind is Method.AUTHORIZE:
                    refusal = self.quotas.take_hold(op.merchant_id)
                    if refusal is not None:
                        outcomes[position] = refusal
                        continue
                    holds_taken.append(position)
                    created = ids.authorization()
                    expires = now_us + op.hold_ttl_seconds * 1_000_000
                else:
                    created = ids.transaction()
            elif kind is Method.CAPTURE:
                reference, created = op.authorization_id, ids.transaction()
            elif kind is Method.VOID:
                reference = op.authorization_id
            elif kind is Method.REFUND:
                owner = self._not_refundable.get(op.transaction_id)
                if owner is not None:  # a rule's transaction with no member (a merchant's vouchers)
                    outcomes[position] = _ledger_rejection(
                        fastpath.NOT_REFUNDABLE if owner == op.merchant_id else fastpath.WRONG_MERCHANT, op)
                    continue
                reference, created = op.transaction_id, ids.transaction()
            elif kind is Method.SPEND_VOUCHERS:
                created = ids.transaction()
            if version is not None or kind in _RULES_ONLY or op.vouchers or (
                    kind is Method.REFUND and op.transaction_id in self.program.splits) or (
                    op.authorization_id and op.authorization_id in self.program.voucher_holds):
                # under a program each operation goes through the kernel on its own, with the rules
                # evaluated around it in order (an earn's bonuses change what the next operation sees)
                outcomes[position] = self._apply_capped(op, write, now_us, version, slot, reference, created,
                                                        expires)
                continue
            applied.append(position)
            method.append(_OP_CODE[kind])
            member.append(slot)
            merchant.append(op.merchant_slot)
            points.append(op.points)
            ref_id.append(reference)
            new_id.append(created)
            expires_at_us.append(expires)
        if applied:
            zeros = bytes(8 * len(applied))
            status, slot, amount, posted, available, kind = rows = [array.array("q", zeros) for _ in range(6)]
            ledger.apply_batch(method, member, merchant, points, ref_id, new_id, expires_at_us, now_us, *rows)
            for i, position in enumerate(applied):
                outcomes[position] = self._applied(batch[position], write, now_us, new_id[i], status[i], slot[i],
                                                   amount[i], posted[i], available[i], kind[i])
        for position in holds_taken:
            if outcomes[position].code is not Code.OK:
                self.quotas.hold_not_opened(batch[position].merchant_id)
        return outcomes

    def _applied(self, op: Operation, write: BatchWrite, now_us: int, created: int, status: int, slot: int,
                 amount: int, posted: int, available: int, kind: int) -> Outcome:
        """One row of the kernel: the journal rows of an applied operation and its outcome."""
        ledger = self.ledger
        method = op.method
        if status == fastpath.HOLD_EXPIRED:
            write.expired_holds.append(op.authorization_id)  # the kernel marked it; Postgres follows
        if status != fastpath.OK:
            expires = held = 0
            if method in (Method.CAPTURE, Method.VOID) and ledger.has_hold(op.authorization_id):
                _, _, _, held, expires = ledger.hold(op.authorization_id)
            return _ledger_rejection(status, op, available, expires, held)
        merchant = self.merchants.by_id[op.merchant_id]
        if method is Method.EARN:
            fee = self._fee(write, created, merchant, op.points, "fee_issued_bps")
            write.transactions.append((created, fastpath.KIND_EARN, op.merchant_id, op.member_id, op.points,
                                       op.purchase_amount, None, None, op.idempotency_key, fee))
            if op.points:
                write.entries.append((created, ledger.member_account(slot), op.points))
                write.entries.append((created, merchant.issued_account_id, -op.points))
            return Outcome(Code.OK, {"transaction_id": created, "points": op.points, "balance": posted,
                                     "give_back_bps": merchant.give_back_bps, "created_at_us": now_us})
        if method is Method.AUTHORIZE:
            expires = now_us + op.hold_ttl_seconds * 1_000_000
            write.new_holds.append((created, op.merchant_id, op.member_id, op.points, from_micros(expires),
                                    op.idempotency_key))
            return Outcome(Code.OK, {"authorization_id": created, "available": available, "points": op.points,
                                     "expires_at_us": expires})
        if method is Method.CAPTURE:
            held = ledger.hold(op.authorization_id)[3]
            write.resolved_holds.append((op.authorization_id, fastpath.HOLD_STATUS_CAPTURED, amount,
                                         created if amount else None))
            if amount:
                fee = self._fee(write, created, merchant, amount, "fee_redeemed_bps")
                write.transactions.append((created, fastpath.KIND_CAPTURE, op.merchant_id, ledger.member_id(slot),
                                           amount, None, op.authorization_id, None, op.idempotency_key, fee))
                write.entries.append((created, ledger.member_account(slot), -amount))
                write.entries.append((created, merchant.redeemed_account_id, amount))
            return Outcome(Code.OK, {"transaction_id": created if amount else 0, "points": amount,
                                     "released": held - amount, "balance": posted, "available": available})
        if method is Method.VOID:
            write.resolved_holds.append((op.authorization_id, fastpath.HOLD_STATUS_VOIDED, 0, None))
            return Outcome(Code.OK, {"released": amount, "available": available})
        if method is Method.REDEEM:
            fee = self._fee(write, created, merchant, op.points, "fee_redeemed_bps")
            write.transactions.append((created, fastpath.KIND_REDEEM, op.merchant_id, op.member_id, op.points,
                                       None, None, None, op.idempotency_key, fee))
            write.entries.append((created, ledger.member_account(slot), -op.points))
            write.entries.append((created, merchant.redeemed_account_id, op.points))
            return Outcome(Code.OK, {"transaction_id": created, "points": op.points, "balance": posted,
                                     "available": available})
        member_account = ledger.member_account(slot)
        write.transactions.append((created, kind, op.merchant_id, ledger.member_id(slot), op.points, None, None,
                                   op.transaction_id, op.idempotency_key, 0))
        write.refunds.append((op.transaction_id, op.points))
        if kind == fastpath.KIND_REFUND_REDEMPTION:
            write.entries.append((created, merchant.redeemed_account_id, -op.points))
            write.entries.append((created, member_account, op.points))
        else:
            require(kind == fastpath.KIND_REFUND_EARN, f"refund kind {kind}")
            write.entries.append((created, member_account, -op.points))
            write.entries.append((created, merchant.issued_account_id, op.points))
        return Outcome(Code.OK, {"transaction_id": created, "points": op.points, "kind": kind, "balance": posted,
                                 "available": available})

    def _fee(self, write: BatchWrite, transaction_id: int, merchant: MerchantRow, points: int, schedule: str) -> int:
        """The operator's fee on a transaction, posted in it: merchant's fees account to fee revenue."""
        fee = domain.fee_point_units(points, getattr(merchant, schedule))
        if fee:
            write.entries.append((transaction_id, merchant.fees_account_id, -fee))
            write.entries.append((transaction_id, self.operator_accounts[domain.ACCOUNT_OPERATOR_FEE_REVENUE], fee))
        return fee


    # --- the program rules (docs/RULES.md): each operation through the kernel on its own, the rules
    #     evaluated around it, their postings in the same batch ---

    def _apply_capped(self, op: Operation, write: BatchWrite, now_us: int, version: "rules.ProgramVersion | None",
                      slot: int, reference: int, created: int, expires: int) -> Outcome:
        """_apply_with_rules under the program's spending caps (processor/velocity.py): a Redeem or
        Authorize past a cap is refused before anything moves; the points a Redeem or Capture took count."""
        method, program = op.method, self.program
        if version is not None and (method is Method.REDEEM or method is Method.AUTHORIZE) and op.points and (
                version.member_points_spent_per_hour_max or version.member_points_spent_per_day_max):
            refusal = velocity.refusal(program.spends.get(op.member_id, ()), now_us, op.member_id,
                                       self.ledger.balance(slot)[1], op.points,
                                       version.member_points_spent_per_hour_max,
                                       version.member_points_spent_per_day_max)
            if refusal is not None:
                metrics.rejections.labels("spending_cap").inc()
                return refusal
        member_id = op.member_id
        if method is Method.CAPTURE:  # whose hold it is, before the capture resolves it
            hold = program.voucher_holds.get(op.authorization_id)
            if hold is not None:
                member_id = hold.member_id
            elif self.ledger.has_hold(op.authorization_id):
                member_id = self.ledger.member_id(self.ledger.hold(op.authorization_id)[1])
        outcome = self._apply_with_rules(op, write, now_us, version, slot, reference, created, expires)
        if outcome.code is Code.OK and (method is Method.REDEEM or method is Method.CAPTURE) and member_id:
            program.spend(member_id, outcome.fields.get("points", 0), now_us)
        return outcome

    def _apply_with_rules(self, op: Operation, write: BatchWrite, now_us: int,
                          version: "rules.ProgramVersion | None", slot: int, reference: int, created: int,
                          expires: int) -> Outcome:
        method = op.method
        try:
            if method is Method.LINK:
                return self._link(op)
            if method is Method.CONVERT:
                return self._convert(op, write, now_us, version, slot, created)
            if method is Method.SPEND_VOUCHERS:
                return self._spend_vouchers(op, write, now_us, version, created)
            if method is Method.REDEEM and op.vouchers:
                return self._split_redeem(op, write, now_us, version, slot, created)
            if method is Method.AUTHORIZE and op.vouchers:
                return self._split_authorize(op, write, now_us, version, slot, created, expires)
            if method is Method.CAPTURE or method is Method.VOID:
                hold = self.program.voucher_holds.get(op.authorization_id)
                if hold is not None:
                    return self._split_resolve(op, write, now_us, version, created, hold)
                if op.vouchers:
                    if not self.ledger.has_hold(op.authorization_id):
                        return _ledger_rejection(fastpath.UNKNOWN_HOLD, op)
                    raise Rejection(Code.INVALID_ARGUMENT, (
                        f"authorization {domain.format_authorization_id(op.authorization_id)} holds no vouchers; "
                        "capture points only (vouchers = 0)"))
            if method is Method.REFUND and op.transaction_id in self.program.splits:
                return self._split_refund(op, write, now_us, version, created)
            points, plan, refund = op.points, None, None
            if method is Method.EARN and version is not None:
                plan = self.program.plan_earn(version, op.member_id, op.merchant_id, op.points, now_us)
                points = plan.total
            elif method is Method.REDEEM or method is Method.AUTHORIZE:
                self._expire_member(write, op.member_id, now_us)  # expired points are not spendable
            elif method is Method.REFUND:
                refund = self.program.refund_plan(op.transaction_id, op.points)
                if refund is not None:
                    points = refund[1].total
        except Rejection as rejection:
            metrics.rejections.labels("program_rule").inc()
            return Outcome(rejection.code, message=rejection.message)
        status, slot, amount, posted, available, kind = self._kernel_one(
            op, slot, points, reference, created, expires, now_us)
        if status != fastpath.OK:
            if status == fastpath.HOLD_EXPIRED:
                self._restore_hold(op.authorization_id, now_us)
            return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
        program = self.program
        if method is Method.EARN and plan is not None:
            return self._earned(op, write, now_us, version, plan, created, slot)
        if method is Method.REFUND and kind == fastpath.KIND_REFUND_EARN:
            return self._earn_refunded(op, write, now_us, refund, created, slot, amount, available)
        hold = self.ledger.hold(op.authorization_id) if method in (Method.CAPTURE, Method.VOID) else None
        outcome = self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
        member_id = self.ledger.member_id(slot)
        grace = version.restore_grace_us if version is not None else 0
        if method is Method.AUTHORIZE or method is Method.REDEEM:
            owner = (OWNER_HOLD, created) if method is Method.AUTHORIZE else (OWNER_TRANSACTION, created)
            program.consume(member_id, owner, amount, available + amount, now_us)
        elif method is Method.CAPTURE:
            released = hold[3] - amount
            program.restore(member_id, (OWNER_HOLD, op.authorization_id), released, available - released, now_us,
                            grace, keep_as=(OWNER_TRANSACTION, created) if amount else None)
        elif method is Method.VOID:
            program.restore(member_id, (OWNER_HOLD, op.authorization_id), None, available - amount, now_us, grace)
        elif method is Method.REFUND:  # of a capture or redeem: the lots it consumed come back
            program.restore(member_id, (OWNER_TRANSACTION, op.transaction_id), amount, available - amount, now_us,
                            grace)
        return outcome

    def _kernel_one(self, op: Operation, slot: int, points: int, reference: int, created: int, expires: int,
                    now_us: int, method: Method | None = None) -> tuple[int, ...]:
        # one operation through the batch kernel, in arrays of length 1 kept for the purpose (measured:
        # building 13 arrays per operation was a tenth of the rules path's CPU)
        arrays, rows = self._one
        for column, value in zip(arrays, (_OP_CODE[method or op.method], slot, op.merchant_slot, points,
                                          reference, created, expires)):
            column[0] = value
        self.ledger.apply_batch(*arrays, now_us, *rows)
        return tuple(row[0] for row in rows)

    def _earned(self, op: Operation, write: BatchWrite, now_us: int, version: "rules.ProgramVersion",
                plan: "rules.Earn", created: int, slot: int) -> Outcome:
        """An earn under a program: its postings (base from the merchant, uplift from the operator,
        each promotion from its sponsor), then what it set off: level bonuses, the referrer's bonus, the
        acquiring merchant's reward, each a transaction of its own kind in the same batch."""
        ledger, operator = self.ledger, self.operator_accounts
        merchant = self.merchants.by_id[op.merchant_id]
        fee = self._fee(write, created, merchant, plan.base, "fee_issued_bps")
        write.transactions.append((created, fastpath.KIND_EARN, op.merchant_id, op.member_id, plan.total,
                                   op.purchase_amount, None, None, op.idempotency_key, fee, version.version))
        self._earn_entries(write, created, ledger.member_account(slot), merchant, plan, 1)
        effects = self.program.earned(version, created, op.member_id, op.merchant_id, plan, op.purchase_amount,
                                      now_us)
        bonus_points = plan.total - plan.base
        for level, bonus in effects.bonuses:
            self._credit(write, rules.KIND_TIER_BONUS, op.merchant_id, op.member_id, bonus,
                         operator[rules.ACCOUNT_OPERATOR_TIER_REWARDS], f"tier:{op.member_id}:{level}", version,
                         now_us, created)
            bonus_points += bonus
        if effects.referral is not None:
            referrer, bonus = effects.referral
            self._credit(write, rules.KIND_REFERRAL_BONUS, op.merchant_id, referrer, bonus,
                         operator[rules.ACCOUNT_OPERATOR_REFERRALS], f"referral:{op.member_id}", version, now_us,
                         created)
        if effects.acquiring is not None:
            acquirer, reward = effects.acquiring
            self._post(write, rules.KIND_ACQUIRING_REWARD, acquirer, op.member_id, reward,
                       [(operator[rules.ACCOUNT_OPERATOR_ACQUIRING], -reward),
                        (self.merchants.by_id[acquirer].acquiring_account_id, reward)],
                       f"acquiring:{created}", version, original=created)
        posted, held = ledger.balance(slot)
        fields = {"transaction_id": created, "points": plan.base, "balance": posted,
                  "give_back_bps": merchant.give_back_bps, "created_at_us": now_us, "bonus_points": bonus_points,
                  "level": self.program.level(op.member_id, now_us)}
        return Outcome(Code.OK, fields)

    def _earn_entries(self, write: BatchWrite, transaction_id: int, member_account: int, merchant: MerchantRow,
                      earn: "rules.Earn", sign: int) -> None:
        """An earn's entries (sign 1), or a refund's (sign -1, with the portion taken back)."""
        operator = self.operator_accounts
        entries = [(member_account, earn.total), (merchant.issued_account_id, -earn.base),
                   (operator[rules.ACCOUNT_OPERATOR_TIER_REWARDS], -earn.uplift)]
        for grant in earn.grants:
            if grant.sponsor_id == domain.OPERATOR_ID:
                entries.append((operator[rules.ACCOUNT_OPERATOR_PROMOTIONS], -grant.amount))
            else:
                entries.append((self.merchants.by_id[grant.sponsor_id].issued_account_id, -grant.amount))
        _entries(write, transaction_id, [(account_id, sign * amount) for account_id, amount in entries])

    def _earn_refunded(self, op: Operation, write: BatchWrite, now_us: int, refund, created: int, slot: int,
                       taken: int, available: int) -> Outcome:
        merchant = self.merchants.by_id[op.merchant_id]
        member_id = self.ledger.member_id(slot)
        record, portion, reversal = refund if refund is not None else (None, rules.Earn(taken), 0)
        write.transactions.append((created, fastpath.KIND_REFUND_EARN, op.merchant_id, member_id, taken, None, None,
                                   op.transaction_id, op.idempotency_key, 0,
                                   record.version if record is not None else None))
        write.refunds.append((op.transaction_id, taken))
        self._earn_entries(write, created, self.ledger.member_account(slot), merchant, portion, -1)
        version = self.program.version_numbered(record.version) if record is not None else None
        if reversal:
            operator = self.operator_accounts
            self._post(write, rules.KIND_ACQUIRING_REVERSAL, record.acquirer_id, member_id, reversal,
                       [(operator[rules.ACCOUNT_OPERATOR_ACQUIRING], reversal),
                        (self.merchants.by_id[record.acquirer_id].acquiring_account_id, -reversal)],
                       f"acquiring-reversal:{created}", version, original=op.transaction_id)
        self.program.refunded_earn(version, op.transaction_id, record, member_id, portion.base, taken,
                                   available + taken, now_us)
        posted, _ = self.ledger.balance(slot)
        return Outcome(Code.OK, {"transaction_id": created, "points": taken, "kind": fastpath.KIND_REFUND_EARN,
                                 "balance": posted, "available": available,
                                 "bonus_points": portion.total - portion.base})

    def _post(self, write: BatchWrite, kind: int, merchant_id: str, member_id: str, amount: int,
              entries: list[tuple], key: str, version: "rules.ProgramVersion | None",
              original: int | None = None) -> int:
        """A transaction the rules set off (not a merchant's request): its row and entries, each
        (account_id, amount) in points or (account_id, amount, asset)."""
        created = self.ids.transaction()
        write.transactions.append((created, kind, merchant_id, member_id, amount, None, None, original, key, 0,
                                   version.version if version is not None else None))
        _entries(write, created, entries)
        return created

    # --- vouchers: dividend rounds, split tender, voucher credit ---

    def _voucher_account(self, write: BatchWrite, kind: str, owner: str) -> int:
        """The id of a voucher account (member, member_voucher_credit, merchant_vouchers or
        merchant_redeemed in VOUCHERS), opened in this batch if it is new."""
        account_id = self.program.voucher_accounts.get((kind, owner))
        if account_id is None:
            account_id = self._account_ids.pop()
            write.new_accounts.append((account_id, kind, owner, rules.ASSET_VOUCHERS))
            self.program.set_voucher_account((kind, owner), account_id)
        return account_id

    async def _dividend_loop(self) -> None:
        """Decides a dividend round whenever the pool is due one (docs/RULES.md section 4); its
        allocations are then posted by the committer in bounded chunks, beside the traffic."""
        while not self._stopping:
            await asyncio.sleep(self.settings.dividend_check_seconds)
            await self.decide_dividend_round()

    async def decide_dividend_round(self) -> "rules.DividendRound | None":
        program = self.program
        version = program.version(now_micros())
        if not self.ready or version is None or version.dividends is None or program.dividends_unposted:
            return None
        try:
            decided = await self.store.decide_dividend_round(self.settings.program_id, version,
                                                             self.settings.commit_timeout_seconds)
        except Exception as error:  # the next check tries again; nothing was stored
            log.warning("dividend round not decided", extra={"error": repr(error)})
            return None
        if decided is not None:
            program.rounds = decided.round_number
            program.dividends_unposted = True
            self._queued.set()
            log.info("dividend round decided", extra={
                "round": decided.round_number, "pool": decided.pool_point_units, "rate_bps": decided.rate_bps,
                "holders": len(decided.allocations), "total_issued": decided.total_issued})
        return decided

    def _post_dividends(self, write: BatchWrite, rows: list, now_us: int) -> None:
        """Posts a chunk of a decided round's allocations: one kind-11 transaction per holder; a member's
        vouchers repay its voucher credit first."""
        program, vouchers = self.program, rules.ASSET_VOUCHERS
        funding = self.operator_accounts[rules.ACCOUNT_OPERATOR_DIVIDENDS]
        version = program.version(now_us)
        for r in rows:
            number, holder_kind, holder, amount = r["round_number"], r["holder_kind"], r["holder_id"], r["amount"]
            entries = [(funding, -amount, vouchers)]
            if holder_kind == rules.HOLDER_MEMBER:
                repaid, paid_out = rules.apply_dividend(program.credit.get(holder, 0), amount)
                if repaid:
                    entries.append((self._voucher_account(write, rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, holder),
                                    repaid, vouchers))
                    program.move_credit(holder, -repaid)
                if paid_out:
                    entries.append((self._voucher_account(write, domain.ACCOUNT_MEMBER, holder), paid_out, vouchers))
                    program.move_vouchers((rules.HOLDER_MEMBER, holder), paid_out)
                merchant_id, member_id = domain.OPERATOR_ID, holder
            else:
                entries.append((self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHERS, holder), amount, vouchers))
                program.move_vouchers((rules.HOLDER_MERCHANT, holder), amount)
                merchant_id, member_id = holder, ""
            created = self._post(write, rules.KIND_DIVIDEND, merchant_id, member_id, amount, entries,
                                 f"dividend:{number}:{holder_kind}:{holder}", version)
            program.dividend_posted(number, holder_kind, holder, created)

    def _split_redeem(self, op: Operation, write: BatchWrite, now_us: int, version: "rules.ProgramVersion | None",
                      slot: int, created: int) -> Outcome:
        """A redeem paid with vouchers (the member's own first, then its voucher credit) and points."""
        program, ledger, member_id = self.program, self.ledger, op.member_id
        posted, held = ledger.balance(slot)
        # vouchers and credit reserved by open split-tender holds are not spendable
        _, from_credit = rules.voucher_sources(
            program.voucher_available(member_id), program.credit_headroom(version, member_id, posted), op.vouchers)
        if op.points:
            self._expire_member(write, member_id, now_us)
            status, slot, amount, posted, available, kind = self._kernel_one(op, slot, op.points, 0, created, 0,
                                                                             now_us)
            if status != fastpath.OK:
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            program.consume(member_id, (OWNER_TRANSACTION, created), op.points, available + op.points, now_us)
        self._post_split(op, write, version, created, slot, member_id, op.points, op.vouchers, from_credit, None)
        posted, held = ledger.balance(slot)
        return Outcome(Code.OK, {"transaction_id": created, "points": op.points, "balance": posted,
                                 "available": posted - held, "vouchers": op.vouchers,
                                 "voucher_balance": program.vouchers.get((rules.HOLDER_MEMBER, member_id), 0),
                                 "voucher_credit_used": program.credit.get(member_id, 0)})

    def _post_split(self, op: Operation, write: BatchWrite, version: "rules.ProgramVersion | None", created: int,
                    slot: int, member_id: str, points: int, vouchers: int, from_credit: int,
                    authorization_id: int | None) -> None:
        """A SPLIT_REDEEM (kind 12) of a redeem or a capture whose points the kernel has taken: `vouchers`
        of which `from_credit` on the member's credit, the rest its own; the fee on both tenders (a
        voucher-unit is worth a point-unit to the merchant, which is owed both in clearing); its record
        for refunds."""
        program, merchant, asset = self.program, self.merchants.by_id[op.merchant_id], rules.ASSET_VOUCHERS
        from_balance = vouchers - from_credit
        fee = self._fee(write, created, merchant, points + vouchers, "fee_redeemed_bps")
        write.transactions.append((created, rules.KIND_SPLIT_REDEEM, op.merchant_id, member_id, points + vouchers,
                                   None, authorization_id, None, op.idempotency_key, fee,
                                   version.version if version is not None else None))
        _entries(write, created, [
            (self.ledger.member_account(slot), -points), (merchant.redeemed_account_id, points),
            (self._voucher_account(write, domain.ACCOUNT_MEMBER, member_id) if from_balance else 0, -from_balance,
             asset),
            (self._voucher_account(write, rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, member_id) if from_credit else 0,
             -from_credit, asset),
            (self._voucher_account(write, domain.ACCOUNT_MERCHANT_REDEEMED, op.merchant_id) if vouchers else 0,
             vouchers, asset)])
        program.move_vouchers((rules.HOLDER_MEMBER, member_id), -from_balance)
        program.move_credit(member_id, from_credit)
        program.split(created, SplitRecord(member_id, op.merchant_id, vouchers, points, from_credit), new=True)

    def _split_authorize(self, op: Operation, write: BatchWrite, now_us: int,
                         version: "rules.ProgramVersion | None", slot: int, created: int, expires: int) -> Outcome:
        """A split-tender hold: vouchers (the member's own first, then its credit) reserved beside an
        ordinary hold of the points, under one authorization id. Nothing is posted until the capture."""
        program, ledger, member_id = self.program, self.ledger, op.member_id
        if len(program.voucher_holds) >= self.settings.holds_max:  # the same bound as the fast path's holds
            return _ledger_rejection(fastpath.CAPACITY, op)
        posted, held = ledger.balance(slot)
        from_balance, from_credit = rules.voucher_sources(
            program.voucher_available(member_id), program.credit_headroom(version, member_id, posted), op.vouchers)
        available = posted - held
        if op.points:
            self._expire_member(write, member_id, now_us)
            status, slot, amount, posted, available, kind = self._kernel_one(op, slot, op.points, 0, created,
                                                                             expires, now_us)
            if status != fastpath.OK:
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            program.consume(member_id, (OWNER_HOLD, created), amount, available + amount, now_us)
            write.new_holds.append((created, op.merchant_id, member_id, op.points, from_micros(expires),
                                    op.idempotency_key))
        program.hold_vouchers(created, VoucherHold(member_id, op.merchant_id, op.vouchers, from_credit, op.points,
                                                   expires))
        return Outcome(Code.OK, {"authorization_id": created, "available": available, "points": op.points,
                                 "expires_at_us": expires, "vouchers": op.vouchers,
                                 "voucher_available": program.voucher_available(member_id)})

    def _split_resolve(self, op: Operation, write: BatchWrite, now_us: int, version: "rules.ProgramVersion | None",
                       created: int, hold: VoucherHold) -> Outcome:
        """Capture or void of a split-tender hold. A capture takes the points and vouchers asked (both 0:
        the whole hold), each up to its held part, the own vouchers before the credit, and posts them as
        one SPLIT_REDEEM (refunded as one unit); the rest is released."""
        program, ledger, authorization_id = self.program, self.ledger, op.authorization_id
        refusal = _HOLD_REFUSAL.get(hold.status)
        if hold.merchant_id != op.merchant_id:
            refusal = fastpath.WRONG_MERCHANT
        elif refusal is None and hold.expires_at_us <= now_us:
            refusal = fastpath.HOLD_EXPIRED
            program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_EXPIRED)
            if hold.points:  # the fast path marks its part expired and the lots come back
                outcome = self._applied(op, write, now_us, created, *self._kernel_one(
                    op, ledger.member_slot(hold.member_id), 0, authorization_id, 0, 0, now_us, Method.VOID))
                self._restore_hold(authorization_id, now_us)
                return outcome
        if refusal is not None:
            return _ledger_rejection(refusal, op, expires_at_us=hold.expires_at_us)
        capture = op.method is Method.CAPTURE
        points, vouchers = (op.points, op.vouchers) if op.points or op.vouchers else (hold.points, hold.vouchers)
        if capture and (points > hold.points or vouchers > hold.vouchers):
            metrics.rejections.labels("capture_exceeds_hold").inc()
            return Outcome(Code.FAILED_PRECONDITION, reason="capture_exceeds_hold", message=(
                f"capture of {points} point-units and {vouchers} voucher-units exceeds the {hold.points} point-units "
                f"and {hold.vouchers} voucher-units held by {domain.format_authorization_id(authorization_id)}"))
        if not capture:
            points = vouchers = 0
        member_id = hold.member_id
        slot = ledger.member_slot(member_id)
        posted, held = ledger.balance(slot)
        available = posted - held
        grace = version.restore_grace_us if version is not None else 0
        if hold.points:
            kernel = Method.CAPTURE if points else Method.VOID
            status, slot, amount, posted, available, kind = self._kernel_one(
                op, slot, points, authorization_id, created if points else 0, 0, now_us, kernel)
            if status != fastpath.OK:  # the fast path's copy of the hold disagrees: refuse, change nothing
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            released = hold.points - points
            program.restore(member_id, (OWNER_HOLD, authorization_id), released if points else None,
                            available - released, now_us, grace,
                            keep_as=(OWNER_TRANSACTION, created) if points else None)
            write.resolved_holds.append((authorization_id, fastpath.HOLD_STATUS_CAPTURED if capture
                                         else fastpath.HOLD_STATUS_VOIDED, points, created if capture else None))
        if not capture:
            program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_VOIDED)
            return Outcome(Code.OK, {"released": hold.points, "available": available,
                                     "vouchers_released": hold.vouchers})
        program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_CAPTURED, created)
        from_credit = vouchers - min(hold.from_balance, vouchers)  # own vouchers before credit
        self._post_split(op, write, version, created, slot, member_id, points, vouchers, from_credit, authorization_id)
        posted, held = ledger.balance(slot)
        return Outcome(Code.OK, {"transaction_id": created, "points": points, "released": hold.points - points,
                                 "balance": posted, "available": posted - held, "vouchers": vouchers,
                                 "vouchers_released": hold.vouchers - vouchers})

    def _split_refund(self, op: Operation, write: BatchWrite, now_us: int, version: "rules.ProgramVersion | None",
                      created: int) -> Outcome:
        """A refund of a split redeem, both assets as one unit, in proportion; vouchers repay credit first."""
        program, ledger = self.program, self.ledger
        split = program.splits[op.transaction_id]
        transaction = domain.format_transaction_id(op.transaction_id)
        if split.merchant_id != op.merchant_id:
            return Outcome(Code.PERMISSION_DENIED, reason="wrong_merchant", message=(
                f"{transaction} belongs to another merchant; only that merchant may refund it"))
        remaining = split.vouchers + split.points - split.refunded
        if op.points > remaining:
            return Outcome(Code.FAILED_PRECONDITION, reason="refund_exceeds_remaining", message=(
                f"refund of {op.points} exceeds the {remaining} (vouchers and points) that remain unrefunded "
                f"of {transaction}"))
        portion = rules.refund_tender(split.tender, split.refunded, op.points)
        member_id = split.member_id
        slot = ledger.member_slot(member_id)
        if portion.points:
            status, slot, amount, posted, available, kind = self._kernel_one(
                op, slot, portion.points, op.transaction_id, created, 0, now_us)
            if status != fastpath.OK:
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            program.restore(member_id, (OWNER_TRANSACTION, op.transaction_id), portion.points,
                            available - portion.points, now_us, version.restore_grace_us if version else 0)
        repaid = min(program.credit.get(member_id, 0), portion.vouchers)
        back = portion.vouchers - repaid
        vouchers = rules.ASSET_VOUCHERS
        merchant = self.merchants.by_id[op.merchant_id]
        write.transactions.append((created, rules.KIND_SPLIT_REFUND, op.merchant_id, member_id, op.points, None, None,
                                   op.transaction_id, op.idempotency_key, 0,
                                   version.version if version is not None else None))
        write.refunds.append((op.transaction_id, op.points))
        _entries(write, created, [
            (ledger.member_account(slot), portion.points), (merchant.redeemed_account_id, -portion.points),
            (self._voucher_account(write, rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, member_id) if repaid else 0, repaid,
             vouchers),
            (self._voucher_account(write, domain.ACCOUNT_MEMBER, member_id) if back else 0, back, vouchers),
            (self._voucher_account(write, domain.ACCOUNT_MERCHANT_REDEEMED, op.merchant_id) if portion.vouchers else 0,
             -portion.vouchers, vouchers)])
        program.move_credit(member_id, -repaid)
        program.move_vouchers((rules.HOLDER_MEMBER, member_id), back)
        program.split(op.transaction_id, dataclasses.replace(split, refunded=split.refunded + op.points))
        posted, held = ledger.balance(slot)
        return Outcome(Code.OK, {"transaction_id": created, "points": op.points, "kind": rules.KIND_SPLIT_REFUND,
                                 "balance": posted, "available": posted - held, "vouchers": portion.vouchers})

    def _move_member(self, member_id: str, delta: int) -> int:
        """Credits (or debits) a member's posted points in the fast path (recorded in its undo log)."""
        ledger = self.ledger
        slot = ledger.member_slot(member_id)
        require(slot >= 0, f"member {member_id!r} is not resident")
        posted, held = ledger.balance(slot)
        require(0 <= posted + delta <= fastpath.BALANCE_MAX and posted + delta - held >= 0,
                f"member {member_id!r}: {delta} would leave posted {posted + delta} with {held} held")
        ledger.load_member(member_id, posted + delta)
        return slot

    def _credit(self, write: BatchWrite, kind: int, merchant_id: str, member_id: str, amount: int,
                funding_account: int, key: str, version: "rules.ProgramVersion | None", now_us: int,
                original: int | None = None) -> int:
        """Points the rules credit to a member from `funding_account`, as a lot of their own."""
        slot = self._move_member(member_id, amount)
        created = self._post(write, kind, merchant_id, member_id, amount,
                             [(funding_account, -amount), (self.ledger.member_account(slot), amount)], key, version,
                             original)
        # the lot's breakage is attributed to the merchant whose earn set the credit off (the journal
        # names a merchant on every transaction; the operator funded the points either way)
        self.program.credit_lot(version, member_id, created, amount, merchant_id, now_us)
        return created

    def _spend_vouchers(self, op: Operation, write: BatchWrite, now_us: int,
                        version: "rules.ProgramVersion | None", created: int) -> Outcome:
        """A merchant spends vouchers it holds (its dividends) at the operator's own store (kind 14):
        its merchant_vouchers account to the store's redeemed account in VOUCHERS."""
        store_id = version.operator_store_merchant_id if version is not None else None
        if store_id is None:
            raise Rejection(Code.FAILED_PRECONDITION, (
                f"program {self.settings.program_id!r} names no operator store (operator_store_merchant_id); "
                "merchants can spend their vouchers once the operator configures one"))
        if store_id == op.merchant_id:
            raise Rejection(Code.FAILED_PRECONDITION, (
                f"merchant {op.merchant_id!r} is the operator's store: vouchers are spent there by other "
                "merchants, not by the store itself"))
        store = self.merchants.by_id.get(store_id)
        if store is None or store.status != "active":
            raise Rejection(Code.FAILED_PRECONDITION, (
                f"the operator's store {store_id!r} is not an active merchant of the alliance; contact the "
                "operator"))
        program, holder = self.program, (rules.HOLDER_MERCHANT, op.merchant_id)
        balance = program.vouchers.get(holder, 0)
        if op.vouchers > balance:
            raise Rejection(Code.FAILED_PRECONDITION, (
                f"merchant {op.merchant_id!r} holds {balance} voucher-units, {op.vouchers} asked; vouchers "
                "come from dividend rounds"))
        write.transactions.append((created, rules.KIND_MERCHANT_VOUCHER_SPEND, op.merchant_id, "", op.vouchers,
                                   None, None, None, op.idempotency_key, 0, version.version))
        vouchers = rules.ASSET_VOUCHERS
        _entries(write, created, [
            (self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHERS, op.merchant_id), -op.vouchers, vouchers),
            (self._voucher_account(write, domain.ACCOUNT_MERCHANT_REDEEMED, store_id), op.vouchers, vouchers)])
        left = program.move_vouchers(holder, -op.vouchers)
        return Outcome(Code.OK, {"transaction_id": created, "vouchers": op.vouchers, "store_merchant_id": store_id,
                                 "voucher_balance": left, "created_at_us": now_us})

    # --- expiry ---

    def _lots_due(self) -> bool:
        due = self.program.next_due_us()
        return due is not None and due <= now_micros()

    def _wake_for_lots(self) -> None:
        """Wakes the committer when the next lot expires, so the expiry job runs without traffic."""
        due = self.program.next_due_us()
        if due is not None:
            delay = min(max(0.0, (due - now_micros()) / 1e6), 60.0)
            asyncio.get_running_loop().call_later(delay, self._queued.set)

    def _expire_lots(self, write: BatchWrite, now_us: int) -> None:
        """The expiry job: up to expiry_lots_per_batch_max expired lots, each posted as one expiry
        transaction in this batch (the lot leaves the member's lots in the same transaction, so a second
        run finds nothing). It runs in every batch and on its own when a lot falls due, never stopping
        traffic."""
        for member_id, lot in self.program.due(now_us, self.settings.expiry_lots_per_batch_max):
            self._post_expiry(write, member_id, lot)

    def _expire_member(self, write: BatchWrite, member_id: str, now_us: int) -> None:
        for lot in self.program.expire_member(member_id, now_us):
            self._post_expiry(write, member_id, lot)

    def _post_expiry(self, write: BatchWrite, member_id: str, lot: "rules.Lot") -> None:
        slot = self._move_member(member_id, -lot.amount)
        self._post(write, rules.KIND_EXPIRY, lot.issuer_id, member_id, lot.amount,
                   [(self.ledger.member_account(slot), -lot.amount),
                    (self.operator_accounts[domain.ACCOUNT_OPERATOR_BREAKAGE], lot.amount)],
                   f"expiry:{member_id}:{lot.lot_id}:{lot.expires_at_us}", None, original=lot.lot_id)

    def _restore_hold(self, authorization_id: int, now_us: int) -> None:
        """An expired hold gives back the lots it consumed."""
        ledger = self.ledger
        if (OWNER_HOLD, authorization_id) not in self.program.pieces or not ledger.has_hold(authorization_id):
            return
        _, slot, _, amount, _ = ledger.hold(authorization_id)
        posted, held = ledger.balance(slot)
        version = self.program.version(now_us)
        self.program.restore(ledger.member_id(slot), (OWNER_HOLD, authorization_id), None, posted - held - amount,
                             now_us, version.restore_grace_us if version is not None else 0)

    # --- links and conversion ---

    def _link(self, op: Operation) -> Outcome:
        """Links a member to the merchant that signed it up (the caller) and to a referring member."""
        program = self.program
        member = program.member(op.member_id)
        if member.acquirer_id is not None:
            if member.acquirer_id == op.merchant_id and member.referrer_id == (op.referrer_id or None):
                return Outcome(Code.OK, {"acquirer_id": member.acquirer_id, "referrer_id": member.referrer_id or ""})
            return Outcome(Code.FAILED_PRECONDITION, reason="already_linked", message=(
                f"member {op.member_id!r} was signed up by merchant {member.acquirer_id!r} already; a member is "
                "linked once"))
        if op.referrer_id:
            if op.referrer_id == op.member_id:
                return Outcome(Code.INVALID_ARGUMENT, message="a member cannot refer itself")
            if self.ledger.member_slot(op.referrer_id) < 0:
                return Outcome(Code.NOT_FOUND, message=(
                    f"referrer {op.referrer_id!r} is not a member; a member exists once it has earned or been "
                    "linked"))
        program.link(op.member_id, op.merchant_id, op.referrer_id or None)
        return Outcome(Code.OK, {"acquirer_id": op.merchant_id, "referrer_id": op.referrer_id})

    def _convert(self, op: Operation, write: BatchWrite, now_us: int, version: "rules.ProgramVersion | None",
                 slot: int, created: int) -> Outcome:
        """A merchant's own points converted into alliance points at its agreed rate, in whole blocks."""
        if version is None:
            raise Rejection(Code.FAILED_PRECONDITION,
                            f"program {self.settings.program_id!r} has no version in force; the operator must "
                            "configure the program (with this merchant's conversion rate) before points convert")
        conversion = rules.convert_merchant_points(op.merchant_points, version.conversion_rate_for(op.merchant_id))
        if conversion.point_units == 0:
            raise Rejection(Code.FAILED_PRECONDITION, (
                f"{op.merchant_points} merchant points is less than one conversion block at the agreed rate; "
                f"convert at least {conversion.merchant_points_remainder + 1 if op.merchant_points else 1} "
                "merchant points"))
        merchant = self.merchants.by_id[op.merchant_id]
        amount = conversion.point_units
        self._move_member(op.member_id, amount)
        write.transactions.append((created, rules.KIND_CONVERSION, op.merchant_id, op.member_id, amount, None, None,
                                   None, op.idempotency_key, 0, version.version))
        write.entries.append((created, merchant.issued_account_id, -amount))
        write.entries.append((created, self.ledger.member_account(slot), amount))
        self.program.credit_lot(version, op.member_id, created, amount, op.merchant_id, now_us)
        posted, _ = self.ledger.balance(slot)
        return Outcome(Code.OK, {"transaction_id": created, "points": amount,
                                 "merchant_points_converted": conversion.merchant_points_converted,
                                 "merchant_points_remainder": conversion.merchant_points_remainder,
                                 "balance": posted, "created_at_us": now_us})


# a resolved split-tender hold refused as the fast path refuses a resolved hold
_HOLD_REFUSAL = {fastpath.HOLD_STATUS_CAPTURED: fastpath.HOLD_CAPTURED, fastpath.HOLD_STATUS_VOIDED: fastpath.HOLD_VOIDED,
                 fastpath.HOLD_STATUS_EXPIRED: fastpath.HOLD_EXPIRED}

_OP_CODE = {Method.EARN: fastpath.OP_EARN, Method.AUTHORIZE: fastpath.OP_AUTHORIZE, Method.CAPTURE: fastpath.OP_CAPTURE,
            Method.VOID: fastpath.OP_VOID, Method.REDEEM: fastpath.OP_REDEEM, Method.REFUND: fastpath.OP_REFUND}


_INTERNAL_MESSAGE = "internal error; the operation was not applied"
_NOT_APPLIED_MESSAGE = ("the ledger database refused or did not answer; this operation was not applied. "
                        "Retry with the same idempotency key")

# A suspended merchant may finish what it started (capture, void, refund) but start nothing new.
_NEW_BUSINESS = frozenset({Method.EARN, Method.AUTHORIZE, Method.REDEEM, Method.CONVERT, Method.LINK,
                           Method.SPEND_VOUCHERS})
# operations only the rules path applies (with or without a program version in force)
_RULES_ONLY = frozenset({Method.CONVERT, Method.LINK, Method.SPEND_VOUCHERS})

# Outcomes about the service's state, not the request: a retry may succeed, so the key stays free.
_NOT_RECORDED = frozenset({Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.INTERNAL})


def _count_committed(write: BatchWrite, ledger: Any) -> None:
    """Business counters, from what the batch committed (never from what it only tried)."""
    for transaction in write.transactions:
        kind, amount = transaction[1], transaction[4]
        if kind == fastpath.KIND_EARN:
            metrics.points_earned.inc(amount)
        elif kind == rules.KIND_EXPIRY:
            metrics.points_expired.inc(amount)
            metrics.program_transactions.labels("expiry").inc()
        elif kind in (fastpath.KIND_CAPTURE, fastpath.KIND_REDEEM):
            metrics.points_redeemed.inc(amount)
        elif kind in kinds.REFUNDS:
            metrics.points_refunded.labels(kinds.REFUNDS[kind]).inc(amount)
        else:
            metrics.program_transactions.labels(kinds.kind(kind).name).inc()
    if write.expired_holds:
        metrics.hold_expiries.inc(len(write.expired_holds))
        metrics.points_hold_expired.inc(sum(ledger.hold(h)[3] for h in write.expired_holds if ledger.has_hold(h)))


def _divergent(error: BaseException) -> bool:
    """A failed write that says the fast path's view is not Postgres's: a unique violation (an id or
    a row the fast path thought new exists), or the writer role lost or fenced off."""
    return isinstance(error, (asyncpg.UniqueViolationError, WriterLockLost, WriterFenced))


def _commit_may_have_happened(error: BaseException) -> bool:
    """An error the server raised inside the transaction means it rolled back. Anything else (a
    broken or terminated connection, a timeout, a client-side protocol error) may have come after
    COMMIT reached the server: then only Postgres knows, and the fast path is rebuilt from it."""
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", "") or ""
        return sqlstate.startswith(("08", "57"))  # connection exception, operator intervention
    return True


def _entries(write: BatchWrite, transaction_id: int, entries: list[tuple]) -> None:
    """Journal rows of a transaction: (account_id, amount) in points or (account_id, amount, asset);
    rows of amount 0 are left out (the journal holds none)."""
    for entry in entries:
        if entry[1]:
            write.entries.append((transaction_id, entry[0], entry[1], entry[2]) if len(entry) > 2
                                 else (transaction_id, entry[0], entry[1]))


def _check_balanced(write: BatchWrite) -> None:
    """Every transaction's entries sum to zero (checked before the batch is written)."""
    sums: dict[tuple[int, str], int] = collections.defaultdict(int)
    for entry in write.entries:
        transaction_id, account_id = entry[0], entry[1]
        require(account_id > 0, f"transaction {transaction_id} posts to an account without an id")
        sums[(transaction_id, entry[3] if len(entry) > 3 else domain.ASSET_POINTS)] += entry[2]
    for (transaction_id, asset), total in sums.items():
        require(total == 0, f"transaction {transaction_id} entries of {asset} sum to {total}")


def _replay(stored_method: str, stored_request: dict, outcome: Outcome, op: Operation) -> Outcome:
    """The outcome for a retry under a key already used: the original one if the request is the same."""
    field = domain.differing_field(stored_request, op.method.value, op.request, stored_method)
    if field is not None:
        return Outcome(Code.ALREADY_EXISTS,
                       message=f"idempotency key {op.idempotency_key!r} was first used for a different "
                               f"request ({field} differs); use a new key for a new operation")
    return Outcome(outcome.code, outcome.fields, outcome.message, replayed=True)


_REASON = {
    fastpath.INSUFFICIENT_POINTS: "insufficient_points", fastpath.UNKNOWN_MEMBER: "unknown_member",
    fastpath.UNKNOWN_HOLD: "unknown_hold", fastpath.HOLD_EXPIRED: "hold_expired",
    fastpath.HOLD_CAPTURED: "hold_captured", fastpath.HOLD_VOIDED: "hold_voided",
    fastpath.WRONG_MERCHANT: "wrong_merchant", fastpath.CAPTURE_EXCEEDS_HOLD: "capture_exceeds_hold",
    fastpath.UNKNOWN_TRANSACTION: "unknown_transaction", fastpath.REFUND_EXCEEDS_REMAINING: "refund_exceeds_remaining",
    fastpath.NOT_REFUNDABLE: "not_refundable", fastpath.OVERFLOW: "overflow", fastpath.CAPACITY: "capacity",
}


def _ledger_rejection(status: int, op: Operation, available: int = 0, expires_at_us: int = 0,
                      held: int = 0) -> Outcome:
    """A fast-path status as an outcome with a message the merchant's engineer can act on. available:
    the member's available balance the refusal saw (INSUFFICIENT_POINTS); expires_at_us and held: the
    hold's (HOLD_EXPIRED, CAPTURE_EXCEEDS_HOLD)."""
    outcome = _rejection_message(status, op, available, expires_at_us, held)
    outcome.reason = _REASON.get(status, "other")
    metrics.rejections.labels(outcome.reason).inc()
    return outcome


def _rejection_message(status: int, op: Operation, available: int, expires_at_us: int, held: int) -> Outcome:
    authorization = domain.format_authorization_id(op.authorization_id)
    transaction = domain.format_transaction_id(op.transaction_id)
    if status == fastpath.INSUFFICIENT_POINTS:
        if op.method is Method.REFUND:
            return Outcome(Code.FAILED_PRECONDITION,
                           message=f"the member has already spent the points of {transaction}: "
                                   f"{op.points} point-units asked back, {available} available")
        return Outcome(Code.FAILED_PRECONDITION,
                       message=f"member {op.member_id!r} has {available} point-units available, "
                               f"{op.points} asked")
    if status == fastpath.UNKNOWN_MEMBER:
        return Outcome(Code.NOT_FOUND, message=f"member {op.member_id!r} has no points account")
    if status == fastpath.UNKNOWN_HOLD:
        return Outcome(Code.NOT_FOUND, message=f"authorization {authorization} does not exist")
    if status == fastpath.HOLD_EXPIRED:
        when = from_micros(expires_at_us).isoformat().replace("+00:00", "Z") if expires_at_us else "earlier"
        return Outcome(Code.FAILED_PRECONDITION,
                       message=f"authorization {authorization} expired at {when}; authorize again")
    if status == fastpath.HOLD_CAPTURED:
        return Outcome(Code.FAILED_PRECONDITION, message=f"authorization {authorization} was already captured")
    if status == fastpath.HOLD_VOIDED:
        return Outcome(Code.FAILED_PRECONDITION, message=f"authorization {authorization} was voided")
    if status == fastpath.WRONG_MERCHANT:
        what = transaction if op.method is Method.REFUND else f"authorization {authorization}"
        return Outcome(Code.PERMISSION_DENIED,
                       message=f"{what} belongs to another merchant; only that merchant may "
                               f"{op.method.value.lower()} it")
    if status == fastpath.CAPTURE_EXCEEDS_HOLD:
        return Outcome(Code.FAILED_PRECONDITION,
                       message=f"capture of {op.points} point-units exceeds the {held} held by {authorization}")
    if status == fastpath.UNKNOWN_TRANSACTION:
        return Outcome(Code.NOT_FOUND, message=f"transaction {transaction} does not exist")
    if status == fastpath.REFUND_EXCEEDS_REMAINING:
        return Outcome(Code.FAILED_PRECONDITION,
                       message=f"refund of {op.points} point-units exceeds what remains unrefunded of {transaction}")
    if status == fastpath.NOT_REFUNDABLE:
        return Outcome(Code.FAILED_PRECONDITION,
                       message=f"{transaction} is not an earn, capture or redemption (a refund, or a transaction the "
                               f"program rules made); only those can be refunded")
    if status == fastpath.OVERFLOW:
        return Outcome(Code.FAILED_PRECONDITION, message="the member's balance would exceed its maximum")
    if status == fastpath.CAPACITY:
        return Outcome(Code.RESOURCE_EXHAUSTED,
                       message="the service holds its maximum number of members or holds; contact the operator")
    raise domain.InvariantViolation(f"fast path returned unknown status {status}")
