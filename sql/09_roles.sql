-- Roles and privileges. Applications never touch the tables directly: each role gets EXECUTE on
-- exactly the functions it needs, and nothing is granted to PUBLIC.
--   pay_app      checkout, cancel, refund, fulfillment
--   pay_webhook  webhook ingest and nothing else
--   pay_worker   the outbox and reconciliation evidence
--   pay_auditor  read-only views and the audit log

DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pay_app', 'pay_webhook', 'pay_worker', 'pay_auditor'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$roles$;

REVOKE ALL ON SCHEMA pay FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pay FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pay FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pay FROM PUBLIC;
GRANT USAGE ON SCHEMA pay TO pay_app, pay_webhook, pay_worker, pay_auditor;

-- Pure helpers, safe for everyone who has a role.
GRANT EXECUTE ON FUNCTION pay.idempotency_key(text, jsonb) TO pay_app, pay_worker, pay_auditor;
GRANT EXECUTE ON FUNCTION pay.verify_stripe_signature(text, text, text, int, bigint) TO pay_app, pay_worker, pay_auditor;

GRANT EXECUTE ON FUNCTION pay.begin_checkout(text, bigint, text, text, jsonb, text) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.cancel_checkout(uuid) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.wait_for_intent(uuid, int) TO pay_app;
GRANT EXECUTE ON FUNCTION pay.payment_timeline(uuid) TO pay_app, pay_auditor;
GRANT SELECT ON pay.payments, pay.fulfillments TO pay_app;

GRANT EXECUTE ON FUNCTION pay.claim_outbox(text, int, interval) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.complete_outbox(bigint, int, int, jsonb) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.retry_outbox(bigint, int, int, text, timestamptz) TO pay_worker;
GRANT EXECUTE ON FUNCTION pay.fail_outbox(bigint, int, int, jsonb) TO pay_worker;
GRANT SELECT ON pay.outbox TO pay_worker;

GRANT SELECT ON pay.payments, pay.outbox, pay.audit_log, pay.fulfillments, pay.refunds, pay.orders TO pay_auditor;
