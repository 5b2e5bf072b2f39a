"""The commit pipeline: bounded queue → batch → fast path → one batch-log append → answers → projector.

This is the one place ledger state changes. A single committer task takes up to
`batch_operations_max` queued operations (waiting `batch_linger_seconds` for more after the first),
and for the batch:

  1. asks the in-memory idempotency table (processor/idempotency.py) which of its keys may have a
     stored record and in which batches, and reads only those batches' records from Postgres, in one
     query by primary key (none for a batch of new keys; no wait for the projection):
     a stored outcome is replayed (or, if the request differs, refused with ALREADY_EXISTS naming the
     field);
  2. prefetches the holds and transactions the batch refers to that the fast path does not hold;
  3. hands the batch to the ledger state machine (processor/state_machine.py), which opens the fast
     path's undo log, releases expired holds and applies every operation (microseconds each, no I/O),
     returning the outcomes and the batch's rows (journal, hold changes, idempotency records);
  4. appends all of it (the BatchWrite) to the batch log in one fenced autocommit statement, with its
     idempotency records in their own row (processor/batch_log.py): the batch is durable;
  5. only then answers every call of the batch, and hands the batch to the projector
     (processor/projector.py), which writes its relational rows off the answer path (the balances
     follow by checkpoints fed by the projector: accounts.balance is folded from the journal).

If the append fails, the undo log puts the fast path back to what Postgres holds and every call of
the batch gets UNAVAILABLE (nothing of it was appended, a retry with the same key is safe). If the
failure leaves it unknown whether the append happened (the connection broke), the fast path is
rebuilt from Postgres before the next batch (which projects the log first: the log decides), and the
retry finds the outcome if it was appended. Reads of the relational tables that must see the callers'
writes wait for the projection (projected()).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import itertools
import logging
import operator
import time
from typing import Any, Callable

import asyncpg

import fastpath
from processor import batch_log, channel_store, domain, events, kinds, member_store, metrics, projector_process, rules
from processor.quotas import MerchantQuotas
from processor.program import SplitRecord
from processor.config import Settings
from processor.domain import Code, Operation, Outcome, Rejection, require
from processor.idempotency import IdempotencyTable
from processor.ledger_load import earn_record, load_ledger, load_program, voucher_hold
from processor.projector import Appended, project_log
from processor.projector_process import RemoteProjector
from processor.state_machine import NOT_RECORDED, IdAllocator, LedgerStateMachine, Merchants, replay
from processor.store import (
    BatchWrite,
    MerchantRow,
    Store,
    StoreError,
    WriterFenced,
    WriterLockLost,
    from_micros,
    micros,
)

log = logging.getLogger("points.pipeline")


@dataclasses.dataclass(slots=True)
class _Prepared:
    """A batch applied to the fast path (its undo batch open), not yet answered."""

    batch: list[Operation]
    outcomes: list[Outcome]
    write: BatchWrite
    dated_us: int
    task: asyncio.Task | None = None  # its append to the batch log
    started: float = 0.0
    batch_id: int = 0  # its id in the batch log (0: an empty write, not appended)


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


class Call:
    """The operations of one call (a SubmitBatch, or one operation of a Stream) waiting for their
    outcomes: one future for them all, set when the last is decided (each operation's outcome is on
    `op.outcome`), instead of a future and two loop callbacks per operation (measured: a sixth of the
    service's CPU per operation). `answer`, if given, is called with each operation as it is decided."""

    __slots__ = ("future", "remaining", "answer")

    def __init__(self, answer: Callable[[Operation], None] | None = None):
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.remaining = 0
        self.answer = answer

    def decided(self, op: Operation, outcome: Outcome) -> None:
        op.outcome = outcome
        if self.answer is not None:
            self.answer(op)
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():  # done: the caller went away (cancelled)
            self.future.set_result(None)


# The cyclic collector's full passes: one at most every this many passes of its middle generation
# (Python's default is 10). A full pass walks every object not frozen at recovery, and with the program in
# force batches keep ~9 tracked objects an operation alive (lots, earn records, member rules), so full
# passes came every ~33,000 operations, each walking all that state; the younger passes, which walk what
# is new, are left as they are. Measured (loadtest.budget --rounds 3, 160,000 operations a run, a
# gc.callbacks probe summing the collector's thread CPU, 2 runs each, interleaved, load 1-2): full passes
# 4 -> 1, their CPU 0.23-0.34 -> 0.12-0.20 s, the collector's total 0.99-1.27 -> 0.93-1.07 s; in runs of
# 240,000 operations (--rounds 2 --batches 40, against the tree before, 2 pairs) full passes 6 -> 2, their
# CPU 0.56-0.81 -> 0.20-0.25 s, the collector's total 1.60-2.49 -> 1.34-1.79 s (1-3 µs an operation: a
# longer run's full passes walk a larger heap). A pass is as long as before (the same heap) but rarer; cyclic garbage that
# reached the oldest generation waits up to ten times longer to be freed.
COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS = 100
# The youngest generation's pass: after this many new tracked objects (Python's default is 700). The
# servicer's intake and the state machine's apply pause the collector (their objects all live on), so at
# 700 the first allocation after an apply set off a young pass over the whole batch's objects, and three
# more came before the batch was answered, each walking what the batches in flight hold (the Operations,
# their Outcomes and rows, each run's new tuples of lots); what they promoted was walked again by a
# middle pass every ten. At 20,000 a young pass comes every ~1-2 batches, and what died in between (a
# batch answered) is never walked. Measured with points_gc_pause_seconds (python -m loadtest.sustain
# --seconds 10 --operations 500000 --cycles 1, program in force, SubmitBatch of 1,000 sustained, one run
# each, machine quiet; young/middle µs of the loop an operation): 700: 3.50/1.44 (passes of 1.3 and 5.7
# ms), 5,000: 3.82/0.66 (4.2, 7.8 ms), 20,000: 1.47/0.19 (18.9, 23.1 ms), 100,000: 0.38/0 (47 ms); the
# server's main thread 26.7 -> 23.1 µs/op at 20,000. The ninth session had measured little at 20,000 and
# 50,000, before the intake and the apply paused the collector. 20,000 rather than more: a pass stops
# the loop for its whole length (~19 ms here, ~47 at 100,000), which every call in flight waits out.
COLLECTOR_YOUNG_PASS_OBJECTS = 20_000


def tune_collector() -> None:
    """Sets the collector's young and full-pass thresholds (COLLECTOR_YOUNG_PASS_OBJECTS,
    COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS), keeping the middle generation's, and times its passes into
    points_gc_pause_seconds (once a process)."""
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(COLLECTOR_YOUNG_PASS_OBJECTS, middle, COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS)
    if _time_collector_pass not in gc.callbacks:
        gc.callbacks.append(_time_collector_pass)


_pass_started = 0.0
# the histogram's children by generation, resolved once (a labels() look-up each pass would be the cost)
_GC_PAUSE = tuple(metrics.gc_pause_seconds.labels(str(generation)) for generation in range(3))


def _time_collector_pass(phase: str, info: dict) -> None:
    """gc.callbacks: a pass's wall time (the loop's thread stands still in it) by its generation."""
    global _pass_started
    if phase == "start":
        _pass_started = time.perf_counter()
    else:
        _GC_PAUSE[info["generation"]].observe(time.perf_counter() - _pass_started)


def now_micros() -> int:
    return time.time_ns() // 1000


def _state(name: str, doc: str) -> property:
    """An attribute of the Pipeline that is the state machine's."""
    return property(
        lambda self: getattr(self.machine, name), lambda self, value: setattr(self.machine, name, value), doc=doc
    )


class Pipeline:
    def __init__(self, settings: Settings, store: Store | None):
        self.settings = settings
        self.store = store
        # the ledger's state (fast path, program rules' state, merchants, ids, quotas): what a batch changes
        self.machine = LedgerStateMachine(settings, MerchantQuotas(settings))
        # the keys of every stored idempotency record: a batch whose keys all miss reads nothing
        self.idempotency = IdempotencyTable()
        self._listening = False
        self._queue: collections.deque[Operation] = collections.deque()
        self._queued = asyncio.Event()
        self._inflight: dict[tuple[str, str], Operation] = {}
        # batches applied to the fast path and not yet answered, oldest first (at most two: the one
        # being written and the next)
        self._open: collections.deque[_Prepared] = collections.deque()
        self._finished: asyncio.Event | None = None
        self._readers_waiting = 0
        self._forget_due = False
        self._wake_at = 1  # submit() wakes the committer once this many operations are queued
        # The balance checkpoint: the transaction id Postgres's checkpoint is at, the newest projected
        # transaction id, and how many entries were projected since the checkpoint (an upper bound on the
        # accounts the next one changes). The next checkpoint folds the entries of transactions
        # (_checkpointed_through, _pending_through] in Postgres: the service sums nothing per entry.
        self._checkpointed_through = 0
        self._pending_through = 0
        self._pending_entries = 0
        self._checkpoint_due_at = 0.0
        self._checkpoint: asyncio.Task | None = None  # the checkpoint being written, if any
        self._expired_pending: list[int] = []
        # channel statements of a settlement cut may wait to be posted (at start: a cut before a stop)
        self.channel_unposted = True
        # No batch is dated before this (microseconds): the clock never runs backwards, and never
        # before the newest settlement cut or, after a (re)start, the newest batch in Postgres.
        self._clock_floor_us = 0
        self._task: asyncio.Task | None = None
        self._dividends: asyncio.Task | None = None
        self._reloads: set[asyncio.Task] = set()
        self._stopping = False
        self.draining = False  # shutting down: new operations are refused, queued ones commit
        # monotonic time of the last operation refused for draining: the shutdown keeps draining until
        # calls stop arriving (Service.stop), so none reaches a server already stopping
        self.last_drain_refusal = 0.0
        self._resync_requested = False
        self.ready = False  # recovery done and Postgres reachable
        self.feed_signal = events.FeedSignal()  # woken after every projected batch (processor/events.py)
        # the batch log (processor/batch_log.py) and its projector (processor/projector.py): an answer
        # waits for the append; the rows are written by the projector, off the answer path
        # (--projector: a task of this service, or a child process on another core)
        self.projector = projector_process.build(
            settings,
            store,  # type: ignore[arg-type]  # set by recover() when the service opened it later
            self._on_projected,
            self._projection_failed,
        )
        self._next_batch_id = 1  # the next batch's id in the log (consecutive: a failed append reuses it)
        self._answered_batch_id = 0  # the newest batch appended and answered

    # the state machine's state, under the names the servicers, recovery and tests use
    ledger = _state("ledger", "the fast path's Ledger (fastpath.Ledger)")
    program = _state("program", "the program rules' state (ProgramState)")
    merchants = _state("merchants", "the merchants the service knows (Merchants)")
    ids = _state("ids", "the transaction and authorization id allocator (IdAllocator)")
    operator_accounts = _state("operator_accounts", "account kind -> id of the operator's accounts")
    quotas = _state("quotas", "per-merchant shares of the queue, holds and new members (MerchantQuotas)")

    # --- lifecycle ---

    async def recover(self) -> None:
        """Loads merchants, balances, open holds and id high-water marks from Postgres."""
        self.ready = False
        gc.unfreeze()  # what the last recovery loaded may be garbage now (a resync): collectable again
        await self.projector.halt()  # what it had queued is in the log: projected below
        if self._checkpoint is not None:  # it may have been started by the last projection
            await asyncio.wait({self._checkpoint})
        if not await self.store.writer_lock_alive():
            # Postgres restarted (or the lock connection broke): the lock is ours again or the start fails
            await self.store.release_writer_lock()
            await self.store.acquire_writer_lock()
        # Until projected the log is the only truth: every batch after projection_state is projected
        # before anything is loaded from the relational tables
        self.projector.store = self.store
        through, newest = await project_log(
            self.store, self.settings.commit_timeout_seconds, self.settings.projection_batches_per_transaction_max
        )
        self.projector.reset(through)
        self._next_batch_id = newest + 1
        self._answered_batch_id = through
        self.merchants = Merchants(await self.store.merchants())
        self.ledger = await load_ledger(self.store, self.settings, self.merchants, now_micros())
        self.program = await load_program(self.store, self.settings, now_micros())
        self.machine.members = await member_store.load_registry(self.store.pool, self.store.recovery_timeout)
        if not self._listening:
            # a version stored by the CLI (or another service instance's admin call) is loaded at once
            await self.store.listen_program_changes(self._program_changed)
            self._listening = True
        last_transaction, last_authorization = await self.store.id_high_water_marks()
        self.ids = IdAllocator(last_transaction + 1, last_authorization + 1)
        self.operator_accounts = await self.store.operator_account_ids()
        await self._load_idempotency()
        self._checkpointed_through = await self.store.checkpoint_through()
        tail, self._pending_through = await self.store.tail_deltas(self._checkpointed_through)
        self._pending_entries = len(tail)  # accounts, not entries: the tail is folded by the next checkpoint
        self._checkpoint_due_at = time.monotonic() + self.settings.balance_checkpoint_seconds
        latest_cut = await self.store.latest_cut_off()
        if latest_cut is not None:
            self._clock_floor_us = max(self._clock_floor_us, micros(latest_cut))
        latest_batch = await self.store.latest_batch_time()  # a clock stepped back while the service was down
        if latest_batch is not None:
            self._clock_floor_us = max(self._clock_floor_us, micros(latest_batch))
        if self._clock_floor_us > now_micros() + 1_000_000:
            log.warning(
                "the clock is behind the newest batch or cut; batches are dated at that time until the clock passes it",
                extra={"floor": from_micros(self._clock_floor_us).isoformat()},
            )
        self._expired_pending = []
        # What recovery loaded (balances' indexes, program state, the idempotency table's chunks) lives
        # as long as the service: out of the cyclic collector's sight, so its collections of the
        # objects every batch makes do not walk it (the collector was 7% of the service's CPU with no
        # program, 12% with one; after this 3.4% and 8.9%: py-spy, loadtest/budget.py)
        gc.freeze()
        tune_collector()
        if self._task is not None:  # a resync (at start, start() starts it)
            self.projector.start()
        self.ready = True
        log.info(
            "recovered ledger from postgres",
            extra={
                "members": self.ledger.members_count,
                "holds_open": self.ledger.holds_open_count,
                "merchants": len(self.merchants.by_id),
            },
        )

    async def _load_idempotency(self) -> None:
        """Rebuilds the in-memory idempotency table from Postgres (no batch is open: recovery)."""
        started = time.monotonic()
        estimate, chunks = await self.store.idempotency_keys()
        table = self.idempotency
        table.reset(max(estimate, self.settings.idempotency_keys_expected))
        async for batches in chunks:
            for batch_id, keys in batches:  # in batch id order: the table rebuilds ids from their low bits
                table.add(batch_id, keys)
        log.info(
            "idempotency keys loaded",
            extra={
                "keys": table.count,
                "memory_bytes": table.memory_bytes,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def reload_program(self) -> None:
        """Re-reads the program's versions (after a new one was stored); the state stays."""
        program = await self.ready_store().program(self.settings.program_id)
        self.program.program = program
        log.info(
            "program versions loaded",
            extra={"program": self.settings.program_id, "versions": len(program.versions) if program else 0},
        )

    def _program_changed(self, program_id: str) -> None:
        if program_id == self.settings.program_id and self.ready:
            task = asyncio.get_running_loop().create_task(self.reload_program(), name="program-reload")
            self._reloads.add(task)  # a task nobody references may be collected before it runs
            task.add_done_callback(self._reloads.discard)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="committer")
        self.projector.start()
        metrics.projection_lag_batches.set_function(lambda: self.projector.lag_batches)
        metrics.projection_lag_seconds.set_function(self.projector.lag_seconds)
        metrics.projection_failing.set_function(lambda: 0 if self.projector.failing is None else 1)
        projector = self.projector
        if isinstance(projector, RemoteProjector):
            metrics.export_projector_cpu_seconds(projector.cpu_seconds)
        self._dividends = loop.create_task(self._dividend_loop(), name="dividend-rounds")

    async def stop(self) -> None:
        """Commits what is queued, then stops the committer."""
        self._stopping = True
        self._queued.set()
        if self._dividends is not None:
            self._dividends.cancel()
        if self._task is not None:
            await self._task
        if self.projector.running:
            # the last checkpoint folds the journal: every answered batch projected first
            if not await self.projector.wait_through(self._answered_batch_id, 3 * self.settings.commit_timeout_seconds):
                log.warning(
                    "the batch log is not projected at stop; the next start projects it",
                    extra={"lag_batches": self.projector.lag_batches},
                )
            await self.projector.halt()
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

    async def has_stored_outcome(self, merchant_id: str, idempotency_key: str) -> bool:
        """Whether the key has a stored idempotency record (an operation answered already: a retry of it
        replays its outcome): decided by the in-memory table, read from its batch's row on a hit. Every
        batch answered before this call is included (its keys join the table before its answers)."""
        store = self.ready_store()
        candidates = self.idempotency.maybe_stored([(merchant_id, idempotency_key)])
        return bool(candidates) and bool(await store.stored_outcomes(candidates))

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
            if first.future is None:  # queued with its call's one future: it gets one of its own now
                first.future = asyncio.get_running_loop().create_future()
            outcome = await asyncio.shield(first.future)
            if outcome.code is Code.ALREADY_EXISTS or outcome.code in NOT_RECORDED or not outcome.recorded:
                # That call decided nothing for the key (it was refused as a conflicting retry, or not
                # recorded): this one is decided on its own, against the stored record if there is one.
                continue
            return replay(first.method.value, first.request, outcome, op)
        # shield: a caller that goes away does not cancel the operation; its batch still resolves it
        return await asyncio.shield(self._enqueue(op))

    def enqueue(self, op: Operation) -> asyncio.Future:
        """What submit() does, without a coroutine, a task and a shield per operation (a batch of a
        thousand operations costs a thousand futures, nothing more): returns a future of the outcome.
        Raises Rejection as submit() does. The caller must not cancel the future (it is the operation's
        own; wait for it through a future of your own, e.g. all_done()). The operations of one call
        (SubmitBatch, Stream) go through enqueue_many instead: one future for all of them."""
        if (op.merchant_id, op.idempotency_key) in self._inflight:
            return asyncio.ensure_future(self.submit(op))  # rare: waits for the call in flight first
        return self._enqueue(op)

    def enqueue_many(self, ops: list[Operation], answer: Callable[[Operation], None] | None = None) -> Call:
        """Queues the operations of one call, all before any is decided (they share commits). Each gets
        its outcome on `op.outcome` when decided: at once for one refused at the door (UNAVAILABLE,
        RESOURCE_EXHAUSTED: the same refusals as enqueue()), else when its batch is durable or replayed.
        The call's future is done when every one is; the caller may cancel its wait (the operations
        still commit), but must not set the future. `answer`: see Call."""
        call = Call(answer)
        call.remaining = len(ops)
        now = time.monotonic()
        inflight, queue, enqueue_quota = self._inflight, self._queue, self.quotas.enqueue
        # _admit inline for the common case: the service's state cannot change during this loop (no
        # await), so it is read once; a call refused for it, or beyond the queue's bound, goes through
        # _admit for its refusal (measured: its call and checks were ~0.3 µs an operation)
        admitting = self.ready and not (self.draining or self._stopping)
        queue_max = self.settings.queue_operations_max
        for op in ops:
            key = (op.merchant_id, op.idempotency_key)
            try:
                if key in inflight:
                    # rare: the same key is in flight; submit() decides it after that call (with a
                    # future of its own, so op.call stays None)
                    asyncio.ensure_future(self.submit(op)).add_done_callback(
                        lambda future, op=op: call.decided(op, _outcome_of(future))
                    )
                elif admitting and len(queue) < queue_max:
                    op.call = call
                    enqueue_quota(op.merchant_id)  # RESOURCE_EXHAUSTED beyond the merchant's share
                    op.enqueued_at = now
                    inflight[key] = op
                    queue.append(op)
                else:
                    op.call = call
                    self._admit(op, now)
            except Rejection as rejection:
                call.decided(op, Outcome(rejection.code, message=rejection.message))
        if len(self._queue) >= self._wake_at:
            self._queued.set()
        return call

    def _enqueue(self, op: Operation) -> asyncio.Future:
        op.future = asyncio.get_running_loop().create_future()
        self._admit(op, time.monotonic())
        if len(self._queue) >= self._wake_at:
            self._queued.set()
        return op.future

    def _admit(self, op: Operation, now: float) -> None:
        """Puts an operation in the queue, or raises Rejection (the service's state or capacity).
        enqueue_many does the same inline: a change here is a change there."""
        if not self.ready:
            raise Rejection(Code.UNAVAILABLE, "the ledger is recovering from a database failure; retry shortly")
        if self.draining or self._stopping:
            self.last_drain_refusal = now
            raise Rejection(Code.UNAVAILABLE, "the service is shutting down; retry with the same idempotency key")
        if len(self._queue) >= self.settings.queue_operations_max:
            metrics.operations_shed.inc()
            raise Rejection(
                Code.RESOURCE_EXHAUSTED,
                f"the service is at capacity ({len(self._queue)} operations waiting to commit); "
                "retry with exponential backoff",
            )
        self.quotas.enqueue(op.merchant_id)  # RESOURCE_EXHAUSTED beyond the merchant's share of the queue
        op.enqueued_at = now
        self._inflight[(op.merchant_id, op.idempotency_key)] = op
        self._queue.append(op)

    def request_resync(self) -> None:
        """Stops new work (UNAVAILABLE) until the committer has rebuilt the fast path from Postgres."""
        self.ready = False
        self._resync_requested = True
        self._queued.set()

    async def projected(self) -> None:
        """Read-your-writes for a read of Postgres's relational tables (ListTransactions, statements,
        positions, the settlement cut, exports): returns once every batch answered before this call is
        visible there. A batch is answered once appended to the batch log; its rows are written by the
        projector, so this waits for the projection to reach the last batch answered, at most
        --projection-wait-seconds, else Rejection(UNAVAILABLE) naming the lag."""
        target = self._answered_batch_id
        if self.projector.through >= target:
            return
        metrics.projection_waits.inc()
        if not await self.projector.wait_through(target, self.settings.projection_wait_seconds):
            raise Rejection(
                Code.UNAVAILABLE,
                f"the ledger's read tables are behind by {self.projector.behind(target)}; retry shortly",
            )

    async def _caught_up(self) -> None:
        """For the committer's own reads of the relational tables (a retry's stored outcome, a prefetch,
        dividend and channel work): waits for every answered batch to be projected, bounded; raises
        TimeoutError (a failed read: the batch is answered UNAVAILABLE) when the projector lags, at once
        while the projection is failing (projector.py: a failing projection would otherwise stall every
        call queued behind this batch for the whole wait)."""
        target = self._answered_batch_id
        if self.projector.through >= target:
            return
        if not await self.projector.wait_through(target, self.settings.projection_wait_seconds):
            raise TimeoutError(f"the projection is behind the batch log by {self.projector.behind(target)}")

    def _on_projected(self, group: list[Appended]) -> None:
        """The projector wrote these batches' rows (in order): the balance checkpoint may fold their
        entries now (its mark never passes the projection), and the change feed may read them."""
        for item in group:
            self._committed(item.write)
        self.feed_signal.notify()

    def _projection_failed(self, error: BaseException) -> None:
        """A divergent projection error: rebuild from Postgres, which projects the log first."""
        self.request_resync()

    async def committed_view(self):
        """Waits until every batch applied to the fast path is appended, so what it shows is durable
        (its rows may not be projected yet: a read of Postgres after it calls projected()).
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

    async def applied_projected(self, timeout_seconds: float) -> bool:
        """Waits until every batch applied to the fast path before this call is answered (or failed) and
        its rows are projected, at most `timeout_seconds`; whether they are. For a recount that reads
        Postgres's relational tables and must miss nothing applied before it started (quotas.py: the
        open holds). Like committed_view, the committer answers the batch being written before it applies
        the next while this waits."""
        deadline = time.monotonic() + timeout_seconds
        pending = list(self._open)
        self._readers_waiting += 1
        try:
            while any(p in self._open for p in pending):
                self._queued.set()  # the committer may be waiting for the next batch to grow
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._finished_event().wait(), left)
                except TimeoutError:
                    return False
        finally:
            self._readers_waiting -= 1
        return await self.projector.wait_through(self._answered_batch_id, max(0.0, deadline - time.monotonic()))

    def channel_posting_due(self) -> None:
        """A cut wrote channel statements: the committer posts them, with or without traffic."""
        self.channel_unposted = True
        self._queued.set()

    async def settle_before(self, cut_off_us: int) -> None:
        """Makes every transaction dated before cut_off durable and every later one dated at or after it:
        the point where a settlement period can be closed at cut_off while traffic goes on."""
        if cut_off_us > now_micros():
            raise Rejection(Code.INVALID_ARGUMENT, "cut_off is in the future; a period closes at or before now")
        self._clock_floor_us = max(self._clock_floor_us, cut_off_us)
        # batches applied from now on are dated at or after cut_off; wait for those dated before it
        while self._open and self._open[0].dated_us < cut_off_us:
            await self._finished_event().wait()
        await self.projected()  # and their rows written: the cut reads them

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
    # Two batches overlap: while batch N is appended to the batch log (a task on its own connection),
    # the committer reads and applies batch N+1 to the fast path on top of N (a nested undo batch).
    # N+1's append starts only once N is answered, so appends stay in order and each call is answered
    # after its own batch is durable. If N's append fails, the fast path is rolled back past both, and
    # N+1's calls are answered UNAVAILABLE (nothing of them was written; a retry with the same key is
    # safe). An answered batch goes to the projector, which writes its rows in the same order.

    async def _run(self) -> None:
        settings = self.settings
        while True:
            writing = self._open[0] if self._open else None
            if writing is not None and (
                writing.task is None
                or writing.task.done()
                or self._must_drain()
                or (not self._queue and not self._expired_pending)
            ):
                await self._finish(writing)
                continue
            if self._forget_due and writing is None:
                self._forget_due = False
                self.machine.forget_resolved()
            if writing is None and self.program.spends:
                self.program.prune_spends(now_micros())  # at most once a minute
            if self._resync_requested:
                self._resync_requested = False
                self._fail(
                    [self._queue.popleft() for _ in range(len(self._queue))],
                    Code.UNAVAILABLE,
                    "the service is resynchronising with the ledger database; retry with the same idempotency key",
                )
                await self._resync()
                continue
            if (
                not self._queue
                and not self._expired_pending
                and not self._lots_due()
                and not self.program.dividends_unposted
                and not self.channel_unposted
            ):
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
            elif (
                settings.batch_linger_seconds
                and len(self._queue) < settings.batch_operations_max
                and not self._stopping
            ):
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
        return bool(
            self._readers_waiting
            or self._forget_due
            or self._resync_requested
            or self._stopping
            or self._open[0].dated_us < self._clock_floor_us
        )

    async def _prepare(self, batch: list[Operation]) -> "_Prepared | None":
        """Reads what the batch needs from Postgres, then applies it to the fast path in one go (no
        await from taking its time until it is in self._open). None if the reads failed (the batch's
        calls are answered)."""
        settings = self.settings
        started = time.monotonic()
        # the operations of one call were queued together (one enqueued_at): one observation per run
        run_start, run_length = batch[0].enqueued_at if batch else 0.0, 0
        for op in batch:
            if op.enqueued_at != run_start:
                metrics.observe_many(metrics.queue_wait_seconds, started - run_start, run_length)
                run_start, run_length = op.enqueued_at, 0
            run_length += 1
        metrics.observe_many(metrics.queue_wait_seconds, started - run_start, run_length)
        failing = self.projector.failing if self.projector.queue_full else None
        if failing is not None:
            # its queue stays full while it fails, and a batch appended now could not be handed over
            # without waiting as long (projector.put): refused before anything is applied or appended
            self._fail(
                batch,
                Code.UNAVAILABLE,
                f"the ledger's projection is failing ({failing}) and {self.projector.lag_batches} batches wait "
                "for it; this operation was not applied. Retry with the same idempotency key",
            )
            return None
        try:
            # only the keys the table may hold are read: a miss is certainly new (processor/idempotency.py)
            # and a hit's record is read from the batch rows the table names, durable with their appends:
            # no wait for the projection
            maybe = self.idempotency.maybe_stored(list(map(_OPERATION_KEY, batch)))
            stored = {}
            if maybe:
                metrics.idempotency_keys_read.inc(len(maybe))
                stored = await self.store.stored_outcomes(maybe)
            await self._prefetch(batch, now_micros())
            dividends = []
            if self.program.dividends_unposted and not self._open:
                # only with no batch in flight: a chunk read now is not being posted by a batch unanswered
                # (nor by one not projected: the allocations it posted are marked by its rows)
                await self._caught_up()
                dividends = await self.store.unposted_allocations(
                    self.settings.program_id, settings.batch_operations_max
                )
                self.program.dividends_unposted = bool(dividends)
            channel: list = []
            if self.channel_unposted and not self._open:
                # channel statements of a cut (processor/channel_store.py), posted like dividends
                await self._caught_up()
                channel = await channel_store.unposted(self.store.pool, settings.batch_operations_max)
                self.channel_unposted = bool(channel)
            # account ids for what the batch may open: a new member's account, and under the rules up to
            # three voucher accounts per operation or allocation
            need = len(batch) + (3 * (len(batch) + len(dividends)) if self.program.program is not None else 0)
            if len(self.machine.account_ids) < need:
                self.machine.account_ids.extend(
                    await self.store.reserve_account_ids(max(need, settings.batch_operations_max))
                )
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
        expired, self._expired_pending = self._expired_pending, []
        outcomes, write = self.machine.apply(batch, stored, now_us, expired, dividends)
        if channel:
            channel_store.post(
                write, channel, self.ids.transaction, self.operator_accounts[domain.ACCOUNT_OPERATOR_FEE_REVENUE]
            )
            write.last_transaction_id = self.ids.next_transaction_id - 1
        write.member_balances_after = events.balances_after(write, self.ledger)  # the change feed's
        prepared = _Prepared(batch, outcomes, write, now_us)
        self._open.append(prepared)
        return prepared

    def _start_write(self, prepared: "_Prepared") -> None:
        if prepared.write.empty:
            return  # answered by _finish without a round trip
        # one append at a time, in id order: the log's order is the projection's, and the change feed's
        # gap-freedom rests on it (processor/events.py)
        require(
            all(p.task is None or p.task.done() for p in self._open if p is not prepared),
            "a batch's write starts only after the previous batch's write ended",
        )
        prepared.started = time.monotonic()
        prepared.batch_id = self._next_batch_id
        prepared.task = asyncio.get_running_loop().create_task(self._append(prepared), name="batch-append")
        prepared.task.add_done_callback(lambda _: self._queued.set())

    async def _append(self, prepared: "_Prepared") -> None:
        """The batch's durable write: its BatchWrite pickled (measured: docs/DESIGN.md section 4 item 5)
        and appended to the batch log with the writer's fence in one autocommit round trip. Its
        failures are _finish's to judge, as a write's were (WriterLockLost, WriterFenced: resync)."""
        store = self.store
        payload = batch_log.encode(prepared.write)
        timeout = self.settings.commit_timeout_seconds
        fence = store.writer_fence()
        await store.bounded(
            lambda c: batch_log.append(c, fence, prepared.batch_id, prepared.write, payload, timeout), timeout
        )

    async def _finish(self, prepared: "_Prepared") -> bool:
        """Waits for the oldest open batch's append and answers its calls, then hands it to the
        projector. On a failed append the fast path is rolled back past every open batch, and all their
        calls are answered; returns False."""
        ledger = self.ledger
        require(self._open and self._open[0] is prepared, "batches are answered in the order they were applied")
        try:
            if prepared.task is not None:
                await prepared.task
                metrics.commit_seconds.observe(time.monotonic() - prepared.started)
        except domain.InvariantViolation:
            self.machine.rollback()
            self._fail_open(Code.INTERNAL, _INTERNAL_MESSAGE)
            raise
        except Exception as error:
            self.machine.rollback()
            batch = prepared.batch
            self._open.popleft()
            self._fail_open(Code.UNAVAILABLE, _NOT_APPLIED_MESSAGE)
            await self._database_failed(batch, error, ambiguous=_commit_may_have_happened(error))
            return False
        self.machine.commit()
        self._open.popleft()
        # before any call is answered: a retry that follows must find its key (and its record, in the
        # batch's idempotency_batches row the append wrote)
        records = prepared.write.idempotency
        if records:
            require(prepared.task is not None, "a batch with idempotency records was appended")
            self.idempotency.add(prepared.batch_id, map(_MERCHANT_AND_KEY, records))
        if prepared.task is not None:
            self._next_batch_id = prepared.batch_id + 1
            self._answered_batch_id = prepared.batch_id  # before any answer: projected() waits for it
        metrics.batches.labels("committed").inc()
        metrics.batch_operations.observe(len(prepared.batch))
        _count_committed(prepared.write, ledger)
        if ledger.transactions_resident_count > self.settings.transactions_resident_max // 2:
            self._forget_due = True
        self._resolve_all(prepared.batch, prepared.outcomes)
        self._signal_finished()
        if prepared.task is not None:
            # its rows are written by the projector; a full queue holds the committer (backpressure). Its
            # idempotency records are not among them: the append wrote their row
            write = dataclasses.replace(prepared.write, idempotency=[]) if records else prepared.write
            await self.projector.put(Appended(prepared.batch_id, write, time.monotonic()))
        return True

    def _committed(self, write: BatchWrite) -> None:
        """Moves the next balance checkpoint's mark to a projected batch's newest transaction, and starts
        that checkpoint when it is due (batches are fed here in order as the projector writes them, so
        the checkpoint's mark never passes the projection). O(1) a batch: the checkpoint sums the
        entries in Postgres. (It was a loop over every entry here, then the sums sent as two arrays:
        1–3 µs an operation of the service's CPU in loadtest/budget.py's profiles; Postgres's sum over
        the entries costs it ~1.6 µs an operation more than the arrays' update did.)"""
        transactions = write.transactions
        if transactions:
            # a batch's transactions are in id order (asserted by events.balances_after), and batches
            # come in order: its last is the newest projected
            through = transactions[-1][0]
            require(through > self._pending_through, "projected batches come in transaction id order")
            self._pending_through = through
            self._pending_entries += len(write.entries)
        self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        if (
            self._checkpoint is None
            and self._pending_through > self._checkpointed_through
            and self.ready
            and not (self._resync_requested or self._stopping)
            and (
                time.monotonic() >= self._checkpoint_due_at
                or self._pending_entries >= self.settings.balance_checkpoint_accounts_max
            )
        ):
            # every batch up to _pending_through is projected: the journal from the last checkpoint
            # through it is all in Postgres, and that is what the checkpoint sums
            self._checkpoint = asyncio.get_running_loop().create_task(
                self._write_checkpoint(self._checkpointed_through, self._pending_through, self._pending_entries),
                name="balance-checkpoint",
            )
            self._pending_entries = 0

    async def _write_checkpoint(self, previous: int, through: int, entries: int) -> None:
        """Writes one checkpoint beside the batches (its own transaction: a batch never waits for it)."""
        try:
            changed = await self.store.write_checkpoint(previous, through, self.settings.commit_timeout_seconds)
        except Exception as error:
            log.warning(
                "balance checkpoint not written; the next one includes its transactions", extra={"error": repr(error)}
            )
            if _commit_may_have_happened(error):
                # only Postgres knows whether it was folded: rebuild from it rather than fold twice
                self.request_resync()
            else:  # nothing moved: the next checkpoint folds from `previous` again
                self._pending_entries += entries
        else:
            self._checkpointed_through = through
            metrics.checkpoints.inc()
            metrics.checkpoint_accounts.observe(changed)
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
        """Decides a queued operation (once: a second outcome for it is ignored)."""
        self._inflight.pop((op.merchant_id, op.idempotency_key), None)
        call = op.call
        if call is not None:
            if op.outcome is None:
                self.quotas.dequeued(op.merchant_id)
                call.decided(op, outcome)
                if op.future is not None:  # a call with the same key waits for this one (submit())
                    op.future.set_result(outcome)
        elif op.future is not None and not op.future.done():
            self.quotas.dequeued(op.merchant_id)
            op.future.set_result(outcome)

    def _resolve_all(self, batch: list[Operation], outcomes: list[Outcome]) -> None:
        """_resolve for each operation of an answered batch, with the common case inline: an operation
        of a SubmitBatch call (op.call, no answer callback, no future of its own, not decided yet)
        costs no call of _resolve or Call.decided (measured: two Python calls an operation were about
        a third of answering it)."""
        inflight_pop, dequeued, resolve = self._inflight.pop, self.quotas.dequeued, self._resolve
        for op, outcome in zip(batch, outcomes):
            call = op.call
            if call is None or call.answer is not None or op.future is not None or op.outcome is not None:
                resolve(op, outcome)  # a unary call's, a Stream's, a key waited on, or decided already
                continue
            inflight_pop((op.merchant_id, op.idempotency_key), None)
            dequeued(op.merchant_id)
            op.outcome = outcome  # what Call.decided does
            call.remaining -= 1
            if call.remaining == 0 and not call.future.done():  # done: the caller went away (cancelled)
                call.future.set_result(None)

    def _fail(self, batch: list[Operation], code: Code, message: str) -> None:
        for op in batch:
            self._resolve(op, Outcome(code, message=message))

    async def _database_failed(self, batch: list[Operation], error: BaseException, ambiguous: bool) -> None:
        metrics.batches.labels("failed").inc()
        log.error("batch not committed", extra={"error": repr(error), "operations": len(batch), "ambiguous": ambiguous})
        if ambiguous:
            message = (
                "the ledger database connection broke while this operation was being committed; "
                "its outcome is unknown. Retry with the same idempotency key to learn it"
            )
        else:
            message = _NOT_APPLIED_MESSAGE
        self._fail(batch, Code.UNAVAILABLE, message)
        if _divergent(error):
            # The fast path and Postgres disagree (an id already taken) or another service may be the
            # writer now: retrying the same batch would fail again or worse. Rebuild from Postgres (or
            # stop, if the writer lock is another's).
            log.critical(
                "batch refused as divergent from the ledger database; resynchronising", extra={"error": repr(error)}
            )
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
                self._fail(
                    [self._queue.popleft() for _ in range(len(self._queue))],
                    Code.UNAVAILABLE,
                    "the ledger database is unreachable; retry with the same idempotency key",
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _prefetch(self, batch: list[Operation], now_us: int) -> None:
        """Reads from Postgres the holds, transactions and rule records the batch refers to that the state
        machine does not hold, and loads them into it."""
        hold_ids, voucher_hold_ids, record_ids, transaction_ids = self.machine.missing(batch)
        if hold_ids or voucher_hold_ids or record_ids or transaction_ids:
            await self._caught_up()  # what it reads may be in a batch not projected yet
        holds = await self.store.holds(hold_ids) if hold_ids else []
        voucher_holds = (
            [(r["authorization_id"], voucher_hold(r)) for r in await self.store.voucher_holds(voucher_hold_ids)]
            if voucher_hold_ids
            else []
        )
        earns, splits = [], []
        if record_ids:
            earns = [(r["transaction_id"], earn_record(r)) for r in await self.store.earn_records(record_ids)]
            splits = [
                (
                    r["transaction_id"],
                    SplitRecord(
                        r["member_id"], r["merchant_id"], r["vouchers"], r["points"], r["from_credit"], r["refunded"]
                    ),
                )
                for r in await self.store.split_records(record_ids)
            ]
        transactions = await self.store.transactions(transaction_ids) if transaction_ids else []
        self._expired_pending.extend(
            self.machine.load_prefetched(now_us, holds, voucher_holds, earns, splits, transactions)
        )

    # --- dividend rounds ---

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
            await self._caught_up()  # the round reads the balances of every batch answered
            decided = await self.store.decide_dividend_round(
                self.settings.program_id, version, self.settings.commit_timeout_seconds
            )
        except Exception as error:  # the next check tries again; nothing was stored
            log.warning("dividend round not decided", extra={"error": repr(error)})
            return None
        if decided is not None:
            program.rounds = decided.round_number
            program.dividends_unposted = True
            self._queued.set()
            log.info(
                "dividend round decided",
                extra={
                    "round": decided.round_number,
                    "pool": decided.pool_point_units,
                    "rate_bps": decided.rate_bps,
                    "holders": len(decided.allocations),
                    "total_issued": decided.total_issued,
                },
            )
        return decided

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


_INTERNAL_MESSAGE = "internal error; the operation was not applied"
_NOT_APPLIED_MESSAGE = (
    "the ledger database refused or did not answer; this operation was not applied. Retry with the same idempotency key"
)


def _count_committed(write: BatchWrite, ledger: Any) -> None:
    """Business counters, from what the batch committed (never from what it only tried): summed per
    kind first, so a counter is touched once a batch, not once a transaction (each inc takes a lock)."""
    amounts, counts = sums_by_kind(write.transactions)
    for kind, amount in amounts.items():
        if kind == fastpath.KIND_EARN:
            metrics.points_earned.inc(amount)
        elif kind == rules.KIND_EXPIRY:
            metrics.points_expired.inc(amount)
            metrics.program_transactions.labels("expiry").inc(counts[kind])
        elif kind in (fastpath.KIND_CAPTURE, fastpath.KIND_REDEEM):
            metrics.points_redeemed.inc(amount)
        elif kind in kinds.REFUNDS:
            metrics.points_refunded.labels(kinds.REFUNDS[kind]).inc(amount)
        else:
            metrics.program_transactions.labels(kinds.kind(kind).name).inc(counts[kind])
    if write.expired_holds:
        metrics.hold_expiries.inc(len(write.expired_holds))
        metrics.points_hold_expired.inc(sum(ledger.hold(h)[3] for h in write.expired_holds if ledger.has_hold(h)))


def sums_by_kind(transactions: list[tuple]) -> tuple[dict[int, int], collections.Counter[int]]:
    """(kind -> sum of amounts, kind -> count) of transaction rows. The columns are taken and summed in
    C (map, Counter, compress): a pass per kind in the batch (a few), no Python loop over its rows."""
    kinds_of = list(map(_KIND, transactions))
    counts = collections.Counter(kinds_of)
    if len(counts) == 1:
        return {kinds_of[0]: sum(map(_AMOUNT, transactions))}, counts
    column = list(map(_AMOUNT, transactions))
    return {k: sum(itertools.compress(column, map(operator.eq, kinds_of, itertools.repeat(k)))) for k in counts}, counts


_MERCHANT_AND_KEY = operator.itemgetter(0, 1)  # an idempotency record's (merchant_id, key)
_OPERATION_KEY = operator.attrgetter("merchant_id", "idempotency_key")  # an operation's, taken in C
_KIND, _AMOUNT = operator.itemgetter(1), operator.itemgetter(4)  # a transaction row's kind, amount


def _outcome_of(future: asyncio.Future) -> Outcome:
    """The outcome a submit() task ended with; its Rejection or unexpected error as an outcome."""
    if future.cancelled():
        return Outcome(Code.UNAVAILABLE, message=_NOT_APPLIED_MESSAGE)
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, Rejection):
        return Outcome(error.code, message=error.message)
    log.error("operation failed unexpectedly", exc_info=error)
    return Outcome(Code.INTERNAL, message=_INTERNAL_MESSAGE)


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
