"""No exception leaves a handler as gRPC's UNKNOWN (issue 13, item 2): the RPC layer answers a bug with
INTERNAL, a message that names the request id and nothing of the exception, logs it with its
traceback, and keeps serving. A real grpc.aio server on 127.0.0.1:0 with the service's interceptor and a
handler of an open service (no credential needed) that fails as a bug would."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from processor import auth, rpc


class Broken(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        if request.service == "fine":
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        raise KeyError("secret detail that must not reach the caller")  # as ListTransactions' KeyError 12


@pytest.mark.timeout(60)
def test_a_handler_bug_answers_internal_with_the_request_id_and_the_server_keeps_serving(caplog):
    async def scenario():
        server = grpc.aio.server(interceptors=[rpc.RpcInterceptor(auth.Authenticator(None, 1.0))])
        health_pb2_grpc.add_HealthServicer_to_server(Broken(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                call = stub.Check(
                    health_pb2.HealthCheckRequest(service="x"), timeout=10, metadata=(("x-request-id", "req-42"),)
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                assert raised.value.code() == grpc.StatusCode.INTERNAL
                assert "req-42" in raised.value.details()
                assert "KeyError" not in raised.value.details() and "secret" not in raised.value.details()
                again = stub.Check(health_pb2.HealthCheckRequest(service="y"), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await again
                assert raised.value.code() == grpc.StatusCode.INTERNAL

                fine = await stub.Check(health_pb2.HealthCheckRequest(service="fine"), timeout=10)
                assert fine.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)

    with caplog.at_level(logging.ERROR, logger="points.rpc"):
        asyncio.run(scenario())
    failures = [r for r in caplog.records if r.getMessage() == "rpc handler failed unexpectedly"]
    assert len(failures) == 2 and failures[0].exc_info is not None
    assert {r.__dict__.get("request_id") for r in failures} >= {"req-42"}
