"""The program rules' rows as Store._write_rules writes them (member_programs by MERGE, lots keyed by
(expires_at_us, lot_id, member_id) since migration 0018), batch after batch on a real Postgres: a member
new and then known, a link's time kept once set, lots created, changed, restored after being deleted
and gone, consumed pieces replaced; what is read back is exactly the state written."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from processor import rules
from processor.program import MemberRules, RulesWrite
from processor.store import Store
from tests.harness import migrate, run

AT = [dt.datetime(2026, 12, 5, 12, 0, second, tzinfo=dt.timezone.utc) for second in range(10)]
YEAR_US = 365 * 86_400_000_000


@pytest.fixture(scope="module")
def database_url(create_database):
    return migrate(create_database())


async def write(connection: asyncpg.Connection, r: RulesWrite, at: dt.datetime) -> None:
    async with connection.transaction():
        await Store._write_rules(connection, r, at, 30.0, lambda _step: None)


async def members(connection: asyncpg.Connection) -> dict:
    rows = await connection.fetch(
        """SELECT member_id, acquirer_id, referrer_id, referral_paid, level, levels_reached,
                  qualifying_point_units, day_buckets::text AS day_buckets, linked_at FROM member_programs"""
    )
    return {r["member_id"]: tuple(r)[1:] for r in rows}


async def lots(connection: asyncpg.Connection) -> set:
    rows = await connection.fetch("SELECT member_id, lot_id, expires_at_us, issuer_id, amount FROM lots")
    return {tuple(r) for r in rows}


def test_members_inserted_then_updated_and_linked_at_kept(database_url):
    async def go():
        c = await asyncpg.connect(database_url)
        try:
            await write(
                c,
                RulesWrite(
                    program_id="p",
                    members={
                        "m-new": MemberRules(level="registered", qualifying=10),
                        "m-linked": MemberRules(acquirer_id="shop", level="registered", qualifying=5),
                    },
                ),
                AT[0],
            )
            assert await members(c) == {
                "m-new": (None, None, False, "registered", 0, 10, "{}", None),
                "m-linked": ("shop", None, False, "registered", 0, 5, "{}", AT[0]),
            }
            # known members updated in place; one new beside them; the first link's time is kept
            await write(
                c,
                RulesWrite(
                    program_id="p",
                    members={
                        "m-new": MemberRules(
                            acquirer_id="cafe",
                            referrer_id="m-linked",
                            referral_paid=True,
                            level="blue",
                            levels_reached=3,
                            qualifying=700,
                            day_buckets=((20_000, 300), (20_001, 400)),
                        ),
                        "m-linked": MemberRules(acquirer_id="shop", level="blue", levels_reached=1, qualifying=9),
                        "m-third": MemberRules(level="registered", qualifying=1),
                    },
                ),
                AT[1],
            )
            assert await members(c) == {
                "m-new": ("cafe", "m-linked", True, "blue", 3, 700, '{"20000": 300, "20001": 400}', AT[1]),
                "m-linked": ("shop", None, False, "blue", 1, 9, "{}", AT[0]),
                "m-third": (None, None, False, "registered", 0, 1, "{}", None),
            }
        finally:
            await c.close()

    run(go())


def test_lots_created_changed_restored_and_gone(database_url):
    base = 1_900_000_000_000_000
    a1 = rules.Lot(101, 500, base + YEAR_US, "shop")
    a2 = rules.Lot(102, 300, base + YEAR_US + 1, "shop")
    b1 = rules.Lot(101, 50, base + 2 * YEAR_US, "cafe")  # the same lot id and a later expiry: another key

    async def go():
        c = await asyncpg.connect(database_url)
        try:
            await write(
                c,
                RulesWrite(
                    program_id="p",
                    lots={"a": ([], [a1, a2]), "b": ([], [b1])},
                    new_lots={"a": {(101, a1.expires_at_us), (102, a2.expires_at_us)}, "b": {(101, b1.expires_at_us)}},
                ),
                AT[2],
            )
            assert await lots(c) == {
                ("a", 101, a1.expires_at_us, "shop", 500),
                ("a", 102, a2.expires_at_us, "shop", 300),
                ("b", 101, b1.expires_at_us, "cafe", 50),
            }
            # a's first lot partly spent, its second gone; b's lot gone; a new lot of b's
            b2 = rules.Lot(103, 70, base + YEAR_US + 5, "shop")
            await write(
                c,
                RulesWrite(
                    program_id="p",
                    lots={
                        "a": ([(102, a2.expires_at_us)], [rules.Lot(101, 120, a1.expires_at_us, "shop")]),
                        "b": ([(101, b1.expires_at_us)], [b2]),
                    },
                    new_lots={"b": {(103, b2.expires_at_us)}},
                ),
                AT[3],
            )
            assert await lots(c) == {
                ("a", 101, a1.expires_at_us, "shop", 120),
                ("b", 103, b2.expires_at_us, "shop", 70),
            }
            # a refund restores b's deleted lot (not one the batch created: upserted, so inserted again)
            await write(c, RulesWrite(program_id="p", lots={"b": ([], [b1])}), AT[4])
            assert await lots(c) == {
                ("a", 101, a1.expires_at_us, "shop", 120),
                ("b", 103, b2.expires_at_us, "shop", 70),
                ("b", 101, b1.expires_at_us, "cafe", 50),
            }
            # a created key that exists fails the batch (COPY on the primary key), writing nothing
            with pytest.raises(asyncpg.UniqueViolationError):
                await write(
                    c,
                    RulesWrite(program_id="p", lots={"b": ([], [b2])}, new_lots={"b": {(103, b2.expires_at_us)}}),
                    AT[5],
                )
            assert len(await lots(c)) == 3
            # the expiry-notice scan's range in expiry order is served by the primary key
            plan = "\n".join(
                r[0]
                for r in await c.fetch(
                    """EXPLAIN SELECT member_id, expires_at_us FROM lots
                       WHERE expires_at_us > $1 AND expires_at_us <= $2 ORDER BY expires_at_us LIMIT 10""",
                    base,
                    base + YEAR_US + 10,
                )
            )
            assert "lots_pkey" in plan or "Seq Scan" in plan  # tiny table: either; the index exists
            key = await c.fetchval(
                """SELECT pg_get_indexdef(indexrelid) FROM pg_index
                   WHERE indrelid = 'lots'::regclass AND indisprimary"""
            )
            assert "(expires_at_us, lot_id, member_id)" in key
        finally:
            await c.close()

    run(go())


def test_pieces_replaced(database_url):
    piece = rules.Lot(101, 40, 1_900_000_000_000_000 + YEAR_US, "shop")
    never = rules.Lot(0, 5, None, "shop")

    async def go():
        c = await asyncpg.connect(database_url)
        try:
            await write(c, RulesWrite(program_id="p", pieces={(2, 900): (piece, never)}, new_pieces={(2, 900)}), AT[6])
            await write(c, RulesWrite(program_id="p", pieces={(1, 7): (piece,)}, new_pieces={(1, 7)}), AT[6])
            # a hold's pieces replaced (a partial capture gave some back), then its last ones deleted
            await write(
                c,
                RulesWrite(program_id="p", pieces={(1, 7): (rules.Lot(101, 10, piece.expires_at_us, "shop"),)}),
                AT[7],
            )
            rows = await c.fetch("SELECT owner_kind, owner_id, lot_id, amount FROM lot_consumptions ORDER BY 1, 2, 3")
            assert [tuple(r) for r in rows] == [(1, 7, 101, 10), (2, 900, 0, 5), (2, 900, 101, 40)]
            await write(c, RulesWrite(program_id="p", pieces={(1, 7): ()}), AT[8])
            assert await c.fetchval("SELECT count(*) FROM lot_consumptions WHERE owner_kind = 1") == 0
        finally:
            await c.close()

    run(go())
