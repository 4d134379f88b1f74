//! Reading the billing objects a subscription is made of (Subscription, Invoice, and a Checkout
//! Session in subscription mode) in both API shapes, into one flat set of facts the SQL side
//! writes (`pay._billing_facts`, `pay._apply_billing_object`).
//!
//! API version 2025-03-31 ("basil") moved two things pgpay reads:
//! - an invoice's subscription: `invoice.subscription` (and its metadata in
//!   `invoice.subscription_details.metadata`) became `invoice.parent.subscription_details.
//!   subscription` (and `.metadata`);
//! - a subscription's period: `subscription.current_period_start/end` moved onto each item,
//!   `items.data[].current_period_start/end`.
//!
//! Events arrive in the endpoint's API version, which its owner may change at any time, so both
//! shapes are read, whatever `api_version` an event claims.

use serde_json::{json, Map, Value};

use crate::event::{field_i64, field_text, parse_uuid};

/// Our metadata key holding the subscription's id (a canonical UUID).
pub const CLAIM_KEY: &str = "pgpay_subscription_id";

/// The kinds of billing object pgpay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingKind {
    Subscription,
    Invoice,
    /// A Checkout Session in `mode=subscription` (payment-mode sessions belong to payments).
    SubscriptionSession,
}

impl BillingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingKind::Subscription => "subscription",
            BillingKind::Invoice => "invoice",
            BillingKind::SubscriptionSession => "checkout_session",
        }
    }

    /// The kind of `object`, `None` when it is not a billing object pgpay reads.
    pub fn of(object: &Value) -> Option<BillingKind> {
        match object.get("object")?.as_str()? {
            "subscription" => Some(BillingKind::Subscription),
            "invoice" => Some(BillingKind::Invoice),
            "checkout.session" if object.get("mode")?.as_str()? == "subscription" => {
                Some(BillingKind::SubscriptionSession)
            }
            _ => None,
        }
    }
}

/// What a billing object says about the pgpay subscription it belongs to: how to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRef {
    pub kind: BillingKind,
    /// Stripe's subscription id (`sub_...`), when the object names one.
    pub subscription: Option<String>,
    /// The Checkout Session id, for a session.
    pub session: Option<String>,
    /// The subscription id our metadata claims, when it is a canonical UUID.
    pub claimed: Option<[u8; 16]>,
}

/// An id field that Stripe sends as a string, or as the expanded object.
fn id_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(id) => Some(id.clone()),
        Value::Object(expanded) => expanded.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// An invoice's subscription details: `parent.subscription_details` (2025-03-31 and later), else
/// the older top-level `subscription` and `subscription_details`.
fn invoice_subscription(invoice: &Value) -> (Option<String>, Option<&Value>) {
    let parent = invoice.pointer("/parent/subscription_details");
    let new_id = parent.and_then(|d| id_of(d.get("subscription")));
    let new_meta = parent
        .and_then(|d| d.get("metadata"))
        .filter(|m| m.is_object());
    let old_id = id_of(invoice.get("subscription"));
    let old_meta = invoice
        .pointer("/subscription_details/metadata")
        .filter(|m| m.is_object());
    (new_id.or(old_id), new_meta.or(old_meta))
}

fn claim_in(metadata: Option<&Value>) -> Option<[u8; 16]> {
    metadata
        .and_then(|m| field_text(m, CLAIM_KEY))
        .and_then(|c| parse_uuid(&c))
}

/// How to find the subscription `object` speaks of; `None` when it is not a billing object.
pub fn subscription_ref(object: &Value) -> Option<SubscriptionRef> {
    let kind = BillingKind::of(object)?;
    Some(match kind {
        BillingKind::Subscription => SubscriptionRef {
            kind,
            subscription: field_text(object, "id"),
            session: None,
            claimed: claim_in(object.get("metadata")),
        },
        BillingKind::Invoice => {
            let (subscription, metadata) = invoice_subscription(object);
            SubscriptionRef {
                kind,
                subscription,
                session: None,
                claimed: claim_in(metadata),
            }
        }
        BillingKind::SubscriptionSession => SubscriptionRef {
            kind,
            subscription: id_of(object.get("subscription")),
            session: field_text(object, "id"),
            claimed: claim_in(object.get("metadata")),
        },
    })
}

