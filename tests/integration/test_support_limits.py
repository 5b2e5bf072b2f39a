"""A support key's limits on AdjustPoints (processor/support_limits.py) against real Postgres: the day's
use counts the adjustments committed and those in flight, also when the table of keys is full and keys
are dropped from it (a dropped key is reloaded from member_adjustments, which holds only what committed)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from processor import member_store, support_limits
from processor.domain import Code, Outcome, Rejection
from processor.store import Store

pytestmark = pytest.mark.timeout(120)
NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)


async def _limits(url: str, keys: dict[str, tuple[int, int]]) -> tuple[Store, support_limits.SupportLimits]:
    store = await Store.open(url, 2)
    await store.migrate()
    for key_id, (per_call, per_day) in keys.items():
        await member_store.insert_support_key(
            store.pool, key_id, key_id.encode().ljust(32, b"-"), "", per_call, per_day
        )
    return store, support_limits.SupportLimits(store.pool)


def test_a_key_dropped_from_a_full_table_keeps_its_reservations_in_flight(create_database, monkeypatch):
    monkeypatch.setattr(support_limits, "KEYS_MAX", 1)
    url = create_database()

    async def go():
        store, limits = await _limits(url, {"key-a": (100, 100), "key-b": (100, 100)})
        try:
            await limits.reserve("key-a", 80, NOW)  # queued, not committed yet
            await limits.reserve("key-b", 10, NOW)  # the table is full: key-a must not be forgotten
            with pytest.raises(Rejection) as raised:
                await limits.reserve("key-a", 80, NOW)
            assert raised.value.code is Code.RESOURCE_EXHAUSTED
            assert "adjusted 80 of its 100 point-units today" in raised.value.message
            # once settled (committed: member_adjustments holds it), key-a may be dropped and reloaded
            await store.pool.execute(
                """INSERT INTO member_adjustments (transaction_id, member_id, points, reason, note, key_id, created_at)
                   VALUES (1, 'm', 80, 1, '', 'key-a', $1)""",
                NOW,
            )
            limits.settled("key-a")
            limits.settled("key-b")
            await limits.reserve("key-b", 10, NOW)
            with pytest.raises(Rejection):
                await limits.reserve("key-a", 21, NOW)
            await limits.reserve("key-a", 20, NOW)
        finally:
            await store.close()

    asyncio.run(go())


def test_a_reservation_given_back_frees_the_days_limit(create_database):
    url = create_database()

    async def go():
        store, limits = await _limits(url, {"key-a": (100, 150)})
        try:
            await limits.reserve("key-a", -100, NOW)  # a debit counts by its absolute value
            with pytest.raises(Rejection):
                await limits.reserve("key-a", 60, NOW)
            limits.release("key-a", -100, NOW)  # refused by the ledger: nothing was adjusted
            await limits.reserve("key-a", 100, NOW)
            with pytest.raises(Rejection) as raised:
                await limits.reserve("key-a", 101, NOW)
            assert "at most 100 point-units per call" in raised.value.message
        finally:
            await store.close()

    asyncio.run(go())


def test_an_adjustment_whose_caller_went_away_stays_counted_a_refused_one_does_not(create_database):
    """The pipeline commits a queued adjustment even when its caller cancels (a deadline): its points stay
    counted, or a support key cancelling its calls would pass its day's limit."""
    url = create_database()

    async def go():
        store, limits = await _limits(url, {"key-a": (100, 150)})
        queued = asyncio.Event()

        async def submit_and_wait() -> Outcome:  # the pipeline's answer comes after the caller left
            queued.set()
            await asyncio.Event().wait()
            raise AssertionError("not reached")

        try:
            call = asyncio.ensure_future(limits.adjust("key-a", 100, submit_and_wait))
            await queued.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            with pytest.raises(Rejection) as raised:
                await limits.adjust("key-a", 60, lambda: _answer(Outcome(Code.OK)))
            assert "adjusted 100 of its 150 point-units today" in raised.value.message
            # refused by the ledger, or a replay: nothing adjusted, nothing counted
            refused = Outcome(Code.FAILED_PRECONDITION, message="insufficient")
            assert (await limits.adjust("key-a", 50, lambda: _answer(refused))).code is Code.FAILED_PRECONDITION
            replayed = Outcome(Code.OK, replayed=True)
            assert (await limits.adjust("key-a", 50, lambda: _answer(replayed))).replayed
            await limits.adjust("key-a", 50, lambda: _answer(Outcome(Code.OK)))  # 150 of 150
            with pytest.raises(Rejection):
                await limits.adjust("key-a", 1, lambda: _answer(Outcome(Code.OK)))
        finally:
            await store.close()

    asyncio.run(go())


async def _answer(outcome: Outcome) -> Outcome:
    return outcome
