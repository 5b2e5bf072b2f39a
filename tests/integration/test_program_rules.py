"""The program rules in the ledger (issue 7), through the real service and Postgres: tiers, promotions
with budgets, acquiring and referral links, conversion, cash-out refusal, expiry lots and the expiry job,
refund clawbacks, restart. After each scenario the ledger reconciles (every posting balances per asset,
the rules' accounts keep their signs, lots stay within the members' spendable points)."""

from __future__ import annotations

import time

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import add_program_version, earn, error_of, unique, wait_program_in_force

EXPIRY_SECONDS = 4
GRACE_SECONDS = 30
NOW_US = time.time_ns() // 1000
HOUR_US = 3_600_000_000


def _config() -> dict:
    return {
        "expiry_period_us": EXPIRY_SECONDS * 1_000_000,
        "restore_grace_us": GRACE_SECONDS * 1_000_000,
        "levels": [
            {"name": "registered", "threshold_point_units": 0},
            {"name": "blue", "threshold_point_units": 1_000, "bonus_point_units": 100, "multiplier_bps": 15_000},
            {"name": "yellow", "threshold_point_units": 3_000, "bonus_point_units": 200, "multiplier_bps": 20_000},
            {"name": "red", "threshold_point_units": 10_000, "bonus_point_units": 500, "multiplier_bps": 20_000},
        ],
        "acquiring_share_bps": 100,
        "referral_bonus_point_units": 50,
        "referral_minimum_purchase": 1_000,
        "promotions": [
            {
                "promotion_id": "double-at-promo",
                "start_us": NOW_US - HOUR_US,
                "end_us": NOW_US + 10 * HOUR_US,
                "scope": "merchant",
                "scope_id": "promo-shop",
                "multiplier_bps": 20_000,
                "budget_point_units": 250,
                "sponsor_id": "promo-shop",
            },
        ],
        "merchant_terms": [{"merchant_id": "own-points-shop", "conversion_rate": {"numerator": 3, "denominator": 2}}],
    }


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    for merchant in ("shop-a", "shop-b", "promo-shop", "own-points-shop"):
        add_merchant(url, merchant, 1000)
    add_program_version(url, _config())
    service = ServiceProcess(url).start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.channel() as channel:
        yield url, service, points_pb2_grpc.PointsServiceStub(channel)
    service.kill()


def _balance(stub, member: str) -> pb.GetBalanceResponse:
    return stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)


def _kinds(url: str, member: str) -> list[int]:
    return [
        r["kind"]
        for r in fetch(url, "SELECT kind FROM transactions WHERE member_id = $1 ORDER BY transaction_id", member)
    ]


def _account(url: str, kind: str, owner: str = "operator") -> int:
    rows = fetch(url, "SELECT balance FROM account_balances WHERE kind = $1 AND owner_id = $2", kind, owner)
    return rows[0]["balance"] if rows else 0


def test_levels_multiplier_bonus_and_history(world):
    url, _, stub = world
    member = unique("tier")
    first = earn(stub, "shop-a", member, 10_000)  # base 1,000: reaches blue at the registered rate
    assert (first.points, first.bonus_points, first.level) == (1_000, 100, "blue")  # only blue's bonus
    assert first.balance == 1_100
    second = earn(stub, "shop-a", member, 10_000)  # base 1,000 at blue: 1.5x -> 500 uplift
    assert (second.points, second.bonus_points) == (1_000, 500)
    third = earn(stub, "shop-a", member, 20_000)  # base 2,000 -> 4,000 qualifying: yellow, 1.5x
    assert (third.points, third.bonus_points, third.level) == (2_000, 1_000 + 200, "yellow")
    balance = _balance(stub, member)
    assert balance.level == "yellow"
    assert balance.posted == 1_100 + 1_500 + 3_200
    assert [(c.from_level, c.to_level) for c in balance.level_history] == [("blue", "yellow"), ("registered", "blue")]
    assert _kinds(url, member) == [1, 7, 1, 1, 7]
    events = fetch(url, "SELECT count(*) AS n FROM tier_events WHERE member_id = $1", member)
    assert events[0]["n"] == 2
    assert ledger_discrepancies(url) == []


