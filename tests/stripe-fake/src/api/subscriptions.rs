//! `/v1/subscriptions`: retrieve, list, update (the item's price and quantity, and
//! `cancel_at_period_end`) and cancel (`DELETE`). Subscriptions are created by subscription-mode
//! Checkout Sessions ([`crate::billing`]); answers render in the request's API version.

use serde_json::Value;

use crate::billing::{self, subscription_json};
use crate::error::{shorten, ApiError};
use crate::form::Params;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::state::{Ctx, State};
use crate::subscription::SubStatus;

pub fn retrieve(state: &State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    subscription_json(state, id, state.answer_shape(ctx))
        .ok_or_else(|| ApiError::no_such("subscription", id, "id"))
}

/// Which statuses a list asks for: one, `all`, `ended` (canceled and incomplete_expired), or by
/// default everything not canceled.
fn status_filter(text: Option<String>) -> Result<Box<dyn Fn(SubStatus) -> bool>, ApiError> {
    Ok(match text.as_deref() {
        None => Box::new(|s| s != SubStatus::Canceled),
        Some("all") => Box::new(|_| true),
        Some("ended") => Box::new(SubStatus::is_terminal),
        Some(other) => {
            let wanted = SubStatus::parse(other).ok_or_else(|| {
                ApiError::invalid_param(
                    "status",
                    format!(
                        "Invalid status: must be one of active, all, canceled, ended, incomplete, incomplete_expired, past_due, paused, trialing, or unpaid (got {}).",
                        shorten(other)
                    ),
                )
            })?;
            Box::new(move |s| s == wanted)
        }
    })
}

pub fn list(state: &State, ctx: &Ctx, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let customer = r.string("customer")?;
    let price = r.string("price")?;
    let test_clock = r.string("test_clock")?;
    let status = status_filter(r.string("status")?)?;
    r.ignore(&["expand", "collection_method", "automatic_tax"]);
    r.finish()?;
    let shape = state.answer_shape(ctx);
    let found = page(&state.subscriptions, &query, "subscription", |s| {
        status(s.status)
            && customer.as_ref().is_none_or(|c| &s.customer == c)
            && price.as_ref().is_none_or(|p| &s.item.price == p)
            // Stripe: without `test_clock` or `customer`, subscriptions on test clocks are left out.
            && match (&test_clock, &customer) {
                (Some(clock), _) => s.test_clock.as_ref() == Some(clock),
                (None, Some(_)) => true,
                (None, None) => s.test_clock.is_none(),
            }
    })?;
    let data: Vec<Value> = found
        .items
        .iter()
        .map(|s| s.to_json(shape, state.prices.get(&s.item.price)))
        .collect();
    Ok(list_body(data, found.has_more, "/v1/subscriptions"))
}

