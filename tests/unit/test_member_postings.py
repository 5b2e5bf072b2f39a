"""Member administration inside the state machine (processor/member_postings.py), with no database: a
freeze refuses a spend later in the same batch, a rolled-back batch leaves no status behind, adjustments
post balanced records within the member's available points, aliases and households route a till's
operation, and every refusal leaves the ledger as it was. Both fast paths (compiled and Python)."""

from __future__ import annotations

import pytest

from processor import domain, kinds
from processor.domain import Code, Method, Operation
from processor.member_postings import ACCOUNT_OPERATOR_ADJUSTMENTS, ACCOUNT_OPERATOR_TRANSFER_FEES, MemberRegistry
from processor.state_machine import LedgerStateMachine
from tests.unit.test_state_machine import NOW, OPERATOR, SHOP, check_record, earn, entries_of, op, posted_held, run
from tests.unit.test_state_machine import machine as machine  # noqa: F401  (the fixture, both fast paths)

pytestmark = pytest.mark.timeout(30)

ADJUSTMENTS_ACCOUNT = 8


@pytest.fixture(autouse=True)
def operator_accounts(machine):  # noqa: F811
    machine.operator_accounts = {
        **OPERATOR,
        ACCOUNT_OPERATOR_ADJUSTMENTS: ADJUSTMENTS_ACCOUNT,
        ACCOUNT_OPERATOR_TRANSFER_FEES: 9,
    }


_keys = iter(range(1, 1_000_000))


def admin(method: Method, member: str, **request) -> Operation:
    """An operation of MemberAdminService, as processor/member_admin.py queues it."""
    fields = {"member_id": member, "key_id": "k1", **request}
    return Operation(
        method,
        domain.OPERATOR_ID,
        0,
        f"admin-{next(_keys)}",
        fields,
        member_id=member,
        points=request.get("points", 0),
    )


def adjust(member: str, points: int) -> Operation:
    return admin(Method.ADJUST, member, points=points, reason=1, note="")


def redeem(member: str, points: int) -> Operation:
    return op(Method.REDEEM, member_id=member, points=points)


def test_a_freeze_refuses_a_spend_later_in_the_same_batch_but_not_an_earn(machine):  # noqa: F811
    run(machine, earn("alice", 1_000))
    outcomes, write = run(
        machine, admin(Method.FREEZE, "alice", reason="stolen"), earn("alice", 100), redeem("alice", 50)
    )
    assert [o.code for o in outcomes] == [Code.OK, Code.OK, Code.FAILED_PRECONDITION]
    assert "is frozen since" in outcomes[2].message and not outcomes[2].recorded
    assert [k for k in write.idempotency if k[2] == "Redeem"] == []  # the key stays unused
    assert write.members.statuses["alice"].state == "frozen"
    assert [event[1] for event in write.members.events] == ["frozen"]
    assert posted_held(machine, "alice") == (1_100, 0)
    outcomes, _ = run(machine, admin(Method.UNFREEZE, "alice"), redeem("alice", 50))
    assert [o.code for o in outcomes] == [Code.OK, Code.OK]


def test_a_rolled_back_batch_leaves_no_status_behind(machine: LedgerStateMachine):  # noqa: F811
    run(machine, earn("bob", 500))
    machine.apply([admin(Method.FREEZE, "bob"), adjust("bob", 200)], {}, NOW)
    assert machine.members.status("bob") is not None
    machine.rollback()
    assert machine.members.status("bob") is None and posted_held(machine, "bob") == (500, 0)
    (outcome,), _ = run(machine, redeem("bob", 500))
    assert outcome.code is Code.OK


