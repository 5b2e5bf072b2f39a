-- Member administration and customer service (issue 15): support keys, adjustments, reversals, member
-- status (frozen, closed) and the log of member events the change feed reads.

-- Support keys: a key kind for customer-service agents, with no merchants, which may call the reads of
-- MemberAdminService and AdjustPoints within two limits the operator sets (point-units, absolute value
-- of the adjustment): per call and per UTC day. Both are required for a support key, absent otherwise.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_kind_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_kind_check CHECK (kind IN ('merchant', 'gateway', 'operator', 'support'));
ALTER TABLE api_keys DROP CONSTRAINT api_keys_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_check CHECK ((kind IN ('operator', 'support')) = (cardinality(merchant_ids) = 0));
ALTER TABLE api_keys ADD COLUMN support_points_per_call_max bigint CHECK (support_points_per_call_max > 0);
ALTER TABLE api_keys ADD COLUMN support_points_per_day_max bigint CHECK (support_points_per_day_max > 0);
ALTER TABLE api_keys ADD CONSTRAINT api_keys_support_limits CHECK (
    (kind = 'support') = (support_points_per_call_max IS NOT NULL AND support_points_per_day_max IS NOT NULL)
    AND (kind = 'support' OR (support_points_per_call_max IS NULL AND support_points_per_day_max IS NULL)));

-- Kinds 16..22 (processor/kinds.py): adjustments, reversals, closure, transfer, merge.
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check CHECK (kind BETWEEN 1 AND 22);

-- The operator's account funding adjustments: credits to members make it negative, debits positive; it
-- keeps no sign of its own (reconcile counts it with the program's funding accounts).
INSERT INTO accounts (kind, owner_id, asset_code) VALUES ('operator_adjustments', 'operator', 'POINTS');

-- One row per adjustment transaction (kinds 16, 17): why, and which key made it (the per-day limit of a
-- support key is the sum of |points| of its rows since the UTC day began).
CREATE TABLE member_adjustments (
    transaction_id bigint PRIMARY KEY,
    member_id      text NOT NULL,
    -- signed point-units applied to the member
    points         bigint NOT NULL CHECK (points <> 0),
    -- AdjustmentReason (admin.proto) number, 1..7
    reason         smallint NOT NULL CHECK (reason BETWEEN 1 AND 7),
    note           text NOT NULL DEFAULT '',
    key_id         text NOT NULL,
    created_at     timestamptz NOT NULL
);
CREATE INDEX member_adjustments_key_day ON member_adjustments (key_id, created_at);

-- One row per reversal (kinds 18, 19): a transaction is reversed at most once (the primary key).
CREATE TABLE member_reversals (
    original_transaction_id bigint PRIMARY KEY,
    reversal_transaction_id bigint NOT NULL UNIQUE,
    reason                  smallint NOT NULL CHECK (reason BETWEEN 1 AND 7),
    note                    text NOT NULL DEFAULT '',
    key_id                  text NOT NULL,
    created_at              timestamptz NOT NULL
);

-- A member's administrative state; no row = active. Loaded at start into the state machine, which
-- refuses a frozen member's spends and every call naming a closed member inside the batch.
CREATE TABLE member_status (
    member_id  text PRIMARY KEY,
    state      text NOT NULL CHECK (state IN ('active', 'frozen', 'closed')),
    reason     text NOT NULL DEFAULT '',
    frozen_at  timestamptz,
    closed_at  timestamptz,
    updated_at timestamptz NOT NULL,
    CHECK ((state = 'frozen') = (frozen_at IS NOT NULL)),
    CHECK ((state = 'closed') = (closed_at IS NOT NULL))
);

-- Member events (frozen, unfrozen, closed, merged), written in the same transaction as the change, for
-- the change feed (EventsService.WatchEvents, issue 15) to read. Append-only by the service.
CREATE TABLE member_status_log (
    event_id   bigserial PRIMARY KEY,
    member_id  text NOT NULL,
    event      text NOT NULL,
    payload    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL
);
CREATE INDEX member_status_log_member ON member_status_log (member_id, event_id);

-- Aliases (card or phone numbers) naming a member: a till's operation naming an alias acts on its member.
CREATE TABLE member_aliases (
    alias      text PRIMARY KEY,
    member_id  text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX member_aliases_member ON member_aliases (member_id);

-- Households: members sharing one balance, the points account of the member 'household:<household_id>'.
CREATE TABLE households (
    household_id   text PRIMARY KEY,
    head_member_id text NOT NULL,
    created_at     timestamptz NOT NULL
);
CREATE TABLE household_members (
    member_id    text PRIMARY KEY,
    household_id text NOT NULL REFERENCES households,
    joined_at    timestamptz NOT NULL
);

-- Member-to-member transfers (kind 21): the fee account, and the receiver of each transfer (the
-- transaction names the sender; the receiver's history finds its transfers here).
INSERT INTO accounts (kind, owner_id, asset_code) VALUES ('operator_transfer_fees', 'operator', 'POINTS');
CREATE TABLE member_transfers (
    transaction_id bigint PRIMARY KEY,
    from_member_id text NOT NULL,
    to_member_id   text NOT NULL,
    -- point-units the sender paid; the fee (to operator_transfer_fees); the receiver got points - fee
    points         bigint NOT NULL CHECK (points > 0),
    fee            bigint NOT NULL CHECK (fee BETWEEN 0 AND points),
    created_at     timestamptz NOT NULL
);
CREATE INDEX member_transfers_to ON member_transfers (to_member_id, transaction_id);
CREATE INDEX member_transfers_from_day ON member_transfers (from_member_id, created_at);

-- Merges (MergeMembers): the source id is an alias of the target afterwards (member_aliases).
CREATE TABLE member_merges (
    source_member_id text PRIMARY KEY,
    target_member_id text NOT NULL,
    -- the kind-22 transaction moving the points; NULL when the source had none
    transaction_id   bigint,
    points           bigint NOT NULL CHECK (points >= 0),
    created_at       timestamptz NOT NULL
);
