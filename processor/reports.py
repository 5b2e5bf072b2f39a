"""The alliance report of a closed settlement period (issue 16; docs/RULES.md section 12): totals exact to
the period's statements, the cross-merchant flow matrix (points issued at X redeemed at Y), active and
new members, redemption rate, breakage, top merchants by issue and by redemption, and figures per region.
Read from Postgres in one repeatable-read snapshot, off the answer path (GetAllianceReport, the CLI's
`report`); nothing here is on the commit path.

Attribution of a redemption to issuers: first in, first out over each member's points, replayed from the
member's whole journal up to the cut-off (the member's POINTS entries in transaction order). Why FIFO:
it is what the program's expiry lots do (soonest-expiring first, and with one expiry period that is the
oldest first), it needs no choice the journal does not record, and unlike a proportional split it gives
whole point-units with no rounding, so each column of the matrix sums exactly to the merchant's
statement `redeemed`. Credits: an earn or conversion is the merchant's (bonuses on it included), a tier
or referral bonus the operator's; a refund of a redemption, or the operator's reversal of one, puts back
the very pieces that redemption took (last taken, first back) at the front. Debits: captures, redeems and
the points of split tenders are redemptions (the matrix); a refund of an earn, or its reversal, takes the
earn's merchant's own points first; any other debit (expiry, later kinds) takes the oldest points.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import io
from typing import Any

import asyncpg

from points.v1 import admin_pb2 as pb
from processor import domain, kinds, rules
from processor.store import RECONCILE_TIMEOUT_SECONDS, micros
from processor.servicer import timestamp

CURSOR_PREFETCH_ROWS = 10_000
_REDEMPTIONS = frozenset({kinds.BY_NAME["capture"].code, kinds.BY_NAME["redeem"].code, rules.KIND_SPLIT_REDEEM})
_REDEMPTION_REFUNDS = frozenset({kinds.BY_NAME["refund_of_redemption"].code, rules.KIND_SPLIT_REFUND})
_OPERATOR_CREDITS = frozenset({rules.KIND_TIER_BONUS, rules.KIND_REFERRAL_BONUS})
_EARN_REFUND = kinds.BY_NAME["refund_of_earn"].code
UNATTRIBUTED = ""  # a debit no credit covers (not possible in a consistent journal; shown, not hidden)


@dataclasses.dataclass(slots=True)
class MerchantFigures:
    merchant_id: str
    region: str
    issued: int
    earn_refunds: int
    redeemed: int
    redemption_refunds: int
    fees: int


@dataclasses.dataclass(slots=True)
class RegionFigures:
    region: str
    merchants: int = 0
    issued: int = 0
    redeemed: int = 0
    fees: int = 0
    active_members: int = 0


@dataclasses.dataclass(slots=True)
class AllianceReport:
    period_id: int
    opened_at: dt.datetime
    cut_off: dt.datetime
    issued: int
    earn_refunds: int
    redeemed: int
    redemption_refunds: int
    fees: int
    breakage: int
    active_members: int
    new_members: int
    redemption_rate_bps: int
    # (issuer, redeemer) -> point-units, issuer "operator" for operator-funded points
    flows: dict[tuple[str, str], int]
    top_by_issue: list[MerchantFigures]
    top_by_redemption: list[MerchantFigures]
    regions: list[RegionFigures]


async def alliance_report(pool: asyncpg.Pool, period_id: int, top: int) -> AllianceReport | None:
    """The report of period `period_id` (None if it is not closed), `top` merchants in each top list."""
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
        period = await c.fetchrow("SELECT opened_at, cut_off FROM settlement_periods WHERE period_id = $1", period_id)
        if period is None:
            return None
        opened_at, cut_off = period["opened_at"], period["cut_off"]
        merchants = [
            MerchantFigures(
                r["merchant_id"],
                r["region"],
                r["issued"],
                r["earn_refunds"],
                r["redeemed"],
                r["redemption_refunds"],
                r["fees"],
            )
            for r in await c.fetch(
                """SELECT s.merchant_id, m.region, s.issued, s.earn_refunds, s.redeemed, s.redemption_refunds, s.fees
                   FROM statements s JOIN merchants m USING (merchant_id) WHERE s.period_id = $1
                   ORDER BY s.merchant_id""",
                period_id,
            )
        ]
        in_period = (opened_at, cut_off)
        breakage = await c.fetchval(
            # the legs' arrays of the period's rows (migration 0022), unnested in the select list
            """SELECT coalesce(sum(e.amount), 0)::bigint
               FROM (SELECT unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount FROM transactions
                     WHERE created_at >= $1 AND created_at < $2) e
               JOIN accounts a ON a.account_id = e.account_id AND a.kind = 'operator_breakage'""",
            *in_period,
            timeout=RECONCILE_TIMEOUT_SECONDS,
        )
        # active: an earn or a spend in the period (as the member: the account's owner)
        activity = await c.fetch(
            """SELECT coalesce(m.region, '') AS region, count(DISTINCT a.owner_id) AS members,
                      grouping(m.region) AS everywhere
               FROM transactions t CROSS JOIN LATERAL unnest(t.leg_accounts) AS e(account_id)
               JOIN accounts a ON a.account_id = e.account_id AND a.kind = 'member' AND a.asset_code = 'POINTS'
               LEFT JOIN merchants m ON m.merchant_id = t.merchant_id
               WHERE t.created_at >= $1 AND t.created_at < $2 AND t.kind = ANY($3::smallint[])
               GROUP BY ROLLUP (m.region)""",
            *in_period,
            [kinds.BY_NAME["earn"].code, *_REDEMPTIONS],
            timeout=RECONCILE_TIMEOUT_SECONDS,
        )
        new_members = await c.fetchval(
            "SELECT count(*) FROM members WHERE created_at >= $1 AND created_at < $2",
            *in_period,
            timeout=RECONCILE_TIMEOUT_SECONDS,
        )
        flows = await _flows(c, opened_at, cut_off)

    issued = sum(m.issued for m in merchants)
    redeemed = sum(m.redeemed for m in merchants)
    active = {r["region"]: r["members"] for r in activity if not r["everywhere"]}
    regions: dict[str, RegionFigures] = {}
    for m in merchants:
        region = regions.setdefault(m.region, RegionFigures(m.region))
        region.merchants += 1
        region.issued += m.issued
        region.redeemed += m.redeemed
        region.fees += m.fees
    for name, count in active.items():
        regions.setdefault(name, RegionFigures(name)).active_members = count
    return AllianceReport(
        period_id=period_id,
        opened_at=opened_at,
        cut_off=cut_off,
        issued=issued,
        earn_refunds=sum(m.earn_refunds for m in merchants),
        redeemed=redeemed,
        redemption_refunds=sum(m.redemption_refunds for m in merchants),
        fees=sum(m.fees for m in merchants),
        breakage=breakage,
        active_members=next((r["members"] for r in activity if r["everywhere"]), 0),
        new_members=new_members,
        redemption_rate_bps=redeemed * domain.BPS_DENOMINATOR // issued if issued > 0 else 0,
        flows=flows,
        top_by_issue=sorted((m for m in merchants if m.issued), key=lambda m: (-m.issued, m.merchant_id))[:top],
        top_by_redemption=sorted((m for m in merchants if m.redeemed), key=lambda m: (-m.redeemed, m.merchant_id))[
            :top
        ],
        regions=[regions[name] for name in sorted(regions)],
    )


async def _flows(c: asyncpg.Connection, opened_at: dt.datetime, cut_off: dt.datetime) -> dict[tuple[str, str], int]:
    """(issuer, redeemer) -> point-units redeemed in [opened_at, cut_off), FIFO over each member's points
    (module docstring). Streams the members' POINTS entries up to the cut-off, one member at a time."""
    attribution = Attribution(micros(opened_at))
    async for r in c.cursor(
        """SELECT a.owner_id, t.transaction_id, t.kind, t.merchant_id, t.original_transaction_id, t.created_at,
                  e.amount, o.kind AS original_kind, o.merchant_id AS original_merchant_id
           FROM transactions t CROSS JOIN LATERAL unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
           JOIN accounts a ON a.account_id = e.account_id AND a.kind = 'member' AND a.asset_code = 'POINTS'
           LEFT JOIN transactions o ON o.transaction_id = t.original_transaction_id
           WHERE t.created_at < $1
           ORDER BY a.owner_id, t.transaction_id""",
        cut_off,
        prefetch=CURSOR_PREFETCH_ROWS,
    ):
        attribution.add(r)
    return dict(attribution.flows)


