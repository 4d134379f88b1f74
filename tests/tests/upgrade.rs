//! Upgrades: a database created at the released 0.1.0 and used through the 0.1.0 API is updated
//! with `ALTER EXTENSION pgpay UPDATE`; its `pay` schema then equals a fresh install's, every row
//! survived, and the whole loop keeps working. Also: a plain `pg_dump` backup carries the payment
//! data (the extension's tables are registered with `pg_extension_config_dump`).

use std::process::Command;

use pgpay_tests::stripe_sdk::sign_now;
use pgpay_tests::{count, fixtures, pg_program, TestDb};
use tokio_postgres::Client;
use uuid::Uuid;

const RELEASED: &str = "0.1.0";
const SECRET: &str = "whsec_test_upgrade_0123456789";

/// The schema as `pg_dump --binary-upgrade` writes it (the only mode that dumps an extension's
/// member objects), without the lines that carry OIDs or a random token, and the extension's
/// list of dumped configuration tables.
async fn schema_of(db: &TestDb) -> String {
    let output = Command::new(pg_program("pg_dump"))
        .args([
            "--schema-only",
            "--binary-upgrade",
            "--no-comments",
            "--dbname",
        ])
        .arg(db.url())
        .output()
        .expect("pg_dump runs");
    assert!(
        output.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump = String::from_utf8(output.stdout).expect("UTF-8 dump");
    // Statements are separated by blank lines; the binary-upgrade ones pin OIDs and xids.
    let mut kept: Vec<&str> = dump
        .split("\n\n")
        .filter(|block| !(block.contains("binary_upgrade") || block.contains("relfrozenxid")))
        .flat_map(str::lines)
        .filter(|line| {
            // Sequence positions are data, not schema.
            !(line.starts_with("--")
                || line.starts_with("SELECT pg_catalog.setval(")
                || line.starts_with("\\restrict")
                || line.starts_with("\\unrestrict")
                || line.trim().is_empty())
        })
        .collect();
    let client = db.connect().await;
    let config: String = client
        .query_one(
            "SELECT coalesce(array_to_string(ARRAY(
                 SELECT c::regclass::text || ' ' || coalesce(cond, '')
                 FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(c, cond)
                 WHERE e.extname = 'pgpay' ORDER BY 1), E'\\n'), '')",
            &[],
        )
        .await
        .expect("extconfig")
        .get(0);
    kept.push("-- configuration tables dumped with the data:");
    kept.extend(config.lines());
    kept.join("\n")
}

/// Writes through the 0.1.0 API what a live installation has: a paid and fulfilled payment with
/// its webhook and audit trail, a refund command, an open checkout and a rejected delivery.
async fn use_the_released_api(client: &Client) -> Uuid {
    client
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .expect("add_webhook_secret");
    let paid: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout('order-paid', 2500, 'eur')",
            &[],
        )
        .await
        .expect("begin_checkout")
        .get(0);
    // The worker's part through the 0.1.0 API too: the one command there is, claimed and answered.
    let claimed = client
        .query_one(
            "SELECT id, attempts FROM pay.claim_outbox('upgrade-worker', 1)",
            &[],
        )
        .await
        .expect("claim_outbox");
    let (command, attempt): (i64, i32) = (claimed.get(0), claimed.get(1));
    let created = fixtures::payment_intent(
        "pi_upgrade_paid",
        &paid.to_string(),
        2500,
        "eur",
        "requires_payment_method",
    );
    let completed: bool = client
        .query_one(
            "SELECT pay.complete_outbox($1, $2, 200, $3)",
            &[&command, &attempt, &created],
        )
        .await
        .expect("complete_outbox")
        .get(0);
    assert!(completed);
    let succeeded = fixtures::payment_intent(
        "pi_upgrade_paid",
        &paid.to_string(),
        2500,
        "eur",
        "succeeded",
    );
    let event = fixtures::event(
        "evt_upgrade_paid",
        "payment_intent.succeeded",
        1_700_000_100,
        succeeded,
    );
    let status: String = client
        .query_one(
            "SELECT status FROM pay.ingest_webhook($1, $2)",
            &[&event, &sign_now(&event, SECRET)],
        )
        .await
        .expect("ingest")
        .get(0);
    assert_eq!(status, "applied");
    client
        .query("SELECT * FROM pay.claim_fulfillments('shop', 10)", &[])
        .await
        .expect("claim_fulfillments");
    client
        .execute("SELECT pay.complete_fulfillment($1)", &[&paid])
        .await
        .expect("complete_fulfillment");
    client
        .execute(
            "SELECT pay.refund($1, 500, 'requested_by_customer')",
            &[&paid],
        )
        .await
        .expect("refund");
    client
        .query_one(
            "SELECT id FROM pay.begin_checkout('order-open', 990, 'usd')",
            &[],
        )
        .await
        .expect("a second checkout");
    let rejected: String = client
        .query_one(
            "SELECT status FROM pay.ingest_webhook('{}', 't=1,v1=00')",
            &[],
        )
        .await
        .expect("a rejected delivery")
        .get(0);
    assert_eq!(rejected, "rejected");
    paid
}

