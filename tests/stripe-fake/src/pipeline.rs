//! One API request, in Stripe's order: authenticate, route, count; then the injected faults and
//! the emulated rate limit; then the idempotency key; then the work and the storing of its answer
//! under one lock; then, if a fault says so, the answer is lost on the way back.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{HeaderMap, Method, Response, StatusCode};
use serde_json::Value;

use crate::api;
use crate::api_version;
use crate::config::{redact_key, API_VERSION};
use crate::error::{shorten, ApiError};
use crate::form::{self, FormError, Params};
use crate::idempotency::{Begin, Fingerprint, StoredResponse, MAX_KEY_CHARS};
use crate::list::Body;
use crate::routes::Route;
use crate::shared::Shared;
use crate::state::{Ctx, State};

pub type HttpResponse = Response<Full<Bytes>>;

/// A request, read whole.
#[derive(Debug)]
pub struct Incoming {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_id: String,
}

/// Returned to hyper to close the connection without an answer.
#[derive(Debug, thiserror::Error)]
pub enum Abort {
    #[error("connection reset by an injected fault")]
    Reset,
    #[error("answer dropped after commit by an injected fault")]
    DroppedAfterCommit,
}

pub async fn handle(shared: &Arc<Shared>, request: Incoming) -> Result<HttpResponse, Abort> {
    let reply = run(shared, &request).await?;
    let account_version = shared.update(|s| {
        *s.counters.responses.entry(reply.status).or_default() += 1;
        s.api_version.clone()
    });
    let mut response = reply.into_response(&request.request_id);
    // The version the answer is rendered in: the request's, else the account's.
    let version = requested_version(&request).unwrap_or(account_version);
    if let Ok(value) = HeaderValue::from_str(&version) {
        response.headers_mut().insert("stripe-version", value);
    }
    Ok(response)
}

/// The request's `Stripe-Version` header, if it sent a well-formed one.
fn requested_version(request: &Incoming) -> Option<String> {
    let text = request.headers.get("stripe-version")?.to_str().ok()?.trim();
    api_version::validate(text).ok()?;
    Some(text.to_owned())
}

async fn run(shared: &Arc<Shared>, request: &Incoming) -> Result<Reply, Abort> {
    if let Err(error) = authenticate(&shared.config.api_key, &request.headers) {
        return Ok(Reply::error(&error));
    }
    let Some(route) = Route::find(&request.method, &request.path) else {
        return Ok(Reply::error(&ApiError::unrecognized_url(
            request.method.as_str(),
            &request.path,
        )));
    };
    let admitted = shared.update(|s| {
        *s.counters.requests.entry(route.template()).or_default() += 1;
        if !s.rate_limit.admit() {
            s.counters.rate_limited += 1;
            return None;
        }
        let fired = s.faults.fire(request.method.as_str(), &request.path);
        for action in &fired.actions {
            *s.counters.faults_fired.entry(action.as_str()).or_default() += 1;
        }
        Some(fired)
    });
    let Some(fired) = admitted else {
        return Ok(Reply::error(&ApiError::rate_limited(1)));
    };
    if fired.reset_connection {
        return Err(Abort::Reset);
    }
    if let Some(secs) = fired.rate_limit_secs {
        return Ok(Reply::error(&ApiError::rate_limited(secs)));
    }
    if fired.fail_before_commit {
        return Ok(Reply::error(&ApiError::internal_retryable()));
    }
    let (params, key) = match read_params(request).and_then(|p| Ok((p, idempotency_key(request)?)))
    {
        Ok(read) => read,
        Err(error) => return Ok(Reply::error(&error)),
    };
    if let Some(value) = request.headers.get("stripe-version") {
        let text = String::from_utf8_lossy(value.as_bytes());
        if let Err(error) = api_version::validate(text.trim()) {
            return Ok(Reply::error(&error));
        }
    }

    let mut guard = None;
    if let Some(key) = &key {
        let fingerprint = Fingerprint {
            method: request.method.to_string(),
            path: request.path.clone(),
            params: serde_json::to_string(&params).unwrap_or_default(),
        };
        let now = shared.clock.now();
        let begin = shared.update(|s| {
            let begin = s
                .idempotency
                .begin(&shared.config.api_key, key, fingerprint, now);
            match begin {
                Begin::Proceed(_) => {}
                Begin::Replay(_) => s.counters.replays += 1,
                Begin::Mismatch(_) => s.counters.conflicts += 1,
                Begin::InFlight(_) => s.counters.in_flight_409 += 1,
            }
            begin
        });
        match begin {
            Begin::Proceed(token) => {
                guard = Some(KeyGuard {
                    shared: shared.clone(),
                    key: key.clone(),
                    token,
                    settled: false,
                })
            }
            Begin::Replay(stored) => {
                if fired.drop_response_after_commit {
                    return Err(Abort::DroppedAfterCommit);
                }
                return Ok(Reply::replay(stored, key));
            }
            Begin::Mismatch(error) | Begin::InFlight(error) => {
                return Ok(Reply::error(&error).with_key(key))
            }
        }
    }

    if fired.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fired.latency_ms)).await;
    }
    let ctx = Ctx {
        now: shared.clock.now(),
        request_id: Some(request.request_id.clone()),
        idempotency_key: key.clone(),
        api_version: requested_version(request),
    };
    let reply = shared.update(|s| {
        let reply = match api::execute(s, &ctx, &route, params) {
            Ok(body) => Reply::ok(body),
            Err(error) => Reply::error(&error),
        };
        if let Some(guard) = guard.as_mut() {
            let answer = reply.storable.then(|| StoredResponse {
                status: reply.status,
                body: reply.body.clone(),
                request_id: request.request_id.clone(),
            });
            guard.settle(s, answer);
        }
        reply
    });
    if fired.drop_response_after_commit {
        return Err(Abort::DroppedAfterCommit);
    }
    Ok(match &key {
        Some(key) => reply.with_key(key),
        None => reply,
    })
}

