"""MerchantAdmin against a real service and Postgres: creating, changing, suspending and listing
merchants, and issuing API keys. A change made through the admin API applies to the very next call."""

from __future__ import annotations

import base64

import grpc
import pytest

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import create_key, fetch, ledger_discrepancies
from tests.integration.helpers import credential, error_of, ledger_snapshot, unique

pytestmark = pytest.mark.timeout(120)

ACTIVE = admin_pb2.MERCHANT_STATUS_ACTIVE
SUSPENDED = admin_pb2.MERCHANT_STATUS_SUSPENDED


@pytest.fixture(scope="module")
def operator_key(service) -> str:
    return create_key(service.database_url, "operator")


class Admin:
    """MerchantAdmin with the operator's credential on every call."""

    def __init__(self, channel, key: str):
        self._stub = admin_pb2_grpc.MerchantAdminStub(channel)
        self._metadata = credential(key)

    def __getattr__(self, method: str):
        rpc = getattr(self._stub, method)
        return lambda request: rpc(request, metadata=self._metadata, timeout=30)


@pytest.fixture(scope="module")
def admin(channel, operator_key) -> Admin:
    return Admin(channel, operator_key)


@pytest.fixture(scope="module")
def points(channel):
    return points_pb2_grpc.PointsServiceStub(channel)


def create(admin: Admin, merchant_id: str | None = None, **fields) -> admin_pb2.Merchant:
    fields.setdefault("give_back_bps", 1000)
    return admin.CreateMerchant(
        admin_pb2.CreateMerchantRequest(
            merchant=admin_pb2.Merchant(merchant_id=unique("m") if merchant_id is None else merchant_id, **fields)
        )
    )


def merchant_key(admin: Admin, merchant_id: str) -> str:
    return admin.IssueApiKey(
        admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=[merchant_id])
    ).key


def assert_refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


def earn(points, merchant_id, key, member, purchase=10_000, idempotency_key=None):
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


def comparable(merchant: admin_pb2.Merchant) -> tuple:
    return (
        merchant.merchant_id,
        merchant.name,
        merchant.give_back_bps,
        merchant.fee_redeemed_bps,
        merchant.fee_issued_bps,
        merchant.region,
        merchant.status,
    )


# ---------------------------------------------------------------------------------------------------
# CreateMerchant


def test_create_merchant_stores_every_field_and_the_merchant_can_earn_at_once(service, admin, points):
    merchant_id = unique("m")
    created = create(
        admin,
        merchant_id,
        name="Corner Café",
        give_back_bps=750,
        fee_redeemed_bps=125,
        fee_issued_bps=40,
        region="north",
    )
    assert comparable(created) == (merchant_id, "Corner Café", 750, 125, 40, "north", ACTIVE)
    assert created.created_at.seconds > 0 and created.updated_at.seconds > 0
    got = admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=merchant_id))
    assert got == created
    row = fetch(service.database_url, "SELECT * FROM merchants WHERE merchant_id = $1", merchant_id)[0]
    assert (
        row["name"],
        row["give_back_bps"],
        row["fee_redeemed_bps"],
        row["fee_issued_bps"],
        row["region"],
        row["status"],
    ) == ("Corner Café", 750, 125, 40, "north", "active")
    accounts = fetch(
        service.database_url, "SELECT kind, balance FROM account_balances WHERE owner_id = $1", merchant_id
    )
    assert sorted((r["kind"], r["balance"]) for r in accounts) == [
        ("merchant_acquiring", 0),
        ("merchant_fees", 0),
        ("merchant_issued", 0),
        ("merchant_redeemed", 0),
    ]
    response = earn(points, merchant_id, merchant_key(admin, merchant_id), unique("mem"), 12_345)
    assert response.give_back_bps == 750 and response.points == 925  # floor(12345 * 0.075)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"give_back_bps": 299}, "give_back_bps"),
        ({"give_back_bps": 2001}, "give_back_bps"),
        ({"give_back_bps": 0}, "give_back_bps"),
        ({"give_back_bps": -1000}, "give_back_bps"),
        ({"fee_redeemed_bps": -1}, "fee_redeemed_bps"),
        ({"fee_redeemed_bps": 10_001}, "fee_redeemed_bps"),
        ({"fee_issued_bps": -1}, "fee_issued_bps"),
        ({"fee_issued_bps": 10_001}, "fee_issued_bps"),
        ({"name": "x" * 201}, "name"),
        ({"region": "é" * 101}, "region"),  # 202 bytes
    ],
)
def test_create_merchant_rejects_out_of_bounds_fields_and_creates_nothing(service, admin, fields, named):
    merchant_id = unique("m")
    error = assert_refused(lambda: create(admin, merchant_id, **fields), grpc.StatusCode.INVALID_ARGUMENT)
    assert named in error.details()
    assert not fetch(service.database_url, "SELECT 1 FROM merchants WHERE merchant_id = $1", merchant_id)
    assert_refused(
        lambda: admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=merchant_id)), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize("merchant_id", ["", "has space", "semi;colon", "x" * 129])
