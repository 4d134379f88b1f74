//! The safety net: an event whose application raises is quarantined (stored with its error,
//! answered 200), its type's breaker opens after `pay.breaker_failures` failures and defers the
//! type's events while other types flow, a half-open probe closes or re-opens it, and
//! `pay.replay_events` applies what was held back exactly once. Infrastructure failures raise.
//! And `pay.anomalies`, one test per kind.

use pgpay_core::signature::sign_header;
use pgpay_tests::stripe_sdk::unix_now;
use pgpay_tests::{count, fixtures, sqlstate, TestDb};
use tokio_postgres::Client;
use uuid::Uuid;

const SECRET: &str = "whsec_test_safety_0123456789";

/// Signed as Stripe signs (the signature tests check this signer against Stripe's SDK).
fn sign_now(payload: &str, secret: &str) -> String {
    sign_header(payload.as_bytes(), secret.as_bytes(), unix_now())
}

/// A payment whose PaymentIntent `pi_<order>` is known and waiting for a payment method.
async fn open_payment(client: &Client, order: &str) -> Uuid {
    let id: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, 2000, 'usd')",
            &[&order],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        fixtures::answer_create(
            client,
            id,
            &format!("pi_{order}"),
            "requires_payment_method"
        )
        .await
    );
    id
}

/// Delivers a signed `payment_intent.<status>` event about `order`'s payment: (status,
/// http_status).
async fn deliver(
    client: &Client,
    event_id: &str,
    order: &str,
    payment: Uuid,
    status: &str,
    created: i64,
) -> (String, i32) {
    let intent = fixtures::payment_intent(
        &format!("pi_{order}"),
        &payment.to_string(),
        2000,
        "usd",
        status,
    );
    let event = fixtures::event(
        event_id,
        &format!("payment_intent.{status}"),
        created,
        intent,
    );
    let row = client
        .query_one(
            "SELECT status, http_status FROM pay.ingest_webhook($1, $2)",
            &[&event, &sign_now(&event, SECRET)],
        )
        .await
        .expect("ingest answers");
    (row.get(0), row.get(1))
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

/// The application's own trigger on a pgpay table: provisioning cannot take new rows.
async fn break_fulfillments(client: &Client, errcode: &str) {
    client
        .batch_execute(&format!(
            "CREATE FUNCTION public.app_provision() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'warehouse is down' USING ERRCODE = '{errcode}'; END; $$;
             CREATE TRIGGER app_provision BEFORE INSERT ON pay.fulfillments
                 FOR EACH ROW EXECUTE FUNCTION public.app_provision();"
        ))
        .await
        .unwrap();
}

async fn fix_fulfillments(client: &Client) {
    client
        .batch_execute(
            "DROP TRIGGER app_provision ON pay.fulfillments; DROP FUNCTION public.app_provision();",
        )
        .await
        .unwrap();
}

async fn breaker(client: &Client, event_type: &str) -> (String, i32) {
    let row = client
        .query_one(
            "SELECT state, failures FROM pay.event_type_health WHERE event_type = $1",
            &[&event_type],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_raising_trigger_quarantines_opens_the_breaker_and_replay_applies_each_once() {
    let (_db, client) = setup().await;
    break_fulfillments(&client, "P0001").await;
    let mut payments = Vec::new();
    for i in 0..8 {
        let order = format!("order-q{i}");
        payments.push((order.clone(), open_payment(&client, &order).await));
    }
    let other = open_payment(&client, "order-other").await;

    let mut answers = Vec::new();
    for (i, (order, id)) in payments.iter().enumerate() {
        let created = 1_700_000_100 + i as i64;
        answers.push(
            deliver(
                &client,
                &format!("evt_ok_{i}"),
                order,
                *id,
                "succeeded",
                created,
            )
            .await,
        );
    }
    // Every delivery answered 200: the first five quarantined, then the type is deferred.
    let expected: Vec<(String, i32)> = (0..8)
        .map(|i| {
            (
                (if i < 5 { "quarantined" } else { "deferred" }).to_owned(),
                200,
            )
        })
        .collect();
    assert_eq!(answers, expected);
    assert_eq!(
        breaker(&client, "payment_intent.succeeded").await,
        ("open".into(), 5)
    );
    // Another type keeps flowing.
    assert_eq!(
        deliver(
            &client,
            "evt_other",
            "order-other",
            other,
            "processing",
            1_700_000_200
        )
        .await,
        ("applied".into(), 200)
    );

    // Nothing half-applied: no success, no fulfillment, no audit row of one.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.payments WHERE status = 'succeeded'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.audit_log WHERE to_status = 'succeeded'"
        )
        .await,
        0
    );
    let row = client
        .query_one(
            "SELECT count(*), min(last_sqlstate), min(last_error), min(failures), count(payment_id)
             FROM pay.quarantined_events",
            &[],
        )
        .await
        .unwrap();
    let (n, code, error, failures, with_payment): (i64, String, String, i32, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        (n, code.as_str(), failures, with_payment),
        (5, "P0001", 1, 5)
    );
    assert!(error.contains("warehouse is down"), "{error}");
    // A duplicate delivery of a quarantined event is a duplicate.
    let (order, id) = &payments[0];
    assert_eq!(
        deliver(&client, "evt_ok_0", order, *id, "succeeded", 1_700_000_100).await,
        ("duplicate".into(), 200)
    );

    fix_fulfillments(&client).await;
    let replayed: Vec<(String, String)> = client
        .query("SELECT event_id, outcome FROM pay.replay_events()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(String, String)> = (0..8)
        .map(|i| (format!("evt_ok_{i}"), "applied".to_owned()))
        .collect();
    assert_eq!(replayed, want, "in Stripe's order, each applied");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.payments WHERE status = 'succeeded'"
        )
        .await,
        8
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT payment_id) FROM pay.fulfillments"
        )
        .await,
        8
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        8
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.audit_log WHERE to_status = 'succeeded' AND cause LIKE 'replay%'").await,
        8
    );
    assert_eq!(
        breaker(&client, "payment_intent.succeeded").await.0,
        "closed"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.quarantined_events").await,
        0
    );

    // A second replay changes nothing, even of every stored event.
    let audit_before = count(&client, "SELECT count(*) FROM pay.audit_log").await;
    assert_eq!(
        client
            .query("SELECT * FROM pay.replay_events()", &[])
            .await
            .unwrap()
            .len(),
        0
    );
    let again = client
        .query(
            "SELECT * FROM pay.replay_events(include_applied => true)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(again.len(), 9);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        8
    );
    let added: Vec<String> = client
        .query("SELECT cause || ' / ' || coalesce(proposed_status, '') FROM pay.audit_log ORDER BY id OFFSET $1", &[&audit_before])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        added.is_empty(),
        "a second replay wrote audit rows: {added:?}"
    );
}

