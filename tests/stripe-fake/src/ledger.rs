//! What really happened, for tests to count: objects by status, requests per endpoint,
//! idempotent replays and conflicts, faults fired, webhook deliveries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::State;
use crate::webhooks::{DeliveryRecord, EventDelivery, WebhookCounts};

/// Running counters kept beside the objects.
#[derive(Debug, Default)]
pub struct Counters {
    /// By route template, e.g. `POST /v1/payment_intents/:id/confirm`.
    pub requests: BTreeMap<&'static str, u64>,
    pub responses: BTreeMap<u16, u64>,
    pub payment_intents_created: u64,
    pub checkout_sessions_created: u64,
    pub subscriptions_created: u64,
    pub invoices_created: u64,
    pub events_by_type: BTreeMap<String, u64>,
    pub replays: u64,
    pub conflicts: u64,
    pub in_flight_409: u64,
    pub faults_fired: BTreeMap<&'static str, u64>,
    pub rate_limited: u64,
}

/// A snapshot of the ledger (`GET /_fake/ledger`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// The fake's clock, unix seconds.
    pub now: i64,
    pub clock_offset_secs: i64,
    pub payment_intents: PaymentIntentLedger,
    pub checkout_sessions: CheckoutSessionLedger,
    /// Subscriptions made by subscription-mode Checkout Sessions.
    #[serde(default)]
    pub subscriptions: SubscriptionLedger,
    /// Invoices made by subscriptions (sign-ups and renewals).
    #[serde(default)]
    pub invoices: InvoiceLedger,
    /// Charges made by confirmations (failed ones included).
    pub charges: u64,
    pub refunds: RefundLedger,
    pub events: EventLedger,
    /// API requests by route template (`POST /v1/payment_intents`), counted whatever the answer.
    pub requests: BTreeMap<String, u64>,
    /// API answers by HTTP status (`"200"`, `"409"`); connections closed by a fault are not here.
    pub responses: BTreeMap<String, u64>,
    pub idempotency: IdempotencyLedger,
    /// By action (`drop_response_after_commit`, ...).
    pub faults_fired: BTreeMap<String, u64>,
    /// 429s from the emulated rate limit (not from faults).
    pub rate_limited: u64,
    pub webhooks: WebhookCounts,
    /// The newest delivery attempts, oldest first (at most 10,000).
    pub deliveries: Vec<DeliveryRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentIntentLedger {
    /// Created through the API, seeded, or by a Checkout Session's customer, since the last reset.
    pub created: u64,
    pub by_status: BTreeMap<String, u64>,
    /// Every PaymentIntent, oldest first (empty when lists were not asked for).
    pub list: Vec<PaymentIntentSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentIntentSummary {
    pub id: String,
    pub status: String,
    pub amount: i64,
    pub amount_received: i64,
    pub currency: String,
    pub created: i64,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionLedger {
    pub created: u64,
    /// By `status` (`active`, `past_due`, `canceled`, ...).
    pub by_status: BTreeMap<String, u64>,
    /// Every subscription, oldest first (empty when lists were not asked for).
    pub list: Vec<SubscriptionSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionSummary {
    pub id: String,
    pub status: String,
    pub customer: String,
    pub price: String,
    pub quantity: i64,
    pub current_period_start: i64,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    pub test_clock: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvoiceLedger {
    pub created: u64,
    /// By `status` (`draft`, `open`, `paid`, `uncollectible`, `void`).
    pub by_status: BTreeMap<String, u64>,
    /// Every invoice, oldest first (empty when lists were not asked for).
    pub list: Vec<InvoiceSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceSummary {
    pub id: String,
    pub subscription: String,
    pub status: String,
    pub billing_reason: String,
    pub amount_due: i64,
    pub attempt_count: i64,
    pub created: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckoutSessionLedger {
    /// Created through the API since the last reset: one per attempt in an exactly-once test.
    pub created: u64,
    /// By `status` (`open`, `complete`, `expired`).
    pub by_status: BTreeMap<String, u64>,
    /// Every session, oldest first (empty when lists were not asked for).
    pub list: Vec<CheckoutSessionSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutSessionSummary {
    pub id: String,
    pub status: String,
    pub payment_status: String,
    pub amount_total: i64,
    pub currency: String,
    pub client_reference_id: Option<String>,
    pub payment_intent: Option<String>,
    pub created: i64,
    pub expires_at: i64,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefundLedger {
    pub count: u64,
    pub amount: i64,
    pub list: Vec<RefundSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundSummary {
    pub id: String,
    pub payment_intent: String,
    pub charge: String,
    pub amount: i64,
    pub created: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLedger {
    pub total: u64,
    pub by_type: BTreeMap<String, u64>,
    /// Every event, oldest first, with how its deliveries went (empty when lists were not
    /// asked for). Unlike `deliveries`, never trimmed: a history checker reads all of it.
    #[serde(default)]
    pub list: Vec<EventSummary>,
}

/// One event: what it speaks of, the request that caused it, and its deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSummary {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    /// `data.object.id` (a PaymentIntent, refund, charge or session id).
    pub object_id: Option<String>,
    /// `data.object.payment_intent` when the object names one (a refund, a charge).
    pub payment_intent: Option<String>,
    /// The Idempotency-Key of the API request that caused the event (`request.idempotency_key`).
    pub idempotency_key: Option<String>,
    pub delivery: EventDelivery,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyLedger {
    /// Keys with a stored answer, within retention.
    pub stored_keys: u64,
    /// Keys whose first request is still running.
    pub in_flight: u64,
    /// Answers replayed (`Idempotent-Replayed: true`).
    pub replays: u64,
    /// Same key, other parameters or endpoint: 400 `idempotency_error`.
    pub conflicts: u64,
    /// Same key while the first request ran: 409.
    pub in_flight_409: u64,
    pub retention_secs: i64,
}

impl Ledger {
    /// How many PaymentIntents have this status now.
    pub fn status_count(&self, status: &str) -> u64 {
        self.payment_intents
            .by_status
            .get(status)
            .copied()
            .unwrap_or(0)
    }

    /// How many requests reached this route template (`"POST /v1/payment_intents"`).
    pub fn requests_to(&self, route: &str) -> u64 {
        self.requests.get(route).copied().unwrap_or(0)
    }

    pub fn fault_count(&self, action: &str) -> u64 {
        self.faults_fired.get(action).copied().unwrap_or(0)
    }

    /// Checkout Sessions whose metadata has `key` = `value`.
    pub fn checkout_sessions_with(&self, key: &str, value: &str) -> Vec<&CheckoutSessionSummary> {
        self.checkout_sessions
            .list
            .iter()
            .filter(|s| s.metadata.get(key).map(String::as_str) == Some(value))
            .collect()
    }

    /// How many Checkout Sessions have this status now.
    pub fn session_status_count(&self, status: &str) -> u64 {
        self.checkout_sessions
            .by_status
            .get(status)
            .copied()
            .unwrap_or(0)
    }

    /// PaymentIntents whose metadata has `key` = `value` (say, one order's `order_ref`).
    pub fn payment_intents_with(&self, key: &str, value: &str) -> Vec<&PaymentIntentSummary> {
        self.payment_intents
            .list
            .iter()
            .filter(|pi| pi.metadata.get(key).map(String::as_str) == Some(value))
            .collect()
    }

    /// Subscriptions whose metadata has `key` = `value`.
    pub fn subscriptions_with(&self, key: &str, value: &str) -> Vec<&SubscriptionSummary> {
        self.subscriptions
            .list
            .iter()
            .filter(|s| s.metadata.get(key).map(String::as_str) == Some(value))
            .collect()
    }

    /// Invoices of one subscription, oldest first.
    pub fn invoices_of(&self, subscription: &str) -> Vec<&InvoiceSummary> {
        self.invoices
            .list
            .iter()
            .filter(|i| i.subscription == subscription)
            .collect()
    }

    /// How many events of this type were recorded.
    pub fn event_count(&self, event_type: &str) -> u64 {
        self.events.by_type.get(event_type).copied().unwrap_or(0)
    }
}

/// Builds the snapshot; `lists` false leaves out the per-object lists (cheap for 100,000 objects).
pub fn snapshot(state: &State, now: i64, clock_offset_secs: i64, lists: bool) -> Ledger {
    let counters = &state.counters;
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut list = Vec::new();
    for (_, pi) in state.payment_intents.all.iter() {
        *by_status.entry(pi.status.as_str().to_owned()).or_default() += 1;
        if lists {
            list.push(PaymentIntentSummary {
                id: pi.id.clone(),
                status: pi.status.as_str().to_owned(),
                amount: pi.amount,
                amount_received: pi.amount_received,
                currency: pi.currency.clone(),
                created: pi.created,
                metadata: pi.metadata.clone(),
            });
        }
    }
    let mut sessions = CheckoutSessionLedger {
        created: counters.checkout_sessions_created,
        ..CheckoutSessionLedger::default()
    };
    for (_, s) in state.checkout_sessions.all.iter() {
        *sessions
            .by_status
            .entry(s.status.as_str().to_owned())
            .or_default() += 1;
        if lists {
            sessions.list.push(CheckoutSessionSummary {
                id: s.id.clone(),
                status: s.status.as_str().to_owned(),
                payment_status: s.payment_status.as_str().to_owned(),
                amount_total: s.amount_total,
                currency: s.currency.clone(),
                client_reference_id: s.client_reference_id.clone(),
                payment_intent: s.payment_intent.clone(),
                created: s.created,
                expires_at: s.expires_at,
                metadata: s.metadata.clone(),
            });
        }
    }
    let mut subscriptions = SubscriptionLedger {
        created: counters.subscriptions_created,
        ..SubscriptionLedger::default()
    };
    for (_, sub) in state.subscriptions.iter() {
        *subscriptions
            .by_status
            .entry(sub.status.as_str().to_owned())
            .or_default() += 1;
        if lists {
            subscriptions.list.push(SubscriptionSummary {
                id: sub.id.clone(),
                status: sub.status.as_str().to_owned(),
                customer: sub.customer.clone(),
                price: sub.item.price.clone(),
                quantity: sub.item.quantity,
                current_period_start: sub.current_period_start,
                current_period_end: sub.current_period_end,
                cancel_at_period_end: sub.cancel_at_period_end,
                test_clock: sub.test_clock.clone(),
                metadata: sub.metadata.clone(),
            });
        }
    }
    let mut invoices = InvoiceLedger {
        created: counters.invoices_created,
        ..InvoiceLedger::default()
    };
    for (_, inv) in state.invoices.iter() {
        *invoices
            .by_status
            .entry(inv.status.as_str().to_owned())
            .or_default() += 1;
        if lists {
            invoices.list.push(InvoiceSummary {
                id: inv.id.clone(),
                subscription: inv.subscription.clone(),
                status: inv.status.as_str().to_owned(),
                billing_reason: inv.billing_reason.to_owned(),
                amount_due: inv.total(),
                attempt_count: inv.attempt_count,
                created: inv.created,
            });
        }
    }
    let mut refunds = RefundLedger::default();
    for (_, refund) in state.refunds.iter() {
        refunds.count += 1;
        refunds.amount += refund.amount;
        if lists {
            refunds.list.push(RefundSummary {
                id: refund.id.clone(),
                payment_intent: refund.payment_intent.clone(),
                charge: refund.charge.clone(),
                amount: refund.amount,
                created: refund.created,
            });
        }
    }
    let (stored_keys, in_flight) = state.idempotency.counts(now);
    Ledger {
        now,
        clock_offset_secs,
        payment_intents: PaymentIntentLedger {
            created: counters.payment_intents_created,
            by_status,
            list,
        },
        checkout_sessions: sessions,
        subscriptions,
        invoices,
        charges: state.charges.len() as u64,
        refunds,
        events: EventLedger {
            total: state.events.len() as u64,
            by_type: counters.events_by_type.clone(),
            list: if lists { event_list(state) } else { Vec::new() },
        },
        requests: stringify(&counters.requests),
        responses: counters
            .responses
            .iter()
            .map(|(status, n)| (status.to_string(), *n))
            .collect(),
        idempotency: IdempotencyLedger {
            stored_keys,
            in_flight,
            replays: counters.replays,
            conflicts: counters.conflicts,
            in_flight_409: counters.in_flight_409,
            retention_secs: state.idempotency.retention_secs(),
        },
        faults_fired: stringify(&counters.faults_fired),
        rate_limited: counters.rate_limited,
        webhooks: state.webhooks.counts.clone(),
        deliveries: if lists {
            state.webhooks.records()
        } else {
            Vec::new()
        },
    }
}

fn event_list(state: &State) -> Vec<EventSummary> {
    let text = |v: &serde_json::Value, pointer: &str| {
        v.pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    state
        .events
        .iter()
        .map(|(_, event)| {
            let id = text(&event.json, "/id").unwrap_or_default();
            EventSummary {
                delivery: state.webhooks.event_delivery(&id),
                id,
                kind: event.kind.clone(),
                created: event
                    .json
                    .get("created")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0),
                object_id: text(&event.json, "/data/object/id"),
                payment_intent: text(&event.json, "/data/object/payment_intent"),
                idempotency_key: text(&event.json, "/request/idempotency_key"),
            }
        })
        .collect()
}

fn stringify(map: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    map.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}