class Attribution:
    """The FIFO replay of members' POINTS entries (rows by member, then transaction id), and the flows of
    the redemptions made from `opened_us` on."""

    def __init__(self, opened_us: int) -> None:
        self.opened_us = opened_us
        self.flows: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.member: str | None = None
        self.queue: collections.deque[list[Any]] = collections.deque()  # [issuer, point-units], oldest first
        self.taken: dict[int, list[list[Any]]] = {}  # a redemption's pieces, for its refunds and reversal

    def add(self, r: Any) -> None:
        if r["owner_id"] != self.member:
            self.member, self.queue, self.taken = r["owner_id"], collections.deque(), {}
        kind, amount, merchant_id, original = r["kind"], r["amount"], r["merchant_id"], r["original_transaction_id"]
        # The operator's reversal (ReverseTransaction) undoes its original whole, as a refund would, and
        # the statements count it with the refunds: a redemption's points go back to their issuers, an
        # earn's are taken from its issuer's first. (Booked as the operator's credit and an oldest-first
        # debit, the points a reversed redemption gave back became the operator's in every later flow.)
        reversal = kind in (kinds.KIND_REVERSAL_CREDIT, kinds.KIND_REVERSAL_DEBIT)
        if amount > 0:
            if kind in _REDEMPTION_REFUNDS or (reversal and original in self.taken):
                _restore(self.queue, self.taken.get(original, []), amount, merchant_id)
            else:
                self.queue.append([domain.OPERATOR_ID if kind in _OPERATOR_CREDITS else merchant_id, amount])
            return
        prefer = None
        if kind == _EARN_REFUND:
            prefer = merchant_id
        elif reversal and r["original_merchant_id"] is not None:
            prefer = domain.OPERATOR_ID if r["original_kind"] in _OPERATOR_CREDITS else r["original_merchant_id"]
        pieces = _take(self.queue, -amount, prefer)
        if kind in _REDEMPTIONS:
            self.taken[r["transaction_id"]] = pieces
            if micros(r["created_at"]) >= self.opened_us:
                for issuer, points in pieces:
                    self.flows[(issuer, merchant_id)] += points


