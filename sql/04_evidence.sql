-- Applying what Stripe says about a payment. Webhooks, outbox answers and reconciliation all come
-- through here, under the payment's row lock, with the one transition rule (pgpay-core's
-- transition::decide, applied by pay._apply_payment_intent).

-- Exactly one row per successful payment, written in the transaction of the transition.
CREATE TABLE pay.fulfillments (
    payment_id     uuid PRIMARY KEY REFERENCES pay.payments (id),
    order_ref      text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by     text,
    claim_expires  timestamptz,
    completed_at   timestamptz,
    -- Failed provisioning attempts (pay.fail_fulfillment), the last error, when to try again, and
    -- when the row gave up (pay.dead_fulfillments).
    attempts       int NOT NULL DEFAULT 0,
    last_error     text,
    next_attempt_at timestamptz,
    dead_at        timestamptz,
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

-- PaymentIntent objects (an event, an API answer, reconciliation) are applied by
-- pay._apply_payment_intent(payment_id, intent, cause, evidence_id, evidence_at), written in Rust
-- (extension/src/apply_intent.rs) because every webhook runs it.

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
