"""Behaviour of the fast-path ledger, run against the compiled module and its pure-Python twin."""

import importlib.machinery
import os
import pathlib
import subprocess
import sys

import pytest

import fastpath
import fastpath._core
import fastpath._reference

ROOT = pathlib.Path(__file__).resolve().parents[2]

MERCHANT = 1
OTHER_MERCHANT = 2
NOW_US = 1_700_000_000_000_000
LATER_US = NOW_US + 60_000_000


@pytest.fixture(params=[fastpath._core, fastpath._reference], ids=["cython", "python"])
def impl(request):
    return request.param


@pytest.fixture
def ledger(impl):
    return impl.Ledger(members_max=100, holds_max=100, transactions_max=100)


def snapshot(ledger, hold_ids=range(0), transaction_ids=range(0)):
    """Everything the public API shows of a ledger that the undo log restores, for the ids the test
    has used (not account ids, which it does not restore, nor batches_open)."""
    return {
        "counts": (
            ledger.members_count,
            ledger.holds_resident_count,
            ledger.holds_open_count,
            ledger.transactions_resident_count,
        ),
        "members": [(ledger.member_id(slot), ledger.balance(slot)) for slot in range(ledger.members_count)],
        "holds": {hold_id: ledger.hold(hold_id) for hold_id in hold_ids if ledger.has_hold(hold_id)},
        "transactions": {
            transaction_id for transaction_id in transaction_ids if ledger.has_transaction(transaction_id)
        },
    }


def funded(ledger, member_id="alice", points=10_000, transaction_id=1):
    status, slot, _ = ledger.earn(member_id, MERCHANT, points, transaction_id)
    assert status == fastpath._core.OK
    return slot


# --- module and constants -------------------------------------------------------------------------

STATUSES = {
    "OK": 0,
    "INSUFFICIENT_POINTS": 1,
    "UNKNOWN_MEMBER": 2,
    "UNKNOWN_HOLD": 3,
    "HOLD_EXPIRED": 4,
    "HOLD_CAPTURED": 5,
    "HOLD_VOIDED": 6,
    "WRONG_MERCHANT": 7,
    "CAPTURE_EXCEEDS_HOLD": 8,
    "UNKNOWN_TRANSACTION": 9,
    "REFUND_EXCEEDS_REMAINING": 10,
    "NOT_REFUNDABLE": 11,
    "OVERFLOW": 12,
    "CAPACITY": 13,
    "HOLD_OPEN": 1,
    "HOLD_STATUS_CAPTURED": 2,
    "HOLD_STATUS_VOIDED": 3,
    "HOLD_STATUS_EXPIRED": 4,
    "KIND_EARN": 1,
    "KIND_CAPTURE": 2,
    "KIND_REDEEM": 3,
    "KIND_REFUND_REDEMPTION": 4,
    "KIND_REFUND_EARN": 5,
    "BALANCE_MAX": 2**62,
    "OP_EARN": 1,
    "OP_AUTHORIZE": 2,
    "OP_CAPTURE": 3,
    "OP_VOID": 4,
    "OP_REDEEM": 5,
    "OP_REFUND": 6,
}


def test_package_exports_every_constant():
    assert set(STATUSES) <= set(fastpath.__all__)


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_constants_match_the_contract(impl, name):
    value = getattr(impl, name)
    assert type(value) is int
    assert value == STATUSES[name]
    assert getattr(fastpath, name) == STATUSES[name]


@pytest.mark.skipif(
    os.environ.get("POINTS_FASTPATH") != "python",
    reason="only when POINTS_FASTPATH=python asks for the pure-Python twin",
)
def test_package_loads_the_python_twin_when_told_to():
    assert fastpath.IMPLEMENTATION == "python"
    assert fastpath.Ledger is fastpath._reference.Ledger


