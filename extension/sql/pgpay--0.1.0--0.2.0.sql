-- pgpay 0.1.0 → 0.2.0. Run by `ALTER EXTENSION pgpay UPDATE TO '0.2.0'`, never by hand.
-- Every statement is re-runnable; no table that holds data is dropped. Released scripts are never
-- edited: once 0.2.0 ships, changes go into pgpay--0.2.0--<next>.sql.
\echo Use "ALTER EXTENSION pgpay UPDATE TO '0.2.0'" to load this file. \quit

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
