"""Entries packed into their transaction's row (migration 0022) against entries stored row by row (the
schema through 0021): Postgres CPU and WAL bytes per operation of the projection's writes, and the time
of the reads that use entries, on one embedded Postgres (the service's settings) in a temporary
directory (issue 14, "entries derived from the transaction row rather than stored row by row").

    base    the schema through migration 0021: a transactions row and ~3.6 entries rows per operation,
            each a binary COPY of its own (as Store._write_many wrote them before 0022:
            projection_write.unpacked_streams)
    packed  the same database with migration 0022 applied (each transaction's legs in its row:
            leg_accounts, leg_amounts, leg_assets; `entries` a view), rewritten (VACUUM FULL) and
            analysed; written by Store._write_many as it is (the legs in the transactions COPY)

A template database gets the migrations through 0021 and is filled as loadtest/projection_write.py fills
its (the state machine's own batches: 1,000 operations, 70% earn / 30% redeem, Zipf members,
ops/program.example.json in force; --prefill-batches written, then the journal copied --copies times at
lower ids and earlier times). Each measured batch is written to both, the order alternating batch by
batch, each in a transaction of its own, committed; around each statement the backend's CPU
(/proc/<pid>/schedstat) and WAL bytes (pg_current_wal_insert_lsn). Then the reads, in turn, --reads
times each: the balance checkpoint's tail (the last --tail-transactions transactions), reconcile's
whole-journal checks, ReverseTransaction's legs, a member's history and the breakage of a period: base
runs the SQL as it was before 0022, `packed view` the same SQL through the entries view, `packed, SQL on
arrays` the SQL processor/ now runs (store.tail_deltas, reconcile.py, reports.py); printed: median and
range in ms, and with --plans FILE every read's EXPLAIN (ANALYZE) written to FILE.

    .venv/bin/python -m loadtest.entries_packed [--batches 30] [--prefill-batches 100] [--copies 10]
        [--reads 5] [--plans /tmp/entries-plans.txt] [--checkpoint-every 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from fastpath.copy_binary import CopyEncoder
from loadtest import harness
from loadtest.bench_state_machine import NOW_US, batches, machine
from loadtest.projection_write import (
    FIRST_TRANSACTION_ID,
    Probe,
    database_url,
    fill_template,
    unpacked_streams,
    write_in_turn,
)
from processor import member_store
from processor.domain import ASSET_POINTS
from processor.state_machine import IdAllocator
from processor.store import MIGRATIONS, NO_LEGS, TRANSACTIONS_COPY, Store

POINTS = ASSET_POINTS
PACKED_MIGRATION = 22  # 0022_entries_packed.sql


async def pack(c: asyncpg.Connection) -> int:
    """Applies migration 0022 (the entries moved into their transactions' rows, the table replaced by the
    view), then rewrites and analyses; returns the most legs a transaction has."""
    (path,) = [p for p in MIGRATIONS.glob("*.sql") if int(p.name.split("_", 1)[0]) == PACKED_MIGRATION]
    async with c.transaction():
        await c.execute(path.read_text())
    await c.execute("VACUUM FULL transactions")
    await c.execute("ANALYZE")
    return int(await c.fetchval("SELECT coalesce(max(cardinality(leg_accounts)), 0) FROM transactions"))


# --- reads ------------------------------------------------------------------------------------------

TAIL = "SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest FROM entries WHERE transaction_id > $1 GROUP BY account_id"
RECONCILE_SUMS = "SELECT asset_code, sum(amount) AS s FROM entries GROUP BY asset_code"
RECONCILE_PER_TRANSACTION = """SELECT transaction_id, asset_code, sum(amount) AS s FROM entries
    GROUP BY transaction_id, asset_code HAVING sum(amount) <> 0 ORDER BY transaction_id, asset_code LIMIT 5"""
# reconcile's check without its LIMIT 5, counted: on a sound ledger it finds nothing and so scans every
# entry; the bench's accounts are not all in the accounts table, which would end it at the fifth row
RECONCILE_REFERENCES = """SELECT count(*) FROM (SELECT e.entry_id, e.transaction_id, e.account_id FROM entries e
    LEFT JOIN accounts a USING (account_id) LEFT JOIN transactions t USING (transaction_id)
    WHERE a.account_id IS NULL OR t.transaction_id IS NULL OR a.asset_code <> e.asset_code) x"""
BREAKAGE = """SELECT coalesce(sum(e.amount), 0)::bigint FROM transactions t
    JOIN entries e ON e.transaction_id = t.transaction_id
    JOIN accounts a ON a.account_id = e.account_id AND a.kind = 'operator_breakage'
    WHERE t.created_at >= $1 AND t.created_at < $2"""


# The same reads as processor/ runs them since 0022, over the arrays (the legs unnested in the select
# list: a ProjectSet, no function scan and tuplestore per row; the view joined transactions to itself):
# store.tail_deltas, reconcile.ledger_discrepancies' first three checks (the last without its LIMIT,
# counted), reports' breakage.
ARRAY_SQL = {
    "checkpoint tail (fold)": """SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest
        FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount
              FROM transactions WHERE transaction_id > $1) l GROUP BY account_id""",
    "reconcile: sum by asset": f"""SELECT coalesce(asset_code, '{POINTS}') AS asset_code, sum(amount) AS s
        FROM (SELECT unnest(leg_amounts) AS amount, unnest(leg_assets) AS asset_code FROM transactions) l
        GROUP BY 1""",
    "reconcile: per transaction": f"""SELECT transaction_id, asset_code, s FROM (
          SELECT transaction_id, '{POINTS}' AS asset_code, (SELECT sum(x) FROM unnest(leg_amounts) x) AS s
          FROM transactions WHERE leg_assets IS NULL
          UNION ALL
          SELECT t.transaction_id, l.asset_code, sum(l.amount) FROM transactions t
          CROSS JOIN LATERAL unnest(t.leg_amounts, t.leg_assets) AS l(amount, asset_code)
          WHERE t.leg_assets IS NOT NULL GROUP BY 1, 2) c
        WHERE s <> 0 ORDER BY transaction_id, asset_code LIMIT 5""",
    "reconcile: references": f"""SELECT count(*) FROM (SELECT l.transaction_id, l.account_id
        FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id, unnest(leg_assets) AS asset_code,
                     generate_subscripts(leg_accounts, 1) AS leg
              FROM transactions) l
        LEFT JOIN accounts a USING (account_id)
        WHERE a.account_id IS NULL OR a.asset_code <> coalesce(l.asset_code, '{POINTS}')) x""",
    "reports: breakage (period)": """SELECT coalesce(sum(e.amount), 0)::bigint
        FROM (SELECT unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount FROM transactions
              WHERE created_at >= $1 AND created_at < $2) e
        JOIN accounts a ON a.account_id = e.account_id AND a.kind = 'operator_breakage'""",
}


def answer(result: Any) -> str:
    """A read's answer in a form to compare across variants: a list of rows in any order."""
    if isinstance(result, list):
        return repr(sorted(repr(tuple(r)) for r in result))
    return repr(result)


