"""The batch log payload's record columns in C (fastpath/log_columns.pyx) against their twin
(processor/batch_log.py `_Columns.pack`): the same columns for the records of the state machine's batches
and of random ones, so the same payload byte for byte (format 3 unchanged: what the projector decodes is
what it decoded), a column of one object collapsed only by identity, and a record of another class
refused."""

from __future__ import annotations

import random
from typing import Any, Callable

import pytest

import fastpath
from loadtest.bench_state_machine import NOW_US, batches, machine
from processor import batch_log, rules
from processor.program import EarnRecord, MemberRules
from processor.store import BatchWrite
from tests.unit.test_batch_log import program_batches, random_write

log_columns = pytest.importorskip("fastpath.log_columns")

pytestmark = pytest.mark.timeout(60)

# (the Columns whose pack the compiled function stands for, the compiled function)
PAIRS: list[tuple[batch_log._Columns, Callable[[list[Any]], list[Any]]]] = [
    (batch_log._LOT, log_columns.pack_lots),
    (batch_log._EARN_RECORD, log_columns.pack_earn_records),
    (batch_log._EARN_RECORD.nested["earn"], log_columns.pack_earns),
    (batch_log._EARN_RECORD.nested["earn"].nested_tuples["grants"], log_columns.pack_grants),
    (batch_log._MEMBER_RULES, log_columns.pack_member_rules),
]


def twin(columns: batch_log._Columns, records: list[Any]) -> list[Any]:
    return batch_log._Columns.pack(columns, records)


def same_columns(compiled: Any, python: Any) -> None:
    """Equal, and of the same types all the way down (1 and True are equal, but not the same payload)."""
    assert type(compiled) is type(python)
    if isinstance(python, (list, tuple)):
        assert len(compiled) == len(python)
        for a, b in zip(compiled, python):
            same_columns(a, b)
    else:
        assert compiled == python


def encode_with_twin(write: BatchWrite, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as patched:
        for columns, _ in PAIRS:
            patched.setattr(columns, "pack", lambda records, columns=columns: twin(columns, records))
        return batch_log.encode(write)


def records_of(write: BatchWrite) -> dict[str, list[Any]]:
    r = write.rules
    if r is None:
        return {}
    lots = [lot for _, changed in r.lots.values() for lot in changed] + [p for v in r.pieces.values() for p in v]
    earns = list(r.earns.values())
    return {
        "lots": lots,
        "earn_records": earns,
        "earns": [e.earn for e in earns],
        "grants": [g for e in earns for g in e.earn.grants],
        "member_rules": list(r.members.values()),
    }


def check(write: BatchWrite, monkeypatch: pytest.MonkeyPatch) -> None:
    found = records_of(write)
    for (columns, compiled), name in zip(PAIRS, ("lots", "earn_records", "earns", "grants", "member_rules")):
        records = found.get(name, [])
        same_columns(compiled(records), twin(columns, records))
    assert batch_log.encode(write) == encode_with_twin(write, monkeypatch)


def test_the_compiled_pack_is_the_one_encode_uses():
    for columns, compiled in PAIRS[:2] + PAIRS[4:]:
        if fastpath.IMPLEMENTATION == "cython":
            assert columns.pack is compiled
        else:  # POINTS_FASTPATH=python: the twin
            assert columns.pack.__func__ is batch_log._Columns.pack


def test_the_state_machines_batches_pack_the_same_and_encode_to_the_same_bytes(monkeypatch):
    for write in program_batches(300):
        assert write.rules is not None and write.rules.lots
        check(write, monkeypatch)
    # the benchmark's batches, ops/program.example.json in force (grants, pieces, member rules, ...)
    m = machine(True, 2_000, 20)
    for i, batch in enumerate(batches(4, 2_000, 20)):
        _, write = m.apply(batch, {}, NOW_US + i * 1_000_000)
        m.commit()
        found = records_of(write)
        assert found["lots"] and found["earn_records"] and found["member_rules"]
        check(write, monkeypatch)


def test_random_batches_pack_the_same_and_encode_to_the_same_bytes(monkeypatch):
    rng = random.Random(11)
    grants = 0
    for _ in range(400):
        write = random_write(rng)
        check(write, monkeypatch)
        grants += bool(records_of(write).get("grants"))
    assert grants >= 20


def test_a_column_of_one_object_is_collapsed_by_identity_only():
    same = 10**20  # one int object (not a small cached one)
    lots = [rules.Lot(i, same, 5, "x") for i in range(3)]
    columns = log_columns.pack_lots(lots)
    assert columns == [[0, 1, 2], (same,), (5,), ("x",)]
    assert columns[1][0] is same
    # equal values of two types, or equal values not the same object, stay a column
    for values in ([1, True, 1], [same, int(str(same)), same]):
        lots = [rules.Lot(1, v, 1, "x") for v in values]
        same_columns(log_columns.pack_lots(lots), twin(batch_log._LOT, lots))
    assert log_columns.pack_lots([]) == [[], [], [], []] == twin(batch_log._LOT, [])


def test_earns_without_grants_pack_their_grants_as_none():
    earn = rules.Earn(10, 2, ())
    records = [EarnRecord("m", "shop", 1, earn, None, 0), EarnRecord("n", "shop", 1, rules.Earn(3, 0, ()), None, 0)]
    columns = log_columns.pack_earn_records(records)
    assert columns[3][2] is None
    same_columns(columns, twin(batch_log._EARN_RECORD, records))


@pytest.mark.parametrize("compiled", [pair[1] for pair in PAIRS])
def test_a_record_of_another_class_is_refused(compiled):
    for wrong in (
        None,
        object(),
        MemberRules() if compiled is not log_columns.pack_member_rules else rules.Lot(1, 1, 1, "x"),
    ):
        with pytest.raises(TypeError):
            compiled([wrong])
