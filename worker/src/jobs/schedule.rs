//! The schedules inside `run`: reconciliation every `--reconcile-every` (one replica at a
//! time, by the SQL run lease), the refresh of stuck payments every `--refresh-stuck-every`
//! and the anomaly check every 30 seconds. The first two share the dispatcher's Stripe client
//! and rate limiter, so together they stay under the limit; all stop at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::anomalies::{self, ANOMALY_EVERY};
use super::reconcile::{self, ReconcileOptions, Started};
use super::refresh::refresh_stuck;
use super::{connect, JobError};
use crate::error_chain::ErrorChain;
use crate::metrics::StripePhase;
use crate::shared::Shared;
use crate::stripe::{ReadError, StripeReader};

/// Stuck payments refreshed per round (each is one GET).
const REFRESH_BATCH: i64 = 100;

fn ticker(every: Option<Duration>) -> Option<tokio::time::Interval> {
    every.map(|d| {
        let mut i = tokio::time::interval(d);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    })
}

async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let cfg = &shared.cfg;
    let mut reconcile_tick = ticker(cfg.reconcile_every);
    let mut refresh_tick = ticker(cfg.refresh_stuck_every);
    // The first check one period after start: a worker that just started has seen nothing.
    let mut anomaly_tick = Some(tokio::time::interval_at(
        tokio::time::Instant::now() + ANOMALY_EVERY,
        ANOMALY_EVERY,
    ));
    if let Some(t) = anomaly_tick.as_mut() {
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick(&mut reconcile_tick) => scheduled_reconcile(&shared, &cancel).await,
            _ = tick(&mut refresh_tick) => refresh(&shared, &cancel).await,
            _ = tick(&mut anomaly_tick) => check_anomalies(&shared).await,
        }
    }
    debug!("schedule stopped");
}

/// A reader over the dispatcher's client and rate limit, its requests counted under `phase`.
fn reader<'a>(
    shared: &'a Shared,
    cancel: &'a CancellationToken,
    phase: StripePhase,
) -> StripeReader<'a> {
    StripeReader::new(&shared.stripe, &shared.limiter, &shared.cfg.retry, cancel)
        .counted(&shared.metrics, phase)
}

async fn scheduled_reconcile(shared: &Shared, cancel: &CancellationToken) {
    let result = async {
        let client = connect(&shared.cfg.database, "pgpay-worker reconcile").await?;
        reconcile::reconcile(
            &client,
            &reader(shared, cancel, StripePhase::Reconcile),
            &shared.cfg.worker_id,
            &ReconcileOptions::new(shared.cfg.reconcile_window),
            &|_, _| {},
        )
        .await
    }
    .await;
    match result {
        Ok(Started::Ran(report)) => shared.metrics.reconciled(&report.counts),
        Ok(Started::AlreadyRunning) => {
            debug!("another replica is reconciling; skipping this turn")
        }
        Err(JobError::Canceled) => info!("reconciliation canceled at shutdown"),
        Err(JobError::Stripe(ReadError::Unauthorized(_))) => shared.stop_unauthorized(),
        Err(e) => {
            shared.metrics.db_error("reconcile");
            warn!(error = %ErrorChain(&e), "scheduled reconciliation failed");
        }
    }
}

async fn refresh(shared: &Shared, cancel: &CancellationToken) {
    let result = async {
        let client = connect(&shared.cfg.database, "pgpay-worker refresh").await?;
        refresh_stuck(
            &client,
            &reader(shared, cancel, StripePhase::Refresh),
            REFRESH_BATCH,
        )
        .await
    }
    .await;
    match result {
        Ok(r) if r.looked_up > 0 => info!(
            looked_up = r.looked_up,
            applied = r.applied,
            missing = r.missing,
            "refreshed stuck payments"
        ),
        Ok(_) => {}
        Err(JobError::Canceled) => {}
        Err(JobError::Stripe(ReadError::Unauthorized(_))) => shared.stop_unauthorized(),
        Err(e) => {
            shared.metrics.db_error("refresh_stuck");
            warn!(error = %ErrorChain(&e), "refreshing stuck payments failed");
        }
    }
}

async fn check_anomalies(shared: &Shared) {
    let result = async {
        let client = connect(&shared.cfg.database, "pgpay-worker anomalies").await?;
        anomalies::check(&client).await
    }
    .await;
    match result {
        Ok(found) => {
            for a in found.iter().filter(|a| a.appeared) {
                warn!(
                    kind = a.kind,
                    subject = a.subject,
                    observed = a.observed,
                    expected = a.expected,
                    score = a.score,
                    detail = a.detail,
                    "anomaly"
                );
            }
            let gauges: Vec<(String, String, f64)> = found
                .into_iter()
                .map(|a| (a.kind, a.subject, a.score))
                .collect();
            shared.metrics.set_anomalies(&gauges);
        }
        Err(e) => {
            shared.metrics.db_error("check_anomalies");
            warn!(error = %ErrorChain(&e), "checking anomalies failed");
        }
    }
}
