"""reconcile's checks for the program rules (docs/RULES.md, "Ledger invariants, extended"), each against
a ledger corrupted by hand: rows written with SQL into a fresh migrated database (tests/integration/
ledger_rows.py), no service. A sound ledger with every kind of rule row reconciles; each corruption is
reported by the check that owns it, in a message that says what is wrong.
"""

from __future__ import annotations

import asyncio

import pytest

from processor import kinds, rules
from processor.reconcile import ACCOUNT_SIGNS
from processor.store import Store
from tests.integration.ledger_rows import (
    MERCHANT_VOUCHER_SPEND,
    OPERATOR,
    VOUCHERS,
    Ledger,
    RulesLedger,
    add_to_legs,
    move_legs,
    rules_ledger,
)

pytestmark = pytest.mark.timeout(120)


async def _discrepancies(url: str, reported: list[str] | None = None) -> list[str]:
    store = await Store.open(url, 2)
    try:
        return await store.ledger_discrepancies(report=(reported.append if reported is not None else lambda _: None))
    finally:
        await store.close()


def corrupted(create_database, corrupt) -> tuple[RulesLedger, list[str]]:
    """rules_ledger() in a fresh database, then `corrupt(ledger, rows)` (a coroutine); what reconcile says."""
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            rows = await rules_ledger(ledger)
            if corrupt is not None:
                await corrupt(ledger, rows)
        return rows, await _discrepancies(url)

    return asyncio.run(go())


def one_like(problems: list[str], *fragments: str) -> str:
    """The one problem that contains every fragment."""
    found = [p for p in problems if all(f in p for f in fragments)]
    assert len(found) == 1, f"expected one problem with {fragments}, got {problems}"
    return found[0]


# ---------------------------------------------------------------------------------------------------
# the sound ledger


def test_a_sound_ledger_with_every_rule_row_reconciles(create_database):
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            await rules_ledger(ledger)
        reported: list[str] = []
        return await _discrepancies(url, reported), reported

    problems, reported = asyncio.run(go())
    assert problems == []
    for check in (
        "sum to zero per asset",
        "keeps its kind's sign",
        "holds an asset its kind may hold",
        "earn record (earn_rules)",
        "with an earn record posts it",
        "promotion's granted budget",
        "expiring lots + pieces held by open holds",
        "consumed lot piece",
        "kinds 6..15",
        "acquiring rewards merchants are owed",
    ):
        assert any(check in name for name in reported), (check, reported)


def test_the_sound_ledger_still_reconciles_once_its_balances_are_checkpointed(create_database):
    async def fold(ledger, rows):
        await ledger.fold_checkpoint()

    _, problems = corrupted(create_database, fold)
    assert problems == []


def test_every_account_kind_has_a_sign_and_every_shape_a_known_kind():
    assert set(ACCOUNT_SIGNS) == set(rules.ACCOUNT_ASSETS)
    assert set(kinds.SHAPED) == {kind.code for kind in kinds.KINDS if kind.code > 5}


def _off_shape(problems: list[str]) -> list[str]:
    """problems less the shape reports of the kind-14 transactions the corruptions below are posted as:
    a carrier for arbitrary balanced entries, whose (checked) shape is not what those tests are about."""
    return [p for p in problems if f"of kind {MERCHANT_VOUCHER_SPEND} " not in p]


# ---------------------------------------------------------------------------------------------------
# (a) every transaction sums to zero per asset


def test_a_transaction_balanced_only_across_assets_is_reported(create_database):
    """Two transactions that each move 5 POINTS against 5 VOUCHERS the other way: each sums to 0 over
    both assets, and so does the journal per asset; only the per-asset sum of each transaction shows it."""

    async def corrupt(ledger, rows):
        member = rows.member
        rows.cross = [
            await ledger.post(
                MERCHANT_VOUCHER_SPEND,
                rows.converter,
                member,
                5,
                [("member", member, 5), ("operator_dividends", OPERATOR, -5, VOUCHERS)],
            ),
            await ledger.post(
                MERCHANT_VOUCHER_SPEND,
                rows.converter,
                member,
                5,
                [("member", member, -5), ("member", member, 5, VOUCHERS)],
            ),
        ]

    rows, problems = corrupted(create_database, corrupt)
    problems = _off_shape(problems)
    first, second = rows.cross
    assert problems == [
        f"transaction {first} entries in POINTS sum to 5, not 0",
        f"transaction {first} entries in VOUCHERS sum to -5, not 0",
        f"transaction {second} entries in POINTS sum to -5, not 0",
        f"transaction {second} entries in VOUCHERS sum to 5, not 0",
    ]


