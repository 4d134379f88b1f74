//! Webhook ingest throughput and latency: `pay.ingest_webhook` (verify, dedup, row lock, transition,
//! audit, fulfillment, in one call) next to a plain-SQL baseline doing the same writes in one
//! statement without verification, measured side by side in one run.
//!
//! Run: `scripts/bench-ingest` (installs a release build of the extension first).
//! 8 clients, realistic ~2.5 KB signed events, 90 % new and 10 % duplicate deliveries; rounds
//! alternate between the two so machine noise hits both alike; medians over the rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpay_core::signature::sign_header;
use pgpay_tests::{fixtures, TestDb};
use serde_json::json;
use tokio_postgres::Client;

const CLIENTS: usize = 8;
const EVENTS_PER_ROUND: usize = 8_000;
const ROUNDS: usize = 3;
const SECRET: &str = "whsec_bench_0123456789abcdef";

struct Delivery {
    payload: String,
    header: String,
    event_id: String,
    intent: String,
    status: &'static str,
    created: i64,
}

#[derive(Clone, Copy)]
enum Path {
    Ingest,
    Baseline,
}

const BASELINE: &str = "
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
             INSERT INTO pay.payments (order_ref, attempt, amount, currency, status, stripe_payment_intent_id, params_fingerprint, status_evidence_at)
             SELECT order_ref, 1, 1999, 'usd', 'requires_payment_method', 'pi_' || replace(order_ref, '-', '_'), 'bench', 0 FROM o
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
            let statement = match path {
                Path::Ingest => client
                    .prepare("SELECT status FROM pay.ingest_webhook($1, $2)")
                    .await
                    .unwrap(),
                Path::Baseline => client.prepare(BASELINE).await.unwrap(),
            };
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(d) = work.get(i) else { break };
                let t = Instant::now();
                match path {
                    Path::Ingest => {
                        let row = client
                            .query_one(&statement, &[&d.payload, &d.header])
                            .await
                            .unwrap();
                        let status: String = row.get(0);
                        assert!(status == "applied" || status == "duplicate", "{status}");
                    }
                    Path::Baseline => {
                        let kind = format!("payment_intent.{}", d.status);
                        client
                            .query_one(
                                &statement,
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
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
    let mut pool = Vec::new();
    for _ in 0..CLIENTS {
        pool.push(Arc::new(db.connect().await));
    }
    // Warm both paths on every connection (plans, function caches, the extension's library).
    let warm_intents = seed_payments(&admin, "warm", CLIENTS * 20).await;
    let warm = deliveries_for("warm", &warm_intents, now);
    let (_, _) = run_round(&pool, Path::Ingest, warm).await;
    let warm_intents = seed_payments(&admin, "warmb", CLIENTS * 20).await;
    let warm = deliveries_for("warmb", &warm_intents, now);
    let (_, _) = run_round(&pool, Path::Baseline, warm).await;
    println!("ingest benchmark: {CLIENTS} clients, {EVENTS_PER_ROUND} deliveries per round (10 % duplicates), {ROUNDS} rounds each, alternating");
    let mut results: Vec<(Path, f64, Duration, Duration)> = Vec::new();
    for round in 0..ROUNDS {
        for path in [Path::Baseline, Path::Ingest] {
            let prefix = format!(
                "{}{round}",
                if matches!(path, Path::Ingest) {
                    "i"
                } else {
                    "b"
                }
            );
            let intents = seed_payments(&admin, &prefix, EVENTS_PER_ROUND).await;
            let work = deliveries(&prefix, &intents, now);
            let size = work.iter().map(|d| d.payload.len()).sum::<usize>() / work.len();
            admin
                .batch_execute("VACUUM ANALYZE pay.payments")
                .await
                .unwrap();
            let (rate, mut latencies) = run_round(&pool, path, work).await;
            latencies.sort();
            let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
            let name = if matches!(path, Path::Ingest) {
                "pay.ingest_webhook"
            } else {
                "plain-SQL baseline"
            };
            println!("round {round} {name:<20} {rate:>8.0} events/s  p50 {:>6.2} ms  p99 {:>6.2} ms  (avg payload {size} B)",
                p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
            results.push((path, rate, p50, p99));
        }
    }
    let summary = |want: fn(&Path) -> bool| {
        let picked: Vec<_> = results.iter().filter(|r| want(&r.0)).collect();
        (
            median(picked.iter().map(|r| r.1).collect()),
            median(picked.iter().map(|r| r.2.as_secs_f64() * 1e3).collect()),
            median(picked.iter().map(|r| r.3.as_secs_f64() * 1e3).collect()),
        )
    };
    let (base_rate, base_p50, base_p99) = summary(|p| matches!(p, Path::Baseline));
    let (rate, p50, p99) = summary(|p| matches!(p, Path::Ingest));
    println!("median plain-SQL baseline: {base_rate:.0} events/s, p50 {base_p50:.2} ms, p99 {base_p99:.2} ms");
    println!("median pay.ingest_webhook: {rate:.0} events/s, p50 {p50:.2} ms, p99 {p99:.2} ms");
    println!(
        "ratio ingest/baseline: {:.2} (target >= 0.80); ingest p99 {p99:.2} ms (target < 5 ms)",
        rate / base_rate
    );
    let sends: i64 = admin
        .query_one("SELECT count(*) FROM pay.outbox", &[])
        .await
        .unwrap()
        .get(0);
    println!("outbox commands written by ingest (no NOTIFY on this path): {sends}");
}
