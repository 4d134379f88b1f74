//! The one place where Stripe's answer (or its absence) becomes a decision: complete,
//! retry or fail. The outbox writes the decision back; the reader acts on it.
//!
//! Rules:
//! - 2xx: done; for a command, the body goes to `pay.complete_outbox`.
//! - `Stripe-Should-Retry: true` / `false` on a non-2xx answer wins over the status code.
//! - 409 (idempotency key in flight), 429, 5xx: retry.
//! - No answer (timeout, connection error, broken body): retry — the Idempotency-Key makes
//!   re-sending safe whether or not Stripe acted.
//! - 1xx/3xx (not something Stripe sends; a proxy in the way?): retry rather than turn a
//!   payment into `create_failed` on an answer that did not come from Stripe.
//! - A 2xx whose body is not JSON: retry (the same key replays the stored answer, which a
//!   broken proxy in between may not mangle next time).
//! - Any other 4xx: permanent; Stripe's error JSON goes to `pay.fail_outbox`.
//!
//! Retry delays: full jitter from the row's attempt number, with `Retry-After` as a floor
//! (clamped), see `RetryPolicy`.

use std::time::Duration;

use serde_json::{json, Value};

use super::backoff::RetryPolicy;
use super::client::{SendError, StripeResponse};
use crate::error_chain::ErrorChain;

/// What an HTTP status (with Stripe's hint header) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Record the answer as the command's result.
    Complete,
    /// Try again later with the same key.
    Retry(RetryReason),
    /// Give up: record Stripe's error.
    Fail,
}

/// Why a command is retried (the `reason` label of `pgpay_worker_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// `Stripe-Should-Retry: true`.
    ShouldRetry,
    /// 409: another request with the same key is still in flight at Stripe.
    Conflict,
    /// 429: rate limited.
    RateLimited,
    /// 5xx.
    ServerError,
    /// 1xx/3xx: not an answer Stripe gives.
    UnexpectedStatus,
    /// 2xx with a body that is not JSON.
    InvalidBody,
    /// No answer in time.
    Timeout,
    /// No connection.
    Connect,
    /// Broken connection or body.
    Transport,
    /// The lookup of a create past Stripe's key retention did not work out.
    LookupFailed,
}

impl RetryReason {
    /// Stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ShouldRetry => "should_retry",
            RetryReason::Conflict => "http_409",
            RetryReason::RateLimited => "http_429",
            RetryReason::ServerError => "http_5xx",
            RetryReason::UnexpectedStatus => "unexpected_status",
            RetryReason::InvalidBody => "invalid_body",
            RetryReason::Timeout => "timeout",
            RetryReason::Connect => "connect",
            RetryReason::Transport => "transport",
            RetryReason::LookupFailed => "lookup_failed",
        }
    }
}

/// Classifies a status code and Stripe's `Stripe-Should-Retry` header.
pub fn classify_status(status: u16, should_retry: Option<bool>) -> Verdict {
    if (200..300).contains(&status) {
        // A success is a success: Stripe acted, and its answer must reach the database.
        return Verdict::Complete;
    }
    match should_retry {
        Some(true) => return Verdict::Retry(RetryReason::ShouldRetry),
        Some(false) => return Verdict::Fail,
        None => {}
    }
    match status {
        409 => Verdict::Retry(RetryReason::Conflict),
        429 => Verdict::Retry(RetryReason::RateLimited),
        400..=499 => Verdict::Fail,
        500..=599 => Verdict::Retry(RetryReason::ServerError),
        _ => Verdict::Retry(RetryReason::UnexpectedStatus),
    }
}

/// What one attempt comes to. For an outbox command each variant is one of the fenced
/// write-backs: `pay.complete_outbox`, `pay.retry_outbox`, `pay.fail_outbox`.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Stripe acted: its answer is the result.
    Complete {
        /// HTTP status of the answer.
        http_status: u16,
        /// The answer's JSON body.
        response: Value,
        /// Stripe replayed a stored answer for this key.
        replayed: bool,
    },
    /// Try again after `delay` (same Idempotency-Key).
    Retry {
        /// HTTP status, `None` when there was no answer.
        http_status: Option<u16>,
        /// Short description for `last_error` (no bodies, no keys).
        error: String,
        /// Delay before the next attempt.
        delay: Duration,
        /// Why (the `reason` label of `pgpay_worker_retries_total`).
        reason: RetryReason,
    },
    /// Stripe refused for good: record its error.
    Fail {
        /// HTTP status, `None` for a command that was never sent (malformed).
        http_status: Option<u16>,
        /// Stripe's error object, or one of ours in the same shape.
        error: Value,
    },
}

