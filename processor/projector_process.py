"""The projector in its own process (--projector process; issue 14, docs/DESIGN.md section 4 item 5).

In-process, the projector's asyncpg encoding and COPY (~5.5 µs of CPU an operation, eleventh session) and its round
trips share the service's one event loop and core with the committer. Here they run in a child,
`python -m processor project`, so on a machine of two cores they leave the committer's core.

The child (`run_child`): its stdin is a pipe from the service. The service writes a line with the
newest batch id appended after every append, and `wait <batch id>` when someone waits for the
projection to reach that batch (Projector.wait_through); EOF (the service stopped, or died even by
SIGKILL: the kernel closes the pipe) ends the child at once. The child lingers up to
--projection-linger-seconds for more batches (processor/projector.py says why), unless its group is full
or a `wait` asks for them, then reads the log after
projection_state.through_batch_id (batch_log.read_after, at most --projection-batches-per-transaction-max
batches and never past the newest announced), projects them with Store.project_batches (fenced on the
writer epoch and lock session the service gave it, guarded on the mark: nothing is projected twice even
if the service's recovery projects concurrently) and, in the same transaction, pg_notify's the mark on
CHANNEL. It prunes the log as the in-process projector does. A divergent error (projector._divergent)
exits with EXIT_DIVERGENT; a transient one is retried with backoff and reported on the child's stdout,
a pipe to the service (REPORT_FAILED and the error, one line; REPORT_OK once it runs and after a
projection succeeds again): the child exports no metrics, so the service keeps points_projection_*
(the failures too) from the marks and reports it is told, and refuses waits for a failing projection
at once as in-process (projector.FAILING_AFTER_FAILURES) instead of taking a failing child for a slow
one.

The service (`RemoteProjector`): the in-process Projector's interface and queue (the same bounded queue:
the same backpressure), but its task supervises the child instead of projecting. A LISTEN connection
receives the marks and calls the same `projected` callback with the queued batches in order, so readers,
the change feed and the balance checkpoint are unchanged. A child that exits unasked is started again
(bounded backoff); one that exits with EXIT_DIVERGENT calls `failed` (the pipeline resynchronises).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import asyncpg

from processor import batch_log, child_process, domain, metrics
from processor.child_process import ChildProcess
from processor.config import Settings
from processor.projector import PRUNE_INTERVAL_SECONDS, RETRY_DELAY_SECONDS_MAX
from processor.projector import Appended, Projector, _divergent
from processor.projector import _described, collector_paused, prune_log
from processor.store import Store, StoreError

log = logging.getLogger("points.projector")

CHANNEL = "points_projected"  # pg_notify'd with projection_state.through_batch_id by each projection
EXIT_DIVERGENT = 3  # the child's exit code for a divergent error: the service resynchronises
RESTART_DELAY_SECONDS_MIN = 0.1
RESTART_DELAY_SECONDS_MAX = 5.0
# a child that ran this long before it exited starts again after the shortest delay
RESTART_DELAY_RESET_SECONDS = 30.0
# how often the service looks at the child (its CPU, the LISTEN connection) while it runs
WATCH_INTERVAL_SECONDS = 1.0
# at halt, how long the child may take to exit on EOF before it is killed
HALT_SECONDS = 10.0
SPAWN_WAIT_SECONDS = 30.0
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# the service's line on the child's stdin asking for the batches up to the id after it without lingering
URGE = b"wait"
# the child's reports, one line each on its stdout (a pipe the service reads)
REPORT_OK = b"ok"  # running, and its last projection (if any) succeeded
REPORT_FAILED = b"failed"  # followed by a space and the error: a projection failed, it is retried
REPORT_LINE_BYTES_MAX = 1024


class ProjectorDiverged(StoreError):
    """The projector process refused the log as divergent from the ledger database."""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc/<pid>/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


# --- the child: python -m processor project ---


async def run_child(
    store: Store,
    batches_per_transaction_max: int,
    timeout_seconds: float,
    retention_seconds: float,
    linger_seconds: float = 0.0,
) -> int:
    """Projects the log as the service announces batches, until its stdin closes; the exit code."""
    # it stops on EOF only: a Ctrl-C or a SIGTERM sent to the whole group (a terminal, systemd's
    # control-group stop) must leave it to finish the projection the service's drain waits for
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    announced = 0  # the newest batch the service appended (and told us of)
    urgent = 0  # the newest batch someone waits for (URGE): projected without lingering
    wake = asyncio.Event()

    async def listen() -> None:
        nonlocal announced, urgent
        while True:
            line = await reader.readline()
            if not line:  # EOF: the service stopped or died; a projection in flight rolls back
                log.info("the service closed the projector's pipe; exiting")
                sys.stderr.flush()
                os._exit(0)
            if line.startswith(URGE):
                urgent = max(urgent, int(line[len(URGE) :]))
            else:
                announced = max(announced, int(line))
            wake.set()

    listener = loop.create_task(listen(), name="projector-stdin")
    async with store.pool.acquire() as connection:
        through, _ = await batch_log.positions(connection, store.recovery_timeout)
    # what the child holds for its life (modules, the pool): out of the collector's sight, so its passes
    # after each projection walk only what is new (as the service freezes what recovery loaded)
    gc.collect()
    gc.freeze()
    _report(REPORT_OK)
    failed = False
    prune_due_at = time.monotonic() + PRUNE_INTERVAL_SECONDS
    delay = 0.05
    # since when the oldest unprojected batch waits (None: none waits): the first announcement after the
    # projection had caught up, or the start of the projection that left it pending (it was announced
    # before that). Not the projection's end: a busy projector must not idle on top of its work (that
    # let the lag grow under load)
    pending_since: float | None = None
    while not listener.done():
        if through < announced:
            if pending_since is None:
                pending_since = time.monotonic()
            linger = pending_since + linger_seconds - time.monotonic()
            if linger > 0.0 and announced - through < batches_per_transaction_max and urgent <= through:
                wake.clear()  # set again by the next announcement, an urge or EOF
                try:
                    await asyncio.wait_for(wake.wait(), linger)
                except TimeoutError:
                    pass
                continue
        if through >= announced:
            pending_since = None
            if time.monotonic() >= prune_due_at:
                prune_due_at = time.monotonic() + PRUNE_INTERVAL_SECONDS
                await _prune(store, retention_seconds, timeout_seconds)
                continue
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), PRUNE_INTERVAL_SECONDS)
            except TimeoutError:
                pass
            continue
        started = time.monotonic()
        try:
            with collector_paused():  # the decoded batches live until their projection commits
                async with store.pool.acquire() as connection:
                    entries = await batch_log.read_after(
                        connection, through, batches_per_transaction_max, timeout_seconds, announced
                    )
                domain.require(bool(entries), f"batch_log holds batches after {through} up to {announced}")
                through = await store.project_batches(
                    [(e.batch_id, e.write) for e in entries], timeout_seconds, CHANNEL
                )
                del entries  # freed here by their reference counts, not by the collector's next pass
        except Exception as error:
            if _divergent(error):
                log.critical(
                    "projection refused as divergent from the ledger database; exiting for a resync",
                    extra={"error": repr(error), "after_batch": through},
                )
                return EXIT_DIVERGENT
            log.warning(
                "projection failed; retrying (the batches are in the log)",
                extra={"error": repr(error), "after_batch": through},
            )
            _report(REPORT_FAILED + b" " + _described(error).encode(errors="replace"))
            failed = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_DELAY_SECONDS_MAX)
            # the mark may have moved (a COMMIT whose answer was lost, the service's recovery)
            try:
                async with store.pool.acquire() as connection:
                    through, _ = await batch_log.positions(connection, timeout_seconds)
            except Exception:
                pass
            continue
        delay = 0.05
        pending_since = None if through >= announced else started
        if failed:
            _report(REPORT_OK)
            failed = False
    return 0


def _report(line: bytes) -> None:
    """One report to the service (a short line on stdout: a pipe write of this size is atomic)."""
    line = line.replace(b"\n", b" ")[: REPORT_LINE_BYTES_MAX - 1] + b"\n"
    try:
        os.write(sys.stdout.fileno(), line)
    except OSError:  # the service is gone: its pipe's EOF on stdin ends this process next
        pass


async def _prune(store: Store, retention_seconds: float, timeout_seconds: float) -> None:
    try:
        await prune_log(store, retention_seconds, timeout_seconds)
    except Exception as error:
        log.warning("batch log not pruned; trying again later", extra={"error": repr(error)})


# --- the service's side ---


class RemoteProjector(Projector):
    """Projector's interface (put / wait_through / lag / running / reset / start / halt) over the child.

    `command` is the child's argv without the writer fence, which is appended at each start (the
    store's, read then: a resync may have taken the writer role again under a new epoch). The database
    URL travels in the child's environment (DATABASE_URL), not on a command line others can read."""

    def __init__(
        self,
        store: Store,
        queue_batches_max: int,
        batches_per_transaction_max: int,
        timeout_seconds: float,
        retention_seconds: float,
        projected: Callable[[list[Appended]], None],
        failed: Callable[[BaseException], None],
        command: list[str],
        linger_seconds: float = 0.0,
    ):
        super().__init__(
            store,
            queue_batches_max,
            batches_per_transaction_max,
            timeout_seconds,
            retention_seconds,
            projected,
            failed,
            linger_seconds,
        )
        self.command = command
        self._process: ChildProcess | None = None
        self._spawned = asyncio.Event()
        self._cpu_exited = 0.0  # CPU seconds of the children that exited
        self._cpu_current = 0.0  # the running child's, as last read
        self._listener: asyncpg.Connection | None = None

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def cpu_seconds(self) -> float:
        """CPU seconds of every child so far (points_projector_cpu_seconds_total)."""
        pid = self.pid
        if pid is not None:
            self._cpu_current = max(self._cpu_current, cpu_seconds(pid) or 0.0)
        return self._cpu_exited + self._cpu_current

    async def put(self, item: Appended) -> None:
        if item.batch_id <= self.through:  # cannot happen: the child never reads past what it was told
            self.appended_through = item.batch_id
            self._projected([item])
            return
        await super().put(item)

    async def halt(self) -> None:
        """Closes the child's pipe (it exits at once: a projection in flight rolls back, what is queued
        stays in the log) and waits for the supervisor to end."""
        self._halting = True
        self._close_pipe()
        if self._task is not None:
            await asyncio.wait({self._task})
            self._task = None

    def _wake(self) -> None:
        """Tells the child the newest batch appended (a line on its stdin: no polling on either side)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        if not process.stdin.is_closing():
            process.stdin.write(b"%d\n" % self.appended_through)

    def _urge(self, batch_id: int) -> None:
        """Asks the child for the batches up to `batch_id` without lingering (a line on its stdin)."""
        if batch_id > self.urgent_through:
            self.urgent_through = batch_id
            self._send_urge()

    def _send_urge(self) -> None:
        """Tells the child the newest batch someone waits for, if not projected yet (again to a child
        started while they wait)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        if self.urgent_through > self.through and not process.stdin.is_closing():
            process.stdin.write(b"%s %d\n" % (URGE, self.urgent_through))

    def _close_pipe(self) -> None:
        process = self._process
        if process is not None and not process.stdin.is_closing():
            process.stdin.close()

    def _advance(self, through: int) -> None:
        """The child committed the projection through `through`: the queued batches up to it are visible."""
        if through <= self.through:
            return
        domain.require(through <= self.appended_through, f"projected {through} past {self.appended_through} appended")
        group: list[Appended] = []
        while self._queue and self._queue[0].batch_id <= through:
            group.append(self._queue.popleft())
        self.through = through
        self._note_success()
        metrics.projections.inc()
        metrics.projection_batches.observe(max(len(group), 1))
        if group:
            self._projected(group)
        self._signal()

    def _notified(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._advance(int(payload))

    async def _listen(self) -> None:
        """Opens the LISTEN connection on CHANNEL, then reads the mark as it is now (a notification
        sent before the LISTEN took effect, or while a broken connection was down, is not missed)."""
        connection = await asyncpg.connect(self.store.url, timeout=self.timeout_seconds)
        try:
            await connection.add_listener(CHANNEL, self._notified)
            through = await connection.fetchval(
                "SELECT through_batch_id FROM projection_state", timeout=self.timeout_seconds
            )
        except BaseException:
            await connection.close()
            raise
        self._listener = connection
        self._advance(through)

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            await listener.close()

    async def _spawn(self) -> ChildProcess:
        epoch, lock_pid, lock_started = self.store.writer_fence()
        command = [
            *self.command,
            "--writer-epoch",
            str(epoch),
            "--writer-lock-pid",
            str(lock_pid),
            "--writer-lock-started",
            lock_started.isoformat(),
        ]
        environment = {**os.environ, "DATABASE_URL": self.store.url}  # the service's, with the URL it resolved
        # not asyncio.create_subprocess_exec: under uvloop it runs Python in the forked child (child_process)
        process = await child_process.start(command, environment)
        log.info("projector process started", extra={"pid": process.pid, "epoch": epoch})
        return process

    async def started(self) -> None:
        """Returns once the first child is running, at most SPAWN_WAIT_SECONDS: the service says SERVING
        after it, so the child is not forked while the first calls are handled. Why: once in the suite the
        first call to a service in this mode failed "Failed parsing HTTP/2 (unexpected settings ack)" while
        the child was being started. The fork was the suspected cause: uvloop's ran Python in the forked
        child (a restarted child once died of SIGSEGV at birth); child_process now forks without it."""
        try:
            await asyncio.wait_for(self._spawned.wait(), SPAWN_WAIT_SECONDS)
        except TimeoutError:
            log.warning("the projector process has not started yet; serving without waiting for it")

    async def _project(self) -> None:
        """Supervises the child: starts it, restarts it when it exits unasked, stops it at halt."""
        delay = RESTART_DELAY_SECONDS_MIN
        await self._listen()
        try:
            while not self._halting:
                started = time.monotonic()
                self._process = process = await self._spawn()
                self._spawned.set()
                self._cpu_current = 0.0
                self._wake()  # what it must project now (it reads the mark itself)
                self._send_urge()
                if self._halting:  # halted while it started: its pipe was not there to close
                    self._close_pipe()
                code = await self._watch(process)
                self._cpu_exited += self._cpu_current
                self._cpu_current = 0.0
                if self._halting:
                    return
                if code == EXIT_DIVERGENT:
                    self.stopped = True
                    self._failed(ProjectorDiverged("the projector process refused the batch log as divergent"))
                    return
                metrics.projector_restarts.inc()
                # one failure in a row (the next child's first report clears it): a child that keeps exiting
                # is failing, and waits for it are refused at once rather than waiting for nobody
                self._note_failure(f"the projector process exited with {code}; starting it again", projection=False)
                if time.monotonic() - started >= RESTART_DELAY_RESET_SECONDS:
                    delay = RESTART_DELAY_SECONDS_MIN
                log.error(
                    "the projector process exited; starting it again",
                    extra={"pid": process.pid, "exit_code": code, "delay_seconds": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_SECONDS_MAX)
                await self._relisten_if_closed()
        finally:
            process_left = self._process
            if process_left is not None and process_left.returncode is None:
                process_left.kill()
                await process_left.wait()
            self._process = None
            await self._close_listener()

    async def _read_reports(self, process: ChildProcess) -> None:
        """Reads the child's reports (REPORT_OK, REPORT_FAILED) until its stdout closes."""
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line past the reader's limit: not a report of ours
                continue
            if not line:
                return
            word, _, rest = line.rstrip(b"\n").partition(b" ")
            if word == REPORT_OK:
                self._note_success()
            elif word == REPORT_FAILED:
                self._note_failure(rest.decode(errors="replace"))

    async def _watch(self, process: ChildProcess) -> int:
        """Waits for the child to exit (killed if a halt's EOF does not end it in HALT_SECONDS), reading
        its reports and CPU and keeping the LISTEN connection up meanwhile; its exit code."""
        exited = asyncio.ensure_future(process.wait())
        reports = asyncio.ensure_future(self._read_reports(process))
        halt_deadline: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=WATCH_INTERVAL_SECONDS)
                if done:
                    return exited.result()
                self.cpu_seconds()
                if self._halting:
                    halt_deadline = halt_deadline or time.monotonic() + HALT_SECONDS
                    if time.monotonic() >= halt_deadline:
                        log.warning("the projector process did not exit at EOF; killing it", extra={"pid": process.pid})
                        process.kill()
                    continue
                await self._relisten_if_closed()
        finally:
            if not exited.done():
                exited.cancel()
            if not reports.done():
                reports.cancel()

    async def _relisten_if_closed(self) -> None:
        """A LISTEN connection that broke may have missed marks: reopened, it reads the mark again
        (Postgres away: tried again at the next look)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        await self._close_listener()
        try:
            await self._listen()
        except Exception as error:
            log.warning("the projection's LISTEN connection is down; retrying", extra={"error": repr(error)})


def build(
    settings: Settings,
    store: Store,
    projected: Callable[[list[Appended]], None],
    failed: Callable[[BaseException], None],
) -> Projector:
    """The pipeline's projector as --projector says: a task of the service, or its child process."""
    bounds = (
        settings.projection_queue_batches_max,
        settings.projection_batches_per_transaction_max,
        settings.commit_timeout_seconds,
        settings.batch_log_retention_seconds,
    )
    if settings.projector == "in-process":
        return Projector(store, *bounds, projected, failed, settings.projection_linger_seconds)
    command = [
        sys.executable,
        "-m",
        "processor",
        "project",
        "--commit-timeout-seconds",
        repr(settings.commit_timeout_seconds),
        "--projection-batches-per-transaction-max",
        str(settings.projection_batches_per_transaction_max),
        "--batch-log-retention-seconds",
        repr(settings.batch_log_retention_seconds),
        "--projection-linger-seconds",
        repr(settings.projection_linger_seconds),
    ]
    return RemoteProjector(store, *bounds, projected, failed, command, settings.projection_linger_seconds)


def fence_from_arguments(epoch: int, lock_pid: int, lock_started: str) -> tuple[int, int, dt.datetime]:
    """The writer fence the service passed on the child's command line."""
    return epoch, lock_pid, dt.datetime.fromisoformat(lock_started)
