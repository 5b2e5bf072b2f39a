"""Program rules (processor/rules.py): each rule's arithmetic at its edges, that every rule's postings
balance per asset, and a model run in which lots, balances and the journal stay consistent.
Random inputs come from seeded random.Random (hypothesis is not in the venv), so failures replay."""

import random
from collections import Counter

import pytest

from processor import domain, rules
from processor.domain import Code, InvariantViolation, Rejection
from processor.rules import (
    ASSET_VOUCHERS,
    DAY_US,
    EarnContext,
    Holder,
    Level,
    Lot,
    Posting,
    Program,
    ProgramVersion,
    Promotion,
    Rate,
    Tender,
)

POINTS = domain.ASSET_POINTS
OP = domain.OPERATOR_ID
YEAR_US = 365 * DAY_US
SEEDS = range(60)


def sums(postings):
    totals = Counter()
    for row in postings:
        totals[row.asset] += row.amount
    return totals


def assert_balanced(postings):
    assert all(total == 0 for total in sums(postings).values()), postings
    assert all(row.amount != 0 for row in postings)


def version(number=1, effective_from_us=0, **settings):
    return ProgramVersion("gold", number, effective_from_us, **settings)


def promotion(promotion_id="p", start_us=0, end_us=100, scope=rules.SCOPE_NETWORK, scope_id="", **fields):
    fields.setdefault("budget_point_units", 10**9)
    if "bonus_point_units" not in fields:
        fields.setdefault("multiplier_bps", 20_000)
    return Promotion(promotion_id, start_us, end_us, scope, scope_id, **fields)


# --- postings helper ---------------------------------------------------------------------------


def test_balanced_drops_zero_rows_and_refuses_unbalanced_or_foreign_rows():
    rows = rules.balanced(
        [("member", "m", POINTS, 5), ("merchant_issued", "x", POINTS, -5), ("operator_tier_rewards", OP, POINTS, 0)]
    )
    assert rows == (Posting("member", "m", POINTS, 5), Posting("merchant_issued", "x", POINTS, -5))
    bad = [
        [("member", "m", POINTS, 5), ("merchant_issued", "x", POINTS, -4)],  # unbalanced
        [("member", "m", POINTS, 5), ("member", "m", ASSET_VOUCHERS, -5)],  # balanced overall only
        [("nobody", "m", POINTS, 5), ("merchant_issued", "x", POINTS, -5)],  # unknown kind
        [("merchant_issued", "x", ASSET_VOUCHERS, 5), ("member", "m", ASSET_VOUCHERS, -5)],  # wrong asset
        [("member", "m", POINTS, 5.0), ("merchant_issued", "x", POINTS, -5.0)],  # float
        [("member", "", POINTS, 5), ("merchant_issued", "x", POINTS, -5)],
    ]  # no owner
    for postings in bad:
        with pytest.raises(InvariantViolation):
            rules.balanced(postings)


def test_negated_undoes_postings():
    earn = rules.earn_postings("m", "x", rules.Earn(100, 20))
    assert sums(list(earn) + list(rules.negated(earn))) == Counter({POINTS: 0})
    assert [row.amount for row in rules.negated(earn)] == [-row.amount for row in earn]


# --- versioned configuration -------------------------------------------------------------------


def test_rule_book_returns_the_version_in_force_at_each_instant():
    book = rules.RuleBook(
        [Program("gold", (version(1, 1_000, expiry_period_us=YEAR_US), version(2, 2_000, expiry_period_us=None)))]
    )
    with pytest.raises(Rejection) as raised:
        book.at("gold", 999)
    assert raised.value.code is Code.FAILED_PRECONDITION and "first version starts at 1000" in raised.value.message
    assert book.at("gold", 1_000).version == 1
    assert book.at("gold", 1_999).version == 1
    assert book.at("gold", 2_000).version_id == "gold@2"
    with pytest.raises(Rejection) as raised:
        book.at("silver", 5_000)
    assert raised.value.code is Code.NOT_FOUND


def test_old_transactions_keep_their_version_s_expiry():
    book = rules.RuleBook([Program("gold", (version(1, 0, expiry_period_us=YEAR_US),))])
    earned_at = 500
    lot = rules.new_lot(book.at("gold", earned_at), 7, 100, earned_at, "x")
    book = book.with_version(version(2, 1_000, expiry_period_us=None), now_us=1_000)
    assert lot.expires_at_us == earned_at + YEAR_US  # fixed when earned
    assert rules.new_lot(book.at("gold", 1_500), 8, 100, 1_500, "x").expires_at_us is None
    assert book.at("gold", earned_at).version_id == "gold@1"  # a refund finds the old rules


def test_a_version_cannot_start_in_the_past_nor_out_of_order():
    program = Program("gold", (version(1, 1_000),))
    with pytest.raises(rules.ConfigError, match="never to the past"):
        program.with_version(version(2, 1_500), now_us=1_600)
    assert program.with_version(version(2, 1_600), now_us=1_600).at(1_600).version == 2
    with pytest.raises(rules.ConfigError, match="effective_from_us must increase"):
        Program("gold", (version(1, 1_000), version(2, 1_000)))
    with pytest.raises(rules.ConfigError, match="numbered 1, 2, 3"):
        Program("gold", (version(1, 1_000), version(3, 2_000)))
    with pytest.raises(rules.ConfigError, match="given twice"):
        rules.RuleBook([program, program])


@pytest.mark.parametrize(
    "levels,message",
    [
        ((Level("registered", 0), Level("blue", 500), Level("yellow", 500)), "thresholds must increase: 'yellow'"),
        ((Level("registered", 1), Level("blue", 500)), "must have threshold 0"),
        ((Level("registered", 0, bonus_point_units=5),), "cannot carry a bonus"),
        (
            (Level("registered", 0, multiplier_bps=12_000), Level("blue", 5, multiplier_bps=11_000)),
            "multipliers must not decrease",
        ),
        ((Level("registered", 0), Level("registered", 5)), "level names must be unique"),
        ((), "non-empty tuple"),
    ],
)
def test_level_configuration_errors_say_what_to_fix(levels, message):
    with pytest.raises(rules.ConfigError, match=message):
        version(levels=levels)


