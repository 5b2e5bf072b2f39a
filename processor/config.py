"""Configuration: read once into a frozen, validated Settings. Nothing else reads the environment.

Each option has a command-line flag (--name-with-dashes) and an environment variable (POINTS_NAME, or
DATABASE_URL for the database); the flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import urllib.parse
from typing import Any, Callable, Mapping

from processor import postgres_settings

DAY_SECONDS = 86_400


# --projector: the batch log's projector as a task of the service, or as its child process
PROJECTOR_MODES = ("in-process", "process")


def boolean(text: str) -> bool:
    """An on/off setting from an environment variable: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    env: str = ""

    @property
    def env_name(self) -> str:
        return self.env or "POINTS_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("listen", str, "127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0 picks a free one)"),
    Option("metrics_listen", str, "127.0.0.1:9464", "Prometheus /metrics HTTP address HOST:PORT (port 0 picks one)"),
    Option(
        "tls_cert_file",
        str,
        "",
        "PEM certificate chain the gRPC server presents; with --tls-key-file serves TLS only; reread on SIGHUP",
    ),
    Option("tls_key_file", str, "", "PEM private key of --tls-cert-file; reread on SIGHUP"),
    Option(
        "tls_client_ca_file",
        str,
        "",
        "PEM CA certificates: clients must present a certificate signed by one (mutual TLS); reread on SIGHUP",
    ),
    Option(
        "insecure",
        boolean,
        False,
        "allow plaintext gRPC on a non-loopback --listen address (without TLS only loopback is allowed)",
    ),
    Option(
        "health_listen",
        str,
        "",
        "plaintext HOST:PORT serving grpc.health.v1.Health only, for probes that cannot speak TLS "
        "(Kubernetes gRPC probes); empty = none",
    ),
    Option("database_url", str, "", "Postgres URL; empty = embedded Postgres under --data-dir", env="DATABASE_URL"),
    Option("data_dir", str, ".points-data", "directory of the embedded Postgres (used without a database URL)"),
    Option("database_name", str, "points", "database created and used inside the embedded Postgres"),
    Option(
        "embedded_postgres_settings",
        str,
        "",
        "the embedded Postgres's settings over the sized ones (README: Postgres settings), NAME=VALUE,... "
        "e.g. shared_buffers=512MB,max_wal_size=2GB; fsync, synchronous_commit, full_page_writes stay on",
    ),
    Option("batch_operations_max", int, 1000, "operations committed in one Postgres transaction, at most"),
    Option(
        "batch_linger_seconds",
        float,
        0.001,
        "how long the committer waits for more operations after the first of a batch",
    ),
    Option(
        "queue_operations_max",
        int,
        20_000,
        "operations waiting for the committer, at most; beyond it calls get RESOURCE_EXHAUSTED",
    ),
    Option("commit_timeout_seconds", float, 10.0, "a batch commit taking longer fails (UNAVAILABLE)"),
    Option(
        "writer_lock_wait_seconds",
        float,
        0.0,
        "at start, how long to wait for another service holding the ledger's writer lock (a standby "
        "takes over when it goes); 0 = refuse to start at once",
    ),
    Option("pool_connections_max", int, 8, "Postgres connections in the pool, at most"),
    Option(
        "projection_wait_seconds",
        float,
        5.0,
        "how long a read that must see the caller's writes waits for the projector to write their rows "
        "(the batch log is projected off the answer path); beyond it the read gets UNAVAILABLE",
    ),
    Option(
        "projector",
        str,
        "process",
        "where the batch log is projected: process (a child process, `python -m processor project`, on "
        "another core; the default) or in-process (a task on the service's event loop)",
    ),
    Option(
        "projection_queue_batches_max",
        int,
        64,
        "appended batches waiting for the projector, at most; beyond it the committer waits (backpressure)",
    ),
    Option(
        "projection_batches_per_transaction_max",
        int,
        16,
        "consecutive appended batches the projector writes in one Postgres transaction, at most",
    ),
    Option(
        "projection_linger_seconds",
        float,
        0.0,
        "how long the projector waits, after a batch is appended, for more batches to write with it in one "
        "transaction (up to projection_batches_per_transaction_max; the program's rows are then written once "
        "per group): the change feed and the balance checkpoint see a batch at most this much later; a read "
        "that must see the caller's writes does not wait for it (it asks for the projection at once); 0 (the "
        "default) = project each batch as soon as it is appended",
    ),
    Option(
        "batch_log_retention_seconds",
        float,
        3600.0,
        "projected batches older than this are deleted from the batch log (it is not needed once projected)",
    ),
    Option("hold_ttl_seconds_default", int, 7 * DAY_SECONDS, "hold lifetime when a request gives none"),
    Option("hold_ttl_seconds_max", int, 31 * DAY_SECONDS, "longest hold lifetime a request may ask for"),
    Option("holds_expired_per_batch_max", int, 10_000, "expired holds released per batch, at most"),
    Option(
        "balance_checkpoint_seconds",
        float,
        5.0,
        "how often account balances are checkpointed (folded into accounts.balance with a batch); "
        "start-up replays the journal since the last checkpoint",
    ),
    Option(
        "balance_checkpoint_accounts_max",
        int,
        100_000,
        "accounts changed since the last checkpoint, at most, before the next batch checkpoints (counted as "
        "the journal entries projected since, an upper bound on the accounts they change)",
    ),
    Option("points_max", int, 10**12, "largest point-units amount in one request"),
    Option("purchase_amount_max", int, 10**13, "largest purchase amount (currency minor units) in one earn"),
    Option("id_bytes_max", int, 128, "longest merchant_id / member_id, bytes"),
    Option("idempotency_key_bytes_max", int, 128, "longest idempotency key, bytes"),
    Option(
        "idempotency_retention_days",
        int,
        0,
        "idempotency records older than this are deleted; 0 keeps them forever (minimum 30 otherwise)",
    ),
    Option(
        "idempotency_purge_chunk_rows_max",
        int,
        10_000,
        "idempotency records deleted per purge transaction, at most (the purge loops until done)",
    ),
    Option("idempotency_purge_chunk_timeout_seconds", float, 60.0, "time one purge transaction may take"),
    Option(
        "idempotency_keys_expected",
        int,
        0,
        "idempotency records the in-memory table is sized for at start (8 bytes a slot, 2 slots a key: "
        "30M = 512 MiB); beyond it (or twice the stored ones, if more) it grows, stalling the committer "
        "about a second per million keys; 0 = size from the stored records only",
    ),
    Option("page_size_default", int, 50, "ListTransactions page size when the request gives none"),
    Option("page_size_max", int, 200, "largest ListTransactions page size"),
    Option("members_max", int, 5_000_000, "members resident in the fast path, at most"),
    Option("holds_max", int, 2_000_000, "holds resident in the fast path, at most"),
    Option(
        "transactions_resident_max",
        int,
        200_000,
        "refundable transactions cached in the fast path before the cache is dropped",
    ),
    Option(
        "rpcs_in_flight_max", int, 10_000, "RPCs being handled at once, at most; beyond it calls get RESOURCE_EXHAUSTED"
    ),
    Option(
        "merchant_operations_per_second",
        float,
        1000.0,
        "per-merchant rate limit on mutating operations (token bucket; each operation of a SubmitBatch or "
        "Stream counts); beyond it RESOURCE_EXHAUSTED says when to retry; 0 = no limit",
    ),
    Option("merchant_burst_operations", int, 10_000, "per-merchant burst allowed above the rate"),
    Option(
        "merchant_holds_open_max",
        int,
        200_000,
        "open holds of one merchant, at most (a share of holds_max, so one merchant cannot take them all); "
        "beyond it Authorize gets RESOURCE_EXHAUSTED; at or above holds_max: no share",
    ),
    Option(
        "merchant_holds_recount_seconds",
        float,
        60.0,
        "how often the open holds of each merchant are recounted from Postgres (between recounts, holds "
        "resolved are not subtracted: the count errs high)",
    ),
    Option(
        "merchant_new_members_per_hour_max",
        int,
        100_000,
        "members one merchant's earns may create per clock hour, at most; beyond it RESOURCE_EXHAUSTED",
    ),
    Option(
        "merchant_queue_operations_max",
        int,
        5_000,
        "operations of one merchant queued or being committed, at most (a share of queue_operations_max); "
        "beyond it RESOURCE_EXHAUSTED; at or above queue_operations_max: no share",
    ),
    Option("batch_request_operations_max", int, 8192, "operations in one SubmitBatch call, at most"),
    Option(
        "stream_operations_in_flight_max",
        int,
        1024,
        "operations of one Stream awaiting their commit, at most; the stream is read no further until one ends",
    ),
    Option(
        "auth_cache_seconds",
        float,
        5.0,
        "verified API keys are cached this long; a key revoked by the CLI stops working within it",
    ),
    Option(
        "auth_unknown_cache_seconds",
        float,
        10.0,
        "an unknown key id is remembered as unknown this long (no Postgres look-up for its repeats); "
        "a key created by the CLI for that id works after it at the latest",
    ),
    Option("auth_unknown_cache_entries_max", int, 10_000, "unknown key ids remembered, at most"),
    Option(
        "auth_pool_connections_max",
        int,
        2,
        "Postgres connections of the key look-ups' own pool (never the committer's), at most",
    ),
    Option(
        "auth_lookups_in_flight_max",
        int,
        256,
        "key look-ups in Postgres running or waiting for the pool at once, at most; beyond it calls get "
        "RESOURCE_EXHAUSTED",
    ),
    Option(
        "auth_last_used_seconds",
        float,
        60.0,
        "a key's last_used_at is written at most this often (batched for all keys used meanwhile)",
    ),
    Option("grpc_message_bytes_max", int, 4 * 1024 * 1024, "largest gRPC request message, bytes"),
    Option(
        "program_id",
        str,
        "alliance",
        "the loyalty program whose versioned rules (tiers, expiry, promotions, ...) the service applies; "
        "with no version stored, earns and redeems follow the plain ledger",
    ),
    Option("expiry_lots_per_batch_max", int, 1000, "expired point lots posted per batch by the expiry job, at most"),
    Option(
        "dividend_check_seconds",
        float,
        60.0,
        "how often the service checks whether the dividend pool is due a round (program rules)",
    ),
    Option(
        "member_verifications_in_flight_max",
        int,
        64,
        "member presence checks (one-time codes, PINs) running at once, at most; the others wait",
    ),
    Option("pin_hash_threads_max", int, 2, "threads hashing member PINs (scrypt, ~50 ms each), at most"),
    Option(
        "member_secret_key",
        str,
        "",
        "base64 of 32 random bytes: members' TOTP secrets are stored AES-GCM encrypted under it, so a "
        "database dump alone does not reveal them; empty = stored in clear. Keep it out of the database "
        "and its backups; secrets stored under a key need that key",
    ),
    Option("shutdown_grace_seconds", float, 10.0, "on SIGTERM, time to finish in-flight calls"),
    Option(
        "shutdown_drain_seconds",
        float,
        0.5,
        "on SIGTERM, time new calls get UNAVAILABLE (health NOT_SERVING) before the server closes",
    ),
    # --- the change feed (EventsService.WatchEvents) and its NATS JetStream publisher ---
    Option(
        "events_stream_buffer_events_max",
        int,
        1000,
        "events a WatchEvents stream holds read from Postgres but not yet taken by its caller, at most",
    ),
    Option(
        "events_stream_stall_seconds_max",
        float,
        30.0,
        "a WatchEvents stream whose buffer stays full this long ends RESOURCE_EXHAUSTED with its last cursor",
    ),
    Option("events_page_events_max", int, 500, "events one Postgres read of the feed returns, at most"),
    Option(
        "events_scan_transactions_max",
        int,
        100_000,
        "transaction ids one read of a filtered feed scans, at most (bounds a read that finds few matches)",
    ),
    Option(
        "events_poll_seconds",
        float,
        1.0,
        "a stream at the head reads again after this long without a commit wake-up (member events written "
        "by another process)",
    ),
    Option("events_streams_max", int, 256, "WatchEvents streams open at once, at most (beyond: RESOURCE_EXHAUSTED)"),
    Option(
        "events_pool_connections_max",
        int,
        2,
        "Postgres connections for the change feed's reads, its NATS publisher and expiry scan (their own pool)",
    ),
    Option(
        "events_expiry_notice_days",
        int,
        0,
        "emit a points_expiring member event this many days before a lot expires (0: off); scanned every "
        "--events-expiry-scan-seconds",
    ),
    Option("events_expiry_scan_seconds", float, 3600.0, "how often the expiring-points scan runs"),
    Option("events_expiry_scan_lots_max", int, 10_000, "lots one expiring-points scan reads, at most"),
    Option(
        "events_nats_url",
        str,
        "",
        "NATS server URL(s), comma-separated (nats://host:4222): publish the change feed to JetStream; empty = off",
    ),
    Option("events_nats_stream", str, "POINTS_EVENTS", "the JetStream stream the feed is published to"),
    Option(
        "events_nats_duplicate_window_seconds",
        float,
        600.0,
        "the stream's duplicate window (Nats-Msg-Id): a republish after a crash within it is dropped by the broker",
    ),
    Option("events_nats_batch_events_max", int, 256, "events published before the cursor is stored, at most"),
    Option("events_nats_ack_timeout_seconds", float, 5.0, "wait for the broker's ack of one publish, at most"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    insecure: bool = False
    health_listen: str = ""
    database_url: str = ""
    data_dir: str = ".points-data"
    database_name: str = "points"
    embedded_postgres_settings: str = ""
    batch_operations_max: int = 1000
    batch_linger_seconds: float = 0.001
    queue_operations_max: int = 20_000
    commit_timeout_seconds: float = 10.0
    writer_lock_wait_seconds: float = 0.0
    pool_connections_max: int = 8
    projection_wait_seconds: float = 5.0
    projector: str = "process"
    projection_queue_batches_max: int = 64
    projection_batches_per_transaction_max: int = 16
    projection_linger_seconds: float = 0.0
    batch_log_retention_seconds: float = 3600.0
    hold_ttl_seconds_default: int = 7 * DAY_SECONDS
    hold_ttl_seconds_max: int = 31 * DAY_SECONDS
    holds_expired_per_batch_max: int = 10_000
    balance_checkpoint_seconds: float = 5.0
    balance_checkpoint_accounts_max: int = 100_000
    points_max: int = 10**12
    purchase_amount_max: int = 10**13
    id_bytes_max: int = 128
    idempotency_key_bytes_max: int = 128
    idempotency_retention_days: int = 0
    idempotency_purge_chunk_rows_max: int = 10_000
    idempotency_purge_chunk_timeout_seconds: float = 60.0
    idempotency_keys_expected: int = 0
    page_size_default: int = 50
    page_size_max: int = 200
    members_max: int = 5_000_000
    holds_max: int = 2_000_000
    transactions_resident_max: int = 200_000
    rpcs_in_flight_max: int = 10_000
    merchant_operations_per_second: float = 1000.0
    merchant_burst_operations: int = 10_000
    merchant_holds_open_max: int = 200_000
    merchant_holds_recount_seconds: float = 60.0
    merchant_new_members_per_hour_max: int = 100_000
    merchant_queue_operations_max: int = 5_000
    batch_request_operations_max: int = 8192
    stream_operations_in_flight_max: int = 1024
    auth_cache_seconds: float = 5.0
    auth_unknown_cache_seconds: float = 10.0
    auth_unknown_cache_entries_max: int = 10_000
    auth_pool_connections_max: int = 2
    auth_lookups_in_flight_max: int = 256
    auth_last_used_seconds: float = 60.0
    grpc_message_bytes_max: int = 4 * 1024 * 1024
    program_id: str = "alliance"
    expiry_lots_per_batch_max: int = 1000
    dividend_check_seconds: float = 60.0
    member_verifications_in_flight_max: int = 64
    pin_hash_threads_max: int = 2
    member_secret_key: str = dataclasses.field(default="", repr=False)  # a secret: never in a repr or log
    shutdown_grace_seconds: float = 10.0
    shutdown_drain_seconds: float = 0.5
    events_stream_buffer_events_max: int = 1000
    events_stream_stall_seconds_max: float = 30.0
    events_page_events_max: int = 500
    events_scan_transactions_max: int = 100_000
    events_poll_seconds: float = 1.0
    events_streams_max: int = 256
    events_pool_connections_max: int = 2
    events_expiry_notice_days: int = 0
    events_expiry_scan_seconds: float = 3600.0
    events_expiry_scan_lots_max: int = 10_000
    events_nats_url: str = dataclasses.field(default="", repr=False)  # may carry a password
    events_nats_stream: str = "POINTS_EVENTS"
    events_nats_duplicate_window_seconds: float = 600.0
    events_nats_batch_events_max: int = 256
    events_nats_ack_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        for name in ("listen", "metrics_listen") + (("health_listen",) if self.health_listen else ()):
            host, _, port = getattr(self, name).rpartition(":")
            check(
                bool(host) and port.isdigit() and int(port) < 65536, f"{name} {getattr(self, name)!r} must be HOST:PORT"
            )
        check(
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "tls_cert_file and tls_key_file go together: give both (TLS) or neither",
        )
        check(
            not self.tls_client_ca_file or bool(self.tls_cert_file),
            "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file",
        )
        check(
            self.database_url == "" or self.database_url.startswith(("postgres://", "postgresql://")),
            "database_url must start with postgresql:// (or be empty for the embedded Postgres)",
        )
        check(
            _port_parses(self.database_url),
            "database_url has a host:port that is not a number (percent-encode @ : / # ? in the password)",
        )
        try:
            postgres_settings.parse_overrides(self.embedded_postgres_settings)
        except ValueError as error:
            problems.append(f"embedded_postgres_settings: {error}")
        check(1 <= self.batch_operations_max <= 100_000, "batch_operations_max must be 1..100000")
        check(0 <= self.batch_linger_seconds <= 1, "batch_linger_seconds must be 0..1")
        check(
            self.queue_operations_max >= self.batch_operations_max,
            "queue_operations_max must be >= batch_operations_max",
        )
        check(self.commit_timeout_seconds > 0, "commit_timeout_seconds must be > 0")
        check(0 <= self.writer_lock_wait_seconds <= 30 * DAY_SECONDS, "writer_lock_wait_seconds must be 0..2592000")
        check(
            0 <= self.balance_checkpoint_seconds <= 3600, "balance_checkpoint_seconds must be 0..3600 (0: every batch)"
        )
        check(self.balance_checkpoint_accounts_max >= 1, "balance_checkpoint_accounts_max must be >= 1")
        check(2 <= self.pool_connections_max <= 100, "pool_connections_max must be 2..100")
        check(0 < self.projection_wait_seconds <= 3600, "projection_wait_seconds must be > 0 and <= 3600")
        check(self.projector in PROJECTOR_MODES, f"projector must be one of {', '.join(PROJECTOR_MODES)}")
        check(1 <= self.projection_queue_batches_max <= 10_000, "projection_queue_batches_max must be 1..10000")
        check(
            1 <= self.projection_batches_per_transaction_max <= 1_000,
            "projection_batches_per_transaction_max must be 1..1000",
        )
        check(0 <= self.projection_linger_seconds <= 5, "projection_linger_seconds must be 0..5")
        check(
            60 <= self.batch_log_retention_seconds <= 90 * DAY_SECONDS,
            "batch_log_retention_seconds must be 60..7776000",
        )
        check(
            1 <= self.hold_ttl_seconds_default <= self.hold_ttl_seconds_max,
            "hold_ttl_seconds_default must be 1..hold_ttl_seconds_max",
        )
        check(self.holds_expired_per_batch_max >= 1, "holds_expired_per_batch_max must be >= 1")
        check(1 <= self.points_max <= 2**62, "points_max must be 1..2**62")
        check(
            1 <= self.purchase_amount_max <= 2**62 // 2000,
            "purchase_amount_max must be 1..2**62/2000 (so points never overflow)",
        )
        check(1 <= self.id_bytes_max <= 1024, "id_bytes_max must be 1..1024")
        check(1 <= self.idempotency_key_bytes_max <= 1024, "idempotency_key_bytes_max must be 1..1024")
        check(
            self.idempotency_retention_days == 0 or self.idempotency_retention_days >= 30,
            "idempotency_retention_days must be 0 (forever) or >= 30",
        )
        check(
            1 <= self.page_size_default <= self.page_size_max <= 10_000,
            "need 1 <= page_size_default <= page_size_max <= 10000",
        )
        check(self.members_max >= 1 and self.holds_max >= 1, "members_max and holds_max must be >= 1")
        check(
            self.transactions_resident_max >= self.batch_operations_max,
            "transactions_resident_max must be >= batch_operations_max",
        )
        check(1 <= self.rpcs_in_flight_max <= 1_000_000, "rpcs_in_flight_max must be 1..1000000")
        check(self.merchant_operations_per_second >= 0, "merchant_operations_per_second must be >= 0")
        check(self.merchant_burst_operations >= 1, "merchant_burst_operations must be >= 1")
        check(1 <= self.batch_request_operations_max <= 100_000, "batch_request_operations_max must be 1..100000")
        check(1 <= self.stream_operations_in_flight_max <= 100_000, "stream_operations_in_flight_max must be 1..100000")
        check(0 <= self.auth_cache_seconds <= 300, "auth_cache_seconds must be 0..300")
        check(0 <= self.auth_unknown_cache_seconds <= 300, "auth_unknown_cache_seconds must be 0..300")
        check(
            1 <= self.auth_unknown_cache_entries_max <= 10_000_000, "auth_unknown_cache_entries_max must be 1..10000000"
        )
        check(1 <= self.auth_pool_connections_max <= 20, "auth_pool_connections_max must be 1..20")
        check(1 <= self.auth_lookups_in_flight_max <= 100_000, "auth_lookups_in_flight_max must be 1..100000")
        check(0 <= self.auth_last_used_seconds <= 86_400, "auth_last_used_seconds must be 0..86400")
        check(
            1 <= self.idempotency_purge_chunk_rows_max <= 1_000_000,
            "idempotency_purge_chunk_rows_max must be 1..1000000",
        )
        check(self.idempotency_purge_chunk_timeout_seconds > 0, "idempotency_purge_chunk_timeout_seconds must be > 0")
        check(
            0 <= self.idempotency_keys_expected <= 500_000_000,
            "idempotency_keys_expected must be 0..500000000 (8 GiB of table)",
        )
        check(self.merchant_holds_open_max >= 1, "merchant_holds_open_max must be >= 1 (above holds_max: no share)")
        check(
            0.05 <= self.merchant_holds_recount_seconds <= 86_400, "merchant_holds_recount_seconds must be 0.05..86400"
        )
        check(self.merchant_new_members_per_hour_max >= 1, "merchant_new_members_per_hour_max must be >= 1")
        check(
            self.merchant_queue_operations_max >= 1,
            "merchant_queue_operations_max must be >= 1 (above queue_operations_max: no share)",
        )
        check(self.grpc_message_bytes_max >= 1024, "grpc_message_bytes_max must be >= 1024")
        check(bool(self.program_id) and len(self.program_id) <= 64, "program_id must be 1..64 characters")
        check(self.expiry_lots_per_batch_max >= 1, "expiry_lots_per_batch_max must be >= 1")
        check(0.05 <= self.dividend_check_seconds <= 86_400, "dividend_check_seconds must be 0.05..86400")
        check(
            1 <= self.member_verifications_in_flight_max <= 10_000,
            "member_verifications_in_flight_max must be 1..10000",
        )
        check(1 <= self.pin_hash_threads_max <= 64, "pin_hash_threads_max must be 1..64")
        check(
            self.member_secret_key == "" or _key_bytes(self.member_secret_key) is not None,
            "member_secret_key must be base64 of 32 bytes (e.g. `openssl rand -base64 32`), or empty",
        )
        check(self.shutdown_grace_seconds >= 0, "shutdown_grace_seconds must be >= 0")
        check(0 <= self.shutdown_drain_seconds <= 60, "shutdown_drain_seconds must be 0..60")
        check(
            1 <= self.events_stream_buffer_events_max <= 1_000_000, "events_stream_buffer_events_max must be 1..1000000"
        )
        check(0 < self.events_stream_stall_seconds_max <= 3600, "events_stream_stall_seconds_max must be 0..3600")
        check(1 <= self.events_page_events_max <= 10_000, "events_page_events_max must be 1..10000")
        check(
            self.events_page_events_max <= self.events_scan_transactions_max <= 10_000_000,
            "events_scan_transactions_max must be events_page_events_max..10000000",
        )
        check(0.01 <= self.events_poll_seconds <= 60, "events_poll_seconds must be 0.01..60")
        check(1 <= self.events_streams_max <= 100_000, "events_streams_max must be 1..100000")
        check(1 <= self.events_pool_connections_max <= 20, "events_pool_connections_max must be 1..20")
        check(0 <= self.events_expiry_notice_days <= 366, "events_expiry_notice_days must be 0..366")
        check(1 <= self.events_expiry_scan_seconds <= 86_400, "events_expiry_scan_seconds must be 1..86400")
        check(1 <= self.events_expiry_scan_lots_max <= 1_000_000, "events_expiry_scan_lots_max must be 1..1000000")
        check(
            self.events_nats_url == ""
            or all(u.strip().startswith(("nats://", "tls://")) for u in self.events_nats_url.split(",")),
            "events_nats_url must be nats://HOST:PORT (or tls://), comma-separated, or empty",
        )
        check(
            bool(self.events_nats_stream) and self.events_nats_stream.replace("_", "").replace("-", "").isalnum(),
            "events_nats_stream must be letters, digits, - and _",
        )
        check(
            1 <= self.events_nats_duplicate_window_seconds <= 7 * DAY_SECONDS,
            "events_nats_duplicate_window_seconds must be 1..604800",
        )
        check(1 <= self.events_nats_batch_events_max <= 10_000, "events_nats_batch_events_max must be 1..10000")
        check(0 < self.events_nats_ack_timeout_seconds <= 300, "events_nats_ack_timeout_seconds must be 0..300")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))


