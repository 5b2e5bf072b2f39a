"""The projection's rows in Postgres, statement by statement and index by index: Postgres CPU and WAL
bytes per operation of each COPY and statement `Store._write_many` runs (transactions, entries,
idempotency_keys, holds, members and accounts, the program rules' rows), into tables filled beforehand,
on one embedded Postgres (the service's settings, postgres_settings.embedded) in a temporary directory.

The batches are the state machine's own (loadtest.bench_state_machine: 1,000 operations, 70% earn / 30%
redeem, Zipf members, ops/program.example.json in force unless --plain), so the rows are what the
projector writes. A template database gets the migrations up to --template-through and is filled: the
first --prefill-batches batches are written by `Store._write_many` (10 to a transaction), then
transactions, entries and idempotency_keys are copied --copies times at lower transaction ids and
earlier times (as an older history of the same members), reindexed and vacuumed. Each variant is a
copy of that template (CREATE DATABASE ... TEMPLATE) changed by its SQL:

    base            nothing
    migrations      this tree's migrations after --template-through (e.g. 0019)
    -NAME           DROP the index NAME (a primary key or unique constraint: DROP CONSTRAINT)
    NAME            the SQL given as --variant-sql NAME=SQL
    slots           transactions' two text-keyed indexes on integer columns instead: member_slot and
                    merchant_slot (int4, dense, in order of first appearance, as a service interning ids
                    would hand them out), (member_slot, transaction_id DESC) and (merchant_slot, created_at,
                    transaction_id); the measured COPY carries the two columns (issue 14, the narrow row)
    hash            the same two indexes keyed by hashtext(member_id) / hashtext(merchant_id): int4 keys
                    with no new column or state (a read adds hashtext(x) = hashtext($1) AND x = $1)
    hash-member, hash-merchant    one of the two only

Each measured batch is written to every variant (the order rotating batch by batch), each in one
transaction of its own, committed. Around every statement: the backend's CPU (/proc/<pid>/schedstat,
so Postgres on this machine only) and WAL bytes (pg_current_wal_insert_lsn before and after; the probes
themselves write none and run outside the CPU window). The first --warmup batches are not counted.
Printed per variant: µs of backend CPU and WAL bytes per operation for each statement (named by its
table), rows per operation, the whole transaction's; then, for each variant, its difference from base
(an index's cost is base minus the variant without it); then each table's and index's size.

    .venv/bin/python -m loadtest.projection_write [--batches 40] [--prefill-batches 100] [--copies 10]
        [--variants base,-transactions_member_newest,migrations,slots,hash] [--plain] [--checkpoint-every 0]
        [--uuid-members] [--template-through 18]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
import urllib.parse
import uuid
from typing import Any

import asyncpg

from loadtest import harness
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from loadtest.bench_state_machine import NOW_US, batches, machine
from processor.state_machine import IdAllocator
from fastpath.copy_binary import CopyEncoder
from processor.domain import ASSET_POINTS
from processor.store import MIGRATIONS, NO_LEGS, PROJECTION_PLANNER, TRANSACTIONS_COPY, Store

LSN = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
# the statement's table: COPY's argument, else the first table an INSERT, UPDATE, MERGE or DELETE names
TABLE = re.compile(r"\b(?:INSERT INTO|UPDATE|MERGE INTO|DELETE FROM)\s+(\w+)", re.IGNORECASE)
# the first transaction id the measured machine hands out: the copies of the prefill go below it
FIRST_TRANSACTION_ID = 1_000_000_000
PROJECTION_TABLES = (
    "transactions",
    "entries",
    "idempotency_keys",
    "holds",
    "members",
    "accounts",
    "member_programs",
    "lots",
    "lot_consumptions",
    "earn_rules",
)


# a schema before migration 0022 (--template-through 21, the variant base): the transactions row without
# its legs, and an entries row per leg, as _write_many wrote them then
UNPACKED_TRANSACTIONS_COPY = tuple(c for c in TRANSACTIONS_COPY if not c[0].startswith("leg_"))
ENTRIES_COPY = (
    ("transaction_id", "bigint", 0),
    ("account_id", "bigint", 1),
    ("asset_code", "text", 3),  # a 3-item entry: POINTS
    ("amount", "bigint", 2),
)
HAS_LEGS = """SELECT EXISTS (SELECT 1 FROM pg_attribute
                             WHERE attrelid = 'transactions'::regclass AND attname = 'leg_accounts')"""
# since 0023 the idempotency records are one row per batch, written by the append (not the projection):
# idempotency_keys is a view over them, and the prefill copies none
IS_TABLE = "SELECT relkind IN ('r', 'p') FROM pg_class WHERE oid = $1::regclass"


def unpacked_streams(batches: list) -> tuple[Any, Any]:
    """The transactions and entries COPY streams of a schema before 0022, for these batches."""
    transactions = CopyEncoder("transactions", UNPACKED_TRANSACTIONS_COPY)
    entries = CopyEncoder("entries", ENTRIES_COPY)
    for b in batches:
        transactions.add(
            b.transactions,
            {"asset_code": ASSET_POINTS, "created_at": b.created_at, "program_version": None},
            lookup=b.member_balances_after,
        )
        entries.add(b.entries, {"asset_code": ASSET_POINTS})
    return transactions, entries


class Probe:
    """The connection `_write_many` is handed: each COPY and statement runs on the real one between
    two WAL probes, its backend CPU and WAL bytes added to `costs[table]` while `counting`."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.pid = connection.get_server_pid()
        self.costs: dict[str, list[float]] = {}  # table -> [cpu seconds, WAL bytes, statements]
        self.counting = False
        self.slots: Slots | None = None  # the variant "slots"
        self.batch: Any = None  # the BatchWrite being written
        self.batches: list = []  # or the BatchWrites being written (the template's fill)
        self.unpacked = False  # a schema before 0022: entries rows, not leg arrays

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)

    async def timed(self, table: str, call):
        before_wal = await self.connection.fetchval(LSN)
        before = cpu_seconds(self.pid)
        result = await call
        used = cpu_seconds(self.pid) - before
        written = await self.connection.fetchval(LSN) - before_wal
        if self.counting:
            cost = self.costs.setdefault(table, [0.0, 0.0, 0])
            cost[0] += used
            cost[1] += written
            cost[2] += 1
        return result

    @staticmethod
    def table(sql: str) -> str:
        found = TABLE.search(sql)
        return found.group(1) if found else "select"

    async def copy_records_to_table(self, table: str, **kwargs):
        return await self.timed(table, self.connection.copy_records_to_table(table, **kwargs))

    async def copy_to_table(self, table: str, **kwargs):
        # _write_many's binary COPY (store.copy_rows); the variant "slots" sends transactions with its two
        # integer columns, encoded here before the CPU window (the backend's CPU is what is measured)
        if table == "transactions" and self.slots is not None:
            kwargs = self.slots.transactions_copy(self.batch)
        if table == "transactions" and self.unpacked:
            # encoded before the CPU window, as _write_many's own stream is
            transactions, entries = unpacked_streams(self.batches or [self.batch])
            result = await self.timed(
                table,
                self.connection.copy_to_table(
                    table, source=transactions.finish(), columns=list(transactions.names), format="binary"
                ),
            )
            if entries.rows:
                await self.timed(
                    "entries",
                    self.connection.copy_to_table(
                        "entries", source=entries.finish(), columns=list(entries.names), format="binary"
                    ),
                )
            return result
        return await self.timed(table, self.connection.copy_to_table(table, **kwargs))

    async def execute(self, sql: str, *args, **kwargs):
        return await self.timed(self.table(sql), self.connection.execute(sql, *args, **kwargs))

    async def executemany(self, sql: str, *args, **kwargs):
        return await self.timed(self.table(sql), self.connection.executemany(sql, *args, **kwargs))

    async def fetchval(self, sql: str, *args, **kwargs):
        return await self.timed(self.table(sql), self.connection.fetchval(sql, *args, **kwargs))

    async def fetch(self, sql: str, *args, **kwargs):
        return await self.timed(self.table(sql), self.connection.fetch(sql, *args, **kwargs))

    async def fetchrow(self, sql: str, *args, **kwargs):
        return await self.timed(self.table(sql), self.connection.fetchrow(sql, *args, **kwargs))


