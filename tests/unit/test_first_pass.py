"""The batch loop's first pass (Ledger.first_pass_plain and first_pass_run, fastpath/_core.pyx) and its
pure-Python twin (fastpath/_reference.py), fed the same ledger, batch and context, take the same
operations into the same columns and stop at the same one; and what the pass stops at is what the state
machine's loop decides on its own (the state machine tests, run with both, hold the loop to that)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath._core
import fastpath._reference
from processor.domain import Code, Method, Operation, Outcome
from processor.store import MerchantRow

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
