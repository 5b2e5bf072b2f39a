"""The program's apply as the members gather lots: batch by batch, µs of CPU an operation with the program
in force and without it (the two state machines interleaved batch by batch in one process, so the
machine's load moves both alike), the ratio, and the lots the batch's members held when it began (Σ over
the distinct members of the batch, an operation: what a layout that copies a touched member's lots whole
copied at least once a batch), and the most lots a member held.

    .venv/bin/python -m loadtest.lots_history [--batches 40] [--members 20000] [--every 5] [--rounds 1]

The parts of the program's apply that a member's lots cost (perf_counter around each call, in µs an
operation of the batch): the run's pool of lots (_kernel_lots), the lots after each run (lots_after_run)
and their write-back (written_by_kernel), check_lots, flush; `young`, a young pass of the collector
after the batch's apply and commit (the collector is paused in the apply, as the service pauses it: the
pass walks what the batch left tracked); `walked`, the references that pass walks (Σ of its objects'
referents, counted before it: load-independent), and `copied`, the references to lots the runs' new
values of the members' lots hold that their values before did not share (a whole tuple's, or a
LotChain's new chunks' and its tuple of chunks'), both an operation.

The workload is loadtest/bench_state_machine's (70% earn / 30% redeem, Zipf members, 200 merchants,
ops/program.example.json); the collector runs with the service's thresholds (pipeline.tune_collector),
its passes inside the batch that set them off. With --rounds N, each batch's figures are the medians of N
runs of the whole sequence.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import defaultdict

from loadtest.bench_state_machine import NOW_US, batches, machine


def _lots_held(program, batch) -> tuple[int, int]:
    members = {op.member_id for op in batch}
    lots = program.lots
    held = sum(len(lots.get(member_id, ())) for member_id in members)
    return held, max(map(len, lots.values()), default=0)


PARTS = ("pool", "after_run", "written", "check_lots", "flush", "young", "walked", "copied")
_spent: dict[str, float] = defaultdict(float)  # part -> seconds in the program's batch being applied
_timing = False  # the program's machine is applying (the plain one's collector passes are not counted)


def _timed(part: str, function):
    def timed(*arguments, **keywords):
        started = time.perf_counter()
        try:
            return function(*arguments, **keywords)
        finally:
            if _timing:
                _spent[part] += time.perf_counter() - started

    return timed


def _copied(rows) -> int:
    """References the rows' new lots values hold that their values before did not share."""
    copied = 0
    for row in rows:
        after, before = row[1], row[5]
        if after is before:
            continue
        chunks = getattr(after, "chunks", None)
        if chunks is None:
            copied += len(after)
            continue
        shared = {id(chunk) for chunk in getattr(before, "chunks", (before,))}
        copied += len(chunks) + sum(len(chunk) for chunk in chunks if id(chunk) not in shared)
    return copied


def _counted(function):
    def counted(*arguments):
        rows = function(*arguments)
        if _timing:
            _spent["copied"] += _copied(rows) / 1e6  # (per operation in millionths, as the times are)
        return rows

    return counted


def _instrument() -> None:
    """Wraps the parts' functions where the state machine calls them (the compiled ones included)."""
    from processor import program, rules_kernel

    rules_kernel._lots_after_run = _counted(_timed("after_run", rules_kernel._lots_after_run))
    mixin = rules_kernel.RulesKernelMixin
    mixin._kernel_lots = _timed("pool", mixin._kernel_lots)  # type: ignore[method-assign]
    state = program.ProgramState
    state.written_by_kernel = _timed("written", state.written_by_kernel)  # type: ignore[method-assign]
    state.check_lots = _timed("check_lots", state.check_lots)  # type: ignore[method-assign]
    state.flush = _timed("flush", state.flush)  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> list[tuple[float, float, int, int, dict[str, float]]]:
    """Per batch: (program µs/op, plain µs/op, lots of its members, most lots of a member, the parts'
    µs/op of the program's apply)."""
    global _timing
    ruled = machine(True, args.members, args.merchants)
    plain = machine(False, args.members, args.merchants)
    out = []
    for index, batch in enumerate(batches(args.batches, args.members, args.merchants)):
        held, most = _lots_held(ruled.program, batch)
        spent = []
        for state_machine in (ruled, plain):
            _spent.clear()
            _timing = state_machine is ruled
            gc.disable()
            started = time.process_time()
            state_machine.apply(batch, {}, NOW_US + index * 1_000_000)
            state_machine.commit()
            if _timing:
                _spent["walked"] = sum(len(gc.get_referents(tracked)) for tracked in gc.get_objects(0)) / 1e6
                resumed = time.process_time()
                young = time.perf_counter()
                gc.collect(0)
                _spent["young"] = time.perf_counter() - young
                started += time.process_time() - resumed  # (the count is not the batch's work; the pass is)
            else:
                gc.collect(0)
            gc.enable()
            spent.append((time.process_time() - started) / len(batch) * 1e6)
            if _timing:
                parts = {part: _spent[part] / len(batch) * 1e6 for part in PARTS}
            _timing = False
        out.append((spent[0], spent[1], held, most, parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="print every Nth batch (and the first)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    _instrument()
    rounds = [run(args) for _ in range(args.rounds)]
    gc.collect()
    print(
        "batch  program µs/op  plain µs/op  ratio  lots of its members /op  most lots of a member  |  "
        + "  ".join(PARTS)
    )
    totals = [0.0, 0.0]
    for index in range(args.batches):
        program = statistics.median(r[index][0] for r in rounds)
        plain = statistics.median(r[index][1] for r in rounds)
        parts = [statistics.median(r[index][4][part] for r in rounds) for part in PARTS]
        totals[0] += program
        totals[1] += plain
        held, most = rounds[0][index][2:4]
        if index == 0 or (index + 1) % args.every == 0:
            print(
                f"{index + 1:5d}  {program:13.2f}  {plain:11.2f}  {program / plain:5.2f}  "
                f"{held / 1_000:23.2f}  {most:21d}  |  " + "  ".join(f"{value:.3f}" for value in parts)
            )
    print(f"all    {totals[0] / args.batches:13.2f}  {totals[1] / args.batches:11.2f}  {totals[0] / totals[1]:5.2f}")


if __name__ == "__main__":
    main()
