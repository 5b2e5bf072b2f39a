"""Where the engine's time goes: the per-operation budget of each step, with and without the program.

    .venv/bin/python -m loadtest.budget [--rounds 3] [--batches 20] [--no-profile] [--floors-only]

Starts an embedded Postgres (or uses DATABASE_URL's server, on a fresh database it drops at the end),
seeds a network (--merchants 200, --members 20,000), starts the service (`python -m processor serve`,
its defaults) as a process of its own, and sends SubmitBatch calls of 1,000 mixed operations (70% earn,
30% redeem, Zipf members, a few hot merchants; --concurrency 4 calls in flight) from this process.
First with no program version (the plain ledger), then with ops/program.example.json in force.

Each round of each phase is two passes over fresh operations:
  * a measured pass, nothing attached: operations/s, CPU seconds of the service, of Postgres (the
    postmaster and its children) and of this client from /proc, and the deltas of the service's own
    histograms in /metrics (points_pipeline_commit_step_seconds per step, commit, queue wait, batch size);
  * a profiled pass: py-spy samples the service (`py-spy record --format raw`, --native so the C of
    grpc, protobuf (upb) and the fastpath kernel shows), and each sample is put in one step by the
    innermost frame that names one (STEPS below). A step's µs/op is its share of the samples times the
    measured pass's service CPU per operation. py-spy itself takes CPU while it samples: its pass is
    used for shares only, never for rates.

Then the floors the design is planned from (--floors-only runs only these):
  * decode: SubmitBatchRequest.FromString of 1,000 operations, every field pulled into arrays (ids
    interned through a dict), 1,000 results built and serialized, in this process: µs per operation;
  * append: one row of 64 KB (64 bytes for each of 1,000 operations) per transaction into a table with
    a bigint primary key, one connection, synchronous_commit on: batches/s.

Prints medians of the rounds and the spread (min..max) beside them. A measurement, not a test: it
asserts nothing about time. On a 2-core machine the client shares the cores with the service and
Postgres; its CPU column says how much.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import asyncpg
import uvloop

from loadtest import harness, workload
from loadtest.bench import Client, Postgres, batch_requests
from points.v1 import points_pb2 as pb

ROOT = harness.ROOT
BATCH_SIZE = 1_000

# A sample belongs to the first step (in this order) one of whose patterns matches a frame, frames
# read from the innermost outwards. A pattern is matched against "function (file:line)" as py-spy
# writes it (native frames: "symbol (library)").
STEPS: list[tuple[str, tuple[str, ...]]] = [
    # a pass of the cyclic collector runs inside whatever allocated when it was due (with --native only:
    # it is C); before this step its samples went to that frame's step: most to the apply loop (the
    # first allocation after the state machine's apply re-enables the collector), the rest to SubmitBatch
    (
        "cyclic garbage collector (gc passes)",
        ("gc_collect_main (", "gc_collect_with_callback (", "gc_collect_generations ("),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("JSON idempotency records", ("to_json (", "json/encoder.py", "json/__init__.py", "json/decoder.py")),
    (
        "idempotency look-up (in-memory table; stored_outcomes of its hits)",
        # its compiled table's frames (native: "__pyx_..._17idempotency_table_...") before the fastpath kernel's
        ("stored_outcomes (", "processor/idempotency.py", "idempotency_table", "_load_idempotency ("),
    ),
    ("prefetch (holds, earn records)", ("_prefetch (",)),
    (
        "asyncpg: encode + COPY/execute (write_batch)",
        ("write_batch (", "_as_writer (", "_write (", "_check_writer_lock ("),
    ),
    ("balance checkpoint", ("_write_checkpoint (", "_committed (", "_maybe_checkpoint (")),
    # The projector in the service's process (--projector in-process): its rows, their asyncpg encoding
    # and COPY. It runs as tasks of its own (Store.bounded runs each transaction in one), whose stacks
    # name no pipeline frame: before these steps they fell to "pipeline queueing" by uvloop's
    # Handle__run.
    (
        "projection (in-process): rows + asyncpg encoding",
        (
            "Store.project_batches",  # and its <locals>.write: the mark's read and update
            "Store._write_many (",
            "Store._write_updates (",
            "Store._write_rules",
            "project_log (",
            "Projector._project (",
            "Projector._run (",
        ),
    ),
    # the answer path's durable write: the BatchWrite pickled, then one row appended with the fence
    ("batch-log payload encoding (batch_log.encode)", ("encode (processor/batch_log.py", "_Pickler.")),
    ("batch-log append (fence + one row)", ("append (processor/batch_log.py", "Pipeline._append.<locals>")),
    # the compiled modules by name: fastpath.intake (SubmitBatch's intake and answer) is not the kernel; its
    # frames fall to the servicer's steps below (its callers: SubmitBatch, _batch_response)
    (
        "fastpath kernel (C)",
        (
            "fastpath/_core",
            "_core.cpython",
            "__pyx_pw_8fastpath_5_core",
            "__pyx_f_8fastpath_5_core",
            "__pyx_pw_8fastpath_7records",
            "__pyx_f_8fastpath_7records",
            "__pyx_pw_8fastpath_11copy_binary",
            "__pyx_f_8fastpath_11copy_binary",
        ),
    ),
    ("program rules in Python (rules.py, program.py)", ("processor/rules.py", "processor/program.py")),
    # before "pipeline queueing" and the apply loop: rules_kernel.py's own frames are its step
    ("rules kernel's columns and rows (rules_kernel.py)", ("processor/rules_kernel.py",)),
    (
        "BatchWrite rows (entries, transactions, records)",
        (
            "_applied (",
            "_earn_entries (",
            "_post (",
            "_credit (",
            "_check_balanced (",
            "_earned (",
            "_fee (",
            "_move_member (",
        ),
    ),
    (
        "apply loop in Python (pipeline._apply_*)",
        ("_apply_batch (", "_apply_with_rules (", "_apply_capped (", "_kernel_one (", "_prepare (", "_expire_lots ("),
    ),
    (
        "response building (results, SubmitBatchResponse)",
        ("_to_result (", "_response (", "_operation_outcome (", "timestamp (", "@respond"),
    ),
    (
        "pipeline queueing / futures / answers",
        (
            "enqueue (",
            "_enqueue (",
            "enqueue_many (",
            "_admit (",
            "decided (",
            "_resolve (",
            "all_done (",
            "one_done (",
            "_signal_finished (",
            "_finish (",
            # not "_run (": uvloop's Handle__run is in every task's stack
            "processor/pipeline.py",
        ),
    ),
    (
        "servicer validation + Operation objects",
        (
            "processor/servicer.py",
            "processor/domain.py",
            "processor/kinds.py",
            "processor/quotas.py",
            "processor/velocity.py",
            "processor/presence.py",
        ),
    ),
    ("RPC interceptor + auth", ("processor/rpc.py", "processor/auth.py", "processor/audit.py")),
    ("protobuf decode/encode (upb)", ("upb_", "_upb", "PyUpb", "message.so", "_message.", "google/protobuf")),
    (
        "grpc core + event loop (C: cygrpc, uvloop, asyncio)",
        ("cygrpc", "grpc_", "grpc/", "uvloop", "asyncio/", "libgrpc", "epoll"),
    ),
    ("asyncpg protocol (reads, pool)", ("asyncpg",)),  # replies parsed from the event loop, pool
]
OTHER = "other (interpreter, GC, libc, unattributed)"


# --- profile ----------------------------------------------------------------------------------------


class Profile:
    """py-spy recording one process, raw (collapsed) stacks, until stop()."""

    def __init__(self, pid: int, directory: pathlib.Path, name: str, native: bool, rate: int):
        self.path = directory / f"{name}.txt"
        command = [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            str(self.path),
        ]
        if native:
            command.append("--native")
        self._log = open(directory / f"{name}.log", "wb")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return classify(self.path) if self.path.exists() else {}


def _py_spy() -> str:
    beside = pathlib.Path(sys.executable).parent / "py-spy"  # the venv's, from the `load` extra
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -e '.[load]' (or run with --no-profile)")
    return found


_RESPOND_LINE: int | None = None
_RESPOND_MARK = "self.pipeline.enqueue_many("  # SubmitBatch awaits its call's one future on this line


def _respond_line() -> int:
    """The line of SubmitBatch from which it builds the response (after its futures are all done)."""
    global _RESPOND_LINE
    if _RESPOND_LINE is None:
        lines = (ROOT / "processor" / "servicer.py").read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if "async def SubmitBatch(" in line)
        _RESPOND_LINE = next(i for i in range(start, len(lines)) if _RESPOND_MARK in lines[i]) + 1
    return _RESPOND_LINE


_FRAME_LINE = re.compile(r"SubmitBatch \(.*servicer\.py:(\d+)\)")


def classify(path: pathlib.Path) -> dict[str, int]:
    """Samples per step from py-spy's raw output ("frame;frame;...;innermost count" per line)."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if _idle(frames):
            continue
        counts[_step_of(frames)] += int(count)
    return dict(counts)


