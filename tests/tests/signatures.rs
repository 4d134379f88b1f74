//! `pay.verify_stripe_signature` agrees with the official Stripe SDKs on every shared vector.

use pgpay_tests::{sqlstate, TestDb};

#[tokio::test]
async fn every_sdk_vector_gets_the_sdk_verdict_through_sql() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/stripe_webhook_signatures.json"
    );
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).expect("tests/fixtures/stripe_webhook_signatures.json"),
    )
    .expect("json");
    let vectors = doc["vectors"].as_array().expect("vectors");
    assert!(vectors.len() >= 20, "expected the full vector set");
    let statement = client
        .prepare("SELECT pay.verify_stripe_signature($1, $2, $3, $4, $5)")
        .await
        .unwrap();
    for v in vectors {
        let verdict: bool = client
            .query_one(
                &statement,
                &[
                    &v["payload"].as_str().unwrap(),
                    &v["header"].as_str().unwrap(),
                    &v["secret"].as_str().unwrap(),
                    &(v["tolerance"].as_i64().unwrap() as i32),
                    &v["now"].as_i64().unwrap(),
                ],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(verdict, v["stripe_sdk"] == "valid", "vector {}", v["name"]);
    }
}

#[tokio::test]
async fn defaults_nulls_and_bad_tolerance() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = pgpay_core::signature::sign_header(b"{}", b"whsec_k", now);
    // Default tolerance (300 s) and the wall clock.
    let fresh: bool = client
        .query_one(
            "SELECT pay.verify_stripe_signature('{}', $1, 'whsec_k')",
            &[&header],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fresh);
    let old = pgpay_core::signature::sign_header(b"{}", b"whsec_k", now - 301);
    let stale: bool = client
        .query_one(
            "SELECT pay.verify_stripe_signature('{}', $1, 'whsec_k')",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!stale);
    let future = pgpay_core::signature::sign_header(b"{}", b"whsec_k", now + 3600);
    let ahead: bool = client
        .query_one(
            "SELECT pay.verify_stripe_signature('{}', $1, 'whsec_k')",
            &[&future],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ahead, "a timestamp an hour ahead is refused");
    let null: Option<bool> = client
        .query_one(
            "SELECT pay.verify_stripe_signature(NULL, $1, 'whsec_k')",
            &[&header],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(null, None);
    let err = client
        .query_one(
            "SELECT pay.verify_stripe_signature('{}', $1, 'whsec_k', -1)",
            &[&header],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
    assert!(err.as_db_error().unwrap().message().contains("tolerance_s"));
}