def test_level_multiplier_below_one_is_refused():
    with pytest.raises(rules.ConfigError, match="never earns less"):
        Level("blue", 5, multiplier_bps=9_999)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(start_us=10, end_us=10), "must be after start_us"),
        (dict(multiplier_bps=20_000, bonus_point_units=5), "exactly one of"),
        (dict(multiplier_bps=10_000), "multiplier_bps must be an integer in 10001"),
        (dict(scope=rules.SCOPE_MERCHANT), "scope_id must be empty for a network promotion and name"),
        (dict(scope=rules.SCOPE_NETWORK, sponsor_id="x"), "a merchant pays only for points earned at itself"),
        (dict(budget_point_units=0), "budget_point_units must be an integer in 1"),
    ],
)
def test_promotion_configuration_errors_say_what_to_fix(fields, message):
    with pytest.raises(rules.ConfigError, match=message):
        promotion(**fields)


def test_version_cross_checks_promotions_and_merchant_terms():
    with pytest.raises(rules.ConfigError, match="names level 'gold'"):
        version(promotions=(promotion(scope=rules.SCOPE_TIER, scope_id="gold"),))
    with pytest.raises(rules.ConfigError, match="promotion ids must be unique"):
        version(promotions=(promotion("a"), promotion("a")))
    with pytest.raises(rules.ConfigError, match="each merchant once"):
        version(merchant_terms=(rules.MerchantTerms("x", 100), rules.MerchantTerms("x", 200)))
    with pytest.raises(rules.ConfigError, match="must not decrease"):
        rules.DividendSettings(1_000, rate_bps_schedule=(60, 50))
    with pytest.raises(rules.ConfigError, match="numerator"):
        Rate(0, 10)


def test_per_merchant_overrides_fall_back_to_the_network_default():
    program = version(
        acquiring_share_bps=100,
        merchant_terms=(
            rules.MerchantTerms("x", acquiring_share_bps=250),
            rules.MerchantTerms("y", conversion_rate=Rate(1, 10)),
        ),
    )
    assert program.acquiring_share_bps_for("x") == 250
    assert program.acquiring_share_bps_for("y") == 100
    assert program.conversion_rate_for("y") == Rate(1, 10)
    with pytest.raises(Rejection) as raised:
        program.conversion_rate_for("x")
    assert raised.value.code is Code.FAILED_PRECONDITION and "no agreed conversion rate" in raised.value.message


# --- expiry lots -------------------------------------------------------------------------------


def lot(lot_id, amount, expires_at_us, issuer="x"):
    return Lot(lot_id, amount, expires_at_us, issuer)


def pairs(pieces):
    return [(piece.lot_id, piece.amount) for piece in pieces]


def test_consume_takes_soonest_expiring_first_never_expiring_last_ties_by_lot_id():
    lots = [lot(5, 10, None), lot(4, 10, 300), lot(3, 10, 200), lot(2, 10, 300), lot(1, 10, None)]
    taken = rules.consume(lots, 35, now_us=100)
    assert pairs(taken.pieces) == [(3, 10), (2, 10), (4, 10), (1, 5)]
    assert [(lot.lot_id, lot.amount) for lot in taken.lots] == [(1, 5), (5, 10)]


def test_consume_skips_lots_expired_at_that_instant_and_fails_without_change():
    lots = (lot(1, 10, 100), lot(2, 10, 101))
    assert pairs(rules.consume(lots, 10, now_us=100).pieces) == [(2, 10)]  # expires_at == now: gone
    with pytest.raises(rules.InsufficientBalance) as raised:
        rules.consume(lots, 11, now_us=100)
    assert (raised.value.available, raised.value.requested) == (10, 11)
    assert raised.value.code is Code.FAILED_PRECONDITION and raised.value.reason == "insufficient_points"
    assert lots == (lot(1, 10, 100), lot(2, 10, 101))


def test_consume_edges_zero_one_and_everything():
    lots = [lot(1, 1, 50), lot(2, 2, None)]
    assert rules.consume(lots, 0, 0).pieces == ()
    assert pairs(rules.consume(lots, 1, 0).pieces) == [(1, 1)]
    everything = rules.consume(lots, 3, 0)
    assert everything.lots == () and pairs(everything.pieces) == [(1, 1), (2, 2)]


def test_restore_puts_back_exactly_the_lots_consumed():
    lots = [lot(1, 10, 200), lot(2, 10, 300), lot(3, 10, None)]
    taken = rules.consume(lots, 25, now_us=100)
    back = rules.restore(taken.lots, taken.pieces, now_us=150, grace_us=DAY_US)
    assert list(back.lots) == lots and back.left == ()
    assert sorted(pairs(back.pieces)) == [(1, 10), (2, 10), (3, 5)]


def test_partial_restores_return_the_latest_expiring_pieces_first_and_add_up():
    lots = [lot(1, 10, 200), lot(2, 10, 300), lot(3, 10, None)]
    taken = rules.consume(lots, 25, now_us=100)
    first = rules.restore(taken.lots, taken.pieces, now_us=150, grace_us=DAY_US, amount=7)
    assert pairs(first.pieces) == [(3, 5), (2, 2)]
    second = rules.restore(first.lots, first.left, now_us=150, grace_us=DAY_US, amount=18)
    assert pairs(second.pieces) == [(2, 8), (1, 10)] and second.left == ()
    assert list(second.lots) == lots
    with pytest.raises(InvariantViolation):
        rules.restore(second.lots, second.left, now_us=150, grace_us=DAY_US, amount=1)


def test_a_restored_piece_whose_lot_expired_meanwhile_gets_the_grace_period():
    lots = [lot(1, 10, 200), lot(2, 10, 900)]
    taken = rules.consume(lots, 15, now_us=100)  # 10 of lot 1, 5 of lot 2
    now = 200  # lot 1 expired at this instant
    back = rules.restore(taken.lots, taken.pieces, now_us=now, grace_us=50)
    assert sorted((lot.lot_id, lot.amount, lot.expires_at_us) for lot in back.lots) == [(1, 10, 250), (2, 10, 900)]
    assert all(piece.issuer_id == "x" for piece in back.pieces)
    at_once = rules.restore(taken.lots, taken.pieces, now_us=now, grace_us=0)  # grace 0: expire at once
    assert pairs(rules.expire_due(at_once.lots, now).pieces) == [(1, 10)]


def test_restore_merges_into_the_remaining_part_of_a_lot():
    taken = rules.consume([lot(1, 10, 500)], 4, now_us=0)
    assert pairs(taken.lots) == [(1, 6)]
    assert pairs(rules.restore(taken.lots, taken.pieces, 1, 10).lots) == [(1, 10)]


