"""apply_batch(): a whole batch in one call, answering as the per-operation methods would; run against
the compiled module and its pure-Python twin. (test_fastpath_differential.py compares the two, and
each with the per-operation methods, on random batches.)"""

from array import array

import pytest

import fastpath
import fastpath._core
import fastpath._reference

MERCHANT = 1
OTHER_MERCHANT = 2
NOW_US = 1_700_000_000_000_000
LATER_US = NOW_US + 60_000_000
# What an output holds before apply_batch() writes it.
UNWRITTEN = -7
UNWRITTEN_ROW = (UNWRITTEN,) * 6


@pytest.fixture(params=[fastpath._core, fastpath._reference], ids=["cython", "python"])
def impl(request):
    return request.param


@pytest.fixture
def ledger(impl):
    return impl.Ledger(members_max=100, holds_max=100, transactions_max=100)


def op(method, member=0, merchant=MERCHANT, points=0, ref_id=0, new_id=0, expires_at_us=LATER_US):
    return (method, member, merchant, points, ref_id, new_id, expires_at_us)


def columns(operations):
    return [array("q", column) for column in zip(*operations)] or [array("q") for _ in range(7)]


def outputs(count):
    return [array("q", [UNWRITTEN] * count) for _ in range(6)]


def run(ledger, operations, now_us=NOW_US):
    """The rows (status, member, amount, posted, available, kind) apply_batch() wrote."""
    written = outputs(len(operations))
    assert ledger.apply_batch(*columns(operations), now_us, *written) == len(operations)
    return list(zip(*written))


def state(ledger, ids=range(0, 40)):
    return {
        "counts": (
            ledger.members_count,
            ledger.holds_resident_count,
            ledger.holds_open_count,
            ledger.transactions_resident_count,
            ledger.batches_open,
        ),
        "members": [
            (ledger.member_id(slot), ledger.balance(slot), ledger.member_account(slot))
            for slot in range(ledger.members_count)
        ],
        "holds": {hold_id: ledger.hold(hold_id) for hold_id in ids if ledger.has_hold(hold_id)},
        "transactions": {transaction_id for transaction_id in ids if ledger.has_transaction(transaction_id)},
    }


def test_operation_codes_are_exported(impl):
    assert (impl.OP_EARN, impl.OP_AUTHORIZE, impl.OP_CAPTURE, impl.OP_VOID, impl.OP_REDEEM, impl.OP_REFUND) == (
        1,
        2,
        3,
        4,
        5,
        6,
    )
    assert fastpath.OP_REFUND == 6 and "OP_EARN" in fastpath.__all__


def test_each_operation_writes_what_its_method_answers(impl, ledger):
    alice = ledger.load_member("alice", 1_000)
    rows = run(
        ledger,
        [
            op(impl.OP_EARN, alice, points=100, new_id=1),
            op(impl.OP_AUTHORIZE, alice, points=300, new_id=10, expires_at_us=LATER_US),
            op(impl.OP_CAPTURE, points=200, ref_id=10, new_id=2),
            op(impl.OP_AUTHORIZE, alice, points=100, new_id=11),
            op(impl.OP_VOID, ref_id=11),
            op(impl.OP_REDEEM, alice, points=50, new_id=3),
            op(impl.OP_REFUND, points=20, ref_id=3, new_id=4),
            op(impl.OP_REFUND, points=30, ref_id=1, new_id=5),
            op(impl.OP_AUTHORIZE, alice, points=40, new_id=12),
        ],
    )
    assert rows == [
        (impl.OK, alice, 100, 1_100, 1_100, impl.KIND_EARN),
        (impl.OK, alice, 300, 1_100, 800, 0),
        (impl.OK, alice, 200, 900, 900, impl.KIND_CAPTURE),
        (impl.OK, alice, 100, 900, 800, 0),
        (impl.OK, alice, 100, 900, 900, 0),
        (impl.OK, alice, 50, 850, 850, impl.KIND_REDEEM),
        (impl.OK, alice, 20, 870, 870, impl.KIND_REFUND_REDEMPTION),
        (impl.OK, alice, 30, 840, 840, impl.KIND_REFUND_EARN),
        (impl.OK, alice, 40, 840, 800, 0),
    ]
    # The same operations one by one leave the same ledger.
    twin = impl.Ledger(members_max=100, holds_max=100, transactions_max=100)
    twin.load_member("alice", 1_000)
    twin.earn("alice", MERCHANT, 100, 1)
    twin.authorize(alice, MERCHANT, 300, 10, LATER_US)
    twin.capture(10, MERCHANT, 200, 2, NOW_US)
    twin.authorize(alice, MERCHANT, 100, 11, LATER_US)
    twin.void(11, MERCHANT, NOW_US)
    twin.redeem(alice, MERCHANT, 50, 3)
    twin.refund(3, MERCHANT, 20, 4)
    twin.refund(1, MERCHANT, 30, 5)
    twin.authorize(alice, MERCHANT, 40, 12, LATER_US)
    assert state(ledger) == state(twin)
    ledger.check_invariants()


