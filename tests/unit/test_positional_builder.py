"""domain.positional_builder: the frozen dataclasses a kernel run builds per operation (MemberRules; the
per-earn records are compiled now, fastpath/records.pyx, tests/unit/test_records.py), built without their
__init__, are the same values as the constructor's."""

import dataclasses

import pytest

from processor import domain
from processor.program import MemberRules, SplitRecord, VoucherHold


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (MemberRules, ("merchant-1", None, True, "gold", 3, 1_200, ((20_000, 700), (20_001, 500)))),
        (MemberRules, (None, None, False, "", 0, 0, ())),
        (SplitRecord, ("member-1", "merchant-1", 3, 4, 1, 0)),
        (VoucherHold, ("member-1", "merchant-1", 3, 1, 2, 1_800_000_000_000_000, 1, None)),
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
        domain.positional_builder(MemberRules)(None, None)  # every field: no default is applied


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
