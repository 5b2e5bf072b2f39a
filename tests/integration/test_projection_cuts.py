"""Migrations 0019 and 0022 (the projection's rows cheaper for Postgres to write) on a real Postgres: entries
are a view over each transaction row's legs, entry_id unique and in the legs' order; the
idempotency record's request and response are json and come back as written; and the reads that reach
entries and idempotency records by key keep their index plans on a filled table."""

from __future__ import annotations

import datetime as dt
import json

import asyncpg
import pytest

from processor import member_store
from processor.domain import ACCOUNT_MEMBER, ASSET_POINTS
from processor.store import BatchWrite, Store
from tests.harness import migrate, run
from tests.integration.idempotency_rows import insert_records

AT = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)
MEMBER_ACCOUNT_ID = 900_000
REQUEST = {"member_id": "ann", "purchase_amount": 2500, "note": "caf\u00e9"}
RESPONSE = {"transaction_id": 1, "points": 250, "balance": 250, "give_back_bps": 1000, "created_at_us": 1}


@pytest.fixture(scope="module")
def database_url(create_database):
    return migrate(create_database())


def test_entries_are_a_view_over_the_transactions_legs_and_the_legs_are_checked(database_url):
    """Migration 0022 replaced the entries table (0019's, with no primary key) by a view over each
    transaction row's leg arrays; the row's CHECK keeps what the table's did (amount <> 0) and the arrays'
    lengths equal."""

    async def go():
        c = await asyncpg.connect(database_url)
        try:
            assert await c.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'entries'") == "v"
            columns = await c.fetch(
                """SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
                   WHERE attrelid = 'entries'::regclass AND attnum > 0 ORDER BY attnum"""
            )
            assert [(r["attname"], r["type"]) for r in columns] == [
                ("entry_id", "bigint"),
                ("transaction_id", "bigint"),
                ("account_id", "bigint"),
                ("asset_code", "text"),
                ("amount", "bigint"),
            ]
            insert = """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                            idempotency_key, created_at, leg_accounts, leg_amounts, leg_assets)
                        VALUES (77, 1, 'shop', 'ann', 'POINTS', 1, 'k77', now(), $1, $2, $3)"""
            for accounts, amounts, assets in (
                ([1, 2], [5, 0], None),  # a zero leg
                ([1, 2], [5], None),  # lengths differ
                ([1, 2], [5, -5], ["POINTS"]),
                ([1, None], [5, -5], None),
                ([1, 2], [5, None], None),
            ):
                with pytest.raises(asyncpg.CheckViolationError):
                    await c.execute(insert, accounts, amounts, assets)
            # a view since migration 0023: its columns keep the types
            types = await c.fetch(
                """SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
                   WHERE attrelid = 'idempotency_keys'::regclass AND attname IN ('request', 'response')
                   ORDER BY attname"""
            )
            assert [(r["attname"], r["type"]) for r in types] == [("request", "json"), ("response", "json")]
        finally:
            await c.close()

    run(go())


