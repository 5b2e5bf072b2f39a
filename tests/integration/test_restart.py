"""Stopping and crashing the service: a graceful stop loses nothing and exits 0; after a restart on the
same database the service shows the same balances, holds and history; after SIGKILLs in the middle of
traffic every acknowledged operation is in the journal exactly once, nothing is half-applied, and
retries with the same key get the outcome that was committed."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import random
import threading
import time

import asyncpg
import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import add_merchant, ledger_discrepancies
from tests.integration.helpers import (
    balance,
    call_once,
    earn,
    error_of,
    funded_member,
    ledger_snapshot,
    member_in_postgres,
    replay_flag,
    unique,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown with a failure, to replay the same choices
    return random.Random(seed)


def wire(message) -> bytes:
    return message.SerializeToString(deterministic=True)


# --- (a) stop and start again ---


def test_sigterm_exits_zero_and_restart_shows_same_balances_holds_and_history(create_database, service_factory):
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    service = service_factory(url)
    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        members = [funded_member(stub, merchant, 1_000) for _ in range(4)]
        kept = stub.Authorize(
            pb.AuthorizeRequest(merchant_id=merchant, member_id=members[0], points=300, idempotency_key=unique("k")),
            timeout=30,
        )
        also_kept = stub.Authorize(
            pb.AuthorizeRequest(merchant_id=merchant, member_id=members[0], points=200, idempotency_key=unique("k")),
            timeout=30,
        )
        captured = stub.Authorize(
            pb.AuthorizeRequest(merchant_id=merchant, member_id=members[1], points=400, idempotency_key=unique("k")),
            timeout=30,
        )
        stub.Capture(
            pb.CaptureRequest(
                merchant_id=merchant,
                authorization_id=captured.authorization_id,
                points=150,
                idempotency_key=unique("k"),
            ),
            timeout=30,
        )
        voided = stub.Authorize(
            pb.AuthorizeRequest(merchant_id=merchant, member_id=members[2], points=250, idempotency_key=unique("k")),
            timeout=30,
        )
        stub.Void(
            pb.VoidRequest(merchant_id=merchant, authorization_id=voided.authorization_id, idempotency_key=unique("k")),
            timeout=30,
        )
        spent = stub.Redeem(
            pb.RedeemRequest(merchant_id=merchant, member_id=members[3], points=600, idempotency_key=unique("k")),
            timeout=30,
        )
        stub.Refund(
            pb.RefundRequest(
                merchant_id=merchant, transaction_id=spent.transaction_id, points=100, idempotency_key=unique("k")
            ),
            timeout=30,
        )
        balances_before = {m: wire(stub.GetBalance(pb.GetBalanceRequest(member_id=m), timeout=30)) for m in members}
        histories_before = {
            m: wire(stub.ListTransactions(pb.ListTransactionsRequest(member_id=m), timeout=30)) for m in members
        }
    assert balance_of(balances_before[members[0]]) == (1_000, 500, 500)
    snapshot_before = ledger_snapshot(url)

    assert service.terminate() == 0
    restarted = service_factory(url)

    assert ledger_snapshot(url) == snapshot_before
    with restarted.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for m in members:
            assert wire(stub.GetBalance(pb.GetBalanceRequest(member_id=m), timeout=30)) == balances_before[m]
            assert (
                wire(stub.ListTransactions(pb.ListTransactionsRequest(member_id=m), timeout=30)) == histories_before[m]
            )
        # the holds still hold: the member can hold exactly its available points, no more
        error = error_of(
            lambda: stub.Authorize(
                pb.AuthorizeRequest(
                    merchant_id=merchant, member_id=members[0], points=501, idempotency_key=unique("k")
                ),
                timeout=30,
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        # a hold authorized before the restart is captured after it; another is voided
        capture = stub.Capture(
            pb.CaptureRequest(
                merchant_id=merchant, authorization_id=kept.authorization_id, points=120, idempotency_key=unique("k")
            ),
            timeout=30,
        )
        assert (capture.points, capture.released, capture.balance, capture.available) == (120, 180, 880, 680)
        void = stub.Void(
            pb.VoidRequest(
                merchant_id=merchant, authorization_id=also_kept.authorization_id, idempotency_key=unique("k")
            ),
            timeout=30,
        )
        assert (void.released, void.available) == (200, 880)
        assert balance(stub, members[0]) == (880, 0, 880)
        # holds resolved before the restart stay resolved
        again = error_of(
            lambda: stub.Capture(
                pb.CaptureRequest(
                    merchant_id=merchant, authorization_id=captured.authorization_id, idempotency_key=unique("k")
                ),
                timeout=30,
            )
        )
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and "already captured" in again.details()
        after_void = error_of(
            lambda: stub.Capture(
                pb.CaptureRequest(
                    merchant_id=merchant, authorization_id=voided.authorization_id, idempotency_key=unique("k")
                ),
                timeout=30,
            )
        )
        assert after_void.code() == grpc.StatusCode.FAILED_PRECONDITION and "voided" in after_void.details()
        # what was refunded before counts: 500 of the 600 remain refundable
        over = error_of(
            lambda: stub.Refund(
                pb.RefundRequest(
                    merchant_id=merchant, transaction_id=spent.transaction_id, points=501, idempotency_key=unique("k")
                ),
                timeout=30,
            )
        )
        assert over.code() == grpc.StatusCode.FAILED_PRECONDITION
        back = stub.Refund(
            pb.RefundRequest(
                merchant_id=merchant, transaction_id=spent.transaction_id, points=500, idempotency_key=unique("k")
            ),
            timeout=30,
        )
        assert back.balance == 1_000
        # new ids do not collide with those issued before the restart
        fresh = earn(stub, merchant, members[2], 10_000)
        assert int(fresh.transaction_id[4:]) > int(back.transaction_id[4:]) > int(spent.transaction_id[4:])
    assert ledger_discrepancies(url) == []


def balance_of(serialized: bytes) -> tuple[int, int, int]:
    response = pb.GetBalanceResponse.FromString(serialized)
    return response.posted, response.held, response.available


def test_sigterm_during_traffic_answers_every_call_and_loses_nothing(create_database, service_factory):
    """On SIGTERM the service finishes the calls it accepted and refuses the rest: every OK answer is
    durable, every refused call was not applied (its retry after the restart is the first outcome)."""
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    service = service_factory(url)
    member = unique("mem")
    answers: list[tuple[pb.EarnRequest, object]] = []
    lock = threading.Lock()
    acknowledged = threading.Semaphore(0)

    def client(stub) -> None:
        for _ in range(10_000):  # bounded; ends at the first refusal
            request = pb.EarnRequest(
                merchant_id=merchant, member_id=member, purchase_amount=1_000, idempotency_key=unique("k")
            )
            try:
                response = stub.Earn(request, timeout=30)
            except grpc.RpcError as error:
                with lock:
                    answers.append((request, error))
                return
            with lock:
                answers.append((request, response))
            acknowledged.release()

    with service.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            clients = [pool.submit(client, stub) for _ in range(8)]
            for _ in range(100):  # traffic is flowing
                assert acknowledged.acquire(timeout=30), "the clients made no progress"
            exit_code = service.terminate()
            for future in clients:
                future.result()
    assert exit_code == 0

    accepted = [(request, response) for request, response in answers if isinstance(response, pb.EarnResponse)]
    refused = [(request, error) for request, error in answers if isinstance(error, grpc.RpcError)]
    assert len(refused) == 8  # each client stopped at its first refusal
    # refused, not answered: UNAVAILABLE (retryable), while the service drains before closing
    assert {error.code() for _, error in refused} == {grpc.StatusCode.UNAVAILABLE}, {
        (error.code(), error.details()) for _, error in refused
    }

    restarted = service_factory(url)
    with restarted.channel() as channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for request, _ in refused:
            _, flag = call_once(stub.Earn, request)
            assert flag is None, "a call refused at shutdown must not have been applied"
        for request, response in accepted:
            again, flag = call_once(stub.Earn, request)
            assert (wire(again), flag) == (wire(response), "true")
        assert balance(stub, member) == (100 * len(answers), 0, 100 * len(answers))
    assert member_in_postgres(url, member) == (100 * len(answers), 100 * len(answers), 0)
    assert ledger_discrepancies(url) == []


# --- (b) crashes in the middle of traffic ---

KILLS = 8
CLIENTS = 12
MEMBERS = 6
CALL_TIMEOUT_SECONDS = 10
RESTART_WAIT_SECONDS = 0.5
RETRYING_SECONDS_MAX = 60
# Answers that leave the outcome open: the call may or may not have been applied; retry with the same key.
UNANSWERED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
KIND = {"Earn": 1, "Capture": 2, "Redeem": 3}
KIND_REFUND_OF_REDEMPTION, KIND_REFUND_OF_EARN = 4, 5
MEMBER_SIGN = {1: 1, 2: -1, 3: -1, 4: 1, 5: -1}
MERCHANT_ENTRY = {
    1: ("merchant_issued", -1),
    2: ("merchant_redeemed", 1),
    3: ("merchant_redeemed", 1),
    4: ("merchant_redeemed", -1),
    5: ("merchant_issued", 1),
}
CREATES_TRANSACTION = frozenset({"Earn", "Capture", "Redeem", "Refund"})


@dataclasses.dataclass(eq=False)
class Op:
    """One operation a client issued, and what became of it."""

    method: str
    request: object
    member: str  # whose balance it concerns
    give_back_bps: int = 0  # earns: the merchant's rate
    original: "Op | None" = None  # refunds: the refunded operation; captures and voids: the authorize
    code: str = ""  # the answer: an error code name, or "OK" ("" while unanswered)
    response: object = None  # OK: the response; otherwise the error details
    replayed: bool = False  # the answer carried the replay trailer
    interrupted: bool = False  # at least one attempt went unanswered
    abandoned: bool = False  # unanswered and never retried

    @property
    def key(self) -> tuple[str, str]:
        return self.request.merchant_id, self.request.idempotency_key

    @property
    def kind(self) -> int:
        if self.method == "Refund":
            return KIND_REFUND_OF_EARN if self.original.method == "Earn" else KIND_REFUND_OF_REDEMPTION
        return KIND[self.method]

    @property
    def points(self) -> int:
        """Point-units the operation moves (or holds) if it is applied."""
        if self.method == "Earn":
            return self.request.purchase_amount * self.give_back_bps // 10_000
        return self.request.points


class Board:
    """The stub of the service currently running; the test replaces it after each restart."""

    def __init__(self):
        self._condition = threading.Condition()
        self._channels: list[grpc.Channel] = []
        self._stub = None
        self.generation = 0

    def connect(self, service) -> None:
        channel = service.channel()
        with self._condition:
            self._channels.append(channel)  # old channels stay open: a thread may still be calling on one
            self._stub = points_pb2_grpc.PointsServiceStub(channel)
            self.generation += 1
            self._condition.notify_all()

    def current(self):
        """(stub, generation) of the service running now."""
        with self._condition:
            return self._stub, self.generation

    @property
    def stub(self):
        return self.current()[0]

    def wait_for_restart(self, generation: int, timeout: float) -> None:
        """Returns once the service of `generation` has been replaced, or after `timeout` seconds
        (an unanswered call is retried either way)."""
        with self._condition:
            self._condition.wait_for(lambda: self.generation > generation, timeout)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


class Progress:
    """Counts acknowledged operations; the test waits on it to kill the service mid-traffic."""

    def __init__(self):
        self._condition = threading.Condition()
        self.acknowledged = 0
        self.problems: list[str] = []

    def acknowledge(self) -> None:
        with self._condition:
            self.acknowledged += 1
            self._condition.notify_all()

    def problem(self, text: str) -> None:
        """Something no ledger may answer: the clients stop, and the test fails without waiting."""
        with self._condition:
            self.problems.append(text)
            self._condition.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """True once `count` operations were acknowledged; False after `timeout` seconds or a problem."""
        with self._condition:
            return (
                self._condition.wait_for(lambda: self.acknowledged >= count or self.problems, timeout)
                and not self.problems
            )


class Client:
    """Drives mixed traffic on shared members, recording every answer. An abandoning client gives up
    an operation whose first attempt went unanswered; the others retry with the same key until
    answered."""

    def __init__(
        self,
        board: Board,
        progress: Progress,
        members: list[str],
        merchants: dict[str, int],
        rng: random.Random,
        abandons: bool,
    ):
        self.board = board
        self.progress = progress
        self.members = members
        self.merchants = merchants
        self.rng = rng
        self.abandons = abandons
        self.ops: list[Op] = []
        self.holds: list[Op] = []  # answered authorizes not yet resolved
        self.refundable: dict[Op, int] = {}  # answered earns, captures, redeems → unrefunded

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set() and not self.progress.problems:
                self.step()
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.progress.problem(f"client crashed: {error!r}")

    def step(self) -> None:
        rng = self.rng
        choice = rng.random()
        if self.holds and choice < 0.25:
            self.resolve(self.holds.pop(rng.randrange(len(self.holds))))
        elif choice < 0.45:
            merchant = rng.choice(list(self.merchants))
            op = self.issue(
                "Earn",
                pb.EarnRequest(
                    merchant_id=merchant,
                    member_id=rng.choice(self.members),
                    purchase_amount=rng.randint(100, 30_000),
                    idempotency_key=unique("k"),
                ),
                give_back_bps=self.merchants[merchant],
            )
            if op.code == "OK":
                self.refundable[op] = op.response.points
        elif choice < 0.65:
            op = self.issue(
                "Authorize",
                pb.AuthorizeRequest(
                    merchant_id=rng.choice(list(self.merchants)),
                    member_id=rng.choice(self.members),
                    points=rng.randint(1, 2_000),
                    idempotency_key=unique("k"),
                ),
            )
            if op.code == "OK":
                self.holds.append(op)
        elif choice < 0.85 or not self.refundable:
            op = self.issue(
                "Redeem",
                pb.RedeemRequest(
                    merchant_id=rng.choice(list(self.merchants)),
                    member_id=rng.choice(self.members),
                    points=rng.randint(1, 1_500),
                    idempotency_key=unique("k"),
                ),
            )
            if op.code == "OK":
                self.refundable[op] = op.points
        else:
            original = rng.choice(list(self.refundable))
            remaining = self.refundable.pop(original)
            points = rng.randint(1, remaining)
            op = self.issue(
                "Refund",
                pb.RefundRequest(
                    merchant_id=original.request.merchant_id,
                    transaction_id=original.response.transaction_id,
                    points=points,
                    idempotency_key=unique("k"),
                ),
                original=original,
            )
            if op.code == "OK" and remaining > points:
                self.refundable[original] = remaining - points
            elif op.code != "OK" and not op.abandoned:
                self.refundable[original] = remaining  # refused (the member spent them): nothing moved

    def resolve(self, hold: Op) -> None:
        merchant = hold.request.merchant_id
        authorization_id = hold.response.authorization_id
        if self.rng.random() < 0.6:
            op = self.issue(
                "Capture",
                pb.CaptureRequest(
                    merchant_id=merchant,
                    authorization_id=authorization_id,
                    points=self.rng.randint(1, hold.request.points),
                    idempotency_key=unique("k"),
                ),
                original=hold,
            )
            if op.code == "OK":
                self.refundable[op] = op.points
        else:
            self.issue(
                "Void",
                pb.VoidRequest(merchant_id=merchant, authorization_id=authorization_id, idempotency_key=unique("k")),
                original=hold,
            )

    retry_pause_seconds = RESTART_WAIT_SECONDS

    def record(self, op: Op, code: str, details: str, replayed: bool, sent_at: float) -> None:
        """Called with every attempt's answer; subclasses keep them."""

    def last_answer(self, op: Op) -> str:
        return ""

    def issue(self, method: str, request, give_back_bps: int = 0, original: Op | None = None) -> Op:
        member = original.member if original is not None else request.member_id
        op = Op(method, request, member, give_back_bps, original)
        self.ops.append(op)
        started = time.monotonic()
        while True:
            stub, generation = self.board.current()
            sent_at = time.monotonic()
            try:
                response, flag = call_once(getattr(stub, method), request, CALL_TIMEOUT_SECONDS)
                self.record(op, "OK", "", flag == "true", sent_at)
                op.code, op.response, op.replayed = "OK", response, flag == "true"
                break
            except grpc.RpcError as error:
                self.record(op, error.code().name, error.details() or "", replay_flag(error) == "true", sent_at)
                if error.code() not in UNANSWERED:
                    op.code, op.response = error.code().name, error.details()
                    break
            op.interrupted = True
            # the service is (most likely) down: wait until the test has started it again
            self.board.wait_for_restart(generation, self.retry_pause_seconds)
            if self.abandons:
                op.abandoned = True
                return op
            if time.monotonic() - started > RETRYING_SECONDS_MAX:
                self.progress.problem(
                    f"{method} {request.idempotency_key} unanswered after "
                    f"{RETRYING_SECONDS_MAX} s of retries{self.last_answer(op)}"
                )
                op.abandoned = True
                return op
        problem = unexpected_answer(op)
        if problem:
            self.progress.problem(problem)
        self.progress.acknowledge()
        return op


