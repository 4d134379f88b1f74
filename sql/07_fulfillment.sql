-- Fulfillment and refunds: what the application does once money has moved.

-- Claims successful payments to provision, each held by one consumer at a time (a lease that
-- expires if the consumer dies). Provision and call pay.complete_fulfillment in one transaction
-- to provision exactly once. Rows whose last attempt failed wait until next_attempt_at; dead
-- rows (pay.dead_fulfillments) wait for pay.retry_fulfillment.
CREATE FUNCTION pay.claim_fulfillments(consumer text, max_rows int DEFAULT 10, lease interval DEFAULT '5 minutes')
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
CREATE FUNCTION pay._held_fulfillment(p_payment_id uuid, p_consumer text) RETURNS pay.fulfillments
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
CREATE FUNCTION pay.complete_fulfillment(payment_id uuid, consumer text DEFAULT NULL) RETURNS boolean
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
CREATE FUNCTION pay._fulfillment_setting(p_name text, p_default text) RETURNS text
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
CREATE FUNCTION pay.fail_fulfillment(payment_id uuid, error text, retry_in interval DEFAULT NULL, consumer text DEFAULT NULL)
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
CREATE FUNCTION pay.retry_fulfillment(payment_id uuid) RETURNS boolean
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
CREATE VIEW pay.dead_fulfillments AS
    SELECT f.payment_id, f.order_ref, f.attempts, f.last_error, f.dead_at, f.created_at
    FROM pay.fulfillments f
    WHERE f.dead_at IS NOT NULL AND f.completed_at IS NULL;

-- The one builder of a refund command (pay.refund and the duplicate-charge refund of
-- extension/src/apply_intent.rs): POST /v1/refunds for the payment's PaymentIntent, `amount`
-- NULL for all that is left, under the key pay.idempotency_key('pgpay.refund',
-- {payment_id} + key_parts). An application's refund_ref in key_parts is also sent as the
-- refund's metadata[pgpay_refund_ref]. Returns the outbox command id.
CREATE FUNCTION pay._enqueue_refund(p_payment_id uuid, p_intent_id text, p_amount bigint, p_reason text,
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

-- Asks Stripe to refund part or all of a succeeded payment. Returns the outbox command id.
-- Amounts already refunded or being refunded count, so refunds never exceed what was received.
-- refund_ref is the application's own reference for the refund (a return id, say): the same
-- (payment, refund_ref) again returns the same command and queues nothing, so an application may
-- retry its own request; the same ref with another amount or reason raises 22023.
CREATE FUNCTION pay.refund(payment_id uuid, amount bigint DEFAULT NULL, reason text DEFAULT NULL,
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
