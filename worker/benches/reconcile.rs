//! How long `pgpay-worker reconcile --since 48h` takes over 100,000 PaymentIntents at
//! stripe-fake (rate limit lifted), against a database holding their payments.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-helpers cargo bench -p pgpay-worker --bench reconcile
//! PGPAY_BENCH_OBJECTS=20000 PGPAY_BENCH_ROUNDS=1 cargo bench -p pgpay-worker --bench reconcile
//! ```
//!
//! Each round gets a fresh database: the fake is seeded (70 % succeeded, 20 % awaiting payment,
//! 10 % canceled), the payments are inserted in bulk with SQL, 90 % already equal to Stripe and
//! every seventh one behind (still `requires_payment_method`), so the run mostly reads and
//! compares, and repairs (and fulfils) a tenth. The binary runs as an operator would run it.

use std::time::Instant;

use pgpay_tests::TestDb;
use stripe_fake::{Config as FakeConfig, SeedRequest, StripeFake};

const KEY: &str = "sk_test_reconcile_bench";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn round(n: usize) -> (f64, String, Vec<i64>) {
    let fake = StripeFake::start(FakeConfig {
        api_key: KEY.into(),
        ..FakeConfig::default()
    })
    .await
    .expect("start stripe-fake");
    let mut seed = SeedRequest::new(n as u32);
    seed.amount = 1999;
    seed.metadata.insert("order_ref".into(), "bench-{i}".into());
    seed.status_mix = [
        ("succeeded".to_string(), 7),
        ("requires_payment_method".to_string(), 2),
        ("canceled".to_string(), 1),
    ]
    .into_iter()
    .collect();
    fake.seed(seed).expect("seed");
    let ledger = fake.ledger();
    let (mut refs, mut intents, mut statuses) = (Vec::new(), Vec::new(), Vec::new());
    for (i, pi) in ledger.payment_intents.list.iter().enumerate() {
        refs.push(format!("bench-{i}"));
        intents.push(pi.id.clone());
        statuses.push(if i % 7 == 0 {
            "requires_payment_method".to_string()
        } else {
            pi.status.clone()
        });
    }

    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute(
            "WITH s AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS s(order_ref, intent, status)),
                  o AS (INSERT INTO pay.orders (order_ref) SELECT order_ref FROM s)
             INSERT INTO pay.payments (order_ref, attempt, amount, currency, status, stripe_payment_intent_id,
                                       client_secret, params_fingerprint, status_evidence_at)
             SELECT order_ref, 1, 1999, 'usd', status::pay.payment_status, intent, intent || '_secret_bench', 'bench', 0 FROM s",
            &[&refs, &intents, &statuses],
        )
        .await
        .expect("insert payments");
    client
        .batch_execute("VACUUM ANALYZE pay.payments")
        .await
        .unwrap();

    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpay-worker"))
        .args(["reconcile", "--since", "48h", "--rate-limit", "0"])
        .env("DATABASE_URL", db.database_url())
        .env("STRIPE_SECRET_KEY", KEY)
        .env("STRIPE_API_BASE", fake.base_url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "reconcile failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = client
        .query_one(
            "SELECT objects::bigint, applied::bigint, adopted::bigint, not_ours::bigint, findings::bigint,
                    (SELECT count(*) FROM pay.fulfillments)
             FROM pay.reconciliation_runs",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(counts[0], n as i64, "every PaymentIntent was seen");
    (
        secs,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        counts,
    )
}

fn main() {
    let n = env_or("PGPAY_BENCH_OBJECTS", 100_000);
    let rounds = env_or("PGPAY_BENCH_ROUNDS", 3).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("reconcile benchmark: {n} PaymentIntents at stripe-fake, rate limit lifted, {rounds} round(s)");
    let mut times = Vec::new();
    for r in 0..rounds {
        let (secs, summary, c) = runtime.block_on(round(n));
        println!(
            "round {}: {secs:.2} s, {:.0} objects/s; run: {} objects, {} applied, {} adopted, {} not ours, {} findings; {} fulfillments",
            r + 1,
            n as f64 / secs,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5]
        );
        println!("  {summary}");
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "median: {median:.2} s, {:.0} objects/s (target <= 60 s)",
        n as f64 / median
    );
}
