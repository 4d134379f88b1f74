//! The Customer a subscription bills: its email, its test clock (Stripe's simulated time), and
//! `invoice_settings.default_payment_method`, the card renewals are charged to.

use std::collections::BTreeMap;

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    pub id: String,
    pub created: i64,
    pub email: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub test_clock: Option<String>,
    /// A test PaymentMethod (`pm_card_visa`, `pm_card_chargeCustomerFail`, ...). Stripe would
    /// attach a copy with its own `pm_...` id; the fake keeps the test token itself.
    pub default_payment_method: Option<String>,
    pub invoice_prefix: String,
    pub next_invoice_sequence: i64,
}

impl Customer {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "customer",
            "address": null,
            "balance": 0,
            "created": self.created,
            "currency": null,
            "default_source": null,
            "delinquent": false,
            "description": self.description,
            "discount": null,
            "email": self.email,
            "invoice_prefix": self.invoice_prefix,
            "invoice_settings": {
                "custom_fields": null,
                "default_payment_method": self.default_payment_method,
                "footer": null,
                "rendering_options": null,
            },
            "livemode": false,
            "metadata": self.metadata,
            "name": self.name,
            "next_invoice_sequence": self.next_invoice_sequence,
            "phone": null,
            "preferred_locales": [],
            "shipping": null,
            "tax_exempt": "none",
            "test_clock": self.test_clock,
        })
    }
}
