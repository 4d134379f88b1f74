-- Webhooks: verified, deduplicated, applied in one transaction, one function call.
-- Invariants 3 and 6: a valid event is stored before the 2xx answer whatever its type, applied at
-- most once (the event id is the key); nothing unsigned changes anything.

-- Several live secrets at once, for rotation. No application role can read this table; functions
-- that need it are SECURITY DEFINER and never return or log a secret.
CREATE TABLE pay.webhook_secrets (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    label       text NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    CONSTRAINT webhook_secrets_label_unique UNIQUE (label),
    CONSTRAINT webhook_secrets_shape CHECK (secret LIKE 'whsec\_%' AND length(secret) BETWEEN 16 AND 512)
);

CREATE TABLE pay.webhook_events (
    event_id            text PRIMARY KEY,
    type                text NOT NULL,
    -- The raw body exactly as signed, for replay and proof.
    payload             text NOT NULL,
    stripe_created      bigint,
    livemode            boolean,
    received_at         timestamptz NOT NULL DEFAULT now(),
    -- applied | ignored | flagged | unchanged | stored (nothing to apply)
    outcome             text NOT NULL,
    payment_id          uuid,
    detail              text,
    -- webhook (signed delivery) or api (events list, replayed by reconciliation)
    source              text NOT NULL DEFAULT 'webhook',
    duplicate_deliveries int NOT NULL DEFAULT 0,
    last_duplicate_at   timestamptz
) WITH (fillfactor = 90);  -- room for HOT updates of the duplicate counters
-- Only the primary key: every index here is paid for by every delivery.

-- Rejections are counted by reason and day; attacker payloads are never stored.
CREATE TABLE pay.webhook_rejections (
    day        date NOT NULL,
    reason     text NOT NULL,
    count      bigint NOT NULL,
    last_at    timestamptz NOT NULL,
    PRIMARY KEY (day, reason)
);

CREATE FUNCTION pay.add_webhook_secret(secret text, label text DEFAULT NULL, expires_at timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_label text := coalesce(label, 'secret-' || to_char(clock_timestamp(), 'YYYYMMDD-HH24MISS-US'));
BEGIN
    -- Never echo the secret: messages name the rule, not the value.
    IF secret IS NULL OR secret NOT LIKE 'whsec\_%' OR length(secret) < 16 OR length(secret) > 512 THEN
        RAISE EXCEPTION 'add_webhook_secret: secret must be a Stripe endpoint secret (whsec_..., 16 to 512 characters)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(v_label) > 200 THEN
        RAISE EXCEPTION 'add_webhook_secret: label is longer than 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF expires_at IS NOT NULL AND expires_at <= now() THEN
        RAISE EXCEPTION 'add_webhook_secret: expires_at is in the past' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO pay.webhook_secrets (label, secret, expires_at) VALUES (v_label, secret, expires_at);
    RETURN v_label;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'add_webhook_secret: a secret labelled % exists already', v_label
        USING ERRCODE = 'unique_violation', HINT = 'Revoke it first or choose another label.';
END;
$$;

CREATE FUNCTION pay.revoke_webhook_secret(label text) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    WITH revoked AS (
        UPDATE pay.webhook_secrets s SET revoked_at = now()
        WHERE s.label = revoke_webhook_secret.label AND s.revoked_at IS NULL
        RETURNING 1
    )
    SELECT count(*) > 0 FROM revoked;
$$;

-- Labels and lifetimes of the secrets, never the secrets themselves.
CREATE VIEW pay.webhook_secret_labels AS
    SELECT label, created_at, expires_at, revoked_at,
           revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) AS live
    FROM pay.webhook_secrets;

