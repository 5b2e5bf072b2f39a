"""A projection of several batches writes the program rules' state rows once, each at its latest state
(Store._write_many, processor/rules_rows.py): the tables hold exactly what writing the batches one by
one leaves, for the state machine's own batches in groups of several sizes and for hand-made batches
that a group must get right (a member changed in three batches, a lot consumed in one batch and
restored in the next, a lot created and consumed within the group, a link's time, pieces replaced,
an earn refunded in the batch after it)."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from loadtest.bench_state_machine import NOW_US, batches, machine
from processor import events, rules
from processor.program import EarnRecord, MemberRules, RulesWrite
from processor.store import BatchWrite, Store
from tests.harness import migrate, run
from tests.integration.helpers import table_contents

pytestmark = pytest.mark.timeout(240)

AT = [dt.datetime(2026, 12, 6, 3, 0, second, tzinfo=dt.timezone.utc) for second in range(10)]
YEAR_US = 365 * 86_400_000_000
EXPIRES = 1_900_000_000_000_000 + YEAR_US
# the rules' tables with the columns that order their rows (tier_events and member_events: the per-batch
# events, written in order either way)
TABLES = {
    "member_programs": "member_id",
    "lots": "member_id, lot_id, expires_at_us",
    "lot_consumptions": "owner_kind, owner_id, lot_id, expires_at_us",
    "earn_rules": "transaction_id",
    "promotion_budgets": "program_id, promotion_id",
    "tier_events": "transaction_id, member_id",
    "member_events": "member_event_id",
}


async def write_groups(url: str, groups: list[list[BatchWrite]]) -> None:
    writer = Store.__new__(Store)  # _write_many reads nothing of the store's but its own methods
    c = await asyncpg.connect(url)
    try:
        for group in groups:
            async with c.transaction():
                await writer._write_many(c, group, 30.0, lambda _step: None)
    finally:
        await c.close()


async def contents(url: str) -> dict[str, list[tuple]]:
    return await table_contents(url, TABLES)


def one_by_one_and_grouped(create_database, writes: list[BatchWrite], sizes: list[int]) -> dict[str, list[tuple]]:
    """Writes the batches one per transaction in one database and in groups of `sizes` in another;
    asserts both hold the same rows; returns them."""
    assert sum(sizes) == len(writes), f"group sizes {sizes} do not add up to {len(writes)} batches"
    single, grouped = migrate(create_database()), migrate(create_database())
    run(write_groups(single, [[w] for w in writes]))
    groups, start = [], 0
    for size in sizes:
        groups.append(writes[start : start + size])
        start += size
    run(write_groups(grouped, groups))
    expected, got = run(contents(single)), run(contents(grouped))
    for table in TABLES:
        assert got[table] == expected[table], f"{table}: a group wrote other rows than its batches one by one"
    return got


def test_state_machine_batches_grouped_write_the_rows_written_one_by_one(create_database):
    # few members, so members earn in many batches and redeems consume lots created a batch or two before
    m = machine(True, 300, 20)
    writes = []
    for i, batch in enumerate(batches(9, 300, 20, seed=5)):
        _, write = m.apply(batch, {}, NOW_US + i * 1_000_000)
        write.member_balances_after = events.balances_after(write, m.ledger)  # as the pipeline does
        m.commit()
        writes.append(write)
    gone = sum(len(keys) for w in writes for keys, _ in w.rules.lots.values())
    assert gone > 0, "no lot was consumed whole: the comparison would not cover deleted lots"
    got = one_by_one_and_grouped(create_database, writes, [1, 3, 5])
    assert got["member_programs"] and got["lots"] and got["earn_rules"] and got["lot_consumptions"]


def rules_batch(at: dt.datetime, r: RulesWrite) -> BatchWrite:
    return BatchWrite(created_at=at, rules=r)


def test_a_group_keeps_each_rows_latest_state(create_database):
    a1 = rules.Lot(101, 500, EXPIRES, "shop")  # m's lot from before the group
    a2 = rules.Lot(102, 300, EXPIRES + 1, "shop")
    earn = EarnRecord("m", "shop", 1, rules.Earn(100), acquirer_id=None, acquiring=0)
    before = rules_batch(
        AT[0],
        RulesWrite(
            program_id="p",
            members={"m": MemberRules(level="registered", qualifying=10)},
            lots={"m": ([], [a1, a2])},
            new_lots={"m": {(101, EXPIRES), (102, EXPIRES + 1)}},
            earns={501: earn},
            new_earns={501},
        ),
    )
    fresh = rules.Lot(201, 80, EXPIRES + 2, "cafe")  # created and consumed within the group
    group = [
        # batch 1: m earns (a new lot), consumes a1 whole and part of a2; its redeem's pieces
        rules_batch(
            AT[1],
            RulesWrite(
                program_id="p",
                members={"m": MemberRules(level="registered", qualifying=20)},
                lots={"m": ([(101, EXPIRES)], [fresh, rules.Lot(102, 100, EXPIRES + 1, "shop")])},
                new_lots={"m": {(201, EXPIRES + 2)}},
                pieces={(2, 601): (a1, rules.Lot(102, 200, EXPIRES + 1, "shop"))},
                new_pieces={(2, 601)},
                budgets={"promo": 5},
            ),
        ),
        # batch 2: the redeem refunded, a1 restored; the new lot consumed whole; m linked; the earn
        # of before refunded in part
        rules_batch(
            AT[2],
            RulesWrite(
                program_id="p",
                members={"m": MemberRules(acquirer_id="shop", level="blue", qualifying=30)},
                lots={"m": ([(201, EXPIRES + 2)], [a1, a2])},
                pieces={(2, 601): (), (2, 602): (fresh,)},
                new_pieces={(2, 602)},
                earns={501: earn.replace(refunded_base=40)},
                budgets={"promo": 7},
            ),
        ),
        # batch 3: m's third state; the link's time stays batch 2's
        rules_batch(
            AT[3],
            RulesWrite(
                program_id="p",
                members={"m": MemberRules(acquirer_id="shop", level="blue", levels_reached=3, qualifying=40)},
                tier_events=[(603, "m", "registered", "blue")],
            ),
        ),
    ]
    got = one_by_one_and_grouped(create_database, [before, *group], [1, 3])
    assert got["member_programs"] == [("m", "shop", None, False, "blue", 3, 40, "{}", AT[2])]
    assert got["lots"] == [("m", 101, EXPIRES, "shop", 500), ("m", 102, EXPIRES + 1, "shop", 300)]
    assert [r[:3] + r[-1:] for r in got["lot_consumptions"]] == [(2, 602, 201, 80)]
    assert [(r[0], r[5]) for r in got["earn_rules"]] == [(501, 40)]
    assert got["promotion_budgets"] == [("p", "promo", 7)]
    assert [r[:2] for r in got["tier_events"]] == [(603, "m")]


def test_a_group_writes_fewer_rows_than_its_batches(create_database):
    """What coalescing saves: the group's statements carry each member once and never a lot created and
    consumed within it."""
    url = migrate(create_database())
    lot = rules.Lot(301, 60, EXPIRES, "shop")
    group = [
        rules_batch(
            AT[4 + i],
            RulesWrite(
                program_id="p",
                members={"m": MemberRules(level="registered", qualifying=10 * (i + 1))},
                lots={"m": ([], [lot])} if i == 0 else {"m": ([(301, EXPIRES)], [])} if i == 1 else {},
                new_lots={"m": {(301, EXPIRES)}} if i == 0 else {},
            ),
        )
        for i in range(3)
    ]

    async def go():
        c = await asyncpg.connect(url)
        try:
            await c.execute("SELECT pg_stat_reset()")
            async with c.transaction():
                await Store.__new__(Store)._write_many(c, group, 30.0, lambda _step: None)
            await c.execute("SELECT pg_stat_force_next_flush()")
            return {
                r["relname"]: (r["n_tup_ins"], r["n_tup_upd"], r["n_tup_del"])
                for r in await c.fetch(
                    """SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables
                       WHERE relname IN ('member_programs', 'lots')"""
                )
            }
        finally:
            await c.close()

    counts = run(go())
    assert counts["member_programs"] == (1, 0, 0)  # one insert: the third batch's state
    assert counts["lots"] == (0, 0, 0)  # created and consumed within the group: never written