# A thread blocked in one of these is waiting, not working (py-spy's --native samples keep some idle
# threads: grpc's pollers, the default executor's workers).
_WAITS = (
    "epoll_wait",
    "epoll_pwait",
    "poll (libc",
    "select_poll_poll_impl",
    "PyThread_acquire_lock_timed",
    "pthread_cond_timedwait",
    "pthread_cond_wait",
    "sem_wait",
    "sem_timedwait",
    "futex",
    "nanosleep",
    "clock_nanosleep",
    "accept (libc",
    "select (libc",
)


def _idle(frames: list[str]) -> bool:
    return any(wait in frame for frame in frames[-4:] for wait in _WAITS)


# A step named by a library whose cost belongs to what called it: a sample is put in it only when no
# frame of the stack names another step (asyncpg encoding a COPY under Store._write is the batch's
# write; asyncpg parsing a reply from the event loop is not). upb and grpc stay innermost-first: a
# decode is a decode wherever it is called from (the RPC interceptor decodes after authenticating).
GENERIC = ("asyncpg protocol (reads, pool)",)


def _step_of(frames: list[str]) -> str:
    for generic in (False, True):
        for frame in reversed(frames):
            match = _FRAME_LINE.search(frame)
            if match:  # SubmitBatch's own lines: building operations before the await, the response after
                if int(match.group(1)) >= _respond_line():
                    return "response building (results, SubmitBatchResponse)"
                return "servicer validation + Operation objects"
            for step, patterns in STEPS:
                if (step in GENERIC) == generic and any(p in frame for p in patterns):
                    return step
    return OTHER


