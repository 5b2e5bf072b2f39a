"""The binary COPY encoder (fastpath/copy_binary.pyx) without a database: its bytes are those of a
struct-based encoder written from PostgreSQL's documentation of the format; timestamps are microseconds
since 2000-01-01 UTC for any aware datetime; a value its column cannot take raises naming the table, the
column and the row, and leaves no partial tuple behind. Postgres reading the stream back is
tests/integration/test_copy_binary.py."""

from __future__ import annotations

import datetime as dt
import re
import struct
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.copy_binary import CONSTANT, LEG_ACCOUNTS, LEG_AMOUNTS, LEG_ASSETS, LOOKUP, CopyEncoder

ROOT = pathlib.Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc
POSTGRES_EPOCH = dt.datetime(2000, 1, 1, tzinfo=UTC)
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)


def field(type_name: str, value) -> bytes:
    """One field as PostgreSQL's binary COPY wants it (the reference the encoder is compared with)."""
    if value is None:
        return struct.pack("!i", -1)
    if type_name == "smallint":
        return struct.pack("!ih", 2, value)
    if type_name == "integer":
        return struct.pack("!ii", 4, value)
    if type_name == "bigint":
        return struct.pack("!iq", 8, value)
    if type_name == "text":
        data = value.encode()
        return struct.pack("!i", len(data)) + data
    if type_name == "jsonb":
        data = b"\x01" + value.encode()
        return struct.pack("!i", len(data)) + data
    if type_name == "json":  # the text alone: json_recv takes no version byte
        data = value.encode()
        return struct.pack("!i", len(data)) + data
    if type_name == "bytea":
        return struct.pack("!i", len(value)) + bytes(value)
    if type_name == "timestamptz":
        return struct.pack("!iq", 8, (value - POSTGRES_EPOCH) // dt.timedelta(microseconds=1))
    if type_name == "bigint[]":  # array_send: dimensions, has-nulls, int8's oid, (length, lower bound), fields
        items = list(value)
        data = struct.pack("!iii", 1 if items else 0, 0, 20)
        if items:
            data += struct.pack("!ii", len(items), 1) + b"".join(struct.pack("!iq", 8, v) for v in items)
        return struct.pack("!i", len(data)) + data
    if type_name == "text[]":  # array_send with text's oid (25), each element its UTF-8 bytes
        encoded = [v.encode() for v in value]
        data = struct.pack("!iii", 1 if encoded else 0, 0, 25)
        if encoded:
            data += struct.pack("!ii", len(encoded), 1) + b"".join(struct.pack("!i", len(e)) + e for e in encoded)
        return struct.pack("!i", len(data)) + data
    raise AssertionError(type_name)


def reference(types: list[str], rows: list[tuple]) -> bytes:
    body = b"".join(struct.pack("!h", len(types)) + b"".join(field(t, v) for t, v in zip(types, row)) for row in rows)
    return HEADER + body + TRAILER


ALL = [
    ("a", "smallint"),
    ("b", "integer"),
    ("c", "bigint"),
    ("d", "text"),
    ("e", "jsonb"),
    ("f", "bytea"),
    ("g", "timestamptz"),
    ("h", "json"),
]


def encoder(columns=ALL) -> CopyEncoder:
    return CopyEncoder("t", [(name, type_name, i) for i, (name, type_name) in enumerate(columns)])


def test_rows_are_the_formats_bytes():
    rows = [
        (-32768, -(2**31), -(2**63), "", "{}", b"", dt.datetime(2000, 1, 1, tzinfo=UTC), "{}"),
        (
            32767,
            2**31 - 1,
            2**63 - 1,
            "é🔑\x7f",
            '{"a": "é"}',
            b"\x00\xff",
            dt.datetime(1, 1, 1, tzinfo=UTC),
            '{"a":"é"}',
        ),
        (None, None, None, None, None, None, None, None),
        (
            True,
            0,
            1,
            "x",
            "null",
            bytearray(b"ab"),
            dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            "[1, 2]",
        ),
    ]
    stream = encoder()
    stream.add(rows)
    assert bytes(stream.finish()) == reference([t for _, t in ALL], rows)
    assert stream.rows == 4 and stream.names == tuple(name for name, _ in ALL)


def test_a_bigint_array_is_array_sends_bytes():
    import array

    rows = [
        (1, []),
        (2, [7]),
        (3, (-(2**63), 2**63 - 1, 0, -1)),
        (4, array.array("q", [5, -5, 123_456_789_012])),
        (5, None),
        (6, [True, False]),
    ]
    stream = CopyEncoder("transactions", [("id", "bigint", 0), ("legs", "bigint[]", 1)])
    stream.add(rows)
    assert bytes(stream.finish()) == reference(["bigint", "bigint[]"], rows)


@pytest.mark.parametrize(
    "value, error, says",
    [
        ("12", TypeError, "a list, tuple or array of ints"),
        ({1: 2}, TypeError, "a list, tuple or array of ints"),
        (7, TypeError, "a list, tuple or array of ints"),
        ([1, 2.5], TypeError, "ints only (element 1 is float)"),
        ([None], TypeError, "ints only (element 0 is NoneType)"),
        ([0, 2**63], ValueError, "ints in range (element 1)"),
    ],
)
def test_a_bigint_array_of_the_wrong_shape_raises_and_leaves_no_partial_row(value, error, says):
    stream = CopyEncoder("transactions", [("id", "bigint", 0), ("legs", "bigint[]", 1)])
    with pytest.raises(error, match=r"COPY transactions\.legs, row 1 of the rows given: .*" + re.escape(says)):
        stream.add([(1, [1]), (2, value)])
    assert stream.rows == 1
    assert bytes(stream.finish()) == reference(["bigint", "bigint[]"], [(1, [1])])


def test_a_text_array_is_array_sends_bytes():
    rows = [(1, []), (2, ["POINTS"]), (3, ("VOUCHERS", "POINTS", "", "caf\u00e9 \u2713")), (4, None)]
    stream = CopyEncoder("transactions", [("id", "bigint", 0), ("assets", "text[]", 1)])
    stream.add(rows)
    assert bytes(stream.finish()) == reference(["bigint", "text[]"], rows)


@pytest.mark.parametrize(
    "value, error, says",
    [
        ("POINTS", TypeError, "a list or tuple of strs"),
        ({"a": 1}, TypeError, "a list or tuple of strs"),
        (7, TypeError, "a list or tuple of strs"),
        (["POINTS", 2], TypeError, "strs only (element 1 is int)"),
        ([None], TypeError, "strs only (element 0 is NoneType)"),
        ([b"POINTS"], TypeError, "strs only (element 0 is bytes)"),
    ],
)
def test_a_text_array_of_the_wrong_shape_raises_and_leaves_no_partial_row(value, error, says):
    stream = CopyEncoder("transactions", [("id", "bigint", 0), ("assets", "text[]", 1)])
    with pytest.raises(error, match=r"COPY transactions\.assets, row 1 of the rows given: .*" + re.escape(says)):
        stream.add([(1, ["POINTS"]), (2, value)])
    assert stream.rows == 1
    assert bytes(stream.finish()) == reference(["bigint", "text[]"], [(1, ["POINTS"])])


def test_no_rows_is_a_header_and_a_trailer():
    assert bytes(encoder().finish()) == HEADER + TRAILER


def test_finish_returns_a_buffer_not_bytes():
    # asyncpg's copy_to_table takes bytes (os.fspath accepts them) for the path of a file to read
    assert isinstance(encoder().finish(), memoryview)


OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda minutes: dt.timezone(dt.timedelta(minutes=minutes)))


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=OFFSETS))
def test_a_timestamp_is_microseconds_since_2000_utc(moment):
    stream = CopyEncoder("t", [("at", "timestamptz", 0)])
    stream.add([(moment,)])
    micros = (moment - POSTGRES_EPOCH) // dt.timedelta(microseconds=1)
    assert bytes(stream.finish()) == HEADER + struct.pack("!hiq", 1, 8, micros) + TRAILER


