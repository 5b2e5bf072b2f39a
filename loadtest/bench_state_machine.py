"""The state machine's apply on its own (no gRPC, no Postgres): µs of CPU per operation for batches of
1,000 (70% earn / 30% redeem, Zipf members, 200 merchants), with and without a program in force
(ops/program.example.json). What it measures is the part of the service's CPU that issue 14 stage 2
moves into the kernel.

    .venv/bin/python -m loadtest.bench_state_machine [--batches 30] [--members 20000] [--profile] [--kernel-only]

--apply-only N [--plain]: applies the first N of --batches batches and prints nothing, for an instruction
count that the machine's load does not move: run it under `valgrind --tool=callgrind` at two N (say 2
and 12, --batches 20) and divide the difference of the totals by the operations between them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import time

from processor import domain, rules
from processor.config import Settings
from processor.domain import Method, Operation
from processor.program import ProgramState
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import MerchantRow

import fastpath

NOW_US = 1_800_000_000_000_000
OPERATOR = {
    domain.ACCOUNT_OPERATOR_FEE_REVENUE: 1,
    domain.ACCOUNT_OPERATOR_BREAKAGE: 2,
    rules.ACCOUNT_OPERATOR_TIER_REWARDS: 3,
    rules.ACCOUNT_OPERATOR_PROMOTIONS: 4,
    rules.ACCOUNT_OPERATOR_REFERRALS: 5,
    rules.ACCOUNT_OPERATOR_ACQUIRING: 6,
    rules.ACCOUNT_OPERATOR_DIVIDENDS: 7,
}


def machine(program: bool, members: int, merchants: int) -> LedgerStateMachine:
    m = LedgerStateMachine(Settings())
    m.ledger = fastpath.Ledger(members + 10, 10_000, 2_000_000)
    m.merchants = Merchants(
        [
            MerchantRow(
                f"merchant-{i}",
                i + 1,
                1_000,
                "active",
                fee_redeemed_bps=100,
                fee_issued_bps=50,
                issued_account_id=100 + 4 * i,
                redeemed_account_id=101 + 4 * i,
                fees_account_id=102 + 4 * i,
                acquiring_account_id=103 + 4 * i,
            )
            for i in range(merchants)
        ]
    )
    m.operator_accounts = dict(OPERATOR)
    m.ids = IdAllocator(1, 1)
    m.account_ids = list(range(10_000, 10_000 + members + 10))
    if program:
        config = json.loads(pathlib.Path("ops/program.example.json").read_text())
        version = rules.version_from_config("alliance", 1, 0, config)
        m.program = ProgramState(rules.Program("alliance", (version,)))
    return m


def batches(count: int, members: int, merchants: int, seed: int = 7) -> list[list[Operation]]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(members)]
    out = []
    key = 0
    for _ in range(count):
        drawn = rng.choices(range(members), weights, k=1_000)
        batch = []
        for member in drawn:
            merchant = rng.randrange(merchants)
            key += 1
            if rng.random() < 0.7:
                purchase = rng.randrange(1_000, 50_000)
                fields = {"member_id": f"member-{member}", "points": purchase // 10, "purchase_amount": purchase}
                method = Method.EARN
            else:
                fields = {"member_id": f"member-{member}", "points": rng.randrange(1, 200)}
                method = Method.REDEEM
            batch.append(Operation(method, f"merchant-{merchant}", merchant + 1, f"k{key}", dict(fields), **fields))
        out.append(batch)
    return out


def measure(
    program: bool, args: argparse.Namespace, kernel: bool = True, per_batch: list[float] | None = None
) -> float:
    """µs of CPU per operation over every batch; `per_batch` gets each batch's (the median and the
    minimum of those move less than the mean with other processes on the machine)."""
    m = machine(program, args.members, args.merchants)
    m.rules_kernel = kernel
    work = batches(args.batches, args.members, args.merchants)
    took = 0.0
    for i, batch in enumerate(work):
        started = time.process_time()
        m.apply(batch, {}, NOW_US + i * 1_000_000)
        m.commit()
        spent = time.process_time() - started
        took += spent
        if per_batch is not None:
            per_batch.append(spent / len(batch) * 1e6)
    return took / (len(work) * 1_000) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--apply-only", type=int, default=None, metavar="N", help="apply N batches, print nothing")
    parser.add_argument("--plain", action="store_true", help="with --apply-only: no program in force")
    parser.add_argument(
        "--kernel-only",
        action="store_true",
        help="only the program through the rules kernel, with the median and minimum of its batches",
    )
    args = parser.parse_args()
    if args.apply_only is not None:
        m = machine(not args.plain, args.members, args.merchants)
        for i, batch in enumerate(batches(args.batches, args.members, args.merchants)[: args.apply_only]):
            m.apply(batch, {}, NOW_US + i * 1_000_000)
            m.commit()
        return
    if args.profile:
        import cProfile
        import pstats

        cProfile.runctx("measure(True, args)", globals(), {"args": args, "measure": measure}, "/tmp/sm.prof")
        pstats.Stats("/tmp/sm.prof").sort_stats("tottime").print_stats(25)
        return
    if args.kernel_only:
        spread: list[float] = []
        ruled = measure(True, args, per_batch=spread)
        print(
            f"fastpath={fastpath.IMPLEMENTATION} apply µs/op (CPU), program, rules kernel: {ruled:.2f} "
            f"(per batch: median {statistics.median(spread):.2f}, min {min(spread):.2f})"
        )
        return
    plain = measure(False, args)
    ruled = measure(True, args)
    per_operation = measure(True, args, kernel=False)
    print(
        f"fastpath={fastpath.IMPLEMENTATION} apply µs/op (CPU): no program {plain:.1f}; program, rules kernel "
        f"{ruled:.1f} ({ruled / plain:.2f}x); program, per-operation rules {per_operation:.1f} "
        f"({per_operation / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
