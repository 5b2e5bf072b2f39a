"""The Postgres settings the engine is sized for: computed for this machine, applied to the embedded
server (processor.store.start_embedded_server), and checked, never changed, on an external one.

Pure: no database access here. The store applies `embedded(...)` with ALTER SYSTEM; the service logs
`check(...)` of whatever server it runs on, once at start.

Durability is not a setting we size: fsync, synchronous_commit and full_page_writes stay on (every
answer follows a durable commit), so an override may not name them, and an external server that turns
one of them off gets a warning.
"""

from __future__ import annotations

import dataclasses
import os
import re

MIB = 1024 * 1024
GIB = 1024 * MIB
# shared_buffers is this share of the machine's memory, within these bounds: the service (issue 14:
# ≤ 1 GiB resident), its Python clients and the OS page cache share the machine with Postgres, so a
# dedicated server's usual quarter is too much; above the cap the page cache serves as well, and a
# checkpoint has more dirty buffers to write at once.
SHARED_BUFFERS_MEMORY_DIVISOR = 8
SHARED_BUFFERS_BYTES_MIN = 128 * MIB  # Postgres's own default: never below it
SHARED_BUFFERS_BYTES_MAX = 2 * GIB

# NAME=VALUE,NAME=VALUE (--embedded-postgres-settings / POINTS_EMBEDDED_POSTGRES_SETTINGS)
_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")
# never ours to relax: an answer is sent only after its batch is durable
DURABILITY_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def memory_bytes() -> int:
    """Physical memory, or the cgroup's limit (containers) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def shared_buffers_bytes(memory: int) -> int:
    """An eighth of the memory, in whole MiB, within [128 MiB, 2 GiB]."""
    return max(
        SHARED_BUFFERS_BYTES_MIN, min(SHARED_BUFFERS_BYTES_MAX, memory // SHARED_BUFFERS_MEMORY_DIVISOR // MIB * MIB)
    )


def sized(memory: int) -> dict[str, str]:
    """The documented settings (README "Postgres settings") for a machine with this much memory."""
    return {
        "shared_buffers": f"{shared_buffers_bytes(memory) // MIB}MB",
        # A batch of 1,000 operations writes several MB of WAL in one transaction; with buffers smaller
        # than that the backend writes WAL out itself before its commit (pg_stat_wal.wal_buffers_full).
        # The automatic size (1/32 of shared_buffers) stops at 16 MB.
        "wal_buffers": "64MB",
        # Checkpoints by time, not by WAL volume under batch load: each checkpoint makes the next write
        # of every page a full-page image. 4 GB of WAL at most between them (a soft limit; the disk
        # must hold it), 1 GB kept for reuse instead of created anew.
        "max_wal_size": "4GB",
        "min_wal_size": "1GB",
        # Crash recovery replays at most this much time's WAL (bounded by max_wal_size too).
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": "0.9",  # spread a checkpoint's writes over most of the interval
    }


def parse_overrides(text: str) -> dict[str, str]:
    """NAME=VALUE,... into a dict; ValueError on a malformed pair or a durability setting."""
    overrides: dict[str, str] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        name, equals, value = pair.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not equals or not _NAME.match(name) or not value or "'" in value:
            raise ValueError(f"embedded Postgres setting {pair.strip()!r} must be NAME=VALUE")
        if name in DURABILITY_SETTINGS:
            raise ValueError(f"{name} stays {DURABILITY_SETTINGS[name]}: every answer follows a durable commit")
        overrides[name] = value
    return overrides


def embedded(overrides_text: str = "", memory: int | None = None) -> dict[str, str]:
    """What the embedded server is given: the sized settings, then the operator's overrides."""
    settings = sized(memory_bytes() if memory is None else memory)
    settings.update(parse_overrides(overrides_text))
    return settings


# --- checking a server's settings ------------------------------------------------------------------

# The settings a start-up line reports, durability first.
REPORTED = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "shared_buffers",
    "wal_buffers",
    "max_wal_size",
    "min_wal_size",
    "checkpoint_timeout",
    "checkpoint_completion_target",
)
_UNIT_BYTES = {"B": 1, "kB": 1024, "8kB": 8192, "MB": MIB, "16MB": 16 * MIB}
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "min": 60}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of pg_settings: name, setting (in unit), unit, and the SHOW form (current_setting)."""

    name: str
    setting: str
    unit: str | None
    shown: str

    def amount(self) -> float | None:
        """Bytes or seconds, or None for a setting without a unit."""
        if self.unit is None:
            return None
        factor = _UNIT_BYTES.get(self.unit) or _UNIT_SECONDS.get(self.unit)
        return None if factor is None else float(self.setting) * factor


def amount(text: str) -> float:
    """'64MB', '15min', '0.9' as bytes, seconds or a number (the values sized() writes)."""
    match = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*)", text.strip())
    if match is None:
        raise ValueError(text)
    number, unit = float(match.group(1)), match.group(2)
    factors = {"": 1, "kB": 1024, "MB": MIB, "GB": GIB, "TB": 1024 * GIB, "ms": 0.001, "s": 1, "min": 60, "h": 3600}
    if unit not in factors:
        raise ValueError(text)
    return number * factors[unit]


def check(rows: list[Setting], documented: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The reported settings as Postgres shows them, and hints: a durability setting off, or a sized
    setting under half its documented value (a server left at its defaults)."""
    shown = {row.name: row.shown for row in rows}
    hints = [
        f"{row.name} is {row.setting}: an answer would not follow a durable commit"
        for row in rows
        if row.name in DURABILITY_SETTINGS and row.setting == "off"
    ]
    for row in rows:
        value = row.amount()
        if row.name not in documented or row.name == "checkpoint_completion_target" or value is None:
            continue
        try:
            wanted = amount(documented[row.name])
        except ValueError:  # an override Postgres took in a form of its own (e.g. wal_buffers=-1)
            continue
        if value < wanted / 2:
            hints.append(f"{row.name} {shown[row.name]} is under half the documented {documented[row.name]}")
    return shown, hints
