//! `pgpay-worker`: the sidecar that sends the pgpay outbox to Stripe.
//!
//! The database decides every payment state; the worker claims outbox commands, sends each
//! with its stored Idempotency-Key, and hands Stripe's answer back through the fenced
//! `pay.complete_outbox` / `pay.retry_outbox` / `pay.fail_outbox` functions
//! (docs/outbox-contract.md).
//!
//! Start one in-process with [`start`] (tests do) or run it to completion with [`run`]
//! (the binary does). Shutdown is a [`CancellationToken`] you pass in.
//!
//! Layout, one job per folder: [`outbox`] (claim, send, write back), [`stripe`] (the
//! client, what its answers mean, reads, rate limit, backoff), [`jobs`] (reconciliation,
//! the refresh of stuck payments, status, their schedule), and at the top [`config`], `db`
//! (pool, connections, errors), `http` (`/healthz`, `/metrics`, the webhook relay) and
//! [`metrics`].
#![forbid(unsafe_code)]

pub mod config;
mod db;
mod error_chain;
mod http;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod preflight;
mod secret;
mod shared;
pub mod stripe;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
pub use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::config::{ConfigError, RunArgs, WorkerConfig};
pub use crate::db::DbError;
pub use crate::error_chain::ErrorChain;
pub use crate::jobs::JobError;
pub use crate::metrics::{Metrics, Outcome, StripePhase};
pub use crate::secret::SecretString;

use crate::outbox::Dispatcher;
use crate::shared::Shared;

