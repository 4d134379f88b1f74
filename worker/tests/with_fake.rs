//! The worker against `stripe-fake` (Stripe's idempotency semantics, fault injection, a
//! ledger of what really happened) and a real PostgreSQL with the extension. Counting at
//! the fake's ledger is what proves exactly-once: N orders, N PaymentIntents (or, in session
//! mode, N Checkout Sessions); M subscriptions, M Checkout Sessions, and each change of a
//! subscription seen once by Stripe.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{checkout, config, count, init_tracing, wait_for_count, WAIT};
use pgpay_tests::{wait_until, TestDb};
use pgpay_worker::CancellationToken;
use stripe_fake::{Config as FakeConfig, FaultAction, FaultRule, StripeFake};

const FAKE_KEY: &str = "sk_test_worker_vs_fake";
const WEBHOOK_SECRET: &str = "whsec_worker_vs_fake";

async fn fake(rate_limit_per_second: Option<u32>) -> StripeFake {
    StripeFake::start(FakeConfig {
        api_key: FAKE_KEY.into(),
        rate_limit_per_second,
        ..FakeConfig::default()
    })
    .await
    .expect("start stripe-fake")
}

fn worker_config(db: &TestDb, fake: &StripeFake) -> pgpay_worker::WorkerConfig {
    let mut cfg = config(db, &fake.base_url());
    cfg.stripe.secret_key = FAKE_KEY.into();
    cfg
}

/// order_ref → payment_intent id (session mode: checkout session id), as the database
/// recorded them.
async fn recorded_intents(
    client: &pgpay_tests::tokio_postgres::Client,
) -> BTreeMap<String, Option<String>> {
    client
        .query(
            "SELECT order_ref, CASE mode WHEN 'session' THEN stripe_checkout_session_id
                                         ELSE stripe_payment_intent_id END FROM pay.payments",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_and_faults_never_yield_a_second_payment_intent_or_session() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute(
            "SELECT pay.add_webhook_secret($1, 'fake')",
            &[&WEBHOOK_SECRET],
        )
        .await
        .unwrap();
    let fake = fake(None).await;
    let price = recurring_price(&fake).await;
    // Every kind of trouble, on the creates of both modes: answers lost after Stripe
    // committed, failures before it did, 429s, reset connections.
    for path in ["/v1/payment_intents", "/v1/checkout/sessions"] {
        for rule in [
            FaultRule::new("POST", path, FaultAction::DropResponseAfterCommit).times(6),
            FaultRule::new("POST", path, FaultAction::FailBeforeCommit).times(2),
            FaultRule::new("POST", path, FaultAction::RateLimit)
                .times(2)
                .retry_after_secs(1),
            FaultRule::new("POST", path, FaultAction::ResetConnection).times(2),
        ] {
            fake.add_fault(rule).unwrap();
        }
    }
    let mut cfg = worker_config(&db, &fake);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    fake.set_webhook(
        format!("http://{}/webhooks/stripe", worker.http_addr().unwrap()),
        WEBHOOK_SECRET,
    )
    .unwrap();
    // Subscriptions sign up through subscription-mode sessions, under the same faults.
    const M: usize = 6;
    for i in 0..M {
        client
            .execute(
                "SELECT pay.begin_subscription($1, $2, 1, success_url => 'https://app.example/welcome')",
                &[&format!("exactly-once-sub-{i}"), &price],
            )
            .await
            .unwrap();
    }
    // Half the orders pay through a PaymentIntent, half through a hosted Checkout Session.
    const N: i64 = 20;
    for i in 0..N {
        let order = format!("exactly-once-{i}");
        if i % 2 == 0 {
            checkout(&client, &order, 1000 + i).await;
        } else {
            client
                .query_one(
                    "SELECT pay.begin_checkout($1, $2, 'usd', mode => 'session',
                                               success_url => 'https://shop.example/thanks')",
                    &[&order, &(1000 + i)],
                )
                .await
                .unwrap();
        }
    }
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox
             WHERE kind IN ('create_payment_intent', 'create_checkout_session') AND status = 'done'",
            N,
            WAIT * 2
        )
        .await,
        "every create was recorded"
    );
    let ledger = fake.ledger();
    assert_eq!(
        ledger.payment_intents.created,
        N as u64 / 2,
        "N/2 orders, N/2 PaymentIntents"
    );
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'create_subscription_session' AND status = 'done'",
            M as i64,
            WAIT * 2
        )
        .await,
        "every subscription session create was recorded"
    );
    let ledger = fake.ledger();
    assert_eq!(
        ledger.checkout_sessions.created,
        N as u64 / 2 + M as u64,
        "N/2 session-mode orders and M subscriptions, as many Checkout Sessions"
    );
    assert_eq!(ledger.fault_count("drop_response_after_commit"), 12);
    assert_eq!(
        ledger.idempotency.conflicts, 0,
        "the same parameters on every attempt"
    );
    // A lost answer is recovered by a replay of the stored one (a replay can itself be
    // lost to a later fault, so the fake may count more than the worker saw).
    let seen = worker.metrics().idempotent_replays();
    assert!(
        seen >= 1 && seen <= ledger.idempotency.replays,
        "worker saw {seen} replays, fake {:?}",
        ledger.idempotency
    );

    // The database and the fake agree, order by order.
    let recorded = recorded_intents(&client).await;
    assert_eq!(recorded.len(), N as usize);
    for (order, recorded_id) in &recorded {
        let intents = ledger.payment_intents_with("order_ref", order);
        let sessions = ledger.checkout_sessions_with("order_ref", order);
        assert_eq!(
            intents.len() + sessions.len(),
            1,
            "one PaymentIntent or one Checkout Session for {order}"
        );
        let at_fake = intents
            .first()
            .map(|pi| pi.id.as_str())
            .or(sessions.first().map(|s| s.id.as_str()));
        assert_eq!(recorded_id.as_deref(), at_fake);
    }
    let distinct: BTreeSet<_> = recorded.values().collect();
    assert_eq!(distinct.len(), N as usize);

    subscription_commands_under_faults(&client, &fake, &price, M).await;
    worker.shutdown();
    worker.wait().await.unwrap();
}

