//! The one transition rule for a payment's status, used for webhooks, outbox answers and
//! reconciliation alike.
//!
//! `succeeded` and `canceled` absorb everything after them; `create_failed` and `superseded` are
//! pgpay's own terminal states. Among the other statuses the newest evidence wins: Stripe's
//! `created` time of the event (or when an API answer was read), then the status's rank, so two
//! pieces of evidence from the same second are ordered the same way every time.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PaymentStatus {
    Creating,
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresAction,
    Processing,
    RequiresCapture,
    Succeeded,
    Canceled,
    CreateFailed,
    Superseded,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 10] = [
        PaymentStatus::Creating,
        PaymentStatus::RequiresPaymentMethod,
        PaymentStatus::RequiresConfirmation,
        PaymentStatus::RequiresAction,
        PaymentStatus::Processing,
        PaymentStatus::RequiresCapture,
        PaymentStatus::Succeeded,
        PaymentStatus::Canceled,
        PaymentStatus::CreateFailed,
        PaymentStatus::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Creating => "creating",
            PaymentStatus::RequiresPaymentMethod => "requires_payment_method",
            PaymentStatus::RequiresConfirmation => "requires_confirmation",
            PaymentStatus::RequiresAction => "requires_action",
            PaymentStatus::Processing => "processing",
            PaymentStatus::RequiresCapture => "requires_capture",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Canceled => "canceled",
            PaymentStatus::CreateFailed => "create_failed",
            PaymentStatus::Superseded => "superseded",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PaymentStatus::Succeeded
                | PaymentStatus::Canceled
                | PaymentStatus::CreateFailed
                | PaymentStatus::Superseded
        )
    }

    /// Statuses a Stripe PaymentIntent can report; the others are pgpay's own.
    pub fn is_stripe_status(self) -> bool {
        !matches!(
            self,
            PaymentStatus::Creating | PaymentStatus::CreateFailed | PaymentStatus::Superseded
        )
    }

    /// How far along a PaymentIntent is; breaks ties between evidence from the same second.
    fn rank(self) -> u8 {
        match self {
            PaymentStatus::Creating => 0,
            PaymentStatus::RequiresPaymentMethod => 1,
            PaymentStatus::RequiresConfirmation => 2,
            PaymentStatus::RequiresAction => 3,
            PaymentStatus::Processing => 4,
            PaymentStatus::RequiresCapture => 5,
            PaymentStatus::Canceled | PaymentStatus::CreateFailed | PaymentStatus::Superseded => 6,
            PaymentStatus::Succeeded => 7,
        }
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown payment status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for PaymentStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PaymentStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.chars().take(40).collect()))
    }
}

/// What to do with a piece of evidence about a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Move the payment to the evidence's status.
    Apply,
    /// The payment already has this status: nothing to record, but the evidence time advances to
    /// the newer of the two (the payment was still in this status then).
    Unchanged,
    /// Keep the status and record the evidence as ignored, with the reason.
    Ignore(IgnoreReason),
    /// Stripe says a payment pgpay had already given up on (superseded) succeeded: money moved and
    /// a human or the double-charge guard must act. The status stays.
    SuccessAfterGiveUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoreReason {
    /// The payment is in a terminal status and terminal statuses absorb.
    Terminal,
    /// The evidence is older than what the payment already reflects.
    Stale,
    /// Same second, lower or equal rank.
    StaleSameSecond,
    /// Evidence may only carry a Stripe status.
    NotAStripeStatus,
    /// A status this version does not know (a newer Stripe API): kept, not applied.
    UnknownStatus,
}

impl IgnoreReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::Terminal => "ignored: payment is already terminal",
            IgnoreReason::Stale => "ignored: older than the evidence already applied",
            IgnoreReason::StaleSameSecond => "ignored: same second, not further along",
            IgnoreReason::NotAStripeStatus => "ignored: not a Stripe PaymentIntent status",
            IgnoreReason::UnknownStatus => "ignored: unknown PaymentIntent status",
        }
    }
}