def _take(queue: collections.deque[list[Any]], amount: int, prefer: str | None) -> list[list[Any]]:
    """Takes `amount` point-units from the queue, oldest first (`prefer`'s own points first when given);
    returns the pieces taken, in order."""
    pieces: list[list[Any]] = []
    if prefer is not None:
        for lot in queue:
            if amount and lot[0] == prefer and lot[1]:
                piece = min(amount, lot[1])
                lot[1] -= piece
                amount -= piece
                pieces.append([prefer, piece])
    while amount and queue:
        lot = queue[0]
        piece = min(amount, lot[1])
        lot[1] -= piece
        amount -= piece
        if piece:
            pieces.append([lot[0], piece])
        if not lot[1]:
            queue.popleft()
    if amount:
        pieces.append([UNATTRIBUTED, amount])
    return pieces


def _restore(queue: collections.deque[list[Any]], pieces: list[list[Any]], amount: int, merchant_id: str) -> None:
    """Puts back `amount` of a redemption's pieces, last taken first, at the front of the queue (the
    pieces shrink by what is put back, so several partial refunds never return more than was taken)."""
    while amount and pieces:
        piece = pieces[-1]
        back = min(amount, piece[1])
        piece[1] -= back
        amount -= back
        queue.appendleft([piece[0], back])
        if not piece[1]:
            pieces.pop()
    if amount:  # more back than the redemption took (not possible in a consistent journal)
        queue.appendleft([merchant_id, amount])


def report_message(report: AllianceReport) -> pb.AllianceReport:
    def merchant(m: MerchantFigures) -> pb.AllianceMerchantFigures:
        return pb.AllianceMerchantFigures(
            merchant_id=m.merchant_id, region=m.region, issued=m.issued, redeemed=m.redeemed
        )

    return pb.AllianceReport(
        period_id=report.period_id,
        opened_at=timestamp(micros(report.opened_at)),
        cut_off=timestamp(micros(report.cut_off)),
        issued=report.issued,
        earn_refunds=report.earn_refunds,
        redeemed=report.redeemed,
        redemption_refunds=report.redemption_refunds,
        fees=report.fees,
        breakage=report.breakage,
        active_members=report.active_members,
        new_members=report.new_members,
        redemption_rate_bps=report.redemption_rate_bps,
        flows=[
            pb.AllianceFlow(issuer_merchant_id=issuer, redeemer_merchant_id=redeemer, points=points)
            for (issuer, redeemer), points in sorted(report.flows.items())
        ],
        top_by_issue=[merchant(m) for m in report.top_by_issue],
        top_by_redemption=[merchant(m) for m in report.top_by_redemption],
        regions=[
            pb.AllianceRegionFigures(
                region=r.region,
                merchants=r.merchants,
                issued=r.issued,
                redeemed=r.redeemed,
                fees=r.fees,
                active_members=r.active_members,
            )
            for r in report.regions
        ],
    )


def report_csv(report: AllianceReport) -> str:
    """The report as CSV: one table per section, each `section,...` header line first, so a spreadsheet
    or `grep ^flows,` takes one section."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        (
            "section",
            "period_id",
            "opened_at",
            "cut_off",
            "issued",
            "earn_refunds",
            "redeemed",
            "redemption_refunds",
            "fees",
            "breakage",
            "active_members",
            "new_members",
            "redemption_rate_bps",
        )
    )
    w.writerow(("summary", report.period_id, report.opened_at.isoformat(), report.cut_off.isoformat(), report.issued,
                report.earn_refunds, report.redeemed, report.redemption_refunds, report.fees, report.breakage,
                report.active_members, report.new_members, report.redemption_rate_bps))  # fmt: skip
    w.writerow(("section", "issuer_merchant_id", "redeemer_merchant_id", "points"))
    for (issuer, redeemer), points in sorted(report.flows.items()):
        w.writerow(("flows", issuer, redeemer, points))
    w.writerow(("section", "rank", "merchant_id", "region", "issued", "redeemed"))
    for name, ranked in (("top_by_issue", report.top_by_issue), ("top_by_redemption", report.top_by_redemption)):
        for rank, m in enumerate(ranked, 1):
            w.writerow((name, rank, m.merchant_id, m.region, m.issued, m.redeemed))
    w.writerow(("section", "region", "merchants", "issued", "redeemed", "fees", "active_members"))
    for r in report.regions:
        w.writerow(("regions", r.region, r.merchants, r.issued, r.redeemed, r.fees, r.active_members))
    return out.getvalue()
