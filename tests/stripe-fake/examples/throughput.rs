//! How fast is the fake? `cargo run --release -p stripe-fake --example throughput`
//!
//! Creates PaymentIntents over HTTP from 16 concurrent clients (each with its own
//! Idempotency-Key), then seeds 100,000 and lists them all in pages of 100.

use std::time::Instant;

use stripe_fake::{Config, SeedRequest, StripeFake};

const CREATES: usize = 5_000;
const CLIENTS: usize = 16;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fake = StripeFake::start(Config::default()).await?;
    let base = fake.base_url();
    let key = fake.api_key().to_owned();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (base, key) = (base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in (client..CREATES).step_by(CLIENTS) {
                let answer = http
                    .post(format!("{base}/v1/payment_intents"))
                    .bearer_auth(&key)
                    .header("Idempotency-Key", format!("order-{i}"))
                    .form(&[
                        ("amount", "1000"),
                        ("currency", "usd"),
                        ("metadata[order_ref]", &format!("o-{i}")),
                    ])
                    .send()
                    .await?;
                assert_eq!(answer.status(), 200);
                answer.bytes().await?;
            }
            Ok::<_, reqwest::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "{CREATES} creates in {elapsed:?}: {:.0} requests/s",
        CREATES as f64 / elapsed.as_secs_f64()
    );

    fake.reset();
    fake.seed(SeedRequest::new(100_000))?;
    let started = Instant::now();
    let http = reqwest::Client::new();
    let (mut total, mut pages) = (0, 0);
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "100".to_owned())];
        if let Some(c) = cursor.take() {
            query.push(("starting_after", c));
        }
        let body = http
            .get(format!("{base}/v1/payment_intents"))
            .bearer_auth(&key)
            .query(&query)
            .send()
            .await?
            .bytes()
            .await?;
        let page: serde_json::Value = serde_json::from_slice(&body)?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        total += data.len();
        pages += 1;
        if page["has_more"] != true {
            break;
        }
        cursor = data
            .last()
            .and_then(|pi| pi["id"].as_str())
            .map(str::to_owned);
    }
    println!(
        "listed {total} PaymentIntents in {pages} pages in {:?}",
        started.elapsed()
    );
    fake.shutdown().await;
    Ok(())
}
