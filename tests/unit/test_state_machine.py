"""LedgerStateMachine driven directly: no database, no event loop, no committer. A batch goes in, its
outcomes and its durable record (BatchWrite) come out; commit, rollback and rollback_newest move the
in-memory state as the committer needs. Run against the compiled fast path and its pure-Python twin."""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

import fastpath
import fastpath._core
import fastpath._reference
from processor import domain, rules
from processor.config import Settings
from processor.domain import Code, Method, Operation
from processor.program import ProgramState
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import BatchWrite, HoldRow, MerchantRow, StoredOutcome, TransactionRow

pytestmark = pytest.mark.timeout(30)

NOW = 1_800_000_000_000_000
SECOND = 1_000_000
DAY = 86_400 * SECOND
FEE_REDEEMED_BPS = 100

OPERATOR = {
    domain.ACCOUNT_OPERATOR_FEE_REVENUE: 1,
    domain.ACCOUNT_OPERATOR_BREAKAGE: 2,
    rules.ACCOUNT_OPERATOR_TIER_REWARDS: 3,
    rules.ACCOUNT_OPERATOR_PROMOTIONS: 4,
    rules.ACCOUNT_OPERATOR_REFERRALS: 5,
    rules.ACCOUNT_OPERATOR_ACQUIRING: 6,
    rules.ACCOUNT_OPERATOR_DIVIDENDS: 7,
}
SHOP = MerchantRow(
    "shop",
    1,
    1_000,
    "active",
    fee_redeemed_bps=FEE_REDEEMED_BPS,
    issued_account_id=11,
    redeemed_account_id=12,
    fees_account_id=13,
    acquiring_account_id=14,
)
CAFE = MerchantRow(
    "cafe", 2, 500, "active", issued_account_id=21, redeemed_account_id=22, fees_account_id=23, acquiring_account_id=24
)


@pytest.fixture(params=[fastpath._core, fastpath._reference], ids=["cython", "python"])
def machine(request) -> LedgerStateMachine:
    machine = LedgerStateMachine(Settings())
    machine.ledger = request.param.Ledger(100, 100, 100)
    machine.merchants = Merchants([SHOP, CAFE])
    machine.operator_accounts = dict(OPERATOR)
    machine.ids = IdAllocator(1, 1)
    machine.account_ids = list(range(1_000, 1_100))
    return machine


def in_force(machine: LedgerStateMachine, **version) -> rules.ProgramVersion:
    """A program whose version 1 is in force from the epoch."""
    v = rules.ProgramVersion("loyalty", 1, 0, **version)
    machine.program = ProgramState(rules.Program("loyalty", (v,)))
    return v


_keys = iter(range(1, 1_000_000))


def op(method: Method, merchant: MerchantRow = SHOP, **fields) -> Operation:
    request = {k: v for k, v in fields.items()}
    return Operation(method, merchant.merchant_id, merchant.merchant_slot, f"key-{next(_keys)}", request, **fields)


def earn(member: str, points: int, merchant: MerchantRow = SHOP) -> Operation:
    return op(Method.EARN, merchant, member_id=member, points=points, purchase_amount=points * 10)


def check_record(write: BatchWrite) -> None:
    """The invariants of a batch's durable record: every transaction's entries sum to zero per asset,
    every entry names a transaction of the batch, no transaction id twice."""
    ids = [t[0] for t in write.transactions]
    assert len(ids) == len(set(ids)), ids
    sums: dict[tuple[int, str], int] = collections.defaultdict(int)
    for entry in write.entries:
        assert entry[0] in ids, f"entry {entry} names no transaction of the batch"
        assert entry[2] != 0
        sums[(entry[0], entry[3] if len(entry) > 3 else domain.ASSET_POINTS)] += entry[2]
    assert {key: total for key, total in sums.items() if total} == {}
    if ids:
        assert write.last_transaction_id >= max(ids)


def run(machine: LedgerStateMachine, *ops: Operation, now: int = NOW, stored: dict | None = None):
    """Applies one batch and commits it (as the committer does once it is durable)."""
    outcomes, write = machine.apply(list(ops), stored or {}, now)
    check_record(write)
    machine.commit()
    return outcomes, write


