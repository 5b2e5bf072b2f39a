"""Postgres faults under traffic: Postgres unreachable for a while, a stalled connection, a Postgres
restart, and terminated backends. While the service cannot commit it answers UNAVAILABLE (retryable),
says NOT_SERVING on health, and acknowledges nothing it did not commit; when Postgres answers again it
re-synchronises its fast path from Postgres and serves again by itself. After each fault, the checks of
the crash harness (test_restart.py): every acknowledged operation is in the journal exactly once, no
unacknowledged one is half-applied, retries with the same key get the committed outcome, balances and
holds equal what the journal implies, and the journal reconciles.

The service reaches Postgres through a TCP proxy (tcp_proxy.py) that the test cuts or stalls. Postgres
is a server of these tests' own on 127.0.0.1 (pgserver's binaries), which the restart test restarts;
with DATABASE_URL set, the proxy forwards to that server instead, and only the restart test uses the
dedicated one. `python -m tests.soak --seconds 300` runs the same scenarios, and SIGKILLs, in a loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from typing import Callable

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from points.v1 import points_pb2 as pb
from tests.harness import Credentials, ServiceProcess, add_merchant, ledger_discrepancies
from tests.integration.helpers import balance, member_in_postgres, unique
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.test_restart import (
    Board,
    Client,
    Op,
    Progress,
    check_entries,
    check_in_journal,
    expected_balances,
    outcome_of,
    read_journal,
    replay,
)

pytestmark = pytest.mark.timeout(120)

SERVICE_NAME = "points.v1.PointsService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CLIENTS = 8
MEMBERS = 6
CALL_TIMEOUT_SECONDS = 10  # ≫ the commit timeout: the service must answer long before it
RETRY_PAUSE_SECONDS = 0.2  # a client's pause before retrying an unanswered call
RETRYING_SECONDS_MAX = 60
COMMIT_TIMEOUT_SECONDS = 1
POOL_CONNECTIONS_MAX = 4
OUTAGE_SECONDS = 2.0  # how long Postgres stays unreachable / the connection stalled, at least
REFUSED_DURING_OUTAGE_MIN = 5  # the outage lasts until this many calls were refused in it
RESTARTS = 2
TERMINATIONS = 4
HEALTH_POLL_SECONDS = 0.05
NOT_SERVING_WAIT_SECONDS = 10  # deadline for health to say NOT_SERVING once Postgres is away
RECOVERY_WAIT_SECONDS = 30  # deadline for SERVING and successful traffic once Postgres is back
LOCK_WAIT_SECONDS = 10  # deadline for the writer lock to be held again after it was lost
SERVICE_APPLICATIONS = ("points-processor", "points-processor-lock", "points-processor-projector")
# gRPC's own words when the service process is gone (SIGKILL), not an answer of the service
TRANSPORT_FAILURE = re.compile(
    r"failed to connect|socket closed|connection reset|connection refused|broken pipe|"
    r"recvmsg|sendmsg|goaway|endpoint|connection aborted",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------------------------------
# A Postgres of the tests' own, on a TCP port, that they may restart


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_database(url: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path="/" + name))


def _with_address(url: str, host: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit(
        parts._replace(netloc=f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}")
    )


async def _create_database(server_url: str) -> str:
    name = "points_fault_" + uuid.uuid4().hex[:12]
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return _with_database(server_url, name)


class DedicatedPostgres:
    """initdb + pg_ctl from the pgserver package's binaries, listening on 127.0.0.1:<free port> only
    (no unix socket). As root, Postgres runs as pgserver's unprivileged user, as pgserver does."""

    def __init__(self):
        with warnings.catch_warnings():  # pgserver's platformdirs warns about XDG_RUNTIME_DIR on servers
            warnings.simplefilter("ignore")
            import pgserver
        self.bin = pathlib.Path(pgserver.__file__).parent / "pginstall" / "bin"
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="points-faults-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.initdb_options: tuple[str, ...] = ()  # more initdb options (a subclass's)
        self.user = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            shutil.chown(self.directory, self.user, self.user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        command, user = [str(self.bin / program), *args], None
        if self.user is not None:
            # runuser rather than subprocess's user=: that makes Python fork() (not vfork) a process
            # full of gRPC threads, whose fork handlers are not safe then
            runuser = shutil.which("runuser")
            command, user = ([runuser, "-u", self.user, "--", *command], None) if runuser else (command, self.user)
        completed = subprocess.run(
            command,
            user=user,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            cwd=self.directory,
        )
        if completed.returncode != 0:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{completed.stdout}\n{tail}")

    def start(self) -> "DedicatedPostgres":
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=utf8",
            "--no-sync",
            *self.initdb_options,
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '{self.host}'\nport = {self.port}\nunix_socket_directories = ''\n"
                "max_connections = 200\n"
            )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        return self

    def restart(self) -> None:
        """A fast restart: backends are terminated, committed work survives."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-m", "fast", "restart")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self) -> str:
        return asyncio.run(_create_database(self.url))


@dataclasses.dataclass
class TcpPostgres:
    """A Postgres server the proxy can forward to, and how to get a fresh database on it."""

    host: str
    port: int
    create_database: Callable[[], str]


@pytest.fixture(scope="session")
def dedicated_postgres():
    server = DedicatedPostgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tcp_postgres(request) -> TcpPostgres:
    """DATABASE_URL's server when it is reached over TCP, else the dedicated one."""
    external = os.environ.get("DATABASE_URL", "")
    parts = urllib.parse.urlsplit(external)
    if external and parts.hostname and not parts.hostname.startswith("/"):
        return TcpPostgres(parts.hostname, parts.port or 5432, request.getfixturevalue("create_database"))
    server = request.getfixturevalue("dedicated_postgres")
    return TcpPostgres(server.host, server.port, server.create_database)


