"""Scale check on a seeded network: recovery time, traffic with a hot merchant, a settlement cut, and
reconciliation, with the figures printed.

    python -m processor seed --database-url URL                # 50,000 merchants, 1,000,000 members
    python -m loadtest.scale --database-url URL [--seconds 20]

Positions are checked against the journal while and after traffic runs (reconcile), and the cut is
timed. A benchmark, not a test: it prints figures and asserts nothing about time.

Restarts only (no traffic, nothing written but the service's own final checkpoint):

    python -m loadtest.journal --database-url URL --transactions 9000000     # a long journal
    python -m loadtest.scale --database-url URL --restart-only [--restarts 3] [--tail 200000]

starts the service --restarts times and prints, for each start, the seconds from the process's start
to the "SERVING" line on stdout and to the first SERVING answer of the gRPC health check (polled every
--poll-seconds), with the start's phases from the service's log, its resident memory once SERVING
(VmRSS, VmHWM, RssAnon from /proc/<pid>/status; again after --settle-seconds), and the time SIGTERM
takes to stop it (a graceful stop folds the journal tail into the balance checkpoint); then the
medians. --tail N places the balance checkpoint N transactions before the newest one before every
start (loadtest.journal.place_tail), so each start replays an N-transaction tail; without it, the
start finds the checkpoint where the previous stop left it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import pathlib
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest import harness
from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent


async def _keys(url: str, merchants: list[str]) -> tuple[str, str]:
    from processor import auth
    from processor.store import Store

    store = await Store.open(url, 2)
    try:
        gateway, operator = auth.new_key(), auth.new_key()
        await store.insert_api_key(gateway.key_id, gateway.secret_sha256, "gateway", merchants, "scale check")
        await store.insert_api_key(operator.key_id, operator.secret_sha256, "operator", [], "scale check")
        return gateway.key, operator.key
    finally:
        await store.close()


async def _reconcile(url: str) -> list[str]:
    from processor.store import Store

    store = await Store.open(url, 2)
    try:
        return await store.ledger_discrepancies()
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic duration")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--merchants-used", type=int, default=1000, help="seeded merchants the traffic uses")
    parser.add_argument("--members", type=int, default=1_000_000, help="seeded members to draw from")
    restarts = parser.add_argument_group("restart-only mode")
    restarts.add_argument(
        "--restart-only",
        action="store_true",
        help="no traffic: start and stop the service --restarts times, timing start -> SERVING "
        "and reading its resident memory",
    )
    restarts.add_argument("--restarts", type=int, default=3)
    restarts.add_argument(
        "--tail",
        type=int,
        default=None,
        help="before each start, place the balance checkpoint this many transactions before "
        "the newest (the start replays them); default: leave it where it is",
    )
    restarts.add_argument(
        "--settle-seconds", type=float, default=2.0, help="resident memory is read again this long after SERVING"
    )
    restarts.add_argument("--poll-seconds", type=float, default=0.05, help="gRPC health check poll interval")
    restarts.add_argument("--start-seconds-max", type=float, default=1800.0)
    restarts.add_argument(
        "--service-option",
        action="append",
        default=[],
        help="extra `serve` option, e.g. --service-option=--members-max=2000000 (repeatable)",
    )
    restarts.add_argument("--log", default="", help="the services' stderr (JSON log) [default: a temp file]")
    args = parser.parse_args()
    if args.restart_only:
        return restart_only(args)

    merchants = [f"seed-m-{i:06d}" for i in range(1, args.merchants_used + 1)]
    hot = merchants[0]
    gateway, operator = asyncio.run(_keys(args.database_url, merchants))
    credential = (("authorization", f"Bearer {gateway}"),)

    started = time.monotonic()
    # the per-merchant rate limit (on by default) would shed the hot merchant: the scale run measures the
    # service, started as the benchmarks start it (harness.service_command turns the limit off)
    service = subprocess.Popen(
        harness.service_command(args.database_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    target = ""
    for line in service.stdout:
        match = re.search(r"SERVING on (\S+)", line)
        if match:
            target = match.group(1)
            break
    recovery_seconds = time.monotonic() - started
    print(f"service SERVING after {recovery_seconds:.1f} s (recovery of the seeded ledger included)")

    counts = {"ok": 0, "rejected": 0, "hot": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(target) as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)
            while not stop.is_set():
                merchant = hot if rng.random() < 0.3 else rng.choice(merchants)  # one merchant: 30% of traffic
                member = f"seed-u-{int(rng.paretovariate(1.2)) % args.members + 1:07d}"
                key = uuid.uuid4().hex
                try:
                    if rng.random() < 0.6:
                        stub.Earn(
                            points_pb2.EarnRequest(
                                merchant_id=merchant,
                                member_id=member,
                                purchase_amount=rng.randint(100, 50_000),
                                idempotency_key=key,
                            ),
                            metadata=credential,
                        )
                    else:
                        stub.Redeem(
                            points_pb2.RedeemRequest(
                                merchant_id=merchant, member_id=member, points=rng.randint(1, 500), idempotency_key=key
                            ),
                            metadata=credential,
                        )
                    outcome = "ok"
                except grpc.RpcError:
                    outcome = "rejected"
                with lock:
                    counts[outcome] += 1
                    counts["hot"] += merchant == hot

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.seconds / 2)

    # a cut in the middle of traffic
    operator_credential = (("authorization", f"Bearer {operator}"),)
    with grpc.insecure_channel(target) as channel:
        clearing = admin_pb2_grpc.ClearingStub(channel)
        cut_off = timestamp_pb2.Timestamp()
        cut_off.GetCurrentTime()
        began = time.monotonic()
        period = clearing.CloseSettlementPeriod(
            admin_pb2.CloseSettlementPeriodRequest(cut_off=cut_off), metadata=operator_credential, timeout=600
        )
        cut_seconds = time.monotonic() - began
    print(
        f"settlement cut (period {period.period_id}, {period.merchants} merchant statements) "
        f"took {cut_seconds:.2f} s while traffic ran"
    )

    time.sleep(args.seconds / 2)
    stop.set()
    for thread in threads:
        thread.join()
    print(
        f"traffic: {counts['ok']} operations applied, {counts['rejected']} refused, "
        f"{counts['hot']} at the hot merchant, {args.clients} clients, {args.seconds:.0f} s "
        f"({counts['ok'] / args.seconds:.0f} applied/s)"
    )
    service.terminate()
    service.wait(timeout=60)

    began = time.monotonic()
    problems = asyncio.run(_reconcile(args.database_url))
    print(
        f"reconcile over the whole ledger took {time.monotonic() - began:.1f} s: "
        f"{'every check holds' if not problems else problems[0]}"
    )
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------------
# restart-only mode


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon (KiB) from /proc/<pid>/status; empty if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = status.read().splitlines()
    except OSError:
        return {}
    figures = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon"):
            figures[name] = int(value.split()[0])
    return figures


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


async def _journal_state(url: str) -> tuple[int, int, int]:
    """(transactions, balance checkpoint, newest transaction id)."""
    from processor.store import Store

    store = await Store.open(url, 1)
    try:
        row = await store.pool.fetchrow(
            """SELECT (SELECT coalesce(max(transaction_id), 0) FROM transactions) AS newest,
                      (SELECT through_transaction_id FROM balance_checkpoint) AS through,
                      (SELECT reltuples::bigint FROM pg_class WHERE oid = 'transactions'::regclass) AS estimate"""
        )
        estimate = row["estimate"]
        if estimate < 0:  # never analysed
            estimate = await store.pool.fetchval("SELECT count(*) FROM transactions")
        return estimate, row["through"], row["newest"]
    finally:
        await store.close()


_LOG_PHASES = (("database ready", "database ready"), ("recovered ledger from postgres", "recovered"))


def _log_phases(log_path: pathlib.Path, offset: int, started_wall: float) -> dict[str, float]:
    """Seconds from the process start to the service's log lines of one start (its JSON log, from `offset`)."""
    phases = {}
    with open(log_path, "rb") as log:
        log.seek(offset)
        for raw in log:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            for message, name in _LOG_PHASES:
                if entry.get("msg") == message and name not in phases:
                    at = dt.datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
                    phases[name] = at.timestamp() - started_wall
    return phases


