"""A no-op PointsService on the service's stack (grpc.aio on uvloop, the same proto): the floor under
any figure the real service can reach on a machine. Earn and Redeem answer a constant, SubmitBatch a
constant result per operation; nothing is checked, stored or logged.

    python -m loadtest.noop_server [--listen 127.0.0.1:0]

Prints "SERVING on HOST:PORT" once it listens; stops on SIGTERM or SIGINT. loadtest/bench.py runs it as
its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc

MESSAGE_BYTES_MAX = 4 * 1024 * 1024  # as the service's --grpc-message-bytes-max default

_CREATED_AT = {"seconds": 1_700_000_000}
EARN = pb.EarnResponse(
    transaction_id="txn_1", points=1_000, balance=10_000, give_back_bps=1_000, created_at=_CREATED_AT
)
REDEEM = pb.RedeemResponse(transaction_id="txn_2", points=100, balance=9_900, available=9_900)
APPLIED = pb.OperationResult(outcome=pb.OPERATION_OUTCOME_APPLIED, earn=EARN)


class NoopServicer(points_pb2_grpc.PointsServiceServicer):
    async def Earn(self, request, context):
        return EARN

    async def Redeem(self, request, context):
        return REDEEM

    async def SubmitBatch(self, request, context):
        return pb.SubmitBatchResponse(results=[APPLIED] * len(request.operations))


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MESSAGE_BYTES_MAX), ("grpc.so_reuseport", 0)])
    points_pb2_grpc.add_PointsServiceServicer_to_server(NoopServicer(), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"no-op points service SERVING on {listen.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    uvloop.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