# ---------------------------------------------------------------------------------------------------
# Traffic that records every answer


@dataclasses.dataclass
class Attempt:
    """One call of an operation and its answer."""

    code: str  # "OK" or the status code name
    details: str
    replayed: bool
    sent_at: float  # time.monotonic()
    answered_at: float

    @property
    def claims_not_applied(self) -> bool:
        """An UNAVAILABLE from the service itself that does not say the outcome is unknown: it promises
        this attempt applied nothing (docs/API.md: "the database did not confirm; nothing was applied")."""
        return (
            self.code == "UNAVAILABLE"
            and "unknown" not in self.details.lower()
            and not TRANSPORT_FAILURE.search(self.details)
        )


class FaultClient(Client):
    """The crash harness's client, recording each attempt's answer; it pauses RETRY_PAUSE_SECONDS
    before retrying an unanswered call (or, if it abandons, before its next operation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attempts: dict[Op, list[Attempt]] = {}

    retry_pause_seconds = RETRY_PAUSE_SECONDS

    def record(self, op: Op, code: str, details: str, replayed: bool, sent_at: float) -> None:
        self.attempts.setdefault(op, []).append(Attempt(code, details, replayed, sent_at, time.monotonic()))

    def last_answer(self, op: Op) -> str:
        return f": {self.attempts[op][-1]}" if self.attempts.get(op) else ""


class Health:
    """Polls grpc.health.v1 Check for the points service and keeps every sample (time, status)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub = None
        self.samples: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="health", daemon=True)

    def watch(self, service: ServiceProcess) -> None:
        channel = grpc.insecure_channel(service.target)  # health is open: no credential
        with self._lock:
            old, self._channel = self._channel, channel
            self._stub = health_pb2_grpc.HealthStub(channel)
        if old is not None:
            old.close()
        if not self._thread.is_alive():
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                stub = self._stub
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
            except grpc.RpcError as error:
                name = "DOWN:" + error.code().name
            except ValueError:  # the channel was closed by watch() for a restarted service
                continue
            with self._lock:
                self.samples.append((time.monotonic(), name))
            self._stop.wait(HEALTH_POLL_SECONDS)

    def first(self, status: int, since: float) -> float | None:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        with self._lock:
            return next((at for at, seen in self.samples if at >= since and seen == name), None)

    def wait_for(self, status: int, since: float, timeout: float) -> float | None:
        """The first time at or after `since` health said `status`, waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.first(status, since)
            if at is not None or time.monotonic() > deadline:
                return at
            time.sleep(HEALTH_POLL_SECONDS)

    def seen_since(self, since: float) -> list[str]:
        """The distinct statuses seen since `since`, in order of change."""
        with self._lock:
            statuses = [seen for at, seen in self.samples if at >= since]
        return [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._channel is not None:
            self._channel.close()


class Traffic:
    """CLIENTS threads driving mixed operations on shared members; half abandon an unanswered call,
    half retry it with the same key until answered."""

    def __init__(self, board: Board, members: list[str], merchants: dict[str, int], rng: random.Random):
        self.progress = Progress()
        self.clients = [
            FaultClient(board, self.progress, members, merchants, random.Random(rng.random()), abandons=index % 2 == 0)
            for index in range(CLIENTS)
        ]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=client.run, args=(self._stop,), daemon=True) for client in self.clients
        ]

    def start(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=RETRYING_SECONDS_MAX + CALL_TIMEOUT_SECONDS)
        assert not any(thread.is_alive() for thread in self._threads), "a client is still retrying"

    @property
    def ops(self) -> list[Op]:
        return [op for client in self.clients for op in client.ops]

    def attempts(self) -> list[Attempt]:
        return [
            attempt
            for client in self.clients
            for attempts in list(client.attempts.values())
            for attempt in list(attempts)
        ]

    def wait_for_acknowledged(self, more: int, timeout: float = RECOVERY_WAIT_SECONDS) -> None:
        assert self.progress.wait_for(self.progress.acknowledged + more, timeout), (
            self.progress.problems or f"the clients did not get {more} more answers in {timeout} s"
        )

    def answers_since(self, since: float) -> dict[str, int]:
        """How many attempts sent at or after `since` got each answer (None: not answered yet)."""
        return dict(collections.Counter(a.code for a in self.attempts() if a.sent_at >= since))

    def wait_for_answers(
        self,
        count: int,
        code: str,
        since: float,
        timeout: float = RECOVERY_WAIT_SECONDS,
        condition: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Waits until `count` attempts sent at or after `since` were answered `code` (and `condition`
        holds); False after `timeout` seconds or a problem."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.progress.problems:
            answered = sum(1 for a in self.attempts() if a.code == code and a.sent_at >= since)
            if answered >= count and condition():
                return True
            time.sleep(0.05)
        return False


# ---------------------------------------------------------------------------------------------------
# The harness: a database, the proxy in front of its server, the service on it, traffic, health


class Harness:
    def __init__(
        self,
        database_url: str,
        upstream: tuple[str, int],
        start_service: Callable[..., ServiceProcess],
        rng: random.Random,
        say: Callable[[str], None] = print,
    ):
        self.url = database_url  # direct: what the test reads and terminates
        self.proxy = TcpProxy(*upstream).start()
        self.service_url = _with_address(database_url, self.proxy.host, self.proxy.port)
        self._start_service = start_service
        self.rng = rng
        self.say = say
        self.board = Board()
        self.health = Health()
        self.service: ServiceProcess | None = None
        self.merchants = {unique("m"): 1000, unique("m"): 500}
        self.members = [unique("mem") for _ in range(MEMBERS)]
        self.ops: list[Op] = []  # every operation of every round
        self.problems: list[str] = []  # found by the faults and the clients
        self.killed_ops: set[Op] = set()  # operations of rounds that SIGKILLed the service
        self.attempts: dict[Op, list[Attempt]] = {}

    def start(self) -> "Harness":
        for merchant, give_back_bps in self.merchants.items():
            add_merchant(self.url, merchant, give_back_bps)
        self.start_service()
        setup = FaultClient(self.board, Progress(), self.members, self.merchants, self.rng, abandons=False)
        merchant = next(iter(self.merchants))
        for member in self.members:
            setup.issue(
                "Earn",
                pb.EarnRequest(
                    merchant_id=merchant, member_id=member, purchase_amount=50_000, idempotency_key=unique("k")
                ),
                give_back_bps=self.merchants[merchant],
            )
        assert [op.code for op in setup.ops] == ["OK"] * MEMBERS, [(op.code, op.response) for op in setup.ops]
        self._keep(setup)
        return self

    def start_service(self) -> ServiceProcess:
        self.service = self._start_service(
            self.service_url,
            "--commit-timeout-seconds",
            str(COMMIT_TIMEOUT_SECONDS),
            "--pool-connections-max",
            str(POOL_CONNECTIONS_MAX),
        )
        self.board.connect(_Endpoint(self.service.target, self.url))
        self.health.watch(self.service)
        return self.service

    def _keep(self, client: FaultClient) -> None:
        self.ops += client.ops
        self.attempts.update(client.attempts)

    def traffic(self) -> Traffic:
        return Traffic(self.board, self.members, self.merchants, random.Random(self.rng.random())).start()

    def finish(self, traffic: Traffic, killed: bool = False) -> None:
        """Stops the traffic and keeps its operations; `killed`: the service was SIGKILLed meanwhile,
        so gRPC's own UNAVAILABLE, CANCELLED and DEADLINE_EXCEEDED are expected of them."""
        try:
            traffic.stop()
        finally:
            for client in traffic.clients:
                self._keep(client)
                if killed:
                    self.killed_ops.update(client.ops)
        self.problems += traffic.progress.problems

    def close(self) -> None:
        self.health.close()
        self.board.close()
        self.proxy.close()

    # --- what the faults need ---

    def terminate_backends(self, applications: tuple[str, ...]) -> int:
        return asyncio.run(_terminate_backends(self.url, applications))

    def writer_lock_holders(self) -> list[str]:
        return asyncio.run(_writer_lock_holders(self.url))

    def wait_for_writer_lock(self, timeout: float = LOCK_WAIT_SECONDS) -> list[str]:
        """Polls until a connection of the service holds the writer lock again; who holds it."""
        deadline = time.monotonic() + timeout
        while True:
            holders = self.writer_lock_holders()
            if holders or time.monotonic() > deadline:
                return holders
            time.sleep(0.1)

    def second_writer_is_refused(self) -> bool:
        """Starts a second service on the same database: True if it refused to start because the
        writer lock is held."""
        second = ServiceProcess(self.url)
        try:
            second.start()
        except RuntimeError:
            second.process.wait(timeout=30)
            deadline = time.monotonic() + 5  # its stderr is read by a thread: let it catch up
            while time.monotonic() < deadline:
                if any("another points service is already writing" in line for line in list(second.log_lines)):
                    return True
                time.sleep(0.05)
            self.say("second service failed to start for another reason:\n" + "".join(second.log_lines[-20:]))
            return False
        second.kill()
        return False

    def check_writer_lock(self, second_writer: bool) -> None:
        """The service holds the writer lock (again), and, if asked, a second service is refused."""
        holders = self.wait_for_writer_lock()
        if holders != ["points-processor-lock"]:
            self.problems.append(
                f"the writer lock is held by {holders or 'nobody'} "
                f"{LOCK_WAIT_SECONDS} s after the fault, not by the service's lock connection"
            )
        if second_writer and not self.second_writer_is_refused():
            self.problems.append("a second service was not refused while the first runs")
        if self.service.process.poll() is not None:
            self.problems.append(
                f"the service exited with {self.service.process.returncode}:\n" + "".join(self.service.log_lines[-20:])
            )


