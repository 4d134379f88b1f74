//! The SQL side of reconciliation: objects and events read from Stripe's API go through the same
//! transition rule; differences become findings, once.

use pgpay_tests::{count, fixtures, sqlstate, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

async fn checkout(client: &Client, order: &str, amount: i64) -> Uuid {
    client
        .query_one(
            "SELECT id FROM pay.begin_checkout($1, $2, 'usd')",
            &[&order, &amount],
        )
        .await
        .unwrap()
        .get(0)
}

async fn apply(client: &Client, object: &Value, run: Option<i64>) -> (String, Option<Uuid>) {
    let row = client
        .query_one(
            "SELECT outcome, payment_id FROM pay.apply_stripe_object($1, 'reconcile', $2)",
            &[object, &run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn findings(client: &Client) -> Vec<(String, Option<String>, Option<String>)> {
    client
        .query(
            "SELECT kind, expected, actual FROM pay.reconciliation_findings ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn an_orphan_is_adopted_its_create_closed_and_a_rerun_changes_nothing() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = checkout(&client, "r-1", 1500).await;
    // The worker sent the create, Stripe made the PaymentIntent, the worker died before recording it.
    let claimed = client
        .query("SELECT id, attempts FROM pay.claim_outbox('crashed')", &[])
        .await
        .unwrap();
    let (command, attempt): (i64, i32) = (claimed[0].get(0), claimed[0].get(1));
    let run: i64 = client
        .query_one(
            "SELECT pay.start_reconciliation('test', now() - interval '1 day')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let intent = fixtures::payment_intent(
        "pi_orphan",
        &payment.to_string(),
        1500,
        "usd",
        "requires_payment_method",
    );
    assert_eq!(
        apply(&client, &intent, Some(run)).await,
        ("adopted".into(), Some(payment))
    );
    let row = client
        .query_one("SELECT p.stripe_payment_intent_id, o.status FROM pay.payments p JOIN pay.outbox o ON o.payment_id = p.id WHERE p.id = $1", &[&payment])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pi_orphan");
    assert_eq!(
        row.get::<_, String>(1),
        "done",
        "an adopted create is never sent again"
    );
    // The crashed worker comes back: fenced.
    let late: bool = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &intent],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!late);
    assert_eq!(
        findings(&client).await,
        [("orphan_adopted".into(), None, Some("pi_orphan".into()))]
    );
    let audit_before = count(&client, "SELECT count(*) FROM pay.audit_log").await;
    assert_eq!(apply(&client, &intent, Some(run)).await.0, "unchanged");
    assert_eq!(
        findings(&client).await.len(),
        1,
        "a re-run finds nothing new"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.audit_log").await,
        audit_before,
        "and writes nothing"
    );
    let finished = client
        .query_one(
            "SELECT findings, finished_at IS NOT NULL FROM pay.finish_reconciliation($1)",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(finished.get::<_, i32>(0), 1);
    assert!(finished.get::<_, bool>(1));
}

#[tokio::test]
async fn missed_webhooks_are_fixed_and_drift_is_flagged_not_fulfilled() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let paid = checkout(&client, "r-2", 1000).await;
    let drifted = checkout(&client, "r-3", 1000).await;
    let claimed = client
        .query(
            "SELECT id, attempts, payment_id FROM pay.claim_outbox('w')",
            &[],
        )
        .await
        .unwrap();
    for row in &claimed {
        let payment: Uuid = row.get(2);
        let intent = fixtures::payment_intent(
            &format!("pi_{}", &payment.simple().to_string()[..8]),
            &payment.to_string(),
            1000,
            "usd",
            "requires_payment_method",
        );
        client
            .query_one(
                "SELECT pay.complete_outbox($1, $2, 200, $3)",
                &[&row.get::<_, i64>(0), &row.get::<_, i32>(1), &intent],
            )
            .await
            .unwrap();
    }
    let pi = |p: Uuid| format!("pi_{}", &p.simple().to_string()[..8]);
    // Every webhook was lost; Stripe's list says one succeeded and one succeeded for a different amount.
    let objects = json!([
        fixtures::payment_intent(&pi(paid), &paid.to_string(), 1000, "usd", "succeeded"),
        fixtures::payment_intent(&pi(drifted), &drifted.to_string(), 900, "usd", "succeeded"),
        {"id": "pi_someone_else", "object": "payment_intent", "status": "succeeded", "amount": 5, "currency": "usd", "metadata": {}},
    ]);
    let outcomes: Vec<(String, String)> = client
        .query(
            "SELECT stripe_object_id, outcome FROM pay.apply_stripe_objects($1)",
            &[&objects],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        outcomes,
        [
            (pi(paid), "applied".into()),
            (pi(drifted), "flagged".into()),
            ("pi_someone_else".into(), "not_ours".into())
        ]
    );
    let fulfilled: Vec<Uuid> = client
        .query("SELECT payment_id FROM pay.fulfillments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(fulfilled, [paid], "drift is never fulfilled");
    let mut kinds: Vec<String> = findings(&client).await.into_iter().map(|f| f.0).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["amount_drift", "status_drift_fixed", "status_drift_fixed"]
    );
    // Second run over the same ledger: nothing new, nothing changed.
    let again: Vec<String> = client
        .query(
            "SELECT outcome FROM pay.apply_stripe_objects($1)",
            &[&objects],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(again, ["unchanged", "unchanged", "not_ours"]);
    assert_eq!(findings(&client).await.len(), 3);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
}

#[tokio::test]
async fn unknown_payments_are_findings_and_bad_objects_are_22023() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stranger = fixtures::payment_intent(
        "pi_stranger",
        &Uuid::new_v4().to_string(),
        100,
        "usd",
        "succeeded",
    );
    assert_eq!(apply(&client, &stranger, None).await.0, "not_ours");
    assert_eq!(findings(&client).await[0].0, "unknown_payment");
    // Metadata that only looks like a UUID (36 hyphens once passed a loose check and failed the
    // ::uuid cast with 22P02, stopping the run) claims nothing: not ours, and no finding.
    for claim in [
        "-".repeat(36),
        "0f8fad5bd9cb469fa16570867728950e0000".into(),
    ] {
        let fake = fixtures::payment_intent("pi_fake_claim", &claim, 100, "usd", "succeeded");
        assert_eq!(apply(&client, &fake, None).await, ("not_ours".into(), None));
        let refund = json!({"object": "refund", "id": "re_fake", "payment_intent": "pi_nobody",
                            "amount": 100, "status": "succeeded", "metadata": {"pgpay_payment_id": claim}});
        assert_eq!(
            apply(&client, &refund, None).await,
            ("not_ours".into(), None)
        );
    }
    assert_eq!(findings(&client).await.len(), 1);
    let err = client
        .query_one(
            "SELECT * FROM pay.apply_stripe_object('{\"object\":\"customer\"}')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
}

/// What the worker reads from Stripe and pgpay cannot use is refused with a documented SQLSTATE
/// before anything is written: an object Rust could not read (nested beyond serde_json's 128
/// levels, a number beyond f64) or a Refund whose amount is not a whole positive number is 22023;
/// a run that does not exist is P0002 (it used to meet the findings' foreign key, 23503).
#[tokio::test]
async fn unreadable_objects_are_22023_and_an_unknown_run_is_p0002() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = checkout(&client, "r-unreadable", 1000).await;
    assert!(fixtures::answer_create(&client, payment, "pi_unreadable", "succeeded").await);
    let refund = |amount: Value| {
        json!({"object": "refund", "id": "re_odd", "payment_intent": "pi_unreadable", "amount": amount,
               "status": "succeeded", "metadata": {"pgpay_payment_id": payment.to_string()}})
    };
    let deep = format!(
        r#"{{"object": "payment_intent", "id": "pi_unreadable", "status": "succeeded", "x": {}1{}}}"#,
        "[".repeat(129),
        "]".repeat(129)
    );
    let mut objects: Vec<(String, &str)> = vec![
        (deep, "object is nested deeper"),
        (
            r#"{"object": "payment_intent", "id": "pi_unreadable", "status": "succeeded", "amount": 1e400}"#.into(),
            "object holds a number",
        ),
    ];
    for amount in [
        json!(1.5),
        json!(-1),
        json!(0),
        serde_json::from_str("1e29").unwrap(),
    ] {
        objects.push((refund(amount).to_string(), "no whole positive amount"));
    }
    let huge: Value = serde_json::from_str("1e30").unwrap();
    objects.push((refund(huge).to_string(), "object holds a number"));
    for (object, expected) in &objects {
        let err = client
            .query(
                "SELECT * FROM pay.apply_stripe_object($1::text::jsonb)",
                &[object],
            )
            .await
            .expect_err(object);
        assert_eq!(sqlstate(&err), Some("22023"), "{object}: {err}");
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(message.contains(expected), "{object}: {message}");
    }
    let refunds = count(&client, "SELECT count(*) FROM pay.refunds").await;
    assert_eq!(refunds, 0);

    let intent = fixtures::payment_intent(
        "pi_unreadable",
        &payment.to_string(),
        1000,
        "usd",
        "succeeded",
    );
    for sql in [
        "SELECT * FROM pay.apply_stripe_object($1, 'reconcile', 424242)",
        "SELECT * FROM pay.apply_stripe_objects(jsonb_build_array($1::jsonb), 'reconcile', 424242)",
        "SELECT pay.record_reconciliation_finding(424242, 'amount_drift', NULL, $1::jsonb ->> 'id', '1', '2')",
    ] {
        let err = client.query(sql, &[&intent]).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("P0002"), "{sql}: {err}");
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(message.contains("no reconciliation run 424242"), "{message}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM pay.findings").await, 0);
    // A run that exists is taken.
    let run: i64 = client
        .query_one(
            "SELECT pay.start_reconciliation('test', now() - interval '1 day')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(apply(&client, &intent, Some(run)).await.0, "unchanged");
}

#[tokio::test]
async fn api_events_replay_through_the_webhook_dedup() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = checkout(&client, "r-4", 700).await;
    assert!(fixtures::answer_create(&client, payment, "pi_r4", "requires_payment_method").await);
    let event: Value = serde_json::from_str(&fixtures::event(
        "evt_api",
        "payment_intent.succeeded",
        1_900_000_000,
        fixtures::payment_intent("pi_r4", &payment.to_string(), 700, "usd", "succeeded"),
    ))
    .unwrap();
    let first: String = client
        .query_one("SELECT status FROM pay.apply_stripe_event($1)", &[&event])
        .await
        .unwrap()
        .get(0);
    let second: String = client
        .query_one("SELECT status FROM pay.apply_stripe_event($1)", &[&event])
        .await
        .unwrap()
        .get(0);
    assert_eq!((first.as_str(), second.as_str()), ("applied", "duplicate"));
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.fulfillments").await,
        1
    );
    let source: String = client
        .query_one("SELECT source FROM pay.webhook_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(source, "api");
}

#[tokio::test]
async fn one_run_at_a_time_and_an_abandoned_run_is_closed_after_its_lease() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let first: Option<i64> = client
        .query_one(
            "SELECT pay.start_reconciliation('a', now() - interval '1 hour', now(), '1 second')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(first.is_some());
    let second: Option<i64> = client
        .query_one(
            "SELECT pay.start_reconciliation('b', now() - interval '1 hour')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(second, None, "another replica's run holds the lease");
    let alive: bool = client
        .query_one(
            "SELECT pay.progress_reconciliation($1, 1, 100, 0, 0, 0, 0, '1 second')",
            &[&first.unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(alive);
    let took_over = pgpay_tests::wait_until(std::time::Duration::from_secs(5), || async {
        client
            .query_one(
                "SELECT pay.start_reconciliation('b', now() - interval '1 hour')",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<i64>>(0)
            .is_some()
    })
    .await;
    assert!(took_over);
    let (error, still_mine): (Option<String>, bool) = {
        let row = client
            .query_one(
                "SELECT error FROM pay.reconciliation_runs WHERE id = $1",
                &[&first.unwrap()],
            )
            .await
            .unwrap();
        let alive: bool = client
            .query_one(
                "SELECT pay.progress_reconciliation($1, 2, 200, 0, 0, 0, 0)",
                &[&first.unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        (row.get(0), alive)
    };
    assert!(error.unwrap().starts_with("abandoned"));
    assert!(!still_mine, "the old worker learns it must stop");
}

#[tokio::test]
async fn a_create_past_key_retention_is_rekeyed_once_and_audited() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = checkout(&client, "r-5", 300).await;
    let claimed = client
        .query(
            "SELECT id, attempts, idempotency_key FROM pay.claim_outbox('w')",
            &[],
        )
        .await
        .unwrap();
    let (id, attempt, old_key): (i64, i32, String) =
        (claimed[0].get(0), claimed[0].get(1), claimed[0].get(2));
    let stale: Option<String> = client
        .query_one(
            "SELECT pay.rekey_create_command($1, $2, 'x')",
            &[&id, &(attempt + 1)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale, None, "fenced by attempt");
    let new_key: String = client
        .query_one("SELECT pay.rekey_create_command($1, $2, 'no PaymentIntent found by metadata after 23 h')", &[&id, &attempt])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_key, old_key);
    assert!(new_key.starts_with("pgpay.pi_create.rekeyed:"));
    let stored: String = client
        .query_one(
            "SELECT idempotency_key FROM pay.outbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, new_key);
    let cause: String = client
        .query_one(
            "SELECT cause FROM pay.audit_log WHERE payment_id = $1 ORDER BY id DESC LIMIT 1",
            &[&payment],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cause.contains("re-keyed") && cause.contains("23 h"));
}

#[tokio::test]
async fn payments_stripe_does_not_list_are_findings() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let payment = checkout(&client, "r-6", 300).await;
    assert!(fixtures::answer_create(&client, payment, "pi_gone", "requires_payment_method").await);
    client
        .batch_execute("UPDATE pay.payments SET created_at = now() - interval '2 hours'")
        .await
        .unwrap();
    let run: i64 = client
        .query_one(
            "SELECT pay.start_reconciliation('t', now() - interval '1 day')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let seen: Vec<String> = vec!["pi_other".into()];
    let missing: i32 = client
        .query_one(
            "SELECT pay.record_missing_at_stripe($1, $2)",
            &[&run, &seen],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missing, 1);
    let again: i32 = client
        .query_one(
            "SELECT pay.record_missing_at_stripe($1, $2)",
            &[&run, &seen],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, 0);
    let report: Value = client
        .query_one("SELECT pay.status_report()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(report["open_findings"], 1);
}

#[tokio::test]
async fn a_resolved_finding_is_closed_audited_and_no_longer_counted() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let id = checkout(&client, "order-drift", 1000).await;
    client
        .execute(
            "SELECT pay.record_reconciliation_finding(NULL, 'amount_drift', $1, 'pi_drift', '1000', '900', 'test')",
            &[&id],
        )
        .await
        .unwrap();
    let finding: i64 = client
        .query_one("SELECT id FROM pay.reconciliation_findings WHERE open", &[])
        .await
        .unwrap()
        .get(0);
    let open_before: i64 = client
        .query_one(
            "SELECT (pay.status_report() ->> 'open_findings')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open_before, 1);

    // A note is required, and a DBA's refusal names what is wrong.
    let err = client
        .query("SELECT pay.resolve_finding($1, '  ')", &[&finding])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("22023"));
    let err = client
        .query("SELECT pay.resolve_finding(-1, 'x')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("P0002"));

    // The auditor role may resolve.
    client.batch_execute("SET ROLE pay_auditor").await.unwrap();
    let row = client
        .query_one(
            "SELECT open, resolved_by, resolution_note FROM pay.resolve_finding($1, 'refunded the difference by hand (ticket 42)')",
            &[&finding],
        )
        .await
        .unwrap();
    client.batch_execute("RESET ROLE").await.unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("postgres"));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("refunded the difference by hand (ticket 42)")
    );
    let open_after: i64 = client
        .query_one(
            "SELECT (pay.status_report() ->> 'open_findings')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open_after, 0);
    let audited = count(
        &client,
        &format!(
            "SELECT count(*) FROM pay.payment_timeline('{id}') WHERE cause LIKE 'finding % (amount_drift) resolved: refunded the difference by hand (ticket 42)'"
        ),
    )
    .await;
    assert_eq!(audited, 1, "the resolution is in the payment's timeline");
    let again = client
        .query("SELECT pay.resolve_finding($1, 'twice')", &[&finding])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&again), Some("55000"), "{again}");
}
