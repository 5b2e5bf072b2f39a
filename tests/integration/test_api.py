"""Each PointsService method's happy path and error paths, against a real service and Postgres."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from points.v1 import points_pb2 as pb
from tests.harness import add_merchant, fetch, ledger_discrepancies

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def merchant(service) -> str:
    merchant_id = unique("m")
    add_merchant(service.database_url, merchant_id, 1000)  # 10% give-back
    return merchant_id


def earn(stub, merchant, member, purchase, key=None):
    return stub.Earn(
        pb.EarnRequest(
            merchant_id=merchant, member_id=member, purchase_amount=purchase, idempotency_key=key or unique("k")
        )
    )


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


# --- Earn ---


def test_earn_credits_floor_of_give_back_share(stub, merchant):
    member = unique("mem")
    response = earn(stub, merchant, member, 12_345)  # 10% of 123.45 = 12.345 -> 1234 point-units
    assert response.points == 1234
    assert response.balance == 1234
    assert response.give_back_bps == 1000
    assert response.transaction_id.startswith("txn_")
    second = earn(stub, merchant, member, 100_000)
    assert second.points == 10_000 and second.balance == 11_234
    balance = stub.GetBalance(pb.GetBalanceRequest(member_id=member))
    assert (balance.posted, balance.held, balance.available) == (11_234, 0, 11_234)


def test_earn_posts_balanced_entries_to_member_and_merchant_issued(stub, service, merchant):
    member = unique("mem")
    response = earn(stub, merchant, member, 5_000)
    rows = fetch(
        service.database_url,
        """SELECT a.kind, a.owner_id, e.amount FROM entries e JOIN accounts a USING (account_id)
                    WHERE e.transaction_id = $1 ORDER BY e.amount""",
        int(response.transaction_id[4:]),
    )
    assert [(r["kind"], r["owner_id"], r["amount"]) for r in rows] == [
        ("merchant_issued", merchant, -500),
        ("member", member, 500),
    ]


def test_earn_unknown_merchant_is_not_found(stub):
    error = error_of(lambda: earn(stub, unique("nobody"), unique("mem"), 100))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "not in the alliance" in error.details()


@pytest.mark.parametrize("purchase", [0, -1, -(2**63), 10**13 + 1])
def test_earn_rejects_out_of_range_purchase(stub, merchant, purchase):
    error = error_of(lambda: earn(stub, merchant, unique("mem"), purchase))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "purchase_amount" in error.details()


@pytest.mark.parametrize(
    "field,value",
    [
        ("member_id", ""),
        ("member_id", "x" * 129),
        ("member_id", "bad id"),
        ("idempotency_key", ""),
        ("idempotency_key", "k" * 129),
        ("merchant_id", ""),
    ],
)
def test_earn_rejects_bad_ids_and_keys(stub, merchant, field, value):
    request = pb.EarnRequest(
        merchant_id=merchant, member_id=unique("mem"), purchase_amount=100, idempotency_key=unique("k")
    )
    setattr(request, field, value)
    error = error_of(lambda: stub.Earn(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


# --- Authorize / Capture / Void ---


def funded_member(stub, merchant, points):
    member = unique("mem")
    earn(stub, merchant, member, points * 10)  # 10% merchant
    return member


def authorize(stub, merchant, member, points, ttl=0, key=None):
    return stub.Authorize(
        pb.AuthorizeRequest(
            merchant_id=merchant,
            member_id=member,
            points=points,
            hold_ttl_seconds=ttl,
            idempotency_key=key or unique("k"),
        )
    )


def test_authorize_holds_and_capture_posts_part_releasing_rest(stub, service, merchant):
    member = funded_member(stub, merchant, 1_000)
    hold = authorize(stub, merchant, member, 600)
    assert hold.available == 400 and hold.points == 600
    assert hold.authorization_id.startswith("auth_")
    assert hold.expires_at.seconds > time.time() + 6 * 86_400  # default TTL 7 days
    balance = stub.GetBalance(pb.GetBalanceRequest(member_id=member))
    assert (balance.posted, balance.held, balance.available) == (1_000, 600, 400)
    capture = stub.Capture(
        pb.CaptureRequest(
            merchant_id=merchant, authorization_id=hold.authorization_id, points=250, idempotency_key=unique("k")
        )
    )
    assert (capture.points, capture.released, capture.balance, capture.available) == (250, 350, 750, 750)
    balance = stub.GetBalance(pb.GetBalanceRequest(member_id=member))
    assert (balance.posted, balance.held, balance.available) == (750, 0, 750)
    rows = fetch(
        service.database_url,
        "SELECT kind, amount FROM transactions WHERE transaction_id = $1",
        int(capture.transaction_id[4:]),
    )
    assert (rows[0]["kind"], rows[0]["amount"]) == (2, 250)


def test_capture_zero_takes_whole_hold(stub, merchant):
    member = funded_member(stub, merchant, 1_000)
    hold = authorize(stub, merchant, member, 400)
    capture = stub.Capture(
        pb.CaptureRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
    )
    assert (capture.points, capture.released, capture.balance) == (400, 0, 600)


def test_authorize_more_than_available_is_failed_precondition(stub, merchant):
    member = funded_member(stub, merchant, 1_000)
    authorize(stub, merchant, member, 700)
    error = error_of(lambda: authorize(stub, merchant, member, 301))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "300 point-units available" in error.details()


def test_authorize_unknown_member_is_not_found(stub, merchant):
    error = error_of(lambda: authorize(stub, merchant, unique("ghost"), 10))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_authorize_rejects_bad_ttl(stub, merchant):
    member = funded_member(stub, merchant, 100)
    error = error_of(lambda: authorize(stub, merchant, member, 10, ttl=-5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "hold_ttl_seconds" in error.details()
    error = error_of(lambda: authorize(stub, merchant, member, 10, ttl=10**9))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_over_capture_double_capture_and_void_after_capture_are_rejected(stub, merchant):
    member = funded_member(stub, merchant, 1_000)
    hold = authorize(stub, merchant, member, 300)
    over = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(
                merchant_id=merchant, authorization_id=hold.authorization_id, points=301, idempotency_key=unique("k")
            )
        )
    )
    assert over.code() == grpc.StatusCode.FAILED_PRECONDITION and "exceeds" in over.details()
    stub.Capture(
        pb.CaptureRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
    )
    again = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
        )
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and "already captured" in again.details()
    void = error_of(
        lambda: stub.Void(
            pb.VoidRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
        )
    )
    assert void.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.GetBalance(pb.GetBalanceRequest(member_id=member)).posted == 700


def test_void_releases_hold_and_capture_after_void_fails(stub, merchant):
    member = funded_member(stub, merchant, 500)
    hold = authorize(stub, merchant, member, 500)
    void = stub.Void(
        pb.VoidRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
    )
    assert (void.released, void.available) == (500, 500)
    error = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "voided" in error.details()


def test_expired_hold_cannot_be_captured_and_frees_points(stub, service, merchant):
    member = funded_member(stub, merchant, 1_000)
    hold = authorize(stub, merchant, member, 800, ttl=1)
    assert stub.GetBalance(pb.GetBalanceRequest(member_id=member)).available == 200
    time.sleep(1.3)
    balance = stub.GetBalance(pb.GetBalanceRequest(member_id=member))
    assert (balance.posted, balance.held, balance.available) == (1_000, 0, 1_000)
    error = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in error.details()
    # the freed points can be held again
    assert authorize(stub, merchant, member, 1_000).available == 0
    rows = fetch(
        service.database_url, "SELECT status FROM holds WHERE authorization_id = $1", int(hold.authorization_id[5:])
    )
    assert rows[0]["status"] == 4


def test_capture_by_another_merchant_is_permission_denied(stub, service, merchant):
    other = unique("m")
    add_merchant(service.database_url, other, 500)
    member = funded_member(stub, merchant, 100)
    hold = authorize(stub, merchant, member, 100)
    error = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(merchant_id=other, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = error_of(
        lambda: stub.Void(
            pb.VoidRequest(merchant_id=other, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.GetBalance(pb.GetBalanceRequest(member_id=member)).held == 100


@pytest.mark.parametrize(
    "authorization_id,code",
    [
        ("auth_999999999", grpc.StatusCode.NOT_FOUND),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("txn_5", grpc.StatusCode.INVALID_ARGUMENT),
        ("auth_-1", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_capture_of_unknown_or_malformed_authorization(stub, merchant, authorization_id, code):
    error = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(merchant_id=merchant, authorization_id=authorization_id, idempotency_key=unique("k"))
        )
    )
    assert error.code() == code


# --- Redeem / Refund ---


def redeem(stub, merchant, member, points, key=None):
    return stub.Redeem(
        pb.RedeemRequest(merchant_id=merchant, member_id=member, points=points, idempotency_key=key or unique("k"))
    )


def refund(stub, merchant, transaction_id, points, key=None):
    return stub.Refund(
        pb.RefundRequest(
            merchant_id=merchant, transaction_id=transaction_id, points=points, idempotency_key=key or unique("k")
        )
    )


def test_redeem_debits_and_insufficient_is_failed_precondition(stub, merchant):
    member = funded_member(stub, merchant, 1_000)
    response = redeem(stub, merchant, member, 600)
    assert (response.points, response.balance, response.available) == (600, 400, 400)
    error = error_of(lambda: redeem(stub, merchant, member, 401))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.GetBalance(pb.GetBalanceRequest(member_id=member)).posted == 400


def test_redeem_unknown_member_is_not_found(stub, merchant):
    error = error_of(lambda: redeem(stub, merchant, unique("ghost"), 1))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "first Earn" in error.details()


@pytest.mark.parametrize("points", [0, -1, 10**12 + 1, 2**63 - 1])
def test_redeem_rejects_out_of_range_points(stub, merchant, points):
    error = error_of(lambda: redeem(stub, merchant, unique("mem"), points))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_partial_refunds_of_a_redemption_never_exceed_it(stub, merchant):
    member = funded_member(stub, merchant, 1_000)
    spent = redeem(stub, merchant, member, 500)
    first = refund(stub, merchant, spent.transaction_id, 200)
    assert first.kind == pb.TRANSACTION_KIND_REFUND_OF_REDEMPTION
    assert (first.points, first.balance) == (200, 700)
    over = error_of(lambda: refund(stub, merchant, spent.transaction_id, 301))
    assert over.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refund(stub, merchant, spent.transaction_id, 300).balance == 1_000
    error = error_of(lambda: refund(stub, merchant, spent.transaction_id, 1))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_refund_of_a_capture(stub, merchant):
    member = funded_member(stub, merchant, 1_000)
    hold = authorize(stub, merchant, member, 400)
    capture = stub.Capture(
        pb.CaptureRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=unique("k"))
    )
    back = refund(stub, merchant, capture.transaction_id, 400)
    assert back.balance == 1_000


def test_refund_of_an_earn_takes_points_back_unless_spent(stub, merchant):
    member = unique("mem")
    earned = earn(stub, merchant, member, 10_000)  # 1000 point-units
    back = refund(stub, merchant, earned.transaction_id, 300)
    assert back.kind == pb.TRANSACTION_KIND_REFUND_OF_EARN
    assert back.balance == 700
    redeem(stub, merchant, member, 650)
    spent = error_of(lambda: refund(stub, merchant, earned.transaction_id, 100))
    assert spent.code() == grpc.StatusCode.FAILED_PRECONDITION and "spent" in spent.details()
    # the message states what the member still has, so the merchant knows how much it can take back
    assert "100 point-units asked back, 50 available" in spent.details()
    assert stub.GetBalance(pb.GetBalanceRequest(member_id=member)).posted == 50


def test_refund_by_another_merchant_is_permission_denied(stub, service, merchant):
    other = unique("m")
    add_merchant(service.database_url, other, 500)
    member = funded_member(stub, merchant, 100)
    spent = redeem(stub, merchant, member, 100)
    error = error_of(lambda: refund(stub, other, spent.transaction_id, 10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_refund_of_unknown_transaction_is_not_found(stub, merchant):
    error = error_of(lambda: refund(stub, merchant, "txn_999999999", 10))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_refund_of_a_refund_is_failed_precondition(stub, merchant):
    member = funded_member(stub, merchant, 100)
    spent = redeem(stub, merchant, member, 100)
    back = refund(stub, merchant, spent.transaction_id, 50)
    error = error_of(lambda: refund(stub, merchant, back.transaction_id, 10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- queries ---


def test_get_balance_of_unknown_member_is_not_found(stub):
    error = error_of(lambda: stub.GetBalance(pb.GetBalanceRequest(member_id=unique("ghost"))))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_list_transactions_newest_first_with_pages(stub, merchant):
    member = unique("mem")
    ids = [earn(stub, merchant, member, 1_000 * (i + 1)).transaction_id for i in range(5)]
    spent = redeem(stub, merchant, member, 50)
    ids.append(spent.transaction_id)
    seen = []
    token = ""
    while True:
        page = stub.ListTransactions(pb.ListTransactionsRequest(member_id=member, page_token=token, page_size=2))
        seen.extend(page.transactions)
        token = page.next_page_token
        if not token:
            break
    assert [t.transaction_id for t in seen] == list(reversed(ids))
    assert seen[0].kind == pb.TRANSACTION_KIND_REDEEM and seen[0].points == -50
    assert seen[-1].kind == pb.TRANSACTION_KIND_EARN and seen[-1].points == 100
    assert seen[-1].purchase_amount == 1_000 and seen[-1].merchant_id == merchant


def test_list_transactions_rejects_bad_page_token_and_size(stub, merchant):
    member = funded_member(stub, merchant, 10)
    error = error_of(lambda: stub.ListTransactions(pb.ListTransactionsRequest(member_id=member, page_token="garbage")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in error.details()
    error = error_of(lambda: stub.ListTransactions(pb.ListTransactionsRequest(member_id=member, page_size=10_000)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in error.details()
    error = error_of(lambda: stub.ListTransactions(pb.ListTransactionsRequest(member_id=unique("ghost"))))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_serving_and_reflection_lists_the_service(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with service.channel() as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="points.v1.PointsService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "points.v1.PointsService" in names


def test_the_ledger_reconciles_after_all_of_the_above(service):
    # runs last in this module (pytest keeps file order): every posting so far balances
    assert ledger_discrepancies(service.database_url) == []
