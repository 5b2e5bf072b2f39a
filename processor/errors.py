"""The one table from domain outcome codes to gRPC status codes, and the google.rpc error details sent
beside a refusal's code and message (as Google APIs send them) for a client that acts on it by program:
ErrorInfo (a stable reason from REASONS, domain "points.v1", the field at fault in metadata["field"]),
BadRequest for a field at fault, RetryInfo on RESOURCE_EXHAUSTED and UNAVAILABLE, QuotaFailure for a rate
limit or quota. Clients read them from the `grpc-status-details-bin` trailer
(grpc_status.rpc_status.from_call in Python); the code and message are what they always were."""

from __future__ import annotations

import collections
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from processor.domain import Code, Outcome, Rejection

STATUS = {
    Code.OK: grpc.StatusCode.OK,
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

if set(STATUS) != set(Code):  # checked at import, so a new Code cannot ship without its status
    raise ImportError("errors.STATUS lacks a gRPC status for " + str(set(Code) - set(STATUS)))

ERROR_DOMAIN = "points.v1"
# RetryInfo's delay when the refusal names none (the service is starting, recovering, or at capacity).
RETRY_AFTER_SECONDS_DEFAULT = 1.0

# Every ErrorInfo.reason the service sends: stable names a client may branch on (never renamed; new ones
# only added). docs/API.md lists them too.
REASONS = {
    "INVALID_FIELD": "a request field is missing or out of range; ErrorInfo.metadata['field'] names it",
    "UNDECODABLE_REQUEST": "the request bytes are not the method's message",
    "IDEMPOTENCY_KEY_REUSED": "the idempotency key was first used for a different request; use a new key",
    "RATE_LIMITED": "the merchant's operations per second are used up; retry after RetryInfo's delay",
    "MERCHANT_QUOTA": "one of the merchant's quotas (queue share, new members per hour, open holds) is used up",
    "SERVICE_AT_CAPACITY": "the service's commit queue or ledger is full; retry with backoff",
    "SERVICE_UNAVAILABLE": "the service is starting, recovering or shutting down; retry with the same key",
    "MERCHANT_NOT_FOUND": "the merchant is not in the alliance",
    "KEY_NOT_PERMITTED": "the API key may not act for that merchant, or is of a kind the service does not take",
    "INSUFFICIENT_POINTS": "the member's available points are fewer than asked",
    "INSUFFICIENT_VOUCHERS": "the member's (or merchant's) vouchers are fewer than asked",
    "MEMBER_NOT_FOUND": "the member has no points account",
    "AUTHORIZATION_NOT_FOUND": "no such authorization",
    "HOLD_EXPIRED": "the authorization's hold expired; authorize again",
    "HOLD_ALREADY_CAPTURED": "the authorization was already captured",
    "HOLD_VOIDED": "the authorization was voided",
    "WRONG_MERCHANT": "the authorization or transaction belongs to another merchant",
    "CAPTURE_EXCEEDS_HOLD": "the capture is more than the hold",
    "TRANSACTION_NOT_FOUND": "no such transaction",
    "REFUND_EXCEEDS_REMAINING": "the refund is more than what remains unrefunded",
    "NOT_REFUNDABLE": "the transaction is not an earn, capture or redemption",
    "BALANCE_OVERFLOW": "the member's balance would exceed its maximum",
    "MEMBER_ALREADY_LINKED": "the member is already linked to an acquirer",
    "SPENDING_CAP": "the program's cap on a member's spending per hour or day; RetryInfo says when, if waiting helps",
    "MEMBER_LOCKED": "the member's spending is locked after wrong proofs; RetryInfo says until when",
    "MEMBER_PROOF_REQUIRED": "the program requires the member's proof of presence (a one-time code or PIN)",
    # member administration (issue 15)
    "MEMBER_FROZEN": "the member is frozen: it may earn, not spend or be debited; the operator unfreezes it",
    "MEMBER_CLOSED": "the member is closed; nothing may name it again",
    "SUPPORT_LIMIT": "the support key's per-call or per-day limit on AdjustPoints is used up; ask an operator",
    # the change feed (EventsService.WatchEvents)
    "INVALID_CURSOR": "the cursor was not issued by this feed; send an event's `cursor` as given, or empty",
    "EVENTS_READER_TOO_SLOW": "the stream's buffer stayed full; resume from ErrorInfo.metadata['cursor']",
    "EVENTS_STREAMS_AT_CAPACITY": "the service has as many WatchEvents streams open as it allows; retry later",
    # member administration, reversals (issue 15)
    "TRANSACTION_NOT_REVERSIBLE": "ReverseTransaction cannot mirror this transaction whole; the message says why",
}
# The ledger's internal reasons (Outcome.reason, also the points_rejections_total label) -> REASONS.
OUTCOME_REASONS = {
    "insufficient_points": "INSUFFICIENT_POINTS",
    "insufficient_vouchers": "INSUFFICIENT_VOUCHERS",
    "unknown_member": "MEMBER_NOT_FOUND",
    "unknown_hold": "AUTHORIZATION_NOT_FOUND",
    "hold_expired": "HOLD_EXPIRED",
    "hold_captured": "HOLD_ALREADY_CAPTURED",
    "hold_voided": "HOLD_VOIDED",
    "wrong_merchant": "WRONG_MERCHANT",
    "capture_exceeds_hold": "CAPTURE_EXCEEDS_HOLD",
    "unknown_transaction": "TRANSACTION_NOT_FOUND",
    "refund_exceeds_remaining": "REFUND_EXCEEDS_REMAINING",
    "not_refundable": "NOT_REFUNDABLE",
    "overflow": "BALANCE_OVERFLOW",
    "capacity": "SERVICE_AT_CAPACITY",
    "already_linked": "MEMBER_ALREADY_LINKED",
    "spending_cap": "SPENDING_CAP",
    "member_locked": "MEMBER_LOCKED",
    "member_presence": "MEMBER_PROOF_REQUIRED",
    "merchant_quota": "MERCHANT_QUOTA",
    "member_frozen": "MEMBER_FROZEN",
    "member_closed": "MEMBER_CLOSED",
    "not_reversible": "TRANSACTION_NOT_REVERSIBLE",
}
# The reason of a refusal that names none.
CODE_REASONS = {Code.UNAVAILABLE: "SERVICE_UNAVAILABLE", Code.RESOURCE_EXHAUSTED: "SERVICE_AT_CAPACITY"}
_RETRYABLE = frozenset({Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE})

_unknown = (set(OUTCOME_REASONS.values()) | set(CODE_REASONS.values())) - set(REASONS)
if _unknown:  # checked at import, like STATUS
    raise ImportError(f"errors.REASONS lacks {sorted(_unknown)}")


def grpc_status(code: Code) -> grpc.StatusCode:
    return STATUS[code]


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    micros = max(1000, math.ceil(seconds * 1_000_000))  # at least 1 ms: "now" helps no client
    return duration_pb2.Duration(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def status(
    code: Code,
    message: str,
    *,
    reason: str = "",
    field: str = "",
    retry_after_seconds: float | None = None,
    quota: tuple[str, str] | None = None,
    trailing_metadata=(),
    metadata: dict[str, str] | None = None,
) -> grpc.Status:
    """The grpc.Status of a refusal: `code` and `message` as always, and the google.rpc details its
    reason, field, retry delay and quota call for, in the grpc-status-details-bin trailer."""
    reason = reason or CODE_REASONS.get(code, "")
    details = []
    if reason:
        details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=reason,
                    domain=ERROR_DOMAIN,
                    metadata={**({"field": field} if field else {}), **(metadata or {})},
                )
            )
        )
    if field and code is Code.INVALID_ARGUMENT:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]
                )
            )
        )
    if code in _RETRYABLE:
        delay = RETRY_AFTER_SECONDS_DEFAULT if retry_after_seconds is None else retry_after_seconds
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_duration(delay))))
    if quota is not None:
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[error_details_pb2.QuotaFailure.Violation(subject=quota[0], description=quota[1])]
                )
            )
        )
    grpc_code = STATUS[code]
    encoded = status_pb2.Status(code=grpc_code.value[0], message=message, details=details).SerializeToString()
    return _Status(grpc_code, message, (*tuple(trailing_metadata), ("grpc-status-details-bin", encoded)))


def rejection_status(rejection: Rejection, trailing_metadata=()) -> grpc.Status:
    return status(
        rejection.code,
        rejection.message,
        reason=rejection.reason,
        field=rejection.field,
        retry_after_seconds=rejection.retry_after_seconds,
        quota=rejection.quota,
        trailing_metadata=trailing_metadata,
    )


def outcome_status(outcome: Outcome, trailing_metadata=()) -> grpc.Status:
    """The status of a refused operation (PointsService): its ledger reason as a stable one; an
    ALREADY_EXISTS outcome is always an idempotency key used for a different request."""
    reason = OUTCOME_REASONS.get(outcome.reason, "")
    if not reason and outcome.code is Code.ALREADY_EXISTS:
        reason = "IDEMPOTENCY_KEY_REUSED"
    return status(
        outcome.code,
        outcome.message,
        reason=reason,
        retry_after_seconds=outcome.retry_after_seconds,
        quota=outcome.quota,
        trailing_metadata=trailing_metadata,
    )