def test_a_zone_with_daylight_saving_time_uses_the_instants_offset():
    zoneinfo = pytest.importorskip("zoneinfo")
    new_york = zoneinfo.ZoneInfo("America/New_York")
    moments = [dt.datetime(2026, 11, 1, 1, 30, fold=fold, tzinfo=new_york) for fold in (0, 1)]
    stream = CopyEncoder("t", [("at", "timestamptz", 0)])
    stream.add([(m,) for m in moments])
    assert bytes(stream.finish()) == reference(["timestamptz"], [(m,) for m in moments])
    assert moments[1] - moments[0] == dt.timedelta(0)  # naive arithmetic; the instants are an hour apart:
    assert moments[1].astimezone(UTC) - moments[0].astimezone(UTC) == dt.timedelta(hours=1)


def test_constants_defaults_and_lookups():
    at = dt.datetime(2026, 12, 5, 1, 2, 3, 4, tzinfo=UTC)
    stream = CopyEncoder(
        "t",
        [
            ("id", "bigint", 0),
            ("asset", "text", CONSTANT),
            ("version", "integer", 1),
            ("after", "bigint", LOOKUP),
            ("at", "timestamptz", CONSTANT),
        ],
    )
    stream.add([(1,), (2, 7), (3,)], {"asset": "POINTS", "version": None, "at": at}, lookup={1: -5, 3: 9})
    stream.add([[4, 8]], {"asset": "VOUCHERS", "at": at}, lookup={})
    types = ["bigint", "text", "integer", "bigint", "timestamptz"]
    expected = [
        (1, "POINTS", None, -5, at),
        (2, "POINTS", 7, None, at),
        (3, "POINTS", None, 9, at),
        (4, "VOUCHERS", 8, None, at),
    ]
    assert bytes(stream.finish()) == reference(types, expected)


