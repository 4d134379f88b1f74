//! What Stripe Billing does on its own: a subscription-mode Checkout Session becomes a customer,
//! a subscription and its first paid invoice; each period end renews (a draft invoice, finalized
//! and charged an hour later) or, with `cancel_at_period_end`, ends the subscription; a failed
//! charge makes the subscription `past_due` and is retried on a schedule, after which the
//! subscription is canceled, marked `unpaid` or left `past_due` ([`BillingSettings`]). Time is the
//! customer's test clock, or the fake's own clock for customers without one. Every step emits
//! Stripe's events in one fixed order (see the crate documentation).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api_version::Shape;
use crate::calendar;
use crate::card::{self, Outcome};
use crate::checkout_flow::{self, DEFAULT_EMAIL};
use crate::checkout_session::{Mode, PaymentStatus, SessionStatus};
use crate::customer::Customer;
use crate::error::{shorten, ApiError, ErrorType};
use crate::ids::new_id;
use crate::invoice::{Invoice, InvoiceStatus};
use crate::state::{Ctx, State};
use crate::subscription::{Item, SubStatus, Subscription};

/// A renewal invoice stays a draft this long before it is finalized and charged (Stripe: 1 hour).
pub const DRAFT_SECS: i64 = 3600;
const DAY: i64 = 86_400;

/// What happens to a subscription once every retry of an invoice failed (Stripe's "Manage failed
/// payments" settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterRetries {
    Canceled,
    Unpaid,
    PastDue,
}

/// Stripe's retry schedule for failed subscription payments, as the fake applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingSettings {
    /// Days after the previous failed attempt each retry happens (at most 8 retries).
    pub retry_days: Vec<u32>,
    /// The subscription's fate after the last retry failed.
    pub after_retries: AfterRetries,
    /// Mark the invoice `uncollectible` after the last retry failed (else it stays `open`).
    pub mark_uncollectible: bool,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            retry_days: vec![3, 5, 7],
            after_retries: AfterRetries::Canceled,
            mark_uncollectible: false,
        }
    }
}

impl BillingSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.retry_days.len() > 8 {
            return Err("retry_days: at most 8 retries (Stripe's limit)".into());
        }
        if self.retry_days.iter().any(|d| *d == 0 || *d > 60) {
            return Err("retry_days: each retry is 1 to 60 days after the previous attempt".into());
        }
        Ok(())
    }
}

/// The time for a customer's objects: its test clock's frozen time, else the fake's clock.
pub fn time_on(state: &State, clock: Option<&str>, now: i64) -> i64 {
    clock
        .and_then(|c| state.test_clocks.get(c))
        .map_or(now, |c| c.frozen_time)
}

/// A subscription's JSON in `shape`.
pub fn subscription_json(state: &State, id: &str, shape: Shape) -> Option<Value> {
    let sub = state.subscriptions.get(id)?;
    Some(sub.to_json(shape, state.prices.get(&sub.item.price)))
}

pub fn invoice_json(state: &State, id: &str, shape: Shape) -> Option<Value> {
    let invoice = state.invoices.get(id)?;
    Some(invoice.to_json(shape, state.prices.get(&invoice.price), &state.base_url))
}

/// The context of an event about a subscription (or its invoice): its `created` never goes
/// back in time for that subscription, so whoever orders its events by `created` sees Stripe's
/// order.
fn event_ctx(state: &mut State, ctx: &Ctx, sub_id: &str) -> Ctx {
    let mut ctx = ctx.clone();
    if let Some(sub) = state.subscriptions.get_mut(sub_id) {
        ctx.now = ctx.now.max(sub.last_event_at);
        sub.last_event_at = ctx.now;
    }
    ctx
}

/// Emits a `customer.subscription.*` event (with `previous_attributes` for updates).
pub fn emit_subscription(
    state: &mut State,
    ctx: &Ctx,
    kind: &str,
    id: &str,
    previous: Option<Value>,
) {
    let shape = state.event_shape();
    let Some(json) = subscription_json(state, id, shape) else {
        return;
    };
    let ctx = event_ctx(state, ctx, id);
    match previous {
        Some(previous) => state.emit_update(&ctx, kind, json, previous),
        None => state.emit(&ctx, kind, json),
    };
}

