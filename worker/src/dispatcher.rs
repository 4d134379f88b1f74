//! The dispatcher: one `tokio::select!` loop over the LISTEN connection, a periodic poll,
//! finished commands and shutdown. It claims batches, spawns one task per command and
//! hands every answer back to the database through the fenced outbox functions.
//!
//! Correctness rests on the poll, not on notifications: a NOTIFY is a doorbell that may be
//! lost (connection drop, worker restart, a retry coming due), so a command waits at most
//! one poll interval longer than it would with a perfect doorbell.

use std::collections::HashMap;
use std::future::{pending, poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{Id as TaskId, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::{AsyncMessage, Client, Socket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::backoff::reconnect_backoff;
use crate::classify::{decide, worker_error, ErrorChain, RetryReason, WriteBack};
use crate::command::{parse_request, Method, StripeRequest};
use crate::config::WorkerConfig;
use crate::db::{self, ClaimedRow, DbError};
use crate::metrics::{Metrics, Outcome};
use crate::ratelimit::RateLimiter;
use crate::stripe::{SendError, StripeClient, StripeResponse};

/// The outbox doorbell channel.
pub const CHANNEL: &str = "pay_outbox";

/// Safety margin between the end of our send and the end of our lease, for clock-rate
/// differences and the time the claim itself took. `validate` requires
/// `lease >= request_timeout + 2 * LEASE_MARGIN`.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// Do not start a request with less time than this before `lease - LEASE_MARGIN`.
const MIN_SEND_WINDOW: Duration = Duration::from_millis(500);

/// How long the write-back of one answer keeps retrying a failing database.
const WRITE_BACK_BUDGET: Duration = Duration::from_secs(10);

/// What every command task shares.
pub(crate) struct Shared {
    pub cfg: WorkerConfig,
    pub pool: Pool,
    pub stripe: StripeClient,
    pub limiter: RateLimiter,
    pub metrics: Arc<Metrics>,
}

type PgConnection = tokio_postgres::Connection<Socket, crate::tls::PgTlsStream<Socket>>;
type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<Box<Listening>, tokio_postgres::Error>> + Send>>;

/// An open LISTEN connection.
struct Listening {
    // Dropping the client would close the connection.
    _client: Client,
    conn: PgConnection,
}

/// The LISTEN connection's state. Futures that must survive a `select!` iteration
/// (a connect in progress, a reconnect delay) are boxed here, so selecting on another
/// branch never cancels them.
enum Listener {
    Off,
    Waiting(Pin<Box<tokio::time::Sleep>>),
    Connecting(ConnectFuture),
    Connected(Box<Listening>),
}

enum ListenerEvent {
    ReconnectDue,
    Connected(Box<Listening>),
    ConnectFailed(tokio_postgres::Error),
    Notification,
    Other,
    Lost(Option<tokio_postgres::Error>),
}

impl Listener {
    /// Cancel-safe: every await point is on a future stored in `self` or on `poll_message`.
    async fn next_event(&mut self) -> ListenerEvent {
        match self {
            Listener::Off => pending().await,
            Listener::Waiting(sleep) => {
                sleep.as_mut().await;
                ListenerEvent::ReconnectDue
            }
            Listener::Connecting(fut) => match fut.as_mut().await {
                Ok(listening) => ListenerEvent::Connected(listening),
                Err(e) => ListenerEvent::ConnectFailed(e),
            },
            Listener::Connected(l) => match poll_fn(|cx| l.conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                    ListenerEvent::Notification
                }
                Some(Ok(_)) => ListenerEvent::Other,
                Some(Err(e)) => ListenerEvent::Lost(Some(e)),
                None => ListenerEvent::Lost(None),
            },
        }
    }
}

/// Opens the dedicated connection and runs `LISTEN pay_outbox`, driving the connection
/// with `poll_message` while the statement runs.
async fn connect_and_listen(
    config: crate::tls::DatabaseConfig,
) -> Result<Box<Listening>, tokio_postgres::Error> {
    let (client, mut conn) = config.connect().await?;
    {
        let listen = client.batch_execute("LISTEN pay_outbox");
        tokio::pin!(listen);
        loop {
            tokio::select! {
                r = &mut listen => {
                    r?;
                    break;
                }
                m = poll_fn(|cx| conn.poll_message(cx)) => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    // Closed: the LISTEN future now fails with the reason.
                    None => {
                        listen.await?;
                        break;
                    }
                },
            }
        }
    }
    Ok(Box::new(Listening {
        _client: client,
        conn,
    }))
}

fn listener_config(cfg: &WorkerConfig) -> crate::tls::DatabaseConfig {
    let mut pg = cfg.database.clone();
    pg.application_name("pgpay-worker listener");
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    // A silently dead TCP connection loses doorbells; the poll covers that, keepalives
    // shorten it.
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg
}

struct InFlight {
    row: ClaimedRow,
}

enum Event {
    Cancelled,
    TaskDone(Result<(TaskId, Option<Duration>), JoinError>),
    RetryDue,
    Listener(ListenerEvent),
    Tick,
}

pub(crate) struct Dispatcher {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    semaphore: Arc<Semaphore>,
    tasks: JoinSet<Option<Duration>>,
    in_flight: HashMap<TaskId, InFlight>,
    listener: Listener,
    reconnect: backon::ExponentialBackoff,
    // The last claim filled every free slot: more work is probably waiting, so claim
    // again as soon as a slot frees up instead of waiting for the next tick.
    backlog: bool,
    claim_failing: bool,
    // The earliest retry this worker scheduled: claim then instead of waiting for the poll.
    next_due: Option<Instant>,
}

impl Dispatcher {
    pub(crate) fn new(shared: Arc<Shared>, cancel: CancellationToken) -> Self {
        let listener = if shared.cfg.listen_for_notifications {
            Listener::Connecting(Box::pin(connect_and_listen(listener_config(&shared.cfg))))
        } else {
            Listener::Off
        };
        Self {
            semaphore: Arc::new(Semaphore::new(shared.cfg.concurrency)),
            shared,
            cancel,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            listener,
            reconnect: reconnect_backoff(),
            backlog: false,
            claim_failing: false,
            next_due: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut poll = tokio::time::interval(self.shared.cfg.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(
            worker_id = %self.shared.cfg.worker_id,
            concurrency = self.shared.cfg.concurrency,
            rate_limit = self.shared.cfg.rate_limit,
            "dispatcher started"
        );
        loop {
            let event = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Event::Cancelled,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    Event::TaskDone(done)
                }
                ev = self.listener.next_event() => Event::Listener(ev),
                _ = tokio::time::sleep_until(self.next_due.unwrap_or_else(Instant::now)),
                    if self.next_due.is_some() => Event::RetryDue,
                _ = poll.tick() => Event::Tick,
            };
            let claim = match event {
                Event::Cancelled => break,
                Event::TaskDone(done) => {
                    self.on_task_done(done).await;
                    // With a backlog, refill in batches rather than one claim per finished
                    // command: wait until a quarter of the slots are free (or all are).
                    self.backlog
                        && (self.tasks.is_empty()
                            || self.semaphore.available_permits() >= self.refill_threshold())
                }
                Event::Listener(ev) => self.on_listener_event(ev),
                Event::RetryDue => {
                    self.next_due = None;
                    true
                }
                Event::Tick => {
                    self.shared.metrics.poll();
                    true
                }
            };
            if claim && !self.cancel.is_cancelled() {
                self.backlog = self.claim_and_spawn().await;
            }
        }
        self.shutdown().await;
    }

    fn on_listener_event(&mut self, ev: ListenerEvent) -> bool {
        let metrics = self.shared.metrics.clone();
        match ev {
            ListenerEvent::ReconnectDue => {
                self.listener = Listener::Connecting(Box::pin(connect_and_listen(
                    listener_config(&self.shared.cfg),
                )));
                false
            }
            ListenerEvent::Connected(listening) => {
                info!("listening on {CHANNEL}");
                metrics.listener_up(true);
                self.reconnect = reconnect_backoff();
                self.listener = Listener::Connected(listening);
                // Doorbells rung while we were not listening are gone: look now.
                true
            }
            ListenerEvent::ConnectFailed(e) => {
                let delay = self.next_reconnect_delay();
                warn!(error = %ErrorChain(&e), ?delay, "LISTEN connection failed; retrying");
                metrics.db_error("listen");
                self.listener = Listener::Waiting(Box::pin(tokio::time::sleep(delay)));
                false
            }
            ListenerEvent::Notification => {
                metrics.notification();
                true
            }
            ListenerEvent::Other => false,
            ListenerEvent::Lost(e) => {
                let delay = self.next_reconnect_delay();
                match e {
                    Some(e) => {
                        warn!(error = %ErrorChain(&e), ?delay, "LISTEN connection lost; reconnecting")
                    }
                    None => warn!(?delay, "LISTEN connection closed; reconnecting"),
                }
                metrics.listener_up(false);
                metrics.db_error("listen");
                self.listener = Listener::Waiting(Box::pin(tokio::time::sleep(delay)));
                false
            }
        }
    }

    fn refill_threshold(&self) -> usize {
        let cfg = &self.shared.cfg;
        (cfg.concurrency.min(cfg.batch_size as usize) / 4).max(1)
    }

    fn next_reconnect_delay(&mut self) -> Duration {
        self.reconnect.next().unwrap_or(Duration::from_secs(10))
    }

    /// Claims as long as there are free slots and full batches come back. Returns whether
    /// the last claim was full (more work is likely waiting).
    async fn claim_and_spawn(&mut self) -> bool {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        loop {
            let free = self
                .semaphore
                .available_permits()
                .min(cfg.batch_size as usize);
            if free == 0 {
                return true;
            }
            // Measured before the claim, so our idea of the lease ends no later than the
            // database's `now() + lease`.
            let claimed_at = Instant::now();
            let rows = match db::claim(
                &shared.pool,
                &cfg.worker_id,
                free as i32,
                cfg.lease,
                cfg.key_retention_guard,
            )
            .await
            {
                Ok(rows) => {
                    if self.claim_failing {
                        info!("claiming works again");
                        self.claim_failing = false;
                    }
                    rows
                }
                Err(e) => {
                    self.shared.metrics.db_error("claim");
                    if self.claim_failing {
                        debug!(error = %ErrorChain(&e), "claim failed again");
                    } else {
                        warn!(error = %ErrorChain(&e), "claim failed; retrying at the next poll");
                        self.claim_failing = true;
                    }
                    return false;
                }
            };
            let n = rows.len();
            self.shared.metrics.claimed_n(n as u64);
            for row in rows {
                self.spawn(row, claimed_at + cfg.lease).await;
            }
            self.shared.metrics.set_in_flight(self.tasks.len() as i64);
            if n < free || self.cancel.is_cancelled() {
                return false;
            }
        }
    }

    async fn spawn(&mut self, row: ClaimedRow, lease_deadline: Instant) {
        // Only this loop acquires permits, and it asked for no more rows than were free,
        // so this never waits; `closed` cannot happen (the semaphore is never closed).
        let Ok(permit) = self.semaphore.clone().acquire_owned().await else {
            release(&self.shared, &row, "worker could not schedule the command").await;
            return;
        };
        let span = info_span!(
            "command",
            id = row.id,
            kind = %row.kind,
            attempt = row.attempt,
            payment_id = row.payment_id.as_deref().unwrap_or(""),
        );
        let fut = process(
            self.shared.clone(),
            row.clone(),
            lease_deadline,
            self.cancel.clone(),
            permit,
        )
        .instrument(span);
        let handle = self.tasks.spawn(fut);
        self.in_flight.insert(handle.id(), InFlight { row });
    }

    async fn on_task_done(&mut self, done: Result<(TaskId, Option<Duration>), JoinError>) {
        match done {
            Ok((id, retry_in)) => {
                self.in_flight.remove(&id);
                if let Some(d) = retry_in {
                    let due = Instant::now() + d;
                    self.next_due = Some(self.next_due.map_or(due, |n| n.min(due)));
                }
            }
            Err(e) => {
                let entry = self.in_flight.remove(&e.id());
                if let Some(InFlight { row }) = entry {
                    let why = if e.is_panic() {
                        error!(id = row.id, "command task panicked; releasing the command");
                        "worker task panicked"
                    } else {
                        "abandoned at shutdown while in flight"
                    };
                    release(&self.shared, &row, why).await;
                }
            }
        }
        self.shared.metrics.set_in_flight(self.tasks.len() as i64);
    }

    /// Stop claiming; let in-flight requests finish for up to `shutdown_timeout` (tasks
    /// still waiting for a rate-limit slot see the cancellation and release their rows);
    /// then abort what is left and release those rows too, so nothing stays `in_flight`
    /// until its lease runs out. Re-sending an aborted request is safe: same key.
    async fn shutdown(mut self) {
        self.listener = Listener::Off;
        self.shared.metrics.listener_up(false);
        info!(
            in_flight = self.tasks.len(),
            "shutting down: no more claims, draining"
        );
        let deadline = Instant::now() + self.shared.cfg.shutdown_timeout;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(done)) => self.on_task_done(done).await,
                Ok(None) | Err(_) => break,
            }
        }
        if !self.tasks.is_empty() {
            warn!(
                remaining = self.tasks.len(),
                "shutdown timeout reached; abandoning in-flight requests and releasing their commands"
            );
            self.tasks.abort_all();
            while let Some(done) = self.tasks.join_next_with_id().await {
                self.on_task_done(done).await;
            }
        }
        info!("dispatcher stopped");
    }
}

