//! Webhook ingest throughput and latency: `pay.ingest_webhook` (verify, dedup, row lock, transition,
//! audit, fulfillment, in one call) next to two plain-SQL baselines that do the same writes in one
//! transaction without any verification or rule:
//! - "plain SQL, statements": what an application writes by hand — BEGIN, insert the event (dedup),
//!   lock the payment, update it, insert the audit row and the fulfillment, COMMIT;
//! - "plain SQL, one statement": the same writes as a single writable-CTE statement (the floor).
//!
//! Run: `scripts/bench-ingest` (installs a release build of the extension first).
//! 8 clients on one warm pool, realistic ~2.5 KB signed events, 90 % new and 10 % duplicate
//! deliveries; rounds alternate between the paths (in reverse every other round) so machine
//! noise hits all alike; medians.
//!
//! Two more runs of `pay.ingest_webhook` measure the safety net's costs in the same run, on the
//! same build (the database state picks the code path):
//! - "a breaker open": another event type's breaker is open for the round, so every event looks
//!   its own type up in pay.event_type_health — what each applied event cost before backends
//!   kept "no breaker is open" in memory;
//! - "no BRIN": the three BRIN indexes of pay.anomalies are dropped for the round.
//!
//! Besides events/s (wall clock, which other load on the machine moves by 10 % or more), each
//! round reports the CPU time the 8 server backends spent per delivery (/proc/<pid>/schedstat,
//! nanoseconds on the CPU): the cost of the code path itself, much less moved by other load.
//! `PGPAY_BENCH_ROUNDS` sets the rounds per path (default 5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpay_core::signature::sign_header;
use pgpay_tests::{fixtures, TestDb};
use serde_json::json;
use tokio_postgres::Client;

const CLIENTS: usize = 8;
const EVENTS_PER_ROUND: usize = 6_000;
const DEFAULT_ROUNDS: usize = 5;
const PATHS: [Path; 5] = [
    Path::Statements,
    Path::OneStatement,
    Path::Ingest,
    Path::IngestBreakerOpen,
    Path::IngestNoBrin,
];
/// The BRIN indexes of sql/11_safety.sql, dropped for the "no BRIN" rounds and made again.
const BRIN: [(&str, &str); 3] = [
    (
        "webhook_events_received_brin",
        "pay.webhook_events USING brin (received_at)",
    ),
    (
        "payments_created_brin",
        "pay.payments USING brin (created_at)",
    ),
    (
        "fulfillments_created_brin",
        "pay.fulfillments USING brin (created_at)",
    ),
];
const SECRET: &str = "whsec_bench_0123456789abcdef";

struct Delivery {
    payload: String,
    header: String,
    event_id: String,
    intent: String,
    status: &'static str,
    created: i64,
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Ingest,
    /// `pay.ingest_webhook` while another type's breaker is open.
    IngestBreakerOpen,
    /// `pay.ingest_webhook` without the BRIN indexes.
    IngestNoBrin,
    Statements,
    OneStatement,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Ingest => "pay.ingest_webhook",
            Path::IngestBreakerOpen => "ingest, a breaker open",
            Path::IngestNoBrin => "ingest, no BRIN",
            Path::Statements => "plain SQL, statements",
            Path::OneStatement => "plain SQL, one statement",
        }
    }

    /// Sets the database up for this path's round.
    async fn before(self, admin: &Client) {
        match self {
            Path::IngestBreakerOpen => admin
                .batch_execute(
                    "INSERT INTO pay.event_type_health (event_type, state, failures, opened_at)
                     VALUES ('bench.other_type', 'open', 5, now())",
                )
                .await
                .unwrap(),
            Path::IngestNoBrin => {
                for (name, _) in BRIN {
                    admin
                        .batch_execute(&format!("DROP INDEX pay.{name}"))
                        .await
                        .unwrap();
                }
            }
            _ => {}
        }
    }

    /// Puts the database back after this path's round.
    async fn after(self, admin: &Client) {
        match self {
            Path::IngestBreakerOpen => admin
                .batch_execute(
                    "DELETE FROM pay.event_type_health WHERE event_type = 'bench.other_type'",
                )
                .await
                .unwrap(),
            Path::IngestNoBrin => {
                for (name, on) in BRIN {
                    admin
                        .batch_execute(&format!("CREATE INDEX {name} ON {on}"))
                        .await
                        .unwrap();
                }
            }
            _ => {}
        }
    }
}

