-- The audit log is append-only for every role, the table owner included: a DBA must be able to
-- prove what happened, so no one can rewrite it.

CREATE FUNCTION pay._audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'pay.audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit rows record what happened to a payment; they are never changed or removed.';
END;
$$;

CREATE TRIGGER audit_log_no_update_or_delete
    BEFORE UPDATE OR DELETE ON pay.audit_log
    FOR EACH ROW EXECUTE FUNCTION pay._audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON pay.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION pay._audit_log_is_append_only();

-- Writes one audit row for the plpgsql functions. The transition rule's writes in Rust
-- (extension/src/apply_intent.rs) insert the same row through their kept plan instead.
-- (plpgsql, not SQL: a SQL function that cannot be inlined is planned again on every call.)
CREATE FUNCTION pay._audit(
    p_payment_id uuid,
    p_from pay.payment_status,
    p_to pay.payment_status,
    p_cause text,
    p_evidence_id text DEFAULT NULL,
    p_proposed text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.audit_log (payment_id, from_status, to_status, proposed_status, cause, evidence_id)
    VALUES (p_payment_id, p_from, p_to, p_proposed, p_cause, p_evidence_id);
END;
$$;

CREATE FUNCTION pay.payment_timeline(payment_id uuid)
RETURNS TABLE (at timestamptz, event text, from_status pay.payment_status, to_status pay.payment_status,
               cause text, evidence_id text, actor text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT a.at,
           CASE WHEN a.proposed_status IS NOT NULL AND a.from_status IS NOT DISTINCT FROM a.to_status
                THEN 'ignored ' || a.proposed_status
                WHEN a.from_status IS NULL THEN 'created as ' || a.to_status
                WHEN a.from_status = a.to_status THEN 'noted'
                ELSE a.from_status || ' -> ' || a.to_status END,
           a.from_status, a.to_status, a.cause, a.evidence_id, a.actor
    FROM pay.audit_log a
    WHERE a.payment_id = payment_timeline.payment_id
    ORDER BY a.id;
$$;
