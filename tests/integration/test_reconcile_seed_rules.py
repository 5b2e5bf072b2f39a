"""reconcile's checks for the seed systems' postings (issue 16; docs/RULES.md section 11, invariant 6), each
against a ledger written by hand with SQL (tests/integration/ledger_rows.py), no service: a sound ledger
with a merchant match, its reversal and a sign-up bonus reconciles; each corruption is reported by the
check that owns it."""

from __future__ import annotations

import asyncio

import pytest

from processor import rules
from processor.store import Store
from tests.integration.ledger_rows import EARN, MERCHANT_VOUCHER_SPEND, OPERATOR, VOUCHERS, Ledger, move_legs

pytestmark = pytest.mark.timeout(120)

MATCH, MATCH_REVERSAL, SIGNUP = rules.KIND_MERCHANT_MATCH, rules.KIND_MERCHANT_MATCH_REVERSAL, rules.KIND_SIGNUP_BONUS
FAN_REWARD, FAN_REWARD_REVERSAL, DIVIDEND = rules.KIND_FAN_REWARD, rules.KIND_FAN_REWARD_REVERSAL, rules.KIND_DIVIDEND


async def _seed_ledger(ledger: Ledger) -> dict[str, int]:
    """U enrols at M (sign-up 5,000), earns 2,000 there (M matches 2,000), and 1,000 of the earn is refunded
    (half the match reversed). merchant_points:m = 1,000 = -operator_merchant_match.
    Vouchers: A, U's acquirer, gets a fan reward of 100; spends 150 at the store S (100 held, 50 on credit);
    40 of the reward is reversed (all owed: A holds none); a dividend of 90 repays what A owes."""
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
    a = await ledger.merchant("a")
    store = await ledger.merchant("s")
    fan_reward = await ledger.post(
        FAN_REWARD,
        a,
        u,
        100,
        [("operator_fan_rewards", OPERATOR, -100, VOUCHERS), ("merchant_vouchers", a, 100, VOUCHERS)],
    )
    spend = await ledger.post(
        MERCHANT_VOUCHER_SPEND,
        a,
        "",
        150,
        [
            ("merchant_vouchers", a, -100, VOUCHERS),
            ("merchant_voucher_credit", a, -50, VOUCHERS),
            ("merchant_redeemed", store, 150, VOUCHERS),
        ],
    )
    fan_reversal = await ledger.post(
        FAN_REWARD_REVERSAL,
        a,
        u,
        40,
        [("operator_fan_rewards", OPERATOR, 40, VOUCHERS), ("merchant_voucher_credit", a, -40, VOUCHERS)],
    )
    dividend = await ledger.post(
        DIVIDEND,
        a,
        "",
        90,
        [("operator_dividends", OPERATOR, -90, VOUCHERS), ("merchant_voucher_credit", a, 90, VOUCHERS)],
    )
    return {
        "signup": signup,
        "earn": earn,
        "match": match,
        "refund": refund,
        "reversal": reversal,
        "fan_reward": fan_reward,
        "spend": spend,
        "fan_reversal": fan_reversal,
        "dividend": dividend,
    }


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
    assert any("kinds 6..15" in name and "27, 28, 29, 30, 31" in name for name in reported), reported
    assert any("merchant_points" in name and "operator_merchant_match" in name for name in reported), reported


def test_a_match_credited_to_another_merchant_is_reported(create_database):
    async def corrupt(ledger, rows):
        other = await ledger.account("merchant_points", await ledger.merchant("other"))
        await ledger.execute(
            move_legs("merchant_points"),
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
            move_legs("operator_signup_bonuses"),
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


def test_a_fan_reward_credited_to_another_merchant_is_reported(create_database):
    async def corrupt(ledger, rows):
        other = await ledger.account("merchant_vouchers", await ledger.merchant("other"), VOUCHERS)
        await ledger.execute(
            move_legs("merchant_vouchers"),
            rows["fan_reward"],
            other,
        )

    rows, problems, _ = _reconciled(create_database, corrupt)
    shape = [p for p in problems if f"transaction {rows['fan_reward']} of kind 30" in p]
    assert len(shape) == 1, problems
    assert "operator_fan_rewards -amount, the transaction's merchant_vouchers and merchant_voucher_credit" in shape[0]


def test_a_fan_reward_reversal_not_taken_from_the_acquirer_is_reported(create_database):
    async def corrupt(ledger, rows):
        account = await ledger.account("member_voucher_credit", "u", VOUCHERS)
        await ledger.execute(
            move_legs("merchant_voucher_credit"),
            rows["fan_reversal"],
            account,
        )

    rows, problems, _ = _reconciled(create_database, corrupt)
    shape = [p for p in problems if f"transaction {rows['fan_reversal']} of kind 31" in p]
    assert len(shape) == 1, problems
    assert shape[0].endswith(
        "its entries: operator_fan_rewards:operator VOUCHERS 40, member_voucher_credit:u VOUCHERS -40"
    ), shape[0]


def test_a_merchant_spend_on_credit_of_another_merchant_is_reported(create_database):
    async def corrupt(ledger, rows):
        account = await ledger.account("merchant_voucher_credit", await ledger.merchant("other"), VOUCHERS)
        await ledger.execute(
            move_legs("merchant_voucher_credit"),
            rows["spend"],
            account,
        )

    rows, problems, _ = _reconciled(create_database, corrupt)
    assert any(f"transaction {rows['spend']} of kind 14" in p for p in problems), problems
