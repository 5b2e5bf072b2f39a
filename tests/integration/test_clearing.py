"""Clearing against a real service and Postgres: the operator's fees, merchant positions, settlement
periods closed while traffic runs, statements and their CSV export, and the reconcile and seed commands.

Fees are floor(point-units * bps / 10000), posted inside the transaction they are charged on (the
merchant's fees account to the operator's fee revenue); earns use fee_issued_bps, captures and redeems
fee_redeemed_bps, refunds charge nothing and give nothing back. A settlement period holds every
transaction with opened_at <= created_at < cut_off and never changes after its cut.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import csv
import dataclasses
import datetime as dt
import io
import random
import subprocess
import threading
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import add_merchant, connect, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import cli, credential, error_of, unique, wait_program_in_force
from tests.integration.ledger_rows import Ledger, rules_ledger

pytestmark = pytest.mark.timeout(120)

TRAFFIC_THREADS = 16
# Cuts made while the traffic runs; acknowledged operations to wait for between two of them (so each
# period has traffic of its own).
CUTS_UNDER_TRAFFIC = 12
OPERATIONS_PER_PERIOD_MIN = 10
TRAFFIC_WAIT_SECONDS_MAX = 30

EARN, CAPTURE, REDEEM, REFUND_OF_REDEMPTION, REFUND_OF_EARN = 1, 2, 3, 4, 5
KIND_TEXT = {
    EARN: "earn",
    CAPTURE: "capture",
    REDEEM: "redeem",
    REFUND_OF_REDEMPTION: "refund_of_redemption",
    REFUND_OF_EARN: "refund_of_earn",
}
STATEMENT_FIELDS = (
    "merchant_id",
    "period_id",
    "opening_position",
    "issued",
    "earn_refunds",
    "redeemed",
    "redemption_refunds",
    "fees",
    "net",
    "closing_position",
    "transactions",
    "acquiring",
    "acquiring_reversals",
)


def now_timestamp() -> timestamp_pb2.Timestamp:
    """Now, to the microsecond (what Postgres stores)."""
    micros = time.time_ns() // 1000
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def as_datetime(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.timezone.utc)


def assert_refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


# ---------------------------------------------------------------------------------------------------
# Fixtures and clients


class Operator:
    """Clearing (and MerchantAdmin) with the operator's credential on every call."""

    def __init__(self, channel, key: str):
        self.clearing = admin_pb2_grpc.ClearingStub(channel)
        self.metadata = credential(key)

    def __getattr__(self, method: str):
        rpc = getattr(self.clearing, method)
        return lambda request: rpc(request, metadata=self.metadata, timeout=30)

    def close(self, cut_off: timestamp_pb2.Timestamp) -> admin_pb2.SettlementPeriod:
        return self.CloseSettlementPeriod(admin_pb2.CloseSettlementPeriodRequest(cut_off=cut_off))

    def position(self, merchant_id: str) -> admin_pb2.MerchantPosition:
        return self.GetMerchantPosition(admin_pb2.GetMerchantPositionRequest(merchant_id=merchant_id))

    def period_statements(self, period_id: int, page_size: int = 0) -> list[admin_pb2.Statement]:
        seen, token = [], ""
        while True:
            page = self.ListStatements(
                admin_pb2.ListStatementsRequest(period_id=period_id, page_token=token, page_size=page_size)
            )
            seen.extend(page.statements)
            token = page.next_page_token
            if not token:
                return seen

    def export(self, period_id: int, merchant_id: str = "") -> tuple[list[dict], int]:
        response = self.ExportStatement(admin_pb2.ExportStatementRequest(period_id=period_id, merchant_id=merchant_id))
        rows = list(csv.DictReader(io.StringIO(response.csv.decode("utf-8"))))
        return rows, response.lines


@pytest.fixture(scope="module")
def operator(service, channel) -> Operator:
    return Operator(channel, create_key(service.database_url, "operator"))


class Merchant:
    """A merchant's till: its key on every call; returns what the service acknowledged."""

    def __init__(self, points, merchant_id: str, key: str):
        self.points = points
        self.merchant_id = merchant_id
        self.metadata = credential(key)

    def earn(self, member: str, purchase: int) -> points_pb2.EarnResponse:
        return self.points.Earn(
            points_pb2.EarnRequest(
                merchant_id=self.merchant_id, member_id=member, purchase_amount=purchase, idempotency_key=unique("k")
            ),
            metadata=self.metadata,
            timeout=30,
        )

    def redeem(self, member: str, points: int) -> points_pb2.RedeemResponse:
        return self.points.Redeem(
            points_pb2.RedeemRequest(
                merchant_id=self.merchant_id, member_id=member, points=points, idempotency_key=unique("k")
            ),
            metadata=self.metadata,
            timeout=30,
        )

    def authorize(self, member: str, points: int) -> points_pb2.AuthorizeResponse:
        return self.points.Authorize(
            points_pb2.AuthorizeRequest(
                merchant_id=self.merchant_id, member_id=member, points=points, idempotency_key=unique("k")
            ),
            metadata=self.metadata,
            timeout=30,
        )

    def capture(self, authorization_id: str, points: int = 0) -> points_pb2.CaptureResponse:
        return self.points.Capture(
            points_pb2.CaptureRequest(
                merchant_id=self.merchant_id,
                authorization_id=authorization_id,
                points=points,
                idempotency_key=unique("k"),
            ),
            metadata=self.metadata,
            timeout=30,
        )

    def refund(self, transaction_id: str, points: int) -> points_pb2.RefundResponse:
        return self.points.Refund(
            points_pb2.RefundRequest(
                merchant_id=self.merchant_id, transaction_id=transaction_id, points=points, idempotency_key=unique("k")
            ),
            metadata=self.metadata,
            timeout=30,
        )


@pytest.fixture(scope="module")
def points(channel):
    return points_pb2_grpc.PointsServiceStub(channel)


@pytest.fixture
def make_merchant(service, points):
    def make(give_back_bps: int = 1000, fee_redeemed_bps: int = 0, fee_issued_bps: int = 0) -> Merchant:
        merchant_id = unique("m")
        key = add_merchant(
            service.database_url,
            merchant_id,
            give_back_bps,
            fee_redeemed_bps=fee_redeemed_bps,
            fee_issued_bps=fee_issued_bps,
        )
        return Merchant(points, merchant_id, key)

    return make


def transaction_number(transaction_id: str) -> int:
    return int(transaction_id.removeprefix("txn_"))


# ---------------------------------------------------------------------------------------------------
# Fees and positions


