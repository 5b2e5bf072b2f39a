"""The projector child's decode and rules rows under the collector, for instruction counts (callgrind).

    .venv/bin/python -m loadtest.projector_collector dump PATH [--batches 20]
    valgrind --tool=callgrind --callgrind-out-file=F .venv/bin/python -m loadtest.projector_collector \
        {on,paused} PATH N

`dump` writes the payloads (batch_log.encode) of --batches batches of the state machine (program in
force, loadtest.bench_state_machine, after 20 not kept) to PATH, outside the measurement. `on` and
`paused` import what the child imports, then decode the first N payloads and build each one's rules rows
(rules_rows.coalesce), one at a time as the child does under SubmitBatch load: `on` with the collector as
the child had it before (on, its heap unfrozen), `paused` as it has it now (gc.freeze() at its start,
projector.collector_paused around each projection). Run at N=2 and N=12: (total12 - total2) / 10,000 is
the instructions an operation.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import sys

import processor.__main__  # noqa: F401  (the child's imports: its heap)
from processor import batch_log, projector, rules_rows


def dump(path: str, count: int) -> None:
    from loadtest.bench_state_machine import NOW_US, batches, machine
    from processor.state_machine import IdAllocator

    m = machine(True, 20_000, 200)
    m.ids = IdAllocator(1_000_000_000, 1_000_000_000)
    skipped = 20
    work = batches(skipped + count, 20_000, 200, seed=7)
    payloads = []
    for i in range(skipped + count):
        _, write = m.apply(work[i], {}, NOW_US + i * 1_000_000)
        m.commit()
        if i >= skipped:
            payloads.append(batch_log.encode(write))
    with open(path, "wb") as out:
        pickle.dump(payloads, out)


def run(mode: str, path: str, count: int) -> None:
    with open(path, "rb") as source:
        payloads = pickle.load(source)[:count]
    paused = contextlib.nullcontext
    if mode == "paused":
        gc.collect()
        gc.freeze()
        paused = projector.collector_paused
    for i, payload in enumerate(payloads):
        with paused():
            write = batch_log.decode(i + 1, batch_log.FORMAT_VERSION, payload)
            if write.rules is not None:
                rules_rows.coalesce([(write.rules, write.created_at)])
            del write


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "dump":
        count = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--batches" else 20
        dump(sys.argv[2], count)
    elif len(sys.argv) == 4 and sys.argv[1] in ("on", "paused"):
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
