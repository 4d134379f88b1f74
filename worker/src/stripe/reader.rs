//! Reads from Stripe (GET one object, page through a list) with the worker's rate limiter,
//! retries and classification ([`super::classify::decide`]). Reconciliation, the refresh of
//! stuck payments and anything else that reads goes through here.

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::backoff::RetryPolicy;
use super::classify::{decide, Decision};
use super::client::StripeClient;
use super::ratelimit::RateLimiter;
use super::request::StripeRequest;
use crate::metrics::{Metrics, StripePhase};

/// Objects per list page (Stripe's maximum).
pub const PAGE_SIZE: u32 = 100;
/// Attempts per request before the reader gives up (with backoff between them).
pub const MAX_ATTEMPTS: i32 = 8;

/// Why a read did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Stripe refused a request for good (a 4xx other than 409/429).
    #[error("Stripe refused {what}: HTTP {status}: {message}")]
    Stripe {
        /// Which request.
        what: &'static str,
        /// HTTP status (0: none).
        status: u16,
        /// Stripe's error message.
        message: String,
    },
    /// Stripe refused the API key (401): never retried.
    #[error(transparent)]
    Unauthorized(#[from] super::client::Unauthorized),
    /// A retryable failure outlasted [`MAX_ATTEMPTS`].
    #[error("gave up on {what} after {MAX_ATTEMPTS} attempts: {last_error}")]
    RetriesExhausted {
        /// Which request.
        what: &'static str,
        /// The last error.
        last_error: String,
    },
    /// Stripe's answer was not the list it should be.
    #[error("Stripe's answer to {0} is not a list")]
    NotAList(&'static str),
    /// Shutdown was requested.
    #[error("canceled")]
    Canceled,
}

/// A GET answer: 2xx JSON, or a 404.
pub enum Got {
    /// The object.
    Found(Value),
    /// Stripe answered 404.
    NotFound,
}

/// One page of a list, newest first.
pub struct Page {
    /// The objects.
    pub data: Vec<Value>,
    /// The cursor for the next page: the last object's id, if Stripe says there is more.
    pub next: Option<String>,
}

/// Reads from Stripe. Shares the rate limiter with the dispatcher inside `run`, so both
/// together stay under the limit.
pub struct StripeReader<'a> {
    stripe: &'a StripeClient,
    limiter: &'a RateLimiter,
    retry: &'a RetryPolicy,
    cancel: &'a CancellationToken,
    /// Where each request is counted (`pgpay_worker_stripe_requests_total{phase}`); `None`
    /// for the one-shot CLI, which has no metrics endpoint.
    metrics: Option<(&'a Metrics, StripePhase)>,
}

impl<'a> StripeReader<'a> {
    pub(crate) fn new(
        stripe: &'a StripeClient,
        limiter: &'a RateLimiter,
        retry: &'a RetryPolicy,
        cancel: &'a CancellationToken,
    ) -> Self {
        Self {
            stripe,
            limiter,
            retry,
            cancel,
            metrics: None,
        }
    }

    /// Counts every request (each attempt, whatever its answer) in `metrics` under `phase`.
    pub(crate) fn counted(mut self, metrics: &'a Metrics, phase: StripePhase) -> Self {
        self.metrics = Some((metrics, phase));
        self
    }

    /// Whether shutdown was requested.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// GET `path` with `params`; retries what is retryable, up to [`MAX_ATTEMPTS`].
    pub(crate) async fn get(
        &self,
        what: &'static str,
        path: String,
        params: Vec<(String, String)>,
    ) -> Result<Got, ReadError> {
        let req = StripeRequest::get(path, params);
        let url = self.stripe.url_for(&req).map_err(|_| ReadError::Stripe {
            what,
            status: 0,
            message: "the path does not form a URL on the API base".into(),
        })?;
        let mut rng = fastrand::Rng::new();
        let mut attempt = 1;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(ReadError::Canceled),
                _ = self.limiter.acquire() => {}
            }
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(ReadError::Canceled),
                r = self.stripe.send(&req, url.clone(), self.stripe.request_timeout()) => r,
            };
            if let Some((metrics, phase)) = self.metrics {
                let (status, replayed) = match &result {
                    Ok(resp) => (Some(resp.status), resp.replayed),
                    Err(_) => (None, false),
                };
                metrics.stripe_request(phase, req.method.as_str(), &req.path, status, replayed);
            }
            if matches!(&result, Ok(resp) if resp.status == 401) {
                return Err(ReadError::Unauthorized(self.stripe.unauthorized()));
            }
            match decide(result, attempt, self.retry, &mut rng) {
                Decision::Complete { response, .. } => return Ok(Got::Found(response)),
                Decision::Fail {
                    http_status: Some(404),
                    ..
                } => return Ok(Got::NotFound),
                Decision::Fail { http_status, error } => {
                    return Err(ReadError::Stripe {
                        what,
                        status: http_status.unwrap_or(0),
                        message: error["error"]["message"]
                            .as_str()
                            .unwrap_or("no message")
                            .chars()
                            .take(500)
                            .collect(),
                    })
                }
                Decision::Retry { error, delay, .. } => {
                    if attempt >= MAX_ATTEMPTS {
                        return Err(ReadError::RetriesExhausted {
                            what,
                            last_error: error,
                        });
                    }
                    warn!(what, attempt, %error, retry_in = ?delay, "Stripe request failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(ReadError::Canceled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One page of a list endpoint (`/v1/payment_intents`, `/v1/events`, ...) created at or
    /// after `created_gte`, newest first.
    pub(crate) async fn list_page(
        &self,
        what: &'static str,
        path: &str,
        created_gte: i64,
        starting_after: Option<&str>,
    ) -> Result<Page, ReadError> {
        self.list_page_with(what, path, &[], Some(created_gte), starting_after)
            .await
    }

    /// [`StripeReader::list_page`] with filters of the endpoint (`status=all` for
    /// subscriptions, which Stripe otherwise lists without the canceled ones), and without a
    /// `created` bound for lists that take none (test clocks).
    pub(crate) async fn list_page_with(
        &self,
        what: &'static str,
        path: &str,
        filters: &[(&str, &str)],
        created_gte: Option<i64>,
        starting_after: Option<&str>,
    ) -> Result<Page, ReadError> {
        let mut params = vec![("limit".to_owned(), PAGE_SIZE.to_string())];
        if let Some(gte) = created_gte {
            params.push(("created[gte]".to_owned(), gte.to_string()));
        }
        params.extend(
            filters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        if let Some(after) = starting_after {
            params.push(("starting_after".to_owned(), after.to_owned()));
        }
        let Got::Found(mut body) = self.get(what, path.to_owned(), params).await? else {
            return Err(ReadError::Stripe {
                what,
                status: 404,
                message: "the list endpoint does not exist".into(),
            });
        };
        let has_more = body["has_more"].as_bool().unwrap_or(false);
        match body.get_mut("data").map(Value::take) {
            Some(Value::Array(data)) => {
                let next = next_cursor(&data, has_more);
                Ok(Page { data, next })
            }
            _ => Err(ReadError::NotAList(what)),
        }
    }
}

/// The cursor for the next page: the last object's id, if the page says there is more.
fn next_cursor(data: &[Value], has_more: bool) -> Option<String> {
    if !has_more {
        return None;
    }
    data.last()
        .and_then(|o| o["id"].as_str())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cursor_is_the_last_id_only_when_there_is_more() {
        let data = vec![json!({"id": "pi_3"}), json!({"id": "pi_2"})];
        assert_eq!(next_cursor(&data, true).as_deref(), Some("pi_2"));
        assert_eq!(next_cursor(&data, false), None);
        assert_eq!(next_cursor(&[], true), None);
        assert_eq!(next_cursor(&[json!({"no": "id"})], true), None);
    }
}
