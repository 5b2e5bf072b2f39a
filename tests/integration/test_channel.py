"""Channel economics (issue 16; docs/RULES.md section 12) through the real service: promoters and regional
agents registered with ChannelService, their commissions and shares decided at a settlement cut from the
merchants' statements and posted by the committer (kinds 23, 24) with exact figures, their statements
(lines summing to them, CSV), SetGiveBack with the merchant's own key effective from the next earn and
audited, the refusals of each call, and reconcile clean after every step."""

from __future__ import annotations

import csv
import io
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc, points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies, open_store
from tests.integration.helpers import add_program_version, credential, earn, error_of, unique, wait_program_in_force

pytestmark = pytest.mark.timeout(120)

PROMOTER, REGION = pb.CHANNEL_PAYEE_KIND_PROMOTER, pb.CHANNEL_PAYEE_KIND_REGION
# 20% of fee revenue to a merchant's promoter; agents: province 5%, city 10%, county 15%, down the tree
CHANNEL = {
    "promoter_commission_bps": 2000,
    "province_agent_share_bps": 500,
    "city_agent_share_bps": 1000,
    "county_agent_share_bps": 1500,
    "agent_scope": "subtree",
}


@pytest.fixture(scope="module")
def world(create_database):
    url = create_database()
    keys = {
        # shop-a: in a county; fees 5% of points issued, 10% of points redeemed
        "shop-a": add_merchant(url, "shop-a", 1000, region="county-x", fee_issued_bps=500, fee_redeemed_bps=1000),
        # shop-b: in the county's city itself; fees 10% of points redeemed
        "shop-b": add_merchant(url, "shop-b", 1000, region="city-y", fee_redeemed_bps=1000),
        # shop-c: no region, no promoter: its fees stay the operator's
        "shop-c": add_merchant(url, "shop-c", 1000, fee_redeemed_bps=1000),
    }
    add_program_version(url, {"channel": CHANNEL})
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
    print("\n".join(line for line in service.log_lines if "Traceback" in line or "error" in line.lower())[-5000:])


def _code(call) -> grpc.StatusCode:
    return error_of(call).code()


def _now() -> timestamp_pb2.Timestamp:
    moment = timestamp_pb2.Timestamp()
    moment.GetCurrentTime()
    return moment


def _wait_posted(w, period_id: int, payees: list[tuple[int, str]], seconds: float = 20) -> dict:
    """The statements of `payees` once the committer has posted each (transaction_id set)."""
    deadline = time.monotonic() + seconds
    while True:
        found = {
            (kind, payee): w["channel"]
            .GetChannelStatement(
                pb.GetChannelStatementRequest(period_id=period_id, payee_kind=kind, payee_id=payee),
                metadata=w["operator"],
                timeout=30,
            )
            .statement
            for kind, payee in payees
        }
        if all(s.transaction_id for s in found.values()):
            return found
        assert time.monotonic() < deadline, "the channel statements were not posted"
        time.sleep(0.1)


def _balances(url: str) -> dict:
    return {
        (r["kind"], r["owner_id"]): r["balance"]
        for r in fetch(
            url,
            """SELECT kind, owner_id, balance FROM account_balances WHERE asset_code = 'POINTS'
               AND kind IN ('promoter_commissions', 'regional_agent_shares', 'operator_fee_revenue')""",
        )
    }