/// Why the worker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error("could not set up the Stripe client")]
    Client(#[from] stripe::ClientError),
    /// The database pool could not be built.
    #[error("could not set up the database pool")]
    Db(#[from] DbError),
    /// `--http-listen` could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed")]
    Http(#[source] std::io::Error),
    /// A reconciliation failed (the job's error says which step).
    #[error(transparent)]
    Reconcile(#[from] JobError),
    /// The database is set up so the worker cannot work (the message says how to fix it).
    #[error(transparent)]
    Setup(#[from] preflight::SetupError),
    /// Stripe refused the API key: nothing will work until the key is changed.
    #[error(transparent)]
    Unauthorized(#[from] stripe::Unauthorized),
    /// A worker task panicked.
    #[error("worker task panicked")]
    Panicked(#[source] tokio::task::JoinError),
}

/// A running worker.
pub struct WorkerHandle {
    worker_id: String,
    http_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    main: JoinHandle<Result<(), WorkerError>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("worker_id", &self.worker_id)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// The `lease_owner` this worker claims under.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The bound HTTP address (useful with port 0), when `http_listen` was set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// This worker's metrics (counters are readable directly, see [`Metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Asks for a graceful shutdown (same as cancelling the token given to [`start`]).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until the worker has stopped: after a shutdown request, or on its own when the
    /// setup cannot work ([`WorkerError::Setup`]) or Stripe refuses the key
    /// ([`WorkerError::Unauthorized`]).
    pub async fn wait(self) -> Result<(), WorkerError> {
        let d = self.main.await;
        let h = match self.http {
            Some(h) => Some(h.await),
            None => None,
        };
        d.map_err(WorkerError::Panicked)??;
        match h {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(WorkerError::Http(e)),
            Some(Err(e)) => Err(WorkerError::Panicked(e)),
        }
    }

    /// Stops everything at once without releasing anything — what a crash (SIGKILL) does.
    /// Claimed commands stay `in_flight` until their lease expires. For tests.
    pub async fn abort(self) {
        self.main.abort();
        if let Some(h) = &self.http {
            h.abort();
        }
        let _ = self.main.await;
        if let Some(h) = self.http {
            let _ = h.await;
        }
    }
}

/// Validates `config`, binds the HTTP listener (if any) and starts the worker: the startup
/// checks ([`preflight`]: retried while the database cannot be reached, each attempt logged
/// at WARN), then the dispatcher and the schedule. Returns once the HTTP endpoint listens
/// (`/livez` answers while the database is still awaited); cancelling `cancel` (or
/// [`WorkerHandle::shutdown`]) stops it gracefully.
pub async fn start(
    config: WorkerConfig,
    cancel: CancellationToken,
) -> Result<WorkerHandle, WorkerError> {
    config.validate()?;
    if config.stripe.api_base.scheme() == "http" && !config::is_loopback(&config.stripe.api_base) {
        warn!(
            api_base = %config.stripe.api_base,
            "STRIPE_API_BASE is plain http to another host; the API key travels unencrypted"
        );
    }
    if config.rate_limit > 0.0 {
        // Claimed commands queue for the rate limiter while their lease runs; a queue
        // longer than the lease makes them expire and be released unsent.
        let queue = Duration::from_secs_f64(config.concurrency as f64 / config.rate_limit);
        let window = config
            .lease
            .saturating_sub(config.stripe.request_timeout + config::LEASE_MARGIN * 2);
        if queue > window {
            warn!(
                ?queue,
                ?window,
                "--concurrency / --rate-limit exceeds what the lease allows; commands may be \
                 released unsent and claimed again (raise --lease or lower --concurrency)"
            );
        }
    }
    let cancel = cancel.child_token();
    let metrics = Arc::new(Metrics::new());
    let stripe = stripe::StripeClient::new(&config.stripe)?;
    let pool = db::pool(&config.database, config.db_pool_size)?;

    let (http, http_addr) = match config.http_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| WorkerError::Bind { addr, source })?;
            info!(addr = %bound, "HTTP endpoint listening");
            let state = http::AppState {
                pool: pool.clone(),
                metrics: metrics.clone(),
                listen_for_notifications: config.listen_for_notifications,
                rejections: Arc::new(http::RejectionLog::default()),
                limits: config.http_limits.clone(),
            };
            (
                Some(tokio::spawn(http::serve(listener, state, cancel.clone()))),
                Some(bound),
            )
        }
        None => (None, None),
    };

    info!(config = ?config, "starting pgpay-worker");
    let worker_id = config.worker_id.clone();
    let shared = Arc::new(Shared {
        limiter: stripe::RateLimiter::new(config.rate_limit),
        cfg: config,
        pool,
        stripe,
        metrics: metrics.clone(),
        stop: cancel.clone(),
        unauthorized: std::sync::OnceLock::new(),
    });
    let main = tokio::spawn(work(shared, cancel.clone()));
    Ok(WorkerHandle {
        worker_id,
        http_addr,
        metrics,
        cancel,
        main,
        http,
    })
}

/// The startup checks, then the dispatcher and the schedule until shutdown.
async fn work(shared: Arc<Shared>, cancel: CancellationToken) -> Result<(), WorkerError> {
    let checked = preflight::wait_until_ready(
        &shared.cfg.database,
        "pgpay-worker preflight",
        None,
        &cancel,
    )
    .await;
    match checked {
        Ok(()) => info!("database checks passed"),
        Err(None) => return Ok(()),
        Err(Some(e)) => {
            // Stop the HTTP endpoint too: the process is about to exit.
            cancel.cancel();
            return Err(WorkerError::Setup(e));
        }
    }
    let scheduled =
        shared.cfg.reconcile_every.is_some() || shared.cfg.refresh_stuck_every.is_some();
    let schedule = async {
        if scheduled {
            jobs::schedule::run(shared.clone(), cancel.clone()).await;
        }
    };
    tokio::join!(
        Dispatcher::new(shared.clone(), cancel.clone()).run(),
        schedule
    );
    match shared.unauthorized.get() {
        Some(e) => Err(WorkerError::Unauthorized(e.clone())),
        None => Ok(()),
    }
}

/// [`start`], then wait until `cancel` is cancelled and the worker has drained.
pub async fn run(config: WorkerConfig, cancel: CancellationToken) -> Result<(), WorkerError> {
    start(config, cancel).await?.wait().await
}
