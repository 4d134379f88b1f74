//! `/v1/checkout/sessions`: create (payment mode), retrieve, list and expire. Stripe has no search
//! endpoint for Checkout Sessions; list by `created` (and `payment_intent`) is how a worker finds
//! one it lost the answer to.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::checkout_flow::{self, delayed_method_for};
use crate::checkout_session::{
    Mode, PaymentIntentData, PaymentStatus, Session, SessionStatus, SubscriptionLine,
    DEFAULT_LIFETIME_SECS, MIN_LIFETIME_SECS,
};
use crate::error::{shorten, ApiError};
use crate::form::Params;
use crate::ids;
use crate::line_items;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::state::{Ctx, State};

use pgpay_core::checkout::{validate_redirect_url, MAX_DESCRIPTION_CHARS, MAX_URL_CHARS};

/// Stripe's limit on `client_reference_id`.
const MAX_CLIENT_REFERENCE_CHARS: usize = 200;
const PAYMENT_METHOD_TYPES: [&str; 3] = ["card", "sepa_debit", "us_bank_account"];
/// Accepted because Stripe accepts them, but not modelled.
const IGNORED_ON_CREATE: &[&str] = &[
    "allow_promotion_codes",
    "automatic_tax",
    "billing_address_collection",
    "consent_collection",
    "custom_text",
    "customer_creation",
    "customer_update",
    "expand",
    "locale",
    "payment_method_options",
    "phone_number_collection",
    "submit_type",
];
const IGNORED_IN_PAYMENT_INTENT_DATA: &[&str] = &[
    "setup_future_usage",
    "shipping",
    "statement_descriptor",
    "statement_descriptor_suffix",
];

pub fn create(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let mode = read_mode(&mut r)?;
    let success_url = read_url(&mut r, "success_url")?;
    let cancel_url = read_url(&mut r, "cancel_url")?;
    let client_reference_id =
        r.bounded_string("client_reference_id", MAX_CLIENT_REFERENCE_CHARS)?;
    let customer = r.bounded_string("customer", 255)?;
    let customer_email = r.bounded_string("customer_email", 800)?;
    let metadata = r.metadata()?;
    let payment_intent_data_given = r.has("payment_intent_data");
    let payment_intent_data = read_payment_intent_data(&mut r)?;
    let subscription_data = r.hash("subscription_data")?;
    let expires_at = r.integer("expires_at")?;
    let payment_method_types = read_payment_method_types(&mut r)?;
    let ui_mode = r.string("ui_mode")?;
    let (line_items, currency, amount_total, subscription_line) = match mode {
        Mode::Payment => {
            let (items, currency, total) = line_items::read(&mut r)?;
            (items, currency, total, None)
        }
        Mode::Subscription => {
            let (item, line) = read_subscription_line(state, &mut r)?;
            let (currency, total) = (item.currency.clone(), item.amount().unwrap_or(0));
            (vec![item], currency, total, Some(line))
        }
    };
    let subscription_data_metadata = match (mode, subscription_data) {
        (_, None) => BTreeMap::new(),
        (Mode::Payment, Some(_)) => {
            return Err(ApiError::invalid_param(
                "subscription_data",
                "You can not pass `subscription_data` in `payment` mode.",
            ))
        }
        (Mode::Subscription, Some(mut data)) => {
            let metadata = data.metadata()?;
            data.ignore(&["description", "billing_cycle_anchor", "proration_behavior"]);
            data.finish()?;
            let mut out = BTreeMap::new();
            if let Some(update) = metadata {
                update.apply(&mut out)?;
            }
            out
        }
    };
    r.ignore(IGNORED_ON_CREATE);
    r.finish()?;
    if mode == Mode::Subscription && payment_intent_data_given {
        return Err(ApiError::invalid_param(
            "payment_intent_data",
            "You can not pass `payment_intent_data` in `subscription` mode.",
        ));
    }
    if mode == Mode::Subscription {
        if let Some(cus) = &customer {
            if state.customers.get(cus).is_none() {
                return Err(ApiError::no_such("customer", cus, "customer"));
            }
        }
    }

    if ui_mode.is_some_and(|m| m != "hosted") {
        return Err(ApiError::invalid_param(
            "ui_mode",
            "stripe-fake supports only hosted Checkout (ui_mode=hosted).",
        ));
    }
    let success_url = success_url.ok_or_else(|| ApiError::missing_param("success_url"))?;
    if customer.is_some() && customer_email.is_some() {
        return Err(ApiError::invalid_param(
            "customer_email",
            "You may only specify one of these parameters: customer, customer_email.",
        ));
    }
    let expires_at = match expires_at {
        None => ctx.now + DEFAULT_LIFETIME_SECS,
        Some(at) if at < ctx.now + MIN_LIFETIME_SECS => {
            return Err(ApiError::invalid_param(
                "expires_at",
                "The `expires_at` timestamp must be at least 30 minutes from Checkout Session creation.",
            ))
        }
        Some(at) if at > ctx.now + DEFAULT_LIFETIME_SECS => {
            return Err(ApiError::invalid_param(
                "expires_at",
                "The `expires_at` timestamp must be less than 24 hours from Checkout Session creation.",
            ))
        }
        Some(at) => at,
    };
    let payment_method_types = match payment_method_types {
        Some(types) => {
            for t in &types {
                if *t != "card" && delayed_method_for(&currency) != Some(t) {
                    return Err(ApiError::invalid_param(
                        "payment_method_types",
                        format!("The payment method type {t} is not available for {currency}."),
                    ));
                }
            }
            types
        }
        // Renewals charge the saved card: the fake's subscriptions take cards only.
        None if mode == Mode::Subscription => vec!["card"],
        // Dynamic payment methods: what the (fake) account has turned on for this currency.
        None => std::iter::once("card")
            .chain(delayed_method_for(&currency))
            .collect(),
    };
    let mut session_metadata = BTreeMap::new();
    if let Some(update) = metadata {
        update.apply(&mut session_metadata)?;
    }

    let id = ids::new_id("cs_test_");
    let url = format!("{}/c/pay/{id}", state.base_url);
    let session = Session {
        id,
        created: ctx.now,
        expires_at,
        mode,
        status: SessionStatus::Open,
        payment_status: PaymentStatus::Unpaid,
        currency,
        amount_total,
        line_items,
        payment_method_types,
        success_url,
        cancel_url,
        client_reference_id,
        customer,
        customer_email,
        paid_by_email: None,
        metadata: session_metadata,
        payment_intent_data,
        payment_intent: None,
        url,
        subscription_line,
        subscription_data_metadata,
        subscription: None,
        invoice: None,
    };
    let json = session.to_json();
    state.checkout_sessions.insert(session);
    state.counters.checkout_sessions_created += 1;
    // Stripe sends no event when a session is created.
    Ok(json)
}

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    Ok(checkout_flow::find(state, id)?.to_json())
}

