"""SubmitBatch and Stream, the gateway API: results aligned by index (or matched by correlation id), one
bad operation never failing the others, every OperationOutcome where it belongs with the unary call's
status code, idempotency across batches, streams and unary calls, request-level errors, credentials,
and group commit. Against a real service and Postgres."""

from __future__ import annotations

import collections
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import balance, call_once, error_of, unique

pytestmark = pytest.mark.timeout(60)

APPLIED = pb.OPERATION_OUTCOME_APPLIED
REPLAYED = pb.OPERATION_OUTCOME_REPLAYED
INSUFFICIENT_POINTS = pb.OPERATION_OUTCOME_INSUFFICIENT_POINTS
NOT_FOUND = pb.OPERATION_OUTCOME_NOT_FOUND
HOLD_EXPIRED = pb.OPERATION_OUTCOME_HOLD_EXPIRED
KEY_REUSED = pb.OPERATION_OUTCOME_KEY_REUSED
INVALID = pb.OPERATION_OUTCOME_INVALID
PERMISSION_DENIED = pb.OPERATION_OUTCOME_PERMISSION_DENIED
REJECTED = pb.OPERATION_OUTCOME_REJECTED


def code(status: grpc.StatusCode) -> int:
    """A gRPC status code as OperationResult.status_code carries it."""
    return status.value[0]


STREAM_METHOD = "/points.v1.PointsService/Stream"
UNARY_METHOD = {
    "earn": "Earn",
    "authorize": "Authorize",
    "capture": "Capture",
    "void": "Void",
    "redeem": "Redeem",
    "refund": "Refund",
}


@pytest.fixture
def merchant(service) -> str:
    merchant_id = unique("m")
    add_merchant(service.database_url, merchant_id, 1000)  # 10% give-back: purchase p earns p // 10
    return merchant_id


@pytest.fixture(scope="module")
def limited_service(create_database):
    """A service allowing 10 operations per SubmitBatch and 2 in flight per Stream."""
    service = ServiceProcess(
        create_database(), "--batch-request-operations-max", "10", "--stream-operations-in-flight-max", "2"
    ).start()
    yield service
    service.kill()


@pytest.fixture(scope="module")
def limited_stub(limited_service):
    with limited_service.channel() as channel:
        yield points_pb2_grpc.PointsServiceStub(channel)


# --- building operations ---


def earn_op(merchant: str, member: str, purchase: int, key: str | None = None) -> pb.Operation:
    return pb.Operation(
        earn=pb.EarnRequest(
            merchant_id=merchant, member_id=member, purchase_amount=purchase, idempotency_key=key or unique("k")
        )
    )


def authorize_op(merchant: str, member: str, points: int, ttl: int = 0, key: str | None = None) -> pb.Operation:
    return pb.Operation(
        authorize=pb.AuthorizeRequest(
            merchant_id=merchant,
            member_id=member,
            points=points,
            hold_ttl_seconds=ttl,
            idempotency_key=key or unique("k"),
        )
    )


def capture_op(merchant: str, authorization_id: str, points: int = 0, key: str | None = None) -> pb.Operation:
    return pb.Operation(
        capture=pb.CaptureRequest(
            merchant_id=merchant, authorization_id=authorization_id, points=points, idempotency_key=key or unique("k")
        )
    )


def void_op(merchant: str, authorization_id: str, key: str | None = None) -> pb.Operation:
    return pb.Operation(
        void=pb.VoidRequest(merchant_id=merchant, authorization_id=authorization_id, idempotency_key=key or unique("k"))
    )


def redeem_op(merchant: str, member: str, points: int, key: str | None = None) -> pb.Operation:
    return pb.Operation(
        redeem=pb.RedeemRequest(
            merchant_id=merchant, member_id=member, points=points, idempotency_key=key or unique("k")
        )
    )


def refund_op(merchant: str, transaction_id: str, points: int, key: str | None = None) -> pb.Operation:
    return pb.Operation(
        refund=pb.RefundRequest(
            merchant_id=merchant, transaction_id=transaction_id, points=points, idempotency_key=key or unique("k")
        )
    )


# --- calling ---


def submit(stub, operations: list[pb.Operation], metadata=None) -> list[pb.OperationResult]:
    response = stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=30, metadata=metadata)
    assert len(response.results) == len(operations)
    return list(response.results)


