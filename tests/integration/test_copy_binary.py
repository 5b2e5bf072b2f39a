"""The binary COPY encoder (fastpath/copy_binary.pyx) on a real Postgres: edge values round-trip through
`COPY ... FROM STDIN (FORMAT binary)`; the store's declared column types are the catalog's; and the rows
Store._write_many (the rules' rows included) writes through it are exactly those the code before it wrote
through asyncpg's copy_records_to_table (that code kept verbatim in reference_writers_de874fc.txt),
for the state machine's own batches, with and without the program, and for a batch of edge values."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import pathlib
import zoneinfo

import asyncpg
import pytest

from fastpath.copy_binary import CONSTANT, CopyEncoder
from loadtest.bench_state_machine import NOW_US, batches, machine
from loadtest.copy_write import store_with_writers
from processor import events, idempotency_records, rules, store
from processor.program import EarnRecord, RulesWrite, SplitRecord
from processor.store import COPY_COLUMNS, NEVER_US, BatchWrite, Store
from tests.harness import migrate, run
from tests.integration.helpers import table_contents

ROOT = pathlib.Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# the tables _write_many writes, with the columns that order their rows (idempotency_keys: a view since
# migration 0023 over the batches' idempotency_batches rows, which the log append writes: write_all below)
TABLES = {
    "members": "member_id",
    "accounts": "account_id",
    "transactions": "transaction_id",
    "entries": "entry_id",
    "holds": "authorization_id",
    "idempotency_keys": "merchant_id, idempotency_key",
    "member_programs": "member_id",
    "lots": "member_id, lot_id, expires_at_us",
    "lot_consumptions": "owner_kind, owner_id, lot_id, expires_at_us",
    "earn_rules": "transaction_id",
    "split_tenders": "transaction_id",
    "tier_events": "transaction_id, member_id",
}


async def through_migration(url: str, through: int) -> None:
    """The migrations up to `through`, recorded as store.migrate records them (it applies the rest)."""
    c = await asyncpg.connect(url)
    try:
        await c.execute(
            """CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                               applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        for path in sorted(store.MIGRATIONS.glob("*.sql")):
            version = int(path.name.split("_", 1)[0])
            if version <= through:
                await c.execute(path.read_text())
                await c.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name)
    finally:
        await c.close()


def migrated(create_database) -> str:
    return migrate(create_database())


def old_store() -> type[Store]:
    """The writers before the encoder (copy_records_to_table), kept verbatim beside this test."""
    source = (pathlib.Path(__file__).parent / "reference_writers_de874fc.txt").read_text()
    return store_with_writers(source, "reference_writers_de874fc.txt")


async def write_all(url: str, writer: Store, writes: list[list[BatchWrite]], records: bool = False) -> None:
    """The batches' rows as _write_many writes them; with `records`, their idempotency records' rows too,
    as the batch log's append writes them (processor/batch_log.py: _write_many writes none since 0023)."""
    c = await asyncpg.connect(url)
    try:
        batch_id = 0
        for group in writes:
            async with c.transaction():
                await writer._write_many(c, group, 30.0, lambda _step: None)
                for write in group if records else ():
                    batch_id += 1
                    row = idempotency_records.encode(write.idempotency)
                    if row is not None:
                        await c.execute(
                            """INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
                               VALUES ($1, $2, $3, $4, $5)""",
                            batch_id,
                            write.created_at,
                            *row,
                        )
    finally:
        await c.close()


async def contents(url: str) -> dict[str, list[tuple]]:
    return await table_contents(url, TABLES)


async def migrate_rest(url: str) -> None:
    c = await asyncpg.connect(url)
    try:
        await store.migrate(c)
    finally:
        await c.close()


def same_rows_both_ways(create_database, writes: list[list[BatchWrite]]) -> dict[str, list[tuple]]:
    """The old writers wrote entries rows (before migration 0022): their database is migrated through
    0021, written, then migrated (0022 packs the entries into the rows); the new writers' rows, legs in
    the transactions COPY, must be the same, the entries view's included."""
    old, new = create_database(), migrated(create_database)
    run(through_migration(old, 21))
    base = old_store()
    # the old writers took the records' request and response as JSON texts
    old_writes = [
        [dataclasses.replace(w, idempotency=idempotency_records.as_texts(w.idempotency)) for w in group]
        for group in writes
    ]
    run(write_all(old, base.__new__(base), old_writes))
    run(migrate_rest(old))
    run(write_all(new, Store.__new__(Store), writes, records=True))
    expected, got = run(contents(old)), run(contents(new))
    for table in TABLES:
        assert got[table] == expected[table], f"{table}: the binary COPY wrote other rows than copy_records_to_table"
    return got


