"""Clearing of the VOUCHERS asset (issue 7: vouchers are "a separate asset with separate balances and
clearing"; migration 0006). A merchant's merchant_redeemed VOUCHERS balance is what the operator owes it
in cash for the vouchers it accepted (its voucher position, voucher-units = minor units), cleared apart
from its POINTS net; its merchant_vouchers balance is the vouchers it holds from dividend rounds,
spendable only at the operator's store (not a cash claim). Positions, statements (with their opening and
closing voucher figures carried from period to period), the period's voucher total and the CSV export
show both; each merchant's CSV lines sum exactly to its statement, and reconcile checks the voucher
columns against the journal.

Dividends (11), split redeems (12), their refunds (13) and a merchant's voucher spend at the operator's
store (14) go through the real service; at the store level, journal rows written directly
(tests/integration/ledger_rows.py) cover spends by several merchants, corrupted statements, and a
database whose periods were cut before migration 0006.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import datetime as dt
import io
import pathlib
import shutil
import time

import asyncpg
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from processor import store as store_module
from processor.store import Store
from tests.harness import ServiceProcess, add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import earn, unique, wait_program_in_force
from tests.integration.ledger_rows import CONVERSION, EARN, MERCHANT_VOUCHER_SPEND, OPERATOR, VOUCHERS, Ledger

pytestmark = pytest.mark.timeout(120)

DIVIDEND, SPLIT_REDEEM, SPLIT_REFUND = 11, 12, 13
POINTS_FIELDS = (
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
VOUCHER_FIELDS = (
    "vouchers_redeemed",
    "voucher_redemption_refunds",
    "voucher_net",
    "voucher_opening_position",
    "voucher_closing_position",
    "vouchers_held_opening",
    "vouchers_received",
    "vouchers_spent",
    "vouchers_held_closing",
)
STATEMENT_CSV_HEADER = [
    "period_id",
    "merchant_id",
    "opened_at",
    "cut_off",
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
    *VOUCHER_FIELDS,
]
LINE_CSV_HEADER = [
    "period_id",
    "merchant_id",
    "transaction_id",
    "created_at",
    "kind",
    "member_id",
    "amount",
    "fee",
    "net",
    "voucher_net",
    "vouchers_held_change",
]


def vouchers_of(statement) -> dict:
    """The voucher figures of a statement (a Statement message or a statements row)."""
    message = hasattr(statement, "DESCRIPTOR")
    return {name: getattr(statement, name) if message else statement[name] for name in VOUCHER_FIELDS}


def voucher_statement(redeemed=0, refunds=0, opening=0, held_opening=0, received=0, spent=0) -> dict:
    """The voucher figures a statement must carry, from its movements and openings."""
    return {
        "vouchers_redeemed": redeemed,
        "voucher_redemption_refunds": refunds,
        "voucher_net": redeemed - refunds,
        "voucher_opening_position": opening,
        "voucher_closing_position": opening + redeemed - refunds,
        "vouchers_held_opening": held_opening,
        "vouchers_received": received,
        "vouchers_spent": spent,
        "vouchers_held_closing": held_opening + received - spent,
    }


# ---------------------------------------------------------------------------------------------------
# Through the service: dividends to a merchant, split redeems and refunds, two periods


def _now_timestamp() -> timestamp_pb2.Timestamp:
    micros = time.time_ns() // 1000
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


OPERATOR_STORE = "op-store"


async def _add_version(url: str) -> None:
    store = await Store.open(url, 2)
    try:
        await store.add_program_version(
            "alliance",
            None,
            {
                "dividends": {
                    "threshold_point_units": 12_000,
                    "growth_bps": 1_500,
                    "rate_bps_schedule": [50, 100],
                    "credit_limit_bps": 50_000,
                },
                "operator_store_merchant_id": OPERATOR_STORE,
            },
            "tests",
        )
    finally:
        await store.close()


def _wait(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.1)


def _round_posted(url: str, rounds: int) -> bool:
    done = fetch(
        url,
        """SELECT (SELECT count(*) FROM dividend_rounds) AS rounds,
                                (SELECT count(*) FROM dividend_allocations WHERE transaction_id IS NULL) AS unposted""",
    )
    return done[0]["rounds"] == rounds and done[0]["unposted"] == 0


def _allocation(url: str, round_number: int, merchant_id: str) -> int:
    rows = fetch(
        url,
        "SELECT amount FROM dividend_allocations WHERE round_number = $1 AND holder_kind = 'merchant' "
        "AND holder_id = $2",
        round_number,
        merchant_id,
    )
    return rows[0]["amount"] if rows else 0


class Clearing:
    """The Clearing service (the channel's interceptor sends the operator's credential)."""

    def __init__(self, channel):
        self.stub = admin_pb2_grpc.ClearingStub(channel)

    def close(self) -> admin_pb2.SettlementPeriod:
        return self.stub.CloseSettlementPeriod(
            admin_pb2.CloseSettlementPeriodRequest(cut_off=_now_timestamp()), timeout=60
        )

    def position(self, merchant_id: str) -> admin_pb2.MerchantPosition:
        return self.stub.GetMerchantPosition(admin_pb2.GetMerchantPositionRequest(merchant_id=merchant_id), timeout=30)

    def statements(self, period_id: int) -> dict[str, admin_pb2.Statement]:
        page = self.stub.ListStatements(
            admin_pb2.ListStatementsRequest(period_id=period_id, page_size=1000), timeout=30
        )
        assert not page.next_page_token
        return {s.merchant_id: s for s in page.statements}

    def export(self, period_id: int, merchant_id: str = "") -> tuple[list[str], list[dict], int]:
        response = self.stub.ExportStatement(
            admin_pb2.ExportStatementRequest(period_id=period_id, merchant_id=merchant_id), timeout=30
        )
        text = response.csv.decode("utf-8")
        header = next(csv.reader(io.StringIO(text)))
        return header, list(csv.DictReader(io.StringIO(text))), response.lines


def check_exports(
    clearing: Clearing, period: admin_pb2.SettlementPeriod, statements: dict[str, admin_pb2.Statement]
) -> None:
    """The period's CSV is its statements with their voucher columns last; each merchant's lines sum
    exactly to its statement, in both assets."""
    header, rows, count = clearing.export(period.period_id)
    assert header == STATEMENT_CSV_HEADER
    assert count == len(rows) == len(statements) == period.merchants
    for row in rows:
        statement = statements[row["merchant_id"]]
        assert {name: int(row[name]) for name in POINTS_FIELDS + VOUCHER_FIELDS} == {
            name: getattr(statement, name) for name in POINTS_FIELDS + VOUCHER_FIELDS
        }
    assert sum(s.voucher_net for s in statements.values()) == period.voucher_net_total
    assert sum(int(r["voucher_net"]) for r in rows) == period.voucher_net_total
    assert sum(s.net for s in statements.values()) == period.net_total
    for merchant_id, statement in statements.items():
        header, lines, count = clearing.export(period.period_id, merchant_id)
        assert header == LINE_CSV_HEADER
        assert count == len(lines) == statement.transactions
        assert sum(int(r["net"]) for r in lines) == statement.net
        assert sum(int(r["fee"]) for r in lines) == statement.fees
        assert sum(int(r["voucher_net"]) for r in lines) == statement.voucher_net
        assert (
            sum(int(r["vouchers_held_change"]) for r in lines) == statement.vouchers_received - statement.vouchers_spent
        )
        by_kind = collections.Counter()
        for r in lines:
            by_kind[r["kind"], "voucher_net"] += int(r["voucher_net"])
            by_kind[r["kind"], "held"] += int(r["vouchers_held_change"])
        assert (
            by_kind["split_redeem", "voucher_net"] + by_kind["merchant_voucher_spend", "voucher_net"]
            == statement.vouchers_redeemed
        )
        assert -by_kind["split_refund", "voucher_net"] == statement.voucher_redemption_refunds
        assert by_kind["dividend", "held"] == statement.vouchers_received
        assert -by_kind["merchant_voucher_spend", "held"] == statement.vouchers_spent


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    for merchant, fee in (("shop-a", 0), ("shop-b", 150), (OPERATOR_STORE, 0)):
        add_merchant(url, merchant, 1000, fee_redeemed_bps=fee)
    asyncio.run(_add_version(url))
    service = ServiceProcess(url, "--dividend-check-seconds", "0.2").start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.channel() as channel:
        yield url, points_pb2_grpc.PointsServiceStub(channel), Clearing(channel)
    service.kill()


def test_dividends_split_redeems_refunds_and_spends_clear_in_vouchers_beside_points(world):
    """Hand-computed. shop-a issues (give-back 10%), shop-b is redeemed at (fee 1.5% of both tenders,
    posted in points); op-store is the operator's store.

    Period 1: alice earns 10,000 at shop-a and redeems 2,000 points at shop-b (fee 30): shop-b's net
    1,970 > 0 makes it a dividend holder. bob earns 5,000: the pool of 15,000 passes 12,000 and round 1
    (50 bps) gives alice 40, bob 25 and shop-b floor(1,970 x 0.5%) = 9 vouchers. alice then pays 1,000
    points + 60 vouchers at shop-b (40 her own, 20 on credit; fee floor(1,060 x 1.5%) = 15), bob spends his 25
    vouchers at shop-a, and shop-b refunds 530 of alice's 1,060: floor(60 x 530 / 1,060) = 30 vouchers
    and 500 points. shop-b: points net 3,000 - 500 - 45 = 2,455; vouchers accepted 60, refunded 30:
    voucher_net 30 (the operator owes it 30 in cash for them), and it holds the 9 it received. shop-a:
    points net -15,000, voucher_net 25.

    Period 2: shop-b refunds the other 530 (30 vouchers, 500 points); carol earns 3,000 at shop-a (pool
    18,000 >= 15,000 x 1.15): round 2 (100 bps) gives shop-b floor(1,955 x 1%) = 19. shop-b's voucher
    position goes back to 0, it holds 9 + 19 = 28; shop-a carries its 25.

    Period 3: shop-b spends 20 of its vouchers at op-store (kind 14): it holds 8; op-store, whose only
    movement ever is that spend (shop-b's transaction), gets its first statement: the operator owes it 20."""
    url, stub, clearing = world
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")

    earn(stub, "shop-a", alice, 100_000)
    stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=alice, points=2_000, idempotency_key=unique("k")), timeout=30
    )
    earn(stub, "shop-a", bob, 50_000)
    _wait(lambda: _round_posted(url, 1), "round 1")
    assert _allocation(url, 1, "shop-b") == 9 and _allocation(url, 1, "shop-a") == 0
    position = clearing.position("shop-b")
    assert (position.net, position.voucher_net, position.vouchers_held) == (1_970, 0, 9)

    split = stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-b", member_id=alice, points=1_000, vouchers=60, idempotency_key=unique("k")),
        timeout=30,
    )
    assert (split.vouchers, split.voucher_credit_used) == (60, 20)
    vouchers_only = stub.Redeem(
        pb.RedeemRequest(merchant_id="shop-a", member_id=bob, points=0, vouchers=25, idempotency_key=unique("k")),
        timeout=30,
    )
    refund = stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=split.transaction_id, points=530, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert refund.vouchers == 30
    position = clearing.position("shop-b")
    assert (position.redeemed, position.fees, position.net) == (2_500, 45, 2_455)  # points, unchanged by vouchers
    assert (position.voucher_net, position.vouchers_held) == (30, 9)
    position = clearing.position("shop-a")
    assert (position.net, position.voucher_net, position.vouchers_held) == (-15_000, 25, 0)

    first = clearing.close()
    statements = clearing.statements(first.period_id)
    assert set(statements) == {"shop-a", "shop-b"}
    b, a = statements["shop-b"], statements["shop-a"]
    assert (b.redeemed, b.redemption_refunds, b.fees, b.net, b.closing_position, b.transactions) == (
        3_000,
        500,
        45,
        2_455,
        2_455,
        4,
    )
    assert vouchers_of(b) == voucher_statement(redeemed=60, refunds=30, received=9)
    assert (a.issued, a.net, a.transactions) == (15_000, -15_000, 3)
    assert vouchers_of(a) == voucher_statement(redeemed=25)
    assert (first.net_total, first.voucher_net_total) == (2_455 - 15_000, 55)
    _, lines, _ = clearing.export(first.period_id, "shop-b")
    assert [
        (
            r["kind"],
            int(r["amount"]),
            int(r["fee"]),
            int(r["net"]),
            int(r["voucher_net"]),
            int(r["vouchers_held_change"]),
        )
        for r in lines
    ] == [
        ("redeem", 2_000, 30, 1_970, 0, 0),
        ("dividend", 9, 0, 0, 0, 9),
        ("split_redeem", 1_060, 15, 985, 60, 0),
        ("split_refund", 530, 0, -500, -30, 0),
    ]
    assert [r["transaction_id"] for r in lines][2:] == [split.transaction_id, refund.transaction_id]
    _, lines, _ = clearing.export(first.period_id, "shop-a")
    assert [(r["transaction_id"], r["kind"], int(r["net"]), int(r["voucher_net"])) for r in lines][2:] == [
        (vouchers_only.transaction_id, "split_redeem", 0, 25)
    ]
    check_exports(clearing, first, statements)
    assert ledger_discrepancies(url) == []

    rest = stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-b", transaction_id=split.transaction_id, points=530, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert rest.vouchers == 30
    earn(stub, "shop-a", carol, 30_000)
    _wait(lambda: _round_posted(url, 2), "round 2")
    assert _allocation(url, 2, "shop-b") == 19
    second = clearing.close()
    statements = clearing.statements(second.period_id)
    b, a = statements["shop-b"], statements["shop-a"]
    assert (b.opening_position, b.redemption_refunds, b.net, b.closing_position, b.transactions) == (
        2_455,
        500,
        -500,
        1_955,
        2,
    )
    assert vouchers_of(b) == voucher_statement(refunds=30, opening=30, held_opening=9, received=19)
    assert (a.issued, a.closing_position, a.transactions) == (3_000, -18_000, 1)
    assert vouchers_of(a) == voucher_statement(opening=25)
    assert second.voucher_net_total == -30
    for merchant_id, statement in statements.items():  # the positions, with no traffic since the cut
        position = clearing.position(merchant_id)
        assert (position.net, position.voucher_net, position.vouchers_held) == (
            statement.closing_position,
            statement.voucher_closing_position,
            statement.vouchers_held_closing,
        )
    check_exports(clearing, second, statements)
    assert ledger_discrepancies(url) == []

    spent = stub.SpendMerchantVouchers(
        pb.SpendMerchantVouchersRequest(merchant_id="shop-b", vouchers=20, idempotency_key=unique("k")), timeout=30
    )
    assert (spent.store_merchant_id, spent.voucher_balance) == (OPERATOR_STORE, 8)
    position = clearing.position(OPERATOR_STORE)
    assert (position.net, position.voucher_net, position.vouchers_held) == (0, 20, 0)
    third = clearing.close()
    statements = clearing.statements(third.period_id)
    assert set(statements) == {"shop-a", "shop-b", OPERATOR_STORE}
    b, store = statements["shop-b"], statements[OPERATOR_STORE]
    assert (b.net, b.closing_position, b.transactions) == (0, 1_955, 1)
    assert vouchers_of(b) == voucher_statement(held_opening=28, spent=20)
    assert (store.opening_position, store.net, store.transactions) == (0, 0, 1)
    assert vouchers_of(store) == voucher_statement(redeemed=20)
    assert vouchers_of(statements["shop-a"]) == voucher_statement(opening=25)
    assert (third.net_total, third.voucher_net_total) == (0, 20)
    for merchant_id, voucher_net, held in (("shop-b", 0, -20), (OPERATOR_STORE, 20, 0)):
        _, lines, _ = clearing.export(third.period_id, merchant_id)
        assert [
            (
                r["transaction_id"],
                r["kind"],
                int(r["amount"]),
                int(r["net"]),
                int(r["voucher_net"]),
                int(r["vouchers_held_change"]),
            )
            for r in lines
        ] == [(spent.transaction_id, "merchant_voucher_spend", 20, 0, voucher_net, held)]
    check_exports(clearing, third, statements)
    assert ledger_discrepancies(url) == []


