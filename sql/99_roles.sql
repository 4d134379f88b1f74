-- Roles and privileges. Applications never touch the tables directly: each role gets EXECUTE on
-- exactly the functions it needs, and nothing is granted to PUBLIC.
--   pay_app      checkout, cancel, refund, fulfillment
--   pay_webhook  webhook ingest and nothing else
--   pay_worker   the outbox and reconciliation evidence
--   pay_auditor  read-only views and the audit log
--   pay_operator incident response: replays held-back webhook events, closes a breaker by hand

-- Roles are cluster-wide: another database's CREATE EXTENSION may have made them, or may be making
-- them right now. An existing role is adopted only if it is a plain group role: one that can log
-- in, is or can become a superuser, creates roles or bypasses row security would hand every
-- database's payments to whoever holds it.
DO $roles$
DECLARE
    r text;
    v pg_catalog.pg_roles;
    v_unsafe text[];
BEGIN
    FOREACH r IN ARRAY ARRAY['pay_app', 'pay_webhook', 'pay_worker', 'pay_auditor', 'pay_operator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                -- Created by a concurrent CREATE EXTENSION in another database, which has
                -- committed meanwhile: checked like any existing role below.
                NULL;
            END;
        END IF;
        SELECT * INTO v FROM pg_catalog.pg_roles WHERE rolname = r;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'pgpay: role % is being created by another transaction that has not finished', r
                USING ERRCODE = 'serialization_failure', HINT = 'Run CREATE EXTENSION pgpay again.';
        END IF;
        v_unsafe := array_remove(ARRAY[
            CASE WHEN v.rolcanlogin THEN 'LOGIN' END,
            CASE WHEN v.rolsuper THEN 'SUPERUSER' END,
            CASE WHEN v.rolcreaterole THEN 'CREATEROLE' END,
            CASE WHEN v.rolbypassrls THEN 'BYPASSRLS' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles s
                              WHERE s.rolsuper AND s.oid <> v.oid AND pg_catalog.pg_has_role(v.oid, s.oid, 'MEMBER'))
                 THEN 'membership in a superuser role' END], NULL);
        IF cardinality(v_unsafe) > 0 THEN
            RAISE EXCEPTION 'pgpay: role % exists already with %, so CREATE EXTENSION pgpay will not adopt it',
                r, array_to_string(v_unsafe, ', ')
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('pgpay''s roles are group roles shared by every database of the cluster: make it one (ALTER ROLE %I NOLOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS, and revoke superuser memberships) or drop it, then run CREATE EXTENSION pgpay again.', r);
        END IF;
    END LOOP;
END
$roles$;

REVOKE ALL ON SCHEMA pay FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pay FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pay FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pay FROM PUBLIC;
GRANT USAGE ON SCHEMA pay TO pay_app, pay_webhook, pay_worker, pay_auditor, pay_operator;

-- Pure helpers, safe for everyone who has a role.
GRANT EXECUTE ON FUNCTION pay.idempotency_key(text, jsonb) TO pay_app, pay_worker, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.verify_stripe_signature(text, text, text, int, bigint) TO pay_app, pay_worker, pay_auditor;