@dataclasses.dataclass
class Journal:
    """What Postgres holds, indexed for the checks."""

    transactions: dict[int, asyncpg.Record]
    transactions_by_key: dict[tuple[str, str], list[asyncpg.Record]]
    entries: dict[int, list[tuple[str, str, int]]]
    holds: dict[int, asyncpg.Record]
    holds_by_key: dict[tuple[str, str], list[asyncpg.Record]]
    idempotency: dict[tuple[str, str], tuple[str, str]]


async def _read_journal(url: str) -> Journal:
    from tests.projection import wait_projected_async

    await wait_projected_async(url)  # the answered batches' rows are written by the projector
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            transactions = await connection.fetch(
                """SELECT transaction_id, kind, merchant_id, member_id, amount, authorization_id,
                          original_transaction_id, idempotency_key FROM transactions"""
            )
            entries = await connection.fetch(
                """SELECT e.transaction_id, a.kind, a.owner_id, e.amount
                   FROM entries e JOIN accounts a USING (account_id)"""
            )
            holds = await connection.fetch(
                """SELECT authorization_id, merchant_id, member_id, amount, status, captured,
                          capture_transaction_id, idempotency_key FROM holds"""
            )
            keys = await connection.fetch("SELECT merchant_id, idempotency_key, method, outcome FROM idempotency_keys")
    finally:
        await connection.close()
    by_key = collections.defaultdict(list)
    for t in transactions:
        by_key[(t["merchant_id"], t["idempotency_key"])].append(t)
    holds_by_key = collections.defaultdict(list)
    for h in holds:
        holds_by_key[(h["merchant_id"], h["idempotency_key"])].append(h)
    journal_entries = collections.defaultdict(list)
    for e in entries:
        journal_entries[e["transaction_id"]].append((e["kind"], e["owner_id"], e["amount"]))
    return Journal(
        {t["transaction_id"]: t for t in transactions},
        by_key,
        journal_entries,
        {h["authorization_id"]: h for h in holds},
        holds_by_key,
        {(k["merchant_id"], k["idempotency_key"]): (k["method"], k["outcome"]) for k in keys},
    )


