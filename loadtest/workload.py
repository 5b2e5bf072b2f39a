"""Who does what in the load tests: the seeded network's ids, skewed member and merchant draws, and a
fixed, reproducible list of earn/redeem operations. Pure Python (no grpc), shared by the Locust file,
run.py and bench.py.

The ids are those `python -m processor seed` creates: merchants seed-m-000001.., members
seed-u-0000001.., each member with points from one earn.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random

MERCHANT_ID_PREFIX, MEMBER_ID_PREFIX = "seed-m-", "seed-u-"
MERCHANT_ID_FORMAT = MERCHANT_ID_PREFIX + "{:06d}"
MEMBER_ID_FORMAT = MEMBER_ID_PREFIX + "{:07d}"
# `processor seed --points-per-member` is the purchase of each member's seeding earn (minor units):
# at 3%..20% give-back, 1,000,000 gives every member 30,000..200,000 point-units to redeem from.
SEED_PURCHASE_PER_MEMBER = 1_000_000


def merchant_id(number: int) -> str:
    return MERCHANT_ID_FORMAT.format(number)


def member_id(number: int) -> str:
    return MEMBER_ID_FORMAT.format(number)


def merchant_ids(count: int) -> list[str]:
    return [merchant_id(n) for n in range(1, count + 1)]


class Zipf:
    """Draws 1..count with P(k) proportional to 1/k**exponent (exponent 0 = uniform): a few members
    make most of the traffic, as in a real programme. Bisection over a precomputed cumulative table."""

    def __init__(self, count: int, exponent: float):
        if count < 1:
            raise ValueError("Zipf needs count >= 1")
        self.count = count
        self._cumulative = list(itertools.accumulate(1.0 / k**exponent for k in range(1, count + 1)))
        self._total = self._cumulative[-1]

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self._cumulative, rng.random() * self._total), self.count - 1) + 1

    def share_of_top(self, top: int) -> float:
        """The fraction of draws that fall on the `top` most frequent values."""
        return self._cumulative[min(top, self.count) - 1] / self._total


@dataclasses.dataclass(frozen=True)
class Network:
    """The seeded network the traffic uses and how skewed it is."""

    merchants: int = 200
    members: int = 20_000
    hot_merchants: int = 3  # merchants seed-m-000001.. taking `hot_merchant_share` of traffic
    hot_merchant_share: float = 0.4
    member_exponent: float = 1.0  # Zipf exponent of the member draw

    def __post_init__(self) -> None:
        if self.merchants < 1 or self.members < 1:
            raise ValueError("the network needs at least one merchant and one member")
        if not 0 <= self.hot_merchants <= self.merchants:
            raise ValueError("hot_merchants must be 0..merchants")
        if not 0.0 <= self.hot_merchant_share <= 1.0:
            raise ValueError("hot_merchant_share must be 0..1")


class Traffic:
    """Draws merchants (a few hot ones, the rest uniform) and members (Zipf) of a Network."""

    def __init__(self, network: Network, rng: random.Random):
        self.network = network
        self.rng = rng
        self._members = Zipf(network.members, network.member_exponent)

    def merchant(self) -> str:
        network, rng = self.network, self.rng
        if network.hot_merchants and rng.random() < network.hot_merchant_share:
            return merchant_id(rng.randint(1, network.hot_merchants))
        return merchant_id(rng.randint(1, network.merchants))

    def member(self) -> str:
        return member_id(self._members.draw(self.rng))

    def purchase_amount(self) -> int:
        """A purchase in minor units: 1.00 .. 500.00."""
        return self.rng.randint(100, 50_000)

    def points(self) -> int:
        """Point-units of a redemption or hold: 0.01 .. 20.00 points."""
        return self.rng.randint(1, 2_000)


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    kind: str  # "earn" or "redeem"
    merchant_id: str
    member_id: str
    amount: int  # purchase_amount (earn, minor units) or points (redeem, point-units)


def operations(count: int, network: Network, seed: int, redeem_share: float = 0.25) -> list[Operation]:
    """A fixed list of earns and redeems: the same for the same arguments, on every machine."""
    traffic = Traffic(network, random.Random(seed))
    result = []
    for _ in range(count):
        if traffic.rng.random() < redeem_share:
            result.append(Operation("redeem", traffic.merchant(), traffic.member(), traffic.points()))
        else:
            result.append(Operation("earn", traffic.merchant(), traffic.member(), traffic.purchase_amount()))
    return result
