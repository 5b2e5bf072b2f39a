-- Store.statement_lines as of cb41a10 (before migration 0024), verbatim: a merchant's lines of a closed
-- period found in the journal itself (the merchant's own through transactions_merchant_hash, the others
-- through their kinds and legs). tests/integration/test_statement_line_ids.py holds the ids written at the
-- cut to it. Parameters: $1 period_id, $2 merchant_id, $3 after_transaction_id, $4 limit (NULL: all),
-- $5 store.MERCHANT_ACCOUNTS, $6 store.MERCHANT_VOUCHER_ACCOUNTS, $7 channel_store.POSTING_KIND's kinds.
WITH p AS (SELECT opened_at, cut_off FROM settlement_periods WHERE period_id = $1),
     own AS (
       SELECT t.transaction_id FROM p JOIN transactions t
         ON hashtext(t.merchant_id) = hashtext($2) AND t.merchant_id = $2
           AND t.created_at >= p.opened_at AND t.created_at < p.cut_off
       WHERE t.transaction_id > $3 AND t.kind NOT BETWEEN 6 AND 11 AND t.kind <> ALL($7::smallint[])
       ORDER BY t.transaction_id LIMIT $4),
     acquired AS (
       SELECT t.transaction_id FROM p JOIN transactions t
         ON t.kind IN (9, 10) AND t.created_at >= p.opened_at AND t.created_at < p.cut_off
       WHERE t.transaction_id > $3
         AND EXISTS (SELECT 1 FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                     JOIN accounts a ON a.account_id = e.account_id WHERE a.owner_id = $2
                       AND a.kind = 'merchant_acquiring')
       ORDER BY t.transaction_id LIMIT $4),
     dividends AS (
       SELECT t.transaction_id FROM p JOIN transactions t
         ON hashtext(t.merchant_id) = hashtext($2) AND t.merchant_id = $2
           AND t.created_at >= p.opened_at AND t.created_at < p.cut_off
       WHERE t.transaction_id > $3 AND t.kind = 11
         AND EXISTS (SELECT 1 FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                     JOIN accounts a ON a.account_id = e.account_id WHERE a.owner_id = $2
                       AND a.asset_code = 'VOUCHERS' AND a.kind = ANY($6::text[]))
       ORDER BY t.transaction_id LIMIT $4),
     accepted AS (
       SELECT t.transaction_id FROM p JOIN transactions t
         ON t.kind = 14 AND t.created_at >= p.opened_at AND t.created_at < p.cut_off
       WHERE t.transaction_id > $3 AND t.merchant_id <> $2
         AND EXISTS (SELECT 1 FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                     JOIN accounts a ON a.account_id = e.account_id WHERE a.owner_id = $2
                       AND a.asset_code = 'VOUCHERS' AND a.kind = ANY($6::text[]))
       ORDER BY t.transaction_id LIMIT $4),
     reversed AS (
       SELECT t.transaction_id FROM p JOIN transactions t
         ON t.kind IN (18, 19) AND t.created_at >= p.opened_at AND t.created_at < p.cut_off
       WHERE t.transaction_id > $3
         AND EXISTS (SELECT 1 FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                     JOIN accounts a ON a.account_id = e.account_id WHERE a.owner_id = $2
                       AND a.asset_code = 'POINTS' AND a.kind = ANY($5::text[]))
       ORDER BY t.transaction_id LIMIT $4),
     lines AS (SELECT transaction_id FROM own UNION SELECT transaction_id FROM acquired
               UNION SELECT transaction_id FROM dividends UNION SELECT transaction_id FROM accepted
               UNION SELECT transaction_id FROM reversed
               ORDER BY transaction_id LIMIT $4)
SELECT t.transaction_id, t.created_at, t.kind, t.member_id, t.amount,
       coalesce(x.fee, 0)::bigint AS fee, coalesce(x.net, 0)::bigint AS net,
       coalesce(x.voucher_net, 0)::bigint AS voucher_net,
       coalesce(x.vouchers_held_change, 0)::bigint AS vouchers_held_change
FROM lines l JOIN transactions t USING (transaction_id)
LEFT JOIN LATERAL (
  SELECT -sum(e.amount) FILTER (WHERE a.kind = 'merchant_fees' AND a.asset_code = 'POINTS') AS fee,
         sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS') AS net,
         sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS' AND a.kind = 'merchant_redeemed')
           AS voucher_net,
         sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS' AND a.kind = 'merchant_vouchers')
           AS vouchers_held_change
  FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
  JOIN accounts a ON a.account_id = e.account_id WHERE a.owner_id = $2
    AND (a.asset_code = 'POINTS' AND a.kind = ANY($5::text[])
         OR a.asset_code = 'VOUCHERS' AND a.kind = ANY($6::text[]))) x ON true
ORDER BY t.transaction_id
