//! The optional HTTP endpoint: `/healthz`, `/metrics` and the webhook relay
//! `/webhooks/stripe`, which hands the raw body and the `Stripe-Signature` header, byte
//! for byte, to `pay.ingest_webhook` and answers with the status the database chose.
//! The three statements it runs are here.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use pgpay_core::outcome::Outcome;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::db::{client, DbError};
use crate::error_chain::ErrorChain;
use crate::metrics::Metrics;

/// Webhook bodies larger than this get 413. Stripe's events are a few KB.
const MAX_WEBHOOK_BODY: usize = 1 << 20;

const INGEST: &str = "SELECT status::text, http_status::int, event_id::text \
     FROM pay.ingest_webhook($1::text, $2::text)";
// Two counts, each matching one of the partial indexes (outbox_due, outbox_leases), so a
// scrape never scans the finished commands.
const QUEUE_DEPTH: &str = "SELECT 'pending', count(*) FROM pay.outbox WHERE status = 'pending' \
     UNION ALL SELECT 'in_flight', count(*) FROM pay.outbox WHERE status = 'in_flight'";

#[derive(Clone)]
pub(crate) struct AppState {
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/webhooks/stripe", post(stripe_webhook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY))
        .with_state(state)
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn healthz(State(st): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(3), ping(&st.pool)).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(e)) => {
            debug!(error = %ErrorChain(&e), "healthz: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database timeout\n").into_response(),
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

async fn stripe_webhook(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(payload) = std::str::from_utf8(&body) else {
        st.metrics.webhook("rejected");
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"status": "rejected", "detail": "body is not UTF-8"}),
        );
    };
    let signature = match headers.get("stripe-signature").map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            st.metrics.webhook("rejected");
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"status": "rejected", "detail": "Stripe-Signature is not ASCII"}),
            );
        }
    };
    match ingest_webhook(&st.pool, payload, signature).await {
        Ok(r) => {
            st.metrics.webhook(match r.status.parse::<Outcome>() {
                Ok(
                    o @ (Outcome::Applied
                    | Outcome::Duplicate
                    | Outcome::Stored
                    | Outcome::Rejected),
                ) => o.as_str(),
                _ => "other",
            });
            let code = u16::try_from(r.http_status)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            answer(code, json!({"status": r.status, "event_id": r.event_id}))
        }
        Err(e) => {
            // 5xx makes Stripe deliver again later; the event is not lost.
            st.metrics.webhook("error");
            warn!(error = %ErrorChain(&e), "webhook ingest failed");
            answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"status": "error"}),
            )
        }
    }
}

/// One row of `pay.ingest_webhook`.
struct IngestResult {
    /// `applied`, `duplicate`, `stored` or `rejected`.
    status: String,
    /// What to answer Stripe.
    http_status: i32,
    /// The event id, when the payload had one.
    event_id: Option<String>,
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
    })
}

/// `SELECT 1`.
async fn ping(pool: &Pool) -> Result<(), DbError> {
    let c = client(pool).await?;
    c.simple_query("SELECT 1").await.map_err(DbError::Query)?;
    Ok(())
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
