//! The optional HTTP endpoint: `/livez`, `/readyz` (and `/healthz`, its alias), `/metrics`
//! and the webhook relay `/webhooks/stripe`, which hands the raw body and the
//! `Stripe-Signature` header, byte for byte, to `pay.ingest_webhook` and answers with the
//! status the database chose (and, for a rejection, its reason).
//!
//! Served with hyper directly so slow clients are cut off: the request head must arrive
//! within `header_read_timeout` (also the idle keep-alive limit), a body within
//! `body_timeout` (408), and at most `max_connections` are served at once (more wait in the
//! accept queue). The statements it runs are here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pgpay_core::outcome::Outcome;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::HttpLimits;
use crate::db::{client, DbError};
use crate::error_chain::ErrorChain;
use crate::metrics::Metrics;
use crate::preflight::{check_client, Checked};

// pay.ingest_webhook with the event type and the payment row's lock wait, for the metrics.
const INGEST: &str = "SELECT status::text, http_status::int, event_id::text, detail::text, \
     event_type::text, lock_wait_us::bigint FROM pay.ingest_webhook_measured($1::text, $2::text)";
// The oldest due pending command (the outbox_due index), 0 when there is none.
const OUTBOX_LAG: &str = "SELECT coalesce(extract(epoch FROM now() - min(run_after)), 0)::float8 \
     FROM pay.outbox WHERE status = 'pending' AND run_after <= now()";
// Two counts, each matching one of the partial indexes (outbox_due, outbox_leases), so a
// scrape never scans the finished commands.
const QUEUE_DEPTH: &str = "SELECT 'pending', count(*) FROM pay.outbox WHERE status = 'pending' \
     UNION ALL SELECT 'in_flight', count(*) FROM pay.outbox WHERE status = 'in_flight'";

/// How often one rejection reason is logged at most.
const REJECTION_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub(crate) struct AppState {
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    /// Whether the LISTEN connection is part of readiness.
    pub listen_for_notifications: bool,
    pub rejections: Arc<RejectionLog>,
    pub limits: HttpLimits,
}

/// Rejected webhooks, logged at WARN at most once a minute per reason, with the count since
/// the last line.
#[derive(Default)]
pub(crate) struct RejectionLog {
    by_reason: Mutex<HashMap<String, (Instant, u64)>>,
}

impl RejectionLog {
    /// Counts a rejection; returns how many to report when a line is due now.
    fn note(&self, reason: &str) -> Option<u64> {
        let mut map = self.by_reason.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match map.get_mut(reason) {
            Some((last, pending)) if now.duration_since(*last) < REJECTION_LOG_EVERY => {
                *pending += 1;
                None
            }
            Some((last, pending)) => {
                let n = *pending + 1;
                *last = now;
                *pending = 0;
                Some(n)
            }
            None => {
                if map.len() >= 64 {
                    // Reasons come from the database (a closed set); never let it grow.
                    map.clear();
                }
                map.insert(reason.to_owned(), (now, 0));
                Some(1)
            }
        }
    }

    fn log(&self, reason: &str) {
        if let Some(count) = self.note(reason) {
            warn!(
                reason,
                count,
                hint = rejection_hint(reason),
                "webhook rejected (at most one line per reason a minute; count is since the last)"
            );
        }
    }
}

/// What an operator should look at for a rejection reason.
fn rejection_hint(reason: &str) -> &'static str {
    match reason {
        "signature_mismatch" => {
            "is the endpoint secret given to pay.add_webhook_secret the one Stripe shows for this endpoint?"
        }
        "timestamp_too_old" | "timestamp_in_future" => {
            "is this server's clock right? (or an old delivery was replayed)"
        }
        "missing_header" | "malformed_header" | "no_v1_signature" => {
            "is the request from Stripe? (a proxy may drop or rewrite the Stripe-Signature header)"
        }
        "no_live_webhook_secret" => "add the endpoint's signing secret with pay.add_webhook_secret",
        _ => "not a signed Stripe event",
    }
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/webhooks/stripe", post(stripe_webhook))
        .with_state(state)
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let limits = state.limits.clone();
    let service = TowerToHyperService::new(router(state));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        // A free slot first: at the cap, new connections wait in the accept queue.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        let cancel = cancel.clone();
        let header_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The process is alive and serving HTTP. Nothing else is checked.
