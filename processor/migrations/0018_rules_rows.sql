-- The program rules' rows cheaper for Postgres to write (issue 14; the rows' contents are unchanged).
--
-- lots: one index instead of two. The primary key had member_id first (so each new lot's key went to a
-- random leaf) and lots_due (expires_at_us) was a second index every lot was inserted into. The key is
-- now (expires_at_us, lot_id, member_id): the same three columns, so the same uniqueness; a new lot's
-- expiry is its batch's time plus the program's period, so its key goes at the right edge of the index
-- (few pages touched, few full-page images after a checkpoint); and it serves the expiry-notice scan
-- (events.scan_expiring_points: a range of expires_at_us in its order) that lots_due served. No reader
-- looks lots up by member_id alone: start-up reads them all (in no order since), reconcile groups them
-- all, the writer deletes and updates by the whole key. Measured (python -m loadtest.rules_write, three
-- runs): Postgres CPU for a batch's lots 8.8-10.4 -> 5.8-6.6 µs an operation.
--
-- member_programs: every earn's member row is updated in each batch it earns in; with room left on
-- each page the new version stays on the page (a HOT update: no index entry, less pruning and vacuum).
ALTER TABLE lots DROP CONSTRAINT lots_pkey;
ALTER TABLE lots ADD PRIMARY KEY (expires_at_us, lot_id, member_id);
DROP INDEX lots_due;
ALTER TABLE member_programs SET (fillfactor = 80);

-- The rows _write_rules sends as one array of rows (unnest($1::member_program_row[])) rather than one
-- array per column: asyncpg checks each element of an array parameter in Python, so a row costs it
-- 4 checks instead of one per column. Fields in the order of the tables' columns.
CREATE TYPE member_program_row AS (
    member_id              text,
    acquirer_id            text,
    referrer_id            text,
    referral_paid          boolean,
    level                  text,
    levels_reached         bigint,
    qualifying_point_units bigint,
    day_buckets            jsonb,
    linked_at              timestamptz
);
CREATE TYPE lot_row AS (
    member_id     text,
    lot_id        bigint,
    expires_at_us bigint,
    issuer_id     text,
    amount        bigint
);
