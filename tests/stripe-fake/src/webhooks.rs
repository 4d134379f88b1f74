//! Signed webhook delivery to one registered endpoint, with the misbehaviours a receiver must
//! survive: duplicates, reordering, delay, drops, holding and late release, and retries of
//! non-2xx answers, and Stripe's later redelivery of an event no copy of which got a 2xx. Every
//! attempt and its answer goes into the ledger.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::clock::wall_clock;
use crate::shared::Shared;

/// Only the newest delivery records are kept; a benchmark sends far more than a test reads.
pub const MAX_RECORDS: usize = 10_000;
/// How long the dispatcher waits for more events to fill a reorder window.
const REORDER_LINGER: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const MAX_DELAY_MS: u64 = 60_000;
pub const MAX_REDELIVER_AFTER_MS: u64 = 600_000;

/// Where events go. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("url", &self.url)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// How deliveries misbehave. JSON field names are the same; every field is optional in a patch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryOptions {
    /// Extra copies of each delivery (1 sends every event twice).
    pub duplicate: u32,
    /// Shuffle deliveries within windows of this many events (0 or 1: keep order).
    pub reorder_window: usize,
    /// Wait this long before each delivery.
    pub delay_ms: u64,
    /// Lose each delivery with this probability (seeded).
    pub drop_probability: f64,
    /// Lose the next N deliveries.
    pub drop_next: u32,
    /// Attempts per delivery before giving up on a non-2xx answer or a connection error.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time (Stripe waits hours; tests cannot).
    pub retry_backoff_ms: u64,
    /// Stripe keeps trying for three days: when set (> 0), an event whose delivery was dropped or
    /// ran out of attempts, and no copy of which got a 2xx, is queued again after this long, as
    /// often as it takes. 0: never (a lost delivery stays lost until `resend`).
    pub redeliver_after_ms: u64,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            duplicate: 0,
            reorder_window: 0,
            delay_ms: 0,
            drop_probability: 0.0,
            drop_next: 0,
            max_attempts: 4,
            retry_backoff_ms: 50,
            redeliver_after_ms: 0,
        }
    }
}

impl DeliveryOptions {
    pub fn validate(&self) -> Result<(), WebhookError> {
        if !(0.0..=1.0).contains(&self.drop_probability) {
            return Err(WebhookError::Option(
                "drop_probability must be between 0 and 1",
            ));
        }
        if self.max_attempts == 0 {
            return Err(WebhookError::Option("max_attempts must be at least 1"));
        }
        if self.delay_ms > MAX_DELAY_MS {
            return Err(WebhookError::Option("delay_ms must be at most 60000"));
        }
        if self.redeliver_after_ms > MAX_REDELIVER_AFTER_MS {
            return Err(WebhookError::Option(
                "redeliver_after_ms must be at most 600000",
            ));
        }
        if self.duplicate > 100 || self.reorder_window > 10_000 {
            return Err(WebhookError::Option(
                "duplicate must be at most 100 and reorder_window at most 10000",
            ));
        }
        Ok(())
    }
}

/// A partial update of [`DeliveryOptions`] (the control endpoint's body).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryOptionsPatch {
    pub duplicate: Option<u32>,
    pub reorder_window: Option<usize>,
    pub delay_ms: Option<u64>,
    pub drop_probability: Option<f64>,
    pub drop_next: Option<u32>,
    pub max_attempts: Option<u32>,
    pub retry_backoff_ms: Option<u64>,
    pub redeliver_after_ms: Option<u64>,
}

