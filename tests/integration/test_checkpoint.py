"""Balance checkpoints: accounts.balance is folded from the journal every --balance-checkpoint-seconds,
the account_balances view (checkpoint + journal tail) is always current, a restart after SIGKILL
rebuilds balances from the checkpoint plus the tail, and a graceful stop leaves no tail."""

from __future__ import annotations

import time

import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import balance, earn, unique

pytestmark = pytest.mark.timeout(120)


def checkpoint(url: str) -> int:
    return fetch(url, "SELECT through_transaction_id FROM balance_checkpoint")[0]["through_transaction_id"]


def newest_transaction(url: str) -> int:
    return fetch(url, "SELECT coalesce(max(transaction_id), 0) AS t FROM transactions")[0]["t"]


def checkpoint_reaches(url: str, transaction_id: int, seconds: float = 20.0) -> None:
    """Waits until a checkpoint includes transaction_id (checkpoints are written beside the batches)."""
    deadline = time.monotonic() + seconds
    while checkpoint(url) < transaction_id:
        assert time.monotonic() < deadline, f"no checkpoint reached transaction {transaction_id} in {seconds} s"
        time.sleep(0.05)


def balances(url: str, owner: str) -> dict[str, tuple[int, int]]:
    """kind -> (current balance from the view, checkpointed accounts.balance)."""
    return {
        r["kind"]: (r["balance"], r["checkpoint_balance"])
        for r in fetch(url, "SELECT kind, balance, checkpoint_balance FROM account_balances WHERE owner_id = $1", owner)
    }


def redeem(stub, merchant: str, member: str, points: int):
    return stub.Redeem(
        pb.RedeemRequest(merchant_id=merchant, member_id=member, points=points, idempotency_key=unique("k")), timeout=30
    )


def test_tail_after_the_checkpoint_is_replayed_after_sigkill(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    # no checkpoint while the test runs: everything after start-up is tail
    service = service_factory(url, "--balance-checkpoint-seconds", "3600")
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        start = checkpoint(url)
        assert earn(stub, merchant, member, 50_000).balance == 5_000
        redeem(stub, merchant, member, 1_200)
        assert balances(url, member) == {"member": (3_800, 0)}
        assert balances(url, merchant)["merchant_issued"] == (-5_000, 0)
        assert balances(url, merchant)["merchant_redeemed"] == (1_200, 0)
        assert checkpoint(url) == start
    service.kill()
    assert ledger_discrepancies(url) == []

    restarted = service_factory(url, "--balance-checkpoint-seconds", "3600")
    with restarted.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        assert balance(stub, member) == (3_800, 0, 3_800)
        # the replayed tail is still pending: the next checkpoint must include it exactly once
        redeem(stub, merchant, member, 800)
        assert balances(url, member) == {"member": (3_000, 0)}
    assert restarted.terminate() == 0
    # a graceful stop folds the tail: the checkpoint is the newest transaction
    assert checkpoint(url) == newest_transaction(url)
    assert balances(url, member) == {"member": (3_000, 3_000)}
    assert balances(url, merchant)["merchant_redeemed"] == (2_000, 2_000)
    assert ledger_discrepancies(url) == []


def test_checkpoint_after_every_batch_folds_the_journal_and_never_twice(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000, fee_redeemed_bps=250)
    service = service_factory(url, "--balance-checkpoint-seconds", "0")
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        earn(stub, merchant, member, 50_000)
        checkpoint_reaches(url, newest_transaction(url))
        assert balances(url, member) == {"member": (5_000, 5_000)}
        for _ in range(5):
            redeem(stub, merchant, member, 1_000)
        checkpoint_reaches(url, newest_transaction(url))
        # each redeem folded exactly once, whichever checkpoints carried them
        assert balances(url, member) == {"member": (0, 0)}
        assert balances(url, merchant)["merchant_fees"] == (-125, -125)
        assert balances(url, merchant)["merchant_redeemed"] == (5_000, 5_000)
        assert ledger_discrepancies(url) == []


def test_checkpoint_when_enough_accounts_changed(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    service = service_factory(url, "--balance-checkpoint-seconds", "3600", "--balance-checkpoint-accounts-max", "3")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        before = checkpoint(url)
        first = unique("mem")
        earn(stub, merchant, first, 10_000)  # 2 accounts changed: below the bound, no checkpoint
        time.sleep(0.5)
        assert checkpoint(url) == before
        assert balances(url, first) == {"member": (1_000, 0)}
        earn(stub, merchant, unique("mem"), 10_000)  # the 3rd account: a checkpoint follows
        checkpoint_reaches(url, newest_transaction(url))
        assert balances(url, first) == {"member": (1_000, 1_000)}
        assert ledger_discrepancies(url) == []
