"""The compiled ledger and its pure-Python twin, fed the same operations, must answer the same.

Every call goes to both; results (or the type of the exception raised) are compared call by call, and
the visible state and invariants are compared along the way and at the end. Each twin also has a
mirror that receives the operations of every apply_batch() one call at a time instead, so the batch
kernel is held to the per-operation methods in both implementations.
"""

import random
from array import array

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
)

import fastpath._core
import fastpath._reference

R = fastpath._reference
BALANCE_MAX = R.BALANCE_MAX
HOLD_OPEN = R.HOLD_OPEN
OK = R.OK
START_US = 1_700_000_000_000_000
# What an output row holds before apply_batch() writes it: rows it must not write stay so.
UNWRITTEN = (-7, -7, -7, -7, -7, -7)
LEDGER_NAMES = ["cython", "python", "cython one by one", "python one by one"]


def one_by_one(ledger, operations, now_us, owners, rows):
    """What apply_batch() must do, through the per-operation methods and the public look-ups only:
    fills rows (a list of UNWRITTEN) and returns len(operations), or raises as the kernel must.
    owners maps each resident transaction id to (merchant, member slot); it is kept up to date."""
    for method, *_ in operations:
        if not R.OP_EARN <= method <= R.OP_REFUND:
            raise ValueError(f"method {method}")
    for index, (method, member, merchant, points, ref_id, new_id, expires_at_us) in enumerate(operations):
        if method == R.OP_EARN:
            status, slot, posted = ledger.earn(ledger.member_id(member), merchant, points, new_id)
            row = (
                (status, member, 0, 0, 0, 0)
                if status != OK
                else (OK, slot, points, posted, posted - ledger.balance(slot)[1], R.KIND_EARN)
            )
        elif method == R.OP_AUTHORIZE:
            status, available = ledger.authorize(member, merchant, points, new_id, expires_at_us)
            row = (
                (status, member, 0, 0, 0, 0)
                if status != OK
                else (OK, member, points, ledger.balance(member)[0], available, 0)
            )
        elif method in (R.OP_CAPTURE, R.OP_VOID):
            # The hold's member, unless the hold is unknown or another merchant's.
            involved = -1
            if ledger.has_hold(ref_id):
                _, hold_member, hold_merchant, _, _ = ledger.hold(ref_id)
                involved = hold_member if hold_merchant == merchant else -1
            if method == R.OP_CAPTURE:
                status, captured, slot, posted, available = ledger.capture(ref_id, merchant, points, new_id, now_us)
                row = (OK, slot, captured, posted, available, R.KIND_CAPTURE)
            else:
                status, released, slot, available = ledger.void(ref_id, merchant, now_us)
                row = (OK, slot, released, ledger.balance(slot)[0] if status == OK else 0, available, 0)
            if status != OK:
                row = (status, involved, 0, 0, 0, 0)
        elif method == R.OP_REDEEM:
            status, posted, available = ledger.redeem(member, merchant, points, new_id)
            row = (
                (status, member, 0, 0, 0, 0) if status != OK else (OK, member, points, posted, available, R.KIND_REDEEM)
            )
        else:
            involved = -1
            if ledger.has_transaction(ref_id):
                owner_merchant, owner_member = owners[ref_id]
                involved = owner_member if owner_merchant == merchant else -1
            status, kind, slot, posted, available = ledger.refund(ref_id, merchant, points, new_id)
            row = (status, involved, 0, 0, 0, 0) if status != OK else (OK, slot, points, posted, available, kind)
        if status == R.INSUFFICIENT_POINTS and row[1] >= 0:
            posted, held = ledger.balance(row[1])  # what the refusal saw
            row = (status, row[1], 0, posted, posted - held, 0)
        if status == OK and method != R.OP_AUTHORIZE and method != R.OP_VOID:
            owners[new_id] = (merchant, row[1])
        rows[index] = row
    return len(operations)