def test_registry_calls_and_their_refusals(world):
    w = world
    stub, op = w["channel"], w["operator"]
    promoter = stub.RegisterPromoter(pb.RegisterPromoterRequest(promoter_id="pro-1", region="prov-p"), metadata=op)
    assert (promoter.promoter.promoter_id, promoter.promoter.region) == ("pro-1", "prov-p")
    assert _code(lambda: stub.RegisterPromoter(pb.RegisterPromoterRequest(promoter_id="pro-1"), metadata=op)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert _code(lambda: stub.RegisterPromoter(pb.RegisterPromoterRequest(promoter_id=""), metadata=op)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    for merchant in ("shop-a", "shop-b"):
        assigned = stub.AssignMerchantPromoter(
            pb.AssignMerchantPromoterRequest(merchant_id=merchant, promoter_id="pro-1"), metadata=op
        )
        assert (assigned.merchant_id, assigned.promoter_id) == (merchant, "pro-1")
    for merchant, promoter_id in (("nowhere", "pro-1"), ("shop-c", "nobody")):
        error = error_of(
            lambda: stub.AssignMerchantPromoter(
                pb.AssignMerchantPromoterRequest(merchant_id=merchant, promoter_id=promoter_id), metadata=op
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert repr(merchant if merchant == "nowhere" else promoter_id) in error.details()

    def region(region_id, level, parent=""):
        return stub.CreateRegion(
            pb.CreateRegionRequest(region_id=region_id, level=level, parent_id=parent, name=region_id.upper()),
            metadata=op,
        )

    assert region("prov-p", pb.REGION_LEVEL_PROVINCE).region.level == pb.REGION_LEVEL_PROVINCE
    assert region("city-y", pb.REGION_LEVEL_CITY, "prov-p").region.parent_id == "prov-p"
    assert region("county-x", pb.REGION_LEVEL_COUNTY, "city-y").region.parent_id == "city-y"
    for args, code in (
        (("county-z", pb.REGION_LEVEL_COUNTY, "prov-p"), grpc.StatusCode.FAILED_PRECONDITION),  # skips the city
        (("city-z", pb.REGION_LEVEL_CITY, ""), grpc.StatusCode.INVALID_ARGUMENT),  # a city needs a province
        (("city-z", pb.REGION_LEVEL_CITY, "prov-q"), grpc.StatusCode.NOT_FOUND),
        (("prov-z", pb.REGION_LEVEL_PROVINCE, "prov-p"), grpc.StatusCode.INVALID_ARGUMENT),
        (("prov-z", pb.REGION_LEVEL_UNSPECIFIED, ""), grpc.StatusCode.INVALID_ARGUMENT),
        (("prov-p", pb.REGION_LEVEL_PROVINCE, ""), grpc.StatusCode.ALREADY_EXISTS),
    ):
        assert _code(lambda: region(*args)) == code, args
    for agent, region_id in (("agent-p", "prov-p"), ("agent-y", "city-y"), ("agent-x", "county-x")):
        registered = stub.RegisterRegionalAgent(
            pb.RegisterRegionalAgentRequest(agent_id=agent, region_id=region_id), metadata=op
        )
        assert (registered.region.region_id, registered.region.agent_id) == (region_id, agent)
    assert (
        _code(
            lambda: stub.RegisterRegionalAgent(
                pb.RegisterRegionalAgentRequest(agent_id="agent-2", region_id="prov-p"), metadata=op
            )
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        _code(
            lambda: stub.RegisterRegionalAgent(
                pb.RegisterRegionalAgentRequest(agent_id="agent-2", region_id="nowhere"), metadata=op
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    listed = stub.ListRegions(pb.ListRegionsRequest(), metadata=op).regions
    assert [(r.region_id, r.parent_id, r.agent_id) for r in listed] == [
        ("city-y", "prov-p", "agent-y"),
        ("county-x", "city-y", "agent-x"),
        ("prov-p", "", "agent-p"),
    ]
    # a page at a time: a country has thousands of counties
    first = stub.ListRegions(pb.ListRegionsRequest(page_size=2), metadata=op)
    assert [r.region_id for r in first.regions] == ["city-y", "county-x"] and first.next_page_token
    last = stub.ListRegions(pb.ListRegionsRequest(page_size=2, page_token=first.next_page_token), metadata=op)
    assert [r.region_id for r in last.regions] == ["prov-p"] and last.next_page_token == ""
    for bad in (pb.ListRegionsRequest(page_size=1001), pb.ListRegionsRequest(page_token="!")):
        assert _code(lambda: stub.ListRegions(bad, metadata=op)) == grpc.StatusCode.INVALID_ARGUMENT
    # a merchant's key may call SetGiveBack only
    merchant_key = credential(w["keys"]["shop-a"])
    error = error_of(
        lambda: stub.RegisterPromoter(pb.RegisterPromoterRequest(promoter_id="pro-9"), metadata=merchant_key)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "operator key" in error.details()
    assert not fetch(w["url"], "SELECT 1 FROM promoters WHERE promoter_id = 'pro-9'")


def test_commissions_and_agent_shares_posted_at_the_cut_with_exact_figures(world):
    w = world
    points, stub, op, url = w["points"], w["channel"], w["operator"], w["url"]
    m1, m2, m3 = unique("m1"), unique("m2"), unique("m3")
    earn(points, "shop-a", m1, 100_000)  # 10,000 point-units; shop-a's issue fee 5% = 500
    points.Redeem(_redeem("shop-b", m1, 3_000), timeout=30)  # shop-b's redemption fee 10% = 300
    earn(points, "shop-b", m2, 50_000)  # 5,000; shop-b charges no issue fee
    points.Redeem(_redeem("shop-a", m2, 1_001), timeout=30)  # floor(100.1) = 100 to shop-a's fees
    earn(points, "shop-c", m3, 20_000)  # 2,000 at shop-c, which has neither promoter nor region
    points.Redeem(_redeem("shop-c", m3, 2_000), timeout=30)  # fee 200: the operator keeps it all
    before = _balances(url)
    period = (
        w["clearing"]
        .CloseSettlementPeriod(pb.ClearingServiceCloseSettlementPeriodRequest(cut_off=_now()), metadata=op, timeout=30)
        .period
    )
    fees = {
        r["merchant_id"]: r["fees"]
        for r in fetch(url, "SELECT merchant_id, fees FROM statements WHERE period_id = $1", period.period_id)
    }
    assert fees == {"shop-a": 600, "shop-b": 300, "shop-c": 200}
    payees = [(PROMOTER, "pro-1"), (REGION, "county-x"), (REGION, "city-y"), (REGION, "prov-p")]
    statements = _wait_posted(w, period.period_id, payees)
    figures = {key: (s.agent_id, s.rate_bps, s.fee_base, s.amount, s.merchants) for key, s in statements.items()}
    assert figures == {
        # 20% of shop-a's 600 and shop-b's 300
        (PROMOTER, "pro-1"): ("", 2000, 900, 120 + 60, 2),
        # the county's agent: shop-a only
        (REGION, "county-x"): ("agent-x", 1500, 600, 90, 1),
        # the city's agent: shop-b in the city and shop-a in its county
        (REGION, "city-y"): ("agent-y", 1000, 900, 60 + 30, 2),
        # the province's agent: both, below it
        (REGION, "prov-p"): ("agent-p", 500, 900, 30 + 15, 2),
    }
    after = _balances(url)
    assert after[("promoter_commissions", "pro-1")] == 180
    assert after[("regional_agent_shares", "agent-x")] == 90
    assert after[("regional_agent_shares", "agent-y")] == 90
    assert after[("regional_agent_shares", "agent-p")] == 45
    # the operator took 1,100 of fees and paid 405 of them out
    assert after[("operator_fee_revenue", "operator")] == before[("operator_fee_revenue", "operator")] - 405
    postings = fetch(
        url,
        "SELECT kind, merchant_id, member_id, amount FROM transactions WHERE kind IN (23, 24) ORDER BY kind, amount",
    )
    assert [tuple(r) for r in postings] == [
        (23, "operator", "", 180),
        (24, "operator", "", 45),
        (24, "operator", "", 90),
        (24, "operator", "", 90),
    ]
    # merchants' statements are unchanged by the postings: the next period has none of them as lines
    period_2 = (
        w["clearing"]
        .CloseSettlementPeriod(pb.ClearingServiceCloseSettlementPeriodRequest(cut_off=_now()), metadata=op, timeout=30)
        .period
    )
    assert period_2.merchants == 0 or not fetch(
        url, "SELECT 1 FROM statements WHERE period_id = $1 AND merchant_id = 'operator'", period_2.period_id
    )
    assert ledger_discrepancies(url) == []

    # statements: lines sum to them, in the CSV too
    export = stub.ExportChannelStatement(
        pb.ExportChannelStatementRequest(period_id=period.period_id, payee_kind=REGION, payee_id="city-y"),
        metadata=op,
    )
    lines = list(csv.DictReader(io.StringIO(export.csv.decode())))
    assert export.lines == 2
    assert [(r["merchant_id"], int(r["fees"]), int(r["amount"])) for r in lines] == [
        ("shop-a", 600, 60),
        ("shop-b", 300, 30),
    ]
    assert sum(int(r["amount"]) for r in lines) == statements[(REGION, "city-y")].amount
    export = stub.ExportChannelStatement(
        pb.ExportChannelStatementRequest(period_id=period.period_id, payee_kind=REGION), metadata=op
    )
    rows = list(csv.DictReader(io.StringIO(export.csv.decode())))
    assert [(r["payee_id"], r["agent_id"], int(r["amount"])) for r in rows] == [
        ("city-y", "agent-y", 90),
        ("county-x", "agent-x", 90),
        ("prov-p", "agent-p", 45),
    ]
    assert all(r["transaction_id"] for r in rows)
    pages, token = [], ""
    while True:  # in pages of 2 lines: the pages' concatenation is the whole file
        page = stub.ExportChannelStatement(
            pb.ExportChannelStatementRequest(
                period_id=period.period_id, payee_kind=REGION, page_size=2, page_token=token
            ),
            metadata=op,
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    assert [p.lines for p in pages] == [2, 1]
    assert b"".join(p.csv for p in pages) == export.csv
    assert (
        _code(
            lambda: stub.ExportChannelStatement(
                pb.ExportChannelStatementRequest(period_id=period.period_id, payee_kind=REGION, page_size=50_001),
                metadata=op,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    listed = stub.ListChannelStatements(
        pb.ListChannelStatementsRequest(payee_kind=PROMOTER, payee_id="pro-1"), metadata=op
    ).statements
    assert [(s.period_id, s.amount) for s in listed] == [(period.period_id, 180)]
    page = stub.ListChannelStatements(
        pb.ListChannelStatementsRequest(payee_kind=REGION, period_id=period.period_id, page_size=2), metadata=op
    )
    rest = stub.ListChannelStatements(
        pb.ListChannelStatementsRequest(
            payee_kind=REGION, period_id=period.period_id, page_size=2, page_token=page.next_page_token
        ),
        metadata=op,
    )
    assert [s.payee_id for s in [*page.statements, *rest.statements]] == ["city-y", "county-x", "prov-p"]
    assert not rest.next_page_token

    # refusals of the statement calls
    for request, code in (
        (pb.GetChannelStatementRequest(period_id=period.period_id, payee_kind=PROMOTER, payee_id="nobody"),
         grpc.StatusCode.NOT_FOUND),
        (pb.GetChannelStatementRequest(period_id=0, payee_kind=PROMOTER, payee_id="pro-1"),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GetChannelStatementRequest(period_id=period.period_id, payee_id="pro-1"),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):  # fmt: skip
        assert _code(lambda: stub.GetChannelStatement(request, metadata=op)) == code, request
    assert (
        _code(
            lambda: stub.ExportChannelStatement(
                pb.ExportChannelStatementRequest(period_id=999, payee_kind=PROMOTER), metadata=op
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )


def test_a_reassigned_merchant_pays_its_new_promoter_and_scope_region_pays_only_its_own_regions_agent(world):
    w = world
    points, stub, op, url = w["points"], w["channel"], w["operator"], w["url"]
    add_program_version(url, {"channel": {**CHANNEL, "agent_scope": "region"}})
    time.sleep(1.3)  # in force PROGRAM_LEAD_SECONDS after it is stored
    stub.RegisterPromoter(pb.RegisterPromoterRequest(promoter_id="pro-2"), metadata=op)
    stub.AssignMerchantPromoter(
        pb.AssignMerchantPromoterRequest(merchant_id="shop-b", promoter_id="pro-2"), metadata=op
    )
    for merchant in ("shop-a", "shop-b"):
        member = unique("m")
        earn(points, "shop-c", member, 20_000)
        points.Redeem(_redeem(merchant, member, 1_000), timeout=30)  # a fee of 100 at each
    period = (
        w["clearing"]
        .CloseSettlementPeriod(pb.ClearingServiceCloseSettlementPeriodRequest(cut_off=_now()), metadata=op, timeout=30)
        .period.period_id
    )
    statements = _wait_posted(
        w, period, [(PROMOTER, "pro-1"), (PROMOTER, "pro-2"), (REGION, "county-x"), (REGION, "city-y")]
    )
    assert {key: (s.fee_base, s.amount) for key, s in statements.items()} == {
        (PROMOTER, "pro-1"): (100, 20),  # shop-a only now
        (PROMOTER, "pro-2"): (100, 20),  # shop-b, reassigned before the cut
        (REGION, "county-x"): (100, 15),  # shop-a, in the county
        (REGION, "city-y"): (100, 10),  # shop-b only: shop-a's county is below it, out of scope "region"
    }
    assert (
        _code(
            lambda: stub.GetChannelStatement(
                pb.GetChannelStatementRequest(period_id=period, payee_kind=REGION, payee_id="prov-p"), metadata=op
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )  # no merchant in the province itself
    assert ledger_discrepancies(url) == []


def _redeem(merchant: str, member: str, points: int):
    from points.v1 import points_pb2

    return points_pb2.RedeemRequest(merchant_id=merchant, member_id=member, points=points, idempotency_key=unique("r"))


def test_set_give_back_with_the_merchants_own_key_from_the_next_earn_audited(world):
    w = world
    stub, url = w["channel"], w["url"]
    own = credential(w["keys"]["shop-c"])
    changed = stub.SetGiveBack(pb.SetGiveBackRequest(merchant_id="shop-c", give_back_bps=2000), metadata=own)
    assert changed.merchant.give_back_bps == 2000
    assert earn(w["points"], "shop-c", unique("m"), 10_000).points == 2_000  # 20% from the next earn
    # another merchant's key, out of the program's bounds, an unknown merchant
    error = error_of(
        lambda: stub.SetGiveBack(
            pb.SetGiveBackRequest(merchant_id="shop-c", give_back_bps=500), metadata=credential(w["keys"]["shop-a"])
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "own key" in error.details()
    for bps in (299, 2001, 0):
        error = error_of(
            lambda: stub.SetGiveBack(pb.SetGiveBackRequest(merchant_id="shop-c", give_back_bps=bps), metadata=own)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "300..2000" in error.details()
    assert (
        _code(
            lambda: stub.SetGiveBack(
                pb.SetGiveBackRequest(merchant_id="nowhere", give_back_bps=500), metadata=w["operator"]
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert earn(w["points"], "shop-c", unique("m"), 10_000).points == 2_000  # the refusals changed nothing
    by_operator = stub.SetGiveBack(
        pb.SetGiveBackRequest(merchant_id="shop-c", give_back_bps=300), metadata=w["operator"]
    )
    assert by_operator.merchant.give_back_bps == 300
    assert earn(w["points"], "shop-c", unique("m"), 10_000).points == 300
    audited = fetch(
        url,
        """SELECT outcome, request->>'give_back_bps' AS bps FROM audit_records
           WHERE method = '/points.v1.ChannelService/SetGiveBack' ORDER BY audit_id""",
    )
    assert [(r["outcome"], r["bps"]) for r in audited] == [
        ("OK", "2000"),
        ("PERMISSION_DENIED", "500"),
        ("INVALID_ARGUMENT", "299"),
        ("INVALID_ARGUMENT", "2001"),
        ("INVALID_ARGUMENT", None),  # 0 is proto3's default: not in the JSON
        ("NOT_FOUND", "500"),
        ("OK", "300"),
    ]
    assert ledger_discrepancies(url) == []


def test_a_cut_made_while_no_service_ran_is_posted_at_the_next_start(create_database):
    """The statements are decided in the cut's transaction; their postings wait for the committer, which
    looks for unposted ones when it starts (docs/OPERATIONS.md)."""
    import asyncio
    import datetime as dt

    from processor import rules

    url = create_database()
    add_merchant(url, "shop", 1000, fee_redeemed_bps=1000)
    operator = credential(create_key(url, "operator"))
    service = ServiceProcess(url).start()
    with service.channel() as channel:
        stub = admin_pb2_grpc.ChannelServiceStub(channel)
        stub.RegisterPromoter(pb.RegisterPromoterRequest(promoter_id="pro"), metadata=operator)
        stub.AssignMerchantPromoter(
            pb.AssignMerchantPromoterRequest(merchant_id="shop", promoter_id="pro"), metadata=operator
        )
        points = points_pb2_grpc.PointsServiceStub(channel)
        member = unique("m")
        earn(points, "shop", member, 50_000)
        points.Redeem(_redeem("shop", member, 4_999), timeout=30)  # fee floor(499.9) = 499
    assert service.terminate() == 0

    async def cut() -> None:
        store = await open_store(url)
        try:
            await store.close_period(
                dt.datetime.now(dt.timezone.utc), rules.ChannelSettings(promoter_commission_bps=5000)
            )
        finally:
            await store.close()

    asyncio.run(cut())
    assert fetch(url, "SELECT amount FROM channel_statements")[0]["amount"] == 249  # floor(499 x 50%)
    assert not fetch(url, "SELECT 1 FROM transactions WHERE kind = 23")
    restarted = ServiceProcess(url).start()
    try:
        deadline = time.monotonic() + 20
        while not fetch(url, "SELECT 1 FROM transactions WHERE kind = 23"):
            assert time.monotonic() < deadline, "the cut's statement was not posted after the start"
            time.sleep(0.1)
        time.sleep(0.5)  # a second posting, if there were one, would be written by now
        assert [r["amount"] for r in fetch(url, "SELECT amount FROM transactions WHERE kind = 23")] == [249]
        # checked while the service runs: it projects what it answered (after a SIGKILL nothing would)
        assert ledger_discrepancies(url) == []
    finally:
        restarted.kill()
