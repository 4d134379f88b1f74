//! The worker against a real PostgreSQL with the extension and a scripted Stripe stand-in
//! over HTTP on 127.0.0.1: retries with one key, classification, fencing, crashes, lost
//! doorbells, shutdown. Every wait is on a condition with a deadline.

mod common;

use std::time::Duration;

use common::*;
use pgpay_tests::{wait_until, TestDb};
use pgpay_worker::{CancellationToken, Outcome};

fn order_of(rec: &Recorded) -> String {
    let params: Vec<(String, String)> = serde_urlencoded::from_str(&rec.body).unwrap_or_default();
    params
        .into_iter()
        .find(|(k, _)| k == "metadata[order_ref]")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_is_retried_with_the_same_key_until_recorded() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    // Three retryable failures of different kinds, a timeout, then the answer.
    let stripe = ScriptedStripe::start(|_, n| match n {
        0 => Reply::status(500),
        1 => Reply::status(429).header("Retry-After", "0"),
        2 => Reply::status(409),
        3 => Reply::ok().delayed(Duration::from_millis(2500)),
        _ => Reply::ok(),
    })
    .await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();

    let mut payments = Vec::new();
    for i in 0..5 {
        payments.push(checkout(&client, &format!("order-{i}"), 1000 + i).await);
    }
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.payments WHERE stripe_payment_intent_id IS NOT NULL",
            5,
            WAIT
        )
        .await,
        "every payment got its PaymentIntent"
    );
    for p in &payments {
        let (id, key) = create_command(&client, p).await;
        let reqs = stripe.requests_for(&key);
        assert_eq!(reqs.len(), 5, "four failures and one success for {key}");
        for r in &reqs {
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/v1/payment_intents");
            assert_eq!(r.body, reqs[0].body, "the same parameters on every attempt");
            assert_eq!(
                r.authorization.as_deref(),
                Some(&*format!("Bearer {API_KEY}"))
            );
            assert_eq!(r.stripe_version.as_deref(), Some("2024-06-20"));
            assert_eq!(
                r.content_type.as_deref(),
                Some("application/x-www-form-urlencoded")
            );
        }
        assert!(reqs[0].body.contains("metadata%5Bpgpay_payment_id%5D="));
        let row = outbox_row(&client, id).await;
        assert_eq!((row.status.as_str(), row.attempts), ("done", 5));
        let (_, intent) = payment_status(&client, p).await;
        assert_eq!(
            intent.as_deref(),
            payment_intent_for(&reqs[0])["id"].as_str()
        );
    }
    let m = worker.metrics();
    assert_eq!(m.retries("http_5xx"), 5);
    assert_eq!(m.retries("http_429"), 5);
    assert_eq!(m.retries("http_409"), 5);
    assert_eq!(m.retries("timeout"), 5);
    assert_eq!(m.commands("create_payment_intent", Outcome::Completed), 5);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_stop_retries() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::card_declined()).await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    let payment = checkout(&client, "declined", 500).await;
    let (id, _) = create_command(&client, &payment).await;
    assert!(wait_for_status(&client, id, "dead", WAIT).await);
    let row = outbox_row(&client, id).await;
    assert_eq!(row.last_http_status, Some(402));
    assert!(row.last_error.unwrap().contains("declined"));
    assert_eq!(payment_status(&client, &payment).await.0, "create_failed");
    // Several polls later, still exactly one request.
    let polls = worker.metrics().polls();
    assert!(wait_until(WAIT, || async { worker.metrics().polls() >= polls + 3 }).await);
    assert_eq!(stripe.count(), 1);
    assert_eq!(worker.metrics().commands_with(Outcome::Failed), 1);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_should_retry_wins_over_the_status() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|rec, n| match (order_of(rec).as_str(), n) {
        // A 400 Stripe says to retry: retried.
        ("retry-400", 0) => Reply::status(400).header("Stripe-Should-Retry", "true"),
        // A 503 Stripe says not to retry: permanent.
        ("final-503", _) => Reply::status(503).header("Stripe-Should-Retry", "false"),
        _ => Reply::ok(),
    })
    .await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    let retried = checkout(&client, "retry-400", 700).await;
    let final_ = checkout(&client, "final-503", 700).await;
    let (retried_id, retried_key) = create_command(&client, &retried).await;
    let (final_id, final_key) = create_command(&client, &final_).await;
    assert!(wait_for_status(&client, retried_id, "done", WAIT).await);
    assert!(wait_for_status(&client, final_id, "dead", WAIT).await);
    assert_eq!(stripe.requests_for(&retried_key).len(), 2);
    assert_eq!(stripe.requests_for(&final_key).len(), 1);
    assert_eq!(worker.metrics().retries("should_retry"), 1);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, n| match n {
        0 => Reply::status(429).header("Retry-After", "1"),
        _ => Reply::ok(),
    })
    .await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    let payment = checkout(&client, "slow-down", 900).await;
    let (id, key) = create_command(&client, &payment).await;
    assert!(wait_for_status(&client, id, "done", WAIT).await);
    let reqs = stripe.requests_for(&key);
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at - reqs[0].at;
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_alone_delivers_when_no_notification_arrives() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.listen_for_notifications = false;
    cfg.poll_interval = Duration::from_millis(300);
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    for i in 0..3 {
        checkout(&client, &format!("poll-{i}"), 100 + i).await;
    }
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'done'",
            3,
            WAIT
        )
        .await
    );
    assert_eq!(worker.metrics().notifications(), 0);
    assert!(worker.metrics().polls() >= 1);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doorbell_that_rang_too_early_is_covered_by_the_poll() {
    init_tracing();
    let db = TestDb::create().await;
    let mut client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.poll_interval = Duration::from_millis(400);
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert!(wait_until(WAIT, || async { worker.metrics().listener_is_connected() }).await);

    // The NOTIFY arrives at commit, but the command is not due yet: the claim it triggers
    // finds nothing, and only a later poll can pick the command up.
    let tx = client.transaction().await.unwrap();
    let payment: String = tx
        .query_one(
            "SELECT id::text FROM pay.begin_checkout('early', 500, 'usd')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.execute(
        "UPDATE pay.outbox SET run_after = now() + interval '1 second' WHERE payment_id = $1::text::uuid",
        &[&payment],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (id, _) = create_command(&client, &payment).await;
    assert!(wait_until(WAIT, || async { worker.metrics().notifications() >= 1 }).await);
    let polls_at_notification = worker.metrics().polls();
    assert!(wait_for_status(&client, id, "done", WAIT).await);
    assert!(worker.metrics().polls() > polls_at_notification);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_the_worker_without_waiting_for_the_poll() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.poll_interval = Duration::from_secs(3600);
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert!(wait_until(WAIT, || async { worker.metrics().listener_is_connected() }).await);
    let payment = checkout(&client, "rung", 500).await;
    let (id, _) = create_command(&client, &payment).await;
    assert!(wait_for_status(&client, id, "done", Duration::from_secs(5)).await);
    assert!(worker.metrics().notifications() >= 1);
    assert_eq!(worker.metrics().polls(), 1, "only the poll at start");

    // Kill the LISTEN connection: the worker reconnects, looks at once, and keeps
    // answering doorbells, still without a periodic poll.
    let killed = count(
        &client,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'pgpay-worker listener' AND datname = current_database()",
    )
    .await;
    assert_eq!(killed, 1);
    let during_outage = checkout(&client, "during-outage", 600).await;
    assert!(
        wait_until(WAIT, || async {
            worker.metrics().listener_connections() >= 2
        })
        .await
    );
    let after = checkout(&client, "after-reconnect", 700).await;
    for p in [during_outage, after] {
        let (id, _) = create_command(&client, &p).await;
        assert!(wait_for_status(&client, id, "done", Duration::from_secs(5)).await);
    }
    assert_eq!(worker.metrics().polls(), 1);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_never_send_one_command_concurrently() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|rec, n| {
        let slow = Duration::from_millis(20 + (rec.body.len() as u64 % 5) * 10);
        if n == 0 && rec.body.len() % 2 == 0 {
            Reply::status(502).delayed(slow)
        } else {
            Reply::ok().delayed(slow)
        }
    })
    .await;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut cfg = config(&db, &stripe.base_url());
        cfg.concurrency = 4;
        cfg.batch_size = 3;
        cfg.poll_interval = Duration::from_millis(50);
        workers.push(
            pgpay_worker::start(cfg, CancellationToken::new())
                .await
                .unwrap(),
        );
    }
    for i in 0..30 {
        checkout(&client, &format!("race-{i}"), 1000 + i).await;
    }
    assert!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'done'",
            30,
            WAIT
        )
        .await
    );
    assert_eq!(
        stripe.max_concurrent_per_key(),
        1,
        "one key was sent twice at once"
    );
    let keys: std::collections::HashSet<_> = stripe
        .requests()
        .into_iter()
        .filter_map(|r| r.key)
        .collect();
    assert_eq!(keys.len(), 30);
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT stripe_payment_intent_id) FROM pay.payments"
        )
        .await,
        30
    );
    let fenced: u64 = workers
        .iter()
        .map(|w| w.metrics().fenced_completions())
        .sum();
    assert_eq!(fenced, 0);
    for w in workers {
        w.shutdown();
        w.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_command_is_reclaimed_after_the_lease_with_the_same_key() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    // The first attempt never gets an answer (the worker dies while waiting).
    let stripe =
        ScriptedStripe::start(|_, n| if n == 0 { Reply::hang() } else { Reply::ok() }).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.lease = Duration::from_secs(5);
    cfg.stripe.request_timeout = Duration::from_secs(1);
    cfg.stripe.connect_timeout = Duration::from_millis(500);
    let crashing = pgpay_worker::start(cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let crashed_id = crashing.worker_id().to_owned();
    let payment = checkout(&client, "crash", 1234).await;
    let (id, key) = create_command(&client, &payment).await;
    assert!(stripe.wait_for_requests(1, WAIT).await);
    crashing.abort().await;
    stripe.release_held();
    let row = outbox_row(&client, id).await;
    assert_eq!(row.status, "in_flight");
    assert_eq!(row.lease_owner.as_deref(), Some(crashed_id.as_str()));

    cfg.worker_id = format!("{crashed_id}-rescuer");
    let rescuer = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert!(wait_for_status(&client, id, "done", WAIT).await);
    let reqs = stripe.requests_for(&key);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body, reqs[1].body);
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_secs(4),
        "not before the lease ran out"
    );
    assert_eq!(outbox_row(&client, id).await.attempts, 2);
    rescuer.shutdown();
    rescuer.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_process_leaves_its_command_to_be_resent_with_the_same_key() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe =
        ScriptedStripe::start(|_, n| if n == 0 { Reply::hang() } else { Reply::ok() }).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgpay-worker"))
        .arg("run")
        .env_clear()
        .env("DATABASE_URL", db.database_url())
        .env("STRIPE_SECRET_KEY", API_KEY)
        .env("STRIPE_API_BASE", stripe.base_url())
        .env("PGPAY_WORKER_LEASE", "5s")
        .env("PGPAY_WORKER_REQUEST_TIMEOUT", "1s")
        .env("PGPAY_WORKER_CONNECT_TIMEOUT", "500ms")
        .env("PGPAY_WORKER_POLL_INTERVAL", "200ms")
        .env("PGPAY_WORKER_ID", "doomed-process")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the pgpay-worker binary");
    let payment = checkout(&client, "sigkill", 4321).await;
    let (id, key) = create_command(&client, &payment).await;
    let seen = stripe.wait_for_requests(1, WAIT).await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert!(seen, "the child process sent the command");
    stripe.release_held();
    assert_eq!(
        outbox_row(&client, id).await.lease_owner.as_deref(),
        Some("doomed-process")
    );

    let mut cfg = config(&db, &stripe.base_url());
    cfg.lease = Duration::from_secs(5);
    cfg.stripe.request_timeout = Duration::from_secs(1);
    cfg.stripe.connect_timeout = Duration::from_millis(500);
    let rescuer = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert!(wait_for_status(&client, id, "done", WAIT).await);
    let reqs = stripe.requests_for(&key);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body, reqs[1].body);
    assert_eq!(outbox_row(&client, id).await.attempts, 2);
    rescuer.shutdown();
    rescuer.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_cannot_overwrite_a_newer_attempt() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::hang()).await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    let payment = checkout(&client, "stale", 800).await;
    let (id, _) = create_command(&client, &payment).await;
    assert!(stripe.wait_for_requests(1, WAIT).await);

    // While the worker waits for Stripe, its lease is taken over (as if it had stalled
    // past the lease): a newer attempt now owns the command. One transaction, so the worker's
    // own poll (SKIP LOCKED) cannot reclaim the expired lease before the thief does.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "UPDATE pay.outbox SET lease_expires = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let taken: i32 = client
        .query_one(
            "SELECT attempts FROM pay.claim_outbox('thief', 1, interval '60 seconds')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(taken, 2);
    stripe.release_held();
    assert!(
        wait_until(WAIT, || async {
            worker.metrics().fenced_completions() == 1
        })
        .await
    );
    let row = outbox_row(&client, id).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.attempts,
            row.lease_owner.as_deref()
        ),
        ("in_flight", 2, Some("thief"))
    );
    assert_eq!(
        payment_status(&client, &payment).await.1,
        None,
        "the stale answer changed nothing"
    );
    assert_eq!(worker.metrics().commands_with(Outcome::Fenced), 1);
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_command_is_failed_and_the_worker_carries_on() {
    init_tracing();
    let db = TestDb::create().await;
    let mut client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    let mut broken = Vec::new();
    for (order, patch) in [
        ("bad-method", "jsonb_set(request, '{method}', '\"PATCH\"')"),
        (
            "bad-params",
            "jsonb_set(request, '{params,metadata}', '{\"nested\": \"object\"}')",
        ),
        (
            "bad-path",
            "jsonb_set(request, '{path}', '\"//evil.example/v1\"')",
        ),
    ] {
        let tx = client.transaction().await.unwrap();
        let payment: String = tx
            .query_one(
                "SELECT id::text FROM pay.begin_checkout($1, 500, 'usd')",
                &[&order],
            )
            .await
            .unwrap()
            .get(0);
        tx.execute(
            &format!("UPDATE pay.outbox SET request = {patch} WHERE payment_id = $1::text::uuid"),
            &[&payment],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        broken.push(payment);
    }
    let good = checkout(&client, "good", 500).await;
    let (good_id, _) = create_command(&client, &good).await;
    assert!(wait_for_status(&client, good_id, "done", WAIT).await);
    for (payment, expect) in broken.iter().zip([
        "unknown request.method",
        "params must be flat",
        "request.path",
    ]) {
        let (id, _) = create_command(&client, payment).await;
        assert!(wait_for_status(&client, id, "dead", WAIT).await);
        let row = outbox_row(&client, id).await;
        assert!(
            row.last_error.as_deref().unwrap_or("").contains(expect),
            "{row:?}"
        );
        assert_eq!(row.last_http_status, None);
        assert_eq!(payment_status(&client, payment).await.0, "create_failed");
    }
    assert_eq!(stripe.count(), 1, "only the good command reached Stripe");
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_unsent_commands_and_abandons_stuck_requests() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::hang()).await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.concurrency = 6;
    // One request per 10 s: after the first, the others wait for the rate limiter.
    cfg.rate_limit = 0.1;
    cfg.shutdown_timeout = Duration::from_millis(300);
    cfg.lease = Duration::from_secs(60);
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    for i in 0..6 {
        checkout(&client, &format!("shutdown-{i}"), 100 + i).await;
    }
    assert!(wait_until(WAIT, || async { worker.metrics().claimed() == 6 }).await);
    assert!(stripe.wait_for_requests(1, WAIT).await);
    worker.shutdown();
    worker.wait().await.unwrap();
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'in_flight'"
        )
        .await,
        0,
        "nothing left in flight"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'pending' AND last_error = 'released at shutdown' AND run_after <= now()"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pay.outbox WHERE status = 'pending' AND last_error = 'abandoned at shutdown while in flight'"
        )
        .await,
        1
    );
    assert_eq!(stripe.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe =
        ScriptedStripe::start(|_, _| Reply::ok().delayed(Duration::from_millis(700))).await;
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    let payment = checkout(&client, "drain", 100).await;
    let (id, _) = create_command(&client, &payment).await;
    assert!(stripe.wait_for_requests(1, WAIT).await);
    worker.shutdown();
    worker.wait().await.unwrap();
    assert_eq!(outbox_row(&client, id).await.status, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_comes_due_without_waiting_for_the_poll() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, n| {
        if n < 2 {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut cfg = config(&db, &stripe.base_url());
    cfg.poll_interval = Duration::from_secs(3600);
    let worker = pgpay_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert!(wait_until(WAIT, || async { worker.metrics().listener_is_connected() }).await);
    let payment = checkout(&client, "retry-soon", 500).await;
    let (id, key) = create_command(&client, &payment).await;
    assert!(wait_for_status(&client, id, "done", Duration::from_secs(5)).await);
    assert_eq!(stripe.requests_for(&key).len(), 3);
    assert_eq!(worker.metrics().polls(), 1, "only the poll at start");
    worker.shutdown();
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_command_goes_out_with_its_key_and_parameters_in_the_query() {
    init_tracing();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let stripe = ScriptedStripe::start(|_, _| Reply::status(400)).await;
    let payment = checkout(&client, "delete-1", 1000).await;
    let (id, key) = create_command(&client, &payment).await;
    // A DELETE as `cancel_subscription` (immediately) writes it: path, query parameters, key.
    client
        .execute(
            "UPDATE pay.outbox SET request = jsonb_build_object('method', 'DELETE',
                 'path', '/v1/subscriptions/sub_1', 'params', jsonb_build_object('prorate', 'false'))
             WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let worker = pgpay_worker::start(config(&db, &stripe.base_url()), CancellationToken::new())
        .await
        .unwrap();
    assert!(stripe.wait_for_requests(1, WAIT).await);
    let reqs = stripe.requests_for(&key);
    assert_eq!(reqs.len(), 1, "{:?}", stripe.requests());
    let r = &reqs[0];
    assert_eq!(r.method, "DELETE");
    assert_eq!(r.path, "/v1/subscriptions/sub_1");
    assert_eq!(r.query.as_deref(), Some("prorate=false"));
    assert_eq!(r.body, "");
    assert_eq!(r.content_type, None);
    assert!(common::wait_for_status(&client, id, "dead", WAIT).await);
    worker.shutdown();
    worker.wait().await.unwrap();
}
