"""The projector: writes the relational rows of appended batches off the answer path (issue 14 stage 5).

A batch's answer waits only for its row in the batch log (processor/batch_log.py). The committer then
hands the batch (its id and BatchWrite, still in memory) to this projector through a BOUNDED queue
(--projection-queue-batches-max: when it is full the committer waits, which holds the callers back:
backpressure rather than an unbounded lag). The projector takes the queued batches in order and writes
up to --projection-batches-per-transaction-max consecutive ones in ONE Postgres transaction on its
own pool connection (Store.project_batches: the rows exactly as the batch's own transaction wrote them
before the log, fenced FOR KEY SHARE on ledger_writer, projection_state advanced in the same
transaction guarded by its previous value), so its BEGIN, fence and COMMIT cost once per several
batches, and the program's state rows are written once per group (processor/rules_rows.py).

Groups form on purpose, not only when the projector lags: it lingers until --projection-linger-seconds
after the oldest queued batch was appended, for more batches, unless
the group is full or someone waits for the projection (wait_through "urges" it: a read that promises
read-your-writes, the committer's own reads, a drain are never held by the linger, only by the
projection in flight and their own). Why: with the program in force a projection of one batch costs
Postgres ~11-13 µs/op in the program's rows, a group of 4 ~9.5-10, of 16 ~6 (loadtest.rules_write),
and the bench's SubmitBatch load formed groups of ~1 by itself. What waits out the linger: the change
feed and the balance checkpoint, which follow the projection (bounded: the linger plus a projection).
Off by default (0). The ninth session measured SubmitBatch of 1,000 at 3-5 batches/s: groups of
1.1-1.2, visibility later with a 0.1 s linger. The twelfth, at ~35-43 batches/s (loadtest.sustain, three
pairs, linger 0 against 0.05 s on one tree): groups form and Postgres is 1.7-2.0 µs/op lower, but the
service's young collector passes double (the queued batches' objects are freed later, after a pass
rather than before it: +1.1-1.5 µs/op on the event loop, which is the limit) and ops/s to visibility
were not higher (42.8k/42.0k -> 40.8k; 34.7k/36.4k -> 34.6k/33.5k). It pays once Postgres's core,
not the loop, is the limit. A read that urges still waits for the (larger) group in flight.

After each projection, `projected` (the pipeline's callback) runs with the batches in order: it wakes
the readers waiting in Pipeline.projected(), the change feed (it reads `transactions`, so it only ever
sees projected batches, in id order: one projection at a time), and the balance checkpoint (whose
mark never passes the projection).

Errors: a transient one (Postgres away, a timeout, a broken connection, even one that may have come
after COMMIT: the guard skips what is already projected) is retried with backoff — the log is durable
and the batches stay queued. After FAILING_AFTER_FAILURES in a row the projection is *failing* (`failing`
says why, points_projection_failing is 1) until one succeeds: meanwhile a wait for it (wait_through) is
refused at once instead of waiting out its bound, so a committer that must read the relational tables
before a batch (a retry's stored outcome, a refund's prefetch) answers UNAVAILABLE at once rather than
stall every call queued behind it, and a read-your-writes read answers UNAVAILABLE naming the cause. A
single failure is not enough: a connection reset retried 50 ms later should not refuse anyone. A
divergent one (a unique violation, the writer role lost, a gap) is critical: `failed` asks the pipeline to resynchronise, which projects the log from projection_state
before it reloads anything, and the projector stops until the recovery resets it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import gc
import logging
import time
from collections.abc import Iterator
from typing import Callable

import asyncpg

from processor import batch_log, domain, metrics
from processor.store import BatchWrite, Store, StoreError, WriterLockLost

log = logging.getLogger("points.projector")

# batches read from the log per projection at recovery (each decoded in memory: bounded)
RECOVERY_BATCHES_PER_READ = 64
# batch-log rows deleted per prune statement, at most
PRUNE_ROWS_MAX = 10_000
RETRY_DELAY_SECONDS_MAX = 2.0
# consecutive failed projections after which waits for the projection are refused at once (see above)
FAILING_AFTER_FAILURES = 2
# how often projected batches past the retention are deleted
PRUNE_INTERVAL_SECONDS = 60.0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off while a projection's batches are decoded and written (the projector
    process: projector_process.run_child), on again after, as the state machine does for its apply.
    A decoded batch is ~15 container objects an operation (rows, records) that all live until its
    projection commits and are freed by their reference counts after it; collecting while they are made
    only walks them again and again and promotes them into the older generations, whose passes then walk
    them once more. Measured (python -m loadtest.projector_cpu, program in force, a group of 1): the
    collector was about half of the decode's CPU."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class ProjectionRefused(StoreError):
    """Recovery cannot project the log: Postgres holds a row an acknowledged batch made."""


@dataclasses.dataclass(slots=True)
class Appended:
    """A batch in the log, not yet projected."""

    batch_id: int
    write: BatchWrite
    appended_at: float  # time.monotonic() when its append was acknowledged


class Projector:
    def __init__(
        self,
        store: Store,
        queue_batches_max: int,
        batches_per_transaction_max: int,
        timeout_seconds: float,
        retention_seconds: float,
        projected: Callable[[list[Appended]], None],
        failed: Callable[[BaseException], None],
        linger_seconds: float = 0.0,
    ):
        domain.require(queue_batches_max >= 1 and batches_per_transaction_max >= 1, "projector bounds are >= 1")
        domain.require(linger_seconds >= 0.0, "the projection's linger is >= 0 s")
        self.store = store
        self.queue_batches_max = queue_batches_max
        self.batches_per_transaction_max = batches_per_transaction_max
        self.linger_seconds = linger_seconds
        self.timeout_seconds = timeout_seconds
        self.retention_seconds = retention_seconds
        self._prune_due_at = time.monotonic() + PRUNE_INTERVAL_SECONDS
        self._projected = projected
        self._failed = failed
        self._queue: collections.deque[Appended] = collections.deque()
        self.appended_through = 0  # the newest batch handed over (appended and answered)
        self.through = 0  # the newest batch projected (projection_state.through_batch_id)
        self.urgent_through = 0  # the newest batch someone waits for: projected without lingering
        self._queued = asyncio.Event()  # wakes the projector: a batch was queued, or halt()
        self._progress = asyncio.Event()  # set (and replaced) when batches were projected or it stopped
        self._task: asyncio.Task[None] | None = None
        self._halting = False
        self.stopped = False  # stopped on a divergent error: waits for a reset by the recovery
        self._failures_in_a_row = 0
        self._last_failure = ""

    # --- the committer's side ---

    async def put(self, item: Appended) -> None:
        """Queues an appended batch, in batch id order; waits while the queue is full (backpressure),
        unless the projection is failing: then the committer refuses new batches at its door while the
        queue is full (queue_full), so the queue holds at most the batches already applied beyond it."""
        domain.require(item.batch_id > self.appended_through, "batches are handed over in batch id order")
        while self.queue_full and self.running and self.failing is None:
            metrics.projection_queue_full.inc()
            await self._progress.wait()
        self._queue.append(item)
        self.appended_through = item.batch_id
        self._wake()

    async def wait_through(self, batch_id: int, timeout_seconds: float) -> bool:
        """Waits until batch `batch_id` is projected, at most `timeout_seconds`; whether it is. Refused
        (False) at once while the projection is failing (`failing`), and as soon as it starts failing."""
        if self.through >= batch_id:
            return True
        self._urge(batch_id)
        deadline = time.monotonic() + timeout_seconds
        while self.through < batch_id:
            left = deadline - time.monotonic()
            # a stopped projector reaches nothing until the recovery; a failing one not before it succeeds
            if left <= 0 or not self.running or self.failing is not None:
                return False
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except TimeoutError:
                return self.through >= batch_id
        return True

    @property
    def queue_full(self) -> bool:
        return len(self._queue) >= self.queue_batches_max

    @property
    def failing(self) -> str | None:
        """Why the projection is failing (FAILING_AFTER_FAILURES or more in a row), else None."""
        if self._failures_in_a_row < FAILING_AFTER_FAILURES:
            return None
        return f"the projection failed {self._failures_in_a_row} times in a row, last: {self._last_failure}"

    def _note_failure(self, error: str, *, projection: bool = True) -> None:
        """A projection failed transiently (it is retried): one more in a row, counted in
        points_projection_failures_total unless `projection` is False (the projector process exited
        unasked: it is started again, and two such exits in a row are failing too); waiters re-check
        `failing`."""
        self._failures_in_a_row += 1
        self._last_failure = error
        if projection:
            metrics.projection_failures.inc()
        self._signal()

    def _note_success(self) -> None:
        self._failures_in_a_row = 0

    def behind(self, batch_id: int) -> str:
        """How far the projection is from `batch_id`, for a refusal's message: the batches, and why while
        it is failing."""
        failing = self.failing
        return f"{batch_id - self.through} batches" + (f" ({failing})" if failing else "")

    @property
    def lag_batches(self) -> int:
        return self.appended_through - self.through

    def lag_seconds(self) -> float:
        """Age of the oldest batch appended and not projected (0 when none)."""
        return time.monotonic() - self._queue[0].appended_at if self._queue else 0.0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- lifecycle ---

    def reset(self, through: int) -> None:
        """After a recovery projected the log up to `through`: nothing is queued, nothing lags."""
        domain.require(not self.running, "the projector is reset only while halted")
        self._queue.clear()
        self.appended_through = self.through = through
        self.stopped = False
        self._failures_in_a_row = 0
        self._wake()

    async def started(self) -> None:
        """Returns once the projector takes batches: at once here (a task of this process)."""

    def start(self) -> None:
        if not self.running:
            self._halting = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="projector")

    async def halt(self) -> None:
        """Stops after the projection in flight, if any, ends (bounded by its timeout); what is queued
        stays in the log for the next recovery (or, on a graceful stop, was drained first)."""
        self._halting = True
        self._wake()
        if self._task is not None:
            await asyncio.wait({self._task})
            self._task = None

    # --- the projector's side ---

    def _wake(self) -> None:
        self._queued.set()

    def _urge(self, batch_id: int) -> None:
        """Someone waits for `batch_id`: the batches up to it are projected without lingering."""
        if batch_id > self.urgent_through:
            self.urgent_through = batch_id
            self._wake()

    def _linger_left(self, since: float) -> float:
        """Seconds to wait for more batches before projecting the queued ones (0: project now): the
        group is not full, nobody waits for it, and the linger since `since` is not over."""
        if (
            self.linger_seconds <= 0.0
            or len(self._queue) >= self.batches_per_transaction_max
            or self.urgent_through > self.through
        ):
            return 0.0
        return since + self.linger_seconds - time.monotonic()

    def _signal(self) -> None:
        """Wakes every waiter of the progress so far (each re-checks its own condition)."""
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _run(self) -> None:
        try:
            await self._project()
        except Exception as error:  # a bug (a callback's, an assertion): the recovery starts it again
            log.critical("the projector failed; resynchronising", exc_info=error)
            self.stopped = True
            self._failed(error)
        finally:
            self._signal()

    async def _project(self) -> None:
        delay = 0.05
        while not self._halting:
            if not self._queue:
                if time.monotonic() >= self._prune_due_at:
                    await self._prune()
                    continue
                self._queued.clear()
                try:
                    await asyncio.wait_for(self._queued.wait(), PRUNE_INTERVAL_SECONDS)
                except TimeoutError:
                    pass
                continue
            # from the oldest batch's append, not from the last projection's end: a projector that is busy
            # does not idle on top of it (lingering after each projection let the lag grow under load)
            linger = self._linger_left(self._queue[0].appended_at)
            if linger > 0.0:
                self._queued.clear()  # set again by the next put, an urge or halt
                try:
                    await asyncio.wait_for(self._queued.wait(), linger)
                except TimeoutError:
                    pass
                continue
            group = [self._queue[i] for i in range(min(len(self._queue), self.batches_per_transaction_max))]
            started = time.monotonic()
            try:
                through = await self.store.project_batches([(a.batch_id, a.write) for a in group], self.timeout_seconds)
            except Exception as error:
                if _divergent(error):
                    log.critical(
                        "projection refused as divergent from the ledger database; resynchronising",
                        extra={"error": repr(error), "batches": [group[0].batch_id, group[-1].batch_id]},
                    )
                    self.stopped = True
                    self._failed(error)
                    return
                log.warning(
                    "projection failed; retrying (the batches are in the log)",
                    extra={"error": repr(error), "batches": [group[0].batch_id, group[-1].batch_id]},
                )
                self._note_failure(_described(error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_SECONDS_MAX)
                continue
            delay = 0.05
            self._note_success()
            domain.require(
                through >= group[-1].batch_id, f"projection stopped at {through}, before {group[-1].batch_id}"
            )
            for _ in group:
                self._queue.popleft()
            self.through = through
            metrics.projection_seconds.observe(time.monotonic() - started)
            metrics.projections.inc()
            metrics.projection_batches.observe(len(group))
            self._projected(group)
            self._signal()
            if time.monotonic() >= self._prune_due_at:
                await self._prune()

    async def _prune(self) -> None:
        """Deletes projected log rows past the retention, beside the traffic (a failure waits for the
        next interval: the rows are only kept longer)."""
        self._prune_due_at = time.monotonic() + PRUNE_INTERVAL_SECONDS
        try:
            deleted = await prune_log(self.store, self.retention_seconds, self.timeout_seconds)
        except Exception as error:
            log.warning("batch log not pruned; trying again later", extra={"error": repr(error)})
        else:
            if deleted:
                metrics.batch_log_pruned.inc(deleted)


def _described(error: BaseException) -> str:
    """An error as a waiter's message shows it: its text, or its type when it has none (a timeout)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _divergent(error: BaseException) -> bool:
    """A projection error retrying cannot cure: Postgres holds a row the batch thought new, the writer
    role is another's, or the log and the mark disagree (StoreError: ProjectionGap, WriterFenced)."""
    return isinstance(error, (asyncpg.UniqueViolationError, StoreError, WriterLockLost, domain.InvariantViolation))


