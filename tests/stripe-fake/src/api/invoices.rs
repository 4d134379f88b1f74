//! `/v1/invoices`: retrieve and list (by `customer`, `subscription`, `status`, `created`), in the
//! request's API version.

use serde_json::Value;

use crate::billing::invoice_json;
use crate::error::{shorten, ApiError};
use crate::form::Params;
use crate::invoice::InvoiceStatus;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::state::{Ctx, State};

pub fn retrieve(state: &State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    invoice_json(state, id, state.answer_shape(ctx))
        .ok_or_else(|| ApiError::no_such("invoice", id, "id"))
}

pub fn list(state: &State, ctx: &Ctx, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let customer = r.string("customer")?;
    let subscription = r.string("subscription")?;
    let status = match r.string("status")? {
        None => None,
        Some(text) => Some(InvoiceStatus::parse(&text).ok_or_else(|| {
            ApiError::invalid_param(
                "status",
                format!(
                    "Invalid status: must be one of draft, open, paid, uncollectible, or void (got {}).",
                    shorten(&text)
                ),
            )
        })?),
    };
    let collection_method = r.string("collection_method")?;
    r.ignore(&["expand"]);
    r.finish()?;
    let shape = state.answer_shape(ctx);
    let found = page(&state.invoices, &query, "invoice", |i| {
        customer.as_ref().is_none_or(|c| &i.customer == c)
            && subscription.as_ref().is_none_or(|s| &i.subscription == s)
            && status.is_none_or(|st| i.status == st)
            && collection_method
                .as_deref()
                .is_none_or(|m| m == "charge_automatically")
    })?;
    let data: Vec<Value> = found
        .items
        .iter()
        .map(|i| i.to_json(shape, state.prices.get(&i.price), &state.base_url))
        .collect();
    Ok(list_body(data, found.has_more, "/v1/invoices"))
}
