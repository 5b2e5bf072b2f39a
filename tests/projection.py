"""Waiting for the projector (processor/projector.py) from a test: a batch is answered once appended to
the batch log, and its relational rows follow. A test that reads those tables right after an answer
waits first until projection_state has caught up with the log (missing tables: an older schema,
nothing to wait for)."""

from __future__ import annotations

import asyncio
import time

import asyncpg

WAIT_SECONDS_DEFAULT = 20.0
STALLED_SECONDS_DEFAULT = 3.0


async def projection_lag(connection: asyncpg.Connection) -> int:
    """Batches in the log not projected yet (0 when the tables do not exist)."""
    try:
        row = await connection.fetchrow(
            """SELECT (SELECT coalesce(max(batch_id), 0) FROM batch_log) AS newest,
                      (SELECT through_batch_id FROM projection_state) AS through"""
        )
    except asyncpg.UndefinedTableError:
        return 0
    return max(0, row["newest"] - (row["through"] or 0))


async def wait_projected_async(
    database_url: str, seconds: float = WAIT_SECONDS_DEFAULT, stalled_seconds: float = STALLED_SECONDS_DEFAULT
) -> bool:
    """Waits until every appended batch is projected, at most `seconds`, or until the lag has not
    moved for `stalled_seconds` (no service is running to project it: a SIGKILLed one projects at its
    next start); whether it is projected."""
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + seconds
        last, moved_at = -1, time.monotonic()
        while lag := await projection_lag(connection):
            now = time.monotonic()
            if lag != last:
                last, moved_at = lag, now
            if now >= deadline or now - moved_at >= stalled_seconds:
                return False
            await asyncio.sleep(0.02)
        return True
    finally:
        await connection.close()


def wait_projected(
    database_url: str, seconds: float = WAIT_SECONDS_DEFAULT, stalled_seconds: float = STALLED_SECONDS_DEFAULT
) -> bool:
    return asyncio.run(wait_projected_async(database_url, seconds, stalled_seconds))
