-- Program rules of the alliance (issue 7; arithmetic in processor/rules.py, design in docs/RULES.md).
-- Every rule posts through the ordinary journal (transactions + entries), in the same batches as the
-- operations that trigger it. The tables below hold the rules' configuration and the per-member state
-- the rules need, written in the same Postgres transaction as the journal rows they go with, so they
-- can never drift from the balances. Amounts are int64 point-units; times `*_us` are microseconds since
-- the Unix epoch.

INSERT INTO assets VALUES ('VOUCHERS', 'dividend vouchers; 100 voucher-units = 1 voucher = 1 currency unit')
ON CONFLICT DO NOTHING;

-- Kinds 6..15 (processor/rules.py KIND_*): expiry, tier bonus, referral bonus, acquiring reward and its
-- reversal, dividend, split redeem and refund, merchant voucher spend, conversion.
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check CHECK (kind BETWEEN 1 AND 15);
-- the program version a transaction was made under (NULL: no program configured); its refunds,
-- clawbacks and expiry follow that version's rules, whatever version is in force later
ALTER TABLE transactions ADD COLUMN program_version integer;

-- The operator's accounts for the rules (owner 'operator'); each merchant gets a merchant_acquiring
-- account (rewards the operator owes it as an acquirer) beside its issued/redeemed/fees accounts.
INSERT INTO accounts (kind, owner_id, asset_code) VALUES
    ('operator_tier_rewards', 'operator', 'POINTS'),
    ('operator_promotions', 'operator', 'POINTS'),
    ('operator_referrals', 'operator', 'POINTS'),
    ('operator_acquiring', 'operator', 'POINTS'),
    ('operator_dividends', 'operator', 'VOUCHERS')
ON CONFLICT DO NOTHING;
INSERT INTO accounts (kind, owner_id, asset_code)
SELECT 'merchant_acquiring', merchant_id, 'POINTS' FROM merchants
ON CONFLICT DO NOTHING;

-- Versioned configuration: one row per version of a program. `config` is the version's settings as
-- processor/rules.py ProgramVersion reads them (levels, expiry, promotions, merchant terms, ...). A
-- version applies from effective_from_us onward and is never changed or deleted once stored.
CREATE TABLE program_versions (
    program_id        text NOT NULL,
    version           integer NOT NULL CHECK (version >= 1),
    effective_from_us bigint NOT NULL,
    config            jsonb NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    created_by        text NOT NULL DEFAULT '',
    PRIMARY KEY (program_id, version),
    UNIQUE (program_id, effective_from_us)
);

-- Per member: the links (the merchant that signed the member up, the member that referred it) and
-- the tier state. levels_reached is a bitmask over the version's levels (bit i: level i was reached
-- once, so its bonus is paid); qualifying_point_units counts base earn points net of refunds in total,
-- and day_buckets ({"<day since epoch>": point-units}) counts them per day for a rolling window.
CREATE TABLE member_programs (
    member_id              text PRIMARY KEY,
    acquirer_id            text,
    referrer_id            text,
    referral_paid          boolean NOT NULL DEFAULT false,
    level                  text NOT NULL DEFAULT '',
    levels_reached         bigint NOT NULL DEFAULT 0,
    qualifying_point_units bigint NOT NULL DEFAULT 0,
    day_buckets            jsonb NOT NULL DEFAULT '{}',
    linked_at              timestamptz,
    CHECK (referrer_id IS NULL OR referrer_id <> member_id)
);

-- A member's level changes, next to the transaction that caused them (GetBalance shows the newest).
CREATE TABLE tier_events (
    transaction_id bigint NOT NULL,
    member_id      text NOT NULL,
    from_level     text NOT NULL,
    to_level       text NOT NULL,
    created_at     timestamptz NOT NULL
);
CREATE INDEX tier_events_member ON tier_events (member_id, created_at DESC);

-- What each earn was given beyond its base, for refunds (proportional clawback) and audit.
CREATE TABLE earn_rules (
    transaction_id           bigint PRIMARY KEY,
    base_point_units         bigint NOT NULL CHECK (base_point_units >= 0),
    uplift_point_units       bigint NOT NULL CHECK (uplift_point_units >= 0),
    acquirer_id              text,
    acquiring_point_units    bigint NOT NULL DEFAULT 0 CHECK (acquiring_point_units >= 0),
    -- base point-units refunded so far: the proportional clawbacks are cumulative over it
    refunded_base_point_units bigint NOT NULL DEFAULT 0 CHECK (refunded_base_point_units BETWEEN 0 AND base_point_units),
    -- [[promotion_id, sponsor_id, point-units], ...] in promotion order
    grants                   jsonb NOT NULL DEFAULT '[]'
);

