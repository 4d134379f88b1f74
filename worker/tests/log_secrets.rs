//! No log level prints a webhook body, a Stripe-Signature header, an API key or a
//! client_secret: the worker runs as a child process at `RUST_LOG=trace` through a whole
//! loop (create, pay, webhook relayed and applied, refund, a wrong-secret delivery) with
//! canary values, and its whole output is searched for them. Also: a burst of rejected
//! deliveries gives one WARN line per reason, not one per delivery.

mod common;

use std::process::Stdio;

use common::{count, wait_for_count, WAIT};
use pgpay_tests::{wait_until, TestDb};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const API_KEY: &str = "sk_test_CanaryApiKey7q3";
const WEBHOOK_SECRET: &str = "whsec_CanaryWebhookSecret9x2";
const BODY_MARKER: &str = "CanaryBodyMarker4k8";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_carry_no_body_signature_key_or_client_secret() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .execute(
            "SELECT pay.add_webhook_secret($1, 'canary')",
            &[&WEBHOOK_SECRET],
        )
        .await
        .unwrap();
    let fake = stripe_fake::StripeFake::start(stripe_fake::Config {
        api_key: API_KEY.into(),
        ..stripe_fake::Config::default()
    })
    .await
    .unwrap();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpay-worker"))
        .args(["run", "--poll-interval", "200ms", "--rate-limit", "0"])
        .env_clear()
        .env("RUST_LOG", "trace")
        .env("DATABASE_URL", db.database_url())
        .env("STRIPE_API_BASE", fake.base_url())
        .env("STRIPE_SECRET_KEY", API_KEY)
        .env("PGPAY_WORKER_HTTP_LISTEN", listen.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Drain both pipes as they fill (trace output is large).
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = tokio::spawn(async move {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s).await;
        s
    });
    let err = tokio::spawn(async move {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s).await;
        s
    });
    fake.set_webhook(format!("http://{listen}/webhooks/stripe"), WEBHOOK_SECRET)
        .unwrap();

    // The whole loop, with the marker in the metadata, the description and the order.
    let payment: String = client
        .query_one(
            "SELECT id::text FROM pay.begin_checkout($1, 4200, 'usd', NULL, jsonb_build_object('note', $2::text), $2)",
            &[&format!("order-{BODY_MARKER}"), &BODY_MARKER],
        )
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT stripe_payment_intent_id, client_secret FROM pay.wait_for_intent($1::text::uuid, 15000)",
            &[&payment],
        )
        .await
        .unwrap();
    let intent: String = row.get(0);
    let client_secret: String = row.get(1);
    assert!(client_secret.contains("_secret_"), "{client_secret}");
    fake.confirm(&intent, "pm_card_visa").await.unwrap();
    assert!(
        wait_for_count(&client, "SELECT count(*) FROM pay.fulfillments", 1, WAIT).await,
        "the success webhook was relayed and applied"
    );
    client
        .execute("SELECT pay.refund($1::text::uuid)", &[&payment])
        .await
        .unwrap();
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE kind = 'refund' AND status = 'done'",
            1,
            WAIT
        )
        .await
    );
    // Rejected deliveries (a wrong secret) five times: one WARN line with the reason.
    let payload = format!(r#"{{"id":"evt_{BODY_MARKER}","object":"event"}}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let bad_signature =
        pgpay_core::signature::sign_header(payload.as_bytes(), b"whsec_not_the_one", now);
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let r = http
            .post(format!("http://{listen}/webhooks/stripe"))
            .header("Stripe-Signature", &bad_signature)
            .body(payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
    }
    assert!(
        wait_until(WAIT, || async {
            count(&client, "SELECT count(*) FROM pay.webhook_events").await >= 2
        })
        .await
    );
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let stdout = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err.await.unwrap()).into_owned();
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("DEBUG") && all.contains("command completed"),
        "debug logging was on and the loop ran:\n{all}"
    );
    let signature_value = bad_signature.split(",v1=").nth(1).unwrap();
    for (what, canary) in [
        ("the API key", API_KEY),
        ("the webhook secret", WEBHOOK_SECRET),
        ("a body or parameter", BODY_MARKER),
        ("the client_secret", client_secret.as_str()),
        ("a Stripe-Signature value", signature_value),
    ] {
        let hits: Vec<_> = all.lines().filter(|l| l.contains(canary)).take(3).collect();
        assert!(
            hits.is_empty(),
            "{what} appears in the output:\n{}",
            hits.join("\n")
        );
    }
    let warns: Vec<_> = all
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("webhook rejected"))
        .collect();
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert!(
        warns[0].contains("reason=\"signature_mismatch\"")
            || warns[0].contains("reason=signature_mismatch"),
        "{}",
        warns[0]
    );
}
