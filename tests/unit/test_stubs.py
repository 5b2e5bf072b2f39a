"""Each compiled module's .pyi says what the module has (mypy.stubtest, one run for all of them; the
Cython artefacts each allowlists say why). fastpath/_core's own check is in test_lint.py."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# compiled module -> its allowlist (None: built without pickling or a doctest table, nothing to allow)
STUBBED = {
    "fastpath.records": "fastpath/stubtest_allowlist_records.txt",
    "fastpath.lot_chain": "fastpath/stubtest_allowlist_lot_chain.txt",
    "fastpath.idempotency_table": None,
    "fastpath.copy_binary": None,
    "fastpath.intake": "fastpath/stubtest_allowlist_intake.txt",
    "fastpath.kernel_rows": "fastpath/stubtest_allowlist_kernel_rows.txt",
    "fastpath.balances": "fastpath/stubtest_allowlist_balances.txt",
    "fastpath.log_columns": "fastpath/stubtest_allowlist_log_columns.txt",
}


def test_every_compiled_module_is_checked():
    built = {path.name.split(".")[0] for path in (ROOT / "fastpath").glob("*.pyx")}
    assert {module.split(".")[1] for module in STUBBED} == built - {"_core"}


def test_stubtest_of_the_compiled_modules():
    for module in STUBBED:
        try:
            importlib.import_module(module)
        except ImportError:
            pytest.skip(f"{module} is not built")
    allowlists = [argument for path in STUBBED.values() if path for argument in ("--allowlist", path)]
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", *STUBBED, *allowlists],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
