"""Authentication and authorisation: who may call what, against a real service and Postgres.

PointsService takes merchant and gateway keys (a key acts only for the merchants it covers);
MerchantAdmin and Clearing take operator keys. A refused call posts nothing and leaves its idempotency
key unused. Keys are `pk_<key_id>_<secret>`, shown once, stored as the SHA-256 of the secret.

Every call here goes through a bare channel with an explicit `authorization` header, so what is
tested is exactly the credential each test names (not the harness's automatic one).
"""

from __future__ import annotations

import hashlib
import re

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import cli, credential, error_of, ledger_snapshot, unique

pytestmark = pytest.mark.timeout(120)

KEY_PATTERN = re.compile(r"pk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
# The service caches verified keys this long; an admin revocation must not wait for it.
AUTH_CACHE_SECONDS = "300"


def key_parts(key: str) -> tuple[str, str]:
    """(key_id, secret) of a key."""
    match = KEY_PATTERN.fullmatch(key)
    assert match, f"{key!r} is not a pk_<key_id>_<secret> key"
    return match.group(1), match.group(2)


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def service(create_database):
    service = ServiceProcess(create_database(), "--auth-cache-seconds", AUTH_CACHE_SECONDS).start()
    yield service
    service.kill()


@pytest.fixture(scope="module")
def points(channel):
    return points_pb2_grpc.PointsServiceStub(channel)


@pytest.fixture(scope="module")
def admin(channel):
    return admin_pb2_grpc.MerchantAdminStub(channel)


@pytest.fixture(scope="module")
def clearing(channel):
    return admin_pb2_grpc.ClearingStub(channel)


@pytest.fixture(scope="module")
def operator_key(service) -> str:
    return create_key(service.database_url, "operator")


class Merchant:
    def __init__(self, merchant_id: str, key: str):
        self.merchant_id = merchant_id
        self.key = key


@pytest.fixture
def make_merchant(service):
    def make() -> Merchant:
        merchant_id = unique("m")
        return Merchant(merchant_id, add_merchant(service.database_url, merchant_id, 1000))  # 10% give-back

    return make


def earn(points, merchant_id: str, key: str, member: str, purchase: int = 10_000, idempotency_key: str = ""):
    return points.Earn(
        points_pb2.EarnRequest(
            merchant_id=merchant_id,
            member_id=member,
            purchase_amount=purchase,
            idempotency_key=idempotency_key or unique("k"),
        ),
        metadata=credential(key),
        timeout=30,
    )


def assert_refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


# ---------------------------------------------------------------------------------------------------
# No key, a malformed key, a wrong secret


def test_calls_without_a_key_are_unauthenticated_and_post_nothing(service, points, admin, clearing, make_merchant):
    merchant = make_merchant()
    before = ledger_snapshot(service.database_url)
    calls = [
        lambda: points.Earn(
            points_pb2.EarnRequest(
                merchant_id=merchant.merchant_id,
                member_id=unique("mem"),
                purchase_amount=10_000,
                idempotency_key=unique("k"),
            ),
            timeout=30,
        ),
        lambda: points.GetBalance(points_pb2.GetBalanceRequest(member_id="anyone"), timeout=30),
        lambda: points.ListTransactions(points_pb2.ListTransactionsRequest(member_id="anyone"), timeout=30),
        lambda: admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=merchant.merchant_id), timeout=30),
        lambda: admin.CreateMerchant(
            admin_pb2.CreateMerchantRequest(merchant=admin_pb2.Merchant(merchant_id=unique("m"), give_back_bps=1000)),
            timeout=30,
        ),
        lambda: clearing.GetMerchantPosition(
            admin_pb2.GetMerchantPositionRequest(merchant_id=merchant.merchant_id), timeout=30
        ),
    ]
    for call in calls:
        error = assert_refused(call, grpc.StatusCode.UNAUTHENTICATED)
        assert "authorization: Bearer" in error.details()
    assert ledger_snapshot(service.database_url) == before


