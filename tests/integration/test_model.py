"""Model-based test: random sequences of every operation against one running service, each answer and
each balance compared with a small reference ledger written from DOMAIN.md and the proto's comments.

The reference (`ReferenceLedger`) knows nothing of the processor's code: it is the money model in a few
dozen lines (posted balances, holds with an expiry, transactions with what was refunded of them, and
idempotency records). `PointsMachine` drives the service with hypothesis and asks the reference what
every call must answer: the status code, every response field, and for errors the words that tell the
caller which rule refused it. Ids the service chooses (txn_…, auth_…) are matched to the reference's own
through a bijection, so a reused, swapped or duplicated id fails the test.

Time: holds with hold_ttl_seconds=1 expire during an example. The service decides expiry with its wall
clock at some moment between our sending a call and receiving its answer (same host, same clock). Before
a call the machine waits out any hold of the members involved that would expire within
`EXPIRY_MARGIN_SECONDS`, and after it discards the example (hypothesis.assume) if a hold still expired
between send and answer, so the reference never has to guess which side of the expiry the service saw.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
import uuid

import grpc
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, ledger_discrepancies
from tests.integration.helpers import replay_flag

# Hypothesis shrinks a failure against the live service; give it room to finish and report.
pytestmark = pytest.mark.timeout(600)

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS

HOLD_TTL_SECONDS_DEFAULT = 7_200  # passed to the service: a hold without a TTL must get this one
SHORT_TTL_SECONDS = 1
EXPIRY_MARGIN_SECONDS = 0.25
MEMBERS_PER_EXAMPLE = 3
# members 0 and 1 are funded at the start; member 2 is unknown until someone earns for it
MEMBER = st.sampled_from([0, 0, 1, 1, 2])
GIVE_BACK_BPS = (1_000, 333, 2_000)  # three merchants, so rounding differs and "another merchant" exists
UNKNOWN_AUTHORIZATION = "auth_999999999999999"
UNKNOWN_TRANSACTION = "txn_999999999999999"
OTHER_UNKNOWN_AUTHORIZATION = "auth_999999999999998"
OTHER_UNKNOWN_TRANSACTION = "txn_999999999999998"

EARN = pb.TRANSACTION_KIND_EARN
CAPTURE = pb.TRANSACTION_KIND_CAPTURE
REDEEM = pb.TRANSACTION_KIND_REDEEM
REFUND_OF_REDEMPTION = pb.TRANSACTION_KIND_REFUND_OF_REDEMPTION
REFUND_OF_EARN = pb.TRANSACTION_KIND_REFUND_OF_EARN


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def now_micros() -> int:
    return time.time_ns() // 1000


def micros(timestamp) -> int:
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1000


# --- the reference ledger --------------------------------------------------------------------------


@dataclasses.dataclass
class Hold:
    member_id: str
    merchant_id: str
    amount: int
    ttl_seconds: int
    expires_at_us: int | None = None  # learnt from the Authorize answer (checked against the clock)
    state: str = "open"  # open | captured | voided; "expired" is open and past expires_at

    def expired(self, now_us: int) -> bool:
        return self.state == "open" and self.expires_at_us is not None and self.expires_at_us <= now_us


@dataclasses.dataclass
class Transaction:
    kind: int
    member_id: str
    merchant_id: str
    amount: int
    refunded: int = 0


@dataclasses.dataclass(frozen=True)
class Expected:
    code: grpc.StatusCode
    fields: dict = dataclasses.field(default_factory=dict)
    words: tuple[str, ...] = ()  # for errors: the details name at least one of these
    recorded: bool = False  # decided by the ledger, so the key now answers it forever
    replay: bool = False


# The request fields that make two requests under one key "the same request" (the proto's fields
# minus merchant_id, which scopes the key, and the key itself).
FINGERPRINT = {
    "Earn": ("member_id", "purchase_amount"),
    "Authorize": ("member_id", "points", "hold_ttl_seconds"),
    "Capture": ("authorization_id", "points"),
    "Void": ("authorization_id",),
    "Redeem": ("member_id", "points"),
    "Refund": ("transaction_id", "points"),
}


class ReferenceLedger:
    """The money model of DOMAIN.md, in point-units, with the proto's error codes. Ids are the
    reference's own ("T1", "A1"); unknown ids are any other string."""

    def __init__(self, give_back_bps: dict[str, int]):
        self.give_back_bps = give_back_bps
        self.posted: dict[str, int] = {}
        self.holds: dict[str, Hold] = {}
        self.transactions: dict[str, Transaction] = {}
        self.history: dict[str, list[dict]] = collections.defaultdict(list)
        self.keys: dict[tuple[str, str], tuple[str, dict, Expected]] = {}
        self._numbers = itertools.count(1)

    # --- balances ---

    def held(self, member_id: str, now_us: int) -> int:
        return sum(
            h.amount
            for h in self.holds.values()
            if h.member_id == member_id and h.state == "open" and not h.expired(now_us)
        )

    def balance(self, member_id: str, now_us: int) -> tuple[int, int, int] | None:
        if member_id not in self.posted:
            return None
        posted, held = self.posted[member_id], self.held(member_id, now_us)
        return posted, held, posted - held

    def available(self, member_id: str, now_us: int) -> int:
        found = self.balance(member_id, now_us)
        return found[2] if found else 0

    def members_of(self, method: str, request: dict) -> list[str]:
        """The members whose balances the answer to this request depends on."""
        if "member_id" in request:
            return [request["member_id"]]
        if "authorization_id" in request and request["authorization_id"] in self.holds:
            return [self.holds[request["authorization_id"]].member_id]
        if "transaction_id" in request and request["transaction_id"] in self.transactions:
            return [self.transactions[request["transaction_id"]].member_id]
        return []

    # --- calls ---

    def call(self, method: str, merchant_id: str, key: str, request: dict, now_us: int) -> Expected:
        if merchant_id not in self.give_back_bps:
            # refused before the ledger decides anything: the key stays unused
            return Expected(NOT_FOUND, words=(merchant_id,))
        stored = self.keys.get((merchant_id, key))
        if stored is not None:
            stored_method, stored_request, outcome = stored
            if stored_method != method:
                return Expected(ALREADY_EXISTS, words=("method",))
            differing = tuple(f for f in FINGERPRINT[method] if stored_request[f] != request[f])
            if differing:
                return Expected(ALREADY_EXISTS, words=differing)
            return dataclasses.replace(outcome, replay=True)
        if (
            method == "Earn"
            and request["member_id"] not in self.posted
            and request["purchase_amount"] * self.give_back_bps[merchant_id] // 10_000 == 0
        ):
            # an earn of 0 points creates no member: refused, and the key stays unused
            return Expected(FAILED_PRECONDITION, words=("0 points",))
        outcome = getattr(self, "_" + method.lower())(merchant_id, request, now_us)
        outcome = dataclasses.replace(outcome, recorded=True)
        self.keys[(merchant_id, key)] = (method, dict(request), outcome)
        return outcome

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._numbers)}"

    def _post(self, kind: int, member_id: str, merchant_id: str, amount: int, signed: int, **extra) -> str:
        transaction_id = self._new_id("T")
        self.transactions[transaction_id] = Transaction(kind, member_id, merchant_id, amount)
        self.posted[member_id] += signed
        self.history[member_id].append(
            {
                "transaction_id": transaction_id,
                "kind": kind,
                "merchant_id": merchant_id,
                "points": signed,
                "original_transaction_id": extra.get("original", ""),
                "authorization_id": extra.get("authorization", ""),
                "purchase_amount": extra.get("purchase", 0),
            }
        )
        return transaction_id

    def _earn(self, merchant_id: str, request: dict, now_us: int) -> Expected:
        member_id, purchase = request["member_id"], request["purchase_amount"]
        bps = self.give_back_bps[merchant_id]
        points = purchase * bps // 10_000  # floor: the fraction of a point-unit is never credited
        self.posted.setdefault(member_id, 0)
        transaction_id = self._post(EARN, member_id, merchant_id, points, points, purchase=purchase)
        return Expected(
            OK,
            {
                "transaction_id": transaction_id,
                "points": points,
                "balance": self.posted[member_id],
                "give_back_bps": bps,
            },
        )

    def _authorize(self, merchant_id: str, request: dict, now_us: int) -> Expected:
        member_id, points = request["member_id"], request["points"]
        if member_id not in self.posted:
            return Expected(NOT_FOUND, words=(member_id,))
        available = self.available(member_id, now_us)
        if points > available:
            return Expected(FAILED_PRECONDITION, words=(f"{available} point-units available",))
        authorization_id = self._new_id("A")
        self.holds[authorization_id] = Hold(
            member_id, merchant_id, points, request["hold_ttl_seconds"] or HOLD_TTL_SECONDS_DEFAULT
        )
        return Expected(OK, {"authorization_id": authorization_id, "available": available - points, "points": points})

    def _resolvable(self, merchant_id: str, authorization_id: str, now_us: int) -> Expected | None:
        hold = self.holds.get(authorization_id)
        if hold is None:
            return Expected(NOT_FOUND, words=("does not exist",))
        if hold.merchant_id != merchant_id:
            return Expected(PERMISSION_DENIED, words=("another merchant",))
        if hold.state == "captured":
            return Expected(FAILED_PRECONDITION, words=("captured",))
        if hold.state == "voided":
            return Expected(FAILED_PRECONDITION, words=("voided",))
        if hold.expired(now_us):
            return Expected(FAILED_PRECONDITION, words=("expired",))
        return None

    def _capture(self, merchant_id: str, request: dict, now_us: int) -> Expected:
        authorization_id, points = request["authorization_id"], request["points"]
        refused = self._resolvable(merchant_id, authorization_id, now_us)
        if refused is not None:
            return refused
        hold = self.holds[authorization_id]
        captured = points or hold.amount  # 0 = the whole hold
        if captured > hold.amount:
            return Expected(FAILED_PRECONDITION, words=("exceeds",))
        hold.state = "captured"
        transaction_id = self._post(
            CAPTURE, hold.member_id, merchant_id, captured, -captured, authorization=authorization_id
        )
        posted, _, available = self.balance(hold.member_id, now_us)
        return Expected(
            OK,
            {
                "transaction_id": transaction_id,
                "points": captured,
                "released": hold.amount - captured,
                "balance": posted,
                "available": available,
            },
        )

    def _void(self, merchant_id: str, request: dict, now_us: int) -> Expected:
        authorization_id = request["authorization_id"]
        refused = self._resolvable(merchant_id, authorization_id, now_us)
        if refused is not None:
            return refused
        hold = self.holds[authorization_id]
        hold.state = "voided"
        return Expected(OK, {"released": hold.amount, "available": self.available(hold.member_id, now_us)})

    def _redeem(self, merchant_id: str, request: dict, now_us: int) -> Expected:
        member_id, points = request["member_id"], request["points"]
        if member_id not in self.posted:
            return Expected(NOT_FOUND, words=(member_id,))
        available = self.available(member_id, now_us)
        if points > available:
            return Expected(FAILED_PRECONDITION, words=(f"{available} point-units available",))
        transaction_id = self._post(REDEEM, member_id, merchant_id, points, -points)
        posted, _, available = self.balance(member_id, now_us)
        return Expected(
            OK, {"transaction_id": transaction_id, "points": points, "balance": posted, "available": available}
        )

    def _refund(self, merchant_id: str, request: dict, now_us: int) -> Expected:
        original_id, points = request["transaction_id"], request["points"]
        original = self.transactions.get(original_id)
        if original is None:
            return Expected(NOT_FOUND, words=("does not exist",))
        if original.merchant_id != merchant_id:
            return Expected(PERMISSION_DENIED, words=("another merchant",))
        if original.kind not in (EARN, CAPTURE, REDEEM):
            return Expected(FAILED_PRECONDITION, words=("refund",))
        if points > original.amount - original.refunded:
            return Expected(FAILED_PRECONDITION, words=("exceeds",))
        member_id = original.member_id
        if original.kind == EARN:
            if points > self.available(member_id, now_us):  # the earned points were spent (or are held)
                return Expected(FAILED_PRECONDITION, words=("spent",))
            kind, signed = REFUND_OF_EARN, -points
        else:
            kind, signed = REFUND_OF_REDEMPTION, points
        original.refunded += points
        transaction_id = self._post(kind, member_id, merchant_id, points, signed, original=original_id)
        posted, _, available = self.balance(member_id, now_us)
        return Expected(
            OK,
            {
                "transaction_id": transaction_id,
                "points": points,
                "kind": kind,
                "balance": posted,
                "available": available,
            },
        )