def test_create_merchant_rejects_bad_ids(admin, merchant_id):
    assert_refused(lambda: create(admin, merchant_id), grpc.StatusCode.INVALID_ARGUMENT)


def test_create_merchant_accepts_the_bounds_themselves(admin):
    low = create(admin, give_back_bps=300, fee_redeemed_bps=0, fee_issued_bps=0, name="n" * 200)
    high = create(admin, give_back_bps=2000, fee_redeemed_bps=10_000, fee_issued_bps=10_000)
    assert (low.give_back_bps, low.fee_redeemed_bps, low.fee_issued_bps) == (300, 0, 0)
    assert (high.give_back_bps, high.fee_redeemed_bps, high.fee_issued_bps) == (2000, 10_000, 10_000)


def test_create_merchant_twice_is_already_exists_and_keeps_the_first(service, admin):
    first = create(admin, name="first", give_back_bps=500, fee_redeemed_bps=10)
    error = assert_refused(
        lambda: create(admin, first.merchant_id, name="second", give_back_bps=1500, fee_redeemed_bps=99),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert first.merchant_id in error.details()
    assert admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=first.merchant_id)) == first
    assert (
        len(fetch(service.database_url, "SELECT 1 FROM accounts WHERE owner_id = $1", first.merchant_id)) == 4
    )  # issued, redeemed, fees, acquiring


# ---------------------------------------------------------------------------------------------------
# UpdateMerchant


def test_update_merchant_changes_only_the_named_fields(admin):
    original = create(admin, name="before", give_back_bps=800, fee_redeemed_bps=100, fee_issued_bps=50, region="south")
    # the message carries other (even invalid) values: only the named field is read
    updated = admin.UpdateMerchant(
        admin_pb2.UpdateMerchantRequest(
            merchant=admin_pb2.Merchant(
                merchant_id=original.merchant_id, name="after", give_back_bps=0, fee_redeemed_bps=-5, region=""
            ),
            update_fields=["name"],
        )
    )
    assert comparable(updated) == (original.merchant_id, "after", 800, 100, 50, "south", ACTIVE)
    assert updated.created_at == original.created_at
    assert admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=original.merchant_id)) == updated

    updated = admin.UpdateMerchant(
        admin_pb2.UpdateMerchantRequest(
            merchant=admin_pb2.Merchant(
                merchant_id=original.merchant_id, fee_redeemed_bps=0, fee_issued_bps=250, region="east"
            ),
            update_fields=["fee_redeemed_bps", "fee_issued_bps", "region"],
        )
    )
    assert comparable(updated) == (original.merchant_id, "after", 800, 0, 250, "east", ACTIVE)


def test_update_merchant_without_update_fields_sets_every_settable_field(admin):
    original = create(admin, name="old", give_back_bps=800, fee_redeemed_bps=100, fee_issued_bps=50, region="r1")
    replacement = admin_pb2.Merchant(
        merchant_id=original.merchant_id,
        name="new",
        give_back_bps=1200,
        fee_redeemed_bps=300,
        fee_issued_bps=0,
        region="r2",
        status=ACTIVE,
    )
    updated = admin.UpdateMerchant(admin_pb2.UpdateMerchantRequest(merchant=replacement))
    assert comparable(updated) == comparable(replacement)


