"""Composition root and lifecycle: database, recovery, pipeline, gRPC server, health, shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import time
from typing import Callable

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from points.v1 import admin_pb2, admin_pb2_grpc, events_pb2, events_pb2_grpc, points_pb2, points_pb2_grpc
from processor import audit, auth, events, metrics, quotas, rpc, transport
from processor import reflection as filtering_reflection
from processor.admin import (
    ClearingServicer,
    ClearingServiceServicer,
    MerchantAdminServicer,
    MerchantAdminServiceServicer,
    ProgramsServicer,
    ProgramsServiceServicer,
)
from processor.config import Settings
from processor.channel import ChannelServicer
from processor.events_servicer import EventsServicer
from processor.member_admin import MemberAdminServicer
from processor.pipeline import Pipeline
from processor.presence import Presence
from processor.servicer import PointsServicer
from processor.store import Store, log_server_settings, redact, resolve_database_url

log = logging.getLogger("points.server")

SERVICE_NAME = points_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name
ADMIN_SERVICE_NAMES = tuple(s.full_name for s in admin_pb2.DESCRIPTOR.services_by_name.values())
EVENTS_SERVICE_NAME = events_pb2.DESCRIPTOR.services_by_name["EventsService"].full_name


async def open_store(settings: Settings, url: str | None = None) -> Store:
    """Connects to DATABASE_URL, or starts the embedded Postgres; applies migrations."""
    if url is None:
        url = await database_url(settings)
    store = await Store.open(url, settings.pool_connections_max, command_timeout=settings.commit_timeout_seconds)
    await store.migrate()
    return store


async def database_url(settings: Settings) -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None,
        resolve_database_url,
        settings.database_url,
        settings.data_dir,
        settings.database_name,
        settings.embedded_postgres_settings,
    )


def _bind(add_port: Callable[[], int]) -> int:
    """The port a listener got, or 0 when the address is taken or not this host's: older grpcio returns
    0, newer raises RuntimeError ("Failed to bind"); either way the caller says so in one line."""
    try:
        return add_port()
    except RuntimeError:
        return 0


class Service:
    """One running points service. `start()` returns once it is SERVING; `stop()` drains it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.certificates: transport.ServerCertificates | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._watchdog: asyncio.Task | None = None
        self._maintenance: asyncio.Task | None = None
        self._auth_upkeep: asyncio.Task | None = None
        self._holds_recount: asyncio.Task | None = None
        self._expiry_notices: asyncio.Task | None = None
        self.events_publisher = None  # processor.events_nats.EventsPublisher, with --events-nats-url
        self.auth_pool: asyncpg.Pool | None = None
        self.events_pool: asyncpg.Pool | None = None  # the change feed's reads, the publisher, the expiry scan

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        settings = self.settings
        # refused before anything starts or binds: plaintext off loopback, unreadable certificates
        transport.require_secure_listen(settings)
        self.certificates = transport.server_certificates(settings)
        # The embedded Postgres (if any) starts before gRPC's threads exist: it forks.
        url = await database_url(settings)
        # The server listens first and answers health NOT_SERVING while recovery runs.
        self.authenticator = auth.Authenticator(
            None,
            settings.auth_cache_seconds,
            unknown_cache_seconds=settings.auth_unknown_cache_seconds,
            unknown_cache_entries_max=settings.auth_unknown_cache_entries_max,
            last_used_seconds=settings.auth_last_used_seconds,
            lookups_in_flight_max=settings.auth_lookups_in_flight_max,
        )
        self.audit_log = audit.AuditLog()
        self.server = grpc.aio.server(
            interceptors=[rpc.RpcInterceptor(self.authenticator, self.audit_log)],
            maximum_concurrent_rpcs=settings.rpcs_in_flight_max,
            options=[
                ("grpc.max_receive_message_length", settings.grpc_message_bytes_max),
                ("grpc.so_reuseport", 0),
            ],
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # the operator services are listed to operator keys only (processor/reflection.py)
        filtering_reflection.enable(
            (SERVICE_NAME, *ADMIN_SERVICE_NAMES, EVENTS_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = _bind(
            lambda: (
                self.server.add_secure_port(settings.listen, self.certificates.credentials())
                if self.certificates is not None
                else self.server.add_insecure_port(settings.listen)
            )
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen}: address in use or not available")
        log.info(
            "gRPC listening",
            extra={
                "address": self.address,
                "transport": "mutual TLS"
                if settings.tls_client_ca_file
                else "TLS"
                if self.certificates is not None
                else "plaintext",
                "certificate_sha256": self.certificates.fingerprint if self.certificates else None,
            },
        )
        if settings.health_listen:
            await self._start_health_server()
        self.pipeline = Pipeline(settings, store=None)
        self.metrics_port = metrics.serve_http(settings.metrics_listen)
        self._register_gauges()
        self.presence = Presence(
            settings, self.pipeline
        )  # member presence: PointsService checks, MemberAdminService enrolls
        points_pb2_grpc.add_PointsServiceServicer_to_server(
            PointsServicer(settings, self.pipeline, self.presence), self.server
        )
        admin_pb2_grpc.add_MemberAdminServiceServicer_to_server(
            MemberAdminServicer(settings, self.pipeline, self.presence), self.server
        )
        # MerchantAdmin, Clearing and Programs (deprecated) and their STANDARD-named twins: one servicer each
        merchant_admin = MerchantAdminServicer(settings, self.pipeline, self.authenticator)
        clearing = ClearingServicer(settings, self.pipeline)
        programs = ProgramsServicer(settings, self.pipeline)
        admin_pb2_grpc.add_MerchantAdminServicer_to_server(merchant_admin, self.server)
        admin_pb2_grpc.add_ClearingServicer_to_server(clearing, self.server)
        admin_pb2_grpc.add_ProgramsServicer_to_server(programs, self.server)
        admin_pb2_grpc.add_MerchantAdminServiceServicer_to_server(
            MerchantAdminServiceServicer(merchant_admin), self.server
        )
        admin_pb2_grpc.add_ClearingServiceServicer_to_server(ClearingServiceServicer(clearing), self.server)
        admin_pb2_grpc.add_ProgramsServiceServicer_to_server(ProgramsServiceServicer(programs), self.server)
        admin_pb2_grpc.add_ChannelServiceServicer_to_server(ChannelServicer(settings, self.pipeline), self.server)
        admin_pb2_grpc.add_AuditServiceServicer_to_server(
            audit.AuditServicer(self.audit_log, self.pipeline), self.server
        )
        self.events_servicer = EventsServicer(settings, self.pipeline)
        events_pb2_grpc.add_EventsServiceServicer_to_server(self.events_servicer, self.server)
        await self.server.start()

        self.store = await open_store(settings, url)
        log.info("database ready", extra={"database": redact(self.store.url)})
        await log_server_settings(self.store.pool, not settings.database_url, settings.embedded_postgres_settings)
        await self.store.acquire_writer_lock(settings.writer_lock_wait_seconds)
        self.pipeline.store = self.store
        # key look-ups on their own small pool: a flood of bad keys never takes the committer's connections
        self.auth_pool = await asyncpg.create_pool(
            self.store.url,
            min_size=0,
            max_size=settings.auth_pool_connections_max,
            command_timeout=settings.commit_timeout_seconds,
            timeout=settings.commit_timeout_seconds,
            server_settings={"application_name": "points-processor-auth"},
        )
        self.authenticator.pool = self.auth_pool
        # the change feed's reads on their own small pool too: a crowd of streams woken by one commit
        # never takes the committer's connections
        self.events_pool = await asyncpg.create_pool(
            self.store.url,
            min_size=0,
            max_size=settings.events_pool_connections_max,
            command_timeout=settings.commit_timeout_seconds,
            timeout=settings.commit_timeout_seconds,
            server_settings={"application_name": "points-processor-events"},
        )
        self.events_servicer.pool = self.events_pool
        self.authenticator.store = self.store
        self.audit_log.store = self.store
        await self.pipeline.recover()
        self.pipeline.start()
        await self.pipeline.projector.started()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        self._watchdog = loop.create_task(self._watch(), name="health-watchdog")
        if settings.idempotency_retention_days:
            self._maintenance = loop.create_task(self._purge_idempotency(), name="idempotency-purge")
        self._auth_upkeep = loop.create_task(self._write_keys_last_used(), name="keys-last-used")
        self._holds_recount = loop.create_task(
            quotas.recount_open_holds(self.pipeline, settings.merchant_holds_recount_seconds), name="holds-recount"
        )
        if settings.events_expiry_notice_days:
            self._expiry_notices = loop.create_task(self._notice_expiring_points(), name="events-expiry-notices")
        if settings.events_nats_url:
            from processor.events_nats import EventsPublisher  # nats-py is loaded only when publishing

            self.events_publisher = EventsPublisher(settings, self.events_pool, self.pipeline.feed_signal)
            self.events_publisher.start()

    async def _start_health_server(self) -> None:
        """A plaintext listener serving the health service alone (the same statuses), for probes that
        cannot speak TLS; it carries no other service, so nothing of the ledger is reachable on it."""
        self.health_server = grpc.aio.server(maximum_concurrent_rpcs=64, options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = _bind(lambda: self.health_server.add_insecure_port(self.settings.health_listen))
        if self.health_port == 0:
            raise OSError(f"cannot listen on {self.settings.health_listen}: address in use or not available")
        await self.health_server.start()
        log.info(
            "health listening",
            extra={"address": f"{self.settings.health_listen.rpartition(':')[0]}:{self.health_port}"},
        )

    def reload_certificates(self) -> None:
        """SIGHUP: reread the TLS files; new connections get the new certificate, open ones keep theirs."""
        if self.certificates is None:
            log.warning("SIGHUP: no TLS configured (--tls-cert-file); nothing to reload")
            return
        self.certificates.reload()

    @property
    def metrics_address(self) -> str:
        return f"{self.settings.metrics_listen.rpartition(':')[0]}:{self.metrics_port}"

    def _register_gauges(self) -> None:
        """Gauges read at scrape time from the live objects, so they cannot drift."""
        pipeline, settings = self.pipeline, self.settings
        metrics.queue_operations.set_function(lambda: len(pipeline._queue))
        metrics.queue_operations_max.set(settings.queue_operations_max)
        metrics.batch_linger_seconds.set(settings.batch_linger_seconds)
        metrics.ready.set_function(lambda: 1 if pipeline.ready else 0)
        metrics.members_resident.set_function(lambda: pipeline.ledger.members_count if pipeline.ledger else 0)
        metrics.holds_open.set_function(lambda: pipeline.ledger.holds_open_count if pipeline.ledger else 0)
        metrics.idempotency_keys.set_function(lambda: pipeline.idempotency.count)
        metrics.idempotency_table_bytes.set_function(lambda: pipeline.idempotency.memory_bytes)
        metrics.merchants_active.set_function(
            lambda: sum(1 for m in pipeline.merchants.by_id.values() if m.status == "active")
        )
        metrics.pool_connections_max.set(settings.pool_connections_max)
        metrics.pool_connections_in_use.set_function(
            lambda: (self.store.pool.get_size() - self.store.pool.get_idle_size()) if self.store else 0
        )

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _watch(self) -> None:
        """Mirrors the pipeline's readiness into health, so balancers stop routing while Postgres is away."""
        serving = True
        ticks = 0
        while True:
            await asyncio.sleep(0.5)
            ticks += 1
            if ticks % 4 == 0 and self.pipeline.ready and not await self.store.writer_lock_alive():
                # the lock session died (Postgres restarted it, or a DBA terminated it): stop writing
                # and take the lock again, or stop if another service has taken it meanwhile
                log.error("writer lock session lost; resynchronising")
                self.pipeline.request_resync()
            ready = self.pipeline is not None and self.pipeline.ready
            if ready != serving:
                serving = ready
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                )

    async def _purge_idempotency(self) -> None:
        """Deletes idempotency records older than the retention, hourly. A retry arriving after its
        key was purged would be a new operation: that is what the retention setting promises."""
        while True:
            cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=self.settings.idempotency_retention_days)
            try:
                table, epoch = self.pipeline.idempotency, self.pipeline.idempotency.epoch
                deleted = await self.store.purge_idempotency(
                    cutoff,
                    self.settings.idempotency_purge_chunk_rows_max,
                    self.settings.idempotency_purge_chunk_timeout_seconds,
                    # the in-memory table forgets them too (unless a recovery rebuilt it meanwhile)
                    deleted_keys=lambda keys: table.remove(keys, epoch),
                )
                log.info("idempotency records purged", extra={"deleted": deleted, "before": cutoff.isoformat()})
            except (asyncpg.PostgresError, OSError) as error:
                log.warning("idempotency purge failed; will retry", extra={"error": repr(error)})
            await asyncio.sleep(3600)

    async def _notice_expiring_points(self) -> None:
        """The change feed's points_expiring events, every events_expiry_scan_seconds (a bounded scan)."""
        settings = self.settings
        while True:
            try:
                recorded = await events.scan_expiring_points(
                    self.events_pool,
                    settings.events_expiry_notice_days,
                    settings.events_expiry_scan_lots_max,
                    time.time_ns() // 1000,
                    self.pipeline.feed_signal,
                )
                metrics.events_expiry_notices.inc(recorded)
            except (asyncpg.PostgresError, OSError, asyncio.TimeoutError) as error:
                log.warning("expiring-points scan failed; will retry", extra={"error": repr(error)})
            await asyncio.sleep(settings.events_expiry_scan_seconds)

    async def _write_keys_last_used(self) -> None:
        """Writes the keys' last use, batched, every auth_last_used_seconds (at least every second)."""
        while True:
            await asyncio.sleep(max(1.0, self.settings.auth_last_used_seconds))
            try:
                await self.authenticator.flush_last_used()
            except (asyncpg.PostgresError, OSError, asyncio.TimeoutError) as error:
                log.warning("keys' last use not written; will retry", extra={"error": repr(error)})

    async def _drain(self, grace: float) -> None:
        """Refuses new calls (UNAVAILABLE) for shutdown_drain_seconds, and for as long after as calls
        keep arriving (until none came for shutdown_drain_seconds), at most half the grace. A call the
        transport accepted but this loop had not yet taken when server.stop runs is cancelled by gRPC
        (CANCELLED, which a client cannot tell from its own cancel): under load such a backlog is
        what the loop is still working through when a fixed drain ends (test_lifecycle's SIGTERM under
        load saw it on a loaded machine)."""
        assert self.pipeline is not None
        quiet = min(self.settings.shutdown_drain_seconds, grace)
        if quiet <= 0:
            return
        started = time.monotonic()
        deadline = started + max(quiet, grace / 2)
        while True:
            # quiet seconds after the start, or after the last call refused, whichever is later
            end = min(max(started, self.pipeline.last_drain_refusal) + quiet, deadline)
            now = time.monotonic()
            if now >= end:
                return
            await asyncio.sleep(end - now)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets in-flight ones finish (their batches commit), then closes."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        for task in (self._watchdog, self._maintenance, self._auth_upkeep, self._holds_recount, self._expiry_notices):
            if task is not None:
                task.cancel()
        if self.events_publisher is not None:
            await self.events_publisher.stop()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.pipeline is not None:
            # New calls get UNAVAILABLE (retryable) from us rather than CANCELLED from a closing
            # server, while balancers see NOT_SERVING; queued and in-flight calls still commit.
            self.pipeline.draining = True
            await self._drain(grace)
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.pipeline is not None:
            await self.pipeline.stop()
        if getattr(self, "presence", None) is not None:
            self.presence.close()
        if self.store is not None:
            try:
                await self.authenticator.flush_last_used()
            except Exception as error:  # only the last minute's last-use times are lost
                log.warning("keys' last use not written at shutdown", extra={"error": repr(error)})
            if self.auth_pool is not None:
                await self.auth_pool.close()
            if self.events_pool is not None:
                await self.events_pool.close()
            await self.store.close()


async def serve(settings: Settings, announce=print) -> None:
    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_certificates)
    await service.start()
    announce(
        f"points processor SERVING on {service.address} "
        f"(metrics http://{service.metrics_address}/metrics, database {redact(service.store.url)})",
        flush=True,
    )
    waiter = loop.create_task(stop.wait())
    committer = service.pipeline._task
    done, _ = await asyncio.wait({waiter, committer}, return_when=asyncio.FIRST_COMPLETED)
    if committer in done and committer.exception() is not None:
        log.critical("committer stopped", exc_info=committer.exception())
        try:
            await service.stop(grace=0)
        except Exception:  # noqa: BLE001 - the committer's own error once more (stop awaits it); logged above
            pass
        raise SystemExit(70)
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await service.stop()