/// What must survive an upgrade, row for row (columns that exist in both versions).
async fn rows_of(client: &Client) -> Vec<String> {
    let queries = [
        "SELECT id::text || status::text || amount || currency || coalesce(stripe_payment_intent_id, '')
         FROM pay.payments ORDER BY id",
        "SELECT id || kind || idempotency_key || status FROM pay.outbox ORDER BY id",
        "SELECT id || payment_id::text || coalesce(from_status::text, '') || to_status::text || cause
         FROM pay.audit_log ORDER BY id",
        "SELECT event_id || type || md5(payload) || outcome FROM pay.webhook_events ORDER BY event_id",
        "SELECT payment_id::text || (completed_at IS NOT NULL) FROM pay.fulfillments ORDER BY payment_id",
        "SELECT label FROM pay.webhook_secret_labels ORDER BY label",
    ];
    let mut rows = Vec::new();
    for query in queries {
        for row in client
            .query(query, &[])
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
        {
            rows.push(row.get::<_, String>(0));
        }
    }
    rows
}

#[tokio::test]
async fn an_upgraded_database_equals_a_fresh_install_and_keeps_every_row() {
    // The fresh install first: the released 0.1.0 script creates the pay_* roles without
    // guarding against another database creating them at the same moment (0.2.0 does).
    let fresh = TestDb::create().await;
    let old = TestDb::create_at(Some(RELEASED)).await;
    let client = old.connect().await;
    let version: String = client
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, RELEASED);
    let paid = use_the_released_api(&client).await;
    let before = rows_of(&client).await;

    client
        .batch_execute("ALTER EXTENSION pgpay UPDATE")
        .await
        .expect("ALTER EXTENSION pgpay UPDATE");
    let upgraded_to: String = client
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgpay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(upgraded_to, RELEASED);

    let (upgraded_schema, fresh_schema) = (schema_of(&old).await, schema_of(&fresh).await);
    if upgraded_schema != fresh_schema {
        let upgraded: Vec<&str> = upgraded_schema.lines().collect();
        let fresh: Vec<&str> = fresh_schema.lines().collect();
        let only_upgraded: Vec<&&str> = upgraded.iter().filter(|l| !fresh.contains(l)).collect();
        let only_fresh: Vec<&&str> = fresh.iter().filter(|l| !upgraded.contains(l)).collect();
        panic!(
            "the upgraded schema differs from a fresh {upgraded_to} install\n\
             only after the upgrade: {only_upgraded:#?}\nonly in a fresh install: {only_fresh:#?}\n\
             (same lines in another order when both lists are empty)"
        );
    }

    assert_eq!(
        rows_of(&client).await,
        before,
        "every row survives the upgrade"
    );

    // The whole loop on the upgraded database: the queued refund goes out, a new order pays.
    let order: Uuid = client
        .query_one(
            "SELECT id FROM pay.begin_checkout('order-after', 1200, 'usd')",
            &[],
        )
        .await
        .expect("begin_checkout after the upgrade")
        .get(0);
    assert!(
        fixtures::answer_create(
            &client,
            order,
            "pi_upgrade_after",
            "requires_payment_method"
        )
        .await
    );
    let intent = fixtures::payment_intent(
        "pi_upgrade_after",
        &order.to_string(),
        1200,
        "usd",
        "succeeded",
    );
    let event = fixtures::event(
        "evt_upgrade_after",
        "payment_intent.succeeded",
        1_700_000_200,
        intent,
    );
    let status: String = client
        .query_one(
            "SELECT status FROM pay.ingest_webhook($1, $2)",
            &[&event, &sign_now(&event, SECRET)],
        )
        .await
        .expect("ingest after the upgrade")
        .get(0);
    assert_eq!(
        status, "applied",
        "the secret added at 0.1.0 still verifies"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.fulfillments WHERE completed_at IS NULL"
        )
        .await,
        1,
        "the new success is fulfilled once, the old one stays completed"
    );
    let refunds_pending = count(
        &client,
        &format!(
            "SELECT count(*) FROM pay.outbox WHERE payment_id = '{paid}' AND kind = 'refund' AND status = 'pending'"
        ),
    )
    .await;
    assert_eq!(
        refunds_pending, 1,
        "the refund queued at 0.1.0 is still due"
    );
}

#[tokio::test]
async fn a_plain_pg_dump_backup_restores_the_payments() {
    let source = TestDb::create().await;
    let client = source.connect().await;
    use_the_released_api(&client).await;
    let before = rows_of(&client).await;

    let dump = Command::new(pg_program("pg_dump"))
        .args(["--format=custom", "--dbname"])
        .arg(source.url())
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&dump.stderr)
    );

    let target = TestDb::create_empty().await;
    let mut restore = Command::new(pg_program("pg_restore"))
        .args(["--exit-on-error", "--single-transaction", "--dbname"])
        .arg(target.url())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pg_restore runs");
    {
        use std::io::Write;
        restore
            .stdin
            .take()
            .expect("stdin")
            .write_all(&dump.stdout)
            .expect("feed pg_restore");
    }
    let restored = restore.wait_with_output().expect("pg_restore ends");
    assert!(
        restored.status.success(),
        "pg_restore failed: {}",
        String::from_utf8_lossy(&restored.stderr)
    );

    let restored_client = target.connect().await;
    let mut after = rows_of(&restored_client).await;
    // Webhook secrets are deliberately left out of backups: a dump file is no place for them.
    let mut expected = before.clone();
    expected.retain(|row| row != "primary");
    after.retain(|row| row != "primary");
    assert_eq!(
        after, expected,
        "every payment, command, audit row and event is restored"
    );
    assert_eq!(
        count(
            &restored_client,
            "SELECT count(*) FROM pay.webhook_secret_labels"
        )
        .await,
        0,
        "no webhook secret travels in a backup"
    );
    // Sequences come back too: a new checkout after the restore gets fresh ids.
    restored_client
        .query_one(
            "SELECT id FROM pay.begin_checkout('order-restored', 700, 'usd')",
            &[],
        )
        .await
        .expect("begin_checkout after a restore");
}
