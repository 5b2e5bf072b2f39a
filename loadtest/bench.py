"""Benchmark on this machine: the points service against the floor of its stack and a naive baseline.

    python -m loadtest.bench [--operations 10000] [--rounds 5]      # or: make bench

Starts everything it needs, each server a process of its own:
  * a Postgres: DATABASE_URL if set (fresh databases bench_points_<id> and bench_naive_<id> are
    created on it and dropped at the end), else the embedded one of pgserver under .points-data/bench (stopped at
    the end), started as the service starts its own, with the same settings (README "Postgres settings");
  * no-op   loadtest/noop_server.py: the same stack (grpc.aio on uvloop, same proto) answering with
            constants and doing nothing: what the stack costs before any work;
  * service `python -m processor serve` with its defaults, on a network seeded by `processor seed`,
            called with a gateway key;
  * program the same service on a database of its own with ops/program.example.json in force (levels,
            expiry lots, acquiring and referral rewards, fees): the production configuration;
  * prog/in   the program's service again (a database of its own) with --projector in-process: the
            projector as a task on the service's event loop, against the default's child process on the
            other core (whose CPU the service exports: points_projector_cpu_seconds_total);
  * naive   loadtest/naive_server.py: the same Earn/Redeem, one Postgres transaction per operation
            (UPDATE ... WHERE balance >= $1, then an INSERT), grpc.aio + an asyncpg pool, its own tables,
            the same seeded network.

One fixed list of earns and redeems (25% redeems; members drawn from a Zipf distribution, a few hot
merchants; --seed) is sent by a grpc.aio client in this process:
  * unary      the first --operations, --concurrency (64) calls in flight;
  * batch      the first --batch-operations (3 x --operations) as SubmitBatch calls of 100 and of 1,000
               operations, --batch-concurrency (4) calls in flight;
  * naive      has no SubmitBatch: the unary workload, and the same operations in batches of 100 each
               sent as its operations' unary calls (--concurrency in flight; a batch is done when its
               last call is).
Every call carries a fresh idempotency key. The SubmitBatch rounds of `service` and `program` are timed
until the last operation of every call in flight is visible to ListTransactions (read-your-writes),
not merely acknowledged; the projection lag (batches committed, not yet readable) is read from
/metrics at the end of each round where the service exports it. The last lines print the issue's
targets beside what this run measured (printed, never asserted). Each workload gets a warm-up (a fifth of its size), then
--rounds rounds, interleaved across the servers so that a slow spell of the machine hits them all;
each figure printed is the median of the rounds' figures. Latency is per call (per batch on batch
rows). CPU is user+system time from /proc/<pid>/stat during the round, in % of one core in the table
and in µs per operation in the CPU split: server = the server process (with --projector process, the
default, the projector's child is printed apart from points_projector_cpu_seconds_total; in-process its
CPU is in the server's figure),
Postgres = the postmaster and its children (when Postgres runs on this machine), client = this
process, other = every other process on the machine (/proc/stat: other engineers' work on a shared
machine). The service's pipeline figures and projection lag come from its /metrics.

A benchmark, not a test: it prints figures and asserts nothing about time. The client shares the
machine with the servers and Postgres, so on a small machine it is part of what is measured: its CPU
column says how much.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import asyncpg
import grpc
import uvloop

from loadtest import harness, workload
from processor import domain, postgres_settings, store
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc

CALL_TIMEOUT_SECONDS = 120.0
BATCH_SIZES = (100, 1_000)


# --- Postgres ---------------------------------------------------------------------------------------

# pg_stat_wal: full-page images and bytes written, how often a backend found the WAL buffers full and
# wrote them out itself (wal_buffers too small for the transactions), and checkpoints
WAL_COUNTERS = ("wal_fpi", "wal_bytes", "wal_buffers_full")
# backends report their statistics when idle, at most once a second
STATS_FLUSH_SECONDS = 1.5


class Postgres:
    """DATABASE_URL's server, or the embedded one; creates and drops the bench's databases."""

    def __init__(self, database_url: str, data_dir: pathlib.Path, settings_overrides: str = ""):
        self._embedded = None
        if database_url:
            self.admin_url = database_url
        else:
            directory = data_dir / "pg"
            directory.mkdir(parents=True, exist_ok=True)
            # the service's embedded server and its settings (README "Postgres settings"); stops when we exit
            self._embedded = store.start_embedded_server(directory, settings_overrides, cleanup_mode="stop")
            self.admin_url = self._embedded.get_uri()
        self.description = ""
        self.postmaster_pid: int | None = None

    def url(self, database: str) -> str:
        return urllib.parse.urlunsplit(urllib.parse.urlsplit(self.admin_url)._replace(path="/" + database))

    async def create(self, database: str) -> str:
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await connection.execute(f'CREATE DATABASE "{database}"')
            if not self.description:
                version = await connection.fetchval("SHOW server_version")
                settings = {name: await connection.fetchval(f"SHOW {name}") for name in postgres_settings.REPORTED}
                where = "embedded (pgserver)" if self._embedded else "DATABASE_URL"
                self.description = f"PostgreSQL {version.split()[0]} {where}, " + ", ".join(
                    f"{name} {value}" for name, value in settings.items()
                )
                self.postmaster_pid = self._find_postmaster(await connection.fetchval("SELECT pg_backend_pid()"))
        finally:
            await connection.close()
        return self.url(database)

    def _find_postmaster(self, backend_pid: int) -> int | None:
        """The postmaster, if Postgres runs on this machine (its processes' CPU is then measured)."""
        if self._embedded is not None:
            return self._embedded.get_pid()
        parent = harness.parent_pid(backend_pid)
        try:
            with open(f"/proc/{parent}/cmdline", "rb") as cmdline:
                return parent if b"postgres" in cmdline.read() else None
        except (OSError, TypeError):
            return None

    async def drop(self, database: str) -> None:
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await connection.close()

    def cpu_seconds(self) -> dict[int, float]:
        return harness.children_cpu_seconds(self.postmaster_pid) if self.postmaster_pid else {}

    async def wal_position(self) -> int:
        """Bytes of WAL the server has inserted so far (exact, unlike pg_stat_wal, which backends
        report up to a second late)."""
        connection = await asyncpg.connect(self.admin_url)
        try:
            return int(await connection.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')"))
        finally:
            await connection.close()

    async def wal_counters(self) -> dict[str, float]:
        """pg_stat_wal's counters (the whole server: every bench database, and anything else on a
        shared DATABASE_URL server)."""
        connection = await asyncpg.connect(self.admin_url)
        try:
            row = await connection.fetchrow(f"SELECT {', '.join(WAL_COUNTERS)} FROM pg_stat_wal")
            return {name: float(row[name]) for name in WAL_COUNTERS}
        finally:
            await connection.close()


# --- workloads --------------------------------------------------------------------------------------


def unary_requests(operations: list[workload.Operation], key_prefix: str) -> list[tuple[str, object]]:
    requests = []
    for number, op in enumerate(operations):
        key = f"{key_prefix}{number}"
        if op.kind == "earn":
            requests.append(
                (
                    "Earn",
                    pb.EarnRequest(
                        merchant_id=op.merchant_id,
                        member_id=op.member_id,
                        purchase_amount=op.amount,
                        idempotency_key=key,
                    ),
                )
            )
        else:
            requests.append(
                (
                    "Redeem",
                    pb.RedeemRequest(
                        merchant_id=op.merchant_id, member_id=op.member_id, points=op.amount, idempotency_key=key
                    ),
                )
            )
    return requests


def batch_requests(operations: list[workload.Operation], key_prefix: str, size: int) -> list[pb.SubmitBatchRequest]:
    unary = unary_requests(operations, key_prefix)
    batches = []
    for start in range(0, len(unary), size):
        batch = pb.SubmitBatchRequest()
        for method, request in unary[start : start + size]:
            if method == "Earn":
                batch.operations.add(earn=request)
            else:
                batch.operations.add(redeem=request)
        batches.append(batch)
    return batches


@dataclasses.dataclass
class Run:
    """What one round of one workload measured."""

    operations: int
    seconds: float
    latencies: list[float]
    not_applied: collections.Counter  # why operations were not applied: "Redeem FAILED_PRECONDITION": count
    cpu: harness.CpuSplit  # CPU seconds of the server, Postgres, this client and the rest of the machine
    commits: float = 0.0  # the service's Postgres transactions during the run (its /metrics)
    commit_seconds: float = 0.0  # their total time
    visible_seconds: float = 0.0  # after the last answer, until the last operations were readable
    projection_lag_batches: float | None = None  # /metrics at the end of the round, if exported
    projection_lag_seconds: float | None = None
    projector_cpu_seconds: float | None = None  # the projector's own CPU during the round, if exported
    wal_bytes: int = 0  # WAL the whole server inserted during the round
    # the projection transactions of the round and the batches they wrote (points_projection_batches's
    # _count and _sum): how often the projector grouped batches under this load
    projections: float = 0.0
    projected_batches: float = 0.0


class Client:
    """A grpc.aio channel to one server."""

    def __init__(self, address: str, key: str):
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self.stub = points_pb2_grpc.PointsServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()

    async def unary(self, requests, concurrency: int) -> tuple[list[float], int]:
        methods = {"Earn": self.stub.Earn, "Redeem": self.stub.Redeem}
        latencies: list[float] = []
        failures: collections.Counter = collections.Counter()
        pending = iter(requests)
        metadata = self.metadata

        async def worker():
            for method, request in pending:
                began = time.perf_counter()
                try:
                    await methods[method](request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
                except grpc.aio.AioRpcError as error:
                    failures[f"{method} {error.code().name}"] += 1
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, failures

    async def paced(self, requests, rate: float) -> tuple[list[float], int]:
        """Open loop: call i starts at i / rate seconds whatever the answers before it (as independent
        merchants would), so latency is measured at that offered load, not at the server's pace."""
        methods = {"Earn": self.stub.Earn, "Redeem": self.stub.Redeem}
        latencies: list[float] = []
        failures: collections.Counter = collections.Counter()

        async def one(method, request):
            began = time.perf_counter()
            try:
                await methods[method](request, metadata=self.metadata, timeout=CALL_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as error:
                failures[f"{method} {error.code().name}"] += 1
            latencies.append(time.perf_counter() - began)

        calls = []
        start = time.perf_counter()
        for number, (method, request) in enumerate(requests):
            delay = start + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.ensure_future(one(method, request)))
        await asyncio.gather(*calls)
        return latencies, failures

    async def batches(self, requests, concurrency: int) -> tuple[list[float], int]:
        latencies: list[float] = []
        failures: collections.Counter = collections.Counter()
        pending = iter(requests)
        applied = pb.OPERATION_OUTCOME_APPLIED
        self.last_applied = []  # (member_id, transaction number) of each call's last applied operation

        async def worker():
            for request in pending:
                began = time.perf_counter()
                try:
                    response = await self.stub.SubmitBatch(
                        request, metadata=self.metadata, timeout=CALL_TIMEOUT_SECONDS
                    )
                    last = None
                    for operation, result in zip(request.operations, response.results):
                        if result.outcome != applied:
                            failures[
                                f"{operation.WhichOneof('operation')} {pb.OperationOutcome.Name(result.outcome)}"
                            ] += 1
                        else:
                            last = (operation, result)
                    if last is not None and (applied_transaction := _applied_transaction(*last)):
                        self.last_applied.append(applied_transaction)
                except grpc.aio.AioRpcError as error:
                    failures[f"SubmitBatch {error.code().name}"] += len(request.operations)
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, failures

    async def visible(self, deadline_seconds: float = 60.0) -> float:
        """Seconds until the last applied operation of every batch call of the round is readable by
        ListTransactions (its member's newest transaction is at least that one); polls every 1 ms."""
        wanted: dict[str, int] = {}
        for member_id, number in self.last_applied:
            wanted[member_id] = max(number, wanted.get(member_id, 0))
        began = time.perf_counter()
        while wanted:
            for member_id, number in list(wanted.items()):
                response = await self.stub.ListTransactions(
                    pb.ListTransactionsRequest(member_id=member_id, page_size=1),
                    metadata=self.metadata,
                    timeout=CALL_TIMEOUT_SECONDS,
                )
                newest = response.transactions[0].transaction_id if response.transactions else ""
                if newest and domain.parse_transaction_id(newest) >= number:
                    del wanted[member_id]
            if wanted:
                if time.perf_counter() - began > deadline_seconds:
                    raise RuntimeError(f"operations acknowledged but not readable after {deadline_seconds:.0f} s")
                await asyncio.sleep(0.001)
        return time.perf_counter() - began

    async def batches_as_unary(self, batches, batch_concurrency: int, concurrency: int) -> tuple[list[float], int]:
        """Each batch (a list of unary requests) sent as unary calls, at most `concurrency` calls in
        flight over all batches; a batch's latency is until its last call is answered."""
        methods = {"Earn": self.stub.Earn, "Redeem": self.stub.Redeem}
        calls = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        failures: collections.Counter = collections.Counter()
        pending = iter(batches)

        async def one(method, request):
            async with calls:
                try:
                    await methods[method](request, metadata=self.metadata, timeout=CALL_TIMEOUT_SECONDS)
                except grpc.aio.AioRpcError as error:
                    failures[f"{method} {error.code().name}"] += 1

        async def worker():
            for batch in pending:
                began = time.perf_counter()
                await asyncio.gather(*(one(method, request) for method, request in batch))
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(batch_concurrency)))
        return latencies, failures

    async def close(self) -> None:
        await self.channel.close()


def _applied_transaction(operation: pb.Operation, result: pb.OperationResult) -> tuple[str, int] | None:
    """(member, transaction number) of an applied earn or redeem of a batch; None from the no-op
    server, which answers no transaction id."""
    which = operation.WhichOneof("operation")
    answer = getattr(result, which)
    if not answer.transaction_id:
        return None
    return getattr(operation, which).member_id, domain.parse_transaction_id(answer.transaction_id)


@dataclasses.dataclass
class Workload:
    server: str  # "no-op", "service", "program", "prog/in", "naive"
    label: str
    shape: str  # "unary", "batch", "batch as unary"
    operations: list[workload.Operation]
    warmup: list[workload.Operation]
    batch_size: int = 1
    runs: list[Run] = dataclasses.field(default_factory=list)


# The projector's own CPU, printed apart where the service exports it (--projector process, the
# default); in-process (prog/in) it is in the service's figure.
PROJECTOR_CPU = "points_projector_cpu_seconds_total"
# the points services: without the program, with it (both with their default --projector process: a
# child process on the other core), and with it and --projector in-process (issue 14 stage 5)
SERVICES = ("service", "program", "prog/in")
_READ_METRICS = (
    "points_pipeline_commit_seconds_count",
    "points_pipeline_commit_seconds_sum",
    "points_projection_lag_batches",
    "points_projection_lag_seconds",
    "points_projection_batches_count",
    "points_projection_batches_sum",
    PROJECTOR_CPU,
)


def read_metrics(metrics_url: str) -> dict[str, float]:
    """The few unlabelled samples the bench reads from a service's /metrics."""
    values: dict[str, float] = {}
    if not metrics_url:
        return values
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in _READ_METRICS:
                values[name] = float(value)
    return values


def pipeline_totals(metrics_url: str) -> tuple[float, float]:
    """(batches committed, seconds spent committing) so far, from the service's /metrics."""
    values = read_metrics(metrics_url)
    return (
        values.get("points_pipeline_commit_seconds_count", 0.0),
        values.get("points_pipeline_commit_seconds_sum", 0.0),
    )


async def run_once(
    workload_: Workload,
    client: Client,
    server: Endpoint,
    postgres: Postgres,
    operations: list[workload.Operation],
    key_prefix: str,
    args,
) -> Run:
    """One pass of the operations through the server, timed, with the CPU each process used."""
    # requests are built before the clock starts: building them is not the server's work
    if workload_.shape == "unary":
        requests = unary_requests(operations, key_prefix)
    elif workload_.shape == "batch":
        requests = batch_requests(operations, key_prefix, workload_.batch_size)
    else:
        unary = unary_requests(operations, key_prefix)
        requests = [unary[i : i + workload_.batch_size] for i in range(0, len(unary), workload_.batch_size)]
    commits_before, commit_seconds_before = pipeline_totals(server.metrics_url)
    before = read_metrics(server.metrics_url)
    projector_before = before.get(PROJECTOR_CPU)
    visible_seconds = 0.0
    wal_before = await postgres.wal_position()
    cpu_before = harness.CpuReading.now(server.pid, postgres.postmaster_pid)
    began = time.perf_counter()
    if workload_.shape == "unary":
        latencies, failures = await client.unary(requests, args.concurrency)
    elif workload_.shape == "batch":
        latencies, failures = await client.batches(requests, args.batch_concurrency)
        if workload_.server in SERVICES:
            # read-your-writes: the round ends when its last operations are readable, not acknowledged
            visible_seconds = await client.visible()
    else:
        latencies, failures = await client.batches_as_unary(requests, args.batch_concurrency, args.concurrency)
    seconds = time.perf_counter() - began
    cpu = harness.CpuSplit.between(cpu_before, harness.CpuReading.now(server.pid, postgres.postmaster_pid))
    wal_after = await postgres.wal_position()
    commits, commit_seconds = pipeline_totals(server.metrics_url)
    after = read_metrics(server.metrics_url)
    projector_after = after.get(PROJECTOR_CPU)
    return Run(
        len(operations),
        seconds,
        latencies,
        failures,
        cpu,
        commits - commits_before,
        commit_seconds - commit_seconds_before,
        visible_seconds,
        after.get("points_projection_lag_batches"),
        after.get("points_projection_lag_seconds"),
        None if projector_after is None else projector_after - (projector_before or 0.0),
        wal_after - wal_before,
        after.get("points_projection_batches_count", 0.0) - before.get("points_projection_batches_count", 0.0),
        after.get("points_projection_batches_sum", 0.0) - before.get("points_projection_batches_sum", 0.0),
    )


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclasses.dataclass
class Figures:
    operations_per_second: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # fraction of one core
    server_us_per_operation: float
    postgres_cpu: float | None
    client_cpu: float
    not_applied: int
    visible_ms: float  # median over rounds: after the last answer until its operations were readable
    projection_lag_batches: float | None  # the largest over the rounds' ends, where exported
    projection_lag_seconds: float | None
    # µs of CPU per operation (medians over rounds): Postgres (None when not on this machine), this
    # client, the projector (None unless the service exports its CPU), every other process
    postgres_us_per_operation: float | None
    client_us_per_operation: float
    projector_us_per_operation: float | None
    other_us_per_operation: float


def figures(runs: list[Run]) -> Figures:
    median = statistics.median

    def median_or_none(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return median(present) if present else None

    def largest_or_none(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    postgres_us = median_or_none(
        [None if r.cpu.postgres is None else r.cpu.postgres / r.operations * 1e6 for r in runs]
    )
    projector_us = [
        None if r.projector_cpu_seconds is None else r.projector_cpu_seconds / r.operations * 1e6 for r in runs
    ]
    return Figures(
        operations_per_second=median(r.operations / r.seconds for r in runs),
        p50_ms=median(_percentile(r.latencies, 0.50) for r in runs) * 1000,
        p99_ms=median(_percentile(r.latencies, 0.99) for r in runs) * 1000,
        server_cpu=median(r.cpu.server / r.seconds for r in runs),
        server_us_per_operation=median(r.cpu.server / r.operations for r in runs) * 1e6,
        postgres_cpu=median_or_none([None if r.cpu.postgres is None else r.cpu.postgres / r.seconds for r in runs]),
        client_cpu=median(r.cpu.client / r.seconds for r in runs),
        not_applied=sum(sum(r.not_applied.values()) for r in runs),
        visible_ms=median(r.visible_seconds for r in runs) * 1000,
        projection_lag_batches=largest_or_none([r.projection_lag_batches for r in runs]),
        projection_lag_seconds=largest_or_none([r.projection_lag_seconds for r in runs]),
        postgres_us_per_operation=postgres_us,
        client_us_per_operation=median(r.cpu.client / r.operations for r in runs) * 1e6,
        projector_us_per_operation=median_or_none(projector_us),
        # the projector's child is a process of its own: in the machine's CPU, so not "other" too
        other_us_per_operation=median(
            max(0.0, r.cpu.other - (r.projector_cpu_seconds or 0.0)) / r.operations for r in runs
        )
        * 1e6,
    )


# --- the bench --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    address: str
    pid: int
    key: str
    metrics_url: str


async def wal_totals(postgres: Postgres) -> dict[str, float]:
    """pg_stat_wal's counters and the checkpoints so far (pg_stat_bgwriter), after the backends' reports."""
    await asyncio.sleep(STATS_FLUSH_SECONDS)
    totals = await postgres.wal_counters()
    connection = await asyncpg.connect(postgres.admin_url)
    try:
        row = await connection.fetchrow("SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter")
    finally:
        await connection.close()
    totals["checkpoints"] = float(row["checkpoints_timed"] + row["checkpoints_req"])
    totals["checkpoints_requested"] = float(row["checkpoints_req"])
    return totals


async def measure(workloads: list[Workload], servers: dict[str, Endpoint], postgres: Postgres, args) -> None:
    clients = {name: Client(server.address, server.key) for name, server in servers.items()}
    wal_before = await wal_totals(postgres)
    run_id = os.urandom(4).hex()
    try:
        for number, w in enumerate(workloads):
            await run_once(w, clients[w.server], servers[w.server], postgres, w.warmup, f"bw{run_id}-{number}-", args)
            print(f"  warmed up: {w.server} {w.label}", flush=True)
        for round_number in range(1, args.rounds + 1):
            for number, w in enumerate(workloads):
                run = await run_once(
                    w,
                    clients[w.server],
                    servers[w.server],
                    postgres,
                    w.operations,
                    f"b{run_id}-{round_number}-{number}-",
                    args,
                )
                w.runs.append(run)
                print(
                    f"  round {round_number}/{args.rounds}: {w.server:<7} {w.label:<34} "
                    f"{run.operations / run.seconds:>9,.0f} ops/s",
                    flush=True,
                )
        # unary latency at half of the maximum the rounds measured (the p99 target is set there)
        args.half_load = {}
        for name in ("service", "program"):
            unary = next((w for w in workloads if w.server == name and w.shape == "unary"), None)
            if unary is None or not unary.runs:
                continue
            rate = statistics.median(run.operations / run.seconds for run in unary.runs) / 2
            requests = unary_requests(unary.operations, f"bh{run_id}-{name}-")
            began = time.perf_counter()
            latencies, failures = await clients[name].paced(requests, rate)
            seconds = time.perf_counter() - began
            args.half_load[name] = (
                rate,
                len(requests) / seconds,
                _percentile(latencies, 0.5),
                _percentile(latencies, 0.99),
                sum(failures.values()),
            )
            print(
                f"  {name} unary paced at {rate:,.0f} ops/s (half the maximum): "
                f"p99 {args.half_load[name][3] * 1000:.1f} ms",
                flush=True,
            )
        wal_after = await wal_totals(postgres)
        args.wal_totals = {name: wal_after[name] - wal_before[name] for name in wal_after}
    finally:
        for client in clients.values():
            await client.close()


def _groups(runs: list[Run]) -> str:
    """Batches per projection transaction over the rounds (min-max), where the service exports them."""
    groups = [r.projected_batches / r.projections for r in runs if r.projections]
    return f" {min(groups):>5.1f}-{max(groups):.1f} batches/projection" if groups else ""


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def report(workloads: list[Workload], args, postgres: Postgres, network: workload.Network, seconds: float) -> None:
    by_name = {(w.server, w.shape, w.batch_size): figures(w.runs) for w in workloads}
    print()
    print(
        f"points bench: {args.operations:,} operations per round for unary rows and naive, "
        f"{args.batch_operations:,} for SubmitBatch rows ({100 - round(args.redeem_share * 100)}% earn, "
        f"{round(args.redeem_share * 100)}% redeem, seed {args.seed}); median of {args.rounds} rounds after a "
        f"warm-up of a fifth; {os.cpu_count()} CPUs; {postgres.description}"
    )
    top = workload.Zipf(network.members, network.member_exponent).share_of_top(1)
    print(
        f"network: {network.merchants} merchants ({network.hot_merchants} hot with "
        f"{network.hot_merchant_share:.0%} of operations), {network.members:,} members (Zipf "
        f"{network.member_exponent:g}: the busiest member makes {top:.1%} of operations); "
        f"naive pool {args.naive_pool_connections} connections; total {seconds:.0f} s"
    )
    header = (
        f"{'server':<8} {'workload':<34} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>10} "
        f"{'µs/op':>7} {'Postgres CPU':>12} {'client CPU':>10} {'not applied':>11} {'visible ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for w in workloads:
        f = by_name[(w.server, w.shape, w.batch_size)]
        print(
            f"{w.server:<8} {w.label:<34} {f.operations_per_second:>9,.0f} {f.p50_ms:>8.2f} {f.p99_ms:>8.2f} "
            f"{_cpu(f.server_cpu):>10} {f.server_us_per_operation:>7.0f} {_cpu(f.postgres_cpu):>12} "
            f"{_cpu(f.client_cpu):>10} {f.not_applied:>11,} "
            f"{(f'{f.visible_ms:.1f}' if w.shape == 'batch' and w.server != 'no-op' else '-'):>10}"
        )
    print(
        "(latency per call; for batch rows, per batch. µs/op: server CPU time per operation. "
        "not applied: operations not APPLIED, over all rounds. visible ms: after a round's last answer, until "
        "its last operations were readable by ListTransactions; the ops/s of those rows count it)"
    )
    lags = {
        f"{w.server} {w.label}": f
        for w in workloads
        if (f := by_name[(w.server, w.shape, w.batch_size)]).projection_lag_batches is not None
        or f.projection_lag_seconds is not None
    }

    def lag(f: Figures) -> str:
        batches = "-" if f.projection_lag_batches is None else f"{f.projection_lag_batches:.0f} batches"
        seconds = "-" if f.projection_lag_seconds is None else f"{f.projection_lag_seconds * 1000:.0f} ms"
        return f"{batches} / {seconds}"

    print(
        "projection lag at the end of each round (points_projection_lag_batches / _seconds, largest): "
        + (
            ", ".join(f"{name} {lag(f)}" for name, f in lags.items())
            if lags
            else "not exported: the service writes every row a read needs before it answers (no projector)"
        )
    )
    cpu_split(workloads, by_name)
    for w in workloads:
        reasons = sum((r.not_applied for r in w.runs), collections.Counter())
        if reasons:
            print(
                f"  not applied, {w.server} {w.label}: "
                + ", ".join(f"{count:,} {reason}" for reason, count in reasons.most_common())
            )
    print()
    print(
        "service pipeline (its /metrics):  Postgres transactions/s, operations per transaction, mean time "
        "to write and commit one, share of the run spent committing; batches per projection transaction "
        "(the projector's groups: min-max over the rounds)"
    )
    median = statistics.median
    for w in workloads:
        if w.server not in SERVICES or not any(r.commits for r in w.runs):
            continue
        runs = [r for r in w.runs if r.commits]
        print(
            f"  {w.server:<8} {w.label:<34} {median(r.commits / r.seconds for r in runs):>7,.0f}/s "
            f"{median(r.operations / r.commits for r in runs):>7,.0f} ops "
            f"{median(r.commit_seconds / r.commits for r in runs) * 1000:>8.1f} ms "
            f"{median(r.commit_seconds / r.seconds for r in runs):>6.0%}" + _groups(runs)
        )

    print()
    wal = getattr(args, "wal_totals", {})
    print(
        "Postgres WAL per operation (the whole server's, during the round; median): "
        + ", ".join(
            f"{w.server} {w.label.split(' c=')[0]} {median(r.wal_bytes / r.operations for r in w.runs):,.0f} B"
            for w in workloads
            if w.server != "no-op" and w.runs
        )
    )
    if wal:
        print(
            f"  over the whole bench (pg_stat_wal): {wal['wal_bytes'] / 2**20:,.0f} MiB of WAL, {wal['wal_fpi']:,.0f} "
            f"full-page images, WAL buffers found full {wal['wal_buffers_full']:,.0f} times (a backend wrote WAL "
            f"out itself before its commit), {wal['checkpoints']:,.0f} checkpoints "
            f"({wal['checkpoints_requested']:,.0f} requested by WAL volume, not timed)"
        )

    def rate(server, shape, size=1):
        return by_name[(server, shape, size)].operations_per_second

    print()
    print("ratios (operations/s):")
    print(
        f"  service / no-op floor:   unary {rate('service', 'unary') / rate('no-op', 'unary'):.2f}x, "
        + ", ".join(
            f"batch {size:,} {rate('service', 'batch', size) / rate('no-op', 'batch', size):.2f}x"
            for size in BATCH_SIZES
        )
    )
    print(
        f"  program / no-op floor:   unary {rate('program', 'unary') / rate('no-op', 'unary'):.2f}x, "
        + ", ".join(
            f"batch {size:,} {rate('program', 'batch', size) / rate('no-op', 'batch', size):.2f}x"
            for size in BATCH_SIZES
        )
    )
    naive_batch = rate("naive", "batch as unary", BATCH_SIZES[0])
    print(
        f"  service / naive:         unary {rate('service', 'unary') / rate('naive', 'unary'):.1f}x, "
        + ", ".join(f"batch {size:,} {rate('service', 'batch', size) / naive_batch:.1f}x" for size in BATCH_SIZES)
        + f"  (naive batch = its batch-{BATCH_SIZES[0]} workload sent as unary calls)"
    )
    for name, (offered, achieved, p50, p99, failed) in getattr(args, "half_load", {}).items():
        print(
            f"  {name} unary at half of its maximum (open loop, {offered:,.0f} ops/s offered, {achieved:,.0f} "
            f"achieved): p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, {failed} not applied"
        )
    targets(by_name, args)


def cpu_split(workloads: list[Workload], by_name: dict) -> None:
    """Issue 14's CPU split: µs of CPU per operation of each process, per workload (medians of rounds)."""
    projector_exported = any(f.projector_us_per_operation is not None for f in by_name.values())
    print()
    print(
        "CPU split, µs of CPU per operation (median of the rounds; /proc): server process | projector | "
        "Postgres (postmaster and every backend) | this client | other processes on the machine"
    )
    for w in workloads:
        f = by_name[(w.server, w.shape, w.batch_size)]
        if w.server in SERVICES:
            projector = (
                f"{f.projector_us_per_operation:.1f}" if f.projector_us_per_operation is not None else "in server"
            )
        else:
            projector = "-"
        postgres = "-" if f.postgres_us_per_operation is None else f"{f.postgres_us_per_operation:.1f}"
        print(
            f"  {w.server:<8} {w.label:<34} {f.server_us_per_operation:>8.1f} {projector:>10} {postgres:>9} "
            f"{f.client_us_per_operation:>8.1f} {f.other_us_per_operation:>8.1f}"
        )
    if not projector_exported:
        print(
            f"  (projector: in the service's figure: it runs inside the service process and the service exports "
            f"no {PROJECTOR_CPU}; Postgres '-': not on this machine)"
        )


def targets(by_name: dict, args) -> None:
    """Issue 14's targets beside this run's figures: printed, never asserted (the machine is shared)."""
    big = BATCH_SIZES[-1]

    def rate(server, shape, size=1):
        return by_name[(server, shape, size)].operations_per_second

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    program_batch = rate("program", "batch", big)
    floor_ratio = program_batch / rate("no-op", "batch", big)
    cost = rate("service", "batch", big) / program_batch
    unary_ratio = rate("program", "unary") / rate("no-op", "unary")
    print()
    print("issue 14 targets (program in force), this run:")
    print(
        f"  1. SubmitBatch of {big:,} to visibility: {program_batch:,.0f} ops/s (target >= 100,000: "
        f"{verdict(program_batch >= 100_000)}); {floor_ratio:.3f}x the no-op batch floor (target >= 0.1: "
        f"{verdict(floor_ratio >= 0.1)})"
    )
    print(
        f"  2. the program costs {cost:.2f}x the plain ledger (SubmitBatch {big:,}; target <= 1.3: {verdict(cost <= 1.3)})"
    )
    half = getattr(args, "half_load", {}).get("program")
    p99 = (
        f"p99 {half[3] * 1000:.1f} ms at half the maximum (target <= 25 ms: {verdict(half[3] <= 0.025)})"
        if half
        else "p99 not measured"
    )
    print(f"  3. unary {unary_ratio:.2f}x the no-op unary floor (target >= 0.8: {verdict(unary_ratio >= 0.8)}); {p99}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--operations",
        type=int,
        default=10_000,
        help="operations per round of the unary workloads (and the naive server's batches) [10000]",
    )
    p.add_argument(
        "--batch-operations",
        type=int,
        default=0,
        help="operations per round of the SubmitBatch workloads [3 x --operations]",
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds per workload; figures are medians [5]")
    p.add_argument("--concurrency", type=int, default=64, help="unary calls in flight [64]")
    p.add_argument("--batch-concurrency", type=int, default=4, help="SubmitBatch calls in flight [4]")
    p.add_argument("--seed", type=int, default=20_261_123, help="seed of the workload [20261123]")
    p.add_argument("--merchants", type=int, default=200)
    p.add_argument("--members", type=int, default=20_000)
    p.add_argument("--hot-merchants", type=int, default=3)
    p.add_argument("--hot-merchant-share", type=float, default=0.4)
    p.add_argument("--member-exponent", type=float, default=1.0, help="Zipf exponent of the member draw [1.0]")
    p.add_argument("--redeem-share", type=float, default=0.25)
    p.add_argument("--naive-pool-connections", type=int, default=16, help="the naive server's asyncpg pool [16]")
    p.add_argument(
        "--data-dir",
        default=".points-data/bench",
        help="embedded Postgres directory, without DATABASE_URL [.points-data/bench]",
    )
    p.add_argument(
        "--embedded-postgres-settings",
        default="",
        help="the embedded Postgres's settings over the sized ones, NAME=VALUE,... as the service's option "
        "(README: Postgres settings); kept in the data directory's postgresql.auto.conf [none]",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.operations < max(BATCH_SIZES) or args.rounds < 1 or 0 < args.batch_operations < max(BATCH_SIZES):
        sys.exit(f"error: --operations and --batch-operations must be >= {max(BATCH_SIZES)}, --rounds >= 1")
    args.batch_operations = args.batch_operations or 3 * args.operations
    started = time.monotonic()
    network = workload.Network(
        merchants=args.merchants,
        members=args.members,
        hot_merchants=args.hot_merchants,
        hot_merchant_share=args.hot_merchant_share,
        member_exponent=args.member_exponent,
    )
    # one list: the unary workload is the first --operations of the batch workload
    operations = workload.operations(max(args.operations, args.batch_operations), network, args.seed, args.redeem_share)
    warmup = workload.operations(
        max(args.operations, args.batch_operations) // 5, network, args.seed + 1, args.redeem_share
    )
    unary_operations, unary_warmup = operations[: args.operations], warmup[: args.operations // 5]
    batch_operations, batch_warmup = operations[: args.batch_operations], warmup[: args.batch_operations // 5]

    logs = pathlib.Path(tempfile.mkdtemp(prefix="points-bench-"))
    data_dir = pathlib.Path(args.data_dir)
    if not data_dir.is_absolute():
        data_dir = harness.ROOT / data_dir
    postgres = Postgres(os.environ.get("DATABASE_URL", ""), data_dir, args.embedded_postgres_settings)
    suffix = os.urandom(3).hex()  # two benches on one Postgres do not meet
    databases = (
        f"bench_points_{suffix}",
        f"bench_program_{suffix}",
        f"bench_naive_{suffix}",
        f"bench_progin_{suffix}",
    )
    service_url, program_url, naive_url, process_url = (asyncio.run(postgres.create(name)) for name in databases)
    print(f"Postgres: {postgres.description}; server logs in {logs}", flush=True)

    servers: dict[str, harness.Server] = {}
    try:
        print(f"seeding the service's ledger: {args.merchants} merchants, {args.members:,} members ...", flush=True)
        harness.seed(service_url, args.merchants, args.members, logs / "seed.log")
        key = asyncio.run(harness.gateway_key(service_url, workload.merchant_ids(args.merchants), "loadtest.bench"))
        print("seeding the program's ledger the same, with ops/program.example.json in force ...", flush=True)
        harness.seed(program_url, args.merchants, args.members, logs / "seed-program.log")
        asyncio.run(harness.add_program(program_url, "loadtest.bench"))
        program_key = asyncio.run(
            harness.gateway_key(program_url, workload.merchant_ids(args.merchants), "loadtest.bench")
        )
        print("seeding the same again for the program with --projector in-process ...", flush=True)
        harness.seed(process_url, args.merchants, args.members, logs / "seed-prog-in.log")
        asyncio.run(harness.add_program(process_url, "loadtest.bench"))
        process_key = asyncio.run(
            harness.gateway_key(process_url, workload.merchant_ids(args.merchants), "loadtest.bench")
        )
        servers["no-op"] = harness.Server([sys.executable, "-m", "loadtest.noop_server"], logs / "noop.log", "no-op")
        servers["service"] = harness.Server(harness.service_command(service_url), logs / "service.log", "service")
        servers["program"] = harness.Server(harness.service_command(program_url), logs / "program.log", "program")
        servers["prog/in"] = harness.Server(
            harness.service_command(process_url, "--projector", "in-process"), logs / "prog-in.log", "prog/in"
        )
        servers["naive"] = harness.Server(
            [
                sys.executable,
                "-m",
                "loadtest.naive_server",
                "--database-url",
                naive_url,
                "--pool-connections-max",
                str(args.naive_pool_connections),
                "--seed-merchants",
                str(args.merchants),
                "--seed-members",
                str(args.members),
            ],
            logs / "naive.log",
            "naive",
        )
        for name, server in servers.items():
            print(f"{name} SERVING on {server.address} (pid {server.pid})", flush=True)

        workloads = []
        for server in ("no-op", *SERVICES):
            workloads.append(Workload(server, f"unary c={args.concurrency}", "unary", unary_operations, unary_warmup))
            workloads += [
                Workload(
                    server,
                    f"SubmitBatch {size:,}/call c={args.batch_concurrency}",
                    "batch",
                    batch_operations,
                    batch_warmup,
                    size,
                )
                for size in BATCH_SIZES
            ]
        # the naive server's rate does not depend on grouping: it gets the unary workload's size
        workloads += [
            Workload("naive", f"unary c={args.concurrency}", "unary", unary_operations, unary_warmup),
            Workload(
                "naive",
                f"batches of {BATCH_SIZES[0]} as unary c={args.concurrency}",
                "batch as unary",
                unary_operations,
                unary_warmup,
                BATCH_SIZES[0],
            ),
        ]
        endpoints = {
            name: Endpoint(
                server.address,
                server.pid,
                {"service": key, "program": program_key, "prog/in": process_key}.get(name, ""),
                server.metrics_url,
            )
            for name, server in servers.items()
        }
        uvloop.run(measure(workloads, endpoints, postgres, args))
    finally:
        for server in servers.values():
            server.stop()
        for name in databases:
            try:
                asyncio.run(postgres.drop(name))
            except (OSError, asyncpg.PostgresError) as error:
                print(f"note: could not drop database {name}: {error}", file=sys.stderr)
    report(workloads, args, postgres, network, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
