"""The seed systems' rules (issue 16) in LedgerStateMachine, driven directly (no database): the sign-up bonus
when a member enrols, the merchant match and its reversal, the fee on the sale and star rebates, give-back
bounds, 众店's fan reward in vouchers with merchants' voucher credit; each batch's record balances per asset
and a rolled-back batch leaves the rules' state as it was. Against both fast paths (the machine fixture)."""

from __future__ import annotations

import pytest

from processor import domain, rules
from processor.domain import Code, Method
from tests.unit.test_state_machine import CAFE, SHOP, earn, in_force, machine, op, run  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(30)

MATCH_ACCOUNT, SIGNUP_ACCOUNT, FAN_ACCOUNT = 31, 32, 33
FEE_REVENUE = 1


@pytest.fixture
def seeds(machine):  # noqa: F811 (the fixture imported above)
    machine.operator_accounts.update(
        {
            rules.ACCOUNT_OPERATOR_MERCHANT_MATCH: MATCH_ACCOUNT,
            rules.ACCOUNT_OPERATOR_SIGNUP_BONUSES: SIGNUP_ACCOUNT,
            rules.ACCOUNT_OPERATOR_FAN_REWARDS: FAN_ACCOUNT,
        }
    )
    return machine


def _kind(write, kind: int) -> list[tuple]:
    return [t for t in write.transactions if t[1] == kind]


def test_a_member_enrolled_by_its_first_earn_or_link_gets_the_sign_up_bonus_once(seeds):
    in_force(seeds, signup_bonus_point_units=5_000)
    (outcome,), write = run(seeds, earn("ann", 1_000))
    assert outcome.code is Code.OK and seeds.balance("ann") == (6_000, 0)
    (bonus,) = _kind(write, rules.KIND_SIGNUP_BONUS)
    assert (bonus[2], bonus[3], bonus[4], bonus[8]) == ("shop", "ann", 5_000, "signup:ann")
    assert {e[1]: e[2] for e in write.entries if e[0] == bonus[0]}[SIGNUP_ACCOUNT] == -5_000
    _, write = run(seeds, earn("ann", 1_000))
    assert _kind(write, rules.KIND_SIGNUP_BONUS) == []
    (linked,), write = run(seeds, op(Method.LINK, CAFE, member_id="bob"))
    assert linked.code is Code.OK and seeds.balance("bob") == (5_000, 0)
    assert [t[2] for t in _kind(write, rules.KIND_SIGNUP_BONUS)] == ["cafe"]


def test_the_match_credits_the_merchant_s_points_and_a_refund_reverses_it_in_proportion(seeds):
    in_force(seeds, merchant_match_bps=10_000)
    (earned,), write = run(seeds, earn("ann", 2_001))
    (match,) = _kind(write, rules.KIND_MERCHANT_MATCH)
    assert (match[2], match[4], match[7]) == ("shop", 2_001, earned.fields["transaction_id"])
    assert seeds.program.merchant_points == {"shop": 2_001}
    refund = op(Method.REFUND, member_id="", transaction_id=earned.fields["transaction_id"], points=1_000)
    (refunded,), write = run(seeds, refund)
    assert refunded.code is Code.OK
    (reversal,) = _kind(write, rules.KIND_MERCHANT_MATCH_REVERSAL)
    assert reversal[4] == 1_000 and seeds.program.merchant_points == {"shop": 1_001}
    # a batch rolled back takes the match back out of memory
    seeds.apply([earn("ann", 500)], {}, 1_800_000_000_000_000)
    assert seeds.program.merchant_points == {"shop": 1_501}
    seeds.rollback()
    assert seeds.program.merchant_points == {"shop": 1_001}


def test_the_sale_fee_and_star_rebates_are_in_the_fee_charged(seeds):
    in_force(
        seeds,
        fee_sale_bps=1_000,
        star_fee_rebate_bps=(0, 2_500),
        merchant_terms=(rules.MerchantTerms("shop", star_rating=2),),
    )
    (earned,), write = run(seeds, earn("ann", 1_000))  # purchase 10,000: sale fee 1,000, rebate 25%
    (row,) = [t for t in write.transactions if t[0] == earned.fields["transaction_id"]]
    assert row[9] == 750
    assert {e[1]: e[2] for e in write.entries if e[0] == row[0]}[FEE_REVENUE] == 750
    (spent,), write = run(seeds, op(Method.REDEEM, member_id="ann", points=1_000))  # 1% fee on points: 10
    (row,) = [t for t in write.transactions if t[0] == spent.fields["transaction_id"]]
    assert row[9] == 8  # 10 less a quarter, the rebate rounded down


def test_an_earn_outside_the_program_s_give_back_bounds_is_refused_and_creates_nothing_but_the_member(seeds):
    in_force(seeds, give_back_bps_min=1_500, give_back_bps_max=10_000)  # shop gives back 1,000 bps
    (outcome,), write = run(seeds, earn("ann", 1_000))
    assert outcome.code is Code.FAILED_PRECONDITION
    assert "gives back 1000 bps, outside the 1500..10000 bps program loyalty@1 allows" in outcome.message
    assert write.transactions == [] and seeds.balance("ann") == (0, 0)


def test_a_fan_reward_in_vouchers_repays_what_the_acquirer_owes_and_its_reversal_makes_it_owe(seeds):
    in_force(
        seeds,
        acquiring_share_bps=100,
        acquiring_reward_asset=rules.ASSET_VOUCHERS,
        acquiring_at_acquirer=True,
        dividends=rules.DividendSettings(threshold_point_units=10**9),
    )
    run(seeds, op(Method.LINK, CAFE, member_id="fan"))
    seeds.program.merchant_credit["cafe"] = 30  # cafe owes 30 voucher-units
    (earned,), write = run(seeds, earn("fan", 1_000, CAFE))  # at the acquirer itself: purchase 10,000 -> 100
    (reward,) = _kind(write, rules.KIND_FAN_REWARD)
    assert (reward[2], reward[3], reward[4]) == ("cafe", "fan", 100)
    assert seeds.program.merchant_credit == {} and seeds.program.vouchers[(rules.HOLDER_MERCHANT, "cafe")] == 70
    seeds.program.vouchers[(rules.HOLDER_MERCHANT, "cafe")] = 20  # it spent 50 since
    refund = op(Method.REFUND, CAFE, member_id="", transaction_id=earned.fields["transaction_id"], points=1_000)
    (refunded,), write = run(seeds, refund)
    assert refunded.code is Code.OK
    (reversal,) = _kind(write, rules.KIND_FAN_REWARD_REVERSAL)
    assert reversal[4] == 100
    assert seeds.program.merchant_credit == {"cafe": 80}
    assert seeds.program.vouchers[(rules.HOLDER_MERCHANT, "cafe")] == 0
    assert domain.ASSET_POINTS not in {e[3] for e in write.entries if e[0] == reversal[0] and len(e) > 3}