/// A monthly recurring price at the fake.
async fn recurring_price(fake: &StripeFake) -> String {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/prices", fake.base_url()))
        .header("Authorization", format!("Bearer {FAKE_KEY}"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("currency=usd&unit_amount=900&recurring%5Binterval%5D=month&product_data%5Bname%5D=Seat")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let json: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    json["id"].as_str().unwrap().to_owned()
}

/// The second half of the exactly-once test: `m` subscriptions (begun before the payment
/// orders, under the session-create faults) have exactly one Checkout Session each; their
/// customers pay; then a change of quantity, a cancellation at period end and an immediate
/// cancellation (DELETE) each go out under lost answers, failures, 429s and resets, and Stripe
/// sees each change exactly once.
async fn subscription_commands_under_faults(
    client: &pgpay_tests::tokio_postgres::Client,
    fake: &StripeFake,
    price: &str,
    m: usize,
) {
    let m64 = m as i64;
    assert!(
        wait_for_count(
            client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'create_subscription_session' AND status = 'done'",
            m64,
            WAIT * 2
        )
        .await,
        "every subscription session create was recorded"
    );
    let ledger = fake.ledger();
    let sessions: Vec<(String, String)> = client
        .query(
            "SELECT id::text, stripe_checkout_session_id FROM pay.subscriptions ORDER BY subscription_ref",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(sessions.len(), m);
    for (id, session) in &sessions {
        let at_fake = ledger.checkout_sessions_with("pgpay_subscription_id", id);
        assert_eq!(
            at_fake.len(),
            1,
            "one Checkout Session for subscription {id}"
        );
        assert_eq!(&at_fake[0].id, session);
        fake.pay_checkout(
            session,
            stripe_fake::CheckoutPayment::Card("pm_card_visa".into()),
        )
        .await
        .unwrap();
    }
    assert!(
        wait_for_count(
            client,
            "SELECT count(*) FROM pay.subscriptions WHERE status = 'active' AND stripe_subscription_item_id IS NOT NULL",
            m64,
            WAIT
        )
        .await,
        "every sign-up became active through the relay"
    );

    for (method, path) in [
        ("POST", "/v1/subscriptions/*"),
        ("DELETE", "/v1/subscriptions/*"),
    ] {
        for rule in [
            FaultRule::new(method, path, FaultAction::DropResponseAfterCommit).times(3),
            FaultRule::new(method, path, FaultAction::FailBeforeCommit).times(1),
            FaultRule::new(method, path, FaultAction::RateLimit)
                .times(1)
                .retry_after_secs(1),
            FaultRule::new(method, path, FaultAction::ResetConnection).times(1),
        ] {
            fake.add_fault(rule).unwrap();
        }
    }
    let updated_before = fake.ledger().event_count("customer.subscription.updated");
    for i in 0..m {
        let r = format!("exactly-once-sub-{i}");
        let sql = match i % 3 {
            0 => "SELECT pay.change_subscription($1, $2, 3)",
            1 => "SELECT pay.cancel_subscription($1, true) WHERE $2::text IS NOT NULL",
            _ => "SELECT pay.cancel_subscription($1, false) WHERE $2::text IS NOT NULL",
        };
        client.execute(sql, &[&r, &price]).await.unwrap();
    }
    assert!(
        wait_for_count(
            client,
            "SELECT count(*) FROM pay.outbox
             WHERE kind IN ('update_subscription', 'cancel_subscription') AND status = 'done'",
            m64,
            WAIT * 2
        )
        .await,
        "every subscription command was recorded"
    );
    let ledger = fake
        .wait_for(WAIT, |l| {
            l.event_count("customer.subscription.deleted") as usize == m / 3
        })
        .await
        .expect("the immediate cancellations happened");
    assert!(ledger.fault_count("drop_response_after_commit") >= 12 + 6);
    assert_eq!(
        ledger.event_count("customer.subscription.updated") - updated_before,
        2 * (m as u64 / 3),
        "one update per change of quantity and per cancellation at period end, however often sent"
    );
    assert_eq!(
        ledger.event_count("customer.subscription.deleted"),
        m as u64 / 3
    );
    assert_eq!(ledger.subscriptions.created, m as u64);
    for (i, s) in ledger.subscriptions.list.iter().enumerate() {
        let r = s
            .metadata
            .get("subscription_ref")
            .cloned()
            .unwrap_or_default();
        let n: usize = r.rsplit('-').next().unwrap().parse().unwrap();
        match n % 3 {
            0 => assert_eq!((s.quantity, s.status.as_str()), (3, "active"), "{i}: {r}"),
            1 => assert!(s.cancel_at_period_end && s.status == "active", "{i}: {r}"),
            _ => assert_eq!(s.status, "canceled", "{i}: {r}"),
        }
    }
    assert_eq!(
        ledger.idempotency.conflicts, 0,
        "the same parameters on every attempt"
    );
    assert!(
        wait_for_count(
            client,
            "SELECT count(*) FROM pay.subscriptions WHERE status = 'canceled'",
            m64 / 3,
            WAIT
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_still_in_flight_at_stripe_is_retried_after_the_409() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // The first create takes longer than the worker waits: the worker gives up and sends it
    // again with the same key while Stripe still works on the first, gets 409, and retries
    // until Stripe replays the stored answer.
    fake.add_fault(
        FaultRule::new("POST", "/v1/payment_intents", FaultAction::Latency)
            .latency_ms(2500)
            .times(1),
    )
    .unwrap();
    let mut cfg = worker_config(&db, &fake);
    cfg.stripe.request_timeout = Duration::from_millis(500);
    cfg.stripe.connect_timeout = Duration::from_millis(500);
    cfg.retry.base = Duration::from_millis(100);
    cfg.retry.max = Duration::from_millis(300);
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    checkout(&client, "slow-stripe", 2500).await;
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.payments WHERE stripe_payment_intent_id IS NOT NULL",
            1,
            WAIT
        )
        .await
    );
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(ledger.idempotency.conflicts, 0);
    assert!(
        ledger.idempotency.in_flight_409 >= 1,
        "{:?}",
        ledger.idempotency
    );
    assert!(worker.metrics().retries("timeout") >= 1);
    // Stripe marks its 409 for a key in flight with Stripe-Should-Retry: true.
    let m = worker.metrics();
    assert!(m.retries("http_409") + m.retries("should_retry") >= 1);
    assert_eq!(m.idempotent_replays(), 1);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limiter_keeps_the_worker_under_stripes_limit() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    // Stripe allows 10/s here; the worker is set to 8/s and must never be refused.
    let fake = fake(Some(10)).await;
    let mut cfg = worker_config(&db, &fake);
    cfg.rate_limit = 8.0;
    cfg.concurrency = 16;
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    const N: i64 = 24;
    let started = std::time::Instant::now();
    for i in 0..N {
        checkout(&client, &format!("limited-{i}"), 100 + i).await;
    }
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'done'",
            N,
            WAIT
        )
        .await
    );
    let ledger = fake.ledger();
    assert_eq!(ledger.rate_limited, 0, "the worker stayed under the limit");
    assert_eq!(ledger.payment_intents.created, N as u64);
    // 24 requests at 8/s cannot take less than 23/8 s.
    assert!(started.elapsed() >= Duration::from_millis(2800));
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_limit_stripes_429s_are_retried_until_done() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(Some(5)).await;
    let mut cfg = worker_config(&db, &fake);
    cfg.rate_limit = 0.0;
    cfg.concurrency = 16;
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    const N: i64 = 15;
    for i in 0..N {
        checkout(&client, &format!("unlimited-{i}"), 100 + i).await;
    }
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'done'",
            N,
            WAIT * 2
        )
        .await
    );
    let ledger = fake.ledger();
    assert!(ledger.rate_limited > 0, "the burst was refused at first");
    assert_eq!(ledger.payment_intents.created, N as u64);
    assert_eq!(worker.metrics().retries("http_429"), ledger.rate_limited);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_pay_webhook_fulfil_and_refund_end_to_end() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute(
            "SELECT pay.add_webhook_secret($1, 'fake')",
            &[&WEBHOOK_SECRET],
        )
        .await
        .unwrap();
    let fake = fake(None).await;
    let mut cfg = worker_config(&db, &fake);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    fake.set_webhook(
        format!("http://{}/webhooks/stripe", worker.http_addr().unwrap()),
        WEBHOOK_SECRET,
    )
    .unwrap();

    let payment = checkout(&client, "e2e-order", 4200).await;
    let intent: String = client
        .query_one(
            "SELECT stripe_payment_intent_id FROM pay.wait_for_intent($1::text::uuid, 10000)",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);

    // The customer pays; Stripe tells the database through the worker's relay.
    fake.confirm(&intent, "pm_card_visa").await.unwrap();
    assert!(
        wait_for_count(&client, "SELECT count(*) FROM pay.fulfillments", 1, WAIT).await,
        "the success webhook was relayed and fulfilled once"
    );
    let status: String = client
        .query_one(
            "SELECT status::text FROM pay.payments WHERE id = $1::text::uuid",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "succeeded");

    // A refund goes out through the outbox, with its own key.
    client
        .execute("SELECT pay.refund($1::text::uuid)", &[&payment])
        .await
        .unwrap();
    let refunded = fake
        .wait_for(WAIT, |l| l.refunds.count == 1)
        .await
        .expect("the refund reached Stripe");
    assert_eq!(refunded.refunds.amount, 4200);
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'refund' AND status = 'done'",
            1,
            WAIT
        )
        .await
    );
    assert!(
        wait_until(WAIT, || async {
            count(&client, "SELECT count(*) FROM pay.webhook_events").await >= 2
        })
        .await
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_goes_out_after_the_create_with_the_intent_in_its_path() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // Hold the create at Stripe for a moment, so the cancel is written while the create is
    // in flight: it waits for the PaymentIntent id and goes out once the create's answer
    // brings it.
    fake.add_fault(
        FaultRule::new("POST", "/v1/payment_intents", FaultAction::Latency)
            .latency_ms(500)
            .times(1),
    )
    .unwrap();
    let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    let payment = checkout(&client, "cancel-me", 300).await;
    fake.wait_for(WAIT, |l| l.requests_to("POST /v1/payment_intents") == 1)
        .await
        .expect("the create reached Stripe");
    client
        .execute("SELECT pay.cancel_checkout($1::text::uuid)", &[&payment])
        .await
        .unwrap();
    let ledger = fake
        .wait_for(WAIT, |l| l.status_count("canceled") == 1)
        .await
        .expect("the cancel reached Stripe");
    assert_eq!(ledger.payment_intents.created, 1);
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'done'",
            2,
            WAIT
        )
        .await
    );
    worker.shutdown();
    worker.wait().await.unwrap();
}