# the two reads of one transaction's legs and of a member's page as member_store ran them before 0022
# (45c9616), over the entries table (base) or the view (packed view); the arrays variant runs
# member_store's own SQL (processor_sql)
REVERSAL_LEGS = """SELECT t.transaction_id, t.kind, t.member_id, t.merchant_id, t.refunded, t.amount,
          coalesce(array_agg(ARRAY[e.account_id::text, a.kind, a.owner_id, a.asset_code,
                                   e.amount::text] ORDER BY e.entry_id)
                   FILTER (WHERE e.entry_id IS NOT NULL), '{}') AS legs
   FROM transactions t
   LEFT JOIN entries e ON e.transaction_id = t.transaction_id
   LEFT JOIN accounts a ON a.account_id = e.account_id
   WHERE t.transaction_id = $1 OR (t.original_transaction_id = $1 AND t.kind = ANY($2::smallint[]))
   GROUP BY t.transaction_id ORDER BY t.transaction_id"""
MEMBER_HISTORY = """WITH page AS (
       SELECT transaction_id FROM (
           (SELECT transaction_id FROM transactions
            WHERE hashtext(member_id) = hashtext($1) AND member_id = $1
              AND ($2::bigint IS NULL OR transaction_id < $2)
            ORDER BY transaction_id DESC LIMIT $3)
           UNION
           (SELECT transaction_id FROM member_transfers
            WHERE to_member_id = $1 AND ($2::bigint IS NULL OR transaction_id < $2)
            ORDER BY to_member_id, transaction_id DESC LIMIT $3)
           UNION
           (SELECT transaction_id FROM member_merges
            WHERE target_member_id = $1 AND transaction_id IS NOT NULL
              AND ($2::bigint IS NULL OR transaction_id < $2)
            ORDER BY target_member_id, transaction_id DESC LIMIT $3)
       ) ids ORDER BY transaction_id DESC LIMIT $3)
   SELECT t.transaction_id, t.kind, t.merchant_id, t.amount, t.purchase_amount,
          t.authorization_id, t.original_transaction_id, t.created_at,
          coalesce(m.points, 0) AS member_points, coalesce(m.vouchers, 0) AS member_vouchers
   FROM page JOIN transactions t USING (transaction_id)
   LEFT JOIN LATERAL (
       SELECT sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS')::bigint AS points,
              sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS')::bigint AS vouchers
       FROM entries e JOIN accounts a USING (account_id)
       WHERE e.transaction_id = t.transaction_id AND a.owner_id = $1
         AND a.kind IN ('member', 'member_voucher_credit')) m ON true
   ORDER BY t.transaction_id DESC"""


