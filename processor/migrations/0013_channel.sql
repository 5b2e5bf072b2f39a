-- Channel economics (issue 16; docs/RULES.md section 12): promoters who sign merchants up, regions as a
-- tree (province > city > county) with one regional agent per region, and what each of them earns at a
-- settlement cut: a share of the operator's fee revenue from their merchants, decided in the cut's own
-- transaction from the statements it writes (so it is exact to them) and posted to the journal by the
-- committer right after, as kinds 23 (promoter_commission) and 24 (regional_agent_share).

-- Kinds 16..31 are reserved for issues 15 and 16 (members 16..22, channel 23..26, seeds 27..31):
-- processor/kinds.py is the table, this constraint only keeps out what no release will use.
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check CHECK (kind BETWEEN 1 AND 31);

CREATE TABLE regions (
    region_id  text PRIMARY KEY,
    -- a province has no parent; a city's parent is a province, a county's a city (checked on insert by
    -- processor/channel_store.py, which also refuses a cycle: a region's parent exists before it)
    parent_id  text REFERENCES regions,
    level      text NOT NULL CHECK (level IN ('province', 'city', 'county')),
    name       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((level = 'province') = (parent_id IS NULL))
);

-- One agent per region; an agent serves one region (and, by the program's rule, the regions below it).
CREATE TABLE regional_agents (
    agent_id   text PRIMARY KEY,
    region_id  text NOT NULL UNIQUE REFERENCES regions,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE promoters (
    promoter_id text PRIMARY KEY,
    -- where the promoter works: free text for the operator (a region id by convention), not a payout rule
    region      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The promoter a merchant is assigned to now; the one assigned when a period is cut earns its commission
-- on the whole period (docs/RULES.md section 12: reassigning moves the next cut, not a past one).
CREATE TABLE merchant_promoters (
    merchant_id text PRIMARY KEY REFERENCES merchants,
    promoter_id text NOT NULL REFERENCES promoters,
    assigned_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX merchant_promoters_promoter ON merchant_promoters (promoter_id);

-- One statement per payee and period: a promoter (payee_kind 'promoter', payee_id = promoter_id) or a
-- region (payee_kind 'region', payee_id = region_id, paid to agent_id). fee_base = the operator's fee
-- revenue (point-units) from the payee's merchants in the period, the sum of their statements' fees;
-- amount = the sum of the lines' amounts, each floor(line fees x rate_bps / 10000) (in the operator's
-- favour). account_id: the payee's payable account (promoter_commissions / regional_agent_shares,
-- POINTS), opened at the cut. The posting's transactions.idempotency_key is posting_key: the committer
-- posts each statement with amount > 0 exactly once (store.unposted_channel finds those not posted).
CREATE TABLE channel_statements (
    period_id   bigint NOT NULL REFERENCES settlement_periods,
    payee_kind  text NOT NULL CHECK (payee_kind IN ('promoter', 'region')),
    payee_id    text NOT NULL,
    agent_id    text NOT NULL DEFAULT '',
    rate_bps    integer NOT NULL CHECK (rate_bps BETWEEN 0 AND 10000),
    fee_base    bigint NOT NULL CHECK (fee_base >= 0),
    amount      bigint NOT NULL CHECK (amount >= 0 AND amount <= fee_base),
    merchants   integer NOT NULL CHECK (merchants >= 0),
    account_id  bigint NOT NULL REFERENCES accounts,
    posting_key text NOT NULL UNIQUE,
    PRIMARY KEY (period_id, payee_kind, payee_id),
    CHECK ((payee_kind = 'region') = (agent_id <> ''))
);

-- No foreign keys, like the journal (migration 0003): the cut writes a line per payee and merchant (80,000
-- lines in 4.2 s with the two per-row FK triggers, measured at 20,000 merchants), and reconcile checks that
-- every line's statement and merchant exist (processor/channel_store.py discrepancies).
CREATE TABLE channel_statement_lines (
    period_id   bigint NOT NULL,
    payee_kind  text NOT NULL,
    payee_id    text NOT NULL,
    merchant_id text NOT NULL,
    fees        bigint NOT NULL CHECK (fees >= 0),
    amount      bigint NOT NULL CHECK (amount >= 0 AND amount <= fees),
    PRIMARY KEY (period_id, payee_kind, payee_id, merchant_id)
);

-- The committer finds unposted statements by their posting's key: kinds 23, 24 only.
CREATE INDEX transactions_channel_key ON transactions (idempotency_key) WHERE kind IN (23, 24);
