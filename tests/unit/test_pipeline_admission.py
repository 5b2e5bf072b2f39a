"""Pipeline.enqueue_many admits a call's operations inline (the service's state read once a call, no
_admit call an operation): what it queues, refuses and counts is what enqueue() (through _admit) does
for the same operations one at a time, in every state (recovering, draining, stopping), at the queue's
bound and at a merchant's share of it. No database: a pipeline that is never started."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings, strategies as st

from processor.config import Settings
from processor.domain import Method, Operation, Rejection
from processor.pipeline import Pipeline


def _ops(merchants: list[str]) -> list[Operation]:
    return [Operation(Method.EARN, merchant, 1, f"k-{i}", {}) for i, merchant in enumerate(merchants)]


def _pipeline(state: str, queue_max: int, share_max: int) -> Pipeline:
    settings_ = Settings(
        batch_operations_max=1, queue_operations_max=queue_max, merchant_queue_operations_max=share_max
    )
    pipeline = Pipeline(settings_, None)  # type: ignore[arg-type]
    pipeline.ready = state != "recovering"
    pipeline.draining = state == "draining"
    pipeline._stopping = state == "stopping"
    return pipeline


def _outcome_of_each(pipeline: Pipeline, ops: list[Operation], many: bool) -> list[tuple]:
    if many:
        pipeline.enqueue_many(ops)
        decided = [None if op.outcome is None else (op.outcome.code, op.outcome.message) for op in ops]
    else:
        decided = []
        for op in ops:
            try:
                pipeline.enqueue(op)
                decided.append(None)
            except Rejection as rejection:
                decided.append((rejection.code, rejection.message))
    queued = [(op.merchant_id, op.idempotency_key) for op in pipeline._queue]
    return [decided, queued, dict(pipeline.quotas.queued), sorted(pipeline._inflight)]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["ready", "recovering", "draining", "stopping"]),
    st.lists(st.sampled_from(["shop", "cafe", "bar"]), min_size=1, max_size=12),
    st.integers(1, 10),
    st.integers(1, 6),
)
def test_a_calls_operations_are_admitted_and_refused_as_one_at_a_time(state, merchants, queue_max, share_max):
    async def main():
        many = _outcome_of_each(_pipeline(state, queue_max, share_max), _ops(merchants), many=True)
        one_by_one = _outcome_of_each(_pipeline(state, queue_max, share_max), _ops(merchants), many=False)
        assert many == one_by_one
        if state != "ready":
            assert many[1] == [] and all(d is not None for d in many[0])

    asyncio.run(main())
