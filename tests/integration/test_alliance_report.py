"""The alliance report (issue 16; docs/RULES.md section 12) through the real service and the CLI: totals
exact to the period's statements, the flow matrix attributed first in, first out over each member's whole
history (a refund of a redemption puts back the pieces it took), each redeemer's column equal to its
statement's `redeemed`, active and new members, redemption rate, top merchants and regions; NOT_FOUND for
a period not closed; reconcile catches a channel statement that no longer sums to its lines."""

from __future__ import annotations

import csv
import io

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import (
    add_program_version,
    cli,
    credential,
    earn,
    error_of,
    unique,
    wait_program_in_force,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    keys = {
        merchant: add_merchant(url, merchant, 1000, region=region, fee_redeemed_bps=1000)
        for merchant, region in (("shop-a", "r1"), ("shop-b", "r1"), ("shop-c", "r2"))
    }
    add_program_version(url, {"channel": {"promoter_commission_bps": 1000}})
    operator = credential(create_key(url, "operator"))
    service = ServiceProcess(url).start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.channel() as channel:
        yield {
            "url": url,
            "points": points_pb2_grpc.PointsServiceStub(channel),
            "channel": admin_pb2_grpc.ChannelServiceStub(channel),
            "clearing": admin_pb2_grpc.ClearingServiceStub(channel),
            "operator": operator,
            "keys": keys,
        }
    service.kill()


def _cut(w) -> int:
    moment = timestamp_pb2.Timestamp()
    moment.GetCurrentTime()
    return (
        w["clearing"]
        .CloseSettlementPeriod(
            pb.ClearingServiceCloseSettlementPeriodRequest(cut_off=moment), metadata=w["operator"], timeout=30
        )
        .period.period_id
    )


def _redeem(w, merchant: str, member: str, points: int) -> str:
    return (
        w["points"]
        .Redeem(
            points_pb2.RedeemRequest(
                merchant_id=merchant, member_id=member, points=points, idempotency_key=unique("r")
            ),
            timeout=30,
        )
        .transaction_id
    )


def test_report_is_exact_to_the_statements_and_attributes_fifo(world):
    w = world
    url, points = w["url"], w["points"]
    old, m, n = unique("old"), unique("m"), unique("n")
    op = w["operator"]
    w["channel"].RegisterPromoter(pb.RegisterPromoterRequest(promoter_id="pro-1"), metadata=op)
    w["channel"].AssignMerchantPromoter(
        pb.AssignMerchantPromoterRequest(merchant_id="shop-a", promoter_id="pro-1"), metadata=op
    )
    earn(points, "shop-a", old, 20_000)  # 2,000 point-units issued at shop-a in period 1
    period_1 = _cut(w)
    # period 2: the old member spends its period-1 points at shop-b: a flow shop-a -> shop-b
    _redeem(w, "shop-b", old, 800)
    earn(points, "shop-a", m, 10_000)  # 1,000 at shop-a
    earn(points, "shop-b", m, 10_000)  # then 1,000 at shop-b
    spent = _redeem(w, "shop-c", m, 1_500)  # FIFO: 1,000 of shop-a's, 500 of shop-b's
    w["points"].Refund(
        points_pb2.RefundRequest(merchant_id="shop-c", transaction_id=spent, points=500, idempotency_key=unique("f")),
        timeout=30,
    )  # the 500 of shop-b's come back first in line
    _redeem(w, "shop-a", m, 700)  # 700 of shop-b's
    earn(points, "shop-c", n, 20_000)  # 2,000 at shop-c
    _redeem(w, "shop-c", n, 300)  # 300 of shop-c's at shop-c
    period_2 = _cut(w)

    report = (
        w["channel"]
        .GetAllianceReport(pb.GetAllianceReportRequest(period_id=period_2, top_merchants=2), metadata=w["operator"])
        .report
    )
    statements = {
        r["merchant_id"]: r
        for r in fetch(
            url,
            "SELECT merchant_id, issued, earn_refunds, redeemed, redemption_refunds, fees FROM statements "
            "WHERE period_id = $1",
            period_2,
        )
    }
    for name in ("issued", "earn_refunds", "redeemed", "redemption_refunds", "fees"):
        assert getattr(report, name) == sum(s[name] for s in statements.values()), name
    flows = {(f.issuer_merchant_id, f.redeemer_merchant_id): f.points for f in report.flows}
    assert flows == {
        ("shop-a", "shop-b"): 800,
        ("shop-a", "shop-c"): 1_000,
        ("shop-b", "shop-c"): 500,
        ("shop-b", "shop-a"): 700,
        ("shop-c", "shop-c"): 300,
    }
    for merchant, statement in statements.items():  # each redeemer's column is its statement's redeemed
        assert sum(p for (_, redeemer), p in flows.items() if redeemer == merchant) == statement["redeemed"]
    assert (report.issued, report.redeemed) == (4_000, 3_300)
    assert report.redemption_refunds == 500
    assert report.redemption_rate_bps == 3_300 * 10_000 // 4_000
    assert (report.active_members, report.new_members) == (3, 2)  # old spent in period 2; m and n are new
    assert report.breakage == 0
    assert [(t.merchant_id, t.issued) for t in report.top_by_issue] == [("shop-c", 2_000), ("shop-a", 1_000)]
    assert [(t.merchant_id, t.redeemed) for t in report.top_by_redemption] == [("shop-c", 1_800), ("shop-b", 800)]
    regions = {r.region: (r.merchants, r.issued, r.redeemed, r.active_members) for r in report.regions}
    assert regions == {"r1": (2, 2_000, 1_500, 2), "r2": (1, 2_000, 1_800, 2)}

    # period 1 knows nothing of period 2's redemptions
    first = w["channel"].GetAllianceReport(pb.GetAllianceReportRequest(period_id=period_1), metadata=w["operator"])
    assert (first.report.issued, first.report.redeemed, list(first.report.flows)) == (2_000, 0, [])

    # the CLI prints the same report as CSV
    printed = cli("report", "--period-id", str(period_2), "--top", "2", "--database-url", url)
    assert printed.returncode == 0, printed.stderr
    rows = list(csv.reader(io.StringIO(printed.stdout)))
    summary = next(r for r in rows if r[0] == "summary")
    assert summary[1] == str(period_2) and summary[4:7] == ["4000", "0", "3300"]
    assert {(r[1], r[2]): int(r[3]) for r in rows if r[0] == "flows"} == flows
    assert [r[2] for r in rows if r[0] == "top_by_issue"] == ["shop-c", "shop-a"]
    missing = cli("report", "--period-id", "99", "--database-url", url)
    assert missing.returncode == 2 and "not closed" in missing.stderr

    # refusals
    error = error_of(
        lambda: w["channel"].GetAllianceReport(pb.GetAllianceReportRequest(period_id=99), metadata=w["operator"])
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "99" in error.details()
    for request in (
        pb.GetAllianceReportRequest(period_id=0),
        pb.GetAllianceReportRequest(period_id=1, top_merchants=101),
    ):
        assert error_of(lambda: w["channel"].GetAllianceReport(request, metadata=w["operator"])).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    merchant_key = credential(w["keys"]["shop-a"])
    assert (
        error_of(
            lambda: w["channel"].GetAllianceReport(
                pb.GetAllianceReportRequest(period_id=period_2), metadata=merchant_key
            )
        ).code()
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert ledger_discrepancies(url) == []


def test_reconcile_finds_a_channel_statement_that_does_not_sum_to_its_lines(world):
    url = world["url"]
    statement = fetch(url, "SELECT period_id, payee_id, amount FROM channel_statements ORDER BY period_id LIMIT 1")
    assert statement, "the first test's cuts wrote no channel statement"
    period_id, payee_id = statement[0]["period_id"], statement[0]["payee_id"]
    fetch(
        url,
        "UPDATE channel_statement_lines SET amount = amount + 1 WHERE period_id = $1 AND payee_id = $2",
        period_id,
        payee_id,
    )
    try:
        problems = ledger_discrepancies(url)
        assert any(f"channel statement promoter {payee_id} of period {period_id}" in p for p in problems), problems
    finally:
        fetch(
            url,
            "UPDATE channel_statement_lines SET amount = amount - 1 WHERE period_id = $1 AND payee_id = $2",
            period_id,
            payee_id,
        )
    assert ledger_discrepancies(url) == []


def test_reconcile_finds_a_channel_statement_line_without_its_statement_or_merchant(world):
    url = world["url"]
    fetch(
        url,
        "INSERT INTO channel_statement_lines VALUES (99, 'promoter', 'nobody', 'shop-a', 10, 1), "
        "(1, 'promoter', 'pro-1', 'ghost', 0, 0)",
    )
    try:
        problems = ledger_discrepancies(url)
        for line in (
            "promoter nobody in period 99 for merchant shop-a",
            "promoter pro-1 in period 1 for merchant ghost",
        ):
            assert any(
                f"channel statement line of {line}: its statement or its merchant does not exist" in p for p in problems
            ), problems
    finally:
        fetch(url, "DELETE FROM channel_statement_lines WHERE payee_id = 'nobody' OR merchant_id = 'ghost'")
    assert ledger_discrepancies(url) == []


def test_one_report_at_a_time_another_is_resource_exhausted(world):
    """A report waits on a lock held by the test; a second one meanwhile is refused with a retry delay."""
    import asyncio
    import threading

    import asyncpg

    from tests.integration.helpers import wait_until

    w, url = world, world["url"]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    connection = run(asyncpg.connect(url))
    transaction = connection.transaction()
    run(transaction.start())
    run(connection.execute("LOCK TABLE settlement_periods IN ACCESS EXCLUSIVE MODE"))
    request = pb.GetAllianceReportRequest(period_id=1)
    try:
        first = w["channel"].GetAllianceReport.future(request, metadata=w["operator"], timeout=60)
        wait_until(
            lambda: fetch(
                url,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM settlement_periods%'",
            ),
            "the first report did not reach the database",
        )
        error = error_of(lambda: w["channel"].GetAllianceReport(request, metadata=w["operator"], timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in error.details()
    finally:
        run(transaction.rollback())
        run(connection.close())
        loop.call_soon_threadsafe(loop.stop)
    assert first.result().report.period_id == 1
    assert w["channel"].GetAllianceReport(request, metadata=w["operator"], timeout=30).report.period_id == 1