def stream(stub, requests: list[pb.StreamRequest], metadata=None) -> list[pb.StreamResponse]:
    return list(stub.Stream(iter(requests), timeout=30, metadata=metadata))


def unary_code(stub, operation: pb.Operation, fresh_key: bool = True, metadata=None) -> int:
    """The status code of the unary call carrying the operation's request (under a new key unless told)."""
    kind = operation.WhichOneof("operation")
    request = type(getattr(operation, kind))()
    request.CopyFrom(getattr(operation, kind))
    if fresh_key:
        request.idempotency_key = unique("k")
    try:
        getattr(stub, UNARY_METHOD[kind])(request, timeout=30, metadata=metadata)
    except grpc.RpcError as error:
        return code(error.code())
    return code(grpc.StatusCode.OK)


def fund(stub, merchant: str, point_units: int) -> str:
    """A new member holding `point_units`, earned by a batch at a 10% merchant."""
    member = unique("mem")
    [result] = submit(stub, [earn_op(merchant, member, point_units * 10)])
    assert result.outcome == APPLIED and result.earn.balance == point_units
    return member


def journal(database_url: str) -> tuple[int, int, int]:
    """(transactions, entries, holds) rows in Postgres: what posting money or holding points adds."""
    row = fetch(
        database_url,
        """SELECT (SELECT count(*) FROM transactions) AS transactions,
                                        (SELECT count(*) FROM entries) AS entries,
                                        (SELECT count(*) FROM holds) AS holds""",
    )[0]
    return row["transactions"], row["entries"], row["holds"]


def has_account(stub, member: str) -> bool:
    try:
        stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def committed_batches(service) -> float:
    with urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "points_pipeline_batches_total" and sample.labels.get("result") == "committed":
                return sample.value
    return 0.0


# --- results aligned by index ---


def test_mixed_batch_of_all_six_kinds_answers_each_operation_at_its_index(stub, service, merchant):
    spender = fund(stub, merchant, 2_000)
    earlier = submit(
        stub,
        [authorize_op(merchant, spender, 300), authorize_op(merchant, spender, 200), redeem_op(merchant, spender, 400)],
    )
    assert [r.outcome for r in earlier] == [APPLIED] * 3
    to_capture, to_void = earlier[0].authorize.authorization_id, earlier[1].authorize.authorization_id
    redemption = earlier[2].redeem.transaction_id
    others = [
        capture_op(merchant, to_capture, 100),
        void_op(merchant, to_void),
        redeem_op(merchant, spender, 100),
        refund_op(merchant, redemption, 150),
        authorize_op(merchant, spender, 50),
    ]
    # earns of new members, each a different amount, interleaved with the other kinds
    earns = [earn_op(merchant, unique("mem"), 1_000 * (i + 1) + 7 * i) for i in range(12)]
    operations = []
    for i, earn in enumerate(earns):
        operations.append(earn)
        if i < len(others):
            operations.append(others[i])
    before = journal(service.database_url)

    results = submit(stub, operations)

    for index, (operation, result) in enumerate(zip(operations, results)):
        assert result.outcome == APPLIED, (index, result)
        assert result.WhichOneof("response") == operation.WhichOneof("operation"), index
    for operation, result in zip(operations, results):
        if operation.HasField("earn"):
            assert result.earn.points == operation.earn.purchase_amount // 10
            assert result.earn.balance == result.earn.points  # each earn is its member's first
    by_kind = {r.WhichOneof("response"): r for r in results if not r.HasField("earn")}
    assert (by_kind["capture"].capture.points, by_kind["capture"].capture.released) == (100, 200)
    assert by_kind["void"].void.released == 200
    assert by_kind["redeem"].redeem.points == 100
    assert (by_kind["refund"].refund.points, by_kind["refund"].refund.kind) == (
        150,
        pb.TRANSACTION_KIND_REFUND_OF_REDEMPTION,
    )
    assert by_kind["authorize"].authorize.points == 50
    transaction_ids = [
        getattr(r, r.WhichOneof("response")).transaction_id
        for r in results
        if r.WhichOneof("response") in ("earn", "capture", "redeem", "refund")
    ]
    assert len(set(transaction_ids)) == len(transaction_ids) == 15
    # 2,000 - 400 (earlier redeem) - 100 (capture) - 100 (redeem) + 150 (refund); 50 held
    assert balance(stub, spender) == (1_550, 50, 1_500)
    transactions, entries, holds = journal(service.database_url)
    assert (transactions - before[0], entries - before[1], holds - before[2]) == (15, 30, 1)


