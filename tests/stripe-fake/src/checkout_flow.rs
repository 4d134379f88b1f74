//! What happens to a Checkout Session after it is created: the customer pays on the hosted page
//! (by card, or by a bank debit that settles days later), abandons it, or the session expires.
//! Each step changes the session, its PaymentIntent and Charge, and emits Stripe's events in one
//! order (see the crate documentation for the order and why).

use serde_json::{json, Value};

use crate::api::payment_intents;
use crate::billing;
use crate::card::{self, Outcome};
use crate::charge::{Charge, ChargeStatus};
use crate::checkout_session::{Mode, PaymentStatus, Session, SessionStatus};
use crate::error::{shorten, ApiError};
use crate::ids;
use crate::payment_intent::{PaymentIntent, Status};
use crate::state::{Ctx, State};

/// The email the customer types on the page when the session did not prefill one.
pub const DEFAULT_EMAIL: &str = "jenny.rosen@example.com";

/// How the customer pays on the hosted page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckoutPayment {
    /// A test card PaymentMethod: `pm_card_visa` pays, `pm_card_chargeDeclined` and the other
    /// declining cards are refused and leave the session open.
    Card(String),
    /// The bank debit the session offers (`us_bank_account` for usd, `sepa_debit` for eur); it
    /// settles later through [`crate::StripeFake::settle_checkout`].
    Delayed,
}

/// One entry point for the handle and the control endpoint.
pub fn pay(
    state: &mut State,
    ctx: &Ctx,
    id: &str,
    payment: &CheckoutPayment,
) -> Result<Value, ApiError> {
    expire_due(state, ctx.now);
    if find(state, id)?.mode == Mode::Subscription {
        return match payment {
            CheckoutPayment::Card(pm) => {
                billing::pay_subscription_session(state, ctx, id, pm, None)
            }
            CheckoutPayment::Delayed => Err(ApiError::invalid_request(
                "stripe-fake's subscriptions are paid by card: pass a payment_method.",
            )),
        };
    }
    match payment {
        CheckoutPayment::Card(pm) => pay_by_card(state, ctx, id, pm),
        CheckoutPayment::Delayed => pay_delayed(state, ctx, id),
    }
}

/// Bank debits that settle later, by currency, as Stripe offers them to a Checkout customer.
pub fn delayed_method_for(currency: &str) -> Option<&'static str> {
    match currency {
        "usd" => Some("us_bank_account"),
        "eur" => Some("sepa_debit"),
        _ => None,
    }
}

pub fn find<'a>(state: &'a State, id: &str) -> Result<&'a Session, ApiError> {
    state
        .checkout_sessions
        .get(id)
        .ok_or_else(|| ApiError::no_such("checkout.session", id, "session"))
}

/// Applies `change` and returns the session's JSON afterwards.
fn update(
    state: &mut State,
    id: &str,
    change: impl FnOnce(&mut Session),
) -> Result<Value, ApiError> {
    state
        .checkout_sessions
        .update(id, |s| {
            change(s);
            s.to_json()
        })
        .ok_or_else(|| ApiError::no_such("checkout.session", id, "session"))
}

/// Expires every open session whose `expires_at` has passed on the fake's clock, as Stripe does on
/// its own (no request, so the events carry `request.id` null), and runs the billing that fell due
/// for customers without a test clock (renewals, retries, cancellations at period end).
pub fn expire_due(state: &mut State, now: i64) {
    let ctx = Ctx::internal(now);
    for id in state.checkout_sessions.due(now) {
        // Only open sessions are due, so this cannot fail.
        let _ = expire(state, &ctx, &id);
    }
    billing::run_due(state, &ctx, None, now);
}

/// Expires an open session: `checkout.session.expired`, after canceling the PaymentIntent of an
/// attempt that did not go through (`payment_intent.canceled`). Any other status is Stripe's error.
pub fn expire(state: &mut State, ctx: &Ctx, id: &str) -> Result<Value, ApiError> {
    let session = find(state, id)?;
    if session.status != SessionStatus::Open {
        return Err(ApiError::invalid_request(format!(
            "Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of {}.",
            session.status
        ))
        .executed());
    }
    if let Some(pi_id) = session.payment_intent.clone() {
        let open = payment_intents::find(state, &pi_id)?.status.is_open();
        if open {
            let json = payment_intents::update_pi(state, &pi_id, |pi| {
                pi.status = Status::Canceled;
                pi.canceled_at = Some(ctx.now);
                pi.cancellation_reason = Some("abandoned".into());
                pi.next_action = None;
            })?;
            state.emit(ctx, "payment_intent.canceled", json);
        }
    }
    let json = update(state, id, |s| s.status = SessionStatus::Expired)?;
    state.emit(ctx, "checkout.session.expired", json.clone());
    Ok(json)
}

