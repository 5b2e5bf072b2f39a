"""A merchant's statement lines found through the ids written at the cut (statement_line_ids, migration 0024)
rather than through transactions_merchant_hash: the same rows, in the same order, with the same columns and
the same paging as the read of the journal they replace (kept verbatim beside this test,
reference_statement_lines_cb41a10.sql), for periods closed before the migration (it writes their ids) and
after it (close_period writes them), over a journal with every kind of line (own, acquired, dividends,
accepted, reversed) and of non-line; and a page crosses the chunks' boundaries without losing or repeating
a line."""

from __future__ import annotations

import datetime as dt
import pathlib
import random

import asyncpg

from processor import channel_store
from processor.store import MERCHANT_ACCOUNTS, MERCHANT_VOUCHER_ACCOUNTS, Store
from tests.harness import migrate, run
from tests.integration.test_copy_binary import through_migration

REFERENCE = (pathlib.Path(__file__).parent / "reference_statement_lines_cb41a10.sql").read_text()
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
SHOPS = ("shop-0", "shop-1", "shop-2", "shop-3")
# the operator names the member administration's postings (16..22) and the channel's (23, 24); "ghost"
# has no transaction at all
ASKED = (*SHOPS, "operator", "ghost")
# the kinds that may be a line through their legs, drawn more often than the others
LEG_KINDS = (9, 10, 11, 14, 18, 19)
PAGES = ((0, 1), (0, 2), (0, 3), (0, 7), (0, None))


async def reference(c: asyncpg.Connection, period_id: int, merchant_id: str, after: int, limit: int | None) -> list:
    rows = await c.fetch(
        REFERENCE,
        period_id,
        merchant_id,
        after,
        limit,
        list(MERCHANT_ACCOUNTS),
        list(MERCHANT_VOUCHER_ACCOUNTS),
        list(channel_store.POSTING_KIND.values()),
    )
    return [dict(r) for r in rows]