/// How an order pays: a PaymentIntent, or a hosted Checkout Session.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Intent,
    Session,
}

/// `pay.begin_checkout` in `mode` → payment id (text).
async fn begin(
    client: &pgpay_tests::tokio_postgres::Client,
    order: &str,
    amount: i64,
    mode: Mode,
) -> String {
    match mode {
        Mode::Intent => checkout(client, order, amount).await,
        Mode::Session => client
            .query_one(
                "SELECT id::text FROM pay.begin_checkout($1, $2, 'usd', mode => 'session',
                                                         success_url => 'https://shop.example/thanks')",
                &[&order, &amount],
            )
            .await
            .unwrap()
            .get(0),
    }
}

/// Plays a first attempt of the create a day ago: claims it, optionally sends it to the fake
/// (whose answer is then "lost"), hands it back for a retry, and makes that attempt look 25
/// hours old to the database (first_attempt_at) and to the fake (its clock, so it has
/// forgotten the Idempotency-Key as Stripe would).
async fn first_attempt_a_day_ago(
    client: &pgpay_tests::tokio_postgres::Client,
    fake: &StripeFake,
    order: &str,
    reached_stripe: bool,
    mode: Mode,
) -> (String, i64, String) {
    let payment = begin(client, order, 1500, mode).await;
    let row = client
        .query_one(
            "SELECT id, attempts, idempotency_key, request FROM pay.claim_outbox('first-attempt', 1, interval '60 seconds')",
            &[],
        )
        .await
        .unwrap();
    let (id, attempt, key, request): (i64, i32, String, serde_json::Value) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if reached_stripe {
        let req = pgpay_worker::outbox::parse_request(&request, Some(&key)).unwrap();
        let resp = reqwest::Client::new()
            .post(format!("{}{}", fake.base_url(), req.path))
            .header("Authorization", format!("Bearer {FAKE_KEY}"))
            .header("Idempotency-Key", &key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(pgpay_worker::stripe::encode_form(&req.params))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    let handed_back: bool = client
        .query_one(
            "SELECT pay.retry_outbox($1, $2, NULL, 'the answer was lost', now())",
            &[&id, &attempt],
        )
        .await
        .unwrap()
        .get(0);
    assert!(handed_back);
    client
        .execute(
            "UPDATE pay.outbox SET first_attempt_at = now() - interval '25 hours' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    fake.advance_clock(25 * 3600);
    (payment, id, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_key_retention_a_lost_create_is_adopted_not_created_again() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // Stripe created the PaymentIntent, the answer was lost, and the retry comes a day later.
    let (payment, id, key) =
        first_attempt_a_day_ago(&client, &fake, "a-day-late", true, Mode::Intent).await;
    assert_eq!(fake.ledger().payment_intents.created, 1);

    let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    assert!(common::wait_for_status(&client, id, "done", WAIT).await);
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 1, "no second PaymentIntent");
    assert_eq!(ledger.requests_to("GET /v1/payment_intents/search"), 1);
    assert_eq!(
        ledger.requests_to("POST /v1/payment_intents"),
        1,
        "the create was not re-sent"
    );
    let (_, intent) = common::payment_status(&client, &payment).await;
    assert_eq!(
        intent.as_deref(),
        Some(ledger.payment_intents.list[0].id.as_str())
    );
    assert_eq!(worker.metrics().key_lookups("adopted"), 1);
    assert_eq!(
        common::create_command(&client, &payment).await.1,
        key,
        "not re-keyed"
    );
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_key_retention_a_create_that_never_happened_is_rekeyed() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // The first attempt never reached Stripe.
    let (payment, id, old_key) =
        first_attempt_a_day_ago(&client, &fake, "never-happened", false, Mode::Intent).await;
    assert_eq!(fake.ledger().payment_intents.created, 0);

    let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    assert!(common::wait_for_status(&client, id, "done", WAIT).await);
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(ledger.requests_to("GET /v1/payment_intents/search"), 1);
    let (_, new_key) = common::create_command(&client, &payment).await;
    assert_ne!(new_key, old_key, "re-keyed");
    assert_eq!(worker.metrics().key_lookups("rekeyed"), 1);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.audit_log WHERE cause LIKE 'create re-keyed%'"
        )
        .await,
        1
    );
    worker.shutdown();
    worker.wait().await.unwrap();
}

/// The session-mode payment: (status, Checkout Session id, checkout URL).
async fn session_of(
    client: &pgpay_tests::tokio_postgres::Client,
    payment: &str,
) -> (String, Option<String>, Option<String>) {
    let r = client
        .query_one(
            "SELECT status::text, stripe_checkout_session_id, checkout_url FROM pay.payments
             WHERE id = $1::text::uuid",
            &[&payment],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_key_retention_a_lost_session_create_is_adopted_not_created_again() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // Stripe created the Checkout Session, the answer was lost, and the retry comes 25 hours
    // later: Stripe has forgotten the key, and the session (24 hours at most) has expired.
    let (payment, id, key) =
        first_attempt_a_day_ago(&client, &fake, "a-day-late-session", true, Mode::Session).await;
    let before = fake.ledger();
    assert_eq!(before.checkout_sessions.created, 1);
    let created = before.checkout_sessions.list[0].id.clone();

    let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    assert!(common::wait_for_status(&client, id, "done", WAIT).await);
    let ledger = fake.ledger();
    assert_eq!(ledger.checkout_sessions.created, 1, "no second session");
    assert_eq!(
        ledger.requests_to("POST /v1/checkout/sessions"),
        1,
        "the create was not re-sent"
    );
    assert!(
        ledger.requests_to("GET /v1/checkout/sessions") >= 1,
        "sessions were listed to find ours: {:?}",
        ledger.requests
    );
    assert_eq!(ledger.requests_to("GET /v1/payment_intents/search"), 0);
    assert_eq!(worker.metrics().key_lookups("adopted"), 1);
    assert_eq!(worker.metrics().key_lookups("rekeyed"), 0);
    assert_eq!(
        common::create_command(&client, &payment).await.1,
        key,
        "not re-keyed"
    );
    // The adopted session is the one Stripe made; it expired while the answer was lost, so
    // the attempt is over and the order may begin again.
    let (status, session, url) = session_of(&client, &payment).await;
    assert_eq!(session.as_deref(), Some(created.as_str()));
    // Stripe renders an expired session without its URL: nothing to send a customer to.
    assert_eq!(url, None);
    assert_eq!(ledger.checkout_sessions.list[0].status, "expired");
    assert_eq!(status, "canceled");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.audit_log
             WHERE cause LIKE 'create re-keyed%' OR cause LIKE 'flagged%'"
        )
        .await,
        0
    );
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_key_retention_a_session_create_that_never_happened_is_rekeyed() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // The first attempt never reached Stripe.
    let (payment, id, old_key) = first_attempt_a_day_ago(
        &client,
        &fake,
        "never-happened-session",
        false,
        Mode::Session,
    )
    .await;
    assert_eq!(fake.ledger().checkout_sessions.created, 0);

    let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    assert!(common::wait_for_status(&client, id, "done", WAIT).await);
    let ledger = fake.ledger();
    assert_eq!(ledger.checkout_sessions.created, 1, "exactly one session");
    assert_eq!(ledger.payment_intents.created, 0);
    assert_eq!(ledger.requests_to("POST /v1/checkout/sessions"), 1);
    assert!(ledger.requests_to("GET /v1/checkout/sessions") >= 1);
    let (_, new_key) = common::create_command(&client, &payment).await;
    assert_ne!(new_key, old_key, "re-keyed");
    assert_eq!(worker.metrics().key_lookups("rekeyed"), 1);
    assert_eq!(worker.metrics().key_lookups("adopted"), 0);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.audit_log WHERE cause LIKE 'create re-keyed%'"
        )
        .await,
        1
    );
    // The one session is the payment's, open, and the app has its URL.
    let session = &ledger.checkout_sessions.list[0];
    assert_eq!(session.status, "open");
    assert_eq!(
        session.metadata.get("pgpay_payment_id").map(String::as_str),
        Some(payment.as_str())
    );
    let (status, recorded, url) = session_of(&client, &payment).await;
    assert_eq!(recorded.as_deref(), Some(session.id.as_str()));
    assert_eq!(status, "requires_payment_method");
    assert!(url.is_some());
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_sigkilled_mid_create_leaves_one_payment_intent_and_one_session() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake(None).await;
    // Stripe is slow on the first create of each mode: the worker process is killed while both
    // requests are at Stripe, which finishes them anyway.
    for path in ["/v1/payment_intents", "/v1/checkout/sessions"] {
        fake.add_fault(
            FaultRule::new("POST", path, FaultAction::Latency)
                .latency_ms(1500)
                .times(1),
        )
        .unwrap();
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgpay-worker"))
        .arg("run")
        .env_clear()
        .env("DATABASE_URL", db.database_url())
        .env("STRIPE_SECRET_KEY", FAKE_KEY)
        .env("STRIPE_API_BASE", fake.base_url())
        .env("PGPAY_WORKER_LEASE", "9s")
        .env("PGPAY_WORKER_REQUEST_TIMEOUT", "5s")
        .env("PGPAY_WORKER_POLL_INTERVAL", "200ms")
        .env("PGPAY_WORKER_ID", "doomed-process")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the pgpay-worker binary");
    checkout(&client, "killed-intent", 2100).await;
    client
        .query_one(
            "SELECT pay.begin_checkout('killed-session', 3100, 'usd', mode => 'session',
                 success_url => 'https://shop.example/thanks')",
            &[],
        )
        .await
        .unwrap();
    let both_at_stripe = wait_until(WAIT, || async {
        let requests = fake.ledger().requests;
        requests
            .get("POST /v1/payment_intents")
            .copied()
            .unwrap_or(0)
            >= 1
            && requests
                .get("POST /v1/checkout/sessions")
                .copied()
                .unwrap_or(0)
                >= 1
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let outbox: Vec<(String, String, i32)> = client
        .query(
            "SELECT kind, status, attempts FROM pay.outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        both_at_stripe,
        "the process sent both creates before it died: {:?} {outbox:?}",
        fake.ledger().requests
    );

    // Another worker takes the commands over once the dead one's leases expire and sends them
    // again under the same keys: Stripe replays what it made.
    let rescuer = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind IN ('create_payment_intent', 'create_checkout_session') AND status = 'done'",
            2,
            WAIT
        )
        .await
    );
    let ledger = fake.ledger();
    assert_eq!(
        ledger.checkout_sessions.created, 1,
        "one session for the session-mode order"
    );
    assert_eq!(
        ledger.payment_intents.created, 1,
        "one PaymentIntent for the payment_intent-mode order (the unpaid session has none yet)"
    );
    let recorded = recorded_intents(&client).await;
    assert!(recorded.values().all(Option::is_some), "{recorded:?}");
    let attempts: i64 = count(
        &client,
        "SELECT min(attempts)::bigint FROM pay.outbox WHERE kind IN ('create_payment_intent', 'create_checkout_session')",
    )
    .await;
    assert!(
        attempts >= 2,
        "each create was sent again by the rescuer: {attempts}"
    );
    rescuer.shutdown();
    rescuer.wait().await.unwrap();
}

