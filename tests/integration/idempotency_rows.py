"""Idempotency records written or aged around the service, in their storage shape since migration 0023
(one idempotency_batches row per batch: processor/idempotency_records.py). The `idempotency_keys` view
reads them back as rows."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import asyncpg

from processor import idempotency_records


def record(
    merchant_id: str,
    key: str,
    request: Any,
    outcome: str = "OK",
    response: Any = None,
    message: str | None = "",
    method: str = "Earn",
) -> tuple:
    """One record as BatchWrite.idempotency holds it (request and response as JSON text)."""
    return (
        merchant_id,
        key,
        method,
        request if isinstance(request, str) else json.dumps(request),
        outcome,
        None if response is None else response if isinstance(response, str) else json.dumps(response),
        message,
    )


async def insert_records(
    connection: asyncpg.Connection | asyncpg.Pool,
    records: list[tuple],
    created_at: dt.datetime | None = None,
    batch_id: int | None = None,
) -> int:
    """Inserts the records as one batch row (as if a batch had written them), by default under the next
    negative batch id (the ids migration 0023 gives records it moved: never a batch_log id); returns
    the batch id."""
    row = idempotency_records.encode(records)
    assert row is not None
    return await connection.fetchval(
        """INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
           VALUES (coalesce($1, (SELECT least(min(batch_id), 0) - 1 FROM idempotency_batches)),
                   coalesce($2, now()), $3, $4, $5)
           RETURNING batch_id""",
        batch_id,
        created_at,
        row.operations,
        row.keys,
        row.records,
    )


# the batch rows holding a key (in their keys' JSON: the key's JSON string as written)
HOLDING_KEY = "position(convert_to(to_json($1::text)::text, 'UTF8') IN keys) > 0"


async def age_records(connection: asyncpg.Connection | asyncpg.Pool, key: str, interval: str) -> int:
    """Moves the created_at of the batch row(s) holding `key` back by `interval` (every record of those
    batches ages with it); returns the rows changed."""
    status = await connection.execute(
        f"UPDATE idempotency_batches SET created_at = now() - $2::text::interval WHERE {HOLDING_KEY}", key, interval
    )
    return int(status.split()[-1])


async def records_of(connection: asyncpg.Connection, batch_id: int) -> list[tuple]:
    """A batch row's records as BatchWrite.idempotency held them ([] when the batch has no row)."""
    row = await connection.fetchrow("SELECT keys, records FROM idempotency_batches WHERE batch_id = $1", batch_id)
    if row is None:
        return []
    keys = idempotency_records.decode_keys(row["keys"])
    methods, requests, outcomes, responses, messages = idempotency_records.decode_records(row["records"])
    return [
        (
            merchant_id,
            key,
            method,
            json.dumps(request),
            outcome,
            None if response is None else json.dumps(response),
            message,
        )
        for (merchant_id, key), method, request, outcome, response, message in zip(
            keys, methods, requests, outcomes, responses, messages
        )
    ]
