"""The projector's scheduling (processor/projector.py), without a database: a stand-in store records the
groups it is asked to project. Consecutive queued batches are merged into one projection up to the
bound, in order; the queue is bounded (the committer waits); a transient failure is retried with the
same batches, a divergent one stops the projector and asks for a resync; wait_through is bounded. With a
linger, batches appended within it are projected as one group, a lone batch still is once it is over,
and a wait for a batch does not wait the linger out."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import asyncpg
import pytest

from processor.projector import Appended, Projector
from processor.store import BatchWrite, WriterFenced

pytestmark = pytest.mark.timeout(30)


class StandInStore:
    """Records each projection's batch ids; `gate` holds projections until set; `errors` are raised
    by the next projections, one each."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.errors: list[BaseException] = []
        self.through = 0

    async def project_batches(self, batches, timeout):
        await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        ids = [batch_id for batch_id, _ in batches]
        self.groups.append(ids)
        self.through = max(self.through, ids[-1])
        return self.through


def appended(batch_id: int, at: float = 0.0) -> Appended:
    return Appended(batch_id, BatchWrite(created_at=dt.datetime.now(dt.timezone.utc)), at)


def projector(store: StandInStore, queue_max: int = 8, per_transaction_max: int = 3, linger_seconds: float = 0.0):
    projected: list[int] = []
    failures: list[BaseException] = []
    made = Projector(
        store,  # type: ignore[arg-type]
        queue_max,
        per_transaction_max,
        5.0,
        3600.0,
        lambda group: projected.extend(a.batch_id for a in group),
        failures.append,
        linger_seconds,
    )
    made._prune_due_at = float("inf")  # no pruning: the stand-in has no pool
    return made, projected, failures


def test_queued_batches_are_merged_up_to_the_bound_in_order():
    async def go():
        store = StandInStore()
        store.gate.clear()
        p, projected, _ = projector(store)
        p.reset(0)
        p.start()
        for batch_id in range(1, 8):
            await p.put(appended(batch_id))
        assert p.lag_batches == 7
        store.gate.set()
        assert await p.wait_through(7, 5.0)
        await p.halt()
        return store.groups, projected, p.lag_batches

    groups, projected, lag = asyncio.run(go())
    assert projected == list(range(1, 8))
    assert [batch for group in groups for batch in group] == list(range(1, 8))
    assert all(len(group) <= 3 for group in groups) and len(groups) < 7  # merged, bounded
    assert lag == 0


def test_a_full_queue_holds_the_committer_until_the_projector_takes_batches():
    async def go():
        store = StandInStore()
        store.gate.clear()
        p, _, _ = projector(store, queue_max=2, per_transaction_max=1)
        p.reset(0)
        p.start()
        await p.put(appended(1))
        await p.put(appended(2))
        third = asyncio.ensure_future(p.put(appended(3)))
        await asyncio.sleep(0.05)
        held = not third.done()
        store.gate.set()
        await asyncio.wait_for(third, 5)
        assert await p.wait_through(3, 5.0)
        await p.halt()
        return held

    assert asyncio.run(go()), "the third batch was queued beyond the bound"


def test_a_transient_failure_is_retried_with_the_same_batches_and_a_divergent_one_asks_for_a_resync():
    async def go():
        store = StandInStore()
        store.errors = [ConnectionResetError("reset")]
        p, projected, failures = projector(store)
        p.reset(0)
        p.start()
        await p.put(appended(1))
        assert await p.wait_through(1, 5.0)
        store.errors = [asyncpg.UniqueViolationError("duplicate key")]
        await p.put(appended(2))
        reached = await p.wait_through(2, 5.0)
        return projected, failures, reached, p.running, p.stopped

    projected, failures, reached, running, stopped = asyncio.run(go())
    assert projected == [1]
    assert not reached and not running and stopped
    assert [type(f) for f in failures] == [asyncpg.UniqueViolationError]


def test_a_fenced_writer_is_divergent_too():
    async def go():
        store = StandInStore()
        store.errors = [WriterFenced("another points service took the writer role")]
        p, projected, failures = projector(store)
        p.reset(0)
        p.start()
        await p.put(appended(1))
        await asyncio.sleep(0.05)
        return projected, failures

    projected, failures = asyncio.run(go())
    assert projected == [] and len(failures) == 1


def test_wait_through_is_bounded_while_the_projection_is_held():
    async def go():
        store = StandInStore()
        store.gate.clear()
        p, _, _ = projector(store)
        p.reset(10)
        p.start()
        await p.put(appended(11))
        reached = await p.wait_through(11, 0.1)
        already = await p.wait_through(10, 0.1)
        store.gate.set()
        await p.halt()
        return reached, already

    assert asyncio.run(go()) == (False, True)


