"""The audit trail (issue 13, section 7), against a real service and Postgres: every state-changing call
of the operator services made with a valid key is recorded (key id, method, request with secrets
redacted, outcome, time, request id), reads are not; the CLI records its own changes as key "cli"; the
table refuses updates and deletes; AuditService and `audit list` read it, to operators only."""

from __future__ import annotations

import json

import asyncpg
import grpc
import pytest

from points.v1 import admin_pb2, admin_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch
from tests.integration.helpers import cli, credential, error_of, unique

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def service(create_database):
    service = ServiceProcess(create_database()).start()
    yield service
    service.kill()


@pytest.fixture(scope="module")
def operator_key(service) -> str:
    return create_key(service.database_url, "operator")


@pytest.fixture(scope="module")
def admin(channel):
    return admin_pb2_grpc.MerchantAdminStub(channel)


@pytest.fixture(scope="module")
def audit(channel):
    return admin_pb2_grpc.AuditServiceStub(channel)


def records(audit, key: str, **filters) -> list[admin_pb2.AuditRecord]:
    return list(
        audit.ListAuditRecords(
            admin_pb2.ListAuditRecordsRequest(page_size=1000, **filters), metadata=credential(key), timeout=30
        ).records
    )


def key_id(key: str) -> str:
    return key.split("_")[1]


def test_state_changing_calls_are_recorded_with_their_outcome_and_reads_are_not(service, admin, audit, operator_key):
    metadata = credential(operator_key) + (("x-request-id", "audit-req-1"),)
    merchant_id = unique("m")
    admin.CreateMerchant(
        admin_pb2.CreateMerchantRequest(
            merchant=admin_pb2.Merchant(merchant_id=merchant_id, give_back_bps=1000, name="Cafe")
        ),
        metadata=metadata,
        timeout=30,
    )
    error = error_of(
        lambda: admin.CreateMerchant(
            admin_pb2.CreateMerchantRequest(merchant=admin_pb2.Merchant(merchant_id=merchant_id, give_back_bps=1000)),
            metadata=credential(operator_key),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    admin.GetMerchant(
        admin_pb2.GetMerchantRequest(merchant_id=merchant_id), metadata=credential(operator_key), timeout=30
    )

    mine = [r for r in records(audit, operator_key, key_id=key_id(operator_key)) if merchant_id in r.request_json]
    assert [(r.method, r.outcome) for r in mine] == [
        ("/points.v1.MerchantAdmin/CreateMerchant", "ALREADY_EXISTS"),  # newest first
        ("/points.v1.MerchantAdmin/CreateMerchant", "OK"),
    ]
    assert "exists" in mine[0].message
    created = mine[1]
    assert created.key_id == key_id(operator_key) and created.request_id == "audit-req-1"
    assert json.loads(created.request_json)["merchant"]["name"] == "Cafe"
    assert created.at.seconds > 0
    assert not records(audit, operator_key, method="/points.v1.MerchantAdmin/GetMerchant")


def test_every_operator_service_s_changes_are_recorded(service, audit, channel, operator_key):
    clearing = admin_pb2_grpc.ClearingStub(channel)
    programs = admin_pb2_grpc.ProgramsStub(channel)
    error_of(
        lambda: clearing.CloseSettlementPeriod(
            admin_pb2.CloseSettlementPeriodRequest(), metadata=credential(operator_key), timeout=30
        )
    )
    error_of(
        lambda: programs.SetProgramVersion(
            admin_pb2.SetProgramVersionRequest(program_id="not-this-one"), metadata=credential(operator_key), timeout=30
        )
    )
    outcomes = {r.method: r.outcome for r in records(audit, operator_key)}
    assert outcomes["/points.v1.Clearing/CloseSettlementPeriod"] == "INVALID_ARGUMENT"
    assert outcomes["/points.v1.Programs/SetProgramVersion"] == "INVALID_ARGUMENT"


def test_a_new_key_s_secret_is_never_in_the_trail(service, admin, audit, operator_key):
    merchant_id = unique("m")
    add_merchant(service.database_url, merchant_id)
    issued = admin.IssueApiKey(
        admin_pb2.IssueApiKeyRequest(
            kind=admin_pb2.API_KEY_KIND_MERCHANT, merchant_ids=[merchant_id], description="till"
        ),
        metadata=credential(operator_key),
        timeout=30,
    )
    admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=issued.key_id), metadata=credential(operator_key), timeout=30
    )
    trail = fetch(service.database_url, "SELECT method, request::text AS request FROM audit_records")
    assert any(r["method"] == "/points.v1.MerchantAdmin/IssueApiKey" and merchant_id in r["request"] for r in trail)
    assert any(r["method"] == "/points.v1.MerchantAdmin/RevokeApiKey" and issued.key_id in r["request"] for r in trail)
    secret = issued.key.split("_", 2)[2]
    assert not any(secret in r["request"] for r in trail)


