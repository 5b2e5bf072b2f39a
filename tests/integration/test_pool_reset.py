"""The store's pool resets a released connection with a ROLLBACK only when a transaction is left open
(processor/store.py _reset_pooled), not with asyncpg's default `SELECT pg_advisory_unlock_all(); CLOSE
ALL; UNLISTEN *; RESET ALL` round trip. That is safe only while no pool connection takes session state:
the first test checks the reset against a real Postgres, the second that the code keeps to the rule
(session advisory locks, LISTEN, plain SET, temporary tables that outlive a transaction, WITH HOLD
cursors appear only where a connection of its own is used)."""

from __future__ import annotations

import asyncio
import pathlib
import re

import pytest

from processor.store import Store

pytestmark = pytest.mark.timeout(120)

PROCESSOR = pathlib.Path(__file__).resolve().parents[2] / "processor"


def test_a_connection_released_inside_a_transaction_comes_back_rolled_back(create_database):
    url = create_database()

    async def go():
        store = await Store.open(url, 1)  # one connection: the second acquire gets the same one
        try:
            async with store.pool.acquire() as connection:
                await connection.execute("CREATE TABLE reset_probe (n int)")
                await connection.execute("BEGIN")
                await connection.execute("INSERT INTO reset_probe VALUES (1)")
                pid = connection.get_server_pid()
            async with store.pool.acquire() as connection:
                same = connection.get_server_pid() == pid
                in_transaction = connection.is_in_transaction()
                rows = await connection.fetchval("SELECT count(*) FROM reset_probe")
                setting = await connection.fetchval("SELECT current_setting('application_name')")
            return same, in_transaction, rows, setting
        finally:
            await store.close()

    same, in_transaction, rows, setting = asyncio.run(go())
    assert same, "the pool of one connection handed out another connection"
    assert not in_transaction and rows == 0  # the open transaction was rolled back, its insert gone
    assert setting.startswith("points")  # the connection's own settings stay


# (pattern, where it may appear: file names whose uses are on connections of their own)
SESSION_STATE = (
    (re.compile(r"pg_advisory_lock\(|pg_try_advisory_lock\("), {"store.py"}),
    (re.compile(r"add_listener\(|\bLISTEN\b"), {"store.py", "projector_process.py"}),
    (re.compile(r"\bWITH HOLD\b"), set()),
    (re.compile(r"\bSET\s+(?!LOCAL\b)(SESSION\s+)?[a-z_]+\s*(=|TO)\b", re.IGNORECASE), set()),
)


def test_no_pool_connection_takes_session_state():
    found = []
    for path in sorted(PROCESSOR.glob("*.py")):
        text = path.read_text()
        for pattern, allowed in SESSION_STATE:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                if path.name not in allowed:
                    found.append(f"{path.name}:{line}: {match.group(0)!r}")
        for match in re.finditer(r"CREATE\s+(TEMP|TEMPORARY)\s+TABLE[^\n]*", text, re.IGNORECASE):
            if "ON COMMIT DROP" not in match.group(0).upper():
                found.append(f"{path.name}: a temporary table that outlives its transaction: {match.group(0)!r}")
    assert found == [], "session state on a pooled connection (see processor/store.py _reset_pooled):\n" + "\n".join(
        found
    )
    # where they are allowed, they are on connections of their own
    store = (PROCESSOR / "store.py").read_text()
    for function in ("async def acquire_writer_lock", "async def listen_program_changes", "async def migrate(self)"):
        body = store[store.index(function) :]
        body = body[: body.index("\n    async def ", 1)]
        assert "asyncpg.connect(" in body, f"{function} must use a connection of its own, not the pool"
