"""The batch log and its projector (processor/batch_log.py, processor/projector.py), against a real
Postgres and a real service process. A test blocks the projector by holding projection_state's row
FOR UPDATE in an open transaction of its own connection: every projection waits for that lock, while
the answers (the log appends) go on.

- SIGKILL with the projector blocked: every acknowledged operation is in the log only; after the
  restart (which projects the log before it loads) each is present exactly once, its retry replays it,
  and reconcile is clean.
- Read-your-writes: ListTransactions waits for the projection and, past --projection-wait-seconds,
  answers UNAVAILABLE naming the lag; once the projector runs again it returns the operation.
- A linger (--projection-linger-seconds): batches appended within it are projected as one group, and a
  read of the caller's writes does not wait it out.

Each runs with both --projector modes: a task of the service (in-process) and its child process
(process, processor/projector_process.py). In process mode also: the child exits when the service is
SIGKILLed (no orphan), and a child SIGKILLed alone is started again while reads keep answering.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request

import asyncpg
import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant, ledger_discrepancies
from tests.integration.helpers import call_once, cli, unique
from tests.harness import projection_lag, wait_projected

pytestmark = pytest.mark.timeout(240)

GIVE_BACK_BPS = 1000


class ProjectionBlocker:
    """Holds projection_state's row FOR UPDATE in a transaction of the test's own connection (on a
    private event loop run only while we talk to Postgres: the transaction stays open in between)."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.connection: asyncpg.Connection | None = None

    def _run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def block(self) -> None:
        self.connection = self._run(asyncpg.connect(self.database_url))
        self._run(self.connection.execute("BEGIN"))
        self._run(self.connection.fetchval("SELECT through_batch_id FROM projection_state FOR UPDATE"))

    def lag(self) -> int:
        """Batches appended and not projected, read on a connection of its own."""

        async def read() -> int:
            connection = await asyncpg.connect(self.database_url)
            try:
                return await projection_lag(connection)
            finally:
                await connection.close()

        return self._run(read())

    def release(self) -> None:
        if self.connection is not None:
            self._run(self.connection.execute("ROLLBACK"))
            self._run(self.connection.close())
            self.connection = None

    def close(self) -> None:
        self.release()
        self.loop.close()


@pytest.fixture(params=["in-process", "process"])
def projector(request) -> str:
    """The --projector mode the service runs with."""
    return request.param


