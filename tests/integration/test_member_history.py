"""MemberAdminService's history of a member (member_store.member_history): its own transactions, the
transfers it received and the merges into it, newest first, a page at a time; and what a page reads of
the journal is bounded by the page, not by the journal (a member with few transactions, or none, among
many others' is one short read)."""

from __future__ import annotations

import asyncio
import json

from processor import member_store
from tests.integration.ledger_rows import Ledger

OTHERS = 20_000


async def _journal(url: str) -> None:
    async with await Ledger.open(url) as ledger:
        c = ledger.c
        await c.execute("INSERT INTO members SELECT 'other-' || g, now() FROM generate_series(1, 100) g")
        await c.execute("INSERT INTO members VALUES ('x', now()), ('y', now()), ('z', now())")
        await c.execute(
            """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                         idempotency_key, created_at)
               SELECT g, 1, 'operator', CASE WHEN g IN (10, 5000, 15000) THEN 'x'
                                             WHEN g IN (7000, 12000) THEN 'y'
                                             ELSE 'other-' || (g % 100) END,
                      'POINTS', 1, 'k' || g, now()
               FROM generate_series(1, $1) g""",
            OTHERS,
        )
        # y sent x a transfer (7_000) and was merged into x (12_000)
        await c.execute(
            """INSERT INTO member_transfers (transaction_id, from_member_id, to_member_id, points, fee, created_at)
               VALUES (7000, 'y', 'x', 1, 0, now())"""
        )
        await c.execute(
            """INSERT INTO member_merges (source_member_id, target_member_id, transaction_id, points, created_at)
               VALUES ('y', 'x', 12000, 1, now()), ('z', 'x', NULL, 0, now())"""
        )
        await c.execute("ANALYZE")


class _Explained:
    """A connection whose fetch also asks Postgres for the plan it ran, with its row counts."""

    def __init__(self, connection):
        self.connection = connection
        self.plans: list[dict] = []

    async def fetch(self, sql: str, *args):
        plan = await self.connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        self.plans.append(json.loads(plan)[0]["Plan"])
        return await self.connection.fetch(sql, *args)


def _rows_read(node: dict, relation: str) -> int:
    """Rows the plan's scans of `relation` produced or filtered out, over all their loops."""
    read = 0
    if node.get("Relation Name") == relation:
        loops = node.get("Actual Loops", 1)
        read += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
    return read + sum(_rows_read(child, relation) for child in node.get("Plans", ()))


async def _history(url: str, member_id: str, before: int | None, limit: int) -> tuple[list[int], int]:
    """The page's transaction ids, and the rows of `transactions` the read went through."""
    async with await Ledger.open(url) as ledger:
        explained = _Explained(ledger.c)
        rows = await member_store.member_history(explained, member_id, before, limit)  # type: ignore[arg-type]
    return [r["transaction_id"] for r in rows], sum(_rows_read(plan, "transactions") for plan in explained.plans)


def test_a_members_history_is_its_own_its_transfers_and_merges_newest_first_a_page_at_a_time(create_database):
    url = create_database()
    asyncio.run(_journal(url))
    page, _ = asyncio.run(_history(url, "x", None, 3))
    assert page == [15_000, 12_000, 7_000]
    page, _ = asyncio.run(_history(url, "x", 7_000, 3))
    assert page == [5_000, 10]
    assert asyncio.run(_history(url, "nobody", None, 50))[0] == []


def test_a_page_reads_rows_of_the_page_not_of_the_journal(create_database):
    url = create_database()
    asyncio.run(_journal(url))
    for member_id, before in (("x", None), ("x", 12_000), ("nobody", None), ("y", None)):
        _, read = asyncio.run(_history(url, member_id, before, 51))
        # a few rows per transaction of the page; before, a backward walk of the journal from its newest
        # transaction, filtering each: thousands for a member with few
        assert read <= 100, (member_id, before, read)
