//! The subscription SQL API: `pay.begin_subscription` (validation, the same call again, racing
//! callers), the sign-up's Checkout Session through the outbox and `complete_outbox`,
//! `pay.wait_for_subscription_checkout`, `pay.change_subscription` and
//! `pay.cancel_subscription` with deterministic keys, refusals through `fail_outbox`, and roles.

use std::sync::Arc;

use pgpay_tests::billing::{self, Shape, Sub};
use pgpay_tests::{count, sqlstate, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

const WELCOME: &str = "https://app.example/welcome";

async fn setup() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = db.connect().await;
    (db, client)
}

fn sub(
    id: &str,
    pgpay_id: Uuid,
    subscription_ref: &str,
    status: &str,
    quantity: i64,
) -> Sub<'static> {
    Sub {
        id: Box::leak(id.to_owned().into_boxed_str()),
        pgpay_id,
        subscription_ref: Box::leak(subscription_ref.to_owned().into_boxed_str()),
        status: Box::leak(status.to_owned().into_boxed_str()),
        price: "price_pro",
        quantity,
        period: (1_900_000_000, 1_902_592_000),
        cancel_at_period_end: false,
    }
}

/// A subscription signed up and active at Stripe: begun, its session answered, its
/// subscription reported (as an API answer would, through the same rule).
async fn active(client: &Client, subscription_ref: &str, stripe_id: &str) -> Uuid {
    let id = billing::begin(client, subscription_ref, "price_pro", 1).await;
    let session = billing::subscription_session("cs_sub_1", id, subscription_ref, "open", None);
    assert!(
        billing::answer(client, id, "create_subscription_session", session)
            .await
            .1
    );
    let s = billing::subscription(
        Shape::V2025,
        &sub(stripe_id, id, subscription_ref, "active", 1),
    );
    let outcome: String = client
        .query_one(
            "SELECT outcome FROM pay.apply_stripe_object($1, 'test')",
            &[&s],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "applied");
    id
}

/// subscription_ref, price, quantity, customer_ref, metadata, success_url, cancel_url, and the
/// field the error must name.
type BadCase<'a> = (
    &'a str,
    &'a str,
    i32,
    Option<&'a str>,
    Value,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
);

#[tokio::test]
async fn bad_arguments_raise_22023_naming_the_field_and_write_nothing() {
    let (_db, client) = setup().await;
    let long_ref = "r".repeat(201);
    let cases: Vec<BadCase<'_>> = vec![
        (
            "",
            "price_1",
            1,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "subscription_ref",
        ),
        (
            &long_ref,
            "price_1",
            1,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "subscription_ref",
        ),
        (
            "acct\n1",
            "price_1",
            1,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "subscription_ref",
        ),
        (
            "acct-1",
            "",
            1,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "price",
        ),
        (
            "acct-1",
            "price 1",
            1,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "price",
        ),
        (
            "acct-1",
            "price_1",
            0,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "quantity",
        ),
        (
            "acct-1",
            "price_1",
            -2,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "quantity",
        ),
        (
            "acct-1",
            "price_1",
            2_000_000,
            None,
            json!({}),
            Some(WELCOME),
            None,
            "quantity",
        ),
        (
            "acct-1",
            "price_1",
            1,
            Some(""),
            json!({}),
            Some(WELCOME),
            None,
            "customer_ref",
        ),
        (
            "acct-1",
            "price_1",
            1,
            None,
            json!({"seats": 3}),
            Some(WELCOME),
            None,
            "metadata",
        ),
        (
            "acct-1",
            "price_1",
            1,
            None,
            json!({"pgpay_subscription_id": "x"}),
            Some(WELCOME),
            None,
            "metadata",
        ),
        (
            "acct-1",
            "price_1",
            1,
            None,
            json!([1]),
            Some(WELCOME),
            None,
            "metadata",
        ),
        (
            "acct-1",
            "price_1",
            1,
            None,
            json!({}),
            None,
            None,
            "success_url",
        ),
        (
            "acct-1",
            "price_1",
            1,
            None,
            json!({}),
            Some("/welcome"),
            None,
            "success_url",
        ),
        (
            "acct-1",
            "price_1",
            1,
            None,
            json!({}),
            Some(WELCOME),
            Some("ftp://x"),
            "cancel_url",
        ),
    ];
    for (r, price, quantity, customer, metadata, success, cancel, field) in cases {
        let err = client
            .query_one(
                "SELECT pay.begin_subscription($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &r, &price, &quantity, &customer, &metadata, &success, &cancel,
                ],
            )
            .await
            .expect_err("bad arguments");
        assert_eq!(sqlstate(&err), Some("22023"), "{field}: {err}");
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(message.starts_with(field), "{field}: {message}");
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.subscriptions").await,
        0
    );
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.audit_log").await,
        0
    );
}