const INSERT_EVENT: &str =
    "INSERT INTO pay.webhook_events (event_id, type, payload, stripe_created, outcome)
    VALUES ($1, $2, $3, $4, 'applied') ON CONFLICT DO NOTHING RETURNING event_id";
const LOCK_PAYMENT: &str =
    "SELECT id, order_ref, status::text FROM pay.payments WHERE stripe_payment_intent_id = $1 FOR NO KEY UPDATE";
const UPDATE_PAYMENT: &str = "UPDATE pay.payments SET status = $2::text::pay.payment_status,
    status_evidence_at = $3, updated_at = now() WHERE id = $1";
const INSERT_AUDIT: &str =
    "INSERT INTO pay.audit_log (payment_id, from_status, to_status, cause, evidence_id)
    VALUES ($1, $2::text::pay.payment_status, $3::text::pay.payment_status, 'baseline', $4)";
const INSERT_FULFILLMENT: &str =
    "INSERT INTO pay.fulfillments (payment_id, order_ref) VALUES ($1, $2)";

const ONE_STATEMENT: &str = "
WITH ev AS (
    INSERT INTO pay.webhook_events (event_id, type, payload, stripe_created, outcome)
    VALUES ($1, $2, $3, $4, 'applied') ON CONFLICT DO NOTHING RETURNING event_id
), moved AS (
    UPDATE pay.payments p SET status = $5::text::pay.payment_status, status_evidence_at = $4, updated_at = now()
    FROM ev WHERE p.stripe_payment_intent_id = $6 RETURNING p.id, p.order_ref
), audit AS (
    INSERT INTO pay.audit_log (payment_id, from_status, to_status, cause, evidence_id)
    SELECT id, 'requires_payment_method', $5::text::pay.payment_status, 'baseline', $1 FROM moved RETURNING 1
), fulfilled AS (
    INSERT INTO pay.fulfillments (payment_id, order_ref)
    SELECT id, order_ref FROM moved WHERE $5 = 'succeeded' RETURNING 1
)
SELECT count(*) FROM ev";

/// Pads a PaymentIntent to the size of a real one (charges, payment method details, metadata).
fn realistic_intent(intent: &str, payment: &str, status: &str) -> serde_json::Value {
    let mut object = fixtures::payment_intent(intent, payment, 1999, "usd", status);
    object["metadata"]["order_ref"] = json!(format!("order-{intent}"));
    object["payment_method_types"] = json!(["card"]);
    object["description"] = json!("Annual plan, 1 seat, billed yearly");
    object["latest_charge"] = json!(format!("ch_{intent}"));
    object["payment_method"] = json!(format!("pm_{intent}"));
    object["charges"] = json!({"object": "list", "data": [{
        "id": format!("ch_{intent}"), "object": "charge", "amount": 1999, "captured": true,
        "billing_details": {"address": {"city": "Berlin", "country": "DE", "line1": "Unter den Linden 1", "postal_code": "10117"},
                            "email": "buyer@example.com", "name": "Jane Doe"},
        "outcome": {"network_status": "approved_by_network", "risk_level": "normal", "risk_score": 42, "seller_message": "Payment complete.", "type": "authorized"},
        "payment_method_details": {"card": {"brand": "visa", "checks": {"address_line1_check": "pass", "address_postal_code_check": "pass", "cvc_check": "pass"},
                                            "country": "US", "exp_month": 12, "exp_year": 2030, "fingerprint": "Xt5EWLLDS7FJjR1c", "funding": "credit",
                                            "last4": "4242", "network": "visa", "three_d_secure": null}, "type": "card"},
        "receipt_url": format!("https://pay.stripe.com/receipts/payment/{}", "CAcaFwoVYWNjdF8xTjJ5c2RJbEhxU0RUQ1RsKJ7w".repeat(3)),
    }]});
    object
}

