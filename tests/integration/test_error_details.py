"""google.rpc error details against a real service and Postgres: a client parses them with
grpc_status.rpc_status.from_call, as it would from a Google API, and finds a stable ErrorInfo.reason (and
the field at fault), RetryInfo on RESOURCE_EXHAUSTED and UNAVAILABLE, QuotaFailure on a rate limit; the
status code and message are those the service always sent."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from points.v1 import admin_pb2, admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant, create_key
from tests.integration.helpers import credential, error_of, funded_member, unique

pytestmark = pytest.mark.timeout(180)
DETAIL_TYPES = {
    "ErrorInfo": error_details_pb2.ErrorInfo,
    "RetryInfo": error_details_pb2.RetryInfo,
    "QuotaFailure": error_details_pb2.QuotaFailure,
    "BadRequest": error_details_pb2.BadRequest,
}


def details_of(error: grpc.RpcError) -> dict:
    """The google.rpc details of a refused call, by type name; checks they agree with the code and message."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc status in the trailers of {error.code().name}: {error.details()}"
    assert status.code == error.code().value[0] and status.message == error.details()
    found = {}
    for packed in status.details:
        name = packed.TypeName().rpartition(".")[2]
        assert name in DETAIL_TYPES and name not in found, packed.TypeName()
        found[name] = DETAIL_TYPES[name]()
        assert packed.Unpack(found[name])
    return found


def delay_seconds(details: dict) -> float:
    delay = details["RetryInfo"].retry_delay
    return delay.seconds + delay.nanos / 1e9


