"""One hot account: about 2,000 earns, redeems and authorize+captures on ONE member at ONE merchant,
all in flight at once. Whatever the service did concurrently must be a serial execution of the same
operations: this test finds that serial order from what the service reported and checks it reproduces
every answer, every rejection, the final balance and Postgres.

How the serial order is found, and why the check is sound
----------------------------------------------------------
The committer applies operations one at a time, in batches, and only then answers them. What a client
can observe about that order:

* Each batch writes one `created_at` (its start time) on every row it writes: transactions, holds and
  idempotency records, rejections included (they are recorded under their key). So `created_at` of an
  operation's idempotency record names its batch, for successes and rejections alike. Batches are
  strictly sequential; we order them by `created_at` and check that this agrees with the id order below
  (if two batches ever shared a `created_at`, treating them as one only widens a window: still sound).
* Transaction ids (earn, redeem, capture) are allocated in the order operations are applied; so are
  authorization ids among authorizes. Within a batch, the order of the transaction operations is thus
  known, and so is the order of the authorizes, but not how the two sequences interleave, nor where a
  rejection fell.
* Every answer carries the member's state right after the operation: `balance` (posted) for earns,
  redeems and captures, `available` for redeems, authorizes and captures.

The check, batch by batch, starting from the state the previous batch left:
1. posted only moves with transaction operations, so replaying them in transaction-id order must give
   exactly each reported `balance` (a lost, doubled or reordered update breaks this);
2. held moves with authorizes (+points) and captures (−the hold), so the state after "i transaction
   operations and j authorizes" is determined by (i, j). A search over the grid finds the interleavings
   (monotone paths from (0, 0) to (all, all)) in which every transaction operation and every authorize
   reproduces its reported `available`, no available balance is ever negative, and a capture comes after
   its authorize. At least one must exist;
3. a rejection (redeem or authorize refused for insufficient points) changes nothing, so it can sit at
   any point of its batch. It is justified if some point of a valid interleaving has available < points
   asked. All rejections of a batch must be justified by ONE interleaving: the search keeps, per grid
   cell, the lowest available balance along the best path to it, and the lowest at the end must be below
   every rejected amount. Each rejection's message also states the available balance it saw; that exact
   value must occur at a point of some valid interleaving.
The state after the batch is the grid's end, whichever path was taken; after the last batch it must
equal GetBalance, the member's account in Postgres and the sum of its journal entries.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import re

import grpc
import pytest

from points.v1 import points_pb2 as pb
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import balance, member_in_postgres, replay_flag, unique

pytestmark = pytest.mark.timeout(300)

INITIAL_POINTS = 20_000
EARNS, REDEEMS, AUTHORIZES = 700, 700, 300  # + one capture per granted hold + duplicates ≈ 2,000 calls
DUPLICATED = 40  # earns and as many redeems sent twice under the same key
GIVE_BACK_BPS = 1_000
CALL_TIMEOUT_SECONDS = 120
AVAILABLE_IN_MESSAGE = re.compile(r"has (\d+) point-units available, (\d+) asked")


@pytest.fixture(scope="module")
def service(create_database):
    # small batches: many hand-overs of the hot account's state between Postgres transactions
    service = ServiceProcess(create_database(), "--batch-operations-max", "100").start()
    yield service
    service.kill()


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown with a failure
    return random.Random(seed)


@dataclasses.dataclass(eq=False)
class Op:
    method: str
    request: object
    hold: "Op | None" = None  # a capture's authorize
    mode: str = ""  # a capture's: whole | partial | over
    future: object = None
    duplicate: object = None  # the future of the same request sent again under the same key
    response: object = None
    error: grpc.RpcError | None = None
    batch: object = None  # created_at of its idempotency record

    @property
    def key(self) -> str:
        return self.request.idempotency_key

    @property
    def points(self) -> int:
        return self.request.points

    def settle(self) -> None:
        try:
            self.response = self.future.result()
        except grpc.RpcError as error:
            self.error = error

    def describe(self) -> str:
        outcome = (
            f"{self.error.code().name} {self.error.details()!r}"
            if self.error
            else str(self.response).replace("\n", " ")
        )
        return f"{self.method}({str(self.request).replace(chr(10), ' ')}) -> {outcome}"


def delta(op: Op) -> int:
    """The change of the member's posted balance by a successful transaction operation."""
    if op.method == "Earn":
        return op.response.points
    return -op.response.points  # redeem, capture


def transaction_number(op: Op) -> int:
    return int(op.response.transaction_id.removeprefix("txn_"))