# --- one bad operation never fails the others; each outcome where it belongs ---


def test_each_refused_operation_gets_its_outcome_and_the_unary_status_code_and_the_others_apply(
    stub, service, merchant
):
    other = unique("m")
    add_merchant(service.database_url, other, 1000)
    rich = fund(stub, merchant, 1_000)
    poor = fund(stub, merchant, 100)
    stranger = fund(stub, other, 1_000)
    setup = submit(
        stub, [authorize_op(merchant, rich, 100), redeem_op(merchant, rich, 200), authorize_op(other, stranger, 300)]
    )
    assert [r.outcome for r in setup] == [APPLIED] * 3
    captured_hold = setup[0].authorize.authorization_id
    redemption = setup[1].redeem.transaction_id
    others_hold = setup[2].authorize.authorization_id
    settle = submit(stub, [capture_op(merchant, captured_hold), refund_op(merchant, redemption, 150)])
    assert [r.outcome for r in settle] == [APPLIED] * 2
    no_key = pb.Operation(earn=pb.EarnRequest(merchant_id=merchant, member_id=unique("mem"), purchase_amount=100))
    invalid = code(grpc.StatusCode.INVALID_ARGUMENT)
    not_found = code(grpc.StatusCode.NOT_FOUND)
    precondition = code(grpc.StatusCode.FAILED_PRECONDITION)
    denied = code(grpc.StatusCode.PERMISSION_DENIED)
    refused = [  # (operation, outcome, status code, a part of the message)
        (pb.Operation(), INVALID, invalid, "empty operation"),
        (earn_op(merchant, unique("mem"), -5), INVALID, invalid, "purchase_amount"),
        (redeem_op(merchant, rich, -1), INVALID, invalid, "points"),
        (redeem_op(merchant, "bad id", 10), INVALID, invalid, "member_id"),
        (capture_op(merchant, "txn_5"), INVALID, invalid, "authorization_id"),
        (refund_op(merchant, "auth_5", 1), INVALID, invalid, "transaction_id"),
        (authorize_op(merchant, rich, 10, ttl=-1), INVALID, invalid, "hold_ttl_seconds"),
        (no_key, INVALID, invalid, "idempotency_key"),
        (redeem_op(merchant, unique("ghost"), 10), NOT_FOUND, not_found, "has no points account"),
        (authorize_op(merchant, unique("ghost"), 10), NOT_FOUND, not_found, "has no points account"),
        (capture_op(merchant, "auth_999999999"), NOT_FOUND, not_found, "auth_999999999 does not exist"),
        (void_op(merchant, "auth_999999998"), NOT_FOUND, not_found, "auth_999999998 does not exist"),
        (refund_op(merchant, "txn_999999999", 1), NOT_FOUND, not_found, "txn_999999999 does not exist"),
        (earn_op(unique("nobody"), unique("mem"), 100), NOT_FOUND, not_found, "not in the alliance"),
        (redeem_op(merchant, poor, 101), INSUFFICIENT_POINTS, precondition, "100 point-units available"),
        (authorize_op(merchant, poor, 101), INSUFFICIENT_POINTS, precondition, "100 point-units available"),
        (capture_op(merchant, captured_hold), REJECTED, precondition, "already captured"),
        (void_op(merchant, captured_hold), REJECTED, precondition, "already captured"),
        (refund_op(merchant, redemption, 51), REJECTED, precondition, "exceeds what remains"),
        (void_op(merchant, others_hold), PERMISSION_DENIED, denied, "belongs to another merchant"),
        (capture_op(merchant, others_hold), PERMISSION_DENIED, denied, "belongs to another merchant"),
    ]
    good = [earn_op(merchant, unique("mem"), 1_000 * (i + 1)) for i in range(len(refused))]
    operations = [op for pair in zip(good, (case[0] for case in refused)) for op in pair] + [
        redeem_op(merchant, rich, 10),
        authorize_op(merchant, rich, 20),
    ]
    before = journal(service.database_url)

    results = submit(stub, operations)

    for i, (operation, outcome, status_code, words) in enumerate(refused):
        result = results[2 * i + 1]
        assert (result.outcome, result.status_code) == (outcome, status_code), (operation, result)
        assert words in result.message, (operation, result)
        assert result.WhichOneof("response") is None
    for i, operation in enumerate(good):
        result = results[2 * i]
        assert result.outcome == APPLIED and result.status_code == 0
        assert result.earn.points == operation.earn.purchase_amount // 10
    assert [r.outcome for r in results[-2:]] == [APPLIED, APPLIED]
    # nothing posted or held for the refused operations: only the good ones' rows
    transactions, entries, holds = journal(service.database_url)
    assert (transactions - before[0], entries - before[1], holds - before[2]) == (len(good) + 1, 2 * (len(good) + 1), 1)
    assert balance(stub, poor) == (100, 0, 100)
    assert balance(stub, rich) == (1_000 - 100 - 200 + 150 - 10, 20, 1_000 - 100 - 200 + 150 - 10 - 20)
    assert balance(stub, stranger) == (1_000, 300, 700)
    assert (
        fetch(service.database_url, "SELECT refunded FROM transactions WHERE transaction_id = $1", int(redemption[4:]))[
            0
        ]["refunded"]
        == 150
    )
    # the unary call for the same request answers the same code the batch reported
    for operation, _, status_code, _ in refused:
        if operation.WhichOneof("operation") is None:
            continue  # the unary calls have no empty request
        assert unary_code(stub, operation, fresh_key=operation is not no_key) == status_code, operation
    assert balance(stub, poor) == (100, 0, 100)