def fee_entries(database_url: str, transaction_id: str) -> list[tuple[str, str, int]]:
    """(account kind, owner, amount) of a transaction's fee entries."""
    rows = fetch(
        database_url,
        """SELECT a.kind, a.owner_id, e.amount FROM entries e JOIN accounts a USING (account_id)
                                  WHERE e.transaction_id = $1 AND a.kind IN ('merchant_fees', 'operator_fee_revenue')
                                  ORDER BY a.kind""",
        transaction_number(transaction_id),
    )
    return [(r["kind"], r["owner_id"], r["amount"]) for r in rows]


def fee_revenue(database_url: str) -> int:
    return fetch(database_url, "SELECT balance FROM account_balances WHERE kind = 'operator_fee_revenue'")[0]["balance"]


def test_fees_round_down_post_in_their_transaction_and_add_up_in_the_position(service, operator, make_merchant):
    """Hand-computed: at 150 bps a redemption of 333 point-units costs floor(4.995) = 4, of 1 costs 0;
    at 250 bps an earn of 133 costs floor(3.325) = 3; refunds cost nothing and return nothing."""
    url = service.database_url
    merchant = make_merchant(give_back_bps=1000, fee_redeemed_bps=150, fee_issued_bps=250)
    m = merchant.merchant_id
    member = unique("mem")
    revenue_before = fee_revenue(url)
    issued = redeemed = fees = 0

    def check(transaction_id: str, kind: int, amount: int, fee: int) -> None:
        nonlocal fees
        fees += fee
        row = fetch(
            url,
            "SELECT kind, merchant_id, amount, fee FROM transactions WHERE transaction_id = $1",
            transaction_number(transaction_id),
        )[0]
        assert (row["kind"], row["merchant_id"], row["amount"], row["fee"]) == (kind, m, amount, fee)
        expected = [("merchant_fees", m, -fee), ("operator_fee_revenue", "operator", fee)] if fee else []
        assert fee_entries(url, transaction_id) == expected
        sums = fetch(
            url, "SELECT sum(amount) AS s FROM entries WHERE transaction_id = $1", transaction_number(transaction_id)
        )
        assert sums[0]["s"] in (0, None)
        position = operator.position(m)
        assert (position.issued, position.redeemed, position.fees) == (issued, redeemed, fees)
        assert position.net == redeemed - issued - fees
        assert fee_revenue(url) - revenue_before == fees

    # earns: fee_issued_bps = 250
    for purchase, points, fee in ((1_000_000, 100_000, 2_500), (1_337, 133, 3), (39, 3, 0), (3, 0, 0)):
        response = merchant.earn(member, purchase)
        assert response.points == points
        issued += points
        check(response.transaction_id, EARN, points, fee)
        if purchase == 1_337:
            small_earn = response.transaction_id
    # redemptions: fee_redeemed_bps = 150
    redemptions = {}
    for points, fee in ((333, 4), (1, 0), (66, 0), (67, 1), (6_667, 100)):
        response = merchant.redeem(member, points)
        redeemed += points
        check(response.transaction_id, REDEEM, points, fee)
        redemptions[points] = response.transaction_id
    # captures: part of a hold, and a whole hold (0 = all)
    for held, asked, captured_points, fee in ((1_000, 667, 667, 10), (500, 0, 500, 7)):
        hold = merchant.authorize(member, held)
        response = merchant.capture(hold.authorization_id, asked)
        assert response.points == captured_points
        redeemed += captured_points
        check(response.transaction_id, CAPTURE, captured_points, fee)
    # refunds charge no fee and give none back
    refund = merchant.refund(redemptions[333], 200)
    redeemed -= 200
    check(refund.transaction_id, REFUND_OF_REDEMPTION, 200, 0)
    refund = merchant.refund(small_earn, 133)
    issued -= 133
    check(refund.transaction_id, REFUND_OF_EARN, 133, 0)
    assert (
        fetch(url, "SELECT fee FROM transactions WHERE transaction_id = $1", transaction_number(redemptions[333]))[0][
            "fee"
        ]
        == 4
    )

    position = operator.position(m)
    assert (position.issued, position.redeemed, position.fees) == (100_003, 8_101, 2_625)
    assert position.net == 8_101 - 100_003 - 2_625
    assert position.as_of.seconds > 0


def test_fees_on_large_amounts_are_exact(service, operator, make_merchant):
    merchant = make_merchant(give_back_bps=2000, fee_redeemed_bps=9_999, fee_issued_bps=1)
    member = unique("mem")
    earned = merchant.earn(member, 10**13)  # 2 * 10^12 point-units, fee floor(2 * 10^8) = 200,000,000
    assert earned.points == 2 * 10**12
    redeemed = merchant.redeem(member, 10**12 - 1)  # fee floor(999999999999 * 0.9999) = 999,899,999,999
    rows = fetch(
        service.database_url,
        "SELECT amount, fee FROM transactions WHERE transaction_id = ANY($1) ORDER BY transaction_id",
        [transaction_number(earned.transaction_id), transaction_number(redeemed.transaction_id)],
    )
    assert [(r["amount"], r["fee"]) for r in rows] == [(2 * 10**12, 200_000_000), (10**12 - 1, 999_899_999_999)]
    position = operator.position(merchant.merchant_id)
    fees = 999_899_999_999 + 200_000_000
    assert (position.issued, position.redeemed, position.fees) == (2 * 10**12, 10**12 - 1, fees)
    assert position.net == (10**12 - 1) - 2 * 10**12 - fees


def test_a_fee_of_every_point_leaves_the_merchant_nothing(service, operator, make_merchant):
    merchant = make_merchant(give_back_bps=1000, fee_redeemed_bps=10_000)
    member = unique("mem")
    merchant.earn(member, 10_000)
    merchant.redeem(member, 777)
    position = operator.position(merchant.merchant_id)
    assert (position.issued, position.redeemed, position.fees, position.net) == (1_000, 777, 777, -1_000)


def test_position_of_an_unknown_merchant_is_not_found(operator):
    assert_refused(lambda: operator.position(unique("nobody")), grpc.StatusCode.NOT_FOUND)
    assert_refused(lambda: operator.position("bad id"), grpc.StatusCode.INVALID_ARGUMENT)


# ---------------------------------------------------------------------------------------------------
# Settlement: what Postgres says each period holds


def latest_period(database_url: str):
    rows = fetch(
        database_url, "SELECT period_id, opened_at, cut_off FROM settlement_periods ORDER BY period_id DESC LIMIT 1"
    )
    return rows[0] if rows else None


