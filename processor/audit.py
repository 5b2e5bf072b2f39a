"""The audit trail of the operator's changes: which methods change state, the append-only
`audit_records` table (migration 0010), and AuditService, which reads it.

Every call of a state-changing operator method made with a valid operator key is recorded by the RPC
interceptor (processor/rpc.py) once it has ended, whatever its outcome; a call with a key of the wrong kind
is recorded too, at most once a minute per key; the CLI records its own state-changing commands with
key_id "cli". Requests are stored as JSON with their secrets redacted and their size
bounded. Calls refused before authentication (no key, a wrong key) are not recorded: a flood of bad keys
must not grow the table.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging

from google.protobuf import json_format, timestamp_pb2

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc
from processor.domain import Code, Rejection

log = logging.getLogger("points.audit")

CLI_KEY_ID = "cli"
REDACTED = "[redacted]"
# Field names whose values are secrets: never stored, at any depth of a request.
SECRET_FIELDS = frozenset({"key", "secret", "pin", "new_pin", "password", "secret_sha256"})
REQUEST_BYTES_MAX = 64 * 1024
PAGE_DEFAULT, PAGE_MAX = 100, 1000
TEXT_BYTES_MAX = 200

# Every method of every operator service, classified: True = it changes state (audited), False = a read.
# Checked at import against the services admin.proto declares, so a new method cannot ship unclassified.
STATE_CHANGING: dict[str, dict[str, bool]] = {
    "points.v1.MerchantAdmin": {
        "CreateMerchant": True,
        "UpdateMerchant": True,
        "SuspendMerchant": True,
        "GetMerchant": False,
        "ListMerchants": False,
        "IssueApiKey": True,
        "RevokeApiKey": True,
    },
    "points.v1.Clearing": {
        "GetMerchantPosition": False,
        "CloseSettlementPeriod": True,
        "GetStatement": False,
        "ListStatements": False,
        "ExportStatement": False,
    },
    "points.v1.Programs": {"SetProgramVersion": True, "GetProgram": False},
    # the STANDARD-named twins of the three above (processor/admin.py): classified as their twins
    "points.v1.MerchantAdminService": {
        "CreateMerchant": True,
        "UpdateMerchant": True,
        "SuspendMerchant": True,
        "GetMerchant": False,
        "ListMerchants": False,
        "IssueApiKey": True,
        "RevokeApiKey": True,
    },
    "points.v1.ClearingService": {
        "GetMerchantPosition": False,
        "CloseSettlementPeriod": True,
        "GetStatement": False,
        "ListStatements": False,
        "ExportStatement": False,
    },
    "points.v1.ProgramsService": {"SetProgramVersion": True, "GetProgram": False},
    "points.v1.AuditService": {"ListAuditRecords": False},
    "points.v1.MemberAdminService": {
        "EnrollMemberTotp": True,
        "SetMemberPin": True,
        "ResetMemberVerification": True,
        "GetMemberVerification": False,
        # member administration (issue 15)
        "AdjustPoints": True,
        "ReverseTransaction": True,
        "FreezeMember": True,
        "UnfreezeMember": True,
        "CloseMember": True,
        "GetBalance": False,
        "ListTransactions": False,
        "AddMemberAlias": True,
        "RemoveMemberAlias": True,
        "CreateHousehold": True,
        "JoinHousehold": True,
        "LeaveHousehold": True,
        "TransferPoints": True,
        "MergeMembers": True,
    },
    # issue 16 (processor/channel.py); SetGiveBack is recorded for merchant keys too (the service takes them)
    "points.v1.ChannelService": {
        "RegisterPromoter": True,
        "AssignMerchantPromoter": True,
        "CreateRegion": True,
        "ListRegions": False,
        "RegisterRegionalAgent": True,
        "GetChannelStatement": False,
        "ListChannelStatements": False,
        "ExportChannelStatement": False,
        "SetGiveBack": True,
        "GetAllianceReport": False,
    },
}


def _check_table() -> None:
    declared = {
        service.full_name: {m.name for m in service.methods} for service in pb.DESCRIPTOR.services_by_name.values()
    }
    streaming = {
        f"{service.full_name}/{m.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for m in service.methods
        if m.client_streaming or m.server_streaming
    }
    audited_streams = {
        name for name in streaming if STATE_CHANGING.get(name.rpartition("/")[0], {}).get(name.rpartition("/")[2])
    }
    if audited_streams:  # the interceptor records unary calls only
        raise ImportError(f"state-changing streaming operator methods are not audited yet: {sorted(audited_streams)}")
    classified = {service: set(methods) for service, methods in STATE_CHANGING.items()}
    if declared != classified:
        missing = {f"{s}/{m}" for s, ms in declared.items() for m in ms - classified.get(s, set())}
        extra = {f"{s}/{m}" for s, ms in classified.items() for m in ms - declared.get(s, set())}
        raise ImportError(
            f"audit.STATE_CHANGING must classify every operator method (state-changing or not): "
            f"unclassified {sorted(missing)}, not declared {sorted(extra)}"
        )


_check_table()


def audited(full_method: str) -> bool:
    """Whether calls of `/package.Service/Method` are recorded."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return STATE_CHANGING.get(service, {}).get(method, False)


