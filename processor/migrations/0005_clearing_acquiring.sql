-- Clearing counts acquiring rewards (docs/RULES.md section 7): a merchant's merchant_acquiring account
-- is what the operator owes it as an acquirer, so it adds to its net position and to its statements.
-- acquiring = point-units of rewards (kind 9) credited in the period, acquiring_reversals = point-units
-- reversed (kind 10); both >= 0. Statements cut before this migration had no acquiring movements (no
-- rule posted any), so 0 is their exact value and they keep satisfying the new net.
ALTER TABLE statements
    ADD COLUMN acquiring           bigint NOT NULL DEFAULT 0,
    ADD COLUMN acquiring_reversals bigint NOT NULL DEFAULT 0;

ALTER TABLE statements DROP CONSTRAINT statements_check;
ALTER TABLE statements ADD CONSTRAINT statements_net CHECK (
    net = redeemed - redemption_refunds - issued + earn_refunds - fees + acquiring - acquiring_reversals);

-- A merchant's statement lines include the acquiring rewards and reversals that moved its
-- merchant_acquiring account, although those transactions carry the merchant where the member spent
-- (store.statement_lines): this index finds a period's few of them without scanning the period.
CREATE INDEX transactions_acquiring ON transactions (created_at, transaction_id) WHERE kind IN (9, 10);