def expected_statements(database_url: str) -> dict[int, dict[str, dict]]:
    """Every closed period's statements as the journal implies them, computed now from the transactions
    dated in each period (not from the statements table): period_id -> merchant_id -> fields. For a ledger
    of earns, redemptions and refunds without program rules (no acquiring rewards, amount = what the
    merchant owes or is owed)."""
    periods = fetch(database_url, "SELECT period_id, opened_at, cut_off FROM settlement_periods ORDER BY period_id")
    transactions = fetch(database_url, "SELECT merchant_id, kind, amount, fee, created_at FROM transactions")
    result: dict[int, dict[str, dict]] = {}
    closing: dict[str, int] = {}
    for period in periods:
        moves: dict[str, dict] = {}
        for t in transactions:
            if not period["opened_at"] <= t["created_at"] < period["cut_off"]:
                continue
            s = moves.setdefault(t["merchant_id"], collections.Counter())
            field = {
                EARN: "issued",
                REFUND_OF_EARN: "earn_refunds",
                CAPTURE: "redeemed",
                REDEEM: "redeemed",
                REFUND_OF_REDEMPTION: "redemption_refunds",
            }[t["kind"]]
            s[field] += t["amount"]
            s["fees"] += t["fee"]
            s["transactions"] += 1
        statements = {}
        for merchant_id in set(moves) | set(closing):
            s = moves.get(merchant_id, collections.Counter())
            net = s["redeemed"] - s["redemption_refunds"] - s["issued"] + s["earn_refunds"] - s["fees"]
            opening = closing.get(merchant_id, 0)
            statements[merchant_id] = {
                "merchant_id": merchant_id,
                "period_id": period["period_id"],
                "opening_position": opening,
                "issued": s["issued"],
                "earn_refunds": s["earn_refunds"],
                "redeemed": s["redeemed"],
                "redemption_refunds": s["redemption_refunds"],
                "fees": s["fees"],
                "net": net,
                "closing_position": opening + net,
                "transactions": s["transactions"],
                "acquiring": 0,
                "acquiring_reversals": 0,
            }
            closing[merchant_id] = opening + net
        result[period["period_id"]] = statements
    return result


def statement_fields(statement: admin_pb2.Statement) -> dict:
    return {name: getattr(statement, name) for name in STATEMENT_FIELDS}


def check_exports(
    operator: Operator, period: admin_pb2.SettlementPeriod, statements: list[admin_pb2.Statement]
) -> None:
    """The period's CSV is its statements, line for line; each merchant's line detail sums exactly to
    its statement."""
    rows, lines = operator.export(period.period_id)
    assert lines == len(rows) == len(statements) == period.merchants
    by_merchant = {s.merchant_id: s for s in statements}
    assert [r["merchant_id"] for r in rows] == [s.merchant_id for s in statements]
    for row in rows:
        statement = by_merchant[row["merchant_id"]]
        assert {name: int(row[name]) for name in STATEMENT_FIELDS if name != "merchant_id"} == {
            name: getattr(statement, name) for name in STATEMENT_FIELDS if name != "merchant_id"
        }
    assert sum(int(r["net"]) for r in rows) == period.net_total
    assert sum(int(r["fees"]) for r in rows) == period.fees_total
    for statement in statements:
        lines_rows, count = operator.export(period.period_id, statement.merchant_id)
        assert count == len(lines_rows) == statement.transactions
        assert {r["merchant_id"] for r in lines_rows} <= {statement.merchant_id}
        assert sum(int(r["net"]) for r in lines_rows) == statement.net
        assert sum(int(r["fee"]) for r in lines_rows) == statement.fees
        by_kind = collections.Counter()
        for r in lines_rows:
            by_kind[r["kind"]] += int(r["amount"])
        assert (
            by_kind["earn"],
            by_kind["refund_of_earn"],
            by_kind["capture"] + by_kind["redeem"],
            by_kind["refund_of_redemption"],
        ) == (statement.issued, statement.earn_refunds, statement.redeemed, statement.redemption_refunds)
        assert (by_kind["acquiring_reward"], by_kind["acquiring_reversal"]) == (
            statement.acquiring,
            statement.acquiring_reversals,
        )


@dataclasses.dataclass
class Acknowledged:
    """One operation the service acknowledged, with the moments (this process's monotonic clock) it was
    sent and answered."""

    sent: float
    answered: float
    transaction_id: str
    kind: int
    merchant_id: str
    amount: int


class Traffic:
    """Threads running earns, redemptions, captures and refunds until stopped."""

    def __init__(self, merchants: list[Merchant], members: list[str], seed: int):
        self.merchants = merchants
        self.members = members
        self.seed = seed
        self.acknowledged: list[Acknowledged] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(members))]

    def start(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads)
        assert self.errors == []

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def wait_for(self, operations: int) -> None:
        """Returns once `operations` more operations were acknowledged."""
        target = self.count() + operations
        deadline = time.monotonic() + TRAFFIC_WAIT_SECONDS_MAX
        while self.count() < target:
            assert time.monotonic() < deadline, f"traffic stalled: {self.errors}"
            time.sleep(0.01)

    def _record(self, sent: float, transaction_id: str, kind: int, merchant: Merchant, amount: int) -> None:
        answered = time.monotonic()
        with self.lock:
            self.acknowledged.append(Acknowledged(sent, answered, transaction_id, kind, merchant.merchant_id, amount))

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        member = self.members[index]
        refundable: list[list] = []  # [merchant, transaction_id, kind, remaining]
        while not self.stop.is_set():
            merchant = rng.choice(self.merchants)
            choice = rng.random()
            sent = time.monotonic()
            try:
                if choice < 0.35:
                    response = merchant.earn(member, rng.randint(1, 40_000))
                    self._record(sent, response.transaction_id, EARN, merchant, response.points)
                    if response.points:
                        refundable.append([merchant, response.transaction_id, EARN, response.points])
                elif choice < 0.65:
                    response = merchant.redeem(member, rng.randint(1, 700))
                    self._record(sent, response.transaction_id, REDEEM, merchant, response.points)
                    refundable.append([merchant, response.transaction_id, REDEEM, response.points])
                elif choice < 0.8:
                    hold = merchant.authorize(member, rng.randint(2, 900))
                    sent = time.monotonic()
                    response = merchant.capture(hold.authorization_id, rng.randint(1, hold.points))
                    self._record(sent, response.transaction_id, CAPTURE, merchant, response.points)
                    refundable.append([merchant, response.transaction_id, CAPTURE, response.points])
                elif refundable:
                    entry = rng.choice(refundable)
                    owner, transaction_id, kind, remaining = entry
                    points = rng.randint(1, remaining)
                    response = owner.refund(transaction_id, points)
                    entry[3] -= points
                    if entry[3] == 0:
                        refundable.remove(entry)
                    refund_kind = REFUND_OF_EARN if kind == EARN else REFUND_OF_REDEMPTION
                    assert response.kind == refund_kind
                    self._record(sent, response.transaction_id, refund_kind, owner, points)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # spent points cannot be taken back
                    with self.lock:
                        self.errors.append(f"{error.code().name}: {error.details()}")
                    return
            except Exception as error:  # an assertion above: report it from the main thread
                with self.lock:
                    self.errors.append(repr(error))
                return


