-- The safety net: quarantine, per-event-type circuit breakers, replay, anomalies.
-- (Fulfillment retries are in sql/07_fulfillment.sql.)

-- Held-back events (quarantined or deferred, now or once): what pay.replay_events and the anomaly
-- rules read. Partial, so an ordinary delivery adds no index entry.
CREATE INDEX webhook_events_held ON pay.webhook_events (held_at) WHERE held_at IS NOT NULL;
-- Time ranges of deliveries, checkouts and successes, for pay.anomalies. BRIN: a few bytes per
-- 128 pages, and an insert into a range not yet summarised costs a look at the range map only
-- (measured on scripts/bench-ingest, README "Anomalies").
CREATE INDEX webhook_events_received_brin ON pay.webhook_events USING brin (received_at);
CREATE INDEX payments_created_brin ON pay.payments USING brin (created_at);
CREATE INDEX fulfillments_created_brin ON pay.fulfillments USING brin (created_at);
-- Flagged payments by when they last changed (pay.anomalies: flagged in the last hour).
CREATE INDEX payments_flagged_by_update ON pay.payments (updated_at) WHERE flagged_reason IS NOT NULL;

-- Quarantined events: signed, well-formed, and applying them raised. Stored with the error,
-- answered 200; pay.replay_events applies them once the cause is fixed.
CREATE VIEW pay.quarantined_events AS
    SELECT e.event_id, e.type, e.payment_id, e.stripe_created, e.received_at, e.failures,
           e.last_error, e.last_sqlstate, e.failed_at, e.replays, e.replayed_at, e.detail
    FROM pay.webhook_events e
    WHERE e.held_at IS NOT NULL AND e.outcome = 'quarantined';

-- One row per event type that ever failed. closed: applied as usual; open: its events are
-- stored `deferred`, not applied; half_open: one event is being tried (visible only to the
-- transaction trying it: a crash leaves the type open).
CREATE TABLE pay.event_type_health (
    event_type         text PRIMARY KEY,
    state              text NOT NULL DEFAULT 'closed',
    -- Failures in the window that started at window_started_at (pay.breaker_window).
    failures           int NOT NULL DEFAULT 0,
    window_started_at  timestamptz,
    last_error         text,
    last_sqlstate      text,
    last_failure_at    timestamptz,
    opened_at          timestamptz,
    probe_started_at   timestamptz,
    -- Why the state last changed (opened after N failures, probe applied, reset by whom, replay).
    last_change        text,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_type_health_state_known CHECK (state IN ('closed', 'open', 'half_open')),
    CONSTRAINT event_type_health_open_has_opened_at CHECK ((state = 'closed') = (opened_at IS NULL))
);

-- Backends keep "no breaker is open" in memory, so an event costs no lookup while every type is
-- closed (extension/src/breaker.rs); every change makes them drop that copy before their next
-- transaction. ALWAYS: also under session_replication_role = replica (a hand edit, a restore).
CREATE TRIGGER event_type_health_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pay.event_type_health
    FOR EACH STATEMENT EXECUTE FUNCTION pay._event_type_health_changed();
ALTER TABLE pay.event_type_health ENABLE ALWAYS TRIGGER event_type_health_changed;

-- The breaker's settings, validated (a bad value names the setting):
--   pay.breaker_failures  failures of one type within the window that open it (default 5)
--   pay.breaker_window    the window (default 1 minute)
--   pay.breaker_cooldown  how long an open breaker waits before one half-open try (default 1 minute)
CREATE FUNCTION pay._breaker_settings(OUT failures int, OUT window_length interval, OUT cooldown interval)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_name text;
    v text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['breaker_failures', 'breaker_window', 'breaker_cooldown'] LOOP
        v := nullif(current_setting('pay.' || v_name, true), '');
        BEGIN
            CASE v_name
                WHEN 'breaker_failures' THEN
                    failures := coalesce(v, '5')::int;
                    IF failures < 1 THEN RAISE invalid_parameter_value; END IF;
                WHEN 'breaker_window' THEN
                    window_length := coalesce(v, '1 minute')::interval;
                    IF window_length <= interval '0' THEN RAISE invalid_parameter_value; END IF;
                ELSE
                    cooldown := coalesce(v, '1 minute')::interval;
                    IF cooldown < interval '0' THEN RAISE invalid_parameter_value; END IF;
            END CASE;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'setting pay.% = % is not valid', v_name, v
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = CASE WHEN v_name = 'breaker_failures' THEN 'a whole number of at least 1'
                                  ELSE 'an interval such as ''1 minute''' END;
        END;
    END LOOP;