/// Decides whether evidence (`proposed`, observed at `proposed_at`, unix seconds) moves a payment
/// now in `current`, whose last applied evidence is from `current_at` (None when there is none).
pub fn decide(
    current: PaymentStatus,
    current_at: Option<i64>,
    proposed: PaymentStatus,
    proposed_at: i64,
) -> Decision {
    if !proposed.is_stripe_status() {
        return Decision::Ignore(IgnoreReason::NotAStripeStatus);
    }
    if proposed == current {
        return Decision::Unchanged;
    }
    if current.is_terminal() {
        if current == PaymentStatus::Superseded && proposed == PaymentStatus::Succeeded {
            return Decision::SuccessAfterGiveUp;
        }
        return Decision::Ignore(IgnoreReason::Terminal);
    }
    if proposed.is_terminal() {
        // Stripe never leaves succeeded or canceled, so terminal evidence is final whatever its age.
        return Decision::Apply;
    }
    match current_at {
        None => Decision::Apply,
        Some(at) if proposed_at > at => Decision::Apply,
        Some(at) if proposed_at < at => Decision::Ignore(IgnoreReason::Stale),
        Some(_) if proposed.rank() > current.rank() => Decision::Apply,
        Some(_) => Decision::Ignore(IgnoreReason::StaleSameSecond),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PaymentStatus::*;

    #[test]
    fn names_round_trip() {
        for status in PaymentStatus::ALL {
            assert_eq!(status.as_str().parse::<PaymentStatus>(), Ok(status));
        }
        assert!("paid".parse::<PaymentStatus>().is_err());
    }

    #[test]
    fn decisions_table() {
        let cases = [
            (Creating, None, RequiresPaymentMethod, 10, Decision::Apply),
            (
                RequiresPaymentMethod,
                Some(10),
                Processing,
                11,
                Decision::Apply,
            ),
            (
                Processing,
                Some(11),
                RequiresPaymentMethod,
                12,
                Decision::Apply,
            ),
            (
                Processing,
                Some(11),
                RequiresPaymentMethod,
                10,
                Decision::Ignore(IgnoreReason::Stale),
            ),
            (
                Processing,
                Some(11),
                RequiresAction,
                11,
                Decision::Ignore(IgnoreReason::StaleSameSecond),
            ),
            (RequiresAction, Some(11), Processing, 11, Decision::Apply),
            (Processing, Some(50), Succeeded, 10, Decision::Apply),
            (Processing, Some(50), Canceled, 10, Decision::Apply),
            (
                Succeeded,
                Some(10),
                Processing,
                99,
                Decision::Ignore(IgnoreReason::Terminal),
            ),
            (
                Succeeded,
                Some(10),
                Canceled,
                99,
                Decision::Ignore(IgnoreReason::Terminal),
            ),
            (
                Canceled,
                Some(10),
                Succeeded,
                99,
                Decision::Ignore(IgnoreReason::Terminal),
            ),
            (Succeeded, Some(10), Succeeded, 99, Decision::Unchanged),
            (Processing, Some(10), Processing, 99, Decision::Unchanged),
            (
                Superseded,
                None,
                Succeeded,
                99,
                Decision::SuccessAfterGiveUp,
            ),
            (
                Superseded,
                None,
                Canceled,
                99,
                Decision::Ignore(IgnoreReason::Terminal),
            ),
            (
                CreateFailed,
                None,
                Succeeded,
                99,
                Decision::Ignore(IgnoreReason::Terminal),
            ),
            (
                Processing,
                Some(10),
                Superseded,
                99,
                Decision::Ignore(IgnoreReason::NotAStripeStatus),
            ),
            (
                Processing,
                Some(10),
                Creating,
                99,
                Decision::Ignore(IgnoreReason::NotAStripeStatus),
            ),
        ];
        for (current, at, proposed, proposed_at, expected) in cases {
            assert_eq!(
                decide(current, at, proposed, proposed_at),
                expected,
                "{current} @ {at:?} <- {proposed} @ {proposed_at}"
            );
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn status() -> impl Strategy<Value = PaymentStatus> {
            proptest::sample::select(PaymentStatus::ALL.to_vec())
        }

        /// Applies a sequence of evidence and returns the final status.
        fn replay(start: PaymentStatus, evidence: &[(PaymentStatus, i64)]) -> PaymentStatus {
            let (mut status, mut at) = (start, None);
            for &(proposed, proposed_at) in evidence {
                match decide(status, at, proposed, proposed_at) {
                    Decision::Apply => {
                        status = proposed;
                        at = Some(proposed_at);
                    }
                    Decision::Unchanged => at = at.max(Some(proposed_at)),
                    _ => {}
                }
            }
            status
        }

        proptest! {
            #[test]
            fn terminal_statuses_absorb(current in status(), proposed in status(), at in 0i64..100, proposed_at in 0i64..100) {
                if current.is_terminal() {
                    prop_assert_ne!(decide(current, Some(at), proposed, proposed_at), Decision::Apply);
                }
            }

            #[test]
            fn order_of_non_terminal_evidence_does_not_matter(
                evidence in proptest::collection::vec((status(), 0i64..20), 1..8),
                seed in any::<u64>(),
            ) {
                // Distinct (time, status) pairs from one PaymentIntent: replayed in any order, the
                // same final status results.
                let mut evidence: Vec<_> = evidence.into_iter().filter(|(s, _)| s.is_stripe_status()).collect();
                evidence.sort();
                evidence.dedup();
                let mut shuffled = evidence.clone();
                let n = shuffled.len();
                if n > 1 {
                    let mut x = seed;
                    for i in (1..n).rev() {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        shuffled.swap(i, (x >> 33) as usize % (i + 1));
                    }
                }
                let terminals: Vec<_> = evidence.iter().filter(|(s, _)| s.is_terminal()).map(|(s, _)| *s).collect();
                let a = replay(PaymentStatus::Creating, &evidence);
                let b = replay(PaymentStatus::Creating, &shuffled);
                if terminals.len() <= 1 {
                    // With at most one terminal outcome (as Stripe guarantees), order never matters.
                    prop_assert_eq!(a, b);
                }
            }
        }
    }
}
