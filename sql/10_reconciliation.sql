-- Reconciliation: the database converges to Stripe's ledger, and every difference is explained
-- (invariant 8). The worker pages through Stripe's API and hands each object here; the same
-- transition rule as webhooks decides.

CREATE TABLE pay.reconciliation_runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    worker           text NOT NULL,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at      timestamptz,
    lease_expires    timestamptz NOT NULL,
    pages            int NOT NULL DEFAULT 0,
    objects          int NOT NULL DEFAULT 0,
    applied          int NOT NULL DEFAULT 0,
    adopted          int NOT NULL DEFAULT 0,
    not_ours         int NOT NULL DEFAULT 0,
    events_replayed  int NOT NULL DEFAULT 0,
    findings         int NOT NULL DEFAULT 0,
    error            text,
    CONSTRAINT reconciliation_runs_window CHECK (window_start < window_end)
);
-- One run at a time across every worker replica: a second open run cannot be inserted.
CREATE UNIQUE INDEX reconciliation_runs_one_open ON pay.reconciliation_runs ((true)) WHERE finished_at IS NULL;

CREATE TABLE pay.findings (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            bigint REFERENCES pay.reconciliation_runs (id),
    kind              text NOT NULL,
    payment_id        uuid REFERENCES pay.payments (id),
    stripe_object_id  text,
    expected          text,
    actual            text,
    detail            text,
    found_at          timestamptz NOT NULL DEFAULT now(),
    resolved_at       timestamptz,
    resolved_by       text,
    resolution_note   text,
    CONSTRAINT findings_resolution_complete CHECK (
        (resolved_at IS NULL) = (resolved_by IS NULL) AND (resolved_at IS NULL) = (resolution_note IS NULL)),
    CONSTRAINT findings_kind_known CHECK (kind IN (
        'amount_drift', 'currency_drift', 'status_drift_fixed', 'status_mismatch', 'orphan_adopted',
        'missing_at_stripe', 'not_ours', 'second_payment_intent', 'unknown_payment',
        'invoice_fulfillment_repaired', 'unknown_subscription'))
);
-- The same difference is recorded once: a re-run on an unchanged ledger finds nothing new.
CREATE UNIQUE INDEX findings_once ON pay.findings (
    kind, coalesce(payment_id, '00000000-0000-0000-0000-000000000000'), coalesce(stripe_object_id, ''),
    coalesce(expected, ''), coalesce(actual, ''));

CREATE VIEW pay.reconciliation_findings AS
    SELECT f.id, f.kind, f.payment_id, p.order_ref, f.stripe_object_id, f.expected, f.actual, f.detail,
           f.run_id, f.found_at, f.resolved_at, f.resolved_at IS NULL AS open,
           f.resolved_by, f.resolution_note
    FROM pay.findings f
    LEFT JOIN pay.payments p ON p.id = f.payment_id;

-- Closes a finding once a human has dealt with it (a drift repaired, a refund issued by hand):
-- who, when and why are kept on the finding, and, when it names a payment, in that payment's
-- audit trail. `pgpay-worker status` counts open findings only.
CREATE FUNCTION pay.resolve_finding(finding_id bigint, note text) RETURNS pay.reconciliation_findings
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

-- Raises no_data_found (P0002) unless run p_run_id exists (NULL: no run, nothing to check), so
-- that a caller naming an unknown run hears so instead of meeting the findings' foreign key.
CREATE FUNCTION pay._require_run(p_run_id bigint, p_caller text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_run_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pay.reconciliation_runs r WHERE r.id = p_run_id) THEN
        RAISE EXCEPTION '%: no reconciliation run %', p_caller, p_run_id
            USING ERRCODE = 'no_data_found', HINT = 'Pass the id pay.start_reconciliation returned, or NULL.';
    END IF;
END;
$$;

-- Records a finding once; returns whether it was new.
CREATE FUNCTION pay._record_finding(p_run_id bigint, p_kind text, p_payment_id uuid, p_stripe_id text,
    p_expected text, p_actual text, p_detail text) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.findings (run_id, kind, payment_id, stripe_object_id, expected, actual, detail)
    VALUES (p_run_id, p_kind, p_payment_id, p_stripe_id, p_expected, p_actual, p_detail)
    ON CONFLICT DO NOTHING;
    IF FOUND AND p_run_id IS NOT NULL THEN
        UPDATE pay.reconciliation_runs r SET findings = r.findings + 1 WHERE r.id = p_run_id;
    END IF;
    RETURN FOUND;
