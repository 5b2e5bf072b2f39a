"""Sustained load on one service: where its event loop spends the time, not just how fast it is.

    python -m loadtest.sustain [--seconds 20] [--plain] [--projector in-process] [--profile]

`loadtest.bench` times short rounds (15,000 operations a SubmitBatch round), side by side with the
floors; this runs ONE service (the program's, ops/program.example.json in force, or `--plain`) under
SubmitBatch calls of --batch-size for --seconds without a pause, the way issue 14's target 1 is stated
("sustained"), and prints what a round of the bench cannot show:

  * operations/s acknowledged over the run, and until the last one is visible to ListTransactions;
  * CPU per operation of each process (server, projector child, Postgres, this client) and of the
    server's MAIN THREAD apart (the event loop: the committer, the servicer, the state machine): the
    share of the run it was busy is how close the loop is to its ceiling. A loop at 100% means the
    server's CPU per operation is the limit; below it, the loop waits (for an append, for requests) and
    the limit is a stall of the pipeline, not its CPU;
  * with --profile, py-spy samples the main thread with --idle and prints where it was, idle or not,
    by top frame: the stall named.

The requests are built before the clock starts (--operations of them, cycled with a fresh idempotency
key prefix each cycle); every call carries fresh keys, so nothing is a retry. Postgres: DATABASE_URL's
server if set (a database created and dropped), else the embedded one under --data-dir. A benchmark:
it prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import uvloop

from loadtest import bench, harness, workload
from processor.projector_process import CLOCK_TICKS_PER_SECOND

PROJECTOR_CPU = "points_projector_cpu_seconds_total"


def collector_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """generation -> (passes, seconds) of the service's cyclic collector so far (points_gc_pause_seconds)."""
    found: dict[str, list[float]] = {}
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            for suffix, index in (("_count", 0), ("_sum", 1)):
                prefix = f'points_gc_pause_seconds{suffix}{{generation="'
                if line.startswith(prefix):
                    generation = line[len(prefix)]
                    found.setdefault(generation, [0.0, 0.0])[index] = float(line.rpartition(" ")[2])
    return {generation: (values[0], values[1]) for generation, values in found.items()}


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU seconds of one thread of a process (/proc/<pid>/task/<tid>/stat: utime + stime)."""
    with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def top_frames(raw: pathlib.Path, tid: int) -> tuple[collections.Counter, int]:
    """py-spy's raw output (one line a distinct stack: 'thread (tid);frame;frame... count') of one
    thread: samples by its innermost Python frame, and the total."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or f"{tid:#x}" not in frames[0] and str(tid) not in frames[0]:
            continue
        python = [frame for frame in frames[1:] if ".py:" in frame]
        counts[python[-1] if python else frames[-1]] += int(count)
        total += int(count)
    return counts, total


async def drive(client: bench.Client, requests: list, seconds: float, concurrency: int) -> tuple[int, float, int]:
    """Sends the requests round-robin with `concurrency` calls in flight until `seconds` have passed;
    returns (operations acknowledged, seconds, operations not applied)."""
    operations = not_applied = 0
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    index = 0
    applied = bench.pb.OPERATION_OUTCOME_APPLIED
    client.last_applied = []

    async def worker() -> None:
        nonlocal operations, not_applied, index
        while time.perf_counter() < deadline:
            request = requests[index % len(requests)]
            index += 1
            response = await client.stub.SubmitBatch(
                request, metadata=client.metadata, timeout=bench.CALL_TIMEOUT_SECONDS
            )
            operations += len(response.results)
            last = None
            for operation, result in zip(request.operations, response.results):
                if result.outcome != applied:
                    not_applied += 1
                else:
                    last = (operation, result)
            if last is not None and (applied_transaction := bench._applied_transaction(*last)):
                client.last_applied.append(applied_transaction)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return operations, time.perf_counter() - began, not_applied


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="how long the load lasts")
    p.add_argument("--operations", type=int, default=200_000, help="operations built beforehand, cycled")
    p.add_argument(
        "--cycles",
        type=int,
        default=3,
        help="copies of the operations, each with its own idempotency keys; the load cycles through them "
        "(a redeem sent again may find its member's points spent: build enough that the run does not wrap)",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4, help="SubmitBatch calls in flight")
    p.add_argument("--merchants", type=int, default=200)
    p.add_argument("--members", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=20261206)
    p.add_argument("--plain", action="store_true", help="no program in force")
    p.add_argument("--projector", choices=("process", "in-process"), default="process")
    p.add_argument("--profile", action="store_true", help="py-spy --idle on the server's main thread")
    p.add_argument("--data-dir", default=".points-data/sustain")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    network = workload.Network(merchants=args.merchants, members=args.members)
    operations = workload.operations(args.operations, network, args.seed, 0.25)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="points-sustain-"))
    data_dir = pathlib.Path(args.data_dir)
    if not data_dir.is_absolute():
        data_dir = harness.ROOT / data_dir
    postgres = bench.Postgres(os.environ.get("DATABASE_URL", ""), data_dir)
    database = f"sustain_{os.urandom(3).hex()}"
    url = asyncio.run(postgres.create(database))
    print(f"Postgres: {postgres.description}; logs in {logs}", flush=True)
    server = None
    try:
        harness.seed(url, args.merchants, args.members, logs / "seed.log")
        if not args.plain:
            asyncio.run(harness.add_program(url, "loadtest.sustain"))
        key = asyncio.run(harness.gateway_key(url, workload.merchant_ids(args.merchants), "loadtest.sustain"))
        options = () if args.projector == "process" else ("--projector", "in-process")
        server = harness.Server(harness.service_command(url, *options), logs / "service.log", "service")
        print(f"service SERVING on {server.address} (pid {server.pid}); building requests ...", flush=True)
        cycles = [
            bench.batch_requests(operations, f"sustain-{cycle}-", args.batch_size) for cycle in range(args.cycles)
        ]
        requests = [request for cycle in cycles for request in cycle]
        uvloop.run(measure(args, server, postgres, key, requests, logs))
    finally:
        if server is not None:
            server.stop()
        asyncio.run(postgres.drop(database))
    return 0