/// The kind whose re-send past Stripe's key retention could create a second PaymentIntent.
const CREATE: &str = "create_payment_intent";

/// One command, from parse to write-back. Never returns an error: every failure ends in
/// a write-back (or, if the database is unreachable, in the lease running out). Returns the
/// retry delay when the command was handed back for a retry.
async fn process(
    shared: Arc<Shared>,
    row: ClaimedRow,
    lease_deadline: Instant,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) -> Option<Duration> {
    let prepared = parse_request(&row.request, row.idempotency_key.as_deref())
        .map_err(|e| e.to_string())
        .and_then(|req| match shared.stripe.url_for(&req) {
            Ok(url) => Ok((req, url)),
            Err(e) => Err(e.to_string()),
        });
    let (mut req, url) = match prepared {
        Ok(p) => p,
        Err(msg) => {
            warn!(error = %msg, "malformed command; failing it permanently");
            let wb = WriteBack::Fail {
                http_status: None,
                error: worker_error(format!("malformed outbox command: {msg}")),
            };
            return finish(&shared, &row, wb).await;
        }
    };

    let mut timeout = send_slot(&shared, &row, lease_deadline, &cancel).await?;
    if row.past_key_retention && row.kind == CREATE && req.method == Method::Post {
        match key_retention_lookup(&shared, &row, timeout).await {
            Lookup::Rekeyed(key) => req.idempotency_key = Some(key),
            Lookup::Done(wb) => return finish(&shared, &row, wb).await,
            Lookup::Release(why) => {
                release(&shared, &row, why).await;
                return None;
            }
        }
        timeout = send_slot(&shared, &row, lease_deadline, &cancel).await?;
    }

    let result = send_timed(&shared, &row.kind, &req, url, timeout).await;
    let wb = decide(
        result,
        row.attempt,
        &shared.cfg.retry,
        &mut fastrand::Rng::new(),
    );
    finish(&shared, &row, wb).await
}

