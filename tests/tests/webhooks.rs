//! Webhooks through `pay.ingest_webhook`, signed by the official Stripe SDK: verification, dedup,
//! the guarded state machine, exactly-once fulfillment, the double-charge guard and the entry points.

use std::sync::Arc;

use pgpay_tests::stripe_sdk::{self, sign_now, unix_now, ToSign};
use pgpay_tests::{count, fixtures, sqlstate, TestDb};
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

const SECRET: &str = "whsec_test_primary_0123456789";

#[derive(Debug, PartialEq)]
struct Answer {
    status: String,
    http_status: i32,
    event_id: Option<String>,
    detail: String,
}

async fn setup() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    (db, client)
}

async fn deliver(client: &Client, payload: &str, header: &str) -> Answer {
    let row = client
        .query_one(
            "SELECT * FROM pay.ingest_webhook($1, $2)",
            &[&payload, &header],
        )
        .await
        .expect("ingest never raises on bad input");
    Answer {
        status: row.get(0),
        http_status: row.get(1),
        event_id: row.get(2),
        detail: row.get(3),
    }
}

async fn deliver_signed(client: &Client, payload: &str) -> Answer {
    deliver(client, payload, &sign_now(payload, SECRET)).await
}

/// A checkout whose create the worker has completed: the payment knows its PaymentIntent.
async fn payment_with_intent(client: &Client, order: &str, amount: i64, intent: &str) -> Uuid {
    let id: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, $2, 'usd')",
            &[&order, &amount],
        )
        .await
        .unwrap()
        .get(0);
    let ok = fixtures::answer_create(client, id, intent, "requires_payment_method").await;
    assert!(ok);
    id
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

fn intent_event(
    event_id: &str,
    kind: &str,
    created: i64,
    intent: &str,
    payment: Uuid,
    amount: i64,
    status: &str,
) -> String {
    fixtures::event(
        event_id,
        kind,
        created,
        fixtures::payment_intent(intent, &payment.to_string(), amount, "usd", status),
    )
}

#[tokio::test]
async fn a_signed_success_is_applied_once_fulfilled_once_and_stored_byte_for_byte() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-1", 2500, "pi_w1").await;
    let payload = intent_event(
        "evt_w1",
        "payment_intent.succeeded",
        unix_now(),
        "pi_w1",
        payment,
        2500,
        "succeeded",
    );
    let answer = deliver_signed(&client, &payload).await;
    assert_eq!(
        (answer.status.as_str(), answer.http_status),
        ("applied", 200),
        "{answer:?}"
    );
    assert_eq!(answer.event_id.as_deref(), Some("evt_w1"));
    assert_eq!(status_of(&client, payment).await, "succeeded");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    let stored: String = client
        .query_one(
            "SELECT payload FROM pay.webhook_events WHERE event_id = 'evt_w1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, payload, "the raw body is kept exactly");
    // The same delivery again (Stripe retries): a duplicate, nothing more.
    let again = deliver_signed(&client, &payload).await;
    assert_eq!(
        (again.status.as_str(), again.http_status),
        ("duplicate", 200)
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    let timeline: Vec<(String, Option<String>)> = client
        .query(
            "SELECT event, evidence_id FROM pay.payment_timeline($1)",
            &[&payment],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        timeline.last().unwrap(),
        &(
            "requires_payment_method -> succeeded".to_string(),
            Some("evt_w1".to_string())
        )
    );
    let duplicates: i32 = client
        .query_one(
            "SELECT duplicate_deliveries FROM pay.webhook_events WHERE event_id = 'evt_w1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(duplicates, 1);
}

#[tokio::test]
async fn sixteen_concurrent_deliveries_of_one_event_apply_exactly_once() {
    let (db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-2", 900, "pi_w2").await;
    let payload = Arc::new(intent_event(
        "evt_w2",
        "payment_intent.succeeded",
        unix_now(),
        "pi_w2",
        payment,
        900,
        "succeeded",
    ));
    let header = Arc::new(sign_now(&payload, SECRET));
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (payload, header, barrier) = (payload.clone(), header.clone(), barrier.clone());
        let session = db.connect().await;
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            deliver(&session, &payload, &header).await
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("no session fails").status);
    }
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| *s == "applied").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "duplicate").count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.audit_log WHERE evidence_id = 'evt_w2'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn out_of_order_events_end_in_the_right_state_and_late_ones_are_audited_as_ignored() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-3", 1200, "pi_w3").await;
    let t = unix_now() - 100;
    let deliveries = [
        // Succeeded arrives first; created and a processing from before it arrive late.
        (
            "evt_a",
            "payment_intent.succeeded",
            t + 3,
            "succeeded",
            "applied",
        ),
        (
            "evt_b",
            "payment_intent.created",
            t,
            "requires_payment_method",
            "applied",
        ),
        (
            "evt_c",
            "payment_intent.processing",
            t + 2,
            "processing",
            "applied",
        ),
        // A failure after the success changes nothing.
        (
            "evt_d",
            "payment_intent.payment_failed",
            t + 4,
            "requires_payment_method",
            "applied",
        ),
        (
            "evt_e",
            "payment_intent.canceled",
            t + 5,
            "canceled",
            "applied",
        ),
    ];
    let payloads: Vec<String> = deliveries
        .iter()
        .map(|(id, kind, created, status, _)| {
            intent_event(id, kind, *created, "pi_w3", payment, 1200, status)
        })
        .collect();
    let now = unix_now();
    let headers = stripe_sdk::sign(
        &payloads
            .iter()
            .map(|p| ToSign {
                payload: p,
                secret: SECRET,
                timestamp: now,
            })
            .collect::<Vec<_>>(),
    );
    for ((payload, header), (id, _, _, _, expected)) in
        payloads.iter().zip(&headers).zip(&deliveries)
    {
        let answer = deliver(&client, payload, header).await;
        assert_eq!(answer.status, *expected, "{id}: {answer:?}");
    }
    assert_eq!(status_of(&client, payment).await, "succeeded");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    let ignored: Vec<String> = client
        .query(
            "SELECT evidence_id FROM pay.audit_log WHERE payment_id = $1 AND proposed_status IS NOT NULL ORDER BY id",
            &[&payment],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ignored,
        ["evt_b", "evt_c", "evt_d", "evt_e"],
        "each late event is one audit row"
    );
    let outcomes: Vec<(String, String)> = client
        .query(
            "SELECT event_id, outcome FROM pay.webhook_events ORDER BY event_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(outcomes[0], ("evt_a".into(), "applied".into()));
    assert_eq!(outcomes[2], ("evt_c".into(), "ignored".into()));
}

