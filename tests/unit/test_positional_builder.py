"""domain.positional_builder: a frozen slots dataclass built without its __init__ is the same value as the
constructor's. (The values a kernel run builds per operation, which it was made for, are compiled now:
fastpath/records.pyx, tests/unit/test_records.py.)"""

import dataclasses

import pytest

from processor import domain
from processor.program import SplitRecord, VoucherHold


@pytest.mark.parametrize(
    ("cls", "values"),
    [
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
        domain.positional_builder(SplitRecord)("member-1", "merchant-1", 3, 4, 1)  # no default is applied


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
