"""Structured logs with request ids and no secrets; invalid configuration fails at start, clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ROOT, add_merchant
from tests.integration.helpers import cli

pytestmark = pytest.mark.timeout(120)


def test_logs_are_json_lines_with_request_ids_and_never_the_idempotency_key(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = service_factory(url)
    secret_key = "key-that-must-not-be-logged-4711"
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        stub.Earn(pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=100, idempotency_key="e1"))
        call = stub.Redeem.with_call
        with pytest.raises(grpc.RpcError) as raised:
            call(
                pb.RedeemRequest(merchant_id="shop", member_id="m", points=10**6, idempotency_key=secret_key),
                metadata=(("x-request-id", "req-from-caller-1"),),
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("x-request-id", "req-from-caller-1") in tuple(raised.value.initial_metadata())
        _, ok = stub.GetBalance.with_call(pb.GetBalanceRequest(member_id="m"))
        generated = dict(ok.initial_metadata())["x-request-id"]
        assert len(generated) == 32  # a fresh id when the caller sends none
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("req-from-caller-1" in line for line in service.log_lines):
        time.sleep(0.05)
    entries = [json.loads(line) for line in service.log_lines]  # every line is one JSON object
    failed = [e for e in entries if e.get("request_id") == "req-from-caller-1"]
    assert failed and failed[0]["code"] == "FAILED_PRECONDITION" and failed[0]["method"] == "Redeem"
    assert all(secret_key not in line for line in service.log_lines)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--batch-operations-max", "0"], "batch_operations_max must be 1..100000"),
        (["--projection-linger-seconds", "6"], "projection_linger_seconds must be 0..5"),
        (["--listen", "nowhere"], "listen 'nowhere' must be HOST:PORT"),
        (["--idempotency-retention-days", "7"], "idempotency_retention_days must be 0 (forever) or >= 30"),
        (["--database-url", "mysql://x"], "database_url must start with postgresql://"),
    ],
)
def test_invalid_configuration_fails_at_start_naming_the_option(arguments, message):
    result = subprocess.run(
        [sys.executable, "-m", "processor", "serve", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_invalid_environment_variable_is_reported():
    result = subprocess.run(
        [sys.executable, "-m", "processor", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "POINTS_BATCH_OPERATIONS_MAX": "many", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    assert "POINTS_BATCH_OPERATIONS_MAX='many' is not a int" in result.stderr


def test_help_lists_every_option_with_its_default():
    from processor.config import OPTIONS

    result = subprocess.run(
        [sys.executable, "-m", "processor", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    flat = "".join(result.stdout.split())  # argparse wraps lines, at hyphens too
    for option in OPTIONS:
        assert option.flag in flat
        assert "".join(f"env {option.env_name}, default {option.default!r}".split()) in flat


def test_a_listen_address_in_use_stops_the_start_with_one_line_and_no_traceback(create_database):
    """grpcio raises RuntimeError("Failed to bind ...") where it once returned 0: the start says what to fix
    in one line, as for any other address it cannot listen on."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = cli("serve", "--listen", address, "--metrics-listen", "127.0.0.1:0", "--database-url", create_database())
    assert done.returncode != 0
    assert f"cannot listen on {address}: address in use or not available" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