END;
$$;

-- Called from ingest (extension/src/breaker.rs) for an event whose type is not closed: 'probe'
-- when the breaker has been open for pay.breaker_cooldown (this event is the one half-open
-- try), 'closed' when it closed meanwhile, else 'defer'.
CREATE FUNCTION pay._breaker_admit(p_event_type text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_state text;
BEGIN
    UPDATE pay.event_type_health h
    SET state = 'half_open', probe_started_at = now(), updated_at = now()
    WHERE h.event_type = p_event_type AND h.state = 'open'
      AND h.opened_at <= now() - (pay._breaker_settings()).cooldown;
    IF FOUND THEN
        RETURN 'probe';
    END IF;
    -- Another transaction may just have closed it (its probe applied).
    SELECT h.state INTO v_state FROM pay.event_type_health h WHERE h.event_type = p_event_type;
    RETURN CASE WHEN v_state IS NULL OR v_state = 'closed' THEN 'closed' ELSE 'defer' END;
END;
$$;

-- Counts a failed application of an event of type p_event_type. Opens the breaker after
-- pay.breaker_failures failures within pay.breaker_window; a failed probe opens it again (its
-- cooldown starts over). Returns the state.
CREATE FUNCTION pay._breaker_failure(p_event_type text, p_sqlstate text, p_error text, p_probe boolean)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    s record := pay._breaker_settings();
    v pay.event_type_health;
    v_failures int;
BEGIN
    INSERT INTO pay.event_type_health (event_type) VALUES (p_event_type) ON CONFLICT (event_type) DO NOTHING;
    SELECT * INTO v FROM pay.event_type_health h WHERE h.event_type = p_event_type FOR UPDATE;
    v_failures := CASE WHEN v.window_started_at IS NULL OR v.window_started_at <= now() - s.window_length
                       THEN 1 ELSE v.failures + 1 END;
    UPDATE pay.event_type_health h
    SET failures = v_failures,
        window_started_at = CASE WHEN v_failures = 1 THEN now() ELSE h.window_started_at END,
        last_error = left(p_error, 2000), last_sqlstate = p_sqlstate, last_failure_at = now(),
        state = CASE WHEN p_probe OR h.state <> 'closed' OR v_failures >= s.failures THEN 'open' ELSE 'closed' END,
        opened_at = CASE WHEN p_probe OR (h.state = 'closed' AND v_failures >= s.failures) THEN now()
                         ELSE h.opened_at END,
        probe_started_at = NULL,
        last_change = CASE WHEN p_probe THEN 'the half-open probe failed: open again'
                           WHEN h.state = 'closed' AND v_failures >= s.failures
                           THEN 'opened after ' || v_failures || ' failures within ' || s.window_length
                           ELSE h.last_change END,
        updated_at = now()
    WHERE h.event_type = p_event_type
    RETURNING h.state INTO v.state;
    RETURN v.state;
END;
$$;

-- Closes the breaker of p_event_type (a probe or a replay applied, or a DBA reset it).
-- Returns whether it was not closed.
CREATE FUNCTION pay._breaker_close(p_event_type text, p_why text) RETURNS boolean
LANGUAGE sql
AS $$
    WITH closed AS (
        UPDATE pay.event_type_health h
        SET state = 'closed', failures = 0, window_started_at = NULL, opened_at = NULL,
            probe_started_at = NULL, last_change = p_why, updated_at = now()
        WHERE h.event_type = p_event_type AND h.state <> 'closed'
        RETURNING 1
    )
    SELECT count(*) > 0 FROM closed;
$$;

-- Closes an event type's breaker by hand: its next events are applied again. Events it
-- deferred stay deferred until pay.replay_events applies them.
CREATE FUNCTION pay.reset_event_type(event_type text) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT pay._breaker_close(reset_event_type.event_type, 'reset by ' || session_user);
$$;

-- Applies stored events again, in Stripe's order (created, then id), through the same transition
-- rule as a delivery: the quarantined and deferred ones, or with include_applied every stored
-- event (after a business rule changed). Filters: one event type, events received since a time.
-- Idempotent: an event already reflected changes nothing. A type whose replayed events all
-- applied (at least one) gets its breaker closed. Infrastructure failures raise (nothing of
-- the call stays); an event that fails again stays quarantined, with one more failure.
CREATE FUNCTION pay.replay_events(event_type text DEFAULT NULL, since timestamptz DEFAULT NULL,
                                  include_applied boolean DEFAULT false)
RETURNS TABLE (event_id text, outcome text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    r record;
    v record;
    v_applied text[] := '{}';
    v_failed text[] := '{}';
    v_type text;
BEGIN
    FOR r IN
        SELECT e.event_id, e.type FROM pay.webhook_events e
        WHERE (include_applied OR (e.held_at IS NOT NULL AND e.outcome IN ('quarantined', 'deferred')))
          AND (replay_events.event_type IS NULL OR e.type = replay_events.event_type)
          AND (replay_events.since IS NULL OR e.received_at >= replay_events.since)
        ORDER BY e.stripe_created NULLS LAST, e.event_id
    LOOP
        SELECT * INTO v FROM pay._replay_event(r.event_id, coalesce(include_applied, false));
        CONTINUE WHEN v.outcome = 'skipped';
        IF v.outcome IN ('quarantined', 'deferred') THEN
            v_failed := v_failed || r.type;
        ELSE
            v_applied := v_applied || r.type;
        END IF;
        event_id := r.event_id;
        outcome := v.outcome;
        RETURN NEXT;
    END LOOP;
    FOR v_type IN SELECT DISTINCT t FROM unnest(v_applied) t WHERE t <> ALL (v_failed) LOOP
        PERFORM pay._breaker_close(v_type, 'closed by a successful replay');
    END LOOP;
END;
$$;

-- Rejected deliveries by minute (pay.webhook_rejections counts by day): what the burst rule of
-- pay.anomalies compares. Filled by a trigger, so ingest is unchanged; kept for two days.
CREATE TABLE pay.webhook_rejections_by_minute (
    minute  timestamptz NOT NULL,
    reason  text NOT NULL,
    count   bigint NOT NULL,
    PRIMARY KEY (minute, reason)
);

CREATE FUNCTION pay._count_rejection_by_minute() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pay.webhook_rejections_by_minute AS m (minute, reason, count)
    VALUES (date_trunc('minute', NEW.last_at), NEW.reason,
            NEW.count - CASE WHEN TG_OP = 'UPDATE' THEN OLD.count ELSE 0 END)
    ON CONFLICT (minute, reason) DO UPDATE SET count = m.count + excluded.count;
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_rejections_by_minute
    AFTER INSERT OR UPDATE ON pay.webhook_rejections
    FOR EACH ROW EXECUTE FUNCTION pay._count_rejection_by_minute();

-- What looks wrong now, each kind with its rule (README, "Anomalies"):
--   error_rate_spike  per event type: held back (quarantined or deferred) in the last 5 minutes,
--                     k of n, against the trailing 24 hours' rate p0 = (K + 1) / (N + 100);
--                     P(X >= k | Binomial(n, p0)) < 1e-4
--   silence           no success applied since t_last while n checkouts (older than 5 minutes)
--                     were created; conversion c = S / (C + 1) over the 24 hours before t_last;
--                     P(0 | Poisson(c n)) = exp(-c n) < 0.001
--   rejection_burst   rejected deliveries in the last 5 minutes, k, against the trailing 24
--                     hours' rate per 5 minutes λ = (R + 1) / 288; k >= 10 and
--                     P(X >= k | Poisson(λ)) < 1e-4
--   outbox_lag        the oldest due pending command has waited more than 5 minutes
--   retry_storm       per command kind: an open command on its 5th attempt or later
--   flagged_payments  payments flagged (amount or currency mismatch, a second charge, ...) and
--                     changed in the last hour
-- score: -log10 of the tail probability for the statistical kinds; for the others the observed
-- value over its threshold. observed and expected are in the kind's own unit (a rate, a count,
-- seconds or attempts).
CREATE VIEW pay.anomalies AS
WITH spike_types AS (
    SELECT e.type, count(*) AS held, min(e.held_at) AS since
    FROM pay.webhook_events e
    WHERE e.held_at IS NOT NULL AND e.held_at > now() - interval '5 minutes'
    GROUP BY e.type
), spike AS (
    SELECT t.type, t.held AS k, t.since,
           (SELECT count(*) FROM pay.webhook_events e
            WHERE e.type = t.type AND e.received_at > now() - interval '5 minutes') AS n,
           (SELECT count(*) FROM pay.webhook_events e
            WHERE e.type = t.type AND e.held_at IS NOT NULL
              AND e.held_at > now() - interval '24 hours 5 minutes' AND e.held_at <= now() - interval '5 minutes') AS hist_k,
           (SELECT count(*) FROM pay.webhook_events e
            WHERE e.type = t.type AND e.received_at > now() - interval '24 hours 5 minutes'
              AND e.received_at <= now() - interval '5 minutes') AS hist_n
    FROM spike_types t
), spike_tested AS (
    SELECT s.*, (s.hist_k + 1)::float8 / (s.hist_n + 100) AS p0,
           pay._binomial_upper_tail(s.k, greatest(s.n, s.k), (s.hist_k + 1)::float8 / (s.hist_n + 100)) AS tail
    FROM spike s
), last_success AS (
    SELECT max(f.created_at) AS at FROM pay.fulfillments f WHERE f.created_at > now() - interval '48 hours'
), silence AS (
    SELECT l.at,
           (SELECT count(*) FROM pay.fulfillments f
            WHERE f.created_at > l.at - interval '24 hours' AND f.created_at <= l.at) AS successes,
           (SELECT count(*) FROM pay.payments p
            WHERE p.created_at > l.at - interval '24 hours' AND p.created_at <= l.at) AS checkouts,
           (SELECT count(*) FROM pay.payments p
            WHERE p.created_at > l.at AND p.created_at <= now() - interval '5 minutes') AS since_checkouts
    FROM last_success l
    WHERE l.at IS NOT NULL
), silence_tested AS (
    SELECT s.*, s.successes::float8 / (s.checkouts + 1) * s.since_checkouts AS lambda
    FROM silence s
), rejections AS (
    SELECT coalesce(sum(m.count) FILTER (WHERE m.minute > now() - interval '5 minutes'), 0)::bigint AS k,
           coalesce(sum(m.count) FILTER (WHERE m.minute <= now() - interval '5 minutes'), 0)::bigint AS hist,
           min(m.minute) FILTER (WHERE m.minute > now() - interval '5 minutes') AS since,
           string_agg(DISTINCT m.reason, ', ') FILTER (WHERE m.minute > now() - interval '5 minutes') AS reasons
    FROM pay.webhook_rejections_by_minute m
    WHERE m.minute > now() - interval '24 hours 5 minutes'
), rejections_tested AS (
    SELECT r.*, (r.hist + 1)::float8 / 288 AS lambda,
           pay._poisson_upper_tail(r.k, (r.hist + 1)::float8 / 288) AS tail
    FROM rejections r
), lag AS (
    SELECT min(o.run_after) AS oldest FROM pay.outbox o WHERE o.status = 'pending' AND o.run_after <= now()
), storms AS (
    SELECT o.kind::text AS kind, max(o.attempts) AS attempts, count(*) AS commands, min(o.first_attempt_at) AS since
    FROM pay.outbox o
    WHERE o.status IN ('pending', 'in_flight') AND o.attempts >= 5
    GROUP BY o.kind
), flagged AS (
    SELECT count(*) AS n, min(p.updated_at) AS since
    FROM pay.payments p
    WHERE p.flagged_reason IS NOT NULL AND p.updated_at > now() - interval '1 hour'
)
SELECT 'error_rate_spike'::text AS kind, t.type AS subject, t.k::float8 / greatest(t.n, t.k) AS observed,
       t.p0 AS expected, -log(greatest(t.tail, 1e-300)) AS score, t.since,
       format('%s of %s %s events held back in the last 5 minutes; %s of %s in the 24 hours before',
              t.k, greatest(t.n, t.k), t.type, t.hist_k, t.hist_n) AS detail
FROM spike_tested t WHERE t.tail < 1e-4
UNION ALL
SELECT 'silence', 'payment successes', 0, s.lambda, s.lambda / ln(10), s.at,
       format('no success applied since %s while %s checkouts were created; %s successes of %s checkouts in the 24 hours before',
              s.at, s.since_checkouts, s.successes, s.checkouts)
FROM silence_tested s WHERE exp(-s.lambda) < 0.001
UNION ALL
SELECT 'rejection_burst', 'webhook', r.k, r.lambda, -log(greatest(r.tail, 1e-300)), r.since,
       format('%s deliveries rejected in the last 5 minutes (%s); %s in the 24 hours before', r.k, r.reasons, r.hist)
FROM rejections_tested r WHERE r.k >= 10 AND r.tail < 1e-4
UNION ALL
SELECT 'outbox_lag', 'outbox', extract(epoch FROM now() - l.oldest)::float8, 300,
       extract(epoch FROM now() - l.oldest)::float8 / 300, l.oldest,
       format('the oldest due command has waited %s', date_trunc('second', now() - l.oldest))
FROM lag l WHERE l.oldest < now() - interval '5 minutes'
UNION ALL
SELECT 'retry_storm', s.kind, s.attempts, 5, s.attempts::float8 / 5, s.since,
       format('%s open %s commands on their 5th attempt or later (at most %s)', s.commands, s.kind, s.attempts)
FROM storms s
UNION ALL
SELECT 'flagged_payments', 'payments', f.n, 0, f.n, f.since,
       format('%s payments flagged in the last hour (pay.flagged_payments)', f.n)
FROM flagged f WHERE f.n > 0;

-- The anomalies the worker has seen, to log each once and NOTIFY pay_alert at most once a minute.
CREATE TABLE pay.anomaly_alerts (
    kind              text NOT NULL,
    subject           text NOT NULL,
    first_seen        timestamptz NOT NULL DEFAULT now(),
    last_seen         timestamptz NOT NULL DEFAULT now(),
    last_notified_at  timestamptz,
    PRIMARY KEY (kind, subject)
);

-- Called by the worker on its schedule: the current anomalies, whether each one is new (log it)
-- and whether it was notified now. NOTIFY pay_alert (payload: the kind only) at most once a
-- minute per anomaly; anomalies that are gone are forgotten (so they are new if they come back).
-- Also drops the per-minute rejection counts older than two days.
CREATE FUNCTION pay.check_anomalies()
RETURNS TABLE (kind text, subject text, observed float8, expected float8, score float8, since timestamptz,
               detail text, appeared boolean, notified boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
DECLARE
    a record;
    v pay.anomaly_alerts;
    v_now pay.anomalies[];
BEGIN
    DELETE FROM pay.webhook_rejections_by_minute m WHERE m.minute < now() - interval '2 days';
    v_now := ARRAY(SELECT n FROM pay.anomalies n);
    DELETE FROM pay.anomaly_alerts al
    WHERE NOT EXISTS (SELECT 1 FROM unnest(v_now) n WHERE n.kind = al.kind AND n.subject = al.subject);
    FOR a IN SELECT * FROM unnest(v_now) LOOP
        INSERT INTO pay.anomaly_alerts AS al (kind, subject) VALUES (a.kind, a.subject)
        ON CONFLICT ON CONSTRAINT anomaly_alerts_pkey DO UPDATE SET last_seen = now()
        RETURNING * INTO v;
        appeared := v.first_seen = now();
        notified := v.last_notified_at IS NULL OR v.last_notified_at <= now() - interval '1 minute';
        IF notified THEN
            UPDATE pay.anomaly_alerts al SET last_notified_at = now()
            WHERE al.kind = a.kind AND al.subject = a.subject;
            PERFORM pg_notify('pay_alert', a.kind);
        END IF;
        kind := a.kind; subject := a.subject; observed := a.observed; expected := a.expected;
        score := a.score; since := a.since; detail := a.detail;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Backups carry the breakers' state. The per-minute rejection counts are rebuilt by their trigger
-- when a restore copies pay.webhook_rejections back, and the alert state is the worker's memory
-- of what it already logged: neither is dumped.
SELECT pg_catalog.pg_extension_config_dump('pay.event_type_health', '');

-- What `pgpay-worker status` prints, and whether a human is needed. Defined last, after every
-- table and view it counts (payments' and subscriptions' alike).
CREATE FUNCTION pay.status_report() RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pay, pg_temp
AS $$
    SELECT jsonb_build_object(
        'outbox', coalesce((SELECT jsonb_object_agg(s.status, s.n) FROM (
            SELECT o.status, count(*) AS n FROM pay.outbox o GROUP BY o.status) s), '{}'),
        'oldest_pending_seconds', (SELECT floor(extract(epoch FROM now() - min(o.created_at)))
                                   FROM pay.outbox o WHERE o.status IN ('pending', 'in_flight')),
        'dead_commands', (SELECT count(*) FROM pay.outbox o WHERE o.status = 'dead'),
        'expired_leases', (SELECT count(*) FROM pay.outbox o WHERE o.status = 'in_flight' AND o.lease_expires < now()),
        'stuck_payments', (SELECT count(*) FROM pay.stuck_payments),
        'flagged_payments', (SELECT count(*) FROM pay.flagged_payments),
        'dead_fulfillments', (SELECT count(*) FROM pay.dead_fulfillments),
        'dead_invoice_fulfillments', (SELECT count(*) FROM pay.dead_invoice_fulfillments),
        'flagged_subscriptions', (SELECT count(*) FROM pay.subscriptions s WHERE s.flagged_reason IS NOT NULL),
        'open_findings', (SELECT count(*) FROM pay.findings f WHERE f.resolved_at IS NULL),
        'last_reconciliation', (SELECT to_jsonb(r) - 'lease_expires' FROM pay.reconciliation_runs r ORDER BY r.id DESC LIMIT 1),
        'webhook_rejections_24h', (SELECT coalesce(sum(r.count), 0) FROM pay.webhook_rejections r
                                   WHERE r.last_at > now() - interval '24 hours'),
        'live_webhook_secrets', (SELECT count(*) FROM pay.webhook_secrets s
                                 WHERE s.revoked_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now())),
        -- A wrong endpoint secret: signature mismatches in the last hour and not one signed
        -- delivery accepted. Rejections are counted by day; last_at says one was this hour.
        -- The scan of webhook_events (no index on received_at: every index is paid for by
        -- every delivery) only runs when there was such a rejection.
        'signature_mismatches_today', (SELECT coalesce(sum(r.count), 0) FROM pay.webhook_rejections r
                                       WHERE r.reason = 'signature_mismatch' AND r.day = current_date),
        'last_signature_mismatch_seconds', (SELECT floor(extract(epoch FROM now() - max(r.last_at)))::bigint
                                            FROM pay.webhook_rejections r
                                            WHERE r.reason = 'signature_mismatch' AND r.day >= current_date - 1),
        'webhooks_accepted_1h', CASE WHEN EXISTS (
                SELECT 1 FROM pay.webhook_rejections r
                WHERE r.reason = 'signature_mismatch' AND r.day >= current_date - 1
                  AND r.last_at > now() - interval '1 hour')
            THEN (SELECT count(*) FROM pay.webhook_events e
                  WHERE e.source = 'webhook' AND e.received_at > now() - interval '1 hour') END
    );
$$;
