"""The reads of transactions by member and by merchant reach them through their indexes on a filled journal:
ListTransactions and the member's history through transactions_member_hash (migration 0021: keyed by
hashtext of the id, issue 14 "narrow rows with integer slots"), a merchant's statement lines through the ids
close_period wrote at the cut (statement_line_ids, migration 0024, which dropped 0021's
transactions_merchant_hash) and then the transactions' primary key. Each read's own SQL is explained (the
store's method runs against a pool that answers EXPLAIN for it), so a read rewritten or an index dropped or
renamed fails here rather than scanning the journal in production. And two ids of the same hash: each read
returns only its own id's transactions."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import asyncpg

from processor import member_store
from processor.store import Store
from tests.harness import migrate, run
from tests.integration.test_projection_cuts import plan_indexes

OPENED = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
CUT_OFF = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


class Explaining:
    """Stands in for the pool a read is given: runs EXPLAIN of the read's SQL on the real connection, with
    the read's own arguments, and keeps the plan."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.plans: list[dict[str, Any]] = []

    async def fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[Any]:
        plan = await self.connection.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        self.plans.append(json.loads(plan)[0]["Plan"])
        return []


def indexes(explaining: Explaining) -> set[str]:
    found: set[str] = set()
    for plan in explaining.plans:
        found |= plan_indexes(plan)
    return found


def test_reads_by_member_and_by_merchant_use_their_indexes_on_a_filled_journal(create_database):
    url = migrate(create_database())

    async def go():
        c = await asyncpg.connect(url)
        try:
            # 200,000 transactions of 5,000 members at 50 merchants over a month, two months of history
            # before it; one closed period
            await c.execute(
                """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                             idempotency_key, created_at)
                   SELECT i, CASE WHEN i % 3 = 0 THEN 2 ELSE 1 END, 'merchant-' || i % 50, 'member-' || i % 5000,
                          'POINTS', 10, 'k' || i, $1::timestamptz + i * interval '39 seconds'
                   FROM generate_series(1, 200000) i""",
                OPENED - dt.timedelta(days=60),
            )
            # two closed periods, the month before OPENED and the month to CUT_OFF: the cut writes the
            # statement lines' ids (the merchants' statements need the merchants)
            await c.execute(
                """INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps)
                   SELECT 'merchant-' || i, i, 1000 FROM generate_series(0, 49) i"""
            )
            closing = Store(await asyncpg.create_pool(url, min_size=1, max_size=1), url)
            # small chunks: thousands of rows, as a year of periods of a network has (a table of a hundred
            # rows is read whole, and would say nothing of the read's plan)
            closing.statement_line_chunk_ids_max = 16
            try:
                await closing.close_period(OPENED)
                await closing.close_period(CUT_OFF)
            finally:
                await closing.pool.close()
            await c.execute("ANALYZE transactions")
            await c.execute("ANALYZE statement_line_ids")
            names = {r[0] for r in await c.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'transactions'")}
            assert "transactions_member_hash" in names
            assert (
                not {"transactions_member_newest", "transactions_merchant_created", "transactions_merchant_hash"}
                & names
            )
            assert await c.fetchval("SELECT count(*) FROM statement_line_ids WHERE period_id = 2") > 0
            store = Store.__new__(Store)  # the reads use nothing of the store but its pool
            store.pool = Explaining(c)  # type: ignore[assignment]
            await store.list_transactions("member-77", None, 50, ["merchant-27", "merchant-3"])
            await store.list_transactions("member-77", 150_077, 50, ["merchant-27"])
            assert "transactions_member_hash" in indexes(store.pool), store.pool.plans

            history = Explaining(c)
            await member_store.member_history(history, "member-77", None, 50)  # type: ignore[arg-type]
            await member_store.member_history(history, "member-77", 150_077, 50)  # type: ignore[arg-type]
            assert len(history.plans) == 2
            for plan in history.plans:
                assert "transactions_member_hash" in plan_indexes(plan), plan

            lines = Explaining(c)
            store.pool = lines  # type: ignore[assignment]
            await store.statement_lines(2, "merchant-7")
            await store.statement_lines(2, "merchant-7", 160_007, 100)
            assert len(lines.plans) == 2
            for plan in lines.plans:
                assert {"statement_line_ids_pkey", "transactions_pkey"} <= plan_indexes(plan), plan
        finally:
            await c.close()

    run(go())


def test_two_ids_of_the_same_hash_each_read_only_their_own_transactions(create_database):
    url = migrate(create_database())

    async def go():
        c = await asyncpg.connect(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            # two member ids and two merchant ids whose hashtext is the same (a 32-bit hash: among
            # 300,000 ids a few pairs share one)
            pairs = await c.fetch(
                """SELECT min(s) AS a, max(s) AS b FROM (SELECT 'id-' || i AS s FROM generate_series(1, 300000) i) x
                   GROUP BY hashtext(s) HAVING count(*) = 2 LIMIT 2"""
            )
            assert len(pairs) == 2
            ann, bob = pairs[0]["a"], pairs[0]["b"]
            shop, rival = pairs[1]["a"], pairs[1]["b"]
            assert await c.fetchval(
                "SELECT hashtext($1) = hashtext($2) AND hashtext($3) = hashtext($4)", ann, bob, shop, rival
            )
            # ann earns at shop (odd ids), bob at rival (even ids), interleaved, inside one closed period
            await c.execute(
                """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                             idempotency_key, created_at)
                   SELECT i, 1, CASE WHEN i % 2 = 1 THEN $1 ELSE $2 END, CASE WHEN i % 2 = 1 THEN $3 ELSE $4 END,
                          'POINTS', i, 'k' || i, $5::timestamptz + i * interval '1 minute'
                   FROM generate_series(1, 40) i""",
                shop,
                rival,
                ann,
                bob,
                OPENED,
            )
            # the period closed as the service closes it (its statements name the merchants): the cut
            # writes the ids of the statement lines
            await c.execute(
                "INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps) VALUES ($1, 0, 1000), ($2, 1, 1000)",
                shop,
                rival,
            )
            store = Store(pool, url)
            assert (await store.close_period(CUT_OFF))[0]["period_id"] == 1
            odd = list(range(39, 0, -2))
            even = list(range(40, 0, -2))
            got = await store.list_transactions(ann, None, 100, [shop, rival])
            assert [r["transaction_id"] for r in got] == odd
            got = await store.list_transactions(bob, 30, 100, [shop, rival])
            assert [r["transaction_id"] for r in got] == [i for i in even if i < 30]
            got = await member_store.member_history(pool, bob, None, 100)
            assert [r["transaction_id"] for r in got] == even
            got = await member_store.member_history(pool, ann, 21, 5)
            assert [r["transaction_id"] for r in got] == [19, 17, 15, 13, 11]
            got = await store.statement_lines(1, shop)
            assert [r["transaction_id"] for r in got] == sorted(odd)
            assert {r["member_id"] for r in got} == {ann}
            got = await store.statement_lines(1, rival, 10, 3)
            assert [r["transaction_id"] for r in got] == [12, 14, 16]
        finally:
            await pool.close()
            await c.close()

    run(go())
