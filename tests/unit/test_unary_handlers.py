"""The unary Earn and Redeem handlers (issue 14 target 3): built inline with the builders that decide
with no await, instead of through _unary's coroutines. Checked against the generic path they replace
(_unary("earn"/"redeem"), still used by the other unary methods): for the same request and the same
outcome from the pipeline, the same response, or the same abort (code, message, details, trailers),
and the same Operation queued. Also: the RPC interceptor builds its wrapper once per method. No
database, no network: a stand-in pipeline and servicer context."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from points.v1 import points_pb2 as pb
from processor import auth, rpc
from processor.config import Settings
from processor.domain import Code, Operation, Outcome, Rejection
from processor.servicer import PointsServicer
from processor.state_machine import Merchants
from processor.store import MerchantRow

pytestmark = pytest.mark.timeout(60)

SHOP = MerchantRow("shop", 3, 1_000, "active")
STORED = MerchantRow("stored", 5, 700, "active")  # only "Postgres" has it: read on first use
ELSEWHERE = MerchantRow("elsewhere", 9, 1_000, "active")  # the caller's key may not act for it

EARN_FIELDS = {"transaction_id": 11, "points": 123, "balance": 1_000, "give_back_bps": 1_000}
EARN_FIELDS["created_at_us"] = 1_800_000_000_000_000
REDEEM_FIELDS = {"transaction_id": 12, "points": 77, "balance": 923, "available": 900}


class _Program:
    def version(self, now_us: int) -> None:
        return None


class _Pipeline:
    """The pipeline as the unary handlers use it: every operation is decided `outcome` at once."""

    def __init__(self, outcome: Outcome | None, refuse: Rejection | None = None) -> None:
        self.merchants = Merchants([SHOP, ELSEWHERE])
        self.stored = {STORED.merchant_id: STORED}
        self.program = _Program()
        self.outcome = outcome
        self.refuse = refuse  # what the queue refuses with (UNAVAILABLE, RESOURCE_EXHAUSTED), if anything
        self.queued: list[Operation] = []

    def ready_store(self) -> object:
        return self

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        row = self.merchants.by_id.get(merchant_id) or self.stored.get(merchant_id)
        if row is not None:
            self.merchants.add(row)
        return row

    def enqueue(self, op: Operation) -> asyncio.Future:
        if self.refuse is not None:
            raise self.refuse
        self.queued.append(op)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.outcome)
        return future

    async def submit(self, op: Operation) -> Outcome:
        return await self.enqueue(op)


class _Aborted(Exception):
    pass


class _Context:
    """What a servicer context records: the status it was aborted with, its trailing metadata."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None
        self.trailing: tuple = ()

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.aborted = (status.code, status.details, tuple(status.trailing_metadata))
        raise _Aborted()

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)


def _answer(method: str, request, outcome: Outcome | None, refuse: Rejection | None, inline: bool):
    """(response or None, abort, trailers, operations queued) of one call through one path."""

    async def main():
        rpc.principal.set(auth.Principal("key", "gateway", frozenset({"shop", "stored"})))
        pipeline = _Pipeline(outcome, refuse)
        service = PointsServicer(Settings(), pipeline)  # type: ignore[arg-type]
        context = _Context()
        kind = method.lower()
        call = getattr(service, method) if inline else (lambda r, c: service._unary(kind, r, c))
        response = None
        try:
            response = await asyncio.wait_for(call(request, context), 10)
        except _Aborted:
            pass
        return response, context.aborted, context.trailing, pipeline.queued

    return asyncio.run(main())


def _earn(**fields) -> pb.EarnRequest:
    values = {"merchant_id": "shop", "member_id": "m-1", "purchase_amount": 1_234, "idempotency_key": "k-1"}
    return pb.EarnRequest(**(values | fields))


def _redeem(**fields) -> pb.RedeemRequest:
    values = {"merchant_id": "shop", "member_id": "m-1", "points": 77, "idempotency_key": "k-2"}
    return pb.RedeemRequest(**(values | fields))


