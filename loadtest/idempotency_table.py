"""The in-memory idempotency table's per-batch work, this tree against a built base tree: a look-up of
1,000 new keys (IdempotencyTable.maybe_stored, as the committer asks before a batch) and their add
(IdempotencyTable.add, as after its append), against --stored keys already in the table; and a
batch's add that doubles a table of 2**20 slots (786,431 keys: what a table sized too small costs the
committer, once).

    .venv/bin/python -m loadtest.idempotency_table --base /work/wt-base [--rounds 5] [--stored 1000000]

Each round runs one process per tree, in turn (base first in odd rounds, this tree first in even
ones): the process fills its table (reset to the stored count, as a recovery does), then times
--batches batches, each of fresh key strings built before the timer (the service's keys come fresh
from protobuf: their str hashes are computed in the look-up). Times are CPU of the process
(time.process_time), not wall: other work on the machine shifts them less. Prints each tree's medians
over rounds with the spread (min..max) of the rounds' medians. No database. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# run by each tree's own interpreter, in that tree: only the API both trees have
_PROBE = r"""
import json, sys, time
from processor.idempotency import IdempotencyTable
stored, batches, batch = int(sys.argv[1]), int(sys.argv[2]), 1_000
table = IdempotencyTable()
table.reset(stored)
for first in range(0, stored, batch):
    table.add(first // batch + 1, [(f"merchant-{i % 200}", f"order-{i:012d}") for i in range(first, first + batch)])
lookup, add = [], []
batch_id = stored // batch + 1
for n in range(batches):
    keys = [(f"merchant-{i % 200}", f"new-{n}-{i:08d}") for i in range(batch)]  # fresh strings: hashes not cached
    started = time.process_time()
    maybe = table.maybe_stored(list(keys))
    lookup.append(time.process_time() - started)
    started = time.process_time()
    table.add(batch_id + n, keys)
    add.append(time.process_time() - started)
grown = IdempotencyTable(slots=1 << 20)  # filled to just under LOAD_MAX: the next batch doubles it
full = int((1 << 20) * 0.75) - 1
for first in range(0, full, 10 * batch):
    grown.add(1, [("m", f"k-{i}") for i in range(first, min(first + 10 * batch, full))])
started = time.process_time()
grown.add(2, [("m", f"next-{i}") for i in range(batch)])
grow = time.process_time() - started
assert grown.slots == 1 << 21
print(json.dumps({"lookup": sorted(lookup)[len(lookup) // 2], "add": sorted(add)[len(add) // 2], "grow": grow,
                  "false_candidates": len(maybe)}))
"""


def probe(tree: pathlib.Path, stored: int, batches: int) -> dict[str, float]:
    done = subprocess.run(
        [str(tree / ".venv/bin/python"), "-c", _PROBE, str(stored), str(batches)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=1_800,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=pathlib.Path, required=True, help="a built worktree of the base commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "this": ROOT}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        order = ["base", "this"] if round_ % 2 == 0 else ["this", "base"]
        for name in order:
            results[name].append(probe(trees[name], args.stored, args.batches))
        print(f"round {round_ + 1}: " + "; ".join(f"{n} {results[n][-1]}" for n in trees), flush=True)
    print(
        f"\n== {args.stored:,} keys stored; batches of 1,000 new keys; CPU, median of {args.batches} batches a round =="
    )
    for label, field, scale, unit in (
        ("look-up (maybe_stored)", "lookup", 1e3, "µs/op"),
        ("add", "add", 1e3, "µs/op"),
        ("add doubling 2**20 slots", "grow", 1e3, "ms"),
    ):
        for name in trees:
            values = [r[field] * scale for r in results[name]]
            print(
                f"  {label:<24} {name:<5} {statistics.median(values):9.3f} {unit}"
                f"  [{min(values):.3f}..{max(values):.3f}]"
            )


if __name__ == "__main__":
    sys.exit(main())
