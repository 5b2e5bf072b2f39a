"""What the compiled apply hands the cyclic collector: nothing it could ever free. A batch's transaction
and entry rows built in C (Ledger.plain_rows, earn_redeem_rows), its outcomes and its idempotency records
are untracked when they are made, so the young pass after the apply does not walk them and generation 1
does not walk them again until the batch is written (loadtest/gc_survivors.py: 10.7 tracked objects an
operation after an apply with the program, 4.1 surviving a young pass; now 4.3 and 2.0). The twin has no
Python call to untrack with (there a young pass untracks the rows, whenever one runs): this holds the
compiled module, with POINTS_FASTPATH=python too; the values are the twin's (the differential tests of
test_first_pass.py and test_idempotency_records.py)."""

from __future__ import annotations

import gc

import pytest

import fastpath
import fastpath._core
from loadtest import bench_state_machine as bench


@pytest.mark.parametrize("program", [True, False], ids=["program", "plain"])
def test_an_applied_batch_leaves_its_rows_outcomes_and_records_untracked(program, monkeypatch):
    monkeypatch.setattr(fastpath, "Ledger", fastpath._core.Ledger)
    machine = bench.machine(program, 2_000, 20)
    for i, batch in enumerate(bench.batches(3, 2_000, 20, seed=3)):
        # the collector held off while the batch is applied and checked, as the committer holds it while
        # it applies: the first pass after would untrack rows of atomic items itself
        gc.disable()
        try:
            outcomes, write = machine.apply(batch, {}, bench.NOW_US + i * 1_000_000)
            tracked = {
                "transactions": [gc.is_tracked(row) for row in write.transactions],
                "entries": [gc.is_tracked(row) for row in write.entries],
                "outcomes": [gc.is_tracked(outcome) for outcome in outcomes],
                "records": [gc.is_tracked(record) for record in write.idempotency],
            }
        finally:
            gc.enable()
        assert all(tracked.values())  # something of each
        assert {name: any(flags) for name, flags in tracked.items()} == dict.fromkeys(tracked, False)
        rows = (list(write.transactions), list(write.entries), [o.fields for o in outcomes])
        gc.collect()  # nothing they hold was freed under them
        assert rows == (write.transactions, write.entries, [o.fields for o in outcomes])
        assert all(type(t[0]) is int and type(t[2]) is str for t in write.transactions)
        machine.commit()