def entries_of(write: BatchWrite, transaction_id: int) -> dict[int, int]:
    return {e[1]: e[2] for e in write.entries if e[0] == transaction_id}


def posted_held(machine: LedgerStateMachine, member: str) -> tuple[int, int]:
    return machine.balance(member)


def test_an_earn_opens_the_member_credits_it_from_the_merchants_issued_account_and_records_the_key(machine):
    operation = earn("alice", 1_000)
    (outcome,), write = run(machine, operation)
    assert outcome.code is Code.OK
    created = outcome.fields["transaction_id"]
    assert outcome.fields["points"] == 1_000 and outcome.fields["balance"] == 1_000
    ((member_id, account_id),) = write.new_members
    assert member_id == "alice" and account_id in range(1_000, 1_100)
    assert write.transactions[0][:5] == (created, fastpath.KIND_EARN, "shop", "alice", 1_000)
    assert entries_of(write, created) == {account_id: 1_000, SHOP.issued_account_id: -1_000}
    (record,) = write.idempotency
    assert record[:3] == ("shop", operation.idempotency_key, "Earn") and record[4] == "OK"
    assert posted_held(machine, "alice") == (1_000, 0)


def test_a_redeem_debits_the_member_credits_the_merchant_and_posts_its_fee(machine):
    run(machine, earn("alice", 1_000))
    (outcome,), write = run(machine, op(Method.REDEEM, member_id="alice", points=300))
    assert outcome.code is Code.OK and outcome.fields["balance"] == 700 and outcome.fields["available"] == 700
    created = outcome.fields["transaction_id"]
    fee = 300 * FEE_REDEEMED_BPS // 10_000
    account = machine.ledger.member_account(machine.ledger.member_slot("alice"))
    assert entries_of(write, created) == {
        account: -300,
        SHOP.redeemed_account_id: 300,
        SHOP.fees_account_id: -fee,
        OPERATOR[domain.ACCOUNT_OPERATOR_FEE_REVENUE]: fee,
    }
    assert write.transactions[0][9] == fee


def test_a_redeem_beyond_the_balance_is_refused_recorded_and_posts_nothing(machine):
    run(machine, earn("alice", 100))
    (outcome,), write = run(machine, op(Method.REDEEM, member_id="alice", points=101))
    assert outcome.code is Code.FAILED_PRECONDITION and outcome.reason == "insufficient_points"
    assert "100 point-units available, 101 asked" in outcome.message
    assert write.transactions == [] and write.entries == []
    assert [r[4] for r in write.idempotency] == ["FAILED_PRECONDITION"]
    assert posted_held(machine, "alice") == (100, 0)


def test_a_redeem_by_an_unknown_member_is_not_found(machine):
    (outcome,), write = run(machine, op(Method.REDEEM, member_id="nobody", points=1))
    assert outcome.code is Code.NOT_FOUND and write.transactions == [] and write.new_members == []


def test_authorize_capture_and_void(machine):
    run(machine, earn("alice", 1_000))
    (hold,), write = run(machine, op(Method.AUTHORIZE, member_id="alice", points=500, hold_ttl_seconds=60))
    assert hold.code is Code.OK and hold.fields["available"] == 500
    authorization_id = hold.fields["authorization_id"]
    assert hold.fields["expires_at_us"] == NOW + 60 * SECOND
    assert write.new_holds[0][:4] == (authorization_id, "shop", "alice", 500) and write.transactions == []
    assert posted_held(machine, "alice") == (1_000, 500)

    (capture,), write = run(machine, op(Method.CAPTURE, authorization_id=authorization_id, points=200))
    assert capture.code is Code.OK
    assert capture.fields["points"] == 200 and capture.fields["released"] == 300
    assert capture.fields["balance"] == 800 and capture.fields["available"] == 800
    created = capture.fields["transaction_id"]
    assert write.resolved_holds == [(authorization_id, fastpath.HOLD_STATUS_CAPTURED, 200, created)]
    assert write.transactions[0][1] == fastpath.KIND_CAPTURE
    assert posted_held(machine, "alice") == (800, 0)

    (again,), write = run(machine, op(Method.CAPTURE, authorization_id=authorization_id, points=1))
    assert again.code is Code.FAILED_PRECONDITION and again.reason == "hold_captured" and write.transactions == []

    (second,), _ = run(machine, op(Method.AUTHORIZE, member_id="alice", points=100, hold_ttl_seconds=60))
    (void,), write = run(machine, op(Method.VOID, authorization_id=second.fields["authorization_id"]))
    assert void.code is Code.OK and void.fields == {"released": 100, "available": 800}
    assert write.resolved_holds == [(second.fields["authorization_id"], fastpath.HOLD_STATUS_VOIDED, 0, None)]
    assert posted_held(machine, "alice") == (800, 0)


