//! How a fake is set up. Everything but `listen` can also be changed later through the handle or
//! the control endpoints.

use std::net::{Ipv4Addr, SocketAddr};

use crate::billing::BillingSettings;
use crate::idempotency::DEFAULT_RETENTION_SECS;
use crate::webhooks::{DeliveryOptions, WebhookEndpoint};

/// The Stripe API version the fake claims by default in events and the `Stripe-Version` header
/// ([`Config::api_version`] changes it; `2025-03-31.basil` and later render the new Billing shapes).
pub const API_VERSION: &str = "2024-06-20";

#[derive(Clone, PartialEq)]
pub struct Config {
    /// The only secret key accepted (`Authorization: Bearer <api_key>`).
    pub api_key: String,
    /// Where to listen; port 0 picks a free port (see [`crate::StripeFake::base_url`]).
    pub listen: SocketAddr,
    /// Where to deliver events, if anywhere.
    pub webhook: Option<WebhookEndpoint>,
    pub webhook_options: DeliveryOptions,
    /// Webhook requests in flight at once. 1 (the default) delivers in event order; raise it for
    /// throughput, accepting that deliveries then overtake each other (as they do on Stripe).
    pub webhook_concurrency: usize,
    /// How long an idempotency key is remembered, on the fake's clock (Stripe: 24 hours).
    pub idempotency_retention_secs: i64,
    /// Seeds fault probabilities, delivery drops and reordering, for reproducible chaos runs.
    pub seed: u64,
    /// Emulate Stripe's rate limit: at most this many API requests per second (off when `None`).
    pub rate_limit_per_second: Option<u32>,
    /// The account's API version: events are rendered in it, and API answers unless the request
    /// sends its own `Stripe-Version`. Switchable at runtime (`POST /_fake/api_version`).
    pub api_version: String,
    /// Retries of failed subscription payments and what follows the last one.
    pub billing: BillingSettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            api_key: "sk_test_fake".into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            webhook: None,
            webhook_options: DeliveryOptions::default(),
            webhook_concurrency: 1,
            idempotency_retention_secs: DEFAULT_RETENTION_SECS,
            seed: 0x5712_1BE5,
            rate_limit_per_second: None,
            api_version: API_VERSION.into(),
            billing: BillingSettings::default(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("api_key", &redact_key(&self.api_key))
            .field("listen", &self.listen)
            .field("webhook", &self.webhook)
            .field("webhook_options", &self.webhook_options)
            .field("webhook_concurrency", &self.webhook_concurrency)
            .field(
                "idempotency_retention_secs",
                &self.idempotency_retention_secs,
            )
            .field("seed", &self.seed)
            .field("rate_limit_per_second", &self.rate_limit_per_second)
            .field("api_version", &self.api_version)
            .field("billing", &self.billing)
            .finish()
    }
}

/// `sk_test_****abcd`, the way Stripe shows a key in its 401 message.
pub fn redact_key(key: &str) -> String {
    let prefix: String = key.chars().take(8).collect();
    let tail: Vec<char> = key.chars().rev().take(4).collect();
    if key.chars().count() <= 12 {
        return format!("{prefix}****");
    }
    format!("{prefix}****{}", tail.into_iter().rev().collect::<String>())
}