def test_refund_of_an_earn_takes_its_own_lot_first_then_the_soonest_expiring():
    lots = [lot(1, 10, 150), lot(2, 10, 300), lot(7, 4, 120, issuer="y"), lot(3, 10, None)]
    # lot 7 is the refunded earn: taken first even though it expired at 120 and was not yet collected
    back = rules.take_back_earn(lots, earn_lot_id=7, amount=16, now_us=130)
    assert pairs(back.pieces) == [(7, 4), (1, 10), (2, 2)]
    with pytest.raises(rules.InsufficientBalance) as raised:
        rules.take_back_earn(lots, earn_lot_id=7, amount=35, now_us=130)
    assert raised.value.available == 34


def test_expire_due_at_the_instant_and_a_rerun_finds_nothing():
    lots = [lot(1, 10, 100), lot(2, 5, 101), lot(3, 7, None), lot(4, 0, 50)]
    run = rules.expire_due(lots, now_us=100)
    assert pairs(run.pieces) == [(1, 10)] and pairs(run.lots) == [(2, 5), (3, 7)]
    assert rules.expire_due(run.lots, now_us=100).pieces == ()
    assert rules.expire_due([lot(3, 7, None)], now_us=2**62).pieces == ()  # never means never
    assert rules.expiry_postings("m", run.pieces[0]) == (
        Posting("member", "m", POINTS, -10),
        Posting("operator_breakage", OP, POINTS, 10),
    )


def test_expiring_within_counts_live_lots_up_to_the_window_edge():
    lots = [lot(1, 1, 100), lot(2, 2, 101), lot(3, 4, 150), lot(4, 8, 150), lot(5, 16, 151), lot(6, 32, None)]
    assert rules.expiring_within(lots, now_us=100, window_us=50) == [(101, 2), (150, 12)]
    assert rules.expiring_within(lots, now_us=100, window_us=0) == []


@pytest.mark.parametrize("seed", SEEDS)
def test_consume_then_restore_is_the_identity_on_random_lots(seed):
    rng = random.Random(seed)
    lots = [lot(i, rng.randint(0, 50), rng.choice([None, rng.randint(101, 130)])) for i in range(rng.randint(0, 8))]
    total = sum(lot.amount for lot in lots)
    amount = rng.randint(0, total)
    taken = rules.consume(lots, amount, now_us=100)
    assert sum(p.amount for p in taken.pieces) == amount
    assert sum(lot.amount for lot in taken.lots) == total - amount
    keys = [rules._order(p) for p in taken.pieces]
    assert keys == sorted(keys)  # soonest first
    parts = sorted(rng.sample(range(1, amount), min(3, max(amount - 1, 0)))) if amount > 1 else []
    after, left = taken.lots, taken.pieces
    for size in [b - a for a, b in zip([0] + parts, parts + [amount])]:
        step = rules.restore(after, left, now_us=100, grace_us=7, amount=size)
        after, left = step.lots, step.left
    assert sorted(after, key=rules._order) == sorted((lot for lot in lots if lot.amount), key=rules._order)


# --- tiers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "earned,name",
    [
        (0, "registered"),
        (499_999, "registered"),
        (500_000, "blue"),
        (999_999, "blue"),
        (1_000_000, "yellow"),
        (1_999_999, "yellow"),
        (2_000_000, "red"),
        (10**15, "red"),
    ],
)
def test_plan_levels_are_5000_10000_20000_points_in_point_units(earned, name):
    assert rules.level_for(earned).name == name


def test_qualifying_points_over_a_rolling_window_or_in_total():
    earns = [(100, 1), (101, 2), (150, 4), (200, 8), (201, 16)]
    assert rules.qualifying_point_units(earns, now_us=200, window_us=100) == 2 + 4 + 8  # (100, 200]
    assert rules.qualifying_point_units(earns, now_us=200, window_us=None) == 1 + 2 + 4 + 8
    assert rules.qualifying_point_units([(150, 10), (160, -4)], now_us=200, window_us=None) == 6


def test_tier_bonuses_once_per_level_including_levels_jumped_over():
    levels = (Level("registered", 0), Level("blue", 100, 7), Level("yellow", 200, 11), Level("red", 400, 13))
    assert rules.tier_bonuses(levels, 99, set()) == []
    assert rules.tier_bonuses(levels, 250, set()) == [("blue", 7), ("yellow", 11)]
    # dropped below blue (rolling window) and back: nothing new
    assert rules.tier_bonuses(levels, 150, {"blue", "yellow"}) == []
    assert rules.tier_bonuses(levels, 400, {"blue", "yellow"}) == [("red", 13)]
    assert rules.tier_bonus_postings("m", 7) == (
        Posting("operator_tier_rewards", OP, POINTS, -7),
        Posting("member", "m", POINTS, 7),
    )
    assert rules.tier_bonus_postings("m", 0) == ()


@pytest.mark.parametrize(
    "base,multiplier,uplift",
    [
        (0, 15_000, 0),
        (1, 15_000, 0),
        (2, 15_000, 1),
        (3, 15_000, 1),
        (3, 10_000, 0),
        (9_999, 10_001, 0),
        (10_000, 10_001, 1),
        (7, 100_000, 63),
    ],
)
def test_level_multiplier_rounds_the_uplift_down(base, multiplier, uplift):
    program = version(levels=(Level("registered", 0, multiplier_bps=multiplier),))
    earn = rules.earn_with_rules(program, EarnContext("x", "registered", 0), base, {})
    assert (earn.base, earn.uplift) == (base, uplift)
    assert earn.base + earn.uplift == base * multiplier // 10_000


def test_the_multiplier_is_the_level_held_before_the_earn():
    program = version(levels=(Level("registered", 0), Level("blue", 100, multiplier_bps=20_000)))
    assert rules.earn_with_rules(program, EarnContext("x", "registered", 0), 150, {}).uplift == 0
    assert rules.earn_with_rules(program, EarnContext("x", "blue", 0), 150, {}).uplift == 150
    with pytest.raises(Rejection, match="not one of"):
        rules.earn_with_rules(program, EarnContext("x", "gold", 0), 150, {})


# --- promotions --------------------------------------------------------------------------------


def test_a_promotion_is_in_force_from_start_inclusive_to_end_exclusive():
    promo = [promotion(start_us=100, end_us=200)]

    def at(t):
        return rules.promotion_bonus(promo, EarnContext("x", "registered", t), 10, {})

    assert (at(99), at(100), at(199), at(200)) == ([], [("p", 10)], [("p", 10)], [])


