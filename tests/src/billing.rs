//! Subscriptions, invoices and subscription-mode Checkout Sessions in both API shapes, built on
//! the objects Stripe publishes (tests/fixtures/stripe/: `subscription_<version>.json` and
//! `invoice_<version>.json` are the OpenAPI fixtures of stripe/openapi before and after API
//! version 2025-03-31), with a test's own values. Plus the worker's part for subscription
//! commands.

use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// The API shape an object is built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Before 2025-03-31: `invoice.subscription`, `subscription.current_period_*`.
    V2024,
    /// 2025-03-31.basil and later: `invoice.parent.subscription_details`, periods on items.
    V2025,
}

impl Shape {
    pub fn api_version(self) -> &'static str {
        match self {
            Shape::V2024 => "2024-06-20",
            Shape::V2025 => "2025-03-31.basil",
        }
    }
}

/// What a test says about a subscription at one moment.
#[derive(Debug, Clone)]
pub struct Sub<'a> {
    pub id: &'a str,
    pub pgpay_id: Uuid,
    pub subscription_ref: &'a str,
    pub status: &'a str,
    pub price: &'a str,
    pub quantity: i64,
    pub period: (i64, i64),
    pub cancel_at_period_end: bool,
}

fn published(name: &str) -> Value {
    let text = match name {
        "subscription_2024" => include_str!("../fixtures/stripe/subscription_2024-06-20.json"),
        "subscription_2025" => include_str!("../fixtures/stripe/subscription_2025-03-31.json"),
        "invoice_2024" => include_str!("../fixtures/stripe/invoice_2024-06-20.json"),
        "invoice_2025" => include_str!("../fixtures/stripe/invoice_2025-03-31.json"),
        _ => include_str!("../fixtures/stripe/checkout_session.json"),
    };
    serde_json::from_str(text).expect("a published fixture is JSON")
}

fn our_metadata(pgpay_id: Uuid, subscription_ref: &str) -> Value {
    json!({"pgpay_subscription_id": pgpay_id.to_string(), "subscription_ref": subscription_ref})
}

/// A Subscription object in `shape`.
pub fn subscription(shape: Shape, s: &Sub<'_>) -> Value {
    let mut o = published(match shape {
        Shape::V2024 => "subscription_2024",
        Shape::V2025 => "subscription_2025",
    });
    o["id"] = json!(s.id);
    o["status"] = json!(s.status);
    o["customer"] = json!("cus_test_1");
    o["metadata"] = our_metadata(s.pgpay_id, s.subscription_ref);
    o["cancel_at_period_end"] = json!(s.cancel_at_period_end);
    o["canceled_at"] = if s.status == "canceled" || s.cancel_at_period_end {
        json!(s.period.0)
    } else {
        Value::Null
    };
    o["test_clock"] = Value::Null;
    o["schedule"] = Value::Null;
    let item = &mut o["items"]["data"][0];
    item["id"] = json!(format!("si_{}", &s.id[4..]));
    item["subscription"] = json!(s.id);
    item["quantity"] = json!(s.quantity);
    item["price"]["id"] = json!(s.price);
    item["plan"]["id"] = json!(s.price);
    match shape {
        Shape::V2024 => {
            o["current_period_start"] = json!(s.period.0);
            o["current_period_end"] = json!(s.period.1);
        }
        Shape::V2025 => {
            item["current_period_start"] = json!(s.period.0);
            item["current_period_end"] = json!(s.period.1);
        }
    }
    o
}

