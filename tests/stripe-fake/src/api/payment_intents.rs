//! `/v1/payment_intents`: create, retrieve, update, cancel, confirm, list and search, with the
//! test-mode card outcomes of [`crate::card`].

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::card::{self, Outcome};
use crate::charge::{Charge, ChargeStatus};
use crate::collection::{predecessor, Key};
use crate::error::{shorten, ApiError};
use crate::form::Params;
use crate::ids;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::payment_intent::{PaymentIntent, PaymentIntentJson, Status};
use crate::search;
use crate::state::{Ctx, State};

use pgpay_core::checkout::{MAX_AMOUNT, MAX_DESCRIPTION_CHARS};

const CANCELLATION_REASONS: [&str; 4] = [
    "duplicate",
    "fraudulent",
    "requested_by_customer",
    "abandoned",
];
/// Accepted because Stripe accepts them, but not modelled.
const IGNORED_ON_CREATE: &[&str] = &[
    "automatic_payment_methods",
    "confirmation_method",
    "error_on_requires_action",
    "expand",
    "mandate_data",
    "off_session",
    "payment_method_configuration",
    "payment_method_options",
    "payment_method_types",
    "return_url",
    "setup_future_usage",
    "shipping",
    "statement_descriptor",
    "statement_descriptor_suffix",
    "use_stripe_sdk",
];
const IGNORED_ON_CONFIRM: &[&str] = &[
    "client_secret",
    "error_on_requires_action",
    "expand",
    "mandate_data",
    "off_session",
    "payment_method_options",
    "payment_method_types",
    "return_url",
    "setup_future_usage",
    "shipping",
    "use_stripe_sdk",
];
const IGNORED_ON_UPDATE: &[&str] = &[
    "expand",
    "payment_method_options",
    "payment_method_types",
    "setup_future_usage",
    "shipping",
    "statement_descriptor",
    "statement_descriptor_suffix",
];

pub fn create(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let amount = read_amount(&mut r)?.ok_or_else(|| ApiError::missing_param("amount"))?;
    let currency = read_currency(&mut r)?.ok_or_else(|| ApiError::missing_param("currency"))?;
    let description = r.bounded_string("description", MAX_DESCRIPTION_CHARS)?;
    let customer = r.bounded_string("customer", 255)?;
    let receipt_email = r.bounded_string("receipt_email", 800)?;
    let metadata = r.metadata()?;
    let confirm = r.boolean("confirm")?.unwrap_or(false);
    let payment_method = read_payment_method(&mut r)?;
    let capture_method = r.string("capture_method")?;
    r.ignore(IGNORED_ON_CREATE);
    r.finish()?;
    if capture_method.is_some_and(|m| m != "automatic" && m != "automatic_async") {
        return Err(ApiError::invalid_param(
            "capture_method",
            "stripe-fake supports only capture_method=automatic.",
        ));
    }
    if confirm && payment_method.is_none() {
        return Err(missing_payment_method());
    }
    let mut initial = BTreeMap::new();
    if let Some(update) = metadata {
        update.apply(&mut initial)?;
    }

    let id = ids::new_id("pi_");
    let mut pi = PaymentIntent::new(
        id.clone(),
        ids::client_secret(&id),
        amount,
        currency,
        ctx.now,
    );
    pi.metadata = initial;
    pi.description = description;
    pi.customer = customer;
    pi.receipt_email = receipt_email;
    if payment_method.is_some() {
        pi.payment_method = payment_method.clone();
        pi.status = Status::RequiresConfirmation;
    }
    let json = pi.to_json();
    state.payment_intents.insert(pi);
    state.counters.payment_intents_created += 1;
    state.emit(ctx, "payment_intent.created", json.clone());
    if confirm {
        // The PaymentIntent exists now: whatever confirmation answers must be replayed, never
        // re-run, or a retry would create a second PaymentIntent.
        return confirm_with(state, ctx, &id, payment_method).map_err(ApiError::executed);
    }
    Ok(json)
}

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand", "client_secret"]);
    r.finish()?;
    Ok(find(state, id)?.to_json())
}

