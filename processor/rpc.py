"""The RPC layer around every servicer method: request ids, RED metrics, JSON logs of failed calls,
and requests that do not decode (answered INVALID_ARGUMENT instead of gRPC's generic error)."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid

import grpc

from processor import auth, metrics
from processor.domain import Rejection
from processor.errors import grpc_status

log = logging.getLogger("points.rpc")
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_BYTES_MAX = 64
# The id of the RPC being handled, for log lines written anywhere below the servicer.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Who is calling: set for every call of an authenticated service before the servicer runs.
principal: contextvars.ContextVar[auth.Principal | None] = contextvars.ContextVar("principal", default=None)

# The kinds of credential each service accepts; services not listed (health, reflection) are open.
ACCEPTED_KINDS = {
    "points.v1.PointsService": ("merchant", "gateway"),
    "points.v1.MerchantAdmin": ("operator",),
    "points.v1.Clearing": ("operator",),
    "points.v1.Programs": ("operator",),
    "points.v1.MemberAdminService": ("operator",),
}


def _request_id(context) -> str:
    """The caller's x-request-id if it sent a sane one, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= REQUEST_ID_BYTES_MAX \
                and value.isascii() and value.isprintable():
            return value
    return uuid.uuid4().hex


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """RED metrics for every unary-unary method, named as go-grpc-prometheus names them; a request id
    per call (the caller's x-request-id or a new one), sent back in the initial metadata and logged
    with every call that did not end OK (at DEBUG for those that did); authentication of the caller
    (UNAUTHENTICATED without a valid key, PERMISSION_DENIED for a key of the wrong kind)."""

    def __init__(self, authenticator: auth.Authenticator):
        self.authenticator = authenticator

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or (handler.unary_unary is None and handler.stream_stream is None):
            return handler
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        accepted = ACCEPTED_KINDS.get(service)
        authenticator = self.authenticator
        decode = handler.request_deserializer
        message_type = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
        request_type = message_type.full_name if message_type is not None else f"{service}/{method} request"

        def deserialize(data: bytes):
            try:
                return decode(data)
            except Exception as error:  # protobuf's DecodeError, invalid UTF-8 in a string field, ...
                return Undecodable(request_type, error)
        streaming = handler.stream_stream is not None
        labels = (service, method, "bidi_stream" if streaming else "unary")
        started = metrics.rpc_started.labels(*labels)
        seconds = metrics.rpc_seconds.labels(*labels)

        async def admit(context) -> tuple[str, float]:
            """Counts the call, gives it a request id and authenticates the caller."""
            started.inc()
            rid = _request_id(context)
            request_id.set(rid)
            await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            if accepted is not None:
                try:
                    caller = await authenticator.principal(context.invocation_metadata())
                except Rejection as rejection:
                    await context.abort(grpc_status(rejection.code), rejection.message)
                if caller.kind not in accepted:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"a {caller.kind} key cannot call {service}; it takes a "
                                        f"{' or '.join(accepted)} key")
                principal.set(caller)
            return rid, time.perf_counter()

        def account(context, rid: str, begin: float, code: grpc.StatusCode) -> None:
            elapsed = time.perf_counter() - begin
            seconds.observe(elapsed)
            metrics.rpc_handled.labels(*labels, code.name).inc()
            level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "rpc", extra={"request_id": rid, "method": method, "code": code.name,
                                             "details": context.details() or "", "seconds": round(elapsed, 6)})

        if streaming:
            inner_stream = handler.stream_stream

            async def stream_behavior(request_iterator, context):
                rid, begin, code = "", time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    rid, begin = await admit(context)
                    async for response in inner_stream(request_iterator, context):
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

            return grpc.stream_stream_rpc_method_handler(
                stream_behavior, request_deserializer=deserialize, response_serializer=handler.response_serializer)

        inner = handler.unary_unary

        async def behavior(request, context):
            rid, begin, code = "", time.perf_counter(), grpc.StatusCode.UNKNOWN
            try:
                rid, begin = await admit(context)
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                response = await inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                code = context.code() or grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                await _internal(context, rid, method)
            finally:
                account(context, rid, begin, code)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=deserialize, response_serializer=handler.response_serializer)


async def _internal(context, rid: str, method: str) -> None:
    """A handler raised what no handler should (a bug): logged with its traceback, answered INTERNAL,
    never gRPC's UNKNOWN with the exception's text. The service keeps serving."""
    log.exception("rpc handler failed unexpectedly", extra={"request_id": rid, "method": method})
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error (request id {rid}): report the request id to the operator; a retry "
                        "with the same idempotency key is safe (a mutating call is answered only once durable)")


class Undecodable:
    """Stands for a request whose bytes are not the method's message."""

    def __init__(self, type_name: str, error: Exception):
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        self.message = (f"request is not a valid {type_name}: {reason}; "
                        "send the message the method's .proto declares (string fields must be UTF-8)")
