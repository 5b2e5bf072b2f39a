"""Writer fencing until COMMIT (issue 13, item 3), with two instances on one ledger.

Instance A writes; instance B waits for the writer lock (--writer-lock-wait-seconds). A is SIGSTOPped
while one of its batches is inside its Postgres transaction, and only A's lock session is killed: B
takes the lock, but must not load the ledger before A's open batch has ended, and A must never commit
after B took over. B waits twice the commit timeout for A's open transaction, then ends A's sessions
(A may be stopped inside a COPY, which no idle timeout ends); B bumps the epoch and serves; A, continued,
finds itself fenced off and exits. With the projector as a child (CASES), the child is not stopped with
A and its sessions are not A's (application_name points-processor-projector). After
both settle: no id is used twice, balances equal the journal, and every acknowledged operation is in
the journal exactly once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time

import asyncpg
import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import unique

MERCHANTS = ("fence-a", "fence-b")
COMMIT_TIMEOUT_SECONDS = "2"  # A's stalled transaction is ended after 4 s
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def _fetch_now(url: str, sql: str, *args):
    """A read that does not wait for the projection (harness.fetch may): while A is stopped, the batches
    it appended are projected only once B has taken over and recovered."""

    async def read():
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetch(sql, *args)
        finally:
            await connection.close()

    return asyncio.run(read())


def _open_batches(url: str, states: tuple[str, ...]) -> list[dict]:
    """The service's pool sessions inside a transaction that wrote, in one of `states` ('active': inside
    a statement, e.g. a COPY waiting for the rows; 'idle in transaction': between two). The projector
    child's sessions have their own application_name (points-processor-projector): the child is not
    stopped with A, its transactions end by themselves."""
    rows = _fetch_now(
        url,
        """SELECT pid, xact_start, state, query FROM pg_stat_activity
                         WHERE application_name = 'points-processor' AND datname = current_database()
                           AND backend_xid IS NOT NULL AND state = ANY($1::text[])""",
        list(states),
    )
    return [dict(r) for r in rows]


class Clients:
    """Merchants' tills: earns and redeems with idempotency keys; an answer that did not come is retried
    with the same key until it does (at whichever instance serves)."""

    def __init__(self, members: list[str]):
        self.members = members
        self.acknowledged: dict[tuple[str, str], str] = {}  # (merchant, key) -> transaction id
        self.lock = threading.Lock()
        self.target = ""
        self.stop = threading.Event()
        self.give_up_at = float("inf")  # after stop: a call still unanswered then was never acknowledged

    def finish(self, grace_seconds: float) -> None:
        """Stop issuing new calls; retry the unanswered ones for up to `grace_seconds` (bounded: a test
        that failed with A dead and the target still A must not leave these threads spinning, which
        would keep the interpreter from exiting)."""
        self.give_up_at = time.monotonic() + grace_seconds
        self.stop.set()

    def run(self, credentials_url: str, worker: int) -> None:
        from tests.harness import Credentials

        pending: list[tuple[str, pb.EarnRequest | pb.RedeemRequest]] = []
        channels: dict[str, grpc.Channel] = {}
        n = 0
        while not self.stop.is_set() or (pending and time.monotonic() < self.give_up_at):
            if not pending:
                n += 1
                merchant = MERCHANTS[n % 2]
                member = self.members[(worker * 7 + n) % len(self.members)]
                if n % 3:
                    pending.append(
                        (
                            "Earn",
                            pb.EarnRequest(
                                merchant_id=merchant,
                                member_id=member,
                                purchase_amount=1_000 + n,
                                idempotency_key=unique("k"),
                            ),
                        )
                    )
                else:
                    pending.append(
                        (
                            "Redeem",
                            pb.RedeemRequest(
                                merchant_id=merchant, member_id=member, points=1, idempotency_key=unique("k")
                            ),
                        )
                    )
            method, request = pending[0]
            target = self.target
            if target not in channels:
                channels[target] = grpc.intercept_channel(grpc.insecure_channel(target), Credentials(credentials_url))
            stub = points_pb2_grpc.PointsServiceStub(channels[target])
            try:
                response = getattr(stub, method)(request, timeout=3)
            except grpc.RpcError as error:
                if error.code() in RETRYABLE:
                    time.sleep(0.05)
                    continue  # unknown outcome: the same key again
                assert method == "Redeem" and error.code() in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                ), error.details()
                pending.pop(0)  # no points (yet): refused, nothing posted
                continue
            with self.lock:
                self.acknowledged[(request.merchant_id, request.idempotency_key)] = response.transaction_id
            pending.pop(0)
        for channel in channels.values():
            channel.close()


# (projector, states A is caught in). In-process, A's own sessions hold the projection's transactions
# (COPYs, 'active' while they wait for rows A will not send; 'idle in transaction' between statements):
# caught every time. As a child (the default), A's own transactions are its one-statement appends and
# its checkpoints, open for a millisecond: A is stopped inside one if caught within CATCH_TRIES, else
# wherever it is; its child, not stopped, keeps projecting until the fence refuses it.
CASES = [
    ("in-process", ("active",)),
    ("in-process", ("idle in transaction",)),
    ("process", ("active", "idle in transaction")),
]
CATCH_TRIES = 2000


@pytest.mark.timeout(240)
@pytest.mark.parametrize("projector, stopped_in", CASES)
def test_a_stalled_writer_is_fenced_off_until_commit_and_the_standby_takes_over(
    create_database, request, projector, stopped_in
):
    url = create_database()
    for merchant in MERCHANTS:
        add_merchant(url, merchant, 1000)
    options = (
        "--commit-timeout-seconds",
        COMMIT_TIMEOUT_SECONDS,
        "--balance-checkpoint-seconds",
        "0.5",
        "--projector",
        projector,
    )
    first = ServiceProcess(url, *options).start()
    second = ServiceProcess(url, *options, "--writer-lock-wait-seconds", "120")
    request.addfinalizer(second.kill)
    request.addfinalizer(first.kill)
    started = concurrent.futures.ThreadPoolExecutor(1).submit(second.start)
    members = [unique("m") for _ in range(20)]
    clients = Clients(members)
    clients.target = first.target
    workers = concurrent.futures.ThreadPoolExecutor(4)
    running = [workers.submit(clients.run, url, w) for w in range(4)]
    try:
        time.sleep(1.5)
        assert not started.done(), "the second instance must wait for the writer lock, not start"
        epoch = _fetch_now(url, "SELECT epoch FROM ledger_writer")[0]["epoch"]

        # stop A inside a batch's transaction (retry until one is caught open)
        for _ in range(CATCH_TRIES):
            os.kill(first.process.pid, signal.SIGSTOP)
            stalled = _open_batches(url, stopped_in)
            if stalled:
                break
            os.kill(first.process.pid, signal.SIGCONT)
            time.sleep(0.005)
        else:
            if projector == "in-process":
                pytest.fail("never caught the first instance inside a batch")
            os.kill(first.process.pid, signal.SIGSTOP)  # stopped wherever it is
        # only the session holding the lock (B's session is waiting for it under the same name)
        killed = _fetch_now(
            url,
            """SELECT pg_terminate_backend(a.pid) AS k FROM pg_stat_activity a
                               WHERE a.application_name = 'points-processor-lock' AND a.datname = current_database()
                                 AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid
                                             AND l.locktype = 'advisory' AND l.granted)""",
        )
        assert [r["k"] for r in killed] == [True]

        # B gets the lock at once but waits for A's open transaction (ended by Postgres), then serves
        second_service = started.result(timeout=60)
        assert second_service is second
        assert _fetch_now(url, "SELECT epoch FROM ledger_writer")[0]["epoch"] == epoch + 1
        still_there = [
            dict(r)
            for r in _fetch_now(
                url,
                """SELECT pid, xact_start, state, query FROM pg_stat_activity
                   WHERE (pid, xact_start) IN (SELECT * FROM unnest($1::int[], $2::timestamptz[]))""",
                [r["pid"] for r in stalled],
                [r["xact_start"] for r in stalled],
            )
        ]
        assert still_there == [], (
            "B loaded the ledger while A's batch transaction was still open",
            stalled,
            still_there,
        )
        clients.target = second.target
        time.sleep(1.0)  # traffic on B while A is still stopped, past its commit timeout

        # A continues: whatever it was doing, it writes nothing more and stops
        os.kill(first.process.pid, signal.SIGCONT)
        assert first.process.wait(timeout=60) != 0
        time.sleep(1.0)
    finally:
        first.kill()  # SIGKILL ends a stopped process too
        clients.finish(grace_seconds=60)
        for future in running:
            future.result(timeout=120)
        workers.shutdown()
    fenced_out = "".join(first.log_lines)
    assert "another points service" in fenced_out, fenced_out[-3000:]

    # every acknowledged operation exactly once, no id twice, balances = journal, reconcile clean
    assert len(clients.acknowledged) > 20
    rows = fetch(url, "SELECT merchant_id, idempotency_key, transaction_id FROM transactions")
    journal: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        journal.setdefault((r["merchant_id"], r["idempotency_key"]), []).append(r["transaction_id"])
    for key, transaction_id in clients.acknowledged.items():
        assert journal.get(key) == [int(transaction_id.removeprefix("txn_"))], key
    assert len({r["transaction_id"] for r in rows}) == len(rows)
    with second.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for member in members:
            posted = stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted
            summed = fetch(
                url,
                """SELECT coalesce(sum(e.amount), 0)::bigint AS s FROM entries e
                                   JOIN accounts a USING (account_id)
                                   WHERE a.kind = 'member' AND a.owner_id = $1""",
                member,
            )[0]["s"]
            assert posted == summed, member
    second.kill()
    assert ledger_discrepancies(url) == []