END;
$$;

CREATE FUNCTION pay.record_reconciliation_finding(run_id bigint, kind text, payment_id uuid, stripe_object_id text,
    expected text, actual text, detail text DEFAULT NULL) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT pay._require_run(run_id, 'record_reconciliation_finding');
    SELECT pay._record_finding(run_id, kind, payment_id, stripe_object_id, expected, actual, detail);
$$;

-- Starts a run, or returns NULL when another live run holds the lease. A run whose worker died is
-- closed with an error once its lease has expired.
CREATE FUNCTION pay.start_reconciliation(worker text, window_start timestamptz, window_end timestamptz DEFAULT now(),
    lease interval DEFAULT '10 minutes') RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF window_start IS NULL OR window_end IS NULL OR window_start >= window_end THEN
        RAISE EXCEPTION 'start_reconciliation: window_start must be before window_end' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pay.reconciliation_runs r
    SET finished_at = clock_timestamp(), error = coalesce(r.error, 'abandoned: the lease of ' || r.worker || ' expired')
    WHERE r.finished_at IS NULL AND r.lease_expires < clock_timestamp();
    INSERT INTO pay.reconciliation_runs (worker, window_start, window_end, lease_expires)
    VALUES (worker, window_start, window_end, clock_timestamp() + lease)
    ON CONFLICT DO NOTHING
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

-- Progress and lease renewal in one call, once per page. Returns false when the run is no longer
-- this worker's (its lease expired and it was closed): the worker must stop.
CREATE FUNCTION pay.progress_reconciliation(run_id bigint, pages int, objects int, applied int, adopted int,
    not_ours int, events_replayed int, lease interval DEFAULT '10 minutes') RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    UPDATE pay.reconciliation_runs r
    SET pages = progress_reconciliation.pages, objects = progress_reconciliation.objects,
        applied = progress_reconciliation.applied, adopted = progress_reconciliation.adopted,
        not_ours = progress_reconciliation.not_ours, events_replayed = progress_reconciliation.events_replayed,
        lease_expires = clock_timestamp() + lease
    WHERE r.id = run_id AND r.finished_at IS NULL;
    RETURN FOUND;
END;
$$;

CREATE FUNCTION pay.finish_reconciliation(run_id bigint, error text DEFAULT NULL) RETURNS pay.reconciliation_runs
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v pay.reconciliation_runs;
BEGIN
    UPDATE pay.reconciliation_runs r SET finished_at = clock_timestamp(), error = finish_reconciliation.error
    WHERE r.id = run_id AND r.finished_at IS NULL
    RETURNING * INTO v;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'finish_reconciliation: run % is not open', run_id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN v;
END;
$$;