pub fn update(state: &mut State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let amount = read_amount(&mut r)?;
    let currency = read_currency(&mut r)?;
    let description = r.nullable_string("description", MAX_DESCRIPTION_CHARS)?;
    let receipt_email = r.nullable_string("receipt_email", 800)?;
    let metadata = r.metadata()?;
    let payment_method = read_payment_method(&mut r)?;
    r.ignore(IGNORED_ON_UPDATE);
    r.finish()?;
    let pi = find(state, id)?;
    // As on Stripe: metadata and description may change in any status, money only while open.
    if (amount.is_some() || currency.is_some() || payment_method.is_some()) && !pi.status.is_open()
    {
        return Err(ApiError::unexpected_state(
            "payment_intent_unexpected_state",
            format!(
                "This PaymentIntent's amount, currency or payment_method could not be updated because it has a status of {}. You may only update them on a PaymentIntent with one of the following statuses: requires_payment_method, requires_confirmation, requires_action.",
                pi.status
            ),
        ));
    }
    let mut next_metadata = pi.metadata.clone();
    if let Some(update) = metadata {
        update.apply(&mut next_metadata)?;
    }
    update_pi(state, id, |pi| {
        if let Some(amount) = amount {
            pi.amount = amount;
        }
        if let Some(currency) = currency {
            pi.currency = currency;
        }
        if let Some(description) = description {
            pi.description = description;
        }
        if let Some(receipt_email) = receipt_email {
            pi.receipt_email = receipt_email;
        }
        pi.metadata = next_metadata;
        if let Some(pm) = payment_method {
            pi.payment_method = Some(pm);
            if pi.status == Status::RequiresPaymentMethod {
                pi.status = Status::RequiresConfirmation;
            }
        }
    })
}

pub fn cancel(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let reason = r.string("cancellation_reason")?;
    r.ignore(&["expand"]);
    r.finish()?;
    if let Some(reason) = &reason {
        if !CANCELLATION_REASONS.contains(&reason.as_str()) {
            return Err(ApiError::invalid_param(
                "cancellation_reason",
                format!(
                    "Invalid cancellation_reason: must be one of {}",
                    CANCELLATION_REASONS.join(", ")
                ),
            ));
        }
    }
    let pi = find(state, id)?;
    refuse_if_checkout(pi, "cancel")?;
    let status = pi.status;
    if matches!(status, Status::Succeeded | Status::Canceled) {
        return Err(ApiError::unexpected_state(
            "payment_intent_unexpected_state",
            format!(
                "You cannot cancel this PaymentIntent because it has a status of {status}. Only a PaymentIntent with one of the following statuses may be canceled: requires_payment_method, requires_capture, requires_confirmation, requires_action, processing."
            ),
        ));
    }
    let json = update_pi(state, id, |pi| {
        pi.status = Status::Canceled;
        pi.canceled_at = Some(ctx.now);
        pi.cancellation_reason = reason;
        pi.next_action = None;
    })?;
    state.emit(ctx, "payment_intent.canceled", json.clone());
    Ok(json)
}

pub fn confirm(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let payment_method = r.string("payment_method")?;
    r.ignore(IGNORED_ON_CONFIRM);
    r.finish()?;
    confirm_with(state, ctx, id, payment_method)
}

/// Confirms as a customer would: `pm_card_visa` succeeds, `pm_card_chargeDeclined` is a 402 that
/// leaves the PaymentIntent in `requires_payment_method`, `pm_card_authenticationRequired` asks
/// for 3-D Secure. A Checkout Session's PaymentIntent is confirmed by its session only.
pub fn confirm_with(
    state: &mut State,
    ctx: &Ctx,
    id: &str,
    payment_method: Option<String>,
) -> Result<Value, ApiError> {
    refuse_if_checkout(find(state, id)?, "confirm")?;
    attempt_payment(state, ctx, id, payment_method)
}

