"""Channel economics in Postgres (issue 16; docs/RULES.md section 12): promoters, the region tree and its
regional agents, and their statements per settlement period with the journal rows that pay them.

At a settlement cut (store.close_period, in the cut's own transaction, right after the merchants'
statements) `cut` writes one statement per promoter and per region with an agent: lines per merchant
with that merchant's `fees` from its statement of the period (the operator's fee revenue from it) and
floor(fees x rate / 10000), the statement's amount being the sum of its lines. Being computed from the
statements in the same transaction, the channel statements are exact to them and never change.

The committer then posts each statement with an amount as one journal transaction (kind 23 or 24: the
operator's fee revenue pays the payee's payable account) in a batch of its own making, like a dividend
round's allocations (`unposted`, `post`): transaction ids belong to the single writer, and the balance
checkpoint counts only what batches commit. A statement is posted once: its posting_key is the
transaction's idempotency_key, and `unposted` runs only while no batch is in flight.

Nothing here imports processor.store (store calls `cut`), so this module takes connections and pools.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence

import asyncpg

from processor import domain, rules
from processor.domain import require

PAYEE_PROMOTER = "promoter"
PAYEE_REGION = "region"
PAYEE_KINDS = (PAYEE_PROMOTER, PAYEE_REGION)
# the kind of each posting; the operator's, never a merchant's operation (merchants' statements leave them out)
POSTING_KIND = {PAYEE_PROMOTER: rules.KIND_PROMOTER_COMMISSION, PAYEE_REGION: rules.KIND_REGIONAL_AGENT_SHARE}
# in SQL text: "23, 24", as the partial index transactions_channel_key (migration 0013) spells it
_KINDS_SQL = ", ".join(str(kind) for kind in POSTING_KIND.values())
# the level a region's parent must have (rules.REGION_LEVELS, top first): none for the top
PARENT_LEVEL = dict(zip(rules.REGION_LEVELS, (None, *rules.REGION_LEVELS[:-1])))


class ChannelError(Exception):
    """A request the registry refuses; `code` is the domain code (NOT_FOUND, ALREADY_EXISTS, ...)."""

    def __init__(self, code: domain.Code, message: str):
        super().__init__(message)
        self.code = code


def posting_key(period_id: int, payee_kind: str, payee_id: str) -> str:
    return f"channel:{period_id}:{payee_kind}:{payee_id}"


# --- the registry ---------------------------------------------------------------------------------


async def register_promoter(pool: asyncpg.Pool, promoter_id: str, region: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        """INSERT INTO promoters (promoter_id, region) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING *""",
        promoter_id,
        region,
    )
    if row is None:
        raise ChannelError(domain.Code.ALREADY_EXISTS, f"promoter {promoter_id!r} is registered already")
    return row


async def assign_merchant_promoter(pool: asyncpg.Pool, merchant_id: str, promoter_id: str) -> asyncpg.Record:
    """Assigns (or reassigns) the merchant to the promoter; the promoter assigned at a cut earns the
    commission of the whole period cut."""
    async with pool.acquire() as c, c.transaction():
        if await c.fetchval("SELECT 1 FROM merchants WHERE merchant_id = $1", merchant_id) is None:
            raise ChannelError(domain.Code.NOT_FOUND, f"merchant {merchant_id!r} does not exist")
        if await c.fetchval("SELECT 1 FROM promoters WHERE promoter_id = $1", promoter_id) is None:
            raise ChannelError(
                domain.Code.NOT_FOUND, f"promoter {promoter_id!r} is not registered; RegisterPromoter first"
            )
        return await c.fetchrow(
            """INSERT INTO merchant_promoters (merchant_id, promoter_id) VALUES ($1, $2)
               ON CONFLICT (merchant_id) DO UPDATE SET promoter_id = excluded.promoter_id, assigned_at = now()
               RETURNING *""",
            merchant_id,
            promoter_id,
        )


async def create_region(pool: asyncpg.Pool, region_id: str, level: str, parent_id: str, name: str) -> asyncpg.Record:
    """A region of the tree: a province (no parent), a city under a province, a county under a city. A
    parent must exist first, so the tree has no cycle."""
    if level not in PARENT_LEVEL:
        raise ChannelError(
            domain.Code.INVALID_ARGUMENT, f"level must be one of {', '.join(rules.REGION_LEVELS)} (got {level!r})"
        )
    wanted = PARENT_LEVEL[level]
    async with pool.acquire() as c, c.transaction():
        if wanted is None:
            if parent_id:
                raise ChannelError(domain.Code.INVALID_ARGUMENT, "a province has no parent_id; leave it empty")
        else:
            parent = await c.fetchrow("SELECT level FROM regions WHERE region_id = $1", parent_id)
            if parent is None:
                raise ChannelError(
                    domain.Code.NOT_FOUND if parent_id else domain.Code.INVALID_ARGUMENT,
                    f"a {level} needs parent_id, an existing {wanted}"
                    + (f"; region {parent_id!r} does not exist" if parent_id else ""),
                )
            if parent["level"] != wanted:
                raise ChannelError(
                    domain.Code.FAILED_PRECONDITION,
                    f"a {level}'s parent must be a {wanted}; region {parent_id!r} is a {parent['level']}",
                )
        row = await c.fetchrow(
            """INSERT INTO regions (region_id, parent_id, level, name) VALUES ($1, $2, $3, $4)
               ON CONFLICT DO NOTHING RETURNING *""",
            region_id,
            parent_id or None,
            level,
            name,
        )
        if row is None:
            raise ChannelError(domain.Code.ALREADY_EXISTS, f"region {region_id!r} exists already")
        return row


async def register_regional_agent(pool: asyncpg.Pool, agent_id: str, region_id: str) -> asyncpg.Record:
    async with pool.acquire() as c, c.transaction():
        if await c.fetchval("SELECT 1 FROM regions WHERE region_id = $1", region_id) is None:
            raise ChannelError(domain.Code.NOT_FOUND, f"region {region_id!r} does not exist; CreateRegion first")
        taken = await c.fetchrow(
            "SELECT agent_id, region_id FROM regional_agents WHERE agent_id = $1 OR region_id = $2", agent_id, region_id
        )
        if taken is not None:
            raise ChannelError(
                domain.Code.ALREADY_EXISTS,
                f"region {taken['region_id']!r} already has agent {taken['agent_id']!r} (one agent per region, "
                "one region per agent)",
            )
        return await c.fetchrow(
            "INSERT INTO regional_agents (agent_id, region_id) VALUES ($1, $2) RETURNING *", agent_id, region_id
        )


_REGION = """SELECT r.region_id, r.parent_id, r.level, r.name, coalesce(g.agent_id, '') AS agent_id
              FROM regions r LEFT JOIN regional_agents g USING (region_id)"""


async def regions(pool: asyncpg.Pool, after: str, limit: int) -> list[asyncpg.Record]:
    """At most `limit` regions with their agents, by region id, after `after` (a page of ListRegions)."""
    rows: list[asyncpg.Record] = await pool.fetch(
        f"{_REGION} WHERE r.region_id > $1 ORDER BY r.region_id LIMIT $2", after, limit
    )
    return rows


async def region(pool: asyncpg.Pool, region_id: str) -> asyncpg.Record | None:
    """One region with its agent (None: no such region)."""
    row: asyncpg.Record | None = await pool.fetchrow(f"{_REGION} WHERE r.region_id = $1", region_id)
    return row


# --- the cut --------------------------------------------------------------------------------------


async def cut(c: asyncpg.Connection, period_id: int, settings: rules.ChannelSettings, timeout: float) -> None:
    """Writes the promoters' and regions' statements of period `period_id` from its merchants'
    statements (already written in this transaction), and opens the payees' payable accounts."""
    # lines: (payee_kind, payee_id, agent_id, rate_bps, merchant_id, fees); a region's rate is its level's
    # share; with scope "region" a merchant feeds only its own region's agent, with "subtree" also the
    # agents of the regions above it
    await c.execute(
        """CREATE TEMP TABLE channel_cut_lines ON COMMIT DROP AS
           WITH RECURSIVE s AS (SELECT merchant_id, fees FROM statements WHERE period_id = $1 AND fees > 0),
             up AS (
               SELECT s.merchant_id, s.fees, r.region_id, r.parent_id, r.level
               FROM s JOIN merchants m USING (merchant_id) JOIN regions r ON r.region_id = m.region
               UNION ALL
               SELECT up.merchant_id, up.fees, r.region_id, r.parent_id, r.level
               FROM up JOIN regions r ON r.region_id = up.parent_id WHERE $3 = 'subtree')
           SELECT 'promoter'::text AS payee_kind, p.promoter_id AS payee_id, ''::text AS agent_id,
                  $2::integer AS rate_bps, s.merchant_id, s.fees, $7::text AS account_kind, p.promoter_id AS owner_id
           FROM s JOIN merchant_promoters p USING (merchant_id) WHERE $2 > 0
           UNION ALL
           SELECT 'region', up.region_id, g.agent_id,
                  CASE up.level WHEN 'province' THEN $4::integer WHEN 'city' THEN $5::integer ELSE $6::integer END,
                  up.merchant_id, up.fees, $8::text, g.agent_id
           FROM up JOIN regional_agents g USING (region_id)""",
        period_id,
        settings.promoter_commission_bps,
        settings.agent_scope,
        settings.province_agent_share_bps,
        settings.city_agent_share_bps,
        settings.county_agent_share_bps,
        rules.ACCOUNT_PROMOTER_COMMISSIONS,
        rules.ACCOUNT_REGIONAL_AGENT_SHARES,
        timeout=timeout,
    )
    await c.execute("DELETE FROM channel_cut_lines WHERE rate_bps = 0", timeout=timeout)
    # one row per payee first (a few hundred), so the accounts are found by their unique index
    await c.execute(
        """CREATE TEMP TABLE channel_cut_payees ON COMMIT DROP AS
           SELECT payee_kind, payee_id, agent_id, rate_bps, account_kind, owner_id, sum(fees)::bigint AS fee_base,
                  sum(fees * rate_bps / 10000)::bigint AS amount, count(*) AS merchants
           FROM channel_cut_lines GROUP BY payee_kind, payee_id, agent_id, rate_bps, account_kind, owner_id""",
        timeout=timeout,
    )
    # the payees' payable accounts (owner: the promoter, or the region's agent), opened once
    await c.execute(
        """INSERT INTO accounts (kind, owner_id, asset_code)
           SELECT DISTINCT account_kind, owner_id, 'POINTS' FROM channel_cut_payees
           ON CONFLICT (kind, owner_id, asset_code) DO NOTHING""",
        timeout=timeout,
    )
    await c.execute(
        """INSERT INTO channel_statements (period_id, payee_kind, payee_id, agent_id, rate_bps, fee_base, amount,
                                           merchants, account_id, posting_key)
           SELECT $1, p.payee_kind, p.payee_id, p.agent_id, p.rate_bps, p.fee_base, p.amount, p.merchants, a.account_id,
                  'channel:' || $1::bigint || ':' || p.payee_kind || ':' || p.payee_id
           FROM channel_cut_payees p
           JOIN accounts a ON a.kind = p.account_kind AND a.owner_id = p.owner_id AND a.asset_code = 'POINTS'""",
        period_id,
        timeout=timeout,
    )
    await c.execute(
        """INSERT INTO channel_statement_lines (period_id, payee_kind, payee_id, merchant_id, fees, amount)
           SELECT $1, payee_kind, payee_id, merchant_id, fees, fees * rate_bps / 10000 FROM channel_cut_lines""",
        period_id,
        timeout=timeout,
    )
    await c.execute("DROP TABLE channel_cut_payees")
    await c.execute("DROP TABLE channel_cut_lines")


