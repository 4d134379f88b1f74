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