fn emit_invoice(state: &mut State, ctx: &Ctx, kind: &str, id: &str) {
    let shape = state.event_shape();
    let Some(sub_id) = state.invoices.get(id).map(|i| i.subscription.clone()) else {
        return;
    };
    if let Some(json) = invoice_json(state, id, shape) {
        let ctx = event_ctx(state, ctx, &sub_id);
        state.emit(&ctx, kind, json);
    }
}

/// Whether a PaymentMethod can be saved on a customer: a card that works, or
/// `pm_card_chargeCustomerFail` (attaches, then every charge fails). Declining cards are refused
/// when attached, as on Stripe.
pub fn check_attachable(payment_method: &str, param: &str) -> Result<(), ApiError> {
    match (payment_method, card::outcome(payment_method)) {
        ("pm_card_chargeCustomerFail", _) | (_, Some(Outcome::Succeed)) => Ok(()),
        (_, None) => Err(ApiError::invalid_param(
            param,
            format!("No such PaymentMethod: '{}'", shorten(payment_method)),
        )
        .with_code("resource_missing")),
        (_, Some(Outcome::RequireAction)) => Err(ApiError::invalid_param(
            param,
            "stripe-fake's Billing does not model 3-D Secure: use a card that succeeds or fails.",
        )),
        (
            _,
            Some(Outcome::Decline {
                code,
                decline_code,
                message,
            }),
        ) => {
            let mut error = ApiError::new(402, ErrorType::CardError, message)
                .with_code(code)
                .with_param(param)
                .executed();
            error.decline_code = Some(decline_code);
            Err(error)
        }
    }
}

/// Whether charging `payment_method` off-session succeeds.
fn charge_succeeds(payment_method: Option<&str>) -> bool {
    payment_method.is_some_and(|pm| {
        pm != "pm_card_chargeCustomerFail" && card::outcome(pm) == Some(Outcome::Succeed)
    })
}