async fn livez() -> Response {
    (StatusCode::OK, "alive\n").into_response()
}

/// Ready for work: the database answers, holds a compatible pgpay and lets this role claim,
/// and the LISTEN connection is up (when notifications are on). 503 names what is missing.
async fn readyz(State(st): State<AppState>) -> Response {
    let mut problems = Vec::new();
    let db = async {
        let c = client(&st.pool).await?;
        Ok::<_, DbError>(check_client(&c).await)
    };
    match tokio::time::timeout(Duration::from_secs(3), db).await {
        Ok(Ok(Checked::Ready)) => {}
        Ok(Ok(Checked::Broken(e))) => problems.push(e.to_string()),
        Ok(Ok(Checked::Unreachable(reason))) => {
            problems.push(format!("database unreachable: {reason}"))
        }
        Ok(Err(DbError::Pool(deadpool_postgres::PoolError::Backend(e)))) => problems.push(format!(
            "database unreachable: {}",
            crate::preflight::describe_unreachable(&e)
        )),
        Ok(Err(e)) => problems.push(format!("database unreachable: {}", ErrorChain(&e))),
        Err(_) => problems.push("database timeout".into()),
    }
    if st.listen_for_notifications && !st.metrics.listener_is_connected() {
        problems.push("LISTEN connection not up".into());
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready\n");
        for p in problems {
            body.push_str(&p);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    // Queue depth is sampled at scrape time; a slow or failing query leaves the last value.
    match tokio::time::timeout(Duration::from_secs(2), queue_depth(&st.pool)).await {
        Ok(Ok(rows)) => {
            let mut pending = 0;
            let mut in_flight = 0;
            for (status, n) in rows {
                match status.as_str() {
                    "pending" => pending = n,
                    "in_flight" => in_flight = n,
                    _ => {}
                }
            }
            st.metrics.set_queue_depth("pending", pending);
            st.metrics.set_queue_depth("in_flight", in_flight);
        }
        Ok(Err(e)) => {
            st.metrics.db_error("queue_depth");
            debug!(error = %ErrorChain(&e), "metrics: queue depth query failed");
        }
        Err(_) => st.metrics.db_error("queue_depth"),
    }
    match tokio::time::timeout(Duration::from_secs(2), outbox_lag(&st.pool)).await {
        Ok(Ok(seconds)) => st.metrics.set_outbox_lag(seconds),
        Ok(Err(e)) => {
            st.metrics.db_error("outbox_lag");
            debug!(error = %ErrorChain(&e), "metrics: outbox lag query failed");
        }
        Err(_) => st.metrics.db_error("outbox_lag"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

fn rejected(st: &AppState, status: StatusCode, reason: &str) -> Response {
    st.metrics.webhook("rejected");
    st.rejections.log(reason);
    answer(status, json!({"status": "rejected", "reason": reason}))
}

async fn stripe_webhook(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.limits.max_body_bytes as u64) {
        return rejected(&st, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    }
    let body = match tokio::time::timeout(
        st.limits.body_timeout,
        axum::body::to_bytes(body, st.limits.max_body_bytes),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if is_length_limit(&e) => {
            return rejected(&st, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        }
        Ok(Err(e)) => {
            debug!(error = %ErrorChain(&e), "webhook body could not be read");
            return rejected(&st, StatusCode::BAD_REQUEST, "body_unreadable");
        }
        Err(_) => return rejected(&st, StatusCode::REQUEST_TIMEOUT, "body_timeout"),
    };
    relay(st, headers, body).await
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

async fn relay(st: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(payload) = std::str::from_utf8(&body) else {
        return rejected(&st, StatusCode::BAD_REQUEST, "body_not_utf8");
    };
    let signature = match headers.get("stripe-signature").map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return rejected(&st, StatusCode::BAD_REQUEST, "malformed_header"),
    };
    let started = std::time::Instant::now();
    let ingested = ingest_webhook(&st.pool, payload, signature).await;
    let took = started.elapsed();
    match ingested {
        Ok(r) if r.status == "rejected" => {
            // The database's detail starts with the reason (`signature_mismatch`, ...);
            // it never holds a secret or the expected signature.
            let detail = r.detail.unwrap_or_default();
            let reason = detail.split(':').next().unwrap_or("").trim();
            let reason = if reason.is_empty() {
                "rejected"
            } else {
                reason
            };
            let code = status_code(r.http_status);
            st.metrics.webhook("rejected");
            st.rejections.log(reason);
            answer(
                code,
                json!({"status": "rejected", "reason": reason, "detail": detail}),
            )
        }
        Ok(r) => {
            let outcome = match r.status.parse::<Outcome>() {
                Ok(
                    o @ (Outcome::Applied
                    | Outcome::Duplicate
                    | Outcome::Stored
                    | Outcome::Quarantined
                    | Outcome::Deferred),
                ) => o.as_str(),
                _ => "other",
            };
            st.metrics.webhook(outcome);
            // Signed, so the type is Stripe's (a bounded set), never an attacker's string.
            st.metrics.webhook_event(
                r.event_type.as_deref().unwrap_or("unknown"),
                outcome,
                took,
                r.lock_wait,
            );
            answer(
                status_code(r.http_status),
                json!({"status": r.status, "event_id": r.event_id}),
            )
        }
        Err(e) => {
            // 5xx makes Stripe deliver again later; the event is not lost.
            st.metrics.webhook("error");
            if is_no_live_secret(&e) {
                st.rejections.log("no_live_webhook_secret");
                return answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"status": "error", "reason": "no_live_webhook_secret"}),
                );
            }
            warn!(error = %ErrorChain(&e), "webhook ingest failed");
            answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"status": "error"}),
            )
        }
    }
}