#[tokio::test]
async fn begin_queues_one_subscription_session_with_our_ids_and_the_same_call_writes_nothing() {
    let (_db, client) = setup().await;
    let row = client
        .query_one(
            "SELECT id, status, checkout_status FROM pay.begin_subscription('acct-7', 'price_pro', 3, 'cust-7',
                 '{\"plan\": \"pro\"}', $1, 'https://app.example/pricing')",
            &[&WELCOME],
        )
        .await
        .unwrap();
    let id: Uuid = row.get(0);
    assert_eq!(
        row.get::<_, Option<String>>(1),
        None,
        "no Stripe status yet"
    );
    let command = client
        .query_one(
            "SELECT kind::text, request, idempotency_key::text, status FROM pay.outbox WHERE subscription_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(command.get::<_, String>(0), "create_subscription_session");
    let request: Value = command.get(1);
    assert_eq!(request["method"], "POST");
    assert_eq!(request["path"], "/v1/checkout/sessions");
    let params = &request["params"];
    for (key, want) in [
        ("mode", "subscription"),
        ("line_items[0][price]", "price_pro"),
        ("line_items[0][quantity]", "3"),
        ("success_url", WELCOME),
        ("cancel_url", "https://app.example/pricing"),
        ("client_reference_id", "acct-7"),
        ("metadata[pgpay_subscription_id]", &id.to_string()),
        ("metadata[subscription_ref]", "acct-7"),
        ("metadata[customer_ref]", "cust-7"),
        ("metadata[plan]", "pro"),
        (
            "subscription_data[metadata][pgpay_subscription_id]",
            &id.to_string(),
        ),
        ("subscription_data[metadata][subscription_ref]", "acct-7"),
        ("subscription_data[metadata][customer_ref]", "cust-7"),
        ("subscription_data[metadata][plan]", "pro"),
    ] {
        assert_eq!(params[key], json!(want), "{key}");
    }
    let key: String = command.get(2);
    assert_eq!(command.get::<_, String>(3), "pending");
    let expected_key: String = client
        .query_one(
            "SELECT pay.idempotency_key('pgpay.sub_create', jsonb_build_object('subscription_id', $1::uuid, 'attempt', 1))",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, expected_key, "a key derived from the subscription");

    // The same call again: the same row, and not one write (xid unassigned afterwards).
    let tx = client
        .query_one(
            "WITH again AS (SELECT id FROM pay.begin_subscription('acct-7', 'price_pro', 3, 'cust-7',
                 '{\"plan\": \"pro\"}', $1, 'https://app.example/pricing'))
             SELECT (SELECT id FROM again), txid_current_if_assigned()",
            &[&WELCOME],
        )
        .await
        .unwrap();
    assert_eq!(tx.get::<_, Uuid>(0), id);
    assert_eq!(
        tx.get::<_, Option<i64>>(1),
        None,
        "the same call wrote nothing"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 1);

    // Other parameters while the sign-up is in progress: refused, naming the way out.
    let err = client
        .query_one(
            "SELECT pay.begin_subscription('acct-7', 'price_pro', 4, success_url => $1)",
            &[&WELCOME],
        )
        .await
        .expect_err("changed parameters");
    assert_eq!(sqlstate(&err), Some("55000"));
}

