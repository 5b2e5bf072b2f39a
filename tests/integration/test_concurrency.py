"""Many calls on one member at once: the ledger never overdraws it, never lets its available balance go
negative, and what the service reports equals what Postgres holds."""

from __future__ import annotations

import concurrent.futures
import random
import threading

import grpc
import pytest

from points.v1 import points_pb2 as pb
from tests.harness import add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import balance, funded_member, member_in_postgres, unique

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def merchant(service) -> str:
    merchant_id = unique("m")
    add_merchant(service.database_url, merchant_id, 1000)  # 10% give-back
    return merchant_id


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown with a failure, to replay the same choices
    return random.Random(seed)


def settle(futures):
    """[(response, None) | (None, RpcError)] in the order of `futures`."""
    results = []
    for future in futures:
        try:
            results.append((future.result(), None))
        except grpc.RpcError as error:
            results.append((None, error))
    return results


def test_500_concurrent_redeems_of_2000_succeed_exactly_200_times(stub, service, merchant):
    member = funded_member(stub, merchant, 2_000)
    futures = [
        stub.Redeem.future(
            pb.RedeemRequest(merchant_id=merchant, member_id=member, points=10, idempotency_key=unique("k")),
            timeout=120,
        )
        for _ in range(500)
    ]
    results = settle(futures)
    successes = [response for response, _ in results if response is not None]
    rejections = [error for _, error in results if error is not None]

    assert len(successes) == 200
    assert len(rejections) == 300
    assert {error.code() for error in rejections} == {grpc.StatusCode.FAILED_PRECONDITION}
    # a redeem is refused only once nothing is left
    assert all("has 0 point-units available" in error.details() for error in rejections), {
        error.details() for error in rejections
    }
    # the redeems were applied one after another: each success saw its own balance after
    assert sorted(response.balance for response in successes) == list(range(0, 2_000, 10))
    assert all(response.available == response.balance for response in successes)
    assert len({response.transaction_id for response in successes}) == 200

    assert balance(stub, member) == (0, 0, 0)
    assert member_in_postgres(service.database_url, member) == (0, 0, 0)
    rows = fetch(
        service.database_url,
        """SELECT (SELECT count(*) FROM transactions WHERE member_id = $1 AND kind = 3) AS redeems,
                           (SELECT balance FROM account_balances WHERE kind = 'merchant_redeemed' AND owner_id = $2)
                             AS redeemed""",
        member,
        merchant,
    )
    assert (rows[0]["redeems"], rows[0]["redeemed"]) == (200, 2_000)
    assert ledger_discrepancies(service.database_url) == []


class Holds:
    """What the clients know about one member's holds, from the answers they got."""

    def __init__(self, posted: int):
        self.lock = threading.Lock()
        self.posted = posted
        self.open: dict[str, int] = {}
        self.problems: list[str] = []

    def opened(self, response: pb.AuthorizeResponse) -> None:
        with self.lock:
            self.open[response.authorization_id] = response.points
        if response.available < 0:
            self.problem(f"authorize answered available {response.available}")

    def captured(self, authorization_id: str, points_asked: int, response: pb.CaptureResponse) -> None:
        with self.lock:
            held = self.open.pop(authorization_id)
            self.posted -= response.points
        if (response.points, response.released) != (points_asked, held - points_asked):
            self.problem(f"capture of {points_asked} of {held} answered {response.points} + {response.released}")
        if response.available < 0 or response.available > response.balance:
            self.problem(f"capture answered balance {response.balance}, available {response.available}")

    def voided(self, authorization_id: str, response: pb.VoidResponse) -> None:
        with self.lock:
            held = self.open.pop(authorization_id)
        if response.released != held or response.available < 0:
            self.problem(f"void of {held} answered released {response.released}, available {response.available}")

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    @property
    def held(self) -> int:
        with self.lock:
            return sum(self.open.values())


def test_concurrent_authorize_capture_void_never_lets_available_go_negative(stub, service, merchant, rng):
    member = funded_member(stub, merchant, 10_000)
    holds = Holds(posted=10_000)

    # A burst of holds worth twice the balance: exactly the half that fits is held.
    futures = [
        stub.Authorize.future(
            pb.AuthorizeRequest(merchant_id=merchant, member_id=member, points=500, idempotency_key=unique("k")),
            timeout=60,
        )
        for _ in range(40)
    ]
    results = settle(futures)
    burst = [response for response, _ in results if response is not None]
    assert len(burst) == 20
    assert {error.code() for _, error in results if error is not None} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert sorted(response.available for response in burst) == list(range(0, 10_000, 500))
    for response in burst:
        holds.opened(response)
    assert balance(stub, member) == (10_000, 10_000, 0)

    def capture(authorization_id: str, held: int, choose: random.Random) -> None:
        points = choose.randint(1, held)
        response = stub.Capture(
            pb.CaptureRequest(
                merchant_id=merchant, authorization_id=authorization_id, points=points, idempotency_key=unique("k")
            ),
            timeout=60,
        )
        holds.captured(authorization_id, points, response)

    def void(authorization_id: str) -> None:
        response = stub.Void(
            pb.VoidRequest(merchant_id=merchant, authorization_id=authorization_id, idempotency_key=unique("k")),
            timeout=60,
        )
        holds.voided(authorization_id, response)

    def resolve(response: pb.AuthorizeResponse, choose: random.Random) -> None:
        action = choose.choices(("capture", "void", "keep"), weights=(4, 4, 1))[0]
        if action == "capture":
            capture(response.authorization_id, response.points, choose)
        elif action == "void":
            void(response.authorization_id)

    def authorizer(seed: int) -> int:
        choose = random.Random(seed)
        refused = 0
        for _ in range(25):
            try:
                response = stub.Authorize(
                    pb.AuthorizeRequest(
                        merchant_id=merchant,
                        member_id=member,
                        points=choose.randint(50, 1_500),
                        idempotency_key=unique("k"),
                    ),
                    timeout=60,
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    holds.problem(f"authorize failed with {error.code().name}: {error.details()}")
                refused += 1
                continue
            holds.opened(response)
            resolve(response, choose)
        return refused

    done = threading.Event()

    def watcher() -> int:
        """Polls the balance while the others work: it must always be consistent and never negative."""
        polls = 0
        last_posted = 10_000
        while not done.is_set() or polls == 0:
            posted, held, available = balance(stub, member)
            polls += 1
            if available < 0 or held < 0 or posted - held != available:
                holds.problem(f"GetBalance answered posted {posted}, held {held}, available {available}")
            if posted > last_posted:  # only captures move posted here, and they lower it
                holds.problem(f"posted rose from {last_posted} to {posted}")
            last_posted = posted
        return polls

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        watching = pool.submit(watcher)
        work = [pool.submit(resolve, response, random.Random(rng.random())) for response in burst]
        work += [pool.submit(authorizer, rng.randrange(2**32)) for _ in range(8)]
        for future in work:
            future.result()  # re-raises any unexpected RpcError of a capture or void
        done.set()
        assert watching.result() >= 1

    assert holds.problems == []
    posted_pg, entries_pg, held_pg = member_in_postgres(service.database_url, member)
    assert balance(stub, member) == (posted_pg, held_pg, posted_pg - held_pg)
    assert posted_pg == entries_pg
    assert (posted_pg, held_pg) == (holds.posted, holds.held)
    assert posted_pg - held_pg >= 0
    assert ledger_discrepancies(service.database_url) == []
