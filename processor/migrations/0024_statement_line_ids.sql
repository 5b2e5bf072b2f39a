-- A merchant's statement lines found through ids written at the cut, not through a per-operation index
-- (issue 14; docs/DESIGN.md section 4). Every transaction row the projector wrote went into
-- transactions_merchant_hash (0021: hashtext(merchant_id), created_at, transaction_id), whose only reader
-- was Store.statement_lines, on closed periods only; it cost Postgres 3.0-6.1 µs per operation on the
-- projection (python -m loadtest.projection_write --variants base,-transactions_merchant_hash). Instead
-- Store.close_period writes, in the transaction that writes the statements and from the same pass over the
-- period's rows, the ids of each merchant's lines: once per period, not once per operation. Measured
-- (docs/DESIGN.md section 4, eighth session; ranges of runs on a loaded 2-core machine): the transactions
-- COPY of the projection -3.7 to -4.5 µs/op of Postgres CPU and -137 to -140 B/op of WAL; the cut +0.7 to
-- +2.5 s of Postgres CPU per 1M transactions of its period; a page of 100 lines 336-889 ms -> 2-12 ms.
-- At upgrade: the fill below reads each closed period's rows once (the chunks' statement alone measured
-- 2.7-3.0 s of Postgres CPU per 1M transactions), in this migration's transaction; DROP INDEX holds off
-- writes to transactions for a moment.
--
-- One row per (period, merchant, chunk): the ids in ascending order, at most a few thousand a row (the
-- service's Store.statement_line_chunk_ids_max, 2,048), so a merchant with millions of lines pages through
-- them reading (and detoasting) only the chunks of the page asked for. first_transaction_id is the
-- chunk's first id: the chunks of one merchant do not overlap, so the chunk holding the ids after x is
-- the last one starting at or before x, and those after it.
--
-- A statement's lines are what Store.statement_lines returned through the index, the union of:
--   own        its transactions (transactions.merchant_id) but the operator's postings 6..11 and the
--              channel's postings 23, 24 (channel_store.POSTING_KIND)
--   acquired   acquiring rewards and reversals (9, 10) that moved its merchant_acquiring account (POINTS
--              only: rules.py opens no other)
--   dividends  dividends (11) naming it that moved one of its VOUCHERS clearing accounts
--   accepted   other merchants' voucher spends (14) that moved one of its VOUCHERS clearing accounts
--   reversed   the operator's reversals (18, 19) that moved one of its POINTS clearing accounts
-- the POINTS clearing accounts being merchant_issued, merchant_redeemed, merchant_fees, merchant_acquiring
-- (store.MERCHANT_ACCOUNTS), the VOUCHERS ones merchant_redeemed, merchant_vouchers
-- (store.MERCHANT_VOUCHER_ACCOUNTS); Store.close_period writes the same set with the same rules.

CREATE TABLE statement_line_ids (
    period_id            bigint NOT NULL REFERENCES settlement_periods,
    merchant_id          text NOT NULL,
    first_transaction_id bigint NOT NULL,
    transaction_ids      bigint[] NOT NULL,
    PRIMARY KEY (period_id, merchant_id, first_transaction_id),
    -- the bound a chunk is read in (Store.statement_line_chunk_ids_max may not exceed it), and the
    -- first id the key says
    CHECK (cardinality(transaction_ids) BETWEEN 1 AND 8192 AND transaction_ids[1] = first_transaction_id)
);

-- The periods closed before this migration, each as Store.close_period now writes it (one pass over the
-- period's rows: transactions_created, a BRIN index, finds them), period by period, oldest first.
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT period_id, opened_at, cut_off FROM settlement_periods ORDER BY period_id LOOP
        WITH t AS MATERIALIZED (
               SELECT transaction_id, kind, merchant_id FROM transactions
               WHERE created_at >= p.opened_at AND created_at < p.cut_off),
             m AS MATERIALIZED (
               SELECT e.transaction_id, e.kind, e.merchant_id AS own, a.owner_id AS merchant_id,
                      a.kind AS account_kind, a.asset_code
               -- from the table, not the CTE t: as in close_period, a join over a CTE (no index, no
               -- statistics) may be planned as a nested loop, quadratic
               FROM (SELECT transaction_id, kind, merchant_id, unnest(leg_accounts) AS account_id
                     FROM transactions WHERE created_at >= p.opened_at AND created_at < p.cut_off) e
               JOIN accounts a ON a.account_id = e.account_id
                 AND (a.asset_code = 'POINTS'
                        AND a.kind IN ('merchant_issued', 'merchant_redeemed', 'merchant_fees', 'merchant_acquiring')
                      OR a.asset_code = 'VOUCHERS' AND a.kind IN ('merchant_redeemed', 'merchant_vouchers'))),
             lines AS (
               SELECT merchant_id, transaction_id FROM t
               WHERE kind NOT BETWEEN 6 AND 11 AND kind NOT IN (23, 24)
               UNION ALL  -- disjoint: a reversal naming the merchant is one of its own
               SELECT DISTINCT merchant_id, transaction_id FROM m
               WHERE kind IN (9, 10) AND account_kind = 'merchant_acquiring'
                  OR kind = 11 AND asset_code = 'VOUCHERS' AND merchant_id = own
                  OR kind = 14 AND asset_code = 'VOUCHERS' AND merchant_id <> own
                  OR kind IN (18, 19) AND asset_code = 'POINTS' AND merchant_id <> own),
             merchant_lines AS (
               SELECT merchant_id, ARRAY(SELECT unnest(array_agg(transaction_id)) ORDER BY 1) AS ids
               FROM lines GROUP BY merchant_id)
        INSERT INTO statement_line_ids (period_id, merchant_id, first_transaction_id, transaction_ids)
        SELECT p.period_id, merchant_id, ids[i], ids[i:i + 2047]
        FROM merchant_lines, generate_series(1, cardinality(ids), 2048) i;
    END LOOP;
END $$;

DROP INDEX transactions_merchant_hash;
