//! What every task of a running worker shares: the dispatcher's command tasks and the
//! scheduled jobs use one Stripe client and one rate limiter, so together they stay under
//! the limit.

use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::stripe::{RateLimiter, StripeClient};

pub(crate) struct Shared {
    pub(crate) cfg: WorkerConfig,
    pub(crate) pool: Pool,
    pub(crate) stripe: StripeClient,
    pub(crate) limiter: RateLimiter,
    pub(crate) metrics: Arc<Metrics>,
}
