"""The program rules' rows of a batch on their own (Store._write_rules): Postgres CPU and WAL bytes per
operation, this tree against a base commit's `_write_rules` and migrations, interleaved batch by batch on
one embedded Postgres (the service's settings, postgres_settings.embedded) in a temporary directory.

The batches are the state machine's own (loadtest.bench_state_machine: 1,000 operations, 70% earn / 30%
redeem, Zipf members, ops/program.example.json in force), so the rows are what the service writes: an
earn's member_programs upsert, lot and earn record, a redeem's lots consumed and pieces; lots accumulate
over the run. Each variant gets its own database; batch i is written to one then the other (the order
alternating), each in one transaction of its own, committed. Measured per transaction: the backend's
CPU (/proc/<pid>/schedstat, so Postgres on this machine only) and WAL bytes
(pg_current_wal_insert_lsn before and after, the COMMIT included), and this process's CPU for the same
(building the rows, asyncpg encoding them: what the projector spends on them). The first --warmup batches are not
counted. Printed: µs of backend CPU, client CPU and WAL bytes per operation over the counted batches
(the backend CPU's range over --chunks chunks of them), the backend CPU by step (_write_rules's step
names), then each table's updates (HOT among them), sizes and autovacuum counts. --checkpoint-every N
issues a CHECKPOINT every N batches, so full-page images count as they do over a long run. --group N
writes N consecutive batches in each transaction, as a lagging projector does (Store._write_many): this
tree's state rows once for the group, each at its latest state (processor/rules_rows.py), the base's
batch by batch; the figures stay per operation.

    .venv/bin/python -m loadtest.rules_write [--batches 60] [--members 20000] [--base 3f26523] [--checkpoint-every 0]
        [--group 1]
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import statistics
import subprocess
import textwrap
import time
import urllib.parse

import asyncpg

from loadtest import harness
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from loadtest.bench_state_machine import NOW_US, batches, machine
from processor import rules_rows, store
from processor.store import MIGRATIONS, Store

LSN = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
TABLES = ("member_programs", "lots", "lot_consumptions", "earn_rules")


def base_writer(commit: str):
    """`Store._write_rules` as it is at `commit`, compiled in processor.store's namespace."""
    source = subprocess.run(
        ["git", "show", f"{commit}:processor/store.py"], check=True, capture_output=True, text=True
    ).stdout
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "_write_rules":
            code = textwrap.dedent(ast.get_source_segment(source, node) or "")
            break
    else:
        raise SystemExit(f"no _write_rules in {commit}:processor/store.py")
    namespace = dict(vars(store))
    exec(compile(code, f"{commit}:_write_rules", "exec"), namespace)
    return namespace["_write_rules"]


def base_migrations(commit: str) -> list[tuple[int, str]]:
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{commit}", "processor/migrations/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [
        (
            int(pathlib.Path(name).name.split("_", 1)[0]),
            subprocess.run(["git", "show", f"{commit}:{name}"], check=True, capture_output=True, text=True).stdout,
        )
        for name in sorted(names)
        if name.endswith(".sql")
    ]


async def write_group(c: asyncpg.Connection, writes: list, step) -> None:
    """Several batches' rules rows in one transaction as Store._write_many writes them: the state rows
    once, each at its latest state (processor/rules_rows.py), then each batch's events."""
    await Store._write_rules(c, None, None, 60.0, step, rows=rules_rows.coalesce(writes))
    for rules, at in writes:
        await Store._write_rules_events(c, rules, at, 60.0)