#[tokio::test]
async fn among_open_statuses_the_newest_evidence_wins_and_ties_go_to_the_further_status() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-4", 500, "pi_w4").await;
    let t = unix_now() + 5; // after the create answer was read
    let steps = [
        (
            "evt_1",
            "payment_intent.processing",
            t + 10,
            "processing",
            "processing",
        ),
        (
            "evt_2",
            "payment_intent.requires_action",
            t + 9,
            "requires_action",
            "processing",
        ),
        (
            "evt_3",
            "payment_intent.requires_action",
            t + 10,
            "requires_action",
            "processing",
        ),
        (
            "evt_4",
            "payment_intent.payment_failed",
            t + 11,
            "requires_payment_method",
            "requires_payment_method",
        ),
    ];
    for (id, kind, created, status, expected) in steps {
        let payload = intent_event(id, kind, created, "pi_w4", payment, 500, status);
        deliver_signed(&client, &payload).await;
        assert_eq!(status_of(&client, payment).await, expected, "after {id}");
    }
}

#[tokio::test]
async fn forged_stale_future_missing_and_malformed_signatures_change_nothing() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-5", 700, "pi_w5").await;
    let payload = intent_event(
        "evt_f",
        "payment_intent.succeeded",
        unix_now(),
        "pi_w5",
        payment,
        700,
        "succeeded",
    );
    let now = unix_now();
    let signed = stripe_sdk::sign(&[
        ToSign {
            payload: &payload,
            secret: "whsec_attacker_0000000000",
            timestamp: now,
        },
        ToSign {
            payload: &payload,
            secret: SECRET,
            timestamp: now - 301,
        },
        ToSign {
            payload: &payload,
            secret: SECRET,
            timestamp: now + 400,
        },
        ToSign {
            payload: &payload,
            secret: SECRET,
            timestamp: now,
        },
    ]);
    let valid_v1 = signed[3].split("v1=").nth(1).unwrap().to_string();
    let cases = [
        (payload.clone(), signed[0].clone(), "signature_mismatch"),
        (payload.clone(), signed[1].clone(), "timestamp_too_old"),
        (payload.clone(), signed[2].clone(), "timestamp_in_future"),
        (payload.clone(), String::new(), "missing_header"),
        (payload.clone(), "garbage".to_string(), "malformed_header"),
        (payload.clone(), format!("t={now}"), "no_v1_signature"),
        (
            payload.clone(),
            format!("t={now},v0={valid_v1}"),
            "no_v1_signature",
        ),
        (
            format!("{payload} "),
            signed[3].clone(),
            "signature_mismatch",
        ),
    ];
    for (body, header, reason) in &cases {
        let answer = deliver(&client, body, header).await;
        assert_eq!(
            (answer.status.as_str(), answer.http_status),
            ("rejected", 400),
            "{reason}"
        );
        assert!(answer.detail.starts_with(reason), "{reason}: {answer:?}");
        assert_eq!(answer.event_id, None);
    }
    // NULL header, as a layer that lost it would pass.
    let row = client
        .query_one(
            "SELECT status, http_status FROM pay.ingest_webhook($1, NULL)",
            &[&payload],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("rejected".into(), 400)
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events").await,
        0
    );
    assert_eq!(status_of(&client, payment).await, "requires_payment_method");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );
    let by_reason: Vec<(String, i64)> = client
        .query("SELECT type_or_reason, events::bigint FROM pay.webhook_stats WHERE kind = 'rejection' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        by_reason,
        [
            ("malformed_header".into(), 1),
            ("missing_header".into(), 2),
            ("no_v1_signature".into(), 2),
            ("signature_mismatch".into(), 2),
            ("timestamp_in_future".into(), 1),
            ("timestamp_too_old".into(), 1),
        ]
    );
    // Signed but not an event: rejected too, and never raises. That includes JSON that
    // PostgreSQL's jsonb refuses (a \u0000 escape), events without an id or a type, an id longer
    // than the column allows, and objects that are not events.
    let too_long_id = format!(
        r#"{{"id": "evt_{}", "object": "event", "type": "payment_intent.succeeded"}}"#,
        "x".repeat(252)
    );
    for junk in [
        "not json at all",
        r#"{"id": "evt_nul", "object": "event", "type": "x", "data": {"object": {"note": "a\u0000b"}}}"#,
        r#"{"object": "event", "type": "payment_intent.succeeded"}"#,
        r#"{"id": "evt_no_type", "object": "event"}"#,
        r#"{"id": "ch_1", "object": "charge", "type": "charge.succeeded"}"#,
        r#"["evt_1"]"#,
        too_long_id.as_str(),
    ] {
        let answer = deliver_signed(&client, junk).await;
        assert_eq!(
            (answer.status.as_str(), answer.http_status),
            ("rejected", 400),
            "{junk}"
        );
        assert!(answer.detail.starts_with("not_an_event"), "{junk}");
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events").await,
        0
    );
}

