"""fastpath/kernel_rows.pyx (the rules kernel's lots write-back in C) against its pure-Python twin
fastpath/kernel_rows_reference.py: the same random pools and program-state tables must give the same
rows and leave the same tables, undo log and expiry heap. (tests/unit/test_rules_kernel_differential.py
holds the whole kernel path, which calls these, to the per-operation rules path.)"""

from __future__ import annotations

import pathlib
import random
from array import array
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath
from fastpath import kernel_rows_reference as twin
from fastpath.lot_chain import CHUNK_LOTS_MAX, LotChain
from fastpath.records import Lot

pytestmark = pytest.mark.timeout(120)

if fastpath.IMPLEMENTATION == "cython":
    from fastpath import kernel_rows as compiled
else:
    compiled = None

needs_compiled = pytest.mark.skipif(compiled is None, reason="the compiled fast path is not in use")
MISSING = object()


def _chain(rng: random.Random, lots: Any) -> tuple[Lot, ...] | LotChain:
    """`lots` as ProgramState holds a member's: a tuple of at most CHUNK_LOTS_MAX, else a LotChain cut into
    random chunks (as splices leave them)."""
    lots = list(lots)
    if len(lots) <= CHUNK_LOTS_MAX:
        return tuple(lots)
    chunks = []
    start = 0
    while start < len(lots):
        size = rng.randrange(1, CHUNK_LOTS_MAX + 1) if rng.random() < 0.5 else rng.choice([1, 2, 3])
        chunks.append(tuple(lots[start : start + size]))
        start += size
    return LotChain(chunks)


def _run(rng: random.Random) -> tuple[Any, ...]:
    """A run's inputs as rules_kernel._kernel_run hands them over: per tier row a member, its lots when
    the run began (sorted, unique keys), the prefix of them its redeems passed into the pool, what the
    kernel left of each pool lot, and the row's new lots at the pool's end."""
    rows = rng.randrange(0, 8)
    tier_members: list[tuple[str, Any, tuple[Lot, ...] | LotChain]] = []
    prefixes: list[tuple[int, int]] = []
    pool: list[Lot | None] = []
    lot_id = 1
    for row in range(rows):
        lots = []
        for _ in range(rng.choice([0, 0, 1, 2, 5, 20, 400])):
            lots.append(Lot(lot_id, rng.randrange(1, 50), 1_000 + lot_id if rng.random() < 0.9 else None, "shop"))
            lot_id += 1
        passed = rng.randrange(0, len(lots) + 1)
        prefixes.append((len(pool), passed))
        pool.extend(lots[:passed])
        tier_members.append((f"member-{row}", None, _chain(rng, lots)))
    new_by_row: dict[int, list[int]] = {}
    for row in range(rows):
        for _ in range(rng.choice([0, 0, 1, 3])):
            new_by_row.setdefault(row, []).append(len(pool))
            pool.append(Lot(lot_id, rng.randrange(1, 50), 9_000, "shop"))
            lot_id += 1
    lot_amount = array("q", [rng.choice([lot.amount, 0, rng.randrange(0, lot.amount + 1)]) for lot in pool if lot])
    taken_rows = {row for row, (_, passed) in enumerate(prefixes) if passed and rng.random() < 0.8}
    return taken_rows, new_by_row, tier_members, prefixes, pool, lot_amount


def _tables(rng: random.Random, tier_members: list[tuple[str, Any, tuple[Lot, ...] | LotChain]]) -> dict[str, Any]:
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
            tables["flushed"][member_id] = _chain(rng, lots[1:])
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
    row_of = {member_id: row for row, (member_id, _, _) in enumerate(run[2])}
    assert compiled_rows == twin_rows
    for made, expected in zip(compiled_rows, twin_rows):
        assert made[2] is not made[3], "the touched keys and the created keys are two sets"
        if expected[1] is expected[5]:  # a member whose lots did not change keeps its very chain
            assert made[1] is made[5]
        else:  # the same form and chunks (the splice of fastpath/lot_chain.pyx and its twin's)
            assert type(made[1]) is type(expected[1])
            assert getattr(made[1], "chunks", None) == getattr(expected[1], "chunks", None)
            # the lots in chunks new to the chain are those the run passed or made, and at most two
            # chunks' worth around them (the rest of the chunk the passed lots end in, the last chunk
            # the new lots join): the chunks it did not reach are the very ones of the chain before
            before_chunks = {id(chunk) for chunk in getattr(made[5], "chunks", ())}
            fresh = sum(
                len(chunk) for chunk in getattr(made[1], "chunks", (made[1],)) if id(chunk) not in before_chunks
            )
            passed, new = run[3][row_of[made[0]]][1], len(run[1].get(row_of[made[0]], ()))
            assert fresh <= passed + new + 2 * CHUNK_LOTS_MAX
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