async def measure(url: str, args: argparse.Namespace) -> None:
    variants = {
        "base": (base_writer(args.base), base_migrations(args.base)),
        "this": (
            Store._write_rules,
            [(int(p.name.split("_", 1)[0]), p.read_text()) for p in sorted(MIGRATIONS.glob("*.sql"))],
        ),
    }
    connections = {}
    admin = await asyncpg.connect(url)
    for name, (_, migrations) in variants.items():
        await admin.execute(f'CREATE DATABASE "rules_{name}"')
        c = await asyncpg.connect(urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/rules_{name}")))
        for _, sql in migrations:
            await c.execute(sql)
        connections[name] = c
    m = machine(True, args.members, args.merchants)
    work = batches(args.batches, args.members, args.merchants, seed=args.seed)
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wal: dict[str, list[int]] = {name: [] for name in variants}
    clients: dict[str, list[float]] = {name: [] for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, dict[str, float]] = {name: {} for name in variants}
    pids = {name: c.get_server_pid() for name, c in connections.items()}
    group: list = []
    for i, batch in enumerate(work):
        now_us = NOW_US + i * 1_000_000
        _, write = m.apply(batch, {}, now_us)
        m.commit()
        group.append((write.rules, write.created_at))
        if len(group) < args.group and i < len(work) - 1:
            continue
        writes, group = group, []
        counting = i + 1 - len(writes) >= args.warmup  # the group's first batch is past the warm-up
        if args.checkpoint_every and i % args.checkpoint_every == 0:
            # as a timed checkpoint does every checkpoint_timeout: the next change of each page after it
            # writes the whole page to the WAL (a full-page image), so how many pages a batch touches counts
            await admin.execute("CHECKPOINT")
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            writer, c = variants[name][0], connections[name]
            before_wal = await c.fetchval(LSN)
            before_cpu, began, client = cpu_seconds(pids[name]), time.perf_counter(), time.process_time()
            mark = [before_cpu]

            def step(what: str, name: str = name, mark: list = mark) -> None:
                now = cpu_seconds(pids[name])
                if counting:
                    steps[name][what] = steps[name].get(what, 0.0) + now - mark[0]
                mark[0] = now

            async with c.transaction():
                if name == "this" and len(writes) > 1:
                    await write_group(c, writes, step)
                else:
                    for rules, at in writes:  # the base writes a group's batches one by one
                        await writer(c, rules, at, 60.0, step)
            step("rest and commit")
            took, used = time.perf_counter() - began, cpu_seconds(pids[name]) - before_cpu
            client = time.process_time() - client
            written = await c.fetchval(LSN) - before_wal
            if counting:
                cpu[name].append(used)
                wal[name].append(int(written))
                walls[name].append(took)
                clients[name].append(client)
    counted = len(cpu["this"]) * args.group * 1_000
    per_chunk = max(1, len(cpu["this"]) // args.chunks)
    print(
        f"{counted // 1_000} batches of 1,000 counted ({args.warmup} warm-up), members {args.members}, "
        f"{args.group} batches a transaction"
    )
    for name in variants:
        chunks = [
            sum(cpu[name][k : k + per_chunk]) / (per_chunk * args.group * 1_000) * 1e6
            for k in range(0, len(cpu[name]), per_chunk)
        ]
        print(
            f"{name:<5} backend CPU {sum(cpu[name]) / counted * 1e6:6.1f} µs/op "
            f"(client CPU {sum(clients[name]) / counted * 1e6:5.1f}) "
            f"[chunks {min(chunks):.1f}..{max(chunks):.1f}], WAL {sum(wal[name]) / counted:7.1f} B/op, "
            f"wall {sum(walls[name]) / counted * 1e6:6.1f} µs/op (median batch {statistics.median(walls[name]) * 1e3:.1f} ms)"
        )
        print(
            "      backend CPU by step, µs/op: "
            + ", ".join(f"{k} {v / counted * 1e6:.1f}" for k, v in steps[name].items())
        )
    for name, c in connections.items():
        rows = await c.fetch(
            """SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, autovacuum_count,
                      pg_relation_size(relid) AS heap, pg_indexes_size(relid) AS indexes
               FROM pg_stat_user_tables WHERE relname = ANY($1::text[]) ORDER BY relname""",
            list(TABLES),
        )
        for r in rows:
            print(
                f"{name:<5} {r['relname']:<17} ins {r['n_tup_ins']:>8} upd {r['n_tup_upd']:>8} "
                f"(hot {r['n_tup_hot_upd']:>8}) del {r['n_tup_del']:>7} autovacuum {r['autovacuum_count']} "
                f"heap {r['heap'] / 2**20:6.1f} MB indexes {r['indexes'] / 2**20:6.1f} MB"
            )
    for c in connections.values():
        await c.close()
    await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="a CHECKPOINT before every N-th batch (0: none) [0]"
    )
    parser.add_argument(
        "--group",
        type=int,
        default=1,
        help="batches written in one transaction, as a lagging projector writes them (this tree's rows "
        "once a group, each at its latest state; the base's batch by batch) [1]",
    )
    parser.add_argument("--base", default="3f26523", help="the commit whose _write_rules and migrations are the base")
    args = parser.parse_args()
    harness.on_embedded_postgres("points-rules-write-", lambda url: measure(url, args))


if __name__ == "__main__":
    main()