# --- talking to the service -------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    code: grpc.StatusCode
    response: object | None
    details: str
    replay: str | None


def invoke(rpc, request) -> Result:
    try:
        response, call = rpc.with_call(request, timeout=30)
        return Result(OK, response, "", replay_flag(call))
    except grpc.RpcError as error:
        return Result(error.code(), None, error.details() or "", replay_flag(error))


class Bijection:
    """Reference ids ↔ the service's ids: each reference id meets exactly one service id and back."""

    def __init__(self):
        self.real: dict[str, str] = {}
        self.reference: dict[str, str] = {}

    def to_reference(self, real: str) -> str:
        return self.reference.get(real, real)

    def to_real(self, reference: str) -> str:
        return self.real[reference]

    def match(self, reference: str, real: str, prefix: str, context: str) -> None:
        if reference in self.real:
            assert real == self.real[reference], (
                f"{context}: expected {self.real[reference]} (seen before for the same thing), got {real!r}"
            )
            return
        assert real.startswith(prefix) and len(real) > len(prefix), f"{context}: {real!r} is not a {prefix}… id"
        assert real not in self.reference, f"{context}: {real} was already returned for another operation"
        self.real[reference] = real
        self.reference[real] = reference


def describe(method: str, request) -> str:
    return f"{method}({text_format.MessageToString(request, as_one_line=True)})"


