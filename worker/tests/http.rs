//! The worker's HTTP endpoint: `/healthz`, `/metrics` and the webhook relay into
//! `pay.ingest_webhook`, over real HTTP on 127.0.0.1.

mod common;

use common::*;
use pgpay_tests::{fixtures, TestDb};
use pgpay_worker::CancellationToken;
use serde_json::{json, Value};

const SECRET: &str = "whsec_worker_relay_test";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(payload: &str) -> String {
    pgpay_core::signature::sign_header(payload.as_bytes(), SECRET.as_bytes(), unix_now())
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> (u16, Value) {
    let mut req = http.post(url).body(body);
    if let Some(s) = signature {
        req = req.header("Stripe-Signature", s);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_relay_healthz_and_metrics() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", worker.http_addr().unwrap());
    let http = reqwest::Client::new();
    let hook = format!("{base}/webhooks/stripe");

    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);

    let payload = fixtures::event(
        "evt_relay_1",
        "payment_intent.created",
        unix_now(),
        fixtures::payment_intent(
            "pi_unknown",
            "00000000-0000-0000-0000-000000000000",
            100,
            "usd",
            "requires_payment_method",
        ),
    );

    // No secret configured yet: the database raises, the relay answers 500 so Stripe
    // delivers again later.
    let (status, body) = post(
        &http,
        &hook,
        payload.clone().into_bytes(),
        Some(&sign(&payload)),
    )
    .await;
    assert_eq!((status, &body["status"]), (500, &json!("error")));

    client
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    let signature = sign(&payload);
    let (status, body) = post(&http, &hook, payload.clone().into_bytes(), Some(&signature)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["event_id"], "evt_relay_1");
    // The PaymentIntent names no payment of this database: stored, not applied.
    assert_eq!(body["status"], "stored", "{body}");
    let (status, body) = post(&http, &hook, payload.clone().into_bytes(), Some(&signature)).await;
    assert_eq!((status, &body["status"]), (200, &json!("duplicate")));

    // The body is passed byte for byte: one changed byte breaks the signature.
    let tampered = payload.replacen("100", "101", 1);
    let (status, body) = post(&http, &hook, tampered.into_bytes(), Some(&signature)).await;
    assert_eq!((status, &body["status"]), (400, &json!("rejected")));
    let (status, body) = post(&http, &hook, payload.clone().into_bytes(), None).await;
    assert_eq!((status, &body["status"]), (400, &json!("rejected")));
    let (status, _) = post(&http, &hook, vec![0xff, 0xfe, b'{'], Some(&signature)).await;
    assert_eq!(status, 400);
    let (status, _) = post(&http, &hook, vec![b' '; 2 << 20], Some(&signature)).await;
    assert_eq!(status, 413);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events").await,
        1
    );

    // Metrics: the names the README documents, and a queue depth sampled from the database.
    checkout(&client, "metrics", 100).await;
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "pgpay_worker_webhooks_total{status=\"duplicate\"} 1",
        "pgpay_worker_webhooks_total{status=\"rejected\"} 3",
        "pgpay_worker_webhooks_total{status=\"error\"} 1",
        "pgpay_worker_queue_depth{status=\"pending\"}",
        "pgpay_worker_polls_total",
        "pgpay_worker_notifications_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains(API_KEY));
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_an_unreachable_database() {
    init_tracing();
    // A database that does not exist: the worker starts (it tolerates a database that is
    // not there yet) and says so on /healthz.
    let mut cfg = pgpay_worker::WorkerConfig::new(
        "postgres://postgres@127.0.0.1:5432/pgpay_no_such_database",
        "http://127.0.0.1:9",
        API_KEY,
    )
    .unwrap();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", worker.http_addr().unwrap());
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_needs_nothing_but_the_pay_worker_role() {
    init_tracing();
    let db = TestDb::create().await;
    let admin = db.connect().await;
    let role = format!("{}_worker", db.name());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT pay_worker TO {role}; \
             GRANT CONNECT ON DATABASE {db} TO {role};",
            db = db.name()
        ))
        .await
        .unwrap();
    admin
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    let stripe = ScriptedStripe::start(|_, n| {
        if n == 0 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.database = db.database_url_as(&role).parse().unwrap();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", worker.http_addr().unwrap());

    // Claim, retry, complete; a declined-style failure path is the same grant.
    let payment = checkout(&admin, "least-privilege", 100).await;
    let (id, _) = create_command(&admin, &payment).await;
    assert!(wait_for_status(&admin, id, "done", WAIT).await);
    // The relay and the metrics' queue depth.
    let payload = fixtures::event(
        "evt_role_1",
        "payment_intent.created",
        unix_now(),
        fixtures::payment_intent(
            "pi_other",
            "00000000-0000-0000-0000-000000000000",
            100,
            "usd",
            "requires_payment_method",
        ),
    );
    let http = reqwest::Client::new();
    let (status, _) = post(
        &http,
        &format!("{base}/webhooks/stripe"),
        payload.clone().into_bytes(),
        Some(&sign(&payload)),
    )
    .await;
    assert_eq!(status, 200);
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("pgpay_worker_queue_depth{status=\"pending\"} 0"),
        "{text}"
    );
    assert!(!text.contains("pgpay_worker_db_errors_total{"), "{text}");
    worker.shutdown();
    worker.wait().await.unwrap();
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}