# ---------------------------------------------------------------------------------------------------
# (b) signs, (c) assets


@pytest.mark.parametrize(
    "entries, wrong",
    [
        # operator accounts that only ever fund (<= 0)
        (
            [("operator_referrals", OPERATOR, 1_000), ("operator_tier_rewards", OPERATOR, -1_000)],
            ["account operator_referrals:operator POINTS balance 750: a operator_referrals account never goes above 0"],
        ),
        (
            [("operator_promotions", OPERATOR, 1_000), ("operator_tier_rewards", OPERATOR, -1_000)],
            [
                "account operator_promotions:operator POINTS balance 800: a operator_promotions account never goes above 0"
            ],
        ),
        (
            [("operator_tier_rewards", OPERATOR, 2_000), ("operator_referrals", OPERATOR, -2_000)],
            [
                "account operator_tier_rewards:operator POINTS balance 1100: a operator_tier_rewards account never goes "
                "above 0"
            ],
        ),
        (
            [("operator_dividends", OPERATOR, 5, VOUCHERS), ("member_voucher_credit", "u", -5, VOUCHERS)],
            ["account operator_dividends:operator VOUCHERS balance 5: a operator_dividends account never goes above 0"],
        ),
        # the acquirer is owed (>= 0), the operator paid (<= 0): a reversal larger than the reward breaks both
        (
            [("operator_acquiring", OPERATOR, 100), ("merchant_acquiring", "acq", -100)],
            [
                "account merchant_acquiring:acq POINTS balance -80: a merchant_acquiring account never goes below 0",
                "account operator_acquiring:operator POINTS balance 80: a operator_acquiring account never goes above 0",
            ],
        ),
        # vouchers: members and merchants hold (>= 0), credit is owed (<= 0)
        (
            [("member", "u", -5, VOUCHERS), ("merchant_vouchers", "m2", 5, VOUCHERS)],
            ["account member:u VOUCHERS balance -5: a member account never goes below 0"],
        ),
        (
            [("member_voucher_credit", "u", 5, VOUCHERS), ("operator_dividends", OPERATOR, -5, VOUCHERS)],
            ["account member_voucher_credit:u VOUCHERS balance 5: a member_voucher_credit account never goes above 0"],
        ),
        (
            [("merchant_vouchers", "m2", -5, VOUCHERS), ("member", "u", 5, VOUCHERS)],
            ["account merchant_vouchers:m2 VOUCHERS balance -5: a merchant_vouchers account never goes below 0"],
        ),
        # a member's POINTS (the referrer's 250)
        (
            [("member", "r", -300), ("operator_breakage", OPERATOR, 300)],
            ["account member:r POINTS balance -50: a member account never goes below 0"],
        ),
    ],
)
def test_an_account_on_the_wrong_side_of_zero_is_reported(create_database, entries, wrong):
    """Each corruption is a balanced transaction (carried as kind 14, whose shape report is left out), so
    only the signs are off."""

    async def corrupt(ledger, rows):
        await ledger.post(MERCHANT_VOUCHER_SPEND, rows.converter, rows.member, 0, entries)

    _, problems = corrupted(create_database, corrupt)
    problems = _off_shape(problems)
    signs = [p for p in problems if "never goes" in p]
    assert sorted(signs) == sorted(wrong)
    # the referrer's lot is then more than its points: the lots check says so too, nothing else does
    assert set(problems) - set(signs) <= {"member r: lots 250 + pieces of open holds 0 > posted -50"}


def test_the_sign_rules_read_the_checkpoint_plus_the_tail(create_database):
    """A member driven below 0 after the checkpoint: accounts.balance alone (the checkpoint) is still
    positive, the balance the service sees (checkpoint + tail) is not."""

    async def corrupt(ledger, rows):
        await ledger.fold_checkpoint()
        await ledger.post(
            MERCHANT_VOUCHER_SPEND,
            rows.converter,
            rows.referrer,
            0,
            [("member", rows.referrer, -251), ("operator_breakage", OPERATOR, 251)],
        )

    _, problems = corrupted(create_database, corrupt)
    one_like(problems, "account member:r POINTS balance -1: a member account never goes below 0")


