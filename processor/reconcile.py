"""reconcile: the ledger checked against itself in one snapshot (repeatable read, read only). The journal
sums to zero per asset and per transaction; every reference exists; balances equal their entries up to
the checkpoint; holds stay within balances; ids are handed out once (ledger_writer); every transaction
is of a known kind moving its member's points in its kind's direction and, for the program's kinds, has
its kind's shape; account signs; earn records, promotion budgets and lots; statements equal their
merchants' entries; net positions, fee revenue, channel payables, breakage and members' points sum to
zero; channel statements equal their merchants' fees and their postings (processor/channel_store.py). Each check
lists at most 5 examples. Used by `python -m processor reconcile` and at the end of most tests."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from processor import channel_store, kinds, member_store, rules
from processor.domain import ASSET_POINTS, require
from processor.store import (
    _CLEARING_SUMS,
    _LARGEST_IDS,
    MERCHANT_ACCOUNTS,
    MERCHANT_VOUCHER_ACCOUNTS,
    RECONCILE_TIMEOUT_SECONDS,
    STATEMENT_AMOUNTS,
    VOUCHER_STATEMENT_AMOUNTS,
)

# how long `python -m processor reconcile` waits for a running service's projector before it checks
PROJECTION_WAIT_SECONDS = 30.0


async def ledger_discrepancies(pool: asyncpg.Pool, report=lambda check: None) -> list[str]:
    """Checks the journal against itself, the stored balances and the statements, in one snapshot;
    returns what does not hold. `report` is told the name of each check as it runs."""
    problems: list[str] = []
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
        # whole-journal scans: minutes at tens of millions of rows, not a commit's seconds
        def fetch(sql, *args):
            return c.fetch(sql, *args, timeout=RECONCILE_TIMEOUT_SECONDS)

        def fetchrow(sql, *args):
            return c.fetchrow(sql, *args, timeout=RECONCILE_TIMEOUT_SECONDS)

        report("the journal sums to zero per asset")
        # the whole-journal checks read the legs' arrays (migration 0022) unnested in the select list (a
        # ProjectSet), not the entries view (a function scan and a self-join per transaction: 1.5-4x)
        for r in await fetch(f"""SELECT coalesce(asset_code, '{ASSET_POINTS}') AS asset_code, sum(amount) AS s
                                   FROM (SELECT unnest(leg_amounts) AS amount, unnest(leg_assets) AS asset_code
                                         FROM transactions) l GROUP BY 1"""):
            if r["s"] != 0:
                problems.append(f"journal of {r['asset_code']} sums to {r['s']}, not 0")
        report("every transaction's entries sum to zero per asset")
        # a POINTS-only row (leg_assets NULL: nearly all) summed on its own, no GROUP BY over the journal
        # (it spilled 190 MB to disk at ~1M transactions); a row with other assets grouped by asset
        for r in await fetch(f"""SELECT transaction_id, asset_code, s FROM (
                                   SELECT transaction_id, '{ASSET_POINTS}' AS asset_code,
                                          (SELECT sum(x) FROM unnest(leg_amounts) x) AS s
                                   FROM transactions WHERE leg_assets IS NULL
                                   UNION ALL
                                   SELECT t.transaction_id, l.asset_code, sum(l.amount) FROM transactions t
                                   CROSS JOIN LATERAL unnest(t.leg_amounts, t.leg_assets) AS l(amount, asset_code)
                                   WHERE t.leg_assets IS NOT NULL GROUP BY 1, 2) c
                                 WHERE s <> 0 ORDER BY transaction_id, asset_code LIMIT 5"""):
            problems.append(f"transaction {r['transaction_id']} entries in {r['asset_code']} sum to {r['s']}, not 0")
        # the journal has no foreign-key triggers (migration 0003): references are checked here; a leg's
        # transaction is its row (migration 0022), so only its account can be missing; entry_id as the
        # entries view numbers it
        report("every entry's account and transaction exist, in the entry's asset")
        for r in await fetch(f"""SELECT l.transaction_id * 1024 + l.leg AS entry_id, l.transaction_id, l.account_id
                                   FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id,
                                                unnest(leg_assets) AS asset_code,
                                                generate_subscripts(leg_accounts, 1) AS leg
                                         FROM transactions) l
                                   LEFT JOIN accounts a USING (account_id)
                                   WHERE a.account_id IS NULL
                                      OR a.asset_code <> coalesce(l.asset_code, '{ASSET_POINTS}') LIMIT 5"""):
            problems.append(
                f"entry {r['entry_id']} refers to transaction {r['transaction_id']} and account "
                f"{r['account_id']}, which do not both exist in its asset"
            )
        report("every transaction's and hold's merchant and member exist; every refund's original exists")
        # an expiry (6) of a lot the operator issued (an adjustment's, issue 15) names the operator;
        # a dividend (kind 11) goes to a member (merchant_id 'operator') or to a merchant (member_id ''); a
        # merchant's voucher spend (14) has no member; a channel posting (23, 24) neither (the operator's)
        for r in await fetch(
            """SELECT 'transaction ' || t.transaction_id AS what FROM transactions t
                                  WHERE NOT (EXISTS (SELECT 1 FROM merchants m WHERE m.merchant_id = t.merchant_id)
                                             OR t.kind IN (6, 11, 23, 24) AND t.merchant_id = 'operator'
                                             OR t.kind = ANY($1::smallint[]) AND t.merchant_id = 'operator')
                                     OR NOT (EXISTS (SELECT 1 FROM members u WHERE u.member_id = t.member_id)
                                             OR t.kind IN (11, 14, 23, 24) AND t.member_id = '')
                                     OR (t.original_transaction_id IS NOT NULL AND NOT EXISTS
                                          (SELECT 1 FROM transactions o
                                           WHERE o.transaction_id = t.original_transaction_id))
                                  UNION ALL
                                  SELECT 'hold ' || h.authorization_id FROM holds h
                                  WHERE NOT EXISTS (SELECT 1 FROM merchants m WHERE m.merchant_id = h.merchant_id)
                                     OR NOT EXISTS (SELECT 1 FROM members u WHERE u.member_id = h.member_id)
                                  LIMIT 5""",
            sorted(kinds.OPERATOR_KINDS),
        ):
            problems.append(f"{r['what']} refers to a merchant, member or transaction that does not exist")
        report(
            "every account's checkpointed balance (members, merchant positions, operator) equals the "
            "sum of its entries up to the checkpoint"
        )
        # MATERIALIZED: with LIMIT the planner may otherwise re-run the aggregate per account
        # (measured: hours at 10M transactions instead of a minute)
        for r in await fetch("""WITH e AS MATERIALIZED (
                                    SELECT account_id, sum(amount) AS s
                                    FROM (SELECT unnest(t.leg_accounts) AS account_id, unnest(t.leg_amounts) AS amount
                                          FROM transactions t, balance_checkpoint c
                                          WHERE t.transaction_id <= c.through_transaction_id) l
                                    GROUP BY account_id)
                                  SELECT a.account_id, a.kind, a.owner_id, a.balance, coalesce(e.s, 0) AS s
                                  FROM accounts a LEFT JOIN e USING (account_id)
                                  WHERE a.balance <> coalesce(e.s, 0) LIMIT 5"""):
            problems.append(
                f"account {r['kind']}:{r['owner_id']} balance {r['balance']} != entries {r['s']} "
                "(at the balance checkpoint)"
            )
        report("no member's open holds exceed its posted balance (available >= 0)")
        for r in await fetch("""SELECT h.member_id, a.balance, sum(h.amount) AS held
                                  FROM holds h JOIN account_balances a
                                    ON a.kind = 'member' AND a.owner_id = h.member_id AND a.asset_code = h.asset_code
                                  WHERE h.status = 1 AND h.expires_at > now()
                                  GROUP BY h.member_id, a.balance
                                  HAVING sum(h.amount) > a.balance LIMIT 5"""):
            problems.append(f"member {r['member_id']} holds {r['held']} > posted {r['balance']}")
        report("no transaction is refunded beyond its amount")
        for r in await fetch("""SELECT transaction_id, amount, refunded FROM transactions
                                  WHERE refunded > amount LIMIT 5"""):
            problems.append(f"transaction {r['transaction_id']} refunded {r['refunded']} > {r['amount']}")
        problems += await _id_discrepancies(fetch, report)
        report("every transaction is of a known kind and moves its member's points in its kind's direction")
        signs = " ".join(f"WHEN {k.code} THEN {k.member_sign}" for k in kinds.KINDS)
        for r in await fetch(
            f"""SELECT t.transaction_id, t.kind, coalesce(m.points, 0) AS points
                                   FROM transactions t
                                   LEFT JOIN LATERAL (
                                       SELECT sum(e.amount) AS points
                                       FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                                       JOIN accounts a USING (account_id)
                                       WHERE a.kind = 'member'
                                         AND a.asset_code = 'POINTS' AND a.owner_id = t.member_id) m ON true
                                   WHERE sign(coalesce(m.points, 0)) NOT IN (0, coalesce(CASE t.kind {signs} END, 2))
                                      OR NOT t.kind = ANY($1::smallint[])
                                   LIMIT 5""",
            [k.code for k in kinds.KINDS],
        ):
            known = kinds.BY_CODE.get(r["kind"])
            problems.append(
                f"transaction {r['transaction_id']} is of unknown kind {r['kind']}"
                if known is None
                else f"transaction {r['transaction_id']} of kind {r['kind']} ({known.name}) moves its "
                f"member's points by {r['points']}, against its kind's sign {known.member_sign}"
            )
        problems += await _program_discrepancies(fetch, report)
        problems += await _member_admin_discrepancies(fetch, report)
        report(
            "every statement's net and amounts (POINTS and VOUCHERS) equal the merchant's journal entries in its period"
        )
        checked = ("net", *STATEMENT_AMOUNTS, "voucher_net", *VOUCHER_STATEMENT_AMOUNTS)
        amounts = ", ".join(
            f"coalesce(s.{name}, 0) AS {name}, coalesce(j.{name}, 0) AS journal_{name}" for name in checked
        )
        differs = " OR ".join(f"coalesce(s.{name}, 0) <> coalesce(j.{name}, 0)" for name in checked)
        for r in await fetch(
            f"""WITH j AS (
                      SELECT p.period_id, a.owner_id AS merchant_id,
                             coalesce(sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS'), 0) AS net,
                             coalesce(sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS'
                                                              AND a.kind = 'merchant_redeemed'), 0) AS voucher_net,
                             {
                _CLEARING_SUMS.format(amount="e.amount", account="a.kind", kind="t.kind", asset="a.asset_code")
            }
                      FROM settlement_periods p
                      JOIN transactions t ON t.created_at >= p.opened_at AND t.created_at < p.cut_off
                      CROSS JOIN LATERAL unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                      JOIN accounts a ON a.account_id = e.account_id
                        AND (a.asset_code = 'POINTS' AND a.kind = ANY($1::text[])
                             OR a.asset_code = 'VOUCHERS' AND a.kind = ANY($2::text[]))
                      GROUP BY 1, 2)
                    SELECT coalesce(s.period_id, j.period_id) AS period_id,
                           coalesce(s.merchant_id, j.merchant_id) AS merchant_id, {amounts}
                    FROM statements s FULL JOIN j USING (period_id, merchant_id)
                    WHERE {differs} LIMIT 5""",
            list(MERCHANT_ACCOUNTS),
            list(MERCHANT_VOUCHER_ACCOUNTS),
        ):
            wrong = [
                f"{name} {r[name]} != journal {r['journal_' + name]}"
                for name in checked
                if r[name] != r["journal_" + name]
            ]
            problems.append(f"statement of {r['merchant_id']} in period {r['period_id']}: " + ", ".join(wrong))
        report("every statement opens at the previous one's closing position")
        for r in await fetch(
            """SELECT s.merchant_id, s.period_id, s.opening_position, p.closing_position
                   FROM statements s LEFT JOIN statements p
                     ON p.merchant_id = s.merchant_id AND p.period_id = s.period_id - 1
                   WHERE s.opening_position <> coalesce(p.closing_position, 0) LIMIT 5"""
        ):
            problems.append(
                f"statement of {r['merchant_id']} in period {r['period_id']} opens at "
                f"{r['opening_position']}, the previous closed at {r['closing_position']}"
            )
        report("every statement's voucher position and vouchers held open at the previous one's closing")
        for r in await fetch(
            """SELECT s.merchant_id, s.period_id, s.voucher_opening_position, s.vouchers_held_opening,
                          coalesce(p.voucher_closing_position, 0) AS voucher_closing_position,
                          coalesce(p.vouchers_held_closing, 0) AS vouchers_held_closing
                   FROM statements s LEFT JOIN statements p
                     ON p.merchant_id = s.merchant_id AND p.period_id = s.period_id - 1
                   WHERE s.voucher_opening_position <> coalesce(p.voucher_closing_position, 0)
                      OR s.vouchers_held_opening <> coalesce(p.vouchers_held_closing, 0) LIMIT 5"""
        ):
            problems.append(
                f"statement of {r['merchant_id']} in period {r['period_id']} opens at voucher "
                f"position {r['voucher_opening_position']} and {r['vouchers_held_opening']} "
                f"vouchers held, the previous closed at {r['voucher_closing_position']} and "
                f"{r['vouchers_held_closing']}"
            )
        report(
            "net positions + fee revenue + channel payables + breakage + program funding + members' points = 0; "
            "fee revenue + commissions + agent shares = fees charged"
        )
        totals = await fetchrow(
            """SELECT coalesce(sum(balance) FILTER (WHERE kind = 'member'), 0) AS members,
                      coalesce(sum(balance) FILTER (WHERE kind LIKE 'merchant_%' AND kind <> 'merchant_points'), 0)
                          AS merchants,
                      -- points merchants hold (the merchant match, issue 16): not part of a net position
                      coalesce(sum(balance) FILTER (WHERE kind = 'merchant_points'), 0) AS merchant_points,
                      -- channel economics (issue 16): what the operator's fee revenue paid promoters and agents
                      coalesce(sum(balance) FILTER (WHERE kind = 'promoter_commissions'), 0) AS commissions,
                      coalesce(sum(balance) FILTER (WHERE kind = 'regional_agent_shares'), 0) AS agent_shares,
                      coalesce(sum(balance) FILTER (WHERE kind = 'operator_fee_revenue'), 0) AS revenue,
                      coalesce(sum(balance) FILTER (WHERE kind = 'merchant_fees'), 0) AS fees,
                      coalesce(sum(balance) FILTER (WHERE kind = 'operator_breakage'), 0) AS breakage,
                      -- the program rules' operator accounts (tier rewards, promotions, referrals,
                      -- acquiring): points the operator funded, <= 0
                      coalesce(sum(balance) FILTER (WHERE kind IN ('operator_tier_rewards', 'operator_promotions',
                               'operator_referrals', 'operator_acquiring', 'operator_merchant_match',
                               'operator_signup_bonuses', 'operator_adjustments', 'operator_transfer_fees')), 0)
                               AS program
               FROM account_balances WHERE asset_code = 'POINTS'"""
        )
        # fee revenue is what the operator keeps of the fees; gross = kept + commissions + agent shares
        channel = totals["commissions"] + totals["agent_shares"]
        if (
            totals["members"]
            + totals["merchants"]
            + totals["merchant_points"]
            + totals["revenue"]
            + channel
            + totals["breakage"]
            + totals["program"]
            != 0
        ):
            problems.append(
                f"net positions {totals['merchants']} + fee revenue {totals['revenue']} + "
                f"commissions {totals['commissions']} + agent shares {totals['agent_shares']} + "
                f"breakage {totals['breakage']} + program funding {totals['program']} + "
                f"members' points {totals['members']} + merchants' points {totals['merchant_points']} != 0"
            )
        if totals["revenue"] + channel != -totals["fees"]:
            paid = f" + commissions {totals['commissions']} + agent shares {totals['agent_shares']}" if channel else ""
            problems.append(f"fee revenue {totals['revenue']}{paid} != fees charged {-totals['fees']}")
        problems += await channel_store.discrepancies(fetch, report)
        problems.extend(await _feed_discrepancies(fetch, report))
        problems.extend(await _log_discrepancies(fetch, report))
    return problems


# --- reconcile: the projection against the batch log (processor/batch_log.py, migration 0017) -------


async def _log_discrepancies(fetch, report) -> list[str]:
    """The projection equals the log: the mark is within the log, and every projected batch still in the
    log has its transaction id range in `transactions` with its count (ids are consecutive across
    batches, so no other batch has a row in its range). Batches after the mark are not yet projected:
    not a discrepancy (a running service's projector writes them; `unprojected` counts them)."""
    problems: list[str] = []
    report("the projection mark is within the batch log")
    for r in await fetch(
        """SELECT p.through_batch_id AS through, (SELECT max(batch_id) FROM batch_log) AS newest
           FROM projection_state p"""
    ):
        if r["newest"] is None and r["through"] > 0 or r["newest"] is not None and r["through"] > r["newest"]:
            problems.append(
                f"projection_state is at batch {r['through']} but the batch log ends at {r['newest']}: "
                "the newest projected batch must stay in the log"
            )
    report("every projected batch in the log has its transactions, and no more")
    for r in await fetch(
        """SELECT l.batch_id, l.first_transaction_id, l.last_transaction_id, l.transactions,
                  count(t.transaction_id) AS found
           FROM batch_log l JOIN projection_state p ON l.batch_id <= p.through_batch_id
           LEFT JOIN transactions t
             ON t.transaction_id BETWEEN l.first_transaction_id AND l.last_transaction_id
           GROUP BY l.batch_id HAVING count(t.transaction_id) <> l.transactions
           ORDER BY l.batch_id LIMIT 5"""
    ):
        problems.append(
            f"batch {r['batch_id']} of the log wrote {r['transactions']} transactions "
            f"({r['first_transaction_id']}..{r['last_transaction_id']}) but {r['found']} are in transactions"
        )
    return problems


async def unprojected(pool: asyncpg.Pool, wait_seconds: float) -> int:
    """Batches in the log not projected yet, after waiting up to `wait_seconds` for a running service's
    projector to write them (reconcile reads the projected tables: it waits so it checks what was
    answered before it started)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        row = await pool.fetchrow(
            """SELECT (SELECT coalesce(max(batch_id), 0) FROM batch_log) AS newest,
                      (SELECT through_batch_id FROM projection_state) AS through"""
        )
        lag = max(0, row["newest"] - row["through"])
        if lag == 0 or time.monotonic() >= deadline:
            return lag
        await asyncio.sleep(0.1)


# --- reconcile: the change feed's records (processor/events.py, migration 0012) ----------------------


async def _feed_discrepancies(fetch, report) -> list[str]:
    """The member's balance after each transaction, as the committer recorded it for the change feed,
    equals the sum of the member's points entries up to and including that transaction; member events
    are positioned within the transactions written so far."""
    problems: list[str] = []
    report("every transaction's recorded member balance after it equals the member's journal up to it")
    for r in await fetch(
        """WITH moves AS (
               SELECT a.owner_id AS member_id, e.transaction_id, e.amount
               FROM (SELECT transaction_id, unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount,
                            unnest(leg_assets) AS asset_code
                     FROM transactions) e
               JOIN accounts a ON a.account_id = e.account_id
               WHERE a.kind = 'member' AND a.asset_code = 'POINTS' AND coalesce(e.asset_code, 'POINTS') = 'POINTS'
               UNION ALL
               SELECT member_id, transaction_id, 0 FROM transactions WHERE member_balance_after IS NOT NULL),
           per AS (SELECT member_id, transaction_id, sum(amount) AS amount FROM moves GROUP BY 1, 2),
           running AS (SELECT member_id, transaction_id,
                              sum(amount) OVER (PARTITION BY member_id ORDER BY transaction_id) AS balance
                       FROM per)
           SELECT t.transaction_id, t.member_id, t.member_balance_after, r.balance
           FROM transactions t JOIN running r USING (member_id, transaction_id)
           WHERE t.member_balance_after IS NOT NULL AND t.member_balance_after <> r.balance
           ORDER BY t.transaction_id LIMIT 5"""
    ):
        problems.append(
            f"transaction {r['transaction_id']} records member {r['member_id']}'s balance after it as "
            f"{r['member_balance_after']}, the journal says {r['balance']}"
        )
    report("every member event is positioned at or before the newest transaction id handed out")
    for r in await fetch(
        """SELECT e.member_event_id, e.after_transaction_id FROM member_events e, ledger_writer w
           WHERE e.after_transaction_id > greatest(w.last_transaction_id,
                                                   (SELECT coalesce(max(transaction_id), 0) FROM transactions))
           ORDER BY e.member_event_id LIMIT 5"""
    ):
        problems.append(
            f"member event {r['member_event_id']} is positioned after transaction {r['after_transaction_id']}, "
            "which was never handed out"
        )
    return problems


# --- reconcile: the program rules' checks (docs/RULES.md, "Ledger invariants, extended") -------------

# the transactions that may own lot consumptions: captures, redeems, split redeems, and member debits
_CONSUMING_KINDS = sorted({kinds.BY_NAME["capture"].code, kinds.BY_NAME["redeem"].code, rules.KIND_SPLIT_REDEEM,
                           *kinds.MEMBER_DEBITS})  # fmt: skip

# The sign every account kind's balance keeps (an entry's amount is added to the balance): +1 never
# below 0, -1 never above 0 (docs/RULES.md "New account kinds", docs/DOMAIN.md for the first six).
ACCOUNT_SIGNS: dict[str, int] = {
    "member": 1,
    "merchant_redeemed": 1,
    "merchant_acquiring": 1,
    "merchant_vouchers": 1,
    "operator_fee_revenue": 1,
    "operator_breakage": 1,
    "merchant_issued": -1,
    "merchant_fees": -1,
    "operator_tier_rewards": -1,
    "operator_promotions": -1,
    "operator_referrals": -1,
    "operator_acquiring": -1,
    "operator_dividends": -1,
    "member_voucher_credit": -1,
    # issue 16, the seed systems
    "merchant_points": 1,
    "operator_merchant_match": -1,
    "operator_signup_bonuses": -1,
    "operator_fan_rewards": -1,
    "merchant_voucher_credit": -1,
    "promoter_commissions": 1,
    "regional_agent_shares": 1,
    # 0: either sign. Credits to members draw it below zero, debits above (member administration)
    "operator_adjustments": 0,
    "operator_transfer_fees": 1,
}

_POINTS_FEES = kinds._POINTS_FEES
# per transaction t (kinds 6..15, or an earn with an earn_rules row): sums of its entries by account
_SHAPE_SUMS = """
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'member' AND a.asset_code = 'POINTS'
                                     AND a.owner_id = t.member_id), 0) AS member_own,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'member' AND a.asset_code = 'POINTS'), 0) AS member_any,
    count(DISTINCT a.account_id) FILTER (WHERE a.kind = 'member' AND a.asset_code = 'POINTS') AS members,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_breakage'), 0) AS breakage,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_tier_rewards'), 0) AS tier_rewards,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_promotions'), 0) AS promotions,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_referrals'), 0) AS referrals,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_acquiring'), 0) AS operator_acquiring,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_dividends'), 0) AS dividends,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_acquiring'), 0) AS merchant_acquiring,
    count(DISTINCT a.account_id) FILTER (WHERE a.kind = 'merchant_acquiring') AS acquirers,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_issued' AND a.owner_id = t.merchant_id), 0) AS issued_own,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_issued'), 0) AS issued_any,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_fees' AND a.owner_id = t.merchant_id), 0) AS fees,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_vouchers' AND a.owner_id = t.merchant_id), 0) AS held_own,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_vouchers'), 0) AS held_any,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_redeemed' AND a.asset_code = 'VOUCHERS'), 0)
        AS store_vouchers,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_redeemed' AND a.asset_code = 'VOUCHERS'
                                     AND a.owner_id = t.merchant_id), 0) AS store_vouchers_own,
    count(DISTINCT a.account_id) FILTER (WHERE a.kind = 'merchant_redeemed' AND a.asset_code = 'VOUCHERS') AS stores,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_fee_revenue'), 0) AS revenue,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_merchant_match'), 0) AS merchant_match,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_points' AND a.owner_id = t.merchant_id), 0)
        AS merchant_points_own,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_points'), 0) AS merchant_points_any,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_signup_bonuses'), 0) AS signup_bonuses,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_fan_rewards'), 0) AS fan_rewards,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_voucher_credit' AND a.owner_id = t.merchant_id), 0)
        AS merchant_credit_own,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_voucher_credit'), 0) AS merchant_credit_any,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'promoter_commissions'), 0) AS commissions,
    count(DISTINCT a.account_id) FILTER (WHERE a.kind = 'promoter_commissions') AS promoters,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'regional_agent_shares'), 0) AS agent_shares,
    count(DISTINCT a.account_id) FILTER (WHERE a.kind = 'regional_agent_shares') AS agents,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_adjustments'), 0) AS adjustments,
    coalesce(sum(e.amount) FILTER (WHERE a.kind = 'operator_transfer_fees'), 0) AS transfer_fees,
    count(e.entry_id) FILTER (WHERE NOT coalesce(a.kind || '/' || a.asset_code = ANY({allowed}), false)) AS stray,
    string_agg(coalesce(a.kind || ':' || a.owner_id || ' ' || a.asset_code, 'account ' || e.account_id) || ' '
               || e.amount, ', ' ORDER BY e.entry_id) AS entries"""
# the legs of the transaction row aliased t (migration 0022) as _SHAPE_SUMS reads them, entry_id their
# ordinal (their order within the transaction, as the entries view's)
_LEGS = "unnest(t.leg_accounts, t.leg_amounts) WITH ORDINALITY AS e(account_id, amount, entry_id)"
# the grants of the earn_rules row aliased r: (promotion_id, sponsor_id, amount numeric); a malformed
# grants value yields no row here and is reported by its own check
_GRANTS = """(SELECT g->>0 AS promotion_id, g->>1 AS sponsor_id,
                     CASE WHEN jsonb_typeof(g->2) = 'number' THEN (g->>2)::numeric END AS amount
              FROM jsonb_array_elements(CASE WHEN jsonb_typeof(r.grants) = 'array' THEN r.grants
                                             ELSE '[]'::jsonb END) g
              WHERE jsonb_typeof(g) = 'array')"""
_EARN_ALLOWED = (
    "member/POINTS",
    "merchant_issued/POINTS",
    "operator_tier_rewards/POINTS",
    "operator_promotions/POINTS",
    *_POINTS_FEES,
)


def _sql_text_array(values) -> str:
    """A constant text[] literal from the code's own names (never from input)."""
    require(all(v.replace("_", "").replace("/", "").isalnum() for v in values), f"not a plain name: {values}")
    return "ARRAY[" + ", ".join(f"'{v}'" for v in values) + "]::text[]"


