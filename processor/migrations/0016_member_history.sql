-- MemberAdminService.ListTransactions reads the merges into a member by their target
-- (member_store.member_history), newest first, as it reads the transfers it received by
-- member_transfers_to: without this index each page read every merge ever made.
CREATE INDEX member_merges_target ON member_merges (target_member_id, transaction_id);
