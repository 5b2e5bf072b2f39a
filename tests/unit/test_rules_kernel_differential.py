"""The compiled rules path (processor/rules_kernel.py over Ledger.apply_earn_redeem) against the
per-operation Python rules path it replaces, and against its pure-Python twin: three state machines fed
the same random batches (earn, redeem, authorize, capture, void, refund, link, across members, merchants,
levels, lot expiries and time steps, a program in force) must answer the same outcomes and write the same
batch records (transactions, entries, idempotency records, the rules' rows: lots, pieces, levels, earn
records, tier events), and hold the same balances, lots and tier state after every batch, rollbacks
included."""

from __future__ import annotations

import array
import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpath
import fastpath._core
import fastpath._reference
from processor import domain, rules
from processor.config import Settings
from processor.domain import Method, Operation
from processor.program import ProgramState, RulesWrite
from processor.rules_kernel import kernel_supports
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import MerchantRow

pytestmark = pytest.mark.timeout(300)

NOW = 1_800_000_000_000_000
SECOND = 1_000_000
DAY = 86_400 * SECOND
OPERATOR = {
    domain.ACCOUNT_OPERATOR_FEE_REVENUE: 1,
    domain.ACCOUNT_OPERATOR_BREAKAGE: 2,
    rules.ACCOUNT_OPERATOR_TIER_REWARDS: 3,
    rules.ACCOUNT_OPERATOR_PROMOTIONS: 4,
    rules.ACCOUNT_OPERATOR_REFERRALS: 5,
    rules.ACCOUNT_OPERATOR_ACQUIRING: 6,
    rules.ACCOUNT_OPERATOR_DIVIDENDS: 7,
}
MERCHANTS = [
    MerchantRow(
        f"shop-{i}",
        i + 1,
        1_000 * (i + 1),
        "active",
        fee_redeemed_bps=[0, 100, 250][i],
        fee_issued_bps=[50, 0, 333][i],
        issued_account_id=10 * (i + 1) + 1,
        redeemed_account_id=10 * (i + 1) + 2,
        fees_account_id=10 * (i + 1) + 3,
        acquiring_account_id=10 * (i + 1) + 4,
    )
    for i in range(3)
]
MEMBERS = [f"member-{i}" for i in range(8)]

# Levels close together so that level changes, multipliers and their uplift happen within a few earns;
# a short expiry so that time steps expire lots (which the kernel leaves to the per-operation path).
VERSION = rules.ProgramVersion(
    "alliance",
    1,
    0,
    expiry_period_us=3 * DAY,
    restore_grace_us=DAY,
    levels=(
        rules.Level("registered", 0),
        rules.Level("blue", 2_000, multiplier_bps=12_500),
        rules.Level("yellow", 5_000, multiplier_bps=15_000),
        rules.Level("red", 9_000, multiplier_bps=20_000),
    ),
    acquiring_share_bps=150,
    referral_bonus_point_units=700,
    referral_minimum_purchase=5_000,
    merchant_terms=(rules.MerchantTerms("shop-2", acquiring_share_bps=900),),
)


def test_the_kernel_implements_the_differential_version_and_the_example_program():
    import json
    import pathlib

    config = json.loads(pathlib.Path("ops/program.example.json").read_text())
    assert kernel_supports(VERSION)
    assert kernel_supports(rules.version_from_config("alliance", 1, 0, config))


@pytest.mark.parametrize(
    "change",
    [
        {"tier_window_us": 30 * DAY},
        {
            "promotions": (
                rules.Promotion("p", 0, 10**18, rules.SCOPE_NETWORK, bonus_point_units=5, budget_point_units=9),
            )
        },
        {"member_points_spent_per_day_max": 1_000},
        {"dividends": rules.DividendSettings(1_000)},
        {"levels": (rules.Level("registered", 0), rules.Level("blue", 2_000, bonus_point_units=100))},
    ],
    ids=["tier window", "promotions", "spending cap", "dividends", "level bonus"],
)
def test_a_version_with_a_rule_the_kernel_lacks_goes_the_per_operation_path(change):
    assert not kernel_supports(dataclasses.replace(VERSION, **change))
    assert not kernel_supports(None)


def test_a_version_with_an_option_added_after_the_kernel_goes_the_per_operation_path_once_it_is_set():
    # what another engineer's new option looks like to the predicate: a field the kernel does not know
    @dataclasses.dataclass(frozen=True, slots=True)
    class Extended(rules.ProgramVersion):
        sign_up_bonus_point_units: int = 0

    fields = {f.name: getattr(VERSION, f.name) for f in dataclasses.fields(rules.ProgramVersion)}
    assert kernel_supports(Extended(**fields))
    assert not kernel_supports(Extended(**fields, sign_up_bonus_point_units=500))


