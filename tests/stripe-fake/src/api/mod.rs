//! The Stripe endpoints: each handler reads its parameters, validates them all before changing
//! anything, then changes the state and records events.

mod charges;
mod checkout_sessions;
mod events;
pub mod payment_intents;
mod refunds;

use crate::checkout_flow;
use crate::error::ApiError;
use crate::form::Params;
use crate::list::Body;
use crate::routes::Route;
use crate::state::{Ctx, State};

pub fn execute(
    state: &mut State,
    ctx: &Ctx,
    route: &Route,
    params: Params,
) -> Result<Body, ApiError> {
    // Sessions past `expires_at` expire before anything reads or changes them.
    checkout_flow::expire_due(state, ctx.now);
    let answer = match route {
        Route::CreatePaymentIntent => payment_intents::create(state, ctx, params),
        Route::ListPaymentIntents => return payment_intents::list(state, params),
        Route::SearchPaymentIntents => return payment_intents::search(state, params),
        Route::RetrievePaymentIntent(id) => payment_intents::retrieve(state, id, params),
        Route::UpdatePaymentIntent(id) => payment_intents::update(state, id, params),
        Route::CancelPaymentIntent(id) => payment_intents::cancel(state, ctx, id, params),
        Route::ConfirmPaymentIntent(id) => payment_intents::confirm(state, ctx, id, params),
        Route::CreateRefund => refunds::create(state, ctx, params),
        Route::ListRefunds => return refunds::list(state, params),
        Route::RetrieveRefund(id) => refunds::retrieve(state, id, params),
        Route::RetrieveCharge(id) => charges::retrieve(state, id, params),
        Route::ListEvents => return events::list(state, params),
        Route::RetrieveEvent(id) => events::retrieve(state, id, params),
        Route::CreateCheckoutSession => checkout_sessions::create(state, ctx, params),
        Route::ListCheckoutSessions => return checkout_sessions::list(state, params),
        Route::RetrieveCheckoutSession(id) => checkout_sessions::retrieve(state, id, params),
        Route::ExpireCheckoutSession(id) => checkout_sessions::expire(state, ctx, id, params),
    };
    answer.map(Body::from)
}