def projector_pids(service_pid: int) -> list[int]:
    """The projector processes (`python -m processor project`) whose parent is the service."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rpartition(b")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == service_pid and b"processor" in command and b"project" in command:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def blocker_factory():
    made: list[ProjectionBlocker] = []

    def make(database_url: str) -> ProjectionBlocker:
        blocker = ProjectionBlocker(database_url)
        made.append(blocker)
        return blocker

    yield make
    for blocker in made:
        blocker.close()


def earn_request(merchant: str, member: str, purchase: int) -> pb.EarnRequest:
    return pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=purchase, idempotency_key=unique("k"))


def metric(service, name: str) -> float:
    with urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def test_sigkill_with_the_projector_blocked_loses_no_acknowledged_operation_and_projects_each_once(
    create_database, service_factory, blocker_factory, projector
):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, GIVE_BACK_BPS)
    service = service_factory(url, "--projector", projector)
    children = (
        wait_for(lambda: projector_pids(service.process.pid), 10.0, "the projector process starts")
        if projector == "process"
        else []
    )
    assert len(children) <= 1, children
    members = [unique("mem") for _ in range(3)]
    acknowledged: list[tuple[pb.EarnRequest, pb.EarnResponse]] = []
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        first = earn_request(merchant, members[0], 1_000)
        acknowledged.append((first, stub.Earn(first, timeout=30)))
        wait_projected(url)  # the first batch is projected while nothing blocks the projector (else it fails)
        blocker = blocker_factory(url)
        blocker.block()
        # answered while the projector waits: the log row is the only place these are durable
        for round_number in range(6):
            requests = [earn_request(merchant, members[i % 3], 1_000 + 10 * i) for i in range(5)]
            response = stub.SubmitBatch(
                pb.SubmitBatchRequest(operations=[pb.Operation(earn=r) for r in requests]), timeout=30
            )
            for request, result in zip(requests, response.results):
                assert result.WhichOneof("response") == "earn", result
                acknowledged.append((request, result.earn))
        assert blocker.lag() >= 6, "the answers did not wait for the projection"
        assert metric(service, "points_projection_lag_batches") >= 6
    service.kill()
    # the projector process sees its pipe close and exits at once, even inside its blocked projection
    for child in children:
        wait_for(lambda: not alive(child), 5.0, f"the projector process {child} exits after its service's SIGKILL")
    # the idempotency records are durable with their batches' appends (migration 0023), not projected
    recorded = {r["idempotency_key"] for r in asyncio.run(_fetch(url, "SELECT idempotency_key FROM idempotency_keys"))}
    assert {request.idempotency_key for request, _ in acknowledged} <= recorded
    blocker.release()

    restarted = service_factory(url, "--projector", projector)
    assert blocker.lag() == 0, "start-up projects the whole log before it serves"
    rows = {
        r["idempotency_key"]: r["n"]
        for r in asyncio.run(_fetch(url, "SELECT idempotency_key, count(*) AS n FROM transactions GROUP BY 1"))
    }
    for request, response in acknowledged:
        assert rows.get(request.idempotency_key) == 1, f"{request.idempotency_key} is not in transactions once"
    with restarted.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for request, response in acknowledged:
            again, flag = call_once(stub.Earn, request)
            assert (again.transaction_id, again.points, flag) == (response.transaction_id, response.points, "true")
        expected = {m: 0 for m in members}
        for request, response in acknowledged:
            expected[request.member_id] += response.points
        for member, points in expected.items():
            assert stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == points
    assert ledger_discrepancies(url) == []
    reconciled = cli("reconcile", "--database-url", url)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "not yet projected" not in reconciled.stdout


def test_list_transactions_waits_for_the_projection_and_says_how_far_behind_it_is(
    create_database, service_factory, blocker_factory, projector
):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, GIVE_BACK_BPS)
    # 4 s: after the release below, the projector (a child just started, in process mode) has ~3.7 s to
    # write the blocked batch on a loaded machine; 1.5 s was too short there
    service = service_factory(url, "--projection-wait-seconds", "4", "--projector", projector)
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        stub.Earn(earn_request(merchant, member, 1_000), timeout=30)
        assert len(stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30).transactions) == 1
        blocker = blocker_factory(url)
        blocker.block()
        blocked = stub.Earn(earn_request(merchant, member, 2_000), timeout=30)  # answered: appended
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "behind by 1 batches; retry shortly" in refused.value.details()

        # a read that starts while the projector is blocked returns once it is released, with the operation
        answers: list = []
        reader = threading.Thread(
            target=lambda: answers.append(
                stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30)
            )
        )
        reader.start()
        time.sleep(0.3)
        blocker.release()
        reader.join(timeout=30)
        (page,) = answers
        assert [t.transaction_id for t in page.transactions][0] == blocked.transaction_id
        assert len(page.transactions) == 2
        assert metric(service, "points_projection_lag_batches") == 0
        assert metric(service, "points_projection_transactions_total") >= 2


def test_a_lingering_projector_groups_batches_and_a_read_of_ones_writes_does_not_wait_out_the_linger(
    create_database, service_factory, projector
):
    """--projection-linger-seconds: the batches appended within it are written in one projection, and a
    read that must see the caller's writes asks for them at once (its wait, shorter than the linger,
    would otherwise answer UNAVAILABLE)."""
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, GIVE_BACK_BPS)
    service = service_factory(
        url, "--projection-linger-seconds", "5", "--projection-wait-seconds", "2.5", "--projector", projector
    )
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for purchase in (1_000, 2_000):
            written = stub.Earn(earn_request(merchant, member, purchase), timeout=30)
            page = stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30)
            assert page.transactions[0].transaction_id == written.transaction_id
        projections = metric(service, "points_projection_transactions_total")
        others = unique("mem")
        for purchase in range(1, 5):  # four batches, each answered before the next: well within the linger
            stub.Earn(earn_request(merchant, others, purchase * 1_000), timeout=30)
        wait_for(lambda: metric(service, "points_projection_lag_batches") == 0, 30, "the linger ended")
        assert metric(service, "points_projection_transactions_total") - projections == 1
        page = stub.ListTransactions(pb.ListTransactionsRequest(member_id=others), timeout=30)
        assert len(page.transactions) == 4


def test_a_failing_projection_refuses_waits_at_once_and_a_retry_needing_a_read_is_not_stalled(
    create_database, service_factory, blocker_factory, projector
):
    """The projection blocked past its timeout, again and again (the child reports it in process mode):
    reads that must see the caller's writes are refused UNAVAILABLE at once, naming the failure, rather
    than waiting out --projection-wait-seconds (here longer than the clients' deadlines: a stalled wait
    would end DEADLINE_EXCEEDED); a retry that must read its stored outcome is not stalled either: since
    migration 0023 the outcome is durable with its batch's log append, not projected, so the retry gets
    its first answer at once (it was refused UNAVAILABLE while the projection failed, before); new
    operations are still answered; once the projection succeeds, everything is read back and the retry
    still gets its first answer."""
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, GIVE_BACK_BPS)
    service = service_factory(
        url,
        "--commit-timeout-seconds",
        "1",
        "--projection-wait-seconds",
        "120",
        "--projection-queue-batches-max",
        "2",
        "--projector",
        projector,
    )
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        stub.Earn(earn_request(merchant, member, 1_000), timeout=30)
        assert len(stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30).transactions) == 1
        blocker = blocker_factory(url)
        blocker.block()
        request = earn_request(merchant, member, 2_000)
        blocked = stub.Earn(request, timeout=30)  # answered: appended; its projection times out, retried
        wait_for(lambda: metric(service, "points_projection_failing") == 1, 60.0, "the projection is failing")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "in a row" in refused.value.details() and "retry shortly" in refused.value.details()
        # its stored outcome is in a batch not projected: read from the batch's idempotency_batches row
        assert stub.Earn(request, timeout=30).transaction_id == blocked.transaction_id
        fresh = stub.Earn(earn_request(merchant, unique("mem"), 3_000), timeout=30)  # needs no read: answered
        assert fresh.transaction_id > blocked.transaction_id
        # new operations fill the projector's queue (2 batches here); then they are refused at the door,
        # not held until their deadline behind a queue that does not move
        refused_at_door: list[pb.EarnRequest] = []
        for _ in range(4):
            more = earn_request(merchant, unique("mem"), 1_000)
            try:
                stub.Earn(more, timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
                assert "projection is failing" in error.details() and "not applied" in error.details()
                refused_at_door.append(more)
        assert refused_at_door, "a full queue of a failing projection refuses new operations"
        blocker.release()
        wait_for(lambda: metric(service, "points_projection_failing") == 0, 60.0, "the projection recovers")
        page = stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30)
        assert [t.transaction_id for t in page.transactions][0] == blocked.transaction_id
        assert stub.Earn(request, timeout=30).transaction_id == blocked.transaction_id  # the first answer
        for more in refused_at_door:  # not applied: a retry applies it once
            assert stub.Earn(more, timeout=30).points == 100
        assert metric(service, "points_projection_failures_total") >= 2 or projector == "process"
    assert service.terminate() == 0
    assert ledger_discrepancies(url) == []


def test_a_projector_process_killed_alone_is_started_again_and_reads_keep_answering(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, GIVE_BACK_BPS)
    service = service_factory(url, "--projector", "process")
    member = unique("mem")
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        first = stub.Earn(earn_request(merchant, member, 1_000), timeout=30)
        assert len(stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30).transactions) == 1
        (child,) = wait_for(lambda: projector_pids(service.process.pid), 10.0, "the projector process starts")
        os.kill(child, signal.SIGKILL)
        # answered while no projector may run: its read waits for the new one to project it
        second = stub.Earn(earn_request(merchant, member, 2_000), timeout=30)
        page = stub.ListTransactions(pb.ListTransactionsRequest(member_id=member), timeout=30)
        assert {t.transaction_id for t in page.transactions} == {first.transaction_id, second.transaction_id}
        (restarted,) = wait_for(
            lambda: [p for p in projector_pids(service.process.pid) if p != child], 10.0, "a new projector process"
        )
        assert not alive(child)
        assert metric(service, "points_projector_restarts_total") >= 1
        assert metric(service, "points_projection_lag_batches") == 0
        assert metric(service, "points_projector_cpu_seconds_total") > 0
        assert (
            stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == first.points + second.points
        )
    assert service.terminate() == 0
    wait_projected(url, timeout=0.1)  # the graceful stop drained the new child before it exited
    wait_for(lambda: not alive(restarted), 5.0, "the projector process exits with its service")
    assert ledger_discrepancies(url) == []


async def _fetch(url: str, sql: str):
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(sql)
    finally:
        await connection.close()


def test_pruning_keeps_unprojected_batches_and_the_newest_projected_one_and_reconcile_checks_the_rest(
    create_database, service_factory, projector
):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, GIVE_BACK_BPS)
    service = service_factory(url, "--projector", projector)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for _ in range(4):
            stub.Earn(earn_request(merchant, unique("mem"), 1_000), timeout=30)
    assert service.terminate() == 0
    wait_projected(url, timeout=0.1)  # a graceful stop drains the projector: nothing is left to wait for
    assert ledger_discrepancies(url) == []

    async def go() -> tuple[int, list[int], list[str], int]:
        from processor.projector import prune_log
        from processor.store import Store

        store = await Store.open(url, 2)
        try:
            through = await store.pool.fetchval("SELECT through_batch_id FROM projection_state")
            # a batch appended and not projected yet (as if the service died before projecting it)
            await store.pool.execute(
                """INSERT INTO batch_log (batch_id, created_at, transactions, operations, format_version, payload)
                   VALUES ($1, now() - interval '2 hours', 0, 0, 1, '\\x00')""",
                through + 1,
            )
            await store.pool.execute("UPDATE batch_log SET created_at = now() - interval '2 hours'")
            deleted = await prune_log(store, 3600.0, 30.0)
            kept = [r["batch_id"] for r in await store.pool.fetch("SELECT batch_id FROM batch_log ORDER BY 1")]
            await store.pool.execute("DELETE FROM batch_log WHERE batch_id > $1", through)
            # a projected batch whose transactions are not all there: reconcile names it
            await store.pool.execute(
                "UPDATE batch_log SET transactions = transactions + 1 WHERE batch_id = $1", through
            )
            problems = await store.ledger_discrepancies()
            return deleted, kept, problems, through
        finally:
            await store.close()

    deleted, kept, problems, through = asyncio.run(go())
    assert deleted == through - 1 and kept == [through, through + 1]
    assert any(f"batch {through} of the log wrote 2 transactions" in p for p in problems), problems


def test_a_projector_process_refusing_the_log_as_divergent_makes_the_service_resynchronise(create_database):
    """A row written around the running service (a transaction under the id the next batch hands out:
    since migration 0023 an idempotency record no longer has a per-key primary key to collide on): the
    projector process's projection is refused by the primary key, it exits with EXIT_DIVERGENT, and the
    service resynchronises, whose recovery stops it naming the batch."""
    from processor import config
    from processor.pipeline import Pipeline
    from processor.projector import ProjectionRefused
    from processor.projector_process import RemoteProjector
    from processor.store import Store
    from tests.integration.test_idempotency_memory import earn, earn_batch

    url = create_database()
    merchant, member, outside, other = unique("m"), unique("ann"), unique("k"), unique("k")
    add_merchant(url, merchant, GIVE_BACK_BPS)

    async def go():
        store = await Store.open(url, 4)
        await store.migrate()
        await store.acquire_writer_lock()
        pipeline = Pipeline(config.Settings(projector="process"), store)
        assert isinstance(pipeline.projector, RemoteProjector)
        await pipeline.recover()
        pipeline.start()
        await pipeline.projector.started()  # the child runs (its pid is read below; start() only begins it)
        try:
            await earn(pipeline, merchant, member, 1_000, unique("k"))
            taken = pipeline.ids.next_transaction_id
            await store.pool.execute(
                """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                             idempotency_key, created_at, leg_accounts, leg_amounts)
                   VALUES ($1, 1, $2, $3, 'POINTS', 7, $4, now(), '{}', '{}')""",
                taken,
                merchant,
                member,
                outside,
            )
            child = pipeline.projector.pid
            assert child is not None
            await earn_batch(pipeline, merchant, [(member, 70, outside), (member, 500, other)])
            committer = pipeline._task
            assert committer is not None
            await asyncio.wait({committer}, timeout=60)
            assert committer.done(), "the service kept serving a ledger whose log cannot be projected"
            error = committer.exception()
            assert isinstance(error, ProjectionRefused), repr(error)
            assert f"({taken})" in str(error)
            assert not alive(child), "the projector process that refused the log is gone"
        finally:
            await pipeline.projector.halt()
            await store.close()

    asyncio.run(go())
