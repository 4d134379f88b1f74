//! Reconciliation against `stripe-fake` over HTTP and a real PostgreSQL: the database converges to
//! Stripe's ledger and every difference is explained (invariant 8). The library is driven
//! directly; the CLI paths (`reconcile`, `status`, exit codes) through the binary.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{checkout, config, count, init_tracing, wait_for_count, WAIT};
use pgpay_tests::tokio_postgres::Client;
use pgpay_tests::{wait_until, TestDb};
use pgpay_worker::jobs::reconcile::{reconcile_with_config, ReconcileOptions, Report, Started};
use pgpay_worker::{CancellationToken, StripePhase, WorkerConfig};
use serde_json::Value;
use stripe_fake::{Config as FakeConfig, DeliveryOptionsPatch, FaultAction, FaultRule, StripeFake};

const FAKE_KEY: &str = "sk_test_reconcile_vs_fake";
const WEBHOOK_SECRET: &str = "whsec_reconcile_vs_fake";
const WINDOW: Duration = Duration::from_secs(48 * 3600);

async fn fake() -> StripeFake {
    StripeFake::start(FakeConfig {
        api_key: FAKE_KEY.into(),
        ..FakeConfig::default()
    })
    .await
    .expect("start stripe-fake")
}

fn worker_config(db: &TestDb, fake: &StripeFake) -> WorkerConfig {
    let mut cfg = config(db, &fake.base_url());
    cfg.stripe.secret_key = FAKE_KEY.into();
    cfg.refresh_stuck_every = None;
    cfg
}

async fn reconcile(db: &TestDb, fake: &StripeFake, dry_run: bool) -> Report {
    let options = ReconcileOptions {
        dry_run,
        ..ReconcileOptions::new(WINDOW)
    };
    match reconcile_with_config(
        &worker_config(db, fake),
        &options,
        &CancellationToken::new(),
        &|_, _| {},
    )
    .await
    .expect("reconcile")
    {
        Started::Ran(report) => report,
        Started::AlreadyRunning => panic!("no other run should be open"),
    }
}

/// A form POST to the fake's API, as the Dashboard or a crashed worker would have sent it.
async fn fake_post(fake: &StripeFake, path: &str, params: &[(&str, &str)]) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", fake.base_url()))
        .header("Authorization", format!("Bearer {FAKE_KEY}"))
        .form(params)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// PaymentIntent id → status, as the database has them.
