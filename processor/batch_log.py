"""The batch log: what a batch's answer waits for (issue 14 stage 5, docs/DESIGN.md section 4 item 5).

A batch is durable once its row is in `batch_log` (migration 0017): its BatchWrite serialized, appended
in ONE autocommit statement (synchronous_commit on) that also does the writer's fence, as
Store._check_writer_lock does inside a batch transaction: ledger_writer's epoch is ours and the
writer-lock session is the one we opened, then the high-water marks move and the row is inserted; if
either check fails nothing changes and WriterFenced / WriterLockLost is raised. The relational rows
(transactions, entries, holds, idempotency records, the rules' and members' rows) are written from it
later by the projector (processor/projector.py); until then the log row is the only truth, so its
payload carries the whole BatchWrite, and start-up projects every log batch after
projection_state.through_batch_id before it loads anything.

The payload is the BatchWrite pickled (protocol 5): the log is written and read only by this service
(a trusted table, never user input). Its shape is the dataclasses' fields: `FORMAT_VERSION` names it,
and `FIELDS_FINGERPRINT` pins it (tests/unit/test_batch_log.py fails when a field of BatchWrite,
RulesWrite or MemberWrite changes without FORMAT_VERSION and the fingerprint moving with it). A batch of
another version is refused at decode: a start with an unprojected tail written by another version
stops with a message naming both (project the tail with the version that wrote it, then upgrade).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import operator
import pickle
from typing import Any, Callable, NamedTuple

import asyncpg

from processor.member_postings import MemberWrite
from processor.program import RulesWrite
from processor.store import BatchWrite, StoreError, WriterFenced, WriterLockLost

FORMAT_VERSION = 1
# sha256 of the field names of BatchWrite, RulesWrite and MemberWrite (fields_fingerprint()) that
# FORMAT_VERSION 1 pickles; a change of fields must bump FORMAT_VERSION and set this anew
FIELDS_FINGERPRINT = "f5cf7bf152c44e09"

_PICKLE_PROTOCOL = 5


class BatchLogFormatError(StoreError):
    """A log row this version cannot read (written by another version of the service)."""


class LogEntry(NamedTuple):
    """One row of batch_log, decoded."""

    batch_id: int
    write: BatchWrite


def fields_fingerprint() -> str:
    """The shape the payload pickles: the field names of the write dataclasses, in order."""
    names = [
        f"{cls.__module__}.{cls.__qualname__}:{','.join(f.name for f in dataclasses.fields(cls))}"
        for cls in (BatchWrite, RulesWrite, MemberWrite)
    ]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _by_fields(cls: type) -> Callable[[Any], tuple[type, tuple[Any, ...]]] | None:
    """A pickle reducer for a frozen dataclass whose fields are all __init__ arguments (the small
    records a batch's rows carry by the thousand: lots, earn records, member rules, ...): (cls, values);
    None for any other class (pickled as usual). The dataclass's own (slots) __getstate__ calls
    dataclasses.fields() per object: measured, it made a program batch of 1,000 earns 14 µs an
    operation to pickle; with this reducer ~3."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    if not fields or not all(f.init for f in fields):
        return None
    values = operator.attrgetter(*(f.name for f in fields))
    if len(fields) == 1:
        return lambda obj: (cls, (values(obj),))
    return lambda obj: (cls, values(obj))


_REDUCERS: dict[type, Callable[[Any], tuple[type, tuple[Any, ...]]] | None] = {}


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # called only for objects of classes pickle has no built-in way for (not ints, strs, tuples...)
        cls = type(obj)
        try:
            reducer = _REDUCERS[cls]
        except KeyError:
            reducer = _REDUCERS[cls] = _by_fields(cls)
        return NotImplemented if reducer is None else reducer(obj)


def encode(write: BatchWrite) -> bytes:
    """The payload of a batch's log row (tests/unit/test_batch_log.py prints its cost per operation;
    docs/DESIGN.md section 4 item 5 quotes it)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=_PICKLE_PROTOCOL).dump(write)
    return buffer.getvalue()


def decode(batch_id: int, format_version: int, payload: bytes) -> BatchWrite:
    """The BatchWrite of a log row; BatchLogFormatError for a version this service does not write."""
    if format_version != FORMAT_VERSION:
        raise BatchLogFormatError(
            f"batch {batch_id} in batch_log has payload format {format_version}, this version of the service "
            f"reads format {FORMAT_VERSION} only: the batch is not projected yet. Start the version that "
            "wrote it until the log is projected (projection_state.through_batch_id = max(batch_id)), then "
            "upgrade"
        )
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
    outside a batch have none)."""
    return len(write.idempotency)


# The fence and the append in one statement. The marks move and the row goes in only when the epoch
# is ours AND the lock session is the one we opened (the same backend start): otherwise nothing changes.
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
       RETURNING 1)
SELECT (SELECT count(*) FROM appended) AS appended,
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
    """Appends a batch in one round trip, autocommit (the caller's connection must not be in a
    transaction). `fence`: (writer epoch, lock session pid, lock session backend_start)."""
    epoch, lock_pid, lock_started = fence
    first, last = transaction_range(write)
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
        timeout=timeout,
    )
    if row["appended"] == 1:
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
