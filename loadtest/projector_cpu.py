"""The projector child's work on its own: CPU per operation of the child's Python (decode of the log's
payloads, Store._write_many's rows and asyncpg's encoding) and of Postgres's backend for those rows.

The batches are the state machine's own (loadtest.bench_state_machine: 1,000 operations, 70% earn / 30%
redeem, Zipf members, ops/program.example.json in force unless --plain). A database of its own on
DATABASE_URL's server (else an embedded Postgres in a temporary directory) gets every migration of this
tree; the first --prefill-batches batches are written by `Store._write_many` (--group to a transaction),
so members have lots and rules rows. Then each counted group of --group batches is what the child does
with it: its payloads (batch_log.encode, done beforehand, not counted) decoded (batch_log.decode), then
`Store._write_many` in one transaction on one connection, committed, under the projection's planner
settings (store.PROJECTION_PLANNER, which project_batches's first statement sets). Measured around the decode and
around the write: this process's CPU (time.process_time: its own /proc schedstat lags a tick) and the backend's (/proc/<pid>/schedstat:
Postgres on this machine only), and WAL bytes (pg_current_wal_insert_lsn); and the whole counted loop's
CPU of this process (the collector's passes between groups included, and the WAL probes). With --statements, the
backend's CPU and WAL per statement (loadtest.projection_write's Probe; its probes cost the client CPU,
so the client figure is then not the child's), the rows each wrote (its command tag) and the CPU a row.
Every --checkpoint-every batches, the balance checkpoint's fold (Store.fold_range) over the transactions projected since the last: its backend CPU and WAL. At the
end, each table's inserts, updates (HOT among them) and deletes (pg_stat_user_tables) and heap size.

    .venv/bin/python -m loadtest.projector_cpu [--batches 40] [--prefill-batches 40] [--group 1]
        [--checkpoint-every 10] [--plain] [--statements]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import time
import urllib.parse

import asyncpg

from loadtest import harness
from loadtest.bench_state_machine import NOW_US, batches, machine
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from loadtest.projection_write import LSN, Probe, migrations
from processor import batch_log, projector
from processor.state_machine import IdAllocator
from processor.store import PROJECTION_PLANNER, Store

FIRST_TRANSACTION_ID = 1_000_000_000


class StatementProbe(Probe):
    """Probe with each statement named by its verb and table (lots: the DELETE, COPY and upsert apart)."""

    @staticmethod
    def table(sql: str) -> str:
        verb = sql.split(None, 1)[0].upper()
        return f"{verb} {Probe.table(sql)}"

    def __init__(self, connection: asyncpg.Connection) -> None:
        super().__init__(connection)
        self.rows: dict[str, int] = {}  # statement -> rows it wrote (its command tag's count) while counting

    async def timed(self, table: str, call):
        result = await super().timed(table, call)
        if self.counting:
            self.rows[table] = self.rows.get(table, 0) + tag_rows(result)
        return result

    async def copy_to_table(self, table: str, **kwargs):
        return await self.timed(f"COPY {table}", self.connection.copy_to_table(table, **kwargs))


def tag_rows(result) -> int:
    """The rows a statement wrote, from its command tag ("COPY 1150", "INSERT 0 70", "MERGE 404",
    "DELETE 3"); 0 for what returns no tag (a fetch)."""
    if not isinstance(result, str):
        return 0
    last = result.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def untimed(_: str) -> None:
    pass


async def measure(url: str, args: argparse.Namespace) -> None:
    writer = Store.__new__(Store)  # _write_many reads nothing of the store's but its own methods
    m = machine(not args.plain, args.members, args.merchants)
    m.ids = IdAllocator(FIRST_TRANSACTION_ID, FIRST_TRANSACTION_ID)
    total = args.prefill_batches + args.batches
    work = batches(total, args.members, args.merchants, seed=args.seed)
    payloads = []
    operations = []  # each batch's (the payload of format 3 decodes without its idempotency records)
    for i in range(total):
        _, batch_write = m.apply(work[i], {}, NOW_US + i * 1_000_000)
        m.commit()
        payloads.append(batch_log.encode(batch_write))
        operations.append(batch_log.operation_count(batch_write))
    database = f"projector_cpu_{os.getpid()}"
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE DATABASE {database}")
    try:
        c = await asyncpg.connect(urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{database}")))
        for _, sql in migrations():
            await c.execute(sql)
        # the machine's operator and merchant accounts (ids below 1,000: loadtest.bench_state_machine), which
        # the checkpoint's fold updates (the members' are inserted by the projection)
        await c.execute(
            """INSERT INTO accounts (account_id, kind, owner_id, asset_code) OVERRIDING SYSTEM VALUE
               SELECT g, 'bench', g::text, 'POINTS' FROM generate_series(1, 999) g ON CONFLICT DO NOTHING"""
        )
        pid = c.get_server_pid()
        # the child's heap holds what it imported, not the machine and payloads made here: out of the
        # collector's sight, so its passes walk what the projection makes, as in the child
        del m, work
        gc.collect()
        gc.freeze()
        probe = StatementProbe(c) if args.statements else None
        # the child's collector regime around a projection: this tree's (projector.collector_paused), or
        # none (a tree before it)
        paused = getattr(projector, "collector_paused", contextlib.nullcontext)
        decode_cpu = write_cpu = backend_cpu = 0.0
        wal = 0
        counted = 0
        loop_started = 0.0
        fold = Store.fold_range
        checkpoint_cpu = 0.0
        checkpoint_wal = 0
        checkpointed = FIRST_TRANSACTION_ID - 1
        for start in range(0, total, args.group):
            counting = start >= args.prefill_batches
            if counting and not loop_started:
                loop_started = time.process_time()
            if args.checkpoint_every and start % args.checkpoint_every == 0:
                # the balance checkpoint (Store.write_checkpoint's fold) over what was projected since the last
                through = await c.fetchval("SELECT coalesce(max(transaction_id), $1) FROM transactions", checkpointed)
                w0 = await c.fetchval(LSN)
                b0 = cpu_seconds(pid)
                async with c.transaction():
                    await fold(c, checkpointed, through, 60.0)
                b1 = cpu_seconds(pid)
                w1 = await c.fetchval(LSN)
                if counting:
                    checkpoint_cpu += b1 - b0
                    checkpoint_wal += w1 - w0
                checkpointed = through
            group = payloads[start : start + args.group]
            w0 = await c.fetchval(LSN)
            b0 = cpu_seconds(pid)
            c0 = time.process_time()
            with paused():
                writes = [batch_log.decode(start + k + 1, batch_log.FORMAT_VERSION, p) for k, p in enumerate(group)]
                c1 = time.process_time()
                transaction = c.transaction()
                await transaction.start()
                # the projection's planner settings, as project_batches's first statement sets them
                # (without them its keyed MERGEs and DELETE were planned as hash joins over a scan of the
                # whole table: not the plans the projector runs)
                await c.execute(f"SELECT {PROJECTION_PLANNER}")
                if probe is not None:
                    probe.counting = counting
                await Store._write_many(writer, probe or c, writes, 60.0, untimed)
                await transaction.commit()
                del writes
            c3 = time.process_time()
            b1 = cpu_seconds(pid)
            w1 = await c.fetchval(LSN)
            c2 = c1
            if counting:
                decode_cpu += c1 - c0
                write_cpu += c3 - c2
                backend_cpu += b1 - b0
                wal += w1 - w0
                counted += sum(operations[start : start + args.group])
        loop_cpu = time.process_time() - loop_started  # the collector's passes after each group included
        await c.execute("SELECT pg_stat_force_next_flush()")
        await c.execute("SELECT 1")
        await asyncio.sleep(1.0)
        tables = await c.fetch(
            """SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, pg_relation_size(relid) AS heap
               FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY relname"""
        )
        await c.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await admin.close()
    us = 1e6 / counted
    print(
        f"{counted:,} operations counted, groups of {args.group}, "
        f"{'plain' if args.plain else 'program in force'}, prefill {args.prefill_batches} batches"
    )
    print(
        f"child: decode {decode_cpu * us:.2f} µs/op, write {write_cpu * us:.2f} µs/op, "
        f"sum {(decode_cpu + write_cpu) * us:.2f}, whole loop {loop_cpu * us:.2f}; Postgres backend {backend_cpu * us:.2f} µs/op; "
        f"WAL {wal / counted:.0f} B/op"
    )
    if args.checkpoint_every:
        print(
            f"balance checkpoint every {args.checkpoint_every} batches: Postgres backend "
            f"{checkpoint_cpu * us:.2f} µs/op, WAL {checkpoint_wal / counted:.0f} B/op"
        )
    print("tables (the whole run):")
    for t in tables:
        print(
            f"  {t['relname']:<20} ins {t['n_tup_ins']:>8} upd {t['n_tup_upd']:>7} (HOT {t['n_tup_hot_upd']:>7}) "
            f"del {t['n_tup_del']:>7}  heap {t['heap'] / 2**20:6.1f} MB"
        )
    if probe is not None:
        print(f"  {'statement (table)':<22} {'µs/op':>7} {'WAL B/op':>9} {'stmts':>6} {'rows/op':>8} {'µs/row':>7}")
        for table, (cpu, written, statements) in probe.costs.items():
            rows = probe.rows.get(table, 0)
            per_row = f"{cpu * 1e6 / rows:7.2f}" if rows else f"{'-':>7}"
            print(
                f"  {table:<22} {cpu * us:7.2f} {written / counted:9.1f} {statements:6d} {rows / counted:8.2f} {per_row}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--prefill-batches", type=int, default=40)
    parser.add_argument(
        "--group", type=int, default=1, help="batches a projection transaction [1: what SubmitBatch load forms]"
    )
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="a balance checkpoint every N batches (0: none) [10]"
    )
    parser.add_argument("--plain", action="store_true", help="no program in force")
    parser.add_argument("--statements", action="store_true", help="Postgres CPU and WAL per statement")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL")
    started = time.perf_counter()
    if url:
        asyncio.run(measure(url, args))
    else:
        harness.on_embedded_postgres("points-projector-cpu-", lambda u: measure(u, args))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
