"""Ledger.idempotency_records: the batch's idempotency records, built by the compiled module and by the
twin, equal to what the state machine's Python loop built with processor/store.to_json: the same
records, the same JSON text to the byte, the same operations left out. Recorded as values (dumps None,
the state machine's way), their idempotency_batches row (processor/idempotency_records.encode) is the
row of those texts to the byte, so a retry compares against and answers from the same stored record
whichever version wrote it."""

from __future__ import annotations

import enum
import gc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath._core
import fastpath._reference
from loadtest import bench_state_machine as bench
from processor import idempotency_records
from processor.domain import Code, InvariantViolation, Method, Operation, Outcome
from processor.idempotency_records import JSON_OPTIONS_STR_KEYS as RECORD_JSON_OPTION_STR_KEYS
from processor.state_machine import NOT_RECORDED
from processor.store import JSON_OPTIONS
from processor.store import to_json


# each implementation with store.to_json, and with orjson.dumps and the state machine's option (what
# the state machine passes: the compiled records call orjson and decode its bytes themselves)
_WAYS = [
    (module, dumps, option)
    for module in (fastpath._core, fastpath._reference)
    for dumps, option in (
        (to_json, None),
        (orjson.dumps, (JSON_OPTIONS, None)),
        (orjson.dumps, (RECORD_JSON_OPTION_STR_KEYS, JSON_OPTIONS)),
    )
]


@pytest.fixture(
    params=_WAYS,
    ids=[
        f"{module} {way}" for module in ("cython", "python") for way in ("to_json", "orjson", "orjson str keys first")
    ],
)
def impl(request):
    return request.param


def _looped(batch: list[Operation], outcomes: list[Outcome], stored: dict) -> list[tuple[Any, ...]]:
    """The records as the state machine's loop built them before (the expectation)."""
    records = []
    for op, outcome in zip(batch, outcomes):
        code = outcome.code
        if code in NOT_RECORDED or not outcome.recorded or (op.merchant_id, op.idempotency_key) in stored:
            continue
        records.append(
            (
                op.merchant_id,
                op.idempotency_key,
                op.method.value,
                to_json(op.request),
                code.value,
                to_json(outcome.fields) if code is Code.OK else None,
                outcome.message,
            )
        )
    return records


def _records(impl, batch, outcomes, stored=None) -> list[tuple[Any, ...]]:
    records: list[tuple[Any, ...]] = []
    module, dumps, options = impl
    module.Ledger.idempotency_records(
        batch, outcomes, stored or {}, NOT_RECORDED, Code.OK, dumps, records, *(options or ())
    )
    return records


def _op(request: dict, key: str = "k1", merchant_id: str = "m1") -> Operation:
    return Operation(Method.EARN, merchant_id, 1, key, request)


class Level(enum.IntEnum):
    GOLD = 3


class Name(str):
    pass


# strings orjson escapes (", \, every control character) or writes as UTF-8 (non-ASCII, U+2028, astral)
_STRINGS = ["", "plain", '"', "\\", "\x7f", "é", "\u2028", "😀", 'a"b\\c\nd\te\rf\bg\fh', *map(chr, range(0x20))]

# flat dicts, and values of other kinds (float, nested, non-str keys, ints past int64, enums, str
# subclasses)
_VALUES: list[dict[Any, Any]] = [
    {},
    {"member_id": "member-1", "points": 100, "purchase_amount": 1_000},
    {"b": 1, "a": 2, "é": 3, "Z": 4, "": 5, "aa": 6, "😀": 7, "\u2028": 8},
    {"none": None, "yes": True, "no": False, "zero": 0, "min": -(2**63), "max": 2**63 - 1, "neg": -1},
    *({"value": text, text: 1} for text in _STRINGS),
    {"float": 1.5},
    {"nested": {"b": 1, "a": [1, 2]}},
    {1: "non-str key", "a": 2},
    {"nested": {2: "a non-str key inside", "b": [{None: 1}]}},
    {"big": 2**63},
    {"big": 2**64 - 1},
    {"level": Level.GOLD},
    {"name": Name("x")},
    {Name("k"): 1},
]


