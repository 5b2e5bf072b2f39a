"""One idempotency key (per merchant) ↦ one request ↦ one outcome, forever: replays, rejections,
conflicting reuse, merchant scope, concurrent duplicates, and replays across a service restart."""

from __future__ import annotations

import re

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import (
    balance,
    call_once,
    earn,
    error_of,
    funded_member,
    ledger_snapshot,
    replay_flag,
    unique,
)

pytestmark = pytest.mark.timeout(120)

MUTATING_METHODS = ("Earn", "Authorize", "Capture", "Void", "Redeem", "Refund")


@pytest.fixture
def merchant(service) -> str:
    merchant_id = unique("m")
    add_merchant(service.database_url, merchant_id, 1000)  # 10% give-back
    return merchant_id


def authorize(stub, merchant, member, points):
    return stub.Authorize(
        pb.AuthorizeRequest(merchant_id=merchant, member_id=member, points=points, idempotency_key=unique("k")),
        timeout=30,
    )


def redeem(stub, merchant, member, points):
    return stub.Redeem(
        pb.RedeemRequest(merchant_id=merchant, member_id=member, points=points, idempotency_key=unique("k")), timeout=30
    )


def prepare(method: str, stub, merchant: str) -> tuple[str, object]:
    """A member holding 1,000 point-units, whatever `method` needs before it (a hold, a redemption),
    and a request of `method` under a fresh key. Returns (member, request)."""
    member = funded_member(stub, merchant, 1_000)
    key = unique("k")
    if method == "Earn":
        return member, pb.EarnRequest(
            merchant_id=merchant, member_id=member, purchase_amount=2_500, idempotency_key=key
        )
    if method == "Authorize":
        return member, pb.AuthorizeRequest(merchant_id=merchant, member_id=member, points=300, idempotency_key=key)
    if method == "Capture":
        hold = authorize(stub, merchant, member, 300)
        return member, pb.CaptureRequest(
            merchant_id=merchant, authorization_id=hold.authorization_id, points=200, idempotency_key=key
        )
    if method == "Void":
        hold = authorize(stub, merchant, member, 300)
        return member, pb.VoidRequest(merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=key)
    if method == "Redeem":
        return member, pb.RedeemRequest(merchant_id=merchant, member_id=member, points=400, idempotency_key=key)
    if method == "Refund":
        spent = redeem(stub, merchant, member, 500)
        return member, pb.RefundRequest(
            merchant_id=merchant, transaction_id=spent.transaction_id, points=150, idempotency_key=key
        )
    raise AssertionError(method)


def wire(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def names_field(details: str, field: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(field)}(?![A-Za-z_])", details) is not None


# --- replays of a successful call ---


@pytest.mark.parametrize("method", MUTATING_METHODS)
def test_replay_returns_identical_response_and_moves_nothing(stub, service, merchant, method):
    member, request = prepare(method, stub, merchant)
    rpc = getattr(stub, method)
    first, first_flag = call_once(rpc, request)
    assert first_flag is None, "the first call under a key is not a replay"

    before = ledger_snapshot(service.database_url)
    balance_before = balance(stub, member)
    second, second_flag = call_once(rpc, request)
    assert wire(second) == wire(first)
    assert second_flag == "true"
    assert ledger_snapshot(service.database_url) == before
    assert balance(stub, member) == balance_before

    # The member's balance moves for another reason; the key still answers its first outcome.
    earn(stub, merchant, member, 10_000)
    before = ledger_snapshot(service.database_url)
    third, third_flag = call_once(rpc, request)
    assert wire(third) == wire(first)
    assert third_flag == "true"
    assert ledger_snapshot(service.database_url) == before


def test_replay_of_earn_records_one_transaction_with_two_entries(stub, service, merchant):
    member = unique("mem")
    request = pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=7_000, idempotency_key=unique("k"))
    responses = [stub.Earn(request, timeout=30) for _ in range(5)]
    assert len({wire(r) for r in responses}) == 1
    rows = fetch(
        service.database_url,
        """SELECT t.transaction_id, count(e.entry_id) AS entries
                    FROM transactions t LEFT JOIN entries e USING (transaction_id)
                    WHERE t.merchant_id = $1 AND t.idempotency_key = $2 GROUP BY t.transaction_id""",
        merchant,
        request.idempotency_key,
    )
    assert [(f"txn_{r['transaction_id']}", r["entries"]) for r in rows] == [(responses[0].transaction_id, 2)]
    assert balance(stub, member) == (700, 0, 700)


