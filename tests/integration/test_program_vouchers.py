"""Vouchers, the second asset (issue 7): dividend rounds decided by the running service when the pool is
due, posted exactly once and audited; split-tender redeems (own vouchers first, then voucher credit up
to the limit) refunded as one unit in proportion; credit repaid first out of the next round. The ledger
reconciles after each step."""

from __future__ import annotations

import time

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import add_program_version, earn, error_of, unique, wait_program_in_force


def _config() -> dict:
    return {
        "dividends": {
            "threshold_point_units": 12_000,
            "growth_bps": 1_500,
            "rate_bps_schedule": [50, 100],
            "credit_limit_bps": 50_000,
        }
    }


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    for merchant in ("shop-a", "shop-b"):
        add_merchant(url, merchant, 1000)
    add_program_version(url, _config())
    service = ServiceProcess(url, "--dividend-check-seconds", "0.2").start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.channel() as channel:
        yield url, points_pb2_grpc.PointsServiceStub(channel), service
    service.kill()


def _balance(stub, member: str) -> pb.GetBalanceResponse:
    return stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)


def _wait(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the dividend round did not arrive"
        time.sleep(0.1)


def _rounds(url: str) -> list[dict]:
    return [
        dict(r)
        for r in fetch(
            url,
            "SELECT round_number, pool_point_units, rate_bps, holdings_point_units, "
            "total_issued, holders FROM dividend_rounds ORDER BY round_number",
        )
    ]


def test_rounds_split_tender_credit_and_refund(world):
    url, stub, _ = world
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    earn(stub, "shop-a", alice, 100_000)  # 10,000 point-units
    time.sleep(0.6)
    assert _rounds(url) == []  # a pool of 10,000 is below the 12,000 threshold
    earn(stub, "shop-a", bob, 50_000)  # 5,000: pool 15,000 >= 12,000
    _wait(lambda: _balance(stub, alice).vouchers == 50)
    assert _balance(stub, bob).vouchers == 25
    assert _rounds(url) == [
        {
            "round_number": 1,
            "pool_point_units": 15_000,
            "rate_bps": 50,
            "holdings_point_units": 15_000,
            "total_issued": 75,
            "holders": 2,
        }
    ]
    posted = fetch(url, "SELECT count(*) AS n FROM dividend_allocations WHERE transaction_id IS NOT NULL")
    assert posted[0]["n"] == 2
    time.sleep(0.6)
    assert len(_rounds(url)) == 1  # the pool has not grown 15%: no second round
    assert ledger_discrepancies(url) == []

    # credit limit: 5x the expected next dividend (round 2 at 100 bps of 10,000 = 100) = 500
    balance = _balance(stub, alice)
    assert (balance.voucher_credit_limit, balance.voucher_credit_used) == (500, 0)
    spent = stub.Redeem(
        pb.RedeemRequest(
            merchant_id="shop-b", member_id=alice, points=1_000, vouchers=120, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (spent.vouchers, spent.voucher_balance, spent.voucher_credit_used) == (120, 0, 70)
    assert spent.balance == 9_000
    too_much = error_of(
        lambda: stub.Redeem(
            pb.RedeemRequest(
                merchant_id="shop-b", member_id=alice, points=0, vouchers=10_000, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert too_much.code() == grpc.StatusCode.FAILED_PRECONDITION and "vouchers" in too_much.details().lower()
    half = stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=spent.transaction_id, points=560, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (half.points, half.vouchers) == (560, 60)  # in proportion: 120/1,120 of the value
    balance = _balance(stub, alice)
    assert (balance.posted, balance.vouchers, balance.voucher_credit_used) == (9_500, 0, 10)  # credit repaid first
    other = error_of(
        lambda: stub.Refund(
            pb.RefundRequest(
                merchant_id="shop-a", transaction_id=spent.transaction_id, points=1, idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    vouchers_only = stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=bob, points=0, vouchers=25, idempotency_key=unique("k")),
        timeout=30,
    )
    assert (vouchers_only.points, vouchers_only.voucher_balance) == (0, 0)
    assert ledger_discrepancies(url) == []

    # round 2 when the pool grew 15% (15,000 -> 17,250): alice's 10 of credit is repaid first
    earn(stub, "shop-a", carol, 30_000)  # pool 18,000
    _wait(lambda: len(_rounds(url)) == 2)
    _wait(
        lambda: fetch(url, "SELECT count(*) AS n FROM dividend_allocations WHERE transaction_id IS NULL")[0]["n"] == 0
    )
    second = _rounds(url)[1]
    assert (second["pool_point_units"], second["rate_bps"]) == (18_000, 100)
    balance = _balance(stub, alice)
    assert balance.voucher_credit_used == 0 and balance.vouchers == 9_500 // 100 - 10
    issued = fetch(url, "SELECT balance FROM account_balances WHERE kind = 'operator_dividends'")[0]["balance"]
    assert -issued == sum(r["total_issued"] for r in _rounds(url))
    assert ledger_discrepancies(url) == []


def test_a_restart_posts_no_round_twice(world):
    url, stub, service = world
    count = "SELECT count(*) AS n, coalesce(sum(amount), 0) AS s FROM transactions WHERE kind = 11"
    before = fetch(url, count)[0]
    assert before["n"] > 0
    service.kill()
    restarted = ServiceProcess(url, "--dividend-check-seconds", "0.2").start()
    try:
        time.sleep(1.0)  # several checks: the pool has not grown 15% since the last round
        assert fetch(url, count)[0] == before
        with restarted.channel() as channel:
            again = points_pb2_grpc.PointsServiceStub(channel)
            member = fetch(
                url,
                "SELECT holder_id FROM dividend_allocations WHERE holder_kind = 'member' "
                "ORDER BY round_number DESC, amount DESC LIMIT 1",
            )[0]["holder_id"]
            held = fetch(
                url,
                "SELECT balance FROM account_balances WHERE kind = 'member' AND owner_id = $1 "
                "AND asset_code = 'VOUCHERS'",
                member,
            )[0]["balance"]
            assert _balance(again, member).vouchers == held  # the fast path's voucher state came back
    finally:
        restarted.kill()
    assert ledger_discrepancies(url) == []
