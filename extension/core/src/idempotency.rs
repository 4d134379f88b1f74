//! Deterministic idempotency keys: `<scope>:<sha256 of canonical JSON of parts, hex>`.
//!
//! The same scope and parts give the same key on every machine and version, so a command is sent
//! with one key on every attempt, by any worker, after any crash.

use sha2::{Digest, Sha256};

use crate::canonical_json::{canonicalize, CanonicalJsonError};

/// Stripe accepts keys of up to 255 characters; a SHA-256 in hex and the separator take 65.
pub const MAX_SCOPE_LEN: usize = 255 - 65;
/// Largest JSON text of parts (the SQL side refuses larger jsonb before it gets here).
pub const MAX_PARTS_BYTES: usize = 65536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyKeyError {
    #[error("scope must not be empty")]
    EmptyScope,
    #[error("scope is longer than {MAX_SCOPE_LEN} characters")]
    ScopeTooLong,
    #[error("scope may contain only ASCII letters, digits and . _ - : (found {0:?})")]
    ScopeCharacter(char),
    #[error("parts are larger than {MAX_PARTS_BYTES} bytes as JSON text")]
    PartsTooLarge,
    #[error("parts are not valid JSON: {0}")]
    Parts(#[from] CanonicalJsonError),
}

/// Derives the key for `scope` and the JSON text `parts_json`.
pub fn derive(scope: &str, parts_json: &str) -> Result<String, IdempotencyKeyError> {
    validate_scope(scope)?;
    if parts_json.len() > MAX_PARTS_BYTES {
        return Err(IdempotencyKeyError::PartsTooLarge);
    }
    let canonical = canonicalize(parts_json)?;
    let digest = Sha256::digest(canonical.as_bytes());
    Ok(format!("{scope}:{}", hex::encode(digest)))
}

fn validate_scope(scope: &str) -> Result<(), IdempotencyKeyError> {
    if scope.is_empty() {
        return Err(IdempotencyKeyError::EmptyScope);
    }
    if let Some(c) = scope
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(IdempotencyKeyError::ScopeCharacter(c));
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(IdempotencyKeyError::ScopeTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_never_changes() {
        // Pinned: changing this value would re-key every command in flight after an upgrade.
        assert_eq!(
            derive("pi_create", r#"{"payment_id":"0b6f","attempt":1}"#).unwrap(),
            format!(
                "pi_create:{}",
                hex::encode(Sha256::digest(br#"{"attempt":1,"payment_id":"0b6f"}"#))
            )
        );
        assert_eq!(
            derive("s", "{}").unwrap(),
            "s:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter_but_values_do() {
        let a = derive("x", r#"{"a":1,"b":{"c":"d","e":[1,2]}}"#).unwrap();
        let b = derive("x", "{ \"b\" : {\"e\":[1, 2], \"c\":\"d\"}, \"a\" : 1.0 }").unwrap();
        assert_eq!(a, b);
        for changed in [
            r#"{"a":2,"b":{"c":"d","e":[1,2]}}"#,
            r#"{"a":1,"b":{"c":"D","e":[1,2]}}"#,
            r#"{"a":1,"b":{"c":"d","e":[2,1]}}"#,
            r#"{"a":"1","b":{"c":"d","e":[1,2]}}"#,
            r#"{"a":1,"b":{"c":"d","e":[1,2]},"f":null}"#,
        ] {
            assert_ne!(derive("x", changed).unwrap(), a, "{changed}");
        }
        assert_ne!(
            derive("y", r#"{"a":1,"b":{"c":"d","e":[1,2]}}"#).unwrap(),
            a
        );
    }

    #[test]
    fn bounded_ascii_and_validated() {
        let key = derive(&"s".repeat(MAX_SCOPE_LEN), "[]").unwrap();
        assert_eq!(key.len(), 255);
        assert!(key.is_ascii());
        assert_eq!(
            derive(&"s".repeat(MAX_SCOPE_LEN + 1), "[]"),
            Err(IdempotencyKeyError::ScopeTooLong)
        );
        assert_eq!(derive("", "[]"), Err(IdempotencyKeyError::EmptyScope));
        assert_eq!(
            derive("a b", "[]"),
            Err(IdempotencyKeyError::ScopeCharacter(' '))
        );
        assert!(matches!(
            derive("a", "{"),
            Err(IdempotencyKeyError::Parts(_))
        ));
    }
}
