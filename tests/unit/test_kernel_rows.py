"""fastpath/kernel_rows.pyx (the rules kernel's lots write-back in C) against its pure-Python twin
fastpath/kernel_rows_reference.py: the same random pools and program-state tables must give the same
rows and leave the same tables, undo log and expiry heap. (tests/unit/test_rules_kernel_differential.py
holds the whole kernel path, which calls these, to the per-operation rules path.)"""

from __future__ import annotations

import pathlib
import random
import subprocess
import sys
from array import array
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath
from fastpath import kernel_rows_reference as twin
from fastpath.records import Lot

pytestmark = pytest.mark.timeout(120)

if fastpath.IMPLEMENTATION == "cython":
    from fastpath import kernel_rows as compiled
else:
    compiled = None

needs_compiled = pytest.mark.skipif(compiled is None, reason="the compiled fast path is not in use")
MISSING = object()


def _run(rng: random.Random) -> tuple[Any, ...]:
    """A run's inputs as rules_kernel._kernel_run hands them over: per tier row a member, its lots when
    the run began (sorted, unique keys), the prefix of them its redeems passed into the pool, what the
    kernel left of each pool lot, and the row's new lots at the pool's end."""
    rows = rng.randrange(0, 8)
    tier_members: list[tuple[str, Any, tuple[Lot, ...]]] = []
    prefixes: list[tuple[int, int]] = []
    pool: list[Lot | None] = []
    lot_id = 1
    for row in range(rows):
        lots = []
        for _ in range(rng.choice([0, 0, 1, 2, 5, 20])):
            lots.append(Lot(lot_id, rng.randrange(1, 50), 1_000 + lot_id if rng.random() < 0.9 else None, "shop"))
            lot_id += 1
        passed = rng.randrange(0, len(lots) + 1)
        prefixes.append((len(pool), passed))
        pool.extend(lots[:passed])
        tier_members.append((f"member-{row}", None, tuple(lots)))
    new_by_row: dict[int, list[int]] = {}
    for row in range(rows):
        for _ in range(rng.choice([0, 0, 1, 3])):
            new_by_row.setdefault(row, []).append(len(pool))
            pool.append(Lot(lot_id, rng.randrange(1, 50), 9_000, "shop"))
            lot_id += 1
    lot_amount = array("q", [rng.choice([lot.amount, 0, rng.randrange(0, lot.amount + 1)]) for lot in pool if lot])
    taken_rows = {row for row, (_, passed) in enumerate(prefixes) if passed and rng.random() < 0.8}
    return taken_rows, new_by_row, tier_members, prefixes, pool, lot_amount


def _tables(rng: random.Random, tier_members: list[tuple[str, Any, tuple[Lot, ...]]]) -> dict[str, Any]:
    """ProgramState's tables the write-back updates, in a random state of the batch (some members changed
    before by other paths, some by kernel runs, some with a kept Σ)."""
    tables: dict[str, Any] = {
        "table": {},
        "flushed": {},
        "touched": {},
        "created_by": {},
        "diffs": {},
        "dirty": set(),
        "totals": {},
        "due": [],
    }
    for member_id, _, lots in tier_members:
        if lots or rng.random() < 0.5:
            tables["table"][member_id] = lots
        if rng.random() < 0.3:
            tables["flushed"][member_id] = lots[1:]
            tables["dirty"].add(member_id)
            choice = rng.random()
            tables["touched"][member_id] = None if choice < 0.5 else {(0, None)}
            if rng.random() < 0.5:
                tables["diffs"][member_id] = ([], [])
        if rng.random() < 0.3:
            tables["created_by"][member_id] = {(99, 1)}
        if rng.random() < 0.5:
            tables["totals"][member_id] = (lots, sum(lot.amount for lot in lots))
    return tables


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32))
def test_the_compiled_write_back_and_its_twin_agree_on_random_runs(seed):
    rng = random.Random(seed)
    run = _run(rng)
    twin_rows = twin.lots_after_run(*run)
    compiled_rows = compiled.lots_after_run(*run)
    assert compiled_rows == twin_rows
    for made, expected in zip(compiled_rows, twin_rows):
        assert made[2] is not made[3], "the touched keys and the created keys are two sets"
        if expected[1] is expected[5]:  # a member whose lots did not change keeps its very tuple
            assert made[1] is made[5]
    state_seed = rng.randrange(2**32)
    written = []
    for module, rows in ((twin, twin_rows), (compiled, compiled_rows)):
        tables = _tables(random.Random(state_seed), run[2])
        olds = module.lots_written(rows, *tables.values(), MISSING)
        written.append((tables, olds))
    assert written[0] == written[1]


@pytest.mark.parametrize(
    "module", [pytest.param(twin, id="twin"), pytest.param(compiled, id="compiled", marks=needs_compiled)]
)
def test_a_pool_lot_the_kernel_names_but_no_earn_made_is_an_error(module):
    before = (Lot(1, 10, 1_000, "shop"),)
    with pytest.raises(twin.KernelRowsError, match="never made"):
        module.lots_after_run({0}, {}, [("m", None, before)], [(0, 1)], [None], array("q", [5]))
    with pytest.raises(twin.KernelRowsError, match="never made"):
        module.lots_after_run(set(), {0: [0]}, [("m", None, ())], [(0, 0)], [None], array("q", [5]))


@needs_compiled
def test_the_compiled_write_back_refuses_a_pool_slice_outside_the_pool():
    before = (Lot(1, 10, 1_000, "shop"),)
    with pytest.raises(twin.KernelRowsError, match="pool slice"):
        compiled.lots_after_run({0}, {}, [("m", None, before)], [(0, 2)], [before[0]], array("q", [5]))
    with pytest.raises(ValueError, match="lot_amount"):
        compiled.lots_after_run({0}, {}, [("m", None, before)], [(0, 1)], [before[0]], array("q"))


def test_stubtest_of_the_kernel_rows():
    """fastpath/kernel_rows.pyi says what the compiled module has (its Cython artefacts allowlisted, with why)."""
    if compiled is None:
        pytest.skip("the compiled fast path is not in use")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "fastpath.kernel_rows",
            "--allowlist",
            "fastpath/stubtest_allowlist_kernel_rows.txt",
        ],
        cwd=pathlib.Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