CREATE FUNCTION pay._count_rejection(p_reason text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.webhook_rejections AS r (day, reason, count, last_at)
    VALUES (current_date, p_reason, 1, now())
    ON CONFLICT (day, reason) DO UPDATE SET count = r.count + 1, last_at = excluded.last_at;
END;
$$;

-- The payment an object speaks of: by PaymentIntent id, else by our metadata (a PaymentIntent
-- whose create answer was lost). NULL when it is not ours.
CREATE FUNCTION pay._payment_for_intent(p_intent_id text, p_metadata jsonb) RETURNS uuid
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_id uuid;
    v_claimed text := p_metadata ->> 'pgpay_payment_id';
BEGIN
    IF p_intent_id IS NOT NULL THEN
        SELECT p.id INTO v_id FROM pay.payments p WHERE p.stripe_payment_intent_id = p_intent_id;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;
    IF v_claimed ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
        SELECT p.id INTO v_id FROM pay.payments p WHERE p.id = v_claimed::uuid;
        RETURN v_id;
    END IF;
    RETURN NULL;
END;
$$;

-- Finds and locks the payment a Stripe event concerns, in one statement on the common path (by
-- PaymentIntent id), falling back to our metadata. Returns a row of NULLs when the event concerns
-- no pgpay payment (an unknown type, or an object that is not ours).
CREATE FUNCTION pay._lock_payment_for_event(p_event jsonb) RETURNS pay.payments
LANGUAGE plpgsql
AS $$
DECLARE
    v_object jsonb := p_event #> '{data,object}';
    v_intent text;
    v_claimed text;
    v pay.payments;
BEGIN
    CASE v_object ->> 'object'
        WHEN 'payment_intent' THEN v_intent := v_object ->> 'id';
        WHEN 'refund', 'charge', 'dispute' THEN v_intent := v_object ->> 'payment_intent';
        ELSE RETURN v;
    END CASE;
    IF v_intent IS NOT NULL THEN
        SELECT * INTO v FROM pay.payments p WHERE p.stripe_payment_intent_id = v_intent FOR NO KEY UPDATE;
        IF FOUND THEN
            RETURN v;
        END IF;
    END IF;
    v_claimed := v_object #>> '{metadata,pgpay_payment_id}';
    IF v_claimed ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
        SELECT * INTO v FROM pay.payments p WHERE p.id = v_claimed::uuid FOR NO KEY UPDATE;
    END IF;
    RETURN v;
END;
$$;

-- Applies one Stripe event about payment p_payment (locked by the caller). Returns the outcome
-- (applied, ignored, flagged, unchanged, stored) and a detail.
CREATE FUNCTION pay._apply_event(p_event jsonb, p_payment pay.payments, OUT outcome text, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_type text := p_event ->> 'type';
    v_object jsonb := p_event #> '{data,object}';
    v_event_id text := p_event ->> 'id';
    v_created bigint;
    p_payment_id uuid := p_payment.id;
    v_payment pay.payments := p_payment;
BEGIN
    v_created := CASE WHEN p_event ->> 'created' ~ '^[0-9]{1,12}$' THEN (p_event ->> 'created')::bigint
                      ELSE floor(extract(epoch FROM now()))::bigint END;
    IF v_object ->> 'object' = 'payment_intent' AND v_type LIKE 'payment_intent.%' THEN
        outcome := pay._apply_payment_intent_locked(p_payment, v_object, 'webhook ' || v_type, v_event_id, v_created);
    ELSIF v_object ->> 'object' = 'refund' AND v_type LIKE '%refund.%' THEN
        outcome := pay._apply_refund_answer(p_payment_id, v_object, v_event_id);
    ELSIF v_type = 'charge.refunded' AND v_object ->> 'object' = 'charge' THEN
        -- The charge carries the absolute refunded total: take it when it says more than we know.
        UPDATE pay.payments p
        SET amount_refunded = least(greatest(p.amount_refunded, coalesce((v_object ->> 'amount_refunded')::bigint, 0)),
                                    greatest(p.amount, p.amount_received)),
            updated_at = now()
        WHERE p.id = p_payment_id AND p.amount_refunded < coalesce((v_object ->> 'amount_refunded')::bigint, 0);
        IF FOUND THEN
            PERFORM pay._audit(p_payment_id, v_payment.status, v_payment.status,
                'charge refunded: ' || (v_object ->> 'amount_refunded') || ' of ' || (v_object ->> 'amount'), v_event_id);
            outcome := 'applied';
        ELSE
            outcome := 'unchanged';
        END IF;
    ELSIF v_type LIKE 'charge.dispute.%' AND v_object ->> 'object' = 'dispute' THEN
        UPDATE pay.payments p SET disputed = true, updated_at = now() WHERE p.id = p_payment_id AND NOT p.disputed;
        PERFORM pay._audit(p_payment_id, v_payment.status, v_payment.status,
            v_type || ' (' || coalesce(v_object ->> 'reason', 'no reason') || ', ' || coalesce(v_object ->> 'status', '') || ')',
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

-- Stores an event once and applies it: one write of the event row, with its outcome. Returns a
-- NULL outcome when the event id was seen before.
--
-- Dedup without a second write: every event about a payment first takes that payment's row lock,
-- so two deliveries of one event serialise there and the second finds the first's row. Events
-- about no payment go straight to the insert, where the primary key does the same job.
CREATE FUNCTION pay._store_and_apply_event(p_payload text, p_event jsonb, p_source text,
    OUT outcome text, OUT payment_id uuid, OUT detail text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_event_id text := p_event ->> 'id';
    v_payment pay.payments;
    v_applied record;
BEGIN
    v_payment := pay._lock_payment_for_event(p_event);
    payment_id := v_payment.id;
    IF payment_id IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM pay.webhook_events e WHERE e.event_id = v_event_id) THEN
            PERFORM pay._count_duplicate(v_event_id);
            outcome := NULL;
            payment_id := NULL;
            RETURN;
        END IF;
        v_applied := pay._apply_event(p_event, v_payment);
        outcome := v_applied.outcome;
        detail := v_applied.detail;
    ELSE
        outcome := 'stored';
        detail := 'not about a pgpay payment';
    END IF;
    INSERT INTO pay.webhook_events (event_id, type, payload, stripe_created, livemode, outcome, payment_id, detail, source)
    VALUES (v_event_id, p_event ->> 'type', p_payload,
            CASE WHEN p_event ->> 'created' ~ '^[0-9]{1,12}$' THEN (p_event ->> 'created')::bigint END,
            CASE WHEN jsonb_typeof(p_event -> 'livemode') = 'boolean' THEN (p_event ->> 'livemode')::boolean END,
            outcome, payment_id, detail, p_source)
    ON CONFLICT (event_id) DO NOTHING;
    IF NOT FOUND THEN
        IF payment_id IS NOT NULL THEN
            -- Cannot happen under the payment lock; if it ever does, undo the apply (the caller
            -- answers 5xx and Stripe's retry finds the event).
            RAISE EXCEPTION 'event % was stored concurrently while its payment was locked', v_event_id
                USING ERRCODE = 'serialization_failure';
        END IF;
        PERFORM pay._count_duplicate(v_event_id);
        outcome := NULL;
        payment_id := NULL;
    END IF;
END;
$$;

CREATE FUNCTION pay._count_duplicate(p_event_id text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE pay.webhook_events e
    SET duplicate_deliveries = e.duplicate_deliveries + 1, last_duplicate_at = now()
    WHERE e.event_id = p_event_id;
END;
$$;

CREATE FUNCTION pay.ingest_webhook(payload text, signature_header text)
RETURNS TABLE (status text, http_status int, event_id text, detail text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v_secrets text[];
    v_failure text;
    v_event jsonb;
    v_event_id text;
    v_result record;
BEGIN
    SELECT array_agg(s.secret ORDER BY s.id DESC) INTO v_secrets
    FROM pay.webhook_secrets s
    WHERE s.revoked_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now());
    IF v_secrets IS NULL THEN
        -- Not the sender's fault: answer 5xx so Stripe keeps the event and retries.
        RAISE EXCEPTION 'ingest_webhook: no live webhook secret is configured'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add the endpoint''s signing secret with pay.add_webhook_secret.';
    END IF;
    IF payload IS NULL THEN
        PERFORM pay._count_rejection('missing_payload');
        RETURN QUERY SELECT 'rejected'::text, 400, NULL::text, 'missing_payload: no request body'::text;
        RETURN;
    END IF;
    v_failure := pay._stripe_signature_failure(payload, signature_header, v_secrets, 300,
                                               floor(extract(epoch FROM clock_timestamp()))::bigint);
    IF v_failure IS NOT NULL THEN
        PERFORM pay._count_rejection(v_failure);
        RETURN QUERY SELECT 'rejected'::text, 400, NULL::text, v_failure;
        RETURN;
    END IF;
    BEGIN
        v_event := payload::jsonb;
    EXCEPTION WHEN others THEN
        v_event := NULL;
    END;
    v_event_id := v_event ->> 'id';
    IF jsonb_typeof(v_event) IS DISTINCT FROM 'object' OR v_event ->> 'object' IS DISTINCT FROM 'event'
       OR v_event_id IS NULL OR length(v_event_id) > 255 OR v_event ->> 'type' IS NULL THEN
        PERFORM pay._count_rejection('not_an_event');
        RETURN QUERY SELECT 'rejected'::text, 400, NULL::text, 'not_an_event: signed, but not a Stripe event object'::text;
        RETURN;
    END IF;
    v_result := pay._store_and_apply_event(payload, v_event, 'webhook');
    IF v_result.outcome IS NULL THEN
        RETURN QUERY SELECT 'duplicate'::text, 200, v_event_id, 'already received'::text;
    ELSIF v_result.outcome = 'stored' THEN
        RETURN QUERY SELECT 'stored'::text, 200, v_event_id, v_result.detail;
    ELSE
        RETURN QUERY SELECT 'applied'::text, 200, v_event_id, v_result.detail;
    END IF;
END;
$$;

-- For HTTP-to-SQL layers that can only INSERT: a rejected delivery raises (the layer answers 4xx);
-- an accepted one is stored in pay.webhook_events only, so the inbox keeps no second copy.
CREATE TABLE pay.webhook_inbox (
    payload           text NOT NULL,
    signature_header  text
);

CREATE FUNCTION pay._webhook_inbox_ingest() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM pay.ingest_webhook(NEW.payload, NEW.signature_header);
    IF v.status = 'rejected' THEN
        RAISE EXCEPTION 'webhook rejected: %', v.detail
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_inbox_ingest
    BEFORE INSERT ON pay.webhook_inbox
    FOR EACH ROW EXECUTE FUNCTION pay._webhook_inbox_ingest();

-- PostgREST: a function whose one unnamed parameter is a domain named after the media type gets
-- the raw request body (PostgREST 12 media type handlers), byte for byte as Stripe signed it; the
-- header comes from the request.headers setting. POST /rpc/stripe_webhook.
CREATE DOMAIN pay."application/json" AS text;

CREATE FUNCTION pay.stripe_webhook(pay."application/json") RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM pay.ingest_webhook(
        $1::text, current_setting('request.headers', true)::jsonb ->> 'stripe-signature');
    PERFORM set_config('response.status', v.http_status::text, true);
    RETURN jsonb_build_object('status', v.status, 'event_id', v.event_id, 'detail', v.detail);
END;
$$;
