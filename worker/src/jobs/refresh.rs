//! The refresh of stuck payments: GET the PaymentIntent of each payment in
//! `pay.stuck_payments` and apply it with source `refresh`, through the same transition
//! rule as webhooks.

use pgpay_core::outcome::Outcome;
use serde_json::Value;
use tokio_postgres::Client;
use tracing::warn;

use super::{db_op, JobError};
use crate::stripe::{Got, StripeReader};

/// What one refresh of stuck payments did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RefreshReport {
    /// Stuck payments with a PaymentIntent id looked at.
    pub(crate) looked_up: u64,
    /// That changed (applied or flagged).
    pub(crate) applied: u64,
    /// Stripe answered 404.
    pub(crate) missing: u64,
}

const STUCK: &str = "SELECT id::text, stripe_payment_intent_id FROM pay.stuck_payments \
     WHERE stripe_payment_intent_id IS NOT NULL ORDER BY updated_at LIMIT $1";
const APPLY_REFRESH: &str =
    "SELECT outcome FROM pay.apply_stripe_objects($1::jsonb, 'refresh', NULL)";
const MISSING_ONE: &str = "SELECT pay.record_reconciliation_finding(NULL, 'missing_at_stripe', \
     $1::text::uuid, $2::text, 'retrievable', 'absent', 'GET of a stuck payment''s PaymentIntent answered 404')";

/// Refreshes up to `max` stuck payments (`pay.stuck_payments` with a PaymentIntent id) by
/// GETting their PaymentIntents and applying them with source `refresh`.
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
        let intent: String = r.get(1);
        // The id goes into a path: only Stripe's id alphabet.
        if intent.is_empty()
            || !intent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            warn!(
                payment,
                "stuck payment with a malformed PaymentIntent id; skipped"
            );
            continue;
        }
        report.looked_up += 1;
        match reader
            .get(
                "a stuck payment's PaymentIntent",
                format!("/v1/payment_intents/{intent}"),
                Vec::new(),
            )
            .await?
        {
            Got::Found(pi) => objects.push(pi),
            Got::NotFound => {
                report.missing += 1;
                client
                    .query_one(MISSING_ONE, &[&payment, &intent])
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