/// Delivers a new (never seen) event signed with `secret`; returns the status.
async fn deliver_new_event(client: &Client, secret: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = fixtures::event(
        &format!("evt_new_{n}"),
        "customer.created",
        unix_now(),
        json!({"id": "cus_1", "object": "customer"}),
    );
    deliver(client, &body, &sign_now(&body, secret))
        .await
        .status
}

/// Backends keep the secrets in memory between deliveries: a change made anywhere (another
/// session, a rolled-back transaction, the clock passing an expiry) must be seen at once.
#[tokio::test]
async fn remembered_secrets_follow_every_change_at_once() {
    let db = TestDb::create().await;
    let ingest_session = db.connect().await;
    let admin_session = db.connect().await;
    admin_session
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    // The ingest session reads the secrets and keeps them.
    assert_eq!(deliver_new_event(&ingest_session, SECRET).await, "stored");

    // Revoked in another session: refused by the ingest session's very next delivery.
    let other = "whsec_test_other_0123456789";
    admin_session
        .batch_execute(&format!(
            "SELECT pay.add_webhook_secret('{other}', 'other'); SELECT pay.revoke_webhook_secret('primary')"
        ))
        .await
        .unwrap();
    assert_eq!(deliver_new_event(&ingest_session, SECRET).await, "rejected");
    assert_eq!(deliver_new_event(&ingest_session, other).await, "stored");

    // Added in a transaction that rolls back: usable inside it, gone after it.
    let rolled_back = "whsec_test_rolled_back_0123";
    ingest_session.batch_execute("BEGIN").await.unwrap();
    ingest_session
        .execute(
            "SELECT pay.add_webhook_secret($1, 'rolled_back')",
            &[&rolled_back],
        )
        .await
        .unwrap();
    assert_eq!(
        deliver_new_event(&ingest_session, rolled_back).await,
        "stored"
    );
    ingest_session.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        deliver_new_event(&ingest_session, rolled_back).await,
        "rejected"
    );

    // Expiry needs no change to the table: the clock alone retires a remembered secret.
    let short_lived = "whsec_test_short_lived_0123";
    admin_session
        .execute(
            "SELECT pay.add_webhook_secret($1, 'short', now() + interval '2 seconds')",
            &[&short_lived],
        )
        .await
        .unwrap();
    assert_eq!(
        deliver_new_event(&ingest_session, short_lived).await,
        "stored"
    );
    // Wait on the database's clock, with a deadline, until the secret has expired.
    let expired = pgpay_tests::wait_until(std::time::Duration::from_secs(10), || async {
        admin_session
            .query_one(
                "SELECT clock_timestamp() > expires_at FROM pay.webhook_secrets WHERE label = 'short'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(expired, "the 2-second secret never expired");
    assert_eq!(
        deliver_new_event(&ingest_session, short_lived).await,
        "rejected"
    );
    assert_eq!(deliver_new_event(&ingest_session, other).await, "stored");

    // Deleted by hand (not through revoke): the trigger covers every statement.
    admin_session
        .batch_execute("DELETE FROM pay.webhook_secrets")
        .await
        .unwrap();
    let body = fixtures::event(
        "evt_cache_none",
        "customer.created",
        unix_now(),
        json!({"id": "cus_1", "object": "customer"}),
    );
    let err = ingest_session
        .query_one(
            "SELECT * FROM pay.ingest_webhook($1, $2)",
            &[&body, &sign_now(&body, other)],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("55000"));
}

#[tokio::test]
async fn rotation_accepts_any_live_secret_and_revocation_and_expiry_take_effect() {
    let (_db, client) = setup().await;
    let next = "whsec_test_next_9876543210";
    client
        .execute("SELECT pay.add_webhook_secret($1, 'next')", &[&next])
        .await
        .unwrap();
    let body = |id: &str| {
        fixtures::event(
            id,
            "customer.created",
            unix_now(),
            json!({"id": "cus_1", "object": "customer"}),
        )
    };
    let old_signed = body("evt_r1");
    assert_eq!(
        deliver(&client, &old_signed, &sign_now(&old_signed, SECRET))
            .await
            .status,
        "stored"
    );
    let new_signed = body("evt_r2");
    assert_eq!(
        deliver(&client, &new_signed, &sign_now(&new_signed, next))
            .await
            .status,
        "stored"
    );
    let revoked: bool = client
        .query_one("SELECT pay.revoke_webhook_secret('primary')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(revoked);
    let again: bool = client
        .query_one("SELECT pay.revoke_webhook_secret('primary')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!again);
    let after = body("evt_r3");
    assert_eq!(
        deliver(&client, &after, &sign_now(&after, SECRET))
            .await
            .status,
        "rejected"
    );
    assert_eq!(
        deliver(&client, &after, &sign_now(&after, next))
            .await
            .status,
        "stored"
    );
    // An expired secret verifies nothing.
    client
        .batch_execute("UPDATE pay.webhook_secrets SET expires_at = now() - interval '1 second' WHERE label = 'next'")
        .await
        .unwrap();
    let expired = body("evt_r4");
    let err = client
        .query_one(
            "SELECT * FROM pay.ingest_webhook($1, $2)",
            &[&expired, &sign_now(&expired, next)],
        )
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&err),
        Some("55000"),
        "no live secret is an internal failure (5xx, Stripe retries)"
    );
    // Secrets never appear in errors.
    let err = client
        .execute(
            "SELECT pay.add_webhook_secret('not-a-real-secret-value')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
    assert!(!err.to_string().contains("not-a-real-secret-value"));
    let err = client
        .execute(
            "SELECT pay.add_webhook_secret($1, 'next')",
            &[&"whsec_duplicate_label_xx"],
        )
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("whsec_duplicate_label_xx"));
}

#[tokio::test]
async fn unknown_types_and_foreign_objects_are_stored_not_applied() {
    let (_db, client) = setup().await;
    let foreign = fixtures::event(
        "evt_x1",
        "payment_intent.succeeded",
        unix_now(),
        json!({"id": "pi_foreign", "object": "payment_intent", "status": "succeeded", "amount": 5, "currency": "usd", "metadata": {}}),
    );
    let answer = deliver_signed(&client, &foreign).await;
    assert_eq!(
        (answer.status.as_str(), answer.http_status),
        ("stored", 200)
    );
    let other = fixtures::event(
        "evt_x2",
        "invoice.paid",
        unix_now(),
        json!({"id": "in_1", "object": "invoice"}),
    );
    assert_eq!(deliver_signed(&client, &other).await.status, "stored");
    // Signed (so Stripe's own) but not something the rule can apply: kept for a human and
    // answered 200, never an error that would bring the same body back for days.
    let payment = payment_with_intent(&client, "w-x3", 500, "pi_x3").await;
    let mut malformed =
        fixtures::payment_intent("pi_x3", &payment.to_string(), 500, "usd", "succeeded");
    malformed["amount"] = json!(4.5);
    let malformed = fixtures::event("evt_x3", "payment_intent.succeeded", unix_now(), malformed);
    let answer = deliver_signed(&client, &malformed).await;
    assert_eq!(
        (answer.status.as_str(), answer.http_status),
        ("stored", 200)
    );
    assert_eq!(
        answer.detail,
        "payment_intent.succeeded not applied: the PaymentIntent's amount is not an integer"
    );
    assert_eq!(status_of(&client, payment).await, "requires_payment_method");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.webhook_events WHERE outcome = 'stored'"
        )
        .await,
        3
    );
}

