"""Entries packed into their transaction's row, against entries stored row by row: Postgres CPU and WAL
bytes per operation of the projection's writes, and the time of the reads that use entries, on one
embedded Postgres (the service's settings) in a temporary directory (issue 14, "entries derived from the
transaction row rather than stored row by row").

    base    the schema as it is: a transactions row and ~3.6 entries rows (entries_transaction) per
            operation, each a binary COPY of its own (Store._write_many as the projector runs it)
    packed  each transaction's legs in its own row, three columns added to transactions:
            leg_accounts bigint[], leg_amounts bigint[] (in the legs' order) and leg_assets text[] (NULL
            when every leg is POINTS, the asset of all but the rare voucher legs); no entries table:
            `entries` is a VIEW over transactions (unnest ... WITH ORDINALITY) with the same columns, its
            entry_id synthetic (transaction_id * LEGS_MAX + the leg's ordinal), so every read's SQL is
            unchanged. The transactions COPY carries the arrays (binary, appended here in Python to the
            stream fastpath/copy_binary.pyx encodes: it has no array type yet); no entries COPY.

A template database gets every migration and is filled as loadtest/projection_write.py fills its
(the state machine's own batches: 1,000 operations, 70% earn / 30% redeem, Zipf members,
ops/program.example.json in force; --prefill-batches written by Store._write_many, then the journal
copied --copies times at lower ids and earlier times). `packed` is a copy of it with the entries moved
into the arrays, rewritten (VACUUM FULL) and analysed. Each measured batch is written to both, the order
alternating batch by batch, each in a transaction of its own, committed; around each statement the
backend's CPU (/proc/<pid>/schedstat) and WAL bytes (pg_current_wal_insert_lsn). Then the reads, in
turn, --reads times each: the balance checkpoint's tail (the last --tail-transactions transactions),
reconcile's whole-journal checks, ReverseTransaction's legs, a member's history and a merchant's
statement lines (the functions of processor/ themselves where they take a pool); printed: median and
range in ms, and with --plans FILE every read's EXPLAIN (ANALYZE) of both variants written to FILE.

    .venv/bin/python -m loadtest.entries_packed [--batches 30] [--prefill-batches 100] [--copies 10]
        [--reads 5] [--plans /tmp/entries-plans.txt] [--checkpoint-every 0]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg

from fastpath.copy_binary import CopyEncoder
from loadtest import harness
from loadtest.bench_state_machine import NOW_US, batches, machine
from loadtest.harness import precise_cpu_seconds as cpu_seconds
from loadtest.projection_write import FIRST_TRANSACTION_ID, LSN, Probe, database_url, fill_template
from processor import member_store
from processor.state_machine import IdAllocator
from processor.store import ENTRIES_COPY, Store

# the synthetic entry_id's factor: a transaction's legs are numbered 1..LEGS_MAX - 1 within it (the
# template's most is printed; the packing refuses a transaction with more)
LEGS_MAX = 64
POINTS = "POINTS"
INT8_OID = 20
TEXT_OID = 25
# binary COPY: the signature, flags and header extension (19 bytes); a tuple's field count; the trailer
COPY_HEADER_BYTES = 19
COPY_TRAILER = b"\xff\xff"

Legs = tuple[list[int], list[int], list[str] | None]


def legs_by_transaction(entries: Iterable[Sequence[Any]]) -> dict[int, Legs]:
    """A batch's entries (transaction_id, account_id, amount[, asset]) as each transaction's legs, in the
    entries' order: (account ids, amounts, assets or None when every leg is POINTS)."""
    legs: dict[int, Legs] = {}
    for entry in entries:
        accounts, amounts, assets = legs.setdefault(entry[0], ([], [], None))
        asset = entry[3] if len(entry) > 3 else POINTS
        if asset != POINTS and assets is None:
            assets = [POINTS] * len(accounts)
            legs[entry[0]] = (accounts, amounts, assets)
        accounts.append(entry[1])
        amounts.append(entry[2])
        if assets is not None:
            assets.append(asset)
    for transaction_id, (accounts, _, _) in legs.items():
        if len(accounts) >= LEGS_MAX:
            raise ValueError(f"transaction {transaction_id}: {len(accounts)} legs; the synthetic entry_id allows fewer")
    return legs


