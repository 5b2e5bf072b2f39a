"""Bounds and faults of the commit pipeline: a full queue sheds load, a broken database connection
fails only the calls of its batch, a second writer is refused, idempotency retention purges."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies, open_store
from tests.integration.idempotency_rows import HOLDING_KEY

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_full_queue_answers_resource_exhausted_and_posts_nothing_for_those(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    # the committer lingers 300 ms for a second operation; the queue holds 2: the rest are shed
    service = service_factory(
        url, "--batch-operations-max", "2", "--queue-operations-max", "2", "--batch-linger-seconds", "0.3"
    )
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        keys = [unique("k") for _ in range(40)]
        futures = [
            stub.Earn.future(
                pb.EarnRequest(merchant_id="shop", member_id="flood", purchase_amount=1000, idempotency_key=key)
            )
            for key in keys
        ]
        accepted, shed = [], []
        for key, future in zip(keys, futures):
            try:
                future.result(timeout=60)
                accepted.append(key)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert "retry" in error.details()
                shed.append(key)
        assert shed, "a queue of 2 behind a 300 ms linger must shed some of 40 concurrent calls"
        assert accepted
        balance = stub.GetBalance(pb.GetBalanceRequest(member_id="flood"))
        assert balance.posted == 100 * len(accepted)
        posted = {r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM transactions")}
        assert posted == set(accepted)
        # a shed call's key is still free: the retry is carried out
        stub.Earn(pb.EarnRequest(merchant_id="shop", member_id="flood", purchase_amount=1000, idempotency_key=shed[0]))
        assert stub.GetBalance(pb.GetBalanceRequest(member_id="flood")).posted == 100 * (len(accepted) + 1)


async def _terminate_service_backends(url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE application_name = 'points-processor' AND datname = current_database()"""
        )
    finally:
        await connection.close()


def test_terminated_database_connections_fail_only_their_batch_and_lose_nothing(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = service_factory(url)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        acknowledged: dict[str, int] = {}
        failed = 0
        for round_number in range(6):
            keys = [unique("k") for _ in range(30)]
            futures = [
                stub.Earn.future(
                    pb.EarnRequest(merchant_id="shop", member_id="m1", purchase_amount=1000, idempotency_key=key)
                )
                for key in keys
            ]
            if round_number % 2 == 1:
                asyncio.run(_terminate_service_backends(url))
            for key, future in zip(keys, futures):
                try:
                    acknowledged[key] = future.result(timeout=60).points
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    failed += 1
        # retrying after the fault works, and each acknowledged key posted exactly once
        deadline = time.monotonic() + 60
        while True:  # the service may be resynchronising: UNAVAILABLE until it is done
            try:
                stub.Earn(
                    pb.EarnRequest(
                        merchant_id="shop", member_id="m1", purchase_amount=1000, idempotency_key="after-fault"
                    )
                )
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "the service did not recover from terminated connections"
                time.sleep(0.05)
        rows = fetch(url, "SELECT idempotency_key, count(*) AS n FROM transactions GROUP BY 1")
        posted = {r["idempotency_key"]: r["n"] for r in rows}
        assert all(n == 1 for n in posted.values())
        assert set(acknowledged) <= set(posted)
        assert stub.GetBalance(pb.GetBalanceRequest(member_id="m1")).posted == 100 * len(posted)
    assert ledger_discrepancies(url) == []


def test_a_second_writer_on_the_same_database_is_refused(create_database, service_factory):
    url = create_database()
    service_factory(url)
    second = ServiceProcess(url)
    with pytest.raises(RuntimeError) as raised:
        second.start()
    assert "another points service is already writing" in str(raised.value)


def test_idempotency_purge_deletes_only_records_older_than_the_cutoff(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = service_factory(url)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for key in ("old", "new"):
            stub.Earn(pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=100, idempotency_key=key))
    # the record's batch row (migration 0023) ages: "old" and "new" were answered in batches of their own
    fetch(url, f"UPDATE idempotency_batches SET created_at = now() - interval '40 days' WHERE {HOLDING_KEY}", "old")

    async def purge():
        store = await open_store(url)
        try:
            return await store.purge_idempotency(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30))
        finally:
            await store.close()

    assert asyncio.run(purge()) == 1
    assert [r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM idempotency_keys")] == ["new"]


def test_per_merchant_rate_limit_sheds_that_merchant_only(create_database, service_factory):
    url = create_database()
    add_merchant(url, "busy", 1000)
    add_merchant(url, "quiet", 1000)
    # a burst of 10, then one operation per 1,000 s: the 11th call inside this test is refused
    service = service_factory(url, "--merchant-operations-per-second", "0.001", "--merchant-burst-operations", "10")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        outcomes = []
        for i in range(15):
            try:
                stub.Earn(
                    pb.EarnRequest(merchant_id="busy", member_id="m", purchase_amount=1000, idempotency_key=f"busy-{i}")
                )
                outcomes.append("OK")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "busy" in error.details() and "operations/s" in error.details()
                outcomes.append("SHED")
        assert outcomes == ["OK"] * 10 + ["SHED"] * 5
        stub.Earn(pb.EarnRequest(merchant_id="quiet", member_id="m", purchase_amount=1000, idempotency_key="q"))
        assert stub.GetBalance(pb.GetBalanceRequest(member_id="m")).posted == 11 * 100
    keys = {r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM transactions")}
    assert keys == {f"busy-{i}" for i in range(10)} | {"q"}


def test_rpcs_in_flight_are_bounded(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    # 4 RPCs at once at most; the committer lingers 300 ms, so 40 concurrent calls overflow the bound
    service = service_factory(url, "--rpcs-in-flight-max", "4", "--batch-linger-seconds", "0.3")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        keys = [unique("k") for _ in range(40)]
        futures = [
            stub.Earn.future(
                pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=1000, idempotency_key=key)
            )
            for key in keys
        ]
        accepted, shed = set(), set()
        for key, future in zip(keys, futures):
            try:
                future.result(timeout=60)
                accepted.add(key)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                shed.add(key)
        assert shed and accepted
        # the service keeps serving once the burst is over
        stub.Earn(pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=1000, idempotency_key="after"))
    posted = {r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM transactions")}
    assert posted == accepted | {"after"}
