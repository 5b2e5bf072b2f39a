"""Abuse limits (issue 13, section 6), against a real service and Postgres: requests are decoded only
after their caller is authenticated; unknown keys are remembered as unknown; key look-ups have their own
small pool; keys expire and record their last use; operator keys come from the CLI only; services not
listed are refused and reflection hides the operator services from non-operators; per-merchant rate limits
(on by default), per-merchant quotas of the queue, open holds and new members; an earn of 0 points creates no
member; the idempotency purge deletes in bounded chunks."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import re
import time
import urllib.request

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import add_merchant, create_key, fetch, open_store
from tests.integration.helpers import cli, credential, error_of, unique
from tests.integration.idempotency_rows import insert_records, record

pytestmark = pytest.mark.timeout(180)

EARN_METHOD = "/points.v1.PointsService/Earn"
STREAM_METHOD = "/points.v1.PointsService/Stream"
GARBAGE = b"\xff\xff\xff\xff\xff\xff"  # not a protobuf message: a field tag with a truncated varint


def raw_unary(channel: grpc.Channel, method: str, body: bytes, metadata=()):
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return call(body, metadata=metadata, timeout=30)


def assert_code(call, code: grpc.StatusCode) -> grpc.RpcError:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


def earn_request(merchant: str, member: str, purchase: int = 10_000, key: str = "") -> points_pb2.EarnRequest:
    return points_pb2.EarnRequest(
        merchant_id=merchant, member_id=member, purchase_amount=purchase, idempotency_key=key or unique("k")
    )


# ---------------------------------------------------------------------------------------------------
# Authentication before decoding


def undecodable_count(service, method: str) -> float:
    """points_rpc_requests_undecodable_total of a PointsService method, from the service's /metrics."""
    with urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(
        r'^points_rpc_requests_undecodable_total\{grpc_method="%s",grpc_service="points.v1.'
        r'PointsService"\} (\S+)$' % method,
        re.M,
    )
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def test_a_garbage_body_is_unauthenticated_without_a_key_and_invalid_argument_with_one(
    create_database, service_factory
):
    url = create_database()
    key = add_merchant(url, "shop")
    service = service_factory(url)
    with service.bare_channel() as channel:
        error = assert_code(lambda: raw_unary(channel, EARN_METHOD, GARBAGE), grpc.StatusCode.UNAUTHENTICATED)
        assert "authorization: Bearer" in error.details()
        wrong = create_key(url, "operator")  # a valid key of the wrong kind: refused before decoding too
        assert_code(
            lambda: raw_unary(channel, EARN_METHOD, GARBAGE, credential(wrong)), grpc.StatusCode.PERMISSION_DENIED
        )
        # neither body was decoded: the counter of undecodable requests has not moved
        assert undecodable_count(service, "Earn") == 0
        error = assert_code(
            lambda: raw_unary(channel, EARN_METHOD, GARBAGE, credential(key)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "points.v1.EarnRequest" in error.details()
        assert undecodable_count(service, "Earn") == 1
        # a stream: refused as a whole without a key; with one, the bad message gets its own INVALID result
        stream = channel.stream_stream(
            STREAM_METHOD, request_serializer=lambda b: b, response_deserializer=points_pb2.StreamResponse.FromString
        )
        error = assert_code(lambda: list(stream(iter([GARBAGE]), timeout=30)), grpc.StatusCode.UNAUTHENTICATED)
        answers = list(stream(iter([GARBAGE]), metadata=credential(key), timeout=30))
        assert [a.result.status_code for a in answers] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        # and the service goes on serving
        stub = points_pb2_grpc.PointsServiceStub(channel)
        assert stub.Earn(earn_request("shop", "m1"), metadata=credential(key), timeout=30).points == 1_000


# ---------------------------------------------------------------------------------------------------
# Keys: unknown ids cached, own pool, expiry, last use


async def _insert_key(url: str, key, kind: str, merchant_ids: list[str], expires_at=None) -> None:
    from processor.store import Store

    store = await Store.open(url, 2)
    try:
        await store.insert_api_key(key.key_id, key.secret_sha256, kind, merchant_ids, "tests", expires_at)
    finally:
        await store.close()


def test_an_unknown_key_id_is_remembered_as_unknown_for_the_configured_time(create_database, service_factory):
    from processor import auth

    url = create_database()
    add_merchant(url, "shop")
    remembering = service_factory(url, "--auth-unknown-cache-seconds", "300")
    key = auth.new_key()
    with remembering.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        assert_code(
            lambda: stub.Earn(earn_request("shop", "m"), metadata=credential(key.key), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        # the key now exists, but the service remembers its id as unknown: no look-up, still refused
        asyncio.run(_insert_key(url, key, "merchant", ["shop"]))
        assert_code(
            lambda: stub.Earn(earn_request("shop", "m"), metadata=credential(key.key), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    remembering.terminate()
    forgetting = service_factory(url, "--auth-unknown-cache-seconds", "0")
    with forgetting.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        assert stub.Earn(earn_request("shop", "m"), metadata=credential(key.key), timeout=30).points == 1_000


def test_key_look_ups_use_their_own_small_pool_and_a_flood_of_bad_keys_does_not_stop_earns(
    create_database, service_factory
):
    from processor import auth

    url = create_database()
    key = add_merchant(url, "shop")
    service = service_factory(
        url, "--auth-pool-connections-max", "1", "--auth-unknown-cache-seconds", "0", "--pool-connections-max", "2"
    )
    with service.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        bad = [auth.new_key().key for _ in range(200)]
        futures = [
            stub.GetBalance.future(points_pb2.GetBalanceRequest(member_id="x"), metadata=credential(k), timeout=60)
            for k in bad
        ]
        # while the look-ups of 200 made-up keys queue on their one connection, earns are committed
        earns = [stub.Earn(earn_request("shop", "m"), metadata=credential(key), timeout=30) for _ in range(5)]
        assert [e.points for e in earns] == [1_000] * 5
        codes = set()
        for future in futures:
            try:
                future.result()
            except grpc.RpcError as error:
                codes.add(error.code())
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        rows = fetch(
            url,
            "SELECT application_name, count(*) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'points-processor%' "
            "GROUP BY 1",
        )
        connections = {r["application_name"]: r["n"] for r in rows}
        assert 1 <= connections.get("points-processor-auth", 0) <= 1, connections


def test_key_look_ups_waiting_for_their_pool_are_bounded(create_database, service_factory):
    from processor import auth

    url = create_database()
    key = add_merchant(url, "shop")
    service = service_factory(
        url,
        "--auth-pool-connections-max",
        "1",
        "--auth-lookups-in-flight-max",
        "1",
        "--auth-unknown-cache-seconds",
        "0",
    )
    with service.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        futures = [
            stub.GetBalance.future(
                points_pb2.GetBalanceRequest(member_id="x"), metadata=credential(auth.new_key().key), timeout=60
            )
            for _ in range(200)
        ]
        codes = []
        for future in futures:
            try:
                future.result()
            except grpc.RpcError as error:
                codes.append((error.code(), error.details()))
        assert {code for code, _ in codes} == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(
            "being checked at once" in details for code, details in codes if code == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        # the service goes on answering good keys
        assert stub.Earn(earn_request("shop", "m"), metadata=credential(key), timeout=30).points == 1_000


def test_an_expired_key_is_refused_saying_it_expired_even_while_cached(create_database, service_factory):
    from processor import auth

    url = create_database()
    add_merchant(url, "shop")
    service = service_factory(url, "--auth-cache-seconds", "300")
    new_key = auth.new_key()
    expires_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    asyncio.run(_insert_key(url, new_key, "merchant", ["shop"], expires_at))
    key = new_key.key
    with service.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        assert stub.Earn(earn_request("shop", "m"), metadata=credential(key), timeout=30).points == 1_000
        while dt.datetime.now(dt.timezone.utc) <= expires_at + dt.timedelta(milliseconds=200):
            time.sleep(0.2)
        error = assert_code(
            lambda: stub.Earn(earn_request("shop", "m"), metadata=credential(key), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert "expired" in error.details()
    past = cli("key", "create", "--merchant-id", "shop", "--expires-at", "2020-01-01T00:00:00Z", "--database-url", url)
    assert past.returncode != 0 and "not in the future" in past.stderr
    made = cli("key", "create", "--merchant-id", "shop", "--expires-in-days", "30", "--database-url", url)
    assert made.returncode == 0, made.stderr
    stored = fetch(
        url,
        "SELECT expires_at - created_at AS life FROM api_keys WHERE key_id = $1",
        made.stdout.split()[-1].split("_")[1],
    )[0]["life"]
    assert dt.timedelta(days=29, hours=23) < stored <= dt.timedelta(days=30)


def test_a_key_records_its_last_use_and_key_list_shows_it(create_database, service_factory):
    url = create_database()
    key = add_merchant(url, "shop")
    key_id = key.split("_")[1]
    service = service_factory(url, "--auth-last-used-seconds", "1")
    assert fetch(url, "SELECT last_used_at FROM api_keys WHERE key_id = $1", key_id)[0]["last_used_at"] is None
    with service.bare_channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for _ in range(3):
            stub.Earn(earn_request("shop", "m"), metadata=credential(key), timeout=30)
    deadline = time.monotonic() + 30
    while fetch(url, "SELECT last_used_at FROM api_keys WHERE key_id = $1", key_id)[0]["last_used_at"] is None:
        assert time.monotonic() < deadline, "last_used_at was never written"
        time.sleep(0.2)
    listed = cli("key", "list", "--database-url", url)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(key_id))
    assert line.split("\t")[6] != "-"  # last_used_at


def test_operator_keys_are_refused_by_the_api_and_made_by_the_cli(create_database, service_factory):
    url = create_database()
    service = service_factory(url)
    operator = create_key(url, "operator")
    with service.bare_channel() as channel:
        admin = admin_pb2_grpc.MerchantAdminStub(channel)
        before = fetch(url, "SELECT count(*) AS n FROM api_keys")[0]["n"]
        error = assert_code(
            lambda: admin.IssueApiKey(
                admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_OPERATOR),
                metadata=credential(operator),
                timeout=30,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "key create --operator" in error.details()
        assert fetch(url, "SELECT count(*) AS n FROM api_keys")[0]["n"] == before
        made = cli("key", "create", "--operator", "--database-url", url)
        assert made.returncode == 0, made.stderr
        admin.ListMerchants(admin_pb2.ListMerchantsRequest(), metadata=credential(made.stdout.split()[-1]), timeout=30)


def test_issue_api_key_takes_an_expiry_in_the_future(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop")
    service = service_factory(url)
    operator = create_key(url, "operator")
    with service.bare_channel() as channel:
        admin = admin_pb2_grpc.MerchantAdminStub(channel)
        later = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
        issued = admin.IssueApiKey(
            admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=["shop"], expires_at=later),
            metadata=credential(operator),
            timeout=30,
        )
        stored = fetch(url, "SELECT expires_at FROM api_keys WHERE key_id = $1", issued.key_id)[0]["expires_at"]
        assert int(stored.timestamp()) == later.seconds
        assert_code(
            lambda: admin.IssueApiKey(
                admin_pb2.IssueApiKeyRequest(
                    kind=admin_pb2.API_KEY_KIND_MERCHANT,
                    merchant_ids=["shop"],
                    expires_at=timestamp_pb2.Timestamp(seconds=1),
                ),
                metadata=credential(operator),
                timeout=30,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )


# ---------------------------------------------------------------------------------------------------
# Deny by default; reflection


def test_a_service_not_in_the_table_is_refused_not_let_through():
    """A servicer registered on the server but not classified in rpc.ACCEPTED_KINDS / OPEN_SERVICES is
    answered UNIMPLEMENTED, key or not (the old interceptor let any unlisted service through unchecked)."""
    from processor import auth, rpc

    async def run() -> tuple:
        reached = []

        async def secret(request, context):
            reached.append(request)
            return b"the crown jewels"

        server = grpc.aio.server(interceptors=[rpc.RpcInterceptor(auth.Authenticator(None, 0))])
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "points.v1.Unlisted", {"Peek": grpc.unary_unary_rpc_method_handler(secret)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/points.v1.Unlisted/Peek")
                try:
                    await call(b"", timeout=30)
                    return None, reached
                except grpc.aio.AioRpcError as error:
                    return error.code(), reached
        finally:
            await server.stop(None)

    code, reached = asyncio.run(run())
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert reached == []


def _reflect(channel, request, metadata=()):
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=30))[0]


def test_reflection_shows_the_operator_services_to_operator_keys_only(create_database, service_factory):
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    url = create_database()
    merchant_key = add_merchant(url, "shop")
    operator = create_key(url, "operator")
    service = service_factory(url)
    admin_services = {
        "points.v1.MerchantAdmin",
        "points.v1.Clearing",
        "points.v1.Programs",
        "points.v1.AuditService",
        "points.v1.MerchantAdminService",
        "points.v1.ClearingService",
        "points.v1.ProgramsService",
        "points.v1.MemberAdminService",
    }
    with service.bare_channel() as channel:
        for metadata in ((), credential(merchant_key), credential("pk_0000000000000000_" + "a" * 43)):
            listed = {
                s.name
                for s in _reflect(
                    channel, rpb.ServerReflectionRequest(list_services=""), metadata
                ).list_services_response.service
            }
            assert "points.v1.PointsService" in listed and not listed & admin_services, listed
            for request in (
                rpb.ServerReflectionRequest(file_containing_symbol="points.v1.MerchantAdmin"),
                rpb.ServerReflectionRequest(file_containing_symbol="points.v1.IssueApiKeyRequest"),
                rpb.ServerReflectionRequest(file_by_filename="points/v1/admin.proto"),
            ):
                answer = _reflect(channel, request, metadata)
                assert answer.HasField("error_response"), request
                assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
            public = _reflect(
                channel, rpb.ServerReflectionRequest(file_containing_symbol="points.v1.PointsService"), metadata
            )
            assert public.HasField("file_descriptor_response")
        listed = {
            s.name
            for s in _reflect(
                channel, rpb.ServerReflectionRequest(list_services=""), credential(operator)
            ).list_services_response.service
        }
        assert admin_services <= listed
        answer = _reflect(
            channel, rpb.ServerReflectionRequest(file_containing_symbol="points.v1.MerchantAdmin"), credential(operator)
        )
        assert answer.HasField("file_descriptor_response")


# ---------------------------------------------------------------------------------------------------
# Rate limits on by default; per-merchant quotas


def test_the_per_merchant_rate_limit_is_on_by_default_and_says_when_to_retry(create_database, service_factory):
    from processor import config

    assert config.Settings().merchant_operations_per_second > 0
    url = create_database()
    add_merchant(url, "busy")
    add_merchant(url, "quiet")
    # only the burst is lowered: the rate is the default's
    service = service_factory(url, "--merchant-burst-operations", "5")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        # 300 operations checked one after the other in a few ms: far more than 5 plus what 1,000/s refills
        batch = points_pb2.SubmitBatchRequest(
            operations=[points_pb2.Operation(earn=earn_request("busy", unique("mem"))) for _ in range(300)]
        )
        results = stub.SubmitBatch(batch, timeout=60).results
        refused = [r for r in results if r.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
        assert refused, "300 operations at once must exceed a burst of 5 at the default rate"
        assert "operations/s" in refused[0].message and "retry in" in refused[0].message
        assert stub.Earn(earn_request("quiet", "m"), timeout=30).points == 1_000
    posted = fetch(url, "SELECT count(*) AS n FROM transactions WHERE merchant_id = 'busy'")[0]["n"]
    assert posted == 300 - len(refused)


def test_an_earn_of_zero_points_creates_no_member(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = service_factory(url)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        ghost = unique("ghost")
        error = assert_code(
            lambda: stub.Earn(earn_request("shop", ghost, purchase=9), timeout=30), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "0 points" in error.details()
        assert fetch(url, "SELECT count(*) AS n FROM members WHERE member_id = $1", ghost)[0]["n"] == 0
        # an existing member's 0-point earn is recorded as before
        member = unique("mem")
        stub.Earn(earn_request("shop", member, purchase=10), timeout=30)
        assert stub.Earn(earn_request("shop", member, purchase=9), timeout=30).points == 0


def test_a_merchant_creates_at_most_its_quota_of_new_members_per_hour(create_database, service_factory):
    url = create_database()
    add_merchant(url, "signup")
    add_merchant(url, "other")
    service = service_factory(url, "--merchant-new-members-per-hour-max", "2")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        first, second, third = unique("a"), unique("b"), unique("c")
        stub.Earn(earn_request("signup", first), timeout=30)
        stub.Earn(earn_request("signup", second), timeout=30)
        request = earn_request("signup", third)
        error = assert_code(lambda: stub.Earn(request, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "merchant_new_members_per_hour_max" in error.details() and "retry" in error.details()
        assert fetch(url, "SELECT count(*) AS n FROM members WHERE member_id = $1", third)[0]["n"] == 0
        stub.Earn(earn_request("signup", first), timeout=30)  # existing members still earn
        stub.Earn(earn_request("other", third), timeout=30)  # other merchants are not affected
        # the refused call was not recorded: its retry (now that the member exists) is carried out
        assert stub.Earn(request, timeout=30).points == 1_000


def authorized_once_the_quota_frees(authorize, seconds: float = 30) -> None:
    """Retries `authorize` while it is refused RESOURCE_EXHAUSTED (a hold's quota given back only at a
    recount), failing the test after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            authorize()
            return
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the voided hold was never given back to the quota"
            time.sleep(0.1)


def test_a_merchant_holds_at_most_its_quota_of_open_holds(create_database, service_factory):
    url = create_database()
    add_merchant(url, "hotel")
    add_merchant(url, "other")
    service = service_factory(url, "--merchant-holds-open-max", "2", "--merchant-holds-recount-seconds", "0.2")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        member = unique("mem")
        stub.Earn(earn_request("hotel", member, purchase=100_000), timeout=30)

        def authorize(merchant: str, key: str = ""):
            return stub.Authorize(
                points_pb2.AuthorizeRequest(
                    merchant_id=merchant, member_id=member, points=100, idempotency_key=key or unique("k")
                ),
                timeout=30,
            )

        holds = [authorize("hotel"), authorize("hotel")]
        error = assert_code(lambda: authorize("hotel"), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "merchant_holds_open_max" in error.details()
        authorize("other")  # another merchant's share is its own
        stub.Void(
            points_pb2.VoidRequest(
                merchant_id="hotel", authorization_id=holds[0].authorization_id, idempotency_key=unique("v")
            ),
            timeout=30,
        )
        # the void is subtracted at the next recount from Postgres
        authorized_once_the_quota_frees(lambda: authorize("hotel"))
    assert fetch(url, "SELECT count(*) AS n FROM holds WHERE merchant_id = 'hotel' AND status = 1")[0]["n"] == 2


def test_a_recount_behind_a_lagging_projection_does_not_give_back_holds_still_open(create_database, service_factory):
    """The holds table is written by the projector, off the answer path: a recount that read it while the
    projection lagged counted none of the holds not projected yet, and the merchant could open more than its
    quota (seen as a flake of the test above under load). The recount now waits for the projection of every
    batch applied before it, and is skipped (the counts keep erring high) when it cannot."""
    import threading

    import asyncpg

    url = create_database()
    add_merchant(url, "hotel")
    service = service_factory(
        url,
        "--merchant-holds-open-max",
        "2",
        "--merchant-holds-recount-seconds",
        "0.1",
        "--projection-wait-seconds",
        "0.5",
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        member = unique("mem")
        stub.Earn(earn_request("hotel", member, purchase=100_000), timeout=30)

        def authorize():
            return stub.Authorize(
                points_pb2.AuthorizeRequest(
                    merchant_id="hotel", member_id=member, points=100, idempotency_key=unique("k")
                ),
                timeout=30,
            )

        # the projector cannot write holds rows (reads of the table go on): the projection stalls
        connection = run(asyncpg.connect(url))
        transaction = connection.transaction()
        run(transaction.start())
        run(connection.execute("LOCK TABLE holds IN EXCLUSIVE MODE"))
        try:
            holds = [authorize(), authorize()]  # answered once in the batch log, not projected
            assert run(connection.fetchval("SELECT count(*) FROM holds")) == 0  # (fetch would wait for them)
            time.sleep(1.5)  # many recount intervals, each reading a holds table without the two
            error = assert_code(authorize, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "merchant_holds_open_max" in error.details()
        finally:
            run(transaction.rollback())
            run(connection.close())
            loop.call_soon_threadsafe(loop.stop)
        stub.Void(
            points_pb2.VoidRequest(
                merchant_id="hotel", authorization_id=holds[0].authorization_id, idempotency_key=unique("v")
            ),
            timeout=30,
        )
        # once projected, the void is given back at the next recount
        authorized_once_the_quota_frees(authorize)
    assert fetch(url, "SELECT count(*) AS n FROM holds WHERE merchant_id = 'hotel' AND status = 1")[0]["n"] == 2


def test_a_merchant_occupies_at_most_its_share_of_the_queue(create_database, service_factory):
    url = create_database()
    add_merchant(url, "flood")
    add_merchant(url, "quiet")
    # the committer lingers 300 ms for more; one merchant may have 3 operations in the pipeline
    service = service_factory(
        url, "--merchant-queue-operations-max", "3", "--batch-linger-seconds", "0.3", "--batch-operations-max", "4"
    )
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        stub.Earn(earn_request("quiet", "q-member"), timeout=30)  # the quiet merchant's key and member exist
        keys = [unique("k") for _ in range(30)]
        futures = [stub.Earn.future(earn_request("flood", "f-member", key=k), timeout=60) for k in keys]
        quiet = stub.Earn.future(earn_request("quiet", "q-member"), timeout=60)
        shed = []
        for key, future in zip(keys, futures):
            try:
                future.result()
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert "merchant_queue_operations_max" in error.details()
                shed.append(key)
        assert shed, "30 concurrent calls must exceed a share of 3"
        assert quiet.result().points == 1_000
    posted = {
        r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM transactions WHERE merchant_id = 'flood'")
    }
    assert posted == set(keys) - set(shed)


# ---------------------------------------------------------------------------------------------------
# Idempotency purge in bounded chunks


def test_the_idempotency_purge_deletes_in_bounded_chunks_until_done(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop")
    service = service_factory(url)
    with service.channel() as channel:
        points_pb2_grpc.PointsServiceStub(channel).Earn(earn_request("shop", "m", key="recent"), timeout=30)
    service.terminate()
    chunks: list[int] = []

    async def purge():
        store = await open_store(url)
        try:
            # 2,345 old records, in batch rows of 1 to 40 (migration 0023: one row per batch)
            old = [record("shop", f"old-{i}", {}, method="earn") for i in range(1, 2346)]
            sizes = itertools.cycle([1, 7, 40, 13])
            at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
            while old:
                size = next(sizes)
                await insert_records(store.pool, old[:size], at)
                old = old[size:]
            return await store.purge_idempotency(
                dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30),
                chunk_rows_max=100,
                chunk_timeout_seconds=30,
                deleted_keys=lambda batches: chunks.append(sum(len(keys) for _, keys in batches)),
            )
        finally:
            await store.close()

    assert asyncio.run(purge()) == 2345
    assert sum(chunks) == 2345 and max(chunks) <= 100  # whole batch rows, at most 100 records a chunk
    assert [r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM idempotency_keys")] == ["recent"]
