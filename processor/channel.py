"""ChannelService (issue 16; docs/API.md "Channel economics", docs/RULES.md section 12): promoters,
regions and their agents, their statements per settlement period, a merchant's own give-back, and the
alliance report. proto ⇄ processor/channel_store.py and processor/reports.py; no SQL here.

Operator keys for every method but SetGiveBack, which a merchant's own key may call for that merchant
(the interceptor admits both kinds to the service; each method checks the caller here)."""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc
from processor import auth, channel_store, domain, reports, rpc, rules
from processor.admin import merchant_message
from processor.config import Settings
from processor.domain import Code, Rejection, require
from processor.paging import (
    EXPORT_CHUNK,
    EXPORT_PAGE_MAX,
    iso,
    page_size,
    page_token,
    page_token_value,
    timestamp_of,
)
from processor.pipeline import Pipeline
from processor.servicer import Validator, guard, projected_store

PAYEE_KIND = {
    pb.CHANNEL_PAYEE_KIND_PROMOTER: channel_store.PAYEE_PROMOTER,
    pb.CHANNEL_PAYEE_KIND_REGION: channel_store.PAYEE_REGION,
}
PAYEE_ENUM = {name: value for value, name in PAYEE_KIND.items()}
# RegionLevel -> rules.REGION_LEVELS' names, top first
LEVEL = dict(zip((pb.REGION_LEVEL_PROVINCE, pb.REGION_LEVEL_CITY, pb.REGION_LEVEL_COUNTY), rules.REGION_LEVELS))
LEVEL_ENUM = {name: value for value, name in LEVEL.items()}
TOP_MERCHANTS_DEFAULT, TOP_MERCHANTS_MAX = 10, 100
# Alliance reports computed at once: each holds a pool connection for the whole replay (seconds on a
# large ledger: docs/RULES.md section 12), and the pool is the committer's too.
REPORTS_IN_FLIGHT_MAX = 1
REPORT_RETRY_SECONDS = 5.0
TEXT_BYTES_MAX = 200
STATEMENT_CSV_COLUMNS = (
    "period_id",
    "payee_kind",
    "payee_id",
    "agent_id",
    "opened_at",
    "cut_off",
    "rate_bps",
    "fee_base",
    "amount",
    "merchants",
    "transaction_id",
)
LINE_CSV_COLUMNS = ("period_id", "payee_kind", "payee_id", "merchant_id", "fees", "amount")


def _operator_only(method: str) -> None:
    caller = rpc.principal.get()
    if caller is None or caller.kind != "operator":
        raise Rejection(
            Code.PERMISSION_DENIED,
            f"ChannelService.{method} takes an operator key (only SetGiveBack takes a merchant's own key)",
            reason="KEY_NOT_PERMITTED",
        )


def _region_message(r) -> pb.Region:
    return pb.Region(
        region_id=r["region_id"],
        level=LEVEL_ENUM[r["level"]],
        parent_id=r["parent_id"] or "",
        name=r["name"],
        agent_id=r["agent_id"],
    )


def _statement_message(r) -> pb.ChannelStatement:
    return pb.ChannelStatement(
        period_id=r["period_id"],
        opened_at=timestamp_of(r["opened_at"]),
        cut_off=timestamp_of(r["cut_off"]),
        payee_kind=PAYEE_ENUM[r["payee_kind"]],
        payee_id=r["payee_id"],
        agent_id=r["agent_id"],
        rate_bps=r["rate_bps"],
        fee_base=r["fee_base"],
        amount=r["amount"],
        merchants=r["merchants"],
        transaction_id=domain.format_transaction_id(r["transaction_id"]) if r["transaction_id"] else "",
    )


def _refusal(error: channel_store.ChannelError, field: str = "") -> Rejection:
    if error.code is Code.INVALID_ARGUMENT and field:
        return domain.invalid_field(field, str(error))
    return Rejection(error.code, str(error))


