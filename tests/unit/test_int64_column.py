"""Ledger.int64_column: the state machine's columns as int64 arrays, made in C; equal to
array.array("q", values) in both implementations, and refusing what is not an int64 integer."""

from __future__ import annotations

import array
import operator

import pytest

import fastpath._core
import fastpath._reference


@pytest.fixture(params=[fastpath._core, fastpath._reference], ids=["cython", "python"])
def impl(request):
    return request.param


class _Index:
    def __index__(self) -> int:
        return 7


@pytest.mark.parametrize(
    "values",
    [[], [0], [1, -1, 2**63 - 1, -(2**63)], (3, 4, 5), range(-3, 40), map(operator.neg, [1, 2, 3]), [True, False]],
    ids=["empty", "one", "bounds", "tuple", "range", "map", "bools"],
)
def test_a_column_is_the_array_of_its_values(impl, values):
    values = list(values)
    column = impl.Ledger.int64_column(iter(values) if len(values) % 2 else values)
    assert type(column) is array.array and column.typecode == "q"
    assert column == array.array("q", values)
    column.append(1)  # a new array of its own, growable as any
    assert len(column) == len(values) + 1


def test_an_item_with_index_is_taken_as_its_integer(impl):
    assert impl.Ledger.int64_column([_Index(), 1]) == array.array("q", [7, 1])


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ([1.5], TypeError),
        (["1"], TypeError),
        ([None], TypeError),
        ([2**63], OverflowError),
        ([-(2**63) - 1], OverflowError),
    ],
)
def test_what_is_not_an_int64_integer_is_refused(impl, values, error):
    with pytest.raises(error):
        impl.Ledger.int64_column([0, *values])
