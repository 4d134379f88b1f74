//! The world of the subscription event tests: one subscription begun through pgpay, its Stripe
//! ids, and builders of the events Stripe sends about it (in either API shape), signed and
//! delivered as Stripe delivers them.

use crate::billing::{self, Shape, Sub};
use crate::stripe_sdk::{sign, sign_now, unix_now, ToSign};
use crate::TestDb;
use tokio_postgres::Client;
use uuid::Uuid;

pub const SECRET: &str = "whsec_test_subscriptions_0123456789";
pub const SHAPES: [Shape; 2] = [Shape::V2024, Shape::V2025];
pub const DAY: i64 = 86_400;

pub async fn setup() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    (db, client)
}

pub async fn deliver(client: &Client, payload: &str) -> (String, String) {
    let row = client
        .query_one(
            "SELECT status, coalesce(detail, '') FROM pay.ingest_webhook($1, $2)",
            &[&payload, &sign_now(payload, SECRET)],
        )
        .await
        .expect("ingest never raises on a signed event");
    (row.get(0), row.get(1))
}

/// Delivers `payloads` in order, signed in one call of the SDK signer.
pub async fn deliver_all(client: &Client, payloads: &[&String]) {
    let now = unix_now();
    let deliveries: Vec<ToSign<'_>> = payloads
        .iter()
        .map(|p| ToSign {
            payload: p,
            secret: SECRET,
            timestamp: now,
        })
        .collect();
    for (payload, header) in payloads.iter().zip(sign(&deliveries)) {
        client
            .query_one(
                "SELECT status FROM pay.ingest_webhook($1, $2)",
                &[payload, &header],
            )
            .await
            .expect("ingest never raises on a signed event");
    }
}

/// One subscription's world: our row, its Stripe ids, and event builders.
pub struct World {
    pub shape: Shape,
    pub id: Uuid,
    pub reference: String,
    pub stripe_id: String,
}

impl World {
    /// Begun, its session answered by "Stripe" (open, with its URL).
    pub async fn begin(client: &Client, shape: Shape, reference: &str) -> World {
        let id = billing::begin(client, reference, "price_pro", 1).await;
        let session =
            billing::subscription_session(&format!("cs_{reference}"), id, reference, "open", None);
        assert!(
            billing::answer(client, id, "create_subscription_session", session)
                .await
                .1
        );
        World {
            shape,
            id,
            reference: reference.to_owned(),
            stripe_id: format!("sub_{}", reference.replace('-', "_")),
        }
    }

    pub fn sub(&self, status: &'static str, quantity: i64, period: (i64, i64)) -> Sub<'_> {
        Sub {
            id: &self.stripe_id,
            pgpay_id: self.id,
            subscription_ref: &self.reference,
            status,
            price: "price_pro",
            quantity,
            period,
            cancel_at_period_end: false,
        }
    }

    pub fn subscription_event(
        &self,
        event_id: &str,
        kind: &str,
        created: i64,
        s: &Sub<'_>,
    ) -> String {
        billing::event(
            self.shape,
            event_id,
            kind,
            created,
            billing::subscription(self.shape, s),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn invoice_event(
        &self,
        event_id: &str,
        kind: &str,
        created: i64,
        invoice: &str,
        status: &str,
        reason: &str,
        period: (i64, i64),
    ) -> String {
        let s = self.sub("active", 1, period);
        billing::event(
            self.shape,
            event_id,
            kind,
            created,
            billing::invoice(self.shape, invoice, &s, status, 2000, reason, period),
        )
    }

    pub fn completed(&self, event_id: &str, created: i64) -> String {
        billing::event(
            self.shape,
            event_id,
            "checkout.session.completed",
            created,
            billing::subscription_session(
                &format!("cs_{}", self.reference),
                self.id,
                &self.reference,
                "complete",
                Some(&self.stripe_id),
            ),
        )
    }

    pub async fn state(&self, client: &Client) -> (Option<String>, i32, bool) {
        let row = client
            .query_one(
                "SELECT status, quantity, cancel_at_period_end FROM pay.subscriptions WHERE id = $1",
                &[&self.id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    }

    pub async fn fulfillments(&self, client: &Client) -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pay.invoice_fulfillments WHERE subscription_id = $1",
                &[&self.id],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn entitlement(&self, client: &Client) -> (bool, String) {
        let row = client
            .query_one(
                "SELECT entitled, reason FROM pay.entitlements WHERE subscription_id = $1",
                &[&self.id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

/// The events of a sign-up and its first invoice, in Stripe's order.
pub fn sign_up_events(w: &World, t: i64, period: (i64, i64)) -> Vec<String> {
    let r = &w.reference;
    vec![
        w.completed(&format!("evt_{r}_1"), t),
        w.subscription_event(
            &format!("evt_{r}_2"),
            "customer.subscription.created",
            t,
            &w.sub("incomplete", 1, period),
        ),
        w.invoice_event(
            &format!("evt_{r}_3"),
            "invoice.created",
            t,
            &format!("in_{r}_1"),
            "draft",
            "subscription_create",
            period,
        ),
        w.invoice_event(
            &format!("evt_{r}_4"),
            "invoice.finalized",
            t + 1,
            &format!("in_{r}_1"),
            "open",
            "subscription_create",
            period,
        ),
        w.invoice_event(
            &format!("evt_{r}_5"),
            "invoice.paid",
            t + 2,
            &format!("in_{r}_1"),
            "paid",
            "subscription_create",
            period,
        ),
        w.invoice_event(
            &format!("evt_{r}_6"),
            "invoice.payment_succeeded",
            t + 2,
            &format!("in_{r}_1"),
            "paid",
            "subscription_create",
            period,
        ),
        w.subscription_event(
            &format!("evt_{r}_7"),
            "customer.subscription.updated",
            t + 2,
            &w.sub("active", 1, period),
        ),
    ]
}