# ---------------------------------------------------------------------------------------------------
# At the store: a merchant's voucher spend at the operator's store (kind 14), written as journal rows


async def _close(store: Store) -> tuple[int, dict, dict]:
    """Closes a period now: (period_id, statements by merchant, the period's summary)."""
    period, created = await store.close_period(dt.datetime.now(dt.timezone.utc))
    assert created
    period_id = period["period_id"]
    statements = {r["merchant_id"]: r for r in await store.statements(period_id=period_id)}
    return period_id, statements, dict(await store.period_summary(period_id))


async def _lines(store: Store, period_id: int, merchant_id: str) -> list[tuple]:
    """(transaction, kind, amount, fee, net, voucher_net, vouchers_held_change) of each line."""
    return [
        (r["transaction_id"], r["kind"], r["amount"], r["fee"], r["net"], r["voucher_net"], r["vouchers_held_change"])
        for r in await store.statement_lines(period_id, merchant_id)
    ]


def _check_lines_sum(statements: dict, lines: dict) -> None:
    for merchant_id, statement in statements.items():
        rows = lines[merchant_id]
        assert len(rows) == statement["transactions"]
        assert sum(r[3] for r in rows) == statement["fees"]
        assert sum(r[4] for r in rows) == statement["net"]
        assert sum(r[5] for r in rows) == statement["voucher_net"]
        assert sum(r[6] for r in rows) == statement["vouchers_received"] - statement["vouchers_spent"]