def authorization_number(op: Op) -> int:
    return int(op.response.authorization_id.removeprefix("auth_"))


def run_workload(stub, merchant: str, member: str, rng: random.Random) -> list[Op]:
    """Fires every earn, redeem and authorize at once; a capture goes out as soon as its hold is granted."""
    ops = []
    for _ in range(EARNS):
        ops.append(
            Op(
                "Earn",
                pb.EarnRequest(
                    merchant_id=merchant,
                    member_id=member,
                    purchase_amount=rng.randint(1, 1_000),
                    idempotency_key=unique("e"),
                ),
            )
        )
    for _ in range(REDEEMS):
        ops.append(
            Op(
                "Redeem",
                pb.RedeemRequest(
                    merchant_id=merchant, member_id=member, points=rng.randint(1, 150), idempotency_key=unique("r")
                ),
            )
        )
    for _ in range(AUTHORIZES):
        ops.append(
            Op(
                "Authorize",
                pb.AuthorizeRequest(
                    merchant_id=merchant, member_id=member, points=rng.randint(1, 200), idempotency_key=unique("a")
                ),
            )
        )
    rng.shuffle(ops)
    duplicated = set(
        rng.sample([op for op in ops if op.method == "Earn"], DUPLICATED)
        + rng.sample([op for op in ops if op.method == "Redeem"], DUPLICATED)
    )
    granted: queue.Queue[Op] = queue.Queue()
    captures: list[Op] = []
    later: list[tuple[int, Op]] = []  # (position, op): duplicates go out a little after their original

    def send(op: Op):
        return getattr(stub, op.method).future(op.request, timeout=CALL_TIMEOUT_SECONDS)

    def capture_granted(block: bool) -> None:
        while True:
            try:
                authorize = granted.get(block=block, timeout=CALL_TIMEOUT_SECONDS)
            except queue.Empty:
                return
            block = False
            if authorize.future.exception() is not None:
                continue
            held = authorize.future.result().points
            choice = random.Random(authorize.key)  # independent of the order holds were granted in
            mode = choice.choices(["whole", "partial", "over"], weights=[4, 4, 2])[0]
            if mode == "whole":
                points = 0
            elif mode == "partial":
                points = choice.randint(1, held)
            else:
                points = held + choice.randint(1, 20)
            capture = Op(
                "Capture",
                pb.CaptureRequest(
                    merchant_id=merchant,
                    authorization_id=authorize.future.result().authorization_id,
                    points=points,
                    idempotency_key=unique("c"),
                ),
                hold=authorize,
                mode=mode,
            )
            capture.future = send(capture)
            captures.append(capture)

    for position, op in enumerate(ops):
        op.future = send(op)
        if op.method == "Authorize":
            op.future.add_done_callback(lambda _, op=op: granted.put(op))
        if op in duplicated:
            later.append((position + rng.randint(0, 30), op))
        for due in [entry for entry in later if entry[0] <= position]:
            later.remove(due)
            due[1].duplicate = send(due[1])
        capture_granted(block=False)
    for _, op in later:
        op.duplicate = send(op)
    while (
        len(captures)
        + sum(1 for op in ops if op.method == "Authorize" and op.future.done() and op.future.exception() is not None)
        < AUTHORIZES
    ):
        capture_granted(block=True)
    for op in ops + captures:
        op.settle()
    return ops + captures


def check_answers(ops: list[Op]) -> None:
    """Each answer is one this operation may give, whatever the order."""
    for op in ops:
        if op.method == "Earn":
            assert op.error is None, op.describe()
            assert op.response.points == op.request.purchase_amount * GIVE_BACK_BPS // 10_000, op.describe()
        elif op.method in ("Redeem", "Authorize"):
            if op.error is not None:
                assert op.error.code() == grpc.StatusCode.FAILED_PRECONDITION, op.describe()
                match = AVAILABLE_IN_MESSAGE.search(op.error.details())
                assert match and int(match.group(2)) == op.points, op.describe()
                assert int(match.group(1)) < op.points, f"refused although enough was available: {op.describe()}"
            else:
                assert op.response.points == op.points, op.describe()
        else:
            held = op.hold.response.points
            if op.mode == "over":
                assert op.error is not None and op.error.code() == grpc.StatusCode.FAILED_PRECONDITION, op.describe()
                assert "exceeds" in op.error.details(), op.describe()
            else:
                assert op.error is None, op.describe()  # the hold is open, unexpired and this merchant's
                captured = held if op.mode == "whole" else op.points
                assert (op.response.points, op.response.released) == (captured, held - captured), op.describe()
                assert op.response.transaction_id, op.describe()


