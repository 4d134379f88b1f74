//! The transition rule, exposed to the plpgsql that applies evidence under a row lock.

use pgpay_core::transition::{decide, Decision, PaymentStatus};
use pgrx::prelude::*;

/// Returns `apply`, `unchanged`, `success_after_give_up`, or a reason starting with `ignored:`.
/// An unknown proposed status (a newer Stripe API) is ignored rather than raised: the event is kept.
#[pg_extern(immutable, parallel_safe, name = "_transition")]
fn transition(
    current: &str,
    current_at: Option<i64>,
    proposed: &str,
    proposed_at: i64,
) -> &'static str {
    let Ok(current) = current.parse::<PaymentStatus>() else {
        crate::errors::raise_invalid_parameter(format!(
            "current status {current:?} is not a payment status"
        ));
    };
    let Ok(proposed) = proposed.parse::<PaymentStatus>() else {
        return "ignored: unknown PaymentIntent status";
    };
    match decide(current, current_at, proposed, proposed_at) {
        Decision::Apply => "apply",
        Decision::Unchanged => "unchanged",
        Decision::SuccessAfterGiveUp => "success_after_give_up",
        Decision::Ignore(reason) => reason.as_str(),
    }
}