-- Applies one object read from Stripe's API (a PaymentIntent, a Checkout Session or a Refund).
-- Outcomes: applied, unchanged, ignored, flagged, adopted (a PaymentIntent or Checkout Session
-- carrying our metadata that the payment did not know: its create answer was lost), not_ours.
-- Drift is recorded as findings of run p_run_id.
CREATE FUNCTION pay._apply_stripe_object(p_object jsonb, p_source text, p_run_id bigint,
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
    PERFORM pay._require_run(p_run_id, 'apply_stripe_object');
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' IN ('subscription', 'invoice')
       OR (p_object ->> 'object' = 'checkout.session' AND p_object ->> 'mode' = 'subscription') THEN
        SELECT r.outcome, r.payment_id, r.detail INTO outcome, payment_id, detail
        FROM pay._reconcile_billing_object(p_object, p_source, p_run_id) r;
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            RETURN;
        END IF;
        outcome := pay._apply_refund_answer(payment_id, p_object, p_source);
        RETURN;
    END IF;
    IF p_object ->> 'object' = 'checkout.session' AND v_id IS NOT NULL AND v_status IS NOT NULL THEN
        payment_id := pay._payment_for(p_object ->> 'payment_intent', v_claimed);
        IF payment_id IS NULL THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        detail := v_status || '/' || coalesce(p_object ->> 'payment_status', '');
        SELECT * INTO v FROM pay.payments p WHERE p.id = payment_id;
        -- An open session the payment already knows, still open: nothing to write.
        IF v.stripe_checkout_session_id = v_id AND v_status = 'open' AND v.status = 'requires_payment_method' THEN
            outcome := 'unchanged';
            RETURN;
        END IF;
        v := pay._lock_payment(v.id);
        v_before := v.status;
        IF v.stripe_checkout_session_id IS NULL THEN
            -- A crash between Stripe's create and our commit: adopt the session, and close the
            -- create command so it is never sent again.
            v_adopted := true;
            UPDATE pay.outbox o
            SET status = 'done', response = p_object, last_http_status = 200, lease_owner = NULL, lease_expires = NULL,
                last_error = 'adopted by ' || p_source, completed_at = now(), updated_at = now(),
                attempts = greatest(o.attempts, 1), first_attempt_at = coalesce(o.first_attempt_at, now())
            WHERE o.payment_id = v.id AND o.kind = 'create_checkout_session' AND o.status IN ('pending', 'in_flight');
            PERFORM pay._record_finding(p_run_id, 'orphan_adopted', v.id, v_id, NULL, v_id,
                'Checkout Session created at Stripe but never recorded; adopted');
        END IF;
        v_result := pay._apply_checkout_session(v.id, p_object, p_source, p_source || ':' || v_id,
                                                floor(extract(epoch FROM now()))::bigint, NULL);
        SELECT * INTO v FROM pay.payments p WHERE p.id = v.id;
        IF v_result IN ('applied', 'flagged') AND v.status <> v_before AND NOT v_adopted THEN
            PERFORM pay._record_finding(p_run_id, 'status_drift_fixed', v.id, v_id, v_before::text, v.status::text,
                'missed by webhooks; fixed from the API');
        END IF;
        outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
        RETURN;
    END IF;
    IF p_object ->> 'object' IS DISTINCT FROM 'payment_intent' OR v_id IS NULL OR v_status IS NULL THEN
        RAISE EXCEPTION 'apply_stripe_object: expected a PaymentIntent, Checkout Session, Refund, Subscription or Invoice object'
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
    ELSIF v.stripe_payment_intent_id IS NULL AND v.mode = 'payment_intent' THEN
        -- (In session mode the PaymentIntent is the session's, made by Stripe: not an orphan.)
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
    ELSIF v_result = 'ignored' AND v_before <> 'superseded' AND v_status IS DISTINCT FROM v_before::text
          -- A session's delayed payment that failed ends the attempt (its Checkout Session speaks
          -- for it) and leaves the PaymentIntent at requires_payment_method, which nobody can pay
          -- any more: Stripe does not contradict the cancel.
          AND NOT (v.mode = 'session' AND v_before = 'canceled' AND v_status = 'requires_payment_method') THEN
        -- A terminal status here that Stripe contradicts: only a human can say which is right.
        PERFORM pay._record_finding(p_run_id, 'status_mismatch', v.id, v_id, v_before::text, v_status,
            'the payment is terminal here but Stripe reports another status');
    END IF;
    outcome := CASE WHEN v_adopted THEN 'adopted' ELSE v_result END;
    detail := v_status;
END;
$$;

CREATE FUNCTION pay.apply_stripe_object(object jsonb, source text DEFAULT 'reconcile', run_id bigint DEFAULT NULL)
RETURNS TABLE (outcome text, payment_id uuid, detail text)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT a.outcome, a.payment_id, a.detail FROM pay._apply_stripe_object(object, source, run_id) a;
$$;

-- One round trip per page: the objects of a list answer, in order.
CREATE FUNCTION pay.apply_stripe_objects(objects jsonb, source text DEFAULT 'reconcile', run_id bigint DEFAULT NULL)
RETURNS TABLE (stripe_object_id text, outcome text, payment_id uuid, detail text)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT o.value ->> 'id', a.outcome, a.payment_id, a.detail
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(objects) = 'array' THEN objects ELSE '[]' END)
         WITH ORDINALITY o(value, n)
    CROSS JOIN LATERAL pay._apply_stripe_object(o.value, source, run_id) a
    ORDER BY o.n;
$$;

