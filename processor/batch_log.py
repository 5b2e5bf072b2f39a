"""The batch log: what a batch's answer waits for (issue 14 stage 5, docs/DESIGN.md section 4 item 5).

A batch is durable once its row is in `batch_log` (migration 0017): its BatchWrite serialized, appended
in ONE autocommit statement (synchronous_commit on) that also does the writer's fence, as
Store._check_writer_lock does inside a batch transaction: ledger_writer's epoch is ours and the
writer-lock session is the one we opened, then the high-water marks move and the row is inserted; if
either check fails nothing changes and WriterFenced / WriterLockLost is raised. The relational rows
(transactions, entries, holds, the rules' and members' rows) are written from it
later by the projector (processor/projector.py); until then the log row is the only truth, so its
payload carries the whole BatchWrite but its idempotency records, and start-up projects every log batch
after projection_state.through_batch_id before it loads anything. The idempotency records are not
projected: the same statement inserts the batch's `idempotency_batches` row (migration 0023,
processor/idempotency_records.py), so a retry's record is durable exactly when its batch is and no
projection carries it (the issue's "full idempotency key kept in the log"). Format 3 (this one) is
format 2 without the records (BatchWrite.idempotency pickled as None, decoded as []); a format-1 or
format-2 batch still carries them, and the projector inserts their row when it projects it (ON CONFLICT
DO NOTHING: Store.project_batches), so an upgrade with an unprojected tail loses no record.

The payload (format 2 and 3, `FORMAT_VERSION`) is a pickle (protocol 5) of plain values only: the BatchWrite's
fields as a list in field order, its row lists as they are, and the records of its RulesWrite and
MemberWrite (lots, earn records, member rules, ...: by the thousand a batch) as columns, one list per
field, so both ends run in C: encode is `map(attrgetter)` per field (a compiled record's columns: one pass
of fastpath/log_columns.pyx reading its fields directly, the same columns) and `pickle.dumps` (no Python
call per record; format 1 called a reducer per record), decode is `pickle.loads` and a record rebuilt driven
by `map`: a frozen dataclass by `object.__new__` and one slot descriptor `__set__` per field (no
`__init__`), a compiled record (fastpath/records.pyx: Lot, Grant, Earn, EarnRecord, MemberRules) by its
constructor, which runs in C. Measured against format 1 (`python -m loadtest.batch_log_codec`, three
runs, each interleaving the formats batch by batch, load 2-4 on the 2 cores), µs of CPU per operation,
batches of 1,000 with the program in force: encode 3.96-5.10 -> 2.64-3.39 (0.66x), decode 7.10-9.61 ->
5.06-7.06 (0.71-0.78x), 413 -> 368 bytes; the append's Postgres backend 2.58-2.95 -> 1.63-1.90, WAL 442 ->
394 bytes. Without the program (no records) the same within 5%. The log is written and read only by
this service (a trusted table, never user input).

Its shape is the dataclasses' fields: `FIELDS_FINGERPRINT` pins the field names of the writes and of
their records (tests/unit/test_batch_log.py fails when one changes without FORMAT_VERSION and the
fingerprint moving with it). `decode` reads format 3, format 2 and format 1 (the BatchWrite pickled as
objects, by the versions before format 2: a log they left unprojected still projects after the upgrade); all
rebuild the records by field position, so they hold only while the fingerprint does. A batch of any
other format is refused at decode: a start with an unprojected tail written by another version stops
with a message naming both (project the tail with the version that wrote it, then upgrade).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import operator
import pickle
from collections import deque
from itertools import chain, islice, repeat
from typing import Any, Callable, NamedTuple

import asyncpg

import fastpath
from processor import idempotency_records, rules
from processor.domain import require
from processor.member_postings import MemberStatus, MemberWrite
from processor.program import EarnRecord, MemberRules, RulesWrite, SplitRecord, VoucherHold
from processor.store import BatchWrite, StoreError, WriterFenced, WriterLockLost

FORMAT_VERSION = 3
# the formats decode() reads: format 1 (before format 2), format 2 (with the idempotency records) and this one
FORMATS_READ = (1, 2, 3)
# sha256 of the field names of the classes a payload holds (fields_fingerprint()), which both formats
# rebuild by field position; a change of fields must bump FORMAT_VERSION, set this anew and drop (or
# convert) the formats written with the old fields from FORMATS_READ
FIELDS_FINGERPRINT = "3605a975518d2237"

_PICKLE_PROTOCOL = 5


class BatchLogFormatError(StoreError):
    """A log row this version cannot read (written by another version of the service)."""


class LogEntry(NamedTuple):
    """One row of batch_log, decoded."""

    batch_id: int
    write: BatchWrite


# the classes a payload holds, whose fields its shape is
_WRITES = (BatchWrite, RulesWrite, MemberWrite)
_RECORDS = (MemberRules, rules.Lot, EarnRecord, rules.Earn, rules.Grant, SplitRecord, VoucherHold, MemberStatus)


# The compiled records (fastpath/records.pyx: Lot, Grant, Earn, EarnRecord, MemberRules; not dataclasses,
# their `_fields` name their fields in order) under the names the fingerprint knew them by when they were
# dataclasses of processor.rules and processor.program: same fields, same columns, the payload byte for
# byte the same, so the format and its fingerprint stay
_COMPILED: dict[type, str] = {
    rules.Lot: "processor.rules",
    rules.Grant: "processor.rules",
    rules.Earn: "processor.rules",
    EarnRecord: "processor.program",
    MemberRules: "processor.program",
}


def _field_names(cls: type) -> tuple[str, ...]:
    if cls in _COMPILED:
        names: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
        return names
    return tuple(f.name for f in dataclasses.fields(cls))


# BatchWrite's fields a format-3 payload does not carry (pickled as None): the records are in the batch's
# idempotency_batches row, written by the same statement (see the module's docstring)
_NOT_CARRIED = ("idempotency",)


def fields_fingerprint() -> str:
    """The shape of a payload: the field names of the writes and their records, in order, and the
    BatchWrite fields it does not carry."""
    names = [
        f"{_COMPILED.get(cls, cls.__module__)}.{cls.__qualname__}:{','.join(_field_names(cls))}"
        for cls in _WRITES + _RECORDS
    ]
    names.append(f"not carried:{','.join(_NOT_CARRIED)}")
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


# --- format 2: records as columns ----------------------------------------------------------------


class _Columns:
    """One record class (a frozen slots dataclass, or a compiled record of _COMPILED) as columns: `pack`
    turns a list of records into one list per field (a field whose values are all the same object as a
    1-tuple of it: most of an earn record's are), `unpack` turns the columns back into records. A field
    holding a record of another class is packed as that class's columns (`nested`); one holding a tuple
    of records as (records per value, their columns), or None when every tuple is empty (`nested_tuples`)."""

    def __init__(
        self, cls: type, nested: dict[str, _Columns] | None = None, nested_tuples: dict[str, _Columns] | None = None
    ) -> None:
        params = getattr(cls, "__dataclass_params__", None)
        self.compiled = cls in _COMPILED
        names = _field_names(cls) if params is not None or self.compiled else ()
        # rebuilt without __init__: a class whose __post_init__ does work cannot be (format 1 called __init__)
        if not self.compiled and (
            params is None or not params.frozen or not names or getattr(cls, "__slots__", None) != names
        ):
            raise TypeError(f"{cls.__qualname__} is not a frozen slots dataclass: its records cannot be packed")
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__qualname__} has a __post_init__: its records cannot be rebuilt from columns")
        self.cls = cls
        self.nested = nested or {}
        self.nested_tuples = nested_tuples or {}
        self.getters = [operator.attrgetter(name) for name in names]
        # the slot's own descriptor: sets the field without the frozen class's __setattr__ (which refuses); a
        # compiled record is built by its constructor from all its fields (in C, no Python call per record)
        self.setters = [] if self.compiled else [cls.__dict__[name].__set__ for name in names]
        self.kinds = [self.nested.get(name) or self.nested_tuples.get(name) for name in names]
        self.tuples = [name in self.nested_tuples for name in names]

    def pack(self, records: list[Any]) -> list[Any]:
        columns: list[Any] = []
        for getter, kind, is_tuples in zip(self.getters, self.kinds, self.tuples):
            column = list(map(getter, records))
            if kind is None:
                # the same object throughout (by identity: an equal value of another type, 1 and True,
                # must not stand for it) is sent once
                same = column and all(map(operator.is_, column, repeat(column[0])))
                columns.append((column[0],) if same else column)
            elif is_tuples:
                columns.append(_pack_tuples(column, kind))
            else:
                columns.append(kind.pack(column))
        return columns

    def unpack(self, columns: list[Any], count: int) -> list[Any]:
        fields = []
        for column, kind, is_tuples in zip(columns, self.kinds, self.tuples):
            values: Any
            if kind is None:
                values = repeat(column[0], count) if column.__class__ is tuple else column
            elif is_tuples:
                values = _unpack_tuples(column, kind, count)
            else:
                values = kind.unpack(column, count)
            fields.append(values)
        if self.compiled:
            return list(islice(map(self.cls, *fields), count))
        records: list[Any] = list(map(object.__new__, repeat(self.cls, count)))
        for setter, values in zip(self.setters, fields):
            deque(map(setter, records, values), 0)
        return records


def _pack_tuples(column: list[tuple[Any, ...]], kind: _Columns) -> Any:
    if not any(column):
        return None
    return list(map(len, column)), kind.pack(list(chain.from_iterable(column)))


def _unpack_tuples(packed: Any, kind: _Columns, count: int) -> Any:
    if packed is None:
        return repeat((), count)
    counts, columns = packed
    return _split(kind.unpack(columns, sum(counts)), counts, tuple)


def _split(flat: list[Any], counts: list[int], into: Callable[[Any], Any]) -> list[Any]:
    """`flat` cut into consecutive runs of `counts`, each made a list or a tuple (`into`), in C."""
    items = iter(flat)
    return list(map(into, map(islice, repeat(items), counts)))


_LOT = _Columns(rules.Lot)
_EARN_RECORD = _Columns(
    EarnRecord, nested={"earn": _Columns(rules.Earn, nested_tuples={"grants": _Columns(rules.Grant)})}
)
_MEMBER_RULES = _Columns(MemberRules)

# The compiled records' columns in C (fastpath/log_columns.pyx: one pass reading the fields directly, the
# same columns as `_Columns.pack`, its twin, so the same payload byte for byte; tests/unit/test_log_columns.py);
# POINTS_FASTPATH=python packs with the twin. Measured (20 batches of the state machine, program in force,
# PYTHONHASHSEED=0, callgrind of encode alone): 16,599 -> 11,174 instructions an operation, what is left
# the pickling; CPU timer, three runs interleaved with the base, load ~2: 1.27-1.45 -> 0.88-0.96 µs/op
if fastpath.IMPLEMENTATION == "cython":
    from fastpath import log_columns as _compiled_columns

    _LOT.pack = _compiled_columns.pack_lots  # type: ignore[method-assign]
    _EARN_RECORD.pack = _compiled_columns.pack_earn_records  # type: ignore[method-assign]
    _MEMBER_RULES.pack = _compiled_columns.pack_member_rules  # type: ignore[method-assign]
_SPLIT_RECORD = _Columns(SplitRecord)
_VOUCHER_HOLD = _Columns(VoucherHold)
_MEMBER_STATUS = _Columns(MemberStatus)


def _pack_records(records: dict[Any, Any], kind: _Columns) -> Any:
    """A dict of records: (its keys, the records' columns); None when empty."""
    if not records:
        return None
    return list(records), kind.pack(list(records.values()))


def _unpack_records(packed: Any, kind: _Columns) -> dict[Any, Any]:
    if packed is None:
        return {}
    keys, columns = packed
    return dict(zip(keys, kind.unpack(columns, len(keys))))


def _pack_lots(lots: dict[str, tuple[list[tuple[int, int]], list[rules.Lot]]]) -> Any:
    """RulesWrite.lots (member_id -> (keys gone, lots new or changed)): keys, keys gone, lots per member
    and the lots' columns."""
    if not lots:
        return None
    values = list(lots.values())
    changed = list(map(operator.itemgetter(1), values))
    return (
        list(lots),
        list(map(operator.itemgetter(0), values)),
        list(map(len, changed)),
        _LOT.pack(list(chain.from_iterable(changed))),
    )


def _unpack_lots(packed: Any) -> dict[str, tuple[list[tuple[int, int]], list[rules.Lot]]]:
    if packed is None:
        return {}
    members, gone, counts, columns = packed
    return dict(zip(members, zip(gone, _split(_LOT.unpack(columns, sum(counts)), counts, list))))


def _pack_pieces(pieces: dict[tuple[int, int], tuple[rules.Lot, ...]]) -> Any:
    """RulesWrite.pieces (owner -> its pieces): owners, pieces per owner and the pieces' columns."""
    if not pieces:
        return None
    values = list(pieces.values())
    return list(pieces), list(map(len, values)), _LOT.pack(list(chain.from_iterable(values)))


def _unpack_pieces(packed: Any) -> dict[tuple[int, int], tuple[rules.Lot, ...]]:
    if packed is None:
        return {}
    owners, counts, columns = packed
    return dict(zip(owners, _split(_LOT.unpack(columns, sum(counts)), counts, tuple)))


# How each field of RulesWrite is packed: the fields holding records have a (pack, unpack) pair; every
# other field is plain values (lists, sets, dicts of ints, strs and tuples of them), pickled as it is.
# A field added to RulesWrite fails the import until it is named here.
_RULES_PACKED: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "members": (lambda v: _pack_records(v, _MEMBER_RULES), lambda p: _unpack_records(p, _MEMBER_RULES)),
    "lots": (_pack_lots, _unpack_lots),
    "pieces": (_pack_pieces, _unpack_pieces),
    "earns": (lambda v: _pack_records(v, _EARN_RECORD), lambda p: _unpack_records(p, _EARN_RECORD)),
    "splits": (lambda v: _pack_records(v, _SPLIT_RECORD), lambda p: _unpack_records(p, _SPLIT_RECORD)),
    "voucher_holds": (lambda v: _pack_records(v, _VOUCHER_HOLD), lambda p: _unpack_records(p, _VOUCHER_HOLD)),
}
_RULES_PLAIN = frozenset(
    {"program_id", "new_lots", "new_pieces", "budgets", "new_earns", "tier_events", "new_splits", "dividends_posted"}
)
_RULES_FIELDS = [f.name for f in dataclasses.fields(RulesWrite)]
if set(_RULES_FIELDS) != _RULES_PLAIN | set(_RULES_PACKED):
    raise ImportError(
        f"batch_log: RulesWrite's fields {sorted(set(_RULES_FIELDS) ^ (_RULES_PLAIN | set(_RULES_PACKED)))} are "
        "not named in _RULES_PACKED or _RULES_PLAIN (processor/batch_log.py): say how each is packed"
    )
_RULES_GETTER = operator.attrgetter(*_RULES_FIELDS)
_RULES_STEPS = [(i, _RULES_PACKED[name]) for i, name in enumerate(_RULES_FIELDS) if name in _RULES_PACKED]

_MEMBERS_FIELDS = [f.name for f in dataclasses.fields(MemberWrite)]
_MEMBERS_GETTER = operator.attrgetter(*_MEMBERS_FIELDS)
_STATUSES = _MEMBERS_FIELDS.index("statuses")  # the one field of MemberWrite holding records

_BATCH_FIELDS = [f.name for f in dataclasses.fields(BatchWrite)]
_BATCH_GETTER = operator.attrgetter(*_BATCH_FIELDS)
_RULES = _BATCH_FIELDS.index("rules")
_MEMBERS = _BATCH_FIELDS.index("members")
_IDEMPOTENCY = _BATCH_FIELDS.index("idempotency")


def _pack_rules(write: RulesWrite | None) -> Any:
    if write is None:
        return None
    values = list(_RULES_GETTER(write))
    for i, (pack, _) in _RULES_STEPS:
        values[i] = pack(values[i])
    return values


def _unpack_rules(packed: Any) -> RulesWrite | None:
    if packed is None:
        return None
    for i, (_, unpack) in _RULES_STEPS:
        packed[i] = unpack(packed[i])
    return RulesWrite(*packed)


def _pack_members(write: MemberWrite | None) -> Any:
    """A batch's MemberWrite (rare: member administration): its fields, statuses as (keys, records or
    None, packed)."""
    if write is None:
        return None
    values = list(_MEMBERS_GETTER(write))
    statuses = values[_STATUSES]
    present = [s for s in statuses.values() if s is not None]
    values[_STATUSES] = (list(statuses), [s is None for s in statuses.values()], _MEMBER_STATUS.pack(present))
    return values


def _unpack_members(packed: Any) -> MemberWrite | None:
    if packed is None:
        return None
    members, cleared, columns = packed[_STATUSES]
    present = iter(_MEMBER_STATUS.unpack(columns, cleared.count(False)))
    packed[_STATUSES] = {m: None if c else next(present) for m, c in zip(members, cleared)}
    return MemberWrite(*packed)


def encode(write: BatchWrite) -> bytes:
    """The payload of a batch's log row, format 3: format 2 without the idempotency records (on the answer path: `python -m loadtest.batch_log_codec`
    measures it against format 1).

    Pickled without the pickler's memo (`fast`): the memo is a dict entry for every tuple and str
    written (thousands a batch), and only deduplicates what occurs twice by identity, which a payload
    (plain values, no cycles, never more than a few levels deep) rarely has; what pickle.loads reads is
    the same values, so the format stays 2. Measured (20 batches of the state machine, each encoded and
    decoded both ways in turn, medians, two runs, load ~2): encode 2.89-2.96 -> 2.14-2.19 µs/op with the
    program, 1.26 -> 0.62 without, on the service's core; the price is the program's: 367 -> 397 B/op (a
    value repeated in the records written again where the memo referred back to it) and its decode, in
    the projector's process, 4.91-5.47 -> 5.30-7.05 µs/op (a str made for each repeat); without the
    program 278 B/op and decode 1.3 µs/op both ways."""
    values = list(_BATCH_GETTER(write))
    values[_RULES] = _pack_rules(values[_RULES])
    values[_MEMBERS] = _pack_members(values[_MEMBERS])
    values[_IDEMPOTENCY] = None  # in the batch's idempotency_batches row (append)
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=_PICKLE_PROTOCOL)
    pickler.fast = True  # no memo (see above)
    pickler.dump(values)
    return buffer.getvalue()