@pytest.mark.parametrize("value", _VALUES, ids=range(len(_VALUES)))
def test_the_json_of_a_request_and_its_fields_is_to_json_to_the_byte(impl, value):
    outcome = Outcome(Code.OK, dict(value))
    records = _records(impl, [_op(dict(value))], [outcome])
    assert records == _looped([_op(value)], [outcome], {})
    assert records[0][3] == to_json(value) and records[0][5] == to_json(value)


@pytest.mark.parametrize("value", [{"bad": "\ud800"}, {"\udfff": 1}, {"huge": 2**64}, {"small": -(2**63) - 1}])
def test_what_to_json_refuses_is_refused_alike(impl, value):
    with pytest.raises(type(_raised(lambda: to_json(value)))):
        _records(impl, [_op(value)], [Outcome(Code.OK, {})])


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what the test compares
        return error
    raise AssertionError("expected an exception")


def test_refusals_about_the_service_replays_and_unrecorded_outcomes_are_left_out(impl):
    batch = [_op({"points": i}, key=f"k{i}") for i in range(7)]
    outcomes = [
        Outcome(Code.OK, {"transaction_id": 1}),
        Outcome(Code.UNAVAILABLE, message="retry"),
        Outcome(Code.FAILED_PRECONDITION, recorded=False, message="suspended"),
        Outcome(Code.NOT_FOUND, message="no such member"),  # recorded, without fields
        Outcome(Code.OK, {"transaction_id": 2}),  # a replay: its key is stored
        Outcome(Code.RESOURCE_EXHAUSTED, message="quota"),
        Outcome(Code.INTERNAL, message="bug"),
    ]
    stored = {("m1", "k4"): object()}
    records = _records(impl, batch, outcomes, stored)
    assert records == _looped(batch, outcomes, stored)
    assert [record[1] for record in records] == ["k0", "k3"]
    assert records[1] == ("m1", "k3", "Earn", '{"points":3}', "NOT_FOUND", None, "no such member")


def test_outcomes_must_align_with_the_batch(impl):
    with pytest.raises(ValueError, match="1 outcomes for 2 operations"):
        _records(impl, [_op({}), _op({}, key="k2")], [Outcome(Code.OK)])


_FLAT = st.dictionaries(
    st.text(max_size=6),
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8) | st.floats(allow_nan=False),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(_FLAT, min_size=1, max_size=5), fields=_FLAT)
def test_random_flat_dicts_give_to_json_or_its_refusal(requests, fields):
    batch = [_op(request, key=f"k{i}") for i, request in enumerate(requests)]
    outcomes = [Outcome(Code.OK, fields) for _ in batch]
    for impl in _WAYS:
        try:
            expected = _looped(batch, outcomes, {})
        except Exception as error:  # noqa: BLE001 - to_json refused a value: so must the records
            with pytest.raises(type(error)):
                _records(impl, batch, outcomes)
            continue
        assert _records(impl, batch, outcomes) == expected


@pytest.mark.parametrize("program", [True, False], ids=["program", "plain"])
def test_a_state_machine_batch_records_what_the_loop_recorded(program):
    machine = bench.machine(program, 2_000, 20)
    for i, batch in enumerate(bench.batches(3, 2_000, 20, seed=3)):
        outcomes, write = machine.apply(batch, {}, bench.NOW_US + i * 1_000_000)
        machine.commit()
        looped = _looped(batch, outcomes, {})
        # the records hold the values; their texts and their row are the loop's
        assert [_as_text(record) for record in write.idempotency] == looped
        assert idempotency_records.encode(write.idempotency) == idempotency_records.encode(looped)
        assert len(write.idempotency) == len(batch)