OK_EARN = Outcome(Code.OK, EARN_FIELDS)
OK_REDEEM = Outcome(Code.OK, REDEEM_FIELDS)
CASES = [
    ("Earn", _earn(), OK_EARN, None),
    ("Earn", _earn(merchant_id="stored"), OK_EARN, None),  # its merchant read first
    ("Earn", _earn(), Outcome(Code.OK, EARN_FIELDS, replayed=True), None),  # a replay: its trailer
    ("Earn", _earn(member_id=""), OK_EARN, None),
    ("Earn", _earn(purchase_amount=0), OK_EARN, None),
    ("Earn", _earn(idempotency_key="a key"), OK_EARN, None),
    ("Earn", _earn(merchant_id="nowhere"), OK_EARN, None),
    ("Earn", _earn(merchant_id="elsewhere"), OK_EARN, None),
    ("Earn", _earn(), Outcome(Code.FAILED_PRECONDITION, message="the merchant is suspended", recorded=False), None),
    ("Earn", _earn(), None, Rejection(Code.UNAVAILABLE, "the service is shutting down; retry")),
    ("Redeem", _redeem(), OK_REDEEM, None),
    ("Redeem", _redeem(merchant_id="stored", vouchers=5), OK_REDEEM, None),
    ("Redeem", _redeem(points=0), OK_REDEEM, None),
    ("Redeem", _redeem(vouchers=-1), OK_REDEEM, None),
    (
        "Redeem",
        _redeem(),
        Outcome(Code.FAILED_PRECONDITION, message="not enough points", reason="insufficient_points"),
        None,
    ),
    ("Redeem", _redeem(), Outcome(Code.ALREADY_EXISTS, message="key used for another request", replayed=True), None),
    ("Redeem", _redeem(), None, Rejection(Code.RESOURCE_EXHAUSTED, "the service is at capacity; retry")),
]


@pytest.mark.parametrize(("method", "request_", "outcome", "refuse"), CASES)
def test_the_inline_handler_answers_as_the_generic_path(method, request_, outcome, refuse):
    inline = _answer(method, request_, outcome, refuse, inline=True)
    generic = _answer(method, request_, outcome, refuse, inline=False)
    assert inline == generic
    response, aborted, _, queued = inline
    assert (response is None) != (aborted is None), "a call is answered or aborted, never both or neither"
    if outcome is not None and outcome.code is Code.OK and aborted is None:
        assert len(queued) == 1 and response is not None


def test_a_replayed_answer_carries_its_trailer_and_an_applied_one_does_not():
    _, _, replayed_trailer, _ = _answer("Earn", _earn(), Outcome(Code.OK, EARN_FIELDS, replayed=True), None, True)
    _, _, fresh_trailer, _ = _answer("Earn", _earn(), OK_EARN, None, True)
    assert replayed_trailer == (("points-idempotent-replay", "true"),)
    assert fresh_trailer == ()


def test_the_interceptor_wraps_a_method_once_and_again_for_a_new_handler():
    interceptor = rpc.RpcInterceptor(auth.Authenticator(None, 1.0))

    async def behaviour(request, context):
        return request

    first = grpc.unary_unary_rpc_method_handler(behaviour)
    second = grpc.unary_unary_rpc_method_handler(behaviour)

    async def wrap(handler, method):
        async def continuation(_):
            return handler

        return await interceptor.intercept_service(continuation, _Details(method))

    async def main():
        earn = "/points.v1.PointsService/Earn"
        a = await wrap(first, earn)
        b = await wrap(first, earn)
        c = await wrap(second, earn)  # a new handler for the method (a server built again): wrapped anew
        d = await wrap(first, "/points.v1.PointsService/Redeem")
        return a, b, c, d

    a, b, c, d = asyncio.run(main())
    assert a is b
    assert c is not a and d is not a
    assert a.unary_unary is not behaviour  # wrapped: authentication and accounting run around it


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()