async def fill_journal(c: asyncpg.Connection, seed: int, transactions: int) -> list[int]:
    """Merchants, their POINTS and VOUCHERS clearing accounts (and one that is not), members', the
    operator's; `transactions` transactions of random kinds, merchants, legs and times over four days from
    T0 (and a day before). Returns the transaction ids."""
    shuffled = random.Random(seed)
    await c.execute(
        """INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps)
           SELECT m, row_number() OVER (), 1000 FROM unnest($1::text[]) m""",
        list(SHOPS),
    )
    owned = [(kind, shop, "POINTS") for shop in SHOPS for kind in MERCHANT_ACCOUNTS]
    owned += [
        (kind, shop, "VOUCHERS") for shop in SHOPS for kind in (*MERCHANT_VOUCHER_ACCOUNTS, "merchant_voucher_credit")
    ]
    owned += [
        ("member", "ann", "POINTS"),
        ("member", "bob", "POINTS"),
        ("member", "ann", "VOUCHERS"),
        ("operator_dividends", "operator", "VOUCHERS"),
        ("operator_fee_revenue", "operator", "POINTS"),
    ]
    accounts = []
    for kind, owner, asset in owned:
        accounts.append(
            await c.fetchval(
                """INSERT INTO accounts (kind, owner_id, asset_code) VALUES ($1, $2, $3)
                   ON CONFLICT (kind, owner_id, asset_code) DO UPDATE SET kind = EXCLUDED.kind
                   RETURNING account_id""",
                kind,
                owner,
                asset,
            )
        )
    rows = []
    for transaction_id in range(1, transactions + 1):
        kind = shuffled.choice(LEG_KINDS) if shuffled.random() < 0.5 else shuffled.randint(1, 24)
        merchant_id = shuffled.choice((*SHOPS, "operator"))
        legs = shuffled.sample(accounts, shuffled.randint(0, 4))
        amounts = [shuffled.choice((-1, 1)) * shuffled.randint(1, 500) for _ in legs]
        at = T0 + dt.timedelta(seconds=shuffled.uniform(-86_400, 4 * 86_400))
        rows.append(
            (transaction_id, kind, merchant_id, "ann", "POINTS", 0, "k" + str(transaction_id), at, legs, amounts)
        )
    await c.executemany(
        """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                     idempotency_key, created_at, leg_accounts, leg_amounts)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        rows,
    )
    return [r[0] for r in rows]


def pages(ids: list[int]) -> list[tuple[int, int | None]]:
    """From the start, and from each of a few lines and the gap after it, with a few limits."""
    asked = list(PAGES)
    for transaction_id in ids[:: max(1, len(ids) // 5)] + ids[-1:]:
        for limit in (1, 3, None):
            asked += [(transaction_id, limit), (transaction_id - 1, limit)]
    return asked


def test_lines_of_periods_closed_before_and_after_0024_are_the_ones_the_journal_read_returned(create_database):
    url = create_database()

    async def go():
        # two periods closed before 0024 (settlement_periods as the cut wrote it then): their lines as
        # the read through transactions_merchant_hash returned them
        await through_migration(url, 23)
        c = await asyncpg.connect(url)
        store: Store | None = None
        try:
            ids = await fill_journal(c, seed=14, transactions=1500)
            await c.execute(
                """INSERT INTO settlement_periods (period_id, opened_at, cut_off)
                   VALUES (1, '-infinity', $1), (2, $1, $2)""",
                T0 + dt.timedelta(days=1),
                T0 + dt.timedelta(days=2),
            )
            before: dict[tuple, list] = {}
            for period_id in (1, 2):
                for merchant_id in ASKED:
                    for after, limit in pages(ids):
                        before[period_id, merchant_id, after, limit] = await reference(
                            c, period_id, merchant_id, after, limit
                        )
            # every source of lines is present in each closed period, and "ghost" has none
            for period_id in (1, 2):
                kinds = {r["kind"] for m in SHOPS for r in before[period_id, m, 0, None]}
                assert set(LEG_KINDS) <= kinds, kinds
                assert before[period_id, "operator", 0, None]
                assert not before[period_id, "ghost", 0, None]

            store = await Store.open(url, 2)
            # 0024 and the migrations after it (which leave statement lines alone)
            assert (await store.migrate())[:1] == ["0024_statement_line_ids.sql"]
            names = {r[0] for r in await c.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'transactions'")}
            assert "transactions_merchant_hash" not in names
            assert await c.fetchval("SELECT count(DISTINCT period_id) FROM statement_line_ids") == 2
            for (period_id, merchant_id, after, limit), expected in before.items():
                got = await store.statement_lines(period_id, merchant_id, after, limit)
                assert [dict(r) for r in got] == expected, (period_id, merchant_id, after, limit)

            # a period closed after 0024, in chunks of 4 ids: its lines as the journal read finds them
            store.statement_line_chunk_ids_max = 4
            period, created = await store.close_period(T0 + dt.timedelta(days=3))
            assert created and period["period_id"] == 3
            for merchant_id in ASKED:
                for after, limit in pages(ids):
                    got = await store.statement_lines(3, merchant_id, after, limit)
                    expected = await reference(c, 3, merchant_id, after, limit)
                    assert [dict(r) for r in got] == expected, (merchant_id, after, limit)
            chunks = await c.fetch(
                "SELECT merchant_id, transaction_ids FROM statement_line_ids WHERE period_id = 3 ORDER BY 1, 2"
            )
            assert chunks and max(len(r["transaction_ids"]) for r in chunks) == 4
        finally:
            if store is not None:
                await store.close()
            await c.close()

    run(go())


def test_paging_crosses_the_chunks_boundaries_without_losing_or_repeating_a_line(create_database):
    url = migrate(create_database())

    async def go():
        store = await Store.open(url, 2)
        try:
            c = store.pool
            await c.execute(
                """INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps)
                   VALUES ('shop', 0, 1000), ('rival', 1, 1000)"""
            )
            # shop's lines are the even ids 2..20, rival's the odd ones, interleaved
            await c.execute(
                """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                             idempotency_key, created_at)
                   SELECT i, 1, CASE WHEN i % 2 = 0 THEN 'shop' ELSE 'rival' END, 'ann', 'POINTS', i, 'k' || i,
                          $1::timestamptz + i * interval '1 minute'
                   FROM generate_series(1, 20) i""",
                T0,
            )
            store.statement_line_chunk_ids_max = 3
            await store.close_period(T0 + dt.timedelta(days=1))
            chunks = await c.fetch(
                """SELECT first_transaction_id, transaction_ids FROM statement_line_ids
                   WHERE period_id = 1 AND merchant_id = 'shop' ORDER BY first_transaction_id"""
            )
            assert [(r[0], r[1]) for r in chunks] == [
                (2, [2, 4, 6]),
                (8, [8, 10, 12]),
                (14, [14, 16, 18]),
                (20, [20]),
            ]
            shop = list(range(2, 21, 2))
            for after in range(0, 23):
                for limit in (1, 2, 3, 4, 5, 7, None):
                    got = [r["transaction_id"] for r in await store.statement_lines(1, "shop", after, limit)]
                    rest = [i for i in shop if i > after]
                    assert got == (rest if limit is None else rest[:limit]), (after, limit)
            # as ExportStatement pages: after the last line of the page before
            for limit in (1, 2, 3, 4):
                seen: list[int] = []
                while True:
                    page = await store.statement_lines(1, "shop", seen[-1] if seen else 0, limit)
                    if not page:
                        break
                    assert len(page) <= limit
                    seen += [r["transaction_id"] for r in page]
                assert seen == shop, limit
            assert [r["transaction_id"] for r in await store.statement_lines(1, "rival")] == list(range(1, 20, 2))
            assert await store.statement_lines(2, "shop") == []  # not closed
        finally:
            await store.close()

    run(go())
