"""velocity.add against its definition: the spends with `points` added to at_us's minute bucket, the
buckets older than a day dropped, oldest first. Over histories built by add itself (as ProgramState's
are), spends in the newest bucket, after it, before it (loaded out of order), and a day or more later
(so the shortcut that skips the walk when nothing is dropped is held to the general case)."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from processor import velocity


def _defined(spends: velocity.Spends, points: int, at_us: int) -> velocity.Spends:
    first = (at_us - velocity.WINDOW_US_MAX) // velocity.BUCKET_US
    buckets = dict(spends)
    bucket = at_us // velocity.BUCKET_US
    buckets[bucket] = buckets.get(bucket, 0) + points
    return tuple(sorted((b, p) for b, p in buckets.items() if b >= first))


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32))
def test_add_is_its_definition(seed):
    rng = random.Random(seed)
    now_us = 1_800_000_000_000_000 + rng.randrange(velocity.DAY_US)
    spends: velocity.Spends = ()
    for _ in range(rng.choice([0, 1, 3, 30, 200])):
        at_us = now_us - rng.randrange(2 * velocity.DAY_US) if rng.random() < 0.3 else now_us
        now_us += rng.choice([0, 1, velocity.BUCKET_US, 7 * velocity.BUCKET_US])
        points = rng.randrange(1, 50)
        expected = _defined(spends, points, at_us)
        spends = velocity.add(spends, points, at_us)
        assert spends == expected
    later = now_us + rng.choice([0, velocity.BUCKET_US, velocity.DAY_US - 1, velocity.DAY_US, 3 * velocity.DAY_US])
    assert velocity.add(spends, 5, later) == _defined(spends, 5, later)
