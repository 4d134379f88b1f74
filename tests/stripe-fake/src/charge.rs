//! The Charge a confirmation creates: what `charge.pending`, `charge.succeeded`, `charge.failed`
//! and `charge.refunded` carry, and what refunds draw down.

use serde_json::{json, Value};

/// A card charge settles at once; a bank debit (Checkout's delayed methods) stays pending for days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeStatus {
    Pending,
    Succeeded,
    Failed,
}

impl ChargeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Pending => "pending",
            ChargeStatus::Succeeded => "succeeded",
            ChargeStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub id: String,
    pub amount: i64,
    pub amount_refunded: i64,
    pub currency: String,
    pub created: i64,
    pub payment_intent: String,
    pub payment_method: String,
    pub status: ChargeStatus,
    pub failure_code: Option<&'static str>,
    pub failure_message: Option<&'static str>,
}

impl Charge {
    pub fn succeeded(&self) -> bool {
        self.status == ChargeStatus::Succeeded
    }

    pub fn remaining(&self) -> i64 {
        self.amount - self.amount_refunded
    }

    pub fn to_json(&self) -> Value {
        // A pending debit is captured (the money is on its way) but not yet paid.
        let captured = self.status != ChargeStatus::Failed;
        json!({
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": if captured { self.amount } else { 0 },
            "amount_refunded": self.amount_refunded,
            "balance_transaction": null,
            "captured": captured,
            "created": self.created,
            "currency": self.currency,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "livemode": false,
            "metadata": {},
            "paid": self.succeeded(),
            "payment_intent": self.payment_intent,
            "payment_method": self.payment_method,
            "refunded": self.succeeded() && self.amount_refunded == self.amount,
            "status": self.status.as_str(),
        })
    }
}
