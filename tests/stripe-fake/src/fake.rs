//! The handle a test holds: starts the server in-process, exposes its URL, and drives and inspects
//! it without HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::billing::BillingSettings;
use crate::checkout_flow::CheckoutPayment;
use crate::config::Config;
use crate::error::ApiError;
use crate::faults::{FaultError, FaultRule, FaultStatus};
use crate::ledger::Ledger;
use crate::seed::{SeedError, SeedReport, SeedRequest};
use crate::server;
use crate::shared::Shared;
use crate::webhooks::{self, DeliveryOptions, DeliveryOptionsPatch, WebhookEndpoint, WebhookError};

/// Shortest pause between two checks of a waiter's condition.
const MIN_RECHECK: Duration = Duration::from_millis(2);
/// Per webhook attempt; a receiver slower than this counts as a failed attempt.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the webhook HTTP client")]
    Client(#[source] reqwest::Error),
}

/// [`StripeFake::wait_for`] ran out of time; `last` is the ledger it saw last.
#[derive(Debug, thiserror::Error)]
#[error("the condition did not hold within {timeout:?}")]
pub struct WaitTimeout {
    pub timeout: Duration,
    pub last: Box<Ledger>,
}

/// A running fake. Dropping it stops the server and webhook delivery.
#[derive(Debug)]
pub struct StripeFake {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
}

