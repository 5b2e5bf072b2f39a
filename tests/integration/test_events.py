"""The change feed (EventsService.WatchEvents), against the real service and Postgres: a reader resumed
after a SIGKILL of the service sees every committed transaction exactly once and in commit order, under
pipelined concurrent traffic; the member's balance after each transaction is the journal's; a merchant
key sees only its own merchant's transactions; a slow reader is cut off RESOURCE_EXHAUSTED with a cursor
it resumes from, losing and repeating nothing; a bad cursor is INVALID_ARGUMENT; member events (level
changes, frozen, merged, points expiring) are in the same ordered log."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from points.v1 import events_pb2, events_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from processor import events
from tests.harness import add_merchant, connect, create_key, fetch, ledger_discrepancies, wait_projected_async
from tests.integration.helpers import add_program_version, credential, earn, error_of, unique, wait_until

pytestmark = pytest.mark.timeout(240)


def committed_transaction_ids(url: str) -> list[int]:
    return [r["transaction_id"] for r in fetch(url, "SELECT transaction_id FROM transactions ORDER BY transaction_id")]


def transaction_number(event: events_pb2.Event) -> int:
    return int(event.transaction.transaction_id.removeprefix("txn_"))


def read_until(stub, key: str, cursor: str, until, seconds: float = 60, **request) -> list[events_pb2.Event]:
    """Events from `cursor` until `until(events)` is true (then cancels the stream)."""
    received: list[events_pb2.Event] = []
    call = stub.WatchEvents(
        events_pb2.WatchEventsRequest(cursor=cursor, **request), metadata=credential(key), timeout=seconds
    )
    try:
        for response in call:
            assert response.events, "a response carries at least one event"
            for event in response.events:
                received.append(event)
                if until(received):
                    return received
    finally:
        call.cancel()
    return received


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "the refusal carries google.rpc details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the details")


# --- exactly once, in order, across a SIGKILL ---


def test_watch_resumed_after_sigkill_sees_every_committed_transaction_once_in_order(create_database, service_factory):
    """A reader follows the feed live while six clients earn and redeem (the pipeline overlaps their
    batches), the service is SIGKILLed mid-traffic and restarted, and the reader resumes from the last
    cursor it received. Had a transaction committed at a position the reader had already passed (a
    gap), it would be missing from what the reader saw."""
    url = create_database()
    merchants = [unique("m"), unique("m")]
    for merchant in merchants:
        add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    service = service_factory(url)
    acknowledged: set[str] = set()
    stop = threading.Event()
    target = [service.target]
    seen: list[events_pb2.Event] = []
    last_committed: list[int] = []  # set once traffic has stopped: the reader reads up to it
    resumes = [0]

    def traffic(worker: int) -> None:
        member = f"mem-{worker}-{unique('x')}"
        n = 0
        while not stop.is_set():
            n += 1
            channel = grpc.insecure_channel(target[0])
            try:
                stub = points_pb2_grpc.PointsServiceStub(grpc.intercept_channel(channel, _credentials_for(url)))
                response = stub.Earn(
                    pb.EarnRequest(
                        merchant_id=merchants[n % 2],
                        member_id=member,
                        purchase_amount=1000 + n,
                        idempotency_key=f"{member}-{n}",
                    ),
                    timeout=5,
                )
                acknowledged.add(response.transaction_id)
                if n % 3 == 0:
                    redeemed = stub.Redeem(
                        pb.RedeemRequest(
                            merchant_id=merchants[0], member_id=member, points=50, idempotency_key=f"{member}-r{n}"
                        ),
                        timeout=5,
                    )
                    acknowledged.add(redeemed.transaction_id)
            except grpc.RpcError:
                time.sleep(0.05)  # the service is being killed or restarting
            finally:
                channel.close()

    def reader() -> None:
        cursor = ""
        while not (last_committed and seen and transaction_number(seen[-1]) >= last_committed[0]):
            channel = grpc.insecure_channel(target[0])
            call = events_pb2_grpc.EventsServiceStub(channel).WatchEvents(
                events_pb2.WatchEventsRequest(cursor=cursor), metadata=credential(operator), timeout=2
            )
            try:
                for response in call:
                    seen.extend(response.events)
                    cursor = response.events[-1].cursor
                    if last_committed and transaction_number(seen[-1]) >= last_committed[0]:
                        break
            except grpc.RpcError:
                resumes[0] += 1  # killed, restarting, or the 2 s deadline: resume from the last cursor
                time.sleep(0.02)
            finally:
                call.cancel()
                channel.close()

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        workers = [pool.submit(traffic, i) for i in range(6)]
        following = pool.submit(reader)
        try:
            wait_until(lambda: len(seen) >= 200, "the reader follows the traffic", 60)
            service.kill()  # SIGKILL in the middle of traffic
            read_before_kill = len(seen)
            restarted = service_factory(url)
            target[0] = restarted.target
            wait_until(lambda: len(acknowledged) >= read_before_kill + 300, "traffic flows again after the restart", 90)
        finally:
            stop.set()
        for worker in workers:
            worker.result()
        committed = committed_transaction_ids(url)
        last_committed.append(committed[-1])
        following.result(timeout=60)
    assert resumes[0] >= 1
    numbers = [transaction_number(e) for e in seen]
    assert numbers == committed, "every committed transaction exactly once, in commit order"
    assert {f"txn_{t}" for t in numbers} >= acknowledged, "every acknowledged transaction is in the feed"
    cursors = [e.cursor for e in seen]
    assert len(set(cursors)) == len(cursors)
    balances = {
        r["transaction_id"]: r["member_balance_after"]
        for r in fetch(url, "SELECT transaction_id, member_balance_after FROM transactions")
    }
    for event in seen:
        assert event.transaction.HasField("member_balance_after_point_units")
        assert event.transaction.member_balance_after_point_units == balances[transaction_number(event)]
    assert ledger_discrepancies(url) == []  # includes: each recorded balance after equals the journal's


def _credentials_for(url: str):
    from tests.harness import Credentials

    return Credentials(url)


# --- what a key may see ---


def test_merchant_key_sees_only_its_own_merchants_transactions(create_database, service_factory):
    url = create_database()
    own, other = unique("m"), unique("m")
    own_key = add_merchant(url, own, 1000)
    add_merchant(url, other, 1000)
    operator = create_key(url, "operator")
    service = service_factory(url)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for i in range(6):
            earn(stub, own if i % 2 else other, unique("mem"), 1000)
    with service.bare_channel() as channel:
        feed = events_pb2_grpc.EventsServiceStub(channel)
        mine = read_until(feed, own_key, "", lambda got: len(got) == 3)
        everything = read_until(feed, operator, "", lambda got: len(got) == 6)
        assert {e.transaction.merchant_id for e in mine} == {own}
        gateway = create_key(url, "gateway", [own, other])  # a gateway key: the transactions of its merchants
        assert [e.event_id for e in read_until(feed, gateway, "", lambda got: len(got) == 6)] == [
            e.event_id for e in everything
        ]
        assert [e.event_id for e in mine] == [e.event_id for e in everything if e.transaction.merchant_id == own]
        refused = error_of(
            lambda: read_until(feed, own_key, "", lambda got: True, filter=events_pb2.EventFilter(merchant_ids=[other]))
        )
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert other in refused.details()
        # a merchant key gets no member events even when it asks for them
        event_types = [events_pb2.EVENT_TYPE_MEMBER_FROZEN]
        frozen = _record(url, unique("mem"), events.FROZEN, {"reason": "stolen card"})
        assert frozen.member_event_id > 0
        only_transactions = read_until(
            feed, own_key, "", lambda got: len(got) == 3, filter=events_pb2.EventFilter(types=event_types)
        )
        assert {e.type for e in only_transactions} == {events_pb2.EVENT_TYPE_TRANSACTION}


# --- a slow reader ---


def test_slow_reader_gets_resource_exhausted_with_a_cursor_it_resumes_from(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    service = service_factory(
        url, "--events-stream-buffer-events-max", "20", "--events-stream-stall-seconds-max", "0.5"
    )
    total = 3000
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        _earn_many(stub, merchant, total)
    committed = committed_transaction_ids(url)
    assert len(committed) == total
    # a small receive window: the transport holds few events for a reader that does not read
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    received: list[events_pb2.Event] = []
    with grpc.insecure_channel(service.target, options=options) as channel:
        feed = events_pb2_grpc.EventsServiceStub(channel)
        call = feed.WatchEvents(events_pb2.WatchEventsRequest(), metadata=credential(operator), timeout=60)
        first = next(call)  # the stream is open; now the reader stops reading
        received.extend(first.events)
        wait_until(lambda: _cut_streams(service) >= 1, "the server cuts the stalled stream", 30)
        with pytest.raises(grpc.RpcError) as raised:
            for response in call:
                received.extend(response.events)
        error = raised.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert info.reason == "EVENTS_READER_TOO_SLOW"
    assert info.metadata["cursor"] == received[-1].cursor, "the cursor is that of the last event received"
    assert received[-1].cursor in error.details()
    assert len(received) < total
    with service.bare_channel() as channel:
        rest = read_until(
            events_pb2_grpc.EventsServiceStub(channel),
            operator,
            info.metadata["cursor"],
            lambda got: transaction_number(got[-1]) == committed[-1],
        )
    assert [transaction_number(e) for e in received + rest] == committed, "nothing lost, nothing repeated"


def _cut_streams(service) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("points_events_streams_cut_total "):
            return float(line.split()[1])
    return 0.0


def _earn_many(stub, merchant: str, count: int) -> None:
    operations = [
        pb.Operation(
            earn=pb.EarnRequest(
                merchant_id=merchant, member_id=f"mem-{i % 50}", purchase_amount=1000, idempotency_key=unique("k")
            )
        )
        for i in range(count)
    ]
    for start in range(0, count, 1000):
        response = stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations[start : start + 1000]), timeout=60)
        assert [r.status_code for r in response.results] == [0] * len(response.results)


# --- bad cursors ---


def test_a_cursor_not_issued_by_the_feed_is_invalid_argument(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    service = service_factory(url)
    with service.channel() as channel:
        earn(points_pb2_grpc.PointsServiceStub(channel), merchant, unique("mem"), 1000)
    with service.bare_channel() as channel:
        feed = events_pb2_grpc.EventsServiceStub(channel)
        for cursor in ("garbage", "c1.1", "c1.-1.0", "c1.99999999999999999999.0", "c1.1000.0", "c1.1.5"):
            refused = error_of(lambda: read_until(feed, operator, cursor, lambda got: True, seconds=10))
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, cursor
            assert error_info(refused).reason == "INVALID_CURSOR"
            assert "cursor" in refused.details()
        # the service keeps serving: a good cursor still works
        assert len(read_until(feed, operator, "", lambda got: True, seconds=10)) == 1


# --- member events in the same ordered log ---


def _record(url: str, member_id: str, event_type: str, detail: dict) -> events.Position:
    async def go() -> events.Position:
        connection = await connect(url)  # positioned after the transactions answered so far
        try:
            return await events.record_member_event(connection, member_id, event_type, detail)
        finally:
            await connection.close()

    return asyncio.run(go())


def test_member_events_are_ordered_with_transactions_and_level_changes_come_from_the_program(
    create_database, service_factory
):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    add_program_version(
        url,
        {
            "expiry_period_us": 3 * 86_400_000_000,
            "levels": [{"name": "base", "threshold_point_units": 0}, {"name": "gold", "threshold_point_units": 500}],
        },
    )
    service = service_factory(url)
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        wait_until(lambda: _program_applies(url), "the program version applies", 30)
        earn(stub, merchant, member, 1000)  # 100 point-units: base
        frozen = _record(url, member, events.FROZEN, {"reason": "card reported stolen"})
        earn(stub, merchant, member, 10_000)  # +1000: gold
        merged = _record(url, member, events.MERGED, {"target_member_id": "other-member"})
    with service.bare_channel() as channel:
        feed = events_pb2_grpc.EventsServiceStub(channel)
        got = read_until(feed, operator, "", lambda got: got[-1].type == events_pb2.EVENT_TYPE_MEMBER_MERGED)
    types = [e.type for e in got]
    assert types.index(events_pb2.EVENT_TYPE_MEMBER_FROZEN) == 1, types  # after the first earn, before the second
    level = [e for e in got if e.type == events_pb2.EVENT_TYPE_LEVEL_CHANGED]
    assert [(e.level_changed.from_level, e.level_changed.to_level) for e in level][-1][1] == "gold"
    second_earn = [e for e in got if e.type == events_pb2.EVENT_TYPE_TRANSACTION][-1]
    assert level[-1].level_changed.transaction_id in {
        e.transaction.transaction_id for e in got if e.type == events_pb2.EVENT_TYPE_TRANSACTION
    }
    assert got.index(level[-1]) > got.index(second_earn) - 2  # right after the transaction that caused it
    assert got[-1].member_merged.target_member_id == "other-member"
    assert got[types.index(events_pb2.EVENT_TYPE_MEMBER_FROZEN)].cursor == events.encode_cursor(frozen)
    assert got[-1].cursor == events.encode_cursor(merged)
    # resuming from the frozen event's cursor replays exactly what followed it
    with service.bare_channel() as channel:
        again = read_until(
            events_pb2_grpc.EventsServiceStub(channel),
            operator,
            events.encode_cursor(frozen),
            lambda got: got[-1].type == events_pb2.EVENT_TYPE_MEMBER_MERGED,
        )
    assert [e.event_id for e in again] == [
        e.event_id for e in got[types.index(events_pb2.EVENT_TYPE_MEMBER_FROZEN) + 1 :]
    ]
    # points expiring within the notice period: one event per member and expiry instant, once
    lots = fetch(url, "SELECT expires_at_us, amount FROM lots WHERE member_id = $1 ORDER BY expires_at_us", member)
    assert len(lots) == 2  # one lot per earn, each expiring at its own instant
    assert asyncio.run(_scan(url, notice_days=7)) == 2
    assert asyncio.run(_scan(url, notice_days=7)) == 0, "a scan again over the same lots repeats nothing"
    with service.bare_channel() as channel:
        expiring = read_until(
            events_pb2_grpc.EventsServiceStub(channel), operator, got[-1].cursor, lambda got: len(got) == 2
        )
    assert [e.type for e in expiring] == [events_pb2.EVENT_TYPE_POINTS_EXPIRING] * 2
    assert {e.member_id for e in expiring} == {member}
    assert [
        (
            e.points_expiring.expires_at.ToMicroseconds(),
            e.points_expiring.amount_point_units,
            e.points_expiring.notice_days,
        )
        for e in expiring
    ] == [(r["expires_at_us"], r["amount"], 7) for r in lots]
    assert ledger_discrepancies(url) == []


async def _scan(url: str, notice_days: int) -> int:
    await wait_projected_async(url)  # the lots of every answered earn
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        return await events.scan_expiring_points(pool, notice_days, 1000, time.time_ns() // 1000)
    finally:
        await pool.close()


def _program_applies(url: str) -> bool:
    rows = fetch(
        url, "SELECT count(*) AS n FROM program_versions WHERE effective_from_us <= $1", int(time.time() * 1e6)
    )
    return rows[0]["n"] > 0


def test_a_graceful_stop_ends_open_streams_unavailable_with_their_cursor(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    service = service_factory(url)
    with service.channel() as channel:
        earn(points_pb2_grpc.PointsServiceStub(channel), merchant, unique("mem"), 1000)
    with service.bare_channel() as channel:
        call = events_pb2_grpc.EventsServiceStub(channel).WatchEvents(
            events_pb2.WatchEventsRequest(), metadata=credential(operator), timeout=60
        )
        (first,) = next(call).events  # the stream is at the head, following live commits
        assert service.terminate() == 0  # SIGTERM: the stream does not hold the shutdown up
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(raised.value).metadata["cursor"] == first.cursor


def test_the_service_notices_points_expiring_within_the_notice_period(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    add_program_version(url, {"expiry_period_us": 2 * 86_400_000_000})  # points expire after 2 days
    service = service_factory(url, "--events-expiry-notice-days", "3", "--events-expiry-scan-seconds", "1")
    member = unique("mem")
    with service.channel() as channel:
        wait_until(lambda: _program_applies(url), "the program version applies", 30)
        earn(points_pb2_grpc.PointsServiceStub(channel), merchant, member, 5000)
    with service.bare_channel() as channel:
        got = read_until(
            events_pb2_grpc.EventsServiceStub(channel),
            operator,
            "",
            lambda got: got[-1].type == events_pb2.EVENT_TYPE_POINTS_EXPIRING,
            filter=events_pb2.EventFilter(member_ids=[member]),
        )
    (lot,) = fetch(url, "SELECT expires_at_us, amount FROM lots WHERE member_id = $1", member)
    notice = got[-1].points_expiring
    assert (notice.amount_point_units, notice.expires_at.ToMicroseconds(), notice.notice_days) == (
        lot["amount"],
        lot["expires_at_us"],
        3,
    )
    assert [e.type for e in got] == [events_pb2.EVENT_TYPE_TRANSACTION, events_pb2.EVENT_TYPE_POINTS_EXPIRING]


def test_member_events_recorded_under_traffic_are_neither_missed_nor_reordered(create_database, service_factory):
    """Member events recorded from another process while batches commit take their place between two
    batches (the ledger_writer row lock): a live reader sees every event of the feed exactly once, in the
    order a replay from Postgres gives. Were a member event positioned before a transaction the reader
    had already passed, the reader would miss it."""
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    operator = create_key(url, "operator")
    service = service_factory(url)
    stop = threading.Event()
    seen: list[events_pb2.Event] = []
    recorded: list[events.Position] = []
    done_recording = threading.Event()

    def traffic(worker: int) -> None:
        member = f"mem-{worker}-{unique('x')}"
        with service.channel() as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)
            n = 0
            while not stop.is_set():
                n += 1
                earn(stub, merchant, member, 1000 + n, key=f"{member}-{n}")

    def record() -> None:
        async def go() -> None:
            connection = await asyncpg.connect(url)
            try:
                for i in range(150):
                    recorded.append(
                        await events.record_member_event(connection, f"frozen-{i}", events.FROZEN, {"reason": "test"})
                    )
            finally:
                await connection.close()

        asyncio.run(go())
        done_recording.set()

    def reader() -> None:
        cursor = ""
        while not (final and any(e.event_id == final[0] for e in seen[-5:])):
            with service.bare_channel() as channel:
                call = events_pb2_grpc.EventsServiceStub(channel).WatchEvents(
                    events_pb2.WatchEventsRequest(cursor=cursor), metadata=credential(operator), timeout=2
                )
                try:
                    for response in call:
                        seen.extend(response.events)
                        cursor = seen[-1].cursor
                        if final and seen[-1].event_id == final[0]:
                            return
                except grpc.RpcError as error:  # the 2 s deadline: look at `final` again, resume
                    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                finally:
                    call.cancel()

    final: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        following = pool.submit(reader)
        workers = [pool.submit(traffic, i) for i in range(4)]
        try:
            wait_until(lambda: len(seen) >= 50, "the reader follows the traffic", 60)
            pool.submit(record).result(timeout=120)
        finally:
            stop.set()
        for worker in workers:
            worker.result()
        # one last transaction marks the end of the feed for the reader
        with service.channel() as channel:
            last = earn(points_pb2_grpc.PointsServiceStub(channel), merchant, unique("mem"), 1000)
        final.append("tx-" + last.transaction_id.removeprefix("txn_"))
        following.result(timeout=60)
    expected = fetch(
        url,
        """SELECT transaction_id AS t, 0::bigint AS m FROM transactions
           UNION ALL SELECT after_transaction_id, member_event_id FROM member_events ORDER BY 1, 2""",
    )
    assert [e.event_id for e in seen] == [events.event_id(events.Position(r["t"], r["m"])) for r in expected]
    frozen = [e for e in seen if e.type == events_pb2.EVENT_TYPE_MEMBER_FROZEN]
    assert [e.cursor for e in frozen] == [events.encode_cursor(p) for p in recorded]
    assert len({e.transaction.transaction_id for e in seen if e.transaction.transaction_id}) > 50
