"""Migration 0022 (each transaction's legs packed into its row, `entries` a view) on a real Postgres: a
database with entries rows upgraded from 0021 keeps every leg, in order, with the same sums per account;
the view returns exactly the legs a batch wrote, in the entries' order; the balance checkpoint folds them."""

from __future__ import annotations

import datetime as dt
import shutil

import asyncpg

from processor import store as store_module
from processor.store import BatchWrite, Store
from tests.harness import migrate, run
from tests.integration.test_copy_binary import through_migration

AT = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)


def test_upgrading_from_0021_keeps_every_leg_in_order_and_every_account_sum(create_database, tmp_path, monkeypatch):
    url = create_database()
    # the migrations up to 0022 only: the upgrade under test is 0021 -> 0022, whatever later ones exist
    before_0023 = tmp_path / "migrations"
    before_0023.mkdir()
    for path in sorted(store_module.MIGRATIONS.glob("*.sql")):
        if int(path.name.split("_", 1)[0]) <= 22:
            shutil.copy(path, before_0023 / path.name)
    monkeypatch.setattr(store_module, "MIGRATIONS", before_0023)

    async def go():
        await through_migration(url, 21)
        c = await asyncpg.connect(url)
        try:
            await c.execute(
                "INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps) VALUES ('shop', 0, 1000)"
            )
            await c.execute("INSERT INTO members (member_id, created_at) VALUES ('ann', now()), ('bob', now())")
            accounts = {}
            for kind, owner, asset in (
                ("member", "ann", "POINTS"),
                ("member", "bob", "POINTS"),
                ("merchant_issued", "shop", "POINTS"),
                ("member", "ann", "VOUCHERS"),
                ("operator_dividends", "operator", "VOUCHERS"),
            ):
                accounts[(kind, owner, asset)] = await c.fetchval(
                    """INSERT INTO accounts (kind, owner_id, asset_code) VALUES ($1, $2, $3)
                       ON CONFLICT (kind, owner_id, asset_code) DO UPDATE SET kind = EXCLUDED.kind
                       RETURNING account_id""",
                    kind,
                    owner,
                    asset,
                )
            ann, bob, issued = (
                accounts["member", "ann", "POINTS"],
                accounts["member", "bob", "POINTS"],
                accounts["merchant_issued", "shop", "POINTS"],
            )
            vouchers, dividends = (
                accounts["member", "ann", "VOUCHERS"],
                accounts["operator_dividends", "operator", "VOUCHERS"],
            )
            for transaction_id in range(1, 7):
                await c.execute(
                    """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                                 idempotency_key, created_at)
                       VALUES ($1::bigint, 1, 'shop', 'ann', 'POINTS', 10, 'k' || $1::bigint, $2)""",
                    transaction_id,
                    AT,
                )
            # entry_id order is not account order, and a transaction's legs need not be adjacent by id;
            # transaction 5 mixes assets; transaction 6 has no legs
            legs = [
                (2, bob, "POINTS", 7),
                (1, issued, "POINTS", -10),
                (2, issued, "POINTS", -7),
                (1, ann, "POINTS", 10),
                (3, ann, "POINTS", -4),
                (3, issued, "POINTS", 4),
                (5, dividends, "VOUCHERS", -3),
                (5, vouchers, "VOUCHERS", 3),
                (5, ann, "POINTS", 1),
                (5, issued, "POINTS", -1),
                (4, bob, "POINTS", 2),
                (4, issued, "POINTS", -2),
            ]
            for leg in legs:
                await c.execute(
                    "INSERT INTO entries (transaction_id, account_id, asset_code, amount) VALUES ($1, $2, $3, $4)",
                    *leg,
                )
            before_rows = await c.fetch(
                "SELECT transaction_id, account_id, asset_code, amount FROM entries ORDER BY transaction_id, entry_id"
            )
            before_sums = await c.fetch(
                "SELECT account_id, asset_code, sum(amount) AS s FROM entries GROUP BY 1, 2 ORDER BY 1, 2"
            )
            assert await store_module.migrate(c) == ["0022_entries_packed.sql"]
            after_rows = await c.fetch(
                "SELECT transaction_id, account_id, asset_code, amount FROM entries ORDER BY entry_id"
            )
            after_sums = await c.fetch(
                "SELECT account_id, asset_code, sum(amount) AS s FROM entries GROUP BY 1, 2 ORDER BY 1, 2"
            )
            assert [tuple(r) for r in after_rows] == [tuple(r) for r in before_rows]
            assert [tuple(r) for r in after_sums] == [tuple(r) for r in before_sums]
            packed = {
                r["transaction_id"]: (r["leg_accounts"], r["leg_amounts"], r["leg_assets"])
                for r in await c.fetch("SELECT transaction_id, leg_accounts, leg_amounts, leg_assets FROM transactions")
            }
            assert packed[1] == ([issued, ann], [-10, 10], None)
            assert packed[5] == (
                [dividends, vouchers, ann, issued],
                [-3, 3, 1, -1],
                ["VOUCHERS", "VOUCHERS", "POINTS", "POINTS"],
            )
            assert packed[6] == ([], [], None)
            # the balances view still adds the tail (the checkpoint is at 0: every leg)
            balances = {
                r["account_id"]: r["balance"] for r in await c.fetch("SELECT account_id, balance FROM account_balances")
            }
            assert balances[ann] == 10 - 4 + 1 and balances[bob] == 9 and balances[vouchers] == 3
        finally:
            await c.close()

    run(go())