class Twins:
    """One ledger per implementation, and a mirror of each: call() runs an operation on all four and
    compares the outcomes; apply_batch() runs the kernel on the first two and the same operations
    one by one (one_by_one) on the mirrors. Also tracks who owns each transaction created, which
    the per-operation API does not show."""

    def __init__(self, members_max, holds_max, transactions_max):
        self.ledgers = [
            implementation.Ledger(members_max, holds_max, transactions_max)
            for implementation in (fastpath._core, fastpath._reference) * 2
        ]
        self.recent = []
        self.owners = {}  # transaction id -> (merchant, member slot), of every one created

    @property
    def reference(self):
        return self.ledgers[1]

    def compare(self, name, args, outcomes):
        self.recent = [*self.recent[-20:], (name, args, outcomes[1])]
        for ledger_name, outcome in zip(LEDGER_NAMES, outcomes):
            assert outcome == outcomes[1], (
                f"{name}{args}: {ledger_name} answered {outcome}, python {outcomes[1]}; "
                f"operations before: {self.recent[:-1]}"
            )
        return outcomes[1]

    def call(self, name, *args):
        outcomes = []
        for ledger in self.ledgers:
            try:
                outcomes.append(getattr(ledger, name)(*args))
            except Exception as error:  # the exception's type is part of the behaviour compared
                outcomes.append(("raised", type(error).__name__))
        outcome = self.compare(name, args, outcomes)
        self.remember_owner(name, args, outcome)
        return outcome

    def remember_owner(self, name, args, outcome):
        if name == "load_transaction" and outcome is None:
            self.owners[args[0]] = (args[3], args[2])
        elif not (isinstance(outcome, tuple) and outcome[0] == OK):
            return
        elif name == "earn":
            self.owners[args[3]] = (args[1], outcome[1])
        elif name == "capture":
            self.owners[args[3]] = (args[1], outcome[2])
        elif name == "redeem":
            self.owners[args[3]] = (args[1], args[0])
        elif name == "refund":
            self.owners[args[3]] = (args[1], outcome[2])

    def apply_batch(self, operations, now_us, as_lists=False):
        """Runs operations (tuples of method, member, merchant, points, ref_id, new_id,
        expires_at_us) as one batch; returns (n or ("raised", name), rows) as the python kernel
        answered. The twin gets lists when as_lists, the compiled module always int64 arrays."""
        columns = [list(column) for column in zip(*operations)] or [[] for _ in range(7)]
        outcomes = []
        for number, ledger in enumerate(self.ledgers):
            owners = dict(self.owners)
            try:
                if number < 2:
                    outputs = [array("q", [UNWRITTEN[0]] * len(operations)) for _ in range(6)]
                    arrays = [array("q", column) for column in columns]
                    inputs = columns if as_lists and number == 1 else arrays
                    if as_lists and number == 1:
                        outputs = [list(output) for output in outputs]
                    try:
                        returned = ledger.apply_batch(*inputs, now_us, *outputs)
                    finally:
                        rows = list(zip(*outputs))
                else:
                    rows = [UNWRITTEN] * len(operations)
                    try:
                        returned = one_by_one(ledger, operations, now_us, owners, rows)
                    finally:
                        rows = list(rows)
            except Exception as error:  # the exception's type is part of the behaviour compared
                returned = ("raised", type(error).__name__)
            outcomes.append((returned, rows))
        outcome = self.compare("apply_batch", (operations, now_us), outcomes)
        for (method, _, merchant, _, _, new_id, _), row in zip(operations, outcome[1]):
            if row[0] == OK and method not in (R.OP_AUTHORIZE, R.OP_VOID):
                self.owners[new_id] = (merchant, row[1])
        return outcome

    def snapshot(self, ledger, hold_ids, transaction_ids, undone_only=False):
        """Everything the public API shows, for the ids given; with undone_only, only what a rollback
        restores (not account ids, which are not in the undo log, nor how many batches are open)."""
        return {
            "counts": (
                ledger.members_count,
                ledger.holds_resident_count,
                ledger.holds_open_count,
                ledger.transactions_resident_count,
                None if undone_only else ledger.batches_open,
            ),
            "members": [
                (ledger.member_id(slot), ledger.balance(slot), None if undone_only else ledger.member_account(slot))
                for slot in range(ledger.members_count)
            ],
            "holds": {hold_id: ledger.hold(hold_id) for hold_id in hold_ids if ledger.has_hold(hold_id)},
            "transactions": sorted(
                transaction_id for transaction_id in transaction_ids if ledger.has_transaction(transaction_id)
            ),
        }

    def snapshots(self, hold_ids, transaction_ids, undone_only=False):
        return [self.snapshot(ledger, hold_ids, transaction_ids, undone_only) for ledger in self.ledgers]

    def check(self, hold_ids, transaction_ids):
        assert self.call("check_invariants") is None
        reference = self.snapshot(self.reference, hold_ids, transaction_ids)
        for name, snapshot in zip(LEDGER_NAMES, self.snapshots(hold_ids, transaction_ids)):
            assert snapshot == reference, name


# --- a long seeded run ------------------------------------------------------------------------------

MEMBER_IDS = [f"member-{number:02}" for number in range(34)]