async def _voucher_rows(ledger: Ledger) -> dict:
    """Period 1 (hand-computed): u earns 1,000 at x and gets 200 vouchers in a dividend to a member (not a
    merchant's clearing matter); sp and x get dividends of 500 and 300; sp spends 120 and x 300 of them at
    st, the operator's store (kind 14); u pays 400 points + 150 vouchers at x (fee 6) and x refunds 110
    of it (80 points, 30 vouchers). st's only movements are the spends at it: other merchants'
    transactions, which move only its merchant_redeemed VOUCHERS account."""
    x, sp, st = await ledger.merchant("x"), await ledger.merchant("sp"), await ledger.merchant("st")
    u = await ledger.member("u")
    ids = {"x": x, "sp": sp, "st": st, "u": u}
    ids["earn"] = await ledger.post(
        EARN, x, u, 1_000, [("member", u, 1_000), ("merchant_issued", x, -1_000)], program_version=None
    )
    ids["member_dividend"] = await ledger.post(
        DIVIDEND, OPERATOR, u, 200, [("operator_dividends", OPERATOR, -200, VOUCHERS), ("member", u, 200, VOUCHERS)]
    )
    ids["dividend_sp"] = await ledger.post(
        DIVIDEND,
        sp,
        "",
        500,
        [("operator_dividends", OPERATOR, -500, VOUCHERS), ("merchant_vouchers", sp, 500, VOUCHERS)],
    )
    ids["dividend_x"] = await ledger.post(
        DIVIDEND,
        x,
        "",
        300,
        [("operator_dividends", OPERATOR, -300, VOUCHERS), ("merchant_vouchers", x, 300, VOUCHERS)],
    )
    ids["spend_sp"] = await ledger.post(
        MERCHANT_VOUCHER_SPEND,
        sp,
        "",
        120,
        [("merchant_vouchers", sp, -120, VOUCHERS), ("merchant_redeemed", st, 120, VOUCHERS)],
    )
    ids["spend_x"] = await ledger.post(
        MERCHANT_VOUCHER_SPEND,
        x,
        "",
        300,
        [("merchant_vouchers", x, -300, VOUCHERS), ("merchant_redeemed", st, 300, VOUCHERS)],
    )
    ids["split"] = await ledger.post(
        SPLIT_REDEEM,
        x,
        u,
        550,
        [
            ("member", u, -400),
            ("merchant_redeemed", x, 400),
            ("merchant_fees", x, -6),
            ("operator_fee_revenue", OPERATOR, 6),
            ("member", u, -150, VOUCHERS),
            ("merchant_redeemed", x, 150, VOUCHERS),
        ],
        fee=6,
    )
    await ledger.execute("INSERT INTO split_tenders VALUES ($1, $2, $3, 150, 400, 0, 110)", ids["split"], u, x)
    ids["split_refund"] = await ledger.post(
        SPLIT_REFUND,
        x,
        u,
        110,
        [
            ("member", u, 80),
            ("merchant_redeemed", x, -80),
            ("member", u, 30, VOUCHERS),
            ("merchant_redeemed", x, -30, VOUCHERS),
        ],
    )
    await ledger.execute("UPDATE transactions SET refunded = 110 WHERE transaction_id = $1", ids["split"])
    return ids