impl StripeFake {
    /// Binds `config.listen` (default `127.0.0.1:0`) and serves on the current tokio runtime.
    pub async fn start(config: Config) -> Result<StripeFake, StartError> {
        validate(&config)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .map_err(StartError::Client)?;
        let concurrency = config.webhook_concurrency;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(config, tx, format!("http://{addr}")));
        let dispatcher = tokio::spawn(webhooks::dispatch(shared.clone(), rx, client, concurrency));
        let server = tokio::spawn(server::serve(listener, shared.clone()));
        Ok(StripeFake {
            shared,
            addr,
            server: Some(server),
            dispatcher: Some(dispatcher),
        })
    }

    /// `http://127.0.0.1:PORT`, to use as the Stripe API base.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn api_key(&self) -> &str {
        &self.shared.config.api_key
    }

    /// Everything, with per-object lists.
    pub fn ledger(&self) -> Ledger {
        self.shared.ledger(true)
    }

    /// Counters only (the lists are empty): cheap with 100,000 objects.
    pub fn ledger_counts(&self) -> Ledger {
        self.shared.ledger(false)
    }

    /// Waits until `condition` holds for the full ledger (with lists), re-checking after changes,
    /// up to `timeout`. Returns the ledger that satisfied it. Each check copies every object, so
    /// with many thousands of objects prefer [`StripeFake::wait_for_counts`].
    pub async fn wait_for(
        &self,
        timeout: Duration,
        condition: impl Fn(&Ledger) -> bool,
    ) -> Result<Ledger, WaitTimeout> {
        self.wait(timeout, true, condition).await
    }

    /// Like [`StripeFake::wait_for`], on [`StripeFake::ledger_counts`]: cheap at any size.
    pub async fn wait_for_counts(
        &self,
        timeout: Duration,
        condition: impl Fn(&Ledger) -> bool,
    ) -> Result<Ledger, WaitTimeout> {
        self.wait(timeout, false, condition).await
    }

    async fn wait(
        &self,
        timeout: Duration,
        lists: bool,
        condition: impl Fn(&Ledger) -> bool,
    ) -> Result<Ledger, WaitTimeout> {
        let deadline = Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            let checked = Instant::now();
            let ledger = self.shared.ledger(lists);
            if condition(&ledger) {
                return Ok(ledger);
            }
            let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Err(WaitTimeout {
                    timeout,
                    last: Box::new(ledger),
                });
            }
            // Under load every request is a change; checking at most this often keeps a waiter
            // from competing with the server for the lock.
            tokio::time::sleep_until((checked + MIN_RECHECK).min(deadline)).await;
        }
    }

    /// Unix seconds on the fake's clock.
    pub fn now(&self) -> i64 {
        self.shared.clock.now()
    }

    /// Moves the fake's clock forward; returns the new time.
    pub fn advance_clock(&self, secs: u32) -> i64 {
        self.shared.advance_clock(secs)
    }

    /// Forgets all objects, events, keys, faults and counters; keeps the webhook endpoint.
    pub fn reset(&self) {
        self.shared.reset();
    }

    pub fn add_fault(&self, rule: FaultRule) -> Result<u64, FaultError> {
        self.shared.add_fault(rule)
    }

    pub fn faults(&self) -> Vec<FaultStatus> {
        self.shared.faults()
    }

    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Delivers future events to `url`, signed with `secret`.
    pub fn set_webhook(
        &self,
        url: impl Into<String>,
        secret: impl Into<String>,
    ) -> Result<(), WebhookError> {
        self.shared
            .set_webhook(Some(WebhookEndpoint::new(url, secret)?));
        Ok(())
    }

    pub fn clear_webhook(&self) {
        self.shared.set_webhook(None);
    }

    pub fn webhook_options(&self) -> DeliveryOptions {
        self.shared.webhook_options()
    }

    pub fn set_webhook_options(&self, options: DeliveryOptions) -> Result<(), WebhookError> {
        let patch = DeliveryOptionsPatch {
            duplicate: Some(options.duplicate),
            reorder_window: Some(options.reorder_window),
            delay_ms: Some(options.delay_ms),
            drop_probability: Some(options.drop_probability),
            drop_next: Some(options.drop_next),
            max_attempts: Some(options.max_attempts),
            retry_backoff_ms: Some(options.retry_backoff_ms),
            redeliver_after_ms: Some(options.redeliver_after_ms),
        };
        self.shared.update_webhook_options(&patch).map(|_| ())
    }

    pub fn update_webhook_options(
        &self,
        patch: DeliveryOptionsPatch,
    ) -> Result<DeliveryOptions, WebhookError> {
        self.shared.update_webhook_options(&patch)
    }

    /// Keeps new events back until [`StripeFake::release_webhooks`].
    pub fn hold_webhooks(&self) {
        self.shared.hold_webhooks();
    }

    /// Sends everything held in one burst (reordered if a reorder window is set); returns how many.
    pub fn release_webhooks(&self) -> usize {
        self.shared.release_webhooks()
    }

    pub fn resend_event(&self, event_id: &str) -> Result<(), ApiError> {
        self.shared.resend_event(event_id)
    }

    /// Emulates Stripe's rate limit (`None` turns it off).
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        self.shared.set_rate_limit(per_second);
    }

    pub fn set_idempotency_retention(&self, secs: i64) {
        self.shared.set_idempotency_retention(secs.max(1));
    }

    /// Creates PaymentIntents in bulk, without HTTP.
    pub fn seed(&self, request: SeedRequest) -> Result<SeedReport, SeedError> {
        self.shared.seed(&request)
    }

    /// What the customer's browser does with the client secret: confirms the PaymentIntent with a
    /// test PaymentMethod (`pm_card_visa`, `pm_card_chargeDeclined`,
    /// `pm_card_authenticationRequired`, ...). A decline is `Err` with the 402 card error, and the
    /// PaymentIntent is back in `requires_payment_method`.
    pub async fn confirm(
        &self,
        payment_intent: &str,
        payment_method: &str,
    ) -> Result<Value, ApiError> {
        self.shared.confirm(payment_intent, payment_method)
    }

    /// Completes (or fails) 3-D Secure on a PaymentIntent in `requires_action`.
    pub async fn authenticate(
        &self,
        payment_intent: &str,
        succeed: bool,
    ) -> Result<Value, ApiError> {
        self.shared.authenticate(payment_intent, succeed)
    }

    /// The customer pays on the Checkout Session's hosted page: by card (the session completes
    /// paid, or a declining card is `Err` with the 402 card error and the session stays open) or by
    /// a delayed bank debit (the session completes unpaid; see
    /// [`StripeFake::settle_checkout`]). Events as Stripe emits them, delivered to the webhook.
    pub async fn pay_checkout(
        &self,
        session: &str,
        payment: CheckoutPayment,
    ) -> Result<Value, ApiError> {
        self.shared.pay_checkout(session, &payment)
    }

    /// The delayed payment of a session completed unpaid succeeds
    /// (`checkout.session.async_payment_succeeded`) or fails (`..._async_payment_failed`).
    pub async fn settle_checkout(&self, session: &str, succeed: bool) -> Result<Value, ApiError> {
        self.shared.settle_checkout(session, succeed)
    }

    /// The customer walks away: the open session expires now (`checkout.session.expired`).
    /// Advancing the clock past `expires_at` does the same.
    pub async fn abandon_checkout(&self, session: &str) -> Result<Value, ApiError> {
        self.shared.abandon_checkout(session)
    }

    /// The customer pays a subscription-mode session by card (`pm_card_visa`; a failing card is the
    /// 402 and the session stays open), as a new customer on `test_clock` when given: a customer,
    /// a subscription and its paid first invoice, with Stripe's events.
    pub async fn pay_subscription_checkout(
        &self,
        session: &str,
        payment_method: &str,
        test_clock: Option<&str>,
    ) -> Result<Value, ApiError> {
        self.shared
            .pay_subscription_checkout(session, payment_method, test_clock)
    }

    /// The account's API version (events render in it).
    pub fn api_version(&self) -> String {
        self.shared.api_version()
    }

    /// Switches the account's API version at runtime (`2025-03-31.basil` renders the new Billing
    /// shapes); a malformed version is refused.
    pub fn set_api_version(&self, version: &str) -> Result<(), ApiError> {
        self.shared.set_api_version(version)
    }

    pub fn billing(&self) -> BillingSettings {
        self.shared.billing()
    }

    /// Sets the retry schedule of failed subscription payments.
    pub fn set_billing(&self, settings: BillingSettings) -> Result<(), String> {
        self.shared.set_billing(settings)
    }

    /// A subscription's JSON in the account's API version.
    pub fn subscription(&self, id: &str) -> Option<Value> {
        self.shared.subscription(id)
    }

    /// An invoice's JSON in the account's API version.
    pub fn invoice(&self, id: &str) -> Option<Value> {
        self.shared.invoice(id)
    }

    /// The Checkout Session's JSON as the API would return it.
    pub fn checkout_session(&self, id: &str) -> Option<Value> {
        self.shared.checkout_session(id)
    }

    /// The PaymentIntent's JSON as the API would return it.
    pub fn payment_intent(&self, id: &str) -> Option<Value> {
        self.shared.payment_intent(id)
    }

    /// Every event recorded, in the order it was emitted (the order of delivery; `events` and
    /// `GET /v1/events` order by `created`, which a recovery after a failure bumps a second).
    pub fn events_emitted(&self) -> Vec<Value> {
        self.shared.events_emitted()
    }

    /// Every event recorded, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.shared.events()
    }

    /// Stops accepting, lets requests under way finish (up to 2 s) and stops webhook delivery.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.await;
        }
    }
}

impl Drop for StripeFake {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

fn validate(config: &Config) -> Result<(), StartError> {
    let invalid = |m: &str| Err(StartError::Config(m.to_owned()));
    if config.api_key.trim().is_empty() {
        return invalid("api_key must not be empty");
    }
    if config.idempotency_retention_secs < 1 {
        return invalid("idempotency_retention_secs must be at least 1");
    }
    if config.webhook_concurrency == 0 {
        return invalid("webhook_concurrency must be at least 1");
    }
    if let Some(endpoint) = &config.webhook {
        WebhookEndpoint::new(endpoint.url.clone(), endpoint.secret.clone())
            .map_err(|e| StartError::Config(e.to_string()))?;
    }
    crate::api_version::validate(&config.api_version)
        .map_err(|e| StartError::Config(format!("api_version: {}", e.message)))?;
    config.billing.validate().map_err(StartError::Config)?;
    config
        .webhook_options
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))
}
