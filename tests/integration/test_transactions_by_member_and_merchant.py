"""The reads of transactions by member and by merchant reach them through their indexes on a filled journal:
ListTransactions and the member's history through transactions_member_newest, a merchant's statement
lines through transactions_merchant_created. Each read's own SQL is explained (the store's method runs
against a pool that answers EXPLAIN for it), so a read rewritten or an index dropped or renamed (issue 14,
"narrow rows with integer slots") fails here rather than scanning the journal in production."""

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
            await c.execute(
                "INSERT INTO settlement_periods (period_id, opened_at, cut_off) VALUES (1, $1, $2)", OPENED, CUT_OFF
            )
            await c.execute("ANALYZE transactions")
            store = Store.__new__(Store)  # the reads use nothing of the store but its pool
            store.pool = Explaining(c)  # type: ignore[assignment]
            await store.list_transactions("member-77", None, 50, ["merchant-27", "merchant-3"])
            await store.list_transactions("member-77", 150_077, 50, ["merchant-27"])
            assert "transactions_member_newest" in indexes(store.pool), store.pool.plans

            history = Explaining(c)
            await member_store.member_history(history, "member-77", None, 50)  # type: ignore[arg-type]
            await member_store.member_history(history, "member-77", 150_077, 50)  # type: ignore[arg-type]
            assert len(history.plans) == 2
            for plan in history.plans:
                assert "transactions_member_newest" in plan_indexes(plan), plan

            lines = Explaining(c)
            store.pool = lines  # type: ignore[assignment]
            await store.statement_lines(1, "merchant-7")
            await store.statement_lines(1, "merchant-7", 160_007, 100)
            assert len(lines.plans) == 2
            for plan in lines.plans:
                assert "transactions_merchant_created" in plan_indexes(plan), plan
        finally:
            await c.close()

    run(go())