def test_an_account_in_an_asset_its_kind_may_not_hold_is_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.account("merchant_acquiring", rows.acquirer, VOUCHERS)
        await ledger.account("operator_dividends", OPERATOR, "POINTS")
        await ledger.account("operator_bonuses", OPERATOR, "POINTS")

    _, problems = corrupted(create_database, corrupt)
    assert problems == [
        "account merchant_acquiring:acq holds VOUCHERS, which a merchant_acquiring account may not hold (only POINTS)",
        "account operator_dividends:operator holds POINTS, which a operator_dividends account may not hold "
        "(only VOUCHERS)",
        "account operator_bonuses:operator holds POINTS, which no account may hold: 'operator_bonuses' is not "
        "an account kind",
    ]


# ---------------------------------------------------------------------------------------------------
# (d) earn records and promotion budgets


def test_an_earn_record_of_a_missing_or_non_earn_transaction_is_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.execute(
            "INSERT INTO earn_rules (transaction_id, base_point_units, uplift_point_units) "
            "VALUES (999, 0, 0), ($1, 0, 0)",
            rows.redeem,
        )

    rows, problems = corrupted(create_database, corrupt)
    assert problems == [
        f"earn_rules of transaction {rows.redeem}, which is of kind 3, not an earn (1)",
        "earn_rules of transaction 999, which does not exist",
    ]


def test_an_earn_whose_amount_is_not_base_plus_uplift_plus_grants_is_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.execute("UPDATE earn_rules SET uplift_point_units = 499 WHERE transaction_id = $1", rows.earn)

    rows, problems = corrupted(create_database, corrupt)
    one_like(
        problems, f"earn {rows.earn} credited 1800 but its earn_rules make base 1000 + uplift 499 + grants 300 = 1799"
    )
    # its entries no longer match the record either (the operator funded 500, the record says 499)
    one_like(problems, f"earn {rows.earn} (amount 1800, base 1000, uplift 499", "does not post its earn record")
    assert len(problems) == 2


@pytest.mark.parametrize(
    "grants",
    [
        '{"promo-op": 200}',
        '[["promo-op", "operator"]]',
        '[["promo-op", "operator", "200"]]',
        '[["promo-op", "operator", -200]]',
        '[["promo-op", "operator", 2.5]]',
        '["promo-op"]',
        '[[1, "operator", 200]]',
    ],
)
def test_malformed_grants_are_reported_without_failing_reconcile(create_database, grants):
    async def corrupt(ledger, rows):
        await ledger.execute("UPDATE earn_rules SET grants = $2::jsonb WHERE transaction_id = $1", rows.earn, grants)

    rows, problems = corrupted(create_database, corrupt)
    one_like(
        problems,
        f"earn_rules of transaction {rows.earn}: grants",
        "is not a list of [promotion_id, sponsor_id, point-units >= 0]",
    )


def test_a_promotion_budget_that_is_not_its_grants_is_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.execute("UPDATE promotion_budgets SET granted = 150 WHERE promotion_id = 'promo-op'")
        await ledger.execute("INSERT INTO promotion_budgets VALUES ('alliance', 'promo-never', 5)")

    _, problems = corrupted(create_database, corrupt)
    assert problems == [
        "promotion promo-never: promotion_budgets says 5 granted, its earns' grants sum to 0",
        "promotion promo-op: promotion_budgets says 150 granted, its earns' grants sum to 200",
    ]


def test_a_refund_does_not_refill_a_budget(create_database):
    """Budgets count grants gross: an earn refunded in full (its record keeps its grants) still counts."""

    async def corrupt(ledger, rows):
        await ledger.execute("UPDATE earn_rules SET refunded_base_point_units = base_point_units")

    _, problems = corrupted(create_database, corrupt)
    assert problems == []