async def _id_discrepancies(fetch, report) -> list[str]:
    """No id is handed out twice: every id is at or below ledger_writer's high-water marks (so the next
    one handed out is new), an authorization id names one authorization wherever it appears (holds,
    voucher_holds, the transactions that capture it), and an authorization is captured at most once."""
    problems: list[str] = []
    report("every id is at or below ledger_writer's high-water marks")
    for r in await fetch(
        f"SELECT w.last_transaction_id AS t, w.last_authorization_id AS a, {_LARGEST_IDS} FROM ledger_writer w"
    ):
        if r["largest_transaction"] > r["t"]:
            problems.append(
                f"transaction id {r['largest_transaction']} is above the high-water mark {r['t']}: "
                "the service would hand it out again"
            )
        if r["largest_authorization"] > r["a"]:
            problems.append(
                f"authorization id {r['largest_authorization']} is above the high-water mark "
                f"{r['a']}: the service would hand it out again"
            )
    report("an authorization id names one authorization in holds, voucher_holds and its captures")
    for r in await fetch("""SELECT v.authorization_id AS id, 'a points hold and a voucher hold of different '
                                   || 'merchants, members or points' AS what
                              FROM voucher_holds v JOIN holds h USING (authorization_id)
                              WHERE h.merchant_id <> v.merchant_id OR h.member_id <> v.member_id
                                 OR h.amount <> v.points
                            UNION ALL
                            SELECT v.authorization_id, 'a voucher hold of ' || v.points
                                   || ' points with no points hold'
                              FROM voucher_holds v
                              WHERE v.points > 0 AND NOT EXISTS
                                    (SELECT 1 FROM holds h WHERE h.authorization_id = v.authorization_id)
                            UNION ALL
                            SELECT t.authorization_id, 'transaction ' || t.transaction_id
                                   || ' names it for another merchant or member, or it does not exist'
                              FROM transactions t
                              WHERE t.authorization_id IS NOT NULL AND NOT EXISTS
                                    (SELECT 1 FROM holds h WHERE h.authorization_id = t.authorization_id
                                        AND h.merchant_id = t.merchant_id AND h.member_id = t.member_id
                                     UNION ALL
                                     SELECT 1 FROM voucher_holds v WHERE v.authorization_id = t.authorization_id
                                        AND v.merchant_id = t.merchant_id AND v.member_id = t.member_id)
                            UNION ALL
                            SELECT authorization_id, count(*) || ' transactions capture it'
                              FROM transactions WHERE authorization_id IS NOT NULL
                              GROUP BY authorization_id HAVING count(*) > 1
                            LIMIT 5"""):
        problems.append(f"authorization {r['id']}: {r['what']}")
    return problems


