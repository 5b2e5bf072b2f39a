"""Locust users for the points service, speaking gRPC (the sync grpc client made cooperative by gevent,
as in Locust's own gRPC example) to a service running in its own process.

    python -m loadtest.run --scenario alliance --seconds 60 --users 50     # starts everything it needs
    POINTS_LOAD_KEY=pk_... locust -f loadtest/locustfile.py --host 127.0.0.1:50051 AllianceUser

Users
  AllianceUser  merchant systems of a coalition, one unary call at a time: earns (50%), redeems (20%),
                authorize+capture pairs (15%), authorize+void pairs (5%), refunds of an earlier
                redemption (5%) and balance reads (5%).
  GatewayUser   a gateway forwarding earns (75%) and redeems (25%) with SubmitBatch,
                POINTS_LOAD_BATCH_OPERATIONS operations per call.
Both draw members from a Zipf distribution over the seeded members (a few members do most of the
buying) and merchants with a few very hot ones (seed-m-000001.. take POINTS_LOAD_HOT_MERCHANT_SHARE of
the traffic, the rest is spread evenly).

Configuration (environment variables; Locust's own options such as --host, -u, -r, -t as usual)
  POINTS_LOAD_TARGET               HOST:PORT of the service when --host is not given [127.0.0.1:50051]
  POINTS_LOAD_KEY                  API key sent as `authorization: Bearer <key>`: a gateway key listing
                                   every merchant used (or a merchant key with POINTS_LOAD_MERCHANTS=1)
                                   [required]
  POINTS_LOAD_MERCHANTS            merchants used: seed-m-000001 .. seed-m-<N> [200]
  POINTS_LOAD_MEMBERS              members used: seed-u-0000001 .. seed-u-<N> [20000]
  POINTS_LOAD_HOT_MERCHANTS        how many of the first merchants are hot [3]
  POINTS_LOAD_HOT_MERCHANT_SHARE   fraction of all operations at the hot merchants [0.4]
  POINTS_LOAD_MEMBER_EXPONENT      Zipf exponent of the member draw; 0 = uniform [1.0]
  POINTS_LOAD_BATCH_OPERATIONS     operations per SubmitBatch call of GatewayUser [100]
  POINTS_LOAD_WAIT_SECONDS         each user waits a random 0..N seconds between tasks; 0 = none [0]
  POINTS_LOAD_TIMEOUT_SECONDS      deadline of each call [10]
  POINTS_LOAD_SEED                 seed of the users' random draws (user i uses seed + i) [1]

What the report shows: one row per gRPC method (request type `grpc`). A refusal the ledger decided
(FAILED_PRECONDITION: not enough points, hold already resolved...) is a normal business outcome, not a
failure: it is counted under its own name, e.g. `Redeem FAILED_PRECONDITION`. Every other non-OK
status is a failure. GatewayUser also reports each operation of a batch (request type `operation`,
named by kind and outcome, with the response time of the call that carried it), so that the `operation`
rows give operations per second; operations answered RETRY, INVALID, NOT_FOUND, KEY_REUSED or
PERMISSION_DENIED are failures.
"""

from __future__ import annotations

# isort: off
# locust first: it patches the standard library for gevent before grpc and the rest are imported
from locust import User, between, constant, task

import collections
import os
import pathlib
import random
import sys
import time
import uuid

import grpc
import grpc.experimental.gevent as grpc_gevent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root: loadtest, points

from loadtest import workload
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
# isort: on

grpc_gevent.init_gevent()  # grpc's completion queue polled cooperatively, so users do not block each other


def _setting(name: str, default, kind=str):
    value = os.environ.get("POINTS_LOAD_" + name)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"POINTS_LOAD_{name}={value!r} is not a valid {kind.__name__}") from None