def machine(module, kernel: bool) -> LedgerStateMachine:
    m = LedgerStateMachine(Settings())
    m.ledger = module.Ledger(100, 1_000, 100_000)
    m.merchants = Merchants(list(MERCHANTS))
    m.operator_accounts = dict(OPERATOR)
    m.ids = IdAllocator(1, 1)
    m.account_ids = list(range(1_000, 1_100))
    m.program = ProgramState(rules.Program("alliance", (VERSION,)))
    m.rules_kernel = kernel
    return m


class Trio:
    """The compiled kernel path, the per-operation path and the kernel path over the twin, in step."""

    def __init__(self) -> None:
        self.machines = {
            "kernel": machine(fastpath._core, True),
            "per-operation": machine(fastpath._core, False),
            "twin": machine(fastpath._reference, True),
        }
        self.keys = 0
        self.authorizations: list[int] = []
        self.transactions: list[int] = []
        self.now = NOW
        self.kernel_operations = 0  # decided by the compiled call (counted on the "kernel" machine)
        self.kinds: set[int] = set()  # transaction kinds written
        self.level_changes: set[tuple[str, str]] = set()
        compiled = self.machines["kernel"]
        kernel_run = compiled._kernel_run

        def counted(run, *args):
            self.kernel_operations += len(run)
            return kernel_run(run, *args)

        compiled._kernel_run = counted  # type: ignore[method-assign]
        # the lot rows a kernel run hands flush() (ProgramState._lots_diff) against what flush() would
        # find by looking the touched keys up (_lots_changed), on both kernel paths, before every flush
        self.diffs_checked = 0
        self.sums_checked = 0
        for name in ("kernel", "twin"):
            self._check_diffs(self.machines[name].program)
            self.machines[name].program.sum_kept_from_lots = 1  # every member's sum carried (16 in service)

    def _check_diffs(self, program: ProgramState) -> None:
        flush = program.flush

        def checked() -> RulesWrite:
            for member_id, diff in program._lots_diff.items():
                assert diff == program._lots_changed(member_id), f"the kernel's lot rows of {member_id} differ"
            self.diffs_checked += len(program._lots_diff)
            # check_lots' sums, as kernel runs carried them forward, against the sum of each member's lots
            for member_id, (lots, total) in program._lot_totals.items():
                if lots is program.lots.get(member_id, ()):
                    assert total == sum(lot.amount for lot in lots), f"the lots' sum of {member_id} is off"
                    self.sums_checked += 1
            return flush()

        program.flush = checked  # type: ignore[method-assign]

    def operation(self, rng: random.Random) -> Operation:
        self.keys += 1
        merchant = rng.choice(MERCHANTS)
        member = rng.choice(MEMBERS)
        roll = rng.random()
        fields: dict = {}
        if roll < 0.45:
            purchase = rng.choice([0, 999, 5_000, rng.randrange(1, 40_000)])
            method = Method.EARN
            fields = {"member_id": member, "points": purchase // 10, "purchase_amount": purchase}
        elif roll < 0.75:
            method = Method.REDEEM
            points = rng.choice([1, 50, rng.randrange(1, 3_000)])
            lots = self.machines["per-operation"].program.lots.get(member, ())
            if lots and rng.random() < 0.3:  # exactly the member's soonest lots: a spend that empties them
                points = sum(lot.amount for lot in lots[: rng.randrange(1, len(lots) + 1)])
            fields = {"member_id": member, "points": points}
        elif roll < 0.82:
            method = Method.AUTHORIZE
            fields = {
                "member_id": member,
                "points": rng.randrange(1, 1_500),
                "hold_ttl_seconds": rng.choice([5, 3_600]),
            }
        elif roll < 0.87 and self.authorizations:
            method = Method.CAPTURE
            fields = {
                "authorization_id": rng.choice(self.authorizations[-5:]),
                "points": rng.choice([0, 1, 100, 1_500]),
            }
        elif roll < 0.90 and self.authorizations:
            method = Method.VOID
            fields = {"authorization_id": rng.choice(self.authorizations[-5:])}
        elif roll < 0.96 and self.transactions:
            method = Method.REFUND
            fields = {"transaction_id": rng.choice(self.transactions), "points": rng.randrange(1, 800)}
        else:
            method = Method.LINK
            referrer = rng.choice(MEMBERS + ["", ""])
            fields = {"member_id": member, "referrer_id": referrer if referrer != member else ""}
        return Operation(method, merchant.merchant_id, merchant.merchant_slot, f"k{self.keys}", dict(fields), **fields)

    def batch(self, operations: list[Operation], commit: bool) -> None:
        results = {}
        for name, m in self.machines.items():
            ops = [dataclasses.replace(op) for op in operations]
            outcomes, write = m.apply(ops, {}, self.now)
            results[name] = (
                [(o.code, o.fields, o.message) for o in outcomes],
                write.transactions,
                write.entries,
                write.idempotency,
                write.new_members,
                write.new_holds,
                write.resolved_holds,
                write.refunds,
                write.rules,
                write.last_transaction_id,
            )
        expected = results["per-operation"]
        self.kinds |= {t[1] for t in expected[1]}
        self.level_changes |= {(event[2], event[3]) for event in expected[8].tier_events}
        for name in ("kernel", "twin"):
            for what, got, want in zip(
                (
                    "outcomes",
                    "transactions",
                    "entries",
                    "idempotency",
                    "new_members",
                    "new_holds",
                    "resolved_holds",
                    "refunds",
                    "rules",
                    "last_transaction_id",
                ),
                results[name],
                expected,
            ):
                assert got == want, f"{name}: {what} differ from the per-operation path"
        for outcome, op in zip(results["per-operation"][0], operations):
            if outcome[0] is domain.Code.OK:
                if op.method is Method.AUTHORIZE:
                    self.authorizations.append(outcome[1]["authorization_id"])
                elif outcome[1].get("transaction_id"):
                    self.transactions.append(outcome[1]["transaction_id"])
        for m in self.machines.values():
            if commit:
                m.commit()
            else:
                m.rollback()
        self.check_state()

    def check_state(self) -> None:
        states = {}
        for name, m in self.machines.items():
            ledger, program = m.ledger, m.program
            ledger.check_invariants()
            states[name] = (
                {member: m.balance(member) for member in MEMBERS},
                {member: lots for member, lots in program.lots.items() if lots},
                dict(program.members),
                dict(program.pieces),
                dict(program.earns),
                dict(program.spends),
                # the expiry heap's live entries, which decide which members the expiry job visits when:
                # one at each member's soonest expiry (the heap's invariant, checked). Stale entries (at
                # an expiry the member's soonest has moved past: skipped when popped) are not compared:
                # the per-operation path pushes one each time an operation moves the soonest, a kernel
                # run one for the run's end
                live_schedule(program),
                dict(program.granted),
                m.ids.next_transaction_id,
                m.ids.next_authorization_id,
            )
            for member in MEMBERS:
                slot = ledger.member_slot(member)
                if slot >= 0:
                    posted, held = ledger.balance(slot)
                    assert sum(lot.amount for lot in program.lots.get(member, ())) <= posted - held
        assert states["kernel"] == states["per-operation"]
        assert states["twin"] == states["per-operation"]


def live_schedule(program: ProgramState) -> list[tuple[int, str]]:
    """(soonest expiry, member) of every member with an expiring lot, each checked to be on the heap."""
    entries = set(program._due)
    soonest = [
        (lots[0].expires_at_us, member)
        for member, lots in program.lots.items()
        if lots and lots[0].expires_at_us is not None
    ]
    missing = [entry for entry in soonest if entry not in entries]
    assert not missing, f"members whose soonest expiry has no entry on the expiry heap: {missing}"
    return sorted(soonest)


def run_steps(seed: int, batches: int, rollback_share: float = 0.1) -> Trio:
    rng = random.Random(seed)
    trio = Trio()
    for _ in range(batches):
        operations = [trio.operation(rng) for _ in range(rng.randrange(1, 40))]
        trio.batch(operations, commit=rng.random() >= rollback_share)
        trio.now += rng.choice([0, SECOND, 3_600 * SECOND, DAY, 2 * DAY])
    return trio


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), batches=st.integers(1, 12))
def test_kernel_per_operation_path_and_twin_agree_on_random_batches(seed, batches):
    run_steps(seed, batches)