def test_a_capture_by_another_merchant_is_refused(machine):
    run(machine, earn("alice", 1_000))
    (hold,), _ = run(machine, op(Method.AUTHORIZE, member_id="alice", points=500, hold_ttl_seconds=60))
    (outcome,), write = run(
        machine, op(Method.CAPTURE, CAFE, authorization_id=hold.fields["authorization_id"], points=500)
    )
    assert outcome.code is Code.PERMISSION_DENIED and write.transactions == []


def test_an_expired_hold_is_released_by_the_next_batch(machine):
    run(machine, earn("alice", 1_000))
    (hold,), _ = run(machine, op(Method.AUTHORIZE, member_id="alice", points=400, hold_ttl_seconds=1))
    _, write = run(machine, now=NOW + 2 * SECOND)
    assert write.expired_holds == [hold.fields["authorization_id"]]
    assert posted_held(machine, "alice") == (1_000, 0)


def test_refunds_of_a_redemption_and_of_an_earn_and_one_too_many(machine):
    (earned,), _ = run(machine, earn("alice", 1_000))
    (redeemed,), _ = run(machine, op(Method.REDEEM, member_id="alice", points=300))
    account = machine.ledger.member_account(machine.ledger.member_slot("alice"))

    (refund,), write = run(machine, op(Method.REFUND, transaction_id=redeemed.fields["transaction_id"], points=100))
    assert refund.code is Code.OK and refund.fields["kind"] == fastpath.KIND_REFUND_REDEMPTION
    assert entries_of(write, refund.fields["transaction_id"]) == {SHOP.redeemed_account_id: -100, account: 100}
    assert write.refunds == [(redeemed.fields["transaction_id"], 100)]
    assert posted_held(machine, "alice") == (800, 0)

    (too_much,), write = run(machine, op(Method.REFUND, transaction_id=redeemed.fields["transaction_id"], points=201))
    assert too_much.code is Code.FAILED_PRECONDITION and too_much.reason == "refund_exceeds_remaining"
    assert write.transactions == []

    (returned,), write = run(machine, op(Method.REFUND, transaction_id=earned.fields["transaction_id"], points=250))
    assert returned.code is Code.OK and returned.fields["kind"] == fastpath.KIND_REFUND_EARN
    assert entries_of(write, returned.fields["transaction_id"]) == {account: -250, SHOP.issued_account_id: 250}
    assert posted_held(machine, "alice") == (550, 0)


def test_a_retry_replays_the_stored_outcome_and_a_different_request_under_the_key_is_refused(machine):
    run(machine, earn("alice", 1_000))
    retry = earn("alice", 1_000)
    stored = {
        ("shop", retry.idempotency_key): StoredOutcome(
            "Earn", dict(retry.request), "OK", {"transaction_id": 7, "points": 1_000}, ""
        )
    }
    (outcome,), write = run(machine, retry, stored=stored)
    assert outcome.code is Code.OK and outcome.replayed and outcome.fields["transaction_id"] == 7
    assert write.transactions == [] and write.idempotency == []
    assert posted_held(machine, "alice") == (1_000, 0)

    other = earn("alice", 5)
    other.idempotency_key = retry.idempotency_key
    (conflict,), write = run(machine, other, stored=stored)
    assert conflict.code is Code.ALREADY_EXISTS and "points differs" in conflict.message
    assert write.transactions == [] and write.idempotency == []


def test_a_suspended_merchant_may_not_earn_and_the_refusal_is_not_recorded(machine):
    machine.merchants.add(
        MerchantRow("shop", 1, 1_000, "suspended", issued_account_id=11, redeemed_account_id=12, fees_account_id=13)
    )
    (outcome,), write = run(machine, earn("alice", 100))
    assert outcome.code is Code.FAILED_PRECONDITION and "suspended" in outcome.message
    assert write.idempotency == [] and write.transactions == []


