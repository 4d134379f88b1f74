//! The PaymentIntent object, its JSON as Stripe renders it, and the store that keeps PaymentIntents
//! in list order with a metadata index (search by `metadata['pgpay_payment_id']` is a lookup).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::Value;

use crate::collection::{Collection, Key};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresAction,
    Processing,
    RequiresCapture,
    Canceled,
    Succeeded,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::RequiresPaymentMethod,
        Status::RequiresConfirmation,
        Status::RequiresAction,
        Status::Processing,
        Status::RequiresCapture,
        Status::Canceled,
        Status::Succeeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::RequiresPaymentMethod => "requires_payment_method",
            Status::RequiresConfirmation => "requires_confirmation",
            Status::RequiresAction => "requires_action",
            Status::Processing => "processing",
            Status::RequiresCapture => "requires_capture",
            Status::Canceled => "canceled",
            Status::Succeeded => "succeeded",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Statuses in which the amount, currency and payment method may still change, and in which
    /// the PaymentIntent may be confirmed.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            Status::RequiresPaymentMethod | Status::RequiresConfirmation | Status::RequiresAction
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PaymentIntent {
    pub id: String,
    pub amount: i64,
    pub amount_received: i64,
    pub currency: String,
    pub status: Status,
    pub client_secret: String,
    pub created: i64,
    pub metadata: BTreeMap<String, String>,
    pub description: Option<String>,
    pub customer: Option<String>,
    pub receipt_email: Option<String>,
    pub payment_method: Option<String>,
    pub latest_charge: Option<String>,
    pub last_payment_error: Option<Value>,
    pub next_action: Option<Value>,
    pub canceled_at: Option<i64>,
    pub cancellation_reason: Option<String>,
    /// `card`, or the bank debit a Checkout customer chose (`us_bank_account`, `sepa_debit`).
    pub payment_method_type: &'static str,
    /// The Checkout Session that created this PaymentIntent: Stripe refuses to confirm or cancel
    /// it directly (expire the session instead). Not part of the PaymentIntent's JSON.
    pub checkout_session: Option<String>,
}

impl PaymentIntent {
    pub fn new(
        id: String,
        client_secret: String,
        amount: i64,
        currency: String,
        created: i64,
    ) -> Self {
        PaymentIntent {
            id,
            amount,
            amount_received: 0,
            currency,
            status: Status::RequiresPaymentMethod,
            client_secret,
            created,
            metadata: BTreeMap::new(),
            description: None,
            customer: None,
            receipt_email: None,
            payment_method: None,
            latest_charge: None,
            last_payment_error: None,
            next_action: None,
            canceled_at: None,
            cancellation_reason: None,
            payment_method_type: "card",
            checkout_session: None,
        }
    }

    /// Stripe's rendering, with the fields a client may read (unused ones present as null, as
    /// Stripe sends them, so that strict deserializers accept the fake's answers).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.view()).unwrap_or(Value::Null)
    }

    /// The same, serialized straight from borrowed fields: a page of 100 costs no JSON tree.
    pub fn view(&self) -> PaymentIntentJson<'_> {
        PaymentIntentJson {
            id: &self.id,
            object: "payment_intent",
            amount: self.amount,
            amount_capturable: 0,
            amount_received: self.amount_received,
            application: None,
            application_fee_amount: None,
            automatic_payment_methods: None,
            canceled_at: self.canceled_at,
            cancellation_reason: self.cancellation_reason.as_deref(),
            capture_method: "automatic",
            client_secret: &self.client_secret,
            confirmation_method: "automatic",
            created: self.created,
            currency: &self.currency,
            customer: self.customer.as_deref(),
            description: self.description.as_deref(),
            last_payment_error: self.last_payment_error.as_ref(),
            latest_charge: self.latest_charge.as_deref(),
            livemode: false,
            metadata: &self.metadata,
            next_action: self.next_action.as_ref(),
            on_behalf_of: None,
            payment_method: self.payment_method.as_deref(),
            payment_method_types: [self.payment_method_type],
            processing: None,
            receipt_email: self.receipt_email.as_deref(),
            setup_future_usage: None,
            shipping: None,
            statement_descriptor: None,
            statement_descriptor_suffix: None,
            status: self.status.as_str(),
            transfer_data: None,
            transfer_group: None,
        }
    }
}

/// A PaymentIntent as JSON, fields in Stripe's order.
#[derive(Debug, Serialize)]
pub struct PaymentIntentJson<'a> {
    id: &'a str,
    object: &'static str,
    amount: i64,
    amount_capturable: i64,
    amount_received: i64,
    application: Option<()>,
    application_fee_amount: Option<()>,
    automatic_payment_methods: Option<()>,
    canceled_at: Option<i64>,
    cancellation_reason: Option<&'a str>,
    capture_method: &'static str,
    client_secret: &'a str,
    confirmation_method: &'static str,
    created: i64,
    currency: &'a str,
    customer: Option<&'a str>,
    description: Option<&'a str>,
    last_payment_error: Option<&'a Value>,
    latest_charge: Option<&'a str>,
    livemode: bool,
    metadata: &'a BTreeMap<String, String>,
    next_action: Option<&'a Value>,
    on_behalf_of: Option<()>,
    payment_method: Option<&'a str>,
    payment_method_types: [&'static str; 1],
    processing: Option<()>,
    receipt_email: Option<&'a str>,
    setup_future_usage: Option<()>,
    shipping: Option<()>,
    statement_descriptor: Option<()>,
    statement_descriptor_suffix: Option<()>,
    status: &'static str,
    transfer_data: Option<()>,
    transfer_group: Option<()>,
}

/// PaymentIntents in list order, plus `(key, value)` → keys of the PaymentIntents carrying it.
#[derive(Debug, Default)]
pub struct PaymentIntents {
    pub all: Collection<PaymentIntent>,
    by_metadata: HashMap<(String, String), BTreeSet<Key>>,
}

impl PaymentIntents {
    pub fn insert(&mut self, pi: PaymentIntent) -> Key {
        let metadata = pi.metadata.clone();
        let key = self.all.insert(pi.id.clone(), pi.created, pi);
        self.index(key, &metadata);
        key
    }

    pub fn get(&self, id: &str) -> Option<&PaymentIntent> {
        self.all.get(id)
    }

    /// Mutates one PaymentIntent and keeps the metadata index in step with it.
    pub fn update<R>(&mut self, id: &str, f: impl FnOnce(&mut PaymentIntent) -> R) -> Option<R> {
        let key = self.all.key_of(id)?;
        let pi = self.all.get_mut(id)?;
        let before = pi.metadata.clone();
        let result = f(pi);
        let after = pi.metadata.clone();
        if before != after {
            self.unindex(key, &before);
            self.index(key, &after);
        }
        Some(result)
    }

    /// Keys of the PaymentIntents whose metadata has `key` = `value`.
    pub fn with_metadata(&self, key: &str, value: &str) -> Option<&BTreeSet<Key>> {
        self.by_metadata.get(&(key.to_owned(), value.to_owned()))
    }

    fn index(&mut self, key: Key, metadata: &BTreeMap<String, String>) {
        for (k, v) in metadata {
            self.by_metadata
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(key);
        }
    }

    fn unindex(&mut self, key: Key, metadata: &BTreeMap<String, String>) {
        for (k, v) in metadata {
            let entry = (k.clone(), v.clone());
            if let Some(keys) = self.by_metadata.get_mut(&entry) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_metadata.remove(&entry);
                }
            }
        }
    }
}