pub fn update(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let items = r.hash_list("items")?;
    let cancel_at_period_end = r.boolean("cancel_at_period_end")?;
    let metadata = r.metadata()?;
    let proration = r.string("proration_behavior")?;
    r.ignore(&[
        "expand",
        "payment_behavior",
        "proration_date",
        "description",
    ]);
    r.finish()?;
    if proration
        .as_deref()
        .is_some_and(|p| p != "create_prorations" && p != "none")
    {
        return Err(ApiError::invalid_param(
            "proration_behavior",
            "stripe-fake supports proration_behavior create_prorations (the default) and none; prorations are not charged.",
        ));
    }
    if items.len() > 1 {
        return Err(ApiError::invalid_param(
            "items",
            "stripe-fake's subscriptions have one item: update items[0] only.",
        ));
    }
    let mut change = None;
    for mut item in items {
        let item_id = item.string("id")?;
        let price = item.string("price")?;
        let quantity_path = item.path("quantity");
        let quantity = item.integer("quantity")?;
        item.ignore(&["metadata", "tax_rates", "billing_thresholds", "discounts"]);
        item.finish()?;
        change = Some((item_id, price, quantity, quantity_path));
    }

    let sub = state
        .subscriptions
        .get(id)
        .ok_or_else(|| ApiError::no_such("subscription", id, "id"))?;
    if sub.status.is_terminal() && (change.is_some() || cancel_at_period_end.is_some()) {
        return Err(ApiError::invalid_request(
            "A canceled subscription can only update its cancellation_details and metadata.",
        )
        .executed());
    }
    let mut new_price = None;
    let mut new_quantity = None;
    if let Some((item_id, price, quantity, quantity_path)) = change {
        match item_id {
            Some(item_id) if item_id == sub.item.id => {}
            Some(item_id) => {
                return Err(ApiError::invalid_param(
                    "items[0][id]",
                    format!("No such subscription item: '{}'", shorten(&item_id)),
                )
                .with_code("resource_missing"))
            }
            None => {
                return Err(ApiError::invalid_param(
                    "items[0][id]",
                    "stripe-fake's subscriptions have one item: name it with items[0][id] to change it.",
                ))
            }
        }
        if let Some(q) = quantity {
            if !(1..=9999).contains(&q) {
                return Err(ApiError::invalid_param(
                    quantity_path,
                    "Quantity must be between 1 and 9999.",
                ));
            }
            new_quantity = Some(q);
        }
        if let Some(price_id) = price {
            let price = state.prices.get(&price_id).ok_or_else(|| {
                ApiError::invalid_param(
                    "items[0][price]",
                    format!("No such price: '{}'", shorten(&price_id)),
                )
                .with_code("resource_missing")
            })?;
            let current = state.prices.get(&sub.item.price);
            if price.currency != sub.currency {
                return Err(ApiError::invalid_param(
                    "items[0][price]",
                    format!(
                        "The price's currency ({}) must match the subscription's ({}).",
                        price.currency, sub.currency
                    ),
                ));
            }
            if price.recurring.is_none() || current.and_then(|c| c.recurring) != price.recurring {
                return Err(ApiError::invalid_param(
                    "items[0][price]",
                    "stripe-fake changes prices within one billing interval only (same recurring interval and interval_count).",
                ));
            }
            new_price = Some(price_id);
        }
    }

    let shape = state.event_shape();
    let before = subscription_json(state, id, shape).unwrap_or(Value::Null);
    let at = billing::time_on(state, sub.test_clock.as_deref(), ctx.now);
    let sub = state
        .subscriptions
        .get_mut(id)
        .ok_or_else(|| ApiError::no_such("subscription", id, "id"))?;
    if let Some(update) = metadata {
        update.apply(&mut sub.metadata)?;
    }
    if let Some(price) = new_price {
        sub.item.price = price;
    }
    if let Some(quantity) = new_quantity {
        sub.item.quantity = quantity;
    }
    if let Some(flag) = cancel_at_period_end {
        if flag != sub.cancel_at_period_end {
            sub.cancel_at_period_end = flag;
            // Stripe: canceled_at is the time of the request that asked for the cancellation.
            sub.canceled_at = flag.then_some(at);
            sub.cancellation_reason = flag.then_some("cancellation_requested");
        }
    }
    let after = subscription_json(state, id, shape).unwrap_or(Value::Null);
    if after != before {
        let previous = crate::api::customers::previous_attributes(&before, &after);
        billing::emit_subscription(
            state,
            ctx,
            "customer.subscription.updated",
            id,
            Some(previous),
        );
    }
    subscription_json(state, id, state.answer_shape(ctx))
        .ok_or_else(|| ApiError::no_such("subscription", id, "id"))
}

/// `DELETE /v1/subscriptions/:id`: cancels now. A second DELETE answers the canceled subscription
/// again and changes nothing (Stripe: DELETE is idempotent by definition).
pub fn cancel(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let details = r.hash("cancellation_details")?;
    r.ignore(&["expand", "invoice_now", "prorate"]);
    r.finish()?;
    if let Some(mut details) = details {
        details.ignore(&["comment", "feedback"]);
        details.finish()?;
    }
    let sub = state
        .subscriptions
        .get(id)
        .ok_or_else(|| ApiError::no_such("subscription", id, "id"))?;
    let at = billing::time_on(state, sub.test_clock.as_deref(), ctx.now);
    billing::cancel_now(state, ctx, id, at, false);
    subscription_json(state, id, state.answer_shape(ctx))
        .ok_or_else(|| ApiError::no_such("subscription", id, "id"))
}