#[tokio::test]
async fn twenty_racing_begin_subscription_calls_make_one_row_and_one_session() {
    let db = TestDb::create().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = Arc::new(db.connect().await);
        tasks.push(tokio::spawn(async move {
            billing::begin(&client, "acct-race", "price_pro", 2).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every caller got the same subscription");
    let client = db.connect().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.subscriptions").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'create_subscription_session'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.audit_log").await,
        1
    );
}

#[tokio::test]
async fn the_session_answer_hands_over_the_url_and_wait_returns_it() {
    let (_db, client) = setup().await;
    let id = billing::begin(&client, "acct-wait", "price_pro", 1).await;
    // Nothing yet: the wait times out with 57014.
    let err = client
        .query_one(
            "SELECT pay.wait_for_subscription_checkout('acct-wait', 50)",
            &[],
        )
        .await
        .expect_err("no session yet");
    assert_eq!(sqlstate(&err), Some("57014"));
    let session = billing::subscription_session("cs_sub_w", id, "acct-wait", "open", None);
    let (_, done) = billing::answer(&client, id, "create_subscription_session", session).await;
    assert!(done);
    let row = client
        .query_one(
            "SELECT checkout_url, checkout_status, stripe_checkout_session_id, checkout_expires_at IS NOT NULL
             FROM pay.wait_for_subscription_checkout('acct-wait', 1000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "https://checkout.stripe.com/c/pay/cs_sub_w"
    );
    assert_eq!(row.get::<_, String>(1), "open");
    assert_eq!(row.get::<_, String>(2), "cs_sub_w");
    assert!(row.get::<_, bool>(3));
    let err = client
        .query_one(
            "SELECT pay.wait_for_subscription_checkout('acct-none', 10)",
            &[],
        )
        .await
        .expect_err("unknown ref");
    assert_eq!(sqlstate(&err), Some("P0002"));
    let err = client
        .query_one(
            "SELECT pay.wait_for_subscription_checkout('acct-wait', -1)",
            &[],
        )
        .await
        .expect_err("bad timeout");
    assert_eq!(sqlstate(&err), Some("22023"));
}

#[tokio::test]
async fn a_refused_session_ends_the_attempt_and_the_same_call_begins_again() {
    let (_db, client) = setup().await;
    let id = billing::begin(&client, "acct-refused", "price_gone", 1).await;
    let command = client
        .query_one(
            "UPDATE pay.outbox SET status = 'in_flight', lease_owner = 'w', lease_expires = now() + interval '1 minute',
                 attempts = 1, first_attempt_at = now()
             WHERE subscription_id = $1 RETURNING id",
            &[&id],
        )
        .await
        .unwrap();
    let command_id: i64 = command.get(0);
    let error = json!({"error": {"type": "invalid_request_error", "message": "No such price: 'price_gone'"}});
    let failed: bool = client
        .query_one(
            "SELECT pay.fail_outbox($1, 1, 400, $2)",
            &[&command_id, &error],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failed);
    let err = client
        .query_one(
            "SELECT pay.wait_for_subscription_checkout('acct-refused', 100)",
            &[],
        )
        .await
        .expect_err("no session will come");
    assert_eq!(sqlstate(&err), Some("55000"));
    // The same call again starts a second attempt with its own key.
    let again = billing::begin(&client, "acct-refused", "price_gone", 1).await;
    assert_eq!(again, id);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'create_subscription_session'"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT idempotency_key) FROM pay.outbox"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn change_needs_stripes_subscription_and_a_retried_change_queues_nothing() {
    let (_db, client) = setup().await;
    let early = billing::begin(&client, "acct-early", "price_pro", 1).await;
    let err = client
        .query_one(
            "SELECT pay.change_subscription('acct-early', 'price_pro', 5)",
            &[],
        )
        .await
        .expect_err("no Stripe subscription yet");
    assert_eq!(sqlstate(&err), Some("55000"));
    assert!(err.as_db_error().unwrap().message().contains("acct-early"));
    let _ = early;
    let err = client
        .query_one(
            "SELECT pay.change_subscription('acct-nobody', 'price_pro', 5)",
            &[],
        )
        .await
        .expect_err("unknown");
    assert_eq!(sqlstate(&err), Some("P0002"));
    let err = client
        .query_one(
            "SELECT pay.change_subscription('acct-early', 'price_pro', 0)",
            &[],
        )
        .await
        .expect_err("bad quantity");
    assert_eq!(sqlstate(&err), Some("22023"));

    let id = active(&client, "acct-chg", "sub_chg").await;
    for _ in 0..3 {
        client
            .execute(
                "SELECT pay.change_subscription('acct-chg', 'price_pro', 5)",
                &[],
            )
            .await
            .unwrap();
    }
    let commands = client
        .query(
            "SELECT request FROM pay.outbox WHERE subscription_id = $1 AND kind = 'update_subscription'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(commands.len(), 1, "a retried change queues nothing new");
    let request: Value = commands[0].get(0);
    assert_eq!(request["path"], "/v1/subscriptions/sub_chg");
    assert_eq!(request["params"]["items[0][id]"], "si_chg");
    assert_eq!(request["params"]["items[0][quantity]"], "5");
    assert_eq!(request["params"]["items[0][price]"], "price_pro");

    // Stripe's answer mirrors the new quantity; the same change again then queues nothing.
    let mut changed = sub("sub_chg", id, "acct-chg", "active", 5);
    changed.period = (1_900_000_000, 1_902_592_000);
    let answer = billing::subscription(Shape::V2024, &changed);
    assert!(
        billing::answer(&client, id, "update_subscription", answer)
            .await
            .1
    );
    let quantity: i32 = client
        .query_one(
            "SELECT quantity FROM pay.subscriptions WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(quantity, 5);
    client
        .execute(
            "SELECT pay.change_subscription('acct-chg', 'price_pro', 5)",
            &[],
        )
        .await
        .unwrap();
    // Back to 1: a new change, with a new key.
    client
        .execute(
            "SELECT pay.change_subscription('acct-chg', 'price_pro', 1)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'update_subscription'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn cancel_at_period_end_and_now_are_queued_once_each() {
    let (_db, client) = setup().await;
    let id = active(&client, "acct-cxl", "sub_cxl").await;
    for _ in 0..3 {
        client
            .execute("SELECT pay.cancel_subscription('acct-cxl')", &[])
            .await
            .unwrap();
    }
    let rows = client
        .query(
            "SELECT request FROM pay.outbox WHERE subscription_id = $1 AND kind = 'cancel_subscription'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let request: Value = rows[0].get(0);
    assert_eq!(request["method"], "POST");
    assert_eq!(request["path"], "/v1/subscriptions/sub_cxl");
    assert_eq!(request["params"]["cancel_at_period_end"], "true");
    let mut s = sub("sub_cxl", id, "acct-cxl", "active", 1);
    s.cancel_at_period_end = true;
    assert!(
        billing::answer(
            &client,
            id,
            "cancel_subscription",
            billing::subscription(Shape::V2025, &s)
        )
        .await
        .1
    );
    let row = client
        .query_one(
            "SELECT entitled, reason FROM pay.entitlements WHERE subscription_ref = 'acct-cxl'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "active, cancels at period end");
    client
        .execute("SELECT pay.cancel_subscription('acct-cxl')", &[])
        .await
        .unwrap();
    // Immediately: DELETE, once however often asked.
    for _ in 0..2 {
        client
            .execute(
                "SELECT pay.cancel_subscription('acct-cxl', at_period_end => false)",
                &[],
            )
            .await
            .unwrap();
    }
    let rows = client
        .query(
            "SELECT request ->> 'method', request ->> 'path' FROM pay.outbox
             WHERE subscription_id = $1 AND kind = 'cancel_subscription' ORDER BY id",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].get::<_, String>(0), "DELETE");
    assert_eq!(rows[1].get::<_, String>(1), "/v1/subscriptions/sub_cxl");
}

#[tokio::test]
async fn cancel_before_stripe_has_a_subscription_withdraws_the_sign_up() {
    let (_db, client) = setup().await;
    // Not sent yet: never sent.
    let id = billing::begin(&client, "acct-w1", "price_pro", 1).await;
    let row = client
        .query_one(
            "SELECT checkout_status FROM pay.cancel_subscription('acct-w1')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "expired");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'skipped'"
        )
        .await,
        1
    );
    let _ = id;
    // Sent and open: the session is expired, through the outbox, once.
    let id = billing::begin(&client, "acct-w2", "price_pro", 1).await;
    let session = billing::subscription_session("cs_w2", id, "acct-w2", "open", None);
    billing::answer(&client, id, "create_subscription_session", session).await;
    for _ in 0..2 {
        client
            .execute("SELECT pay.cancel_subscription('acct-w2')", &[])
            .await
            .unwrap();
    }
    let rows = client
        .query(
            "SELECT request ->> 'path', status FROM pay.outbox WHERE subscription_id = $1 AND kind = 'expire_checkout_session'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].get::<_, String>(0),
        "/v1/checkout/sessions/cs_w2/expire"
    );
    assert_eq!(rows[0].get::<_, String>(1), "pending");
    let expired = billing::subscription_session("cs_w2", id, "acct-w2", "expired", None);
    assert!(
        billing::answer(&client, id, "expire_checkout_session", expired)
            .await
            .1
    );
    let row = client
        .query_one(
            "SELECT entitled, reason FROM pay.entitlements WHERE subscription_ref = 'acct-w2'",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "checkout expired");
    // The expired session's URL is never handed out again.
    let err = client
        .query_one(
            "SELECT pay.wait_for_subscription_checkout('acct-w2', 100)",
            &[],
        )
        .await
        .expect_err("the sign-up is over");
    assert_eq!(sqlstate(&err), Some("55000"));
}

#[tokio::test]
async fn roles_app_may_subscribe_and_read_entitlements_webhook_may_not() {
    let (_db, client) = setup().await;
    client.batch_execute("SET ROLE pay_app").await.unwrap();
    billing::begin(&client, "acct-roles", "price_pro", 1).await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.entitlements WHERE NOT entitled"
        )
        .await,
        1
    );
    client
        .query("SELECT * FROM pay.subscription_timeline('acct-roles')", &[])
        .await
        .unwrap();
    client
        .query(
            "SELECT * FROM pay.claim_invoice_fulfillments('c', 10, '1 minute')",
            &[],
        )
        .await
        .unwrap();
    // The application cannot write subscriptions, invoices or fulfillments by hand.
    for sql in [
        "UPDATE pay.subscriptions SET status = 'active'",
        "INSERT INTO pay.invoice_fulfillments (stripe_invoice_id, subscription_id, subscription_ref) VALUES ('in_x', gen_random_uuid(), 'x')",
        "SELECT pay._apply_billing_object(gen_random_uuid(), '{}', NULL, 'x', NULL, 1)",
    ] {
        let err = client.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("42501"), "{sql}");
    }
    client
        .batch_execute("RESET ROLE; SET ROLE pay_webhook")
        .await
        .unwrap();
    for sql in [
        "SELECT pay.begin_subscription('acct-x', 'price_pro')",
        "SELECT * FROM pay.entitlements",
        "SELECT pay.cancel_subscription('acct-roles')",
        "SELECT pay.complete_invoice_fulfillment('in_1')",
    ] {
        let err = client.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("42501"), "{sql}");
    }
    client
        .batch_execute("RESET ROLE; SET ROLE pay_auditor")
        .await
        .unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.subscriptions").await,
        1
    );
    let err = client
        .execute("SELECT pay.begin_subscription('acct-y', 'price_pro')", &[])
        .await
        .expect_err("the auditor only reads");
    assert_eq!(sqlstate(&err), Some("42501"));
}