/// The customer pays a subscription-mode session on the hosted page, optionally on a test clock.
pub fn pay_subscription_session(
    state: &mut State,
    ctx: &Ctx,
    session_id: &str,
    payment_method: &str,
    test_clock: Option<&str>,
) -> Result<Value, ApiError> {
    let session = checkout_flow::find(state, session_id)?;
    checkout_flow::ensure_open(session)?;
    if session.mode != Mode::Subscription {
        return Err(ApiError::invalid_request(format!(
            "Checkout Session {session_id} is in payment mode: test_clock applies to subscription mode only."
        )));
    }
    let Some(line) = session.subscription_line.clone() else {
        return Err(ApiError::invalid_request(
            "The session has no recurring price.",
        ));
    };
    if let Some(clock) = test_clock {
        if state.test_clocks.get(clock).is_none() {
            return Err(ApiError::no_such(
                "test_helpers.test_clock",
                clock,
                "test_clock",
            ));
        }
    }
    let existing = session.customer.clone();
    let customer_email = session.customer_email.clone();
    let metadata = session.subscription_data_metadata.clone();
    let clock = match &existing {
        Some(cus) => {
            let customer = state
                .customers
                .get(cus)
                .ok_or_else(|| ApiError::no_such("customer", cus, "customer"))?;
            match (test_clock, customer.test_clock.as_deref()) {
                (Some(given), Some(own)) if given != own => {
                    return Err(ApiError::invalid_param(
                        "test_clock",
                        format!("Customer {cus} is on test clock {own}, not {given}."),
                    ))
                }
                (Some(_), None) => {
                    return Err(ApiError::invalid_param(
                        "test_clock",
                        format!("Customer {cus} has no test clock; a clock is set when a customer is created."),
                    ))
                }
                (_, own) => own.map(str::to_owned),
            }
        }
        None => test_clock.map(str::to_owned),
    };
    // The first charge: a card that fails leaves the session open and creates nothing.
    check_attachable(payment_method, "payment_method")?;
    if !charge_succeeds(Some(payment_method)) {
        let mut error = ApiError::new(402, ErrorType::CardError, "Your card was declined.")
            .with_code("card_declined")
            .executed();
        error.decline_code = Some("generic_decline");
        return Err(error);
    }
    let price = state
        .prices
        .get(&line.price)
        .cloned()
        .ok_or_else(|| ApiError::no_such("price", &line.price, "price"))?;
    let Some(recurring) = price.recurring else {
        return Err(ApiError::invalid_request(
            "The session's price is not recurring.",
        ));
    };
    let at = time_on(state, clock.as_deref(), ctx.now);

    let customer_id = match existing {
        Some(id) => {
            if let Some(c) = state.customers.get_mut(&id) {
                c.default_payment_method = Some(payment_method.to_owned());
            }
            id
        }
        None => {
            let customer = new_customer(
                at,
                Some(
                    customer_email
                        .clone()
                        .unwrap_or_else(|| DEFAULT_EMAIL.to_owned()),
                ),
                clock.clone(),
                Some(payment_method.to_owned()),
            );
            let id = customer.id.clone();
            let json = customer.to_json();
            state.customers.insert(id.clone(), at, customer);
            state.emit(ctx, "customer.created", json);
            id
        }
    };
    let email = state
        .customers
        .get(&customer_id)
        .and_then(|c| c.email.clone());
    let sub_id = new_id("sub_");
    let end = calendar::period_end(at, recurring.interval, recurring.interval_count, 1);
    let sub = Subscription {
        id: sub_id.clone(),
        created: at,
        customer: customer_id.clone(),
        status: SubStatus::Incomplete,
        item: Item {
            id: new_id("si_"),
            created: at,
            price: price.id.clone(),
            quantity: line.quantity,
        },
        currency: price.currency.clone(),
        billing_cycle_anchor: at,
        period_index: 1,
        current_period_start: at,
        current_period_end: end,
        cancel_at_period_end: false,
        canceled_at: None,
        ended_at: None,
        cancellation_reason: None,
        metadata,
        latest_invoice: None,
        test_clock: clock.clone(),
        failed_event_at: None,
        last_event_at: 0,
    };
    state.subscriptions.insert(sub_id.clone(), at, sub);
    state.counters.subscriptions_created += 1;
    let invoice_id = new_invoice(
        state,
        &sub_id,
        "subscription_create",
        (at, at),
        (at, end),
        at,
        email.clone(),
    )?;
    emit_subscription(state, ctx, "customer.subscription.created", &sub_id, None);
    emit_invoice(state, ctx, "invoice.created", &invoice_id);
    finalize(state, ctx, &invoice_id, at);
    settle_paid(state, ctx, &invoice_id, at);
    let previous = json!({ "status": "incomplete" });
    if let Some(sub) = state.subscriptions.get_mut(&sub_id) {
        sub.status = SubStatus::Active;
    }
    emit_subscription(
        state,
        ctx,
        "customer.subscription.updated",
        &sub_id,
        Some(previous),
    );

    let json = state
        .checkout_sessions
        .update(session_id, |s| {
            s.status = SessionStatus::Complete;
            s.payment_status = PaymentStatus::Paid;
            s.customer = Some(customer_id.clone());
            s.subscription = Some(sub_id.clone());
            s.invoice = Some(invoice_id.clone());
            s.paid_by_email = Some(
                s.customer_email
                    .clone()
                    .or_else(|| email.clone())
                    .unwrap_or_else(|| DEFAULT_EMAIL.to_owned()),
            );
            s.to_json()
        })
        .ok_or_else(|| ApiError::no_such("checkout.session", session_id, "session"))?;
    state.emit(ctx, "checkout.session.completed", json.clone());
    Ok(json)
}

pub fn new_customer(
    at: i64,
    email: Option<String>,
    test_clock: Option<String>,
    default_payment_method: Option<String>,
) -> Customer {
    let id = new_id("cus_");
    let prefix: String = id[4..12].to_ascii_uppercase();
    Customer {
        id,
        created: at,
        email,
        name: None,
        description: None,
        metadata: Default::default(),
        test_clock,
        default_payment_method,
        invoice_prefix: prefix,
        next_invoice_sequence: 1,
    }
}