-- Points a promotion gave out in all (gross: refunds do not refill a budget).
CREATE TABLE promotion_budgets (
    program_id   text NOT NULL,
    promotion_id text NOT NULL,
    granted      bigint NOT NULL CHECK (granted >= 0),
    PRIMARY KEY (program_id, promotion_id)
);

-- Expiry lots: the member's points that expire, one row per (lot, expiry instant); points that never
-- expire have no lot (they are posted minus held minus the lots). A lot is the points credited by one
-- transaction (lot_id = its transaction id); issuer_id is the merchant its breakage is attributed to.
CREATE TABLE lots (
    member_id     text NOT NULL,
    lot_id        bigint NOT NULL,
    expires_at_us bigint NOT NULL,
    issuer_id     text NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    PRIMARY KEY (member_id, lot_id, expires_at_us)
);
CREATE INDEX lots_due ON lots (expires_at_us);

-- The expiring lot pieces a hold or a redemption consumed and has not given back yet: what a void,
-- a partial capture or a refund restores. owner_kind 1 = hold (owner_id its authorization id),
-- 2 = transaction (a capture or redeem). A piece of the member's never-expiring points has
-- expires_at_us 9223372036854775807 (int64 max).
CREATE TABLE lot_consumptions (
    owner_kind    smallint NOT NULL CHECK (owner_kind IN (1, 2)),
    owner_id      bigint NOT NULL,
    lot_id        bigint NOT NULL,
    expires_at_us bigint NOT NULL,
    issuer_id     text NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    PRIMARY KEY (owner_kind, owner_id, lot_id, expires_at_us)
);

-- Dividend rounds (vouchers, the second asset). A round is decided at one Postgres snapshot (the pool
-- and every holding), stored with all its allocations, then posted in bounded chunks: each allocation
-- becomes a kind-11 transaction and gets its transaction_id in the same Postgres transaction, so a
-- round is posted exactly once whatever fails in between. Audit: which round, which pool, which rate.
CREATE TABLE dividend_rounds (
    program_id           text NOT NULL,
    round_number         integer NOT NULL CHECK (round_number >= 1),
    program_version      integer NOT NULL,
    pool_point_units     bigint NOT NULL CHECK (pool_point_units > 0),
    rate_bps             integer NOT NULL CHECK (rate_bps BETWEEN 1 AND 10000),
    holdings_point_units bigint NOT NULL CHECK (holdings_point_units >= 0),
    total_issued         bigint NOT NULL CHECK (total_issued >= 0),
    holders              integer NOT NULL,
    created_at           timestamptz NOT NULL,
    PRIMARY KEY (program_id, round_number)
);

CREATE TABLE dividend_allocations (
    program_id     text NOT NULL,
    round_number   integer NOT NULL,
    holder_kind    text NOT NULL CHECK (holder_kind IN ('member', 'merchant')),
    holder_id      text NOT NULL,
    holding        bigint NOT NULL CHECK (holding > 0),
    amount         bigint NOT NULL CHECK (amount > 0),
    transaction_id bigint,       -- NULL until posted
    PRIMARY KEY (program_id, round_number, holder_kind, holder_id)
);
CREATE INDEX dividend_allocations_unposted ON dividend_allocations (program_id, round_number)
    WHERE transaction_id IS NULL;

-- A redeem paid with vouchers and/or points (kind 12): its tender, for refunds in proportion (kind 13).
CREATE TABLE split_tenders (
    transaction_id bigint PRIMARY KEY,
    member_id      text NOT NULL,
    merchant_id    text NOT NULL,
    vouchers       bigint NOT NULL CHECK (vouchers >= 0),
    points         bigint NOT NULL CHECK (points >= 0),
    from_credit    bigint NOT NULL CHECK (from_credit BETWEEN 0 AND vouchers),
    refunded       bigint NOT NULL DEFAULT 0 CHECK (refunded BETWEEN 0 AND vouchers + points)
);