GRANT EXECUTE ON FUNCTION pay.begin_checkout(text, bigint, text, text, jsonb, text, text, text, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.cancel_checkout(uuid) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.wait_for_intent(uuid, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.wait_for_checkout(uuid, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.payment_timeline(uuid) TO pay_app, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.verify_audit_log() TO pay_auditor;
GRANT SELECT ON pay.payments, pay.fulfillments TO pay_app;

GRANT EXECUTE ON FUNCTION pay.claim_outbox(text, int, interval) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.complete_outbox(bigint, int, int, jsonb) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.retry_outbox(bigint, int, int, text, timestamptz) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.fail_outbox(bigint, int, int, jsonb) TO pay_worker;
GRANT SELECT ON pay.outbox TO pay_worker;

GRANT SELECT ON pay.payments, pay.outbox, pay.audit_log, pay.fulfillments, pay.refunds, pay.orders TO pay_auditor;

-- Webhooks: pay_webhook may deliver and nothing else; the worker's relay delivers too.
GRANT EXECUTE ON FUNCTION pay.ingest_webhook(text, text) TO pay_webhook, pay_worker;
GRANT EXECUTE ON FUNCTION pay.stripe_webhook(pay."application/json") TO pay_webhook;
GRANT INSERT ON pay.webhook_inbox TO pay_webhook;
-- pay.add_webhook_secret and pay.revoke_webhook_secret stay with the extension's owner (a DBA).

GRANT EXECUTE ON FUNCTION pay.claim_fulfillments(text, int, interval) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.complete_fulfillment(uuid, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.fail_fulfillment(uuid, text, interval, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.retry_fulfillment(uuid) TO pay_app;
GRANT SELECT ON pay.dead_fulfillments TO pay_app, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.refund(uuid, bigint, text, text) TO pay_app;
GRANT SELECT ON pay.flagged_payments TO pay_app;

GRANT SELECT ON pay.webhook_events, pay.webhook_rejections, pay.webhook_secret_labels,
                pay.webhook_stats, pay.stuck_payments, pay.outbox_health, pay.flagged_payments
    TO pay_auditor;
GRANT SELECT ON pay.outbox_health, pay.stuck_payments TO pay_worker;

-- Reconciliation: evidence from Stripe's API, read with the API key only the worker holds.
GRANT EXECUTE ON FUNCTION pay.apply_stripe_object(jsonb, text, bigint) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.apply_stripe_objects(jsonb, text, bigint) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.apply_stripe_event(jsonb) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.start_reconciliation(text, timestamptz, timestamptz, interval) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.progress_reconciliation(bigint, int, int, int, int, int, int, interval) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.finish_reconciliation(bigint, text) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.record_reconciliation_finding(bigint, text, uuid, text, text, text, text) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.record_missing_at_stripe(bigint, text[]) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.rekey_create_command(bigint, int, text) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.status_report() TO pay_worker, pay_auditor;
GRANT SELECT ON pay.reconciliation_runs, pay.findings, pay.reconciliation_findings TO pay_auditor;
GRANT EXECUTE ON FUNCTION pay.resolve_finding(bigint, text) TO pay_auditor;
GRANT SELECT ON pay.reconciliation_runs, pay.findings, pay.reconciliation_findings TO pay_worker;

-- The safety net (sql/11_safety.sql). The worker checks anomalies on its schedule. Replaying held
-- events and closing a breaker by hand change payments through the transition rule (nothing a
-- replay applies is not signed by Stripe), so they belong to neither the read-only auditor nor
-- the application: pay_operator, for whoever answers the incident, with what it needs to decide.
GRANT SELECT ON pay.quarantined_events, pay.event_type_health, pay.anomalies TO pay_auditor, pay_worker;
-- A function a view calls is checked against the reader, not the view's owner: whoever may read
-- pay.anomalies needs its two tail probabilities (pure arithmetic, the one exception to
-- "pay._* is the owner's").
GRANT EXECUTE ON FUNCTION pay._binomial_upper_tail(bigint, bigint, float8), pay._poisson_upper_tail(bigint, float8)
    TO pay_auditor, pay_worker, pay_operator;
GRANT EXECUTE ON FUNCTION pay.replay_events(text, timestamptz, boolean) TO pay_operator;
GRANT EXECUTE ON FUNCTION pay.reset_event_type(text) TO pay_operator;
GRANT SELECT ON pay.quarantined_events, pay.event_type_health, pay.anomalies, pay.webhook_stats
    TO pay_operator;
GRANT EXECUTE ON FUNCTION pay.check_anomalies() TO pay_worker;
-- The relay's ingest, with the event type and the payment row's lock wait for its metrics.
GRANT EXECUTE ON FUNCTION pay.ingest_webhook_measured(text, text) TO pay_worker;


-- Subscriptions (sql/12_subscriptions.sql): the application signs up, changes, cancels, reads
-- entitlements and provisions paid invoices; the worker's answers go through complete_outbox.
GRANT EXECUTE ON FUNCTION pay.begin_subscription(text, text, int, text, jsonb, text, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.wait_for_subscription_checkout(text, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.change_subscription(text, text, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.cancel_subscription(text, boolean) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.subscription_timeline(text) TO pay_app, pay_auditor;
-- pay.entitlements calls it, and a view's functions run as the reader.
GRANT EXECUTE ON FUNCTION pay._past_due_grace() TO pay_app, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.claim_invoice_fulfillments(text, int, interval) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.complete_invoice_fulfillment(text, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.fail_invoice_fulfillment(text, text, interval, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.retry_invoice_fulfillment(text) TO pay_app;
GRANT SELECT ON pay.subscriptions, pay.invoices, pay.invoice_fulfillments, pay.entitlements,
                pay.dead_invoice_fulfillments TO pay_app, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.record_missing_subscriptions_at_stripe(bigint, text[]) TO pay_worker;
