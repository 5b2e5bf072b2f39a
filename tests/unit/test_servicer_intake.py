"""SubmitBatch's intake in C (fastpath/intake.pyx) against its twin, the Python path (the servicer with no
Intake): the same batches give the same queued Operations (field by field, types included), the same
results byte for byte (the rate limit's retry seconds aside, which move with the clock), the same merchants
read from Postgres and the same rate-limit buckets. The Operations it builds without __init__ are ordinary
ones for the cyclic collector. No database, no network: the stand-in pipeline of test_servicer_fast_path."""

from __future__ import annotations

import dataclasses
import gc
import re

import fastpath
import pytest
from hypothesis import given, settings, strategies as st

from points.v1 import points_pb2 as pb
from processor import rules
from processor.config import Settings
from processor.domain import Method, Operation
from processor.servicer import PointsServicer
from processor.store import MerchantRow
from tests.unit.test_servicer_fast_path import LATER, SHOP, _earn, _Pipeline, _redeem, _run, _servicer

ELSEWHERE = MerchantRow("elsewhere", 9, 1_000, "active")  # known, but the caller may not act for it
ZERO_BPS = MerchantRow("zero", 11, 0, "active")  # a row the Python path's invariant refuses (INTERNAL)
PERMITTED = ("shop", "later", "nowhere", "zero")
LIMITS = {"id_bytes_max": 16, "idempotency_key_bytes_max": 12, "purchase_amount_max": 10**6, "points_max": 10**5}

_MEMBER = st.sampled_from(["m-1", "m-2", "M.x:y@z_", "", "a b", "é", "m" * 16, "m" * 17, "m\x00"])
_MERCHANT = st.sampled_from(["shop", "shop", "later", "elsewhere", "nowhere", "bad shop", "", "zero", "s" * 17])
_KEY = st.sampled_from(["k", "k!~#", "", "a key", "ü", "k" * 12, "k" * 13, "k\x7f", "k\t"])
_AMOUNT = st.sampled_from([1, 2, 77, 1_234, 0, -1, 10**5, 10**5 + 1, 10**6, 10**6 + 1, 2**62])


def _operation(kind: str, merchant: str, member: str, key: str, amount: int, vouchers: int) -> pb.Operation:
    if kind == "earn":
        request = _earn(merchant_id=merchant, member_id=member, idempotency_key=key, purchase_amount=amount)
        return pb.Operation(earn=request)
    if kind == "redeem":
        request = _redeem(merchant_id=merchant, member_id=member, idempotency_key=key, points=amount, vouchers=vouchers)
        return pb.Operation(redeem=request)
    if kind == "void":
        return pb.Operation(void=pb.VoidRequest(merchant_id=merchant, authorization_id="auth_7", idempotency_key=key))
    return pb.Operation()


_OPERATION = st.builds(
    _operation,
    st.sampled_from(["earn"] * 5 + ["redeem"] * 3 + ["void", "empty"]),
    _MERCHANT,
    _MEMBER,
    _KEY,
    _AMOUNT,
    st.sampled_from([0, 0, 5, -1, 10**5 + 1]),
)
_RETRY = re.compile(r"retry in [0-9.]+ s")


def _submit(intake: bool, operations: list[pb.Operation], burst: int):
    pipeline = _Pipeline([SHOP, ELSEWHERE, ZERO_BPS], stored=[LATER])
    # a rate so low no token comes back during the test: which operations are refused depends only on
    # the burst and the order
    service = _servicer(pipeline, merchant_operations_per_second=1e-9, merchant_burst_operations=burst, **LIMITS)
    if not intake:
        service._intake = None

    async def submit():
        return await service.SubmitBatch(pb.SubmitBatchRequest(operations=operations), None)

    response = _run(submit, merchants=PERMITTED)
    return pipeline, service, response


def _comparable(response: pb.SubmitBatchResponse) -> list[bytes]:
    results = []
    for result in response.results:
        copy = pb.OperationResult()
        copy.CopyFrom(result)
        copy.message = _RETRY.sub("retry in ... s", copy.message)
        results.append(copy.SerializeToString(deterministic=True))
    return results


def test_the_compiled_intake_is_what_the_servicer_runs():
    service = PointsServicer(Settings(**LIMITS), _Pipeline([SHOP]))  # type: ignore[arg-type]
    if fastpath.IMPLEMENTATION == "cython":
        from fastpath.intake import Intake

        assert isinstance(service._intake, Intake)
    else:
        assert service._intake is None