#[tokio::test]
async fn a_breaker_opened_by_another_session_is_seen_by_the_next_delivery() {
    // Each backend keeps "no breaker is open" in memory; any change to pay.event_type_health,
    // by any session, any statement, any replication role, must reach it before its next event.
    let (db, owner) = setup().await;
    let (a, b) = (db.connect().await, db.connect().await);
    a.batch_execute("SET pay.breaker_cooldown = '1 hour'")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(open_payment(&owner, &format!("order-c{i}")).await);
    }
    let go = |i: usize, status: &'static str| {
        let (a, id) = (&a, ids[i]);
        async move {
            deliver(
                a,
                &format!("evt_c{i}"),
                &format!("order-c{i}"),
                id,
                status,
                1_700_000_000 + i as i64,
            )
            .await
            .0
        }
    };
    // Session a applies twice: the second from its copy.
    assert_eq!(go(0, "processing").await, "applied");
    assert_eq!(go(1, "processing").await, "applied");

    // Session b opens a breaker by hand: a's next event of that type is deferred.
    b.batch_execute(
        "INSERT INTO pay.event_type_health (event_type, state, failures, opened_at)
         VALUES ('payment_intent.succeeded', 'open', 5, now())",
    )
    .await
    .unwrap();
    assert_eq!(go(2, "succeeded").await, "deferred");
    // Other types still flow (each looks its own type up while something is open).
    assert_eq!(go(3, "processing").await, "applied");

    // Closed again by pay_operator's function: applied.
    b.batch_execute("SELECT pay.reset_event_type('payment_intent.succeeded')")
        .await
        .unwrap();
    assert_eq!(go(4, "succeeded").await, "applied");

    // A hand edit under session_replication_role = replica (where ordinary triggers sleep).
    b.batch_execute(
        "SET session_replication_role = replica;
         UPDATE pay.event_type_health SET state = 'open', opened_at = now()
         WHERE event_type = 'payment_intent.succeeded';
         RESET session_replication_role",
    )
    .await
    .unwrap();
    assert_eq!(go(5, "succeeded").await, "deferred");

    // TRUNCATE closes everything.
    b.batch_execute("TRUNCATE pay.event_type_health")
        .await
        .unwrap();
    assert_eq!(go(6, "succeeded").await, "applied");
    assert_eq!(
        count(&owner, "SELECT count(*) FROM pay.fulfillments").await,
        2
    );
}

