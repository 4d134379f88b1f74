//! Everything the fake knows, behind one lock: objects, events, idempotency keys, fault rules,
//! webhook queue and counters. Handlers are synchronous functions over `&mut State`, so a
//! request's work and the storing of its idempotent answer happen in one critical section.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::api_version::Shape;
use crate::billing::BillingSettings;
use crate::charge::Charge;
use crate::checkout_session::CheckoutSessions;
use crate::collection::Collection;
use crate::config::Config;
use crate::customer::Customer;
use crate::faults::Faults;
use crate::idempotency::IdempotencyStore;
use crate::ids::new_id;
use crate::invoice::Invoice;
use crate::ledger::Counters;
use crate::payment_intent::PaymentIntents;
use crate::price::{Price, Product};
use crate::rate_limit::RateLimit;
use crate::refund::Refund;
use crate::subscription::Subscription;
use crate::test_clock::TestClock;
use crate::webhooks::{Sender, WebhookEndpoint, WebhookState};

/// Who caused a change, for the event's `request` field.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Unix seconds on the fake's clock.
    pub now: i64,
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// The request's `Stripe-Version`, when it sent one: API answers render in its shape.
    pub api_version: Option<String>,
}

impl Ctx {
    /// A change made through the library or a control endpoint (a customer confirming, a seed).
    pub fn internal(now: i64) -> Ctx {
        Ctx {
            now,
            ..Ctx::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub kind: String,
    pub json: Value,
}

#[derive(Debug)]
pub struct State {
    pub payment_intents: PaymentIntents,
    pub checkout_sessions: CheckoutSessions,
    pub charges: HashMap<String, Charge>,
    pub refunds: Collection<Refund>,
    pub events: Collection<Event>,
    pub products: Collection<Product>,
    pub prices: Collection<Price>,
    pub customers: Collection<Customer>,
    pub subscriptions: Collection<Subscription>,
    pub invoices: Collection<Invoice>,
    pub test_clocks: Collection<TestClock>,
    /// The account's API version: events are rendered in it.
    pub api_version: String,
    pub billing: BillingSettings,
    pub idempotency: IdempotencyStore,
    pub faults: Faults,
    pub webhooks: WebhookState,
    pub rate_limit: RateLimit,
    pub counters: Counters,
    /// `http://127.0.0.1:PORT`: Checkout Session URLs point at the fake itself.
    pub base_url: String,
}

impl State {
    pub fn new(
        config: &Config,
        endpoint: Option<WebhookEndpoint>,
        tx: Sender,
        epoch: u64,
        base_url: String,
    ) -> State {
        State {
            payment_intents: PaymentIntents::default(),
            checkout_sessions: CheckoutSessions::default(),
            charges: HashMap::new(),
            refunds: Collection::default(),
            events: Collection::default(),
            products: Collection::default(),
            prices: Collection::default(),
            customers: Collection::default(),
            subscriptions: Collection::default(),
            invoices: Collection::default(),
            test_clocks: Collection::default(),
            api_version: config.api_version.clone(),
            billing: config.billing.clone(),
            idempotency: IdempotencyStore::new(config.idempotency_retention_secs),
            faults: Faults::new(config.seed),
            webhooks: WebhookState::new(
                endpoint,
                config.webhook_options.clone(),
                config.seed,
                tx,
                epoch,
            ),
            rate_limit: RateLimit::new(config.rate_limit_per_second),
            counters: Counters::default(),
            base_url,
        }
    }

    /// Forgets everything but the registered webhook endpoint; deliveries already under way no
    /// longer count.
    pub fn reset(&mut self, config: &Config) {
        let endpoint = self.webhooks.endpoint.take();
        let tx = self.webhooks.sender();
        let epoch = self.webhooks.epoch() + 1;
        let base_url = std::mem::take(&mut self.base_url);
        *self = State::new(config, endpoint, tx, epoch, base_url);
    }

    /// Records an event with a snapshot of `object` and queues it for delivery.
    pub fn emit(&mut self, ctx: &Ctx, kind: &str, object: Value) -> String {
        self.record_event(ctx, kind, object, true)
    }

    /// Records an `*.updated` event with `data.previous_attributes`.
    pub fn emit_update(&mut self, ctx: &Ctx, kind: &str, object: Value, previous: Value) -> String {
        self.record(
            ctx,
            kind,
            json!({ "object": object, "previous_attributes": previous }),
            true,
        )
    }

    /// Records an event; `deliver` false keeps it off the webhook (bulk seeding).
    pub fn record_event(&mut self, ctx: &Ctx, kind: &str, object: Value, deliver: bool) -> String {
        self.record(ctx, kind, json!({ "object": object }), deliver)
    }

    /// The shape events are rendered in: the account's API version.
    pub fn event_shape(&self) -> Shape {
        Shape::of(&self.api_version)
    }

    /// The shape of an API answer: the request's `Stripe-Version`, else the account's.
    pub fn answer_shape(&self, ctx: &Ctx) -> Shape {
        Shape::of(ctx.api_version.as_deref().unwrap_or(&self.api_version))
    }

    fn record(&mut self, ctx: &Ctx, kind: &str, data: Value, deliver: bool) -> String {
        let id = new_id("evt_");
        let pending = deliver && self.webhooks.endpoint.is_some();
        let json = json!({
            "id": id,
            "object": "event",
            "api_version": self.api_version,
            "created": ctx.now,
            "data": data,
            "livemode": false,
            "pending_webhooks": u32::from(pending),
            "request": { "id": ctx.request_id, "idempotency_key": ctx.idempotency_key },
            "type": kind,
        });
        if pending {
            // Serializing a Value cannot fail: its keys are strings.
            let payload = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
            self.webhooks.enqueue(&id, kind, payload);
        }
        *self
            .counters
            .events_by_type
            .entry(kind.to_owned())
            .or_default() += 1;
        self.events.insert(
            id.clone(),
            ctx.now,
            Event {
                kind: kind.to_owned(),
                json,
            },
        );
        id
    }
}
