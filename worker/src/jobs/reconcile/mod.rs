//! Reconciliation (invariant 8): page through Stripe's PaymentIntents and Events for a window
//! and hand every object to the extension, which applies it through the same transition rule
//! as webhooks, adopts orphans and records findings. The worker decides nothing: it lists,
//! counts and reports.
//!
//! One run, in order:
//! 1. `pay.start_reconciliation` (NULL: another replica holds the run lease → [`Started::AlreadyRunning`]);
//! 2. `GET /v1/payment_intents?limit=100&created[gte]=…&starting_after=…`, newest first, each page
//!    to `pay.apply_stripe_objects(page, 'reconcile', run)` in one round trip, then
//!    `pay.progress_reconciliation` (lease renewal; `false` = the run was taken from us: stop).
//!    The next page is fetched while the current one is applied;
//!    Then `GET /v1/checkout/sessions?…` the same way (their `created`: a session lives at most
//!    24 hours, so the window's sessions are the ones that can still change), then
//!    `GET /v1/subscriptions?status=all&…` (every status, canceled ones included; then per test
//!    clock, which Stripe lists only when asked, in test mode) and
//!    `GET /v1/invoices?…` (a renewal whose webhooks were all lost is provisioned from its
//!    invoice);
//! 3. `GET /v1/events?…` pages through `pay.apply_stripe_event` (one statement per page);
//! 4. `pay.record_missing_at_stripe(run, every PaymentIntent id seen)` and
//!    `pay.record_missing_subscriptions_at_stripe(run, every subscription id seen)` once the
//!    listing is complete;
//! 5. `pay.finish_reconciliation(run, error)`.
//!
//! A dry run does all of that inside one transaction that is rolled back: nothing changes, not
//! even the run row. It holds the row locks of the payments it would change until it ends.
//!
//! Stripe calls go through the worker's [`StripeReader`] (rate limiter, retries,
//! classification).

mod run;

use std::time::Duration;

use pgpay_core::outcome::Outcome;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{connect, JobError};
use crate::config::WorkerConfig;
use crate::stripe::{RateLimiter, StripeClient, StripeReader};

/// How many would-be changes a dry run keeps for printing.
pub const MAX_CHANGES_KEPT: usize = 500;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// PaymentIntents and events created this long before now (the database's clock).
    pub window: Duration,
    /// Roll everything back at the end.
    pub dry_run: bool,
    /// The run's lease, renewed after every page.
    pub lease: Duration,
}

impl ReconcileOptions {
    /// A real run over `window` with a 10-minute lease.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            dry_run: false,
            lease: Duration::from_secs(600),
        }
    }
}

/// Counts of one run. Outcomes are those of `pay.apply_stripe_objects`, over every kind;
/// PaymentIntents and Checkout Sessions count together as objects, subscriptions and invoices
/// apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// PaymentIntent list pages.
    pub pages: u64,
    /// PaymentIntents seen.
    pub objects: u64,
    /// Changed a payment.
    pub applied: u64,
    /// Already equal.
    pub unchanged: u64,
    /// Older than what the database knows (audited as ignored).
    pub ignored: u64,
    /// Applied but flagged (amount or currency differs): not fulfilled.
    pub flagged: u64,
    /// Orphans adopted (created at Stripe, never recorded).
    pub adopted: u64,
    /// Without our metadata, or naming a payment we do not have.
    pub not_ours: u64,
    /// Event list pages.
    pub event_pages: u64,
    /// Events seen.
    pub events_seen: u64,
    /// Events that were new to the database (applied or stored).
    pub events_replayed: u64,
    /// Subscription list pages.
    pub subscription_pages: u64,
    /// Subscriptions seen.
    pub subscriptions: u64,
    /// Invoice list pages.
    pub invoice_pages: u64,
    /// Invoices seen.
    pub invoices: u64,
    /// Payments whose PaymentIntent Stripe did not list.
    pub missing_at_stripe: u64,
    /// New findings of this run (`pay.reconciliation_runs.findings`).
    pub findings: u64,
}

