"""The seed systems (issue 16), each run end to end from its program file in ops/programs/ through the real
service and Postgres: earn, redeem, split tender, dividends, refunds, settlement, reconcile, with the
figures the seed documents give (docs/RULES.md section 11 maps each file's lines to its seed); for 众店 also
its channel economics (promoters, the province / city / county service centres) at the settlement cut,
with the rates of its file's `channel` block, through ChannelService (docs/RULES.md section 12)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import pathlib
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from processor import domain
from processor.store import Store, StoreError
from tests.harness import ROOT, ServiceProcess, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import cli, credential, earn, error_of, unique, wait_program_in_force

PROGRAMS = pathlib.Path(ROOT) / "ops" / "programs"
YUAN = 100  # currency minor units per yuan; also point-units per point
PROMOTER, REGION = admin_pb2.CHANNEL_PAYEE_KIND_PROMOTER, admin_pb2.CHANNEL_PAYEE_KIND_REGION


def program_file(name: str) -> dict:
    return json.loads((PROGRAMS / f"{name}.json").read_text())


async def _set_up(url: str, program_id: str, config: dict, merchants: dict[str, dict]) -> None:
    """As the operator does: stores the program's first version, then adds the merchants with the give-back
    bounds of that program (`merchant add --program-id`)."""
    store = await Store.open(url, 2)
    try:
        await store.migrate()
        await store.add_program_version(program_id, None, config, "tests")
        bounds = await store.give_back_bounds(program_id)
        for merchant_id, fields in merchants.items():
            await store.add_merchant(merchant_id, **fields, give_back_bounds=bounds)
    finally:
        await store.close()


class System:
    """One seed system: its database, its service running its program, and clients."""

    def __init__(self, create_database, program_id: str, config: dict, merchants: dict[str, dict]):
        self.url = create_database()
        self.program_id = program_id
        asyncio.run(_set_up(self.url, program_id, config, merchants))
        self.service = ServiceProcess(self.url, "--program-id", program_id, "--dividend-check-seconds", "0.2").start()
        wait_program_in_force(self.url)  # in force PROGRAM_LEAD_SECONDS after it was stored
        self.channel = self.service.channel()
        self.points = points_pb2_grpc.PointsServiceStub(self.channel)
        self.clearing = admin_pb2_grpc.ClearingServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.service.kill()

    def restart(self) -> None:
        """Kills the service and starts it again on the same database: its state comes from Postgres."""
        self.close()
        self.service = ServiceProcess(self.url, *self.service.extra).start()
        self.channel = self.service.channel()
        self.points = points_pb2_grpc.PointsServiceStub(self.channel)
        self.clearing = admin_pb2_grpc.ClearingServiceStub(self.channel)

    def balance(self, member: str) -> pb.GetBalanceResponse:
        return self.points.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)

    def redeem(self, merchant: str, member: str, points: int, vouchers: int = 0) -> pb.RedeemResponse:
        return self.points.Redeem(
            pb.RedeemRequest(
                merchant_id=merchant, member_id=member, points=points, vouchers=vouchers, idempotency_key=unique("k")
            ),
            timeout=30,
        )

    def refund(self, merchant: str, transaction_id: str, points: int) -> pb.RefundResponse:
        return self.points.Refund(
            pb.RefundRequest(
                merchant_id=merchant, transaction_id=transaction_id, points=points, idempotency_key=unique("k")
            ),
            timeout=30,
        )

    def settle(self) -> dict[str, admin_pb2.Statement]:
        """Closes the settlement period now; the period's statements by merchant."""
        micros = time.time_ns() // 1000
        cut = timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)
        period = self.clearing.CloseSettlementPeriod(
            admin_pb2.ClearingServiceCloseSettlementPeriodRequest(cut_off=cut), timeout=60
        ).period
        page = self.clearing.ListStatements(
            admin_pb2.ClearingServiceListStatementsRequest(period_id=period.period_id, page_size=1000), timeout=30
        )
        return {s.merchant_id: s for s in page.statements}

    def transactions(self, *kinds: int) -> list[dict]:
        return [
            dict(r)
            for r in fetch(
                self.url,
                "SELECT transaction_id, kind, merchant_id, member_id, amount, fee, original_transaction_id "
                "FROM transactions WHERE kind = ANY($1::smallint[]) ORDER BY transaction_id",
                list(kinds),
            )
        ]

    def account(self, kind: str, owner: str = "operator") -> int:
        rows = fetch(self.url, "SELECT balance FROM account_balances WHERE kind = $1 AND owner_id = $2", kind, owner)
        return rows[0]["balance"] if rows else 0


def _txn(transaction_id: str) -> int:
    return int(transaction_id.removeprefix("txn_"))


