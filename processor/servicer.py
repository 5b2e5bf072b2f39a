"""PointsService: proto ⇄ domain, nothing else. Validation of request fields happens here, before
anything is queued; money decisions happen in the pipeline and the fast path."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import gc
import logging
import re
import time

import grpc
from google.protobuf import timestamp_pb2

import fastpath
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from processor import domain, kinds, metrics, rpc, rules
from processor.config import Settings
from processor.presence import Presence
from processor.domain import Code, Method, Operation, Outcome, Rejection
from processor.errors import grpc_status, outcome_status, rejection_status, status
from processor.pipeline import Pipeline, now_micros
from processor.store import MerchantRow, Store, micros

# SubmitBatch's intake and answer in C with the compiled fast path; POINTS_FASTPATH=python runs the
# Python path below for every operation (the twin fastpath/intake.pyx is compared with)
if fastpath.IMPLEMENTATION == "cython":
    from fastpath.intake import Intake
else:
    Intake = None  # type: ignore[assignment,misc]

log = logging.getLogger("points.servicer")
_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]+")
# printable ASCII, no spaces (Validator.idempotency_key checks the same by str methods; the tests compare)
_KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
_PAGE_TOKEN_PREFIX = b"points.v1/transactions/"
_EMPTY_OPERATION = pb.OperationResult(
    outcome=pb.OPERATION_OUTCOME_INVALID,
    status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
    message="empty operation: set one of earn, authorize, capture, void, redeem, refund",
)
_INTERNAL = Outcome(Code.INTERNAL, message="internal error; the operation was not applied")
_INTERNAL_RESULT = pb.OperationResult(
    outcome=pb.OPERATION_OUTCOME_RETRY,
    status_code=grpc.StatusCode.INTERNAL.value[0],
    message="internal error; the operation was not applied",
)

EXPIRING_WITHIN_DAYS_DEFAULT, EXPIRING_WITHIN_DAYS_MAX = 30, 3660
# SubmitBatch's collected member presence checks (see PointsServicer._present); None elsewhere
_deferred_presence: contextvars.ContextVar[list | None] = contextvars.ContextVar("deferred_presence", default=None)


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


async def guard(context: grpc.aio.ServicerContext, call):
    """Runs a handler body; a Rejection becomes its gRPC status and message, with its google.rpc details
    (processor/errors.py)."""
    try:
        return await call()
    except Rejection as rejection:
        await context.abort_with_status(rejection_status(rejection))


async def projected_store(pipeline: Pipeline) -> Store:
    """The store, for a read that must show the caller's acknowledged operations (histories, positions,
    statements, the reports of a cut): once every operation answered before this call is in its relational
    rows (pipeline.projected(): bounded, else Rejection UNAVAILABLE, as ready_store() while recovering)."""
    store = pipeline.ready_store()
    await pipeline.projected()
    return store


# Identifiers a Validator has found valid, at most (a set probe instead of the regex for the members and
# merchants that come again; cleared when full): ~64 bytes of set slot and string each, a few MiB at most
VALID_IDENTIFIERS_MAX = 65_536


class Validator:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._valid: set[str] = set()  # identifiers found valid (bounded: VALID_IDENTIFIERS_MAX)

    def identifier(self, value: str, field: str) -> str:
        if value in self._valid:  # measured: ~30 ns against ~300 for the regex; ids repeat (Zipf members)
            return value
        limit = self.settings.id_bytes_max
        if not value:
            raise domain.invalid_field(field, f"{field} is required")
        if len(value) > limit or not _ID_PATTERN.fullmatch(value):
            raise domain.invalid_field(field, f"{field} must be 1..{limit} characters of letters, digits and -_.:@")
        if len(self._valid) >= VALID_IDENTIFIERS_MAX:
            self._valid.clear()
        self._valid.add(value)
        return value

    def idempotency_key(self, value: str) -> str:
        limit = self.settings.idempotency_key_bytes_max
        if not value:
            raise domain.invalid_field(
                "idempotency_key", "idempotency_key is required: send a unique key per operation and reuse it on retry"
            )
        # printable ASCII without spaces (0x21..0x7e) by three str methods in C: ~150 ns against ~530 for
        # the regex it replaced (the same strings pass: tests/unit/test_servicer_fast_path.py)
        if len(value) > limit or not (value.isascii() and value.isprintable() and " " not in value):
            raise domain.invalid_field(
                "idempotency_key", f"idempotency_key must be 1..{limit} printable ASCII characters without spaces"
            )
        return value

    def amount(self, value: int, field: str, limit: int, unit: str, zero_allowed: bool = False) -> int:
        low = 0 if zero_allowed else 1
        if not low <= value <= limit:
            raise domain.invalid_field(field, f"{field} must be {low}..{limit} {unit}, got {value}")
        return value


_TRANSACTION_PREFIX = domain.TRANSACTION_PREFIX
# The field order _earn_now and _redeem_now build Operations in, every field positionally: a field added,
# removed or moved fails the import here rather than shifting their values into the wrong fields
_OPERATION_FIELDS = (
    "method merchant_id merchant_slot idempotency_key request member_id points purchase_amount hold_ttl_seconds "
    "authorization_id transaction_id referrer_id merchant_points vouchers at_merchant_id refusal future enqueued_at "
    "call outcome"
).split()
if [field.name for field in dataclasses.fields(Operation)] != _OPERATION_FIELDS:
    raise ImportError(
        "servicer: Operation's fields changed; update _earn_now and _redeem_now, which pass every field "
        "positionally in that order, and _OPERATION_FIELDS (processor/servicer.py)"
    )


def _fill_earn_response(response: pb.EarnResponse, f: dict) -> None:
    """An EarnResponse's fields set in place, in the message it belongs to (an OperationResult's earn):
    measured, ~2.8 µs against ~12 for building it and its Timestamp by keywords then handing it to
    OperationResult's constructor (which copies it). The same message, byte for byte
    (tests/unit/test_servicer_fast_path.py); setting a field to its default still makes it present
    (transaction_id, never empty, makes it present anyway). The optional fields are set only when not
    at their default: proto3 does not send a default, so the bytes are the same, a setter fewer or two."""
    response.transaction_id = f"{_TRANSACTION_PREFIX}{f['transaction_id']}"  # domain.format_transaction_id
    response.points = f["points"]
    response.balance = f["balance"]
    response.give_back_bps = f["give_back_bps"]
    created_at_us = f["created_at_us"]
    created_at = response.created_at
    created_at.seconds = created_at_us // 1_000_000  # as timestamp() does
    created_at.nanos = (created_at_us % 1_000_000) * 1000
    bonus_points = f.get("bonus_points")
    if bonus_points:
        response.bonus_points = bonus_points
    level = f.get("level")
    if level:
        response.level = level


def _fill_redeem_response(response: pb.RedeemResponse, f: dict) -> None:
    """A RedeemResponse's fields set in place (see _fill_earn_response)."""
    response.transaction_id = f"{_TRANSACTION_PREFIX}{f['transaction_id']}"
    response.points = f["points"]
    response.balance = f["balance"]
    response.available = f["available"]
    if len(f) > 4:  # the four above are required: with no more, none of these is there (points only)
        response.vouchers = f.get("vouchers", 0)
        response.voucher_balance = f.get("voucher_balance", 0)
        response.voucher_credit_used = f.get("voucher_credit_used", 0)


