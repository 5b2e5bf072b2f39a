"""Ids are handed out once, forever (issue 13, item 1): after every kind of PointsService call the service
is restarted (SIGKILL) and then resynchronised (its writer-lock session killed), and the next
authorization of another merchant must get an id never seen, while every hold stays capturable by
the merchant that opened it. Before ledger_writer's high-water marks, a vouchers-only hold (which lives
in voucher_holds only) had its id handed out again after a restart: the next merchant could not
capture its own hold and the first one's next Authorize crashed the service."""

from __future__ import annotations

import re
import urllib.request

import grpc
import pytest

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import add_program_version, earn, error_of, unique, wait_program_in_force, wait_until

STORE, OWN_POINTS = "id-store", "id-own-points"
RESYNCS = re.compile(r"^points_pipeline_resyncs_total (\S+)$", re.M)


def _config() -> dict:
    # one dividend round (10%) once the pool passes 8,000 point-units, so members and a merchant hold
    # vouchers; the operator's store for merchants' voucher spends; a merchant with points of its own
    return {
        "dividends": {
            "threshold_point_units": 8_000,
            "growth_bps": 100_000,
            "rate_bps_schedule": [1_000],
            "credit_limit_bps": 50_000,
        },
        "operator_store_merchant_id": STORE,
        "merchant_terms": [{"merchant_id": OWN_POINTS, "conversion_rate": {"numerator": 3, "denominator": 2}}],
    }


class World:
    """The service under test, restarted and resynchronised in place, and every id it has given out."""

    def __init__(self, url: str):
        self.url = url
        self.service: ServiceProcess | None = None
        self.channel: grpc.Channel | None = None
        self.stub: points_pb2_grpc.PointsServiceStub | None = None
        self.transactions: list[str] = []
        self.authorizations: dict[str, str] = {}  # authorization id -> the merchant that opened it
        self.open_holds: dict[str, str] = {}  # the holds not yet captured or voided

    def start(self) -> None:
        self.service = ServiceProcess(self.url, "--dividend-check-seconds", "0.2").start()
        self.channel = self.service.channel()
        self.stub = points_pb2_grpc.PointsServiceStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.service is not None:
            self.service.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def resync(self) -> None:
        """Kills the writer-lock session: the service resynchronises from Postgres (and bumps the epoch)."""
        before = self._resyncs()
        epoch = fetch(self.url, "SELECT epoch FROM ledger_writer")[0]["epoch"]
        killed = fetch(
            self.url,
            """SELECT pg_terminate_backend(pid) AS k FROM pg_stat_activity
                                    WHERE application_name = 'points-processor-lock' AND datname = current_database()""",
        )
        assert [r["k"] for r in killed] == [True]
        wait_until(lambda: self._resyncs() > before, "the service did not resynchronise after losing its lock session")
        wait_until(
            lambda: fetch(self.url, "SELECT epoch FROM ledger_writer")[0]["epoch"] == epoch + 1,
            "the service did not take the writer role again",
        )
        wait_until(self._serving, "the service did not serve again after its resync")

    def _resyncs(self) -> float:
        with urllib.request.urlopen(f"http://{self.service.metrics_target}/metrics", timeout=10) as response:
            match = RESYNCS.search(response.read().decode())
        return float(match.group(1)) if match else 0.0

    def _serving(self) -> bool:
        try:
            self.stub.GetBalance(pb.GetBalanceRequest(member_id="nobody-at-all"), timeout=5)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return True

    def took(self, transaction_id: str) -> str:
        assert transaction_id.startswith("txn_"), transaction_id
        assert transaction_id not in self.transactions, f"transaction id {transaction_id} handed out twice"
        self.transactions.append(transaction_id)
        return transaction_id

    def opened(self, authorization_id: str, merchant: str) -> str:
        assert authorization_id.startswith("auth_"), authorization_id
        assert authorization_id not in self.authorizations, (
            f"authorization id {authorization_id} of {merchant} was already given to "
            f"{self.authorizations[authorization_id]}"
        )
        self.authorizations[authorization_id] = merchant
        self.open_holds[authorization_id] = merchant
        return authorization_id


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    for merchant in ("shop-a", "shop-b", "shop-c", STORE, OWN_POINTS):
        add_merchant(url, merchant, 1000)
    add_program_version(url, _config())
    world = World(url)
    world.start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    stub = world.stub
    world.alice, world.bob = unique("alice"), unique("bob")
    world.took(earn(stub, "shop-a", world.alice, 60_000).transaction_id)  # 6,000 point-units
    world.took(
        stub.Redeem(
            pb.RedeemRequest(merchant_id="shop-b", member_id=world.alice, points=1_000, idempotency_key=unique("k")),
            timeout=30,
        ).transaction_id
    )
    world.took(earn(stub, "shop-a", world.bob, 30_000).transaction_id)  # the pool passes 8,000
    wait_until(
        lambda: world.stub.GetBalance(pb.GetBalanceRequest(member_id=world.alice), timeout=30).vouchers > 0,
        "the dividend round did not arrive",
    )
    yield world
    world.stop()


