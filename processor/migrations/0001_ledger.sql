-- The ledger: merchants, members, accounts, a double-entry journal, holds and idempotency records.
-- Amounts are int64 point-units (100 = 1 point = 1 currency unit) unless the column says otherwise.
-- Every entry carries an asset code so that a second asset (vouchers) and point lots with expiry can be
-- added without a rewrite: a lot becomes another account dimension, a voucher another asset.

CREATE TABLE assets (
    asset_code  text PRIMARY KEY,
    description text NOT NULL
);
INSERT INTO assets VALUES ('POINTS', 'alliance points; 100 point-units = 1 point = 1 currency unit');

CREATE TABLE merchants (
    merchant_id   text PRIMARY KEY,
    -- small dense number the fast path uses for the merchant
    merchant_slot integer NOT NULL UNIQUE CHECK (merchant_slot >= 0),
    give_back_bps integer NOT NULL CHECK (give_back_bps BETWEEN 300 AND 2000),
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE members (
    member_id  text PRIMARY KEY,
    created_at timestamptz NOT NULL
);

-- kind: member | merchant_issued | merchant_redeemed | merchant_fees | operator_fee_revenue |
-- operator_breakage. balance = sum of the account's entries. Sign convention: an entry's amount is
-- added to its account's balance; members hold positive balances, a merchant's issued account goes
-- negative by the points it gave (what it owes), its redeemed account positive by the points spent at
-- it (what it is owed). A merchant's net position is the sum of its accounts' balances.
CREATE TABLE accounts (
    account_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text NOT NULL,
    owner_id   text NOT NULL,
    asset_code text NOT NULL REFERENCES assets,
    balance    bigint NOT NULL DEFAULT 0,
    UNIQUE (kind, owner_id, asset_code),
    CONSTRAINT member_balance_not_negative CHECK (kind <> 'member' OR balance >= 0)
);

-- kind: 1 earn, 2 capture, 3 redeem, 4 refund of a redemption, 5 refund of an earn (fastpath.KIND_*).
-- transaction_id is allocated by the single writer (the service holds an advisory lock).
CREATE TABLE transactions (
    transaction_id          bigint PRIMARY KEY,
    kind                    smallint NOT NULL CHECK (kind BETWEEN 1 AND 5),
    merchant_id             text NOT NULL REFERENCES merchants,
    member_id               text NOT NULL REFERENCES members,
    asset_code              text NOT NULL REFERENCES assets,
    amount                  bigint NOT NULL CHECK (amount >= 0),
    -- earns: the purchase, currency minor units
    purchase_amount         bigint,
    -- captures: the authorization captured
    authorization_id        bigint,
    -- refunds: the refunded transaction
    original_transaction_id bigint REFERENCES transactions,
    -- earns, captures, redeems: point-units refunded so far (<= amount)
    refunded                bigint NOT NULL DEFAULT 0 CHECK (refunded BETWEEN 0 AND amount),
    idempotency_key         text NOT NULL,
    created_at              timestamptz NOT NULL
);
CREATE INDEX transactions_member_newest ON transactions (member_id, transaction_id DESC);

CREATE TABLE entries (
    entry_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id bigint NOT NULL REFERENCES transactions,
    account_id     bigint NOT NULL REFERENCES accounts,
    asset_code     text NOT NULL REFERENCES assets,
    amount         bigint NOT NULL CHECK (amount <> 0)
);
CREATE INDEX entries_transaction ON entries (transaction_id);
CREATE INDEX entries_account ON entries (account_id);

-- status: 1 open, 2 captured, 3 voided, 4 expired (fastpath.HOLD_*). An open hold whose expires_at
-- has passed is expired whether or not its status has been rewritten yet.
CREATE TABLE holds (
    authorization_id       bigint PRIMARY KEY,
    merchant_id            text NOT NULL REFERENCES merchants,
    member_id              text NOT NULL REFERENCES members,
    asset_code             text NOT NULL REFERENCES assets,
    amount                 bigint NOT NULL CHECK (amount > 0),
    status                 smallint NOT NULL CHECK (status BETWEEN 1 AND 4),
    expires_at             timestamptz NOT NULL,
    created_at             timestamptz NOT NULL,
    resolved_at            timestamptz,
    captured               bigint NOT NULL DEFAULT 0 CHECK (captured BETWEEN 0 AND amount),
    capture_transaction_id bigint REFERENCES transactions,
    idempotency_key        text NOT NULL
);
CREATE INDEX holds_open_by_expiry ON holds (expires_at) WHERE status = 1;

-- One idempotency key (per merchant) maps to one request and one outcome, forever (or for the
-- configured retention). Rejections decided by the ledger are recorded too: a retry gets the same error.
CREATE TABLE idempotency_keys (
    merchant_id     text NOT NULL,
    idempotency_key text NOT NULL,
    method          text NOT NULL,
    request         jsonb NOT NULL,
    -- 'OK' or the error code name (NOT_FOUND, FAILED_PRECONDITION, ...)
    outcome         text NOT NULL,
    response        jsonb,
    message         text,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
