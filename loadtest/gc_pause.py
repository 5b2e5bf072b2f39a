"""What Python's cyclic garbage collector walks after heavy load, and how long a full (gen2) pass takes:
this tree against a base tree (another checkout of the repository, built), side by side.

Each variant runs in a child process of its own (its tree's `processor` and `fastpath` on the path): the
state machine with ops/program.example.json in force (loadtest.bench_state_machine's machine and
batches: 1,000 operations a batch, 70% earn / 30% redeem, Zipf members, 200 merchants) applies and
commits --operations operations, as the committer does, with the collector on. What was there before
the run (imports, the machine, the pre-built batches) is collected and frozen first (gc.freeze(), as
the service freezes what recovery loaded), so a pass walks what the run left, as in the service.

Printed per variant, per round: objects the collector tracks after the run (gc.get_objects(), which
leaves out the frozen) and the most numerous types; a full pass's time (gc.callbacks, start to stop, of
--passes forced gc.collect() calls: median and max); the automatic gen2 passes during the run (count,
longest); apply CPU per operation (time.process_time over apply + commit, automatic collections
included: median of the batches and over the run); each batch's BatchWrite through the batch log's
encode and decode (CPU per operation; decode is the projector's, rebuilding the records); resident
memory (VmRSS) after the run. Rounds alternate the variants' order.

    .venv/bin/python -m loadtest.gc_pause --base /tmp/records-base [--operations 100000] [--rounds 3]
    .venv/bin/python -m loadtest.gc_pause --base /tmp/records-base --cpu [--operations 40000] [--rounds 6]
    .venv/bin/python -m loadtest.gc_pause --micro [--rounds 3]

--micro, in this process: each operation on a record (construction, replace, a field read, ==, hash, a
Lot's key) timed on the compiled Lot and MemberRules and on frozen slots dataclasses of the same fields
(what they were), interleaved, best of --rounds rounds of timeit's best of 5; ns per operation.

--cpu measures only the apply's CPU, the collector off (the code's own cost, what the collector's passes
would add left out): per child, --repeats runs of the same batches on a fresh machine each, the fastest
and the median run's µs per operation (the machine is shared: the fastest run moves least with others'
load).

The base tree: `git archive <commit> | tar -x -C DIR` and, in DIR, `<this venv>/bin/python setup.py
build_ext --inplace` (its Cython extensions and stubs). Without --base only this tree is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve()
TREE = HERE.parents[1]


def child(operations: int, members: int, merchants: int, passes: int) -> dict[str, object]:
    """Runs in the variant's tree: the run, then the heap and the passes over it."""
    import collections
    import gc

    from loadtest import bench_state_machine as bench
    from processor import batch_log

    count = max(1, operations // 1_000)
    machine = bench.machine(True, members, merchants)
    work = bench.batches(count, members, merchants)
    gc.collect()
    gc.freeze()  # imports, the machine, the pre-built operations: not what the run leaves behind

    automatic: list[float] = []
    started_at = [0.0]
    forced = [False]

    def timed(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started_at[0] = time.perf_counter()
        elif not forced[0]:
            automatic.append(time.perf_counter() - started_at[0])

    gc.callbacks.append(timed)
    per_batch = []
    took = encoding = decoding = 0.0
    for i, batch in enumerate(work):
        started = time.process_time()
        _, write = machine.apply(batch, {}, bench.NOW_US + i * 1_000_000)
        machine.commit()
        spent = time.process_time() - started
        took += spent
        per_batch.append(spent / len(batch) * 1e6)
        started = time.process_time()
        payload = batch_log.encode(write)
        encoded = time.process_time()
        batch_log.decode(i + 1, batch_log.FORMAT_VERSION, payload)
        decoding += time.process_time() - encoded
        encoding += encoded - started
        del write, payload

    forced[0] = True
    pause = []
    for _ in range(passes):
        started = time.perf_counter()
        gc.collect()
        pause.append(time.perf_counter() - started)
    gc.callbacks.remove(timed)
    tracked = gc.get_objects()
    types = collections.Counter(type(o).__qualname__ for o in tracked).most_common(8)
    program = machine.program
    earns = len(program.earns) if program is not None else 0
    lots = sum(map(len, program.lots.values())) if program is not None else 0
    rss_kb = 0
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return {
        "tracked": len(tracked),
        "types": types,
        "pause_ms": [p * 1e3 for p in pause],
        "automatic_ms": [p * 1e3 for p in automatic],
        "apply_us_per_op": took / (count * 1_000) * 1e6,
        "apply_us_per_op_median": statistics.median(per_batch),
        "encode_us_per_op": encoding / (count * 1_000) * 1e6,
        "decode_us_per_op": decoding / (count * 1_000) * 1e6,
        "rss_mb": rss_kb / 1024,
        "earn_records": earns,
        "lots": lots,
        "operations": count * 1_000,
    }


def child_cpu(operations: int, members: int, merchants: int, repeats: int) -> dict[str, object]:
    """Runs in the variant's tree: the apply's CPU with the collector off, `repeats` times."""
    import gc

    from loadtest import bench_state_machine as bench

    count = max(1, operations // 1_000)
    work = bench.batches(count, members, merchants)
    gc.disable()
    runs = []
    for _ in range(repeats):
        machine = bench.machine(True, members, merchants)
        took = 0.0
        for i, batch in enumerate(work):
            started = time.process_time()
            machine.apply(batch, {}, bench.NOW_US + i * 1_000_000)
            machine.commit()
            took += time.process_time() - started
        runs.append(took / (count * 1_000) * 1e6)
        del machine
        gc.collect()
    return {"fastest": min(runs), "median": statistics.median(runs), "runs": runs}


def micro(rounds: int) -> None:
    import dataclasses
    import timeit

    from processor import program, rules

    @dataclasses.dataclass(frozen=True, slots=True)
    class Lot:
        lot_id: int
        amount: int
        expires_at_us: int | None
        issuer_id: str

        @property
        def key(self) -> tuple[int, int | None]:
            return (self.lot_id, self.expires_at_us)

    @dataclasses.dataclass(frozen=True, slots=True)
    class MemberRules:
        acquirer_id: str | None = None
        referrer_id: str | None = None
        referral_paid: bool = False
        level: str = ""
        levels_reached: int = 0
        qualifying: int = 0
        day_buckets: tuple[tuple[int, int], ...] = ()

    expires = 1_800_000_000_000_000
    variants = {
        "dataclass": (Lot, MemberRules, dataclasses.replace),
        "compiled": (rules.Lot, program.MemberRules, None),
    }
    statements = {
        "Lot(...) by position": "L(7, 500, E, 'merchant-1')",
        "Lot replace(amount=)": "rep(a, amount=3) if rep else a.replace(amount=3)",
        "Lot .amount": "a.amount",
        "Lot .key": "a.key",
        "Lot == equal Lot": "a == b",
        "hash(Lot)": "hash(a)",
        "MemberRules(...) by position": "M(None, 'm2', True, 'gold', 3, 1200, ())",
        "MemberRules replace(qualifying=)": "rep(m, qualifying=5) if rep else m.replace(qualifying=5)",
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for name, (lot, rules_type, replace) in variants.items():
            names = {
                "L": lot,
                "M": rules_type,
                "E": expires,
                "rep": replace,
                "a": lot(123_456_789, 500, expires, "merchant-1"),
                "b": lot(123_456_789, 500, expires, "merchant-1"),
                "m": rules_type("shop", None, False, "gold", 1, 700, ((20_000, 700),)),
            }
            for label, statement in statements.items():
                took = min(timeit.repeat(statement, globals=names, number=100_000, repeat=5)) / 100_000 * 1e9
                best[(label, name)] = min(best.get((label, name), took), took)
    print(f"ns per operation, best of {rounds} rounds (load {os.getloadavg()[0]:.2f}):")
    for label in statements:
        print(f"  {label:<34} dataclass {best[(label, 'dataclass')]:7.1f}   compiled {best[(label, 'compiled')]:7.1f}")


def run_variant(tree: pathlib.Path, args: argparse.Namespace) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("POINTS_FASTPATH", None)
    done = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--child",
            "--operations",
            str(args.operations),
            "--members",
            str(args.members),
            "--merchants",
            str(args.merchants),
            "--passes",
            str(args.passes),
            "--repeats",
            str(args.repeats),
            *(["--cpu"] if args.cpu else []),
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=1_800,
    )
    if done.returncode != 0:
        raise SystemExit(f"the run in {tree} failed:\n{done.stderr}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def show(name: str, r: dict) -> str:
    pause = r["pause_ms"]
    automatic = r["automatic_ms"]
    types = ", ".join(f"{t} {n}" for t, n in r["types"][:6])
    return (
        f"  {name:<6} tracked {r['tracked']:7d} | full pass {statistics.median(pause):6.2f} ms "
        f"(max {max(pause):6.2f}) | automatic gen2 during the run {len(automatic)}, longest "
        f"{max(automatic, default=0):6.2f} ms | apply {r['apply_us_per_op']:5.2f} µs/op (median batch "
        f"{r['apply_us_per_op_median']:5.2f}) | batch log encode {r['encode_us_per_op']:4.2f}, decode "
        f"{r['decode_us_per_op']:4.2f} µs/op | RSS {r['rss_mb']:6.0f} MB | earn records {r['earn_records']}, "
        f"lots {r['lots']}\n           top types: {types}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=pathlib.Path, help="a built checkout of the base commit")
    parser.add_argument("--operations", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--passes", type=int, default=5, help="forced full collections timed after the run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro", action="store_true", help="the records' operations, compiled and dataclass")
    parser.add_argument("--cpu", action="store_true", help="the apply's CPU alone, the collector off")
    parser.add_argument("--repeats", type=int, default=5, help="--cpu: runs per child [5]")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if sys.path and pathlib.Path(sys.path[0]).resolve() == HERE.parent:
            del sys.path[0]  # the variant's tree (PYTHONPATH) must be found first, not this directory
        if args.cpu:
            print(json.dumps(child_cpu(args.operations, args.members, args.merchants, args.repeats)))
        else:
            print(json.dumps(child(args.operations, args.members, args.merchants, args.passes)))
        return
    if args.micro:
        micro(args.rounds)
        return
    variants = [("this", TREE)] + ([("base", args.base.resolve())] if args.base else [])
    print(
        f"{args.operations} operations with the program, {args.members} members, {args.merchants} merchants; "
        f"load {os.getloadavg()[0]:.2f} at start (2 cores)"
    )
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_number in range(args.rounds):
        order = variants if round_number % 2 == 0 else variants[::-1]
        print(f"round {round_number + 1} (load {os.getloadavg()[0]:.2f})")
        for name, tree in order:
            result = run_variant(tree, args)
            results[name].append(result)
            if args.cpu:
                runs = " ".join(f"{r:.2f}" for r in result["runs"])
                print(
                    f"  {name:<6} apply µs/op, collector off: fastest {result['fastest']:.2f}, median "
                    f"{result['median']:.2f} (runs {runs})",
                    flush=True,
                )
            else:
                print(show(name, result), flush=True)
    print("over the rounds (range):")
    for name, runs in results.items():
        if args.cpu:
            fastest = [r["fastest"] for r in runs]
            median = [r["median"] for r in runs]
            print(
                f"  {name:<6} fastest {min(fastest):.2f}-{max(fastest):.2f} (median {statistics.median(fastest):.2f}), "
                f"median run {min(median):.2f}-{max(median):.2f} µs/op"
            )
            continue
        pause = [statistics.median(r["pause_ms"]) for r in runs]
        apply = [r["apply_us_per_op"] for r in runs]
        decode = [r["decode_us_per_op"] for r in runs]
        tracked = [r["tracked"] for r in runs]
        print(
            f"  {name:<6} tracked {min(tracked)}-{max(tracked)}, full pass "
            f"{min(pause):.2f}-{max(pause):.2f} ms, apply {min(apply):.2f}-{max(apply):.2f} µs/op, decode "
            f"{min(decode):.2f}-{max(decode):.2f} µs/op, "
            f"RSS {min(r['rss_mb'] for r in runs):.0f}-{max(r['rss_mb'] for r in runs):.0f} MB"
        )
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
