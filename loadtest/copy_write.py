"""The projection's row writes on their own (Store._write_many, the rules' rows included): the service's
CPU and the Postgres backend's CPU per operation, this tree's binary COPY encoder (fastpath/copy_binary.pyx)
against a base commit's `_write_many` and `_write_rules` (asyncpg's copy_records_to_table), interleaved
batch by batch on one embedded Postgres (the service's settings) in a temporary directory.

The batches are the state machine's own (loadtest.bench_state_machine: 1,000 operations, 70% earn / 30%
redeem, Zipf members, 200 merchants), with the program (ops/program.example.json) in force or plain
(--plain). Each variant has its own database, migrated with this tree's migrations (the schema is the
same); batch i goes to one then the other, the order alternating, each in a transaction of its own,
committed. Measured per batch: this process's CPU (time.process_time) for the `_write_many` call, which
is what the projector spends on the rows (building them, encoding them, asyncpg's protocol), and the
backend's CPU for the transaction, commit included (/proc/<pid>/schedstat). The first --warmup batches
are not counted. Printed: µs/op for each variant over the counted batches, the range over --chunks
chunks, the ratio this/base, and the service's CPU by step (the step names of _write_many).

    .venv/bin/python -m loadtest.copy_write [--plain] [--batches 40] [--base de874fc]
"""

from __future__ import annotations

import argparse
import dataclasses
import ast
import pathlib
import subprocess
import textwrap
import time
import urllib.parse
from typing import Any

import asyncpg

from loadtest import harness
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from loadtest.bench_state_machine import NOW_US, batches, machine
from processor import events, idempotency_records, store
from processor.store import MIGRATIONS, Store

# main before the binary COPY encoder: asyncpg's copy_records_to_table for every bulk insert
BASE_COMMIT = "de874fc"


def base_store(commit: str = BASE_COMMIT, root: pathlib.Path | None = None) -> type[Store]:
    """A Store whose `_write_many` and `_write_rules` are those of `commit` (git show), compiled in
    processor.store's namespace; everything they call besides is this tree's."""
    source = subprocess.run(
        ["git", "show", f"{commit}:processor/store.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=root or pathlib.Path(__file__).resolve().parents[1],
    ).stdout
    return store_with_writers(source, f"{commit}:processor/store.py")


def store_with_writers(source: str, origin: str) -> type[Store]:
    """A Store whose `_write_many` and `_write_rules` are the ones in `source` (Python source holding
    them, e.g. an old processor/store.py), compiled in processor.store's namespace."""
    namespace: dict[str, Any] = dict(vars(store))
    wanted = {"_write_many", "_write_rules"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AsyncFunctionDef) and node.name in wanted:
            code = textwrap.dedent(ast.get_source_segment(source, node) or "")
            exec(compile(code, f"{origin}:{node.name}", "exec"), namespace)
            wanted.discard(node.name)
    if wanted:
        raise SystemExit(f"no {', '.join(sorted(wanted))} in {origin}")

    class BaseStore(Store):
        _write_many = namespace["_write_many"]
        _write_rules = staticmethod(namespace["_write_rules"])

    return BaseStore


async def connect_database(
    admin: asyncpg.Connection, url: str, name: str, through: int | None = None
) -> asyncpg.Connection:
    """A new database `name` on the server, migrated with this tree's migrations (up to `through`: the
    base's writers write entries rows, which migration 0022 packed into the transactions rows)."""
    await admin.execute(f'CREATE DATABASE "{name}"')
    c = await asyncpg.connect(urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{name}")))
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if through is None or int(path.name.split("_", 1)[0]) <= through:
            await c.execute(path.read_text())
    return c


async def measure(url: str, args: argparse.Namespace) -> None:
    base = base_store(args.base)
    variants = {"base": base.__new__(base), "this": Store.__new__(Store)}
    admin = await asyncpg.connect(url)
    tag = "plain" if args.plain else "program"
    connections = {
        name: await connect_database(admin, url, f"copy_{tag}_{name}", 21 if name == "base" else None)
        for name in variants
    }
    pids = {name: c.get_server_pid() for name, c in connections.items()}
    m = machine(not args.plain, args.members, args.merchants)
    work = batches(args.batches, args.members, args.merchants, seed=args.seed)
    client: dict[str, list[float]] = {name: [] for name in variants}
    backend: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, dict[str, float]] = {name: {} for name in variants}
    operations = 0
    for i, batch in enumerate(work):
        _, write = m.apply(batch, {}, NOW_US + i * 1_000_000)
        write.member_balances_after = events.balances_after(write, m.ledger)  # as the pipeline does
        m.commit()
        counted = i >= args.warmup
        if counted:
            operations += len(write.idempotency)
        # the base's writers took the idempotency records' request and response as JSON texts
        writes = {"base": dataclasses.replace(write, idempotency=idempotency_records.as_texts(write.idempotency))}
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            c = connections[name]
            mark = [0.0]

            def step(what: str, name: str = name, mark: list[float] = mark, counted: bool = counted) -> None:
                now = time.process_time()
                if counted:
                    steps[name][what] = steps[name].get(what, 0.0) + now - mark[0]
                mark[0] = now

            began_backend = cpu_seconds(pids[name])
            async with c.transaction():
                began = mark[0] = time.process_time()
                await variants[name]._write_many(c, [writes.get(name, write)], 60.0, step)
                used = time.process_time() - began
            if counted:
                client[name].append(used)
                backend[name].append(cpu_seconds(pids[name]) - began_backend)
    per_batch = operations / max(1, args.batches - args.warmup)
    size = max(1, len(client["base"]) // args.chunks)

    def summary(values: list[float]) -> str:
        chunks = [
            sum(values[k : k + size]) / (len(values[k : k + size]) * per_batch) * 1e6
            for k in range(0, len(values), size)
        ]
        return f"{sum(values) / operations * 1e6:6.2f} µs/op [chunks {min(chunks):.2f}..{max(chunks):.2f}]"

    print(
        f"{tag}: {args.batches - args.warmup} batches counted ({args.warmup} warm-up), {operations} operations, "
        f"base {args.base} vs this tree, interleaved batch by batch"
    )
    for name in variants:
        print(
            f"  {name:<5} service CPU of _write_many {summary(client[name])}   Postgres backend {summary(backend[name])}"
        )
    print(
        f"  this/base: service {sum(client['this']) / sum(client['base']):.2f}, "
        f"Postgres {sum(backend['this']) / sum(backend['base']):.2f}"
    )
    for name in variants:
        print(
            f"  {name:<5} service CPU by step, µs/op: "
            + ", ".join(f"{k} {v / operations * 1e6:.2f}" for k, v in steps[name].items())
        )
    for c in connections.values():
        await c.close()
    await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="no program in force")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--base", default=BASE_COMMIT, help=f"the commit whose writers are the base [{BASE_COMMIT}]")
    args = parser.parse_args()
    harness.on_embedded_postgres("points-copy-write-", lambda url: measure(url, args))


if __name__ == "__main__":
    main()
