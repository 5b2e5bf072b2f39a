"""The naive baseline: Earn and Redeem of the same proto, served the obvious way, one Postgres
transaction per operation:

    redeem:  UPDATE naive_balances SET balance = balance - $1 WHERE member_id = $2 AND balance >= $1
             + INSERT INTO naive_transactions ...
    earn:    INSERT INTO naive_balances ... ON CONFLICT DO UPDATE SET balance = balance + points
             + INSERT INTO naive_transactions ...

Postgres decides every balance check (row locks serialise a hot member); no group commit, no fast
path, no journal, no merchant positions, no credentials. grpc.aio on uvloop with an asyncpg pool, like
the service. Its own tables (naive_*), in a database of its own.

    python -m loadtest.naive_server --database-url URL [--listen 127.0.0.1:0] [--pool-connections-max 16]
        [--seed-merchants N --seed-members N]

With --seed-*, empty tables are filled first with the network `python -m processor seed` creates
(same ids, give-back rates and starting balances). Prints "SERVING on HOST:PORT"; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import asyncpg
import grpc
import uvloop
from google.protobuf import timestamp_pb2

from loadtest import workload
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc

SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_merchants (
    merchant_id   text PRIMARY KEY,
    give_back_bps integer NOT NULL CHECK (give_back_bps BETWEEN 300 AND 2000)
);
CREATE TABLE IF NOT EXISTS naive_balances (
    member_id text PRIMARY KEY,
    balance   bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS naive_transactions (
    transaction_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            smallint NOT NULL,
    merchant_id     text NOT NULL,
    member_id       text NOT NULL,
    points          bigint NOT NULL,
    purchase_amount bigint,
    idempotency_key text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (merchant_id, idempotency_key)
);
"""
# The same network as Store.seed_network: merchant g has give-back 300 + (g*37) % 1701 bps; member g
# earned once, at merchant 1 + (g*7919) % merchants, a purchase of `purchase` minor units.
SEED_MERCHANTS = """
INSERT INTO naive_merchants
SELECT $2::text || lpad(g::text, 6, '0'), 300 + (g * 37) % 1701 FROM generate_series(1, $1) g
"""
SEED_MEMBERS = """
INSERT INTO naive_balances
SELECT $4::text || lpad(g::text, 7, '0'), $2::bigint * (300 + ((1 + (g::bigint * 7919) % $1) * 37) % 1701) / 10000
FROM generate_series(1, $3) g
"""
EARN_BALANCE = """
INSERT INTO naive_balances (member_id, balance) VALUES ($1, $2)
ON CONFLICT (member_id) DO UPDATE SET balance = naive_balances.balance + excluded.balance
RETURNING balance
"""
REDEEM_BALANCE = """
UPDATE naive_balances SET balance = balance - $1 WHERE member_id = $2 AND balance >= $1 RETURNING balance
"""
INSERT_TRANSACTION = """
INSERT INTO naive_transactions (kind, merchant_id, member_id, points, purchase_amount, idempotency_key)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING transaction_id, created_at
"""
KIND_EARN, KIND_REDEEM = 1, 3


def _timestamp(moment) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class NaiveServicer(points_pb2_grpc.PointsServiceServicer):
    def __init__(self, pool: asyncpg.Pool, give_back_bps: dict[str, int]):
        self.pool = pool
        self.give_back_bps = give_back_bps  # merchants do not change while it runs

    async def _merchant(self, merchant_id: str, context) -> int:
        bps = self.give_back_bps.get(merchant_id)
        if bps is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"merchant {merchant_id!r} is not in the alliance")
        return bps

    async def Earn(self, request: pb.EarnRequest, context) -> pb.EarnResponse:
        bps = await self._merchant(request.merchant_id, context)
        if not request.member_id or request.purchase_amount <= 0 or not request.idempotency_key:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "member_id, purchase_amount > 0 and idempotency_key are required"
            )
        points = request.purchase_amount * bps // 10_000
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                balance = await connection.fetchval(EARN_BALANCE, request.member_id, points)
                row = await connection.fetchrow(
                    INSERT_TRANSACTION,
                    KIND_EARN,
                    request.merchant_id,
                    request.member_id,
                    points,
                    request.purchase_amount,
                    request.idempotency_key,
                )
        except asyncpg.UniqueViolationError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "idempotency_key used before")
        return pb.EarnResponse(
            transaction_id=f"txn_{row['transaction_id']}",
            points=points,
            balance=balance,
            give_back_bps=bps,
            created_at=_timestamp(row["created_at"]),
        )

    async def Redeem(self, request: pb.RedeemRequest, context) -> pb.RedeemResponse:
        await self._merchant(request.merchant_id, context)
        if not request.member_id or request.points <= 0 or not request.idempotency_key:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "member_id, points > 0 and idempotency_key are required"
            )
        insufficient = False
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                balance = await connection.fetchval(REDEEM_BALANCE, request.points, request.member_id)
                if balance is None:
                    insufficient = True
                else:
                    row = await connection.fetchrow(
                        INSERT_TRANSACTION,
                        KIND_REDEEM,
                        request.merchant_id,
                        request.member_id,
                        request.points,
                        None,
                        request.idempotency_key,
                    )
        except asyncpg.UniqueViolationError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "idempotency_key used before")
        if insufficient:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"member {request.member_id!r} has no account or fewer than {request.points} point-units",
            )
        return pb.RedeemResponse(
            transaction_id=f"txn_{row['transaction_id']}", points=request.points, balance=balance, available=balance
        )


async def prepare(pool: asyncpg.Pool, seed_merchants: int, seed_members: int) -> dict[str, int]:
    """Creates the tables, seeds an empty network if asked, and returns the merchants' rates."""
    async with pool.acquire() as connection:
        await connection.execute(SCHEMA)
        if seed_merchants and not await connection.fetchval("SELECT EXISTS (SELECT 1 FROM naive_merchants)"):
            async with connection.transaction():
                await connection.execute(SEED_MERCHANTS, seed_merchants, workload.MERCHANT_ID_PREFIX)
                await connection.execute(
                    SEED_MEMBERS,
                    seed_merchants,
                    workload.SEED_PURCHASE_PER_MEMBER,
                    seed_members,
                    workload.MEMBER_ID_PREFIX,
                )
            await connection.execute("ANALYZE naive_merchants; ANALYZE naive_balances")
        rows = await connection.fetch("SELECT merchant_id, give_back_bps FROM naive_merchants")
    return {row["merchant_id"]: row["give_back_bps"] for row in rows}


async def serve(args: argparse.Namespace) -> None:
    pool = await asyncpg.create_pool(
        args.database_url, min_size=args.pool_connections_max, max_size=args.pool_connections_max
    )
    give_back_bps = await prepare(pool, args.seed_merchants, args.seed_members)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    points_pb2_grpc.add_PointsServiceServicer_to_server(NaiveServicer(pool, give_back_bps), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {args.listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"naive points service SERVING on {args.listen.rpartition(':')[0]}:{port} "
        f"({len(give_back_bps)} merchants, pool {args.pool_connections_max})",
        flush=True,
    )
    await stop.wait()
    await server.stop(1)
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--database-url", required=True, help="a database of its own (naive_* tables)")
    parser.add_argument("--pool-connections-max", type=int, default=16)
    parser.add_argument("--seed-merchants", type=int, default=0)
    parser.add_argument("--seed-members", type=int, default=0)
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