def test_kernel_per_operation_path_and_twin_agree_over_thousands_of_operations():
    trio = run_steps(20261205, 250)
    assert trio.keys >= 4_000
    # the run went through the parts of the program: most earns and redeems decided by the kernel,
    # every level reached, lots expired, acquiring and referral rewards paid, refunds of earns
    assert trio.kernel_operations >= 2_000
    assert trio.diffs_checked >= 500  # flush() took most kernel members' lot rows from their run
    assert trio.sums_checked >= 500  # and check_lots most of their sums
    assert {after for _, after in trio.level_changes} >= {"blue", "yellow", "red"}
    assert trio.kinds >= {
        fastpath.KIND_EARN,
        fastpath.KIND_REDEEM,
        fastpath.KIND_CAPTURE,
        fastpath.KIND_REFUND_EARN,
        fastpath.KIND_REFUND_REDEMPTION,
        rules.KIND_EXPIRY,
        rules.KIND_ACQUIRING_REWARD,
        rules.KIND_ACQUIRING_REVERSAL,
        rules.KIND_REFERRAL_BONUS,
    }


def test_the_expiry_heap_grows_with_members_not_with_their_earns():
    """A kernel run pushed one expiry heap entry per member per run with an earn (its new lot's expiry),
    stale at once since an earn's lot expires last: a member earning every batch for a year left an
    entry per batch on the heap (issue 14 target 5: memory). Now a run pushes only when it moves the
    member's soonest expiry, so 300 batches of earns (and redeems that leave the soonest lot in place)
    by 8 members leave about one entry a member."""
    m = machine(fastpath._core, True)
    keys = 0
    for batch in range(300):
        operations = []
        for member in MEMBERS:
            keys += 1
            operations.append(
                Operation(Method.EARN, "shop-0", 1, f"e{keys}", {}, member_id=member, points=100, purchase_amount=1_000)
            )
        m.apply(operations, {}, NOW + batch * SECOND)
        m.commit()
    assert sum(len(lots) for lots in m.program.lots.values()) == 300 * len(MEMBERS)
    assert live_schedule(m.program) == sorted((NOW + VERSION.expiry_period_us, member) for member in MEMBERS)
    assert len(m.program._due) <= 2 * len(MEMBERS)