def test_promotion_scopes_merchant_tier_network():
    promos = [
        promotion("net"),
        promotion("at-x", scope=rules.SCOPE_MERCHANT, scope_id="x"),
        promotion("blue", scope=rules.SCOPE_TIER, scope_id="blue", bonus_point_units=3),
    ]

    def ids(merchant, level):
        return [p for p, _ in rules.promotion_bonus(promos, EarnContext(merchant, level, 0), 10, {})]

    assert ids("x", "blue") == ["at-x", "blue", "net"]
    assert ids("y", "registered") == ["net"]


def test_promotions_stack_additively_on_the_base_and_round_down():
    promos = [
        promotion("a", multiplier_bps=20_000),
        promotion("b", multiplier_bps=15_000),
        promotion("c", bonus_point_units=25),
    ]
    assert rules.promotion_bonus(promos, EarnContext("x", "r", 0), 101, {}) == [("a", 101), ("b", 50), ("c", 25)]
    assert rules.promotion_bonus(promos, EarnContext("x", "r", 0), 1, {}) == [("a", 1), ("c", 25)]  # b: 0.5 -> 0
    assert rules.promotion_bonus(promos, EarnContext("x", "r", 0), 0, {}) == []  # no bonus on 0 points


def test_a_promotion_budget_grants_partially_at_the_cap_then_nothing():
    promos = [promotion("a", multiplier_bps=20_000, budget_point_units=250)]
    budget = {"a": 250}
    granted = []
    for base in (100, 100, 100, 100):
        grants = rules.promotion_bonus(promos, EarnContext("x", "r", 0), base, budget)
        granted.append(grants)
        for promotion_id, amount in grants:
            budget[promotion_id] -= amount
    assert granted == [[("a", 100)], [("a", 100)], [("a", 50)], []]
    assert budget == {"a": 0}
    # a promotion not in budget_left has its whole budget
    assert rules.promotion_bonus(promos, EarnContext("x", "r", 0), 1_000, {}) == [("a", 250)]


def test_earn_postings_charge_each_sponsor_and_credit_the_member_once():
    program = version(
        levels=(Level("registered", 0, multiplier_bps=12_000),),
        promotions=(
            promotion("net", multiplier_bps=20_000),
            promotion("x-only", scope=rules.SCOPE_MERCHANT, scope_id="x", sponsor_id="x", bonus_point_units=30),
        ),
    )
    earn = rules.earn_with_rules(program, EarnContext("x", "registered", 0), 1_000, {})
    assert (earn.base, earn.uplift, earn.total) == (1_000, 200, 2_230)
    assert rules.earn_postings("m", "x", earn) == (
        Posting("merchant_issued", "x", POINTS, -1_000),
        Posting("operator_tier_rewards", OP, POINTS, -200),
        Posting("operator_promotions", OP, POINTS, -1_000),
        Posting("merchant_issued", "x", POINTS, -30),
        Posting("member", "m", POINTS, 2_230),
    )


def test_refunds_of_an_earn_take_back_bonuses_proportionally_and_exactly_in_total():
    earn = rules.Earn(3, 1, (rules.Grant("p", OP, 2),))
    portions = [rules.earn_refund(earn, before, 1) for before in range(3)]
    assert [(p.uplift, p.grants[0].amount) for p in portions] == [(0, 0), (0, 1), (1, 1)]  # floor, member's favour
    assert sum(p.total for p in portions) == earn.total
    refund = rules.refund_earn_postings("m", "x", portions[2])
    assert refund == (
        Posting("merchant_issued", "x", POINTS, 1),
        Posting("operator_tier_rewards", OP, POINTS, 1),
        Posting("operator_promotions", OP, POINTS, 1),
        Posting("member", "m", POINTS, -3),
    )
    with pytest.raises(InvariantViolation):
        rules.earn_refund(earn, 3, 1)  # more than earned


# --- referrals and acquiring -------------------------------------------------------------------


def test_referral_bonus_on_the_first_qualifying_earn_only():
    program = version(referral_bonus_point_units=500, referral_minimum_purchase=1_000)
    assert rules.referral_bonus(program, "r", False, 1_000, 30) == 500
    assert rules.referral_bonus(program, "r", True, 1_000, 30) == 0  # already paid
    assert rules.referral_bonus(program, "r", False, 999, 30) == 0  # below the minimum
    assert rules.referral_bonus(program, None, False, 1_000, 30) == 0  # no referrer
    assert rules.referral_bonus(program, "r", False, 1_000, 0) == 0  # earned nothing
    assert rules.referral_postings("r", 500) == (
        Posting("operator_referrals", OP, POINTS, -500),
        Posting("member", "r", POINTS, 500),
    )


@pytest.mark.parametrize(
    "acquirer,merchant,purchase,reward",
    [
        ("a", "x", 10_000, 100),
        ("a", "x", 199, 1),
        ("a", "x", 99, 0),
        ("a", "a", 10_000, 0),
        (None, "x", 10_000, 0),
        ("b", "x", 1_000, 25),
    ],
)
def test_acquiring_reward_is_the_floor_of_the_share_of_spend_elsewhere(acquirer, merchant, purchase, reward):
    program = version(acquiring_share_bps=100, merchant_terms=(rules.MerchantTerms("b", acquiring_share_bps=250),))
    assert rules.acquiring_reward(program, acquirer, merchant, purchase, base_point_units=1) == reward


def test_acquiring_reward_needs_points_earned_and_reverses_exactly():
    program = version(acquiring_share_bps=100)
    assert rules.acquiring_reward(program, "a", "x", 10_000, base_point_units=0) == 0
    reversals = [rules.acquiring_reversal(7, 10, before, 1) for before in range(10)]
    assert sum(reversals) == 7 and all(r in (0, 1) for r in reversals) and reversals[0] == 0
    assert rules.acquiring_postings("a", 7) == (
        Posting("operator_acquiring", OP, POINTS, -7),
        Posting("merchant_acquiring", "a", POINTS, 7),
    )


# --- merchant points conversion ----------------------------------------------------------------


