"""The RPC layer around every servicer method: request ids, RED metrics, JSON logs of failed calls,
authentication before a request's bytes are decoded, deny by default, the audit trail of operator
changes, and requests that do not decode (answered INVALID_ARGUMENT instead of gRPC's generic error)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time

import grpc

from points.v1 import admin_pb2, events_pb2, points_pb2
from processor import audit, auth, metrics
from processor.domain import Code, Rejection
from processor.errors import rejection_status, status

log = logging.getLogger("points.rpc")
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_BYTES_MAX = 64
# methods whose wrapped handler is kept (every method of our protos is far fewer)
WRAPPED_METHODS_MAX = 1024
# The id of the RPC being handled, for log lines written anywhere below the servicer.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Who is calling: set for every call of an authenticated service before the servicer runs (and for a call
# of an open service that sent a valid key).
principal: contextvars.ContextVar[auth.Principal | None] = contextvars.ContextVar("principal", default=None)

# The kinds of credential each service accepts. Deny by default: a service neither listed here nor in
# OPEN_SERVICES is answered UNIMPLEMENTED (as an unknown service is: its existence is not revealed).
ACCEPTED_KINDS = {
    "points.v1.PointsService": ("merchant", "gateway"),
    "points.v1.MerchantAdmin": ("operator",),
    # merchant and gateway keys: their own merchants' reads only (processor/admin.py _may_read; issue 15)
    "points.v1.Clearing": ("operator", "merchant", "gateway"),
    "points.v1.Programs": ("operator",),
    "points.v1.MerchantAdminService": ("operator",),
    "points.v1.ClearingService": ("operator", "merchant", "gateway"),
    "points.v1.ProgramsService": ("operator",),
    # support keys: only the methods processor/member_admin.py lets them call (SUPPORT_METHODS)
    "points.v1.MemberAdminService": ("operator", "support"),
    "points.v1.AuditService": ("operator",),
    # operator keys, and a merchant's own key for SetGiveBack: processor/channel.py checks each method
    "points.v1.ChannelService": ("operator", "merchant"),
    # the change feed: a merchant or gateway key sees its merchants' transactions (processor/events_servicer.py)
    "points.v1.EventsService": ("operator", "merchant", "gateway"),
}
# Services any caller may use without a key: health checks and (filtered, processor/reflection.py)
# server reflection.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})
# The operator's surface: every service of admin.proto. Reflection lists them, and serves admin.proto, to
# operator keys only (processor/reflection.py); the few calls merchants' keys may make there (their own
# clearing reads, SetGiveBack) are documented in docs/API.md, not discovered.
OPERATOR_SERVICES = frozenset(s.full_name for s in admin_pb2.DESCRIPTOR.services_by_name.values())


def _check_table() -> None:
    declared = {
        s.full_name for file in (points_pb2, admin_pb2, events_pb2) for s in file.DESCRIPTOR.services_by_name.values()
    }
    if declared - set(ACCEPTED_KINDS):
        raise ImportError(
            f"rpc.ACCEPTED_KINDS must name the keys each service takes: {sorted(declared - set(ACCEPTED_KINDS))}"
        )


_check_table()


def _request_id(metadata) -> str:
    """The caller's x-request-id if it sent a sane one (in `metadata`, the call's), else a new one."""
    for key, value in metadata or ():
        if (
            key == REQUEST_ID_HEADER
            and isinstance(value, str)
            and 0 < len(value) <= REQUEST_ID_BYTES_MAX
            and value.isascii()
            and value.isprintable()
        ):
            return value
    # 32 hex digits as uuid4().hex gave, at a fifth of its cost (no UUID object)
    return os.urandom(16).hex()


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """RED metrics for every method, named as go-grpc-prometheus names them; a request id per call (the
    caller's x-request-id or a new one), sent back in the initial metadata and logged with every call that
    did not end OK (at DEBUG for those that did); authentication of the caller before the request's bytes
    are decoded (UNAUTHENTICATED without a valid key, PERMISSION_DENIED for a key of the wrong kind);
    UNIMPLEMENTED for a service not in ACCEPTED_KINDS or OPEN_SERVICES; an audit record of every call of a
    state-changing operator method (processor/audit.py) made with a valid key."""

    # A key of the wrong kind (a merchant's) calling a state-changing operator method is recorded once per
    # key per this many seconds: enough to see the attempt, not a way to grow the audit table at will.
    KIND_REFUSAL_RECORD_SECONDS = 60.0
    KIND_REFUSAL_KEYS_MAX = 10_000

    def __init__(self, authenticator: auth.Authenticator, audit_log: audit.AuditLog | None = None):
        self.authenticator = authenticator
        self.audit_log = audit_log
        self._kind_refusals: dict[str, float] = {}  # key_id -> monotonic time its last refusal was recorded
        self._wrapped: dict[str, tuple] = {}  # full method -> (its handler, the handler wrapped around it)

    def _record_kind_refusal(self, key_id: str) -> bool:
        now = time.monotonic()
        last = self._kind_refusals.get(key_id)
        if last is not None and now - last < self.KIND_REFUSAL_RECORD_SECONDS:
            return False
        if len(self._kind_refusals) >= self.KIND_REFUSAL_KEYS_MAX:
            self._kind_refusals.clear()
        self._kind_refusals[key_id] = now
        return True

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full_method = handler_call_details.method
        # The wrapped handler depends only on the method and its handler (the same object for every
        # call of a registered method), so it is built once per method, not per call: its closures,
        # metric children and the handler object took ~2% of a unary call's CPU (py-spy, loadtest.bench).
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, full_method)
        if len(self._wrapped) >= WRAPPED_METHODS_MAX:
            self._wrapped.clear()  # bounded: only a server with that many methods builds them again
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, full_method: str):
        """The handler that runs around `handler`'s behaviour for every call of `full_method`."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        accepted = ACCEPTED_KINDS.get(service)
        is_open = service in OPEN_SERVICES
        streaming = handler.stream_stream is not None
        server_streaming = handler.unary_stream is not None and not is_open  # WatchEvents
        if accepted is None and not is_open:
            return _refusal(handler, grpc.StatusCode.UNIMPLEMENTED, f"service {service} is not served")
        if handler.unary_unary is None and not streaming and not server_streaming:
            if is_open:
                return handler  # health's Watch (unary-stream): open, no key to check
            # unary-stream and stream-unary: none of ours; refused rather than let through unchecked
            return _refusal(handler, grpc.StatusCode.UNIMPLEMENTED, f"method {full_method} is not served")
        authenticator = self.authenticator
        audit_log = self.audit_log if audit.audited(full_method) else None
        decode = handler.request_deserializer
        message_type = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
        request_type = message_type.full_name if message_type is not None else f"{service}/{method} request"

        def deserialize(data: bytes):
            """After authentication only (admit): the bytes are untrusted until then."""
            if decode is None:
                return data
            try:
                return decode(data)
            except Exception as error:  # protobuf's DecodeError, invalid UTF-8 in a string field, ...
                undecodable.inc()
                return Undecodable(request_type, error)

        labels = (service, method, "bidi_stream" if streaming else "server_stream" if server_streaming else "unary")
        undecodable = metrics.requests_undecodable.labels(service, method)
        started = metrics.rpc_started.labels(*labels)
        seconds = metrics.rpc_seconds.labels(*labels)
        handled: dict[grpc.StatusCode, object] = {}  # the method's handled counter of each code seen

        async def admit(context) -> tuple[str, float, auth.Principal | None]:
            """Counts the call, gives it a request id and authenticates the caller."""
            started.inc()
            metadata = context.invocation_metadata()  # a new tuple each time it is asked for: once
            rid = _request_id(metadata)
            request_id.set(rid)
            await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            caller = None
            if accepted is not None:
                try:
                    caller = await authenticator.principal(metadata)
                except Rejection as rejection:
                    await context.abort_with_status(rejection_status(rejection))
                if caller.kind not in accepted:
                    return rid, time.perf_counter(), caller  # refused by the behaviour, after the audit note
                principal.set(caller)
            elif any(name == "authorization" for name, _ in metadata or ()):
                try:  # an open service (reflection) shows more to an operator
                    principal.set(await authenticator.principal(metadata))
                except Rejection:
                    pass
            return rid, time.perf_counter(), caller

        async def refuse_kind(context, caller: auth.Principal) -> None:
            await context.abort_with_status(
                status(
                    Code.PERMISSION_DENIED,
                    f"a {caller.kind} key cannot call {service}; it takes a {' or '.join(accepted)} key",
                    reason="KEY_NOT_PERMITTED",
                )
            )

        def account(context, rid: str, begin: float, code: grpc.StatusCode) -> None:
            elapsed = time.perf_counter() - begin
            seconds.observe(elapsed)
            handled_by_code = handled.get(code)
            if handled_by_code is None:
                handled_by_code = handled[code] = metrics.rpc_handled.labels(*labels, code.name)
            handled_by_code.inc()
            level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "rpc",
                    extra={
                        "request_id": rid,
                        "method": method,
                        "code": code.name,
                        "details": context.details() or "",
                        "seconds": round(elapsed, 6),
                    },
                )

        async def record(context, caller, rid: str, request, code: grpc.StatusCode) -> None:
            """The audit record of a state-changing operator call (a failure to write it is logged and
            counted: the call itself has already happened)."""
            if isinstance(request, Undecodable):
                request = {"undecodable": request.message}
            elif request is None:
                request = {}
            details = context.details() or ""
            try:
                await audit_log.record(
                    caller.key_id,
                    full_method,
                    request,
                    code.name,
                    details.decode(errors="replace") if isinstance(details, bytes) else details,
                    rid,
                )
            except Exception as error:
                metrics.audit_write_failures.inc()
                log.error(
                    "audit record not written", extra={"request_id": rid, "method": full_method, "error": repr(error)}
                )

        def guarded_stream(open_responses):
            """A streaming handler: admission, the key's kind, accounting, and INTERNAL for a bug of ours,
            around `open_responses(request_or_iterator, context)`, an async iterator of the answers opened
            once the call is admitted. (An async generator function itself, as grpc.aio requires.)"""

            async def behavior(arg, context):
                rid, begin, code = "", time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    rid, begin, caller = await admit(context)
                    if accepted is not None and caller.kind not in accepted:
                        await refuse_kind(context, caller)
                    async for response in open_responses(arg, context):
                        yield response
                    code = context.code() or grpc.StatusCode.OK
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                    code = context.code() or grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    code = grpc.StatusCode.INTERNAL
                    await _internal(context, rid, method)
                finally:
                    account(context, rid, begin, code)

            return behavior

        if streaming:
            inner_stream = handler.stream_stream

            async def stream_responses(request_iterator, context):
                async def decoded():
                    async for data in request_iterator:
                        yield deserialize(data)

                async for response in inner_stream(decoded(), context):
                    yield response

            stream_behavior = guarded_stream(stream_responses)

            return grpc.stream_stream_rpc_method_handler(
                stream_behavior, request_deserializer=_raw, response_serializer=handler.response_serializer
            )

        if server_streaming:
            inner_server_stream = handler.unary_stream

            async def server_stream_responses(data, context):
                request = deserialize(data)
                if isinstance(request, Undecodable):
                    await context.abort_with_status(
                        status(Code.INVALID_ARGUMENT, request.message, reason="UNDECODABLE_REQUEST")
                    )
                async for response in inner_server_stream(request, context):
                    yield response

            server_stream_behavior = guarded_stream(server_stream_responses)

            return grpc.unary_stream_rpc_method_handler(
                server_stream_behavior, request_deserializer=_raw, response_serializer=handler.response_serializer
            )

        inner = handler.unary_unary

        async def behavior(data, context):
            rid, begin, code = "", time.perf_counter(), grpc.StatusCode.UNKNOWN
            caller = request = None
            audited: _Audited | None = None
            try:
                rid, begin, caller = await admit(context)
                if (
                    audit_log is not None
                    and caller is not None
                    and (caller.kind in accepted or self._record_kind_refusal(caller.key_id))
                ):
                    # the record is written before the caller hears the outcome (abort sends it at once)
                    audited = context = _Audited(
                        context, lambda code, c=caller, r=rid: record(context, c, r, request, code)
                    )
                if accepted is not None and caller.kind not in accepted:
                    await refuse_kind(context, caller)
                request = deserialize(data)
                if isinstance(request, Undecodable):
                    await context.abort_with_status(
                        status(Code.INVALID_ARGUMENT, request.message, reason="UNDECODABLE_REQUEST")
                    )
                response = await inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                if audited is not None:
                    await audited.done(code)
                return response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                code = context.code() or grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                await _internal(context, rid, method)
            finally:
                account(context, rid, begin, code)
                if audited is not None:
                    await audited.done(code)  # a cancelled call, or one whose record is not written yet

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=_raw, response_serializer=handler.response_serializer
        )