@settings(max_examples=300, deadline=None)
@given(st.lists(_OPERATION, min_size=1, max_size=30), st.integers(min_value=1, max_value=12))
def test_a_batch_is_built_and_answered_as_the_python_path_builds_and_answers_it(operations, burst):
    if fastpath.IMPLEMENTATION != "cython":
        pytest.skip("the compiled fast path is not in use (POINTS_FASTPATH=python): nothing to compare")
    compiled, compiled_service, compiled_response = _submit(True, operations, burst)
    python, python_service, python_response = _submit(False, operations, burst)
    assert compiled.reads == python.reads
    assert compiled.queued == python.queued
    for built, expected in zip(compiled.queued, python.queued):
        for field in dataclasses.fields(Operation):
            assert type(getattr(built, field.name)) is type(getattr(expected, field.name)), field.name
    assert _comparable(compiled_response) == _comparable(python_response)
    compiled_buckets = compiled_service.rate_limits._buckets
    python_buckets = python_service.rate_limits._buckets
    assert compiled_buckets.keys() == python_buckets.keys()
    for merchant_id, (tokens, _) in compiled_buckets.items():
        assert tokens == pytest.approx(python_buckets[merchant_id][0], abs=1e-6)


def test_a_merchant_out_of_tokens_is_refused_with_the_python_paths_message_and_no_token_taken_for_a_bad_key():
    operations = [pb.Operation(earn=_earn(idempotency_key=f"k{i}")) for i in range(3)]
    operations.insert(1, pb.Operation(earn=_earn(idempotency_key="bad key")))
    operations.append(pb.Operation(redeem=_redeem(idempotency_key="r")))
    pipeline, service, response = _submit(True, operations, burst=3)
    assert [op.idempotency_key for op in pipeline.queued] == ["k0", "k1", "k2"]
    refused = response.results[4]
    assert (
        refused.outcome == pb.OPERATION_OUTCOME_RETRY and "exceeds its limit of 1e-09 operations/s" in refused.message
    )
    assert service.rate_limits._buckets["shop"][0] < 1


def test_with_a_program_that_may_require_presence_a_redeem_stops_the_run():
    service = _servicer(_Pipeline([SHOP]))
    if service._intake is None:
        pytest.skip("the compiled fast path is not in use")
    version = rules.ProgramVersion("alliance", 1, 0, member_verification=rules.VERIFICATION_SPENDING)
    service.pipeline.program.program = rules.Program("alliance", (version,))
    assert not service._redeems_in_intake()
    service.pipeline.program.program = None
    assert service._redeems_in_intake()
    operations = [pb.Operation(earn=_earn(idempotency_key="a")), pb.Operation(redeem=_redeem(idempotency_key="b"))]
    indexes: list = []
    ops: list = []

    async def run():
        return service._intake.run(operations, 0, {}, [None, None], indexes, [], ops, False)

    assert _run(run) == 1 and indexes == [0] and ops[0].method is Method.EARN


def test_an_operation_built_in_c_is_tracked_and_a_cycle_through_it_is_collected():
    pipeline, _, _ = _submit(True, [pb.Operation(earn=_earn())], burst=5)
    op = pipeline.queued[0]
    assert gc.is_tracked(op)
    referents = {id(value) for value in gc.get_referents(op)}
    assert {id(op.request), id(op.member_id), id(op.merchant_id), id(op.idempotency_key)} <= referents
    collected = []

    class Holder:
        def __del__(self) -> None:
            collected.append(True)

    holder = Holder()
    holder.op = op  # type: ignore[attr-defined]
    op.call = holder  # op -> holder -> op: only the cyclic collector frees them
    del op, holder
    pipeline.queued.clear()
    gc.collect()
    assert collected == [True]


def test_a_failure_inside_the_intake_answers_internal_for_that_operation_and_the_rest_go_on():
    service = _servicer(_Pipeline([SHOP, LATER]))
    if service._intake is None:
        pytest.skip("the compiled fast path is not in use")
    from fastpath.intake import Intake

    def admit(merchant_id, checked):
        if merchant_id == "later":
            raise RuntimeError("a bug")
        return service._admitted(merchant_id, checked)

    service._intake = Intake(
        Operation,
        Method.EARN,
        Method.REDEEM,
        service.settings,
        service.rate_limits,
        admit,
        service._rate_limited_result,
    )
    operations = [
        pb.Operation(earn=_earn(idempotency_key="a")),
        pb.Operation(earn=_earn(merchant_id="later", idempotency_key="b")),
        pb.Operation(redeem=_redeem(idempotency_key="c")),
    ]

    async def submit():
        return await service.SubmitBatch(pb.SubmitBatchRequest(operations=operations), None)

    results = _run(submit).results
    assert [r.outcome for r in results] == [
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_RETRY,
        pb.OPERATION_OUTCOME_APPLIED,
    ]
    assert results[1].message == "internal error; the operation was not applied"
    assert [op.idempotency_key for op in service.pipeline.queued] == ["a", "c"]


def test_an_intake_refuses_an_operation_type_it_cannot_store_into():
    if fastpath.IMPLEMENTATION != "cython":
        pytest.skip("the compiled fast path is not in use")
    from fastpath.intake import Intake

    @dataclasses.dataclass
    class NoSlots:
        method: object

    service = _servicer(_Pipeline([SHOP]))
    with pytest.raises(ImportError, match="fields"):
        Intake(NoSlots, Method.EARN, Method.REDEEM, service.settings, service.rate_limits, None, None)