TARGET = _setting("TARGET", "127.0.0.1:50051")
KEY = _setting("KEY", "")
NETWORK = workload.Network(
    merchants=_setting("MERCHANTS", 200, int),
    members=_setting("MEMBERS", 20_000, int),
    hot_merchants=_setting("HOT_MERCHANTS", 3, int),
    hot_merchant_share=_setting("HOT_MERCHANT_SHARE", 0.4, float),
    member_exponent=_setting("MEMBER_EXPONENT", 1.0, float),
)
BATCH_OPERATIONS = _setting("BATCH_OPERATIONS", 100, int)
WAIT_SECONDS = _setting("WAIT_SECONDS", 0.0, float)
TIMEOUT_SECONDS = _setting("TIMEOUT_SECONDS", 10.0, float)
SEED = _setting("SEED", 1, int)

# Refusals the ledger decides: business outcomes a real alliance sees every day, not failures.
BUSINESS_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION})
# Batch outcomes that are failures (the service or the test is wrong, or the service sheds load).
FAILED_OUTCOMES = frozenset(
    {
        pb.OPERATION_OUTCOME_UNSPECIFIED,
        pb.OPERATION_OUTCOME_RETRY,
        pb.OPERATION_OUTCOME_INVALID,
        pb.OPERATION_OUTCOME_NOT_FOUND,
        pb.OPERATION_OUTCOME_KEY_REUSED,
        pb.OPERATION_OUTCOME_PERMISSION_DENIED,
    }
)
_user_numbers = iter(range(1_000_000_000))


class OperationFailed(Exception):
    """An operation of a batch came back with an outcome that is a failure."""


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Fires one Locust request event per unary call: name (the method), response time, response
    length, and the RpcError as the exception unless the status is a business outcome."""

    def __init__(self, environment):
        self.environment = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name = client_call_details.method.rpartition("/")[2]
        began = time.perf_counter()
        call = continuation(client_call_details, request)
        response_length, exception = 0, None
        try:
            response_length = call.result().ByteSize()
        except grpc.RpcError as error:
            if error.code() in BUSINESS_CODES:
                name = f"{name} {error.code().name}"
            else:
                exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - began) * 1000.0,
            response_length=response_length,
            response=None,
            context=None,
            exception=exception,
        )
        return call


class PointsUser(User):
    """A gRPC channel of its own through the Locust interceptor, and the network's draws."""

    abstract = True
    wait_time = between(0, WAIT_SECONDS) if WAIT_SECONDS > 0 else constant(0)

    def __init__(self, environment):
        super().__init__(environment)
        if not KEY:
            raise SystemExit(
                "set POINTS_LOAD_KEY to an API key (a gateway key listing the merchants used); "
                "python -m loadtest.run creates one for you"
            )
        self.number = next(_user_numbers)
        self.rng = random.Random(SEED + self.number)
        self.traffic = workload.Traffic(NETWORK, self.rng)
        self.metadata = (("authorization", f"Bearer {KEY}"),)
        self.key_prefix = f"lt-{uuid.uuid4().hex[:12]}-"
        self.keys = 0
        self._channel = grpc.insecure_channel(self.host or TARGET)
        self.stub = points_pb2_grpc.PointsServiceStub(
            grpc.intercept_channel(self._channel, LocustInterceptor(environment))
        )

    def idempotency_key(self) -> str:
        self.keys += 1
        return f"{self.key_prefix}{self.keys}"

    def call(self, method, request):
        """The response, or None when the call failed (the interceptor has reported it)."""
        try:
            return method(request, metadata=self.metadata, timeout=TIMEOUT_SECONDS)
        except grpc.RpcError:
            return None

    def on_stop(self):
        self._channel.close()