class RandomRun:
    """Draws operations from a seeded RNG, mostly valid, some out of range, some misuses. It reads the
    reference ledger to aim at resident ids and to keep loads consistent (posted >= held); the
    sequence stays a function of the seed."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.twins = Twins(members_max=32, holds_max=150, transactions_max=400)
        self.now_us = START_US
        self.next_hold_id = 1
        self.next_transaction_id = 1
        self.hold_merchant = {}
        self.transaction_merchant = {}
        self.statuses_seen = set()
        self.batch_statuses_seen = set()
        self.batches = self.batches_raised = 0

    def fresh_transaction_id(self, reuse=0.03):
        if self.rng.random() < reuse and self.next_transaction_id > 1:
            return self.rng.randrange(1, self.next_transaction_id)
        self.next_transaction_id += 1
        return self.next_transaction_id - 1

    def fresh_hold_id(self, reuse=0.03):
        if self.rng.random() < reuse and self.next_hold_id > 1:
            return self.rng.randrange(1, self.next_hold_id)
        self.next_hold_id += 1
        return self.next_hold_id - 1

    def recent_hold_id(self):
        # Mostly ids that were created (so capture and void get past UNKNOWN_HOLD), some at random.
        resident = [hold_id for hold_id in list(self.hold_merchant)[-40:] if self.twins.reference.has_hold(hold_id)]
        if resident and self.rng.random() < 0.8:
            return self.rng.choice(resident)
        return self.rng.randrange(max(1, self.next_hold_id - 40), self.next_hold_id + 2)

    def recent_transaction_id(self):
        resident = [
            transaction_id
            for transaction_id in list(self.transaction_merchant)[-60:]
            if self.twins.reference.has_transaction(transaction_id)
        ]
        if resident and self.rng.random() < 0.8:
            return self.rng.choice(resident)
        return self.rng.randrange(max(1, self.next_transaction_id - 60), self.next_transaction_id + 2)

    def merchant_of(self, known, key):
        if key in known and self.rng.random() < 0.85:
            return known[key]
        return self.rng.randrange(3)

    def member_slot(self):
        count = self.twins.reference.members_count
        if self.rng.random() < 0.05:
            return self.rng.choice([-1, count, -2])
        return self.rng.randrange(count) if count else -1

    def points(self, high, odd=0.02):
        roll = self.rng.random()
        if roll < odd:
            return self.rng.choice([0, -1])
        if roll < 0.01 + odd:
            return BALANCE_MAX - self.rng.randrange(3)
        return self.rng.randint(1, high)

    def batch_operation(self):
        """One operation for apply_batch(), aimed like the per-operation ones; caller bugs (which
        stop the batch) are rarer, so that most batches run to the end."""
        rng, reference = self.rng, self.twins.reference
        method = rng.choices(range(R.OP_EARN, R.OP_REFUND + 1), weights=[4, 4, 3, 2, 3, 3])[0]
        count = reference.members_count
        member = rng.randrange(count) if count and rng.random() > 0.005 else rng.choice([-1, count])
        merchant, ref_id, new_id = rng.randrange(3), 0, 0
        points = self.points(3_000, odd=0.004)
        if method in (R.OP_CAPTURE, R.OP_VOID):
            ref_id = self.recent_hold_id()
            merchant = self.merchant_of(self.hold_merchant, ref_id)
            points = 0 if rng.random() < 0.3 else points
        elif method == R.OP_REFUND:
            ref_id = self.recent_transaction_id()
            merchant = self.merchant_of(self.transaction_merchant, ref_id)
            points = self.points(2_000, odd=0.004)
        elif method == R.OP_AUTHORIZE:
            new_id = self.fresh_hold_id(reuse=0.005)
        if method not in (R.OP_AUTHORIZE, R.OP_VOID):
            new_id = self.fresh_transaction_id(reuse=0.005)
        return (method, member, merchant, points, ref_id, new_id, self.expires_at_us())

    def expires_at_us(self):
        # Whole milliseconds make ties on expiry common.
        return self.now_us + self.rng.randint(-2, 60) * 1_000

    def record(self, outcome, merchants, key, merchant):
        if isinstance(outcome, tuple) and outcome and isinstance(outcome[0], int):
            self.statuses_seen.add(outcome[0])
            if outcome[0] == OK:
                merchants[key] = merchant

    def step(self):
        rng, twins = self.rng, self.twins
        operation = rng.choices(
            [
                "earn",
                "authorize",
                "capture",
                "void",
                "redeem",
                "refund",
                "expire",
                "advance",
                "batch",
                "forget",
                "load_member",
                "load_hold",
                "load_transaction",
                "look_up",
                "apply_batch",
                "ensure_member",
                "account",
            ],
            weights=[15, 15, 12, 6, 8, 10, 4, 6, 5, 1, 4, 3, 3, 3, 6, 2, 2],
        )[0]
        if operation == "earn":
            merchant, transaction_id = rng.randrange(3), self.fresh_transaction_id()
            outcome = twins.call("earn", rng.choice(MEMBER_IDS), merchant, self.points(5_000), transaction_id)
            self.record(outcome, self.transaction_merchant, transaction_id, merchant)
        elif operation == "authorize":
            merchant, hold_id = rng.randrange(3), self.fresh_hold_id()
            outcome = twins.call(
                "authorize", self.member_slot(), merchant, self.points(3_000), hold_id, self.expires_at_us()
            )
            self.record(outcome, self.hold_merchant, hold_id, merchant)
        elif operation == "capture":
            hold_id = self.recent_hold_id()
            merchant, transaction_id = self.merchant_of(self.hold_merchant, hold_id), self.fresh_transaction_id()
            points = 0 if rng.random() < 0.3 else self.points(3_000)
            outcome = twins.call("capture", hold_id, merchant, points, transaction_id, self.now_us)
            self.record(outcome, self.transaction_merchant, transaction_id, merchant)
        elif operation == "void":
            hold_id = self.recent_hold_id()
            self.record(
                twins.call("void", hold_id, self.merchant_of(self.hold_merchant, hold_id), self.now_us), {}, None, None
            )
        elif operation == "redeem":
            merchant, transaction_id = rng.randrange(3), self.fresh_transaction_id()
            outcome = twins.call("redeem", self.member_slot(), merchant, self.points(3_000), transaction_id)
            self.record(outcome, self.transaction_merchant, transaction_id, merchant)
        elif operation == "refund":
            transaction_id = self.recent_transaction_id()
            merchant = self.merchant_of(self.transaction_merchant, transaction_id)
            refund_transaction_id = self.fresh_transaction_id()
            outcome = twins.call("refund", transaction_id, merchant, self.points(2_000), refund_transaction_id)
            self.record(outcome, self.transaction_merchant, refund_transaction_id, merchant)
        elif operation == "expire":
            twins.call("expire_holds", self.now_us + rng.randint(0, 5) * 1_000, rng.randint(-1, 8))
        elif operation == "advance":
            self.now_us += rng.randint(0, 5) * 1_000 + rng.choice([0, 1, 999])
        elif operation == "batch":
            # Up to three batches open, as a pipelined committer has; now and then an end with none
            # open, which is refused.
            open_count = twins.reference.batches_open
            if rng.random() < 0.05:
                name = rng.choice(["commit", "rollback", "rollback_newest"])
            elif open_count == 0 or (open_count < 3 and rng.random() < 0.4):
                name = "begin"
            else:
                name = rng.choices(["commit", "rollback", "rollback_newest"], weights=[6, 1, 2])[0]
            twins.call(name)
        elif operation == "apply_batch":
            operations = [self.batch_operation() for _ in range(rng.randint(0, 16))]
            self.batches += 1
            returned, rows = twins.apply_batch(operations, self.now_us, as_lists=rng.random() < 0.2)
            self.batches_raised += isinstance(returned, tuple)
            for (method, _, merchant, _, _, new_id, _), row in zip(operations, rows):
                if row == UNWRITTEN:
                    break
                self.batch_statuses_seen.add(row[0])
                if row[0] == OK:
                    known = self.hold_merchant if method == R.OP_AUTHORIZE else self.transaction_merchant
                    known[new_id] = merchant
        elif operation == "ensure_member":
            # 34 names for 32 members: CAPACITY (-1) comes up.
            twins.call("ensure_member", rng.choice(MEMBER_IDS))
        elif operation == "account":
            twins.call("set_member_account", self.member_slot(), rng.choice([-1, 0, 1, 2, 5_000]))
            twins.call("member_account", self.member_slot())
        elif operation == "forget":
            twins.call("forget_resolved")
        elif operation == "load_member":
            member_id = rng.choice(MEMBER_IDS)
            slot = twins.reference.member_slot(member_id)
            held = twins.reference.balance(slot)[1] if slot >= 0 else 0
            posted = held + rng.randint(0, 5_000)
            if rng.random() < 0.02:
                posted = rng.choice([-1, BALANCE_MAX + 1])
            if rng.random() < 0.5:
                twins.call("load_member", member_id, posted, rng.choice([-1, 0, 0, 1, 2, 7]))
            else:
                twins.call("load_member", member_id, posted)
        elif operation == "load_hold":
            slot, hold_id, merchant = self.member_slot(), self.fresh_hold_id(), rng.randrange(3)
            amount, status = rng.randint(0, 2_000), rng.choice([1, 1, 2, 3, 4])
            if 0 <= slot < twins.reference.members_count:
                posted, held = twins.reference.balance(slot)
                if status == HOLD_OPEN and amount > posted - held:
                    status = rng.choice([2, 3, 4])
            outcome = twins.call("load_hold", hold_id, slot, merchant, amount, self.expires_at_us(), status)
            if outcome is None:
                self.hold_merchant[hold_id] = merchant
        elif operation == "load_transaction":
            transaction_id, merchant = self.fresh_transaction_id(), rng.randrange(3)
            amount = rng.randint(0, 3_000)
            outcome = twins.call(
                "load_transaction",
                transaction_id,
                rng.randint(1, 5),
                self.member_slot(),
                merchant,
                amount,
                rng.randint(0, amount),
            )
            if outcome is None:
                self.transaction_merchant[transaction_id] = merchant
        else:
            twins.call("balance", self.member_slot())
            twins.call("hold", self.recent_hold_id())
            twins.call("has_transaction", self.recent_transaction_id())
            twins.call("member_slot", rng.choice(MEMBER_IDS))

    def check(self):
        self.twins.check(range(self.next_hold_id + 2), range(self.next_transaction_id + 2))


@pytest.mark.parametrize("seed", [1, 2, 3, 20261123])
def test_long_random_run_answers_the_same(seed):
    run = RandomRun(seed)
    for step in range(10_000):
        run.step()
        if step % 250 == 0:
            run.check()
    if run.twins.reference.batches_open:
        run.twins.call("rollback")
    run.check()
    # The run is only worth something if it went through every status, one call at a time and
    # in batches.
    assert run.statuses_seen == set(range(14)), sorted(run.statuses_seen)
    assert run.batch_statuses_seen == set(range(14)), sorted(run.batch_statuses_seen)
    # Some batches stop at a caller bug, most run to the end.
    assert 0 < run.batches_raised < run.batches // 4, (run.batches_raised, run.batches)


# --- hypothesis: short runs, shrunk to a minimal failing sequence ---------------------------------

NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]
MERCHANTS = st.integers(0, 2)
# Most calls are valid; an oddity swaps in one bad or colliding argument (6: another merchant,
# 7: points or amount out of range, 8: an arbitrary slot or id, 9: an id that may be resident).
# 0 (valid) is where shrinking heads, so a minimal failing sequence stays readable.
ODDITY = st.integers(0, 9)
SHARE = st.integers(0, 10)
ODD_POINTS = st.sampled_from([0, -1, BALANCE_MAX, BALANCE_MAX - 1])
ANY_SLOT = st.integers(-2, 8)
ANY_ID = st.integers(0, 40)
LIFETIME = st.integers(0, 30)
# Ids that snapshots taken at begin() cover: any id a run may create (new_id counts up from 1_001).
MARK_IDS = [*range(41), *range(1_001, 1_400)]


def created(outcome, value):
    """What a rule adds to its bundle: the id or slot it created, if the operation succeeded."""
    succeeded = outcome is None or (isinstance(outcome, tuple) and outcome[0] == OK)
    return multiple(value) if succeeded else multiple()


class LedgerMachine(RuleBasedStateMachine):
    members = Bundle("members")
    holds = Bundle("holds")
    transactions = Bundle("transactions")

    def __init__(self):
        super().__init__()
        self.twins = Twins(members_max=6, holds_max=10, transactions_max=16)
        self.now_us = START_US
        self.next_id = 1_000
        self.transaction_terms = {}  # id -> (merchant, amount), so refunds can be aimed right
        # per open batch, oldest first: the snapshots of the ledgers just before its begin()
        self.marks = []

    def remember(self, outcome, transaction_id, merchant, amount):
        if isinstance(outcome, tuple) and outcome[0] == OK:
            self.transaction_terms[transaction_id] = (merchant, amount)
        return created(outcome, transaction_id)

    def expires_at_us(self, lifetime):
        # Small draws (where shrinking heads) live long; 29 and 30 are expired at once.
        return self.now_us + (29 - lifetime) * 1_000

    def new_id(self, oddity, any_id):
        if oddity == 9:
            return any_id
        self.next_id += 1
        return self.next_id

    @rule(
        target=members,
        member_id=st.sampled_from(NAMES),
        merchant=MERCHANTS,
        points=st.integers(0, 3_000),
        oddity=ODDITY,
        odd_points=ODD_POINTS,
        any_id=ANY_ID,
    )
    def earn(self, member_id, merchant, points, oddity, odd_points, any_id):
        points = odd_points if oddity == 7 else points
        transaction_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("earn", member_id, merchant, points, transaction_id)
        self.remember(outcome, transaction_id, merchant, points)
        return created(outcome, outcome[1] if isinstance(outcome, tuple) else None)

    @rule(
        target=holds,
        slot=members,
        merchant=MERCHANTS,
        points=st.integers(1, 3_000),
        offset=LIFETIME,
        oddity=ODDITY,
        odd_points=ODD_POINTS,
        any_slot=ANY_SLOT,
        any_id=ANY_ID,
    )
    def authorize(self, slot, merchant, points, offset, oddity, odd_points, any_slot, any_id):
        points = odd_points if oddity == 7 else points
        slot = any_slot if oddity == 8 else slot
        hold_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("authorize", slot, merchant, points, hold_id, self.expires_at_us(offset))
        return created(outcome, hold_id)

    def hold_terms(self, hold_id, oddity, other_merchant):
        """(merchant, amount) of a resident hold, or a guess; another merchant when oddity is 6."""
        merchant, amount = other_merchant, 1_000
        if self.twins.reference.has_hold(hold_id):
            _, _, merchant, amount, _ = self.twins.reference.hold(hold_id)
        return (other_merchant if oddity == 6 else merchant), amount

    @rule(
        target=transactions,
        hold_id=holds,
        share=SHARE,
        oddity=ODDITY,
        odd_points=ODD_POINTS,
        other_merchant=MERCHANTS,
        any_id=ANY_ID,
    )
    def capture(self, hold_id, share, oddity, odd_points, other_merchant, any_id):
        hold_id = any_id if oddity == 8 else hold_id
        merchant, amount = self.hold_terms(hold_id, oddity, other_merchant)
        # share 0 captures the whole hold (points 0); 7 asks for one point more than held.
        points = amount * share // 10
        points = self.rng_points(oddity, odd_points, points, amount + 1)
        transaction_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("capture", hold_id, merchant, points, transaction_id, self.now_us)
        captured = outcome[1] if isinstance(outcome, tuple) else 0
        return self.remember(outcome, transaction_id, merchant, captured)

    @staticmethod
    def rng_points(oddity, odd_points, points, one_too_many):
        if oddity != 7:
            return points
        return one_too_many if odd_points == BALANCE_MAX - 1 else odd_points

    @rule(hold_id=holds, oddity=ODDITY, other_merchant=MERCHANTS, any_id=ANY_ID)
    def void(self, hold_id, oddity, other_merchant, any_id):
        hold_id = any_id if oddity == 8 else hold_id
        merchant, _ = self.hold_terms(hold_id, oddity, other_merchant)
        self.twins.call("void", hold_id, merchant, self.now_us)

    @rule(
        target=transactions,
        slot=members,
        merchant=MERCHANTS,
        points=st.integers(1, 3_000),
        oddity=ODDITY,
        odd_points=ODD_POINTS,
        any_slot=ANY_SLOT,
        any_id=ANY_ID,
    )
    def redeem(self, slot, merchant, points, oddity, odd_points, any_slot, any_id):
        points = odd_points if oddity == 7 else points
        slot = any_slot if oddity == 8 else slot
        transaction_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("redeem", slot, merchant, points, transaction_id)
        return self.remember(outcome, transaction_id, merchant, points)

    @rule(
        target=transactions,
        transaction_id=transactions,
        share=SHARE,
        oddity=ODDITY,
        odd_points=ODD_POINTS,
        other_merchant=MERCHANTS,
        any_id=ANY_ID,
    )
    def refund(self, transaction_id, share, oddity, odd_points, other_merchant, any_id):
        transaction_id = any_id if oddity == 8 else transaction_id
        merchant, amount = self.transaction_terms.get(transaction_id, (other_merchant, 1_000))
        merchant = other_merchant if oddity == 6 else merchant
        points = self.rng_points(oddity, odd_points, max(1, amount * share // 10), amount + 1)
        refund_transaction_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("refund", transaction_id, merchant, points, refund_transaction_id)
        return self.remember(outcome, refund_transaction_id, merchant, points)

    @rule(limit=st.integers(0, 4), ahead_milliseconds=st.integers(0, 40), oddity=ODDITY)
    def expire_holds(self, limit, ahead_milliseconds, oddity):
        # Looking ahead expires several holds at once, so their order is tested too.
        self.twins.call("expire_holds", self.now_us + ahead_milliseconds * 1_000, -1 if oddity == 7 else limit)

    @rule(milliseconds=st.integers(0, 10))
    def advance(self, milliseconds):
        self.now_us += milliseconds * 1_000

    def mark_snapshots(self):
        return self.twins.snapshots(MARK_IDS, MARK_IDS, undone_only=True)

    @rule()
    def begin(self):
        self.marks.append(self.mark_snapshots())
        self.twins.call("begin")

    @rule(name=st.sampled_from(["commit", "rollback", "rollback_newest"]))
    def end_batch(self, name):
        """commit() keeps the newer batches' marks; rollback() goes back to the oldest mark,
        rollback_newest() to the newest (account ids aside: they are not in the undo log)."""
        outcome = self.twins.call(name)
        if not self.marks:
            assert outcome == ("raised", "RuntimeError")
            return
        assert outcome is None
        if name == "commit":
            del self.marks[0]
            return
        expected = self.marks[0] if name == "rollback" else self.marks[-1]
        del self.marks[0 if name == "rollback" else -1 :]
        assert self.mark_snapshots() == expected

    @rule(transaction_id=transactions, hold_id=holds, slot=members, share=SHARE, data=st.data())
    def rolled_back_batch_replays_the_same(self, transaction_id, hold_id, slot, share, data):
        """A batch rolled back leaves no trace: the state equals the one before begin(), and the
        same batch run again answers the same (refunded amounts, hold statuses, the expiry heap and
        the ids it created are all back)."""
        ids = [*range(41), *range(1_001, self.next_id + 8)]
        before = self.twins.snapshots(ids, ids)
        # On top of whatever batches are open: rollback_newest() undoes only this one.
        assert self.twins.call("begin") is None
        merchant, amount = self.transaction_terms.get(transaction_id, (0, 1_000))
        hold_merchant, _ = self.hold_terms(hold_id, 0, 0)
        operations = data.draw(
            st.permutations(
                [
                    ("refund", transaction_id, merchant, max(1, amount * share // 10), self.next_id + 1),
                    ("capture", hold_id, hold_merchant, 0, self.next_id + 2, self.now_us),
                    ("void", hold_id, hold_merchant, self.now_us),
                    ("redeem", slot, 0, 1 + share, self.next_id + 3),
                    ("authorize", slot, 0, 1 + share, self.next_id + 4, self.expires_at_us(share)),
                    ("earn", "new", 0, 10, self.next_id + 5),
                    ("load_member", "loaded", 10),
                    ("load_transaction", self.next_id + 6, fastpath._reference.KIND_REDEEM, slot, 0, 10, 0),
                    ("expire_holds", self.now_us + 40_000, 10),
                ]
            )
        )
        first = [self.twins.call(*operation) for operation in operations]
        self.twins.call("rollback_newest")
        assert self.twins.snapshots(ids, ids) == before
        self.twins.call("begin")
        again = [self.twins.call(*operation) for operation in operations]
        self.twins.call("rollback_newest")
        assert again == first
        assert self.twins.snapshots(ids, ids) == before

    @rule()
    def forget_resolved(self):
        self.twins.call("forget_resolved")

    @rule(
        target=members,
        member_id=st.sampled_from(NAMES),
        extra=st.integers(0, 3_000),
        oddity=ODDITY,
        account_id=st.integers(-1, 3),
    )
    def load_member(self, member_id, extra, oddity, account_id):
        # Only consistent loads (posted >= held) unless the oddity asks for an out-of-range one.
        slot = self.twins.reference.member_slot(member_id)
        held = self.twins.reference.balance(slot)[1] if slot >= 0 else 0
        posted = BALANCE_MAX + 1 if oddity == 7 else held + extra
        if account_id == 0:
            outcome = self.twins.call("load_member", member_id, posted)
        else:
            outcome = self.twins.call("load_member", member_id, posted, account_id)
        return multiple(outcome) if isinstance(outcome, int) else multiple()

    @rule(target=members, member_id=st.sampled_from(NAMES))
    def ensure_member(self, member_id):
        outcome = self.twins.call("ensure_member", member_id)
        return multiple(outcome) if isinstance(outcome, int) and outcome >= 0 else multiple()

    @rule(slot=members, account_id=st.integers(-1, 3), oddity=ODDITY, any_slot=ANY_SLOT)
    def set_member_account(self, slot, account_id, oddity, any_slot):
        slot = any_slot if oddity == 8 else slot
        self.twins.call("set_member_account", slot, account_id)
        self.twins.call("member_account", slot)

    def batch_operation(self, data, holds, transactions):
        """One operation for apply_batch(), drawn like the rules above draw theirs; holds and
        transactions map the ids it may aim at (resident, or created earlier in the same batch) to
        their (merchant, amount)."""
        method = data.draw(st.integers(R.OP_EARN, R.OP_REFUND), label="method")
        oddity, any_id = data.draw(ODDITY, label="oddity"), data.draw(ANY_ID, label="any_id")
        count = self.twins.reference.members_count
        member = data.draw(st.integers(0, count - 1), label="member") if count else -1
        member = data.draw(ANY_SLOT, label="any_slot") if oddity == 8 else member
        merchant = data.draw(MERCHANTS, label="merchant")
        points = data.draw(st.integers(1, 3_000), label="points")
        share = data.draw(SHARE, label="share")
        odd_points = data.draw(ODD_POINTS, label="odd_points")
        expires_at_us = self.expires_at_us(data.draw(LIFETIME, label="lifetime"))
        ref_id = 0
        if method in (R.OP_CAPTURE, R.OP_VOID, R.OP_REFUND):
            known = holds if method != R.OP_REFUND else transactions
            ref_id = data.draw(st.sampled_from(sorted(known)), label="ref_id") if known and oddity != 8 else any_id
            right_merchant, amount = known.get(ref_id, (merchant, 1_000))
            merchant = merchant if oddity == 6 else right_merchant
            points = amount * share // 10 if method == R.OP_CAPTURE else max(1, amount * share // 10)
            points = self.rng_points(oddity, odd_points, points, amount + 1)
        elif oddity == 7:
            points = odd_points
        new_id = 0 if method == R.OP_VOID else self.new_id(oddity, any_id)
        if method == R.OP_AUTHORIZE:
            holds[new_id] = (merchant, points)
        elif method != R.OP_VOID:
            transactions[new_id] = (merchant, points)
        return (method, member, merchant, points, ref_id, new_id, expires_at_us)

    @rule(data=st.data(), size=st.integers(0, 5), as_lists=st.booleans())
    def apply_batch(self, data, size, as_lists):
        """A batch through the kernel answers as its operations one by one (in both
        implementations), including a caller bug part-way."""
        reference = self.twins.reference
        holds = {hold_id: reference.hold(hold_id)[2:4] for hold_id in MARK_IDS if reference.has_hold(hold_id)}
        transactions = {
            transaction_id: self.transaction_terms.get(transaction_id, (0, 1_000))
            for transaction_id in MARK_IDS
            if reference.has_transaction(transaction_id)
        }
        operations = [self.batch_operation(data, holds, transactions) for _ in range(size)]
        _, rows = self.twins.apply_batch(operations, self.now_us, as_lists)
        for (method, _, merchant, _, _, new_id, _), row in zip(operations, rows):
            if row[0] == OK and method not in (R.OP_AUTHORIZE, R.OP_VOID):
                self.transaction_terms[new_id] = (merchant, row[2])

    @rule(
        target=holds,
        slot=members,
        merchant=MERCHANTS,
        amount=st.integers(1, 2_000),
        status=st.integers(1, 4),
        offset=LIFETIME,
        oddity=ODDITY,
        any_slot=ANY_SLOT,
        any_id=ANY_ID,
    )
    def load_hold(self, slot, merchant, amount, status, offset, oddity, any_slot, any_id):
        slot = any_slot if oddity == 8 else slot
        if 0 <= slot < self.twins.reference.members_count:
            posted, held = self.twins.reference.balance(slot)
            if status == HOLD_OPEN and amount > posted - held:
                status = fastpath._reference.HOLD_STATUS_VOIDED
        amount = 0 if oddity == 7 else amount
        hold_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("load_hold", hold_id, slot, merchant, amount, self.expires_at_us(offset), status)
        return created(outcome, hold_id)

    @rule(
        target=transactions,
        kind=st.integers(1, 5),
        slot=members,
        merchant=MERCHANTS,
        amount=st.integers(0, 3_000),
        data=st.data(),
        oddity=ODDITY,
        any_slot=ANY_SLOT,
        any_id=ANY_ID,
    )
    def load_transaction(self, kind, slot, merchant, amount, data, oddity, any_slot, any_id):
        refunded = data.draw(st.integers(0, amount))
        if oddity == 7:
            kind, refunded = data.draw(st.sampled_from([(0, refunded), (6, refunded), (kind, amount + 1)]))
        slot = any_slot if oddity == 8 else slot
        transaction_id = self.new_id(oddity, any_id)
        outcome = self.twins.call("load_transaction", transaction_id, kind, slot, merchant, amount, refunded)
        if outcome is None:
            self.transaction_terms[transaction_id] = (merchant, amount)
        return created(outcome, transaction_id)

    @invariant()
    def same_state_and_invariants_hold(self):
        ids = [*range(41), *range(1_001, self.next_id + 1)]
        self.twins.check(ids, ids)


LedgerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_hypothesis_runs_answer_the_same = LedgerMachine.TestCase