def test_the_view_returns_exactly_the_legs_a_batch_wrote_and_the_checkpoint_folds_them(create_database):
    url = migrate(create_database())

    async def go():
        store = await Store.open(url, 2)
        try:
            c0 = store.pool
            await store.add_merchant("shop", 1000)
            issued = await c0.fetchval(
                "SELECT account_id FROM accounts WHERE kind = 'merchant_issued' AND owner_id = 'shop'"
            )
            vouchers = await c0.fetchval(
                "INSERT INTO accounts (kind, owner_id, asset_code) VALUES ('merchant_vouchers', 'shop', 'VOUCHERS') "
                "RETURNING account_id"
            )
            dividends = await c0.fetchval(
                "SELECT account_id FROM accounts WHERE kind = 'operator_dividends' AND asset_code = 'VOUCHERS'"
            ) or await c0.fetchval(
                "INSERT INTO accounts (kind, owner_id, asset_code) VALUES ('operator_dividends', 'operator', 'VOUCHERS') "
                "RETURNING account_id"
            )
            ann, bob = 900_001, 900_002
            batch = BatchWrite(
                created_at=AT,
                new_members=[("ann", ann), ("bob", bob)],
                transactions=[
                    (1, 1, "shop", "ann", 250, 2500, None, None, "k1", 0),
                    (2, 1, "shop", "bob", 40, 400, None, None, "k2", 0),
                    (3, 11, "shop", "", 5, None, None, None, "k3", 0),
                    (4, 1, "shop", "ann", 0, 0, None, None, "k4", 0),  # no legs
                ],
                # interleaved across transactions: each transaction's legs keep their own order
                entries=[
                    (2, bob, 40),
                    (1, ann, 250),
                    (2, issued, -40),
                    (3, dividends, -5, "VOUCHERS"),
                    (1, issued, -250),
                    (3, vouchers, 5, "VOUCHERS"),
                ],
            )
            async with store.pool.acquire() as c, c.transaction():
                await Store._write_many(store, c, [batch], 30.0, lambda _step: None)
            rows = await c0.fetch(
                "SELECT transaction_id, account_id, asset_code, amount FROM entries ORDER BY entry_id"
            )
            assert [tuple(r) for r in rows] == [
                (1, ann, "POINTS", 250),
                (1, issued, "POINTS", -250),
                (2, bob, "POINTS", 40),
                (2, issued, "POINTS", -40),
                (3, dividends, "VOUCHERS", -5),
                (3, vouchers, "VOUCHERS", 5),
            ]
            assert await c0.fetchval("SELECT leg_accounts FROM transactions WHERE transaction_id = 4") == []
            assert await c0.fetchval("SELECT leg_assets FROM transactions WHERE transaction_id = 1") is None
            tail, newest = await store.tail_deltas(0)
            assert newest == 3
            assert tail == {ann: 250, bob: 40, issued: -290, dividends: -5, vouchers: 5}
            # the balance columns are not touched by the batch; the fold moves them
            await store.acquire_writer_lock()
            changed = await store.write_checkpoint(0, 4, 10.0)
            assert changed == 5
            balances = {
                r["account_id"]: r["balance"]
                for r in await c0.fetch(
                    "SELECT account_id, balance FROM accounts WHERE account_id = ANY($1::bigint[])", [ann, bob, issued]
                )
            }
            assert balances == {ann: 250, bob: 40, issued: -290}
        finally:
            await store.close()

    run(go())
