"""The /metrics endpoint: counters move by exactly the traffic sent, and the exposition passes promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant

pytestmark = pytest.mark.timeout(120)


def scrape(service) -> str:
    with urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values, name, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def handled(values, method, code) -> float:
    return value(
        values,
        "grpc_server_handled_total",
        grpc_service="points.v1.PointsService",
        grpc_method=method,
        grpc_type="unary",
        grpc_code=code,
    )


def test_counters_move_by_exactly_the_traffic_sent(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = service_factory(url)
    before = samples(scrape(service))
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for i in range(7):  # 7 earns of 100.00 at 10% = 1,000 point-units each
            stub.Earn(
                pb.EarnRequest(
                    merchant_id="shop", member_id="alice", purchase_amount=10_000, idempotency_key=f"earn-{i}"
                )
            )
        stub.Earn(
            pb.EarnRequest(merchant_id="shop", member_id="alice", purchase_amount=10_000, idempotency_key="earn-0")
        )  # a replay: no points move
        for i in range(3):
            stub.Redeem(
                pb.RedeemRequest(merchant_id="shop", member_id="alice", points=500, idempotency_key=f"redeem-{i}")
            )
        for i in range(2):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Redeem(
                    pb.RedeemRequest(
                        merchant_id="shop", member_id="alice", points=10**9, idempotency_key=f"too-much-{i}"
                    )
                )
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError):
            stub.Redeem(pb.RedeemRequest(merchant_id="shop", member_id="alice", points=-1, idempotency_key="neg"))
        stub.GetBalance(pb.GetBalanceRequest(member_id="alice"))
    after = samples(scrape(service))

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert handled(after, "Earn", "OK") - handled(before, "Earn", "OK") == 8
    assert handled(after, "Redeem", "OK") - handled(before, "Redeem", "OK") == 3
    assert handled(after, "Redeem", "FAILED_PRECONDITION") - handled(before, "Redeem", "FAILED_PRECONDITION") == 2
    assert handled(after, "Redeem", "INVALID_ARGUMENT") - handled(before, "Redeem", "INVALID_ARGUMENT") == 1
    assert handled(after, "GetBalance", "OK") - handled(before, "GetBalance", "OK") == 1
    assert (
        moved(
            "grpc_server_handling_seconds_count",
            grpc_service="points.v1.PointsService",
            grpc_method="Redeem",
            grpc_type="unary",
        )
        == 6
    )
    assert moved("points_earned_point_units_total") == 7_000
    assert moved("points_redeemed_point_units_total") == 1_500
    assert moved("points_idempotent_replays_total") == 1
    assert moved("points_fastpath_rejections_total", reason="insufficient_points") == 2
    # 8 earns (one a replay, looked up in its batch) + 3 redeems + 2 refused redeems went through
    # batches; the INVALID_ARGUMENT one was refused before the queue
    assert moved("points_pipeline_batch_operations_sum") == 13
    assert moved("points_pipeline_batches_total", result="committed") >= 1
    assert value(after, "points_pipeline_batches_total", result="failed") == 0
    assert value(after, "points_fastpath_members") == 1
    assert value(after, "points_ready") == 1
    assert value(after, "points_merchants_active") == 1
    assert value(after, "points_pipeline_queue_operations_max") == 20_000
    assert value(after, "process_cpu_seconds_total") > 0


def test_no_metric_has_an_unbounded_label(create_database, service_factory):
    url = create_database()
    add_merchant(url, "shop-with-unique-name", 1000)
    service = service_factory(url)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        stub.Earn(
            pb.EarnRequest(
                merchant_id="shop-with-unique-name",
                member_id="member-with-unique-name",
                purchase_amount=100,
                idempotency_key="key-with-unique-name",
            )
        )
    text = scrape(service)
    # the earn is counted (so the scrape covers it) but under no label naming its merchant, member or key
    assert value(samples(text), "points_earned_point_units_total") == 10  # 10% of a purchase of 100
    assert handled(samples(text), "Earn", "OK") == 1
    assert "unique-name" not in text


@pytest.mark.parametrize("projector", ["in-process", "process"])
def test_exposition_passes_promtool_check_metrics(create_database, service_factory, projector):
    """Both projector modes: --projector process exports the child's CPU as a counter of its own."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs the Debian package prometheus when it can)")
    url = create_database()
    add_merchant(url, "shop", 1000)
    service = service_factory(url, "--projector", projector)
    with service.channel() as channel:
        points_pb2_grpc.PointsServiceStub(channel).Earn(
            pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=100, idempotency_key="k")
        )
    text = scrape(service)
    if projector == "process":
        assert "# TYPE points_projector_cpu_seconds_total counter" in text or (
            "# TYPE points_projector_cpu_seconds counter" in text and "points_projector_cpu_seconds_total " in text
        ), text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