class Slots:
    """The integer slots of the variant "slots": member and merchant ids interned to dense int4, in order
    of first appearance (those of the template from its copy's slot tables, new ones handed out here),
    sent in the transactions COPY as two more columns."""

    COLUMNS = TRANSACTIONS_COPY + (("member_slot", "integer", 11), ("merchant_slot", "integer", 12))

    def __init__(self, members: dict[str, int], merchants: dict[str, int]) -> None:
        self.members = members
        self.merchants = merchants

    def slot(self, slots: dict[str, int], name: str) -> int:
        found = slots.get(name)
        if found is None:
            found = slots[name] = len(slots) + 1
        return found

    def transactions_copy(self, batch: Any) -> dict[str, Any]:
        stream = CopyEncoder("transactions", self.COLUMNS)
        pad = (None,) * 11
        rows = [
            (tuple(t) + pad)[:11] + (self.slot(self.members, t[3]), self.slot(self.merchants, t[2]))
            for t in batch.transactions
        ]
        stream.add(
            rows,
            {"asset_code": ASSET_POINTS, "created_at": batch.created_at, "program_version": None, **NO_LEGS},
            lookup=batch.member_balances_after,
            legs=batch.entries,
        )
        return {"source": stream.finish(), "columns": list(stream.names), "format": "binary", "timeout": 60.0}


