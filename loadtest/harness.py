"""What run.py and bench.py share: servers started as subprocesses, their CPU time, and the seeded
network (seeding an empty database, issuing a gateway key)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

from loadtest import workload
from processor import store
from processor.projector_process import CLOCK_TICKS_PER_SECOND, cpu_seconds

ROOT = pathlib.Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"SERVING on (\S+)")
_METRICS = re.compile(r"metrics (http://\S+/metrics)")


def children_cpu_seconds(parent_pid: int) -> dict[int, float]:
    """CPU seconds of every process whose parent is parent_pid, and of the parent itself."""
    result = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        pid = int(entry.name)
        if pid == parent_pid or int(fields[1]) == parent_pid:
            result[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND
    return result


def precise_cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, to the nanosecond (/proc/<pid>/schedstat): a statement or a batch's
    rules take a few ms, about one tick of /proc/<pid>/stat (cpu_seconds)."""
    return int(pathlib.Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def cpu_seconds_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds a group of processes (children_cpu_seconds: Postgres's postmaster and backends)
    spent between two readings; a process started in between counts from zero."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def machine_busy_seconds() -> float:
    """CPU seconds spent by every process on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / CLOCK_TICKS_PER_SECOND


@dataclasses.dataclass(frozen=True)
class CpuReading:
    """The CPU seconds so far of the processes a measurement splits its time between."""

    server: float
    postgres: dict[int, float]  # per process of Postgres; empty when Postgres is not on this machine
    client: float
    machine: float

    @classmethod
    def now(cls, server_pid: int, postmaster_pid: int | None) -> "CpuReading":
        return cls(
            cpu_seconds(server_pid) or 0.0,
            children_cpu_seconds(postmaster_pid) if postmaster_pid else {},
            cpu_seconds(os.getpid()) or 0.0,
            machine_busy_seconds(),
        )


@dataclasses.dataclass(frozen=True)
class CpuSplit:
    """CPU seconds spent between two readings: the server process, Postgres (all its processes; None
    when it is not on this machine), this client, and every other process on the machine."""

    server: float
    postgres: float | None
    client: float
    other: float

    @classmethod
    def between(cls, before: CpuReading, after: CpuReading) -> "CpuSplit":
        server = after.server - before.server
        client = after.client - before.client
        postgres = cpu_seconds_since(before.postgres, after.postgres) if after.postgres else None
        other = after.machine - before.machine - server - client - (postgres or 0.0)
        return cls(server, postgres, client, max(0.0, other))


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1])
    except OSError:
        return None


class Server:
    """A server process that prints "... SERVING on HOST:PORT ..." when ready. Its stderr, and its
    stdout after that line, go to `log_path`."""

    def __init__(
        self,
        command: list[str],
        log_path: pathlib.Path,
        name: str,
        ready_seconds_max: float = 120.0,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (open for the server's life; closed by stop())
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.address = ""
        self.metrics_url = ""
        deadline = time.monotonic() + ready_seconds_max
        lines = []
        timer = threading.Timer(ready_seconds_max, self.process.kill)  # a hung start cannot hang us
        timer.start()
        try:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                lines.append(line)
                match = _SERVING.search(line)
                if match:
                    self.address = match.group(1)
                    metrics = _METRICS.search(line)
                    self.metrics_url = metrics.group(1) if metrics else ""
                    break
        finally:
            timer.cancel()
        if not self.address:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(
                f"{name} did not start (exit {self.process.returncode}, "
                f"{'timed out' if time.monotonic() > deadline else 'ended'}); "
                f"its output: {''.join(lines)[-2000:]!r}; its log: {log_path}"
            )
        self._drain = threading.Thread(target=self._copy_stdout, daemon=True)
        self._drain.start()

    def _copy_stdout(self) -> None:
        for raw in self.process.stdout:
            self._log.write(raw)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, seconds_max: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=seconds_max)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(timeout=5)
        self._log.close()


def service_command(database_url: str, *options: str) -> list[str]:
    # the per-merchant rate limit and quotas are on by default; a benchmark measures the service, not them
    return [
        sys.executable,
        "-m",
        "processor",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--merchant-operations-per-second",
        "0",
        *options,
    ]


def seed(database_url: str, merchants: int, members: int, log_path: pathlib.Path) -> None:
    """`python -m processor seed` on a database no service writes to (it takes the writer lock)."""
    with open(log_path, "ab") as log:
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "processor",
                "seed",
                "--merchants",
                str(merchants),
                "--members",
                str(members),
                "--points-per-member",
                str(workload.SEED_PURCHASE_PER_MEMBER),
                "--database-url",
                database_url,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        raise RuntimeError(f"seeding failed (exit {code}); see {log_path}")


async def seeded_network(database_url: str) -> tuple[int, int]:
    """(merchants, members) of the seeded network in the database (0, 0 if none); applies the
    migrations first, so a new database is ready for `seed`."""
    from processor.store import Store

    store = await Store.open(database_url, 2)
    try:
        await store.migrate()
        merchants = await store.pool.fetchval(
            "SELECT count(*) FROM merchants WHERE merchant_id LIKE $1", workload.MERCHANT_ID_PREFIX + "%"
        )
        members = await store.pool.fetchval(
            "SELECT count(*) FROM members WHERE member_id LIKE $1", workload.MEMBER_ID_PREFIX + "%"
        )
        return merchants, members
    finally:
        await store.close()


async def gateway_key(database_url: str, merchant_ids: list[str], description: str) -> str:
    """A new gateway key for the merchants (stored as a hash; returned once)."""
    from processor import auth
    from processor.store import Store

    store = await Store.open(database_url, 2)
    try:
        key = auth.new_key()
        await store.insert_api_key(key.key_id, key.secret_sha256, "gateway", merchant_ids, description)
        return key.key
    finally:
        await store.close()


async def add_program(database_url: str, description: str) -> None:
    """Puts ops/program.example.json in force (program id "alliance"), as production runs."""
    from processor.store import Store

    store = await Store.open(database_url, 2)
    try:
        config = json.loads((ROOT / "ops" / "program.example.json").read_text())
        await store.add_program_version("alliance", None, config, description)
    finally:
        await store.close()


def on_embedded_postgres(prefix: str, measure: Callable[[str], Awaitable[None]]) -> None:
    """Runs `measure(database_url)` on a throw-away embedded Postgres (pgserver) in a temporary directory,
    stopped and removed after it: the write benches' own server (loadtest/*_write.py)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        server = store.start_embedded_server(pathlib.Path(directory), cleanup_mode="stop")
        try:
            asyncio.run(measure(server.get_uri()))
        finally:
            server.cleanup()
