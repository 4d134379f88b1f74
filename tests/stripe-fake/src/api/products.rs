//! `/v1/products` and `/v1/prices`: create, retrieve, list. Enough to sell a subscription: a
//! Price is `unit_amount` in `currency`, one-time or `recurring[interval]` every
//! `recurring[interval_count]` intervals, for a Product given by id or made inline
//! (`product_data[name]`).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::calendar::Interval;
use crate::error::{shorten, ApiError};
use crate::form::Params;
use crate::ids::new_id;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::price::{Price, Product, Recurring};
use crate::state::{Ctx, State};

use pgpay_core::checkout::MAX_AMOUNT;

const MAX_NAME_CHARS: usize = 250;

pub fn create_product(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let id = r.bounded_string("id", 255)?;
    let name = r.bounded_string("name", MAX_NAME_CHARS)?;
    let description = r.bounded_string("description", 40_000)?;
    let active = r.boolean("active")?.unwrap_or(true);
    let metadata = r.metadata()?;
    r.ignore(&[
        "expand",
        "images",
        "tax_code",
        "unit_label",
        "url",
        "statement_descriptor",
        "shippable",
        "marketing_features",
        "default_price_data",
    ]);
    r.finish()?;
    let name = name.ok_or_else(|| ApiError::missing_param("name"))?;
    let id = id.unwrap_or_else(|| new_id("prod_"));
    if state.products.get(&id).is_some() {
        return Err(ApiError::invalid_param(
            "id",
            format!("Product already exists: {}", shorten(&id)),
        )
        .with_code("resource_already_exists"));
    }
    let mut meta = BTreeMap::new();
    if let Some(update) = metadata {
        update.apply(&mut meta)?;
    }
    let product = Product {
        id: id.clone(),
        created: ctx.now,
        name,
        description,
        active,
        metadata: meta,
    };
    let json = product.to_json();
    state.products.insert(id, ctx.now, product);
    state.emit(ctx, "product.created", json.clone());
    Ok(json)
}

pub fn retrieve_product(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    state
        .products
        .get(id)
        .map(Product::to_json)
        .ok_or_else(|| ApiError::no_such("product", id, "id"))
}

pub fn list_products(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let active = r.boolean("active")?;
    r.ignore(&["expand", "ids", "shippable", "url"]);
    r.finish()?;
    let found = page(&state.products, &query, "product", |p| {
        active.is_none_or(|a| p.active == a)
    })?;
    let data: Vec<Value> = found.items.iter().map(|p| p.to_json()).collect();
    Ok(list_body(data, found.has_more, "/v1/products"))
}

