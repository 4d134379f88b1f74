//! Everything a chaos run recorded: what Stripe (stripe-fake) saw and holds, what the database
//! holds, and what the application asked for. Plain data, serializable, so a failing run's history
//! can be saved and checked again, and tests can build histories by hand.

use serde::{Deserialize, Serialize};
use stripe_fake::Ledger;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    /// `GET /_fake/ledger` after the final reconciliation: every PaymentIntent, refund and event,
    /// each event with how its deliveries went.
    pub ledger: Ledger,
    pub db: DbSnapshot,
    pub app: AppRecord,
}

/// The database after the final reconciliation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DbSnapshot {
    pub payments: Vec<Payment>,
    pub outbox: Vec<Command>,
    pub events: Vec<StoredEvent>,
    pub fulfillments: Vec<Fulfillment>,
    /// The application's provisioning, one row per provisioning transaction that committed.
    pub provisions: Vec<Provision>,
    pub refunds: Vec<StoredRefund>,
    pub audit: Vec<AuditRow>,
    /// Open reconciliation findings: a payment whose state differs from Stripe's for a stated
    /// reason (invariant 8).
    pub open_findings: Vec<Finding>,
    /// `pay.verify_audit_log()`: None when this version has no such function.
    pub audit_chain: Option<AuditChain>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: String,
    pub order_ref: String,
    pub attempt: i32,
    pub amount: i64,
    pub status: String,
    pub intent: Option<String>,
    pub amount_received: i64,
    pub amount_refunded: i64,
    pub flagged_reason: Option<String>,
    /// `payment_intent` or `session` (a hosted Checkout Session, whose PaymentIntent Stripe makes).
    #[serde(default = "payment_intent_mode")]
    pub mode: String,
    /// The Checkout Session the payment knows (session mode).
    #[serde(default)]
    pub session: Option<String>,
}

fn payment_intent_mode() -> String {
    "payment_intent".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: i64,
    pub payment_id: String,
    pub kind: String,
    pub idempotency_key: String,
    /// waiting, pending, in_flight, done, dead or skipped.
    pub status: String,
    /// In flight with a lease that has not expired (at snapshot time).
    pub lease_live: bool,
    /// A refund command's `refund_ref` (the application's own reference), if it was given one.
    #[serde(default)]
    pub refund_ref: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub event_id: String,
    /// webhook (a signed delivery) or api (replayed by reconciliation).
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfillment {
    pub payment_id: String,
    pub completed: bool,
    pub dead: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provision {
    pub payment_id: String,
    pub consumer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRefund {
    pub refund_id: String,
    pub payment_id: String,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: i64,
    pub payment_id: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub cause: String,
    pub evidence_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub payment_id: Option<String>,
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditChain {
    pub ok: bool,
    /// What `pay.verify_audit_log()` said when it did not verify.
    pub detail: Option<String>,
}

/// What the application asked for, as it saw it. A call whose answer was lost (the server
/// crashed, the connection reset) is recorded with what is known.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppRecord {
    /// Every order_ref the application ever passed to `pay.begin_checkout`.
    pub orders: Vec<String>,
    pub checkouts: Vec<AskedCheckout>,
    pub refunds: Vec<AskedRefund>,
    pub cancels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskedCheckout {
    pub order_ref: String,
    pub amount: i64,
    /// The payment returned, when the call answered.
    pub payment_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskedRefund {
    pub payment_id: String,
    /// None: the whole remainder.
    pub amount: Option<i64>,
    /// The outbox command `pay.refund` returned, when the call answered.
    pub command_id: Option<i64>,
    /// The application's own reference for the refund; a call again with it is a retry.
    #[serde(default)]
    pub refund_ref: Option<String>,
}