def array_field(values: Sequence[int] | Sequence[str] | None, element_oid: int) -> bytes:
    """One COPY binary field (length and value) holding a one-dimensional array, as Postgres's
    array_recv reads it: ndim, has-nulls, element type, then the dimension's length and lower bound
    (1), then each element's length and value; None is the field NULL (length -1)."""
    if values is None:
        return struct.pack("!i", -1)
    if element_oid == INT8_OID:
        elements = b"".join(struct.pack("!iq", 8, v) for v in values)
    elif element_oid == TEXT_OID:
        encoded = [str(v).encode() for v in values]
        elements = b"".join(struct.pack("!i", len(e)) + e for e in encoded)
    else:
        raise ValueError(f"element type {element_oid}: int8 (20) or text (25)")
    body = struct.pack("!iiiii", 1, 0, element_oid, len(values), 1) + elements
    return struct.pack("!i", len(body)) + body


def packed_fields(legs: Legs | None) -> bytes:
    """The three leg columns of one transaction's row (NULL arrays for a transaction with no legs)."""
    if legs is None:
        return array_field(None, INT8_OID) * 3
    accounts, amounts, assets = legs
    return array_field(accounts, INT8_OID) + array_field(amounts, INT8_OID) + array_field(assets, TEXT_OID)


def append_fields(source: bytes | memoryview, extra: Mapping[int, bytes], added: int, default: bytes) -> bytes:
    """A binary COPY stream with `added` more fields at the end of each tuple: extra[first field as a
    bigint] (the row's transaction_id), `default` for a row not in `extra`."""
    stream = bytes(source)
    out = [stream[:COPY_HEADER_BYTES]]
    at = COPY_HEADER_BYTES
    while True:
        (count,) = struct.unpack_from("!h", stream, at)
        if count == -1:
            break
        start = at + 2
        at = start
        key = None
        for field in range(count):
            (length,) = struct.unpack_from("!i", stream, at)
            if field == 0:
                if length != 8:
                    raise ValueError("the first field is not a bigint")
                (key,) = struct.unpack_from("!q", stream, at + 4)
            at += 4 + max(length, 0)
        out.append(struct.pack("!h", count + added))
        out.append(stream[start:at])
        out.append(extra.get(key, default) if key is not None else default)
    if stream[at:] != COPY_TRAILER:
        raise ValueError("the stream does not end with the COPY trailer")
    out.append(COPY_TRAILER)
    return b"".join(out)


PACK_SQL = f"""
ALTER TABLE transactions ADD COLUMN leg_accounts bigint[], ADD COLUMN leg_amounts bigint[],
    ADD COLUMN leg_assets text[];
UPDATE transactions t SET leg_accounts = l.accounts, leg_amounts = l.amounts, leg_assets = l.assets
FROM (SELECT transaction_id, array_agg(account_id ORDER BY entry_id) AS accounts,
             array_agg(amount ORDER BY entry_id) AS amounts,
             CASE WHEN bool_and(asset_code = '{POINTS}') THEN NULL
                  ELSE array_agg(asset_code ORDER BY entry_id) END AS assets
      FROM entries GROUP BY transaction_id) l
WHERE t.transaction_id = l.transaction_id;
"""
ENTRIES_VIEW = f"""
CREATE VIEW entries AS
SELECT t.transaction_id * {LEGS_MAX} + l.leg AS entry_id, t.transaction_id, l.account_id,
       coalesce(t.leg_assets[l.leg], '{POINTS}') AS asset_code, l.amount
FROM transactions t
CROSS JOIN LATERAL unnest(t.leg_accounts, t.leg_amounts) WITH ORDINALITY AS l(account_id, amount, leg)
"""
# the views over entries (and over those), dependents after what they depend on
DEPENDENT_VIEWS = """
WITH RECURSIVE v(oid, depth) AS (
  SELECT DISTINCT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
  WHERE d.refobjid = 'entries'::regclass AND r.ev_class <> 'entries'::regclass
  UNION
  SELECT DISTINCT r.ev_class, v.depth + 1 FROM v JOIN pg_depend d ON d.refobjid = v.oid
  JOIN pg_rewrite r ON r.oid = d.objid WHERE r.ev_class <> v.oid)
SELECT c.relname, c.relkind::text AS relkind, max(depth) AS depth, pg_get_viewdef(c.oid) AS definition
FROM v JOIN pg_class c ON c.oid = v.oid GROUP BY c.oid, c.relname, c.relkind ORDER BY max(depth)
"""