-- Events read from Stripe's API (GET /v1/events), not a signed delivery: trusted because only the
-- worker, holding the API key, can call this. Same dedup and transition path as webhooks.
CREATE FUNCTION pay.apply_stripe_event(event jsonb)
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
    SELECT * INTO v FROM pay._store_and_apply_event(pay._bounded_json_text(event, 'event', 1048576), 'api');
    RETURN QUERY SELECT CASE WHEN v.outcome IS NULL THEN 'duplicate'
                             WHEN v.outcome IN ('stored', 'quarantined', 'deferred') THEN v.outcome ELSE 'applied' END,
                        event ->> 'id', v.detail;
END;
$$;

-- Payments whose PaymentIntent reconciliation did not see in a complete listing of its window.
CREATE FUNCTION pay.record_missing_at_stripe(run_id bigint, seen_intents text[]) RETURNS int
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
        RAISE EXCEPTION 'record_missing_at_stripe: no run %', run_id USING ERRCODE = 'no_data_found';
    END IF;
    FOR v IN
        SELECT p.id, p.stripe_payment_intent_id FROM pay.payments p
        WHERE p.stripe_payment_intent_id IS NOT NULL
          AND p.created_at >= v_run.window_start AND p.created_at < v_run.window_end - interval '1 minute'
          AND NOT (p.stripe_payment_intent_id = ANY (seen_intents))
    LOOP
        IF pay._record_finding(run_id, 'missing_at_stripe', v.id, v.stripe_payment_intent_id, 'listed by Stripe', 'absent',
                               'the payment''s PaymentIntent was not in Stripe''s list for the window') THEN
            v_count := v_count + 1;
        END IF;
    END LOOP;
    RETURN v_count;
END;
$$;

-- Past Stripe's idempotency key retention a create is never blindly re-sent with its old key (a
-- forgotten key creates a second PaymentIntent or Checkout Session): after the worker found none
-- with this payment's id, the command gets a new derived key, and the audit log says why. Fenced
-- by attempt.
CREATE FUNCTION pay.rekey_create_command(id bigint, attempt int, reason text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
    v_payment pay.payments;
    v_subscription pay.subscriptions;
    v_key text;
BEGIN
    SELECT * INTO v_command FROM pay.outbox o
    WHERE o.id = rekey_create_command.id AND o.attempts = attempt AND o.status = 'in_flight'
      AND o.kind IN ('create_payment_intent', 'create_checkout_session', 'create_subscription_session')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_command.kind = 'create_subscription_session' THEN
        SELECT * INTO v_subscription FROM pay.subscriptions s WHERE s.id = v_command.subscription_id FOR NO KEY UPDATE;
        IF v_subscription.stripe_checkout_session_id IS NOT NULL THEN
            RETURN NULL;  -- adopted meanwhile
        END IF;
        v_key := pay.idempotency_key('pgpay.sub_create.rekeyed',
            jsonb_build_object('previous', v_command.idempotency_key, 'attempt', attempt));
        UPDATE pay.outbox o SET idempotency_key = v_key, updated_at = now() WHERE o.id = v_command.id;
        PERFORM pay._audit_subscription(v_subscription.id, v_subscription.status, v_subscription.status,
            'create re-keyed past Stripe''s key retention: ' || left(coalesce(reason, 'no reason given'), 500),
            'outbox:' || v_command.id || '#' || attempt);
        RETURN v_key;
    END IF;
    v_payment := pay._lock_payment(v_command.payment_id);
    IF (v_command.kind = 'create_payment_intent' AND v_payment.stripe_payment_intent_id IS NOT NULL)
       OR (v_command.kind = 'create_checkout_session' AND v_payment.stripe_checkout_session_id IS NOT NULL) THEN
        RETURN NULL;  -- it was adopted meanwhile: nothing to re-key
    END IF;
    v_key := pay.idempotency_key(CASE v_command.kind WHEN 'create_checkout_session' THEN 'pgpay.cs_create.rekeyed'
                                                     ELSE 'pgpay.pi_create.rekeyed' END,
        jsonb_build_object('previous', v_command.idempotency_key, 'attempt', attempt));
    UPDATE pay.outbox o SET idempotency_key = v_key, updated_at = now() WHERE o.id = v_command.id;
    PERFORM pay._audit(v_payment.id, v_payment.status, v_payment.status,
        'create re-keyed past Stripe''s key retention: ' || left(coalesce(reason, 'no reason given'), 500),
        'outbox:' || v_command.id || '#' || attempt);
    RETURN v_key;
END;
$$;
