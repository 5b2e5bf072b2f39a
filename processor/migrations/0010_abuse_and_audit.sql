-- Abuse limits and operators (issue 13, sections 6 and 7).
--
-- API keys get an optional expiry (a key past it is refused UNAUTHENTICATED) and the time it was last
-- used (written by the service at most once a minute per key, in batches; NULL = never used).
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;

-- The audit trail: one row per state-changing operator call (MerchantAdmin, Clearing, Programs and any
-- later operator service, as processor/audit.py classifies their methods) and per state-changing CLI
-- command (key_id 'cli'). Append-only: the trigger below refuses UPDATE, DELETE and TRUNCATE.
CREATE TABLE audit_records (
    audit_id    bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- the calling API key's id, or 'cli' for a command run on the host
    key_id      text NOT NULL,
    -- the full gRPC method (/points.v1.MerchantAdmin/IssueApiKey) or the CLI command (cli key create)
    method      text NOT NULL,
    -- the request as JSON, its secrets (new keys, PINs) redacted
    request     jsonb NOT NULL,
    -- the gRPC status code name the call ended with (OK, INVALID_ARGUMENT, ...) and its message
    outcome     text NOT NULL,
    message     text NOT NULL DEFAULT '',
    request_id  text NOT NULL DEFAULT ''
);
CREATE INDEX audit_records_at ON audit_records (at);

CREATE FUNCTION audit_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_records is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_records_append_only();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only();
