//! The Subscription object and its one item, rendered in either API shape
//! ([`crate::api_version::Shape`]): periods on the subscription (legacy) or on its items (basil).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::api_version::Shape;
use crate::price::Price;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubStatus {
    Incomplete,
    IncompleteExpired,
    Trialing,
    Active,
    PastDue,
    Unpaid,
    Paused,
    Canceled,
}

impl SubStatus {
    pub const ALL: [SubStatus; 8] = [
        SubStatus::Incomplete,
        SubStatus::IncompleteExpired,
        SubStatus::Trialing,
        SubStatus::Active,
        SubStatus::PastDue,
        SubStatus::Unpaid,
        SubStatus::Paused,
        SubStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubStatus::Incomplete => "incomplete",
            SubStatus::IncompleteExpired => "incomplete_expired",
            SubStatus::Trialing => "trialing",
            SubStatus::Active => "active",
            SubStatus::PastDue => "past_due",
            SubStatus::Unpaid => "unpaid",
            SubStatus::Paused => "paused",
            SubStatus::Canceled => "canceled",
        }
    }

    pub fn parse(text: &str) -> Option<SubStatus> {
        SubStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Ended for good: nothing bills any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, SubStatus::Canceled | SubStatus::IncompleteExpired)
    }

    /// Renews at period end.
    pub fn renews(self) -> bool {
        matches!(
            self,
            SubStatus::Active | SubStatus::PastDue | SubStatus::Unpaid | SubStatus::Trialing
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub created: i64,
    pub price: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub created: i64,
    pub customer: String,
    pub status: SubStatus,
    pub item: Item,
    pub currency: String,
    pub billing_cycle_anchor: i64,
    /// Periods since the anchor: the current period is `[end(n-1), end(n))`.
    pub period_index: i64,
    pub current_period_start: i64,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// `cancellation_details.reason`: `cancellation_requested` or `payment_failed`.
    pub cancellation_reason: Option<&'static str>,
    pub metadata: BTreeMap<String, String>,
    pub latest_invoice: Option<String>,
    pub test_clock: Option<String>,
    /// `created` of the newest failed-payment event: a recovery's events come at least a second
    /// later, as they would on Stripe (where a retry is hours or days after the failure).
    pub failed_event_at: Option<i64>,
    /// `created` of its newest event: its events never go back in time.
    pub last_event_at: i64,
}

impl Subscription {
    pub fn to_json(&self, shape: Shape, price: Option<&Price>) -> Value {
        let item = self.item_json(shape, price);
        let plan = price.map(Price::plan_json);
        let mut object = json!({
            "id": self.id,
            "object": "subscription",
            "application": null,
            "application_fee_percent": null,
            "automatic_tax": { "disabled_reason": null, "enabled": false, "liability": null },
            "billing_cycle_anchor": self.billing_cycle_anchor,
            "billing_cycle_anchor_config": null,
            "billing_thresholds": null,
            "cancel_at": if self.cancel_at_period_end { Some(self.current_period_end) } else { None },
            "cancel_at_period_end": self.cancel_at_period_end,
            "canceled_at": self.canceled_at,
            "cancellation_details": {
                "comment": null,
                "feedback": null,
                "reason": self.cancellation_reason,
            },
            "collection_method": "charge_automatically",
            "created": self.created,
            "currency": self.currency,
            "customer": self.customer,
            "days_until_due": null,
            "default_payment_method": null,
            "default_source": null,
            "default_tax_rates": [],
            "description": null,
            "discount": null,
            "discounts": [],
            "ended_at": self.ended_at,
            "invoice_settings": { "account_tax_ids": null, "issuer": { "type": "self" } },
        });
        let rest = json!({
            "items": {
                "object": "list",
                "data": [item],
                "has_more": false,
                "total_count": 1,
                "url": format!("/v1/subscription_items?subscription={}", self.id),
            },
            "latest_invoice": self.latest_invoice,
            "livemode": false,
            "metadata": self.metadata,
            "next_pending_invoice_item_invoice": null,
            "on_behalf_of": null,
            "pause_collection": null,
            "payment_settings": {
                "payment_method_options": null,
                "payment_method_types": null,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": null,
            "pending_setup_intent": null,
            "pending_update": null,
            "plan": plan,
            "quantity": self.item.quantity,
            "schedule": null,
            "start_date": self.created,
            "status": self.status.as_str(),
            "test_clock": self.test_clock,
            "transfer_data": null,
            "trial_end": null,
            "trial_settings": { "end_behavior": { "missing_payment_method": "create_invoice" } },
            "trial_start": null,
        });
        if let (Some(object), Value::Object(rest)) = (object.as_object_mut(), rest) {
            object.extend(rest);
            if shape == Shape::Legacy {
                object.insert(
                    "current_period_start".into(),
                    self.current_period_start.into(),
                );
                object.insert("current_period_end".into(), self.current_period_end.into());
            }
        }
        object
    }

    pub fn item_json(&self, shape: Shape, price: Option<&Price>) -> Value {
        let mut item = json!({
            "id": self.item.id,
            "object": "subscription_item",
            "billing_thresholds": null,
            "created": self.item.created,
            "discounts": [],
            "metadata": {},
            "plan": price.map(Price::plan_json),
            "price": price.map(Price::to_json),
            "quantity": self.item.quantity,
            "subscription": self.id,
            "tax_rates": [],
        });
        if shape == Shape::Basil {
            if let Some(item) = item.as_object_mut() {
                item.insert(
                    "current_period_start".into(),
                    self.current_period_start.into(),
                );
                item.insert("current_period_end".into(), self.current_period_end.into());
            }
        }
        item
    }

    /// What `previous_attributes` says about a change of period, in the shape of the event.
    pub fn previous_period(&self, shape: Shape, price: Option<&Price>) -> Value {
        match shape {
            Shape::Legacy => json!({
                "current_period_start": self.current_period_start,
                "current_period_end": self.current_period_end,
                "latest_invoice": self.latest_invoice,
            }),
            Shape::Basil => json!({
                "items": {
                    "data": [self.item_json(shape, price)],
                },
                "latest_invoice": self.latest_invoice,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub() -> Subscription {
        Subscription {
            id: "sub_1".into(),
            created: 10,
            customer: "cus_1".into(),
            status: SubStatus::Active,
            item: Item {
                id: "si_1".into(),
                created: 10,
                price: "price_1".into(),
                quantity: 2,
            },
            currency: "usd".into(),
            billing_cycle_anchor: 10,
            period_index: 1,
            current_period_start: 10,
            current_period_end: 20,
            cancel_at_period_end: false,
            canceled_at: None,
            ended_at: None,
            cancellation_reason: None,
            metadata: BTreeMap::new(),
            latest_invoice: None,
            test_clock: None,
            failed_event_at: None,
            last_event_at: 0,
        }
    }

    #[test]
    fn periods_move_to_items_in_basil() {
        let legacy = sub().to_json(Shape::Legacy, None);
        assert_eq!(legacy["current_period_end"], 20);
        assert!(legacy["items"]["data"][0]
            .get("current_period_end")
            .is_none());
        let basil = sub().to_json(Shape::Basil, None);
        assert!(basil.get("current_period_end").is_none());
        assert_eq!(basil["items"]["data"][0]["current_period_end"], 20);
        assert_eq!(basil["items"]["data"][0]["current_period_start"], 10);
        assert_eq!(basil["quantity"], 2);
    }
}
