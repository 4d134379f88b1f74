//! Database plumbing shared by every job: the pool (claims, write-backs, the HTTP
//! endpoints), dedicated connections (the LISTEN doorbell, a reconciliation's transaction,
//! `status`), and the one error type with its retryable/fatal split. Each job keeps its
//! own SQL next to it.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Client;
use tracing::debug;

use crate::error_chain::ErrorChain;

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

    /// `SQLSTATE: message` of a database error, for an outbox row's `last_error`.
    pub(crate) fn last_error_text(&self) -> String {
        match self {
            DbError::Query(q) => match q.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => ErrorChain(self).to_string(),
            },
            _ => ErrorChain(self).to_string(),
        }
    }
}

/// Builds the small pool used for claims, write-backs and the HTTP endpoints.
pub(crate) fn pool(config: &crate::tls::DatabaseConfig, size: usize) -> Result<Pool, DbError> {
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

/// A connection from the pool.
pub(crate) async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, DbError> {
    pool.get().await.map_err(DbError::Pool)
}

/// Opens a dedicated connection named `application_name` (a reconciliation or a dry run's
/// transaction lives on one connection).
pub(crate) async fn connect(
    config: &crate::tls::DatabaseConfig,
    application_name: &str,
) -> Result<Client, tokio_postgres::Error> {
    let mut pg = config.clone();
    pg.application_name(application_name);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    let (client, conn) = pg.connect().await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "dedicated connection closed");
        }
    });
    Ok(client)
}
