//! The control API under `/_fake/` (no API key: the fake listens on loopback for tests and the
//! demo). The table of endpoints is in the crate documentation.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::checkout_flow::CheckoutPayment;
use crate::error::ApiError;
use crate::faults::FaultRule;
use crate::pipeline::{HttpResponse, Incoming, Reply};
use crate::seed::SeedRequest;
use crate::shared::Shared;
use crate::webhooks::{DeliveryOptionsPatch, WebhookEndpoint};

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
            let body: CheckoutPayBody = body(request)?;
            shared.pay_checkout(id, &body.payment()?)
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
