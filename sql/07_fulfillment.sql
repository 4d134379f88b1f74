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
