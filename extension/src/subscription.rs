//! Subscriptions: the pure parts SQL calls (`sql/12_subscriptions.sql` and `13_subscription_evidence.sql`). The input rules, the
//! reader of both API shapes and the one status rule live in `pgpay-core`; the writes are
//! plpgsql (`pay._apply_billing_object`), which asks the rule here for every decision.

use pgpay_core::billing::billing_facts;
use pgpay_core::subscribe;
use pgpay_core::subscription::{decide, decide_invoice, InvoiceStatus, SubscriptionStatus};
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::errors::raise_invalid_parameter;
use crate::text_bytes::TextBytes;

/// Validates `pay.begin_subscription`'s arguments (and `change_subscription`'s, which pass no
/// metadata). Raises 22023 naming the argument.
#[pg_extern(immutable, parallel_safe, name = "_subscription_validate")]
fn subscription_validate(
    subscription_ref: Option<TextBytes<'_>>,
    price: Option<TextBytes<'_>>,
    quantity: Option<i64>,
    customer_ref: Option<TextBytes<'_>>,
    metadata: Option<&str>,
) {
    fn text<'a>(value: Option<TextBytes<'a>>, field: &str) -> Option<&'a str> {
        value.map(|v| {
            v.as_utf8()
                .unwrap_or_else(|| raise_invalid_parameter(format!("{field} is not valid UTF-8")))
        })
    }
    let subscription_ref = text(subscription_ref, "subscription_ref");
    let price = text(price, "price");
    let customer_ref = text(customer_ref, "customer_ref");
    let result = (|| {
        subscribe::validate_subscription_ref(subscription_ref.unwrap_or(""))?;
        subscribe::validate_price(price.unwrap_or(""))?;
        subscribe::validate_quantity(quantity.unwrap_or(0))?;
        if let Some(customer_ref) = customer_ref {
            pgpay_core::checkout::validate_customer_ref(customer_ref)?;
        }
        if let Some(metadata) = metadata {
            // Parsed here, not by pgrx's jsonb argument (which fails as XX000 on nesting
            // deeper than serde_json's recursion limit).
            let metadata: serde_json::Value = serde_json::from_str(metadata).map_err(|_| {
                pgpay_core::checkout::CheckoutError::Metadata(
                    "must be a JSON object of string values".into(),
                )
            })?;
            subscribe::validate_metadata(&metadata)?;
        }
        Ok::<_, subscribe::SubscribeError>(())
    })();
    if let Err(e) = result {
        raise_invalid_parameter(e)
    }
}

/// `pay._billing_facts(object)`: what pgpay keeps from a Subscription, an Invoice or a
/// subscription-mode Checkout Session (its jsonb's text), read in either API shape
/// (`pgpay_core::billing`); `{"problem": ...}` when it cannot be applied, including JSON nested
/// too deeply to read. The caller bounded the object's size.
#[pg_extern(immutable, strict, parallel_safe, name = "_billing_facts")]
fn billing_facts_sql(object: &str) -> JsonB {
    match serde_json::from_str::<serde_json::Value>(object) {
        Ok(object) => JsonB(billing_facts(&object)),
        Err(_) => {
            JsonB(serde_json::json!({ "problem": "the object cannot be read (nested too deeply)" }))
        }
    }
}

/// `pay._subscription_decide(current, current_at, proposed, at)`: the one subscription rule
/// (`pgpay_core::subscription::decide`): `apply`, `ignore:terminal`, `ignore:stale`, or
/// `ignore:unknown_status` for a status this version does not know (kept, never raised).
#[pg_extern(immutable, parallel_safe, name = "_subscription_decide")]
fn subscription_decide(
    current: Option<&str>,
    current_at: Option<i64>,
    proposed: Option<&str>,
    at: i64,
) -> &'static str {
    let Some(Ok(proposed)) = proposed.map(str::parse::<SubscriptionStatus>) else {
        return "ignore:unknown_status";
    };
    let current = current
        .and_then(|c| c.parse::<SubscriptionStatus>().ok())
        .map(|c| (c, current_at.unwrap_or(i64::MIN)));
    decide(current, proposed, at).as_str()
}

/// `pay._invoice_decide(current, current_at, proposed, at)`: the invoice rule, spelled as
/// `pay._subscription_decide`'s.
#[pg_extern(immutable, parallel_safe, name = "_invoice_decide")]
fn invoice_decide(
    current: Option<&str>,
    current_at: Option<i64>,
    proposed: Option<&str>,
    at: i64,
) -> &'static str {
    let Some(Ok(proposed)) = proposed.map(str::parse::<InvoiceStatus>) else {
        return "ignore:unknown_status";
    };
    let current = current
        .and_then(|c| c.parse::<InvoiceStatus>().ok())
        .map(|c| (c, current_at.unwrap_or(i64::MIN)));
    decide_invoice(current, proposed, at).as_str()
}