# transactions' two text-keyed indexes on int4 slot columns: the template's ids get slots in order of
# first appearance; VACUUM FULL after the UPDATE so the heap is as compact as base's
SLOTS_SQL = [
    """ALTER TABLE transactions ADD COLUMN member_slot integer, ADD COLUMN merchant_slot integer;
       CREATE TABLE member_slots (member_id text PRIMARY KEY, slot integer NOT NULL UNIQUE);
       CREATE TABLE merchant_slots (merchant_id text PRIMARY KEY, slot integer NOT NULL UNIQUE);
       INSERT INTO member_slots SELECT member_id, row_number() OVER (ORDER BY min(transaction_id))
           FROM transactions GROUP BY member_id;
       INSERT INTO merchant_slots SELECT merchant_id, row_number() OVER (ORDER BY min(transaction_id))
           FROM transactions GROUP BY merchant_id;
       UPDATE transactions t SET member_slot = s.slot FROM member_slots s WHERE s.member_id = t.member_id;
       UPDATE transactions t SET merchant_slot = s.slot FROM merchant_slots s WHERE s.merchant_id = t.merchant_id;
       ALTER TABLE transactions ALTER COLUMN member_slot SET NOT NULL, ALTER COLUMN merchant_slot SET NOT NULL;
       DROP INDEX transactions_member_newest;
       DROP INDEX transactions_merchant_created""",
    "VACUUM FULL transactions",
    """CREATE INDEX transactions_member_slot ON transactions (member_slot, transaction_id DESC);
       CREATE INDEX transactions_merchant_slot ON transactions (merchant_slot, created_at, transaction_id)""",
]
HASH_MEMBER_SQL = """DROP INDEX transactions_member_newest;
    CREATE INDEX transactions_member_hash ON transactions (hashtext(member_id), transaction_id DESC)"""
HASH_MERCHANT_SQL = """DROP INDEX transactions_merchant_created;
    CREATE INDEX transactions_merchant_hash ON transactions (hashtext(merchant_id), created_at, transaction_id)"""
BUILT_IN = {
    "slots": SLOTS_SQL,
    "hash": [HASH_MEMBER_SQL, HASH_MERCHANT_SQL],
    "hash-member": [HASH_MEMBER_SQL],
    "hash-merchant": [HASH_MERCHANT_SQL],
}


def migrations() -> list[tuple[int, str]]:
    return [(int(p.name.split("_", 1)[0]), p.read_text()) for p in sorted(MIGRATIONS.glob("*.sql"))]