async def project_log(store: Store, timeout_seconds: float, batches_per_transaction_max: int) -> tuple[int, int]:
    """Recovery: projects every batch of the log after projection_state.through_batch_id (decoded from
    its payload, written by the same code in the same guarded transaction), oldest first. Returns
    (through, the newest batch id): after it the two are equal."""
    async with store.pool.acquire() as connection:
        through, newest = await batch_log.positions(connection, store.recovery_timeout)
    if through >= newest:
        return through, newest
    log.info("projecting the batch log's tail", extra={"after_batch": through, "through_batch": newest})
    started = time.monotonic()
    while through < newest:
        async with store.pool.acquire() as connection:
            entries = await batch_log.read_after(
                connection, through, min(RECOVERY_BATCHES_PER_READ, batches_per_transaction_max), store.recovery_timeout
            )
        domain.require(bool(entries), f"batch_log holds batches after {through} up to {newest}")
        try:
            through = await store.project_batches([(e.batch_id, e.write) for e in entries], timeout_seconds)
        except asyncpg.UniqueViolationError as error:
            # Postgres holds a row an acknowledged batch made (written around the service: a tool, a
            # restore): retrying cannot cure it and the log is the truth, so the service stops rather
            # than serve a ledger its tables contradict
            raise ProjectionRefused(
                f"batches {entries[0].batch_id}..{entries[-1].batch_id} of the batch log cannot be projected: "
                f"{error.detail or error} (a row written around the service?). Remove the conflicting row "
                "(the log's batch is what was acknowledged), then start the service again"
            ) from error
    log.info(
        "batch log projected",
        extra={"through_batch": through, "seconds": round(time.monotonic() - started, 3)},
    )
    return through, newest


async def prune_log(store: Store, retention_seconds: float, timeout_seconds: float) -> int:
    """Deletes projected batches older than the retention, in bounded statements; returns how many."""
    older_than = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=retention_seconds)
    deleted = 0
    while True:
        async with store.pool.acquire() as connection:
            count = await batch_log.prune(connection, older_than, PRUNE_ROWS_MAX, timeout_seconds)
        deleted += count
        if count < PRUNE_ROWS_MAX:
            return deleted
