//! Talking to Stripe: the HTTP client, what its answers mean, how fast and how often to ask.
//! Nothing here knows about the outbox or the database.

mod backoff;
mod classify;
mod client;
mod ratelimit;
mod reader;
mod request;

pub use backoff::RetryPolicy;
// The classification boundary is public for the fuzz targets (`fuzz/`).
pub use classify::{decide, Decision, RetryReason};
pub(crate) use client::StripeClient;
pub use client::{ClientError, SendError, StripeConfig, StripeResponse, Unauthorized};
pub(crate) use ratelimit::RateLimiter;
pub use reader::ReadError;
pub(crate) use reader::{Got, Page, StripeReader};
pub use request::{encode_form, Method, StripeRequest};
