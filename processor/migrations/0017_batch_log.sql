-- The batch log (issue 14 stage 5, docs/DESIGN.md section 4 item 5): a batch's answer waits for one
-- row here (its BatchWrite serialized, appended in one autocommit statement with the writer's fence),
-- not for its relational rows; the projector (processor/projector.py) writes those rows from the log
-- off the answer path and advances projection_state in the same transaction, so a batch is projected
-- once. Until projected the log row is the only truth: start-up projects every batch after
-- through_batch_id before it loads anything. Projected batches older than
-- --batch-log-retention-seconds are deleted (the newest projected one is always kept).
CREATE TABLE batch_log (
    batch_id             bigint PRIMARY KEY,
    created_at           timestamptz NOT NULL,
    first_transaction_id bigint,          -- NULL: the batch handed out no transaction id
    last_transaction_id  bigint,
    transactions         integer NOT NULL CHECK (transactions >= 0), -- rows it writes to transactions
    operations           integer NOT NULL CHECK (operations >= 0),
    format_version       smallint NOT NULL, -- processor/batch_log.py FORMAT_VERSION of the payload
    payload              bytea NOT NULL,
    CHECK ((first_transaction_id IS NULL) = (last_transaction_id IS NULL)),
    CHECK (first_transaction_id <= last_transaction_id)
);
-- the payload is already compact (pickle) and read once: no TOAST compression on the answer path
ALTER TABLE batch_log ALTER COLUMN payload SET STORAGE EXTERNAL;

-- One row: the newest batch whose rows are written (0: none yet).
CREATE TABLE projection_state (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    through_batch_id bigint NOT NULL CHECK (through_batch_id >= 0)
);
INSERT INTO projection_state (through_batch_id) VALUES (0);
