//! The Checkout Session object, its JSON as Stripe renders it (API version
//! [`crate::API_VERSION`]), and the store that keeps sessions in list order with an index of the
//! open ones by expiry, so that expiring the due sessions costs O(log n) per request.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::collection::{Collection, Key};
use crate::line_items::LineItem;

/// Stripe's default lifetime of a session, and the bounds on `expires_at`.
pub const DEFAULT_LIFETIME_SECS: i64 = 24 * 3600;
pub const MIN_LIFETIME_SECS: i64 = 30 * 60;

/// `payment` and `subscription` are modelled; `setup` would be a further variant with its own
/// object field (`setup_intent`), which renders as null until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Payment,
    Subscription,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Payment => "payment",
            Mode::Subscription => "subscription",
        }
    }
}

/// A subscription-mode session's one line: a recurring Price and a quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionLine {
    pub price: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    Open,
    Complete,
    Expired,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 3] = [
        SessionStatus::Open,
        SessionStatus::Complete,
        SessionStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Open => "open",
            SessionStatus::Complete => "complete",
            SessionStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<SessionStatus> {
        SessionStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stripe's third value, `no_payment_required`, belongs to subscription trials and 100%
/// discounts; it joins with subscription mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Unpaid,
    Paid,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Unpaid => "unpaid",
            PaymentStatus::Paid => "paid",
        }
    }
}

/// `payment_intent_data[...]`: what the session's PaymentIntent will carry once it exists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PaymentIntentData {
    pub metadata: BTreeMap<String, String>,
    pub description: Option<String>,
    pub receipt_email: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub created: i64,
    pub expires_at: i64,
    pub mode: Mode,
    pub status: SessionStatus,
    pub payment_status: PaymentStatus,
    pub currency: String,
    pub amount_total: i64,
    pub line_items: Vec<LineItem>,
    pub payment_method_types: Vec<&'static str>,
    pub success_url: String,
    pub cancel_url: Option<String>,
    pub client_reference_id: Option<String>,
    pub customer: Option<String>,
    pub customer_email: Option<String>,
    /// The email the customer typed on the page, once they did.
    pub paid_by_email: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub payment_intent_data: PaymentIntentData,
    /// Created when the customer confirms (API versions since 2022-08-01), not with the session.
    pub payment_intent: Option<String>,
    /// `https://checkout.stripe.com/c/pay/cs_...` on Stripe; the fake's own address here.
    pub url: String,
    /// Subscription mode: the recurring price and quantity.
    pub subscription_line: Option<SubscriptionLine>,
    /// `subscription_data[metadata]`: what the subscription will carry.
    pub subscription_data_metadata: BTreeMap<String, String>,
    /// Subscription mode, once complete: the subscription and its first invoice.
    pub subscription: Option<String>,
    pub invoice: Option<String>,
}

impl Session {
    /// Stripe's rendering: every field of the published object, unused ones as Stripe sends them
    /// for a hosted payment-mode session without those features.
    pub fn to_json(&self) -> Value {
        let open = self.status == SessionStatus::Open;
        let customer_details = self.paid_by_email.as_ref().map(|email| {
            json!({
                "address": {
                    "city": null, "country": null, "line1": null, "line2": null,
                    "postal_code": null, "state": null,
                },
                "email": email,
                "name": null,
                "phone": null,
                "tax_exempt": "none",
                "tax_ids": [],
            })
        });
        let mut object = json!({
            "id": self.id,
            "object": "checkout.session",
            "after_expiration": null,
            "allow_promotion_codes": null,
            "amount_subtotal": self.amount_total,
            "amount_total": self.amount_total,
            "automatic_tax": { "enabled": false, "liability": null, "status": null },
            "billing_address_collection": null,
            "cancel_url": self.cancel_url,
            "client_reference_id": self.client_reference_id,
            "client_secret": null,
            "consent": null,
            "consent_collection": null,
            "created": self.created,
            "currency": self.currency,
            "currency_conversion": null,
            "custom_fields": [],
            "custom_text": {
                "after_submit": null,
                "shipping_address": null,
                "submit": null,
                "terms_of_service_acceptance": null,
            },
            "customer": self.customer,
            "customer_creation": if self.customer.is_some() { Value::Null } else { json!("if_required") },
            "customer_details": customer_details,
            "customer_email": self.customer_email,
            "expires_at": self.expires_at,
            "invoice": self.invoice,
            "invoice_creation": {
                "enabled": false,
                "invoice_data": {
                    "account_tax_ids": null,
                    "custom_fields": null,
                    "description": null,
                    "footer": null,
                    "issuer": null,
                    "metadata": {},
                    "rendering_options": null,
                },
            },
        });
        // Two halves: one `json!` this large exceeds the macro's recursion limit.
        let rest = json!({
            "livemode": false,
            "locale": null,
            "metadata": self.metadata,
            "mode": self.mode.as_str(),
            "payment_intent": self.payment_intent,
            "payment_link": null,
            "payment_method_collection": if self.mode == Mode::Subscription { "always" } else { "if_required" },
            "payment_method_configuration_details": null,
            "payment_method_options": {},
            "payment_method_types": self.payment_method_types,
            "payment_status": self.payment_status.as_str(),
            "phone_number_collection": { "enabled": false },
            "recovered_from": null,
            "saved_payment_method_options": null,
            "setup_intent": null,
            "shipping_address_collection": null,
            "shipping_cost": null,
            "shipping_details": null,
            "shipping_options": [],
            "status": self.status.as_str(),
            "submit_type": null,
            "subscription": self.subscription,
            "success_url": self.success_url,
            "total_details": { "amount_discount": 0, "amount_shipping": 0, "amount_tax": 0 },
            "ui_mode": "hosted",
            // "This value is only present when the session is active."
            "url": if open { Some(self.url.as_str()) } else { None },
        });
        if let (Some(object), Value::Object(rest)) = (object.as_object_mut(), rest) {
            object.extend(rest);
        }
        object
    }
}

