//! The one place where Rust errors become Postgres errors, each with an explicit SQLSTATE (a bare
//! `Err` from pgrx would surface as a vague 22000/XX000).

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