/// Waits for a rate-limit slot and checks the lease. Returns the timeout for the request,
/// or `None` after releasing the command (shutdown, or too little lease left to send).
async fn send_slot(
    shared: &Shared,
    row: &ClaimedRow,
    lease_deadline: Instant,
    cancel: &CancellationToken,
) -> Option<Duration> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => {
            release(shared, row, "released at shutdown").await;
            return None;
        }
        _ = shared.limiter.acquire() => {}
    }
    let remaining = lease_deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(LEASE_MARGIN);
    if remaining < MIN_SEND_WINDOW {
        // Sending now could overlap with another worker that takes over the lease.
        warn!("lease nearly expired before the request could start; releasing");
        release(shared, row, "lease nearly expired before send").await;
        return None;
    }
    Some(shared.stripe.request_timeout().min(remaining))
}

async fn send_timed(
    shared: &Shared,
    kind: &str,
    req: &StripeRequest,
    url: reqwest::Url,
    timeout: Duration,
) -> Result<StripeResponse, SendError> {
    let started = Instant::now();
    let result = shared.stripe.send(req, url, timeout).await;
    let elapsed = started.elapsed();
    shared.metrics.observe_latency(kind, elapsed.as_secs_f64());
    match &result {
        Ok(resp) => debug!(
            status = resp.status,
            request_id = resp.request_id.as_deref().unwrap_or(""),
            replayed = resp.replayed,
            ?elapsed,
            "Stripe answered"
        ),
        Err(e) => debug!(error = %ErrorChain(e), ?elapsed, "no answer from Stripe"),
    }
    result
}