@pytest.mark.parametrize(
    "header",
    [
        "Bearer not-a-key",
        "Bearer pk_123_abc",
        "Bearer pk_0123456789abcdef_short",
        "Bearer pk_0123456789ABCDEF_" + "a" * 43,  # key id must be lower-case hex
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "",
    ],
)
def test_malformed_credentials_are_unauthenticated_and_post_nothing(service, points, make_merchant, header):
    merchant = make_merchant()
    before = ledger_snapshot(service.database_url)
    assert_refused(
        lambda: points.Earn(
            points_pb2.EarnRequest(
                merchant_id=merchant.merchant_id,
                member_id=unique("mem"),
                purchase_amount=10_000,
                idempotency_key=unique("k"),
            ),
            metadata=(("authorization", header),),
            timeout=30,
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert ledger_snapshot(service.database_url) == before


def test_a_key_sent_without_the_bearer_scheme_is_refused(points, make_merchant):
    merchant = make_merchant()
    assert_refused(
        lambda: points.Earn(
            points_pb2.EarnRequest(
                merchant_id=merchant.merchant_id,
                member_id=unique("mem"),
                purchase_amount=10_000,
                idempotency_key=unique("k"),
            ),
            metadata=(("authorization", merchant.key),),
            timeout=30,
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # the same key with the scheme works (any case of "Bearer")
    response = points.Earn(
        points_pb2.EarnRequest(
            merchant_id=merchant.merchant_id,
            member_id=unique("mem"),
            purchase_amount=10_000,
            idempotency_key=unique("k"),
        ),
        metadata=(("authorization", f"bearer {merchant.key}"),),
        timeout=30,
    )
    assert response.points == 1_000


def test_wrong_secret_or_unknown_key_id_is_unauthenticated_and_posts_nothing(service, points, make_merchant):
    merchant = make_merchant()
    key_id, secret = key_parts(merchant.key)
    other_secret = ("B" if secret[0] != "B" else "C") + secret[1:]
    other_id = ("1" if key_id[0] != "1" else "2") + key_id[1:]
    before = ledger_snapshot(service.database_url)
    for forged in (f"pk_{key_id}_{other_secret}", f"pk_{other_id}_{secret}", f"pk_{key_id}_{secret[::-1]}"):
        error = assert_refused(
            lambda: earn(points, merchant.merchant_id, forged, unique("mem")), grpc.StatusCode.UNAUTHENTICATED
        )
        assert secret not in error.details() and other_secret not in error.details()
    assert ledger_snapshot(service.database_url) == before
    # the genuine key still works
    assert earn(points, merchant.merchant_id, merchant.key, unique("mem")).points == 1_000


def test_health_needs_no_key(channel):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------------------------------
# Revocation


def test_revoke_through_the_admin_api_takes_effect_at_once_despite_the_cache(
    service, points, admin, operator_key, make_merchant
):
    merchant = make_merchant()
    second = admin.IssueApiKey(
        admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=[merchant.merchant_id]),
        metadata=credential(operator_key),
        timeout=30,
    )
    member = unique("mem")
    earn(points, merchant.merchant_id, merchant.key, member)  # the key is now verified and cached
    key_id, _ = key_parts(merchant.key)
    revoked = admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=credential(operator_key), timeout=30
    )
    assert revoked.revoked_at.seconds > 0
    before = ledger_snapshot(service.database_url)
    error = assert_refused(
        lambda: earn(points, merchant.merchant_id, merchant.key, member), grpc.StatusCode.UNAUTHENTICATED
    )
    assert "revoked" in error.details() and key_id in error.details()
    assert_refused(
        lambda: points.GetBalance(
            points_pb2.GetBalanceRequest(member_id=member), metadata=credential(merchant.key), timeout=30
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert ledger_snapshot(service.database_url) == before
    # the merchant's other key is untouched
    assert earn(points, merchant.merchant_id, second.key, member).balance == 2_000
    # revoking again keeps the first revocation time
    again = admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=credential(operator_key), timeout=30
    )
    assert again.revoked_at == revoked.revoked_at


def test_revoking_an_operator_key_locks_it_out_of_the_admin_api(service, admin, operator_key):
    doomed = create_key(service.database_url, "operator")
    admin.ListMerchants(admin_pb2.ListMerchantsRequest(page_size=1), metadata=credential(doomed), timeout=30)
    admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=key_parts(doomed)[0]), metadata=credential(operator_key), timeout=30
    )
    assert_refused(
        lambda: admin.ListMerchants(
            admin_pb2.ListMerchantsRequest(page_size=1), metadata=credential(doomed), timeout=30
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


def test_revoke_of_an_unknown_key_is_not_found(admin, operator_key):
    assert_refused(
        lambda: admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id="0123456789abcdef"), metadata=credential(operator_key), timeout=30
        ),
        grpc.StatusCode.NOT_FOUND,
    )


def test_revoke_through_the_cli_takes_effect_without_a_cache(create_database, service_factory):
    """With --auth-cache-seconds 0 every call checks Postgres, so a CLI revocation (another process)
    stops the key for the very next call."""
    url = create_database()
    service = service_factory(url, "--auth-cache-seconds", "0")
    merchant_id = unique("m")
    key = add_merchant(url, merchant_id, 1000)
    member = unique("mem")
    with service.bare_channel() as channel:
        points = points_pb2_grpc.PointsServiceStub(channel)
        assert earn(points, merchant_id, key, member).balance == 1_000
        key_id, _ = key_parts(key)
        result = cli("key", "revoke", "--key-id", key_id, "--database-url", url)
        assert result.returncode == 0, result.stderr
        assert f"key {key_id} revoked" in result.stdout
        before = ledger_snapshot(url)
        error = assert_refused(lambda: earn(points, merchant_id, key, member), grpc.StatusCode.UNAUTHENTICATED)
        assert "revoked" in error.details()
        assert ledger_snapshot(url) == before
    unknown = cli("key", "revoke", "--key-id", "0123456789abcdef", "--database-url", url)
    assert unknown.returncode == 1
    assert "no API key" in unknown.stderr


# ---------------------------------------------------------------------------------------------------
# A key acts only for the merchants it covers


def test_a_key_of_another_merchant_is_permission_denied_for_every_method_and_posts_nothing(
    service, points, make_merchant
):
    owner, intruder = make_merchant(), make_merchant()
    m = owner.merchant_id
    member = unique("mem")
    earned = earn(points, m, owner.key, member, 50_000)  # 5,000 point-units
    hold = points.Authorize(
        points_pb2.AuthorizeRequest(merchant_id=m, member_id=member, points=100, idempotency_key=unique("k")),
        metadata=credential(owner.key),
        timeout=30,
    )
    redeemed = points.Redeem(
        points_pb2.RedeemRequest(merchant_id=m, member_id=member, points=200, idempotency_key=unique("k")),
        metadata=credential(owner.key),
        timeout=30,
    )
    key = unique("k")  # used by every refused call below; the owner may use it afterwards
    calls = {
        "Earn": lambda: points.Earn(
            points_pb2.EarnRequest(merchant_id=m, member_id=member, purchase_amount=10_000, idempotency_key=key),
            metadata=credential(intruder.key),
            timeout=30,
        ),
        "Authorize": lambda: points.Authorize(
            points_pb2.AuthorizeRequest(merchant_id=m, member_id=member, points=10, idempotency_key=key),
            metadata=credential(intruder.key),
            timeout=30,
        ),
        "Capture": lambda: points.Capture(
            points_pb2.CaptureRequest(merchant_id=m, authorization_id=hold.authorization_id, idempotency_key=key),
            metadata=credential(intruder.key),
            timeout=30,
        ),
        "Void": lambda: points.Void(
            points_pb2.VoidRequest(merchant_id=m, authorization_id=hold.authorization_id, idempotency_key=key),
            metadata=credential(intruder.key),
            timeout=30,
        ),
        "Redeem": lambda: points.Redeem(
            points_pb2.RedeemRequest(merchant_id=m, member_id=member, points=10, idempotency_key=key),
            metadata=credential(intruder.key),
            timeout=30,
        ),
        "Refund": lambda: points.Refund(
            points_pb2.RefundRequest(
                merchant_id=m, transaction_id=redeemed.transaction_id, points=10, idempotency_key=key
            ),
            metadata=credential(intruder.key),
            timeout=30,
        ),
        "Refund of the earn": lambda: points.Refund(
            points_pb2.RefundRequest(
                merchant_id=m, transaction_id=earned.transaction_id, points=10, idempotency_key=key
            ),
            metadata=credential(intruder.key),
            timeout=30,
        ),
    }
    before = ledger_snapshot(service.database_url)
    for name, call in calls.items():
        error = assert_refused(call, grpc.StatusCode.PERMISSION_DENIED)
        assert m in error.details(), name
    assert ledger_snapshot(service.database_url) == before
    # nothing was decided under the key: the owner's first use of it is a fresh operation
    captured, call = points.Capture.with_call(
        points_pb2.CaptureRequest(
            merchant_id=m, authorization_id=hold.authorization_id, points=60, idempotency_key=key
        ),
        metadata=credential(owner.key),
        timeout=30,
    )
    assert captured.points == 60 and captured.released == 40
    assert not any(k == "points-idempotent-replay" for k, _ in call.trailing_metadata() or ())


def test_an_unknown_merchant_is_not_found_before_the_key_is_checked(points, make_merchant):
    merchant = make_merchant()
    assert_refused(lambda: earn(points, unique("nobody"), merchant.key, unique("mem")), grpc.StatusCode.NOT_FOUND)


def test_a_gateway_key_acts_for_each_listed_merchant_and_no_other(service, points, make_merchant):
    a, b, c = make_merchant(), make_merchant(), make_merchant()
    gateway = create_key(service.database_url, "gateway", [a.merchant_id, b.merchant_id])
    member = unique("mem")
    assert earn(points, a.merchant_id, gateway, member).balance == 1_000
    assert earn(points, b.merchant_id, gateway, member).balance == 2_000
    redeemed = points.Redeem(
        points_pb2.RedeemRequest(merchant_id=a.merchant_id, member_id=member, points=300, idempotency_key=unique("k")),
        metadata=credential(gateway),
        timeout=30,
    )
    points.Refund(
        points_pb2.RefundRequest(
            merchant_id=a.merchant_id, transaction_id=redeemed.transaction_id, points=100, idempotency_key=unique("k")
        ),
        metadata=credential(gateway),
        timeout=30,
    )
    # a hold placed with B's own key is captured through the gateway
    hold = points.Authorize(
        points_pb2.AuthorizeRequest(
            merchant_id=b.merchant_id, member_id=member, points=50, idempotency_key=unique("k")
        ),
        metadata=credential(b.key),
        timeout=30,
    )
    captured = points.Capture(
        points_pb2.CaptureRequest(
            merchant_id=b.merchant_id, authorization_id=hold.authorization_id, idempotency_key=unique("k")
        ),
        metadata=credential(gateway),
        timeout=30,
    )
    assert captured.points == 50 and captured.balance == 2_000 - 300 + 100 - 50

    c_hold = points.Authorize(
        points_pb2.AuthorizeRequest(
            merchant_id=c.merchant_id, member_id=member, points=10, idempotency_key=unique("k")
        ),
        metadata=credential(c.key),
        timeout=30,
    )
    before = ledger_snapshot(service.database_url)
    assert_refused(lambda: earn(points, c.merchant_id, gateway, member), grpc.StatusCode.PERMISSION_DENIED)
    assert_refused(
        lambda: points.Redeem(
            points_pb2.RedeemRequest(
                merchant_id=c.merchant_id, member_id=member, points=1, idempotency_key=unique("k")
            ),
            metadata=credential(gateway),
            timeout=30,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert_refused(
        lambda: points.Void(
            points_pb2.VoidRequest(
                merchant_id=c.merchant_id, authorization_id=c_hold.authorization_id, idempotency_key=unique("k")
            ),
            metadata=credential(gateway),
            timeout=30,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert ledger_snapshot(service.database_url) == before


def test_an_operator_key_is_refused_by_the_points_service(service, points, operator_key, make_merchant):
    merchant = make_merchant()
    member = unique("mem")
    earn(points, merchant.merchant_id, merchant.key, member)
    before = ledger_snapshot(service.database_url)
    for call in (
        lambda: earn(points, merchant.merchant_id, operator_key, member),
        lambda: points.Redeem(
            points_pb2.RedeemRequest(
                merchant_id=merchant.merchant_id, member_id=member, points=1, idempotency_key=unique("k")
            ),
            metadata=credential(operator_key),
            timeout=30,
        ),
        lambda: points.GetBalance(
            points_pb2.GetBalanceRequest(member_id=member), metadata=credential(operator_key), timeout=30
        ),
        lambda: points.ListTransactions(
            points_pb2.ListTransactionsRequest(member_id=member), metadata=credential(operator_key), timeout=30
        ),
    ):
        error = assert_refused(call, grpc.StatusCode.PERMISSION_DENIED)
        assert "operator key" in error.details()
    assert ledger_snapshot(service.database_url) == before


def test_merchant_and_gateway_keys_are_refused_by_merchant_admin_and_clearing(service, admin, clearing, make_merchant):
    merchant, stranger = make_merchant(), make_merchant()  # clearing's reads of its own merchant: issue 15
    gateway = create_key(service.database_url, "gateway", [merchant.merchant_id])
    keys_before = fetch(service.database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"]
    periods_before = fetch(service.database_url, "SELECT count(*) AS n FROM settlement_periods")[0]["n"]
    intruder_merchant = unique("m")
    for key in (merchant.key, gateway):
        for call in (
            lambda: admin.GetMerchant(
                admin_pb2.GetMerchantRequest(merchant_id=merchant.merchant_id), metadata=credential(key), timeout=30
            ),
            lambda: admin.ListMerchants(admin_pb2.ListMerchantsRequest(), metadata=credential(key), timeout=30),
            lambda: admin.CreateMerchant(
                admin_pb2.CreateMerchantRequest(
                    merchant=admin_pb2.Merchant(merchant_id=intruder_merchant, give_back_bps=2000)
                ),
                metadata=credential(key),
                timeout=30,
            ),
            lambda: admin.UpdateMerchant(
                admin_pb2.UpdateMerchantRequest(
                    merchant=admin_pb2.Merchant(merchant_id=merchant.merchant_id, fee_redeemed_bps=0),
                    update_fields=["fee_redeemed_bps"],
                ),
                metadata=credential(key),
                timeout=30,
            ),
            lambda: admin.IssueApiKey(
                admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_OPERATOR), metadata=credential(key), timeout=30
            ),
            lambda: admin.RevokeApiKey(
                admin_pb2.RevokeApiKeyRequest(key_id=key_parts(key)[0]), metadata=credential(key), timeout=30
            ),
            lambda: clearing.GetMerchantPosition(
                admin_pb2.GetMerchantPositionRequest(merchant_id=stranger.merchant_id),
                metadata=credential(key),
                timeout=30,
            ),
            lambda: clearing.CloseSettlementPeriod(
                admin_pb2.CloseSettlementPeriodRequest(cut_off=timestamp_pb2.Timestamp(seconds=1)),
                metadata=credential(key),
                timeout=30,
            ),
            lambda: clearing.ExportStatement(
                admin_pb2.ExportStatementRequest(period_id=1), metadata=credential(key), timeout=30
            ),
        ):
            error = assert_refused(call, grpc.StatusCode.PERMISSION_DENIED)
            assert "operator" in error.details()
    assert fetch(service.database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"] == keys_before
    assert fetch(service.database_url, "SELECT count(*) AS n FROM settlement_periods")[0]["n"] == periods_before
    assert not fetch(service.database_url, "SELECT 1 FROM merchants WHERE merchant_id = $1", intruder_merchant)
    assert not fetch(
        service.database_url,
        "SELECT 1 FROM api_keys WHERE revoked_at IS NOT NULL AND key_id = ANY($1)",
        [key_parts(merchant.key)[0], key_parts(gateway)[0]],
    )


# ---------------------------------------------------------------------------------------------------
# Reads


def test_list_transactions_shows_only_the_merchants_the_key_covers(service, points, make_merchant):
    a, b, c = make_merchant(), make_merchant(), make_merchant()
    member = unique("mem")
    mine = {a.merchant_id: [], b.merchant_id: [], c.merchant_id: []}
    for merchant in (a, b, a, c):
        mine[merchant.merchant_id].append(earn(points, merchant.merchant_id, merchant.key, member).transaction_id)
    redeemed = points.Redeem(
        points_pb2.RedeemRequest(merchant_id=b.merchant_id, member_id=member, points=500, idempotency_key=unique("k")),
        metadata=credential(b.key),
        timeout=30,
    )
    mine[b.merchant_id].append(redeemed.transaction_id)

    def listed(key: str, page_size: int = 0) -> list[points_pb2.Transaction]:
        seen, token = [], ""
        while True:
            page = points.ListTransactions(
                points_pb2.ListTransactionsRequest(member_id=member, page_token=token, page_size=page_size),
                metadata=credential(key),
                timeout=30,
            )
            assert len(page.transactions) <= (page_size or 50)
            seen.extend(page.transactions)
            token = page.next_page_token
            if not token:
                return seen

    for merchant in (a, b, c):
        for page_size in (0, 1):
            transactions = listed(merchant.key, page_size)
            assert {t.merchant_id for t in transactions} == {merchant.merchant_id}
            assert [t.transaction_id for t in transactions] == list(reversed(mine[merchant.merchant_id]))
    gateway = create_key(service.database_url, "gateway", [a.merchant_id, c.merchant_id])
    expected = sorted(mine[a.merchant_id] + mine[c.merchant_id], key=lambda t: int(t.split("_")[1]), reverse=True)
    assert [t.transaction_id for t in listed(gateway, 2)] == expected

    # a member with history only elsewhere shows nothing to this merchant (no leak through errors either)
    elsewhere = unique("mem")
    earn(points, b.merchant_id, b.key, elsewhere)
    try:
        response = points.ListTransactions(
            points_pb2.ListTransactionsRequest(member_id=elsewhere), metadata=credential(a.key), timeout=30
        )
        assert list(response.transactions) == [] and response.next_page_token == ""
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND


def test_get_balance_answers_any_merchant_or_gateway_key(service, points, make_merchant):
    a, b = make_merchant(), make_merchant()
    member = unique("mem")
    earn(points, a.merchant_id, a.key, member, 12_345)  # 1,234 point-units
    gateway = create_key(service.database_url, "gateway", [b.merchant_id])
    for key in (a.key, b.key, gateway):
        response = points.GetBalance(
            points_pb2.GetBalanceRequest(member_id=member), metadata=credential(key), timeout=30
        )
        assert (response.posted, response.held, response.available) == (1_234, 0, 1_234)


# ---------------------------------------------------------------------------------------------------
# Keys from the CLI; keys are stored only as hashes


def test_cli_key_create_prints_a_working_key_as_its_last_word(service, points, admin, make_merchant):
    a, b = make_merchant(), make_merchant()
    url = service.database_url

    def created(*arguments: str) -> str:
        result = cli("key", "create", *arguments, "--database-url", url)
        assert result.returncode == 0, result.stderr
        key = result.stdout.split()[-1]
        key_parts(key)
        assert result.stdout.count(key) == 1 and key not in result.stderr
        return key

    merchant_key = created("--merchant-id", a.merchant_id)
    member = unique("mem")
    assert earn(points, a.merchant_id, merchant_key, member).balance == 1_000
    assert_refused(lambda: earn(points, b.merchant_id, merchant_key, member), grpc.StatusCode.PERMISSION_DENIED)

    gateway_key = created("--gateway", "--merchant-id", a.merchant_id, "--merchant-id", b.merchant_id)
    assert earn(points, a.merchant_id, gateway_key, member).balance == 2_000
    assert earn(points, b.merchant_id, gateway_key, member).balance == 3_000

    operator_key = created("--operator")
    got = admin.GetMerchant(
        admin_pb2.GetMerchantRequest(merchant_id=a.merchant_id), metadata=credential(operator_key), timeout=30
    )
    assert got.merchant_id == a.merchant_id
    assert_refused(lambda: earn(points, a.merchant_id, operator_key, member), grpc.StatusCode.PERMISSION_DENIED)

    unknown = cli("key", "create", "--merchant-id", unique("nobody"), "--database-url", url)
    assert unknown.returncode == 1 and "no merchant" in unknown.stderr
    assert not KEY_PATTERN.search(unknown.stdout)


def test_keys_are_stored_only_as_hashes_of_their_secret(service, admin, operator_key, make_merchant):
    merchant = make_merchant()  # key made as the CLI makes it
    issued = admin.IssueApiKey(
        admin_pb2.IssueApiKeyRequest(
            kind=admin_pb2.API_KEY_KIND_GATEWAY, merchant_ids=[merchant.merchant_id], description="stored as a hash"
        ),
        metadata=credential(operator_key),
        timeout=30,
    )
    cli_result = cli("key", "create", "--operator", "--database-url", service.database_url)
    assert cli_result.returncode == 0, cli_result.stderr
    keys = [merchant.key, issued.key, operator_key, cli_result.stdout.split()[-1]]
    assert key_parts(issued.key)[0] == issued.key_id

    rows = fetch(service.database_url, "SELECT key_id, secret_sha256, row_to_json(k)::text AS text FROM api_keys k")
    by_id = {r["key_id"]: r for r in rows}
    every_row = "\n".join(r["text"] for r in rows)
    for key in keys:
        key_id, secret = key_parts(key)
        assert bytes(by_id[key_id]["secret_sha256"]) == hashlib.sha256(secret.encode()).digest()
        assert key not in every_row and secret not in every_row
        assert secret.encode().hex() not in every_row
    # nor does the service log them
    log = "".join(service.log_lines)
    for key in keys:
        assert key_parts(key)[1] not in log


def test_the_ledger_reconciles_after_all_of_the_above(service):
    assert ledger_discrepancies(service.database_url) == []
