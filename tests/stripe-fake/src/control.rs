//! The control API under `/_fake/` (no API key: the fake listens on loopback for tests and the
//! demo). The table of endpoints is in the crate documentation.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::billing::BillingSettings;
use crate::checkout_flow::CheckoutPayment;
use crate::error::ApiError;
use crate::faults::FaultRule;
use crate::pipeline::{HttpResponse, Incoming, Reply};
use crate::seed::SeedRequest;
use crate::shared::Shared;
use crate::webhooks::{DeliveryOptionsPatch, WebhookEndpoint};

/// The control API, one endpoint a line (`METHOD /_fake/path  what it does`): printed by
/// `stripe-fake --help` and copied into tests/stripe-fake/README.md (a test keeps the three
/// in step with the router). Bodies are JSON; no API key (the fake is for loopback).
pub const CONTROL_API: &str = "\
Control API (JSON bodies, no API key; every customer step emits Stripe's events, signed and delivered):
  GET    /_fake/ledger                           what really happened (?lists=false: counts only)
  POST   /_fake/reset                            forget every object, event, key and fault
  GET    /_fake/clock                            the fake's clock (unix seconds)
  POST   /_fake/clock                            {\"advance_secs\":90000}: push it forward (key retention, expiry)
  GET    /_fake/faults                           the fault rules
  POST   /_fake/faults                           {\"method\":\"POST\",\"path\":\"/v1/payment_intents\",\"action\":\"drop_response_after_commit\",\"times\":1}
                                                 (or {\"rules\":[...]}); actions: drop_response_after_commit, fail_before_commit,
                                                 rate_limit (retry_after_secs), latency (latency_ms), reset_connection; probability
  DELETE /_fake/faults                           remove every rule
  POST   /_fake/seed                             {\"count\":1000,\"metadata\":{\"pgpay_payment_id\":\"seed-{i}\"}}: PaymentIntents in the past
  GET    /_fake/rate_limit                       Stripe's rate limit as emulated ({\"per_second\":null}: off)
  POST   /_fake/rate_limit                       {\"per_second\":25}
  GET    /_fake/webhook                          the delivery endpoint and its options
  POST   /_fake/webhook                          {\"url\":\"http://127.0.0.1:8080/webhooks/stripe\",\"secret\":\"whsec_...\"}
  DELETE /_fake/webhook                          stop delivering
  POST   /_fake/webhook/options                  {\"duplicate\":1,\"reorder_window\":3,\"delay_ms\":0,\"drop_probability\":0.1,
                                                 \"drop_next\":1,\"max_attempts\":5,\"retry_backoff_ms\":100,
                                                 \"redeliver_after_ms\":2000}: a lost delivery is queued again later
  POST   /_fake/webhook/hold                     queue deliveries instead of sending them
  POST   /_fake/webhook/release                  send what was held
  POST   /_fake/events/:id/resend                deliver an event again
  POST   /_fake/idempotency                      {\"retention_secs\":86400}: how long keys are remembered
  POST   /_fake/payment_intents/:id/confirm      the customer pays: {\"payment_method\":\"pm_card_visa\"} (the default),
                                                 pm_card_chargeDeclined, pm_card_authenticationRequired, ...
  POST   /_fake/payment_intents/:id/authenticate {\"succeed\":true}: finish (or fail) 3-D Secure
  POST   /_fake/checkout/sessions/:id/pay        the customer pays a Checkout Session: {\"payment_method\":\"pm_card_visa\"}
                                                 or {\"delayed\":true} (bank debit: complete, unpaid until settled);
                                                 subscription mode: {\"payment_method\":..,\"test_clock\":\"clock_..\"}
  POST   /_fake/checkout/sessions/:id/settle     {\"succeed\":true|false}: a delayed payment settles or fails
  POST   /_fake/checkout/sessions/:id/abandon    the customer leaves: the session expires now
  GET    /_fake/api_version                      the account's API version (events are rendered in it)
  POST   /_fake/api_version                      {\"api_version\":\"2025-03-31.basil\"}: switch the Billing shapes at runtime
  GET    /_fake/billing                          the retry schedule of failed subscription payments
  POST   /_fake/billing                          {\"retry_days\":[3,5,7],\"after_retries\":\"canceled\",\"mark_uncollectible\":false}
                                                 (after_retries: canceled, unpaid or past_due)
";

pub fn handle(shared: &Arc<Shared>, request: &Incoming) -> HttpResponse {
    let reply = match route(shared, request) {
        Ok(value) => Reply::ok(value.into()),
        Err(error) => Reply::error(&error),
    };
    reply.into_response(&request.request_id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    advance_secs: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FaultsBody {
    Many { rules: Vec<FaultRule> },
    One(FaultRule),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitBody {
    per_second: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmBody {
    #[serde(default = "visa")]
    payment_method: String,
}

fn visa() -> String {
    "pm_card_visa".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthenticateBody {
    #[serde(default = "yes")]
    succeed: bool,
}

fn yes() -> bool {
    true
}

/// `{"payment_method":"pm_card_visa"}` (the default) or `{"delayed":true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutPayBody {
    payment_method: Option<String>,
    #[serde(default)]
    delayed: bool,
    /// Subscription mode: the test clock the new customer lives on.
    test_clock: Option<String>,
}

impl CheckoutPayBody {
    fn payment(self) -> Result<CheckoutPayment, ApiError> {
        match (self.payment_method, self.delayed) {
            (Some(_), true) => Err(ApiError::invalid_request(
                "Give either payment_method or delayed, not both.",
            )),
            (None, true) => Ok(CheckoutPayment::Delayed),
            (pm, false) => Ok(CheckoutPayment::Card(pm.unwrap_or_else(visa))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiVersionBody {
    api_version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    retention_secs: i64,
}

fn route(shared: &Shared, request: &Incoming) -> Result<Value, ApiError> {
    let rest = request.path.strip_prefix("/_fake").unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["ledger"]) => {
            let lists = request.query.as_deref() != Some("lists=false");
            to_value(&shared.ledger(lists))
        }
        ("POST", ["reset"]) => {
            shared.reset();
            Ok(json!({ "reset": true }))
        }
        ("GET", ["clock"]) => Ok(clock(shared)),
        ("POST", ["clock"]) => {
            let body: ClockBody = body(request)?;
            shared.advance_clock(body.advance_secs);
            Ok(clock(shared))
        }
        ("GET", ["faults"]) => Ok(json!({ "rules": shared.faults() })),
        ("POST", ["faults"]) => {
            let rules = match body(request)? {
                FaultsBody::Many { rules } => rules,
                FaultsBody::One(rule) => vec![rule],
            };
            let mut ids = Vec::new();
            for rule in rules {
                ids.push(
                    shared
                        .add_fault(rule)
                        .map_err(|e| ApiError::invalid_request(e.to_string()))?,
                );
            }
            Ok(json!({ "ids": ids }))
        }
        ("DELETE", ["faults"]) => {
            shared.clear_faults();
            Ok(json!({ "cleared": true }))
        }
        ("POST", ["seed"]) => {
            let seed: SeedRequest = body(request)?;
            let report = shared
                .seed(&seed)
                .map_err(|e| ApiError::invalid_request(e.to_string()))?;
            to_value(&report)
        }
        ("GET", ["rate_limit"]) => Ok(json!({ "per_second": shared.rate_limit() })),
        ("POST", ["rate_limit"]) => {
            let body: RateLimitBody = body(request)?;
            shared.set_rate_limit(body.per_second.filter(|n| *n > 0));
            Ok(json!({ "per_second": shared.rate_limit() }))
        }
        ("GET", ["webhook"]) => Ok(webhook(shared)),
        ("POST", ["webhook"]) => {
            let given: WebhookEndpoint = body(request)?;
            let endpoint = WebhookEndpoint::new(given.url, given.secret)
                .map_err(|e| ApiError::invalid_request(e.to_string()))?;
            shared.set_webhook(Some(endpoint));
            Ok(webhook(shared))
        }
        ("DELETE", ["webhook"]) => {
            shared.set_webhook(None);
            Ok(webhook(shared))
        }
        ("POST", ["webhook", "options"]) => {
            let patch: DeliveryOptionsPatch = body(request)?;
            let options = shared
                .update_webhook_options(&patch)
                .map_err(|e| ApiError::invalid_request(e.to_string()))?;
            to_value(&options)
        }
        ("POST", ["webhook", "hold"]) => {
            shared.hold_webhooks();
            Ok(json!({ "holding": true }))
        }
        ("POST", ["webhook", "release"]) => Ok(json!({ "released": shared.release_webhooks() })),
        ("POST", ["events", id, "resend"]) => {
            shared.resend_event(id)?;
            Ok(json!({ "resent": id }))
        }
        ("POST", ["payment_intents", id, "confirm"]) => {
            let body: ConfirmBody = body(request)?;
            shared.confirm(id, &body.payment_method)
        }
        ("POST", ["payment_intents", id, "authenticate"]) => {
            let body: AuthenticateBody = body(request)?;
            shared.authenticate(id, body.succeed)
        }
        ("POST", ["checkout", "sessions", id, "pay"]) => {
            let mut body: CheckoutPayBody = body(request)?;
            match body.test_clock.take() {
                Some(clock) => {
                    let pm = body.payment_method.take().unwrap_or_else(visa);
                    if body.delayed {
                        return Err(ApiError::invalid_request(
                            "Give either test_clock (a subscription paid by card) or delayed, not both.",
                        ));
                    }
                    shared.pay_subscription_checkout(id, &pm, Some(&clock))
                }
                None => shared.pay_checkout(id, &body.payment()?),
            }
        }
        ("GET", ["api_version"]) => Ok(json!({ "api_version": shared.api_version() })),
        ("POST", ["api_version"]) => {
            let body: ApiVersionBody = body(request)?;
            shared.set_api_version(&body.api_version)?;
            Ok(json!({ "api_version": shared.api_version() }))
        }
        ("GET", ["billing"]) => to_value(&shared.billing()),
        ("POST", ["billing"]) => {
            let settings: BillingSettings = body(request)?;
            shared
                .set_billing(settings)
                .map_err(ApiError::invalid_request)?;
            to_value(&shared.billing())
        }
        ("POST", ["checkout", "sessions", id, "settle"]) => {
            let body: AuthenticateBody = body(request)?;
            shared.settle_checkout(id, body.succeed)
        }
        ("POST", ["checkout", "sessions", id, "abandon"]) => shared.abandon_checkout(id),
        ("POST", ["idempotency"]) => {
            let body: RetentionBody = body(request)?;
            if body.retention_secs < 1 {
                return Err(ApiError::invalid_request(
                    "retention_secs must be at least 1",
                ));
            }
            shared.set_idempotency_retention(body.retention_secs);
            Ok(json!({ "retention_secs": body.retention_secs }))
        }
        _ => Err(ApiError::unrecognized_url(
            request.method.as_str(),
            &request.path,
        )),
    }
}

/// Parses a JSON body; an empty body reads as `{}`.
fn body<T: DeserializeOwned>(request: &Incoming) -> Result<T, ApiError> {
    let bytes: &[u8] = if request.body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &request.body
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_request(format!("Invalid JSON body: {e}")))
}

fn to_value<T: Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::invalid_request(e.to_string()))
}

fn clock(shared: &Shared) -> Value {
    json!({ "now": shared.clock.now(), "offset_secs": shared.clock.offset_secs() })
}

fn webhook(shared: &Shared) -> Value {
    json!({
        "url": shared.webhook().map(|w| w.url),
        "options": shared.webhook_options(),
    })
}