def test_an_earn_whose_entries_do_not_follow_its_record_is_reported(create_database):
    """The member got what the record says, but M1 paid the operator's promotion instead of its own:
    balanced, amounts right, every sign right; only the earn's shape is wrong."""

    async def corrupt(ledger, rows):
        await ledger.execute(add_to_legs("merchant_issued"), rows.earn, 100)
        await ledger.execute(add_to_legs("operator_promotions"), rows.earn, -100)

    rows, problems = corrupted(create_database, corrupt)
    assert problems == [
        f"earn {rows.earn} (amount 1800, base 1000, uplift 500, operator grants 200, merchant grants 100, fee 10) "
        "does not post its earn record: entries member:u POINTS 1800, merchant_issued:m1 POINTS -1000, "
        "operator_tier_rewards:operator POINTS -500, operator_promotions:operator POINTS -300, "
        "merchant_fees:m1 POINTS -10, operator_fee_revenue:operator POINTS 10"
    ]


# ---------------------------------------------------------------------------------------------------
# (e) lots


def test_lots_and_open_hold_pieces_beyond_the_posted_points_are_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.execute("UPDATE lots SET amount = amount + 1000 WHERE member_id = 'u' AND lot_id = $1", rows.earn)
        await ledger.lot("ghost", 77, 10, rows.issuer)  # a member without points

    _, problems = corrupted(create_database, corrupt)
    assert problems == [
        "member ghost: lots 10 + pieces of open holds 0 > posted 0",
        "member u: lots 2400 + pieces of open holds 200 > posted 2450",
    ]


def test_only_open_holds_pieces_count_against_the_posted_points(create_database):
    """u has 2,450 posted, 1,400 in lots; a second open hold's 900 of pieces makes 2,500 (reported); the
    same pieces on a voided hold count for nothing."""

    async def open_hold(ledger, rows):
        await ledger.hold(2, rows.converter, rows.member, 900)
        await ledger.piece(1, 2, rows.earn, 900, rows.issuer, expires_at_us=2**63 - 1)

    _, problems = corrupted(create_database, open_hold)
    assert problems == ["member u: lots 1400 + pieces of open holds 1100 > posted 2450"]

    async def voided_hold(ledger, rows):
        await ledger.hold(2, rows.converter, rows.member, 900, status=3)
        await ledger.piece(1, 2, rows.earn, 900, rows.issuer)

    _, problems = corrupted(create_database, voided_hold)
    assert problems == []


def test_lot_pieces_of_owners_that_do_not_exist_or_cannot_consume_are_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.piece(1, 999, rows.earn, 5, rows.issuer)  # no such hold
        await ledger.piece(2, 998, rows.earn, 5, rows.issuer)  # no such transaction
        await ledger.piece(2, rows.earn, rows.earn, 5, rows.issuer)  # an earn consumes nothing
        await ledger.execute(
            "UPDATE lot_consumptions SET amount = 250 WHERE owner_kind = 1 AND owner_id = $1", rows.hold
        )  # more than the hold

    rows, problems = corrupted(create_database, corrupt)
    assert problems == [
        f"lot_consumptions of hold {rows.hold}: pieces 250 > its amount 200",
        "lot_consumptions of hold 999, which does not exist",
        f"lot_consumptions of transaction {rows.earn}, of kind 1: only captures, redeems and member debits "
        "(adjustments, reversals, closures, transfers) consume lots",
        "lot_consumptions of transaction 998, which does not exist",
    ]


# ---------------------------------------------------------------------------------------------------
# (f) shapes of kinds 6..15


async def _move_entry(
    ledger: Ledger, transaction_id: int, from_kind: str, to_kind: str, owner: str, asset: str = "POINTS"
) -> None:
    """Re-points one entry of the transaction from its `from_kind` account to (to_kind, owner)."""
    account_id = await ledger.account(to_kind, owner, asset)
    legs = await ledger.c.fetchval(
        """SELECT count(*) FROM transactions t, unnest(t.leg_accounts) AS l(account_id)
           JOIN accounts a USING (account_id) WHERE t.transaction_id = $1 AND a.kind = $2""",
        transaction_id,
        from_kind,
    )
    assert legs == 1
    await ledger.execute(move_legs(from_kind), transaction_id, account_id)


