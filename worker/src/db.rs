//! The SQL the worker runs, all of it: the outbox contract (docs/outbox-contract.md), the
//! webhook relay and two cheap reads for `/healthz` and `/metrics`.
//!
//! Statements go through `prepare_cached`, so each pooled connection plans them once.
//! Values always travel as parameters. `run_after` is computed by the database
//! (`now() + delay`), so the worker's clock never decides when a retry is due.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::Value;

/// A database call that failed (pool or query).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had from the pool in time.
    #[error("no database connection available")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// The statement failed.
    #[error("database call failed")]
    Query(#[source] tokio_postgres::Error),
    /// The pool could not be built.
    #[error("could not build the connection pool")]
    Build(#[source] deadpool_postgres::BuildError),
}

impl DbError {
    /// Whether trying the same call again may succeed: connection trouble, the server
    /// shutting down or overloaded, serialization failures and deadlocks. A call the
    /// server rejected on its merits (bad argument, missing function, permission) is not.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Pool(_) => true,
            DbError::Build(_) => false,
            DbError::Query(e) => match e.code() {
                // No SQLSTATE: the connection failed or closed.
                None => true,
                Some(code) => {
                    let c = code.code();
                    c.starts_with("08") // connection exception
                        || c.starts_with("40") // serialization failure, deadlock
                        || c.starts_with("53") // insufficient resources
                        || c.starts_with("57") // operator intervention (admin shutdown, cancel)
                        || c == "55P03" // lock not available
                }
            },
        }
    }
}

