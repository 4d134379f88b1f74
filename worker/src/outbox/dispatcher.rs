//! The dispatcher: one `tokio::select!` loop over the LISTEN connection, a periodic poll,
//! finished commands and shutdown. It claims batches, spawns one task per command and
//! hands every answer back to the database through the fenced outbox functions.
//!
//! Correctness rests on the poll, not on notifications: a NOTIFY is a doorbell that may be
//! lost (connection drop, worker restart, a retry coming due), so a command waits at most
//! one poll interval longer than it would with a perfect doorbell.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::{Id as TaskId, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::attempt::process;
use super::listener::{Listener, ListenerEvent};
use super::sql::{self, ClaimedRow};
use super::write_back::release;
use crate::error_chain::ErrorChain;
use crate::shared::Shared;

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
    // The last claim filled every free slot: more work is probably waiting, so claim
    // again as soon as a slot frees up instead of waiting for the next tick.
    backlog: bool,
    claim_failing: bool,
    // The earliest retry this worker scheduled: claim then instead of waiting for the poll.
    next_due: Option<Instant>,
}

impl Dispatcher {
    pub(crate) fn new(shared: Arc<Shared>, cancel: CancellationToken) -> Self {
        let listener = Listener::new(&shared.cfg, shared.metrics.clone());
        Self {
            semaphore: Arc::new(Semaphore::new(shared.cfg.concurrency)),
            shared,
            cancel,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            listener,
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
                Event::Listener(ev) => self.listener.on_event(ev),
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

    fn refill_threshold(&self) -> usize {
        let cfg = &self.shared.cfg;
        (cfg.concurrency.min(cfg.batch_size as usize) / 4).max(1)
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
            let rows = match sql::claim(
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
        self.listener.stop();
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
