-- Merchant network, credentials, fees, and settlement periods with statements.

ALTER TABLE merchants
    ADD COLUMN name             text NOT NULL DEFAULT '',
    ADD COLUMN region           text NOT NULL DEFAULT '',
    -- the operator's fee, basis points of point-units redeemed at / issued by the merchant
    ADD COLUMN fee_redeemed_bps integer NOT NULL DEFAULT 0 CHECK (fee_redeemed_bps BETWEEN 0 AND 10000),
    ADD COLUMN fee_issued_bps   integer NOT NULL DEFAULT 0 CHECK (fee_issued_bps BETWEEN 0 AND 10000);

-- The fee charged with a transaction, point-units (floor(amount * bps / 10000)); posted in the same
-- transaction from the merchant's fees account to the operator's fee revenue account.
ALTER TABLE transactions ADD COLUMN fee bigint NOT NULL DEFAULT 0 CHECK (fee >= 0);
-- statements aggregate transactions by commit time
CREATE INDEX transactions_created ON transactions (created_at);
CREATE INDEX transactions_merchant_created ON transactions (merchant_id, created_at, transaction_id);

INSERT INTO accounts (kind, owner_id, asset_code)
SELECT 'merchant_fees', merchant_id, 'POINTS' FROM merchants;
INSERT INTO accounts (kind, owner_id, asset_code) VALUES
    ('operator_fee_revenue', 'operator', 'POINTS'),
    ('operator_breakage', 'operator', 'POINTS');

-- Credentials: random keys shown once; only the SHA-256 of the secret part is stored (the secret is
-- 256 random bits, so a fast hash is enough: there is nothing to brute-force).
CREATE TABLE api_keys (
    key_id        text PRIMARY KEY,
    secret_sha256 bytea NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('merchant', 'gateway', 'operator')),
    merchant_ids  text[] NOT NULL DEFAULT '{}',
    description   text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CHECK ((kind = 'operator') = (cardinality(merchant_ids) = 0)),
    CHECK (kind <> 'merchant' OR cardinality(merchant_ids) = 1)
);

-- A period holds every transaction with opened_at <= created_at < cut_off. The service never commits a
-- transaction dated before the newest cut, so a closed period cannot change.
CREATE TABLE settlement_periods (
    period_id  bigint PRIMARY KEY,
    opened_at  timestamptz NOT NULL,
    cut_off    timestamptz NOT NULL UNIQUE,
    closed_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (cut_off > opened_at)
);

CREATE TABLE statements (
    period_id          bigint NOT NULL REFERENCES settlement_periods,
    merchant_id        text NOT NULL REFERENCES merchants,
    opening_position   bigint NOT NULL,
    issued             bigint NOT NULL,
    earn_refunds       bigint NOT NULL,
    redeemed           bigint NOT NULL,
    redemption_refunds bigint NOT NULL,
    fees               bigint NOT NULL,
    net                bigint NOT NULL,
    closing_position   bigint NOT NULL,
    transactions       bigint NOT NULL,
    PRIMARY KEY (period_id, merchant_id),
    CHECK (net = redeemed - redemption_refunds - issued + earn_refunds - fees),
    CHECK (closing_position = opening_position + net)
);
CREATE INDEX statements_merchant ON statements (merchant_id, period_id DESC);
