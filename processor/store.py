"""Postgres: where the database is, migrations, start-up loads, the batch write, and reads.

All SQL of the service lives here. The pipeline is the only writer of ledger rows; it calls
`write_batch` with everything one batch changes, and that runs in one transaction.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import pathlib
import time
import urllib.parse
from typing import Any, AsyncIterator, Iterable, Sequence

import asyncpg

from processor import metrics
from processor.domain import (ACCOUNT_MEMBER, ACCOUNT_MERCHANT_ACQUIRING, ACCOUNT_MERCHANT_FEES, ACCOUNT_MERCHANT_ISSUED,
                              ACCOUNT_MERCHANT_REDEEMED, ASSET_POINTS, OPERATOR_ID,
                              GIVE_BACK_BPS_MAX, GIVE_BACK_BPS_MIN, require)

MERCHANT_ACCOUNTS = (ACCOUNT_MERCHANT_ISSUED, ACCOUNT_MERCHANT_REDEEMED, ACCOUNT_MERCHANT_FEES,
                     ACCOUNT_MERCHANT_ACQUIRING)

log = logging.getLogger("points.store")

MIGRATIONS = pathlib.Path(__file__).parent / "migrations"
# The single-writer lock: two services writing one ledger would allocate the same ids.
WRITER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"points.v1 writer").digest()[:8], "big", signed=True)
MIGRATION_LOCK_KEY = WRITER_LOCK_KEY ^ 1
APPLICATION_NAME = "points-processor"
RECONCILE_TIMEOUT_SECONDS = 6 * 3600.0


class StoreError(Exception):
    """Postgres said no, for a reason the operator must fix (not a transient fault)."""


class WriterLockLost(Exception):
    """The session holding the writer lock is gone: the fast path must be rebuilt and the lock taken again."""


# ---------------------------------------------------------------------------------------------------
# Where the database is


def embedded_server_url(data_dir: str, database_name: str) -> str:
    """Starts (or reuses) the embedded Postgres of the pgserver package under data_dir, creates the
    database if missing, and returns its URL. The postmaster outlives this process, so data and a
    running server survive restarts of the service."""
    import warnings
    with warnings.catch_warnings():  # pgserver's platformdirs warns about XDG_RUNTIME_DIR on servers
        warnings.simplefilter("ignore")
        import pgserver  # heavy import; only needed without DATABASE_URL

    directory = pathlib.Path(data_dir).expanduser().resolve() / "pg"
    directory.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(directory), cleanup_mode=None)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database_name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database_name}";')
    uri = urllib.parse.urlsplit(server.get_uri())
    return urllib.parse.urlunsplit(uri._replace(path="/" + database_name))


def resolve_database_url(database_url: str, data_dir: str, database_name: str) -> str:
    if database_url:
        return database_url
    return embedded_server_url(data_dir, database_name)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


# ---------------------------------------------------------------------------------------------------
# Migrations


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Applies, in order, every migrations/NNNN_*.sql not yet applied; returns the names applied.
    Serialised by an advisory lock, so concurrent starts do not race."""
    applied_now = []
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute("""
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())""")
        done = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")}
        for path in sorted(MIGRATIONS.glob("*.sql")):
            version = int(path.name.split("_", 1)[0])
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(path.read_text())
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name)
            applied_now.append(path.name)
            log.info("migration applied", extra={"migration": path.name})
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


# ---------------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass(slots=True)
class MerchantRow:
    merchant_id: str
    merchant_slot: int
    give_back_bps: int
    status: str
    name: str = ""
    region: str = ""
    fee_redeemed_bps: int = 0
    fee_issued_bps: int = 0
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    # accounts.account_id of the merchant's issued, redeemed and fees accounts: the pipeline writes
    # journal entries by account id
    issued_account_id: int = 0
    redeemed_account_id: int = 0
    fees_account_id: int = 0
    acquiring_account_id: int = 0  # rewards the operator owes it as an acquiring merchant (program rules)

    def account_id(self, kind: str) -> int:
        return {ACCOUNT_MERCHANT_ISSUED: self.issued_account_id, ACCOUNT_MERCHANT_REDEEMED: self.redeemed_account_id,
                ACCOUNT_MERCHANT_FEES: self.fees_account_id}[kind]


MERCHANT_COLUMNS = ("merchant_id, merchant_slot, give_back_bps, status, name, region, fee_redeemed_bps, "
                    "fee_issued_bps, created_at, updated_at")
# a merchant with its account ids
MERCHANT_SELECT = f"""
    SELECT {MERCHANT_COLUMNS}, a.issued_account_id, a.redeemed_account_id, a.fees_account_id,
           a.acquiring_account_id
    FROM merchants m
    LEFT JOIN (SELECT owner_id,
                      max(account_id) FILTER (WHERE kind = 'merchant_issued') AS issued_account_id,
                      max(account_id) FILTER (WHERE kind = 'merchant_redeemed') AS redeemed_account_id,
                      max(account_id) FILTER (WHERE kind = 'merchant_fees') AS fees_account_id,
                      max(account_id) FILTER (WHERE kind = 'merchant_acquiring') AS acquiring_account_id
               FROM accounts
               WHERE kind IN ('merchant_issued', 'merchant_redeemed', 'merchant_fees', 'merchant_acquiring')
                 AND asset_code = 'POINTS'
               GROUP BY owner_id) a ON a.owner_id = m.merchant_id"""
# (one join, not three look-ups per merchant: 50,000 merchants load in one pass at start-up)
MERCHANT_SETTABLE = ("name", "give_back_bps", "fee_redeemed_bps", "fee_issued_bps", "region", "status")


@dataclasses.dataclass(slots=True)
class HoldRow:
    authorization_id: int
    merchant_id: str
    member_id: str
    amount: int
    status: int
    expires_at_us: int


@dataclasses.dataclass(slots=True)
class TransactionRow:
    transaction_id: int
    kind: int
    merchant_id: str
    member_id: str
    amount: int
    refunded: int


@dataclasses.dataclass(slots=True)
class StoredOutcome:
    method: str
    request: dict
    outcome: str
    response: dict | None
    message: str