def test_capture_of_zero_takes_the_whole_hold(impl, ledger):
    alice = ledger.load_member("alice", 1_000)
    ledger.authorize(alice, MERCHANT, 300, 10, LATER_US)
    assert run(ledger, [op(impl.OP_CAPTURE, ref_id=10, new_id=1)]) == [
        (impl.OK, alice, 300, 700, 700, impl.KIND_CAPTURE)
    ]


def test_operations_see_those_before_them_in_the_batch(impl, ledger):
    # A new member is created by ensure_member() before the batch, then earns, is authorized,
    # captured and refunded within it.
    bob = ledger.ensure_member("bob")
    rows = run(
        ledger,
        [
            op(impl.OP_EARN, bob, points=500, new_id=1),
            op(impl.OP_AUTHORIZE, bob, points=400, new_id=10),
            op(impl.OP_REDEEM, bob, points=200, new_id=2),  # 100 available
            op(impl.OP_CAPTURE, points=0, ref_id=10, new_id=3),
            op(impl.OP_REFUND, points=400, ref_id=3, new_id=4),
            op(impl.OP_VOID, ref_id=10),
        ],
    )
    assert [row[0] for row in rows] == [
        impl.OK,
        impl.OK,
        impl.INSUFFICIENT_POINTS,
        impl.OK,
        impl.OK,
        impl.HOLD_CAPTURED,
    ]
    assert rows[4] == (impl.OK, bob, 400, 500, 500, impl.KIND_REFUND_REDEMPTION)
    ledger.check_invariants()