# --- recorded as values (dumps None, the state machine's way), their JSON made by the row's encode ---

_MODULES = pytest.mark.parametrize("module", [fastpath._core, fastpath._reference], ids=["cython", "python"])


def _values(module, batch, outcomes, stored=None) -> list[tuple[Any, ...]]:
    records: list[tuple[Any, ...]] = []
    module.Ledger.idempotency_records(batch, outcomes, stored or {}, NOT_RECORDED, Code.OK, None, records)
    return records


def _as_text(record: tuple[Any, ...]) -> tuple[Any, ...]:
    """A record of values as the same record of to_json texts."""
    merchant_id, key, method, request, code, response, message = record
    return (merchant_id, key, method, to_json(request), code, None if response is None else to_json(response), message)


def test_the_records_options_write_what_store_to_json_writes():
    # to_json sorts keys and writes a non-str key as a string; the records' first try differs only in
    # refusing such a key (then the row is dumped again with JSON_OPTIONS)
    value = {"b": 1, "a": [2, {"d": None, "c": "é"}], 3: True}
    assert to_json(value) == '{"3":true,"a":[2,{"c":"é","d":null}],"b":1}'
    assert orjson.dumps(value, option=idempotency_records.JSON_OPTIONS).decode() == to_json(value)
    assert RECORD_JSON_OPTION_STR_KEYS == JSON_OPTIONS & ~orjson.OPT_NON_STR_KEYS
    with pytest.raises(TypeError):
        orjson.dumps(value, option=RECORD_JSON_OPTION_STR_KEYS)
    del value[3]
    assert orjson.dumps(value, option=RECORD_JSON_OPTION_STR_KEYS).decode() == to_json(value)


@_MODULES
@pytest.mark.parametrize("value", _VALUES, ids=range(len(_VALUES)))
def test_values_recorded_make_the_row_of_the_texts_to_the_byte(module, value):
    request, fields = dict(value), dict(value)
    batch = [_op(request), _op({"points": 1}, key="k2"), _op({"points": 2}, key="k3")]
    outcomes = [Outcome(Code.OK, fields), Outcome(Code.NOT_FOUND, message="no such member"), Outcome(Code.OK, {})]
    records = _values(module, batch, outcomes)
    assert records[0][3] is request and records[0][5] is fields  # the values themselves, not copies
    assert records[1][5] is None  # a refusal's record has no response
    texts = _looped(batch, outcomes, {})
    assert [_as_text(record) for record in records] == texts
    row = idempotency_records.encode(records)
    assert row == idempotency_records.encode(texts)
    methods, requests, codes, responses, messages = idempotency_records.decode_records(row.records)
    assert requests[0] == orjson.loads(to_json(value)) and responses == [orjson.loads(to_json(value)), None, {}]


@_MODULES
@pytest.mark.parametrize("value", [{"bad": "\ud800"}, {"\udfff": 1}, {"huge": 2**64}, {"small": -(2**63) - 1}])
def test_values_to_json_refuses_are_refused_by_the_rows_encode(module, value):
    with pytest.raises(type(_raised(lambda: to_json(value)))):
        to_json(value)
    records = _values(module, [_op(value)], [Outcome(Code.OK, {})])
    with pytest.raises(InvariantViolation, match="not JSON values"):
        idempotency_records.encode(records)