/// The classification boundary: turns the result of one attempt into its decision.
pub fn decide(
    result: Result<StripeResponse, SendError>,
    attempt: i32,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Decision {
    let resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            let reason = match &err {
                SendError::Timeout(_) => RetryReason::Timeout,
                SendError::Connect(_) => RetryReason::Connect,
                SendError::Transport(_) | SendError::BodyTooLarge => RetryReason::Transport,
            };
            return Decision::Retry {
                http_status: None,
                error: truncate(ErrorChain(&err).to_string()),
                delay: policy.delay(attempt, None, rng),
                reason,
            };
        }
    };
    let body: Option<Value> = serde_json::from_slice(&resp.body).ok();
    match classify_status(resp.status, resp.should_retry) {
        // complete_outbox takes the object Stripe answered; anything else is not Stripe.
        Verdict::Complete => match body.filter(Value::is_object) {
            Some(response) => Decision::Complete {
                http_status: resp.status,
                response,
                replayed: resp.replayed,
            },
            None => Decision::Retry {
                http_status: Some(resp.status),
                error: format!(
                    "HTTP {} with a body that is not a JSON object ({} bytes)",
                    resp.status,
                    resp.body.len()
                ),
                delay: policy.delay(attempt, resp.retry_after, rng),
                reason: RetryReason::InvalidBody,
            },
        },
        Verdict::Retry(reason) => Decision::Retry {
            http_status: Some(resp.status),
            error: truncate(describe_error(resp.status, body.as_ref(), resp.body.len())),
            delay: policy.delay(attempt, resp.retry_after, rng),
            reason,
        },
        Verdict::Fail => Decision::Fail {
            http_status: Some(resp.status),
            error: match body {
                Some(v) if v.get("error").is_some_and(Value::is_object) => v,
                _ => json!({"error": {
                    "type": "api_error",
                    "message": format!(
                        "HTTP {} without Stripe error JSON ({} bytes)",
                        resp.status,
                        resp.body.len()
                    ),
                }}),
            },
        },
    }
}

/// `HTTP 429 rate_limit: Too many requests` — type, code and message from Stripe's error
/// object, nothing else of the body.
fn describe_error(status: u16, body: Option<&Value>, len: usize) -> String {
    let err = body.and_then(|b| b.get("error"));
    let field = |k: &str| err.and_then(|e| e.get(k)).and_then(Value::as_str);
    match (field("type"), field("code"), field("message")) {
        (None, None, None) => format!("HTTP {status} ({len} bytes, no Stripe error object)"),
        (t, c, m) => {
            let mut s = format!("HTTP {status}");
            for part in [t, c].into_iter().flatten() {
                s.push(' ');
                s.push_str(part);
            }
            if let Some(m) = m {
                s.push_str(": ");
                s.push_str(m);
            }
            s
        }
    }
}

