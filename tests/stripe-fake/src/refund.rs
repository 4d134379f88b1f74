//! The Refund object.

use std::collections::BTreeMap;

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Refund {
    pub id: String,
    pub amount: i64,
    pub charge: String,
    pub currency: String,
    pub created: i64,
    pub payment_intent: String,
    pub reason: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl Refund {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "refund",
            "amount": self.amount,
            "balance_transaction": null,
            "charge": self.charge,
            "created": self.created,
            "currency": self.currency,
            "metadata": self.metadata,
            "payment_intent": self.payment_intent,
            "reason": self.reason,
            "receipt_number": null,
            "status": "succeeded",
        })
    }
}