/// The customer pays by card: `pm_card_visa` and the other succeeding cards complete the session
/// (`payment_intent.created`, `charge.succeeded`, `payment_intent.succeeded`,
/// `checkout.session.completed`); a declining card is the 402 card error, and the session stays
/// open for another try with the same PaymentIntent, as the hosted page allows.
fn pay_by_card(
    state: &mut State,
    ctx: &Ctx,
    id: &str,
    payment_method: &str,
) -> Result<Value, ApiError> {
    expire_due(state, ctx.now);
    ensure_open(find(state, id)?)?;
    match card::outcome(payment_method) {
        None => {
            return Err(ApiError::invalid_request(format!(
                "No such PaymentMethod: '{}'",
                shorten(payment_method)
            )))
        }
        Some(Outcome::RequireAction) => {
            return Err(ApiError::invalid_request(
                "stripe-fake's Checkout does not model 3-D Secure: pay with a card that succeeds or declines.",
            ))
        }
        Some(Outcome::Succeed | Outcome::Decline { .. }) => {}
    }
    let pi_id = ensure_payment_intent(state, ctx, id)?;
    payment_intents::attempt_payment(state, ctx, &pi_id, Some(payment_method.to_owned()))?;
    complete(state, ctx, id, PaymentStatus::Paid)
}

/// The customer pays by bank debit (`us_bank_account` for usd, `sepa_debit` for eur): the session
/// completes unpaid while the PaymentIntent is processing (`payment_intent.created`,
/// `charge.pending`, `payment_intent.processing`, `checkout.session.completed`). [`settle`] ends it.
fn pay_delayed(state: &mut State, ctx: &Ctx, id: &str) -> Result<Value, ApiError> {
    expire_due(state, ctx.now);
    let session = find(state, id)?;
    ensure_open(session)?;
    let method = session
        .payment_method_types
        .iter()
        .copied()
        .find(|t| *t != "card")
        .ok_or_else(|| {
            ApiError::invalid_request(format!(
                "This Checkout Session accepts only {:?}; a delayed payment method needs usd (us_bank_account) or eur (sepa_debit).",
                session.payment_method_types
            ))
        })?;
    let pi_id = ensure_payment_intent(state, ctx, id)?;
    let pi = payment_intents::find(state, &pi_id)?;
    let charge = Charge {
        id: ids::new_id("py_"),
        amount: pi.amount,
        amount_refunded: 0,
        currency: pi.currency.clone(),
        created: ctx.now,
        payment_intent: pi_id.clone(),
        payment_method: ids::new_id("pm_"),
        status: ChargeStatus::Pending,
        failure_code: None,
        failure_message: None,
    };
    let (charge_id, pm) = (charge.id.clone(), charge.payment_method.clone());
    state.emit(ctx, "charge.pending", charge.to_json());
    state.charges.insert(charge_id.clone(), charge);
    let json = payment_intents::update_pi(state, &pi_id, |pi| {
        pi.status = Status::Processing;
        pi.payment_method = Some(pm);
        pi.payment_method_type = method;
        pi.latest_charge = Some(charge_id);
        pi.last_payment_error = None;
    })?;
    state.emit(ctx, "payment_intent.processing", json);
    complete(state, ctx, id, PaymentStatus::Unpaid)
}

