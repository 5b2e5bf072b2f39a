-- The seed systems' rules (issue 16; processor/rules.py section "The seed systems' rules", docs/RULES.md
-- section 11).

-- Kinds 27..31 (processor/kinds.py): merchant match, its reversal, sign-up bonus, fan reward in vouchers,
-- its reversal. 16..26 are other issues' (reserved); the check names the highest number any reserved kind
-- takes, so the migrations of those issues need not widen it again.
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check CHECK (kind BETWEEN 1 AND 31);

-- The operator's accounts funding the merchant match (众店: the merchant receives points as its
-- customer does), sign-up bonuses (seed 003) and fan rewards in vouchers (众店). A merchant's
-- merchant_points account (the points it holds from the match; not part of its net position, a holding
-- for dividend rounds) and its merchant_voucher_credit account (vouchers it owes: spent on credit, or a
-- fan reward reversed after it spent it) are opened by the batch that first moves them, as voucher
-- accounts are.
INSERT INTO accounts (kind, owner_id, asset_code) VALUES
    ('operator_merchant_match', 'operator', 'POINTS'),
    ('operator_signup_bonuses', 'operator', 'POINTS'),
    ('operator_fan_rewards', 'operator', 'VOUCHERS')
ON CONFLICT DO NOTHING;

-- Seed 000: a merchant may give back up to 100% when the program in force allows it ("1000 yuan ...
-- 1000 points"). The bounds are the program version's (give_back_bps_min/max, default 300..2000, checked
-- when a merchant is created or changed and at every earn); the column keeps only the absolute range.
ALTER TABLE merchants DROP CONSTRAINT merchants_give_back_bps_check;
ALTER TABLE merchants ADD CONSTRAINT merchants_give_back_bps_check CHECK (give_back_bps BETWEEN 1 AND 10000);
