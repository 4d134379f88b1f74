//! One request to Stripe, ready to send: method, path, form parameters, Idempotency-Key.

/// The HTTP methods the worker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Reads (reconciliation, refresh, the key-retention search); carry no Idempotency-Key.
    Get,
    /// Writes; always carry their command's Idempotency-Key.
    Post,
    /// Deletions (`DELETE /v1/subscriptions/:id`): parameters in the query string, and the
    /// command's Idempotency-Key like a POST (Stripe ignores it on DELETE, which is idempotent by
    /// definition; sending it keeps every write of the outbox keyed the same way).
    Delete,
}

impl Method {
    /// The method's name, for metrics labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }

    pub(crate) fn as_reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// Method, path (relative to the API base), form parameters in a stable order, and the
/// key that writes (POST, DELETE) must carry.
#[derive(Clone, PartialEq, Eq)]
pub struct StripeRequest {
    /// HTTP method.
    pub method: Method,
    /// Path starting with `/`, placeholders already resolved by `claim_outbox`.
    pub path: String,
    /// Form parameters, keys already in Stripe's bracket notation.
    pub params: Vec<(String, String)>,
    /// The stored Idempotency-Key (POST and DELETE).
    pub idempotency_key: Option<String>,
}

impl StripeRequest {
    /// A read: no body, no key.
    pub(crate) fn get(path: impl Into<String>, params: Vec<(String, String)>) -> Self {
        Self {
            method: Method::Get,
            path: path.into(),
            params,
            idempotency_key: None,
        }
    }
}

// Bodies and keys stay out of logs: Debug shows the shape of the request only.
impl std::fmt::Debug for StripeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("params", &format_args!("[{} params]", self.params.len()))
            .field(
                "idempotency_key",
                &self.idempotency_key.as_ref().map(|_| "[set]"),
            )
            .finish()
    }
}

/// Form-encodes parameters the way Stripe reads them
/// (`application/x-www-form-urlencoded`, keys as given, brackets percent-encoded).
pub fn encode_form(params: &[(String, String)]) -> String {
    // serde_urlencoded only fails on non-pair inputs, which a slice of pairs is not.
    serde_urlencoded::to_string(params).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_keeps_bracket_keys_and_escapes() {
        let params = vec![
            ("amount".to_owned(), "2000".to_owned()),
            ("metadata[order_ref]".to_owned(), "o 1&x=y".to_owned()),
            ("description".to_owned(), "café ünïcode".to_owned()),
            (
                "automatic_payment_methods[enabled]".to_owned(),
                "true".to_owned(),
            ),
        ];
        let body = encode_form(&params);
        assert_eq!(
            body,
            "amount=2000&metadata%5Border_ref%5D=o+1%26x%3Dy&description=caf%C3%A9+%C3%BCn%C3%AFcode&automatic_payment_methods%5Benabled%5D=true"
        );
        // Round trip: what Stripe decodes is what the row said.
        let back: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap();
        assert_eq!(back, params);
        assert_eq!(encode_form(&[]), "");
    }

    #[test]
    fn debug_hides_params_and_key() {
        let r = StripeRequest {
            method: Method::Post,
            path: "/v1/x".into(),
            params: vec![("description".into(), "secret-ish".into())],
            idempotency_key: Some("key-value".into()),
        };
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("secret-ish"), "{dbg}");
        assert!(!dbg.contains("key-value"), "{dbg}");
    }
}
