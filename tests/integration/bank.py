"""The bank check under faults (issue 13, section 8), shared by tests/integration/test_bank.py (a few
rounds) and tests/soak.py (`make soak`, many).

Several client threads move points among members and merchants — Earn, Redeem, Authorize+Capture,
Authorize+Void, Refund, and with a program in force split-tender and vouchers-only holds and redeems —
each call with its own idempotency key, retried with the SAME key on UNAVAILABLE, DEADLINE_EXCEEDED,
CANCELLED and RESOURCE_EXHAUSTED until it is answered. Meanwhile a fault loop SIGKILLs the service and
starts it again, SIGSTOPs it for a while then SIGCONTs it, or restarts Postgres (pg_ctl restart -m fast on
a Postgres the test owns); with a clock (libfaketime), it steps the service's wall clock forward or back;
on a Postgres with fill() and free(), it fills the data directory's filesystem. After every round, with the traffic stopped:

- every hold still open is captured by its own merchant (it must be capturable);
- conservation: the journal sums to zero per asset, and every transaction per asset;
- no member account (points or vouchers) is negative; every account's balance equals its entries;
- every acknowledged operation is in the journal exactly once: its idempotency record, its transaction
  (the id it was answered, under its key, of its member and amount) or its hold(s) (the authorization
  id it was answered, in `holds` when it holds points and in `voucher_holds` when it holds vouchers, and
  in no other hold table); the journal holds no call's transaction or hold that was not acknowledged;
- no transaction id and no authorization id was answered to two operations, and no authorization id
  names two different holds (a points hold and a voucher hold of different authorizations);
- batch times never go back: no transaction or hold is dated before one with a smaller id;
- GetBalance (posted, held, available, vouchers) equals the journal's sums and the open holds;
- a sample of the answered operations, sent again with their keys, gets the identical answers as
  replays and adds nothing to the journal;
- `python -m processor reconcile` passes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import random
import signal
import threading
import time
from typing import Callable

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from points.v1 import points_pb2 as pb
from tests.harness import ServiceProcess, add_merchant
from tests.integration.faketime import Clock
from tests.integration.helpers import call_once, cli, replay_flag, unique
from tests.integration.test_restart import Board, Progress

CLIENTS = 6
MEMBERS = 8
MERCHANTS = {"bank-a": 1000, "bank-b": 500, "bank-c": 2000}  # merchant -> give-back bps
CALL_TIMEOUT_SECONDS = 5
RETRY_PAUSE_SECONDS = 0.2
RETRYING_SECONDS_MAX = 60  # a call unanswered for this long is a failure of the check
COMMIT_TIMEOUT_SECONDS = 2
STOP_SECONDS = 3.0  # how long the service stays SIGSTOPped
ACKNOWLEDGED_BEFORE_FAULT = (30, 200)
ACKNOWLEDGED_AFTER_FAULT = 50  # answers wanted after a fault before the round ends
PROGRESS_WAIT_SECONDS = 60
DIVIDEND_CHECK_SECONDS = 0.2
PROGRAM_LEAD_SECONDS = 1.3  # a stored program version applies about 1 s after it is stored
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# a decision of the ledger that the traffic may get (not enough points or vouchers; an earn's points spent)
REFUSABLE = frozenset({"Authorize", "Redeem", "Refund"})
FAULTS = ("sigkill", "sigstop", "postgres-restart")  # "disk-full" needs a Postgres with fill() and free()
CLOCK_STEP_SECONDS_MAX = 2 * 3600  # "clock-step" needs a Bank with a clock
DISK_FULL_SECONDS = 2.0  # the disk stays full at least this long ...
DISK_FULL_REFUSED_MIN = 20  # ... and until this many calls were refused in it
HOLD_OPEN = 1
BALANCE_READS_MAX = 5
REPLAYS_PER_ROUND = 50  # answered operations sent again with their keys after each round
DIVIDENDS = {
    "dividends": {
        "threshold_point_units": 12_000,
        "growth_bps": 1_500,
        "rate_bps_schedule": [50, 100],
        "credit_limit_bps": 50_000,
    }
}


@dataclasses.dataclass(eq=False)
class BankOp:
    """One operation and its final answer (after every retry with the same key)."""

    method: str
    request: object
    code: str = ""  # "OK", a status code name, or "UNANSWERED" (gave up retrying)
    response: object = None  # OK: the response message; otherwise the details
    attempts: int = 0
    replayed: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.request.merchant_id, self.request.idempotency_key

    def __str__(self) -> str:
        return f"{self.method} {self.request.idempotency_key}"


def _parse_id(text: str, prefix: str) -> int | None:
    return int(text[len(prefix) :]) if text.startswith(prefix) and text[len(prefix) :].isdigit() else None


class BankClient:
    """One thread of traffic: a random mix of the operations on the bank's members and merchants."""

    def __init__(self, bank: "Bank", rng: random.Random):
        self.bank = bank
        self.rng = rng
        self.holds: list[BankOp] = []  # answered authorizes not yet resolved
        self.refundable: list[BankOp] = []  # answered earns, captures, redeems without vouchers

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set() and not self.bank.progress.problems:
                self.step()
        except Exception as error:  # noqa: BLE001 - reported by the check
            self.bank.progress.problem(f"client crashed: {error!r}")

    def _tender(self) -> tuple[int, int]:
        """(points, vouchers) of a spend: with vouchers only under a program, sometimes vouchers only."""
        rng = self.rng
        points = rng.randint(1, 1_500) if rng.random() < 0.95 else rng.randint(50_000, 100_000)  # some refused
        if not self.bank.program:
            return points, 0
        choice = rng.random()
        if choice < 0.3:
            return 0, rng.randint(1, 40)
        if choice < 0.6:
            return points, rng.randint(1, 40)
        return points, 0

    def step(self) -> None:
        rng, bank = self.rng, self.bank
        merchant, member = rng.choice(list(bank.merchants)), rng.choice(bank.members)
        choice = rng.random()
        if self.holds and choice < 0.2:
            hold = self.holds.pop(rng.randrange(len(self.holds)))
            if rng.random() < 0.6:
                self.capture(hold, partial=True)
            else:
                bank.call(
                    "Void",
                    pb.VoidRequest(
                        merchant_id=hold.request.merchant_id,
                        authorization_id=hold.response.authorization_id,
                        idempotency_key=unique("k"),
                    ),
                    must_succeed=True,
                )
        elif choice < 0.45:
            op = bank.call(
                "Earn",
                pb.EarnRequest(
                    merchant_id=merchant,
                    member_id=member,
                    purchase_amount=rng.randint(100, 30_000),
                    idempotency_key=unique("k"),
                ),
            )
            if op.code == "OK":
                self.refundable.append(op)
        elif choice < 0.65:
            points, vouchers = self._tender()
            op = bank.call(
                "Authorize",
                pb.AuthorizeRequest(
                    merchant_id=merchant,
                    member_id=member,
                    points=points,
                    vouchers=vouchers,
                    idempotency_key=unique("k"),
                ),
            )
            if op.code == "OK":
                self.holds.append(op)
        elif choice < 0.85 or not self.refundable:
            points, vouchers = self._tender()
            op = bank.call(
                "Redeem",
                pb.RedeemRequest(
                    merchant_id=merchant,
                    member_id=member,
                    points=points,
                    vouchers=vouchers,
                    idempotency_key=unique("k"),
                ),
            )
            if op.code == "OK" and not vouchers:
                self.refundable.append(op)
        else:
            original = self.refundable.pop(rng.randrange(len(self.refundable)))
            bank.call(
                "Refund",
                pb.RefundRequest(
                    merchant_id=original.request.merchant_id,
                    transaction_id=original.response.transaction_id,
                    points=rng.randint(1, max(1, original.response.points)),
                    idempotency_key=unique("k"),
                ),
            )

    def capture(self, hold: BankOp, partial: bool) -> BankOp:
        """Captures a hold at its own merchant: it was acknowledged and not resolved, so this must succeed."""
        request = pb.CaptureRequest(
            merchant_id=hold.request.merchant_id,
            authorization_id=hold.response.authorization_id,
            idempotency_key=unique("k"),
        )
        if partial and hold.request.points and not hold.request.vouchers:
            request.points = self.rng.randint(1, hold.request.points)
        op = self.bank.call("Capture", request, must_succeed=True)
        if op.code == "OK" and not hold.request.vouchers:
            self.refundable.append(op)
        return op