def test_calls_refused_for_their_key_kind_are_recorded_and_unauthenticated_ones_are_not(
    service, admin, audit, operator_key
):
    merchant_id = unique("m")
    merchant_key = add_merchant(service.database_url, merchant_id)
    before = fetch(service.database_url, "SELECT count(*) AS n FROM audit_records")[0]["n"]
    for metadata in ((), credential("pk_0000000000000000_" + "b" * 43)):
        assert (
            error_of(
                lambda: admin.SuspendMerchant(
                    admin_pb2.SuspendMerchantRequest(merchant_id=merchant_id), metadata=metadata, timeout=30
                )
            ).code()
            == grpc.StatusCode.UNAUTHENTICATED
        )
    assert fetch(service.database_url, "SELECT count(*) AS n FROM audit_records")[0]["n"] == before
    assert (
        error_of(
            lambda: admin.SuspendMerchant(
                admin_pb2.SuspendMerchantRequest(merchant_id=merchant_id), metadata=credential(merchant_key), timeout=30
            )
        ).code()
        == grpc.StatusCode.PERMISSION_DENIED
    )
    (record,) = records(audit, operator_key, key_id=key_id(merchant_key))
    assert (record.method, record.outcome) == ("/points.v1.MerchantAdmin/SuspendMerchant", "PERMISSION_DENIED")
    # a key hammering the operator's methods does not grow the table: once a minute per key at most
    for _ in range(5):
        error_of(
            lambda: admin.CreateMerchant(
                admin_pb2.CreateMerchantRequest(
                    merchant=admin_pb2.Merchant(merchant_id=unique("m"), give_back_bps=1000)
                ),
                metadata=credential(merchant_key),
                timeout=30,
            )
        )
    assert len(records(audit, operator_key, key_id=key_id(merchant_key))) == 1


def test_the_audit_service_takes_operator_keys_only(service, audit):
    merchant_key = add_merchant(service.database_url, unique("m"))
    for metadata, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (credential(merchant_key), grpc.StatusCode.PERMISSION_DENIED),
    ):
        error = error_of(
            lambda: audit.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(), metadata=metadata, timeout=30)
        )
        assert error.code() == code


def test_list_audit_records_pages_newest_first(service, admin, audit, operator_key):
    for _ in range(3):
        admin.CreateMerchant(
            admin_pb2.CreateMerchantRequest(merchant=admin_pb2.Merchant(merchant_id=unique("m"), give_back_bps=1000)),
            metadata=credential(operator_key),
            timeout=30,
        )
    seen, token = [], ""
    while True:
        page = audit.ListAuditRecords(
            admin_pb2.ListAuditRecordsRequest(page_size=2, page_token=token),
            metadata=credential(operator_key),
            timeout=30,
        )
        assert len(page.records) <= 2
        seen += [r.audit_id for r in page.records]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) >= 3
    assert seen == [
        r["audit_id"] for r in fetch(service.database_url, "SELECT audit_id FROM audit_records ORDER BY audit_id DESC")
    ]
    for bad in (
        admin_pb2.ListAuditRecordsRequest(page_size=5000),
        admin_pb2.ListAuditRecordsRequest(page_token="not a token"),
    ):
        assert (
            error_of(lambda: audit.ListAuditRecords(bad, metadata=credential(operator_key), timeout=30)).code()
            == grpc.StatusCode.INVALID_ARGUMENT
        )


def test_audit_records_cannot_be_changed_or_deleted(service, admin, operator_key):
    admin.CreateMerchant(
        admin_pb2.CreateMerchantRequest(merchant=admin_pb2.Merchant(merchant_id=unique("m"), give_back_bps=1000)),
        metadata=credential(operator_key),
        timeout=30,
    )
    for statement in ("UPDATE audit_records SET outcome = 'OK'", "DELETE FROM audit_records", "TRUNCATE audit_records"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            fetch(service.database_url, statement)
    assert fetch(service.database_url, "SELECT count(*) AS n FROM audit_records")[0]["n"] > 0


def test_cli_changes_are_recorded_as_cli_and_audit_list_prints_them(service, audit, operator_key):
    url = service.database_url
    merchant_id = unique("m")
    added = cli("merchant", "add", "--merchant-id", merchant_id, "--give-back-bps", "500", "--database-url", url)
    assert added.returncode == 0, added.stderr
    made = cli("key", "create", "--merchant-id", merchant_id, "--description", "pos 7", "--database-url", url)
    assert made.returncode == 0, made.stderr
    new_key = made.stdout.split()[-1]
    revoked = cli("key", "revoke", "--key-id", key_id(new_key), "--database-url", url)
    assert revoked.returncode == 0, revoked.stderr

    listed = cli("audit", "list", "--key-id", "cli", "--database-url", url)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["method"] for line in lines[:3]] == ["cli key revoke", "cli key create", "cli merchant add"]
    assert all(line["key_id"] == "cli" and line["outcome"] == "OK" for line in lines[:3])
    assert lines[1]["request"]["key_id"] == key_id(new_key) and lines[1]["request"]["description"] == "pos 7"
    assert lines[2]["request"]["merchant_id"] == merchant_id
    assert "database_url" not in lines[2]["request"]  # the URL may carry a password
    assert new_key.split("_", 2)[2] not in listed.stdout
    # and the operator sees them through the API
    assert [r.method for r in records(audit, operator_key, key_id="cli")][:3] == [
        "cli key revoke",
        "cli key create",
        "cli merchant add",
    ]

    failed = cli("merchant", "add", "--merchant-id", merchant_id, "--give-back-bps", "500", "--database-url", url)
    assert failed.returncode != 0
    latest = json.loads(cli("audit", "list", "--limit", "1", "--database-url", url).stdout)
    assert (latest["method"], latest["outcome"]) == ("cli merchant add", "FAILED_PRECONDITION")


def test_every_operator_method_is_classified_as_state_changing_or_not():
    from processor import audit

    declared = {f"/{s.full_name}/{m.name}" for s in admin_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods}
    classified = {f"/{s}/{m}" for s, methods in audit.STATE_CHANGING.items() for m in methods}
    assert declared == classified
    assert audit.audited("/points.v1.MerchantAdmin/IssueApiKey")
    assert not audit.audited("/points.v1.MerchantAdmin/GetMerchant")
    assert not audit.audited("/points.v1.PointsService/Earn")  # merchants' calls have their own journal
    assert audit.redact({"a": {"pin": "1234", "key": "pk_x"}, "b": [{"secret": "s"}]}) == {
        "a": {"pin": "[redacted]", "key": "[redacted]"},
        "b": [{"secret": "[redacted]"}],
    }