/// An Invoice of subscription `sub` (its Stripe id and our ids) in `shape`.
#[allow(clippy::too_many_arguments)]
pub fn invoice(
    shape: Shape,
    id: &str,
    sub: &Sub<'_>,
    status: &str,
    amount: i64,
    billing_reason: &str,
    period: (i64, i64),
) -> Value {
    let mut o = published(match shape {
        Shape::V2024 => "invoice_2024",
        Shape::V2025 => "invoice_2025",
    });
    o["id"] = json!(id);
    o["status"] = json!(status);
    o["customer"] = json!("cus_test_1");
    o["currency"] = json!("usd");
    o["amount_due"] = json!(amount);
    o["amount_paid"] = json!(if status == "paid" { amount } else { 0 });
    o["amount_remaining"] = json!(if status == "paid" { 0 } else { amount });
    o["billing_reason"] = json!(billing_reason);
    o["status_transitions"]["paid_at"] = if status == "paid" {
        json!(period.0)
    } else {
        Value::Null
    };
    let line = &mut o["lines"]["data"][0];
    line["period"] = json!({"start": period.0, "end": period.1});
    line["amount"] = json!(amount);
    line["invoice"] = json!(id);
    let metadata = our_metadata(sub.pgpay_id, sub.subscription_ref);
    match shape {
        Shape::V2024 => {
            o["subscription"] = json!(sub.id);
            o["subscription_details"] = json!({ "metadata": metadata });
        }
        Shape::V2025 => {
            o["parent"] = json!({"type": "subscription_details", "quote_details": null,
                                 "subscription_details": {"subscription": sub.id, "metadata": metadata}});
        }
    }
    o
}

/// A Checkout Session in subscription mode: `status` open (with its URL), complete (with the
/// subscription Stripe made) or expired.
pub fn subscription_session(
    id: &str,
    pgpay_id: Uuid,
    subscription_ref: &str,
    status: &str,
    subscription: Option<&str>,
) -> Value {
    let mut o = published("checkout_session");
    o["id"] = json!(id);
    o["mode"] = json!("subscription");
    o["status"] = json!(status);
    o["payment_status"] = json!(if status == "complete" {
        "paid"
    } else {
        "unpaid"
    });
    o["payment_intent"] = Value::Null;
    o["client_reference_id"] = json!(subscription_ref);
    o["metadata"] = our_metadata(pgpay_id, subscription_ref);
    o["subscription"] = json!(subscription);
    o["customer"] = json!(subscription.map(|_| "cus_test_1"));
    o["invoice"] = json!(subscription.map(|_| "in_first"));
    o["url"] = json!((status == "open").then(|| format!("https://checkout.stripe.com/c/pay/{id}")));
    o
}

/// A Stripe event of `shape`'s API version around `object`, as Stripe sends it.
pub fn event(shape: Shape, id: &str, event_type: &str, created: i64, object: Value) -> String {
    serde_json::to_string_pretty(&json!({
        "id": id,
        "object": "event",
        "api_version": shape.api_version(),
        "created": created,
        "type": event_type,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "data": { "object": object },
    }))
    .expect("json")
}

/// `pay.begin_subscription(ref, price, quantity, success_url => ...)`: the row's id.
pub async fn begin(client: &Client, subscription_ref: &str, price: &str, quantity: i32) -> Uuid {
    client
        .query_one(
            "SELECT id FROM pay.begin_subscription($1, $2, $3, success_url => 'https://app.example/welcome')",
            &[&subscription_ref, &price, &quantity],
        )
        .await
        .expect("begin_subscription")
        .get(0)
}

/// Plays the worker for a subscription's open command of `kind`: takes it in flight and
/// records `answer` as Stripe's 200 answer. Returns the command's request and what
/// `pay.complete_outbox` answered.
pub async fn answer(
    client: &Client,
    subscription: Uuid,
    kind: &str,
    answer: Value,
) -> (Value, bool) {
    let row = client
        .query_one(
            "UPDATE pay.outbox o
             SET status = 'in_flight', lease_owner = 'test-worker', lease_expires = now() + interval '1 minute',
                 attempts = o.attempts + 1, first_attempt_at = coalesce(o.first_attempt_at, now())
             WHERE o.id = (SELECT min(o2.id) FROM pay.outbox o2 WHERE o2.subscription_id = $1
                           AND o2.kind::text = $2 AND o2.status IN ('pending', 'in_flight'))
             RETURNING o.id, o.attempts, o.request",
            &[&subscription, &kind],
        )
        .await
        .expect("the subscription has a command of this kind to answer");
    let (command, attempt, request): (i64, i32, Value) = (row.get(0), row.get(1), row.get(2));
    let done: bool = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &answer],
        )
        .await
        .expect("complete_outbox")
        .get(0);
    (request, done)
}