def read_journal(url: str) -> Journal:
    return asyncio.run(_read_journal(url))


def outcome_of(op: Op, journal: Journal) -> str:
    """ "OK" or an error code: the answer the client got, else the outcome Postgres recorded (an
    abandoned call); "" if an abandoned call left no record."""
    if not op.abandoned:
        return op.code
    record = journal.idempotency.get(op.key)
    return record[1] if record else ""


def check_in_journal(op: Op, outcome: str, journal: Journal) -> list[str]:
    """The rows `op` must have left, all of them or none: its idempotency record, its one transaction
    (with its two balanced entries) or its hold, and the resolution of the hold it captured or voided."""
    problems = []
    name = f"{op.method} {op.key[1]}"
    if outcome:
        if journal.idempotency.get(op.key) != (op.method, outcome):
            problems.append(f"{name}: answered {outcome}, idempotency record {journal.idempotency.get(op.key)}")
    elif op.key in journal.idempotency:
        problems.append(f"{name}: unanswered, yet recorded")
    applied = outcome == "OK"
    transactions = journal.transactions_by_key.get(op.key, [])
    holds = journal.holds_by_key.get(op.key, [])
    expected_transactions = 1 if applied and op.method in CREATES_TRANSACTION else 0
    if len(transactions) != expected_transactions:
        problems.append(f"{name}: outcome {outcome or 'none'}, {len(transactions)} transactions in the journal")
    if len(holds) != (1 if applied and op.method == "Authorize" else 0):
        problems.append(f"{name}: outcome {outcome or 'none'}, {len(holds)} holds")
    if expected_transactions and len(transactions) == 1:
        t = transactions[0]
        if (t["kind"], t["member_id"], t["amount"]) != (op.kind, op.member, op.points):
            problems.append(f"{name}: journal has kind {t['kind']} member {t['member_id']} amount {t['amount']}")
        if not op.abandoned and f"txn_{t['transaction_id']}" != op.response.transaction_id:
            problems.append(f"{name}: answered {op.response.transaction_id}, journal txn_{t['transaction_id']}")
    if op.method == "Authorize" and applied and len(holds) == 1:
        h = holds[0]
        if (h["member_id"], h["amount"]) != (op.member, op.points):
            problems.append(f"{name}: hold of {h['amount']} on {h['member_id']}")
        if not op.abandoned and f"auth_{h['authorization_id']}" != op.response.authorization_id:
            problems.append(f"{name}: answered {op.response.authorization_id}, hold auth_{h['authorization_id']}")
    if op.method in ("Capture", "Void"):
        hold = journal.holds[int(op.request.authorization_id[5:])]
        resolution = (hold["status"], hold["captured"], hold["capture_transaction_id"])
        if not applied:
            expected = (1, 0, None)
        elif op.method == "Void":
            expected = (3, 0, None)
        else:
            expected = (2, op.points, transactions[0]["transaction_id"] if transactions else "?")
        if resolution != expected:
            problems.append(
                f"{name}: outcome {outcome or 'none'}, hold (status, captured, transaction) "
                f"{resolution}, expected {expected}"
            )
    return problems


