"""Every Prometheus metric of the service, in one place.

Names follow Prometheus conventions: a `points_` prefix (RPC metrics keep the names SREs know from
go-grpc-prometheus), base units (`_seconds`, point-units), `_total` for counters. Labels have bounded
values only: gRPC method and code, batch result, rejection reason, transaction kind. Never a merchant,
member, key or id.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

# 100 µs to ~1.6 s, doubling (plus 2.5 s and 5 s for the tail).
LATENCY_BUCKETS = (
    0.0001,
    0.0002,
    0.0004,
    0.0008,
    0.0016,
    0.0032,
    0.0064,
    0.0128,
    0.0256,
    0.0512,
    0.1024,
    0.2048,
    0.4096,
    0.8192,
    1.6384,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# The default registry: it carries the standard process, platform and GC collectors.
registry = REGISTRY

# --- RPCs (RED) ---
rpc_started = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method", "grpc_type"]
)
rpc_handled = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
rpc_seconds = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC, until its answer is sent.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)

# --- the commit pipeline ---
batch_operations = Histogram(
    "points_pipeline_batch_operations", "Operations per committed batch.", buckets=BATCH_BUCKETS
)
commit_seconds = Histogram(
    "points_pipeline_commit_seconds",
    "Time to make one batch durable: its append to the batch log (one autocommit round trip), which its answer waits for.",
    buckets=LATENCY_BUCKETS,
)
commit_step_seconds = Histogram(
    "points_pipeline_commit_step_seconds",
    "Time of each step of a batch's Postgres transaction (where a slow commit goes).",
    ["step"],
    buckets=LATENCY_BUCKETS,
)
COMMIT_STEPS = (
    "lock_check",
    "members",
    "transactions",
    "holds",
    "refunds",
    "hold_resolutions",
    "hold_expiries",
    "idempotency",
    "commit",
)
checkpoints = Counter(
    "points_pipeline_balance_checkpoints_total",
    "Balance checkpoints written (account balances folded from the journal).",
)
checkpoint_accounts = Histogram(
    "points_pipeline_checkpoint_accounts",
    "Accounts folded per balance checkpoint.",
    buckets=(1, 16, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
)

# --- the projector (processor/projector.py): the batch log's rows written off the answer path ---
projection_lag_batches = Gauge(
    "points_projection_lag_batches",
    "Batches appended to the batch log (answered) whose relational rows are not written yet.",
)
projection_lag_seconds = Gauge(
    "points_projection_lag_seconds", "Age of the oldest appended batch not projected yet (0 when none)."
)
projections = Counter(
    "points_projection_transactions_total", "Projection transactions committed (each writes one or more batches)."
)
projection_batches = Histogram(
    "points_projection_batches", "Batches written per projection transaction.", buckets=BATCH_BUCKETS
)
projection_seconds = Histogram(
    "points_projection_seconds", "Time of one projection transaction, including COMMIT.", buckets=LATENCY_BUCKETS
)
projection_waits = Counter(
    "points_projection_waits_total",
    "Reads that had to wait for the projector to reach the caller's batches (read-your-writes).",
)
projection_failures = Counter(
    "points_projection_failures_total", "Projection transactions that failed transiently and are retried."
)
projection_failing = Gauge(
    "points_projection_failing",
    "1 while the projection has failed several times in a row (it is retried): reads that must see the "
    "caller's writes, and batches that must read the relational tables first, are refused UNAVAILABLE at once.",
)
projection_queue_full = Counter(
    "points_projection_queue_full_total",
    "Times the committer waited for the projector because its queue was full (backpressure).",
)


# --projector process: the projector's own process (processor/projector_process.py). Registered only
# in that mode (in-process, its CPU is the service's: the bench then says "in server"). A counter read
# from /proc/<pid>/stat at each scrape by a collector of its own (exited children count, so it only
# grows); a Gauge named ..._total is refused by promtool as a non-counter with a counter's suffix.
class _ProjectorCpu:
    def __init__(self, read: Callable[[], float]):
        self.read = read

    def collect(self):
        yield CounterMetricFamily(
            "points_projector_cpu_seconds",
            "CPU seconds (user + system) of the projector process, every one started so far.",
            value=self.read(),
        )


_projector_cpu_seconds: _ProjectorCpu | None = None


def export_projector_cpu_seconds(read: Callable[[], float]) -> None:
    """Exports points_projector_cpu_seconds_total (a counter), read by `read` at each scrape (once a process)."""
    global _projector_cpu_seconds
    if _projector_cpu_seconds is None:
        _projector_cpu_seconds = _ProjectorCpu(read)
        REGISTRY.register(_projector_cpu_seconds)  # type: ignore[arg-type]
    _projector_cpu_seconds.read = read


projector_restarts = Counter(
    "points_projector_restarts_total", "Times the projector process exited unasked and was started again."
)
batch_log_pruned = Counter(
    "points_batch_log_pruned_total", "Projected batches deleted from the batch log past its retention."
)
queue_wait_seconds = Histogram(
    "points_pipeline_queue_wait_seconds",
    "Time an operation waits in the queue (linger included) before its batch starts.",
    buckets=LATENCY_BUCKETS,
)
queue_operations = Gauge("points_pipeline_queue_operations", "Operations waiting for the committer.")
queue_operations_max = Gauge("points_pipeline_queue_operations_max", "Configured bound of the queue.")
batch_linger_seconds = Gauge("points_pipeline_batch_linger_seconds", "Configured linger of the committer.")
batches = Counter("points_pipeline_batches_total", "Batches by result (committed or failed).", ["result"])
operations_shed = Counter(
    "points_pipeline_operations_shed_total", "Operations refused with RESOURCE_EXHAUSTED because the queue was full."
)
requests_undecodable = Counter(
    "points_rpc_requests_undecodable_total",
    "Requests of authenticated callers whose bytes are not the method's message (a "
    "request without a valid key is refused before it is decoded).",
    ["grpc_service", "grpc_method"],
)
audit_write_failures = Counter(
    "points_audit_write_failures_total",
    "Audit records of operator calls that could not be written (the call happened).",
)
quota_refusals = Counter(
    "points_merchant_quota_refusals_total",
    "Operations refused by a per-merchant quota (queue, holds_open, new_members) or because "
    "an earn of 0 points would create a member (zero_point_member).",
    ["quota"],
)
operations_rate_limited = Counter(
    "points_operations_rate_limited_total", "Mutating calls refused with RESOURCE_EXHAUSTED by a merchant's rate limit."
)
idempotent_replays = Counter(
    "points_idempotent_replays_total", "Calls answered with the stored outcome of an earlier call with the same key."
)
# the in-memory idempotency table (processor/idempotency.py)
idempotency_keys = Gauge(
    "points_idempotency_keys", "Idempotency records the in-memory table holds a fingerprint of (within retention)."
)
idempotency_table_bytes = Gauge("points_idempotency_table_bytes", "Memory of the in-memory idempotency table.")
idempotency_keys_read = Counter(
    "points_idempotency_keys_read_total",
    "Keys of batches the in-memory table could not decide as new, so read from Postgres (retries, "
    "and the rare fingerprint shared with another key); every other key is decided new without a read.",
)
resyncs = Counter(
    "points_pipeline_resyncs_total", "Rebuilds of the fast path from Postgres after a commit of unknown outcome."
)
ready = Gauge("points_ready", "1 when the ledger is recovered and Postgres reachable, else 0.")

# --- the fast path ---
members_resident = Gauge("points_fastpath_members", "Member accounts resident in the fast path.")
holds_open = Gauge("points_fastpath_holds_open", "Open holds in the fast path.")
hold_expiries = Counter("points_fastpath_hold_expiries_total", "Holds released because they expired.")
rejections = Counter("points_fastpath_rejections_total", "Operations the ledger refused, by reason.", ["reason"])

# --- business (point-units; 100 point-units = 1 point = 1 currency unit) ---
points_earned = Counter("points_earned_point_units_total", "Point-units credited by earns.")
points_expired = Counter(
    "points_expired_point_units_total",
    "Point-units of expired lots posted to the operator's breakage by the expiry job.",
)
program_transactions = Counter(
    "points_program_transactions_total",
    "Transactions of the program rules, by kind (tier_bonus, referral_bonus, "
    "acquiring_reward, acquiring_reversal, expiry, conversion, dividend, split_redeem, "
    "split_refund, merchant_voucher_spend) and of member administration (adjustment_credit, adjustment_debit, "
    "reversal_credit, reversal_debit, member_closure, transfer, merge).",
    ["kind"],
)
points_redeemed = Counter("points_redeemed_point_units_total", "Point-units debited by captures and redeems.")
points_refunded = Counter("points_refunded_point_units_total", "Point-units moved by refunds, by kind.", ["kind"])
points_hold_expired = Counter("points_hold_expired_point_units_total", "Point-units released by expired holds.")
merchants_active = Gauge("points_merchants_active", "Merchants with status active known to the service.")

# --- Postgres pool ---
pool_connections_in_use = Gauge("points_db_pool_connections_in_use", "Pool connections checked out.")
pool_connections_max = Gauge("points_db_pool_connections_max", "Configured size of the pool.")
pool_acquire_seconds = Histogram(
    "points_db_pool_acquire_seconds", "Time to acquire a pool connection.", buckets=LATENCY_BUCKETS
)

# --- transport security ---
tls_certificate_expiry = Gauge(
    "points_tls_certificate_expiry_timestamp_seconds",
    "When the gRPC listener's TLS certificate (the leaf of --tls-cert-file, as last loaded) expires, "
    "Unix time; absent without TLS.",
)


# Member presence (processor/presence.py): proofs checked before a spend is queued, by result
# (accepted, missing, not_enrolled, wrong, replayed, locked).
member_verifications = Counter(
    "points_member_verifications_total", "Member presence checks of Redeem/Authorize, by result.", ["result"]
)


# The change feed (processor/events.py, events_servicer.py) and its NATS publisher (events_nats.py).
events_streams = Gauge("points_events_streams", "WatchEvents streams open.")
events_streams_cut = Counter(
    "points_events_streams_cut_total", "WatchEvents streams ended RESOURCE_EXHAUSTED: the reader fell behind."
)
events_read = Counter("points_events_read_total", "Change-feed events read from Postgres for WatchEvents streams.")
events_published = Counter(
    "points_events_published_total",
    "Change-feed events the NATS broker acknowledged as new (duplicates: _duplicates_total).",
)
events_publish_duplicates = Counter(
    "points_events_publish_duplicates_total",
    "Change-feed events republished after a restart that the broker dropped as duplicates (Nats-Msg-Id).",
)
events_publish_failures = Counter(
    "points_events_publish_failures_total", "Publish attempts to NATS that failed (the publisher retries)."
)
events_publish_lag_events = Gauge(
    "points_events_publish_lag_events",
    "Change-feed events committed but not yet acknowledged by the NATS broker (as of the publisher's last read).",
)
events_publish_lag_seconds = Gauge(
    "points_events_publish_lag_seconds",
    "Age of the oldest change-feed event not yet acknowledged by the NATS broker; 0 when caught up.",
)
events_expiry_notices = Counter(
    "points_events_expiry_notices_total", "points_expiring member events recorded by the expiry scan."
)


# --- the cyclic garbage collector (installed by pipeline.tune_collector) ---
# 50 µs to ~1.6 s: a young pass of a batch's objects is ~0.1-1 ms, a full pass over a large heap 100s of ms
GC_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.6384)
gc_pause_seconds = Histogram(
    "points_gc_pause_seconds",
    "Time the event loop stood in a pass of Python's cyclic garbage collector, by generation (2: a full "
    "pass over every object not frozen at start-up).",
    ["generation"],
    buckets=GC_BUCKETS,
)


def _initialise_label_values() -> None:
    """Every known label value exists at 0 from start-up, so the first failure shows in rate()."""
    for result in ("committed", "failed"):
        batches.labels(result)
    for step in COMMIT_STEPS:
        commit_step_seconds.labels(step)
    for kind in ("redemption", "earn"):
        points_refunded.labels(kind)
    for reason in (
        "insufficient_points",
        "unknown_member",
        "unknown_hold",
        "hold_expired",
        "hold_captured",
        "hold_voided",
        "wrong_merchant",
        "capture_exceeds_hold",
        "unknown_transaction",
        "refund_exceeds_remaining",
        "not_refundable",
        "overflow",
        "capacity",
        "merchant_suspended",
        "spending_cap",
        "other",
    ):
        rejections.labels(reason)
    for result in ("accepted", "missing", "not_enrolled", "wrong", "replayed", "locked"):
        member_verifications.labels(result)
    for generation in ("0", "1", "2"):
        gc_pause_seconds.labels(generation)


_initialise_label_values()


def observe_many(histogram: Histogram, amount: float, count: int) -> None:
    """`histogram.observe(amount)` done `count` times, at the cost of one (the operations of a call share
    their queue wait: observing each took ~1-4 µs an operation). prometheus_client has no weighted
    observe, so this updates the same buckets and sum its observe() does (tests/unit/test_metrics_many.py
    checks it against observe())."""
    if count <= 0:
        return
    if count == 1:
        histogram.observe(amount)
        return
    histogram._sum.inc(amount * count)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(count)
            break


def serve_http(listen: str) -> int:
    """Starts the /metrics endpoint on HOST:PORT in a thread; returns the bound port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return server.server_port
