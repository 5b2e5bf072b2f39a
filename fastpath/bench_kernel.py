"""Micro-benchmark (not a test): operations per second through the per-operation methods against
apply_batch(), for the compiled module and its pure-Python twin.

    .venv/bin/python -m fastpath.bench_kernel [--operations 100000] [--batch 1000] [--repeat 3]

The same valid operations (earn, authorize, capture, authorize, void, redeem, refund, repeated over
the members) run in batches between begin() and commit(), as the pipeline runs them, on a fresh
ledger each time; the best of --repeat runs is printed. "apply_batch + arrays" also counts building
the int64 input arrays from Python tuples and allocating the outputs, which a caller pays too.
"""

import argparse
import time
from array import array

import fastpath._core
import fastpath._reference

MERCHANT = 1
NOW_US = 1_700_000_000_000_000
LATER_US = NOW_US + 3_600_000_000


def plan(impl, operations_count, members_count):
    """operations_count operations, each answering OK in order: tuples of apply_batch's columns."""
    operations = []
    next_id = 1
    round_number = 0
    while len(operations) < operations_count:
        member = round_number % members_count
        earn, hold, capture, second_hold, redeem, refund = range(next_id, next_id + 6)
        next_id += 6
        operations += [
            (impl.OP_EARN, member, MERCHANT, 100, 0, earn, 0),
            (impl.OP_AUTHORIZE, member, MERCHANT, 50, 0, hold, LATER_US),
            (impl.OP_CAPTURE, 0, MERCHANT, 30, hold, capture, 0),
            (impl.OP_AUTHORIZE, member, MERCHANT, 20, 0, second_hold, LATER_US),
            (impl.OP_VOID, 0, MERCHANT, 0, second_hold, 0, 0),
            (impl.OP_REDEEM, member, MERCHANT, 10, 0, redeem, 0),
            (impl.OP_REFUND, 0, MERCHANT, 5, redeem, refund, 0),
        ]
        round_number += 1
    return operations[:operations_count]


def fresh_ledger(impl, operations_count, members_count):
    ledger = impl.Ledger(members_count, operations_count, operations_count)
    member_ids = [f"member-{number}" for number in range(members_count)]
    for member_id in member_ids:
        ledger.load_member(member_id, 1_000_000)
    return ledger, member_ids


def batches(operations, batch_size):
    return [operations[start : start + batch_size] for start in range(0, len(operations), batch_size)]


def run_per_operation(impl, ledger, member_ids, chunks):
    earn, authorize, capture, void, redeem, refund = (
        ledger.earn,
        ledger.authorize,
        ledger.capture,
        ledger.void,
        ledger.redeem,
        ledger.refund,
    )
    started = time.perf_counter()
    for chunk in chunks:
        ledger.begin()
        for method, member, merchant, points, ref_id, new_id, expires_at_us in chunk:
            if method == impl.OP_EARN:
                status = earn(member_ids[member], merchant, points, new_id)[0]
            elif method == impl.OP_AUTHORIZE:
                status = authorize(member, merchant, points, new_id, expires_at_us)[0]
            elif method == impl.OP_CAPTURE:
                status = capture(ref_id, merchant, points, new_id, NOW_US)[0]
            elif method == impl.OP_VOID:
                status = void(ref_id, merchant, NOW_US)[0]
            elif method == impl.OP_REDEEM:
                status = redeem(member, merchant, points, new_id)[0]
            else:
                status = refund(ref_id, merchant, points, new_id)[0]
            if status != impl.OK:
                raise AssertionError(f"the plan went wrong: status {status}")
        ledger.commit()
    return time.perf_counter() - started


def as_arrays(chunk):
    inputs = [array("q", column) for column in zip(*chunk)]
    outputs = [array("q", bytes(8 * len(chunk))) for _ in range(6)]
    return inputs, outputs


def run_batch(impl, ledger, chunks, prebuilt):
    prepared = [as_arrays(chunk) for chunk in chunks] if prebuilt else None
    started = time.perf_counter()
    for number, chunk in enumerate(chunks):
        inputs, outputs = prepared[number] if prebuilt else as_arrays(chunk)
        ledger.begin()
        ledger.apply_batch(*inputs, NOW_US, *outputs)
        ledger.commit()
        if any(outputs[0]):
            raise AssertionError("the plan went wrong: a status other than OK")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000, help="operations per begin()..commit()")
    parser.add_argument("--members", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    print(
        f"{arguments.operations} operations in batches of {arguments.batch}, "
        f"{arguments.members} members; best of {arguments.repeat}"
    )
    print(f"{'implementation':<16}{'per operation':>16}{'apply_batch':>16}{'+ arrays':>16}{'speed-up':>10}")
    for name, impl in [("cython", fastpath._core), ("python", fastpath._reference)]:
        chunks = batches(plan(impl, arguments.operations, arguments.members), arguments.batch)
        best = {"per operation": float("inf"), "apply_batch": float("inf"), "+ arrays": float("inf")}
        for _ in range(arguments.repeat):
            ledger, member_ids = fresh_ledger(impl, arguments.operations, arguments.members)
            best["per operation"] = min(best["per operation"], run_per_operation(impl, ledger, member_ids, chunks))
            ledger, _ = fresh_ledger(impl, arguments.operations, arguments.members)
            best["apply_batch"] = min(best["apply_batch"], run_batch(impl, ledger, chunks, True))
            ledger.check_invariants()
            ledger, _ = fresh_ledger(impl, arguments.operations, arguments.members)
            best["+ arrays"] = min(best["+ arrays"], run_batch(impl, ledger, chunks, False))
        rates = {key: arguments.operations / seconds for key, seconds in best.items()}
        print(
            f"{name:<16}"
            + "".join(f"{rate:>14,.0f}/s" for rate in rates.values())
            + f"{rates['apply_batch'] / rates['per operation']:>9.1f}x"
        )


if __name__ == "__main__":
    main()
