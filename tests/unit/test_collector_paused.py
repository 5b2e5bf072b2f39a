"""The cyclic collector is paused while a batch is applied (state_machine.apply) and while SubmitBatch
builds its operations and results (servicer._collector_paused): afterwards it is collecting exactly when
it was before, also when the apply fails."""

from __future__ import annotations

import gc

import pytest

from processor import servicer
from processor.config import Settings
from processor.domain import InvariantViolation, Method, Operation
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import MerchantRow

import fastpath

pytestmark = pytest.mark.timeout(30)

SHOP = MerchantRow("shop", 1, 1_000, "active", issued_account_id=11, redeemed_account_id=12, fees_account_id=13)


def _machine() -> LedgerStateMachine:
    machine = LedgerStateMachine(Settings())
    machine.ledger = fastpath.Ledger(100, 100, 100)
    machine.merchants = Merchants([SHOP])
    machine.ids = IdAllocator(1, 1)
    machine.account_ids = list(range(1_000, 1_100))
    return machine


def _earn(key: str) -> Operation:
    fields = {"member_id": "m-1", "points": 10, "purchase_amount": 100}
    return Operation(Method.EARN, "shop", 1, key, dict(fields), **fields)


@pytest.fixture
def collecting():
    was = gc.isenabled()
    yield
    gc.enable() if was else gc.disable()


@pytest.mark.parametrize("enabled", [True, False])
def test_apply_leaves_the_collector_as_it_found_it(collecting, enabled):
    gc.enable() if enabled else gc.disable()
    machine = _machine()
    seen = []
    apply_batch = machine._apply_batch

    def spy(*args):
        seen.append(gc.isenabled())
        return apply_batch(*args)

    machine._apply_batch = spy  # type: ignore[method-assign]
    outcomes, write = machine.apply([_earn("a")], {}, 1_800_000_000_000_000)
    assert seen == [False] and gc.isenabled() is enabled
    assert outcomes[0].fields["points"] == 10 and write.transactions


def test_a_failed_apply_still_gives_the_collector_back(collecting):
    gc.enable()
    machine = _machine()

    def broken(*args):
        raise InvariantViolation("a bug")

    machine._apply_batch = broken  # type: ignore[method-assign]
    with pytest.raises(InvariantViolation):
        machine.apply([_earn("a")], {}, 1_800_000_000_000_000)
    assert gc.isenabled()


def test_paused_says_whether_it_was_collecting(collecting):
    gc.enable()
    assert servicer._collector_paused() is True and not gc.isenabled()
    assert servicer._collector_paused() is False and not gc.isenabled()  # nested: the outer one re-enables
