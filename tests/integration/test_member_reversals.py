"""ReverseTransaction of till transactions (issue 15) through the real service and Postgres, under a
program with expiry, levels, an operator promotion, acquiring and referral rewards, and merchants'
fees: an earn is reversed with everything it set off (tier and referral bonuses, the acquirer's reward,
its uplift and promotion legs, its lot), a redeem and a capture with their fees and the lots they
consumed; each once; the refusals (points spent, refunded in part, a transaction set off by an earn, a
refund, a reversal) post nothing; a merchant's Refund of a reversed transaction is refused; a period cut
holding reversals gives statements whose lines sum to them; adjustments' and transfers' credits get
expiry lots. Reconcile is clean after each test."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as apb
from points.v1 import admin_pb2_grpc
from points.v1 import points_pb2 as pb
from tests.harness import fetch, ledger_discrepancies
from tests.integration.helpers import earn, unique
from tests.integration.test_member_admin import CORRECTION, World, _transfer, refused

pytestmark = pytest.mark.timeout(300)

NOW_US = time.time_ns() // 1000
HOUR_US = 3_600_000_000
YEAR_US = 365 * 86_400_000_000
FEE_REDEEMED_BPS = 200  # shop-a's fee on redemptions


def _program() -> dict:
    return {
        "expiry_period_us": YEAR_US,
        "levels": [
            {"name": "registered", "threshold_point_units": 0},
            {"name": "blue", "threshold_point_units": 1_000, "bonus_point_units": 100, "multiplier_bps": 15_000},
        ],
        "acquiring_share_bps": 100,
        "referral_bonus_point_units": 50,
        "referral_minimum_purchase": 1_000,
        "promotions": [
            {
                "promotion_id": "network-boost",
                "start_us": NOW_US - HOUR_US,
                "end_us": NOW_US + 10 * HOUR_US,
                "scope": "network",
                "multiplier_bps": 12_000,
                "budget_point_units": 1_000_000,
                "sponsor_id": "operator",
            },
        ],
        "member_transfers": "on",
        "member_transfer_fee_bps": 250,
    }


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    world = World(url, _program())
    fetch(url, "UPDATE merchants SET fee_redeemed_bps = $1 WHERE merchant_id = 'shop-a'", FEE_REDEEMED_BPS)
    world.restart()  # the fee is read at start
    yield world
    world.stop()
    assert ledger_discrepancies(url) == []


def _reverse(world, transaction_id: str, key: str | None = None) -> apb.ReverseTransactionResponse:
    return world.admin.ReverseTransaction(
        apb.ReverseTransactionRequest(
            transaction_id=transaction_id, reason=CORRECTION, note="till error", idempotency_key=key or unique("rev")
        ),
        metadata=world.operator,
        timeout=30,
    )


def _posted(world, member: str) -> int:
    return world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted


def _account(world, kind: str, owner: str) -> int:
    rows = fetch(world.url, "SELECT balance FROM account_balances WHERE kind = $1 AND owner_id = $2", kind, owner)
    return rows[0]["balance"] if rows else 0


def _lots(world, member: str) -> list[tuple[int, int, int]]:
    return [
        (r["lot_id"], r["amount"], r["expires_at_us"])
        for r in fetch(
            world.url, "SELECT lot_id, amount, expires_at_us FROM lots WHERE member_id = $1 ORDER BY lot_id", member
        )
    ]


def _count(world) -> int:
    return fetch(world.url, "SELECT count(*) AS n FROM transactions")[0]["n"]


def _id(transaction_id: str) -> int:
    return int(transaction_id.removeprefix("txn_"))


def test_an_earn_is_reversed_with_every_leg_and_everything_it_set_off_once(world):
    referrer = unique("referrer")
    earn(world.stub, "shop-b", referrer, 1_000)
    member = unique("mem")
    world.stub.LinkMember(
        pb.LinkMemberRequest(
            merchant_id="shop-b", member_id=member, referrer_member_id=referrer, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    referrer_before, acquiring_before = _posted(world, referrer), _account(world, "merchant_acquiring", "shop-b")
    issued_before = _account(world, "merchant_issued", "shop-a")
    operator_before = {
        kind: _account(world, kind, "operator")
        for kind in ("operator_tier_rewards", "operator_promotions", "operator_referrals", "operator_acquiring")
    }
    earned = earn(world.stub, "shop-a", member, 20_000)  # base 2,000, +400 promotion, blue's bonus 100
    assert (earned.points, earned.bonus_points, earned.level) == (2_000, 500, "blue")
    assert _posted(world, member) == 2_500 and _posted(world, referrer) == referrer_before + 50
    assert _account(world, "merchant_acquiring", "shop-b") == acquiring_before + 200
    set_off = fetch(
        world.url,
        "SELECT transaction_id, kind FROM transactions WHERE original_transaction_id = $1 ORDER BY transaction_id",
        _id(earned.transaction_id),
    )
    assert sorted(r["kind"] for r in set_off) == [7, 8, 9]  # tier bonus, referral bonus, acquiring reward

    key = unique("rev")
    reversal = _reverse(world, earned.transaction_id, key)
    assert (reversal.original_transaction_id, reversal.member_id) == (earned.transaction_id, member)
    assert (reversal.points, reversal.balance, reversal.available) == (-2_500, 0, 0)
    assert _reverse(world, earned.transaction_id, key).transaction_id == reversal.transaction_id  # a replay
    # every account as before the earn: the member, the referrer, the acquirer, the operator's funding
    assert _posted(world, member) == 0 and _posted(world, referrer) == referrer_before
    assert _account(world, "merchant_issued", "shop-a") == issued_before
    assert _account(world, "merchant_acquiring", "shop-b") == acquiring_before
    assert {kind: _account(world, kind, "operator") for kind in operator_before} == operator_before
    assert _lots(world, member) == []  # the earn's and the tier bonus's lots went with them
    # one reversal per original, each its exact mirror (reconcile checks the entries), recorded once
    reversals = fetch(
        world.url,
        "SELECT original_transaction_id AS o, reversal_transaction_id AS r FROM member_reversals "
        "WHERE original_transaction_id = ANY($1::bigint[]) ORDER BY 1",
        [_id(earned.transaction_id), *(r["transaction_id"] for r in set_off)],
    )
    assert len(reversals) == 4 and reversals[0]["r"] == _id(reversal.transaction_id)
    # the level's qualifying points went with the earn: the member is back at the first level
    assert world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).level == "registered"

    detail = refused(lambda: _reverse(world, earned.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"reversed already, by {reversal.transaction_id}" in detail
    refund = lambda: world.stub.Refund(  # noqa: E731
        pb.RefundRequest(
            merchant_id="shop-a", transaction_id=earned.transaction_id, points=100, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    detail = refused(refund, grpc.StatusCode.FAILED_PRECONDITION)
    assert f"was reversed by the operator ({reversal.transaction_id})" in detail
    # the member's history shows the reversals of the earn (its base and promotion), its tier bonus and the
    # acquiring reward it set off (which names the member and moves none of its points)
    mirrors = {
        t.original_transaction_id: t
        for t in world.history(member)
        if t.kind in (pb.TRANSACTION_KIND_REVERSAL_CREDIT, pb.TRANSACTION_KIND_REVERSAL_DEBIT)
    }
    assert mirrors[earned.transaction_id].kind == pb.TRANSACTION_KIND_REVERSAL_DEBIT
    assert mirrors[earned.transaction_id].transaction_id == reversal.transaction_id
    assert sorted(t.points for t in mirrors.values()) == [-2_400, -100, 0]  # 0: the acquirer's reward
    assert ledger_discrepancies(world.url) == []


def test_an_earn_whose_points_were_spent_or_that_was_refunded_is_refused_whole(world):
    member = unique("mem")
    world.stub.LinkMember(pb.LinkMemberRequest(merchant_id="shop-a", member_id=member, idempotency_key=unique("k")))
    earned = earn(world.stub, "shop-b", member, 5_000)  # 500 + 100 promotion; shop-a's acquiring reward
    world.stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=member, points=200, idempotency_key=unique("k")), timeout=30
    )
    before = _count(world)
    detail = refused(lambda: _reverse(world, earned.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"credited 600 point-units that member '{member}' no longer has: 400 available" in detail
    assert "The points were spent" in detail
    assert _count(world) == before and _posted(world, member) == 400  # nothing posted

    other = unique("mem")
    refunded = earn(world.stub, "shop-b", other, 5_000)
    world.stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=refunded.transaction_id, points=100, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    detail = refused(lambda: _reverse(world, refunded.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "refunded in part" in detail and "Refund the rest" in detail
    # what an earn set off is reversed with the earn, not on its own
    [reward] = fetch(
        world.url,
        "SELECT transaction_id FROM transactions WHERE kind = 9 AND original_transaction_id = $1",
        _id(earned.transaction_id),
    )
    detail = refused(lambda: _reverse(world, f"txn_{reward['transaction_id']}"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "is of kind acquiring_reward (9)" in detail and "set off by an earn: reverse that earn" in detail
    assert ledger_discrepancies(world.url) == []


def test_a_redeem_and_a_capture_are_reversed_with_their_fees_and_lots(world):
    member = unique("mem")
    earn(world.stub, "shop-b", member, 10_000)  # 1,000 + 200 promotion, and blue's bonus 100: two lots
    lots_before = _lots(world, member)
    redeemed = world.stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=300, idempotency_key=unique("k")), timeout=30
    )
    fees_before = _account(world, "merchant_fees", "shop-a")
    reversal = _reverse(world, redeemed.transaction_id)
    assert (reversal.points, reversal.balance) == (300, 1_300)
    assert _lots(world, member) == lots_before  # the consumed lot came back whole, its expiry kept
    assert _account(world, "merchant_fees", "shop-a") == fees_before + 6  # 2% of 300 given back
    hold = world.stub.Authorize(
        pb.AuthorizeRequest(merchant_id="shop-a", member_id=member, points=500, idempotency_key=unique("k")),
        timeout=30,
    )
    captured = world.stub.Capture(
        pb.CaptureRequest(
            merchant_id="shop-a", authorization_id=hold.authorization_id, points=400, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert _posted(world, member) == 900
    assert _reverse(world, captured.transaction_id).balance == 1_300
    assert _lots(world, member) == lots_before
    detail = refused(lambda: _reverse(world, reversal.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "a reversal is not reversed" in detail
    assert ledger_discrepancies(world.url) == []


def test_a_period_holding_reversals_gives_statements_whose_lines_sum_to_them(world):
    clearing = admin_pb2_grpc.ClearingServiceStub(world._bare)

    def cut() -> int:
        moment = timestamp_pb2.Timestamp()
        moment.GetCurrentTime()
        return clearing.CloseSettlementPeriod(
            apb.ClearingServiceCloseSettlementPeriodRequest(cut_off=moment), metadata=world.operator, timeout=60
        ).period.period_id

    member = unique("mem")
    earned = earn(world.stub, "shop-a", member, 30_000)  # base 3,000
    redeemed = world.stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=1_000, idempotency_key=unique("k")), timeout=30
    )
    cut()
    time.sleep(0.01)
    _reverse(world, redeemed.transaction_id)
    _reverse(world, earned.transaction_id)
    period = cut()
    statement = clearing.GetStatement(
        apb.ClearingServiceGetStatementRequest(merchant_id="shop-a", period_id=period),
        metadata=world.operator,
        timeout=30,
    ).statement
    # the reversals count with the refunds; the redemption's fee (2% of 1,000) comes back netted in fees
    assert (statement.issued, statement.earn_refunds) == (0, 3_000)
    assert (statement.redeemed, statement.redemption_refunds, statement.fees) == (0, 1_000, -20)
    assert statement.net == 3_000 - 1_000 + 20 and statement.transactions == 2
    exported = clearing.ExportStatement(
        apb.ClearingServiceExportStatementRequest(merchant_id="shop-a", period_id=period), metadata=world.operator
    )
    lines = list(csv.DictReader(io.StringIO(exported.csv.decode())))
    assert {line["kind"] for line in lines} == {"reversal_credit", "reversal_debit"}
    assert sum(int(line["net"]) for line in lines) == statement.net
    assert sum(int(line["fee"]) for line in lines) == statement.fees
    assert ledger_discrepancies(world.url) == []


def test_adjustments_and_transfers_credit_expiry_lots_and_a_transfer_keeps_the_senders_expiries(world):
    member = unique("mem")
    credit = world.adjust(member, 1_000)
    [(lot_id, amount, expires_at_us)] = _lots(world, member)
    assert (lot_id, amount) == (_id(credit.transaction_id), 1_000)
    assert expires_at_us - YEAR_US <= time.time_ns() // 1000  # the program's expiry, from the credit
    receiver = unique("mem")
    earn(world.stub, "shop-b", receiver, 1_000)
    sent = _transfer(world, member, receiver, 400, pin=None)  # 2.5% fee: 10
    received = [lot for lot in _lots(world, receiver) if lot[0] == _id(sent.transaction_id)]
    assert received == [(_id(sent.transaction_id), 390, expires_at_us)]  # the sender's lot's expiry, not a new one
    # its reversal takes the receiver's lot back and gives the sender its lot whole
    _reverse(world, sent.transaction_id)
    assert [lot for lot in _lots(world, receiver) if lot[0] == _id(sent.transaction_id)] == []
    assert _lots(world, member) == [(lot_id, 1_000, expires_at_us)]
    assert ledger_discrepancies(world.url) == []


def test_a_link_names_its_referrer_by_an_alias(world):
    referrer, card = unique("referrer"), unique("card")
    earn(world.stub, "shop-b", referrer, 1_000)
    world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=referrer, alias=card), metadata=world.operator)
    member = unique("mem")
    linked = world.stub.LinkMember(
        pb.LinkMemberRequest(
            merchant_id="shop-b", member_id=member, referrer_member_id=card, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert linked.referrer_member_id == referrer
    before = _posted(world, referrer)
    earn(world.stub, "shop-a", member, 1_000)
    assert _posted(world, referrer) == before + 50  # the referral bonus reached the member the card names
    assert ledger_discrepancies(world.url) == []


def test_reconcile_reports_a_reversed_transaction_refunded_or_what_an_earn_set_off_left_unreversed(create_database):
    url = create_database()
    world = World(url, {"acquiring_share_bps": 100})
    try:
        member = unique("mem")
        world.stub.LinkMember(pb.LinkMemberRequest(merchant_id="shop-b", member_id=member, idempotency_key="l"))
        earned = earn(world.stub, "shop-a", member, 10_000)
        _reverse(world, earned.transaction_id)
    finally:
        world.service.terminate()  # graceful: its projector writes the last batches' rows before it exits
        world.stop()
    assert ledger_discrepancies(url) == []
    [reward] = fetch(
        url,
        "SELECT transaction_id FROM transactions WHERE kind = 9 AND original_transaction_id = $1",
        _id(earned.transaction_id),
    )
    reward_id = reward["transaction_id"]
    fetch(url, "UPDATE transactions SET refunded = 10 WHERE transaction_id = $1", _id(earned.transaction_id))
    fetch(url, "DELETE FROM member_reversals WHERE original_transaction_id = $1", reward_id)
    problems = ledger_discrepancies(url)
    assert f"transaction {_id(earned.transaction_id)} is reversed and refunded" in problems
    assert (
        f"transaction {reward_id} was set off by reversed earn {_id(earned.transaction_id)}, not reversed" in problems
    )


@pytest.fixture(scope="module")
def seeds(create_database):
    """A world under seed rules: 众店's merchant match (50% of the base to the earn's merchant) and fan
    reward (the acquirer's 1% in vouchers), a sign-up bonus of 300 and a conversion rate at shop-a (3
    point-units per 2 of its own points)."""
    url = create_database()
    world = World(
        url,
        {
            "merchant_match_bps": 5_000,
            "acquiring_share_bps": 100,
            "acquiring_reward_asset": "VOUCHERS",
            "signup_bonus_point_units": 300,
            "merchant_terms": [{"merchant_id": "shop-a", "conversion_rate": {"numerator": 3, "denominator": 2}}],
        },
    )
    yield world
    world.stop()
    assert ledger_discrepancies(url) == []


def test_the_seed_kinds_are_reversed_the_merchant_match_with_its_earn_a_sign_up_bonus_and_a_conversion(seeds):
    member = unique("mem")
    earned = earn(seeds.stub, "shop-b", member, 10_000)  # base 1,000; the match: 500 to shop-b; sign-up 300
    assert _posted(seeds, member) == 1_300 and _account(seeds, "merchant_points", "shop-b") == 500
    [signup] = fetch(seeds.url, "SELECT transaction_id FROM transactions WHERE kind = 29 AND member_id = $1", member)
    reversal = _reverse(seeds, earned.transaction_id)
    assert (reversal.points, reversal.balance) == (-1_000, 300)
    assert _account(seeds, "merchant_points", "shop-b") == 0  # the match went with its earn
    assert _reverse(seeds, f"txn_{signup['transaction_id']}").balance == 0
    converted = seeds.stub.ConvertMerchantPoints(
        pb.ConvertMerchantPointsRequest(
            merchant_id="shop-a", member_id=member, merchant_points=10, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (converted.points, _posted(seeds, member)) == (15, 15)
    assert _reverse(seeds, converted.transaction_id).balance == 0
    # an earn whose fan reward paid its acquirer vouchers is not reversed: a reversal mirrors points only
    fan = unique("fan")
    seeds.stub.LinkMember(pb.LinkMemberRequest(merchant_id="shop-a", member_id=fan, idempotency_key=unique("k")))
    rewarded = earn(seeds.stub, "shop-b", fan, 10_000)
    before = _count(seeds)
    detail = refused(lambda: _reverse(seeds, rewarded.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "of kind fan_reward" in detail and "moved vouchers" in detail
    assert _count(seeds) == before
    assert ledger_discrepancies(seeds.url) == []


def test_a_household_members_earn_makes_a_lot_on_the_shared_account(world):
    head = unique("head")
    earn(world.stub, "shop-b", head, 1_000)
    household = world.admin.CreateHousehold(
        apb.CreateHouseholdRequest(head_member_id=head), metadata=world.operator, timeout=30
    ).household_id
    earned = earn(world.stub, "shop-b", head, 2_000)  # 200 + 40 promotion, to the shared account
    [(lot_id, amount, _)] = _lots(world, f"household:{household}")
    assert (lot_id, amount) == (_id(earned.transaction_id), 240)
    assert ledger_discrepancies(world.url) == []


def _redeemed(world) -> pb.RedeemResponse:
    member = unique("race")
    earn(world.stub, "shop-b", member, 3_000)
    return world.stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=member, points=200, idempotency_key=unique("k")), timeout=30
    )


def test_refunds_racing_reversals_of_the_same_redeems_never_both_take_effect(world):
    """Each redeem gets a merchant's Refund and an operator's reversal at once: exactly one of them takes
    effect (a refund routed while the reversal is asked makes the reversal refuse), never both. (An earn
    under a program is guarded by its earn record too; a redeem only by the registry's pending reversals:
    with their check removed this test fails, checked.)"""
    redeems = [_redeemed(world) for _ in range(24)]

    def refund(redeemed) -> grpc.StatusCode:
        try:
            world.stub.Refund(
                pb.RefundRequest(
                    merchant_id="shop-b",
                    transaction_id=redeemed.transaction_id,
                    points=100,
                    idempotency_key=unique("k"),
                ),
                timeout=30,
            )
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    def reverse(redeemed) -> grpc.StatusCode:
        try:
            _reverse(world, redeemed.transaction_id)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # each reversal asked just before its refund: the refund lands while the reversal reads the redeem
        reversals, refunds = [], []
        for e in redeems:
            reversals.append(pool.submit(reverse, e))
            refunds.append(pool.submit(refund, e))
        outcomes = [(f.result(), r.result()) for f, r in zip(refunds, reversals)]
    for refunded, reversed_ in outcomes:
        assert {refunded, reversed_} == {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}, outcomes
    assert ledger_discrepancies(world.url) == []