@pytest.mark.parametrize(
    "merchant_points,rate,converted,point_units,remainder",
    [
        (25, Rate(1, 10), 20, 2, 5),
        (9, Rate(1, 10), 0, 0, 9),
        (5, Rate(3, 2), 4, 6, 1),
        (5, Rate(3, 1), 5, 15, 0),
        (0, Rate(1, 10), 0, 0, 0),
        (1_000, Rate(4, 6), 999, 666, 1),
    ],
)
def test_conversion_in_whole_blocks_reports_the_remainder(merchant_points, rate, converted, point_units, remainder):
    assert rules.convert_merchant_points(merchant_points, rate) == rules.Conversion(converted, point_units, remainder)


@pytest.mark.parametrize("seed", SEEDS)
def test_conversion_loses_nothing_on_random_rates(seed):
    rng = random.Random(seed)
    rate = Rate(rng.randint(1, 1_000), rng.randint(1, 1_000))
    merchant_points = rng.randint(0, 10**12)
    result = rules.convert_merchant_points(merchant_points, rate)
    assert result.merchant_points_converted + result.merchant_points_remainder == merchant_points
    assert result.point_units * rate.denominator == result.merchant_points_converted * rate.numerator
    assert result.point_units <= merchant_points * rate.numerator // rate.denominator
    block = rate.denominator // __import__("math").gcd(rate.numerator, rate.denominator)
    assert result.merchant_points_remainder < block


def test_conversion_postings_debit_the_merchant_s_issued_account():
    assert rules.conversion_postings("x", "m", 6) == (
        Posting("merchant_issued", "x", POINTS, -6),
        Posting("member", "m", POINTS, 6),
    )


# --- dividend pool and vouchers ----------------------------------------------------------------


def test_dividend_rounds_trigger_at_the_threshold_then_at_each_growth():
    settings = rules.DividendSettings(threshold_point_units=1_000_000, growth_bps=1_500)
    assert not rules.dividend_due(settings, 999_999, None)
    assert rules.dividend_due(settings, 1_000_000, None)
    assert rules.dividend_trigger_point_units(settings, 1_000_000) == 1_150_000
    assert not rules.dividend_due(settings, 1_149_999, 1_000_000)
    assert rules.dividend_due(settings, 1_150_000, 1_000_000)
    assert rules.dividend_trigger_point_units(settings, 1_000_001) == 1_150_002  # 1,150,001.15 rounded up
    assert not rules.dividend_due(settings, 1_150_001, 1_000_001)


def test_dividend_rate_follows_the_schedule_and_its_last_rate_repeats():
    settings = rules.DividendSettings(1, rate_bps_schedule=(50, 60, 75))
    assert [rules.dividend_rate_bps(settings, k) for k in (1, 2, 3, 4, 99)] == [50, 60, 75, 75, 75]
    with pytest.raises(InvariantViolation):
        rules.dividend_rate_bps(settings, 0)


def test_a_dividend_round_floors_per_holder_and_issues_exactly_the_sum():
    holdings = {
        Holder("member", "a"): 10_000,
        Holder("member", "b"): 199,
        Holder("member", "c"): 399,
        Holder("merchant", "x"): 123_456,
        Holder("merchant", "y"): -500,
        Holder("member", "d"): 0,
    }
    record = rules.dividend_round(1, 5_000_000, 50, holdings)
    assert [(a.holder.owner_id, a.amount) for a in record.allocations] == [("a", 50), ("c", 1), ("x", 617)]
    assert record.total_issued == 668 == sum(a.amount for a in record.allocations)
    assert record.holdings_point_units == 10_000 + 199 + 399 + 123_456
    assert (record.round_number, record.pool_point_units, record.rate_bps) == (1, 5_000_000, 50)
    postings = [row for a in record.allocations for row in rules.dividend_postings(a)]
    assert_balanced(postings)
    assert sum(r.amount for r in postings if r.account_kind == "operator_dividends") == -668
    assert [r for r in postings if r.owner_id == "x"] == [Posting("merchant_vouchers", "x", ASSET_VOUCHERS, 617)]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_dividend_round_computed_twice_gives_the_same_record(seed):
    rng = random.Random(seed)
    holdings = {Holder(rng.choice(["member", "merchant"]), f"h{i}"): rng.randint(-10, 10**9) for i in range(30)}
    credit = {h: rng.randint(0, 10**6) for h in holdings if h.kind == "member"}
    rate = rng.randint(1, 10_000)
    first = rules.dividend_round(3, 10**12, rate, holdings, credit)
    shuffled = list(holdings.items())
    rng.shuffle(shuffled)
    assert rules.dividend_round(3, 10**12, rate, dict(shuffled), dict(credit)) == first
    assert first.total_issued == sum(a.amount for a in first.allocations)
    assert all(
        a.amount == max(h, 0) * rate // 10_000 and a.repaid + a.paid_out == a.amount
        for a in first.allocations
        for h in [holdings[a.holder]]
    )
    assert_balanced([row for a in first.allocations for row in rules.dividend_postings(a)])


def test_a_dividend_repays_voucher_credit_first():
    assert rules.apply_dividend(0, 50) == (0, 50)
    assert rules.apply_dividend(30, 50) == (30, 20)
    assert rules.apply_dividend(50, 50) == (50, 0)
    assert rules.apply_dividend(80, 50) == (50, 0)
    record = rules.dividend_round(2, 1, 50, {Holder("member", "a"): 10_000}, {Holder("member", "a"): 30})
    assert rules.dividend_postings(record.allocations[0]) == (
        Posting("operator_dividends", OP, ASSET_VOUCHERS, -50),
        Posting("member_voucher_credit", "a", ASSET_VOUCHERS, 30),
        Posting("member", "a", ASSET_VOUCHERS, 20),
    )
    with pytest.raises(InvariantViolation, match="only members borrow"):
        rules.dividend_round(2, 1, 50, {Holder("merchant", "x"): 10_000}, {Holder("merchant", "x"): 1})


@pytest.mark.parametrize(
    "holding,rate,limit_bps,expected,limit",
    [
        (10_000, 50, 50_000, 50, 250),
        (199, 50, 50_000, 0, 0),
        (200, 50, 50_000, 1, 5),
        (10_000, 50, 0, 50, 0),
        (10_000, 50, 15_000, 50, 75),
        (10_001, 75, 15_000, 75, 112),
        (-5, 50, 50_000, 0, 0),
    ],
)
def test_voucher_credit_limit_is_a_multiple_of_the_expected_dividend_rounded_down(
    holding, rate, limit_bps, expected, limit
):
    assert rules.expected_dividend(holding, rate) == expected
    assert rules.voucher_credit_limit(holding, rate, limit_bps) == limit


