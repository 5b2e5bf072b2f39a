"""Per-merchant quotas (processor/quotas.py) and the rate limit's retry time: pure counters, no I/O."""

from __future__ import annotations

import dataclasses

import pytest

from processor import domain
from processor.config import Settings
from processor.domain import Code, Rejection
from processor.quotas import HOUR_US, MerchantQuotas


def quotas(**settings) -> MerchantQuotas:
    return MerchantQuotas(dataclasses.replace(Settings(), **settings))


def test_queue_share_refuses_beyond_the_share_and_gives_back_when_decided():
    q = quotas(merchant_queue_operations_max=2)
    q.enqueue("a")
    q.enqueue("a")
    with pytest.raises(Rejection) as raised:
        q.enqueue("a")
    assert raised.value.code is Code.RESOURCE_EXHAUSTED and "merchant_queue_operations_max" in raised.value.message
    q.enqueue("b")  # another merchant's share is its own
    q.dequeued("a")
    q.enqueue("a")
    assert q.queued == {"a": 2, "b": 1}


def test_a_share_at_or_above_the_global_bound_is_no_share():
    q = quotas(queue_operations_max=1000, merchant_queue_operations_max=1000, holds_max=10, merchant_holds_open_max=10)
    for _ in range(1500):
        q.enqueue("a")
    assert all(q.take_hold("a") is None for _ in range(50))


def test_new_members_per_hour_and_zero_point_earns():
    q = quotas(merchant_new_members_per_hour_max=2)
    now = 1_000 * HOUR_US + 5
    refused = q.new_member("a", 0, now)
    assert refused.code is Code.FAILED_PRECONDITION and not refused.recorded
    assert q.new_member("a", 100, now) is None
    assert q.new_member("a", None, now) is None  # a conversion or link counts too
    refused = q.new_member("a", 100, now)
    assert refused.code is Code.RESOURCE_EXHAUSTED and not refused.recorded
    assert "3600 s" in refused.message  # the next hour is 3600 s minus 5 µs away
    assert q.new_member("b", 100, now) is None
    assert q.new_member("a", 100, now + HOUR_US) is None  # a new hour


def test_open_holds_are_counted_given_back_when_refused_and_replaced_by_a_recount():
    q = quotas(merchant_holds_open_max=2)
    assert q.take_hold("a") is None and q.take_hold("a") is None
    assert q.take_hold("a").code is Code.RESOURCE_EXHAUSTED
    q.hold_not_opened("a")
    assert q.take_hold("a") is None
    q.recount_started()
    assert q.take_hold("b") is None  # opened while Postgres was being read
    q.recounted({"a": 1})  # one of a's holds was captured meanwhile
    assert q.holds_open == {"a": 1, "b": 1}
    assert q.take_hold("a") is None and q.take_hold("a").code is Code.RESOURCE_EXHAUSTED


def test_token_bucket_says_how_long_until_the_next_token():
    buckets = domain.TokenBuckets(rate=10.0, burst=2)
    assert buckets.retry_seconds("m", 100.0) == 0.0
    assert buckets.take("m", 100.0) and buckets.take("m", 100.0) and not buckets.take("m", 100.0)
    assert buckets.retry_seconds("m", 100.0) == pytest.approx(0.1)
    assert buckets.retry_seconds("m", 100.05) == pytest.approx(0.05)
    assert domain.TokenBuckets(rate=0, burst=1).retry_seconds("m", 0.0) == 0.0
