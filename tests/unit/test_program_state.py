"""ProgramState.flush() writes a member's lots as differences (rows gone, rows new or changed), so an
earn or a spend costs rows in proportion to what it changed, not to the member's history of lots; and a
batch rolled back before its flush leaves nothing to write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor import rules
from processor.program import OWNER_TRANSACTION, ProgramState

pytestmark = pytest.mark.timeout(30)

NOW = 1_800_000_000_000_000
SOON, LATER, LATEST = NOW + 10, NOW + 20, NOW + 30


def state_with_lots() -> ProgramState:
    state = ProgramState()
    state.load_lots("m", (rules.Lot(1, 100, SOON, "a"), rules.Lot(2, 50, LATER, "a"), rules.Lot(3, 70, LATEST, "b")))
    return state


def test_a_partial_spend_writes_the_one_lot_it_changed():
    state = state_with_lots()
    state.begin()
    state.consume("m", (OWNER_TRANSACTION, 9), 30, 220, NOW)  # soonest first: 30 of lot 1
    assert state.flush().lots == {"m": ([], [rules.Lot(1, 70, SOON, "a")])}


def test_a_spend_across_lots_deletes_the_emptied_and_writes_the_changed():
    state = state_with_lots()
    state.begin()
    state.consume("m", (OWNER_TRANSACTION, 9), 120, 220, NOW)  # all of lot 1, 20 of lot 2
    assert state.flush().lots == {"m": ([(1, SOON)], [rules.Lot(2, 30, LATER, "a")])}


def test_changes_of_two_batches_are_written_by_each_against_the_previous_flush():
    state = state_with_lots()
    state.begin()
    state.consume("m", (OWNER_TRANSACTION, 9), 30, 220, NOW)
    first = state.flush()
    state.begin()
    state.consume("m", (OWNER_TRANSACTION, 10), 70, 190, NOW)  # the rest of lot 1
    second = state.flush()
    assert first.lots == {"m": ([], [rules.Lot(1, 70, SOON, "a")])}
    assert second.lots == {"m": ([(1, SOON)], [])}


def test_a_batch_rolled_back_before_its_flush_writes_nothing():
    state = state_with_lots()
    state.begin()
    state.consume("m", (OWNER_TRANSACTION, 9), 30, 220, NOW)
    state.rollback_newest()
    assert state.lots["m"][0] == rules.Lot(1, 100, SOON, "a")
    state.begin()
    assert state.flush().lots == {}


def test_the_expiry_schedule_grows_with_changes_of_a_members_soonest_lot_not_with_its_lot_count():
    """Every spend pushed each of the member's lots on the expiry heap again: 1,000 spends of a member
    holding 500 lots left ~500,000 entries. Now an entry is pushed only when the soonest expiry changes."""
    state = ProgramState()
    state.load_lots("m", tuple(rules.Lot(i, 10, NOW + 1_000 + i, "a") for i in range(1, 501)))
    loaded = len(state._due)
    state.begin()
    for n in range(1_000):  # 1 point-unit each: the soonest lot changes once every 10 spends
        state.consume("m", (OWNER_TRANSACTION, 10_000 + n), 1, 5_000 - n, NOW)
    state.commit()
    assert len(state._due) <= loaded + 1_000 // 10 + 1


def test_due_lots_left_by_the_per_batch_limit_are_taken_by_the_next_batches():
    state = ProgramState()
    state.load_lots(
        "m",
        (
            rules.Lot(1, 5, SOON, "a"),
            rules.Lot(2, 6, SOON, "a"),
            rules.Lot(3, 7, SOON, "a"),
            rules.Lot(4, 8, LATEST, "a"),
        ),
    )
    taken = []
    for _ in range(4):
        state.begin()
        taken += [lot.lot_id for _, lot in state.due(LATER, limit=1)]
        state.commit()
    assert taken == [1, 2, 3]
    assert [lot.lot_id for lot in state.lots["m"]] == [4]
    state.begin()
    assert [lot.lot_id for _, lot in state.due(LATEST, limit=10)] == [4]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32))
def test_a_kernel_runs_spends_are_what_spend_records(seed):
    """recorded_by_kernel's spends (a run's redeems at now_us, undo-logged a run at a time) against
    spend(): the same buckets and dirty members for members with none, recent ones, ones older than a
    day, ones in the run's minute and ones after it (loaded out of order), and the same state after a
    rollback."""
    import random

    from processor import velocity

    rng = random.Random(seed)
    now_us = 1_800_000_000_000_000 + rng.randrange(velocity.BUCKET_US)
    histories = {}
    for index in range(8):
        spends: velocity.Spends = ()
        for _ in range(rng.choice([0, 1, 3, 30])):
            at_us = now_us - rng.choice(
                [0, 1, velocity.BUCKET_US, velocity.DAY_US - 1, velocity.DAY_US + 2 * velocity.BUCKET_US]
            )
            at_us -= rng.randrange(velocity.DAY_US) if rng.random() < 0.3 else 0
            at_us += velocity.BUCKET_US if rng.random() < 0.05 else 0
            spends = velocity.add(spends, rng.randrange(1, 50), at_us)
        histories[f"m{index}"] = spends
    run = [(member_id, rng.randrange(0, 40)) for member_id in histories]
    states = []
    for by_kernel in (True, False):
        state = ProgramState()
        state.spends = {member_id: spends for member_id, spends in histories.items() if spends}
        state.begin()
        if by_kernel:
            state.recorded_by_kernel([], [], [], run, now_us)
        else:
            for member_id, points in run:
                state.spend(member_id, points, now_us)
        states.append((dict(state.spends), set(state._dirty["spends"])))
        state.rollback()
        assert state.spends == {member_id: spends for member_id, spends in histories.items() if spends}
    assert states[0] == states[1]
