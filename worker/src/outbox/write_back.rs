//! Handing Stripe's answer back to the database through the fenced outbox functions
//! (`pay.complete_outbox`, `pay.retry_outbox`, `pay.fail_outbox`), retrying a failing
//! database briefly, and handing unsent commands back (release).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tracing::{debug, error, info, warn};

use super::sql::{self, ClaimedRow};
use crate::db::DbError;
use crate::error_chain::ErrorChain;
use crate::metrics::Outcome;
use crate::shared::Shared;
use crate::stripe::Decision;

/// How long the write-back of one answer keeps retrying a failing database.
const WRITE_BACK_BUDGET: Duration = Duration::from_secs(10);

/// Writes `decision` back; returns the retry delay when the command went back for a retry.
pub(super) async fn finish(
    shared: &Shared,
    row: &ClaimedRow,
    decision: Decision,
) -> Option<Duration> {
    let outcome = write_back(shared, row, &decision).await;
    match (&decision, outcome) {
        (Decision::Retry { delay, .. }, Outcome::Retried) => Some(*delay),
        _ => None,
    }
}

/// The write-back's name in metrics and logs.
fn op(decision: &Decision) -> &'static str {
    match decision {
        Decision::Complete { .. } => "complete",
        Decision::Retry { .. } => "retry",
        Decision::Fail { .. } => "fail",
    }
}

/// Calls the fenced outbox function for `decision` and counts and logs the outcome.
async fn write_back(shared: &Shared, row: &ClaimedRow, decision: &Decision) -> Outcome {
    let metrics = &shared.metrics;
    let op = op(decision);
    let success = match decision {
        Decision::Complete { replayed, .. } => {
            if *replayed {
                metrics.replayed();
            }
            Outcome::Completed
        }
        Decision::Retry { reason, .. } => {
            metrics.retry(reason.as_str());
            Outcome::Retried
        }
        Decision::Fail { .. } => Outcome::Failed,
    };
    let outcome = match record(shared, row, decision).await {
        Ok(true) => success,
        Ok(false) => Outcome::Fenced,
        Err(e) if !e.is_transient() && !matches!(decision, Decision::Retry { .. }) => {
            park_rejected(shared, row, op, &e).await
        }
        Err(e) => {
            metrics.db_error(op);
            error!(
                error = %ErrorChain(&e),
                "could not record Stripe's answer; the lease will expire and the command \
                 will be re-sent with the same Idempotency-Key"
            );
            Outcome::Abandoned
        }
    };
    log_outcome(decision, op, outcome);
    metrics.command(&row.kind, outcome);
    outcome
}

/// One fenced call for `decision`, retried while the database fails transiently.
/// `Ok(false)`: fenced (a newer attempt holds the command).
async fn record(shared: &Shared, row: &ClaimedRow, decision: &Decision) -> Result<bool, DbError> {
    let pool = &shared.pool;
    let call = || async {
        match decision {
            Decision::Complete {
                http_status,
                response,
                ..
            } => sql::complete(pool, row.id, row.attempt, i32::from(*http_status), response).await,
            Decision::Retry {
                http_status,
                error,
                delay,
                ..
            } => {
                sql::retry(
                    pool,
                    row.id,
                    row.attempt,
                    http_status.map(i32::from),
                    error,
                    *delay,
                )
                .await
            }
            Decision::Fail { http_status, error } => {
                sql::fail(pool, row.id, row.attempt, http_status.map(i32::from), error).await
            }
        }
    };
    call.retry(db_retry())
        .when(DbError::is_transient)
        .notify(|e: &DbError, d| {
            shared.metrics.db_error(op(decision));
            warn!(error = %ErrorChain(e), retry_in = ?d, "write-back failed; retrying");
        })
        .await
}

/// The database refused the answer on its merits (an extension bug, a check that fires):
/// sending again would only get the same answer at the rate of the lease. Park the command
/// as a retry with backoff and the reason in `last_error`, where `outbox_health` shows it.
async fn park_rejected(shared: &Shared, row: &ClaimedRow, op: &str, e: &DbError) -> Outcome {
    shared.metrics.db_error(op);
    error!(
        error = %ErrorChain(e),
        "the database rejected Stripe's answer; parking the command for a retry"
    );
    let delay = shared
        .cfg
        .retry
        .delay(row.attempt, None, &mut fastrand::Rng::new());
    let why = format!(
        "the database rejected the {op} write-back: {}",
        e.last_error_text()
    );
    match sql::retry(&shared.pool, row.id, row.attempt, None, &why, delay).await {
        Ok(true) => {
            shared.metrics.retry("write_back_rejected");
            Outcome::Retried
        }
        Ok(false) => Outcome::Fenced,
        Err(_) => Outcome::Abandoned,
    }
}

fn log_outcome(decision: &Decision, op: &str, outcome: Outcome) {
    match (decision, outcome) {
        (_, Outcome::Fenced) => info!(
            op,
            "write-back refused: the lease was taken over by a newer attempt; dropping our result"
        ),
        (
            Decision::Complete {
                http_status,
                replayed,
                ..
            },
            Outcome::Completed,
        ) => info!(http_status, replayed, "command completed"),
        (
            Decision::Retry {
                http_status,
                reason,
                delay,
                ..
            },
            Outcome::Retried,
        ) => info!(
            http_status,
            reason = reason.as_str(),
            retry_in = ?delay,
            "command will be retried"
        ),
        (Decision::Fail { http_status, .. }, Outcome::Failed) => {
            warn!(http_status, "command failed permanently")
        }
        _ => {}
    }
}

/// Hands a claimed, unsent command back: pending again right away, same attempt fencing.
pub(super) async fn release(shared: &Shared, row: &ClaimedRow, why: &str) -> Outcome {
    let pool = &shared.pool;
    let applied = (|| sql::retry(pool, row.id, row.attempt, None, why, Duration::ZERO))
        .retry(db_retry().with_total_delay(Some(Duration::from_secs(3))))
        .when(DbError::is_transient)
        .await;
    let outcome = match applied {
        Ok(true) => Outcome::Released,
        Ok(false) => Outcome::Fenced,
        Err(e) => {
            shared.metrics.db_error("release");
            warn!(
                id = row.id,
                error = %ErrorChain(&e),
                "could not release the command; it will be reclaimed when its lease expires"
            );
            Outcome::Abandoned
        }
    };
    debug!(id = row.id, why, outcome = outcome.as_str(), "released");
    shared.metrics.command(&row.kind, outcome);
    outcome
}

fn db_retry() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(WRITE_BACK_BUDGET))
}
