-- The writer's fencing token and the high-water marks of the ids it issues (issue 13).
--
-- One row. `epoch` is the fencing token: a service that takes the writer lock bumps it (after
-- SELECT ... FOR UPDATE, which waits for every transaction of the previous writer still open), and every
-- batch of a writer updates this row WHERE epoch = its own: a batch of a fenced-off writer updates no row
-- and writes nothing. Batches take FOR NO KEY UPDATE (their UPDATE), the writer's other transactions
-- (balance checkpoints, dividend rounds) FOR KEY SHARE; neither waits for the other, both wait for a new
-- writer's FOR UPDATE and it waits for them: fencing holds until COMMIT.
--
-- last_transaction_id / last_authorization_id: the largest id the writer has handed out, written in the
-- same transaction as the batch that uses it. Recovery continues after them; nothing re-derives them
-- from one table of several (a vouchers-only hold lives in voucher_holds, not holds). Ids handed out by
-- a batch that did not commit are simply never used (gaps, like a sequence's).
CREATE TABLE ledger_writer (
    singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch                 bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    last_transaction_id   bigint NOT NULL DEFAULT 0 CHECK (last_transaction_id >= 0),
    last_authorization_id bigint NOT NULL DEFAULT 0 CHECK (last_authorization_id >= 0),
    -- who took the lock last (application name, host and process), and when: for the operator
    holder                text NOT NULL DEFAULT '',
    taken_at              timestamptz
);

INSERT INTO ledger_writer (last_transaction_id, last_authorization_id)
SELECT (SELECT coalesce(max(transaction_id), 0) FROM transactions),
       greatest((SELECT coalesce(max(authorization_id), 0) FROM holds),
                (SELECT coalesce(max(authorization_id), 0) FROM voucher_holds));
