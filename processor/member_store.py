"""Postgres for member administration (migration 0011): the batch's member rows (written inside the
batch's transaction by store.Store._write), the members' state loaded at start, the originals a reversal
names, support keys and their limits, and what a support key adjusted today."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import asyncpg

from processor import events as feed_events
from processor import kinds, rules
from processor.member_postings import (
    EVENT_CLOSED,
    EVENT_FROZEN,
    EVENT_MERGED,
    EVENT_UNFROZEN,
    MemberRegistry,
    MemberStatus,
    MemberWrite,
)


def _moment(micros: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(micros / 1_000_000, dt.timezone.utc)


async def write(c: asyncpg.Connection, rows: MemberWrite, at: dt.datetime, timeout: float) -> None:
    """A batch's member rows, in the batch's transaction."""
    if rows.adjustments:
        await c.executemany(
            """INSERT INTO member_adjustments (transaction_id, member_id, points, reason, note, key_id, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            [(*row, at) for row in rows.adjustments],
            timeout=timeout,
        )
    if rows.reversals:
        await c.executemany(
            """INSERT INTO member_reversals
                   (original_transaction_id, reversal_transaction_id, reason, note, key_id, created_at)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            [(*row, at) for row in rows.reversals],
            timeout=timeout,
        )
    if rows.statuses:
        await c.executemany(
            """INSERT INTO member_status (member_id, state, reason, frozen_at, closed_at, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (member_id) DO UPDATE SET state = excluded.state, reason = excluded.reason,
                   frozen_at = excluded.frozen_at, closed_at = excluded.closed_at, updated_at = excluded.updated_at""",
            [_status_row(member_id, status, at) for member_id, status in rows.statuses.items()],
            timeout=timeout,
        )
    if rows.events:
        await insert_events(c, rows.events, at, timeout)
    if rows.transfers:
        await c.executemany(
            """INSERT INTO member_transfers (transaction_id, from_member_id, to_member_id, points, fee, created_at)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            [(*row, at) for row in rows.transfers],
            timeout=timeout,
        )
    if rows.merges:
        await c.executemany(
            """INSERT INTO member_merges (source_member_id, target_member_id, transaction_id, points, created_at)
               VALUES ($1, $2, $3, $4, $5)""",
            [(*row, at) for row in rows.merges],
            timeout=timeout,
        )
    for alias, member_id in rows.aliases:  # in order: a batch may unbind an alias and bind it again
        if member_id is None:
            await c.execute("DELETE FROM member_aliases WHERE alias = $1", alias, timeout=timeout)
        else:
            await c.execute(
                "INSERT INTO member_aliases (alias, member_id, created_at) VALUES ($1, $2, $3)",
                alias,
                member_id,
                at,
                timeout=timeout,
            )
    if rows.households:
        await c.executemany(
            "INSERT INTO households (household_id, head_member_id, created_at) VALUES ($1, $2, $3)",
            [(*row, at) for row in rows.households],
            timeout=timeout,
        )
    for member_id, household_id in rows.memberships:
        if household_id is None:
            await c.execute("DELETE FROM household_members WHERE member_id = $1", member_id, timeout=timeout)
        else:
            await c.execute(
                "INSERT INTO household_members (member_id, household_id, joined_at) VALUES ($1, $2, $3)",
                member_id,
                household_id,
                at,
                timeout=timeout,
            )


def _status_row(member_id: str, status: MemberStatus | None, at: dt.datetime) -> tuple[Any, ...]:
    if status is None:
        return (member_id, "active", "", None, None, at)
    since = _moment(status.since_us)
    return (
        member_id,
        status.state,
        status.reason,
        since if status.state == "frozen" else None,
        since if status.state == "closed" else None,
        at,
    )


async def insert_events(
    c: asyncpg.Connection, events: list[tuple[str, str, dict[str, Any]]], at: dt.datetime, timeout: float = 30.0
) -> None:
    """The members' status log, and the change feed's member events (processor/events.py) in the same
    transaction: with the batch that made the change, so the feed shows it exactly when it commits."""
    await c.executemany(
        "INSERT INTO member_status_log (member_id, event, payload, created_at) VALUES ($1, $2, $3::jsonb, $4)",
        [(member_id, event, json.dumps(payload), at) for member_id, event, payload in events],
        timeout=timeout,
    )
    for member_id, event, payload in events:
        feed = _feed_event(event, payload)
        if feed is not None:
            await feed_events.record_member_event(c, member_id, feed[0], feed[1])


def _feed_event(event: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A status-log event as the change feed shows it: a merge once, from its source's side (the
    source's row names its target; the target's row, naming the source, adds nothing)."""
    if event == EVENT_MERGED:
        if "into" not in payload:
            return None
        return feed_events.MERGED, {"target_member_id": payload["into"], "points": payload.get("points", 0)}
    return {
        EVENT_FROZEN: feed_events.FROZEN,
        EVENT_UNFROZEN: feed_events.UNFROZEN,
        EVENT_CLOSED: feed_events.CLOSED,
    }[event], payload


async def load_registry(pool: asyncpg.Pool, timeout: float) -> MemberRegistry:
    """The members not active, the transactions reversed, aliases and households, at a start or a resync
    (all of them in memory: bounded by the members, as the fast path's balances are)."""
    statuses = {}
    for r in await pool.fetch(
        "SELECT member_id, state, reason, coalesce(frozen_at, closed_at) AS since FROM member_status "
        "WHERE state <> 'active'",
        timeout=timeout,
    ):
        since = r["since"]
        statuses[r["member_id"]] = MemberStatus(r["state"], r["reason"], int(since.timestamp() * 1_000_000))
    reversed_by = {
        r["original_transaction_id"]: r["reversal_transaction_id"]
        for r in await pool.fetch(
            "SELECT original_transaction_id, reversal_transaction_id FROM member_reversals", timeout=timeout
        )
    }
    aliases = {r["alias"]: r["member_id"] for r in await pool.fetch("SELECT alias, member_id FROM member_aliases")}
    households = {
        r["household_id"]: r["head_member_id"]
        for r in await pool.fetch("SELECT household_id, head_member_id FROM households", timeout=timeout)
    }
    household_of = {
        r["member_id"]: r["household_id"]
        for r in await pool.fetch("SELECT member_id, household_id FROM household_members", timeout=timeout)
    }
    # what each member sent by transfer today (UTC), for the program's daily cap
    now = dt.datetime.now(dt.timezone.utc)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    day = int(day_start.timestamp()) // 86_400
    transferred = {
        r["member_id"]: (day, int(r["points"]))
        for r in await pool.fetch(
            """SELECT from_member_id AS member_id, sum(points) AS points FROM member_transfers
               WHERE created_at >= $1 GROUP BY from_member_id""",
            day_start,
            timeout=timeout,
        )
    }
    return MemberRegistry(statuses, reversed_by, aliases, households, household_of, transferred)


async def transaction(pool: asyncpg.Pool, transaction_id: int) -> asyncpg.Record | None:
    """A committed transaction a reversal names: its kind, member and signed change of the member."""
    return await pool.fetchrow(
        """SELECT t.transaction_id, t.kind, t.member_id, t.merchant_id,
                  coalesce((SELECT sum(e.amount)
                            FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                            JOIN accounts a USING (account_id)
                            WHERE a.kind = 'member' AND a.asset_code = 'POINTS' AND a.owner_id = t.member_id),
                           0)::bigint AS member_points
           FROM transactions t WHERE t.transaction_id = $1""",
        transaction_id,
    )


# the transactions an earn sets off in its batch (tier and referral bonuses, the acquirer's reward, the
# merchant match, the fan reward), which name it as their original and are reversed with it (docs/RULES.md
# section 13); a fan reward moves vouchers, so an earn that set one off is refused (member_admin)
TIED_KINDS = (
    rules.KIND_TIER_BONUS,
    rules.KIND_REFERRAL_BONUS,
    rules.KIND_ACQUIRING_REWARD,
    rules.KIND_MERCHANT_MATCH,
    rules.KIND_FAN_REWARD,
)
# kinds that undo part of their original: one of these naming a transaction means it was refunded (in part)
REFUND_KINDS = (
    kinds.BY_NAME["refund_of_redemption"].code,
    kinds.BY_NAME["refund_of_earn"].code,
    rules.KIND_ACQUIRING_REVERSAL,
    rules.KIND_SPLIT_REFUND,
    rules.KIND_MERCHANT_MATCH_REVERSAL,
    rules.KIND_FAN_REWARD_REVERSAL,
)


async def reversal_group(pool: asyncpg.Pool, transaction_id: int) -> dict[str, Any]:
    """What ReverseTransaction reads from committed state, in one snapshot: the transaction and the
    transactions tied to it (TIED_KINDS naming it as original), each with its entries as [account_id,
    account kind, owner, asset, amount]; the refunds naming it; and its earn record if it has one."""
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
        rows = await c.fetch(
            """SELECT t.transaction_id, t.kind, t.member_id, t.merchant_id, t.refunded, t.amount,
                      coalesce(array_agg(ARRAY[e.account_id::text, a.kind, a.owner_id, a.asset_code,
                                               e.amount::text] ORDER BY e.leg)
                               FILTER (WHERE e.leg IS NOT NULL), '{}') AS legs
               FROM transactions t
               -- the legs in their order (migration 0022: the row's arrays)
               LEFT JOIN LATERAL unnest(t.leg_accounts, t.leg_amounts) WITH ORDINALITY AS e(account_id, amount, leg)
                 ON true
               LEFT JOIN accounts a ON a.account_id = e.account_id
               WHERE t.transaction_id = $1 OR (t.original_transaction_id = $1 AND t.kind = ANY($2::smallint[]))
               GROUP BY t.transaction_id ORDER BY t.transaction_id""",
            transaction_id,
            list(TIED_KINDS),
        )
        refunds = await c.fetchval(
            "SELECT count(*) FROM transactions WHERE original_transaction_id = $1 AND kind = ANY($2::smallint[])",
            transaction_id,
            list(REFUND_KINDS),
        )
        record = await c.fetchrow(
            """SELECT e.transaction_id, e.base_point_units, e.uplift_point_units, e.acquirer_id,
                      e.acquiring_point_units, e.refunded_base_point_units, e.grants::text AS grants,
                      t.member_id, t.merchant_id, t.program_version, t.created_at
               FROM earn_rules e JOIN transactions t USING (transaction_id) WHERE e.transaction_id = $1""",
            transaction_id,
        )
    originals = [
        {
            "transaction_id": r["transaction_id"],
            "kind": r["kind"],
            "member_id": r["member_id"],
            "merchant_id": r["merchant_id"],
            "refunded": r["refunded"],
            "amount": r["amount"],
            "legs": [[int(a), k, o, asset, int(amount)] for a, k, o, asset, amount in r["legs"]],
        }
        for r in rows
    ]
    # the transaction itself first, then what it set off, in id order
    originals.sort(key=lambda o: o["transaction_id"] != transaction_id)
    return {"originals": originals, "refunds": int(refunds or 0), "earn_record": record}


async def insert_support_key(
    pool: asyncpg.Pool,
    key_id: str,
    secret_sha256: bytes,
    description: str,
    points_per_call_max: int,
    points_per_day_max: int,
    expires_at: dt.datetime | None = None,
) -> None:
    await pool.execute(
        """INSERT INTO api_keys (key_id, secret_sha256, kind, merchant_ids, description, expires_at,
                                 support_points_per_call_max, support_points_per_day_max)
           VALUES ($1, $2, 'support', '{}', $3, $4, $5, $6)""",
        key_id,
        secret_sha256,
        description,
        expires_at,
        points_per_call_max,
        points_per_day_max,
    )


async def support_limits(pool: asyncpg.Pool, key_id: str) -> tuple[int, int] | None:
    """A support key's (per call, per day) limits in point-units; None if it has none."""
    row = await pool.fetchrow(
        "SELECT support_points_per_call_max AS call, support_points_per_day_max AS day FROM api_keys WHERE key_id = $1",
        key_id,
    )
    if row is None or row["call"] is None:
        return None
    return row["call"], row["day"]


async def adjusted_since(pool: asyncpg.Pool, key_id: str, since: dt.datetime) -> int:
    """Point-units (absolute) a key's adjustments moved since `since`."""
    return int(
        await pool.fetchval(
            "SELECT coalesce(sum(abs(points)), 0) FROM member_adjustments WHERE key_id = $1 AND created_at >= $2",
            key_id,
            since,
        )
    )


async def member_history(
    pool: asyncpg.Pool, member_id: str, before_transaction_id: int | None, limit: int
) -> list[asyncpg.Record]:
    """The member's transactions at every merchant and the operator's, newest first (MemberAdminService;
    a merchant's ListTransactions shows only its own, store.list_transactions)."""
    # Three index-backed reads of at most `limit` ids each (the member's own transactions, the transfers
    # it received, the merges into it), then the page. One WHERE with "OR id IN (...)" walked the journal
    # backwards from the newest transaction and filtered every row: a member with few transactions, or an
    # unknown one, read the whole journal (measured: 102,000 rows read for a page of 51 in a journal of
    # 200,000). The member index is keyed by hashtext(member_id) (migration 0021): the read names the hash
    # to reach it and the id to drop another member of the same hash.
    rows: list[asyncpg.Record] = await pool.fetch(
        """WITH page AS (
               SELECT transaction_id FROM (
                   (SELECT transaction_id FROM transactions
                    WHERE hashtext(member_id) = hashtext($1) AND member_id = $1
                      AND ($2::bigint IS NULL OR transaction_id < $2)
                    ORDER BY transaction_id DESC LIMIT $3)
                   UNION
                   (SELECT transaction_id FROM member_transfers
                    WHERE to_member_id = $1 AND ($2::bigint IS NULL OR transaction_id < $2)
                    ORDER BY to_member_id, transaction_id DESC LIMIT $3)
                   UNION
                   (SELECT transaction_id FROM member_merges
                    WHERE target_member_id = $1 AND transaction_id IS NOT NULL
                      AND ($2::bigint IS NULL OR transaction_id < $2)
                    ORDER BY target_member_id, transaction_id DESC LIMIT $3)
               ) ids ORDER BY transaction_id DESC LIMIT $3)
           SELECT t.transaction_id, t.kind, t.merchant_id, t.amount, t.purchase_amount,
                  t.authorization_id, t.original_transaction_id, t.created_at,
                  coalesce(m.points, 0) AS member_points, coalesce(m.vouchers, 0) AS member_vouchers
           FROM page JOIN transactions t USING (transaction_id)
           LEFT JOIN LATERAL (
               SELECT sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS')::bigint AS points,
                      sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS')::bigint AS vouchers
               FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount) JOIN accounts a USING (account_id)
               WHERE a.owner_id = $1 AND a.kind IN ('member', 'member_voucher_credit')) m ON true
           ORDER BY t.transaction_id DESC""",
        member_id,
        before_transaction_id,
        limit,
    )
    return rows
