-- The projection's rows cheaper for Postgres to write (issue 14, "the narrow row"; the rows' contents and
-- what every read returns are unchanged). Measured with python -m loadtest.projection_write (batches of
-- 1,000, 70% earn / 30% redeem, the example program in force, tables pre-filled to ~1.05M transactions,
-- 3.9M entries, 1.1M idempotency records; each variant a copy of the same template, written batch by
-- batch in turn): Postgres CPU per operation of the statements of Store._write_many.
--
-- entries: no primary key. Each operation writes ~3.6 entries, and each entry went into two btrees:
-- entries_pkey (entry_id) and entries_transaction. No read looks an entry up by entry_id: reads reach
-- entries through entries_transaction (a transaction's legs, the checkpoint's tail) or scan them all
-- (reconcile); entry_id orders a transaction's legs (ORDER BY e.entry_id inside an aggregate, a sort of
-- a few rows), which needs the values, not an index. The values stay unique: the column is GENERATED
-- ALWAYS AS IDENTITY, so only the sequence fills it. Measured: entries 8.3-11.6 -> 6.1-8.1 µs/op
-- (2.2-3.5 less, four runs), WAL 671 -> 431 B/op.
ALTER TABLE entries DROP CONSTRAINT entries_pkey;

-- idempotency_keys: the request and the response as json, not jsonb. Postgres never looks inside them
-- (the service reads them whole and parses them itself: Store.stored_outcomes), so jsonb's conversion to
-- its binary form on every insert bought nothing; json checks the text is JSON and stores it as sent.
-- Measured: idempotency_keys 11.2 -> 8.7 µs/op, WAL 541 -> 473 B/op. Rewrites the table once.
ALTER TABLE idempotency_keys
    ALTER COLUMN request TYPE json USING request::json,
    ALTER COLUMN response TYPE json USING response::json;