def state_machine_writes(program: bool, count: int) -> list[list[BatchWrite]]:
    m = machine(program, 2_000, 50)
    out = []
    for i, batch in enumerate(batches(count, 2_000, 50, seed=11)):
        _, write = m.apply(batch, {}, NOW_US + i * 1_000_000)
        write.member_balances_after = events.balances_after(write, m.ledger)  # as the pipeline does
        m.commit()
        out.append(write)
    # the first batch alone, then the others as one projection of several batches (one COPY each)
    return [out[:1], out[1:]]


@pytest.mark.timeout(240)
def test_program_batches_write_the_rows_the_old_path_wrote(create_database):
    got = same_rows_both_ways(create_database, state_machine_writes(True, 3))
    for table in ("transactions", "entries", "idempotency_keys", "lots", "earn_rules", "lot_consumptions"):
        assert got[table], f"the program's batches wrote no {table} rows: the comparison would prove nothing"
    assert any(row[-4] is not None for row in got["transactions"]), "no member_balance_after written"


@pytest.mark.timeout(240)
def test_plain_batches_write_the_rows_the_old_path_wrote(create_database):
    got = same_rows_both_ways(create_database, state_machine_writes(False, 2))
    assert len(got["idempotency_keys"]) == 2_000 and len(got["transactions"]) > 1_000
    assert any(row[-4] is not None for row in got["transactions"]), "no member_balance_after written"


def edge_batches() -> list[BatchWrite]:
    new_york = zoneinfo.ZoneInfo("America/New_York")
    first = BatchWrite(
        created_at=dt.datetime(2026, 12, 5, 12, 34, 56, 789_012, tzinfo=UTC),
        new_members=[("mémbre-ü", 9_000_000_000_000_001), ("m-2", 9_000_000_000_000_002)],
        transactions=[
            # the largest bigint; no program_version item (NULL); a member balance of its own
            (8_000_000_000_000_001, 1, "mérchant-€", "mémbre-ü", INT64_MAX, None, None, None, "clé-🔑", 0),
            (8_000_000_000_000_002, 2, "m", "m-2", 0, 12_345, 7, 8_000_000_000_000_001, "", 5, 3),
            (8_000_000_000_000_003, 31, "m", "m-2", 1, -1, INT64_MAX, None, "k", INT64_MAX, 2**31 - 1),
        ],
        entries=[
            (8_000_000_000_000_001, 9_000_000_000_000_001, INT64_MIN),
            (8_000_000_000_000_001, 9_000_000_000_000_002, INT64_MAX, "VOUCHERS"),
            (8_000_000_000_000_002, 9_000_000_000_000_002, -1),
        ],
        new_holds=[
            (
                7_000_000_000_000_001,
                "mérchant-€",
                "mémbre-ü",
                1,
                dt.datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
                "h-é",
            ),
            (
                7_000_000_000_000_002,
                "m",
                "m-2",
                INT64_MAX,
                dt.datetime(2027, 3, 14, 1, 59, 26, 535_897, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
                "h2",
            ),
            (7_000_000_000_000_003, "m", "m-2", 2, dt.datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=new_york), "h3"),
        ],
        idempotency=[
            (
                "mérchant-€",
                "clé-🔑",
                "Earn",
                json.dumps({"a": "é", "n": [1, 2.5, None], "big": INT64_MAX}, ensure_ascii=False),
                "OK",
                None,
                None,
            ),
            ("m", "", "Redeem", "{}", "FAILED_PRECONDITION", '{"x":{"y":"🔑"}}', "päid ✓ — try again"),
            ("m", "k", "Refund", "[]", "OK", "null", ""),
        ],
        member_balances_after={8_000_000_000_000_001: -5, 8_000_000_000_000_003: INT64_MAX},
        rules=RulesWrite(
            program_id="alliance",
            lots={"mémbre-ü": ([], [rules.Lot(8_000_000_000_000_001, 10, 1_900_000_000_000_000, "mérchant-€")])},
            new_lots={"mémbre-ü": {(8_000_000_000_000_001, 1_900_000_000_000_000)}},
            pieces={(2, 8_000_000_000_000_002): (rules.Lot(5, 3, None, "m"), rules.Lot(6, 4, -1, "ö"))},
            new_pieces={(2, 8_000_000_000_000_002)},
            earns={
                8_000_000_000_000_001: EarnRecord(
                    "mémbre-ü",
                    "mérchant-€",
                    1,
                    rules.Earn(7, 2, (rules.Grant("promo-é", "sponsor", 5),)),
                    None,
                    0,
                ),
                8_000_000_000_000_002: EarnRecord("m-2", "m", 1, rules.Earn(0), "acquirer", INT64_MAX),
            },
            new_earns={8_000_000_000_000_001, 8_000_000_000_000_002},
            tier_events=[(8_000_000_000_000_001, "mémbre-ü", "Bronze", "Silber-ß")],
            splits={8_000_000_000_000_003: SplitRecord("m-2", "m", 3, 4, 2, 1)},
            new_splits={8_000_000_000_000_003},
        ),
    )
    # a second batch of the same projection, created before 1970 (negative microseconds either epoch)
    second = BatchWrite(
        created_at=dt.datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC),
        transactions=[(8_000_000_000_000_004, 3, "m", "m-2", 9, None, None, None, "k4", 0)],
        entries=[(8_000_000_000_000_004, 9_000_000_000_000_002, 9)],
        idempotency=[("m", "k4", "Earn", '{"k":4}', "OK", "{}", None)],
    )
    return [first, second]


