//! Shared pieces of the worker's integration tests: a fresh database with the extension
//! (the `pgpay-tests` harness), a scripted Stripe stand-in that records every request and
//! answers as a test tells it to, and helpers that wait on conditions with deadlines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
pub use pgpay_tests::count;
use pgpay_tests::tokio_postgres::Client;
use pgpay_tests::{wait_until, TestDb};
use pgpay_worker::{CancellationToken, WorkerConfig};
use serde_json::{json, Value};
use tokio::sync::Notify;

pub const API_KEY: &str = "sk_test_pgpay_worker_integration";
pub const WAIT: Duration = Duration::from_secs(20);

/// A request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub key: Option<String>,
    pub body: String,
    pub authorization: Option<String>,
    pub stripe_version: Option<String>,
    pub content_type: Option<String>,
    pub at: Instant,
}

/// What the stand-in answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// `None`: a PaymentIntent derived from the request (same key, same id).
    pub body: Option<String>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Never answer (until the server stops).
    pub hang: bool,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            status: 200,
            headers: vec![],
            body: None,
            delay: Duration::ZERO,
            hang: false,
        }
    }
    pub fn status(status: u16) -> Self {
        let body = json!({"error": {"type": "api_error", "message": format!("scripted {status}")}});
        Self {
            status,
            headers: vec![],
            body: Some(body.to_string()),
            delay: Duration::ZERO,
            hang: false,
        }
    }
    pub fn card_declined() -> Self {
        let body = json!({"error": {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}});
        Self {
            status: 402,
            headers: vec![],
            body: Some(body.to_string()),
            delay: Duration::ZERO,
            hang: false,
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::ok()
        }
    }
}

/// `script(request, n)` where `n` counts this key's requests from 0.
pub type Script = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

struct Inner {
    script: Mutex<Script>,
    requests: Mutex<Vec<Recorded>>,
    per_key: Mutex<HashMap<String, usize>>,
    in_flight: Mutex<HashMap<String, usize>>,
    max_concurrent_per_key: AtomicUsize,
    received: Notify,
    release: Notify,
}

/// A scripted Stripe stand-in on 127.0.0.1.
pub struct ScriptedStripe {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl ScriptedStripe {
    pub async fn start(script: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static) -> Self {
        let inner = Arc::new(Inner {
            script: Mutex::new(Arc::new(script)),
            requests: Mutex::new(Vec::new()),
            per_key: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            max_concurrent_per_key: AtomicUsize::new(0),
            received: Notify::new(),
            release: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        Self { addr, inner, stop }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_script(&self, script: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static) {
        *self.inner.script.lock().unwrap() = Arc::new(script);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().unwrap().clone()
    }

    pub fn requests_for(&self, key: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.inner.requests.lock().unwrap().len()
    }

    /// The most requests with one Idempotency-Key that were being served at the same time.
    pub fn max_concurrent_per_key(&self) -> usize {
        self.inner.max_concurrent_per_key.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.received.notified();
            if self.count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() >= n;
            }
        }
    }

    /// Lets every request that is held by `Reply::hang` answer (200, derived PaymentIntent).
    pub fn release_held(&self) {
        self.inner.release.notify_waiters();
    }
}

impl Drop for ScriptedStripe {
    fn drop(&mut self) {
        self.stop.cancel();
        self.inner.release.notify_waiters();
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let rec = Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        key: h("idempotency-key"),
        body: String::from_utf8_lossy(&body).into_owned(),
        authorization: h("authorization"),
        stripe_version: h("stripe-version"),
        content_type: h("content-type"),
        at: Instant::now(),
    };
    let key = rec
        .key
        .clone()
        .unwrap_or_else(|| format!("{} {}", rec.method, rec.path));
    let n = {
        let mut per_key = inner.per_key.lock().unwrap();
        let n = per_key.entry(key.clone()).or_insert(0);
        *n += 1;
        *n - 1
    };
    {
        let mut in_flight = inner.in_flight.lock().unwrap();
        let c = in_flight.entry(key.clone()).or_insert(0);
        *c += 1;
        inner.max_concurrent_per_key.fetch_max(*c, Ordering::SeqCst);
    }
    let script = inner.script.lock().unwrap().clone();
    let reply = script(&rec, n);
    inner.requests.lock().unwrap().push(rec.clone());
    inner.received.notify_waiters();

