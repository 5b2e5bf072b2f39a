-- The change feed (points.v1.EventsService.WatchEvents, processor/events.py) and its NATS publisher.
--
-- The feed is one totally ordered log over two tables: transactions (position = (transaction_id, 0))
-- and member_events (position = (after_transaction_id, member_event_id)). Gap-free means: once a reader
-- has seen a position, nothing at an earlier position commits later. For transactions this holds
-- because the single writer hands ids out in order and a batch's write starts only after the previous
-- batch committed (processor/pipeline.py). For member events it holds because every writer of
-- member_events first locks the ledger_writer row, which every batch also locks (FOR NO KEY UPDATE,
-- until COMMIT): a member event is written between two batches, after_transaction_id is the writer's
-- high-water mark then (every later transaction has a larger id), and member_event_id is drawn under
-- the lock (so it grows in commit order).

-- The member's posted points balance right after the transaction, point-units: recorded by the
-- committer from the fast path (processor/events.py balances_after), checked against the journal by
-- reconcile. NULL for rows written before this migration and for transactions without a member.
ALTER TABLE transactions ADD COLUMN member_balance_after bigint;

CREATE TABLE member_events (
    member_event_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    after_transaction_id bigint NOT NULL CHECK (after_transaction_id >= 0),
    -- level_changed | points_expiring | frozen | unfrozen | merged | closed (processor/events.py
    -- MEMBER_EVENT_TYPES)
    event_type           text NOT NULL CHECK (event_type IN ('level_changed', 'points_expiring', 'frozen',
                                                              'unfrozen', 'merged', 'closed')),
    member_id            text NOT NULL,
    -- the event's fields (level_changed: from_level, to_level, transaction_id; points_expiring:
    -- amount_point_units, expires_at_us, notice_days; frozen/unfrozen: reason; merged: target_member_id)
    detail               jsonb NOT NULL DEFAULT '{}',
    committed_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX member_events_position ON member_events (after_transaction_id, member_event_id);

-- One expiring-points notice per (member, lot expiry instant): the periodic scan may run again over the
-- same lots (after a restart, or while they are still within the notice period) without repeating it.
CREATE TABLE member_expiry_notices (
    member_id     text NOT NULL,
    expires_at_us bigint NOT NULL,
    PRIMARY KEY (member_id, expires_at_us)
);

-- Level changes are recorded by the committer in tier_events (in the batch's transaction, which holds
-- the ledger_writer row lock): each is also a member event, positioned right after its transaction.
CREATE FUNCTION tier_event_to_member_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO member_events (after_transaction_id, event_type, member_id, detail, committed_at)
    VALUES (NEW.transaction_id, 'level_changed', NEW.member_id,
            jsonb_build_object('from_level', NEW.from_level, 'to_level', NEW.to_level,
                               'transaction_id', NEW.transaction_id),
            NEW.created_at);
    RETURN NULL;
END $$;
CREATE TRIGGER tier_events_feed AFTER INSERT ON tier_events
    FOR EACH ROW EXECUTE FUNCTION tier_event_to_member_event();

-- The NATS publisher's cursor: the position of the last event the broker acknowledged. Advanced only
-- after the ack, so a crash republishes from here (the broker drops the duplicates by Nats-Msg-Id).
CREATE TABLE events_publish_cursor (
    publisher            text PRIMARY KEY,
    transaction_id       bigint NOT NULL DEFAULT 0,
    member_event_id      bigint NOT NULL DEFAULT 0,
    published_at         timestamptz
);