@pytest.mark.timeout(120)
def test_edge_values_write_the_rows_the_old_path_wrote(create_database):
    got = same_rows_both_ways(create_database, [edge_batches()])
    transactions = {row[0]: row for row in got["transactions"]}
    assert len(transactions) == 4
    # and they are the values given, not only the same in both
    first = transactions[8_000_000_000_000_001]
    assert first[2:4] == ("mérchant-€", "mémbre-ü") and first[5] == INT64_MAX
    assert first[11] == dt.datetime(2026, 12, 5, 12, 34, 56, 789_012, tzinfo=UTC)
    assert transactions[8_000_000_000_000_004][11] == dt.datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC)
    assert [row[-4] for row in got["transactions"]] == [-5, None, INT64_MAX, None]  # member_balance_after
    assert [row[-5] for row in got["transactions"]] == [None, 3, 2**31 - 1, None]  # program_version
    assert [row[-3:] for row in got["transactions"]][:2] == [
        ([9_000_000_000_000_001, 9_000_000_000_000_002], [INT64_MIN, INT64_MAX], ["POINTS", "VOUCHERS"]),
        ([9_000_000_000_000_002], [-1], None),
    ]  # the legs
    assert [(row[3], row[4]) for row in got["entries"]] == [
        ("POINTS", INT64_MIN),
        ("VOUCHERS", INT64_MAX),
        ("POINTS", -1),
        ("POINTS", 9),
    ]
    holds = {row[0]: row for row in got["holds"]}
    assert holds[7_000_000_000_000_001][6] == dt.datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert holds[7_000_000_000_000_002][6] == dt.datetime(2027, 3, 13, 20, 29, 26, 535_897, tzinfo=UTC)
    assert holds[7_000_000_000_000_003][6] == dt.datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # EST, the second 01:30
    keys = {(row[0], row[1]): row for row in got["idempotency_keys"]}
    assert json.loads(keys[("mérchant-€", "clé-🔑")][3]) == {"a": "é", "n": [1, 2.5, None], "big": INT64_MAX}
    # json since migration 0019: the text as sent (jsonb normalised it to '{"x": {"y": "🔑"}}')
    assert keys[("m", "")][5:7] == ('{"x":{"y":"🔑"}}', "päid ✓ — try again")
    # a response of JSON null and none at all are one value in a batch's records (migration 0023; the
    # service reads both as None, as Store.stored_outcomes did from the json column)
    assert keys[("m", "k")][5:7] == (None, "")
    assert keys[("mérchant-€", "clé-🔑")][5:7] == (None, None)
    assert got["lot_consumptions"] == [
        (2, 8_000_000_000_000_002, 5, NEVER_US, "m", 3),
        (2, 8_000_000_000_000_002, 6, -1, "ö", 4),
    ]
    assert json.loads(got["earn_rules"][0][6]) == [["promo-é", "sponsor", 5]] and got["earn_rules"][0][3] is None
    assert got["tier_events"][0][3:] == ("Silber-ß", dt.datetime(2026, 12, 5, 12, 34, 56, 789_012, tzinfo=UTC))
    assert got["split_tenders"] == [(8_000_000_000_000_003, "m-2", "m", 3, 4, 2, 1)]


def test_declared_column_types_are_the_catalogs(create_database):
    """Binary COPY does not cast: a column declared with another type than its own is refused by Postgres
    (or, int4 for int8, misread). Every COPY spec of the store against the migrated schema."""
    url = migrated(create_database)

    async def go():
        c = await asyncpg.connect(url)
        try:
            for table, columns in COPY_COLUMNS.items():
                types = dict(
                    await c.fetch(
                        """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
                           WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped""",
                        table,
                    )
                )
                for name, declared, _ in columns:
                    assert name in types, f"{table}.{name} is not a column"
                    want = "timestamp with time zone" if declared == "timestamptz" else declared
                    assert types[name] == want, f"{table}.{name} is {types[name]}, the store declares {declared}"
        finally:
            await c.close()

    run(go())