def _check_state(rng: random.Random) -> tuple[Any, ...]:
    """check_lots' inputs: members with lots (some with a kept Σ, some of it stale), their balances
    (some exceeded by their lots), and which of them a batch changed."""
    table: dict[str, Any] = {}
    totals: dict[str, tuple[Any, int]] = {}
    balances: dict[str, tuple[int, int]] = {}
    lot_id = 1
    for index in range(rng.randrange(0, 12)):
        member_id = f"member-{index}"
        lots = []
        for _ in range(rng.choice([0, 1, 2, 5, 20, 150])):
            lots.append(Lot(lot_id, rng.randrange(1, 50), 1_000 + lot_id, "shop"))
            lot_id += 1
        chain = _chain(rng, lots)
        if lots or rng.random() < 0.5:
            table[member_id] = chain
        total = sum(lot.amount for lot in lots)
        if rng.random() < 0.4:
            kept = chain if rng.random() < 0.7 else _chain(rng, lots[1:])
            totals[member_id] = (table.get(member_id, kept) if rng.random() < 0.7 else kept, total)
        posted = total + rng.choice([0, 0, 5, 100]) - (rng.randrange(1, 3) if rng.random() < 0.1 else 0)
        balances[member_id] = (max(posted, 0), rng.choice([0, 0, min(3, max(posted, 0))]))
    dirty = {member_id for member_id in balances if rng.random() < 0.8}
    return dirty, table, totals, rng.choice([1, 2, 16]), balances


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32))
def test_the_compiled_lots_check_and_its_twin_agree(seed):
    """ProgramState.check_lots' loop: the same answer (the first member whose lots exceed posted −
    held, or None) and the same kept sums, whether the Ledger is the compiled one (its arrays read) or
    the twin's (its methods called)."""
    from fastpath import _core, _reference

    answers = []
    for module, ledger_module in ((twin, _reference), (compiled, _core), (compiled, _reference)):
        dirty, table, totals, keep_from, balances = _check_state(random.Random(seed))
        ledger = ledger_module.Ledger(len(balances) + 1, 100, 10)
        for member_id, (posted, held) in balances.items():
            slot = ledger.load_member(member_id, posted, 1)
            if held:
                ledger.load_hold(1 + slot, slot, 1, held, 2**40, 1)
        # the tables' tuples are the state's own, so a kept Σ of the very tuple is found by identity
        answer = module.lots_checked(dirty, table, totals, keep_from, ledger)
        kept = {member: (lots is table.get(member, ()), lots, total) for member, (lots, total) in totals.items()}
        answers.append((answer, kept))
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize(
    "module", [pytest.param(twin, id="twin"), pytest.param(compiled, id="compiled", marks=needs_compiled)]
)
def test_the_lots_check_refuses_a_member_the_ledger_does_not_have(module):
    ledger = fastpath.Ledger(4, 4, 4)
    with pytest.raises(IndexError, match="member slot -1"):
        module.lots_checked({"nobody"}, {"nobody": (Lot(1, 5, 1_000, "shop"),)}, {}, 16, ledger)


@pytest.mark.parametrize(
    "module", [pytest.param(twin, id="twin"), pytest.param(compiled, id="compiled", marks=needs_compiled)]
)
def test_the_operation_columns_of_a_run(module):
    from processor.domain import Method, Operation

    ops = [
        Operation(Method.EARN, "merchant-1", 3, "k1", {}, member_id="m", points=120, purchase_amount=1_200),
        Operation(Method.REDEEM, "merchant-2", 7, "k2", {}, member_id="m", points=40),
    ]
    columns = module.operation_columns(ops, Method.EARN, fastpath.OP_EARN, fastpath.OP_REDEEM)
    assert [list(column) for column in columns] == [
        [fastpath.OP_EARN, fastpath.OP_REDEEM],
        [3, 7],
        [120, 40],
        [1_200, 0],
    ]
    assert all(isinstance(column, array) and column.typecode == "q" for column in columns)


def _member_state(rng: random.Random, program: Any, merchants: dict[str, Any], member_id: str, now_us: int) -> None:
    """A member's rules and lots as the kernel's run may meet them: a referral bonus still to pay or
    paid, an acquirer the service knows or not, lots past their expiry, a lot outliving a new one."""
    from processor.program import MemberRules

    if rng.random() < 0.7:
        program.members[member_id] = MemberRules(
            acquirer_id=rng.choice([None, None, "merchant-1", "merchant-unknown"]),
            referrer_id=rng.choice([None, None, "member-x"]),
            referral_paid=rng.random() < 0.5,
            level=rng.choice(["", "silver"]),
            levels_reached=rng.randrange(0, 4),
            qualifying=rng.randrange(0, 10_000),
        )
    if rng.random() < 0.6:
        expiries = sorted(
            rng.choice([now_us - 5, now_us + 10, now_us + 10**9, 2**62]) for _ in range(rng.randrange(1, 4))
        )
        program.load_lots(member_id, tuple(Lot(i + 1, 5, expires, "merchant-1") for i, expires in enumerate(expiries)))


