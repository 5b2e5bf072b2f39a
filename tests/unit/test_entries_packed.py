"""loadtest/entries_packed.py's packing: a batch's entries grouped into each transaction's legs in order,
the legs encoded as binary COPY array fields Postgres's array_recv reads, and those fields appended to
the right row of the transactions stream fastpath.copy_binary encodes."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from fastpath.copy_binary import CopyEncoder
from loadtest.entries_packed import (
    INT8_OID,
    LEGS_MAX,
    TEXT_OID,
    append_fields,
    array_field,
    legs_by_transaction,
    packed_fields,
)


def read_array(field: bytes, at: int = 0) -> tuple[list[Any] | None, int]:
    """(the array's elements or None for NULL, the offset after the field)."""
    (length,) = struct.unpack_from("!i", field, at)
    if length == -1:
        return None, at + 4
    ndim, nulls, oid, count, lower = struct.unpack_from("!iiiii", field, at + 4)
    assert (ndim, nulls, lower) == (1, 0, 1)
    values: list[Any] = []
    p = at + 24
    for _ in range(count):
        (size,) = struct.unpack_from("!i", field, p)
        raw = field[p + 4 : p + 4 + size]
        values.append(struct.unpack("!q", raw)[0] if oid == INT8_OID else raw.decode())
        p += 4 + size
    assert p == at + 4 + length
    return values, p


def test_legs_keep_each_transactions_entries_in_order_and_name_assets_only_when_not_all_points() -> None:
    legs = legs_by_transaction([(7, 100, -50), (8, 101, 20), (7, 102, 50), (8, 103, -5, "VOUCHERS"), (8, 104, -15)])
    assert legs[7] == ([100, 102], [-50, 50], None)
    assert legs[8] == ([101, 103, 104], [20, -5, -15], ["POINTS", "VOUCHERS", "POINTS"])


def test_a_transaction_with_too_many_legs_for_the_synthetic_entry_id_is_refused() -> None:
    with pytest.raises(ValueError, match="legs"):
        legs_by_transaction([(1, a, 1) for a in range(LEGS_MAX)])


def test_array_fields_decode_to_their_values_and_none_is_null() -> None:
    assert read_array(array_field([3, -(2**63), 2**63 - 1], INT8_OID))[0] == [3, -(2**63), 2**63 - 1]
    assert read_array(array_field(["POINTS", "VOUCHERS"], TEXT_OID))[0] == ["POINTS", "VOUCHERS"]
    assert read_array(array_field(None, INT8_OID)) == (None, 4)


def test_the_leg_fields_go_to_the_row_of_their_transaction_and_rows_without_legs_get_nulls() -> None:
    stream = CopyEncoder("transactions", (("transaction_id", "bigint", 0), ("amount", "bigint", 1)))
    stream.add([(7, 500), (8, 20), (9, 0)])
    legs = legs_by_transaction([(8, 201, 20), (8, 202, -20), (7, 100, -500), (7, 101, 500)])
    out = append_fields(stream.finish(), {t: packed_fields(v) for t, v in legs.items()}, 3, packed_fields(None))
    rows = {}
    at = 19
    while struct.unpack_from("!h", out, at)[0] != -1:
        assert struct.unpack_from("!h", out, at)[0] == 5
        transaction_id, amount = struct.unpack_from("!iqiq", out, at + 2)[1::2]
        at += 2 + 24
        columns = []
        for _ in range(3):
            values, at = read_array(out, at)
            columns.append(values)
        rows[transaction_id] = (amount, *columns)
    assert out[at:] == b"\xff\xff"
    assert rows == {
        7: (500, [100, 101], [-500, 500], None),
        8: (20, [201, 202], [20, -20], None),
        9: (0, None, None, None),
    }
