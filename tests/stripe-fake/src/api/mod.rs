//! The Stripe endpoints: each handler reads its parameters, validates them all before changing
//! anything, then changes the state and records events.

mod charges;
mod checkout_sessions;
pub mod customers;
mod events;
mod invoices;
pub mod payment_intents;
mod products;
mod refunds;
mod subscriptions;
mod test_clocks;

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
        Route::CreateProduct => products::create_product(state, ctx, params),
        Route::ListProducts => return products::list_products(state, params),
        Route::RetrieveProduct(id) => products::retrieve_product(state, id, params),
        Route::CreatePrice => products::create_price(state, ctx, params),
        Route::ListPrices => return products::list_prices(state, params),
        Route::RetrievePrice(id) => products::retrieve_price(state, id, params),
        Route::CreateCustomer => customers::create(state, ctx, params),
        Route::ListCustomers => return customers::list(state, params),
        Route::RetrieveCustomer(id) => customers::retrieve(state, id, params),
        Route::UpdateCustomer(id) => customers::update(state, ctx, id, params),
        Route::ListSubscriptions => return subscriptions::list(state, ctx, params),
        Route::RetrieveSubscription(id) => subscriptions::retrieve(state, ctx, id, params),
        Route::UpdateSubscription(id) => subscriptions::update(state, ctx, id, params),
        Route::CancelSubscription(id) => subscriptions::cancel(state, ctx, id, params),
        Route::ListInvoices => return invoices::list(state, ctx, params),
        Route::RetrieveInvoice(id) => invoices::retrieve(state, ctx, id, params),
        Route::CreateTestClock => test_clocks::create(state, ctx, params),
        Route::ListTestClocks => return test_clocks::list(state, params),
        Route::RetrieveTestClock(id) => test_clocks::retrieve(state, id, params),
        Route::AdvanceTestClock(id) => test_clocks::advance(state, ctx, id, params),
    };
    answer.map(Body::from)
}
