"""The batch loop's test for route() (processor/state_machine.py, MemberRegistry.needs_route): the
registry's `routed` set stays the keys of its aliases, statuses and households through batches and their
rollbacks; an operation the test lets pass is one route() would leave as it is; and under a program, the
rules kernel's earns and redeems see an alias, a freeze and a household made earlier in the same batch
exactly as the per-operation path does. Both fast paths (compiled and Python)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath._core
import fastpath._reference

from processor.domain import Code, Method, Operation
from processor.member_postings import STATE_CLOSED, STATE_FROZEN, MemberRegistry, MemberStatus
from tests.unit.test_member_postings import admin
from tests.unit.test_rules_kernel_differential import MERCHANTS, NOW
from tests.unit.test_rules_kernel_differential import machine as program_machine

pytestmark = pytest.mark.timeout(60)

IDS = ["m0", "m1", "m2", "m3", "card-0", "card-1"]

# one change of the registry: (table, key, value or None to remove); or a batch boundary
change = st.one_of(
    st.tuples(st.just("alias"), st.sampled_from(IDS), st.one_of(st.none(), st.sampled_from(IDS[:4]))),
    st.tuples(
        st.just("status"),
        st.sampled_from(IDS),
        st.one_of(st.none(), st.sampled_from([STATE_FROZEN, STATE_CLOSED])),
    ),
    st.tuples(st.just("household"), st.sampled_from(IDS), st.one_of(st.none(), st.sampled_from(["hh-1", "hh-2"]))),
    st.tuples(st.just("transferred"), st.sampled_from(IDS), st.integers(1, 5)),
    st.tuples(st.sampled_from(["begin", "commit", "rollback_newest", "rollback"]), st.none(), st.none()),
)


def keys_routed(registry: MemberRegistry) -> set[str]:
    return {*registry.aliases, *registry.statuses, *registry.household_of}


@settings(max_examples=300, deadline=None)
@given(st.lists(change, max_size=40))
def test_routed_is_the_keys_of_aliases_statuses_and_households_through_batches_and_rollbacks(changes):
    registry = MemberRegistry(aliases={"card-0": "m0"}, statuses={"m1": MemberStatus(STATE_FROZEN, "", 1)})
    assert registry.routed == keys_routed(registry)
    registry.begin()
    for table, key, value in changes:
        if table == "alias":
            registry.bind(key, value)
        elif table == "status":
            registry.set_status(key, None if value is None else MemberStatus(value, "", 1))
        elif table == "household":
            registry.set_household(key, value)
        elif table == "transferred":
            registry.add_transferred(key, 1, value)
        elif table == "begin" or registry._undo:  # commit and rollbacks need a batch open
            getattr(registry, table)()
        if not registry._undo:
            registry.begin()
        assert registry.routed == keys_routed(registry)
    registry.rollback()
    assert registry.routed == keys_routed(registry)


until = st.one_of(st.just(0), st.integers(1, 3))


@settings(max_examples=300, deadline=None)
@given(
    aliases=st.dictionaries(st.sampled_from(IDS[4:]), st.sampled_from(IDS[:4]), max_size=2),
    statuses=st.dictionaries(st.sampled_from(IDS[:4]), st.sampled_from([STATE_FROZEN, STATE_CLOSED]), max_size=2),
    households=st.dictionaries(st.sampled_from(IDS[:4]), st.just("hh-1"), max_size=2),
    reversed_by=st.dictionaries(st.integers(1, 3), st.integers(10, 12), max_size=2),
    method=st.sampled_from([Method.EARN, Method.REDEEM, Method.AUTHORIZE, Method.REFUND, Method.LINK, Method.CAPTURE]),
    member=st.sampled_from(IDS + ["", "m9"]),
    transaction_id=until,
    referrer=st.sampled_from(["", "m0", "card-1"]),
)
def test_an_operation_needs_route_lets_pass_is_one_route_leaves_as_it_is(
    aliases, statuses, households, reversed_by, method, member, transaction_id, referrer
):
    registry = MemberRegistry(
        {m: MemberStatus(state, "", 1) for m, state in statuses.items()},
        reversed_by,
        aliases,
        {"hh-1": "m0"} if households else {},
        households,
    )
    op = Operation(method, "shop-0", 1, "k", {}, member_id=member, transaction_id=transaction_id, referrer_id=referrer)
    before = dataclasses.replace(op)
    if not registry.needs_route(op):
        assert registry.route(op) is None
        assert op == before


def redeem(member: str, points: int) -> Operation:
    merchant = MERCHANTS[0]
    fields = {"member_id": member, "points": points}
    return Operation(
        Method.REDEEM, merchant.merchant_id, merchant.merchant_slot, f"r-{member}-{points}", fields, **fields
    )


def earn(member: str, points: int) -> Operation:
    merchant = MERCHANTS[0]
    fields = {"member_id": member, "points": points, "purchase_amount": points * 10}
    return Operation(
        Method.EARN, merchant.merchant_id, merchant.merchant_slot, f"e-{member}-{points}", fields, **fields
    )


@pytest.mark.parametrize("module", [fastpath._core, fastpath._reference], ids=["cython", "python"])
def test_under_a_program_kernel_runs_see_an_alias_a_freeze_and_a_household_made_earlier_in_the_batch(module):
    answers = []
    for kernel in (True, False):
        m = program_machine(module, kernel)
        m.apply([earn("m0", 1_000), earn("m1", 1_000), earn("m2", 500)], {}, NOW)
        m.commit()
        batch = [
            earn("m0", 100),  # the run under way when the operator's operations come
            admin(Method.ADD_ALIAS, "m0", alias="card-0"),
            earn("card-0", 200),  # m0's
            redeem("card-0", 50),
            admin(Method.FREEZE, "m1", reason="lost card"),
            earn("m1", 300),  # a frozen member earns
            redeem("m1", 10),  # and does not spend
            admin(Method.CREATE_HOUSEHOLD, "m2", household_id="hh-1"),
            earn("m2", 400),  # the household's account
            redeem("m2", 100),
            admin(Method.REMOVE_ALIAS, "m0", alias="card-0"),
            redeem("card-0", 10),  # no such member any more
            admin(Method.UNFREEZE, "m1"),
            redeem("m1", 20),
        ]
        outcomes, write = m.apply(batch, {}, NOW + 1_000_000)
        m.commit()
        assert m.members.routed == keys_routed(m.members)
        answers.append(
            (
                [(o.code, o.message, o.fields) for o in outcomes],
                write.transactions,
                sorted(write.entries),
                [m.balance(member) for member in ("m0", "m1", "m2", "card-0", "household:hh-1")],
            )
        )
    kernel, per_operation = answers
    codes = [code for code, _, _ in kernel[0]]
    assert codes == [Code.OK] * 6 + [Code.FAILED_PRECONDITION] + [Code.OK] * 4 + [Code.NOT_FOUND] + [Code.OK] * 2
    assert "is frozen since" in kernel[0][6][1]
    assert kernel == per_operation
    # (levels start at 2,000 qualifying point-units: no uplift here)
    m0, m1, m2, card, household = kernel[3]
    assert m0 == (1_000 + 100 + 200 - 50, 0) and card is None  # the alias's operations were m0's
    assert m1 == (1_000 + 300 - 20, 0)  # frozen: earned, not spent; unfrozen: spent
    assert m2 == (500, 0) and household == (400 - 100, 0)  # the household's account took them
