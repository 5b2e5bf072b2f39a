"""The service's wall clock under libfaketime, for the clock-step tests (test_clock.py) and the bank
check's clock-step rounds (bank.py): LD_PRELOAD=libfaketime with a control file re-read at every clock
read, so the test steps the clock of a running service; its monotonic clock is left alone (asyncio and
gRPC deadlines run on it), and so is Postgres's clock."""

from __future__ import annotations

import glob
import os
import pathlib

FAKETIME_LIBRARIES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)
SKIP_REASON = (
    "libfaketime is not installed (Debian package faketime; `make test` installs it with apt-get where "
    "apt-get can reach a mirror): the clock-step tests need it"
)


def faketime_library() -> str | None:
    """The path of libfaketime.so.1, if it is installed."""
    for pattern in FAKETIME_LIBRARIES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


class Clock:
    """The service's wall clock, as an offset from the real one in a libfaketime control file."""

    def __init__(self, directory: pathlib.Path, library: str):
        self.file = directory / "faketime"
        self.library = library
        self.set(0)

    def set(self, offset_seconds: int) -> None:
        """From now on the service's wall clock reads real time + offset_seconds."""
        staging = self.file.with_suffix(".new")
        staging.write_text(f"{offset_seconds:+d}\n")
        os.replace(staging, self.file)  # never a half-written file for a clock read

    @property
    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": self.library,
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