/// Holds an idempotency key in flight. Requests run detached from their connection, so this only
/// matters if one is ever cut short (a panic, the runtime shutting down): the key is released
/// rather than left answering 409 forever.
struct KeyGuard {
    shared: Arc<Shared>,
    key: String,
    token: u64,
    settled: bool,
}

impl KeyGuard {
    fn settle(&mut self, state: &mut State, answer: Option<StoredResponse>) {
        state
            .idempotency
            .complete(&self.shared.config.api_key, &self.key, self.token, answer);
        self.settled = true;
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if !self.settled {
            let (api_key, key, token) = (&self.shared.config.api_key, &self.key, self.token);
            self.shared
                .update(|s| s.idempotency.complete(api_key, key, token, None));
        }
    }
}

fn authenticate(expected: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(api_key_of)
        .ok_or_else(|| {
            ApiError::unauthorized(
                "Invalid Authorization header: use Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY') or Basic auth with the key as the user name (curl -u YOUR_SECRET_KEY:).",
            )
        })?;
    if given != expected {
        return Err(ApiError::unauthorized(format!(
            "Invalid API Key provided: {}",
            redact_key(&given)
        )));
    }
    Ok(())
}

/// The API key of an `Authorization` header, as Stripe takes it: `Bearer <key>`, or HTTP Basic
/// with the key as the user name and no password (`curl -u sk_test_...:`).
fn api_key_of(header: &str) -> Option<String> {
    if let Some(key) = header.strip_prefix("Bearer ") {
        return Some(key.trim().to_string());
    }
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let credentials = String::from_utf8(decoded).ok()?;
    let (user, _password) = credentials.split_once(':').unwrap_or((&credentials, ""));
    Some(user.to_string())
}

fn read_params(request: &Incoming) -> Result<Params, ApiError> {
    let mut params = Params::default();
    if let Some(query) = &request.query {
        form::parse_into(&mut params, query.as_bytes()).map_err(form_error)?;
    }
    if request.method == Method::POST && !request.body.is_empty() {
        if let Some(content_type) = request.headers.get(CONTENT_TYPE) {
            let text = String::from_utf8_lossy(content_type.as_bytes());
            if !text
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
            {
                return Err(ApiError::invalid_request(format!(
                    "Invalid request: unsupported Content-Type {}. Stripe's API takes application/x-www-form-urlencoded bodies.",
                    shorten(&text)
                )));
            }
        }
        form::parse_into(&mut params, &request.body).map_err(form_error)?;
    }
    Ok(params)
}