# --- split tender ------------------------------------------------------------------------------


def test_split_tender_vouchers_first_or_as_the_caller_says():
    assert rules.split_tender(100, vouchers_available=30, points_available=70) == Tender(30, 70)
    assert rules.split_tender(100, vouchers_available=300, points_available=0) == Tender(100, 0)
    assert rules.split_tender(100, vouchers_available=300, points_available=100, vouchers=40) == Tender(40, 60)
    assert rules.split_tender(0, 0, 0) == Tender(0, 0)
    with pytest.raises(rules.InsufficientBalance) as raised:
        rules.split_tender(100, vouchers_available=30, points_available=69)
    assert (raised.value.asset, raised.value.available, raised.value.requested) == (POINTS, 69, 70)
    with pytest.raises(rules.InsufficientBalance) as raised:
        rules.split_tender(100, vouchers_available=30, points_available=100, vouchers=31)
    assert raised.value.asset == ASSET_VOUCHERS and raised.value.reason == "insufficient_vouchers"
    with pytest.raises(Rejection) as raised:
        rules.split_tender(100, 300, 300, vouchers=101)
    assert raised.value.code is Code.INVALID_ARGUMENT


def test_own_vouchers_are_spent_before_credit():
    assert rules.voucher_sources(balance=30, credit_headroom=50, vouchers=20) == (20, 0)
    assert rules.voucher_sources(balance=30, credit_headroom=50, vouchers=80) == (30, 50)
    with pytest.raises(rules.InsufficientBalance):
        rules.voucher_sources(balance=30, credit_headroom=50, vouchers=81)


def test_a_partial_refund_splits_vouchers_down_and_points_take_the_rest():
    tender = Tender(vouchers=1, points=2)
    portions = [rules.refund_tender(tender, before, 1) for before in range(3)]
    assert portions == [Tender(0, 1), Tender(0, 1), Tender(1, 0)]
    assert rules.refund_tender(Tender(70, 30), 0, 10) == Tender(7, 3)
    assert rules.refund_tender(Tender(70, 30), 0, 100) == Tender(70, 30)


@pytest.mark.parametrize("seed", SEEDS)
def test_split_refunds_in_random_parts_sum_exactly_to_the_tender(seed):
    rng = random.Random(seed)
    tender = Tender(rng.randint(0, 10**6), rng.randint(0, 10**6))
    refunded, back = 0, Tender(0, 0)
    while refunded < tender.total:
        amount = rng.randint(1, tender.total - refunded)
        portion = rules.refund_tender(tender, refunded, amount)
        assert portion.total == amount and portion.vouchers >= 0 and portion.points >= 0
        back = Tender(back.vouchers + portion.vouchers, back.points + portion.points)
        refunded += amount
    assert back == tender


def test_split_redeem_and_refund_postings_clear_each_asset_separately():
    redeem = rules.split_redeem_postings("m", "x", Tender(50, 30), from_credit=20)
    assert redeem == (
        Posting("member", "m", POINTS, -30),
        Posting("merchant_redeemed", "x", POINTS, 30),
        Posting("member", "m", ASSET_VOUCHERS, -30),
        Posting("member_voucher_credit", "m", ASSET_VOUCHERS, -20),
        Posting("merchant_redeemed", "x", ASSET_VOUCHERS, 50),
    )
    portion = rules.refund_tender(Tender(50, 30), 0, 40)
    repaid, _ = rules.apply_dividend(20, portion.vouchers)
    refund = rules.split_refund_postings("m", "x", portion, repaid)
    assert portion == Tender(25, 15) and repaid == 20
    assert refund == (
        Posting("member", "m", POINTS, 15),
        Posting("merchant_redeemed", "x", POINTS, -15),
        Posting("member", "m", ASSET_VOUCHERS, 5),
        Posting("member_voucher_credit", "m", ASSET_VOUCHERS, 20),
        Posting("merchant_redeemed", "x", ASSET_VOUCHERS, -25),
    )
    assert rules.merchant_voucher_spend_postings("x", "store", 9) == (
        Posting("merchant_vouchers", "x", ASSET_VOUCHERS, -9),
        Posting("merchant_redeemed", "store", ASSET_VOUCHERS, 9),
    )


# --- cash-out ----------------------------------------------------------------------------------


def test_cash_out_is_refused_with_a_message_that_says_where_points_can_go():
    with pytest.raises(Rejection) as raised:
        rules.refuse_cash_out()
    assert raised.value.code is Code.INVALID_ARGUMENT
    assert "circulate only inside the alliance" in raised.value.message and "redeem them" in raised.value.message


# --- every rule's postings balance, on random inputs ---------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_every_rule_s_postings_balance_per_asset_on_random_inputs(seed):
    rng = random.Random(seed)

    def n():
        return rng.choice([0, 1, rng.randint(0, 10**9)])

    base = n()
    earn = rules.Earn(base, n(), tuple(rules.Grant(f"p{i}", rng.choice([OP, "x"]), n()) for i in range(3)))
    before = rng.randint(0, base)
    tender = Tender(n(), n())
    credit = rng.randint(0, tender.vouchers)
    portion = rules.refund_tender(tender, 0, rng.randint(0, tender.total))
    allocation = rules.dividend_round(
        1, 1, rng.randint(1, 10_000), {Holder("member", "m"): n() + 10**6}, {Holder("member", "m"): n()}
    ).allocations[0]
    everything = [
        rules.earn_postings("m", "x", earn),
        rules.refund_earn_postings("m", "x", rules.earn_refund(earn, before, rng.randint(0, base - before))),
        rules.expiry_postings("m", lot(1, n(), 5)),
        rules.tier_bonus_postings("m", n()),
        rules.referral_postings("r", n()),
        rules.acquiring_postings("a", n()),
        rules.negated(rules.acquiring_postings("a", n())),
        rules.conversion_postings("x", "m", n()),
        rules.dividend_postings(allocation),
        rules.split_redeem_postings("m", "x", tender, credit),
        rules.split_refund_postings("m", "x", portion, rng.randint(0, portion.vouchers)),
        rules.merchant_voucher_spend_postings("x", "store", n()),
    ]
    for postings in everything:
        assert_balanced(postings)
    member_points = sum(r.amount for r in everything[0] if r.account_kind == "member")
    assert member_points == earn.total