def decode(batch_id: int, format_version: int, payload: bytes) -> BatchWrite:
    """The BatchWrite of a log row; BatchLogFormatError for a format this service does not read."""
    if format_version in (2, 3):
        values = pickle.loads(payload)
        if values.__class__ is not list or len(values) != len(_BATCH_FIELDS):
            raise BatchLogFormatError(
                f"batch {batch_id} in batch_log does not hold a format-{format_version} BatchWrite"
            )
        values[_RULES] = _unpack_rules(values[_RULES])
        values[_MEMBERS] = _unpack_members(values[_MEMBERS])
        if format_version == 3:
            require(
                values[_IDEMPOTENCY] is None, f"batch {batch_id}: a format-3 payload carries no idempotency records"
            )
            values[_IDEMPOTENCY] = []  # in its idempotency_batches row
        return BatchWrite(*values)
    if format_version not in FORMATS_READ:
        raise BatchLogFormatError(
            f"batch {batch_id} in batch_log has payload format {format_version}, this version of the service "
            f"reads formats {', '.join(map(str, FORMATS_READ))}: the batch is not projected yet. Start the "
            "version that wrote it until the log is projected (projection_state.through_batch_id = "
            "max(batch_id)), then upgrade"
        )
    # format 1: the BatchWrite pickled as objects (its records by a reducer each, rebuilt by __init__)
    write = pickle.loads(payload)
    if not isinstance(write, BatchWrite):
        raise BatchLogFormatError(f"batch {batch_id} in batch_log does not hold a BatchWrite")
    return write


