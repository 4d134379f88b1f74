//! `pay.invoice_fulfillments` behaves exactly like the payments' queue: claims with leases, a
//! consumer whose lease was taken over is fenced, failures back off and die after
//! `pay.fulfillment_max_attempts`, `retry_invoice_fulfillment` hands a dead one out again.

use pgpay_tests::billing::{self, Shape, Sub};
use pgpay_tests::{count, sqlstate, TestDb};
use serde_json::Value;
use tokio_postgres::Client;

/// A subscription with one paid invoice (read by reconciliation): the invoice id.
async fn paid_invoice(client: &Client) -> String {
    let id = billing::begin(client, "acct-ful", "price_pro", 1).await;
    let s = Sub {
        id: "sub_ful",
        pgpay_id: id,
        subscription_ref: "acct-ful",
        status: "active",
        price: "price_pro",
        quantity: 1,
        period: (1_900_000_000, 1_902_592_000),
        cancel_at_period_end: false,
    };
    let page = Value::Array(vec![
        billing::subscription(Shape::V2025, &s),
        billing::invoice(
            Shape::V2025,
            "in_ful",
            &s,
            "paid",
            1500,
            "subscription_create",
            s.period,
        ),
    ]);
    client
        .query(
            "SELECT * FROM pay.apply_stripe_objects($1, 'reconcile', NULL)",
            &[&page],
        )
        .await
        .unwrap();
    "in_ful".to_owned()
}

async fn claim(client: &Client, consumer: &str) -> Vec<String> {
    client
        .query(
            "SELECT stripe_invoice_id FROM pay.claim_invoice_fulfillments($1, 10, '1 minute')",
            &[&consumer],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn claims_fence_failures_back_off_die_and_come_back() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let invoice = paid_invoice(&client).await;
    assert_eq!(claim(&client, "a").await, [invoice.as_str()]);
    assert!(claim(&client, "b").await.is_empty(), "held by a");
    let fenced: bool = client
        .query_one(
            "SELECT pay.fail_invoice_fulfillment($1, 'b is not the holder', consumer => 'b')",
            &[&invoice],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!fenced);
    let failed: bool = client
        .query_one(
            "SELECT pay.fail_invoice_fulfillment($1, 'billing system down', '0 seconds', 'a')",
            &[&invoice],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failed);
    assert_eq!(
        claim(&client, "b").await,
        [invoice.as_str()],
        "due again at once"
    );
    client
        .batch_execute("SET pay.fulfillment_max_attempts = 2")
        .await
        .unwrap();
    client
        .execute(
            "SELECT pay.fail_invoice_fulfillment($1, 'still down', consumer => 'b')",
            &[&invoice],
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.dead_invoice_fulfillments WHERE attempts = 2"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT (pay.status_report() ->> 'dead_invoice_fulfillments')::bigint"
        )
        .await,
        1,
        "pgpay-worker status counts it"
    );
    assert!(
        claim(&client, "a").await.is_empty(),
        "a dead row waits for a human"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.subscription_timeline('acct-ful') WHERE cause LIKE 'fulfillment of invoice in_ful dead after 2 failed attempts%'"
        )
        .await,
        1
    );
    let retried: bool = client
        .query_one("SELECT pay.retry_invoice_fulfillment($1)", &[&invoice])
        .await
        .unwrap()
        .get(0);
    assert!(retried);
    assert_eq!(claim(&client, "a").await, [invoice.as_str()]);
    let err = client
        .query_one(
            "SELECT pay.complete_invoice_fulfillment($1, 'b')",
            &[&invoice],
        )
        .await
        .expect_err("b does not hold the claim");
    assert_eq!(sqlstate(&err), Some("55000"));
    for first in [true, false] {
        let done: bool = client
            .query_one(
                "SELECT pay.complete_invoice_fulfillment($1, 'a')",
                &[&invoice],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(done, first);
    }
    let err = client
        .query_one("SELECT pay.complete_invoice_fulfillment('in_nothing')", &[])
        .await
        .expect_err("no such fulfillment");
    assert_eq!(sqlstate(&err), Some("P0002"));
    for sql in [
        "SELECT pay.claim_invoice_fulfillments('', 10, '1 minute')",
        "SELECT pay.claim_invoice_fulfillments('a', 0, '1 minute')",
        "SELECT pay.claim_invoice_fulfillments('a', 10, '0 seconds')",
        "SELECT pay.fail_invoice_fulfillment('in_ful', ' ')",
        "SELECT pay.fail_invoice_fulfillment('in_ful', 'x', '-1 second')",
    ] {
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("22023"), "{sql}");
    }
}
