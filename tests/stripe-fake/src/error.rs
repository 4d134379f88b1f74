//! Stripe's error answer: `{"error":{"type":...,"message":...,"param":...,"code":...}}` plus the
//! HTTP status and the headers that tell a client whether to retry.

use serde_json::{json, Map, Value};

/// The `type` field of Stripe's error object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    ApiError,
    CardError,
    IdempotencyError,
    InvalidRequestError,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::ApiError => "api_error",
            ErrorType::CardError => "card_error",
            ErrorType::IdempotencyError => "idempotency_error",
            ErrorType::InvalidRequestError => "invalid_request_error",
        }
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One error answer, as Stripe would send it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub kind: ErrorType,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub decline_code: Option<&'static str>,
    /// Card errors carry the PaymentIntent as it is after the failed attempt (boxed: most errors
    /// have none, and every `Result` carrying an `ApiError` pays for its size).
    pub payment_intent: Option<Box<Value>>,
    /// `Stripe-Should-Retry`, when Stripe would send it.
    pub should_retry: Option<bool>,
    /// `Retry-After` in seconds, for 429s.
    pub retry_after_secs: Option<u64>,
    /// Whether the endpoint began executing. Stripe saves an idempotent result only then: a request
    /// whose parameters fail validation can be retried with the same key and corrected parameters.
    pub executed: bool,
}

impl ApiError {
    pub(crate) fn new(status: u16, kind: ErrorType, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            decline_code: None,
            payment_intent: None,
            should_retry: None,
            retry_after_secs: None,
            executed: false,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// Marks the error as an outcome of an executed request (stored for idempotent replay).
    pub fn executed(mut self) -> ApiError {
        self.executed = true;
        self
    }

    /// A parameter failed validation (400, not stored).
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(400, ErrorType::InvalidRequestError, message).with_param(param)
    }

    pub fn missing_param(param: &str) -> ApiError {
        ApiError::invalid_param(param, format!("Missing required param: {param}."))
            .with_code("parameter_missing")
    }

    pub fn unknown_param(param: &str) -> ApiError {
        ApiError::invalid_param(param, format!("Received unknown parameter: {param}"))
            .with_code("parameter_unknown")
    }

    /// A request that cannot be understood at all (bad encoding, unsupported content type).
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, ErrorType::InvalidRequestError, message)
    }

    /// `No such payment_intent: 'pi_x'`, with Stripe's 404.
    pub fn no_such(object: &str, id: &str, param: &str) -> ApiError {
        ApiError::new(
            404,
            ErrorType::InvalidRequestError,
            format!("No such {object}: '{}'", shorten(id)),
        )
        .with_param(param)
        .with_code("resource_missing")
    }

    /// The object exists but its state forbids the operation (executed, so stored).
    pub fn unexpected_state(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(400, ErrorType::InvalidRequestError, message)
            .with_code(code)
            .executed()
    }

    /// A declined card: 402, with the PaymentIntent after the attempt.
    pub fn card_declined(
        code: &'static str,
        decline_code: &'static str,
        message: &str,
        payment_intent: Value,
    ) -> ApiError {
        let mut error = ApiError::new(402, ErrorType::CardError, message)
            .with_code(code)
            .executed();
        error.decline_code = Some(decline_code);
        error.payment_intent = Some(Box::new(payment_intent));
        error
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(401, ErrorType::InvalidRequestError, message)
    }

    pub fn unrecognized_url(method: &str, path: &str) -> ApiError {
        ApiError::new(
            404,
            ErrorType::InvalidRequestError,
            format!(
                "Unrecognized request URL ({method}: {}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
                shorten(path)
            ),
        )
    }

    pub fn idempotency_mismatch(message: String) -> ApiError {
        ApiError::new(400, ErrorType::IdempotencyError, message)
    }

    pub fn idempotency_in_flight() -> ApiError {
        let mut error = ApiError::new(
            409,
            ErrorType::IdempotencyError,
            "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): please try again later.",
        );
        error.should_retry = Some(true);
        error
    }

    /// A 500 that a client may safely retry: nothing was done.
    pub fn internal_retryable() -> ApiError {
        let mut error = ApiError::new(
            500,
            ErrorType::ApiError,
            "An unknown error occurred. Nothing was done; the request may be retried.",
        );
        error.should_retry = Some(true);
        error
    }

    pub fn rate_limited(retry_after_secs: u64) -> ApiError {
        let mut error = ApiError::new(
            429,
            ErrorType::InvalidRequestError,
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        )
        .with_code("rate_limit");
        error.retry_after_secs = Some(retry_after_secs);
        error
    }

    /// The JSON body Stripe sends.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        if let Some(code) = self.code {
            error.insert("code".into(), json!(code));
            error.insert(
                "doc_url".into(),
                json!(format!(
                    "https://stripe.com/docs/error-codes/{}",
                    code.replace('_', "-")
                )),
            );
        }
        if let Some(decline_code) = self.decline_code {
            error.insert("decline_code".into(), json!(decline_code));
        }
        error.insert("message".into(), json!(self.message));
        if let Some(param) = &self.param {
            error.insert("param".into(), json!(param));
        }
        if let Some(pi) = &self.payment_intent {
            error.insert("payment_intent".into(), (**pi).clone());
        }
        error.insert("type".into(), json!(self.kind.as_str()));
        json!({ "error": error })
    }
}

/// Client input echoed into messages is cut short, so a megabyte of garbage is not sent back.
pub fn shorten(text: &str) -> String {
    const MAX: usize = 100;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(MAX).collect();
        short.push_str("...");
        short
    }
}
