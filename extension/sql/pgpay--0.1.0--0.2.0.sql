-- pgpay 0.1.0 → 0.2.0. Run by `ALTER EXTENSION pgpay UPDATE TO '0.2.0'`, never by hand.
-- Every statement is re-runnable; no table that holds data is dropped. Released scripts are never
-- edited: once 0.2.0 ships, changes go into pgpay--0.2.0--<next>.sql.
\echo Use "ALTER EXTENSION pgpay UPDATE TO '0.2.0'" to load this file. \quit

-- Backups (sql/98_backups.sql): register every table that holds data, so a plain pg_dump carries it.
-- pg_extension_config_dump replaces an existing entry, so this is re-runnable.
SELECT pg_catalog.pg_extension_config_dump('pay.payments', '');
SELECT pg_catalog.pg_extension_config_dump('pay.orders', '');
SELECT pg_catalog.pg_extension_config_dump('pay.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('pay.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('pay.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.webhook_events', '');
SELECT pg_catalog.pg_extension_config_dump('pay.webhook_rejections', '');
SELECT pg_catalog.pg_extension_config_dump('pay.fulfillments', '');
SELECT pg_catalog.pg_extension_config_dump('pay.refunds', '');
SELECT pg_catalog.pg_extension_config_dump('pay.findings', '');
SELECT pg_catalog.pg_extension_config_dump('pay.findings_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pay.reconciliation_runs', '');
SELECT pg_catalog.pg_extension_config_dump('pay.reconciliation_runs_id_seq', '');

-- Findings can be resolved (pay.resolve_finding): who, when and why.
ALTER TABLE pay.findings ADD COLUMN IF NOT EXISTS resolved_by text;
ALTER TABLE pay.findings ADD COLUMN IF NOT EXISTS resolution_note text;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conrelid = 'pay.findings'::regclass AND conname = 'findings_resolution_complete') THEN
        -- Findings a DBA closed by hand at 0.1.0 (resolved_at set) get a resolver and a note.
        UPDATE pay.findings SET resolved_by = coalesce(resolved_by, 'unknown (before 0.2.0)'),
                                resolution_note = coalesce(resolution_note, 'resolved before 0.2.0')
        WHERE resolved_at IS NOT NULL;
        ALTER TABLE pay.findings ADD CONSTRAINT findings_resolution_complete CHECK (
            (resolved_at IS NULL) = (resolved_by IS NULL) AND (resolved_at IS NULL) = (resolution_note IS NULL));
    END IF;
END
$$;
CREATE OR REPLACE VIEW pay.reconciliation_findings AS
    SELECT f.id, f.kind, f.payment_id, p.order_ref, f.stripe_object_id, f.expected, f.actual, f.detail,
           f.run_id, f.found_at, f.resolved_at, f.resolved_at IS NULL AS open,
           f.resolved_by, f.resolution_note
    FROM pay.findings f
    LEFT JOIN pay.payments p ON p.id = f.payment_id;

-- Closes a finding once a human has dealt with it (a drift repaired, a refund issued by hand):
-- who, when and why are kept on the finding, and, when it names a payment, in that payment's
-- audit trail. `pgpay-worker status` counts open findings only.
CREATE OR REPLACE FUNCTION pay.resolve_finding(finding_id bigint, note text) RETURNS pay.reconciliation_findings
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.findings;
    v_status pay.payment_status;
    v_result pay.reconciliation_findings;
BEGIN
    IF note IS NULL OR btrim(note) = '' THEN
        RAISE EXCEPTION 'resolve_finding: note must say how finding % was resolved', finding_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(note) > 2000 THEN
        RAISE EXCEPTION 'resolve_finding: note is longer than 2000 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay.findings f WHERE f.id = resolve_finding.finding_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'resolve_finding: no finding %', finding_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v.resolved_at IS NOT NULL THEN
        RAISE EXCEPTION 'resolve_finding: finding % was already resolved at % by %', finding_id, v.resolved_at, v.resolved_by
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE pay.findings f
    SET resolved_at = now(), resolved_by = session_user, resolution_note = note
    WHERE f.id = v.id;
    IF v.payment_id IS NOT NULL THEN
        SELECT p.status INTO v_status FROM pay.payments p WHERE p.id = v.payment_id FOR NO KEY UPDATE;
        PERFORM pay._audit(v.payment_id, v_status, v_status,
            'finding ' || v.id || ' (' || v.kind || ') resolved: ' || note, 'finding:' || v.id);
    END IF;
    SELECT * INTO v_result FROM pay.reconciliation_findings r WHERE r.id = v.id;
    RETURN v_result;