/// Stripe: "You can't confirm or cancel the PaymentIntent for a Checkout Session. To cancel,
/// expire the Checkout Session instead."
fn refuse_if_checkout(pi: &PaymentIntent, verb: &str) -> Result<(), ApiError> {
    match &pi.checkout_session {
        Some(session) => Err(ApiError::unexpected_state(
            "payment_intent_unexpected_state",
            format!(
                "You cannot {verb} this PaymentIntent because it belongs to the Checkout Session {session}. To cancel, expire the Checkout Session instead."
            ),
        )),
        None => Ok(()),
    }
}

/// The payment attempt itself, with the card outcomes of [`crate::card`]; the Checkout flow calls
/// it for its own PaymentIntents.
pub fn attempt_payment(
    state: &mut State,
    ctx: &Ctx,
    id: &str,
    payment_method: Option<String>,
) -> Result<Value, ApiError> {
    let pi = find(state, id)?;
    if !pi.status.is_open() {
        return Err(ApiError::unexpected_state(
            "payment_intent_unexpected_state",
            format!(
                "You cannot confirm this PaymentIntent because it has a status of {}. Only a PaymentIntent with one of the following statuses may be confirmed: requires_payment_method, requires_confirmation, requires_action.",
                pi.status
            ),
        ));
    }
    let pm = payment_method
        .or_else(|| pi.payment_method.clone())
        .ok_or_else(missing_payment_method)?;
    match card::outcome(&pm).ok_or_else(|| no_such_payment_method(&pm))? {
        Outcome::Succeed => succeed(state, ctx, id, pm),
        Outcome::Decline {
            code,
            decline_code,
            message,
        } => {
            let (amount, currency) = (pi.amount, pi.currency.clone());
            let charge = Charge {
                id: ids::new_id("ch_"),
                amount,
                amount_refunded: 0,
                currency,
                created: ctx.now,
                payment_intent: id.to_owned(),
                payment_method: pm.clone(),
                status: ChargeStatus::Failed,
                failure_code: Some(code),
                failure_message: Some(message),
            };
            let error = json!({
                "type": "card_error",
                "code": code,
                "decline_code": decline_code,
                "message": message,
                "charge": charge.id,
                "doc_url": format!("https://stripe.com/docs/error-codes/{}", code.replace('_', "-")),
                "payment_method": { "id": pm, "object": "payment_method", "type": "card" },
            });
            let charge_id = charge.id.clone();
            let charge_json = charge.to_json();
            state.charges.insert(charge_id.clone(), charge);
            let json = update_pi(state, id, |pi| {
                pi.status = Status::RequiresPaymentMethod;
                pi.payment_method = None;
                pi.latest_charge = Some(charge_id);
                pi.last_payment_error = Some(error);
                pi.next_action = None;
            })?;
            state.emit(ctx, "charge.failed", charge_json);
            state.emit(ctx, "payment_intent.payment_failed", json.clone());
            Err(ApiError::card_declined(code, decline_code, message, json))
        }
        Outcome::RequireAction => {
            let json = update_pi(state, id, |pi| {
                pi.status = Status::RequiresAction;
                pi.payment_method = Some(pm);
                pi.next_action = Some(json!({
                    "type": "use_stripe_sdk",
                    "use_stripe_sdk": { "type": "three_d_secure_redirect", "stripe_js": "https://hooks.stripe.com/redirect/authenticate/src_fake" },
                }));
            })?;
            state.emit(ctx, "payment_intent.requires_action", json.clone());
            Ok(json)
        }
    }
}

