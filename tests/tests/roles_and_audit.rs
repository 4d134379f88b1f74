//! Privileges per role, and the append-only audit log.

use pgpay_tests::{sqlstate, TestDb};

#[tokio::test]
async fn each_role_gets_only_what_it_needs() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "SET ROLE pay_app; SELECT pay.begin_checkout('r-1', 100, 'usd'); RESET ROLE;",
        )
        .await
        .unwrap();
    let denied = [
        ("pay_app", "SELECT * FROM pay.claim_outbox('w')"),
        ("pay_app", "SELECT * FROM pay.outbox"),
        ("pay_app", "INSERT INTO pay.payments (order_ref, attempt, amount, currency, params_fingerprint) VALUES ('x', 1, 1, 'usd', 'f')"),
        ("pay_app", "UPDATE pay.payments SET amount = 1"),
        ("pay_worker", "SELECT pay.begin_checkout('r-2', 100, 'usd')"),
        ("pay_worker", "SELECT * FROM pay.audit_log"),
        ("pay_auditor", "SELECT pay.begin_checkout('r-3', 100, 'usd')"),
        ("pay_auditor", "SELECT * FROM pay.claim_outbox('w')"),
        ("pay_webhook", "SELECT * FROM pay.payments"),
        ("pay_webhook", "SELECT pay.begin_checkout('r-4', 100, 'usd')"),
        ("pay_webhook", "SELECT pay._audit(gen_random_uuid(), NULL, 'creating', 'forged')"),
        ("pay_app", "SELECT pay._apply_payment_intent(gen_random_uuid(), '{}', 'x', 'x', 1)"),
    ];
    for (role, sql) in denied {
        client
            .batch_execute(&format!("SET ROLE {role}"))
            .await
            .unwrap();
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("42501"), "{role}: {sql}: {err}");
        client.batch_execute("RESET ROLE").await.unwrap();
    }
    client.batch_execute("SET ROLE pay_worker").await.unwrap();
    let claimed = client
        .query("SELECT * FROM pay.claim_outbox('w')", &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    client
        .batch_execute("RESET ROLE; SET ROLE pay_auditor")
        .await
        .unwrap();
    let audit = client
        .query("SELECT actor FROM pay.audit_log", &[])
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    client.batch_execute("RESET ROLE").await.unwrap();
    // Nothing in the schema is executable by PUBLIC.
    let public: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pay' AND has_function_privilege('public', p.oid, 'EXECUTE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(public, 0);
}

#[tokio::test]
async fn every_security_definer_function_pins_its_search_path() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let unpinned: Vec<String> = client
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pay' AND p.prosecdef
               AND NOT coalesce(p.proconfig, '{}') @> ARRAY['search_path=pg_catalog, pay, pg_temp']",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(unpinned.is_empty(), "unpinned: {unpinned:?}");
    let definers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pay' AND p.prosecdef",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(definers >= 6);
}

#[tokio::test]
async fn the_audit_log_refuses_update_delete_and_truncate_even_for_its_owner() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    client
        .batch_execute("SELECT pay.begin_checkout('a-1', 100, 'usd')")
        .await
        .unwrap();
    // The test connects as the superuser that owns the table.
    for sql in [
        "UPDATE pay.audit_log SET cause = 'rewritten'",
        "DELETE FROM pay.audit_log",
        "TRUNCATE pay.audit_log",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("42501"), "{sql}");
        assert!(err.as_db_error().unwrap().message().contains("append-only"));
    }
    let rows: i64 = client
        .query_one("SELECT count(*) FROM pay.audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