async def measure(args, server: harness.Server, postgres: bench.Postgres, key: str, requests: list, logs) -> None:
    client = bench.Client(server.address, key)
    # a warm-up of a tenth, not measured: the first batches load what the service caches
    await drive(client, requests[-max(1, len(requests) // 30) :], max(1.0, args.seconds / 10), args.concurrency)
    metrics_before = bench.read_metrics(server.metrics_url)
    collector_before = collector_totals(server.metrics_url)
    cpu_before = harness.CpuReading.now(server.pid, postgres.postmaster_pid)
    main_before = thread_cpu_seconds(server.pid, server.pid)
    profiler = None
    raw = logs / "server.raw"
    if args.profile:
        py_spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
        profiler = subprocess.Popen(
            [
                py_spy,
                "record",
                "--idle",
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(raw),
                "-p",
                str(server.pid),
                "-d",
                str(int(args.seconds)),
                "--threads",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    operations, seconds, not_applied = await drive(client, requests, args.seconds, args.concurrency)
    visible = await client.visible()
    total_seconds = seconds + visible
    main_seconds = thread_cpu_seconds(server.pid, server.pid) - main_before
    cpu = harness.CpuSplit.between(cpu_before, harness.CpuReading.now(server.pid, postgres.postmaster_pid))
    metrics_after = bench.read_metrics(server.metrics_url)
    collector_after = collector_totals(server.metrics_url)
    projector = metrics_after.get(PROJECTOR_CPU, 0.0) - metrics_before.get(PROJECTOR_CPU, 0.0)
    await client.close()
    print(
        f"\n{'plain ledger' if args.plain else 'program in force'}, SubmitBatch of {args.batch_size:,}, "
        f"{args.concurrency} calls in flight, projector {args.projector}, {seconds:.1f} s of load"
    )
    print(
        f"  operations/s acknowledged          {operations / seconds:>10,.0f}  ({operations:,} operations, "
        f"{not_applied:,} not applied)"
    )
    print(
        f"  operations/s until visible         {operations / total_seconds:>10,.0f}  (last visible "
        f"{visible * 1000:.0f} ms after the last answer)"
    )
    per_op = 1e6 / operations
    print(
        f"  CPU µs/op: server {cpu.server * per_op:.1f} (its main thread {main_seconds * per_op:.1f}), "
        f"projector {projector * per_op:.1f}, Postgres {(cpu.postgres or 0.0) * per_op:.1f}, "
        f"client {cpu.client * per_op:.1f}, other {cpu.other * per_op:.1f}"
    )
    print(
        f"  server main thread busy            {100 * main_seconds / total_seconds:>9.0f}%  "
        f"(the event loop; 100% = its CPU is the limit)"
    )
    passes = {
        generation: (
            count - collector_before.get(generation, (0.0, 0.0))[0],
            total - collector_before.get(generation, (0.0, 0.0))[1],
        )
        for generation, (count, total) in sorted(collector_after.items())
    }
    print(
        "  cyclic collector (points_gc_pause_seconds): "
        + ", ".join(
            f"generation {generation}: {count:,.0f} passes, {1000 * total / max(count, 1):.1f} ms each, "
            f"{total * per_op:.2f} µs/op"
            for generation, (count, total) in passes.items()
        )
    )
    if profiler is not None:
        profiler.wait(timeout=args.seconds + 30)
        if raw.exists():
            counts, total = top_frames(raw, server.pid)
            print(f"  main thread by innermost Python frame (py-spy --idle, {total:,} samples):")
            for frame, count in counts.most_common(25):
                print(f"    {100 * count / max(1, total):5.1f}%  {frame}")


if __name__ == "__main__":
    sys.exit(main())