# --- the service's /metrics -------------------------------------------------------------------------

_SAMPLE = re.compile(r'^(points_pipeline_\w+?)(?:\{step="(\w+)"\})? ([0-9.e+-]+)$')


def scrape(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            match = _SAMPLE.match(line)
            if match and (match.group(1).endswith("_sum") or match.group(1).endswith("_count")):
                name = match.group(1) + (f"[{match.group(2)}]" if match.group(2) else "")
                values[name] = float(match.group(3))
    return values


# --- rounds -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pass:
    operations: int
    seconds: float
    service_cpu: float
    postgres_cpu: float
    client_cpu: float
    machine_cpu: float  # every process on the machine (other users' work included)
    metrics: dict[str, float]
    not_applied: int


class Bench:
    def __init__(self, args, postgres: Postgres, url: str, key: str, service: harness.Server):
        self.args = args
        self.postgres = postgres
        self.url = url
        self.client = Client(service.address, key)
        self.service = service
        self.network = workload.Network(merchants=args.merchants, members=args.members)
        self.used = 0  # operations drawn so far (each pass gets fresh ones and fresh keys)
        self.program = False  # the program phase (its passes have --program-batches calls)
        self.earns: collections.Counter = collections.Counter()  # earns per member since the phase began

    def requests(self, batches: int, label: str) -> list[pb.SubmitBatchRequest]:
        batches = self.args.program_batches if self.program else batches
        operations = workload.operations(
            batches * BATCH_SIZE, self.network, self.args.seed + self.used, redeem_share=self.args.redeem_share
        )
        self.used += 1
        self.earns.update(op.member_id for op in operations if op.kind == "earn")
        self.last_requests = batch_requests(operations, f"budget-{os.getpid()}-{label}-{self.used}-", BATCH_SIZE)
        return self.last_requests

    async def one_pass(self, label: str, profile: Profile | None = None) -> tuple[Pass, dict[str, int]]:
        requests = self.requests(self.args.batches, label)
        before = scrape(self.service.metrics_url)
        cpu_before = harness.CpuReading.now(self.service.pid, self.postgres.postmaster_pid)
        began = time.perf_counter()
        _, failures = await self.client.batches(requests, self.args.concurrency)
        seconds = time.perf_counter() - began
        cpu = harness.CpuSplit.between(
            cpu_before, harness.CpuReading.now(self.service.pid, self.postgres.postmaster_pid)
        )
        after = scrape(self.service.metrics_url)
        samples = profile.stop() if profile is not None else {}
        delta = {name: after[name] - before.get(name, 0.0) for name in after}
        refused = sum(
            n for reason, n in failures.items() if "FAILED_PRECONDITION" not in reason and "INSUFFICIENT" not in reason
        )
        machine = cpu.server + (cpu.postgres or 0.0) + cpu.client + cpu.other
        return (
            Pass(
                len(requests) * BATCH_SIZE,
                seconds,
                cpu.server,
                cpu.postgres or 0.0,
                cpu.client,
                machine,
                delta,
                refused,
            ),
            samples,
        )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return ""
    return f"{min(values) * scale:,.{digits}f}..{max(values) * scale:,.{digits}f}"


def report(phase: str, passes: list[Pass], profiles: list[dict[str, int]]) -> dict:
    """Prints one phase's table; returns its figures (for the side-by-side summary)."""
    per_op = lambda p, seconds: seconds / p.operations * 1e6  # noqa: E731
    rates = [p.operations / p.seconds for p in passes]
    service = [per_op(p, p.service_cpu) for p in passes]
    postgres = [per_op(p, p.postgres_cpu) for p in passes]
    client = [per_op(p, p.client_cpu) for p in passes]
    print(
        f"\n== {phase}: {len(passes)} rounds of {passes[0].operations:,} operations "
        f"(SubmitBatch of {BATCH_SIZE:,}, {int(100 * (1 - args_global.redeem_share))}% earn) =="
    )
    print(f"operations/s (acknowledged)        {_median(rates):>10,.0f}   [{_spread(rates, digits=0)}]")
    print(f"CPU µs/op  service                 {_median(service):>10.1f}   [{_spread(service)}]")
    print(f"CPU µs/op  Postgres (all backends) {_median(postgres):>10.1f}   [{_spread(postgres)}]")
    print(f"CPU µs/op  client (this process)   {_median(client):>10.1f}   [{_spread(client)}]")
    busy = [
        (
            p.service_cpu / p.seconds,
            p.postgres_cpu / p.seconds,
            p.client_cpu / p.seconds,
            (p.machine_cpu - p.service_cpu - p.postgres_cpu - p.client_cpu) / p.seconds,
        )
        for p in passes
    ]
    print(
        "cores busy (of {}): service {:.2f}, Postgres {:.2f}, client {:.2f}, anything else on the machine {:.2f}".format(
            os.cpu_count(), *(statistics.median(b[i] for b in busy) for i in range(4))
        )
    )
    figures_busy = [statistics.median(b[i] for b in busy) for i in range(4)]
    not_applied = sum(p.not_applied for p in passes)
    if not_applied:
        print(f"!! {not_applied} operations were answered neither APPLIED nor a business refusal")

    figures: dict = {
        "ops_per_second": _median(rates),
        "service": _median(service),
        "postgres": _median(postgres),
        "client": _median(client),
        "steps": {},
        "commit": {},
        "busy": figures_busy,
    }
    # the batch's transaction, from the service's own histograms (wall time, per batch and per op)
    steps = sorted(
        {
            name[len("points_pipeline_commit_step_seconds_sum[") : -1]
            for p in passes
            for name in p.metrics
            if name.startswith("points_pipeline_commit_step_seconds_sum[")
        }
    )
    print("\nPostgres transaction of a batch (points_pipeline_commit_step_seconds; wall time, median of rounds):")
    print(f"  {'step':<18}{'ms/batch':>10}{'µs/op':>9}")
    for step in steps:
        per_batch, per_operation = [], []
        for p in passes:
            total = p.metrics.get(f"points_pipeline_commit_step_seconds_sum[{step}]", 0.0)
            count = p.metrics.get(f"points_pipeline_commit_step_seconds_count[{step}]", 0.0)
            if count:
                per_batch.append(total / count * 1e3)
                per_operation.append(total / p.operations * 1e6)
        if per_batch:
            figures["commit"][step] = _median(per_operation)
            print(f"  {step:<18}{_median(per_batch):>10.2f}{_median(per_operation):>9.1f}")
    for name, label in (
        ("points_pipeline_commit_seconds", "whole write (commit_seconds)"),
        ("points_pipeline_queue_wait_seconds", "queue wait per operation"),
        ("points_pipeline_batch_operations", "operations per batch"),
    ):
        means = [
            p.metrics[f"{name}_sum"] / p.metrics[f"{name}_count"] for p in passes if p.metrics.get(f"{name}_count")
        ]
        if means:
            scale, unit = (1.0, "") if name.endswith("operations") else (1e3, " ms")
            print(f"  {label:<34}{_median(means) * scale:>10.1f}{unit}")

    if profiles:
        print(
            f"\nService CPU by step (py-spy, {sum(sum(p.values()) for p in profiles):,} samples over "
            f"{len(profiles)} profiled passes; µs/op = share × measured service CPU/op):"
        )
        print(f"  {'step':<56}{'share':>7}{'µs/op':>8}  [spread of rounds]")
        names = [s for s, _ in STEPS] + [OTHER]
        service_median = _median(service)
        for step in names:
            shares = [p.get(step, 0) / max(1, sum(p.values())) for p in profiles]
            share = _median(shares)
            if max(shares) == 0:
                continue
            figures["steps"][step] = (share, share * service_median)
            print(
                f"  {step:<56}{share:>6.1%}{share * service_median:>8.1f}  "
                f"[{_spread([s * service_median for s in shares])}]"
            )
    return figures


async def measure(args, postgres: Postgres, work: pathlib.Path) -> None:
    database = f"budget_points_{os.getpid()}"
    url = await postgres.create(database)
    print(postgres.description)
    service = None
    try:
        print(f"seeding {args.merchants:,} merchants and {args.members:,} members ...", flush=True)
        await harness.seeded_network(url)  # applies the migrations
        harness.seed(url, args.merchants, args.members, work / "seed.log")
        key = await harness.gateway_key(url, workload.merchant_ids(args.merchants), "loadtest.budget")
        # --projector in-process: the projector's steps are sampled in the one profiled process (the
        # default runs it as a child py-spy would not see)
        service = harness.Server(
            harness.service_command(url, "--projector", "in-process"), work / "service.log", "service"
        )
        bench = Bench(args, postgres, url, key, service)
        results = {}
        for phase in ("no program (plain ledger)", "program in force (ops/program.example.json)"):
            if phase.startswith("program"):
                await harness.add_program(url, "loadtest.budget")
                bench.program = True
                await asyncio.sleep(2.5)  # a version applies PROGRAM_LEAD_SECONDS after it is stored
            await bench.one_pass("warm", None)
            passes, profiles = [], []
            for number in range(args.rounds):
                measured, _ = await bench.one_pass("m")
                passes.append(measured)
                print(
                    f"  {phase} round {number + 1}: {measured.operations / measured.seconds:,.0f} ops/s, service "
                    f"{measured.service_cpu / measured.operations * 1e6:.0f} µs of CPU/op",
                    flush=True,
                )
                if not args.no_profile:
                    profile = Profile(
                        service.pid,
                        work,
                        f"{'program' if phase.startswith('program') else 'plain'}-{number + 1}",
                        native=not args.python_only,
                        rate=args.rate,
                    )
                    _, samples = await bench.one_pass("p", profile)
                    profiles.append(samples)
            results[phase] = report(phase, passes, profiles)
            if phase.startswith("program"):
                top = bench.earns.most_common(1)[0][1] if bench.earns else 0
                print(
                    f"earns under the program by its busiest member (each adds an expiry lot): {top:,}; "
                    f"members with ≥ 100 such earns: {sum(1 for n in bench.earns.values() if n >= 100):,}"
                )
            bench.earns.clear()
        summary(results)
        await bench.client.close()
        await idempotency_lookup(url, postgres, bench.last_requests[0], args.rounds)
    finally:
        if service is not None:
            service.stop()
        await postgres.drop(database)


async def idempotency_lookup(url: str, postgres: Postgres, request: pb.SubmitBatchRequest, repeats: int) -> None:
    """The committer's per-batch read of idempotency records (Store.stored_outcomes), timed on its own
    while the service is idle: 1,000 keys that are all stored (a retried batch) and 1,000 that are not
    (every new batch)."""
    from processor.store import Store

    stored = [
        (getattr(o, o.WhichOneof("operation")).merchant_id, getattr(o, o.WhichOneof("operation")).idempotency_key)
        for o in request.operations
    ]
    new = [(merchant, key + "-never-sent") for merchant, key in stored]
    from processor.idempotency import IdempotencyTable

    store = await Store.open(url, 2)
    try:
        # the candidates' batch rows (migration 0023): as the committer asks, the in-memory table first
        table = IdempotencyTable()
        estimate, chunks = await store.idempotency_keys()
        table.reset(estimate)
        async for batches in chunks:
            for batch_id, batch_keys in batches:
                table.add(batch_id, batch_keys)
        print("\n== idempotency look-up of a batch (Store.stored_outcomes, 1,000 keys, service idle) ==")
        for label, keys in (("all new (every first try)", new), ("all stored (a retried batch)", stored)):
            walls, calls, cpu_before = [], repeats * 10, postgres.cpu_seconds()
            candidates = table.maybe_stored(keys)
            for _ in range(calls):
                began = time.perf_counter()
                found = await store.stored_outcomes(candidates)
                walls.append((time.perf_counter() - began) * 1e3)
            cpu = _cpu_since(postgres, cpu_before) / calls * 1e3  # /proc counts 10 ms ticks: a mean, not a median
            print(
                f"  {label:<30} {len(found):>5} found: {_median(walls):.2f} ms a batch wall "
                f"[{_spread(walls, digits=2)}], Postgres CPU {cpu:.1f} ms a batch (mean of {calls})"
            )
        await idempotency_table(store, stored, new, repeats)
    finally:
        await store.close()


async def idempotency_table(
    store, stored: list[tuple[str, str]], new: list[tuple[str, str]], repeats: int, keys_max: int = 1_000_000
) -> None:
    """What replaced most of those reads (processor/idempotency.py): the in-memory table's look-up of
    the same 1,000 keys, and its rebuild at start-up from `keys_max` stored records (rows added by
    generate_series to the bench's database) with its memory."""
    from processor.idempotency import IdempotencyTable

    estimate, chunks = await store.idempotency_keys()
    table = IdempotencyTable()
    table.reset(estimate)
    async for batches in chunks:
        for batch_id, keys in batches:
            table.add(batch_id, keys)
    print("\n== idempotency look-up in memory (IdempotencyTable.maybe_stored, same 1,000 keys) ==")
    for label, keys in (("all new (every first try)", new), ("all stored (a retried batch)", stored)):
        walls = []
        for _ in range(repeats * 10):
            began = time.perf_counter()
            maybe = table.maybe_stored(keys)
            walls.append((time.perf_counter() - began) * 1e3)
        print(
            f"  {label:<30} {len(maybe):>5} to read: {_median(walls):.3f} ms a batch [{_spread(walls, digits=3)}]"
            f" (then {'no read' if not maybe else 'stored_outcomes of those'})"
        )
    missing = keys_max - table.count
    if missing > 0:
        # rows of 1,000 records, as batches write them (migration 0023), under negative batch ids
        await store.pool.execute(
            """INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
               SELECT -1000000 - g, now(), count(*),
                      convert_to(json_build_array(json_agg('rebuild-' || (i % 200)), json_agg('order-' || i))::text,
                                 'UTF8'),
                      convert_to(json_build_array(json_agg('Earn'::text), json_agg('{}'::json), json_agg('OK'::text),
                                                  json_agg(NULL::json), json_agg(''::text))::text, 'UTF8')
               FROM (SELECT i, i / 1000 AS g FROM generate_series(1, $1) AS i) s GROUP BY g""",
            missing,
            timeout=600,
        )
        await store.pool.execute("ANALYZE idempotency_batches", timeout=600)
    began = time.perf_counter()
    estimate, chunks = await store.idempotency_keys()
    table.reset(estimate)
    async for batches in chunks:
        for batch_id, keys in batches:
            table.add(batch_id, keys)
    seconds = time.perf_counter() - began
    print(
        f"  rebuild from Postgres: {table.count:,} keys in {seconds:.2f} s, {table.memory_bytes / 2**20:.0f} MiB "
        f"({table.memory_bytes / table.count:.1f} bytes a key, {table.slots:,} slots)"
    )


def summary(results: dict) -> None:
    (plain_name, plain), (program_name, program) = results.items()
    print("\n== side by side: µs of service CPU per operation (median) ==")
    print(f"  {'step':<56}{'program':>9}{'plain':>8}{'share':>7}")
    for step in [s for s, _ in STEPS] + [OTHER]:
        with_program = program["steps"].get(step, (0.0, 0.0))
        without = plain["steps"].get(step, (0.0, 0.0))
        if with_program[1] or without[1]:
            print(f"  {step:<56}{with_program[1]:>9.1f}{without[1]:>8.1f}{with_program[0]:>6.0%}")
    for label, key in (
        ("service CPU total", "service"),
        ("Postgres CPU total", "postgres"),
        ("client CPU total", "client"),
    ):
        print(f"  {label:<56}{program[key]:>9.1f}{plain[key]:>8.1f}")
    print(f"  {'operations/s':<56}{program['ops_per_second']:>9,.0f}{plain['ops_per_second']:>8,.0f}")
    print(
        f"  the program costs {plain['ops_per_second'] / program['ops_per_second']:.2f}x in throughput, "
        f"{program['service'] / plain['service']:.2f}x in service CPU per operation"
    )


# --- floors -----------------------------------------------------------------------------------------


def decode_floor(repeats: int) -> list[float]:
    """µs per operation to decode a SubmitBatch of 1,000, pull its fields into arrays, and build and
    serialize 1,000 results; `repeats` timings (each the best of 5 runs of 20 batches)."""
    import array

    network = workload.Network()
    operations = workload.operations(BATCH_SIZE, network, 7, redeem_share=0.3)
    wire = batch_requests(operations, "floor-key-", BATCH_SIZE)[0].SerializeToString()
    applied = pb.OPERATION_OUTCOME_APPLIED

    def once() -> bytes:
        request = pb.SubmitBatchRequest.FromString(wire)
        interned: dict[str, int] = {}
        kinds, merchants, members = array.array("b"), array.array("i"), array.array("i")
        amounts, keys = array.array("q"), []
        for operation in request.operations:
            if operation.HasField("earn"):
                o, kind, amount = operation.earn, 0, operation.earn.purchase_amount
            else:
                o, kind, amount = operation.redeem, 1, operation.redeem.points
            kinds.append(kind)
            merchants.append(interned.setdefault(o.merchant_id, len(interned)))
            members.append(interned.setdefault(o.member_id, len(interned)))
            amounts.append(amount)
            keys.append(o.idempotency_key)
        response = pb.SubmitBatchResponse()
        results = response.results
        for i in range(len(kinds)):
            result = results.add(outcome=applied)
            if kinds[i] == 0:
                result.earn.transaction_id = str(i)
                result.earn.points = amounts[i] // 10
                result.earn.balance = amounts[i]
                result.earn.give_back_bps = 1_000
            else:
                result.redeem.transaction_id = str(i)
                result.redeem.points = amounts[i]
                result.redeem.balance = amounts[i]
                result.redeem.available = amounts[i]
        return response.SerializeToString()

    timings = []
    for _ in range(repeats):
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(20):
                once()
            best = min(best, time.perf_counter() - began)
        timings.append(best / (20 * BATCH_SIZE) * 1e6)
    return timings


async def append_floor(postgres: Postgres, seconds: float, repeats: int):
    """Batches/s and Postgres CPU µs per batch of a one-row-per-batch synchronous append (64 KB bytea,
    bigint key), one connection; then rows/s and Postgres CPU µs per row of a projection: COPY of 1,000
    narrow rows a transaction (members drawn from 1M slots) into a table that starts empty."""
    database = f"budget_append_{os.getpid()}"
    url = await postgres.create(database)
    rates, cpu, projection_rates, projection_cpu, members = [], [], [], [], 1_000_000
    try:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("CREATE TABLE batch_log (batch_id bigint PRIMARY KEY, body bytea NOT NULL)")
            await connection.execute("ALTER TABLE batch_log ALTER COLUMN body SET STORAGE EXTERNAL")
            print(
                f"append floor: synchronous_commit {await connection.fetchval('SHOW synchronous_commit')}, "
                f"fsync {await connection.fetchval('SHOW fsync')}, "
                f"wal_sync_method {await connection.fetchval('SHOW wal_sync_method')}"
            )
            body = os.urandom(64 * BATCH_SIZE)
            insert = await connection.prepare("INSERT INTO batch_log VALUES ($1, $2)")
            batch_id = 0
            for _ in range(repeats):
                count, began, cpu_before = 0, time.perf_counter(), postgres.cpu_seconds()
                while time.perf_counter() - began < seconds:
                    batch_id += 1
                    await insert.fetch(batch_id, body)  # one implicit transaction, committed synchronously
                    count += 1
                rates.append(count / (time.perf_counter() - began))
                cpu.append(_cpu_since(postgres, cpu_before) / count * 1e6)
            # the projection: COPY of 1,000 narrow rows a transaction, a primary key and a (member, id) index
            await connection.execute("""CREATE TABLE projected (transaction_id bigint PRIMARY KEY, kind smallint,
                                          member_slot int, merchant_slot int, amount bigint, key_fingerprint bigint)""")
            await connection.execute("CREATE INDEX ON projected (member_slot, transaction_id)")
            import random

            rng = random.Random(14)
            next_id = 0
            for _ in range(repeats):
                count, began, cpu_before = 0, time.perf_counter(), postgres.cpu_seconds()
                while time.perf_counter() - began < seconds:
                    rows = [
                        (next_id + i, i % 2, rng.randrange(members), rng.randrange(200), 1_000 + i, rng.getrandbits(63))
                        for i in range(BATCH_SIZE)
                    ]
                    next_id += BATCH_SIZE
                    async with connection.transaction():
                        await connection.copy_records_to_table("projected", records=rows)
                    count += BATCH_SIZE
                projection_rates.append(count / (time.perf_counter() - began))
                projection_cpu.append(_cpu_since(postgres, cpu_before) / count * 1e6)
        finally:
            await connection.close()
    finally:
        await postgres.drop(database)
    return rates, cpu, projection_rates, projection_cpu


def _cpu_since(postgres: Postgres, before: dict[int, float]) -> float:
    return harness.cpu_seconds_since(before, postgres.cpu_seconds())


def lots_cost(lot_counts: tuple[int, ...] = (1, 10, 100, 1_000, 10_000)) -> dict[int, float]:
    """µs of one rules.consume() (what a redeem under the program calls for the member) against how many
    expiry lots the member holds: each earn under the program adds a lot."""
    from processor import rules

    now_us = 1_700_000_000_000_000
    result = {}
    for count in lot_counts:
        lots = [rules.Lot(i + 1, 1_000, now_us + 10**12 + i, "m") for i in range(count)]
        calls = max(3, 20_000 // count)
        began = time.perf_counter()
        for _ in range(calls):
            rules.consume(lots, 500, now_us)
        result[count] = (time.perf_counter() - began) / calls * 1e6
    return result


async def floors(args, postgres: Postgres) -> None:
    cost = lots_cost()
    print("\n== program lots: rules.consume() for one member, by the lots it holds (this process) ==")
    print("  " + ", ".join(f"{count:,} lots: {micros:,.1f} µs" for count, micros in cost.items()))
    decode = decode_floor(args.rounds)
    print(
        f"\n== floors ==\ndecode SubmitBatch of 1,000 + fields into arrays + 1,000 results serialized: "
        f"{_median(decode):.2f} µs/op [{_spread(decode, digits=2)}] (this process, one core)"
    )
    rates, cpu, projection_rates, projection_cpu = await append_floor(postgres, args.append_seconds, args.rounds)
    print(
        f"one 64 KB row per batch, synchronous commit, one connection: {_median(rates):,.0f} batches/s "
        f"[{_spread(rates, digits=0)}] = {_median(rates) * BATCH_SIZE:,.0f} operations/s at 1,000 a batch; "
        f"Postgres CPU {_median(cpu):,.0f} µs a batch [{_spread(cpu, digits=0)}]"
    )
    print(
        f"projection, COPY of 1,000 narrow rows a transaction (pk + (member, id) index, table starting "
        f"empty): {_median(projection_rates):,.0f} rows/s [{_spread(projection_rates, digits=0)}]; Postgres CPU "
        f"{_median(projection_cpu):.1f} µs a row [{_spread(projection_cpu)}]"
    )


args_global: argparse.Namespace


def main() -> None:
    global args_global
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=20, help="SubmitBatch calls of 1,000 per pass")
    parser.add_argument(
        "--program-batches",
        type=int,
        default=5,
        help="SubmitBatch calls of 1,000 per pass with the program in force (its cost grows "
        "with the expiry lots each earn adds, so its passes are kept short)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="SubmitBatch calls in flight")
    parser.add_argument("--redeem-share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy passes (no per-step split)")
    parser.add_argument("--python-only", action="store_true", help="py-spy without --native")
    parser.add_argument("--floors-only", action="store_true")
    parser.add_argument("--no-floors", action="store_true")
    parser.add_argument("--append-seconds", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the profiles and logs (their directory is printed)")
    args = args_global = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="points-budget-"))
    postgres = Postgres(os.environ.get("DATABASE_URL", ""), ROOT / ".points-data" / "bench")
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"- {os.cpu_count()} cores - logs in {work}")

    async def run() -> None:
        if not args.floors_only:
            await measure(args, postgres, work)
        if not args.no_floors:
            await floors(args, postgres)

    try:
        uvloop.run(run())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