class ChannelServicer(admin_pb2_grpc.ChannelServiceServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.validate = Validator(settings)
        self._reports = asyncio.Semaphore(REPORTS_IN_FLIGHT_MAX)

    def _payee(self, kind: int, payee_id: str, required: bool) -> tuple[str, str]:
        if kind not in PAYEE_KIND:
            raise domain.invalid_field(
                "payee_kind", "payee_kind must be CHANNEL_PAYEE_KIND_PROMOTER or CHANNEL_PAYEE_KIND_REGION"
            )
        if payee_id or required:
            payee_id = self.validate.identifier(payee_id, "payee_id")
        return PAYEE_KIND[kind], payee_id

    def _text(self, value: str, field: str) -> str:
        if len(value.encode()) > TEXT_BYTES_MAX:
            raise domain.invalid_field(field, f"{field} must be at most {TEXT_BYTES_MAX} bytes")
        return value

    async def RegisterPromoter(self, request, context):
        async def call():
            _operator_only("RegisterPromoter")
            promoter_id = self.validate.identifier(request.promoter_id, "promoter_id")
            region = self._text(request.region, "region")
            try:
                row = await channel_store.register_promoter(self.pipeline.ready_store().pool, promoter_id, region)
            except channel_store.ChannelError as error:
                raise _refusal(error) from None
            return pb.RegisterPromoterResponse(
                promoter=pb.Promoter(
                    promoter_id=row["promoter_id"], region=row["region"], created_at=timestamp_of(row["created_at"])
                )
            )

        return await guard(context, call)

    async def AssignMerchantPromoter(self, request, context):
        async def call():
            _operator_only("AssignMerchantPromoter")
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            promoter_id = self.validate.identifier(request.promoter_id, "promoter_id")
            try:
                row = await channel_store.assign_merchant_promoter(
                    self.pipeline.ready_store().pool, merchant_id, promoter_id
                )
            except channel_store.ChannelError as error:
                raise _refusal(error) from None
            return pb.AssignMerchantPromoterResponse(
                merchant_id=row["merchant_id"],
                promoter_id=row["promoter_id"],
                assigned_at=timestamp_of(row["assigned_at"]),
            )

        return await guard(context, call)

    async def CreateRegion(self, request, context):
        async def call():
            _operator_only("CreateRegion")
            region_id = self.validate.identifier(request.region_id, "region_id")
            if request.level not in LEVEL:
                raise domain.invalid_field(
                    "level", "level must be REGION_LEVEL_PROVINCE, REGION_LEVEL_CITY or REGION_LEVEL_COUNTY"
                )
            parent_id = self.validate.identifier(request.parent_id, "parent_id") if request.parent_id else ""
            try:
                row = await channel_store.create_region(
                    self.pipeline.ready_store().pool,
                    region_id,
                    LEVEL[request.level],
                    parent_id,
                    self._text(request.name, "name"),
                )
            except channel_store.ChannelError as error:
                raise _refusal(error, "parent_id") from None
            return pb.CreateRegionResponse(region=_region_message({**row, "agent_id": ""}))

        return await guard(context, call)

    async def ListRegions(self, request, context):
        async def call():
            _operator_only("ListRegions")
            size = page_size(request.page_size)
            after = page_token_value(request.page_token) if request.page_token else ""
            rows = await channel_store.regions(self.pipeline.ready_store().pool, after, size + 1)
            more = len(rows) > size
            rows = rows[:size]
            return pb.ListRegionsResponse(
                regions=[_region_message(r) for r in rows],
                next_page_token=page_token(rows[-1]["region_id"]) if more else "",
            )

        return await guard(context, call)

    async def RegisterRegionalAgent(self, request, context):
        async def call():
            _operator_only("RegisterRegionalAgent")
            agent_id = self.validate.identifier(request.agent_id, "agent_id")
            region_id = self.validate.identifier(request.region_id, "region_id")
            pool = self.pipeline.ready_store().pool
            try:
                await channel_store.register_regional_agent(pool, agent_id, region_id)
            except channel_store.ChannelError as error:
                raise _refusal(error) from None
            row = await channel_store.region(pool, region_id)
            require(row is not None, f"region {region_id!r} of the agent just registered")
            return pb.RegisterRegionalAgentResponse(region=_region_message(row))

        return await guard(context, call)

    async def GetChannelStatement(self, request, context):
        async def call():
            _operator_only("GetChannelStatement")
            if request.period_id <= 0:
                raise domain.invalid_field("period_id", "period_id must be > 0")
            kind, payee_id = self._payee(request.payee_kind, request.payee_id, required=True)
            rows = await channel_store.statements(
                # with the transaction that posted it, once the committer has (read-your-writes)
                (await projected_store(self.pipeline)).pool,
                payee_kind=kind,
                period_id=request.period_id,
                payee_id=payee_id,
                limit=1,
            )
            if not rows:
                raise Rejection(
                    Code.NOT_FOUND,
                    f"no statement of {kind} {payee_id!r} for period {request.period_id} (no fees from its "
                    "merchants, no rate in the program, or the period is not closed)",
                )
            return pb.GetChannelStatementResponse(statement=_statement_message(rows[0]))

        return await guard(context, call)

    async def ListChannelStatements(self, request, context):
        async def call():
            _operator_only("ListChannelStatements")
            size = page_size(request.page_size)
            kind, payee_id = self._payee(request.payee_kind, request.payee_id, required=False)
            pool = (await projected_store(self.pipeline)).pool
            if payee_id:
                # newest first: the token is the last period shown
                before = int(page_token_value(request.page_token, numeric=True)) if request.page_token else 0
                rows = await channel_store.statements(
                    pool,
                    payee_kind=kind,
                    period_id=request.period_id,
                    payee_id=payee_id,
                    before_period=before,
                    limit=size + 1,
                )
                key = "period_id"
            else:
                if request.period_id <= 0:
                    raise domain.invalid_field("period_id", "give payee_id, or period_id > 0")
                after = page_token_value(request.page_token) if request.page_token else ""
                rows = await channel_store.statements(
                    pool, payee_kind=kind, period_id=request.period_id, after=after, limit=size + 1
                )
                key = "payee_id"
            more = len(rows) > size
            rows = rows[:size]
            return pb.ListChannelStatementsResponse(
                statements=[_statement_message(r) for r in rows],
                next_page_token=page_token(str(rows[-1][key])) if more else "",
            )

        return await guard(context, call)

    async def ExportChannelStatement(self, request, context):
        async def call():
            _operator_only("ExportChannelStatement")
            if request.period_id <= 0:
                raise domain.invalid_field("period_id", "period_id must be > 0")
            kind, payee_id = self._payee(request.payee_kind, request.payee_id, required=False)
            store = await projected_store(self.pipeline)
            if await store.period_summary(request.period_id) is None:
                raise Rejection(Code.NOT_FOUND, f"period {request.period_id} is not closed")
            if not 0 <= request.page_size <= EXPORT_PAGE_MAX:
                raise domain.invalid_field("page_size", f"page_size must be 0 (everything)..{EXPORT_PAGE_MAX} lines")
            after = page_token_value(request.page_token) if request.page_token else ""
            text, lines, last = await export_csv(
                store.pool, request.period_id, kind, payee_id, request.page_size, after
            )
            return pb.ExportChannelStatementResponse(csv=text.encode(), lines=lines, next_page_token=page_token(last))

        return await guard(context, call)

    async def SetGiveBack(self, request, context):
        async def call():
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            caller = rpc.principal.get()
            if caller is None or not (caller.kind == "operator" or _own_merchant(caller, merchant_id)):
                raise Rejection(
                    Code.PERMISSION_DENIED,
                    f"this key may not set {merchant_id!r}'s give-back: use the merchant's own key or an operator key",
                    reason="KEY_NOT_PERMITTED",
                )
            # the bounds UpdateMerchant checks (the program's latest stored version): the merchant's key and
            # the operator's are held to one rule
            low, high = await self.pipeline.ready_store().give_back_bounds(self.settings.program_id)
            if not low <= request.give_back_bps <= high:
                raise domain.invalid_field(
                    "give_back_bps",
                    f"give_back_bps must be {low}..{high} basis points ({low / 100:g}%..{high / 100:g}%) under "
                    f"the program, got {request.give_back_bps}",
                )
            # as UpdateMerchant does: the row first, then the pipeline's merchants, so the next earn uses it
            row = await self.pipeline.ready_store().update_merchant(
                merchant_id, {"give_back_bps": request.give_back_bps}
            )
            if row is None:
                raise Rejection(Code.NOT_FOUND, f"merchant {merchant_id!r} does not exist", reason="MERCHANT_NOT_FOUND")
            self.pipeline.merchants.add(row)
            return pb.SetGiveBackResponse(merchant=merchant_message(row))

        return await guard(context, call)

    async def GetAllianceReport(self, request, context):
        async def call():
            _operator_only("GetAllianceReport")
            if request.period_id <= 0:
                raise domain.invalid_field("period_id", "period_id must be > 0")
            top = request.top_merchants or TOP_MERCHANTS_DEFAULT
            if not 1 <= top <= TOP_MERCHANTS_MAX:
                raise domain.invalid_field(
                    "top_merchants", f"top_merchants must be 0 (default 10)..{TOP_MERCHANTS_MAX}"
                )
            if self._reports.locked():
                raise Rejection(
                    Code.RESOURCE_EXHAUSTED,
                    f"{REPORTS_IN_FLIGHT_MAX} alliance report(s) being computed; retry in a few seconds",
                    retry_after_seconds=REPORT_RETRY_SECONDS,
                )
            async with self._reports:
                # the period's transactions, members and statements, every answered one projected
                store = await projected_store(self.pipeline)
                report = await reports.alliance_report(store.pool, request.period_id, top)
            if report is None:
                raise Rejection(Code.NOT_FOUND, f"period {request.period_id} is not closed")
            return pb.GetAllianceReportResponse(report=reports.report_message(report))

        return await guard(context, call)


def _own_merchant(caller: auth.Principal, merchant_id: str) -> bool:
    """A merchant key acts for its one merchant; a gateway key (many merchants) may not set give-backs."""
    return caller.kind == "merchant" and caller.may_act_for(merchant_id)


async def export_csv(
    pool: Any, period_id: int, payee_kind: str, payee_id: str, page_size: int = 0, after: str = ""
) -> tuple[str, int, str]:
    """The period's statements of one payee kind (one line each, by payee id), or one statement's lines
    (one per merchant, by merchant id, summing exactly to it), as CSV with a header on the first page;
    (text, lines, the key of the last line when more follow, else ""). page_size 0: everything, read in
    chunks so a large period never needs one huge result set."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if not after:
        writer.writerow(LINE_CSV_COLUMNS if payee_id else STATEMENT_CSV_COLUMNS)
    lines = 0
    while not page_size or lines < page_size:
        chunk = min(EXPORT_CHUNK, page_size - lines) if page_size else EXPORT_CHUNK
        if payee_id:
            rows = await channel_store.statement_lines(pool, period_id, payee_kind, payee_id, after, chunk + 1)
            for r in rows[:chunk]:
                writer.writerow((period_id, payee_kind, payee_id, r["merchant_id"], r["fees"], r["amount"]))
            key = "merchant_id"
        else:
            rows = await channel_store.statements(
                pool, payee_kind=payee_kind, period_id=period_id, after=after, limit=chunk + 1
            )
            for r in rows[:chunk]:
                writer.writerow(
                    (
                        r["period_id"],
                        r["payee_kind"],
                        r["payee_id"],
                        r["agent_id"],
                        iso(r["opened_at"]),
                        iso(r["cut_off"]),
                        r["rate_bps"],
                        r["fee_base"],
                        r["amount"],
                        r["merchants"],
                        domain.format_transaction_id(r["transaction_id"]) if r["transaction_id"] else "",
                    )
                )
            key = "payee_id"
        lines += min(len(rows), chunk)
        if rows[:chunk]:
            after = rows[:chunk][-1][key]
        if len(rows) <= chunk:
            return out.getvalue(), lines, ""
    return out.getvalue(), lines, after