@dataclasses.dataclass
class _Endpoint:
    """The service as the Board sees it: its channels carry the merchants' keys, which the tests
    registered under the direct database URL (the service itself was given the proxy's)."""

    target: str
    database_url: str

    def channel(self) -> grpc.Channel:
        return grpc.intercept_channel(grpc.insecure_channel(self.target), Credentials(self.database_url))


async def _terminate_backends(url: str, applications: tuple[str, ...]) -> int:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE application_name = ANY($1::text[]) AND datname = current_database()""",
            list(applications),
        )
    finally:
        await connection.close()


async def _writer_lock_holders(url: str) -> list[str]:
    from processor.store import WRITER_LOCK_KEY

    key = WRITER_LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid::text::bigint = $1 AND l.objid::text::bigint = $2""",
            key >> 32,
            key & 0xFFFF_FFFF,
        )
        return [r["application_name"] for r in rows]
    finally:
        await connection.close()


# ---------------------------------------------------------------------------------------------------
# The faults. Each runs under traffic and returns what it observed; the checks come after.


@dataclasses.dataclass
class Outage:
    """A span in which the service could not commit and had said NOT_SERVING: every call sent in it
    and answered before Postgres came back must be refused UNAVAILABLE."""

    not_serving_at: float
    restored_at: float


