//! The API surface: which method and path reach which handler.

use hyper::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    CreatePaymentIntent,
    ListPaymentIntents,
    SearchPaymentIntents,
    RetrievePaymentIntent(String),
    UpdatePaymentIntent(String),
    CancelPaymentIntent(String),
    ConfirmPaymentIntent(String),
    CreateRefund,
    ListRefunds,
    RetrieveRefund(String),
    RetrieveCharge(String),
    ListEvents,
    RetrieveEvent(String),
    CreateCheckoutSession,
    ListCheckoutSessions,
    RetrieveCheckoutSession(String),
    ExpireCheckoutSession(String),
    CreateProduct,
    ListProducts,
    RetrieveProduct(String),
    CreatePrice,
    ListPrices,
    RetrievePrice(String),
    CreateCustomer,
    ListCustomers,
    RetrieveCustomer(String),
    UpdateCustomer(String),
    ListSubscriptions,
    RetrieveSubscription(String),
    UpdateSubscription(String),
    CancelSubscription(String),
    ListInvoices,
    RetrieveInvoice(String),
    CreateTestClock,
    ListTestClocks,
    RetrieveTestClock(String),
    AdvanceTestClock(String),
}

impl Route {
    pub fn find(method: &Method, path: &str) -> Option<Route> {
        let rest = path.strip_prefix("/v1/")?;
        let segments: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| s.to_owned();
        let route = match (method.as_str(), segments.as_slice()) {
            ("POST", ["payment_intents"]) => Route::CreatePaymentIntent,
            ("GET", ["payment_intents"]) => Route::ListPaymentIntents,
            ("GET", ["payment_intents", "search"]) => Route::SearchPaymentIntents,
            ("GET", ["payment_intents", pi]) => Route::RetrievePaymentIntent(id(pi)),
            ("POST", ["payment_intents", pi]) => Route::UpdatePaymentIntent(id(pi)),
            ("POST", ["payment_intents", pi, "cancel"]) => Route::CancelPaymentIntent(id(pi)),
            ("POST", ["payment_intents", pi, "confirm"]) => Route::ConfirmPaymentIntent(id(pi)),
            ("POST", ["refunds"]) => Route::CreateRefund,
            ("GET", ["refunds"]) => Route::ListRefunds,
            ("GET", ["refunds", re]) => Route::RetrieveRefund(id(re)),
            ("GET", ["charges", ch]) => Route::RetrieveCharge(id(ch)),
            ("GET", ["events"]) => Route::ListEvents,
            ("GET", ["events", evt]) => Route::RetrieveEvent(id(evt)),
            ("POST", ["checkout", "sessions"]) => Route::CreateCheckoutSession,
            ("GET", ["checkout", "sessions"]) => Route::ListCheckoutSessions,
            ("GET", ["checkout", "sessions", cs]) => Route::RetrieveCheckoutSession(id(cs)),
            ("POST", ["checkout", "sessions", cs, "expire"]) => {
                Route::ExpireCheckoutSession(id(cs))
            }
            ("POST", ["products"]) => Route::CreateProduct,
            ("GET", ["products"]) => Route::ListProducts,
            ("GET", ["products", p]) => Route::RetrieveProduct(id(p)),
            ("POST", ["prices"]) => Route::CreatePrice,
            ("GET", ["prices"]) => Route::ListPrices,
            ("GET", ["prices", p]) => Route::RetrievePrice(id(p)),
            ("POST", ["customers"]) => Route::CreateCustomer,
            ("GET", ["customers"]) => Route::ListCustomers,
            ("GET", ["customers", c]) => Route::RetrieveCustomer(id(c)),
            ("POST", ["customers", c]) => Route::UpdateCustomer(id(c)),
            ("GET", ["subscriptions"]) => Route::ListSubscriptions,
            ("GET", ["subscriptions", s]) => Route::RetrieveSubscription(id(s)),
            ("POST", ["subscriptions", s]) => Route::UpdateSubscription(id(s)),
            ("DELETE", ["subscriptions", s]) => Route::CancelSubscription(id(s)),
            ("GET", ["invoices"]) => Route::ListInvoices,
            ("GET", ["invoices", i]) => Route::RetrieveInvoice(id(i)),
            ("POST", ["test_helpers", "test_clocks"]) => Route::CreateTestClock,
            ("GET", ["test_helpers", "test_clocks"]) => Route::ListTestClocks,
            ("GET", ["test_helpers", "test_clocks", c]) => Route::RetrieveTestClock(id(c)),
            ("POST", ["test_helpers", "test_clocks", c, "advance"]) => {
                Route::AdvanceTestClock(id(c))
            }
            _ => return None,
        };
        Some(route)
    }