def check_entries(journal: Journal) -> list[str]:
    """Every transaction has exactly its two entries: the member's and the merchant account's."""
    problems = []
    for transaction_id, t in journal.transactions.items():
        account, sign = MERCHANT_ENTRY[t["kind"]]
        expected = sorted(
            [
                ("member", t["member_id"], MEMBER_SIGN[t["kind"]] * t["amount"]),
                (account, t["merchant_id"], sign * t["amount"]),
            ]
        )
        if sorted(journal.entries.get(transaction_id, [])) != expected:
            problems.append(
                f"transaction {transaction_id}: entries {journal.entries.get(transaction_id)}, expected {expected}"
            )
    for transaction_id in journal.entries.keys() - journal.transactions.keys():
        problems.append(f"entries of unknown transaction {transaction_id}")
    return problems


def expected_balances(ops: list[Op], journal: Journal) -> dict[str, tuple[int, int]]:
    """Each member's (posted, held) as the outcomes imply: every answered OK, plus every abandoned
    call Postgres recorded as applied."""
    posted: dict[str, int] = collections.defaultdict(int)
    opened: dict[int, Op] = {}
    resolved: set[int] = set()
    for op in ops:
        if outcome_of(op, journal) != "OK":
            continue
        if op.method == "Authorize":
            if op.abandoned:
                authorization_id = journal.holds_by_key[op.key][0]["authorization_id"]
            else:
                authorization_id = int(op.response.authorization_id[5:])
            opened[authorization_id] = op
        elif op.method == "Void":
            resolved.add(int(op.request.authorization_id[5:]))
        else:
            if op.method == "Capture":
                resolved.add(int(op.request.authorization_id[5:]))
            posted[op.member] += MEMBER_SIGN[op.kind] * op.points
    held: dict[str, int] = collections.defaultdict(int)
    for authorization_id, op in opened.items():
        if authorization_id not in resolved:
            held[op.member] += op.points
    return {member: (posted[member], held[member]) for member in posted.keys() | held.keys()}


