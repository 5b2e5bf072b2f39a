"""Appends a long history to a seeded network, in SQL, as months of traffic would leave the journal.

    python -m processor seed --database-url URL                          # 50,000 merchants, 1,000,000 members
    python -m loadtest.journal --database-url URL --transactions 9000000 [--tail 200000]
    python -m loadtest.journal --database-url URL --transactions 0 --tail 200000   # only move the checkpoint

For start-up and memory measurements at 10M+ journal rows (loadtest/scale.py --restart-only). Each chunk
(--chunk transactions, one Postgres transaction, generate_series) writes:

  * transactions: 70% earns, 30% redeems, over the seeded members and active merchants, both skewed
    (index 1 + floor(n * random()^2): the first members and merchants are the busiest). In every block
    of ten consecutive ids, positions 0-6 are earns and positions 7-9 redeem at most what the earn seven
    ids earlier credited to the same member, so no member's balance is negative at any prefix of the
    journal (which is what a checkpoint anywhere needs);
  * their balanced entries, as the pipeline writes them: earn member +x, merchant_issued -x; redeem
    member -x, merchant_redeemed +x; the operator's fee (merchant_fees -f, operator_fee_revenue +f)
    where the merchant's fee schedule gives one (floor(points * bps / 10000), 0 posts nothing);
  * one idempotency record per transaction (key 'journal-<id>', the request and response JSON the
    service stores; the response's balance is the operation's points, not the member's running
    balance), unless --no-idempotency;
  * accounts.balance and balance_checkpoint moved past the chunk (the chunk's entries folded in).

created_at grows with transaction_id: each chunk spreads its rows between the newest created_at (or
settlement cut) so far and the wall clock when the chunk starts, so no row falls in a closed period and
the service's next batch (dated now) is never older.

At the end the checkpoint is placed --tail transactions before the newest one (entries after it
subtracted from accounts.balance again), so the next start of the service replays that tail; a
graceful stop of the service folds it again. The tool holds the service's writer lock throughout (no
service may run), then VACUUM ANALYZEs the tables it wrote (what autovacuum would do) and runs the
store's reconciliation over the whole ledger, with the time of each step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

MEMBER_PREFIX = "seed-u-"
MERCHANT_PREFIX = "seed-m-"
COMMAND_TIMEOUT = 6 * 3600.0  # a chunk, VACUUM or a reconcile check at 10M+ rows takes minutes


def _say(text: str) -> None:
    print(text, flush=True)


async def _prepare_maps(c) -> tuple[int, int]:
    """Session temp tables numbering the seeded members (with account ids) and the active seeded
    merchants (with rates and account ids) 1..n; returns (members, merchants)."""
    await c.execute("DROP TABLE IF EXISTS journal_members, journal_merchants")
    await c.execute(
        """CREATE TEMP TABLE journal_members AS
           SELECT (row_number() OVER (ORDER BY owner_id))::int AS no, owner_id AS member_id, account_id
           FROM accounts WHERE kind = 'member' AND asset_code = 'POINTS' AND owner_id LIKE $1""",
        MEMBER_PREFIX + "%",
    )
    await c.execute("ALTER TABLE journal_members ADD PRIMARY KEY (no)")
    await c.execute(
        """CREATE TEMP TABLE journal_merchants AS
           SELECT (row_number() OVER (ORDER BY m.merchant_slot))::int AS no, m.merchant_id, m.give_back_bps,
                  m.fee_redeemed_bps, m.fee_issued_bps,
                  i.account_id AS issued_account_id, r.account_id AS redeemed_account_id,
                  f.account_id AS fees_account_id
           FROM merchants m
           JOIN accounts i ON i.kind = 'merchant_issued' AND i.owner_id = m.merchant_id AND i.asset_code = 'POINTS'
           JOIN accounts r ON r.kind = 'merchant_redeemed' AND r.owner_id = m.merchant_id AND r.asset_code = 'POINTS'
           JOIN accounts f ON f.kind = 'merchant_fees' AND f.owner_id = m.merchant_id AND f.asset_code = 'POINTS'
           WHERE m.merchant_id LIKE $1 AND m.status = 'active'""",
        MERCHANT_PREFIX + "%",
    )
    await c.execute("ALTER TABLE journal_merchants ADD PRIMARY KEY (no)")
    await c.execute("ANALYZE journal_members")
    await c.execute("ANALYZE journal_merchants")
    members = await c.fetchval("SELECT count(*) FROM journal_members")
    merchants = await c.fetchval("SELECT count(*) FROM journal_merchants")
    return members, merchants


async def _append_chunk(
    c, count: int, members: int, merchants: int, fee_account: int, idempotency: bool
) -> tuple[int, int, dict[str, float]]:
    """Appends `count` transactions in the connection's open transaction and folds them into the
    balances and the checkpoint; returns (first id, last id, seconds per step)."""
    steps: dict[str, float] = {}
    began = time.monotonic()

    def step(name: str) -> None:
        nonlocal began
        now = time.monotonic()
        steps[name] = now - began
        began = now

    # the ids are handed out here, under the writer lock: the high-water mark moves in the same transaction
    first = await c.fetchval("SELECT last_transaction_id + 1 FROM ledger_writer FOR UPDATE")
    await c.execute("UPDATE ledger_writer SET last_transaction_id = $1", first + count - 1)
    # created_at: spread between the newest so far and now (now() is this transaction's start)
    await c.execute(
        """CREATE TEMP TABLE journal_draw ON COMMIT DROP AS
           WITH d AS (
             SELECT g, (g - 1) % 10 >= 7 AS redeem,
                    1 + floor($2 * random() ^ 2)::int AS member_no,
                    1 + floor($3 * random() ^ 2)::int AS merchant_no,
                    100 + floor(random() * 49901)::bigint AS purchase,
                    random() AS share
             FROM generate_series(1, $1) g),
           e AS (
             SELECT d.g, d.redeem, d.member_no, d.share, d.purchase, m.merchant_id, m.give_back_bps,
                    m.fee_redeemed_bps,
                    m.fee_issued_bps, m.issued_account_id, m.redeemed_account_id, m.fees_account_id,
                    d.purchase * m.give_back_bps / 10000 AS earned
             FROM d JOIN journal_merchants m ON m.no = d.merchant_no),
           p AS (
             -- a redeem takes the member of the earn seven ids earlier, and at most what it earned
             SELECT e.*, lag(e.member_no, 7) OVER w AS earn_member_no, lag(e.earned, 7) OVER w AS earn_points
             FROM e WINDOW w AS (ORDER BY e.g))
           SELECT g, redeem, merchant_id, give_back_bps, issued_account_id, redeemed_account_id, fees_account_id,
                  CASE WHEN redeem THEN earn_member_no ELSE member_no END AS member_no,
                  CASE WHEN redeem THEN NULL ELSE purchase END AS purchase_amount,
                  a.amount,
                  a.amount * CASE WHEN redeem THEN fee_redeemed_bps ELSE fee_issued_bps END / 10000 AS fee
           FROM p, LATERAL (SELECT CASE WHEN redeem THEN 1 + floor((earn_points - 1) * share)::bigint
                                        ELSE earned END AS amount) a""",
        count,
        members,
        merchants,
    )
    await c.execute(
        """CREATE TEMP TABLE journal_chunk ON COMMIT DROP AS
           SELECT $1::bigint + d.g - 1 AS transaction_id, CASE WHEN d.redeem THEN 3 ELSE 1 END::smallint AS kind,
                  d.merchant_id, d.give_back_bps, u.member_id, u.account_id AS member_account_id, d.issued_account_id,
                  d.redeemed_account_id, d.fees_account_id, d.amount, d.purchase_amount, d.fee,
                  t0.at + (now() - t0.at) * (d.g::float8 / $2) AS created_at
           FROM journal_draw d JOIN journal_members u ON u.no = d.member_no,
                -- never inside a closed settlement period
                (SELECT greatest((SELECT max(created_at) FROM transactions),
                                 (SELECT max(cut_off) FROM settlement_periods)) AS at) t0""",
        first,
        count,
    )
    step("draw")
    await c.execute(
        # each transaction's legs in its row (migration 0022), in the pipeline's order, zero legs left out
        """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                     purchase_amount, idempotency_key, created_at, fee, leg_accounts, leg_amounts)
           SELECT j.transaction_id, j.kind, j.merchant_id, j.member_id, 'POINTS', j.amount, j.purchase_amount,
                  'journal-' || j.transaction_id, j.created_at, j.fee, coalesce(l.accounts, '{}'),
                  coalesce(l.amounts, '{}')
           FROM journal_chunk j,
                LATERAL (SELECT array_agg(x.account_id ORDER BY x.n) AS accounts,
                                array_agg(x.amount ORDER BY x.n) AS amounts
                         FROM (VALUES (1, j.member_account_id, CASE WHEN j.kind = 1 THEN j.amount ELSE -j.amount END),
                                      (2, CASE WHEN j.kind = 1 THEN j.issued_account_id ELSE j.redeemed_account_id END,
                                          CASE WHEN j.kind = 1 THEN -j.amount ELSE j.amount END),
                                      (3, j.fees_account_id, -j.fee),
                                      (4, $1::bigint, j.fee)) x(n, account_id, amount)
                         WHERE x.amount <> 0) l
           ORDER BY j.transaction_id""",
        fee_account,
    )
    step("transactions")
    if idempotency:
        await c.execute(
            # one idempotency_batches row per 1,000 transactions, as the service's batches write them
            # (migration 0023), under negative batch ids (no batch_log row has them)
            """INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
               SELECT (SELECT least(min(batch_id), 0) FROM idempotency_batches) - row_number() OVER (ORDER BY g),
                      max(created_at), count(*),
                      convert_to(json_build_array(json_agg(merchant_id ORDER BY transaction_id),
                                                  json_agg('journal-' || transaction_id ORDER BY transaction_id))::text,
                                 'UTF8'),
                      convert_to(json_build_array(json_agg(method ORDER BY transaction_id),
                                                  json_agg(request ORDER BY transaction_id),
                                                  json_agg('OK'::text),
                                                  json_agg(response ORDER BY transaction_id),
                                                  json_agg(''::text))::text, 'UTF8')
               FROM (SELECT transaction_id, transaction_id / 1000 AS g, merchant_id, created_at,
                            CASE WHEN kind = 1 THEN 'Earn' ELSE 'Redeem' END AS method,
                            CASE WHEN kind = 1
                                 THEN jsonb_build_object('member_id', member_id, 'purchase_amount', purchase_amount)
                                 ELSE jsonb_build_object('member_id', member_id, 'points', amount) END::json AS request,
                            CASE WHEN kind = 1
                                 THEN jsonb_build_object('transaction_id', transaction_id, 'points', amount,
                                                         'balance', amount, 'give_back_bps', give_back_bps,
                                                         'created_at_us',
                                                         (extract(epoch FROM created_at) * 1000000)::bigint)
                                 ELSE jsonb_build_object('transaction_id', transaction_id, 'points', amount,
                                                         'balance', amount, 'available', amount) END::json AS response
                     FROM journal_chunk) j
               GROUP BY g"""
        )
        step("idempotency_batches")
    last = first + count - 1
    await c.execute(
        """UPDATE accounts a SET balance = a.balance + d.delta
           FROM (SELECT account_id, sum(amount)::bigint AS delta
                 FROM (SELECT unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount FROM transactions
                       WHERE transaction_id BETWEEN $1 AND $2) l
                 GROUP BY account_id) d
           WHERE a.account_id = d.account_id AND d.delta <> 0""",
        first,
        last,
    )
    moved = await c.execute(
        """UPDATE balance_checkpoint SET through_transaction_id = $2, written_at = now()
           WHERE through_transaction_id = $1 - 1""",
        first,
        last,
    )
    if moved != "UPDATE 1":
        raise RuntimeError("the balance checkpoint was not at the newest transaction before the chunk")
    step("balances")
    return first, last, steps


async def set_tail(c, tail: int) -> tuple[int, int, int]:
    """Places the balance checkpoint `tail` transactions (by id) before the newest one, folding or
    unfolding the entries in between, in one transaction. The caller holds the writer lock.
    Returns (checkpoint before, checkpoint after, newest transaction id)."""
    async with c.transaction():
        before = await c.fetchval("SELECT through_transaction_id FROM balance_checkpoint FOR UPDATE")
        newest = await c.fetchval("SELECT coalesce(max(transaction_id), 0) FROM transactions")
        after = max(0, newest - tail)
        low, high, sign = (before, after, 1) if after > before else (after, before, -1)
        if low != high:
            await c.execute(
                """UPDATE accounts a SET balance = a.balance + $3 * d.delta
                   FROM (SELECT account_id, sum(amount)::bigint AS delta
                         FROM (SELECT unnest(leg_accounts) AS account_id, unnest(leg_amounts) AS amount
                               FROM transactions WHERE transaction_id > $1 AND transaction_id <= $2) l
                         GROUP BY account_id) d
                   WHERE a.account_id = d.account_id AND d.delta <> 0""",
                low,
                high,
                sign,
            )
            await c.execute("UPDATE balance_checkpoint SET through_transaction_id = $1, written_at = now()", after)
    return before, after, newest


async def place_tail(url: str, tail: int) -> tuple[int, int, int]:
    """set_tail on the database at `url`, under the writer lock (no service may be running)."""
    from processor.store import Store

    store = await Store.open(url, 1, command_timeout=COMMAND_TIMEOUT)
    try:
        await store.acquire_writer_lock()
        try:
            async with store.pool.acquire() as c:
                return await set_tail(c, tail)
        finally:
            await store.release_writer_lock()
    finally:
        await store.close()


async def _sizes(c) -> str:
    rows = await c.fetch(
        """SELECT relname, n_live_tup FROM pg_stat_user_tables
           WHERE relname IN ('transactions', 'entries', 'idempotency_batches', 'accounts', 'members')
           ORDER BY relname"""
    )
    size = await c.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    return ", ".join(f"{r['relname']} ~{r['n_live_tup']:,}" for r in rows) + f"; database {size}"


async def _reconcile(store, settings: list[str]) -> list[str]:
    """The store's ledger_discrepancies, each check timed; on a pool with the given server settings
    (NAME=VALUE) if any, e.g. enable_nestloop=off against a plan that never finishes at 10M rows."""
    began = time.monotonic()
    if settings:
        import asyncpg
        from processor.store import APPLICATION_NAME, Store

        server_settings = dict(item.split("=", 1) for item in settings)
        _say(f"reconcile with server settings {server_settings}")
        pool = await asyncpg.create_pool(
            store.url,
            min_size=1,
            max_size=1,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={"application_name": APPLICATION_NAME, **server_settings},
        )
        store = Store(pool, store.url, connect_timeout=COMMAND_TIMEOUT)
    try:

        def report(check: str) -> None:
            _say(f"  [{time.monotonic() - began:6.1f} s] checking: {check}")

        problems = await store.ledger_discrepancies(report=report)
    finally:
        if settings:
            await store.pool.close()
    _say(f"  [{time.monotonic() - began:6.1f} s] done")
    return problems


async def run(args: argparse.Namespace) -> int:
    from processor.store import Store

    store = await Store.open(args.database_url, 2, command_timeout=COMMAND_TIMEOUT)
    total_began = time.monotonic()
    try:
        await store.migrate()
        await store.acquire_writer_lock()
        try:
            async with store.pool.acquire() as c:
                await c.execute(f"SET work_mem = '{args.work_mem}'")
                async with c.transaction():
                    await store.fold_checkpoint(c)  # a service's unfolded tail, if any
                members, merchants = await _prepare_maps(c) if args.transactions else (0, 0)
                if args.transactions and (members < 8 or merchants < 1):
                    _say(
                        f"error: the database has {members} seeded members and {merchants} active seeded "
                        "merchants; run `python -m processor seed --database-url URL` first"
                    )
                    return 2
                fee_account = await c.fetchval(
                    "SELECT account_id FROM accounts WHERE kind = 'operator_fee_revenue' AND owner_id = 'operator' "
                    "AND asset_code = 'POINTS'"
                )
                if args.transactions:
                    _say(
                        f"appending {args.transactions:,} transactions over {members:,} members and {merchants:,} "
                        f"merchants, {args.chunk:,} per chunk"
                        f"{'' if args.idempotency else ', without idempotency records'}"
                    )
                appended, began = 0, time.monotonic()
                while appended < args.transactions:
                    count = min(args.chunk, args.transactions - appended)
                    chunk_began = time.monotonic()
                    async with c.transaction():
                        first, last, steps = await _append_chunk(
                            c, count, members, merchants, fee_account, args.idempotency
                        )
                    appended += count
                    elapsed = time.monotonic() - began
                    _say(
                        f"  transactions {first:,}..{last:,}: {time.monotonic() - chunk_began:.1f} s ("
                        + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
                        + f"); {appended:,}/{args.transactions:,} in {elapsed:.0f} s, "
                        f"{appended / elapsed:,.0f} transactions/s"
                    )
                append_seconds = time.monotonic() - began
                if args.transactions:
                    _say(f"appended {appended:,} transactions in {append_seconds:.1f} s")
                before, after, newest = await set_tail(c, args.tail)
                _say(
                    f"balance checkpoint through transaction {after:,} of {newest:,} "
                    f"(tail {newest - after:,} transactions; was {before:,})"
                )
                await c.execute("DROP TABLE IF EXISTS journal_members, journal_merchants")
                if args.vacuum and args.transactions:
                    began = time.monotonic()
                    await c.execute(
                        "VACUUM (ANALYZE) transactions, accounts, idempotency_batches, "
                        "balance_checkpoint, merchants, members"
                    )
                    _say(f"VACUUM ANALYZE took {time.monotonic() - began:.1f} s")
                _say(await _sizes(c))
        finally:
            await store.release_writer_lock()
        if args.reconcile:
            reconcile_began = time.monotonic()
            problems = await _reconcile(store, args.reconcile_setting)
            _say(
                f"reconcile took {time.monotonic() - reconcile_began:.1f} s: "
                + ("every check holds" if not problems else f"DISCREPANCY: {problems[0]} ({len(problems) - 1} more)")
            )
            if problems:
                return 1
        _say(f"done in {time.monotonic() - total_began:.1f} s")
        return 0
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--transactions", type=int, required=True, help="transactions to append (0: none)")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="transactions per Postgres transaction")
    parser.add_argument(
        "--tail",
        type=int,
        default=0,
        help="leave the newest N transactions after the balance checkpoint (replayed at start-up)",
    )
    parser.add_argument(
        "--no-idempotency", dest="idempotency", action="store_false", help="write no idempotency records"
    )
    parser.add_argument(
        "--no-vacuum", dest="vacuum", action="store_false", help="skip VACUUM ANALYZE of the written tables"
    )
    parser.add_argument(
        "--no-reconcile", dest="reconcile", action="store_false", help="skip the reconciliation at the end"
    )
    parser.add_argument(
        "--reconcile-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Postgres setting for the reconcile session (repeatable), e.g. enable_nestloop=off: "
        "at 10M journal rows the planner picks a nested loop for the checkpointed-balance "
        "check (LIMIT 5 over a misestimated join) that does not finish in hours",
    )
    parser.add_argument("--work-mem", default="256MB", help="work_mem of the loading session")
    args = parser.parse_args(argv)
    if args.transactions < 0 or args.tail < 0 or args.chunk < 10:
        parser.error("--transactions and --tail must be >= 0, --chunk >= 10")
    import logging

    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