    let reply = if reply.hang {
        let released = inner.release.notified();
        released.await;
        Reply::ok()
    } else {
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        reply
    };
    let body = reply
        .body
        .clone()
        .unwrap_or_else(|| payment_intent_for(&rec).to_string());
    {
        let mut in_flight = inner.in_flight.lock().unwrap();
        if let Some(c) = in_flight.get_mut(&key) {
            *c -= 1;
        }
    }
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), body).into_response();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in &reply.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

/// The PaymentIntent Stripe would create for this request: same key, same id.
pub fn payment_intent_for(rec: &Recorded) -> Value {
    let params: HashMap<String, String> = serde_urlencoded::from_str(&rec.body).unwrap_or_default();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    rec.key.hash(&mut hasher);
    let id = format!("pi_{:016x}", hasher.finish());
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": params.get("amount").and_then(|a| a.parse::<i64>().ok()).unwrap_or(0),
        "amount_received": 0,
        "currency": params.get("currency").cloned().unwrap_or_else(|| "usd".into()),
        "status": "requires_payment_method",
        "client_secret": format!("{id}_secret_x"),
        "created": 1_700_000_000,
        "livemode": false,
        "metadata": {
            "pgpay_payment_id": params.get("metadata[pgpay_payment_id]"),
            "order_ref": params.get("metadata[order_ref]"),
        },
    })
}

/// A worker configuration for tests: fast polls and retries, no rate limit.
pub fn config(db: &TestDb, api_base: &str) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(&db.database_url(), api_base, API_KEY).unwrap();
    cfg.poll_interval = Duration::from_millis(200);
    cfg.rate_limit = 0.0;
    cfg.stripe.request_timeout = Duration::from_secs(2);
    cfg.stripe.connect_timeout = Duration::from_secs(1);
    cfg.lease = Duration::from_secs(10);
    cfg.shutdown_timeout = Duration::from_secs(5);
    cfg.retry.base = Duration::from_millis(20);
    cfg.retry.max = Duration::from_millis(100);
    cfg.retry.retry_after_cap = Duration::from_secs(5);
    cfg
}

/// Logs to the test's output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `pay.begin_checkout(order, amount, 'usd')` → payment id (text).
pub async fn checkout(client: &Client, order: &str, amount: i64) -> String {
    client
        .query_one(
            "SELECT id::text FROM pay.begin_checkout($1, $2, 'usd')",
            &[&order, &amount],
        )
        .await
        .unwrap()
        .get(0)
}

/// The create command's (id, idempotency key) for a payment (a PaymentIntent's or a Checkout
/// Session's: a payment has one of them).
pub async fn create_command(client: &Client, payment: &str) -> (i64, String) {
    let row = client
        .query_one(
            "SELECT id, idempotency_key FROM pay.outbox WHERE payment_id = $1::text::uuid \
             AND kind IN ('create_payment_intent', 'create_checkout_session')",
            &[&payment],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub status: String,
    pub attempts: i32,
    pub last_http_status: Option<i32>,
    pub last_error: Option<String>,
    pub lease_owner: Option<String>,
}

pub async fn outbox_row(client: &Client, id: i64) -> OutboxRow {
    let r = client
        .query_one(
            "SELECT status::text, attempts, last_http_status, last_error, lease_owner FROM pay.outbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    OutboxRow {
        status: r.get(0),
        attempts: r.get(1),
        last_http_status: r.get(2),
        last_error: r.get(3),
        lease_owner: r.get(4),
    }
}

pub async fn payment_status(client: &Client, payment: &str) -> (String, Option<String>) {
    let r = client
        .query_one(
            "SELECT status::text, stripe_payment_intent_id FROM pay.payments WHERE id = $1::text::uuid",
            &[&payment],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Waits until `sql` (a count) returns `want`.
pub async fn wait_for_count(client: &Client, sql: &str, want: i64, timeout: Duration) -> bool {
    wait_until(timeout, || async { count(client, sql).await == want }).await
}

/// Waits until the outbox row has `status`.
pub async fn wait_for_status(client: &Client, id: i64, status: &str, timeout: Duration) -> bool {
    wait_until(timeout, || async {
        outbox_row(client, id).await.status == status
    })
    .await
}

/// Waits until the worker's `/readyz` answers 200 (the startup checks passed and LISTEN is
/// up); panics with the last answer otherwise.
pub async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match http.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status().as_u16() == 200 => return,
            Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "the worker never became ready: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
