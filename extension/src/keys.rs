//! `pay.idempotency_key(scope, parts)`: the SQL wrapper in sql/ passes the jsonb as text so that
//! numbers keep their exact digits (pgrx's JsonB would go through f64).

use pgrx::prelude::*;

use crate::errors::raise_invalid_parameter;

#[pg_extern(immutable, strict, parallel_safe, name = "_idempotency_key_of_text")]
fn idempotency_key_of_text(scope: &str, parts_json: &str) -> String {
    pgpay_core::idempotency::derive(scope, parts_json)
        .unwrap_or_else(|e| raise_invalid_parameter(format!("idempotency_key: {e}")))
}
