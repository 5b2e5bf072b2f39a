"""reconcile's check of the rows a member's history reads transfers and merges through (member_transfers,
member_merges; member_store.member_history): each names the members, points and fee its transaction's
entries moved. Against a ledger written by hand with SQL (tests/integration/ledger_rows.py), no service: a
sound one reconciles, and each corruption of a row is reported."""

from __future__ import annotations

import asyncio

import pytest

from processor import kinds
from processor.store import Store
from tests.integration.ledger_rows import OPERATOR, Ledger

pytestmark = pytest.mark.timeout(120)
MESSAGE = "transfer or merge {} is not recorded (member_transfers, member_merges) as its entries moved it"


async def _seed_ledger(ledger: Ledger) -> dict[str, int]:
    """x is credited 1,000, sends y 400 (fee 20: y receives 380), and z, credited 50, is merged into x."""
    x, y, z = [await ledger.member(m) for m in ("x", "y", "z")]
    for member, points in ((x, 1_000), (z, 50)):
        await ledger.post(
            kinds.KIND_ADJUSTMENT_CREDIT,
            OPERATOR,
            member,
            points,
            [("operator_adjustments", OPERATOR, -points), ("member", member, points)],
            program_version=None,
        )
    transfer = await ledger.post(
        kinds.KIND_TRANSFER,
        OPERATOR,
        x,
        400,
        [("member", x, -400), ("member", y, 380), ("operator_transfer_fees", OPERATOR, 20)],
        fee=20,
        program_version=None,
    )
    merge = await ledger.post(
        kinds.KIND_MERGE, OPERATOR, z, 50, [("member", z, -50), ("member", x, 50)], program_version=None
    )
    await ledger.c.execute(
        """INSERT INTO member_adjustments (transaction_id, member_id, points, reason, note, key_id, created_at)
           SELECT transaction_id, member_id, amount, 1, '', 'k', now() FROM transactions WHERE kind = $1""",
        kinds.KIND_ADJUSTMENT_CREDIT,
    )
    await ledger.c.execute(
        """INSERT INTO member_transfers (transaction_id, from_member_id, to_member_id, points, fee, created_at)
           VALUES ($1, 'x', 'y', 400, 20, now())""",
        transfer,
    )
    await ledger.c.execute(
        """INSERT INTO member_merges (source_member_id, target_member_id, transaction_id, points, created_at)
           VALUES ('z', 'x', $1, 50, now())""",
        merge,
    )
    return {"transfer": transfer, "merge": merge}


def _reconciled(create_database, corruption: str | None = None) -> tuple[dict[str, int], list[str]]:
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            rows = await _seed_ledger(ledger)
            if corruption is not None:
                await ledger.c.execute(corruption)
        store = await Store.open(url, 2)
        try:
            problems = await store.ledger_discrepancies()
        finally:
            await store.close()
        return rows, problems

    return asyncio.run(go())


def test_a_sound_ledger_with_a_transfer_and_a_merge_reconciles(create_database):
    _, problems = _reconciled(create_database)
    assert problems == []


@pytest.mark.parametrize(
    "corruption, which",
    [
        ("UPDATE member_transfers SET to_member_id = 'z'", "transfer"),
        ("UPDATE member_transfers SET from_member_id = 'y'", "transfer"),
        ("UPDATE member_transfers SET fee = 0", "transfer"),
        ("DELETE FROM member_transfers", "transfer"),
        ("UPDATE member_merges SET target_member_id = 'y'", "merge"),
        ("UPDATE member_merges SET points = 40", "merge"),
        ("DELETE FROM member_merges", "merge"),
    ],
)
def test_a_transfer_or_merge_row_that_does_not_match_its_entries_is_reported(create_database, corruption, which):
    rows, problems = _reconciled(create_database, corruption)
    assert MESSAGE.format(rows[which]) in problems, problems