#[tokio::test]
async fn a_lost_create_answer_is_matched_by_metadata() {
    let (_db, client) = setup().await;
    let payment: Uuid = client
        .query_one("SELECT id FROM pay.begin_checkout('w-6', 300, 'usd')", &[])
        .await
        .unwrap()
        .get(0);
    // The worker sent the create but crashed before recording the answer.
    client
        .query("SELECT * FROM pay.claim_outbox('crashed')", &[])
        .await
        .unwrap();
    let payload = intent_event(
        "evt_m1",
        "payment_intent.created",
        unix_now(),
        "pi_w6",
        payment,
        300,
        "requires_payment_method",
    );
    assert_eq!(deliver_signed(&client, &payload).await.status, "applied");
    let row = client
        .query_one(
            "SELECT stripe_payment_intent_id, status::text FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pi_w6");
    assert_eq!(row.get::<_, String>(1), "requires_payment_method");
}

#[tokio::test]
async fn a_decline_is_recorded_and_audited_once_and_the_status_stays() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-6c", 900, "pi_declined").await;
    let declined = |event_id: &str| {
        let mut intent = fixtures::payment_intent(
            "pi_declined",
            &payment.to_string(),
            900,
            "usd",
            "requires_payment_method",
        );
        intent["last_payment_error"] =
            serde_json::json!({"code": "card_declined", "message": "Your card was declined."});
        fixtures::event(
            event_id,
            "payment_intent.payment_failed",
            unix_now(),
            intent,
        )
    };
    let answer = deliver_signed(&client, &declined("evt_decline_1")).await;
    assert_eq!(answer.detail, "payment_intent.payment_failed -> applied");
    let row = client
        .query_one(
            "SELECT status::text, last_error ->> 'code' FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "requires_payment_method");
    assert_eq!(row.get::<_, String>(1), "card_declined");
    let audited = "SELECT count(*) FROM pay.audit_log WHERE cause = \
        'webhook payment_intent.payment_failed: card_declined Your card was declined.'";
    assert_eq!(count(&client, audited).await, 1);
    // Another event with the same error says nothing new: unchanged, no second audit row.
    let answer = deliver_signed(&client, &declined("evt_decline_2")).await;
    assert_eq!(answer.detail, "payment_intent.payment_failed -> unchanged");
    assert_eq!(count(&client, audited).await, 1);

    // The customer pays with another card: the error is history (kept in the timeline), not the
    // payment's current state.
    let paid = intent_event(
        "evt_decline_then_paid",
        "payment_intent.succeeded",
        unix_now() + 1,
        "pi_declined",
        payment,
        900,
        "succeeded",
    );
    assert_eq!(deliver_signed(&client, &paid).await.status, "applied");
    let last_error: Option<serde_json::Value> = client
        .query_one(
            "SELECT last_error FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        last_error, None,
        "last_error is cleared once the payment succeeds"
    );
    assert_eq!(
        count(
            &client,
            &format!(
                "SELECT count(*) FROM pay.payment_timeline('{payment}') WHERE cause LIKE '%card_declined Your card was declined.'"
            )
        )
        .await,
        1,
        "the decline stays in the timeline"
    );
}