pub fn expire(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    checkout_flow::expire(state, ctx, id)
}

pub fn list(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let payment_intent = r.string("payment_intent")?;
    let customer = r.string("customer")?;
    let subscription = r.string("subscription")?;
    let status = match r.string("status")? {
        None => None,
        Some(text) => Some(SessionStatus::parse(&text).ok_or_else(|| {
            ApiError::invalid_param(
                "status",
                format!(
                    "Invalid status: must be one of open, complete, or expired (got {}).",
                    shorten(&text)
                ),
            )
        })?),
    };
    r.ignore(&["expand"]);
    r.finish()?;
    let found = page(
        &state.checkout_sessions.all,
        &query,
        "checkout.session",
        |s| {
            payment_intent
                .as_ref()
                .is_none_or(|pi| s.payment_intent.as_ref() == Some(pi))
                && customer
                    .as_ref()
                    .is_none_or(|c| s.customer.as_ref() == Some(c))
                && subscription
                    .as_ref()
                    .is_none_or(|x| s.subscription.as_ref() == Some(x))
                && status.is_none_or(|st| s.status == st)
        },
    )?;
    let data: Vec<Value> = found.items.iter().map(|s| s.to_json()).collect();
    Ok(list_body(data, found.has_more, "/v1/checkout/sessions"))
}

fn read_mode(r: &mut Reader) -> Result<Mode, ApiError> {
    match r.required_string("mode")?.as_str() {
        "payment" => Ok(Mode::Payment),
        "subscription" => Ok(Mode::Subscription),
        "setup" => Err(ApiError::invalid_param(
            "mode",
            "stripe-fake supports mode=payment and mode=subscription, not setup.",
        )),
        other => Err(ApiError::invalid_param(
            "mode",
            format!(
                "Invalid mode: must be one of payment, setup, or subscription (got {}).",
                shorten(other)
            ),
        )),
    }
}