def test_periods_cut_under_concurrent_traffic_hold_exactly_their_transactions_and_never_change(
    service, operator, make_merchant
):
    url = service.database_url
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    merchants = [
        make_merchant(1000, 0, 0),
        make_merchant(500, 150, 250),
        make_merchant(2000, 333, 0),
        make_merchant(300, 10_000, 1),
    ]
    members = [unique("mem") for _ in range(TRAFFIC_THREADS)]
    # whatever earlier tests did goes into a period of its own
    flush = operator.close(now_timestamp())
    traffic = Traffic(merchants, members, seed)
    for member in members:
        sent = time.monotonic()
        response = merchants[0].earn(member, 10_000_000)  # 1,000,000 point-units each
        traffic._record(sent, response.transaction_id, EARN, merchants[0], response.points)
    traffic.start()

    cuts = []  # (monotonic before the cut was taken, monotonic after it was answered, period, statements)
    try:
        for _ in range(CUTS_UNDER_TRAFFIC):
            traffic.wait_for(OPERATIONS_PER_PERIOD_MIN)
            before = time.monotonic()
            cut_off = now_timestamp()
            period = operator.close(cut_off)
            after = time.monotonic()
            assert period.cut_off == cut_off
            statements = operator.period_statements(period.period_id)
            # the same cut again, while traffic goes on, is the same period with the same figures
            assert operator.close(cut_off) == period
            cuts.append((before, after, period, statements))
        traffic.wait_for(OPERATIONS_PER_PERIOD_MIN)
    finally:
        traffic.finish()

    periods = [flush] + [c[2] for c in cuts]
    assert [p.period_id for p in periods] == list(range(flush.period_id, flush.period_id + 1 + CUTS_UNDER_TRAFFIC))
    for previous, period in zip(periods, periods[1:]):
        assert period.opened_at == previous.cut_off

    # every acknowledged operation is in Postgres as acknowledged, and nothing else happened at these merchants
    ours = {m.merchant_id for m in merchants}
    stored = {
        r["transaction_id"]: r
        for r in fetch(
            url,
            "SELECT transaction_id, kind, merchant_id, amount, created_at FROM transactions "
            "WHERE merchant_id = ANY($1)",
            sorted(ours),
        )
    }
    acknowledged = {transaction_number(a.transaction_id): a for a in traffic.acknowledged}
    assert len(acknowledged) == len(traffic.acknowledged)
    assert set(stored) == set(acknowledged)
    for number, a in acknowledged.items():
        row = stored[number]
        assert (row["kind"], row["merchant_id"], row["amount"]) == (a.kind, a.merchant_id, a.amount)
        assert row["created_at"] >= as_datetime(flush.cut_off)

    # causality: answered before the cut was taken -> dated before it; sent after the close answered -> after it
    for before, after, period, _ in cuts:
        cut_off = as_datetime(period.cut_off)
        for number, a in acknowledged.items():
            if a.answered < before:
                assert stored[number]["created_at"] < cut_off, f"{a} answered before the cut, dated after it"
            if a.sent > after:
                assert stored[number]["created_at"] >= cut_off, f"{a} sent after the cut closed, dated before it"

    # every statement equals what the transactions dated in its period imply, computed now (after more
    # traffic): nothing dated before a cut arrived after it
    expected = expected_statements(url)
    for _, _, period, statements in cuts:
        assert {s.merchant_id: statement_fields(s) for s in statements} == expected[period.period_id]
        assert period.merchants == len(statements)
        assert period.net_total == sum(s.net for s in statements)
        assert period.fees_total == sum(s.fees for s in statements)
        moved = [s for s in statements if s.merchant_id in ours]
        assert sum(s.transactions for s in moved) == sum(
            1
            for n, a in acknowledged.items()
            if as_datetime(period.opened_at) <= stored[n]["created_at"] < as_datetime(period.cut_off)
        )
        assert sum(s.transactions for s in moved) > 0
        # merchants without traffic carry their position forward unchanged
        for s in statements:
            if s.merchant_id not in ours:
                assert (s.transactions, s.net, s.closing_position) == (0, 0, s.opening_position)

    # statements never change: re-read after more traffic, identical
    for _, _, period, statements in cuts:
        assert operator.period_statements(period.period_id, page_size=2) == statements
        for s in statements[:3]:
            assert (
                operator.GetStatement(
                    admin_pb2.GetStatementRequest(merchant_id=s.merchant_id, period_id=period.period_id)
                )
                == s
            )
        check_exports(operator, period, statements)

    # with traffic stopped, a last cut closes every merchant at its position
    final = operator.close(now_timestamp())
    for statement in operator.period_statements(final.period_id):
        assert statement.closing_position == operator.position(statement.merchant_id).net
    assert {m.merchant_id for m in merchants} <= {s.merchant_id for s in operator.period_statements(final.period_id)}
    assert ledger_discrepancies(url) == []


def test_a_merchants_statements_list_newest_first_in_pages(operator, make_merchant):
    merchant = make_merchant(1000, 200, 100)
    member = unique("mem")
    periods = []
    for purchase in (10_000, 20_000, 30_000):
        merchant.earn(member, purchase)
        periods.append(operator.close(now_timestamp()).period_id)
    seen, token = [], ""
    while True:
        page = operator.ListStatements(
            admin_pb2.ListStatementsRequest(merchant_id=merchant.merchant_id, page_token=token, page_size=1)
        )
        seen.extend(page.statements)
        token = page.next_page_token
        if not token:
            break
    assert [s.period_id for s in seen] == list(reversed(periods))
    assert [s.issued for s in seen] == [3_000, 2_000, 1_000]
    assert [s.fees for s in seen] == [30, 20, 10]
    assert [s.closing_position for s in seen] == [-6_060, -3_030, -1_010]
    assert seen[0].opening_position == seen[1].closing_position


