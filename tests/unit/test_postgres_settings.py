"""The embedded Postgres's settings: sized for the machine within bounds, overrides that cannot turn
durability off, and the start-up check's hints. No database here (tests/integration/test_postgres_settings.py
starts one)."""

from __future__ import annotations

import pathlib

import pytest

from processor import config, postgres_settings
from processor.postgres_settings import GIB, MIB, Setting

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    "memory,shared_buffers",
    [
        (512 * MIB, "128MB"),  # never below Postgres's own default
        (2 * GIB, "256MB"),  # an eighth
        (3 * GIB + 5 * MIB, "384MB"),  # an eighth, whole MiB
        (24 * GIB, "2048MB"),  # capped
        (1024 * GIB, "2048MB"),
    ],
)
def test_shared_buffers_is_an_eighth_of_memory_within_bounds(memory, shared_buffers):
    assert postgres_settings.sized(memory)["shared_buffers"] == shared_buffers


def test_every_sized_setting_is_documented_in_the_readme_and_none_touches_durability():
    sized = postgres_settings.sized(24 * GIB)
    text = README.read_text()
    for name in sized:
        assert f"`{name}`" in text, f"README's Postgres settings do not mention {name}"
    assert not set(sized) & set(postgres_settings.DURABILITY_SETTINGS)
    assert set(sized) <= set(postgres_settings.REPORTED)  # what is applied is what the start-up line shows


def test_overrides_replace_sized_values_and_add_others():
    settings = postgres_settings.embedded(" shared_buffers = 512MB ,work_mem=16MB,", memory=24 * GIB)
    assert settings["shared_buffers"] == "512MB" and settings["work_mem"] == "16MB"
    assert settings["max_wal_size"] == "4GB"


@pytest.mark.parametrize(
    "text,message",
    [
        ("fsync=off", "fsync stays on"),
        ("Synchronous_Commit=off", "synchronous_commit stays on"),
        ("full_page_writes=off", "full_page_writes stays on"),
        ("shared_buffers", "must be NAME=VALUE"),
        ("shared_buffers=", "must be NAME=VALUE"),
        ("max_wal_size='1GB'; DROP TABLE x", "must be NAME=VALUE"),
        ("bad-name=1", "must be NAME=VALUE"),
    ],
)
def test_overrides_refuse_durability_and_malformed_pairs(text, message):
    with pytest.raises(ValueError, match=message):
        postgres_settings.parse_overrides(text)


def test_configuration_refuses_a_bad_override_naming_the_option():
    with pytest.raises(ValueError, match="embedded_postgres_settings: fsync stays on"):
        config.load({}, {"POINTS_EMBEDDED_POSTGRES_SETTINGS": "fsync=off"})
    assert config.load({}, {"POINTS_EMBEDDED_POSTGRES_SETTINGS": "shared_buffers=1GB"}).embedded_postgres_settings


def _rows(**overrides: tuple[str, str | None, str]) -> list[Setting]:
    """pg_settings rows of a server sized as documented for 24 GiB, with some replaced."""
    rows = {
        "fsync": ("on", None, "on"),
        "synchronous_commit": ("on", None, "on"),
        "full_page_writes": ("on", None, "on"),
        "shared_buffers": ("262144", "8kB", "2GB"),
        "wal_buffers": ("8192", "8kB", "64MB"),
        "max_wal_size": ("4096", "MB", "4GB"),
        "min_wal_size": ("1024", "MB", "1GB"),
        "checkpoint_timeout": ("900", "s", "15min"),
        "checkpoint_completion_target": ("0.9", None, "0.9"),
    }
    rows.update(overrides)
    return [Setting(name, *row) for name, row in rows.items()]


def test_a_server_sized_as_documented_gets_no_hint():
    shown, hints = postgres_settings.check(_rows(), postgres_settings.sized(24 * GIB))
    assert hints == []
    assert shown["shared_buffers"] == "2GB" and shown["fsync"] == "on"


def test_defaults_and_durability_off_get_hints():
    rows = _rows(
        shared_buffers=("16384", "8kB", "128MB"),
        checkpoint_timeout=("300", "s", "5min"),
        synchronous_commit=("off", None, "off"),
        max_wal_size=("3072", "MB", "3GB"),  # under the documented 4GB, but not under half: no hint
    )
    _, hints = postgres_settings.check(rows, postgres_settings.sized(24 * GIB))
    assert any(h.startswith("synchronous_commit is off") for h in hints)
    assert any(h.startswith("shared_buffers 128MB is under half the documented 2048MB") for h in hints)
    assert any(h.startswith("checkpoint_timeout 5min") for h in hints)
    assert not any("max_wal_size" in h for h in hints)
    assert len(hints) == 3