/// `success_url` and `cancel_url`: Stripe's rule, which pgpay checks in `pay.begin_checkout` too
/// (`pgpay_core::checkout::validate_redirect_url`, the one implementation).
fn read_url(r: &mut Reader, name: &'static str) -> Result<Option<String>, ApiError> {
    let url = r.bounded_string(name, MAX_URL_CHARS)?;
    if let Some(url) = &url {
        if validate_redirect_url(name, url).is_err() {
            return Err(ApiError::invalid_param(name, "Not a valid URL").with_code("url_invalid"));
        }
    }
    Ok(url)
}

fn read_payment_intent_data(r: &mut Reader) -> Result<PaymentIntentData, ApiError> {
    let Some(mut data) = r.hash("payment_intent_data")? else {
        return Ok(PaymentIntentData::default());
    };
    let metadata = data.metadata()?;
    let description = data.bounded_string("description", MAX_DESCRIPTION_CHARS)?;
    let receipt_email = data.bounded_string("receipt_email", 800)?;
    let capture_path = data.path("capture_method");
    let capture_method = data.string("capture_method")?;
    data.ignore(IGNORED_IN_PAYMENT_INTENT_DATA);
    data.finish()?;
    if capture_method.is_some_and(|m| m != "automatic" && m != "automatic_async") {
        return Err(ApiError::invalid_param(
            capture_path,
            "stripe-fake supports only capture_method=automatic.",
        ));
    }
    let mut out = PaymentIntentData {
        description,
        receipt_email,
        ..PaymentIntentData::default()
    };
    if let Some(update) = metadata {
        update.apply(&mut out.metadata)?;
    }
    Ok(out)
}

fn read_payment_method_types(r: &mut Reader) -> Result<Option<Vec<&'static str>>, ApiError> {
    let given = r.string_list("payment_method_types")?;
    if given.is_empty() {
        return Ok(None);
    }
    given
        .iter()
        .map(|t| {
            PAYMENT_METHOD_TYPES
                .into_iter()
                .find(|known| known == t)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "payment_method_types",
                        format!(
                            "Invalid payment_method_types: stripe-fake knows {} (got {}).",
                            PAYMENT_METHOD_TYPES.join(", "),
                            shorten(t)
                        ),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Subscription mode's `line_items`: exactly one, naming an existing recurring Price by `price`
/// (`price_data` is not modelled), with a quantity of at least 1.
fn read_subscription_line(
    state: &State,
    r: &mut Reader,
) -> Result<(line_items::LineItem, SubscriptionLine), ApiError> {
    let mut readers = r.hash_list("line_items")?;
    if readers.is_empty() {
        return Err(ApiError::missing_param("line_items"));
    }
    if readers.len() > 1 {
        return Err(ApiError::invalid_param(
            "line_items",
            "stripe-fake's subscriptions have one item: pass exactly one line item in subscription mode.",
        ));
    }
    let mut item = readers.remove(0);
    let price_path = item.path("price");
    let quantity_path = item.path("quantity");
    let price_id = item.string("price")?;
    let quantity = item.integer("quantity")?.unwrap_or(1);
    if item.has("price_data") {
        return Err(ApiError::invalid_param(
            item.path("price_data"),
            "stripe-fake's subscription mode takes line_items[0][price] (create the Price first), not price_data.",
        ));
    }
    item.ignore(&["adjustable_quantity", "tax_rates", "dynamic_tax_rates"]);
    item.finish()?;
    let price_id = price_id.ok_or_else(|| ApiError::missing_param(&price_path))?;
    if !(1..=9999).contains(&quantity) {
        return Err(ApiError::invalid_param(
            quantity_path,
            "Quantity must be between 1 and 9999.",
        ));
    }
    let price = state.prices.get(&price_id).ok_or_else(|| {
        ApiError::invalid_param(
            &price_path,
            format!("No such price: '{}'", shorten(&price_id)),
        )
        .with_code("resource_missing")
    })?;
    if price.recurring.is_none() {
        return Err(ApiError::invalid_param(
            price_path,
            "You must provide at least one recurring price in `subscription` mode when using prices.",
        ));
    }
    let product_name = state
        .products
        .get(&price.product)
        .map_or_else(|| price.product.clone(), |p| p.name.clone());
    let line = line_items::LineItem {
        name: product_name,
        description: None,
        currency: price.currency.clone(),
        unit_amount: price.unit_amount,
        quantity,
    };
    Ok((
        line,
        SubscriptionLine {
            price: price_id,
            quantity,
        },
    ))
}