def test_an_adjustment_posts_against_operator_adjustments_and_a_debit_stays_within_available(machine):  # noqa: F811
    (credit,), write = run(machine, adjust("carol", 700))  # opens the member
    assert credit.code is Code.OK and credit.fields["balance"] == 700
    ((member, account),) = write.new_members
    assert member == "carol"
    assert write.transactions[0][:5] == (
        credit.fields["transaction_id"],
        kinds.KIND_ADJUSTMENT_CREDIT,
        "operator",
        "carol",
        700,
    )
    assert entries_of(write, credit.fields["transaction_id"]) == {account: 700, ADJUSTMENTS_ACCOUNT: -700}
    run(machine, op(Method.AUTHORIZE, member_id="carol", points=200, hold_ttl_seconds=60))
    (refused,), write = run(machine, adjust("carol", -501))
    assert refused.code is Code.FAILED_PRECONDITION and "500 point-units available" in refused.message
    assert write.transactions == [] and posted_held(machine, "carol") == (700, 200)
    (debit,), write = run(machine, adjust("carol", -500))
    assert debit.fields["available"] == 0
    assert entries_of(write, debit.fields["transaction_id"]) == {account: -500, ADJUSTMENTS_ACCOUNT: 500}
    assert write.transactions[0][1] == kinds.KIND_ADJUSTMENT_DEBIT


def test_an_alias_routes_a_tills_operation_and_a_closed_member_refuses_everything(machine):  # noqa: F811
    run(machine, earn("dave", 1_000))
    outcomes, _ = run(machine, admin(Method.ADD_ALIAS, "dave", alias="card-1"), earn("card-1", 100))
    assert [o.code for o in outcomes] == [Code.OK, Code.OK]
    assert posted_held(machine, "dave") == (1_100, 0) and machine.balance("card-1") is None
    (closed,), write = run(machine, admin(Method.CLOSE_MEMBER, "card-1", reason="asked"))
    assert closed.fields["points_to_breakage"] == 1_100
    assert entries_of(write, closed.fields["transaction_id"])[OPERATOR[domain.ACCOUNT_OPERATOR_BREAKAGE]] == 1_100
    outcomes, _ = run(machine, earn("dave", 100), earn("card-1", 100), adjust("dave", 10))
    assert [o.code for o in outcomes] == [Code.FAILED_PRECONDITION] * 3
    assert all("is closed since" in o.message for o in outcomes)


def test_a_household_members_earn_and_spend_use_the_shared_account(machine):  # noqa: F811
    run(machine, earn("erin", 100), earn("finn", 100))
    outcomes, write = run(
        machine,
        admin(Method.CREATE_HOUSEHOLD, "erin", household_id="hh-1"),
        admin(Method.JOIN_HOUSEHOLD, "finn", household_id="hh-1"),
        earn("erin", 300),
        redeem("finn", 250),
    )
    assert [o.code for o in outcomes] == [Code.OK] * 4
    check_record(write)
    assert posted_held(machine, "household:hh-1") == (50, 0)
    assert posted_held(machine, "erin") == (100, 0) and posted_held(machine, "finn") == (100, 0)
    outcomes, _ = run(
        machine,
        admin(Method.CLOSE_MEMBER, "household:hh-1"),
        admin(Method.MERGE, "erin", source_member_id="erin", target_member_id="household:hh-1"),
    )
    assert [o.code for o in outcomes] == [Code.FAILED_PRECONDITION] * 2
    (left,), _ = run(machine, admin(Method.LEAVE_HOUSEHOLD, "finn"))
    assert left.fields["household_id"] == "hh-1"
    (spent,), _ = run(machine, redeem("finn", 100))
    assert spent.code is Code.OK and posted_held(machine, "finn") == (0, 0)


def test_alias_chains_resolve_and_a_runaway_chain_is_an_invariant_violation():
    registry = MemberRegistry(aliases={"a": "b", "b": "c"})
    assert registry.resolve("a") == "c" and registry.resolve("c") == "c"
    looped = MemberRegistry(aliases={"x": "y", "y": "x"})
    with pytest.raises(domain.InvariantViolation):
        looped.resolve("x")