def test_a_status_other_than_ok_writes_zeros_but_the_member_and_what_a_refusal_saw(impl):
    ledger = impl.Ledger(members_max=100, holds_max=3, transactions_max=5)
    alice = ledger.load_member("alice", 1_000)
    full = ledger.load_member("full", impl.BALANCE_MAX)
    ledger.load_hold(10, alice, MERCHANT, 100, LATER_US, impl.HOLD_OPEN)
    ledger.load_hold(11, alice, MERCHANT, 100, NOW_US, impl.HOLD_OPEN)  # expires now
    ledger.load_hold(12, alice, MERCHANT, 100, LATER_US, impl.HOLD_STATUS_CAPTURED)
    ledger.load_transaction(1, impl.KIND_REDEEM, alice, MERCHANT, 100, 60)
    ledger.load_transaction(2, impl.KIND_REFUND_EARN, alice, MERCHANT, 100, 0)
    ledger.load_transaction(3, impl.KIND_EARN, alice, MERCHANT, 5_000, 0)
    ledger.load_transaction(4, impl.KIND_REDEEM, full, MERCHANT, 100, 0)
    expected = [
        (op(impl.OP_AUTHORIZE, alice, points=901, new_id=20), impl.INSUFFICIENT_POINTS, alice),
        (op(impl.OP_AUTHORIZE, -1, points=1, new_id=20), impl.UNKNOWN_MEMBER, -1),
        (op(impl.OP_AUTHORIZE, alice, points=1, new_id=20), impl.CAPACITY, alice),
        (op(impl.OP_REDEEM, alice, points=801, new_id=20), impl.INSUFFICIENT_POINTS, alice),
        (op(impl.OP_REDEEM, -1, points=1, new_id=20), impl.UNKNOWN_MEMBER, -1),
        (op(impl.OP_EARN, full, points=1, new_id=20), impl.OVERFLOW, full),
        (op(impl.OP_CAPTURE, ref_id=99, new_id=20), impl.UNKNOWN_HOLD, -1),
        # Another merchant learns nothing about the hold, not even whose it is.
        (op(impl.OP_CAPTURE, merchant=OTHER_MERCHANT, ref_id=10, new_id=20), impl.WRONG_MERCHANT, -1),
        (op(impl.OP_VOID, merchant=OTHER_MERCHANT, ref_id=10), impl.WRONG_MERCHANT, -1),
        (op(impl.OP_CAPTURE, points=101, ref_id=10, new_id=20), impl.CAPTURE_EXCEEDS_HOLD, alice),
        (op(impl.OP_CAPTURE, ref_id=12, new_id=20), impl.HOLD_CAPTURED, alice),
        (op(impl.OP_CAPTURE, ref_id=11, new_id=20), impl.HOLD_EXPIRED, alice),
        (op(impl.OP_VOID, ref_id=11), impl.HOLD_EXPIRED, alice),
        (op(impl.OP_REFUND, points=1, ref_id=98, new_id=20), impl.UNKNOWN_TRANSACTION, -1),
        (op(impl.OP_REFUND, merchant=OTHER_MERCHANT, points=1, ref_id=1, new_id=20), impl.WRONG_MERCHANT, -1),
        (op(impl.OP_REFUND, points=41, ref_id=1, new_id=20), impl.REFUND_EXCEEDS_REMAINING, alice),
        (op(impl.OP_REFUND, points=1, ref_id=2, new_id=20), impl.NOT_REFUNDABLE, alice),
        (op(impl.OP_REFUND, points=1_000, ref_id=3, new_id=20), impl.INSUFFICIENT_POINTS, alice),
        (op(impl.OP_REFUND, points=1, ref_id=4, new_id=20), impl.OVERFLOW, full),
        (op(impl.OP_REDEEM, alice, points=1, new_id=20), impl.OK, alice),
        (op(impl.OP_REDEEM, alice, points=1, new_id=21), impl.CAPACITY, alice),
        (op(impl.OP_EARN, alice, points=1, new_id=21), impl.CAPACITY, alice),
        (op(impl.OP_CAPTURE, ref_id=10, new_id=21), impl.CAPACITY, alice),
        (op(impl.OP_REFUND, points=1, ref_id=1, new_id=21), impl.CAPACITY, alice),
    ]
    rows = run(ledger, [operation for operation, _, _ in expected])
    # INSUFFICIENT_POINTS also reports the member's posted and available balances when refused: 1,000
    # posted, 200 held (holds 10 and 11), then 100 once the capture marked hold 11 expired
    seen = iter([(1_000, 800), (1_000, 800), (1_000, 900)])
    for (operation, status, member), row in zip(expected, rows):
        if status == impl.INSUFFICIENT_POINTS:
            posted, available = next(seen)
            assert row == (status, member, 0, posted, available, 0), operation
        elif status != impl.OK:
            assert row == (status, member, 0, 0, 0, 0), operation
    assert next(seen, None) is None
    # The expired hold was marked on the way, as capture() and void() do.
    assert ledger.hold(11)[0] == impl.HOLD_STATUS_EXPIRED
    assert ledger.balance(alice) == (999, 100)
    ledger.check_invariants()


