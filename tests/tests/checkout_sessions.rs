//! Checkout Sessions (session mode) in the database: `pay.begin_checkout(..., mode => 'session')`,
//! the create and expire commands, `pay.wait_for_checkout`, and every session event through the
//! one transition rule, signed by the official Stripe SDK's scheme. Objects are built on the
//! shapes Stripe publishes (tests/fixtures/stripe/).

use std::sync::Arc;

use pgpay_tests::stripe_sdk::{sign_now, unix_now};
use pgpay_tests::{count, fixtures, sqlstate, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

const SECRET: &str = "whsec_test_sessions_0123456789";
const OK_URL: &str = "https://shop.example/thanks?session_id={CHECKOUT_SESSION_ID}";

async fn setup() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    (db, client)
}

async fn begin_session(client: &Client, order: &str, amount: i64) -> Uuid {
    client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, $2, 'usd', mode => 'session', success_url => $3)",
            &[&order, &amount, &OK_URL],
        )
        .await
        .unwrap()
        .get(0)
}

/// Plays the worker for the session create: Stripe answers an open session `session`.
async fn answer_session_create(client: &Client, payment: Uuid, order: &str, session: &str) {
    let answered = fixtures::answer_command(
        client,
        payment,
        "create_checkout_session",
        |amount, currency| {
            fixtures::checkout_session(
                session,
                &payment.to_string(),
                order,
                amount,
                currency,
                "open",
                "unpaid",
                None,
            )
        },
    )
    .await;
    assert!(answered);
}

async fn session_payment(client: &Client, order: &str, amount: i64, session: &str) -> Uuid {
    let payment = begin_session(client, order, amount).await;
    answer_session_create(client, payment, order, session).await;
    payment
}

#[allow(clippy::too_many_arguments)]
fn session_event(
    event_id: &str,
    kind: &str,
    payment: Uuid,
    order: &str,
    amount: i64,
    session: &str,
    status: &str,
    payment_status: &str,
    intent: Option<&str>,
) -> String {
    fixtures::event(
        event_id,
        kind,
        unix_now(),
        fixtures::checkout_session(
            session,
            &payment.to_string(),
            order,
            amount,
            "usd",
            status,
            payment_status,
            intent,
        ),
    )
}

fn intent_event(
    event_id: &str,
    kind: &str,
    intent: &str,
    payment: Uuid,
    amount: i64,
    status: &str,
) -> String {
    fixtures::event(
        event_id,
        kind,
        unix_now(),
        fixtures::payment_intent(intent, &payment.to_string(), amount, "usd", status),
    )
}

async fn deliver(client: &Client, payload: &str) -> (String, String) {
    let row = client
        .query_one(
            "SELECT status, coalesce(detail, '') FROM pay.ingest_webhook($1, $2)",
            &[&payload, &sign_now(payload, SECRET)],
        )
        .await
        .expect("ingest never raises on a signed event");
    (row.get(0), row.get(1))
}