class Bank:
    """A database on a Postgres the test owns (restartable), the service on it, the members and merchants,
    and every operation sent so far."""

    def __init__(
        self,
        postgres,
        start_service: Callable[..., ServiceProcess],
        rng: random.Random,
        program: bool = False,
        say: Callable[[str], None] = print,
        clock: "Clock | None" = None,
    ):
        self.postgres = postgres
        self.clock = clock  # the service's wall clock (libfaketime), for the clock-step fault
        self.url = postgres.create_database()
        self._start_service = start_service
        self.rng = rng
        self.program = program
        self.say = say
        self.board = Board()
        self.progress = Progress()
        self.service: ServiceProcess | None = None
        self.merchants = dict(MERCHANTS)
        self.members = [unique("mem") for _ in range(MEMBERS)]
        self.ops: list[BankOp] = []
        self._lock = threading.Lock()
        self.clients = [BankClient(self, random.Random(rng.random())) for _ in range(CLIENTS)]
        self.rounds: collections.Counter[str] = collections.Counter()
        self.answers: list[tuple[float, str, str]] = []  # (time.monotonic(), code, details) of every attempt
        self.disk_full_answers: dict[str, int] = {}  # answers while the disk was full (the last time)
        self.restarting = False  # the fault loop is starting the service again
        self.disk_full_health = ""  # health while the disk was full (the last time)

    def start(self) -> "Bank":
        for merchant, give_back_bps in self.merchants.items():
            add_merchant(self.url, merchant, give_back_bps)
        if self.program:
            asyncio.run(_add_program_version(self.url))
        self.start_service()
        if self.program:
            time.sleep(PROGRAM_LEAD_SECONDS)  # the version is in force from here on
        for member in self.members:
            op = self.call(
                "Earn",
                pb.EarnRequest(
                    merchant_id="bank-a", member_id=member, purchase_amount=100_000, idempotency_key=unique("k")
                ),
            )
            assert op.code == "OK", (op.code, op.response)
        return self

    def start_service(self) -> ServiceProcess:
        extra = ["--commit-timeout-seconds", str(COMMIT_TIMEOUT_SECONDS)]
        if self.program:
            extra += ["--dividend-check-seconds", str(DIVIDEND_CHECK_SECONDS)]
        if self.clock is not None:
            self.service = self._start_service(self.url, *extra, env=self.clock.env)
        else:
            self.service = self._start_service(self.url, *extra)
        self.board.connect(self.service)
        return self.service

    def close(self) -> None:
        self.board.close()

    # --- traffic ---

    def call(self, method: str, request, must_succeed: bool = False) -> BankOp:
        """Sends one operation until it is answered, retrying with the same key; records it."""
        op = BankOp(method, request)
        with self._lock:
            self.ops.append(op)
        started = time.monotonic()
        while True:
            stub, generation = self.board.current()
            try:
                response, flag = call_once(getattr(stub, method), request, CALL_TIMEOUT_SECONDS)
                op.code, op.response, op.replayed = "OK", response, flag == "true"
                self.answers.append((time.monotonic(), "OK", ""))
                break
            except grpc.RpcError as error:
                self.answers.append((time.monotonic(), error.code().name, error.details() or ""))
                op.attempts += 1
                if error.code() not in RETRYABLE:
                    op.code, op.response = error.code().name, error.details() or ""
                    op.replayed = replay_flag(error) == "true"
                    break
                if self.service.process.poll() is not None and not self.restarting:
                    op.code, op.response = "UNANSWERED", f"the service exited ({self.service.process.returncode})"
                    self.progress.problem(f"{op} unanswered: {op.response}")
                    return op
                if time.monotonic() - started > RETRYING_SECONDS_MAX:
                    op.code, op.response = "UNANSWERED", f"{error.code().name}: {error.details()}"
                    self.progress.problem(f"{op} unanswered after {RETRYING_SECONDS_MAX} s of retries: {op.response}")
                    return op
            self.board.wait_for_restart(generation, RETRY_PAUSE_SECONDS)
        if op.code != "OK" and (must_succeed or op.code != "FAILED_PRECONDITION" or method not in REFUSABLE):
            self.progress.problem(f"{op} answered {op.code}: {op.response}")
        self.progress.acknowledge()
        return op

    def answers_since(self, since: float) -> collections.Counter[str]:
        """How many attempts were answered each code at or after `since`."""
        return collections.Counter(code for at, code, _ in list(self.answers) if at >= since)

    def traffic(self) -> "Traffic":
        return Traffic(self).start()

    # --- faults ---

    def fault(self, name: str) -> None:
        """One fault in the middle of traffic; the round waits for answers after it."""
        self.rounds[name] += 1
        if name == "sigkill":
            time.sleep(self.rng.uniform(0, 0.05))  # lands in any phase of a batch
            self.restarting = True
            try:
                self.service.kill()
                self.start_service()
            finally:
                self.restarting = False
        elif name == "sigstop":
            process = self.service.process
            os.kill(process.pid, signal.SIGSTOP)
            try:
                time.sleep(STOP_SECONDS)
            finally:
                os.kill(process.pid, signal.SIGCONT)
        elif name == "postgres-restart":
            self.postgres.restart()
        elif name == "disk-full":
            self._disk_full()
        elif name in ("clock-step", "clock-forward", "clock-back"):
            # to up to 2 h ahead of or behind the real clock (far inside the holds' 7-day TTL: every hold
            # stays capturable); "clock-step" picks the direction
            sign = {"clock-forward": 1, "clock-back": -1}.get(name) or self.rng.choice((-1, 1))
            self.clock.set(sign * self.rng.randint(CLOCK_STEP_SECONDS_MAX // 2, CLOCK_STEP_SECONDS_MAX))
        else:
            raise ValueError(f"unknown fault {name!r}; choose from {FAULTS}")

    def _disk_full(self) -> None:
        """Fills the filesystem of Postgres's data directory (self.postgres.fill()) until calls were
        refused UNAVAILABLE for DISK_FULL_SECONDS, checks that nothing else was answered meanwhile and the
        service still runs, then frees the space; the round then waits for calls to succeed again."""
        began = time.monotonic()
        self.postgres.fill()
        try:
            deadline = began + PROGRESS_WAIT_SECONDS
            while time.monotonic() < deadline and not self.progress.problems:
                answers = self.answers_since(began)
                if answers["UNAVAILABLE"] >= DISK_FULL_REFUSED_MIN and time.monotonic() - began >= DISK_FULL_SECONDS:
                    break
                time.sleep(0.05)
            answers = self.answers_since(began)
            assert answers["UNAVAILABLE"] >= DISK_FULL_REFUSED_MIN, (
                f"calls were not refused UNAVAILABLE while the disk was full: {dict(answers)}"
            )
            wrong = {
                (code, details)
                for at, code, details in list(self.answers)
                if at >= began and code not in ("OK", "UNAVAILABLE", "FAILED_PRECONDITION")
            }
            assert not wrong, f"answers while the disk was full other than UNAVAILABLE: {sorted(wrong)[:5]}"
            assert self.service.process.poll() is None, (
                f"the service exited with {self.service.process.returncode} while the disk was full"
            )
            self.disk_full_answers = dict(answers)
            # Postgres still answers reads: so do balances, and health stays SERVING (docs/GUARANTEES.md, disk full)
            self.disk_full_health = _health(self.service)
            self.board.stub.GetBalance(pb.GetBalanceRequest(member_id=self.members[0]), timeout=CALL_TIMEOUT_SECONDS)
        finally:
            self.postgres.free()

    def vouchers_only_hold_then_sigkill(self) -> BankOp:
        """With no other traffic: a vouchers-only hold is the newest authorization when the service is
        SIGKILLed and started again (so the next authorization id is derived after it). Returns it."""
        balances = {m: self.board.stub.GetBalance(pb.GetBalanceRequest(member_id=m), timeout=30) for m in self.members}
        member = max(self.members, key=lambda m: balances[m].vouchers)
        op = self.call(
            "Authorize",
            pb.AuthorizeRequest(
                merchant_id="bank-b", member_id=member, points=0, vouchers=1, idempotency_key=unique("k")
            ),
            must_succeed=True,
        )
        self.clients[0].holds.append(op)
        self.fault("sigkill")
        return op

    # --- the checks ---

    def capture_open_holds(self) -> list[BankOp]:
        """Every hold the clients still hold open is captured (all of it) by its own merchant."""
        captures = []
        for client in self.clients:
            while client.holds:
                captures.append(client.capture(client.holds.pop(), partial=False))
                if captures[-1].code == "UNANSWERED":  # the service stopped answering: said, and no use going on
                    for other in self.clients:
                        other.holds.clear()
                    return captures
        return captures

    def check(self) -> list[str]:
        """Every check of the module docstring; the problems found (empty: the bank balances)."""
        with self._lock:
            ops = list(self.ops)
        problems, self.progress.problems = list(self.progress.problems), []
        journal = asyncio.run(_read(self.url))
        problems += check_conservation(journal)
        problems += check_acknowledged(ops, journal)
        problems += check_ids(ops, journal)
        problems += check_nothing_else(ops, journal)
        problems += check_time_order(journal)
        if self.service.process.poll() is not None:
            critical = [line.strip()[:600] for line in list(self.service.log_lines) if '"level": "critical"' in line]
            return (
                [f"the service exited with {self.service.process.returncode}: {critical[:2]}"]
                + problems
                + _reconcile(self.url)
            )
        # the service posts dividend rounds without traffic: compare GetBalance with a journal that did
        # not change while it was read
        shown = []
        for _ in range(BALANCE_READS_MAX):
            shown = check_service_balances(self.board.stub, self.members, journal)
            again = asyncio.run(_read(self.url))
            if (
                again.transactions.keys() == journal.transactions.keys()
                and again.held == journal.held
                or any(problem.startswith("GetBalance ") for problem in shown)
            ):  # the call failed
                break
            journal = again
        if shown:
            unposted = asyncio.run(_unposted_dividends(self.url))
            time.sleep(1)
            later = check_service_balances(self.board.stub, self.members, asyncio.run(_read(self.url)))
            verdict = "still disagree" if later else "agree: GetBalance ran ahead of the journal read after it"
            shown.append(
                f"(dividend allocations not posted yet, by member: {unposted}; a second later GetBalance "
                f"and the journal {verdict})"
            )
        return problems + shown + self.check_replays(ops) + _reconcile(self.url)

    def check_replays(self, ops: list[BankOp]) -> list[str]:
        """A sample of the answered operations sent again with their keys: each gets its first answer,
        marked as a replay, and the journal gains no transaction or hold."""
        answered = [op for op in ops if op.code in ("OK", "FAILED_PRECONDITION")]
        sample = self.rng.sample(answered, min(REPLAYS_PER_ROUND, len(answered)))
        before = asyncio.run(_read(self.url))
        problems = []
        for op in sample:
            try:
                response, flag = call_once(getattr(self.board.stub, op.method), op.request, CALL_TIMEOUT_SECONDS)
                again = ("OK", response.SerializeToString(deterministic=True), flag)
            except grpc.RpcError as error:
                again = (error.code().name, error.details(), replay_flag(error))
            first = (
                op.code,
                op.response.SerializeToString(deterministic=True) if op.code == "OK" else op.response,
                "true",
            )
            if again != first:
                problems.append(f"{op}: first answered {first[:2]}, sent again {again}")
        after = asyncio.run(_read(self.url))
        for what, old, new in (
            ("transactions", before.transactions_by_key, after.transactions_by_key),
            ("holds", before.hold_keys, after.hold_keys),
        ):
            grown = {key for key in new if key not in old and key in {op.key for op in sample}}
            if grown:
                problems.append(f"sending answered operations again added {what} under {sorted(grown)[:5]}")
        return problems

    def summary(self) -> str:
        codes = collections.Counter(op.code for op in self.ops)
        retried = sum(op.attempts > 0 and op.code == "OK" for op in self.ops)
        return (
            f"{len(self.ops)} operations ({dict(codes)}), {retried}"
            f" acknowledged after a retry, {sum(op.replayed for op in self.ops)} by a replay; "
            f"faults {dict(self.rounds)}"
        )


def _health(service: ServiceProcess) -> str:
    """grpc.health.v1 status of the points service (health needs no credential)."""
    with grpc.insecure_channel(service.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="points.v1.PointsService"), timeout=CALL_TIMEOUT_SECONDS
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _reconcile(url: str) -> list[str]:
    """`python -m processor reconcile`, as an operator runs it: exit 0 when every invariant holds."""
    reconciled = cli("reconcile", "--database-url", url)
    if reconciled.returncode != 0:
        return [f"reconcile exited {reconciled.returncode}: {(reconciled.stdout + reconciled.stderr)[-2000:]}"]
    return []


class Traffic:
    def __init__(self, bank: Bank):
        self.bank = bank
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=client.run, args=(self._stop,), daemon=True) for client in bank.clients
        ]

    def start(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def wait_for_acknowledged(self, more: int) -> None:
        progress = self.bank.progress
        assert progress.wait_for(progress.acknowledged + more, PROGRESS_WAIT_SECONDS), (
            progress.problems or f"the clients did not get {more} more answers in {PROGRESS_WAIT_SECONDS} s"
        )

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=RETRYING_SECONDS_MAX + 2 * CALL_TIMEOUT_SECONDS)
        assert not any(thread.is_alive() for thread in self._threads), "a client is still retrying"


