-- Member presence (docs/RULES.md section 10): the means a member proves it is at the till, and its
-- failure count and lock. One row per member that has enrolled anything or failed a proof. Written by
-- short transactions of their own before an operation is queued, never in a batch's transaction.
-- No foreign key to members: a member may enroll before its first earn creates its account.
CREATE TABLE member_credentials (
    member_id                 text PRIMARY KEY,
    -- RFC 6238 shared secret, base32. Returned once by EnrollMemberTotp; never logged.
    totp_secret               text,
    totp_enrolled_at          timestamptz,
    -- the newest 30-second time step whose code was accepted: a code is accepted once (replay
    -- protection), except again for the same operation (the merchant and idempotency key it came with)
    totp_last_step            bigint NOT NULL DEFAULT 0,
    totp_last_merchant_id     text,
    totp_last_idempotency_key text,
    -- the PIN, only as scrypt(pin, salt) with the parameters named in pin_params ("scrypt:n=16384,r=8,p=1")
    pin_hash                  bytea,
    pin_salt                  bytea,
    pin_params                text,
    pin_set_at                timestamptz,
    -- wrong proofs in a row; at the program's verification_failures_max the member's spending locks
    -- until locked_until and the count starts again
    failures                  integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    locked_until              timestamptz,
    updated_at                timestamptz NOT NULL DEFAULT now(),
    CHECK ((pin_hash IS NULL) = (pin_salt IS NULL))
);