# --- replays of a rejected call ---


def _insufficient_redeem(stub, merchant, member):
    return stub.Redeem, pb.RedeemRequest(
        merchant_id=merchant, member_id=member, points=500, idempotency_key=unique("k")
    )


def _insufficient_authorize(stub, merchant, member):
    return stub.Authorize, pb.AuthorizeRequest(
        merchant_id=merchant, member_id=member, points=500, idempotency_key=unique("k")
    )


@pytest.mark.parametrize("make_call", [_insufficient_redeem, _insufficient_authorize], ids=["Redeem", "Authorize"])
def test_rejection_replays_same_error_after_member_is_funded(stub, service, merchant, make_call):
    member = funded_member(stub, merchant, 100)
    rpc, request = make_call(stub, merchant, member)
    first = error_of(lambda: rpc(request, timeout=30))
    assert first.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "100 point-units available" in first.details()

    earn(stub, merchant, member, 100_000)  # +10,000: the same request under a new key would succeed now
    before = ledger_snapshot(service.database_url)
    again = error_of(lambda: rpc(request, timeout=30))
    assert (again.code(), again.details()) == (first.code(), first.details())
    assert ledger_snapshot(service.database_url) == before
    assert balance(stub, member) == (10_100, 0, 10_100)

    request.idempotency_key = unique("k")
    rpc(request, timeout=30)  # a new key is a new operation
    assert balance(stub, member)[2] == 9_600


def test_not_found_member_replays_not_found_after_member_is_created(stub, service, merchant):
    member = unique("mem")
    request = pb.RedeemRequest(merchant_id=merchant, member_id=member, points=10, idempotency_key=unique("k"))
    first = error_of(lambda: stub.Redeem(request, timeout=30))
    assert first.code() == grpc.StatusCode.NOT_FOUND
    earn(stub, merchant, member, 10_000)
    again = error_of(lambda: stub.Redeem(request, timeout=30))
    assert (again.code(), again.details()) == (first.code(), first.details())
    assert balance(stub, member) == (1_000, 0, 1_000)


def test_replayed_rejection_carries_replay_trailer(stub, merchant):
    member = funded_member(stub, merchant, 100)
    request = pb.RedeemRequest(merchant_id=merchant, member_id=member, points=500, idempotency_key=unique("k"))
    first = error_of(lambda: stub.Redeem(request, timeout=30))
    assert replay_flag(first) is None
    again = error_of(lambda: stub.Redeem(request, timeout=30))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert replay_flag(again) == "true", "a replayed rejection must say it is a replay, like a replayed success"


# --- the same key with a different request ---


def _changed(request, field: str, stub, merchant: str):
    """A copy of `request` that differs in `field` (an id changes to another valid one)."""
    other = type(request)()
    other.CopyFrom(request)
    if field == "member_id":
        other.member_id = funded_member(stub, merchant, 1_000)
    elif field == "authorization_id":
        other.authorization_id = authorize(stub, merchant, funded_member(stub, merchant, 100), 10).authorization_id
    elif field == "transaction_id":
        other.transaction_id = redeem(stub, merchant, funded_member(stub, merchant, 100), 10).transaction_id
    else:
        setattr(other, field, getattr(request, field) + 1)
    return other


@pytest.mark.parametrize(
    "method,field",
    [
        ("Earn", "purchase_amount"),
        ("Earn", "member_id"),
        ("Authorize", "points"),
        ("Authorize", "hold_ttl_seconds"),
        ("Authorize", "member_id"),
        ("Capture", "points"),
        ("Capture", "authorization_id"),
        ("Void", "authorization_id"),
        ("Redeem", "points"),
        ("Redeem", "member_id"),
        ("Refund", "points"),
        ("Refund", "transaction_id"),
    ],
)
def test_same_key_different_request_is_already_exists_naming_the_field(stub, service, merchant, method, field):
    member, request = prepare(method, stub, merchant)
    rpc = getattr(stub, method)
    first, _ = call_once(rpc, request)
    changed = _changed(request, field, stub, merchant)
    before = ledger_snapshot(service.database_url)
    error = error_of(lambda: rpc(changed, timeout=30))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert names_field(error.details(), field), error.details()
    assert ledger_snapshot(service.database_url) == before
    # the refused request did not replace the first: the key still replays it
    again, flag = call_once(rpc, request)
    assert (wire(again), flag) == (wire(first), "true")