def database_url(url: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{name}"))


def untimed(_: str) -> None:
    pass


async def write(connection, work: list, writer: Store) -> None:
    async with connection.transaction():
        await connection.execute(f"SELECT {PROJECTION_PLANNER}")
        if not await connection.fetchval(HAS_LEGS):  # before migration 0022
            probe = Probe(connection)
            probe.unpacked, probe.batches = True, work
            connection = probe
        await Store._write_many(writer, connection, work, 60.0, untimed)


async def fill_template(url: str, m, work: list, args: argparse.Namespace, writer: Store) -> None:
    """The template database: migrations up to --template-through, the prefill batches written by
    `_write_many`, then the copies of the journal's big tables, reindexed, vacuumed and analysed."""
    c = await asyncpg.connect(database_url(url, "projection_template"))
    try:
        for version, sql in migrations():
            if version <= args.template_through:
                await c.execute(sql)
        group: list = []
        for i in range(args.prefill_batches):
            _, batch_write = m.apply(work[i], {}, NOW_US + i * 1_000_000)
            m.commit()
            group.append(batch_write)
            if len(group) == 10 or i == args.prefill_batches - 1:
                await write(c, group, writer)
                group = []
        span = await c.fetchval("SELECT max(transaction_id) + 1 - $1 FROM transactions", FIRST_TRANSACTION_ID)
        packed = await c.fetchval(HAS_LEGS)
        legs = ", leg_accounts, leg_amounts, leg_assets" if packed else ""
        seconds = args.prefill_batches + 1
        for copy in range(1, args.copies + 1):
            # an older history of the same members: ids and times below the prefill's, in the same order
            shift, back = copy * span, dt.timedelta(seconds=copy * seconds)
            await c.execute(
                f"""INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                       purchase_amount, authorization_id, original_transaction_id, refunded, idempotency_key,
                       created_at, fee, program_version, member_balance_after{legs})
                   SELECT transaction_id - $1, kind, merchant_id, member_id, asset_code, amount, purchase_amount,
                          authorization_id, original_transaction_id - $1, refunded, idempotency_key || '~' || $3,
                          created_at - $2::interval, fee, program_version, member_balance_after{legs}
                   FROM transactions WHERE transaction_id >= $4 ORDER BY transaction_id""",
                shift,
                back,
                str(copy),
                FIRST_TRANSACTION_ID,
            )
            if not packed:
                await c.execute(
                    """INSERT INTO entries (transaction_id, account_id, asset_code, amount)
                       SELECT transaction_id - $1, account_id, asset_code, amount
                       FROM entries WHERE transaction_id >= $2 ORDER BY entry_id""",
                    shift,
                    FIRST_TRANSACTION_ID,
                )
            if not await c.fetchval(IS_TABLE, "idempotency_keys"):
                continue
            await c.execute(
                """INSERT INTO idempotency_keys (merchant_id, idempotency_key, method, request, outcome, response,
                       message, created_at)
                   SELECT merchant_id, idempotency_key || '~' || $2, method, request, outcome, response, message,
                          created_at - $1::interval
                   FROM idempotency_keys i
                   WHERE created_at >= (SELECT min(created_at) FROM transactions WHERE transaction_id >= $3)
                   ORDER BY created_at""",
                back,
                str(copy),
                FIRST_TRANSACTION_ID,
            )
        for table in PROJECTION_TABLES:
            if await c.fetchval(IS_TABLE, table):  # entries is a view since 0022, idempotency_keys since 0023
                await c.execute(f"REINDEX TABLE {table}")
        await c.execute("VACUUM ANALYZE")
    finally:
        await c.close()


async def variant_sql(c: asyncpg.Connection, name: str, args: argparse.Namespace) -> list[str]:
    if name == "base":
        return []
    if name == "migrations":
        return [sql for version, sql in migrations() if version > args.template_through]
    if name in args.variant_sql:
        return [args.variant_sql[name]]
    if name in BUILT_IN:
        return BUILT_IN[name]
    if name.startswith("-"):
        index = name[1:]
        table = await c.fetchval("SELECT conrelid::regclass::text FROM pg_constraint WHERE conname = $1", index)
        if table is not None:
            return [f"ALTER TABLE {table} DROP CONSTRAINT {index} CASCADE"]
        if await c.fetchval("SELECT to_regclass($1) IS NOT NULL", index):
            return [f"DROP INDEX {index}"]
        raise SystemExit(f"variant {name}: no index or constraint {index} in the template")
    raise SystemExit(f"variant {name}: base, migrations, -INDEX or a --variant-sql name")


async def write_in_turn(
    probes: dict[str, Any], names: list[str], turn: int, batch_write: Any, writer: Store, counting: bool, totals: dict
) -> None:
    """Writes one batch to every variant in turn (the order rotating with `turn`), each in a transaction
    of its own, committed; while `counting`, adds each variant's backend CPU seconds and WAL bytes of the
    whole transaction (its probes' own statements included) to totals[name]."""
    turn %= len(names)
    for name in names[turn:] + names[:turn]:
        probe = probes[name]
        probe.counting = counting
        probe.batch = batch_write
        before_wal = await probe.connection.fetchval(LSN)
        before = cpu_seconds(probe.pid)
        transaction = probe.connection.transaction()
        await transaction.start()
        # the projection's planner settings, as project_batches's first statement sets them
        await probe.connection.execute(f"SELECT {PROJECTION_PLANNER}")
        await Store._write_many(writer, probe, [batch_write], 60.0, untimed)
        await probe.timed("commit", transaction.commit())
        used = cpu_seconds(probe.pid) - before
        written = await probe.connection.fetchval(LSN) - before_wal
        if counting:
            totals[name][0] += used
            totals[name][1] += written


async def measure(url: str, args: argparse.Namespace) -> None:
    names = args.variants.split(",")
    if names[0] != "base":
        names.insert(0, "base")
    writer = Store.__new__(Store)  # _write_many reads nothing of the store's but its own methods
    m = machine(not args.plain, args.members, args.merchants)
    m.ids = IdAllocator(FIRST_TRANSACTION_ID, FIRST_TRANSACTION_ID)
    work = batches(args.prefill_batches + args.batches, args.members, args.merchants, seed=args.seed)
    if args.uuid_members:
        # member ids as many services have them (36 characters, no order), not "member-123": an index
        # keyed by the text is wider by the difference, one keyed by an int4 is not
        for batch in work:
            for op in batch:
                op.member_id = op.request["member_id"] = str(uuid.uuid5(uuid.NAMESPACE_OID, op.member_id))
    admin = await asyncpg.connect(url)
    started = time.perf_counter()
    await admin.execute("CREATE DATABASE projection_template")
    await fill_template(url, m, work, args, writer)
    collation = await admin.fetchval("SELECT datcollate FROM pg_database WHERE datname = current_database()")
    print(f"template filled in {time.perf_counter() - started:.0f} s; database collation {collation}")
    probes: dict[str, Probe] = {}
    for name in names:
        database = "v_" + re.sub(r"\W", "_", name)
        await admin.execute(f'CREATE DATABASE "{database}" TEMPLATE projection_template')
        c = await asyncpg.connect(database_url(url, database))
        for sql in await variant_sql(c, name, args):
            await c.execute(sql)
        await c.execute("VACUUM ANALYZE")
        probes[name] = Probe(c)
        probes[name].unpacked = not await c.fetchval(HAS_LEGS)
        if name == "slots":
            probes[name].slots = Slots(
                {r[0]: r[1] for r in await c.fetch("SELECT member_id, slot FROM member_slots")},
                {r[0]: r[1] for r in await c.fetch("SELECT merchant_id, slot FROM merchant_slots")},
            )
    await admin.execute("CHECKPOINT")
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name in names}
    rows: dict[str, int] = {}
    for i in range(args.prefill_batches, args.prefill_batches + args.batches):
        _, batch_write = m.apply(work[i], {}, NOW_US + i * 1_000_000)
        m.commit()
        counting = i >= args.prefill_batches + args.warmup
        if counting:
            for table, count in (
                ("transactions", len(batch_write.transactions)),
                ("entries", len(batch_write.entries)),
                ("idempotency_keys", len(batch_write.idempotency)),
                ("holds", len(batch_write.new_holds)),
                ("members", len(batch_write.new_members)),
            ):
                rows[table] = rows.get(table, 0) + count
        if args.checkpoint_every and i % args.checkpoint_every == 0:
            # as a timed checkpoint does: the next change of each page after it writes the whole page to
            # the WAL (a full-page image), so how many pages a batch touches counts
            await admin.execute("CHECKPOINT")
        await write_in_turn(probes, names, i, batch_write, writer, counting, totals)
    counted = (args.batches - args.warmup) * 1_000
    print(
        f"{args.batches - args.warmup} batches of 1,000 counted ({args.warmup} warm-up), "
        f"{'plain' if args.plain else 'program in force'}, members {args.members}, prefill "
        f"{args.prefill_batches} batches x {args.copies + 1}{', UUID member ids' if args.uuid_members else ''}"
    )
    print("rows per operation: " + ", ".join(f"{t} {n / counted:.2f}" for t, n in rows.items()))
    base = probes["base"].costs
    tables = list(base)
    for name in names:
        probe = probes[name]
        cpu, wal = totals[name]
        print(
            f"\n{name}: whole transaction (probes' own statements included) {cpu / counted * 1e6:.1f} µs/op, "
            f"WAL {wal / counted:.0f} B/op"
        )
        print(f"  {'statement (table)':<22} {'µs/op':>7} {'WAL B/op':>9} {'stmts':>6}   vs base: µs/op  WAL B/op")
        for table in tables + [t for t in probe.costs if t not in base]:
            mine = probe.costs.get(table, [0.0, 0.0, 0])
            theirs = base.get(table, [0.0, 0.0, 0])
            print(
                f"  {table:<22} {mine[0] / counted * 1e6:7.2f} {mine[1] / counted:9.1f} {mine[2]:6d}   "
                f"{(mine[0] - theirs[0]) / counted * 1e6:+13.2f} {(mine[1] - theirs[1]) / counted:+9.1f}"
            )
        summed = sum(v[0] for v in probe.costs.values()) / counted * 1e6
        summed_base = sum(v[0] for v in base.values()) / counted * 1e6
        wal_summed = sum(v[1] for v in probe.costs.values()) / counted
        wal_base = sum(v[1] for v in base.values()) / counted
        print(
            f"  {'sum of statements':<22} {summed:7.2f} {wal_summed:9.1f} {'':>6}   "
            f"{summed - summed_base:+13.2f} {wal_summed - wal_base:+9.1f}"
        )
    c = probes["base"].connection
    sizes = await c.fetch(
        """SELECT t.relname AS table_name, i.relname AS index_name,
                  pg_relation_size(t.oid) AS heap, pg_relation_size(i.oid) AS index_size, t.reltuples
           FROM pg_class t JOIN pg_index x ON x.indrelid = t.oid JOIN pg_class i ON i.oid = x.indexrelid
           WHERE t.relname = ANY($1::text[]) ORDER BY t.relname, i.relname""",
        list(PROJECTION_TABLES),
    )
    print("\nsizes in base (rows from the last ANALYZE):")
    for r in sizes:
        print(
            f"  {r['table_name']:<17} {r['reltuples']:>11,.0f} rows heap {r['heap'] / 2**20:7.1f} MB   "
            f"{r['index_name']:<34} {r['index_size'] / 2**20:7.1f} MB"
        )
    print("\ntransactions' indexes in each variant at the end (MB):")
    for name, probe in probes.items():
        found = await probe.connection.fetch(
            """SELECT i.relname, pg_relation_size(i.oid) AS size FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
               WHERE x.indrelid = 'transactions'::regclass AND pg_relation_size(i.oid) > 1048576 ORDER BY i.relname"""
        )
        print(f"  {name:<22} " + ", ".join(f"{r['relname']} {r['size'] / 2**20:.1f}" for r in found))
    for probe in probes.values():
        await probe.connection.close()
    await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prefill-batches", type=int, default=100)
    parser.add_argument("--copies", type=int, default=10, help="copies of the prefill's journal rows [10]")
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--plain", action="store_true", help="no program in force")
    parser.add_argument("--uuid-members", action="store_true", help="member ids as UUID strings (36 characters)")
    parser.add_argument("--template-through", type=int, default=18, help="the template's last migration [18]")
    parser.add_argument(
        "--variants",
        default="base",
        help="comma-separated: base, migrations (this tree's after --template-through), -INDEX (dropped) [base]",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="a CHECKPOINT before every N-th batch (0: none) [0]"
    )
    parser.add_argument(
        "--variant-sql",
        action="append",
        default=[],
        metavar="NAME=SQL",
        help="a variant NAME (list it in --variants) that runs SQL on its copy of the template",
    )
    args = parser.parse_args()
    args.variant_sql = dict(v.split("=", 1) for v in args.variant_sql)
    harness.on_embedded_postgres("points-projection-write-", lambda url: measure(url, args))


if __name__ == "__main__":
    main()
