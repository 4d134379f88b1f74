//! Products and Prices: what a subscription sells. A recurring Price bills `unit_amount` per unit
//! every `interval_count` `interval`s; a one-time Price is a Checkout line in payment mode.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::calendar::Interval;

#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub id: String,
    pub created: i64,
    pub name: String,
    pub description: Option<String>,
    pub active: bool,
    pub metadata: BTreeMap<String, String>,
}

impl Product {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "product",
            "active": self.active,
            "attributes": [],
            "created": self.created,
            "default_price": null,
            "description": self.description,
            "images": [],
            "livemode": false,
            "marketing_features": [],
            "metadata": self.metadata,
            "name": self.name,
            "package_dimensions": null,
            "shippable": null,
            "statement_descriptor": null,
            "tax_code": null,
            "type": "service",
            "unit_label": null,
            "updated": self.created,
            "url": null,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recurring {
    pub interval: Interval,
    pub interval_count: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub id: String,
    pub created: i64,
    pub product: String,
    pub currency: String,
    pub unit_amount: i64,
    pub recurring: Option<Recurring>,
    pub nickname: Option<String>,
    pub lookup_key: Option<String>,
    pub active: bool,
    pub metadata: BTreeMap<String, String>,
}

impl Price {
    pub fn to_json(&self) -> Value {
        let recurring = self.recurring.map(|r| {
            json!({
                "aggregate_usage": null,
                "interval": r.interval.as_str(),
                "interval_count": r.interval_count,
                "meter": null,
                "trial_period_days": null,
                "usage_type": "licensed",
            })
        });
        json!({
            "id": self.id,
            "object": "price",
            "active": self.active,
            "billing_scheme": "per_unit",
            "created": self.created,
            "currency": self.currency,
            "custom_unit_amount": null,
            "livemode": false,
            "lookup_key": self.lookup_key,
            "metadata": self.metadata,
            "nickname": self.nickname,
            "product": self.product,
            "recurring": recurring,
            "tax_behavior": "unspecified",
            "tiers_mode": null,
            "transform_quantity": null,
            "type": if self.recurring.is_some() { "recurring" } else { "one_time" },
            "unit_amount": self.unit_amount,
            "unit_amount_decimal": self.unit_amount.to_string(),
        })
    }

    /// The legacy `plan` a recurring price also appears as (on subscriptions and their items).
    pub fn plan_json(&self) -> Value {
        let (interval, count) = self
            .recurring
            .map(|r| (r.interval.as_str(), r.interval_count))
            .unwrap_or(("month", 1));
        json!({
            "id": self.id,
            "object": "plan",
            "active": self.active,
            "aggregate_usage": null,
            "amount": self.unit_amount,
            "amount_decimal": self.unit_amount.to_string(),
            "billing_scheme": "per_unit",
            "created": self.created,
            "currency": self.currency,
            "interval": interval,
            "interval_count": count,
            "livemode": false,
            "metadata": self.metadata,
            "meter": null,
            "nickname": self.nickname,
            "product": self.product,
            "tiers_mode": null,
            "transform_usage": null,
            "trial_period_days": null,
            "usage_type": "licensed",
        })
    }
}