async fn status_of(client: &Client, id: Uuid) -> String {
    client
        .query_one(
            "SELECT status::text FROM pay.payments WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

async fn fulfillments(client: &Client, id: Uuid) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pay.fulfillments WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn bad_session_arguments_raise_22023_naming_the_field_and_write_nothing() {
    let (_db, client) = setup().await;
    let long = format!("https://shop.example/{}", "a".repeat(5000));
    let cases: [(&str, Option<&str>, Option<&str>, &str); 6] = [
        ("session", None, None, "success_url"),
        ("session", Some("/thanks"), None, "success_url"),
        ("session", Some(long.as_str()), None, "success_url"),
        (
            "session",
            Some(OK_URL),
            Some("ftp://shop.example"),
            "cancel_url",
        ),
        ("payment_intent", Some(OK_URL), None, "success_url"),
        ("hosted", Some(OK_URL), None, "mode"),
    ];
    for (mode, success, cancel, field) in cases {
        let err = client
            .query_one(
                "SELECT pay.begin_checkout('o-bad', 500, 'usd', mode => $1, success_url => $2, cancel_url => $3)",
                &[&mode, &success, &cancel],
            )
            .await
            .expect_err("bad session arguments");
        assert_eq!(
            sqlstate(&err),
            Some("22023"),
            "{mode} {success:?} {cancel:?}: {err}"
        );
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(message.starts_with(field), "{mode}: {message}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM pay.payments").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM pay.orders").await, 0);
}

#[tokio::test]
async fn a_session_checkout_writes_one_create_with_our_ids_in_both_metadata() {
    let (_db, client) = setup().await;
    let payment: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout('o-cs-1', 1999, 'EUR', 'cust-9', '{\"plan\": \"pro\"}', 'Pro plan',
                                               'session', $1, 'https://shop.example/cart')",
            &[&OK_URL],
        )
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT o.kind::text, o.request, o.idempotency_key::text, p.mode::text FROM pay.outbox o
             JOIN pay.payments p ON p.id = o.payment_id WHERE o.payment_id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    let (kind, request, key, mode): (String, Value, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (kind.as_str(), mode.as_str()),
        ("create_checkout_session", "session")
    );
    assert_eq!(request["method"], "POST");
    assert_eq!(request["path"], "/v1/checkout/sessions");
    let id = payment.to_string();
    let params = &request["params"];
    for (k, v) in [
        ("mode", "payment"),
        ("success_url", OK_URL),
        ("cancel_url", "https://shop.example/cart"),
        ("client_reference_id", "o-cs-1"),
        ("line_items[0][quantity]", "1"),
        ("line_items[0][price_data][currency]", "eur"),
        ("line_items[0][price_data][unit_amount]", "1999"),
        ("line_items[0][price_data][product_data][name]", "Pro plan"),
        ("metadata[pgpay_payment_id]", id.as_str()),
        ("metadata[order_ref]", "o-cs-1"),
        ("metadata[customer_ref]", "cust-9"),
        ("metadata[plan]", "pro"),
        (
            "payment_intent_data[metadata][pgpay_payment_id]",
            id.as_str(),
        ),
        ("payment_intent_data[metadata][order_ref]", "o-cs-1"),
        ("payment_intent_data[metadata][plan]", "pro"),
        ("payment_intent_data[description]", "Pro plan"),
    ] {
        assert_eq!(params[k], v, "{k}");
    }
    // Deterministic: the same order, attempt and parameters give the same key.
    let expected: String = client
        .query_one(
            "SELECT pay.idempotency_key('pgpay.cs_create', jsonb_build_object('order_ref', 'o-cs-1', 'attempt', 1,
                    'params', (SELECT params_fingerprint FROM pay.payments WHERE id = $1)))",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, expected);
}

#[tokio::test]
async fn twenty_racing_session_checkouts_make_one_payment_and_one_create() {
    let db = TestDb::create().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = Arc::new(db.connect().await);
        tasks.push(tokio::spawn(async move {
            begin_session(&client, "o-race", 2500).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every caller got the same payment");
    let client = db.connect().await;
    assert_eq!(count(&client, "SELECT count(*) FROM pay.payments").await, 1);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'create_checkout_session'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn wait_for_checkout_hands_over_the_url_and_wait_for_intent_refuses_session_mode() {
    let (_db, client) = setup().await;
    let payment = begin_session(&client, "o-wait", 1500).await;
    let err = client
        .query_one("SELECT pay.wait_for_checkout($1, 50)", &[&payment])
        .await
        .expect_err("no session yet");
    assert_eq!(sqlstate(&err), Some("57014"), "{err}");
    answer_session_create(&client, payment, "o-wait", "cs_test_wait").await;
    let row = client
        .query_one(
            "SELECT checkout_url, stripe_checkout_session_id, status::text, checkout_expires_at IS NOT NULL
             FROM pay.wait_for_checkout($1, 1000)",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "https://checkout.stripe.com/c/pay/cs_test_wait"
    );
    assert_eq!(row.get::<_, String>(1), "cs_test_wait");
    assert_eq!(row.get::<_, String>(2), "requires_payment_method");
    assert!(row.get::<_, bool>(3));
    let err = client
        .query_one("SELECT pay.wait_for_intent($1, 50)", &[&payment])
        .await
        .expect_err("session mode has no client secret");
    assert_eq!(sqlstate(&err), Some("55000"), "{err}");
    // The same call again returns the same row, writing nothing.
    assert_eq!(begin_session(&client, "o-wait", 1500).await, payment);
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 1);
}

#[tokio::test]
async fn completion_duplicated_and_reordered_with_payment_intent_succeeded_fulfils_once() {
    let (_db, client) = setup().await;
    // Order A: payment_intent.succeeded first (the session's PaymentIntent is not known yet; our
    // metadata in payment_intent_data finds the payment), then the completion, twice.
    let a = session_payment(&client, "o-a", 2000, "cs_test_a").await;
    let pi_first = intent_event(
        "evt_a_pi",
        "payment_intent.succeeded",
        "pi_a",
        a,
        2000,
        "succeeded",
    );
    assert_eq!(deliver(&client, &pi_first).await.0, "applied");
    assert_eq!(status_of(&client, a).await, "succeeded");
    let completed = session_event(
        "evt_a_cs",
        "checkout.session.completed",
        a,
        "o-a",
        2000,
        "cs_test_a",
        "complete",
        "paid",
        Some("pi_a"),
    );
    assert_eq!(deliver(&client, &completed).await.0, "applied");
    assert_eq!(deliver(&client, &completed).await.0, "duplicate");
    assert_eq!(fulfillments(&client, a).await, 1);

    // Order B: the completion first, then payment_intent.succeeded and charge.succeeded.
    let b = session_payment(&client, "o-b", 2000, "cs_test_b").await;
    let completed = session_event(
        "evt_b_cs",
        "checkout.session.completed",
        b,
        "o-b",
        2000,
        "cs_test_b",
        "complete",
        "paid",
        Some("pi_b"),
    );
    let (status, detail) = deliver(&client, &completed).await;
    assert_eq!(status, "applied", "{detail}");
    assert_eq!(status_of(&client, b).await, "succeeded");
    let pi_id: Option<String> = client
        .query_one(
            "SELECT stripe_payment_intent_id FROM pay.payments WHERE id = $1",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        pi_id.as_deref(),
        Some("pi_b"),
        "the session's PaymentIntent is recorded"
    );
    let pi_after = intent_event(
        "evt_b_pi",
        "payment_intent.succeeded",
        "pi_b",
        b,
        2000,
        "succeeded",
    );
    assert_eq!(deliver(&client, &pi_after).await.0, "applied");
    assert_eq!(deliver(&client, &completed).await.0, "duplicate");
    assert_eq!(fulfillments(&client, b).await, 1);
    // A refund event on that PaymentIntent (no metadata) resolves to the same payment.
    let refund = fixtures::event(
        "evt_b_re",
        "refund.created",
        unix_now(),
        json!({"id": "re_b", "object": "refund", "amount": 500, "currency": "usd", "status": "succeeded",
               "payment_intent": "pi_b", "metadata": {}}),
    );
    assert_eq!(deliver(&client, &refund).await.0, "applied");
    let refunded: i64 = client
        .query_one(
            "SELECT amount_refunded FROM pay.payments WHERE id = $1",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(refunded, 500);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        2
    );
}

#[tokio::test]
async fn a_delayed_payment_is_processing_until_async_success_then_fulfilled_once() {
    let (_db, client) = setup().await;
    let p = session_payment(&client, "o-sepa", 3000, "cs_test_sepa").await;
    let unpaid = session_event(
        "evt_s1",
        "checkout.session.completed",
        p,
        "o-sepa",
        3000,
        "cs_test_sepa",
        "complete",
        "unpaid",
        Some("pi_sepa"),
    );
    assert_eq!(deliver(&client, &unpaid).await.0, "applied");
    assert_eq!(status_of(&client, p).await, "processing");
    assert_eq!(fulfillments(&client, p).await, 0);
    let paid = session_event(
        "evt_s2",
        "checkout.session.async_payment_succeeded",
        p,
        "o-sepa",
        3000,
        "cs_test_sepa",
        "complete",
        "paid",
        Some("pi_sepa"),
    );
    assert_eq!(deliver(&client, &paid).await.0, "applied");
    assert_eq!(status_of(&client, p).await, "succeeded");
    let pi = intent_event(
        "evt_s3",
        "payment_intent.succeeded",
        "pi_sepa",
        p,
        3000,
        "succeeded",
    );
    assert_eq!(deliver(&client, &pi).await.0, "applied");
    assert_eq!(fulfillments(&client, p).await, 1);
}

#[tokio::test]
async fn a_failed_delayed_payment_ends_the_attempt_and_the_order_can_begin_again() {
    let (_db, client) = setup().await;
    let p = session_payment(&client, "o-fail", 3000, "cs_test_fail").await;
    let unpaid = session_event(
        "evt_f1",
        "checkout.session.completed",
        p,
        "o-fail",
        3000,
        "cs_test_fail",
        "complete",
        "unpaid",
        Some("pi_fail"),
    );
    assert_eq!(deliver(&client, &unpaid).await.0, "applied");
    let failed = session_event(
        "evt_f2",
        "checkout.session.async_payment_failed",
        p,
        "o-fail",
        3000,
        "cs_test_fail",
        "complete",
        "unpaid",
        Some("pi_fail"),
    );
    assert_eq!(deliver(&client, &failed).await.0, "applied");
    assert_eq!(status_of(&client, p).await, "canceled");
    // The PaymentIntent's own failure afterwards changes nothing: canceled absorbs.
    let pi_failed = intent_event(
        "evt_f3",
        "payment_intent.payment_failed",
        "pi_fail",
        p,
        3000,
        "requires_payment_method",
    );
    deliver(&client, &pi_failed).await;
    assert_eq!(status_of(&client, p).await, "canceled");
    // Reconciliation reads that PaymentIntent, left at requires_payment_method: nobody can pay it
    // any more, so it does not contradict the cancel (no finding for a human). One that took the
    // money would.
    let reconciled = |status: &str| {
        let intent = fixtures::payment_intent("pi_fail", &p.to_string(), 3000, "usd", status);
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT outcome FROM pay.apply_stripe_object($1)",
                    &[&intent],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(reconciled("requires_payment_method").await, "ignored");
    let findings = "SELECT count(*) FROM pay.findings WHERE kind = 'status_mismatch'";
    assert_eq!(count(&client, findings).await, 0);
    assert_eq!(reconciled("succeeded").await, "ignored");
    assert_eq!(count(&client, findings).await, 1);
    let again = begin_session(&client, "o-fail", 3000).await;
    assert_ne!(again, p, "a new attempt");
    let keys = count(&client, "SELECT count(DISTINCT idempotency_key) FROM pay.outbox WHERE kind = 'create_checkout_session'").await;
    assert_eq!(keys, 2, "the new attempt has its own key");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );
}

#[tokio::test]
async fn an_expired_session_is_canceled_and_the_same_order_begins_again() {
    let (_db, client) = setup().await;
    let p = session_payment(&client, "o-exp", 1200, "cs_test_exp").await;
    let expired = session_event(
        "evt_e1",
        "checkout.session.expired",
        p,
        "o-exp",
        1200,
        "cs_test_exp",
        "expired",
        "unpaid",
        None,
    );
    assert_eq!(deliver(&client, &expired).await.0, "applied");
    assert_eq!(status_of(&client, p).await, "canceled");
    let row = client
        .query_one(
            "SELECT id, attempt FROM pay.begin_checkout('o-exp', 1200, 'usd', mode => 'session', success_url => $1)",
            &[&OK_URL],
        )
        .await
        .unwrap();
    let (again, attempt): (Uuid, i32) = (row.get(0), row.get(1));
    assert_ne!(again, p);
    assert_eq!(attempt, 2);
    assert_eq!(status_of(&client, again).await, "creating");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.outbox WHERE kind = 'create_checkout_session' AND status = 'pending'").await,
        1
    );
}

#[tokio::test]
async fn a_session_whose_total_differs_is_flagged_and_not_fulfilled() {
    let (_db, client) = setup().await;
    let p = session_payment(&client, "o-mis", 2000, "cs_test_mis").await;
    let wrong = session_event(
        "evt_m1",
        "checkout.session.completed",
        p,
        "o-mis",
        1000,
        "cs_test_mis",
        "complete",
        "paid",
        Some("pi_mis"),
    );
    assert_eq!(deliver(&client, &wrong).await.0, "applied");
    let flagged: Option<String> = client
        .query_one(
            "SELECT flagged_reason FROM pay.payments WHERE id = $1",
            &[&p],
        )
        .await
        .unwrap()
        .get(0);
    assert!(flagged.unwrap().contains("amount_total 1000 differs"));
    assert_eq!(fulfillments(&client, p).await, 0);
}

#[tokio::test]
async fn cancel_expires_an_open_session_and_a_superseded_paid_session_is_refunded_once() {
    let (_db, client) = setup().await;
    // cancel_checkout on an open session: an expire command for that session.
    let c = session_payment(&client, "o-cancel", 900, "cs_test_cancel").await;
    client
        .query_one("SELECT pay.cancel_checkout($1)", &[&c])
        .await
        .unwrap();
    let path: Value = client
        .query_one("SELECT request -> 'path' FROM pay.outbox WHERE payment_id = $1 AND kind = 'expire_checkout_session'", &[&c])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, "/v1/checkout/sessions/cs_test_cancel/expire");
    let answered =
        fixtures::answer_command(&client, c, "expire_checkout_session", |amount, currency| {
            fixtures::checkout_session(
                "cs_test_cancel",
                &c.to_string(),
                "o-cancel",
                amount,
                currency,
                "expired",
                "unpaid",
                None,
            )
        })
        .await;
    assert!(answered);
    assert_eq!(status_of(&client, c).await, "canceled");

    // Two tabs: the order's amount changes (the old session is superseded and expired), but the
    // customer pays the old session anyway. One order, one kept charge: refunded once.
    let old = session_payment(&client, "o-tabs", 1000, "cs_test_old").await;
    let new = begin_session(&client, "o-tabs", 1500).await;
    assert_eq!(status_of(&client, old).await, "superseded");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.outbox WHERE kind = 'expire_checkout_session' AND request ->> 'path' LIKE '%cs_test_old%'").await,
        1
    );
    let paid_old = session_event(
        "evt_t1",
        "checkout.session.completed",
        old,
        "o-tabs",
        1000,
        "cs_test_old",
        "complete",
        "paid",
        Some("pi_old"),
    );
    deliver(&client, &paid_old).await;
    let pi_old = intent_event(
        "evt_t2",
        "payment_intent.succeeded",
        "pi_old",
        old,
        1000,
        "succeeded",
    );
    deliver(&client, &pi_old).await;
    deliver(&client, &paid_old).await;
    let refunds = client
        .query(
            "SELECT request #>> '{params,payment_intent}', request #>> '{params,reason}' FROM pay.outbox
             WHERE payment_id = $1 AND kind = 'refund'",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(refunds.len(), 1, "refunded once");
    assert_eq!(refunds[0].get::<_, String>(0), "pi_old");
    assert_eq!(refunds[0].get::<_, String>(1), "duplicate");
    assert_eq!(fulfillments(&client, old).await, 0);
    assert_eq!(status_of(&client, new).await, "creating");
}

#[tokio::test]
async fn reconciliation_adopts_a_session_whose_create_answer_was_lost_and_repairs_lost_webhooks() {
    let (_db, client) = setup().await;
    // The create reached Stripe but its answer was lost; every webhook was lost too.
    let p = begin_session(&client, "o-rec", 4000).await;
    let session = fixtures::checkout_session(
        "cs_test_rec",
        &p.to_string(),
        "o-rec",
        4000,
        "usd",
        "complete",
        "paid",
        Some("pi_rec"),
    );
    let intent = fixtures::payment_intent("pi_rec", &p.to_string(), 4000, "usd", "succeeded");
    let rows = client
        .query(
            "SELECT outcome FROM pay.apply_stripe_objects($1, 'reconcile', NULL)",
            &[&json!([intent, session])],
        )
        .await
        .unwrap();
    let outcomes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(outcomes, ["applied", "adopted"]);
    assert_eq!(status_of(&client, p).await, "succeeded");
    assert_eq!(fulfillments(&client, p).await, 1);
    let row = client
        .query_one(
            "SELECT p.stripe_checkout_session_id, p.stripe_payment_intent_id, o.status
             FROM pay.payments p JOIN pay.outbox o ON o.payment_id = p.id AND o.kind = 'create_checkout_session'
             WHERE p.id = $1",
            &[&p],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cs_test_rec");
    assert_eq!(row.get::<_, String>(1), "pi_rec");
    assert_eq!(
        row.get::<_, String>(2),
        "done",
        "the create is never sent again"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.findings WHERE kind = 'orphan_adopted'"
        )
        .await,
        1
    );
    // A second pass over the same ledger changes nothing.
    let again = client
        .query(
            "SELECT outcome FROM pay.apply_stripe_objects($1, 'reconcile', NULL)",
            &[&json!([session])],
        )
        .await
        .unwrap();
    assert_ne!(again[0].get::<_, String>(0), "adopted");
    assert_eq!(fulfillments(&client, p).await, 1);
}

/// Stuck payments, by id, with how long each has been stuck (whole minutes).
async fn stuck(client: &Client) -> Vec<(Uuid, i64)> {
    client
        .query(
            "SELECT id, floor(extract(epoch FROM stuck_for) / 60)::bigint FROM pay.stuck_payments ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn an_open_session_is_stuck_only_once_its_expiry_has_passed_with_no_event() {
    let (_db, client) = setup().await;
    let age = |id: Uuid, updated: &str, expires: &str| {
        let client = &client;
        let sql = format!(
            "UPDATE pay.payments SET updated_at = now() - interval '{updated}', \
             checkout_expires_at = now() + interval '{expires}' WHERE id = '{id}'"
        );
        async move { client.batch_execute(&sql).await.unwrap() }
    };
    // A customer on the hosted page: the session was made two hours ago and is open for 20
    // more minutes. Not stuck, whatever the threshold.
    let on_page = session_payment(&client, "o-on-page", 1000, "cs_test_on_page").await;
    age(on_page, "2 hours", "20 minutes").await;
    // The session expired two hours ago and checkout.session.expired never came: stuck, for
    // two hours.
    let lost_expiry = session_payment(&client, "o-lost-expiry", 1000, "cs_test_lost").await;
    age(lost_expiry, "26 hours", "-2 hours").await;
    // Expired ten minutes ago: Stripe's event may still be on its way.
    let just_expired = session_payment(&client, "o-just-expired", 1000, "cs_test_just").await;
    age(just_expired, "24 hours", "-10 minutes").await;
    // A PaymentIntent-mode payment untouched for two hours: stuck, as before.
    let intent: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout('o-intent', 1000, 'usd')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        fixtures::answer_create(
            &client,
            intent,
            "pi_stuck_intent",
            "requires_payment_method"
        )
        .await
    );
    client
        .execute(
            "UPDATE pay.payments SET updated_at = now() - interval '2 hours' WHERE id = $1",
            &[&intent],
        )
        .await
        .unwrap();

    let mut want = vec![(lost_expiry, 120), (intent, 120)];
    want.sort();
    assert_eq!(stuck(&client).await, want, "default threshold: one hour");

    client
        .batch_execute("SET pay.stuck_after = '5 minutes'")
        .await
        .unwrap();
    let mut want = vec![(lost_expiry, 120), (intent, 120), (just_expired, 10)];
    want.sort();
    assert_eq!(stuck(&client).await, want, "five minutes past the expiry");

    // The view says which session to look up.
    let row = client
        .query_one(
            "SELECT mode::text, stripe_checkout_session_id, checkout_expires_at < now()
             FROM pay.stuck_payments WHERE id = $1",
            &[&lost_expiry],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, bool>(2)
        ),
        ("session".to_owned(), "cs_test_lost".to_owned(), true)
    );

    // Once the expiry event arrives, the payment is finished and leaves the view.
    let expired = session_event(
        "evt_lost_expiry",
        "checkout.session.expired",
        lost_expiry,
        "o-lost-expiry",
        1000,
        "cs_test_lost",
        "expired",
        "unpaid",
        None,
    );
    assert_eq!(deliver(&client, &expired).await.0, "applied");
    assert!(!stuck(&client)
        .await
        .iter()
        .any(|(id, _)| *id == lost_expiry));
}
