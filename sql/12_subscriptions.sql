-- Subscriptions and invoices (issue 14). A subscription signs up through a subscription-mode
-- Checkout Session; from then on Stripe's subscription, its invoices and the session are mirrored
-- through one rule (pgpay-core's subscription::decide and decide_invoice, asked through
-- pay._subscription_decide and pay._invoice_decide), whichever way the evidence arrives: a
-- webhook (extension/src/webhook.rs), an outbox answer (pay.complete_outbox) or reconciliation
-- (pay._apply_stripe_object). A paid invoice gets exactly one row in pay.invoice_fulfillments,
-- written in the transaction that records the payment.
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
