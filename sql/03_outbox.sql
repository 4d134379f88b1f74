-- The outbox: commands for Stripe written in the caller's transaction, sent by the worker.
-- Contract: docs/outbox-contract.md. The worker never decides a state transition: it hands every
-- answer back through complete/retry/fail, fenced by the attempt number it claimed.

-- Writes one command and rings the doorbell. A command whose path needs the PaymentIntent id
-- ({payment_intent}) or the Checkout Session id ({checkout_session}) waits until the create command
-- brings it back. Returns NULL when the key exists already (the same command was written before:
-- nothing to do).
CREATE FUNCTION pay._enqueue(
    p_payment_id uuid,
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
    IF position('{payment_intent}' IN p_path) > 0 THEN
        SELECT p.stripe_payment_intent_id INTO v_known FROM pay.payments p WHERE p.id = p_payment_id;
        IF v_known IS NULL THEN
            v_status := 'waiting';
        ELSE
            v_path := replace(p_path, '{payment_intent}', v_known);
        END IF;
    ELSIF position('{checkout_session}' IN p_path) > 0 THEN
        SELECT p.stripe_checkout_session_id INTO v_known FROM pay.payments p WHERE p.id = p_payment_id;
        IF v_known IS NULL THEN
            v_status := 'waiting';
        ELSE
            v_path := replace(p_path, '{checkout_session}', v_known);
        END IF;
    END IF;
    INSERT INTO pay.outbox (payment_id, kind, idempotency_key, request, status)
    VALUES (p_payment_id, p_kind, p_idempotency_key,
            jsonb_build_object('method', p_method, 'path', v_path, 'params', p_params), v_status)
    ON CONFLICT ON CONSTRAINT outbox_idempotency_key_unique DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NOT NULL AND v_status = 'pending' THEN
        -- A doorbell without data: identical payloads fold into one NOTIFY per transaction.
        PERFORM pg_notify('pay_outbox', '');
    END IF;
    RETURN v_id;
END;
$$;

-- Called once an id a path waits for is known (p_placeholder '{payment_intent}' or
-- '{checkout_session}'): the commands that waited for it become sendable.
CREATE FUNCTION pay._release_waiting(p_payment_id uuid, p_placeholder text, p_value text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE pay.outbox o
    SET status = 'pending',
        request = jsonb_set(o.request, '{path}', to_jsonb(replace(o.request ->> 'path', p_placeholder, p_value))),
        run_after = now(),
        updated_at = now()
    WHERE o.payment_id = p_payment_id AND o.status = 'waiting'
      AND position(p_placeholder IN o.request ->> 'path') > 0;
    IF FOUND THEN
        PERFORM pg_notify('pay_outbox', '');
    END IF;
END;
$$;

-- The PaymentIntent id is known (extension/src/apply_intent.rs calls this).
CREATE FUNCTION pay._release_waiting_commands(p_payment_id uuid, p_intent text) RETURNS void
LANGUAGE sql
AS $$ SELECT pay._release_waiting(p_payment_id, '{payment_intent}', p_intent) $$;

-- Called when the PaymentIntent will never exist: what waited for it has nothing to act on.
CREATE FUNCTION pay._skip_waiting_commands(p_payment_id uuid, p_why text) RETURNS void
LANGUAGE sql
AS $$
    UPDATE pay.outbox o
    SET status = 'skipped', last_error = p_why, completed_at = now(), updated_at = now()
    WHERE o.payment_id = p_payment_id AND o.status = 'waiting';
$$;

-- Takes commands p_ids in flight for p_worker: a lease of p_lease and one more attempt (the number
-- every completion is fenced by). Commands that are no longer pending or in flight are left alone.
-- The one place a command is leased: pay.claim_outbox picks which, and tests that play the worker
-- for one payment's command take it through here too.
CREATE FUNCTION pay._lease_commands(p_ids bigint[], p_worker text, p_lease interval)
RETURNS SETOF pay.outbox
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
    UPDATE pay.outbox o
    SET status = 'in_flight',
        lease_owner = p_worker,
        lease_expires = now() + p_lease,
        attempts = o.attempts + 1,
        first_attempt_at = coalesce(o.first_attempt_at, now()),
        updated_at = now()
    WHERE o.id = ANY (p_ids) AND o.status IN ('pending', 'in_flight')
    RETURNING o.*;
END;
$$;

CREATE FUNCTION pay.claim_outbox(worker text, max_rows int DEFAULT 32, lease interval DEFAULT '60 seconds')
RETURNS SETOF pay.outbox
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
BEGIN
    IF worker IS NULL OR length(worker) = 0 OR length(worker) > 200 THEN
        RAISE EXCEPTION 'claim_outbox: worker must be a name of 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 1000 THEN
        RAISE EXCEPTION 'claim_outbox: max_rows must be between 1 and 1000, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' OR lease > interval '1 hour' THEN
        RAISE EXCEPTION 'claim_outbox: lease must be between 1 second and 1 hour, got %', lease USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT * FROM pay._lease_commands(ARRAY(
        WITH expired AS (
            -- A crashed worker's commands: sent again, with the same key, once the lease has run out.
            SELECT o.id FROM pay.outbox o
            WHERE o.status = 'in_flight' AND o.lease_expires < now()
            ORDER BY o.lease_expires
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED
        ), due AS (
            SELECT o.id FROM pay.outbox o
            WHERE o.status = 'pending' AND o.run_after <= now()
            ORDER BY o.run_after, o.id
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED
        )
        SELECT id FROM expired
        UNION ALL
        SELECT id FROM due
        LIMIT max_rows
    ), worker, lease);
END;
$$;

-- The fence every completion passes: only the holder of the row's current attempt may finish it.
-- Returns the command, locked, or NULL for a worker whose lease was taken over.
CREATE FUNCTION pay._finish_outbox_if_current_attempt(
    p_id bigint, p_attempt int, p_status text, p_http_status int, p_error text, p_response jsonb, p_run_after timestamptz
) RETURNS pay.outbox
LANGUAGE plpgsql
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    UPDATE pay.outbox o
    SET status = p_status,
        lease_owner = NULL,
        lease_expires = NULL,
        last_http_status = p_http_status,
        last_error = p_error,
        response = coalesce(p_response, o.response),
        run_after = coalesce(p_run_after, o.run_after),
        completed_at = CASE WHEN p_status IN ('done', 'dead') THEN now() END,
        updated_at = now()
    WHERE o.id = p_id AND o.attempts = p_attempt AND o.status = 'in_flight'
    RETURNING o.* INTO v_command;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN v_command;
END;
$$;

CREATE FUNCTION pay.complete_outbox(id bigint, attempt int, http_status int, response jsonb)
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
    IF v_command.subscription_id IS NOT NULL THEN
        -- A subscription's command: the answer (its Checkout Session, or the subscription) goes
        -- through the subscription rule (sql/13_subscription_evidence.sql).
        PERFORM pay._apply_billing_object(
            v_command.subscription_id, response, NULL, 'api answer to ' || v_command.kind,
            'outbox:' || v_command.id || '#' || v_command.attempts,
            floor(extract(epoch FROM now()))::bigint);
        RETURN true;
    END IF;
    CASE v_command.kind
        WHEN 'create_payment_intent', 'cancel_payment_intent' THEN
            PERFORM pay._apply_payment_intent(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint);
        WHEN 'create_checkout_session', 'expire_checkout_session' THEN
            PERFORM pay._apply_checkout_session(
                v_command.payment_id, response, 'api answer to ' || v_command.kind,
                'outbox:' || v_command.id || '#' || v_command.attempts,
                floor(extract(epoch FROM now()))::bigint, NULL);
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

CREATE FUNCTION pay.retry_outbox(id bigint, attempt int, http_status int, error text, run_after timestamptz)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
BEGIN
    IF run_after IS NULL THEN
        RAISE EXCEPTION 'retry_outbox: run_after must be given' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_command := pay._finish_outbox_if_current_attempt(
        id, attempt, 'pending', http_status, left(coalesce(error, 'retryable failure'), 2000), NULL, run_after);
    RETURN v_command.id IS NOT NULL;
END;
$$;

CREATE FUNCTION pay.fail_outbox(id bigint, attempt int, http_status int, error jsonb)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_command pay.outbox;
    v_payment pay.payments;
    v_message text := coalesce(error #>> '{error,message}', error ->> 'message', error::text, 'permanent failure');
BEGIN
    v_command := pay._finish_outbox_if_current_attempt(
        id, attempt, 'dead', http_status, left(v_message, 2000), error, NULL);
    IF v_command.id IS NULL THEN
        RETURN false;
    END IF;
    IF v_command.subscription_id IS NOT NULL THEN
        PERFORM pay._fail_subscription_command(v_command, http_status, v_message, error);
        RETURN true;
    END IF;
    SELECT * INTO v_payment FROM pay.payments p WHERE p.id = v_command.payment_id FOR NO KEY UPDATE;
    UPDATE pay.payments p SET last_error = error, updated_at = now() WHERE p.id = v_payment.id;
    IF v_command.kind IN ('create_payment_intent', 'create_checkout_session') THEN
        -- Stripe refused the create: there will never be a PaymentIntent (or Checkout Session)
        -- for this attempt.
        IF v_payment.status = 'creating' THEN
            UPDATE pay.payments p SET status = 'create_failed', updated_at = now() WHERE p.id = v_payment.id;
            PERFORM pay._audit(v_payment.id, v_payment.status, 'create_failed',
                'Stripe refused the create (HTTP ' || coalesce(http_status::text, '?') || '): ' || left(v_message, 500),
                'outbox:' || v_command.id || '#' || v_command.attempts);
        END IF;
        PERFORM pay._skip_waiting_commands(v_payment.id, CASE v_command.kind
            WHEN 'create_payment_intent' THEN 'the PaymentIntent was never created'
            ELSE 'the Checkout Session was never created' END);
    ELSE
        PERFORM pay._audit(v_payment.id, v_payment.status, v_payment.status,
            v_command.kind || ' refused by Stripe (HTTP ' || coalesce(http_status::text, '?') || '): ' || left(v_message, 500),
            'outbox:' || v_command.id || '#' || v_command.attempts);
    END IF;
    RETURN true;
END;
$$;