@pytest.mark.skipif(compiled is None, reason="the compiled fast path is not in use")
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32))
def test_the_compiled_kernel_member_and_its_twin_agree(seed):
    """RulesKernelMixin._kernel_member (the twin) and fastpath.kernel_rows.kernel_member: the same tier
    row or -1 for every operation of a run, and the same run's columns."""
    import json
    import types

    from processor import rules
    from processor.domain import Method, Operation
    from processor.program import ProgramState
    from processor.rules_kernel import EarnRedeemRun, KernelTables, RulesKernelMixin

    config = json.loads((pathlib.Path(__file__).resolve().parents[2] / "ops/program.example.json").read_text())
    version = rules.version_from_config("alliance", 1, 0, config)
    now_us = 1_800_000_000_000_000
    results = []
    for member in (RulesKernelMixin._kernel_member_twin, compiled.kernel_member):
        rng = random.Random(seed)
        program = ProgramState(rules.Program("alliance", (version,)))
        merchant = types.SimpleNamespace(merchant_slot=1)
        machine = types.SimpleNamespace(
            program=program, merchants=types.SimpleNamespace(by_id={"merchant-1": merchant})
        )
        for index in range(6):
            _member_state(rng, program, machine.merchants.by_id, f"member-{index}", now_us)
        tables = KernelTables.of(version)
        run = EarnRedeemRun()
        rows = []
        for _ in range(12):
            member_id = f"member-{rng.randrange(6)}"
            op = Operation(Method.EARN, "merchant-1", 1, "k", {}, member_id=member_id, points=10, purchase_amount=100)
            rows.append(member(machine, run, tables, op, now_us))
        results.append(
            (rows, run.tier_rows, run.tier_members, run.tier_demand, run.tier_qualifying, run.tier_reached)
            + (run.tier_acquirer, run.tier_acquiring_bps)
        )
    assert results[0] == results[1]


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32))
def test_the_compiled_flush_rows_and_their_twins_agree(seed):
    """ProgramState.flush's rows: the same rows, in the same order, from the same dirty keys and tables."""
    rng = random.Random(seed)
    keys = {rng.randrange(40) for _ in range(rng.randrange(0, 30))}
    table = {rng.randrange(40): rng.choice([0, 1, (), ("row",), None]) for _ in range(rng.randrange(0, 30))}
    diffs = {key: rng.choice([None, ([], []), ([1], [])]) for key in keys if rng.random() < 0.5}
    created = {rng.randrange(40): {(rng.randrange(9), 1)} for _ in range(rng.randrange(0, 10))}
    for module in (twin, compiled):
        assert list(module.rows_of(keys, table).items()) == list(twin.rows_of(keys, table).items())
        assert list(module.rows_of(keys, table, ()).items()) == list(twin.rows_of(keys, table, ()).items())
        assert list(module.lots_rows(keys, diffs, lambda key: ("changed", key)).items()) == list(
            twin.lots_rows(keys, diffs, lambda key: ("changed", key)).items()
        )
        made = module.created_rows(created, keys)
        assert list(made.items()) == list(twin.created_rows(created, keys).items())
        assert all(made[key] is created[key] for key in made)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32))
def test_the_compiled_pool_of_a_run_and_its_twin_agree(seed):
    """RulesKernelMixin._kernel_lots (the twin) and fastpath.kernel_rows.kernel_lots: the same pool of lots,
    heads, tails, totals and prefixes for random members' lots and demands."""
    from processor.rules_kernel import EarnRedeemRun, RulesKernelMixin

    rng = random.Random(seed)
    run = EarnRedeemRun()
    lot_id = 1
    for row in range(rng.randrange(0, 10)):
        lots = []
        for _ in range(rng.choice([0, 1, 2, 5, 20, 150])):
            lots.append(Lot(lot_id, rng.randrange(1, 50), 1_000 + lot_id, "shop"))
            lot_id += 1
        run.tier_members.append((f"member-{row}", None, _chain(rng, lots)))
        run.tier_demand.append(rng.choice([0, 1, 30, 200, 2_000, 10_000]))
    pools = [member(None, run) for member in (RulesKernelMixin._kernel_lots_twin, compiled.kernel_lots)]
    assert [list(part) if isinstance(part, array) else part for part in pools[0]] == [
        list(part) if isinstance(part, array) else part for part in pools[1]
    ]
    assert all(made is expected for made, expected in zip(pools[1][0], pools[0][0]))
