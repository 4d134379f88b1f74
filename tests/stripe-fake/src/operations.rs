//! Control operations, shared by the library handle ([`crate::StripeFake`]) and the `/_fake/*`
//! endpoints, so both always do the same thing.

use bytes::Bytes;
use serde_json::Value;

use crate::api::payment_intents;
use crate::api_version;
use crate::billing::{self, BillingSettings};
use crate::checkout_flow::{self, CheckoutPayment};
use crate::error::ApiError;
use crate::faults::{FaultError, FaultRule, FaultStatus};
use crate::ledger::{self, Ledger};
use crate::seed::{self, SeedError, SeedReport, SeedRequest};
use crate::shared::Shared;
use crate::state::Ctx;
use crate::webhooks::{DeliveryOptions, DeliveryOptionsPatch, WebhookEndpoint, WebhookError};

impl Shared {
    pub fn ledger(&self, lists: bool) -> Ledger {
        let now = self.clock.now();
        let offset = self.clock.offset_secs();
        self.read(|s| ledger::snapshot(s, now, offset, lists))
    }

    pub fn reset(&self) {
        self.clock.reset();
        self.update(|s| s.reset(&self.config));
    }

    pub fn advance_clock(&self, secs: u32) -> i64 {
        let now = self.clock.advance(secs);
        // Sessions past `expires_at` expire now (with their events); waiters on key expiry or
        // `created` re-check.
        self.update(|s| checkout_flow::expire_due(s, now));
        now
    }

    pub fn add_fault(&self, rule: FaultRule) -> Result<u64, FaultError> {
        self.update(|s| s.faults.add(rule))
    }

    pub fn faults(&self) -> Vec<FaultStatus> {
        self.read(|s| s.faults.list())
    }

    pub fn clear_faults(&self) {
        self.update(|s| s.faults.clear());
    }

    pub fn set_webhook(&self, endpoint: Option<WebhookEndpoint>) {
        self.update(|s| s.webhooks.endpoint = endpoint);
    }

    pub fn webhook(&self) -> Option<WebhookEndpoint> {
        self.read(|s| s.webhooks.endpoint.clone())
    }

    pub fn webhook_options(&self) -> DeliveryOptions {
        self.read(|s| s.webhooks.options.clone())
    }

    pub fn update_webhook_options(
        &self,
        patch: &DeliveryOptionsPatch,
    ) -> Result<DeliveryOptions, WebhookError> {
        self.update(|s| {
            let next = patch.applied_to(&s.webhooks.options);
            next.validate()?;
            s.webhooks.options = next.clone();
            Ok(next)
        })
    }

    pub fn hold_webhooks(&self) {
        self.update(|s| s.webhooks.hold());
    }

    pub fn release_webhooks(&self) -> usize {
        self.update(|s| s.webhooks.release())
    }

