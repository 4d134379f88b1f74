//! The Invoice a subscription period produces, rendered in either API shape: the subscription in
//! `subscription` and `subscription_details` (legacy) or `parent.subscription_details` (basil), the
//! line's origin in `subscription`/`subscription_item`/`type` (legacy) or `parent` (basil).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::api_version::Shape;
use crate::price::Price;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceStatus {
    Draft,
    Open,
    Paid,
    Uncollectible,
    Void,
}

impl InvoiceStatus {
    pub const ALL: [InvoiceStatus; 5] = [
        InvoiceStatus::Draft,
        InvoiceStatus::Open,
        InvoiceStatus::Paid,
        InvoiceStatus::Uncollectible,
        InvoiceStatus::Void,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Draft => "draft",
            InvoiceStatus::Open => "open",
            InvoiceStatus::Paid => "paid",
            InvoiceStatus::Uncollectible => "uncollectible",
            InvoiceStatus::Void => "void",
        }
    }

    pub fn parse(text: &str) -> Option<InvoiceStatus> {
        InvoiceStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    pub id: String,
    pub number: String,
    pub created: i64,
    pub customer: String,
    pub customer_email: Option<String>,
    pub subscription: String,
    pub subscription_item: String,
    /// `subscription_create`, `subscription_cycle`, `subscription_update`.
    pub billing_reason: &'static str,
    pub status: InvoiceStatus,
    pub currency: String,
    pub price: String,
    pub quantity: i64,
    pub unit_amount: i64,
    /// The invoice's own period (Stripe: the usage period that closed, equal ends for the first).
    pub period_start: i64,
    pub period_end: i64,
    /// The service period its line pays for.
    pub line_period: (i64, i64),
    pub attempt_count: i64,
    pub next_payment_attempt: Option<i64>,
    /// When a draft is finalized and first charged (Stripe: about an hour after creation).
    pub finalize_at: Option<i64>,
    pub finalized_at: Option<i64>,
    pub paid_at: Option<i64>,
    pub marked_uncollectible_at: Option<i64>,
    pub voided_at: Option<i64>,
    /// The subscription's metadata when the invoice was made.
    pub subscription_metadata: BTreeMap<String, String>,
    pub test_clock: Option<String>,
    pub line_id: String,
}

impl Invoice {
    pub fn total(&self) -> i64 {
        self.unit_amount.saturating_mul(self.quantity)
    }

    pub fn to_json(&self, shape: Shape, price: Option<&Price>, base_url: &str) -> Value {
        let total = self.total();
        let paid = self.status == InvoiceStatus::Paid;
        let amount_paid = if paid { total } else { 0 };
        let open_or_later = self.status != InvoiceStatus::Draft;
        let mut object = json!({
            "id": self.id,
            "object": "invoice",
            "account_country": "US",
            "account_name": "stripe-fake",
            "account_tax_ids": null,
            "amount_due": total,
            "amount_overpaid": 0,
            "amount_paid": amount_paid,
            "amount_remaining": total - amount_paid,
            "amount_shipping": 0,
            "application": null,
            "attempt_count": self.attempt_count,
            "attempted": self.attempt_count > 0,
            "auto_advance": !matches!(self.status, InvoiceStatus::Paid | InvoiceStatus::Void | InvoiceStatus::Uncollectible),
            "automatic_tax": { "disabled_reason": null, "enabled": false, "liability": null, "provider": null, "status": null },
            "billing_reason": self.billing_reason,
            "collection_method": "charge_automatically",
            "created": self.created,
            "currency": self.currency,
            "custom_fields": null,
            "customer": self.customer,
            "customer_address": null,
            "customer_email": self.customer_email,
            "customer_name": null,
            "customer_phone": null,
            "customer_shipping": null,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": null,
            "default_source": null,
            "default_tax_rates": [],
            "description": null,
            "discounts": [],
            "due_date": null,
            "effective_at": self.finalized_at,
            "ending_balance": if open_or_later { Some(0) } else { None },
            "footer": null,
            "from_invoice": null,
            "hosted_invoice_url": if open_or_later { Some(format!("{base_url}/i/{}", self.id)) } else { None },
            "invoice_pdf": if open_or_later { Some(format!("{base_url}/i/{}/pdf", self.id)) } else { None },
        });
        let rest = json!({
            "issuer": { "type": "self" },
            "last_finalization_error": null,
            "latest_revision": null,
            "lines": {
                "object": "list",
                "data": [self.line_json(shape, price)],
                "has_more": false,
                "total_count": 1,
                "url": format!("/v1/invoices/{}/lines", self.id),
            },
            "livemode": false,
            "metadata": {},
            "next_payment_attempt": self.next_payment_attempt,
            "number": if open_or_later { Some(self.number.as_str()) } else { None },
            "on_behalf_of": null,
            "payment_settings": { "default_mandate": null, "payment_method_options": null, "payment_method_types": null },
            "period_end": self.period_end,
            "period_start": self.period_start,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": null,
            "rendering": null,
            "shipping_cost": null,
            "shipping_details": null,
            "starting_balance": 0,
            "statement_descriptor": null,
            "status": self.status.as_str(),
            "status_transitions": {
                "finalized_at": self.finalized_at,
                "marked_uncollectible_at": self.marked_uncollectible_at,
                "paid_at": self.paid_at,
                "voided_at": self.voided_at,
            },
            "subtotal": total,
            "subtotal_excluding_tax": total,
            "test_clock": self.test_clock,
            "total": total,
            "total_discount_amounts": [],
            "total_excluding_tax": total,
            "total_taxes": [],
            "webhooks_delivered_at": self.created,
        });
        if let (Some(map), Value::Object(rest)) = (object.as_object_mut(), rest) {
            map.extend(rest);
            match shape {
                Shape::Legacy => {
                    let legacy = json!({
                        "charge": null,
                        "paid": paid,
                        "paid_out_of_band": false,
                        "payment_intent": null,
                        "quote": null,
                        "subscription": self.subscription,
                        "subscription_details": { "metadata": self.subscription_metadata },
                        "subscription_proration_date": null,
                        "tax": null,
                        "total_tax_amounts": [],
                    });
                    if let Value::Object(legacy) = legacy {
                        map.extend(legacy);
                    }
                }
                Shape::Basil => {
                    map.insert(
                        "parent".into(),
                        json!({
                            "quote_details": null,
                            "subscription_details": {
                                "metadata": self.subscription_metadata,
                                "subscription": self.subscription,
                            },
                            "type": "subscription_details",
                        }),
                    );
                }
            }
        }
        object
    }