def run_round(bank: Bank, fault: str) -> list[str]:
    """Traffic, one fault in its middle, more traffic; then the open holds are captured and every check
    runs (also when the traffic stopped at a wrong answer). The problems found (empty: all held)."""
    stalled = []
    traffic = bank.traffic()
    try:
        traffic.wait_for_acknowledged(bank.rng.randint(*ACKNOWLEDGED_BEFORE_FAULT))
        bank.fault(fault)
        traffic.wait_for_acknowledged(ACKNOWLEDGED_AFTER_FAULT)
    except AssertionError as error:
        if not bank.progress.problems:  # otherwise the clients' problems say it
            stalled.append(f"{fault}: {error}")
    finally:
        traffic.stop()
    bank.capture_open_holds()
    return stalled + bank.check()


# ---------------------------------------------------------------------------------------------------
# What Postgres holds


@dataclasses.dataclass
class Journal:
    asset_totals: dict[str, int]
    unbalanced: list[tuple[int, str, int]]  # (transaction_id, asset, sum) with sum != 0
    accounts: list[asyncpg.Record]  # kind, owner_id, asset_code, balance, entries
    transactions: dict[int, asyncpg.Record]
    transactions_by_key: dict[tuple[str, str], list[asyncpg.Record]]
    holds: dict[int, asyncpg.Record]
    voucher_holds: dict[int, asyncpg.Record]
    idempotency: dict[tuple[str, str], tuple[str, str]]
    held: dict[str, int]  # member -> point-units under open, unexpired holds
    hold_keys: set[tuple[str, str]]  # (merchant_id, idempotency_key) of every points hold


