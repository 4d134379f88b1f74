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
//! 3. `GET /v1/events?…` pages through `pay.apply_stripe_event` (one statement per page);
//! 4. `pay.record_missing_at_stripe(run, every PaymentIntent id seen)` once the listing is complete;
//! 5. `pay.finish_reconciliation(run, error)`.
//!
//! A dry run does all of that inside one transaction that is rolled back: nothing changes, not
//! even the run row. It holds the row locks of the payments it would change until it ends.
//!
//! Stripe calls go through the worker's rate limiter and are retried with the dispatcher's
//! classification ([`crate::classify::decide`]) and backoff ([`crate::backoff::RetryPolicy`]).

use std::time::{Duration, Instant};

pub use crate::tls::DatabaseConfig as Config;
use serde_json::Value;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::RetryPolicy;
use crate::classify::{decide, ErrorChain, WriteBack};
use crate::command::{Method, StripeRequest};
use crate::config::WorkerConfig;
use crate::ratelimit::RateLimiter;
use crate::stripe::StripeClient;

/// Objects per list page (Stripe's maximum).
pub const PAGE_SIZE: u32 = 100;
/// Attempts per Stripe request before the run gives up (with backoff between them).
pub const MAX_ATTEMPTS: i32 = 8;
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

/// Counts of one run. Outcomes are those of `pay.apply_stripe_objects`.
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
    /// Payments whose PaymentIntent Stripe did not list.
    pub missing_at_stripe: u64,
    /// New findings of this run (`pay.reconciliation_runs.findings`).
    pub findings: u64,
}

/// One object a dry run would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The PaymentIntent.
    pub stripe_object_id: String,
    /// `applied`, `flagged` or `adopted`.
    pub outcome: String,
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
    /// The payment.
    pub payment_id: Option<String>,
    /// The Stripe object.
    pub stripe_object_id: Option<String>,
    /// Ours.
    pub expected: Option<String>,
    /// Stripe's.
    pub actual: Option<String>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// `pay.reconciliation_runs.id` (rolled back after a dry run).
    pub run_id: i64,
    /// Whether everything was rolled back.
    pub dry_run: bool,
    /// The counts.
    pub counts: Counts,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Objects that changed (dry run: would change), the first [`MAX_CHANGES_KEPT`].
    pub changes: Vec<Change>,
    /// The run's findings (dry run only, and only if the role may read `pay.findings`).
    pub findings: Vec<Finding>,
}

/// Whether a run happened.
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
    /// Replaying events.
    Events,
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// No database connection.
    #[error("could not connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    /// A database call failed.
    #[error("database call failed: {op}")]
    Db {
        /// Which call.
        op: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Stripe refused a request for good (a 4xx other than 409/429).
    #[error("Stripe refused {what}: HTTP {status}: {message}")]
    Stripe {
        /// Which request.
        what: &'static str,
        /// HTTP status (0: none).
        status: u16,
        /// Stripe's error message.
        message: String,
    },
    /// A retryable failure outlasted [`MAX_ATTEMPTS`].
    #[error("gave up on {what} after {MAX_ATTEMPTS} attempts: {last_error}")]
    RetriesExhausted {
        /// Which request.
        what: &'static str,
        /// The last error.
        last_error: String,
    },
    /// Stripe's answer was not the list it should be.
    #[error("Stripe's answer to {0} is not a list")]
    NotAList(&'static str),
    /// `progress_reconciliation` said the run is no longer ours (its lease expired).
    #[error("the run's lease expired and it was closed; stopped")]
    LeaseLost,
    /// Shutdown was requested.
    #[error("canceled")]
    Canceled,
}

fn db(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ReconcileError {
    move |source| ReconcileError::Db { op, source }
}

/// Opens a dedicated connection (a run or a dry run's transaction lives on one connection).
pub async fn connect(config: &Config) -> Result<Client, ReconcileError> {
    let mut pg = config.clone();
    pg.application_name("pgpay-worker reconcile");
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    let (client, conn) = pg.connect().await.map_err(ReconcileError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "reconcile connection closed");
        }
    });
    Ok(client)
}

/// Reads from Stripe with the worker's rate limiter, retries and classification.
pub struct StripeReader<'a> {
    /// The client.
    pub stripe: &'a StripeClient,
    /// Shared with the dispatcher inside `run`, so both together stay under the limit.
    pub limiter: &'a RateLimiter,
    /// Backoff between attempts.
    pub retry: &'a RetryPolicy,
    /// Stops waits and requests.
    pub cancel: &'a CancellationToken,
}