def spend(system: System, merchant: str, vouchers: int) -> pb.SpendMerchantVouchersResponse:
    """The merchant spends vouchers at the operator's store."""
    return system.points.SpendMerchantVouchers(
        pb.SpendMerchantVouchersRequest(merchant_id=merchant, vouchers=vouchers, idempotency_key=unique("k")),
        timeout=30,
    )


def _wait(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# --- 众店 (seed 001) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zhongdian(create_database):
    system = System(
        create_database,
        "zhongdian",
        program_file("zhongdian"),
        {
            "shop-a": {"give_back_bps": 2_000},  # 商家A自行设置让利比例为20%
            "shop-b": {"give_back_bps": 1_000},
            "zhongdian-mall": {"give_back_bps": 300},  # the platform's own store (自营商城)
        },
    )
    yield system
    system.close()


def test_zhongdian_match_pool_round_one_fan_rewards_credit_and_refunds(zhongdian):
    z = zhongdian
    a = unique("user-a")
    # "若用户a在其店内消费1000元,则商家A和用户a均获得:1000*20%=200积分"
    earned = earn(z.points, "shop-a", a, 1_000 * YUAN)
    assert earned.points == 200 * YUAN and earned.balance == 200 * YUAN
    (match,) = z.transactions(27)
    assert (match["merchant_id"], match["member_id"], match["amount"]) == ("shop-a", a, 200 * YUAN)
    assert match["original_transaction_id"] == _txn(earned.transaction_id)
    assert z.account("merchant_points", "shop-a") == 200 * YUAN
    assert z.account("operator_merchant_match") == -200 * YUAN

    # "用户和商家共得400积分,达到初始分红值(400),开始释放第1期消费券": round 1 at 0.5% of what each holds
    _wait(lambda: z.balance(a).vouchers == 100, "round 1 did not pay user a")
    rounds = fetch(
        z.url,
        "SELECT round_number, pool_point_units, rate_bps, holdings_point_units, total_issued FROM dividend_rounds",
    )
    assert [dict(r) for r in rounds] == [
        {
            "round_number": 1,
            "pool_point_units": 400 * YUAN,
            "rate_bps": 50,
            "holdings_point_units": 400 * YUAN,
            "total_issued": 200,
        }
    ]
    allocations = fetch(z.url, "SELECT holder_kind, holder_id, amount FROM dividend_allocations ORDER BY holder_kind")
    assert [tuple(r) for r in allocations] == [("member", a, 100), ("merchant", "shop-a", 100)]
    _wait(lambda: z.account("merchant_vouchers", "shop-a") == 100, "round 1 did not pay merchant A")

    # the merchant spends its vouchers at the platform's store (商家可以从平台拿货,使用消费券抵扣货款) and at any
    # merchant of the alliance (可以在生态联盟内任意商家消费), never at itself
    spent = z.points.SpendMerchantVouchers(
        pb.SpendMerchantVouchersRequest(merchant_id="shop-a", vouchers=60, idempotency_key=unique("k")), timeout=30
    )
    assert (spent.vouchers, spent.store_merchant_id, spent.voucher_balance) == (60, "zhongdian-mall", 40)
    spent = z.points.SpendMerchantVouchers(
        pb.SpendMerchantVouchersRequest(
            merchant_id="shop-a", vouchers=40, at_merchant_id="shop-b", idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert (spent.vouchers, spent.store_merchant_id, spent.voucher_balance) == (40, "shop-b", 0)
    to_itself = error_of(
        lambda: z.points.SpendMerchantVouchers(
            pb.SpendMerchantVouchersRequest(
                merchant_id="shop-b", vouchers=1, at_merchant_id="shop-b", idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert to_itself.code() == grpc.StatusCode.INVALID_ARGUMENT and "at itself" in to_itself.details()

    # "平台赠送消费者5倍的消费券分红额度": credit of 5x the next round's dividend (round 2: 75 bps of 200
    # points = 150 voucher-units, x5 = 750), spent with the member's own vouchers first, at any merchant
    balance = z.balance(a)
    assert (balance.voucher_credit_limit, balance.voucher_credit_used) == (750, 0)
    split = z.redeem("shop-b", a, points=50 * YUAN, vouchers=300)
    assert (split.vouchers, split.voucher_balance, split.voucher_credit_used) == (300, 0, 200)
    assert split.balance == 150 * YUAN

    # "商家...同时还可获得积分数量5倍的消费券": the merchant too spends on credit, 5x its expected dividend on the
    # 200 points it holds (750 voucher-units), and no more
    on_credit = spend(z, "shop-a", 200)
    assert (on_credit.vouchers, on_credit.voucher_balance, on_credit.voucher_credit_used) == (200, 0, 200)
    too_much = error_of(lambda: spend(z, "shop-a", 551))
    assert too_much.code() == grpc.StatusCode.FAILED_PRECONDITION and "may owe 550 more on credit" in too_much.details()

    # the fan reward, "锁定粉丝,去平台任意消费可得粉丝消费额1%消费券奖励": a fan of shop-b (signed up there)
    # spends at shop-a and at shop-b itself; shop-b gets 1% of each spend in vouchers (kind 30)
    fan = unique("fan")
    z.points.LinkMember(pb.LinkMemberRequest(merchant_id="shop-b", member_id=fan, idempotency_key=unique("k")))
    earn(z.points, "shop-a", fan, 20 * YUAN)
    at_b = earn(z.points, "shop-b", fan, 20 * YUAN)
    rewards = [(r["merchant_id"], r["member_id"], r["amount"]) for r in z.transactions(30)]
    assert rewards == [("shop-b", fan, 20), ("shop-b", fan, 20)]
    assert z.account("merchant_vouchers", "shop-b") == 40
    assert z.account("merchant_points", "shop-a") == 204 * YUAN  # the fan's 4 points matched too
    # a fan of shop-a: its reward repays first what shop-a owes
    fan2 = unique("fan")
    z.points.LinkMember(pb.LinkMemberRequest(merchant_id="shop-a", member_id=fan2, idempotency_key=unique("k")))
    earn(z.points, "shop-b", fan2, 20 * YUAN)
    assert (z.account("merchant_voucher_credit", "shop-a"), z.account("merchant_vouchers", "shop-a")) == (-180, 0)
    # shop-b spends its rewards; the fan's purchase at shop-b is refunded: the reward comes back in full,
    # as vouchers shop-b owes (kind 31), and the match too (kind 28)
    spend(z, "shop-b", 40)
    z.refund("shop-b", at_b.transaction_id, 2 * YUAN)
    assert [(r["merchant_id"], r["amount"]) for r in z.transactions(31)] == [("shop-b", 20)]
    assert (z.account("merchant_voucher_credit", "shop-b"), z.account("merchant_vouchers", "shop-b")) == (-20, 0)
    assert z.account("operator_fan_rewards") == -40

    # a refund of half a's purchase takes back half the match (kind 28), in proportion
    refunded = z.refund("shop-a", earned.transaction_id, 100 * YUAN)
    assert refunded.balance == 50 * YUAN
    reversals = [r for r in z.transactions(28) if r["original_transaction_id"] == _txn(earned.transaction_id)]
    assert [(r["merchant_id"], r["amount"]) for r in reversals] == [("shop-a", 100 * YUAN)]
    assert z.account("merchant_points", "shop-a") == 104 * YUAN
    assert z.account("merchant_points", "shop-b") == 2 * YUAN  # fan2's match; the fan's was reversed
    assert fetch(z.url, "SELECT count(*) AS n FROM dividend_rounds")[0]["n"] == 1  # the pool grew < 15%

    statements = z.settle()
    a_, b_, mall = statements["shop-a"], statements["shop-b"], statements["zhongdian-mall"]
    assert (a_.issued, a_.earn_refunds, a_.vouchers_received, a_.vouchers_spent) == (204 * YUAN, 100 * YUAN, 100, 100)
    assert (b_.issued, b_.earn_refunds, b_.redeemed) == (4 * YUAN, 2 * YUAN, 50 * YUAN)
    assert (b_.vouchers_redeemed, b_.vouchers_received, b_.vouchers_spent) == (300 + 40, 40, 40)
    assert mall.vouchers_redeemed == 60 + 200 + 40

    # after a restart the merchants' points and what they owe come back from Postgres: shop-a holds 104
    # points (limit 5 x floor(10,400 x 75 bps) = 390) and owes 180
    z.restart()
    beyond = error_of(lambda: spend(z, "shop-a", 211))
    assert "holds 0 voucher-units and may owe 210 more on credit" in beyond.details()
    assert spend(z, "shop-a", 210).voucher_credit_used == 390
    assert ledger_discrepancies(z.url) == []


def _fee_share(fees: int, rate_bps: int) -> int:
    """One channel statement line: floor(fees x rate / 10000), in the operator's favour (RULES.md section 12)."""
    return fees * rate_bps // 10_000


def _posted_channel_statements(z: System, period_id: int, payees: list[tuple[int, str]], op) -> dict:
    """The channel statements of `payees` for the period once the committer has posted each."""
    stub = admin_pb2_grpc.ChannelServiceStub(z.channel)
    deadline = time.monotonic() + 20
    while True:
        found = {
            (kind, payee): stub.GetChannelStatement(
                admin_pb2.GetChannelStatementRequest(period_id=period_id, payee_kind=kind, payee_id=payee),
                metadata=op,
                timeout=30,
            ).statement
            for kind, payee in payees
        }
        if all(s.transaction_id for s in found.values()):
            return found
        assert time.monotonic() < deadline, "the channel statements were not posted"
        time.sleep(0.1)


def test_zhongdian_promoter_and_service_centres_paid_from_the_fees_at_the_cut(zhongdian):
    """ "推广人员:推广并服务商家赚取佣金。获得商家持续收益" and "区域代理:…服务区域内联盟商家按区域业绩结算收益": a
    promoter who signed shops A and B up, and the province, city and county service centres (省/市/县服务中心)
    with their agents, are paid their shares of the operator's fees from those shops at the cut, at the
    rates of zhongdian.json's `channel` block; shop B sets its own give-back with its own key."""
    z = zhongdian
    rates = program_file("zhongdian")["channel"]
    op = credential(create_key(z.url, "operator"))
    channel = admin_pb2_grpc.ChannelServiceStub(z.channel)
    merchants = admin_pb2_grpc.MerchantAdminServiceStub(z.channel)
    for region_id, level, parent in (
        ("zhejiang", admin_pb2.REGION_LEVEL_PROVINCE, ""),
        ("hangzhou", admin_pb2.REGION_LEVEL_CITY, "zhejiang"),
        ("xihu", admin_pb2.REGION_LEVEL_COUNTY, "hangzhou"),
    ):
        channel.CreateRegion(
            admin_pb2.CreateRegionRequest(region_id=region_id, level=level, parent_id=parent, name=region_id),
            metadata=op,
            timeout=30,
        )
        channel.RegisterRegionalAgent(
            admin_pb2.RegisterRegionalAgentRequest(agent_id=f"centre-{region_id}", region_id=region_id),
            metadata=op,
            timeout=30,
        )
    channel.RegisterPromoter(
        admin_pb2.RegisterPromoterRequest(promoter_id="promoter-li", region="hangzhou"), metadata=op, timeout=30
    )
    # the operator's service fees, the channel's base (the file keeps fee_sale_bps 0): shop A, in the county,
    # pays 10% of the points it issues; shop B, in the city itself, 10% of the points redeemed there
    for merchant in (
        admin_pb2.Merchant(merchant_id="shop-a", region="xihu", fee_issued_bps=1_000),
        admin_pb2.Merchant(merchant_id="shop-b", region="hangzhou", fee_redeemed_bps=1_000),
    ):
        fields = ["region", "fee_issued_bps" if merchant.fee_issued_bps else "fee_redeemed_bps"]
        merchants.UpdateMerchant(
            admin_pb2.MerchantAdminServiceUpdateMerchantRequest(merchant=merchant, update_fields=fields), timeout=30
        )
        channel.AssignMerchantPromoter(
            admin_pb2.AssignMerchantPromoterRequest(merchant_id=merchant.merchant_id, promoter_id="promoter-li"),
            metadata=op,
            timeout=30,
        )
    # "可根据自身情况设置3%~20%的让利比例": shop B sets 15% with its own key (the test client sends the
    # merchant's key for a call naming it), from its next earn; 25% is outside the program's bounds
    set_back = channel.SetGiveBack(admin_pb2.SetGiveBackRequest(merchant_id="shop-b", give_back_bps=1_500), timeout=30)
    assert set_back.merchant.give_back_bps == 1_500
    beyond = error_of(
        lambda: channel.SetGiveBack(admin_pb2.SetGiveBackRequest(merchant_id="shop-b", give_back_bps=2_500), timeout=30)
    )
    assert beyond.code() == grpc.StatusCode.INVALID_ARGUMENT and "300..2000" in beyond.details()
    revenue_before = z.account("operator_fee_revenue")

    member = unique("member")
    at_a = earn(z.points, "shop-a", member, 12_345)  # 123.45 yuan at 20%: 2,469 point-units; fee 246
    at_b = earn(z.points, "shop-b", member, 10_000)  # 100 yuan at shop B's new 15%: 1,500
    assert (at_a.points, at_b.points, at_b.give_back_bps) == (2_469, 1_500, 1_500)
    z.redeem("shop-b", member, 3_333)  # fee floor(333.3) = 333
    statements = z.settle()
    fees = {shop: statements[shop].fees for shop in ("shop-a", "shop-b")}
    assert fees == {"shop-a": 246, "shop-b": 333}
    period_id = statements["shop-a"].period_id

    promoter, province, city, county = (
        rates["promoter_commission_bps"],
        rates["province_agent_share_bps"],
        rates["city_agent_share_bps"],
        rates["county_agent_share_bps"],
    )
    payees = [(PROMOTER, "promoter-li"), (REGION, "xihu"), (REGION, "hangzhou"), (REGION, "zhejiang")]
    posted = _posted_channel_statements(z, period_id, payees, op)
    figures = {key: (s.agent_id, s.rate_bps, s.fee_base, s.amount, s.merchants) for key, s in posted.items()}
    expected = {
        # the promoter: 20% of both shops' fees, line by line: 49 + 66
        (PROMOTER, "promoter-li"): ("", promoter, 579, _fee_share(246, promoter) + _fee_share(333, promoter), 2),
        # the county's centre: shop A only, 15%: 36
        (REGION, "xihu"): ("centre-xihu", county, 246, _fee_share(246, county), 1),
        # the city's centre: shop B in the city and shop A in its county (agent_scope "subtree"), 10%: 24 + 33
        (REGION, "hangzhou"): ("centre-hangzhou", city, 579, _fee_share(246, city) + _fee_share(333, city), 2),
        # the province's centre: both, below it, 5%: 12 + 16
        (REGION, "zhejiang"): (
            "centre-zhejiang",
            province,
            579,
            _fee_share(246, province) + _fee_share(333, province),
            2,
        ),
    }
    assert figures == expected
    assert [amount for _, _, _, amount, _ in expected.values()] == [115, 36, 57, 28]
    # payables to each, out of the operator's fee revenue (kinds 23 and 24), which keeps the rest
    assert z.account("promoter_commissions", "promoter-li") == 115
    assert [z.account("regional_agent_shares", f"centre-{r}") for r in ("xihu", "hangzhou", "zhejiang")] == [36, 57, 28]
    assert z.account("operator_fee_revenue") == revenue_before + 579 - (115 + 36 + 57 + 28)
    postings = {
        (r["kind"], r["amount"])
        for r in z.transactions(23, 24)
        if domain.format_transaction_id(r["transaction_id"]) in {s.transaction_id for s in posted.values()}
    }
    assert postings == {(23, 115), (24, 36), (24, 57), (24, 28)}

    # the promoter's statement and its lines, as CSV: the lines sum to it
    lines = channel.ExportChannelStatement(
        admin_pb2.ExportChannelStatementRequest(period_id=period_id, payee_kind=PROMOTER, payee_id="promoter-li"),
        metadata=op,
        timeout=30,
    )
    rows = list(csv.DictReader(io.StringIO(lines.csv.decode())))
    assert [(r["merchant_id"], int(r["fees"]), int(r["amount"])) for r in rows] == [
        ("shop-a", 246, 49),
        ("shop-b", 333, 66),
    ]
    regions = channel.ExportChannelStatement(
        admin_pb2.ExportChannelStatementRequest(period_id=period_id, payee_kind=REGION), metadata=op, timeout=30
    )
    rows = list(csv.DictReader(io.StringIO(regions.csv.decode())))
    assert [(r["payee_id"], r["agent_id"], int(r["fee_base"]), int(r["amount"])) for r in rows] == [
        ("hangzhou", "centre-hangzhou", 579, 57),
        ("xihu", "centre-xihu", 246, 36),
        ("zhejiang", "centre-zhejiang", 579, 28),
    ]
    assert all(r["transaction_id"] == posted[(REGION, r["payee_id"])].transaction_id for r in rows)

    # the alliance report of the period: the member's points issued at A, then B, spent at B, first in first
    # out; per region (a merchant's region as set)
    report = channel.GetAllianceReport(
        admin_pb2.GetAllianceReportRequest(period_id=period_id), metadata=op, timeout=60
    ).report
    flows = {(f.issuer_merchant_id, f.redeemer_merchant_id): f.points for f in report.flows}
    assert (flows[("shop-a", "shop-b")], flows[("shop-b", "shop-b")]) == (2_469, 3_333 - 2_469)
    by_region = {r.region: (r.merchants, r.issued, r.redeemed, r.fees, r.active_members) for r in report.regions}
    assert (by_region["xihu"], by_region["hangzhou"]) == ((1, 2_469, 0, 246, 1), (1, 1_500, 3_333, 333, 1))
    assert ledger_discrepancies(z.url) == []


def test_zhongdian_reconcile_finds_a_commission_paid_into_another_payees_account(zhongdian):
    """ "Both reconcile like merchants": a promoter's statement that names an agent's account (as if its
    commission had been paid there) is reported twice, by the posting check and by the payables check."""
    z = zhongdian
    rows = fetch(
        z.url,
        "SELECT period_id, payee_id, account_id, amount FROM channel_statements WHERE payee_kind = 'promoter' "
        "AND amount > 0 ORDER BY period_id LIMIT 1",
    )
    assert rows, "the channel test posted no promoter commission"
    statement = rows[0]
    agent_account = fetch(
        z.url, "SELECT account_id FROM accounts WHERE kind = 'regional_agent_shares' ORDER BY account_id LIMIT 1"
    )[0]["account_id"]
    moved = "UPDATE channel_statements SET account_id = $1 WHERE period_id = $2 AND payee_kind = 'promoter' AND payee_id = $3"
    fetch(z.url, moved, agent_account, statement["period_id"], statement["payee_id"])
    try:
        problems = ledger_discrepancies(z.url)
        assert any(
            f"of {statement['amount']} does not pay its statement's amount {statement['amount']} to the statement's "
            "account" in p
            for p in problems
        ), problems
        assert any(f"promoter_commissions of {statement['payee_id']}: balance" in p for p in problems), problems
    finally:
        fetch(z.url, moved, statement["account_id"], statement["period_id"], statement["payee_id"])
    assert ledger_discrepancies(z.url) == []


# --- Good Luck Alliance, "interactive business circle" (seed 000) -------------------------------------


@pytest.fixture(scope="module")
def good_luck(create_database):
    system = System(
        create_database,
        "good-luck-alliance",
        program_file("good-luck-alliance"),
        {
            "suning": {"give_back_bps": 10_000},  # "Every time a member spends 1000 yuan ... 1000 points"
            "dk-mall": {"give_back_bps": 300},  # the deduction mall where points pay
        },
    )
    yield system
    system.close()


def test_good_luck_full_give_back_promotion_fee_and_deduction_mall(good_luck):
    g = good_luck
    member = unique("member")
    # the Haier TV: 2,000 yuan at Suning -> 2,000 points (1 point = 1 yuan); Suning pays the platform its
    # 10% promotion fee on the sale (200 yuan) beside any fee on points
    tv = earn(g.points, "suning", member, 2_000 * YUAN)
    assert tv.points == 2_000 * YUAN and tv.give_back_bps == 10_000
    (row,) = [t for t in g.transactions(1) if t["transaction_id"] == _txn(tv.transaction_id)]
    assert row["fee"] == 200 * YUAN
    # the fridge at DK Mall: 10,000 yuan, 8,000 in cash and 2,000 in points
    fridge = g.redeem("dk-mall", member, 2_000 * YUAN)
    assert fridge.balance == 0
    statements = g.settle()
    assert (statements["suning"].issued, statements["suning"].fees) == (2_000 * YUAN, 200 * YUAN)
    assert statements["suning"].net == -2_200 * YUAN
    assert statements["dk-mall"].redeemed == 2_000 * YUAN
    assert ledger_discrepancies(g.url) == []


# --- universal points for mobile membership (seed 002) --------------------------------------------------


@pytest.fixture(scope="module")
def mobile(create_database):
    system = System(
        create_database,
        "mobile-membership",
        program_file("mobile-membership"),
        {
            "cafe": {"give_back_bps": 500},
            # "cobra tarifas de servicio ... en función de una determinada proporción del consumo de puntos"
            "cinema": {"give_back_bps": 1_000, "fee_redeemed_bps": 200},
        },
    )
    yield system
    system.close()


def test_mobile_membership_points_as_cash_anywhere_fees_no_cash_out_and_bounds(mobile):
    m = mobile
    member = unique("customer")
    assert earn(m.points, "cafe", member, 1_000 * YUAN).points == 50 * YUAN
    spent = m.redeem("cinema", member, 30 * YUAN)  # cash at any contracted merchant
    assert spent.balance == 20 * YUAN
    (row,) = [t for t in m.transactions(3) if t["transaction_id"] == _txn(spent.transaction_id)]
    assert row["fee"] == 60  # 2% of 3,000 point-units consumed at the cinema
    refused = error_of(
        lambda: m.points.CashOut(pb.CashOutRequest(merchant_id="cafe", member_id=member, points=100), timeout=30)
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "cash" in refused.details()

    # the program keeps give-back within 3%..20%: a merchant above it is not created, and one whose rate
    # was set under other bounds cannot earn until the operator sets it within them
    async def add(merchant_id: str, give_back_bps: int, bounds: tuple[int, int] | None = None) -> None:
        store = await Store.open(m.url, 2)
        try:
            await store.add_merchant(
                merchant_id, give_back_bps, give_back_bounds=bounds or await store.give_back_bounds(m.program_id)
            )
        finally:
            await store.close()

    with pytest.raises(StoreError, match="outside 300..2000"):
        asyncio.run(add("generous", 10_000))
    asyncio.run(add("legacy", 5_000, (1, 10_000)))
    outside = error_of(lambda: earn(m.points, "legacy", member, 100 * YUAN))
    assert outside.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "outside the 300..2000 bps" in outside.details()
    assert m.balance(member).posted == 20 * YUAN
    # merchants spend vouchers only at the operator's store here (no merchant_vouchers_anywhere)
    elsewhere = error_of(
        lambda: m.points.SpendMerchantVouchers(
            pb.SpendMerchantVouchersRequest(
                merchant_id="cafe", vouchers=1, at_merchant_id="cinema", idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert elsewhere.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "merchant_vouchers_anywhere is off" in elsewhere.details()
    unknown = error_of(
        lambda: m.points.SpendMerchantVouchers(
            pb.SpendMerchantVouchersRequest(
                merchant_id="cafe", vouchers=1, at_merchant_id="nowhere", idempotency_key=unique("k")
            ),
            timeout=30,
        )
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "nowhere" in unknown.details()

    # the merchant may set its own rate too (ChannelService.SetGiveBack, its own key), held to the bounds
    # UpdateMerchant checks, the program's latest stored version's: legacy's 50% is refused, 15% lets it earn;
    # once a version narrowing them to 5%..15% is stored (starting in an hour), 20% is refused already
    channel = admin_pb2_grpc.ChannelServiceStub(m.channel)

    def set_give_back(give_back_bps: int) -> admin_pb2.SetGiveBackResponse:
        request = admin_pb2.SetGiveBackRequest(merchant_id="legacy", give_back_bps=give_back_bps)
        return channel.SetGiveBack(request, timeout=30)

    refused = error_of(lambda: set_give_back(5_000))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "300..2000" in refused.details()
    assert set_give_back(1_500).merchant.give_back_bps == 1_500
    assert earn(m.points, "legacy", member, 100 * YUAN).points == 15 * YUAN
    in_an_hour = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3_600)
    narrower = admin_pb2.ProgramRules(give_back_bps_min=500, give_back_bps_max=1_500)
    admin_pb2_grpc.ProgramsServiceStub(m.channel).SetProgramVersion(
        admin_pb2.ProgramsServiceSetProgramVersionRequest(effective_from=in_an_hour, rules=narrower), timeout=30
    )
    refused = error_of(lambda: set_give_back(2_000))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "500..1500" in refused.details()

    statements = m.settle()
    assert (statements["cafe"].issued, statements["cinema"].redeemed, statements["cinema"].fees) == (
        50 * YUAN,
        30 * YUAN,
        60,
    )
    assert ledger_discrepancies(m.url) == []


# --- the telecom points mall (seed 003) -------------------------------------------------------------


def _telecom_config() -> dict:
    config = program_file("telecom-mall")
    # the operator's own settings beside the file: star ratings from the merchants' redemption service, and
    # a double-points promotion at one shop (a promotion the seed's plans run: 积分翻倍)
    config["merchant_terms"] = [{"merchant_id": "star-shop", "star_rating": 5}]
    now_us = time.time_ns() // 1000
    config["promotions"] = [
        {
            "promotion_id": "double-points",
            "start_us": now_us - 3_600_000_000,
            "end_us": now_us + 36_000_000_000,
            "scope": "merchant",
            "scope_id": "promo-shop",
            "multiplier_bps": 20_000,
            "budget_point_units": 10**9,
        }
    ]
    return config


@pytest.fixture(scope="module")
def telecom(create_database):
    system = System(
        create_database,
        "telecom-mall",
        _telecom_config(),
        {
            "shop": {"give_back_bps": 1_000, "fee_redeemed_bps": 1_000},
            "star-shop": {"give_back_bps": 1_000, "fee_redeemed_bps": 1_000},
            "promo-shop": {"give_back_bps": 1_000},
        },
    )
    yield system
    system.close()


def test_telecom_signup_referral_share_total_levels_and_star_rebates(telecom):
    t = telecom
    # "新注册会员均一次性奖励50个积分": the first earn enrols the member, its bonus posted before the earn
    referrer = unique("referrer")
    first = earn(t.points, "shop", referrer, 100 * YUAN)
    assert first.points == 10 * YUAN and first.balance == 60 * YUAN
    assert [(r["member_id"], r["amount"]) for r in t.transactions(29)] == [(referrer, 50 * YUAN)]

    # "当被推荐人第一次下订单时所获取的积分,同时也累积80%的积分给推荐人": enrolled by the link (its own
    # sign-up bonus), the referee's first order pays the referrer 80% of the points it earned
    referee = unique("referee")
    t.points.LinkMember(
        pb.LinkMemberRequest(
            merchant_id="shop", member_id=referee, referrer_member_id=referrer, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert t.balance(referee).posted == 50 * YUAN
    assert earn(t.points, "shop", referee, 1_000 * YUAN).points == 100 * YUAN
    assert [(r["member_id"], r["amount"]) for r in t.transactions(8)] == [(referrer, 80 * YUAN)]
    assert t.balance(referrer).posted == 140 * YUAN
    earn(t.points, "shop", referee, 1_000 * YUAN)
    assert len(t.transactions(8)) == 1  # the first order only

    # "累计总积分达到5000分" reaches blue: levels count every point of the earns (base and the promotion),
    # so 3,000 points at double points reach blue (bonus 200 points); refunds count back down
    climber = unique("climber")
    big = earn(t.points, "promo-shop", climber, 30_000 * YUAN)
    assert (big.points, big.bonus_points, big.level) == (3_000 * YUAN, 3_200 * YUAN, "blue")
    assert t.balance(climber).posted == (50 + 6_000 + 200) * YUAN
    t.refund("promo-shop", big.transaction_id, 2_000 * YUAN)
    balance = t.balance(climber)
    assert (balance.posted, balance.level) == ((50 + 2_000 + 200) * YUAN, "registered")

    # star rebates: the 5-star merchant's 10% redemption fee is charged 20% less
    at_star = t.redeem("star-shop", climber, 1_000 * YUAN)
    plain = t.redeem("shop", climber, 100 * YUAN)
    fees = {r["transaction_id"]: r["fee"] for r in t.transactions(3)}
    assert (fees[_txn(at_star.transaction_id)], fees[_txn(plain.transaction_id)]) == (80 * YUAN, 10 * YUAN)

    # the operator rates "shop" 3 stars through ProgramsService: the version in force as GetProgram answers
    # it (every seed option set), with one more merchant's terms, as a new version; from its start shop's
    # 10% redemption fee is charged 10% less
    programs = admin_pb2_grpc.ProgramsServiceStub(t.channel)
    rules = programs.GetProgram(admin_pb2.ProgramsServiceGetProgramRequest(), timeout=30).program.versions[-1].rules
    assert (rules.level_points, rules.signup_bonus_point_units, rules.referral_share_bps) == ("total", 5_000, 8_000)
    assert list(rules.star_fee_rebate_bps) == [0, 500, 1_000, 1_500, 2_000]
    rules.merchant_terms.add(merchant_id="shop", star_rating=3)
    version = programs.SetProgramVersion(
        admin_pb2.ProgramsServiceSetProgramVersionRequest(rules=rules), timeout=30
    ).version
    assert [(m.merchant_id, m.star_rating) for m in version.rules.merchant_terms] == [("star-shop", 5), ("shop", 3)]
    _wait(
        lambda: (
            programs.GetProgram(admin_pb2.ProgramsServiceGetProgramRequest(), timeout=30).program.version_in_force
            == version.version
        ),
        "the rated version did not come into force",
    )
    rated = t.redeem("shop", climber, 100 * YUAN)
    (row,) = [r for r in t.transactions(3) if r["transaction_id"] == _txn(rated.transaction_id)]
    assert row["fee"] == 9 * YUAN

    statements = t.settle()
    assert statements["star-shop"].fees == 80 * YUAN
    assert statements["shop"].fees == (10 + 9) * YUAN
    assert ledger_discrepancies(t.url) == []


# --- Wanda general points alliance (seed 004) -------------------------------------------------------


@pytest.fixture(scope="module")
def wanda(create_database):
    system = System(
        create_database,
        "wanda-alliance",
        program_file("wanda-alliance"),
        {
            "department-store": {"give_back_bps": 1_000},
            "cinema": {"give_back_bps": 500, "fee_redeemed_bps": 100},
        },
    )
    yield system
    system.close()


def test_wanda_permanent_points_as_cash_across_merchants_cleared_in_the_period(wanda):
    w = wanda
    member = unique("wanda-member")
    assert earn(w.points, "department-store", member, 5_000 * YUAN).points == 500 * YUAN
    movie = w.redeem("cinema", member, 300 * YUAN)  # "1 points = 1 Yuan ... can be directly cash"
    w.refund("cinema", movie.transaction_id, 100 * YUAN)
    balance = w.balance(member)
    assert balance.posted == 300 * YUAN and list(balance.expiring) == []  # "permanent and effective"
    statements = w.settle()
    assert statements["department-store"].issued == 500 * YUAN
    assert (statements["cinema"].redeemed, statements["cinema"].redemption_refunds) == (300 * YUAN, 100 * YUAN)
    assert statements["cinema"].fees == 3 * YUAN
    assert ledger_discrepancies(w.url) == []


# --- the files through the command line ------------------------------------------------------------


def test_each_program_file_loads_with_program_set_and_a_bad_line_is_named(create_database, tmp_path):
    url = create_database()
    for system in ("good-luck-alliance", "zhongdian", "mobile-membership", "telecom-mall", "wanda-alliance"):
        stored = cli(
            "program", "set", "--program-id", system, "--file", str(PROGRAMS / f"{system}.json"), "--database-url", url
        )
        assert stored.returncode == 0, stored.stderr
        config = json.loads(stored.stdout)["config"]
        assert {key: config[key] for key in program_file(system)} == program_file(system)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**program_file("zhongdian"), "merchant_match_bps": 20_000, "fan_reward": 1}))
    refused = cli("program", "set", "--program-id", "bad", "--file", str(bad), "--database-url", url)
    assert refused.returncode == 2
    assert "unknown key 'fan_reward'" in refused.stderr and "merchant_match_bps" in refused.stderr