def test_ids_increase_across_batches_and_each_operation_gets_its_own(machine):
    outcomes, write = run(machine, earn("alice", 10), earn("bob", 20), earn("alice", 30))
    ids = [o.fields["transaction_id"] for o in outcomes]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert write.last_transaction_id == ids[-1]
    (later,), _ = run(machine, earn("carol", 5))
    assert later.fields["transaction_id"] > ids[-1]


def test_rollback_of_every_open_batch_restores_balances_members_and_holds_and_never_reuses_ids(machine):
    (first,), _ = run(machine, earn("alice", 1_000))
    # two batches open at once: the one "being written" and the next applied on top of it
    outcomes_a, write_a = machine.apply([op(Method.REDEEM, member_id="alice", points=400), earn("bob", 50)], {}, NOW)
    outcomes_b, write_b = machine.apply(
        [op(Method.AUTHORIZE, member_id="alice", points=100, hold_ttl_seconds=60)], {}, NOW
    )
    assert all(o.code is Code.OK for o in outcomes_a + outcomes_b)
    assert posted_held(machine, "alice") == (600, 100)
    machine.rollback()  # the write of the older one failed: both are undone
    assert posted_held(machine, "alice") == (1_000, 0)
    assert machine.balance("bob") is None
    assert not machine.ledger.has_hold(outcomes_b[0].fields["authorization_id"])
    (after,), write = run(machine, op(Method.REDEEM, member_id="alice", points=1))
    taken = {first.fields["transaction_id"], *(t[0] for t in write_a.transactions + write_b.transactions)}
    assert after.fields["transaction_id"] > max(taken)
    (hold,), _ = run(machine, op(Method.AUTHORIZE, member_id="alice", points=1, hold_ttl_seconds=60))
    assert hold.fields["authorization_id"] > outcomes_b[0].fields["authorization_id"]


def test_rollback_newest_undoes_only_the_newest_open_batch(machine):
    run(machine, earn("alice", 1_000))
    machine.apply([op(Method.REDEEM, member_id="alice", points=100)], {}, NOW)
    machine.apply([op(Method.REDEEM, member_id="alice", points=200)], {}, NOW)
    assert posted_held(machine, "alice") == (700, 0)
    machine.rollback_newest()
    assert posted_held(machine, "alice") == (900, 0)
    machine.commit()
    assert posted_held(machine, "alice") == (900, 0)


def test_a_batch_that_fails_while_being_applied_leaves_nothing_behind(machine):
    run(machine, earn("alice", 1_000))
    stranger = MerchantRow("stranger", 9, 1_000, "active")
    with pytest.raises(KeyError):  # a merchant the state machine does not know: a bug, not an outcome
        machine.apply([earn("alice", 500), earn("bob", 5), earn("alice", 1, stranger)], {}, NOW)
    assert posted_held(machine, "alice") == (1_000, 0)
    assert machine.balance("bob") is None
    (outcome,), _ = run(machine, earn("alice", 1))
    assert outcome.fields["balance"] == 1_001


def test_under_a_program_an_earn_reaching_a_level_posts_its_bonus_from_the_operator(machine):
    in_force(machine, levels=(rules.Level("member", 0), rules.Level("gold", 1_000, bonus_point_units=500)))
    (outcome,), write = run(machine, earn("alice", 1_000))
    assert outcome.code is Code.OK and outcome.fields["level"] == "gold" and outcome.fields["bonus_points"] == 500
    kinds_posted = [t[1] for t in write.transactions]
    assert kinds_posted == [fastpath.KIND_EARN, rules.KIND_TIER_BONUS]
    bonus = write.transactions[1][0]
    account = machine.ledger.member_account(machine.ledger.member_slot("alice"))
    assert entries_of(write, bonus) == {OPERATOR[rules.ACCOUNT_OPERATOR_TIER_REWARDS]: -500, account: 500}
    assert write.rules is not None and not write.rules.empty
    assert posted_held(machine, "alice") == (1_500, 0)