_FILL = {
    "earn": _fill_earn_response,
    "redeem": _fill_redeem_response,
}  # OperationResult's oneof name -> its response's filler


def _collector_paused() -> bool:
    """Pauses the cyclic collector for a loop that makes an object or more per operation, all of which
    live on (the operations queued, the results sent): collecting during it only walks them again and
    promotes them. Returns whether it was collecting: the caller re-enables it then, in a finally.
    (Measured, loadtest/bench_servicer.py: the collector took ~4 of ~16 µs an operation of SubmitBatch.)"""
    collecting = gc.isenabled()
    gc.disable()
    return collecting


class _MerchantNotLoaded(Exception):
    """A request's merchant is not in memory: the builder is run again once it is read from Postgres."""

    def __init__(self, merchant_id: str):
        super().__init__(merchant_id)
        self.merchant_id = merchant_id


class PointsServicer(points_pb2_grpc.PointsServiceServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline, presence: Presence | None = None):
        self.settings = settings
        self.pipeline = pipeline
        self.presence = presence or Presence(settings, pipeline)
        self.validate = Validator(settings)
        self.rate_limits = domain.TokenBuckets(
            settings.merchant_operations_per_second, settings.merchant_burst_operations
        )
        self._kinds = {  # Operation's oneof names -> (build the Operation, build the response)
            "earn": (self._earn, self._earn_response),
            "authorize": (self._authorize, self._authorize_response),
            "capture": (self._capture, self._capture_response),
            "void": (self._void, self._void_response),
            "redeem": (self._redeem, self._redeem_response),
            "refund": (self._refund, self._refund_response),
            "link": (self._link, self._link_response),
            "convert": (self._convert, self._convert_response),
            "spend_vouchers": (self._spend_vouchers, self._spend_vouchers_response),
        }
        # SubmitBatch's common earns and redeems, and its response (fastpath/intake.pyx); None: Python
        self._intake = (
            Intake(
                Operation,
                Method.EARN,
                Method.REDEEM,
                settings,
                self.rate_limits,
                self._admitted,
                self._rate_limited_result,
            )
            if Intake is not None
            else None
        )

    # --- helpers ---

    def _checked_merchant(
        self, request, merchant_id: str, checked: dict[str, MerchantRow] | None = None
    ) -> tuple[str, MerchantRow]:
        """The common part of a mutating request, decided with no await: its merchant id and key valid,
        its merchant known, the caller allowed to act for it, the merchant within its rate limit.
        Returns (idempotency key, merchant). Raises _MerchantNotLoaded for a merchant not in memory
        (the caller awaits _load_merchant, which reads Postgres, then calls this again).

        `checked` (SubmitBatch's): the merchants that passed the checks that cannot change without an
        await (id valid, known, the service ready, the caller allowed) since the caller last awaited;
        the caller empties it after each await. A merchant found there costs only its key's check and
        its rate limit (its operations come by the hundred a batch: a few hundred ns an operation)."""
        merchant = checked.get(merchant_id) if checked is not None else None
        if merchant is not None:
            key = self.validate.idempotency_key(request.idempotency_key)
        else:
            merchant_id = self.validate.identifier(merchant_id, "merchant_id")
            key = self.validate.idempotency_key(request.idempotency_key)
            merchant = self._admission(merchant_id)
            if checked is not None:
                checked[merchant_id] = merchant
        now = time.monotonic()
        if not self.rate_limits.take(merchant_id, now):
            raise self._rate_refusal(merchant_id, now)
        return key, merchant

    def _admission(self, merchant_id: str) -> MerchantRow:
        """A merchant with a valid id, admitted with no await: in memory (else _MerchantNotLoaded), the
        service ready (else UNAVAILABLE), the caller allowed to act for it (else PERMISSION_DENIED)."""
        pipeline = self.pipeline
        # a known merchant without a coroutine (one an operation); ready_store() still answers
        # UNAVAILABLE while the service recovers, as pipeline.merchant() does
        merchant = pipeline.merchants.by_id.get(merchant_id)
        if merchant is None:
            raise _MerchantNotLoaded(merchant_id)
        pipeline.ready_store()
        caller = rpc.principal.get()
        if caller is None or not caller.may_act_for(merchant_id):
            raise Rejection(
                Code.PERMISSION_DENIED,
                f"this API key may not act for merchant {merchant_id!r}; use that merchant's key "
                "or a gateway key that lists it",
                reason="KEY_NOT_PERMITTED",
                field="merchant_id",
            )
        return merchant

    def _admitted(self, merchant_id: str, checked: dict[str, MerchantRow]) -> MerchantRow | None:
        """fastpath.intake's question for a merchant not yet in `checked`: _admission's answer, kept in
        `checked`; None when _admission refuses (the Python path then refuses the operation with its message)."""
        try:
            merchant = self._admission(merchant_id)
        except (Rejection, _MerchantNotLoaded):
            return None
        checked[merchant_id] = merchant
        return merchant

    def _rate_refusal(self, merchant_id: str, now: float) -> Rejection:
        """The refusal of an operation whose merchant's token bucket was empty at `now` (counted)."""
        metrics.operations_rate_limited.inc()
        retry = self.rate_limits.retry_seconds(merchant_id, now)
        return Rejection(
            Code.RESOURCE_EXHAUSTED,
            f"merchant {merchant_id!r} exceeds its limit of "
            f"{self.settings.merchant_operations_per_second:g} operations/s (burst "
            f"{self.settings.merchant_burst_operations}); retry in {max(retry, 0.001):.3f} s",
            reason="RATE_LIMITED",
            retry_after_seconds=retry,
            quota=(
                f"merchant:{merchant_id}",
                f"{self.settings.merchant_operations_per_second:g} operations/s, burst "
                f"{self.settings.merchant_burst_operations} (merchant_operations_per_second)",
            ),
        )

    def _rate_limited_result(self, merchant_id: str, now: float, kind: str) -> pb.OperationResult:
        """fastpath.intake's answer for an operation refused a token: SubmitBatch's result for it."""
        rejection = self._rate_refusal(merchant_id, now)
        return self._to_result(kind, Outcome(rejection.code, message=rejection.message))

    def _redeems_in_intake(self) -> bool:
        """Whether fastpath.intake may build redeems: no version of the program requires member presence
        for spending, so _presence_check answers None for every redeem (else the Python path builds them)."""
        book = self.pipeline.program.program
        return book is None or all(v.member_verification != rules.VERIFICATION_SPENDING for v in book.versions)

    async def _load_merchant(self, merchant_id: str) -> None:
        """Reads a merchant not in memory from Postgres (pipeline.merchant() keeps it), or NOT_FOUND."""
        if await self.pipeline.merchant(merchant_id) is None:
            raise Rejection(
                Code.NOT_FOUND,
                f"merchant {merchant_id!r} is not in the alliance; "
                "the operator adds merchants (python -m processor merchant add)",
                reason="MERCHANT_NOT_FOUND",
                field="merchant_id",
            )

    async def _operation(self, method: Method, request, merchant_id: str, fields: dict, **values) -> Operation:
        """Validates the common part of a mutating request and builds its Operation."""
        try:
            key, merchant = self._checked_merchant(request, merchant_id)
        except _MerchantNotLoaded:
            await self._load_merchant(merchant_id)
            key, merchant = self._checked_merchant(request, merchant_id)
        # the first five positionally (Operation's field order): a sixth of this function's time went
        # to building the keyword arguments
        return Operation(method, merchant_id, merchant.merchant_slot, key, fields, **values)

    async def _built(self, build, request) -> Operation:
        """An Operation from one of the builders that decide with no await (_earn_now, _redeem_now): once
        more after reading its merchant from Postgres when it was not in memory."""
        try:
            return build(request)
        except _MerchantNotLoaded as missing:
            await self._load_merchant(missing.merchant_id)
            return build(request)

    def _presence_check(self, op: Operation, proof: pb.MemberProof) -> tuple | None:
        """The member presence check (processor/presence.py) `op` needs, or None: only when the program
        in force requires the member at the till for spending."""
        now_us = now_micros()
        version = self.pipeline.program.version(now_us)
        if version is None or version.member_verification != rules.VERIFICATION_SPENDING:
            return None
        kind = proof.WhichOneof("proof")
        return (op, version, kind, getattr(proof, kind) if kind else "", now_us)

    async def _present(self, op: Operation, proof: pb.MemberProof) -> Operation:
        """Member presence (processor/presence.py): sets op.refusal when the program requires the member
        at the till and the proof does not show it. Within SubmitBatch the check is only collected (the
        batch runs its checks side by side before queueing)."""
        check = self._presence_check(op, proof)
        if check is None:
            return op
        deferred = _deferred_presence.get()
        if deferred is not None:
            deferred.append(check)
        else:
            await self.presence.check(*check)
        return op

    async def _submit(self, op: Operation, context: grpc.aio.ServicerContext) -> Outcome:
        # pipeline.enqueue is submit() without its coroutine; shield: a caller that goes away does not
        # cancel the operation's own future (its batch still resolves it)
        outcome = await asyncio.shield(self.pipeline.enqueue(op))
        trailer = ()
        if outcome.replayed:
            metrics.idempotent_replays.inc()
            trailer = (("points-idempotent-replay", "true"),)
        if outcome.code is not Code.OK:
            await context.abort_with_status(outcome_status(outcome, trailing_metadata=trailer))
        if trailer:
            context.set_trailing_metadata(trailer)
        return outcome

    # --- building operations and responses, shared by the unary calls, SubmitBatch and Stream ---

    async def _earn(self, request: pb.EarnRequest) -> Operation:
        return await self._built(self._earn_now, request)

    def _earn_now(self, request: pb.EarnRequest, checked: dict[str, MerchantRow] | None = None) -> Operation:
        """An Earn's Operation, decided with no await (`checked`: see _checked_merchant)."""
        validate = self.validate
        member_id = validate.identifier(request.member_id, "member_id")
        purchase = request.purchase_amount
        if not 1 <= purchase <= self.settings.purchase_amount_max:  # the common case without a call
            validate.amount(purchase, "purchase_amount", self.settings.purchase_amount_max, "currency minor units")
        merchant_id = request.merchant_id
        key, merchant = self._checked_merchant(request, merchant_id, checked)
        # every field positionally, in Operation's field order: keywords cost a third more, and the
        # defaults filled in by __init__ another ~0.2 µs (tests/unit/test_servicer_fast_path.py compares
        # with the keyword constructor)
        return Operation(
            Method.EARN,
            merchant_id,
            merchant.merchant_slot,
            key,
            {"member_id": member_id, "purchase_amount": purchase},
            member_id,
            domain.earn_point_units(purchase, merchant.give_back_bps),
            purchase,
            0,
            0,
            0,
            "",
            0,
            0,
            "",
            None,
            None,
            0.0,
            None,
            None,
        )

    @staticmethod
    def _earn_response(f: dict) -> pb.EarnResponse:
        response = pb.EarnResponse()
        _fill_earn_response(response, f)
        return response

    async def _authorize(self, request: pb.AuthorizeRequest) -> Operation:
        member_id = self.validate.identifier(request.member_id, "member_id")
        vouchers = self.validate.amount(
            request.vouchers, "vouchers", self.settings.points_max, "voucher-units", zero_allowed=True
        )
        points = self.validate.amount(
            request.points, "points", self.settings.points_max, "point-units", zero_allowed=vouchers > 0
        )
        ttl = request.hold_ttl_seconds
        if ttl < 0 or ttl > self.settings.hold_ttl_seconds_max:
            raise domain.invalid_field(
                "hold_ttl_seconds",
                f"hold_ttl_seconds must be 0 (default {self.settings.hold_ttl_seconds_default}) "
                f"..{self.settings.hold_ttl_seconds_max} seconds, got {ttl}",
            )
        fields = {"member_id": member_id, "points": points, "hold_ttl_seconds": ttl}
        if vouchers:  # only then: a retry of a points-only authorize keeps its original fingerprint
            fields["vouchers"] = vouchers
        return await self._present(
            await self._operation(
                Method.AUTHORIZE,
                request,
                request.merchant_id,
                fields,
                member_id=member_id,
                points=points,
                vouchers=vouchers,
                hold_ttl_seconds=ttl or self.settings.hold_ttl_seconds_default,
            ),
            request.member_proof,
        )

    @staticmethod
    def _authorize_response(f: dict) -> pb.AuthorizeResponse:
        return pb.AuthorizeResponse(
            authorization_id=domain.format_authorization_id(f["authorization_id"]),
            available=f["available"],
            points=f["points"],
            expires_at=timestamp(f["expires_at_us"]),
            vouchers=f.get("vouchers", 0),
            voucher_available=f.get("voucher_available", 0),
        )

    async def _capture(self, request: pb.CaptureRequest) -> Operation:
        authorization_id = domain.parse_authorization_id(request.authorization_id)
        points = self.validate.amount(
            request.points, "points", self.settings.points_max, "point-units", zero_allowed=True
        )
        vouchers = self.validate.amount(
            request.vouchers, "vouchers", self.settings.points_max, "voucher-units", zero_allowed=True
        )
        fields = {"authorization_id": request.authorization_id, "points": points}
        if vouchers:
            fields["vouchers"] = vouchers
        return await self._operation(
            Method.CAPTURE,
            request,
            request.merchant_id,
            fields,
            authorization_id=authorization_id,
            points=points,
            vouchers=vouchers,
        )

    @staticmethod
    def _capture_response(f: dict) -> pb.CaptureResponse:
        return pb.CaptureResponse(
            transaction_id=domain.format_transaction_id(f["transaction_id"]) if f["transaction_id"] else "",
            points=f["points"],
            released=f["released"],
            balance=f["balance"],
            available=f["available"],
            vouchers=f.get("vouchers", 0),
            vouchers_released=f.get("vouchers_released", 0),
        )

    async def _void(self, request: pb.VoidRequest) -> Operation:
        authorization_id = domain.parse_authorization_id(request.authorization_id)
        return await self._operation(
            Method.VOID,
            request,
            request.merchant_id,
            {"authorization_id": request.authorization_id},
            authorization_id=authorization_id,
        )

    @staticmethod
    def _void_response(f: dict) -> pb.VoidResponse:
        return pb.VoidResponse(
            released=f["released"], available=f["available"], vouchers_released=f.get("vouchers_released", 0)
        )

    async def _redeem(self, request: pb.RedeemRequest) -> Operation:
        return await self._present(await self._built(self._redeem_now, request), request.member_proof)

    def _redeem_now(self, request: pb.RedeemRequest, checked: dict[str, MerchantRow] | None = None) -> Operation:
        """A Redeem's Operation (its member presence check is the caller's: _present, or SubmitBatch's;
        `checked`: see _checked_merchant)."""
        validate = self.validate
        member_id = validate.identifier(request.member_id, "member_id")
        points_max = self.settings.points_max
        vouchers = request.vouchers
        if not 0 <= vouchers <= points_max:
            validate.amount(vouchers, "vouchers", points_max, "voucher-units", zero_allowed=True)
        points = request.points
        if not (0 if vouchers > 0 else 1) <= points <= points_max:
            validate.amount(points, "points", points_max, "point-units", zero_allowed=vouchers > 0)
        fields = {"member_id": member_id, "points": points}
        if vouchers:  # only then: a retry of a points-only redeem keeps its original fingerprint
            fields["vouchers"] = vouchers
        merchant_id = request.merchant_id
        key, merchant = self._checked_merchant(request, merchant_id, checked)
        # every field positionally, in Operation's field order (see _earn_now)
        return Operation(
            Method.REDEEM,
            merchant_id,
            merchant.merchant_slot,
            key,
            fields,
            member_id,
            points,
            0,
            0,
            0,
            0,
            "",
            0,
            vouchers,
            "",
            None,
            None,
            0.0,
            None,
            None,
        )

    @staticmethod
    def _redeem_response(f: dict) -> pb.RedeemResponse:
        response = pb.RedeemResponse()
        _fill_redeem_response(response, f)
        return response

    async def _refund(self, request: pb.RefundRequest) -> Operation:
        transaction_id = domain.parse_transaction_id(request.transaction_id)
        points = self.validate.amount(request.points, "points", self.settings.points_max, "point-units")
        return await self._operation(
            Method.REFUND,
            request,
            request.merchant_id,
            {"transaction_id": request.transaction_id, "points": points},
            transaction_id=transaction_id,
            points=points,
        )

    @staticmethod
    def _refund_response(f: dict) -> pb.RefundResponse:
        return pb.RefundResponse(
            transaction_id=domain.format_transaction_id(f["transaction_id"]),
            points=f["points"],
            kind=kinds.kind(f["kind"]).proto,
            balance=f["balance"],
            available=f["available"],
            bonus_points=f.get("bonus_points", 0),
            vouchers=f.get("vouchers", 0),
        )

    async def _link(self, request: pb.LinkMemberRequest) -> Operation:
        member_id = self.validate.identifier(request.member_id, "member_id")
        referrer = request.referrer_member_id
        if referrer:
            referrer = self.validate.identifier(referrer, "referrer_member_id")
            if referrer == member_id:
                raise Rejection(Code.INVALID_ARGUMENT, "referrer_member_id is member_id: a member cannot refer itself")
        return await self._operation(
            Method.LINK,
            request,
            request.merchant_id,
            {"member_id": member_id, "referrer_member_id": referrer},
            member_id=member_id,
            referrer_id=referrer,
        )

    @staticmethod
    def _link_response(f: dict) -> pb.LinkMemberResponse:
        return pb.LinkMemberResponse(acquirer_id=f["acquirer_id"], referrer_member_id=f["referrer_id"])

    async def _convert(self, request: pb.ConvertMerchantPointsRequest) -> Operation:
        member_id = self.validate.identifier(request.member_id, "member_id")
        merchant_points = self.validate.amount(
            request.merchant_points,
            "merchant_points",
            self.settings.points_max,
            "points of the merchant's own programme",
        )
        return await self._operation(
            Method.CONVERT,
            request,
            request.merchant_id,
            {"member_id": member_id, "merchant_points": merchant_points},
            member_id=member_id,
            merchant_points=merchant_points,
        )

    @staticmethod
    def _convert_response(f: dict) -> pb.ConvertMerchantPointsResponse:
        return pb.ConvertMerchantPointsResponse(
            transaction_id=domain.format_transaction_id(f["transaction_id"]),
            points=f["points"],
            merchant_points_converted=f["merchant_points_converted"],
            merchant_points_remainder=f["merchant_points_remainder"],
            balance=f["balance"],
            created_at=timestamp(f["created_at_us"]),
        )

    async def _spend_vouchers(self, request: pb.SpendMerchantVouchersRequest) -> Operation:
        vouchers = self.validate.amount(request.vouchers, "vouchers", self.settings.points_max, "voucher-units")
        fields: dict = {"vouchers": vouchers}
        at_merchant_id = ""
        if request.at_merchant_id:  # issue 16: at a merchant of the alliance (the fingerprint names it only then)
            at_merchant_id = self.validate.identifier(request.at_merchant_id, "at_merchant_id")
            if at_merchant_id == request.merchant_id:
                raise domain.invalid_field(
                    "at_merchant_id",
                    "a merchant cannot spend its vouchers at itself (that would pay them out as cash); "
                    "spend them at another merchant of the alliance",
                )
            if await self.pipeline.merchant(at_merchant_id) is None:
                raise Rejection(
                    Code.NOT_FOUND,
                    f"merchant {at_merchant_id!r} (at_merchant_id) is not in the alliance",
                    reason="MERCHANT_NOT_FOUND",
                    field="at_merchant_id",
                )
            fields["at_merchant_id"] = at_merchant_id
        return await self._operation(
            Method.SPEND_VOUCHERS,
            request,
            request.merchant_id,
            fields,
            vouchers=vouchers,
            at_merchant_id=at_merchant_id,
        )

    @staticmethod
    def _spend_vouchers_response(f: dict) -> pb.SpendMerchantVouchersResponse:
        return pb.SpendMerchantVouchersResponse(
            transaction_id=domain.format_transaction_id(f["transaction_id"]),
            vouchers=f["vouchers"],
            store_merchant_id=f["store_merchant_id"],
            voucher_balance=f["voucher_balance"],
            created_at=timestamp(f["created_at_us"]),
            voucher_credit_used=f.get("voucher_credit_used", 0),
        )

    async def _unary(self, kind: str, request, context):
        build, respond = self._kinds[kind]

        async def call():
            op = await build(request)
            return respond((await self._submit(op, context)).fields)

        return await guard(context, call)

    # --- PointsService ---

    async def Earn(self, request: pb.EarnRequest, context) -> pb.EarnResponse:
        # _unary("earn") with the builder that decides with no await, inline: four coroutines less a
        # call (_unary's, guard's, _earn's, _built's); tests/unit/test_unary_handlers.py checks that
        # it answers as the generic path does
        try:
            try:
                op = self._earn_now(request)
            except _MerchantNotLoaded as missing:
                await self._load_merchant(missing.merchant_id)
                op = self._earn_now(request)
            return self._earn_response((await self._submit(op, context)).fields)
        except Rejection as rejection:
            await context.abort_with_status(rejection_status(rejection))
            raise  # not reached: abort raises

    async def Authorize(self, request: pb.AuthorizeRequest, context) -> pb.AuthorizeResponse:
        return await self._unary("authorize", request, context)

    async def Capture(self, request: pb.CaptureRequest, context) -> pb.CaptureResponse:
        return await self._unary("capture", request, context)

    async def Void(self, request: pb.VoidRequest, context) -> pb.VoidResponse:
        return await self._unary("void", request, context)

    async def Redeem(self, request: pb.RedeemRequest, context) -> pb.RedeemResponse:
        # as Earn: _unary("redeem") inline, the member presence check (_present) awaited only when the
        # program requires one
        try:
            try:
                op = self._redeem_now(request)
            except _MerchantNotLoaded as missing:
                await self._load_merchant(missing.merchant_id)
                op = self._redeem_now(request)
            check = self._presence_check(op, request.member_proof)
            if check is not None:
                await self.presence.check(*check)
            return self._redeem_response((await self._submit(op, context)).fields)
        except Rejection as rejection:
            await context.abort_with_status(rejection_status(rejection))
            raise  # not reached: abort raises

    async def Refund(self, request: pb.RefundRequest, context) -> pb.RefundResponse:
        return await self._unary("refund", request, context)

    async def LinkMember(self, request: pb.LinkMemberRequest, context) -> pb.LinkMemberResponse:
        return await self._unary("link", request, context)

    async def ConvertMerchantPoints(
        self, request: pb.ConvertMerchantPointsRequest, context
    ) -> pb.ConvertMerchantPointsResponse:
        return await self._unary("convert", request, context)

    async def SpendMerchantVouchers(
        self, request: pb.SpendMerchantVouchersRequest, context
    ) -> pb.SpendMerchantVouchersResponse:
        return await self._unary("spend_vouchers", request, context)

    async def CashOut(self, request: pb.CashOutRequest, context) -> pb.CashOutResponse:
        async def call():
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            caller = rpc.principal.get()
            if caller is None or not caller.may_act_for(merchant_id):
                raise Rejection(Code.PERMISSION_DENIED, f"this API key may not act for merchant {merchant_id!r}")
            metrics.rejections.labels("cash_out").inc()
            rules.refuse_cash_out()

        return await guard(context, call)

    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context) -> pb.SubmitBatchResponse:
        count = len(request.operations)
        if not 1 <= count <= self.settings.batch_request_operations_max:
            await context.abort_with_status(
                status(
                    Code.INVALID_ARGUMENT,
                    f"a batch holds 1..{self.settings.batch_request_operations_max} operations, got {count}; split it",
                    reason="INVALID_FIELD",
                    field="operations",
                )
            )
        # Every operation is queued before any is awaited, so the batch shares commits; the call waits
        # on one future for all of them (no task, coroutine or future per operation: measured, those
        # were a fifth of the CPU, then a sixth).
        results: list = [None] * count
        # the queued operations as three columns (index in the request, kind, Operation): no tuple an
        # operation, which the cyclic collector would walk as long as the call waits (it holds an Operation)
        indexes: list[int] = []
        kinds: list[str] = []
        ops: list[Operation] = []
        # member presence checks are collected while building and run side by side (each waits on
        # Postgres, a PIN on scrypt), not one after the other; only operations that need one cost a task
        presence_checks: list = []
        deferred = _deferred_presence.set(presence_checks)
        # Earns and redeems are built with no await (no coroutine an operation); the other kinds, and an
        # earn or redeem whose merchant must first be read from Postgres, through their async builders.
        # The cyclic collector waits until the loop is done (see _collector_paused).
        earn_now, redeem_now, presence_check = self._earn_now, self._redeem_now, self._presence_check
        add_index, add_kind, add_op = indexes.append, kinds.append, ops.append
        # merchants checked since the last await (see _checked_merchant): emptied after each await
        checked: dict[str, MerchantRow] = {}
        # fastpath.intake builds the run of common earns and redeems from `index` on and stops at the first
        # operation it leaves to the Python path below (which builds or refuses that one, then hands back)
        intake, operations = self._intake, request.operations
        index = 0
        collecting = _collector_paused()
        try:
            while index < count:
                if intake is not None:
                    try:
                        index = intake.run(
                            operations, index, checked, results, indexes, kinds, ops, self._redeems_in_intake()
                        )
                    except Exception:  # a bug: the operation it was at answers INTERNAL, the others go on
                        log.exception("operation failed unexpectedly")
                        index = intake.position
                        results[index] = self._to_result(operations[index].WhichOneof("operation") or "", _INTERNAL)
                        index += 1
                        continue
                    if index >= count:
                        break
                operation = operations[index]
                kind = operation.WhichOneof("operation")
                if kind is None:
                    results[index] = _EMPTY_OPERATION
                    index += 1
                    continue
                try:
                    try:
                        if kind == "earn":
                            op = earn_now(operation.earn, checked)
                        elif kind == "redeem":
                            redeem = operation.redeem
                            op = redeem_now(redeem, checked)
                            check = presence_check(op, redeem.member_proof)
                            if check is not None:
                                presence_checks.append(check)
                        else:
                            checked.clear()  # before the await: a rejection below leaves it empty too
                            op = await self._kinds[kind][0](getattr(operation, kind))
                    except _MerchantNotLoaded:  # its merchant is read from Postgres by the async builder
                        checked.clear()
                        op = await self._kinds[kind][0](getattr(operation, kind))
                    add_index(index)
                    add_kind(kind)
                    add_op(op)
                except Rejection as rejection:
                    results[index] = self._to_result(kind, Outcome(rejection.code, message=rejection.message))
                except Exception:  # a bug: this operation answers INTERNAL, the others of the batch go on
                    log.exception("operation failed unexpectedly")
                    results[index] = self._to_result(kind, _INTERNAL)
                index += 1
        finally:
            _deferred_presence.reset(deferred)
            if collecting:
                gc.enable()
        if presence_checks:
            checked = await asyncio.gather(
                *(self.presence.check(*check) for check in presence_checks), return_exceptions=True
            )
            for (op, *_), error in zip(presence_checks, checked):
                if isinstance(error, Rejection):
                    op.refusal = Outcome(error.code, message=error.message, recorded=False)
                elif isinstance(error, BaseException):
                    log.error("member presence check failed unexpectedly", exc_info=error)
                    op.refusal = _INTERNAL
        if not ops:
            return pb.SubmitBatchResponse(results=results)
        # shield: a caller that goes away does not cancel the call's future (its operations commit)
        await asyncio.shield(self.pipeline.enqueue_many(ops).future)
        return self._batch_response(results, indexes, kinds, ops)

    def _batch_response(
        self, refused: list, indexes: list[int], kinds: list[str], ops: list[Operation]
    ) -> pb.SubmitBatchResponse:
        """SubmitBatch's response once every queued operation is decided: the queued ones as columns
        (their indexes in the request, in order, their kinds and Operations), `refused` the results of the
        others at their indexes (None at the queued ones).
        Built in place, in order: each result added to the response's list and filled there (an
        APPLIED earn or redeem by its filler, with no OperationResult of its own), rather than built on
        its own then copied into SubmitBatchResponse(results=...) (measured, loadtest/bench_servicer.py:
        the copy was a third of the response's cost). With the compiled intake, the response's wire
        bytes are written in C and parsed once by upb (~0.15 µs an operation against ~0.85 for the
        setters). The same bytes (tests/unit/test_servicer_response.py)."""
        collecting = _collector_paused()
        try:
            if self._intake is not None:  # the same message, its wire bytes written in C (fastpath/intake.pyx)
                return pb.SubmitBatchResponse.FromString(
                    self._intake.respond_encoded(
                        refused,
                        indexes,
                        kinds,
                        ops,
                        self._to_result,
                        Code.OK,
                        pb.OPERATION_OUTCOME_APPLIED,
                        _TRANSACTION_PREFIX,
                    )
                )
            response = pb.SubmitBatchResponse()
            results = response.results
            add, append = results.add, results.append
            to_result, fill_earn, fill_redeem = self._to_result, _fill_earn_response, _fill_redeem_response
            ok, applied = Code.OK, pb.OPERATION_OUTCOME_APPLIED
            position = 0
            for index, kind, op in zip(indexes, kinds, ops):
                while position < index:  # refused before it was queued (or empty): its result as it is
                    append(refused[position])
                    position += 1
                position = index + 1
                outcome = op.outcome
                if outcome.code is ok and not outcome.replayed:  # the common case: no call but the filler's
                    if kind == "earn":
                        fill_earn(add(outcome=applied).earn, outcome.fields)
                        continue
                    if kind == "redeem":
                        fill_redeem(add(outcome=applied).redeem, outcome.fields)
                        continue
                append(to_result(kind, outcome))
            for result in refused[position:]:
                append(result)
        finally:
            if collecting:
                gc.enable()
        return response

    async def Stream(self, request_iterator, context):
        """Reads operations as they come and answers each when its batch commits. At most
        `stream_operations_in_flight_max` operations of one stream are pending: reading pauses beyond.
        An operation costs no task or future of its own: it is queued as it is read, and answered from
        the committer's decision (a task only for one that waits on a member presence check)."""
        answers: asyncio.Queue = asyncio.Queue()  # bounded by the slots: one answer per taken slot
        slots = asyncio.Semaphore(self.settings.stream_operations_in_flight_max)
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        pending = 0  # operations read and not yet answered
        all_answered = asyncio.Event()

        # A slot is taken when an operation is read and given back when its answer has been sent, so a
        # client that stops reading answers stops being read: pending work and answers stay bounded.
        def answer(correlation_id: str, result: pb.OperationResult) -> None:
            nonlocal pending
            answers.put_nowait(pb.StreamResponse(correlation_id=correlation_id, result=result))
            pending -= 1
            if pending == 0:
                all_answered.set()

        def decided(correlation_id: str, kind: str, op: Operation) -> None:
            # runs in the committer as it answers a batch: a bug here must not stop it answering the rest
            try:
                result = self._to_result(kind, op.outcome)
            except Exception:  # noqa: BLE001 - logged; this operation answers INTERNAL
                log.exception("operation failed unexpectedly")
                result = _INTERNAL_RESULT
            answer(correlation_id, result)

        def enqueue(correlation_id: str, kind: str, op: Operation) -> None:
            self.pipeline.enqueue_many([op], lambda op: decided(correlation_id, kind, op))

        async def after_presence(correlation_id: str, kind: str, op: Operation, check: tuple) -> None:
            try:
                await self.presence.check(*check)
            except Rejection as rejection:
                answer(correlation_id, self._to_result(kind, Outcome(rejection.code, message=rejection.message)))
                return
            except Exception:
                log.exception("operation failed unexpectedly")
                answer(correlation_id, self._to_result(kind, _INTERNAL))
                return
            enqueue(correlation_id, kind, op)

        async def take(correlation_id: str, operation: pb.Operation) -> None:
            """Builds and queues one operation (its answer comes later), or answers it now."""
            kind = operation.WhichOneof("operation")
            if kind is None:
                answer(correlation_id, _EMPTY_OPERATION)
                return
            presence_checks: list = []
            deferred = _deferred_presence.set(presence_checks)
            try:
                op = await self._kinds[kind][0](getattr(operation, kind))
            except Rejection as rejection:
                answer(correlation_id, self._to_result(kind, Outcome(rejection.code, message=rejection.message)))
                return
            except Exception:  # a bug: this operation answers INTERNAL, the others of the stream go on
                log.exception("operation failed unexpectedly")
                answer(correlation_id, self._to_result(kind, _INTERNAL))
                return
            finally:
                _deferred_presence.reset(deferred)
            if presence_checks:  # checked side by side with reading on (each waits on Postgres or scrypt)
                task = loop.create_task(after_presence(correlation_id, kind, op, presence_checks[0]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                enqueue(correlation_id, kind, op)

        async def read() -> None:
            nonlocal pending
            try:
                async for message in request_iterator:
                    await slots.acquire()
                    pending += 1
                    all_answered.clear()
                    problem = ""
                    if isinstance(message, rpc.Undecodable):
                        problem = message.message
                    elif len(message.correlation_id.encode()) > 128:
                        problem = "correlation_id must be at most 128 bytes"
                    if problem:
                        answer(
                            getattr(message, "correlation_id", "").encode()[:128].decode(errors="ignore"),
                            pb.OperationResult(
                                outcome=pb.OPERATION_OUTCOME_INVALID,
                                status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                message=problem + "; the operation was not carried out",
                            ),
                        )
                        continue
                    try:
                        await take(message.correlation_id, message.operation)
                    except Exception:  # noqa: BLE001 - answering itself failed: a bug; the stream goes on
                        log.exception("operation failed unexpectedly")
                        answer(message.correlation_id, _INTERNAL_RESULT)
                if pending:
                    await all_answered.wait()
            finally:
                answers.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
                slots.release()
        finally:
            reader.cancel()

    async def _result(self, operation: pb.Operation) -> pb.OperationResult:
        """One operation of a batch or stream, to its result; never raises for the operation's own faults."""
        kind = operation.WhichOneof("operation")
        if kind is None:
            return _EMPTY_OPERATION
        try:
            outcome = await self.pipeline.submit(await self._kinds[kind][0](getattr(operation, kind)))
        except Rejection as rejection:
            outcome = Outcome(rejection.code, message=rejection.message)
        except Exception:  # a bug: this operation answers INTERNAL, the others of the stream go on
            log.exception("operation failed unexpectedly")
            outcome = _INTERNAL
        return self._to_result(kind, outcome)

    def _to_result(self, kind: str, outcome: Outcome) -> pb.OperationResult:
        if outcome.code is Code.OK:
            if outcome.replayed:
                metrics.idempotent_replays.inc()
            fill = _FILL.get(kind)
            if fill is not None:  # an earn's or redeem's response set in place (see _fill_earn_response)
                result = pb.OperationResult(
                    outcome=pb.OPERATION_OUTCOME_REPLAYED if outcome.replayed else pb.OPERATION_OUTCOME_APPLIED
                )
                fill(getattr(result, kind), outcome.fields)
                return result
            # the response given to the constructor, not CopyFrom'd into it afterwards (measured: the
            # constructor took a third of the time of constructing then copying)
            return pb.OperationResult(
                outcome=pb.OPERATION_OUTCOME_REPLAYED if outcome.replayed else pb.OPERATION_OUTCOME_APPLIED,
                **{kind: self._kinds[kind][1](outcome.fields)},
            )
        return pb.OperationResult(
            outcome=_operation_outcome(outcome), message=outcome.message, status_code=grpc_status(outcome.code).value[0]
        )

    async def GetBalance(self, request: pb.GetBalanceRequest, context) -> pb.GetBalanceResponse:
        async def call():
            member_id = self.validate.identifier(request.member_id, "member_id")
            # an alias's member; a household member's shared balance (processor/member_postings.py)
            members = self.pipeline.machine.members
            named = members.resolve(member_id)
            member_id = members.account_of(named)
            ledger = await self.pipeline.committed_view()
            slot = ledger.member_slot(member_id)
            if slot < 0:
                raise Rejection(Code.NOT_FOUND, f"member {member_id!r} has no points account")
            posted, held = ledger.balance(slot)
            days = request.expiring_within_days or EXPIRING_WITHIN_DAYS_DEFAULT
            if not 1 <= days <= EXPIRING_WITHIN_DAYS_MAX:
                raise domain.invalid_field(
                    "expiring_within_days",
                    f"expiring_within_days must be 0 (default "
                    f"{EXPIRING_WITHIN_DAYS_DEFAULT}) ..{EXPIRING_WITHIN_DAYS_MAX}, got {days}",
                )
            program, now_us = self.pipeline.program, now_micros()
            response = pb.GetBalanceResponse(
                member_id=member_id,
                posted=posted,
                held=held,
                available=posted - held,
                level=program.level(member_id, now_us),
                household_id=members.household_of.get(named, ""),
            )
            for expires_at_us, points in program.expiring_within(member_id, now_us, days * rules.DAY_US):
                response.expiring.append(pb.ExpiringPoints(expires_at=timestamp(expires_at_us), points=points))
                response.expiring_points += points
            response.vouchers = program.vouchers.get((rules.HOLDER_MEMBER, member_id), 0)
            response.voucher_credit_used = program.credit.get(member_id, 0)
            response.vouchers_held, response.voucher_credit_held = program.vouchers_held.get(member_id, (0, 0))
            response.voucher_credit_limit = program.credit_limit(program.version(now_us), posted)
            # the member's links only for its acquiring merchant: another merchant's till sees no acquirer
            # and no other member's id
            links, caller = program.member(member_id), rpc.principal.get()
            if links.acquirer_id and caller is not None and caller.may_act_for(links.acquirer_id):
                response.acquirer_id, response.referrer_id = links.acquirer_id, links.referrer_id or ""
            if program.program is not None:  # with the level changes of the caller's answered earns
                for r in await (await projected_store(self.pipeline)).tier_history(member_id):
                    response.level_history.append(
                        pb.LevelChange(
                            from_level=r["from_level"],
                            to_level=r["to_level"],
                            transaction_id=domain.format_transaction_id(r["transaction_id"]),
                            changed_at=timestamp(micros(r["created_at"])),
                        )
                    )
            return response

        return await guard(context, call)

    async def ListTransactions(self, request: pb.ListTransactionsRequest, context) -> pb.ListTransactionsResponse:
        async def call():
            member_id = self.validate.identifier(request.member_id, "member_id")
            store = self.pipeline.ready_store()
            size, before = history_page(self.settings, request.page_size, request.page_token)
            # a merchant sees the member's transactions at the merchants its key covers, not elsewhere
            caller = rpc.principal.get()
            # read-your-writes: every operation answered before this call is in the rows read below
            await self.pipeline.projected()
            rows = await store.list_transactions(
                member_id, before, size + 1, sorted(caller.merchant_ids) if caller else []
            )
            if not rows and before is None and not await store.member_exists(member_id):
                raise Rejection(Code.NOT_FOUND, f"member {member_id!r} has no points account")
            more = len(rows) > size
            rows = rows[:size]
            response = pb.ListTransactionsResponse(
                next_page_token=encode_page_token(rows[-1]["transaction_id"]) if more else ""
            )
            for r in rows:
                response.transactions.append(
                    pb.Transaction(
                        transaction_id=domain.format_transaction_id(r["transaction_id"]),
                        kind=kinds.kind(r["kind"]).proto,
                        merchant_id=r["merchant_id"],
                        points=r["member_points"],
                        vouchers=r["member_vouchers"],
                        original_transaction_id=(
                            domain.format_transaction_id(r["original_transaction_id"])
                            if r["original_transaction_id"]
                            else ""
                        ),
                        authorization_id=(
                            domain.format_authorization_id(r["authorization_id"]) if r["authorization_id"] else ""
                        ),
                        created_at=timestamp(int(r["created_at"].timestamp() * 1_000_000)),
                        purchase_amount=r["purchase_amount"] or 0,
                    )
                )
            return response

        return await guard(context, call)


_OUTCOME = {
    Code.INVALID_ARGUMENT: pb.OPERATION_OUTCOME_INVALID,
    Code.NOT_FOUND: pb.OPERATION_OUTCOME_NOT_FOUND,
    Code.ALREADY_EXISTS: pb.OPERATION_OUTCOME_KEY_REUSED,
    Code.PERMISSION_DENIED: pb.OPERATION_OUTCOME_PERMISSION_DENIED,
    Code.UNAUTHENTICATED: pb.OPERATION_OUTCOME_PERMISSION_DENIED,
    Code.FAILED_PRECONDITION: pb.OPERATION_OUTCOME_REJECTED,
    Code.RESOURCE_EXHAUSTED: pb.OPERATION_OUTCOME_RETRY,
    Code.UNAVAILABLE: pb.OPERATION_OUTCOME_RETRY,
    Code.INTERNAL: pb.OPERATION_OUTCOME_RETRY,
}
_REASON_OUTCOME = {
    "insufficient_points": pb.OPERATION_OUTCOME_INSUFFICIENT_POINTS,
    "hold_expired": pb.OPERATION_OUTCOME_HOLD_EXPIRED,
}


def _operation_outcome(outcome: Outcome) -> int:
    if outcome.replayed:
        return pb.OPERATION_OUTCOME_REPLAYED
    return _REASON_OUTCOME.get(outcome.reason, _OUTCOME[outcome.code])


def history_page(settings: Settings, page_size: int, page_token: str) -> tuple[int, int | None]:
    """A ListTransactions page (PointsService and MemberAdminService): how many transactions (0 = the
    default; INVALID_ARGUMENT outside 1..page_size_max) and the transaction id it starts before (None:
    the newest), from the previous page's token."""
    size = page_size or settings.page_size_default
    if not 1 <= size <= settings.page_size_max:
        raise domain.invalid_field(
            "page_size",
            f"page_size must be 0 (default {settings.page_size_default}) ..{settings.page_size_max}, got {page_size}",
        )
    return size, (_decode_page_token(page_token) if page_token else None)


def encode_page_token(transaction_id: int) -> str:
    return base64.urlsafe_b64encode(_PAGE_TOKEN_PREFIX + str(transaction_id).encode()).decode()


def _decode_page_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
        if raw.startswith(_PAGE_TOKEN_PREFIX):
            digits = raw[len(_PAGE_TOKEN_PREFIX) :]
            if digits.isdigit() and len(digits) <= 18:
                return int(digits)
    except (ValueError, UnicodeEncodeError):
        pass
    raise domain.invalid_field(
        "page_token",
        "page_token is not one this service issued; pass next_page_token from the previous response, or empty",
    )