def test_capture_and_void_of_expired_holds_are_hold_expired(stub, service, merchant):
    member = fund(stub, merchant, 1_000)
    holds = submit(
        stub,
        [
            authorize_op(merchant, member, 300, ttl=1),
            authorize_op(merchant, member, 200, ttl=1),
            authorize_op(merchant, member, 100),
        ],
    )
    assert [r.outcome for r in holds] == [APPLIED] * 3
    expiring, expiring_too, lasting = (r.authorize.authorization_id for r in holds)
    deadline = time.monotonic() + 15
    while balance(stub, member)[1] != 100:  # the two short holds have expired
        assert time.monotonic() < deadline, "holds with hold_ttl_seconds=1 never expired"
        time.sleep(0.1)
    before = journal(service.database_url)

    results = submit(
        stub, [capture_op(merchant, expiring), void_op(merchant, expiring_too), capture_op(merchant, lasting, 100)]
    )

    for result, authorization_id in zip(results[:2], (expiring, expiring_too)):
        assert (result.outcome, result.status_code) == (HOLD_EXPIRED, code(grpc.StatusCode.FAILED_PRECONDITION))
        assert f"{authorization_id} expired at" in result.message and "authorize again" in result.message
    assert results[2].outcome == APPLIED and results[2].capture.points == 100
    transactions, entries, holds_count = journal(service.database_url)
    assert (transactions - before[0], entries - before[1], holds_count - before[2]) == (1, 2, 0)
    assert balance(stub, member) == (900, 0, 900)
    assert unary_code(stub, capture_op(merchant, expiring)) == code(grpc.StatusCode.FAILED_PRECONDITION)
    assert unary_code(stub, void_op(merchant, expiring_too)) == code(grpc.StatusCode.FAILED_PRECONDITION)


# --- idempotency ---


