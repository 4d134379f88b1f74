//! Stripe's test clocks: a simulated time for the customers attached to one, advanced on request,
//! which is how Stripe itself lets a test live through renewals, failed payments and retries.

use serde_json::{json, Value};

/// Stripe deletes a test clock 30 days after creation.
pub const LIFETIME_SECS: i64 = 30 * 86_400;

#[derive(Debug, Clone, PartialEq)]
pub struct TestClock {
    pub id: String,
    pub created: i64,
    pub frozen_time: i64,
    pub name: Option<String>,
}

impl TestClock {
    /// `status` is `ready`: the fake advances synchronously, so a clock is never seen mid-way.
    pub fn to_json(&self, status: &str) -> Value {
        json!({
            "id": self.id,
            "object": "test_helpers.test_clock",
            "created": self.created,
            "deletes_after": self.created + LIFETIME_SECS,
            "frozen_time": self.frozen_time,
            "livemode": false,
            "name": self.name,
            "status": status,
            "status_details": {},
        })
    }
}