@_MODULES
def test_values_recorded_leave_out_what_the_texts_leave_out(module):
    batch = [_op({"points": i}, key=f"k{i}") for i in range(4)]
    outcomes = [
        Outcome(Code.OK, {"transaction_id": 1}),
        Outcome(Code.UNAVAILABLE, message="retry"),
        Outcome(Code.FAILED_PRECONDITION, recorded=False, message="suspended"),
        Outcome(Code.OK, {"transaction_id": 2}),  # a replay: its key is stored
    ]
    stored = {("m1", "k3"): object()}
    assert [_as_text(r) for r in _values(module, batch, outcomes, stored)] == _looped(batch, outcomes, stored)
    with pytest.raises(ValueError, match="1 outcomes for 2 operations"):
        _values(module, batch[:2], outcomes[:1])


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(_FLAT, min_size=1, max_size=5), fields=_FLAT)
def test_random_values_make_the_row_of_the_texts_or_are_refused(requests, fields):
    batch = [_op(request, key=f"k{i}") for i, request in enumerate(requests)]
    outcomes = [Outcome(Code.OK, fields) for _ in batch]
    for module in (fastpath._core, fastpath._reference):
        records = _values(module, batch, outcomes)
        try:
            expected = idempotency_records.encode(_looped(batch, outcomes, {}))
        except Exception:  # noqa: BLE001 - to_json refused a value: so must the row's encode
            with pytest.raises(InvariantViolation):
                idempotency_records.encode(records)
            continue
        assert idempotency_records.encode(records) == expected


def test_compiled_records_and_outcomes_that_cannot_be_in_a_cycle_are_left_untracked():
    # what the collector would walk after every apply and again in generation 1 until the batch is
    # written (loadtest/gc_survivors.py): a record of untracked values and an outcome of untracked
    # fields are referred to only by the batch's lists, and refer to nothing that could refer back
    flat, nested = {"member_id": "m", "points": 1}, {"originals": [{"transaction_id": "1"}]}
    assert not gc.is_tracked(flat) and gc.is_tracked(nested)
    batch = [_op(dict(flat), key=f"k{i}") for i in range(5)] + [_op(nested, key="k5")]
    outcomes = [
        Outcome(Code.OK, {"transaction_id": "7", "points": 1}),
        Outcome(Code.OK, {"vouchers": [1, 2]}),  # tracked fields: both stay tracked
        Outcome(Code.NOT_FOUND, message="no such member"),  # no response: untracked
        Outcome(Code.RESOURCE_EXHAUSTED, message="quota", quota=("merchant", "1 a second")),  # not recorded
        Outcome(Code.FAILED_PRECONDITION, recorded=False, message="suspended"),  # not recorded, untracked
        Outcome(Code.OK, {}),  # a tracked request: its record stays tracked
    ]
    assert all(gc.is_tracked(outcome) for outcome in outcomes)
    records = _values(fastpath._core, batch, outcomes)
    assert [gc.is_tracked(record) for record in records] == [False, True, False, True]
    assert [gc.is_tracked(outcome) for outcome in outcomes] == [False, True, False, True, False, False]
    gc.collect()  # nothing the records hold was freed under them
    assert [_as_text(record) for record in records] == _looped(batch, outcomes, {})
    assert outcomes[0].fields == {"transaction_id": "7", "points": 1} and outcomes[3].quota == (
        "merchant",
        "1 a second",
    )


def test_records_as_texts_leave_the_collector_alone():
    batch, outcomes = [_op({"points": 1})], [Outcome(Code.OK, {"transaction_id": "7"})]
    for module in (fastpath._core, fastpath._reference):
        _records((module, orjson.dumps, (JSON_OPTIONS, None)), batch, outcomes)
        assert gc.is_tracked(outcomes[0])
    _values(fastpath._reference, batch, outcomes)  # the twin has no call to untrack with
    assert gc.is_tracked(outcomes[0])


def test_as_texts_gives_the_records_as_the_texts_they_were():
    batch = [_op({"points": 1, "member_id": "m"}), _op({"b": 2}, key="k2")]
    outcomes = [Outcome(Code.OK, {"transaction_id": 7, "a": None}), Outcome(Code.NOT_FOUND, message="no")]
    texts = _looped(batch, outcomes, {})
    assert idempotency_records.as_texts(_values(fastpath._core, batch, outcomes)) == texts
    assert idempotency_records.as_texts(texts) == texts  # texts stay as they are