/// Writes back and returns the retry delay when the command went back for a retry.
async fn finish(shared: &Shared, row: &ClaimedRow, wb: WriteBack) -> Option<Duration> {
    let retry_in = match &wb {
        WriteBack::Retry { delay, .. } => Some(*delay),
        _ => None,
    };
    match write_back(shared, row, wb).await {
        Outcome::Retried => retry_in,
        _ => None,
    }
}

enum Lookup {
    /// Nothing at Stripe: send the create with this new key.
    Rekeyed(String),
    /// Adopted (complete) or the lookup failed (retry).
    Done(WriteBack),
    /// The re-key was declined (adopted meanwhile, or fenced): hand the command back.
    Release(&'static str),
}

/// Invariant 2 past Stripe's 24-hour key retention: a create whose first attempt is older
/// than the guard is never re-sent with its old key (Stripe may have forgotten it and would
/// create a second PaymentIntent). Search by our metadata instead: found, it is adopted as
/// the create's answer; not found, the extension re-keys the command and it is sent anew.
async fn key_retention_lookup(shared: &Shared, row: &ClaimedRow, timeout: Duration) -> Lookup {
    let retry = |error: String| {
        shared.metrics.key_lookup("failed");
        Lookup::Done(WriteBack::Retry {
            http_status: None,
            error,
            delay: shared
                .cfg
                .retry
                .delay(row.attempt, None, &mut fastrand::Rng::new()),
            reason: RetryReason::LookupFailed,
        })
    };
    let Some(payment_id) = row.payment_id.as_deref() else {
        return retry("key-retention lookup: the command has no payment id".into());
    };
    let search = StripeRequest {
        method: Method::Get,
        path: "/v1/payment_intents/search".into(),
        params: vec![
            ("limit".into(), "10".into()),
            (
                "query".into(),
                format!("metadata['pgpay_payment_id']:'{payment_id}'"),
            ),
        ],
        idempotency_key: None,
    };
    let Ok(url) = shared.stripe.url_for(&search) else {
        return retry("key-retention lookup: cannot build the search URL".into());
    };
    info!("create is past Stripe's key retention; looking for its PaymentIntent before re-sending");
    let resp = match send_timed(shared, &row.kind, &search, url, timeout).await {
        Ok(resp) if (200..300).contains(&resp.status) => resp,
        result => {
            // Whatever the search says, a failed lookup never fails the create: try again.
            let error = match decide(
                result,
                row.attempt,
                &shared.cfg.retry,
                &mut fastrand::Rng::new(),
            ) {
                WriteBack::Retry { error, .. } => error,
                WriteBack::Fail { error, http_status } => format!(
                    "HTTP {} {}",
                    http_status.unwrap_or(0),
                    error["error"]["message"].as_str().unwrap_or("")
                ),
                WriteBack::Complete { .. } => String::new(),
            };
            return retry(format!("key-retention lookup failed: {error}"));
        }
    };
    let data = match serde_json::from_slice::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
    {
        Some(serde_json::Value::Array(data)) => data,
        _ => return retry("key-retention lookup: the search answer has no data list".into()),
    };
    if data.len() > 1 {
        warn!(
            found = data.len(),
            "more than one PaymentIntent carries this payment's id; adopting the first"
        );
    }
    let found = data.into_iter().find(|pi| pi["object"] == "payment_intent");
    if let Some(pi) = found {
        shared.metrics.key_lookup("adopted");
        info!("found the PaymentIntent at Stripe; adopting it instead of creating another");
        return Lookup::Done(WriteBack::Complete {
            http_status: resp.status,
            response: pi,
            replayed: false,
        });
    }
    let reason = format!(
        "no PaymentIntent with metadata pgpay_payment_id={payment_id} at Stripe after the key's retention"
    );
    match db::rekey_create(&shared.pool, row.id, row.attempt, &reason).await {
        Ok(Some(key)) => {
            shared.metrics.key_lookup("rekeyed");
            info!("no PaymentIntent at Stripe; the create was re-keyed and is sent anew");
            Lookup::Rekeyed(key)
        }
        Ok(None) => Lookup::Release("re-key declined: adopted meanwhile or taken over"),
        Err(e) => {
            shared.metrics.db_error("rekey");
            retry(format!(
                "key-retention lookup: re-key failed: {}",
                db_error_text(&e)
            ))
        }
    }
}

/// Calls the fenced outbox function for `wb`, retrying a failing database briefly.
async fn write_back(shared: &Shared, row: &ClaimedRow, wb: WriteBack) -> Outcome {
    let pool = &shared.pool;
    let metrics = &shared.metrics;
    let (op, success) = match &wb {
        WriteBack::Complete { .. } => ("complete", Outcome::Completed),
        WriteBack::Retry { .. } => ("retry", Outcome::Retried),
        WriteBack::Fail { .. } => ("fail", Outcome::Failed),
    };
    if let WriteBack::Complete { replayed: true, .. } = &wb {
        metrics.replayed();
    }
    if let WriteBack::Retry { reason, .. } = &wb {
        metrics.retry(reason.as_str());
    }
    let call = || async {
        match &wb {
            WriteBack::Complete {
                http_status,
                response,
                ..
            } => db::complete(pool, row.id, row.attempt, i32::from(*http_status), response).await,
            WriteBack::Retry {
                http_status,
                error,
                delay,
                ..
            } => {
                db::retry(
                    pool,
                    row.id,
                    row.attempt,
                    http_status.map(i32::from),
                    error,
                    *delay,
                )
                .await
            }
            WriteBack::Fail { http_status, error } => {
                db::fail(pool, row.id, row.attempt, http_status.map(i32::from), error).await
            }
        }
    };
    let applied = call
        .retry(db_retry())
        .when(DbError::is_transient)
        .notify(|e: &DbError, d| {
            metrics.db_error(op);
            warn!(error = %ErrorChain(e), retry_in = ?d, "write-back failed; retrying");
        })
        .await;
    let outcome = match applied {
        Ok(true) => success,
        Ok(false) => Outcome::Fenced,
        Err(e) if !e.is_transient() && !matches!(wb, WriteBack::Retry { .. }) => {
            // The database refused the answer on its merits (an extension bug, a check
            // that fires): sending again would only get the same answer at the rate of the
            // lease. Park the command as a retry with backoff and the reason in last_error,
            // where outbox_health shows it, instead.
            metrics.db_error(op);
            error!(
                error = %ErrorChain(&e),
                "the database rejected Stripe's answer; parking the command for a retry"
            );
            let delay = shared
                .cfg
                .retry
                .delay(row.attempt, None, &mut fastrand::Rng::new());
            let why = format!(
                "the database rejected the {op} write-back: {}",
                db_error_text(&e)
            );
            match db::retry(pool, row.id, row.attempt, None, &why, delay).await {
                Ok(true) => {
                    metrics.retry("write_back_rejected");
                    Outcome::Retried
                }
                Ok(false) => Outcome::Fenced,
                Err(_) => Outcome::Abandoned,
            }
        }
        Err(e) => {
            metrics.db_error(op);
            error!(
                error = %ErrorChain(&e),
                "could not record Stripe's answer; the lease will expire and the command \
                 will be re-sent with the same Idempotency-Key"
            );
            Outcome::Abandoned
        }
    };
    match (&wb, outcome) {
        (_, Outcome::Fenced) => info!(
            op,
            "write-back refused: the lease was taken over by a newer attempt; dropping our result"
        ),
        (
            WriteBack::Complete {
                http_status,
                replayed,
                ..
            },
            Outcome::Completed,
        ) => {
            info!(http_status, replayed, "command completed")
        }
        (
            WriteBack::Retry {
                http_status,
                reason,
                delay,
                ..
            },
            Outcome::Retried,
        ) => info!(
            http_status,
            reason = reason.as_str(),
            retry_in = ?delay,
            "command will be retried"
        ),
        (WriteBack::Fail { http_status, .. }, Outcome::Failed) => {
            warn!(http_status, "command failed permanently")
        }
        _ => {}
    }
    metrics.command(&row.kind, outcome);
    outcome
}

/// Hands a claimed, unsent command back: pending again right away, same attempt fencing.
async fn release(shared: &Shared, row: &ClaimedRow, why: &str) -> Outcome {
    let pool = &shared.pool;
    let applied = (|| db::retry(pool, row.id, row.attempt, None, why, Duration::ZERO))
        .retry(db_retry().with_total_delay(Some(Duration::from_secs(3))))
        .when(DbError::is_transient)
        .await;
    let outcome = match applied {
        Ok(true) => Outcome::Released,
        Ok(false) => Outcome::Fenced,
        Err(e) => {
            shared.metrics.db_error("release");
            warn!(
                id = row.id,
                error = %ErrorChain(&e),
                "could not release the command; it will be reclaimed when its lease expires"
            );
            Outcome::Abandoned
        }
    };
    debug!(id = row.id, why, outcome = outcome.as_str(), "released");
    shared.metrics.command(&row.kind, outcome);
    outcome
}

/// `SQLSTATE: message` of a database error, for `last_error`.
fn db_error_text(e: &DbError) -> String {
    match e {
        DbError::Query(q) => match q.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => ErrorChain(e).to_string(),
        },
        _ => ErrorChain(e).to_string(),
    }
}

fn db_retry() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(WRITE_BACK_BUDGET))
}
