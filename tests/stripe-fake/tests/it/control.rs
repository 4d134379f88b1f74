//! The `/_fake/*` control endpoints over HTTP, as the demo and other languages' tests use them.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{start, Api, Receiver, DEADLINE};

#[tokio::test]
async fn faults_clock_seed_ledger_and_reset() {
    let fake = start().await;
    let api = Api::new(&fake);

    let added = api
        .control(
            Method::POST,
            "/_fake/faults",
            Some(json!({ "rules": [
                { "method": "POST", "path": "/v1/payment_intents", "action": "fail_before_commit", "times": 1 },
                { "path": "/v1/payment_intents/*", "action": "latency", "latency_ms": 1, "probability": 1.0 },
            ]})),
        )
        .await;
    assert_eq!(added.status, 200, "{}", added.json);
    assert_eq!(added.json["ids"], json!([1, 2]));
    let bad = api
        .control(
            Method::POST,
            "/_fake/faults",
            Some(json!({ "path": "*", "action": "explode" })),
        )
        .await;
    assert_eq!(bad.status, 400);
    let bad = api
        .control(
            Method::POST,
            "/_fake/faults",
            Some(json!({ "path": "*", "action": "rate_limit", "probability": 2 })),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        api.post(
            "/v1/payment_intents",
            None,
            &[("amount", "1"), ("currency", "usd")]
        )
        .await
        .status,
        500
    );
    let listed = api.control(Method::GET, "/_fake/faults", None).await;
    assert_eq!(listed.json["rules"][0]["fired"], 1);
    assert_eq!(listed.json["rules"][0]["remaining"], 0);
    assert_eq!(
        api.control(Method::DELETE, "/_fake/faults", None)
            .await
            .status,
        200
    );
    assert!(fake.faults().is_empty());

    let clock = api
        .control(
            Method::POST,
            "/_fake/clock",
            Some(json!({ "advance_secs": 3600 })),
        )
        .await;
    assert_eq!(clock.json["offset_secs"], 3600);
    assert_eq!(clock.json["now"].as_i64(), Some(fake.now()));
    let negative = api
        .control(
            Method::POST,
            "/_fake/clock",
            Some(json!({ "advance_secs": -5 })),
        )
        .await;
    assert_eq!(negative.status, 400);

    let seeded = api
        .control(
            Method::POST,
            "/_fake/seed",
            Some(json!({
                "count": 10,
                "metadata": { "pgpay_payment_id": "p-{i}" },
                "created_from": 1_700_000_000,
                "status_mix": { "succeeded": 1, "requires_payment_method": 1 },
                "events": true,
            })),
        )
        .await;
    assert_eq!(seeded.status, 200, "{}", seeded.json);
    assert_eq!(seeded.json["created"], 10);
    assert_eq!(seeded.json["last_created"], 1_700_000_009);
    let bad_seed = api
        .control(
            Method::POST,
            "/_fake/seed",
            Some(json!({ "count": 1, "status_mix": { "exploded": 1 } })),
        )
        .await;
    assert_eq!(bad_seed.status, 400);

    let ledger = api.control(Method::GET, "/_fake/ledger", None).await;
    assert_eq!(ledger.json["payment_intents"]["created"], 10);
    assert_eq!(ledger.json["payment_intents"]["by_status"]["succeeded"], 5);
    assert_eq!(
        ledger.json["payment_intents"]["list"]
            .as_array()
            .map(Vec::len),
        Some(10)
    );
    assert_eq!(
        ledger.json["payment_intents"]["list"][3]["metadata"]["pgpay_payment_id"],
        "p-3"
    );
    assert_eq!(ledger.json["events"]["total"], 15);
    assert_eq!(ledger.json["faults_fired"]["fail_before_commit"], 1);
    assert_eq!(ledger.json["requests"]["POST /v1/payment_intents"], 1);
    assert_eq!(ledger.json["responses"]["500"], 1);
    let typed: stripe_fake::Ledger =
        serde_json::from_value(ledger.json.clone()).expect("typed ledger");
    assert_eq!(typed.payment_intents.created, 10);
    let counts = api
        .control(Method::GET, "/_fake/ledger?lists=false", None)
        .await;
    assert_eq!(counts.json["payment_intents"]["list"], json!([]));

    let rate = api
        .control(
            Method::POST,
            "/_fake/rate_limit",
            Some(json!({ "per_second": 25 })),
        )
        .await;
    assert_eq!(rate.json["per_second"], 25);
    let rate = api
        .control(
            Method::POST,
            "/_fake/rate_limit",
            Some(json!({ "per_second": null })),
        )
        .await;
    assert_eq!(rate.json["per_second"], json!(null));

    let retention = api
        .control(
            Method::POST,
            "/_fake/idempotency",
            Some(json!({ "retention_secs": 60 })),
        )
        .await;
    assert_eq!(retention.json["retention_secs"], 60);

    let pi = fake.ledger().payment_intents.list[0].id.clone();
    let confirmed = api
        .control(
            Method::POST,
            &format!("/_fake/payment_intents/{pi}/confirm"),
            Some(json!({ "payment_method": "pm_card_chargeDeclined" })),
        )
        .await;
    assert_eq!(confirmed.status, 402);
    assert_eq!(confirmed.error()["code"], "card_declined");

    assert_eq!(
        api.control(Method::POST, "/_fake/reset", None).await.status,
        200
    );
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 0);
    assert_eq!(ledger.events.total, 0);
    assert_eq!(ledger.clock_offset_secs, 0);
    assert!(ledger.requests.is_empty());
    assert_eq!(
        ledger.idempotency.retention_secs,
        stripe_fake::DEFAULT_RETENTION_SECS
    );
    assert_eq!(
        api.control(Method::GET, "/_fake/nothing", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn webhook_endpoint_options_hold_and_release() {
    let fake = start().await;
    let api = Api::new(&fake);
    let receiver = Receiver::start().await;
    let set = api
        .control(
            Method::POST,
            "/_fake/webhook",
            Some(json!({ "url": receiver.url, "secret": "whsec_x" })),
        )
        .await;
    assert_eq!(set.status, 200);
    assert_eq!(set.json["url"], receiver.url.as_str());
    assert!(
        !set.json.to_string().contains("whsec_x"),
        "the secret is never echoed"
    );
    let invalid = api
        .control(
            Method::POST,
            "/_fake/webhook",
            Some(json!({ "url": "ftp://x", "secret": "whsec_x" })),
        )
        .await;
    assert_eq!(invalid.status, 400);
    let options = api
        .control(
            Method::POST,
            "/_fake/webhook/options",
            Some(json!({ "duplicate": 1, "max_attempts": 2 })),
        )
        .await;
    assert_eq!(options.json["duplicate"], 1);
    assert_eq!(options.json["max_attempts"], 2);
    assert_eq!(options.json["reorder_window"], 0);
    let unknown = api
        .control(
            Method::POST,
            "/_fake/webhook/options",
            Some(json!({ "duplicates": 1 })),
        )
        .await;
    assert_eq!(unknown.status, 400);

    api.control(Method::POST, "/_fake/webhook/hold", None).await;
    api.create("100", "o-1").await;
    let released = api
        .control(Method::POST, "/_fake/webhook/release", None)
        .await;
    assert_eq!(released.json["released"], 1);
    receiver.wait_for(2).await;
    let event = fake.events()[0]["id"].as_str().expect("id").to_owned();
    let resent = api
        .control(Method::POST, &format!("/_fake/events/{event}/resend"), None)
        .await;
    assert_eq!(resent.status, 200);
    receiver.wait_for(4).await;
    fake.wait_for(DEADLINE, |l| l.webhooks.ok == 4)
        .await
        .expect("counted");

    let cleared = api.control(Method::DELETE, "/_fake/webhook", None).await;
    assert_eq!(cleared.json["url"], json!(null));
    let missing = api
        .control(Method::POST, &format!("/_fake/events/{event}/resend"), None)
        .await;
    assert_eq!(missing.status, 400);
}
