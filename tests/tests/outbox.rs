//! The worker-facing outbox functions: leases, SKIP LOCKED, reclaiming, attempt fencing.

use std::time::Duration;

use pgpay_tests::{fixtures, sqlstate, wait_until, TestDb};
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

async fn new_payment(client: &Client, order: &str) -> Uuid {
    client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, 1000, 'usd')",
            &[&order],
        )
        .await
        .unwrap()
        .get(0)
}

async fn claim(client: &Client, worker: &str, lease: &str) -> Vec<(i64, i32, String)> {
    client
        .query(
            "SELECT id, attempts, idempotency_key FROM pay.claim_outbox($1, 32, $2::text::interval)",
            &[&worker, &lease],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn claims_lease_and_never_hand_one_command_to_two_workers() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    for i in 0..40 {
        new_payment(&client, &format!("o-{i}")).await;
    }
    // Four workers claim at once: every command goes to exactly one of them.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let c = db.connect().await;
        tasks.push(tokio::spawn(async move {
            claim(&c, &format!("w{w}"), "60 seconds").await
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.extend(task.await.unwrap().into_iter().map(|(id, attempt, _)| {
            assert_eq!(attempt, 1);
            id
        }));
    }
    let total = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "no command was claimed twice");
    let rest = claim(&client, "late", "60 seconds").await;
    assert_eq!(total + rest.len(), 40);
    let leased: i64 = client
        .query_one(
            "SELECT count(*) FROM pay.outbox WHERE status = 'in_flight' AND lease_owner IS NOT NULL AND lease_expires > now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leased, 40);
    assert!(claim(&client, "again", "60 seconds").await.is_empty());
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_with_the_same_key_and_the_stale_worker_is_fenced() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = new_payment(&client, "o-lease").await;
    let first = claim(&client, "crashed", "1 second").await;
    assert_eq!(first.len(), 1);
    let (id, attempt_1, key_1) = first[0].clone();
    // The crashed worker never answers; once its lease has run out another worker takes over.
    let reclaimed = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let found = wait_until(Duration::from_secs(5), || {
        let reclaimed = reclaimed.clone();
        let client = &client;
        async move {
            let rows = claim(client, "rescuer", "60 seconds").await;
            let got = !rows.is_empty();
            reclaimed.lock().await.extend(rows);
            got
        }
    })
    .await;
    assert!(found, "the expired lease was reclaimed");
    let (id_2, attempt_2, key_2) = reclaimed.lock().await[0].clone();
    assert_eq!((id_2, attempt_2), (id, attempt_1 + 1));
    assert_eq!(key_2, key_1, "the same Idempotency-Key on every attempt");

    // The crashed worker wakes up and tries to record its (older) answer: refused.
    let stale = fixtures::payment_intent(
        "pi_stale",
        &payment.to_string(),
        1000,
        "usd",
        "requires_payment_method",
    );
    for sql in ["SELECT pay.complete_outbox($1, $2, 200, $3::jsonb)"] {
        let ok: bool = client
            .query_one(sql, &[&id, &attempt_1, &stale])
            .await
            .unwrap()
            .get(0);
        assert!(!ok);
    }
    let retried: bool = client
        .query_one(
            "SELECT pay.retry_outbox($1, $2, 503, 'x', now())",
            &[&id, &attempt_1],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!retried);
    let failed: bool = client
        .query_one(
            "SELECT pay.fail_outbox($1, $2, 400, '{}')",
            &[&id, &attempt_1],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!failed);
    let intent_id: Option<String> = client
        .query_one(
            "SELECT stripe_payment_intent_id FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(intent_id, None, "the stale answer changed nothing");

    // The current holder records its answer.
    let fresh = fixtures::payment_intent(
        "pi_fresh",
        &payment.to_string(),
        1000,
        "usd",
        "requires_payment_method",
    );
    let ok: bool = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&id, &attempt_2, &fresh],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ok);
    let row = client
        .query_one(
            "SELECT stripe_payment_intent_id, client_secret, status::text FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pi_fresh");
    assert_eq!(row.get::<_, String>(1), "pi_fresh_secret_test");
    assert_eq!(row.get::<_, String>(2), "requires_payment_method");
    // Completing twice is refused too: the row is no longer in flight.
    let again: bool = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&id, &attempt_2, &fresh],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!again);
}