# --- a model run: lots, balances and the journal agree after every rule --------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_run_keeps_lots_balances_and_journal_consistent(seed):
    rng = random.Random(seed)
    program = version(
        expiry_period_us=1_000,
        restore_grace_us=rng.choice([0, 50]),
        levels=(Level("registered", 0), Level("blue", 2_000, 100, 15_000)),
        promotions=(promotion("dbl", 0, 10**9, budget_point_units=rng.randint(1, 3_000)),),
    )
    members = ["m1", "m2"]
    lots = {m: () for m in members}
    balances = Counter()  # (kind, owner, asset) -> balance
    earns = []  # (member, transaction id, Earn, refunded base)
    redeems = []  # [member, consumption left]
    budget = {"dbl": program.promotions[0].budget_point_units}
    reached = {m: set() for m in members}
    qualifying = Counter()
    now, transaction_id = 0, 0

    def post(postings):
        postings = [Posting(*row) for row in postings if row[3] != 0]
        assert_balanced(postings)
        for row in postings:
            balances[row.account_kind, row.owner_id, row.asset] += row.amount

    for _ in range(80):
        now += rng.randint(0, 120)
        transaction_id += 1
        member = rng.choice(members)
        action = rng.choice(["earn", "earn", "redeem", "refund_redeem", "refund_earn", "expire"])
        if action == "earn":
            base = domain.earn_point_units(rng.randint(0, 20_000), 1_000)
            level = rules.level_for(qualifying[member], program.levels).name
            earn = rules.earn_with_rules(program, EarnContext("x", level, now), base, budget)
            for grant in earn.grants:
                budget[grant.promotion_id] -= grant.amount
            post(rules.earn_postings(member, "x", earn))
            if earn.total:
                lots[member] += (rules.new_lot(program, transaction_id, earn.total, now, "x"),)
            earns.append([member, transaction_id, earn, 0])
            qualifying[member] += base
            for name, bonus in rules.tier_bonuses(program.levels, qualifying[member], reached[member]):
                reached[member].add(name)
                transaction_id += 1
                post(rules.tier_bonus_postings(member, bonus))
                lots[member] += (rules.new_lot(program, transaction_id, bonus, now, OP),)
        elif action == "redeem":
            live = sum(lot.amount for lot in lots[member] if lot.live(now))
            taken = rules.consume(lots[member], rng.randint(0, live), now)
            lots[member] = taken.lots
            amount = sum(p.amount for p in taken.pieces)
            post([("member", member, POINTS, -amount), ("merchant_redeemed", "x", POINTS, amount)])
            redeems.append([member, taken.pieces])
        elif action == "refund_redeem" and redeems:
            entry = rng.choice(redeems)
            owner, left = entry
            amount = rng.randint(0, sum(p.amount for p in left))
            back = rules.restore(lots[owner], left, now, program.restore_grace_us, amount)
            lots[owner], entry[1] = back.lots, back.left
            post([("member", owner, POINTS, amount), ("merchant_redeemed", "x", POINTS, -amount)])
        elif action == "refund_earn" and earns:
            entry = rng.choice(earns)
            owner, lot_id, earn, refunded = entry
            amount = rng.randint(0, earn.base - refunded)
            portion = rules.earn_refund(earn, refunded, amount)
            try:
                taken = rules.take_back_earn(lots[owner], lot_id, portion.total, now)
            except rules.InsufficientBalance as refused:
                assert refused.available < portion.total
                continue
            lots[owner] = taken.lots
            entry[3] += amount
            qualifying[owner] -= amount
            post(rules.refund_earn_postings(owner, "x", portion))
        elif action == "expire":
            run = rules.expire_due(lots[member], now)
            lots[member] = run.lots
            for piece in run.pieces:
                post(rules.expiry_postings(member, piece))
            assert rules.expire_due(lots[member], now).pieces == ()
        for asset in (POINTS,):
            assert sum(v for (_, _, a), v in balances.items() if a == asset) == 0
        for m in members:
            assert balances["member", m, POINTS] == sum(lot.amount for lot in lots[m]) >= 0
        assert all(left >= 0 for left in budget.values())
    # invariant 3, extended: members hold what was issued (merchants and operator) less redeemed and breakage
    issued = -sum(
        v
        for (kind, _, _), v in balances.items()
        if kind in ("merchant_issued", "operator_tier_rewards", "operator_promotions")
    )
    assert sum(balances["member", m, POINTS] for m in members) == (
        issued - balances["merchant_redeemed", "x", POINTS] - balances["operator_breakage", OP, POINTS]
    )


# --- the seed systems' rules (issue 16) -------------------------------------------------------


@pytest.mark.parametrize(
    "match_bps, base, expected",
    [(10_000, 20_000, 20_000), (5_000, 20_001, 10_000), (0, 20_000, 0), (3_333, 1, 0), (10_000, 0, 0)],
)
def test_merchant_match_is_the_floor_of_its_share_of_the_base(match_bps, base, expected):
    assert rules.merchant_match(version(merchant_match_bps=match_bps), base) == expected


def test_merchant_match_postings_credit_the_merchant_s_points_from_the_operator():
    rows = rules.merchant_match_postings("shop-a", 20_000)
    assert_balanced(rows)
    assert set(rows) == {
        Posting(rules.ACCOUNT_OPERATOR_MERCHANT_MATCH, OP, POINTS, -20_000),
        Posting(rules.ACCOUNT_MERCHANT_POINTS, "shop-a", POINTS, 20_000),
    }
    assert rules.merchant_match_postings("shop-a", 0) == ()


@pytest.mark.parametrize("seed", SEEDS)
def test_merchant_match_reversals_in_random_parts_sum_exactly_to_the_match(seed):
    generator = random.Random(seed)
    base = generator.randint(1, 10**7)
    match = rules.merchant_match(version(merchant_match_bps=generator.randint(0, 10_000)), base)
    refunded = reversed_total = 0
    while refunded < base:
        part = generator.randint(1, base - refunded)
        piece = rules.merchant_match_reversal(match, base, refunded, part)
        assert 0 <= piece <= match - reversed_total
        reversed_total += piece
        refunded += part
    assert reversed_total == match