@pytest.mark.parametrize(
    "field, change, shape, entries, others",
    [
        # an expiry must go to breakage, not to fee revenue (which then also disagrees with the fees charged)
        (
            "expiry",
            ("operator_breakage", "operator_fee_revenue", OPERATOR),
            "should move the transaction's member -amount, operator_breakage +amount",
            "member:u POINTS -50, operator_fee_revenue:operator POINTS 50",
            {"fee revenue 60 != fees charged 10"},
        ),
        # a tier bonus funded by the referral account
        (
            "tier_bonus",
            ("operator_tier_rewards", "operator_referrals", OPERATOR),
            "should move operator_tier_rewards -amount, the transaction's member +amount",
            "operator_referrals:operator POINTS -400, member:u POINTS 400",
            set(),
        ),
        # a referral bonus funded by the promotions account
        (
            "referral",
            ("operator_referrals", "operator_promotions", OPERATOR),
            "should move operator_referrals -amount, one member (the referrer) +amount",
            "operator_promotions:operator POINTS -250, member:r POINTS 250",
            set(),
        ),
        # an acquiring reward paid to a member instead of the acquirer
        (
            "reward",
            ("merchant_acquiring", "member", "u"),
            "should move operator_acquiring -amount, one merchant_acquiring (the acquirer) +amount",
            "operator_acquiring:operator POINTS -30, member:u POINTS 30",
            {
                "merchants are owed -10 point-units of acquiring rewards, the operator paid 20",
                "account merchant_acquiring:acq POINTS balance -10: a merchant_acquiring account never goes below 0",
                "transaction {t} of kind 9 (acquiring_reward) moves its member's points by 30, against its kind's sign 0",
            },
        ),
        # a reversal taken from the issuer's account instead of the acquirer's receivable
        (
            "reversal",
            ("merchant_acquiring", "merchant_issued", "m1"),
            "should move operator_acquiring +amount, one merchant_acquiring (the acquirer) -amount",
            "operator_acquiring:operator POINTS 10, merchant_issued:m1 POINTS -10",
            {"merchants are owed 30 point-units of acquiring rewards, the operator paid 20"},
        ),
        # a conversion credited to another member
        (
            "conversion",
            ("member", "member", "r"),
            "should move the transaction's merchant_issued -amount, its member +amount, fee entries = fee",
            "merchant_issued:m2 POINTS -600, member:r POINTS 600",
            set(),
        ),
    ],
)
def test_a_rule_transaction_with_entries_of_another_shape_is_reported(
    create_database, field, change, shape, entries, others
):
    async def corrupt(ledger, rows):
        await _move_entry(ledger, getattr(rows, field), *change)

    rows, problems = corrupted(create_database, corrupt)
    transaction_id = getattr(rows, field)
    found = one_like(problems, f"transaction {transaction_id} of kind", shape)
    assert found.endswith(f"its entries: {entries}"), found
    assert set(problems) - {found} == {other.format(t=transaction_id) for other in others}


def test_a_rule_transaction_whose_amount_is_not_what_it_moved_is_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.execute("UPDATE transactions SET amount = 31 WHERE transaction_id = $1", rows.reward)
        await ledger.execute("UPDATE transactions SET amount = 49 WHERE transaction_id = $1", rows.expiry)

    rows, problems = corrupted(create_database, corrupt)
    assert problems == [
        f"transaction {rows.reward} of kind 9 (amount 31, member u, merchant m1) should move operator_acquiring "
        "-amount, one merchant_acquiring (the acquirer) +amount; its entries: operator_acquiring:operator POINTS "
        "-30, merchant_acquiring:acq POINTS 30",
        f"transaction {rows.expiry} of kind 6 (amount 49, member u, merchant m1) should move the transaction's "
        "member -amount, operator_breakage +amount; its entries: member:u POINTS -50, operator_breakage:operator "
        "POINTS 50",
    ]


def test_a_rule_transaction_without_entries_is_reported(create_database):
    async def corrupt(ledger, rows):
        await ledger.execute(
            "UPDATE transactions SET leg_accounts = '{}', leg_amounts = '{}', leg_assets = NULL WHERE transaction_id = $1",
            rows.tier_bonus,
        )

    rows, problems = corrupted(create_database, corrupt)
    one_like(
        problems,
        f"transaction {rows.tier_bonus} of kind 7 (amount 400, member u, merchant m1) should move "
        "operator_tier_rewards -amount, the transaction's member +amount; its entries: none",
    )