def transaction_range(write: BatchWrite) -> tuple[int | None, int | None]:
    """The first and last transaction id the batch wrote, or Nones (no other batch has one between)."""
    if not write.transactions:
        return None, None
    ids = [t[0] for t in write.transactions]
    return min(ids), max(ids)


def operation_count(write: BatchWrite) -> int:
    """Operations the batch decided: one idempotency record each (expiries and postings of work decided
    outside a batch have none). Of the BatchWrite the committer built: a format-3 payload decodes
    without its records."""
    return len(write.idempotency)


# The fence and the append in one statement. The marks move and the rows go in only when the epoch
# is ours AND the lock session is the one we opened (the same backend start): otherwise nothing changes.
# The batch's idempotency records go in with its log row (one round trip, one commit: a record is
# durable exactly when its batch is); a batch with none ($14 NULL) has no idempotency_batches row.
_APPEND = """
WITH alive AS (SELECT backend_start FROM pg_stat_get_activity($2)),
     fence AS (
       UPDATE ledger_writer SET last_transaction_id = greatest(last_transaction_id, $4),
                                last_authorization_id = greatest(last_authorization_id, $5)
       WHERE epoch = $1 AND (SELECT backend_start FROM alive) = $3
       RETURNING 1),
     appended AS (
       INSERT INTO batch_log (batch_id, created_at, first_transaction_id, last_transaction_id, transactions,
                              operations, format_version, payload)
       SELECT $6, $7, $8, $9, $10, $11, $12, $13 WHERE EXISTS (SELECT 1 FROM fence)
       RETURNING 1),
     recorded AS (
       INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
       SELECT $6, $7, $11, $14, $15 WHERE $14::bytea IS NOT NULL AND EXISTS (SELECT 1 FROM fence)
       RETURNING 1)
SELECT (SELECT count(*) FROM appended) AS appended,
       (SELECT count(*) FROM recorded) AS recorded,
       (SELECT count(*) FROM ledger_writer WHERE epoch = $1) AS epoch_ours,
       (SELECT backend_start FROM alive) AS lock_started
"""


