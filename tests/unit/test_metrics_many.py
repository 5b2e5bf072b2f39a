"""metrics.observe_many: the same histogram as observe() called that many times (it reaches into
prometheus_client's buckets, so a library upgrade that changes them fails here, not in production)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from processor import metrics


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for m in histogram.collect()
        for s in m.samples
        if "created" not in s.name
    }


def test_observe_many_equals_repeated_observe():
    one, many = (
        Histogram(f"h_{name}", "test", buckets=metrics.LATENCY_BUCKETS, registry=CollectorRegistry())
        for name in ("one", "many")
    )
    for amount, count in ((0.00005, 3), (0.0123, 1), (0.5, 250), (10_000.0, 2), (0.1, 0), (0.002, 7)):
        for _ in range(count):
            one.observe(amount)
        metrics.observe_many(many, amount, count)
    expected = {(name.replace("h_one", "h_many"), le): v for (name, le), v in samples(one).items()}
    got = samples(many)
    assert expected[("h_many_count", "")] == 263
    # the sum is added as amount * count, not count times: equal up to rounding
    assert got.pop(("h_many_sum", "")) == pytest.approx(expected.pop(("h_many_sum", "")), rel=1e-12)
    assert got == expected