#[tokio::test]
async fn retry_waits_for_run_after_and_permanent_failure_stops() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = new_payment(&client, "o-retry").await;
    let (id, attempt, _) = claim(&client, "w", "60 seconds").await[0].clone();
    let ok: bool = client
        .query_one(
            "SELECT pay.retry_outbox($1, $2, 429, 'rate limited', now() + interval '1 hour')",
            &[&id, &attempt],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ok);
    assert!(
        claim(&client, "w", "60 seconds").await.is_empty(),
        "not before run_after"
    );
    client
        .execute(
            "UPDATE pay.outbox SET run_after = now() WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (_, attempt_2, _) = claim(&client, "w", "60 seconds").await[0].clone();
    assert_eq!(attempt_2, attempt + 1);
    let error = json!({"error": {"type": "invalid_request_error", "message": "Invalid currency: zzz", "param": "currency"}});
    let failed: bool = client
        .query_one(
            "SELECT pay.fail_outbox($1, $2, 400, $3)",
            &[&id, &attempt_2, &error],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failed);
    let row = client
        .query_one("SELECT p.status::text, p.last_error, o.status, o.last_error FROM pay.payments p JOIN pay.outbox o ON o.payment_id = p.id WHERE p.id = $1", &[&payment])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "create_failed");
    assert_eq!(row.get::<_, serde_json::Value>(1), error);
    assert_eq!(row.get::<_, String>(2), "dead");
    assert_eq!(row.get::<_, String>(3), "Invalid currency: zzz");
    assert!(
        claim(&client, "w", "60 seconds").await.is_empty(),
        "a dead command is never sent again"
    );
    let timeline: Vec<String> = client
        .query("SELECT event FROM pay.payment_timeline($1)", &[&payment])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        timeline,
        ["created as creating", "creating -> create_failed"]
    );
}

#[tokio::test]
async fn bad_arguments_are_22023() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    for sql in [
        "SELECT * FROM pay.claim_outbox('', 1)",
        "SELECT * FROM pay.claim_outbox('w', 0)",
        "SELECT * FROM pay.claim_outbox('w', 5000)",
        "SELECT * FROM pay.claim_outbox('w', 1, '0 seconds')",
        "SELECT pay.complete_outbox(1, 1, 500, '{}')",
        "SELECT pay.complete_outbox(1, 1, 200, '[]')",
        "SELECT pay.retry_outbox(1, 1, 500, 'x', NULL)",
    ] {
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("22023"), "{sql}: {err}");
    }
}

/// An answer Rust could not read (nested beyond serde_json's 128 levels, a number beyond f64) is
/// refused with 22023 naming `response` before it is read, and the command stays in flight.
#[tokio::test]
async fn an_unreadable_answer_is_22023_and_the_command_stays_in_flight() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    new_payment(&client, "unreadable").await;
    let (id, attempt, _) = claim(&client, "w", "60 seconds").await[0].clone();
    let deep = format!(
        r#"{{"id": "pi_x", "object": "payment_intent", "x": {}1{}}}"#,
        "[".repeat(129),
        "]".repeat(129)
    );
    for response in [
        deep.as_str(),
        r#"{"id": "pi_x", "object": "payment_intent", "amount": 1e400}"#,
    ] {
        let err = client
            .query_one(
                "SELECT pay.complete_outbox($1, $2, 200, $3::text::jsonb)",
                &[&id, &attempt, &response],
            )
            .await
            .expect_err(response);
        assert_eq!(sqlstate(&err), Some("22023"), "{err}");
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(message.starts_with("response "), "{message}");
    }
    let status: String = client
        .query_one("SELECT status FROM pay.outbox WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "in_flight");
}

