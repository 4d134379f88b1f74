//! The outbox functions the worker calls (docs/outbox-contract.md): claim, the three
//! fenced write-backs and the re-key of a create past Stripe's key retention.
//!
//! Statements go through `prepare_cached`, so each pooled connection plans them once.
//! Values always travel as parameters. `run_after` is computed by the database
//! (`now() + delay`), so the worker's clock never decides when a retry is due.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;

use crate::db::{client, DbError};

/// One claimed command: the columns the worker needs.
#[derive(Clone)]
pub(super) struct ClaimedRow {
    /// `pay.outbox.id`.
    pub(super) id: i64,
    /// The payment, for logs and the key-retention lookup of payment creates.
    pub(super) payment_id: Option<String>,
    /// The subscription (`pay.outbox.subscription_id`), for subscription commands: the
    /// key-retention lookup of `create_subscription_session` matches it in our metadata.
    pub(super) subscription_id: Option<String>,
    /// `create_payment_intent`, ...
    pub(super) kind: String,
    /// Sent as `Idempotency-Key` (POST).
    pub(super) idempotency_key: Option<String>,
    /// `{"method", "path", "params"}`.
    pub(super) request: Value,
    /// The claim's attempt number, passed back for fencing.
    pub(super) attempt: i32,
    /// The command was first attempted longer ago than the key-retention guard: Stripe
    /// may have forgotten its Idempotency-Key (computed with the database's clock).
    pub(super) past_key_retention: bool,
    /// When the command was first attempted (unix seconds; 0 before its first attempt):
    /// whatever it created at Stripe was created at or after this.
    pub(super) first_attempt_unix: i64,
}

// The key and the params stay out of logs.
impl std::fmt::Debug for ClaimedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedRow")
            .field("id", &self.id)
            .field("payment_id", &self.payment_id)
            .field("subscription_id", &self.subscription_id)
            .field("kind", &self.kind)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// `subscription_id` is read by name from the row (`to_jsonb`), so a worker of this version
/// keeps claiming from a database whose extension is not yet upgraded to subscriptions.
const CLAIM: &str = "SELECT o.id, o.payment_id::text, o.kind::text, o.idempotency_key::text, o.request::jsonb, o.attempts::int, \
     coalesce(o.first_attempt_at < now() - make_interval(secs => $4::float8), false), \
     coalesce(floor(extract(epoch FROM o.first_attempt_at))::bigint, 0), \
     to_jsonb(o) ->> 'subscription_id' \
     FROM pay.claim_outbox($1::text, $2::int, make_interval(secs => $3::float8)) o";
const REKEY: &str = "SELECT pay.rekey_create_command($1::bigint, $2::int, $3::text)";
const COMPLETE: &str = "SELECT pay.complete_outbox($1::bigint, $2::int, $3::int, $4::jsonb)";
const RETRY: &str = "SELECT pay.retry_outbox($1::bigint, $2::int, $3::int, $4::text, \
     now() + make_interval(secs => $5::float8))";
const FAIL: &str = "SELECT pay.fail_outbox($1::bigint, $2::int, $3::int, $4::jsonb)";
/// `pay.claim_outbox(worker, max_rows, lease)`.
pub(super) async fn claim(
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
                first_attempt_unix: r.try_get(7)?,
                subscription_id: r.try_get(8)?,
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
pub(super) async fn complete(
    pool: &Pool,
    id: i64,
    attempt: i32,
    http_status: i32,
    response: &Value,
) -> Result<bool, DbError> {
    fenced_call(pool, COMPLETE, &[&id, &attempt, &http_status, response]).await
}

/// `pay.retry_outbox(id, attempt, http_status, error, now() + delay)`; false when fenced.
pub(super) async fn retry(
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
pub(super) async fn fail(
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
pub(super) async fn rekey_create(
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
