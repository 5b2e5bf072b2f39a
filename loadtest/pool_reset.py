"""What a pool connection's reset costs (processor/store.py _reset_pooled): asyncpg's default reset
(`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` sent on every release) against
the store's (nothing sent unless a transaction was left open), on one pool of one connection, each
cycle an acquire, a `SELECT 1` and a release: what a batch's append, a read or a checkpoint does.

Rounds alternate the two resets; per cycle it prints the Postgres backend's CPU (/proc/<pid>/schedstat), this
process's CPU and the wall time, and the ratio of the medians. On DATABASE_URL's server if set, else on
an embedded one in a temporary directory.

    .venv/bin/python -m loadtest.pool_reset [--cycles 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import asyncpg

from loadtest import harness
from processor.store import _reset_pooled


async def cycles(url: str, reset, count: int) -> tuple[float, float, float]:
    """(Postgres µs, client µs, wall µs) per acquire / SELECT 1 / release cycle."""
    options = {} if reset is None else {"reset": reset}
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1, **options)
    try:
        async with pool.acquire() as connection:
            pid = connection.get_server_pid()
        backend, client, wall = harness.precise_cpu_seconds(pid), time.process_time(), time.perf_counter()
        for _ in range(count):
            async with pool.acquire() as connection:
                await connection.fetchval("SELECT 1")
        backend = harness.precise_cpu_seconds(pid) - backend
        client, wall = time.process_time() - client, time.perf_counter() - wall
    finally:
        await pool.close()
    return 1e6 * backend / count, 1e6 * client / count, 1e6 * wall / count


async def measure(url: str, count: int, rounds: int) -> None:
    figures: dict[str, list[tuple[float, float, float]]] = {"asyncpg default": [], "store": []}
    for _ in range(rounds):
        for name, reset in (("asyncpg default", None), ("store", _reset_pooled)):
            figure = await cycles(url, reset, count)
            figures[name].append(figure)
            print(
                f"{name:16s} per cycle: Postgres {figure[0]:6.1f} µs, client {figure[1]:6.1f} µs, "
                f"wall {figure[2]:6.1f} µs",
                flush=True,
            )
    medians = {name: [statistics.median(f[i] for f in runs) for i in range(3)] for name, runs in figures.items()}
    for i, what in enumerate(("Postgres CPU", "client CPU", "wall")):
        base, store = medians["asyncpg default"][i], medians["store"][i]
        print(f"{what:12s} median: default {base:6.1f} µs, store {store:6.1f} µs ({store / base:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if url:
        asyncio.run(measure(url, args.cycles, args.rounds))
    else:
        harness.on_embedded_postgres("points-pool-reset-", lambda u: measure(u, args.cycles, args.rounds))


if __name__ == "__main__":
    main()