def test_voucher_spends_at_the_operators_store_dividends_and_split_tenders_clear_at_the_store(create_database):
    url = create_database()

    async def go():
        async with await Ledger.open(url) as ledger:
            store = ledger.store
            ids = await _voucher_rows(ledger)
            merchants = ("x", "sp", "st")
            first, statements, summary = await _close(store)
            lines = {m: await _lines(store, first, m) for m in merchants}
            positions = {m: await store.merchant_position(m, vouchers=True) for m in merchants}
            plain = await store.merchant_position("x")
            problems = await store.ledger_discrepancies()
            # period 2: sp spends 80 more at st; a new merchant's first movement ever is a dividend
            await asyncio.sleep(0.001)
            late = await ledger.merchant("late")
            ids["spend_sp_2"] = await ledger.post(
                MERCHANT_VOUCHER_SPEND,
                "sp",
                "",
                80,
                [("merchant_vouchers", "sp", -80, VOUCHERS), ("merchant_redeemed", "st", 80, VOUCHERS)],
            )
            ids["dividend_late"] = await ledger.post(
                DIVIDEND,
                late,
                "",
                50,
                [("operator_dividends", OPERATOR, -50, VOUCHERS), ("merchant_vouchers", late, 50, VOUCHERS)],
            )
            second, statements_2, summary_2 = await _close(store)
            lines_2 = {m: await _lines(store, second, m) for m in (*merchants, "late")}
            positions_2 = {m: await store.merchant_position(m, vouchers=True) for m in (*merchants, "late")}
            problems_2 = await store.ledger_discrepancies()
            return (
                ids,
                statements,
                summary,
                lines,
                positions,
                plain,
                problems,
                statements_2,
                summary_2,
                lines_2,
                positions_2,
                problems_2,
            )

    (
        ids,
        statements,
        summary,
        lines,
        positions,
        plain,
        problems,
        statements_2,
        summary_2,
        lines_2,
        positions_2,
        problems_2,
    ) = asyncio.run(go())

    # period 1
    assert problems == []
    assert set(statements) == {"x", "sp", "st"}  # the member dividend names "operator": no merchant's matter
    assert [
        statements["x"][n] for n in ("issued", "redeemed", "redemption_refunds", "fees", "net", "transactions")
    ] == [1_000, 400, 80, 6, -686, 5]
    assert vouchers_of(statements["x"]) == voucher_statement(redeemed=150, refunds=30, received=300, spent=300)
    assert [statements["sp"][n] for n in ("net", "closing_position", "transactions")] == [0, 0, 2]
    assert vouchers_of(statements["sp"]) == voucher_statement(received=500, spent=120)
    # the store had only voucher movements, all in other merchants' transactions: it has a statement
    assert [statements["st"][n] for n in ("net", "closing_position", "transactions")] == [0, 0, 2]
    assert vouchers_of(statements["st"]) == voucher_statement(redeemed=420)
    assert summary["voucher_net_total"] == 120 + 420 and summary["net_total"] == -686
    assert lines["x"] == [
        (ids["earn"], EARN, 1_000, 0, -1_000, 0, 0),
        (ids["dividend_x"], DIVIDEND, 300, 0, 0, 0, 300),
        (ids["spend_x"], MERCHANT_VOUCHER_SPEND, 300, 0, 0, 0, -300),
        (ids["split"], SPLIT_REDEEM, 550, 6, 394, 150, 0),
        (ids["split_refund"], SPLIT_REFUND, 110, 0, -80, -30, 0),
    ]
    assert lines["sp"] == [
        (ids["dividend_sp"], DIVIDEND, 500, 0, 0, 0, 500),
        (ids["spend_sp"], MERCHANT_VOUCHER_SPEND, 120, 0, 0, 0, -120),
    ]
    assert lines["st"] == [
        (ids["spend_sp"], MERCHANT_VOUCHER_SPEND, 120, 0, 0, 120, 0),
        (ids["spend_x"], MERCHANT_VOUCHER_SPEND, 300, 0, 0, 300, 0),
    ]
    _check_lines_sum(statements, lines)
    assert positions["x"] == {
        "issued": 1_000,
        "redeemed": 320,
        "fees": 6,
        "acquiring": 0,
        "net": -686,
        "voucher_net": 120,
        "vouchers_held": 0,
    }
    assert plain == {"issued": 1_000, "redeemed": 320, "fees": 6, "acquiring": 0, "net": -686}  # points only
    assert (positions["sp"]["voucher_net"], positions["sp"]["vouchers_held"]) == (0, 380)
    assert (positions["st"]["net"], positions["st"]["voucher_net"], positions["st"]["vouchers_held"]) == (0, 420, 0)

    # period 2: positions carried, the new merchant's first statement
    assert problems_2 == []
    assert vouchers_of(statements_2["sp"]) == voucher_statement(held_opening=380, spent=80)
    assert vouchers_of(statements_2["st"]) == voucher_statement(opening=420, redeemed=80)
    assert vouchers_of(statements_2["x"]) == voucher_statement(opening=120)
    assert vouchers_of(statements_2["late"]) == voucher_statement(received=50)
    assert [statements_2[m]["transactions"] for m in ("x", "sp", "st", "late")] == [0, 1, 1, 1]
    assert [statements_2[m]["closing_position"] for m in ("x", "sp", "st", "late")] == [-686, 0, 0, 0]
    assert summary_2["voucher_net_total"] == 80 and summary_2["merchants"] == 4
    assert lines_2["x"] == [] and lines_2["late"] == [(ids["dividend_late"], DIVIDEND, 50, 0, 0, 0, 50)]
    assert lines_2["st"] == [(ids["spend_sp_2"], MERCHANT_VOUCHER_SPEND, 80, 0, 0, 80, 0)]
    _check_lines_sum(statements_2, lines_2)
    for merchant_id, statement in statements_2.items():
        position = positions_2[merchant_id]
        assert (position["net"], position["voucher_net"], position["vouchers_held"]) == (
            statement["closing_position"],
            statement["voucher_closing_position"],
            statement["vouchers_held_closing"],
        )
    assert ledger_discrepancies(url) == []