    /// The route as counted in the ledger.
    pub fn template(&self) -> &'static str {
        match self {
            Route::CreatePaymentIntent => "POST /v1/payment_intents",
            Route::ListPaymentIntents => "GET /v1/payment_intents",
            Route::SearchPaymentIntents => "GET /v1/payment_intents/search",
            Route::RetrievePaymentIntent(_) => "GET /v1/payment_intents/:id",
            Route::UpdatePaymentIntent(_) => "POST /v1/payment_intents/:id",
            Route::CancelPaymentIntent(_) => "POST /v1/payment_intents/:id/cancel",
            Route::ConfirmPaymentIntent(_) => "POST /v1/payment_intents/:id/confirm",
            Route::CreateRefund => "POST /v1/refunds",
            Route::ListRefunds => "GET /v1/refunds",
            Route::RetrieveRefund(_) => "GET /v1/refunds/:id",
            Route::RetrieveCharge(_) => "GET /v1/charges/:id",
            Route::ListEvents => "GET /v1/events",
            Route::RetrieveEvent(_) => "GET /v1/events/:id",
            Route::CreateCheckoutSession => "POST /v1/checkout/sessions",
            Route::ListCheckoutSessions => "GET /v1/checkout/sessions",
            Route::RetrieveCheckoutSession(_) => "GET /v1/checkout/sessions/:id",
            Route::ExpireCheckoutSession(_) => "POST /v1/checkout/sessions/:id/expire",
            Route::CreateProduct => "POST /v1/products",
            Route::ListProducts => "GET /v1/products",
            Route::RetrieveProduct(_) => "GET /v1/products/:id",
            Route::CreatePrice => "POST /v1/prices",
            Route::ListPrices => "GET /v1/prices",
            Route::RetrievePrice(_) => "GET /v1/prices/:id",
            Route::CreateCustomer => "POST /v1/customers",
            Route::ListCustomers => "GET /v1/customers",
            Route::RetrieveCustomer(_) => "GET /v1/customers/:id",
            Route::UpdateCustomer(_) => "POST /v1/customers/:id",
            Route::ListSubscriptions => "GET /v1/subscriptions",
            Route::RetrieveSubscription(_) => "GET /v1/subscriptions/:id",
            Route::UpdateSubscription(_) => "POST /v1/subscriptions/:id",
            Route::CancelSubscription(_) => "DELETE /v1/subscriptions/:id",
            Route::ListInvoices => "GET /v1/invoices",
            Route::RetrieveInvoice(_) => "GET /v1/invoices/:id",
            Route::CreateTestClock => "POST /v1/test_helpers/test_clocks",
            Route::ListTestClocks => "GET /v1/test_helpers/test_clocks",
            Route::RetrieveTestClock(_) => "GET /v1/test_helpers/test_clocks/:id",
            Route::AdvanceTestClock(_) => "POST /v1/test_helpers/test_clocks/:id/advance",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            (
                Method::POST,
                "/v1/payment_intents",
                Some(Route::CreatePaymentIntent),
            ),
            (
                Method::GET,
                "/v1/payment_intents/search",
                Some(Route::SearchPaymentIntents),
            ),
            (
                Method::GET,
                "/v1/payment_intents/pi_1",
                Some(Route::RetrievePaymentIntent("pi_1".into())),
            ),
            (
                Method::POST,
                "/v1/payment_intents/pi_1/confirm",
                Some(Route::ConfirmPaymentIntent("pi_1".into())),
            ),
            (Method::DELETE, "/v1/payment_intents/pi_1", None),
            (
                Method::DELETE,
                "/v1/subscriptions/sub_1",
                Some(Route::CancelSubscription("sub_1".into())),
            ),
            (
                Method::POST,
                "/v1/test_helpers/test_clocks/clock_1/advance",
                Some(Route::AdvanceTestClock("clock_1".into())),
            ),
            (Method::DELETE, "/v1/invoices/in_1", None),
            (Method::GET, "/v1/payment_intents/pi_1/cancel", None),
            (Method::GET, "/v2/payment_intents", None),
            (
                Method::POST,
                "/v1/checkout/sessions/cs_test_1/expire",
                Some(Route::ExpireCheckoutSession("cs_test_1".into())),
            ),
            (
                Method::GET,
                "/v1/checkout/sessions/cs_test_1",
                Some(Route::RetrieveCheckoutSession("cs_test_1".into())),
            ),
            (
                Method::GET,
                "/v1/checkout/sessions/search",
                Some(Route::RetrieveCheckoutSession("search".into())),
            ),
            (Method::POST, "/v1/checkout/sessions/cs_test_1", None),
            (
                Method::GET,
                "/v1/events/evt_1",
                Some(Route::RetrieveEvent("evt_1".into())),
            ),
        ];
        for (method, path, expected) in cases {
            assert_eq!(Route::find(&method, path), expected, "{method} {path}");
        }
    }
}