def test_a_bad_field_names_the_field(stub, service):
    merchant = unique("shop")
    add_merchant(service.database_url, merchant)
    error = error_of(
        lambda: stub.Earn(
            pb.EarnRequest(merchant_id=merchant, member_id="m1", purchase_amount=-5, idempotency_key=unique("k")),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("purchase_amount must be 1..")  # the message as it always was
    details = details_of(error)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "INVALID_FIELD",
        "points.v1",
        {"field": "purchase_amount"},
    )
    assert [v.field for v in details["BadRequest"].field_violations] == ["purchase_amount"]
    assert "RetryInfo" not in details
    # an id field too, checked in the domain module
    error = error_of(
        lambda: stub.Capture(
            pb.CaptureRequest(merchant_id=merchant, authorization_id="nope", idempotency_key=unique("k")), timeout=30
        )
    )
    assert dict(details_of(error)["ErrorInfo"].metadata) == {"field": "authorization_id"}


def test_insufficient_points_and_a_reused_key_have_their_reasons(stub, service):
    merchant = unique("shop")
    add_merchant(service.database_url, merchant)
    member = funded_member(stub, merchant, 1000)
    error = error_of(
        lambda: stub.Redeem(
            pb.RedeemRequest(merchant_id=merchant, member_id=member, points=5000, idempotency_key=unique("k")),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == f"member {member!r} has 1000 point-units available, 5000 asked"
    details = details_of(error)
    assert details["ErrorInfo"].reason == "INSUFFICIENT_POINTS" and "RetryInfo" not in details
    key = unique("k")
    stub.Redeem(pb.RedeemRequest(merchant_id=merchant, member_id=member, points=10, idempotency_key=key), timeout=30)
    error = error_of(
        lambda: stub.Redeem(
            pb.RedeemRequest(merchant_id=merchant, member_id=member, points=11, idempotency_key=key), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details_of(error)["ErrorInfo"].reason == "IDEMPOTENCY_KEY_REUSED"


def test_an_unknown_merchant_and_an_operator_refusal_have_reasons(service, channel):
    key = create_key(service.database_url, "operator")
    admin = admin_pb2_grpc.MerchantAdminServiceStub(channel)
    error = error_of(
        lambda: admin.GetMerchant(
            admin_pb2.MerchantAdminServiceGetMerchantRequest(merchant_id=""), metadata=credential(key), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "merchant_id is required"
    assert dict(details_of(error)["ErrorInfo"].metadata) == {"field": "merchant_id"}
    # a merchant key on an operator service: refused by the RPC layer, with a reason
    merchant = unique("shop")
    merchant_key = add_merchant(service.database_url, merchant)
    error = error_of(
        lambda: admin.GetMerchant(
            admin_pb2.MerchantAdminServiceGetMerchantRequest(merchant_id=merchant),
            metadata=credential(merchant_key),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details_of(error)["ErrorInfo"].reason == "KEY_NOT_PERMITTED"


def test_a_rate_limit_says_when_to_retry_and_which_quota(create_database, service_factory):
    url = create_database()
    merchant_key = add_merchant(url, "busy")
    service = service_factory(url, "--merchant-burst-operations", "2", "--merchant-operations-per-second", "1")
    with service.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        refused = None
        for _ in range(10):
            try:
                stub.Earn(
                    pb.EarnRequest(
                        merchant_id="busy", member_id=unique("m"), purchase_amount=1000, idempotency_key=unique("k")
                    ),
                    metadata=credential(merchant_key),
                    timeout=30,
                )
            except grpc.RpcError as error:
                refused = error
                break
        assert refused is not None, "10 operations at once must exceed a burst of 2 at 1 operation/s"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    said = float(re.search(r"retry in ([0-9.]+) s", refused.details()).group(1))
    details = details_of(refused)
    assert details["ErrorInfo"].reason == "RATE_LIMITED"
    assert 0 < delay_seconds(details) <= 1.0  # at 1 operation/s a token is back within a second
    assert abs(delay_seconds(details) - said) < 0.01  # the delay the message states
    (violation,) = details["QuotaFailure"].violations
    assert violation.subject == "merchant:busy" and "operations/s" in violation.description


def test_unavailable_says_when_to_retry(create_database, service_factory):
    """A batch whose commit cannot finish in commit_timeout_seconds (a test transaction holds a lock the
    write needs: the batch log's, which the answer waits for) is refused UNAVAILABLE with RetryInfo."""
    url = create_database()
    merchant_key = add_merchant(url, "shop")
    service = service_factory(url, "--commit-timeout-seconds", "0.5")
    with service.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)

        def earn():
            return stub.Earn(
                pb.EarnRequest(merchant_id="shop", member_id="m1", purchase_amount=1000, idempotency_key=unique("k")),
                metadata=credential(merchant_key),
                timeout=60,
            )

        earn()  # the key is checked and cached, the member exists

        async def refused_while_locked() -> grpc.RpcError:
            connection = await asyncpg.connect(url)
            try:
                async with connection.transaction():
                    await connection.execute("LOCK TABLE batch_log IN ACCESS EXCLUSIVE MODE")
                    return await asyncio.to_thread(lambda: error_of(earn))
            finally:
                await connection.close()

        error = asyncio.run(refused_while_locked())
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    details = details_of(error)
    assert details["ErrorInfo"].reason == "SERVICE_UNAVAILABLE"
    assert delay_seconds(details) > 0


def test_operator_field_errors_name_the_field(service, channel):
    key = create_key(service.database_url, "operator")
    clearing = admin_pb2_grpc.ClearingServiceStub(channel)
    error = error_of(
        lambda: clearing.ListStatements(
            admin_pb2.ClearingServiceListStatementsRequest(merchant_id="x", page_size=100_000),
            metadata=credential(key),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("page_size must be 0")
    info = details_of(error)["ErrorInfo"]
    assert (info.reason, dict(info.metadata)) == ("INVALID_FIELD", {"field": "page_size"})
    admin = admin_pb2_grpc.MerchantAdminServiceStub(channel)
    error = error_of(
        lambda: admin.CreateMerchant(
            admin_pb2.MerchantAdminServiceCreateMerchantRequest(
                merchant=admin_pb2.Merchant(merchant_id=unique("m"), give_back_bps=50)
            ),
            metadata=credential(key),
            timeout=30,
        )
    )
    assert error.details() == "give_back_bps must be 300..2000 (3%..20%), got 50"
    assert dict(details_of(error)["ErrorInfo"].metadata) == {"field": "merchant.give_back_bps"}
