//! `pay.idempotency_key`: deterministic, canonical, bounded.

use pgpay_tests::{sqlstate, TestDb};

async fn key(
    client: &tokio_postgres::Client,
    scope: &str,
    parts: &str,
) -> Result<String, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT pay.idempotency_key($1, $2::text::jsonb)",
            &[&scope, &parts],
        )
        .await
        .map(|row| row.get(0))
}

#[tokio::test]
async fn same_value_same_key_any_change_another() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let base = key(
        &client,
        "pgpay.test",
        r#"{"order":"o-1","amount":2000,"items":[{"sku":"a","qty":1}]}"#,
    )
    .await
    .unwrap();
    // jsonb reorders keys by length then bytes; the key must not care how the object was written.
    let reordered = key(
        &client,
        "pgpay.test",
        r#"{ "items" : [ {"qty":1.0, "sku":"a"} ], "amount": 2000.00, "order":"o-1" }"#,
    )
    .await
    .unwrap();
    assert_eq!(base, reordered);
    for changed in [
        r#"{"order":"o-2","amount":2000,"items":[{"sku":"a","qty":1}]}"#,
        r#"{"order":"o-1","amount":2001,"items":[{"sku":"a","qty":1}]}"#,
        r#"{"order":"o-1","amount":"2000","items":[{"sku":"a","qty":1}]}"#,
        r#"{"order":"o-1","amount":2000,"items":[{"sku":"a","qty":2}]}"#,
        r#"{"order":"o-1","amount":2000,"items":[{"sku":"a","qty":1}],"x":null}"#,
        r#"{"order":"o-1","amount":20000000000000000000001,"items":[{"sku":"a","qty":1}]}"#,
    ] {
        assert_ne!(
            key(&client, "pgpay.test", changed).await.unwrap(),
            base,
            "{changed}"
        );
    }
    assert_ne!(
        key(
            &client,
            "pgpay.other",
            r#"{"order":"o-1","amount":2000,"items":[{"sku":"a","qty":1}]}"#
        )
        .await
        .unwrap(),
        base
    );
    // Big numbers keep every digit (no rounding through a double).
    assert_ne!(
        key(&client, "s", "[12345678901234567890123]")
            .await
            .unwrap(),
        key(&client, "s", "[12345678901234567890124]")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn matches_the_core_crate_and_a_pinned_answer() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let parts = r#"{"b":[1,{"d":"é","c":null}],"a":true}"#;
    let in_sql = key(&client, "pgpay.pi_create", parts).await.unwrap();
    let in_rust = pgpay_core::idempotency::derive("pgpay.pi_create", parts).unwrap();
    assert_eq!(in_sql, in_rust);
    assert_eq!(
        key(&client, "s", "{}").await.unwrap(),
        "s:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    assert!(in_sql.len() <= 255 && in_sql.is_ascii());
}

#[tokio::test]
async fn bad_scope_is_22023() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    for scope in ["", "has space", &"s".repeat(191)] {
        let err = key(&client, scope, "{}").await.unwrap_err();
        assert_eq!(sqlstate(&err), Some("22023"), "scope {scope:?}");
        assert!(err.as_db_error().unwrap().message().contains("scope"));
    }
    let max = key(&client, &"s".repeat(190), "{}").await.unwrap();
    assert_eq!(max.len(), 255);
}
