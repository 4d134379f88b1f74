//! `pay.begin_checkout`: Stripe's input rules, idempotency, races and superseding.

use std::time::Duration;

use pgpay_tests::{count, fixtures, sqlstate, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

async fn checkout(
    client: &Client,
    order: &str,
    amount: i64,
    currency: &str,
) -> Result<Uuid, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, $2, $3)",
            &[&order, &amount, &currency],
        )
        .await
        .map(|row| row.get(0))
}

#[tokio::test]
async fn bad_input_is_22023_naming_the_field_and_writes_nothing() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let long_key = "k".repeat(41);
    let cases: Vec<(&str, String, &str)> = vec![
        ("amount", "SELECT pay.begin_checkout('o', 0, 'usd')".into(), "amount"),
        ("negative amount", "SELECT pay.begin_checkout('o', -1, 'usd')".into(), "amount"),
        ("too large", "SELECT pay.begin_checkout('o', 100000000, 'usd')".into(), "amount"),
        ("null amount", "SELECT pay.begin_checkout('o', NULL, 'usd')".into(), "amount"),
        ("currency", "SELECT pay.begin_checkout('o', 100, 'us')".into(), "currency"),
        ("unknown currency", "SELECT pay.begin_checkout('o', 100, 'abc')".into(), "currency"),
        ("below Stripe's minimum", "SELECT pay.begin_checkout('o', 29, 'gbp')".into(), "amount"),
        ("empty order", "SELECT pay.begin_checkout('', 100, 'usd')".into(), "order_ref"),
        ("null order", "SELECT pay.begin_checkout(NULL, 100, 'usd')".into(), "order_ref"),
        ("long order", format!("SELECT pay.begin_checkout('{}', 100, 'usd')", "o".repeat(201)), "order_ref"),
        ("metadata array", "SELECT pay.begin_checkout('o', 100, 'usd', metadata => '[]')".into(), "metadata"),
        ("metadata nested", r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{"a":{"b":"c"}}')"#.into(), "metadata"),
        ("metadata number", r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{"a":1}')"#.into(), "metadata"),
        ("metadata key", format!(r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{{"{long_key}":"v"}}')"#), "metadata"),
        ("metadata value", format!(r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{{"k":"{}"}}')"#, "v".repeat(501)), "metadata"),
        ("metadata reserved", r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{"pgpay_payment_id":"x"}')"#.into(), "metadata"),
        ("too many keys", "SELECT pay.begin_checkout('o', 100, 'usd', metadata => (SELECT jsonb_object_agg('k' || i, 'v') FROM generate_series(1, 48) i))".to_string(), "metadata"),
        ("description", format!("SELECT pay.begin_checkout('o', 100, 'usd', description => '{}')", "d".repeat(1001)), "description"),
        // Refused by pgpay before Rust reads the jsonb (serde_json stops at 128 levels and at
        // numbers beyond f64; that error would be an internal XX000).
        ("metadata 129 levels deep", format!(r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{}"x"{}')"#, r#"{"a":"#.repeat(129), "}".repeat(129)), "metadata"),
        ("metadata beyond f64", r#"SELECT pay.begin_checkout('o', 100, 'usd', metadata => '{"a":1e400}')"#.into(), "metadata"),
    ];
    for (name, sql, field) in cases {
        let err = client.query(sql.as_str(), &[]).await.expect_err(name);
        assert_eq!(sqlstate(&err), Some("22023"), "{name}: {err}");
        let message = err.as_db_error().unwrap().message().to_string();
        assert!(message.starts_with(field), "{name}: {message}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM pay.payments").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 0);
    // The limits themselves are accepted.
    client
        .query(
            "SELECT pay.begin_checkout($1, 99999999, 'EUR', metadata => (SELECT jsonb_object_agg('k' || i, repeat('v', 500)) FROM generate_series(1, 47) i))",
            &[&"o".repeat(200)],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn same_call_returns_the_same_row_and_writes_one_exact_command() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let sql = r#"SELECT id, currency, status::text FROM pay.begin_checkout('order-1', 2000, 'USD', 'cust-9', '{"sku":"A-1","note":"a b&c=d"}', 'Two socks')"#;
    let first = client.query_one(sql, &[]).await.unwrap();
    let second = client.query_one(sql, &[]).await.unwrap();
    let id: Uuid = first.get(0);
    assert_eq!(id, second.get::<_, Uuid>(0));
    assert_eq!(first.get::<_, String>(1), "usd");
    assert_eq!(first.get::<_, String>(2), "creating");
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 1);
    let row = client
        .query_one(
            "SELECT kind, idempotency_key, request, status FROM pay.outbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "create_payment_intent");
    let key: String = row.get(1);
    assert!(key.starts_with("pgpay.pi_create:") && key.len() <= 255);
    let request: Value = row.get(2);
    assert_eq!(
        request,
        json!({
            "method": "POST",
            "path": "/v1/payment_intents",
            "params": {
                "amount": "2000",
                "currency": "usd",
                "description": "Two socks",
                "metadata[pgpay_payment_id]": id.to_string(),
                "metadata[order_ref]": "order-1",
                "metadata[customer_ref]": "cust-9",
                "metadata[sku]": "A-1",
                "metadata[note]": "a b&c=d",
            }
        })
    );
    assert_eq!(row.get::<_, String>(3), "pending");
    // Metadata key order does not make a call different.
    let reordered: Uuid = client
        .query_one(
            r#"SELECT id FROM pay.begin_checkout('order-1', 2000, 'usd', 'cust-9', '{"note":"a b&c=d","sku":"A-1"}', 'Two socks')"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reordered, id);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.audit_log").await,
        1
    );
}

#[tokio::test]
async fn twenty_sessions_racing_the_same_call_make_one_payment_and_one_command() {
    let db = TestDb::create().await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(db.connect().await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                checkout(&client, "race-1", 1234, "usd").await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().expect("no session may fail"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every session got the same payment");
    let client = db.connect().await;
    assert_eq!(count(&client, "SELECT count(*) FROM pay.payments").await, 1);
    assert_eq!(count(&client, "SELECT count(*) FROM pay.outbox").await, 1);
}

#[tokio::test]
async fn racing_changed_parameters_leave_exactly_one_live_attempt() {
    let db = TestDb::create().await;
    let mut tasks = Vec::new();
    for i in 0..10i64 {
        let client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            checkout(&client, "race-2", 100 + i, "usd").await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("no session may fail");
    }
    let client = db.connect().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.payments").await,
        10
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.payments WHERE status NOT IN ('superseded')"
        )
        .await,
        1
    );
    // Never-sent creates of superseded attempts are skipped, so only the live one is pending.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'pending'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn changed_parameters_supersede_and_cancel_the_old_payment_intent() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let old = checkout(&client, "order-2", 1000, "usd").await.unwrap();
    let old_key: String = client
        .query_one(
            "SELECT idempotency_key FROM pay.outbox WHERE payment_id = $1",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    // The worker sends the create and Stripe answers.
    let claimed = client
        .query("SELECT id, attempts FROM pay.claim_outbox('w')", &[])
        .await
        .unwrap();
    let (command, attempt): (i64, i32) = (claimed[0].get(0), claimed[0].get(1));
    let intent = fixtures::payment_intent(
        "pi_old",
        &old.to_string(),
        1000,
        "usd",
        "requires_payment_method",
    );
    let done: bool = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &intent],
        )
        .await
        .unwrap()
        .get(0);
    assert!(done);

    let new = checkout(&client, "order-2", 1500, "usd").await.unwrap();
    assert_ne!(new, old);
    let row = client
        .query_one(
            "SELECT status::text, superseded_by FROM pay.payments WHERE id = $1",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "superseded");
    assert_eq!(row.get::<_, Option<Uuid>>(1), Some(new));
    let attempt_no: i32 = client
        .query_one("SELECT attempt FROM pay.payments WHERE id = $1", &[&new])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempt_no, 2);
    let cancel = client
        .query_one(
            "SELECT request, status FROM pay.outbox WHERE payment_id = $1 AND kind = 'cancel_payment_intent'",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(
        cancel.get::<_, Value>(0)["path"],
        "/v1/payment_intents/pi_old/cancel"
    );
    assert_eq!(cancel.get::<_, String>(1), "pending");
    let new_key: String = client
        .query_one(
            "SELECT idempotency_key FROM pay.outbox WHERE payment_id = $1 AND kind = 'create_payment_intent'",
            &[&new],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_key, old_key, "a new attempt has a new key");
    // Calling with the new parameters again changes nothing.
    assert_eq!(
        checkout(&client, "order-2", 1500, "usd").await.unwrap(),
        new
    );
    assert_eq!(count(&client, "SELECT count(*) FROM pay.payments").await, 2);
}

#[tokio::test]
async fn superseding_a_create_in_flight_cancels_once_the_intent_is_known() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let old = checkout(&client, "order-3", 1000, "usd").await.unwrap();
    let claimed = client
        .query("SELECT id, attempts FROM pay.claim_outbox('w')", &[])
        .await
        .unwrap();
    let (command, attempt): (i64, i32) = (claimed[0].get(0), claimed[0].get(1));
    // Parameters change while the create is on its way to Stripe.
    checkout(&client, "order-3", 2000, "usd").await.unwrap();
    let waiting: String = client
        .query_one("SELECT status FROM pay.outbox WHERE payment_id = $1 AND kind = 'cancel_payment_intent'", &[&old])
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, "waiting");
    // No worker may claim a command whose path is not known yet.
    let next = client
        .query("SELECT kind FROM pay.claim_outbox('w2')", &[])
        .await
        .unwrap();
    assert!(next
        .iter()
        .all(|r| r.get::<_, String>(0) == "create_payment_intent"));
    let intent = fixtures::payment_intent(
        "pi_late",
        &old.to_string(),
        1000,
        "usd",
        "requires_payment_method",
    );
    client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &intent],
        )
        .await
        .unwrap();
    let cancel = client
        .query_one("SELECT status, request->>'path' FROM pay.outbox WHERE payment_id = $1 AND kind = 'cancel_payment_intent'", &[&old])
        .await
        .unwrap();
    assert_eq!(cancel.get::<_, String>(0), "pending");
    assert_eq!(
        cancel.get::<_, String>(1),
        "/v1/payment_intents/pi_late/cancel"
    );
    let status: String = client
        .query_one(
            "SELECT status::text FROM pay.payments WHERE id = $1",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "superseded",
        "a superseded attempt stays superseded"
    );
}

#[tokio::test]
async fn a_paid_order_refuses_a_new_checkout() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let id = checkout(&client, "order-4", 700, "gbp").await.unwrap();
    assert!(fixtures::answer_create(&client, id, "pi_paid", "succeeded").await);
    let err = checkout(&client, "order-4", 800, "gbp").await.unwrap_err();
    assert_eq!(sqlstate(&err), Some("55000"));
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("already paid"));
    // The same call as the paid one still answers with the paid row.
    assert_eq!(checkout(&client, "order-4", 700, "gbp").await.unwrap(), id);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
}

#[tokio::test]
async fn the_outbox_doorbell_rings_once_per_transaction() {
    let db = TestDb::create().await;
    let (listener, mut connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN pay_outbox").await.unwrap();
    let client = db.connect().await;
    client
        .batch_execute("BEGIN; SELECT pay.begin_checkout('n-1', 100, 'usd'); SELECT pay.begin_checkout('n-2', 100, 'usd'); COMMIT;")
        .await
        .unwrap();
    let (channel, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!((channel.as_str(), payload.as_str()), ("pay_outbox", ""));
    // Two commands, one doorbell.
    listener.batch_execute("SELECT 1").await.unwrap();
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn cancel_before_sending_needs_no_stripe_call() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let id = checkout(&client, "order-5", 900, "usd").await.unwrap();
    let status: String = client
        .query_one("SELECT status::text FROM pay.cancel_checkout($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "canceled");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'skipped'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'pending'"
        )
        .await,
        0
    );
    // A canceled order may start again.
    let again = checkout(&client, "order-5", 950, "usd").await.unwrap();
    assert_ne!(again, id);
}

#[tokio::test]
async fn stripes_rules_are_explained_in_the_refusal() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let cases = [
        (
            "SELECT pay.begin_checkout('o', 49, 'USD')",
            "amount 49 is below Stripe's minimum charge for USD: 50 minor units ($0.50)",
        ),
        (
            "SELECT pay.begin_checkout('o', 49, 'jpy')",
            "amount 49 is below Stripe's minimum charge for JPY: 50 minor units (¥50)",
        ),
        (
            "SELECT pay.begin_checkout('o', 5000, 'xyz')",
            "currency \"xyz\" is not a currency Stripe supports",
        ),
        (
            "SELECT pay.begin_checkout('o', 5000, 'u5d')",
            "currency must be a three-letter ISO 4217 code such as 'usd', got \"u5d\"",
        ),
    ];
    for (sql, expected) in cases {
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("22023"), "{sql}: {err}");
        assert_eq!(err.as_db_error().unwrap().message(), expected, "{sql}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM pay.payments").await, 0);
    // At the minimum itself Stripe accepts, and so do we.
    checkout(&client, "o", 30, "gbp")
        .await
        .expect("£0.30 is Stripe's minimum");
}

#[tokio::test]
async fn the_same_cart_after_a_cancel_or_a_refused_create_starts_a_new_attempt() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    // Canceled before anything was sent: the same call again is a customer retrying the cart.
    let first = checkout(&client, "retry-cart", 1500, "usd").await.unwrap();
    client
        .execute("SELECT pay.cancel_checkout($1)", &[&first])
        .await
        .unwrap();
    let second = checkout(&client, "retry-cart", 1500, "usd").await.unwrap();
    assert_ne!(first, second, "a canceled attempt is not handed out again");
    assert_eq!(
        checkout(&client, "retry-cart", 1500, "usd").await.unwrap(),
        second,
        "the live attempt is returned as before"
    );
    let keys: Vec<String> = client
        .query(
            "SELECT o.idempotency_key FROM pay.outbox o JOIN pay.payments p ON p.id = o.payment_id
             WHERE p.order_ref = 'retry-cart' AND o.kind = 'create_payment_intent' ORDER BY p.attempt",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "a new attempt gets a new Idempotency-Key");

    // Stripe refused the create (a permanent 4xx): the same call starts attempt 3.
    let command = fixtures::claim_command(&client, second, "create_payment_intent").await;
    let refused = json!({"error": {"type": "invalid_request_error", "message": "Your account cannot charge in USD."}});
    client
        .execute(
            "SELECT pay.fail_outbox($1, $2, 400, $3)",
            &[&command.0, &command.1, &refused],
        )
        .await
        .unwrap();
    let status: String = client
        .query_one(
            "SELECT status::text FROM pay.payments WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "create_failed");
    let third = checkout(&client, "retry-cart", 1500, "usd").await.unwrap();
    assert_ne!(third, second);
    let attempt: i32 = client
        .query_one("SELECT attempt FROM pay.payments WHERE id = $1", &[&third])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempt, 3);
}