def check_duplicates(ops: list[Op]) -> None:
    """A request sent twice under one key: one decision, the same answer twice, one of them a replay."""
    for op in ops:
        if op.duplicate is None:
            continue
        try:
            answer = op.duplicate.result()
            assert op.error is None and answer.SerializeToString() == op.response.SerializeToString(), (
                f"{op.describe()} but its duplicate answered {answer}"
            )
        except grpc.RpcError as error:
            assert op.error is not None and (error.code(), error.details()) == (op.error.code(), op.error.details()), (
                f"{op.describe()} but its duplicate answered {error.code().name} {error.details()!r}"
            )
        flags = sorted([replay_flag(op.future), replay_flag(op.duplicate)], key=str)
        assert flags == [None, "true"], f"{op.describe()}: replay flags of the two answers were {flags}"


def find_batches(database_url: str, merchant: str, ops: list[Op]) -> list[list[Op]]:
    """The operations grouped by batch (their idempotency record's created_at), batches in order."""
    rows = fetch(
        database_url,
        "SELECT idempotency_key, method, outcome, created_at FROM idempotency_keys WHERE merchant_id = $1",
        merchant,
    )
    records = {r["idempotency_key"]: r for r in rows}
    assert len(records) == len(ops) + 1, "every operation (and the funding earn) is recorded exactly once"
    by_batch: dict[object, list[Op]] = {}
    for op in ops:
        record = records[op.key]
        expected_outcome = "OK" if op.error is None else op.error.code().name
        assert (record["method"], record["outcome"]) == (op.method, expected_outcome), op.describe()
        op.batch = record["created_at"]
        by_batch.setdefault(op.batch, []).append(op)
    batches = [by_batch[moment] for moment in sorted(by_batch)]
    # the batch order agrees with the order ids were allocated in
    for number in (transaction_number, authorization_number):
        kinds = ("Earn", "Redeem", "Capture") if number is transaction_number else ("Authorize",)
        numbers = [
            number(op)
            for batch in batches
            for op in sorted((o for o in batch if o.method in kinds and o.error is None), key=number)
        ]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), (
            f"{number.__name__}s are not increasing with the batches' created_at"
        )
    return batches


def replay_batch(index: int, batch: list[Op], posted0: int, held0: int, authorized_before: set) -> tuple[int, int]:
    """Finds a serial order of `batch` from (posted0, held0) that reproduces every answer (see the
    module docstring); returns the state after it."""
    transactions = sorted(
        (op for op in batch if op.method in ("Earn", "Redeem", "Capture") and op.error is None), key=transaction_number
    )
    holds = sorted((op for op in batch if op.method == "Authorize" and op.error is None), key=authorization_number)
    rejections = [op for op in batch if op.method in ("Redeem", "Authorize") and op.error is not None]
    hold_position = {op: position for position, op in enumerate(holds)}
    n, m = len(transactions), len(holds)

    posted, released = [posted0], [0]
    for op in transactions:
        posted.append(posted[-1] + delta(op))
        released.append(released[-1] + (op.hold.response.points if op.method == "Capture" else 0))
        assert op.response.balance == posted[-1], (
            f"batch {index}: replaying posted balances in transaction order gives {posted[-1]} after {op.describe()}"
        )
    held_by_holds = [0]
    for op in holds:
        held_by_holds.append(held_by_holds[-1] + op.points)

    def available(i: int, j: int) -> int:
        return posted[i] - (held0 + held_by_holds[j] - released[i])

    def transaction_fits(i: int, j: int) -> bool:  # transactions[i] applied after j holds of the batch
        op = transactions[i]
        if op.method == "Earn":
            return True
        if op.method == "Capture" and not (op.hold in authorized_before or hold_position.get(op.hold, m) < j):
            return False
        return op.response.available == available(i + 1, j) >= 0

    def hold_fits(i: int, j: int) -> bool:  # holds[j] applied after i transactions of the batch
        return holds[j].response.available == available(i, j + 1) >= 0

    # forward: the lowest available balance along a valid path to each cell
    lowest: dict[tuple[int, int], int] = {(0, 0): available(0, 0)}
    for i in range(n + 1):
        for j in range(m + 1):
            if (i, j) not in lowest:
                continue
            for (ni, nj), fits in (
                ((i + 1, j), i < n and transaction_fits(i, j)),
                ((i, j + 1), j < m and hold_fits(i, j)),
            ):
                if fits:
                    value = min(lowest[(i, j)], available(ni, nj))
                    lowest[(ni, nj)] = min(lowest.get((ni, nj), value), value)
    assert (n, m) in lowest, (
        f"batch {index}: no serial order of its {n} transactions and {m} holds reproduces every answer "
        f"(starting from posted {posted0}, held {held0}):\n" + "\n".join(op.describe() for op in batch)
    )
    if rejections:
        assert lowest[(n, m)] < min(op.points for op in rejections), (
            f"batch {index}: no serial order leaves so little available that every rejection is justified; "
            f"lowest available {lowest[(n, m)]}:\n" + "\n".join(op.describe() for op in rejections)
        )
        # backward: cells from which the end is reachable; a cell on a full valid path is in both
        reaches_end = {(n, m)}
        for i in range(n, -1, -1):
            for j in range(m, -1, -1):
                if (i, j) in lowest and (
                    ((i + 1, j) in reaches_end and i < n and transaction_fits(i, j))
                    or ((i, j + 1) in reaches_end and j < m and hold_fits(i, j))
                ):
                    reaches_end.add((i, j))
        seen = {available(i, j) for (i, j) in reaches_end}
        for op in rejections:
            stated = int(AVAILABLE_IN_MESSAGE.search(op.error.details()).group(1))
            assert stated in seen, (
                f"batch {index}: {op.describe()} states an available balance that no serial "
                f"order of its batch passes through (possible: {sorted(seen)[:20]}…)"
            )
    authorized_before.update(holds)
    return posted[n], held0 + held_by_holds[m] - released[n]


