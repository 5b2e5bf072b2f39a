-- The idempotency records written once per batch, not once per operation (issue 14, design point 3:
-- "the full idempotency key kept in the log and only its fingerprint in the row"; docs/DESIGN.md
-- section 4, eighth session). The projector's COPY into idempotency_keys cost Postgres ~10.8 µs and
-- ~491 B of WAL per operation (5.5 µs of it the primary key's random insert), the second-largest
-- statement of the projection. Now ONE row per batch holds the batch's records, inserted on the answer
-- path in the same statement as the batch's log append (processor/batch_log.py _APPEND): durable exactly
-- when the batch is, one round trip, no per-operation index entry. Which keys exist is decided in memory
-- (processor/idempotency.py: a fingerprint -> the batch id its record is in); a retry reads its batch's
-- row by primary key.
--   keys        UTF-8 JSON [[merchant_id, ...], [idempotency_key, ...]]: what a recovery rebuild reads
--   records     UTF-8 JSON [[method, ...], [request, ...], [outcome, ...], [response|null, ...],
--               [message|null, ...]], in the keys' order: what a retry reads
--   operations  the records it holds (the purge's chunks are counted in records)
-- bytea with STORAGE EXTERNAL: Postgres never looks inside them on the answer path (no validation, no
-- compression); the view below parses them for ops scripts and tests.
-- There is no per-key uniqueness in Postgres any more: the committer never writes a key its table
-- holds (it reads the stored outcome and replays it), and a key written around the service is not seen
-- until the next recovery; Store.stored_outcomes takes the oldest record of a key found twice.
CREATE TABLE idempotency_batches (
    batch_id   bigint PRIMARY KEY,  -- batch_log's batch id; < 0 for the records moved here by this migration
    created_at timestamptz NOT NULL,
    operations integer NOT NULL CHECK (operations > 0),
    keys       bytea NOT NULL,
    records    bytea NOT NULL
);
ALTER TABLE idempotency_batches ALTER COLUMN keys SET STORAGE EXTERNAL, ALTER COLUMN records SET STORAGE EXTERNAL;
-- the retention purge's order (one entry per batch)
CREATE INDEX idempotency_batches_created ON idempotency_batches (created_at);

-- The records stored so far, one group per created_at (the projector wrote each batch's records with the
-- batch's created_at), numbered -1, -2, ... newest first: negative ids never meet batch_log's (> 0), and
-- the in-memory table rebuilds them from their low 32 bits like any other (processor/idempotency.py).
INSERT INTO idempotency_batches (batch_id, created_at, operations, keys, records)
SELECT -row_number() OVER (ORDER BY created_at DESC), created_at, n,
       convert_to(json_build_array(merchants, idempotency_keys)::text, 'UTF8'),
       convert_to(json_build_array(methods, requests, outcomes, responses, messages)::text, 'UTF8')
FROM (SELECT created_at, count(*) AS n,
             json_agg(merchant_id ORDER BY merchant_id, idempotency_key) AS merchants,
             json_agg(idempotency_key ORDER BY merchant_id, idempotency_key) AS idempotency_keys,
             json_agg(method ORDER BY merchant_id, idempotency_key) AS methods,
             json_agg(request ORDER BY merchant_id, idempotency_key) AS requests,
             json_agg(outcome ORDER BY merchant_id, idempotency_key) AS outcomes,
             json_agg(response ORDER BY merchant_id, idempotency_key) AS responses,
             json_agg(message ORDER BY merchant_id, idempotency_key) AS messages
      FROM idempotency_keys GROUP BY created_at) g;

DROP TABLE idempotency_keys;

-- The records as rows, with the columns the table had, for ops scripts, tests and rare reads: nothing in
-- the service reads through it (each row is parsed out of its batch's JSON). request and response keep
-- the JSON text as written (json, not jsonb).
CREATE VIEW idempotency_keys AS
SELECT r.merchant_id, r.idempotency_key, r.method, r.request, r.outcome,
       CASE WHEN json_typeof(r.response) = 'null' THEN NULL ELSE r.response END AS response,
       r.message, b.created_at
FROM idempotency_batches b
CROSS JOIN LATERAL (SELECT convert_from(b.keys, 'UTF8')::json AS k, convert_from(b.records, 'UTF8')::json AS v) j
CROSS JOIN LATERAL ROWS FROM (
    json_array_elements_text(j.k -> 0), json_array_elements_text(j.k -> 1), json_array_elements_text(j.v -> 0),
    json_array_elements(j.v -> 1), json_array_elements_text(j.v -> 2), json_array_elements(j.v -> 3),
    json_array_elements_text(j.v -> 4)
) AS r(merchant_id, idempotency_key, method, request, outcome, response, message);