/// Builds the small pool used for claims, write-backs and the HTTP endpoints.
pub fn pool(config: &crate::tls::DatabaseConfig, size: usize) -> Result<Pool, DbError> {
    let mut pg = config.postgres().clone();
    if pg.get_application_name().is_none() {
        pg.application_name("pgpay-worker");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    let manager = Manager::from_config(
        pg,
        config.tls(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(DbError::Build)
}

/// One claimed command: the columns the worker needs.
#[derive(Clone)]
pub struct ClaimedRow {
    /// `pay.outbox.id`.
    pub id: i64,
    /// The payment, for logs.
    pub payment_id: Option<String>,
    /// `create_payment_intent`, ...
    pub kind: String,
    /// Sent as `Idempotency-Key` (POST).
    pub idempotency_key: Option<String>,
    /// `{"method", "path", "params"}`.
    pub request: Value,
    /// The claim's attempt number, passed back for fencing.
    pub attempt: i32,
    /// The command was first attempted longer ago than the key-retention guard: Stripe
    /// may have forgotten its Idempotency-Key (computed with the database's clock).
    pub past_key_retention: bool,
}

// The key and the params stay out of logs.
impl std::fmt::Debug for ClaimedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedRow")
            .field("id", &self.id)
            .field("payment_id", &self.payment_id)
            .field("kind", &self.kind)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

const CLAIM: &str = "SELECT id, payment_id::text, kind::text, idempotency_key::text, request::jsonb, attempts::int, \
     coalesce(first_attempt_at < now() - make_interval(secs => $4::float8), false) \
     FROM pay.claim_outbox($1::text, $2::int, make_interval(secs => $3::float8))";
const REKEY: &str = "SELECT pay.rekey_create_command($1::bigint, $2::int, $3::text)";
const COMPLETE: &str = "SELECT pay.complete_outbox($1::bigint, $2::int, $3::int, $4::jsonb)";
const RETRY: &str = "SELECT pay.retry_outbox($1::bigint, $2::int, $3::int, $4::text, \
     now() + make_interval(secs => $5::float8))";
const FAIL: &str = "SELECT pay.fail_outbox($1::bigint, $2::int, $3::int, $4::jsonb)";
const INGEST: &str = "SELECT status::text, http_status::int, event_id::text, detail::text \
     FROM pay.ingest_webhook($1::text, $2::text)";
// Two counts, each matching one of the partial indexes (outbox_due, outbox_leases), so a
// scrape never scans the finished commands.
const QUEUE_DEPTH: &str = "SELECT 'pending', count(*) FROM pay.outbox WHERE status = 'pending' \
     UNION ALL SELECT 'in_flight', count(*) FROM pay.outbox WHERE status = 'in_flight'";

async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, DbError> {
    pool.get().await.map_err(DbError::Pool)
}

/// `pay.claim_outbox(worker, max_rows, lease)`.
pub async fn claim(
    pool: &Pool,
    worker: &str,
    max_rows: i32,
    lease: Duration,
    key_retention_guard: Duration,
) -> Result<Vec<ClaimedRow>, DbError> {
    let c = client(pool).await?;
    let stmt = c.prepare_cached(CLAIM).await.map_err(DbError::Query)?;
    let rows = c
        .query(
            &stmt,
            &[
                &worker,
                &max_rows,
                &lease.as_secs_f64(),
                &key_retention_guard.as_secs_f64(),
            ],
        )
        .await
        .map_err(DbError::Query)?;
    rows.iter()
        .map(|r| {
            Ok(ClaimedRow {
                id: r.try_get(0)?,
                payment_id: r.try_get(1)?,
                kind: r.try_get::<_, Option<String>>(2)?.unwrap_or_default(),
                idempotency_key: r.try_get(3)?,
                request: r.try_get::<_, Option<Value>>(4)?.unwrap_or(Value::Null),
                attempt: r.try_get(5)?,
                past_key_retention: r.try_get(6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(DbError::Query)
}

async fn fenced_call(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<bool, DbError> {
    let c = client(pool).await?;
    let stmt = c.prepare_cached(sql).await.map_err(DbError::Query)?;
    let row = c.query_one(&stmt, params).await.map_err(DbError::Query)?;
    let applied: Option<bool> = row.try_get(0).map_err(DbError::Query)?;
    Ok(applied.unwrap_or(false))
}

/// `pay.complete_outbox(id, attempt, http_status, response)`; false when fenced.
pub async fn complete(
    pool: &Pool,
    id: i64,
    attempt: i32,
    http_status: i32,
    response: &Value,
) -> Result<bool, DbError> {
    fenced_call(pool, COMPLETE, &[&id, &attempt, &http_status, response]).await
}

/// `pay.retry_outbox(id, attempt, http_status, error, now() + delay)`; false when fenced.
pub async fn retry(
    pool: &Pool,
    id: i64,
    attempt: i32,
    http_status: Option<i32>,
    error: &str,
    delay: Duration,
) -> Result<bool, DbError> {
    fenced_call(
        pool,
        RETRY,
        &[&id, &attempt, &http_status, &error, &delay.as_secs_f64()],
    )
    .await
}

/// `pay.fail_outbox(id, attempt, http_status, error)`; false when fenced.
pub async fn fail(
    pool: &Pool,
    id: i64,
    attempt: i32,
    http_status: Option<i32>,
    error: &Value,
) -> Result<bool, DbError> {
    fenced_call(pool, FAIL, &[&id, &attempt, &http_status, error]).await
}

/// `pay.rekey_create_command(id, attempt, reason)`: the new key, or `None` when the
/// command was fenced or its PaymentIntent was adopted meanwhile.
pub async fn rekey_create(
    pool: &Pool,
    id: i64,
    attempt: i32,
    reason: &str,
) -> Result<Option<String>, DbError> {
    let c = client(pool).await?;
    let stmt = c.prepare_cached(REKEY).await.map_err(DbError::Query)?;
    let row = c
        .query_one(&stmt, &[&id, &attempt, &reason])
        .await
        .map_err(DbError::Query)?;
    row.try_get(0).map_err(DbError::Query)
}

/// One row of `pay.ingest_webhook`.
#[derive(Debug, Clone)]
pub struct IngestResult {
    /// `applied`, `duplicate`, `stored` or `rejected`.
    pub status: String,
    /// What to answer Stripe.
    pub http_status: i32,
    /// The event id, when the payload had one.
    pub event_id: Option<String>,
    /// Why (for rejections).
    pub detail: Option<String>,
}

/// `pay.ingest_webhook(payload, signature_header)`. `None` when it returned no row
/// (a STRICT function given a NULL header).
pub async fn ingest_webhook(
    pool: &Pool,
    payload: &str,
    signature_header: Option<&str>,
) -> Result<Option<IngestResult>, DbError> {
    let c = client(pool).await?;
    let stmt = c.prepare_cached(INGEST).await.map_err(DbError::Query)?;
    let row = c
        .query_opt(&stmt, &[&payload, &signature_header])
        .await
        .map_err(DbError::Query)?;
    row.map(|r| {
        Ok(IngestResult {
            status: r.try_get::<_, Option<String>>(0)?.unwrap_or_default(),
            http_status: r.try_get::<_, Option<i32>>(1)?.unwrap_or(500),
            event_id: r.try_get(2)?,
            detail: r.try_get(3)?,
        })
    })
    .transpose()
    .map_err(DbError::Query)
}

/// `SELECT 1`.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let c = client(pool).await?;
    c.simple_query("SELECT 1").await.map_err(DbError::Query)?;
    Ok(())
}

/// Pending and in-flight command counts.
pub async fn queue_depth(pool: &Pool) -> Result<Vec<(String, i64)>, DbError> {
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