def _outage(harness: Harness, traffic: Traffic, begin: Callable[[], None], hold_seconds: float) -> Outage:
    """Begins a fault, keeps it until health said NOT_SERVING, `hold_seconds` passed and calls were
    refused meanwhile, then ends it (proxy.restore) and waits for SERVING and successful traffic."""
    traffic.wait_for_acknowledged(100)
    began_at = time.monotonic()
    begin()
    try:
        not_serving_at = harness.health.wait_for(NOT_SERVING, began_at, NOT_SERVING_WAIT_SECONDS)
        assert not_serving_at is not None, (
            f"health did not say NOT_SERVING within {NOT_SERVING_WAIT_SECONDS} s of the fault: "
            f"{harness.health.seen_since(began_at)}; answers meanwhile: {traffic.answers_since(began_at)}"
        )
        refused = traffic.wait_for_answers(
            REFUSED_DURING_OUTAGE_MIN,
            "UNAVAILABLE",
            not_serving_at,
            timeout=RECOVERY_WAIT_SECONDS,
            condition=lambda: time.monotonic() - began_at >= hold_seconds,
        )
        assert refused, (
            traffic.progress.problems
            or f"calls were not refused UNAVAILABLE while Postgres was away: {traffic.answers_since(not_serving_at)}"
        )
    finally:
        restored_at = time.monotonic()
        harness.proxy.restore()
    _recovered(harness, traffic, restored_at)
    harness.check_writer_lock(second_writer=False)
    return Outage(not_serving_at, restored_at)