def test_under_a_program_points_expire_into_breakage_and_cannot_be_spent_after(machine):
    in_force(machine, expiry_period_us=DAY)
    (earned,), _ = run(machine, earn("alice", 1_000))
    later = NOW + 2 * DAY
    (refused,), write = run(machine, op(Method.REDEEM, member_id="alice", points=1), now=later)
    assert refused.code is Code.FAILED_PRECONDITION
    expiries = [t for t in write.transactions if t[1] == rules.KIND_EXPIRY]
    assert [(t[3], t[4]) for t in expiries] == [("alice", 1_000)]
    account = machine.ledger.member_account(machine.ledger.member_slot("alice"))
    assert entries_of(write, expiries[0][0]) == {account: -1_000, OPERATOR[domain.ACCOUNT_OPERATOR_BREAKAGE]: 1_000}
    assert posted_held(machine, "alice") == (0, 0)


def test_under_a_program_a_rolled_back_earn_leaves_no_level_and_no_lot(machine):
    in_force(machine, levels=(rules.Level("member", 0), rules.Level("gold", 1_000, bonus_point_units=500)))
    machine.apply([earn("alice", 1_000)], {}, NOW)
    machine.rollback()
    (outcome,), write = run(machine, earn("alice", 10))
    assert outcome.fields["level"] == "member" and outcome.fields["bonus_points"] == 0
    assert [t[1] for t in write.transactions] == [fastpath.KIND_EARN]
    assert posted_held(machine, "alice") == (10, 0)


def test_forget_resolved_drops_resolved_holds_and_keeps_balances(machine):
    run(machine, earn("alice", 1_000))
    (hold,), _ = run(machine, op(Method.AUTHORIZE, member_id="alice", points=100, hold_ttl_seconds=60))
    run(machine, op(Method.VOID, authorization_id=hold.fields["authorization_id"]))
    machine.forget_resolved()
    assert not machine.ledger.has_hold(hold.fields["authorization_id"])
    assert posted_held(machine, "alice") == (1_000, 0)


# --- what a batch needs from Postgres: missing() names it, load_prefetched() takes it in ---


def forgotten(machine: LedgerStateMachine) -> None:
    """Resolved holds and resident transactions dropped, as the committer does now and then."""
    machine.forget_resolved()


def test_a_resolved_hold_no_longer_resident_is_named_missing_and_once_loaded_refuses_a_capture(machine):
    run(machine, earn("alice", 1_000))
    (hold,), _ = run(machine, op(Method.AUTHORIZE, member_id="alice", points=100, hold_ttl_seconds=60))
    authorization_id = hold.fields["authorization_id"]
    run(machine, op(Method.VOID, authorization_id=authorization_id))
    forgotten(machine)
    capture = op(Method.CAPTURE, authorization_id=authorization_id, points=100)
    assert machine.missing([capture]) == ({authorization_id}, set(), set(), set())
    expired = machine.load_prefetched(
        NOW,
        [HoldRow(authorization_id, "shop", "alice", 100, fastpath.HOLD_STATUS_VOIDED, NOW + 60 * SECOND)],
        [],
        [],
        [],
        [],
    )
    assert expired == []
    assert machine.missing([capture]) == (set(), set(), set(), set())
    (outcome,), write = run(machine, capture)
    assert outcome.code is Code.FAILED_PRECONDITION and outcome.reason == "hold_voided" and write.transactions == []


def test_an_open_hold_read_after_its_expiry_is_returned_as_expired_and_refuses_a_capture(machine):
    run(machine, earn("alice", 1_000))
    row = HoldRow(77, "shop", "alice", 100, fastpath.HOLD_OPEN, NOW - SECOND)  # written by an earlier process
    expired = machine.load_prefetched(NOW, [row], [], [], [], [])
    assert expired == [77]
    outcomes, write = machine.apply([op(Method.CAPTURE, authorization_id=77, points=100)], {}, NOW, expired)
    check_record(write)
    machine.commit()
    assert outcomes[0].code is Code.FAILED_PRECONDITION and outcomes[0].reason == "hold_expired"
    assert 77 in write.expired_holds and write.transactions == []