async def _read(url: str) -> Journal:
    from tests.projection import wait_projected_async

    await wait_projected_async(url)  # the answered batches' rows are written by the projector
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            totals = await connection.fetch("SELECT asset_code, sum(amount)::bigint AS total FROM entries GROUP BY 1")
            unbalanced = await connection.fetch(
                """SELECT transaction_id, asset_code, sum(amount)::bigint AS total FROM entries GROUP BY 1, 2
                   HAVING sum(amount) <> 0"""
            )
            accounts = await connection.fetch(
                """SELECT b.kind, b.owner_id, b.asset_code, b.balance,
                          (SELECT coalesce(sum(e.amount), 0)::bigint FROM entries e
                           WHERE e.account_id = b.account_id) AS entries
                   FROM account_balances b"""
            )
            transactions = await connection.fetch(
                """SELECT transaction_id, kind, merchant_id, member_id, amount, authorization_id,
                          original_transaction_id, idempotency_key, created_at FROM transactions"""
            )
            holds = await connection.fetch(
                """SELECT authorization_id, merchant_id, member_id, amount, status, expires_at > now() AS unexpired,
                          idempotency_key, capture_transaction_id, created_at FROM holds"""
            )
            voucher_holds = await connection.fetch(
                """SELECT authorization_id, merchant_id, member_id, vouchers, points, status, transaction_id
                   FROM voucher_holds"""
            )
            keys = await connection.fetch("SELECT merchant_id, idempotency_key, method, outcome FROM idempotency_keys")
    finally:
        await connection.close()
    by_key = collections.defaultdict(list)
    for t in transactions:
        by_key[(t["merchant_id"], t["idempotency_key"])].append(t)
    held: dict[str, int] = collections.defaultdict(int)
    for h in holds:
        if h["status"] == HOLD_OPEN and h["unexpired"]:
            held[h["member_id"]] += h["amount"]
    return Journal(
        {r["asset_code"]: r["total"] for r in totals},
        [(r["transaction_id"], r["asset_code"], r["total"]) for r in unbalanced],
        accounts,
        {t["transaction_id"]: t for t in transactions},
        by_key,
        {h["authorization_id"]: h for h in holds},
        {h["authorization_id"]: h for h in voucher_holds},
        {(k["merchant_id"], k["idempotency_key"]): (k["method"], k["outcome"]) for k in keys},
        held,
        {(h["merchant_id"], h["idempotency_key"]) for h in holds},
    )


