"""The cost of the program rules, measured side by side in one run: 20 SubmitBatch calls of 1,000 earns
on one service, first with no program version (the plain ledger, whole batches through the kernel), then
with ops/program.example.json in force (tiers, lots, acquiring and referral decided by the rules kernel,
processor/rules_kernel.py). Prints earns/s for both and their ratio. The merchant rate limit is off: it
measures the engine, and a round refused in part by the limit would not measure the rules.

    .venv/bin/python loadtest/bench_rules.py postgresql://postgres@127.0.0.1:5432/<an empty database>
"""

import asyncio
import time
import sys
import json

sys.path.insert(0, ".")
from tests.harness import ServiceProcess, add_merchant
from tests.integration.helpers import unique
from points.v1 import points_pb2 as pb, points_pb2_grpc

url = sys.argv[1]
for m in ("shop-a", "shop-b"):
    add_merchant(url, m, 1000)


async def add_version():
    from processor.store import Store

    store = await Store.open(url, 2)
    config = json.load(open("ops/program.example.json"))
    config.setdefault("promotions", [])
    await store.add_program_version("alliance", None, config, "measure")
    await store.close()


def run(stub, label) -> float:
    members = [unique("m") for _ in range(5000)]

    def ops():
        return [
            pb.Operation(
                earn=pb.EarnRequest(
                    merchant_id="shop-a" if i % 2 else "shop-b",
                    member_id=members[i % 5000],
                    purchase_amount=1_000 + i,
                    idempotency_key=unique("k"),
                )
            )
            for i in range(1000)
        ]

    batches = [ops() for _ in range(20)]
    started = time.perf_counter()
    for b in batches:
        r = stub.SubmitBatch(pb.SubmitBatchRequest(operations=b), timeout=60)
        assert all(x.outcome == pb.OPERATION_OUTCOME_APPLIED for x in r.results)
    took = time.perf_counter() - started
    print(f"{label}: {20_000 / took:,.0f} earns/s (20 x SubmitBatch of 1,000, one client)")
    return 20_000 / took


s = ServiceProcess(url, "--merchant-operations-per-second", "0").start()
try:
    with s.channel() as ch:
        stub = points_pb2_grpc.PointsServiceStub(ch)
        plain = run(stub, "no program (plain ledger, batch kernel)")
        asyncio.run(add_version())
        time.sleep(1.5)  # a version applies 1 s after it is stored
        ruled = run(stub, "program in force (ops/program.example.json: tiers, expiry lots, acquiring, referral)")
        print(f"ratio: the rules cost {plain / ruled:.1f}x")
finally:
    s.kill()
