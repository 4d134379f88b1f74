//! Subscriptions end to end: the SQL API, the worker (outbox, webhook relay, reconciliation) and
//! stripe-fake's Billing driven by Stripe's test clocks. Sign-up through a subscription-mode
//! Checkout Session, renewals (one fails, then recovers), cancellation at period end, a change of
//! quantity, and a renewal whose webhooks are all lost, provisioned once by reconciliation.

mod common;

use std::time::Duration;

use common::{config, count, init_tracing, wait_for_count, WAIT};
use pgpay_tests::tokio_postgres::Client;
use pgpay_tests::{wait_until, TestDb};
use pgpay_worker::jobs::reconcile::{reconcile_with_config, ReconcileOptions, Started};
use pgpay_worker::{CancellationToken, WorkerHandle};
use serde_json::Value;
use stripe_fake::{Config as FakeConfig, DeliveryOptionsPatch, StripeFake};

const FAKE_KEY: &str = "sk_test_worker_subscriptions";
const WEBHOOK_SECRET: &str = "whsec_worker_subscriptions";
const DAY: i64 = 86_400;

/// A database, stripe-fake delivering to the worker's relay, the worker, a monthly price and a
/// test clock at the fake's now.
struct Setup {
    db: TestDb,
    client: Client,
    fake: StripeFake,
    worker: WorkerHandle,
    http: reqwest::Client,
    price: String,
    clock: String,
}