class PointsMachine(RuleBasedStateMachine):
    """Set by the test before running: the stub and the merchants {merchant_id: give_back_bps}."""

    stub: points_pb2_grpc.PointsServiceStub
    merchant_bps: dict[str, int]

    def __init__(self):
        super().__init__()
        self.merchants = list(self.merchant_bps)
        self.model = ReferenceLedger(dict(self.merchant_bps))
        self.members = [unique("mod") for _ in range(MEMBERS_PER_EXAMPLE)]
        self.ids = Bijection()
        self.sent: list[tuple[str, object]] = []
        self.first: dict[tuple[str, str], Result] = {}
        self.slept = False

    # --- plumbing ---

    def reference_request(self, method: str, request) -> dict:
        fields = {}
        for name in FINGERPRINT[method]:
            value = getattr(request, name)
            fields[name] = self.ids.to_reference(value) if name.endswith("_id") and name != "member_id" else value
        return fields

    def open_holds_of(self, members: list[str]) -> list[Hold]:
        return [
            h
            for h in self.model.holds.values()
            if h.member_id in members and h.state == "open" and h.expires_at_us is not None
        ]

    def settle(self, members: list[str]) -> int:
        """Waits until no open hold of `members` expires within the margin; returns the send time."""
        now = now_micros()
        for hold in sorted(self.open_holds_of(members), key=lambda h: h.expires_at_us):
            if now < hold.expires_at_us <= now + EXPIRY_MARGIN_SECONDS * 1_000_000:
                time.sleep((hold.expires_at_us - now) / 1_000_000 + 0.002)
                now = now_micros()
        return now_micros()

    def assume_no_expiry_between(self, members: list[str], sent_us: int, answered_us: int) -> None:
        # A hold expiring while the call was in flight: the service may have seen either side.
        assume(not any(sent_us < h.expires_at_us <= answered_us + 1_000 for h in self.open_holds_of(members)))

    def new_key(self) -> str:
        return unique("key")

    def other_merchant(self, merchant_id: str, index: int = 0) -> str:
        others = [m for m in self.merchants if m != merchant_id]
        return others[index % len(others)]

    # --- one mutating call, checked ---

    def mutate(self, method: str, request) -> Result:
        reference_request = self.reference_request(method, request)
        members = self.model.members_of(method, reference_request)
        sent_us = self.settle(members)
        result = invoke(getattr(self.stub, method), request)
        answered_us = now_micros()
        self.assume_no_expiry_between(members, sent_us, answered_us)
        expected = self.model.call(method, request.merchant_id, request.idempotency_key, reference_request, sent_us)
        self.sent.append((method, request))
        self.check(method, request, expected, result, sent_us, answered_us)
        return result

    def check(self, method: str, request, expected: Expected, result: Result, sent_us: int, answered_us: int) -> None:
        what = describe(method, request)
        assert result.code == expected.code, (
            f"{what}: expected {expected.code.name} {expected.fields or expected.words}, "
            f"got {result.code.name} {result.details!r}{'' if result.response is None else result.response}"
        )
        key = (request.merchant_id, request.idempotency_key)
        if expected.replay:
            first = self.first[key]
            assert result.replay == "true", f"{what}: a replay must carry points-idempotent-replay: true"
            if result.code is OK:
                assert result.response.SerializeToString(deterministic=True) == first.response.SerializeToString(
                    deterministic=True
                ), f"{what}: replay answered {result.response} but the first call answered {first.response}"
            else:
                assert result.details == first.details, f"{what}: replayed error differs from the first"
            return
        assert result.replay is None, f"{what}: not a replay, yet marked as one"
        if expected.recorded:
            self.first[key] = result
        if result.code is not OK:
            assert any(word in result.details for word in expected.words), (
                f"{what}: {result.code.name} {result.details!r} should name one of {expected.words}"
            )
            return
        response = result.response
        for name, value in expected.fields.items():
            actual = getattr(response, name)
            if name == "transaction_id":
                self.ids.match(value, actual, "txn_", what)
            elif name == "authorization_id":
                self.ids.match(value, actual, "auth_", what)
            else:
                assert actual == value, f"{what}: {name} expected {value}, got {actual}\n{response}"
        if method == "Earn":
            assert sent_us - 1_000 <= micros(response.created_at) <= answered_us + 1_000, (
                f"{what}: created_at {response.created_at} is not within the call"
            )
        if method == "Authorize":
            hold = self.model.holds[expected.fields["authorization_id"]]
            ttl_us = hold.ttl_seconds * 1_000_000
            expires_at_us = micros(response.expires_at)
            assert sent_us + ttl_us - 1_000 <= expires_at_us <= answered_us + ttl_us + 1_000, (
                f"{what}: expires_at {response.expires_at} is not {hold.ttl_seconds} s after the call"
            )
            hold.expires_at_us = expires_at_us

    def check_balance(self, member_id: str) -> None:
        sent_us = self.settle([member_id])
        result = invoke(self.stub.GetBalance, pb.GetBalanceRequest(member_id=member_id))
        answered_us = now_micros()
        self.assume_no_expiry_between([member_id], sent_us, answered_us)
        expected = self.model.balance(member_id, sent_us)
        if expected is None:
            assert result.code == NOT_FOUND, f"GetBalance({member_id}): expected NOT_FOUND, got {result}"
            return
        assert result.code == OK, f"GetBalance({member_id}): {result.code.name} {result.details!r}"
        actual = (result.response.posted, result.response.held, result.response.available)
        assert result.response.member_id == member_id
        assert actual == expected, f"GetBalance({member_id}): (posted, held, available) {actual} != {expected}"

    def points_for(self, data, member_id: str) -> int:
        """Mostly amounts the member can afford, sometimes just more than it can."""
        available = self.model.available(member_id, now_micros())
        affordable = st.integers(1, max(1, available))
        return data.draw(st.one_of(affordable, affordable, st.integers(available + 1, available + 100)), label="points")

    # --- rules ---

    @initialize(purchases=st.lists(st.integers(1_000, 100_000), min_size=2, max_size=2), short_hold=st.booleans())
    def fund_two_members(self, purchases, short_hold):
        # the third member starts unknown: calls for it are NOT_FOUND until its first earn
        for index, purchase in enumerate(purchases):
            self.mutate(
                "Earn",
                pb.EarnRequest(
                    merchant_id=self.merchants[index],
                    member_id=self.members[index],
                    purchase_amount=purchase,
                    idempotency_key=self.new_key(),
                ),
            )
        if short_hold:  # so that about half the examples see a hold expire (in a rule or at teardown)
            self.mutate(
                "Authorize",
                pb.AuthorizeRequest(
                    merchant_id=self.merchants[0],
                    member_id=self.members[0],
                    points=10,
                    hold_ttl_seconds=SHORT_TTL_SECONDS,
                    idempotency_key=self.new_key(),
                ),
            )

    @rule(
        merchant=st.integers(0, len(GIVE_BACK_BPS) - 1),
        member=MEMBER,
        purchase=st.one_of(st.integers(1, 50_000), st.sampled_from([1, 3, 29, 10_001])),
    )
    def earn(self, merchant, member, purchase):
        self.mutate(
            "Earn",
            pb.EarnRequest(
                merchant_id=self.merchants[merchant],
                member_id=self.members[member],
                purchase_amount=purchase,
                idempotency_key=self.new_key(),
            ),
        )

    @rule(
        data=st.data(), merchant=st.integers(0, len(GIVE_BACK_BPS) - 1), member=MEMBER, ttl=st.sampled_from([0, 3_600])
    )
    def authorize(self, data, merchant, member, ttl):
        member_id = self.members[member]
        self.mutate(
            "Authorize",
            pb.AuthorizeRequest(
                merchant_id=self.merchants[merchant],
                member_id=member_id,
                points=self.points_for(data, member_id),
                hold_ttl_seconds=ttl,
                idempotency_key=self.new_key(),
            ),
        )

    @rule(data=st.data(), merchant=st.integers(0, len(GIVE_BACK_BPS) - 1), member=MEMBER)
    def authorize_briefly(self, data, merchant, member):
        member_id = self.members[member]
        self.mutate(
            "Authorize",
            pb.AuthorizeRequest(
                merchant_id=self.merchants[merchant],
                member_id=member_id,
                points=self.points_for(data, member_id),
                hold_ttl_seconds=SHORT_TTL_SECONDS,
                idempotency_key=self.new_key(),
            ),
        )

    @precondition(lambda self: self.model.holds)
    @rule(
        data=st.data(),
        mode=st.sampled_from(["whole", "exact", "partial", "over"]),
        by=st.sampled_from(["owner", "owner", "owner", "other"]),
    )
    def capture(self, data, mode, by):
        reference = data.draw(st.sampled_from(sorted(self.model.holds)), label="hold")
        hold = self.model.holds[reference]
        if mode == "whole":
            points = 0
        elif mode == "exact":
            points = hold.amount
        elif mode == "partial":
            points = data.draw(st.integers(1, max(1, hold.amount - 1)), label="points")
        else:
            points = hold.amount + data.draw(st.integers(1, 50), label="excess")
        merchant = hold.merchant_id if by == "owner" else self.other_merchant(hold.merchant_id)
        self.mutate(
            "Capture",
            pb.CaptureRequest(
                merchant_id=merchant,
                authorization_id=self.ids.to_real(reference),
                points=points,
                idempotency_key=self.new_key(),
            ),
        )

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data(), by=st.sampled_from(["owner", "owner", "owner", "other"]))
    def void(self, data, by):
        reference = data.draw(st.sampled_from(sorted(self.model.holds)), label="hold")
        hold = self.model.holds[reference]
        merchant = hold.merchant_id if by == "owner" else self.other_merchant(hold.merchant_id)
        self.mutate(
            "Void",
            pb.VoidRequest(
                merchant_id=merchant, authorization_id=self.ids.to_real(reference), idempotency_key=self.new_key()
            ),
        )

    @rule(data=st.data(), merchant=st.integers(0, len(GIVE_BACK_BPS) - 1), member=MEMBER)
    def redeem(self, data, merchant, member):
        member_id = self.members[member]
        self.mutate(
            "Redeem",
            pb.RedeemRequest(
                merchant_id=self.merchants[merchant],
                member_id=member_id,
                points=self.points_for(data, member_id),
                idempotency_key=self.new_key(),
            ),
        )

    @precondition(lambda self: self.model.transactions)
    @rule(
        data=st.data(),
        mode=st.sampled_from(["partial", "rest", "over"]),
        by=st.sampled_from(["owner", "owner", "owner", "other"]),
    )
    def refund(self, data, mode, by):
        reference = data.draw(st.sampled_from(sorted(self.model.transactions)), label="transaction")
        original = self.model.transactions[reference]
        remaining = original.amount - original.refunded
        if mode == "partial":
            points = data.draw(st.integers(1, max(1, remaining - 1)), label="points")
        elif mode == "rest":
            points = max(1, remaining)
        else:
            points = remaining + data.draw(st.integers(1, 50), label="excess")
        merchant = original.merchant_id if by == "owner" else self.other_merchant(original.merchant_id)
        self.mutate(
            "Refund",
            pb.RefundRequest(
                merchant_id=merchant,
                transaction_id=self.ids.to_real(reference),
                points=points,
                idempotency_key=self.new_key(),
            ),
        )

    @rule(
        what=st.sampled_from(
            ["Capture", "Void", "Refund", "Authorize", "Redeem", "GetBalance", "ListTransactions", "merchant"]
        ),
        merchant=st.integers(0, len(GIVE_BACK_BPS) - 1),
    )
    def unknown_ids(self, what, merchant):
        merchant_id, key, ghost = self.merchants[merchant], self.new_key(), unique("ghost")
        if what == "Capture":
            self.mutate(
                what,
                pb.CaptureRequest(merchant_id=merchant_id, authorization_id=UNKNOWN_AUTHORIZATION, idempotency_key=key),
            )
        elif what == "Void":
            self.mutate(
                what,
                pb.VoidRequest(merchant_id=merchant_id, authorization_id=UNKNOWN_AUTHORIZATION, idempotency_key=key),
            )
        elif what == "Refund":
            self.mutate(
                what,
                pb.RefundRequest(
                    merchant_id=merchant_id, transaction_id=UNKNOWN_TRANSACTION, points=1, idempotency_key=key
                ),
            )
        elif what == "Authorize":
            self.mutate(
                what, pb.AuthorizeRequest(merchant_id=merchant_id, member_id=ghost, points=1, idempotency_key=key)
            )
        elif what == "Redeem":
            self.mutate(what, pb.RedeemRequest(merchant_id=merchant_id, member_id=ghost, points=1, idempotency_key=key))
        elif what == "GetBalance":
            self.check_balance(ghost)
        elif what == "ListTransactions":
            result = invoke(self.stub.ListTransactions, pb.ListTransactionsRequest(member_id=ghost))
            assert result.code == NOT_FOUND, f"ListTransactions({ghost}): {result}"
        else:  # a merchant outside the alliance; refused before the ledger, so the key stays unused
            self.mutate(
                "Earn",
                pb.EarnRequest(
                    merchant_id=unique("nomerchant"),
                    member_id=self.members[0],
                    purchase_amount=1_000,
                    idempotency_key=key,
                ),
            )

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def retry_same_request(self, data):
        method, request = data.draw(st.sampled_from(self.sent), label="retried")
        self.mutate(method, request)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def retry_changed_request(self, data):
        method, request = data.draw(st.sampled_from(self.sent), label="retried")
        changes = self.changes_of(method, request)
        change = data.draw(st.sampled_from(sorted(changes)), label="change")
        changed_method, changed = changes[change]
        self.mutate(changed_method, changed)

    def changes_of(self, method: str, request) -> dict[str, tuple[str, object]]:
        """Requests under the same merchant and key that differ from `request` in one field or the method."""

        def copy(**fields):
            other = type(request)()
            other.CopyFrom(request)
            for name, value in fields.items():
                setattr(other, name, value)
            return method, other

        merchant_id, key = request.merchant_id, request.idempotency_key
        other_member = next(m for m in self.members if m != getattr(request, "member_id", None))
        if method == "Earn":
            return {
                "purchase_amount": copy(purchase_amount=request.purchase_amount + 1),
                "member_id": copy(member_id=other_member),
                "method": (
                    "Redeem",
                    pb.RedeemRequest(
                        merchant_id=merchant_id, member_id=request.member_id, points=1, idempotency_key=key
                    ),
                ),
            }
        if method == "Authorize":
            return {
                "points": copy(points=request.points + 1),
                "member_id": copy(member_id=other_member),
                "hold_ttl_seconds": copy(hold_ttl_seconds=0 if request.hold_ttl_seconds else 3_600),
                "method": (
                    "Redeem",
                    pb.RedeemRequest(
                        merchant_id=merchant_id, member_id=request.member_id, points=request.points, idempotency_key=key
                    ),
                ),
            }
        if method == "Capture":
            return {
                "points": copy(points=request.points + 1),
                "authorization_id": copy(
                    authorization_id=UNKNOWN_AUTHORIZATION
                    if request.authorization_id != UNKNOWN_AUTHORIZATION
                    else OTHER_UNKNOWN_AUTHORIZATION
                ),
                "method": (
                    "Void",
                    pb.VoidRequest(
                        merchant_id=merchant_id, authorization_id=request.authorization_id, idempotency_key=key
                    ),
                ),
            }
        if method == "Void":
            return {
                "authorization_id": copy(
                    authorization_id=UNKNOWN_AUTHORIZATION
                    if request.authorization_id != UNKNOWN_AUTHORIZATION
                    else OTHER_UNKNOWN_AUTHORIZATION
                ),
                "method": (
                    "Capture",
                    pb.CaptureRequest(
                        merchant_id=merchant_id, authorization_id=request.authorization_id, idempotency_key=key
                    ),
                ),
            }
        if method == "Redeem":
            return {
                "points": copy(points=request.points + 1),
                "member_id": copy(member_id=other_member),
                "method": (
                    "Authorize",
                    pb.AuthorizeRequest(
                        merchant_id=merchant_id, member_id=request.member_id, points=request.points, idempotency_key=key
                    ),
                ),
            }
        assert method == "Refund", method
        return {
            "points": copy(points=request.points + 1),
            "transaction_id": copy(
                transaction_id=UNKNOWN_TRANSACTION
                if request.transaction_id != UNKNOWN_TRANSACTION
                else OTHER_UNKNOWN_TRANSACTION
            ),
            "method": (
                "Redeem",
                pb.RedeemRequest(merchant_id=merchant_id, member_id=self.members[0], points=1, idempotency_key=key),
            ),
        }

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), member=MEMBER, purchase=st.integers(1, 20_000))
    def same_key_at_another_merchant(self, data, member, purchase):
        # keys are scoped to the merchant: another merchant's call under the same key is its own operation
        _, request = data.draw(st.sampled_from(self.sent), label="key of")
        if request.merchant_id not in self.merchant_bps:
            return
        merchant_id = self.other_merchant(request.merchant_id, data.draw(st.integers(0, 1), label="which"))
        self.mutate(
            "Earn",
            pb.EarnRequest(
                merchant_id=merchant_id,
                member_id=self.members[member],
                purchase_amount=purchase,
                idempotency_key=request.idempotency_key,
            ),
        )

    def open_short_holds(self) -> list[Hold]:
        return [h for h in self.model.holds.values() if h.state == "open" and h.ttl_seconds == SHORT_TTL_SECONDS]

    def wait_for_short_holds_to_expire(self) -> None:
        self.slept = True  # at most once per example: it sleeps up to a second
        latest = max(h.expires_at_us for h in self.open_short_holds())
        while now_micros() <= latest:
            time.sleep((latest - now_micros()) / 1_000_000 + 0.01)

    @precondition(lambda self: not self.slept and self.open_short_holds())
    @rule()
    def let_short_holds_expire(self):
        self.wait_for_short_holds_to_expire()

    def teardown(self):
        # Rules are enabled at random per example (hypothesis' swarm testing), so the rule above may not
        # run: an example that ends with short holds open lets them expire here, then checks that the
        # balances (no call in between: nothing but the clock released them) and a capture see it.
        if self.slept or not self.open_short_holds():
            return
        expiring = self.open_short_holds()
        self.wait_for_short_holds_to_expire()
        self.every_balance_matches()
        for hold in expiring:
            reference = next(r for r, h in self.model.holds.items() if h is hold)
            self.mutate(
                "Capture",
                pb.CaptureRequest(
                    merchant_id=hold.merchant_id,
                    authorization_id=self.ids.to_real(reference),
                    idempotency_key=self.new_key(),
                ),
            )

    @rule(member=MEMBER)
    def list_transactions(self, member):
        member_id = self.members[member]
        result = invoke(self.stub.ListTransactions, pb.ListTransactionsRequest(member_id=member_id, page_size=200))
        if member_id not in self.model.posted:
            assert result.code == NOT_FOUND, f"ListTransactions({member_id}): {result}"
            return
        assert result.code == OK, f"ListTransactions({member_id}): {result.code.name} {result.details!r}"
        assert result.response.next_page_token == ""
        actual = []
        for t in result.response.transactions:
            actual.append(
                {
                    "transaction_id": self.ids.to_reference(t.transaction_id),
                    "kind": t.kind,
                    "merchant_id": t.merchant_id,
                    "points": t.points,
                    "original_transaction_id": self.ids.to_reference(t.original_transaction_id),
                    "authorization_id": self.ids.to_reference(t.authorization_id),
                    "purchase_amount": t.purchase_amount,
                }
            )
        expected = list(reversed(self.model.history[member_id]))  # newest first
        assert actual == expected, f"ListTransactions({member_id}):\n{actual}\n!=\n{expected}"

    @invariant()
    def every_balance_matches(self):
        for member_id in self.members:
            self.check_balance(member_id)


@pytest.fixture(scope="module")
def service(create_database):
    url = create_database()
    service = ServiceProcess(url, "--hold-ttl-seconds-default", str(HOLD_TTL_SECONDS_DEFAULT)).start()
    yield service
    service.kill()


def test_random_operation_sequences_match_the_reference_ledger(service):
    merchant_bps = {}
    for bps in GIVE_BACK_BPS:
        merchant_id = unique(f"mm{bps}")
        add_merchant(service.database_url, merchant_id, bps)
        merchant_bps[merchant_id] = bps
    with service.channel() as channel:
        PointsMachine.stub = points_pb2_grpc.PointsServiceStub(channel)
        PointsMachine.merchant_bps = merchant_bps
        run_state_machine_as_test(
            PointsMachine,
            settings=settings(
                max_examples=30,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    assert ledger_discrepancies(service.database_url) == []
