"""Plain helpers shared by the idempotency, concurrency and restart tests (no fixtures here)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg
import grpc
import pytest

from points.v1 import points_pb2 as pb
from tests.harness import ROOT, connect, wait_projected

REPLAY_METADATA_KEY = "points-idempotent-replay"
CLI_TIMEOUT_SECONDS = 60


def credential(key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying an API key."""
    return (("authorization", f"Bearer {key}"),)


# the commands that read the ledger's relational rows: run once every answered batch is projected
# (tests.harness.wait_projected), as the tests' own reads are
LEDGER_READING_COMMANDS = ("reconcile", "report")


def cli(*arguments: str) -> subprocess.CompletedProcess:
    """`python -m processor ...` as an operator runs it."""
    if arguments[:1] and arguments[0] in LEDGER_READING_COMMANDS and "--database-url" in arguments:
        wait_projected(arguments[arguments.index("--database-url") + 1])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "processor", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
    )


def add_program_version(url: str, config: dict, program_id: str = "alliance") -> None:
    """Stores a program version (as `program set` does); it applies PROGRAM_LEAD_SECONDS later."""

    async def add() -> None:
        from processor.store import Store

        store = await Store.open(url, 2)
        try:
            await store.add_program_version(program_id, None, config, "tests")
        finally:
            await store.close()

    asyncio.run(add())


WAIT_UNTIL_POLL_SECONDS = 0.05  # was 0.1: half a poll is lost on average per wait, ~45 waits in test_ids alone


def wait_until(condition, what: str, seconds: float = 20) -> None:
    """Polls `condition` every WAIT_UNTIL_POLL_SECONDS; fails with `what` if it is not true within `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(WAIT_UNTIL_POLL_SECONDS)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def replay_flag(call: grpc.Call) -> str | None:
    """The value of the replay trailer of a finished call (a response's call or an RpcError), if any."""
    for key, value in call.trailing_metadata() or ():
        if key == REPLAY_METADATA_KEY:
            return value
    return None


def call_once(rpc, request, timeout: float = 30) -> tuple[object, str | None]:
    """(response, replay trailer) of one unary call."""
    response, call = rpc.with_call(request, timeout=timeout)
    return response, replay_flag(call)


def earn(stub, merchant: str, member: str, purchase: int, key: str | None = None) -> pb.EarnResponse:
    return stub.Earn(
        pb.EarnRequest(
            merchant_id=merchant, member_id=member, purchase_amount=purchase, idempotency_key=key or unique("k")
        ),
        timeout=30,
    )


def funded_member(stub, merchant: str, point_units: int, give_back_bps: int = 1000) -> str:
    """A new member holding `point_units` (earned at a merchant of `give_back_bps`)."""
    member = unique("mem")
    purchase = point_units * 10_000 // give_back_bps
    assert purchase * give_back_bps // 10_000 == point_units, "pick a point_units the rate can produce"
    earn(stub, merchant, member, purchase)
    return member


def balance(stub, member: str) -> tuple[int, int, int]:
    response = stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)
    return response.posted, response.held, response.available


def _run(coroutine):
    return asyncio.run(coroutine)


async def _snapshot(database_url: str) -> dict:
    connection = await connect(database_url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            counts = await connection.fetchrow(
                """SELECT (SELECT count(*) FROM transactions) AS transactions,
                          (SELECT count(*) FROM entries) AS entries,
                          (SELECT count(*) FROM holds) AS holds,
                          (SELECT count(*) FROM idempotency_keys) AS idempotency_keys"""
            )
            accounts = await connection.fetch(
                "SELECT kind, owner_id, balance FROM account_balances ORDER BY kind, owner_id"
            )
            holds = await connection.fetch(
                "SELECT authorization_id, status, captured FROM holds ORDER BY authorization_id"
            )
            refunded = await connection.fetch(
                "SELECT transaction_id, refunded FROM transactions WHERE refunded > 0 ORDER BY transaction_id"
            )
        return {
            "counts": dict(counts),
            "accounts": [tuple(r) for r in accounts],
            "holds": [tuple(r) for r in holds],
            "refunded": [tuple(r) for r in refunded],
        }
    finally:
        await connection.close()


def ledger_snapshot(database_url: str) -> dict:
    """Everything a mutating call can change in Postgres: row counts of the journal, holds and
    idempotency records, every account balance, every hold's status and every refunded amount."""
    return _run(_snapshot(database_url))


async def _member_in_postgres(database_url: str, member: str) -> tuple[int, int, int]:
    connection = await connect(database_url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            row = await connection.fetchrow(
                """SELECT a.balance,
                          (SELECT coalesce(sum(e.amount), 0) FROM entries e
                           WHERE e.account_id = a.account_id) AS entries,
                          (SELECT coalesce(sum(h.amount), 0) FROM holds h
                           WHERE h.member_id = a.owner_id AND h.status = 1 AND h.expires_at > now()) AS held
                   FROM account_balances a WHERE a.kind = 'member' AND a.owner_id = $1""",
                member,
            )
        return row["balance"], row["entries"], row["held"]
    finally:
        await connection.close()


def member_in_postgres(database_url: str, member: str) -> tuple[int, int, int]:
    """(balance: the checkpoint plus the journal tail, sum of the account's entries, sum of open unexpired
    holds) of a member."""
    return _run(_member_in_postgres(database_url, member))


async def table_contents(url: str, tables: dict[str, str]) -> dict[str, list[tuple]]:
    """Every row of each table, in the order given for it (table -> ORDER BY list): for comparing two
    databases written two ways, row for row."""
    import asyncpg

    c = await asyncpg.connect(url)
    try:
        return {
            table: [tuple(r) for r in await c.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
            for table, order in tables.items()
        }
    finally:
        await c.close()


# A program version stored with no start is in force PROGRAM_LEAD_SECONDS (1 s) after it is stored; the
# tests waited a flat 1.3 s after starting the service, which itself takes about 1 s: most of the wait
# had already passed. The same 0.3 s margin past the start is kept (the service loads the version before
# it applies: at start-up, or on the change notice while running).
PROGRAM_IN_FORCE_MARGIN_SECONDS = 0.3
PROGRAM_IN_FORCE_WAIT_SECONDS_MAX = 1.3  # what the flat wait was: a later start is a mistake of the test


def wait_program_in_force(url: str) -> None:
    """Returns once the newest stored program version (of any program) has been in force for
    PROGRAM_IN_FORCE_MARGIN_SECONDS, by this machine's clock (the one its start was computed from)."""
    import time

    async def newest_start_us() -> int:
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetchval("SELECT max(effective_from_us) FROM program_versions")
        finally:
            await connection.close()

    start_us = asyncio.run(newest_start_us())
    assert start_us is not None, "no program version stored: add one (add_program_version) before waiting for it"
    wait_seconds = start_us / 1_000_000 + PROGRAM_IN_FORCE_MARGIN_SECONDS - time.time()
    assert wait_seconds <= PROGRAM_IN_FORCE_WAIT_SECONDS_MAX, (
        f"the newest program version starts {wait_seconds:.1f} s from now: wait for a start that late explicitly"
    )
    if wait_seconds > 0:
        time.sleep(wait_seconds)
