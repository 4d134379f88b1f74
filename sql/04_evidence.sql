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

-- The refund ledger: refunds as Stripe reported them, keyed by Stripe's refund id, so that one
-- refund seen as refund.created, in charge.refunded and as charge.refund.updated counts once. A
-- refund's status is the one of its newest report (Stripe time, then the later status in a
-- refund's life), so every order of arrival leaves the same ledger; the payment's
-- amount_refunded is derived from it (pay._derive_amount_refunded), never added to.
CREATE TABLE pay.refunds (
    refund_id   text PRIMARY KEY,
    payment_id  uuid NOT NULL REFERENCES pay.payments (id),
    amount      bigint NOT NULL CHECK (amount > 0),
    status      text NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Stripe time (unix seconds) of the report the status comes from; NULL before 0.2.0.
    evidence_at bigint
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

-- Stripe time (unix seconds) of an event: its `created`, or now when it has no usable one.
CREATE FUNCTION pay._evidence_time(p_event jsonb) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_event ->> 'created' ~ '^[0-9]{1,12}$' THEN (p_event ->> 'created')::bigint
                ELSE floor(extract(epoch FROM now()))::bigint END;
$$;

-- Where a status stands in a refund's life: among reports of the same Stripe time, the later wins.
CREATE FUNCTION pay._refund_status_rank(p_status text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE p_status WHEN 'pending' THEN 1 WHEN 'requires_action' THEN 2 WHEN 'succeeded' THEN 3
                         WHEN 'failed' THEN 4 WHEN 'canceled' THEN 5 ELSE 0 END;
$$;

-- Why a Refund object cannot go into the ledger, or NULL when it can (an id, a whole positive
-- amount). Callers decide: a webhook stores the event for a human, an API answer raises 22023.
CREATE FUNCTION pay._refund_problem(p_refund jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p_refund) IS DISTINCT FROM 'object' OR p_refund ->> 'object' IS DISTINCT FROM 'refund'
                THEN 'it is not a Refund object'
                WHEN p_refund ->> 'id' IS NULL OR length(p_refund ->> 'id') > 255 THEN 'the Refund has no usable id'
                WHEN coalesce(p_refund ->> 'amount', '') !~ '^0*[1-9][0-9]{0,14}$' THEN 'the Refund has no whole positive amount'
           END;
$$;

-- Records one Refund object, reported at Stripe time p_at, in the ledger of payment p_payment_id
-- (locked by the caller). Returns whether the ledger changed. The object must have passed
-- pay._refund_problem.
CREATE FUNCTION pay._record_refund(p_payment_id uuid, p_refund jsonb, p_at bigint) RETURNS boolean
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

-- Sets a payment's amount_refunded from its ledger and returns it: the refunds that did not fail
-- or get canceled; or the total the charge itself last reported (charge.refunded), when that
-- report is newer than everything the ledger knows (it may count refunds not yet seen one by
-- one). Never more than was received.
CREATE FUNCTION pay._derive_amount_refunded(p_payment_id uuid) RETURNS bigint
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

-- Applies Refund object p_refund, reported at Stripe time p_at, to payment p_payment (locked by
-- the caller): `applied` (the ledger changed; audited), `unchanged`, or `stored` with the reason
-- it cannot be applied. Never raises on what Stripe sent.
CREATE FUNCTION pay._apply_refund_evidence(p_payment pay.payments, p_refund jsonb, p_evidence_id text, p_at bigint,
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

-- A Charge object (charge.refunded): the refunds it lists go into the ledger, and the total it
-- reports is kept with its Stripe time (see pay._derive_amount_refunded). Same outcomes as above.
CREATE FUNCTION pay._apply_charge_refunds(p_payment pay.payments, p_charge jsonb, p_evidence_id text, p_at bigint,
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

-- A Refund object from Stripe's API (the answer to our refund command, or reconciliation): the
-- newest word about it. Evidence the worker vouches for must be usable: otherwise 22023.
CREATE FUNCTION pay._apply_refund_answer(p_payment_id uuid, p_refund jsonb, p_evidence_id text)
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
