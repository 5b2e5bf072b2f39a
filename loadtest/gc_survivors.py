"""What one batch's apply leaves to the cyclic collector: the tracked containers it made that are still
alive when apply() returns (the young collection after it walks them: apply() holds the collector off
while it runs), how many of them survive that collection (moved to generation 1, still tracked: the
older generations' passes walk them again until the batch is written and dropped), by type and shape.
Batches and machines as loadtest.bench_state_machine builds them; the batch's result is held across the
collection, as the committer holds it until it is written.

    .venv/bin/python -m loadtest.gc_survivors [--plain] [--warm 5] [--batches 3]

A measurement, not a test: it prints per-operation counts and asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import gc
from typing import Any

from loadtest.bench_state_machine import NOW_US, batches, machine

MEMBERS, MERCHANTS = 20_000, 200


def shape(value: Any) -> tuple[str, str, int]:
    """A container's type, its first item's type (a tuple's: its items' types) and its length (3: 3+)."""
    first = next(iter(value), None) if isinstance(value, (list, set, tuple)) else None
    inner = type(first).__name__
    if isinstance(first, tuple):
        inner += "(" + ",".join(type(item).__name__ for item in first) + ")"
    return type(value).__name__, inner, min(len(value), 3) if isinstance(value, (list, set, tuple)) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="no program in force")
    parser.add_argument("--warm", type=int, default=5, help="batches applied first (members, lots, levels)")
    parser.add_argument("--batches", type=int, default=3, help="batches measured")
    args = parser.parse_args()
    m = machine(not args.plain, MEMBERS, MERCHANTS)
    work = batches(args.warm + args.batches, MEMBERS, MERCHANTS)
    for i in range(args.warm):
        m.apply(work[i], {}, NOW_US + i * 1_000_000)
        m.commit()
    for i in range(args.warm, args.warm + args.batches):
        gc.collect()
        gc.disable()
        try:
            before = {id(o) for o in gc.get_objects(0)}
            result = m.apply(work[i], {}, NOW_US + i * 1_000_000)
            m.commit()
            young = [o for o in gc.get_objects(0) if id(o) not in before]
            older = {id(o) for o in gc.get_objects(1)}
            gc.collect(0)
            survivors = [o for o in gc.get_objects(1) if id(o) not in older]
        finally:
            gc.enable()
        n = len(work[i])
        print(
            f"batch {i}: {len(young) / n:.2f} tracked objects/op after apply (walked by the young collection), "
            f"{len(survivors) / n:.2f}/op survive it"
        )
        by_type = collections.Counter(type(o).__name__ for o in young)
        print("  after apply:", ", ".join(f"{name} {count / n:.2f}" for name, count in by_type.most_common(8)))
        shapes = collections.Counter(shape(o) for o in survivors)
        print("  survivors (type, first item, length):")
        for (kind, inner, length), count in shapes.most_common(10):
            print(f"    {kind}[{inner}] len {length}{'+' if length == 3 else ''}: {count / n:.2f}/op")
        del young, survivors, result


if __name__ == "__main__":
    main()
