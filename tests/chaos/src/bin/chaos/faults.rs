//! The fault schedule: every 1–3.5 s (drawn from the seed) one more fault, running beside those
//! still under way, so faults combine: workers SIGKILLed and restarted, PostgreSQL stopped in
//! immediate mode and restarted, connections reset, stripe-fake answering 500, 429, slowly
//! (409s follow: a key still in flight), or dropping its answer after committing, webhook
//! deliveries duplicated, reordered, delayed, dropped (and redelivered later), or aimed at another
//! worker's relay.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::RngExt;
use stripe_fake::{DeliveryOptionsPatch, FaultAction, FaultRule};
use tokio::task::JoinSet;

use crate::{clean_delivery, connect, Ctx, Phase};

static PG_DOWN: AtomicBool = AtomicBool::new(false);

const PATHS: [&str; 6] = [
    "/v1/payment_intents",
    "/v1/payment_intents/*",
    "/v1/checkout/sessions",
    "/v1/checkout/sessions/*",
    "/v1/refunds",
    "*",
];

pub async fn schedule(ctx: Arc<Ctx>, mut rng: StdRng) {
    let mut running = JoinSet::new();
    let n = ctx.workers.lock().await.count();
    while ctx.phase() == Phase::Chaos {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3500))).await;
        if ctx.phase() != Phase::Chaos {
            break;
        }
        let ctx = ctx.clone();
        match rng.random_range(0..20) {
            0..=3 => {
                let i = rng.random_range(0..n);
                let down = Duration::from_millis(rng.random_range(100..2500));
                running.spawn(kill_worker(ctx, i, down));
            }
            4..=5 => {
                let down = Duration::from_millis(rng.random_range(300..3000));
                running.spawn(crash_postgres(ctx, down));
            }
            6..=7 => {
                let share = rng.random_range(0.2..0.8);
                let pick = rng.random::<u64>();
                running.spawn(reset_connections(ctx, share, pick));
            }
            8..=12 => {
                let action = rng.random_range(0..6);
                let path = PATHS[rng.random_range(0..PATHS.len())];
                let times = rng.random_range(1..=5);
                let latency = rng.random_range(200..1500);
                stripe_fault(&ctx, action, path, times, latency);
            }
            13..=18 => {
                let what = rng.random_range(0..5);
                let value = rng.random_range(1..=8u32);
                let lasting = Duration::from_millis(rng.random_range(1000..6000));
                running.spawn(delivery_fault(ctx, what, value, lasting));
            }
            _ => {
                let i = rng.random_range(0..n);
                retarget(&ctx, i).await;
            }
        }
    }
    while running.join_next().await.is_some() {}
}

async fn kill_worker(ctx: Arc<Ctx>, i: usize, down: Duration) {
    let pid = ctx.workers.lock().await.kill(i).await;
    let Some(pid) = pid else {
        return;
    };
    ctx.fault(
        "worker SIGKILL",
        format!("worker {i} (pid {pid}), restart in {} ms", down.as_millis()),
    );
    tokio::time::sleep(down).await;
    if let Err(e) = ctx.workers.lock().await.spawn(i) {
        ctx.say(format!("worker {i} did not restart: {e}"));
    }
}

async fn crash_postgres(ctx: Arc<Ctx>, down: Duration) {
    if PG_DOWN.swap(true, Ordering::SeqCst) {
        return;
    }
    let stopping = ctx.clone();
    match tokio::task::spawn_blocking(move || stopping.cluster.stop_immediate()).await {
        Ok(Ok(())) => ctx.fault(
            "PostgreSQL immediate stop",
            format!("down for {} ms, then crash recovery", down.as_millis()),
        ),
        Ok(Err(e)) => ctx.say(format!("PostgreSQL did not stop: {e}")),
        Err(e) => ctx.say(format!("PostgreSQL did not stop: {e}")),
    }
    tokio::time::sleep(down).await;
    let starting = ctx.clone();
    match tokio::task::spawn_blocking(move || starting.cluster.start()).await {
        Ok(Ok(())) => ctx.say("PostgreSQL back"),
        Ok(Err(e)) => ctx.say(format!("PostgreSQL did not start: {e}")),
        Err(e) => ctx.say(format!("PostgreSQL did not start: {e}")),
    }
    PG_DOWN.store(false, Ordering::SeqCst);
}

