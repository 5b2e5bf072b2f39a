"""MerchantAdminService, ClearingService and ProgramsService against a real service and Postgres: every
method answers what its deprecated twin (MerchantAdmin, Clearing, Programs) answers, refusals included
(same status code, same message); the old services keep working; the new ones take operator keys only and
their state-changing calls are audited under their own method names."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import create_key
from tests.integration.helpers import credential, error_of, unique

pytestmark = pytest.mark.timeout(180)

# old service -> (new service, {method: name of the field wrapping the old response, or None: a copy})
TWINS = {
    "MerchantAdmin": (
        "MerchantAdminService",
        {
            "CreateMerchant": "merchant",
            "UpdateMerchant": "merchant",
            "SuspendMerchant": "merchant",
            "GetMerchant": "merchant",
            "ListMerchants": None,
            "IssueApiKey": None,
            "RevokeApiKey": None,
        },
    ),
    "Clearing": (
        "ClearingService",
        {
            "GetMerchantPosition": "position",
            "CloseSettlementPeriod": "period",
            "GetStatement": "statement",
            "ListStatements": None,
            "ExportStatement": None,
        },
    ),
    "Programs": ("ProgramsService", {"SetProgramVersion": "version", "GetProgram": "program"}),
}
METHODS = [(old, method) for old, (_, methods) in TWINS.items() for method in methods]


class Twins:
    """Calls a method on the old service and on its twin with the same request fields; returns both
    answers as the old response type (the new one unwrapped or converted), or both errors."""

    def __init__(self, channel, key: str):
        self.metadata = credential(key)
        self.channel = channel

    def _stub(self, service: str):
        return getattr(admin_pb2_grpc, f"{service}Stub")(self.channel)

    def old(self, service: str, method: str, request):
        return getattr(self._stub(service), method)(request, metadata=self.metadata, timeout=30)

    def new(self, old_service: str, method: str, request):
        """The twin's answer, as the old method's response type."""
        new_service, methods = TWINS[old_service]
        new_request = getattr(pb, f"{new_service}{method}Request").FromString(request.SerializeToString())
        answer = getattr(self._stub(new_service), method)(new_request, metadata=self.metadata, timeout=30)
        assert type(answer).__name__ == f"{new_service}{method}Response"
        if methods[method] is not None:
            return getattr(answer, methods[method])
        old_type = type(self.old_response_type(old_service, method))
        return old_type.FromString(answer.SerializeToString())

    @staticmethod
    def old_response_type(service: str, method: str):
        descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type
        return getattr(pb, descriptor.name)()

    def both(self, service: str, method: str, request):
        return self.old(service, method, request), self.new(service, method, request)

    def both_refused(self, service: str, method: str, request) -> tuple[grpc.RpcError, grpc.RpcError]:
        old = error_of(lambda: self.old(service, method, request))
        new = error_of(lambda: self.new(service, method, request))
        assert (new.code(), new.details()) == (old.code(), old.details()), (service, method)
        return old, new


@pytest.fixture(scope="module")
def operator_key(service) -> str:
    return create_key(service.database_url, "operator")


@pytest.fixture(scope="module")
def twins(channel, operator_key) -> Twins:
    return Twins(channel, operator_key)


def _merchant(merchant_id: str, **fields) -> pb.Merchant:
    fields.setdefault("give_back_bps", 1000)
    return pb.Merchant(merchant_id=merchant_id, name="Shop", region="north", **fields)


def _stamp(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# Requests every method refuses (bad input, or an unknown thing) the same way on both services.
REFUSED = {
    ("MerchantAdmin", "CreateMerchant"): pb.CreateMerchantRequest(merchant=_merchant("bad id!")),
    ("MerchantAdmin", "UpdateMerchant"): pb.UpdateMerchantRequest(merchant=_merchant("nobody-here")),
    ("MerchantAdmin", "SuspendMerchant"): pb.SuspendMerchantRequest(merchant_id="nobody-here"),
    ("MerchantAdmin", "GetMerchant"): pb.GetMerchantRequest(merchant_id="nobody-here"),
    ("MerchantAdmin", "ListMerchants"): pb.ListMerchantsRequest(page_size=5000),
    ("MerchantAdmin", "IssueApiKey"): pb.IssueApiKeyRequest(kind=pb.API_KEY_KIND_OPERATOR),
    ("MerchantAdmin", "RevokeApiKey"): pb.RevokeApiKeyRequest(key_id="no-such-key"),
    ("Clearing", "GetMerchantPosition"): pb.GetMerchantPositionRequest(merchant_id="nobody-here"),
    ("Clearing", "CloseSettlementPeriod"): pb.CloseSettlementPeriodRequest(),
    ("Clearing", "GetStatement"): pb.GetStatementRequest(merchant_id="nobody-here", period_id=0),
    ("Clearing", "ListStatements"): pb.ListStatementsRequest(),
    ("Clearing", "ExportStatement"): pb.ExportStatementRequest(period_id=999_999),
    ("Programs", "SetProgramVersion"): pb.SetProgramVersionRequest(program_id="someone-elses"),
    ("Programs", "GetProgram"): pb.GetProgramRequest(program_id="someone-elses"),
}


def test_every_method_of_the_twins_is_covered():
    assert set(REFUSED) == set(METHODS)


@pytest.mark.parametrize("old_service, method", METHODS)
def test_each_new_method_refuses_as_its_old_twin(twins, old_service, method):
    old, _ = twins.both_refused(old_service, method, REFUSED[(old_service, method)])
    assert old.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_merchant_admin_service_answers_as_merchant_admin(twins, channel):
    # created through the new service, read back through both
    merchant_id = unique("m")
    created = twins.new("MerchantAdmin", "CreateMerchant", pb.CreateMerchantRequest(merchant=_merchant(merchant_id)))
    assert created.merchant_id == merchant_id and created.status == pb.MERCHANT_STATUS_ACTIVE
    old, new = twins.both("MerchantAdmin", "GetMerchant", pb.GetMerchantRequest(merchant_id=merchant_id))
    assert old == new == created
    # taken now: both refuse the same id the same way
    error, _ = twins.both_refused(
        "MerchantAdmin", "CreateMerchant", pb.CreateMerchantRequest(merchant=_merchant(merchant_id))
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    updated = twins.new(
        "MerchantAdmin",
        "UpdateMerchant",
        pb.UpdateMerchantRequest(merchant=_merchant(merchant_id, give_back_bps=1500), update_fields=["give_back_bps"]),
    )
    assert updated.give_back_bps == 1500
    assert twins.old("MerchantAdmin", "GetMerchant", pb.GetMerchantRequest(merchant_id=merchant_id)) == updated
    old, new = twins.both("MerchantAdmin", "ListMerchants", pb.ListMerchantsRequest(page_size=1000))
    assert old == new and merchant_id in {m.merchant_id for m in new.merchants}
    # a key issued through the new service works on PointsService; revoked through it, it stops working
    issued = twins.new(
        "MerchantAdmin", "IssueApiKey", pb.IssueApiKeyRequest(kind=pb.API_KEY_KIND_MERCHANT, merchant_ids=[merchant_id])
    )
    points = points_pb2_grpc.PointsServiceStub(channel)
    earned = points.Earn(
        points_pb2.EarnRequest(
            merchant_id=merchant_id, member_id=unique("mem"), purchase_amount=10_000, idempotency_key=unique("k")
        ),
        metadata=credential(issued.key),
        timeout=30,
    )
    assert earned.points == 1500
    revoked = twins.new("MerchantAdmin", "RevokeApiKey", pb.RevokeApiKeyRequest(key_id=issued.key_id))
    assert revoked.revoked_at.seconds > 0
    error = error_of(
        lambda: points.Earn(
            points_pb2.EarnRequest(
                merchant_id=merchant_id, member_id=unique("mem"), purchase_amount=10_000, idempotency_key=unique("k")
            ),
            metadata=credential(issued.key),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    suspended = twins.new("MerchantAdmin", "SuspendMerchant", pb.SuspendMerchantRequest(merchant_id=merchant_id))
    assert suspended.status == pb.MERCHANT_STATUS_SUSPENDED
    old, new = twins.both("MerchantAdmin", "GetMerchant", pb.GetMerchantRequest(merchant_id=merchant_id))
    assert old == new == suspended


def test_clearing_service_answers_as_clearing(twins, channel):
    merchant_id = unique("m")
    twins.old("MerchantAdmin", "CreateMerchant", pb.CreateMerchantRequest(merchant=_merchant(merchant_id)))
    key = twins.old(
        "MerchantAdmin", "IssueApiKey", pb.IssueApiKeyRequest(kind=pb.API_KEY_KIND_MERCHANT, merchant_ids=[merchant_id])
    ).key
    points = points_pb2_grpc.PointsServiceStub(channel)
    for _ in range(3):
        points.Earn(
            points_pb2.EarnRequest(
                merchant_id=merchant_id, member_id=unique("mem"), purchase_amount=20_000, idempotency_key=unique("k")
            ),
            metadata=credential(key),
            timeout=30,
        )
    old, new = twins.both("Clearing", "GetMerchantPosition", pb.GetMerchantPositionRequest(merchant_id=merchant_id))
    old.ClearField("as_of"), new.ClearField("as_of")  # "now" of each call
    assert old == new and new.issued == 6000
    # the same cut_off through both: the same period (the call is idempotent)
    cut_off = _stamp(dt.datetime.now(dt.timezone.utc) - dt.timedelta(milliseconds=1))
    first = twins.new("Clearing", "CloseSettlementPeriod", pb.CloseSettlementPeriodRequest(cut_off=cut_off))
    again = twins.old("Clearing", "CloseSettlementPeriod", pb.CloseSettlementPeriodRequest(cut_off=cut_off))
    assert first == again and first.period_id > 0
    old, new = twins.both(
        "Clearing", "GetStatement", pb.GetStatementRequest(merchant_id=merchant_id, period_id=first.period_id)
    )
    assert old == new and new.issued == 6000
    old, new = twins.both("Clearing", "ListStatements", pb.ListStatementsRequest(period_id=first.period_id))
    assert old == new and merchant_id in {s.merchant_id for s in new.statements}
    old, new = twins.both(
        "Clearing", "ExportStatement", pb.ExportStatementRequest(period_id=first.period_id, merchant_id=merchant_id)
    )
    assert old == new and new.lines == 3


def test_programs_service_answers_as_programs(twins):
    old, new = twins.both_refused("Programs", "GetProgram", pb.GetProgramRequest())
    assert old.code() == grpc.StatusCode.NOT_FOUND
    version = twins.new(
        "Programs",
        "SetProgramVersion",
        pb.SetProgramVersionRequest(rules=pb.ProgramRules(referral_bonus_point_units=500)),
    )
    assert version.version == 1 and version.rules.referral_bonus_point_units == 500
    old, new = twins.both("Programs", "GetProgram", pb.GetProgramRequest())
    assert old == new and [v.version for v in new.versions] == [1] and new.versions[0] == version
    # the old service adds the next version of the same program
    assert (
        twins.old(
            "Programs",
            "SetProgramVersion",
            pb.SetProgramVersionRequest(rules=pb.ProgramRules(referral_bonus_point_units=700)),
        ).version
        == 2
    )


def test_new_services_take_operator_keys_only_and_are_audited_under_their_names(service, channel, twins, operator_key):
    from processor import audit

    merchant_id = unique("m")
    twins.new("MerchantAdmin", "CreateMerchant", pb.CreateMerchantRequest(merchant=_merchant(merchant_id)))
    merchant_key = create_key(service.database_url, "merchant", [merchant_id])
    stub = admin_pb2_grpc.MerchantAdminServiceStub(channel)
    request = pb.MerchantAdminServiceGetMerchantRequest(merchant_id=merchant_id)
    assert error_of(lambda: stub.GetMerchant(request, timeout=30)).code() == grpc.StatusCode.UNAUTHENTICATED
    refused = error_of(lambda: stub.GetMerchant(request, metadata=credential(merchant_key), timeout=30))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    records = (
        admin_pb2_grpc.AuditServiceStub(channel)
        .ListAuditRecords(
            pb.ListAuditRecordsRequest(method="/points.v1.MerchantAdminService/CreateMerchant"),
            metadata=credential(operator_key),
            timeout=30,
        )
        .records
    )
    assert any(merchant_id in r.request_json and r.outcome == "OK" for r in records), records
    assert audit.audited("/points.v1.MerchantAdminService/CreateMerchant")
    assert not audit.audited("/points.v1.MerchantAdminService/GetMerchant")