#[tokio::test]
async fn a_second_payment_intent_claiming_a_payment_is_flagged_not_applied() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-6b", 700, "pi_first").await;
    // Another PaymentIntent carries this payment's id in its metadata and succeeds: it must
    // never speak for the payment (invariant 1). Kept for a human, not applied, not fulfilled.
    let payload = intent_event(
        "evt_second",
        "payment_intent.succeeded",
        unix_now(),
        "pi_second",
        payment,
        700,
        "succeeded",
    );
    let answer = deliver_signed(&client, &payload).await;
    assert_eq!(
        (answer.status.as_str(), answer.http_status),
        ("applied", 200)
    );
    assert_eq!(answer.detail, "payment_intent.succeeded -> flagged");
    let row = client
        .query_one(
            "SELECT status::text, stripe_payment_intent_id, flagged_reason FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "requires_payment_method");
    assert_eq!(row.get::<_, String>(1), "pi_first");
    assert_eq!(
        row.get::<_, String>(2),
        "a second PaymentIntent pi_second claims this payment"
    );
    let audit = client
        .query_one(
            "SELECT cause, proposed_status, evidence_id FROM pay.audit_log WHERE payment_id = $1 ORDER BY id DESC LIMIT 1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(
        audit.get::<_, String>(0),
        "flagged: evidence about a second PaymentIntent pi_second (webhook payment_intent.succeeded)"
    );
    assert_eq!(audit.get::<_, String>(1), "succeeded");
    assert_eq!(audit.get::<_, String>(2), "evt_second");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );
    // The event is kept with its outcome; a repeat delivery is a duplicate.
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events WHERE event_id = 'evt_second' AND outcome = 'flagged'").await,
        1
    );
    assert_eq!(deliver_signed(&client, &payload).await.status, "duplicate");
}