fn truncate(mut s: String) -> String {
    const MAX: usize = 1000;
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(
        status: u16,
        should_retry: Option<bool>,
        retry_after: Option<u64>,
        body: &str,
    ) -> StripeResponse {
        StripeResponse {
            status,
            should_retry,
            retry_after: retry_after.map(Duration::from_secs),
            replayed: false,
            request_id: None,
            body: body.as_bytes().to_vec(),
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum K {
        Complete,
        Retry,
        Fail,
    }

    #[test]
    fn status_by_should_retry_table() {
        use Verdict::*;
        let r = |reason| Retry(reason);
        // (status, Stripe-Should-Retry, expected)
        let table: &[(u16, Option<bool>, Verdict)] = &[
            (200, None, Complete),
            (200, Some(true), Complete),
            (200, Some(false), Complete),
            (201, None, Complete),
            (400, None, Fail),
            (400, Some(true), r(RetryReason::ShouldRetry)),
            (400, Some(false), Fail),
            (401, None, Fail),
            (402, None, Fail),
            (402, Some(true), r(RetryReason::ShouldRetry)),
            (403, None, Fail),
            (404, None, Fail),
            (409, None, r(RetryReason::Conflict)),
            (409, Some(true), r(RetryReason::ShouldRetry)),
            (409, Some(false), Fail),
            (429, None, r(RetryReason::RateLimited)),
            (429, Some(true), r(RetryReason::ShouldRetry)),
            (429, Some(false), Fail),
            (500, None, r(RetryReason::ServerError)),
            (500, Some(true), r(RetryReason::ShouldRetry)),
            (500, Some(false), Fail),
            (502, None, r(RetryReason::ServerError)),
            (503, None, r(RetryReason::ServerError)),
            (503, Some(false), Fail),
            (504, None, r(RetryReason::ServerError)),
            (302, None, r(RetryReason::UnexpectedStatus)),
            (302, Some(false), Fail),
            (101, None, r(RetryReason::UnexpectedStatus)),
        ];
        for &(status, sr, want) in table {
            assert_eq!(
                classify_status(status, sr),
                want,
                "status {status}, should_retry {sr:?}"
            );
        }
    }

    #[test]
    fn decide_table_with_retry_after() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            retry_after_cap: Duration::from_secs(60),
        };
        let err_body = r#"{"error":{"type":"invalid_request_error","code":"amount_too_small","message":"Amount must be at least $0.50"}}"#;
        // (status, should_retry, retry_after secs, body, expected kind, min delay secs)
        type Row<'a> = (u16, Option<bool>, Option<u64>, &'a str, K, u64);
        let table: &[Row] = &[
            (200, None, None, r#"{"id":"pi_1"}"#, K::Complete, 0),
            (200, None, Some(30), r#"{"id":"pi_1"}"#, K::Complete, 0),
            (200, None, None, "not json", K::Retry, 0),
            (200, None, None, "[1, 2]", K::Retry, 0),
            (400, None, None, err_body, K::Fail, 0),
            (400, None, Some(5), err_body, K::Fail, 0),
            (400, Some(true), Some(5), err_body, K::Retry, 5),
            (409, None, None, err_body, K::Retry, 0),
            (409, None, Some(3), err_body, K::Retry, 3),
            (429, None, None, err_body, K::Retry, 0),
            (429, None, Some(7), err_body, K::Retry, 7),
            (429, None, Some(3600), err_body, K::Retry, 60),
            (429, Some(false), Some(7), err_body, K::Fail, 0),
            (500, None, None, "", K::Retry, 0),
            (500, None, Some(2), "<html>", K::Retry, 2),
            (500, Some(false), None, err_body, K::Fail, 0),
            (503, Some(true), Some(1), err_body, K::Retry, 1),
        ];
        let mut rng = fastrand::Rng::with_seed(42);
        for &(status, sr, ra, body, want, min_delay) in table {
            for attempt in [1, 3, 20] {
                let got = decide(Ok(resp(status, sr, ra, body)), attempt, &policy, &mut rng);
                let ctx = format!("status {status} sr {sr:?} ra {ra:?} attempt {attempt}: {got:?}");
                match got {
                    Decision::Complete { http_status, .. } => {
                        assert_eq!(want, K::Complete, "{ctx}");
                        assert_eq!(http_status, status);
                    }
                    Decision::Retry {
                        delay, http_status, ..
                    } => {
                        assert_eq!(want, K::Retry, "{ctx}");
                        assert_eq!(http_status, Some(status));
                        let floor = Duration::from_secs(min_delay);
                        let top = floor.max(policy.ceiling(attempt));
                        assert!(delay >= floor && delay <= top, "{ctx}");
                    }
                    Decision::Fail { error, http_status } => {
                        assert_eq!(want, K::Fail, "{ctx}");
                        assert_eq!(http_status, Some(status));
                        assert!(error["error"].is_object(), "{ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn fail_keeps_stripes_error_json_and_wraps_others() {
        let body = r#"{"error":{"type":"card_error","code":"card_declined","message":"Declined"}}"#;
        let mut rng = fastrand::Rng::with_seed(1);
        let got = decide(
            Ok(resp(402, None, None, body)),
            1,
            &RetryPolicy::default(),
            &mut rng,
        );
        assert_eq!(
            got,
            Decision::Fail {
                http_status: Some(402),
                error: serde_json::from_str(body).unwrap()
            }
        );
        let got = decide(
            Ok(resp(404, None, None, "nope")),
            1,
            &RetryPolicy::default(),
            &mut rng,
        );
        match got {
            Decision::Fail { error, .. } => {
                assert_eq!(error["error"]["type"], "api_error");
                assert!(!error.to_string().contains("nope"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_error_text_is_short_and_has_no_body() {
        let body = r#"{"error":{"type":"api_error","message":"Try again"},"secretish":"payload"}"#;
        let mut rng = fastrand::Rng::with_seed(1);
        match decide(
            Ok(resp(500, None, None, body)),
            1,
            &RetryPolicy::default(),
            &mut rng,
        ) {
            Decision::Retry { error, reason, .. } => {
                assert_eq!(error, "HTTP 500 api_error: Try again");
                assert_eq!(reason, RetryReason::ServerError);
            }
            other => panic!("{other:?}"),
        }
        match decide(
            Ok(resp(502, None, None, "<html>bad gateway</html>")),
            1,
            &RetryPolicy::default(),
            &mut rng,
        ) {
            Decision::Retry { error, .. } => {
                assert_eq!(error, "HTTP 502 (24 bytes, no Stripe error object)")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(truncate("é".repeat(800)).chars().count(), 501);
    }

    #[test]
    fn replayed_answers_are_flagged() {
        let mut r = resp(200, None, None, r#"{"id":"pi_1"}"#);
        r.replayed = true;
        let mut rng = fastrand::Rng::with_seed(1);
        assert!(matches!(
            decide(Ok(r), 2, &RetryPolicy::default(), &mut rng),
            Decision::Complete { replayed: true, .. }
        ));
    }
}
