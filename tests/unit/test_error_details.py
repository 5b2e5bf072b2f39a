"""processor/errors.py's google.rpc details, without a server: which details each refusal carries, and
that every reason the code names is in the documented table."""

from __future__ import annotations

import pathlib
import re

import grpc
from google.rpc import error_details_pb2, status_pb2

from processor import errors, outcomes
from processor.domain import Code, Outcome, Rejection

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _details(status: grpc.Status) -> tuple[status_pb2.Status, dict]:
    ((key, value),) = [item for item in status.trailing_metadata if item[0] == "grpc-status-details-bin"]
    decoded = status_pb2.Status.FromString(value)
    found = {}
    for packed in decoded.details:
        name = packed.TypeName().rpartition(".")[2]
        found[name] = getattr(error_details_pb2, name)()
        packed.Unpack(found[name])
    return decoded, found


def test_the_code_and_message_are_unchanged_and_repeated_in_the_status():
    status = errors.status(
        Code.FAILED_PRECONDITION,
        "member 'm' has 5 point-units available, 9 asked",
        reason="INSUFFICIENT_POINTS",
        trailing_metadata=(("points-idempotent-replay", "true"),),
    )
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "member 'm' has 5 point-units available, 9 asked"
    assert ("points-idempotent-replay", "true") in status.trailing_metadata
    decoded, found = _details(status)
    assert (decoded.code, decoded.message) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], status.details)
    assert set(found) == {"ErrorInfo"} and found["ErrorInfo"].reason == "INSUFFICIENT_POINTS"


def test_retryable_codes_always_carry_retry_info():
    for code in (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED):
        _, found = _details(errors.rejection_status(Rejection(code, "later")))
        assert found["ErrorInfo"].reason == errors.CODE_REASONS[code]
        delay = found["RetryInfo"].retry_delay
        assert delay.seconds + delay.nanos / 1e9 == errors.RETRY_AFTER_SECONDS_DEFAULT
    _, found = _details(
        errors.outcome_status(
            Outcome(Code.RESOURCE_EXHAUSTED, reason="member_locked", retry_after_seconds=2.5, message="locked")
        )
    )
    assert found["ErrorInfo"].reason == "MEMBER_LOCKED"
    assert (found["RetryInfo"].retry_delay.seconds, found["RetryInfo"].retry_delay.nanos) == (2, 500_000_000)
    _, found = _details(errors.status(Code.FAILED_PRECONDITION, "no"))
    assert found == {}  # nothing to act on beyond code and message: no details


def test_quota_and_field_details():
    _, found = _details(
        errors.rejection_status(
            Rejection(
                Code.RESOURCE_EXHAUSTED,
                "slow down",
                reason="RATE_LIMITED",
                retry_after_seconds=0.0001,
                quota=("merchant:a", "5 operations/s"),
            )
        )
    )
    assert found["RetryInfo"].retry_delay.nanos == 1_000_000  # at least 1 ms
    assert [(v.subject, v.description) for v in found["QuotaFailure"].violations] == [("merchant:a", "5 operations/s")]
    _, found = _details(
        errors.rejection_status(
            Rejection(Code.INVALID_ARGUMENT, "points must be 1..", reason="INVALID_FIELD", field="points")
        )
    )
    assert dict(found["ErrorInfo"].metadata) == {"field": "points"}
    assert found["BadRequest"].field_violations[0].field == "points"


def test_every_reason_the_code_names_is_in_the_table():
    named = set()
    for path in (ROOT / "processor").glob("*.py"):
        named |= set(re.findall(r'reason="([A-Z_]+)"', path.read_text()))
    assert named and named <= set(errors.REASONS), named - set(errors.REASONS)
    # every internal reason of the ledger (the fast path's statuses) has its stable name
    assert set(outcomes._REASON.values()) <= set(errors.OUTCOME_REASONS)
    lowercase = set()
    for path in (ROOT / "processor").glob("*.py"):
        lowercase |= set(re.findall(r'reason="([a-z_]+)"', path.read_text()))
    assert lowercase <= set(errors.OUTCOME_REASONS), lowercase - set(errors.OUTCOME_REASONS)


def test_the_readme_documents_every_reason():
    readme = (ROOT / "docs" / "API.md").read_text()
    missing = [reason for reason in errors.REASONS if f"`{reason}`" not in readme]
    assert not missing, f"docs/API.md's table of error reasons lacks {missing}"
    contract = (ROOT / "proto" / "points" / "v1" / "points.proto").read_text()
    missing = [reason for reason in errors.REASONS if not re.search(rf"\b{reason}\b", contract)]
    assert not missing, f"points.proto's comment on error details lacks {missing}"