/// The bank debit of a completed, unpaid session settles: success (`charge.succeeded`,
/// `payment_intent.succeeded`, `checkout.session.async_payment_succeeded`) or failure
/// (`charge.failed`, `payment_intent.payment_failed`, `checkout.session.async_payment_failed`).
pub fn settle(state: &mut State, ctx: &Ctx, id: &str, succeed: bool) -> Result<Value, ApiError> {
    let session = find(state, id)?;
    let pi = session
        .payment_intent
        .as_deref()
        .map(|pi| payment_intents::find(state, pi))
        .transpose()?;
    let (pi_id, charge_id) = match pi {
        Some(pi) if session.payment_status == PaymentStatus::Unpaid
            && session.status == SessionStatus::Complete
            && pi.status == Status::Processing =>
        {
            (pi.id.clone(), pi.latest_charge.clone().unwrap_or_default())
        }
        _ => {
            return Err(ApiError::invalid_request(format!(
                "Checkout Session {id} has no payment in progress: only a session completed with a delayed payment method (status complete, payment_status unpaid) settles."
            )))
        }
    };
    let charge = state
        .charges
        .get_mut(&charge_id)
        .ok_or_else(|| ApiError::no_such("charge", &charge_id, "charge"))?;
    if succeed {
        charge.status = ChargeStatus::Succeeded;
        let charge_json = charge.to_json();
        state.emit(ctx, "charge.succeeded", charge_json);
        let json = payment_intents::update_pi(state, &pi_id, |pi| {
            pi.status = Status::Succeeded;
            pi.amount_received = pi.amount;
        })?;
        state.emit(ctx, "payment_intent.succeeded", json);
        let json = update(state, id, |s| s.payment_status = PaymentStatus::Paid)?;
        state.emit(
            ctx,
            "checkout.session.async_payment_succeeded",
            json.clone(),
        );
        return Ok(json);
    }
    charge.status = ChargeStatus::Failed;
    charge.failure_code = Some("insufficient_funds");
    charge.failure_message =
        Some("The customer's account has insufficient funds to cover this payment.");
    let charge_json = charge.to_json();
    state.emit(ctx, "charge.failed", charge_json);
    let json = payment_intents::update_pi(state, &pi_id, |pi| {
        pi.status = Status::RequiresPaymentMethod;
        pi.last_payment_error = Some(json!({
            "type": "invalid_request_error",
            "code": "insufficient_funds",
            "message": "The customer's account has insufficient funds to cover this payment.",
            "payment_method": { "id": pi.payment_method, "object": "payment_method", "type": pi.payment_method_type },
        }));
        pi.payment_method = None;
    })?;
    state.emit(ctx, "payment_intent.payment_failed", json);
    let json = find(state, id)?.to_json();
    state.emit(ctx, "checkout.session.async_payment_failed", json.clone());
    Ok(json)
}

pub fn ensure_open(session: &Session) -> Result<(), ApiError> {
    match session.status {
        SessionStatus::Open => Ok(()),
        status => Err(ApiError::invalid_request(format!(
            "Checkout Session {} is {status}: the customer can no longer pay on it.",
            session.id
        ))),
    }
}

/// The session's PaymentIntent, created at the customer's first attempt with the session's amount
/// and `payment_intent_data` (`payment_intent.created`).
fn ensure_payment_intent(state: &mut State, ctx: &Ctx, id: &str) -> Result<String, ApiError> {
    let session = find(state, id)?;
    if let Some(pi) = &session.payment_intent {
        return Ok(pi.clone());
    }
    let pi_id = ids::new_id("pi_");
    let mut pi = PaymentIntent::new(
        pi_id.clone(),
        ids::client_secret(&pi_id),
        session.amount_total,
        session.currency.clone(),
        ctx.now,
    );
    pi.metadata = session.payment_intent_data.metadata.clone();
    pi.description = session.payment_intent_data.description.clone();
    pi.receipt_email = session.payment_intent_data.receipt_email.clone();
    pi.customer = session.customer.clone();
    pi.checkout_session = Some(id.to_owned());
    let json = pi.to_json();
    state.payment_intents.insert(pi);
    state.counters.payment_intents_created += 1;
    update(state, id, |s| s.payment_intent = Some(pi_id.clone()))?;
    state.emit(ctx, "payment_intent.created", json);
    Ok(pi_id)
}

fn complete(
    state: &mut State,
    ctx: &Ctx,
    id: &str,
    payment_status: PaymentStatus,
) -> Result<Value, ApiError> {
    let json = update(state, id, |s| {
        s.status = SessionStatus::Complete;
        s.payment_status = payment_status;
        s.paid_by_email = Some(
            s.customer_email
                .clone()
                .unwrap_or_else(|| DEFAULT_EMAIL.to_owned()),
        );
    })?;
    state.emit(ctx, "checkout.session.completed", json.clone());
    Ok(json)
}
