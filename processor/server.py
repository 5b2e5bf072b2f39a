"""Composition root and lifecycle: database, recovery, pipeline, gRPC server, health, shutdown."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc
from processor import auth, metrics, rpc
from processor.admin import ClearingServicer, MerchantAdminServicer, ProgramsServicer
from processor.config import Settings
from processor.pipeline import Pipeline
from processor.servicer import PointsServicer
from processor.store import Store, redact, resolve_database_url

log = logging.getLogger("points.server")

SERVICE_NAME = points_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name
ADMIN_SERVICE_NAMES = tuple(s.full_name for s in admin_pb2.DESCRIPTOR.services_by_name.values())


async def open_store(settings: Settings, url: str | None = None) -> Store:
    """Connects to DATABASE_URL, or starts the embedded Postgres; applies migrations."""
    if url is None:
        url = await database_url(settings)
    store = await Store.open(url, settings.pool_connections_max, command_timeout=settings.commit_timeout_seconds)
    await store.migrate()
    return store


async def database_url(settings: Settings) -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, resolve_database_url, settings.database_url, settings.data_dir,
                                      settings.database_name)


class Service:
    """One running points service. `start()` returns once it is SERVING; `stop()` drains it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._watchdog: asyncio.Task | None = None
        self._maintenance: asyncio.Task | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        settings = self.settings
        # The embedded Postgres (if any) starts before gRPC's threads exist: it forks.
        url = await database_url(settings)
        # The server listens first and answers health NOT_SERVING while recovery runs.
        self.authenticator = auth.Authenticator(None, settings.auth_cache_seconds)
        self.server = grpc.aio.server(interceptors=[rpc.RpcInterceptor(self.authenticator)],
                                      maximum_concurrent_rpcs=settings.rpcs_in_flight_max, options=[
            ("grpc.max_receive_message_length", settings.grpc_message_bytes_max),
            ("grpc.so_reuseport", 0),
        ])
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, *ADMIN_SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(settings.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen}: address in use or not available")
        self.pipeline = Pipeline(settings, store=None)
        self.metrics_port = metrics.serve_http(settings.metrics_listen)
        self._register_gauges()
        points_pb2_grpc.add_PointsServiceServicer_to_server(PointsServicer(settings, self.pipeline), self.server)
        admin_pb2_grpc.add_MerchantAdminServicer_to_server(
            MerchantAdminServicer(settings, self.pipeline, self.authenticator), self.server)
        admin_pb2_grpc.add_ClearingServicer_to_server(ClearingServicer(settings, self.pipeline), self.server)
        admin_pb2_grpc.add_ProgramsServicer_to_server(ProgramsServicer(settings, self.pipeline), self.server)
        await self.server.start()

        self.store = await open_store(settings, url)
        log.info("database ready", extra={"database": redact(self.store.url)})
        await self.store.acquire_writer_lock()
        self.pipeline.store = self.store
        self.authenticator.store = self.store
        await self.pipeline.recover()
        self.pipeline.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        self._watchdog = loop.create_task(self._watch(), name="health-watchdog")
        if settings.idempotency_retention_days:
            self._maintenance = loop.create_task(self._purge_idempotency(), name="idempotency-purge")

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
        metrics.merchants_active.set_function(
            lambda: sum(1 for m in pipeline.merchants.by_id.values() if m.status == "active"))
        metrics.pool_connections_max.set(settings.pool_connections_max)
        metrics.pool_connections_in_use.set_function(
            lambda: (self.store.pool.get_size() - self.store.pool.get_idle_size()) if self.store else 0)

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
                await self._set_health(health_pb2.HealthCheckResponse.SERVING if ready
                                       else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _purge_idempotency(self) -> None:
        """Deletes idempotency records older than the retention, hourly. A retry arriving after its
        key was purged would be a new operation: that is what the retention setting promises."""
        while True:
            cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=self.settings.idempotency_retention_days)
            try:
                deleted = await self.store.purge_idempotency(cutoff)
                log.info("idempotency records purged", extra={"deleted": deleted, "before": cutoff.isoformat()})
            except (asyncpg.PostgresError, OSError) as error:
                log.warning("idempotency purge failed; will retry", extra={"error": repr(error)})
            await asyncio.sleep(3600)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets in-flight ones finish (their batches commit), then closes."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        for task in (self._watchdog, self._maintenance):
            if task is not None:
                task.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.pipeline is not None:
            # New calls get UNAVAILABLE (retryable) from us rather than CANCELLED from a closing
            # server, while balancers see NOT_SERVING; queued and in-flight calls still commit.
            self.pipeline.draining = True
            await asyncio.sleep(min(self.settings.shutdown_drain_seconds, grace))
        if self.server is not None:
            await self.server.stop(grace)
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self.store is not None:
            await self.store.close()


async def serve(settings: Settings, announce=print) -> None:
    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    announce(f"points processor SERVING on {service.address} "
             f"(metrics http://{service.metrics_address}/metrics, database {redact(service.store.url)})",
             flush=True)
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