def test_operations_take_effect_in_batch_order_so_an_earlier_redeem_never_spends_a_later_credit(machine):  # noqa: F811
    # the plain operations are gathered for one kernel call; an operation applied on its own (here an
    # adjustment) first applies those before it, so the batch's effects follow its order, which is the
    # order of the transaction ids (what the change feed's balance after each transaction relies on)
    run(machine, earn("erin", 100))
    outcomes, write = run(machine, redeem("erin", 150), adjust("erin", 100), redeem("erin", 150))
    assert [o.code for o in outcomes] == [Code.FAILED_PRECONDITION, Code.OK, Code.OK]
    assert posted_held(machine, "erin") == (50, 0)
    ids = [row[0] for row in write.transactions]
    assert ids == sorted(ids)


def _refund(transaction_id: int) -> Operation:
    return Operation(Method.REFUND, "shop", 1, f"refund-{transaction_id}", {}, points=10, transaction_id=transaction_id)


def test_a_refund_of_a_reversed_transaction_is_refused_and_one_during_a_reversal_is_marked():
    registry = MemberRegistry(reversed_by={7: 9})
    refusal = registry.route(_refund(7))
    assert refusal is not None and refusal.code is Code.FAILED_PRECONDITION
    assert "was reversed by the operator (txn_9)" in refusal.message and refusal.reason == "not_refundable"
    assert registry.route(_refund(8)) is None and registry.refunded_pending == set()
    # a reversal of 8 asked: a refund of 8 routed meanwhile marks it, so the reversal refuses in its batch
    registry.expect_reversal(8)
    registry.expect_reversal(8)
    assert registry.route(_refund(8)) is None and registry.refunded_pending == {8}
    registry.reversal_answered(8)
    assert registry.refunded_pending == {8}  # another reversal of it is still in flight
    registry.reversal_answered(8)
    assert registry.pending_reversals == {} and registry.refunded_pending == set()


SHOP_ISSUED = SHOP.issued_account_id


def _reverse(original: int, write, member: str) -> Operation:
    """A REVERSE of `original` with its entries as the servicer reads them from the journal."""
    legs = [
        [e[1], "member" if e[1] != SHOP_ISSUED else "merchant_issued", member, "POINTS", e[2]]
        for e in write.entries
        if e[0] == original
    ]
    originals = [{"transaction_id": original, "kind": 1, "member_id": member, "merchant_id": "shop", "legs": legs}]
    fields = {"reason": 2, "note": "", "originals": originals, "earn_record": None}
    reversal = admin(Method.REVERSE, member, **fields)
    reversal.transaction_id = original
    return reversal


def test_an_earns_reversal_is_its_mirror_once_and_refused_whole_when_a_refund_came_meanwhile(machine):  # noqa: F811
    (earned,), write = run(machine, earn("erin", 500))
    original = earned.fields["transaction_id"]
    machine.members.expect_reversal(original)
    refund = op(Method.REFUND, transaction_id=original, points=100)
    (refunded, refused), after = run(machine, refund, _reverse(original, write, "erin"))
    assert refunded.code is Code.OK and refused.code is Code.FAILED_PRECONDITION
    assert "a refund of transaction" in refused.message and refused.reason == "not_reversible"
    assert [t[1] for t in after.transactions] == [5]  # the refund only: nothing of the reversal
    machine.members.reversal_answered(original)

    (earned,), write = run(machine, earn("fay", 500))
    original = earned.fields["transaction_id"]
    (reversal,), after = run(machine, _reverse(original, write, "fay"))
    assert reversal.code is Code.OK and reversal.fields["points"] == -500 and posted_held(machine, "fay") == (0, 0)
    assert entries_of(after, reversal.fields["transaction_id"]) == {
        account: -amount for account, amount in entries_of(write, original).items()
    }
    (again,), after = run(machine, _reverse(original, write, "fay"))
    assert again.code is Code.FAILED_PRECONDITION and "reversed already" in again.message and after.transactions == []
    (refund,), _ = run(machine, op(Method.REFUND, transaction_id=original, points=100))
    assert refund.code is Code.FAILED_PRECONDITION and "was reversed by the operator" in refund.message