def check_conservation(journal: Journal) -> list[str]:
    problems = [
        f"the journal's {asset} entries sum to {total}, not 0"
        for asset, total in journal.asset_totals.items()
        if total != 0
    ]
    problems += [f"transaction {t}: its {asset} entries sum to {total}" for t, asset, total in journal.unbalanced[:20]]
    for a in journal.accounts:
        if a["kind"] == "member" and a["balance"] < 0:
            problems.append(f"member {a['owner_id']} has a negative {a['asset_code']} balance {a['balance']}")
        if a["balance"] != a["entries"]:
            problems.append(
                f"{a['kind']} {a['owner_id']} {a['asset_code']}: balance {a['balance']}, entries sum {a['entries']}"
            )
    return problems


_PLAIN_KINDS = frozenset({1, 2, 3, 4, 5})  # one asset, `amount` = the points answered
_TRANSACTION_KINDS = {"Earn": {1}, "Capture": {2, 12}, "Redeem": {3, 12}, "Refund": {4, 5, 13}}


def check_acknowledged(ops: list[BankOp], journal: Journal) -> list[str]:
    """Each answered operation left exactly its rows: its idempotency record with its outcome, and if it
    was applied, its one transaction under the id it was answered, or its hold(s) under its authorization
    id; a refused one left no transaction or hold."""
    problems = []
    for op in ops:
        if op.code == "UNANSWERED":
            continue  # already a problem
        record = journal.idempotency.get(op.key)
        if record != (op.method, op.code):
            problems.append(f"{op}: answered {op.code}, idempotency record {record}")
        mine = [
            t for t in journal.transactions_by_key.get(op.key, []) if t["kind"] in _TRANSACTION_KINDS.get(op.method, ())
        ]
        if op.code != "OK":
            if mine or op.key in journal.hold_keys:
                problems.append(
                    f"{op}: refused {op.code}, yet {len(mine)} transactions and "
                    f"{int(op.key in journal.hold_keys)} holds in the journal under its key"
                )
            continue
        hold = journal.holds.get(_parse_id(op.response.authorization_id, "auth_")) if op.method == "Authorize" else None
        if op.method in _TRANSACTION_KINDS:
            transaction_id = _parse_id(op.response.transaction_id, "txn_")
            row = journal.transactions.get(transaction_id)
            if len(mine) != 1:
                problems.append(
                    f"{op}: acknowledged as {op.response.transaction_id}, {len(mine)} transactions "
                    f"under its key: {[t['transaction_id'] for t in mine]}"
                )
            if row is None:
                problems.append(f"{op}: acknowledged as {op.response.transaction_id}, which is not in the journal")
            elif (row["merchant_id"], row["idempotency_key"]) != op.key:
                problems.append(
                    f"{op}: acknowledged as {op.response.transaction_id}, which the journal holds for "
                    f"{row['merchant_id']} {row['idempotency_key']} (kind {row['kind']})"
                )
            elif op.method in ("Earn", "Redeem") and row["member_id"] != op.request.member_id:
                problems.append(f"{op}: {op.response.transaction_id} is of member {row['member_id']}")
            elif row["kind"] in _PLAIN_KINDS and op.response.points != row["amount"]:
                problems.append(f"{op}: answered {op.response.points} point-units, journal {row['amount']}")
        if op.method in ("Capture", "Void"):
            problems += _check_resolution(op, journal)
        elif op.method == "Authorize":
            authorization_id = _parse_id(op.response.authorization_id, "auth_")
            voucher_hold = journal.voucher_holds.get(authorization_id)
            if op.request.points:
                if hold is None:
                    problems.append(f"{op}: acknowledged as {op.response.authorization_id}, no hold of points")
                elif (hold["merchant_id"], hold["idempotency_key"], hold["member_id"], hold["amount"]) != (
                    *op.key,
                    op.request.member_id,
                    op.request.points,
                ):
                    problems.append(
                        f"{op}: acknowledged as {op.response.authorization_id}, whose points hold is {dict(hold)}"
                    )
            elif hold is not None:
                problems.append(
                    f"{op}: a vouchers-only hold answered {op.response.authorization_id}, which is also "
                    f"the points hold {dict(hold)} of another authorization"
                )
            if op.request.vouchers:
                if voucher_hold is None:
                    problems.append(f"{op}: acknowledged as {op.response.authorization_id}, no voucher hold")
                elif (
                    voucher_hold["merchant_id"],
                    voucher_hold["member_id"],
                    voucher_hold["vouchers"],
                    voucher_hold["points"],
                ) != (op.key[0], op.request.member_id, op.request.vouchers, op.request.points):
                    problems.append(
                        f"{op}: acknowledged as {op.response.authorization_id}, whose voucher hold is "
                        f"{dict(voucher_hold)}"
                    )
            elif voucher_hold is not None:
                problems.append(
                    f"{op}: a points-only hold answered {op.response.authorization_id}, which is also "
                    f"the voucher hold {dict(voucher_hold)} of another authorization"
                )
    return problems


