"""SubmitBatch's response built in place in one pass (PointsServicer._batch_response) is byte for byte the
response built as before: one OperationResult per operation (_to_result, an earn's or redeem's body by
keywords), handed to SubmitBatchResponse(results=...). Over varied outcomes: APPLIED earns and redeems
with and without their optional fields, replays, refusals with and without a reason, other kinds, and
operations refused before they were queued (or empty) at any place in the batch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from fastpath.intake import Intake
from points.v1 import points_pb2 as pb
from processor import servicer as servicer_module
from processor.config import Settings
from processor.domain import Code, Method, Operation, Outcome
from processor.servicer import PointsServicer
from tests.unit.test_servicer_fast_path import SHOP, _earn_by_keywords, _Pipeline, _redeem_by_keywords

_COUNT = st.integers(min_value=0, max_value=2**40)
_EARN = st.fixed_dictionaries(
    {
        "transaction_id": st.integers(min_value=1, max_value=2**40),
        "points": _COUNT,
        "balance": st.integers(-(2**40), 2**40),
        "give_back_bps": st.integers(min_value=0, max_value=10_000),
        "created_at_us": _COUNT,
    },
    optional={"bonus_points": _COUNT, "level": st.sampled_from(["", "gold"])},
)
_REDEEM = st.fixed_dictionaries(
    {
        "transaction_id": st.integers(min_value=1, max_value=2**40),
        "points": _COUNT,
        "balance": st.integers(-(2**40), 2**40),
        "available": _COUNT,
    },
    optional={"vouchers": _COUNT, "voucher_balance": _COUNT, "voucher_credit_used": _COUNT},
)
_VOID = st.fixed_dictionaries({"authorization_id": st.integers(min_value=1, max_value=2**40), "released": _COUNT})
_VOID = _VOID.map(lambda f: f | {"available": f["released"]})
_REFUSAL = st.builds(
    Outcome,
    st.sampled_from([Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT, Code.UNAVAILABLE, Code.ALREADY_EXISTS]),
    st.just({}),
    st.sampled_from(["", "not enough points", "retry with the same idempotency key"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["", "insufficient_points", "hold_expired"]),
)


def _queued(kind: str, fields: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(
        st.just("queued"), st.just(kind), st.builds(Outcome, st.just(Code.OK), fields, st.just(""), st.booleans())
    )


_ENTRY = st.one_of(
    _queued("earn", _EARN),
    _queued("redeem", _REDEEM),
    _queued("void", _VOID),
    st.tuples(st.just("queued"), st.sampled_from(["earn", "redeem", "void"]), _REFUSAL),
    st.tuples(st.just("refused"), st.sampled_from(["earn", "redeem"]), _REFUSAL),
    st.tuples(st.just("empty"), st.just(""), st.none()),
)


def _before(service: PointsServicer, entries: list) -> pb.SubmitBatchResponse:
    """The response as SubmitBatch built it before: a result per operation, then the response."""
    results = []
    for how, kind, outcome in entries:
        if how == "empty":
            results.append(servicer_module._EMPTY_OPERATION)
        elif outcome.code is Code.OK and kind in ("earn", "redeem"):
            by_keywords = _earn_by_keywords if kind == "earn" else _redeem_by_keywords
            replayed = pb.OPERATION_OUTCOME_REPLAYED if outcome.replayed else pb.OPERATION_OUTCOME_APPLIED
            results.append(pb.OperationResult(outcome=replayed, **{kind: by_keywords(outcome.fields)}))
        else:
            results.append(service._to_result(kind, outcome))
    return pb.SubmitBatchResponse(results=results)


def _now(service: PointsServicer, entries: list) -> pb.SubmitBatchResponse:
    """The response as SubmitBatch builds it now: refusals placed while building, then one pass."""
    refused: list = [None] * len(entries)
    built = []
    for index, (how, kind, outcome) in enumerate(entries):
        if how == "empty":
            refused[index] = servicer_module._EMPTY_OPERATION
        elif how == "refused":
            refused[index] = service._to_result(kind, outcome)
        else:
            op = Operation(Method.EARN, "shop", 3, f"k-{index}", {})
            op.outcome = outcome
            built.append((index, kind, op))
    indexes, kinds, ops = (list(column) for column in zip(*built)) if built else ([], [], [])
    return service._batch_response(refused, indexes, kinds, ops)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ENTRY, min_size=1, max_size=40))
def test_the_response_built_in_place_is_the_response_built_before_byte_for_byte(entries):
    service = PointsServicer(Settings(), _Pipeline([SHOP]))  # type: ignore[arg-type]
    before, now = _before(service, entries), _now(service, entries)
    assert now == before
    assert now.SerializeToString() == before.SerializeToString()
    assert now.SerializeToString(deterministic=True) == before.SerializeToString(deterministic=True)


def test_a_batch_of_only_applied_earns_and_redeems_and_one_refused_last():
    service = PointsServicer(Settings(), _Pipeline([SHOP]))  # type: ignore[arg-type]
    earn = {"transaction_id": 7, "points": 10, "balance": 10, "give_back_bps": 1_000, "created_at_us": 1}
    redeem = {"transaction_id": 8, "points": 3, "balance": 7, "available": 7}
    entries = [
        ("queued", "earn", Outcome(Code.OK, earn)),
        ("queued", "redeem", Outcome(Code.OK, redeem)),
        ("refused", "redeem", Outcome(Code.INVALID_ARGUMENT, message="points must be 1..")),
    ]
    now = _now(service, entries)
    assert now.SerializeToString() == _before(service, entries).SerializeToString()
    assert [r.outcome for r in now.results] == [
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_INVALID,
    ]
    assert now.results[0].earn.transaction_id == "txn_7" and now.results[1].redeem.available == 7


# --- the compiled intake writes the response's wire bytes (Intake.respond_encoded): against the Python
# path's setters (the twin), over the whole ranges the setters take and what they must leave to it ---

_INT64 = st.integers(-(2**63), 2**63 - 1)
_ODD = st.one_of(st.just("7"), st.just(1.5), st.just(True), st.integers(2**63, 2**64), st.none())
_EARN_WIDE = st.fixed_dictionaries(
    {
        "transaction_id": _INT64,
        "points": _INT64,
        "balance": _INT64,
        "give_back_bps": st.integers(-(2**31), 2**31 - 1),
        "created_at_us": _INT64,
    },
    optional={"bonus_points": _INT64, "level": st.sampled_from(["", "gold", "été", "😀", "\u2028"])},
)
_REDEEM_WIDE = st.fixed_dictionaries(
    {"transaction_id": _INT64, "points": _INT64, "balance": _INT64, "available": _INT64},
    optional={"vouchers": _INT64, "voucher_balance": _INT64, "voucher_credit_used": _INT64},
)
_ENTRY_WIDE = st.one_of(
    _ENTRY,
    _queued("earn", _EARN_WIDE),
    _queued("redeem", _REDEEM_WIDE),
)


def _compiled(service: PointsServicer) -> PointsServicer:
    """The servicer with the compiled intake, as it builds it (also under POINTS_FASTPATH=python: the
    module is built either way, and this compares it with the Python path)."""
    if service._intake is None:
        service._intake = Intake(
            Operation,
            Method.EARN,
            Method.REDEEM,
            service.settings,
            service.rate_limits,
            service._admitted,
            service._rate_limited_result,
        )
    return service


def _python_path(service: PointsServicer, entries: list) -> bytes:
    intake, service._intake = service._intake, None
    try:
        return _now(service, entries).SerializeToString()
    finally:
        service._intake = intake


@settings(max_examples=400, deadline=None)
@given(st.lists(_ENTRY_WIDE, min_size=1, max_size=30))
def test_the_compiled_responses_wire_bytes_are_the_python_paths_response(entries):
    service = _compiled(PointsServicer(Settings(), _Pipeline([SHOP])))  # type: ignore[arg-type]
    assert _now(service, entries).SerializeToString() == _python_path(service, entries)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["earn", "redeem"]), name=st.sampled_from(["transaction_id", "points", "balance"]), odd=_ODD
)
def test_fields_the_setters_would_question_are_left_to_the_python_path(kind, name, odd):
    # a value not an int64 goes through _to_result, as the Python path does: the same message, or the
    # same error
    service = _compiled(PointsServicer(Settings(), _Pipeline([SHOP])))  # type: ignore[arg-type]
    fields = (
        {"transaction_id": 7, "points": 10, "balance": 10, "give_back_bps": 1_000, "created_at_us": 1}
        if kind == "earn"
        else {"transaction_id": 8, "points": 3, "balance": 7, "available": 7}
    )
    entries = [("queued", kind, Outcome(Code.OK, fields | {name: odd}))]
    try:
        expected = _python_path(service, entries)
    except Exception as error:  # noqa: BLE001 - the setters refused it: so must the compiled answer
        with pytest.raises(type(error)):
            _now(service, entries)
        return
    assert _now(service, entries).SerializeToString() == expected


def test_an_earn_before_1970_and_the_extremes_are_written_as_the_setters_write_them():
    service = _compiled(PointsServicer(Settings(), _Pipeline([SHOP])))  # type: ignore[arg-type]
    earns = [
        {"transaction_id": t, "points": p, "balance": -1, "give_back_bps": b, "created_at_us": c, "level": "gold"}
        for t, p, b, c in [
            (-(2**63), 2**63 - 1, -(2**31), -1),
            (0, 0, 0, -1_000_000),
            (2**63 - 1, -(2**63), 2**31 - 1, -1_999_999),
            (1, 1, 1, 0),
        ]
    ]
    entries = [("queued", "earn", Outcome(Code.OK, fields)) for fields in earns]
    now = _now(service, entries)
    assert now.SerializeToString() == _python_path(service, entries)
    assert [(r.earn.created_at.seconds, r.earn.created_at.nanos) for r in now.results] == [
        (-1, 999_999_000),
        (-1, 0),
        (-2, 1_000),
        (0, 0),
    ]
    assert now.results[0].earn.transaction_id == f"txn_{-(2**63)}"