/// A create answer naming a PaymentIntent (or Checkout Session) that another payment already
/// holds is refused with 22023 naming both payments, not a bare unique violation; nothing is
/// written and the command stays in flight.
#[tokio::test]
async fn a_create_answer_naming_another_payments_object_names_both_payments() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let first = new_payment(&client, "holder").await;
    assert!(fixtures::answer_create(&client, first, "pi_shared", "requires_payment_method").await);
    let second = new_payment(&client, "intruder").await;
    let (id, attempt, _) = claim(&client, "w", "60 seconds").await[0].clone();
    let answer = fixtures::payment_intent(
        "pi_shared",
        &second.to_string(),
        1000,
        "usd",
        "requires_payment_method",
    );
    let err = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&id, &attempt, &answer],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"), "{err}");
    let message = err.as_db_error().unwrap().message().to_owned();
    for named in [first.to_string(), second.to_string(), "pi_shared".into()] {
        assert!(message.contains(&named), "{message}");
    }
    let row = client
        .query_one(
            "SELECT p.stripe_payment_intent_id, o.status FROM pay.payments p JOIN pay.outbox o ON o.payment_id = p.id
             WHERE p.id = $1",
            &[&second],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, String>(1), "in_flight");

    // The same for a Checkout Session.
    let open_session = |payment: Uuid, order: &str| {
        fixtures::checkout_session(
            "cs_shared",
            &payment.to_string(),
            order,
            1000,
            "usd",
            "open",
            "unpaid",
            None,
        )
    };
    let session_payment = |order: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT id FROM pay.begin_checkout($1, 1000, 'usd', mode => 'session',
                                                       success_url => 'https://shop.example/done')",
                    &[&order],
                )
                .await
                .unwrap()
                .get::<_, Uuid>(0)
        }
    };
    let holder = session_payment("s-holder").await;
    assert!(
        fixtures::answer_command(&client, holder, "create_checkout_session", |_, _| {
            open_session(holder, "s-holder")
        })
        .await
    );
    let intruder = session_payment("s-intruder").await;
    let (id, attempt) = fixtures::claim_command(&client, intruder, "create_checkout_session").await;
    let err = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&id, &attempt, &open_session(intruder, "s-intruder")],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"), "{err}");
    let message = err.as_db_error().unwrap().message().to_owned();
    for named in [holder.to_string(), intruder.to_string(), "cs_shared".into()] {
        assert!(message.contains(&named), "{message}");
    }
}

#[tokio::test]
async fn wait_for_intent_returns_once_the_worker_has_answered() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = new_payment(&client, "o-wait").await;
    let worker = db.connect().await;
    let waiter = tokio::spawn({
        let app = db.connect().await;
        async move {
            app.query_one(
                "SELECT client_secret FROM pay.wait_for_intent($1, 10000)",
                &[&payment],
            )
            .await
            .map(|r| r.get::<_, String>(0))
        }
    });
    let (id, attempt, _) = claim(&worker, "w", "60 seconds").await[0].clone();
    let intent = fixtures::payment_intent(
        "pi_wait",
        &payment.to_string(),
        1000,
        "usd",
        "requires_payment_method",
    );
    worker
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&id, &attempt, &intent],
        )
        .await
        .unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), "pi_wait_secret_test");

    let other = new_payment(&client, "o-wait-2").await;
    let err = client
        .query_one("SELECT pay.wait_for_intent($1, 50)", &[&other])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("57014"));
    let err = client
        .batch_execute("BEGIN; SELECT pay.wait_for_intent((SELECT id FROM pay.begin_checkout('o-same-tx', 500, 'usd')), 5000)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("55000"), "{err}");
}