def test_a_batch_sent_again_replays_every_response_and_error_and_moves_nothing(stub, service, merchant):
    member = fund(stub, merchant, 1_000)
    newcomer = unique("mem")
    operations = [
        earn_op(merchant, newcomer, 5_000),
        redeem_op(merchant, member, 100),
        redeem_op(merchant, member, 10_000),
        redeem_op(merchant, unique("ghost"), 1),
        authorize_op(merchant, member, 50),
        pb.Operation(),
    ]
    first = submit(stub, operations)
    assert [r.outcome for r in first] == [APPLIED, APPLIED, INSUFFICIENT_POINTS, NOT_FOUND, APPLIED, INVALID]
    before = journal(service.database_url)

    again = submit(stub, operations)
    reordered = submit(stub, list(reversed(operations[:5])) + [earn_op(merchant, newcomer, 1_000)])

    # an empty operation has no key to replay under: it is INVALID every time
    assert [r.outcome for r in again] == [REPLAYED] * 5 + [INVALID]
    assert [r.outcome for r in reordered] == [REPLAYED] * 5 + [APPLIED]
    for original, replayed in zip(first[:5], again[:5]):
        assert replayed.status_code == original.status_code
        assert replayed.WhichOneof("response") == original.WhichOneof("response")
        if original.outcome == APPLIED:
            kind = original.WhichOneof("response")
            assert getattr(replayed, kind) == getattr(original, kind)
        else:
            assert replayed.message == original.message
    assert again[2].status_code == code(grpc.StatusCode.FAILED_PRECONDITION) and "available" in again[2].message
    assert again[3].status_code == code(grpc.StatusCode.NOT_FOUND)
    for original, replayed in zip(first[:5], reversed(reordered[:5])):
        assert (replayed.status_code, replayed.message) == (original.status_code, original.message)
        kind = original.WhichOneof("response")
        assert kind is None or getattr(replayed, kind) == getattr(original, kind)
    transactions, entries, holds = journal(service.database_url)
    assert (transactions - before[0], entries - before[1], holds - before[2]) == (1, 2, 0)  # the new earn only
    assert balance(stub, member) == (900, 50, 850)
    assert balance(stub, newcomer)[0] == 600


