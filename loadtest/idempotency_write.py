"""The idempotency records' cost in Postgres and in the service, before and after migration 0023, side
by side: per operation, as the projector wrote them (one idempotency_keys row each, by COPY, its primary
key and created_at index) against as the committer writes them now (one idempotency_batches row per
batch, in the batch log's append statement: processor/batch_log.py).

The batches are the state machine's own (loadtest.bench_state_machine: 1,000 operations, 70% earn / 30%
redeem, Zipf members, ops/program.example.json in force unless --plain). One embedded Postgres (the
service's settings, postgres_settings.embedded) in a temporary directory, two databases: "rows" migrated
through 0022 (the idempotency_keys table) and "batches" with every migration of this tree. Both are
prefilled with --prefill-batches batches of records (so the primary key is not a small tree). Then, for
each counted batch, in alternating order, each its own transaction, measured around the statement: the
backend's CPU (/proc/<pid>/schedstat) and WAL bytes (pg_current_wal_insert_lsn, the commit included):

    rows: COPY         the projector's COPY of the batch's records (Store._write_many before 0023)
    append now         batch_log.append: the fence, the log row (format 3) and the records' row
    append before      the append as before 0023: the fence and the log row, its format-2 payload
                       carrying the records, no records' row

"now - before" is what the answer path pays more (or less) for the records; "rows: COPY" what the
projection no longer pays. Also printed, in the service's process: the records' encoding per operation now
(idempotency_records.encode) against what they added to the payload's pickle before (format 2 with the
records minus without), CPU per operation, ranges over --chunks chunks.

    .venv/bin/python -m loadtest.idempotency_write [--batches 30] [--prefill-batches 200] [--plain]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import pickle
import time
import urllib.parse

import asyncpg

from fastpath.copy_binary import CONSTANT, CopyEncoder
from loadtest import harness
from loadtest.bench_state_machine import NOW_US, batches, machine
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from processor import batch_log, idempotency_records, store
from processor.store import BatchWrite, copy_rows

LSN = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
# the projector's COPY of the records before migration 0023 (store.IDEMPOTENCY_COPY then)
ROWS_COPY = (
    ("merchant_id", "text", 0),
    ("idempotency_key", "text", 1),
    ("method", "text", 2),
    ("request", "json", 3),
    ("outcome", "text", 4),
    ("response", "json", 5),
    ("message", "text", 6),
    ("created_at", "timestamptz", CONSTANT),
)
VARIANTS = ("rows: COPY", "append now", "append before")


def writes(args: argparse.Namespace) -> list[BatchWrite]:
    m = machine(not args.plain, args.members, args.merchants)
    out = []
    count = args.prefill_batches + args.batches
    for i, batch in enumerate(batches(count, args.members, args.merchants, seed=args.seed)):
        _, write = m.apply(batch, {}, NOW_US + i * 1_000_000)
        m.commit()
        out.append(write)
    return out


def format_2_payload(write: BatchWrite) -> bytes:
    """The payload as format 2 pickled it: format 3's values with the records in them."""
    values = list(batch_log._BATCH_GETTER(write))
    values[batch_log._RULES] = batch_log._pack_rules(values[batch_log._RULES])
    values[batch_log._MEMBERS] = batch_log._pack_members(values[batch_log._MEMBERS])
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True
    pickler.dump(values)
    return buffer.getvalue()


