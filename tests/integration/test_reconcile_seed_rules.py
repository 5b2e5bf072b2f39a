"""reconcile's checks for the seed systems' postings (issue 16; docs/RULES.md section 11, invariant 6), each
against a ledger written by hand with SQL (tests/integration/ledger_rows.py), no service: a sound ledger
with a merchant match, its reversal and a sign-up bonus reconciles; each corruption is reported by the
check that owns it."""

from __future__ import annotations

import asyncio

import pytest

from processor import rules
from processor.store import Store
from tests.integration.ledger_rows import EARN, OPERATOR, Ledger

pytestmark = pytest.mark.timeout(120)

MATCH, MATCH_REVERSAL, SIGNUP = rules.KIND_MERCHANT_MATCH, rules.KIND_MERCHANT_MATCH_REVERSAL, rules.KIND_SIGNUP_BONUS


async def _seed_ledger(ledger: Ledger) -> dict[str, int]:
    """U enrols at M (sign-up 5,000), earns 2,000 there (M matches 2,000), and 1,000 of the earn is refunded
    (half the match reversed). merchant_points:m = 1,000 = -operator_merchant_match."""
    m = await ledger.merchant("m")
    u = await ledger.member("u")
    signup = await ledger.post(
        SIGNUP, m, u, 5_000, [("operator_signup_bonuses", OPERATOR, -5_000), ("member", u, 5_000)]
    )
    earn = await ledger.post(
        EARN, m, u, 2_000, [("merchant_issued", m, -2_000), ("member", u, 2_000)], purchase_amount=20_000
    )
    match = await ledger.post(
        MATCH, m, u, 2_000, [("operator_merchant_match", OPERATOR, -2_000), ("merchant_points", m, 2_000)]
    )
    refund = await ledger.post(5, m, u, 1_000, [("member", u, -1_000), ("merchant_issued", m, 1_000)])
    reversal = await ledger.post(
        MATCH_REVERSAL, m, u, 1_000, [("operator_merchant_match", OPERATOR, 1_000), ("merchant_points", m, -1_000)]
    )
    return {"signup": signup, "earn": earn, "match": match, "refund": refund, "reversal": reversal}


def _reconciled(create_database, corrupt=None) -> tuple[dict[str, int], list[str], list[str]]:
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            rows = await _seed_ledger(ledger)
            if corrupt is not None:
                await corrupt(ledger, rows)
        reported: list[str] = []
        store = await Store.open(url, 2)
        try:
            problems = await store.ledger_discrepancies(report=reported.append)
        finally:
            await store.close()
        return rows, problems, reported

    return asyncio.run(go())


def test_a_sound_ledger_with_the_seed_rules_reconciles(create_database):
    _, problems, reported = _reconciled(create_database)
    assert problems == []
    assert any("kinds 6..15" in name and "27, 28, 29" in name for name in reported), reported
    assert any("merchant_points" in name and "operator_merchant_match" in name for name in reported), reported


def test_a_match_credited_to_another_merchant_is_reported(create_database):
    async def corrupt(ledger, rows):
        other = await ledger.account("merchant_points", await ledger.merchant("other"))
        await ledger.execute(
            """UPDATE entries e SET account_id = $2 FROM accounts a
               WHERE e.account_id = a.account_id AND e.transaction_id = $1 AND a.kind = 'merchant_points'""",
            rows["match"],
            other,
        )

    rows, problems, _ = _reconciled(create_database, corrupt)
    shape = [p for p in problems if f"transaction {rows['match']} of kind 27" in p]
    assert (
        len(shape) == 1 and "should move operator_merchant_match -amount, the transaction's merchant_points" in shape[0]
    )
    # m's reversal then takes more than m holds
    assert any("merchant_points:m POINTS balance -1000" in p for p in problems), problems


def test_a_sign_up_bonus_funded_from_another_account_is_reported(create_database):
    async def corrupt(ledger, rows):
        account = await ledger.account("operator_referrals", OPERATOR)
        await ledger.execute(
            """UPDATE entries e SET account_id = $2 FROM accounts a
               WHERE e.account_id = a.account_id AND e.transaction_id = $1 AND a.kind = 'operator_signup_bonuses'""",
            rows["signup"],
            account,
        )

    rows, problems, _ = _reconciled(create_database, corrupt)
    assert problems == [
        f"transaction {rows['signup']} of kind 29 (amount 5000, member u, merchant m) should move "
        "operator_signup_bonuses -amount, the transaction's member +amount; its entries: operator_referrals:operator "
        "POINTS -5000, member:u POINTS 5000"
    ]


def test_matched_points_not_funded_by_the_operator_are_reported(create_database):
    async def corrupt(ledger, rows):
        # points appear in a merchant's holding from its own issued account: balanced, but not a match
        await ledger.post(
            rules.KIND_CONVERSION, "m", "u", 0, [("merchant_issued", "m", -700), ("merchant_points", "m", 700)]
        )

    _, problems, _ = _reconciled(create_database, corrupt)
    assert "merchants hold 1700 point-units of matched points, the operator matched 1000" in problems