def test_unary_and_batch_calls_share_idempotency_keys(stub, service, merchant):
    member = fund(stub, merchant, 1_000)
    spent_key, refused_key, batch_key = unique("k"), unique("k"), unique("k")
    spent = stub.Redeem(
        pb.RedeemRequest(merchant_id=merchant, member_id=member, points=100, idempotency_key=spent_key), timeout=30
    )
    refused = error_of(
        lambda: stub.Redeem(
            pb.RedeemRequest(merchant_id=merchant, member_id=member, points=5_000, idempotency_key=refused_key),
            timeout=30,
        )
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION

    results = submit(
        stub,
        [
            redeem_op(merchant, member, 100, key=spent_key),
            redeem_op(merchant, member, 5_000, key=refused_key),
            redeem_op(merchant, member, 200, key=batch_key),
        ],
    )

    assert results[0].outcome == REPLAYED and results[0].redeem == spent
    assert (results[1].outcome, results[1].status_code, results[1].message) == (
        REPLAYED,
        code(grpc.StatusCode.FAILED_PRECONDITION),
        refused.details(),
    )
    assert results[2].outcome == APPLIED
    # and a unary retry of an operation a batch made replays the batch's response
    response, replay = call_once(
        stub.Redeem, pb.RedeemRequest(merchant_id=merchant, member_id=member, points=200, idempotency_key=batch_key)
    )
    assert response == results[2].redeem and replay == "true"
    assert balance(stub, member) == (700, 0, 700)
    assert (
        fetch(service.database_url, "SELECT count(*) AS n FROM transactions WHERE member_id = $1 AND kind = 3", member)[
            0
        ]["n"]
        == 2
    )


def test_a_key_reused_for_a_different_request_is_key_reused_naming_the_field(stub, service, merchant):
    member = unique("mem")
    keys = [unique("k") for _ in range(3)]
    first = submit(
        stub,
        [
            earn_op(merchant, member, 1_000, key=keys[0]),
            earn_op(merchant, member, 1_000, key=keys[1]),
            earn_op(merchant, member, 1_000, key=keys[2]),
        ],
    )
    assert [r.outcome for r in first] == [APPLIED] * 3
    reuses = [
        (earn_op(merchant, member, 2_000, key=keys[0]), "purchase_amount"),
        (earn_op(merchant, unique("mem"), 1_000, key=keys[1]), "member_id"),
        (redeem_op(merchant, member, 10, key=keys[2]), "method"),
    ]
    before = journal(service.database_url)

    results = submit(stub, [operation for operation, _ in reuses])

    for (operation, field), result in zip(reuses, results):
        assert (result.outcome, result.status_code) == (KEY_REUSED, code(grpc.StatusCode.ALREADY_EXISTS))
        assert f"({field} differs)" in result.message, result.message
        assert unary_code(stub, operation, fresh_key=False) == code(grpc.StatusCode.ALREADY_EXISTS)
    assert journal(service.database_url) == before
    assert balance(stub, member) == (300, 0, 300)


def test_duplicates_of_one_key_in_one_batch_take_effect_once(stub, service, merchant):
    member, poor = unique("mem"), fund(stub, merchant, 100)
    earn = earn_op(merchant, member, 5_000)
    overdraw = redeem_op(merchant, poor, 500)
    before = journal(service.database_url)

    results = submit(stub, [earn, overdraw, earn, earn, overdraw])

    earns, overdraws = [results[0], results[2], results[3]], [results[1], results[4]]
    # the first in flight is carried out, the others wait for it and replay its outcome
    assert sorted(r.outcome for r in earns) == sorted([APPLIED, REPLAYED, REPLAYED])
    assert all(r.earn == earns[0].earn for r in earns)
    assert sorted(r.outcome for r in overdraws) == sorted([INSUFFICIENT_POINTS, REPLAYED])
    assert {(r.status_code, r.message) for r in overdraws} == {
        (code(grpc.StatusCode.FAILED_PRECONDITION), overdraws[0].message)
    }
    transactions, entries, holds = journal(service.database_url)
    assert (transactions - before[0], entries - before[1], holds - before[2]) == (1, 2, 0)
    assert balance(stub, member) == (500, 0, 500)
    assert balance(stub, poor) == (100, 0, 100)


def test_a_retry_identical_to_the_original_is_replayed_behind_a_conflicting_duplicate_in_one_batch(
    stub, service, merchant
):
    """The first call with a key decides forever: in a batch holding a conflicting request under the key
    and then the original request again, the conflicting one is KEY_REUSED and the original one REPLAYED."""
    member, key = unique("mem"), unique("k")
    original = earn_op(merchant, member, 1_000, key=key)
    [first] = submit(stub, [original])
    assert first.outcome == APPLIED

    results = submit(stub, [earn_op(merchant, member, 2_000, key=key), original])

    assert results[0].outcome == KEY_REUSED and "(purchase_amount differs)" in results[0].message
    assert results[1].outcome == REPLAYED, results[1]
    assert results[1].earn == first.earn
    assert balance(stub, member) == (100, 0, 100)


# --- request-level errors and credentials ---


def test_an_empty_batch_is_invalid_argument(stub):
    error = error_of(lambda: stub.SubmitBatch(pb.SubmitBatchRequest(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1..8192 operations, got 0" in error.details()


def test_a_batch_over_the_configured_maximum_is_invalid_argument_and_posts_nothing(limited_service, limited_stub):
    url = limited_service.database_url
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    members = [unique("mem") for _ in range(11)]
    before = journal(url)

    error = error_of(lambda: submit(limited_stub, [earn_op(merchant, m, 1_000) for m in members]))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1..10 operations, got 11" in error.details()
    assert journal(url) == before
    assert not any(has_account(limited_stub, m) for m in members)
    empty = error_of(lambda: limited_stub.SubmitBatch(pb.SubmitBatchRequest(), timeout=30))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the maximum itself is allowed
    results = submit(limited_stub, [earn_op(merchant, m, 1_000) for m in members[:10]])
    assert [r.outcome for r in results] == [APPLIED] * 10


def test_batch_and_stream_without_credential_are_unauthenticated_and_with_operator_key_denied(service, merchant):
    member = unique("mem")
    operations = [earn_op(merchant, member, 1_000)]
    requests = [pb.StreamRequest(correlation_id="only", operation=operations[0])]
    before = journal(service.database_url)
    operator = (("authorization", "Bearer " + create_key(service.database_url, "operator")),)
    with service.bare_channel() as channel:
        bare = points_pb2_grpc.PointsServiceStub(channel)
        for metadata, status in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (operator, grpc.StatusCode.PERMISSION_DENIED),
        ):
            error = error_of(lambda metadata=metadata: submit(bare, operations, metadata=metadata))
            assert error.code() == status, error
            error = error_of(lambda metadata=metadata: stream(bare, requests, metadata=metadata))
            assert error.code() == status, error
    assert journal(service.database_url) == before


def test_a_gateway_key_acts_only_for_the_merchants_it_lists(stub, service, merchant):
    other = unique("m")
    add_merchant(service.database_url, other, 1000)
    gateway = (("authorization", "Bearer " + create_key(service.database_url, "gateway", [merchant])),)
    mine, theirs = unique("mem"), unique("mem")
    foreign = earn_op(other, theirs, 1_000)
    with service.bare_channel() as channel:
        restricted = points_pb2_grpc.PointsServiceStub(channel)
        results = submit(restricted, [earn_op(merchant, mine, 1_000), foreign], metadata=gateway)
        streamed = stream(
            restricted,
            [
                pb.StreamRequest(correlation_id="foreign", operation=foreign),
                pb.StreamRequest(correlation_id="mine", operation=earn_op(merchant, mine, 500)),
            ],
            metadata=gateway,
        )
        unary = unary_code(restricted, foreign, metadata=gateway)

    denied = code(grpc.StatusCode.PERMISSION_DENIED)
    assert results[0].outcome == APPLIED
    assert (results[1].outcome, results[1].status_code) == (PERMISSION_DENIED, denied)
    assert repr(other) in results[1].message
    answers = {r.correlation_id: r.result for r in streamed}
    assert (answers["foreign"].outcome, answers["foreign"].status_code) == (PERMISSION_DENIED, denied)
    assert answers["mine"].outcome == APPLIED
    assert unary == denied
    assert not has_account(stub, theirs)
    assert balance(stub, mine) == (150, 0, 150)


# --- Stream ---


def _comparable(result: pb.OperationResult) -> pb.OperationResult:
    """The result without what differs between two runs of one operation: ids and times."""
    copy = pb.OperationResult()
    copy.CopyFrom(result)
    kind = copy.WhichOneof("response")
    if kind is not None:
        response = getattr(copy, kind)
        for field in ("transaction_id", "authorization_id", "created_at", "expires_at"):
            if field in response.DESCRIPTOR.fields_by_name:
                response.ClearField(field)
    return copy


def test_stream_answers_every_operation_once_by_correlation_id_as_submit_batch_would(stub, service, merchant):
    other = unique("m")
    add_merchant(service.database_url, other, 1000)
    width = 30
    # per run: members to hold points of and members to redeem from, all funded alike
    funded = {
        run: ([unique("hold") for _ in range(width)], [unique("spend") for _ in range(width)])
        for run in ("batch", "stream")
    }
    setup = [earn_op(merchant, m, 10_000) for holders, spenders in funded.values() for m in holders + spenders]
    poor, stranger, ghost = unique("poor"), unique("stranger"), unique("ghost")
    setup += [earn_op(merchant, poor, 1_000), earn_op(other, stranger, 1_000)]
    assert [r.outcome for r in submit(stub, setup)] == [APPLIED] * len(setup)
    [hold] = submit(stub, [authorize_op(other, stranger, 10)])
    others_hold = hold.authorize.authorization_id

    def operations(run: str) -> list[pb.Operation]:
        holders, spenders = funded[run]
        ops = []
        for i in range(width):
            ops += [
                authorize_op(merchant, holders[i], 100 + i),
                redeem_op(merchant, spenders[i], 10 + i),
                earn_op(merchant, unique("new"), 1_000 * (i + 1) + i),
            ]
        return ops + [
            pb.Operation(),
            redeem_op(merchant, poor, 101),
            redeem_op(merchant, ghost, 5),
            capture_op(merchant, "auth_999999999"),
            void_op(merchant, others_hold),
            earn_op(merchant, unique("new"), -1),
            earn_op(merchant, "bad id", 100),
        ]

    batched = submit(stub, operations("batch"))
    sent = operations("stream")
    responses = stream(stub, [pb.StreamRequest(correlation_id=f"op-{i}", operation=op) for i, op in enumerate(sent)])

    counts = collections.Counter(r.correlation_id for r in responses)
    assert counts == {f"op-{i}": 1 for i in range(len(sent))}
    answers = {r.correlation_id: r.result for r in responses}
    for i, expected in enumerate(batched):
        assert _comparable(answers[f"op-{i}"]) == _comparable(expected), (sent[i], answers[f"op-{i}"], expected)
    assert collections.Counter(r.outcome for r in batched) == {
        APPLIED: 3 * width,
        INVALID: 3,
        INSUFFICIENT_POINTS: 1,
        NOT_FOUND: 2,
        PERMISSION_DENIED: 1,
    }
    holders, spenders = funded["stream"]
    assert balance(stub, holders[7]) == (1_000, 107, 893)
    assert balance(stub, spenders[7]) == (983, 0, 983)


def test_an_undecodable_stream_message_is_answered_invalid_and_the_stream_goes_on(stub, service, merchant):
    first, last = unique("mem"), unique("mem")
    messages = [
        pb.StreamRequest(correlation_id="first", operation=earn_op(merchant, first, 1_000)).SerializeToString(),
        b"\x0a\x02\xff\xfe",  # correlation_id that is not UTF-8
        b"\xff\xff\xff\xff",  # not a protobuf message at all
        pb.StreamRequest(correlation_id="last", operation=earn_op(merchant, last, 2_000)).SerializeToString(),
    ]
    with service.channel() as channel:
        call = channel.stream_stream(
            STREAM_METHOD, request_serializer=lambda raw: raw, response_deserializer=pb.StreamResponse.FromString
        )
        responses = list(call(iter(messages), timeout=30))

    assert sorted(r.correlation_id for r in responses) == ["", "", "first", "last"]
    for response in responses:
        if response.correlation_id:
            assert response.result.outcome == APPLIED
        else:
            assert (response.result.outcome, response.result.status_code) == (
                INVALID,
                code(grpc.StatusCode.INVALID_ARGUMENT),
            )
            assert "not a valid points.v1.StreamRequest" in response.result.message
    assert balance(stub, first)[0] == 100 and balance(stub, last)[0] == 200


def test_a_correlation_id_over_128_bytes_is_invalid_and_not_carried_out(stub, merchant):
    members = {"c": unique("mem"), "d": unique("mem"), "é": unique("mem")}
    correlation_ids = {"c": "c" * 128, "d": "d" * 129, "é": "é" * 65}  # 128, 129 and 130 bytes
    responses = stream(
        stub,
        [
            pb.StreamRequest(correlation_id=correlation_ids[k], operation=earn_op(merchant, members[k], 1_000))
            for k in correlation_ids
        ],
    )

    assert len(responses) == 3
    answers = {r.correlation_id[0]: r for r in responses}
    assert answers["c"].correlation_id == correlation_ids["c"] and answers["c"].result.outcome == APPLIED
    for k in ("d", "é"):
        result = answers[k].result
        assert (result.outcome, result.status_code) == (INVALID, code(grpc.StatusCode.INVALID_ARGUMENT))
        assert "correlation_id must be at most 128 bytes" in result.message
        assert not has_account(stub, members[k])
    assert answers["d"].correlation_id == "d" * 128
    # the echo is cut to the limit the contract states ("at most 128 bytes"), whatever the characters
    echoed = answers["é"].correlation_id
    assert correlation_ids["é"].startswith(echoed) and len(echoed.encode()) <= 128, len(echoed.encode())


def test_a_stream_with_two_operations_in_flight_still_answers_fifty(limited_service, limited_stub):
    merchant = unique("m")
    add_merchant(limited_service.database_url, merchant, 1000)
    member = unique("mem")
    operations = [earn_op(merchant, member, 100 * (i + 1)) for i in range(45)]
    operations += [redeem_op(merchant, unique("ghost"), 1) for _ in range(5)]

    responses = stream(
        limited_stub, [pb.StreamRequest(correlation_id=f"c{i}", operation=op) for i, op in enumerate(operations)]
    )

    assert collections.Counter(r.correlation_id for r in responses) == {f"c{i}": 1 for i in range(50)}
    outcomes = {r.correlation_id: r.result.outcome for r in responses}
    assert [outcomes[f"c{i}"] for i in range(50)] == [APPLIED] * 45 + [NOT_FOUND] * 5
    assert balance(limited_stub, member)[0] == sum(10 * (i + 1) for i in range(45))
    assert ledger_discrepancies(limited_service.database_url) == []


# --- group commit ---


def test_a_batch_of_2000_earns_commits_in_few_postgres_batches(stub, service, merchant):
    members = [unique("mem") for _ in range(200)]
    operations = [earn_op(merchant, members[i % 200], 1_000 + i) for i in range(2_000)]
    committed_before = committed_batches(service)

    results = submit(stub, operations)

    committed = committed_batches(service) - committed_before
    assert all(r.outcome == APPLIED for r in results)
    assert [r.earn.points for r in results] == [(1_000 + i) // 10 for i in range(2_000)]
    # group commit: at most 1,000 operations per Postgres transaction, so at least 2, and far fewer than 2,000
    assert 2 <= committed < 200, committed
    assert balance(stub, members[3])[0] == sum((1_000 + i) // 10 for i in range(3, 2_000, 200))


def test_the_ledger_balances_after_all_batches_and_streams(service):
    assert ledger_discrepancies(service.database_url) == []