def encoding(work: list[BatchWrite], args: argparse.Namespace) -> None:
    """The records' encoding now against what they cost in the pickle before, alternating, µs/op."""
    spent: dict[str, list[float]] = {"now: idempotency_records.encode": [], "before: in the pickle": []}
    # the service runs with what recovery loaded frozen (pipeline: gc.freeze): so does this, or a full
    # collection over the state machine's heap lands in whichever step allocates next
    gc.collect()
    gc.freeze()
    repeats = 5
    for i, write in enumerate(work):
        without = dataclasses.replace(write, idempotency=[])
        for name in spent if i % 2 == 0 else reversed(list(spent)):
            started = time.process_time()
            for _ in range(repeats):
                if name.startswith("now"):
                    idempotency_records.encode(write.idempotency)
                else:
                    format_2_payload(write)
            took = time.process_time() - started
            if name.startswith("before"):
                started = time.process_time()
                for _ in range(repeats):
                    format_2_payload(without)
                took -= time.process_time() - started
            spent[name].append(took / repeats / len(write.idempotency) * 1e6)
    per_chunk = max(1, len(work) // args.chunks)
    for name, values in spent.items():
        chunks = [
            sum(values[k : k + per_chunk]) / len(values[k : k + per_chunk]) for k in range(0, len(values), per_chunk)
        ]
        print(f"{name:<34} {sum(values) / len(values):5.2f} µs/op [{min(chunks):.2f}..{max(chunks):.2f}]")
    sizes = [idempotency_records.encode(w.idempotency) for w in work]
    operations = sum(len(w.idempotency) for w in work)
    print(
        f"records' row: keys {sum(len(r.keys) for r in sizes if r) / operations:.1f} B/op, "
        f"records {sum(len(r.records) for r in sizes if r) / operations:.1f} B/op; "
        f"payload format 2 {sum(len(format_2_payload(w)) for w in work) / operations:.1f} B/op, "
        f"format 3 {sum(len(batch_log.encode(w)) for w in work) / operations:.1f} B/op"
    )


def database_url(url: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{name}"))


async def migrated(admin: asyncpg.Connection, url: str, name: str, through: int | None) -> asyncpg.Connection:
    await admin.execute(f'CREATE DATABASE "{name}"')
    c = await asyncpg.connect(database_url(url, name))
    if through is None:
        await store.migrate(c)
        return c
    for path in sorted(store.MIGRATIONS.glob("*.sql")):
        if int(path.name.split("_", 1)[0]) <= through:
            await c.execute(path.read_text())
    return c


async def copy_records(c: asyncpg.Connection, write: BatchWrite) -> None:
    stream = CopyEncoder("idempotency_keys", ROWS_COPY)
    stream.add(write.idempotency, {"created_at": write.created_at})
    async with c.transaction():
        await copy_rows(c, stream, 60.0)


async def measure(url: str, args: argparse.Namespace) -> None:
    work = writes(args)
    encoding(work[args.prefill_batches :], args)
    admin = await asyncpg.connect(url)
    rows = await migrated(admin, url, "idempotency_rows", 22)
    batches_db = await migrated(admin, url, "idempotency_batches", None)
    try:
        fence_of = {}
        for c in (batches_db,):
            pid = c.get_server_pid()
            started = await c.fetchval("SELECT backend_start FROM pg_stat_get_activity(pg_backend_pid())")
            fence_of[c] = (0, pid, started)
        payloads = [batch_log.encode(w) for w in work]
        payloads_before = [format_2_payload(w) for w in work]
        next_batch_id = 0

        async def run(variant: str, i: int) -> None:
            nonlocal next_batch_id
            write = work[i]
            if variant == "rows: COPY":
                await copy_records(rows, write)
                return
            next_batch_id += 1
            payload = payloads[i]
            if variant == "append before":
                write, payload = dataclasses.replace(write, idempotency=[]), payloads_before[i]
            await batch_log.append(batches_db, fence_of[batches_db], next_batch_id, write, payload, 60.0)

        for i in range(args.prefill_batches):
            for variant in VARIANTS[:2]:
                await run(variant, i)
        for c in (rows, batches_db):
            await c.execute("VACUUM ANALYZE")
        await admin.execute("CHECKPOINT")
        spent = {v: [] for v in VARIANTS}
        wal = {v: [] for v in VARIANTS}
        for i in range(args.prefill_batches, len(work)):
            order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                c = rows if variant.startswith("rows") else batches_db
                pid = c.get_server_pid()
                before_wal = await c.fetchval(LSN)
                before = cpu_seconds(pid)
                await run(variant, i)
                spent[variant].append(cpu_seconds(pid) - before)
                wal[variant].append(await c.fetchval(LSN) - before_wal)
        operations = [len(w.idempotency) for w in work[args.prefill_batches :]]
        total = sum(operations)
        per_chunk = max(1, len(operations) // args.chunks)

        def figures(values: list[float], scale: float) -> str:
            chunks = [
                sum(values[k : k + per_chunk]) / sum(operations[k : k + per_chunk]) * scale
                for k in range(0, len(values), per_chunk)
            ]
            return f"{sum(values) / total * scale:7.2f} [{min(chunks):.2f}..{max(chunks):.2f}]"

        print(
            f"Postgres backend per operation ({len(operations)} batches, {total / len(operations):.0f} records each):"
        )
        for variant in VARIANTS:
            print(f"  {variant:<18} CPU µs/op {figures(spent[variant], 1e6)}   WAL B/op {figures(wal[variant], 1.0)}")
        added = [a - b for a, b in zip(spent["append now"], spent["append before"])]
        added_wal = [a - b for a, b in zip(wal["append now"], wal["append before"])]
        print(f"  {'now - before':<18} CPU µs/op {figures(added, 1e6)}   WAL B/op {figures(added_wal, 1.0)}")
    finally:
        await rows.close()
        await batches_db.close()
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="batches counted, of 1,000 operations [30]")
    parser.add_argument("--prefill-batches", type=int, default=200, help="batches of records written first [200]")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--plain", action="store_true", help="no program in force")
    args = parser.parse_args()
    harness.on_embedded_postgres("points-idempotency-write-", lambda url: measure(url, args))


if __name__ == "__main__":
    main()