def test_a_merchant_voucher_spend_of_another_shape_is_reported(create_database):
    """Kind 14: the spender's merchant_vouchers -amount, one other merchant's (the operator's store)
    merchant_redeemed +amount in VOUCHERS. A sound one passes; one the store pays to itself, one whose
    amount is not what it moved, and one paid into two stores are each reported."""

    async def corrupt(ledger, rows):
        m2, acquirer, v = rows.converter, rows.acquirer, VOUCHERS
        await ledger.post(
            11, m2, "", 100, [("operator_dividends", OPERATOR, -100, v), ("merchant_vouchers", m2, 100, v)]
        )
        rows.sound = await ledger.post(
            MERCHANT_VOUCHER_SPEND,
            m2,
            "",
            20,
            [("merchant_vouchers", m2, -20, v), ("merchant_redeemed", acquirer, 20, v)],
        )
        rows.to_itself = await ledger.post(
            MERCHANT_VOUCHER_SPEND, m2, "", 5, [("merchant_vouchers", m2, -5, v), ("merchant_redeemed", m2, 5, v)]
        )
        rows.short = await ledger.post(
            MERCHANT_VOUCHER_SPEND, m2, "", 7, [("merchant_vouchers", m2, -6, v), ("merchant_redeemed", acquirer, 6, v)]
        )
        rows.two_stores = await ledger.post(
            MERCHANT_VOUCHER_SPEND,
            m2,
            "",
            8,
            [
                ("merchant_vouchers", m2, -8, v),
                ("merchant_redeemed", acquirer, 4, v),
                ("merchant_redeemed", rows.issuer, 4, v),
            ],
        )

    rows, problems = corrupted(create_database, corrupt)
    shape = (
        "should move the transaction's merchant_vouchers -amount, one other merchant's merchant_redeemed "
        "(the operator's store, or the merchant named when the program allows any) +amount, in VOUCHERS"
    )
    for transaction_id in (rows.to_itself, rows.short, rows.two_stores):
        one_like(problems, f"transaction {transaction_id} of kind 14", shape)
    assert len(problems) == 3 and not any(f"transaction {rows.sound} " in p for p in problems)


def test_a_split_redeem_whose_fee_entries_differ_from_its_fee_is_reported(create_database):
    """Kind 12 charges the operator's fee on both tenders, in POINTS entries equal to transactions.fee;
    its refund (13) charges none."""

    async def corrupt(ledger, rows):
        m2, member, v = rows.converter, rows.member, VOUCHERS
        await ledger.post(
            11, OPERATOR, member, 50, [("operator_dividends", OPERATOR, -50, v), ("member", member, 50, v)]
        )
        rows.sound = await ledger.post(
            12,
            m2,
            member,
            120,
            [
                ("member", member, -100),
                ("merchant_redeemed", m2, 100),
                ("member", member, -20, v),
                ("merchant_redeemed", m2, 20, v),
                ("merchant_fees", m2, -1),
                ("operator_fee_revenue", OPERATOR, 1),
            ],
            fee=1,
        )
        rows.unfeed = await ledger.post(
            12, m2, member, 10, [("member", member, -10, v), ("merchant_redeemed", m2, 10, v)], fee=1
        )
        rows.refund_fee = await ledger.post(
            13,
            m2,
            member,
            10,
            [
                ("merchant_redeemed", m2, -10, v),
                ("member", member, 10, v),
                ("merchant_fees", m2, -1),
                ("operator_fee_revenue", OPERATOR, 1),
            ],
        )

    rows, problems = corrupted(create_database, corrupt)
    one_like(problems, f"transaction {rows.unfeed} of kind 12", "fee entries = fee")
    one_like(problems, f"transaction {rows.refund_fee} of kind 13", "no fee")
    assert not any(f"transaction {rows.sound} " in p for p in problems), problems


def test_a_merchant_dividend_credited_to_another_merchant_is_reported(create_database):
    """A dividend to a merchant names that merchant: its statement lines find it by merchant_id."""

    async def corrupt(ledger, rows):
        v = VOUCHERS
        rows.sound = await ledger.post(
            11,
            rows.converter,
            "",
            40,
            [("operator_dividends", OPERATOR, -40, v), ("merchant_vouchers", rows.converter, 40, v)],
        )
        rows.elsewhere = await ledger.post(
            11,
            rows.converter,
            "",
            30,
            [("operator_dividends", OPERATOR, -30, v), ("merchant_vouchers", rows.acquirer, 30, v)],
        )

    rows, problems = corrupted(create_database, corrupt)
    one_like(problems, f"transaction {rows.elsewhere} of kind 11", "should move operator_dividends")
    assert not any(f"transaction {rows.sound} " in p for p in problems), problems
