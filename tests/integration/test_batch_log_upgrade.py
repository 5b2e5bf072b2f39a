"""An upgrade over an unprojected batch log (processor/batch_log.py, issue 14): batches a version before
payload format 2 appended and did not project (it was SIGKILLed with its projector blocked) are
projected by this version at start-up, each once, with the program's records (lots, earn records with
promotion grants, member rules, consumed pieces) as the old version decided them.

The old version's rows are made from this version's: each unprojected row's payload is decoded and
written again in format 1 (tests/unit/test_batch_log.py's copy of that version's encoder, whose output
a stored sample pins), format_version 1, before the restart, with the batch's idempotency records moved
back into it from their idempotency_batches row (migration 0023: the versions before format 3 carried
them in the payload and had no such row). The upgrade loses none: every acknowledged key has its record
once, and a retry after it replays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from processor import batch_log
from tests.harness import add_merchant, ledger_discrepancies, wait_projected
from tests.integration.helpers import add_program_version, cli, unique, wait_program_in_force
from tests.integration.idempotency_rows import records_of
from tests.integration.test_projection import ProjectionBlocker
from tests.unit.test_batch_log import encode_format_1

pytestmark = pytest.mark.timeout(240)

NOW_US = time.time_ns() // 1000
HOUR_US = 3_600_000_000
LOTS = "SELECT member_id, lot_id, expires_at_us, amount, issuer_id FROM lots"


def _config() -> dict:
    return {
        "expiry_period_us": 10 * 24 * HOUR_US,
        "levels": [
            {"name": "registered", "threshold_point_units": 0},
            {"name": "blue", "threshold_point_units": 1_000, "bonus_point_units": 100, "multiplier_bps": 15_000},
        ],
        "promotions": [
            {
                "promotion_id": "double",
                "start_us": NOW_US - HOUR_US,
                "end_us": NOW_US + 10 * HOUR_US,
                "scope": "merchant",
                "scope_id": "promo-shop",
                "multiplier_bps": 20_000,
                "budget_point_units": 100_000,
                "sponsor_id": "promo-shop",
            }
        ],
    }


def _operations(members: list[str], round_number: int) -> list[pb.Operation]:
    operations = []
    for i, member in enumerate(members):
        merchant = "promo-shop" if i % 2 else "shop"
        operations.append(
            pb.Operation(
                earn=pb.EarnRequest(
                    merchant_id=merchant,
                    member_id=member,
                    purchase_amount=5_000 + 100 * round_number,
                    idempotency_key=unique("k"),
                )
            )
        )
        if round_number:
            operations.append(
                pb.Operation(
                    redeem=pb.RedeemRequest(merchant_id="shop", member_id=member, points=7, idempotency_key=unique("k"))
                )
            )
    return operations


async def _rewrite_as_format_1(url: str) -> list[batch_log.LogEntry]:
    """Every unprojected row's payload written again in format 1, its idempotency records in it (their
    row deleted); returns the batches as decoded before, their records in them."""
    connection = await asyncpg.connect(url)
    try:
        through = await connection.fetchval("SELECT through_batch_id FROM projection_state")
        rows = await connection.fetch(
            "SELECT batch_id, format_version, payload FROM batch_log WHERE batch_id > $1 ORDER BY batch_id", through
        )
        entries = []
        for row in rows:
            assert row["format_version"] == batch_log.FORMAT_VERSION == 3
            write = batch_log.decode(row["batch_id"], row["format_version"], row["payload"])
            assert write.idempotency == []  # in its row
            write = dataclasses.replace(write, idempotency=await records_of(connection, row["batch_id"]))
            assert write.idempotency, "an unprojected batch of operations has its records' row"
            await connection.execute("DELETE FROM idempotency_batches WHERE batch_id = $1", row["batch_id"])
            entries.append(batch_log.LogEntry(row["batch_id"], write))
            await connection.execute(
                "UPDATE batch_log SET format_version = 1, payload = $2 WHERE batch_id = $1",
                row["batch_id"],
                encode_format_1(write),
            )
        return entries
    finally:
        await connection.close()


async def _fetch(url: str, sql: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(sql)
    finally:
        await connection.close()


def test_an_unprojected_log_of_format_1_is_projected_after_the_upgrade(create_database, service_factory):
    url = create_database()
    for merchant in ("shop", "promo-shop"):
        add_merchant(url, merchant, 1000)
    add_program_version(url, _config())
    service = service_factory(url)
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    members = [unique("mem") for _ in range(6)]
    acknowledged: list[tuple[pb.Operation, pb.OperationResult]] = []
    blocker = ProjectionBlocker(url)
    try:
        with service.channel() as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)

            def submit(round_number: int) -> None:
                operations = _operations(members, round_number)
                response = stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=30)
                for operation, result in zip(operations, response.results):
                    assert result.WhichOneof("response") == operation.WhichOneof("operation"), result
                    acknowledged.append((operation, result))

            submit(0)
            wait_projected(url)
            blocker.block()
            for round_number in range(1, 5):
                submit(round_number)  # answered while the projector waits: durable in the log only
            assert blocker.lag() >= 4
        service.kill()
        lots = {
            (r["member_id"], r["lot_id"], r["expires_at_us"]): (r["amount"], r["issuer_id"])
            for r in asyncio.run(_fetch(url, LOTS))
        }
        rewritten = asyncio.run(_rewrite_as_format_1(url))
    finally:
        blocker.close()
    assert len(rewritten) >= 4
    kinds = [e.write.rules for e in rewritten if e.write.rules is not None]
    assert any(r.lots for r in kinds) and any(r.members for r in kinds) and any(r.pieces for r in kinds)
    assert any(e.earn.grants for r in kinds for e in r.earns.values()), "no promotion grant in the old rows"

    restarted = service_factory(url)
    assert ProjectionBlocker(url).lag() == 0, "start-up projects the format-1 log before it serves"
    counts = {
        r["idempotency_key"]: r["n"]
        for r in asyncio.run(_fetch(url, "SELECT idempotency_key, count(*) AS n FROM transactions GROUP BY 1"))
    }
    balances = {}
    for operation, result in acknowledged:
        request = getattr(operation, operation.WhichOneof("operation"))
        assert counts.get(request.idempotency_key) == 1, f"{request.idempotency_key} is not in transactions once"
        balances[request.member_id] = getattr(result, result.WhichOneof("response")).balance  # after it
    records = {
        r["idempotency_key"]: r["n"]
        for r in asyncio.run(_fetch(url, "SELECT idempotency_key, count(*) AS n FROM idempotency_keys GROUP BY 1"))
    }
    assert all(records.get(getattr(o, o.WhichOneof("operation")).idempotency_key) == 1 for o, _ in acknowledged), (
        "an acknowledged operation's idempotency record was lost (or doubled) by the upgrade"
    )
    with restarted.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        assert {m: stub.GetBalance(pb.GetBalanceRequest(member_id=m), timeout=30).posted for m in members} == balances
        # the operations of the old rows, retried after the upgrade: replayed, not posted again
        retried = [o for o, _ in acknowledged[-len(members) * 2 :]]
        answers = stub.SubmitBatch(pb.SubmitBatchRequest(operations=retried), timeout=30).results
        for answer, (_, first) in zip(answers, acknowledged[-len(members) * 2 :], strict=True):
            which = first.WhichOneof("response")
            assert answer.outcome == pb.OPERATION_OUTCOME_REPLAYED and answer.WhichOneof("response") == which
            assert getattr(answer, which) == getattr(first, which)
    # the lots the old rows changed (keys gone, lots new or changed per member), on top of those projected before
    for entry in rewritten:
        for member, (gone, changed) in entry.write.rules.lots.items():
            for lot_id, expires_at_us in gone:
                del lots[(member, lot_id, expires_at_us)]
            for lot in changed:
                lots[(member, lot.lot_id, lot.expires_at_us)] = (lot.amount, lot.issuer_id)
    projected = {
        (r["member_id"], r["lot_id"], r["expires_at_us"]): (r["amount"], r["issuer_id"])
        for r in asyncio.run(_fetch(url, LOTS))
    }
    assert projected == lots and len(lots) >= len(members)
    earns = sum(1 for operation, _ in acknowledged if operation.WhichOneof("operation") == "earn")
    assert asyncio.run(_fetch(url, "SELECT count(*) AS n FROM earn_rules"))[0]["n"] == earns
    assert ledger_discrepancies(url) == []
    reconciled = cli("reconcile", "--database-url", url)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "not yet projected" not in reconciled.stdout