#[tokio::test]
async fn a_success_with_the_wrong_amount_or_currency_is_flagged_not_fulfilled() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-7", 1000, "pi_w7").await;
    let payload = intent_event(
        "evt_amt",
        "payment_intent.succeeded",
        unix_now(),
        "pi_w7",
        payment,
        10,
        "succeeded",
    );
    deliver_signed(&client, &payload).await;
    let row = client
        .query_one(
            "SELECT status::text, flagged_reason FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "succeeded");
    assert!(row.get::<_, String>(1).contains("amount 10 differs"));
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.flagged_payments").await,
        1
    );

    let other = payment_with_intent(&client, "w-8", 1000, "pi_w8").await;
    let mut intent =
        fixtures::payment_intent("pi_w8", &other.to_string(), 1000, "eur", "succeeded");
    intent["currency"] = json!("eur");
    let payload = fixtures::event("evt_cur", "payment_intent.succeeded", unix_now(), intent);
    deliver_signed(&client, &payload).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );
}

#[tokio::test]
async fn a_superseded_attempt_paid_in_another_tab_is_refunded_once() {
    let (_db, client) = setup().await;
    let first = payment_with_intent(&client, "w-9", 1000, "pi_tab1").await;
    // The cart changed: attempt 2 supersedes attempt 1 (whose cancel is now queued).
    let second: Uuid = client
        .query_one("SELECT id FROM pay.begin_checkout('w-9', 1100, 'usd')", &[])
        .await
        .unwrap()
        .get(0);
    let claimed = client
        .query(
            "SELECT id, attempts, kind FROM pay.claim_outbox('w', 10)",
            &[],
        )
        .await
        .unwrap();
    let create = claimed
        .iter()
        .find(|r| r.get::<_, String>(2) == "create_payment_intent")
        .unwrap();
    let answer = fixtures::payment_intent(
        "pi_tab2",
        &second.to_string(),
        1100,
        "usd",
        "requires_payment_method",
    );
    client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&create.get::<_, i64>(0), &create.get::<_, i32>(1), &answer],
        )
        .await
        .unwrap();
    let t = unix_now();
    let paid_second = intent_event(
        "evt_t2",
        "payment_intent.succeeded",
        t,
        "pi_tab2",
        second,
        1100,
        "succeeded",
    );
    assert_eq!(
        deliver_signed(&client, &paid_second).await.status,
        "applied"
    );
    // The old tab's payment went through before its cancel reached Stripe.
    let paid_first = intent_event(
        "evt_t1",
        "payment_intent.succeeded",
        t,
        "pi_tab1",
        first,
        1000,
        "succeeded",
    );
    assert_eq!(deliver_signed(&client, &paid_first).await.status, "applied");
    assert_eq!(status_of(&client, first).await, "superseded");
    assert_eq!(status_of(&client, second).await, "succeeded");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    let refunds = client
        .query("SELECT request, idempotency_key FROM pay.outbox WHERE kind = 'refund' AND payment_id = $1", &[&first])
        .await
        .unwrap();
    assert_eq!(refunds.len(), 1);
    let request: serde_json::Value = refunds[0].get(0);
    assert_eq!(request["path"], "/v1/refunds");
    assert_eq!(request["params"]["payment_intent"], "pi_tab1");
    // Stripe tells us again in another event (charge.succeeded-style resend): still one refund.
    let again = intent_event(
        "evt_t1b",
        "payment_intent.succeeded",
        t + 1,
        "pi_tab1",
        first,
        1000,
        "succeeded",
    );
    deliver_signed(&client, &again).await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'refund'"
        )
        .await,
        1
    );
    let flagged: String = client
        .query_one(
            "SELECT flagged_reason FROM pay.payments WHERE id = $1",
            &[&first],
        )
        .await
        .unwrap()
        .get(0);
    assert!(flagged.contains("duplicate charge"));
}