def test_close_rejects_a_missing_or_future_cut_and_one_not_after_the_previous(service, operator, make_merchant):
    url = service.database_url
    latest = operator.close(now_timestamp())
    count = len(fetch(url, "SELECT 1 FROM settlement_periods"))

    assert_refused(
        lambda: operator.CloseSettlementPeriod(admin_pb2.CloseSettlementPeriodRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    future = timestamp_pb2.Timestamp(seconds=now_timestamp().seconds + 3600)
    error = assert_refused(lambda: operator.close(future), grpc.StatusCode.INVALID_ARGUMENT)
    assert "future" in error.details()
    # a refused future cut does not push the dating of new transactions forward
    earned = make_merchant().earn(unique("mem"), 10_000)
    assert as_datetime(earned.created_at) < as_datetime(future)

    just_before = timestamp_pb2.Timestamp()
    just_before.FromDatetime(as_datetime(latest.cut_off) - dt.timedelta(microseconds=1))
    for cut_off in (just_before, timestamp_pb2.Timestamp(seconds=1)):
        error = assert_refused(lambda: operator.close(cut_off), grpc.StatusCode.FAILED_PRECONDITION)
        assert "not after" in error.details()
    assert len(fetch(url, "SELECT 1 FROM settlement_periods")) == count
    # the newest cut itself is idempotent, even after the refusals
    assert operator.close(latest.cut_off) == latest


def test_statements_and_exports_of_unknown_periods(operator, make_merchant):
    merchant = make_merchant()
    period = operator.close(now_timestamp())
    assert_refused(
        lambda: operator.ExportStatement(admin_pb2.ExportStatementRequest(period_id=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert_refused(
        lambda: operator.ExportStatement(admin_pb2.ExportStatementRequest(period_id=period.period_id + 1000)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert_refused(
        lambda: operator.GetStatement(
            admin_pb2.GetStatementRequest(merchant_id=merchant.merchant_id, period_id=period.period_id)
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert_refused(
        lambda: operator.GetStatement(admin_pb2.GetStatementRequest(merchant_id=merchant.merchant_id, period_id=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert_refused(lambda: operator.ListStatements(admin_pb2.ListStatementsRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    rows, lines = operator.export(period.period_id, merchant.merchant_id)  # no movement: header only
    assert (rows, lines) == ([], 0)


def test_list_statements_rejects_a_page_token_it_did_not_issue(operator, make_merchant):
    merchant = make_merchant()
    merchant.earn(unique("mem"), 10_000)
    operator.close(now_timestamp())
    token = base64.urlsafe_b64encode(b"not-a-period").decode()
    assert_refused(
        lambda: operator.ListStatements(
            admin_pb2.ListStatementsRequest(merchant_id=merchant.merchant_id, page_token=token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_export_lines_carry_each_transactions_effect_on_the_position(service, operator, make_merchant):
    """Line by line, hand-computed: net = +redeemed / -issued / +earn refunds / -redemption refunds, less the fee."""
    merchant = make_merchant(give_back_bps=1000, fee_redeemed_bps=150, fee_issued_bps=250)
    member = unique("mem")
    earned = merchant.earn(member, 13_370)  # 1,337 point-units, fee floor(33.425) = 33
    redeemed = merchant.redeem(member, 333)  # fee 4
    hold = merchant.authorize(member, 100)
    captured = merchant.capture(hold.authorization_id, 99)  # fee floor(1.485) = 1
    refunded = merchant.refund(redeemed.transaction_id, 33)
    taken_back = merchant.refund(earned.transaction_id, 37)
    period = operator.close(now_timestamp())
    rows, lines = operator.export(period.period_id, merchant.merchant_id)
    assert lines == 5
    assert [
        (r["transaction_id"], r["kind"], r["member_id"], int(r["amount"]), int(r["fee"]), int(r["net"])) for r in rows
    ] == [
        (earned.transaction_id, "earn", member, 1_337, 33, -1_370),
        (redeemed.transaction_id, "redeem", member, 333, 4, 329),
        (captured.transaction_id, "capture", member, 99, 1, 98),
        (refunded.transaction_id, "refund_of_redemption", member, 33, 0, -33),
        (taken_back.transaction_id, "refund_of_earn", member, 37, 0, 37),
    ]
    assert all(r["period_id"] == str(period.period_id) for r in rows)
    statement = operator.GetStatement(
        admin_pb2.GetStatementRequest(merchant_id=merchant.merchant_id, period_id=period.period_id)
    )
    assert (
        statement.issued,
        statement.earn_refunds,
        statement.redeemed,
        statement.redemption_refunds,
        statement.fees,
        statement.net,
        statement.transactions,
    ) == (1_337, 37, 432, 33, 38, -939, 5)
    assert statement.net == sum(int(r["net"]) for r in rows)
    assert (
        statement.closing_position
        == statement.opening_position + statement.net
        == operator.position(merchant.merchant_id).net
    )
    check_exports(operator, period, operator.period_statements(period.period_id))


def test_reconcile_passes_on_this_ledger(service):
    result = cli("reconcile", "--database-url", service.database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in result.stdout.splitlines() if line.startswith("checking: ")]
    assert len(checks) >= 8
    assert "reconciled" in result.stdout and "DISCREPANCY" not in result.stdout


# ---------------------------------------------------------------------------------------------------
# reconcile finds a corrupted row (a dedicated database: the rows are altered by hand)


def execute(database_url: str, sql: str, *args) -> None:
    """Runs one statement that must change exactly one row."""

    async def go():
        connection = await connect(database_url)
        try:
            status = await connection.execute(sql, *args)
        finally:
            await connection.close()
        assert status.endswith(" 1"), f"{sql} changed {status}"

    asyncio.run(go())


def reconcile(database_url: str) -> subprocess.CompletedProcess:
    return cli("reconcile", "--database-url", database_url)


def test_reconcile_exits_1_naming_each_kind_of_corruption(create_database, service_factory):
    url = create_database()
    service = service_factory(url)
    with service.bare_channel() as channel:
        points = points_pb2_grpc.PointsServiceStub(channel)
        operator = Operator(channel, create_key(url, "operator"))
        merchants = []
        for fee in (0, 150):
            merchant_id = unique("m")
            merchants.append(Merchant(points, merchant_id, add_merchant(url, merchant_id, 1000, fee_redeemed_bps=fee)))
        member = unique("mem")
        for merchant in merchants:
            merchant.earn(member, 50_000)
        operator.close(now_timestamp())
        for merchant in merchants:
            merchant.redeem(member, 1_234)
        period = operator.close(now_timestamp())
    service.kill()
    m = merchants[1].merchant_id

    clean = reconcile(url)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    corruptions = [
        (
            "UPDATE accounts SET balance = balance + 1 WHERE kind = 'member' AND owner_id = $1",
            (member,),
            "UPDATE accounts SET balance = balance - 1 WHERE kind = 'member' AND owner_id = $1",
            f"account member:{member} balance",
        ),
        # consistent with the statement's own CHECKs, inconsistent with the journal
        (
            "UPDATE statements SET redeemed = redeemed + 1, net = net + 1, closing_position = closing_position + 1 "
            "WHERE period_id = $1 AND merchant_id = $2",
            (period.period_id, m),
            "UPDATE statements SET redeemed = redeemed - 1, net = net - 1, closing_position = closing_position - 1 "
            "WHERE period_id = $1 AND merchant_id = $2",
            f"statement of {m} in period {period.period_id}: net",
        ),
        (
            # a leg is an element of its transaction's arrays (migration 0022), entry_id its
            # transaction_id * 1024 + its ordinal
            "UPDATE transactions t SET leg_amounts[e.leg] = t.leg_amounts[e.leg] + 1 FROM (SELECT "
            "entry_id / 1024 AS transaction_id, entry_id % 1024 AS leg FROM entries JOIN accounts a USING "
            "(account_id) WHERE a.kind = 'operator_fee_revenue' ORDER BY entry_id LIMIT 1) e "
            "WHERE t.transaction_id = e.transaction_id",
            (),
            "UPDATE transactions t SET leg_amounts[e.leg] = t.leg_amounts[e.leg] - 1 FROM (SELECT "
            "entry_id / 1024 AS transaction_id, entry_id % 1024 AS leg FROM entries JOIN accounts a USING "
            "(account_id) WHERE a.kind = 'operator_fee_revenue' ORDER BY entry_id LIMIT 1) e "
            "WHERE t.transaction_id = e.transaction_id",
            "journal of POINTS sums to 1",
        ),
        # the journal has no foreign keys (migration 0003): reconcile checks every reference
        (
            "UPDATE transactions SET leg_accounts[1] = -leg_accounts[1] WHERE transaction_id = "
            "(SELECT min(transaction_id) FROM transactions WHERE cardinality(leg_accounts) > 0)",
            (),
            "UPDATE transactions SET leg_accounts[1] = -leg_accounts[1] WHERE transaction_id = "
            "(SELECT min(transaction_id) FROM transactions WHERE cardinality(leg_accounts) > 0)",
            "which do not both exist in its asset",
        ),
        (
            "UPDATE transactions SET member_id = member_id || '-gone' WHERE transaction_id = "
            "(SELECT min(transaction_id) FROM transactions)",
            (),
            "UPDATE transactions SET member_id = left(member_id, -5) WHERE transaction_id = "
            "(SELECT min(transaction_id) FROM transactions)",
            "refers to a merchant, member or transaction that does not exist",
        ),
    ]
    for corrupt, args, repair, named in corruptions:
        execute(url, corrupt, *args)
        try:
            result = reconcile(url)
            assert result.returncode == 1, result.stdout + result.stderr
            discrepancy = [line for line in result.stdout.splitlines() if line.startswith("DISCREPANCY: ")]
            assert len(discrepancy) == 1 and named in discrepancy[0], result.stdout
        finally:
            execute(url, repair, *args)
    assert ledger_discrepancies(url) == []
    again = reconcile(url)
    assert again.returncode == 0, again.stdout + again.stderr


# ---------------------------------------------------------------------------------------------------
# Acquiring rewards and program earns (docs/RULES.md sections 6, 7): merchant_acquiring is a receivable
# of the acquirer, and a merchant owes only its share of a program earn. The pipeline does not post these
# yet: the journal rows are written directly (tests/integration/ledger_rows.py) while no service runs.


async def _close_and_read(store, merchants: list[str]) -> tuple[dict, dict, dict]:
    """Closes a period now; (statements, lines as (transaction, kind, amount, fee, net), positions) by merchant."""
    period, created = await store.close_period(dt.datetime.now(dt.timezone.utc))
    assert created
    statements = {r["merchant_id"]: r for r in await store.statements(period_id=period["period_id"])}
    lines = {
        m: [
            (r["transaction_id"], r["kind"], r["amount"], r["fee"], r["net"])
            for r in await store.statement_lines(period["period_id"], m)
        ]
        for m in merchants
    }
    positions = {m: await store.merchant_position(m) for m in merchants}
    return statements, lines, positions


def amounts(statement) -> tuple:
    return tuple(
        statement[name]
        for name in (
            "opening_position",
            "issued",
            "earn_refunds",
            "redeemed",
            "redemption_refunds",
            "fees",
            "acquiring",
            "acquiring_reversals",
            "net",
            "closing_position",
            "transactions",
        )
    )


def test_statements_take_each_merchants_share_of_program_earns_and_acquiring_from_the_entries(create_database):
    """rules_ledger() (hand-computed in ledger_rows.py), then a refund of half the earn's base: it takes
    back 500 base + 250 uplift + 100 and 50 of the two promotions, 900 from the member, of which the
    merchant gets back 550 (its base and its own promotion). Period 1: m1 issued 1,100 (base 1,000 +
    its promotion 100, not the 1,800 the member got), fee 10, earn refunds 550; m2 issued 600
    (conversion) and redeemed 300; the acquirer is owed 30 - 10. The tier bonus, referral bonus, expiry
    and the acquiring rows name m1 but do not move its position: they are not its lines. Period 2: one
    more reward of 5 carries the acquirer's position forward."""
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            rows = await rules_ledger(ledger)
            refund = await ledger.post(
                5,
                rows.issuer,
                rows.member,
                900,
                [
                    ("member", rows.member, -900),
                    ("merchant_issued", rows.issuer, 550),
                    ("operator_tier_rewards", "operator", 250),
                    ("operator_promotions", "operator", 100),
                ],
            )
            await ledger.execute("UPDATE earn_rules SET refunded_base_point_units = 500")
            await ledger.execute("UPDATE lots SET amount = 100 WHERE lot_id = $1", rows.earn)
            merchants = [rows.issuer, rows.converter, rows.acquirer]
            first = await _close_and_read(ledger.store, merchants)
            await asyncio.sleep(0.001)
            later = await ledger.acquiring_reward(rows.issuer, rows.member, rows.acquirer, 5)
            second = await _close_and_read(ledger.store, merchants)
            return rows, refund, later, first, second

    rows, refund, later, (statements, lines, positions), (statements_2, lines_2, positions_2) = asyncio.run(go())
    m1, m2, acquirer = rows.issuer, rows.converter, rows.acquirer

    #                                  open  issued e.ref  red  r.ref fees  acq  rev   net  close  txns
    assert amounts(statements[m1]) == (0, 1_100, 550, 0, 0, 10, 0, 0, -560, -560, 2)
    assert amounts(statements[m2]) == (0, 600, 0, 300, 0, 0, 0, 0, -300, -300, 2)
    assert amounts(statements[acquirer]) == (0, 0, 0, 0, 0, 0, 30, 10, 20, 20, 2)
    assert lines[m1] == [(rows.earn, 1, 1_800, 10, -1_110), (refund, 5, 900, 0, 550)]
    assert lines[m2] == [(rows.conversion, 15, 600, 0, -600), (rows.redeem, 3, 300, 0, 300)]
    assert lines[acquirer] == [(rows.reward, 9, 30, 0, 30), (rows.reversal, 10, 10, 0, -10)]
    for merchant in (m1, m2, acquirer):
        assert sum(line[4] for line in lines[merchant]) == statements[merchant]["net"]
        assert statements[merchant]["closing_position"] == positions[merchant]["net"]
    assert positions[m1] == {"issued": 550, "redeemed": 0, "fees": 10, "acquiring": 0, "net": -560}
    assert positions[acquirer] == {"issued": 0, "redeemed": 0, "fees": 0, "acquiring": 20, "net": 20}

    assert amounts(statements_2[acquirer]) == (20, 0, 0, 0, 0, 0, 5, 0, 5, 25, 1)
    assert lines_2[acquirer] == [(later, 9, 5, 0, 5)]
    assert lines_2[m1] == [] and amounts(statements_2[m1]) == (-560, 0, 0, 0, 0, 0, 0, 0, 0, -560, 0)
    assert positions_2[acquirer]["net"] == 25 == statements_2[acquirer]["closing_position"]
    assert ledger_discrepancies(url) == []


def test_a_statement_that_misstates_acquiring_is_reported_by_reconcile(create_database):
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            rows = await rules_ledger(ledger)
            await ledger.store.close_period(dt.datetime.now(dt.timezone.utc))
            # consistent with the statement's own CHECKs, not with the journal
            await ledger.execute(
                """UPDATE statements SET acquiring = acquiring + 7, net = net + 7,
                                           closing_position = closing_position + 7 WHERE merchant_id = $1""",
                rows.acquirer,
            )
            return rows

    rows = asyncio.run(go())
    assert ledger_discrepancies(url) == [
        f"statement of {rows.acquirer} in period 1: net 27 != journal 20, acquiring 37 != journal 30"
    ]


def test_a_merchants_acquiring_rewards_add_to_its_position_statement_and_export(create_database, service_factory):
    """Through the service: the shop's member was signed up by the acquirer, which was paid 700 for the
    member's spend at the shop and had 200 of it reversed (rows written before the service starts); then
    the member earns 10,000 at the shop, 2,000 at the acquirer and redeems 1,500 there. The acquirer's
    position: 1,500 redeemed + 500 acquiring - 2,000 issued = 0."""
    url = create_database()
    shop_id, acquirer_id, member = unique("shop"), unique("acq"), unique("mem")
    shop_key = add_merchant(url, shop_id, 1000)
    acquirer_key = add_merchant(url, acquirer_id, 1000, fee_redeemed_bps=100)

    async def rows():
        async with await Ledger.open(url) as ledger:
            await ledger.member(member)
            reward = await ledger.acquiring_reward(shop_id, member, acquirer_id, 700)
            reversal = await ledger.acquiring_reversal(shop_id, member, acquirer_id, 200)
            await ledger.fold_checkpoint()
            return reward, reversal

    reward, reversal = asyncio.run(rows())

    service = service_factory(url)
    with service.bare_channel() as channel:
        points = points_pb2_grpc.PointsServiceStub(channel)
        operator = Operator(channel, create_key(url, "operator"))
        shop, acquirer = Merchant(points, shop_id, shop_key), Merchant(points, acquirer_id, acquirer_key)
        shop.earn(member, 100_000)
        earned = acquirer.earn(member, 20_000)
        redeemed = acquirer.redeem(member, 1_500)  # fee 15

        position = operator.position(acquirer_id)
        assert (position.issued, position.redeemed, position.fees, position.acquiring, position.net) == (
            2_000,
            1_500,
            15,
            500,
            -15,
        )
        assert (operator.position(shop_id).acquiring, operator.position(shop_id).net) == (0, -10_000)

        period = operator.close(now_timestamp())
        statements = operator.period_statements(period.period_id)
        by_merchant = {s.merchant_id: s for s in statements}
        statement = by_merchant[acquirer_id]
        assert (
            statement.issued,
            statement.redeemed,
            statement.fees,
            statement.acquiring,
            statement.acquiring_reversals,
            statement.net,
            statement.closing_position,
            statement.transactions,
        ) == (2_000, 1_500, 15, 700, 200, -15, -15, 4)
        assert (
            operator.GetStatement(admin_pb2.GetStatementRequest(merchant_id=acquirer_id, period_id=period.period_id))
            == statement
        )
        # the rows name the shop (where the member spent) but move only the acquirer's position
        assert (by_merchant[shop_id].acquiring, by_merchant[shop_id].net, by_merchant[shop_id].transactions) == (
            0,
            -10_000,
            1,
        )
        assert period.net_total == sum(s.net for s in statements)

        lines, count = operator.export(period.period_id, acquirer_id)
        assert count == 4
        assert [(r["transaction_id"], r["kind"], int(r["amount"]), int(r["fee"]), int(r["net"])) for r in lines] == [
            (f"txn_{reward}", "acquiring_reward", 700, 0, 700),
            (f"txn_{reversal}", "acquiring_reversal", 200, 0, -200),
            (earned.transaction_id, "earn", 2_000, 0, -2_000),
            (redeemed.transaction_id, "redeem", 1_500, 15, 1_485),
        ]
        rows_csv, _ = operator.export(period.period_id)
        row = next(r for r in rows_csv if r["merchant_id"] == acquirer_id)
        assert (row["acquiring"], row["acquiring_reversals"], row["net"]) == ("700", "200", "-15")
        check_exports(operator, period, statements)
    service.kill()
    assert ledger_discrepancies(url) == []
    result = reconcile(url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_program_earns_and_acquiring_posted_by_the_service_clear_at_each_merchants_share(
    create_database, service_factory
):
    """End to end under a program (1.5x at the first level, an operator promotion of 100 per earn, 1%
    acquiring share): the acquirer's member spends 12,345 at the shop (give-back 10%, issue fee 1%).
    Hand-computed: base 1,234, uplift 617, promotion 100 (the member gets 1,951), fee floor(12.34) = 12
    on the base, acquiring reward floor(123.45) = 123. A refund of half the base (617) takes back 617 +
    uplift floor(617 * 617 / 1234) = 308 + promotion 50 from the member, gives the shop back 617 and
    reverses floor(123 * 617 / 1234) = 61 of the reward. The shop owes its base only: net -1,234 + 617
    - 12 = -629; the acquirer is owed 123 - 61 = 62."""
    url = create_database()
    shop_id, acquirer_id, member = unique("shop"), unique("acq"), unique("mem")
    shop_key = add_merchant(url, shop_id, 1000, fee_issued_bps=100)
    acquirer_key = add_merchant(url, acquirer_id, 1000)
    now_us = time.time_ns() // 1000

    async def program():
        from processor.store import Store

        store = await Store.open(url, 2)
        try:
            await store.add_program_version(
                "alliance",
                None,
                {
                    "levels": [{"name": "registered", "threshold_point_units": 0, "multiplier_bps": 15_000}],
                    "acquiring_share_bps": 100,
                    "promotions": [
                        {
                            "promotion_id": "welcome",
                            "start_us": now_us - 3_600_000_000,
                            "end_us": now_us + 3_600_000_000,
                            "scope": "network",
                            "bonus_point_units": 100,
                            "budget_point_units": 1_000,
                        }
                    ],
                },
                "tests",
            )
        finally:
            await store.close()

    asyncio.run(program())
    service = service_factory(url)
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.bare_channel() as channel:
        points = points_pb2_grpc.PointsServiceStub(channel)
        operator = Operator(channel, create_key(url, "operator"))
        shop, acquirer = Merchant(points, shop_id, shop_key), Merchant(points, acquirer_id, acquirer_key)
        points.LinkMember(
            points_pb2.LinkMemberRequest(merchant_id=acquirer_id, member_id=member, idempotency_key=unique("k")),
            metadata=acquirer.metadata,
            timeout=30,
        )
        earned = shop.earn(member, 12_345)
        assert (earned.points, earned.bonus_points, earned.balance) == (1_234, 617 + 100, 1_951)
        refunded = shop.refund(earned.transaction_id, 617)
        assert refunded.balance == 1_951 - 617 - 308 - 50

        shop_position, acquirer_position = operator.position(shop_id), operator.position(acquirer_id)
        assert (shop_position.issued, shop_position.fees, shop_position.acquiring, shop_position.net) == (
            617,
            12,
            0,
            -629,
        )
        assert (acquirer_position.issued, acquirer_position.acquiring, acquirer_position.net) == (0, 62, 62)

        period = operator.close(now_timestamp())
        statements = operator.period_statements(period.period_id)
        by_merchant = {s.merchant_id: s for s in statements}
        s = by_merchant[shop_id]
        assert (s.issued, s.earn_refunds, s.fees, s.acquiring, s.acquiring_reversals, s.net, s.transactions) == (
            1_234,
            617,
            12,
            0,
            0,
            -629,
            2,
        )
        s = by_merchant[acquirer_id]
        assert (s.issued, s.earn_refunds, s.fees, s.acquiring, s.acquiring_reversals, s.net, s.transactions) == (
            0,
            0,
            0,
            123,
            61,
            62,
            2,
        )
        assert s.closing_position == acquirer_position.net
        shop_lines, _ = operator.export(period.period_id, shop_id)
        assert [(r["transaction_id"], r["kind"], int(r["fee"]), int(r["net"])) for r in shop_lines] == [
            (earned.transaction_id, "earn", 12, -1_246),
            (refunded.transaction_id, "refund_of_earn", 0, 617),
        ]
        acquirer_lines, _ = operator.export(period.period_id, acquirer_id)
        assert [(r["kind"], int(r["amount"]), int(r["net"])) for r in acquirer_lines] == [
            ("acquiring_reward", 123, 123),
            ("acquiring_reversal", 61, -61),
        ]
        for statement in statements:  # the lines of each merchant sum to its statement
            lines, count = operator.export(period.period_id, statement.merchant_id)
            assert count == statement.transactions
            assert sum(int(r["net"]) for r in lines) == statement.net
            assert sum(int(r["fee"]) for r in lines) == statement.fees
    service.kill()
    assert ledger_discrepancies(url) == []


# ---------------------------------------------------------------------------------------------------
# seed


def test_a_seeded_network_reconciles_and_is_served(create_database, service_factory):
    url = create_database()
    seeded = cli("seed", "--merchants", "200", "--members", "5000", "--database-url", url)
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    counts = fetch(
        url,
        """SELECT (SELECT count(*) FROM merchants WHERE merchant_id LIKE 'seed-m-%') AS merchants,
                                  (SELECT count(*) FROM members WHERE member_id LIKE 'seed-u-%') AS members,
                                  (SELECT count(*) FROM transactions) AS transactions""",
    )[0]
    assert dict(counts) == {"merchants": 200, "members": 5000, "transactions": 5000}
    # the seed leaves the planner its statistics (a service started right after a large seed otherwise
    # plans its start-up reads blind: minutes at 20,000 members)
    analyzed = fetch(
        url,
        """SELECT relname FROM pg_stat_user_tables
            WHERE relname IN ('merchants', 'members', 'accounts', 'transactions') AND last_analyze IS NOT NULL""",
    )
    assert sorted(r["relname"] for r in analyzed) == ["accounts", "members", "merchants", "transactions"]
    checked = reconcile(url)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    service = service_factory(url)
    first, last = "seed-u-0000001", "seed-u-0005000"
    journal = {
        r["owner_id"]: r["s"]
        for r in fetch(
            url,
            """SELECT a.owner_id, sum(e.amount) AS s FROM accounts a JOIN entries e USING (account_id)
                WHERE a.kind = 'member' AND a.owner_id = ANY($1) GROUP BY a.owner_id""",
            [first, last],
        )
    }
    earned_at = fetch(url, "SELECT merchant_id FROM transactions WHERE member_id = $1", first)[0]["merchant_id"]
    key = create_key(url, "merchant", [earned_at])
    with service.bare_channel() as channel:
        points = points_pb2_grpc.PointsServiceStub(channel)
        for member in (first, last):
            balance = points.GetBalance(
                points_pb2.GetBalanceRequest(member_id=member), metadata=credential(key), timeout=30
            )
            assert balance.posted == balance.available == journal[member] > 0
        history = points.ListTransactions(
            points_pb2.ListTransactionsRequest(member_id=first), metadata=credential(key), timeout=30
        )
        assert [(t.kind, t.merchant_id, t.points) for t in history.transactions] == [
            (points_pb2.TRANSACTION_KIND_EARN, earned_at, journal[first])
        ]
        redeemed = Merchant(points, earned_at, key).redeem(first, 1)
        assert redeemed.balance == journal[first] - 1
    assert ledger_discrepancies(url) == []
