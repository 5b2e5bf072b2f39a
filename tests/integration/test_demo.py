"""The README's demo (`make demo`): it starts the service, earns, authorizes, captures and reads a balance
with a key of its own (it answered UNAUTHENTICATED once keys were required), then stops the service."""
from __future__ import annotations

from tests.harness import fetch
from tests.integration.helpers import cli


def test_the_demo_runs_against_a_service_it_starts(create_database):
    url = create_database()
    done = cli("demo", "--serve", "--database-url", url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "earn: purchase 100.00 at demo-cafe (1000 bps) -> +1000 point-units, balance 1000" in done.stdout
    assert "capture: 300 captured, 200 released" in done.stdout
    assert "balance of demo-member: posted 700, held 0, available 700 point-units" in done.stdout
    keys = fetch(url, "SELECT kind, merchant_ids, description FROM api_keys")
    assert [(k["kind"], k["merchant_ids"], k["description"]) for k in keys] == [("merchant", ["demo-cafe"], "demo run")]