def test_a_kernel_run_rolled_back_leaves_the_state_as_before():
    m = machine(fastpath._core, True)
    earn = Operation(Method.EARN, "shop-0", 1, "a", {}, member_id="member-0", points=3_000, purchase_amount=30_000)
    m.apply([earn], {}, NOW)
    m.commit()
    before = (m.balance("member-0"), dict(m.program.members), dict(m.program.lots), m.ids.next_transaction_id)
    second = Operation(Method.EARN, "shop-1", 2, "b", {}, member_id="member-0", points=4_000, purchase_amount=40_000)
    redeem = Operation(Method.REDEEM, "shop-1", 2, "c", {}, member_id="member-0", points=500)
    outcomes, _ = m.apply([second, redeem], {}, NOW + SECOND)
    assert [o.code for o in outcomes] == [domain.Code.OK, domain.Code.OK]
    assert m.program.members["member-0"].level == "yellow"
    m.rollback()
    m.ids.next_transaction_id = before[3]  # the committer resets ids from Postgres after a rollback
    assert (m.balance("member-0"), dict(m.program.members), dict(m.program.lots), m.ids.next_transaction_id) == before


@pytest.mark.parametrize("module", [fastpath._core, fastpath._reference], ids=["compiled", "twin"])
def test_a_kernel_run_rolled_back_takes_its_earn_records_and_pieces_with_it(module):
    # the run's new earn records and pieces go into the undo log as one entry per table
    m = machine(module, True)
    earn = Operation(Method.EARN, "shop-0", 1, "a", {}, member_id="member-0", points=3_000, purchase_amount=30_000)
    m.apply([earn], {}, NOW)
    m.commit()
    before = (dict(m.program.earns), dict(m.program.pieces))
    second = Operation(Method.EARN, "shop-1", 2, "b", {}, member_id="member-0", points=4_000, purchase_amount=40_000)
    redeem = Operation(Method.REDEEM, "shop-1", 2, "c", {}, member_id="member-0", points=500)
    outcomes, write = m.apply([second, redeem], {}, NOW + SECOND)
    assert [o.code for o in outcomes] == [domain.Code.OK, domain.Code.OK]
    assert len(m.program.earns) == len(before[0]) + 1 and len(m.program.pieces) == len(before[1]) + 1
    assert set(write.rules.earns) <= set(m.program.earns)
    m.rollback()
    assert (dict(m.program.earns), dict(m.program.pieces)) == before


def test_the_compiled_rows_refuse_classes_they_do_not_build():
    # the compiled rows set the fields of fastpath.records' Lot, Earn and EarnRecord in C: any other
    # classes are refused before a row is built
    m = machine(fastpath._core, True)
    classes = (domain.Outcome, domain.Code.OK, rules.Lot, rules.Earn, object)
    columns = [array.array("q") for _ in range(13)]
    transactions: list = []

    def rows(operations: list, members: list) -> None:
        m.ledger.earn_redeem_rows(
            operations,
            members,
            array.array("q"),
            array.array("q"),
            array.array("q"),
            columns,
            array.array("q"),
            array.array("q"),
            [],
            {},
            [],
            (),
            (1, NOW, 0, 1, 3, 6, 12, 2, 0),
            classes,
            transactions,
            [],
            [],
            array.array("q"),
            set(),
            {},
            [],
            [],
            [],
            {},
        )

    with pytest.raises(TypeError, match="fastpath.records' Lot, Earn and EarnRecord only"):
        rows([], [])
    with pytest.raises(ValueError, match="one item per operation"):
        rows([object()], [0])
    assert transactions == []
