//! The binary as an operator meets it: startup checks with exit 2 and the fix in the message,
//! retries of an unreachable database logged at WARN, `status` exit codes and `--json`,
//! `healthcheck`, `--log-format json`, key rules, a 401 from Stripe, and no secret in the
//! output at `RUST_LOG=trace`. Each runs `pgpay-worker` as a child process.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::{checkout, WAIT};
use pgpay_tests::TestDb;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pgpay-worker");
const KEY: &str = "sk_test_startup";

fn worker(args: &[&str], database_url: &str, api_base: &str, key: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("STRIPE_API_BASE", api_base)
        .env("STRIPE_SECRET_KEY", key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("pgpay-worker did not exit in time")
        .unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn port() -> String {
    std::env::var("PGPAY_TEST_PORT").unwrap_or_else(|_| "5432".into())
}

/// A login role granted nothing.
async fn bare_role(db: &TestDb, suffix: &str) -> String {
    let role = format!("{}_{suffix}", db.name());
    db.connect()
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .unwrap();
    role
}

async fn drop_role(db: &TestDb, role: &str) {
    let admin = db.connect().await;
    let _ = admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await;
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_setup_exits_2_with_the_fix() {
    // No extension in the database.
    let empty = TestDb::create_empty().await;
    let (code, _, err) = output(worker(
        &["run"],
        &empty.database_url(),
        "http://127.0.0.1:9",
        KEY,
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("CREATE EXTENSION pgpay in {}", empty.name())),
        "{err}"
    );

    // The released 0.1.0: the worker names both versions and the fix.
    let old = TestDb::create_at(Some("0.1.0")).await;
    let (code, _, err) = output(worker(
        &["run"],
        &old.database_url(),
        "http://127.0.0.1:9",
        KEY,
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is version 0.1.0, but this pgpay-worker works with 0.2.x")
            && err.contains("ALTER EXTENSION pgpay UPDATE"),
        "{err}"
    );
    // reconcile and status refuse it the same way (status: "cannot read", 3).
    let (code, _, err) = output(worker(
        &["reconcile", "--since", "1h"],
        &old.database_url(),
        "http://127.0.0.1:9",
        KEY,
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("version 0.1.0"), "{err}");
    let (code, _, err) = output(worker(
        &["status"],
        &old.database_url(),
        "http://127.0.0.1:9",
        KEY,
    ))
    .await;
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("cannot read the status") && err.contains("version 0.1.0"),
        "{err}"
    );

    // A login role without pay_worker.
    let db = TestDb::create().await;
    let role = bare_role(&db, "nogrant").await;
    let (code, _, err) = output(worker(
        &["run"],
        &db.database_url_as(&role),
        "http://127.0.0.1:9",
        KEY,
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("GRANT pay_worker TO {role}")),
        "{err}"
    );
    drop_role(&db, &role).await;
}

/// Reads stderr lines until one contains all of `needles`; returns the lines read.
async fn stderr_until(child: &mut tokio::process::Child, needles: &[&str]) -> Vec<String> {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let hit = needles.iter().all(|n| line.contains(n));
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(found, "no line with {needles:?} in:\n{}", seen.join("\n"));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_retried_loudly_and_a_bad_scheme_is_named() {
    // A wrong database name: each retry is a WARN line with the reason.
    let url = format!("postgres://postgres@127.0.0.1:{}/pgpay_nonexistent", port());
    let mut child = worker(&["run"], &url, "http://127.0.0.1:9", KEY)
        .spawn()
        .unwrap();
    let lines = stderr_until(&mut child, &["attempt=2", "pgpay_nonexistent"]).await;
    let warns: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("cannot reach the database; retrying"))
        .collect();
    assert!(warns.len() >= 2, "{lines:?}");
    assert!(
        warns.iter().all(|l| l.contains("WARN")
            && l.contains("does not exist")
            && l.contains("check the database name")),
        "{warns:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains('\x1b')),
        "no colour codes off a terminal"
    );
    child.kill().await.unwrap();

    // A wrong port (nothing listens there).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://postgres@127.0.0.1:{dead}/postgres");
    let mut child = worker(&["run"], &url, "http://127.0.0.1:9", KEY)
        .spawn()
        .unwrap();
    stderr_until(&mut child, &["WARN", "is PostgreSQL running", "retrying"]).await;
    child.kill().await.unwrap();

    // postgress:// is an unknown scheme, not "unexpected EOF".
    let (code, _, err) = output(worker(
        &["run"],
        "postgress://postgres:hunter2@127.0.0.1/x",
        "http://127.0.0.1:9",
        KEY,
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown scheme \"postgress\""), "{err}");
    assert!(!err.contains("EOF") && !err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_the_wrong_shape_or_mode_are_refused_without_printing_them() {
    let db = TestDb::create().await;
    for (key, base, needle) in [
        (
            "pk_test_CANARYkey1",
            "http://127.0.0.1:9",
            "publishable key",
        ),
        (
            "whsec_CANARYkey1",
            "http://127.0.0.1:9",
            "pay.add_webhook_secret",
        ),
        (
            "CANARYkey1",
            "http://127.0.0.1:9",
            "must start with sk_test_",
        ),
        (
            "sk_live_CANARYkey1",
            "http://127.0.0.1:9",
            "a live key is only ever sent to https://api.stripe.com",
        ),
    ] {
        for sub in [&["run"][..], &["reconcile", "--since", "1h"]] {
            let (code, out, err) = output(worker(sub, &db.database_url(), base, key)).await;
            assert_eq!(code, Some(2), "{key} {sub:?}: {err}");
            assert!(err.contains(needle), "{key} {sub:?}: {err}");
            assert!(
                !format!("{out}{err}").contains("CANARY"),
                "{key} {sub:?}: {err}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stripe_refuses_stops_reconcile_and_run_at_once() {
    let db = TestDb::create().await;
    let fake = stripe_fake::StripeFake::start(stripe_fake::Config {
        api_key: "sk_test_the_right_one".into(),
        ..stripe_fake::Config::default()
    })
    .await
    .unwrap();
    // reconcile: one 401 and out, exit 2, one message (not "reconciliation failed:" twice).
    let started = std::time::Instant::now();
    let (code, _, err) = output(worker(
        &["reconcile", "--since", "1h"],
        &db.database_url(),
        &fake.base_url(),
        "sk_test_CANARYwrong",
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("Stripe refused the API key (HTTP 401 from http://127.0.0.1"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert!(
        !err.contains("CANARY") && !err.contains("retrying"),
        "{err}"
    );
    assert_eq!(err.matches("reconciliation failed").count(), 0, "{err}");

    // run: the command is handed back untouched (not failed), the worker exits 2.
    let client = db.connect().await;
    let payment = checkout(&client, "wrong-key", 500).await;
    let (code, _, err) = output(worker(
        &["run"],
        &db.database_url(),
        &fake.base_url(),
        "sk_test_CANARYwrong",
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("Stripe refused the API key"), "{err}");
    assert!(!err.contains("CANARY"), "{err}");
    let row = client
        .query_one(
            "SELECT o.status::text, p.status::text FROM pay.outbox o JOIN pay.payments p ON p.id = o.payment_id WHERE p.id = $1::text::uuid",
            &[&payment],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_ne!(row.get::<_, String>(1), "create_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes_json_and_a_wrong_webhook_secret() {
    let db = TestDb::create().await;
    let admin = db.connect().await;
    admin
        .execute(
            "SELECT pay.add_webhook_secret('whsec_status_right_secret', 'primary')",
            &[],
        )
        .await
        .unwrap();
    // 0: nothing needs a human.
    let (code, out, err) = output(worker(&["status", "--json"], &db.database_url(), "", "")).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["report"]["outbox"].is_object(), "{v}");

    // A delivery signed with another secret: rejected with its reason; status exits 1.
    let payload = pgpay_tests::fixtures::event(
        "evt_wrong_secret",
        "payment_intent.created",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
        pgpay_tests::fixtures::payment_intent(
            "pi_x",
            "00000000-0000-0000-0000-000000000000",
            100,
            "usd",
            "requires_payment_method",
        ),
    );
    let header = pgpay_core::signature::sign_header(
        payload.as_bytes(),
        b"whsec_status_WRONG_secret",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    );
    let (status,): (String,) = {
        let r = admin
            .query_one(
                "SELECT status FROM pay.ingest_webhook($1, $2)",
                &[&payload, &header],
            )
            .await
            .unwrap();
        (r.get(0),)
    };
    assert_eq!(status, "rejected");
    let (code, out, err) = output(worker(&["status"], &db.database_url(), "", "")).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("every webhook in the last hour was rejected: is the endpoint secret the one Stripe shows?"),
        "{out}"
    );
    let (code, out, _) = output(worker(&["status", "--json"], &db.database_url(), "", "")).await;
    assert_eq!(code, Some(1));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["problems"][0]
        .as_str()
        .unwrap()
        .contains("every webhook in the last hour was rejected"));

    // 3: the status cannot be read (nothing listens on that port).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, out, err) = output(worker(
        &["status", "--json"],
        &format!("postgres://postgres@127.0.0.1:{dead}/x"),
        "",
        "",
    ))
    .await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("cannot read the status"), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_asks_the_running_worker_or_the_database_and_json_logs_parse() {
    let db = TestDb::create().await;
    let fake = stripe_fake::StripeFake::start(stripe_fake::Config {
        api_key: KEY.into(),
        ..stripe_fake::Config::default()
    })
    .await
    .unwrap();
    // Without HTTP: the database checks.
    let (code, _, err) = output(worker(&["healthcheck"], &db.database_url(), "", "")).await;
    assert_eq!(code, Some(0), "{err}");
    let empty = TestDb::create_empty().await;
    let (code, _, err) = output(worker(&["healthcheck"], &empty.database_url(), "", "")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("CREATE EXTENSION pgpay"), "{err}");

    // With HTTP: the running worker's /readyz. JSON logs meanwhile.
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut run = worker(
        &["--log-format", "json", "run"],
        &db.database_url(),
        &fake.base_url(),
        KEY,
    );
    run.env("PGPAY_WORKER_HTTP_LISTEN", listen.to_string());
    let mut child = run.spawn().unwrap();
    let lines = stderr_until(&mut child, &["listening on pay_outbox"]).await;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "{field} missing in {line}");
        }
    }
    let mut check = worker(&["healthcheck"], "", "", "");
    check.env("PGPAY_WORKER_HTTP_LISTEN", listen.to_string());
    let (code, _, err) = output(check).await;
    assert_eq!(code, Some(0), "{err}");
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let mut check = worker(&["healthcheck"], "", "", "");
    check.env("PGPAY_WORKER_HTTP_LISTEN", listen.to_string());
    let (code, _, err) = output(check).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach the worker"), "{err}");
}
