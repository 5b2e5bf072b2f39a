"""The bank check (issue 13, section 8): several clients move points among members and merchants while
the service is SIGKILLed, SIGSTOPped and Postgres restarted; after every round the total is conserved per
asset, no member balance is negative, every acknowledged operation is in the journal exactly once, no id
repeats, every open hold is still capturable by its own merchant, GetBalance equals the journal, and
`reconcile` passes. The checks are in tests/integration/bank.py; `make soak` runs many more rounds."""

from __future__ import annotations

import random

import pytest

from tests.integration.bank import FAULTS, Bank, run_round
from tests.integration.faketime import SKIP_REASON, Clock, faketime_library
from tests.integration.test_faults import DedicatedPostgres

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def restartable_postgres():
    """A Postgres of this module's own: the bank check restarts it."""
    server = DedicatedPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown with a failure, to replay the same choices
    return random.Random(seed)


@pytest.fixture
def bank_on(restartable_postgres, service_factory, rng):
    made: list[Bank] = []

    def make(program: bool) -> Bank:
        bank = Bank(restartable_postgres, service_factory, rng, program=program)
        made.append(bank)
        return bank.start()

    yield make
    for bank in made:
        bank.close()


def _rounds(bank: Bank) -> None:
    """One round of each fault, every check after each."""
    for fault in FAULTS:
        problems = run_round(bank, fault)
        print(f"after {fault}: {bank.summary()}")
        assert problems == [], f"after the {fault} round:\n" + "\n".join(problems[:40])
    assert sum(op.attempts > 0 for op in bank.ops) > 0, "no call was interrupted by any fault"


def test_bank_check_points_under_sigkill_sigstop_and_postgres_restart(bank_on):
    _rounds(bank_on(program=False))


def test_bank_check_with_split_tender_and_vouchers_only_holds(bank_on):
    """The same under a program with dividends, so members hold vouchers and spend them in redeems and
    in split-tender and vouchers-only holds (a vouchers-only hold has no row in `holds`)."""
    bank = bank_on(program=True)
    _rounds(bank)
    # the newest authorization at the crash is a vouchers-only hold: ids after the restart must not repeat it
    hold = bank.vouchers_only_hold_then_sigkill()
    problems = run_round(bank, "sigkill")
    assert problems == [], (
        f"after a SIGKILL following the vouchers-only hold {hold.response.authorization_id}:\n"
        + "\n".join(problems[:40])
    )
    assert any(
        op.method == "Authorize" and op.code == "OK" and op.request.vouchers and not op.request.points
        for op in bank.ops
    ), "no vouchers-only hold was acknowledged"


def test_bank_check_under_clock_steps_forward_and_back_and_a_restart_on_a_stepped_back_clock(
    restartable_postgres, service_factory, rng, tmp_path
):
    """The service's wall clock stepped forward and back by up to 2 h under traffic (libfaketime), and a
    SIGKILL and restart in between: besides every bank check, no transaction or hold is dated before one
    committed earlier."""
    library = faketime_library()
    if library is None:
        pytest.skip(SKIP_REASON)
    bank = Bank(restartable_postgres, service_factory, rng, clock=Clock(tmp_path, library)).start()
    try:
        # ahead, then behind what was dated ahead (also across a restart), then ahead again
        for fault in ("clock-forward", "clock-back", "sigkill", "clock-forward"):
            problems = run_round(bank, fault)
            print(f"after {fault}: {bank.summary()}")
            assert problems == [], f"after the {fault} round:\n" + "\n".join(problems[:40])
    finally:
        bank.close()