/// A draft invoice for the subscription's current price and quantity.
fn new_invoice(
    state: &mut State,
    sub_id: &str,
    billing_reason: &'static str,
    (period_start, period_end): (i64, i64),
    line_period: (i64, i64),
    at: i64,
    customer_email: Option<String>,
) -> Result<String, ApiError> {
    let sub = state
        .subscriptions
        .get(sub_id)
        .ok_or_else(|| ApiError::no_such("subscription", sub_id, "subscription"))?;
    let unit_amount = state
        .prices
        .get(&sub.item.price)
        .map_or(0, |p| p.unit_amount);
    let (customer, item, price, quantity, currency, metadata, clock) = (
        sub.customer.clone(),
        sub.item.id.clone(),
        sub.item.price.clone(),
        sub.item.quantity,
        sub.currency.clone(),
        sub.metadata.clone(),
        sub.test_clock.clone(),
    );
    let number = match state.customers.get_mut(&customer) {
        Some(c) => {
            let n = c.next_invoice_sequence;
            c.next_invoice_sequence += 1;
            format!("{}-{n:04}", c.invoice_prefix)
        }
        None => new_id("").chars().take(8).collect(),
    };
    let id = new_id("in_");
    let invoice = Invoice {
        id: id.clone(),
        number,
        created: at,
        customer,
        customer_email,
        subscription: sub_id.to_owned(),
        subscription_item: item,
        billing_reason,
        status: InvoiceStatus::Draft,
        currency,
        price,
        quantity,
        unit_amount,
        period_start,
        period_end,
        line_period,
        attempt_count: 0,
        next_payment_attempt: None,
        finalize_at: None,
        finalized_at: None,
        paid_at: None,
        marked_uncollectible_at: None,
        voided_at: None,
        subscription_metadata: metadata,
        test_clock: clock,
        line_id: new_id("il_"),
    };
    state.invoices.insert(id.clone(), at, invoice);
    state.counters.invoices_created += 1;
    if let Some(sub) = state.subscriptions.get_mut(sub_id) {
        sub.latest_invoice = Some(id.clone());
    }
    Ok(id)
}

fn finalize(state: &mut State, ctx: &Ctx, invoice_id: &str, at: i64) {
    if let Some(inv) = state.invoices.get_mut(invoice_id) {
        inv.status = InvoiceStatus::Open;
        inv.finalized_at = Some(at);
        inv.finalize_at = None;
    }
    emit_invoice(state, ctx, "invoice.finalized", invoice_id);
}

/// The charge went through: `invoice.paid` then `invoice.payment_succeeded`.
fn settle_paid(state: &mut State, ctx: &Ctx, invoice_id: &str, at: i64) {
    if let Some(inv) = state.invoices.get_mut(invoice_id) {
        inv.attempt_count += 1;
        inv.status = InvoiceStatus::Paid;
        inv.paid_at = Some(at);
        inv.next_payment_attempt = None;
    }
    emit_invoice(state, ctx, "invoice.paid", invoice_id);
    emit_invoice(state, ctx, "invoice.payment_succeeded", invoice_id);
}

