"""Migration 0020: the transactions that name an original (refunds, reversals, the rewards an earn set
off) are found through an index, so ReverseTransaction's reads (member_store.reversal_group) do not scan
the journal; rows that name none (earns, redeems) are not in it."""

from __future__ import annotations

import json

import asyncpg

from processor import member_store
from tests.harness import migrate, run
from tests.integration.test_projection_cuts import plan_indexes


def test_reversal_reads_use_the_original_index_and_earns_are_not_in_it(create_database):
    url = migrate(create_database())

    async def go():
        c = await asyncpg.connect(url)
        try:
            # 200,000 earns and redeems naming no original, and one refund in every 100 naming one
            await c.execute(
                """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                             original_transaction_id, idempotency_key, created_at)
                   SELECT i, CASE WHEN i % 100 = 0 THEN 5 ELSE 1 END, 'm', 'mem-' || i % 5000, 'POINTS', 10,
                          CASE WHEN i % 100 = 0 THEN i - 1 END, 'k' || i, now()
                   FROM generate_series(1, 200000) i"""
            )
            await c.execute("ANALYZE transactions")
            indexed = await c.fetchval(
                """SELECT count(*) FROM transactions WHERE original_transaction_id IS NOT NULL"""
            )
            assert indexed == 2_000
            size = await c.fetchval("SELECT pg_relation_size('transactions_original')")
            whole = await c.fetchval("SELECT pg_relation_size('transactions_pkey')")
            assert size * 20 < whole  # only the 1% that name an original
            for sql in (
                """SELECT t.transaction_id FROM transactions t
                   WHERE t.transaction_id = $1 OR (t.original_transaction_id = $1 AND t.kind = ANY($2::smallint[]))""",
                "SELECT count(*) FROM transactions WHERE original_transaction_id = $1 AND kind = ANY($2::smallint[])",
            ):
                plan = json.loads(
                    await c.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", 99_999, list(member_store.REFUND_KINDS))
                )[0]["Plan"]
                assert "transactions_original" in plan_indexes(plan), plan
        finally:
            await c.close()

    run(go())