async def pack(c: asyncpg.Connection) -> int:
    """Moves the entries into their transactions' rows and replaces the table by the view (the views
    over it recreated as they were); returns the most legs a transaction has."""
    views = await c.fetch(DEPENDENT_VIEWS)
    if any(v["relkind"] != "v" for v in views):
        raise SystemExit(f"objects other than views depend on entries: {[v['relname'] for v in views]}")
    async with c.transaction():
        await c.execute(PACK_SQL)
        await c.execute("DROP TABLE entries CASCADE")
        await c.execute(ENTRIES_VIEW)
        for v in views:
            await c.execute(f"CREATE VIEW {v['relname']} AS {v['definition']}")
    await c.execute("VACUUM FULL transactions")
    await c.execute("ANALYZE")
    return int(await c.fetchval("SELECT coalesce(max(cardinality(leg_accounts)), 0) FROM transactions"))


class LegProbe(Probe):
    """Probe with the COPYs timed too; `packed` sends the legs in the transactions COPY and no entries."""

    def __init__(self, connection: asyncpg.Connection, packed: bool) -> None:
        super().__init__(connection)
        self.packed = packed
        self.legs: dict[int, bytes] = {}

    async def copy_to_table(self, table: str, *, source: bytes | memoryview, columns: list[str], **kwargs: Any) -> Any:
        if self.packed and table == "entries":
            return None
        if self.packed and table == "transactions":
            # a memoryview: asyncpg reads bytes as a file name
            source = memoryview(append_fields(source, self.legs, 3, packed_fields(None)))
            columns = [*columns, "leg_accounts", "leg_amounts", "leg_assets"]
        return await self.timed(table, self.connection.copy_to_table(table, source=source, columns=columns, **kwargs))


# --- reads ------------------------------------------------------------------------------------------

TAIL = "SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest FROM entries WHERE transaction_id > $1 GROUP BY account_id"
RECONCILE_SUMS = "SELECT asset_code, sum(amount) AS s FROM entries GROUP BY asset_code"
RECONCILE_PER_TRANSACTION = """SELECT transaction_id, asset_code, sum(amount) AS s FROM entries
    GROUP BY transaction_id, asset_code HAVING sum(amount) <> 0 ORDER BY transaction_id LIMIT 5"""
# reconcile's check without its LIMIT 5, counted: on a sound ledger it finds nothing and so scans every
# entry; the bench's accounts are not all in the accounts table, which would end it at the fifth row
RECONCILE_REFERENCES = """SELECT count(*) FROM (SELECT e.entry_id, e.transaction_id, e.account_id FROM entries e
    LEFT JOIN accounts a USING (account_id) LEFT JOIN transactions t USING (transaction_id)
    WHERE a.account_id IS NULL OR t.transaction_id IS NULL OR a.asset_code <> e.asset_code) x"""
BREAKAGE = """SELECT coalesce(sum(e.amount), 0)::bigint FROM transactions t
    JOIN entries e ON e.transaction_id = t.transaction_id
    JOIN accounts a ON a.account_id = e.account_id AND a.kind = 'operator_breakage'
    WHERE t.created_at >= $1 AND t.created_at < $2"""