_CAPTURED, _VOIDED = 2, 3


def _check_resolution(op: BankOp, journal: Journal) -> list[str]:
    """An acknowledged capture or void resolved its hold in every hold table that holds it: captured by
    the transaction it was answered, or voided."""
    authorization_id = _parse_id(op.request.authorization_id, "auth_")
    rows = [
        (what, table[authorization_id])
        for what, table in (("holds", journal.holds), ("voucher_holds", journal.voucher_holds))
        if authorization_id in table
    ]
    if not rows:
        return [f"{op}: acknowledged, but {op.request.authorization_id} is in no hold table"]
    problems = []
    for what, row in rows:
        if op.method == "Void":
            expected = (_VOIDED, None)
        else:
            expected = (_CAPTURED, _parse_id(op.response.transaction_id, "txn_"))
        seen = (row["status"], row["capture_transaction_id"] if what == "holds" else row["transaction_id"])
        if seen != expected:
            problems.append(
                f"{op}: acknowledged, but {what} has {op.request.authorization_id} as (status, "
                f"transaction) {seen}, expected {expected}"
            )
    return problems


_CALLERS_KINDS = frozenset({1, 2, 3, 4, 5, 12, 13})  # transactions only a call makes (not dividends, expiry...)


def check_nothing_else(ops: list[BankOp], journal: Journal) -> list[str]:
    """The journal holds nothing nobody was acknowledged: no transaction of a call under a key no call
    used, and exactly one hold row per acknowledged hold (so a refused or unanswered one left none)."""
    keys = {op.key for op in ops}
    problems = [
        f"txn_{t['transaction_id']} (kind {t['kind']}) under {t['idempotency_key']}, which no call used"
        for t in journal.transactions.values()
        if t["kind"] in _CALLERS_KINDS and (t["merchant_id"], t["idempotency_key"]) not in keys
    ][:20]
    held = [op for op in ops if op.method == "Authorize" and op.code == "OK"]
    for what, table, wanted in (
        ("holds", journal.holds, [op for op in held if op.request.points]),
        ("voucher_holds", journal.voucher_holds, [op for op in held if op.request.vouchers]),
    ):
        if len(table) != len(wanted):
            problems.append(f"{len(table)} rows in {what}, {len(wanted)} acknowledged authorizations hold there")
    return problems


