-- Split-tender holds (docs/RULES.md, "Vouchers"): an Authorize with vouchers reserves voucher-units
-- beside an ordinary hold of its points (a row in holds under the same authorization_id, only when it
-- holds points: holds.amount > 0). Reserved vouchers post nothing until the capture, which posts one
-- SPLIT_REDEEM (kind 12) transaction of both assets; a void or the expiry releases them.
-- Units: voucher-units (100 = 1 voucher = 1 currency unit), point-units; status as holds.status
-- (1 open, 2 captured, 3 voided, 4 expired).
CREATE TABLE voucher_holds (
    authorization_id bigint PRIMARY KEY,
    member_id        text NOT NULL,
    merchant_id      text NOT NULL REFERENCES merchants,
    vouchers         bigint NOT NULL CHECK (vouchers > 0),
    -- of `vouchers`, reserved on the member's voucher credit (the rest are its own vouchers)
    from_credit      bigint NOT NULL CHECK (from_credit BETWEEN 0 AND vouchers),
    -- point-units of the same authorization, held in holds (0: a vouchers-only hold)
    points           bigint NOT NULL CHECK (points >= 0),
    expires_at       timestamptz NOT NULL,
    status           smallint NOT NULL DEFAULT 1 CHECK (status BETWEEN 1 AND 4),
    created_at       timestamptz NOT NULL,
    resolved_at      timestamptz,
    -- the capture's SPLIT_REDEEM transaction
    transaction_id   bigint REFERENCES transactions,
    CHECK ((status = 1) = (resolved_at IS NULL)),
    CHECK (transaction_id IS NULL OR status = 2)
);
CREATE INDEX voucher_holds_open ON voucher_holds (expires_at) WHERE status = 1;
