//! Shapes of Stripe objects as Stripe answers them, for tests that play the worker's part.

use serde_json::{json, Value};

/// A PaymentIntent as Stripe returns it from create/retrieve.
pub fn payment_intent(id: &str, payment_id: &str, amount: i64, currency: &str, status: &str) -> Value {
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
