//! Canonical JSON and idempotency-key derivation (`pgpay_core::canonical_json`,
//! `pgpay_core::idempotency`), as `pay.idempotency_key` runs them on jsonb's text.
//!
//! Input: scope / JSON text (the rest). Checks: canonical text is a fixed point, is JSON, means
//! what the input meant (same structure; numbers checked separately), and gives the same key;
//! the parser accepts what a JSON parser accepts, except the documented refusals (duplicate
//! keys, nesting beyond the limit, lone surrogates, exponents beyond nine digits).

use pgpay_core::canonical_json::{canonicalize, CanonicalJsonError};
use pgpay_core::idempotency::derive;
use serde::de::IgnoredAny;
use serde_json::Value;

use crate::{text, Fields};

pub fn run(data: &[u8]) {
    let mut fields = Fields::new(data);
    let scope = text(fields.line()).into_owned();
    let json = text(fields.rest()).into_owned();

    // Syntax only: IgnoredAny skips numbers without converting them, so range plays no part.
    let syntax = serde_json::from_str::<IgnoredAny>(&json);
    match canonicalize(&json) {
        Ok(canonical) => {
            assert!(
                syntax.is_ok() || is_depth_limit(syntax.as_ref().err()),
                "accepted what is not JSON: {json:?} ({syntax:?})"
            );
            assert_eq!(
                canonicalize(&canonical).as_deref(),
                Ok(canonical.as_str()),
                "not a fixed point: {json:?}"
            );
            if let (Ok(a), Ok(b)) = (
                serde_json::from_str::<Value>(&json),
                serde_json::from_str::<Value>(&canonical),
            ) {
                assert_eq!(shape(&a), shape(&b), "meaning changed: {json:?}");
            }
            if let Ok(key) = derive(&scope, &json) {
                assert_eq!(derive(&scope, &canonical).as_ref(), Ok(&key));
                assert!(key.is_ascii() && key.len() <= 255, "{key:?}");
                let (head, digest) = key.rsplit_once(':').expect("scope:digest");
                assert_eq!(head, scope);
                assert_eq!(digest.len(), 64);
            }
        }
        Err(CanonicalJsonError::Invalid { offset, what }) => {
            assert!(offset <= json.len());
            // Beyond JSON's grammar, on purpose: lone surrogates (RFC 8785 and jsonb refuse
            // them too) and exponents of ten or more digits.
            let on_purpose = what == "unpaired surrogate" || long_exponent(&json);
            assert!(
                syntax.is_err() || on_purpose,
                "refused valid JSON ({what}): {json:?}"
            );
        }
        Err(CanonicalJsonError::TooDeep | CanonicalJsonError::DuplicateKey(_)) => {}
    }
}

fn is_depth_limit(error: Option<&serde_json::Error>) -> bool {
    error.is_some_and(|e| e.to_string().starts_with("recursion limit exceeded"))
}

/// Whether the text has an exponent of ten or more digits (refused on purpose).
fn long_exponent(json: &str) -> bool {
    let bytes = json.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        matches!(b, b'e' | b'E')
            && i > 0
            && bytes[i - 1].is_ascii_digit()
            && bytes[i + 1..]
                .iter()
                .skip_while(|&&c| c == b'+' || c == b'-')
                .take_while(|c| c.is_ascii_digit())
                .count()
                >= 10
    })
}

/// The value with every number replaced by null: structure, strings and key sets must survive
/// canonicalisation exactly (numbers are exact decimals there, not doubles).
fn shape(value: &Value) -> Value {
    match value {
        Value::Number(_) => Value::Null,
        Value::Array(items) => items.iter().map(shape).collect(),
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), shape(v))).collect(),
        other => other.clone(),
    }
}
