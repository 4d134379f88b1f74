//! The worker's reading of Stripe's answers (`pgpay_worker::stripe`): the headers that drive a
//! retry (`Stripe-Should-Retry`, `Retry-After`, `Idempotent-Replayed`), the status and the body,
//! turned into complete / retry / fail.
//!
//! Input: `<status> <attempt>` / header lines `name: value` up to an empty line / body (the rest).
//! Checks: only a 2xx with a JSON object completes; a 2xx never fails; a failure carries an
//! error object; a delay never exceeds the policy's bounds; an error text stays short.

use std::time::Duration;

use pgpay_worker::stripe::{decide, Decision, RetryPolicy, StripeResponse};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::{number, text, Fields};

pub fn run(data: &[u8]) {
    let mut fields = Fields::new(data);
    let first = text(fields.line()).into_owned();
    let mut first = first.split(' ');
    let status: u16 = number(first.next().unwrap_or("").as_bytes(), 200);
    let attempt: i32 = number(first.next().unwrap_or("").as_bytes(), 1);
    let mut headers = HeaderMap::new();
    loop {
        let line = fields.line();
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let body = fields.rest().to_vec();

    let answer = StripeResponse::from_parts(status, &headers, body.clone());
    assert_eq!(answer.status, status);
    let policy = RetryPolicy::DEFAULT;
    let mut rng = fastrand::Rng::with_seed(u64::from(status));
    let is_2xx = (200..300).contains(&status);
    let object = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(Value::is_object);
    match decide(Ok(answer), attempt, &policy, &mut rng) {
        Decision::Complete {
            http_status,
            response,
            ..
        } => {
            assert!(is_2xx && http_status == status);
            assert_eq!(Some(response), object);
        }
        Decision::Retry {
            http_status,
            error,
            delay,
            ..
        } => {
            assert_eq!(http_status, Some(status));
            assert!(!is_2xx || object.is_none(), "a 2xx JSON object was retried");
            let bound: Duration = policy.max.max(policy.retry_after_cap);
            assert!(delay <= bound, "delay {delay:?}");
            assert!(
                error.len() <= 1000 + '…'.len_utf8(),
                "{} bytes",
                error.len()
            );
        }
        Decision::Fail { http_status, error } => {
            assert!(!is_2xx, "a 2xx failed");
            assert_eq!(http_status, Some(status));
            assert!(error["error"].is_object());
        }
    }
}
