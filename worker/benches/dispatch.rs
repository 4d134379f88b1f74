//! Outbox dispatch: commit→request latency on an idle system, and commands/s with one and with
//! two in-process workers, against stripe-fake (in-process, no injected latency) and the local
//! PostgreSQL with the extension installed. Everything on 127.0.0.1.
//!
//! Run: `cargo bench -p pgpay-worker --bench dispatch` (release profile). Install a release build
//! of the extension first (`scripts/install-extension --release`) for numbers worth comparing.
//!
//! 1. Latency: one checkout at a time (`SELECT pay.begin_checkout(...)`, autocommit), measured from
//!    the commit returning to the create request reaching Stripe. The worker talks to stripe-fake
//!    through a tiny forwarding proxy in this process that stamps `Instant::now()` when a request
//!    arrives (the fake keeps no per-request clock); the answer is stripe-fake's own. Each sample
//!    starts on an idle system (the previous command is `done`, plus a random 2–8 ms pause). With
//!    LISTEN (the normal path), then poll-only (what a lost doorbell costs) at the default poll
//!    interval, with pauses spread over the poll period so commits do not phase-lock with ticks.
//! 2. Throughput: N checkouts committed in one transaction while the workers are idle and
//!    listening; timed from the commit returning until every command is `done` in `pay.outbox`.
//!    One worker and two workers (same database), alternating, a fresh database and fake per run,
//!    medians over the rounds. Each run checks exactly-once at the fake: N PaymentIntents, one per
//!    order.
//!
//! Environment: `PGPAY_BENCH_LATENCY_SAMPLES` (300), `PGPAY_BENCH_POLL_SAMPLES` (20, 0 skips),
//! `PGPAY_BENCH_COMMANDS` (5000), `PGPAY_BENCH_ROUNDS` (3), and the worker tunables
//! `PGPAY_BENCH_CONCURRENCY`, `PGPAY_BENCH_BATCH_SIZE`, `PGPAY_BENCH_DB_POOL_SIZE` (the worker's
//! defaults when unset) to try settings without touching the worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pgpay_tests::tokio_postgres::Client;
use pgpay_tests::{count, TestDb};
use pgpay_worker::{CancellationToken, Outcome, WorkerConfig, WorkerHandle};
use stripe_fake::StripeFake;
use tokio::sync::mpsc;

const API_KEY: &str = "sk_test_pgpay_dispatch_bench";
const CREATE_ROUTE: &str = "POST /v1/payment_intents";
const TARGET_P99_MS: f64 = 10.0;
const TARGET_RATE: f64 = 1_000.0;

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
        Err(_) => default,
    }
}

