"""The committer's answers (Pipeline._resolve_all, sums_by_kind): the common case of a SubmitBatch's
operation answered inline decides exactly what _resolve decided (the outcome, the call's one future, the
merchant's queue share, the key no longer in flight), the rarer ones go through _resolve; the business
counters' sums per kind are the plain loop's. No database: a pipeline that is never started."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings, strategies as st

from processor import pipeline as pipeline_module
from processor.config import Settings
from processor.domain import Code, Method, Operation, Outcome
from processor.pipeline import Pipeline, sums_by_kind


def _op(index: int, merchant: str = "shop") -> Operation:
    return Operation(Method.EARN, merchant, 1, f"k-{index}", {})


def test_a_calls_operations_are_decided_inline_as_resolve_decided_them():
    async def main():
        pipeline = Pipeline(Settings(), None)  # type: ignore[arg-type]
        pipeline.ready = True
        ops = [_op(i, "shop" if i % 2 else "cafe") for i in range(6)]
        answered: list[Operation] = []
        call = pipeline.enqueue_many(ops[:4])
        stream = pipeline.enqueue_many(ops[4:], answer=answered.append)  # a Stream's: through _resolve
        ops[0].future = asyncio.get_running_loop().create_future()  # a same-key call waits on it
        assert pipeline.quotas.queued == {"shop": 3, "cafe": 3} and len(pipeline._inflight) == 6
        outcomes = [Outcome(Code.OK, {"n": i}) for i in range(6)]
        batch = [pipeline._queue.popleft() for _ in range(6)]
        pipeline._resolve_all(batch[:3], outcomes[:3])
        assert not call.future.done() and call.remaining == 1
        pipeline._resolve_all(batch[3:], outcomes[3:])
        assert call.future.done() and stream.future.done()
        assert [op.outcome for op in ops] == outcomes
        assert ops[0].future.result() is outcomes[0]
        assert answered == ops[4:]
        assert pipeline.quotas.queued == {} and pipeline._inflight == {}
        pipeline._resolve_all(batch[:1], [Outcome(Code.INTERNAL)])  # a second outcome is ignored
        assert ops[0].outcome is outcomes[0]

    asyncio.run(main())


def test_a_call_whose_caller_went_away_is_still_decided():
    async def main():
        pipeline = Pipeline(Settings(), None)  # type: ignore[arg-type]
        pipeline.ready = True
        ops = [_op(i) for i in range(3)]
        call = pipeline.enqueue_many(ops)
        call.future.cancel()
        pipeline._resolve_all([pipeline._queue.popleft() for _ in range(3)], [Outcome(Code.OK)] * 3)
        assert all(op.outcome is not None for op in ops) and pipeline.quotas.queued == {}

    asyncio.run(main())


_ROW = st.tuples(
    st.integers(1, 10**9),
    st.sampled_from([1, 2, 3, 7, 12]),
    st.just("shop"),
    st.just("m"),
    st.integers(-(10**12), 10**12),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ROW, max_size=60))
def test_sums_by_kind_are_the_loops(rows):
    amounts: dict[int, int] = {}
    counts: dict[int, int] = {}
    for row in rows:
        amounts[row[1]] = amounts.get(row[1], 0) + row[4]
        counts[row[1]] = counts.get(row[1], 0) + 1
    assert sums_by_kind(rows) == (amounts, counts)
    assert pipeline_module._MERCHANT_AND_KEY(("shop", "k", 3)) == ("shop", "k")
