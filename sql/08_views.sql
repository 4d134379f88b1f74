-- What a DBA reads.

-- Deliveries by type and outcome, with duplicate deliveries; rejections by reason.
CREATE VIEW pay.webhook_stats AS
    SELECT 'event'::text AS kind, e.type AS type_or_reason, e.outcome, count(*) AS events,
           sum(e.duplicate_deliveries) AS duplicate_deliveries, max(e.received_at) AS last_at
    FROM pay.webhook_events e
    GROUP BY e.type, e.outcome
    UNION ALL
    SELECT 'rejection', r.reason, 'rejected', sum(r.count), 0, max(r.last_at)
    FROM pay.webhook_rejections r
    GROUP BY r.reason;

-- Payments that are not finished and have not moved for a while. The threshold is the setting
-- pay.stuck_after (default 1 hour): SET pay.stuck_after = '15 minutes'.
-- An open Checkout Session (session mode, waiting for its customer) moves when the customer pays
-- or, at the latest, when it expires at checkout_expires_at (Stripe's default 24 hours): it is
-- measured from the later of its last change and its expiry. A customer on the hosted page for
-- twenty minutes is not stuck; a session past its expiry whose checkout.session.expired never
-- arrived is, pay.stuck_after after the expiry (stuck_for counts from the expiry).
-- greatest(updated_at, expiry) < t is written as two comparisons, so payments_open_by_update
-- still serves the updated_at one.
CREATE VIEW pay.stuck_payments AS
    SELECT p.id, p.order_ref, p.status, p.stripe_payment_intent_id, p.amount, p.currency, p.updated_at,
           now() - CASE WHEN p.mode = 'session' AND p.status = 'requires_payment_method'
                        THEN greatest(p.updated_at, p.checkout_expires_at) ELSE p.updated_at END AS stuck_for,
           (SELECT count(*) FROM pay.outbox o WHERE o.payment_id = p.id AND o.status IN ('pending', 'in_flight', 'waiting')) AS open_commands,
           p.flagged_reason, p.mode, p.stripe_checkout_session_id, p.checkout_expires_at
    FROM pay.payments p
    WHERE p.status NOT IN ('succeeded', 'canceled', 'create_failed', 'superseded')
      AND p.updated_at < now() - coalesce(nullif(current_setting('pay.stuck_after', true), ''), '1 hour')::interval
      AND (p.mode <> 'session' OR p.status <> 'requires_payment_method' OR p.checkout_expires_at IS NULL
           OR p.checkout_expires_at < now() - coalesce(nullif(current_setting('pay.stuck_after', true), ''), '1 hour')::interval);

CREATE VIEW pay.outbox_health AS
    SELECT o.status, o.kind, count(*) AS commands,
           min(o.created_at) AS oldest_created_at,
           now() - min(o.created_at) FILTER (WHERE o.status IN ('pending', 'in_flight', 'waiting')) AS oldest_open_age,
           max(o.attempts) AS max_attempts,
           count(*) FILTER (WHERE o.status = 'in_flight' AND o.lease_expires < now()) AS expired_leases
    FROM pay.outbox o
    GROUP BY o.status, o.kind;

-- Payments a human must look at.
CREATE VIEW pay.flagged_payments AS
    SELECT p.id, p.order_ref, p.status, p.stripe_payment_intent_id, p.amount, p.amount_received,
           p.amount_refunded, p.currency, p.disputed, p.flagged_reason, p.updated_at
    FROM pay.payments p
    WHERE p.flagged_reason IS NOT NULL OR p.disputed;