def test_same_key_for_another_method_is_already_exists_naming_the_method(stub, service, merchant):
    member = funded_member(stub, merchant, 1_000)
    key = unique("k")
    earned = stub.Earn(
        pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=1_000, idempotency_key=key), timeout=30
    )
    before = ledger_snapshot(service.database_url)
    error = error_of(
        lambda: stub.Redeem(
            pb.RedeemRequest(merchant_id=merchant, member_id=member, points=100, idempotency_key=key), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert names_field(error.details(), "method"), error.details()
    assert ledger_snapshot(service.database_url) == before
    assert balance(stub, member) == (1_000 + earned.points, 0, 1_000 + earned.points)


def test_same_key_for_a_rejected_call_with_different_request_is_already_exists(stub, merchant):
    member = funded_member(stub, merchant, 100)
    request = pb.RedeemRequest(merchant_id=merchant, member_id=member, points=500, idempotency_key=unique("k"))
    assert error_of(lambda: stub.Redeem(request, timeout=30)).code() == grpc.StatusCode.FAILED_PRECONDITION
    request.points = 50  # would succeed as a new operation, but the key is taken
    error = error_of(lambda: stub.Redeem(request, timeout=30))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and names_field(error.details(), "points")
    assert balance(stub, member) == (100, 0, 100)


# --- keys are scoped per merchant ---


def test_same_key_at_two_merchants_is_two_operations(stub, service, merchant):
    second_merchant = unique("m")
    add_merchant(service.database_url, second_merchant, 500)  # 5% give-back
    member = unique("mem")
    key = unique("k")
    at_first, first_flag = call_once(
        stub.Earn, pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=10_000, idempotency_key=key)
    )
    at_second, second_flag = call_once(
        stub.Earn,
        pb.EarnRequest(merchant_id=second_merchant, member_id=member, purchase_amount=30_000, idempotency_key=key),
    )
    assert (first_flag, second_flag) == (None, None)
    assert (at_first.points, at_second.points) == (1_000, 1_500)
    assert at_first.transaction_id != at_second.transaction_id
    assert at_second.balance == 2_500
    assert balance(stub, member) == (2_500, 0, 2_500)
    # the key under each merchant replays that merchant's own operation
    again, flag = call_once(
        stub.Earn, pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=10_000, idempotency_key=key)
    )
    assert (wire(again), flag) == (wire(at_first), "true")
    rows = fetch(
        service.database_url,
        "SELECT merchant_id FROM transactions WHERE idempotency_key = $1 ORDER BY merchant_id",
        key,
    )
    assert sorted(r["merchant_id"] for r in rows) == sorted([merchant, second_merchant])


def test_key_of_one_merchant_does_not_replay_for_another(stub, service, merchant):
    second_merchant = unique("m")
    add_merchant(service.database_url, second_merchant, 1000)
    member = funded_member(stub, merchant, 1_000)
    key = unique("k")
    first = stub.Redeem(
        pb.RedeemRequest(merchant_id=merchant, member_id=member, points=100, idempotency_key=key), timeout=30
    )
    second, flag = call_once(
        stub.Redeem, pb.RedeemRequest(merchant_id=second_merchant, member_id=member, points=100, idempotency_key=key)
    )
    assert flag is None
    assert second.transaction_id != first.transaction_id
    assert balance(stub, member) == (800, 0, 800)


# --- concurrent duplicates ---

CONCURRENT_DUPLICATES = 50


def _fire(rpc, requests):
    futures = [rpc.future(request, timeout=60) for request in requests]
    outcomes = []
    for future in futures:
        try:
            outcomes.append(("OK", future.result(), replay_flag(future)))
        except grpc.RpcError as error:
            outcomes.append((error.code().name, error.details(), replay_flag(error)))
    return outcomes


