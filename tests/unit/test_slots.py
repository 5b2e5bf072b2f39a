"""fastpath/slots.pxd, the one way the compiled modules build and read slots dataclasses by their member
descriptors' offsets: a class whose fields are not the ones a builder stores is refused where its layout
is read, with a message naming the field (through Intake, which builds Operations); a reader answers
exactly what getattr answers, for the class it laid out (by offset) and for any other (by getattr: a
subclass, a plain object, an unset slot, a class with its own __getattribute__), through
Ledger.idempotency_records, which reads Operation and Outcome by offset."""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any

import pytest

import fastpath
from processor.domain import Code, Method, Operation, Outcome
from processor.state_machine import NOT_RECORDED

pytestmark = pytest.mark.skipif(fastpath.IMPLEMENTATION != "cython", reason="the compiled fast path is not in use")

_LIMITS = types.SimpleNamespace(
    purchase_amount_max=10**6, points_max=10**5, id_bytes_max=64, idempotency_key_bytes_max=64
)


def _intake(operation: type) -> Any:
    from fastpath.intake import OPERATION_FIELDS, Intake

    assert OPERATION_FIELDS == [field.name for field in dataclasses.fields(Operation)]
    return Intake(operation, Method.EARN, Method.REDEEM, _LIMITS, None, None, None)


def _operation_class(names: list[str], **options: Any) -> type:
    return dataclasses.make_dataclass("Operation", [(name, object, None) for name in names], **options)


def test_an_intake_builds_operations_of_a_class_with_the_twenty_slots():
    from fastpath.intake import OPERATION_FIELDS

    _intake(Operation)
    _intake(_operation_class(OPERATION_FIELDS, slots=True))  # the same layout, another class: accepted


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda names: [names[0], names[2], names[1], *names[3:]], "field 1 is 'merchant_slot' where"),
        (lambda names: names[:-1], "field 19 is missing where"),
        (lambda names: [*names, "extra"], "field 20 is 'extra' where"),
        (lambda names: [("renamed" if name == "points" else name) for name in names], "field 6 is 'renamed'"),
    ],
)
def test_an_intake_refuses_a_class_of_other_fields_naming_the_first(change, message):
    from fastpath.intake import OPERATION_FIELDS

    with pytest.raises(ImportError, match=message) as refused:
        _intake(_operation_class(change(list(OPERATION_FIELDS)), slots=True))
    assert "update fastpath/intake.pyx's OPERATION_FIELDS" in str(refused.value)


def test_an_intake_refuses_fields_that_are_not_slots_or_a_post_init():
    from fastpath.intake import OPERATION_FIELDS

    with pytest.raises(ImportError, match=r"Operation.method is not a slot of its own"):
        _intake(_operation_class(OPERATION_FIELDS))  # a dataclass without slots=True
    with pytest.raises(ImportError, match="__post_init__"):
        _intake(_operation_class(OPERATION_FIELDS, slots=True, namespace={"__post_init__": lambda self: None}))
    with pytest.raises(ImportError, match="not a slots dataclass"):
        _intake(type("Operation", (), {"__slots__": tuple(OPERATION_FIELDS)}))  # slots, but no dataclass


def _records(batch: list[Any], outcomes: list[Any]) -> list[tuple[Any, ...]]:
    records: list[tuple[Any, ...]] = []
    fastpath.Ledger.idempotency_records(batch, outcomes, {}, NOT_RECORDED, Code.OK, json.dumps, records)
    return records


def _batch(count: int) -> tuple[list[Operation], list[Outcome]]:
    batch = [
        Operation(Method.EARN, f"shop-{i % 3}", i % 3, f"key-{i}", {"member_id": f"m-{i}", "purchase_amount": i})
        for i in range(count)
    ]
    outcomes = [
        Outcome(Code.OK, {"points": i}) if i % 4 else Outcome(Code.NOT_FOUND, message=f"no member m-{i}")
        for i in range(count)
    ]
    return batch, outcomes


@dataclasses.dataclass
class _PlainOperation(Operation):  # a subclass: its own type, so read by getattr
    pass


class _Loud:
    """A slots class that reads its attributes its own way: never read by offset."""

    __slots__ = ("code", "fields", "message", "replayed", "recorded")

    def __init__(self, outcome: Outcome) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(outcome, name))

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        return value.upper() if name == "message" else value


def test_reads_by_offset_answer_what_getattr_answers_for_any_class():
    batch, outcomes = _batch(12)
    expected = [
        (
            op.merchant_id,
            op.idempotency_key,
            op.method.value,
            json.dumps(op.request),
            outcome.code.value,
            json.dumps(outcome.fields) if outcome.code is Code.OK else None,
            outcome.message,
        )
        for op, outcome in zip(batch, outcomes)
    ]
    assert _records(batch, outcomes) == expected
    # other classes, alternating with the laid-out ones in one batch: each read as getattr reads it
    mixed_batch: list[Any] = list(batch)
    mixed_outcomes: list[Any] = list(outcomes)
    for i in range(0, 12, 3):
        mixed_batch[i] = _PlainOperation(*(getattr(batch[i], f.name) for f in dataclasses.fields(Operation)))
        mixed_outcomes[i] = types.SimpleNamespace(
            **{f.name: getattr(outcomes[i], f.name) for f in dataclasses.fields(Outcome)}
        )
    for i in range(1, 12, 3):
        mixed_batch[i] = types.SimpleNamespace(
            **{f.name: getattr(batch[i], f.name) for f in dataclasses.fields(Operation)}
        )
    assert _records(mixed_batch, mixed_outcomes) == expected
    assert _records(batch, outcomes) == expected  # and the real classes again, after the others
    loud = [_Loud(outcome) for outcome in outcomes]
    assert _records(batch, loud) == [(*record[:6], record[6].upper()) for record in expected]


def test_an_unset_slot_raises_getattrs_error():
    batch, outcomes = _batch(2)
    unset = Outcome.__new__(Outcome)  # no __init__: every slot unset
    unset.code = Code.OK
    unset.recorded = True
    unset.fields = {}
    with pytest.raises(AttributeError, match="'Outcome' object has no attribute 'message'"):
        _records(batch, [outcomes[0], unset])
    half = Operation.__new__(Operation)
    half.merchant_id = "shop-0"
    with pytest.raises(AttributeError, match="'Operation' object has no attribute 'idempotency_key'"):
        _records([batch[0], half], outcomes)
    assert len(_records(batch, outcomes)) == 2  # and the reader still reads the set ones