def _start_once(args: argparse.Namespace, log_path: pathlib.Path) -> dict:
    """Starts the service, times it to SERVING (stdout line and health check), reads its memory, stops it."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "processor",
        "serve",
        "--listen",
        target,
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        args.database_url,
        *args.service_option,
    ]
    offset = log_path.stat().st_size if log_path.exists() else 0
    result: dict = {}
    with open(log_path, "ab") as log:
        started_wall = time.time()
        started = time.monotonic()
        service = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    line_seen = threading.Event()

    def read_stdout() -> None:
        for line in service.stdout:
            if not line_seen.is_set() and "SERVING on" in line:
                result["line"] = time.monotonic() - started
                line_seen.set()
        line_seen.set()  # ended without the line: the loop below sees the exit

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        # reconnect quickly: the default backoff (1 s) after the first refused connection would hide
        # the moment the service starts answering
        options = [
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 100),
        ]
        with grpc.insecure_channel(target, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = started + args.start_seconds_max
            while time.monotonic() < deadline:
                if service.poll() is not None:
                    raise RuntimeError(f"the service exited ({service.returncode}) before SERVING; see {log_path}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                except grpc.RpcError:
                    status = None
                now = time.monotonic() - started
                if status is not None and "listening" not in result:
                    result["listening"] = now
                if status == health_pb2.HealthCheckResponse.SERVING:
                    result["health"] = now
                    break
                time.sleep(args.poll_seconds)
            else:
                raise RuntimeError(f"not SERVING within {args.start_seconds_max:.0f} s; see {log_path}")
        result["memory"] = _memory_kib(service.pid)
        line_seen.wait(timeout=30)
        time.sleep(args.settle_seconds)
        result["memory_settled"] = _memory_kib(service.pid)
        began = time.monotonic()
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=600)
            result["stop"] = time.monotonic() - began
        except subprocess.TimeoutExpired:
            result["stop"] = None
    finally:
        if service.poll() is None:
            service.kill()
        service.wait()
        reader.join(timeout=5)
    result["exit"] = service.returncode
    result["phases"] = _log_phases(log_path, offset, started_wall)
    return result


def restart_only(args: argparse.Namespace) -> int:
    from loadtest import journal

    if args.log:
        log_path = pathlib.Path(args.log)
    else:
        handle, name = tempfile.mkstemp(prefix="scale-restart-", suffix=".log")
        os.close(handle)
        log_path = pathlib.Path(name)
    print(f"service log: {log_path}")
    runs = []
    for attempt in range(1, args.restarts + 1):
        if args.tail is not None:
            before, after, newest = asyncio.run(journal.place_tail(args.database_url, args.tail))
            print(
                f"start {attempt}: balance checkpoint moved from {before:,} to {after:,} "
                f"(tail {newest - after:,} transactions)"
            )
        estimate, through, newest = asyncio.run(_journal_state(args.database_url))
        run = _start_once(args, log_path)
        run["tail"] = newest - through
        runs.append(run)
        memory, settled, phases = run["memory"], run["memory_settled"], run["phases"]
        print(
            f"start {attempt}: ~{estimate:,} transactions, newest {newest:,}, tail {newest - through:,}; "
            f"SERVING line after {run.get('line', float('nan')):.2f} s, health SERVING after {run['health']:.2f} s "
            f"(health answering after {run.get('listening', float('nan')):.2f} s; "
            + ", ".join(f"{name} at {seconds:.2f} s" for name, seconds in phases.items())
            + f"); memory once SERVING: VmRSS {_mib(memory.get('VmRSS'))}, VmHWM {_mib(memory.get('VmHWM'))}, "
            f"RssAnon {_mib(memory.get('RssAnon'))}; after {args.settle_seconds:.0f} s: "
            f"VmRSS {_mib(settled.get('VmRSS'))}, VmHWM {_mib(settled.get('VmHWM'))}; "
            f"SIGTERM stopped it in "
            + (f"{run['stop']:.2f} s (exit {run['exit']})" if run["stop"] is not None else "more than 600 s (killed)"),
            flush=True,
        )

    def median(values: list) -> float:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    recovered = [
        r["phases"]["recovered"] - r["phases"]["database ready"]
        for r in runs
        if {"recovered", "database ready"} <= r["phases"].keys()
    ]
    print(
        f"median of {len(runs)} starts: SERVING line {median([r.get('line') for r in runs]):.2f} s, "
        f"health SERVING {median([r['health'] for r in runs]):.2f} s, recovery (database ready -> recovered) "
        f"{median(recovered):.2f} s; VmRSS once SERVING "
        f"{_mib(median([r['memory'].get('VmRSS') for r in runs]))}, settled "
        f"{_mib(median([r['memory_settled'].get('VmRSS') for r in runs]))}, VmHWM "
        f"{_mib(median([r['memory_settled'].get('VmHWM') for r in runs]))}; stop "
        f"{median([r['stop'] for r in runs]):.2f} s"
    )
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