/// Charges an open invoice to the customer's default PaymentMethod, with everything that follows.
fn attempt(state: &mut State, ctx: &Ctx, invoice_id: &str, at: i64) {
    let Some(inv) = state.invoices.get(invoice_id) else {
        return;
    };
    let sub_id = inv.subscription.clone();
    let pm = state
        .customers
        .get(&inv.customer)
        .and_then(|c| c.default_payment_method.clone());
    let failed_event_at = state
        .subscriptions
        .get(&sub_id)
        .and_then(|s| s.failed_event_at);
    if charge_succeeds(pm.as_deref()) {
        // Stripe's events of a recovery are created after those of the failure (a retry comes
        // days later); a fast test must not see both in one second.
        if let (Some(failed), Some(sub)) = (failed_event_at, state.subscriptions.get_mut(&sub_id)) {
            sub.last_event_at = sub.last_event_at.max(failed + 1);
        }
        settle_paid(state, ctx, invoice_id, at);
        let still_owing = state.invoices.iter().any(|(_, i)| {
            i.subscription == sub_id && i.status == InvoiceStatus::Open && i.id != invoice_id
        });
        let Some(sub) = state.subscriptions.get_mut(&sub_id) else {
            return;
        };
        if matches!(sub.status, SubStatus::PastDue | SubStatus::Unpaid) && !still_owing {
            let previous = json!({ "status": sub.status.as_str() });
            sub.status = SubStatus::Active;
            emit_subscription(
                state,
                ctx,
                "customer.subscription.updated",
                &sub_id,
                Some(previous),
            );
        }
        return;
    }
    let settings = state.billing.clone();
    let mut exhausted = false;
    if let Some(inv) = state.invoices.get_mut(invoice_id) {
        inv.attempt_count += 1;
        let retries_done = usize::try_from(inv.attempt_count - 1).unwrap_or(usize::MAX);
        inv.next_payment_attempt = settings
            .retry_days
            .get(retries_done)
            .map(|days| at + i64::from(*days) * DAY);
        exhausted = inv.next_payment_attempt.is_none();
    }
    emit_invoice(state, ctx, "invoice.payment_failed", invoice_id);
    if let Some(sub) = state.subscriptions.get_mut(&sub_id) {
        sub.failed_event_at = Some(sub.last_event_at);
        if sub.status == SubStatus::Active {
            sub.status = SubStatus::PastDue;
            emit_subscription(
                state,
                ctx,
                "customer.subscription.updated",
                &sub_id,
                Some(json!({ "status": "active" })),
            );
        }
    }
    if !exhausted {
        return;
    }
    if settings.mark_uncollectible {
        if let Some(inv) = state.invoices.get_mut(invoice_id) {
            inv.status = InvoiceStatus::Uncollectible;
            inv.marked_uncollectible_at = Some(at);
        }
        emit_invoice(state, ctx, "invoice.marked_uncollectible", invoice_id);
    }
    let Some(sub) = state.subscriptions.get_mut(&sub_id) else {
        return;
    };
    if sub.status.is_terminal() {
        return;
    }
    match settings.after_retries {
        AfterRetries::Canceled => {
            sub.status = SubStatus::Canceled;
            sub.canceled_at = Some(at);
            sub.ended_at = Some(at);
            sub.cancellation_reason = Some("payment_failed");
            emit_subscription(state, ctx, "customer.subscription.deleted", &sub_id, None);
        }
        AfterRetries::Unpaid if sub.status != SubStatus::Unpaid => {
            let previous = json!({ "status": sub.status.as_str() });
            sub.status = SubStatus::Unpaid;
            emit_subscription(
                state,
                ctx,
                "customer.subscription.updated",
                &sub_id,
                Some(previous),
            );
        }
        AfterRetries::Unpaid | AfterRetries::PastDue => {}
    }
}

/// Ends a subscription now (`DELETE /v1/subscriptions/:id`, or its period end with
/// `cancel_at_period_end`): `customer.subscription.deleted`.
pub fn cancel_now(state: &mut State, ctx: &Ctx, sub_id: &str, at: i64, requested: bool) {
    let Some(sub) = state.subscriptions.get_mut(sub_id) else {
        return;
    };
    if sub.status.is_terminal() {
        return;
    }
    sub.status = SubStatus::Canceled;
    if !(requested && sub.cancel_at_period_end) || sub.canceled_at.is_none() {
        sub.canceled_at = Some(at);
    }
    sub.ended_at = Some(at);
    sub.cancellation_reason = Some("cancellation_requested");
    emit_subscription(state, ctx, "customer.subscription.deleted", sub_id, None);
}

