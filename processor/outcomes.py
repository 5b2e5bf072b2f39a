"""Fast-path statuses as outcomes: the reason label and a message the merchant's engineer can act on
("authorization 7f3… expired at 2026-11-23T10:00:00Z; authorize again")."""

from __future__ import annotations

import fastpath
from processor import domain, metrics
from processor.domain import Code, Method, Operation, Outcome
from processor.store import from_micros


_REASON = {
    fastpath.INSUFFICIENT_POINTS: "insufficient_points",
    fastpath.UNKNOWN_MEMBER: "unknown_member",
    fastpath.UNKNOWN_HOLD: "unknown_hold",
    fastpath.HOLD_EXPIRED: "hold_expired",
    fastpath.HOLD_CAPTURED: "hold_captured",
    fastpath.HOLD_VOIDED: "hold_voided",
    fastpath.WRONG_MERCHANT: "wrong_merchant",
    fastpath.CAPTURE_EXCEEDS_HOLD: "capture_exceeds_hold",
    fastpath.UNKNOWN_TRANSACTION: "unknown_transaction",
    fastpath.REFUND_EXCEEDS_REMAINING: "refund_exceeds_remaining",
    fastpath.NOT_REFUNDABLE: "not_refundable",
    fastpath.OVERFLOW: "overflow",
    fastpath.CAPACITY: "capacity",
}


def ledger_rejection(status: int, op: Operation, available: int = 0, expires_at_us: int = 0, held: int = 0) -> Outcome:
    """A fast-path status as an outcome with a message the merchant's engineer can act on. available:
    the member's available balance the refusal saw (INSUFFICIENT_POINTS); expires_at_us and held: the
    hold's (HOLD_EXPIRED, CAPTURE_EXCEEDS_HOLD)."""
    outcome = rejection_message(status, op, available, expires_at_us, held)
    outcome.reason = _REASON.get(status, "other")
    metrics.rejections.labels(outcome.reason).inc()
    return outcome


def rejection_message(status: int, op: Operation, available: int, expires_at_us: int, held: int) -> Outcome:
    authorization = domain.format_authorization_id(op.authorization_id)
    transaction = domain.format_transaction_id(op.transaction_id)
    if status == fastpath.INSUFFICIENT_POINTS:
        if op.method is Method.REFUND:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"the member has already spent the points of {transaction}: "
                f"{op.points} point-units asked back, {available} available",
            )
        return Outcome(
            Code.FAILED_PRECONDITION,
            message=f"member {op.member_id!r} has {available} point-units available, {op.points} asked",
        )
    if status == fastpath.UNKNOWN_MEMBER:
        return Outcome(Code.NOT_FOUND, message=f"member {op.member_id!r} has no points account")
    if status == fastpath.UNKNOWN_HOLD:
        return Outcome(Code.NOT_FOUND, message=f"authorization {authorization} does not exist")
    if status == fastpath.HOLD_EXPIRED:
        when = from_micros(expires_at_us).isoformat().replace("+00:00", "Z") if expires_at_us else "earlier"
        return Outcome(
            Code.FAILED_PRECONDITION, message=f"authorization {authorization} expired at {when}; authorize again"
        )
    if status == fastpath.HOLD_CAPTURED:
        return Outcome(Code.FAILED_PRECONDITION, message=f"authorization {authorization} was already captured")
    if status == fastpath.HOLD_VOIDED:
        return Outcome(Code.FAILED_PRECONDITION, message=f"authorization {authorization} was voided")
    if status == fastpath.WRONG_MERCHANT:
        what = transaction if op.method is Method.REFUND else f"authorization {authorization}"
        return Outcome(
            Code.PERMISSION_DENIED,
            message=f"{what} belongs to another merchant; only that merchant may {op.method.value.lower()} it",
        )
    if status == fastpath.CAPTURE_EXCEEDS_HOLD:
        return Outcome(
            Code.FAILED_PRECONDITION,
            message=f"capture of {op.points} point-units exceeds the {held} held by {authorization}",
        )
    if status == fastpath.UNKNOWN_TRANSACTION:
        return Outcome(Code.NOT_FOUND, message=f"transaction {transaction} does not exist")
    if status == fastpath.REFUND_EXCEEDS_REMAINING:
        return Outcome(
            Code.FAILED_PRECONDITION,
            message=f"refund of {op.points} point-units exceeds what remains unrefunded of {transaction}",
        )
    if status == fastpath.NOT_REFUNDABLE:
        return Outcome(
            Code.FAILED_PRECONDITION,
            message=f"{transaction} is not an earn, capture or redemption (a refund, or a transaction the "
            f"program rules made); only those can be refunded",
        )
    if status == fastpath.OVERFLOW:
        return Outcome(Code.FAILED_PRECONDITION, message="the member's balance would exceed its maximum")
    if status == fastpath.CAPACITY:
        return Outcome(
            Code.RESOURCE_EXHAUSTED,
            message="the service holds its maximum number of members or holds; contact the operator",
        )
    raise domain.InvariantViolation(f"fast path returned unknown status {status}")
