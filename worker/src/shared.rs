//! What every task of a running worker shares: the dispatcher's command tasks and the
//! scheduled jobs use one Stripe client and one rate limiter, so together they stay under
//! the limit.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::stripe::{RateLimiter, StripeClient, Unauthorized};

pub(crate) struct Shared {
    pub(crate) cfg: WorkerConfig,
    pub(crate) pool: Pool,
    pub(crate) stripe: StripeClient,
    pub(crate) limiter: RateLimiter,
    pub(crate) metrics: Arc<Metrics>,
    /// Stops the whole worker (the token `start` runs under).
    pub(crate) stop: CancellationToken,
    /// Set when Stripe answered 401: the worker stops and `wait` returns it.
    pub(crate) unauthorized: std::sync::OnceLock<Unauthorized>,
}

impl Shared {
    /// Stripe refused the key: record it once (with a log line) and stop the worker.
    pub(crate) fn stop_unauthorized(&self) {
        let e = self.stripe.unauthorized();
        if self.unauthorized.set(e.clone()).is_ok() {
            tracing::error!(error = %e, "stopping: Stripe refused the API key");
        }
        self.stop.cancel();
    }
}
