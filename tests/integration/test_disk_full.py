"""Disk full on the Postgres data directory (issue 13, section 8): the data directory is on a small tmpfs
the test fills with a file (pg_wal is on another filesystem, as --waldir puts it: see fill()). While it is full Postgres refuses to extend its files (SQLSTATE
53100); the service answers UNAVAILABLE ("not applied; retry with the same idempotency key"), never
INTERNAL, keeps running (health SERVING: balances still answer) and posts nothing partially; once the
file is removed it commits again by itself, and every check of the bank check (tests/integration/bank.py)
holds: every acknowledged operation once, conservation, no negative balance, GetBalance = journal,
reconcile.

Needs root (to mount a tmpfs); skipped, saying why, where it cannot mount one."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import pathlib
import shutil
import subprocess
import tempfile

import asyncpg
import pytest

from tests.integration.bank import Bank, run_round
from tests.integration.test_faults import DedicatedPostgres

pytestmark = pytest.mark.timeout(180)

FILESYSTEM_BYTES = 96 * 1024 * 1024  # initdb takes ~22 MB of it (its WAL is elsewhere), the test database ~8 MB
FILL_CHUNK_BYTES = 1024 * 1024


class SmallDiskPostgres(DedicatedPostgres):
    """DedicatedPostgres whose directory (data directory, pg_wal and log) is a tmpfs of
    FILESYSTEM_BYTES, with fill() and free() for the disk-full fault."""

    def __init__(self):
        super().__init__()
        self.filler = self.directory / "filler"
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={FILESYSTEM_BYTES},mode=0700", "tmpfs", str(self.directory)],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise OSError(errno.EPERM, f"cannot mount a tmpfs for the data directory: {mounted.stderr.strip()}")
        if self.user is not None:
            shutil.chown(self.directory, self.user, self.user)
        # pg_wal on the machine's disk, not on the tmpfs (initdb --waldir, a symlink as operators make it)
        self.wal = pathlib.Path(tempfile.mkdtemp(prefix="points-disk-full-wal-"))
        if self.user is not None:
            shutil.chown(self.wal, self.user, self.user)
        self.initdb_options = ("--waldir", str(self.wal / "pg_wal"))

    def fill(self) -> None:
        """Writes a file until the filesystem has no byte left: what fills up is the relations (ERROR
        53100, the transaction rolls back). The WAL is on another filesystem: running out of room for a
        new WAL segment is a PANIC in Postgres (it then needs space and a restart; not tested here), and
        with pg_wal on the tmpfs it came now and then anyway (the WAL writer creating the next segment
        ~50 ms into the fill, in 2 of 5 runs once the projector ran in a process of its own), although a
        checkpoint and a switch to a fresh segment came first (as they still do)."""
        asyncio.run(_switch_wal(self.url))
        chunk = bytes(FILL_CHUNK_BYTES)
        with open(self.filler, "wb", buffering=0) as file:
            while True:
                try:
                    file.write(chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
        with open(self.filler, "ab", buffering=0) as file:  # the last partial chunk's room too
            for _ in range(FILL_CHUNK_BYTES // 512):
                try:
                    file.write(bytes(512))
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
        assert shutil.disk_usage(self.directory).free < 8192, shutil.disk_usage(self.directory)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.release()

    def release(self) -> None:
        """Unmounts the tmpfs and removes its mount point and the WAL's directory."""
        subprocess.run(["umount", "-l", str(self.directory)], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        shutil.rmtree(self.wal, ignore_errors=True)


async def _switch_wal(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CHECKPOINT")
        await connection.execute("SELECT pg_switch_wal()")
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def small_disk_postgres():
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip(
            "disk full needs a small filesystem for Postgres's data directory: mounting a tmpfs needs "
            "root and mount(8), and this run has neither"
        )
    try:
        server = SmallDiskPostgres()
    except OSError as error:
        pytest.skip(f"disk full needs a small filesystem for Postgres's data directory: {error.strerror}")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown with a failure, to replay the same choices
    return random.Random(seed)


def test_disk_full_answers_unavailable_posts_nothing_partially_and_recovers_when_space_returns(
    small_disk_postgres, service_factory, rng
):
    bank = Bank(small_disk_postgres, service_factory, rng).start()
    try:
        problems = run_round(bank, "disk-full")
        print(f"while the disk was full: {bank.disk_full_answers}; {bank.summary()}")
        assert problems == [], "\n".join(problems[:40])
        assert bank.disk_full_answers.get("UNAVAILABLE", 0) > 0
        assert bank.disk_full_health == "SERVING"  # reads still answer; each write is refused UNAVAILABLE
        # the service logged the disk-full refusal it answered UNAVAILABLE for (SQLSTATE 53100)
        assert any("No space left on device" in line for line in bank.service.log_lines)
    finally:
        bank.close()