def redact(value):
    """`value` (JSON-like) with every secret field's value replaced by REDACTED."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_FIELDS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def request_json(request) -> str:
    """The request as bounded JSON text: a message with its .proto field names, or a plain dict (the
    CLI's arguments); secrets redacted."""
    if hasattr(request, "DESCRIPTOR"):
        value = json_format.MessageToDict(request, preserving_proto_field_name=True)
    else:
        value = request
    text = json.dumps(redact(value), sort_keys=True, default=str)
    if len(text.encode()) > REQUEST_BYTES_MAX:
        data = text.encode()
        text = json.dumps({"truncated": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return text


class AuditLog:
    """Writes and reads audit_records through the store's pool (operator calls are few)."""

    def __init__(self, store=None):
        self.store = store

    async def record(
        self, key_id: str, method: str, request, outcome: str, message: str = "", request_id: str = ""
    ) -> None:
        if self.store is None:  # a call while the service starts (answered UNAVAILABLE)
            raise RuntimeError("the database is not open yet")
        await self.store.pool.execute(
            """INSERT INTO audit_records (key_id, method, request, outcome, message, request_id)
               VALUES ($1, $2, $3::jsonb, $4, $5, $6)""",
            key_id,
            method,
            request_json(request),
            outcome,
            (message or "")[:4096],
            request_id,
        )

    async def records(
        self, key_id: str = "", method: str = "", before: int | None = None, limit: int = PAGE_DEFAULT
    ) -> list:
        """Newest first; `before`: only audit ids below it."""
        return await self.store.pool.fetch(
            """SELECT audit_id, at, key_id, method, request::text AS request, outcome, message, request_id
               FROM audit_records
               WHERE ($1 = '' OR key_id = $1) AND ($2 = '' OR method = $2)
                 AND ($3::bigint IS NULL OR audit_id < $3)
               ORDER BY audit_id DESC LIMIT $4""",
            key_id,
            method,
            before,
            limit,
        )


def _timestamp(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class AuditServicer(admin_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit_log: AuditLog, pipeline):
        self.audit_log = audit_log
        self.pipeline = pipeline

    async def ListAuditRecords(self, request, context):
        from processor.servicer import guard

        async def call():
            self.pipeline.ready_store()  # UNAVAILABLE while starting
            size = request.page_size or PAGE_DEFAULT
            if not 1 <= size <= PAGE_MAX:
                raise Rejection(Code.INVALID_ARGUMENT, f"page_size must be 0 (default {PAGE_DEFAULT})..{PAGE_MAX}")
            for name in ("key_id", "method"):
                if len(getattr(request, name).encode()) > TEXT_BYTES_MAX:
                    raise Rejection(Code.INVALID_ARGUMENT, f"{name} must be at most {TEXT_BYTES_MAX} bytes")
            before = None
            if request.page_token:
                try:
                    text = base64.urlsafe_b64decode(request.page_token.encode("ascii")).decode()
                except (ValueError, UnicodeError):
                    text = ""
                if not (text.isascii() and text.isdigit() and len(text) <= 18):
                    raise Rejection(
                        Code.INVALID_ARGUMENT,
                        "page_token is not one this service issued; pass "
                        "next_page_token from the previous response, or empty",
                    )
                before = int(text)
            rows = await self.audit_log.records(request.key_id, request.method, before, size + 1)
            more = len(rows) > size
            rows = rows[:size]
            return pb.ListAuditRecordsResponse(
                records=[
                    pb.AuditRecord(
                        audit_id=r["audit_id"],
                        at=_timestamp(r["at"]),
                        key_id=r["key_id"],
                        method=r["method"],
                        request_json=r["request"],
                        outcome=r["outcome"],
                        message=r["message"],
                        request_id=r["request_id"],
                    )
                    for r in rows
                ],
                next_page_token=base64.urlsafe_b64encode(str(rows[-1]["audit_id"]).encode()).decode() if more else "",
            )

        return await guard(context, call)
