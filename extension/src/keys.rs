//! `pay.idempotency_key(scope, parts)`: the SQL wrapper in sql/ passes the jsonb as text so that
//! numbers keep their exact digits (pgrx's JsonB would go through f64).

use pgrx::prelude::*;

use crate::errors::raise_invalid_parameter;
use crate::text_bytes::TextBytes;

#[pg_extern(immutable, strict, parallel_safe, name = "_idempotency_key_of_text")]
fn idempotency_key_of_text(scope: TextBytes<'_>, parts_json: TextBytes<'_>) -> String {
    let (Some(scope), Some(parts_json)) = (scope.as_utf8(), parts_json.as_utf8()) else {
        raise_invalid_parameter("idempotency_key: scope and parts must be valid UTF-8");
    };
    pgpay_core::idempotency::derive(scope, parts_json)
        .unwrap_or_else(|e| raise_invalid_parameter(format!("idempotency_key: {e}")))
}