fn deliveries(prefix: &str, intents: &[(String, String)], now: i64) -> Vec<Delivery> {
    let mut out = deliveries_for(prefix, intents, now);
    // One delivery in ten repeats an earlier one, as Stripe's retries do.
    let repeats: Vec<usize> = (0..EVENTS_PER_ROUND / 10).map(|k| k * 9).collect();
    for (k, &i) in repeats.iter().enumerate() {
        let d = &out[i];
        let copy = Delivery {
            payload: d.payload.clone(),
            header: d.header.clone(),
            event_id: d.event_id.clone(),
            intent: d.intent.clone(),
            status: d.status,
            created: d.created,
        };
        out.insert((i + 50 + k).min(out.len()), copy);
    }
    out.truncate(EVENTS_PER_ROUND);
    out
}

/// One signed event per payment: half succeed (and are fulfilled), half start processing.
fn deliveries_for(prefix: &str, intents: &[(String, String)], now: i64) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(intents.len());
    for (i, (intent, payment)) in intents.iter().enumerate() {
        let status = if i % 2 == 0 {
            "succeeded"
        } else {
            "processing"
        };
        let event_id = format!("evt_{prefix}_{i}");
        let payload = fixtures::event(
            &event_id,
            &format!("payment_intent.{status}"),
            now,
            realistic_intent(intent, payment, status),
        );
        let header = sign_header(payload.as_bytes(), SECRET.as_bytes(), now);
        out.push(Delivery {
            payload,
            header,
            event_id,
            intent: intent.clone(),
            status,
            created: now,
        });
    }
    out
}

