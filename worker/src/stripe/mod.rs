//! Talking to Stripe: the HTTP client, what its answers mean, how fast and how often to ask.
//! Nothing here knows about the outbox or the database.

mod backoff;
mod classify;
mod client;
mod ratelimit;
mod reader;
mod request;

pub use backoff::RetryPolicy;
pub(crate) use classify::{decide, Decision, RetryReason};
pub use client::{ClientError, StripeConfig, Unauthorized};
pub(crate) use client::{SendError, StripeClient, StripeResponse};
pub(crate) use ratelimit::RateLimiter;
pub use reader::ReadError;
pub(crate) use reader::{Got, Page, StripeReader};
pub use request::{encode_form, Method, StripeRequest};