def test_a_transaction_no_longer_resident_is_loaded_and_refunded(machine):
    run(machine, earn("alice", 1_000))
    (redeemed,), _ = run(machine, op(Method.REDEEM, member_id="alice", points=300))
    transaction_id = redeemed.fields["transaction_id"]
    forgotten(machine)
    refund = op(Method.REFUND, transaction_id=transaction_id, points=300)
    if machine.ledger.has_transaction(transaction_id):
        pytest.skip("this fast path keeps resolved transactions resident")
    assert machine.missing([refund])[3] == {transaction_id}
    machine.load_prefetched(
        NOW, [], [], [], [], [TransactionRow(transaction_id, fastpath.KIND_REDEEM, "shop", "alice", 300, 200)]
    )
    (outcome,), write = run(machine, refund)
    assert outcome.code is Code.FAILED_PRECONDITION and outcome.reason == "refund_exceeds_remaining"
    (outcome,), write = run(machine, op(Method.REFUND, transaction_id=transaction_id, points=100))
    assert outcome.code is Code.OK and posted_held(machine, "alice") == (800, 0)


def test_a_rule_transaction_without_a_member_is_not_refundable_and_belongs_to_its_merchant(machine):
    dividend = TransactionRow(500, rules.KIND_DIVIDEND, "shop", "", 1_000, 0)
    machine.load_prefetched(NOW, [], [], [], [], [dividend])
    (own,), write = run(machine, op(Method.REFUND, transaction_id=500, points=1))
    assert own.code is Code.FAILED_PRECONDITION and own.reason == "not_refundable" and write.transactions == []
    machine.load_prefetched(NOW, [], [], [], [], [dividend])
    (other,), _ = run(machine, op(Method.REFUND, CAFE, transaction_id=500, points=1))
    assert other.code is Code.PERMISSION_DENIED and other.reason == "wrong_merchant"


def test_a_link_and_a_conversion_under_a_program(machine):
    in_force(machine, merchant_terms=(rules.MerchantTerms("shop", conversion_rate=rules.Rate(1, 10)),))
    (linked,), write = run(machine, op(Method.LINK, member_id="alice"))
    assert linked.code is Code.OK and linked.fields["acquirer_id"] == "shop" and write.transactions == []
    (again,), _ = run(machine, op(Method.LINK, CAFE, member_id="alice"))
    assert again.code is Code.FAILED_PRECONDITION and again.reason == "already_linked"
    # Rate(1, 10): 10 merchant points are one point-unit, converted in whole blocks
    (converted,), write = run(machine, op(Method.CONVERT, member_id="alice", merchant_points=105))
    assert converted.code is Code.OK
    assert (
        converted.fields["points"],
        converted.fields["merchant_points_converted"],
        converted.fields["merchant_points_remainder"],
    ) == (10, 100, 5)
    account = machine.ledger.member_account(machine.ledger.member_slot("alice"))
    assert entries_of(write, converted.fields["transaction_id"]) == {SHOP.issued_account_id: -10, account: 10}
    (too_few,), write = run(machine, op(Method.CONVERT, member_id="alice", merchant_points=9))
    assert too_few.code is Code.FAILED_PRECONDITION and write.transactions == []
    assert posted_held(machine, "alice") == (10, 0)


@pytest.mark.parametrize("module", ["state_machine.py", "postings.py"])
def test_the_state_machine_module_does_no_io(module):
    source = pathlib.Path(__file__).resolve().parents[2] / "processor" / module
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, (ast.AsyncFunctionDef, ast.Await)):
            pytest.fail(f"{module} has an async function or await at line {node.lineno}")
    assert not imported & {"asyncio", "asyncpg", "grpc"}


# --- random batches, committed or rolled back: the invariants hold after every step ---