def test_a_wait_is_refused_at_once_while_the_projection_keeps_failing_and_waits_again_once_it_succeeds():
    async def go():
        store = StandInStore()
        store.errors = [ConnectionResetError(f"reset {n}") for n in range(1000)]  # fails until cleared
        p, projected, failures = projector(store)
        p.reset(0)
        p.start()
        await p.put(appended(1))
        # an hour's bound: only the failing projection can end this wait before its deadline (a wait
        # that waited it out would hold the test until its timeout)
        refused = await p.wait_through(1, 3600.0)
        failing, still_failing_store = p.failing, bool(store.errors)
        store.errors.clear()
        refused_again = await p.wait_through(1, 3600.0)  # still failing until a projection succeeds
        while p.failing is not None:  # the next retry (backoff ≤ RETRY_DELAY_SECONDS_MAX) succeeds
            await asyncio.sleep(0.01)
        reached = await p.wait_through(1, 3600.0)
        after = p.failing
        await p.halt()
        return (refused, refused_again), failing, still_failing_store, reached, after, projected, failures

    refused, failing, still_failing_store, reached, after, projected, failures = asyncio.run(go())
    assert refused == (False, False) and still_failing_store
    assert failing is not None and "in a row" in failing and "ConnectionResetError: reset" in failing
    assert reached is True and after is None and projected == [1]
    assert failures == []  # transient: retried, no resync asked


def test_one_failure_is_not_failing():
    async def go():
        store = StandInStore()
        store.gate.clear()
        store.errors = [ConnectionResetError("reset")]
        p, _, _ = projector(store)
        p.reset(0)
        p.start()
        await p.put(appended(1))
        waiting = asyncio.ensure_future(p.wait_through(1, 3600.0))
        store.gate.set()
        reached = await waiting
        await p.halt()
        return reached, p.failing

    assert asyncio.run(go()) == (True, None)


def test_batches_appended_within_the_linger_are_projected_as_one_group_and_a_full_group_at_once():
    async def go():
        store = StandInStore()
        # a linger far beyond the test's timeout: only a full group can be projected before it ends
        p, projected, _ = projector(store, per_transaction_max=3, linger_seconds=1.0)
        p.linger_seconds = 3600.0
        p.reset(0)
        p.start()
        for batch_id in range(1, 5):
            await p.put(appended(batch_id, time.monotonic()))
            await asyncio.sleep(0.02)  # the projector runs in between: it lingers
        while p.through < 3:
            await asyncio.sleep(0.01)
        groups_when_full = list(store.groups)
        lag = p.lag_batches
        await p.halt()
        return groups_when_full, lag

    groups, lag = asyncio.run(go())
    assert groups == [[1, 2, 3]]  # not one projection per batch: the group filled, then went at once
    assert lag == 1  # the fourth lingers for more


def test_a_lone_batch_is_projected_once_the_linger_is_over():
    async def go():
        store = StandInStore()
        p, projected, _ = projector(store, linger_seconds=0.2)
        p.reset(0)
        p.start()
        await p.put(appended(1, time.monotonic()))
        await asyncio.sleep(0.05)
        lingering = list(store.groups)
        while not store.groups:  # nobody waits for it: it goes when the linger is over
            await asyncio.sleep(0.01)
        await p.halt()
        return lingering, store.groups, projected

    lingering, groups, projected = asyncio.run(go())
    assert lingering == [] and groups == [[1]] and projected == [1]


def test_a_wait_for_a_batch_does_not_wait_out_the_linger():
    async def go():
        store = StandInStore()
        p, projected, _ = projector(store, linger_seconds=1.0)
        p.linger_seconds = 3600.0  # beyond the wait's bound: only its urge can project the batch in time
        p.reset(0)
        p.start()
        await p.put(appended(1, time.monotonic()))
        await asyncio.sleep(0.05)
        lingering = list(store.groups)
        reached = await p.wait_through(1, 5.0)
        await p.put(appended(2, time.monotonic()))  # a batch after the one waited for lingers again
        await asyncio.sleep(0.05)
        lag = p.lag_batches
        await p.halt()
        return lingering, reached, lag, projected

    lingering, reached, lag, projected = asyncio.run(go())
    assert lingering == [] and reached is True and projected == [1]
    assert lag == 1


def test_a_busy_projector_projects_batches_whose_linger_is_over_without_idling_after_each_projection():
    async def go():
        store = StandInStore()
        p, projected, _ = projector(store, linger_seconds=1.0)
        p.linger_seconds = 3600.0  # lingering again after a projection would hold the test until its timeout
        p.reset(0)
        p.start()
        long_ago = time.monotonic() - 7200.0  # appended long before: their linger is over
        store.gate.clear()
        await p.put(appended(1, long_ago))
        await asyncio.sleep(0.05)  # the projector takes batch 1 and is held in its projection
        await p.put(appended(2, long_ago))  # queued while the first projection is held
        store.gate.set()
        while p.through < 2:
            await asyncio.sleep(0.01)
        await p.halt()
        return store.groups, projected

    groups, projected = asyncio.run(go())
    assert groups == [[1], [2]] and projected == [1, 2]