REFUSABLE = frozenset({"Authorize", "Redeem", "Refund"})  # not enough points (a refund: earned points spent)


def unexpected_answer(op: Op) -> str | None:
    """What is wrong with an answer, if it is not a decision the ledger could take on this request."""
    if op.code != "OK":
        if op.code == "FAILED_PRECONDITION" and op.method in REFUSABLE:
            return None
        return f"{op.method} {op.key[1]} answered {op.code}: {op.response}"
    if op.method == "Refund" and op.response.kind != op.kind:
        return f"Refund {op.key[1]} answered kind {op.response.kind}, expected {op.kind}"
    if op.method != "Void" and op.response.points != op.points:
        return f"{op.method} {op.key[1]} answered {op.response.points} point-units, expected {op.points}"
    return None


def replay(stub, op: Op) -> str | None:
    """Sends an answered operation once more: it must get the identical answer."""
    try:
        response, flag = call_once(getattr(stub, op.method), op.request)
    except grpc.RpcError as error:
        if (error.code().name, error.details()) != (op.code, op.response):
            return (
                f"{op.method} {op.key[1]}: first {op.code} {op.response!r}, replay {error.code().name} "
                f"{error.details()!r}"
            )
        return None
    if op.code != "OK" or wire(response) != wire(op.response) or flag != "true":
        return f"{op.method} {op.key[1]}: first {op.code} {op.response!r}, replay OK {response!r} (trailer {flag})"
    return None