def test_promotion_stops_at_its_budget(world):
    url, _, stub = world
    granted_before = fetch(url, "SELECT coalesce(sum(granted), 0) AS g FROM promotion_budgets")[0]["g"]
    assert granted_before == 0
    issued_before = _account(url, "merchant_issued", "promo-shop")
    bonuses = [earn(stub, "promo-shop", unique("promo"), 1_000).bonus_points for _ in range(4)]  # base 100 each
    assert bonuses == [100, 100, 50, 0]  # the 250 budget: two whole grants, a partial one, then nothing
    rows = fetch(url, "SELECT granted FROM promotion_budgets WHERE promotion_id = 'double-at-promo'")
    assert rows[0]["granted"] == 250
    # the merchant sponsors its own promotion: its issued account paid base and bonus
    assert issued_before - _account(url, "merchant_issued", "promo-shop") == 4 * 100 + 250
    assert ledger_discrepancies(url) == []


def test_refund_of_an_earn_takes_its_bonus_back_in_proportion(world):
    url, _, stub = world
    member = unique("refund")
    earn(stub, "shop-b", member, 10_000)  # blue (bonus 100)
    second = earn(stub, "shop-b", member, 10_000)  # 1,000 base + 500 uplift
    uplift_before = _account(url, "operator_tier_rewards")
    half = stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=second.transaction_id, points=500, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (half.points, half.bonus_points) == (750, 250)
    rest = stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=second.transaction_id, points=500, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert rest.points == 750 and rest.balance == 1_100
    assert _account(url, "operator_tier_rewards") - uplift_before == 500  # the uplift came back in full
    too_much = error_of(
        lambda: stub.Refund(
            pb.RefundRequest(
                merchant_id="shop-b", transaction_id=second.transaction_id, points=1, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert too_much.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ledger_discrepancies(url) == []


def test_acquiring_reward_and_its_reversal(world):
    url, _, stub = world
    member = unique("acq")
    linked = stub.LinkMember(
        pb.LinkMemberRequest(merchant_id="shop-a", member_id=member, idempotency_key=unique("k")), timeout=30
    )
    assert linked.acquirer_id == "shop-a"
    before = _account(url, "merchant_acquiring", "shop-a")
    earn(stub, "shop-a", member, 50_000)  # at the acquirer itself: no reward
    assert _account(url, "merchant_acquiring", "shop-a") == before
    elsewhere = earn(stub, "shop-b", member, 12_345)  # 1% of 12,345 minor units = 123 point-units
    assert _account(url, "merchant_acquiring", "shop-a") == before + 123
    assert _balance(stub, member).acquirer_id == "shop-a"
    base = elsewhere.points
    stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=elsewhere.transaction_id, points=base, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert _account(url, "merchant_acquiring", "shop-a") == before  # reversed in full
    assert 9 in _kinds(url, member) and 10 in _kinds(url, member)
    again = error_of(
        lambda: stub.LinkMember(
            pb.LinkMemberRequest(merchant_id="shop-b", member_id=member, idempotency_key=unique("k")), timeout=30
        )
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and "shop-a" in again.details()
    assert ledger_discrepancies(url) == []


def test_referrer_gets_a_bonus_on_the_first_qualifying_earn_only(world):
    url, _, stub = world
    referrer = unique("referrer")
    earn(stub, "shop-a", referrer, 1_000)
    member = unique("referee")
    stub.LinkMember(
        pb.LinkMemberRequest(
            merchant_id="shop-b", member_id=member, referrer_member_id=referrer, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    before = _balance(stub, referrer).posted
    earn(stub, "shop-b", member, 999)  # under the minimum purchase: no bonus yet
    assert _balance(stub, referrer).posted == before
    earn(stub, "shop-b", member, 1_000)
    assert _balance(stub, referrer).posted == before + 50
    earn(stub, "shop-b", member, 5_000)
    assert _balance(stub, referrer).posted == before + 50
    self_referral = error_of(
        lambda: stub.LinkMember(
            pb.LinkMemberRequest(
                merchant_id="shop-b", member_id=referrer, referrer_member_id=referrer, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert self_referral.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = error_of(
        lambda: stub.LinkMember(
            pb.LinkMemberRequest(
                merchant_id="shop-b",
                member_id=unique("m"),
                referrer_member_id=unique("nobody"),
                idempotency_key=unique("k"),
            ),
            timeout=30,
        )
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert ledger_discrepancies(url) == []


def test_conversion_in_whole_blocks_is_idempotent(world):
    url, _, stub = world
    member = unique("conv")
    key = unique("k")
    request = pb.ConvertMerchantPointsRequest(
        merchant_id="own-points-shop", member_id=member, merchant_points=5, idempotency_key=key
    )
    first = stub.ConvertMerchantPoints(request, timeout=30)
    assert (first.points, first.merchant_points_converted, first.merchant_points_remainder) == (6, 4, 1)
    again = stub.ConvertMerchantPoints(request, timeout=30)
    assert again.transaction_id == first.transaction_id
    assert _balance(stub, member).posted == 6
    assert _kinds(url, member) == [15]
    no_rate = error_of(
        lambda: stub.ConvertMerchantPoints(
            pb.ConvertMerchantPointsRequest(
                merchant_id="shop-a", member_id=member, merchant_points=10, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert no_rate.code() == grpc.StatusCode.FAILED_PRECONDITION and "conversion rate" in no_rate.details()
    too_few = error_of(
        lambda: stub.ConvertMerchantPoints(
            pb.ConvertMerchantPointsRequest(
                merchant_id="own-points-shop", member_id=member, merchant_points=1, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert too_few.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ledger_discrepancies(url) == []


def test_cash_out_is_refused_clearly(world):
    _, _, stub = world
    refused = error_of(
        lambda: stub.CashOut(pb.CashOutRequest(merchant_id="shop-a", member_id="anyone", points=100), timeout=30)
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be paid out as cash" in refused.details()


def test_expiry_soonest_first_restore_and_idempotent_job(world):
    url, service, stub = world
    member = unique("exp")
    first = earn(stub, "shop-b", member, 500)  # lot 1: 50
    time.sleep(1.0)
    earn(stub, "shop-b", member, 700)  # lot 2: 70, expires a second later
    balance = _balance(stub, member)
    assert balance.expiring_points == 120 and len(balance.expiring) == 2
    spent = stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=60, idempotency_key=unique("k")), timeout=30
    )  # all of lot 1, 10 of lot 2
    hold = stub.Authorize(
        pb.AuthorizeRequest(merchant_id="shop-a", member_id=member, points=20, idempotency_key=unique("k")), timeout=30
    )  # 20 of lot 2
    time.sleep(EXPIRY_SECONDS + 1.5)  # both lots are due; the job runs without traffic
    deadline = time.monotonic() + 20
    while _balance(stub, member).posted != 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    balance = _balance(stub, member)
    # 120 earned, 60 spent (all of lot 1, 10 of lot 2), 20 held (of lot 2): the 40 left of lot 2 expired
    assert (balance.posted, balance.held, balance.available) == (20, 20, 0)
    to_breakage = fetch(
        url,
        """SELECT sum(e.amount) AS s FROM entries e JOIN accounts a USING (account_id)
                                JOIN transactions t USING (transaction_id)
                                WHERE t.member_id = $1 AND a.kind = 'operator_breakage'""",
        member,
    )
    assert to_breakage[0]["s"] == 40
    expiries = fetch(url, "SELECT amount, merchant_id FROM transactions WHERE member_id = $1 AND kind = 6", member)
    assert [(r["amount"], r["merchant_id"]) for r in expiries] == [(40, "shop-b")]
    # the hold kept its points; a void gives them back with a grace period, as does a refund
    stub.Void(
        pb.VoidRequest(merchant_id="shop-a", authorization_id=hold.authorization_id, idempotency_key=unique("k")),
        timeout=30,
    )
    stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-a", transaction_id=spent.transaction_id, points=60, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    balance = _balance(stub, member)
    # the hold's 20 and the redemption's 60 came back as points of a grace period (their lots had expired)
    assert (balance.posted, balance.available, balance.expiring_points) == (80, 80, 80)
    assert all(GRACE_SECONDS - 5 < e.expires_at.seconds - time.time() <= GRACE_SECONDS + 1 for e in balance.expiring)
    time.sleep(1.0)
    again = fetch(url, "SELECT count(*) AS n FROM transactions WHERE member_id = $1 AND kind = 6", member)
    assert again[0]["n"] == 1  # a second run of the job found nothing more
    lots = fetch(url, "SELECT sum(amount) AS s FROM lots WHERE member_id = $1", member)
    assert lots[0]["s"] == 80
    # the rows (written as differences, batch by batch) are the lots the service holds
    rows = fetch(
        url,
        "SELECT expires_at_us, sum(amount) AS amount FROM lots WHERE member_id = $1 "
        "GROUP BY expires_at_us ORDER BY expires_at_us",
        member,
    )
    held = sorted(
        (e.expires_at.seconds * 1_000_000 + e.expires_at.nanos // 1_000, e.points)
        for e in _balance(stub, member).expiring
    )
    assert [(r["expires_at_us"], r["amount"]) for r in rows] == held
    assert first.points == 50
    assert ledger_discrepancies(url) == []


def test_link_and_conversion_in_a_batch(world):
    url, _, stub = world
    member = unique("batch")
    response = stub.SubmitBatch(
        pb.SubmitBatchRequest(
            operations=[
                pb.Operation(
                    link=pb.LinkMemberRequest(
                        merchant_id="own-points-shop", member_id=member, idempotency_key=unique("k")
                    )
                ),
                pb.Operation(
                    convert=pb.ConvertMerchantPointsRequest(
                        merchant_id="own-points-shop", member_id=member, merchant_points=10, idempotency_key=unique("k")
                    )
                ),
                pb.Operation(
                    convert=pb.ConvertMerchantPointsRequest(
                        merchant_id="shop-a", member_id=member, merchant_points=10, idempotency_key=unique("k")
                    )
                ),
            ]
        ),
        timeout=30,
    )
    first, second, third = response.results
    assert first.outcome == pb.OPERATION_OUTCOME_APPLIED and first.link.acquirer_id == "own-points-shop"
    assert second.outcome == pb.OPERATION_OUTCOME_APPLIED and second.convert.points == 15
    assert third.outcome == pb.OPERATION_OUTCOME_REJECTED and "conversion rate" in third.message
    assert _balance(stub, member).posted == 15
    assert ledger_discrepancies(url) == []


def test_state_survives_a_restart(world):
    url, service, stub = world
    member = unique("restart")
    earn(stub, "shop-a", member, 10_000)
    stub.LinkMember(
        pb.LinkMemberRequest(merchant_id="shop-a", member_id=member, idempotency_key=unique("k")), timeout=30
    )
    before = _balance(stub, member)
    service.kill()  # the last test of the module: the shared service does not come back
    restarted = ServiceProcess(url).start()
    try:
        with restarted.channel() as channel:
            again = points_pb2_grpc.PointsServiceStub(channel)
            after = _balance(again, member)
            expired = fetch(
                url, "SELECT coalesce(sum(amount), 0) AS s FROM transactions WHERE member_id = $1 AND kind = 6", member
            )[0]["s"]
            assert (after.level, after.acquirer_id) == (before.level, "shop-a") == ("blue", "shop-a")
            assert after.posted + expired == before.posted  # its lots came back (or expired since, posted)
            more = earn(again, "shop-a", member, 10_000)  # blue's bonus was paid once: 1.5x and no bonus
            assert more.bonus_points == 500
    finally:
        restarted.terminate()  # graceful: its projector writes the last batches' rows before it exits
    assert ledger_discrepancies(url) == []