class AllianceUser(PointsUser):
    weight = 10

    def __init__(self, environment):
        super().__init__(environment)
        # redemptions of this user that can still be refunded: (merchant_id, transaction_id, points)
        self.refundable: collections.deque = collections.deque(maxlen=100)

    @task(50)
    def earn(self):
        self.call(
            self.stub.Earn,
            pb.EarnRequest(
                merchant_id=self.traffic.merchant(),
                member_id=self.traffic.member(),
                purchase_amount=self.traffic.purchase_amount(),
                idempotency_key=self.idempotency_key(),
            ),
        )

    @task(20)
    def redeem(self):
        merchant = self.traffic.merchant()
        response = self.call(
            self.stub.Redeem,
            pb.RedeemRequest(
                merchant_id=merchant,
                member_id=self.traffic.member(),
                points=self.traffic.points(),
                idempotency_key=self.idempotency_key(),
            ),
        )
        if response is not None:
            self.refundable.append((merchant, response.transaction_id, response.points))

    def _authorize(self):
        merchant = self.traffic.merchant()
        response = self.call(
            self.stub.Authorize,
            pb.AuthorizeRequest(
                merchant_id=merchant,
                member_id=self.traffic.member(),
                points=self.traffic.points(),
                idempotency_key=self.idempotency_key(),
            ),
        )
        return merchant, response

    @task(15)
    def authorize_capture(self):
        merchant, hold = self._authorize()
        if hold is None:
            return
        # most captures take the whole hold (0 = all); some take part of it and release the rest
        points = 0 if self.rng.random() < 0.7 else self.rng.randint(1, hold.points)
        response = self.call(
            self.stub.Capture,
            pb.CaptureRequest(
                merchant_id=merchant,
                authorization_id=hold.authorization_id,
                points=points,
                idempotency_key=self.idempotency_key(),
            ),
        )
        if response is not None and response.transaction_id:
            self.refundable.append((merchant, response.transaction_id, response.points))

    @task(5)
    def authorize_void(self):
        merchant, hold = self._authorize()
        if hold is not None:
            self.call(
                self.stub.Void,
                pb.VoidRequest(
                    merchant_id=merchant, authorization_id=hold.authorization_id, idempotency_key=self.idempotency_key()
                ),
            )

    @task(5)
    def refund(self):
        if not self.refundable:
            return self.earn()
        merchant, transaction_id, points = self.refundable.popleft()
        self.call(
            self.stub.Refund,
            pb.RefundRequest(
                merchant_id=merchant,
                transaction_id=transaction_id,
                points=self.rng.randint(1, points),
                idempotency_key=self.idempotency_key(),
            ),
        )

    @task(5)
    def get_balance(self):
        self.call(self.stub.GetBalance, pb.GetBalanceRequest(member_id=self.traffic.member()))


class GatewayUser(PointsUser):
    weight = 1

    def _operation(self) -> pb.Operation:
        traffic = self.traffic
        if self.rng.random() < 0.25:
            return pb.Operation(
                redeem=pb.RedeemRequest(
                    merchant_id=traffic.merchant(),
                    member_id=traffic.member(),
                    points=traffic.points(),
                    idempotency_key=self.idempotency_key(),
                )
            )
        return pb.Operation(
            earn=pb.EarnRequest(
                merchant_id=traffic.merchant(),
                member_id=traffic.member(),
                purchase_amount=traffic.purchase_amount(),
                idempotency_key=self.idempotency_key(),
            )
        )

    @task
    def submit_batch(self):
        operations = [self._operation() for _ in range(BATCH_OPERATIONS)]
        began = time.perf_counter()
        response = self.call(self.stub.SubmitBatch, pb.SubmitBatchRequest(operations=operations))
        if response is None:
            return
        milliseconds = (time.perf_counter() - began) * 1000.0
        fire = self.environment.events.request.fire
        for operation, result in zip(operations, response.results):
            outcome = pb.OperationOutcome.Name(result.outcome).removeprefix("OPERATION_OUTCOME_")
            failed = result.outcome in FAILED_OUTCOMES
            fire(
                request_type="operation",
                name=f"{operation.WhichOneof('operation')} {outcome}",
                response_time=milliseconds,
                response_length=0,
                response=None,
                context=None,
                exception=OperationFailed(result.message) if failed else None,
            )