async def _two_periods(url: str) -> dict:
    """_voucher_rows, a period closed; sp spends 80 more at st; a second period closed."""
    async with await Ledger.open(url) as ledger:
        ids = await _voucher_rows(ledger)
        await ledger.store.close_period(dt.datetime.now(dt.timezone.utc))
        await asyncio.sleep(0.001)
        await ledger.post(
            MERCHANT_VOUCHER_SPEND,
            "sp",
            "",
            80,
            [("merchant_vouchers", "sp", -80, VOUCHERS), ("merchant_redeemed", "st", 80, VOUCHERS)],
        )
        await ledger.store.close_period(dt.datetime.now(dt.timezone.utc))
        return ids


@pytest.mark.parametrize(
    "corrupt, reported",
    [
        # consistent with the statement's own CHECKs, not with the journal
        (
            """UPDATE statements SET vouchers_redeemed = vouchers_redeemed + 7, voucher_net = voucher_net + 7,
               voucher_closing_position = voucher_closing_position + 7 WHERE merchant_id = 'st' AND period_id = 1""",
            [
                "statement of st in period 1: voucher_net 427 != journal 420, vouchers_redeemed 427 != journal 420",
                "statement of st in period 2 opens at voucher position 420 and 0 vouchers held, the previous closed at 427 "
                "and 0",
            ],
        ),
        (
            """UPDATE statements SET vouchers_received = vouchers_received - 5,
               vouchers_held_closing = vouchers_held_closing - 5 WHERE merchant_id = 'sp' AND period_id = 1""",
            [
                "statement of sp in period 1: vouchers_received 495 != journal 500",
                "statement of sp in period 2 opens at voucher position 0 and 380 vouchers held, the previous closed at 0 "
                "and 375",
            ],
        ),
        (
            """UPDATE statements SET voucher_redemption_refunds = 0, voucher_net = 150, voucher_closing_position = 150
        WHERE merchant_id = 'x' AND period_id = 1""",
            [
                "statement of x in period 1: voucher_net 150 != journal 120, voucher_redemption_refunds 0 != journal 30",
                "statement of x in period 2 opens at voucher position 120 and 0 vouchers held, the previous closed at 150 "
                "and 0",
            ],
        ),
        (
            """UPDATE statements SET vouchers_spent = 0, vouchers_held_opening = 380, vouchers_held_closing = 380
        WHERE merchant_id = 'sp' AND period_id = 2""",
            ["statement of sp in period 2: vouchers_spent 0 != journal 80"],
        ),
        # the statement of a merchant whose only movements were voucher movements, gone
        (
            "DELETE FROM statements WHERE merchant_id = 'st'",
            [
                "statement of st in period 1: voucher_net 0 != journal 420, vouchers_redeemed 0 != journal 420",
                "statement of st in period 2: voucher_net 0 != journal 80, vouchers_redeemed 0 != journal 80",
            ],
        ),
    ],
)
def test_a_statement_that_misstates_vouchers_is_reported_by_reconcile(create_database, corrupt, reported):
    url = create_database()
    asyncio.run(_two_periods(url))
    assert ledger_discrepancies(url) == []
    fetch(url, corrupt)
    assert sorted(ledger_discrepancies(url)) == sorted(reported)


