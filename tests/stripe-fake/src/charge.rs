//! The Charge a confirmation creates: what `charge.succeeded`, `charge.failed` and `charge.refunded`
//! carry, and what refunds draw down.

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub id: String,
    pub amount: i64,
    pub amount_refunded: i64,
    pub currency: String,
    pub created: i64,
    pub payment_intent: String,
    pub payment_method: String,
    pub succeeded: bool,
    pub failure_code: Option<&'static str>,
    pub failure_message: Option<&'static str>,
}

impl Charge {
    pub fn remaining(&self) -> i64 {
        self.amount - self.amount_refunded
    }

    pub fn to_json(&self) -> Value {
        let captured = if self.succeeded { self.amount } else { 0 };
        json!({
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": captured,
            "amount_refunded": self.amount_refunded,
            "balance_transaction": null,
            "captured": self.succeeded,
            "created": self.created,
            "currency": self.currency,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "livemode": false,
            "metadata": {},
            "paid": self.succeeded,
            "payment_intent": self.payment_intent,
            "payment_method": self.payment_method,
            "refunded": self.succeeded && self.amount_refunded == self.amount,
            "status": if self.succeeded { "succeeded" } else { "failed" },
        })
    }
}
