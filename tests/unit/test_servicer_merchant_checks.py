"""SubmitBatch checks a merchant's id, presence, the service's readiness and the caller's permission
once per run of operations built with no await between them (PointsServicer._checked_merchant's
`checked`), and again after any await: what an await may change (the service recovering, a merchant
read from Postgres) is seen by the operations after it. The key and the rate limit are still checked
for every operation, in the same order as before. No database, no network: the stand-in pipeline of
test_servicer_fast_path."""

from __future__ import annotations

import grpc

from points.v1 import points_pb2 as pb
from processor.domain import Code, Rejection
from processor.store import MerchantRow
from tests.unit.test_servicer_fast_path import LATER, SHOP, _earn, _Pipeline, _redeem, _run, _servicer


class _RecoveringAfterRead(_Pipeline):
    """Starts recovering (ready False) while it reads a merchant from Postgres: during an await."""

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        row = await super().merchant(merchant_id)
        self.ready = False
        return row


def _submit(service, operations, merchants=("shop", "later")):
    async def submit():
        return await service.SubmitBatch(pb.SubmitBatchRequest(operations=operations), None)

    return _run(submit, merchants=merchants).results


def test_an_await_in_the_batch_makes_the_next_operations_check_their_merchant_again():
    pipeline = _RecoveringAfterRead([SHOP], stored=[LATER])
    service = _servicer(pipeline)
    results = _submit(
        service,
        [
            pb.Operation(earn=_earn(idempotency_key="a")),  # shop checked: remembered for the run
            pb.Operation(earn=_earn(merchant_id="later", idempotency_key="b")),  # read (await): recovering
            pb.Operation(earn=_earn(idempotency_key="c")),  # shop again: checked again, UNAVAILABLE
            pb.Operation(redeem=_redeem(idempotency_key="d")),
        ],
    )
    assert pipeline.reads == ["later"]
    assert [op.idempotency_key for op in pipeline.queued] == ["a"]
    assert [r.status_code for r in results[1:]] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 3
    assert all("recovering" in r.message for r in results[1:])


def test_a_remembered_merchant_still_has_each_key_and_the_rate_limit_checked_per_operation():
    service = _servicer(_Pipeline([SHOP]), merchant_operations_per_second=0.001, merchant_burst_operations=2)
    results = _submit(
        service,
        [
            pb.Operation(earn=_earn(idempotency_key="a")),
            pb.Operation(earn=_earn(idempotency_key="")),  # key refused before the bucket
            pb.Operation(redeem=_redeem(idempotency_key="b")),
            pb.Operation(earn=_earn(idempotency_key="c")),  # no token left
        ],
    )
    assert [r.outcome for r in results[:3]] == [
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_INVALID,
        pb.OPERATION_OUTCOME_APPLIED,
    ]
    assert "idempotency_key is required" in results[1].message
    assert results[3].status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "exceeds its limit" in results[3].message


def test_a_merchant_the_caller_may_not_act_for_is_refused_each_time_and_others_are_not():
    service = _servicer(_Pipeline([SHOP, LATER]))
    results = _submit(
        service,
        [
            pb.Operation(earn=_earn(merchant_id="later", idempotency_key="a")),
            pb.Operation(earn=_earn(idempotency_key="b")),
            pb.Operation(redeem=_redeem(merchant_id="later", idempotency_key="c")),
            pb.Operation(earn=_earn(merchant_id="bad merchant", idempotency_key="d")),
        ],
        merchants=("shop",),
    )
    denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert [r.status_code for r in results] == [denied, 0, denied, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert "may not act for merchant 'later'" in results[0].message
    assert results[0].message == results[2].message
    assert "merchant_id must be" in results[3].message


def test_the_unary_builders_check_every_time_without_a_memory():
    pipeline = _Pipeline([SHOP])
    service = _servicer(pipeline)
    _run(lambda: service._earn(_earn()))
    pipeline.ready = False
    try:
        _run(lambda: service._earn(_earn(idempotency_key="k-2")))
    except Rejection as refused:
        assert refused.code is Code.UNAVAILABLE
    else:
        raise AssertionError("an earn while recovering was built")