def test_the_voucher_identities_are_constraints_of_the_statements_table(create_database):
    url = create_database()
    asyncio.run(_two_periods(url))
    for change in (
        "voucher_net = voucher_net + 1",
        "voucher_closing_position = voucher_closing_position + 1",
        "vouchers_held_closing = vouchers_held_closing + 1",
    ):
        with pytest.raises(asyncpg.CheckViolationError):
            fetch(url, f"UPDATE statements SET {change} WHERE merchant_id = 'st' AND period_id = 1")


# ---------------------------------------------------------------------------------------------------
# Periods cut before migration 0006


def _migrations_before_0006(directory: pathlib.Path) -> pathlib.Path:
    """A copy of migrations 0001..0005, for a database as it was before voucher clearing."""
    old = directory / "migrations"
    old.mkdir()
    for path in sorted(store_module.MIGRATIONS.glob("*.sql")):
        if int(path.name.split("_", 1)[0]) < 6:
            shutil.copy(path, old / path.name)
    return old


def test_migration_fills_the_voucher_columns_of_periods_cut_before_it(create_database, tmp_path, monkeypatch):
    """A database at migration 0005 whose two periods were cut with voucher movements in them, the
    statements as the code of then wrote them (points only; a dividend to a merchant not counted, and no
    statement for y, whose only movement was a dividend). Migration 0006 fills the voucher columns from
    the journal, adds the uncounted transactions and gives y its statements, so every statement's lines
    sum to it, reconcile is clean and the next cut carries on from them.

    Period 1: u gets 200 vouchers in a dividend and earns 1,000 at x; pays 400 points + 150 vouchers at x
    (fee 6); x gets a dividend of 20, y one of 40. Period 2: x refunds 110 of the split (80 points, 30 vouchers)."""
    url = create_database()
    migrations = store_module.MIGRATIONS
    monkeypatch.setattr(store_module, "MIGRATIONS", _migrations_before_0006(tmp_path))
    base = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    at = [base + dt.timedelta(minutes=minutes) for minutes in range(30)]

    async def before():
        async with await Ledger.open(url) as ledger:
            x, y, u = await ledger.merchant("x"), await ledger.merchant("y"), await ledger.member("u")
            await ledger.post(
                DIVIDEND,
                OPERATOR,
                u,
                200,
                [("operator_dividends", OPERATOR, -200, VOUCHERS), ("member", u, 200, VOUCHERS)],
                created_at=at[0],
            )
            ids = {
                "earn": await ledger.post(
                    EARN,
                    x,
                    u,
                    1_000,
                    [("member", u, 1_000), ("merchant_issued", x, -1_000)],
                    created_at=at[1],
                    program_version=None,
                )
            }
            ids["split"] = await ledger.post(
                SPLIT_REDEEM,
                x,
                u,
                550,
                [
                    ("member", u, -400),
                    ("merchant_redeemed", x, 400),
                    ("merchant_fees", x, -6),
                    ("operator_fee_revenue", OPERATOR, 6),
                    ("member", u, -150, VOUCHERS),
                    ("merchant_redeemed", x, 150, VOUCHERS),
                ],
                fee=6,
                created_at=at[2],
            )
            ids["dividend_x"] = await ledger.post(
                DIVIDEND,
                x,
                "",
                20,
                [("operator_dividends", OPERATOR, -20, VOUCHERS), ("merchant_vouchers", x, 20, VOUCHERS)],
                created_at=at[3],
            )
            ids["dividend_y"] = await ledger.post(
                DIVIDEND,
                y,
                "",
                40,
                [("operator_dividends", OPERATOR, -40, VOUCHERS), ("merchant_vouchers", y, 40, VOUCHERS)],
                created_at=at[4],
            )
            ids["refund"] = await ledger.post(
                SPLIT_REFUND,
                x,
                u,
                110,
                [
                    ("member", u, 80),
                    ("merchant_redeemed", x, -80),
                    ("member", u, 30, VOUCHERS),
                    ("merchant_redeemed", x, -30, VOUCHERS),
                ],
                created_at=at[12],
            )
            await ledger.execute(
                """INSERT INTO settlement_periods (period_id, opened_at, cut_off)
                                    VALUES (1, 'epoch', $1), (2, $1, $2)""",
                at[10],
                at[20],
            )
            await ledger.execute(
                """INSERT INTO statements (period_id, merchant_id, opening_position, issued, earn_refunds, redeemed,
                                           redemption_refunds, fees, net, closing_position, transactions)
                   VALUES (1, 'x', 0, 1000, 0, 400, 0, 6, -606, -606, 2),
                          (2, 'x', -606, 0, 0, 0, 80, 0, -80, -686, 1)"""
            )
            return ids

    ids = asyncio.run(before())
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)

    async def after():
        async with await Ledger.open(url) as ledger:  # applies 0006 (and any later migration)
            store = ledger.store
            statements = {
                (r["period_id"], r["merchant_id"]): r
                for period in (1, 2)
                for r in await store.statements(period_id=period)
            }
            lines = {key: await _lines(store, *key) for key in statements}
            problems = await store.ledger_discrepancies()
            third, statements_3, _ = await _close(store)
            return statements, lines, problems, third, statements_3

    statements, lines, problems, third, statements_3 = asyncio.run(after())

    assert problems == []
    assert sorted(statements) == [(1, "x"), (1, "y"), (2, "x"), (2, "y")]
    x1, x2, y1, y2 = statements[1, "x"], statements[2, "x"], statements[1, "y"], statements[2, "y"]
    assert [x1[n] for n in ("issued", "redeemed", "fees", "net", "closing_position", "transactions")] == [
        1_000,
        400,
        6,
        -606,
        -606,
        3,
    ]
    assert vouchers_of(x1) == voucher_statement(redeemed=150, received=20)
    assert [x2[n] for n in ("opening_position", "redemption_refunds", "net", "closing_position", "transactions")] == [
        -606,
        80,
        -80,
        -686,
        1,
    ]
    assert vouchers_of(x2) == voucher_statement(refunds=30, opening=150, held_opening=20)
    assert [y1[n] for n in ("opening_position", "net", "closing_position", "transactions")] == [0, 0, 0, 1]
    assert vouchers_of(y1) == voucher_statement(received=40)
    assert [y2[n] for n in ("opening_position", "net", "closing_position", "transactions")] == [0, 0, 0, 0]
    assert vouchers_of(y2) == voucher_statement(held_opening=40)
    assert lines[1, "x"] == [
        (ids["earn"], EARN, 1_000, 0, -1_000, 0, 0),
        (ids["split"], SPLIT_REDEEM, 550, 6, 394, 150, 0),
        (ids["dividend_x"], DIVIDEND, 20, 0, 0, 0, 20),
    ]
    assert lines[1, "y"] == [(ids["dividend_y"], DIVIDEND, 40, 0, 0, 0, 40)]
    assert lines[2, "x"] == [(ids["refund"], SPLIT_REFUND, 110, 0, -80, -30, 0)] and lines[2, "y"] == []
    for period in (1, 2):
        _check_lines_sum(
            {m: s for (p, m), s in statements.items() if p == period},
            {m: rows for (p, m), rows in lines.items() if p == period},
        )
    assert third == 3
    assert vouchers_of(statements_3["x"]) == voucher_statement(opening=120, held_opening=20)
    assert vouchers_of(statements_3["y"]) == voucher_statement(held_opening=40)
    assert ledger_discrepancies(url) == []