/// Sessions in list order, plus the open ones by `(expires_at, key)`.
#[derive(Debug, Default)]
pub struct CheckoutSessions {
    pub all: Collection<Session>,
    open_by_expiry: BTreeSet<(i64, Key)>,
}

impl CheckoutSessions {
    pub fn insert(&mut self, session: Session) -> Key {
        let (open, expires_at) = (session.status == SessionStatus::Open, session.expires_at);
        let key = self
            .all
            .insert(session.id.clone(), session.created, session);
        if open {
            self.open_by_expiry.insert((expires_at, key));
        }
        key
    }

    pub fn get(&self, id: &str) -> Option<&Session> {
        self.all.get(id)
    }

    /// Mutates one session and keeps the expiry index in step with its status.
    pub fn update<R>(&mut self, id: &str, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        let key = self.all.key_of(id)?;
        let session = self.all.get_mut(id)?;
        let was_open = session.status == SessionStatus::Open;
        let result = f(session);
        if was_open && session.status != SessionStatus::Open {
            self.open_by_expiry.remove(&(session.expires_at, key));
        }
        Some(result)
    }

    /// Ids of the open sessions whose `expires_at` has passed, oldest expiry first.
    pub fn due(&self, now: i64) -> Vec<String> {
        self.open_by_expiry
            .range(..=(now, (i64::MAX, u64::MAX)))
            .filter_map(|(_, key)| self.all.get_by_key(key).map(|s| s.id.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, created: i64, expires_at: i64) -> Session {
        Session {
            id: id.into(),
            created,
            expires_at,
            mode: Mode::Payment,
            status: SessionStatus::Open,
            payment_status: PaymentStatus::Unpaid,
            currency: "usd".into(),
            amount_total: 100,
            line_items: Vec::new(),
            payment_method_types: vec!["card"],
            success_url: "https://example.com".into(),
            cancel_url: None,
            client_reference_id: None,
            customer: None,
            customer_email: None,
            paid_by_email: None,
            metadata: BTreeMap::new(),
            payment_intent_data: PaymentIntentData::default(),
            payment_intent: None,
            url: "http://127.0.0.1/c/pay/x".into(),
            subscription_line: None,
            subscription_data_metadata: BTreeMap::new(),
            subscription: None,
            invoice: None,
        }
    }

    #[test]
    fn due_sessions_by_expiry_and_only_while_open() {
        let mut all = CheckoutSessions::default();
        all.insert(session("late", 0, 300));
        all.insert(session("early", 1, 200));
        all.insert(session("paid", 2, 100));
        all.update("paid", |s| s.status = SessionStatus::Complete);
        assert_eq!(all.due(99), Vec::<String>::new());
        assert_eq!(all.due(200), ["early"]);
        assert_eq!(all.due(i64::MAX), ["early", "late"]);
        all.update("early", |s| s.status = SessionStatus::Expired);
        assert_eq!(all.due(i64::MAX), ["late"]);
    }

    #[test]
    fn url_only_while_open() {
        let mut s = session("cs", 0, 1);
        assert_eq!(s.to_json()["url"], "http://127.0.0.1/c/pay/x");
        s.status = SessionStatus::Expired;
        assert!(s.to_json()["url"].is_null());
        assert_eq!(s.to_json()["status"], "expired");
    }
}
