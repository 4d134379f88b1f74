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

-- Fulfillment retries: attempts, the last error, a backoff, a dead letter, fencing by consumer.
ALTER TABLE pay.fulfillments ADD COLUMN IF NOT EXISTS attempts int NOT NULL DEFAULT 0;
ALTER TABLE pay.fulfillments ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE pay.fulfillments ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz;
ALTER TABLE pay.fulfillments ADD COLUMN IF NOT EXISTS dead_at timestamptz;
-- complete_fulfillment gained the optional consumer (fencing): the one-argument form goes.
DROP FUNCTION IF EXISTS pay.complete_fulfillment(uuid);
-- Claims successful payments to provision, each held by one consumer at a time (a lease that
-- expires if the consumer dies). Provision and call pay.complete_fulfillment in one transaction
-- to provision exactly once. Rows whose last attempt failed wait until next_attempt_at; dead
-- rows (pay.dead_fulfillments) wait for pay.retry_fulfillment.
CREATE OR REPLACE FUNCTION pay.claim_fulfillments(consumer text, max_rows int DEFAULT 10, lease interval DEFAULT '5 minutes')
RETURNS SETOF pay.fulfillments
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    IF consumer IS NULL OR length(consumer) = 0 OR length(consumer) > 200 THEN
        RAISE EXCEPTION 'claim_fulfillments: consumer must be a name of 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 1000 THEN
        RAISE EXCEPTION 'claim_fulfillments: max_rows must be between 1 and 1000, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' THEN
        RAISE EXCEPTION 'claim_fulfillments: lease must be at least 1 second' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT f.payment_id FROM pay.fulfillments f
        WHERE f.completed_at IS NULL AND f.dead_at IS NULL
          AND (f.next_attempt_at IS NULL OR f.next_attempt_at <= now())
          AND (f.claimed_by IS NULL OR f.claim_expires < now())
        ORDER BY f.created_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    )
    UPDATE pay.fulfillments f
    SET claimed_by = consumer, claim_expires = now() + lease
    FROM picked
    WHERE f.payment_id = picked.payment_id
    RETURNING f.*;
END;
$$;

-- The claim a consumer still holds, locked: NULL when it is not (or no longer) the holder. A
-- consumer that names itself is fenced: once its lease expired and another consumer claimed the
-- row, it can neither complete nor fail that consumer's claim.
CREATE OR REPLACE FUNCTION pay._held_fulfillment(p_payment_id uuid, p_consumer text) RETURNS pay.fulfillments
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.fulfillments;
BEGIN
    SELECT * INTO v FROM pay.fulfillments f WHERE f.payment_id = p_payment_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % has nothing to fulfil (not succeeded, or flagged)', p_payment_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF p_consumer IS NOT NULL AND v.completed_at IS NULL
       AND (v.claimed_by IS DISTINCT FROM p_consumer OR v.claim_expires < now()) THEN
        RETURN NULL;
    END IF;
    RETURN v;
END;
$$;