def check_time_order(journal: Journal) -> list[str]:
    """Batch times never go back (docs/GUARANTEES.md, clock steps): a transaction or hold with a larger id (committed
    later) is never dated before one with a smaller id."""
    problems = []
    for prefix, rows in (("txn_", journal.transactions), ("auth_", journal.holds)):
        ordered = sorted(rows.items())
        problems += [
            f"{prefix}{later} dated {b['created_at'].isoformat()}, before {prefix}{earlier} "
            f"({a['created_at'].isoformat()})"
            for (earlier, a), (later, b) in zip(ordered, ordered[1:])
            if b["created_at"] < a["created_at"]
        ][:10]
    return problems


def check_ids(ops: list[BankOp], journal: Journal) -> list[str]:
    """No id answered to two operations; a hold's id names one authorization in both hold tables."""
    problems = []
    for field in ("transaction_id", "authorization_id"):
        answered = collections.defaultdict(list)
        for op in ops:
            if (
                op.code == "OK"
                and hasattr(op.response, field)
                and op.method in (_TRANSACTION_KINDS.keys() if field == "transaction_id" else ("Authorize",))
            ):
                answered[getattr(op.response, field)].append(op)
        for value, owners in answered.items():
            if len(owners) > 1:
                problems.append(f"{value} was answered to {len(owners)} operations: {[str(o) for o in owners]}")
    for authorization_id in journal.holds.keys() & journal.voucher_holds.keys():
        hold, voucher_hold = journal.holds[authorization_id], journal.voucher_holds[authorization_id]
        if (hold["merchant_id"], hold["member_id"], hold["amount"]) != (
            voucher_hold["merchant_id"],
            voucher_hold["member_id"],
            voucher_hold["points"],
        ):
            problems.append(
                f"auth_{authorization_id} names two holds: points {dict(hold)}, vouchers {dict(voucher_hold)}"
            )
    return problems


