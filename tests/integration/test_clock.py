"""Clock steps (issue 13, section 8): the service runs under libfaketime (LD_PRELOAD, a FAKETIME control
file re-read at every clock read) and the test steps its wall clock forward and back while it runs; its
monotonic clock and Postgres's clock are left alone. What docs/GUARANTEES.md "Clock steps" documents:

- holds expire when the service's clock passes their expiry (a forward step expires them at once), and
  so do points (lots) under a program with an expiry period, once, to breakage;
- the pipeline never dates a batch before an earlier one: after a backward step the journal's
  created_at does not go back, holds are dated (and expire) from that floor, and a hold that expired
  stays expired;
- a settlement cut whose cut_off is after the service's clock (the 'future' after a backward step) is
  refused INVALID_ARGUMENT; one at or before it is accepted;
- the floor holds across a restart: a service started with its clock stepped back dates nothing before
  the newest transaction in the journal.

libfaketime is the Debian package `faketime` (`make test` installs it with apt-get where it can); the
tests are skipped, saying so, where it is missing."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant, fetch, ledger_discrepancies
from tests.integration.faketime import SKIP_REASON, Clock, faketime_library
from tests.integration.helpers import error_of, unique

pytestmark = pytest.mark.timeout(120)

HOUR_SECONDS = 3600


@pytest.fixture
def clock(tmp_path) -> Clock:
    library = faketime_library()
    if library is None:
        pytest.skip(SKIP_REASON)
    return Clock(tmp_path, library)


def _timestamp(at: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _created_at(url: str, transaction_id: str) -> dt.datetime:
    return fetch(url, "SELECT created_at FROM transactions WHERE transaction_id = $1", int(transaction_id[4:]))[0][
        "created_at"
    ]


def _earn(stub, merchant: str, member: str) -> pb.EarnResponse:
    return stub.Earn(
        pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=10_000, idempotency_key=unique("k")),
        timeout=30,
    )


def _journal_times_go_back(url: str) -> list[str]:
    """Transactions dated before a transaction committed earlier (a smaller id)."""
    rows = fetch(url, "SELECT transaction_id, created_at FROM transactions ORDER BY transaction_id")
    return [
        f"txn_{b['transaction_id']} dated {b['created_at'].isoformat()} before txn_{a['transaction_id']} "
        f"({a['created_at'].isoformat()})"
        for a, b in zip(rows, rows[1:])
        if b["created_at"] < a["created_at"]
    ]


def test_clock_steps_forward_and_back_expire_holds_keep_the_journal_in_order_and_refuse_future_cuts(
    create_database, service_factory, clock
):
    url = create_database()
    merchant, member = unique("m"), unique("mem")
    add_merchant(url, merchant, 1000)
    service = service_factory(url, env=clock.env)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        clearing = admin_pb2_grpc.ClearingStub(channel)
        _earn(stub, merchant, member)  # 1,000 point-units
        short = stub.Authorize(
            pb.AuthorizeRequest(
                merchant_id=merchant,
                member_id=member,
                points=100,
                hold_ttl_seconds=HOUR_SECONDS,
                idempotency_key=unique("k"),
            ),
            timeout=30,
        )
        long = stub.Authorize(
            pb.AuthorizeRequest(
                merchant_id=merchant,
                member_id=member,
                points=200,
                hold_ttl_seconds=3 * 24 * HOUR_SECONDS,
                idempotency_key=unique("k"),
            ),
            timeout=30,
        )
        assert stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).held == 300

        # forward 2 h: the 1 h hold has expired, the 3-day hold has not
        clock.set(2 * HOUR_SECONDS)
        expired = error_of(
            lambda: stub.Capture(
                pb.CaptureRequest(
                    merchant_id=merchant, authorization_id=short.authorization_id, idempotency_key=unique("k")
                ),
                timeout=30,
            )
        )
        assert expired.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in expired.details(), (
            expired.details()
        )
        assert stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).held == 200
        ahead = _earn(stub, merchant, member)
        ahead_at = _created_at(url, ahead.transaction_id)
        assert ahead_at > dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1.5)

        # back 3 h (to 1 h behind the real clock): nothing is dated before what was dated ahead
        clock.set(-HOUR_SECONDS)
        behind = _earn(stub, merchant, member)
        assert _created_at(url, behind.transaction_id) >= ahead_at
        # a hold authorized now is dated from that floor, and so is its expiry
        floored = stub.Authorize(
            pb.AuthorizeRequest(
                merchant_id=merchant, member_id=member, points=50, hold_ttl_seconds=600, idempotency_key=unique("k")
            ),
            timeout=30,
        )
        assert floored.expires_at.ToDatetime(tzinfo=dt.timezone.utc) >= ahead_at + dt.timedelta(seconds=600)
        # the expired hold stays expired: the step back does not bring it back
        still = error_of(
            lambda: stub.Capture(
                pb.CaptureRequest(
                    merchant_id=merchant, authorization_id=short.authorization_id, idempotency_key=unique("k")
                ),
                timeout=30,
            )
        )
        assert still.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in still.details(), still.details()
        assert stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).held == 250

        # a cut at the real time is in the service's future now: refused, and nothing is cut
        real_now = dt.datetime.now(dt.timezone.utc)
        future = error_of(
            lambda: clearing.CloseSettlementPeriod(
                admin_pb2.CloseSettlementPeriodRequest(cut_off=_timestamp(real_now)), timeout=30
            )
        )
        assert future.code() == grpc.StatusCode.INVALID_ARGUMENT and "future" in future.details(), future.details()
        assert fetch(url, "SELECT count(*) AS n FROM settlement_periods")[0]["n"] == 0
        # a cut at or before the service's clock is accepted
        cut_off = real_now - dt.timedelta(hours=2)
        period = clearing.CloseSettlementPeriod(
            admin_pb2.CloseSettlementPeriodRequest(cut_off=_timestamp(cut_off)), timeout=30
        )
        assert period.cut_off.ToDatetime(tzinfo=dt.timezone.utc) == cut_off

        # the 3-day hold is still capturable by its merchant, after both steps
        captured = stub.Capture(
            pb.CaptureRequest(
                merchant_id=merchant, authorization_id=long.authorization_id, idempotency_key=unique("k")
            ),
            timeout=30,
        )
        assert captured.points == 200
        assert _created_at(url, captured.transaction_id) >= ahead_at

    assert _journal_times_go_back(url) == []
    assert ledger_discrepancies(url) == []


def test_a_service_restarted_with_its_clock_stepped_back_dates_nothing_before_the_journal(
    create_database, service_factory, clock
):
    url = create_database()
    merchant, member = unique("m"), unique("mem")
    add_merchant(url, merchant, 1000)
    clock.set(2 * HOUR_SECONDS)
    service = service_factory(url, env=clock.env)
    with service.channel() as channel:
        ahead = _earn(points_pb2_grpc.PointsServiceStub(channel), merchant, member)
    ahead_at = _created_at(url, ahead.transaction_id)
    service.kill()

    clock.set(-HOUR_SECONDS)  # the machine's clock was corrected (3 h back) while the service was down
    restarted = service_factory(url, env=clock.env)
    with restarted.channel() as channel:
        behind = _earn(points_pb2_grpc.PointsServiceStub(channel), merchant, member)
    assert _created_at(url, behind.transaction_id) >= ahead_at, (
        "a restarted service dated a transaction before one already in the journal"
    )
    assert any("the clock is behind the newest batch" in line for line in restarted.log_lines)
    assert _journal_times_go_back(url) == []
    assert ledger_discrepancies(url) == []


DAY_SECONDS = 24 * HOUR_SECONDS
PROGRAM_LEAD_SECONDS = 1.3  # a stored program version applies about 1 s after it is stored


async def _add_expiry_program(url: str, expiry_period_seconds: int) -> None:
    from processor.store import Store

    store = await Store.open(url, 2)
    try:
        await store.migrate()
        await store.add_program_version(
            "alliance", None, {"expiry_period_us": expiry_period_seconds * 1_000_000}, "tests"
        )
    finally:
        await store.close()


def test_a_forward_step_past_points_expiry_expires_them_once_and_a_step_back_does_not_restore_them(
    create_database, service_factory, clock
):
    """Points expire in lots `expiry_period_us` after they were credited, by the service's clock: a step
    past it posts the EXPIRY (to breakage) in the next batch; a step back leaves it posted."""
    url = create_database()
    merchant, member, other = unique("m"), unique("mem"), unique("mem")
    add_merchant(url, merchant, 1000)
    asyncio.run(_add_expiry_program(url, DAY_SECONDS))
    service = service_factory(url, env=clock.env)
    time.sleep(PROGRAM_LEAD_SECONDS)  # the version is in force from here on
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        earned = _earn(stub, merchant, member)
        assert earned.points == 1_000
        clock.set(DAY_SECONDS + HOUR_SECONDS)
        _earn(stub, merchant, other)  # a batch: its expiry job posts what is due
        assert stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == 0
        expiries = fetch(url, "SELECT amount, created_at FROM transactions WHERE kind = 6 AND member_id = $1", member)
        assert [r["amount"] for r in expiries] == [1_000]
        assert expiries[0]["created_at"] >= _created_at(url, earned.transaction_id) + dt.timedelta(days=1)

        clock.set(-HOUR_SECONDS)  # back behind the credit itself: nothing comes back, nothing expires twice
        _earn(stub, merchant, other)
        assert stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == 0
        assert (
            fetch(url, "SELECT count(*) AS n FROM transactions WHERE kind = 6 AND member_id = $1", member)[0]["n"] == 1
        )
    assert _journal_times_go_back(url) == []
    assert ledger_discrepancies(url) == []