async def _program_discrepancies(fetch, report) -> list[str]:
    """The checks docs/RULES.md adds to reconcile: account signs and assets, the earn records, promotion
    budgets, expiry lots and the shapes of transaction kinds 6..15. Each lists at most 5 examples."""
    problems: list[str] = []
    report(
        "every account's balance keeps its kind's sign (members, redeemed, acquiring, merchants' vouchers, "
        "fee revenue, breakage >= 0; issued, fees, the operator's issuing accounts, voucher credit <= 0)"
    )
    positive = [kind for kind, sign in ACCOUNT_SIGNS.items() if sign > 0]
    negative = [kind for kind, sign in ACCOUNT_SIGNS.items() if sign < 0]
    for r in await fetch(
        """WITH t AS MATERIALIZED (
                                SELECT l.account_id, sum(l.amount) AS delta
                                FROM (SELECT unnest(x.leg_accounts) AS account_id, unnest(x.leg_amounts) AS amount
                                      FROM transactions x, balance_checkpoint c
                                      WHERE x.transaction_id > c.through_transaction_id) l
                                GROUP BY l.account_id)
                              SELECT a.kind, a.owner_id, a.asset_code, a.balance + coalesce(t.delta, 0) AS balance
                              FROM accounts a LEFT JOIN t USING (account_id)
                              WHERE (a.kind = ANY($1::text[]) AND a.balance + coalesce(t.delta, 0) < 0)
                                 OR (a.kind = ANY($2::text[]) AND a.balance + coalesce(t.delta, 0) > 0)
                              ORDER BY a.account_id LIMIT 5""",
        positive,
        negative,
    ):
        bound = "below" if r["balance"] < 0 else "above"
        problems.append(
            f"account {r['kind']}:{r['owner_id']} {r['asset_code']} balance {r['balance']}: "
            f"a {r['kind']} account never goes {bound} 0"
        )

    report("every account's kind is known and holds an asset its kind may hold")
    allowed = [f"{kind}/{asset}" for kind, assets in rules.ACCOUNT_ASSETS.items() for asset in sorted(assets)]
    for r in await fetch(
        """SELECT kind, owner_id, asset_code FROM accounts
                              WHERE NOT (kind || '/' || asset_code = ANY($1::text[]))
                              ORDER BY account_id LIMIT 5""",
        allowed,
    ):
        assets = rules.ACCOUNT_ASSETS.get(r["kind"])
        problems.append(
            f"account {r['kind']}:{r['owner_id']} holds {r['asset_code']}, which "
            + (
                f"a {r['kind']} account may not hold (only {', '.join(sorted(assets))})"
                if assets
                else f"no account may hold: {r['kind']!r} is not an account kind"
            )
        )

    report(
        "every earn record (earn_rules) is a kind-1 transaction's, its grants are [[promotion, sponsor, "
        "point-units >= 0], ...], and amount = base + uplift + grants"
    )
    for row in await fetch(f"""SELECT r.transaction_id, t.kind, t.amount, r.base_point_units, r.uplift_point_units,
                                      r.grants::text AS grants, s.total, s.malformed
                               FROM earn_rules r LEFT JOIN transactions t ON t.transaction_id = r.transaction_id,
                               LATERAL (SELECT (SELECT sum(amount) FROM {_GRANTS} x) AS total,
                                               jsonb_typeof(r.grants) <> 'array' OR EXISTS (
                                                 SELECT 1 FROM jsonb_array_elements(
                                                   CASE WHEN jsonb_typeof(r.grants) = 'array' THEN r.grants
                                                        ELSE '[]'::jsonb END) g
                                                 WHERE NOT (jsonb_typeof(g) = 'array'
                                                   AND CASE WHEN jsonb_typeof(g) = 'array'
                                                            THEN jsonb_array_length(g) END = 3
                                                   AND jsonb_typeof(g->0) = 'string' AND jsonb_typeof(g->1) = 'string'
                                                   AND jsonb_typeof(g->2) = 'number'
                                                   AND CASE WHEN jsonb_typeof(g->2) = 'number' THEN
                                                       (g->>2)::numeric >= 0
                                                       AND (g->>2)::numeric = trunc((g->>2)::numeric) END))
                                                 AS malformed) s
                               WHERE t.transaction_id IS NULL OR t.kind <> 1 OR s.malformed
                                  OR t.amount <> r.base_point_units + r.uplift_point_units + coalesce(s.total, 0)
                               ORDER BY r.transaction_id LIMIT 5"""):
        t = row["transaction_id"]
        if row["kind"] is None:
            problems.append(f"earn_rules of transaction {t}, which does not exist")
        elif row["kind"] != 1:
            problems.append(f"earn_rules of transaction {t}, which is of kind {row['kind']}, not an earn (1)")
        elif row["malformed"]:
            problems.append(
                f"earn_rules of transaction {t}: grants {row['grants']} is not a list of "
                "[promotion_id, sponsor_id, point-units >= 0]"
            )
        else:
            problems.append(
                f"earn {t} credited {row['amount']} but its earn_rules make base {row['base_point_units']} "
                f"+ uplift {row['uplift_point_units']} + grants {row['total'] or 0} = "
                f"{row['base_point_units'] + row['uplift_point_units'] + (row['total'] or 0)}"
            )

    report(
        "every earn with an earn record posts it: member +amount, merchant_issued -(base + merchant-sponsored "
        "grants), operator_tier_rewards -uplift, operator_promotions -operator grants, fee entries = fee"
    )
    for r in await fetch(f"""WITH x AS (
                               SELECT t.transaction_id, t.amount, t.fee, r.base_point_units AS base,
                                      r.uplift_point_units AS uplift,
                                      (SELECT coalesce(sum(amount), 0) FROM {_GRANTS} g
                                       WHERE sponsor_id = 'operator') AS operator_grants,
                                      (SELECT coalesce(sum(amount), 0) FROM {_GRANTS} g
                                       WHERE sponsor_id <> 'operator') AS merchant_grants,
                                      (SELECT coalesce(sum(amount), 0) FROM {_GRANTS} g
                                       WHERE sponsor_id = t.merchant_id) AS own_grants,
                                      {_SHAPE_SUMS.format(allowed=_sql_text_array(_EARN_ALLOWED))}
                               FROM earn_rules r JOIN transactions t ON t.transaction_id = r.transaction_id
                                                                    AND t.kind = 1
                               LEFT JOIN LATERAL {_LEGS} ON true
                               LEFT JOIN accounts a ON a.account_id = e.account_id
                               GROUP BY t.transaction_id, r.transaction_id)
                             SELECT * FROM x
                             WHERE NOT (stray = 0 AND member_own = amount AND member_any = member_own
                                        AND issued_any = -(base + merchant_grants)
                                        AND issued_own = -(base + own_grants)
                                        AND tier_rewards = -uplift AND promotions = -operator_grants
                                        AND fees = -fee AND revenue = fee)
                             ORDER BY transaction_id LIMIT 5"""):
        problems.append(
            f"earn {r['transaction_id']} (amount {r['amount']}, base {r['base']}, uplift {r['uplift']}, "
            f"operator grants {r['operator_grants']}, merchant grants {r['merchant_grants']}, fee "
            f"{r['fee']}) does not post its earn record: entries {r['entries'] or 'none'}"
        )

    report("every promotion's granted budget (promotion_budgets) equals the points its earns granted")
    for r in await fetch(f"""WITH granted AS (
                               SELECT g.promotion_id, sum(g.amount) AS s FROM earn_rules r, LATERAL {_GRANTS} g
                               GROUP BY g.promotion_id),
                             budgets AS (
                               SELECT promotion_id, sum(granted) AS s FROM promotion_budgets GROUP BY promotion_id)
                             SELECT promotion_id, b.s AS budget, g.s AS grants
                             FROM budgets b FULL JOIN granted g USING (promotion_id)
                             WHERE coalesce(b.s, 0) <> coalesce(g.s, 0) ORDER BY promotion_id LIMIT 5"""):
        problems.append(
            f"promotion {r['promotion_id']}: promotion_budgets says {r['budget'] or 0} granted, its "
            f"earns' grants sum to {r['grants'] or 0}"
        )

    report("per member, expiring lots + pieces held by open holds <= posted POINTS")
    for r in await fetch("""WITH lotted AS (SELECT member_id, sum(amount) AS s FROM lots GROUP BY member_id),
                                  held AS (SELECT h.member_id, sum(c.amount) AS s FROM lot_consumptions c
                                           JOIN holds h ON c.owner_kind = 1 AND h.authorization_id = c.owner_id
                                           WHERE h.status = 1 GROUP BY h.member_id),
                                  m AS (SELECT member_id, coalesce(l.s, 0) AS lots, coalesce(h.s, 0) AS held
                                        FROM lotted l FULL JOIN held h USING (member_id))
                              SELECT m.member_id, m.lots, m.held, coalesce(b.balance, 0) AS posted
                              FROM m LEFT JOIN account_balances b
                                ON b.kind = 'member' AND b.asset_code = 'POINTS' AND b.owner_id = m.member_id
                              WHERE m.lots + m.held > coalesce(b.balance, 0) ORDER BY m.member_id LIMIT 5"""):
        problems.append(
            f"member {r['member_id']}: lots {r['lots']} + pieces of open holds {r['held']} > posted {r['posted']}"
        )

    report("every consumed lot piece belongs to a hold or a capture/redeem that exists, within its amount")
    for r in await fetch(
        """SELECT c.owner_kind, c.owner_id, sum(c.amount) AS pieces,
                                   coalesce(h.amount, t.amount) AS owner_amount, t.kind,
                                   h.authorization_id IS NOT NULL OR t.transaction_id IS NOT NULL AS found
                              FROM lot_consumptions c
                              LEFT JOIN holds h ON c.owner_kind = 1 AND h.authorization_id = c.owner_id
                              LEFT JOIN transactions t ON c.owner_kind = 2 AND t.transaction_id = c.owner_id
                              GROUP BY c.owner_kind, c.owner_id, h.authorization_id, h.amount, t.transaction_id,
                                       t.amount, t.kind
                              HAVING (h.authorization_id IS NULL AND t.transaction_id IS NULL)
                                  OR (c.owner_kind = 2 AND NOT t.kind = ANY($1::smallint[]))
                                  OR sum(c.amount) > coalesce(h.amount, t.amount)
                              ORDER BY c.owner_kind, c.owner_id LIMIT 5""",
        _CONSUMING_KINDS,
    ):
        owner = ("hold" if r["owner_kind"] == 1 else "transaction") + f" {r['owner_id']}"
        if not r["found"]:
            problems.append(f"lot_consumptions of {owner}, which does not exist")
        elif r["owner_kind"] == 2 and r["kind"] not in _CONSUMING_KINDS:
            problems.append(
                f"lot_consumptions of {owner}, of kind {r['kind']}: only captures, redeems and member debits "
                "(adjustments, reversals, closures, transfers) consume lots"
            )
        else:
            problems.append(f"lot_consumptions of {owner}: pieces {r['pieces']} > its amount {r['owner_amount']}")

    report(
        "every transaction of kinds 6..15"
        + "".join(f", {code}" for code in kinds.SHAPED if code > 15)
        + " has its kind's entries (expiry to breakage, tier and referral "
        "bonuses from their operator accounts, acquiring between operator_acquiring and merchant_acquiring, ...)"
    )
    allowed_case = (
        "CASE t.kind "
        + " ".join(f"WHEN {kind} THEN {_sql_text_array(shape.accounts)}" for kind, shape in kinds.SHAPED.items())
        + " ELSE NULL END"
    )
    shape_case = (
        "CASE kind "
        + " ".join(f"WHEN {kind} THEN stray = 0 AND ({shape.condition})" for kind, shape in kinds.SHAPED.items())
        + " ELSE true END"
    )
    for r in await fetch(
        f"""WITH x AS MATERIALIZED (
                               SELECT t.transaction_id, t.kind, t.amount, t.fee, t.member_id, t.merchant_id,
                                      {_SHAPE_SUMS.format(allowed=allowed_case)}
                               FROM transactions t
                               LEFT JOIN LATERAL {_LEGS} ON true
                               LEFT JOIN accounts a ON a.account_id = e.account_id
                               WHERE t.kind = ANY($1::smallint[])
                               GROUP BY t.transaction_id)
                             SELECT * FROM x WHERE NOT ({shape_case}) ORDER BY transaction_id LIMIT 5""",
        sorted(kinds.SHAPED),
    ):
        shape = kinds.SHAPED[r["kind"]].description
        problems.append(
            f"transaction {r['transaction_id']} of kind {r['kind']} (amount {r['amount']}, member "
            f"{r['member_id']}, merchant {r['merchant_id']}) should move {shape}; its entries: "
            f"{r['entries'] or 'none'}"
        )

    report(
        "the acquiring rewards merchants are owed (merchant_acquiring) = what the operator paid (-operator_acquiring)"
    )
    totals = (
        await fetch("""SELECT coalesce(sum(balance) FILTER (WHERE kind = 'merchant_acquiring'), 0) AS owed,
                                    coalesce(sum(balance) FILTER (WHERE kind = 'operator_acquiring'), 0) AS paid
                             FROM account_balances WHERE asset_code = 'POINTS'""")
    )[0]
    if totals["owed"] != -totals["paid"]:
        problems.append(
            f"merchants are owed {totals['owed']} point-units of acquiring rewards, the operator paid {-totals['paid']}"
        )

    report("the points merchants hold (merchant_points) = what the operator matched (-operator_merchant_match)")
    totals = (
        await fetch("""SELECT coalesce(sum(balance) FILTER (WHERE kind = 'merchant_points'), 0) AS held,
                              coalesce(sum(balance) FILTER (WHERE kind = 'operator_merchant_match'), 0) AS matched
                       FROM account_balances WHERE asset_code = 'POINTS'""")
    )[0]
    if totals["held"] != -totals["matched"]:
        problems.append(
            f"merchants hold {totals['held']} point-units of matched points, the operator matched {-totals['matched']}"
        )
    return problems


