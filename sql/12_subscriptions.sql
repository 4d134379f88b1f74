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