/// The one wording of a run's counts: `reconcile`'s summary and the "reconciliation
/// finished" log line both print this, so they cannot disagree.
impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pages, {} PaymentIntents, {} subscriptions, {} invoices ({} applied, {} flagged, {} adopted, {} unchanged, {} ignored, {} not ours), {} events seen, {} replayed, {} missing at Stripe, {} new findings",
            self.pages + self.subscription_pages + self.invoice_pages + self.event_pages,
            self.objects,
            self.subscriptions,
            self.invoices,
            self.applied,
            self.flagged,
            self.adopted,
            self.unchanged,
            self.ignored,
            self.not_ours,
            self.events_seen,
            self.events_replayed,
            self.missing_at_stripe,
            self.findings,
        )
    }
}

/// One object a dry run would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The PaymentIntent.
    pub stripe_object_id: String,
    /// Applied, flagged or adopted.
    pub outcome: Outcome,
    /// The payment, when it is ours.
    pub payment_id: Option<String>,
    /// Stripe's status.
    pub detail: Option<String>,
}

/// One finding of the run (listed after a dry run, when the role may read them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `amount_drift`, `orphan_adopted`, ...
    pub kind: String,
    pub payment_id: Option<String>,
    pub stripe_object_id: Option<String>,
    /// What the database holds.
    pub expected: Option<String>,
    /// What Stripe holds.
    pub actual: Option<String>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// `pay.reconciliation_runs.id` (rolled back after a dry run).
    pub run_id: i64,
    /// Whether everything was rolled back.
    pub dry_run: bool,
    pub counts: Counts,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Objects that changed (dry run: would change), the first [`MAX_CHANGES_KEPT`].
    pub changes: Vec<Change>,
    /// The run's findings (dry run only, and only if the role may read `pay.findings`).
    pub findings: Vec<Finding>,
}

/// Whether a run happened.
// One value per run, moved once: boxing the report would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Started {
    /// It ran to the end.
    Ran(Report),
    /// Another replica holds the reconciliation lease.
    AlreadyRunning,
}

/// Which part of the run a progress callback is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listing PaymentIntents.
    PaymentIntents,
    /// Listing Checkout Sessions.
    CheckoutSessions,
    /// Listing subscriptions (every status).
    Subscriptions,
    /// Listing invoices.
    Invoices,
    /// Replaying events.
    Events,
}

/// Runs one reconciliation on `client` (a dedicated connection).
/// `progress` is called after every page.
pub(crate) async fn reconcile(
    client: &Client,
    reader: &StripeReader<'_>,
    worker_id: &str,
    options: &ReconcileOptions,
    progress: &(dyn Fn(Phase, &Counts) + Send + Sync),
) -> Result<Started, JobError> {
    let job = run::Job {
        client,
        reader,
        worker_id,
        options,
        progress,
    };
    if options.dry_run {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(super::db_op("begin the dry run"))?;
        let result = run::run(&job).await;
        // Whatever happened, nothing of a dry run stays.
        let rollback = client.batch_execute("ROLLBACK").await;
        let started = result?;
        rollback.map_err(super::db_op("roll back the dry run"))?;
        Ok(started)
    } else {
        run::run(&job).await
    }
}

/// Runs one reconciliation with `config`'s database, Stripe client and rate limit: what
/// `pgpay-worker reconcile` does.
pub async fn reconcile_with_config(
    config: &WorkerConfig,
    options: &ReconcileOptions,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Phase, &Counts) + Send + Sync),
) -> Result<Started, crate::WorkerError> {
    config.validate()?;
    let stripe = StripeClient::new(&config.stripe)?;
    let limiter = RateLimiter::new(config.rate_limit);
    let reader = StripeReader::new(&stripe, &limiter, &config.retry, cancel);
    let client = connect(&config.database, "pgpay-worker reconcile").await?;
    Ok(reconcile(&client, &reader, &config.worker_id, options, progress).await?)
}
