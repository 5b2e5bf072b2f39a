"""The servicer's SubmitBatch on its own (no gRPC, no Postgres, no committer): µs of CPU per operation
to validate a decoded SubmitBatchRequest of 1,000 (70% earn / 30% redeem, 200 merchants, 20,000
members), build what it queues, and build its response from the outcomes. A stand-in pipeline decides
every operation OK at once, so what is measured is the servicer's own work (issue 14 stage 3).

    .venv/bin/python -m loadtest.bench_servicer [--passes 100] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from points.v1 import points_pb2 as pb
from processor import auth, rpc
from processor.config import Settings
from processor.domain import Code, Method, Outcome
from processor.servicer import PointsServicer
from processor.state_machine import Merchants
from processor.store import MerchantRow


class _Program:
    program = None  # no program in force: no version requires member presence

    def version(self, now_us: int) -> None:
        return None  # no member verification: presence checks are not what this measures


class _Call:
    def __init__(self, ops: list[Any]) -> None:
        self.future = asyncio.get_running_loop().create_future()
        for op in ops:  # every operation decided OK at once, with the fields its response reads: one
            # Outcome per kind, shared, so the stand-in's own work (~0.7 µs/op when it built one per
            # operation) stays out of the servicer's figure
            op.outcome = _EARNED if op.method is Method.EARN else _REDEEMED
        self.future.set_result(None)


_EARNED = Outcome(
    Code.OK,
    {
        "transaction_id": 7,
        "points": 100,
        "balance": 1_000,
        "give_back_bps": 1_000,
        "created_at_us": 1_800_000_000_000_000,
    },
)
_REDEEMED = Outcome(Code.OK, {"transaction_id": 8, "points": 50, "balance": 900, "available": 900})


class _Pipeline:
    """What the servicer reads of the pipeline on SubmitBatch's path."""

    def __init__(self, merchants: int) -> None:
        self.merchants = Merchants(
            [MerchantRow(f"merchant-{i}", i + 1, 1_000, "active") for i in range(merchants)]  # type: ignore[call-arg]
        )
        self.program = _Program()
        self.ready = True
        self.store = object()

    def ready_store(self) -> object:
        return self.store

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        return self.merchants.by_id.get(merchant_id)

    def enqueue_many(self, ops: list[Any], answer: Any = None) -> _Call:
        return _Call(ops)


def request(members: int, merchants: int, seed: int = 7) -> tuple[pb.SubmitBatchRequest, list[str]]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(members)]
    operations = []
    merchant_ids = []
    for i, member in enumerate(rng.choices(range(members), weights, k=1_000)):
        merchant_id = f"merchant-{rng.randrange(merchants)}"
        merchant_ids.append(merchant_id)
        key = f"bench-{seed}-{i}"
        if rng.random() < 0.7:
            earn = pb.EarnRequest(
                merchant_id=merchant_id,
                member_id=f"member-{member}",
                purchase_amount=rng.randrange(1_000, 50_000),
                idempotency_key=key,
            )
            operations.append(pb.Operation(earn=earn))
        else:
            redeem = pb.RedeemRequest(
                merchant_id=merchant_id, member_id=f"member-{member}", points=rng.randrange(1, 200), idempotency_key=key
            )
            operations.append(pb.Operation(redeem=redeem))
    return pb.SubmitBatchRequest(operations=operations), merchant_ids


async def measure(passes: int, members: int = 20_000, merchants: int = 200) -> float:
    """µs of CPU per operation of SubmitBatch's handler, the median of `passes` calls."""
    # the per-merchant rate limit on (as by default), with a rate and burst this run never reaches
    settings = Settings(merchant_operations_per_second=1e9, merchant_burst_operations=10**9)
    servicer = PointsServicer(settings, _Pipeline(merchants))  # type: ignore[arg-type]
    batch, merchant_ids = request(members, merchants)
    rpc.principal.set(auth.Principal("bench", "gateway", frozenset(merchant_ids)))
    took = []
    for _ in range(passes):
        started = time.process_time()
        response = await servicer.SubmitBatch(batch, None)
        took.append(time.process_time() - started)
        if any(result.status_code for result in response.results):
            raise SystemExit(f"an operation was refused: {next(r for r in response.results if r.status_code)}")
    took.sort()
    return took[len(took) // 2] / len(batch.operations) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        import cProfile
        import pstats

        cProfile.runctx("asyncio.run(measure(args.passes))", globals(), {"args": args}, "/tmp/servicer.prof")
        pstats.Stats("/tmp/servicer.prof").sort_stats("tottime").print_stats(25)
        return
    figures = [asyncio.run(measure(args.passes)) for _ in range(args.rounds)]
    print("SubmitBatch handler µs/op (CPU, median of passes), rounds: " + ", ".join(f"{f:.2f}" for f in figures))


if __name__ == "__main__":
    main()
