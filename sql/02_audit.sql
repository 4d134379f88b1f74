-- The audit log is append-only for every role, the table owner included: a DBA must be able to
-- prove what happened, so no one can rewrite it. Its triggers fire ALWAYS, so that
-- session_replication_role = replica does not switch them off; what the owner or a superuser can
-- still do (disable a trigger, rewrite a whole chain) is what pay.verify_audit_log and an
-- external copy of the chain heads detect (README, security model).

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

-- The hash of one audit row: SHA-256 over the previous row's hash (of the same payment or
-- subscription; none for the first) and the row's content in one fixed spelling (jsonb text: no
-- setting such as TimeZone or DateStyle changes it; the time as unix seconds with microseconds).
-- A payment's row is hashed as it always was, so chains written before subscriptions existed
-- still verify.
CREATE FUNCTION pay._audit_row_hash(p_prev bytea, p_row pay.audit_log) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT sha256(coalesce(p_prev, '\x'::bytea) || convert_to(CASE WHEN p_row.subscription_id IS NULL
        THEN jsonb_build_array(
            p_row.id, p_row.payment_id, p_row.from_status, p_row.to_status, p_row.proposed_status,
            p_row.cause, p_row.evidence_id, p_row.actor, extract(epoch FROM p_row.at))
        ELSE jsonb_build_array(
            p_row.id, 'subscription', p_row.subscription_id, p_row.from_state, p_row.to_state, p_row.proposed_status,
            p_row.cause, p_row.evidence_id, p_row.actor, extract(epoch FROM p_row.at)) END::text, 'SQL_ASCII'));
$$;

-- Chains every new audit row to its payment's newest one. The payment's row lock orders the rows
-- of one payment (every writer in pgpay holds it already, so it costs no wait), and the payment's
-- audit_head, read under that lock, is the chain's newest hash whatever the isolation level.
CREATE FUNCTION pay._audit_log_chain() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.subscription_id IS NOT NULL THEN
        -- A subscription's chain: the same, on the subscription's row and audit_head.
        SELECT s.audit_head INTO NEW.prev_hash FROM pay.subscriptions s WHERE s.id = NEW.subscription_id FOR NO KEY UPDATE;
        NEW.hash := pay._audit_row_hash(NEW.prev_hash, NEW);
        UPDATE pay.subscriptions s SET audit_head = NEW.hash WHERE s.id = NEW.subscription_id;
        RETURN NEW;
    END IF;
    SELECT p.audit_head INTO NEW.prev_hash FROM pay.payments p WHERE p.id = NEW.payment_id FOR NO KEY UPDATE;
    NEW.hash := pay._audit_row_hash(NEW.prev_hash, NEW);
    UPDATE pay.payments p SET audit_head = NEW.hash WHERE p.id = NEW.payment_id;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_log_chain
    BEFORE INSERT ON pay.audit_log
    FOR EACH ROW EXECUTE FUNCTION pay._audit_log_chain();

ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_or_delete;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;

-- Every audit row that is not what was written, in its place: changed (its hash does not cover its
-- content), after a deleted row or inserted out of order (not chained to the row before it), or
-- the last of a chain whose newer rows were deleted (the payment's audit_head is another hash).
-- Nothing for an intact log. A subscription's rows (payment_id NULL) are checked the same way
-- against the subscription's chain; their problems name the subscription.
CREATE FUNCTION pay.verify_audit_log()
RETURNS TABLE (audit_id bigint, payment_id uuid, problem text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    WITH chain AS (
        SELECT a.id, a.payment_id, a.prev_hash, a.hash, pay._audit_row_hash(a.prev_hash, a) AS recomputed,
               lag(a.id) OVER w AS previous_id, lag(a.hash) OVER w AS previous_hash
        FROM pay.audit_log a
        WHERE a.payment_id IS NOT NULL
        WINDOW w AS (PARTITION BY a.payment_id ORDER BY a.id)
    ), newest AS (
        SELECT DISTINCT ON (a.payment_id) a.payment_id, a.id, a.hash
        FROM pay.audit_log a WHERE a.payment_id IS NOT NULL ORDER BY a.payment_id, a.id DESC
    ), sub_chain AS (
        SELECT a.id, a.subscription_id, a.prev_hash, a.hash, pay._audit_row_hash(a.prev_hash, a) AS recomputed,
               lag(a.id) OVER w AS previous_id, lag(a.hash) OVER w AS previous_hash
        FROM pay.audit_log a
        WHERE a.subscription_id IS NOT NULL
        WINDOW w AS (PARTITION BY a.subscription_id ORDER BY a.id)
    ), sub_newest AS (
        SELECT DISTINCT ON (a.subscription_id) a.subscription_id, a.id, a.hash
        FROM pay.audit_log a WHERE a.subscription_id IS NOT NULL ORDER BY a.subscription_id, a.id DESC
    )
    SELECT c.id, c.payment_id, 'changed: its hash does not cover its content'
    FROM chain c WHERE c.hash IS DISTINCT FROM c.recomputed
    UNION ALL
    SELECT c.id, c.payment_id,
           CASE WHEN c.previous_id IS NULL
                THEN 'not chained to the start: an earlier row of this payment was deleted, or this one was inserted out of order'
                ELSE format('not chained to row %s before it: a row between them was deleted, or one of them was changed or inserted out of order',
                            c.previous_id) END
    FROM chain c WHERE c.prev_hash IS DISTINCT FROM c.previous_hash
    UNION ALL
    SELECT n.id, p.id,
           CASE WHEN n.id IS NULL THEN 'every audit row of this payment is missing'
                ELSE 'newer rows are missing: the payment''s chain head is not this row''s hash' END
    FROM pay.payments p LEFT JOIN newest n ON n.payment_id = p.id
    WHERE p.audit_head IS DISTINCT FROM n.hash
    UNION ALL
    SELECT c.id, NULL::uuid, 'subscription ' || c.subscription_id || ': ' || CASE
               WHEN c.hash IS DISTINCT FROM c.recomputed THEN 'changed: its hash does not cover its content'
               WHEN c.previous_id IS NULL THEN 'not chained to the start: an earlier row of this subscription was deleted, or this one was inserted out of order'
               ELSE format('not chained to row %s before it: a row between them was deleted, or one of them was changed or inserted out of order',
                           c.previous_id) END
    FROM sub_chain c WHERE c.hash IS DISTINCT FROM c.recomputed OR c.prev_hash IS DISTINCT FROM c.previous_hash
    UNION ALL
    SELECT n.id, NULL::uuid, 'subscription ' || s.id || ': ' || CASE WHEN n.id IS NULL
               THEN 'every audit row of this subscription is missing'
               ELSE 'newer rows are missing: the subscription''s chain head is not this row''s hash' END
    FROM pay.subscriptions s LEFT JOIN sub_newest n ON n.subscription_id = s.id
    WHERE s.audit_head IS DISTINCT FROM n.hash
    ORDER BY 2, 1;
$$;

-- Writes one audit row. Every status change goes through here. (plpgsql, not SQL: a SQL function
-- that cannot be inlined is planned again on every call.)

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
