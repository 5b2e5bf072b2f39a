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
import os
import pathlib
import socket
import time
import urllib.parse
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import asyncpg
import orjson

from fastpath.copy_binary import CONSTANT, LEG_ACCOUNTS, LEG_AMOUNTS, LEG_ASSETS, LOOKUP, CopyEncoder
from processor import channel_store, idempotency_records, metrics, postgres_settings, rules, rules_rows
from processor.domain import (
    ACCOUNT_MEMBER,
    ACCOUNT_MERCHANT_ACQUIRING,
    ACCOUNT_MERCHANT_FEES,
    ACCOUNT_MERCHANT_ISSUED,
    ACCOUNT_MERCHANT_REDEEMED,
    ASSET_POINTS,
    OPERATOR_ID,
    GIVE_BACK_BPS_MAX,
    GIVE_BACK_BPS_MIN,
    require,
)

NEVER_US = 2**63 - 1  # lot_consumptions.expires_at_us of a piece of never-expiring points
MERCHANT_ACCOUNTS = (
    ACCOUNT_MERCHANT_ISSUED,
    ACCOUNT_MERCHANT_REDEEMED,
    ACCOUNT_MERCHANT_FEES,
    ACCOUNT_MERCHANT_ACQUIRING,
)
# a merchant's VOUCHERS clearing accounts (migration 0006), opened with its first voucher movement:
# vouchers accepted at it (what the operator owes it in cash) and vouchers it holds
MERCHANT_VOUCHER_ACCOUNTS = (ACCOUNT_MERCHANT_REDEEMED, rules.ACCOUNT_MERCHANT_VOUCHERS)

log = logging.getLogger("points.store")

MIGRATIONS = pathlib.Path(__file__).parent / "migrations"
# The single-writer lock: two services writing one ledger would allocate the same ids.
WRITER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"points.v1 writer").digest()[:8], "big", signed=True)
MIGRATION_LOCK_KEY = WRITER_LOCK_KEY ^ 1
APPLICATION_NAME = "points-processor"
PROJECTOR_APPLICATION_NAME = APPLICATION_NAME + "-projector"  # the projector child's sessions (--projector process)
# how often a service waiting for the writer lock (--writer-lock-wait-seconds) asks for it again
WRITER_LOCK_POLL_SECONDS = 0.5
# The largest ids any table holds, for the high-water check at recovery and in reconcile: an
# authorization lives in holds, in voucher_holds (a vouchers-only hold), or in both under one id.
_LARGEST_IDS = """(SELECT coalesce(max(transaction_id), 0) FROM transactions) AS largest_transaction,
                  greatest((SELECT coalesce(max(authorization_id), 0) FROM holds),
                           (SELECT coalesce(max(authorization_id), 0) FROM voucher_holds)) AS largest_authorization"""
RECONCILE_TIMEOUT_SECONDS = 6 * 3600.0
# a settlement cut reads every entry on merchants' accounts in its period (measured: 1.2 s per 500,000
# transactions), more than a commit's timeout for a long first period
SETTLEMENT_TIMEOUT_SECONDS = 3600.0
# A merchant's statement lines are kept as their ids, written at the cut in chunks of at most this many
# (statement_line_ids, migration 0024; its CHECK allows up to 8,192): 16 KB of ids a chunk, so a page of
# lines reads and detoasts one or two chunks whatever the merchant's size, and the cut writes one row per
# 2,048 lines rather than an index entry per operation.
STATEMENT_LINE_CHUNK_IDS_MAX = 2048
STATEMENT_LINE_CHUNK_IDS_CEILING = 8192  # migration 0024's CHECK
# A new program version starts at least this far ahead, so the running service has loaded it by then.
PROGRAM_LEAD_SECONDS = 1
PROGRAM_START_US_MAX = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z, the latest a Timestamp holds
# The planner settings of a projection's transaction (Store.project_batches), set in its first statement.
# Its writes join a batch's keys (unnest of a few to a few thousand) against tables of every member or
# lot; with hash joins allowed Postgres plans a sequential scan of the whole table and a hash of it for
# each statement while the table is below a few hundred thousand rows (lots: ~4 ms a projection at 90k
# lots and growing with the table, measured with auto_explain), where an index probe a key costs the
# same at any size. Local to the transaction (set_config(..., true)).
PROJECTION_PLANNER = "set_config('enable_hashjoin', 'off', true) AS no_hash_join, set_config('enable_mergejoin', 'off', true) AS no_merge_join"
# A projection's first statement: its mark, row-locked, and PROJECTION_PLANNER's settings
PROJECTION_MARK = f"SELECT through_batch_id FROM projection_state, {PROJECTION_PLANNER} FOR UPDATE OF projection_state"
# the lots a projection deletes, by their whole key (tests/integration/test_projection_plans.py: planned
# as probes of the primary key under PROJECTION_PLANNER)
LOTS_DELETE = """DELETE FROM lots l USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS g(m, i, e)
                 WHERE l.member_id = g.m AND l.lot_id = g.i AND l.expires_at_us = g.e"""
PROGRAM_CHANNEL = "points_program"  # NOTIFY channel; the payload is the program_id of a new version


class StoreError(Exception):
    """Postgres said no, for a reason the operator must fix (not a transient fault)."""


class WriterFenced(StoreError):
    """Another service has taken the writer role (bumped ledger_writer.epoch): this one must stop."""


class WriterLockLost(Exception):
    """The session holding the writer lock is gone: the fast path must be rebuilt and the lock taken again."""


class ProjectionGap(StoreError):
    """The projector was handed a batch that does not follow projection_state's mark (a bug): the
    pipeline resynchronises, which projects the log in order."""


# ---------------------------------------------------------------------------------------------------
# Where the database is


def embedded_server_url(data_dir: str, database_name: str, settings_overrides: str = "") -> str:
    """Starts (or reuses) the embedded Postgres of the pgserver package under data_dir, with the
    engine's settings, creates the database if missing, and returns its URL. The postmaster outlives
    this process, so data and a running server survive restarts of the service."""
    directory = pathlib.Path(data_dir).expanduser().resolve() / "pg"
    directory.mkdir(parents=True, exist_ok=True)
    fresh = not (directory / "PG_VERSION").exists()
    server = start_embedded_server(directory, settings_overrides, cleanup_mode=None)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database_name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database_name}";')
    # the one line a newcomer needs; pgserver's own (initdb, pg_ctl command lines) are at DEBUG
    log.info(
        "embedded Postgres " + ("created" if fresh else "running"),
        extra={"data_dir": str(directory), "database": database_name, "log_file": str(directory / "log")},
    )
    uri = urllib.parse.urlsplit(server.get_uri())
    return urllib.parse.urlunsplit(uri._replace(path="/" + database_name))


def start_embedded_server(directory: pathlib.Path, settings_overrides: str = "", cleanup_mode: str | None = None):
    """pgserver's server in `directory` (started, or the running one), with postgres_settings.embedded()
    in its postgresql.auto.conf (ALTER SYSTEM: kept in the data directory, so a fresh directory and an
    existing one end the same). Settings a reload applies take effect at once; shared_buffers and
    wal_buffers need a restart, done here only when no other client is connected (a fresh directory, a
    server this process started); otherwise a warning says they apply at the next restart. Returns the
    pgserver.PostgresServer (its cleanup_mode as pgserver.get_server's)."""
    import warnings

    with warnings.catch_warnings():  # pgserver's platformdirs warns about XDG_RUNTIME_DIR on servers
        warnings.simplefilter("ignore")
        import pgserver  # heavy import; only needed without DATABASE_URL

    wanted = postgres_settings.embedded(settings_overrides)
    server = pgserver.get_server(str(directory), cleanup_mode=cleanup_mode)
    psql = _embedded_psql(server, pathlib.Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql")
    # quoted as a string: Postgres parses it with the setting's own units ('64MB', '15min', '0.9')
    psql(*(f"ALTER SYSTEM SET {name} = '{value}'" for name, value in wanted.items()), "SELECT pg_reload_conf()")
    # pg_file_settings reads the files afresh: `applied` is false for a restart-only setting whose
    # value differs from the running server's (no race with the reload signal)
    pending = psql(
        "SELECT name FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf' AND NOT applied ORDER BY name"
    )
    if pending:
        # pgserver's lock serialises starts of this directory between processes: another one starting
        # now waits here rather than connecting between the count and the stop
        with pgserver.PostgresServer._lock:
            others = int(
                psql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )[0]
            )
            if not others:
                pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=directory, user=server.system_user, timeout=60)
                server.ensure_postgres_running()  # starts it as pgserver does, and records the new postmaster
        if others:
            log.warning(
                "embedded Postgres settings apply at its next restart (other clients are connected)",
                extra={"settings": pending, "clients": others, "data_dir": str(directory)},
            )
        else:
            log.info("embedded Postgres restarted for its settings", extra={"settings": pending})
    return server


def _embedded_psql(server, binary: pathlib.Path) -> Callable[..., list[str]]:
    """psql on the embedded server, unaligned and tuples only: runs each statement, returns the
    output's lines; StoreError with Postgres's message when one fails (e.g. a bad override)."""
    import subprocess

    def run(*statements: str) -> list[str]:
        command = [str(binary), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", server.get_uri()]
        for statement in statements:
            command += ["-c", statement]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise StoreError(f"embedded Postgres: {done.stderr.strip()}")
        return done.stdout.splitlines()

    return run


async def log_server_settings(pool: asyncpg.Pool, embedded: bool, settings_overrides: str = "") -> None:
    """Logs, once at start, the settings that matter (durability, memory, WAL) of the server in use,
    and a warning for each far from the documented ones (README "Postgres settings"). Changes nothing:
    an external server (DATABASE_URL) is its operator's to set."""
    try:
        rows = await pool.fetch(
            "SELECT name, setting, unit, current_setting(name) AS shown FROM pg_settings WHERE name = ANY($1::text[])",
            list(postgres_settings.REPORTED),
        )
    except (asyncpg.PostgresError, OSError, asyncio.TimeoutError) as error:  # a report: never a reason not to start
        log.warning("postgres settings not read", extra={"error": str(error)})
        return
    documented = (
        postgres_settings.embedded(settings_overrides)
        if embedded
        else postgres_settings.sized(postgres_settings.memory_bytes())
    )
    shown, hints = postgres_settings.check(
        [postgres_settings.Setting(r["name"], r["setting"], r["unit"], r["shown"]) for r in rows], documented
    )
    ordered = {name: shown[name] for name in postgres_settings.REPORTED if name in shown}
    log.info("postgres settings", extra={"server": "embedded" if embedded else "DATABASE_URL", **ordered})
    for hint in hints:
        log.warning("postgres setting far from the documented one (README: Postgres settings)", extra={"hint": hint})


def resolve_database_url(database_url: str, data_dir: str, database_name: str, settings_overrides: str = "") -> str:
    if database_url:
        return database_url
    return embedded_server_url(data_dir, database_name, settings_overrides)


# query parameters of a libpq/asyncpg URL whose value is a secret
SECRET_URL_PARAMETERS = frozenset({"password", "sslpassword"})


def redact(url: str) -> str:
    """The URL without its passwords (in the userinfo and in ?password= / ?sslpassword=), for logs."""
    parts = urllib.parse.urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if at and user.partition(":")[2]:
        parts = parts._replace(netloc=user.partition(":")[0] + ":***@" + host)
    if parts.query:
        pairs = [pair.partition("=") for pair in parts.query.split("&")]
        parts = parts._replace(
            query="&".join(
                name + equals + ("***" if urllib.parse.unquote_plus(name).lower() in SECRET_URL_PARAMETERS else value)
                for name, equals, value in pairs
            )
        )
    return urllib.parse.urlunsplit(parts)


def url_secrets(url: str) -> set[str]:
    """The passwords a URL carries, as written and percent-decoded: for logs.hide, which scrubs them
    from every log line, including exceptions' messages that quote the URL or a part of it."""
    found: set[str] = set()
    parts = urllib.parse.urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    if at and ":" in user:
        found.add(user.partition(":")[2])
    for pair in parts.query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and urllib.parse.unquote_plus(name).lower() in SECRET_URL_PARAMETERS:
            found.add(value)
    return {
        form
        for secret in found
        if secret
        for form in (secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret))
    }


