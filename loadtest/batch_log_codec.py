"""The batch log's payload on its own (processor/batch_log.py): format 1 (a base commit's encode: the
BatchWrite pickled as objects) against this tree's format (2, then 3 since migration 0023: records as
columns, 3 without the idempotency records, which go in a row of their own), interleaved batch by
batch in one process, then the append of each payload to Postgres.

The batches are the state machine's own (loadtest.bench_state_machine: 1,000 operations, 70% earn /
30% redeem, Zipf members, 200 merchants), with ops/program.example.json in force ("program") and
without ("plain"); the first --warmup batches of each run are applied but not counted, so members have
lots and rules state by then.

Codec: for each batch, format 1 and format 2 are encoded and decoded (this tree's `decode`, which reads
both) --repeats times each, the order of the formats alternating batch by batch; process CPU per
operation (time.process_time), its range over --chunks chunks of the counted batches, and payload bytes
per operation. Both decodes are checked equal to the BatchWrite.

Postgres (unless --no-postgres): an embedded server (the service's settings, postgres_settings.embedded)
in a temporary directory, one database per variant (a format and the payload column's storage, see
--storage), every migration of this tree applied. Each batch's payloads are appended with
batch_log.append (the fence and the row in one autocommit statement, as the committer does), the
variants in alternating order; measured per append: the backend's CPU (/proc/<pid>/schedstat: the WAL
writer's and checkpointer's share is not in it) and WAL bytes (pg_current_wal_insert_lsn before and
after, the commit record included), per operation.

    .venv/bin/python -m loadtest.batch_log_codec [--batches 30] [--warmup 10] [--base de874fc]
        [--storage external,pglz] [--no-postgres]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import subprocess
import time
import types
import urllib.parse
from typing import Any, Callable

import asyncpg

from loadtest import harness
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from loadtest.bench_state_machine import NOW_US, batches, machine
from processor import batch_log, store
from processor.store import BatchWrite

LSN = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
# the payload column's storage per --storage name: migration 0017 sets EXTERNAL (no compression); pglz is
# Postgres's default compression (lz4 is not built into pgserver's Postgres)
STORAGE = {
    "external": "ALTER TABLE batch_log ALTER COLUMN payload SET STORAGE EXTERNAL",
    "pglz": "ALTER TABLE batch_log ALTER COLUMN payload SET STORAGE EXTENDED, ALTER COLUMN payload SET COMPRESSION pglz",
}


def base_module(commit: str) -> types.ModuleType:
    """processor/batch_log.py as it is at `commit` (its encode writes format 1), compiled as a module of
    its own against this tree's other modules."""
    source = subprocess.run(
        ["git", "show", f"{commit}:processor/batch_log.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"batch_log_{commit}")
    exec(compile(source, f"{commit}:processor/batch_log.py", "exec"), module.__dict__)
    if module.FORMAT_VERSION != 1:
        raise SystemExit(f"{commit}:processor/batch_log.py writes format {module.FORMAT_VERSION}, not 1")
    return module


def writes(program: bool, args: argparse.Namespace) -> list[BatchWrite]:
    """The counted batches' BatchWrites (the warm-up's applied first)."""
    m = machine(program, args.members, args.merchants)
    out = []
    for i, batch in enumerate(batches(args.warmup + args.batches, args.members, args.merchants, seed=args.seed)):
        _, write = m.apply(batch, {}, NOW_US + i * 1_000_000)
        m.commit()
        if i >= args.warmup:
            out.append(write)
    return out


def cpu(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Process CPU seconds per call of `fn` over `repeats` calls, and its last result."""
    result = None
    started = time.process_time()
    for _ in range(repeats):
        result = fn()
    return (time.process_time() - started) / repeats, result


def codec(label: str, work: list[BatchWrite], encoders: dict[int, Callable[[BatchWrite], bytes]], args) -> dict:
    """Encode and decode each batch in both formats, alternating; prints µs/op and B/op side by side."""
    spent: dict[tuple[int, str], list[float]] = {(f, s): [] for f in encoders for s in ("encode", "decode")}
    size: dict[int, int] = {f: 0 for f in encoders}
    payloads: dict[int, list[bytes]] = {f: [] for f in encoders}
    operations = [batch_log.operation_count(w) for w in work]
    # what the bench holds (the state machine, the batches) is not what a decode makes: out of the
    # collector's way, so its passes scan only what the codec allocates
    gc.collect()
    gc.freeze()
    for i, write in enumerate(work):
        order = list(encoders) if i % 2 == 0 else list(reversed(encoders))
        for f in order:
            took, payload = cpu(lambda: encoders[f](write), args.repeats)
            spent[(f, "encode")].append(took)
            took, decoded = cpu(lambda: batch_log.decode(i, f, payload), args.repeats)
            spent[(f, "decode")].append(took)
            # format 3 carries no idempotency records (their own row: processor/idempotency_records.py)
            if decoded != (write if f < 3 else dataclasses.replace(write, idempotency=[])):
                raise SystemExit(f"format {f}: batch {i} did not decode to the BatchWrite it was encoded from")
            size[f] += len(payload)
            payloads[f].append(payload)
    total = sum(operations)
    per_chunk = max(1, len(work) // args.chunks)

    def figures(f: int, step: str) -> tuple[float, float, float]:
        values = spent[(f, step)]
        chunks = [
            sum(values[k : k + per_chunk]) / sum(operations[k : k + per_chunk]) * 1e6
            for k in range(0, len(values), per_chunk)
        ]
        return sum(values) / total * 1e6, min(chunks), max(chunks)

    first, second = list(encoders)
    line = [f"{label:<8}"]
    for step in ("encode", "decode"):
        a, b = figures(first, step), figures(second, step)
        line.append(
            f"{step} µs/op f{first} {a[0]:5.2f} [{a[1]:.2f}..{a[2]:.2f}] f{second} {b[0]:5.2f} [{b[1]:.2f}..{b[2]:.2f}] "
            f"({b[0] / a[0]:.2f}x)"
        )
    line.append(f"B/op f{first} {size[first] / total:6.1f} f{second} {size[second] / total:6.1f}")
    print("  ".join(line))
    return {"payloads": payloads, "operations": operations}


async def appends(url: str, runs: dict[str, dict], storages: list[str]) -> None:
    """Appends every batch's payload of each (format, storage) to a database of its own, alternating."""
    admin = await asyncpg.connect(url)
    variants: dict[tuple[int, str], asyncpg.Connection] = {}
    try:
        for storage in storages:
            for f in (1, batch_log.FORMAT_VERSION):
                name = f"batch_log_f{f}_{storage}"
                await admin.execute(f'CREATE DATABASE "{name}"')
                c = await asyncpg.connect(urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{name}")))
                await store.migrate(c)
                await c.execute(STORAGE[storage])
                variants[(f, storage)] = c
        for label, run in runs.items():
            cpu_spent = {v: 0.0 for v in variants}
            wal = {v: 0 for v in variants}
            stored = {v: 0 for v in variants}
            batch_ids = {v: 0 for v in variants}
            work: list[BatchWrite] = run["writes"]
            for i, write in enumerate(work):
                order = list(variants) if i % 2 == 0 else list(reversed(variants))
                for v in order:
                    c, payload = variants[v], run["payloads"][v[0]][i]
                    pid = c.get_server_pid()
                    started = await c.fetchval("SELECT backend_start FROM pg_stat_get_activity(pg_backend_pid())")
                    batch_ids[v] += 1
                    before_wal = await c.fetchval(LSN)
                    before = cpu_seconds(pid)
                    await batch_log.append(c, (0, pid, started), batch_ids[v], write, payload, 60.0)
                    cpu_spent[v] += cpu_seconds(pid) - before
                    wal[v] += await c.fetchval(LSN) - before_wal
            total = sum(run["operations"])
            for v, c in variants.items():
                stored[v] = await c.fetchval("SELECT pg_total_relation_size('batch_log')")
                await c.execute("TRUNCATE batch_log")
            print(
                f"{label:<8} append (Postgres backend) "
                + "  ".join(
                    f"f{f}/{s}: CPU {cpu_spent[(f, s)] / total * 1e6:5.2f} µs/op WAL {wal[(f, s)] / total:6.1f} B/op "
                    f"table+toast {stored[(f, s)] / total:6.1f} B/op"
                    for f, s in variants
                )
            )
    finally:
        for c in variants.values():
            await c.close()
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="batches counted, of 1,000 operations [30]")
    parser.add_argument("--warmup", type=int, default=10, help="batches applied first, not counted [10]")
    parser.add_argument("--repeats", type=int, default=3, help="encodes and decodes of each batch per format [3]")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--base", default="de874fc", help="a commit whose batch_log.py writes format 1 [de874fc]")
    parser.add_argument(
        "--storage", default="external", help=f"payload column storages to append to, of {','.join(STORAGE)} [external]"
    )
    parser.add_argument("--no-postgres", action="store_true", help="the codec only")
    args = parser.parse_args()
    storages = args.storage.split(",")
    if not set(storages) <= set(STORAGE):
        parser.error(f"--storage: one or more of {', '.join(STORAGE)}")
    base = base_module(args.base)
    encoders = {1: base.encode, batch_log.FORMAT_VERSION: batch_log.encode}
    runs = {}
    for label, program in (("program", True), ("plain", False)):
        work = writes(program, args)
        runs[label] = codec(label, work, encoders, args) | {"writes": work}
    if args.no_postgres:
        return
    harness.on_embedded_postgres("points-batch-log-codec-", lambda url: appends(url, runs, storages))


if __name__ == "__main__":
    main()
