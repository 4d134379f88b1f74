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
//! # Endpoints
//!
//! Stripe's, with `Authorization: Bearer <api_key>`: `POST/GET /v1/payment_intents`,
//! `GET /v1/payment_intents/search`, `GET/POST /v1/payment_intents/:id`,
//! `POST /v1/payment_intents/:id/cancel`, `POST /v1/payment_intents/:id/confirm`,
//! `POST/GET /v1/refunds`, `GET /v1/refunds/:id`, `GET /v1/charges/:id`, `GET /v1/events`,
//! `GET /v1/events/:id`. The control API lives under `/_fake/` (see the table in the `control`
//! module's source, and the README of the binary's `--help`).
//!
//! # Differences from Stripe worth knowing
//! - Only test-mode card PaymentMethods (`pm_card_visa`, `pm_card_chargeDeclined`,
//!   `pm_card_authenticationRequired`, ...); capture is always automatic; `customer` is not checked.
//! - No minimum charge amount (Stripe wants about 50 cents); amounts are 1..=99999999.
//! - Search is immediately consistent (Stripe's lags by up to a minute).
//! - Webhook retries are compressed to milliseconds; signatures carry wall-clock time even when the
//!   fake's clock was advanced, since the receiver checks them against its own clock.
#![forbid(unsafe_code)]

mod api;
mod card;
mod charge;
mod clock;
mod collection;
mod config;
mod control;
mod error;
mod fake;
mod faults;
pub mod form;
mod idempotency;
mod ids;
mod ledger;
mod list;
mod operations;
mod params;
mod payment_intent;
mod pipeline;
mod rate_limit;
mod refund;
mod routes;
mod search;
mod seed;
mod server;
mod shared;
mod state;
mod webhooks;

pub use config::{Config, API_VERSION};
pub use error::{ApiError, ErrorType};
pub use fake::{StartError, StripeFake, WaitTimeout};
pub use faults::{FaultAction, FaultError, FaultRule, FaultStatus};
pub use idempotency::DEFAULT_RETENTION_SECS;
pub use ledger::{
    EventLedger, IdempotencyLedger, Ledger, PaymentIntentLedger, PaymentIntentSummary,
    RefundLedger, RefundSummary,
};
pub use seed::{SeedError, SeedReport, SeedRequest};
pub use webhooks::{
    DeliveryOptions, DeliveryOptionsPatch, DeliveryRecord, WebhookCounts, WebhookEndpoint,
    WebhookError,
};
