"""The projection's transaction plans its keyed writes as probes of the tables' keys
(store.PROJECTION_PLANNER, set by its first statement, store.PROJECTION_MARK): with hash joins allowed,
Postgres planned the lots a batch deletes as a sequential scan and a hash of the whole lots table, each
projection, while the table was below a few hundred thousand rows (auto_explain: ~4 ms a projection at
90k lots, growing with the table; the whole bench's lots DELETE 4.4 s -> 0.1 s of Postgres). The
settings are local to the projection's transaction."""

from __future__ import annotations

import json

import asyncpg

from processor import store
from tests.harness import run

LOTS = 30_000
MEMBERS = 3_000
DELETED = 600


def _nodes(plan: dict) -> list[dict]:
    found = [plan]
    for child in plan.get("Plans", ()):
        found += _nodes(child)
    return found


async def _plans(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            f"""INSERT INTO lots (member_id, lot_id, expires_at_us, issuer_id, amount)
                SELECT 'm' || (g % {MEMBERS}), g, 1800000000000000 + g * 1000, 'shop', 5
                FROM generate_series(1, {LOTS}) g;
                ANALYZE lots"""
        )
        keys = [(f"m{g % MEMBERS}", g, 1_800_000_000_000_000 + g * 1000) for g in range(1, LOTS, LOTS // DELETED)]
        columns = [list(column) for column in zip(*keys)]
        async with connection.transaction():
            assert await connection.fetchval(store.PROJECTION_MARK) == 0
            plan = json.loads(await connection.fetchval("EXPLAIN (FORMAT JSON) " + store.LOTS_DELETE, *columns))
            nodes = _nodes(plan[0]["Plan"])
            on_lots = [n for n in nodes if n.get("Relation Name") == "lots" and n["Node Type"] != "ModifyTable"]
            assert on_lots and all(node["Node Type"] == "Index Scan" for node in on_lots), nodes
            assert {node["Index Name"] for node in on_lots} == {"lots_pkey"}
            assert not any(node["Node Type"] in ("Hash Join", "Merge Join") for node in nodes), nodes
            assert await connection.execute(store.LOTS_DELETE, *columns) == f"DELETE {len(keys)}"
            assert await connection.fetchval("SHOW enable_hashjoin") == "off"
        # local to that transaction: the service's other transactions plan as Postgres likes
        assert await connection.fetchval("SHOW enable_hashjoin") == "on"
        assert await connection.fetchval("SHOW enable_mergejoin") == "on"
        assert await connection.fetchval("SELECT count(*) FROM lots") == LOTS - len(keys)
    finally:
        await connection.close()


def test_a_projection_deletes_lots_by_probes_of_their_key(create_database):
    run(_plans(create_database(migrated=True)))
