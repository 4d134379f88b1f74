//! Stripe webhook signature checks. The parser and verifier live in `pgpay_core::signature`.

use pgpay_core::signature::{verify, Tolerance};
use pgrx::prelude::*;

use crate::errors::raise_invalid_parameter;

/// `pay.verify_stripe_signature`: for tests and tooling. Production ingest never takes the secret
/// as an argument (statement logs and pg_stat_statements would keep it): it reads stored secrets.
/// NULL `now_unix` means the wall clock, as the SDKs use (hence volatile).
#[pg_extern(volatile, parallel_safe)]
fn verify_stripe_signature(
    payload: Option<&str>,
    header: Option<&str>,
    secret: Option<&str>,
    tolerance_s: default!(i32, 300),
    now_unix: default!(Option<i64>, "NULL"),
) -> Option<bool> {
    let (payload, header, secret) = (payload?, header?, secret?);
    let tolerance = tolerance(tolerance_s);
    Some(
        verify(
            payload.as_bytes(),
            header,
            secret.as_bytes(),
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
