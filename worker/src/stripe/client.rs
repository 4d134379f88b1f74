//! The HTTP side: one `reqwest` client for every request to Stripe (outbox commands and
//! reads).
//!
//! It never logs request or response bodies, the API key (its header value is marked
//! sensitive) or the Idempotency-Key. Redirects are not followed: Stripe does not send
//! them, and following one would forward a POST and its key somewhere unexpected.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;

use super::request::{encode_form, Method, StripeRequest};
use crate::secret::SecretString;

/// Stripe answers are small; anything bigger than this is not Stripe.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Everything the client needs to reach Stripe (or stripe-fake).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// `https://api.stripe.com`, or the fake's base URL in tests.
    pub api_base: Url,
    /// The secret (or restricted) API key.
    pub secret_key: SecretString,
    /// Pinned `Stripe-Version` header.
    pub api_version: String,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout (also bounded by the remaining lease at send time).
    pub request_timeout: Duration,
}

/// What came back from Stripe, with the headers that drive classification.
#[derive(Clone)]
pub struct StripeResponse {
    /// HTTP status.
    pub status: u16,
    /// `Stripe-Should-Retry`, when present and `true`/`false`.
    pub should_retry: Option<bool>,
    /// `Retry-After`, parsed (seconds or HTTP date), not yet clamped.
    pub retry_after: Option<Duration>,
    /// `Idempotent-Replayed: true`: Stripe answered from its idempotency store.
    pub replayed: bool,
    /// `Request-Id`, for correlating with Stripe's dashboard logs.
    pub request_id: Option<String>,
    /// The raw body (kept out of `Debug`).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for StripeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeResponse")
            .field("status", &self.status)
            .field("should_retry", &self.should_retry)
            .field("retry_after", &self.retry_after)
            .field("replayed", &self.replayed)
            .field("request_id", &self.request_id)
            .field("body", &format_args!("[{} bytes]", self.body.len()))
            .finish()
    }
}

