"""One command for a Locust load test of the points service, headless, with its CSV and HTML report.

    python -m loadtest.run --scenario alliance --seconds 60 --users 50
    python -m loadtest.run --scenario gateway --seconds 60 --users 4 --batch-operations 100
    python -m loadtest.run --scenario alliance --target HOST:PORT --key pk_... [--merchants N --members N]
    python -m loadtest.run ... -- --processes 2          # anything after -- goes to Locust

Without --target it starts what it needs: the service (`python -m processor serve`, a process of its
own) on --database-url / DATABASE_URL, or else on the embedded Postgres under --data-dir (database
`points_loadtest`, so it does not touch `make run`'s); seeds a network there with `processor seed` if
the database has none (--merchants, --members); issues a gateway key for the merchants used; and stops
the service at the end. Options of the service come from its POINTS_* environment variables.

Reports go to loadtest/reports/<timestamp>/: report.html, locust_stats.csv, locust_stats_history.csv,
locust_failures.csv, locust_exceptions.csv, locust.log, and, for a service it started, service.log and
metrics.txt (its /metrics after the run). Exit status: Locust's (1 if any request failed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request

from loadtest import harness, workload

REPORTS = harness.ROOT / "loadtest" / "reports"
USER_CLASSES = {"alliance": "AllianceUser", "gateway": "GatewayUser"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scenario",
        choices=sorted(USER_CLASSES),
        default="alliance",
        help="alliance: unary calls of merchant systems; gateway: SubmitBatch [default alliance]",
    )
    p.add_argument("--seconds", type=int, default=60, help="duration of the run [default 60]")
    p.add_argument("--users", type=int, default=50, help="concurrent Locust users [default 50]")
    p.add_argument(
        "--spawn-rate",
        type=float,
        default=0.0,
        help="users started per second; 0 = all within about one second [default 0]",
    )
    p.add_argument("--target", default="", help="HOST:PORT of a running service; without it one is started")
    p.add_argument(
        "--key",
        default="",
        help="API key for --target (a gateway key listing the merchants used) [env POINTS_LOAD_KEY]",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="Postgres of the service started here [env DATABASE_URL; else embedded]",
    )
    p.add_argument("--data-dir", default=".points-data", help="directory of the embedded Postgres [.points-data]")
    p.add_argument(
        "--merchants",
        type=int,
        default=200,
        help="seeded merchants used (seed-m-000001..); seeded if the database has none [200]",
    )
    p.add_argument(
        "--members",
        type=int,
        default=20_000,
        help="seeded members used (seed-u-0000001..); seeded if the database has none [20000]",
    )
    p.add_argument("--hot-merchants", type=int, default=3, help="merchants taking --hot-merchant-share [3]")
    p.add_argument("--hot-merchant-share", type=float, default=0.4, help="share of the hot merchants [0.4]")
    p.add_argument("--member-exponent", type=float, default=1.0, help="Zipf exponent of the member draw [1.0]")
    p.add_argument("--batch-operations", type=int, default=100, help="operations per SubmitBatch call [100]")
    p.add_argument(
        "--wait-seconds", type=float, default=0.0, help="each user waits a random 0..N seconds between tasks [0]"
    )
    return p


def _prepare_service(args, report_dir) -> tuple[str, str, harness.Server]:
    """Database, seeded network and key; then the service. Returns (target, key, server)."""
    from processor.store import resolve_database_url

    url = resolve_database_url(args.database_url, args.data_dir, "points_loadtest")
    merchants, members = asyncio.run(harness.seeded_network(url))
    if merchants == 0:
        print(f"seeding {args.merchants} merchants and {args.members} members ...", flush=True)
        harness.seed(url, args.merchants, args.members, report_dir / "seed.log")
        merchants, members = args.merchants, args.members
    elif merchants < args.merchants or members < args.members:
        print(
            f"note: the database holds a seeded network of {merchants} merchants and {members} members; using those",
            flush=True,
        )
    args.merchants, args.members = min(merchants, args.merchants), min(members, args.members)
    key = asyncio.run(
        harness.gateway_key(url, workload.merchant_ids(args.merchants), f"loadtest.run {report_dir.name}")
    )
    server = harness.Server(
        harness.service_command(url), report_dir / "service.log", "the points service", ready_seconds_max=600
    )
    print(f"service SERVING on {server.address} (pid {server.pid}, log {server.log_path})", flush=True)
    return server.address, key, server


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = " ".join(argv)
    locust_extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, locust_extra = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    target, key = args.target, args.key or os.environ.get("POINTS_LOAD_KEY", "")
    if target and not key:
        print(
            "error: --target needs --key (or POINTS_LOAD_KEY): a gateway key listing the merchants used, "
            "e.g. from `python -m processor key create --gateway --merchant-id seed-m-000001 ...`",
            file=sys.stderr,
        )
        return 2
    report_dir = REPORTS / time.strftime("%Y%m%d-%H%M%S")
    report_dir.mkdir(parents=True, exist_ok=True)

    server = None
    try:
        if not target:
            target, key, server = _prepare_service(args, report_dir)

        environment = dict(
            os.environ,
            POINTS_LOAD_TARGET=target,
            POINTS_LOAD_KEY=key,
            POINTS_LOAD_MERCHANTS=str(args.merchants),
            POINTS_LOAD_MEMBERS=str(args.members),
            POINTS_LOAD_HOT_MERCHANTS=str(min(args.hot_merchants, args.merchants)),
            POINTS_LOAD_HOT_MERCHANT_SHARE=str(args.hot_merchant_share),
            POINTS_LOAD_MEMBER_EXPONENT=str(args.member_exponent),
            POINTS_LOAD_BATCH_OPERATIONS=str(args.batch_operations),
            POINTS_LOAD_WAIT_SECONDS=str(args.wait_seconds),
        )
        spawn_rate = args.spawn_rate or args.users
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(harness.ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "--only-summary",
            "--users",
            str(args.users),
            "--spawn-rate",
            f"{spawn_rate:g}",
            "--run-time",
            f"{args.seconds}s",
            "--stop-timeout",
            "10",
            "--host",
            target,
            "--csv",
            str(report_dir / "locust"),
            "--csv-full-history",
            "--html",
            str(report_dir / "report.html"),
            *locust_extra,
            USER_CLASSES[args.scenario],
        ]
        (report_dir / "command.txt").write_text(f"python -m loadtest.run {given}\n" + " ".join(command) + "\n")
        print(f"locust: {args.scenario} scenario, {args.users} users, {args.seconds} s against {target}", flush=True)
        with open(report_dir / "locust.log", "wb") as log:
            locust = subprocess.Popen(
                command, cwd=harness.ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for line in locust.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
            code = locust.wait()
        if server is not None and server.metrics_url:
            try:
                with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
                    (report_dir / "metrics.txt").write_bytes(response.read())
            except OSError as error:
                print(f"note: could not read {server.metrics_url}: {error}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    shown = report_dir.relative_to(harness.ROOT) if report_dir.is_relative_to(harness.ROOT) else report_dir
    print(
        f"reports in {shown}/: report.html, locust_stats.csv, locust_stats_history.csv, locust_failures.csv"
        + (", service.log, metrics.txt" if server is not None else "")
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
