"""Lifecycle: health says SERVING only once recovery is done; SIGTERM under load drains, loses nothing
acknowledged and exits 0."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ROOT, ServiceProcess, add_merchant, fetch, ledger_discrepancies

pytestmark = pytest.mark.timeout(180)


def test_sigterm_under_load_answers_or_refuses_every_call_and_loses_nothing(create_database):
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = ServiceProcess(url, "--shutdown-grace-seconds", "20").start()
    keys = [f"k-{uuid.uuid4().hex}" for _ in range(400)]
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        stub.Earn(pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=100, idempotency_key="warm"))
        futures = [
            stub.Earn.future(
                pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=1000, idempotency_key=key)
            )
            for key in keys
        ]
        exit_code = service.terminate(timeout=60)
        acknowledged, refused = set(), set()
        for key, future in zip(keys, futures):
            try:
                future.result(timeout=60)
                acknowledged.add(key)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                refused.add(key)
    assert exit_code == 0
    assert acknowledged, "calls in flight when SIGTERM arrived must be finished within the grace"
    posted = [r["idempotency_key"] for r in fetch(url, "SELECT idempotency_key FROM transactions")]
    assert len(posted) == len(set(posted))
    assert acknowledged <= set(posted)
    assert set(posted) <= set(keys) | {"warm"}
    assert ledger_discrepancies(url) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_is_serving_only_after_recovery_and_calls_before_are_refused(create_database):
    url = create_database()
    credential = (("authorization", "Bearer " + add_merchant(url, "shop", 1000)),)
    # a ledger large enough that recovery takes a moment: 200,000 members with 7 point-units each
    fetch(
        url,
        """WITH m AS (SELECT 'member-' || g AS id FROM generate_series(1, 200000) g),
                    i AS (INSERT INTO members SELECT id, now() FROM m)
                  INSERT INTO accounts (kind, owner_id, asset_code, balance)
                  SELECT 'member', id, 'POINTS', 7 FROM m""",
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "processor",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "127.0.0.1:0",
            "--database-url",
            url,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    observed = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            points = points_pb2_grpc.PointsServiceStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service="points.v1.PointsService"), timeout=5
                    ).status
                except grpc.RpcError:
                    time.sleep(0.01)
                    continue  # not listening yet
                observed.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                try:
                    points.GetBalance(pb.GetBalanceRequest(member_id="member-1"), timeout=5, metadata=credential)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                # else: recovery ended between the health check and the call; the next check says SERVING
            assert observed and observed[-1] == health_pb2.HealthCheckResponse.SERVING
            assert set(observed[:-1]) <= {health_pb2.HealthCheckResponse.NOT_SERVING}
            balance = points.GetBalance(pb.GetBalanceRequest(member_id="member-199999"), metadata=credential)
            assert (balance.posted, balance.available) == (7, 7)
    finally:
        process.kill()
        process.wait(timeout=30)
