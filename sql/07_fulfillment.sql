-- Fulfillment and refunds: what the application does once money has moved.

-- Claims successful payments to provision, each held by one consumer at a time (a lease that
-- expires if the consumer dies). Provision and call pay.complete_fulfillment in one transaction
-- to provision exactly once.
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
        WHERE f.completed_at IS NULL AND (f.claimed_by IS NULL OR f.claim_expires < now())
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

-- Marks a fulfillment done. True the first time, false when it was already done.
CREATE FUNCTION pay.complete_fulfillment(payment_id uuid) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    UPDATE pay.fulfillments f
    SET completed_at = now(), claimed_by = NULL, claim_expires = NULL
    WHERE f.payment_id = complete_fulfillment.payment_id AND f.completed_at IS NULL;
    IF FOUND THEN
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pay.fulfillments f WHERE f.payment_id = complete_fulfillment.payment_id) THEN
        RAISE EXCEPTION 'complete_fulfillment: payment % has nothing to fulfil (not succeeded, or flagged)', payment_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN false;
END;
$$;

-- The one builder of a refund command (pay.refund and the duplicate-charge refund of
-- extension/src/apply_intent.rs): POST /v1/refunds for the payment's PaymentIntent, `amount`
-- NULL for all that is left, under the key pay.idempotency_key('pgpay.refund',
-- {payment_id} + key_parts). Returns the outbox command id.
CREATE FUNCTION pay._enqueue_refund(p_payment_id uuid, p_intent_id text, p_amount bigint, p_reason text,
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
CREATE FUNCTION pay.refund(payment_id uuid, amount bigint DEFAULT NULL, reason text DEFAULT NULL)
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
