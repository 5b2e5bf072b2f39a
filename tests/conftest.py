"""Test fixtures: a real Postgres (DATABASE_URL's server, or an embedded one from pgserver), a fresh
database per test module, and the service as a real subprocess on 127.0.0.1:0 with a real channel. The
helpers they use (ServiceProcess, add_merchant, fetch, ...) are in tests/harness.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import asyncpg
import pytest

from tests.harness import ServiceProcess, migrate, run, with_database

SERVER_STOP_SECONDS_MAX = 10  # for the embedded server to exit after SIGQUIT
DROPS_CONCURRENT = 16  # connections dropping databases at the end of the session (the server allows ~100)


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory):
    """URL of a Postgres server's maintenance database: DATABASE_URL's server, else an embedded one."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    import pgserver

    directory = tmp_path_factory.mktemp("pg")
    server = pgserver.get_server(str(directory), cleanup_mode="stop")
    yield server.get_uri()
    _stop_at_once(directory)
    server.cleanup()


def _stop_at_once(data_directory) -> None:
    """Stops the embedded server without its shutdown checkpoint (SIGQUIT: immediate shutdown): the data
    directory is thrown away, and the checkpoint flushed every page the suite dirtied, with fsync.
    pgserver's cleanup then finds the server stopped."""
    pid_file = data_directory / "postmaster.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split("\n", 1)[0])
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + SERVER_STOP_SECONDS_MAX
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    # still running: pgserver's cleanup stops it its own way


@pytest.fixture(scope="session")
def create_database(postgres_server_url):
    """Factory: a new database on the test server, empty, or with `migrated=True` a copy of one the
    service's migrations were applied to (CREATE DATABASE ... TEMPLATE: ~0.05 s against ~0.4-0.9 s for
    the 20-odd migrations on a loaded 2-core machine, once per module otherwise). The template is
    migrated at the first such call and no session connects to it afterwards (Postgres refuses to copy a
    database others are connected to). Dropped at the end of the session on DATABASE_URL's server (the
    embedded one is stopped and thrown away whole: dropping ~150 databases first only took time, once
    more than the last test's timeout on a loaded machine)."""
    created: list[str] = []
    templates: list[str] = []  # the migrated template, once made

    async def execute(statement: str) -> None:
        connection = await asyncpg.connect(postgres_server_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def new_database(template: str | None) -> str:
        name = "points_test_" + uuid.uuid4().hex[:12]
        run(execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
        created.append(name)
        return name

    def create(migrated: bool = False) -> str:
        if not migrated:
            return with_database(postgres_server_url, new_database(None))
        if not templates:
            template = new_database(None)
            migrate(with_database(postgres_server_url, template))  # closes its connection before returning
            templates.append(template)
        return with_database(postgres_server_url, new_database(templates[0]))

    yield create
    if not os.environ.get("DATABASE_URL"):
        return

    # Each DROP DATABASE waits for a checkpoint of its own (2-3 s each on a loaded machine: ~6 min for the
    # suite's ~150 databases one after another); drops waiting at the same time share one, so they run
    # DROPS_CONCURRENT at a time (6 databases: 13.6 s in turn, 1.9 s together).
    gate = asyncio.Semaphore(DROPS_CONCURRENT)

    async def drop(name: str) -> None:
        async with gate:
            await execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def drop_all() -> None:
        await asyncio.gather(*(drop(name) for name in created))

    run(drop_all())


@pytest.fixture
def service_factory():
    started: list[ServiceProcess] = []

    def start(database_url: str, *extra: str, env: dict | None = None) -> ServiceProcess:
        service = ServiceProcess(database_url, *extra, env=env).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()
        errors = [
            line
            for line in service.log_lines
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
        ]
        if errors:  # shown by pytest with the test's output when it fails
            print(f"--- service {service.target} log (errors) ---\n" + "".join(service.log_lines[-60:]))


@pytest.fixture(scope="module")
def service(create_database):
    """A service on a fresh (migrated) database, shared by the tests of a module."""
    service = ServiceProcess(create_database(migrated=True)).start()
    yield service
    service.kill()


@pytest.fixture(scope="module")
def stub(service):
    """A PointsService client that sends the right credential with each call."""
    import points.v1.points_pb2_grpc as points_pb2_grpc

    with service.channel() as channel:
        yield points_pb2_grpc.PointsServiceStub(channel)


@pytest.fixture(scope="module")
def channel(service):
    """A channel without credentials: the test sends its own."""
    with service.bare_channel() as channel:
        yield channel