async def append(
    connection: asyncpg.Connection,
    fence: tuple[int, int, dt.datetime],
    batch_id: int,
    write: BatchWrite,
    payload: bytes,
    timeout: float,
) -> None:
    """Appends a batch and its idempotency records in one round trip, autocommit (the caller's
    connection must not be in a transaction). `fence`: (writer epoch, lock session pid, lock session
    backend_start)."""
    epoch, lock_pid, lock_started = fence
    first, last = transaction_range(write)
    records = idempotency_records.encode(write.idempotency)
    require(
        records is None or records.operations == operation_count(write),
        f"batch {batch_id}: its records and its operations differ",
    )
    row = await connection.fetchrow(
        _APPEND,
        epoch,
        lock_pid,
        lock_started,
        write.last_transaction_id,
        write.last_authorization_id,
        batch_id,
        write.created_at,
        first,
        last,
        len(write.transactions),
        operation_count(write),
        FORMAT_VERSION,
        payload,
        records.keys if records is not None else None,
        records.records if records is not None else None,
        timeout=timeout,
    )
    if row["appended"] == 1:
        require(row["recorded"] == (records is not None), f"batch {batch_id} appended without its records' row")
        return
    if row["epoch_ours"] != 1:
        raise WriterFenced(
            f"another points service took the writer role (this one's epoch {epoch} is over); not writing"
        )
    if row["lock_started"] != lock_started:
        raise WriterLockLost("this service no longer holds the writer lock; not writing")
    raise StoreError(f"batch {batch_id} was not appended to the batch log, for no reason the fence gives")