@pytest.mark.parametrize(
    "merchant, fields, code",
    [
        ({"give_back_bps": 2500}, ["give_back_bps"], grpc.StatusCode.INVALID_ARGUMENT),
        ({"give_back_bps": 250}, ["give_back_bps"], grpc.StatusCode.INVALID_ARGUMENT),
        ({"fee_redeemed_bps": 10_001}, ["fee_redeemed_bps"], grpc.StatusCode.INVALID_ARGUMENT),
        ({"fee_issued_bps": -1}, ["fee_issued_bps"], grpc.StatusCode.INVALID_ARGUMENT),
        ({"status": admin_pb2.MERCHANT_STATUS_UNSPECIFIED}, ["status"], grpc.StatusCode.INVALID_ARGUMENT),
        ({}, ["merchant_id"], grpc.StatusCode.INVALID_ARGUMENT),
        ({}, ["created_at"], grpc.StatusCode.INVALID_ARGUMENT),
        ({}, ["no_such_field"], grpc.StatusCode.INVALID_ARGUMENT),
        # a valid change named alongside an invalid one is not applied either
        ({"name": "half", "give_back_bps": 9}, ["name", "give_back_bps"], grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_update_merchant_rejects_bad_changes_and_changes_nothing(admin, merchant, fields, code):
    original = create(admin, name="unchanged", give_back_bps=900)
    assert_refused(
        lambda: admin.UpdateMerchant(
            admin_pb2.UpdateMerchantRequest(
                merchant=admin_pb2.Merchant(merchant_id=original.merchant_id, **merchant), update_fields=fields
            )
        ),
        code,
    )
    assert admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=original.merchant_id)) == original


def test_update_or_suspend_of_an_unknown_merchant_is_not_found(admin):
    nobody = unique("nobody")
    assert_refused(
        lambda: admin.UpdateMerchant(
            admin_pb2.UpdateMerchantRequest(
                merchant=admin_pb2.Merchant(merchant_id=nobody, name="x"), update_fields=["name"]
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert_refused(
        lambda: admin.SuspendMerchant(admin_pb2.SuspendMerchantRequest(merchant_id=nobody)), grpc.StatusCode.NOT_FOUND
    )
    assert_refused(
        lambda: admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=nobody)), grpc.StatusCode.NOT_FOUND
    )
    assert_refused(
        lambda: admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id="bad id")), grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_give_back_change_applies_to_the_next_earn_and_not_to_replays(service, admin, points):
    merchant = create(admin, give_back_bps=1000)
    key = merchant_key(admin, merchant.merchant_id)
    member = unique("mem")
    first_key = unique("k")
    first = earn(points, merchant.merchant_id, key, member, 10_001, first_key)
    assert (first.give_back_bps, first.points) == (1000, 1_000)
    admin.UpdateMerchant(
        admin_pb2.UpdateMerchantRequest(
            merchant=admin_pb2.Merchant(merchant_id=merchant.merchant_id, give_back_bps=1550),
            update_fields=["give_back_bps"],
        )
    )
    second = earn(points, merchant.merchant_id, key, member, 10_001)
    assert (second.give_back_bps, second.points, second.balance) == (1550, 1_550, 2_550)  # floor(1550.155)
    # the first earn is decided: its replay is the original response, at the old rate
    assert earn(points, merchant.merchant_id, key, member, 10_001, first_key) == first
    rows = fetch(
        service.database_url,
        "SELECT amount, purchase_amount FROM transactions WHERE merchant_id = $1 ORDER BY transaction_id",
        merchant.merchant_id,
    )
    assert [(r["amount"], r["purchase_amount"]) for r in rows] == [(1_000, 10_001), (1_550, 10_001)]


def test_a_fee_change_applies_to_the_next_operation(service, admin, points):
    merchant = create(admin, give_back_bps=1000, fee_issued_bps=0, fee_redeemed_bps=0)
    key = merchant_key(admin, merchant.merchant_id)
    member = unique("mem")
    earn(points, merchant.merchant_id, key, member, 100_000)  # 10,000 point-units, no fee
    admin.UpdateMerchant(
        admin_pb2.UpdateMerchantRequest(
            merchant=admin_pb2.Merchant(merchant_id=merchant.merchant_id, fee_issued_bps=100, fee_redeemed_bps=333),
            update_fields=["fee_issued_bps", "fee_redeemed_bps"],
        )
    )
    earn(points, merchant.merchant_id, key, member, 100_000)  # fee floor(10000 * 1%) = 100
    points.Redeem(
        points_pb2.RedeemRequest(
            merchant_id=merchant.merchant_id, member_id=member, points=1_001, idempotency_key=unique("k")
        ),
        metadata=credential(key),
        timeout=30,
    )
    rows = fetch(
        service.database_url,
        "SELECT kind, amount, fee FROM transactions WHERE merchant_id = $1 ORDER BY transaction_id",
        merchant.merchant_id,
    )
    # redeem fee floor(1001 * 333 / 10000) = floor(33.3333) = 33
    assert [(r["kind"], r["amount"], r["fee"]) for r in rows] == [(1, 10_000, 0), (1, 10_000, 100), (3, 1_001, 33)]


# ---------------------------------------------------------------------------------------------------
# SuspendMerchant


def test_a_suspended_merchant_starts_nothing_new_but_finishes_what_it_started(service, admin, points):
    merchant = create(admin, give_back_bps=1000)
    m = merchant.merchant_id
    key = merchant_key(admin, m)
    metadata = credential(key)
    member = unique("mem")
    earned = earn(points, m, key, member, 100_000)  # 10,000 point-units
    to_capture = points.Authorize(
        points_pb2.AuthorizeRequest(merchant_id=m, member_id=member, points=1_000, idempotency_key=unique("k")),
        metadata=metadata,
        timeout=30,
    )
    to_void = points.Authorize(
        points_pb2.AuthorizeRequest(merchant_id=m, member_id=member, points=500, idempotency_key=unique("k")),
        metadata=metadata,
        timeout=30,
    )
    redeemed = points.Redeem(
        points_pb2.RedeemRequest(merchant_id=m, member_id=member, points=2_000, idempotency_key=unique("k")),
        metadata=metadata,
        timeout=30,
    )

    suspended = admin.SuspendMerchant(admin_pb2.SuspendMerchantRequest(merchant_id=m))
    assert suspended.status == SUSPENDED
    assert admin.GetMerchant(admin_pb2.GetMerchantRequest(merchant_id=m)).status == SUSPENDED
    assert (
        fetch(service.database_url, "SELECT status FROM merchants WHERE merchant_id = $1", m)[0]["status"]
        == "suspended"
    )

    before = ledger_snapshot(service.database_url)
    for call in (
        lambda: earn(points, m, key, member),
        lambda: points.Authorize(
            points_pb2.AuthorizeRequest(merchant_id=m, member_id=member, points=1, idempotency_key=unique("k")),
            metadata=metadata,
            timeout=30,
        ),
        lambda: points.Redeem(
            points_pb2.RedeemRequest(merchant_id=m, member_id=member, points=1, idempotency_key=unique("k")),
            metadata=metadata,
            timeout=30,
        ),
    ):
        error = assert_refused(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert "suspended" in error.details()
    assert ledger_snapshot(service.database_url) == before

    captured = points.Capture(
        points_pb2.CaptureRequest(
            merchant_id=m, authorization_id=to_capture.authorization_id, points=600, idempotency_key=unique("k")
        ),
        metadata=metadata,
        timeout=30,
    )
    assert (captured.points, captured.released) == (600, 400)
    voided = points.Void(
        points_pb2.VoidRequest(merchant_id=m, authorization_id=to_void.authorization_id, idempotency_key=unique("k")),
        metadata=metadata,
        timeout=30,
    )
    assert voided.released == 500
    refunded = points.Refund(
        points_pb2.RefundRequest(
            merchant_id=m, transaction_id=redeemed.transaction_id, points=700, idempotency_key=unique("k")
        ),
        metadata=metadata,
        timeout=30,
    )
    assert refunded.kind == points_pb2.TRANSACTION_KIND_REFUND_OF_REDEMPTION
    taken_back = points.Refund(
        points_pb2.RefundRequest(
            merchant_id=m, transaction_id=earned.transaction_id, points=100, idempotency_key=unique("k")
        ),
        metadata=metadata,
        timeout=30,
    )
    assert taken_back.kind == points_pb2.TRANSACTION_KIND_REFUND_OF_EARN
    assert taken_back.balance == 10_000 - 2_000 - 600 + 700 - 100
    # balances can still be read
    balance = points.GetBalance(points_pb2.GetBalanceRequest(member_id=member), metadata=metadata, timeout=30)
    assert (balance.posted, balance.held) == (8_000, 0)

    reactivated = admin.UpdateMerchant(
        admin_pb2.UpdateMerchantRequest(
            merchant=admin_pb2.Merchant(merchant_id=m, status=ACTIVE), update_fields=["status"]
        )
    )
    assert reactivated.status == ACTIVE and reactivated.give_back_bps == 1000
    assert earn(points, m, key, member).balance == 9_000
    points.Redeem(
        points_pb2.RedeemRequest(merchant_id=m, member_id=member, points=1, idempotency_key=unique("k")),
        metadata=metadata,
        timeout=30,
    )


def test_a_suspended_merchant_retrying_an_earn_it_made_gets_the_original_outcome(admin, points):
    """Idempotency is forever: an earn decided before the suspension (its response lost, say) replays
    as what it was, rather than looking refused while its points stay credited."""
    merchant = create(admin, give_back_bps=1000)
    key = merchant_key(admin, merchant.merchant_id)
    member = unique("mem")
    idempotency_key = unique("k")
    first = earn(points, merchant.merchant_id, key, member, 10_000, idempotency_key)
    admin.SuspendMerchant(admin_pb2.SuspendMerchantRequest(merchant_id=merchant.merchant_id))
    try:
        retried = earn(points, merchant.merchant_id, key, member, 10_000, idempotency_key)
    except grpc.RpcError as error:
        pytest.fail(
            f"the retry of a committed earn was answered {error.code().name} ({error.details()}), "
            f"yet its {first.points} point-units stay credited"
        )
    assert retried == first


# ---------------------------------------------------------------------------------------------------
# GetMerchant, ListMerchants


def list_all(admin: Admin, page_size: int) -> list[admin_pb2.Merchant]:
    seen, token, pages = [], "", 0
    while True:
        page = admin.ListMerchants(admin_pb2.ListMerchantsRequest(page_token=token, page_size=page_size))
        pages += 1
        assert len(page.merchants) <= (page_size or 100)
        if page.next_page_token:
            assert len(page.merchants) == (page_size or 100)
        seen.extend(page.merchants)
        token = page.next_page_token
        if not token:
            return seen
        assert pages < 10_000


def test_list_merchants_pages_through_every_merchant_once(service, admin):
    created = [create(admin, name=f"listed {i}", give_back_bps=300 + i) for i in range(7)]
    total = fetch(service.database_url, "SELECT count(*) AS n FROM merchants")[0]["n"]
    for page_size in (1, 3, 0, 1000):
        merchants = list_all(admin, page_size)
        ids = [m.merchant_id for m in merchants]
        assert len(ids) == len(set(ids)) == total
        by_id = {m.merchant_id: m for m in merchants}
        for merchant in created:
            assert by_id[merchant.merchant_id] == merchant
    # pages follow creation order
    order = [
        r["merchant_id"]
        for r in fetch(service.database_url, "SELECT merchant_id FROM merchants ORDER BY merchant_slot")
    ]
    assert [m.merchant_id for m in list_all(admin, 2)] == order


@pytest.mark.parametrize("page_size", [-1, 1001])
def test_list_merchants_rejects_bad_page_sizes(admin, page_size):
    assert_refused(
        lambda: admin.ListMerchants(admin_pb2.ListMerchantsRequest(page_size=page_size)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


@pytest.mark.parametrize("token", ["%%%not base64%%%", base64.urlsafe_b64encode(b"not-a-number").decode()])
def test_list_merchants_rejects_a_page_token_it_did_not_issue(admin, token):
    assert_refused(
        lambda: admin.ListMerchants(admin_pb2.ListMerchantsRequest(page_token=token)), grpc.StatusCode.INVALID_ARGUMENT
    )


# ---------------------------------------------------------------------------------------------------
# IssueApiKey


def test_issue_api_key_of_each_kind_gives_a_working_key(service, admin, channel, points):
    a, b = create(admin), create(admin)
    member = unique("mem")

    merchant = admin.IssueApiKey(
        admin_pb2.IssueApiKeyRequest(
            kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=[a.merchant_id], description="till 1"
        )
    )
    assert merchant.key.startswith(f"pk_{merchant.key_id}_")
    assert earn(points, a.merchant_id, merchant.key, member).balance == 1_000
    assert_refused(lambda: earn(points, b.merchant_id, merchant.key, member), grpc.StatusCode.PERMISSION_DENIED)

    gateway = admin.IssueApiKey(
        admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_GATEWAY, merchant_ids=[a.merchant_id, b.merchant_id])
    )
    assert earn(points, a.merchant_id, gateway.key, member).balance == 2_000
    assert earn(points, b.merchant_id, gateway.key, member).balance == 3_000

    # operator keys are made on the host only (the CLI), never through the API
    assert_refused(
        lambda: admin.IssueApiKey(admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_OPERATOR)),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    rows = fetch(
        service.database_url,
        "SELECT key_id, kind, merchant_ids, description FROM api_keys WHERE key_id = ANY($1)",
        [merchant.key_id, gateway.key_id],
    )
    assert sorted((r["key_id"], r["kind"], sorted(r["merchant_ids"])) for r in rows) == sorted(
        [
            (merchant.key_id, "merchant", [a.merchant_id]),
            (gateway.key_id, "gateway", sorted([a.merchant_id, b.merchant_id])),
        ]
    )
    assert len({merchant.key_id, gateway.key_id}) == 2


@pytest.mark.parametrize(
    "kind, merchants, code",
    [
        (admin_pb2.API_KEY_KIND_UNSPECIFIED, 1, grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.API_KEY_KIND_MERCHANT, 0, grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.API_KEY_KIND_MERCHANT, 2, grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.API_KEY_KIND_GATEWAY, 0, grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.API_KEY_KIND_OPERATOR, 0, grpc.StatusCode.PERMISSION_DENIED),
        (admin_pb2.API_KEY_KIND_OPERATOR, 1, grpc.StatusCode.PERMISSION_DENIED),
        (99, 1, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_issue_api_key_rejects_bad_combinations_and_stores_nothing(service, admin, kind, merchants, code):
    ids = [create(admin).merchant_id for _ in range(merchants)]
    before = fetch(service.database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"]
    assert_refused(lambda: admin.IssueApiKey(admin_pb2.IssueApiKeyRequest(kind=kind, merchant_ids=ids)), code)
    assert fetch(service.database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"] == before


def test_issue_api_key_for_an_unknown_merchant_is_not_found_and_stores_nothing(service, admin):
    known = create(admin).merchant_id
    nobody = unique("nobody")
    before = fetch(service.database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"]
    for kind, ids in ((admin_pb2.API_KEY_KIND_MERCHANT, [nobody]), (admin_pb2.API_KEY_KIND_GATEWAY, [known, nobody])):
        error = assert_refused(
            lambda: admin.IssueApiKey(admin_pb2.IssueApiKeyRequest(kind=kind, merchant_ids=ids)),
            grpc.StatusCode.NOT_FOUND,
        )
        assert nobody in error.details()
    assert fetch(service.database_url, "SELECT count(*) AS n FROM api_keys")[0]["n"] == before


def test_issue_api_key_rejects_bad_ids_and_long_descriptions(admin):
    known = create(admin).merchant_id
    assert_refused(
        lambda: admin.IssueApiKey(
            admin_pb2.IssueApiKeyRequest(kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=["bad id"])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert_refused(
        lambda: admin.IssueApiKey(
            admin_pb2.IssueApiKeyRequest(
                kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=[known], description="d" * 201
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_the_ledger_reconciles_after_all_of_the_above(service):
    assert ledger_discrepancies(service.database_url) == []