def test_concurrent_identical_earns_post_once(stub, service, merchant):
    member = unique("mem")
    request = pb.EarnRequest(
        merchant_id=merchant, member_id=member, purchase_amount=12_340, idempotency_key=unique("k")
    )
    outcomes = _fire(stub.Earn, [request] * CONCURRENT_DUPLICATES)
    assert [code for code, _, _ in outcomes] == ["OK"] * CONCURRENT_DUPLICATES
    assert len({wire(response) for _, response, _ in outcomes}) == 1
    assert sorted(str(flag) for _, _, flag in outcomes) == ["None"] + ["true"] * (CONCURRENT_DUPLICATES - 1)
    rows = fetch(
        service.database_url,
        "SELECT transaction_id FROM transactions WHERE merchant_id = $1 AND idempotency_key = $2",
        merchant,
        request.idempotency_key,
    )
    assert [f"txn_{r['transaction_id']}" for r in rows] == [outcomes[0][1].transaction_id]
    assert balance(stub, member) == (1_234, 0, 1_234)


def test_concurrent_identical_redeems_debit_once(stub, service, merchant):
    member = funded_member(stub, merchant, 1_000)
    request = pb.RedeemRequest(merchant_id=merchant, member_id=member, points=100, idempotency_key=unique("k"))
    outcomes = _fire(stub.Redeem, [request] * CONCURRENT_DUPLICATES)
    assert [code for code, _, _ in outcomes] == ["OK"] * CONCURRENT_DUPLICATES
    assert len({wire(response) for _, response, _ in outcomes}) == 1
    assert outcomes[0][1].balance == 900
    assert balance(stub, member) == (900, 0, 900)
    rows = fetch(
        service.database_url, "SELECT count(*) AS n FROM transactions WHERE member_id = $1 AND kind = 3", member
    )
    assert rows[0]["n"] == 1


def test_concurrent_conflicting_requests_under_one_key_have_one_winner(stub, merchant):
    member = funded_member(stub, merchant, 10_000)
    key = unique("k")
    requests = [
        pb.RedeemRequest(merchant_id=merchant, member_id=member, points=10 * (i + 1), idempotency_key=key)
        for i in range(20)
    ]
    outcomes = _fire(stub.Redeem, requests)
    winners = [(request, result) for request, (code, result, _) in zip(requests, outcomes) if code == "OK"]
    losers = [(code, details) for code, details, _ in outcomes if code != "OK"]
    assert len(winners) == 1
    assert len(losers) == 19
    assert all(code == "ALREADY_EXISTS" and names_field(details, "points") for code, details in losers), losers
    request, response = winners[0]
    assert response.points == request.points
    assert balance(stub, member) == (10_000 - request.points, 0, 10_000 - request.points)


# --- across a restart ---


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_replays_after_restart_are_identical(create_database, service_factory, stop):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    service = service_factory(url)
    answered = []  # (method, request, wire response | (code, details))
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for method in MUTATING_METHODS:
            _, request = prepare(method, stub, merchant)
            answered.append((method, request, wire(getattr(stub, method)(request, timeout=30))))
        poor = funded_member(stub, merchant, 100)
        rejected = pb.RedeemRequest(merchant_id=merchant, member_id=poor, points=500, idempotency_key=unique("k"))
        error = error_of(lambda: stub.Redeem(rejected, timeout=30))
        answered.append(("Redeem", rejected, (error.code(), error.details())))
        earn(stub, merchant, poor, 100_000)  # after the restart the rejected request could succeed
    before = ledger_snapshot(url)

    if stop == "sigterm":
        assert service.terminate() == 0
    else:
        service.kill()
    restarted = service_factory(url)

    with restarted.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for method, request, first in answered:
            rpc = getattr(stub, method)
            if isinstance(first, bytes):
                response, flag = call_once(rpc, request)
                assert (wire(response), flag) == (first, "true"), method
            else:
                error = error_of(lambda: rpc(request, timeout=30))
                assert (error.code(), error.details()) == first, method
        # the stored request survived too: a different request under a used key is refused
        method, request, _ = answered[0]
        changed = type(request)()
        changed.CopyFrom(request)
        changed.purchase_amount += 1
        error = error_of(lambda: stub.Earn(changed, timeout=30))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and names_field(error.details(), "purchase_amount")
    assert ledger_snapshot(url) == before
    assert ledger_discrepancies(url) == []