@pytest.mark.parametrize(
    ("type_name", "value", "error", "says"),
    [
        ("bigint", 1.5, TypeError, "float 1.5 cannot be written as bigint"),
        ("bigint", "1", TypeError, "str '1' cannot be written as bigint"),
        ("bigint", 2**63, ValueError, "an int in range"),
        ("bigint", -(2**63) - 1, ValueError, "an int in range"),
        ("integer", 2**31, ValueError, "an int in range"),
        ("smallint", -32769, ValueError, "an int in range"),
        ("text", 1, TypeError, "int 1 cannot be written as text"),
        ("text", b"x", TypeError, "a str"),
        ("text", "\ud800", ValueError, "not valid Unicode"),
        ("jsonb", {"a": 1}, TypeError, "a str"),
        ("bytea", "x", TypeError, "bytes or a bytearray"),
        ("timestamptz", dt.datetime(2026, 1, 1), ValueError, "naive"),
        ("timestamptz", dt.date(2026, 1, 1), TypeError, "a datetime with a tzinfo"),
        ("timestamptz", 1_800_000_000_000_000, TypeError, "a datetime with a tzinfo"),
    ],
)
def test_a_value_of_the_wrong_type_raises_and_leaves_no_partial_row(type_name, value, error, says):
    stream = CopyEncoder("accounts", [("id", "bigint", 0), ("v", type_name, 1)])
    stream.add([(1, None)])
    with pytest.raises(
        error, match="COPY accounts.v, row 1 of the rows given: .*" + says.replace("(", r"\(").replace(".", r"\.")
    ):
        stream.add([(2, None), (3, value), (4, None)])
    # the rows before the bad one are in, the bad one is not: the stream is whole tuples only
    assert stream.rows == 2
    assert bytes(stream.finish()) == reference(["bigint", type_name], [(1, None), (2, None)])


def test_a_bad_constant_raises_before_any_row_is_written():
    stream = CopyEncoder("holds", [("id", "bigint", 0), ("at", "timestamptz", CONSTANT)])
    with pytest.raises(ValueError, match="COPY holds.at, the value given for every row: .*naive"):
        stream.add([(1,)], {"at": dt.datetime(2026, 1, 1)})
    assert stream.rows == 0 and bytes(stream.finish()) == HEADER + TRAILER


@pytest.mark.parametrize(
    ("columns", "add", "error", "says"),
    [
        ([("a", "numeric", 0)], None, ValueError, "type 'numeric' cannot be encoded"),
        ([("a", "bigint", -6)], None, ValueError, "not a row index"),
        ([("a", "bigint", CONSTANT)], {"rows": [(1,)]}, ValueError, "CONSTANT column needs its value"),
        ([("a", "bigint", 0)], {"rows": [(1,)], "values": {"b": 1}}, ValueError, "does not have: \\['b'\\]"),
        ([("a", "bigint", 1)], {"rows": [(1,)]}, IndexError, "the row has 1 items, none at 1"),
        ([("a", "bigint", LOOKUP)], {"rows": [(1,)]}, ValueError, "needs add\\(lookup=...\\)"),
        ([("a", "bigint", 0)], {"rows": [1]}, TypeError, "a row must be a tuple or a list"),
    ],
)
def test_a_misuse_says_what_is_wrong(columns, add, error, says):
    with pytest.raises(error, match=says):
        stream = CopyEncoder("t", columns)
        stream.add(**add)