    fn line_json(&self, shape: Shape, price: Option<&Price>) -> Value {
        let total = self.total();
        let product = price.map(|p| p.product.clone());
        let mut line = json!({
            "id": self.line_id,
            "object": "line_item",
            "amount": total,
            "currency": self.currency,
            "description": format!("{} × {} (at {} / period)", self.quantity, product.as_deref().unwrap_or("product"), self.unit_amount),
            "discount_amounts": [],
            "discountable": true,
            "discounts": [],
            "invoice": self.id,
            "livemode": false,
            "metadata": {},
            "period": { "end": self.line_period.1, "start": self.line_period.0 },
            "quantity": self.quantity,
            "taxes": [],
        });
        if let Some(map) = line.as_object_mut() {
            match shape {
                Shape::Legacy => {
                    map.insert("plan".into(), price.map(Price::plan_json).into());
                    map.insert("price".into(), price.map(Price::to_json).into());
                    map.insert("proration".into(), false.into());
                    map.insert(
                        "proration_details".into(),
                        json!({ "credited_items": null }),
                    );
                    map.insert("subscription".into(), self.subscription.clone().into());
                    map.insert(
                        "subscription_item".into(),
                        self.subscription_item.clone().into(),
                    );
                    map.insert("type".into(), "subscription".into());
                }
                Shape::Basil => {
                    map.insert(
                        "parent".into(),
                        json!({
                            "invoice_item_details": null,
                            "subscription_item_details": {
                                "invoice_item": null,
                                "proration": false,
                                "proration_details": { "credited_items": null },
                                "subscription": self.subscription,
                                "subscription_item": self.subscription_item,
                            },
                            "type": "subscription_item_details",
                        }),
                    );
                    map.insert(
                        "pricing".into(),
                        json!({
                            "price_details": { "price": self.price, "product": product },
                            "type": "price_details",
                            "unit_amount_decimal": self.unit_amount.to_string(),
                        }),
                    );
                }
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invoice() -> Invoice {
        Invoice {
            id: "in_1".into(),
            number: "ABC-0001".into(),
            created: 5,
            customer: "cus_1".into(),
            customer_email: None,
            subscription: "sub_1".into(),
            subscription_item: "si_1".into(),
            billing_reason: "subscription_cycle",
            status: InvoiceStatus::Paid,
            currency: "usd".into(),
            price: "price_1".into(),
            quantity: 3,
            unit_amount: 500,
            period_start: 1,
            period_end: 5,
            line_period: (5, 9),
            attempt_count: 1,
            next_payment_attempt: None,
            finalize_at: None,
            finalized_at: Some(6),
            paid_at: Some(6),
            marked_uncollectible_at: None,
            voided_at: None,
            subscription_metadata: BTreeMap::from([("subscription_ref".into(), "acct-1".into())]),
            test_clock: None,
            line_id: "il_1".into(),
        }
    }

    #[test]
    fn subscription_moves_into_parent_in_basil() {
        let legacy = invoice().to_json(Shape::Legacy, None, "http://x");
        assert_eq!(legacy["subscription"], "sub_1");
        assert_eq!(
            legacy["subscription_details"]["metadata"]["subscription_ref"],
            "acct-1"
        );
        assert_eq!(legacy["paid"], true);
        assert!(legacy.get("parent").is_none());
        assert_eq!(legacy["lines"]["data"][0]["subscription"], "sub_1");
        let basil = invoice().to_json(Shape::Basil, None, "http://x");
        assert!(basil.get("subscription").is_none());
        assert!(basil.get("subscription_details").is_none());
        assert_eq!(
            basil["parent"]["subscription_details"]["subscription"],
            "sub_1"
        );
        assert_eq!(
            basil["parent"]["subscription_details"]["metadata"]["subscription_ref"],
            "acct-1"
        );
        assert_eq!(
            basil["lines"]["data"][0]["parent"]["subscription_item_details"]["subscription_item"],
            "si_1"
        );
        for shape in [legacy, basil] {
            assert_eq!(shape["amount_paid"], 1500);
            assert_eq!(shape["amount_remaining"], 0);
            assert_eq!(shape["status_transitions"]["paid_at"], 6);
            assert_eq!(shape["lines"]["data"][0]["period"]["start"], 5);
        }
    }
}