@pytest.mark.skipif(
    os.environ.get("POINTS_FASTPATH") == "python", reason="POINTS_FASTPATH=python asks for the pure-Python twin instead"
)
def test_package_loads_the_compiled_module_unless_told_otherwise():
    # The one test that fails when the compiled module did not load: a silent fallback to the twin
    # would only show up as latency in production.
    assert fastpath.IMPLEMENTATION == "cython"
    assert fastpath.Ledger is fastpath._core.Ledger
    assert fastpath.LedgerInvariantError is fastpath._core.LedgerInvariantError
    assert fastpath._core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _run_python(code, **environment):
    env = {key: value for key, value in os.environ.items() if key != "POINTS_FASTPATH"}
    env.update(environment)
    return subprocess.run([sys.executable, *code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_environment_switch_selects_the_twin():
    result = _run_python(
        ["-c", "import fastpath; print(fastpath.IMPLEMENTATION, fastpath.Ledger.__module__)"], POINTS_FASTPATH="python"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "fastpath._reference"]


def test_missing_build_is_an_import_error_that_says_how_to_build():
    # sys.modules[name] = None makes importing that name fail as if the .so were missing.
    result = _run_python(
        [
            "-c",
            "import sys; sys.modules['fastpath._core'] = None\n"
            "try:\n    import fastpath\n"
            "except ImportError as error:\n    print('ImportError', error)\n",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError")
    assert "make build" in result.stdout


@pytest.mark.parametrize("module", ["fastpath._core", "fastpath._reference"])
def test_invariant_checks_survive_python_optimize(module):
    code = (
        f"import {module} as impl\n"
        "ledger = impl.Ledger(4, 4, 4)\n"
        "slot = ledger.load_member('m', 100)\n"
        "ledger.load_hold(1, slot, 1, 100, 10, impl.HOLD_OPEN)\n"
        "ledger.load_member('m', 10)\n"
        "try:\n    ledger.check_invariants()\n"
        "except impl.LedgerInvariantError:\n    print('caught')\n"
    )
    result = _run_python(["-O", "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "caught"


def test_ledger_sizes_must_be_positive(impl):
    for sizes in [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-1, 1, 1)]:
        with pytest.raises(ValueError):
            impl.Ledger(*sizes)


# --- loading --------------------------------------------------------------------------------------


def test_load_member_adds_then_overwrites_posted(impl, ledger):
    assert ledger.load_member("alice", 500) == 0
    assert ledger.load_member("bob", 0) == 1
    assert ledger.load_member("alice", 700) == 0
    assert ledger.members_count == 2
    assert ledger.balance(0) == (700, 0)
    assert ledger.member_slot("bob") == 1
    assert ledger.member_slot("carol") == -1
    assert ledger.member_id(1) == "bob"


def test_load_member_rejects_posted_outside_range_and_capacity(impl):
    ledger = impl.Ledger(members_max=1, holds_max=1, transactions_max=1)
    with pytest.raises(OverflowError):
        ledger.load_member("alice", -1)
    with pytest.raises(OverflowError):
        ledger.load_member("alice", impl.BALANCE_MAX + 1)
    assert ledger.load_member("alice", impl.BALANCE_MAX) == 0
    with pytest.raises(OverflowError):
        ledger.load_member("bob", 0)
    with pytest.raises(TypeError):
        ledger.load_member(7, 0)
    assert ledger.members_count == 1


def test_load_member_stores_the_account_id(impl, ledger):
    assert ledger.load_member("alice", 500, 41) == 0
    assert ledger.load_member("bob", 0, account_id=42) == 1
    assert ledger.load_member("carol", 0) == 2
    assert [ledger.member_account(slot) for slot in range(3)] == [41, 42, 0]
    # Overwriting without an account id (0) keeps the one known; with one, replaces it.
    assert ledger.load_member("alice", 700) == 0
    assert ledger.load_member("bob", 10, 0) == 1
    assert ledger.load_member("carol", 0, 43) == 2
    assert [ledger.member_account(slot) for slot in range(3)] == [41, 42, 43]
    assert ledger.load_member("alice", 700, 44) == 0
    assert ledger.member_account(0) == 44
    assert ledger.balance(0) == (700, 0)


def test_load_member_rejects_a_negative_account_id_without_change(impl, ledger):
    ledger.load_member("alice", 500, 41)
    for member_id in ["alice", "bob"]:
        with pytest.raises(ValueError):
            ledger.load_member(member_id, 900, -1)
    with pytest.raises(TypeError):
        ledger.load_member("alice", 900, 41.0)
    with pytest.raises(OverflowError):
        ledger.load_member("alice", 900, 2**63)
    assert ledger.members_count == 1
    assert ledger.balance(0) == (500, 0)
    assert ledger.member_account(0) == 41


def test_set_member_account(impl, ledger):
    slot = funded(ledger)
    assert ledger.member_account(slot) == 0  # earn() creates members without one
    ledger.set_member_account(slot, 7)
    assert ledger.member_account(slot) == 7
    ledger.set_member_account(slot, 2**63 - 1)
    assert ledger.member_account(slot) == 2**63 - 1
    for account_id in [0, -1]:
        with pytest.raises(ValueError):
            ledger.set_member_account(slot, account_id)
    for member_slot in [-1, 1, 100]:
        with pytest.raises(IndexError):
            ledger.set_member_account(member_slot, 7)
        with pytest.raises(IndexError):
            ledger.member_account(member_slot)
    with pytest.raises(TypeError):
        ledger.set_member_account(slot, 7.0)
    with pytest.raises(TypeError):
        ledger.member_account(0.0)
    assert ledger.member_account(slot) == 2**63 - 1


def test_account_ids_are_not_undone_but_leave_with_their_member(impl, ledger):
    alice = ledger.load_member("alice", 100, 41)
    ledger.begin()
    ledger.set_member_account(alice, 51)
    ledger.load_member("alice", 200, 52)
    bob = ledger.load_member("bob", 0, 42)
    carol = ledger.ensure_member("carol")
    ledger.set_member_account(carol, 43)
    ledger.rollback()
    # alice's posted is restored, her account id is not; bob and carol are gone with theirs.
    assert ledger.balance(alice) == (100, 0)
    assert ledger.member_account(alice) == 52
    assert ledger.members_count == 1
    # Their slots, used again, start without an account id.
    assert ledger.ensure_member("dave") == bob
    assert ledger.earn("erin", MERCHANT, 5, 1) == (impl.OK, carol, 5)
    assert ledger.member_account(bob) == 0 and ledger.member_account(carol) == 0
    ledger.check_invariants()


def test_ensure_member_finds_or_creates(impl, ledger):
    alice = ledger.load_member("alice", 500, 41)
    assert ledger.ensure_member("alice") == alice
    assert ledger.balance(alice) == (500, 0) and ledger.member_account(alice) == 41
    bob = ledger.ensure_member("bob")
    assert bob == 1 and ledger.member_slot("bob") == bob and ledger.member_id(bob) == "bob"
    assert ledger.balance(bob) == (0, 0) and ledger.member_account(bob) == 0
    assert ledger.ensure_member("bob") == bob
    assert ledger.members_count == 2
    with pytest.raises(TypeError):
        ledger.ensure_member(7)
    with pytest.raises(TypeError):
        ledger.ensure_member(None)
    # A member it creates is a member like any other.
    assert ledger.earn("bob", MERCHANT, 50, 1) == (impl.OK, bob, 50)
    ledger.check_invariants()


def test_ensure_member_at_capacity_answers_minus_one(impl):
    ledger = impl.Ledger(members_max=2, holds_max=1, transactions_max=1)
    assert ledger.ensure_member("alice") == 0
    assert ledger.ensure_member("bob") == 1
    assert ledger.ensure_member("carol") == -1
    assert ledger.ensure_member("alice") == 0  # known members are still found
    assert ledger.members_count == 2 and ledger.member_slot("carol") == -1


def test_ensure_member_inside_a_batch_is_rolled_back(impl, ledger):
    alice = ledger.load_member("alice", 500)
    ledger.begin()
    assert ledger.ensure_member("alice") == alice
    assert ledger.ensure_member("bob") == 1
    ledger.begin()
    assert ledger.ensure_member("carol") == 2
    ledger.rollback_newest()
    assert ledger.members_count == 2 and ledger.member_slot("carol") == -1
    ledger.rollback()
    assert ledger.members_count == 1 and ledger.member_slot("bob") == -1
    assert ledger.balance(alice) == (500, 0)
    ledger.check_invariants()


def test_load_hold_counts_only_open_holds_in_held(impl, ledger):
    slot = ledger.load_member("alice", 1000)
    ledger.load_hold(10, slot, MERCHANT, 300, LATER_US, impl.HOLD_OPEN)
    ledger.load_hold(11, slot, MERCHANT, 200, LATER_US, impl.HOLD_STATUS_CAPTURED)
    ledger.load_hold(12, slot, MERCHANT, 100, LATER_US, impl.HOLD_STATUS_EXPIRED)
    assert ledger.balance(slot) == (1000, 300)
    assert ledger.hold(10) == (impl.HOLD_OPEN, slot, MERCHANT, 300, LATER_US)
    assert ledger.hold(11)[0] == impl.HOLD_STATUS_CAPTURED
    assert (ledger.holds_resident_count, ledger.holds_open_count) == (3, 1)
    assert ledger.has_hold(12) and not ledger.has_hold(13)
    with pytest.raises(KeyError):
        ledger.hold(13)
    ledger.check_invariants()


def test_load_hold_rejects_bad_arguments(impl):
    ledger = impl.Ledger(members_max=2, holds_max=1, transactions_max=1)
    slot = ledger.load_member("alice", 1000)
    with pytest.raises(IndexError):
        ledger.load_hold(1, 1, MERCHANT, 10, LATER_US, impl.HOLD_OPEN)
    with pytest.raises(IndexError):
        ledger.load_hold(1, -1, MERCHANT, 10, LATER_US, impl.HOLD_OPEN)
    with pytest.raises(ValueError):
        ledger.load_hold(1, slot, MERCHANT, 0, LATER_US, impl.HOLD_OPEN)
    with pytest.raises(ValueError):
        ledger.load_hold(1, slot, MERCHANT, 10, LATER_US, 0)
    with pytest.raises(ValueError):
        ledger.load_hold(1, slot, -1, 10, LATER_US, impl.HOLD_OPEN)
    ledger.load_hold(1, slot, MERCHANT, 10, LATER_US, impl.HOLD_OPEN)
    with pytest.raises(KeyError):
        ledger.load_hold(1, slot, MERCHANT, 10, LATER_US, impl.HOLD_OPEN)
    with pytest.raises(OverflowError):
        ledger.load_hold(2, slot, MERCHANT, 10, LATER_US, impl.HOLD_OPEN)
    assert ledger.balance(slot) == (1000, 10)


def test_load_hold_rejects_held_beyond_balance_max(impl, ledger):
    slot = ledger.load_member("alice", impl.BALANCE_MAX)
    ledger.load_hold(1, slot, MERCHANT, impl.BALANCE_MAX, LATER_US, impl.HOLD_OPEN)
    with pytest.raises(OverflowError):
        ledger.load_hold(2, slot, MERCHANT, 1, LATER_US, impl.HOLD_OPEN)
    assert ledger.balance(slot) == (impl.BALANCE_MAX, impl.BALANCE_MAX)
    assert not ledger.has_hold(2)


def test_load_transaction_makes_it_refundable(impl, ledger):
    slot = ledger.load_member("alice", 1000)
    ledger.load_transaction(5, impl.KIND_REDEEM, slot, MERCHANT, 400, 100)
    assert ledger.has_transaction(5)
    assert ledger.refund(5, MERCHANT, 301, 6) == (impl.REFUND_EXCEEDS_REMAINING, 0, 0, 0, 0)
    assert ledger.refund(5, MERCHANT, 300, 6) == (impl.OK, impl.KIND_REFUND_REDEMPTION, slot, 1300, 1300)


def test_load_transaction_rejects_bad_arguments(impl):
    ledger = impl.Ledger(members_max=1, holds_max=1, transactions_max=1)
    slot = ledger.load_member("alice", 1000)
    with pytest.raises(ValueError):
        ledger.load_transaction(1, 9, slot, MERCHANT, 10, 0)
    with pytest.raises(ValueError):
        ledger.load_transaction(1, impl.KIND_EARN, slot, MERCHANT, 10, 11)
    with pytest.raises(ValueError):
        ledger.load_transaction(1, impl.KIND_EARN, slot, MERCHANT, -1, 0)
    with pytest.raises(IndexError):
        ledger.load_transaction(1, impl.KIND_EARN, 3, MERCHANT, 10, 0)
    ledger.load_transaction(1, impl.KIND_EARN, slot, MERCHANT, 10, 0)
    with pytest.raises(KeyError):
        ledger.load_transaction(1, impl.KIND_EARN, slot, MERCHANT, 10, 0)
    with pytest.raises(OverflowError):
        ledger.load_transaction(2, impl.KIND_EARN, slot, MERCHANT, 10, 0)


# --- look-ups -------------------------------------------------------------------------------------


def test_look_ups_reject_slots_that_are_not_resident(impl, ledger):
    funded(ledger)
    for bad in [-1, 1, 2**40]:
        with pytest.raises(IndexError):
            ledger.balance(bad)
        with pytest.raises(IndexError):
            ledger.member_id(bad)
    with pytest.raises(OverflowError):
        ledger.balance(2**63)
    with pytest.raises(TypeError):
        ledger.balance(1.0)


def test_amounts_and_ids_must_be_integers_not_floats(impl, ledger):
    # Cython's int64_t parameters would truncate 1.5 to 1; money never goes through a float.
    slot = funded(ledger, points=1_000, transaction_id=1)
    with pytest.raises(TypeError):
        ledger.earn("alice", MERCHANT, 1.5, 2)
    with pytest.raises(TypeError):
        ledger.redeem(slot, MERCHANT, 10.0, 2)
    with pytest.raises(TypeError):
        ledger.authorize(slot, MERCHANT, 10, 7, float(LATER_US))
    with pytest.raises(TypeError):
        impl.Ledger(10.0, 10, 10)
    with pytest.raises(TypeError):
        ledger.earn(type("Name", (str,), {})("bob"), MERCHANT, 1, 2)
    with pytest.raises(OverflowError):
        ledger.earn("alice", MERCHANT, 2**63, 2)
    assert ledger.balance(slot) == (1_000, 0)
    assert not ledger.has_transaction(2)


# --- earn -----------------------------------------------------------------------------------------


def test_earn_creates_the_member_and_registers_the_transaction(impl, ledger):
    assert ledger.earn("alice", MERCHANT, 2_000, 1) == (impl.OK, 0, 2_000)
    assert ledger.earn("alice", MERCHANT, 500, 2) == (impl.OK, 0, 2_500)
    assert ledger.earn("bob", MERCHANT, 0, 3) == (impl.OK, 1, 0)
    assert ledger.member_slot("bob") == 1
    assert ledger.transactions_resident_count == 3
    assert all(ledger.has_transaction(transaction_id) for transaction_id in (1, 2, 3))
    ledger.check_invariants()


def test_earn_rejects_bad_arguments_without_change(impl, ledger):
    funded(ledger, transaction_id=1)
    before = snapshot(ledger, transaction_ids=range(5))
    with pytest.raises(ValueError):
        ledger.earn("alice", MERCHANT, -1, 2)
    with pytest.raises(ValueError):
        ledger.earn("alice", -1, 10, 2)
    with pytest.raises(ValueError):
        ledger.earn("alice", 2**31, 10, 2)
    with pytest.raises(KeyError):
        ledger.earn("alice", MERCHANT, 10, 1)
    with pytest.raises(TypeError):
        ledger.earn(None, MERCHANT, 10, 2)
    assert snapshot(ledger, transaction_ids=range(5)) == before


def test_earn_beyond_balance_max_is_overflow(impl, ledger):
    assert ledger.earn("alice", MERCHANT, impl.BALANCE_MAX - 5, 1) == (impl.OK, 0, impl.BALANCE_MAX - 5)
    before = snapshot(ledger, transaction_ids=range(5))
    assert ledger.earn("alice", MERCHANT, 6, 2) == (impl.OVERFLOW, 0, 0)
    assert ledger.earn("bob", MERCHANT, impl.BALANCE_MAX + 1, 3) == (impl.OVERFLOW, 0, 0)
    assert snapshot(ledger, transaction_ids=range(5)) == before
    assert ledger.earn("alice", MERCHANT, 5, 2) == (impl.OK, 0, impl.BALANCE_MAX)


def test_earn_at_capacity(impl):
    ledger = impl.Ledger(members_max=1, holds_max=1, transactions_max=2)
    assert ledger.earn("alice", MERCHANT, 10, 1)[0] == impl.OK
    assert ledger.earn("bob", MERCHANT, 10, 2) == (impl.CAPACITY, 0, 0)
    assert ledger.member_slot("bob") == -1
    assert ledger.earn("alice", MERCHANT, 10, 2) == (impl.OK, 0, 20)
    assert ledger.earn("alice", MERCHANT, 10, 3) == (impl.CAPACITY, 0, 0)
    assert ledger.balance(0) == (20, 0)
    ledger.forget_resolved()
    assert ledger.earn("alice", MERCHANT, 10, 3) == (impl.OK, 0, 30)


def test_arrays_grow_up_to_capacity(impl):
    ledger = impl.Ledger(members_max=1000, holds_max=1000, transactions_max=2000)
    for number in range(1000):
        assert ledger.earn(f"member-{number}", MERCHANT, 100 + number, number) == (impl.OK, number, 100 + number)
        assert ledger.authorize(number, MERCHANT, 50, number, LATER_US + number % 7)[0] == impl.OK
    assert ledger.earn("one-too-many", MERCHANT, 1, 5000) == (impl.CAPACITY, 0, 0)
    assert ledger.authorize(0, MERCHANT, 1, 5000, LATER_US) == (impl.CAPACITY, 0)
    assert [ledger.balance(slot) for slot in (0, 500, 999)] == [(100, 50), (600, 50), (1099, 50)]
    ledger.check_invariants()


# --- authorize ------------------------------------------------------------------------------------


def test_authorize_places_a_hold(impl, ledger):
    slot = funded(ledger, points=1_000)
    assert ledger.authorize(slot, MERCHANT, 300, 7, LATER_US) == (impl.OK, 700)
    assert ledger.authorize(slot, MERCHANT, 700, 8, LATER_US) == (impl.OK, 0)
    assert ledger.balance(slot) == (1_000, 1_000)
    assert ledger.hold(7) == (impl.HOLD_OPEN, slot, MERCHANT, 300, LATER_US)
    assert ledger.holds_open_count == 2
    ledger.check_invariants()


def test_authorize_beyond_available_is_insufficient(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 600, 7, LATER_US)
    before = snapshot(ledger, hold_ids=range(10))
    assert ledger.authorize(slot, MERCHANT, 401, 8, LATER_US) == (impl.INSUFFICIENT_POINTS, 0)
    assert snapshot(ledger, hold_ids=range(10)) == before


def test_authorize_unknown_member_and_bad_arguments(impl, ledger):
    slot = funded(ledger)
    assert ledger.authorize(ledger.member_slot("nobody"), MERCHANT, 10, 7, LATER_US) == (impl.UNKNOWN_MEMBER, 0)
    with pytest.raises(IndexError):
        ledger.authorize(5, MERCHANT, 10, 7, LATER_US)
    with pytest.raises(IndexError):
        ledger.authorize(-2, MERCHANT, 10, 7, LATER_US)
    with pytest.raises(ValueError):
        ledger.authorize(slot, MERCHANT, 0, 7, LATER_US)
    ledger.authorize(slot, MERCHANT, 10, 7, LATER_US)
    with pytest.raises(KeyError):
        ledger.authorize(slot, MERCHANT, 10, 7, LATER_US)
    assert ledger.holds_resident_count == 1


def test_authorize_at_capacity(impl):
    ledger = impl.Ledger(members_max=1, holds_max=1, transactions_max=1)
    slot = funded(ledger)
    assert ledger.authorize(slot, MERCHANT, 10, 7, LATER_US)[0] == impl.OK
    assert ledger.authorize(slot, MERCHANT, 10, 8, LATER_US) == (impl.CAPACITY, 0)
    assert ledger.balance(slot) == (10_000, 10)


# --- capture --------------------------------------------------------------------------------------


def test_partial_capture_releases_the_rest(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    assert ledger.capture(7, MERCHANT, 100, 2, NOW_US) == (impl.OK, 100, slot, 900, 900)
    assert ledger.balance(slot) == (900, 0)
    assert ledger.hold(7)[0] == impl.HOLD_STATUS_CAPTURED
    assert ledger.has_transaction(2)
    assert ledger.holds_open_count == 0
    ledger.check_invariants()


def test_capture_of_zero_takes_the_whole_hold(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    ledger.authorize(slot, MERCHANT, 200, 8, LATER_US)
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US) == (impl.OK, 300, slot, 700, 500)


def test_capture_beyond_the_hold_is_refused(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    before = snapshot(ledger, hold_ids=[7], transaction_ids=[2])
    assert ledger.capture(7, MERCHANT, 301, 2, NOW_US) == (impl.CAPTURE_EXCEEDS_HOLD, 0, 0, 0, 0)
    assert snapshot(ledger, hold_ids=[7], transaction_ids=[2]) == before
    with pytest.raises(ValueError):
        ledger.capture(7, MERCHANT, -1, 2, NOW_US)


def test_capture_by_another_merchant_changes_nothing(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, NOW_US)
    before = snapshot(ledger, hold_ids=[7], transaction_ids=[2])
    # Even though the hold is past its expiry, another merchant must not be able to expire it.
    assert ledger.capture(7, OTHER_MERCHANT, 0, 2, LATER_US) == (impl.WRONG_MERCHANT, 0, 0, 0, 0)
    assert ledger.void(7, OTHER_MERCHANT, LATER_US) == (impl.WRONG_MERCHANT, 0, 0, 0)
    assert snapshot(ledger, hold_ids=[7], transaction_ids=[2]) == before


def test_double_capture_is_refused(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US)[0] == impl.OK
    before = snapshot(ledger, hold_ids=[7], transaction_ids=[2, 3])
    assert ledger.capture(7, MERCHANT, 0, 3, NOW_US) == (impl.HOLD_CAPTURED, 0, 0, 0, 0)
    assert snapshot(ledger, hold_ids=[7], transaction_ids=[2, 3]) == before


def test_capture_with_a_resident_transaction_id_raises(impl, ledger):
    slot = funded(ledger, transaction_id=1)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    with pytest.raises(KeyError):
        ledger.capture(7, MERCHANT, 0, 1, NOW_US)
    assert ledger.hold(7)[0] == impl.HOLD_OPEN


def test_capture_of_an_expired_hold_marks_it_expired(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, NOW_US)
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US) == (impl.HOLD_EXPIRED, 0, 0, 0, 0)
    assert ledger.hold(7)[0] == impl.HOLD_STATUS_EXPIRED
    assert ledger.balance(slot) == (1_000, 0)
    assert not ledger.has_transaction(2)
    assert ledger.holds_open_count == 0
    # Already marked: answered from the status, whatever the clock says.
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US - 1) == (impl.HOLD_EXPIRED, 0, 0, 0, 0)
    assert ledger.void(7, MERCHANT, NOW_US - 1) == (impl.HOLD_EXPIRED, 0, 0, 0)
    assert ledger.expire_holds(LATER_US, 10) == []
    ledger.check_invariants()


def test_capture_one_microsecond_before_expiry_succeeds(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, NOW_US)
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US - 1)[0] == impl.OK


def test_capture_of_an_unknown_hold(impl, ledger):
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US) == (impl.UNKNOWN_HOLD, 0, 0, 0, 0)


def test_capture_at_transaction_capacity(impl):
    ledger = impl.Ledger(members_max=1, holds_max=2, transactions_max=1)
    slot = funded(ledger)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US) == (impl.CAPACITY, 0, 0, 0, 0)
    assert ledger.hold(7)[0] == impl.HOLD_OPEN
    assert ledger.balance(slot) == (10_000, 300)


# --- void -----------------------------------------------------------------------------------------


def test_void_releases_the_hold(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    assert ledger.void(7, MERCHANT, NOW_US) == (impl.OK, 300, slot, 1_000)
    assert ledger.hold(7)[0] == impl.HOLD_STATUS_VOIDED
    assert ledger.void(7, MERCHANT, NOW_US) == (impl.HOLD_VOIDED, 0, 0, 0)
    assert ledger.capture(7, MERCHANT, 0, 2, NOW_US) == (impl.HOLD_VOIDED, 0, 0, 0, 0)
    assert ledger.void(8, MERCHANT, NOW_US) == (impl.UNKNOWN_HOLD, 0, 0, 0)
    ledger.check_invariants()


def test_void_after_capture_is_refused(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    ledger.capture(7, MERCHANT, 100, 2, NOW_US)
    before = snapshot(ledger, hold_ids=[7])
    assert ledger.void(7, MERCHANT, NOW_US) == (impl.HOLD_CAPTURED, 0, 0, 0)
    assert snapshot(ledger, hold_ids=[7]) == before


def test_void_of_an_expired_hold_marks_it_expired(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, NOW_US)
    assert ledger.void(7, MERCHANT, LATER_US) == (impl.HOLD_EXPIRED, 0, 0, 0)
    assert ledger.hold(7)[0] == impl.HOLD_STATUS_EXPIRED
    assert ledger.balance(slot) == (1_000, 0)


# --- redeem ---------------------------------------------------------------------------------------


def test_redeem_debits_available_points(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    assert ledger.redeem(slot, MERCHANT, 600, 2) == (impl.OK, 400, 100)
    assert ledger.has_transaction(2)
    before = snapshot(ledger, transaction_ids=[3])
    assert ledger.redeem(slot, MERCHANT, 101, 3) == (impl.INSUFFICIENT_POINTS, 0, 0)
    assert snapshot(ledger, transaction_ids=[3]) == before
    assert ledger.redeem(-1, MERCHANT, 1, 3) == (impl.UNKNOWN_MEMBER, 0, 0)
    with pytest.raises(ValueError):
        ledger.redeem(slot, MERCHANT, 0, 3)
    with pytest.raises(IndexError):
        ledger.redeem(1, MERCHANT, 1, 3)
    with pytest.raises(KeyError):
        ledger.redeem(slot, MERCHANT, 1, 2)
    ledger.check_invariants()


def test_redeem_at_capacity(impl):
    ledger = impl.Ledger(members_max=1, holds_max=1, transactions_max=1)
    slot = funded(ledger)
    assert ledger.redeem(slot, MERCHANT, 1, 2) == (impl.CAPACITY, 0, 0)
    assert ledger.balance(slot) == (10_000, 0)


# --- refund ---------------------------------------------------------------------------------------


def test_refund_of_a_redemption_credits_the_member(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.redeem(slot, MERCHANT, 600, 2)
    assert ledger.refund(2, MERCHANT, 200, 3) == (impl.OK, impl.KIND_REFUND_REDEMPTION, slot, 600, 600)
    assert ledger.refund(2, MERCHANT, 400, 4) == (impl.OK, impl.KIND_REFUND_REDEMPTION, slot, 1_000, 1_000)
    assert ledger.refund(2, MERCHANT, 1, 5) == (impl.REFUND_EXCEEDS_REMAINING, 0, 0, 0, 0)
    ledger.check_invariants()


def test_refund_of_a_capture_credits_the_member(impl, ledger):
    slot = funded(ledger, points=1_000)
    ledger.authorize(slot, MERCHANT, 300, 7, LATER_US)
    ledger.capture(7, MERCHANT, 250, 2, NOW_US)
    before = snapshot(ledger, transaction_ids=[2, 3])
    assert ledger.refund(2, MERCHANT, 251, 3) == (impl.REFUND_EXCEEDS_REMAINING, 0, 0, 0, 0)
    assert snapshot(ledger, transaction_ids=[2, 3]) == before
    assert ledger.refund(2, MERCHANT, 250, 3) == (impl.OK, impl.KIND_REFUND_REDEMPTION, slot, 1_000, 1_000)


def test_refund_of_an_earn_debits_the_member(impl, ledger):
    slot = funded(ledger, points=1_000, transaction_id=1)
    assert ledger.refund(1, MERCHANT, 400, 2) == (impl.OK, impl.KIND_REFUND_EARN, slot, 600, 600)
    assert ledger.refund(1, MERCHANT, 601, 3) == (impl.REFUND_EXCEEDS_REMAINING, 0, 0, 0, 0)


def test_refund_of_an_earn_after_spending_is_insufficient(impl, ledger):
    slot = funded(ledger, points=1_000, transaction_id=1)
    ledger.redeem(slot, MERCHANT, 700, 2)
    ledger.authorize(slot, MERCHANT, 200, 7, LATER_US)
    before = snapshot(ledger, transaction_ids=[1, 2, 3])
    assert ledger.refund(1, MERCHANT, 101, 3) == (impl.INSUFFICIENT_POINTS, 0, 0, 0, 0)
    assert snapshot(ledger, transaction_ids=[1, 2, 3]) == before
    assert ledger.refund(1, MERCHANT, 100, 3) == (impl.OK, impl.KIND_REFUND_EARN, slot, 200, 0)


def test_refund_checks_merchant_kind_and_existence(impl, ledger):
    slot = funded(ledger, points=1_000, transaction_id=1)
    assert ledger.refund(1, OTHER_MERCHANT, 10, 2) == (impl.WRONG_MERCHANT, 0, 0, 0, 0)
    assert ledger.refund(99, MERCHANT, 10, 2) == (impl.UNKNOWN_TRANSACTION, 0, 0, 0, 0)
    ledger.refund(1, MERCHANT, 10, 2)
    assert ledger.refund(2, MERCHANT, 1, 3) == (impl.NOT_REFUNDABLE, 0, 0, 0, 0)
    ledger.load_transaction(4, impl.KIND_REFUND_REDEMPTION, slot, MERCHANT, 10, 0)
    assert ledger.refund(4, MERCHANT, 1, 3) == (impl.NOT_REFUNDABLE, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        ledger.refund(1, MERCHANT, 0, 3)
    with pytest.raises(KeyError):
        ledger.refund(1, MERCHANT, 1, 2)


def test_refund_of_a_redemption_beyond_balance_max_is_overflow(impl, ledger):
    slot = ledger.load_member("alice", impl.BALANCE_MAX)
    ledger.load_transaction(1, impl.KIND_REDEEM, slot, MERCHANT, 50, 0)
    assert ledger.refund(1, MERCHANT, 1, 2) == (impl.OVERFLOW, 0, 0, 0, 0)
    assert ledger.balance(slot) == (impl.BALANCE_MAX, 0)


def test_refund_at_capacity(impl):
    ledger = impl.Ledger(members_max=1, holds_max=1, transactions_max=1)
    slot = funded(ledger, transaction_id=1)
    assert ledger.refund(1, MERCHANT, 1, 2) == (impl.CAPACITY, 0, 0, 0, 0)
    assert ledger.balance(slot) == (10_000, 0)


# --- expiry ---------------------------------------------------------------------------------------


def test_expire_holds_soonest_first_ties_in_resident_order(impl, ledger):
    slot = funded(ledger, points=1_000)
    expiries = {10: NOW_US + 30, 11: NOW_US + 10, 12: NOW_US + 20, 13: NOW_US + 10, 14: NOW_US + 40}
    for hold_id, expires_at_us in expiries.items():
        ledger.authorize(slot, MERCHANT, 100, hold_id, expires_at_us)
    ledger.void(12, MERCHANT, NOW_US)
    assert ledger.expire_holds(NOW_US + 9, 10) == []
    assert ledger.expire_holds(NOW_US + 30, 2) == [11, 13]
    assert ledger.expire_holds(NOW_US + 30, 0) == []
    assert ledger.expire_holds(NOW_US + 30, 10) == [10]
    assert ledger.balance(slot) == (1_000, 100)
    assert [ledger.hold(hold_id)[0] for hold_id in sorted(expiries)] == [
        impl.HOLD_STATUS_EXPIRED,
        impl.HOLD_STATUS_EXPIRED,
        impl.HOLD_STATUS_VOIDED,
        impl.HOLD_STATUS_EXPIRED,
        impl.HOLD_OPEN,
    ]
    assert ledger.holds_open_count == 1
    with pytest.raises(ValueError):
        ledger.expire_holds(NOW_US, -1)
    ledger.check_invariants()


def test_expire_holds_includes_loaded_open_holds(impl, ledger):
    slot = ledger.load_member("alice", 1_000)
    ledger.load_hold(20, slot, MERCHANT, 100, NOW_US + 5, impl.HOLD_OPEN)
    ledger.load_hold(21, slot, MERCHANT, 100, NOW_US + 1, impl.HOLD_STATUS_CAPTURED)
    ledger.load_hold(22, slot, MERCHANT, 100, NOW_US + 2, impl.HOLD_OPEN)
    assert ledger.expire_holds(LATER_US, 10) == [22, 20]
    assert ledger.balance(slot) == (1_000, 0)


def test_forget_resolved_keeps_open_holds_working(impl, ledger):
    slot = funded(ledger, points=1_000, transaction_id=1)
    for hold_id in range(10, 16):
        ledger.authorize(slot, MERCHANT, 100, hold_id, NOW_US + hold_id)
    ledger.capture(10, MERCHANT, 0, 2, NOW_US)
    ledger.void(12, MERCHANT, NOW_US)
    ledger.expire_holds(NOW_US + 11, 10)
    ledger.forget_resolved()
    assert [ledger.has_hold(hold_id) for hold_id in range(10, 16)] == [False, False, False, True, True, True]
    assert (ledger.holds_resident_count, ledger.holds_open_count, ledger.transactions_resident_count) == (3, 3, 0)
    assert not ledger.has_transaction(1)
    assert ledger.hold(14) == (impl.HOLD_OPEN, slot, MERCHANT, 100, NOW_US + 14)
    ledger.check_invariants()
    assert ledger.capture(14, MERCHANT, 50, 3, NOW_US)[0] == impl.OK
    assert ledger.expire_holds(LATER_US, 10) == [13, 15]
    assert ledger.balance(slot) == (850, 0)
    # A forgotten hold id is free again (Postgres keeps it; the caller prefetches it if needed).
    ledger.load_hold(10, slot, MERCHANT, 300, NOW_US, impl.HOLD_STATUS_CAPTURED)
    ledger.check_invariants()


def test_forget_resolved_is_refused_inside_a_batch(impl, ledger):
    funded(ledger)
    ledger.begin()
    with pytest.raises(RuntimeError):
        ledger.forget_resolved()
    ledger.commit()
    ledger.forget_resolved()


# --- undo log -------------------------------------------------------------------------------------


def test_commit_and_rollbacks_need_an_open_batch(impl, ledger):
    for name in ["commit", "rollback", "rollback_newest"]:
        with pytest.raises(RuntimeError):
            getattr(ledger, name)()
    ledger.begin()
    ledger.commit()
    for name in ["commit", "rollback", "rollback_newest"]:
        with pytest.raises(RuntimeError):
            getattr(ledger, name)()
    assert ledger.batches_open == 0


def test_begin_nests_and_batches_open_counts(impl, ledger):
    assert ledger.batches_open == 0
    ledger.begin()
    ledger.begin()
    ledger.begin()
    assert ledger.batches_open == 3
    ledger.commit()
    assert ledger.batches_open == 2
    ledger.rollback_newest()
    assert ledger.batches_open == 1
    ledger.begin()
    ledger.rollback()
    assert ledger.batches_open == 0
    with pytest.raises(AttributeError):
        ledger.batches_open = 5


def test_rollback_restores_exactly_the_state_at_begin(impl, ledger):
    alice = funded(ledger, "alice", 5_000, transaction_id=1)
    bob = ledger.load_member("bob", 2_000)
    ledger.redeem(bob, MERCHANT, 500, 2)
    ledger.load_transaction(3, impl.KIND_CAPTURE, alice, MERCHANT, 400, 100)
    for hold_id, expires_at_us in [(10, LATER_US), (11, NOW_US + 5), (12, LATER_US), (13, NOW_US)]:
        ledger.authorize(alice, MERCHANT, 100, hold_id, expires_at_us)
    hold_ids, transaction_ids = range(10, 30), range(1, 30)
    before = snapshot(ledger, hold_ids, transaction_ids)

    ledger.begin()
    assert ledger.earn("alice", MERCHANT, 1_000, 20)[0] == impl.OK
    assert ledger.earn("carol", MERCHANT, 700, 21)[0] == impl.OK
    carol = ledger.member_slot("carol")
    assert ledger.authorize(carol, MERCHANT, 300, 20, NOW_US + 1)[0] == impl.OK
    assert ledger.capture(10, MERCHANT, 60, 22, NOW_US)[0] == impl.OK
    assert ledger.void(12, MERCHANT, NOW_US)[0] == impl.OK
    assert ledger.capture(13, MERCHANT, 0, 23, NOW_US)[0] == impl.HOLD_EXPIRED
    assert ledger.expire_holds(LATER_US - 1, 10) == [20, 11]
    assert ledger.refund(3, MERCHANT, 300, 24)[0] == impl.OK
    assert ledger.refund(2, MERCHANT, 500, 25)[0] == impl.OK
    assert ledger.refund(1, MERCHANT, 4_000, 26)[0] == impl.OK
    assert ledger.redeem(bob, MERCHANT, 100, 27)[0] == impl.OK
    ledger.load_member("bob", 9_999)
    dave = ledger.load_member("dave", 50)
    ledger.load_hold(21, dave, MERCHANT, 50, NOW_US, impl.HOLD_OPEN)
    ledger.load_hold(22, alice, MERCHANT, 50, NOW_US, impl.HOLD_OPEN)
    ledger.load_transaction(28, impl.KIND_REDEEM, dave, MERCHANT, 10, 0)
    assert snapshot(ledger, hold_ids, transaction_ids) != before
    ledger.rollback()

    assert snapshot(ledger, hold_ids, transaction_ids) == before
    assert ledger.member_slot("carol") == -1 and ledger.member_slot("dave") == -1
    ledger.check_invariants()
    # Refunded amounts are back: exactly the old remainders can be refunded again.
    assert ledger.refund(3, MERCHANT, 301, 24)[0] == impl.REFUND_EXCEEDS_REMAINING
    assert ledger.refund(3, MERCHANT, 300, 24)[0] == impl.OK
    assert ledger.refund(2, MERCHANT, 500, 25)[0] == impl.OK
    # Reopened holds are back in the expiry heap; the created ones are gone from it.
    assert ledger.expire_holds(LATER_US, 10) == [13, 11, 10, 12]
    # Ids and names created in the rolled-back batch are free again.
    assert ledger.earn("carol", MERCHANT, 1, 21) == (impl.OK, 2, 1)
    assert ledger.authorize(carol, MERCHANT, 1, 20, LATER_US)[0] == impl.OK
    ledger.check_invariants()


def test_commit_keeps_the_batch(impl, ledger):
    alice = funded(ledger, points=1_000, transaction_id=1)
    ledger.begin()
    ledger.earn("bob", MERCHANT, 10, 2)
    ledger.authorize(alice, MERCHANT, 100, 7, NOW_US)
    ledger.commit()
    after = snapshot(ledger, [7], [1, 2])
    ledger.begin()
    ledger.rollback()
    assert snapshot(ledger, [7], [1, 2]) == after
    assert ledger.expire_holds(NOW_US, 10) == [7]


def test_operations_outside_a_batch_are_not_recorded(impl, ledger):
    alice = funded(ledger, points=1_000, transaction_id=1)
    ledger.redeem(alice, MERCHANT, 100, 2)
    ledger.begin()
    ledger.rollback()
    assert ledger.balance(alice) == (900, 0)
    assert ledger.has_transaction(2)


def pipelined_ledger(impl):
    """alice (5_000, holds 10 and 11 open), bob (2_000) and refundable transactions 1..3."""
    ledger = impl.Ledger(members_max=100, holds_max=100, transactions_max=100)
    alice = funded(ledger, "alice", 5_000, transaction_id=1)
    bob = ledger.load_member("bob", 2_000)
    ledger.redeem(bob, MERCHANT, 500, 2)
    ledger.load_transaction(3, impl.KIND_CAPTURE, alice, MERCHANT, 400, 100)
    ledger.authorize(alice, MERCHANT, 300, 10, LATER_US)
    ledger.authorize(alice, MERCHANT, 200, 11, NOW_US + 5)
    return ledger, alice, bob


def batch_a(impl, ledger, alice, bob):
    """Touches alice, bob, holds 10/11 and transaction 2, and creates carol, hold 20, 21..23."""
    assert ledger.earn("alice", MERCHANT, 1_000, 21)[0] == impl.OK
    assert ledger.capture(10, MERCHANT, 100, 22, NOW_US)[0] == impl.OK
    assert ledger.refund(2, MERCHANT, 200, 23)[0] == impl.OK
    carol = ledger.ensure_member("carol")
    assert ledger.earn("carol", MERCHANT, 700, 24)[0] == impl.OK
    assert ledger.authorize(carol, MERCHANT, 300, 20, NOW_US + 3)[0] == impl.OK
    ledger.load_member("bob", 1_800)


def batch_b(impl, ledger, alice, bob):
    """Touches the same members, holds and transactions again (and A's), and creates more."""
    carol = ledger.member_slot("carol")
    assert ledger.expire_holds(NOW_US + 4, 10) == [20]
    assert ledger.void(11, MERCHANT, NOW_US)[0] == impl.OK
    assert ledger.refund(2, MERCHANT, 300, 30)[0] == impl.OK
    assert ledger.refund(22, MERCHANT, 100, 31)[0] == impl.OK
    assert ledger.redeem(carol, MERCHANT, 50, 32)[0] == impl.OK
    assert ledger.earn("dave", MERCHANT, 40, 33)[0] == impl.OK
    assert ledger.authorize(bob, MERCHANT, 1_000, 34, LATER_US)[0] == impl.OK
    ledger.load_hold(35, carol, MERCHANT, 10, LATER_US, impl.HOLD_OPEN)
    ledger.load_member("alice", 9_000)


IDS = range(0, 40)


def test_commit_makes_the_oldest_batch_permanent(impl):
    ledger, alice, bob = pipelined_ledger(impl)
    ledger.begin()
    batch_a(impl, ledger, alice, bob)
    after_a = snapshot(ledger, IDS, IDS)
    ledger.begin()
    batch_b(impl, ledger, alice, bob)
    after_b = snapshot(ledger, IDS, IDS)

    ledger.commit()  # A is written: permanent; B stays open
    assert ledger.batches_open == 1
    assert snapshot(ledger, IDS, IDS) == after_b
    ledger.rollback()  # B's write failed
    assert ledger.batches_open == 0
    assert snapshot(ledger, IDS, IDS) == after_a
    assert ledger.member_slot("dave") == -1 and ledger.member_slot("carol") == 2
    ledger.check_invariants()
    # Everything B undid works again, A's doings stay: hold 20 is open and in the expiry heap,
    # transaction 2 has 300 left to refund.
    assert ledger.refund(2, MERCHANT, 301, 30)[0] == impl.REFUND_EXCEEDS_REMAINING
    assert ledger.expire_holds(LATER_US, 10) == [20, 11]
    ledger.check_invariants()


def test_commit_keeps_newer_batches_exactly(impl):
    ledger, alice, bob = pipelined_ledger(impl)
    ledger.begin()
    batch_a(impl, ledger, alice, bob)
    ledger.begin()
    batch_b(impl, ledger, alice, bob)
    ledger.commit()
    ledger.commit()
    after = snapshot(ledger, IDS, IDS)
    ledger.begin()
    ledger.rollback()
    assert snapshot(ledger, IDS, IDS) == after
    assert ledger.batches_open == 0
    ledger.check_invariants()


def test_rollback_newest_keeps_the_older_batch_open(impl):
    ledger, alice, bob = pipelined_ledger(impl)
    before = snapshot(ledger, IDS, IDS)
    ledger.begin()
    batch_a(impl, ledger, alice, bob)
    after_a = snapshot(ledger, IDS, IDS)
    ledger.begin()
    batch_b(impl, ledger, alice, bob)

    ledger.rollback_newest()
    assert ledger.batches_open == 1
    assert snapshot(ledger, IDS, IDS) == after_a
    ledger.check_invariants()
    # B's ids are free again, and A keeps recording: a new B on top, then A's rollback.
    ledger.begin()
    batch_b(impl, ledger, alice, bob)
    ledger.rollback_newest()
    assert snapshot(ledger, IDS, IDS) == after_a
    assert ledger.redeem(bob, MERCHANT, 100, 36)[0] == impl.OK  # more of A
    ledger.rollback()
    assert ledger.batches_open == 0
    assert snapshot(ledger, IDS, IDS) == before
    assert ledger.member_slot("carol") == -1
    # The expiry heap is rebuilt: hold 11 (expiring first) and 10 are open again, 20 is gone.
    assert ledger.expire_holds(LATER_US, 10) == [11, 10]
    ledger.check_invariants()


def test_rollback_undoes_every_open_batch_newest_first(impl):
    ledger, alice, bob = pipelined_ledger(impl)
    before = snapshot(ledger, IDS, IDS)
    ledger.begin()
    batch_a(impl, ledger, alice, bob)
    ledger.begin()
    ledger.begin()  # an empty batch in between
    batch_b(impl, ledger, alice, bob)
    ledger.begin()
    assert ledger.capture(34, MERCHANT, 0, 37, NOW_US)[0] == impl.OK
    assert ledger.batches_open == 4
    ledger.rollback()
    assert ledger.batches_open == 0
    assert snapshot(ledger, IDS, IDS) == before
    ledger.check_invariants()


def test_pipelined_batches_stay_exact_over_many_commits(impl):
    # A committer that always has one batch being written and the next applied on top: the log
    # never empties, so commit() must drop the old records (and compact the log) without losing the
    # live ones; rolling back the newest now and then, and the last at the end, checks they are
    # intact.
    ledger = impl.Ledger(members_max=10, holds_max=10_000, transactions_max=10_000)
    slot = ledger.load_member("alice", 1_000_000)
    next_id = 1

    def window(first_id):
        # The ids a round creates start at first_id; those of the round before are also in view.
        ids = range(first_id - 40, first_id + 40)
        return snapshot(ledger, ids, ids)

    ledger.begin()
    for round_number in range(301):
        first_id = next_id
        at_begin = window(first_id)
        ledger.begin()
        for _ in range(round_number % 7):
            assert ledger.authorize(slot, MERCHANT, 10, next_id, LATER_US)[0] == impl.OK
            assert ledger.capture(next_id, MERCHANT, 5, next_id + 1, NOW_US)[0] == impl.OK
            assert ledger.refund(next_id + 1, MERCHANT, 2, next_id + 2)[0] == impl.OK
            next_id += 3
        if round_number % 5 == 4:
            ledger.rollback_newest()
            next_id = first_id
            assert window(first_id) == at_begin
            ledger.begin()
        ledger.commit()
        assert ledger.batches_open == 1
    assert round_number % 5 != 4 and round_number % 7 != 0  # the last batch did something
    assert window(first_id) != at_begin
    ledger.rollback()
    assert window(first_id) == at_begin
    ledger.check_invariants()


def test_forget_resolved_is_refused_while_any_batch_is_open(impl, ledger):
    funded(ledger)
    ledger.begin()
    ledger.begin()
    ledger.commit()
    with pytest.raises(RuntimeError):
        ledger.forget_resolved()
    ledger.commit()
    ledger.forget_resolved()


# --- invariants -----------------------------------------------------------------------------------


def test_check_invariants_catches_held_above_posted(impl, ledger):
    slot = ledger.load_member("alice", 1_000)
    ledger.load_hold(1, slot, MERCHANT, 800, LATER_US, impl.HOLD_OPEN)
    ledger.check_invariants()
    # Overwriting posted is a plain load; inconsistent data from Postgres is what the check is for.
    ledger.load_member("alice", 500)
    with pytest.raises(impl.LedgerInvariantError):
        ledger.check_invariants()


def test_operations_on_a_corrupted_member_raise_before_writing(impl, ledger):
    slot = ledger.load_member("alice", 1_000)
    ledger.load_hold(1, slot, MERCHANT, 800, LATER_US, impl.HOLD_OPEN)
    ledger.load_transaction(2, impl.KIND_REDEEM, slot, MERCHANT, 100, 0)
    ledger.load_member("alice", 500)
    before = snapshot(ledger, [1, 3], [2, 3, 4])
    with pytest.raises(impl.LedgerInvariantError):
        ledger.capture(1, MERCHANT, 0, 3, NOW_US)
    with pytest.raises(impl.LedgerInvariantError):
        ledger.earn("alice", MERCHANT, 10, 3)
    with pytest.raises(impl.LedgerInvariantError):
        ledger.refund(2, MERCHANT, 10, 4)
    assert ledger.redeem(slot, MERCHANT, 1, 3) == (impl.INSUFFICIENT_POINTS, 0, 0)
    assert snapshot(ledger, [1, 3], [2, 3, 4]) == before