# The same reads written over the arrays directly (what a reader rewritten for the packed row would run,
# not the view): the legs unnested in the select list (a ProjectSet, no function scan and tuplestore per
# row) and, where the view joined transactions to itself (the view's transactions row and the reader's),
# one scan of transactions.
ARRAY_SQL = {
    "checkpoint tail (fold)": """SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest
        FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount
              FROM transactions WHERE transaction_id > $1) l GROUP BY account_id""",
    "reconcile: sum by asset": f"""SELECT coalesce(asset_code, '{POINTS}') AS asset_code, sum(amount) AS s
        FROM (SELECT unnest(leg_amounts) AS amount, unnest(leg_assets) AS asset_code FROM transactions) l
        GROUP BY 1""",
    # a POINTS-only row (leg_assets NULL: nearly all) summed on its own, no GROUP BY over the journal (it
    # spilled 190 MB to disk at ~1M transactions); a row with other assets grouped by asset
    "reconcile: per transaction": f"""SELECT transaction_id, asset_code, s FROM (
          SELECT transaction_id, '{POINTS}' AS asset_code, (SELECT sum(x) FROM unnest(leg_amounts) x) AS s
          FROM transactions WHERE leg_assets IS NULL
          UNION ALL
          SELECT t.transaction_id, l.asset_code, sum(l.amount) FROM transactions t
          CROSS JOIN LATERAL unnest(t.leg_amounts, t.leg_assets) AS l(amount, asset_code)
          WHERE t.leg_assets IS NOT NULL GROUP BY 1, 2) c
        WHERE s <> 0 ORDER BY transaction_id LIMIT 5""",
    "reports: breakage (period)": """SELECT coalesce(sum(l.amount), 0)::bigint
        FROM (SELECT unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount FROM transactions
              WHERE created_at >= $1 AND created_at < $2) l
        JOIN accounts a ON a.account_id = l.account_id AND a.kind = 'operator_breakage'""",
}


def answer(result: Any) -> str:
    """A read's answer in a form to compare across variants: a list of rows in any order."""
    if isinstance(result, list):
        return repr(sorted(repr(tuple(r)) for r in result))
    return repr(result)


class Reads:
    """The reads of one variant's database, each named, each a coroutine function of no arguments."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        tail_after: int,
        transaction_id: int,
        member_id: str,
        merchant_id: str,
        arrays: bool = False,
    ):
        self.pool = pool
        self.arrays = arrays  # ARRAY_SQL's text for the reads it has
        self.results: dict[str, str] = {}  # each read's last answer, to compare across the variants
        store = Store.__new__(Store)  # statement_lines reads only self.pool
        store.pool = pool
        self.store = store
        self.sql: dict[str, tuple[str, tuple[Any, ...]]] = {
            "checkpoint tail (fold)": (TAIL, (tail_after,)),
            "reconcile: sum by asset": (RECONCILE_SUMS, ()),
            "reconcile: per transaction": (RECONCILE_PER_TRANSACTION, ()),
            "reconcile: references": (RECONCILE_REFERENCES, ()),
        }
        self.calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "reversal_group (1 tx legs)": lambda: member_store.reversal_group(pool, transaction_id),
            "member_history (50)": lambda: member_store.member_history(pool, member_id, None, 50),
            "statement_lines (500)": lambda: self.store.statement_lines(1, merchant_id, 0, 500),
        }

    def names(self) -> list[str]:
        return [*self.sql, *self.calls, "reports: breakage (period)"]

    async def run(self, name: str, period: tuple[Any, ...]) -> float:
        started = time.perf_counter()
        if self.arrays:
            sql = ARRAY_SQL[name]
            arguments = period if "$2" in sql else self.sql.get(name, ("", ()))[1]
            fetch = self.pool.fetchval if name == "reports: breakage (period)" else self.pool.fetch
            result: Any = await fetch(sql, *arguments, timeout=600)
        elif name in self.sql:
            sql, args = self.sql[name]
            result = await self.pool.fetch(sql, *args, timeout=600)
        elif name in self.calls:
            result = await self.calls[name]()
        else:
            result = await self.pool.fetchval(BREAKAGE, *period, timeout=600)
        took = (time.perf_counter() - started) * 1e3
        self.results[name] = answer(result)
        return took


def reversal_sql() -> str:
    """ReverseTransaction's legs query as member_store runs it, for EXPLAIN."""
    import inspect

    source = inspect.getsource(member_store.reversal_group)
    start = source.index('"""SELECT t.transaction_id')
    return source[start + 3 : source.index('"""', start + 3)]