/// The period end came: cancel (with `cancel_at_period_end`) or renew into a draft invoice.
fn renew(state: &mut State, ctx: &Ctx, sub_id: &str, at: i64) {
    let Some(sub) = state.subscriptions.get(sub_id) else {
        return;
    };
    if sub.cancel_at_period_end {
        cancel_now(state, ctx, sub_id, at, true);
        return;
    }
    let shape = state.event_shape();
    let price = state.prices.get(&sub.item.price).cloned();
    let previous = sub.previous_period(shape, price.as_ref());
    let (old_start, old_end) = (sub.current_period_start, sub.current_period_end);
    let recurring = price.as_ref().and_then(|p| p.recurring);
    let unpaid = sub.status == SubStatus::Unpaid;
    let email = state
        .customers
        .get(&sub.customer)
        .and_then(|c| c.email.clone());
    let Some(sub) = state.subscriptions.get_mut(sub_id) else {
        return;
    };
    sub.period_index += 1;
    let next_end = match recurring {
        Some(r) => calendar::period_end(
            sub.billing_cycle_anchor,
            r.interval,
            r.interval_count,
            sub.period_index,
        ),
        None => old_end + 30 * DAY,
    };
    sub.current_period_start = old_end;
    sub.current_period_end = next_end.max(old_end + 1);
    let new_period = (sub.current_period_start, sub.current_period_end);
    let Ok(invoice_id) = new_invoice(
        state,
        sub_id,
        "subscription_cycle",
        (old_start, old_end),
        new_period,
        at,
        email,
    ) else {
        return;
    };
    if !unpaid {
        // An unpaid subscription's invoices stay drafts: Stripe stops collecting.
        if let Some(inv) = state.invoices.get_mut(&invoice_id) {
            inv.finalize_at = Some(at + DRAFT_SECS);
        }
    }
    emit_subscription(
        state,
        ctx,
        "customer.subscription.updated",
        sub_id,
        Some(previous),
    );
    emit_invoice(state, ctx, "invoice.created", &invoice_id);
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Finalize(String),
    Retry(String),
    PeriodEnd(String),
}

/// The earliest thing due on `clock` at or before `until`.
fn next_due(state: &State, clock: Option<&str>, until: i64) -> Option<(i64, Due)> {
    let mut best: Option<(i64, Due)> = None;
    let mut consider = |at: i64, due: Due| {
        if at <= until && best.as_ref().is_none_or(|b| (at, &due) < (b.0, &b.1)) {
            best = Some((at, due));
        }
    };
    for (_, inv) in state.invoices.iter() {
        if inv.test_clock.as_deref() != clock {
            continue;
        }
        match inv.status {
            InvoiceStatus::Draft => {
                if let Some(at) = inv.finalize_at {
                    consider(at, Due::Finalize(inv.id.clone()));
                }
            }
            InvoiceStatus::Open => {
                if let Some(at) = inv.next_payment_attempt {
                    consider(at, Due::Retry(inv.id.clone()));
                }
            }
            _ => {}
        }
    }
    for (_, sub) in state.subscriptions.iter() {
        if sub.test_clock.as_deref() == clock && sub.status.renews() {
            consider(sub.current_period_end, Due::PeriodEnd(sub.id.clone()));
        }
    }
    best
}

/// Runs everything due on `clock` up to `until`, in time order. Stops after a bound of steps so a
/// clock pushed years ahead cannot hold the lock for long (Stripe limits an advance to two
/// billing intervals; the fake only bounds the work).
pub fn run_due(state: &mut State, ctx: &Ctx, clock: Option<&str>, until: i64) {
    const MAX_STEPS: usize = 10_000;
    for _ in 0..MAX_STEPS {
        let Some((at, due)) = next_due(state, clock, until) else {
            return;
        };
        match due {
            Due::Finalize(id) => {
                let subscription_live = state
                    .invoices
                    .get(&id)
                    .and_then(|i| state.subscriptions.get(&i.subscription))
                    .is_some_and(|s| !s.status.is_terminal());
                if subscription_live {
                    finalize(state, ctx, &id, at);
                    attempt(state, ctx, &id, at);
                } else if let Some(inv) = state.invoices.get_mut(&id) {
                    inv.finalize_at = None;
                }
            }
            Due::Retry(id) => attempt(state, ctx, &id, at),
            Due::PeriodEnd(id) => renew(state, ctx, &id, at),
        }
    }
}

/// Advances a test clock to `frozen_time` and runs what falls due on it.
pub fn advance_clock(
    state: &mut State,
    ctx: &Ctx,
    clock: &str,
    frozen_time: i64,
) -> Result<(), ApiError> {
    let current = state
        .test_clocks
        .get(clock)
        .ok_or_else(|| ApiError::no_such("test_helpers.test_clock", clock, "test_clock"))?
        .frozen_time;
    if frozen_time <= current {
        return Err(ApiError::invalid_param(
            "frozen_time",
            format!(
                "The frozen_time must be after the test clock's current frozen_time ({current})."
            ),
        ));
    }
    run_due(state, ctx, Some(clock), frozen_time);
    if let Some(c) = state.test_clocks.get_mut(clock) {
        c.frozen_time = frozen_time;
    }
    Ok(())
}