fn env_opt(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// The stamping proxy.

struct Proxy {
    upstream: String,
    client: reqwest::Client,
    creates: mpsc::UnboundedSender<Instant>,
}

/// Forwards everything to stripe-fake; reports when each create request arrived.
async fn start_proxy(
    upstream: String,
    stop: CancellationToken,
) -> (String, mpsc::UnboundedReceiver<Instant>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let proxy = Arc::new(Proxy {
        upstream,
        client: reqwest::Client::builder().build().unwrap(),
        creates: tx,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    (format!("http://{addr}"), rx)
}

async fn forward(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    // Stamped as soon as hyper hands over the parsed request head.
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    if parts.method == axum::http::Method::POST && parts.uri.path() == "/v1/payment_intents" {
        let _ = proxy.creates.send(arrived);
    }
    let body = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut out = proxy
        .client
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body.to_vec());
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = match out.send().await {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
    let headers: Vec<(String, Vec<u8>)> = answer
        .headers()
        .iter()
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                "content-length" | "connection" | "transfer-encoding"
            )
        })
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let bytes = answer.bytes().await.unwrap_or_default();
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    for (n, v) in headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Workers.

#[derive(Clone, Copy)]
struct Tunables {
    concurrency: usize,
    batch_size: u32,
    db_pool_size: usize,
    poll_interval: Duration,
}

impl Tunables {
    fn from_env() -> Self {
        let defaults = WorkerConfig::new("postgres://x@127.0.0.1/x", "http://127.0.0.1:1", "sk_x")
            .expect("default config");
        Tunables {
            concurrency: env_opt("PGPAY_BENCH_CONCURRENCY").unwrap_or(defaults.concurrency),
            batch_size: env_opt("PGPAY_BENCH_BATCH_SIZE")
                .map(|b| b as u32)
                .unwrap_or(defaults.batch_size),
            db_pool_size: env_opt("PGPAY_BENCH_DB_POOL_SIZE").unwrap_or(defaults.db_pool_size),
            poll_interval: defaults.poll_interval,
        }
    }
}

async fn start_worker(
    db: &TestDb,
    api_base: &str,
    t: Tunables,
    listen: bool,
    name: &str,
) -> WorkerHandle {
    let mut cfg = WorkerConfig::new(&db.database_url(), api_base, API_KEY).unwrap();
    cfg.rate_limit = 0.0;
    cfg.concurrency = t.concurrency;
    cfg.batch_size = t.batch_size;
    cfg.db_pool_size = t.db_pool_size;
    cfg.poll_interval = t.poll_interval;
    cfg.listen_for_notifications = listen;
    cfg.worker_id = format!("bench-{name}-{}", fastrand::u32(..));
    let handle = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .expect("start worker");
    if listen {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !handle.metrics().listener_is_connected() {
            assert!(Instant::now() < deadline, "worker never started listening");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Let the first poll (immediate) and pool warm-up pass.
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle
}

async fn stop_worker(w: WorkerHandle) {
    w.shutdown();
    w.wait().await.expect("worker stops cleanly");
}

// ---------------------------------------------------------------------------------------------
// 1. Latency.

struct LatencyResult {
    request: Vec<Duration>,
    recorded: Vec<Duration>,
}

/// `samples` sequential checkouts; for each, commit → create request at the proxy and
/// commit → outbox row `done` (polled every 0.5 ms, so ±0.5 ms plus a query).
async fn latency_run(
    client: &Client,
    creates: &mut mpsc::UnboundedReceiver<Instant>,
    label: &str,
    samples: usize,
    pause: (Duration, Duration),
    timeout: Duration,
) -> LatencyResult {
    let begin = client
        .prepare("SELECT id::text FROM pay.begin_checkout($1, $2, 'usd')")
        .await
        .unwrap();
    let status = client
        .prepare("SELECT status FROM pay.outbox WHERE payment_id = $1::text::uuid AND kind = 'create_payment_intent'")
        .await
        .unwrap();
    let mut result = LatencyResult {
        request: Vec::with_capacity(samples),
        recorded: Vec::with_capacity(samples),
    };
    let mut early = 0usize;
    for i in 0..samples {
        let (lo, hi) = (pause.0.as_micros() as u64, pause.1.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(fastrand::u64(lo..hi))).await;
        while creates.try_recv().is_ok() {}
        let order = format!("lat-{label}-{i}");
        let amount = 1_000 + i as i64;
        let row = client.query_one(&begin, &[&order, &amount]).await.unwrap();
        let committed = Instant::now();
        let payment: String = row.get(0);
        let arrived = tokio::time::timeout(timeout, creates.recv())
            .await
            .unwrap_or_else(|_| panic!("{label}: no create request within {timeout:?}"))
            .expect("proxy running");
        match arrived.checked_duration_since(committed) {
            Some(d) => result.request.push(d),
            None => {
                // The doorbell beat our own CommandComplete: count it as zero.
                early += 1;
                result.request.push(Duration::ZERO);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let s: String = client.query_one(&status, &[&payment]).await.unwrap().get(0);
            if s == "done" {
                result.recorded.push(committed.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: command not done (status {s})"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    if early > 0 {
        println!("  ({label}: {early} create requests arrived before the commit call returned; counted as 0 ms)");
    }
    result.request.sort();
    result.recorded.sort();
    result
}

fn print_latency(label: &str, r: &LatencyResult) -> (f64, f64) {
    let (p50, p99) = (
        ms(percentile(&r.request, 0.50)),
        ms(percentile(&r.request, 0.99)),
    );
    println!(
        "  {label:<28} n={:<4} commit→request  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  max {:>7.2} ms   \
         commit→done p50 {:>7.2} ms  p99 {:>7.2} ms",
        r.request.len(),
        ms(*r.request.last().unwrap()),
        ms(percentile(&r.recorded, 0.50)),
        ms(percentile(&r.recorded, 0.99)),
    );
    (p50, p99)
}

// ---------------------------------------------------------------------------------------------
// 2. Throughput.

struct Run {
    workers: usize,
    rate: f64,
    elapsed: Duration,
    requests_done: Duration,
    enqueue: Duration,
    per_worker: Vec<u64>,
    claimed: u64,
    polls: u64,
    notifications: u64,
}

async fn throughput_run(n: usize, workers: usize, t: Tunables, round: usize) -> Run {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let fake = StripeFake::start(stripe_fake::Config {
        api_key: API_KEY.into(),
        ..stripe_fake::Config::default()
    })
    .await
    .expect("start stripe-fake");
    let mut handles = Vec::new();
    for w in 0..workers {
        handles.push(start_worker(&db, &fake.base_url(), t, true, &format!("tp{w}")).await);
    }
    let prefix = format!("tp{round}w{workers}");
    let enqueue_started = Instant::now();
    let enqueued = client
        .query_one(
            "SELECT count(*) FROM generate_series(1, $1::int) g, \
             LATERAL pay.begin_checkout($2 || '-' || g, 100 + g, 'usd')",
            &[&(n as i32), &prefix],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let committed = Instant::now();
    assert_eq!(enqueued as usize, n);
    let enqueue = committed - enqueue_started;

    fake.wait_for_counts(Duration::from_secs(300), |l| {
        l.payment_intents.created >= n as u64
    })
    .await
    .expect("every create reached stripe-fake");
    let requests_done = committed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status <> 'done'",
        )
        .await;
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} commands never finished");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = committed.elapsed();

    let per_worker: Vec<u64> = handles
        .iter()
        .map(|h| {
            h.metrics()
                .commands("create_payment_intent", Outcome::Completed)
        })
        .collect();
    let claimed = handles.iter().map(|h| h.metrics().claimed()).sum();
    let polls = handles.iter().map(|h| h.metrics().polls()).sum();
    let notifications = handles.iter().map(|h| h.metrics().notifications()).sum();
    for h in handles {
        stop_worker(h).await;
    }

    // Exactly once under load: N orders, N PaymentIntents, one each, and the database agrees.
    let ledger = fake.ledger();
    assert_eq!(
        ledger.payment_intents.created, n as u64,
        "PaymentIntents at the fake"
    );
    let mut per_order: BTreeMap<&str, u32> = BTreeMap::new();
    for pi in &ledger.payment_intents.list {
        let order = pi
            .metadata
            .get("order_ref")
            .map(String::as_str)
            .unwrap_or("");
        *per_order.entry(order).or_default() += 1;
    }
    assert_eq!(per_order.len(), n, "distinct orders at the fake");
    assert!(
        per_order.values().all(|&c| c == 1),
        "an order has more than one PaymentIntent"
    );
    let linked = count(
        &client,
        "SELECT count(DISTINCT stripe_payment_intent_id) FROM pay.payments \
         WHERE stripe_payment_intent_id IS NOT NULL",
    )
    .await;
    assert_eq!(linked as usize, n, "payments linked to a PaymentIntent");
    let extra_attempts = count(
        &client,
        "SELECT coalesce(sum(attempts), 0)::bigint - count(*) FROM pay.outbox",
    )
    .await;
    assert_eq!(
        ledger.requests_to(CREATE_ROUTE) as i64,
        n as i64 + extra_attempts,
        "create requests = commands + retries"
    );
    if extra_attempts > 0 {
        println!(
            "  ({extra_attempts} retried attempts; {} idempotent replays at the fake)",
            ledger.idempotency.replays
        );
    }
    fake.shutdown().await;
    drop(client);
    drop(db);

    Run {
        workers,
        rate: n as f64 / elapsed.as_secs_f64(),
        elapsed,
        requests_done,
        enqueue,
        per_worker,
        claimed,
        polls,
        notifications,
    }
}

// ---------------------------------------------------------------------------------------------

/// Which build of the extension the server loads: compares the installed library with the
/// workspace's build outputs (best effort; "unknown" when neither matches).
async fn installed_build(client: &Client) -> String {
    let libdir: Option<String> = client
        .query_opt(
            "SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0));
    let Some(libdir) = libdir else {
        return "unknown (cannot read pg_config)".into();
    };
    let Ok(installed) = std::fs::read(format!("{libdir}/pgpay.so")) else {
        return format!("unknown (cannot read {libdir}/pgpay.so)");
    };
    let target = std::env::var("PGPAY_EXTENSION_TARGET_DIR")
        .or_else(|_| std::env::var("CARGO_TARGET_DIR"))
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_owned());
    for profile in ["release", "debug"] {
        if std::fs::read(format!("{target}/{profile}/libpgpay.so")).ok() == Some(installed.clone())
        {
            return format!("{profile} (identical to target/{profile}/libpgpay.so)");
        }
    }
    // Built elsewhere: a debug build carries debug info (tens of MB), a release build does not.
    let mb = installed.len() as f64 / 1e6;
    let guess = if mb > 10.0 { "debug" } else { "release" };
    format!("probably {guess} ({mb:.1} MB; matches neither {target}/release nor /debug)")
}

#[tokio::main]
async fn main() {
    let latency_samples = env_usize("PGPAY_BENCH_LATENCY_SAMPLES", 300);
    let poll_samples = env_usize("PGPAY_BENCH_POLL_SAMPLES", 20);
    let n = env_usize("PGPAY_BENCH_COMMANDS", 5_000);
    let rounds = env_usize("PGPAY_BENCH_ROUNDS", 3);
    let tunables = Tunables::from_env();
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());

    println!("command: cargo bench -p pgpay-worker --bench dispatch");
    println!(
        "setup: stripe-fake in-process (no injected latency), worker(s) in-process, rate limit 0 (lifted), \
         {cores} cores, tokio multi-thread runtime shared by bench, fake and workers"
    );
    println!(
        "worker settings: concurrency {}, batch size {}, db pool {}, poll interval {:?}",
        tunables.concurrency, tunables.batch_size, tunables.db_pool_size, tunables.poll_interval
    );

    // 1. Latency.
    let db = TestDb::create().await;
    let client = db.connect().await;
    println!(
        "extension build loaded by PostgreSQL: {}",
        installed_build(&client).await
    );
    let server_version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    println!("PostgreSQL {server_version}");
    let fake = StripeFake::start(stripe_fake::Config {
        api_key: API_KEY.into(),
        ..stripe_fake::Config::default()
    })
    .await
    .expect("start stripe-fake");
    let stop_proxy = CancellationToken::new();
    let (proxy_url, mut creates) = start_proxy(fake.base_url(), stop_proxy.clone()).await;

    println!();
    println!(
        "1. commit→request latency, idle system, one checkout at a time (stamped by a forwarding proxy in front of stripe-fake)"
    );
    let worker = start_worker(&db, &proxy_url, tunables, true, "lat").await;
    let idle = (Duration::from_millis(2), Duration::from_millis(8));
    latency_run(
        &client,
        &mut creates,
        "warm",
        20,
        idle,
        Duration::from_secs(10),
    )
    .await;
    let listen = latency_run(
        &client,
        &mut creates,
        "listen",
        latency_samples,
        idle,
        Duration::from_secs(10),
    )
    .await;
    let (_, listen_p99) = print_latency("LISTEN/NOTIFY (normal path)", &listen);
    stop_worker(worker).await;
    if poll_samples > 0 {
        let worker = start_worker(&db, &proxy_url, tunables, false, "poll").await;
        let poll = latency_run(
            &client,
            &mut creates,
            "poll",
            poll_samples,
            // Spread the commits over the poll period, or they phase-lock with the ticks.
            (Duration::from_millis(2), tunables.poll_interval),
            tunables.poll_interval * 3 + Duration::from_secs(5),
        )
        .await;
        print_latency(
            &format!("poll only ({:?} interval)", tunables.poll_interval),
            &poll,
        );
        stop_worker(worker).await;
    }
    stop_proxy.cancel();
    fake.shutdown().await;
    drop(client);
    drop(db);

    // 2. Throughput.
    println!();
    println!(
        "2. throughput: {n} checkouts committed in one transaction, timed from commit to all {n} outbox commands done; \
         {rounds} rounds, 1 and 2 workers alternating, fresh database and fake per run"
    );
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [1, 2] } else { [2, 1] };
        for workers in order {
            let run = throughput_run(n, workers, tunables, round).await;
            println!(
                "  round {round} {workers} worker{}: {:>6.0} commands/s  ({:.2} s to all done, last request at {:.2} s; \
                 enqueue {:.2} s; claimed {} in {} polls + {} doorbells; per worker {:?}) exactly-once ok",
                if workers == 1 { " " } else { "s" },
                run.rate,
                run.elapsed.as_secs_f64(),
                run.requests_done.as_secs_f64(),
                run.enqueue.as_secs_f64(),
                run.claimed,
                run.polls,
                run.notifications,
                run.per_worker,
            );
            runs.push(run);
        }
    }
    let rate_of = |w: usize| {
        median(
            runs.iter()
                .filter(|r| r.workers == w)
                .map(|r| r.rate)
                .collect(),
        )
    };
    let (one, two) = (rate_of(1), rate_of(2));

    println!();
    println!("summary (cargo bench -p pgpay-worker --bench dispatch)");
    println!(
        "  commit→request latency (LISTEN): p50 {:.2} ms, p99 {listen_p99:.2} ms  (target p99 <= {TARGET_P99_MS} ms: {})",
        ms(percentile(&listen.request, 0.50)),
        if listen_p99 <= TARGET_P99_MS { "met" } else { "MISSED" }
    );
    println!(
        "  throughput, median of {rounds}: 1 worker {one:.0} commands/s, 2 workers {two:.0} commands/s, \
         ratio 2/1 {:.2}  (target >= {TARGET_RATE:.0}/s: 1 worker {}, 2 workers {})",
        two / one,
        if one >= TARGET_RATE { "met" } else { "MISSED" },
        if two >= TARGET_RATE { "met" } else { "MISSED" },
    );
    println!(
        "  exactly-once: every run had {n} PaymentIntents at the fake for {n} orders, one each"
    );
}