ROUND_TRIP = (
    ("i2", "smallint", 0),
    ("i4", "integer", 1),
    ("i8", "bigint", 2),
    ("t", "text", 3),
    ("ts", "timestamptz", 4),
    ("j", "jsonb", 5),
    ("b", "bytea", 6),
    ("c", "text", CONSTANT),
)


def test_edge_values_round_trip_through_postgres(create_database):
    url = migrated(create_database)
    rows = [
        (-32768, -(2**31), INT64_MIN, "", dt.datetime(1, 1, 1, tzinfo=UTC), '{"a": [1, "é", null]}', b""),
        (
            32767,
            2**31 - 1,
            INT64_MAX,
            "é🔑\t\n\\,\"'",
            dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            "[]",
            b"\x00\xff",
        ),
        (0, 0, 0, "x" * 100_000, dt.datetime(2000, 1, 1, tzinfo=UTC), '"s"', bytes(range(256))),
        (
            1,
            -1,
            -1,
            "n",
            dt.datetime(2000, 1, 1, 5, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
            "1",
            bytearray(b"ab"),
        ),
        (None, None, None, None, None, None, None),
    ]

    async def go():
        c = await asyncpg.connect(url)
        try:
            await c.execute(
                "CREATE TABLE round_trip (n serial, i2 smallint, i4 integer, i8 bigint, t text, ts timestamptz, "
                "j jsonb, b bytea, c text)"
            )
            stream = CopyEncoder("round_trip", ROUND_TRIP)
            stream.add(rows, {"c": "constant ✓"})
            await store.copy_rows(c, stream, 10.0)
            return [tuple(r) for r in await c.fetch("SELECT i2, i4, i8, t, ts, j, b, c FROM round_trip ORDER BY n")]
        finally:
            await c.close()

    got = run(go())
    assert len(got) == len(rows)
    for row, back in zip(rows, got):
        assert back[:5] == row[:5]
        assert (None if back[5] is None else json.loads(back[5])) == (None if row[5] is None else json.loads(row[5]))
        assert back[6] == (None if row[6] is None else bytes(row[6]))
        assert back[7] == "constant ✓"


def test_bigint_arrays_round_trip_through_postgres(create_database):
    """bigint[] (for a transaction row's legs, DESIGN.md section 4): what array_recv reads back."""
    url = migrated(create_database)
    arrays = [[], [7], [INT64_MIN, INT64_MAX, 0, -1], None, list(range(-50, 50))]

    async def go():
        c = await asyncpg.connect(url)
        try:
            await c.execute("CREATE TABLE legs_round_trip (n bigint, legs bigint[])")
            stream = CopyEncoder("legs_round_trip", (("n", "bigint", 0), ("legs", "bigint[]", 1)))
            stream.add(list(enumerate(arrays)))
            await store.copy_rows(c, stream, 10.0)
            return [
                (r["legs"], r["dims"])
                for r in await c.fetch("SELECT legs, array_ndims(legs) AS dims FROM legs_round_trip ORDER BY n")
            ]
        finally:
            await c.close()

    got = run(go())
    assert [legs for legs, _ in got] == arrays
    assert [dims for _, dims in got] == [None, 1, 1, None, 1]  # an empty array has no dimension, as '{}'


def test_text_arrays_round_trip_through_postgres(create_database):
    """text[] (a transaction row's leg assets): what array_recv reads back."""
    url = migrated(create_database)
    arrays = [[], ["POINTS"], ["VOUCHERS", "POINTS", "", "caf\u00e9 \u2713", "a,b", '"{}"'], None]

    async def go():
        c = await asyncpg.connect(url)
        try:
            await c.execute("CREATE TABLE assets_round_trip (n bigint, assets text[])")
            stream = CopyEncoder("assets_round_trip", (("n", "bigint", 0), ("assets", "text[]", 1)))
            stream.add(list(enumerate(arrays)))
            await store.copy_rows(c, stream, 10.0)
            return [r["assets"] for r in await c.fetch("SELECT assets FROM assets_round_trip ORDER BY n")]
        finally:
            await c.close()

    assert run(go()) == arrays


def test_a_stream_postgres_refuses_fails_the_copy_and_writes_nothing(create_database):
    """A column declared int4 where the table has int8 is refused by Postgres: an error, not garbage."""
    url = migrated(create_database)

    async def go():
        c = await asyncpg.connect(url)
        try:
            await c.execute("CREATE TABLE wrong_type (v bigint)")
            stream = CopyEncoder("wrong_type", [("v", "integer", 0)])
            stream.add([(1,), (2,)])
            with pytest.raises(asyncpg.PostgresError, match="binary data format|insufficient data"):
                await store.copy_rows(c, stream, 10.0)
            return await c.fetchval("SELECT count(*) FROM wrong_type")
        finally:
            await c.close()

    assert run(go()) == 0
