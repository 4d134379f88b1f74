-- pgpay schema: payments, their outbox commands and the audit log.
-- The payment invariants are written here as named constraints, so the database refuses a bad
-- state even if a function is wrong.

CREATE TYPE pay.payment_status AS ENUM (
    'creating',                 -- ours: no PaymentIntent yet
    'requires_payment_method',
    'requires_confirmation',
    'requires_action',
    'processing',
    'requires_capture',
    'succeeded',
    'canceled',
    'create_failed',            -- ours: Stripe refused the create
    'superseded'                -- ours: a newer attempt of the same order replaced this one
);

-- A column's own rule that holds from the moment its value is written is a domain, not a table
-- CHECK. PostgreSQL re-reads and re-prepares every CHECK of a table on every UPDATE, whichever
-- columns change; a domain's check runs only when a value is written into its column. Payments and
-- outbox commands are updated at every state change, so this is measurable (callgrind: the four
-- single-column CHECKs that used to be on pay.payments were 5 % of a webhook's CPU). Rules that
-- relate two columns stay table CHECKs below, named for what they guard.
CREATE DOMAIN pay.attempt_number AS int
    CONSTRAINT attempt_number_positive CHECK (VALUE > 0);
CREATE DOMAIN pay.stripe_amount AS bigint
    CONSTRAINT stripe_amount_in_range CHECK (VALUE > 0 AND VALUE <= 99999999);
CREATE DOMAIN pay.currency_code AS text
    CONSTRAINT currency_code_shape CHECK (VALUE ~ '^[a-z]{3}$');
CREATE DOMAIN pay.json_object AS jsonb
    CONSTRAINT json_object_is_object CHECK (jsonb_typeof(VALUE) = 'object');
CREATE DOMAIN pay.outbox_kind AS text
    CONSTRAINT outbox_kind_known CHECK (VALUE IN ('create_payment_intent', 'cancel_payment_intent', 'refund',
                                                  'create_checkout_session', 'expire_checkout_session',
                                                  'create_subscription_session', 'update_subscription',
                                                  'cancel_subscription'));
-- payment_intent: the app confirms a PaymentIntent on its own page (client_secret); session: the
-- customer is sent to a hosted Stripe Checkout Session (checkout_url).
CREATE DOMAIN pay.checkout_mode AS text
    CONSTRAINT checkout_mode_known CHECK (VALUE IN ('payment_intent', 'session'));
CREATE DOMAIN pay.idempotency_key_text AS text
    CONSTRAINT idempotency_key_shape CHECK (length(VALUE) BETWEEN 1 AND 255);
CREATE DOMAIN pay.stripe_request AS jsonb
    CONSTRAINT stripe_request_shape CHECK (
        VALUE ? 'method' AND VALUE ? 'path' AND jsonb_typeof(VALUE -> 'params') = 'object');

-- One row per order: the lock that serialises every checkout call for an order_ref, taken even
-- before the order's first payment exists.
CREATE TABLE pay.orders (
    order_ref   text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pay.payments (
    id                        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_ref                 text NOT NULL REFERENCES pay.orders (order_ref),
    attempt                   pay.attempt_number NOT NULL,
    amount                    pay.stripe_amount NOT NULL,
    currency                  pay.currency_code NOT NULL,
    status                    pay.payment_status NOT NULL DEFAULT 'creating',
    stripe_payment_intent_id  text,
    client_secret             text,
    customer_ref              text,
    metadata                  pay.json_object NOT NULL DEFAULT '{}',
    description               text,
    -- Key of the checkout's parameters: the same call again is recognised by it.
    params_fingerprint        text NOT NULL,
    -- Stripe time (unix seconds) of the newest evidence applied to `status`.
    status_evidence_at        bigint,
    amount_received           bigint NOT NULL DEFAULT 0,
    amount_refunded           bigint NOT NULL DEFAULT 0,
    disputed                  boolean NOT NULL DEFAULT false,
    -- Why a human must look at this payment (amount mismatch, a second charge for one order, ...).
    flagged_reason            text,
    last_error                jsonb,
    -- Deferred: the successor is written after its predecessor gives up its live slot.
    superseded_by             uuid REFERENCES pay.payments (id) DEFERRABLE INITIALLY DEFERRED,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    -- The refunded total the charge itself last reported (charge.refunded), and its Stripe time:
    -- see pay._derive_amount_refunded.
    refunded_per_charge       bigint NOT NULL DEFAULT 0,
    refunded_per_charge_at    bigint,
    -- The hash of the payment's newest audit row: the head of its chain (pay.verify_audit_log).
    audit_head                bytea,
    -- Session mode: the hosted Checkout Session, the URL to send the customer to and when it
    -- expires. Its PaymentIntent, once Stripe makes one, is stripe_payment_intent_id.
    mode                      pay.checkout_mode NOT NULL DEFAULT 'payment_intent',
    stripe_checkout_session_id text,
    checkout_url              text,
    checkout_expires_at       timestamptz,
    CONSTRAINT payments_attempt_unique UNIQUE (order_ref, attempt),
    CONSTRAINT payments_payment_intent_unique UNIQUE (stripe_payment_intent_id),
    CONSTRAINT payments_checkout_session_unique UNIQUE (stripe_checkout_session_id),
    CONSTRAINT payments_refund_within_amount CHECK (amount_refunded >= 0 AND amount_refunded <= greatest(amount, amount_received)),
    CONSTRAINT payments_intent_once_known CHECK (status IN ('creating', 'create_failed', 'superseded', 'canceled')
        OR stripe_payment_intent_id IS NOT NULL OR stripe_checkout_session_id IS NOT NULL),
    CONSTRAINT payments_superseded_has_successor CHECK ((status = 'superseded') = (superseded_by IS NOT NULL))
);

-- A subscription: one row per subscription_ref (the application's own id for what is subscribed:
-- an account, a seat). Its sign-up is a subscription-mode Checkout Session; from then on it
-- mirrors Stripe's subscription through one rule (pgpay-core's subscription::decide, applied by
-- pay._apply_billing_object in sql/13_subscription_evidence.sql).
CREATE TABLE IF NOT EXISTS pay.subscriptions (
    id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    subscription_ref            text NOT NULL,
    -- What the application asked for, then what Stripe's subscription item says.
    price                       text NOT NULL,
    quantity                    int NOT NULL,
    customer_ref                text,
    metadata                    pay.json_object NOT NULL DEFAULT '{}',
    success_url                 text,
    cancel_url                  text,
    -- Stripe's status; NULL until Stripe has a subscription.
    status                      text,
    checkout_status             text,
    stripe_checkout_session_id  text,
    checkout_url                text,
    checkout_expires_at         timestamptz,
    stripe_subscription_id      text,
    stripe_subscription_item_id text,
    stripe_customer_id          text,
    current_period_start        timestamptz,
    current_period_end          timestamptz,
    cancel_at_period_end        boolean NOT NULL DEFAULT false,
    canceled_at                 timestamptz,
    -- Stripe time of the newest evidence applied to `status`.
    evidence_at                 timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    -- When the subscription became past_due (the Stripe time of that evidence): the grace period
    -- of pay.entitlements counts from here.
    past_due_since              timestamptz,
    -- Key of begin_subscription's arguments: the same call again is recognised by it.
    params_fingerprint          text NOT NULL,
    -- Sign-up attempts: a checkout that expired (or that Stripe refused) may begin again.
    checkout_attempt            int NOT NULL DEFAULT 1,
    last_error                  jsonb,
    flagged_reason              text,
    -- The hash of the subscription's newest audit row (pay.verify_audit_log).
    audit_head                  bytea,
    CONSTRAINT subscriptions_ref_unique UNIQUE (subscription_ref),
    CONSTRAINT subscriptions_stripe_subscription_unique UNIQUE (stripe_subscription_id),
    CONSTRAINT subscriptions_checkout_session_unique UNIQUE (stripe_checkout_session_id),
    CONSTRAINT subscriptions_status_known CHECK (status IN (
        'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'unpaid', 'paused', 'canceled')),
    CONSTRAINT subscriptions_checkout_status_known CHECK (checkout_status IN ('open', 'complete', 'expired', 'create_failed')),
    CONSTRAINT subscriptions_quantity_not_negative CHECK (quantity >= 0),
    CONSTRAINT subscriptions_checkout_attempt_positive CHECK (checkout_attempt > 0),
    CONSTRAINT subscriptions_past_due_has_since CHECK ((status IS NOT DISTINCT FROM 'past_due') = (past_due_since IS NOT NULL))
);

-- At most one live attempt per order: a new attempt needs the old one superseded (or finished).
CREATE UNIQUE INDEX payments_one_live_attempt_per_order ON pay.payments (order_ref)
    WHERE status NOT IN ('superseded', 'canceled', 'create_failed');
-- At most one succeeded attempt per order that is not being refunded as a double charge.
CREATE UNIQUE INDEX payments_one_kept_success_per_order ON pay.payments (order_ref)
    WHERE status = 'succeeded';
-- Open payments by age, for pay.stuck_payments; finished payments leave the index.
CREATE INDEX payments_open_by_update ON pay.payments (updated_at)
    WHERE status NOT IN ('succeeded', 'canceled', 'create_failed', 'superseded');

CREATE TABLE pay.outbox (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The payment a command is for; NULL for a subscription's command (subscription_id).
    payment_id        uuid REFERENCES pay.payments (id),
    kind              pay.outbox_kind NOT NULL,
    idempotency_key   pay.idempotency_key_text NOT NULL,
    request           pay.stripe_request NOT NULL,
    -- waiting: needs the PaymentIntent (or Checkout Session) id, which the create command has not
    -- brought back yet.
    status            text NOT NULL DEFAULT 'pending',
    attempts          int NOT NULL DEFAULT 0,
    run_after         timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_expires     timestamptz,
    last_http_status  int,
    last_error        text,
    response          jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    first_attempt_at  timestamptz,
    completed_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- A subscription's command.
    subscription_id   uuid REFERENCES pay.subscriptions (id),
    CONSTRAINT outbox_idempotency_key_unique UNIQUE (idempotency_key),
    CONSTRAINT outbox_one_subject CHECK ((payment_id IS NULL) <> (subscription_id IS NULL)),
    CONSTRAINT outbox_status_known CHECK (status IN ('waiting', 'pending', 'in_flight', 'done', 'dead', 'skipped')),
    CONSTRAINT outbox_in_flight_has_lease CHECK (
        (status = 'in_flight') = (lease_owner IS NOT NULL AND lease_expires IS NOT NULL)),
    CONSTRAINT outbox_finished_has_completed_at CHECK (
        (status IN ('done', 'dead', 'skipped')) = (completed_at IS NOT NULL)),
    CONSTRAINT outbox_attempted_has_first_attempt CHECK ((attempts = 0) = (first_attempt_at IS NULL))
);

-- One create command per payment: a payment's PaymentIntent is asked for exactly once.
CREATE UNIQUE INDEX outbox_one_create_per_payment ON pay.outbox (payment_id)
    WHERE kind = 'create_payment_intent';
-- Likewise its Checkout Session.
CREATE UNIQUE INDEX outbox_one_session_create_per_payment ON pay.outbox (payment_id)
    WHERE kind = 'create_checkout_session';
CREATE INDEX outbox_due ON pay.outbox (run_after, id) WHERE status = 'pending';
CREATE INDEX outbox_leases ON pay.outbox (lease_expires) WHERE status = 'in_flight';
-- Open commands by payment (waiting commands to release, stuck payments' open work). Finished
-- commands leave it, so completing a command rewrites one index fewer.
CREATE INDEX outbox_open_by_payment ON pay.outbox (payment_id) WHERE status IN ('waiting', 'pending', 'in_flight');
CREATE INDEX outbox_refunds_by_payment ON pay.outbox (payment_id) WHERE kind = 'refund';

CREATE TABLE pay.audit_log (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- A payment's row, or (payment_id NULL) a subscription's: subscription_id.
    payment_id       uuid REFERENCES pay.payments (id),
    from_status      pay.payment_status,
    to_status        pay.payment_status,
    -- What the evidence asked for, when it was not applied (to_status then equals from_status).
    proposed_status  text,
    cause            text NOT NULL,
    evidence_id      text,
    actor            text NOT NULL DEFAULT session_user,
    at               timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Tamper evidence, set by the trigger audit_log_chain whatever the inserter passes: a chain per
    -- payment (no global serialisation point), each row's hash covering its content and the hash of
    -- the payment's previous row (pay._audit_row_hash, checked by pay.verify_audit_log).
    prev_hash        bytea,
    hash             bytea NOT NULL,
    -- A subscription's row: its status before
    -- and after, as Stripe names them (NULL before Stripe reported one).
    subscription_id  uuid REFERENCES pay.subscriptions (id),
    from_state       text,
    to_state         text,
    CONSTRAINT audit_log_one_subject CHECK ((payment_id IS NULL) <> (subscription_id IS NULL)),
    CONSTRAINT audit_log_payment_row_has_status CHECK (payment_id IS NULL OR to_status IS NOT NULL)
);
CREATE INDEX audit_log_by_payment ON pay.audit_log (payment_id, id);
CREATE INDEX IF NOT EXISTS audit_log_by_subscription ON pay.audit_log (subscription_id, id) WHERE subscription_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_open_by_subscription ON pay.outbox (subscription_id)
    WHERE subscription_id IS NOT NULL AND status IN ('waiting', 'pending', 'in_flight');

-- Search path: every SECURITY DEFINER entry point pins search_path (pg_catalog, pay, pg_temp
-- last). Internal helpers (pay._*) are callable by the owner only, schema-qualify every name and
-- run under the entry point's pinned path; they carry no SET clause because a function-level SET
-- costs a GUC save/restore and a search-path recomputation on every call (measured on ingest).

-- Input sizes. A Rust allocation that fails aborts the backend, and the postmaster then restarts
-- every session of the cluster; so no jsonb reaches Rust (which parses it as text) before its size
-- was checked here, on jsonb's own binary form first: a 2 MB jsonb of big numbers is 120 MB of
-- text. Numbers beyond 1e30 in magnitude (or nonzero below 1e-30) are refused for the same reason:
-- one stored in a few bytes can print as 131,072 digits. Stripe's own limits are far smaller than
-- the ones callers pass here. Nesting is bounded too: Rust reads a jsonb argument with serde_json,
-- which stops at 128 levels with an error PostgreSQL would report as an internal one (XX000); no
-- Stripe object comes near it. Raises 22023 naming the field; returns the value's text, for Rust.
CREATE FUNCTION pay._bounded_json_text(p_value jsonb, p_field text, p_max_bytes int) RETURNS text
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
    -- Level 0 is the value itself: an array or object at level 100 is the 101st one nested.
    IF jsonb_path_exists(p_value, 'strict $.**{100 to last} ? (@.type() == "array" || @.type() == "object")') THEN
        RAISE EXCEPTION '% is nested deeper than 100 levels', p_field
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