/// A GET answer: 2xx JSON, or a 404.
enum Got {
    Found(Value),
    NotFound,
}

impl StripeReader<'_> {
    async fn get(
        &self,
        what: &'static str,
        path: String,
        params: Vec<(String, String)>,
    ) -> Result<Got, ReconcileError> {
        let req = StripeRequest {
            method: Method::Get,
            path,
            params,
            idempotency_key: None,
        };
        let url = self
            .stripe
            .url_for(&req)
            .map_err(|_| ReconcileError::Stripe {
                what,
                status: 0,
                message: "the path does not form a URL on the API base".into(),
            })?;
        let mut rng = fastrand::Rng::new();
        let mut attempt = 1;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(ReconcileError::Canceled),
                _ = self.limiter.acquire() => {}
            }
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(ReconcileError::Canceled),
                r = self.stripe.send(&req, url.clone(), self.stripe.request_timeout()) => r,
            };
            match decide(result, attempt, self.retry, &mut rng) {
                WriteBack::Complete { response, .. } => return Ok(Got::Found(response)),
                WriteBack::Fail {
                    http_status: Some(404),
                    ..
                } => return Ok(Got::NotFound),
                WriteBack::Fail { http_status, error } => {
                    return Err(ReconcileError::Stripe {
                        what,
                        status: http_status.unwrap_or(0),
                        message: error["error"]["message"]
                            .as_str()
                            .unwrap_or("no message")
                            .chars()
                            .take(500)
                            .collect(),
                    })
                }
                WriteBack::Retry { error, delay, .. } => {
                    if attempt >= MAX_ATTEMPTS {
                        return Err(ReconcileError::RetriesExhausted {
                            what,
                            last_error: error,
                        });
                    }
                    warn!(what, attempt, %error, retry_in = ?delay, "Stripe request failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(ReconcileError::Canceled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One page of a list endpoint, newest first.
    async fn list_page(
        &self,
        what: &'static str,
        path: &str,
        created_gte: i64,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), ReconcileError> {
        let mut params = vec![
            ("limit".to_owned(), PAGE_SIZE.to_string()),
            ("created[gte]".to_owned(), created_gte.to_string()),
        ];
        if let Some(after) = starting_after {
            params.push(("starting_after".to_owned(), after.to_owned()));
        }
        let Got::Found(mut body) = self.get(what, path.to_owned(), params).await? else {
            return Err(ReconcileError::Stripe {
                what,
                status: 404,
                message: "the list endpoint does not exist".into(),
            });
        };
        let has_more = body["has_more"].as_bool().unwrap_or(false);
        match body.get_mut("data").map(Value::take) {
            Some(Value::Array(data)) => Ok((data, has_more)),
            _ => Err(ReconcileError::NotAList(what)),
        }
    }
}

/// The cursor for the next page: the last object's id, if the page says there is more.
fn next_cursor(data: &[Value], has_more: bool) -> Option<String> {
    if !has_more {
        return None;
    }
    data.last()
        .and_then(|o| o["id"].as_str())
        .map(str::to_owned)
}

const START: &str = "SELECT run_id, floor(extract(epoch FROM w.window_start))::bigint \
     FROM (SELECT now() - make_interval(secs => $2::float8) AS window_start) w, \
     LATERAL pay.start_reconciliation($1::text, w.window_start, now(), make_interval(secs => $3::float8)) run_id";
const APPLY_OBJECTS: &str = "SELECT stripe_object_id, outcome, payment_id::text, detail \
     FROM pay.apply_stripe_objects($1::jsonb, $2::text, $3::bigint)";
const APPLY_EVENTS: &str =
    "SELECT r.status FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY e(value, n) \
     CROSS JOIN LATERAL pay.apply_stripe_event(e.value) r ORDER BY e.n";
const PROGRESS: &str =
    "SELECT pay.progress_reconciliation($1::bigint, $2::int, $3::int, $4::int, $5::int, \
     $6::int, $7::int, make_interval(secs => $8::float8))";
const MISSING: &str = "SELECT pay.record_missing_at_stripe($1::bigint, $2::text[])";
const FINISH: &str = "SELECT findings::bigint FROM pay.finish_reconciliation($1::bigint, $2::text)";
const FINDINGS: &str = "SELECT kind, payment_id::text, stripe_object_id, expected, actual \
     FROM pay.findings WHERE run_id = $1 ORDER BY id";

fn int(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Runs one reconciliation on `client` (a dedicated connection, see [`connect`]).
/// `progress` is called after every page.
pub async fn reconcile(
    client: &Client,
    reader: &StripeReader<'_>,
    worker_id: &str,
    options: &ReconcileOptions,
    progress: &(dyn Fn(Phase, &Counts) + Send + Sync),
) -> Result<Started, ReconcileError> {
    if options.dry_run {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(db("begin the dry run"))?;
        let result = run(client, reader, worker_id, options, progress).await;
        // Whatever happened, nothing of a dry run stays.
        let rollback = client.batch_execute("ROLLBACK").await;
        let started = result?;
        rollback.map_err(db("roll back the dry run"))?;
        Ok(started)
    } else {
        run(client, reader, worker_id, options, progress).await
    }
}

async fn run(
    client: &Client,
    reader: &StripeReader<'_>,
    worker_id: &str,
    options: &ReconcileOptions,
    progress: &(dyn Fn(Phase, &Counts) + Send + Sync),
) -> Result<Started, ReconcileError> {
    let started = Instant::now();
    let row = client
        .query_one(
            START,
            &[
                &worker_id,
                &options.window.as_secs_f64(),
                &options.lease.as_secs_f64(),
            ],
        )
        .await
        .map_err(db("start_reconciliation"))?;
    let Some(run_id) = row.get::<_, Option<i64>>(0) else {
        return Ok(Started::AlreadyRunning);
    };
    let window_start: i64 = row.get(1);
    info!(
        run_id,
        window = %humantime::format_duration(options.window),
        dry_run = options.dry_run,
        "reconciliation started"
    );
    let mut state = RunState {
        counts: Counts::default(),
        changes: Vec::new(),
        seen: Vec::new(),
    };
    let result = state
        .pages(client, reader, run_id, window_start, options, progress)
        .await;
    let error = result.as_ref().err().map(|e| ErrorChain(e).to_string());
    let finished = client
        .query_one(FINISH, &[&run_id, &error])
        .await
        .map_err(db("finish_reconciliation"));
    result?;
    state.counts.findings = finished?.get::<_, i64>(0).max(0) as u64;
    let findings = if options.dry_run {
        list_findings(client, run_id).await?
    } else {
        Vec::new()
    };
    let report = Report {
        run_id,
        dry_run: options.dry_run,
        counts: state.counts,
        elapsed: started.elapsed(),
        changes: state.changes,
        findings,
    };
    let c = &report.counts;
    info!(
        run_id,
        dry_run = report.dry_run,
        pages = c.pages,
        objects = c.objects,
        applied = c.applied,
        flagged = c.flagged,
        adopted = c.adopted,
        not_ours = c.not_ours,
        events_replayed = c.events_replayed,
        missing_at_stripe = c.missing_at_stripe,
        findings = c.findings,
        elapsed = ?report.elapsed,
        "reconciliation finished"
    );
    Ok(Started::Ran(report))
}

/// The run's findings, if this role may read them (a savepoint keeps a refusal from
/// aborting the dry run's transaction).
async fn list_findings(client: &Client, run_id: i64) -> Result<Vec<Finding>, ReconcileError> {
    client
        .batch_execute("SAVEPOINT pgpay_findings")
        .await
        .map_err(db("savepoint"))?;
    match client.query(FINDINGS, &[&run_id]).await {
        Ok(rows) => {
            client
                .batch_execute("RELEASE SAVEPOINT pgpay_findings")
                .await
                .map_err(db("release savepoint"))?;
            Ok(rows
                .iter()
                .map(|r| Finding {
                    kind: r.get(0),
                    payment_id: r.get(1),
                    stripe_object_id: r.get(2),
                    expected: r.get(3),
                    actual: r.get(4),
                })
                .collect())
        }
        Err(e) => {
            debug!(error = %e, "cannot list findings (no SELECT on pay.findings?)");
            client
                .batch_execute("ROLLBACK TO SAVEPOINT pgpay_findings")
                .await
                .map_err(db("rollback to savepoint"))?;
            Ok(Vec::new())
        }
    }
}

struct RunState {
    counts: Counts,
    changes: Vec<Change>,
    seen: Vec<String>,
}

impl RunState {
    async fn pages(
        &mut self,
        client: &Client,
        reader: &StripeReader<'_>,
        run_id: i64,
        window_start: i64,
        options: &ReconcileOptions,
        progress: &(dyn Fn(Phase, &Counts) + Send + Sync),
    ) -> Result<(), ReconcileError> {
        const PI: &str = "the PaymentIntent list";
        const EV: &str = "the event list";
        let apply = client.prepare(APPLY_OBJECTS).await.map_err(db("prepare"))?;
        let apply_events = client.prepare(APPLY_EVENTS).await.map_err(db("prepare"))?;
        let progress_stmt = client.prepare(PROGRESS).await.map_err(db("prepare"))?;

        // PaymentIntents: the next page is fetched while this one is applied.
        let mut page = reader
            .list_page(PI, "/v1/payment_intents", window_start, None)
            .await?;
        loop {
            let (data, has_more) = page;
            let cursor = next_cursor(&data, has_more);
            let fetch = async {
                match &cursor {
                    Some(after) => reader
                        .list_page(PI, "/v1/payment_intents", window_start, Some(after))
                        .await
                        .map(Some),
                    None => Ok(None),
                }
            };
            let (applied, next) =
                tokio::join!(self.apply_objects(client, &apply, run_id, data), fetch);
            applied?;
            self.save_progress(client, &progress_stmt, run_id, options)
                .await?;
            progress(Phase::PaymentIntents, &self.counts);
            match next? {
                Some(p) => page = p,
                None => break,
            }
            if reader.cancel.is_cancelled() {
                return Err(ReconcileError::Canceled);
            }
        }

        // Events the webhooks may have missed, through the same dedup and transition path.
        let mut cursor: Option<String> = None;
        loop {
            let (data, has_more) = reader
                .list_page(EV, "/v1/events", window_start, cursor.as_deref())
                .await?;
            cursor = next_cursor(&data, has_more);
            self.counts.event_pages += 1;
            self.counts.events_seen += data.len() as u64;
            let rows = client
                .query(&apply_events, &[&Value::Array(data)])
                .await
                .map_err(db("apply_stripe_event"))?;
            self.counts.events_replayed += rows
                .iter()
                .filter(|r| r.get::<_, Option<String>>(0).as_deref() != Some("duplicate"))
                .count() as u64;
            self.save_progress(client, &progress_stmt, run_id, options)
                .await?;
            progress(Phase::Events, &self.counts);
            if cursor.is_none() {
                break;
            }
            if reader.cancel.is_cancelled() {
                return Err(ReconcileError::Canceled);
            }
        }

        // The listing was complete: payments whose PaymentIntent Stripe did not list.
        let seen = std::mem::take(&mut self.seen);
        let missing: Option<i32> = client
            .query_one(MISSING, &[&run_id, &seen])
            .await
            .map_err(db("record_missing_at_stripe"))?
            .get(0);
        self.counts.missing_at_stripe = missing.unwrap_or(0).max(0) as u64;
        Ok(())
    }

    async fn apply_objects(
        &mut self,
        client: &Client,
        stmt: &tokio_postgres::Statement,
        run_id: i64,
        data: Vec<Value>,
    ) -> Result<(), ReconcileError> {
        self.counts.pages += 1;
        if data.is_empty() {
            return Ok(());
        }
        self.counts.objects += data.len() as u64;
        self.seen.extend(
            data.iter()
                .filter(|o| o["object"] == "payment_intent")
                .filter_map(|o| o["id"].as_str().map(str::to_owned)),
        );
        let rows = client
            .query(stmt, &[&Value::Array(data), &"reconcile", &run_id])
            .await
            .map_err(db("apply_stripe_objects"))?;
        for r in &rows {
            let outcome: Option<String> = r.get(1);
            let outcome = outcome.unwrap_or_default();
            let c = &mut self.counts;
            match outcome.as_str() {
                "applied" => c.applied += 1,
                "unchanged" => c.unchanged += 1,
                "ignored" => c.ignored += 1,
                "flagged" => c.flagged += 1,
                "adopted" => c.adopted += 1,
                "not_ours" => c.not_ours += 1,
                other => warn!(outcome = other, "unknown outcome from apply_stripe_objects"),
            }
            if matches!(outcome.as_str(), "applied" | "flagged" | "adopted")
                && self.changes.len() < MAX_CHANGES_KEPT
            {
                self.changes.push(Change {
                    stripe_object_id: r.get::<_, Option<String>>(0).unwrap_or_default(),
                    outcome,
                    payment_id: r.get(2),
                    detail: r.get(3),
                });
            }
        }
        Ok(())
    }

    async fn save_progress(
        &self,
        client: &Client,
        stmt: &tokio_postgres::Statement,
        run_id: i64,
        options: &ReconcileOptions,
    ) -> Result<(), ReconcileError> {
        let c = &self.counts;
        let ours: bool = client
            .query_one(
                stmt,
                &[
                    &run_id,
                    &int(c.pages + c.event_pages),
                    &int(c.objects),
                    &int(c.applied + c.flagged),
                    &int(c.adopted),
                    &int(c.not_ours),
                    &int(c.events_replayed),
                    &options.lease.as_secs_f64(),
                ],
            )
            .await
            .map_err(db("progress_reconciliation"))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        if ours {
            Ok(())
        } else {
            Err(ReconcileError::LeaseLost)
        }
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
    let reader = StripeReader {
        stripe: &stripe,
        limiter: &limiter,
        retry: &config.retry,
        cancel,
    };
    let client = connect(&config.database).await?;
    Ok(reconcile(&client, &reader, &config.worker_id, options, progress).await?)
}

/// What one refresh of stuck payments did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshReport {
    /// Stuck payments with a PaymentIntent id looked at.
    pub looked_up: u64,
    /// That changed (applied or flagged).
    pub applied: u64,
    /// Stripe answered 404.
    pub missing: u64,
}

const STUCK: &str = "SELECT id::text, stripe_payment_intent_id FROM pay.stuck_payments \
     WHERE stripe_payment_intent_id IS NOT NULL ORDER BY updated_at LIMIT $1";
const APPLY_REFRESH: &str =
    "SELECT outcome FROM pay.apply_stripe_objects($1::jsonb, 'refresh', NULL)";
const MISSING_ONE: &str = "SELECT pay.record_reconciliation_finding(NULL, 'missing_at_stripe', \
     $1::text::uuid, $2::text, 'retrievable', 'absent', 'GET of a stuck payment''s PaymentIntent answered 404')";

/// Refreshes up to `max` stuck payments (`pay.stuck_payments` with a PaymentIntent id) by
/// GETting their PaymentIntents and applying them with source `refresh`.
pub async fn refresh_stuck(
    client: &Client,
    reader: &StripeReader<'_>,
    max: i64,
) -> Result<RefreshReport, ReconcileError> {
    let rows = client
        .query(STUCK, &[&max])
        .await
        .map_err(db("read stuck_payments"))?;
    let mut report = RefreshReport::default();
    let mut objects = Vec::new();
    for r in rows {
        let payment: String = r.get(0);
        let intent: String = r.get(1);
        // The id goes into a path: only Stripe's id alphabet.
        if intent.is_empty()
            || !intent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            warn!(
                payment,
                "stuck payment with a malformed PaymentIntent id; skipped"
            );
            continue;
        }
        report.looked_up += 1;
        match reader
            .get(
                "a stuck payment's PaymentIntent",
                format!("/v1/payment_intents/{intent}"),
                Vec::new(),
            )
            .await?
        {
            Got::Found(pi) => objects.push(pi),
            Got::NotFound => {
                report.missing += 1;
                client
                    .query_one(MISSING_ONE, &[&payment, &intent])
                    .await
                    .map_err(db("record_reconciliation_finding"))?;
            }
        }
    }
    if !objects.is_empty() {
        let rows = client
            .query(APPLY_REFRESH, &[&Value::Array(objects)])
            .await
            .map_err(db("apply_stripe_objects"))?;
        report.applied = rows
            .iter()
            .filter(|r| {
                matches!(
                    r.get::<_, Option<String>>(0).as_deref(),
                    Some("applied" | "flagged" | "adopted")
                )
            })
            .count() as u64;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cursor_is_the_last_id_only_when_there_is_more() {
        let data = vec![json!({"id": "pi_3"}), json!({"id": "pi_2"})];
        assert_eq!(next_cursor(&data, true).as_deref(), Some("pi_2"));
        assert_eq!(next_cursor(&data, false), None);
        assert_eq!(next_cursor(&[], true), None);
        assert_eq!(next_cursor(&[json!({"no": "id"})], true), None);
    }

    #[test]
    fn counts_saturate_into_sql_ints() {
        assert_eq!(int(5), 5);
        assert_eq!(int(u64::MAX), i32::MAX);
    }
}
