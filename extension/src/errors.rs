//! Typed Rust errors become Postgres errors here, each with an explicit SQLSTATE (a bare `Err`
//! from pgrx would surface as a vague 22000/XX000). The few conditions found while holding a
//! payment's row lock (`apply_intent.rs`, `webhook.rs`) raise with `ereport!` where they are
//! found, also with an explicit SQLSTATE.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::fmt::Display;

/// Raises SQLSTATE 22023 (invalid_parameter_value): the caller passed a bad argument. The message
/// names the argument; it never contains a secret.
pub fn raise_invalid_parameter(message: impl Display) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message.to_string()
    );
}

/// Raises SQLSTATE XX000 (internal_error): pgpay itself failed (a statement it runs could not be
/// prepared or read). The caller answers 5xx; Stripe and the worker retry.
pub fn raise_internal(message: impl Display) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("pgpay: {message}")
    );
}

/// Raises `code` with `message` and a hint for the DBA.
pub fn raise_with_hint(code: PgSqlErrorCode, message: impl Display, hint: &str) -> ! {
    ErrorReport::new(code, message.to_string(), "pgpay")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}