async fn seed_payments(client: &Client, prefix: &str, count: usize) -> Vec<(String, String)> {
    client
        .query(
            "WITH o AS (INSERT INTO pay.orders (order_ref) SELECT $1 || '-' || g FROM generate_series(1, $2::int) g RETURNING order_ref)
             INSERT INTO pay.payments (order_ref, attempt, amount, currency, status, stripe_payment_intent_id,
                                       client_secret, params_fingerprint, status_evidence_at)
             SELECT order_ref, 1, 1999, 'usd', 'requires_payment_method', 'pi_' || replace(order_ref, '-', '_'),
                    'pi_' || replace(order_ref, '-', '_') || '_secret_bench', 'bench', 0 FROM o
             RETURNING stripe_payment_intent_id, id::text",
            &[&prefix, &(count as i32)],
        )
        .await
        .expect("seed payments")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Runs one round on the long-lived pool of connections (as an HTTP layer's pool would be), so
/// neither path pays backend start-up inside the measurement.
async fn run_round(pool: &[Arc<Client>], path: Path, work: Vec<Delivery>) -> (f64, Vec<Duration>) {
    let work = Arc::new(work);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for client in pool {
        let (work, next, client) = (work.clone(), next.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let ingest = client
                .prepare("SELECT status FROM pay.ingest_webhook($1, $2)")
                .await
                .unwrap();
            let one_statement = client.prepare(ONE_STATEMENT).await.unwrap();
            let insert_event = client.prepare(INSERT_EVENT).await.unwrap();
            let lock_payment = client.prepare(LOCK_PAYMENT).await.unwrap();
            let update_payment = client.prepare(UPDATE_PAYMENT).await.unwrap();
            let insert_audit = client.prepare(INSERT_AUDIT).await.unwrap();
            let insert_fulfillment = client.prepare(INSERT_FULFILLMENT).await.unwrap();
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(d) = work.get(i) else { break };
                let t = Instant::now();
                let kind = format!("payment_intent.{}", d.status);
                match path {
                    Path::Ingest | Path::IngestBreakerOpen | Path::IngestNoBrin => {
                        let row = client
                            .query_one(&ingest, &[&d.payload, &d.header])
                            .await
                            .unwrap();
                        let status: String = row.get(0);
                        assert!(status == "applied" || status == "duplicate", "{status}");
                    }
                    Path::OneStatement => {
                        client
                            .query_one(
                                &one_statement,
                                &[
                                    &d.event_id,
                                    &kind,
                                    &d.payload,
                                    &d.created,
                                    &d.status,
                                    &d.intent,
                                ],
                            )
                            .await
                            .unwrap();
                    }
                    Path::Statements => {
                        client.batch_execute("BEGIN").await.unwrap();
                        let inserted = client
                            .query_opt(&insert_event, &[&d.event_id, &kind, &d.payload, &d.created])
                            .await
                            .unwrap();
                        if inserted.is_some() {
                            let row = client.query_one(&lock_payment, &[&d.intent]).await.unwrap();
                            let (id, order_ref, from): (uuid::Uuid, String, String) =
                                (row.get(0), row.get(1), row.get(2));
                            client
                                .execute(&update_payment, &[&id, &d.status, &d.created])
                                .await
                                .unwrap();
                            client
                                .execute(&insert_audit, &[&id, &from, &d.status, &d.event_id])
                                .await
                                .unwrap();
                            if d.status == "succeeded" {
                                client
                                    .execute(&insert_fulfillment, &[&id, &order_ref])
                                    .await
                                    .unwrap();
                            }
                        }
                        client.batch_execute("COMMIT").await.unwrap();
                    }
                }
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = work.len() as f64 / started.elapsed().as_secs_f64();
    (rate, latencies)
}

/// Nanoseconds the backends `pids` have spent on a CPU so far (`/proc/<pid>/schedstat`, first
/// field); `None` where that is not readable (not Linux, or the server on another machine).
fn backends_cpu_ns(pids: &[i32]) -> Option<u64> {
    pids.iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let db = TestDb::create().await;
    let admin = db.connect().await;
    admin
        .execute("SELECT pay.add_webhook_secret($1, 'bench')", &[&SECRET])
        .await
        .unwrap();
    let now = pgpay_tests::stripe_sdk::unix_now();
    let rounds: usize = std::env::var("PGPAY_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(DEFAULT_ROUNDS);
    let mut pool = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..CLIENTS {
        let client = db.connect().await;
        pids.push(
            client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
        );
        pool.push(Arc::new(client));
    }
    // Warm both paths on every connection (plans, function caches, the extension's library).
    for (k, path) in PATHS.into_iter().enumerate() {
        let prefix = format!("warm{k}");
        let intents = seed_payments(&admin, &prefix, CLIENTS * 20).await;
        path.before(&admin).await;
        run_round(&pool, path, deliveries_for(&prefix, &intents, now)).await;
        path.after(&admin).await;
    }
    println!("ingest benchmark (cargo bench -p pgpay-tests --bench ingest): {CLIENTS} clients, {EVENTS_PER_ROUND} deliveries per round (10 % duplicates), {rounds} rounds per path, alternating");
    let mut results: Vec<(Path, f64, Duration, Duration, f64)> = Vec::new();
    for round in 0..rounds {
        // Odd rounds run the paths in reverse, so no path always comes first or last in a round
        // (the tables grow as a round goes on).
        let mut order: Vec<(usize, Path)> = PATHS.into_iter().enumerate().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (k, path) in order {
            let prefix = format!("r{round}p{k}");
            let intents = seed_payments(&admin, &prefix, EVENTS_PER_ROUND).await;
            let work = deliveries(&prefix, &intents, now);
            let size = work.iter().map(|d| d.payload.len()).sum::<usize>() / work.len();
            admin
                .batch_execute("VACUUM ANALYZE pay.payments")
                .await
                .unwrap();
            path.before(&admin).await;
            let deliveries = work.len() as f64;
            let cpu_before = backends_cpu_ns(&pids);
            let (rate, mut latencies) = run_round(&pool, path, work).await;
            let cpu_after = backends_cpu_ns(&pids);
            path.after(&admin).await;
            // µs of backend CPU per delivery (NaN where /proc cannot be read).
            let cpu = match (cpu_before, cpu_after) {
                (Some(b), Some(a)) => a.saturating_sub(b) as f64 / 1e3 / deliveries,
                _ => f64::NAN,
            };
            latencies.sort();
            let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
            let name = path.name();
            println!("round {round} {name:<25} {rate:>8.0} events/s  p50 {:>6.2} ms  p99 {:>6.2} ms  backend CPU {cpu:>6.1} µs/delivery  (avg payload {size} B)",
                p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
            results.push((path, rate, p50, p99, cpu));
        }
    }
    let summary = |want: Path| {
        let picked: Vec<_> = results.iter().filter(|r| r.0 == want).collect();
        (
            median(picked.iter().map(|r| r.1).collect()),
            median(picked.iter().map(|r| r.2.as_secs_f64() * 1e3).collect()),
            median(picked.iter().map(|r| r.3.as_secs_f64() * 1e3).collect()),
            median(picked.iter().map(|r| r.4).collect()),
        )
    };
    for path in PATHS {
        let (rate, p50, p99, cpu) = summary(path);
        println!(
            "median {:<25} {rate:>8.0} events/s  p50 {p50:.2} ms  p99 {p99:.2} ms  backend CPU {cpu:.1} µs/delivery",
            path.name()
        );
    }
    // Paired: each variant against the ingest round run just before it (same round), so a
    // machine that slows down over the run moves both sides of each ratio alike.
    let paired = |variant: Path, metric: fn(&(Path, f64, Duration, Duration, f64)) -> f64| {
        let of = |path: Path| -> Vec<f64> {
            results.iter().filter(|r| r.0 == path).map(metric).collect()
        };
        median(
            of(Path::Ingest)
                .iter()
                .zip(of(variant))
                .map(|(ingest, other)| ingest / other)
                .collect(),
        )
    };
    for (variant, what) in [
        (
            Path::IngestBreakerOpen,
            "with a breaker open (a lookup per event)",
        ),
        (Path::IngestNoBrin, "without the BRIN indexes"),
    ] {
        println!(
            "paired median, ingest / ingest {what}: events/s {:.3}, backend CPU per delivery {:.3}",
            paired(variant, |r| r.1),
            paired(variant, |r| r.4),
        );
    }
    let ingest = summary(Path::Ingest).0;
    println!(
        "ratio ingest / plain SQL, statements: {:.2} (target >= 0.80)",
        ingest / summary(Path::Statements).0
    );
    println!(
        "ratio ingest / plain SQL, one statement: {:.2}",
        ingest / summary(Path::OneStatement).0
    );
    let breaker_open = summary(Path::IngestBreakerOpen).0;
    println!(
        "ratio ingest with a breaker open (a lookup per event) / plain SQL, statements: {:.2}",
        breaker_open / summary(Path::Statements).0
    );
    println!(
        "ratio ingest / ingest with a breaker open: {:.3} (the lookup the per-backend copy saves)",
        ingest / breaker_open
    );
    println!(
        "ratio ingest / ingest without the BRIN indexes: {:.3}",
        ingest / summary(Path::IngestNoBrin).0
    );
    let sends: i64 = admin
        .query_one("SELECT count(*) FROM pay.outbox", &[])
        .await
        .unwrap()
        .get(0);
    println!("outbox commands written by ingest (no NOTIFY on this path): {sends}");
}
