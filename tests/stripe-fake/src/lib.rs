//! stripe-fake: a stateful, in-memory stand-in for the parts of Stripe's API that pgpay uses, with
//! fault injection. It is what pgpay's exactly-once tests run against, so it is strict where Stripe
//! is: form-encoded requests with bracket notation, Stripe's error JSON and statuses, and above
//! all idempotency keys (same key and parameters replays the stored answer with
//! `Idempotent-Replayed: true`; other parameters are a 400 `idempotency_error`; a key still in
//! flight is a 409).
//!
//! # Use from a test
//!
//! ```no_run
//! use std::time::Duration;
//! use stripe_fake::{Config, FaultAction, FaultRule, StripeFake};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let fake = StripeFake::start(Config { api_key: "sk_test_fake".into(), ..Config::default() }).await?;
//! let base = fake.base_url(); // "http://127.0.0.1:PORT": point STRIPE_API_BASE here
//! fake.set_webhook("http://127.0.0.1:9999/webhooks/stripe", "whsec_test")?;
//! // Lose the answer to the next create after it is committed.
//! fake.add_fault(FaultRule::new("POST", "/v1/payment_intents", FaultAction::DropResponseAfterCommit).times(1))?;
//! // ... run the code under test against `base` ...
//! let ledger = fake
//!     .wait_for(Duration::from_secs(5), |l| l.payment_intents.created == 1)
//!     .await?;
//! assert_eq!(ledger.idempotency.replays, 1);
//! # Ok(()) }
//! ```
//!
//! # Stripe endpoints
//!
//! With `Authorization: Bearer <api_key>`; form-encoded bodies; JSON answers with `Request-Id`.
//!
//! | endpoint | notes |
//! |---|---|
//! | `POST /v1/payment_intents` | `amount`, `currency`, `description`, `customer`, `receipt_email`, `metadata[..]`, `payment_method`, `confirm` |
//! | `GET /v1/payment_intents` | newest first; `limit`, `starting_after`, `ending_before`, `created[gt/gte/lt/lte]`, `customer` |
//! | `GET /v1/payment_intents/search` | `query` (`metadata['k']:'v'`, `status:'..'`, `amount>n`, ... with AND or OR), `limit`, `page` |
//! | `GET /v1/payment_intents/:id`, `POST /v1/payment_intents/:id` | update: amount/currency/payment_method while open, metadata/description always |
//! | `POST /v1/payment_intents/:id/confirm` | `pm_card_visa` succeeds, `pm_card_chargeDeclined` is a 402, `pm_card_authenticationRequired` needs action |
//! | `POST /v1/payment_intents/:id/cancel` | `cancellation_reason` |
//! | `POST /v1/refunds`, `GET /v1/refunds[/:id]` | `payment_intent` or `charge`, `amount` (default: what is left), `reason` |
//! | `GET /v1/charges/:id` | |
//! | `GET /v1/events[/:id]` | newest first; list parameters plus `type` (`payment_intent.*`) or `types[]` |
//! | `POST /v1/checkout/sessions` | `mode=payment`, `success_url`, `cancel_url`, `line_items[N][price_data][currency]`, `..[unit_amount]`, `..[product_data][name]`, `line_items[N][quantity]`, `client_reference_id`, `customer` or `customer_email`, `metadata[..]`, `payment_intent_data[metadata/description/receipt_email]`, `expires_at`, `payment_method_types[]` |
//! | `GET /v1/checkout/sessions` | newest first; list parameters plus `payment_intent`, `customer`, `subscription`, `status` (no search: Stripe has none for sessions) |
//! | `GET /v1/checkout/sessions/:id` | |
//! | `POST /v1/checkout/sessions/:id/expire` | open sessions only |
//! | `POST /v1/products`, `GET /v1/products[/:id]` | `name`, `description`, `metadata[..]`, `id` |
//! | `POST /v1/prices`, `GET /v1/prices[/:id]` | `currency`, `unit_amount`, `product` or `product_data[name]`, `recurring[interval]`, `recurring[interval_count]`, `nickname`, `lookup_key`, `metadata[..]` |
//! | `POST /v1/customers[/:id]`, `GET /v1/customers[/:id]` | `email`, `name`, `metadata[..]`, `test_clock` (create), `payment_method`, `invoice_settings[default_payment_method]` |
//! | `GET /v1/subscriptions[/:id]` | list: `status` (a status, `all`, `ended`; default: not canceled), `customer`, `price`, `test_clock`, `created` |
//! | `POST /v1/subscriptions/:id` | `items[0][id]`, `items[0][price]`, `items[0][quantity]`, `cancel_at_period_end`, `metadata[..]`, `proration_behavior` |
//! | `DELETE /v1/subscriptions/:id` | cancels now; again: the canceled subscription, unchanged |
//! | `GET /v1/invoices[/:id]` | list: `customer`, `subscription`, `status`, `created` |
//! | `POST /v1/test_helpers/test_clocks`, `GET ...[/:id]`, `POST .../:id/advance` | `frozen_time`, `name` |
//!
//! Subscription-mode Checkout Sessions (`mode=subscription`, `line_items[0][price]` of a recurring
//! Price, `line_items[0][quantity]`, `subscription_data[metadata][..]`), and what Billing does on
//! its own (renewals, failed charges and their retries, cancellation at period end), with the
//! events in order and the two API shapes, are described in tests/stripe-fake/README.md
//! ("Subscriptions, invoices and test clocks") and in the `billing` module.
//!
//! # Control endpoints
//!
//! No API key; JSON bodies (an empty body reads as `{}`); errors in Stripe's error shape. Each has
//! a method on [`StripeFake`] that does the same.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /_fake/ledger[?lists=false]` | | [`Ledger`] |
//! | `POST /_fake/reset` | | `{"reset":true}` |
//! | `GET /_fake/clock`, `POST /_fake/clock` | `{"advance_secs":90000}` | `{"now":..,"offset_secs":..}` |
//! | `GET /_fake/faults` | | `{"rules":[`[`FaultStatus`]`]}` |
//! | `POST /_fake/faults` | a [`FaultRule`] or `{"rules":[...]}` | `{"ids":[1]}` |
//! | `DELETE /_fake/faults` | | `{"cleared":true}` |
//! | `POST /_fake/seed` | [`SeedRequest`] | [`SeedReport`] |
//! | `GET/POST /_fake/rate_limit` | `{"per_second":25}` or `{"per_second":null}` | `{"per_second":..}` |
//! | `GET /_fake/webhook` | | `{"url":..,"options":..}` (never the secret) |
//! | `POST /_fake/webhook` | `{"url":"http://..","secret":"whsec_.."}` | as GET |
//! | `DELETE /_fake/webhook` | | as GET |
//! | `POST /_fake/webhook/options` | [`DeliveryOptionsPatch`] | [`DeliveryOptions`] |
//! | `POST /_fake/webhook/hold` | | `{"holding":true}` |
//! | `POST /_fake/webhook/release` | | `{"released":n}` |
//! | `POST /_fake/events/:id/resend` | | `{"resent":"evt_.."}` |
//! | `POST /_fake/payment_intents/:id/confirm` | `{"payment_method":"pm_card_visa"}` | the PaymentIntent, or a 402 card error |
//! | `POST /_fake/payment_intents/:id/authenticate` | `{"succeed":true}` | the PaymentIntent |
//! | `POST /_fake/checkout/sessions/:id/pay` | `{"payment_method":"pm_card_visa"}` or `{"delayed":true}` | the session, or a 402 card error |
//! | `POST /_fake/checkout/sessions/:id/settle` | `{"succeed":true}` | the session |
//! | `POST /_fake/checkout/sessions/:id/abandon` | | the session, expired |
//! | `POST /_fake/idempotency` | `{"retention_secs":86400}` | `{"retention_secs":..}` |
//!
//! A fault rule: `{"method":"POST","path":"/v1/payment_intents/*","action":"latency",
//! "latency_ms":300,"times":1}`; `action` is one of [`FaultAction`]'s (`drop_response_after_commit`,
//! `fail_before_commit`, `rate_limit` with `retry_after_secs`, `latency` with `latency_ms`,
//! `reset_connection`); `*` in `path` matches anything, `/` included; `times` and `probability`
//! (seeded by [`Config::seed`]) limit when it fires, and without either it fires on every match.
//!
//! # Checkout Sessions
//!
//! A session is created open and unpaid, with `payment_intent` null (Stripe creates the
//! PaymentIntent when the customer confirms, in API versions since 2022-08-01), `url` on the
//! fake's own address (`{base}/c/pay/cs_test_...`, not served: the control endpoints play the
//! customer) and `expires_at` 24 h ahead unless given (30 min to 24 h). No event marks creation.
//! The customer then, through the control endpoints or the handle's `pay_checkout`,
//! `settle_checkout` and `abandon_checkout`:
//!
//! | the customer | session after | events, in this order |
//! |---|---|---|
//! | pays by card | complete, paid | `payment_intent.created`, `charge.succeeded`, `payment_intent.succeeded`, `checkout.session.completed` |
//! | pays with a declining card | still open (402 to the caller) | `payment_intent.created` (first attempt only), `charge.failed`, `payment_intent.payment_failed` |
//! | pays by bank debit (`us_bank_account` for usd, `sepa_debit` for eur) | complete, unpaid | `payment_intent.created`, `charge.pending`, `payment_intent.processing`, `checkout.session.completed` |
//! | debit settles | complete, paid | `charge.succeeded`, `payment_intent.succeeded`, `checkout.session.async_payment_succeeded` |
//! | debit fails | complete, unpaid | `charge.failed`, `payment_intent.payment_failed`, `checkout.session.async_payment_failed` |
//! | abandons, or the clock passes `expires_at` | expired, `url` null | `payment_intent.canceled` (if a declined attempt left one), `checkout.session.expired` |
//!
//! Stripe documents no order among these events and promises none on delivery; the fake emits
//! one fixed order (`charge.*` before `payment_intent.*` as its PaymentIntents do, the session's
//! event last) and reorders only when asked ([`DeliveryOptions::reorder_window`]). Due sessions
//! expire at the next API request or clock push, with `request.id` null. The PaymentIntent
//! carries `payment_intent_data[metadata]` (not the session's metadata) and refuses
//! `confirm`/`cancel` through the API, as Stripe's does; refunds work as for any PaymentIntent.
//! The ledger counts sessions created ([`Ledger::checkout_sessions`]).
//!
//! # Idempotency, precisely
//!
//! Keys are scoped to the API key and kept for [`Config::idempotency_retention_secs`] (24 h) of
//! the fake's clock. A request's answer is stored unless it is a 5xx, a 429, or a failure of
//! parameter validation (Stripe saves results only once an endpoint began executing, so a request
//! with a typo can be corrected and resent with the same key); card declines (402) and state
//! errors are stored and replayed. Requests run to completion even if the client hangs up, as on
//! Stripe.
//!
//! # Differences from Stripe worth knowing
//! - Only test-mode card PaymentMethods (`pm_card_visa`, `pm_card_chargeDeclined`,
//!   `pm_card_authenticationRequired`, ...); capture is always automatic; `customer` is not checked.
//! - No minimum charge amount (Stripe wants about 50 cents); amounts are 1..=99999999.
//! - Search is immediately consistent (Stripe's lags by up to a minute).
//! - Checkout: payment and subscription modes, hosted UI only; payment mode takes line items by
//!   `price_data`, subscription mode one `line_items[0][price]`; no tax, discounts, shipping or
//!   session updates; 3-D Secure cards are
//!   refused by the customer controls; a session total must be at least 1 (Stripe wants the
//!   currency's minimum charge, 50 cents for usd).
//! - Billing: one item per subscription, cards only, no trials, coupons, taxes, prorations or
//!   invoice PaymentIntents/Charges (an invoice is paid or not by its customer's
//!   `invoice_settings.default_payment_method`, a test token such as `pm_card_visa` or
//!   `pm_card_chargeCustomerFail`, kept as given instead of being copied to a `pm_...`); price
//!   changes keep the billing interval; a renewal's draft is finalized an hour after the period
//!   ends, as on Stripe; test clock advances happen before the answer (which says `advancing`).
//! - Webhook retries are compressed to milliseconds; signatures carry wall-clock time even when the
//!   fake's clock was advanced, since the receiver checks them against its own clock.
//! - Webhooks go out one at a time in event order by default ([`Config::webhook_concurrency`]);
//!   reordering is an explicit option.
#![forbid(unsafe_code)]