async def measure(url: str, args: argparse.Namespace) -> None:
    writer = Store.__new__(Store)
    m = machine(True, args.members, args.merchants)
    m.ids = IdAllocator(FIRST_TRANSACTION_ID, FIRST_TRANSACTION_ID)
    work = batches(args.prefill_batches + args.batches, args.members, args.merchants, seed=args.seed)
    admin = await asyncpg.connect(url)
    started = time.perf_counter()
    await admin.execute("CREATE DATABASE projection_template")
    fill = argparse.Namespace(template_through=10**6, prefill_batches=args.prefill_batches, copies=args.copies)
    await fill_template(url, m, work, fill, writer)
    print(f"template filled in {time.perf_counter() - started:.0f} s")
    names = ["base", "packed"]
    probes: dict[str, LegProbe] = {}
    for name in names:
        await admin.execute(f"CREATE DATABASE v_{name} TEMPLATE projection_template")
        c = await asyncpg.connect(database_url(url, f"v_{name}"))
        if name == "packed":
            started = time.perf_counter()
            most = await pack(c)
            print(f"packed in {time.perf_counter() - started:.0f} s; most legs in a transaction: {most}")
        else:
            await c.execute("VACUUM ANALYZE")
        probes[name] = LegProbe(c, name == "packed")
    await admin.execute("CHECKPOINT")
    totals = {name: [0.0, 0.0] for name in names}
    counted_transactions = counted_entries = 0
    encode_entries = encode_arrays = 0.0  # client seconds: the entries' C encoder; the arrays in Python
    entries_bytes = array_bytes = 0
    for i in range(args.prefill_batches, args.prefill_batches + args.batches):
        _, batch_write = m.apply(work[i], {}, NOW_US + i * 1_000_000)
        m.commit()
        counting = i >= args.prefill_batches + args.warmup
        at = time.perf_counter()
        legs = {t: packed_fields(v) for t, v in legs_by_transaction(batch_write.entries).items()}
        arrays = time.perf_counter() - at
        at = time.perf_counter()
        stream = CopyEncoder("entries", ENTRIES_COPY)
        stream.add(batch_write.entries, {"asset_code": POINTS})
        encoded = stream.finish()
        entries = time.perf_counter() - at
        if counting:
            counted_transactions += len(batch_write.transactions)
            counted_entries += len(batch_write.entries)
            encode_entries += entries
            encode_arrays += arrays
            entries_bytes += len(encoded)
            array_bytes += sum(len(v) for v in legs.values())
        if args.checkpoint_every and i % args.checkpoint_every == 0:
            # as a timed checkpoint does: the next change of each page writes the whole page to the WAL,
            # so the pages a batch touches (entries' heap and index pages among them) count
            await admin.execute("CHECKPOINT")
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            probe = probes[name]
            probe.counting = counting
            probe.legs = legs
            before_wal = await probe.connection.fetchval(LSN)
            before = cpu_seconds(probe.pid)
            transaction = probe.connection.transaction()
            await transaction.start()
            await Store._write_many(writer, probe, [batch_write], 60.0, lambda _: None)  # type: ignore[arg-type,unused-ignore]
            await probe.timed("commit", transaction.commit())
            used = cpu_seconds(probe.pid) - before
            written = await probe.connection.fetchval(LSN) - before_wal
            if counting:
                totals[name][0] += used
                totals[name][1] += written
    counted = (args.batches - args.warmup) * 1_000
    print(
        f"{args.batches - args.warmup} batches of 1,000 counted ({args.warmup} warm-up), program in force, "
        f"members {args.members}, "
        f"{f'a CHECKPOINT every {args.checkpoint_every} batches' if args.checkpoint_every else 'no CHECKPOINT'}; "
        f"per operation: transactions {counted_transactions / counted:.2f}, "
        f"entries {counted_entries / counted:.2f}"
    )
    print(f"\n  {'statement (table)':<22} {'base µs/op':>10} {'packed':>8} {'base WAL B/op':>14} {'packed':>8}")
    base, packed = probes["base"].costs, probes["packed"].costs
    for table in [*base, *(t for t in packed if t not in base)]:
        b, p = base.get(table, [0.0, 0.0, 0]), packed.get(table, [0.0, 0.0, 0])
        print(
            f"  {table:<22} {b[0] / counted * 1e6:10.2f} {p[0] / counted * 1e6:8.2f} "
            f"{b[1] / counted:14.1f} {p[1] / counted:8.1f}"
        )
    for label, values in (
        ("sum of statements", {n: [sum(v[k] for v in probes[n].costs.values()) for k in (0, 1)] for n in names}),
        ("whole transaction", totals),
    ):
        b, p = values["base"], values["packed"]
        print(
            f"  {label:<22} {b[0] / counted * 1e6:10.2f} {p[0] / counted * 1e6:8.2f} "
            f"{b[1] / counted:14.1f} {p[1] / counted:8.1f}   packed - base: "
            f"{(p[0] - b[0]) / counted * 1e6:+.2f} µs/op, {(p[1] - b[1]) / counted:+.1f} B/op"
        )
    print(
        f"\nclient: the entries' binary COPY (fastpath.copy_binary) {encode_entries / counted * 1e6:.2f} µs/op, "
        f"{entries_bytes / counted:.0f} B/op; the leg arrays encoded in Python here "
        f"{encode_arrays / counted * 1e6:.2f} µs/op, {array_bytes / counted:.0f} B/op"
    )
    sizes = {
        n: await probes[n].connection.fetchrow(
            """SELECT pg_total_relation_size('transactions') AS t,
                      coalesce(pg_total_relation_size(to_regclass('entries')), 0) AS e"""
        )
        for n in names
    }
    print(
        "sizes (heap + indexes): "
        + "; ".join(
            f"{n} transactions {s['t'] / 2**20:.0f} MB, entries {s['e'] / 2**20:.0f} MB" for n, s in sizes.items()
        )
    )
    for probe in probes.values():
        await probe.connection.close()
    await read_all(url, names, args)
    await admin.close()