def test_inputs_of_unequal_length_raise_before_anything_changes(impl, ledger):
    alice = ledger.load_member("alice", 1_000)
    operations = [op(impl.OP_EARN, alice, points=100, new_id=1), op(impl.OP_REDEEM, alice, points=100, new_id=2)]
    before = state(ledger)
    for column in range(7):
        for change in (-1, 1):
            inputs = columns(operations)
            inputs[column] = array("q", list(inputs[column]) + [0] * 2)[: 2 + change]
            written = outputs(2)
            with pytest.raises(ValueError):
                ledger.apply_batch(*inputs, NOW_US, *written)
            assert state(ledger) == before
            assert list(zip(*written)) == [UNWRITTEN_ROW] * 2
    for column in range(6):
        written = outputs(2)
        written[column] = array("q", [UNWRITTEN])
        with pytest.raises(ValueError):
            ledger.apply_batch(*columns(operations), NOW_US, *written)
        assert state(ledger) == before
        assert list(written[(column + 1) % 6]) == [UNWRITTEN] * 2


def test_longer_outputs_are_written_up_to_the_operations_only(impl, ledger):
    alice = ledger.load_member("alice", 1_000)
    written = outputs(3)
    assert ledger.apply_batch(*columns([op(impl.OP_EARN, alice, points=5, new_id=1)]), NOW_US, *written) == 1
    assert list(zip(*written)) == [(impl.OK, alice, 5, 1_005, 1_005, impl.KIND_EARN), UNWRITTEN_ROW, UNWRITTEN_ROW]


def test_an_empty_batch_does_nothing(impl, ledger):
    before = state(ledger)
    assert ledger.apply_batch(*columns([]), NOW_US, *outputs(0)) == 0
    assert state(ledger) == before


@pytest.mark.parametrize("method", [0, 7, -1, 2**62])
def test_an_unknown_method_raises_before_anything_changes(impl, ledger, method):
    alice = ledger.load_member("alice", 1_000)
    before = state(ledger)
    written = outputs(2)
    with pytest.raises(ValueError):
        ledger.apply_batch(
            *columns([op(impl.OP_EARN, alice, points=100, new_id=1), op(method, alice, points=100, new_id=2)]),
            NOW_US,
            *written,
        )
    assert state(ledger) == before
    assert list(zip(*written)) == [UNWRITTEN_ROW] * 2


def test_now_us_must_be_an_integer(impl, ledger):
    alice = ledger.load_member("alice", 1_000)
    with pytest.raises(TypeError):
        ledger.apply_batch(*columns([op(impl.OP_EARN, alice, points=1, new_id=1)]), float(NOW_US), *outputs(1))
    assert ledger.balance(alice) == (1_000, 0)