/// Why `object` cannot be applied, or `None` when it can. Checked before anything is written:
/// webhooks store such an object for a human, outbox answers and reconciliation refuse it.
pub fn billing_problem(object: &Value) -> Option<&'static str> {
    let Some(kind) = BillingKind::of(object) else {
        return Some(
            "it is not a Subscription, an Invoice or a subscription-mode Checkout Session",
        );
    };
    if field_text(object, "id").is_none() {
        return Some("the object has no id");
    }
    if field_text(object, "status").is_none() {
        return Some("the object has no status");
    }
    if times(kind, object).any(|t| !(0..=MAX_TIME).contains(&t)) {
        return Some("a time of the object is not a Unix time between 1970 and 9999");
    }
    match kind {
        BillingKind::Subscription => {
            let quantity = first_item(object).map(|item| field_i64(item, "quantity"));
            if matches!(quantity, Some(Err(_))) {
                return Some("the subscription item's quantity is not an integer");
            }
            if matches!(quantity, Some(Ok(Some(q))) if q < 0) {
                return Some("the subscription item's quantity is negative");
            }
            if period(object).is_err() {
                return Some("the subscription's current period is not made of integers");
            }
        }
        BillingKind::Invoice => {
            for key in ["amount_due", "amount_paid"] {
                if field_i64(object, key).is_err() {
                    return Some("an invoice amount is not an integer");
                }
            }
            if invoice_subscription(object).0.is_none() {
                return Some("the invoice belongs to no subscription");
            }
        }
        BillingKind::SubscriptionSession => {
            if field_i64(object, "expires_at").is_err() {
                return Some("the Checkout Session's expires_at is not an integer");
            }
        }
    }
    None
}

/// Latest Unix time pgpay stores (9999-12-31T23:59:59Z): PostgreSQL's timestamps reach further,
/// but no Stripe time is anywhere near.
const MAX_TIME: i64 = 253_402_300_799;

/// Every integer time pgpay reads from `object` (unreadable ones are the other checks' business).
fn times(kind: BillingKind, object: &Value) -> impl Iterator<Item = i64> + '_ {
    let int = |o: Option<&Value>, key: &str| o.and_then(|o| field_i64(o, key).ok().flatten());
    let mut found = Vec::new();
    match kind {
        BillingKind::Subscription => {
            for key in ["current_period_start", "current_period_end", "canceled_at"] {
                found.extend(int(Some(object), key));
            }
            if let Some(items) = object.pointer("/items/data").and_then(Value::as_array) {
                for item in items {
                    found.extend(int(Some(item), "current_period_start"));
                    found.extend(int(Some(item), "current_period_end"));
                }
            }
        }
        BillingKind::Invoice => {
            for key in ["period_start", "period_end"] {
                found.extend(int(Some(object), key));
            }
            found.extend(int(object.get("status_transitions"), "paid_at"));
            let line = object.pointer("/lines/data/0/period");
            found.extend(int(line, "start"));
            found.extend(int(line, "end"));
        }
        BillingKind::SubscriptionSession => found.extend(int(Some(object), "expires_at")),
    }
    found.into_iter()
}

fn first_item(subscription: &Value) -> Option<&Value> {
    subscription.pointer("/items/data/0")
}

/// The subscription's current period (start, end), unix seconds: on the subscription (before
/// 2025-03-31), else on its items (the earliest start and the latest end, as one period).
fn period(subscription: &Value) -> Result<(Option<i64>, Option<i64>), &'static str> {
    let bad = |_| "not an integer";
    let start = field_i64(subscription, "current_period_start").map_err(bad)?;
    let end = field_i64(subscription, "current_period_end").map_err(bad)?;
    if start.is_some() || end.is_some() {
        return Ok((start, end));
    }
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    if let Some(items) = subscription
        .pointer("/items/data")
        .and_then(Value::as_array)
    {
        for item in items {
            starts.extend(field_i64(item, "current_period_start").map_err(bad)?);
            ends.extend(field_i64(item, "current_period_end").map_err(bad)?);
        }
    }
    Ok((starts.into_iter().min(), ends.into_iter().max()))
}

/// The invoice's service period: its first line's `period` (what a subscription invoice bills
/// for), else the invoice's own `period_start/end`.
fn invoice_period(invoice: &Value) -> (Option<i64>, Option<i64>) {
    let read = |obj: Option<&Value>, key: &str| obj.and_then(|o| field_i64(o, key).ok().flatten());
    let line = invoice.pointer("/lines/data/0/period");
    match (read(line, "start"), read(line, "end")) {
        (Some(start), Some(end)) => (Some(start), Some(end)),
        _ => (
            read(Some(invoice), "period_start"),
            read(Some(invoice), "period_end"),
        ),
    }
}

/// Which API shape the object is in, for the audit trail: `2025-03-31` when it has the fields
/// that version introduced, else `pre-2025-03-31`.
fn shape(kind: BillingKind, object: &Value) -> &'static str {
    let new = match kind {
        BillingKind::Subscription => object.get("current_period_end").is_none(),
        BillingKind::Invoice => object.get("parent").is_some_and(|p| !p.is_null()),
        BillingKind::SubscriptionSession => return "any",
    };
    if new {
        "2025-03-31"
    } else {
        "pre-2025-03-31"
    }
}

