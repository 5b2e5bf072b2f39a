"""Vouchers beyond the split redeem (issue 7): a merchant spends the vouchers it holds at the operator's own
store (kind 14); the operator's fee covers both tenders of a split redeem; a split tender on
Authorize/Capture/Void, whose vouchers are reserved beside the points hold, posted as one SPLIT_REDEEM
on capture, released on void or expiry, and kept across a restart. The ledger reconciles after each."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import add_program_version, earn, error_of, replay_flag, unique, wait_program_in_force

STORE = "op-store"
RATE_BPS = 1_000  # 10% a round: round 1 gives every holder a tenth of its holding in vouchers


def _config(store: str | None) -> dict:
    config: dict = {
        "dividends": {
            "threshold_point_units": 8_000,
            "growth_bps": 100_000,
            "rate_bps_schedule": [RATE_BPS],
            "credit_limit_bps": 50_000,
        }
    }
    if store is not None:
        config["operator_store_merchant_id"] = store
    return config


def _wait(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _held_by_merchant(url: str, merchant: str) -> int:
    rows = fetch(
        url, "SELECT balance FROM account_balances WHERE kind = 'merchant_vouchers' AND owner_id = $1", merchant
    )
    return rows[0]["balance"] if rows else 0


def _store_vouchers(url: str) -> int:
    rows = fetch(
        url,
        "SELECT balance FROM account_balances WHERE kind = 'merchant_redeemed' AND owner_id = $1 "
        "AND asset_code = 'VOUCHERS'",
        STORE,
    )
    return rows[0]["balance"] if rows else 0


@pytest.fixture(scope="module")
def world(create_database):
    """alice earns 6,000 at shop-a and spends 4,000 at shop-b (fee 1%), bob earns 3,000: the pool of
    9,000 passes the 8,000 threshold and round 1 pays alice, bob and shop-b (its positive position) 10%
    of their holdings in vouchers."""
    url = create_database()
    add_merchant(url, "shop-a", 1000)
    add_merchant(url, "shop-b", 1000, fee_redeemed_bps=100)
    add_merchant(url, STORE, 1000)
    add_program_version(url, _config(None))
    service = ServiceProcess(url, "--dividend-check-seconds", "0.2").start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        alice, bob = unique("alice"), unique("bob")
        earn(stub, "shop-a", alice, 60_000)
        stub.Redeem(
            pb.RedeemRequest(merchant_id="shop-b", member_id=alice, points=4_000, idempotency_key=unique("k")),
            timeout=30,
        )
        earn(stub, "shop-a", bob, 30_000)
        _wait(
            lambda: (
                _held_by_merchant(url, "shop-b") > 0
                and stub.GetBalance(pb.GetBalanceRequest(member_id=alice), timeout=30).vouchers == 200
            ),
            "the dividend round did not arrive",
        )
        yield url, stub, service, alice
    service.kill()


def _balance(stub, member: str) -> pb.GetBalanceResponse:
    return stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)


def _spend(stub, merchant: str, vouchers: int, key: str | None = None):
    return stub.SpendMerchantVouchers(
        pb.SpendMerchantVouchersRequest(merchant_id=merchant, vouchers=vouchers, idempotency_key=key or unique("k")),
        timeout=30,
    )


def test_a_merchant_spends_its_vouchers_at_the_operators_store(world):
    url, stub, service, _ = world
    held = _held_by_merchant(url, "shop-b")
    assert held > 20
    none = error_of(lambda: _spend(stub, "shop-b", 5))
    assert none.code() == grpc.StatusCode.FAILED_PRECONDITION and "operator_store_merchant_id" in none.details()

    add_program_version(url, _config(STORE))  # version 2 names the store; the service loads it at once
    time.sleep(1.3)
    key = unique("k")
    spent = _spend(stub, "shop-b", 20, key)
    assert (spent.vouchers, spent.store_merchant_id, spent.voucher_balance) == (20, STORE, held - 20)
    assert spent.transaction_id.startswith("txn_") and spent.created_at.seconds > 0
    again, call = stub.SpendMerchantVouchers.with_call(
        pb.SpendMerchantVouchersRequest(merchant_id="shop-b", vouchers=20, idempotency_key=key), timeout=30
    )
    assert again == spent and replay_flag(call) == "true"
    other = error_of(lambda: _spend(stub, "shop-b", 21, key))
    assert other.code() == grpc.StatusCode.ALREADY_EXISTS and "vouchers" in other.details()
    assert (_held_by_merchant(url, "shop-b"), _store_vouchers(url)) == (held - 20, 20)
    rows = fetch(url, "SELECT kind, merchant_id, member_id, amount FROM transactions WHERE kind = 14")
    assert [dict(r) for r in rows] == [{"kind": 14, "merchant_id": "shop-b", "member_id": "", "amount": 20}]

    too_much = error_of(lambda: _spend(stub, "shop-b", held))
    assert too_much.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"holds {held - 20} voucher-units" in too_much.details()
    penniless = error_of(lambda: _spend(stub, "shop-a", 1))
    assert penniless.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds 0 voucher-units" in penniless.details()
    itself = error_of(lambda: _spend(stub, STORE, 1))
    assert itself.code() == grpc.StatusCode.FAILED_PRECONDITION and "operator's store" in itself.details()
    zero = error_of(lambda: _spend(stub, "shop-b", 0))
    assert zero.code() == grpc.StatusCode.INVALID_ARGUMENT

    # a spend is not a purchase a merchant can refund
    refund = error_of(
        lambda: stub.Refund(
            pb.RefundRequest(
                merchant_id="shop-b", transaction_id=spent.transaction_id, points=1, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert (
        refund.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "not an earn, capture or redemption" in refund.details()
    )
    foreign = error_of(
        lambda: stub.Refund(
            pb.RefundRequest(
                merchant_id="shop-a", transaction_id=spent.transaction_id, points=1, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert foreign.code() == grpc.StatusCode.PERMISSION_DENIED

    # gateways spend through SubmitBatch too
    batch = stub.SubmitBatch(
        pb.SubmitBatchRequest(
            operations=[
                pb.Operation(
                    spend_vouchers=pb.SpendMerchantVouchersRequest(
                        merchant_id="shop-b", vouchers=3, idempotency_key=unique("k")
                    )
                ),
                pb.Operation(
                    spend_vouchers=pb.SpendMerchantVouchersRequest(
                        merchant_id="shop-a", vouchers=3, idempotency_key=unique("k")
                    )
                ),
            ]
        ),
        timeout=30,
    )
    assert batch.results[0].outcome == pb.OPERATION_OUTCOME_APPLIED
    assert batch.results[0].spend_vouchers.voucher_balance == held - 23
    assert batch.results[1].status_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert (_held_by_merchant(url, "shop-b"), _store_vouchers(url)) == (held - 23, 23)
    scraped = urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=30).read().decode()
    assert 'points_program_transactions_total{kind="merchant_voucher_spend"} 2.0' in scraped
    assert ledger_discrepancies(url) == []


def test_the_fee_of_a_split_redeem_covers_both_tenders(world):
    url, stub, _, alice = world
    before = _balance(stub, alice)
    spent = stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=alice, points=1_000, vouchers=10, idempotency_key=unique("k")),
        timeout=30,
    )
    assert (spent.balance, spent.voucher_balance) == (before.posted - 1_000, before.vouchers - 10)
    transaction_id = int(spent.transaction_id.removeprefix("txn_"))
    row = fetch(url, "SELECT kind, amount, fee FROM transactions WHERE transaction_id = $1", transaction_id)[0]
    assert dict(row) == {"kind": 12, "amount": 1_010, "fee": 10}  # floor(1,010 * 1%), not floor(1,000 * 1%)
    fees = fetch(
        url,
        "SELECT e.amount FROM entries e JOIN accounts a USING (account_id) "
        "WHERE e.transaction_id = $1 AND a.kind = 'merchant_fees'",
        transaction_id,
    )
    assert [r["amount"] for r in fees] == [-10]
    assert ledger_discrepancies(url) == []


def _authorize(stub, member: str, points: int, vouchers: int, merchant: str = "shop-b", ttl: int = 0):
    return stub.Authorize(
        pb.AuthorizeRequest(
            merchant_id=merchant,
            member_id=member,
            points=points,
            vouchers=vouchers,
            hold_ttl_seconds=ttl,
            idempotency_key=unique("k"),
        ),
        timeout=30,
    )


def _capture(stub, authorization_id: str, points: int = 0, vouchers: int = 0, merchant: str = "shop-b"):
    return stub.Capture(
        pb.CaptureRequest(
            merchant_id=merchant,
            authorization_id=authorization_id,
            points=points,
            vouchers=vouchers,
            idempotency_key=unique("k"),
        ),
        timeout=30,
    )


def _void(stub, authorization_id: str, merchant: str = "shop-b"):
    return stub.Void(
        pb.VoidRequest(merchant_id=merchant, authorization_id=authorization_id, idempotency_key=unique("k")), timeout=30
    )


def test_a_split_tender_hold_is_captured_voided_and_refunded_as_one_unit(world):
    url, stub, _, alice = world
    start = _balance(stub, alice)
    own = start.vouchers
    assert own >= 10 and start.voucher_credit_used == 0

    hold = _authorize(stub, alice, 500, 6)
    assert (hold.points, hold.vouchers, hold.voucher_available, hold.available) == (
        500,
        6,
        own - 6,
        start.available - 500,
    )
    during = _balance(stub, alice)
    assert (during.vouchers, during.vouchers_held, during.voucher_credit_held, during.held) == (own, 6, 0, 500)
    # a redeem cannot spend what the hold reserved: one voucher-unit more than the rest comes from credit
    redeem = stub.Redeem(
        pb.RedeemRequest(
            merchant_id="shop-b", member_id=alice, points=0, vouchers=own - 5, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (redeem.voucher_balance, redeem.voucher_credit_used) == (6, 1)
    stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=redeem.transaction_id, points=own - 5, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (_balance(stub, alice).vouchers, _balance(stub, alice).voucher_credit_used) == (own, 0)
    short = error_of(lambda: _authorize(stub, alice, 1, own - 5 + 10_000))
    assert short.code() == grpc.StatusCode.FAILED_PRECONDITION and "insufficient vouchers" in short.details()
    foreign = error_of(lambda: _capture(stub, hold.authorization_id, merchant="shop-a"))
    assert foreign.code() == grpc.StatusCode.PERMISSION_DENIED
    over = error_of(lambda: _capture(stub, hold.authorization_id, 300, 7))
    assert over.code() == grpc.StatusCode.FAILED_PRECONDITION and "6 voucher-units held" in over.details()

    captured = _capture(stub, hold.authorization_id, 300, 4)
    assert (captured.points, captured.released, captured.vouchers, captured.vouchers_released) == (300, 200, 4, 2)
    assert (captured.balance, captured.available) == (start.posted - 300, start.available - 300)
    after = _balance(stub, alice)
    assert (after.vouchers, after.vouchers_held, after.held) == (own - 4, 0, 0)
    transaction_id = int(captured.transaction_id.removeprefix("txn_"))
    row = fetch(
        url, "SELECT kind, amount, fee, authorization_id FROM transactions WHERE transaction_id = $1", transaction_id
    )[0]
    assert dict(row) == {
        "kind": 12,
        "amount": 304,
        "fee": 3,
        "authorization_id": int(hold.authorization_id.removeprefix("auth_")),
    }
    twice = error_of(lambda: _capture(stub, hold.authorization_id))
    assert twice.code() == grpc.StatusCode.FAILED_PRECONDITION and "already captured" in twice.details()
    assert ledger_discrepancies(url) == []

    refund = stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=captured.transaction_id, points=304, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (refund.points, refund.vouchers, refund.kind) == (304, 4, pb.TRANSACTION_KIND_SPLIT_REFUND)
    back = _balance(stub, alice)
    assert (back.posted, back.vouchers) == (start.posted, own)

    # vouchers only, then voided
    only = _authorize(stub, alice, 0, 3)
    assert (only.points, only.vouchers) == (0, 3)
    voided = _void(stub, only.authorization_id)
    assert (voided.released, voided.vouchers_released) == (0, 3)
    assert _balance(stub, alice).vouchers_held == 0
    again = error_of(lambda: _void(stub, only.authorization_id))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and "voided" in again.details()

    # a points-only hold takes no vouchers at capture
    plain = _authorize(stub, alice, 100, 0)
    wrong = error_of(lambda: _capture(stub, plain.authorization_id, 100, 1))
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds no vouchers" in wrong.details()
    assert _capture(stub, plain.authorization_id).points == 100

    # beyond its own vouchers a member holds on its voucher credit; the capture of the whole hold uses it
    limit = _balance(stub, alice).voucher_credit_limit
    assert limit >= 5
    credit = _authorize(stub, alice, 0, own + 5)
    held = _balance(stub, alice)
    assert (held.vouchers_held, held.voucher_credit_held) == (own, 5)
    whole = _capture(stub, credit.authorization_id)
    assert (whole.vouchers, whole.points, whole.transaction_id != "") == (own + 5, 0, True)
    spent = _balance(stub, alice)
    assert (spent.vouchers, spent.voucher_credit_used, spent.vouchers_held, spent.voucher_credit_held) == (0, 5, 0, 0)
    assert ledger_discrepancies(url) == []


def test_an_expired_split_tender_hold_releases_its_vouchers(world):
    url, stub, _, alice = world
    before = _balance(stub, alice)
    hold = _authorize(stub, alice, 50, 2, ttl=1)
    assert _balance(stub, alice).voucher_credit_held == before.voucher_credit_held + 2
    time.sleep(1.5)
    earn(stub, "shop-a", unique("passer-by"), 1_000)  # any batch sweeps expired holds
    after = _balance(stub, alice)
    assert (after.vouchers_held, after.voucher_credit_held, after.held) == (0, before.voucher_credit_held, 0)
    late = error_of(lambda: _capture(stub, hold.authorization_id))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in late.details()
    status = fetch(
        url,
        "SELECT status FROM voucher_holds WHERE authorization_id = $1",
        int(hold.authorization_id.removeprefix("auth_")),
    )
    assert [r["status"] for r in status] == [4]
    assert ledger_discrepancies(url) == []


def test_split_tender_holds_survive_a_restart(world):
    url, stub, service, alice = world
    earn(stub, "shop-a", alice, 10_000)  # some points to hold
    bob = unique("bob")
    earn(stub, "shop-a", bob, 10_000)
    open_hold = _authorize(stub, alice, 100, 2)
    done = _authorize(stub, alice, 100, 1)
    _capture(stub, done.authorization_id)
    service.kill()
    restarted = ServiceProcess(url, "--dividend-check-seconds", "0.2").start()
    try:
        with restarted.channel() as channel:
            again = points_pb2_grpc.PointsServiceStub(channel)
            assert (_balance(again, alice).voucher_credit_held, _balance(again, alice).held) == (2, 100)
            twice = error_of(lambda: _capture(again, done.authorization_id))
            assert twice.code() == grpc.StatusCode.FAILED_PRECONDITION and "already captured" in twice.details()
            captured = _capture(again, open_hold.authorization_id)
            assert (captured.points, captured.vouchers) == (100, 2)
            assert (_balance(again, alice).voucher_credit_held, _balance(again, alice).held) == (0, 0)
    finally:
        restarted.kill()
    assert ledger_discrepancies(url) == []


def test_split_tender_holds_count_towards_holds_max(world):
    """Vouchers-only holds have no fast-path hold: --holds-max bounds them all the same."""
    url, _, _, alice = world
    bounded = ServiceProcess(url, "--holds-max", "3").start()
    try:
        with bounded.channel() as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)
            open_now = len(fetch(url, "SELECT 1 FROM voucher_holds WHERE status = 1"))
            assert open_now < 3
            for _ in range(3 - open_now):
                _authorize(stub, alice, 0, 1)
            full = error_of(lambda: _authorize(stub, alice, 0, 1))
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum number" in full.details()
    finally:
        bounded.terminate()  # a graceful stop projects its batches, which the check below reads
    assert ledger_discrepancies(url) == []
