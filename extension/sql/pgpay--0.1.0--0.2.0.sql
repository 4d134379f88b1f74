-- pgpay 0.1.0 → 0.2.0. Run by `ALTER EXTENSION pgpay UPDATE TO '0.2.0'`, never by hand.
-- Every statement is re-runnable; no table that holds data is dropped. Released scripts are never
-- edited: once 0.2.0 ships, changes go into pgpay--0.2.0--<next>.sql.
\echo Use "ALTER EXTENSION pgpay UPDATE TO '0.2.0'" to load this file. \quit


-- ---------------------------------------------------------------------------------------------
-- Issue #9, defects 2, 5 and 11: sizes checked in SQL before Rust parses anything (a failed Rust
-- allocation aborts the backend); pay.idempotency_key works for the roles it is granted to;
-- reconciliation reads a payment id only in the canonical UUID form.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pay._bounded_json_text(p_value jsonb, p_field text, p_max_bytes int) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v_text text;
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF pg_column_size(p_value) > p_max_bytes THEN
        RAISE EXCEPTION '% is larger than % bytes', p_field, p_max_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_path_exists(p_value,
        'strict $.** ? (@.type() == "number" && (@ >= 1e30 || @ <= -1e30 || (@ != 0 && @ < 1e-30 && @ > -1e-30)))') THEN
        RAISE EXCEPTION '% holds a number beyond 1e30 in magnitude or nonzero below 1e-30', p_field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A stored (compressed) value can be far larger once expanded: check the text too.
    v_text := p_value::text;
    IF octet_length(v_text) > p_max_bytes THEN
        RAISE EXCEPTION '% is larger than % bytes as text', p_field, p_max_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_text;
END;
$$;