#[tokio::test]
async fn refunds_and_disputes_are_tracked_beside_the_status() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-10", 2000, "pi_w10").await;
    let t = unix_now();
    deliver_signed(
        &client,
        &intent_event(
            "evt_s",
            "payment_intent.succeeded",
            t,
            "pi_w10",
            payment,
            2000,
            "succeeded",
        ),
    )
    .await;
    let refund = fixtures::event(
        "evt_rf",
        "refund.created",
        t + 1,
        json!({
            "id": "re_1", "object": "refund", "amount": 500, "status": "succeeded", "payment_intent": "pi_w10", "reason": "requested_by_customer"
        }),
    );
    assert_eq!(deliver_signed(&client, &refund).await.status, "applied");
    let charge = fixtures::event(
        "evt_ch",
        "charge.refunded",
        t + 2,
        json!({
            "id": "ch_1", "object": "charge", "amount": 2000, "amount_refunded": 800, "refunded": false, "payment_intent": "pi_w10"
        }),
    );
    assert_eq!(deliver_signed(&client, &charge).await.status, "applied");
    let dispute = fixtures::event(
        "evt_dp",
        "charge.dispute.created",
        t + 3,
        json!({
            "id": "dp_1", "object": "dispute", "amount": 1200, "charge": "ch_1", "payment_intent": "pi_w10", "reason": "fraudulent", "status": "needs_response"
        }),
    );
    assert_eq!(deliver_signed(&client, &dispute).await.status, "applied");
    let row = client
        .query_one(
            "SELECT status::text, amount_refunded, disputed FROM pay.payments WHERE id = $1",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "succeeded",
        "refunds and disputes never leave succeeded"
    );
    assert_eq!(row.get::<_, i64>(1), 800);
    assert!(row.get::<_, bool>(2));
    // pay.refund queues what is left, under a deterministic key, and refuses more.
    let command: i64 = client
        .query_one("SELECT pay.refund($1, 1200)", &[&payment])
        .await
        .unwrap()
        .get(0);
    assert!(command > 0);
    let err = client
        .query_one("SELECT pay.refund($1, 1)", &[&payment])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
}