def check_service_balances(stub, members: list[str], journal: Journal) -> list[str]:
    """GetBalance shows what the journal holds: posted and vouchers = the member's entries; held = its
    open unexpired holds of points; available = posted - held, never negative."""
    problems = []
    entries = {(a["owner_id"], a["asset_code"]): a["entries"] for a in journal.accounts if a["kind"] == "member"}
    for member in members:
        try:
            shown = stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            problems.append(f"GetBalance {member}: {error.code().name} {error.details()}")
            continue
        posted, held = entries.get((member, "POINTS"), 0), journal.held.get(member, 0)
        expected = (posted, held, posted - held, entries.get((member, "VOUCHERS"), 0))
        if (shown.posted, shown.held, shown.available, shown.vouchers) != expected:
            problems.append(
                f"{member}: GetBalance (posted, held, available, vouchers) "
                f"{(shown.posted, shown.held, shown.available, shown.vouchers)}, the journal {expected}"
            )
        if shown.available < 0:
            problems.append(f"{member}: available {shown.available} < 0")
    return problems


async def _unposted_dividends(url: str) -> dict[str, int]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            """SELECT holder_id, sum(amount)::bigint AS amount FROM dividend_allocations
               WHERE transaction_id IS NULL AND holder_kind = 'member' GROUP BY 1"""
        )
    finally:
        await connection.close()
    return {r["holder_id"]: r["amount"] for r in rows}


async def _add_program_version(url: str) -> None:
    from processor.store import Store

    store = await Store.open(url, 2)
    try:
        await store.migrate()
        await store.add_program_version("alliance", None, DIVIDENDS, "tests")
    finally:
        await store.close()
