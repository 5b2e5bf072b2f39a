"""The write of a batch's idempotency records on its own: INSERT ... SELECT FROM unnest(...) (as up to
issue 14's stage 4) against COPY (as now), 1,000 records a transaction, interleaved, into two tables
shaped as idempotency_keys, on an embedded Postgres in a temporary directory.

    .venv/bin/python -m loadtest.idempotency_write [--batches 40]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
import warnings

import asyncpg

from processor.store import to_json

COLUMNS = ["merchant_id", "idempotency_key", "method", "request", "outcome", "response", "message", "created_at"]
INSERT = """INSERT INTO ik_insert (merchant_id, idempotency_key, method, request, outcome, response, message, created_at)
            SELECT k.merchant_id, k.idempotency_key, k.method, k.request::jsonb, k.outcome, k.response::jsonb,
                   k.message, $8
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                 AS k(merchant_id, idempotency_key, method, request, outcome, response, message)"""


def records(first: int, count: int) -> list[tuple]:
    return [
        (
            f"merchant-{n % 200}",
            f"order-{n:012d}",
            "Earn",
            to_json({"member_id": f"member-{n % 20_000}", "purchase_amount": 2500}),
            "OK",
            to_json({"transaction_id": n, "points": 250, "balance": 12345, "give_back_bps": 1000, "created_at_us": 1}),
            "",
        )
        for n in range(first, first + count)
    ]


async def measure(url: str, batches: int) -> None:
    connection = await asyncpg.connect(url)
    try:
        for table in ("ik_insert", "ik_copy"):
            await connection.execute(
                f"""CREATE TABLE {table} (merchant_id text NOT NULL, idempotency_key text NOT NULL,
                    method text NOT NULL, request jsonb NOT NULL, outcome text NOT NULL, response jsonb,
                    message text, created_at timestamptz NOT NULL, PRIMARY KEY (merchant_id, idempotency_key));
                    CREATE INDEX ON {table} (created_at)"""
            )
        walls: dict[str, list[float]] = {"INSERT ... unnest": [], "COPY": []}
        first = 0
        for _ in range(batches):
            for how in walls:
                batch, at = records(first, 1_000), dt.datetime.now(dt.timezone.utc)
                first += 1_000
                began = time.perf_counter()
                async with connection.transaction():
                    if how == "COPY":
                        await connection.copy_records_to_table(
                            "ik_copy", columns=COLUMNS, records=[(*r, at) for r in batch]
                        )
                    else:
                        await connection.execute(INSERT, *[list(x) for x in zip(*batch)], at)
                walls[how].append((time.perf_counter() - began) * 1e3)
        for how, values in walls.items():
            values = values[5:]  # the first batches warm the caches
            print(f"{how:<18} median {statistics.median(values):6.2f} ms a batch of 1,000, best {min(values):6.2f}")
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="points-idempotency-write-") as directory:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        server = pgserver.get_server(directory, cleanup_mode="stop")
        try:
            asyncio.run(measure(server.get_uri(), args.batches))
        finally:
            server.cleanup()


if __name__ == "__main__":
    main()
