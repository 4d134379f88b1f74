//! Everything the fake knows, behind one lock: objects, events, idempotency keys, fault rules,
//! webhook queue and counters. Handlers are synchronous functions over `&mut State`, so a
//! request's work and the storing of its idempotent answer happen in one critical section.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::charge::Charge;
use crate::checkout_session::CheckoutSessions;
use crate::collection::Collection;
use crate::config::{Config, API_VERSION};
use crate::faults::Faults;
use crate::idempotency::IdempotencyStore;
use crate::ids::new_id;
use crate::ledger::Counters;
use crate::payment_intent::PaymentIntents;
use crate::rate_limit::RateLimit;
use crate::refund::Refund;
use crate::webhooks::{Sender, WebhookEndpoint, WebhookState};

/// Who caused a change, for the event's `request` field.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Unix seconds on the fake's clock.
    pub now: i64,
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
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

    /// Records an event; `deliver` false keeps it off the webhook (bulk seeding).
    pub fn record_event(&mut self, ctx: &Ctx, kind: &str, object: Value, deliver: bool) -> String {
        let id = new_id("evt_");
        let pending = deliver && self.webhooks.endpoint.is_some();
        let json = json!({
            "id": id,
            "object": "event",
            "api_version": API_VERSION,
            "created": ctx.now,
            "data": { "object": object },
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
