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

-- Backends keep the secrets in memory between deliveries (extension/src/secrets.rs); every change
-- makes them drop that copy before their next transaction.
CREATE TRIGGER webhook_secrets_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pay.webhook_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION pay._webhook_secrets_changed();

CREATE TABLE pay.webhook_events (
    event_id            text PRIMARY KEY,
    type                text NOT NULL,
    -- The raw body exactly as signed, for replay and proof.
    payload             text NOT NULL,
    stripe_created      bigint,
    livemode            boolean,
    received_at         timestamptz NOT NULL DEFAULT now(),
    -- applied | ignored | flagged | unchanged | stored (nothing to apply) | quarantined | deferred
    outcome             text NOT NULL,
    payment_id          uuid,
    detail              text,
    -- webhook (signed delivery) or api (events list, replayed by reconciliation)
    source              text NOT NULL DEFAULT 'webhook',
    duplicate_deliveries int NOT NULL DEFAULT 0,
    last_duplicate_at   timestamptz,
    -- The safety net (sql/11_safety.sql): when the event was first held back (quarantined or
    -- deferred; never cleared, so the anomaly rules keep the history), how often applying it
    -- failed and how, and its replays.
    held_at             timestamptz,
    failures            int NOT NULL DEFAULT 0,
    last_error          text,
    last_sqlstate       text,
    failed_at           timestamptz,
    replays             int NOT NULL DEFAULT 0,
    replayed_at         timestamptz
) WITH (fillfactor = 90);  -- room for HOT updates of the duplicate counters
-- Only the primary key: every index here is paid for by every delivery.

-- lz4 compresses a 2.5 KB event several times faster than the default pglz, which was a tenth of
-- an ingest's CPU (measured with callgrind). A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE pay.webhook_events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'pgpay: this server has no lz4; webhook payloads are compressed with pglz';
END;
$$;

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

-- The payment an object speaks of is found by pay._payment_for (extension/src/lookup.rs), for
-- webhooks and reconciliation alike.

-- Applies one Stripe event that is not a payment_intent.* event about payment p_payment (locked by
-- the caller). Returns the outcome (applied, unchanged, stored) and a detail. payment_intent.*
-- events go straight to the transition rule (extension/src/webhook.rs).
CREATE FUNCTION pay._apply_event(p_event jsonb, p_payment pay.payments, OUT outcome text, OUT detail text)
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

-- pay.ingest_webhook (verify, parse, store once, apply) and pay._store_and_apply_event are written
-- in Rust: extension/src/webhook.rs.

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