/// The customer finishes (or fails) 3-D Secure on a PaymentIntent in `requires_action`.
pub fn authenticate(
    state: &mut State,
    ctx: &Ctx,
    id: &str,
    succeeded: bool,
) -> Result<Value, ApiError> {
    let pi = find(state, id)?;
    if pi.status != Status::RequiresAction {
        return Err(ApiError::unexpected_state(
            "payment_intent_unexpected_state",
            format!(
                "This PaymentIntent has a status of {}, not requires_action.",
                pi.status
            ),
        ));
    }
    let pm = pi
        .payment_method
        .clone()
        .unwrap_or_else(|| "pm_card_visa".into());
    if succeeded {
        return succeed(state, ctx, id, pm);
    }
    let json = update_pi(state, id, |pi| {
        pi.status = Status::RequiresPaymentMethod;
        pi.payment_method = None;
        pi.next_action = None;
        pi.last_payment_error = Some(json!({
            "type": "invalid_request_error",
            "code": "payment_intent_authentication_failure",
            "message": "The provided PaymentMethod has failed authentication. You can provide payment_method_data or a new PaymentMethod to attempt to fulfill this PaymentIntent again.",
            "payment_method": { "id": pm, "object": "payment_method", "type": "card" },
        }));
    })?;
    state.emit(ctx, "payment_intent.payment_failed", json.clone());
    Ok(json)
}

fn succeed(state: &mut State, ctx: &Ctx, id: &str, pm: String) -> Result<Value, ApiError> {
    let pi = find(state, id)?;
    let charge = Charge {
        id: ids::new_id("ch_"),
        amount: pi.amount,
        amount_refunded: 0,
        currency: pi.currency.clone(),
        created: ctx.now,
        payment_intent: id.to_owned(),
        payment_method: pm.clone(),
        status: ChargeStatus::Succeeded,
        failure_code: None,
        failure_message: None,
    };
    let charge_id = charge.id.clone();
    let charge_json = charge.to_json();
    state.charges.insert(charge_id.clone(), charge);
    let json = update_pi(state, id, |pi| {
        pi.status = Status::Succeeded;
        pi.amount_received = pi.amount;
        pi.payment_method = Some(pm);
        pi.latest_charge = Some(charge_id);
        pi.last_payment_error = None;
        pi.next_action = None;
    })?;
    state.emit(ctx, "charge.succeeded", charge_json);
    state.emit(ctx, "payment_intent.succeeded", json.clone());
    Ok(json)
}

pub fn list(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let customer = r.string("customer")?;
    r.ignore(&["expand"]);
    r.finish()?;
    let found = page(&state.payment_intents.all, &query, "payment_intent", |pi| {
        customer.is_none() || pi.customer == customer
    })?;
    let data: Vec<_> = found.items.iter().map(|pi| pi.view()).collect();
    Ok(list_body(data, found.has_more, "/v1/payment_intents"))
}

pub fn search(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let text = r.required_string("query")?;
    let limit = r.limit()?;
    let page_token = r.string("page")?;
    r.ignore(&["expand"]);
    r.finish()?;
    let query =
        search::parse(&text).map_err(|e| ApiError::invalid_param("query", e.to_string()))?;
    // Results come newest first; a page token is the key of the last result already shown.
    let below = match page_token {
        Some(token) => predecessor(decode_page(&token)?),
        None => Some((i64::MAX, u64::MAX)),
    };
    let Some(below) = below else {
        return Ok(search_body(Vec::new(), None));
    };
    let all = &state.payment_intents.all;
    let candidates: Box<dyn Iterator<Item = Key> + '_> = match query.required_metadata() {
        Some((key, value)) => Box::new(
            state
                .payment_intents
                .with_metadata(key, value)
                .into_iter()
                .flat_map(move |keys| keys.range(..=below).rev().copied()),
        ),
        None => Box::new(all.range((i64::MIN, 0), below).rev().map(|(key, _)| *key)),
    };
    let mut hits: Vec<(Key, &PaymentIntent)> = candidates
        .filter_map(|key| all.get_by_key(&key).map(|pi| (key, pi)))
        .filter(|(_, pi)| query.matches(pi))
        .take(limit + 1)
        .collect();
    let has_more = hits.len() > limit;
    hits.truncate(limit);
    let next_page = if has_more {
        hits.last().map(|(key, _)| encode_page(*key))
    } else {
        None
    };
    Ok(search_body(
        hits.iter().map(|(_, pi)| pi.view()).collect(),
        next_page,
    ))
}