def _recovered(harness: Harness, traffic: Traffic, since: float) -> None:
    """Health says SERVING again by itself and calls succeed again."""
    serving_at = harness.health.wait_for(SERVING, since, RECOVERY_WAIT_SECONDS)
    assert serving_at is not None, (
        f"health did not say SERVING again within {RECOVERY_WAIT_SECONDS} s: {harness.health.seen_since(since)}"
    )
    assert traffic.wait_for_answers(50, "OK", serving_at), (
        traffic.progress.problems or "calls did not succeed again after Postgres came back"
    )


def fault_unreachable(harness: Harness, traffic: Traffic) -> list[Outage]:
    """Postgres unreachable: every connection cut, new ones refused, for OUTAGE_SECONDS at least."""
    return [_outage(harness, traffic, harness.proxy.cut, OUTAGE_SECONDS)]


def fault_stall(harness: Harness, traffic: Traffic) -> list[Outage]:
    """Every connection stalled (no byte moves) for longer than the commit timeout."""
    return [_outage(harness, traffic, harness.proxy.stall, max(OUTAGE_SECONDS, 2 * COMMIT_TIMEOUT_SECONDS))]


def fault_restart(harness: Harness, traffic: Traffic, postgres: DedicatedPostgres) -> list[Outage]:
    """pg_ctl restart -m fast, RESTARTS times, each after more traffic was answered."""
    for _ in range(RESTARTS):
        traffic.wait_for_acknowledged(harness.rng.randint(50, 300))
        postgres.restart()
        _recovered(harness, traffic, time.monotonic())
    harness.check_writer_lock(second_writer=True)
    return []


def fault_terminate(harness: Harness, traffic: Traffic, applications=SERVICE_APPLICATIONS) -> list[Outage]:
    """pg_terminate_backend of the service's connections, TERMINATIONS times, then of the writer lock
    connection alone; the service must hold the writer lock again afterwards."""
    terminated = 0
    for _ in range(TERMINATIONS):
        traffic.wait_for_acknowledged(harness.rng.randint(50, 300))
        time.sleep(harness.rng.uniform(0, 0.05))  # lands in any phase of a batch
        terminated += harness.terminate_backends(applications)
    traffic.wait_for_acknowledged(100)
    terminated += harness.terminate_backends(("points-processor-lock",))
    assert terminated >= TERMINATIONS + 1, f"only {terminated} service backends were terminated"
    _recovered(harness, traffic, time.monotonic())
    harness.check_writer_lock(second_writer=True)  # while traffic runs: the lock may be re-taken lazily
    return []


def fault_sigkill(harness: Harness, traffic: Traffic) -> list[Outage]:
    """The crash harness's fault: SIGKILL the service mid-traffic and start it again."""
    traffic.wait_for_acknowledged(harness.rng.randint(50, 500))
    time.sleep(harness.rng.uniform(0, 0.05))
    harness.service.kill()
    harness.start_service()
    _recovered(harness, traffic, time.monotonic())
    harness.check_writer_lock(second_writer=False)
    return []


# ---------------------------------------------------------------------------------------------------
# The checks


