//! Shapes of Stripe objects as Stripe answers them, for tests that play the worker's part.

use serde_json::{json, Value};

/// A PaymentIntent as Stripe returns it from create/retrieve.
pub fn payment_intent(
    id: &str,
    payment_id: &str,
    amount: i64,
    currency: &str,
    status: &str,
) -> Value {
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "amount_received": if status == "succeeded" { amount } else { 0 },
        "currency": currency,
        "status": status,
        "client_secret": format!("{id}_secret_test"),
        "created": 1_700_000_000,
        "livemode": false,
        "metadata": { "pgpay_payment_id": payment_id },
    })
}

/// A Stripe event around `object`, serialised as Stripe sends it (pretty-printed, so byte-exact
/// signing matters).
pub fn event(id: &str, event_type: &str, created: i64, object: Value) -> String {
    serde_json::to_string_pretty(&json!({
        "id": id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "type": event_type,
        "livemode": false,
        "pending_webhooks": 1,
        "data": { "object": object },
    }))
    .expect("json")
}