pub fn create_price(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let currency = r.string("currency")?;
    let unit_amount = r.integer("unit_amount")?;
    let product = r.string("product")?;
    let product_data = r.hash("product_data")?;
    let recurring = r.hash("recurring")?;
    let nickname = r.bounded_string("nickname", 5000)?;
    let lookup_key = r.bounded_string("lookup_key", 200)?;
    let active = r.boolean("active")?.unwrap_or(true);
    let metadata = r.metadata()?;
    r.ignore(&[
        "expand",
        "billing_scheme",
        "tax_behavior",
        "transfer_lookup_key",
    ]);
    r.finish()?;

    let currency = currency.ok_or_else(|| ApiError::missing_param("currency"))?;
    let currency = pgpay_core::checkout::normalize_currency(&currency).map_err(|_| {
        ApiError::invalid_param(
            "currency",
            format!("Invalid currency: {}.", shorten(&currency)),
        )
    })?;
    let unit_amount = match unit_amount {
        None => return Err(ApiError::missing_param("unit_amount")),
        Some(a) if !(0..=MAX_AMOUNT).contains(&a) => {
            return Err(ApiError::invalid_param(
                "unit_amount",
                format!("This value must be between 0 and {MAX_AMOUNT}."),
            ))
        }
        Some(a) => a,
    };
    let recurring = match recurring {
        None => None,
        Some(mut rec) => {
            let interval_path = rec.path("interval");
            let count_path = rec.path("interval_count");
            let interval = rec.string("interval")?;
            let count = rec.integer("interval_count")?.unwrap_or(1);
            let usage = rec.string("usage_type")?;
            rec.ignore(&["trial_period_days", "meter", "aggregate_usage"]);
            rec.finish()?;
            let interval = interval.ok_or_else(|| ApiError::missing_param(&interval_path))?;
            let interval = Interval::parse(&interval).ok_or_else(|| {
                ApiError::invalid_param(
                    &interval_path,
                    format!(
                        "Invalid interval: must be one of day, week, month, or year (got {}).",
                        shorten(&interval)
                    ),
                )
            })?;
            if count < 1 || count > interval.max_count() {
                return Err(ApiError::invalid_param(
                    count_path,
                    "The maximum billing interval is one year (1 year, 12 months, 52 weeks or 365 days).",
                ));
            }
            if usage.is_some_and(|u| u != "licensed") {
                return Err(ApiError::invalid_param(
                    "recurring[usage_type]",
                    "stripe-fake supports licensed (per-seat) prices only.",
                ));
            }
            Some(Recurring {
                interval,
                interval_count: count,
            })
        }
    };
    let product = match (product, product_data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "product",
                "You may only specify one of these parameters: product, product_data.",
            ))
        }
        (None, None) => return Err(ApiError::missing_param("product")),
        (Some(id), None) => {
            if state.products.get(&id).is_none() {
                return Err(ApiError::invalid_param(
                    "product",
                    format!("No such product: '{}'", shorten(&id)),
                )
                .with_code("resource_missing"));
            }
            id
        }
        (None, Some(mut data)) => {
            let name = data
                .bounded_string("name", MAX_NAME_CHARS)?
                .ok_or_else(|| ApiError::missing_param("product_data[name]"))?;
            let meta = data.metadata()?;
            data.ignore(&[
                "active",
                "statement_descriptor",
                "tax_code",
                "unit_label",
                "id",
            ]);
            data.finish()?;
            let mut metadata = BTreeMap::new();
            if let Some(update) = meta {
                update.apply(&mut metadata)?;
            }
            let id = new_id("prod_");
            let product = Product {
                id: id.clone(),
                created: ctx.now,
                name,
                description: None,
                active: true,
                metadata,
            };
            let json = product.to_json();
            state.products.insert(id.clone(), ctx.now, product);
            state.emit(ctx, "product.created", json);
            id
        }
    };
    let mut meta = BTreeMap::new();
    if let Some(update) = metadata {
        update.apply(&mut meta)?;
    }
    let id = new_id("price_");
    let price = Price {
        id: id.clone(),
        created: ctx.now,
        product,
        currency,
        unit_amount,
        recurring,
        nickname,
        lookup_key,
        active,
        metadata: meta,
    };
    let json = price.to_json();
    state.prices.insert(id, ctx.now, price);
    state.emit(ctx, "price.created", json.clone());
    Ok(json)
}

pub fn retrieve_price(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    state
        .prices
        .get(id)
        .map(Price::to_json)
        .ok_or_else(|| ApiError::no_such("price", id, "price"))
}

pub fn list_prices(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let active = r.boolean("active")?;
    let product = r.string("product")?;
    let kind = r.string("type")?;
    let currency = r.string("currency")?;
    let lookup_keys = r.string_list("lookup_keys")?;
    r.ignore(&["expand", "recurring"]);
    r.finish()?;
    let found = page(&state.prices, &query, "price", |p| {
        active.is_none_or(|a| p.active == a)
            && product.as_ref().is_none_or(|x| &p.product == x)
            && currency.as_ref().is_none_or(|c| &p.currency == c)
            && kind
                .as_deref()
                .is_none_or(|k| (k == "recurring") == p.recurring.is_some())
            && (lookup_keys.is_empty()
                || p.lookup_key
                    .as_ref()
                    .is_some_and(|k| lookup_keys.contains(k)))
    })?;
    let data: Vec<Value> = found.items.iter().map(|p| p.to_json()).collect();
    Ok(list_body(data, found.has_more, "/v1/prices"))
}