impl Setup {
    async fn start() -> Setup {
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
        let fake = StripeFake::start(FakeConfig {
            api_key: FAKE_KEY.into(),
            ..FakeConfig::default()
        })
        .await
        .expect("start stripe-fake");
        let mut cfg = config(&db, &fake.base_url());
        cfg.stripe.secret_key = FAKE_KEY.into();
        cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
        let worker = pgpay_worker::start(cfg, CancellationToken::new())
            .await
            .unwrap();
        fake.set_webhook(
            format!("http://{}/webhooks/stripe", worker.http_addr().unwrap()),
            WEBHOOK_SECRET,
        )
        .unwrap();
        let mut s = Setup {
            db,
            client,
            fake,
            worker,
            http: reqwest::Client::new(),
            price: String::new(),
            clock: String::new(),
        };
        s.price = s
            .post(
                "/v1/prices",
                &[
                    ("currency", "usd"),
                    ("unit_amount", "1500"),
                    ("recurring[interval]", "month"),
                    ("product_data[name]", "Pro seat"),
                ],
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let now = s.fake.now().to_string();
        s.clock = s
            .post("/v1/test_helpers/test_clocks", &[("frozen_time", &now)])
            .await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s
    }

    /// A request to the fake as the application's own Stripe calls would make it.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let answer = self
            .http
            .post(format!("{}{path}", self.fake.base_url()))
            .bearer_auth(FAKE_KEY)
            .form(form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{path}");
        serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap()
    }

    /// `pay.begin_subscription`, the worker's Checkout Session, and the customer paying it on
    /// the test clock. Returns (Stripe subscription id, customer id).
    async fn sign_up(&self, subscription_ref: &str, quantity: i32) -> (String, String) {
        self.client
            .execute(
                "SELECT pay.begin_subscription($1, $2, $3, success_url => 'https://app.example/welcome')",
                &[&subscription_ref, &self.price, &quantity],
            )
            .await
            .unwrap();
        let session: String = self
            .client
            .query_one(
                "SELECT stripe_checkout_session_id FROM pay.wait_for_subscription_checkout($1, 15000)",
                &[&subscription_ref],
            )
            .await
            .unwrap()
            .get(0);
        let paid = self
            .fake
            .pay_subscription_checkout(&session, "pm_card_visa", Some(&self.clock))
            .await
            .expect("the customer pays");
        let sub = paid["subscription"].as_str().unwrap().to_owned();
        let customer = paid["customer"].as_str().unwrap().to_owned();
        assert!(
            self.wait_status(subscription_ref, "active").await,
            "the sign-up's events made it active"
        );
        (sub, customer)
    }

    async fn status(&self, subscription_ref: &str) -> Option<String> {
        self.client
            .query_one(
                "SELECT status FROM pay.subscriptions WHERE subscription_ref = $1",
                &[&subscription_ref],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_status(&self, subscription_ref: &str, status: &str) -> bool {
        wait_until(WAIT, || async {
            self.status(subscription_ref).await.as_deref() == Some(status)
        })
        .await
    }

    async fn entitled(&self, subscription_ref: &str) -> bool {
        self.client
            .query_one(
                "SELECT entitled FROM pay.entitlements WHERE subscription_ref = $1",
                &[&subscription_ref],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn fulfillments(&self, subscription_ref: &str) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM pay.invoice_fulfillments WHERE subscription_ref = $1",
                &[&subscription_ref],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_fulfillments(&self, subscription_ref: &str, n: i64) -> bool {
        wait_until(WAIT, || async {
            self.fulfillments(subscription_ref).await == n
        })
        .await
    }

    async fn period_end(&self, sub: &str) -> i64 {
        let json = self.fake.subscription(sub).expect("the subscription");
        json["current_period_end"]
            .as_i64()
            .or_else(|| json["items"]["data"][0]["current_period_end"].as_i64())
            .expect("a period end")
    }

    async fn advance_to(&self, to: i64) {
        let path = format!("/v1/test_helpers/test_clocks/{}/advance", self.clock);
        self.post(&path, &[("frozen_time", &to.to_string())]).await;
    }

    async fn set_card(&self, customer: &str, pm: &str) {
        self.post(
            &format!("/v1/customers/{customer}"),
            &[("invoice_settings[default_payment_method]", pm)],
        )
        .await;
    }

    /// Every webhook the fake recorded has been answered 2xx (or dropped on purpose).
    async fn webhooks_settled(&self) {
        self.fake
            .wait_for_counts(WAIT, |l| {
                l.webhooks.ok + l.webhooks.dropped >= l.webhooks.queued
            })
            .await
            .expect("deliveries settled");
    }

    async fn stop(self) {
        self.worker.shutdown();
        self.worker.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_two_renewals_one_failing_then_recovering_and_cancel_at_period_end() {
    let s = Setup::start().await;
    let r = "acct-renewals";
    let (sub, customer) = s.sign_up(r, 1).await;
    assert!(
        s.wait_fulfillments(r, 1).await,
        "the sign-up invoice provisions once"
    );
    assert!(s.entitled(r).await);
    let stored: (Option<String>, Option<String>) = {
        let row = s
            .client
            .query_one(
                "SELECT stripe_subscription_id, stripe_customer_id FROM pay.subscriptions WHERE subscription_ref = $1",
                &[&r],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(stored, (Some(sub.clone()), Some(customer.clone())));

    // Renewal 1 pays.
    let end1 = s.period_end(&sub).await;
    s.advance_to(end1 + 2 * 3600).await;
    assert!(s.wait_fulfillments(r, 2).await, "renewal 1 provisions once");
    assert_eq!(s.status(r).await.as_deref(), Some("active"));

    // Renewal 2 fails: past_due, still entitled within the grace period, nothing provisioned.
    s.set_card(&customer, "pm_card_chargeCustomerFail").await;
    let end2 = s.period_end(&sub).await;
    assert!(end2 > end1);
    s.advance_to(end2 + 2 * 3600).await;
    assert!(s.wait_status(r, "past_due").await);
    s.webhooks_settled().await;
    assert_eq!(s.fulfillments(r).await, 2);
    assert!(s.entitled(r).await, "past_due within the grace period");

    // A good card: the next retry (3 days later) pays, active again, provisioned once.
    s.set_card(&customer, "pm_card_visa").await;
    s.advance_to(end2 + 3600 + 3 * DAY + 60).await;
    assert!(s.wait_status(r, "active").await);
    assert!(s.wait_fulfillments(r, 3).await);

    // Cancel at period end: entitled until then, canceled after.
    s.client
        .execute("SELECT pay.cancel_subscription($1)", &[&r])
        .await
        .unwrap();
    assert!(
        wait_until(WAIT, || async {
            s.fake.subscription(&sub).unwrap()["cancel_at_period_end"] == true
        })
        .await
    );
    assert!(
        wait_for_count(
            &s.client,
            "SELECT count(*) FROM pay.subscriptions WHERE cancel_at_period_end",
            1,
            WAIT
        )
        .await
    );
    // The same call again queues nothing.
    s.client
        .execute("SELECT pay.cancel_subscription($1)", &[&r])
        .await
        .unwrap();
    assert!(s.entitled(r).await);
    let end3 = s.period_end(&sub).await;
    s.advance_to(end3 + DAY).await;
    assert!(s.wait_status(r, "canceled").await);
    assert!(!s.entitled(r).await);
    s.webhooks_settled().await;

    let ledger = s.fake.ledger();
    assert_eq!(ledger.subscriptions.created, 1);
    assert_eq!(ledger.checkout_sessions.created, 1);
    assert_eq!(ledger.requests_to("POST /v1/subscriptions/:id"), 1);
    assert_eq!(ledger.invoices.by_status.get("paid"), Some(&3));
    assert_eq!(s.fulfillments(r).await, 3, "one per paid invoice");
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pay.invoices WHERE status = 'paid'"
        )
        .await,
        3
    );
    let timeline = count(
        &s.client,
        "SELECT count(*) FROM pay.subscription_timeline('acct-renewals')",
    )
    .await;
    assert!(timeline >= 5, "{timeline} timeline rows");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_quantity_reaches_stripe_once() {
    let s = Setup::start().await;
    let r = "acct-seats";
    let (sub, _) = s.sign_up(r, 1).await;
    for _ in 0..3 {
        s.client
            .execute("SELECT pay.change_subscription($1, $2, 4)", &[&r, &s.price])
            .await
            .unwrap();
    }
    assert!(
        wait_for_count(
            &s.client,
            "SELECT count(*) FROM pay.subscriptions WHERE quantity = 4",
            1,
            WAIT
        )
        .await,
        "the change came back (answer or webhook)"
    );
    assert_eq!(s.fake.subscription(&sub).unwrap()["quantity"], 4);
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'update_subscription'"
        )
        .await,
        1,
        "the same call again queued nothing"
    );
    s.webhooks_settled().await;
    let ledger = s.fake.ledger();
    assert_eq!(ledger.requests_to("POST /v1/subscriptions/:id"), 1);
    // The next renewal bills the new quantity.
    let end = s.period_end(&sub).await;
    s.advance_to(end + 2 * 3600).await;
    assert!(s.wait_fulfillments(r, 2).await);
    let amount: i64 = s
        .client
        .query_one(
            "SELECT amount_paid FROM pay.invoices WHERE subscription_ref = $1 AND billing_reason = 'subscription_cycle'",
            &[&r],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(amount, 4 * 1500);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_webhooks_are_all_lost_is_provisioned_once_by_reconciliation() {
    let s = Setup::start().await;
    let r = "acct-lost";
    let (sub, _) = s.sign_up(r, 2).await;
    assert!(s.wait_fulfillments(r, 1).await);
    s.webhooks_settled().await;
    // Every delivery of the renewal is lost.
    s.fake
        .update_webhook_options(DeliveryOptionsPatch {
            drop_probability: Some(1.0),
            ..DeliveryOptionsPatch::default()
        })
        .unwrap();
    let end = s.period_end(&sub).await;
    s.advance_to(end + 2 * 3600).await;
    s.webhooks_settled().await;
    assert!(s.fake.ledger().webhooks.dropped >= 4);
    assert_eq!(s.fulfillments(r).await, 1, "nothing arrived");

    let mut cfg = config(&s.db, &s.fake.base_url());
    cfg.stripe.secret_key = FAKE_KEY.into();
    let options = ReconcileOptions::new(Duration::from_secs(3600));
    for run in 0..2 {
        let started = reconcile_with_config(&cfg, &options, &CancellationToken::new(), &|_, _| {})
            .await
            .unwrap();
        let Started::Ran(report) = started else {
            panic!("reconciliation did not run");
        };
        assert!(report.counts.invoices >= 2, "{:?}", report.counts);
        assert!(
            report.counts.subscriptions >= 1,
            "listed through its test clock: {:?}",
            report.counts
        );
        assert_eq!(report.counts.missing_at_stripe, 0, "{:?}", report.counts);
        assert_eq!(
            s.fulfillments(r).await,
            2,
            "run {run}: provisioned exactly once"
        );
    }
    let paid = count(
        &s.client,
        "SELECT count(*) FROM pay.invoices WHERE status = 'paid'",
    )
    .await;
    assert_eq!(paid, 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_switches_to_the_new_api_shape_between_renewals() {
    let s = Setup::start().await;
    let r = "acct-basil";
    let (sub, _) = s.sign_up(r, 1).await;
    assert!(s.wait_fulfillments(r, 1).await);
    // The account's API version changes: events now name the invoice's subscription in
    // `parent.subscription_details` and carry periods on the subscription items.
    s.fake
        .set_api_version(stripe_fake::BASIL_API_VERSION)
        .unwrap();
    let end1 = s.period_end(&sub).await;
    s.advance_to(end1 + 2 * 3600).await;
    assert!(
        s.wait_fulfillments(r, 2).await,
        "a basil renewal provisions once"
    );
    let end2 = s.period_end(&sub).await;
    assert!(end2 > end1);
    assert!(
        wait_until(WAIT, || async {
            count(
                &s.client,
                &format!(
                    "SELECT count(*) FROM pay.subscriptions
                     WHERE subscription_ref = 'acct-basil' AND current_period_end = to_timestamp({end2})"
                ),
            )
            .await
                == 1
        })
        .await,
        "the period end was read from items.data[]"
    );
    let events = s.fake.events_emitted();
    let paid = events
        .iter()
        .rev()
        .find(|e| e["type"] == "invoice.paid")
        .unwrap();
    assert_eq!(paid["api_version"], stripe_fake::BASIL_API_VERSION);
    assert!(paid["data"]["object"].get("subscription").is_none());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_stripe_does_not_list_is_a_finding() {
    let s = Setup::start().await;
    let r = "acct-vanished";
    s.sign_up(r, 1).await;
    s.webhooks_settled().await;
    // Old enough for the listing to be complete about it, and gone at "Stripe".
    s.client
        .execute(
            "UPDATE pay.subscriptions SET created_at = now() - interval '10 minutes' WHERE subscription_ref = $1",
            &[&r],
        )
        .await
        .unwrap();
    s.fake.reset();
    let mut cfg = config(&s.db, &s.fake.base_url());
    cfg.stripe.secret_key = FAKE_KEY.into();
    let options = ReconcileOptions::new(Duration::from_secs(3600));
    let started = reconcile_with_config(&cfg, &options, &CancellationToken::new(), &|_, _| {})
        .await
        .unwrap();
    let Started::Ran(report) = started else {
        panic!("reconciliation did not run");
    };
    assert_eq!(report.counts.missing_at_stripe, 1, "{:?}", report.counts);
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pay.findings WHERE kind = 'missing_at_stripe'"
        )
        .await,
        1
    );
    s.stop().await;
}