def test_add_after_finish_is_refused():
    stream = encoder()
    stream.finish()
    with pytest.raises(ValueError, match="after finish"):
        stream.add([])
    assert bytes(stream.finish()) == HEADER + TRAILER  # finishing twice: one trailer


LEG_COLUMNS = [
    ("id", "bigint", 0),
    ("accounts", "bigint[]", LEG_ACCOUNTS),
    ("amounts", "bigint[]", LEG_AMOUNTS),
    ("assets", "text[]", LEG_ASSETS),
]
LEG_TYPES = ["bigint", "bigint[]", "bigint[]", "text[]"]


def test_legs_are_grouped_by_transaction_in_their_order_whatever_the_entries_order():
    entries = [(2, 20, 5), (1, 12, -7), (2, 21, -5), (1, 11, 7), (3, 30, 1, "VOUCHERS"), (3, 31, -1, "VOUCHERS")]
    entries += [(4, 40, 2), (4, 41, -2, "POINTS"), (5, 50, 3), (5, 51, -3, "VOUCHERS")]
    stream = CopyEncoder("transactions", LEG_COLUMNS)
    stream.add([(1,), (2,), (3,), (4,), (5,), (6,)], {"accounts": (), "amounts": ()}, legs=entries)
    assert bytes(stream.finish()) == reference(
        LEG_TYPES,
        [
            (1, [12, 11], [-7, 7], None),  # the entries' order, not the accounts'
            (2, [20, 21], [5, -5], None),
            (3, [30, 31], [1, -1], ["VOUCHERS", "VOUCHERS"]),
            (4, [40, 41], [2, -2], None),  # every leg POINTS, named or not: NULL
            (5, [50, 51], [3, -3], ["POINTS", "VOUCHERS"]),
            (6, [], [], None),  # no legs: the values given (assets: none given, NULL)
        ],
    )


def test_legs_in_the_rows_order_are_walked_and_give_the_same_bytes_as_grouped():
    """The state machine's order (a transaction's entries together, in the rows' order) takes the walk with
    no dict; rows with no legs between them keep theirs empty."""
    rows = [(1,), (2,), (3,), (4,)]
    entries = [(1, 11, 7), (1, 12, -7), (3, 30, 1, "VOUCHERS"), (3, 31, -1), (4, 40, 2), (4, 41, -2)]
    walked = CopyEncoder("transactions", LEG_COLUMNS)
    walked.add(rows, {"accounts": (), "amounts": ()}, legs=entries)
    # the same legs in another order: grouped in a dict
    grouped = CopyEncoder("transactions", LEG_COLUMNS)
    grouped.add(rows, {"accounts": (), "amounts": ()}, legs=[entries[4], *entries[:4], entries[5]])
    expected = reference(
        LEG_TYPES,
        [
            (1, [11, 12], [7, -7], None),
            (2, [], [], None),
            (3, [30, 31], [1, -1], ["VOUCHERS", "POINTS"]),
            (4, [40, 41], [2, -2], None),
        ],
    )
    assert bytes(walked.finish()) == expected
    assert bytes(grouped.finish()) == expected


def test_legs_of_a_transaction_not_among_the_rows_are_refused():
    stream = CopyEncoder("transactions", LEG_COLUMNS)
    with pytest.raises(ValueError, match=r"legs of transactions \[9\] are not among the rows given"):
        stream.add([(1,)], legs=[(1, 10, 1), (9, 90, -1), (1, 11, -1)])


def test_a_leg_that_is_not_an_int_raises_and_leaves_no_partial_row():
    stream = CopyEncoder("transactions", LEG_COLUMNS)
    stream.add([(1,)], legs=[(1, 10, 1), (1, 11, -1)])
    with pytest.raises(TypeError, match=r"COPY transactions\.amounts, row 0 of the rows given: .*leg 1 has a str"):
        stream.add([(2,)], legs=[(2, 20, 1), (2, 21, "x")])
    assert stream.rows == 1
    assert bytes(stream.finish()) == reference(LEG_TYPES, [(1, [10, 11], [1, -1], None)])


def test_a_leg_column_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="a LEG_\\* column is bigint"):
        CopyEncoder("transactions", [("id", "bigint", 0), ("accounts", "text[]", LEG_ACCOUNTS)])
