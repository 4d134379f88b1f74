//! Fulfillment retries: a consumer whose provisioning fails records it, the row waits for its
//! backoff, gives up after `pay.fulfillment_max_attempts` (the dead letter), can be handed out
//! again, and a consumer whose claim expired cannot complete or fail another consumer's claim.

use pgpay_tests::{count, fixtures, sqlstate, TestDb};
use tokio_postgres::Client;
use uuid::Uuid;

/// A succeeded payment: its fulfillment row exists and is due.
async fn paid(client: &Client, order: &str) -> Uuid {
    let id: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, 2000, 'usd')",
            &[&order],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fixtures::answer_create(client, id, &format!("pi_{order}"), "succeeded").await);
    assert_eq!(
        count(
            client,
            &format!("SELECT count(*) FROM pay.fulfillments WHERE payment_id = '{id}'")
        )
        .await,
        1
    );
    id
}

async fn claim(client: &Client, consumer: &str) -> Vec<Uuid> {
    client
        .query(
            "SELECT payment_id FROM pay.claim_fulfillments($1, 10)",
            &[&consumer],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_failed_fulfillment_waits_for_its_backoff() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let id = paid(&client, "order-backoff").await;
    assert_eq!(claim(&client, "shop").await, vec![id]);

    // Default backoff: full jitter below the base (10 s) for the first failure.
    let failed: bool = client
        .query_one(
            "SELECT pay.fail_fulfillment($1, 'warehouse API timed out')",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failed);
    let (attempts, last_error, wait_s): (i32, String, f64) = {
        let row = client
            .query_one(
                "SELECT attempts, last_error, extract(epoch FROM next_attempt_at - now())::float8
                 FROM pay.fulfillments WHERE payment_id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        (attempts, last_error.as_str()),
        (1, "warehouse API timed out")
    );
    assert!(
        (0.0..=10.0).contains(&wait_s),
        "first backoff within the base: {wait_s}"
    );

    // Not due yet (an explicit retry_in makes that certain): nobody gets it.
    client
        .query_one(
            "SELECT pay.fail_fulfillment($1, 'still down', retry_in => '1 hour')",
            &[&id],
        )
        .await
        .unwrap();
    assert!(
        claim(&client, "shop").await.is_empty(),
        "a row waiting for its retry is not handed out"
    );
    // Once due, it is handed out again.
    client
        .execute(
            "UPDATE pay.fulfillments SET next_attempt_at = now() - interval '1 second' WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(claim(&client, "shop").await, vec![id]);

    // The backoff doubles up to its cap, which the GUCs set.
    client
        .batch_execute("SET pay.fulfillment_backoff_base = '1 hour'; SET pay.fulfillment_backoff_cap = '2 hours'")
        .await
        .unwrap();
    client
        .query_one("SELECT pay.fail_fulfillment($1, 'third')", &[&id])
        .await
        .unwrap();
    let wait_s: f64 = client
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM pay.fulfillments WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (0.0..=7200.0).contains(&wait_s),
        "capped at 2 hours: {wait_s}"
    );

    // Bad settings and arguments name what is wrong.
    client
        .batch_execute("SET pay.fulfillment_backoff_base = 'soon'")
        .await
        .unwrap();
    let err = client
        .query("SELECT pay.fail_fulfillment($1, 'x')", &[&id])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "setting pay.fulfillment_backoff_base = soon is not valid"
    );
    client
        .batch_execute("RESET pay.fulfillment_backoff_base")
        .await
        .unwrap();
    let err = client
        .query("SELECT pay.fail_fulfillment($1, '')", &[&id])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
}

#[tokio::test]
async fn after_the_last_attempt_it_is_dead_until_a_human_retries_it() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .batch_execute("SET pay.fulfillment_max_attempts = 3")
        .await
        .unwrap();
    let id = paid(&client, "order-dead").await;
    for attempt in 1..=3 {
        assert_eq!(claim(&client, "shop").await, vec![id], "attempt {attempt}");
        let failed: bool = client
            .query_one(
                "SELECT pay.fail_fulfillment($1, 'no such SKU: ' || $2::text, retry_in => '0')",
                &[&id, &attempt.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        assert!(failed);
    }
    assert!(
        claim(&client, "shop").await.is_empty(),
        "a dead row is not handed out"
    );
    let row = client
        .query_one(
            "SELECT attempts, last_error FROM pay.dead_fulfillments WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    assert_eq!(row.get::<_, String>(1), "no such SKU: 3");
    assert_eq!(
        count(
            &client,
            "SELECT (pay.status_report() ->> 'dead_fulfillments')::bigint"
        )
        .await,
        1,
        "pgpay-worker status counts it"
    );
    assert_eq!(
        count(
            &client,
            &format!(
                "SELECT count(*) FROM pay.payment_timeline('{id}') WHERE cause = 'fulfillment dead after 3 failed attempts: no such SKU: 3'"
            )
        )
        .await,
        1,
        "the dead letter is audited"
    );
    // A further failure report changes nothing.
    let again: bool = client
        .query_one("SELECT pay.fail_fulfillment($1, 'late')", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(!again);

    // Revival: handed out again with a fresh budget, then completed once.
    let revived: bool = client
        .query_one("SELECT pay.retry_fulfillment($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(revived);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.dead_fulfillments").await,
        0
    );
    assert_eq!(claim(&client, "shop").await, vec![id]);
    let done: bool = client
        .query_one("SELECT pay.complete_fulfillment($1, 'shop')", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(done);
    let twice: bool = client
        .query_one("SELECT pay.retry_fulfillment($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(!twice, "only a dead row can be retried");
}

#[tokio::test]
async fn a_consumer_whose_claim_expired_cannot_complete_or_fail_anothers_claim() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let id = paid(&client, "order-fenced").await;
    assert_eq!(claim(&client, "consumer-a").await, vec![id]);
    // Consumer A stalls past its lease; consumer B takes the row over.
    client
        .execute(
            "UPDATE pay.fulfillments SET claim_expires = now() - interval '1 second' WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(claim(&client, "consumer-b").await, vec![id]);

    let failed: bool = client
        .query_one(
            "SELECT pay.fail_fulfillment($1, 'A gave up', consumer => 'consumer-a')",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!failed, "A's failure report does not touch B's claim");
    let err = client
        .query("SELECT pay.complete_fulfillment($1, 'consumer-a')", &[&id])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("55000"), "{err}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("consumer consumer-a no longer holds the claim"));

    let done: bool = client
        .query_one("SELECT pay.complete_fulfillment($1, 'consumer-b')", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(done);
    let row = client
        .query_one(
            "SELECT attempts, completed_at IS NOT NULL FROM pay.fulfillments WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1)), (0, true));
    // Completing again, by anyone, is a harmless false (the one-argument form as before).
    let again: bool = client
        .query_one("SELECT pay.complete_fulfillment($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(!again);
}