    /// Delivers a recorded event again, as a new delivery.
    pub fn resend_event(&self, event_id: &str) -> Result<(), ApiError> {
        self.update(|s| {
            let event = s
                .events
                .get(event_id)
                .ok_or_else(|| ApiError::no_such("event", event_id, "id"))?;
            let payload = Bytes::from(serde_json::to_vec(&event.json).unwrap_or_default());
            let kind = event.kind.clone();
            if s.webhooks.resend(event_id, &kind, payload) {
                Ok(())
            } else {
                Err(ApiError::invalid_request(
                    "No webhook endpoint is registered.",
                ))
            }
        })
    }

    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        self.update(|s| s.rate_limit.set(per_second));
    }

    pub fn rate_limit(&self) -> Option<u32> {
        self.read(|s| s.rate_limit.per_second())
    }

    pub fn set_idempotency_retention(&self, secs: i64) {
        self.update(|s| s.idempotency.set_retention(secs));
    }

    pub fn seed(&self, request: &SeedRequest) -> Result<SeedReport, SeedError> {
        let now = self.clock.now();
        self.update(|s| seed::seed(s, now, request))
    }

    /// The customer confirms on the client side.
    pub fn confirm(&self, payment_intent: &str, payment_method: &str) -> Result<Value, ApiError> {
        let ctx = Ctx::internal(self.clock.now());
        self.update(|s| {
            payment_intents::confirm_with(s, &ctx, payment_intent, Some(payment_method.to_owned()))
        })
    }

    /// The customer completes (or fails) 3-D Secure.
    pub fn authenticate(&self, payment_intent: &str, succeed: bool) -> Result<Value, ApiError> {
        let ctx = Ctx::internal(self.clock.now());
        self.update(|s| payment_intents::authenticate(s, &ctx, payment_intent, succeed))
    }

    /// The customer pays on a Checkout Session's hosted page.
    pub fn pay_checkout(
        &self,
        session: &str,
        payment: &CheckoutPayment,
    ) -> Result<Value, ApiError> {
        let ctx = Ctx::internal(self.clock.now());
        self.update(|s| checkout_flow::pay(s, &ctx, session, payment))
    }

    /// The bank debit of a session completed unpaid settles, or fails.
    pub fn settle_checkout(&self, session: &str, succeed: bool) -> Result<Value, ApiError> {
        let ctx = Ctx::internal(self.clock.now());
        self.update(|s| checkout_flow::settle(s, &ctx, session, succeed))
    }

    /// The customer walks away and the session expires now, as Stripe would at `expires_at`.
    pub fn abandon_checkout(&self, session: &str) -> Result<Value, ApiError> {
        let ctx = Ctx::internal(self.clock.now());
        self.update(|s| {
            checkout_flow::expire_due(s, ctx.now);
            checkout_flow::expire(s, &ctx, session)
        })
    }

    /// The customer pays a subscription-mode session by card, its customer on `test_clock`.
    pub fn pay_subscription_checkout(
        &self,
        session: &str,
        payment_method: &str,
        test_clock: Option<&str>,
    ) -> Result<Value, ApiError> {
        let ctx = Ctx::internal(self.clock.now());
        self.update(|s| {
            checkout_flow::expire_due(s, ctx.now);
            billing::pay_subscription_session(s, &ctx, session, payment_method, test_clock)
        })
    }

    pub fn api_version(&self) -> String {
        self.read(|s| s.api_version.clone())
    }

    /// Switches the account's API version: later events (and answers to requests without a
    /// `Stripe-Version`) render in its shapes.
    pub fn set_api_version(&self, version: &str) -> Result<(), ApiError> {
        api_version::validate(version)?;
        self.update(|s| s.api_version = version.to_owned());
        Ok(())
    }

    pub fn billing(&self) -> BillingSettings {
        self.read(|s| s.billing.clone())
    }

    pub fn set_billing(&self, settings: BillingSettings) -> Result<(), String> {
        settings.validate()?;
        self.update(|s| s.billing = settings);
        Ok(())
    }

    /// A subscription's JSON in the account's API version.
    pub fn subscription(&self, id: &str) -> Option<Value> {
        self.read(|s| billing::subscription_json(s, id, s.event_shape()))
    }

    /// An invoice's JSON in the account's API version.
    pub fn invoice(&self, id: &str) -> Option<Value> {
        self.read(|s| billing::invoice_json(s, id, s.event_shape()))
    }

    pub fn checkout_session(&self, id: &str) -> Option<Value> {
        self.read(|s| s.checkout_sessions.get(id).map(|cs| cs.to_json()))
    }

    pub fn payment_intent(&self, id: &str) -> Option<Value> {
        self.read(|s| s.payment_intents.get(id).map(|pi| pi.to_json()))
    }

    /// Every event in the order it was emitted (and queued for delivery).
    pub fn events_emitted(&self) -> Vec<Value> {
        self.read(|s| {
            let mut events: Vec<(u64, Value)> = s
                .events
                .iter()
                .map(|(k, e)| (k.1, e.json.clone()))
                .collect();
            events.sort_by_key(|(seq, _)| *seq);
            events.into_iter().map(|(_, e)| e).collect()
        })
    }

    /// Every event, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.read(|s| s.events.iter().map(|(_, e)| e.json.clone()).collect())
    }
}
