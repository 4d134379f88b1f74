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

/// Plays the worker for one payment's create command: takes exactly that command in flight and
/// records Stripe's answer, a PaymentIntent `intent_id` in `status` for the payment's own amount
/// and currency. Returns what `pay.complete_outbox` answered.
pub async fn answer_create(
    client: &tokio_postgres::Client,
    payment: uuid::Uuid,
    intent_id: &str,
    status: &str,
) -> bool {
    let row = client
        .query_one(
            "UPDATE pay.outbox o
             SET status = 'in_flight', lease_owner = 'test-worker', lease_expires = now() + interval '1 minute',
                 attempts = o.attempts + 1, first_attempt_at = coalesce(o.first_attempt_at, now())
             FROM pay.payments p
             WHERE o.payment_id = $1 AND o.kind = 'create_payment_intent' AND p.id = o.payment_id
               AND o.status IN ('pending', 'in_flight')
             RETURNING o.id, o.attempts, p.amount, p.currency",
            &[&payment],
        )
        .await
        .expect("the payment has a create command to answer");
    let (command, attempt, amount, currency): (i64, i32, i64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let answer = payment_intent(intent_id, &payment.to_string(), amount, &currency, status);
    client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &answer],
        )
        .await
        .expect("complete_outbox")
        .get(0)
}