async def read_all(url: str, names: list[str], args: argparse.Namespace) -> None:
    pools = {n: await asyncpg.create_pool(database_url(url, f"v_{n}"), min_size=1, max_size=1) for n in names}
    c = pools["base"]
    tail_after = await c.fetchval(
        "SELECT transaction_id FROM transactions ORDER BY transaction_id DESC OFFSET $1 LIMIT 1", args.tail_transactions
    )
    busy = await c.fetchrow(
        """SELECT member_id, merchant_id, max(transaction_id) AS transaction_id FROM transactions
           WHERE kind = 1 AND transaction_id >= $1 GROUP BY member_id, merchant_id ORDER BY count(*) DESC LIMIT 1""",
        FIRST_TRANSACTION_ID,
    )
    period = await c.fetchrow(
        "SELECT min(created_at) AS opened, max(created_at) + interval '1 s' AS cut FROM transactions"
    )
    for pool in pools.values():
        await pool.execute(
            "INSERT INTO settlement_periods (period_id, opened_at, cut_off) VALUES (1, $1, $2)",
            period["opened"],
            period["cut"],
        )
    reads = {
        n: Reads(pools[n], tail_after, busy["transaction_id"], busy["member_id"], busy["merchant_id"]) for n in names
    }
    reads["arrays"] = Reads(
        pools["packed"], tail_after, busy["transaction_id"], busy["member_id"], busy["merchant_id"], arrays=True
    )
    # the most recent day of the period for the breakage sum: the projection's newest transactions
    recent = (period["cut"] - (period["cut"] - period["opened"]) / 10, period["cut"])
    print(
        f"\nreads (each variant's answer checked equal), ms (median [min-max] of {args.reads}, in turn): tail after transaction {tail_after}; "
        f"member {busy['member_id']}, merchant {busy['merchant_id']}, transaction {busy['transaction_id']}"
    )
    print(f"  {'read':<27} {'base':>22} {'packed view':>22} {'packed, SQL on arrays':>22}  view/base arrays/base")
    for name in reads["base"].names():
        variants = [*names, "arrays"] if name in ARRAY_SQL else names
        times: dict[str, list[float]] = {n: [] for n in variants}
        for i in range(args.reads + 1):
            turn = i % len(variants)
            for n in variants[turn:] + variants[:turn]:
                took = await reads[n].run(name, recent)
                if i:  # the first of each: warm-up (caches)
                    times[n].append(took)
        answers = {reads[n].results[name] for n in variants}
        if len(answers) != 1:
            raise SystemExit(f"{name}: the variants answer differently: {sorted(answers)}")
        cells = {n: f"{statistics.median(t):8.1f} [{min(t):.1f}-{max(t):.1f}]" for n, t in times.items()}
        ratios = {n: statistics.median(t) / statistics.median(times["base"]) for n, t in times.items()}
        print(
            f"  {name:<27} {cells['base']:>22} {cells['packed']:>22} {cells.get('arrays', '-'):>22}  "
            f"{ratios['packed']:9.2f} {ratios['arrays'] if 'arrays' in ratios else float('nan'):11.2f}"
        )
    if args.plans:
        explained = [
            ("checkpoint tail (fold)", TAIL, (tail_after,)),
            ("reconcile: sum by asset", RECONCILE_SUMS, ()),
            ("reconcile: per transaction", RECONCILE_PER_TRANSACTION, ()),
            ("reconcile: references", RECONCILE_REFERENCES, ()),
            ("reversal_group", reversal_sql(), (busy["transaction_id"], list(member_store.TIED_KINDS))),
            ("reports: breakage", BREAKAGE, recent),
        ]
        with open(args.plans, "w") as out:
            for title, sql, arguments in explained:
                rewritten = next((v for k, v in ARRAY_SQL.items() if k.startswith(title)), None)
                runs = [(n, pools[n], sql) for n in names]
                if rewritten is not None:
                    runs.append(("packed, SQL on arrays", pools["packed"], rewritten))
                for n, pool, text in runs:
                    plan = await pool.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {text}", *arguments, timeout=600)
                    out.write(f"=== {title}: {n}\n" + "\n".join(r[0] for r in plan) + "\n\n")
        print(f"plans written to {args.plans}")
    for pool in pools.values():
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--prefill-batches", type=int, default=100)
    parser.add_argument("--copies", type=int, default=10, help="copies of the prefill's journal rows [10]")
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="a CHECKPOINT before every N-th batch (0: none) [0]"
    )
    parser.add_argument("--reads", type=int, default=5, help="timed runs of each read per variant [5]")
    parser.add_argument("--tail-transactions", type=int, default=50_000, help="the checkpoint tail's length [50000]")
    parser.add_argument("--plans", default="", help="write every read's EXPLAIN ANALYZE, both variants, to this file")
    args = parser.parse_args()
    harness.on_embedded_postgres("points-entries-packed-", lambda url: measure(url, args))


if __name__ == "__main__":
    main()