/// The facts pgpay keeps from a billing object, as one JSON object (NULLs left out):
/// `{"problem": ...}` when it cannot be applied.
pub fn billing_facts(object: &Value) -> Value {
    if let Some(problem) = billing_problem(object) {
        return json!({ "problem": problem });
    }
    let Some(r) = subscription_ref(object) else {
        return json!({ "problem": "not a billing object" });
    };
    let mut facts = Map::new();
    let mut put = |key: &str, value: Value| {
        if !value.is_null() {
            facts.insert(key.to_owned(), value);
        }
    };
    put("kind", json!(r.kind.as_str()));
    put("id", json!(field_text(object, "id")));
    put("status", json!(field_text(object, "status")));
    put("subscription", json!(r.subscription));
    put("claimed", json!(r.claimed.map(format_uuid)));
    put("customer", json!(id_of(object.get("customer"))));
    put("shape", json!(shape(r.kind, object)));
    match r.kind {
        BillingKind::Subscription => {
            let item = first_item(object);
            put("item", json!(item.and_then(|i| field_text(i, "id"))));
            put(
                "price",
                json!(item.and_then(|i| id_of(i.get("price")).or_else(|| id_of(i.get("plan"))))),
            );
            put(
                "quantity",
                json!(item.and_then(|i| field_i64(i, "quantity").ok().flatten())),
            );
            let (start, end) = period(object).unwrap_or((None, None));
            put("period_start", json!(start));
            put("period_end", json!(end));
            put(
                "cancel_at_period_end",
                json!(object
                    .get("cancel_at_period_end")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)),
            );
            put(
                "canceled_at",
                json!(field_i64(object, "canceled_at").ok().flatten()),
            );
        }
        BillingKind::Invoice => {
            for key in ["amount_due", "amount_paid"] {
                put(key, json!(field_i64(object, key).ok().flatten()));
            }
            put(
                "currency",
                json!(field_text(object, "currency").map(|c| c.to_lowercase())),
            );
            put(
                "billing_reason",
                json!(field_text(object, "billing_reason")),
            );
            let (start, end) = invoice_period(object);
            put("period_start", json!(start));
            put("period_end", json!(end));
            put(
                "paid_at",
                json!(object
                    .pointer("/status_transitions/paid_at")
                    .and_then(|p| field_i64(&json!({ "p": p }), "p").ok().flatten())),
            );
        }
        BillingKind::SubscriptionSession => {
            put("url", json!(field_text(object, "url")));
            put(
                "expires_at",
                json!(field_i64(object, "expires_at").ok().flatten()),
            );
            put("invoice", json!(id_of(object.get("invoice"))));
        }
    }
    Value::Object(facts)
}