def test_referral_share_adds_its_floor_of_the_first_earn_to_the_fixed_bonus():
    v = version(referral_bonus_point_units=1_000, referral_share_bps=8_000)
    assert rules.referral_bonus(v, "ref", False, 100_000, 10_001) == 1_000 + 8_000
    assert rules.referral_bonus(v, "ref", True, 100_000, 10_001) == 0  # paid once
    assert rules.referral_bonus(v, None, False, 100_000, 10_001) == 0
    only_share = version(referral_share_bps=8_000)
    assert rules.referral_bonus(only_share, "ref", False, 1, 10_000) == 8_000


def test_levels_count_the_base_or_every_point_of_the_earn():
    earn = rules.Earn(300, uplift=30, grants=(rules.Grant("p", OP, 300),))
    assert rules.level_point_units(version(), earn) == 300
    assert rules.level_point_units(version(level_points=rules.LEVEL_POINTS_TOTAL), earn) == 630


def test_sign_up_bonus_postings_come_from_the_operator_s_sign_up_account():
    rows = rules.signup_bonus_postings("ann", 5_000)
    assert_balanced(rows)
    assert set(rows) == {
        Posting(rules.ACCOUNT_OPERATOR_SIGNUP_BONUSES, OP, POINTS, -5_000),
        Posting(domain.ACCOUNT_MEMBER, "ann", POINTS, 5_000),
    }


def test_the_sale_fee_is_the_floor_of_its_share_of_the_purchase():
    assert rules.sale_fee(version(fee_sale_bps=1_000), 200_000) == 20_000
    assert rules.sale_fee(version(fee_sale_bps=1_000), 9) == 0
    assert rules.sale_fee(None, 200_000) == 0


def test_star_rebates_follow_the_merchant_s_rating_and_round_down():
    v = version(
        star_fee_rebate_bps=(0, 500, 2_000),
        merchant_terms=(
            rules.MerchantTerms("three", star_rating=3),
            rules.MerchantTerms("two", star_rating=2),
            rules.MerchantTerms("none", star_rating=0),
            rules.MerchantTerms("unrated"),
        ),
    )
    assert rules.star_fee_rebate(v, "three", 10_000) == 2_000
    assert rules.star_fee_rebate(v, "two", 99) == 4  # 4.95 rounded down: the operator's favour
    assert [rules.star_fee_rebate(v, m, 10_000) for m in ("none", "unrated", "stranger")] == [0, 0, 0]
    assert rules.star_fee_rebate(None, "three", 10_000) == 0


def test_a_star_rating_needs_a_rebate_and_rebates_must_not_decrease():
    with pytest.raises(rules.ConfigError, match="star_rating 4 has no rebate"):
        version(star_fee_rebate_bps=(0, 500), merchant_terms=(rules.MerchantTerms("m", star_rating=4),))
    with pytest.raises(rules.ConfigError, match="must not decrease with the stars"):
        version(star_fee_rebate_bps=(500, 0))
    with pytest.raises(rules.ConfigError, match="star_rating"):
        rules.MerchantTerms("m", star_rating=rules.STARS_MAX + 1)


def test_give_back_bounds_are_the_version_s_up_to_100_percent():
    full = version(give_back_bps_max=10_000)
    rules.check_give_back(full, "suning", 10_000)
    with pytest.raises(Rejection) as refused:
        rules.check_give_back(version(), "suning", 10_000)
    assert refused.value.code is Code.FAILED_PRECONDITION
    assert "outside the 300..2000 bps program gold@1 allows" in refused.value.message
    with pytest.raises(rules.ConfigError, match="give_back_bps_min .5000. must not be above give_back_bps_max"):
        version(give_back_bps_min=5_000, give_back_bps_max=4_000)
    with pytest.raises(rules.ConfigError, match="give_back_bps_max"):
        version(give_back_bps_max=10_001)
    assert domain.earn_point_units(100_000, 10_000) == 100_000  # "1000 yuan ... 1000 points"


def test_the_fan_reward_is_paid_at_the_acquirer_itself_only_when_the_program_says_so():
    elsewhere_only = version(acquiring_share_bps=100)
    anywhere = version(acquiring_share_bps=100, acquiring_at_acquirer=True, acquiring_reward_asset=ASSET_VOUCHERS)
    assert rules.acquiring_reward(elsewhere_only, "b", "b", 10_000, 1_000) == 0
    assert rules.acquiring_reward(anywhere, "b", "b", 10_000, 1_000) == 100
    assert rules.acquiring_reward(anywhere, "b", "a", 10_099, 1_000) == 100  # rounded down
    assert rules.acquiring_reward(anywhere, None, "a", 10_000, 1_000) == 0
    assert rules.acquiring_reward(anywhere, "b", "a", 10_000, 0) == 0


def test_a_fan_reward_repays_what_the_merchant_owes_first():
    rows = rules.fan_reward_postings("b", 100, credit_used=30)
    assert_balanced(rows)
    assert set(rows) == {
        Posting(rules.ACCOUNT_OPERATOR_FAN_REWARDS, OP, ASSET_VOUCHERS, -100),
        Posting(rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT, "b", ASSET_VOUCHERS, 30),
        Posting(rules.ACCOUNT_MERCHANT_VOUCHERS, "b", ASSET_VOUCHERS, 70),
    }


@pytest.mark.parametrize("held, from_held, owed", [(100, 40, 0), (25, 25, 15), (0, 0, 40)])
def test_a_fan_reward_reversal_takes_what_is_held_and_the_rest_becomes_owed(held, from_held, owed):
    rows = rules.fan_reward_reversal_postings("b", 40, held)
    assert_balanced(rows)
    assert set(rows) == {
        row
        for row in (
            Posting(rules.ACCOUNT_OPERATOR_FAN_REWARDS, OP, ASSET_VOUCHERS, 40),
            Posting(rules.ACCOUNT_MERCHANT_VOUCHERS, "b", ASSET_VOUCHERS, -from_held),
            Posting(rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT, "b", ASSET_VOUCHERS, -owed),
        )
        if row.amount
    }


def test_the_fan_reward_asset_and_merchant_credit_are_checked():
    with pytest.raises(rules.ConfigError, match="acquiring_reward_asset must be 'POINTS' or 'VOUCHERS'"):
        version(acquiring_reward_asset="CASH")
    with pytest.raises(rules.ConfigError, match="merchant_voucher_credit needs dividends"):
        version(merchant_voucher_credit=True)
    with pytest.raises(rules.ConfigError, match="acquiring_at_acquirer must be true or false"):
        rules.version_from_config("gold", 1, 0, {"acquiring_at_acquirer": 1})
