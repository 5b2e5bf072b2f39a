-- transactions' two text-keyed indexes keyed by an int4 instead (issue 14, "narrow rows with integer
-- slots"): hashtext(member_id) and hashtext(merchant_id), expression indexes, so nothing new is stored or
-- handed out (no slot table to keep durable and consistent between the service and the projector). Each
-- read by member or merchant says hashtext(x) = hashtext($1) AND x = $1: the first finds the index range,
-- the second drops another id of the same hash (32 bits: among 300,000 ids about ten pairs share one).
-- hashtext is the hash support function of text's hash operator class (the bytes, under a deterministic
-- collation such as the columns' default): hash indexes keep its values on disk, pg_upgrade included.
--
-- Measured with python -m loadtest.projection_write (batches of 1,000, 70% earn / 30% redeem, the example
-- program in force, transactions pre-filled to 1.05M rows; each variant a copy of the same template,
-- written batch by batch in turn; five runs, load 0.7-8.9): Postgres CPU and WAL of the transactions COPY
-- per operation, base -> these two indexes:
--   ids "member-123", no checkpoint:       9.87 -> 8.16, 13.73 -> 10.05 µs/op (load 9); WAL 608 -> 523 B/op
--   same, a checkpoint every 10 batches:   10.42 -> 8.22 µs/op; WAL 1,862 -> 1,642 B/op
--   UUID member ids, no checkpoint:        11.83 -> 8.30 µs/op (load 2-5); WAL 875 -> 553 B/op
--   UUID member ids, checkpoint every 10:  10.37 -> 8.04 µs/op; WAL 2,318 -> 1,674 B/op
-- i.e. 1.7-3.7 µs/op (17-30%); the member index 43.2 MB (72.9 with UUIDs) -> 33.4, the merchant index
-- 53.3 -> 43.7. int4 slot columns handed out by the service measured the same (2.1-3.8 µs/op, WAL within
-- 15 B/op) and would be new durable state. What remains of the two indexes is per entry, not per byte:
-- dropping the member index saves 4.0-6.7 µs/op, the merchant index 3.0-6.1 (only a merchant's statement
-- lines read by it; migration 0024 drops it, the lines' ids written at the cut instead). At upgrade each
-- CREATE INDEX holds off writes to transactions while it builds.
CREATE INDEX transactions_member_hash ON transactions (hashtext(member_id), transaction_id DESC);
DROP INDEX transactions_member_newest;
CREATE INDEX transactions_merchant_hash ON transactions (hashtext(merchant_id), created_at, transaction_id);
DROP INDEX transactions_merchant_created;