@pytest.fixture
def board():
    board = Board()
    yield board
    board.close()


def test_sigkill_mid_traffic_loses_nothing_acknowledged_and_half_applies_nothing(
    create_database, service_factory, rng, board
):
    url = create_database()
    merchants = {unique("m"): 1000, unique("m"): 500}
    for merchant, give_back_bps in merchants.items():
        add_merchant(url, merchant, give_back_bps)
    running = service_factory(url)
    board.connect(running)
    progress = Progress()
    members = [unique("mem") for _ in range(MEMBERS)]
    setup = Client(board, progress, members, merchants, rng, abandons=False)
    first_merchant = next(iter(merchants))
    for member in members:
        setup.issue(
            "Earn",
            pb.EarnRequest(
                merchant_id=first_merchant, member_id=member, purchase_amount=50_000, idempotency_key=unique("k")
            ),
            give_back_bps=merchants[first_merchant],
        )
    assert [op.code for op in setup.ops] == ["OK"] * MEMBERS

    clients = [
        Client(board, progress, members, merchants, random.Random(rng.random()), abandons=index % 2 == 0)
        for index in range(CLIENTS)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=client.run, args=(stop,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    try:
        for _ in range(KILLS):
            # a random moment while traffic flows: after a random number of further acknowledgements,
            # then a random pause (a batch takes milliseconds, so the kill lands in any of its phases)
            assert progress.wait_for(progress.acknowledged + rng.randint(50, 800), timeout=60), (
                progress.problems or "the clients made no progress"
            )
            time.sleep(rng.uniform(0, 0.05))
            running.kill()
            running = service_factory(url)
            board.connect(running)
        assert progress.wait_for(progress.acknowledged + 500, timeout=60), (
            progress.problems or "no progress after the last restart"
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=2 * RETRYING_SECONDS_MAX)
    assert progress.problems == []
    assert not any(thread.is_alive() for thread in threads), "a client is still retrying"

    ops = setup.ops + [op for client in clients for op in client.ops]
    interrupted = [op for op in ops if op.interrupted]
    abandoned = [op for op in ops if op.abandoned]
    assert interrupted, "no call was in flight at any of the crashes"
    assert [problem for op in ops if not op.abandoned and (problem := unexpected_answer(op))] == []
    journal = read_journal(url)
    print(
        f"{len(ops)} operations, {len(interrupted)} interrupted by a crash, {len(abandoned)} abandoned "
        f"({sum(op.key in journal.idempotency for op in abandoned)} of them committed), "
        f"{sum(op.replayed for op in ops)} answered by a replay of a committed outcome"
    )
    problems = []
    for op in ops:
        problems += check_in_journal(op, outcome_of(op, journal), journal)
    assert problems == []
    assert check_entries(journal) == []
    issued = {op.key for op in ops}
    assert set(journal.idempotency) - issued == set(), "idempotency records of calls nobody made"
    assert set(journal.transactions_by_key) - issued == set(), "transactions of calls nobody made"
    assert set(journal.holds_by_key) - issued == set(), "holds of calls nobody made"

    expected = expected_balances(ops, journal)
    assert set(expected) == set(members)
    stub = board.stub
    for member in members:
        posted, held = expected[member]
        assert balance(stub, member) == (posted, held, posted - held), member
        assert member_in_postgres(url, member) == (posted, posted, held), member
    assert ledger_discrepancies(url) == []

    # one key, one outcome, across the crashes: every answered call replays its answer and moves nothing
    before = ledger_snapshot(url)
    answered = [op for op in ops if not op.abandoned]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        mismatches = [problem for problem in pool.map(lambda op: replay(stub, op), answered) if problem]
    assert mismatches == []
    assert ledger_snapshot(url) == before
