-- ReverseTransaction (processor/member_store.py reversal_group) and reconcile look transactions up by the
-- transaction they name as original (refunds, reversals, the rewards an earn set off); nothing indexed
-- original_transaction_id, so each ReverseTransaction scanned the whole journal twice (a parallel seq
-- scan, 73 ms on 300,000 rows; seconds on a month of a busy alliance). Partial: only rows that name an
-- original are in it, so an earn or a redeem, which name none, pay nothing for it.
CREATE INDEX transactions_original ON transactions (original_transaction_id)
    WHERE original_transaction_id IS NOT NULL;
