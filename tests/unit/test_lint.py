"""Linters run from the tests, as asyncpg runs its own: ruff (lint-clean and formatted, pyproject.toml
[tool.ruff]; fix with `.venv/bin/ruff check --fix . && .venv/bin/ruff format .`) and mypy, strict on
the domain, the money rules and the state machine (pyproject.toml [tool.mypy]), and stubtest of the
fast path's .pyi."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _ruff() -> str:
    found = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent))
    if found is None:
        pytest.fail("ruff is not installed: it is in the test extra (make test installs it)")
    return found


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    done = subprocess.run([_ruff(), *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


STRICT = [
    "processor/domain.py",
    "processor/postgres_settings.py",  # the embedded Postgres's settings
    "processor/rules.py",
    "processor/state_machine.py",
    "processor/postings.py",
    "processor/machine_parts.py",
    "processor/channel_store.py",
    # member administration (issue 15)
    "processor/member_postings.py",
    "processor/member_store.py",
    "processor/support_limits.py",
    "processor/events.py",  # the change feed
    "processor/rules_kernel.py",
    "processor/idempotency.py",
    "processor/paging.py",  # the admin services' paging
    "processor/batch_log.py",  # the batch log and its projector (issue 14 stage 5)
    "processor/projector.py",
    "processor/projector_process.py",  # --projector process
    "processor/child_process.py",
]


def test_mypy_strict_on_the_domain_the_rules_and_the_state_machine():
    mypy = shutil.which("mypy", path=str(pathlib.Path(sys.executable).parent))
    if mypy is None:
        pytest.fail("mypy is not installed: it is in the test extra (make test installs it)")
    done = subprocess.run([mypy, *STRICT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_stubtest_of_the_fast_path():
    """fastpath/_core.pyi says what the compiled module has (its Cython artefacts allowlisted, with why)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastpath._core", "--allowlist", "fastpath/stubtest_allowlist.txt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