async def read_after(
    connection: asyncpg.Connection,
    after_batch_id: int,
    limit: int,
    timeout: float,
    through_batch_id: int | None = None,
) -> list[LogEntry]:
    """The log's batches after `after_batch_id` (and up to `through_batch_id`, if given), oldest first,
    at most `limit`."""
    rows = await connection.fetch(
        """SELECT batch_id, format_version, payload FROM batch_log WHERE batch_id > $1
           AND ($3::bigint IS NULL OR batch_id <= $3) ORDER BY batch_id LIMIT $2""",
        after_batch_id,
        limit,
        through_batch_id,
        timeout=timeout,
    )
    return [LogEntry(r["batch_id"], decode(r["batch_id"], r["format_version"], r["payload"])) for r in rows]


async def positions(connection: asyncpg.Connection, timeout: float) -> tuple[int, int]:
    """(projection_state.through_batch_id, the newest batch id the log ever held): batch ids continue
    after the larger (the log keeps its newest projected row, so the two agree unless nothing was
    appended yet)."""
    row = await connection.fetchrow(
        """SELECT (SELECT through_batch_id FROM projection_state) AS through,
                  (SELECT coalesce(max(batch_id), 0) FROM batch_log) AS newest""",
        timeout=timeout,
    )
    return row["through"], max(row["through"], row["newest"])


async def prune(connection: asyncpg.Connection, older_than: dt.datetime, rows_max: int, timeout: float) -> int:
    """Deletes up to `rows_max` projected batches created before `older_than`, keeping the newest
    projected one (batch ids continue after it); returns how many."""
    status = await connection.execute(
        """DELETE FROM batch_log WHERE batch_id IN (
             SELECT batch_id FROM batch_log
             WHERE batch_id < (SELECT through_batch_id FROM projection_state) AND created_at < $1
             ORDER BY batch_id LIMIT $2)""",
        older_than,
        rows_max,
        timeout=timeout,
    )
    return int(status.split()[-1])