async fn ours(client: &Client) -> BTreeMap<String, String> {
    client
        .query(
            "SELECT stripe_payment_intent_id, status::text FROM pay.payments",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect()
}

async fn wait_for_intent(client: &Client, payment: &str) -> String {
    client
        .query_one(
            "SELECT stripe_payment_intent_id FROM pay.wait_for_intent($1::text::uuid, 10000)",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0)
}

/// Everything reconciliation could touch, to prove that something did not change.
async fn snapshot(client: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT count(*)::text FROM pay.audit_log",
        "SELECT count(*)::text FROM pay.findings",
        "SELECT count(*)::text FROM pay.reconciliation_runs",
        "SELECT count(*)::text FROM pay.fulfillments",
        "SELECT count(*)::text FROM pay.webhook_events",
        "SELECT coalesce(string_agg(id::text || status::text || coalesce(stripe_payment_intent_id, '-') || amount::text, ',' ORDER BY id), '') FROM pay.payments",
        "SELECT coalesce(string_agg(id::text || status::text, ',' ORDER BY id), '') FROM pay.outbox",
    ] {
        out.push(client.query_one(sql, &[]).await.unwrap().get(0));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reconcile_repairs_dropped_webhooks_and_fulfils_each_success_once() {
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
    let fake = fake().await;
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
    fake.update_webhook_options(DeliveryOptionsPatch {
        drop_probability: Some(0.2),
        ..DeliveryOptionsPatch::default()
    })
    .unwrap();

    const N: usize = 30;
    let mut payments = Vec::new();
    for i in 0..N {
        payments.push(checkout(&client, &format!("dropped-{i}"), 1000 + i as i64).await);
    }
    let mut intents = Vec::new();
    for p in &payments {
        intents.push(wait_for_intent(&client, p).await);
    }
    // The customers pay: most succeed, every sixth card is declined.
    for (i, pi) in intents.iter().enumerate() {
        let pm = if i % 6 == 0 {
            "pm_card_chargeDeclined"
        } else {
            "pm_card_visa"
        };
        let _ = fake.confirm(pi, pm).await;
    }
    let ledger = fake
        .wait_for(WAIT, |l| {
            l.webhooks.held == 0 && l.webhooks.ok + l.webhooks.dropped >= l.webhooks.queued
        })
        .await
        .expect("every webhook delivered or dropped");
    assert!(ledger.webhooks.dropped > 0, "{:?}", ledger.webhooks);
    worker.shutdown();
    worker.wait().await.unwrap();

    let at_stripe: BTreeMap<String, String> = ledger
        .payment_intents
        .list
        .iter()
        .map(|pi| (pi.id.clone(), pi.status.clone()))
        .collect();
    let before = ours(&client).await;
    assert_ne!(before, at_stripe, "dropped webhooks left payments behind");

    let report = reconcile(&db, &fake, false).await;
    let c = &report.counts;
    assert_eq!(c.objects, N as u64);
    assert_eq!(c.adopted + c.not_ours + c.flagged, 0, "{c:?}");
    assert!(c.applied > 0, "{c:?}");
    assert_eq!(
        ours(&client).await,
        at_stripe,
        "every payment equals Stripe"
    );
    let succeeded = at_stripe.values().filter(|s| *s == "succeeded").count() as i64;
    assert_eq!(succeeded, (N - N.div_ceil(6)) as i64);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        succeeded,
        "each success fulfilled once"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.payments p WHERE p.status = 'succeeded' AND \
             (SELECT count(*) FROM pay.fulfillments f WHERE f.payment_id = p.id) <> 1"
        )
        .await,
        0
    );
    assert_eq!(c.missing_at_stripe, 0);

    // A second run on an unchanged ledger changes nothing and finds nothing new.
    let audit = count(&client, "SELECT count(*) FROM pay.audit_log").await;
    let findings = count(&client, "SELECT count(*) FROM pay.findings").await;
    let again = reconcile(&db, &fake, false).await;
    let c = &again.counts;
    assert_eq!(
        (
            c.applied,
            c.adopted,
            c.flagged,
            c.events_replayed,
            c.findings
        ),
        (0, 0, 0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.unchanged + c.ignored, N as u64, "{c:?}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.audit_log").await,
        audit
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.findings").await,
        findings
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        succeeded
    );
    let run: (i32, i32, Option<String>) = client
        .query_one(
            "SELECT objects, findings, error FROM pay.reconciliation_runs WHERE id = $1",
            &[&again.run_id],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(run, (N as i32, 0, None));
}

/// A session-mode payment's (status, Checkout Session id, PaymentIntent id).
async fn session_payment(client: &Client, payment: &str) -> (String, String, Option<String>) {
    let r = client
        .query_one(
            "SELECT status::text, stripe_checkout_session_id, stripe_payment_intent_id
             FROM pay.payments WHERE id = $1::text::uuid",
            &[&payment],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reconcile_repairs_checkout_sessions_whose_webhooks_were_all_lost() {
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
    let fake = fake().await;
    let mut cfg = worker_config(&db, &fake);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    // Every delivery is lost: the relay is there, nothing reaches it.
    fake.set_webhook(
        format!("http://{}/webhooks/stripe", worker.http_addr().unwrap()),
        WEBHOOK_SECRET,
    )
    .unwrap();
    fake.update_webhook_options(DeliveryOptionsPatch {
        drop_probability: Some(1.0),
        ..DeliveryOptionsPatch::default()
    })
    .unwrap();

    // Two hosted checkouts: one customer pays by card, the other walks away.
    let mut sessions = Vec::new();
    for (order, amount) in [("session-paid", 4100_i64), ("session-abandoned", 4200)] {
        let payment: String = client
            .query_one(
                "SELECT id::text FROM pay.begin_checkout($1, $2, 'usd', mode => 'session',
                                                         success_url => 'https://shop.example/thanks')",
                &[&order, &amount],
            )
            .await
            .unwrap()
            .get(0);
        let session: String = client
            .query_one(
                "SELECT stripe_checkout_session_id FROM pay.wait_for_checkout($1::text::uuid, 10000)",
                &[&payment],
            )
            .await
            .unwrap()
            .get(0);
        sessions.push((payment, session));
    }
    let [(paid, paid_session), (abandoned, abandoned_session)] =
        <[_; 2]>::try_from(sessions).unwrap();
    fake.pay_checkout(
        &paid_session,
        stripe_fake::CheckoutPayment::Card("pm_card_visa".into()),
    )
    .await
    .unwrap();
    fake.abandon_checkout(&abandoned_session).await.unwrap();
    let ledger = fake
        .wait_for(WAIT, |l| {
            l.webhooks.held == 0 && l.webhooks.ok + l.webhooks.dropped >= l.webhooks.queued
        })
        .await
        .expect("every webhook dropped");
    assert_eq!(ledger.webhooks.ok, 0, "{:?}", ledger.webhooks);
    assert!(
        ledger
            .events
            .by_type
            .contains_key("checkout.session.completed")
            && ledger
                .events
                .by_type
                .contains_key("checkout.session.expired"),
        "{:?}",
        ledger.events.by_type
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    // The database never heard: both still wait for their customer.
    for payment in [&paid, &abandoned] {
        assert_eq!(
            session_payment(&client, payment).await.0,
            "requires_payment_method"
        );
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events").await,
        0
    );

    let report = reconcile(&db, &fake, false).await;
    let c = &report.counts;
    assert_eq!(c.flagged + c.not_ours + c.missing_at_stripe, 0, "{c:?}");
    assert!(c.applied >= 2, "{c:?}");
    // The paid session: succeeded, its PaymentIntent recorded, fulfilled once.
    let paid_pi = fake
        .checkout_session(&paid_session)
        .and_then(|s| s["payment_intent"].as_str().map(str::to_owned))
        .expect("the paid session has a PaymentIntent");
    assert_eq!(
        session_payment(&client, &paid).await,
        ("succeeded".into(), paid_session.clone(), Some(paid_pi))
    );
    // The expired session: canceled, nothing to fulfil.
    assert_eq!(
        session_payment(&client, &abandoned).await,
        ("canceled".into(), abandoned_session.clone(), None)
    );
    let fulfilled = client
        .query("SELECT payment_id::text FROM pay.fulfillments", &[])
        .await
        .unwrap();
    assert_eq!(fulfilled.len(), 1);
    assert_eq!(fulfilled[0].get::<_, String>(0), paid);
    // Findings say what was repaired; none asks a human for anything.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.findings WHERE kind <> 'status_drift_fixed'"
        )
        .await,
        0,
        "{:?}",
        report.findings
    );

    // A second run finds everything in place and changes nothing.
    let before = snapshot(&client).await;
    let again = reconcile(&db, &fake, false).await;
    assert_eq!(
        again.counts.applied + again.counts.adopted,
        0,
        "{:?}",
        again.counts
    );
    let (mut after, mut before) = (snapshot(&client).await, before);
    // Everything but the count of runs (index 2: the second run's own row).
    after.remove(2);
    before.remove(2);
    assert_eq!(before, after, "the second run changed nothing");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_adopted_drift_is_a_finding_foreign_intents_are_counted_and_dry_run_changes_nothing(
) {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake().await;

    // A payment whose PaymentIntent the database knows; Stripe's amount then changes under it
    // (the Dashboard) and it is paid, with no webhook to tell us.
    let worker = pgpay_worker::start(worker_config(&db, &fake), CancellationToken::new())
        .await
        .unwrap();
    let drift = checkout(&client, "drift", 5000).await;
    let drift_pi = wait_for_intent(&client, &drift).await;
    worker.shutdown();
    worker.wait().await.unwrap();
    fake_post(
        &fake,
        &format!("/v1/payment_intents/{drift_pi}"),
        &[("amount", "7000")],
    )
    .await;
    fake.confirm(&drift_pi, "pm_card_visa").await.unwrap();

    // An orphan: Stripe created the PaymentIntent, the worker died before recording it.
    let orphan = checkout(&client, "orphan", 2500).await;
    let orphan_pi = fake_post(
        &fake,
        "/v1/payment_intents",
        &[
            ("amount", "2500"),
            ("currency", "usd"),
            ("metadata[pgpay_payment_id]", &orphan),
            ("metadata[order_ref]", "orphan"),
        ],
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Someone else's PaymentIntent on the same account.
    fake_post(
        &fake,
        "/v1/payment_intents",
        &[("amount", "999"), ("currency", "usd")],
    )
    .await;

    // A dry run says what would happen and changes nothing, not even the run row.
    let before = snapshot(&client).await;
    let dry = reconcile(&db, &fake, true).await;
    assert!(dry.dry_run);
    let c = &dry.counts;
    assert_eq!(
        (c.objects, c.adopted, c.flagged, c.not_ours),
        (3, 1, 1, 1),
        "{c:?}"
    );
    assert!(c.findings >= 2, "{c:?}");
    let outcomes: Vec<_> = dry.changes.iter().map(|ch| ch.outcome.as_str()).collect();
    assert!(
        outcomes.contains(&"adopted") && outcomes.contains(&"flagged"),
        "{outcomes:?}"
    );
    assert!(
        dry.findings.iter().any(|f| f.kind == "amount_drift"),
        "{:?}",
        dry.findings
    );
    assert_eq!(snapshot(&client).await, before, "a dry run changes nothing");

    let report = reconcile(&db, &fake, false).await;
    let c = &report.counts;
    assert_eq!(
        (c.objects, c.adopted, c.flagged, c.not_ours),
        (3, 1, 1, 1),
        "{c:?}"
    );

    // Adopted, not duplicated: the payment has the one PaymentIntent and its create is closed.
    let (_, recorded) = common::payment_status(&client, &orphan).await;
    assert_eq!(recorded.as_deref(), Some(orphan_pi.as_str()));
    let (create_id, _) = common::create_command(&client, &orphan).await;
    assert_eq!(common::outbox_row(&client, create_id).await.status, "done");
    assert_eq!(
        fake.ledger()
            .payment_intents_with("pgpay_payment_id", &orphan)
            .len(),
        1
    );

    // Drift: a finding, and no fulfillment.
    let drift_findings = client
        .query(
            "SELECT expected, actual FROM pay.reconciliation_findings WHERE kind = 'amount_drift' AND payment_id = $1::text::uuid",
            &[&drift],
        )
        .await
        .unwrap();
    assert_eq!(drift_findings.len(), 1);
    assert_eq!(
        (
            drift_findings[0].get::<_, String>(0),
            drift_findings[0].get::<_, String>(1)
        ),
        ("5000".into(), "7000".into())
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        0
    );

    // status sees what needs a human.
    let status = pgpay_worker::jobs::status::read(&client).await.unwrap();
    let problems = status.problems(Duration::from_secs(3600));
    assert!(
        problems
            .iter()
            .any(|p| p.contains("open reconciliation finding")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("flagged")),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_reconciles_one_runs_the_other_is_refused() {
    init_tracing();
    let db = TestDb::create().await;
    let fake = fake().await;
    fake.seed(stripe_fake::SeedRequest::new(250)).unwrap();
    // The first listing is slow, so the first run is still open when the second asks.
    fake.add_fault(
        FaultRule::new("GET", "/v1/payment_intents", FaultAction::Latency)
            .latency_ms(300)
            .times(1),
    )
    .unwrap();
    let cfg = worker_config(&db, &fake);
    let options = ReconcileOptions::new(WINDOW);
    let (cancel_a, cancel_b) = (CancellationToken::new(), CancellationToken::new());
    let (a, b) = tokio::join!(
        reconcile_with_config(&cfg, &options, &cancel_a, &|_, _| {}),
        reconcile_with_config(&cfg, &options, &cancel_b, &|_, _| {}),
    );
    let results = [a.unwrap(), b.unwrap()];
    let ran: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Started::Ran(report) => Some(report),
            Started::AlreadyRunning => None,
        })
        .collect();
    assert_eq!(ran.len(), 1, "{results:?}");
    assert_eq!(ran[0].counts.objects, 250);
    assert_eq!(
        ran[0].counts.pages, 4,
        "3 pages of PaymentIntents, 1 (empty) of Checkout Sessions"
    );
    assert_eq!(ran[0].counts.not_ours, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refreshes_stuck_payments_and_reconciles_on_a_schedule() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake().await;

    // Stuck: paid at Stripe, no webhook, no movement for two hours.
    let mut cfg = worker_config(&db, &fake);
    cfg.refresh_stuck_every = Some(Duration::from_millis(200));
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let stuck = checkout(&client, "stuck", 1200).await;
    let stuck_pi = wait_for_intent(&client, &stuck).await;
    fake.confirm(&stuck_pi, "pm_card_visa").await.unwrap();
    client
        .execute(
            "UPDATE pay.payments SET updated_at = now() - interval '2 hours' WHERE id = $1::text::uuid",
            &[&stuck],
        )
        .await
        .unwrap();
    assert!(
        wait_for_count(&client, "SELECT count(*) FROM pay.fulfillments", 1, WAIT).await,
        "the refresh found the success"
    );
    assert_eq!(common::payment_status(&client, &stuck).await.0, "succeeded");
    assert_eq!(
        fake.ledger().requests_to("GET /v1/payment_intents"),
        0,
        "a GET by id, not a listing"
    );
    let m = worker.metrics().clone();
    worker.shutdown();
    worker.wait().await.unwrap();
    // The refresh's reads are counted, under their own phase: every GET the fake saw.
    let gets = fake.ledger().requests_to("GET /v1/payment_intents/:id");
    assert!(gets >= 1);
    assert_eq!(
        m.stripe_requests(
            "GET /v1/payment_intents/{id}",
            Some(200),
            StripePhase::Refresh
        ),
        gets
    );
    assert_eq!(
        m.stripe_requests(
            "GET /v1/payment_intents/{id}",
            Some(200),
            StripePhase::Outbox
        ),
        0
    );
    assert_eq!(
        m.stripe_requests("POST /v1/payment_intents", Some(200), StripePhase::Outbox),
        1,
        "the create, as before"
    );

    // Scheduled reconciliation adopts an orphan without anyone running `reconcile`.
    let orphan = checkout(&client, "scheduled-orphan", 800).await;
    fake_post(
        &fake,
        "/v1/payment_intents",
        &[
            ("amount", "800"),
            ("currency", "usd"),
            ("metadata[pgpay_payment_id]", &orphan),
        ],
    )
    .await;
    let mut cfg = worker_config(&db, &fake);
    cfg.reconcile_every = Some(Duration::from_millis(300));
    // The dispatcher must not send the create first: park it far in the future.
    client
        .execute(
            "UPDATE pay.outbox SET run_after = now() + interval '1 hour' WHERE payment_id = $1::text::uuid",
            &[&orphan],
        )
        .await
        .unwrap();
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert!(
        wait_until(WAIT, || async {
            common::payment_status(&client, &orphan).await.1.is_some()
        })
        .await,
        "adopted by the scheduled run"
    );
    assert!(
        wait_for_count(
            &client,
            "SELECT least(count(*), 2) FROM pay.reconciliation_runs WHERE finished_at IS NOT NULL AND error IS NULL",
            2,
            WAIT
        )
        .await,
        "runs keep coming"
    );
    assert_eq!(
        fake.ledger()
            .payment_intents_with("pgpay_payment_id", &orphan)
            .len(),
        1
    );
    let m = worker.metrics().clone();
    worker.shutdown();
    worker.wait().await.unwrap();
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.reconciliation_runs WHERE finished_at IS NULL"
        )
        .await,
        0,
        "shutdown closes a run in progress"
    );
    // Reconciliation's reads are counted under phase="reconcile", one per list page: at least
    // one page of each list per finished run, and never more than the fake saw (a request cut
    // short by the shutdown reached the fake but got no answer to count).
    let ledger = fake.ledger();
    for (endpoint, route) in [
        ("GET /v1/payment_intents", "GET /v1/payment_intents"),
        ("GET /v1/checkout/sessions", "GET /v1/checkout/sessions"),
        ("GET /v1/events", "GET /v1/events"),
    ] {
        let counted = m.stripe_requests(endpoint, Some(200), StripePhase::Reconcile);
        assert!(
            counted >= 2 && counted <= ledger.requests_to(route),
            "{endpoint}: counted {counted}, the fake saw {}",
            ledger.requests_to(route)
        );
        assert_eq!(
            m.stripe_requests(endpoint, Some(200), StripePhase::Outbox),
            0
        );
    }
    assert!(
        m.encode().contains(
            "pgpay_worker_stripe_requests_total{endpoint=\"GET /v1/checkout/sessions\",status=\"200\",phase=\"reconcile\"}"
        ),
        "exported with its labels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_finds_a_session_whose_expiry_event_was_lost() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = fake().await;
    let mut cfg = worker_config(&db, &fake);
    cfg.refresh_stuck_every = Some(Duration::from_millis(200));
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    // A hosted checkout the customer walked away from; no webhook reaches the database.
    let payment: String = client
        .query_one(
            "SELECT id::text FROM pay.begin_checkout('walked-away', 3300, 'usd', mode => 'session',
                                                     success_url => 'https://shop.example/thanks')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let session: String = client
        .query_one(
            "SELECT stripe_checkout_session_id FROM pay.wait_for_checkout($1::text::uuid, 10000)",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);
    fake.abandon_checkout(&session).await.unwrap();
    // Its expiry passed two hours ago with no checkout.session.expired: stuck.
    client
        .execute(
            "UPDATE pay.payments SET updated_at = now() - interval '3 hours',
                    checkout_expires_at = now() - interval '2 hours'
             WHERE id = $1::text::uuid",
            &[&payment],
        )
        .await
        .unwrap();
    assert!(
        wait_until(WAIT, || async {
            session_payment(&client, &payment).await.0 == "canceled"
        })
        .await,
        "the refresh read the session and applied its expiry"
    );
    let m = worker.metrics().clone();
    worker.shutdown();
    worker.wait().await.unwrap();
    let gets = fake.ledger().requests_to("GET /v1/checkout/sessions/:id");
    assert!(gets >= 1);
    assert_eq!(
        m.stripe_requests(
            "GET /v1/checkout/sessions/{id}",
            Some(200),
            StripePhase::Refresh
        ),
        gets
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.stuck_payments").await,
        0
    );
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn cli(db: &TestDb, fake: &StripeFake, args: &[&str]) -> Output {
    cli_logging(db, fake, args, "warn").await
}

async fn cli_logging(db: &TestDb, fake: &StripeFake, args: &[&str], log: &str) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpay-worker"))
        .args(args)
        .env("DATABASE_URL", db.database_url())
        .env("STRIPE_SECRET_KEY", FAKE_KEY)
        .env("STRIPE_API_BASE", fake.base_url())
        .env("PGPAY_WORKER_RATE_LIMIT", "0")
        .env("RUST_LOG", log)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reconcile_and_status_exit_codes() {
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
    let fake = fake().await;
    fake.seed(stripe_fake::SeedRequest::new(120)).unwrap();

    let out = cli(&db, &fake, &["status"]).await;
    assert_eq!(
        out.code,
        Some(0),
        "clean database: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("ok: nothing needs attention"),
        "{}",
        out.stdout
    );
    let out = cli(&db, &fake, &["status", "--json"]).await;
    assert_eq!(out.code, Some(0));
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["report"]["live_webhook_secrets"], 1);

    let out = cli(&db, &fake, &["reconcile", "--since", "48h", "--dry-run"]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("dry run"), "{}", out.stdout);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.reconciliation_runs").await,
        0
    );

    let out = cli_logging(&db, &fake, &["reconcile", "--since", "48h"], "info").await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("120 PaymentIntents"), "{}", out.stdout);
    // The summary and the log line say the same, in the same words.
    let counts = out
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_once("s: ")
        .unwrap()
        .1;
    assert!(
        out.stderr
            .contains(&format!("reconciliation finished: {counts}")),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stderr.contains('\x1b'),
        "no colour codes off a terminal"
    );
    assert!(out.stdout.contains("120 not ours"), "{}", out.stdout);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.reconciliation_runs").await,
        1
    );
    let out = cli(&db, &fake, &["status"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    // (#2: the dry run used up #1 of the identity sequence, which a rollback keeps.)
    assert!(
        out.stdout
            .contains("120 objects, 0 applied, 0 adopted, 120 not ours"),
        "{}",
        out.stdout
    );

    // Another replica holds the run lease: refused, exit 3.
    let other: i64 = client
        .query_one(
            "SELECT pay.start_reconciliation('other-replica', now() - interval '1 hour')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let out = cli(&db, &fake, &["reconcile", "--since", "48h"]).await;
    assert_eq!(out.code, Some(3), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("another reconciliation is running"),
        "{}",
        out.stderr
    );
    client
        .execute("SELECT pay.finish_reconciliation($1)", &[&other])
        .await
        .unwrap();

    // A finding and a dead command need a human.
    client
        .execute(
            "SELECT pay.record_reconciliation_finding(NULL, 'unknown_payment', NULL, 'pi_x', 'a', 'b')",
            &[],
        )
        .await
        .unwrap();
    checkout(&client, "dead", 100).await;
    client
        .execute(
            "SELECT pay.fail_outbox(c.id, c.attempts, 400, '{\"error\":{\"message\":\"no\"}}') FROM pay.claim_outbox('t', 1) c",
            &[],
        )
        .await
        .unwrap();
    let out = cli(&db, &fake, &["status"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("1 open reconciliation finding"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("1 dead outbox command"),
        "{}",
        out.stdout
    );

    // Bad settings: exit 2.
    let out = cli(
        &db,
        &fake,
        &["reconcile", "--since", "48h", "--rate-limit", "-1"],
    )
    .await;
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
}
