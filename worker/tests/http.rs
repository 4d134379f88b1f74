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

    wait_ready(&base).await;
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.unwrap(), "ready\n");
    let live = http.get(format!("{base}/livez")).send().await.unwrap();
    assert_eq!(live.status().as_u16(), 200);

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
    assert_eq!(body["reason"], "no_live_webhook_secret");

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
    // Every rejection names its reason (never a secret or the expected signature).
    let tampered = payload.replacen("100", "101", 1);
    let (status, body) = post(&http, &hook, tampered.into_bytes(), Some(&signature)).await;
    assert_eq!((status, &body["status"]), (400, &json!("rejected")));
    assert_eq!(body["reason"], "signature_mismatch", "{body}");
    assert!(!body.to_string().contains(SECRET), "{body}");
    let (status, body) = post(&http, &hook, payload.clone().into_bytes(), None).await;
    assert_eq!((status, &body["status"]), (400, &json!("rejected")));
    assert_eq!(body["reason"], "missing_header", "{body}");
    let (status, body) = post(&http, &hook, vec![0xff, 0xfe, b'{'], Some(&signature)).await;
    assert_eq!((status, &body["reason"]), (400, &json!("body_not_utf8")));
    // An oversized body is refused from its Content-Length, before it is read: only the headers
    // are sent (a client still writing 2 MiB may see the connection close under it instead).
    let answer = {
        use tokio::io::AsyncWriteExt;
        let address = hook
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let mut sock = tokio::net::TcpStream::connect(&address).await.unwrap();
        sock.write_all(
            format!(
                "POST /webhooks/stripe HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
                 Content-Length: {}\r\nStripe-Signature: {signature}\r\n\r\n",
                2 << 20
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        read_until_closed(&mut sock, std::time::Duration::from_secs(10)).await
    };
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"reason\":\"body_too_large\""), "{answer}");
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
        "pgpay_worker_webhooks_total{status=\"rejected\"} 4",
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
async fn livez_answers_and_readyz_reports_an_unreachable_database() {
    init_tracing();
    // A database that does not exist: the worker starts (it waits for a database that is
    // not there yet, retrying), is alive, and not ready.
    let port = std::env::var("PGPAY_TEST_PORT").unwrap_or_else(|_| "5432".into());
    let mut cfg = pgpay_worker::WorkerConfig::new(
        &format!("postgres://postgres@127.0.0.1:{port}/pgpay_no_such_database"),
        "http://127.0.0.1:9",
        API_KEY,
    )
    .unwrap();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", worker.http_addr().unwrap());
    let live = reqwest::get(format!("{base}/livez")).await.unwrap();
    assert_eq!(live.status().as_u16(), 200);
    for path in ["readyz", "healthz"] {
        let ready = reqwest::get(format!("{base}/{path}")).await.unwrap();
        assert_eq!(ready.status().as_u16(), 503);
        let text = ready.text().await.unwrap();
        assert!(
            text.contains("pgpay_no_such_database") && text.contains("does not exist"),
            "{text}"
        );
        assert!(text.contains("LISTEN connection not up"), "{text}");
    }
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
    wait_ready(&base).await;

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

/// Reads from `sock` until it closes or `limit` passes; returns what arrived.
async fn read_until_closed(sock: &mut tokio::net::TcpStream, limit: std::time::Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, sock.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_never_starve_readyz() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    init_tracing();
    let db = TestDb::create().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.http_limits.header_read_timeout = Duration::from_millis(800);
    cfg.http_limits.body_timeout = Duration::from_millis(800);
    cfg.http_limits.max_connections = 240;
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let addr = worker.http_addr().unwrap();
    let base = format!("http://{addr}");
    wait_ready(&base).await;

    // 200 idle connections, one that sends its headers a byte at a time and never ends
    // them, and one that announces a body it never sends.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut slow_headers = TcpStream::connect(addr).await.unwrap();
    slow_headers
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            if slow_headers.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        read_until_closed(&mut slow_headers, Duration::from_secs(5)).await
    });
    let mut slow_body = TcpStream::connect(addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nStripe-Signature: t=1,v1=00\r\n\r\n{",
        )
        .await
        .unwrap();

    // Meanwhile readiness and liveness answer, each well within a second.
    let http = reqwest::Client::new();
    for _ in 0..5 {
        for path in ["readyz", "livez", "healthz"] {
            let started = Instant::now();
            let r = http.get(format!("{base}/{path}")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{path}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{path}: {:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The slow body gets 408, the slow headers are cut off (408 or closed), the idle ones
    // are closed: none of them is held for longer than the timeouts.
    let answer = read_until_closed(&mut slow_body, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let answer = trickle.await.unwrap();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    let started = Instant::now();
    for sock in &mut idle[..5] {
        assert_eq!(read_until_closed(sock, Duration::from_secs(5)).await, "");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_clients_wait_for_a_slot() {
    use std::time::Duration;
    use tokio::net::TcpStream;

    init_tracing();
    let db = TestDb::create().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.http_limits.header_read_timeout = Duration::from_millis(1500);
    cfg.http_limits.max_connections = 4;
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let addr = worker.http_addr().unwrap();
    let base = format!("http://{addr}");
    wait_ready(&base).await;
    // Let the pooled client's keep-alive connection go.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Every slot is taken: a fifth client is not served until the idle ones time out.
    let http = reqwest::Client::new();
    let quick = tokio::time::timeout(
        Duration::from_millis(500),
        http.get(format!("{base}/livez")).send(),
    )
    .await;
    assert!(quick.is_err(), "served beyond the cap");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http.get(format!("{base}/livez")).send(),
    )
    .await
    .expect("served once the idle connections timed out")
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    drop(idle);
    worker.shutdown();
    worker.wait().await.unwrap();
}