def test_2000_concurrent_operations_on_one_member_equal_a_serial_execution(stub, service, rng):
    merchant = unique("hot")
    add_merchant(service.database_url, merchant, GIVE_BACK_BPS)
    member = unique("hotmem")
    funded = stub.Earn(
        pb.EarnRequest(
            merchant_id=merchant,
            member_id=member,
            purchase_amount=INITIAL_POINTS * 10_000 // GIVE_BACK_BPS,
            idempotency_key=unique("fund"),
        ),
        timeout=30,
    )
    assert funded.balance == INITIAL_POINTS

    ops = run_workload(stub, merchant, member, rng)
    check_answers(ops)
    check_duplicates(ops)
    outcomes = {(op.method, "OK" if op.error is None else "refused") for op in ops}
    # the workload is mixed enough to be meaningful: every kind both succeeded and (but earns) was refused
    assert outcomes >= {
        ("Earn", "OK"),
        ("Redeem", "OK"),
        ("Redeem", "refused"),
        ("Authorize", "OK"),
        ("Capture", "OK"),
        ("Capture", "refused"),
    }, outcomes

    batches = find_batches(service.database_url, merchant, ops)
    assert len(batches) > 1
    posted, held = INITIAL_POINTS, 0
    authorized_before: set = set()
    for index, batch in enumerate(batches):
        posted, held = replay_batch(index, batch, posted, held, authorized_before)

    # the serial result is what the service and Postgres hold
    succeeded = [op for op in ops if op.error is None]
    assert posted == INITIAL_POINTS + sum(delta(op) for op in succeeded if op.method != "Authorize")
    open_holds = [op.hold for op in ops if op.method == "Capture" and op.error is not None]
    assert held == sum(op.points for op in open_holds)
    assert balance(stub, member) == (posted, held, posted - held)
    assert member_in_postgres(service.database_url, member) == (posted, posted, held)

    transactions = fetch(
        service.database_url, "SELECT transaction_id, kind, amount FROM transactions WHERE member_id = $1", member
    )
    expected = {
        (transaction_number(op), {"Earn": 1, "Capture": 2, "Redeem": 3}[op.method], op.response.points)
        for op in succeeded
        if op.method != "Authorize"
    }
    assert {(r["transaction_id"], r["kind"], r["amount"]) for r in transactions} == expected | {
        (int(funded.transaction_id.removeprefix("txn_")), 1, INITIAL_POINTS)
    }
    hold_rows = fetch(
        service.database_url,
        "SELECT authorization_id, amount, status, captured FROM holds WHERE member_id = $1",
        member,
    )
    captured = {op.hold: op.response.points for op in succeeded if op.method == "Capture"}
    expected_holds = {
        (authorization_number(op), op.points, 2 if op in captured else 1, captured.get(op, 0))
        for op in succeeded
        if op.method == "Authorize"
    }
    assert {(r["authorization_id"], r["amount"], r["status"], r["captured"]) for r in hold_rows} == expected_holds
    assert ledger_discrepancies(service.database_url) == []
