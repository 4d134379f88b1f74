-- Applying what Stripe says about a payment. Webhooks, outbox answers and reconciliation all come
-- through here, under the payment's row lock, with the one transition rule (pay._transition, from
-- pgpay-core).

-- Exactly one row per successful payment, written in the transaction of the transition.
CREATE TABLE pay.fulfillments (
    payment_id     uuid PRIMARY KEY REFERENCES pay.payments (id),
    order_ref      text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by     text,
    claim_expires  timestamptz,
    completed_at   timestamptz,
    CONSTRAINT fulfillments_claim_has_expiry CHECK ((claimed_by IS NULL) = (claim_expires IS NULL))
);
CREATE INDEX fulfillments_open ON pay.fulfillments (created_at) WHERE completed_at IS NULL;

-- Refunds as Stripe reported them, keyed by Stripe's refund id so a repeat report changes nothing.
CREATE TABLE pay.refunds (
    refund_id   text PRIMARY KEY,
    payment_id  uuid NOT NULL REFERENCES pay.payments (id),
    amount      bigint NOT NULL CHECK (amount > 0),
    status      text NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_by_payment ON pay.refunds (payment_id);

-- Locks a payment for the caller's transaction and returns it.
CREATE FUNCTION pay._lock_payment(p_payment_id uuid) RETURNS pay.payments
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
BEGIN
    SELECT * INTO v FROM pay.payments p WHERE p.id = p_payment_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no payment %', p_payment_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END;
$$;

-- Applies a PaymentIntent object (from an event, an API answer or reconciliation) to payment `v`,
-- which the caller has locked. Returns 'applied', 'unchanged', 'ignored' or 'flagged'.
-- The transition's writes (status, audit row, fulfillment) are one statement: on the hot path
-- every statement's executor start-up costs about as much as its work.
CREATE FUNCTION pay._apply_payment_intent_locked(
    v pay.payments,
    p_intent jsonb,
    p_cause text,
    p_evidence_id text,
    p_evidence_at bigint
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_intent_id text := p_intent ->> 'id';
    v_proposed text := p_intent ->> 'status';
    v_decision text;
    v_mismatch text;
    v_received bigint;
    v_error jsonb := p_intent -> 'last_payment_error';
    v_recorded boolean := false;
BEGIN
    IF v_intent_id IS NULL OR v_proposed IS NULL OR p_intent ->> 'object' IS DISTINCT FROM 'payment_intent' THEN
        RAISE EXCEPTION 'evidence for payment % is not a PaymentIntent object', v.id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_decision := pay._transition(v.status::text, v.status_evidence_at, v_proposed, p_evidence_at);

    IF v.stripe_payment_intent_id IS NULL THEN
        -- The first word about this payment's PaymentIntent. When it also moves the status (the
        -- create answer, usually) one UPDATE and one audit row record both: every UPDATE here
        -- rewrites all of the payment's indexes.
        PERFORM pay._release_waiting_commands(v.id, v_intent_id);
        IF v_decision = 'apply' THEN
            v_recorded := true;
        ELSE
            UPDATE pay.payments p
            SET stripe_payment_intent_id = v_intent_id, client_secret = p_intent ->> 'client_secret', updated_at = now()
            WHERE p.id = v.id;
            PERFORM pay._audit(v.id, v.status, v.status,
                'PaymentIntent ' || v_intent_id || ' recorded (' || p_cause || ')', p_evidence_id);
        END IF;
        v.stripe_payment_intent_id := v_intent_id;
    ELSIF v.stripe_payment_intent_id <> v_intent_id THEN
        -- Never let a second PaymentIntent speak for a payment (invariant 1): keep it for a human.
        UPDATE pay.payments p
        SET flagged_reason = 'a second PaymentIntent ' || v_intent_id || ' claims this payment', updated_at = now()
        WHERE p.id = v.id;
        PERFORM pay._audit(v.id, v.status, v.status,
            'flagged: evidence about a second PaymentIntent ' || v_intent_id || ' (' || p_cause || ')', p_evidence_id, v_proposed);
        RETURN 'flagged';
    ELSIF v.client_secret IS NULL AND p_intent ->> 'client_secret' IS NOT NULL THEN
        UPDATE pay.payments p SET client_secret = p_intent ->> 'client_secret', updated_at = now() WHERE p.id = v.id;
    END IF;

    v_received := coalesce((p_intent ->> 'amount_received')::bigint, 0);

    IF v_decision = 'apply' THEN
        IF v_proposed = 'succeeded' THEN
            v_mismatch := CASE
                WHEN lower(p_intent ->> 'currency') IS DISTINCT FROM v.currency THEN
                    'currency ' || coalesce(p_intent ->> 'currency', 'missing') || ' differs from the payment''s ' || v.currency
                WHEN (p_intent ->> 'amount')::bigint IS DISTINCT FROM v.amount
                     OR (v_received <> 0 AND v_received <> v.amount) THEN
                    'amount ' || coalesce(nullif(v_received, 0), (p_intent ->> 'amount')::bigint)::text
                    || ' differs from the payment''s ' || v.amount
            END;
        END IF;
        IF v_error IS NULL OR v_error = 'null' THEN
            v_error := v.last_error;
        END IF;
        UPDATE pay.payments p
        SET status = v_proposed::pay.payment_status,
            stripe_payment_intent_id = v_intent_id,
            client_secret = coalesce(p.client_secret, p_intent ->> 'client_secret'),
            status_evidence_at = p_evidence_at,
            amount_received = greatest(p.amount_received, v_received),
            last_error = v_error,
            flagged_reason = coalesce('success not fulfilled: ' || v_mismatch, p.flagged_reason),
            updated_at = now()
        WHERE p.id = v.id;
        INSERT INTO pay.audit_log (payment_id, from_status, to_status, cause, evidence_id)
        VALUES (v.id, v.status, v_proposed::pay.payment_status,
                CASE WHEN v_recorded THEN p_cause || ' (PaymentIntent ' || v_intent_id || ' recorded)' ELSE p_cause END,
                p_evidence_id);
        IF v_mismatch IS NOT NULL THEN
            INSERT INTO pay.audit_log (payment_id, from_status, to_status, cause, evidence_id)
            VALUES (v.id, v_proposed::pay.payment_status, v_proposed::pay.payment_status,
                    'flagged, not fulfilled: ' || v_mismatch, p_evidence_id);
        ELSIF v_proposed = 'succeeded' THEN
            -- Exactly one fulfillment per success, in the transaction of the transition (invariant 5).
            INSERT INTO pay.fulfillments (payment_id, order_ref) VALUES (v.id, v.order_ref);
        END IF;
        RETURN CASE WHEN v_mismatch IS NULL THEN 'applied' ELSE 'flagged' END;
    ELSIF v_decision = 'unchanged' THEN
        IF v_error IS NOT NULL AND v_error <> 'null' AND v_error IS DISTINCT FROM v.last_error THEN
            -- A failed attempt leaves the status where it was (requires_payment_method): the
            -- decline itself is the news, so it is recorded and audited.
            UPDATE pay.payments p
            SET last_error = v_error, status_evidence_at = greatest(p.status_evidence_at, p_evidence_at), updated_at = now()
            WHERE p.id = v.id;
            PERFORM pay._audit(v.id, v.status, v.status,
                p_cause || ': ' || coalesce(v_error ->> 'code', 'error') || ' ' || coalesce(v_error ->> 'message', ''),
                p_evidence_id);
            RETURN 'applied';
        END IF;
        UPDATE pay.payments p
        SET status_evidence_at = greatest(p.status_evidence_at, p_evidence_at),
            amount_received = greatest(p.amount_received, v_received)
        WHERE p.id = v.id
          AND (p.status_evidence_at IS DISTINCT FROM greatest(p.status_evidence_at, p_evidence_at)
               OR p.amount_received < v_received);
        RETURN 'unchanged';
    ELSIF v_decision = 'success_after_give_up' THEN
        -- Two tabs: an attempt pgpay had superseded was paid anyway. One order, one kept charge:
        -- refund it under a key derived from the payment, so the refund is asked for once.
        UPDATE pay.payments p
        SET flagged_reason = 'paid after being superseded; refunded as a duplicate charge',
            amount_received = greatest(p.amount_received, v_received),
            status_evidence_at = greatest(p.status_evidence_at, p_evidence_at),
            updated_at = now()
        WHERE p.id = v.id;
        PERFORM pay._audit(v.id, v.status, v.status,
            'flagged: Stripe reports succeeded for a superseded attempt; refund requested (' || p_cause || ')',
            p_evidence_id, v_proposed);
        PERFORM pay._enqueue(v.id, 'refund',
            pay.idempotency_key('pgpay.refund', jsonb_build_object('payment_id', v.id, 'why', 'superseded_attempt_succeeded')),
            'POST', '/v1/refunds',
            jsonb_build_object('payment_intent', v_intent_id, 'reason', 'duplicate',
                               'metadata[pgpay_payment_id]', v.id::text));
        RETURN 'flagged';
    ELSE
        PERFORM pay._audit(v.id, v.status, v.status, p_cause || ': ' || v_decision, p_evidence_id, v_proposed);
        RETURN 'ignored';
    END IF;
END;
$$;

-- The same, for callers that have not locked the payment yet.
CREATE FUNCTION pay._apply_payment_intent(
    p_payment_id uuid,
    p_intent jsonb,
    p_cause text,
    p_evidence_id text,
    p_evidence_at bigint
) RETURNS text
LANGUAGE sql
AS $$
    SELECT pay._apply_payment_intent_locked(pay._lock_payment(p_payment_id), p_intent, p_cause, p_evidence_id, p_evidence_at);
$$;

-- A Refund object (an API answer or a refund.* event): recorded once per refund id; the payment's
-- refunded amount is the sum of the refunds that did not fail, never less than Stripe last said.
CREATE FUNCTION pay._apply_refund_answer(p_payment_id uuid, p_refund jsonb, p_evidence_id text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v pay.payments;
    v_total bigint;
BEGIN
    IF p_refund ->> 'object' IS DISTINCT FROM 'refund' OR p_refund ->> 'id' IS NULL
       OR (p_refund ->> 'amount') IS NULL THEN
        RAISE EXCEPTION 'evidence for payment % is not a Refund object', p_payment_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v FROM pay.payments p WHERE p.id = p_payment_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no payment %', p_payment_id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO pay.refunds (refund_id, payment_id, amount, status, reason)
    VALUES (p_refund ->> 'id', v.id, (p_refund ->> 'amount')::bigint, coalesce(p_refund ->> 'status', 'unknown'), p_refund ->> 'reason')
    ON CONFLICT (refund_id) DO UPDATE
        SET status = excluded.status, updated_at = now()
        WHERE pay.refunds.status IS DISTINCT FROM excluded.status;
    IF NOT FOUND THEN
        RETURN 'unchanged';
    END IF;
    SELECT coalesce(sum(r.amount), 0) INTO v_total
    FROM pay.refunds r WHERE r.payment_id = v.id AND r.status NOT IN ('failed', 'canceled');
    UPDATE pay.payments p
    SET amount_refunded = least(greatest(v_total, 0), greatest(p.amount, p.amount_received)), updated_at = now()
    WHERE p.id = v.id;
    PERFORM pay._audit(v.id, v.status, v.status,
        'refund ' || (p_refund ->> 'id') || ' of ' || (p_refund ->> 'amount') || ' ' || coalesce(p_refund ->> 'status', ''),
        p_evidence_id);
    RETURN 'applied';
END;
$$;