END;
$$;
REVOKE ALL ON FUNCTION pay.resolve_finding(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.resolve_finding(bigint, text) TO pay_auditor;

-- begin_checkout: the same parameters after a canceled, expired or refused attempt start a new attempt.
CREATE OR REPLACE FUNCTION pay.begin_checkout(
    order_ref text,
    amount bigint,
    currency text,
    customer_ref text DEFAULT NULL,
    metadata jsonb DEFAULT '{}',
    description text DEFAULT NULL
) RETURNS pay.payments
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_metadata jsonb := coalesce(metadata, '{}');
    v_currency text;
    v_fingerprint text;
    v_latest pay.payments;
    v_paid pay.payments;
    v_new pay.payments;
    v_attempt int;
    v_params jsonb;
BEGIN
    v_currency := pay._checkout_validate(order_ref, amount, currency, customer_ref, v_metadata, description);
    v_fingerprint := pay.idempotency_key('pgpay.checkout', jsonb_build_object(
        'order_ref', order_ref, 'amount', amount, 'currency', v_currency,
        'customer_ref', customer_ref, 'metadata', v_metadata, 'description', description));

    -- The same call again returns the same row and writes nothing, not even a lock. An attempt
    -- that ended without payment (canceled, expired, refused by Stripe) is not returned: the same
    -- call then starts a new attempt, as a customer retrying the same cart expects.
    SELECT * INTO v_latest FROM pay.payments p
    WHERE p.order_ref = begin_checkout.order_ref ORDER BY p.attempt DESC LIMIT 1;
    IF FOUND AND v_latest.params_fingerprint = v_fingerprint
       AND v_latest.status NOT IN ('canceled', 'create_failed') THEN
        RETURN v_latest;
    END IF;

    -- Serialise every call for this order on the order's row (created by the first call).
    INSERT INTO pay.orders (order_ref) VALUES (begin_checkout.order_ref) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM pay.orders o WHERE o.order_ref = begin_checkout.order_ref FOR UPDATE;

    -- Read again under the lock: a concurrent caller may have just created the same attempt.
    SELECT * INTO v_latest FROM pay.payments p
    WHERE p.order_ref = begin_checkout.order_ref ORDER BY p.attempt DESC LIMIT 1;
    IF FOUND AND v_latest.params_fingerprint = v_fingerprint
       AND v_latest.status NOT IN ('canceled', 'create_failed') THEN
        RETURN v_latest;
    END IF;

    SELECT * INTO v_paid FROM pay.payments p
    WHERE p.order_ref = begin_checkout.order_ref AND p.status = 'succeeded';
    IF FOUND THEN
        RAISE EXCEPTION 'order % is already paid (payment %)', order_ref, v_paid.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'A paid order cannot start a new checkout; use pay.refund to give money back.';
    END IF;
    IF v_latest.status = 'processing' THEN
        RAISE EXCEPTION 'order % has a payment in progress (payment %, processing); its parameters cannot change now',
            order_ref, v_latest.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Wait for the payment to succeed or fail, then call pay.begin_checkout again.';
    END IF;

    v_attempt := coalesce(v_latest.attempt, 0) + 1;
    v_new.id := gen_random_uuid();

    IF v_latest.id IS NOT NULL AND v_latest.status NOT IN ('canceled', 'create_failed', 'superseded') THEN
        -- Changed parameters before payment: supersede the old attempt and cancel its PaymentIntent.
        UPDATE pay.payments p SET status = 'superseded', superseded_by = v_new.id, updated_at = now()
        WHERE p.id = v_latest.id;
        PERFORM pay._audit(v_latest.id, v_latest.status, 'superseded',
            'parameters changed: superseded by attempt ' || v_attempt, v_new.id::text);
        PERFORM pay._withdraw_payment_intent(v_latest.id, 'payment superseded before it was sent', 'abandoned');
    END IF;

    INSERT INTO pay.payments (id, order_ref, attempt, amount, currency, customer_ref, metadata, description, params_fingerprint)
    VALUES (v_new.id, begin_checkout.order_ref, v_attempt, begin_checkout.amount, v_currency,
            begin_checkout.customer_ref, v_metadata, begin_checkout.description, v_fingerprint)
    RETURNING * INTO v_new;
    PERFORM pay._audit(v_new.id, NULL, 'creating', 'checkout begun (attempt ' || v_attempt || ')');

    -- The exact Stripe request, form parameters in bracket notation. Our own metadata lets
    -- reconciliation find a PaymentIntent whose create answer was lost.
    v_params := jsonb_build_object(
            'amount', v_new.amount::text,
            'currency', v_new.currency,
            'metadata[pgpay_payment_id]', v_new.id::text,
            'metadata[order_ref]', v_new.order_ref)
        || coalesce((SELECT jsonb_object_agg('metadata[' || m.key || ']', m.value)
                     FROM jsonb_each_text(v_metadata) m), '{}')
        || jsonb_strip_nulls(jsonb_build_object(
            'description', v_new.description,
            'metadata[customer_ref]', v_new.customer_ref));
    PERFORM pay._enqueue(v_new.id, 'create_payment_intent',
        pay.idempotency_key('pgpay.pi_create', jsonb_build_object(
            'order_ref', v_new.order_ref, 'attempt', v_attempt, 'params', v_fingerprint)),
        'POST', '/v1/payment_intents', v_params);
    RETURN v_new;
END;
$$;


-- Status: a wrong webhook secret is loud. status_report() counts this hour's signature
-- mismatches and, when there were some, the signed deliveries accepted in the same hour
-- (`pgpay-worker status` exits 1 when every one was rejected).
-- What `pgpay-worker status` prints, and whether a human is needed.
CREATE OR REPLACE FUNCTION pay.status_report() RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT jsonb_build_object(
        'outbox', coalesce((SELECT jsonb_object_agg(s.status, s.n) FROM (
            SELECT o.status, count(*) AS n FROM pay.outbox o GROUP BY o.status) s), '{}'),
        'oldest_pending_seconds', (SELECT floor(extract(epoch FROM now() - min(o.created_at)))
                                   FROM pay.outbox o WHERE o.status IN ('pending', 'in_flight')),
        'dead_commands', (SELECT count(*) FROM pay.outbox o WHERE o.status = 'dead'),
        'expired_leases', (SELECT count(*) FROM pay.outbox o WHERE o.status = 'in_flight' AND o.lease_expires < now()),
        'stuck_payments', (SELECT count(*) FROM pay.stuck_payments),
        'flagged_payments', (SELECT count(*) FROM pay.flagged_payments),
        'open_findings', (SELECT count(*) FROM pay.findings f WHERE f.resolved_at IS NULL),
        'last_reconciliation', (SELECT to_jsonb(r) - 'lease_expires' FROM pay.reconciliation_runs r ORDER BY r.id DESC LIMIT 1),
        'webhook_rejections_24h', (SELECT coalesce(sum(r.count), 0) FROM pay.webhook_rejections r
                                   WHERE r.last_at > now() - interval '24 hours'),
        'live_webhook_secrets', (SELECT count(*) FROM pay.webhook_secrets s
                                 WHERE s.revoked_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now())),
        -- A wrong endpoint secret: signature mismatches in the last hour and not one signed
        -- delivery accepted. Rejections are counted by day; last_at says one was this hour.
        -- The scan of webhook_events (no index on received_at: every index is paid for by
        -- every delivery) only runs when there was such a rejection.
        'signature_mismatches_today', (SELECT coalesce(sum(r.count), 0) FROM pay.webhook_rejections r
                                       WHERE r.reason = 'signature_mismatch' AND r.day = current_date),
        'last_signature_mismatch_seconds', (SELECT floor(extract(epoch FROM now() - max(r.last_at)))::bigint
                                            FROM pay.webhook_rejections r
                                            WHERE r.reason = 'signature_mismatch' AND r.day >= current_date - 1),
        'webhooks_accepted_1h', CASE WHEN EXISTS (
                SELECT 1 FROM pay.webhook_rejections r
                WHERE r.reason = 'signature_mismatch' AND r.day >= current_date - 1
                  AND r.last_at > now() - interval '1 hour')
            THEN (SELECT count(*) FROM pay.webhook_events e
                  WHERE e.source = 'webhook' AND e.received_at > now() - interval '1 hour') END
    );
$$;