async def _reset_pooled(connection: asyncpg.Connection) -> None:
    """What a pool connection needs before it is reused: a transaction left open rolled back (asyncpg
    does it, and drops the listeners client-side, before it calls this; checked again here). asyncpg's
    default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every
    release: a round trip and four statements a batch (3% of the service's CPU under unary load, py-spy), undoing session state no pool
    connection here takes: session advisory locks and LISTEN are on connections of their own
    (acquire_writer_lock, listen_program_changes, the projector's LISTEN, migrate), settings are SET LOCAL
    or set_config(..., true), temporary tables ON COMMIT DROP, and no cursor outlives its transaction
    (tests/integration/test_pool_reset.py checks each of these stays so)."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


# ---------------------------------------------------------------------------------------------------
# Migrations


def migration_files() -> list[tuple[int, pathlib.Path]]:
    """The migrations this version carries, (version, file) in the order they apply: NNNN_*.sql."""
    return sorted((int(path.name.split("_", 1)[0]), path) for path in MIGRATIONS.glob("*.sql"))


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
        for version, path in migration_files():
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(path.read_text())
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                )
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
        return {
            ACCOUNT_MERCHANT_ISSUED: self.issued_account_id,
            ACCOUNT_MERCHANT_REDEEMED: self.redeemed_account_id,
            ACCOUNT_MERCHANT_FEES: self.fees_account_id,
        }[kind]


MERCHANT_COLUMNS = (
    "merchant_id, merchant_slot, give_back_bps, status, name, region, fee_redeemed_bps, "
    "fee_issued_bps, created_at, updated_at"
)
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
    # (transaction_id, account_id, amount[, asset]): amount is added to the account's balance (POINTS unless asset)
    entries: list[tuple[int, int, int] | tuple[int, int, int, str]] = dataclasses.field(default_factory=list)
    # (transaction_id, point-units refunded now)
    refunds: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # (authorization_id, merchant_id, member_id, amount, expires_at, idempotency_key)
    new_holds: list[tuple] = dataclasses.field(default_factory=list)
    # (authorization_id, status, captured, capture_transaction_id|None)
    resolved_holds: list[tuple[int, int, int, int | None]] = dataclasses.field(default_factory=list)
    expired_holds: list[int] = dataclasses.field(default_factory=list)
    # (merchant_id, idempotency_key, method, request json, outcome, response json|None, message)
    idempotency: list[tuple] = dataclasses.field(default_factory=list)
    # the program rules' rows (processor.program.RulesWrite), or None when no program applies
    rules: Any = None
    # (account_id, kind, owner_id, asset_code): accounts the rules open (voucher accounts), ids reserved
    new_accounts: list[tuple[int, str, str, str]] = dataclasses.field(default_factory=list)
    # the last transaction and authorization ids handed out so far (this batch's included): written
    # to ledger_writer in the same transaction, the one place recovery continues from
    last_transaction_id: int = 0
    last_authorization_id: int = 0
    # member administration's rows (processor.member_postings.MemberWrite), or None when the batch has none
    members: Any = None
    # transaction_id -> the member's posted balance right after it (processor/events.py balances_after):
    # transactions.member_balance_after, what the change feed shows
    member_balances_after: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.members is not None
            or self.idempotency
            or self.expired_holds
            or self.transactions
            or (self.rules is not None and not self.rules.empty)
        )


# The projection's bulk rows go to Postgres as a binary COPY stream encoded in C
# (fastpath/copy_binary.pyx), not through asyncpg's per-value Python codecs (its timestamptz encoder alone
# was ~2.2 µs of a transactions row's 3.3). Per table: (column, its type in processor/migrations, where
# the value comes from: an index into the row tuple BatchWrite/RulesWrite holds, CONSTANT for one value a
# batch such as its created_at, encoded once a batch, or LOOKUP). The types must be the columns' own:
# binary COPY does not cast (tests/integration/test_copy_binary.py checks them against the catalog).
TRANSACTIONS_COPY = (
    ("transaction_id", "bigint", 0),
    ("kind", "smallint", 1),
    ("merchant_id", "text", 2),
    ("member_id", "text", 3),
    ("asset_code", "text", CONSTANT),
    ("amount", "bigint", 4),
    ("purchase_amount", "bigint", 5),
    ("authorization_id", "bigint", 6),
    ("original_transaction_id", "bigint", 7),
    ("idempotency_key", "text", 8),
    ("created_at", "timestamptz", CONSTANT),
    ("fee", "bigint", 9),
    ("program_version", "integer", 10),  # a shorter row: NULL
    ("member_balance_after", "bigint", LOOKUP),  # BatchWrite.member_balances_after[transaction_id]
    # the transaction's legs (migration 0022) from BatchWrite.entries, grouped by the encoder in C
    # (add(legs=...)); a row with none: NO_LEGS
    ("leg_accounts", "bigint[]", LEG_ACCOUNTS),
    ("leg_amounts", "bigint[]", LEG_AMOUNTS),
    ("leg_assets", "text[]", LEG_ASSETS),  # NULL when every leg is POINTS
)
# the legs of a transaction row with none: the arrays empty, never NULL (migration 0022; readers unnest
# them without a coalesce)
NO_LEGS = {"leg_accounts": (), "leg_amounts": (), "leg_assets": None}
HOLDS_COPY = (
    ("authorization_id", "bigint", 0),
    ("merchant_id", "text", 1),
    ("member_id", "text", 2),
    ("asset_code", "text", CONSTANT),
    ("amount", "bigint", 3),
    ("status", "smallint", CONSTANT),
    ("expires_at", "timestamptz", 4),
    ("created_at", "timestamptz", CONSTANT),
    ("idempotency_key", "text", 5),
)
LOTS_COPY = (
    ("member_id", "text", 0),
    ("lot_id", "bigint", 1),
    ("expires_at_us", "bigint", 2),
    ("issuer_id", "text", 3),
    ("amount", "bigint", 4),
)
LOT_CONSUMPTIONS_COPY = (
    ("owner_kind", "smallint", 0),
    ("owner_id", "bigint", 1),
    ("lot_id", "bigint", 2),
    ("expires_at_us", "bigint", 3),
    ("issuer_id", "text", 4),
    ("amount", "bigint", 5),
)
EARN_RULES_COPY = (
    ("transaction_id", "bigint", 0),
    ("base_point_units", "bigint", 1),
    ("uplift_point_units", "bigint", 2),
    ("acquirer_id", "text", 3),
    ("acquiring_point_units", "bigint", 4),
    ("refunded_base_point_units", "bigint", 5),
    ("grants", "jsonb", 6),
)
SPLIT_TENDERS_COPY = (
    ("transaction_id", "bigint", 0),
    ("member_id", "text", 1),
    ("merchant_id", "text", 2),
    ("vouchers", "bigint", 3),
    ("points", "bigint", 4),
    ("from_credit", "bigint", 5),
    ("refunded", "bigint", 6),
)
TIER_EVENTS_COPY = (
    ("transaction_id", "bigint", 0),
    ("member_id", "text", 1),
    ("from_level", "text", 2),
    ("to_level", "text", 3),
    ("created_at", "timestamptz", CONSTANT),
)
COPY_COLUMNS = {
    "transactions": TRANSACTIONS_COPY,
    "holds": HOLDS_COPY,
    "lots": LOTS_COPY,
    "lot_consumptions": LOT_CONSUMPTIONS_COPY,
    "earn_rules": EARN_RULES_COPY,
    "split_tenders": SPLIT_TENDERS_COPY,
    "tier_events": TIER_EVENTS_COPY,
}


async def copy_rows(c: asyncpg.Connection, rows: CopyEncoder, timeout: float) -> None:
    """Sends an encoder's rows by COPY FROM STDIN (FORMAT binary), asyncpg's public copy_to_table."""
    await c.copy_to_table(rows.table, source=rows.finish(), columns=list(rows.names), format="binary", timeout=timeout)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def micros(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def from_micros(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value // 1_000_000, dt.timezone.utc).replace(microsecond=value % 1_000_000)


def _iso_us(value: int) -> str:
    """A time in microseconds since the epoch as ISO 8601 UTC, for messages."""
    try:
        return from_micros(value).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{value} us since the epoch"


class Store:
    """A connection pool on the ledger database, plus the writer lock connection."""

    # the ids of a chunk of statement lines close_period writes (a test sets a small one to page across
    # chunks); a class attribute, so a store made without __init__ has it too
    statement_line_chunk_ids_max: int = STATEMENT_LINE_CHUNK_IDS_MAX

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
        self._writer_epoch: int | None = None  # the fencing token while this service is the writer
        self._program_listener: asyncpg.Connection | None = None
        self._program_tasks: set[asyncio.Task] = set()

    @classmethod
    async def open(
        cls,
        url: str,
        pool_connections_max: int = 8,
        command_timeout: float = 30.0,
        application_name: str = APPLICATION_NAME,
    ) -> "Store":
        # A session stopped inside a transaction (its process SIGSTOPped, its host frozen) is ended by
        # Postgres after twice the command timeout: it would otherwise hold ledger_writer's row lock,
        # and a service taking over would wait for it forever.
        idle_ms = int(max(2 * command_timeout, 1.0) * 1000)
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=pool_connections_max,
            command_timeout=command_timeout,
            timeout=command_timeout,
            server_settings={"application_name": application_name, "idle_in_transaction_session_timeout": str(idle_ms)},
            reset=_reset_pooled,
        )
        return cls(pool, url, connect_timeout=command_timeout)

    async def close(self) -> None:
        await self.stop_listening()
        if self._writer_lock is not None and not self._writer_lock.is_closed():
            await self._writer_lock.close()
        await self.pool.close()

    async def migrate(self) -> list[str]:
        # a connection of its own, closed after: migrate() holds a session advisory lock, which a pool
        # connection's reset (_reset_pooled) would not release if the unlock never ran
        connection = await asyncpg.connect(self.url, timeout=self.connect_timeout)
        try:
            return await migrate(connection)
        finally:
            await connection.close()

    async def acquire_writer_lock(self, wait_seconds: float = 0.0) -> None:
        """Holds a session advisory lock for the life of the service: one writer per ledger; waits up to
        `wait_seconds` for another service to let it go. Then takes the fencing token: bumps
        ledger_writer.epoch after SELECT ... FOR UPDATE, which waits until every transaction of the
        previous writer still open has committed or aborted, so none of them lands after this one has
        loaded its state (migration 0008)."""
        connection = await asyncpg.connect(
            self.url, timeout=self.connect_timeout, server_settings={"application_name": APPLICATION_NAME + "-lock"}
        )
        try:
            deadline = time.monotonic() + wait_seconds
            while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", WRITER_LOCK_KEY):
                if time.monotonic() >= deadline:
                    raise StoreError(
                        "another points service is already writing to this database "
                        "(advisory lock held); stop it or point --database-url elsewhere"
                        + (f" (waited {wait_seconds:g} s for it)" if wait_seconds else "")
                    )
                await asyncio.sleep(min(WRITER_LOCK_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            holder = f"{APPLICATION_NAME} {socket.gethostname()} pid {os.getpid()}"
            async with connection.transaction():
                await self._fence_previous_writer(connection)
                self._writer_epoch = await connection.fetchval(
                    "UPDATE ledger_writer SET epoch = epoch + 1, holder = $1, taken_at = now() RETURNING epoch",
                    holder,
                    timeout=self.recovery_timeout,
                )
            require(self._writer_epoch is not None, "ledger_writer has its one row (migration 0008)")
            self._writer_lock_pid, self._writer_lock_started = await connection.fetchrow(
                "SELECT pid, backend_start FROM pg_stat_get_activity(pg_backend_pid())"
            )
        except BaseException:
            connection.terminate()
            raise
        self._writer_lock = connection
        log.info("writer lock taken", extra={"epoch": self._writer_epoch})

    async def _fence_previous_writer(self, connection: asyncpg.Connection) -> None:
        """Locks ledger_writer's row FOR UPDATE inside the caller's transaction: waits for every open
        transaction of the previous writer (a batch, a checkpoint) to end. One that is still open after
        twice the commit timeout belongs to a writer that is stalled (SIGSTOPped, its host frozen: its
        session may even be inside a COPY, which no idle timeout ends) and has lost its lock session, so
        it is no longer the writer: its sessions are terminated and their transactions roll back."""
        wait_ms = int(max(2 * self.connect_timeout, 1.0) * 1000)
        while True:
            try:
                async with connection.transaction():  # a savepoint: a lock timeout leaves the caller's alive
                    await connection.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                    await connection.execute(
                        "SELECT epoch FROM ledger_writer FOR UPDATE", timeout=self.recovery_timeout
                    )
                return
            except asyncpg.LockNotAvailableError:
                stale = [
                    r["pid"]
                    for r in await connection.fetch(
                        """SELECT DISTINCT pid FROM pg_locks WHERE relation = 'ledger_writer'::regclass
                       AND granted AND pid <> pg_backend_pid()"""
                    )
                ]
                log.warning(
                    "the previous writer's transactions are still open past twice the commit timeout; "
                    "ending their sessions",
                    extra={"pids": stale},
                )
                await connection.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", stale)

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
        # the epoch stays: a batch may still write while no other service has taken the role

    # --- merchants (CLI now; the admin API later) ---

    async def add_merchant(
        self,
        merchant_id: str,
        give_back_bps: int,
        *,
        name: str = "",
        region: str = "",
        fee_redeemed_bps: int = 0,
        fee_issued_bps: int = 0,
        give_back_bounds: tuple[int, int] = (GIVE_BACK_BPS_MIN, GIVE_BACK_BPS_MAX),
    ) -> MerchantRow:
        """Creates a merchant and its issued, redeemed and fees accounts. StoreError if it exists.
        give_back_bounds: the rates allowed (give_back_bounds(program_id) for the program's)."""
        low, high = give_back_bounds
        if not low <= give_back_bps <= high:
            raise StoreError(
                f"give-back rate {give_back_bps} bps is outside {low}..{high} ({low / 100:g}%..{high / 100:g}%), "
                "the bounds of the program"
            )
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
                merchant_id,
                give_back_bps,
                name,
                region,
                fee_redeemed_bps,
                fee_issued_bps,
            )
            if not created:
                raise StoreError(f"merchant {merchant_id!r} exists already")
            await connection.executemany(
                "INSERT INTO accounts (kind, owner_id, asset_code) VALUES ($1, $2, $3)",
                [(kind, merchant_id, ASSET_POINTS) for kind in MERCHANT_ACCOUNTS],
            )
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
                merchant_id,
                *[changes[n] for n in names],
            )
            row = await connection.fetchrow(f"{MERCHANT_SELECT} WHERE m.merchant_id = $1", merchant_id)
        return MerchantRow(**dict(row)) if row else None

    async def merchants(self, after_slot: int = -1, limit: int | None = None) -> list[MerchantRow]:
        rows = await self.pool.fetch(
            f"""{MERCHANT_SELECT} WHERE m.merchant_slot > $1 ORDER BY m.merchant_slot LIMIT $2""",
            after_slot,
            limit,
            timeout=self.recovery_timeout,
        )
        return [MerchantRow(**dict(r)) for r in rows]

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        row = await self.pool.fetchrow(f"{MERCHANT_SELECT} WHERE m.merchant_id = $1", merchant_id)
        return MerchantRow(**dict(row)) if row else None

    async def program_state(self, program_id: str) -> dict[str, list]:
        """The program rules' state for start-up: member links and tiers, expiring lots, the pieces open
        holds and refundable redemptions consumed, and the promotions' points granted."""
        timeout = self.recovery_timeout
        return {
            "members": await self.pool.fetch(
                """SELECT member_id, acquirer_id, referrer_id, referral_paid, level, levels_reached,
                          qualifying_point_units, day_buckets::text AS day_buckets FROM member_programs""",
                timeout=timeout,
            ),
            # in no order: ledger_load groups them by member and sorts each member's (since migration
            # 0018 lots' key starts with expires_at_us, so an ORDER BY member_id sorts the whole table.
            # Postgres's time for 1M lots on this machine: 1.5 s in the old key's order, 4.7-6 s
            # sorted, 0.2-0.6 s in no order)
            "lots": await self.pool.fetch(
                "SELECT member_id, lot_id, expires_at_us, issuer_id, amount FROM lots", timeout=timeout
            ),
            "pieces": await self.pool.fetch(
                """SELECT owner_kind, owner_id, lot_id, expires_at_us, issuer_id, amount FROM lot_consumptions
                   ORDER BY owner_kind, owner_id, expires_at_us, lot_id""",
                timeout=timeout,
            ),
            "budgets": await self.pool.fetch(
                "SELECT promotion_id, granted FROM promotion_budgets WHERE program_id = $1", program_id, timeout=timeout
            ),
        }

    async def earn_records(self, transaction_ids: Iterable[int]) -> list[asyncpg.Record]:
        """earn_rules rows (with the earn's member, merchant, version and time) of these transactions."""
        return await self.pool.fetch(
            """SELECT e.transaction_id, e.base_point_units, e.uplift_point_units, e.acquirer_id,
                      e.acquiring_point_units, e.refunded_base_point_units, e.grants::text AS grants,
                      t.member_id, t.merchant_id, t.program_version, t.created_at
               FROM earn_rules e JOIN transactions t USING (transaction_id)
               WHERE e.transaction_id = ANY($1::bigint[])""",
            list(transaction_ids),
        )

    async def split_records(self, transaction_ids: Iterable[int]) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT transaction_id, member_id, merchant_id, vouchers, points, from_credit, refunded
               FROM split_tenders WHERE transaction_id = ANY($1::bigint[])""",
            list(transaction_ids),
        )

    async def voucher_holds(self, authorization_ids: Iterable[int] | None = None) -> list[asyncpg.Record]:
        """Split-tender holds: those named (any status), or every open one (start-up)."""
        columns = """authorization_id, member_id, merchant_id, vouchers, from_credit, points, status, transaction_id,
                     (extract(epoch FROM expires_at) * 1000000)::bigint AS expires_at_us"""
        if authorization_ids is None:
            return await self.pool.fetch(
                f"SELECT {columns} FROM voucher_holds WHERE status = 1", timeout=self.recovery_timeout
            )
        return await self.pool.fetch(
            f"SELECT {columns} FROM voucher_holds WHERE authorization_id = ANY($1::bigint[])", list(authorization_ids)
        )

    async def voucher_state(self, program_id: str) -> dict[str, list]:
        """Voucher accounts and merchants' points accounts (ids and balances; both opened by the batch
        that first credits them) and the program's rounds so far, for start-up."""
        timeout = self.recovery_timeout
        return {
            "accounts": await self.pool.fetch(
                """SELECT account_id, kind, owner_id, balance FROM account_balances
                   WHERE (asset_code = 'VOUCHERS' OR kind = 'merchant_points') AND owner_id <> $1""",
                OPERATOR_ID,
                timeout=timeout,
            ),
            "rounds": await self.pool.fetch(
                """SELECT round_number, pool_point_units FROM dividend_rounds WHERE program_id = $1
                   ORDER BY round_number DESC LIMIT 1""",
                program_id,
                timeout=timeout,
            ),
            "unposted": await self.pool.fetchval(
                "SELECT count(*) FROM dividend_allocations WHERE program_id = $1 AND transaction_id IS NULL",
                program_id,
                timeout=timeout,
            ),
        }

    async def unposted_allocations(self, program_id: str, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT round_number, holder_kind, holder_id, amount FROM dividend_allocations
               WHERE program_id = $1 AND transaction_id IS NULL
               ORDER BY round_number, holder_kind, holder_id LIMIT $2""",
            program_id,
            limit,
        )

    async def decide_dividend_round(self, program_id: str, version: "rules.ProgramVersion", timeout: float):
        """If the pool is due a round under `version`'s dividend settings, decides it at one snapshot
        (pool, holdings) and stores the round and all its allocations, as the writer; returns the
        rules.DividendRound, or None when no round is due. The pool is every point-unit issued net of
        refunds of earns (minus the issuing accounts' balances, the merchant match and sign-up bonuses
        included); a member holds its POINTS balance, a merchant its net position when positive (what the
        operator owes it) plus the points it holds from the merchant match (issue 16)."""
        settings = version.dividends
        decided = None

        async def write(c: asyncpg.Connection, step) -> None:
            nonlocal decided
            pool = -await c.fetchval(
                """SELECT coalesce(sum(balance), 0)::bigint FROM account_balances
                   WHERE asset_code = 'POINTS' AND kind IN ('merchant_issued', 'operator_tier_rewards',
                         'operator_promotions', 'operator_referrals', 'operator_merchant_match',
                         'operator_signup_bonuses')""",
                timeout=timeout,
            )
            last = await c.fetchrow(
                """SELECT round_number, pool_point_units FROM dividend_rounds WHERE program_id = $1
                   ORDER BY round_number DESC LIMIT 1""",
                program_id,
            )
            number = (last["round_number"] if last else 0) + 1
            if pool <= 0 or not rules.dividend_due(settings, pool, last["pool_point_units"] if last else None):
                return
            # every holding in one statement: one snapshot of the balances (the round's cut)
            holdings = {
                rules.Holder(r["k"], r["owner_id"]): r["holding"]
                for r in await c.fetch(
                    """SELECT 'member' AS k, owner_id, balance AS holding FROM account_balances
                   WHERE kind = 'member' AND asset_code = 'POINTS' AND balance > 0
                   UNION ALL
                   SELECT 'merchant', owner_id, holding FROM (
                     SELECT owner_id, (greatest(sum(balance) FILTER (WHERE kind <> 'merchant_points'), 0)
                                       + coalesce(sum(balance) FILTER (WHERE kind = 'merchant_points'), 0))::bigint
                                      AS holding
                     FROM account_balances
                     WHERE kind LIKE 'merchant\\_%' AND asset_code = 'POINTS' GROUP BY owner_id) h
                   WHERE holding > 0""",
                    timeout=timeout,
                )
            }
            decided = rules.dividend_round(number, pool, rules.dividend_rate_bps(settings, number), holdings)
            await c.execute(
                """INSERT INTO dividend_rounds (program_id, round_number, program_version, pool_point_units, rate_bps,
                                                holdings_point_units, total_issued, holders, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())""",
                program_id,
                number,
                version.version,
                pool,
                decided.rate_bps,
                decided.holdings_point_units,
                decided.total_issued,
                len(decided.allocations),
            )
            await c.copy_records_to_table(
                "dividend_allocations",
                columns=["program_id", "round_number", "holder_kind", "holder_id", "holding", "amount"],
                records=[
                    (program_id, number, a.holder.kind, a.holder.owner_id, a.holding_point_units, a.amount)
                    for a in decided.allocations
                ],
                timeout=timeout,
            )

        await self._as_writer(write, timeout)
        return decided

    async def tier_history(self, member_id: str, limit: int = 10) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT transaction_id, from_level, to_level, created_at FROM tier_events
               WHERE member_id = $1 ORDER BY created_at DESC, transaction_id DESC LIMIT $2""",
            member_id,
            limit,
        )

    async def operator_account_ids(self) -> dict[str, int]:
        """account kind -> account id of the operator's own accounts (fee revenue, breakage)."""
        rows = await self.pool.fetch(
            """SELECT kind, account_id FROM accounts
               WHERE kind LIKE 'operator%' AND owner_id = $1""",
            OPERATOR_ID,
            timeout=self.recovery_timeout,
        )
        return {r["kind"]: r["account_id"] for r in rows}

    async def reserve_account_ids(self, count: int) -> list[int]:
        """`count` account ids taken from the accounts sequence, for the accounts of members the pipeline
        creates: journal entries are then written by id (COPY) with no look-up. Ids taken and never
        used leave gaps, like any sequence."""
        return [
            r[0]
            for r in await self.bounded(
                lambda c: c.fetch(
                    """SELECT nextval(pg_get_serial_sequence('accounts', 'account_id')) FROM generate_series(1, $1)""",
                    count,
                ),
                self.read_timeout,
            )
        ]

    # --- credentials ---

    async def insert_api_key(
        self,
        key_id: str,
        secret_sha256: bytes,
        kind: str,
        merchant_ids: list[str],
        description: str,
        expires_at: dt.datetime | None = None,
    ) -> None:
        missing = await self.pool.fetch(
            "SELECT m FROM unnest($1::text[]) AS m WHERE NOT EXISTS (SELECT 1 FROM merchants WHERE merchant_id = m)",
            merchant_ids,
        )
        if missing:
            raise StoreError(f"no merchant {missing[0]['m']!r}: create it before issuing its key")
        await self.pool.execute(
            """INSERT INTO api_keys (key_id, secret_sha256, kind, merchant_ids, description, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            key_id,
            secret_sha256,
            kind,
            merchant_ids,
            description,
            expires_at,
        )

    async def api_key(self, key_id: str, pool: asyncpg.Pool | None = None) -> asyncpg.Record | None:
        """The key's row; through `pool` if given (the authenticator's own small pool, so a flood of
        look-ups never takes the committer's connections)."""
        return await (pool or self.pool).fetchrow(
            "SELECT key_id, secret_sha256, kind, merchant_ids, revoked_at, expires_at FROM api_keys WHERE key_id = $1",
            key_id,
        )

    async def touch_api_keys(self, used: dict[str, dt.datetime], pool: asyncpg.Pool | None = None) -> None:
        """Sets last_used_at of each key (one statement for all of them; never moves it backwards)."""
        await (pool or self.pool).execute(
            """UPDATE api_keys k SET last_used_at = u.at
               FROM unnest($1::text[], $2::timestamptz[]) AS u(key_id, at)
               WHERE k.key_id = u.key_id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)""",
            list(used),
            list(used.values()),
        )

    async def api_keys(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT key_id, kind, merchant_ids, description, created_at, expires_at, revoked_at, last_used_at
               FROM api_keys ORDER BY created_at, key_id"""
        )

    async def revoke_api_key(self, key_id: str) -> dt.datetime | None:
        return await self.pool.fetchval(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1
               RETURNING revoked_at""",
            key_id,
        )

    # --- program versions ---
    # A program's rules are versions (program_versions, processor/rules.py): each applies from its
    # effective_from_us onward and is never changed or deleted. A new version is announced on the
    # channel PROGRAM_CHANNEL, in its own transaction, so a running service reloads it at once.

    async def program(self, program_id: str) -> rules.Program | None:
        """Every stored version of the program, oldest first; None if it has none."""
        rows = await self.pool.fetch(
            """SELECT version, effective_from_us, config::text AS config FROM program_versions
               WHERE program_id = $1 ORDER BY version""",
            program_id,
            timeout=self.recovery_timeout,
        )
        return rules.program_from_rows(program_id, rows)

    async def give_back_bounds(self, program_id: str) -> tuple[int, int]:
        """Seed 000 (issue 16): the give-back rates (bps) a merchant may be given: those of the program's
        latest stored version (the one in force, or about to be: a version starts a moment after it is
        stored), or the defaults without one. Earns check the version in force as well."""
        row = await self.pool.fetchrow(
            """SELECT config->'give_back_bps_min' AS low, config->'give_back_bps_max' AS high FROM program_versions
               WHERE program_id = $1 ORDER BY version DESC LIMIT 1""",
            program_id,
        )
        low = json.loads(row["low"]) if row is not None and row["low"] is not None else GIVE_BACK_BPS_MIN
        high = json.loads(row["high"]) if row is not None and row["high"] is not None else GIVE_BACK_BPS_MAX
        return low, high

    async def add_program_version(
        self, program_id: str, effective_from_us: int | None, config: dict, created_by: str = ""
    ) -> rules.ProgramVersion:
        """Stores the next version of the program (version 1 starts it): `config` as
        rules.version_from_config reads it, in force from effective_from_us (None: PROGRAM_LEAD_SECONDS
        from now). The start must be at least PROGRAM_LEAD_SECONDS ahead, so the running service loads
        the version before it applies, and after the previous version's start. ConfigError for a
        configuration that cannot be used, StoreError for a start that is not allowed."""
        async with self.pool.acquire() as connection, connection.transaction():
            # one writer at a time, so two versions cannot take the same number
            await connection.execute("LOCK TABLE program_versions IN SHARE ROW EXCLUSIVE MODE")
            previous = await connection.fetchrow(
                """SELECT version, effective_from_us FROM program_versions WHERE program_id = $1
                   ORDER BY version DESC LIMIT 1""",
                program_id,
            )
            version = previous["version"] + 1 if previous else 1
            earliest_us = time.time_ns() // 1000 + PROGRAM_LEAD_SECONDS * 1_000_000
            if effective_from_us is None:
                effective_from_us = earliest_us
            stored = rules.version_from_config(program_id, version, effective_from_us, config)
            if effective_from_us > PROGRAM_START_US_MAX:
                raise StoreError(
                    f"version {version} of program {program_id!r} would start at {effective_from_us} us "
                    f"since the epoch, after 9999-12-31: give a start in microseconds, not nanoseconds"
                )
            if effective_from_us < earliest_us:
                raise StoreError(
                    f"version {version} of program {program_id!r} would start at {_iso_us(effective_from_us)}, "
                    f"less than {PROGRAM_LEAD_SECONDS} s from now ({_iso_us(earliest_us - PROGRAM_LEAD_SECONDS * 1_000_000)}): "
                    f"a change applies from a time onward, never to the past; give a later start, or none "
                    f"for {PROGRAM_LEAD_SECONDS} s from now"
                )
            if previous is not None and effective_from_us <= previous["effective_from_us"]:
                raise StoreError(
                    f"version {version} of program {program_id!r} would start at {_iso_us(effective_from_us)}, "
                    f"not after version {previous['version']} (from {_iso_us(previous['effective_from_us'])}); "
                    f"versions apply in order: give a start after {_iso_us(previous['effective_from_us'])}"
                )
            await connection.execute(
                """INSERT INTO program_versions (program_id, version, effective_from_us, config, created_by)
                   VALUES ($1, $2, $3, $4::jsonb, $5)""",
                program_id,
                version,
                effective_from_us,
                json.dumps(rules.version_to_config(stored)),
                created_by,
            )
            await connection.execute("SELECT pg_notify($1, $2)", PROGRAM_CHANNEL, program_id)
        log.info(
            "program version stored",
            extra={
                "program_id": program_id,
                "version": version,
                "effective_from_us": effective_from_us,
                "created_by": created_by,
            },
        )
        return stored

    async def listen_program_changes(self, callback) -> None:
        """Calls callback(program_id) on the event loop each time a version of a program is stored (by
        any process: this service, another one, the CLI); a coroutine it returns runs as a task. Uses a
        connection of its own, closed by stop_listening() or close(). The listener does not reconnect:
        if its connection is lost, notices are missed until listen_program_changes is called again, so
        a caller that must not miss one also re-reads program() after (re)starting to listen."""
        await self.stop_listening()
        loop = asyncio.get_running_loop()

        def notified(connection, pid, channel, payload) -> None:
            result = callback(payload)
            if asyncio.iscoroutine(result):
                task = loop.create_task(result, name="program-change")
                self._program_tasks.add(task)
                task.add_done_callback(self._program_tasks.discard)

        connection = await asyncpg.connect(
            self.url, timeout=self.connect_timeout, server_settings={"application_name": APPLICATION_NAME + "-listen"}
        )
        try:
            await connection.add_listener(PROGRAM_CHANNEL, notified)
        except BaseException:
            await connection.close()
            raise
        self._program_listener = connection

    async def stop_listening(self) -> None:
        connection, self._program_listener = self._program_listener, None
        if connection is not None and not connection.is_closed():
            await connection.close()

    # --- start-up loads ---

    async def member_balances(self, chunk_rows: int = 50_000) -> AsyncIterator[list[tuple[str, int, int]]]:
        """Every member's (member_id, posted balance, account_id), in chunks (a server-side cursor keeps
        memory bounded)."""
        async with self.pool.acquire() as connection, connection.transaction(readonly=True):
            cursor = await connection.cursor(
                "SELECT owner_id, balance, account_id FROM account_balances WHERE kind = $1 AND asset_code = $2",
                ACCOUNT_MEMBER,
                ASSET_POINTS,
            )
            while True:
                rows = await cursor.fetch(chunk_rows, timeout=self.recovery_timeout)
                if not rows:
                    return
                yield [(r[0], r[1], r[2]) for r in rows]

    async def open_holds(self, now: dt.datetime) -> list[HoldRow]:
        rows = await self.pool.fetch(
            """SELECT authorization_id, merchant_id, member_id, amount, status, expires_at
               FROM holds WHERE status = 1 AND expires_at > $1""",
            now,
            timeout=self.recovery_timeout,
        )
        return [self._hold(r) for r in rows]

    async def id_high_water_marks(self) -> tuple[int, int]:
        """(last transaction_id, last authorization_id) handed out: ledger_writer's marks, written with
        every batch. The tables' largest ids are read too, only to refuse to go on below them: a row
        written around the service (a tool, a restore) would otherwise be given an id again."""
        row = await self.pool.fetchrow(
            f"""SELECT w.last_transaction_id AS t, w.last_authorization_id AS a, {_LARGEST_IDS}
                FROM ledger_writer w""",
            timeout=self.recovery_timeout,
        )
        require(row is not None, "ledger_writer has its one row (migration 0008)")
        if row["largest_transaction"] > row["t"] or row["largest_authorization"] > row["a"]:
            log.error(
                "ids in the ledger above ledger_writer's high-water marks (rows written around the "
                "service); continuing after the largest; run reconcile",
                extra={
                    "marks": [row["t"], row["a"]],
                    "largest": [row["largest_transaction"], row["largest_authorization"]],
                },
            )
        return max(row["t"], row["largest_transaction"]), max(row["a"], row["largest_authorization"])

    # --- prefetch before a batch ---

    async def stored_outcomes(
        self, candidates: Mapping[tuple[str, str], Sequence[int]]
    ) -> dict[tuple[str, str], StoredOutcome]:
        """The stored outcomes of keys, given the batches whose idempotency_batches rows may hold each
        (IdempotencyTable.maybe_stored): the rows are read by primary key, in one round trip, and a key
        not in its candidates' rows has no record (a fingerprint shared with another key). The
        records are durable with their batch's log append: no wait for the projection. A key found in
        two rows (written around the service) answers with the older record, the first one answered."""
        if not candidates:
            return {}
        # a key's candidates are the table's entries with its home slot and 24-bit remainder: its own, and
        # rarely another key's (~ load x 2**-24 per look-up, processor/idempotency.py). Each candidate row's
        # small `keys` is read; its `records` (~10x larger, TOASTed) only when a wanted key's JSON string
        # occurs in its keys (a byte search in Postgres: a false candidate costs no records read)
        batch_ids = sorted({batch_id for ids in candidates.values() for batch_id in ids})
        wanted_ids = [batch_id for ids in candidates.values() for batch_id in ids]
        needles = [orjson.dumps(key[1]) for key, ids in candidates.items() for _ in ids]
        rows = await self.bounded(
            lambda c: c.fetch(
                """SELECT b.batch_id, b.keys,
                          CASE WHEN EXISTS (SELECT 1 FROM unnest($2::bigint[], $3::bytea[]) AS w(batch_id, needle)
                                            WHERE w.batch_id = b.batch_id AND position(w.needle IN b.keys) > 0)
                               THEN b.records END AS records
                   FROM idempotency_batches b WHERE b.batch_id = ANY($1::bigint[]) ORDER BY b.batch_id""",
                batch_ids,
                wanted_ids,
                needles,
            ),
            self.read_timeout,
        )
        found: dict[tuple[str, str], StoredOutcome] = {}
        for row in rows:
            wanted = {
                key
                for key, ids in candidates.items()
                if key not in found and row["batch_id"] in ids  # the oldest record of a key wins
            }
            if not wanted or row["records"] is None:
                continue
            positions = [
                (i, key) for i, key in enumerate(idempotency_records.decode_keys(row["keys"])) if key in wanted
            ]
            if not positions:
                continue  # the fingerprints matched, the keys did not: none of them is stored here
            methods, requests, outcomes, responses, messages = idempotency_records.decode_records(row["records"])
            for i, key in positions:
                found.setdefault(
                    key, StoredOutcome(methods[i], requests[i], outcomes[i], responses[i], messages[i] or "")
                )
        return found

    async def idempotency_keys(
        self, chunk_rows_max: int = 50_000
    ) -> tuple[int, AsyncIterator[list[tuple[int, list[tuple[str, str]]]]]]:
        """Every stored (merchant_id, idempotency_key) with the batch id of the row holding it, for the
        in-memory table a recovery rebuilds (processor/idempotency.py): the records' count (to size the
        table), and (batch id, its keys) in batch id order, in chunks of batches holding about
        `chunk_rows_max` keys, read by a cursor in one snapshot (bounded memory on any table size). Only
        the rows' small `keys` column is read."""
        estimate = await self.pool.fetchval(
            "SELECT coalesce(sum(operations), 0)::bigint FROM idempotency_batches", timeout=self.recovery_timeout
        )
        # a row holds 1 to batch_operations_max keys: a fetch of this many rows is ~2-20 MB at most
        batches_per_chunk = max(1, chunk_rows_max // 100)

        async def chunks() -> AsyncIterator[list[tuple[int, list[tuple[str, str]]]]]:
            async with self.pool.acquire() as connection, connection.transaction(readonly=True):
                cursor = await connection.cursor(
                    "SELECT batch_id, keys FROM idempotency_batches ORDER BY batch_id", timeout=self.recovery_timeout
                )
                while rows := await cursor.fetch(batches_per_chunk, timeout=self.recovery_timeout):
                    yield [(r[0], idempotency_records.decode_keys(r[1])) for r in rows]

        return int(estimate or 0), chunks()

    async def holds(self, authorization_ids: Iterable[int]) -> list[HoldRow]:
        ids = list(authorization_ids)
        rows = await self.bounded(
            lambda c: c.fetch(
                """SELECT authorization_id, merchant_id, member_id, amount, status, expires_at
               FROM holds WHERE authorization_id = ANY($1::bigint[])""",
                ids,
            ),
            self.read_timeout,
        )
        return [self._hold(r) for r in rows]

    async def transactions(self, transaction_ids: Iterable[int]) -> list[TransactionRow]:
        ids = list(transaction_ids)
        rows = await self.bounded(
            lambda c: c.fetch(
                """SELECT transaction_id, kind, merchant_id, member_id, amount, refunded
               FROM transactions WHERE transaction_id = ANY($1::bigint[])""",
                ids,
            ),
            self.read_timeout,
        )
        return [TransactionRow(**dict(r)) for r in rows]

    @staticmethod
    def _hold(r: asyncpg.Record) -> HoldRow:
        return HoldRow(
            r["authorization_id"], r["merchant_id"], r["member_id"], r["amount"], r["status"], micros(r["expires_at"])
        )

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
            acquiring.add_done_callback(
                lambda t: t.cancelled() or t.exception() or loop.create_task(self.pool.release(t.result()))
            )
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
        await self._as_writer(
            lambda connection, step: self._write(connection, batch, timeout, step),
            timeout,
            marks=(batch.last_transaction_id, batch.last_authorization_id),
        )

    def writer_fence(self) -> tuple[int, int, dt.datetime]:
        """(writer epoch, lock session pid, lock session backend_start): what a fenced statement
        checks (processor/batch_log.py's append); WriterLockLost when this service is not the writer."""
        if self._writer_epoch is None or self._writer_lock_pid is None or self._writer_lock_started is None:
            raise WriterLockLost("this service does not hold the writer lock; not writing")
        return self._writer_epoch, self._writer_lock_pid, self._writer_lock_started

    def use_writer_fence(self, fence: tuple[int, int, dt.datetime]) -> None:
        """Writes fenced by another process's writer role (the projector process, started by the service
        that holds it): its transactions check that epoch and that lock session, as the service's do."""
        self._writer_epoch, self._writer_lock_pid, self._writer_lock_started = fence

    async def project_batches(
        self, batches: Sequence[tuple[int, BatchWrite]], timeout: float, notify_channel: str | None = None
    ) -> int:
        """Writes the relational rows of consecutive batch-log batches (batch_id, BatchWrite), oldest
        first, in ONE transaction, fenced as every writer transaction, and advances
        projection_state.through_batch_id in it, guarded by its previous value (read FOR UPDATE, so two
        projections never interleave): batches at or below it are skipped (an earlier projection whose
        COMMIT's answer was lost), so nothing is projected twice. Returns the mark after. Each batch's
        rows are written by _write, exactly as a batch's own transaction wrote them before the log.
        With `notify_channel`, the mark after is pg_notify'd on it in the same transaction (delivered
        only if it commits: the projector process tells the service what is visible)."""
        through_after = 0

        async def write(connection: asyncpg.Connection, step) -> None:
            nonlocal through_after
            # PROJECTION_PLANNER (no extra round trip): every statement below applies a batch's keyed
            # changes to a large table, which an index probe a key does best at any size
            through = await connection.fetchval(PROJECTION_MARK, timeout=timeout)
            todo = [(batch_id, batch) for batch_id, batch in batches if batch_id > through]
            for offset, (batch_id, _) in enumerate(todo):
                if batch_id != through + 1 + offset:
                    raise ProjectionGap(
                        f"batch {batch_id} is next to project but projection_state is at {through}: "
                        "the batches between are missing; resynchronising from the log"
                    )
            await self._write_many(connection, [batch for _, batch in todo], timeout, step)
            # a batch of log format 1 or 2 carries its idempotency records (format 3's are inserted with
            # its append, and the committer hands the projector its batches without them): their row,
            # unless an earlier projection's COMMIT put it there already
            legacy = [
                (batch_id, batch.created_at, *row)
                for batch_id, batch in todo
                if (row := idempotency_records.encode(batch.idempotency)) is not None
            ]
            if legacy:
                await connection.executemany(
                    """INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
                       VALUES ($1, $2, $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING""",
                    legacy,
                    timeout=timeout,
                )
                step("idempotency")
            if todo:
                moved = await connection.execute(
                    "UPDATE projection_state SET through_batch_id = $2 WHERE through_batch_id = $1",
                    through,
                    todo[-1][0],
                    timeout=timeout,
                )
                require(moved == "UPDATE 1", f"projection_state moved from {through} under its row lock")
            through_after = todo[-1][0] if todo else through
            if notify_channel is not None:
                await connection.execute(
                    "SELECT pg_notify($1, $2)", notify_channel, str(through_after), timeout=timeout
                )

        await self._as_writer(write, timeout, timed=True)
        return through_after

    async def _as_writer(
        self, write, timeout: float, marks: tuple[int, int] | None = None, *, timed: bool = False
    ) -> None:
        """Runs `write(connection, step)` in one transaction on a pool connection, fenced (see
        _check_writer_lock), all within `timeout` seconds (bounded). With `marks` (batches: the last
        transaction and authorization ids handed out), the fence records them. With marks or `timed`
        (projections), each step is timed into points_pipeline_commit_step_seconds."""

        async def work(connection):
            transaction = connection.transaction()
            await transaction.start()
            step = _Steps() if marks is not None or timed else _untimed
            try:
                await self._check_writer_lock(connection, marks)
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

    async def _check_writer_lock(self, connection: asyncpg.Connection, marks: tuple[int, int] | None) -> None:
        """Inside the writer's transaction, in one round trip: the fence, then the lock session.

        The fence holds until COMMIT: a batch updates ledger_writer WHERE epoch is ours (a row lock
        FOR NO KEY UPDATE, with the ids it hands out), another writer transaction locks the row FOR KEY
        SHARE; a service taking over bumps the epoch after FOR UPDATE, which waits for both. A fenced
        writer finds no row and writes nothing, whatever its lock session's fate.
        The lock session: a session advisory lock is released only with its session, so the session
        being alive (the same backend, not a later one with the same pid) means we hold the lock. If
        it died, nothing is written and the pipeline resynchronises, taking the lock again or stopping.
        Measured: pg_locks cost about 2 ms a batch; this look-up of one backend a few µs."""
        if self._writer_epoch is None or self._writer_lock_pid is None:
            raise WriterLockLost("this service does not hold the writer lock; not writing")
        if marks is None:
            fence = "SELECT 1 FROM ledger_writer WHERE epoch = $1 FOR KEY SHARE"
            args: tuple = ()
        else:
            fence = """UPDATE ledger_writer SET last_transaction_id = greatest(last_transaction_id, $3),
                                                last_authorization_id = greatest(last_authorization_id, $4)
                       WHERE epoch = $1 RETURNING 1"""
            args = marks
        row = await connection.fetchrow(
            f"""WITH fence AS ({fence})
                SELECT (SELECT count(*) FROM fence) AS fenced_in,
                       (SELECT backend_start FROM pg_stat_get_activity($2)) AS lock_started""",
            self._writer_epoch,
            self._writer_lock_pid,
            *args,
        )
        if row["fenced_in"] != 1:
            raise WriterFenced(
                f"another points service took the writer role (this one's epoch "
                f"{self._writer_epoch} is over); not writing"
            )
        if row["lock_started"] != self._writer_lock_started:
            raise WriterLockLost("this service no longer holds the writer lock; not writing")

    async def _write(self, c: asyncpg.Connection, b: BatchWrite, timeout: float, step) -> None:
        await self._write_many(c, [b], timeout, step)

    async def _write_many(self, c: asyncpg.Connection, batches: Sequence[BatchWrite], timeout: float, step) -> None:
        """Writes the rows of consecutive batches, oldest first, in the caller's transaction. The two
        bulk inserts (transactions with their legs, holds) are one COPY each for all the
        batches (each row keeps its own batch's created_at); the rest runs batch by batch, in order,
        after the inserts it may depend on (a hold or a transaction created by an earlier batch of the
        group is inserted before a later one resolves or refunds it). So a projection of several
        batches costs about the round trips of one."""
        for b in batches:
            at = b.created_at
            if b.new_members:
                member_ids = [m[0] for m in b.new_members]
                await c.execute(
                    """INSERT INTO members (member_id, created_at) SELECT unnest($1::text[]), $2""",
                    member_ids,
                    at,
                    timeout=timeout,
                )
                # no ON CONFLICT: a member the fast path did not know but Postgres did is a bug, and the
                # batch must fail rather than post to an account id that does not exist
                await c.execute(
                    """INSERT INTO accounts (account_id, kind, owner_id, asset_code) OVERRIDING SYSTEM VALUE
                                   SELECT unnest($1::bigint[]), $3, unnest($2::text[]), $4""",
                    [m[1] for m in b.new_members],
                    member_ids,
                    ACCOUNT_MEMBER,
                    ASSET_POINTS,
                    timeout=timeout,
                )
                step("members")
            if b.new_accounts:
                await c.execute(
                    """INSERT INTO accounts (account_id, kind, owner_id, asset_code) OVERRIDING SYSTEM VALUE
                                   SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])""",
                    *[list(x) for x in zip(*b.new_accounts)],
                    timeout=timeout,
                )
                step("accounts")
        # The two bulk inserts are binary COPY streams encoded in C from the batches' own row tuples
        # (TRANSACTIONS_COPY ... say which item is which column); a batch's created_at is encoded once
        # for all its rows.
        if any(b.transactions for b in batches):
            stream = CopyEncoder("transactions", TRANSACTIONS_COPY)
            for b in batches:
                # member_balance_after: the member's balance after the transaction, by its id; the legs
                # ride in their transaction's row (migration 0022: no entries rows)
                stream.add(
                    b.transactions,
                    {"asset_code": ASSET_POINTS, "created_at": b.created_at, "program_version": None, **NO_LEGS},
                    lookup=b.member_balances_after,
                    legs=b.entries,
                    legs_asset=ASSET_POINTS,
                )
            await copy_rows(c, stream, timeout)
            step("transactions")
        else:
            require(not any(b.entries for b in batches), "a batch has entries and no transaction rows to hold them")
        if any(b.new_holds for b in batches):
            stream = CopyEncoder("holds", HOLDS_COPY)
            for b in batches:
                stream.add(b.new_holds, {"asset_code": ASSET_POINTS, "status": 1, "created_at": b.created_at})
            await copy_rows(c, stream, timeout)
            step("holds")
        for b in batches:
            await self._write_updates(c, b, timeout, step, grouped=True)
        # the rules' state rows once for the group, each at its latest state (processor/rules_rows.py):
        # after every batch's updates, which touch none of their tables
        rules_writes = [(b.rules, b.created_at) for b in batches if b.rules is not None and not b.rules.empty]
        if rules_writes:
            await self._write_rules(c, None, None, timeout, step, rows=rules_rows.coalesce(rules_writes))
        # no idempotency records: a batch's are in its idempotency_batches row, inserted with its log
        # append (processor/batch_log.py), or by project_batches for a batch of an older log format

    async def _write_updates(
        self, c: asyncpg.Connection, b: BatchWrite, timeout: float, step, grouped: bool = False
    ) -> None:
        """One batch's updates of rows already there (refunds, hold resolutions and expiries) and its
        rules' and member administration's rows. `grouped`: its caller writes the rules' state rows for
        all its batches at once (_write_many: _write_rules with `rows`), so only the batch's rules events
        are written here; otherwise all its rules' rows (_write_rules)."""
        at = b.created_at
        if b.refunds:
            await c.execute(
                """UPDATE transactions t SET refunded = t.refunded + r.points
                   FROM (SELECT transaction_id, sum(points)::bigint AS points
                         FROM unnest($1::bigint[], $2::bigint[]) AS r(transaction_id, points)
                         GROUP BY transaction_id) r
                   WHERE t.transaction_id = r.transaction_id""",
                [r[0] for r in b.refunds],
                [r[1] for r in b.refunds],
                timeout=timeout,
            )
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
                *[list(x) for x in zip(*b.resolved_holds)],
                at,
                timeout=timeout,
            )
            require(
                updated == len(b.resolved_holds),
                f"holds: {updated} of {len(b.resolved_holds)} resolutions found an open hold",
            )
            step("hold_resolutions")
        if b.expired_holds:
            await c.execute(
                """UPDATE holds SET status = 4, resolved_at = expires_at
                   WHERE authorization_id = ANY($1::bigint[]) AND status = 1""",
                b.expired_holds,
                timeout=timeout,
            )
            step("hold_expiries")
        if b.rules is not None and not b.rules.empty:
            if grouped:
                await self._write_rules_events(c, b.rules, at, timeout)
            else:
                await self._write_rules(c, b.rules, at, timeout, step)
            step("rules")
        if b.members is not None:  # member administration (processor/member_postings.py)
            from processor import events, member_store

            # its member events are positioned right after this batch's transactions (events.py)
            await c.execute(
                f"SELECT set_config('{events.PROJECTED_BATCH_SETTING}', $1, true)",
                str(b.last_transaction_id),
                timeout=timeout,
            )
            await member_store.write(c, b.members, at, timeout)
            step("members_admin")

    @staticmethod
    async def _write_rules(
        c: asyncpg.Connection,
        r,
        at: dt.datetime | None,
        timeout: float,
        step,
        rows: rules_rows.RulesRows | None = None,
    ) -> None:
        """The program rules' rows of one batch (processor.program.RulesWrite `r`, at its time `at`),
        beside its journal rows: member links and tiers, lots, consumed pieces, promotion budgets, earn
        records, split tenders, then its events (_write_rules_events). Or, given `rows` (and no `r`), the
        state rows of a group of batches, each at its latest state (processor/rules_rows.py): what
        _write_many writes once for its batches, whose events its per-batch loop writes."""
        if rows is None:
            require(at is not None, "_write_rules: one batch's rules need its time")
            rows = rules_rows.coalesce([(r, at)])
        if rows.members:
            # MERGE, not INSERT ... ON CONFLICT DO UPDATE: a member already there (nearly every one: an
            # earn's member) is found by one join and updated, without a speculative insertion's index
            # probe and the row lock that ON CONFLICT takes and logs before its update (python -m
            # loadtest.rules_write: ~20% less Postgres CPU for these rows, ~40% fewer WAL records). The
            # single writer (fenced) is the only one inserting members' rows, so no insertion races it.
            # The rows go as one array of a composite type (migration 0018), not an array per column:
            # asyncpg checks every element of an array against collections.abc in Python (~0.3 µs
            # each), 13 checks a member in 8 arrays against 4 for its row (~10% of the client CPU of
            # the rules' rows, same script). Measured again in the eighth session (rules_write, 3 runs
            # each against the composite array): an array per column cost Postgres +0.2..+0.7 µs/op and
            # the client +1.2; COPY into a temporary table (ON COMMIT DROP, the pool's rule) and MERGE
            # from it Postgres +2.3..+3.1 (its catalog rows each transaction), the client -0.3..-0.4; and
            # a nested loop forced (SET LOCAL enable_hashjoin = off) instead of the hash join Postgres
            # plans at 20k members, no difference. Kept as is.
            linked_at = rows.linked_at
            await c.execute(
                """MERGE INTO member_programs p
                   USING unnest($1::member_program_row[]) AS x ON p.member_id = x.member_id
                   WHEN MATCHED THEN UPDATE SET
                     acquirer_id = x.acquirer_id, referrer_id = x.referrer_id, referral_paid = x.referral_paid,
                     level = x.level, levels_reached = x.levels_reached,
                     qualifying_point_units = x.qualifying_point_units, day_buckets = x.day_buckets,
                     linked_at = coalesce(p.linked_at, x.linked_at)
                   WHEN NOT MATCHED THEN INSERT (member_id, acquirer_id, referrer_id, referral_paid, level,
                                                levels_reached, qualifying_point_units, day_buckets, linked_at)
                     VALUES (x.member_id, x.acquirer_id, x.referrer_id, x.referral_paid, x.level,
                             x.levels_reached, x.qualifying_point_units, x.day_buckets, x.linked_at)""",
                [
                    (
                        m,
                        v.acquirer_id,
                        v.referrer_id,
                        v.referral_paid,
                        v.level,
                        v.levels_reached,
                        v.qualifying,
                        # no tier window (the kernel's members): "{}" without a json.dumps each
                        json.dumps({str(day): amount for day, amount in v.day_buckets}) if v.day_buckets else "{}",
                        # linked when first linked (kept after): the first batch's time with a link
                        linked_at.get(m) if linked_at else None,
                    )
                    for m, v in rows.members.items()
                ],
                timeout=timeout,
            )
            step("rules_member_programs")
        if rows.lots_gone or rows.lots_created or rows.lots_changed:
            if rows.lots_gone:
                await c.execute(
                    LOTS_DELETE,
                    *[list(column) for column in zip(*rows.lots_gone)],
                    timeout=timeout,
                )
            # a lot the batch created is COPYed (no array decoding, no speculative insertion: ~700 of
            # a batch's lots at 70% earns); one it changed is merged (updated, or inserted: a restore may
            # bring back a lot an earlier batch deleted). A MERGE, not INSERT ... ON CONFLICT DO UPDATE
            # (member_programs below says why): joined against lots it was planned as a scan of the whole
            # table below ~50k lots, but PROJECTION_PLANNER makes it a probe of the primary key a row as
            # ON CONFLICT's. Measured (python -m loadtest.projector_cpu --statements, program in force,
            # two runs each side by side): the same Postgres CPU (0.88-0.89 against 0.89-0.90 µs/op),
            # WAL 26.3-26.7 -> 17.6-17.8 B/op (no speculative insertion's record). Should a created key
            # exist after all, COPY fails the batch on the primary key (the service resyncs) rather than
            # overwrite it.
            if rows.lots_created:
                stream = CopyEncoder("lots", LOTS_COPY)
                stream.add(rows.lots_created)
                await copy_rows(c, stream, timeout)
            if rows.lots_changed:
                # issuer_id too: a lot a group deleted and restored is upserted whole, as the batches one
                # by one would have deleted and inserted it (the issuer is the lot's earn's: the same)
                await c.execute(
                    """MERGE INTO lots l USING unnest($1::lot_row[]) AS x
                         ON l.expires_at_us = x.expires_at_us AND l.lot_id = x.lot_id AND l.member_id = x.member_id
                       WHEN MATCHED THEN UPDATE SET amount = x.amount, issuer_id = x.issuer_id
                       WHEN NOT MATCHED THEN INSERT (member_id, lot_id, expires_at_us, issuer_id, amount)
                         VALUES (x.member_id, x.lot_id, x.expires_at_us, x.issuer_id, x.amount)""",
                    rows.lots_changed,  # rows as one composite array (member_programs above says why)
                    timeout=timeout,
                )
            step("rules_lots")
        if rows.pieces:
            # the pieces of an owner are replaced; an owner new in these batches has none to delete (a
            # redemption of the kernel's run: one DELETE probe of the primary key fewer per redeem)
            owners = [owner for owner in rows.pieces if owner not in rows.pieces_new]
            if owners:
                await c.execute(
                    """DELETE FROM lot_consumptions l USING unnest($1::smallint[], $2::bigint[]) AS o(k, i)
                       WHERE l.owner_kind = o.k AND l.owner_id = o.i""",
                    [o[0] for o in owners],
                    [o[1] for o in owners],
                    timeout=timeout,
                )
            records = [
                (
                    kind,
                    owner,
                    piece.lot_id,
                    NEVER_US if piece.expires_at_us is None else piece.expires_at_us,
                    piece.issuer_id,
                    piece.amount,
                )
                for (kind, owner), pieces in rows.pieces.items()
                for piece in pieces
            ]
            if records:
                stream = CopyEncoder("lot_consumptions", LOT_CONSUMPTIONS_COPY)
                stream.add(records)
                await copy_rows(c, stream, timeout)
            step("rules_lot_consumptions")
        for program_id, budgets in rows.budgets.items():
            await c.execute(
                """INSERT INTO promotion_budgets (program_id, promotion_id, granted)
                   SELECT $1, p, g FROM unnest($2::text[], $3::bigint[]) AS x(p, g)
                   ON CONFLICT (program_id, promotion_id) DO UPDATE SET granted = excluded.granted""",
                program_id,
                list(budgets),
                list(budgets.values()),
                timeout=timeout,
            )
        earns_new = rows.earns_new
        created = [
            (
                t,
                e.earn.base,
                e.earn.uplift,
                e.acquirer_id,
                e.acquiring,
                e.refunded_base,
                # most earns have no grants: their "[]" without a json.dumps each
                json.dumps([[g.promotion_id, g.sponsor_id, g.amount] for g in e.earn.grants])
                if e.earn.grants
                else "[]",
            )
            for t, e in rows.earns.items()
            if t in earns_new
        ]
        if created:
            stream = CopyEncoder("earn_rules", EARN_RULES_COPY)
            stream.add(created)
            await copy_rows(c, stream, timeout)
        # earns from before these batches whose refunded_base they changed (none when every earn is new)
        old = [(t, e) for t, e in rows.earns.items() if t not in earns_new] if len(created) < len(rows.earns) else []
        if old:
            await c.execute(
                """UPDATE earn_rules e SET refunded_base_point_units = x.r
                   FROM unnest($1::bigint[], $2::bigint[]) AS x(t, r) WHERE e.transaction_id = x.t""",
                [t for t, _ in old],
                [e.refunded_base for _, e in old],
                timeout=timeout,
            )
        new_splits = [(t, x) for t, x in rows.splits.items() if t in rows.splits_new]
        if new_splits:
            stream = CopyEncoder("split_tenders", SPLIT_TENDERS_COPY)
            stream.add(
                [
                    (t, x.member_id, x.merchant_id, x.vouchers, x.points, x.from_credit, x.refunded)
                    for t, x in new_splits
                ]
            )
            await copy_rows(c, stream, timeout)
        old_splits = [(t, x) for t, x in rows.splits.items() if t not in rows.splits_new]
        if old_splits:
            await c.execute(
                """UPDATE split_tenders s SET refunded = x.r
                   FROM unnest($1::bigint[], $2::bigint[]) AS x(t, r) WHERE s.transaction_id = x.t""",
                [t for t, _ in old_splits],
                [x.refunded for _, x in old_splits],
                timeout=timeout,
            )
        if r is not None:
            await Store._write_rules_events(c, r, at, timeout)

    @staticmethod
    async def _write_rules_events(c: asyncpg.Connection, r, at: dt.datetime, timeout: float) -> None:
        """One batch's rules rows that record what happened at its time, written batch by batch in order
        (not coalesced): voucher holds created or resolved, dividend allocations posted, level changes
        (tier_events, whose trigger positions a member event after its transaction)."""
        if r.voucher_holds:
            rows = list(r.voucher_holds.items())
            await c.execute(
                """INSERT INTO voucher_holds AS v (authorization_id, member_id, merchant_id, vouchers, from_credit,
                                                  points, expires_at, status, created_at, resolved_at, transaction_id)
                   SELECT a, m, x, v, cr, p, e, st, $10::timestamptz,
                          CASE WHEN st = 1 THEN NULL ELSE $10::timestamptz END, t
                   FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                               $7::timestamptz[], $8::smallint[], $9::bigint[]) AS u(a, m, x, v, cr, p, e, st, t)
                   ON CONFLICT (authorization_id) DO UPDATE
                   SET status = excluded.status, resolved_at = excluded.resolved_at,
                       transaction_id = excluded.transaction_id
                   WHERE v.status = 1""",
                [a for a, _ in rows],
                [h.member_id for _, h in rows],
                [h.merchant_id for _, h in rows],
                [h.vouchers for _, h in rows],
                [h.from_credit for _, h in rows],
                [h.points for _, h in rows],
                [from_micros(h.expires_at_us) for _, h in rows],
                [h.status for _, h in rows],
                [h.transaction_id for _, h in rows],
                at,
                timeout=timeout,
            )
        if r.dividends_posted:
            updated = await c.fetchval(
                """WITH u AS (UPDATE dividend_allocations a SET transaction_id = x.t
                              FROM unnest($2::int[], $3::text[], $4::text[], $5::bigint[]) AS x(n, k, h, t)
                              WHERE a.program_id = $1 AND a.round_number = x.n AND a.holder_kind = x.k
                                AND a.holder_id = x.h AND a.transaction_id IS NULL RETURNING 1)
                   SELECT count(*) FROM u""",
                r.program_id,
                *[list(x) for x in zip(*r.dividends_posted)],
                timeout=timeout,
            )
            require(
                updated == len(r.dividends_posted),
                f"dividends: {updated} of {len(r.dividends_posted)} allocations were still unposted",
            )
        if r.tier_events:
            stream = CopyEncoder("tier_events", TIER_EVENTS_COPY)
            stream.add(r.tier_events, {"created_at": at})
            await copy_rows(c, stream, timeout)

    async def write_checkpoint(self, previous: int, through: int, timeout: float) -> int:
        """Folds the journal's entries of transactions (previous, through] into accounts.balance and
        moves the checkpoint from `previous` to `through`, in one transaction of its own, as the writer;
        returns how many accounts changed. The sums are Postgres's, from the entries themselves (the
        caller passes a `through` the projection has written: every entry up to it is there, no later
        one is needed), so the service keeps no per-entry sums. The checkpoint moves only from
        `previous` (nothing is folded twice). It runs beside the batches: they insert journal rows and
        never update accounts, so neither waits for the other."""
        changed = 0

        async def write(connection: asyncpg.Connection, step) -> None:
            nonlocal changed
            require(through >= previous, f"checkpoint through transaction {through} would move back from {previous}")
            moved = await connection.execute(
                """UPDATE balance_checkpoint SET through_transaction_id = $2, written_at = $3
                   WHERE through_transaction_id = $1""",
                previous,
                through,
                dt.datetime.now(dt.timezone.utc),
                timeout=timeout,
            )
            require(moved == "UPDATE 1", f"the balance checkpoint is not at transaction {previous}; not folding")
            changed = await Store.fold_range(connection, previous, through, timeout)

        await self._as_writer(write, timeout)
        return changed

    @staticmethod
    async def fold_range(connection: asyncpg.Connection, previous: int, through: int, timeout: float) -> int:
        """Adds the legs of transactions (previous, through] to accounts.balance, in the caller's
        transaction (write_checkpoint's); returns how many accounts changed."""
        row = await connection.fetchrow(
            # over the legs' arrays (migration 0022), unnested in the select list: no view, no
            # function scan per transaction
            """WITH d AS (SELECT account_id, sum(amount)::bigint AS delta
                          FROM (SELECT unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount
                                FROM transactions WHERE transaction_id > $1 AND transaction_id <= $2) l
                          GROUP BY account_id HAVING sum(amount) <> 0),
                    u AS (UPDATE accounts a SET balance = a.balance + d.delta FROM d
                          WHERE a.account_id = d.account_id RETURNING 1)
               SELECT (SELECT count(*) FROM d) AS wanted, (SELECT count(*) FROM u) AS updated""",
            previous,
            through,
            timeout=timeout,
        )
        require(row["updated"] == row["wanted"], f"checkpoint: {row['updated']} of {row['wanted']} accounts exist")
        return row["updated"]

    async def checkpoint_through(self) -> int:
        """The newest transaction whose entries accounts.balance includes."""
        return await self.pool.fetchval("SELECT through_transaction_id FROM balance_checkpoint")

    async def tail_deltas(self, through: int) -> tuple[dict[int, int], int]:
        """(account_id -> sum of its entries after transaction `through`, the newest transaction id
        among them or `through`): what the next checkpoint must fold in."""
        rows = await self.pool.fetch(
            """SELECT account_id, sum(amount)::bigint AS delta, max(transaction_id) AS newest
               FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount
                     FROM transactions WHERE transaction_id > $1) l
               GROUP BY account_id""",
            through,
            timeout=self.recovery_timeout,
        )
        return {r["account_id"]: r["delta"] for r in rows}, max([through] + [r["newest"] for r in rows])

    async def fold_checkpoint_now(self, timeout: float = 10.0) -> None:
        """Folds the tail into accounts.balance, as the writer (its lock checked in the transaction)."""
        await self._as_writer(lambda connection, step: self.fold_checkpoint(connection), timeout)

    async def fold_checkpoint(self, connection: asyncpg.Connection) -> None:
        """Folds the whole tail into accounts.balance in SQL (for tools that write the journal
        directly while no service runs, e.g. seed_network)."""
        await connection.execute(
            """WITH c AS (SELECT through_transaction_id AS through FROM balance_checkpoint),
                    t AS (SELECT account_id, sum(amount)::bigint AS delta
                          FROM (SELECT unnest(x.leg_accounts) AS account_id, unnest(x.leg_amounts) AS amount
                                FROM transactions x, c WHERE x.transaction_id > c.through) l
                          GROUP BY account_id)
               UPDATE accounts a SET balance = a.balance + t.delta FROM t WHERE a.account_id = t.account_id"""
        )
        await connection.execute(
            """UPDATE balance_checkpoint SET written_at = now(),
                      through_transaction_id = greatest(through_transaction_id,
                                                        (SELECT coalesce(max(transaction_id), 0) FROM transactions))"""
        )

    # --- reads ---

    async def list_transactions(
        self, member_id: str, before_transaction_id: int | None, limit: int, merchant_ids: list[str]
    ) -> list[asyncpg.Record]:
        """The member's transactions at the given merchants, newest first."""
        return await self.pool.fetch(
            """SELECT t.transaction_id, t.kind, t.merchant_id, t.amount, t.purchase_amount,
                      t.authorization_id, t.original_transaction_id, t.created_at,
                      coalesce(m.points, 0) AS member_points, coalesce(m.vouchers, 0) AS member_vouchers
               FROM transactions t
               -- what it did to the member, from its entries (a split redeem's amount is both tenders)
               LEFT JOIN LATERAL (
                   SELECT sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS')::bigint AS points,
                          sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS')::bigint AS vouchers
                   FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount) JOIN accounts a USING (account_id)
                   WHERE a.owner_id = t.member_id
                     AND a.kind IN ('member', 'member_voucher_credit')) m ON true
               -- hashtext: the index's key (migration 0021); member_id = $1 drops another id of its hash
               WHERE hashtext(t.member_id) = hashtext($1) AND t.member_id = $1
                 AND ($2::bigint IS NULL OR t.transaction_id < $2) AND t.merchant_id = ANY($4::text[])
               ORDER BY t.transaction_id DESC LIMIT $3""",
            member_id,
            before_transaction_id,
            limit,
            merchant_ids,
        )

    async def member_exists(self, member_id: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM members WHERE member_id = $1", member_id))

    async def open_holds_per_merchant(self) -> dict[str, int]:
        """Open, unexpired holds per merchant: points holds, and split-tender holds of vouchers only (a split
        hold with points is also a row of holds). For the per-merchant quota (processor/quotas.py)."""
        rows = await self.pool.fetch(
            """SELECT merchant_id, sum(n)::bigint AS n FROM (
                   SELECT merchant_id, count(*) AS n FROM holds WHERE status = 1 AND expires_at > now() GROUP BY 1
                   UNION ALL
                   SELECT merchant_id, count(*) FROM voucher_holds
                   WHERE status = 1 AND points = 0 AND expires_at > now() GROUP BY 1) c GROUP BY 1""",
            timeout=self.recovery_timeout,
        )
        return {r["merchant_id"]: r["n"] for r in rows}

    async def purge_idempotency(
        self,
        older_than: dt.datetime,
        chunk_rows_max: int = 10_000,
        chunk_timeout_seconds: float = 60.0,
        deleted_keys: Callable[[list[tuple[int, list[tuple[str, str]]]]], object] | None = None,
    ) -> int:
        """Deletes the idempotency records created before `older_than`, a batch's row at a time (its
        records go together), in chunks of whole batch rows holding at most `chunk_rows_max` records
        (at least one row), each its own transaction under its own timeout: progress on any table
        size, and no long lock or transaction. Returns the records deleted. `deleted_keys`, if given, is
        called with each chunk's (batch id, its keys) once that chunk is committed (the service drops
        them from its in-memory table)."""
        require(chunk_rows_max >= 1, f"chunk_rows_max {chunk_rows_max}")
        deleted = 0
        while True:
            # the oldest rows first (in the created_at index's order: no sort of every old row), as many
            # as fit in chunk_rows_max records (the running sum runs over at most chunk_rows_max rows:
            # each holds one record or more), at least one
            rows = await self.pool.fetch(
                """DELETE FROM idempotency_batches WHERE batch_id = ANY(ARRAY(
                       SELECT batch_id FROM (
                         SELECT batch_id, sum(operations) OVER w AS records, row_number() OVER w AS n
                         FROM (SELECT batch_id, created_at, operations FROM idempotency_batches
                               WHERE created_at < $1 ORDER BY created_at LIMIT $2) oldest
                         WINDOW w AS (ORDER BY created_at ROWS UNBOUNDED PRECEDING)) c
                       WHERE records <= $2 OR n = 1))
                   RETURNING batch_id, operations, keys""",
                older_than,
                chunk_rows_max,
                timeout=chunk_timeout_seconds,
            )
            if not rows:
                return deleted
            if deleted_keys is not None:
                deleted_keys([(r["batch_id"], idempotency_records.decode_keys(r["keys"])) for r in rows])
            deleted += sum(r["operations"] for r in rows)

    # --- clearing ---

    async def merchant_position(self, merchant_id: str, *, vouchers: bool = False) -> dict[str, int] | None:
        """Balances of the merchant's accounts: the checkpoint plus the journal tail since it (bounded by
        the checkpoint interval), so every committed batch is included. With `vouchers`, also its VOUCHERS
        figures, read in the same statement (both assets at one moment): voucher_net, the vouchers
        accepted at it less refunds (its merchant_redeemed VOUCHERS balance: what the operator owes it in
        cash for them, cleared apart from the POINTS net), and vouchers_held (its merchant_vouchers
        balance, not a cash claim); both voucher-units, 0 while it has no such account."""
        # account_balances' own form, narrowed to the merchant's accounts before the tail is summed: the
        # view unnests and groups every leg of the tail for every account before the owner filter (a
        # read took ~0.35 s under load with a few seconds of tail); here a tail row is kept only if its
        # legs touch one of these accounts (one array overlap test a row), then only their legs summed
        rows = await self.pool.fetch(
            """WITH mine AS (SELECT account_id, kind, asset_code, balance FROM accounts
                             WHERE owner_id = $1 AND (kind = ANY($2::text[]) AND asset_code = $3
                                                      OR $5 AND kind = ANY($4::text[]) AND asset_code = 'VOUCHERS')),
                    ids AS (SELECT array_agg(account_id) AS a FROM mine)
               SELECT m.kind, m.asset_code, m.balance + coalesce(sum(l.amount), 0)::bigint AS balance
               FROM mine m
               LEFT JOIN (SELECT l.account_id, l.amount
                          FROM transactions x, balance_checkpoint c, ids,
                               unnest(x.leg_accounts, x.leg_amounts) AS l(account_id, amount)
                          WHERE x.transaction_id > c.through_transaction_id AND x.leg_accounts && ids.a) l
                 USING (account_id)
               GROUP BY m.account_id, m.kind, m.asset_code, m.balance""",
            merchant_id,
            list(MERCHANT_ACCOUNTS),
            ASSET_POINTS,
            list(MERCHANT_VOUCHER_ACCOUNTS),
            vouchers,
        )
        balance = {r["kind"]: r["balance"] for r in rows if r["asset_code"] == ASSET_POINTS}
        if not balance:
            return None
        issued = -balance.get(ACCOUNT_MERCHANT_ISSUED, 0)
        redeemed = balance.get(ACCOUNT_MERCHANT_REDEEMED, 0)
        fees = -balance.get(ACCOUNT_MERCHANT_FEES, 0)
        # acquiring rewards net of their reversals: a receivable of the merchant, like redeemed
        acquiring = balance.get(ACCOUNT_MERCHANT_ACQUIRING, 0)
        position = {
            "issued": issued,
            "redeemed": redeemed,
            "fees": fees,
            "acquiring": acquiring,
            "net": redeemed + acquiring - issued - fees,
        }
        if vouchers:
            voucher = {r["kind"]: r["balance"] for r in rows if r["asset_code"] == rules.ASSET_VOUCHERS}
            position["voucher_net"] = voucher.get(ACCOUNT_MERCHANT_REDEEMED, 0)
            position["vouchers_held"] = voucher.get(rules.ACCOUNT_MERCHANT_VOUCHERS, 0)
        return position

    async def latest_cut_off(self) -> dt.datetime | None:
        return await self.pool.fetchval("SELECT max(cut_off) FROM settlement_periods")

    async def latest_batch_time(self) -> dt.datetime | None:
        """The time of the newest committed batch with a transaction or a hold: the clock floor a
        (re)started service keeps (batch times never decrease, so the newest id carries the latest time;
        two primary-key look-ups, whatever the journal's size)."""
        return await self.pool.fetchval(
            """SELECT greatest((SELECT created_at FROM transactions ORDER BY transaction_id DESC LIMIT 1),
                               (SELECT created_at FROM holds ORDER BY authorization_id DESC LIMIT 1))""",
            timeout=self.recovery_timeout,
        )

    async def close_period(
        self, cut_off: dt.datetime, channel: rules.ChannelSettings | None = None
    ) -> tuple[asyncpg.Record, bool]:
        """Closes the open period at cut_off and writes every merchant's statement, in one transaction,
        and with `channel` (the program's settings at the cut) the promoters' and regions' statements
        from them (processor/channel_store.py; the committer posts them). With the statements, from the
        same pass over the period's rows, the ids of each merchant's statement lines (statement_line_ids,
        migration 0024), which statement_lines reads. Returns (period, created). The caller guarantees no
        transaction dated before cut_off commits afterwards. Idempotent on cut_off; StoreError if cut_off
        is not after the newest cut."""
        chunk_ids_max = self.statement_line_chunk_ids_max
        require(
            1 <= chunk_ids_max <= STATEMENT_LINE_CHUNK_IDS_CEILING,
            f"statement_line_chunk_ids_max {chunk_ids_max} is not in 1..{STATEMENT_LINE_CHUNK_IDS_CEILING}",
        )
        async with self.pool.acquire() as c, c.transaction():
            await c.execute("LOCK TABLE settlement_periods IN EXCLUSIVE MODE")
            existing = await c.fetchrow("SELECT * FROM settlement_periods WHERE cut_off = $1", cut_off)
            if existing is not None:
                return existing, False
            last = await c.fetchrow("SELECT period_id, cut_off FROM settlement_periods ORDER BY period_id DESC LIMIT 1")
            opened_at = last["cut_off"] if last else EPOCH
            if cut_off <= opened_at:
                raise StoreError(
                    f"cut_off {cut_off.isoformat()} is not after the newest cut "
                    f"{opened_at.isoformat()}; cuts only move forward"
                )
            period_id = (last["period_id"] + 1) if last else 1
            period = await c.fetchrow(
                """INSERT INTO settlement_periods (period_id, opened_at, cut_off) VALUES ($1, $2, $3)
                   RETURNING *""",
                period_id,
                opened_at,
                cut_off,
            )
            # Amounts come from the entries on the merchants' POINTS clearing accounts, not from
            # transactions.amount: under a program an earn's amount is what the member got (base, tier
            # uplift, promotions) while the merchant owes only its base and the promotions it sponsors,
            # and an acquiring reward (kind 9, reversal 10) belongs to the acquirer, not to the merchant
            # where the member spent. A merchant's transactions are its own operations (its
            # transactions.merchant_id, except the operator's postings 6..11 that merely name the
            # merchant whose operation triggered them, and the channel's postings 23, 24 that name the
            # operator) and those that moved one of its clearing accounts.
            # The voucher columns (migration 0006) come from the same pass, from the entries on its
            # VOUCHERS clearing accounts (MERCHANT_VOUCHER_ACCOUNTS): a dividend to it (11) or a spend at
            # it as the operator's store (14) moves only those, and so gives it a statement too.
            # m joins the tables, not the CTE t: a CTE has no index, and on a freshly loaded journal (no
            # statistics yet) the planner may pick a nested loop, quadratic over a CTE (measured: more
            # than 120 s for 500,000 transactions) and one index probe per transaction over the table.
            await c.execute(
                f"""WITH t AS MATERIALIZED (
                     SELECT transaction_id, kind, merchant_id FROM transactions
                     WHERE created_at >= $2 AND created_at < $3),
                   m AS MATERIALIZED (
                     SELECT e.transaction_id, e.kind, e.merchant_id AS own, a.owner_id AS merchant_id,
                            a.kind AS account_kind, a.asset_code, e.amount
                     -- the legs unnested from the period's rows (migration 0022)
                     FROM (SELECT transaction_id, kind, merchant_id, unnest(leg_accounts) AS account_id,
                                  unnest(leg_amounts) AS amount
                           FROM transactions WHERE created_at >= $2 AND created_at < $3) e
                     JOIN accounts a ON a.account_id = e.account_id
                       AND (a.asset_code = 'POINTS' AND a.kind = ANY($5::text[])
                            OR a.asset_code = 'VOUCHERS' AND a.kind = ANY($6::text[]))),
                   money AS (
                     SELECT merchant_id, {
                    _CLEARING_SUMS.format(amount="amount", account="account_kind", kind="kind", asset="asset_code")
                }
                     FROM m GROUP BY merchant_id),
                   counted AS (
                     SELECT merchant_id, sum(n)::bigint AS transactions FROM (
                       SELECT merchant_id, count(*) AS n FROM t
                       WHERE kind NOT BETWEEN 6 AND 11 AND kind <> ALL($7::smallint[])
                         AND merchant_id <> 'operator'  -- member administration's postings (16..22)
                       GROUP BY merchant_id
                       UNION ALL
                       SELECT merchant_id, count(DISTINCT transaction_id) FROM m
                       WHERE merchant_id <> own OR kind BETWEEN 6 AND 11 GROUP BY merchant_id) x
                     GROUP BY merchant_id),
                   moves AS (SELECT * FROM counted LEFT JOIN money USING (merchant_id)),
                   -- each merchant's statement lines (statement_lines says which; migration 0024 the same
                   -- rules): its own operations from t, and from m the others' that moved its clearing
                   -- accounts. The two sets are disjoint (a reversal naming the merchant is one of its own),
                   -- so only m's need DISTINCT (one line however many of its accounts a transaction moved).
                   lines AS (
                     SELECT merchant_id, transaction_id FROM t
                     WHERE kind NOT BETWEEN 6 AND 11 AND kind <> ALL($7::smallint[])
                     UNION ALL
                     SELECT DISTINCT merchant_id, transaction_id FROM m
                     WHERE kind IN (9, 10) AND account_kind = 'merchant_acquiring'
                        OR kind = 11 AND asset_code = 'VOUCHERS' AND merchant_id = own
                        OR kind = 14 AND asset_code = 'VOUCHERS' AND merchant_id <> own
                        OR kind IN (18, 19) AND asset_code = 'POINTS' AND merchant_id <> own),
                   -- grouped by hashing, each merchant's ids sorted as integers, then cut into chunks:
                   -- measured on 1M lines of 2,000 merchants, the chunks' INSERT alone (t and m included)
                   -- 2.7-3.0 s of Postgres CPU where sorting the lines by (merchant_id, transaction_id) and
                   -- numbering them took 3.8-5.6 (text compared by its collation, the sort spilled to disk);
                   -- the cut as a whole +0.7-2.5 s per 1M transactions (docs/DESIGN.md section 4)
                   merchant_lines AS (
                     SELECT merchant_id, ARRAY(SELECT unnest(array_agg(transaction_id)) ORDER BY 1) AS ids
                     FROM lines GROUP BY merchant_id),
                   -- a data-modifying CTE runs whether or not the INSERT below reads it
                   line_ids AS (
                     INSERT INTO statement_line_ids (period_id, merchant_id, first_transaction_id, transaction_ids)
                     SELECT $1, merchant_id, ids[i], ids[i:i + $8::int - 1]
                     FROM merchant_lines, generate_series(1, cardinality(ids), $8::int) i),
                   previous AS (SELECT merchant_id, closing_position, voucher_closing_position, vouchers_held_closing
                                FROM statements WHERE period_id = $4)
                   INSERT INTO statements (period_id, merchant_id, opening_position, issued, earn_refunds, redeemed,
                                           redemption_refunds, fees, acquiring, acquiring_reversals, net,
                                           closing_position, transactions, vouchers_redeemed,
                                           voucher_redemption_refunds, voucher_net, voucher_opening_position,
                                           voucher_closing_position, vouchers_held_opening, vouchers_received,
                                           vouchers_spent, vouchers_held_closing)
                   SELECT $1, merchant_id, coalesce(p.closing_position, 0),
                          coalesce(m.issued, 0), coalesce(m.earn_refunds, 0), coalesce(m.redeemed, 0),
                          coalesce(m.redemption_refunds, 0), coalesce(m.fees, 0), coalesce(m.acquiring, 0),
                          coalesce(m.acquiring_reversals, 0), n.net,
                          coalesce(p.closing_position, 0) + n.net, coalesce(m.transactions, 0),
                          coalesce(m.vouchers_redeemed, 0), coalesce(m.voucher_redemption_refunds, 0), n.voucher_net,
                          coalesce(p.voucher_closing_position, 0),
                          coalesce(p.voucher_closing_position, 0) + n.voucher_net,
                          coalesce(p.vouchers_held_closing, 0), coalesce(m.vouchers_received, 0),
                          coalesce(m.vouchers_spent, 0),
                          coalesce(p.vouchers_held_closing, 0) + coalesce(m.vouchers_received, 0)
                            - coalesce(m.vouchers_spent, 0)
                   FROM moves m FULL JOIN previous p USING (merchant_id),
                        LATERAL (SELECT coalesce(m.redeemed, 0) - coalesce(m.redemption_refunds, 0)
                                        - coalesce(m.issued, 0) + coalesce(m.earn_refunds, 0)
                                        - coalesce(m.fees, 0) + coalesce(m.acquiring, 0)
                                        - coalesce(m.acquiring_reversals, 0) AS net,
                                        coalesce(m.vouchers_redeemed, 0) - coalesce(m.voucher_redemption_refunds, 0)
                                          AS voucher_net) n""",
                period_id,
                opened_at,
                cut_off,
                period_id - 1,
                list(MERCHANT_ACCOUNTS),
                list(MERCHANT_VOUCHER_ACCOUNTS),
                list(channel_store.POSTING_KIND.values()),
                chunk_ids_max,
                timeout=SETTLEMENT_TIMEOUT_SECONDS,
            )
            if channel is not None:
                await channel_store.cut(c, period_id, channel, timeout=SETTLEMENT_TIMEOUT_SECONDS)
            return period, True

    async def period_summary(self, period_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            """SELECT p.period_id, p.opened_at, p.cut_off, count(s.merchant_id) AS merchants,
                      coalesce(sum(s.net), 0)::bigint AS net_total, coalesce(sum(s.fees), 0)::bigint AS fees_total,
                      coalesce(sum(s.voucher_net), 0)::bigint AS voucher_net_total
               FROM settlement_periods p LEFT JOIN statements s USING (period_id)
               WHERE p.period_id = $1 GROUP BY p.period_id""",
            period_id,
        )

    async def statements(
        self, *, period_id: int = 0, merchant_id: str = "", after: str = "", limit: int = 100
    ) -> list[asyncpg.Record]:
        """One period's statements by merchant id (after `after`), or one merchant's, newest first."""
        if merchant_id:
            return await self.pool.fetch(
                """SELECT s.*, p.opened_at, p.cut_off FROM statements s JOIN settlement_periods p USING (period_id)
                   WHERE s.merchant_id = $1 AND ($2 = 0 OR s.period_id = $2)
                     AND ($3 = '' OR s.period_id < $3::bigint)
                   ORDER BY s.period_id DESC LIMIT $4""",
                merchant_id,
                period_id,
                after,
                limit,
            )
        return await self.pool.fetch(
            """SELECT s.*, p.opened_at, p.cut_off FROM statements s JOIN settlement_periods p USING (period_id)
               WHERE s.period_id = $1 AND s.merchant_id > $2 ORDER BY s.merchant_id LIMIT $3""",
            period_id,
            after,
            limit,
        )

    async def statement_lines(
        self, period_id: int, merchant_id: str, after_transaction_id: int = 0, limit: int | None = None
    ) -> list[asyncpg.Record]:
        """The merchant's transactions of a period, each with its effect on the merchant's position: its
        own operations (transactions.merchant_id, kinds other than the operator's postings 6..11), the
        acquiring rewards and reversals (kinds 9, 10) that moved its merchant_acquiring account, the
        dividends (11) that moved its merchant_vouchers account, and other merchants' voucher spends at it
        as the operator's store (14) that moved its merchant_redeemed VOUCHERS account, the operator's
        reversals (18, 19) that moved one of its POINTS clearing accounts; the journal
        shapes reconcile checks keep kinds 6, 7, 8 and 11 off merchants' POINTS accounts. fee and net
        are read from the entries on its POINTS clearing accounts, voucher_net (its voucher position) and
        vouchers_held_change (the vouchers it holds) from those on its VOUCHERS accounts, as the
        statement's totals are (close_period), so the lines sum to the statement. Which transactions are
        its lines close_period wrote at the cut (statement_line_ids, migration 0024: the ids in chunks);
        the ids after `after_transaction_id` are read from the chunk holding the next one on, in order,
        only as many chunks as `limit` needs, and the rows by primary key. A period not closed has none."""
        # The chunks of one merchant do not overlap and each holds its ids in order, so ordering by
        # (first id, id) is ordering by id; the planner sorts each chunk's ids apart (an incremental sort
        # over the primary key's order) and the LIMIT stops reading chunks once it has enough.
        return await self.pool.fetch(
            """WITH lines AS (
                 SELECT l.transaction_id FROM statement_line_ids c
                 CROSS JOIN LATERAL unnest(c.transaction_ids) AS l(transaction_id)
                 WHERE c.period_id = $1 AND c.merchant_id = $2
                   AND c.first_transaction_id >= coalesce(
                         (SELECT max(first_transaction_id) FROM statement_line_ids
                          WHERE period_id = $1 AND merchant_id = $2 AND first_transaction_id <= $3), $3)
                   AND l.transaction_id > $3
                 ORDER BY c.first_transaction_id, l.transaction_id LIMIT $4)
               SELECT t.transaction_id, t.created_at, t.kind, t.member_id, t.amount,
                      coalesce(x.fee, 0)::bigint AS fee, coalesce(x.net, 0)::bigint AS net,
                      coalesce(x.voucher_net, 0)::bigint AS voucher_net,
                      coalesce(x.vouchers_held_change, 0)::bigint AS vouchers_held_change
               FROM lines l JOIN transactions t USING (transaction_id)
               LEFT JOIN LATERAL (
                 SELECT -sum(e.amount) FILTER (WHERE a.kind = 'merchant_fees' AND a.asset_code = 'POINTS') AS fee,
                        sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS') AS net,
                        sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS' AND a.kind = 'merchant_redeemed')
                          AS voucher_net,
                        sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS' AND a.kind = 'merchant_vouchers')
                          AS vouchers_held_change
                 FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                 JOIN accounts a ON a.account_id = e.account_id WHERE a.owner_id = $2
                   AND (a.asset_code = 'POINTS' AND a.kind = ANY($5::text[])
                        OR a.asset_code = 'VOUCHERS' AND a.kind = ANY($6::text[]))) x ON true
               ORDER BY t.transaction_id""",
            period_id,
            merchant_id,
            after_transaction_id,
            limit,
            list(MERCHANT_ACCOUNTS),
            list(MERCHANT_VOUCHER_ACCOUNTS),
        )

    # --- scale: a seeded network ---

    async def seed_network(
        self,
        merchants: int,
        members: int,
        purchase_per_member: int,
        progress=lambda text: None,
        chunk_members: int = 200_000,
    ) -> None:
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
                           FROM generate_series(1, $1) g""",
                        merchants,
                        base,
                    )
                    await c.execute(
                        """INSERT INTO accounts (kind, owner_id, asset_code)
                           SELECT k, m.merchant_id, 'POINTS' FROM merchants m,
                                  unnest(ARRAY['merchant_issued', 'merchant_redeemed', 'merchant_fees', 'merchant_acquiring']) k
                           WHERE m.merchant_id LIKE 'seed-m-%'"""
                    )
                progress(f"{merchants} merchants created")
                done = 0
                while done < members:
                    count = min(chunk_members, members - done)
                    async with c.transaction():
                        first_id = await c.fetchval("SELECT last_transaction_id + 1 FROM ledger_writer FOR UPDATE")
                        # the ids are handed out here: the high-water mark moves in the same transaction
                        await c.execute("UPDATE ledger_writer SET last_transaction_id = $1", first_id + count - 1)
                        await c.execute(
                            """CREATE TEMP TABLE seed_earn ON COMMIT DROP AS
                               SELECT x.*, $5::bigint * m.give_back_bps / 10000 AS amount
                               FROM (SELECT $1::bigint + g - 1 AS transaction_id,
                                            'seed-u-' || lpad(($2 + g)::text, 7, '0') AS member_id,
                                            'seed-m-' || lpad((1 + ((($2::bigint + g) * 7919) % $3))::text, 6, '0')
                                              AS merchant_id
                                     FROM generate_series(1, $4) g) x
                               JOIN merchants m USING (merchant_id)""",
                            first_id,
                            done,
                            merchants,
                            count,
                            purchase_per_member,
                        )
                        await c.execute("""INSERT INTO members SELECT member_id, now() FROM seed_earn""")
                        await c.execute(
                            """INSERT INTO accounts (kind, owner_id, asset_code, balance)
                               SELECT 'member', s.member_id, 'POINTS', s.amount FROM seed_earn s"""
                        )
                        # the earn's two legs in its row (migration 0022): member +amount, merchant_issued
                        # -amount; none for an earn of 0 points. The member's account is opened first so
                        # each row is written once, with its legs.
                        await c.execute(
                            """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code,
                                   amount, purchase_amount, idempotency_key, created_at, leg_accounts, leg_amounts)
                               SELECT s.transaction_id, 1, s.merchant_id, s.member_id, 'POINTS', s.amount, $1,
                                      'seed-' || s.transaction_id, now(),
                                      CASE WHEN s.amount <> 0 THEN ARRAY[ma.account_id, ia.account_id] ELSE '{}' END,
                                      CASE WHEN s.amount <> 0 THEN ARRAY[s.amount, -s.amount] ELSE '{}' END
                               FROM seed_earn s
                               JOIN accounts ma ON ma.kind = 'member' AND ma.owner_id = s.member_id
                                               AND ma.asset_code = 'POINTS'
                               JOIN accounts ia ON ia.kind = 'merchant_issued' AND ia.owner_id = s.merchant_id
                                               AND ia.asset_code = 'POINTS'""",
                            purchase_per_member,
                        )
                        await c.execute(
                            """UPDATE accounts a SET balance = a.balance - d.points
                               FROM (SELECT merchant_id, sum(amount) AS points FROM seed_earn GROUP BY merchant_id) d
                               WHERE a.kind = 'merchant_issued' AND a.owner_id = d.merchant_id"""
                        )
                        await c.execute("""UPDATE balance_checkpoint SET written_at = now(),
                                           through_transaction_id = (SELECT max(transaction_id) FROM transactions)""")
                    done += count
                    progress(f"{done} members created")
                # a bulk load leaves the planner no statistics until autovacuum's next pass: the start-up
                # reads right after it (PresenceStore.spends_since) were planned as nested loops over the
                # accounts and took ~240 s at 20,000 members, against ~9 ms once analyzed
                await c.execute("ANALYZE merchants, members, accounts, transactions")
        finally:
            await self.release_writer_lock()

    # --- reconciliation: processor/reconcile.py ---

    async def ledger_discrepancies(self, report=lambda check: None) -> list[str]:
        """Checks the journal against itself, the stored balances and the statements, in one snapshot;
        returns what does not hold (processor/reconcile.py)."""
        from processor import reconcile

        return await reconcile.ledger_discrepancies(self.pool, report)


# --- clearing: a merchant's movements from the entries on its clearing accounts, per asset -------------

# The statement's amounts (statements columns; all >= 0 on a sound ledger) as sums over entries, given
# the SQL names of the entry's amount, its account's kind and asset, and its transaction's kind. Refunds
# are told by the transaction's kind: refund of an earn (5) gives back issued points, refunds of
# redemptions (4, 13) take back redeemed ones, an acquiring reversal (10) takes back a reward. The
# VOUCHERS amounts (migration 0006, voucher-units) come from the merchant's merchant_redeemed VOUCHERS
# account (accepted vouchers, less refunds: kind 13) and its merchant_vouchers account (received in
# dividends, spent at the operator's store: kind 14); each asset is summed apart, never added together.
STATEMENT_AMOUNTS = (
    "issued",
    "earn_refunds",
    "redeemed",
    "redemption_refunds",
    "fees",
    "acquiring",
    "acquiring_reversals",
)
VOUCHER_STATEMENT_AMOUNTS = ("vouchers_redeemed", "voucher_redemption_refunds", "vouchers_received", "vouchers_spent")
# A statement's columns from a merchant's clearing entries. The operator's reversals (ReverseTransaction,
# kinds 18 and 19; docs/RULES.md section 13) undo a sale whole, as a full refund would: they count with
# the refunds (earn_refunds, redemption_refunds, acquiring_reversals), and a fee they give back nets in
# `fees` as every fee entry does; the statement's lines show them as lines of their own (statement_lines).
_CLEARING_SUMS = """
    coalesce(sum(-{amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_issued'
                                      AND {kind} NOT IN (5, 18, 19)), 0) AS issued,
    coalesce(sum({amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_issued'
                                     AND {kind} IN (5, 18, 19)), 0) AS earn_refunds,
    coalesce(sum({amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_redeemed'
                                     AND {kind} NOT IN (4, 13, 18, 19)), 0) AS redeemed,
    coalesce(sum(-{amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_redeemed'
                                      AND {kind} IN (4, 13, 18, 19)), 0) AS redemption_refunds,
    coalesce(sum(-{amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_fees'), 0) AS fees,
    coalesce(sum({amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_acquiring'
                                     AND {kind} NOT IN (10, 18, 19)), 0) AS acquiring,
    coalesce(sum(-{amount}) FILTER (WHERE {asset} = 'POINTS' AND {account} = 'merchant_acquiring'
                                      AND {kind} IN (10, 18, 19)), 0) AS acquiring_reversals,
    coalesce(sum({amount}) FILTER (WHERE {asset} = 'VOUCHERS' AND {account} = 'merchant_redeemed'
                                     AND {kind} NOT IN (4, 13)), 0) AS vouchers_redeemed,
    coalesce(sum(-{amount}) FILTER (WHERE {asset} = 'VOUCHERS' AND {account} = 'merchant_redeemed'
                                      AND {kind} IN (4, 13)), 0) AS voucher_redemption_refunds,
    coalesce(sum({amount}) FILTER (WHERE {asset} = 'VOUCHERS' AND {account} = 'merchant_vouchers' AND {kind} <> 14), 0)
      AS vouchers_received,
    coalesce(sum(-{amount}) FILTER (WHERE {asset} = 'VOUCHERS' AND {account} = 'merchant_vouchers' AND {kind} = 14), 0)
      AS vouchers_spent"""


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


def to_json(value: Any) -> str:
    """Compact JSON with sorted keys, as the stdlib's JSONEncoder(separators=(",", ":"), sort_keys=True)
    writes it, but by orjson: ~5x faster (measured: two records' JSON an operation took ~7 µs of the
    service's CPU under SubmitBatch load). Non-ASCII stays UTF-8 rather than escaped: the same jsonb."""
    return orjson.dumps(value, option=JSON_OPTIONS).decode()


# to_json's options, defined beside the idempotency records' encoder, which dumps a batch's records with
# them (processor/idempotency_records.py; that module cannot import this one: this one imports it)
JSON_OPTIONS = idempotency_records.JSON_OPTIONS