fn form_error(error: FormError) -> ApiError {
    match error.param() {
        Some(param) => ApiError::invalid_param(param, error.to_string()),
        None => ApiError::invalid_request(error.to_string()),
    }
}

/// POSTs only: Stripe ignores the header on GET and DELETE.
fn idempotency_key(request: &Incoming) -> Result<Option<String>, ApiError> {
    if request.method != Method::POST {
        return Ok(None);
    }
    let Some(value) = request.headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| {
        ApiError::invalid_request("Invalid Idempotency-Key: it must be printable ASCII.")
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Ok(None);
    }
    if key.chars().count() > MAX_KEY_CHARS {
        return Err(ApiError::invalid_request(format!(
            "Invalid Idempotency-Key: keys can be at most {MAX_KEY_CHARS} characters long."
        )));
    }
    Ok(Some(key.to_owned()))
}

/// An answer on its way out.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    should_retry: Option<bool>,
    retry_after_secs: Option<u64>,
    /// Stored for idempotent replay: 2xx, and errors of requests that began executing, except
    /// 5xx and 429, which mean "try again".
    storable: bool,
    idempotency_key: Option<String>,
    original_request: Option<String>,
}

impl Reply {
    pub fn ok(body: Body) -> Reply {
        Reply {
            status: 200,
            body: body.into_bytes(),
            should_retry: None,
            retry_after_secs: None,
            storable: true,
            idempotency_key: None,
            original_request: None,
        }
    }

    pub fn error(error: &ApiError) -> Reply {
        Reply {
            status: error.status,
            body: to_bytes(&error.body()),
            should_retry: error.should_retry,
            retry_after_secs: error.retry_after_secs,
            storable: error.executed && error.status < 500 && error.status != 429,
            idempotency_key: None,
            original_request: None,
        }
    }

    fn replay(stored: StoredResponse, key: &str) -> Reply {
        Reply {
            status: stored.status,
            body: stored.body,
            should_retry: None,
            retry_after_secs: None,
            storable: false,
            idempotency_key: Some(key.to_owned()),
            original_request: Some(stored.request_id),
        }
    }

    fn with_key(mut self, key: &str) -> Reply {
        self.idempotency_key = Some(key.to_owned());
        self
    }

    pub fn into_response(self, request_id: &str) -> HttpResponse {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-store"),
        );
        headers.insert("stripe-version", HeaderValue::from_static(API_VERSION));
        let mut put = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        };
        put("request-id", request_id);
        if let Some(key) = &self.idempotency_key {
            put("idempotency-key", key);
        }
        if let Some(original) = &self.original_request {
            put("idempotent-replayed", "true");
            put("original-request", original);
        }
        if let Some(retry) = self.should_retry {
            put("stripe-should-retry", if retry { "true" } else { "false" });
        }
        if let Some(secs) = self.retry_after_secs {
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                headers.insert(RETRY_AFTER, value);
            }
        }
        response
    }
}

fn to_bytes(value: &Value) -> Bytes {
    // Serializing a Value cannot fail: its keys are strings.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

#[cfg(test)]
mod auth_tests {
    use super::api_key_of;

    #[test]
    fn bearer_and_basic_auth_carry_the_key() {
        let cases = [
            ("Bearer sk_test_123", Some("sk_test_123")),
            ("Bearer  sk_test_123 ", Some("sk_test_123")),
            // curl -u sk_test_123:  → "sk_test_123:" in base64
            ("Basic c2tfdGVzdF8xMjM6", Some("sk_test_123")),
            // without the colon, as some clients send it
            ("Basic c2tfdGVzdF8xMjM=", Some("sk_test_123")),
            ("Basic !!!", None),
            ("Token sk_test_123", None),
        ];
        for (header, expected) in cases {
            assert_eq!(api_key_of(header).as_deref(), expected, "{header}");
        }
    }
}