mod api;
mod api_version;
mod billing;
mod calendar;
mod card;
mod charge;
mod checkout_flow;
mod checkout_session;
mod clock;
mod collection;
mod config;
mod control;
mod customer;
pub use control::CONTROL_API;
mod error;
mod fake;
mod faults;
pub mod form;
mod idempotency;
mod ids;
mod invoice;
mod ledger;
mod line_items;
mod list;
mod operations;
mod params;
mod payment_intent;
mod pipeline;
mod price;
mod rate_limit;
mod refund;
mod routes;
mod search;
mod seed;
mod server;
mod shared;
mod state;
mod subscription;
mod test_clock;
mod webhooks;

pub use api_version::BASIL as BASIL_API_VERSION;
pub use billing::{AfterRetries, BillingSettings};
pub use checkout_flow::CheckoutPayment;
pub use config::{Config, API_VERSION};
pub use error::{ApiError, ErrorType};
pub use fake::{StartError, StripeFake, WaitTimeout};
pub use faults::{FaultAction, FaultError, FaultRule, FaultStatus};
pub use idempotency::DEFAULT_RETENTION_SECS;
pub use ledger::{
    CheckoutSessionLedger, CheckoutSessionSummary, EventLedger, EventSummary, IdempotencyLedger,
    InvoiceLedger, InvoiceSummary, Ledger, PaymentIntentLedger, PaymentIntentSummary, RefundLedger,
    RefundSummary, SubscriptionLedger, SubscriptionSummary,
};
pub use seed::{SeedError, SeedReport, SeedRequest};
pub use webhooks::{
    DeliveryOptions, DeliveryOptionsPatch, DeliveryRecord, EventDelivery, WebhookCounts,
    WebhookEndpoint, WebhookError,
};
