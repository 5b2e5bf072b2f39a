"""Scale check on a seeded network: recovery time, traffic with a hot merchant, a settlement cut, and
reconciliation, with the figures printed.

    python -m processor seed --database-url URL                # 50,000 merchants, 1,000,000 members
    python -m loadtest.scale --database-url URL [--seconds 20]

Positions are checked against the journal while and after traffic runs (reconcile), and the cut is
timed. A benchmark, not a test: it prints figures and asserts nothing about time.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import subprocess
import sys
import threading
import time
import uuid

import grpc
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc


async def _keys(url: str, merchants: list[str]) -> tuple[str, str]:
    from processor import auth
    from processor.store import Store
    store = await Store.open(url, 2)
    try:
        gateway, operator = auth.new_key(), auth.new_key()
        await store.insert_api_key(gateway.key_id, gateway.secret_sha256, "gateway", merchants, "scale check")
        await store.insert_api_key(operator.key_id, operator.secret_sha256, "operator", [], "scale check")
        return gateway.key, operator.key
    finally:
        await store.close()


async def _reconcile(url: str) -> list[str]:
    from processor.store import Store
    store = await Store.open(url, 2)
    try:
        return await store.ledger_discrepancies()
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic duration")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--merchants-used", type=int, default=1000, help="seeded merchants the traffic uses")
    parser.add_argument("--members", type=int, default=1_000_000, help="seeded members to draw from")
    args = parser.parse_args()

    merchants = [f"seed-m-{i:06d}" for i in range(1, args.merchants_used + 1)]
    hot = merchants[0]
    gateway, operator = asyncio.run(_keys(args.database_url, merchants))
    credential = (("authorization", f"Bearer {gateway}"),)

    started = time.monotonic()
    service = subprocess.Popen([sys.executable, "-m", "processor", "serve", "--listen", "127.0.0.1:0",
                                "--metrics-listen", "127.0.0.1:0", "--database-url", args.database_url],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    target = ""
    for line in service.stdout:
        match = re.search(r"SERVING on (\S+)", line)
        if match:
            target = match.group(1)
            break
    recovery_seconds = time.monotonic() - started
    print(f"service SERVING after {recovery_seconds:.1f} s (recovery of the seeded ledger included)")

    counts = {"ok": 0, "rejected": 0, "hot": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(target) as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)
            while not stop.is_set():
                merchant = hot if rng.random() < 0.3 else rng.choice(merchants)  # one merchant: 30% of traffic
                member = f"seed-u-{int(rng.paretovariate(1.2)) % args.members + 1:07d}"
                key = uuid.uuid4().hex
                try:
                    if rng.random() < 0.6:
                        stub.Earn(points_pb2.EarnRequest(merchant_id=merchant, member_id=member,
                                                         purchase_amount=rng.randint(100, 50_000),
                                                         idempotency_key=key), metadata=credential)
                    else:
                        stub.Redeem(points_pb2.RedeemRequest(merchant_id=merchant, member_id=member,
                                                             points=rng.randint(1, 500), idempotency_key=key),
                                    metadata=credential)
                    outcome = "ok"
                except grpc.RpcError:
                    outcome = "rejected"
                with lock:
                    counts[outcome] += 1
                    counts["hot"] += merchant == hot

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.seconds / 2)

    # a cut in the middle of traffic
    operator_credential = (("authorization", f"Bearer {operator}"),)
    with grpc.insecure_channel(target) as channel:
        clearing = admin_pb2_grpc.ClearingStub(channel)
        cut_off = timestamp_pb2.Timestamp()
        cut_off.GetCurrentTime()
        began = time.monotonic()
        period = clearing.CloseSettlementPeriod(admin_pb2.CloseSettlementPeriodRequest(cut_off=cut_off),
                                                metadata=operator_credential, timeout=600)
        cut_seconds = time.monotonic() - began
    print(f"settlement cut (period {period.period_id}, {period.merchants} merchant statements) "
          f"took {cut_seconds:.2f} s while traffic ran")

    time.sleep(args.seconds / 2)
    stop.set()
    for thread in threads:
        thread.join()
    print(f"traffic: {counts['ok']} operations applied, {counts['rejected']} refused, "
          f"{counts['hot']} at the hot merchant, {args.clients} clients, {args.seconds:.0f} s "
          f"({counts['ok'] / args.seconds:.0f} applied/s)")
    service.terminate()
    service.wait(timeout=60)

    began = time.monotonic()
    problems = asyncio.run(_reconcile(args.database_url))
    print(f"reconcile over the whole ledger took {time.monotonic() - began:.1f} s: "
          f"{'every check holds' if not problems else problems[0]}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