/// A request that got no (complete) HTTP answer. All of these are retryable: the
/// Idempotency-Key makes re-sending safe whether or not Stripe acted on the request.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No answer within the request timeout.
    #[error("request to Stripe timed out")]
    Timeout(#[source] reqwest::Error),
    /// Could not open a connection.
    #[error("could not connect to Stripe")]
    Connect(#[source] reqwest::Error),
    /// The connection broke, or the answer was not valid HTTP.
    #[error("transport error talking to Stripe")]
    Transport(#[source] reqwest::Error),
    /// The answer was larger than [`MAX_RESPONSE_BYTES`].
    #[error("response body larger than {MAX_RESPONSE_BYTES} bytes")]
    BodyTooLarge,
}

impl SendError {
    fn from_reqwest(err: reqwest::Error) -> Self {
        // The URL can carry query parameters of GETs; keep it out of error messages.
        let err = err.without_url();
        if err.is_timeout() {
            SendError::Timeout(err)
        } else if err.is_connect() {
            SendError::Connect(err)
        } else {
            SendError::Transport(err)
        }
    }
}

/// Why the client could not be built (bad configuration).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key or version cannot be sent as a header.
    #[error("{0} contains characters that are not allowed in an HTTP header")]
    BadHeader(&'static str),
    /// reqwest refused to build a client (TLS backend setup).
    #[error("could not build the HTTP client")]
    Build(#[source] reqwest::Error),
}

/// Stripe answered 401: the key is not one this API knows. Nothing works until it is
/// changed, so this is never retried. The message names the API base, never the key (and
/// not Stripe's message either, which echoes part of the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Stripe refused the API key (HTTP 401 from {api_base}): STRIPE_SECRET_KEY is not a valid key for this API. A stripe-fake key needs STRIPE_API_BASE set to the fake's URL; a real key must be an active secret or restricted key of the account (Stripe dashboard, Developers, API keys)")]
pub struct Unauthorized {
    /// The configured API base (no credentials: `parse_api_base` refuses them).
    pub api_base: String,
}

/// Why a path could not be joined to the API base.
#[derive(Debug, thiserror::Error)]
#[error("path does not form a URL on the configured API base")]
pub struct BadUrl;

/// Sends [`StripeRequest`]s.
#[derive(Debug, Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: Url,
    request_timeout: Duration,
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const STRIPE_VERSION: HeaderName = HeaderName::from_static("stripe-version");

impl StripeClient {
    /// Builds the client: default headers (sensitive `Authorization`, `Stripe-Version`),
    /// rustls, timeouts, no redirects.
    pub fn new(config: &StripeConfig) -> Result<Self, ClientError> {
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", config.secret_key.expose()))
            .map_err(|_| ClientError::BadHeader("STRIPE_SECRET_KEY"))?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            STRIPE_VERSION,
            HeaderValue::from_str(&config.api_version)
                .map_err(|_| ClientError::BadHeader("Stripe-Version"))?,
        );
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .default_headers(headers)
            .user_agent(concat!("pgpay-worker/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base: config.api_base.clone(),
            request_timeout: config.request_timeout,
        })
    }

    /// The error for a 401 from this client's API base.
    pub fn unauthorized(&self) -> Unauthorized {
        Unauthorized {
            api_base: self.base.as_str().trim_end_matches('/').to_owned(),
        }
    }

    /// The configured request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The URL a request goes to: the API base followed by the path (and, for a GET or a DELETE,
    /// the parameters as a query string). Refuses anything that would leave the
    /// base's origin, so the API key is only ever sent where it was configured to go.
    pub fn url_for(&self, req: &StripeRequest) -> Result<Url, BadUrl> {
        let joined = format!("{}{}", self.base.as_str().trim_end_matches('/'), req.path);
        let mut url = Url::parse(&joined).map_err(|_| BadUrl)?;
        if url.origin() != self.base.origin() {
            return Err(BadUrl);
        }
        if req.method != Method::Post && !req.params.is_empty() {
            url.set_query(Some(&encode_form(&req.params)));
        }
        Ok(url)
    }

    /// Sends one request with the given timeout and reads the whole answer.
    pub async fn send(
        &self,
        req: &StripeRequest,
        url: Url,
        timeout: Duration,
    ) -> Result<StripeResponse, SendError> {
        let mut builder = self
            .http
            .request(req.method.as_reqwest(), url)
            .timeout(timeout);
        if req.method == Method::Post {
            builder = builder
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(encode_form(&req.params));
        }
        if let Some(key) = &req.idempotency_key {
            builder = builder.header(IDEMPOTENCY_KEY, key.as_str());
        }
        let mut resp = builder.send().await.map_err(SendError::from_reqwest)?;
        let status = resp.status().as_u16();
        let mut answer = StripeResponse::from_parts(status, resp.headers(), Vec::new());
        while let Some(chunk) = resp.chunk().await.map_err(SendError::from_reqwest)? {
            if answer.body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(SendError::BodyTooLarge);
            }
            answer.body.extend_from_slice(&chunk);
        }
        Ok(answer)
    }
}

impl StripeResponse {
    /// Reads the headers that drive classification from an answer's parts. Public so that the
    /// fuzz targets (`fuzz/`) reach the same code the client runs.
    pub fn from_parts(status: u16, headers: &HeaderMap, body: Vec<u8>) -> StripeResponse {
        let should_retry = header_str(headers, "stripe-should-retry").and_then(|v| {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            }
        });
        let retry_after = header_str(headers, "retry-after").and_then(parse_retry_after);
        let replayed = header_str(headers, "idempotent-replayed")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let request_id = header_str(headers, "request-id").map(str::to_owned);
        StripeResponse {
            status,
            should_retry,
            retry_after,
            replayed,
            request_id,
            body,
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `Retry-After: 7`, `Retry-After: 1.5` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::try_from_secs_f64(secs.min(86_400.0)).ok())
            .flatten();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> StripeClient {
        StripeClient::new(&StripeConfig {
            api_base: Url::parse(base).unwrap(),
            secret_key: SecretString::new("sk_test_x"),
            api_version: "2024-06-20".into(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn urls_stay_on_the_base_origin() {
        let c = client("https://api.stripe.com");
        let post = create();
        assert_eq!(
            c.url_for(&post).unwrap().as_str(),
            "https://api.stripe.com/v1/payment_intents"
        );
        let get = StripeRequest::get(
            "/v1/payment_intents/pi_1",
            vec![("expand[]".into(), "latest_charge".into())],
        );
        assert_eq!(
            c.url_for(&get).unwrap().as_str(),
            "https://api.stripe.com/v1/payment_intents/pi_1?expand%5B%5D=latest_charge"
        );
        // A base with a path prefix (a proxy) keeps its prefix.
        let c = client("http://127.0.0.1:9/stripe/");
        assert_eq!(
            c.url_for(&post).unwrap().as_str(),
            "http://127.0.0.1:9/stripe/v1/payment_intents"
        );
    }

    #[test]
    fn delete_sends_params_in_the_query() {
        let c = client("https://api.stripe.com");
        let delete = StripeRequest {
            method: Method::Delete,
            path: "/v1/subscriptions/sub_1".into(),
            params: vec![("prorate".into(), "false".into())],
            idempotency_key: Some("k".into()),
        };
        assert_eq!(
            c.url_for(&delete).unwrap().as_str(),
            "https://api.stripe.com/v1/subscriptions/sub_1?prorate=false"
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(" 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&future).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
    }

    fn create() -> StripeRequest {
        StripeRequest {
            method: Method::Post,
            path: "/v1/payment_intents".into(),
            params: vec![("amount".into(), "1".into())],
            idempotency_key: Some("k".into()),
        }
    }

    /// Sends a create to the server listening at `addr` and returns how it failed.
    async fn create_fails(addr: std::net::SocketAddr, timeout: Duration) -> SendError {
        let c = client(&format!("http://{addr}"));
        c.send(&create(), c.url_for(&create()).unwrap(), timeout)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn transport_failures_are_told_apart() {
        // Nothing listens: connection refused.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = closed.local_addr().unwrap();
        drop(closed);
        let err = create_fails(refused, Duration::from_secs(1)).await;
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");

        // Accepts and never answers: timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let (sock, _) = silent.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(sock);
        });
        let err = create_fails(addr, Duration::from_millis(200)).await;
        assert!(matches!(err, SendError::Timeout(_)), "{err:?}");
        hold.abort();

        // Accepts and hangs up: transport error.
        let rude = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = rude.local_addr().unwrap();
        tokio::spawn(async move {
            let (sock, _) = rude.accept().await.unwrap();
            drop(sock);
        });
        let err = create_fails(addr, Duration::from_secs(1)).await;
        assert!(matches!(err, SendError::Transport(_)), "{err:?}");
        // No URL (which could carry query parameters) in the message.
        assert!(!crate::error_chain::ErrorChain(&err)
            .to_string()
            .contains("127.0.0.1"));
    }

    #[test]
    fn bad_key_is_a_config_error_not_a_panic() {
        let err = StripeClient::new(&StripeConfig {
            api_base: Url::parse("https://api.stripe.com").unwrap(),
            secret_key: SecretString::new("sk_test\nx"),
            api_version: "2024-06-20".into(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("sk_test"));
    }
}
