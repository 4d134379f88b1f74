-- Checkout: what an application calls in its own transaction.

-- SECURITY DEFINER: the roles it is granted to may not call the internal helper themselves.
CREATE FUNCTION pay.idempotency_key(scope text, parts jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    -- jsonb's text form keeps every digit of a number; pgpay-core canonicalises it (RFC 8785 style).
    RETURN pay._idempotency_key_of_text(scope, pay._bounded_json_text(parts, 'parts', 65536));
END;
$$;

-- Withdraws a payment's request for a PaymentIntent. A create that was never sent is skipped:
-- nothing exists at Stripe. Otherwise a cancel is queued (it waits for the PaymentIntent id if the
-- create is still on its way). Returns true when nothing was ever sent.
CREATE FUNCTION pay._withdraw_payment_intent(p_payment_id uuid, p_why text, p_cancellation_reason text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_create pay.outbox;
BEGIN
    SELECT * INTO v_create FROM pay.outbox o
    WHERE o.payment_id = p_payment_id AND o.kind = 'create_payment_intent' FOR UPDATE;
    IF v_create.status = 'pending' AND v_create.attempts = 0 THEN
        UPDATE pay.outbox o SET status = 'skipped', last_error = p_why, completed_at = now(), updated_at = now()
        WHERE o.id = v_create.id;
        RETURN true;
    END IF;
    IF v_create.status IS DISTINCT FROM 'dead' THEN
        PERFORM pay._enqueue(p_payment_id, 'cancel_payment_intent',
            pay.idempotency_key('pgpay.pi_cancel', jsonb_build_object('payment_id', p_payment_id)),
            'POST', '/v1/payment_intents/{payment_intent}/cancel',
            jsonb_build_object('cancellation_reason', p_cancellation_reason));
    END IF;
    RETURN false;
END;
$$;

CREATE FUNCTION pay.begin_checkout(
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

CREATE FUNCTION pay.cancel_checkout(payment_id uuid) RETURNS pay.payments
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
    IF pay._withdraw_payment_intent(v.id, 'checkout canceled before it was sent', 'requested_by_customer') THEN
        UPDATE pay.payments p SET status = 'canceled', updated_at = now() WHERE p.id = v.id RETURNING * INTO v;
        PERFORM pay._audit(v.id, 'creating', 'canceled', 'checkout canceled before the PaymentIntent was requested');
    END IF;
    -- Otherwise Stripe decides: the status changes when the cancel's answer (or its webhook) arrives.
    RETURN v;
END;
$$;

-- Waits (polling, since LISTEN cannot be used inside a function) until the worker has stored the
-- PaymentIntent, so the caller can hand the client_secret to the browser.
CREATE FUNCTION pay.wait_for_intent(payment_id uuid, timeout_ms int DEFAULT 10000) RETURNS pay.payments
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.payments;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_ms / 1000.0);
    v_pause float8 := 0.005;
BEGIN
    IF timeout_ms IS NULL OR timeout_ms < 0 OR timeout_ms > 600000 THEN
        RAISE EXCEPTION 'wait_for_intent: timeout_ms must be between 0 and 600000, got %', timeout_ms
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        SELECT * INTO v FROM pay.payments p WHERE p.id = wait_for_intent.payment_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'wait_for_intent: no payment %', payment_id USING ERRCODE = 'no_data_found';
        END IF;
        IF v.client_secret IS NOT NULL THEN
            RETURN v;
        END IF;
        IF v.status IN ('create_failed', 'superseded', 'canceled') THEN
            RAISE EXCEPTION 'wait_for_intent: payment % is % and will get no PaymentIntent', payment_id, v.status
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = coalesce(v.last_error #>> '{error,message}', v.last_error::text, '');
        END IF;
        IF EXISTS (SELECT 1 FROM pay.payments p
                   WHERE p.id = v.id AND p.xmin::text::bigint = txid_current_if_assigned() % 4294967296) THEN
            RAISE EXCEPTION 'wait_for_intent: payment % was created in this same transaction', payment_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Commit the transaction that called pay.begin_checkout first: the worker cannot see it before.';
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'wait_for_intent: no PaymentIntent for payment % after % ms', payment_id, timeout_ms
                USING ERRCODE = 'query_canceled',
                      HINT = 'Is pgpay-worker running? See pay.outbox_health.';
        END IF;
        PERFORM pg_sleep(least(v_pause, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0)));
        v_pause := least(v_pause * 2, 0.05);
    END LOOP;
END;
$$;