@dataclasses.dataclass
class Report:
    operations: int = 0
    interrupted: int = 0
    abandoned: int = 0
    abandoned_committed: int = 0
    unavailable: int = 0
    unknown_outcome: int = 0
    replayed: int = 0
    replays_checked: int = 0

    def __str__(self) -> str:
        return (
            f"{self.operations} operations; {self.unavailable} UNAVAILABLE answers "
            f"({self.unknown_outcome} of unknown outcome); {self.interrupted} operations interrupted, "
            f"{self.abandoned} abandoned ({self.abandoned_committed} of them committed); "
            f"{self.replayed} answered by a replay; {self.replays_checked} answers replayed identically"
        )


def check_outages(harness: Harness, outages: list[Outage]) -> list[str]:
    """While the service could not commit, no call it received was acknowledged: each was UNAVAILABLE."""
    problems = []
    for outage in outages:
        for op, attempts in harness.attempts.items():
            for attempt in attempts:
                if (
                    outage.not_serving_at <= attempt.sent_at
                    and attempt.answered_at < outage.restored_at
                    and attempt.code != "UNAVAILABLE"
                ):
                    problems.append(
                        f"{op.method} {op.key[1]} answered {attempt.code} while Postgres was away "
                        f"(health NOT_SERVING): {attempt.details}"
                    )
    return problems


def check_answers(harness: Harness) -> list[str]:
    """Every answer is one the service may give: no call waits out its deadline while Postgres is
    away (unless the service was killed), and an UNAVAILABLE that says nothing was applied is true."""
    problems = []
    for op, attempts in harness.attempts.items():
        name = f"{op.method} {op.key[1]}"
        killed = op in harness.killed_ops
        for attempt in attempts:
            if attempt.code == "DEADLINE_EXCEEDED" and not killed:
                problems.append(
                    f"{name}: no answer within {CALL_TIMEOUT_SECONDS} s (the service must answer "
                    f"UNAVAILABLE when it cannot commit)"
                )
            elif attempt.code not in ("OK", "UNAVAILABLE", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED") and not (
                killed and attempt.code == "CANCELLED"
            ):
                problems.append(f"{name}: answered {attempt.code}: {attempt.details}")
        # a replayed outcome was committed by an earlier attempt, which cannot have claimed "not applied"
        decided = attempts and attempts[-1].code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")
        if decided and attempts[-1].replayed and all(a.claims_not_applied for a in attempts[:-1]):
            problems.append(
                f"{name}: every earlier attempt was refused as not applied "
                f"({[a.details for a in attempts[:-1]]}), yet the last one replayed a committed outcome"
            )
    return problems


def check_ledger(harness: Harness, replays_max: int | None = None) -> tuple[list[str], Report]:
    """The crash harness's checks on every operation so far, plus the checks of the answers."""
    ops = harness.ops
    journal = read_journal(harness.url)
    problems = check_answers(harness)
    for op in ops:
        problems += check_in_journal(op, outcome_of(op, journal), journal)
        attempts = harness.attempts.get(op, [])
        if op.abandoned and attempts and all(a.claims_not_applied for a in attempts) and op.key in journal.idempotency:
            problems.append(f"{op.method} {op.key[1]}: refused as not applied ({attempts[-1].details}), yet committed")
    problems += check_entries(journal)
    issued = {op.key for op in ops}
    for what, keys in (
        ("idempotency records", journal.idempotency),
        ("transactions", journal.transactions_by_key),
        ("holds", journal.holds_by_key),
    ):
        if set(keys) - issued:
            problems.append(f"{what} of calls nobody made: {sorted(set(keys) - issued)[:5]}")
    stub = harness.board.stub
    expected = expected_balances(ops, journal)
    if set(expected) != set(harness.members):
        problems.append(f"members in the outcomes {sorted(expected)} != {sorted(harness.members)}")
    for member in harness.members:
        posted, held = expected.get(member, (0, 0))
        shown = balance(stub, member)
        if shown != (posted, held, posted - held):
            problems.append(f"{member}: GetBalance {shown}, the outcomes imply {(posted, held, posted - held)}")
        stored = member_in_postgres(harness.url, member)
        if stored != (posted, posted, held):
            problems.append(
                f"{member}: Postgres (balance, entries, held) {stored}, the outcomes imply {(posted, posted, held)}"
            )
    problems += ledger_discrepancies(harness.url)

    answered = [op for op in ops if not op.abandoned]
    if replays_max is not None and len(answered) > replays_max:
        answered = harness.rng.sample(answered, replays_max)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        problems += [problem for problem in pool.map(lambda op: replay(stub, op), answered) if problem]

    attempts = [a for op in ops for a in harness.attempts.get(op, [])]
    abandoned = [op for op in ops if op.abandoned]
    report = Report(
        operations=len(ops),
        interrupted=sum(op.interrupted for op in ops),
        abandoned=len(abandoned),
        abandoned_committed=sum(op.key in journal.idempotency for op in abandoned),
        unavailable=sum(a.code == "UNAVAILABLE" for a in attempts),
        unknown_outcome=sum(a.code == "UNAVAILABLE" and not a.claims_not_applied for a in attempts),
        replayed=sum(
            bool(attempts) and attempts[-1].replayed for attempts in (harness.attempts.get(op, []) for op in ops)
        ),
        replays_checked=len(answered),
    )
    return problems, report


