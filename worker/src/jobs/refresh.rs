//! The refresh of stuck payments: GET the PaymentIntent of each payment in
//! `pay.stuck_payments` (a session-mode payment that has none yet: its Checkout Session, e.g.
//! one past its expiry whose `checkout.session.expired` never came) and apply it with source
//! `refresh`, through the same transition rule as webhooks.

use pgpay_core::outcome::Outcome;
use serde_json::Value;
use tokio_postgres::Client;
use tracing::warn;

use super::{db_op, JobError};
use crate::stripe::{Got, StripeReader};

/// What one refresh of stuck payments did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RefreshReport {
    /// Stuck payments with a PaymentIntent (or Checkout Session) id looked at.
    pub(crate) looked_up: u64,
    /// That changed (applied or flagged).
    pub(crate) applied: u64,
    /// Stripe answered 404.
    pub(crate) missing: u64,
}

const STUCK: &str = "SELECT id::text, stripe_payment_intent_id, stripe_checkout_session_id \
     FROM pay.stuck_payments \
     WHERE stripe_payment_intent_id IS NOT NULL OR stripe_checkout_session_id IS NOT NULL \
     ORDER BY updated_at LIMIT $1";
const APPLY_REFRESH: &str =
    "SELECT outcome FROM pay.apply_stripe_objects($1::jsonb, 'refresh', NULL)";
const MISSING_ONE: &str = "SELECT pay.record_reconciliation_finding(NULL, 'missing_at_stripe', \
     $1::text::uuid, $2::text, 'retrievable', 'absent', $3::text)";

/// Refreshes up to `max` stuck payments (`pay.stuck_payments` with a PaymentIntent or Checkout
/// Session id) by GETting their PaymentIntents (or, before a session-mode payment has one, its
/// Checkout Session) and applying them with source `refresh`.
pub(crate) async fn refresh_stuck(
    client: &Client,
    reader: &StripeReader<'_>,
    max: i64,
) -> Result<RefreshReport, JobError> {
    let rows = client
        .query(STUCK, &[&max])
        .await
        .map_err(db_op("read stuck_payments"))?;
    let mut report = RefreshReport::default();
    let mut objects = Vec::new();
    for r in rows {
        let payment: String = r.get(0);
        let (what, path, id) = match (r.get::<_, Option<String>>(1), r.get::<_, Option<String>>(2))
        {
            (Some(intent), _) => (
                "a stuck payment's PaymentIntent",
                "/v1/payment_intents",
                intent,
            ),
            (None, Some(session)) => (
                "a stuck payment's Checkout Session",
                "/v1/checkout/sessions",
                session,
            ),
            (None, None) => continue,
        };
        // The id goes into a path: only Stripe's id alphabet.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            warn!(payment, "stuck payment with a malformed Stripe id; skipped");
            continue;
        }
        report.looked_up += 1;
        match reader.get(what, format!("{path}/{id}"), Vec::new()).await? {
            Got::Found(object) => objects.push(object),
            Got::NotFound => {
                report.missing += 1;
                let detail = format!("GET of {what} answered 404");
                client
                    .query_one(MISSING_ONE, &[&payment, &id, &detail])
                    .await
                    .map_err(db_op("record_reconciliation_finding"))?;
            }
        }
    }
    if !objects.is_empty() {
        let rows = client
            .query(APPLY_REFRESH, &[&Value::Array(objects)])
            .await
            .map_err(db_op("apply_stripe_objects"))?;
        report.applied = rows
            .iter()
            .filter(|r| {
                r.get::<_, Option<String>>(0)
                    .and_then(|s| s.parse::<Outcome>().ok())
                    .is_some_and(Outcome::changed_a_payment)
            })
            .count() as u64;
    }
    Ok(report)
}
