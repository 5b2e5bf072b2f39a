"""The batch loop's first pass (Ledger.first_pass_plain and first_pass_run, fastpath/_core.pyx) and its
pure-Python twin (fastpath/_reference.py), fed the same ledger, batch and context, take the same
operations into the same columns and stop at the same one; and what the pass stops at is what the state
machine's loop decides on its own (the state machine tests, run with both, hold the loop to that)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath._core
import fastpath._reference
from processor import domain
from processor.config import Settings
from processor.domain import Code, Method, Operation, Outcome
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import MerchantRow, StoredOutcome

LEDGERS = (fastpath._core.Ledger, fastpath._reference.Ledger)
MEMBERS = [f"member-{i}" for i in range(8)]  # member-6 and member-7 are not in the ledger
MERCHANTS = {
    f"merchant-{i}": MerchantRow(
        f"merchant-{i}",
        i + 1,
        give_back_bps=500 * i,
        status="suspended" if i == 3 else "active",
        fee_issued_bps=10 + i,
        fee_redeemed_bps=20 + i,
    )
    for i in range(4)
}  # merchant-4 is unknown
METHODS = (Method.EARN, Method.REDEEM, Method.EARN, Method.REDEEM, Method.AUTHORIZE, Method.CONVERT)


def _ledger(kind: Any) -> Any:
    ledger = kind(20, 10, 10)
    for index, member_id in enumerate(MEMBERS[:6]):
        # member-5 has no account yet (created by an earn this batch): the loop opens it
        ledger.load_member(member_id, 1_000, 0 if index == 5 else 100 + index)
    return ledger


operation = st.builds(
    lambda method, merchant, member, points, purchase, rare, key: Operation(
        method,
        f"merchant-{merchant}",
        merchant + 1,
        f"k{key}",
        {},
        member_id=MEMBERS[member],
        points=points,
        purchase_amount=purchase,
        vouchers=1 if rare == 1 else 0,
        authorization_id=7 if rare == 2 else 0,
        transaction_id=9 if rare == 3 else 0,
        referrer_id="member-1" if rare == 4 else "",
        refusal=Outcome(Code.NOT_FOUND, message="no") if rare == 5 else None,
    ),
    st.sampled_from(METHODS),
    st.integers(0, 4),
    st.integers(0, 7),
    st.sampled_from([0, 1, 50, 2**62, -1]),
    st.sampled_from([0, 1_000, 2**62, -1]),
    st.integers(0, 30),
    st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(operation, max_size=30),
    start=st.integers(0, 5),
    routed=st.sets(st.sampled_from(MEMBERS), max_size=2),
    stored_key=st.sampled_from([None, "k1", "k2"]),
)
def test_first_pass_plain_compiled_and_twin_agree(batch, start, routed, stored_key):
    stored = {(f"merchant-{i}", stored_key): object() for i in range(4)} if stored_key else None
    results = []
    for kind in LEDGERS:
        columns: list[list[int]] = [[] for _ in range(8)]
        context = (MERCHANTS, routed, stored, Method.EARN, Method.REDEEM, *columns)
        ledger = _ledger(kind)
        position, next_id = start, 40
        taken = []
        while position < len(batch):
            position, next_id = ledger.first_pass_plain(context, batch, position, next_id)
            taken.append(position)
            position += 1  # the loop decides this one
        results.append((taken, next_id, columns))
    assert results[0] == results[1]


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(operation, max_size=30),
    start=st.integers(0, 5),
    routed=st.sets(st.sampled_from(MEMBERS), max_size=2),
    refused=st.sets(st.sampled_from(MEMBERS), max_size=3),
    stored_key=st.sampled_from([None, "k1"]),
)
def test_first_pass_run_compiled_and_twin_agree(batch, start, routed, refused, stored_key):
    stored = {(f"merchant-{i}", stored_key): object() for i in range(4)} if stored_key else None
    results = []
    for kind in LEDGERS:
        positions: list[int] = []
        ops: list[Operation] = []
        slots: list[int] = []
        rows: list[int] = []
        fee_bps: list[int] = []
        tier_rows: dict[str, int] = {}
        tier_demand: list[int] = []
        asked: list[tuple[Any, ...]] = []

        def kernel_member(run: Any, tables: Any, op: Operation, now_us: int) -> int:
            asked.append((run, tables, op.member_id, now_us))
            if op.member_id in refused:
                return -1
            row = tier_rows[op.member_id] = len(tier_demand)
            tier_demand.append(0)
            return row

        context = (
            MERCHANTS,
            routed,
            stored,
            Method.EARN,
            Method.REDEEM,
            500,
            1_000,
            fastpath._core.RULES_EARN_POINTS_MAX,
            fastpath._core.RULES_PURCHASE_MAX,
            positions,
            ops,
            slots,
            rows,
            fee_bps,
            tier_rows,
            tier_demand,
            kernel_member,
            "run",
            "tables",
            123,
        )
        ledger = _ledger(kind)
        position = start
        taken = []
        while position < len(batch):
            position = ledger.first_pass_run(context, batch, position)
            taken.append(position)
            position += 1
        results.append((taken, positions, [id(op) for op in ops], slots, rows, fee_bps, tier_rows, tier_demand, asked))
    assert results[0] == results[1]


# --- the state machine with no program: the first pass and plain rows against the loop and _applied ---

OPERATOR = {domain.ACCOUNT_OPERATOR_FEE_REVENUE: 1, domain.ACCOUNT_OPERATOR_BREAKAGE: 2}
SHOPS = [
    MerchantRow(
        f"shop-{i}",
        i + 1,
        1_000,
        "suspended" if i == 2 else "active",
        fee_redeemed_bps=[0, 100, 250][i],
        fee_issued_bps=[50, 0, 10_000][i],
        issued_account_id=10 * i + 11,
        redeemed_account_id=10 * i + 12,
        fees_account_id=10 * i + 13,
        acquiring_account_id=10 * i + 14,
    )
    for i in range(3)
]
SHOPPERS = [f"shopper-{i}" for i in range(12)]
NOW_US = 1_800_000_000_000_000


def _machine(module: Any, first_pass: bool) -> LedgerStateMachine:
    m = LedgerStateMachine(Settings())
    m.ledger = module.Ledger(100, 1_000, 100_000)
    m.merchants = Merchants(list(SHOPS))
    m.operator_accounts = dict(OPERATOR)
    m.ids = IdAllocator(1, 1)
    m.account_ids = list(range(1_000, 1_100))
    m.first_pass = first_pass
    return m


def _plain_operation(rng: random.Random, key: int, authorizations: list[int], transactions: list[int]) -> Operation:
    merchant = rng.choice(SHOPS)
    member = rng.choice(SHOPPERS)
    roll = rng.random()
    fields: dict[str, Any]
    if roll < 0.45:
        purchase = rng.choice([0, 5_000, rng.randrange(1, 40_000)])
        method, fields = Method.EARN, {"member_id": member, "points": purchase // 10, "purchase_amount": purchase}
    elif roll < 0.8:
        method, fields = Method.REDEEM, {"member_id": member, "points": rng.choice([1, 50, rng.randrange(1, 3_000)])}
    elif roll < 0.87:
        method = Method.AUTHORIZE
        fields = {"member_id": member, "points": rng.randrange(1, 1_500), "hold_ttl_seconds": 3_600}
    elif roll < 0.92 and authorizations:
        method, fields = Method.CAPTURE, {"authorization_id": rng.choice(authorizations[-5:]), "points": 0}
    elif roll < 0.96 and transactions:
        method, fields = Method.REFUND, {"transaction_id": rng.choice(transactions), "points": rng.randrange(1, 800)}
    else:
        method, fields = Method.EARN, {"member_id": member, "points": 10, "purchase_amount": 100}
    op = Operation(method, merchant.merchant_id, merchant.merchant_slot, f"k{key}", dict(fields), **fields)
    if rng.random() < 0.03:
        op.refusal = Outcome(Code.NOT_FOUND, message="refused before queueing")
    return op


@pytest.mark.parametrize("seed", range(6))
def test_the_state_machine_with_no_program_answers_the_same_with_and_without_the_first_pass(seed):
    rng = random.Random(seed)
    machines = {
        "loop": _machine(fastpath._core, False),
        "first pass": _machine(fastpath._core, True),
        "twin loop": _machine(fastpath._reference, False),
        "twin first pass": _machine(fastpath._reference, True),
    }
    authorizations: list[int] = []
    transactions: list[int] = []
    key = 0
    taken = 0
    for batch_number in range(25):
        operations = []
        for _ in range(rng.randrange(1, 60)):
            key += 1
            operations.append(_plain_operation(rng, key, authorizations, transactions))
        stored = {}
        if operations and rng.random() < 0.3:  # a retry of an earlier key: replayed by the loop
            replayed = rng.choice(operations)
            stored[(replayed.merchant_id, replayed.idempotency_key)] = StoredOutcome(
                replayed.method.value, dict(replayed.request), Code.OK.value, {"points": 1}, ""
            )
        results = {}
        for name, m in machines.items():
            outcomes, write = m.apply([dataclasses.replace(op) for op in operations], stored, NOW_US + batch_number)
            results[name] = (
                [(o.code, o.fields, o.message, o.replayed, o.recorded) for o in outcomes],
                write.transactions,
                write.entries,
                write.idempotency,
                write.new_members,
                write.new_holds,
                write.resolved_holds,
                write.refunds,
                write.last_transaction_id,
                {member: m.balance(member) for member in SHOPPERS},
            )
        for name in machines:
            for index, (got, want) in enumerate(zip(results[name], results["loop"])):
                assert got == want, f"{name} differs from the loop in part {index}"
        for (code, fields, *_), op in zip(results["loop"][0], operations):
            if code is Code.OK and op.method is Method.AUTHORIZE:
                authorizations.append(fields["authorization_id"])
            elif code is Code.OK and fields.get("transaction_id"):
                transactions.append(fields["transaction_id"])
                taken += op.method in (Method.EARN, Method.REDEEM)
        commit = rng.random() < 0.9
        for m in machines.values():
            m.commit() if commit else m.rollback()
    assert taken > 200  # the common operation was there to be taken
