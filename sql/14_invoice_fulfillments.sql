-- Invoice fulfillments (issue 14): pay.claim_fulfillments and its neighbours for paid invoices,
-- with the same leases, fencing and retry/backoff/dead-letter settings.
-- Re-runnable (OR REPLACE): the upgrade script's subscriptions section repeats it verbatim.

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