def _port_parses(url: str) -> bool:
    """False when a single-host URL's port is not a number; never says what the URL holds."""
    parts = urllib.parse.urlsplit(url)
    if "," in parts.netloc:  # several hosts: the driver checks them
        return True
    try:
        parts.port
    except ValueError:
        return False
    return True


def _key_bytes(text: str) -> bytes | None:
    try:
        key = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    return key if len(key) == 32 else None


def member_secret_key(settings: Settings) -> bytes | None:
    """The key of members' TOTP secrets at rest, or None (stored in clear)."""
    return _key_bytes(settings.member_secret_key) if settings.member_secret_key else None


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Adds a flag per option (all, or those named), defaulting to None so the environment can fill in."""
    for option in OPTIONS:
        if names is None or option.name in names:
            help = f"{option.help} [env {option.env_name}, default {option.default!r}]"
            if option.type is boolean:  # a switch: given means on
                parser.add_argument(
                    option.flag, dest=option.name, action="store_const", const=True, default=None, help=help
                )
            else:
                parser.add_argument(option.flag, dest=option.name, type=option.type, default=None, help=help)


def load(arguments: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (non-None values), then environment variables, then defaults."""
    arguments = arguments or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if arguments.get(option.name) is not None:
            values[option.name] = arguments[option.name]
        elif option.env_name in environ:
            raw = environ[option.env_name]
            try:
                values[option.name] = option.type(raw)
            except ValueError:
                raise ValueError(
                    f"invalid configuration: {option.env_name}={raw!r} is not a {option.type.__name__}"
                ) from None
    return Settings(**values)


def _check_table() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    table = {o.name: o.default for o in OPTIONS}
    if fields != table:
        raise ImportError(f"config.OPTIONS and Settings disagree: {set(fields.items()) ^ set(table.items())}")


_check_table()