#[derive(Serialize)]
struct SearchBody<'a> {
    object: &'static str,
    data: Vec<PaymentIntentJson<'a>>,
    has_more: bool,
    next_page: Option<String>,
    url: &'static str,
}

fn search_body(data: Vec<PaymentIntentJson<'_>>, next_page: Option<String>) -> Body {
    Body::serialize(&SearchBody {
        object: "search_result",
        data,
        has_more: next_page.is_some(),
        next_page,
        url: "/v1/payment_intents/search",
    })
}

fn encode_page((created, seq): Key) -> String {
    format!("page_{created}_{seq}")
}

fn decode_page(token: &str) -> Result<Key, ApiError> {
    let invalid = || ApiError::invalid_param("page", format!("Invalid page: {}", shorten(token)));
    let (created, seq) = token
        .strip_prefix("page_")
        .and_then(|rest| rest.rsplit_once('_'))
        .ok_or_else(invalid)?;
    Ok((
        created.parse().map_err(|_| invalid())?,
        seq.parse().map_err(|_| invalid())?,
    ))
}

pub fn find<'a>(state: &'a State, id: &str) -> Result<&'a PaymentIntent, ApiError> {
    state
        .payment_intents
        .get(id)
        .ok_or_else(|| ApiError::no_such("payment_intent", id, "intent"))
}

/// Applies `change` and returns the PaymentIntent's JSON afterwards.
pub fn update_pi(
    state: &mut State,
    id: &str,
    change: impl FnOnce(&mut PaymentIntent),
) -> Result<Value, ApiError> {
    state
        .payment_intents
        .update(id, |pi| {
            change(pi);
            pi.to_json()
        })
        .ok_or_else(|| ApiError::no_such("payment_intent", id, "intent"))
}

fn read_amount(r: &mut Reader) -> Result<Option<i64>, ApiError> {
    match r.integer("amount")? {
        Some(amount) if amount < 1 => Err(ApiError::invalid_param(
            "amount",
            "This value must be greater than or equal to 1.",
        )
        .with_code("parameter_invalid_integer")),
        Some(amount) if amount > MAX_AMOUNT => Err(ApiError::invalid_param(
            "amount",
            format!("Amount must be no more than {MAX_AMOUNT} in the currency's smallest unit."),
        )
        .with_code("amount_too_large")),
        other => Ok(other),
    }
}

fn read_currency(r: &mut Reader) -> Result<Option<String>, ApiError> {
    r.string("currency")?
        .map(|currency| {
            pgpay_core::checkout::normalize_currency(&currency).map_err(|_| {
                ApiError::invalid_param(
                    "currency",
                    format!(
                        "Invalid currency: {}. Stripe currently supports three-letter ISO currency codes in lowercase, such as usd.",
                        shorten(&currency)
                    ),
                )
            })
        })
        .transpose()
}

fn read_payment_method(r: &mut Reader) -> Result<Option<String>, ApiError> {
    let pm = r.string("payment_method")?;
    match &pm {
        Some(pm) if card::outcome(pm).is_none() => Err(no_such_payment_method(pm)),
        _ => Ok(pm),
    }
}

fn no_such_payment_method(pm: &str) -> ApiError {
    ApiError::invalid_param(
        "payment_method",
        format!("No such PaymentMethod: '{}'", shorten(pm)),
    )
    .with_code("resource_missing")
}

fn missing_payment_method() -> ApiError {
    ApiError::invalid_param(
        "payment_method",
        "You cannot confirm this PaymentIntent because it's missing a payment method. You can either update the PaymentIntent with a payment method and then confirm it again, or confirm it again directly with a payment method.",
    )
    .with_code("payment_intent_unexpected_state")
}