#[tokio::test]
async fn fulfillments_are_claimed_by_one_consumer_and_completed_once() {
    let (db, client) = setup().await;
    let mut payments = Vec::new();
    for i in 0..6 {
        let p = payment_with_intent(&client, &format!("f-{i}"), 100, &format!("pi_f{i}")).await;
        let payload = intent_event(
            &format!("evt_f{i}"),
            "payment_intent.succeeded",
            unix_now(),
            &format!("pi_f{i}"),
            p,
            100,
            "succeeded",
        );
        deliver_signed(&client, &payload).await;
        payments.push(p);
    }
    let other = db.connect().await;
    let a: Vec<Uuid> = client
        .query("SELECT payment_id FROM pay.claim_fulfillments('a', 4)", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let b: Vec<Uuid> = other
        .query("SELECT payment_id FROM pay.claim_fulfillments('b', 4)", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(a.len() + b.len(), 6);
    assert!(a.iter().all(|id| !b.contains(id)));
    let first: bool = client
        .query_one("SELECT pay.complete_fulfillment($1)", &[&a[0]])
        .await
        .unwrap()
        .get(0);
    let second: bool = client
        .query_one("SELECT pay.complete_fulfillment($1)", &[&a[0]])
        .await
        .unwrap()
        .get(0);
    assert!(first && !second);
    let err = client
        .query_one("SELECT pay.complete_fulfillment(gen_random_uuid())", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("P0002"));
}

#[tokio::test]
async fn the_inbox_table_and_the_postgrest_entry_point_ingest_the_same_way() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-11", 400, "pi_w11").await;
    let payload = intent_event(
        "evt_in",
        "payment_intent.processing",
        unix_now() + 5,
        "pi_w11",
        payment,
        400,
        "processing",
    );
    let header = sign_now(&payload, SECRET);
    let inserted = client
        .execute(
            "INSERT INTO pay.webhook_inbox (payload, signature_header) VALUES ($1, $2)",
            &[&payload, &header],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 0, "an accepted row is not kept in the inbox");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_inbox").await,
        0
    );
    assert_eq!(status_of(&client, payment).await, "processing");
    let err = client
        .execute(
            "INSERT INTO pay.webhook_inbox (payload, signature_header) VALUES ($1, 't=1,v1=00')",
            &[&payload],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("signature_mismatch"));

    // PostgREST sets request.headers and passes the raw body.
    let next = intent_event(
        "evt_rest",
        "payment_intent.succeeded",
        unix_now() + 6,
        "pi_w11",
        payment,
        400,
        "succeeded",
    );
    let headers =
        json!({"stripe-signature": sign_now(&next, SECRET), "content-type": "application/json"})
            .to_string();
    client
        .execute(
            "SELECT set_config('request.headers', $1, false)",
            &[&headers],
        )
        .await
        .unwrap();
    let row = client
        .query_one("SELECT pay.stripe_webhook($1::text::pay.\"application/json\"), current_setting('response.status')", &[&next])
        .await
        .unwrap();
    let body: serde_json::Value = row.get(0);
    assert_eq!(body["status"], "applied");
    assert_eq!(row.get::<_, String>(1), "200");
    assert_eq!(status_of(&client, payment).await, "succeeded");
}

#[tokio::test]
async fn the_webhook_role_can_deliver_and_read_nothing() {
    let (_db, client) = setup().await;
    let payload = fixtures::event(
        "evt_role",
        "customer.created",
        unix_now(),
        json!({"id": "cus_1", "object": "customer"}),
    );
    let header = sign_now(&payload, SECRET);
    client.batch_execute("SET ROLE pay_webhook").await.unwrap();
    let row = client
        .query_one(
            "SELECT status FROM pay.ingest_webhook($1, $2)",
            &[&payload, &header],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "stored");
    client.batch_execute("RESET ROLE").await.unwrap();
    for role in [
        "pay_webhook",
        "pay_app",
        "pay_worker",
        "pay_auditor",
        "pay_operator",
    ] {
        for sql in [
            "SELECT * FROM pay.webhook_secrets",
            "SELECT pay.add_webhook_secret('whsec_0123456789abcdef')",
        ] {
            client
                .batch_execute(&format!("SET ROLE {role}"))
                .await
                .unwrap();
            let err = client.batch_execute(sql).await.expect_err(sql);
            assert_eq!(sqlstate(&err), Some("42501"), "{role}: {sql}");
            client.batch_execute("RESET ROLE").await.unwrap();
        }
    }
    client.batch_execute("SET ROLE pay_webhook").await.unwrap();
    for sql in [
        "SELECT * FROM pay.webhook_events",
        "SELECT * FROM pay.payments",
        "SELECT * FROM pay.webhook_stats",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("42501"), "{sql}");
    }
    client
        .batch_execute("RESET ROLE; SET ROLE pay_auditor")
        .await
        .unwrap();
    let labels = client
        .query("SELECT label, live FROM pay.webhook_secret_labels", &[])
        .await
        .unwrap();
    assert_eq!(labels.len(), 1);
}

#[tokio::test]
async fn stuck_payments_use_a_configurable_threshold() {
    let (_db, client) = setup().await;
    let payment = payment_with_intent(&client, "w-12", 100, "pi_w12").await;
    client
        .batch_execute("UPDATE pay.payments SET updated_at = now() - interval '20 minutes'")
        .await
        .unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.stuck_payments").await,
        0,
        "default threshold is an hour"
    );
    client
        .batch_execute("SET pay.stuck_after = '15 minutes'")
        .await
        .unwrap();
    let stuck: Vec<Uuid> = client
        .query("SELECT id FROM pay.stuck_payments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stuck, [payment]);
}
