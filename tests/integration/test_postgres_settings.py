"""The embedded Postgres runs with the settings sized for the machine (README "Postgres settings"),
on a fresh data directory and on an existing one; a restart-only setting waits while other clients
are connected; the service logs the settings of the server it uses, and hints when they are far
from the documented ones."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import asyncpg
import pytest

from processor import postgres_settings, store

pytestmark = pytest.mark.timeout(120)


async def _show(url: str, *names: str) -> dict[str, str]:
    connection = await asyncpg.connect(url)
    try:
        return {name: await connection.fetchval(f"SHOW {name}") for name in names}
    finally:
        await connection.close()


def test_embedded_server_gets_the_sized_settings_and_restarts_only_when_alone(tmp_path, caplog):
    sized = postgres_settings.embedded()
    server = store.start_embedded_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        url = server.get_uri()
        # a fresh directory: restart-only settings (shared_buffers, wal_buffers) are in force at once
        shown = asyncio.run(_show(url, "shared_buffers", "wal_buffers", "max_wal_size", "fsync", "synchronous_commit"))
        assert shown == {
            "shared_buffers": sized["shared_buffers"].replace("2048MB", "2GB"),
            "wal_buffers": sized["wal_buffers"],
            "max_wal_size": sized["max_wal_size"],
            "fsync": "on",
            "synchronous_commit": "on",
        }
        first_postmaster = server.get_pid()

        async def with_a_client_connected() -> dict[str, str]:
            client = await asyncpg.connect(url)
            try:
                with caplog.at_level(logging.WARNING, logger="points.store"):
                    store.start_embedded_server(
                        tmp_path / "pg", "shared_buffers=256MB,max_wal_size=2GB", cleanup_mode="stop"
                    )
                return await _show(url, "shared_buffers", "max_wal_size")
            finally:
                await client.close()

        # an existing, running server with a client: reloadable settings now, the restart waits
        shown = asyncio.run(with_a_client_connected())
        assert shown["max_wal_size"] == "2GB"
        assert shown["shared_buffers"] == sized["shared_buffers"].replace("2048MB", "2GB")
        assert server.get_pid() == first_postmaster
        (warning,) = [r for r in caplog.records if "apply at its next restart" in r.getMessage()]
        assert warning.settings == ["shared_buffers"] and warning.clients >= 1

        # alone: restarted, and the restart-only setting is in force
        store.start_embedded_server(tmp_path / "pg", "shared_buffers=256MB,max_wal_size=2GB", cleanup_mode="stop")
        assert asyncio.run(_show(url, "shared_buffers")) == {"shared_buffers": "256MB"}
        assert server.get_pid() != first_postmaster
        # the settings live in the data directory: ALTER SYSTEM's file
        assert "shared_buffers = '256MB'" in (tmp_path / "pg" / "postgresql.auto.conf").read_text()
    finally:
        server.cleanup()


def test_a_refused_setting_stops_the_start_with_postgres_message(tmp_path):
    server = store.start_embedded_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        with pytest.raises(store.StoreError, match='unrecognized configuration parameter "no_such_setting"'):
            store.start_embedded_server(tmp_path / "pg", "no_such_setting=1", cleanup_mode="stop")
    finally:
        server.cleanup()


def test_service_logs_the_settings_of_its_server_and_hints_when_far_from_the_documented(
    create_database, service_factory
):
    # the test suite's Postgres is an external one (DATABASE_URL) left at Postgres's defaults
    service = service_factory(create_database())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any('"postgres settings"' in line for line in service.log_lines):
        time.sleep(0.05)
    entries = [json.loads(line) for line in service.log_lines if line.startswith("{")]
    (settings,) = [e for e in entries if e["msg"] == "postgres settings"]
    assert settings["server"] == "DATABASE_URL"
    assert settings["fsync"] == "on" and settings["synchronous_commit"] == "on"
    assert set(postgres_settings.REPORTED) <= set(settings)
    hints = [e["hint"] for e in entries if e["msg"].startswith("postgres setting far from the documented")]
    if (
        postgres_settings.amount(settings["shared_buffers"])
        < postgres_settings.amount(postgres_settings.sized(postgres_settings.memory_bytes())["shared_buffers"]) / 2
    ):
        assert any(h.startswith("shared_buffers") for h in hints)
