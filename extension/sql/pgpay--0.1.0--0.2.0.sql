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