@pytest.mark.parametrize("with_program", [False, True], ids=["plain", "program"])
@pytest.mark.parametrize("seed", range(8))
def test_random_batches_keep_the_invariants(machine, seed, with_program):
    """Random earns, redeems, holds, captures, voids and refunds in batches that are committed, rolled
    back whole, or rolled back newest-first with two open: every batch's record balances; every member's
    posted balance equals the sum of its committed entries; no available balance is negative; no
    transaction or authorization id is handed out twice, rolled back or not."""
    import random

    rng = random.Random(seed)
    machine.ledger = type(machine.ledger)(100, 10_000, 10_000)  # room for every hold and transaction
    if with_program:
        in_force(
            machine,
            expiry_period_us=DAY,
            levels=(rules.Level("member", 0), rules.Level("gold", 3_000, bonus_point_units=200, multiplier_bps=15_000)),
        )
    members = ["m0", "m1", "m2", "m3"]
    journal: dict[int, int] = collections.defaultdict(int)  # account id -> sum of committed entries
    seen_transactions: set[int] = set()
    seen_authorizations: set[int] = set()
    spendable: list[tuple[int, MerchantRow]] = []  # committed earns, redeems and captures: refundable
    holds: list[tuple[int, MerchantRow]] = []
    now = NOW

    def random_op() -> Operation:
        merchant = rng.choice([SHOP, CAFE])
        member = rng.choice(members)
        choice = rng.random()
        if choice < 0.35 or machine.balance(member) is None:
            return earn(member, rng.randint(1, 2_000), merchant)
        if choice < 0.55:
            return op(Method.REDEEM, merchant, member_id=member, points=rng.randint(1, 1_500))
        if choice < 0.7:
            return op(
                Method.AUTHORIZE,
                merchant,
                member_id=member,
                points=rng.randint(1, 800),
                hold_ttl_seconds=rng.randint(60, 7_200),
            )
        if choice < 0.85 and holds:
            method = rng.choice([Method.CAPTURE, Method.VOID])
            authorization_id, owner = rng.choice(holds)
            return op(
                method,
                owner if rng.random() < 0.9 else merchant,
                authorization_id=authorization_id,
                points=rng.randint(0, 300) if method is Method.CAPTURE else 0,
            )
        if spendable:
            transaction_id, owner = rng.choice(spendable)
            return op(
                Method.REFUND,
                owner if rng.random() < 0.9 else merchant,
                transaction_id=transaction_id,
                points=rng.randint(1, 500),
            )
        return earn(member, rng.randint(1, 2_000), merchant)

    def applied(outcomes, write) -> None:
        check_record(write)
        ids = [t[0] for t in write.transactions]
        assert not seen_transactions & set(ids), "a transaction id handed out twice"
        seen_transactions.update(ids)
        for outcome in outcomes:
            authorization_id = outcome.fields.get("authorization_id") if outcome.code is Code.OK else None
            if authorization_id:
                assert authorization_id not in seen_authorizations, "an authorization id handed out twice"
                seen_authorizations.add(authorization_id)

    def committed(outcomes, write) -> None:
        for entry in write.entries:
            if len(entry) == 3:
                journal[entry[1]] += entry[2]
        for operation, outcome in zip(batch_of[id(outcomes)], outcomes):
            if outcome.code is Code.OK and "authorization_id" in outcome.fields:
                holds.append((outcome.fields["authorization_id"], merchant_of[operation.merchant_id]))
        for t in write.transactions:
            if t[1] in (fastpath.KIND_EARN, fastpath.KIND_REDEEM, fastpath.KIND_CAPTURE):
                spendable.append((t[0], merchant_of[t[2]]))

    def check_balances() -> None:
        for member in members:
            balance = machine.balance(member)
            if balance is None:
                continue
            posted, held = balance
            account = machine.ledger.member_account(machine.ledger.member_slot(member))
            assert posted == journal[account], f"{member}: posted {posted}, committed entries {journal[account]}"
            assert posted - held >= 0

    merchant_of = {SHOP.merchant_id: SHOP, CAFE.merchant_id: CAFE}
    batch_of: dict[int, list[Operation]] = {}

    def apply() -> tuple:
        batch = [random_op() for _ in range(rng.randint(1, 8))]
        outcomes, write = machine.apply(batch, {}, now)
        batch_of[id(outcomes)] = batch
        applied(outcomes, write)
        return outcomes, write

    for _ in range(40):
        now += rng.choice([0, 1, 60, 600, 3_600, 2 * 86_400]) * SECOND  # sometimes past holds' and lots' expiry
        step = rng.random()
        first = apply()
        if step < 0.6:
            machine.commit()
            committed(*first)
        elif step < 0.75:
            machine.rollback()
        else:
            apply()
            if step < 0.9:
                machine.rollback_newest()  # the newer failed while being applied; the older commits
                machine.commit()
                committed(*first)
            else:
                machine.rollback()  # the older one's write failed: both are undone
        check_balances()
