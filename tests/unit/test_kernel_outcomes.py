"""The outcomes the compiled rows build in C (fastpath/_core.pyx: _outcome, slots filled without the
dataclass's __init__) are the Outcome the __init__ makes: every field, equality, its repr, copies, and
a class whose slots the compiled module does not know is refused."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

import fastpath
from loadtest import bench_state_machine as bench
from processor import rules_kernel
from processor.domain import Code, Outcome


def _kernel_outcomes() -> list[Outcome]:
    machine = bench.machine(True, 500, 10)
    outcomes: list[Outcome] = []
    for i, batch in enumerate(bench.batches(2, 500, 10, seed=5)):
        decided, _ = machine.apply(batch, {}, bench.NOW_US + i * 1_000_000)
        machine.commit()
        outcomes += decided
    return outcomes


def test_kernel_outcomes_are_the_dataclass_with_every_default():
    outcomes = [outcome for outcome in _kernel_outcomes() if outcome.code is Code.OK]
    assert len(outcomes) > 1_000 and fastpath.IMPLEMENTATION == "cython"
    for outcome in outcomes:
        made = Outcome(Code.OK, dict(outcome.fields))
        assert type(outcome) is Outcome
        assert outcome == made and repr(outcome) == repr(made)
        for field in dataclasses.fields(Outcome):
            assert getattr(outcome, field.name) == getattr(made, field.name), field.name
        assert pickle.loads(pickle.dumps(outcome)) == made
        assert copy.copy(outcome) == made
        changed = dataclasses.replace(outcome, message="x")
        assert changed.message == "x" and changed.fields == outcome.fields


@dataclasses.dataclass(slots=True)
class _Other:
    code: Code
    fields: dict = dataclasses.field(default_factory=dict)
    message: str = ""


def test_an_outcome_class_of_other_slots_is_refused():
    machine = bench.machine(True, 2_000, 2)  # account ids for the members of both applies
    original = rules_kernel._CLASSES
    rules_kernel._CLASSES = (_Other, *original[1:])
    try:
        with pytest.raises(TypeError, match="slots"):
            machine.apply(bench.batches(1, 50, 2, seed=1)[0], {}, bench.NOW_US)
    finally:
        rules_kernel._CLASSES = original
    # the batch was rolled back (apply's undo): the same batch applies with the real class
    outcomes, _ = machine.apply(bench.batches(1, 50, 2, seed=1)[0], {}, bench.NOW_US)
    assert all(type(outcome) is Outcome for outcome in outcomes)
