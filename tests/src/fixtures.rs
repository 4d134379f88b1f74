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

/// A Checkout Session in payment mode, built on the object the Stripe API reference publishes
/// (tests/fixtures/stripe/checkout_session.json) with this payment's values: our metadata,
/// `status` (open, complete, expired), `payment_status` (paid, unpaid) and the PaymentIntent
/// Stripe made for it, if any. `url` is set only while the session is open, as Stripe does.
#[allow(clippy::too_many_arguments)]
pub fn checkout_session(
    id: &str,
    payment_id: &str,
    order_ref: &str,
    amount: i64,
    currency: &str,
    status: &str,
    payment_status: &str,
    payment_intent: Option<&str>,
) -> Value {
    let mut session: Value =
        serde_json::from_str(include_str!("../fixtures/stripe/checkout_session.json"))
            .expect("the published Checkout Session fixture is JSON");
    let url = (status == "open").then(|| format!("https://checkout.stripe.com/c/pay/{id}"));
    for (key, value) in [
        ("id", json!(id)),
        ("amount_subtotal", json!(amount)),
        ("amount_total", json!(amount)),
        ("currency", json!(currency)),
        ("client_reference_id", json!(order_ref)),
        (
            "metadata",
            json!({"pgpay_payment_id": payment_id, "order_ref": order_ref}),
        ),
        ("status", json!(status)),
        ("payment_status", json!(payment_status)),
        ("payment_intent", json!(payment_intent)),
        ("url", json!(url)),
    ] {
        session[key] = value;
    }
    session
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
    answer_command(
        client,
        payment,
        "create_payment_intent",
        |amount, currency| {
            payment_intent(intent_id, &payment.to_string(), amount, currency, status)
        },
    )
    .await
}

/// Plays the worker's claim for one payment's open (pending or in-flight) command of `kind`: takes
/// exactly that command in flight through `pay._lease_commands`, the lease `pay.claim_outbox`
/// gives (one more attempt), leaving every other command as it is. Returns (command id, attempt).
pub async fn claim_command(
    client: &tokio_postgres::Client,
    payment: uuid::Uuid,
    kind: &str,
) -> (i64, i32) {
    let row = client
        .query_one(
            "SELECT id, attempts FROM pay._lease_commands(ARRAY(
                 SELECT o.id FROM pay.outbox o
                 WHERE o.payment_id = $1 AND o.kind::text = $2 AND o.status IN ('pending', 'in_flight')),
                 'test-worker', interval '1 minute')",
            &[&payment, &kind],
        )
        .await
        .expect("the payment has a command of this kind to claim");
    (row.get(0), row.get(1))
}

/// Plays the worker for one payment's open command of `kind`: takes it in flight
/// ([`claim_command`]) and records `answer(amount, currency)` (the payment's own) as Stripe's 200
/// answer. Returns what `pay.complete_outbox` answered.
pub async fn answer_command(
    client: &tokio_postgres::Client,
    payment: uuid::Uuid,
    kind: &str,
    answer: impl FnOnce(i64, &str) -> Value,
) -> bool {
    let (command, attempt) = claim_command(client, payment, kind).await;
    let row = client
        .query_one(
            "SELECT amount::bigint, currency::text FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .expect("the payment exists");
    let answer = answer(row.get(0), &row.get::<_, String>(1));
    client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &answer],
        )
        .await
        .expect("complete_outbox")
        .get(0)
}