# Caller bugs: raised as the per-operation method raises them, after the operations before.
BUGS = {
    "earn for a slot that is not resident": ("OP_EARN", dict(member=5), IndexError),
    "earn for slot -1 (ensure_member first)": ("OP_EARN", dict(member=-1), IndexError),
    "earn of negative points": ("OP_EARN", dict(points=-1), ValueError),
    "earn for a merchant out of range": ("OP_EARN", dict(merchant=-1), ValueError),
    "earn reusing a resident transaction id": ("OP_EARN", dict(new_id=1), KeyError),
    "authorize of 0 points": ("OP_AUTHORIZE", dict(points=0), ValueError),
    "authorize for slot -2": ("OP_AUTHORIZE", dict(member=-2), IndexError),
    "authorize reusing a resident hold id": ("OP_AUTHORIZE", dict(new_id=10), KeyError),
    "capture of negative points": ("OP_CAPTURE", dict(points=-1, ref_id=10), ValueError),
    "capture reusing a resident transaction id": ("OP_CAPTURE", dict(ref_id=10, new_id=1), KeyError),
    "void for a merchant beyond int32": ("OP_VOID", dict(merchant=2**31, ref_id=10), ValueError),
    "redeem for a slot that is not resident": ("OP_REDEEM", dict(member=1), IndexError),
    "refund of 0 points": ("OP_REFUND", dict(points=0, ref_id=1), ValueError),
    "refund reusing a resident transaction id": ("OP_REFUND", dict(ref_id=1, new_id=1), KeyError),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_caller_bug_raises_and_keeps_the_operations_before_it(impl, ledger, bug):
    method_name, changes, error = BUGS[bug]
    alice = ledger.load_member("alice", 1_000)
    assert ledger.earn("alice", MERCHANT, 10, 1)[0] == impl.OK
    assert ledger.authorize(alice, MERCHANT, 100, 10, LATER_US)[0] == impl.OK
    arguments = dict(member=alice, points=5, new_id=30)
    arguments.update(changes)
    operations = [
        op(impl.OP_REDEEM, alice, points=20, new_id=2),
        op(getattr(impl, method_name), **arguments),
        op(impl.OP_REDEEM, alice, points=30, new_id=3),
    ]
    ledger.begin()
    at_begin = state(ledger)
    written = outputs(3)
    with pytest.raises(error):
        ledger.apply_batch(*columns(operations), NOW_US, *written)
    # The first redemption happened and its row is written; nothing of the bad one or after.
    assert list(zip(*written)) == [(impl.OK, alice, 20, 990, 890, impl.KIND_REDEEM), UNWRITTEN_ROW, UNWRITTEN_ROW]
    assert ledger.balance(alice) == (990, 100)
    assert ledger.has_transaction(2) and not ledger.has_transaction(3)
    assert not ledger.has_transaction(30) and not ledger.has_hold(30)
    ledger.check_invariants()
    # The caller rolls the batch back with the undo log.
    ledger.rollback()
    assert state(ledger) == {**at_begin, "counts": at_begin["counts"][:4] + (0,)}


def test_operations_of_a_batch_are_recorded_in_the_undo_log(impl, ledger):
    alice = ledger.load_member("alice", 1_000)
    ledger.load_hold(10, alice, MERCHANT, 100, NOW_US, impl.HOLD_OPEN)
    ledger.begin()
    before = state(ledger)
    bob = ledger.ensure_member("bob")
    rows = run(
        ledger,
        [
            op(impl.OP_CAPTURE, ref_id=10, new_id=1),  # expired: marked so
            op(impl.OP_EARN, bob, points=70, new_id=2),
            op(impl.OP_AUTHORIZE, alice, points=300, new_id=11),
            op(impl.OP_REFUND, points=10, ref_id=2, new_id=3),
        ],
    )
    assert [row[0] for row in rows] == [impl.HOLD_EXPIRED, impl.OK, impl.OK, impl.OK]
    ledger.rollback()
    assert state(ledger) == {**before, "counts": before["counts"][:4] + (0,)}
    assert ledger.hold(10)[0] == impl.HOLD_OPEN
    ledger.check_invariants()


def test_the_compiled_kernel_takes_int64_buffers_only():
    ledger = fastpath._core.Ledger(10, 10, 10)
    alice = ledger.load_member("alice", 1_000)
    operations = [op(fastpath._core.OP_EARN, alice, points=5, new_id=1, expires_at_us=0)]
    # Read-only buffers will do for the inputs (memoryview(bytes) is read-only).
    read_only = [memoryview(column.tobytes()).cast("q") for column in columns(operations)]
    assert ledger.apply_batch(*read_only, NOW_US, *outputs(1)) == 1
    wrong = [
        [array("d", column) for column in columns(operations)],  # floats
        [array("i", column) for column in columns(operations)],  # 32 bits
        [list(column) for column in columns(operations)],  # not a buffer
        [None] * 7,
    ]
    for inputs in wrong:
        with pytest.raises((TypeError, ValueError)):
            ledger.apply_batch(*inputs, NOW_US, *outputs(1))
    # Outputs must be writable.
    with pytest.raises(BufferError):
        ledger.apply_batch(*columns(operations), NOW_US, *([memoryview(bytes(8)).cast("q")] * 6))
    assert ledger.balance(alice) == (1_005, 0)


def test_the_twin_takes_any_sequences():
    ledger = fastpath._reference.Ledger(10, 10, 10)
    alice = ledger.load_member("alice", 1_000)
    written = [[None] for _ in range(6)]
    assert (
        ledger.apply_batch([fastpath._reference.OP_EARN], (alice,), [MERCHANT], [5], [0], [1], [0], NOW_US, *written)
        == 1
    )
    assert written == [[fastpath._reference.OK], [alice], [5], [1_005], [1_005], [fastpath._reference.KIND_EARN]]
