"""domain.TokenBuckets.take (the per-merchant rate limit, once an operation) against the code it replaced:
the same answers and the same bucket state over random sequences of merchants and times."""

import random

from processor import domain


class _Before:
    """TokenBuckets.take as it was written before (a default tuple, float() and min() each call)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True


def test_take_answers_and_keeps_its_buckets_as_before():
    rng = random.Random(14)
    for _ in range(200):
        rate, burst = rng.choice([0.0, 0.001, 0.5, 3.0, 1_000.0]), rng.randrange(1, 12)
        now, after, before = rng.uniform(0, 1e6), domain.TokenBuckets(rate, burst), _Before(rate, burst)
        for _ in range(300):
            now += rng.choice([0.0, 0.0, 1e-4, 0.01, 0.3, 2.0])
            key = rng.choice("abc")
            assert after.take(key, now) == before.take(key, now)
            assert after._buckets == before._buckets