/// Terminates a share of the workers' and the application's backends.
async fn reset_connections(ctx: Arc<Ctx>, share: f64, pick: u64) {
    let Ok(admin) = connect(&ctx.admin_url()).await else {
        return;
    };
    let Ok(rows) = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = 'chaos'
             AND usename IN ('chaos_worker', 'chaos_app') ORDER BY pid",
            &[],
        )
        .await
    else {
        return;
    };
    let mut rng: StdRng = rand::SeedableRng::seed_from_u64(pick);
    let mut killed = 0;
    for row in rows {
        let pid: i32 = row.get(0);
        if rng.random_bool(share)
            && admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .is_ok()
        {
            killed += 1;
        }
    }
    ctx.fault("connections reset", format!("{killed} backends terminated"));
}

fn stripe_fault(ctx: &Ctx, action: u32, path: &str, times: u32, latency_ms: u64) {
    let (kind, rule) = match action {
        0 => (
            "stripe drops its answer after commit",
            FaultRule::new("POST", path, FaultAction::DropResponseAfterCommit),
        ),
        1 => (
            "stripe 500",
            FaultRule::new("POST", path, FaultAction::FailBeforeCommit),
        ),
        2 => (
            "stripe 429",
            FaultRule::new("*", path, FaultAction::RateLimit).retry_after_secs(1),
        ),
        3 => (
            "stripe latency",
            FaultRule::new("*", path, FaultAction::Latency).latency_ms(latency_ms),
        ),
        4 => (
            // Longer than the worker's request timeout: its retry finds the key in flight (409).
            "stripe latency past the timeout (409s)",
            FaultRule::new("POST", path, FaultAction::Latency).latency_ms(4_500),
        ),
        _ => (
            "stripe resets the connection",
            FaultRule::new("*", path, FaultAction::ResetConnection),
        ),
    };
    match ctx.fake.add_fault(rule.times(times)) {
        Ok(_) => ctx.fault(kind, format!("{path}, next {times} requests")),
        Err(e) => ctx.say(format!("fault rule refused: {e}")),
    }
}

async fn delivery_fault(ctx: Arc<Ctx>, what: u32, value: u32, lasting: Duration) {
    let (kind, detail, on, off) = match what {
        0 => (
            "webhooks duplicated",
            format!("{} extra copies", value.min(3)),
            DeliveryOptionsPatch {
                duplicate: Some(value.min(3)),
                ..Default::default()
            },
            DeliveryOptionsPatch {
                duplicate: Some(0),
                ..Default::default()
            },
        ),
        1 => (
            "webhooks reordered",
            format!("windows of {}", value + 1),
            DeliveryOptionsPatch {
                reorder_window: Some(value as usize + 1),
                ..Default::default()
            },
            DeliveryOptionsPatch {
                reorder_window: Some(0),
                ..Default::default()
            },
        ),
        2 => (
            "webhooks delayed",
            format!("{} ms each", value * 400),
            DeliveryOptionsPatch {
                delay_ms: Some(u64::from(value) * 400),
                ..Default::default()
            },
            DeliveryOptionsPatch {
                delay_ms: Some(0),
                ..Default::default()
            },
        ),
        3 => (
            "webhooks dropped (redelivered later)",
            format!("each with probability {:.1}", f64::from(value) / 10.0),
            DeliveryOptionsPatch {
                drop_probability: Some(f64::from(value) / 10.0),
                ..Default::default()
            },
            DeliveryOptionsPatch {
                drop_probability: Some(0.0),
                ..Default::default()
            },
        ),
        _ => (
            "next webhooks dropped (redelivered later)",
            format!("the next {value}"),
            DeliveryOptionsPatch {
                drop_next: Some(value),
                ..Default::default()
            },
            DeliveryOptionsPatch::default(),
        ),
    };
    if let Err(e) = ctx.fake.update_webhook_options(on) {
        ctx.say(format!("delivery option refused: {e}"));
        return;
    }
    ctx.fault(kind, format!("{detail} for {} ms", lasting.as_millis()));
    tokio::time::sleep(lasting).await;
    let _ = ctx.fake.update_webhook_options(off);
}

async fn retarget(ctx: &Ctx, i: usize) {
    let url = ctx.workers.lock().await.relay_url(i);
    match ctx.fake.set_webhook(url, ctx.secret.clone()) {
        Ok(()) => ctx.fault("webhooks aimed at another relay", format!("worker {i}")),
        Err(e) => ctx.say(format!("webhook endpoint refused: {e}")),
    }
}

/// Every fault off: no fault rules, clean deliveries, PostgreSQL up, every worker running.
pub async fn all_off(ctx: &Ctx) -> Result<(), String> {
    ctx.fake.clear_faults();
    ctx.fake
        .set_webhook_options(clean_delivery())
        .map_err(|e| e.to_string())?;
    if connect(&ctx.admin_url()).await.is_err() {
        ctx.cluster.start()?;
    }
    let mut workers = ctx.workers.lock().await;
    for i in 0..workers.count() {
        workers.spawn(i)?;
    }
    Ok(())
}