/// `err` is a permission refusal (42501).
fn refused(err: &tokio_postgres::Error, role: &str, sql: &str) {
    assert_eq!(sqlstate(err), Some("42501"), "{role}: {sql}: {err}");
}

#[tokio::test]
async fn pay_operator_replays_and_resets_breakers_and_no_other_role_can() {
    let (_db, client) = setup().await;
    client
        .batch_execute("SET pay.breaker_failures = 1; SET pay.breaker_cooldown = '1 hour'")
        .await
        .unwrap();
    break_fulfillments(&client, "P0001").await;
    let payment = open_payment(&client, "order-op").await;
    let delivered = deliver(
        &client,
        "evt_op",
        "order-op",
        payment,
        "succeeded",
        1_700_000_000,
    )
    .await;
    assert_eq!(delivered, ("quarantined".into(), 200));
    assert_eq!(breaker(&client, "payment_intent.succeeded").await.0, "open");

    // The application, the auditor, the worker and the webhook role may not change payments
    // through a replay, nor close a breaker.
    for role in ["pay_app", "pay_auditor", "pay_worker", "pay_webhook"] {
        for sql in [
            "SELECT * FROM pay.replay_events()",
            "SELECT pay.reset_event_type('payment_intent.succeeded')",
        ] {
            client
                .batch_execute(&format!("SET ROLE {role}"))
                .await
                .unwrap();
            refused(&client.batch_execute(sql).await.expect_err(sql), role, sql);
            client.batch_execute("RESET ROLE").await.unwrap();
        }
    }
    // Whoever may read pay.anomalies can (its tail probabilities are functions, checked
    // against the reader).
    for role in ["pay_auditor", "pay_worker"] {
        client
            .batch_execute(&format!("SET ROLE {role}"))
            .await
            .unwrap();
        count(&client, "SELECT count(*) FROM pay.anomalies").await;
        client.batch_execute("RESET ROLE").await.unwrap();
    }
    // The operator sees what it needs to decide, and nothing else.
    client.batch_execute("SET ROLE pay_operator").await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.quarantined_events").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.event_type_health WHERE state = 'open'"
        )
        .await,
        1
    );
    count(&client, "SELECT count(*) FROM pay.anomalies").await;
    count(&client, "SELECT count(*) FROM pay.webhook_stats").await;
    for sql in [
        "SELECT * FROM pay.payments",
        "SELECT * FROM pay.webhook_events",
        "SELECT pay.begin_checkout('op-1', 100, 'usd')",
        "SELECT * FROM pay.claim_outbox('w')",
        "SELECT * FROM pay.claim_fulfillments('c')",
        "SELECT * FROM pay.ingest_webhook('{}', 't=1,v1=00')",
        "SELECT pay.add_webhook_secret('whsec_0123456789abcdef')",
        "SELECT * FROM pay._replay_event('evt_op', false)",
    ] {
        refused(
            &client.batch_execute(sql).await.expect_err(sql),
            "pay_operator",
            sql,
        );
    }
    client.batch_execute("RESET ROLE").await.unwrap();

    // The cause is fixed (by the application's owner); the operator closes the breaker and
    // replays: applied once, fulfilled once; a second replay changes nothing.
    fix_fulfillments(&client).await;
    client.batch_execute("SET ROLE pay_operator").await.unwrap();
    let reset: bool = client
        .query_one(
            "SELECT pay.reset_event_type('payment_intent.succeeded')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reset);
    let replayed: Vec<(String, String)> = client
        .query("SELECT event_id, outcome FROM pay.replay_events()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(replayed, [("evt_op".to_owned(), "applied".to_owned())]);
    assert!(client
        .query("SELECT * FROM pay.replay_events()", &[])
        .await
        .unwrap()
        .is_empty());
    client.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(
        breaker(&client, "payment_intent.succeeded").await.0,
        "closed"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.payments WHERE status = 'succeeded'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.audit_log WHERE cause LIKE 'replay%'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn the_half_open_probe_closes_on_success_and_reopens_on_failure() {
    let (_db, client) = setup().await;
    client
        .batch_execute("SET pay.breaker_failures = 1; SET pay.breaker_cooldown = '1 hour'")
        .await
        .unwrap();
    break_fulfillments(&client, "P0001").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(open_payment(&client, &format!("order-h{i}")).await);
    }
    let go = |i: usize| {
        let client = &client;
        let id = ids[i];
        async move {
            deliver(
                client,
                &format!("evt_h{i}"),
                &format!("order-h{i}"),
                id,
                "succeeded",
                1_700_000_000 + i as i64,
            )
            .await
            .0
        }
    };
    assert_eq!(go(0).await, "quarantined");
    assert_eq!(breaker(&client, "payment_intent.succeeded").await.0, "open");
    assert_eq!(go(1).await, "deferred", "open, cooling down");

    // Cooled down: one try, which fails and opens the breaker again (its cooldown restarts).
    client
        .batch_execute("SET pay.breaker_cooldown = '0'")
        .await
        .unwrap();
    let opened_before: std::time::SystemTime = client
        .query_one("SELECT opened_at FROM pay.event_type_health", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(go(2).await, "quarantined");
    let row = client
        .query_one(
            "SELECT state, opened_at, last_change FROM pay.event_type_health",
            &[],
        )
        .await
        .unwrap();
    let (state, opened, change): (String, std::time::SystemTime, String) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(state, "open");
    assert!(opened > opened_before, "the cooldown starts over");
    assert!(change.contains("probe failed"), "{change}");
    client
        .batch_execute("SET pay.breaker_cooldown = '1 hour'")
        .await
        .unwrap();
    assert_eq!(go(3).await, "deferred");

    // Fixed: the next try applies and closes the breaker; the type flows again.
    fix_fulfillments(&client).await;
    client
        .batch_execute("SET pay.breaker_cooldown = '0'")
        .await
        .unwrap();
    assert_eq!(go(4).await, "applied");
    assert_eq!(
        breaker(&client, "payment_intent.succeeded").await,
        ("closed".into(), 0)
    );
    assert_eq!(go(5).await, "applied");

    // By hand: reset closes an open breaker, once.
    client
        .execute(
            "UPDATE pay.event_type_health SET state = 'open', opened_at = now()",
            &[],
        )
        .await
        .unwrap();
    let reset: Vec<bool> = client
        .query("SELECT pay.reset_event_type('payment_intent.succeeded') UNION ALL SELECT pay.reset_event_type('payment_intent.succeeded')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reset, vec![true, false]);
    // Bad settings are named.
    client
        .batch_execute("SET pay.breaker_failures = 'many'")
        .await
        .unwrap();
    client
        .execute(
            "UPDATE pay.event_type_health SET state = 'open', opened_at = now()",
            &[],
        )
        .await
        .unwrap();
    let e = client
        .query("SELECT pay._breaker_admit('payment_intent.succeeded')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some("22023"));
}

#[tokio::test]
async fn infrastructure_failures_raise_and_store_nothing() {
    let (_db, client) = setup().await;
    break_fulfillments(&client, "53100").await; // disk_full
    let id = open_payment(&client, "order-disk").await;
    let e = deliver_err(&client, "evt_disk", "order-disk", id).await;
    assert_eq!(sqlstate(&e), Some("53100"));
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events").await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.event_type_health").await,
        0
    );
}

async fn deliver_err(
    client: &Client,
    event_id: &str,
    order: &str,
    payment: Uuid,
) -> tokio_postgres::Error {
    let intent = fixtures::payment_intent(
        &format!("pi_{order}"),
        &payment.to_string(),
        2000,
        "usd",
        "succeeded",
    );
    let event = fixtures::event(event_id, "payment_intent.succeeded", 1_700_000_000, intent);
    client
        .query_one(
            "SELECT status FROM pay.ingest_webhook($1, $2)",
            &[&event, &sign_now(&event, SECRET)],
        )
        .await
        .expect_err("an infrastructure failure raises")
}

#[tokio::test]
async fn a_lock_timeout_on_the_payment_quarantines_the_event() {
    let (db, client) = setup().await;
    let id = open_payment(&client, "order-locked").await;
    let mut holder = db.connect().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM pay.payments WHERE id = $1 FOR UPDATE",
        &[&id],
    )
    .await
    .unwrap();
    client
        .batch_execute("SET lock_timeout = '100ms'")
        .await
        .unwrap();
    assert_eq!(
        deliver(
            &client,
            "evt_locked",
            "order-locked",
            id,
            "succeeded",
            1_700_000_000
        )
        .await,
        ("quarantined".into(), 200)
    );
    tx.rollback().await.unwrap();
    let code: String = client
        .query_one("SELECT last_sqlstate FROM pay.quarantined_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(code, "55P03");
    client.batch_execute("RESET lock_timeout").await.unwrap();
    let replayed: String = client
        .query_one("SELECT outcome FROM pay.replay_events()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(replayed, "applied");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
}

async fn anomalies(client: &Client) -> Vec<(String, String)> {
    client
        .query("SELECT kind, subject FROM pay.anomalies ORDER BY 1, 2", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn has(found: &[(String, String)], kind: &str) -> bool {
    found.iter().any(|(k, _)| k == kind)
}

#[tokio::test]
async fn an_error_rate_spike_is_an_anomaly_and_is_notified_once_a_minute() {
    let (_db, client) = setup().await;
    assert!(anomalies(&client).await.is_empty());
    break_fulfillments(&client, "P0001").await;
    for i in 0..4 {
        let order = format!("order-s{i}");
        let id = open_payment(&client, &order).await;
        deliver(
            &client,
            &format!("evt_s{i}"),
            &order,
            id,
            "succeeded",
            1_700_000_000,
        )
        .await;
    }
    assert_eq!(
        anomalies(&client).await,
        vec![(
            "error_rate_spike".to_owned(),
            "payment_intent.succeeded".to_owned()
        )]
    );
    // The worker's call: new, notified; again within the minute: neither.
    let (appeared, notified): (bool, bool) = {
        let r = client
            .query_one("SELECT appeared, notified FROM pay.check_anomalies()", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((appeared, notified), (true, true));
    let r = client
        .query_one("SELECT appeared, notified FROM pay.check_anomalies()", &[])
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, bool>(0), r.get::<_, bool>(1)),
        (false, false),
        "once a minute"
    );
    client
        .execute(
            "UPDATE pay.anomaly_alerts SET last_notified_at = now() - interval '61 seconds'",
            &[],
        )
        .await
        .unwrap();
    let r = client
        .query_one("SELECT appeared, notified FROM pay.check_anomalies()", &[])
        .await
        .unwrap();
    assert_eq!((r.get::<_, bool>(0), r.get::<_, bool>(1)), (false, true));
}

#[tokio::test]
async fn a_held_event_against_a_history_with_failures_is_no_spike() {
    let (_db, client) = setup().await;
    // History: 1000 events of a type in the day before, 100 of them held back (10 %).
    client
        .batch_execute(
            "INSERT INTO pay.webhook_events (event_id, type, payload, outcome, received_at, held_at)
             SELECT 'evt_hist_' || i, 'charge.refunded', '{}', 'applied',
                    now() - interval '1 hour' - i * interval '1 second',
                    CASE WHEN i % 10 = 0 THEN now() - interval '1 hour' - i * interval '1 second' END
             FROM generate_series(1, 1000) i;
             INSERT INTO pay.webhook_events (event_id, type, payload, outcome, received_at, held_at)
             SELECT 'evt_now_' || i, 'charge.refunded', '{}', 'quarantined', now(),
                    CASE WHEN i = 1 THEN now() END
             FROM generate_series(1, 10) i;",
        )
        .await
        .unwrap();
    // 1 of 10 against about 10 %: nothing unusual.
    assert!(!has(&anomalies(&client).await, "error_rate_spike"));
}

#[tokio::test]
async fn silence_after_a_steady_success_rate_is_an_anomaly() {
    let (_db, client) = setup().await;
    // A day of history: 20 checkouts, 10 of them paid, the last success three hours ago.
    for i in 0..20 {
        let order = format!("order-hist{i}");
        let id: Uuid = client
            .query_one(
                "SELECT id FROM pay.begin_checkout($1, 2000, 'usd')",
                &[&order],
            )
            .await
            .unwrap()
            .get(0);
        let age = format!("{} hours", 3 + i);
        client
            .execute(
                "UPDATE pay.payments SET created_at = now() - $2::text::interval WHERE id = $1",
                &[&id, &age],
            )
            .await
            .unwrap();
        if i % 2 == 0 {
            client
                .execute(
                    "INSERT INTO pay.fulfillments (payment_id, order_ref, created_at)
                     VALUES ($1, $2, now() - $3::text::interval + interval '1 minute')",
                    &[&id, &order, &age],
                )
                .await
                .unwrap();
        }
    }
    assert!(!has(&anomalies(&client).await, "silence"));
    // Then 20 checkouts since, none paid: expected about 10 · 20 / 21 ≈ 9.5 successes.
    for i in 0..20 {
        let order = format!("order-gap{i}");
        let id: Uuid = client
            .query_one(
                "SELECT id FROM pay.begin_checkout($1, 2000, 'usd')",
                &[&order],
            )
            .await
            .unwrap()
            .get(0);
        client
            .execute(
                "UPDATE pay.payments SET created_at = now() - interval '1 hour' WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
    }
    let row = client
        .query_one(
            "SELECT observed, expected, score FROM pay.anomalies WHERE kind = 'silence'",
            &[],
        )
        .await
        .expect("silence is an anomaly");
    let (observed, expected, score): (f64, f64, f64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(observed, 0.0);
    assert!((expected - 10.0 * 20.0 / 21.0).abs() < 1e-9, "{expected}");
    assert!(score > 3.0, "{score}");
}

#[tokio::test]
async fn a_burst_of_signature_rejections_is_an_anomaly() {
    let (_db, client) = setup().await;
    let event = fixtures::event(
        "evt_probe",
        "payment_intent.succeeded",
        1_700_000_000,
        serde_json::json!({}),
    );
    let bad = sign_now(&event, "whsec_someone_elses_secret_0000");
    for _ in 0..9 {
        client
            .query_one(
                "SELECT status FROM pay.ingest_webhook($1, $2)",
                &[&event, &bad],
            )
            .await
            .unwrap();
    }
    assert!(
        !has(&anomalies(&client).await, "rejection_burst"),
        "below the minimum of 10"
    );
    client
        .query_one(
            "SELECT status FROM pay.ingest_webhook($1, $2)",
            &[&event, &bad],
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT observed, detail FROM pay.anomalies WHERE kind = 'rejection_burst'",
            &[],
        )
        .await
        .expect("a burst");
    assert_eq!(row.get::<_, f64>(0), 10.0);
    assert!(row.get::<_, String>(1).contains("signature_mismatch"));
}

#[tokio::test]
async fn outbox_lag_retry_storms_and_flagged_payments_are_anomalies() {
    let (_db, client) = setup().await;
    let lagging: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout('order-lag', 2000, 'usd')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        anomalies(&client).await.is_empty(),
        "a fresh command is due, not late"
    );
    client
        .execute(
            "UPDATE pay.outbox SET run_after = now() - interval '10 minutes' WHERE payment_id = $1",
            &[&lagging],
        )
        .await
        .unwrap();
    let storming: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout('order-storm', 2000, 'usd')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "UPDATE pay.outbox SET attempts = 7, first_attempt_at = now() - interval '1 hour',
                 run_after = now() + interval '1 minute' WHERE payment_id = $1",
            &[&storming],
        )
        .await
        .unwrap();
    client
        .execute("UPDATE pay.payments SET flagged_reason = 'amount differs', updated_at = now() WHERE id = $1", &[&lagging])
        .await
        .unwrap();
    assert_eq!(
        anomalies(&client).await,
        vec![
            ("flagged_payments".to_owned(), "payments".to_owned()),
            ("outbox_lag".to_owned(), "outbox".to_owned()),
            ("retry_storm".to_owned(), "create_payment_intent".to_owned()),
        ]
    );
    let attempts: f64 = client
        .query_one(
            "SELECT observed FROM pay.anomalies WHERE kind = 'retry_storm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 7.0);
}