impl DeliveryOptionsPatch {
    pub fn applied_to(&self, options: &DeliveryOptions) -> DeliveryOptions {
        DeliveryOptions {
            duplicate: self.duplicate.unwrap_or(options.duplicate),
            reorder_window: self.reorder_window.unwrap_or(options.reorder_window),
            delay_ms: self.delay_ms.unwrap_or(options.delay_ms),
            drop_probability: self.drop_probability.unwrap_or(options.drop_probability),
            drop_next: self.drop_next.unwrap_or(options.drop_next),
            max_attempts: self.max_attempts.unwrap_or(options.max_attempts),
            retry_backoff_ms: self.retry_backoff_ms.unwrap_or(options.retry_backoff_ms),
            redeliver_after_ms: self
                .redeliver_after_ms
                .unwrap_or(options.redeliver_after_ms),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid delivery option: {0}")]
    Option(&'static str),
    #[error("the webhook URL must start with http:// or https://")]
    Url,
    #[error("the webhook secret must not be empty")]
    Secret,
}

impl WebhookEndpoint {
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> Result<Self, WebhookError> {
        let endpoint = WebhookEndpoint {
            url: url.into(),
            secret: secret.into(),
        };
        if !(endpoint.url.starts_with("http://") || endpoint.url.starts_with("https://")) {
            return Err(WebhookError::Url);
        }
        if endpoint.secret.is_empty() {
            return Err(WebhookError::Secret);
        }
        Ok(endpoint)
    }
}

/// Delivery counters. `ok` counts deliveries answered 2xx (a duplicate copy counts on its own);
/// `failed` those that ran out of attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookCounts {
    /// Events handed to delivery (an endpoint was registered when they happened).
    pub queued: u64,
    /// Events waiting for a release.
    pub held: u64,
    /// HTTP attempts made.
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Attempts after the first for the same copy.
    pub retried: u64,
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Events queued again by `redeliver_after_ms` (Stripe's later retries).
    #[serde(default)]
    pub redelivered: u64,
}

/// How one event's deliveries went, for the ledger's event list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDelivery {
    /// Copies answered 2xx: the event counts as delivered from the first.
    pub ok: u32,
    /// Copies still being attempted (or backing off between attempts).
    pub open: u32,
    /// Copies dropped or out of attempts.
    pub lost: u32,
}

/// One attempt, or one drop (`attempt` 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub event_id: String,
    pub event_type: String,
    /// 0 for the original, 1.. for duplicates.
    pub copy: u32,
    pub attempt: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// `ok`, `retrying`, `failed` or `dropped`.
    pub outcome: String,
    /// Wall-clock unix seconds.
    pub at: i64,
}

/// One event on its way out.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event_id: String,
    pub event_type: String,
    pub payload: Bytes,
    /// Deliveries started before a reset must not count in the ledger after it.
    epoch: u64,
    /// Queued again by `redeliver_after_ms`: skipped if a copy got a 2xx meanwhile.
    redelivery: bool,
}

/// What the dispatcher decided for one event.
#[derive(Debug, Clone)]
struct Plan {
    endpoint: WebhookEndpoint,
    copies: u32,
    delay: Duration,
    max_attempts: u32,
    backoff: Duration,
}

pub type Sender = mpsc::UnboundedSender<Vec<Delivery>>;
pub type Receiver = mpsc::UnboundedReceiver<Vec<Delivery>>;

#[derive(Debug)]
pub struct WebhookState {
    pub endpoint: Option<WebhookEndpoint>,
    pub options: DeliveryOptions,
    holding: bool,
    held: Vec<Delivery>,
    pub counts: WebhookCounts,
    records: VecDeque<DeliveryRecord>,
    by_event: HashMap<String, EventDelivery>,
    tx: Sender,
    rng: StdRng,
    epoch: u64,
}

impl WebhookState {
    pub fn new(
        endpoint: Option<WebhookEndpoint>,
        options: DeliveryOptions,
        seed: u64,
        tx: Sender,
        epoch: u64,
    ) -> WebhookState {
        WebhookState {
            endpoint,
            options,
            holding: false,
            held: Vec::new(),
            counts: WebhookCounts::default(),
            records: VecDeque::new(),
            by_event: HashMap::new(),
            tx,
            // Distinct from the fault stream, so adding a fault rule does not change which
            // deliveries drop.
            rng: StdRng::seed_from_u64(seed ^ 0x5eed_7e57_0000_0001),
            epoch,
        }
    }

