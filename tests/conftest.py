"""Test fixtures: a real Postgres (DATABASE_URL's server, or an embedded one from pgserver), a fresh
database per test module, and the service as a real subprocess on 127.0.0.1:0 with a real channel. The
helpers they use (ServiceProcess, add_merchant, fetch, ...) are in tests/harness.py."""

from __future__ import annotations

import os
import uuid

import asyncpg
import pytest

from tests.harness import ServiceProcess, run, with_database


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
    server.cleanup()


@pytest.fixture(scope="session")
def create_database(postgres_server_url):
    """Factory: a new empty database on the test server; dropped at the end of the session on
    DATABASE_URL's server (the embedded one is stopped and thrown away whole: dropping ~150 databases
    first only took time, once more than the last test's timeout on a loaded machine)."""
    created: list[str] = []

    def create() -> str:
        name = "points_test_" + uuid.uuid4().hex[:12]

        async def go():
            connection = await asyncpg.connect(postgres_server_url)
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            finally:
                await connection.close()

        run(go())
        created.append(name)
        return with_database(postgres_server_url, name)

    yield create
    if not os.environ.get("DATABASE_URL"):
        return

    async def drop():
        connection = await asyncpg.connect(postgres_server_url)
        try:
            for name in created:
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    run(drop())


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
    """A service on a fresh database, shared by the tests of a module."""
    service = ServiceProcess(create_database()).start()
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
