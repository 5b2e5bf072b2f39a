-- Each transaction's legs packed into its own row (issue 14: "entries derived from the transaction row
-- rather than stored row by row"). A 1,000-operation batch wrote ~3,600 entries rows, each a heap tuple
-- (24 bytes of header for 40 of data) and an entries_transaction index entry, in a COPY of its own; the
-- legs now ride in the transactions row the batch writes anyway, as three arrays in the legs' order:
--   leg_accounts bigint[], leg_amounts bigint[]  (never NULL; '{}' for a transaction with no legs)
--   leg_assets   text[]   NULL when every leg is POINTS (all but the rare voucher legs), else one per leg
-- Measured before building it (python -m loadtest.entries_packed, five runs, load 4-6.5, DESIGN.md section
-- 4): the projection -4.9 to -5.75 us/op of Postgres CPU (29.3-30.6 -> 24.2-25.1) and -331 B/op of WAL,
-- 36% less on disk; reads over the arrays 1.4-1.9x a scan of entries, through a view 1.5-4x. So the
-- reads of many legs (the balance checkpoint's fold and tail, reconcile's whole-journal checks, the
-- reports' and settlement's sums) are written over the arrays; `entries` stays as a VIEW with the same
-- columns for tests and rare reads. As built (seventh session, load 4-7 on 2 cores, ranges of runs):
-- python -m loadtest.projection_write --template-through 21 --variants base,migrations (4 runs, this
-- migration applied in place): the projection's Postgres CPU -5.3 to -8.8 us/op (whole transaction
-- 31.7-49.1 -> 26.4-40.3), WAL -281 to -290 B/op; python -m loadtest.entries_packed (2 runs, the packed
-- copy rewritten by VACUUM FULL): -7.0 and -7.3 us/op, -329 and -338 B/op.
--
-- entry_id is synthetic: transaction_id * 1024 + the leg's ordinal (1..1023), unique and in the legs'
-- order within a transaction, and in transaction order across them; the CHECK bounds the legs so.
-- What the entries table's constraints guaranteed stays guaranteed: amount <> 0 (and not NULL) by the
-- CHECK below, the arrays' lengths equal by it too; the account's existence and asset were reconcile's
-- checks since 0003 dropped the foreign keys, and still are.

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM entries e WHERE NOT EXISTS
                   (SELECT 1 FROM transactions t WHERE t.transaction_id = e.transaction_id)) THEN
        RAISE EXCEPTION 'entries name transactions that do not exist; run `python -m processor reconcile` '
            'and repair the journal before this migration (their legs would have no row to go to)';
    END IF;
    IF EXISTS (SELECT 1 FROM entries GROUP BY transaction_id HAVING count(*) >= 1024) THEN
        RAISE EXCEPTION 'a transaction has 1024 legs or more; entry_id (transaction_id * 1024 + leg) '
            'cannot number them: raise the factor in this migration before applying it';
    END IF;
END $$;

ALTER TABLE transactions
    ADD COLUMN leg_accounts bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN leg_amounts bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN leg_assets text[];

UPDATE transactions t SET leg_accounts = l.accounts, leg_amounts = l.amounts, leg_assets = l.assets
FROM (SELECT transaction_id, array_agg(account_id ORDER BY entry_id) AS accounts,
             array_agg(amount ORDER BY entry_id) AS amounts,
             CASE WHEN bool_and(asset_code = 'POINTS') THEN NULL
                  ELSE array_agg(asset_code ORDER BY entry_id) END AS assets
      FROM entries GROUP BY transaction_id) l
WHERE t.transaction_id = l.transaction_id;

-- The UPDATE wrote a second version of every row, and every index holds both (a REINDEX in this
-- transaction keeps them too: the UPDATE may still roll back). On a large journal run `VACUUM FULL
-- transactions` after this migration, in a maintenance window: it halves the table and its indexes, and
-- without it new rows fill the freed space out of created_at order (transactions_created is a BRIN index).

ALTER TABLE transactions ADD CONSTRAINT transactions_legs CHECK (
    cardinality(leg_amounts) = cardinality(leg_accounts)
    AND cardinality(leg_amounts) < 1024
    AND (leg_assets IS NULL OR cardinality(leg_assets) = cardinality(leg_amounts))
    AND 0 <> ALL (leg_amounts)
    AND array_position(leg_amounts, NULL) IS NULL
    AND array_position(leg_accounts, NULL) IS NULL);

DROP VIEW account_balances;
DROP TABLE entries;

CREATE VIEW entries AS
SELECT t.transaction_id * 1024 + l.leg AS entry_id, t.transaction_id, l.account_id,
       coalesce(t.leg_assets[l.leg], 'POINTS') AS asset_code, l.amount
FROM transactions t
CROSS JOIN LATERAL unnest(t.leg_accounts, t.leg_amounts) WITH ORDINALITY AS l(account_id, amount, leg);

-- as 0003's, the tail read from the arrays of the transactions after the checkpoint
CREATE VIEW account_balances AS
SELECT a.account_id, a.kind, a.owner_id, a.asset_code,
       a.balance + coalesce(t.delta, 0) AS balance,
       a.balance AS checkpoint_balance
FROM accounts a
LEFT JOIN (SELECT l.account_id, sum(l.amount)::bigint AS delta
           FROM (SELECT unnest(x.leg_accounts) AS account_id, unnest(x.leg_amounts) AS amount
                 FROM transactions x, balance_checkpoint c
                 WHERE x.transaction_id > c.through_transaction_id) l
           GROUP BY l.account_id) t USING (account_id);