    /// For a reset: same channel, next epoch.
    pub fn sender(&self) -> Sender {
        self.tx.clone()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Queues an event for delivery if an endpoint is registered; returns whether it was queued
    /// (Stripe's `pending_webhooks`).
    pub fn enqueue(&mut self, event_id: &str, event_type: &str, payload: Bytes) -> bool {
        if self.endpoint.is_none() {
            return false;
        }
        self.counts.queued += 1;
        let delivery = Delivery {
            event_id: event_id.to_owned(),
            event_type: event_type.to_owned(),
            payload,
            epoch: self.epoch,
            redelivery: false,
        };
        if self.holding {
            self.held.push(delivery);
            self.counts.held = self.held.len() as u64;
        } else {
            // The dispatcher only stops at shutdown, when losing deliveries is expected.
            let _ = self.tx.send(vec![delivery]);
        }
        true
    }

    /// From now on, keep events back until [`WebhookState::release`].
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// Stops holding and sends everything held, in one burst. Returns how many.
    pub fn release(&mut self) -> usize {
        self.holding = false;
        let held = std::mem::take(&mut self.held);
        self.counts.held = 0;
        let n = held.len();
        if n > 0 {
            let _ = self.tx.send(held);
        }
        n
    }

    /// Re-sends an event as a fresh delivery (what "Resend" in Stripe's dashboard does).
    pub fn resend(&mut self, event_id: &str, event_type: &str, payload: Bytes) -> bool {
        let holding = std::mem::replace(&mut self.holding, false);
        let queued = self.enqueue(event_id, event_type, payload);
        self.holding = holding;
        queued
    }

    pub fn records(&self) -> Vec<DeliveryRecord> {
        self.records.iter().cloned().collect()
    }

    /// How the deliveries of one event went (all zero if it was never handed to delivery).
    pub fn event_delivery(&self, event_id: &str) -> EventDelivery {
        self.by_event.get(event_id).copied().unwrap_or_default()
    }

    /// A copy was lost: with `redeliver_after_ms`, queue the event again later unless a copy got
    /// through by then (checked when it comes round, in `plan`).
    fn lost(&mut self, delivery: &Delivery) {
        self.by_event
            .entry(delivery.event_id.clone())
            .or_default()
            .lost += 1;
        let after = self.options.redeliver_after_ms;
        if after == 0 || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let again = Delivery {
            redelivery: true,
            ..delivery.clone()
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let _ = tx.send(vec![again]);
        });
    }

    fn shuffle(&mut self, batch: &mut [Delivery], window: usize) {
        for chunk in batch.chunks_mut(window) {
            chunk.shuffle(&mut self.rng);
        }
    }

    /// Drops the delivery or plans its copies.
    fn plan(&mut self, delivery: &Delivery) -> Option<Plan> {
        if delivery.epoch != self.epoch {
            return None;
        }
        let endpoint = self.endpoint.clone()?;
        if delivery.redelivery {
            if self.event_delivery(&delivery.event_id).ok > 0 {
                return None;
            }
            self.counts.redelivered += 1;
        }
        let drop = if self.options.drop_next > 0 {
            self.options.drop_next -= 1;
            true
        } else {
            self.options.drop_probability > 0.0
                && self.rng.random_bool(self.options.drop_probability)
        };
        if drop {
            self.counts.dropped += 1;
            self.push_record(delivery, 0, 0, None, None, "dropped");
            self.lost(delivery);
            return None;
        }
        self.counts.duplicated += u64::from(self.options.duplicate);
        self.by_event
            .entry(delivery.event_id.clone())
            .or_default()
            .open += 1 + self.options.duplicate;
        Some(Plan {
            endpoint,
            copies: 1 + self.options.duplicate,
            delay: Duration::from_millis(self.options.delay_ms),
            max_attempts: self.options.max_attempts,
            backoff: Duration::from_millis(self.options.retry_backoff_ms),
        })
    }

    fn record_attempt(
        &mut self,
        delivery: &Delivery,
        copy: u32,
        attempt: u32,
        status: Option<u16>,
        error: Option<String>,
        last: bool,
    ) {
        if delivery.epoch != self.epoch {
            return;
        }
        let ok = matches!(status, Some(200..=299));
        self.counts.attempted += 1;
        if attempt > 1 {
            self.counts.retried += 1;
        }
        let outcome = if ok {
            self.counts.ok += 1;
            let event = self.by_event.entry(delivery.event_id.clone()).or_default();
            event.ok += 1;
            event.open = event.open.saturating_sub(1);
            "ok"
        } else if last {
            self.counts.failed += 1;
            let event = self.by_event.entry(delivery.event_id.clone()).or_default();
            event.open = event.open.saturating_sub(1);
            self.lost(delivery);
            "failed"
        } else {
            "retrying"
        };
        self.push_record(delivery, copy, attempt, status, error, outcome);
    }