def _authorize(world: World, merchant: str, member: str, points: int, vouchers: int = 0) -> str:
    response = world.stub.Authorize(
        pb.AuthorizeRequest(
            merchant_id=merchant, member_id=member, points=points, vouchers=vouchers, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    return world.opened(response.authorization_id, merchant)


def _capture(world: World, authorization_id: str) -> pb.CaptureResponse:
    merchant = world.open_holds.pop(authorization_id)
    response = world.stub.Capture(
        pb.CaptureRequest(merchant_id=merchant, authorization_id=authorization_id, idempotency_key=unique("k")),
        timeout=30,
    )
    world.took(response.transaction_id)
    return response


# Every method of PointsService that changes the ledger, each as one step (GetBalance and
# ListTransactions are called by every check below).
def _earn(world):
    world.took(earn(world.stub, "shop-a", unique("carol"), 20_000).transaction_id)


def _authorize_points(world):
    world.points_hold = _authorize(world, "shop-a", world.alice, 100)


def _authorize_vouchers_only(world):
    world.vouchers_hold = _authorize(world, "shop-a", world.alice, 0, vouchers=10)


def _authorize_split(world):
    world.split_hold = _authorize(world, "shop-b", world.alice, 50, vouchers=10)


def _capture_points(world):
    _capture(world, world.points_hold)


def _void(world):
    merchant = world.open_holds.pop(world.split_hold)
    released = world.stub.Void(
        pb.VoidRequest(merchant_id=merchant, authorization_id=world.split_hold, idempotency_key=unique("k")), timeout=30
    )
    assert (released.released, released.vouchers_released) == (50, 10)


def _redeem(world):
    world.redeemed = world.took(
        world.stub.Redeem(
            pb.RedeemRequest(merchant_id="shop-b", member_id=world.alice, points=100, idempotency_key=unique("k")),
            timeout=30,
        ).transaction_id
    )


def _redeem_split(world):
    world.took(
        world.stub.Redeem(
            pb.RedeemRequest(
                merchant_id="shop-b", member_id=world.alice, points=10, vouchers=10, idempotency_key=unique("k")
            ),
            timeout=30,
        ).transaction_id
    )


def _refund(world):
    world.took(
        world.stub.Refund(
            pb.RefundRequest(
                merchant_id="shop-b", transaction_id=world.redeemed, points=50, idempotency_key=unique("k")
            ),
            timeout=30,
        ).transaction_id
    )


def _link(world):
    linked = world.stub.LinkMember(
        pb.LinkMemberRequest(merchant_id="shop-c", member_id=unique("dave"), idempotency_key=unique("k")), timeout=30
    )
    assert linked.acquirer_id == "shop-c"


def _convert(world):
    world.took(
        world.stub.ConvertMerchantPoints(
            pb.ConvertMerchantPointsRequest(
                merchant_id=OWN_POINTS, member_id=unique("eve"), merchant_points=30, idempotency_key=unique("k")
            ),
            timeout=30,
        ).transaction_id
    )


def _cash_out(world):
    refused = error_of(
        lambda: world.stub.CashOut(pb.CashOutRequest(merchant_id="shop-a", member_id=world.alice, points=1), timeout=30)
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT


def _spend_vouchers(world):
    world.took(
        world.stub.SpendMerchantVouchers(
            pb.SpendMerchantVouchersRequest(merchant_id="shop-b", vouchers=5, idempotency_key=unique("k")), timeout=30
        ).transaction_id
    )


def _submit_batch(world):
    results = world.stub.SubmitBatch(
        pb.SubmitBatchRequest(
            operations=[
                pb.Operation(
                    earn=pb.EarnRequest(
                        merchant_id="shop-c",
                        member_id=unique("fay"),
                        purchase_amount=10_000,
                        idempotency_key=unique("k"),
                    )
                ),
                pb.Operation(
                    authorize=pb.AuthorizeRequest(
                        merchant_id="shop-c", member_id=world.alice, vouchers=5, idempotency_key=unique("k")
                    )
                ),
            ]
        ),
        timeout=30,
    ).results
    assert [r.outcome for r in results] == [pb.OPERATION_OUTCOME_APPLIED] * 2, results
    world.took(results[0].earn.transaction_id)
    world.opened(results[1].authorize.authorization_id, "shop-c")


def _stream(world):
    requests = [
        pb.StreamRequest(
            correlation_id="1",
            operation=pb.Operation(
                authorize=pb.AuthorizeRequest(
                    merchant_id="shop-b", member_id=world.bob, points=10, vouchers=5, idempotency_key=unique("k")
                )
            ),
        ),
        pb.StreamRequest(
            correlation_id="2",
            operation=pb.Operation(
                earn=pb.EarnRequest(
                    merchant_id="shop-b", member_id=world.bob, purchase_amount=10_000, idempotency_key=unique("k")
                )
            ),
        ),
    ]
    results = {r.correlation_id: r.result for r in world.stub.Stream(iter(requests), timeout=30)}
    assert {c: r.outcome for c, r in results.items()} == {
        "1": pb.OPERATION_OUTCOME_APPLIED,
        "2": pb.OPERATION_OUTCOME_APPLIED,
    }, results
    world.opened(results["1"].authorize.authorization_id, "shop-b")
    world.took(results["2"].earn.transaction_id)


STEPS = [
    _earn,
    _authorize_points,
    _authorize_vouchers_only,
    _authorize_split,
    _capture_points,
    _void,
    _redeem,
    _redeem_split,
    _refund,
    _link,
    _convert,
    _cash_out,
    _spend_vouchers,
    _submit_batch,
    _stream,
]


def _after(world: World, what: str) -> None:
    """Another merchant's next authorization gets a new id, and the ledger reconciles."""
    probe = _authorize(world, "shop-c", world.bob, 1)
    assert world.stub.GetBalance(pb.GetBalanceRequest(member_id=world.bob), timeout=30).held >= 1, what
    listed = world.stub.ListTransactions(pb.ListTransactionsRequest(member_id=world.alice, page_size=200), timeout=30)
    assert listed.transactions, what
    assert probe in world.open_holds


def test_no_id_is_handed_out_twice_across_restarts_and_resyncs_after_every_call(world):
    for step in STEPS:
        step(world)
        world.restart()
        _after(world, f"after {step.__name__} and a restart")
        world.resync()
        _after(world, f"after {step.__name__} and a resync")
    # every hold still open, the vouchers-only and split ones included, is its owner's to capture
    for authorization_id in list(world.open_holds):
        _capture(world, authorization_id)
    stored = fetch(
        world.url,
        """SELECT authorization_id, merchant_id FROM holds
                                 UNION SELECT authorization_id, merchant_id FROM voucher_holds""",
    )
    by_id = {f"auth_{r['authorization_id']}": r["merchant_id"] for r in stored}
    assert len(by_id) == len(stored), "an authorization id names holds of two merchants"
    assert by_id == world.authorizations
    assert ledger_discrepancies(world.url) == []


def test_ids_continue_after_the_high_water_marks_not_the_tables(world):
    """The marks are the one source: ids handed out by a batch that never committed are not reused
    either, and a mark moved on (as by a restore tool) is continued from."""
    marks = fetch(world.url, "SELECT last_transaction_id AS t, last_authorization_id AS a FROM ledger_writer")[0]
    fetch(
        world.url,
        "UPDATE ledger_writer SET last_transaction_id = $1, last_authorization_id = $2",
        marks["t"] + 1000,
        marks["a"] + 1000,
    )
    world.restart()
    transaction_id = world.took(earn(world.stub, "shop-a", unique("gil"), 10_000).transaction_id)
    authorization_id = _authorize(world, "shop-a", world.alice, 1)
    assert int(transaction_id.removeprefix("txn_")) == marks["t"] + 1001
    assert int(authorization_id.removeprefix("auth_")) == marks["a"] + 1001
    _capture(world, authorization_id)
    assert ledger_discrepancies(world.url) == []


def test_reconcile_names_an_id_above_the_marks_and_an_authorization_of_two_merchants(world):
    marks = fetch(world.url, "SELECT last_transaction_id AS t, last_authorization_id AS a FROM ledger_writer")[0]
    largest = fetch(
        world.url,
        """SELECT greatest((SELECT max(authorization_id) FROM holds),
                                                  (SELECT max(authorization_id) FROM voucher_holds)) AS a""",
    )[0]["a"]
    hold = fetch(
        world.url,
        """SELECT authorization_id, member_id FROM holds h WHERE NOT EXISTS
                                 (SELECT 1 FROM voucher_holds v WHERE v.authorization_id = h.authorization_id)
                               ORDER BY authorization_id LIMIT 1""",
    )[0]
    try:
        fetch(world.url, "UPDATE ledger_writer SET last_authorization_id = $1", largest - 1)
        fetch(
            world.url,
            """INSERT INTO voucher_holds (authorization_id, member_id, merchant_id, vouchers,
                                                       from_credit, points, expires_at, status, created_at,
                                                       resolved_at)
                            VALUES ($1, $2, 'shop-b', 1, 0, 0, now(), 3, now(), now())""",
            hold["authorization_id"],
            hold["member_id"],
        )
        problems = ledger_discrepancies(world.url)
        assert any(f"authorization id {largest} is above the high-water mark {largest - 1}" in p for p in problems), (
            problems
        )
        assert any(
            f"authorization {hold['authorization_id']}: a points hold and a voucher hold of different" in p
            for p in problems
        ), problems
    finally:
        fetch(
            world.url,
            "DELETE FROM voucher_holds WHERE authorization_id = $1 AND merchant_id = 'shop-b' "
            "AND status = 3 AND vouchers = 1",
            hold["authorization_id"],
        )
        fetch(world.url, "UPDATE ledger_writer SET last_authorization_id = $1", marks["a"])
    assert ledger_discrepancies(world.url) == []


def test_list_transactions_shows_each_tender_of_a_split_redeem_and_its_refund(world):
    """ListTransactions of a member with split-tender rows answered UNKNOWN (KeyError 12): every kind is
    in processor/kinds.py now, and the points and vouchers shown are the member's own entries."""
    member = world.alice
    spent = world.stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=member, points=7, vouchers=3, idempotency_key=unique("k")),
        timeout=30,
    )
    refund = world.stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=spent.transaction_id, points=10, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    listed = world.stub.ListTransactions(pb.ListTransactionsRequest(member_id=member, page_size=200), timeout=30)
    by_id = {t.transaction_id: t for t in listed.transactions}
    split, back = by_id[spent.transaction_id], by_id[refund.transaction_id]
    assert (split.kind, split.points, split.vouchers, split.merchant_id) == (
        pb.TRANSACTION_KIND_SPLIT_REDEEM,
        -7,
        -3,
        "shop-b",
    )
    assert (back.kind, back.points, back.vouchers, back.original_transaction_id) == (
        pb.TRANSACTION_KIND_SPLIT_REFUND,
        7,
        3,
        spent.transaction_id,
    )
    kinds_seen = {t.kind for t in listed.transactions}
    assert {
        pb.TRANSACTION_KIND_EARN,
        pb.TRANSACTION_KIND_CAPTURE,
        pb.TRANSACTION_KIND_REDEEM,
        pb.TRANSACTION_KIND_REFUND_OF_REDEMPTION,
    } <= kinds_seen