def test_a_database_cut_before_0006_without_voucher_movements_keeps_its_statements(
    create_database, tmp_path, monkeypatch
):
    """Periods without a voucher movement: the migration leaves their statements exactly as they were."""
    url = create_database()
    migrations = store_module.MIGRATIONS
    monkeypatch.setattr(store_module, "MIGRATIONS", _migrations_before_0006(tmp_path))

    async def before():
        async with await Ledger.open(url) as ledger:
            x, u = await ledger.merchant("x"), await ledger.member("u")
            await ledger.post(CONVERSION, x, u, 600, [("merchant_issued", x, -600), ("member", u, 600)])
            await ledger.execute(
                "INSERT INTO settlement_periods (period_id, opened_at, cut_off) VALUES (1, 'epoch', now())"
            )
            await ledger.execute(
                """INSERT INTO statements (period_id, merchant_id, opening_position, issued, earn_refunds, redeemed,
                                           redemption_refunds, fees, net, closing_position, transactions)
                   VALUES (1, 'x', 0, 600, 0, 0, 0, 0, -600, -600, 1)"""
            )

    asyncio.run(before())
    rows = [dict(r) for r in fetch(url, "SELECT * FROM statements")]
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)

    async def migrate():
        async with await Ledger.open(url):
            pass

    asyncio.run(migrate())
    after = [dict(r) for r in fetch(url, "SELECT * FROM statements")]
    assert [{k: v for k, v in r.items() if k in rows[0]} for r in after] == rows
    assert all(r[name] == 0 for r in after for name in VOUCHER_FIELDS)
    assert ledger_discrepancies(url) == []