def test_a_batch_written_reads_back_legs_in_posting_order_and_the_outcome_as_written(database_url):
    async def go():
        store = await Store.open(database_url, 2)
        try:
            breakage = await store.pool.fetchval(
                "SELECT account_id FROM accounts WHERE kind = 'operator_breakage' AND owner_id = 'operator'"
            )
            fees = await store.pool.fetchval(
                "SELECT account_id FROM accounts WHERE kind = 'operator_fee_revenue' AND owner_id = 'operator'"
            )
            batch = BatchWrite(
                created_at=AT,
                new_members=[("ann", MEMBER_ACCOUNT_ID)],
                transactions=[(1, 1, "shop", "ann", 250, 2500, None, None, "k1", 0)],
                # posted member first: its account id is the largest, so an order by account would differ
                entries=[(1, MEMBER_ACCOUNT_ID, 250), (1, fees, -50), (1, breakage, -200)],
                idempotency=[("shop", "k1", "Earn", json.dumps(REQUEST), "OK", json.dumps(RESPONSE), "")],
            )
            async with store.pool.acquire() as c, c.transaction():
                await Store._write_many(store, c, [batch], 30.0, lambda _step: None)
            # the records' row, as the batch's log append writes it (migration 0023)
            batch_id = await insert_records(store.pool, batch.idempotency, AT, batch_id=1)
            group = await member_store.reversal_group(store.pool, 1)
            assert [leg[0] for leg in group["originals"][0]["legs"]] == [MEMBER_ACCOUNT_ID, fees, breakage]
            assert [leg[4] for leg in group["originals"][0]["legs"]] == [250, -50, -200]
            ids = [r[0] for r in await store.pool.fetch("SELECT entry_id FROM entries ORDER BY entry_id")]
            assert len(set(ids)) == len(ids) == 3
            stored = await store.stored_outcomes({("shop", "k1"): [batch_id], ("shop", "absent"): [batch_id]})
            assert list(stored) == [("shop", "k1")]
            outcome = stored[("shop", "k1")]
            assert (outcome.method, outcome.request, outcome.outcome, outcome.response, outcome.message) == (
                "Earn",
                REQUEST,
                "OK",
                RESPONSE,
                "",
            )
            # json keeps the text as the projector sent it
            assert await store.pool.fetchval("SELECT request::text FROM idempotency_keys") == json.dumps(REQUEST)
            assert (
                await store.pool.fetchval("SELECT kind FROM accounts WHERE account_id = $1", MEMBER_ACCOUNT_ID)
                == ACCOUNT_MEMBER
            )
            assert await store.pool.fetchval("SELECT asset_code FROM transactions") == ASSET_POINTS
        finally:
            await store.close()

    run(go())


def plan_indexes(plan: dict) -> set[str]:
    found = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", []):
        found |= plan_indexes(child)
    return found


def test_reads_by_transaction_and_by_key_keep_their_index_plans(database_url):
    async def go():
        c = await asyncpg.connect(database_url)
        filler = c.transaction()  # rolled back: the other tests see the table as the batch left it
        await filler.start()
        try:
            await c.execute(
                """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                       idempotency_key, created_at, leg_accounts, leg_amounts)
                   SELECT 1000 + i, 1, 'shop', 'ann', 'POINTS', 1, 'fill-' || i, now(),
                          ARRAY[1 + i % 7, 2 + i % 7, 3, 4], ARRAY[1 + i, -1 - i, 2, -2]
                   FROM generate_series(1, 20000) i"""
            )
            # 20,000 batch rows of a record each (migration 0023)
            await c.execute(
                """INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
                   SELECT 100000 + i, now(), 1, convert_to('[["m' || i % 50 || '"],["key-' || i || '"]]', 'UTF8'),
                          convert_to('[["Earn"],[{}],["OK"],[null],[""]]', 'UTF8')
                   FROM generate_series(1, 20000) i"""
            )
            await c.execute("ANALYZE transactions; ANALYZE idempotency_batches")
            # the legs of one transaction (reversal_group, list_transactions' lateral join, statement lines)
            legs = await c.fetchval(
                """EXPLAIN (FORMAT JSON) SELECT e.account_id, e.amount FROM entries e
                   WHERE e.transaction_id = $1 ORDER BY e.entry_id""",
                5000,
            )
            assert "transactions_pkey" in plan_indexes(json.loads(legs)[0]["Plan"])
            # the checkpoint's tail (tail_deltas, account_balances): entries after a transaction id
            tail = await c.fetchval(
                """EXPLAIN (FORMAT JSON) SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest
                   FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount
                         FROM transactions WHERE transaction_id > $1) l
                   GROUP BY account_id""",
                20_990,
            )
            assert "transactions_pkey" in plan_indexes(json.loads(tail)[0]["Plan"])
            # stored_outcomes' look-up of a batch's keys: the rows of the batches the in-memory table names
            keys = await c.fetchval(
                """EXPLAIN (FORMAT JSON) SELECT batch_id, keys, records FROM idempotency_batches
                   WHERE batch_id = ANY($1::bigint[]) ORDER BY batch_id""",
                [100_001, 102_001],
            )
            assert "idempotency_batches_pkey" in plan_indexes(json.loads(keys)[0]["Plan"])
        finally:
            await filler.rollback()
            await c.close()

    run(go())
