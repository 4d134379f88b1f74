//! The anomaly check inside `run`: every [`ANOMALY_EVERY`], `pay.check_anomalies()` computes
//! `pay.anomalies` (the rules are SQL, README "Anomalies"), NOTIFYs `pay_alert` at most once a
//! minute per anomaly and says which ones are new. The worker logs each new one once at WARN
//! and exports every current one as `pgpay_worker_anomaly_score{kind,subject}`.

use std::time::Duration;

use tokio_postgres::Client;

use super::{db_op, JobError};

/// How often anomalies are checked. NOTIFY is rate-limited in SQL (once a minute per anomaly),
/// so a shorter period only makes the gauges fresher.
pub(crate) const ANOMALY_EVERY: Duration = Duration::from_secs(30);

/// One row of `pay.check_anomalies()`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Anomaly {
    pub kind: String,
    pub subject: String,
    pub observed: f64,
    pub expected: f64,
    pub score: f64,
    pub detail: String,
    /// First seen by this check (log it).
    pub appeared: bool,
}

/// Runs `pay.check_anomalies()`.
pub(crate) async fn check(client: &Client) -> Result<Vec<Anomaly>, JobError> {
    let rows = client
        .query(
            "SELECT kind, subject, observed, expected, score, coalesce(detail, ''), appeared \
             FROM pay.check_anomalies()",
            &[],
        )
        .await
        .map_err(db_op("check_anomalies"))?;
    rows.iter()
        .map(|r| {
            Ok(Anomaly {
                kind: r.try_get(0)?,
                subject: r.try_get(1)?,
                observed: r.try_get::<_, Option<f64>>(2)?.unwrap_or(0.0),
                expected: r.try_get::<_, Option<f64>>(3)?.unwrap_or(0.0),
                score: r.try_get::<_, Option<f64>>(4)?.unwrap_or(0.0),
                detail: r.try_get(5)?,
                appeared: r.try_get(6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db_op("check_anomalies"))
}
