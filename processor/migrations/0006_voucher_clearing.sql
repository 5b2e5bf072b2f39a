-- Clearing of the VOUCHERS asset (issue 7: vouchers "are a separate asset with separate balances and
-- clearing"; docs/RULES.md section 5: each asset is cleared on its own). Every amount below is in
-- voucher-units: 100 voucher-units = 1 voucher = 1 currency unit, so one voucher-unit is one currency
-- minor unit and every figure is also money in minor units. The POINTS columns (net, closing_position,
-- ...) are unchanged: the two assets are cleared side by side, never added together.
--
-- A merchant's two VOUCHERS accounts:
-- - merchant_redeemed (VOUCHERS): vouchers accepted at the merchant, from members' split redeems (kind
--   12) less their refunds (kind 13), and from other merchants spending their vouchers at the
--   operator's store when the merchant is that store (kind 14). The operator owes it that much cash:
--   its voucher position, settled in money like the POINTS net but on its own.
-- - merchant_vouchers: vouchers the merchant holds, received in dividend rounds (kind 11) and spent at
--   the operator's store (kind 14). Not a cash claim: shown so a statement accounts for every voucher.
--
-- Per statement (one merchant, one period):
--   vouchers_redeemed          >= 0  accepted at the merchant (merchant_redeemed, kinds other than 4, 13)
--   voucher_redemption_refunds >= 0  given back by refunds of those redemptions (kinds 4, 13)
--   voucher_net                      vouchers_redeemed - voucher_redemption_refunds: the cash the operator
--                                    owes the merchant for the vouchers it accepted in the period
--   voucher_opening_position,
--   voucher_closing_position         the voucher position before and after the period
--                                    (closing = opening + voucher_net)
--   vouchers_held_opening,
--   vouchers_held_closing            vouchers the merchant holds before and after the period
--                                    (closing = opening + vouchers_received - vouchers_spent)
--   vouchers_received          >= 0  credited to merchant_vouchers (dividends, kind 11)
--   vouchers_spent             >= 0  debited from merchant_vouchers (spends at the operator's store, kind 14)
-- statements.transactions also counts the transactions that moved only the merchant's VOUCHERS
-- accounts (a dividend to it, a spend at it as the operator's store), so its lines sum to the statement.
ALTER TABLE statements
    ADD COLUMN vouchers_redeemed          bigint NOT NULL DEFAULT 0,
    ADD COLUMN voucher_redemption_refunds bigint NOT NULL DEFAULT 0,
    ADD COLUMN voucher_net                bigint NOT NULL DEFAULT 0,
    ADD COLUMN voucher_opening_position   bigint NOT NULL DEFAULT 0,
    ADD COLUMN voucher_closing_position   bigint NOT NULL DEFAULT 0,
    ADD COLUMN vouchers_held_opening      bigint NOT NULL DEFAULT 0,
    ADD COLUMN vouchers_received          bigint NOT NULL DEFAULT 0,
    ADD COLUMN vouchers_spent             bigint NOT NULL DEFAULT 0,
    ADD COLUMN vouchers_held_closing      bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT statements_voucher_net CHECK (voucher_net = vouchers_redeemed - voucher_redemption_refunds),
    ADD CONSTRAINT statements_voucher_closing CHECK (voucher_closing_position = voucher_opening_position + voucher_net),
    ADD CONSTRAINT statements_vouchers_held CHECK (
        vouchers_held_closing = vouchers_held_opening + vouchers_received - vouchers_spent);

-- Statements cut before this migration: 0 is exact for a period without voucher movements, but
-- dividends (11) and split redeems and refunds (12, 13) were posted before voucher clearing existed, so
-- the new columns are filled from the journal exactly as store.close_period computes them now: the
-- period's amounts, the positions carried from period to period, and the transactions that moved only
-- the merchant's VOUCHERS accounts (not counted then) added to statements.transactions. A merchant whose
-- only movements in a period were voucher movements had no statement: it gets one from that period on
-- (its POINTS figures 0, exact: a merchant has a statement in every period after its first one), as
-- close_period makes them now. Periods without any voucher movement are left as they are.
WITH moves AS (
    SELECT p.period_id, a.owner_id AS merchant_id,
           coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_redeemed' AND t.kind NOT IN (4, 13)), 0)
             AS vouchers_redeemed,
           coalesce(sum(-e.amount) FILTER (WHERE a.kind = 'merchant_redeemed' AND t.kind IN (4, 13)), 0)
             AS voucher_redemption_refunds,
           coalesce(sum(e.amount) FILTER (WHERE a.kind = 'merchant_vouchers' AND t.kind <> 14), 0) AS vouchers_received,
           coalesce(sum(-e.amount) FILTER (WHERE a.kind = 'merchant_vouchers' AND t.kind = 14), 0) AS vouchers_spent,
           -- a merchant's own operations were counted already (its POINTS clearing); a dividend to it or a
           -- spend at it by another merchant moves only its VOUCHERS accounts and was not
           count(DISTINCT t.transaction_id) FILTER (WHERE t.kind BETWEEN 6 AND 11 OR t.merchant_id <> a.owner_id)
             AS uncounted
    FROM settlement_periods p
    JOIN transactions t ON t.created_at >= p.opened_at AND t.created_at < p.cut_off
    JOIN entries e ON e.transaction_id = t.transaction_id
    JOIN accounts a ON a.account_id = e.account_id AND a.asset_code = 'VOUCHERS'
      AND a.kind IN ('merchant_redeemed', 'merchant_vouchers')
    GROUP BY 1, 2),
  since AS (
    SELECT merchant_id, min(period_id) AS period_id FROM moves GROUP BY merchant_id),
  filled AS (
    SELECT p.period_id, f.merchant_id, coalesce(m.vouchers_redeemed, 0) AS vouchers_redeemed,
           coalesce(m.voucher_redemption_refunds, 0) AS voucher_redemption_refunds,
           coalesce(m.vouchers_received, 0) AS vouchers_received, coalesce(m.vouchers_spent, 0) AS vouchers_spent,
           coalesce(m.uncounted, 0) AS uncounted,
           sum(coalesce(m.vouchers_redeemed, 0) - coalesce(m.voucher_redemption_refunds, 0))
             OVER (PARTITION BY f.merchant_id ORDER BY p.period_id) AS voucher_closing_position,
           sum(coalesce(m.vouchers_received, 0) - coalesce(m.vouchers_spent, 0))
             OVER (PARTITION BY f.merchant_id ORDER BY p.period_id) AS vouchers_held_closing
    FROM since f JOIN settlement_periods p ON p.period_id >= f.period_id
    LEFT JOIN moves m ON m.period_id = p.period_id AND m.merchant_id = f.merchant_id)
INSERT INTO statements (period_id, merchant_id, opening_position, issued, earn_refunds, redeemed, redemption_refunds,
                        fees, net, closing_position, transactions, vouchers_redeemed, voucher_redemption_refunds,
                        voucher_net, voucher_opening_position, voucher_closing_position, vouchers_held_opening,
                        vouchers_received, vouchers_spent, vouchers_held_closing)
SELECT period_id, merchant_id, 0, 0, 0, 0, 0, 0, 0, 0, uncounted, vouchers_redeemed, voucher_redemption_refunds,
       vouchers_redeemed - voucher_redemption_refunds,
       voucher_closing_position - (vouchers_redeemed - voucher_redemption_refunds), voucher_closing_position,
       vouchers_held_closing - (vouchers_received - vouchers_spent), vouchers_received, vouchers_spent,
       vouchers_held_closing
FROM filled
ON CONFLICT (period_id, merchant_id) DO UPDATE SET
    transactions = statements.transactions + EXCLUDED.transactions,
    vouchers_redeemed = EXCLUDED.vouchers_redeemed,
    voucher_redemption_refunds = EXCLUDED.voucher_redemption_refunds,
    voucher_net = EXCLUDED.voucher_net,
    voucher_opening_position = EXCLUDED.voucher_opening_position,
    voucher_closing_position = EXCLUDED.voucher_closing_position,
    vouchers_held_opening = EXCLUDED.vouchers_held_opening,
    vouchers_received = EXCLUDED.vouchers_received,
    vouchers_spent = EXCLUDED.vouchers_spent,
    vouchers_held_closing = EXCLUDED.vouchers_held_closing;

-- A merchant's statement lines include the spends of other merchants' vouchers at it when it is the
-- operator's store (kind 14, whose transactions.merchant_id is the spender; store.statement_lines): this
-- index finds a period's few of them without scanning the period, as transactions_acquiring does for
-- kinds 9 and 10.
CREATE INDEX transactions_voucher_spend ON transactions (created_at, transaction_id) WHERE kind = 14;
