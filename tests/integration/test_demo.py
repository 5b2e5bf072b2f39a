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


def test_the_readmes_first_earn_and_redeem_work_as_printed(create_database, service_factory):
    """README "A first earn and redeem": merchant add, key create, then `call` Earn, Redeem, GetBalance
    (here with the test database's URL and the service's address instead of the defaults)."""
    import json

    url = create_database()
    service = service_factory(url)
    assert (
        cli("merchant", "add", "--merchant-id", "cafe", "--give-back-bps", "1000", "--database-url", url).returncode
        == 0
    )
    created = cli("key", "create", "--merchant-id", "cafe", "--database-url", url)
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    assert key.startswith("pk_")

    def call(method: str, request: dict) -> dict:
        done = cli("call", method, json.dumps(request), "--key", key, "--target", service.target)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    earned = call(
        "Earn", {"merchant_id": "cafe", "member_id": "ann", "purchase_amount": 2500, "idempotency_key": "order-1"}
    )
    assert (earned["points"], earned["balance"]) == ("250", "250")  # int64 fields are JSON strings
    again = call(
        "Earn", {"merchant_id": "cafe", "member_id": "ann", "purchase_amount": 2500, "idempotency_key": "order-1"}
    )
    assert again == earned
    redeemed = call("Redeem", {"merchant_id": "cafe", "member_id": "ann", "points": 100, "idempotency_key": "order-2"})
    assert redeemed["balance"] == "150"
    assert call("GetBalance", {"member_id": "ann"})["available"] == "150"
    refused = cli(
        "call",
        "Redeem",
        json.dumps({"merchant_id": "cafe", "member_id": "ann", "points": 10_000, "idempotency_key": "order-3"}),
        "--key",
        key,
        "--target",
        service.target,
    )
    assert refused.returncode == 1 and refused.stderr.startswith("error: FAILED_PRECONDITION")
    unknown = cli("call", "Stream", "{}", "--key", key, "--target", service.target)
    assert unknown.returncode == 2 and "not a unary PointsService method" in unknown.stderr