-- Marks a fulfillment done. True the first time, false when it was already done. With
-- `consumer`, only the consumer whose claim is live may complete: a consumer whose lease expired
-- gets 55000, so the transaction that provisioned rolls back instead of provisioning twice.
CREATE OR REPLACE FUNCTION pay.complete_fulfillment(payment_id uuid, consumer text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.fulfillments;
BEGIN
    v := pay._held_fulfillment(complete_fulfillment.payment_id, consumer);
    IF v.payment_id IS NULL THEN
        RAISE EXCEPTION 'complete_fulfillment: consumer % no longer holds the claim on payment %', consumer, payment_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Its lease expired and the fulfillment was handed to another consumer: roll back this provisioning.';
    END IF;
    IF v.completed_at IS NOT NULL THEN
        RETURN false;
    END IF;
    UPDATE pay.fulfillments f
    SET completed_at = now(), claimed_by = NULL, claim_expires = NULL, next_attempt_at = NULL
    WHERE f.payment_id = v.payment_id;
    RETURN true;
END;
$$;

-- A setting of the fulfillment retry policy, validated (a bad value names the setting).
CREATE OR REPLACE FUNCTION pay._fulfillment_setting(p_name text, p_default text) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v text := coalesce(nullif(current_setting('pay.' || p_name, true), ''), p_default);
BEGIN
    BEGIN
        IF p_name = 'fulfillment_max_attempts' THEN
            IF v::int < 1 THEN RAISE invalid_parameter_value; END IF;
        ELSIF v::interval < interval '0' THEN
            RAISE invalid_parameter_value;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'setting pay.% = % is not valid', p_name, v
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN p_name = 'fulfillment_max_attempts' THEN 'a whole number of at least 1'
                              ELSE 'an interval such as ''30 seconds''' END;
    END;
    RETURN v;
END;
$$;

-- Records that provisioning failed: one more attempt, the error, and when to try again (after
-- `retry_in`, else an exponential backoff with full jitter between 0 and
-- min(pay.fulfillment_backoff_cap, pay.fulfillment_backoff_base * 2^(attempts - 1))). After
-- pay.fulfillment_max_attempts failures the row is dead (pay.dead_fulfillments) and audited.
-- Returns false, changing nothing, when `consumer` no longer holds the claim or the row is done.
CREATE OR REPLACE FUNCTION pay.fail_fulfillment(payment_id uuid, error text, retry_in interval DEFAULT NULL, consumer text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.fulfillments;
    v_max int := pay._fulfillment_setting('fulfillment_max_attempts', '10')::int;
    v_base interval := pay._fulfillment_setting('fulfillment_backoff_base', '10 seconds')::interval;
    v_cap interval := pay._fulfillment_setting('fulfillment_backoff_cap', '1 hour')::interval;
    v_attempts int;
    v_status pay.payment_status;
BEGIN
    IF error IS NULL OR btrim(error) = '' THEN
        RAISE EXCEPTION 'fail_fulfillment: error must say what failed' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF retry_in IS NOT NULL AND (retry_in < interval '0' OR retry_in > interval '30 days') THEN
        RAISE EXCEPTION 'fail_fulfillment: retry_in must be between 0 and 30 days, got %', retry_in
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := pay._held_fulfillment(fail_fulfillment.payment_id, consumer);
    IF v.payment_id IS NULL OR v.completed_at IS NOT NULL OR v.dead_at IS NOT NULL THEN
        RETURN false;
    END IF;
    v_attempts := v.attempts + 1;
    IF v_attempts >= v_max THEN
        UPDATE pay.fulfillments f
        SET attempts = v_attempts, last_error = left(error, 2000), dead_at = now(), next_attempt_at = NULL,
            claimed_by = NULL, claim_expires = NULL
        WHERE f.payment_id = v.payment_id;
        SELECT p.status INTO v_status FROM pay.payments p WHERE p.id = v.payment_id FOR NO KEY UPDATE;
        PERFORM pay._audit(v.payment_id, v_status, v_status,
            'fulfillment dead after ' || v_attempts || ' failed attempts: ' || left(error, 500));
    ELSE
        UPDATE pay.fulfillments f
        SET attempts = v_attempts, last_error = left(error, 2000), claimed_by = NULL, claim_expires = NULL,
            next_attempt_at = now() + coalesce(retry_in,
                random() * least(v_cap, v_base * power(2, least(v_attempts - 1, 30))))
        WHERE f.payment_id = v.payment_id;
    END IF;
    RETURN true;
END;
$$;

-- Hands a dead fulfillment out again, with a fresh budget of attempts (its last error stays).
CREATE OR REPLACE FUNCTION pay.retry_fulfillment(payment_id uuid) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_status pay.payment_status;
BEGIN
    UPDATE pay.fulfillments f
    SET dead_at = NULL, attempts = 0, next_attempt_at = NULL
    WHERE f.payment_id = retry_fulfillment.payment_id AND f.dead_at IS NOT NULL;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM pay.fulfillments f WHERE f.payment_id = retry_fulfillment.payment_id) THEN
            RAISE EXCEPTION 'retry_fulfillment: payment % has nothing to fulfil', payment_id USING ERRCODE = 'no_data_found';
        END IF;
        RETURN false;
    END IF;
    SELECT p.status INTO v_status FROM pay.payments p WHERE p.id = retry_fulfillment.payment_id FOR NO KEY UPDATE;
    PERFORM pay._audit(retry_fulfillment.payment_id, v_status, v_status, 'dead fulfillment handed out again by ' || session_user);
    RETURN true;
END;
$$;

-- Fulfillments that failed pay.fulfillment_max_attempts times: a human looks, then calls
-- pay.retry_fulfillment.
CREATE OR REPLACE VIEW pay.dead_fulfillments AS
    SELECT f.payment_id, f.order_ref, f.attempts, f.last_error, f.dead_at, f.created_at
    FROM pay.fulfillments f
    WHERE f.dead_at IS NOT NULL AND f.completed_at IS NULL;
REVOKE ALL ON FUNCTION pay.complete_fulfillment(uuid, text), pay.fail_fulfillment(uuid, text, interval, text),
    pay.retry_fulfillment(uuid), pay._held_fulfillment(uuid, text), pay._fulfillment_setting(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.complete_fulfillment(uuid, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.fail_fulfillment(uuid, text, interval, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.retry_fulfillment(uuid) TO pay_app;
GRANT SELECT ON pay.dead_fulfillments TO pay_app, pay_auditor;

-- ---------------------------------------------------------------------------------------------
-- Issue 11: one lookup of "the payment this Stripe object speaks of" (pay._payment_for, in Rust,
-- used by webhooks and reconciliation; the claimed id is checked by pay._claimed_payment_id, so
-- no unchecked string reaches a ::uuid cast), and the refund command built once
-- (pay._enqueue_refund, used by pay.refund and the duplicate-charge refund).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pay."_payment_for"(
	"intent_id" TEXT, /* Option < & str > */
	"claimed" TEXT /* Option < & str > */
) RETURNS uuid /* Option < Uuid > */
STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'payment_for_wrapper';

CREATE OR REPLACE FUNCTION pay."_claimed_payment_id"(
	"claimed" TEXT /* & str */
) RETURNS uuid /* Option < Uuid > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'claimed_payment_uuid_wrapper';

-- The one builder of a refund command (pay.refund and the duplicate-charge refund of
-- extension/src/apply_intent.rs): POST /v1/refunds for the payment's PaymentIntent, `amount`
-- NULL for all that is left, under the key pay.idempotency_key('pgpay.refund',
-- {payment_id} + key_parts). Returns the outbox command id.
CREATE OR REPLACE FUNCTION pay._enqueue_refund(p_payment_id uuid, p_intent_id text, p_amount bigint, p_reason text,
                                    p_key_parts jsonb)
RETURNS bigint
LANGUAGE sql
AS $$
    SELECT pay._enqueue(p_payment_id, 'refund',
        pay.idempotency_key('pgpay.refund', jsonb_build_object('payment_id', p_payment_id) || p_key_parts),
        'POST', '/v1/refunds',
        jsonb_strip_nulls(jsonb_build_object('payment_intent', p_intent_id, 'amount', p_amount::text,
                                             'reason', p_reason, 'metadata[pgpay_payment_id]', p_payment_id::text)));
$$;

-- Asks Stripe to refund part or all of a succeeded payment. Returns the outbox command id.
-- Amounts already refunded or being refunded count, so refunds never exceed what was received.
CREATE OR REPLACE FUNCTION pay.refund(payment_id uuid, amount bigint DEFAULT NULL, reason text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.payments;
    v_in_flight bigint;
    v_refundable bigint;
    v_amount bigint;
    v_ordinal int;
BEGIN
    SELECT * INTO v FROM pay.payments p WHERE p.id = refund.payment_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'refund: no payment %', payment_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v.status <> 'succeeded' THEN
        RAISE EXCEPTION 'refund: payment % is %, only a succeeded payment can be refunded', payment_id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF reason IS NOT NULL AND reason NOT IN ('duplicate', 'fraudulent', 'requested_by_customer') THEN
        RAISE EXCEPTION 'reason must be duplicate, fraudulent or requested_by_customer, got %', reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(sum((o.request #>> '{params,amount}')::bigint), 0) INTO v_in_flight
    FROM pay.outbox o WHERE o.payment_id = v.id AND o.kind = 'refund' AND o.status IN ('waiting', 'pending', 'in_flight');
    SELECT count(*) INTO v_ordinal FROM pay.outbox o WHERE o.payment_id = v.id AND o.kind = 'refund';
    v_refundable := greatest(v.amount_received, v.amount) - v.amount_refunded - v_in_flight;
    v_amount := coalesce(amount, v_refundable);
    IF v_amount < 1 OR v_amount > v_refundable THEN
        RAISE EXCEPTION 'amount must be between 1 and the % still refundable, got %', v_refundable, v_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pay._enqueue_refund(v.id, v.stripe_payment_intent_id, v_amount, reason,
        jsonb_build_object('ordinal', v_ordinal + 1, 'amount', v_amount));
END;
$$;

-- Applies one object read from Stripe's API. Outcomes: applied, unchanged, ignored, flagged,
-- adopted (a PaymentIntent carrying our metadata that the payment did not know), not_ours.
-- Drift is recorded as findings of run p_run_id.
CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent or Refund object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    payment_id := pay._payment_for(v_id, v_claimed);
    IF payment_id IS NULL THEN
        IF pay._claimed_payment_id(v_claimed) IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
            'the PaymentIntent names a pgpay payment this database does not have');
        outcome := 'not_ours';
        detail := 'names an unknown payment';
        RETURN;
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL THEN
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;


DROP FUNCTION IF EXISTS pay._payment_for_intent(text, jsonb);
REVOKE EXECUTE ON FUNCTION pay._payment_for(text, text), pay._claimed_payment_id(text),
    pay._enqueue_refund(uuid, text, bigint, text, jsonb) FROM PUBLIC;

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

-- ---------------------------------------------------------------------------------------------
-- Issue #9, defects 2, 5 and 11: sizes checked in SQL before Rust parses anything (a failed Rust
-- allocation aborts the backend); pay.idempotency_key works for the roles it is granted to;
-- reconciliation reads a payment id only in the canonical UUID form.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pay._bounded_json_text(p_value jsonb, p_field text, p_max_bytes int) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v_text text;
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF pg_column_size(p_value) > p_max_bytes THEN
        RAISE EXCEPTION '% is larger than % bytes', p_field, p_max_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_path_exists(p_value,
        'strict $.** ? (@.type() == "number" && (@ >= 1e30 || @ <= -1e30 || (@ != 0 && @ < 1e-30 && @ > -1e-30)))') THEN
        RAISE EXCEPTION '% holds a number beyond 1e30 in magnitude or nonzero below 1e-30', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A stored (compressed) value can be far larger once expanded: check the text too.
    v_text := p_value::text;
    IF octet_length(v_text) > p_max_bytes THEN
        RAISE EXCEPTION '% is larger than % bytes as text', p_field, p_max_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_text;
END;
$$;

REVOKE EXECUTE ON FUNCTION pay._bounded_json_text(jsonb, text, int) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pay.idempotency_key(scope text, parts jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    -- jsonb's text form keeps every digit of a number; pgpay-core canonicalises it (RFC 8785 style).
    RETURN pay._idempotency_key_of_text(scope, pay._bounded_json_text(parts, 'parts', 65536));
END;
$$;

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
    -- Bounded before Rust reads it (pay._bounded_json_text); the structure is checked in Rust.
    PERFORM pay._bounded_json_text(v_metadata, 'metadata', 131072);
    v_currency := pay._checkout_validate(order_ref, amount, currency, customer_ref, v_metadata, description);
    v_fingerprint := pay.idempotency_key('pgpay.checkout', jsonb_build_object(
        'order_ref', order_ref, 'amount', amount, 'currency', v_currency,
        'customer_ref', customer_ref, 'metadata', v_metadata, 'description', description));

    -- The same call again returns the same row and writes nothing, not even a lock.
    SELECT * INTO v_latest FROM pay.payments p
    WHERE p.order_ref = begin_checkout.order_ref ORDER BY p.attempt DESC LIMIT 1;
    IF FOUND AND v_latest.params_fingerprint = v_fingerprint THEN
        RETURN v_latest;
    END IF;

    -- Serialise every call for this order on the order's row (created by the first call).
    INSERT INTO pay.orders (order_ref) VALUES (begin_checkout.order_ref) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM pay.orders o WHERE o.order_ref = begin_checkout.order_ref FOR UPDATE;

    -- Read again under the lock: a concurrent caller may have just created the same attempt.
    SELECT * INTO v_latest FROM pay.payments p
    WHERE p.order_ref = begin_checkout.order_ref ORDER BY p.attempt DESC LIMIT 1;
    IF FOUND AND v_latest.params_fingerprint = v_fingerprint THEN
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

CREATE OR REPLACE FUNCTION pay.complete_outbox(id bigint, attempt int, http_status int, response jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    IF http_status IS NULL OR http_status < 200 OR http_status > 299 THEN
        RAISE EXCEPTION 'complete_outbox: http_status must be 2xx, got %', http_status
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use pay.retry_outbox or pay.fail_outbox for other answers.';
    END IF;
    IF response IS NULL OR jsonb_typeof(response) <> 'object' THEN
        RAISE EXCEPTION 'complete_outbox: response must be the JSON object Stripe answered'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pay._bounded_json_text(response, 'response', 1048576);
    v_command := pay._finish_outbox_if_current_attempt(id, attempt, 'done', http_status, NULL, response, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    CASE v_command.kind
        WHEN 'create_payment_intent', 'cancel_payment_intent' THEN
            PERFORM pay._apply_payment_intent(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint);
        WHEN 'refund' THEN
            PERFORM pay._apply_refund_answer(v_command.payment_id, response,
                'outbox:' || v_command.id || '#' || v_command.attempts);
        ELSE
            -- The domain pay.outbox_kind makes this unreachable; say so loudly if the two ever disagree.
            RAISE EXCEPTION 'complete_outbox: no handler for command kind %', v_command.kind
                USING ERRCODE = 'internal_error';
    END CASE;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for_intent(p_object ->> 'payment_intent', p_object -> 'metadata');
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent or Refund object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    SELECT * INTO v FROM pay.payments p WHERE p.stripe_payment_intent_id = v_id;
    IF NOT FOUND THEN
        IF v_claimed IS NULL
           OR v_claimed !~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        SELECT * INTO v FROM pay.payments p WHERE p.id = v_claimed::uuid;
        IF NOT FOUND THEN
            PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
                'the PaymentIntent names a pgpay payment this database does not have');
            outcome := 'not_ours';
            detail := 'names an unknown payment';
            RETURN;
        END IF;
    END IF;
    payment_id := v.id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL THEN
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;

CREATE OR REPLACE FUNCTION pay.apply_stripe_event(event jsonb)
RETURNS TABLE (status text, event_id text, detail text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    IF jsonb_typeof(event) IS DISTINCT FROM 'object' OR event ->> 'object' IS DISTINCT FROM 'event'
       OR event ->> 'id' IS NULL OR event ->> 'type' IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_event: not a Stripe event object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay._store_and_apply_event(pay._bounded_json_text(event, 'event', 1048576), 'api');
    RETURN QUERY SELECT CASE WHEN v.outcome IS NULL THEN 'duplicate' WHEN v.outcome = 'stored' THEN 'stored' ELSE 'applied' END,
                        event ->> 'id', v.detail;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Issue #9, defects 3 and 4: refunds are a ledger keyed by Stripe's refund id with the Stripe time
-- of each status; amount_refunded is derived from it, so every order of arrival gives the same
-- total; no signed event about a refund or a charge makes ingest raise.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pay.refunds ADD COLUMN IF NOT EXISTS evidence_at bigint;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS refunded_per_charge bigint NOT NULL DEFAULT 0;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS refunded_per_charge_at bigint;
-- What 0.1.0 recorded stays the total: kept as the charge's own report, older than any report to come.
UPDATE pay.payments p SET refunded_per_charge = p.amount_refunded, refunded_per_charge_at = 0
WHERE p.amount_refunded > 0 AND p.refunded_per_charge_at IS NULL;
CREATE OR REPLACE FUNCTION pay._evidence_time(p_event jsonb) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_event ->> 'created' ~ '^[0-9]{1,12}$' THEN (p_event ->> 'created')::bigint
                ELSE floor(extract(epoch FROM now()))::bigint END;
$$;

CREATE OR REPLACE FUNCTION pay._refund_status_rank(p_status text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE p_status WHEN 'pending' THEN 1 WHEN 'requires_action' THEN 2 WHEN 'succeeded' THEN 3
                         WHEN 'failed' THEN 4 WHEN 'canceled' THEN 5 ELSE 0 END;
$$;

CREATE OR REPLACE FUNCTION pay._refund_problem(p_refund jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p_refund) IS DISTINCT FROM 'object' OR p_refund ->> 'object' IS DISTINCT FROM 'refund'
                THEN 'it is not a Refund object'
                WHEN p_refund ->> 'id' IS NULL OR length(p_refund ->> 'id') > 255 THEN 'the Refund has no usable id'
                WHEN coalesce(p_refund ->> 'amount', '') !~ '^0*[1-9][0-9]{0,14}$' THEN 'the Refund has no whole positive amount'
           END;
$$;

CREATE OR REPLACE FUNCTION pay._record_refund(p_payment_id uuid, p_refund jsonb, p_at bigint) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.refunds AS r (refund_id, payment_id, amount, status, reason, evidence_at)
    VALUES (p_refund ->> 'id', p_payment_id, (p_refund ->> 'amount')::bigint,
            coalesce(left(p_refund ->> 'status', 100), 'unknown'), left(p_refund ->> 'reason', 200), p_at)
    ON CONFLICT (refund_id) DO UPDATE
        SET amount = excluded.amount, status = excluded.status, reason = coalesce(excluded.reason, r.reason),
            evidence_at = excluded.evidence_at, updated_at = now()
        -- The newest report wins; the same Stripe time goes to the later status (then the larger
        -- amount), so that the outcome never depends on which report came first.
        WHERE (excluded.evidence_at, pay._refund_status_rank(excluded.status), excluded.amount)
              > (coalesce(r.evidence_at, -1), pay._refund_status_rank(r.status), r.amount);
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION pay._derive_amount_refunded(p_payment_id uuid) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_total bigint;
BEGIN
    UPDATE pay.payments p
    SET amount_refunded = d.total, updated_at = now()
    FROM (
        SELECT least(greatest(l.counted,
                              CASE WHEN coalesce(p.refunded_per_charge_at, -1) > coalesce(l.newest, -1)
                                   THEN p.refunded_per_charge ELSE 0 END),
                     greatest(p.amount, p.amount_received)) AS total
        FROM pay.payments p,
             LATERAL (SELECT coalesce(sum(r.amount) FILTER (WHERE r.status NOT IN ('failed', 'canceled')), 0) AS counted,
                             max(r.evidence_at) AS newest
                      FROM pay.refunds r WHERE r.payment_id = p.id) l
        WHERE p.id = p_payment_id
    ) d
    WHERE p.id = p_payment_id AND p.amount_refunded IS DISTINCT FROM d.total
    RETURNING p.amount_refunded INTO v_total;
    IF NOT FOUND THEN
        SELECT p.amount_refunded INTO v_total FROM pay.payments p WHERE p.id = p_payment_id;
    END IF;
    RETURN v_total;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_refund_evidence(p_payment pay.payments, p_refund jsonb, p_evidence_id text, p_at bigint,
    OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_before bigint := p_payment.amount_refunded;
    v_after bigint;
BEGIN
    detail := pay._refund_problem(p_refund);
    IF detail IS NOT NULL THEN
        outcome := 'stored';
        detail := 'refund not applied: ' || detail;
        RETURN;
    END IF;
    IF NOT pay._record_refund(p_payment.id, p_refund, p_at) THEN
        outcome := 'unchanged';
        RETURN;
    END IF;
    v_after := pay._derive_amount_refunded(p_payment.id);
    PERFORM pay._audit(p_payment.id, p_payment.status, p_payment.status,
        format('refund %s of %s %s; refunded %s -> %s', p_refund ->> 'id', p_refund ->> 'amount',
               coalesce(p_refund ->> 'status', 'unknown'), v_before, v_after),
        p_evidence_id);
    outcome := 'applied';
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_charge_refunds(p_payment pay.payments, p_charge jsonb, p_evidence_id text, p_at bigint,
    OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_before bigint := p_payment.amount_refunded;
    v_after bigint;
    v_total text := p_charge ->> 'amount_refunded';
    v_changed boolean := false;
    v_refund jsonb;
BEGIN
    IF coalesce(v_total, '') !~ '^[0-9]{1,15}$' THEN
        outcome := 'stored';
        detail := 'charge not applied: it has no whole amount_refunded';
        RETURN;
    END IF;
    IF jsonb_typeof(p_charge #> '{refunds,data}') = 'array' THEN
        FOR v_refund IN SELECT e FROM jsonb_array_elements(p_charge #> '{refunds,data}') e LOOP
            IF pay._refund_problem(v_refund) IS NULL THEN
                v_changed := pay._record_refund(p_payment.id, v_refund, p_at) OR v_changed;
            END IF;
        END LOOP;
    END IF;
    UPDATE pay.payments p SET refunded_per_charge = v_total::bigint, refunded_per_charge_at = p_at
    WHERE p.id = p_payment.id
      AND (p_at, v_total::bigint) > (coalesce(p.refunded_per_charge_at, -1), p.refunded_per_charge);
    v_changed := FOUND OR v_changed;
    v_after := pay._derive_amount_refunded(p_payment.id);
    IF NOT v_changed THEN
        outcome := 'unchanged';
        RETURN;
    END IF;
    PERFORM pay._audit(p_payment.id, p_payment.status, p_payment.status,
        format('charge %s reports %s of %s refunded; refunded %s -> %s', coalesce(p_charge ->> 'id', 'without id'),
               v_total, coalesce(p_charge ->> 'amount', 'an unknown amount'), v_before, v_after),
        p_evidence_id);
    outcome := 'applied';
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_refund_answer(p_payment_id uuid, p_refund jsonb, p_evidence_id text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_problem text := pay._refund_problem(p_refund);
    v_result record;
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'evidence for payment % cannot be applied: %', p_payment_id, v_problem
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := pay._lock_payment(p_payment_id);
    v_result := pay._apply_refund_evidence(v, p_refund, p_evidence_id, floor(extract(epoch FROM now()))::bigint);
    RETURN v_result.outcome;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_event(p_event jsonb, p_payment pay.payments, OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_type text := p_event ->> 'type';
    v_object jsonb := p_event #> '{data,object}';
    v_event_id text := p_event ->> 'id';
BEGIN
    IF v_object ->> 'object' = 'refund' AND v_type LIKE '%refund.%' THEN
        SELECT a.outcome, a.detail INTO outcome, detail
        FROM pay._apply_refund_evidence(p_payment, v_object, v_event_id, pay._evidence_time(p_event)) a;
        IF outcome = 'stored' THEN
            RETURN;
        END IF;
    ELSIF v_type = 'charge.refunded' AND v_object ->> 'object' = 'charge' THEN
        SELECT a.outcome, a.detail INTO outcome, detail
        FROM pay._apply_charge_refunds(p_payment, v_object, v_event_id, pay._evidence_time(p_event)) a;
        IF outcome = 'stored' THEN
            RETURN;
        END IF;
    ELSIF v_type LIKE 'charge.dispute.%' AND v_object ->> 'object' = 'dispute' THEN
        UPDATE pay.payments p SET disputed = true, updated_at = now() WHERE p.id = p_payment.id AND NOT p.disputed;
        PERFORM pay._audit(p_payment.id, p_payment.status, p_payment.status,
            format('%s (%s, %s)', v_type, coalesce(v_object ->> 'reason', 'no reason'), coalesce(v_object ->> 'status', 'no status')),
            v_event_id);
        outcome := 'applied';
    ELSE
        outcome := 'stored';
        detail := 'no handler for ' || coalesce(v_type, 'an event without a type') || ' on this payment';
        RETURN;
    END IF;
    detail := v_type || ' -> ' || outcome;
END;
$$;

REVOKE EXECUTE ON FUNCTION pay._evidence_time(jsonb), pay._refund_status_rank(text), pay._refund_problem(jsonb),
    pay._record_refund(uuid, jsonb, bigint), pay._derive_amount_refunded(uuid),
    pay._apply_refund_evidence(pay.payments, jsonb, text, bigint), pay._apply_charge_refunds(pay.payments, jsonb, text, bigint)
    FROM PUBLIC;
-- ---------------------------------------------------------------------------------------------
-- Issue #9, defect 6: the audit log is tamper-evident. Each row carries a hash over its content and
-- the previous row's hash of the same payment; triggers fire ALWAYS; pay.verify_audit_log names
-- every row changed, deleted or inserted out of order. The rows 0.1.0 wrote are chained here.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS audit_head bytea;
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS prev_hash bytea;
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS hash bytea;
CREATE OR REPLACE FUNCTION pay._audit_row_hash(p_prev bytea, p_row pay.audit_log) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT sha256(coalesce(p_prev, '\x'::bytea) || convert_to(jsonb_build_array(
        p_row.id, p_row.payment_id, p_row.from_status, p_row.to_status, p_row.proposed_status,
        p_row.cause, p_row.evidence_id, p_row.actor, extract(epoch FROM p_row.at))::text, 'SQL_ASCII'));
$$;

CREATE OR REPLACE FUNCTION pay._audit_log_chain() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    SELECT p.audit_head INTO NEW.prev_hash FROM pay.payments p WHERE p.id = NEW.payment_id FOR NO KEY UPDATE;
    NEW.hash := pay._audit_row_hash(NEW.prev_hash, NEW);
    UPDATE pay.payments p SET audit_head = NEW.hash WHERE p.id = NEW.payment_id;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER audit_log_chain
    BEFORE INSERT ON pay.audit_log
    FOR EACH ROW EXECUTE FUNCTION pay._audit_log_chain();

-- Chain what is there, payment by payment in id order, as the trigger would have.
DO $chain$
DECLARE
    r pay.audit_log;
    v_payment uuid;
    v_prev bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pay.audit_log a WHERE a.hash IS NULL) THEN
        RETURN;
    END IF;
    ALTER TABLE pay.audit_log DISABLE TRIGGER audit_log_no_update_or_delete;
    FOR r IN SELECT * FROM pay.audit_log a ORDER BY a.payment_id, a.id LOOP
        IF r.payment_id IS DISTINCT FROM v_payment THEN
            v_payment := r.payment_id;
            v_prev := NULL;
        END IF;
        r.prev_hash := v_prev;
        r.hash := pay._audit_row_hash(v_prev, r);
        UPDATE pay.audit_log a SET prev_hash = r.prev_hash, hash = r.hash WHERE a.id = r.id;
        v_prev := r.hash;
    END LOOP;
    UPDATE pay.payments p SET audit_head = n.hash
    FROM (SELECT DISTINCT ON (a.payment_id) a.payment_id, a.hash FROM pay.audit_log a ORDER BY a.payment_id, a.id DESC) n
    WHERE p.id = n.payment_id;
    ALTER TABLE pay.audit_log ENABLE TRIGGER audit_log_no_update_or_delete;
END;
$chain$;
ALTER TABLE pay.audit_log ALTER COLUMN hash SET NOT NULL;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_or_delete;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
CREATE OR REPLACE FUNCTION pay.verify_audit_log()
RETURNS TABLE (audit_id bigint, payment_id uuid, problem text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    WITH chain AS (
        SELECT a.id, a.payment_id, a.prev_hash, a.hash, pay._audit_row_hash(a.prev_hash, a) AS recomputed,
               lag(a.id) OVER w AS previous_id, lag(a.hash) OVER w AS previous_hash
        FROM pay.audit_log a
        WINDOW w AS (PARTITION BY a.payment_id ORDER BY a.id)
    ), newest AS (
        SELECT DISTINCT ON (a.payment_id) a.payment_id, a.id, a.hash
        FROM pay.audit_log a ORDER BY a.payment_id, a.id DESC
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
    ORDER BY 2, 1;
$$;

REVOKE EXECUTE ON FUNCTION pay._audit_row_hash(bytea, pay.audit_log), pay._audit_log_chain(), pay.verify_audit_log() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.verify_audit_log() TO pay_auditor;
-- ---------------------------------------------------------------------------------------------
-- Issue #9, defect 7: pay.refund takes the application's refund_ref (a retry queues nothing).
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION IF EXISTS pay.refund(uuid, bigint, text);
CREATE OR REPLACE FUNCTION pay.refund(payment_id uuid, amount bigint DEFAULT NULL, reason text DEFAULT NULL,
                           refund_ref text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.payments;
    v_in_flight bigint;
    v_refundable bigint;
    v_amount bigint;
    v_ordinal int;
    v_params jsonb;
    v_key text;
    v_earlier pay.outbox;
BEGIN
    IF refund_ref IS NOT NULL AND (length(refund_ref) NOT BETWEEN 1 AND 200 OR refund_ref ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'refund: refund_ref must be 1 to 200 characters without control characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reason IS NOT NULL AND reason NOT IN ('duplicate', 'fraudulent', 'requested_by_customer') THEN
        RAISE EXCEPTION 'reason must be duplicate, fraudulent or requested_by_customer, got %', reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = refund.payment_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'refund: no payment %', payment_id USING ERRCODE = 'no_data_found';
    END IF;
    IF refund_ref IS NOT NULL THEN
        -- Under the payment's lock: a retry racing the first call finds its command here.
        v_key := pay.idempotency_key('pgpay.refund.ref', jsonb_build_object('payment_id', v.id, 'refund_ref', refund_ref));
        SELECT * INTO v_earlier FROM pay.outbox o WHERE o.idempotency_key = v_key;
        IF FOUND THEN
            IF (amount IS NOT NULL AND amount IS DISTINCT FROM (v_earlier.request #>> '{params,amount}')::bigint)
               OR reason IS DISTINCT FROM v_earlier.request #>> '{params,reason}' THEN
                RAISE EXCEPTION 'refund: refund_ref % of payment % was already used for a refund of % (reason %)',
                    refund_ref, v.id, v_earlier.request #>> '{params,amount}', coalesce(v_earlier.request #>> '{params,reason}', 'none')
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'The same refund_ref must repeat the same amount and reason; use another refund_ref for another refund.';
            END IF;
            RETURN v_earlier.id;
        END IF;
    END IF;
    IF v.status <> 'succeeded' THEN
        RAISE EXCEPTION 'refund: payment % is %, only a succeeded payment can be refunded', payment_id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT coalesce(sum((o.request #>> '{params,amount}')::bigint), 0) INTO v_in_flight
    FROM pay.outbox o WHERE o.payment_id = v.id AND o.kind = 'refund' AND o.status IN ('waiting', 'pending', 'in_flight');
    SELECT count(*) INTO v_ordinal FROM pay.outbox o WHERE o.payment_id = v.id AND o.kind = 'refund';
    v_refundable := greatest(v.amount_received, v.amount) - v.amount_refunded - v_in_flight;
    v_amount := coalesce(amount, v_refundable);
    IF v_amount < 1 OR v_amount > v_refundable THEN
        RAISE EXCEPTION 'amount must be between 1 and the % still refundable, got %', v_refundable, v_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_params := jsonb_build_object('payment_intent', v.stripe_payment_intent_id, 'amount', v_amount::text,
                                   'metadata[pgpay_payment_id]', v.id::text)
        || jsonb_strip_nulls(jsonb_build_object('reason', reason, 'metadata[pgpay_refund_ref]', refund_ref));
    RETURN pay._enqueue(v.id, 'refund',
        coalesce(v_key, pay.idempotency_key('pgpay.refund', jsonb_build_object('payment_id', v.id, 'ordinal', v_ordinal + 1,
                                                                               'amount', v_amount))),
        'POST', '/v1/refunds', v_params);
END;
$$;

REVOKE EXECUTE ON FUNCTION pay.refund(uuid, bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.refund(uuid, bigint, text, text) TO pay_app;
-- ---------------------------------------------------------------------------------------------
-- Issue #9, defect 12: CREATE EXTENSION now refuses to adopt a pay_* role that can log in, is or
-- can become a superuser, creates roles or bypasses row security. An installed database keeps its
-- roles (refusing here would fail the upgrade, not fix the role): say so loudly instead.
-- ---------------------------------------------------------------------------------------------
DO $roles$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT r.rolname FROM pg_catalog.pg_roles r
        WHERE r.rolname IN ('pay_app', 'pay_webhook', 'pay_worker', 'pay_auditor')
          AND (r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolbypassrls
               OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles s
                          WHERE s.rolsuper AND s.oid <> r.oid AND pg_catalog.pg_has_role(r.oid, s.oid, 'MEMBER')))
    LOOP
        RAISE WARNING 'pgpay: role % can log in, is or can become a superuser, creates roles or bypasses row security', v.rolname
            USING HINT = 'pgpay''s roles are group roles shared by every database of the cluster: ALTER ROLE ... NOLOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS and grant it to login roles instead.';
    END LOOP;
END
$roles$;

-- ---------------------------------------------------------------------------------------------
-- Issue 12: Checkout Sessions (session mode). pay.begin_checkout gains mode, success_url and
-- cancel_url; payments gain mode, stripe_checkout_session_id, checkout_url, checkout_expires_at;
-- outbox kinds create_checkout_session and expire_checkout_session; pay.wait_for_checkout;
-- sessions applied through the one transition rule (pay._apply_checkout_session, Rust) by
-- webhooks, outbox answers and reconciliation; the re-key past Stripe's key retention covers
-- session creates.
-- ---------------------------------------------------------------------------------------------
ALTER DOMAIN pay.outbox_kind DROP CONSTRAINT IF EXISTS outbox_kind_known;
ALTER DOMAIN pay.outbox_kind ADD CONSTRAINT outbox_kind_known
    CHECK (VALUE IN ('create_payment_intent', 'cancel_payment_intent', 'refund',
                     'create_checkout_session', 'expire_checkout_session'));
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                   WHERE n.nspname = 'pay' AND t.typname = 'checkout_mode') THEN
        CREATE DOMAIN pay.checkout_mode AS text
            CONSTRAINT checkout_mode_known CHECK (VALUE IN ('payment_intent', 'session'));
    END IF;
END
$$;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS mode pay.checkout_mode NOT NULL DEFAULT 'payment_intent';
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS stripe_checkout_session_id text;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS checkout_url text;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS checkout_expires_at timestamptz;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conrelid = 'pay.payments'::regclass AND conname = 'payments_checkout_session_unique') THEN
        ALTER TABLE pay.payments ADD CONSTRAINT payments_checkout_session_unique UNIQUE (stripe_checkout_session_id);
    END IF;
END
$$;
ALTER TABLE pay.payments DROP CONSTRAINT IF EXISTS payments_intent_once_known;
ALTER TABLE pay.payments ADD CONSTRAINT payments_intent_once_known CHECK (status IN ('creating', 'create_failed', 'superseded', 'canceled')
    OR stripe_payment_intent_id IS NOT NULL OR stripe_checkout_session_id IS NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_one_session_create_per_payment ON pay.outbox (payment_id)
    WHERE kind = 'create_checkout_session';

CREATE OR REPLACE FUNCTION pay."_checkout_validate_mode"(
	"mode" TEXT, /* Option < & str > */
	"success_url" TEXT, /* Option < & str > */
	"cancel_url" TEXT /* Option < & str > */
) RETURNS void
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'checkout_validate_mode_wrapper';

CREATE OR REPLACE FUNCTION pay."_apply_checkout_session"(
	"payment_id" uuid, /* Uuid */
	"session" jsonb, /* JsonB */
	"cause" TEXT, /* & str */
	"evidence_id" TEXT, /* Option < & str > */
	"evidence_at" bigint, /* i64 */
	"event_type" TEXT /* Option < & str > */
) RETURNS TEXT /* & 'static str */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'apply_checkout_session_wrapper';

-- Writes one command and rings the doorbell. A command whose path needs the PaymentIntent id
-- ({payment_intent}) or the Checkout Session id ({checkout_session}) waits until the create command
-- brings it back. Returns NULL when the key exists already (the same command was written before:
-- nothing to do).
CREATE OR REPLACE FUNCTION pay._enqueue(
    p_payment_id uuid,
    p_kind text,
    p_idempotency_key text,
    p_method text,
    p_path text,
    p_params jsonb
) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_known text;
    v_status text := 'pending';
    v_path text := p_path;
    v_id bigint;
BEGIN
    IF position('{payment_intent}' IN p_path) > 0 THEN
        SELECT p.stripe_payment_intent_id INTO v_known FROM pay.payments p WHERE p.id = p_payment_id;
        IF v_known IS NULL THEN
            v_status := 'waiting';
        ELSE
            v_path := replace(p_path, '{payment_intent}', v_known);
        END IF;
    ELSIF position('{checkout_session}' IN p_path) > 0 THEN
        SELECT p.stripe_checkout_session_id INTO v_known FROM pay.payments p WHERE p.id = p_payment_id;
        IF v_known IS NULL THEN
            v_status := 'waiting';
        ELSE
            v_path := replace(p_path, '{checkout_session}', v_known);
        END IF;
    END IF;
    INSERT INTO pay.outbox (payment_id, kind, idempotency_key, request, status)
    VALUES (p_payment_id, p_kind, p_idempotency_key,
            jsonb_build_object('method', p_method, 'path', v_path, 'params', p_params), v_status)
    ON CONFLICT ON CONSTRAINT outbox_idempotency_key_unique DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NOT NULL AND v_status = 'pending' THEN
        -- A doorbell without data: identical payloads fold into one NOTIFY per transaction.
        PERFORM pg_notify('pay_outbox', '');
    END IF;
    RETURN v_id;
END;
$$;

-- Called once an id a path waits for is known (p_placeholder '{payment_intent}' or
-- '{checkout_session}'): the commands that waited for it become sendable.
CREATE OR REPLACE FUNCTION pay._release_waiting(p_payment_id uuid, p_placeholder text, p_value text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE pay.outbox o
    SET status = 'pending',
        request = jsonb_set(o.request, '{path}', to_jsonb(replace(o.request ->> 'path', p_placeholder, p_value))),
        run_after = now(),
        updated_at = now()
    WHERE o.payment_id = p_payment_id AND o.status = 'waiting'
      AND position(p_placeholder IN o.request ->> 'path') > 0;
    IF FOUND THEN
        PERFORM pg_notify('pay_outbox', '');
    END IF;
END;
$$;

-- The PaymentIntent id is known (extension/src/apply_intent.rs calls this).
CREATE OR REPLACE FUNCTION pay._release_waiting_commands(p_payment_id uuid, p_intent text) RETURNS void
LANGUAGE sql
AS $$ SELECT pay._release_waiting(p_payment_id, '{payment_intent}', p_intent) $$;

CREATE OR REPLACE FUNCTION pay.complete_outbox(id bigint, attempt int, http_status int, response jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    IF http_status IS NULL OR http_status < 200 OR http_status > 299 THEN
        RAISE EXCEPTION 'complete_outbox: http_status must be 2xx, got %', http_status
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use pay.retry_outbox or pay.fail_outbox for other answers.';
    END IF;
    IF response IS NULL OR jsonb_typeof(response) <> 'object' THEN
        RAISE EXCEPTION 'complete_outbox: response must be the JSON object Stripe answered'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_command := pay._finish_outbox_if_current_attempt(id, attempt, 'done', http_status, NULL, response, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    CASE v_command.kind
        WHEN 'create_payment_intent', 'cancel_payment_intent' THEN
            PERFORM pay._apply_payment_intent(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint);
        WHEN 'create_checkout_session', 'expire_checkout_session' THEN
            PERFORM pay._apply_checkout_session(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint, NULL);
        WHEN 'refund' THEN
            PERFORM pay._apply_refund_answer(v_command.payment_id, response,
                'outbox:' || v_command.id || '#' || v_command.attempts);
        ELSE
            -- The domain pay.outbox_kind makes this unreachable; say so loudly if the two ever disagree.
            RAISE EXCEPTION 'complete_outbox: no handler for command kind %', v_command.kind
                USING ERRCODE = 'internal_error';
    END CASE;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION pay.fail_outbox(id bigint, attempt int, http_status int, error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
    v_payment pay.payments;
    v_message text := coalesce(error #>> '{error,message}', error ->> 'message', error::text, 'permanent failure');
BEGIN
    v_command := pay._finish_outbox_if_current_attempt(
        id, attempt, 'dead', http_status, left(v_message, 2000), error, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    SELECT * INTO v_payment FROM pay.payments p WHERE p.id = v_command.payment_id FOR NO KEY UPDATE;
    UPDATE pay.payments p SET last_error = error, updated_at = now() WHERE p.id = v_payment.id;
    IF v_command.kind IN ('create_payment_intent', 'create_checkout_session') THEN
        -- Stripe refused the create: there will never be a PaymentIntent (or Checkout Session)
        -- for this attempt.
        IF v_payment.status = 'creating' THEN
            UPDATE pay.payments p SET status = 'create_failed', updated_at = now() WHERE p.id = v_payment.id;
            PERFORM pay._audit(v_payment.id, v_payment.status, 'create_failed',
                'Stripe refused the create (HTTP ' || coalesce(http_status::text, '?') || '): ' || left(v_message, 500),
                'outbox:' || v_command.id || '#' || v_command.attempts);
        END IF;
        PERFORM pay._skip_waiting_commands(v_payment.id, CASE v_command.kind
            WHEN 'create_payment_intent' THEN 'the PaymentIntent was never created'
            ELSE 'the Checkout Session was never created' END);
    ELSE
        PERFORM pay._audit(v_payment.id, v_payment.status, v_payment.status,
            v_command.kind || ' refused by Stripe (HTTP ' || coalesce(http_status::text, '?') || '): ' || left(v_message, 500),
            'outbox:' || v_command.id || '#' || v_command.attempts);
    END IF;
    RETURN true;
END;
$$;

-- Withdraws an attempt's request to Stripe. A create that was never sent is skipped: nothing
-- exists at Stripe. Otherwise the PaymentIntent is canceled, or the Checkout Session expired,
-- through the outbox (the command waits for the id if the create is still on its way). Returns
-- true when nothing was ever sent.
CREATE OR REPLACE FUNCTION pay._withdraw_attempt(p_payment_id uuid, p_why text, p_cancellation_reason text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_create pay.outbox;
BEGIN
    SELECT * INTO v_create FROM pay.outbox o
    WHERE o.payment_id = p_payment_id AND o.kind IN ('create_payment_intent', 'create_checkout_session')
    FOR UPDATE;
    IF v_create.status = 'pending' AND v_create.attempts = 0 THEN
        UPDATE pay.outbox o SET status = 'skipped', last_error = p_why, completed_at = now(), updated_at = now()
        WHERE o.id = v_create.id;
        RETURN true;
    END IF;
    IF v_create.status IS DISTINCT FROM 'dead' THEN
        IF v_create.kind = 'create_checkout_session' THEN
            -- A Checkout Session takes no reason: expiring it is how it is withdrawn.
            PERFORM pay._enqueue(p_payment_id, 'expire_checkout_session',
                pay.idempotency_key('pgpay.cs_expire', jsonb_build_object('payment_id', p_payment_id)),
                'POST', '/v1/checkout/sessions/{checkout_session}/expire', '{}');
        ELSE
            PERFORM pay._enqueue(p_payment_id, 'cancel_payment_intent',
                pay.idempotency_key('pgpay.pi_cancel', jsonb_build_object('payment_id', p_payment_id)),
                'POST', '/v1/payment_intents/{payment_intent}/cancel',
                jsonb_build_object('cancellation_reason', p_cancellation_reason));
        END IF;
    END IF;
    RETURN false;
END;
$$;

-- begin_checkout gained mode, success_url and cancel_url: the six-argument form goes.
DROP FUNCTION IF EXISTS pay.begin_checkout(text, bigint, text, text, jsonb, text);

CREATE OR REPLACE FUNCTION pay.begin_checkout(
    order_ref text,
    amount bigint,
    currency text,
    customer_ref text DEFAULT NULL,
    metadata jsonb DEFAULT '{}',
    description text DEFAULT NULL,
    mode text DEFAULT 'payment_intent',
    success_url text DEFAULT NULL,
    cancel_url text DEFAULT NULL
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
    v_mode text := coalesce(begin_checkout.mode, 'payment_intent');
BEGIN
    v_currency := pay._checkout_validate(order_ref, amount, currency, customer_ref, v_metadata, description);
    PERFORM pay._checkout_validate_mode(v_mode, success_url, cancel_url);
    -- Session mode's own arguments join the fingerprint; a payment_intent checkout keeps the
    -- fingerprint it always had, so an upgrade does not make a repeated call look changed.
    v_fingerprint := pay.idempotency_key('pgpay.checkout', jsonb_build_object(
        'order_ref', order_ref, 'amount', amount, 'currency', v_currency,
        'customer_ref', customer_ref, 'metadata', v_metadata, 'description', description)
        || CASE WHEN v_mode = 'session' THEN jsonb_build_object(
               'mode', v_mode, 'success_url', success_url, 'cancel_url', cancel_url) ELSE '{}' END);

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
        PERFORM pay._withdraw_attempt(v_latest.id, 'payment superseded before it was sent', 'abandoned');
    END IF;

    INSERT INTO pay.payments (id, order_ref, attempt, amount, currency, customer_ref, metadata, description,
                              params_fingerprint, mode)
    VALUES (v_new.id, begin_checkout.order_ref, v_attempt, begin_checkout.amount, v_currency,
            begin_checkout.customer_ref, v_metadata, begin_checkout.description, v_fingerprint, v_mode)
    RETURNING * INTO v_new;
    PERFORM pay._audit(v_new.id, NULL, 'creating',
        'checkout begun (attempt ' || v_attempt || CASE WHEN v_mode = 'session' THEN ', session mode' ELSE '' END || ')');

    IF v_mode = 'session' THEN
        -- One hosted Checkout Session in payment mode with one line item. Our ids travel in the
        -- session's metadata and in its PaymentIntent's (payment_intent_data), so every event about
        -- either finds this payment, and a session whose create answer was lost can be found by
        -- listing sessions.
        v_params := jsonb_build_object(
                'mode', 'payment',
                'success_url', success_url,
                'client_reference_id', v_new.order_ref,
                'line_items[0][quantity]', '1',
                'line_items[0][price_data][currency]', v_new.currency,
                'line_items[0][price_data][unit_amount]', v_new.amount::text,
                'line_items[0][price_data][product_data][name]', coalesce(v_new.description, 'Order ' || v_new.order_ref),
                'metadata[pgpay_payment_id]', v_new.id::text,
                'metadata[order_ref]', v_new.order_ref,
                'payment_intent_data[metadata][pgpay_payment_id]', v_new.id::text,
                'payment_intent_data[metadata][order_ref]', v_new.order_ref)
            || coalesce((SELECT jsonb_object_agg(k.prefix || '[' || m.key || ']', m.value)
                         FROM jsonb_each_text(v_metadata) m,
                              unnest(ARRAY['metadata', 'payment_intent_data[metadata]']) k(prefix)), '{}')
            || jsonb_strip_nulls(jsonb_build_object(
                'cancel_url', cancel_url,
                'payment_intent_data[description]', v_new.description,
                'metadata[customer_ref]', v_new.customer_ref,
                'payment_intent_data[metadata][customer_ref]', v_new.customer_ref));
        PERFORM pay._enqueue(v_new.id, 'create_checkout_session',
            pay.idempotency_key('pgpay.cs_create', jsonb_build_object(
                'order_ref', v_new.order_ref, 'attempt', v_attempt, 'params', v_fingerprint)),
            'POST', '/v1/checkout/sessions', v_params);
        RETURN v_new;
    END IF;

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

CREATE OR REPLACE FUNCTION pay.cancel_checkout(payment_id uuid) RETURNS pay.payments
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.payments;
BEGIN
    SELECT * INTO v FROM pay.payments p WHERE p.id = cancel_checkout.payment_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cancel_checkout: no payment %', payment_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v.status = 'succeeded' THEN
        RAISE EXCEPTION 'cancel_checkout: payment % already succeeded', payment_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Use pay.refund to give the money back.';
    END IF;
    IF v.status IN ('canceled', 'create_failed', 'superseded') THEN
        RETURN v;  -- nothing left to cancel
    END IF;
    IF pay._withdraw_attempt(v.id, 'checkout canceled before it was sent', 'requested_by_customer') THEN
        UPDATE pay.payments p SET status = 'canceled', updated_at = now() WHERE p.id = v.id RETURNING * INTO v;
        PERFORM pay._audit(v.id, 'creating', 'canceled', CASE v.mode
            WHEN 'session' THEN 'checkout canceled before the Checkout Session was requested'
            ELSE 'checkout canceled before the PaymentIntent was requested' END);
    END IF;
    -- Otherwise Stripe decides: the status changes when the cancel's (or expire's) answer, or its
    -- webhook, arrives.
    RETURN v;
END;
$$;

-- Waits (polling, since LISTEN cannot be used inside a function) until the worker has stored what
-- the app needs to send the customer on: the PaymentIntent's client_secret (payment_intent mode,
-- or p_caller = 'wait_for_intent'), or the Checkout Session's URL (session mode). p_caller names
-- the SQL function in messages.
CREATE OR REPLACE FUNCTION pay._wait_until_ready(p_payment_id uuid, p_timeout_ms int, p_caller text) RETURNS pay.payments
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout_ms / 1000.0);
    v_pause float8 := 0.005;
    v_what text;
BEGIN
    IF p_timeout_ms IS NULL OR p_timeout_ms < 0 OR p_timeout_ms > 600000 THEN
        RAISE EXCEPTION '%: timeout_ms must be between 0 and 600000, got %', p_caller, p_timeout_ms
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        SELECT * INTO v FROM pay.payments p WHERE p.id = p_payment_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION '%: no payment %', p_caller, p_payment_id USING ERRCODE = 'no_data_found';
        END IF;
        IF v.mode = 'session' AND p_caller = 'wait_for_intent' THEN
            RAISE EXCEPTION 'wait_for_intent: payment % is in session mode and gets a checkout_url, not a client_secret', p_payment_id
                USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Use pay.wait_for_checkout.';
        END IF;
        v_what := CASE v.mode WHEN 'session' THEN 'Checkout Session' ELSE 'PaymentIntent' END;
        IF (v.mode = 'session' AND v.checkout_url IS NOT NULL)
           OR (v.mode = 'payment_intent' AND v.client_secret IS NOT NULL) THEN
            RETURN v;
        END IF;
        IF v.status IN ('create_failed', 'superseded', 'canceled') THEN
            RAISE EXCEPTION '%: payment % is % and will get no %', p_caller, p_payment_id, v.status, v_what
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = coalesce(v.last_error #>> '{error,message}', v.last_error::text, '');
        END IF;
        IF EXISTS (SELECT 1 FROM pay.payments p
                   WHERE p.id = v.id AND p.xmin::text::bigint = txid_current_if_assigned() % 4294967296) THEN
            RAISE EXCEPTION '%: payment % was created in this same transaction', p_caller, p_payment_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Commit the transaction that called pay.begin_checkout first: the worker cannot see it before.';
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION '%: no % for payment % after % ms', p_caller, v_what, p_payment_id, p_timeout_ms
                USING ERRCODE = 'query_canceled',
                      HINT = 'Is pgpay-worker running? See pay.outbox_health.';
        END IF;
        PERFORM pg_sleep(least(v_pause, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0)));
        v_pause := least(v_pause * 2, 0.05);
    END LOOP;
END;
$$;

-- Returns once the PaymentIntent exists (client_secret set); payment_intent mode only.
CREATE OR REPLACE FUNCTION pay.wait_for_intent(payment_id uuid, timeout_ms int DEFAULT 10000) RETURNS pay.payments
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$ SELECT * FROM pay._wait_until_ready(payment_id, timeout_ms, 'wait_for_intent') $$;

-- Returns once the app can send the customer on: client_secret in payment_intent mode,
-- checkout_url in session mode.
CREATE OR REPLACE FUNCTION pay.wait_for_checkout(payment_id uuid, timeout_ms int DEFAULT 10000) RETURNS pay.payments
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$ SELECT * FROM pay._wait_until_ready(payment_id, timeout_ms, 'wait_for_checkout') $$;

-- Applies one object read from Stripe's API (a PaymentIntent, a Checkout Session or a Refund).
-- Outcomes: applied, unchanged, ignored, flagged, adopted (a PaymentIntent or Checkout Session
-- carrying our metadata that the payment did not know: its create answer was lost), not_ours.
-- Drift is recorded as findings of run p_run_id.
CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'checkout.session' AND v_id IS NOT NULL AND v_status IS NOT NULL THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        detail := v_status || '/' || coalesce(p_object ->> 'payment_status', '');
        SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
        -- An open session the payment already knows, still open: nothing to write.
        IF v.stripe_checkout_session_id = v_id AND v_status = 'open' AND v.status = 'requires_payment_method' THEN
            outcome := 'unchanged';
            RETURN;
        END IF;
        v := pay._lock_payment(v.id);
        v_before := v.status;
        IF v.stripe_checkout_session_id IS NULL THEN
            -- A crash between Stripe's create and our commit: adopt the session, and close the
            -- create command so it is never sent again.
            v_adopted := true;
            UPDATE pay.outbox o
            SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
                last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
                attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
            WHERE o.payment_id = v.id AND o.kind = 'create_checkout_session' AND o.status IN ('pending', 'in_flight');
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
                'Checkout Session created at Stripe but never recorded; adopted');
        END IF;
        v_result := pay._apply_checkout_session(v.id, p_object, p_source, p_source || ':' || v_id,
                                                floor(extract(epoch FROM now()))::bigint, NULL);
        SELECT * INTO v FROM pay.payments p WHERE p.id = v.id;
        IF v_result IN ('applied', 'flagged') AND v.status <> v_before AND NOT v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v.status::text,
                'missed by webhooks; fixed from the API');
        END IF;
        outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent, Checkout Session or Refund object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    payment_id := pay._payment_for(v_id, v_claimed);
    IF payment_id IS NULL THEN
        IF pay._claimed_payment_id(v_claimed) IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
            'the PaymentIntent names a pgpay payment this database does not have');
        outcome := 'not_ours';
        detail := 'names an unknown payment';
        RETURN;
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL AND v.mode = 'payment_intent' THEN
        -- (In session mode the PaymentIntent is the session's, made by Stripe: not an orphan.)
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;

-- Past Stripe's idempotency key retention a create is never blindly re-sent with its old key (a
-- forgotten key creates a second PaymentIntent or Checkout Session): after the worker found none
-- with this payment's id, the command gets a new derived key, and the audit log says why. Fenced
-- by attempt.
CREATE OR REPLACE FUNCTION pay.rekey_create_command(id bigint, attempt int, reason text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
    v_payment pay.payments;
    v_key text;
BEGIN
    SELECT * INTO v_command FROM pay.outbox o
    WHERE o.id = rekey_create_command.id AND o.attempts = attempt AND o.status = 'in_flight'
      AND o.kind IN ('create_payment_intent', 'create_checkout_session')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_payment := pay._lock_payment(v_command.payment_id);
    IF (v_command.kind = 'create_payment_intent' AND v_payment.stripe_payment_intent_id IS NOT NULL)
       OR (v_command.kind = 'create_checkout_session' AND v_payment.stripe_checkout_session_id IS NOT NULL) THEN
        RETURN NULL;  -- it was adopted meanwhile: nothing to re-key
    END IF;
    v_key := pay.idempotency_key(CASE v_command.kind WHEN 'create_checkout_session' THEN 'pgpay.cs_create.rekeyed'
                                                     ELSE 'pgpay.pi_create.rekeyed' END,
        jsonb_build_object('previous', v_command.idempotency_key, 'attempt', attempt));
    UPDATE pay.outbox o SET idempotency_key = v_key, updated_at = now() WHERE o.id = v_command.id;
    PERFORM pay._audit(v_payment.id, v_payment.status, v_payment.status,
        'create re-keyed past Stripe''s key retention: ' || left(coalesce(reason, 'no reason given'), 500),
        'outbox:' || v_command.id || '#' || attempt);
    RETURN v_key;
END;
$$;

DROP FUNCTION IF EXISTS pay._withdraw_payment_intent(uuid, text, text);
REVOKE EXECUTE ON FUNCTION pay._checkout_validate_mode(text, text, text),
    pay._apply_checkout_session(uuid, jsonb, text, text, bigint, text),
    pay._release_waiting(uuid, text, text), pay._withdraw_attempt(uuid, text, text),
    pay._wait_until_ready(uuid, int, text),
    pay.begin_checkout(text, bigint, text, text, jsonb, text, text, text, text),
    pay.wait_for_checkout(uuid, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.begin_checkout(text, bigint, text, text, jsonb, text, text, text, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.wait_for_checkout(uuid, int) TO pay_app;

-- ---------------------------------------------------------------------------------------------
-- The final definitions of functions that more than one change of 0.2.0 rewrote (issues 9, 11,
-- 12 and the first-hour fixes each replaced them above): what a fresh 0.2.0 install has.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pay._enqueue_refund(p_payment_id uuid, p_intent_id text, p_amount bigint, p_reason text,
                                    p_key_parts jsonb)
RETURNS bigint
LANGUAGE sql
AS $$
    SELECT pay._enqueue(p_payment_id, 'refund',
        pay.idempotency_key('pgpay.refund', jsonb_build_object('payment_id', p_payment_id) || p_key_parts),
        'POST', '/v1/refunds',
        jsonb_strip_nulls(jsonb_build_object('payment_intent', p_intent_id, 'amount', p_amount::text,
                                             'reason', p_reason, 'metadata[pgpay_payment_id]', p_payment_id::text,
                                             'metadata[pgpay_refund_ref]', p_key_parts ->> 'refund_ref')));
$$;

CREATE OR REPLACE FUNCTION pay.refund(payment_id uuid, amount bigint DEFAULT NULL, reason text DEFAULT NULL,
                           refund_ref text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.payments;
    v_in_flight bigint;
    v_refundable bigint;
    v_amount bigint;
    v_ordinal int;
    v_key text;
    v_earlier pay.outbox;
BEGIN
    IF refund_ref IS NOT NULL AND (length(refund_ref) NOT BETWEEN 1 AND 200 OR refund_ref ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'refund: refund_ref must be 1 to 200 characters without control characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reason IS NOT NULL AND reason NOT IN ('duplicate', 'fraudulent', 'requested_by_customer') THEN
        RAISE EXCEPTION 'reason must be duplicate, fraudulent or requested_by_customer, got %', reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = refund.payment_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'refund: no payment %', payment_id USING ERRCODE = 'no_data_found';
    END IF;
    IF refund_ref IS NOT NULL THEN
        -- Under the payment's lock: a retry racing the first call finds its command here.
        -- The key pay._enqueue_refund gives the command of this refund_ref.
        v_key := pay.idempotency_key('pgpay.refund', jsonb_build_object('payment_id', v.id, 'refund_ref', refund_ref));
        SELECT * INTO v_earlier FROM pay.outbox o WHERE o.idempotency_key = v_key;
        IF FOUND THEN
            IF (amount IS NOT NULL AND amount IS DISTINCT FROM (v_earlier.request #>> '{params,amount}')::bigint)
               OR reason IS DISTINCT FROM v_earlier.request #>> '{params,reason}' THEN
                RAISE EXCEPTION 'refund: refund_ref % of payment % was already used for a refund of % (reason %)',
                    refund_ref, v.id, v_earlier.request #>> '{params,amount}', coalesce(v_earlier.request #>> '{params,reason}', 'none')
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'The same refund_ref must repeat the same amount and reason; use another refund_ref for another refund.';
            END IF;
            RETURN v_earlier.id;
        END IF;
    END IF;
    IF v.status <> 'succeeded' THEN
        RAISE EXCEPTION 'refund: payment % is %, only a succeeded payment can be refunded', payment_id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT coalesce(sum((o.request #>> '{params,amount}')::bigint), 0) INTO v_in_flight
    FROM pay.outbox o WHERE o.payment_id = v.id AND o.kind = 'refund' AND o.status IN ('waiting', 'pending', 'in_flight');
    SELECT count(*) INTO v_ordinal FROM pay.outbox o WHERE o.payment_id = v.id AND o.kind = 'refund';
    v_refundable := greatest(v.amount_received, v.amount) - v.amount_refunded - v_in_flight;
    v_amount := coalesce(amount, v_refundable);
    IF v_amount < 1 OR v_amount > v_refundable THEN
        RAISE EXCEPTION 'amount must be between 1 and the % still refundable, got %', v_refundable, v_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pay._enqueue_refund(v.id, v.stripe_payment_intent_id, v_amount, reason,
        CASE WHEN refund_ref IS NOT NULL THEN jsonb_build_object('refund_ref', refund_ref)
             ELSE jsonb_build_object('ordinal', v_ordinal + 1, 'amount', v_amount) END);
END;
$$;

CREATE OR REPLACE FUNCTION pay.begin_checkout(
    order_ref text,
    amount bigint,
    currency text,
    customer_ref text DEFAULT NULL,
    metadata jsonb DEFAULT '{}',
    description text DEFAULT NULL,
    mode text DEFAULT 'payment_intent',
    success_url text DEFAULT NULL,
    cancel_url text DEFAULT NULL
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
    v_mode text := coalesce(begin_checkout.mode, 'payment_intent');
BEGIN
    -- Bounded before Rust reads it (pay._bounded_json_text); the structure is checked in Rust.
    PERFORM pay._bounded_json_text(v_metadata, 'metadata', 131072);
    v_currency := pay._checkout_validate(order_ref, amount, currency, customer_ref, v_metadata, description);
    PERFORM pay._checkout_validate_mode(v_mode, success_url, cancel_url);
    -- Session mode's own arguments join the fingerprint; a payment_intent checkout keeps the
    -- fingerprint it always had, so an upgrade does not make a repeated call look changed.
    v_fingerprint := pay.idempotency_key('pgpay.checkout', jsonb_build_object(
        'order_ref', order_ref, 'amount', amount, 'currency', v_currency,
        'customer_ref', customer_ref, 'metadata', v_metadata, 'description', description)
        || CASE WHEN v_mode = 'session' THEN jsonb_build_object(
               'mode', v_mode, 'success_url', success_url, 'cancel_url', cancel_url) ELSE '{}' END);

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
        PERFORM pay._withdraw_attempt(v_latest.id, 'payment superseded before it was sent', 'abandoned');
    END IF;

    INSERT INTO pay.payments (id, order_ref, attempt, amount, currency, customer_ref, metadata, description,
                              params_fingerprint, mode)
    VALUES (v_new.id, begin_checkout.order_ref, v_attempt, begin_checkout.amount, v_currency,
            begin_checkout.customer_ref, v_metadata, begin_checkout.description, v_fingerprint, v_mode)
    RETURNING * INTO v_new;
    PERFORM pay._audit(v_new.id, NULL, 'creating',
        'checkout begun (attempt ' || v_attempt || CASE WHEN v_mode = 'session' THEN ', session mode' ELSE '' END || ')');

    IF v_mode = 'session' THEN
        -- One hosted Checkout Session in payment mode with one line item. Our ids travel in the
        -- session's metadata and in its PaymentIntent's (payment_intent_data), so every event about
        -- either finds this payment, and a session whose create answer was lost can be found by
        -- listing sessions.
        v_params := jsonb_build_object(
                'mode', 'payment',
                'success_url', success_url,
                'client_reference_id', v_new.order_ref,
                'line_items[0][quantity]', '1',
                'line_items[0][price_data][currency]', v_new.currency,
                'line_items[0][price_data][unit_amount]', v_new.amount::text,
                'line_items[0][price_data][product_data][name]', coalesce(v_new.description, 'Order ' || v_new.order_ref),
                'metadata[pgpay_payment_id]', v_new.id::text,
                'metadata[order_ref]', v_new.order_ref,
                'payment_intent_data[metadata][pgpay_payment_id]', v_new.id::text,
                'payment_intent_data[metadata][order_ref]', v_new.order_ref)
            || coalesce((SELECT jsonb_object_agg(k.prefix || '[' || m.key || ']', m.value)
                         FROM jsonb_each_text(v_metadata) m,
                              unnest(ARRAY['metadata', 'payment_intent_data[metadata]']) k(prefix)), '{}')
            || jsonb_strip_nulls(jsonb_build_object(
                'cancel_url', cancel_url,
                'payment_intent_data[description]', v_new.description,
                'metadata[customer_ref]', v_new.customer_ref,
                'payment_intent_data[metadata][customer_ref]', v_new.customer_ref));
        PERFORM pay._enqueue(v_new.id, 'create_checkout_session',
            pay.idempotency_key('pgpay.cs_create', jsonb_build_object(
                'order_ref', v_new.order_ref, 'attempt', v_attempt, 'params', v_fingerprint)),
            'POST', '/v1/checkout/sessions', v_params);
        RETURN v_new;
    END IF;

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

CREATE OR REPLACE FUNCTION pay.complete_outbox(id bigint, attempt int, http_status int, response jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    IF http_status IS NULL OR http_status < 200 OR http_status > 299 THEN
        RAISE EXCEPTION 'complete_outbox: http_status must be 2xx, got %', http_status
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use pay.retry_outbox or pay.fail_outbox for other answers.';
    END IF;
    IF response IS NULL OR jsonb_typeof(response) <> 'object' THEN
        RAISE EXCEPTION 'complete_outbox: response must be the JSON object Stripe answered'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pay._bounded_json_text(response, 'response', 1048576);
    v_command := pay._finish_outbox_if_current_attempt(id, attempt, 'done', http_status, NULL, response, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    CASE v_command.kind
        WHEN 'create_payment_intent', 'cancel_payment_intent' THEN
            PERFORM pay._apply_payment_intent(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint);
        WHEN 'create_checkout_session', 'expire_checkout_session' THEN
            PERFORM pay._apply_checkout_session(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint, NULL);
        WHEN 'refund' THEN
            PERFORM pay._apply_refund_answer(v_command.payment_id, response,
                'outbox:' || v_command.id || '#' || v_command.attempts);
        ELSE
            -- The domain pay.outbox_kind makes this unreachable; say so loudly if the two ever disagree.
            RAISE EXCEPTION 'complete_outbox: no handler for command kind %', v_command.kind
                USING ERRCODE = 'internal_error';
    END CASE;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'checkout.session' AND v_id IS NOT NULL AND v_status IS NOT NULL THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        detail := v_status || '/' || coalesce(p_object ->> 'payment_status', '');
        SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
        -- An open session the payment already knows, still open: nothing to write.
        IF v.stripe_checkout_session_id = v_id AND v_status = 'open' AND v.status = 'requires_payment_method' THEN
            outcome := 'unchanged';
            RETURN;
        END IF;
        v := pay._lock_payment(v.id);
        v_before := v.status;
        IF v.stripe_checkout_session_id IS NULL THEN
            -- A crash between Stripe's create and our commit: adopt the session, and close the
            -- create command so it is never sent again.
            v_adopted := true;
            UPDATE pay.outbox o
            SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
                last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
                attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
            WHERE o.payment_id = v.id AND o.kind = 'create_checkout_session' AND o.status IN ('pending', 'in_flight');
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
                'Checkout Session created at Stripe but never recorded; adopted');
        END IF;
        v_result := pay._apply_checkout_session(v.id, p_object, p_source, p_source || ':' || v_id,
                                                floor(extract(epoch FROM now()))::bigint, NULL);
        SELECT * INTO v FROM pay.payments p WHERE p.id = v.id;
        IF v_result IN ('applied', 'flagged') AND v.status <> v_before AND NOT v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v.status::text,
                'missed by webhooks; fixed from the API');
        END IF;
        outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent, Checkout Session or Refund object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    payment_id := pay._payment_for(v_id, v_claimed);
    IF payment_id IS NULL THEN
        IF pay._claimed_payment_id(v_claimed) IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
            'the PaymentIntent names a pgpay payment this database does not have');
        outcome := 'not_ours';
        detail := 'names an unknown payment';
        RETURN;
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL AND v.mode = 'payment_intent' THEN
        -- (In session mode the PaymentIntent is the session's, made by Stripe: not an orphan.)
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Issue 13, the safety net: quarantine (webhook_events gains when an event was held back, its
-- failures and replays), per-event-type circuit breakers (pay.event_type_health, pay.reset_event_type),
-- pay.replay_events, pay.anomalies and pay.check_anomalies (sql/11_safety.sql). The Rust
-- functions first: the anomaly view and replay call them.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS held_at timestamptz;
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS failures int NOT NULL DEFAULT 0;
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS last_sqlstate text;
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS failed_at timestamptz;
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS replays int NOT NULL DEFAULT 0;
ALTER TABLE pay.webhook_events ADD COLUMN IF NOT EXISTS replayed_at timestamptz;

CREATE OR REPLACE FUNCTION pay."_poisson_upper_tail"(
	"k" bigint, /* i64 */
	"lambda" double precision /* f64 */
) RETURNS double precision /* f64 */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'poisson_upper_tail_wrapper';

CREATE OR REPLACE FUNCTION pay."_binomial_upper_tail"(
	"k" bigint, /* i64 */
	"n" bigint, /* i64 */
	"p" double precision /* f64 */
) RETURNS double precision /* f64 */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'binomial_upper_tail_wrapper';

CREATE OR REPLACE FUNCTION pay."_replay_event"(
	"event_id" TEXT, /* & str */
	"include_applied" bool /* bool */
) RETURNS TABLE (
	"outcome" TEXT,  /* String */
	"detail" TEXT  /* Option < String > */
)
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'replay_event_wrapper';

CREATE OR REPLACE FUNCTION pay."ingest_webhook_measured"(
	"payload" TEXT, /* Option < & str > */
	"signature_header" TEXT /* Option < & str > */
) RETURNS TABLE (
	"status" TEXT,  /* String */
	"http_status" INT,  /* i32 */
	"event_id" TEXT,  /* Option < String > */
	"detail" TEXT,  /* Option < String > */
	"event_type" TEXT,  /* Option < String > */
	"lock_wait_us" bigint  /* Option < i64 > */
)
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pay, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ingest_webhook_measured_wrapper';

-- apply_stripe_event answers quarantined and deferred as they are.
CREATE OR REPLACE FUNCTION pay.apply_stripe_event(event jsonb)
RETURNS TABLE (status text, event_id text, detail text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    IF jsonb_typeof(event) IS DISTINCT FROM 'object' OR event ->> 'object' IS DISTINCT FROM 'event'
       OR event ->> 'id' IS NULL OR event ->> 'type' IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_event: not a Stripe event object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay._store_and_apply_event(event::text, 'api');
    RETURN QUERY SELECT CASE WHEN v.outcome IS NULL THEN 'duplicate'
                             WHEN v.outcome IN ('stored', 'quarantined', 'deferred') THEN v.outcome ELSE 'applied' END,
                        event ->> 'id', v.detail;
END;
$$;

-- Held-back events (quarantined or deferred, now or once): what pay.replay_events and the anomaly
-- rules read. Partial, so an ordinary delivery adds no index entry.
CREATE INDEX IF NOT EXISTS webhook_events_held ON pay.webhook_events (held_at) WHERE held_at IS NOT NULL;
-- Time ranges of deliveries, checkouts and successes, for pay.anomalies. BRIN: a few bytes per
-- 128 pages, and an insert into a range not yet summarised costs a look at the range map only
-- (measured on scripts/bench-ingest, README "Anomalies").
CREATE INDEX IF NOT EXISTS webhook_events_received_brin ON pay.webhook_events USING brin (received_at);
CREATE INDEX IF NOT EXISTS payments_created_brin ON pay.payments USING brin (created_at);
CREATE INDEX IF NOT EXISTS fulfillments_created_brin ON pay.fulfillments USING brin (created_at);
-- Flagged payments by when they last changed (pay.anomalies: flagged in the last hour).
CREATE INDEX IF NOT EXISTS payments_flagged_by_update ON pay.payments (updated_at) WHERE flagged_reason IS NOT NULL;

-- Quarantined events: signed, well-formed, and applying them raised. Stored with the error,
-- answered 200; pay.replay_events applies them once the cause is fixed.
CREATE OR REPLACE VIEW pay.quarantined_events AS
    SELECT e.event_id, e.type, e.payment_id, e.stripe_created, e.received_at, e.failures,
           e.last_error, e.last_sqlstate, e.failed_at, e.replays, e.replayed_at, e.detail
    FROM pay.webhook_events e
    WHERE e.held_at IS NOT NULL AND e.outcome = 'quarantined';

-- One row per event type that ever failed. closed: applied as usual; open: its events are
-- stored `deferred`, not applied; half_open: one event is being tried (visible only to the
-- transaction trying it: a crash leaves the type open).
CREATE TABLE IF NOT EXISTS pay.event_type_health (
    event_type         text PRIMARY KEY,
    state              text NOT NULL DEFAULT 'closed',
    -- Failures in the window that started at window_started_at (pay.breaker_window).
    failures           int NOT NULL DEFAULT 0,
    window_started_at  timestamptz,
    last_error         text,
    last_sqlstate      text,
    last_failure_at    timestamptz,
    opened_at          timestamptz,
    probe_started_at   timestamptz,
    -- Why the state last changed (opened after N failures, probe applied, reset by whom, replay).
    last_change        text,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_type_health_state_known CHECK (state IN ('closed', 'open', 'half_open')),
    CONSTRAINT event_type_health_open_has_opened_at CHECK ((state = 'closed') = (opened_at IS NULL))
);

-- The breaker's settings, validated (a bad value names the setting):
--   pay.breaker_failures  failures of one type within the window that open it (default 5)
--   pay.breaker_window    the window (default 1 minute)
--   pay.breaker_cooldown  how long an open breaker waits before one half-open try (default 1 minute)
CREATE OR REPLACE FUNCTION pay._breaker_settings(OUT failures int, OUT window_length interval, OUT cooldown interval)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_name text;
    v text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['breaker_failures', 'breaker_window', 'breaker_cooldown'] LOOP
        v := nullif(current_setting('pay.' || v_name, true), '');
        BEGIN
            CASE v_name
                WHEN 'breaker_failures' THEN
                    failures := coalesce(v, '5')::int;
                    IF failures < 1 THEN RAISE invalid_parameter_value; END IF;
                WHEN 'breaker_window' THEN
                    window_length := coalesce(v, '1 minute')::interval;
                    IF window_length <= interval '0' THEN RAISE invalid_parameter_value; END IF;
                ELSE
                    cooldown := coalesce(v, '1 minute')::interval;
                    IF cooldown < interval '0' THEN RAISE invalid_parameter_value; END IF;
            END CASE;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'setting pay.% = % is not valid', v_name, v
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = CASE WHEN v_name = 'breaker_failures' THEN 'a whole number of at least 1'
                                  ELSE 'an interval such as ''1 minute''' END;
        END;
    END LOOP;
END;
$$;

-- Called from ingest (extension/src/breaker.rs) for an event whose type is not closed: 'probe'
-- when the breaker has been open for pay.breaker_cooldown (this event is the one half-open
-- try), 'closed' when it closed meanwhile, else 'defer'.
CREATE OR REPLACE FUNCTION pay._breaker_admit(p_event_type text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_state text;
BEGIN
    UPDATE pay.event_type_health h
    SET state = 'half_open', probe_started_at = now(), updated_at = now()
    WHERE h.event_type = p_event_type AND h.state = 'open'
      AND h.opened_at <= now() - (pay._breaker_settings()).cooldown;
    IF FOUND THEN
        RETURN 'probe';
    END IF;
    -- Another transaction may just have closed it (its probe applied).
    SELECT h.state INTO v_state FROM pay.event_type_health h WHERE h.event_type = p_event_type;
    RETURN CASE WHEN v_state IS NULL OR v_state = 'closed' THEN 'closed' ELSE 'defer' END;
END;
$$;

-- Counts a failed application of an event of type p_event_type. Opens the breaker after
-- pay.breaker_failures failures within pay.breaker_window; a failed probe opens it again (its
-- cooldown starts over). Returns the state.
CREATE OR REPLACE FUNCTION pay._breaker_failure(p_event_type text, p_sqlstate text, p_error text, p_probe boolean)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    s record := pay._breaker_settings();
    v pay.event_type_health;
    v_failures int;
BEGIN
    INSERT INTO pay.event_type_health (event_type) VALUES (p_event_type) ON CONFLICT (event_type) DO NOTHING;
    SELECT * INTO v FROM pay.event_type_health h WHERE h.event_type = p_event_type FOR UPDATE;
    v_failures := CASE WHEN v.window_started_at IS NULL OR v.window_started_at <= now() - s.window_length
                       THEN 1 ELSE v.failures + 1 END;
    UPDATE pay.event_type_health h
    SET failures = v_failures,
        window_started_at = CASE WHEN v_failures = 1 THEN now() ELSE h.window_started_at END,
        last_error = left(p_error, 2000), last_sqlstate = p_sqlstate, last_failure_at = now(),
        state = CASE WHEN p_probe OR h.state <> 'closed' OR v_failures >= s.failures THEN 'open' ELSE 'closed' END,
        opened_at = CASE WHEN p_probe OR (h.state = 'closed' AND v_failures >= s.failures) THEN now()
                         ELSE h.opened_at END,
        probe_started_at = NULL,
        last_change = CASE WHEN p_probe THEN 'the half-open probe failed: open again'
                           WHEN h.state = 'closed' AND v_failures >= s.failures
                           THEN 'opened after ' || v_failures || ' failures within ' || s.window_length
                           ELSE h.last_change END,
        updated_at = now()
    WHERE h.event_type = p_event_type
    RETURNING h.state INTO v.state;
    RETURN v.state;
END;
$$;

-- Closes the breaker of p_event_type (a probe or a replay applied, or a DBA reset it).
-- Returns whether it was not closed.
CREATE OR REPLACE FUNCTION pay._breaker_close(p_event_type text, p_why text) RETURNS boolean
LANGUAGE sql
AS $$
    WITH closed AS (
        UPDATE pay.event_type_health h
        SET state = 'closed', failures = 0, window_started_at = NULL, opened_at = NULL,
            probe_started_at = NULL, last_change = p_why, updated_at = now()
        WHERE h.event_type = p_event_type AND h.state <> 'closed'
        RETURNING 1
    )
    SELECT count(*) > 0 FROM closed;
$$;

-- Closes an event type's breaker by hand: its next events are applied again. Events it
-- deferred stay deferred until pay.replay_events applies them.
CREATE OR REPLACE FUNCTION pay.reset_event_type(event_type text) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT pay._breaker_close(reset_event_type.event_type, 'reset by ' || session_user);
$$;

-- Applies stored events again, in Stripe's order (created, then id), through the same transition
-- rule as a delivery: the quarantined and deferred ones, or with include_applied every stored
-- event (after a business rule changed). Filters: one event type, events received since a time.
-- Idempotent: an event already reflected changes nothing. A type whose replayed events all
-- applied (at least one) gets its breaker closed. Infrastructure failures raise (nothing of
-- the call stays); an event that fails again stays quarantined, with one more failure.
CREATE OR REPLACE FUNCTION pay.replay_events(event_type text DEFAULT NULL, since timestamptz DEFAULT NULL,
                                  include_applied boolean DEFAULT false)
RETURNS TABLE (event_id text, outcome text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    r record;
    v record;
    v_applied text[] := '{}';
    v_failed text[] := '{}';
    v_type text;
BEGIN
    FOR r IN
        SELECT e.event_id, e.type FROM pay.webhook_events e
        WHERE (include_applied OR (e.held_at IS NOT NULL AND e.outcome IN ('quarantined', 'deferred')))
          AND (replay_events.event_type IS NULL OR e.type = replay_events.event_type)
          AND (replay_events.since IS NULL OR e.received_at >= replay_events.since)
        ORDER BY e.stripe_created NULLS LAST, e.event_id
    LOOP
        SELECT * INTO v FROM pay._replay_event(r.event_id, coalesce(include_applied, false));
        CONTINUE WHEN v.outcome = 'skipped';
        IF v.outcome IN ('quarantined', 'deferred') THEN
            v_failed := v_failed || r.type;
        ELSE
            v_applied := v_applied || r.type;
        END IF;
        event_id := r.event_id;
        outcome := v.outcome;
        RETURN NEXT;
    END LOOP;
    FOR v_type IN SELECT DISTINCT t FROM unnest(v_applied) t WHERE t <> ALL (v_failed) LOOP
        PERFORM pay._breaker_close(v_type, 'closed by a successful replay');
    END LOOP;
END;
$$;

-- Rejected deliveries by minute (pay.webhook_rejections counts by day): what the burst rule of
-- pay.anomalies compares. Filled by a trigger, so ingest is unchanged; kept for two days.
CREATE TABLE IF NOT EXISTS pay.webhook_rejections_by_minute (
    minute  timestamptz NOT NULL,
    reason  text NOT NULL,
    count   bigint NOT NULL,
    PRIMARY KEY (minute, reason)
);

CREATE OR REPLACE FUNCTION pay._count_rejection_by_minute() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.webhook_rejections_by_minute AS m (minute, reason, count)
    VALUES (date_trunc('minute', NEW.last_at), NEW.reason,
            NEW.count - CASE WHEN TG_OP = 'UPDATE' THEN OLD.count ELSE 0 END)
    ON CONFLICT (minute, reason) DO UPDATE SET count = m.count + excluded.count;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER webhook_rejections_by_minute
    AFTER INSERT OR UPDATE ON pay.webhook_rejections
    FOR EACH ROW EXECUTE FUNCTION pay._count_rejection_by_minute();

-- What looks wrong now, each kind with its rule (README, "Anomalies"):
--   error_rate_spike  per event type: held back (quarantined or deferred) in the last 5 minutes,
--                     k of n, against the trailing 24 hours' rate p0 = (K + 1) / (N + 100);
--                     P(X >= k | Binomial(n, p0)) < 1e-4
--   silence           no success applied since t_last while n checkouts (older than 5 minutes)
--                     were created; conversion c = S / (C + 1) over the 24 hours before t_last;
--                     P(0 | Poisson(c n)) = exp(-c n) < 0.001
--   rejection_burst   rejected deliveries in the last 5 minutes, k, against the trailing 24
--                     hours' rate per 5 minutes λ = (R + 1) / 288; k >= 10 and
--                     P(X >= k | Poisson(λ)) < 1e-4
--   outbox_lag        the oldest due pending command has waited more than 5 minutes
--   retry_storm       per command kind: an open command on its 5th attempt or later
--   flagged_payments  payments flagged (amount or currency mismatch, a second charge, ...) and
--                     changed in the last hour
-- score: -log10 of the tail probability for the statistical kinds; for the others the observed
-- value over its threshold. observed and expected are in the kind's own unit (a rate, a count,
-- seconds or attempts).
CREATE OR REPLACE VIEW pay.anomalies AS
WITH spike_types AS (
    SELECT e.type, count(*) AS held, min(e.held_at) AS since
    FROM pay.webhook_events e
    WHERE e.held_at IS NOT NULL AND e.held_at > now() - interval '5 minutes'
    GROUP BY e.type
), spike AS (
    SELECT t.type, t.held AS k, t.since,
           (SELECT count(*) FROM pay.webhook_events e
            WHERE e.type = t.type AND e.received_at > now() - interval '5 minutes') AS n,
           (SELECT count(*) FROM pay.webhook_events e
            WHERE e.type = t.type AND e.held_at IS NOT NULL
              AND e.held_at > now() - interval '24 hours 5 minutes' AND e.held_at <= now() - interval '5 minutes') AS hist_k,
           (SELECT count(*) FROM pay.webhook_events e
            WHERE e.type = t.type AND e.received_at > now() - interval '24 hours 5 minutes'
              AND e.received_at <= now() - interval '5 minutes') AS hist_n
    FROM spike_types t
), spike_tested AS (
    SELECT s.*, (s.hist_k + 1)::float8 / (s.hist_n + 100) AS p0,
           pay._binomial_upper_tail(s.k, greatest(s.n, s.k), (s.hist_k + 1)::float8 / (s.hist_n + 100)) AS tail
    FROM spike s
), last_success AS (
    SELECT max(f.created_at) AS at FROM pay.fulfillments f WHERE f.created_at > now() - interval '48 hours'
), silence AS (
    SELECT l.at,
           (SELECT count(*) FROM pay.fulfillments f
            WHERE f.created_at > l.at - interval '24 hours' AND f.created_at <= l.at) AS successes,
           (SELECT count(*) FROM pay.payments p
            WHERE p.created_at > l.at - interval '24 hours' AND p.created_at <= l.at) AS checkouts,
           (SELECT count(*) FROM pay.payments p
            WHERE p.created_at > l.at AND p.created_at <= now() - interval '5 minutes') AS since_checkouts
    FROM last_success l
    WHERE l.at IS NOT NULL
), silence_tested AS (
    SELECT s.*, s.successes::float8 / (s.checkouts + 1) * s.since_checkouts AS lambda
    FROM silence s
), rejections AS (
    SELECT coalesce(sum(m.count) FILTER (WHERE m.minute > now() - interval '5 minutes'), 0)::bigint AS k,
           coalesce(sum(m.count) FILTER (WHERE m.minute <= now() - interval '5 minutes'), 0)::bigint AS hist,
           min(m.minute) FILTER (WHERE m.minute > now() - interval '5 minutes') AS since,
           string_agg(DISTINCT m.reason, ', ') FILTER (WHERE m.minute > now() - interval '5 minutes') AS reasons
    FROM pay.webhook_rejections_by_minute m
    WHERE m.minute > now() - interval '24 hours 5 minutes'
), rejections_tested AS (
    SELECT r.*, (r.hist + 1)::float8 / 288 AS lambda,
           pay._poisson_upper_tail(r.k, (r.hist + 1)::float8 / 288) AS tail
    FROM rejections r
), lag AS (
    SELECT min(o.run_after) AS oldest FROM pay.outbox o WHERE o.status = 'pending' AND o.run_after <= now()
), storms AS (
    SELECT o.kind::text AS kind, max(o.attempts) AS attempts, count(*) AS commands, min(o.first_attempt_at) AS since
    FROM pay.outbox o
    WHERE o.status IN ('pending', 'in_flight') AND o.attempts >= 5
    GROUP BY o.kind
), flagged AS (
    SELECT count(*) AS n, min(p.updated_at) AS since
    FROM pay.payments p
    WHERE p.flagged_reason IS NOT NULL AND p.updated_at > now() - interval '1 hour'
)
SELECT 'error_rate_spike'::text AS kind, t.type AS subject, t.k::float8 / greatest(t.n, t.k) AS observed,
       t.p0 AS expected, -log(greatest(t.tail, 1e-300)) AS score, t.since,
       format('%s of %s %s events held back in the last 5 minutes; %s of %s in the 24 hours before',
              t.k, greatest(t.n, t.k), t.type, t.hist_k, t.hist_n) AS detail
FROM spike_tested t WHERE t.tail < 1e-4
UNION ALL
SELECT 'silence', 'payment successes', 0, s.lambda, s.lambda / ln(10), s.at,
       format('no success applied since %s while %s checkouts were created; %s successes of %s checkouts in the 24 hours before',
              s.at, s.since_checkouts, s.successes, s.checkouts)
FROM silence_tested s WHERE exp(-s.lambda) < 0.001
UNION ALL
SELECT 'rejection_burst', 'webhook', r.k, r.lambda, -log(greatest(r.tail, 1e-300)), r.since,
       format('%s deliveries rejected in the last 5 minutes (%s); %s in the 24 hours before', r.k, r.reasons, r.hist)
FROM rejections_tested r WHERE r.k >= 10 AND r.tail < 1e-4
UNION ALL
SELECT 'outbox_lag', 'outbox', extract(epoch FROM now() - l.oldest)::float8, 300,
       extract(epoch FROM now() - l.oldest)::float8 / 300, l.oldest,
       format('the oldest due command has waited %s', date_trunc('second', now() - l.oldest))
FROM lag l WHERE l.oldest < now() - interval '5 minutes'
UNION ALL
SELECT 'retry_storm', s.kind, s.attempts, 5, s.attempts::float8 / 5, s.since,
       format('%s open %s commands on their 5th attempt or later (at most %s)', s.commands, s.kind, s.attempts)
FROM storms s
UNION ALL
SELECT 'flagged_payments', 'payments', f.n, 0, f.n, f.since,
       format('%s payments flagged in the last hour (pay.flagged_payments)', f.n)
FROM flagged f WHERE f.n > 0;

-- The anomalies the worker has seen, to log each once and NOTIFY pay_alert at most once a minute.
CREATE TABLE IF NOT EXISTS pay.anomaly_alerts (
    kind              text NOT NULL,
    subject           text NOT NULL,
    first_seen        timestamptz NOT NULL DEFAULT now(),
    last_seen         timestamptz NOT NULL DEFAULT now(),
    last_notified_at  timestamptz,
    PRIMARY KEY (kind, subject)
);

-- Called by the worker on its schedule: the current anomalies, whether each one is new (log it)
-- and whether it was notified now. NOTIFY pay_alert (payload: the kind only) at most once a
-- minute per anomaly; anomalies that are gone are forgotten (so they are new if they come back).
-- Also drops the per-minute rejection counts older than two days.
CREATE OR REPLACE FUNCTION pay.check_anomalies()
RETURNS TABLE (kind text, subject text, observed float8, expected float8, score float8, since timestamptz,
               detail text, appeared boolean, notified boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    a record;
    v pay.anomaly_alerts;
    v_now pay.anomalies[];
BEGIN
    DELETE FROM pay.webhook_rejections_by_minute m WHERE m.minute < now() - interval '2 days';
    v_now := ARRAY(SELECT n FROM pay.anomalies n);
    DELETE FROM pay.anomaly_alerts al
    WHERE NOT EXISTS (SELECT 1 FROM unnest(v_now) n WHERE n.kind = al.kind AND n.subject = al.subject);
    FOR a IN SELECT * FROM unnest(v_now) LOOP
        INSERT INTO pay.anomaly_alerts AS al (kind, subject) VALUES (a.kind, a.subject)
        ON CONFLICT ON CONSTRAINT anomaly_alerts_pkey DO UPDATE SET last_seen = now()
        RETURNING * INTO v;
        appeared := v.first_seen = now();
        notified := v.last_notified_at IS NULL OR v.last_notified_at <= now() - interval '1 minute';
        IF notified THEN
            UPDATE pay.anomaly_alerts al SET last_notified_at = now()
            WHERE al.kind = a.kind AND al.subject = a.subject;
            PERFORM pg_notify('pay_alert', a.kind);
        END IF;
        kind := a.kind; subject := a.subject; observed := a.observed; expected := a.expected;
        score := a.score; since := a.since; detail := a.detail;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Backups carry the breakers' state. The per-minute rejection counts are rebuilt by their trigger
-- when a restore copies pay.webhook_rejections back, and the alert state is the worker's memory
-- of what it already logged: neither is dumped.
SELECT pg_catalog.pg_extension_config_dump('pay.event_type_health', '');

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pay FROM PUBLIC;
GRANT SELECT ON pay.quarantined_events, pay.event_type_health, pay.anomalies TO pay_auditor, pay_worker;
GRANT EXECUTE ON FUNCTION pay.check_anomalies() TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.ingest_webhook_measured(text, text) TO pay_worker;

-- ---------------------------------------------------------------------------------------------
-- Final definitions of functions that both issue 13 and an earlier section above rewrote.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pay.apply_stripe_event(event jsonb)
RETURNS TABLE (status text, event_id text, detail text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    IF jsonb_typeof(event) IS DISTINCT FROM 'object' OR event ->> 'object' IS DISTINCT FROM 'event'
       OR event ->> 'id' IS NULL OR event ->> 'type' IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_event: not a Stripe event object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay._store_and_apply_event(pay._bounded_json_text(event, 'event', 1048576), 'api');
    RETURN QUERY SELECT CASE WHEN v.outcome IS NULL THEN 'duplicate'
                             WHEN v.outcome IN ('stored', 'quarantined', 'deferred') THEN v.outcome ELSE 'applied' END,
                        event ->> 'id', v.detail;
END;
$$;

-- ==== finish-b: pay.stuck_payments measures an open Checkout Session from its expiry ====
-- Payments that are not finished and have not moved for a while. The threshold is the setting
-- pay.stuck_after (default 1 hour): SET pay.stuck_after = '15 minutes'.
-- An open Checkout Session (session mode, waiting for its customer) moves when the customer pays
-- or, at the latest, when it expires at checkout_expires_at (Stripe's default 24 hours): it is
-- measured from the later of its last change and its expiry. A customer on the hosted page for
-- twenty minutes is not stuck; a session past its expiry whose checkout.session.expired never
-- arrived is, pay.stuck_after after the expiry (stuck_for counts from the expiry).
-- greatest(updated_at, expiry) < t is written as two comparisons, so payments_open_by_update
-- still serves the updated_at one.
CREATE OR REPLACE VIEW pay.stuck_payments AS
    SELECT p.id, p.order_ref, p.status, p.stripe_payment_intent_id, p.amount, p.currency, p.updated_at,
           now() - CASE WHEN p.mode = 'session' AND p.status = 'requires_payment_method'
                        THEN greatest(p.updated_at, p.checkout_expires_at) ELSE p.updated_at END AS stuck_for,
           (SELECT count(*) FROM pay.outbox o WHERE o.payment_id = p.id AND o.status IN ('pending', 'in_flight', 'waiting')) AS open_commands,
           p.flagged_reason, p.mode, p.stripe_checkout_session_id, p.checkout_expires_at
    FROM pay.payments p
    WHERE p.status NOT IN ('succeeded', 'canceled', 'create_failed', 'superseded')
      AND p.updated_at < now() - coalesce(nullif(current_setting('pay.stuck_after', true), ''), '1 hour')::interval
      AND (p.mode <> 'session' OR p.status <> 'requires_payment_method' OR p.checkout_expires_at IS NULL
           OR p.checkout_expires_at < now() - coalesce(nullif(current_setting('pay.stuck_after', true), ''), '1 hour')::interval);

-- ==== finish-b: pay_operator, the role that replays held events and resets breakers ====
-- Created and checked as sql/99_roles.sql does for every pay_* role (a role that can log in, is
-- or can become a superuser, creates roles or bypasses row security is not adopted).
DO $roles$
DECLARE
    v pg_catalog.pg_roles;
    v_unsafe text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pay_operator') THEN
        BEGIN
            CREATE ROLE pay_operator NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    SELECT * INTO v FROM pg_catalog.pg_roles WHERE rolname = 'pay_operator';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgpay: role pay_operator is being created by another transaction that has not finished'
            USING ERRCODE = 'serialization_failure', HINT = 'Run ALTER EXTENSION pgpay UPDATE again.';
    END IF;
    v_unsafe := array_remove(ARRAY[
        CASE WHEN v.rolcanlogin THEN 'LOGIN' END,
        CASE WHEN v.rolsuper THEN 'SUPERUSER' END,
        CASE WHEN v.rolcreaterole THEN 'CREATEROLE' END,
        CASE WHEN v.rolbypassrls THEN 'BYPASSRLS' END,
        CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles s
                          WHERE s.rolsuper AND s.oid <> v.oid AND pg_catalog.pg_has_role(v.oid, s.oid, 'MEMBER'))
             THEN 'membership in a superuser role' END], NULL);
    IF cardinality(v_unsafe) > 0 THEN
        RAISE EXCEPTION 'pgpay: role pay_operator exists already with %, so ALTER EXTENSION pgpay UPDATE will not adopt it',
            array_to_string(v_unsafe, ', ')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'pgpay''s roles are group roles shared by every database of the cluster: make it one (ALTER ROLE pay_operator NOLOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS, and revoke superuser memberships) or drop it, then run ALTER EXTENSION pgpay UPDATE again.';
    END IF;
END
$roles$;

GRANT USAGE ON SCHEMA pay TO pay_operator;
GRANT EXECUTE ON FUNCTION pay.replay_events(text, timestamptz, boolean) TO pay_operator;
GRANT EXECUTE ON FUNCTION pay.reset_event_type(text) TO pay_operator;
GRANT SELECT ON pay.quarantined_events, pay.event_type_health, pay.anomalies, pay.webhook_stats
    TO pay_operator;
-- A function a view calls is checked against the reader: whoever may read pay.anomalies needs its
-- two tail probabilities (pay_auditor could not read it before).
GRANT EXECUTE ON FUNCTION pay._binomial_upper_tail(bigint, bigint, float8), pay._poisson_upper_tail(bigint, float8)
    TO pay_auditor, pay_worker, pay_operator;

-- ==== finish-b: backends keep "no breaker is open" in memory, dropped when pay.event_type_health changes ====
CREATE OR REPLACE FUNCTION pay."_event_type_health_changed"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_event_type_health_changed_wrapper';
REVOKE EXECUTE ON FUNCTION pay._event_type_health_changed() FROM PUBLIC;

DROP TRIGGER IF EXISTS event_type_health_changed ON pay.event_type_health;
CREATE TRIGGER event_type_health_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pay.event_type_health
    FOR EACH STATEMENT EXECUTE FUNCTION pay._event_type_health_changed();
ALTER TABLE pay.event_type_health ENABLE ALWAYS TRIGGER event_type_health_changed;


-- ==== finish-a: issue 15, refusals the SQL fuzz found, each with a documented SQLSTATE ====
-- pay._bounded_json_text also bounds nesting (100 levels): pgrx reads a jsonb argument with
-- serde_json, which stops at 128 levels with an internal error (XX000). An unknown reconciliation
-- run is P0002 (pay._require_run) instead of the findings' foreign key (23503). A create answer
-- naming another payment's PaymentIntent or Checkout Session is refused in Rust (22023, naming both).
-- Reconciliation no longer reports a session-mode payment canceled by a failed delayed payment as
-- a status_mismatch with its PaymentIntent (left at requires_payment_method; found by the chaos run).
CREATE OR REPLACE FUNCTION pay._bounded_json_text(p_value jsonb, p_field text, p_max_bytes int) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v_text text;
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF pg_column_size(p_value) > p_max_bytes THEN
        RAISE EXCEPTION '% is larger than % bytes', p_field, p_max_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_path_exists(p_value,
        'strict $.** ? (@.type() == "number" && (@ >= 1e30 || @ <= -1e30 || (@ != 0 && @ < 1e-30 && @ > -1e-30)))') THEN
        RAISE EXCEPTION '% holds a number beyond 1e30 in magnitude or nonzero below 1e-30', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Level 0 is the value itself: an array or object at level 100 is the 101st one nested.
    IF jsonb_path_exists(p_value, 'strict $.**{100 to last} ? (@.type() == "array" || @.type() == "object")') THEN
        RAISE EXCEPTION '% is nested deeper than 100 levels', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A stored (compressed) value can be far larger once expanded: check the text too.
    v_text := p_value::text;
    IF octet_length(v_text) > p_max_bytes THEN
        RAISE EXCEPTION '% is larger than % bytes as text', p_field, p_max_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_text;
END;
$$;

CREATE OR REPLACE FUNCTION pay._require_run(p_run_id bigint, p_caller text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_run_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pay.reconciliation_runs r WHERE r.id = p_run_id) THEN
        RAISE EXCEPTION '%: no reconciliation run %', p_caller, p_run_id
            USING ERRCODE = 'no_data_found', HINT = 'Pass the id pay.start_reconciliation returned, or NULL.';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION pay.record_reconciliation_finding(run_id bigint, kind text, payment_id uuid, stripe_object_id text,
    expected text, actual text, detail text DEFAULT NULL) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT pay._require_run(run_id, 'record_reconciliation_finding');
    SELECT pay._record_finding(run_id, kind, payment_id, stripe_object_id, expected, actual, detail);
$$;

CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    PERFORM pay._require_run(p_run_id, 'apply_stripe_object');
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'checkout.session' AND v_id IS NOT NULL AND v_status IS NOT NULL THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        detail := v_status || '/' || coalesce(p_object ->> 'payment_status', '');
        SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
        -- An open session the payment already knows, still open: nothing to write.
        IF v.stripe_checkout_session_id = v_id AND v_status = 'open' AND v.status = 'requires_payment_method' THEN
            outcome := 'unchanged';
            RETURN;
        END IF;
        v := pay._lock_payment(v.id);
        v_before := v.status;
        IF v.stripe_checkout_session_id IS NULL THEN
            -- A crash between Stripe's create and our commit: adopt the session, and close the
            -- create command so it is never sent again.
            v_adopted := true;
            UPDATE pay.outbox o
            SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
                last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
                attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
            WHERE o.payment_id = v.id AND o.kind = 'create_checkout_session' AND o.status IN ('pending', 'in_flight');
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
                'Checkout Session created at Stripe but never recorded; adopted');
        END IF;
        v_result := pay._apply_checkout_session(v.id, p_object, p_source, p_source || ':' || v_id,
                                                floor(extract(epoch FROM now()))::bigint, NULL);
        SELECT * INTO v FROM pay.payments p WHERE p.id = v.id;
        IF v_result IN ('applied', 'flagged') AND v.status <> v_before AND NOT v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v.status::text,
                'missed by webhooks; fixed from the API');
        END IF;
        outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent, Checkout Session or Refund object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    payment_id := pay._payment_for(v_id, v_claimed);
    IF payment_id IS NULL THEN
        IF pay._claimed_payment_id(v_claimed) IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
            'the PaymentIntent names a pgpay payment this database does not have');
        outcome := 'not_ours';
        detail := 'names an unknown payment';
        RETURN;
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL AND v.mode = 'payment_intent' THEN
        -- (In session mode the PaymentIntent is the session's, made by Stripe: not an orphan.)
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text
          -- A session's delayed payment that failed ends the attempt (its Checkout Session speaks
          -- for it) and leaves the PaymentIntent at requires_payment_method, which nobody can pay
          -- any more: Stripe does not contradict the cancel.
          AND NOT (v.mode = 'session' AND v_before = 'canceled' AND v_status = 'requires_payment_method') THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;

REVOKE EXECUTE ON FUNCTION pay._require_run(bigint, text) FROM PUBLIC;

-- ==== finish-a: issue 11, one place leases an outbox command (pay._lease_commands) ====
CREATE OR REPLACE FUNCTION pay._lease_commands(p_ids bigint[], p_worker text, p_lease interval)
RETURNS SETOF pay.outbox
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
    UPDATE pay.outbox o
    SET status = 'in_flight',
        lease_owner = p_worker,
        lease_expires = now() + p_lease,
        attempts = o.attempts + 1,
        first_attempt_at = coalesce(o.first_attempt_at, now()),
        updated_at = now()
    WHERE o.id = ANY (p_ids) AND o.status IN ('pending', 'in_flight')
    RETURNING o.*;
END;
$$;

CREATE OR REPLACE FUNCTION pay.claim_outbox(worker text, max_rows int DEFAULT 32, lease interval DEFAULT '60 seconds')
RETURNS SETOF pay.outbox
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    IF worker IS NULL OR length(worker) = 0 OR length(worker) > 200 THEN
        RAISE EXCEPTION 'claim_outbox: worker must be a name of 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 1000 THEN
        RAISE EXCEPTION 'claim_outbox: max_rows must be between 1 and 1000, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' OR lease > interval '1 hour' THEN
        RAISE EXCEPTION 'claim_outbox: lease must be between 1 second and 1 hour, got %', lease USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT * FROM pay._lease_commands(ARRAY(
        WITH expired AS (
            -- A crashed worker's commands: sent again, with the same key, once the lease has run out.
            SELECT o.id FROM pay.outbox o
            WHERE o.status = 'in_flight' AND o.lease_expires < now()
            ORDER BY o.lease_expires
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED
        ), due AS (
            SELECT o.id FROM pay.outbox o
            WHERE o.status = 'pending' AND o.run_after <= now()
            ORDER BY o.run_after, o.id
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED
        )
        SELECT id FROM expired
        UNION ALL
        SELECT id FROM due
        LIMIT max_rows
    ), worker, lease);
END;
$$;

REVOKE EXECUTE ON FUNCTION pay._lease_commands(bigint[], text, interval) FROM PUBLIC;
-- ==== subs-core: subscriptions and invoices (issue 14) ====
-- pay.subscriptions (one row per subscription_ref), pay.invoices, pay.invoice_fulfillments,
-- pay.entitlements; outbox commands and audit rows may belong to a subscription instead of a
-- payment. Everything below is re-runnable and repeats sql/01, 02, 03, 10, 12, 13, 14, 98 and 99.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS pay.subscriptions (
    id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    subscription_ref            text NOT NULL,
    -- What the application asked for, then what Stripe's subscription item says.
    price                       text NOT NULL,
    quantity                    int NOT NULL,
    customer_ref                text,
    metadata                    pay.json_object NOT NULL DEFAULT '{}',
    success_url                 text,
    cancel_url                  text,
    -- Stripe's status; NULL until Stripe has a subscription.
    status                      text,
    checkout_status             text,
    stripe_checkout_session_id  text,
    checkout_url                text,
    checkout_expires_at         timestamptz,
    stripe_subscription_id      text,
    stripe_subscription_item_id text,
    stripe_customer_id          text,
    current_period_start        timestamptz,
    current_period_end          timestamptz,
    cancel_at_period_end        boolean NOT NULL DEFAULT false,
    canceled_at                 timestamptz,
    -- Stripe time of the newest evidence applied to `status`.
    evidence_at                 timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    -- When the subscription became past_due (the Stripe time of that evidence): the grace period
    -- of pay.entitlements counts from here.
    past_due_since              timestamptz,
    -- Key of begin_subscription's arguments: the same call again is recognised by it.
    params_fingerprint          text NOT NULL,
    -- Sign-up attempts: a checkout that expired (or that Stripe refused) may begin again.
    checkout_attempt            int NOT NULL DEFAULT 1,
    last_error                  jsonb,
    flagged_reason              text,
    -- The hash of the subscription's newest audit row (pay.verify_audit_log).
    audit_head                  bytea,
    CONSTRAINT subscriptions_ref_unique UNIQUE (subscription_ref),
    CONSTRAINT subscriptions_stripe_subscription_unique UNIQUE (stripe_subscription_id),
    CONSTRAINT subscriptions_checkout_session_unique UNIQUE (stripe_checkout_session_id),
    CONSTRAINT subscriptions_status_known CHECK (status IN (
        'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'unpaid', 'paused', 'canceled')),
    CONSTRAINT subscriptions_checkout_status_known CHECK (checkout_status IN ('open', 'complete', 'expired', 'create_failed')),
    CONSTRAINT subscriptions_quantity_not_negative CHECK (quantity >= 0),
    CONSTRAINT subscriptions_checkout_attempt_positive CHECK (checkout_attempt > 0),
    CONSTRAINT subscriptions_past_due_has_since CHECK ((status IS NOT DISTINCT FROM 'past_due') = (past_due_since IS NOT NULL))
);

ALTER TABLE pay.outbox ALTER COLUMN payment_id DROP NOT NULL;
ALTER TABLE pay.outbox ADD COLUMN IF NOT EXISTS subscription_id uuid REFERENCES pay.subscriptions (id);
ALTER TABLE pay.audit_log ALTER COLUMN payment_id DROP NOT NULL;
ALTER TABLE pay.audit_log ALTER COLUMN to_status DROP NOT NULL;
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS subscription_id uuid REFERENCES pay.subscriptions (id);
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS from_state text;
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS to_state text;
ALTER TABLE pay.outbox DROP CONSTRAINT IF EXISTS outbox_one_subject;
ALTER TABLE pay.outbox ADD CONSTRAINT outbox_one_subject CHECK ((payment_id IS NULL) <> (subscription_id IS NULL));
ALTER TABLE pay.audit_log DROP CONSTRAINT IF EXISTS audit_log_one_subject;
ALTER TABLE pay.audit_log ADD CONSTRAINT audit_log_one_subject CHECK ((payment_id IS NULL) <> (subscription_id IS NULL));
ALTER TABLE pay.audit_log DROP CONSTRAINT IF EXISTS audit_log_payment_row_has_status;
ALTER TABLE pay.audit_log ADD CONSTRAINT audit_log_payment_row_has_status CHECK (payment_id IS NULL OR to_status IS NOT NULL);
CREATE INDEX IF NOT EXISTS audit_log_by_subscription ON pay.audit_log (subscription_id, id) WHERE subscription_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_open_by_subscription ON pay.outbox (subscription_id)
    WHERE subscription_id IS NOT NULL AND status IN ('waiting', 'pending', 'in_flight');
ALTER DOMAIN pay.outbox_kind DROP CONSTRAINT IF EXISTS outbox_kind_known;
ALTER DOMAIN pay.outbox_kind ADD CONSTRAINT outbox_kind_known
    CHECK (VALUE IN ('create_payment_intent', 'cancel_payment_intent', 'refund',
                                                  'create_checkout_session', 'expire_checkout_session',
                                                  'create_subscription_session', 'update_subscription',
                                                  'cancel_subscription'));
ALTER TABLE pay.findings DROP CONSTRAINT IF EXISTS findings_kind_known;
ALTER TABLE pay.findings ADD CONSTRAINT findings_kind_known CHECK (kind IN (
        'amount_drift', 'currency_drift', 'status_drift_fixed', 'status_mismatch', 'orphan_adopted',
        'missing_at_stripe', 'not_ours', 'second_payment_intent', 'unknown_payment',
        'invoice_fulfillment_repaired', 'unknown_subscription'));

-- The audit chain covers subscriptions' rows too (a payment's row hashes as before).
CREATE OR REPLACE FUNCTION pay._audit_row_hash(p_prev bytea, p_row pay.audit_log) RETURNS bytea
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

CREATE OR REPLACE FUNCTION pay._audit_log_chain() RETURNS trigger
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

CREATE OR REPLACE FUNCTION pay.verify_audit_log()
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

-- Rust (extension/src/subscription.rs, lookup.rs): the input rules, the reader of both API
-- shapes, the one rule, the lookup.
CREATE OR REPLACE FUNCTION pay."_subscription_validate"(
	"subscription_ref" text, /* Option < TextBytes < '_ > > */
	"price" text, /* Option < TextBytes < '_ > > */
	"quantity" bigint, /* Option < i64 > */
	"customer_ref" text, /* Option < TextBytes < '_ > > */
	"metadata" TEXT /* Option < & str > */
) RETURNS void
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'subscription_validate_wrapper';

CREATE OR REPLACE FUNCTION pay."_billing_facts"(
	"object" TEXT /* & str */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'billing_facts_sql_wrapper';

CREATE OR REPLACE FUNCTION pay."_subscription_decide"(
	"current" TEXT, /* Option < & str > */
	"current_at" bigint, /* Option < i64 > */
	"proposed" TEXT, /* Option < & str > */
	"at" bigint /* i64 */
) RETURNS TEXT /* & '_ str */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'subscription_decide_wrapper';

CREATE OR REPLACE FUNCTION pay."_invoice_decide"(
	"current" TEXT, /* Option < & str > */
	"current_at" bigint, /* Option < i64 > */
	"proposed" TEXT, /* Option < & str > */
	"at" bigint /* i64 */
) RETURNS TEXT /* & '_ str */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'invoice_decide_wrapper';

CREATE OR REPLACE FUNCTION pay."_subscription_for"(
	"object" TEXT /* & str */
) RETURNS uuid /* Option < Uuid > */
STRICT STABLE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'subscription_for_wrapper';

-- sql/12_subscriptions.sql, 13_subscription_evidence.sql and 14_invoice_fulfillments.sql, verbatim.
-- Subscriptions and invoices (issue 14). A subscription signs up through a subscription-mode
-- Checkout Session; from then on Stripe's subscription, its invoices and the session are mirrored
-- through one rule (pgpay-core's subscription::decide and decide_invoice, asked through
-- pay._subscription_decide and pay._invoice_decide), whichever way the evidence arrives: a
-- webhook (extension/src/webhook.rs), an outbox answer (pay.complete_outbox) or reconciliation
-- (pay._apply_stripe_object). A paid invoice gets exactly one row in pay.invoice_fulfillments,
-- written in the transaction that records the payment.
--
-- Here: the tables, the application's API (begin, wait, change, cancel, timeline) and
-- pay.entitlements. Applying Stripe's evidence is sql/13_subscription_evidence.sql; the invoice
-- queue's functions are sql/14_invoice_fulfillments.sql.
--
-- This file is written to be re-runnable (IF NOT EXISTS, OR REPLACE): the upgrade script's
-- subscriptions section repeats it verbatim.

-- Invoices as Stripe reported them, keyed by Stripe's id: invoice.paid and
-- invoice.payment_succeeded (the same fact under two names) and every repeat land on one row.
CREATE TABLE IF NOT EXISTS pay.invoices (
    stripe_invoice_id  text PRIMARY KEY,
    subscription_id    uuid NOT NULL REFERENCES pay.subscriptions (id),
    subscription_ref   text NOT NULL,
    status             text NOT NULL,
    amount_due         bigint,
    amount_paid        bigint,
    currency           text,
    billing_reason     text,
    -- The service period the invoice bills for.
    period_start       timestamptz,
    period_end         timestamptz,
    paid_at            timestamptz,
    -- Stripe time of the newest evidence applied to `status`.
    evidence_at        timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT invoices_status_known CHECK (status IN ('draft', 'open', 'uncollectible', 'paid', 'void')),
    CONSTRAINT invoices_paid_has_paid_at CHECK (status <> 'paid' OR paid_at IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS invoices_by_subscription ON pay.invoices (subscription_id, period_start);

-- Exactly one row per paid invoice. A table of its own rather than rows in pay.fulfillments:
-- that table is keyed by payment_id (a foreign key to pay.payments) and is the row type
-- pay.claim_fulfillments returns, so a generic queue would change what existing callers get.
-- The claim/complete/fail/retry functions and the retry policy settings are the same.
CREATE TABLE IF NOT EXISTS pay.invoice_fulfillments (
    stripe_invoice_id  text PRIMARY KEY REFERENCES pay.invoices (stripe_invoice_id),
    subscription_id    uuid NOT NULL REFERENCES pay.subscriptions (id),
    subscription_ref   text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    claimed_by         text,
    claim_expires      timestamptz,
    completed_at       timestamptz,
    attempts           int NOT NULL DEFAULT 0,
    last_error         text,
    next_attempt_at    timestamptz,
    dead_at            timestamptz,
    CONSTRAINT invoice_fulfillments_claim_has_expiry CHECK ((claimed_by IS NULL) = (claim_expires IS NULL))
);
CREATE INDEX IF NOT EXISTS invoice_fulfillments_open ON pay.invoice_fulfillments (created_at) WHERE completed_at IS NULL;

-- Writes one audit row about a subscription (pay.audit_log, chained per subscription).
CREATE OR REPLACE FUNCTION pay._audit_subscription(
    p_subscription_id uuid,
    p_from text,
    p_to text,
    p_cause text,
    p_evidence_id text DEFAULT NULL,
    p_proposed text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.audit_log (subscription_id, from_state, to_state, proposed_status, cause, evidence_id)
    VALUES (p_subscription_id, p_from, p_to, p_proposed, p_cause, p_evidence_id);
END;
$$;

-- Writes one command for a subscription. A path that needs Stripe's subscription id
-- ({subscription}) or the Checkout Session id ({checkout_session}) waits until it is known.
-- Returns NULL when the key exists already (the same command was written before).
CREATE OR REPLACE FUNCTION pay._enqueue_for_subscription(
    p_subscription_id uuid,
    p_kind text,
    p_idempotency_key text,
    p_method text,
    p_path text,
    p_params jsonb
) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_known text;
    v_status text := 'pending';
    v_path text := p_path;
    v_id bigint;
BEGIN
    IF position('{subscription}' IN p_path) > 0 THEN
        SELECT s.stripe_subscription_id INTO v_known FROM pay.subscriptions s WHERE s.id = p_subscription_id;
        IF v_known IS NULL THEN
            v_status := 'waiting';
        ELSE
            v_path := replace(p_path, '{subscription}', v_known);
        END IF;
    ELSIF position('{checkout_session}' IN p_path) > 0 THEN
        SELECT s.stripe_checkout_session_id INTO v_known FROM pay.subscriptions s WHERE s.id = p_subscription_id;
        IF v_known IS NULL THEN
            v_status := 'waiting';
        ELSE
            v_path := replace(p_path, '{checkout_session}', v_known);
        END IF;
    END IF;
    INSERT INTO pay.outbox (subscription_id, kind, idempotency_key, request, status)
    VALUES (p_subscription_id, p_kind, p_idempotency_key,
            jsonb_build_object('method', p_method, 'path', v_path, 'params', p_params), v_status)
    ON CONFLICT ON CONSTRAINT outbox_idempotency_key_unique DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NOT NULL AND v_status = 'pending' THEN
        PERFORM pg_notify('pay_outbox', '');
    END IF;
    RETURN v_id;
END;
$$;

-- An id a subscription's waiting commands need is known: they become sendable.
CREATE OR REPLACE FUNCTION pay._release_subscription_waiting(p_subscription_id uuid, p_placeholder text, p_value text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE pay.outbox o
    SET status = 'pending',
        request = jsonb_set(o.request, '{path}', to_jsonb(replace(o.request ->> 'path', p_placeholder, p_value))),
        run_after = now(),
        updated_at = now()
    WHERE o.subscription_id = p_subscription_id AND o.status = 'waiting'
      AND position(p_placeholder IN o.request ->> 'path') > 0;
    IF FOUND THEN
        PERFORM pg_notify('pay_outbox', '');
    END IF;
END;
$$;

-- The id a subscription's waiting commands need will never exist.
CREATE OR REPLACE FUNCTION pay._skip_subscription_waiting(p_subscription_id uuid, p_why text) RETURNS void
LANGUAGE sql
AS $$
    UPDATE pay.outbox o
    SET status = 'skipped', last_error = p_why, completed_at = now(), updated_at = now()
    WHERE o.subscription_id = p_subscription_id AND o.status = 'waiting';
$$;

-- Queues the subscription-mode Checkout Session of the subscription's current sign-up attempt.
-- Our ids travel in the session's metadata and, through subscription_data, in the subscription's
-- (and so in every invoice's subscription_details), so every event finds this row, and a session
-- whose create answer was lost can be found by listing sessions.
CREATE OR REPLACE FUNCTION pay._enqueue_subscription_session(p pay.subscriptions) RETURNS bigint
LANGUAGE sql
AS $$
    SELECT pay._enqueue_for_subscription(p.id, 'create_subscription_session',
        pay.idempotency_key('pgpay.sub_create', jsonb_build_object('subscription_id', p.id, 'attempt', p.checkout_attempt)),
        'POST', '/v1/checkout/sessions',
        jsonb_build_object(
            'mode', 'subscription',
            'line_items[0][price]', p.price,
            'line_items[0][quantity]', p.quantity::text,
            'success_url', p.success_url,
            'client_reference_id', p.subscription_ref,
            'metadata[pgpay_subscription_id]', p.id::text,
            'metadata[subscription_ref]', p.subscription_ref,
            'subscription_data[metadata][pgpay_subscription_id]', p.id::text,
            'subscription_data[metadata][subscription_ref]', p.subscription_ref)
        || coalesce((SELECT jsonb_object_agg(k.prefix || '[' || m.key || ']', m.value)
                     FROM jsonb_each_text(p.metadata) m,
                          unnest(ARRAY['metadata', 'subscription_data[metadata]']) k(prefix)), '{}')
        || jsonb_strip_nulls(jsonb_build_object(
            'cancel_url', p.cancel_url,
            'metadata[customer_ref]', p.customer_ref,
            'subscription_data[metadata][customer_ref]', p.customer_ref)));
$$;

CREATE OR REPLACE FUNCTION pay.begin_subscription(
    subscription_ref text,
    price text,
    quantity int DEFAULT 1,
    customer_ref text DEFAULT NULL,
    metadata jsonb DEFAULT '{}',
    success_url text DEFAULT NULL,
    cancel_url text DEFAULT NULL
) RETURNS pay.subscriptions
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_metadata jsonb := coalesce(metadata, '{}');
    v_fingerprint text;
    v pay.subscriptions;
BEGIN
    PERFORM pay._subscription_validate(subscription_ref, price, quantity, customer_ref,
                                       pay._bounded_json_text(v_metadata, 'metadata', 131072));
    -- A hosted Checkout Session: the same URL rules as begin_checkout's session mode.
    PERFORM pay._checkout_validate_mode('session', success_url, cancel_url);
    v_fingerprint := pay.idempotency_key('pgpay.subscription', jsonb_build_object(
        'subscription_ref', subscription_ref, 'price', price, 'quantity', quantity,
        'customer_ref', customer_ref, 'metadata', v_metadata,
        'success_url', success_url, 'cancel_url', cancel_url));

    -- The same call again returns the same row and writes nothing, not even a lock.
    SELECT * INTO v FROM pay.subscriptions s WHERE s.subscription_ref = begin_subscription.subscription_ref;
    IF FOUND AND v.params_fingerprint = v_fingerprint
       AND v.checkout_status IS DISTINCT FROM 'expired' AND v.checkout_status IS DISTINCT FROM 'create_failed'
       AND v.status IS DISTINCT FROM 'canceled' AND v.status IS DISTINCT FROM 'incomplete_expired' THEN
        RETURN v;
    END IF;

    IF NOT FOUND THEN
        -- Concurrent first calls meet at the unique subscription_ref: one inserts, the others
        -- wait for it and then find its row below.
        INSERT INTO pay.subscriptions (subscription_ref, price, quantity, customer_ref, metadata, success_url, cancel_url,
                                       params_fingerprint)
        VALUES (begin_subscription.subscription_ref, begin_subscription.price, begin_subscription.quantity,
                begin_subscription.customer_ref, v_metadata, begin_subscription.success_url,
                begin_subscription.cancel_url, v_fingerprint)
        ON CONFLICT ON CONSTRAINT subscriptions_ref_unique DO NOTHING
        RETURNING * INTO v;
        IF FOUND THEN
            PERFORM pay._audit_subscription(v.id, NULL, NULL, 'subscription begun (price ' || v.price
                || ', quantity ' || v.quantity || ')');
            PERFORM pay._enqueue_subscription_session(v);
            RETURN v;
        END IF;
    END IF;

    SELECT * INTO v FROM pay.subscriptions s WHERE s.subscription_ref = begin_subscription.subscription_ref
    FOR NO KEY UPDATE;
    IF v.status IN ('canceled', 'incomplete_expired') THEN
        RAISE EXCEPTION 'begin_subscription: subscription_ref % has ended (%); it cannot begin again', subscription_ref, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'A new subscription needs a new subscription_ref.';
    END IF;
    IF v.checkout_status IS DISTINCT FROM 'expired' AND v.checkout_status IS DISTINCT FROM 'create_failed' THEN
        IF v.params_fingerprint = v_fingerprint THEN
            RETURN v;
        END IF;
        IF v.stripe_subscription_id IS NOT NULL OR v.checkout_status = 'complete' THEN
            RAISE EXCEPTION 'begin_subscription: subscription_ref % is subscribed already (%), with other parameters',
                subscription_ref, coalesce(v.stripe_subscription_id, 'checkout complete')
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Use pay.change_subscription to change its price or quantity.';
        END IF;
        RAISE EXCEPTION 'begin_subscription: subscription_ref % has a sign-up in progress with other parameters', subscription_ref
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call pay.cancel_subscription first (it expires the open Checkout Session), then begin again.';
    END IF;

    -- The last sign-up ended without a subscription (its session expired, or Stripe refused
    -- it): a new attempt, with a new Checkout Session, on the same row.
    UPDATE pay.subscriptions s
    SET price = begin_subscription.price, quantity = begin_subscription.quantity,
        customer_ref = begin_subscription.customer_ref, metadata = v_metadata,
        success_url = begin_subscription.success_url, cancel_url = begin_subscription.cancel_url,
        params_fingerprint = v_fingerprint, checkout_attempt = s.checkout_attempt + 1,
        checkout_status = NULL, stripe_checkout_session_id = NULL, checkout_url = NULL, checkout_expires_at = NULL,
        last_error = NULL, updated_at = now()
    WHERE s.id = v.id
    RETURNING * INTO v;
    PERFORM pay._audit_subscription(v.id, v.status, v.status, 'sign-up begun again (attempt ' || v.checkout_attempt
        || ', price ' || v.price || ', quantity ' || v.quantity || ')');
    PERFORM pay._enqueue_subscription_session(v);
    RETURN v;
END;
$$;

-- Returns once the worker has stored the Checkout Session's URL (the customer is sent there), or
-- the checkout is complete already.
-- Raises like pay.wait_for_checkout: 55000 when no session will come (or the row was made in
-- this same transaction, which the worker cannot see), 57014 on timeout.
CREATE OR REPLACE FUNCTION pay.wait_for_subscription_checkout(subscription_ref text, timeout_ms int DEFAULT 5000)
RETURNS pay.subscriptions
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.subscriptions;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_ms / 1000.0);
    v_pause float8 := 0.005;
BEGIN
    IF timeout_ms IS NULL OR timeout_ms < 0 OR timeout_ms > 600000 THEN
        RAISE EXCEPTION 'wait_for_subscription_checkout: timeout_ms must be between 0 and 600000, got %', timeout_ms
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        SELECT * INTO v FROM pay.subscriptions s WHERE s.subscription_ref = wait_for_subscription_checkout.subscription_ref;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'wait_for_subscription_checkout: no subscription %', subscription_ref USING ERRCODE = 'no_data_found';
        END IF;
        IF v.checkout_status IN ('expired', 'create_failed') THEN
            RAISE EXCEPTION 'wait_for_subscription_checkout: the sign-up of subscription % is % and will get no Checkout Session',
                subscription_ref, v.checkout_status
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = coalesce(v.last_error #>> '{error,message}', v.last_error::text, ''),
                      HINT = 'Call pay.begin_subscription again to start a new sign-up.';
        END IF;
        -- (A session whose completion arrived before the create's answer has no URL to give:
        -- the customer is done with it.)
        IF v.checkout_url IS NOT NULL OR v.checkout_status = 'complete' THEN
            RETURN v;
        END IF;
        IF EXISTS (SELECT 1 FROM pay.subscriptions s
                   WHERE s.id = v.id AND s.xmin::text::bigint = txid_current_if_assigned() % 4294967296) THEN
            RAISE EXCEPTION 'wait_for_subscription_checkout: subscription % was begun in this same transaction', subscription_ref
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Commit the transaction that called pay.begin_subscription first: the worker cannot see it before.';
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'wait_for_subscription_checkout: no Checkout Session for subscription % after % ms', subscription_ref, timeout_ms
                USING ERRCODE = 'query_canceled',
                      HINT = 'Is pgpay-worker running? See pay.outbox_health.';
        END IF;
        PERFORM pg_sleep(least(v_pause, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0)));
        v_pause := least(v_pause * 2, 0.05);
    END LOOP;
END;
$$;

-- The subscription of subscription_ref, locked; 02000 when there is none.
CREATE OR REPLACE FUNCTION pay._lock_subscription(p_subscription_ref text, p_caller text) RETURNS pay.subscriptions
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.subscriptions;
BEGIN
    SELECT * INTO v FROM pay.subscriptions s WHERE s.subscription_ref = p_subscription_ref FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: no subscription %', p_caller, p_subscription_ref USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END;
$$;

-- Changes the subscription's price and quantity at Stripe (POST /v1/subscriptions/<id> with its
-- item). Stripe's answer and its customer.subscription.updated event bring the change back. The
-- same call again (while that change is on its way or done) queues nothing.
CREATE OR REPLACE FUNCTION pay.change_subscription(subscription_ref text, price text, quantity int)
RETURNS pay.subscriptions
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.subscriptions;
    v_last pay.outbox;
    v_count int;
BEGIN
    PERFORM pay._subscription_validate(subscription_ref, price, quantity, NULL, NULL);
    v := pay._lock_subscription(subscription_ref, 'change_subscription');
    IF v.stripe_subscription_id IS NULL OR v.stripe_subscription_item_id IS NULL THEN
        RAISE EXCEPTION 'change_subscription: subscription % has no Stripe subscription yet', subscription_ref
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'The customer must complete the Checkout Session first (pay.entitlements says when).';
    END IF;
    IF v.status IN ('canceled', 'incomplete_expired') THEN
        RAISE EXCEPTION 'change_subscription: subscription % has ended (%)', subscription_ref, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT * INTO v_last FROM pay.outbox o
    WHERE o.subscription_id = v.id AND o.kind = 'update_subscription'
    ORDER BY o.id DESC LIMIT 1;
    IF FOUND AND v_last.status <> 'dead'
       AND v_last.request #>> '{params,items[0][price]}' = change_subscription.price
       AND v_last.request #>> '{params,items[0][quantity]}' = change_subscription.quantity::text THEN
        RETURN v;  -- the same change again
    END IF;
    IF (v_last.id IS NULL OR v_last.status IN ('done', 'dead', 'skipped'))
       AND v.price = change_subscription.price AND v.quantity = change_subscription.quantity THEN
        RETURN v;  -- Stripe has these already
    END IF;
    SELECT count(*) INTO v_count FROM pay.outbox o WHERE o.subscription_id = v.id AND o.kind = 'update_subscription';
    PERFORM pay._enqueue_for_subscription(v.id, 'update_subscription',
        pay.idempotency_key('pgpay.sub_update', jsonb_build_object(
            'subscription_id', v.id, 'change', v_count + 1, 'price', change_subscription.price,
            'quantity', change_subscription.quantity)),
        'POST', '/v1/subscriptions/{subscription}',
        jsonb_build_object('items[0][id]', v.stripe_subscription_item_id,
                           'items[0][price]', change_subscription.price,
                           'items[0][quantity]', change_subscription.quantity::text));
    PERFORM pay._audit_subscription(v.id, v.status, v.status, format('change requested: price %s, quantity %s (was %s, %s)',
        change_subscription.price, change_subscription.quantity, v.price, v.quantity));
    RETURN v;
END;
$$;

-- Cancels a subscription at the end of its period (POST cancel_at_period_end=true) or at once
-- (DELETE). Before Stripe has a subscription, the sign-up is withdrawn instead: a session not yet
-- requested is never requested, an open one is expired. The same call again queues nothing.
CREATE OR REPLACE FUNCTION pay.cancel_subscription(subscription_ref text, at_period_end boolean DEFAULT true)
RETURNS pay.subscriptions
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.subscriptions;
    v_create pay.outbox;
    v_count int;
BEGIN
    IF at_period_end IS NULL THEN
        RAISE EXCEPTION 'cancel_subscription: at_period_end must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := pay._lock_subscription(subscription_ref, 'cancel_subscription');
    IF v.status IN ('canceled', 'incomplete_expired') THEN
        RETURN v;  -- nothing left to cancel
    END IF;
    IF v.stripe_subscription_id IS NULL THEN
        IF v.checkout_status IN ('expired', 'create_failed') THEN
            RETURN v;
        END IF;
        IF v.checkout_status = 'complete' THEN
            RAISE EXCEPTION 'cancel_subscription: the customer completed the checkout of subscription %, but Stripe''s subscription is not known yet', subscription_ref
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Try again once its customer.subscription.created event has arrived.';
        END IF;
        SELECT * INTO v_create FROM pay.outbox o
        WHERE o.subscription_id = v.id AND o.kind = 'create_subscription_session'
        ORDER BY o.id DESC LIMIT 1
        FOR UPDATE;
        IF v_create.status = 'pending' AND v_create.attempts = 0 THEN
            UPDATE pay.outbox o SET status = 'skipped', last_error = 'sign-up canceled before it was sent',
                completed_at = now(), updated_at = now()
            WHERE o.id = v_create.id;
            UPDATE pay.subscriptions s SET checkout_status = 'expired', updated_at = now() WHERE s.id = v.id
            RETURNING * INTO v;
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                'sign-up canceled before the Checkout Session was requested');
            RETURN v;
        END IF;
        IF pay._enqueue_for_subscription(v.id, 'expire_checkout_session',
               pay.idempotency_key('pgpay.sub_session_expire', jsonb_build_object(
                   'subscription_id', v.id, 'attempt', v.checkout_attempt)),
               'POST', '/v1/checkout/sessions/{checkout_session}/expire', '{}') IS NOT NULL THEN
            PERFORM pay._audit_subscription(v.id, v.status, v.status, 'sign-up canceled: the Checkout Session will be expired');
        END IF;
        RETURN v;
    END IF;
    IF at_period_end THEN
        IF v.cancel_at_period_end OR EXISTS (
               SELECT 1 FROM pay.outbox o
               WHERE o.subscription_id = v.id AND o.kind = 'cancel_subscription'
                 AND o.status IN ('waiting', 'pending', 'in_flight')) THEN
            RETURN v;
        END IF;
        SELECT count(*) INTO v_count FROM pay.outbox o WHERE o.subscription_id = v.id AND o.kind = 'cancel_subscription';
        PERFORM pay._enqueue_for_subscription(v.id, 'cancel_subscription',
            pay.idempotency_key('pgpay.sub_cancel', jsonb_build_object(
                'subscription_id', v.id, 'at_period_end', true, 'request', v_count + 1)),
            'POST', '/v1/subscriptions/{subscription}', jsonb_build_object('cancel_at_period_end', 'true'));
        PERFORM pay._audit_subscription(v.id, v.status, v.status, 'cancellation at period end requested');
    ELSE
        IF EXISTS (SELECT 1 FROM pay.outbox o
                   WHERE o.subscription_id = v.id AND o.kind = 'cancel_subscription'
                     AND o.request ->> 'method' = 'DELETE' AND o.status <> 'dead') THEN
            RETURN v;
        END IF;
        PERFORM pay._enqueue_for_subscription(v.id, 'cancel_subscription',
            pay.idempotency_key('pgpay.sub_cancel', jsonb_build_object('subscription_id', v.id, 'at_period_end', false)),
            'DELETE', '/v1/subscriptions/{subscription}', '{}');
        PERFORM pay._audit_subscription(v.id, v.status, v.status, 'immediate cancellation requested');
    END IF;
    RETURN v;
END;
$$;

-- What happened to a subscription, from the audit log, oldest first.
CREATE OR REPLACE FUNCTION pay.subscription_timeline(subscription_ref text)
RETURNS TABLE (at timestamptz, event text, from_status text, to_status text, cause text, evidence_id text, actor text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT a.at,
           CASE WHEN a.proposed_status IS NOT NULL AND a.from_state IS NOT DISTINCT FROM a.to_state
                THEN 'ignored ' || a.proposed_status
                WHEN row_number() OVER (ORDER BY a.id) = 1 THEN 'created'
                WHEN a.from_state IS DISTINCT FROM a.to_state
                THEN coalesce(a.from_state, 'none') || ' -> ' || coalesce(a.to_state, 'none')
                ELSE 'noted' END,
           a.from_state, a.to_state, a.cause, a.evidence_id, a.actor
    FROM pay.audit_log a
    JOIN pay.subscriptions s ON s.id = a.subscription_id
    WHERE s.subscription_ref = subscription_timeline.subscription_ref
    ORDER BY a.id;
$$;

-- The grace period of a past_due subscription (setting pay.past_due_grace, default 3 days),
-- validated: a bad value names the setting.
CREATE OR REPLACE FUNCTION pay._past_due_grace() RETURNS interval
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v text := coalesce(nullif(current_setting('pay.past_due_grace', true), ''), '3 days');
    v_grace interval;
BEGIN
    BEGIN
        v_grace := v::interval;
        IF v_grace < interval '0' THEN
            RAISE invalid_parameter_value;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'setting pay.past_due_grace = % is not valid', v
            USING ERRCODE = 'invalid_parameter_value', HINT = 'an interval of 0 or more, such as ''3 days''';
    END;
    RETURN v_grace;
END;
$$;

-- Whether each subscription's holder may use what it pays for, and why. Entitled while active
-- or trialing (until the period ends when it cancels at period end), and while past_due for
-- pay.past_due_grace after it became past_due; never before Stripe has a subscription, and
-- never once it is canceled, unpaid, paused or incomplete.
CREATE OR REPLACE VIEW pay.entitlements AS
    SELECT s.subscription_ref, e.entitled, s.status, s.current_period_end, e.reason,
           s.id AS subscription_id, s.customer_ref, s.price, s.quantity, s.cancel_at_period_end, s.past_due_since
    FROM pay.subscriptions s
    CROSS JOIN (SELECT pay._past_due_grace() AS grace) g
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN s.status IN ('active', 'trialing') AND s.cancel_at_period_end AND s.current_period_end <= now()
                THEN false
            WHEN s.status IN ('active', 'trialing') THEN true
            WHEN s.status = 'past_due' THEN s.past_due_since + g.grace > now()
            ELSE false END AS entitled,
        CASE
            WHEN s.status IS NULL THEN CASE s.checkout_status
                WHEN 'expired' THEN 'checkout expired'
                WHEN 'create_failed' THEN 'checkout could not be created'
                WHEN 'complete' THEN 'checkout complete; Stripe''s subscription not reported yet'
                ELSE 'checkout not completed' END
            WHEN s.status IN ('active', 'trialing') AND s.cancel_at_period_end AND s.current_period_end <= now()
                THEN 'canceled at period end'
            WHEN s.status IN ('active', 'trialing') AND s.cancel_at_period_end
                THEN s.status || ', cancels at period end'
            WHEN s.status IN ('active', 'trialing') THEN s.status
            WHEN s.status = 'past_due' AND s.past_due_since + g.grace > now()
                THEN 'past_due, within the grace period'
            WHEN s.status = 'past_due' THEN 'past_due beyond the grace period'
            ELSE s.status END AS reason
    ) e;

-- Subscriptions' evidence (issue 14): Stripe's subscriptions, invoices and subscription-mode
-- Checkout Sessions applied through the one rule, whichever way they arrive (a webhook through
-- extension/src/webhook.rs, an outbox answer through pay.complete_outbox, reconciliation through
-- pay._apply_stripe_object); refusals of subscription commands; a paid invoice's one fulfillment.
-- Re-runnable (OR REPLACE): the upgrade script's subscriptions section repeats it verbatim.

-- A paid invoice's one fulfillment, created once whoever records the payment first (a webhook
-- under either name, an API answer, reconciliation). Returns whether it was created now.
CREATE OR REPLACE FUNCTION pay._provision_paid_invoice(p_invoice pay.invoices, p_cause text, p_evidence_id text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_status text;
BEGIN
    IF p_invoice.status IS DISTINCT FROM 'paid' THEN
        RETURN false;
    END IF;
    INSERT INTO pay.invoice_fulfillments (stripe_invoice_id, subscription_id, subscription_ref)
    VALUES (p_invoice.stripe_invoice_id, p_invoice.subscription_id, p_invoice.subscription_ref)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT s.status INTO v_status FROM pay.subscriptions s WHERE s.id = p_invoice.subscription_id;
    PERFORM pay._audit_subscription(p_invoice.subscription_id, v_status, v_status,
        format('invoice %s paid (%s %s, %s): fulfillment created (%s)', p_invoice.stripe_invoice_id,
               p_invoice.amount_paid, p_invoice.currency, coalesce(p_invoice.billing_reason, 'no billing reason'), p_cause),
        p_evidence_id);
    RETURN true;
END;
$$;

-- Applies one billing object (a Subscription, an Invoice or a subscription-mode Checkout
-- Session; pay._billing_facts reads either API shape) to subscription p_subscription_id, through
-- the one rule. p_evidence_at is the Stripe time of the evidence (unix seconds). Outcomes:
-- applied, unchanged, ignored (audited with what was proposed), flagged. Raises 22023, writing
-- nothing, when the object cannot be applied (webhooks check first and store it instead).
CREATE OR REPLACE FUNCTION pay._apply_billing_object(p_subscription_id uuid, p_object jsonb, p_event_type text,
    p_cause text, p_evidence_id text, p_evidence_at bigint, OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    f jsonb := pay._billing_facts(p_object::text);
    v_kind text := f ->> 'kind';
    v_id text := f ->> 'id';
    v_status text := f ->> 'status';
    v_stripe_sub text := f ->> 'subscription';
    v_what text := coalesce(p_event_type, 'api answer');
    v pay.subscriptions;
    v_after pay.subscriptions;
    v_invoice pay.invoices;
    v_before pay.invoices;
    v_decision text;
    v_linked boolean := false;
    v_checkout text;
    v_changes text[];
BEGIN
    IF f ? 'problem' THEN
        RAISE EXCEPTION 'evidence for subscription % cannot be applied: %', p_subscription_id, f ->> 'problem'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay.subscriptions s WHERE s.id = p_subscription_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no subscription %', p_subscription_id USING ERRCODE = 'no_data_found';
    END IF;

    -- One subscription row, one Stripe subscription: a second one claiming it is for a human.
    IF v_stripe_sub IS NOT NULL AND v.stripe_subscription_id IS NOT NULL AND v.stripe_subscription_id <> v_stripe_sub THEN
        UPDATE pay.subscriptions s SET flagged_reason = 'a second Stripe subscription ' || v_stripe_sub || ' claims this subscription',
            updated_at = now() WHERE s.id = v.id;
        PERFORM pay._audit_subscription(v.id, v.status, v.status,
            format('flagged: %s about a second Stripe subscription %s (%s)', v_kind, v_stripe_sub, p_cause), p_evidence_id);
        outcome := 'flagged';
        detail := v_what || ' -> flagged: a second Stripe subscription ' || v_stripe_sub;
        RETURN;
    END IF;
    -- A session of an earlier sign-up attempt (one that expired): late news, nothing to apply.
    IF v_kind = 'checkout_session' AND v.stripe_checkout_session_id IS DISTINCT FROM v_id
       AND (v.stripe_checkout_session_id IS NOT NULL OR v.checkout_attempt > 1) AND v_stripe_sub IS NULL THEN
        IF v.stripe_checkout_session_id IS NOT NULL OR v_status <> 'open' THEN
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('ignored: Checkout Session %s (%s) is not this sign-up''s (%s)', v_id, v_status, p_cause),
                p_evidence_id, 'checkout ' || v_status);
            outcome := 'ignored';
            detail := v_what || ' -> ignored: a Checkout Session of an earlier sign-up';
            RETURN;
        END IF;
    END IF;

    IF v_stripe_sub IS NOT NULL AND v.stripe_subscription_id IS NULL THEN
        UPDATE pay.subscriptions s
        SET stripe_subscription_id = v_stripe_sub, stripe_customer_id = coalesce(s.stripe_customer_id, f ->> 'customer'),
            updated_at = now()
        WHERE s.id = v.id RETURNING * INTO v;
        PERFORM pay._audit_subscription(v.id, v.status, v.status,
            format('Stripe subscription %s linked (%s)', v_stripe_sub, p_cause), p_evidence_id);
        PERFORM pay._release_subscription_waiting(v.id, '{subscription}', v_stripe_sub);
        v_linked := true;
    END IF;

    IF v_kind = 'checkout_session' THEN
        IF v.stripe_checkout_session_id IS NULL THEN
            UPDATE pay.subscriptions s
            SET stripe_checkout_session_id = v_id, checkout_url = f ->> 'url',
                checkout_expires_at = to_timestamp((f ->> 'expires_at')::bigint),
                stripe_customer_id = coalesce(s.stripe_customer_id, f ->> 'customer'), updated_at = now()
            WHERE s.id = v.id RETURNING * INTO v;
            PERFORM pay._release_subscription_waiting(v.id, '{checkout_session}', v_id);
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('Checkout Session %s recorded (%s)', v_id, p_cause), p_evidence_id);
            v_linked := true;
        END IF;
        v_checkout := CASE WHEN v_status IN ('open', 'complete', 'expired') THEN v_status END;
        IF v_checkout IS NULL THEN
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('ignored: Checkout Session status %s is unknown (%s)', v_status, p_cause), p_evidence_id,
                'checkout ' || v_status);
            outcome := CASE WHEN v_linked THEN 'applied' ELSE 'ignored' END;
        ELSIF v.checkout_status IS NOT DISTINCT FROM v_checkout THEN
            outcome := CASE WHEN v_linked THEN 'applied' ELSE 'unchanged' END;
        ELSIF v.checkout_status IS NULL OR v.checkout_status = 'open' THEN
            -- open leads to complete or expired, which both end the session.
            UPDATE pay.subscriptions s
            SET checkout_status = v_checkout, stripe_customer_id = coalesce(s.stripe_customer_id, f ->> 'customer'),
                updated_at = now()
            WHERE s.id = v.id;
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('checkout %s -> %s (%s)', coalesce(v.checkout_status, 'requested'), v_checkout, p_cause), p_evidence_id);
            IF v_checkout = 'expired' AND v.stripe_subscription_id IS NULL THEN
                PERFORM pay._skip_subscription_waiting(v.id, 'the sign-up''s Checkout Session expired');
            END IF;
            outcome := 'applied';
        ELSE
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('ignored: checkout is %s already (%s)', v.checkout_status, p_cause), p_evidence_id,
                'checkout ' || v_checkout);
            outcome := CASE WHEN v_linked THEN 'applied' ELSE 'ignored' END;
        END IF;
        detail := v_what || ' -> ' || outcome;
        RETURN;
    END IF;

    IF v_kind = 'subscription' THEN
        v_decision := pay._subscription_decide(v.status, floor(extract(epoch FROM v.evidence_at))::bigint,
                                               v_status, p_evidence_at);
        IF v_decision LIKE 'ignore:%' THEN
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('ignored (%s): %s', CASE v_decision
                    WHEN 'ignore:terminal' THEN 'the subscription has ended'
                    WHEN 'ignore:stale' THEN 'newer evidence was applied'
                    ELSE 'unknown status' END, p_cause),
                p_evidence_id, v_status);
            outcome := CASE WHEN v_linked THEN 'applied' ELSE 'ignored' END;
            detail := v_what || ' -> ' || outcome || ' (' || v_decision || ')';
            RETURN;
        END IF;
        UPDATE pay.subscriptions s
        SET status = v_status,
            evidence_at = to_timestamp(p_evidence_at),
            price = coalesce(f ->> 'price', s.price),
            quantity = coalesce(least((f ->> 'quantity')::bigint, 2147483647)::int, s.quantity),
            stripe_subscription_item_id = coalesce(f ->> 'item', s.stripe_subscription_item_id),
            stripe_customer_id = coalesce(f ->> 'customer', s.stripe_customer_id),
            current_period_start = coalesce(to_timestamp((f ->> 'period_start')::bigint), s.current_period_start),
            current_period_end = coalesce(to_timestamp((f ->> 'period_end')::bigint), s.current_period_end),
            cancel_at_period_end = coalesce((f ->> 'cancel_at_period_end')::boolean, false),
            canceled_at = to_timestamp((f ->> 'canceled_at')::bigint),
            past_due_since = CASE WHEN v_status = 'past_due'
                                  THEN coalesce(s.past_due_since, to_timestamp(p_evidence_at)) END,
            updated_at = now()
        WHERE s.id = v.id
        RETURNING * INTO v_after;
        v_changes := array_remove(ARRAY[
            CASE WHEN v_after.price IS DISTINCT FROM v.price THEN format('price %s -> %s', v.price, v_after.price) END,
            CASE WHEN v_after.quantity IS DISTINCT FROM v.quantity THEN format('quantity %s -> %s', v.quantity, v_after.quantity) END,
            CASE WHEN v_after.current_period_end IS DISTINCT FROM v.current_period_end
                 THEN format('period ends %s', to_char(v_after.current_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')) END,
            CASE WHEN v_after.cancel_at_period_end IS DISTINCT FROM v.cancel_at_period_end
                 THEN CASE WHEN v_after.cancel_at_period_end THEN 'cancels at period end' ELSE 'no longer cancels at period end' END END,
            CASE WHEN v_after.stripe_subscription_item_id IS DISTINCT FROM v.stripe_subscription_item_id
                 THEN 'item ' || v_after.stripe_subscription_item_id END], NULL);
        IF v_after.status IS DISTINCT FROM v.status OR cardinality(v_changes) > 0 OR v_linked THEN
            PERFORM pay._audit_subscription(v.id, v.status, v_after.status,
                p_cause || CASE WHEN cardinality(v_changes) > 0 THEN ' (' || array_to_string(v_changes, ', ') || ')' ELSE '' END
                || ' [' || (f ->> 'shape') || ' shape]',
                p_evidence_id);
            outcome := 'applied';
        ELSE
            outcome := 'unchanged';
        END IF;
        IF v_status IN ('canceled', 'incomplete_expired') THEN
            PERFORM pay._skip_subscription_waiting(v.id, 'the subscription has ended');
        END IF;
        detail := v_what || ' -> ' || outcome;
        RETURN;
    END IF;

    -- An invoice of this subscription.
    SELECT * INTO v_invoice FROM pay.invoices i WHERE i.stripe_invoice_id = v_id FOR UPDATE;
    IF FOUND THEN
        v_before := v_invoice;
    END IF;
    v_decision := pay._invoice_decide(v_invoice.status, floor(extract(epoch FROM v_invoice.evidence_at))::bigint,
                                      v_status, p_evidence_at);
    IF v_decision LIKE 'ignore:%' THEN
        PERFORM pay._audit_subscription(v.id, v.status, v.status,
            format('ignored (%s): invoice %s %s (%s)', CASE v_decision
                WHEN 'ignore:terminal' THEN 'the invoice is ' || v_invoice.status || ' already'
                WHEN 'ignore:stale' THEN 'newer evidence was applied'
                ELSE 'unknown invoice status' END, v_id, v_status, p_cause),
            p_evidence_id, 'invoice ' || v_status);
        outcome := CASE WHEN v_linked THEN 'applied' ELSE 'ignored' END;
    ELSE
        INSERT INTO pay.invoices AS i (stripe_invoice_id, subscription_id, subscription_ref, status, amount_due, amount_paid,
                                       currency, billing_reason, period_start, period_end, paid_at, evidence_at)
        VALUES (v_id, v.id, v.subscription_ref, v_status, (f ->> 'amount_due')::bigint, (f ->> 'amount_paid')::bigint,
                f ->> 'currency', f ->> 'billing_reason', to_timestamp((f ->> 'period_start')::bigint),
                to_timestamp((f ->> 'period_end')::bigint),
                CASE WHEN v_status = 'paid' THEN coalesce(to_timestamp((f ->> 'paid_at')::bigint), to_timestamp(p_evidence_at)) END,
                to_timestamp(p_evidence_at))
        ON CONFLICT (stripe_invoice_id) DO UPDATE
        SET status = excluded.status, amount_due = excluded.amount_due, amount_paid = excluded.amount_paid,
            currency = excluded.currency, billing_reason = excluded.billing_reason,
            period_start = coalesce(excluded.period_start, i.period_start),
            period_end = coalesce(excluded.period_end, i.period_end),
            paid_at = coalesce(i.paid_at, excluded.paid_at), evidence_at = excluded.evidence_at, updated_at = now()
        RETURNING * INTO v_invoice;
        IF v_before IS NULL OR v_before.status IS DISTINCT FROM v_invoice.status
           OR v_before.amount_paid IS DISTINCT FROM v_invoice.amount_paid
           OR v_before.amount_due IS DISTINCT FROM v_invoice.amount_due THEN
            PERFORM pay._audit_subscription(v.id, v.status, v.status,
                format('invoice %s %s%s (%s %s due, %s paid; %s) [%s shape]', v_id,
                       CASE WHEN v_before IS NULL THEN 'recorded as ' ELSE v_before.status || ' -> ' END, v_invoice.status,
                       v_invoice.amount_due, v_invoice.currency, v_invoice.amount_paid, p_cause, f ->> 'shape'),
                p_evidence_id);
            outcome := 'applied';
        ELSE
            outcome := CASE WHEN v_linked THEN 'applied' ELSE 'unchanged' END;
        END IF;
    END IF;
    -- One fulfillment per paid invoice, in this transaction, however the payment was learnt.
    IF pay._provision_paid_invoice(v_invoice, p_cause, p_evidence_id) THEN
        outcome := 'applied';
    END IF;
    detail := v_what || ' -> ' || outcome;
END;
$$;

-- Stripe refused a subscription's command (pay.fail_outbox): a refused sign-up ends that attempt
-- (pay.begin_subscription may begin again); any other refusal is recorded and audited.
CREATE OR REPLACE FUNCTION pay._fail_subscription_command(p_command pay.outbox, p_http_status int, p_message text, p_error jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.subscriptions;
    v_evidence text := 'outbox:' || p_command.id || '#' || p_command.attempts;
BEGIN
    SELECT * INTO v FROM pay.subscriptions s WHERE s.id = p_command.subscription_id FOR NO KEY UPDATE;
    UPDATE pay.subscriptions s SET last_error = p_error, updated_at = now() WHERE s.id = v.id;
    IF p_command.kind = 'create_subscription_session' AND v.stripe_checkout_session_id IS NULL
       AND v.checkout_status IS NULL THEN
        UPDATE pay.subscriptions s SET checkout_status = 'create_failed', updated_at = now() WHERE s.id = v.id;
        PERFORM pay._skip_subscription_waiting(v.id, 'the Checkout Session was never created');
        PERFORM pay._audit_subscription(v.id, v.status, v.status,
            'Stripe refused the Checkout Session (HTTP ' || coalesce(p_http_status::text, '?') || '): ' || left(p_message, 500),
            v_evidence, 'checkout create_failed');
        RETURN;
    END IF;
    PERFORM pay._audit_subscription(v.id, v.status, v.status,
        p_command.kind || ' refused by Stripe (HTTP ' || coalesce(p_http_status::text, '?') || '): ' || left(p_message, 500),
        v_evidence);
END;
$$;

-- Reconciliation of one billing object read from Stripe's API (pay._apply_stripe_object):
-- applies it through the rule, adopts a session whose create answer was lost, and records what
-- webhooks missed as findings (a drifted status, a paid invoice that had no fulfillment).
CREATE OR REPLACE FUNCTION pay._reconcile_billing_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    f jsonb := pay._billing_facts(p_object::text);
    v_id uuid;
    v_before pay.subscriptions;
    v_after pay.subscriptions;
    v_had_fulfillment boolean := false;
    v_adopted boolean := false;
BEGIN
    IF f ->> 'problem' = 'the invoice belongs to no subscription' THEN
        outcome := 'not_ours';
        detail := 'an invoice of no subscription';
        RETURN;
    END IF;
    IF f ? 'problem' THEN
        RAISE EXCEPTION 'apply_stripe_object: % %: %', p_object ->> 'object', coalesce(p_object ->> 'id', ''), f ->> 'problem'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_id := pay._subscription_for(p_object::text);
    IF v_id IS NULL THEN
        outcome := 'not_ours';
        IF f ? 'claimed' THEN
            PERFORM pay._record_finding(p_run_id, 'unknown_subscription', NULL, f ->> 'id', f ->> 'claimed', NULL,
                'the ' || (f ->> 'kind') || ' names a pgpay subscription this database does not have');
            detail := 'names an unknown subscription';
        ELSE
            detail := 'no pgpay metadata';
        END IF;
        RETURN;
    END IF;
    SELECT * INTO v_before FROM pay.subscriptions s WHERE s.id = v_id FOR NO KEY UPDATE;
    IF f ->> 'kind' = 'invoice' THEN
        v_had_fulfillment := EXISTS (SELECT 1 FROM pay.invoice_fulfillments i WHERE i.stripe_invoice_id = f ->> 'id');
    END IF;
    IF f ->> 'kind' = 'checkout_session' AND v_before.stripe_checkout_session_id IS NULL THEN
        -- A crash between Stripe's create and our commit: adopt the session, and close the
        -- create command so it is never sent again.
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.subscription_id = v_id AND o.kind = 'create_subscription_session' AND o.status IN ('pending', 'in_flight');
        v_adopted := FOUND;
        IF v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', NULL, f ->> 'id', NULL, f ->> 'id',
                'Checkout Session of subscription ' || v_before.subscription_ref || ' created at Stripe but never recorded; adopted');
        END IF;
    END IF;
    SELECT a.outcome, a.detail INTO outcome, detail
    FROM pay._apply_billing_object(v_id, p_object, NULL, p_source, p_source || ':' || (f ->> 'id'),
                                   floor(extract(epoch FROM now()))::bigint) a;
    SELECT * INTO v_after FROM pay.subscriptions s WHERE s.id = v_id;
    IF f ->> 'kind' = 'subscription' THEN
        IF outcome = 'applied' AND v_after.status IS DISTINCT FROM v_before.status THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', NULL, f ->> 'id', v_before.status, v_after.status,
                'subscription ' || v_before.subscription_ref || ': missed by webhooks; fixed from the API');
        ELSIF outcome = 'ignored' AND v_before.status IS DISTINCT FROM f ->> 'status' THEN
            PERFORM pay._record_finding(p_run_id, 'status_mismatch', NULL, f ->> 'id', v_before.status, f ->> 'status',
                'subscription ' || v_before.subscription_ref || ': ended here but Stripe reports another status');
        END IF;
    ELSIF f ->> 'kind' = 'invoice' AND NOT v_had_fulfillment
          AND EXISTS (SELECT 1 FROM pay.invoice_fulfillments i WHERE i.stripe_invoice_id = f ->> 'id') THEN
        PERFORM pay._record_finding(p_run_id, 'invoice_fulfillment_repaired', NULL, f ->> 'id', 'fulfillment', 'none',
            'subscription ' || v_before.subscription_ref || ': a paid invoice webhooks never reported; provisioned once from the API');
    END IF;
    IF v_adopted THEN
        outcome := 'adopted';
    END IF;
END;
$$;

-- Subscriptions reconciliation did not see in a complete listing of its window
-- (GET /v1/subscriptions?status=all&created[gte]=...): a live subscription here that Stripe does
-- not list is a finding (missing_at_stripe), as a PaymentIntent is (pay.record_missing_at_stripe).
-- Returns how many were new.
CREATE OR REPLACE FUNCTION pay.record_missing_subscriptions_at_stripe(run_id bigint, seen_subscriptions text[]) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_run pay.reconciliation_runs;
    v_count int := 0;
    v record;
BEGIN
    SELECT * INTO v_run FROM pay.reconciliation_runs r WHERE r.id = run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'record_missing_subscriptions_at_stripe: no run %', run_id USING ERRCODE = 'no_data_found';
    END IF;
    FOR v IN
        SELECT s.id, s.subscription_ref, s.stripe_subscription_id FROM pay.subscriptions s
        WHERE s.stripe_subscription_id IS NOT NULL
          AND s.status IS DISTINCT FROM 'canceled' AND s.status IS DISTINCT FROM 'incomplete_expired'
          AND s.created_at >= v_run.window_start AND s.created_at < v_run.window_end - interval '1 minute'
          AND NOT (s.stripe_subscription_id = ANY (coalesce(seen_subscriptions, '{}')))
    LOOP
        IF pay._record_finding(run_id, 'missing_at_stripe', NULL, v.stripe_subscription_id, 'listed by Stripe', 'absent',
                               'subscription ' || v.subscription_ref || ': not in Stripe''s list for the window') THEN
            v_count := v_count + 1;
        END IF;
    END LOOP;
    RETURN v_count;
END;
$$;

-- Invoice fulfillments (issue 14): pay.claim_fulfillments and its neighbours for paid invoices,
-- with the same leases, fencing and retry/backoff/dead-letter settings.
-- Re-runnable (OR REPLACE): the upgrade script's subscriptions section repeats it verbatim.

-- Claims paid invoices to provision, each held by one consumer at a time (a lease that expires
-- if the consumer dies): pay.claim_fulfillments for invoices, with the same retry policy.
CREATE OR REPLACE FUNCTION pay.claim_invoice_fulfillments(consumer text, max_rows int DEFAULT 10, lease interval DEFAULT '5 minutes')
RETURNS SETOF pay.invoice_fulfillments
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    IF consumer IS NULL OR length(consumer) = 0 OR length(consumer) > 200 THEN
        RAISE EXCEPTION 'claim_invoice_fulfillments: consumer must be a name of 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 1000 THEN
        RAISE EXCEPTION 'claim_invoice_fulfillments: max_rows must be between 1 and 1000, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' THEN
        RAISE EXCEPTION 'claim_invoice_fulfillments: lease must be at least 1 second' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT f.stripe_invoice_id FROM pay.invoice_fulfillments f
        WHERE f.completed_at IS NULL AND f.dead_at IS NULL
          AND (f.next_attempt_at IS NULL OR f.next_attempt_at <= now())
          AND (f.claimed_by IS NULL OR f.claim_expires < now())
        ORDER BY f.created_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    )
    UPDATE pay.invoice_fulfillments f
    SET claimed_by = consumer, claim_expires = now() + lease
    FROM picked
    WHERE f.stripe_invoice_id = picked.stripe_invoice_id
    RETURNING f.*;
END;
$$;

-- The claim a consumer still holds, locked: NULL when it is not (or no longer) the holder.
CREATE OR REPLACE FUNCTION pay._held_invoice_fulfillment(p_invoice text, p_consumer text) RETURNS pay.invoice_fulfillments
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.invoice_fulfillments;
BEGIN
    SELECT * INTO v FROM pay.invoice_fulfillments f WHERE f.stripe_invoice_id = p_invoice FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invoice % has nothing to fulfil (not paid, or not known)', p_invoice
            USING ERRCODE = 'no_data_found';
    END IF;
    IF p_consumer IS NOT NULL AND v.completed_at IS NULL
       AND (v.claimed_by IS DISTINCT FROM p_consumer OR v.claim_expires < now()) THEN
        RETURN NULL;
    END IF;
    RETURN v;
END;
$$;

-- Marks an invoice's fulfillment done: true the first time, false when it was already done.
-- With `consumer`, only the consumer whose claim is live may complete (55000 otherwise).
CREATE OR REPLACE FUNCTION pay.complete_invoice_fulfillment(stripe_invoice_id text, consumer text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.invoice_fulfillments;
BEGIN
    v := pay._held_invoice_fulfillment(complete_invoice_fulfillment.stripe_invoice_id, consumer);
    IF v.stripe_invoice_id IS NULL THEN
        RAISE EXCEPTION 'complete_invoice_fulfillment: consumer % no longer holds the claim on invoice %', consumer, stripe_invoice_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Its lease expired and the fulfillment was handed to another consumer: roll back this provisioning.';
    END IF;
    IF v.completed_at IS NOT NULL THEN
        RETURN false;
    END IF;
    UPDATE pay.invoice_fulfillments f
    SET completed_at = now(), claimed_by = NULL, claim_expires = NULL, next_attempt_at = NULL
    WHERE f.stripe_invoice_id = v.stripe_invoice_id;
    RETURN true;
END;
$$;

-- Records that provisioning an invoice failed, with the retry policy of pay.fail_fulfillment
-- (pay.fulfillment_max_attempts, _backoff_base, _backoff_cap); the last failure makes it dead
-- (pay.dead_invoice_fulfillments) and is audited on the subscription.
CREATE OR REPLACE FUNCTION pay.fail_invoice_fulfillment(stripe_invoice_id text, error text, retry_in interval DEFAULT NULL,
                                                        consumer text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.invoice_fulfillments;
    v_max int := pay._fulfillment_setting('fulfillment_max_attempts', '10')::int;
    v_base interval := pay._fulfillment_setting('fulfillment_backoff_base', '10 seconds')::interval;
    v_cap interval := pay._fulfillment_setting('fulfillment_backoff_cap', '1 hour')::interval;
    v_attempts int;
    v_status text;
BEGIN
    IF error IS NULL OR btrim(error) = '' THEN
        RAISE EXCEPTION 'fail_invoice_fulfillment: error must say what failed' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF retry_in IS NOT NULL AND (retry_in < interval '0' OR retry_in > interval '30 days') THEN
        RAISE EXCEPTION 'fail_invoice_fulfillment: retry_in must be between 0 and 30 days, got %', retry_in
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := pay._held_invoice_fulfillment(fail_invoice_fulfillment.stripe_invoice_id, consumer);
    IF v.stripe_invoice_id IS NULL OR v.completed_at IS NOT NULL OR v.dead_at IS NOT NULL THEN
        RETURN false;
    END IF;
    v_attempts := v.attempts + 1;
    IF v_attempts >= v_max THEN
        UPDATE pay.invoice_fulfillments f
        SET attempts = v_attempts, last_error = left(error, 2000), dead_at = now(), next_attempt_at = NULL,
            claimed_by = NULL, claim_expires = NULL
        WHERE f.stripe_invoice_id = v.stripe_invoice_id;
        SELECT s.status INTO v_status FROM pay.subscriptions s WHERE s.id = v.subscription_id FOR NO KEY UPDATE;
        PERFORM pay._audit_subscription(v.subscription_id, v_status, v_status,
            'fulfillment of invoice ' || v.stripe_invoice_id || ' dead after ' || v_attempts || ' failed attempts: ' || left(error, 500));
    ELSE
        UPDATE pay.invoice_fulfillments f
        SET attempts = v_attempts, last_error = left(error, 2000), claimed_by = NULL, claim_expires = NULL,
            next_attempt_at = now() + coalesce(retry_in,
                random() * least(v_cap, v_base * power(2, least(v_attempts - 1, 30))))
        WHERE f.stripe_invoice_id = v.stripe_invoice_id;
    END IF;
    RETURN true;
END;
$$;

-- Hands a dead invoice fulfillment out again, with a fresh budget of attempts.
CREATE OR REPLACE FUNCTION pay.retry_invoice_fulfillment(stripe_invoice_id text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.invoice_fulfillments;
    v_status text;
BEGIN
    UPDATE pay.invoice_fulfillments f
    SET dead_at = NULL, attempts = 0, next_attempt_at = NULL
    WHERE f.stripe_invoice_id = retry_invoice_fulfillment.stripe_invoice_id AND f.dead_at IS NOT NULL
    RETURNING * INTO v;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM pay.invoice_fulfillments f WHERE f.stripe_invoice_id = retry_invoice_fulfillment.stripe_invoice_id) THEN
            RAISE EXCEPTION 'retry_invoice_fulfillment: invoice % has nothing to fulfil', stripe_invoice_id USING ERRCODE = 'no_data_found';
        END IF;
        RETURN false;
    END IF;
    SELECT s.status INTO v_status FROM pay.subscriptions s WHERE s.id = v.subscription_id FOR NO KEY UPDATE;
    PERFORM pay._audit_subscription(v.subscription_id, v_status, v_status,
        'dead fulfillment of invoice ' || v.stripe_invoice_id || ' handed out again by ' || session_user);
    RETURN true;
END;
$$;

-- Invoice fulfillments that failed pay.fulfillment_max_attempts times.
CREATE OR REPLACE VIEW pay.dead_invoice_fulfillments AS
    SELECT f.stripe_invoice_id, f.subscription_id, f.subscription_ref, f.attempts, f.last_error, f.dead_at, f.created_at
    FROM pay.invoice_fulfillments f
    WHERE f.dead_at IS NOT NULL AND f.completed_at IS NULL;

-- Outbox answers and refusals, reconciliation and re-keying know subscriptions.
CREATE OR REPLACE FUNCTION pay.complete_outbox(id bigint, attempt int, http_status int, response jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    IF http_status IS NULL OR http_status < 200 OR http_status > 299 THEN
        RAISE EXCEPTION 'complete_outbox: http_status must be 2xx, got %', http_status
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use pay.retry_outbox or pay.fail_outbox for other answers.';
    END IF;
    IF response IS NULL OR jsonb_typeof(response) <> 'object' THEN
        RAISE EXCEPTION 'complete_outbox: response must be the JSON object Stripe answered'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pay._bounded_json_text(response, 'response', 1048576);
    v_command := pay._finish_outbox_if_current_attempt(id, attempt, 'done', http_status, NULL, response, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    IF v_command.subscription_id IS NOT NULL THEN
        -- A subscription's command: the answer (its Checkout Session, or the subscription) goes
        -- through the subscription rule (sql/13_subscription_evidence.sql).
        PERFORM pay._apply_billing_object(
            v_command.subscription_id, response, NULL, 'api answer to ' || v_command.kind,
            'outbox:' || v_command.id || '#' || v_command.attempts,
            floor(extract(epoch FROM now()))::bigint);
        RETURN true;
    END IF;
    CASE v_command.kind
        WHEN 'create_payment_intent', 'cancel_payment_intent' THEN
            PERFORM pay._apply_payment_intent(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint);
        WHEN 'create_checkout_session', 'expire_checkout_session' THEN
            PERFORM pay._apply_checkout_session(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint, NULL);
        WHEN 'refund' THEN
            PERFORM pay._apply_refund_answer(v_command.payment_id, response,
                'outbox:' || v_command.id || '#' || v_command.attempts);
        ELSE
            -- The domain pay.outbox_kind makes this unreachable; say so loudly if the two ever disagree.
            RAISE EXCEPTION 'complete_outbox: no handler for command kind %', v_command.kind
                USING ERRCODE = 'internal_error';
    END CASE;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION pay.fail_outbox(id bigint, attempt int, http_status int, error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
    v_payment pay.payments;
    v_message text := coalesce(error #>> '{error,message}', error ->> 'message', error::text, 'permanent failure');
BEGIN
    v_command := pay._finish_outbox_if_current_attempt(
        id, attempt, 'dead', http_status, left(v_message, 2000), error, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    IF v_command.subscription_id IS NOT NULL THEN
        PERFORM pay._fail_subscription_command(v_command, http_status, v_message, error);
        RETURN true;
    END IF;
    SELECT * INTO v_payment FROM pay.payments p WHERE p.id = v_command.payment_id FOR NO KEY UPDATE;
    UPDATE pay.payments p SET last_error = error, updated_at = now() WHERE p.id = v_payment.id;
    IF v_command.kind IN ('create_payment_intent', 'create_checkout_session') THEN
        -- Stripe refused the create: there will never be a PaymentIntent (or Checkout Session)
        -- for this attempt.
        IF v_payment.status = 'creating' THEN
            UPDATE pay.payments p SET status = 'create_failed', updated_at = now() WHERE p.id = v_payment.id;
            PERFORM pay._audit(v_payment.id, v_payment.status, 'create_failed',
                'Stripe refused the create (HTTP ' || coalesce(http_status::text, '?') || '): ' || left(v_message, 500),
                'outbox:' || v_command.id || '#' || v_command.attempts);
        END IF;
        PERFORM pay._skip_waiting_commands(v_payment.id, CASE v_command.kind
            WHEN 'create_payment_intent' THEN 'the PaymentIntent was never created'
            ELSE 'the Checkout Session was never created' END);
    ELSE
        PERFORM pay._audit(v_payment.id, v_payment.status, v_payment.status,
            v_command.kind || ' refused by Stripe (HTTP ' || coalesce(http_status::text, '?') || '): ' || left(v_message, 500),
            'outbox:' || v_command.id || '#' || v_command.attempts);
    END IF;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' IN ('subscription', 'invoice')
       OR (p_object ->> 'object' = 'checkout.session' AND p_object ->> 'mode' = 'subscription') THEN
        SELECT r.outcome, r.payment_id, r.detail INTO outcome, payment_id, detail
        FROM pay._reconcile_billing_object(p_object, p_source, p_run_id) r;
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'checkout.session' AND v_id IS NOT NULL AND v_status IS NOT NULL THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        detail := v_status || '/' || coalesce(p_object ->> 'payment_status', '');
        SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
        -- An open session the payment already knows, still open: nothing to write.
        IF v.stripe_checkout_session_id = v_id AND v_status = 'open' AND v.status = 'requires_payment_method' THEN
            outcome := 'unchanged';
            RETURN;
        END IF;
        v := pay._lock_payment(v.id);
        v_before := v.status;
        IF v.stripe_checkout_session_id IS NULL THEN
            -- A crash between Stripe's create and our commit: adopt the session, and close the
            -- create command so it is never sent again.
            v_adopted := true;
            UPDATE pay.outbox o
            SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
                last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
                attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
            WHERE o.payment_id = v.id AND o.kind = 'create_checkout_session' AND o.status IN ('pending', 'in_flight');
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
                'Checkout Session created at Stripe but never recorded; adopted');
        END IF;
        v_result := pay._apply_checkout_session(v.id, p_object, p_source, p_source || ':' || v_id,
                                                floor(extract(epoch FROM now()))::bigint, NULL);
        SELECT * INTO v FROM pay.payments p WHERE p.id = v.id;
        IF v_result IN ('applied', 'flagged') AND v.status <> v_before AND NOT v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v.status::text,
                'missed by webhooks; fixed from the API');
        END IF;
        outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent, Checkout Session, Refund, Subscription or Invoice object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    payment_id := pay._payment_for(v_id, v_claimed);
    IF payment_id IS NULL THEN
        IF pay._claimed_payment_id(v_claimed) IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
            'the PaymentIntent names a pgpay payment this database does not have');
        outcome := 'not_ours';
        detail := 'names an unknown payment';
        RETURN;
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL AND v.mode = 'payment_intent' THEN
        -- (In session mode the PaymentIntent is the session's, made by Stripe: not an orphan.)
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;

CREATE OR REPLACE FUNCTION pay.rekey_create_command(id bigint, attempt int, reason text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
    v_payment pay.payments;
    v_subscription pay.subscriptions;
    v_key text;
BEGIN
    SELECT * INTO v_command FROM pay.outbox o
    WHERE o.id = rekey_create_command.id AND o.attempts = attempt AND o.status = 'in_flight'
      AND o.kind IN ('create_payment_intent', 'create_checkout_session', 'create_subscription_session')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_command.kind = 'create_subscription_session' THEN
        SELECT * INTO v_subscription FROM pay.subscriptions s WHERE s.id = v_command.subscription_id FOR NO KEY UPDATE;
        IF v_subscription.stripe_checkout_session_id IS NOT NULL THEN
            RETURN NULL;  -- adopted meanwhile
        END IF;
        v_key := pay.idempotency_key('pgpay.sub_create.rekeyed',
            jsonb_build_object('previous', v_command.idempotency_key, 'attempt', attempt));
        UPDATE pay.outbox o SET idempotency_key = v_key, updated_at = now() WHERE o.id = v_command.id;
        PERFORM pay._audit_subscription(v_subscription.id, v_subscription.status, v_subscription.status,
            'create re-keyed past Stripe''s key retention: ' || left(coalesce(reason, 'no reason given'), 500),
            'outbox:' || v_command.id || '#' || attempt);
        RETURN v_key;
    END IF;
    v_payment := pay._lock_payment(v_command.payment_id);
    IF (v_command.kind = 'create_payment_intent' AND v_payment.stripe_payment_intent_id IS NOT NULL)
       OR (v_command.kind = 'create_checkout_session' AND v_payment.stripe_checkout_session_id IS NOT NULL) THEN
        RETURN NULL;  -- it was adopted meanwhile: nothing to re-key
    END IF;
    v_key := pay.idempotency_key(CASE v_command.kind WHEN 'create_checkout_session' THEN 'pgpay.cs_create.rekeyed'
                                                     ELSE 'pgpay.pi_create.rekeyed' END,
        jsonb_build_object('previous', v_command.idempotency_key, 'attempt', attempt));
    UPDATE pay.outbox o SET idempotency_key = v_key, updated_at = now() WHERE o.id = v_command.id;
    PERFORM pay._audit(v_payment.id, v_payment.status, v_payment.status,
        'create re-keyed past Stripe''s key retention: ' || left(coalesce(reason, 'no reason given'), 500),
        'outbox:' || v_command.id || '#' || attempt);
    RETURN v_key;
END;
$$;

SELECT pg_catalog.pg_extension_config_dump('pay.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('pay.invoices', '');
SELECT pg_catalog.pg_extension_config_dump('pay.invoice_fulfillments', '');

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pay FROM PUBLIC;
-- entitlements and provisions paid invoices; the worker's answers go through complete_outbox.
GRANT EXECUTE ON FUNCTION pay.begin_subscription(text, text, int, text, jsonb, text, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.wait_for_subscription_checkout(text, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.change_subscription(text, text, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.cancel_subscription(text, boolean) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.subscription_timeline(text) TO pay_app, pay_auditor;
-- pay.entitlements calls it, and a view's functions run as the reader.
GRANT EXECUTE ON FUNCTION pay._past_due_grace() TO pay_app, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.claim_invoice_fulfillments(text, int, interval) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.complete_invoice_fulfillment(text, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.fail_invoice_fulfillment(text, text, interval, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.retry_invoice_fulfillment(text) TO pay_app;
GRANT SELECT ON pay.subscriptions, pay.invoices, pay.invoice_fulfillments, pay.entitlements,
                pay.dead_invoice_fulfillments TO pay_app, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.record_missing_subscriptions_at_stripe(bigint, text[]) TO pay_worker;

-- ==== merge of session 4 branches: final definitions of functions that several branches rewrote ====
-- pay._apply_stripe_object: finish-a (unknown run P0002, failed delayed debit no mismatch) and
-- subs-core (billing objects) both changed it; this is sql/10_reconciliation.sql's merged text.
CREATE OR REPLACE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_id text := p_object ->> 'id';
    v_claimed text := p_object #>> '{metadata,pgpay_payment_id}';
    v_status text := p_object ->> 'status';
    v_amount bigint;
    v_currency text := lower(p_object ->> 'currency');
    v_adopted boolean := false;
    v_before pay.payment_status;
    v_result text;
BEGIN
    PERFORM pay._require_run(p_run_id, 'apply_stripe_object');
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' IN ('subscription', 'invoice')
       OR (p_object ->> 'object' = 'checkout.session' AND p_object ->> 'mode' = 'subscription') THEN
        SELECT r.outcome, r.payment_id, r.detail INTO outcome, payment_id, detail
        FROM pay._reconcile_billing_object(p_object, p_source, p_run_id) r;
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'checkout.session' AND v_id IS NOT NULL AND v_status IS NOT NULL THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        detail := v_status || '/' || coalesce(p_object ->> 'payment_status', '');
        SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
        -- An open session the payment already knows, still open: nothing to write.
        IF v.stripe_checkout_session_id = v_id AND v_status = 'open' AND v.status = 'requires_payment_method' THEN
            outcome := 'unchanged';
            RETURN;
        END IF;
        v := pay._lock_payment(v.id);
        v_before := v.status;
        IF v.stripe_checkout_session_id IS NULL THEN
            -- A crash between Stripe's create and our commit: adopt the session, and close the
            -- create command so it is never sent again.
            v_adopted := true;
            UPDATE pay.outbox o
            SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
                last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
                attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
            WHERE o.payment_id = v.id AND o.kind = 'create_checkout_session' AND o.status IN ('pending', 'in_flight');
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
                'Checkout Session created at Stripe but never recorded; adopted');
        END IF;
        v_result := pay._apply_checkout_session(v.id, p_object, p_source, p_source || ':' || v_id,
                                                floor(extract(epoch FROM now()))::bigint, NULL);
        SELECT * INTO v FROM pay.payments p WHERE p.id = v.id;
        IF v_result IN ('applied', 'flagged') AND v.status <> v_before AND NOT v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v.status::text,
                'missed by webhooks; fixed from the API');
        END IF;
        outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent, Checkout Session, Refund, Subscription or Invoice object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_amount := CASE WHEN p_object ->> 'amount' ~ '^[0-9]{1,18}$' THEN (p_object ->> 'amount')::bigint END;

    -- Read first without a lock: an unchanged payment (the common case) writes nothing.
    payment_id := pay._payment_for(v_id, v_claimed);
    IF payment_id IS NULL THEN
        IF pay._claimed_payment_id(v_claimed) IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
            'the PaymentIntent names a pgpay payment this database does not have');
        outcome := 'not_ours';
        detail := 'names an unknown payment';
        RETURN;
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
    IF v.stripe_payment_intent_id = v_id AND v.status::text = v_status AND v.amount = v_amount
       AND v.currency = v_currency AND v.client_secret IS NOT NULL THEN
        outcome := 'unchanged';
        RETURN;
    END IF;

    v := pay._lock_payment(v.id);
    v_before := v.status;
    IF v.stripe_payment_intent_id IS NOT NULL AND v.stripe_payment_intent_id <> v_id THEN
        PERFORM pay._record_finding(p_run_id, 'second_payment_intent', v.id, v_id, v.stripe_payment_intent_id, v_id,
            'a second PaymentIntent carries this payment''s id');
    ELSIF v.stripe_payment_intent_id IS NULL AND v.mode = 'payment_intent' THEN
        -- (In session mode the PaymentIntent is the session's, made by Stripe: not an orphan.)
        -- A crash between Stripe's create and our commit: adopt it, and close the create command so
        -- it is never sent again (past Stripe's key retention it would create a second one).
        v_adopted := true;
        UPDATE pay.outbox o
        SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
            last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
            attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
        WHERE o.payment_id = v.id AND o.kind = 'create_payment_intent' AND o.status IN ('pending', 'in_flight');
        PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
            'PaymentIntent created at Stripe but never recorded; adopted');
    END IF;
    IF v_amount IS DISTINCT FROM v.amount THEN
        PERFORM pay._record_finding(p_run_id, 'amount_drift', v.id, v_id, v.amount::text, v_amount::text, NULL);
    END IF;
    IF v_currency IS DISTINCT FROM v.currency THEN
        PERFORM pay._record_finding(p_run_id, 'currency_drift', v.id, v_id, v.currency, v_currency, NULL);
    END IF;
    v_result := pay._apply_payment_intent(v.id, p_object, p_source, p_source || ':' || v_id,
                                          floor(extract(epoch FROM now()))::bigint);
    IF v_result IN ('applied', 'flagged') AND v_status IS DISTINCT FROM v_before::text AND NOT v_adopted THEN
        PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v_status,
            'missed by webhooks; fixed from the API');
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text
          -- A session's delayed payment that failed ends the attempt (its Checkout Session speaks
          -- for it) and leaves the PaymentIntent at requires_payment_method, which nobody can pay
          -- any more: Stripe does not contradict the cancel.
          AND NOT (v.mode = 'session' AND v_before = 'canceled' AND v_status = 'requires_payment_method') THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;


-- pay.status_report counts dead fulfillments (payments' and invoices') and flagged subscriptions;
-- it now lives in sql/11_safety.sql, after every table it reads.
-- What `pgpay-worker status` prints, and whether a human is needed. Defined last, after every
-- table and view it counts (payments' and subscriptions' alike).
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
        'dead_fulfillments', (SELECT count(*) FROM pay.dead_fulfillments),
        'dead_invoice_fulfillments', (SELECT count(*) FROM pay.dead_invoice_fulfillments),
        'flagged_subscriptions', (SELECT count(*) FROM pay.subscriptions s WHERE s.flagged_reason IS NOT NULL),
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
