//! `/v1/refunds`: refund a succeeded PaymentIntent's charge, in full or in part.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::ApiError;
use crate::form::Params;
use crate::ids;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::payment_intent::Status;
use crate::refund::Refund;
use crate::state::{Ctx, State};

const REASONS: [&str; 3] = ["duplicate", "fraudulent", "requested_by_customer"];

pub fn create(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let payment_intent = r.string("payment_intent")?;
    let charge = r.string("charge")?;
    let amount = r.integer("amount")?;
    let reason = r.string("reason")?;
    let metadata = r.metadata()?;
    r.ignore(&[
        "expand",
        "instructions_email",
        "refund_application_fee",
        "reverse_transfer",
    ]);
    r.finish()?;
    if amount.is_some_and(|a| a < 1) {
        return Err(ApiError::invalid_param(
            "amount",
            "This value must be greater than or equal to 1.",
        ));
    }
    if let Some(reason) = &reason {
        if !REASONS.contains(&reason.as_str()) {
            return Err(ApiError::invalid_param(
                "reason",
                format!("Invalid reason: must be one of {}", REASONS.join(", ")),
            ));
        }
    }
    let mut refund_metadata = BTreeMap::new();
    if let Some(update) = metadata {
        update.apply(&mut refund_metadata)?;
    }
    let charge_id = match (payment_intent, charge) {
        (Some(pi_id), None) => {
            let pi = state
                .payment_intents
                .get(&pi_id)
                .ok_or_else(|| ApiError::no_such("payment_intent", &pi_id, "payment_intent"))?;
            match (&pi.latest_charge, pi.status) {
                (Some(charge), Status::Succeeded) => charge.clone(),
                _ => {
                    return Err(ApiError::unexpected_state(
                        "charge_not_refundable",
                        format!(
                            "This PaymentIntent ({pi_id}) does not have a successful charge to refund."
                        ),
                    )
                    .with_param("payment_intent"))
                }
            }
        }
        (None, Some(charge)) => charge,
        (None, None) => {
            return Err(ApiError::invalid_param(
                "payment_intent",
                "One of the following params should be provided for this request: payment_intent or charge.",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "charge",
                "You may only specify one of these parameters: charge, payment_intent.",
            ))
        }
    };
    let charge = state
        .charges
        .get_mut(&charge_id)
        .ok_or_else(|| ApiError::no_such("charge", &charge_id, "charge"))?;
    if !charge.succeeded() {
        return Err(ApiError::unexpected_state(
            "charge_not_refundable",
            format!("Charge {charge_id} has not succeeded and cannot be refunded."),
        ));
    }
    if charge.remaining() == 0 {
        return Err(ApiError::unexpected_state(
            "charge_already_refunded",
            format!("Charge {charge_id} has already been refunded."),
        ));
    }
    let amount = amount.unwrap_or(charge.remaining());
    if amount > charge.remaining() {
        return Err(ApiError::unexpected_state(
            "amount_too_large",
            format!(
                "Refund amount ({amount}) is greater than unrefunded amount on charge ({})",
                charge.remaining()
            ),
        )
        .with_param("amount"));
    }
    charge.amount_refunded += amount;
    let charge_json = charge.to_json();
    let refund = Refund {
        id: ids::new_id("re_"),
        amount,
        charge: charge_id,
        currency: charge.currency.clone(),
        created: ctx.now,
        payment_intent: charge.payment_intent.clone(),
        reason,
        metadata: refund_metadata,
    };
    let json = refund.to_json();
    state.refunds.insert(refund.id.clone(), ctx.now, refund);
    state.emit(ctx, "charge.refunded", charge_json);
    state.emit(ctx, "refund.created", json.clone());
    Ok(json)
}

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    state
        .refunds
        .get(id)
        .map(Refund::to_json)
        .ok_or_else(|| ApiError::no_such("refund", id, "refund"))
}

pub fn list(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let payment_intent = r.string("payment_intent")?;
    let charge = r.string("charge")?;
    r.ignore(&["expand"]);
    r.finish()?;
    let found = page(&state.refunds, &query, "refund", |refund| {
        payment_intent
            .as_ref()
            .is_none_or(|pi| *pi == refund.payment_intent)
            && charge.as_ref().is_none_or(|ch| *ch == refund.charge)
    })?;
    let data: Vec<Value> = found.items.iter().map(|refund| refund.to_json()).collect();
    Ok(list_body(data, found.has_more, "/v1/refunds"))
}
