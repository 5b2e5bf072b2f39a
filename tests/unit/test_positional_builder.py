"""domain.positional_builder: the frozen dataclasses a kernel run builds per operation, built without
their __init__, are the same values as the constructor's."""

import dataclasses

import pytest

from processor import domain, rules
from processor.program import EarnRecord


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (rules.Lot, (7, 120, 1_800_000_000_000_000, "merchant-1")),
        (rules.Lot, (-1, 5, None, "")),
        (rules.Earn, (100, 20, ())),
        (EarnRecord, ("member-1", "merchant-1", 2, rules.Earn(100, 20), "merchant-9", 15, 0, 1_800_000_000_000_000)),
    ],
)
def test_a_built_value_equals_the_constructors(cls, values):
    built = domain.positional_builder(cls)(*values)
    made = cls(*values)
    assert type(built) is cls
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    assert dataclasses.astuple(built) == dataclasses.astuple(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.__setattr__(dataclasses.fields(cls)[0].name, 0)


def test_every_field_is_required():
    with pytest.raises(TypeError):
        domain.positional_builder(rules.Earn)(100, 20)  # grants too: no default is applied


def test_a_class_it_cannot_build_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Unslotted:
        value: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            raise ValueError

    for cls in (Unslotted, Checked):
        with pytest.raises(TypeError):
            domain.positional_builder(cls)
