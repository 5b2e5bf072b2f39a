"""Pure rules and types of the points ledger. Imports no grpc, asyncpg or prometheus_client.

Units: purchase amounts in currency minor units, points in point-units (100 = 1 point = 1 currency
unit), times in microseconds since the Unix epoch (`*_us`). All int64.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from typing import Any


ASSET_POINTS = "POINTS"
INT64_MAX = 2**63 - 1
BPS_DENOMINATOR = 10_000
# the give-back bounds of a program version that does not set its own (rules.ProgramVersion
# give_back_bps_min/max, issue 16); a version may allow up to GIVE_BACK_BPS_CEILING (100%)
GIVE_BACK_BPS_MIN = 300
GIVE_BACK_BPS_MAX = 2_000
GIVE_BACK_BPS_CEILING = BPS_DENOMINATOR

# Account kinds (accounts.kind).
ACCOUNT_MEMBER = "member"
ACCOUNT_MERCHANT_ISSUED = "merchant_issued"
ACCOUNT_MERCHANT_REDEEMED = "merchant_redeemed"
ACCOUNT_MERCHANT_FEES = "merchant_fees"
ACCOUNT_OPERATOR_FEE_REVENUE = "operator_fee_revenue"
ACCOUNT_OPERATOR_BREAKAGE = "operator_breakage"
ACCOUNT_MERCHANT_ACQUIRING = "merchant_acquiring"  # program rules: rewards owed to an acquiring merchant
OPERATOR_ID = "operator"

TRANSACTION_PREFIX = "txn_"
AUTHORIZATION_PREFIX = "auth_"


class Code(enum.Enum):
    """Outcome of a request. errors.py maps each to one gRPC status code."""

    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class Rejection(Exception):
    """A request the service will not carry out, with a message the caller can act on; and, for a client
    that acts on it by program (sent as google.rpc details, processor/errors.py): `reason`, a stable
    UPPER_SNAKE name from errors.REASONS ("" = the code's default); `field`, the request field at fault;
    `retry_after_seconds`, when a retry may succeed; `quota`, (subject, description) of the limit hit."""

    def __init__(
        self,
        code: Code,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        retry_after_seconds: float | None = None,
        quota: tuple[str, str] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field
        self.retry_after_seconds = retry_after_seconds
        self.quota = quota


def invalid_field(field: str, message: str) -> Rejection:
    """INVALID_ARGUMENT about one request field (its details name it: reason INVALID_FIELD)."""
    return Rejection(Code.INVALID_ARGUMENT, message, reason="INVALID_FIELD", field=field)


class InvariantViolation(Exception):
    """A money invariant does not hold: a bug. The service answers INTERNAL and stops serving."""


def require(condition: bool, message: str) -> None:
    """An invariant check that survives `python -O` (a bare assert does not)."""
    if not condition:
        raise InvariantViolation(message)


def earn_point_units(purchase_amount: int, give_back_bps: int) -> int:
    """Points for a purchase: floor(purchase_amount * give_back_bps / 10000). The fraction of a
    point-unit is rounded down (never credited); integer arithmetic only."""
    require(purchase_amount >= 0, "purchase_amount must be >= 0")
    require(1 <= give_back_bps <= GIVE_BACK_BPS_CEILING, "give_back_bps out of range")
    return purchase_amount * give_back_bps // BPS_DENOMINATOR


def fee_point_units(points: int, fee_bps: int) -> int:
    """The operator's fee on points: floor(points * fee_bps / 10000). The fraction of a point-unit is
    rounded down, in the merchant's favour; fees are not returned when a transaction is refunded."""
    require(points >= 0 and 0 <= fee_bps <= BPS_DENOMINATOR, "fee arguments out of range")
    return points * fee_bps // BPS_DENOMINATOR


def format_transaction_id(transaction_id: int) -> str:
    return f"{TRANSACTION_PREFIX}{transaction_id}"


def format_authorization_id(authorization_id: int) -> str:
    return f"{AUTHORIZATION_PREFIX}{authorization_id}"


def _parse_id(value: str, prefix: str, field: str) -> int:
    digits = value[len(prefix) :] if value.startswith(prefix) else ""
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18 or digits != str(int(digits)):
        raise invalid_field(
            field,
            f"{field} {value[:64]!r} is not an id this service issued "
            f"(expected {prefix}<digits>, as returned by an earlier call)",
        )
    return int(digits)


def parse_transaction_id(value: str, field: str = "transaction_id") -> int:
    return _parse_id(value, TRANSACTION_PREFIX, field)


def parse_authorization_id(value: str, field: str = "authorization_id") -> int:
    return _parse_id(value, AUTHORIZATION_PREFIX, field)


class Method(enum.Enum):
    EARN = "Earn"
    AUTHORIZE = "Authorize"
    CAPTURE = "Capture"
    VOID = "Void"
    REDEEM = "Redeem"
    REFUND = "Refund"
    LINK = "LinkMember"
    CONVERT = "ConvertMerchantPoints"
    SPEND_VOUCHERS = "SpendMerchantVouchers"
    # member administration (MemberAdminService; processor/member_postings.py applies them)
    ADJUST = "AdjustPoints"
    REVERSE = "ReverseTransaction"
    FREEZE = "FreezeMember"
    UNFREEZE = "UnfreezeMember"
    CLOSE_MEMBER = "CloseMember"
    ADD_ALIAS = "AddMemberAlias"
    REMOVE_ALIAS = "RemoveMemberAlias"
    CREATE_HOUSEHOLD = "CreateHousehold"
    JOIN_HOUSEHOLD = "JoinHousehold"
    LEAVE_HOUSEHOLD = "LeaveHousehold"
    TRANSFER = "TransferPoints"
    MERGE = "MergeMembers"


@dataclasses.dataclass(slots=True)
class Outcome:
    """The answer to one operation: code OK with response fields, or an error code with a message.
    This is what the idempotency record stores, and what a replay returns."""

    code: Code
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""
    replayed: bool = False
    # False for refusals about a state that may change (a suspended merchant): the key stays unused
    recorded: bool = True
    # the ledger's reason for a refusal (insufficient_points, hold_expired, ...); "" otherwise
    reason: str = ""
    # a refusal that may pass later: seconds until a retry may succeed (sent as google.rpc.RetryInfo)
    retry_after_seconds: float | None = None
    # a quota refusal: (subject, description) of the quota (sent as google.rpc.QuotaFailure)
    quota: tuple[str, str] | None = None


@dataclasses.dataclass(slots=True)
class Operation:
    """One mutating request, validated, waiting for the pipeline.

    `request` is the canonical form of the request without its key: the idempotency fingerprint.
    """

    method: Method
    merchant_id: str
    merchant_slot: int
    idempotency_key: str
    request: dict[str, Any]
    member_id: str = ""
    points: int = 0  # point-units (earn: computed from the purchase)
    purchase_amount: int = 0  # currency minor units (earn only)
    hold_ttl_seconds: int = 0  # authorize only; resolved to the default before queueing
    authorization_id: int = 0  # capture / void
    transaction_id: int = 0  # refund: the original transaction
    referrer_id: str = ""  # link: the referring member ("" = none)
    merchant_points: int = 0  # conversion: the merchant's own points, in its own programme's units
    vouchers: int = 0  # redeem, authorize, capture: voucher-units besides `points` (a split
    # tender); spend_vouchers: the merchant's voucher-units spent
    at_merchant_id: str = ""  # spend_vouchers: where ("" = the operator's store; issue 16)
    # decided before queueing (member presence refused it): answered after the idempotency look-up, so a
    # retry of an operation already carried out still replays; never recorded under the key
    refusal: Outcome | None = None
    future: asyncio.Future[Outcome] | None = None
    enqueued_at: float = 0.0
    # queued with others of one call (Pipeline.enqueue_many): the call waiting for it (one future for
    # all of them, not one per operation), and its outcome once decided
    call: Any = None
    outcome: Outcome | None = None


def differing_field(stored: dict[str, Any], method: str, request: dict[str, Any], stored_method: str) -> str | None:
    """The first field in which a retried request differs from the one first seen under its key."""
    if stored_method != method:
        return "method"
    for name in sorted(set(stored) | set(request)):
        if stored.get(name) != request.get(name):
            return name
    return None


class TokenBuckets:
    """A token bucket per key (merchant): `rate` tokens a second, at most `burst` saved up. The number
    of buckets is bounded by the number of merchants, which the merchants table bounds."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at monotonic seconds)

    def take(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        # once an operation: no default tuple, float() or min() call (the same arithmetic as before)
        bucket = self._buckets.get(key)
        burst = float(self.burst)
        if bucket is None:
            tokens = burst
        else:
            tokens = bucket[0] + (now - bucket[1]) * self.rate
            if tokens > burst:
                tokens = burst
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def retry_seconds(self, key: str, now: float) -> float:
        """How long until `key`'s bucket holds a whole token again (0: it does now)."""
        if self.rate <= 0:
            return 0.0
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        return max(0.0, (1.0 - tokens) / self.rate)
