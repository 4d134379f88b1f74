//! The jobs besides the outbox, each on its own dedicated connection: reconciliation with
//! Stripe's ledger, the refresh of stuck payments, the status report, the anomaly check, and
//! the schedule that runs reconciliation, the refresh and the anomaly check inside
//! `pgpay-worker run`.

pub(crate) mod anomalies;
pub mod reconcile;
pub(crate) mod refresh;
pub(crate) mod schedule;
pub mod status;

use tokio_postgres::Client;

use crate::db;
use crate::stripe::ReadError;

/// Why a job stopped early.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No database connection.
    #[error("could not connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    /// A database call failed.
    #[error("database call failed: {op}")]
    Db {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Reading from Stripe failed for good.
    #[error(transparent)]
    Stripe(ReadError),
    /// `progress_reconciliation` said the run is no longer ours (its lease expired).
    #[error("the run's lease expired and it was closed; stopped")]
    LeaseLost,
    /// Shutdown was requested.
    #[error("canceled")]
    Canceled,
}

impl From<ReadError> for JobError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Canceled => JobError::Canceled,
            e => JobError::Stripe(e),
        }
    }
}

/// Maps a failed statement to [`JobError::Db`] naming the call.
pub(crate) fn db_op(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> JobError {
    move |source| JobError::Db { op, source }
}

/// Opens the dedicated connection a job lives on (a dry run's transaction needs one).
pub async fn connect(
    config: &crate::tls::DatabaseConfig,
    application_name: &str,
) -> Result<Client, JobError> {
    db::connect(config, application_name)
        .await
        .map_err(JobError::Connect)
}
