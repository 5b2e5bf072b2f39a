"""events.balances_after (one walk back over the transactions and their members' points moves; compiled in
fastpath/balances.pyx, its twin events._balances_after_python) gives the same transaction_id -> balance
as the general walk forward it replaced (_balances_after_any_order), in the same order: over the state
machine's own batches with and without a program, over random batches with transfers, vouchers, members
without an account and transactions without a member, and with the entries in any order (then the
general walk answers). The compiled walk and its twin are compared on every batch."""

from __future__ import annotations

import random
import types

from hypothesis import given, settings, strategies as st

import pytest

import fastpath
from loadtest import bench_state_machine as bench
from processor import domain, events

try:
    from fastpath import balances as compiled
except ImportError:  # no build: the twin's tests still run
    compiled = None  # type: ignore[assignment]


def _same(write, ledger) -> dict[int, int]:
    now, before = events.balances_after(write, ledger), events._balances_after_any_order(write, ledger)
    assert now == before
    assert list(now) == list(before)  # the same order: the batch log's payload is the same bytes
    twin = events._balances_after_python(write, ledger)
    assert twin == now and list(twin) == list(now)
    if compiled is not None:
        walked = compiled.balances_after_ordered(write.transactions, write.entries, write.new_members, ledger)
        if walked is not None:  # None: moves out of order, for the general walk (checked equal above)
            assert walked == now and list(walked) == list(now)
    return now


def test_the_state_machines_batches_with_and_without_a_program():
    for program in (False, True):
        machine = bench.machine(program, 2_000, 20)
        for i, batch in enumerate(bench.batches(4, 2_000, 20, seed=11)):
            _, write = machine.apply(batch, {}, bench.NOW_US + i * 1_000_000)
            found = _same(write, machine.ledger)
            assert len(found) == sum(1 for t in write.transactions if t[3])
            machine.commit()


@st.composite
def _batches(draw):
    """A fast path after a batch, and the batch: members a0.. (some new in the batch, some without an
    account), transactions with zero to three entries (their members', another member's: a transfer,
    merchants', some in vouchers), maybe in another order."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    ledger = fastpath.Ledger(64, 16, 16)
    members = [f"a{i}" for i in range(rng.randrange(1, 8))]
    accounts = {}
    for index, member in enumerate(members):
        account = 100 + index if rng.random() < 0.9 else 0
        ledger.load_member(member, rng.randrange(0, 10_000), account)
        accounts[member] = account
    new_members = [(m, a) for m, a in accounts.items() if a and rng.random() < 0.3]
    transactions, entries = [], []
    for transaction_id in range(1, rng.randrange(1, 30)):
        member = rng.choice(members + ["", "unknown"])
        transactions.append((transaction_id, 1, "shop", member, 0))
        for _ in range(rng.randrange(0, 4)):
            account = rng.choice([accounts.get(rng.choice(members)) or 999, accounts.get(member) or 998, 900])
            entry = (transaction_id, account, rng.randrange(-500, 500))
            entries.append(entry + ("VOUCHERS",) if rng.random() < 0.1 else entry + (("POINTS",) * rng.randrange(2)))
    if draw(st.booleans()):
        rng.shuffle(entries)
    return types.SimpleNamespace(new_members=new_members, transactions=transactions, entries=entries), ledger


@settings(max_examples=500, deadline=None)
@given(_batches())
def test_random_batches_in_any_order(batch):
    write, ledger = batch
    _same(write, ledger)


def test_the_compiled_walk_hands_unordered_moves_to_the_general_walk():
    if compiled is None:
        pytest.skip("the compiled fast path is not built")
    ledger = fastpath.Ledger(8, 4, 4)
    ledger.load_member("a", 100, 7)
    transactions = [(1, 1, "shop", "a", 0), (2, 1, "shop", "a", 0)]
    ordered = [(1, 7, 10), (2, 7, 5)]
    assert compiled.balances_after_ordered(transactions, ordered, [], ledger) == {1: 95, 2: 100}
    assert compiled.balances_after_ordered(transactions, ordered[::-1], [], ledger) is None
    # a balance that would leave int64 on the way back: the general walk (Python's integers) answers
    assert compiled.balances_after_ordered(transactions, [(1, 7, -(2**63) + 1), (2, 7, 5)], [], ledger) is None


def test_transactions_out_of_id_order_are_an_invariant_violation():
    ledger = fastpath.Ledger(8, 4, 4)
    ledger.load_member("a", 100, 7)
    write = types.SimpleNamespace(
        new_members=[], transactions=[(2, 1, "shop", "a", 0), (1, 1, "shop", "a", 0)], entries=[(2, 7, 5)]
    )
    with pytest.raises(domain.InvariantViolation, match="id order"):
        events.balances_after(write, ledger)
    with pytest.raises(domain.InvariantViolation, match="id order"):
        events._balances_after_python(write, ledger)