    fn push_record(
        &mut self,
        delivery: &Delivery,
        copy: u32,
        attempt: u32,
        status: Option<u16>,
        error: Option<String>,
        outcome: &str,
    ) {
        if self.records.len() == MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(DeliveryRecord {
            event_id: delivery.event_id.clone(),
            event_type: delivery.event_type.clone(),
            copy,
            attempt,
            status,
            error,
            outcome: outcome.to_owned(),
            at: wall_clock(),
        });
    }
}

/// Runs until shutdown: takes queued events, applies the options and delivers, at most
/// `concurrency` requests at a time, started in queue order. With one at a time (the default)
/// deliveries arrive in the order the events happened unless an option says otherwise, which keeps
/// tests deterministic; more lets a benchmark push more events per second.
pub async fn dispatch(
    shared: Arc<Shared>,
    mut rx: Receiver,
    client: reqwest::Client,
    concurrency: usize,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    loop {
        let mut batch = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            next = rx.recv() => match next {
                Some(batch) => batch,
                None => return,
            },
        };
        let window = shared.read(|s| s.webhooks.options.reorder_window);
        if window > 1 {
            let deadline = Instant::now() + REORDER_LINGER;
            while batch.len() < window {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(more)) => batch.extend(more),
                    _ => break,
                }
            }
            shared.update(|s| s.webhooks.shuffle(&mut batch, window));
        }
        for delivery in batch {
            let Some(plan) = shared.update(|s| s.webhooks.plan(&delivery)) else {
                continue;
            };
            for copy in 0..plan.copies {
                let job = Job {
                    shared: shared.clone(),
                    client: client.clone(),
                    delivery: delivery.clone(),
                    copy,
                    plan: plan.clone(),
                };
                if plan.delay.is_zero() {
                    // Taking the permit here keeps start order equal to queue order.
                    let permit = tokio::select! {
                        _ = shared.shutdown.cancelled() => return,
                        permit = permits.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                    };
                    tokio::spawn(job.run(Some(permit), permits.clone()));
                } else {
                    tokio::spawn(job.run(None, permits.clone()));
                }
            }
        }
    }
}

struct Job {
    shared: Arc<Shared>,
    client: reqwest::Client,
    delivery: Delivery,
    copy: u32,
    plan: Plan,
}

impl Job {
    async fn run(self, permit: Option<OwnedSemaphorePermit>, permits: Arc<Semaphore>) {
        let shutdown = self.shared.shutdown.clone();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.attempts(permit, permits) => {}
        }
    }

    async fn attempts(&self, first: Option<OwnedSemaphorePermit>, permits: Arc<Semaphore>) {
        let mut permit = first;
        if permit.is_none() {
            tokio::time::sleep(self.plan.delay).await;
        }
        for attempt in 1..=self.plan.max_attempts {
            let held = match permit.take() {
                Some(permit) => permit,
                None => match permits.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (status, error) = self.attempt().await;
            let last = attempt == self.plan.max_attempts;
            self.shared.update(|s| {
                s.webhooks
                    .record_attempt(&self.delivery, self.copy, attempt, status, error, last)
            });
            if matches!(status, Some(200..=299)) || last {
                return;
            }
            // Backing off without the permit: later events go ahead of a failing one, as on
            // Stripe, instead of queueing behind its retries.
            drop(held);
            let backoff = self
                .plan
                .backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
        }
    }

    async fn attempt(&self) -> (Option<u16>, Option<String>) {
        // Signed with real time: the receiver checks `t` against its own wall clock, and the fake's
        // clock may have been pushed days ahead.
        let signature = pgpay_core::signature::sign_header(
            &self.delivery.payload,
            self.plan.endpoint.secret.as_bytes(),
            wall_clock(),
        );
        let sent = self
            .client
            .post(&self.plan.endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::USER_AGENT,
                "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            )
            .header("Stripe-Signature", signature)
            .body(self.delivery.payload.clone())
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                // Read the answer so the connection can be reused.
                let _ = response.bytes().await;
                (Some(status), None)
            }
            Err(error) => (None, Some(error_chain(&error))),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
