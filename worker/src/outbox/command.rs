//! Turning an outbox row's `request` column into an HTTP request for Stripe.
//!
//! The row is the extension's promise about what to send (docs/outbox-contract.md):
//! `{"method": "POST", "path": "/v1/...", "params": {flat object of strings}}`. Anything
//! else is a malformed command: it is failed permanently with a [`MalformedCommand`]
//! and never retried, since a retry would read the same bytes again.

use serde_json::Value;

use crate::stripe::{Method, StripeRequest};

/// Why a row cannot be sent. Permanent: the row is failed with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedCommand {
    /// `request` is not a JSON object.
    #[error("request is not a JSON object")]
    NotAnObject,
    /// `request.method` is missing or not a string.
    #[error("request.method is missing or not a string")]
    MissingMethod,
    /// `request.method` names a method the worker does not send.
    #[error("unknown request.method {0:?} (expected GET, POST or DELETE)")]
    UnknownMethod(String),
    /// `request.path` is missing or not a string.
    #[error("request.path is missing or not a string")]
    MissingPath,
    /// `request.path` is not a plain absolute path.
    #[error("request.path {0:?} is not an absolute path without query, fragment or unresolved placeholder")]
    BadPath(String),
    /// `request.params` is present but not an object.
    #[error("request.params is not a JSON object")]
    ParamsNotAnObject,
    /// A parameter value is an array, object or null (params must be flat).
    #[error("request.params[{0:?}] is not a string, number or boolean (params must be flat)")]
    NestedParam(String),
    /// A write (POST, DELETE) without its Idempotency-Key would be unsafe to retry, so it is
    /// never sent.
    #[error("POST or DELETE command has no idempotency_key; refusing to send it without one")]
    MissingIdempotencyKey,
    /// The key is empty, too long for Stripe (255), or not a valid header value.
    #[error("idempotency_key is empty, longer than 255 characters or not printable ASCII")]
    BadIdempotencyKey,
}

/// Parses a row's `request` and `idempotency_key` into a [`StripeRequest`].
pub fn parse_request(
    request: &Value,
    idempotency_key: Option<&str>,
) -> Result<StripeRequest, MalformedCommand> {
    let obj = request.as_object().ok_or(MalformedCommand::NotAnObject)?;
    let method = match obj.get("method").and_then(Value::as_str) {
        None => return Err(MalformedCommand::MissingMethod),
        Some(m) => match m.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            _ => return Err(MalformedCommand::UnknownMethod(m.to_owned())),
        },
    };
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or(MalformedCommand::MissingPath)?;
    if !is_plain_path(path) {
        return Err(MalformedCommand::BadPath(path.to_owned()));
    }
    let params = match obj.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => {
            let mut params = Vec::with_capacity(map.len());
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null | Value::Array(_) | Value::Object(_) => {
                        return Err(MalformedCommand::NestedParam(k.clone()))
                    }
                };
                params.push((k.clone(), v));
            }
            // serde_json's map is already sorted; sort anyway so the wire form never
            // depends on a feature flag of a dependency.
            params.sort();
            params
        }
        Some(_) => return Err(MalformedCommand::ParamsNotAnObject),
    };
    let idempotency_key = match (method, idempotency_key) {
        (Method::Post | Method::Delete, None) => {
            return Err(MalformedCommand::MissingIdempotencyKey)
        }
        (_, Some(k)) if !is_valid_key(k) => return Err(MalformedCommand::BadIdempotencyKey),
        (Method::Post | Method::Delete, Some(k)) => Some(k.to_owned()),
        // GETs carry no key (the contract: writes only).
        (Method::Get, _) => None,
    };
    Ok(StripeRequest {
        method,
        path: path.to_owned(),
        params,
        idempotency_key,
    })
}

/// `/v1/payment_intents/pi_123/cancel`: starts with one `/`, no `//` (which would make
/// the join a scheme-relative URL), no `..` segments, no query or fragment, no `{`
/// placeholders left, only printable ASCII without spaces or `@` `\`.
fn is_plain_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.starts_with("//")
        && path.len() <= 2048
        && !path.split('/').any(|seg| seg == ".." || seg == ".")
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'{' | b'}' | b'@' | b'\\'))
}

fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_create() {
        let req = json!({
            "method": "POST",
            "path": "/v1/payment_intents",
            "params": {"currency": "usd", "amount": "2000", "metadata[order_ref]": "o-1"}
        });
        let r = parse_request(&req, Some("pi_create:abc")).unwrap();
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.path, "/v1/payment_intents");
        assert_eq!(r.idempotency_key.as_deref(), Some("pi_create:abc"));
        assert_eq!(
            r.params,
            vec![
                ("amount".into(), "2000".into()),
                ("currency".into(), "usd".into()),
                ("metadata[order_ref]".into(), "o-1".into()),
            ]
        );
    }

    #[test]
    fn numbers_and_booleans_are_rendered() {
        let req =
            json!({"method": "post", "path": "/v1/refunds", "params": {"amount": 500, "x": true}});
        let r = parse_request(&req, Some("k")).unwrap();
        assert_eq!(
            r.params,
            vec![("amount".into(), "500".into()), ("x".into(), "true".into())]
        );
    }

    #[test]
    fn get_carries_no_key() {
        let req = json!({"method": "GET", "path": "/v1/payment_intents/pi_1"});
        let r = parse_request(&req, Some("ignored")).unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.idempotency_key, None);
        assert!(r.params.is_empty());
    }

    #[test]
    fn delete_carries_its_key_and_query_params() {
        let req = json!({
            "method": "DELETE",
            "path": "/v1/subscriptions/sub_1",
            "params": {"cancellation_details[comment]": "asked"}
        });
        let r = parse_request(&req, Some("sub_cancel:abc")).unwrap();
        assert_eq!(r.method, Method::Delete);
        assert_eq!(r.idempotency_key.as_deref(), Some("sub_cancel:abc"));
        assert_eq!(
            r.params,
            vec![("cancellation_details[comment]".into(), "asked".into())]
        );
    }

    #[test]
    fn malformed_rows_table() {
        let cases: Vec<(Value, Option<&str>, MalformedCommand)> = vec![
            (
                json!("POST /v1/x"),
                Some("k"),
                MalformedCommand::NotAnObject,
            ),
            (
                json!({"path": "/v1/x"}),
                Some("k"),
                MalformedCommand::MissingMethod,
            ),
            (
                json!({"method": 1, "path": "/v1/x"}),
                Some("k"),
                MalformedCommand::MissingMethod,
            ),
            (
                json!({"method": "PATCH", "path": "/v1/x"}),
                Some("k"),
                MalformedCommand::UnknownMethod("PATCH".into()),
            ),
            (
                json!({"method": "PUT", "path": "/v1/x"}),
                Some("k"),
                MalformedCommand::UnknownMethod("PUT".into()),
            ),
            (
                json!({"method": "DELETE", "path": "/v1/subscriptions/sub_1"}),
                None,
                MalformedCommand::MissingIdempotencyKey,
            ),
            (
                json!({"method": "POST"}),
                Some("k"),
                MalformedCommand::MissingPath,
            ),
            (
                json!({"method": "POST", "path": "v1/x"}),
                Some("k"),
                MalformedCommand::BadPath("v1/x".into()),
            ),
            (
                json!({"method": "POST", "path": "//evil.example/v1"}),
                Some("k"),
                MalformedCommand::BadPath("//evil.example/v1".into()),
            ),
            (
                json!({"method": "POST", "path": "@evil.example/v1"}),
                Some("k"),
                MalformedCommand::BadPath("@evil.example/v1".into()),
            ),
            (
                json!({"method": "POST", "path": "/v1/../admin"}),
                Some("k"),
                MalformedCommand::BadPath("/v1/../admin".into()),
            ),
            (
                json!({"method": "POST", "path": "/v1/payment_intents/{pi}/cancel"}),
                Some("k"),
                MalformedCommand::BadPath("/v1/payment_intents/{pi}/cancel".into()),
            ),
            (
                json!({"method": "POST", "path": "/v1/x?a=b"}),
                Some("k"),
                MalformedCommand::BadPath("/v1/x?a=b".into()),
            ),
            (
                json!({"method": "POST", "path": "/v1/x", "params": ["a"]}),
                Some("k"),
                MalformedCommand::ParamsNotAnObject,
            ),
            (
                json!({"method": "POST", "path": "/v1/x", "params": {"metadata": {"a": "b"}}}),
                Some("k"),
                MalformedCommand::NestedParam("metadata".into()),
            ),
            (
                json!({"method": "POST", "path": "/v1/x", "params": {"a": null}}),
                Some("k"),
                MalformedCommand::NestedParam("a".into()),
            ),
            (
                json!({"method": "POST", "path": "/v1/x"}),
                None,
                MalformedCommand::MissingIdempotencyKey,
            ),
            (
                json!({"method": "POST", "path": "/v1/x"}),
                Some(""),
                MalformedCommand::BadIdempotencyKey,
            ),
            (
                json!({"method": "POST", "path": "/v1/x"}),
                Some("a\nb"),
                MalformedCommand::BadIdempotencyKey,
            ),
        ];
        for (req, key, want) in cases {
            assert_eq!(parse_request(&req, key), Err(want), "request {req}");
        }
        let long = "k".repeat(256);
        assert_eq!(
            parse_request(&json!({"method": "POST", "path": "/v1/x"}), Some(&long)),
            Err(MalformedCommand::BadIdempotencyKey)
        );
    }
}