/// A subscription's session create whose first attempt was a day ago: claimed, sent to the
/// fake (or not), handed back, then aged past Stripe's key retention on both clocks.
async fn subscription_create_a_day_ago(
    client: &pgpay_tests::tokio_postgres::Client,
    fake: &StripeFake,
    subscription_ref: &str,
    reached_stripe: bool,
) -> (i64, String) {
    let price = recurring_price(fake).await;
    client
        .execute(
            "SELECT pay.begin_subscription($1, $2, 2, success_url => 'https://app.example/welcome')",
            &[&subscription_ref, &price],
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT id, attempts, idempotency_key, request FROM pay.claim_outbox('first-attempt', 1, interval '60 seconds')",
            &[],
        )
        .await
        .unwrap();
    let (id, attempt, key, request): (i64, i32, String, serde_json::Value) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if reached_stripe {
        let req = pgpay_worker::outbox::parse_request(&request, Some(&key)).unwrap();
        let resp = reqwest::Client::new()
            .post(format!("{}{}", fake.base_url(), req.path))
            .header("Authorization", format!("Bearer {FAKE_KEY}"))
            .header("Idempotency-Key", &key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(pgpay_worker::stripe::encode_form(&req.params))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    let handed_back: bool = client
        .query_one(
            "SELECT pay.retry_outbox($1, $2, NULL, 'the answer was lost', now())",
            &[&id, &attempt],
        )
        .await
        .unwrap()
        .get(0);
    assert!(handed_back);
    client
        .execute(
            "UPDATE pay.outbox SET first_attempt_at = now() - interval '25 hours' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    fake.advance_clock(25 * 3600);
    (id, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_key_retention_a_lost_subscription_session_is_adopted_or_rekeyed() {
    init_tracing();
    for reached_stripe in [true, false] {
        let db = TestDb::create().await;
        let client = db.connect().await;
        let fake = fake(None).await;
        let (id, key) =
            subscription_create_a_day_ago(&client, &fake, "late-sub", reached_stripe).await;
        assert_eq!(
            fake.ledger().checkout_sessions.created,
            u64::from(reached_stripe)
        );
        let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
            .await
            .unwrap();
        assert!(common::wait_for_status(&client, id, "done", WAIT).await);
        let ledger = fake.ledger();
        assert_eq!(
            ledger.checkout_sessions.created, 1,
            "one session either way"
        );
        assert!(ledger.requests_to("GET /v1/checkout/sessions") >= 1);
        let row = client
            .query_one(
                "SELECT s.id::text, s.stripe_checkout_session_id, o.idempotency_key
                 FROM pay.subscriptions s JOIN pay.outbox o ON o.subscription_id = s.id
                 WHERE o.id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let (sub_id, session, now_key): (String, Option<String>, String) =
            (row.get(0), row.get(1), row.get(2));
        let at_fake = ledger.checkout_sessions_with("pgpay_subscription_id", &sub_id);
        assert_eq!(at_fake.len(), 1);
        assert_eq!(session.as_deref(), Some(at_fake[0].id.as_str()));
        if reached_stripe {
            assert_eq!(worker.metrics().key_lookups("adopted"), 1);
            assert_eq!(
                ledger.requests_to("POST /v1/checkout/sessions"),
                1,
                "the create was not re-sent"
            );
            assert_eq!(now_key, key, "not re-keyed");
        } else {
            assert_eq!(worker.metrics().key_lookups("rekeyed"), 1);
            assert_ne!(now_key, key, "re-keyed");
        }
        worker.shutdown();
        worker.wait().await.unwrap();
    }
}