def run_round(
    harness: Harness, fault: Callable[..., list[Outage]], *args, killed: bool = False, replays_max: int | None = None
) -> tuple[list[str], Report]:
    """One fault under traffic, then every check."""
    traffic = harness.traffic()
    try:
        outages = fault(harness, traffic, *args)
    finally:
        harness.finish(traffic, killed=killed)
    problems, report = check_ledger(harness, replays_max=replays_max)
    problems = harness.problems + check_outages(harness, outages) + problems
    harness.problems = []
    return problems, report


# ---------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown with a failure, to replay the same choices
    return random.Random(seed)


@pytest.fixture
def harness_on(service_factory, rng):
    """Factory: a Harness on a fresh database of `server` (a TcpPostgres or DedicatedPostgres)."""
    made: list[Harness] = []

    def make(server) -> Harness:
        harness = Harness(server.create_database(), (server.host, server.port), service_factory, rng)
        made.append(harness)
        return harness.start()

    yield make
    for harness in made:
        harness.close()


def test_postgres_unreachable_answers_unavailable_goes_not_serving_and_recovers_by_itself(tcp_postgres, harness_on):
    harness = harness_on(tcp_postgres)
    problems, report = run_round(harness, fault_unreachable)
    print(report)
    assert problems == []
    assert report.unavailable >= REFUSED_DURING_OUTAGE_MIN


def test_stalled_connection_longer_than_commit_timeout_answers_unavailable_and_recovers(tcp_postgres, harness_on):
    harness = harness_on(tcp_postgres)
    problems, report = run_round(harness, fault_stall)
    print(report)
    assert problems == []
    assert report.unavailable >= REFUSED_DURING_OUTAGE_MIN


def test_postgres_restart_under_load_loses_nothing_and_the_service_recovers_by_itself(dedicated_postgres, harness_on):
    harness = harness_on(dedicated_postgres)
    problems, report = run_round(harness, fault_restart, dedicated_postgres)
    print(report)
    assert problems == []


def test_terminated_backends_under_load_lose_nothing_and_the_writer_lock_is_taken_again(tcp_postgres, harness_on):
    harness = harness_on(tcp_postgres)
    problems, report = run_round(harness, fault_terminate)
    print(report)
    assert problems == []
    assert report.interrupted, "no call was in flight when backends were terminated"


def test_tcp_proxy_cut_stall_and_restore(tcp_postgres):
    """The fault tool itself: a cut closes connections and refuses new ones, a stall holds bytes
    without closing, restore lets them through in order."""
    url = tcp_postgres.create_database()

    async def go(proxy: TcpProxy) -> None:
        via = _with_address(url, proxy.host, proxy.port)
        connection = await asyncpg.connect(via)
        assert await connection.fetchval("SELECT 1") == 1
        proxy.stall()
        stalled = asyncio.ensure_future(connection.fetchval("SELECT 2"))
        done, _ = await asyncio.wait({stalled}, timeout=0.5)
        assert not done, "a stalled proxy forwarded the query"
        proxy.restore()
        assert await asyncio.wait_for(stalled, 10) == 2
        proxy.cut()
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await connection.fetchval("SELECT 3", timeout=10)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)):
            await asyncpg.connect(via, timeout=10)
        proxy.restore()
        again = await asyncpg.connect(via, timeout=10)
        assert await again.fetchval("SELECT 4") == 4
        await again.close()
        connection.terminate()

    with TcpProxy(tcp_postgres.host, tcp_postgres.port) as proxy:
        asyncio.run(go(proxy))
        assert proxy.connections_refused >= 1