fn status_code(code: i32) -> StatusCode {
    u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// `pay.ingest_webhook` raises 55000 when no live secret is configured.
fn is_no_live_secret(e: &DbError) -> bool {
    matches!(e, DbError::Query(q) if q.as_db_error().is_some_and(|d| d.code().code() == "55000"))
}

/// One row of `pay.ingest_webhook`.
struct IngestResult {
    /// `applied`, `duplicate`, `stored` or `rejected`.
    status: String,
    /// What to answer Stripe.
    http_status: i32,
    /// The event id, when the payload had one.
    event_id: Option<String>,
    /// For a rejection: the reason, first (`signature_mismatch`, ...).
    detail: Option<String>,
    /// The event's type (NULL when rejected).
    event_type: Option<String>,
    /// How long the database spent finding and locking the payment's row.
    lock_wait: Option<Duration>,
}

/// `pay.ingest_webhook(payload, signature_header)`: always one row (a missing header is a
/// rejection, not NULL: the function is not STRICT).
async fn ingest_webhook(
    pool: &Pool,
    payload: &str,
    signature_header: Option<&str>,
) -> Result<IngestResult, DbError> {
    let c = client(pool).await?;
    let stmt = c.prepare_cached(INGEST).await.map_err(DbError::Query)?;
    let r = c
        .query_one(&stmt, &[&payload, &signature_header])
        .await
        .map_err(DbError::Query)?;
    Ok(IngestResult {
        status: r
            .try_get::<_, Option<String>>(0)
            .map_err(DbError::Query)?
            .unwrap_or_default(),
        http_status: r
            .try_get::<_, Option<i32>>(1)
            .map_err(DbError::Query)?
            .unwrap_or(500),
        event_id: r.try_get(2).map_err(DbError::Query)?,
        detail: r.try_get(3).map_err(DbError::Query)?,
        event_type: r.try_get(4).map_err(DbError::Query)?,
        lock_wait: r
            .try_get::<_, Option<i64>>(5)
            .map_err(DbError::Query)?
            .and_then(|us| u64::try_from(us).ok())
            .map(Duration::from_micros),
    })
}

/// Seconds the oldest due pending command has waited.
async fn outbox_lag(pool: &Pool) -> Result<f64, DbError> {
    let c = client(pool).await?;
    let stmt = c.prepare_cached(OUTBOX_LAG).await.map_err(DbError::Query)?;
    let row = c.query_one(&stmt, &[]).await.map_err(DbError::Query)?;
    row.try_get(0).map_err(DbError::Query)
}

/// Pending and in-flight command counts.
async fn queue_depth(pool: &Pool) -> Result<Vec<(String, i64)>, DbError> {
    let c = client(pool).await?;
    let stmt = c
        .prepare_cached(QUEUE_DEPTH)
        .await
        .map_err(DbError::Query)?;
    let rows = c.query(&stmt, &[]).await.map_err(DbError::Query)?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(DbError::Query)
}
