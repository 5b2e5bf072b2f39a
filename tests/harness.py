"""What the tests share beyond fixtures: the service as a real subprocess on 127.0.0.1:0, merchants and API
keys made as the CLI makes them, the credentials a real client sends, and reads of the ledger database
(fetch, reconcile, connect), each once every answered batch is projected into the relational tables
(wait_projected). The fixtures that use them are in tests/conftest.py."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import asyncpg
import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVING = re.compile(r"SERVING on (\S+) \(metrics http://([^/]+)/metrics")
START_TIMEOUT_SECONDS = 60
PROJECTED_TIMEOUT_SECONDS = 30
PROJECTED_POLL_SECONDS = 0.02


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def run(coroutine):
    return asyncio.run(coroutine)


class ServiceProcess:
    """`python -m processor serve` in a subprocess, as an operator runs it."""

    def __init__(self, database_url: str, *extra: str, env: dict | None = None):
        self.database_url = database_url
        self.extra = extra
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.env.pop("DATABASE_URL", None)
        self.process: subprocess.Popen | None = None
        self.target = ""
        self.metrics_target = ""
        self.log_lines: list[str] = []

    def start(self) -> "ServiceProcess":
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "processor",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--database-url",
                self.database_url,
                *self.extra,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            match = SERVING.search(line)
            if match:
                self.target = match.group(1)
                self.metrics_target = match.group(2)
                threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()
                return self
        self.process.kill()
        raise RuntimeError("service did not start:\n" + "".join(self.log_lines[-40:]))

    def _drain(self, stream) -> None:
        for line in stream:
            self.log_lines.append(line)

    def channel(self) -> grpc.Channel:
        """A channel that sends the right credential with each call (see Credentials)."""
        return grpc.intercept_channel(grpc.insecure_channel(self.target), Credentials(self.database_url))

    def bare_channel(self) -> grpc.Channel:
        """A channel that sends no credential: for tests of authentication itself."""
        return grpc.insecure_channel(self.target)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


async def _open_migrated_store(database_url: str):
    """A Store (pool of 2) on the database with every migration applied. The migration itself (a connection
    of its own, an advisory lock, four round trips) runs only when a migration file is not recorded in
    schema_migrations: it ran twice per add_merchant before, ~0.2 s of the setup of each test that makes a
    merchant on a loaded machine; one query on the pool checks the same thing migrate() checks first."""
    from processor import store as store_module

    store = await store_module.Store.open(database_url, 2)
    try:
        files = {version for version, _ in store_module.migration_files()}
        applied: set[int] = set()
        if await store.pool.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            applied = {r["version"] for r in await store.pool.fetch("SELECT version FROM schema_migrations")}
        if not files <= applied:
            await store.migrate()
    except BaseException:
        await store.close()
        raise
    return store


async def _add_merchant(database_url: str, merchant_id: str, give_back_bps: int, fields: dict) -> str:
    from processor import auth

    key = auth.new_key()
    store = await _open_migrated_store(database_url)
    try:
        await store.add_merchant(merchant_id, give_back_bps, **fields)
        await store.insert_api_key(key.key_id, key.secret_sha256, "merchant", [merchant_id], "tests")
    finally:
        await store.close()
    return key.key


def add_merchant(database_url: str, merchant_id: str, give_back_bps: int = 1000, **fields) -> str:
    """Creates a merchant (as `python -m processor merchant add` does) and its API key (as `key create`
    does; one store session for both); returns the key."""
    key = run(_add_merchant(database_url, merchant_id, give_back_bps, fields))
    _remember_key(database_url, "merchant", [merchant_id], key)
    return key


async def _create_key(database_url: str, kind: str, merchant_ids: list[str]) -> str:
    from processor import auth

    key = auth.new_key()
    store = await _open_migrated_store(database_url)
    try:
        await store.insert_api_key(key.key_id, key.secret_sha256, kind, merchant_ids, "tests")
    finally:
        await store.close()
    return key.key


_KEYS: dict[tuple[str, str], str] = {}  # (database_url, merchant_id | "*operator*") -> key
_GATEWAYS: dict[str, tuple[frozenset, str]] = {}  # database_url -> (merchants covered, key)
_KEYS_LOCK = threading.Lock()


def _remember_key(database_url: str, kind: str, merchant_ids: list[str], key: str) -> None:
    with _KEYS_LOCK:
        if kind == "merchant":
            _KEYS[(database_url, merchant_ids[0])] = key
        elif kind == "operator":
            _KEYS[(database_url, "*operator*")] = key


def create_key(database_url: str, kind: str, merchant_ids: list[str] | None = None) -> str:
    """A new API key (as `python -m processor key create` makes one); remembered for Credentials."""
    key = run(_create_key(database_url, kind, list(merchant_ids or [])))
    _remember_key(database_url, kind, list(merchant_ids or []), key)
    return key


class Credentials(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Sends what a real client sends: the merchant's key for a call naming a merchant, the operator's key
    for the operator services, and for reads a gateway key covering every merchant the tests made.
    A call that already carries `authorization` is left alone."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def _key(self, method: str, request) -> str:
        url = self.database_url
        if method.startswith(
            (
                "/points.v1.MerchantAdmin/",
                "/points.v1.Clearing/",
                "/points.v1.AuditService/",
                "/points.v1.Programs/",
                "/points.v1.MemberAdminService/",
                "/points.v1.MerchantAdminService/",
                "/points.v1.ClearingService/",
                "/points.v1.ProgramsService/",
            )
        ):
            with _KEYS_LOCK:
                key = _KEYS.get((url, "*operator*"))
            return key or create_key(url, "operator")
        merchant_id = getattr(request, "merchant_id", "")
        with _KEYS_LOCK:
            key = _KEYS.get((url, merchant_id))
            known = frozenset(m for (u, m) in _KEYS if u == url and m != "*operator*")
            gateway = _GATEWAYS.get(url)
        if key:
            return key
        if merchant_id and isinstance(merchant_id, str):
            from processor.store import StoreError

            try:  # a merchant created without add_merchant(): give it a key, as the operator would
                return create_key(url, "merchant", [merchant_id])
            except (StoreError, asyncpg.DataError) as error:
                if isinstance(error, StoreError) and "no merchant" not in str(error):
                    raise
                # an unknown merchant, or an id Postgres cannot even hold (what the call under test is
                # about): the gateway key lets the call reach the service, which answers for it
        if gateway is None or gateway[0] != known:
            if not known:
                return create_key(url, "operator")  # no merchant yet: any valid key
            gateway = (known, run(_create_key(url, "gateway", sorted(known))))
            with _KEYS_LOCK:
                _GATEWAYS[url] = gateway
        return gateway[1]

    def _with_key(self, call_details, request):
        metadata = list(call_details.metadata or [])
        if not any(name == "authorization" for name, _ in metadata):
            metadata.append(("authorization", "Bearer " + self._key(call_details.method, request)))
        return _CallDetails(
            call_details.method,
            call_details.timeout,
            metadata,
            call_details.credentials,
            call_details.wait_for_ready,
            call_details.compression,
        )

    def intercept_unary_unary(self, continuation, call_details, request):
        return continuation(self._with_key(call_details, request), request)

    def intercept_stream_stream(self, continuation, call_details, request_iterator):
        # a stream names no merchant up front: the gateway key covering the tests' merchants
        return continuation(self._with_key(call_details, None), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


# Read-your-writes for the tests' own reads of the ledger. A call is answered once its batch is in the batch
# log; the projector writes its rows (transactions, entries, holds, idempotency records, the rules' rows)
# shortly after and advances projection_state.through_batch_id (issue 14 stage 5). A read of those tables
# right after an answer waits until the projection has reached the last batch logged. Before the batch log
# exists (no batch_log table) the rows are written before the answer: nothing to wait for.
_LOG_EXISTS_SQL = "SELECT to_regclass('batch_log') IS NOT NULL, to_regclass('projection_state') IS NOT NULL"
_LOGGED_SQL = "SELECT coalesce(max(batch_id), 0) FROM batch_log"
_THROUGH_SQL = "SELECT coalesce((SELECT min(through_batch_id) FROM projection_state), 0)"


async def projection_lag(connection: asyncpg.Connection) -> int:
    """Batches in the batch log not projected yet (0 without a batch log)."""
    log_exists, state_exists = await connection.fetchrow(_LOG_EXISTS_SQL)
    if not log_exists:
        return 0
    row = await connection.fetchrow(
        """SELECT (SELECT coalesce(max(batch_id), 0) FROM batch_log) AS newest,
                  (SELECT min(through_batch_id) FROM projection_state) AS through"""
        if state_exists
        else "SELECT (SELECT coalesce(max(batch_id), 0) FROM batch_log) AS newest, 0 AS through"
    )
    return max(0, row["newest"] - (row["through"] or 0))


async def projected(connection: asyncpg.Connection, timeout: float = PROJECTED_TIMEOUT_SECONDS) -> None:
    """Returns once every batch logged when it is called is projected (at once without a batch log); fails
    the test if the projection has not got there within `timeout` seconds. The target is fixed at the call:
    with traffic still flowing the log keeps growing, and a target re-read at each poll could stay one or
    two batches ahead of the projector for ever (it did so on a CI run)."""
    log_exists, state_exists = await connection.fetchrow(_LOG_EXISTS_SQL)
    if not log_exists:
        return
    logged = await connection.fetchval(_LOGGED_SQL)
    deadline = time.monotonic() + timeout
    while not (state_exists and await connection.fetchval(_THROUGH_SQL) >= logged):
        if time.monotonic() >= deadline:
            through = await connection.fetchval(_THROUGH_SQL) if state_exists else None
            raise AssertionError(
                f"the projection did not reach batch {logged} of the batch log within {timeout} s "
                f"(projection_state.through_batch_id: {through})"
            )
        await asyncio.sleep(PROJECTED_POLL_SECONDS)
        if not state_exists:
            state_exists = (await connection.fetchrow(_LOG_EXISTS_SQL))[1]


async def wait_projected_async(database_url: str, timeout: float = PROJECTED_TIMEOUT_SECONDS) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await projected(connection, timeout)
    finally:
        await connection.close()


def wait_projected(database_url: str, timeout: float = PROJECTED_TIMEOUT_SECONDS) -> None:
    """Waits until every batch answered so far is in the relational tables (see projected())."""
    run(wait_projected_async(database_url, timeout))


async def connect(database_url: str) -> asyncpg.Connection:
    """A connection for reading the ledger after calls: opened once every answered batch is projected."""
    connection = await asyncpg.connect(database_url)
    try:
        await projected(connection)
    except BaseException:
        await connection.close()
        raise
    return connection


async def open_store(database_url: str):
    """A Store (pool of 2) for reading the ledger after calls, as connect() does."""
    from processor.store import Store

    await wait_projected_async(database_url)
    return await Store.open(database_url, 2)


async def _migrate(database_url: str) -> None:
    from processor.store import Store

    store = await Store.open(database_url, 1)
    try:
        await store.migrate()
    finally:
        await store.close()


def migrate(database_url: str) -> str:
    """Applies the service's migrations to the database (as the service does at start); returns its URL."""
    run(_migrate(database_url))
    return database_url


async def _discrepancies(database_url: str) -> list[str]:
    store = await open_store(database_url)
    try:
        return await store.ledger_discrepancies()
    finally:
        await store.close()


def ledger_discrepancies(database_url: str) -> list[str]:
    """What reconcile finds wrong, once every answered batch is projected."""
    return run(_discrepancies(database_url))


async def _fetch(database_url: str, sql: str, *args):
    connection = await connect(database_url)
    try:
        return await connection.fetch(sql, *args)
    finally:
        await connection.close()


def fetch(database_url: str, sql: str, *args):
    """The rows of one statement, once every answered batch is projected."""
    return run(_fetch(database_url, sql, *args))