class _Audited:
    """The servicer context of an audited call: its audit record is written once, before the outcome
    leaves (context.abort sends the status at once, so the record is written first), or at the end."""

    def __init__(self, context, write):
        self._context = context
        self._write = write
        self._written = False

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def done(self, code: grpc.StatusCode) -> None:
        if not self._written:
            self._written = True
            await self._write(code)

    async def abort(self, code, details="", trailing_metadata=()):
        self._context.set_details(details)
        await self.done(code)
        await self._context.abort(code, details, trailing_metadata)

    async def abort_with_status(self, status: grpc.Status):
        """As grpc's (the status's trailing metadata carries its google.rpc details), through abort()."""
        await self.abort(status.code, status.details, status.trailing_metadata)


def _raw(data: bytes) -> bytes:
    """The deserializer gRPC runs before the behaviour: none (the behaviour decodes after authenticating)."""
    return data


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler that answers every call with `code`, never decoding the request."""

    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_stream(request_iterator, context):
        await context.abort(code, message)
        yield  # an async generator, as gRPC expects of a stream-stream behaviour

    if handler.stream_stream is not None or handler.stream_unary is not None:
        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, request_deserializer=_raw, response_serializer=handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse, request_deserializer=_raw, response_serializer=handler.response_serializer
    )


async def _internal(context, rid: str, method: str) -> None:
    """A handler raised what no handler should (a bug): logged with its traceback, answered INTERNAL,
    never gRPC's UNKNOWN with the exception's text. The service keeps serving."""
    log.exception("rpc handler failed unexpectedly", extra={"request_id": rid, "method": method})
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {rid}): report the request id to the operator; a retry "
        "with the same idempotency key is safe (a mutating call is answered only once durable)",
    )


class Undecodable:
    """Stands for a request whose bytes are not the method's message."""

    def __init__(self, type_name: str, error: Exception):
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        self.message = (
            f"request is not a valid {type_name}: {reason}; "
            "send the message the method's .proto declares (string fields must be UTF-8)"
        )
