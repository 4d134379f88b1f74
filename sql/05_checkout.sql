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

-- Withdraws an attempt's request to Stripe. A create that was never sent is skipped: nothing
-- exists at Stripe. Otherwise the PaymentIntent is canceled, or the Checkout Session expired,
-- through the outbox (the command waits for the id if the create is still on its way). Returns
-- true when nothing was ever sent.
CREATE FUNCTION pay._withdraw_attempt(p_payment_id uuid, p_why text, p_cancellation_reason text)
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

CREATE FUNCTION pay.begin_checkout(
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
CREATE FUNCTION pay._wait_until_ready(p_payment_id uuid, p_timeout_ms int, p_caller text) RETURNS pay.payments
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
CREATE FUNCTION pay.wait_for_intent(payment_id uuid, timeout_ms int DEFAULT 10000) RETURNS pay.payments
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$ SELECT * FROM pay._wait_until_ready(payment_id, timeout_ms, 'wait_for_intent') $$;

-- Returns once the app can send the customer on: client_secret in payment_intent mode,
-- checkout_url in session mode.
CREATE FUNCTION pay.wait_for_checkout(payment_id uuid, timeout_ms int DEFAULT 10000) RETURNS pay.payments
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$ SELECT * FROM pay._wait_until_ready(payment_id, timeout_ms, 'wait_for_checkout') $$;