# --- posting by the committer ---------------------------------------------------------------------


async def unposted(pool: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
    """Statements with an amount whose journal transaction is not written yet, oldest period first."""
    rows: list[asyncpg.Record] = await pool.fetch(
        f"""SELECT s.payee_kind, s.payee_id, s.amount, s.account_id, s.posting_key FROM channel_statements s
           WHERE s.amount > 0 AND NOT EXISTS (SELECT 1 FROM transactions t
                                              WHERE t.idempotency_key = s.posting_key AND t.kind IN ({_KINDS_SQL}))
           ORDER BY s.period_id, s.payee_kind, s.payee_id LIMIT $1""",
        limit,
    )
    return rows


def post(write: Any, rows: Sequence[Any], next_transaction_id: Callable[[], int], revenue_account_id: int) -> None:
    """Adds to a batch's write (a store.BatchWrite) one transaction per unposted statement: the
    operator's fee revenue pays the payee's payable account its amount (merchant_id 'operator', no
    member, no program version)."""
    for r in rows:
        amount = r["amount"]
        require(amount > 0 and r["payee_kind"] in PAYEE_KINDS, f"channel statement {r['posting_key']} cannot be posted")
        created = next_transaction_id()
        write.transactions.append(
            (
                created,
                POSTING_KIND[r["payee_kind"]],
                domain.OPERATOR_ID,
                "",
                amount,
                None,
                None,
                None,
                r["posting_key"],
                0,
                None,
            )
        )
        write.entries.append((created, revenue_account_id, -amount, domain.ASSET_POINTS))
        write.entries.append((created, r["account_id"], amount, domain.ASSET_POINTS))


# --- reads ----------------------------------------------------------------------------------------


async def statements(
    pool: asyncpg.Pool,
    *,
    payee_kind: str,
    period_id: int = 0,
    payee_id: str = "",
    after: str = "",
    before_period: int = 0,
    limit: int = 100,
) -> list[asyncpg.Record]:
    """One payee's statements (of one period, or all before `before_period`, newest first), or one
    period's by payee id (after `after`)."""
    columns = f"""s.period_id, s.payee_kind, s.payee_id, s.agent_id, s.rate_bps, s.fee_base, s.amount, s.merchants,
                 s.posting_key, p.opened_at, p.cut_off,
                 (SELECT t.transaction_id FROM transactions t
                  WHERE t.idempotency_key = s.posting_key AND t.kind IN ({_KINDS_SQL})) AS transaction_id"""
    if payee_id:
        rows: list[asyncpg.Record] = await pool.fetch(
            f"""SELECT {columns} FROM channel_statements s JOIN settlement_periods p USING (period_id)
                WHERE s.payee_kind = $1 AND s.payee_id = $2 AND ($3 = 0 OR s.period_id = $3)
                  AND ($5 = 0 OR s.period_id < $5)
                ORDER BY s.period_id DESC LIMIT $4""",
            payee_kind,
            payee_id,
            period_id,
            limit,
            before_period,
        )
        return rows
    rows = await pool.fetch(
        f"""SELECT {columns} FROM channel_statements s JOIN settlement_periods p USING (period_id)
            WHERE s.payee_kind = $1 AND s.period_id = $2 AND s.payee_id > $3 ORDER BY s.payee_id LIMIT $4""",
        payee_kind,
        period_id,
        after,
        limit,
    )
    return rows


async def statement_lines(
    pool: asyncpg.Pool, period_id: int, payee_kind: str, payee_id: str, after: str = "", limit: int | None = None
) -> list[asyncpg.Record]:
    """A statement's lines, one per merchant by merchant id: its fees and the payee's amount."""
    rows: list[asyncpg.Record] = await pool.fetch(
        """SELECT merchant_id, fees, amount FROM channel_statement_lines
           WHERE period_id = $1 AND payee_kind = $2 AND payee_id = $3 AND merchant_id > $4
           ORDER BY merchant_id LIMIT $5""",
        period_id,
        payee_kind,
        payee_id,
        after,
        limit,
    )
    return rows


# --- reconcile ------------------------------------------------------------------------------------


async def discrepancies(
    fetch: Callable[..., Awaitable[list[asyncpg.Record]]], report: Callable[[str], None]
) -> list[str]:
    """What reconcile checks of the channel: each statement's lines sum to it and each line is its
    merchant's statement fees at the statement's rate; each posting pays its statement's amount to its
    account; the payables equal what was posted."""
    problems: list[str] = []
    report("every channel statement is the sum of its lines, each its merchant's period fees at the rate")
    for r in await fetch(
        """WITH l AS (SELECT x.period_id, x.payee_kind, x.payee_id, sum(x.fees) AS fees, sum(x.amount) AS amount,
                             count(*) AS n,
                             count(*) FILTER (WHERE x.amount <> x.fees * s.rate_bps / 10000
                                                 OR x.fees <> coalesce(m.fees, -1)) AS wrong
                      FROM channel_statement_lines x
                      JOIN channel_statements s ON s.period_id = x.period_id AND s.payee_kind = x.payee_kind
                                               AND s.payee_id = x.payee_id
                      LEFT JOIN statements m ON m.period_id = x.period_id AND m.merchant_id = x.merchant_id
                      GROUP BY x.period_id, x.payee_kind, x.payee_id)
           SELECT s.period_id, s.payee_kind, s.payee_id, s.fee_base, s.amount, s.merchants,
                  coalesce(l.fees, 0) AS line_fees, coalesce(l.amount, 0) AS line_amount, coalesce(l.n, 0) AS n,
                  coalesce(l.wrong, 0) AS wrong
           FROM channel_statements s LEFT JOIN l USING (period_id, payee_kind, payee_id)
           WHERE s.fee_base <> coalesce(l.fees, 0) OR s.amount <> coalesce(l.amount, 0)
              OR s.merchants <> coalesce(l.n, 0) OR coalesce(l.wrong, 0) > 0
           LIMIT 5"""
    ):
        problems.append(
            f"channel statement {r['payee_kind']} {r['payee_id']} of period {r['period_id']}: fee base "
            f"{r['fee_base']}, amount {r['amount']}, {r['merchants']} merchants; its lines: fees {r['line_fees']}, "
            f"amount {r['line_amount']}, {r['n']} lines, {r['wrong']} not their merchant's fees at the rate"
        )
    report("every channel statement line's statement and merchant exist")
    for r in await fetch(
        """SELECT l.period_id, l.payee_kind, l.payee_id, l.merchant_id FROM channel_statement_lines l
           WHERE NOT EXISTS (SELECT 1 FROM channel_statements s WHERE s.period_id = l.period_id
                             AND s.payee_kind = l.payee_kind AND s.payee_id = l.payee_id)
              OR NOT EXISTS (SELECT 1 FROM merchants m WHERE m.merchant_id = l.merchant_id)
           LIMIT 5"""
    ):
        problems.append(
            f"channel statement line of {r['payee_kind']} {r['payee_id']} in period {r['period_id']} for merchant "
            f"{r['merchant_id']}: its statement or its merchant does not exist"
        )
    report("every channel posting pays its statement's amount to the statement's payable account")
    for r in await fetch(
        f"""SELECT t.transaction_id, t.idempotency_key, t.amount, s.amount AS statement_amount
           FROM transactions t LEFT JOIN channel_statements s ON s.posting_key = t.idempotency_key
           WHERE t.kind IN ({_KINDS_SQL})
             AND (s.posting_key IS NULL OR t.amount <> s.amount
                  OR NOT EXISTS (SELECT 1 FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                                 WHERE e.account_id = s.account_id AND e.amount = s.amount))
           LIMIT 5"""
    ):
        problems.append(
            f"channel posting {r['transaction_id']} ({r['idempotency_key']}) of {r['amount']} does not pay its "
            f"statement's amount {r['statement_amount']} to the statement's account"
        )
    report("promoters' and agents' payables = the channel statements posted")
    for r in await fetch(
        f"""WITH posted AS (SELECT s.account_id, sum(s.amount) AS s FROM channel_statements s
                           WHERE EXISTS (SELECT 1 FROM transactions t WHERE t.idempotency_key = s.posting_key
                                         AND t.kind IN ({_KINDS_SQL}))
                           GROUP BY s.account_id)
           SELECT a.kind, a.owner_id, a.balance, coalesce(p.s, 0) AS posted
           FROM account_balances a LEFT JOIN posted p USING (account_id)
           WHERE a.kind IN ('promoter_commissions', 'regional_agent_shares') AND a.balance <> coalesce(p.s, 0)
           LIMIT 5"""
    ):
        problems.append(f"{r['kind']} of {r['owner_id']}: balance {r['balance']} != statements posted {r['posted']}")
    return problems