def processor_sql(function: Callable[..., Awaitable[Any]], opening: str) -> str:
    """The first SQL literal of a member_store function that starts with `opening`, as it runs it."""
    import inspect

    source = inspect.getsource(function)
    start = source.index('"""' + opening)
    return source[start + 3 : source.index('"""', start + 3)]


class Reads:
    """The reads of one variant's database, each named: (SQL before 0022, SQL since, arguments, one value?)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        tail_after: int,
        transaction_id: int,
        member_id: str,
        period: tuple[Any, ...],
        arrays: bool = False,
    ):
        self.pool = pool
        self.arrays = arrays  # the SQL processor/ runs since 0022, else the SQL of before
        self.results: dict[str, str] = {}  # each read's last answer, to compare across the variants
        self.sql: dict[str, tuple[str, str, tuple[Any, ...], bool]] = {
            "checkpoint tail (fold)": (TAIL, ARRAY_SQL["checkpoint tail (fold)"], (tail_after,), False),
            "reconcile: sum by asset": (RECONCILE_SUMS, ARRAY_SQL["reconcile: sum by asset"], (), False),
            "reconcile: per transaction": (
                RECONCILE_PER_TRANSACTION,
                ARRAY_SQL["reconcile: per transaction"],
                (),
                False,
            ),
            "reconcile: references": (RECONCILE_REFERENCES, ARRAY_SQL["reconcile: references"], (), False),
            "reversal_group (1 tx legs)": (
                REVERSAL_LEGS,
                processor_sql(member_store.reversal_group, "SELECT t.transaction_id"),
                (transaction_id, list(member_store.TIED_KINDS)),
                False,
            ),
            "member_history (50)": (
                MEMBER_HISTORY,
                processor_sql(member_store.member_history, "WITH page AS"),
                (member_id, None, 50),
                False,
            ),
            "reports: breakage (period)": (BREAKAGE, ARRAY_SQL["reports: breakage (period)"], period, True),
        }

    def names(self) -> list[str]:
        return list(self.sql)

    async def run(self, name: str) -> float:
        before, since, arguments, one = self.sql[name]
        fetch = self.pool.fetchval if one else self.pool.fetch
        started = time.perf_counter()
        result: Any = await fetch(since if self.arrays else before, *arguments, timeout=600)
        took = (time.perf_counter() - started) * 1e3
        self.results[name] = answer(result)
        return took


async def measure(url: str, args: argparse.Namespace) -> None:
    writer = Store.__new__(Store)
    m = machine(True, args.members, args.merchants)
    m.ids = IdAllocator(FIRST_TRANSACTION_ID, FIRST_TRANSACTION_ID)
    work = batches(args.prefill_batches + args.batches, args.members, args.merchants, seed=args.seed)
    admin = await asyncpg.connect(url)
    started = time.perf_counter()
    await admin.execute("CREATE DATABASE projection_template")
    fill = argparse.Namespace(
        template_through=PACKED_MIGRATION - 1, prefill_batches=args.prefill_batches, copies=args.copies
    )
    await fill_template(url, m, work, fill, writer)
    print(f"template filled in {time.perf_counter() - started:.0f} s")
    names = ["base", "packed"]
    probes: dict[str, Probe] = {}
    for name in names:
        await admin.execute(f"CREATE DATABASE v_{name} TEMPLATE projection_template")
        c = await asyncpg.connect(database_url(url, f"v_{name}"))
        if name == "packed":
            started = time.perf_counter()
            most = await pack(c)
            print(f"packed in {time.perf_counter() - started:.0f} s; most legs in a transaction: {most}")
        else:
            await c.execute("VACUUM ANALYZE")
        probes[name] = Probe(c)
        probes[name].unpacked = name == "base"  # transactions and entries rows, as before 0022
    await admin.execute("CHECKPOINT")
    totals = {name: [0.0, 0.0] for name in names}
    counted_transactions = counted_entries = 0
    # client seconds and bytes of the streams: transactions and entries (base), transactions with legs (packed)
    encode_entries: list[float] = []  # µs/op of each counted batch (the machine is shared: medians)
    encode_arrays: list[float] = []
    entries_bytes = array_bytes = 0
    for i in range(args.prefill_batches, args.prefill_batches + args.batches):
        _, batch_write = m.apply(work[i], {}, NOW_US + i * 1_000_000)
        m.commit()
        counting = i >= args.prefill_batches + args.warmup

        def encode_packed() -> memoryview:
            with_legs = CopyEncoder("transactions", TRANSACTIONS_COPY)
            with_legs.add(
                batch_write.transactions,
                {"asset_code": POINTS, "created_at": batch_write.created_at, "program_version": None, **NO_LEGS},
                lookup=batch_write.member_balances_after,
                legs=batch_write.entries,
            )
            return with_legs.finish()

        # the two encodings in turn, the first alternating batch by batch (whichever runs first after
        # the writes pays for the machine's other work more often)
        took: dict[str, float] = {}
        for which in ("packed", "unpacked") if i % 2 else ("unpacked", "packed"):
            at = time.perf_counter()
            if which == "packed":
                packed_stream = encode_packed()
            else:
                unpacked = [stream.finish() for stream in unpacked_streams([batch_write])]
            took[which] = time.perf_counter() - at
        arrays, entries = took["packed"], took["unpacked"]
        if counting:
            counted_transactions += len(batch_write.transactions)
            counted_entries += len(batch_write.entries)
            encode_entries.append(entries / len(work[i]) * 1e6)
            encode_arrays.append(arrays / len(work[i]) * 1e6)
            entries_bytes += sum(len(stream) for stream in unpacked)
            array_bytes += len(packed_stream)
        if args.checkpoint_every and i % args.checkpoint_every == 0:
            # as a timed checkpoint does: the next change of each page writes the whole page to the WAL,
            # so the pages a batch touches (entries' heap and index pages among them) count
            await admin.execute("CHECKPOINT")
        await write_in_turn(probes, names, i, batch_write, writer, counting, totals)
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
        f"\nclient (fastpath.copy_binary), µs/op median [min-max] of the batches: base's transactions and entries "
        f"streams {statistics.median(encode_entries):.2f} [{min(encode_entries):.2f}-{max(encode_entries):.2f}], "
        f"{entries_bytes / counted:.0f} B/op; packed's transactions stream with the legs "
        f"{statistics.median(encode_arrays):.2f} [{min(encode_arrays):.2f}-{max(encode_arrays):.2f}], "
        f"{array_bytes / counted:.0f} B/op"
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
    # the most recent tenth of the period for the breakage sum: the projection's newest transactions
    recent = (period["cut"] - (period["cut"] - period["opened"]) / 10, period["cut"])
    reads = {n: Reads(pools[n], tail_after, busy["transaction_id"], busy["member_id"], recent) for n in names}
    reads["arrays"] = Reads(pools["packed"], tail_after, busy["transaction_id"], busy["member_id"], recent, arrays=True)
    variants = [*names, "arrays"]
    print(
        f"\nreads (each variant's answer checked equal), ms (median [min-max] of {args.reads}, in turn): tail after transaction {tail_after}; "
        f"member {busy['member_id']}, transaction {busy['transaction_id']}"
    )
    print(f"  {'read':<27} {'base':>22} {'packed view':>22} {'packed, SQL on arrays':>22}  view/base arrays/base")
    for name in reads["base"].names():
        times: dict[str, list[float]] = {n: [] for n in variants}
        for i in range(args.reads + 1):
            turn = i % len(variants)
            for n in variants[turn:] + variants[:turn]:
                took = await reads[n].run(name)
                if i:  # the first of each: warm-up (caches)
                    times[n].append(took)
        answers = {reads[n].results[name] for n in variants}
        if len(answers) != 1:
            raise SystemExit(f"{name}: the variants answer differently: {sorted(answers)}")
        cells = {n: f"{statistics.median(t):8.1f} [{min(t):.1f}-{max(t):.1f}]" for n, t in times.items()}
        ratios = {n: statistics.median(t) / statistics.median(times["base"]) for n, t in times.items()}
        print(
            f"  {name:<27} {cells['base']:>22} {cells['packed']:>22} {cells['arrays']:>22}  "
            f"{ratios['packed']:9.2f} {ratios['arrays']:11.2f}"
        )
    if args.plans:
        with open(args.plans, "w") as out:
            for name in reads["base"].names():
                before, since, arguments, _ = reads["base"].sql[name]
                runs = [(n, pools[n], before) for n in names] + [("packed, SQL on arrays", pools["packed"], since)]
                for n, pool, text in runs:
                    plan = await pool.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {text}", *arguments, timeout=600)
                    out.write(f"=== {name}: {n}\n" + "\n".join(r[0] for r in plan) + "\n\n")
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