REVOKE EXECUTE ON FUNCTION pay._bounded_json_text(jsonb, text, int) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pay.idempotency_key(scope text, parts jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    -- jsonb's text form keeps every digit of a number; pgpay-core canonicalises it (RFC 8785 style).
    RETURN pay._idempotency_key_of_text(scope, pay._bounded_json_text(parts, 'parts', 65536));
END;
$$;

CREATE OR REPLACE FUNCTION pay.begin_checkout(
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

CREATE OR REPLACE FUNCTION pay.complete_outbox(id bigint, attempt int, http_status int, response jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    IF http_status IS NULL OR http_status < 200 OR http_status > 299 THEN
        RAISE EXCEPTION 'complete_outbox: http_status must be 2xx, got %', http_status
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use pay.retry_outbox or pay.fail_outbox for other answers.';
    END IF;
    IF response IS NULL OR jsonb_typeof(response) <> 'object' THEN
        RAISE EXCEPTION 'complete_outbox: response must be the JSON object Stripe answered'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pay._bounded_json_text(response, 'response', 1048576);
    v_command := pay._finish_outbox_if_current_attempt(id, attempt, 'done', http_status, NULL, response, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    CASE v_command.kind
        WHEN 'create_payment_intent', 'cancel_payment_intent' THEN
            PERFORM pay._apply_payment_intent(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint);
        WHEN 'refund' THEN
            PERFORM pay._apply_refund_answer(v_command.payment_id, response,
                'outbox:' || v_command.id || '#' || v_command.attempts);
        ELSE
            -- The domain pay.outbox_kind makes this unreachable; say so loudly if the two ever disagree.
            RAISE EXCEPTION 'complete_outbox: no handler for command kind %', v_command.kind
                USING ERRCODE = 'internal_error';
    END CASE;
    RETURN true;
END;
$$;

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
    PERFORM pay._bounded_json_text(p_object, 'object', 1048576);
    IF p_object ->> 'object' = 'refund' THEN
        payment_id := pay._payment_for_intent(p_object ->> 'payment_intent', p_object -> 'metadata');
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
    SELECT * INTO v FROM pay.payments p WHERE p.stripe_payment_intent_id = v_id;
    IF NOT FOUND THEN
        IF v_claimed IS NULL
           OR v_claimed !~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
            outcome := 'not_ours';
            detail := 'no pgpay metadata';
            RETURN;
        END IF;
        SELECT * INTO v FROM pay.payments p WHERE p.id = v_claimed::uuid;
        IF NOT FOUND THEN
            PERFORM pay._record_finding(p_run_id, 'unknown_payment', NULL, v_id, v_claimed, NULL,
                'the PaymentIntent names a pgpay payment this database does not have');
            outcome := 'not_ours';
            detail := 'names an unknown payment';
            RETURN;
        END IF;
    END IF;
    payment_id := v.id;
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

CREATE OR REPLACE FUNCTION pay.apply_stripe_event(event jsonb)
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
    RETURN QUERY SELECT CASE WHEN v.outcome IS NULL THEN 'duplicate' WHEN v.outcome = 'stored' THEN 'stored' ELSE 'applied' END,
                        event ->> 'id', v.detail;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Issue #9, defects 3 and 4: refunds are a ledger keyed by Stripe's refund id with the Stripe time
-- of each status; amount_refunded is derived from it, so every order of arrival gives the same
-- total; no signed event about a refund or a charge makes ingest raise.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pay.refunds ADD COLUMN IF NOT EXISTS evidence_at bigint;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS refunded_per_charge bigint NOT NULL DEFAULT 0;
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS refunded_per_charge_at bigint;
-- What 0.1.0 recorded stays the total: kept as the charge's own report, older than any report to come.
UPDATE pay.payments p SET refunded_per_charge = p.amount_refunded, refunded_per_charge_at = 0
WHERE p.amount_refunded > 0 AND p.refunded_per_charge_at IS NULL;
CREATE OR REPLACE FUNCTION pay._evidence_time(p_event jsonb) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_event ->> 'created' ~ '^[0-9]{1,12}$' THEN (p_event ->> 'created')::bigint
                ELSE floor(extract(epoch FROM now()))::bigint END;
$$;

CREATE OR REPLACE FUNCTION pay._refund_status_rank(p_status text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE p_status WHEN 'pending' THEN 1 WHEN 'requires_action' THEN 2 WHEN 'succeeded' THEN 3
                         WHEN 'failed' THEN 4 WHEN 'canceled' THEN 5 ELSE 0 END;
$$;

CREATE OR REPLACE FUNCTION pay._refund_problem(p_refund jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p_refund) IS DISTINCT FROM 'object' OR p_refund ->> 'object' IS DISTINCT FROM 'refund'
                THEN 'it is not a Refund object'
                WHEN p_refund ->> 'id' IS NULL OR length(p_refund ->> 'id') > 255 THEN 'the Refund has no usable id'
                WHEN coalesce(p_refund ->> 'amount', '') !~ '^0*[1-9][0-9]{0,14}$' THEN 'the Refund has no whole positive amount'
           END;
$$;

CREATE OR REPLACE FUNCTION pay._record_refund(p_payment_id uuid, p_refund jsonb, p_at bigint) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.refunds AS r (refund_id, payment_id, amount, status, reason, evidence_at)
    VALUES (p_refund ->> 'id', p_payment_id, (p_refund ->> 'amount')::bigint,
            coalesce(left(p_refund ->> 'status', 100), 'unknown'), left(p_refund ->> 'reason', 200), p_at)
    ON CONFLICT (refund_id) DO UPDATE
        SET amount = excluded.amount, status = excluded.status, reason = coalesce(excluded.reason, r.reason),
            evidence_at = excluded.evidence_at, updated_at = now()
        -- The newest report wins; the same Stripe time goes to the later status (then the larger
        -- amount), so that the outcome never depends on which report came first.
        WHERE (excluded.evidence_at, pay._refund_status_rank(excluded.status), excluded.amount)
              > (coalesce(r.evidence_at, -1), pay._refund_status_rank(r.status), r.amount);
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION pay._derive_amount_refunded(p_payment_id uuid) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_total bigint;
BEGIN
    UPDATE pay.payments p
    SET amount_refunded = d.total, updated_at = now()
    FROM (
        SELECT least(greatest(l.counted,
                              CASE WHEN coalesce(p.refunded_per_charge_at, -1) > coalesce(l.newest, -1)
                                   THEN p.refunded_per_charge ELSE 0 END),
                     greatest(p.amount, p.amount_received)) AS total
        FROM pay.payments p,
             LATERAL (SELECT coalesce(sum(r.amount) FILTER (WHERE r.status NOT IN ('failed', 'canceled')), 0) AS counted,
                             max(r.evidence_at) AS newest
                      FROM pay.refunds r WHERE r.payment_id = p.id) l
        WHERE p.id = p_payment_id
    ) d
    WHERE p.id = p_payment_id AND p.amount_refunded IS DISTINCT FROM d.total
    RETURNING p.amount_refunded INTO v_total;
    IF NOT FOUND THEN
        SELECT p.amount_refunded INTO v_total FROM pay.payments p WHERE p.id = p_payment_id;
    END IF;
    RETURN v_total;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_refund_evidence(p_payment pay.payments, p_refund jsonb, p_evidence_id text, p_at bigint,
    OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_before bigint := p_payment.amount_refunded;
    v_after bigint;
BEGIN
    detail := pay._refund_problem(p_refund);
    IF detail IS NOT NULL THEN
        outcome := 'stored';
        detail := 'refund not applied: ' || detail;
        RETURN;
    END IF;
    IF NOT pay._record_refund(p_payment.id, p_refund, p_at) THEN
        outcome := 'unchanged';
        RETURN;
    END IF;
    v_after := pay._derive_amount_refunded(p_payment.id);
    PERFORM pay._audit(p_payment.id, p_payment.status, p_payment.status,
        format('refund %s of %s %s; refunded %s -> %s', p_refund ->> 'id', p_refund ->> 'amount',
               coalesce(p_refund ->> 'status', 'unknown'), v_before, v_after),
        p_evidence_id);
    outcome := 'applied';
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_charge_refunds(p_payment pay.payments, p_charge jsonb, p_evidence_id text, p_at bigint,
    OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_before bigint := p_payment.amount_refunded;
    v_after bigint;
    v_total text := p_charge ->> 'amount_refunded';
    v_changed boolean := false;
    v_refund jsonb;
BEGIN
    IF coalesce(v_total, '') !~ '^[0-9]{1,15}$' THEN
        outcome := 'stored';
        detail := 'charge not applied: it has no whole amount_refunded';
        RETURN;
    END IF;
    IF jsonb_typeof(p_charge #> '{refunds,data}') = 'array' THEN
        FOR v_refund IN SELECT e FROM jsonb_array_elements(p_charge #> '{refunds,data}') e LOOP
            IF pay._refund_problem(v_refund) IS NULL THEN
                v_changed := pay._record_refund(p_payment.id, v_refund, p_at) OR v_changed;
            END IF;
        END LOOP;
    END IF;
    UPDATE pay.payments p SET refunded_per_charge = v_total::bigint, refunded_per_charge_at = p_at
    WHERE p.id = p_payment.id
      AND (p_at, v_total::bigint) > (coalesce(p.refunded_per_charge_at, -1), p.refunded_per_charge);
    v_changed := FOUND OR v_changed;
    v_after := pay._derive_amount_refunded(p_payment.id);
    IF NOT v_changed THEN
        outcome := 'unchanged';
        RETURN;
    END IF;
    PERFORM pay._audit(p_payment.id, p_payment.status, p_payment.status,
        format('charge %s reports %s of %s refunded; refunded %s -> %s', coalesce(p_charge ->> 'id', 'without id'),
               v_total, coalesce(p_charge ->> 'amount', 'an unknown amount'), v_before, v_after),
        p_evidence_id);
    outcome := 'applied';
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_refund_answer(p_payment_id uuid, p_refund jsonb, p_evidence_id text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_problem text := pay._refund_problem(p_refund);
    v_result record;
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'evidence for payment % cannot be applied: %', p_payment_id, v_problem
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := pay._lock_payment(p_payment_id);
    v_result := pay._apply_refund_evidence(v, p_refund, p_evidence_id, floor(extract(epoch FROM now()))::bigint);
    RETURN v_result.outcome;
END;
$$;

CREATE OR REPLACE FUNCTION pay._apply_event(p_event jsonb, p_payment pay.payments, OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_type text := p_event ->> 'type';
    v_object jsonb := p_event #> '{data,object}';
    v_event_id text := p_event ->> 'id';
BEGIN
    IF v_object ->> 'object' = 'refund' AND v_type LIKE '%refund.%' THEN
        SELECT a.outcome, a.detail INTO outcome, detail
        FROM pay._apply_refund_evidence(p_payment, v_object, v_event_id, pay._evidence_time(p_event)) a;
        IF outcome = 'stored' THEN
            RETURN;
        END IF;
    ELSIF v_type = 'charge.refunded' AND v_object ->> 'object' = 'charge' THEN
        SELECT a.outcome, a.detail INTO outcome, detail
        FROM pay._apply_charge_refunds(p_payment, v_object, v_event_id, pay._evidence_time(p_event)) a;
        IF outcome = 'stored' THEN
            RETURN;
        END IF;
    ELSIF v_type LIKE 'charge.dispute.%' AND v_object ->> 'object' = 'dispute' THEN
        UPDATE pay.payments p SET disputed = true, updated_at = now() WHERE p.id = p_payment.id AND NOT p.disputed;
        PERFORM pay._audit(p_payment.id, p_payment.status, p_payment.status,
            format('%s (%s, %s)', v_type, coalesce(v_object ->> 'reason', 'no reason'), coalesce(v_object ->> 'status', 'no status')),
            v_event_id);
        outcome := 'applied';
    ELSE
        outcome := 'stored';
        detail := 'no handler for ' || coalesce(v_type, 'an event without a type') || ' on this payment';
        RETURN;
    END IF;
    detail := v_type || ' -> ' || outcome;
END;
$$;

REVOKE EXECUTE ON FUNCTION pay._evidence_time(jsonb), pay._refund_status_rank(text), pay._refund_problem(jsonb),
    pay._record_refund(uuid, jsonb, bigint), pay._derive_amount_refunded(uuid),
    pay._apply_refund_evidence(pay.payments, jsonb, text, bigint), pay._apply_charge_refunds(pay.payments, jsonb, text, bigint)
    FROM PUBLIC;
-- ---------------------------------------------------------------------------------------------
-- Issue #9, defect 6: the audit log is tamper-evident. Each row carries a hash over its content and
-- the previous row's hash of the same payment; triggers fire ALWAYS; pay.verify_audit_log names
-- every row changed, deleted or inserted out of order. The rows 0.1.0 wrote are chained here.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pay.payments ADD COLUMN IF NOT EXISTS audit_head bytea;
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS prev_hash bytea;
ALTER TABLE pay.audit_log ADD COLUMN IF NOT EXISTS hash bytea;
CREATE OR REPLACE FUNCTION pay._audit_row_hash(p_prev bytea, p_row pay.audit_log) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT sha256(coalesce(p_prev, '\x'::bytea) || convert_to(jsonb_build_array(
        p_row.id, p_row.payment_id, p_row.from_status, p_row.to_status, p_row.proposed_status,
        p_row.cause, p_row.evidence_id, p_row.actor, extract(epoch FROM p_row.at))::text, 'SQL_ASCII'));
$$;

CREATE OR REPLACE FUNCTION pay._audit_log_chain() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    SELECT p.audit_head INTO NEW.prev_hash FROM pay.payments p WHERE p.id = NEW.payment_id FOR NO KEY UPDATE;
    NEW.hash := pay._audit_row_hash(NEW.prev_hash, NEW);
    UPDATE pay.payments p SET audit_head = NEW.hash WHERE p.id = NEW.payment_id;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER audit_log_chain
    BEFORE INSERT ON pay.audit_log
    FOR EACH ROW EXECUTE FUNCTION pay._audit_log_chain();

-- Chain what is there, payment by payment in id order, as the trigger would have.
DO $chain$
DECLARE
    r pay.audit_log;
    v_payment uuid;
    v_prev bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pay.audit_log a WHERE a.hash IS NULL) THEN
        RETURN;
    END IF;
    ALTER TABLE pay.audit_log DISABLE TRIGGER audit_log_no_update_or_delete;
    FOR r IN SELECT * FROM pay.audit_log a ORDER BY a.payment_id, a.id LOOP
        IF r.payment_id IS DISTINCT FROM v_payment THEN
            v_payment := r.payment_id;
            v_prev := NULL;
        END IF;
        r.prev_hash := v_prev;
        r.hash := pay._audit_row_hash(v_prev, r);
        UPDATE pay.audit_log a SET prev_hash = r.prev_hash, hash = r.hash WHERE a.id = r.id;
        v_prev := r.hash;
    END LOOP;
    UPDATE pay.payments p SET audit_head = n.hash
    FROM (SELECT DISTINCT ON (a.payment_id) a.payment_id, a.hash FROM pay.audit_log a ORDER BY a.payment_id, a.id DESC) n
    WHERE p.id = n.payment_id;
    ALTER TABLE pay.audit_log ENABLE TRIGGER audit_log_no_update_or_delete;
END;
$chain$;
ALTER TABLE pay.audit_log ALTER COLUMN hash SET NOT NULL;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_or_delete;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
ALTER TABLE pay.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
CREATE OR REPLACE FUNCTION pay.verify_audit_log()
RETURNS TABLE (audit_id bigint, payment_id uuid, problem text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    WITH chain AS (
        SELECT a.id, a.payment_id, a.prev_hash, a.hash, pay._audit_row_hash(a.prev_hash, a) AS recomputed,
               lag(a.id) OVER w AS previous_id, lag(a.hash) OVER w AS previous_hash
        FROM pay.audit_log a
        WINDOW w AS (PARTITION BY a.payment_id ORDER BY a.id)
    ), newest AS (
        SELECT DISTINCT ON (a.payment_id) a.payment_id, a.id, a.hash
        FROM pay.audit_log a ORDER BY a.payment_id, a.id DESC
    )
    SELECT c.id, c.payment_id, 'changed: its hash does not cover its content'
    FROM chain c WHERE c.hash IS DISTINCT FROM c.recomputed
    UNION ALL
    SELECT c.id, c.payment_id,
           CASE WHEN c.previous_id IS NULL
                THEN 'not chained to the start: an earlier row of this payment was deleted, or this one was inserted out of order'
                ELSE format('not chained to row %s before it: a row between them was deleted, or one of them was changed or inserted out of order',
                            c.previous_id) END
    FROM chain c WHERE c.prev_hash IS DISTINCT FROM c.previous_hash
    UNION ALL
    SELECT n.id, p.id,
           CASE WHEN n.id IS NULL THEN 'every audit row of this payment is missing'
                ELSE 'newer rows are missing: the payment''s chain head is not this row''s hash' END
    FROM pay.payments p LEFT JOIN newest n ON n.payment_id = p.id
    WHERE p.audit_head IS DISTINCT FROM n.hash
    ORDER BY 2, 1;
$$;

REVOKE EXECUTE ON FUNCTION pay._audit_row_hash(bytea, pay.audit_log), pay._audit_log_chain(), pay.verify_audit_log() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.verify_audit_log() TO pay_auditor;
-- ---------------------------------------------------------------------------------------------
-- Issue #9, defect 7: pay.refund takes the application's refund_ref (a retry queues nothing).
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION IF EXISTS pay.refund(uuid, bigint, text);
CREATE OR REPLACE FUNCTION pay.refund(payment_id uuid, amount bigint DEFAULT NULL, reason text DEFAULT NULL,
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

REVOKE EXECUTE ON FUNCTION pay.refund(uuid, bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pay.refund(uuid, bigint, text, text) TO pay_app;
-- ---------------------------------------------------------------------------------------------
-- Issue #9, defect 12: CREATE EXTENSION now refuses to adopt a pay_* role that can log in, is or
-- can become a superuser, creates roles or bypasses row security. An installed database keeps its
-- roles (refusing here would fail the upgrade, not fix the role): say so loudly instead.
-- ---------------------------------------------------------------------------------------------
DO $roles$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT r.rolname FROM pg_catalog.pg_roles r
        WHERE r.rolname IN ('pay_app', 'pay_webhook', 'pay_worker', 'pay_auditor')
          AND (r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolbypassrls
               OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles s
                          WHERE s.rolsuper AND s.oid <> r.oid AND pg_catalog.pg_has_role(r.oid, s.oid, 'MEMBER')))
    LOOP
        RAISE WARNING 'pgpay: role % can log in, is or can become a superuser, creates roles or bypasses row security', v.rolname
            USING HINT = 'pgpay''s roles are group roles shared by every database of the cluster: ALTER ROLE ... NOLOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS and grant it to login roles instead.';
    END LOOP;
END
$roles$;