fn format_uuid(bytes: [u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn old_subscription() -> Value {
        json!({"id": "sub_1", "object": "subscription", "status": "active", "customer": "cus_1",
               "current_period_start": 100, "current_period_end": 200, "cancel_at_period_end": false,
               "canceled_at": null, "metadata": {CLAIM_KEY: ID, "subscription_ref": "acct-1"},
               "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                   "price": {"id": "price_1", "object": "price"}, "quantity": 3}]}})
    }

    fn new_subscription() -> Value {
        let mut s = old_subscription();
        let o = s.as_object_mut().unwrap();
        o.remove("current_period_start");
        o.remove("current_period_end");
        s["items"]["data"][0]["current_period_start"] = json!(100);
        s["items"]["data"][0]["current_period_end"] = json!(200);
        s
    }

    fn old_invoice() -> Value {
        json!({"id": "in_1", "object": "invoice", "status": "paid", "subscription": "sub_1",
               "subscription_details": {"metadata": {CLAIM_KEY: ID}}, "amount_due": 2000,
               "amount_paid": 2000, "currency": "USD", "billing_reason": "subscription_cycle",
               "period_start": 1, "period_end": 2, "customer": "cus_1",
               "status_transitions": {"paid_at": 150},
               "lines": {"data": [{"period": {"start": 100, "end": 200}}]}})
    }

    fn new_invoice() -> Value {
        let mut i = old_invoice();
        let o = i.as_object_mut().unwrap();
        o.remove("subscription");
        o.remove("subscription_details");
        i["parent"] = json!({"type": "subscription_details", "quote_details": null,
            "subscription_details": {"subscription": "sub_1", "metadata": {CLAIM_KEY: ID}}});
        i
    }

    #[test]
    fn both_subscription_shapes_read_the_same_facts() {
        for (shape, s) in [
            ("pre-2025-03-31", old_subscription()),
            ("2025-03-31", new_subscription()),
        ] {
            let f = billing_facts(&s);
            assert_eq!(f["shape"], shape);
            assert_eq!(f["kind"], "subscription");
            assert_eq!(f["subscription"], "sub_1");
            assert_eq!(f["claimed"], ID);
            assert_eq!(f["status"], "active");
            assert_eq!(f["item"], "si_1");
            assert_eq!(f["price"], "price_1");
            assert_eq!(f["quantity"], 3);
            assert_eq!(f["period_start"], 100);
            assert_eq!(f["period_end"], 200);
            assert_eq!(f["cancel_at_period_end"], false);
            assert!(f.get("canceled_at").is_none());
        }
    }

    #[test]
    fn both_invoice_shapes_read_the_same_facts() {
        for (shape, i) in [
            ("pre-2025-03-31", old_invoice()),
            ("2025-03-31", new_invoice()),
        ] {
            let f = billing_facts(&i);
            assert_eq!(f["shape"], shape, "{i}");
            assert_eq!(f["kind"], "invoice");
            assert_eq!(f["subscription"], "sub_1");
            assert_eq!(f["claimed"], ID);
            assert_eq!(f["currency"], "usd");
            assert_eq!(f["amount_paid"], 2000);
            assert_eq!(f["period_start"], 100);
            assert_eq!(f["period_end"], 200);
            assert_eq!(f["paid_at"], 150);
        }
    }

    #[test]
    fn items_of_several_periods_make_one_period() {
        let mut s = new_subscription();
        s["items"]["data"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": "si_2", "current_period_start": 90, "current_period_end": 250}));
        let f = billing_facts(&s);
        assert_eq!(
            (f["period_start"].clone(), f["period_end"].clone()),
            (json!(90), json!(250))
        );
    }

    #[test]
    fn an_expanded_subscription_and_customer_are_read_by_id() {
        let mut i = old_invoice();
        i["subscription"] = json!({"id": "sub_9", "object": "subscription"});
        i["customer"] = json!({"id": "cus_9", "object": "customer"});
        let f = billing_facts(&i);
        assert_eq!(f["subscription"], "sub_9");
        assert_eq!(f["customer"], "cus_9");
    }

    #[test]
    fn kinds_and_references() {
        let session = json!({"id": "cs_1", "object": "checkout.session", "mode": "subscription",
            "status": "complete", "subscription": "sub_1", "metadata": {CLAIM_KEY: ID}});
        let r = subscription_ref(&session).unwrap();
        assert_eq!(r.kind, BillingKind::SubscriptionSession);
        assert_eq!(r.session.as_deref(), Some("cs_1"));
        assert_eq!(r.subscription.as_deref(), Some("sub_1"));
        assert!(r.claimed.is_some());
        // A payment-mode session, a PaymentIntent: not billing objects.
        assert!(
            subscription_ref(&json!({"object": "checkout.session", "mode": "payment"})).is_none()
        );
        assert!(subscription_ref(&json!({"object": "payment_intent", "id": "pi_1"})).is_none());
        // 36 hyphens claim nothing.
        let mut s = old_subscription();
        s["metadata"][CLAIM_KEY] = json!("-".repeat(36));
        assert_eq!(subscription_ref(&s).unwrap().claimed, None);
    }

    #[test]
    fn broken_objects_name_their_problem() {
        assert_eq!(billing_problem(&old_subscription()), None);
        assert_eq!(billing_problem(&new_invoice()), None);
        let mut cases = Vec::new();
        let mut s = old_subscription();
        s.as_object_mut().unwrap().remove("status");
        cases.push(s);
        let mut s = new_subscription();
        s["items"]["data"][0]["quantity"] = json!("three");
        cases.push(s);
        let mut s = old_subscription();
        s["current_period_end"] = json!(12.5);
        cases.push(s);
        let mut i = old_invoice();
        i["amount_paid"] = json!("lots");
        cases.push(i);
        let mut i = old_invoice();
        i.as_object_mut().unwrap().remove("subscription");
        cases.push(i);
        let mut i = new_invoice();
        i.as_object_mut().unwrap().remove("id");
        cases.push(i);
        cases.push(json!({"object": "customer", "id": "cus_1"}));
        let mut s = new_subscription();
        s["items"]["data"][0]["current_period_end"] = json!(i64::MAX);
        cases.push(s);
        let mut s = old_subscription();
        s["items"]["data"][0]["quantity"] = json!(-1);
        cases.push(s);
        let mut i = old_invoice();
        i["status_transitions"]["paid_at"] = json!(-5);
        cases.push(i);
        for case in cases {
            assert!(billing_problem(&case).is_some(), "{case}");
            assert!(billing_facts(&case).get("problem").is_some());
        }
    }
}