# one encoder for every call: json.dumps with arguments builds a new JSONEncoder each time (measured:
# a tenth of the service's CPU under SubmitBatch load went to to_json)


# --- reconcile: member administration (issue 15; processor/member_postings.py) -----------------------


async def _member_admin_discrepancies(fetch, report) -> list[str]:
    """Every adjustment has its record with the points it moved; every reversal is the exact mirror of its
    original (per account and asset) and recorded once; every closed member holds nothing."""
    problems: list[str] = []
    report("every adjustment (kinds 16, 17) has its member_adjustments row with the points it moved")
    for r in await fetch(
        """SELECT t.transaction_id, t.kind, a.points, coalesce(m.points, 0) AS moved
           FROM transactions t
           LEFT JOIN member_adjustments a USING (transaction_id)
           LEFT JOIN LATERAL (
               SELECT sum(e.amount) AS points FROM entries e JOIN accounts c USING (account_id)
               WHERE e.transaction_id = t.transaction_id AND c.kind = 'member' AND c.owner_id = t.member_id) m ON true
           WHERE t.kind = ANY($1::smallint[]) AND (a.points IS NULL OR a.points <> coalesce(m.points, 0))
           UNION ALL
           SELECT a.transaction_id, t.kind, a.points, NULL FROM member_adjustments a
           LEFT JOIN transactions t USING (transaction_id)
           WHERE t.kind IS NULL OR NOT t.kind = ANY($1::smallint[])
           LIMIT 5""",
        [kinds.KIND_ADJUSTMENT_CREDIT, kinds.KIND_ADJUSTMENT_DEBIT],
    ):
        problems.append(
            f"adjustment {r['transaction_id']} (kind {r['kind']}) records {r['points']} point-units, "
            f"its entries move {r['moved']} on its member"
        )
    report("every reversal (kinds 18, 19) mirrors its original's entries exactly and is recorded once")
    reversals = [kinds.KIND_REVERSAL_CREDIT, kinds.KIND_REVERSAL_DEBIT]
    for r in await fetch(
        """WITH r AS (SELECT transaction_id, original_transaction_id FROM transactions WHERE kind = ANY($1::smallint[])),
                mine AS (SELECT r.transaction_id, e.account_id, e.asset_code, sum(e.amount) AS s
                         FROM r JOIN entries e ON e.transaction_id = r.transaction_id GROUP BY 1, 2, 3),
                mirror AS (SELECT r.transaction_id, e.account_id, e.asset_code, -sum(e.amount) AS s
                           FROM r JOIN entries e ON e.transaction_id = r.original_transaction_id GROUP BY 1, 2, 3)
           SELECT DISTINCT transaction_id FROM mine FULL JOIN mirror USING (transaction_id, account_id, asset_code)
           WHERE coalesce(mine.s, 0) <> coalesce(mirror.s, 0)
           UNION
           SELECT t.transaction_id FROM transactions t
           LEFT JOIN member_reversals v ON v.reversal_transaction_id = t.transaction_id
           WHERE t.kind = ANY($1::smallint[])
             AND (v.original_transaction_id IS DISTINCT FROM t.original_transaction_id)
           UNION
           SELECT v.reversal_transaction_id FROM member_reversals v
           LEFT JOIN transactions t ON t.transaction_id = v.reversal_transaction_id
           WHERE t.kind IS NULL OR NOT t.kind = ANY($1::smallint[])
           ORDER BY 1 LIMIT 5""",
        reversals,
    ):
        problems.append(
            f"reversal {r['transaction_id']} is not the recorded, exact mirror of its original transaction's entries"
        )
    report("no transaction is both reversed and refunded; an earn is reversed with everything it set off")
    for r in await fetch(
        """SELECT v.original_transaction_id AS t, 'is reversed and refunded' AS what
           FROM member_reversals v JOIN transactions o ON o.transaction_id = v.original_transaction_id
           WHERE o.refunded > 0 OR EXISTS (SELECT 1 FROM transactions x
                                           WHERE x.original_transaction_id = o.transaction_id
                                             AND x.kind = ANY($1::smallint[]))
           UNION ALL
           SELECT x.transaction_id, 'was set off by reversed earn ' || v.original_transaction_id || ', not reversed'
           FROM member_reversals v JOIN transactions x ON x.original_transaction_id = v.original_transaction_id
                                                      AND x.kind = ANY($2::smallint[])
           WHERE NOT EXISTS (SELECT 1 FROM member_reversals w WHERE w.original_transaction_id = x.transaction_id)
           ORDER BY 1 LIMIT 5""",
        list(member_store.REFUND_KINDS),
        list(member_store.TIED_KINDS),
    ):
        problems.append(f"transaction {r['t']} {r['what']}")
    # member_history shows a transfer to its receiver and a merge to its target through these rows: a row
    # naming another member than the entries credit shows the points in the wrong member's history
    report("every transfer (kind 21) and merge (kind 22) has its row naming the members, points and fee it moved")
    for r in await fetch(
        """WITH t AS (SELECT transaction_id, kind, member_id, amount, fee FROM transactions
                      WHERE kind = ANY($1::smallint[])),
                credited AS (SELECT t.transaction_id, min(c.owner_id) AS owner_id, count(*) AS n
                             FROM t JOIN entries e USING (transaction_id)
                             JOIN accounts c ON c.account_id = e.account_id AND c.kind = 'member'
                                              AND c.asset_code = 'POINTS'
                             WHERE e.amount > 0 GROUP BY 1)
           SELECT t.transaction_id FROM t LEFT JOIN credited USING (transaction_id)
           LEFT JOIN member_transfers x ON x.transaction_id = t.transaction_id
           LEFT JOIN member_merges m ON m.transaction_id = t.transaction_id
           WHERE CASE WHEN t.kind = $2
                      THEN x.transaction_id IS NULL OR x.from_member_id <> t.member_id OR x.points <> t.amount
                           OR x.fee <> t.fee
                           OR x.to_member_id IS DISTINCT FROM coalesce(credited.owner_id, x.to_member_id)
                           OR coalesce(credited.n, 0) > 1
                      ELSE m.transaction_id IS NULL OR m.source_member_id <> t.member_id OR m.points <> t.amount
                           OR m.target_member_id IS DISTINCT FROM coalesce(credited.owner_id, m.target_member_id)
                           OR coalesce(credited.n, 0) > 1 END
           UNION
           SELECT x.transaction_id FROM member_transfers x LEFT JOIN t USING (transaction_id)
           WHERE t.kind IS DISTINCT FROM $2
           UNION
           SELECT m.transaction_id FROM member_merges m LEFT JOIN t USING (transaction_id)
           WHERE m.transaction_id IS NOT NULL AND t.kind IS DISTINCT FROM $3
           ORDER BY 1 LIMIT 5""",
        [kinds.KIND_TRANSFER, kinds.KIND_MERGE],
        kinds.KIND_TRANSFER,
        kinds.KIND_MERGE,
    ):
        problems.append(
            f"transfer or merge {r['transaction_id']} is not recorded (member_transfers, member_merges) as its "
            "entries moved it"
        )
    # A merchant may still refund a redemption of a member closed since (a refund names the transaction,
    # not the member): those credits are the only points a closed member may hold.
    report("every closed member holds no open hold and no points but refunds of its redemptions since")
    for r in await fetch(
        """SELECT s.member_id, coalesce(b.balance, 0) AS balance,
                  (SELECT count(*) FROM holds h WHERE h.member_id = s.member_id AND h.status = 1
                                                  AND h.expires_at > now()) AS holds
           FROM member_status s
           LEFT JOIN account_balances b ON b.kind = 'member' AND b.owner_id = s.member_id AND b.asset_code = 'POINTS'
           WHERE s.state = 'closed'
             AND (coalesce(b.balance, 0) <> coalesce(
                      (SELECT sum(e.amount) FROM transactions t JOIN entries e USING (transaction_id)
                       WHERE t.member_id = s.member_id AND t.kind IN (4, 13) AND t.created_at >= s.closed_at
                         AND e.account_id = b.account_id), 0)
                  OR EXISTS (SELECT 1 FROM holds h WHERE h.member_id = s.member_id
                             AND h.status = 1 AND h.expires_at > now()))
           LIMIT 5"""
    ):
        problems.append(f"closed member {r['member_id']} holds {r['balance']} point-units and {r['holds']} open holds")
    return problems