@dataclasses.dataclass
class BatchWrite:
    """Everything one batch changes. Built by the pipeline, written in one transaction."""
    created_at: dt.datetime
    # (member_id, account_id): account ids reserved from the accounts sequence (reserve_account_ids)
    new_members: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    # (transaction_id, kind, merchant_id, member_id, amount, purchase_amount|None,
    #  authorization_id|None, original_transaction_id|None, idempotency_key, fee)
    transactions: list[tuple] = dataclasses.field(default_factory=list)
    # (transaction_id, account_id, amount): amount is added to the account's balance
    entries: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    # (transaction_id, point-units refunded now)
    refunds: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # (authorization_id, merchant_id, member_id, amount, expires_at, idempotency_key)
    new_holds: list[tuple] = dataclasses.field(default_factory=list)
    # (authorization_id, status, captured, capture_transaction_id|None)
    resolved_holds: list[tuple[int, int, int, int | None]] = dataclasses.field(default_factory=list)
    expired_holds: list[int] = dataclasses.field(default_factory=list)
    # (merchant_id, idempotency_key, method, request json, outcome, response json|None, message)
    idempotency: list[tuple] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.idempotency or self.expired_holds)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def micros(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def from_micros(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value // 1_000_000, dt.timezone.utc).replace(
        microsecond=value % 1_000_000)


class Store:
    """A connection pool on the ledger database, plus the writer lock connection."""

    def __init__(self, pool: asyncpg.Pool, url: str, connect_timeout: float = 10.0):
        self.pool = pool
        self.url = url
        self.connect_timeout = connect_timeout
        self.read_timeout = connect_timeout  # the pipeline's look-ups before a batch
        # start-up's reads: a whole network with a cold cache may take far longer than a commit may
        self.recovery_timeout = max(connect_timeout, 300.0)
        self._writer_lock: asyncpg.Connection | None = None
        self._writer_lock_pid: int | None = None
        self._writer_lock_started: dt.datetime | None = None

    @classmethod
    async def open(cls, url: str, pool_connections_max: int = 8, command_timeout: float = 30.0) -> "Store":
        pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_connections_max,
                                         command_timeout=command_timeout, timeout=command_timeout,
                                         server_settings={"application_name": APPLICATION_NAME})
        return cls(pool, url, connect_timeout=command_timeout)

    async def close(self) -> None:
        if self._writer_lock is not None and not self._writer_lock.is_closed():
            await self._writer_lock.close()
        await self.pool.close()

    async def migrate(self) -> list[str]:
        async with self.pool.acquire() as connection:
            return await migrate(connection)

    async def acquire_writer_lock(self) -> None:
        """Holds a session advisory lock for the life of the service: one writer per ledger."""
        connection = await asyncpg.connect(self.url, timeout=self.connect_timeout,
                                           server_settings={"application_name": APPLICATION_NAME + "-lock"})
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", WRITER_LOCK_KEY):
            await connection.close()
            raise StoreError("another points service is already writing to this database "
                             "(advisory lock held); stop it or point --database-url elsewhere")
        self._writer_lock = connection
        self._writer_lock_pid, self._writer_lock_started = await connection.fetchrow(
            "SELECT pid, backend_start FROM pg_stat_get_activity(pg_backend_pid())")

    async def writer_lock_alive(self, timeout: float = 2.0) -> bool:
        """Whether the lock session still answers (bounded: a stalled session counts as lost)."""
        connection = self._writer_lock
        if connection is None or connection.is_closed():
            return False
        probe = asyncio.get_running_loop().create_task(connection.fetchval("SELECT 1"))
        done, _ = await asyncio.wait({probe}, timeout=timeout)
        if done and not probe.exception() and probe.result() == 1:
            return True
        connection.terminate()
        probe.cancel()
        probe.add_done_callback(lambda t: t.cancelled() or t.exception())
        return False

    async def reachable(self, timeout: float = 2.0) -> bool:
        try:
            return await self.bounded(lambda c: c.fetchval("SELECT 1"), timeout) == 1
        except Exception:  # any failure to answer means: not reachable now
            return False

    async def release_writer_lock(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.terminate()  # no round trip: the connection may be dead already
            self._writer_lock = None

    # --- merchants (CLI now; the admin API later) ---

    async def add_merchant(self, merchant_id: str, give_back_bps: int, *, name: str = "", region: str = "",
                           fee_redeemed_bps: int = 0, fee_issued_bps: int = 0) -> MerchantRow:
        """Creates a merchant and its issued, redeemed and fees accounts. StoreError if it exists."""
        if not GIVE_BACK_BPS_MIN <= give_back_bps <= GIVE_BACK_BPS_MAX:
            raise StoreError(f"give-back rate {give_back_bps} bps is outside "
                             f"{GIVE_BACK_BPS_MIN}..{GIVE_BACK_BPS_MAX} (3%..20%)")
        for field, value in (("fee_redeemed_bps", fee_redeemed_bps), ("fee_issued_bps", fee_issued_bps)):
            if not 0 <= value <= 10_000:
                raise StoreError(f"{field} {value} is outside 0..10000 basis points")
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("LOCK TABLE merchants IN SHARE ROW EXCLUSIVE MODE")
            created = await connection.fetchval(
                """INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps, name, region,
                                          fee_redeemed_bps, fee_issued_bps)
                   SELECT $1, coalesce(max(merchant_slot) + 1, 0), $2, $3, $4, $5, $6 FROM merchants
                   ON CONFLICT (merchant_id) DO NOTHING
                   RETURNING true""",
                merchant_id, give_back_bps, name, region, fee_redeemed_bps, fee_issued_bps)
            if not created:
                raise StoreError(f"merchant {merchant_id!r} exists already")
            await connection.executemany(
                "INSERT INTO accounts (kind, owner_id, asset_code) VALUES ($1, $2, $3)",
                [(kind, merchant_id, ASSET_POINTS) for kind in MERCHANT_ACCOUNTS])
            row = await connection.fetchrow(f"{MERCHANT_SELECT} WHERE m.merchant_id = $1", merchant_id)
        return MerchantRow(**dict(row))

    async def update_merchant(self, merchant_id: str, changes: dict[str, Any]) -> MerchantRow | None:
        """Sets the given MERCHANT_SETTABLE fields; None if the merchant does not exist."""
        unknown = set(changes) - set(MERCHANT_SETTABLE)
        require(not unknown, f"update_merchant: unknown fields {unknown}")
        if not changes:
            return await self.merchant(merchant_id)
        names = sorted(changes)
        assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(
                f"UPDATE merchants SET {assignments}, updated_at = now() WHERE merchant_id = $1",
                merchant_id, *[changes[n] for n in names])
            row = await connection.fetchrow(f"{MERCHANT_SELECT} WHERE m.merchant_id = $1", merchant_id)
        return MerchantRow(**dict(row)) if row else None

    async def merchants(self, after_slot: int = -1, limit: int | None = None) -> list[MerchantRow]:
        rows = await self.pool.fetch(
            f"""{MERCHANT_SELECT} WHERE m.merchant_slot > $1 ORDER BY m.merchant_slot LIMIT $2""",
            after_slot, limit, timeout=self.recovery_timeout)
        return [MerchantRow(**dict(r)) for r in rows]

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        row = await self.pool.fetchrow(f"{MERCHANT_SELECT} WHERE m.merchant_id = $1", merchant_id)
        return MerchantRow(**dict(row)) if row else None

    async def operator_account_ids(self) -> dict[str, int]:
        """account kind -> account id of the operator's own accounts (fee revenue, breakage)."""
        rows = await self.pool.fetch(
            """SELECT kind, account_id FROM accounts
               WHERE kind IN ('operator_fee_revenue', 'operator_breakage') AND owner_id = $1 AND asset_code = $2""",
            OPERATOR_ID, ASSET_POINTS, timeout=self.recovery_timeout)
        return {r["kind"]: r["account_id"] for r in rows}

    async def reserve_account_ids(self, count: int) -> list[int]:
        """`count` account ids taken from the accounts sequence, for the accounts of members the pipeline
        creates: journal entries are then written by id (COPY) with no look-up. Ids taken and never
        used leave gaps, like any sequence."""
        return [r[0] for r in await self.bounded(lambda c: c.fetch(
            """SELECT nextval(pg_get_serial_sequence('accounts', 'account_id')) FROM generate_series(1, $1)""",
            count), self.read_timeout)]

    # --- credentials ---

    async def insert_api_key(self, key_id: str, secret_sha256: bytes, kind: str, merchant_ids: list[str],
                             description: str) -> None:
        missing = await self.pool.fetch(
            "SELECT m FROM unnest($1::text[]) AS m WHERE NOT EXISTS "
            "(SELECT 1 FROM merchants WHERE merchant_id = m)", merchant_ids)
        if missing:
            raise StoreError(f"no merchant {missing[0]['m']!r}: create it before issuing its key")
        await self.pool.execute(
            """INSERT INTO api_keys (key_id, secret_sha256, kind, merchant_ids, description)
               VALUES ($1, $2, $3, $4, $5)""", key_id, secret_sha256, kind, merchant_ids, description)

    async def api_key(self, key_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT key_id, secret_sha256, kind, merchant_ids, revoked_at FROM api_keys WHERE key_id = $1", key_id)

    async def revoke_api_key(self, key_id: str) -> dt.datetime | None:
        return await self.pool.fetchval(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1
               RETURNING revoked_at""", key_id)

    # --- start-up loads ---

    async def member_balances(self, chunk_rows: int = 50_000) -> AsyncIterator[list[tuple[str, int, int]]]:
        """Every member's (member_id, posted balance, account_id), in chunks (a server-side cursor keeps
        memory bounded)."""
        async with self.pool.acquire() as connection, connection.transaction(readonly=True):
            cursor = await connection.cursor(
                "SELECT owner_id, balance, account_id FROM account_balances WHERE kind = $1 AND asset_code = $2",
                ACCOUNT_MEMBER, ASSET_POINTS)
            while True:
                rows = await cursor.fetch(chunk_rows, timeout=self.recovery_timeout)
                if not rows:
                    return
                yield [(r[0], r[1], r[2]) for r in rows]

    async def open_holds(self, now: dt.datetime) -> list[HoldRow]:
        rows = await self.pool.fetch(
            """SELECT authorization_id, merchant_id, member_id, amount, status, expires_at
               FROM holds WHERE status = 1 AND expires_at > $1""", now, timeout=self.recovery_timeout)
        return [self._hold(r) for r in rows]

    async def id_high_water_marks(self) -> tuple[int, int]:
        """(largest transaction_id, largest authorization_id) ever committed."""
        row = await self.pool.fetchrow(
            """SELECT (SELECT coalesce(max(transaction_id), 0) FROM transactions) AS t,
                      (SELECT coalesce(max(authorization_id), 0) FROM holds) AS a""", timeout=self.recovery_timeout)
        return row["t"], row["a"]

    # --- prefetch before a batch ---

    async def stored_outcomes(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], StoredOutcome]:
        if not keys:
            return {}
        rows = await self.bounded(lambda c: c.fetch(
            """SELECT i.merchant_id, i.idempotency_key, i.method, i.request, i.outcome, i.response, i.message
               FROM idempotency_keys i
               JOIN unnest($1::text[], $2::text[]) AS k(merchant_id, idempotency_key)
                 USING (merchant_id, idempotency_key)""",
            [k[0] for k in keys], [k[1] for k in keys]), self.read_timeout)
        return {(r["merchant_id"], r["idempotency_key"]): StoredOutcome(
            r["method"], json.loads(r["request"]), r["outcome"],
            json.loads(r["response"]) if r["response"] is not None else None, r["message"] or "")
            for r in rows}

    async def holds(self, authorization_ids: Iterable[int]) -> list[HoldRow]:
        ids = list(authorization_ids)
        rows = await self.bounded(lambda c: c.fetch(
            """SELECT authorization_id, merchant_id, member_id, amount, status, expires_at
               FROM holds WHERE authorization_id = ANY($1::bigint[])""", ids), self.read_timeout)
        return [self._hold(r) for r in rows]

    async def transactions(self, transaction_ids: Iterable[int]) -> list[TransactionRow]:
        ids = list(transaction_ids)
        rows = await self.bounded(lambda c: c.fetch(
            """SELECT transaction_id, kind, merchant_id, member_id, amount, refunded
               FROM transactions WHERE transaction_id = ANY($1::bigint[])""", ids), self.read_timeout)
        return [TransactionRow(**dict(r)) for r in rows]

    @staticmethod
    def _hold(r: asyncpg.Record) -> HoldRow:
        return HoldRow(r["authorization_id"], r["merchant_id"], r["member_id"], r["amount"], r["status"],
                       micros(r["expires_at"]))

    # --- the batch write: the one place ledger rows change ---

    async def bounded(self, work, timeout: float):
        """Runs `work(connection)` on a pool connection and gives up after `timeout` seconds. On expiry
        the connection is terminated (its socket closed, no round trip), because a stalled server
        would hold a polite cancel or ROLLBACK as long as it holds the query; TimeoutError is raised."""
        loop = asyncio.get_running_loop()
        begin = time.monotonic()
        async def acquire():
            return await self.pool.acquire()
        acquiring = loop.create_task(acquire())
        done, _ = await asyncio.wait({acquiring}, timeout=timeout)
        if not done:
            acquiring.add_done_callback(lambda t: t.cancelled() or t.exception() or
                                        loop.create_task(self.pool.release(t.result())))
            acquiring.cancel()
            raise TimeoutError(f"no Postgres connection within {timeout} s")
        connection = acquiring.result()
        metrics.pool_acquire_seconds.observe(time.monotonic() - begin)
        task = loop.create_task(work(connection))
        done, _ = await asyncio.wait({task}, timeout=timeout - (time.monotonic() - begin))
        if done:
            await self.pool.release(connection)
            return task.result()
        connection.terminate()
        task.cancel()
        # released once the abandoned work has unwound (quickly: its socket is gone)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() or True)
        task.add_done_callback(lambda _: loop.create_task(self.pool.release(connection)))
        raise TimeoutError(f"Postgres did not answer within {timeout} s")

    async def write_batch(self, batch: BatchWrite, timeout: float) -> None:
        """Writes one batch in one transaction, within `timeout` seconds. Raises on any failure; then
        nothing was written, or (a broken connection, a timeout) it is unknown whether COMMIT was."""
        await self._as_writer(lambda connection, step: self._write(connection, batch, timeout, step), timeout,
                              timed=True)

    async def _as_writer(self, write, timeout: float, timed: bool = False) -> None:
        """Runs `write(connection, step)` in one transaction on a pool connection, after checking inside
        it that this service still holds the writer lock, all within `timeout` seconds (bounded). With
        `timed` (batches), each step is timed into points_pipeline_commit_step_seconds."""
        async def work(connection):
            transaction = connection.transaction()
            await transaction.start()
            step = _Steps() if timed else _untimed
            try:
                await self._check_writer_lock(connection)
                step("lock_check")
                await write(connection, step)
            except BaseException:
                try:
                    await transaction.rollback()
                except Exception:  # a broken connection cannot roll back; the first error says why
                    pass
                raise
            await transaction.commit()
            step("commit")
        await self.bounded(work, timeout)

    async def _check_writer_lock(self, connection: asyncpg.Connection) -> None:
        """Inside the batch's transaction: our lock session still holds the writer lock. If Postgres
        dropped that session, another service may have taken the lock: nothing is written."""
        # A session advisory lock is released only with its session: the lock session is alive (the same
        # backend, not a later one given the same pid) iff we still hold it. Measured: pg_locks cost
        # about 2 ms a batch; this look-up of one backend a few µs.
        if self._writer_lock_pid is None or self._writer_lock_started != await connection.fetchval(
                "SELECT backend_start FROM pg_stat_get_activity($1)", self._writer_lock_pid):
            raise WriterLockLost("this service no longer holds the writer lock; not writing")

    async def _write(self, c: asyncpg.Connection, b: BatchWrite, timeout: float, step) -> None:
        at = b.created_at
        if b.new_members:
            member_ids = [m[0] for m in b.new_members]
            await c.execute("""INSERT INTO members (member_id, created_at) SELECT unnest($1::text[]), $2""",
                            member_ids, at, timeout=timeout)
            # no ON CONFLICT: a member the fast path did not know but Postgres did is a bug, and the
            # batch must fail rather than post to an account id that does not exist
            await c.execute("""INSERT INTO accounts (account_id, kind, owner_id, asset_code) OVERRIDING SYSTEM VALUE
                               SELECT unnest($1::bigint[]), $3, unnest($2::text[]), $4""",
                            [m[1] for m in b.new_members], member_ids, ACCOUNT_MEMBER, ASSET_POINTS,
                            timeout=timeout)
            step("members")
        if b.transactions:
            await c.copy_records_to_table(
                "transactions",
                columns=["transaction_id", "kind", "merchant_id", "member_id", "asset_code", "amount",
                         "purchase_amount", "authorization_id", "original_transaction_id",
                         "idempotency_key", "created_at", "fee"],
                records=[(t[0], t[1], t[2], t[3], ASSET_POINTS, t[4], t[5], t[6], t[7], t[8], at, t[9])
                         for t in b.transactions],
                timeout=timeout)
            step("transactions")
        if b.new_holds:
            await c.copy_records_to_table(
                "holds",
                columns=["authorization_id", "merchant_id", "member_id", "asset_code", "amount", "status",
                         "expires_at", "created_at", "idempotency_key"],
                records=[(h[0], h[1], h[2], ASSET_POINTS, h[3], 1, h[4], at, h[5]) for h in b.new_holds],
                timeout=timeout)
            step("holds")
        if b.entries:
            await c.copy_records_to_table(
                "entries", columns=["transaction_id", "account_id", "asset_code", "amount"],
                records=[(e[0], e[1], ASSET_POINTS, e[2]) for e in b.entries], timeout=timeout)
            step("entries")
        if b.refunds:
            await c.execute(
                """UPDATE transactions t SET refunded = t.refunded + r.points
                   FROM (SELECT transaction_id, sum(points)::bigint AS points
                         FROM unnest($1::bigint[], $2::bigint[]) AS r(transaction_id, points)
                         GROUP BY transaction_id) r
                   WHERE t.transaction_id = r.transaction_id""",
                [r[0] for r in b.refunds], [r[1] for r in b.refunds], timeout=timeout)
            step("refunds")
        if b.resolved_holds:
            updated = await c.fetchval(
                """WITH u AS (
                     UPDATE holds h SET status = r.status, captured = r.captured,
                            capture_transaction_id = r.capture_transaction_id, resolved_at = $5
                     FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bigint[])
                          AS r(authorization_id, status, captured, capture_transaction_id)
                     WHERE h.authorization_id = r.authorization_id AND h.status = 1
                     RETURNING 1)
                   SELECT count(*) FROM u""",
                *[list(x) for x in zip(*b.resolved_holds)], at, timeout=timeout)
            require(updated == len(b.resolved_holds),
                    f"holds: {updated} of {len(b.resolved_holds)} resolutions found an open hold")
            step("hold_resolutions")
        if b.expired_holds:
            await c.execute(
                """UPDATE holds SET status = 4, resolved_at = expires_at
                   WHERE authorization_id = ANY($1::bigint[]) AND status = 1""",
                b.expired_holds, timeout=timeout)
            step("hold_expiries")
        if b.idempotency:
            await c.execute(
                """INSERT INTO idempotency_keys
                     (merchant_id, idempotency_key, method, request, outcome, response, message, created_at)
                   SELECT k.merchant_id, k.idempotency_key, k.method, k.request::jsonb, k.outcome,
                          k.response::jsonb, k.message, $8
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                               $7::text[])
                        AS k(merchant_id, idempotency_key, method, request, outcome, response, message)""",
                *[list(x) for x in zip(*b.idempotency)], at, timeout=timeout)
            step("idempotency")

    async def write_checkpoint(self, deltas: dict[int, int], through: int, timeout: float) -> None:
        """Folds `deltas` (account_id -> sum of its entries after the current checkpoint up to and
        including transaction `through`) into accounts.balance and moves the checkpoint to `through`,
        in one transaction of its own, as the writer. It runs beside the batches: they insert journal
        rows and never update accounts, so neither waits for the other."""
        async def write(connection, step):
            await self._write_checkpoint(connection, deltas, through, at=dt.datetime.now(dt.timezone.utc),
                                         timeout=timeout)
        await self._as_writer(write, timeout)

    @staticmethod
    async def _write_checkpoint(c: asyncpg.Connection, deltas: dict[int, int], through: int, *,
                                at: dt.datetime, timeout: float) -> None:
        changed = {account_id: delta for account_id, delta in deltas.items() if delta}
        if changed:
            updated = await c.fetchval(
                """WITH u AS (UPDATE accounts a SET balance = a.balance + d.delta
                              FROM unnest($1::bigint[], $2::bigint[]) AS d(account_id, delta)
                              WHERE a.account_id = d.account_id RETURNING 1)
                   SELECT count(*) FROM u""",
                list(changed), list(changed.values()), timeout=timeout)
            require(updated == len(changed), f"checkpoint: {updated} of {len(changed)} accounts exist")
        moved = await c.execute(
            """UPDATE balance_checkpoint SET through_transaction_id = $1, written_at = $2
               WHERE through_transaction_id <= $1""", through, at, timeout=timeout)
        require(moved == "UPDATE 1", f"checkpoint through transaction {through} would move backwards")

    async def checkpoint_through(self) -> int:
        """The newest transaction whose entries accounts.balance includes."""
        return await self.pool.fetchval("SELECT through_transaction_id FROM balance_checkpoint")

    async def tail_deltas(self, through: int) -> tuple[dict[int, int], int]:
        """(account_id -> sum of its entries after transaction `through`, the newest transaction id
        among them or `through`): what the next checkpoint must fold in."""
        rows = await self.pool.fetch(
            """SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest
               FROM entries WHERE transaction_id > $1 GROUP BY account_id""", through,
            timeout=self.recovery_timeout)
        return {r["account_id"]: r["delta"] for r in rows}, max([through] + [r["newest"] for r in rows])

    async def fold_checkpoint_now(self, timeout: float = 10.0) -> None:
        """Folds the tail into accounts.balance, as the writer (its lock checked in the transaction)."""
        await self._as_writer(lambda connection, step: self.fold_checkpoint(connection), timeout)

    async def fold_checkpoint(self, connection: asyncpg.Connection) -> None:
        """Folds the whole tail into accounts.balance in SQL (for tools that write the journal
        directly while no service runs, e.g. seed_network)."""
        await connection.execute(
            """WITH c AS (SELECT through_transaction_id AS through FROM balance_checkpoint),
                    t AS (SELECT account_id, sum(amount)::bigint AS delta FROM entries, c
                          WHERE transaction_id > c.through GROUP BY account_id)
               UPDATE accounts a SET balance = a.balance + t.delta FROM t WHERE a.account_id = t.account_id""")
        await connection.execute(
            """UPDATE balance_checkpoint SET written_at = now(),
                      through_transaction_id = greatest(through_transaction_id,
                                                        (SELECT coalesce(max(transaction_id), 0) FROM transactions))""")

    # --- reads ---

    async def list_transactions(self, member_id: str, before_transaction_id: int | None,
                                limit: int, merchant_ids: list[str]) -> list[asyncpg.Record]:
        """The member's transactions at the given merchants, newest first."""
        return await self.pool.fetch(
            """SELECT t.transaction_id, t.kind, t.merchant_id, t.amount, t.purchase_amount,
                      t.authorization_id, t.original_transaction_id, t.created_at
               FROM transactions t
               WHERE t.member_id = $1 AND ($2::bigint IS NULL OR t.transaction_id < $2)
                 AND t.merchant_id = ANY($4::text[])
               ORDER BY t.transaction_id DESC LIMIT $3""",
            member_id, before_transaction_id, limit, merchant_ids)

    async def member_exists(self, member_id: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM members WHERE member_id = $1", member_id))

    async def purge_idempotency(self, older_than: dt.datetime) -> int:
        result = await self.pool.execute("DELETE FROM idempotency_keys WHERE created_at < $1", older_than)
        return int(result.split()[-1])

    # --- clearing ---

    async def merchant_position(self, merchant_id: str) -> dict[str, int] | None:
        """Balances of the merchant's accounts: the checkpoint plus the journal tail since it (bounded by
        the checkpoint interval), so every committed batch is included."""
        rows = await self.pool.fetch(
            """SELECT kind, balance FROM account_balances
               WHERE owner_id = $1 AND kind = ANY($2::text[]) AND asset_code = $3""",
            merchant_id, list(MERCHANT_ACCOUNTS), ASSET_POINTS)
        if not rows:
            return None
        balance = {r["kind"]: r["balance"] for r in rows}
        issued = -balance.get(ACCOUNT_MERCHANT_ISSUED, 0)
        redeemed = balance.get(ACCOUNT_MERCHANT_REDEEMED, 0)
        fees = -balance.get(ACCOUNT_MERCHANT_FEES, 0)
        return {"issued": issued, "redeemed": redeemed, "fees": fees, "net": redeemed - issued - fees}

    async def latest_cut_off(self) -> dt.datetime | None:
        return await self.pool.fetchval("SELECT max(cut_off) FROM settlement_periods")

    async def close_period(self, cut_off: dt.datetime) -> tuple[asyncpg.Record, bool]:
        """Closes the open period at cut_off and writes every merchant's statement, in one transaction.
        Returns (period, created). The caller guarantees no transaction dated before cut_off commits
        afterwards. Idempotent on cut_off; StoreError if cut_off is not after the newest cut."""
        async with self.pool.acquire() as c, c.transaction():
            await c.execute("LOCK TABLE settlement_periods IN EXCLUSIVE MODE")
            existing = await c.fetchrow("SELECT * FROM settlement_periods WHERE cut_off = $1", cut_off)
            if existing is not None:
                return existing, False
            last = await c.fetchrow("SELECT period_id, cut_off FROM settlement_periods ORDER BY period_id DESC LIMIT 1")
            opened_at = last["cut_off"] if last else EPOCH
            if cut_off <= opened_at:
                raise StoreError(f"cut_off {cut_off.isoformat()} is not after the newest cut "
                                 f"{opened_at.isoformat()}; cuts only move forward")
            period_id = (last["period_id"] + 1) if last else 1
            period = await c.fetchrow(
                """INSERT INTO settlement_periods (period_id, opened_at, cut_off) VALUES ($1, $2, $3)
                   RETURNING *""", period_id, opened_at, cut_off)
            await c.execute(
                """WITH moves AS (
                     SELECT merchant_id,
                            coalesce(sum(amount) FILTER (WHERE kind = 1), 0) AS issued,
                            coalesce(sum(amount) FILTER (WHERE kind = 5), 0) AS earn_refunds,
                            coalesce(sum(amount) FILTER (WHERE kind IN (2, 3)), 0) AS redeemed,
                            coalesce(sum(amount) FILTER (WHERE kind = 4), 0) AS redemption_refunds,
                            sum(fee) AS fees, count(*) AS transactions
                     FROM transactions WHERE created_at >= $2 AND created_at < $3
                     GROUP BY merchant_id),
                   previous AS (SELECT merchant_id, closing_position FROM statements WHERE period_id = $4)
                   INSERT INTO statements
                   SELECT $1, merchant_id, coalesce(p.closing_position, 0),
                          coalesce(m.issued, 0), coalesce(m.earn_refunds, 0), coalesce(m.redeemed, 0),
                          coalesce(m.redemption_refunds, 0), coalesce(m.fees, 0), n.net,
                          coalesce(p.closing_position, 0) + n.net, coalesce(m.transactions, 0)
                   FROM moves m FULL JOIN previous p USING (merchant_id),
                        LATERAL (SELECT coalesce(m.redeemed, 0) - coalesce(m.redemption_refunds, 0)
                                        - coalesce(m.issued, 0) + coalesce(m.earn_refunds, 0)
                                        - coalesce(m.fees, 0) AS net) n""",
                period_id, opened_at, cut_off, period_id - 1)
            return period, True

    async def period_summary(self, period_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            """SELECT p.period_id, p.opened_at, p.cut_off, count(s.merchant_id) AS merchants,
                      coalesce(sum(s.net), 0)::bigint AS net_total, coalesce(sum(s.fees), 0)::bigint AS fees_total
               FROM settlement_periods p LEFT JOIN statements s USING (period_id)
               WHERE p.period_id = $1 GROUP BY p.period_id""", period_id)

    async def statements(self, *, period_id: int = 0, merchant_id: str = "", after: str = "",
                         limit: int = 100) -> list[asyncpg.Record]:
        """One period's statements by merchant id (after `after`), or one merchant's, newest first."""
        if merchant_id:
            return await self.pool.fetch(
                """SELECT s.*, p.opened_at, p.cut_off FROM statements s JOIN settlement_periods p USING (period_id)
                   WHERE s.merchant_id = $1 AND ($2 = 0 OR s.period_id = $2)
                     AND ($3 = '' OR s.period_id < $3::bigint)
                   ORDER BY s.period_id DESC LIMIT $4""", merchant_id, period_id, after, limit)
        return await self.pool.fetch(
            """SELECT s.*, p.opened_at, p.cut_off FROM statements s JOIN settlement_periods p USING (period_id)
               WHERE s.period_id = $1 AND s.merchant_id > $2 ORDER BY s.merchant_id LIMIT $3""",
            period_id, after, limit)

    async def statement_lines(self, period_id: int, merchant_id: str, after_transaction_id: int = 0,
                              limit: int | None = None) -> list[asyncpg.Record]:
        """The merchant's transactions of a period, each with its effect on the merchant's position."""
        return await self.pool.fetch(
            """SELECT t.transaction_id, t.created_at, t.kind, t.member_id, t.amount, t.fee,
                      (CASE t.kind WHEN 1 THEN -t.amount WHEN 5 THEN t.amount WHEN 4 THEN -t.amount
                                   ELSE t.amount END) - t.fee AS net
               FROM settlement_periods p JOIN transactions t
                 ON t.merchant_id = $2 AND t.created_at >= p.opened_at AND t.created_at < p.cut_off
               WHERE p.period_id = $1 AND t.transaction_id > $3 ORDER BY t.transaction_id LIMIT $4""",
            period_id, merchant_id, after_transaction_id, limit)

    # --- scale: a seeded network ---

    async def seed_network(self, merchants: int, members: int, purchase_per_member: int,
                           progress=lambda text: None, chunk_members: int = 200_000) -> None:
        """Creates `merchants` merchants (give-back 3%..20%, redemption fees 0.5%..2.5%, 20 regions) and
        `members` members, each with one earn of a purchase of `purchase_per_member` minor units at a
        merchant spread over the network, posted through the journal like any earn. Runs only while no
        service writes to the database (it takes the writer lock)."""
        await self.acquire_writer_lock()
        try:
            async with self.pool.acquire() as c:
                async with c.transaction():
                    # the service's tail first: each chunk below sets balances directly and moves the
                    # checkpoint past its own transactions
                    await self.fold_checkpoint(c)
                    base = await c.fetchval("SELECT coalesce(max(merchant_slot) + 1, 0) FROM merchants")
                    await c.execute(
                        """INSERT INTO merchants (merchant_id, merchant_slot, give_back_bps, name, region,
                                                  fee_redeemed_bps, fee_issued_bps)
                           SELECT 'seed-m-' || lpad(g::text, 6, '0'), $2 + g - 1, 300 + (g * 37) % 1701,
                                  'Seeded merchant ' || g, 'region-' || (g % 20), 50 + (g * 13) % 201, 0
                           FROM generate_series(1, $1) g""", merchants, base)
                    await c.execute(
                        """INSERT INTO accounts (kind, owner_id, asset_code)
                           SELECT k, m.merchant_id, 'POINTS' FROM merchants m,
                                  unnest(ARRAY['merchant_issued', 'merchant_redeemed', 'merchant_fees', 'merchant_acquiring']) k
                           WHERE m.merchant_id LIKE 'seed-m-%'""")
                progress(f"{merchants} merchants created")
                done = 0
                while done < members:
                    count = min(chunk_members, members - done)
                    async with c.transaction():
                        first_id = await c.fetchval("SELECT coalesce(max(transaction_id), 0) + 1 FROM transactions")
                        await c.execute(
                            """CREATE TEMP TABLE seed_earn ON COMMIT DROP AS
                               SELECT $1::bigint + g - 1 AS transaction_id, 'seed-u-' || lpad(($2 + g)::text, 7, '0')
                                        AS member_id,
                                      'seed-m-' || lpad((1 + ((($2::bigint + g) * 7919) % $3))::text, 6, '0') AS merchant_id
                               FROM generate_series(1, $4) g""", first_id, done, merchants, count)
                        await c.execute("""INSERT INTO members SELECT member_id, now() FROM seed_earn""")
                        await c.execute(
                            """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code,
                                   amount, purchase_amount, idempotency_key, created_at)
                               SELECT s.transaction_id, 1, s.merchant_id, s.member_id, 'POINTS',
                                      $1::bigint * m.give_back_bps / 10000, $1, 'seed-' || s.transaction_id, now()
                               FROM seed_earn s JOIN merchants m USING (merchant_id)""", purchase_per_member)
                        await c.execute(
                            """INSERT INTO accounts (kind, owner_id, asset_code, balance)
                               SELECT 'member', t.member_id, 'POINTS', t.amount
                               FROM transactions t JOIN seed_earn s USING (transaction_id)""")
                        await c.execute(
                            """INSERT INTO entries (transaction_id, account_id, asset_code, amount)
                               SELECT t.transaction_id, a.account_id, 'POINTS', x.amount
                               FROM transactions t JOIN seed_earn s USING (transaction_id),
                                    LATERAL (VALUES ('member', t.member_id, t.amount),
                                                    ('merchant_issued', t.merchant_id, -t.amount)) x(kind, owner, amount)
                               JOIN accounts a ON a.kind = x.kind AND a.owner_id = x.owner AND a.asset_code = 'POINTS'
                               WHERE t.amount <> 0""")
                        await c.execute(
                            """UPDATE accounts a SET balance = a.balance - d.points
                               FROM (SELECT t.merchant_id, sum(t.amount) AS points
                                     FROM transactions t JOIN seed_earn s USING (transaction_id)
                                     GROUP BY t.merchant_id) d
                               WHERE a.kind = 'merchant_issued' AND a.owner_id = d.merchant_id""")
                        await c.execute("""UPDATE balance_checkpoint SET written_at = now(),
                                           through_transaction_id = (SELECT max(transaction_id) FROM transactions)""")
                    done += count
                    progress(f"{done} members created")
        finally:
            await self.release_writer_lock()

    # --- reconciliation (tests and, later, the reconcile command) ---

    async def ledger_discrepancies(self, report=lambda check: None) -> list[str]:
        """Checks the journal against itself, the stored balances and the statements, in one snapshot;
        returns what does not hold. `report` is told the name of each check as it runs."""
        problems: list[str] = []
        async with self.pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
            # whole-journal scans: minutes at tens of millions of rows, not a commit's seconds
            def fetch(sql, *args):
                return c.fetch(sql, *args, timeout=RECONCILE_TIMEOUT_SECONDS)

            def fetchrow(sql, *args):
                return c.fetchrow(sql, *args, timeout=RECONCILE_TIMEOUT_SECONDS)
            report("the journal sums to zero per asset")
            for r in await fetch("SELECT asset_code, sum(amount) AS s FROM entries GROUP BY asset_code"):
                if r["s"] != 0:
                    problems.append(f"journal of {r['asset_code']} sums to {r['s']}, not 0")
            report("every transaction's entries sum to zero")
            for r in await fetch("""SELECT transaction_id, sum(amount) AS s FROM entries
                                      GROUP BY transaction_id HAVING sum(amount) <> 0 LIMIT 5"""):
                problems.append(f"transaction {r['transaction_id']} entries sum to {r['s']}")
            # the journal has no foreign-key triggers (migration 0003): references are checked here
            report("every entry's account and transaction exist, in the entry's asset")
            for r in await fetch("""SELECT e.entry_id, e.transaction_id, e.account_id FROM entries e
                                      LEFT JOIN accounts a USING (account_id)
                                      LEFT JOIN transactions t USING (transaction_id)
                                      WHERE a.account_id IS NULL OR t.transaction_id IS NULL
                                         OR a.asset_code <> e.asset_code LIMIT 5"""):
                problems.append(f"entry {r['entry_id']} refers to transaction {r['transaction_id']} and account "
                                f"{r['account_id']}, which do not both exist in its asset")
            report("every transaction's and hold's merchant and member exist; every refund's original exists")
            for r in await fetch("""SELECT 'transaction ' || t.transaction_id AS what FROM transactions t
                                      WHERE NOT EXISTS (SELECT 1 FROM merchants m WHERE m.merchant_id = t.merchant_id)
                                         OR NOT EXISTS (SELECT 1 FROM members u WHERE u.member_id = t.member_id)
                                         OR (t.original_transaction_id IS NOT NULL AND NOT EXISTS
                                              (SELECT 1 FROM transactions o
                                               WHERE o.transaction_id = t.original_transaction_id))
                                      UNION ALL
                                      SELECT 'hold ' || h.authorization_id FROM holds h
                                      WHERE NOT EXISTS (SELECT 1 FROM merchants m WHERE m.merchant_id = h.merchant_id)
                                         OR NOT EXISTS (SELECT 1 FROM members u WHERE u.member_id = h.member_id)
                                      LIMIT 5"""):
                problems.append(f"{r['what']} refers to a merchant, member or transaction that does not exist")
            report("every account's checkpointed balance (members, merchant positions, operator) equals the "
                   "sum of its entries up to the checkpoint")
            # MATERIALIZED: with LIMIT the planner may otherwise re-run the aggregate per account
            # (measured: hours at 10M transactions instead of a minute)
            for r in await fetch("""WITH e AS MATERIALIZED (
                                        SELECT account_id, sum(amount) AS s FROM entries, balance_checkpoint c
                                        WHERE transaction_id <= c.through_transaction_id GROUP BY account_id)
                                      SELECT a.account_id, a.kind, a.owner_id, a.balance, coalesce(e.s, 0) AS s
                                      FROM accounts a LEFT JOIN e USING (account_id)
                                      WHERE a.balance <> coalesce(e.s, 0) LIMIT 5"""):
                problems.append(f"account {r['kind']}:{r['owner_id']} balance {r['balance']} != entries {r['s']} "
                                "(at the balance checkpoint)")
            report("no member's balance is negative")
            for r in await fetch("""WITH t AS MATERIALIZED (
                                        SELECT e.account_id, sum(e.amount) AS delta FROM entries e, balance_checkpoint c
                                        WHERE e.transaction_id > c.through_transaction_id GROUP BY e.account_id)
                                      SELECT a.owner_id, a.balance + coalesce(t.delta, 0) AS balance
                                      FROM accounts a LEFT JOIN t USING (account_id)
                                      WHERE a.kind = 'member' AND a.balance + coalesce(t.delta, 0) < 0 LIMIT 5"""):
                problems.append(f"member {r['owner_id']} balance {r['balance']} < 0")
            report("no member's open holds exceed its posted balance (available >= 0)")
            for r in await fetch("""SELECT h.member_id, a.balance, sum(h.amount) AS held
                                      FROM holds h JOIN account_balances a
                                        ON a.kind = 'member' AND a.owner_id = h.member_id
                                      WHERE h.status = 1 AND h.expires_at > now()
                                      GROUP BY h.member_id, a.balance
                                      HAVING sum(h.amount) > a.balance LIMIT 5"""):
                problems.append(f"member {r['member_id']} holds {r['held']} > posted {r['balance']}")
            report("no transaction is refunded beyond its amount")
            for r in await fetch("""SELECT transaction_id, amount, refunded FROM transactions
                                      WHERE refunded > amount LIMIT 5"""):
                problems.append(f"transaction {r['transaction_id']} refunded {r['refunded']} > {r['amount']}")
            report("every statement's net equals the merchant's journal entries in its period")
            for r in await fetch(
                    """WITH e AS (
                         SELECT p.period_id, a.owner_id AS merchant_id, sum(e.amount) AS s
                         FROM settlement_periods p
                         JOIN transactions t ON t.created_at >= p.opened_at AND t.created_at < p.cut_off
                         JOIN entries e ON e.transaction_id = t.transaction_id
                         JOIN accounts a ON a.account_id = e.account_id
                           AND a.kind IN ('merchant_issued', 'merchant_redeemed', 'merchant_fees')
                         GROUP BY 1, 2)
                       SELECT coalesce(s.period_id, e.period_id) AS period_id,
                              coalesce(s.merchant_id, e.merchant_id) AS merchant_id, s.net, e.s
                       FROM statements s FULL JOIN e USING (period_id, merchant_id)
                       WHERE coalesce(s.net, 0) <> coalesce(e.s, 0) LIMIT 5"""):
                problems.append(f"statement of {r['merchant_id']} in period {r['period_id']}: net {r['net']} "
                                f"!= journal {r['s']}")
            report("every statement opens at the previous one's closing position")
            for r in await fetch(
                    """SELECT s.merchant_id, s.period_id, s.opening_position, p.closing_position
                       FROM statements s LEFT JOIN statements p
                         ON p.merchant_id = s.merchant_id AND p.period_id = s.period_id - 1
                       WHERE s.opening_position <> coalesce(p.closing_position, 0) LIMIT 5"""):
                problems.append(f"statement of {r['merchant_id']} in period {r['period_id']} opens at "
                                f"{r['opening_position']}, the previous closed at {r['closing_position']}")
            report("net positions + fee revenue + breakage + members' points = 0; fee revenue = fees charged")
            totals = await fetchrow(
                """SELECT coalesce(sum(balance) FILTER (WHERE kind = 'member'), 0) AS members,
                          coalesce(sum(balance) FILTER (WHERE kind LIKE 'merchant_%'), 0) AS merchants,
                          coalesce(sum(balance) FILTER (WHERE kind = 'operator_fee_revenue'), 0) AS revenue,
                          coalesce(sum(balance) FILTER (WHERE kind = 'merchant_fees'), 0) AS fees,
                          coalesce(sum(balance) FILTER (WHERE kind = 'operator_breakage'), 0) AS breakage
                   FROM account_balances""")
            if totals["members"] + totals["merchants"] + totals["revenue"] + totals["breakage"] != 0:
                problems.append(f"net positions {totals['merchants']} + fee revenue {totals['revenue']} + "
                                f"breakage {totals['breakage']} + members' points {totals['members']} != 0")
            if totals["revenue"] != -totals["fees"]:
                problems.append(f"fee revenue {totals['revenue']} != fees charged {-totals['fees']}")
        return problems


# one encoder for every call: json.dumps with arguments builds a new JSONEncoder each time (measured:
# a tenth of the service's CPU under SubmitBatch load went to to_json)
class _Steps:
    """Times the steps of a batch's transaction into points_pipeline_commit_step_seconds."""
    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        metrics.commit_step_seconds.labels(name).observe(now - self._last)
        self._last = now


def _untimed(name: str) -> None:
    """The step clock of a transaction that is not a batch's (checkpoints): times nothing."""


to_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
