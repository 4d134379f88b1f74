//! Stripe webhook signature checks. The parser and verifier live in `pgpay_core::signature`.

use pgpay_core::signature::{verify, Tolerance};
use pgrx::prelude::*;

use crate::errors::raise_invalid_parameter;
use crate::text_bytes::TextBytes;

/// `pay.verify_stripe_signature`: for tests and tooling. Production ingest never takes the secret
/// as an argument (statement logs and pg_stat_statements would keep it): it reads stored secrets.
/// NULL `now_unix` means the wall clock, as the SDKs use (hence volatile).
#[pg_extern(volatile, parallel_safe)]
fn verify_stripe_signature(
    payload: Option<TextBytes<'_>>,
    header: Option<TextBytes<'_>>,
    secret: Option<TextBytes<'_>>,
    tolerance_s: default!(i32, 300),
    now_unix: default!(Option<i64>, "NULL"),
) -> Option<bool> {
    let (payload, header, secret) = (payload?, header?, secret?);
    let tolerance = tolerance(tolerance_s);
    // Stripe signs bytes; a header that is not UTF-8 (possible in a SQL_ASCII database) is no
    // Stripe header.
    let Some(header) = header.as_utf8() else {
        return Some(false);
    };
    Some(
        verify(
            payload.0,
            header,
            secret.0,
            tolerance,
            now_unix.unwrap_or_else(unix_now),
        )
        .is_ok(),
    )
}

fn tolerance(tolerance_s: i32) -> Tolerance {
    match u32::try_from(tolerance_s) {
        Ok(seconds) => Tolerance::from_seconds(seconds),
        Err(_) => raise_invalid_parameter(format!(
            "tolerance_s must be zero (no age check) or a positive number of seconds, got {tolerance_s}"
        )),
    }
}

/// The wall clock in unix seconds, as Stripe's SDKs read it when checking a signature's age.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}
