//! The one rule for a subscription's status, and the one for an invoice's, used for webhooks,
//! outbox answers and reconciliation alike (the writes are `pay._apply_billing_object`).
//!
//! `canceled` and `incomplete_expired` absorb every other status: Stripe never brings such a
//! subscription back. Among the others the newest evidence wins: Stripe's `created` time of the
//! event (or when an API answer was read), then the status's rank, so two pieces of evidence from
//! the same second are ordered the same way every time. The resulting status is the greatest
//! evidence under one total order, which is why any order of arrival leaves the same status.
//!
//! Invoices follow the same shape of rule: `paid` and `void` absorb (a late `invoice.finalized`
//! never reopens a paid invoice), otherwise the newest evidence wins.

use std::fmt;
use std::str::FromStr;

/// A subscription's status, as Stripe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubscriptionStatus {
    Incomplete,
    Trialing,
    Active,
    PastDue,
    Unpaid,
    Paused,
    IncompleteExpired,
    Canceled,
}

impl SubscriptionStatus {
    pub const ALL: [SubscriptionStatus; 8] = [
        SubscriptionStatus::Incomplete,
        SubscriptionStatus::Trialing,
        SubscriptionStatus::Active,
        SubscriptionStatus::PastDue,
        SubscriptionStatus::Unpaid,
        SubscriptionStatus::Paused,
        SubscriptionStatus::IncompleteExpired,
        SubscriptionStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Incomplete => "incomplete",
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Unpaid => "unpaid",
            SubscriptionStatus::Paused => "paused",
            SubscriptionStatus::IncompleteExpired => "incomplete_expired",
            SubscriptionStatus::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired
        )
    }

    /// Breaks ties between evidence from the same second: further along a subscription's life.
    fn rank(self) -> u8 {
        self as u8
    }
}

/// An invoice's status, as Stripe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvoiceStatus {
    Draft,
    Open,
    Uncollectible,
    Paid,
    Void,
}

impl InvoiceStatus {
    pub const ALL: [InvoiceStatus; 5] = [
        InvoiceStatus::Draft,
        InvoiceStatus::Open,
        InvoiceStatus::Uncollectible,
        InvoiceStatus::Paid,
        InvoiceStatus::Void,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Draft => "draft",
            InvoiceStatus::Open => "open",
            InvoiceStatus::Uncollectible => "uncollectible",
            InvoiceStatus::Paid => "paid",
            InvoiceStatus::Void => "void",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, InvoiceStatus::Paid | InvoiceStatus::Void)
    }

    fn rank(self) -> u8 {
        self as u8
    }
}

/// A status name this version does not know (Stripe adds statuses: kept and ignored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for SubscriptionStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SubscriptionStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl FromStr for InvoiceStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InvoiceStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for InvoiceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a piece of evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Mirror the object: its status (which may be the current one) and its other fields.
    Apply,
    /// Keep the row as it is and audit the evidence as ignored.
    Ignore(Ignored),
}

/// Why evidence was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The current status is terminal and the evidence proposes a non-terminal one.
    Terminal,
    /// Newer evidence was applied already.
    Stale,
}

impl Decision {
    /// The spelling SQL reads: `apply`, `ignore:terminal`, `ignore:stale`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Apply => "apply",
            Decision::Ignore(Ignored::Terminal) => "ignore:terminal",
            Decision::Ignore(Ignored::Stale) => "ignore:stale",
        }
    }
}

/// The order evidence is compared in: terminal first, then Stripe time, then rank.
type Key = (bool, i64, u8);

fn decide_by_key(current: Option<Key>, proposed: Key) -> Decision {
    match current {
        None => Decision::Apply,
        Some(current) if proposed >= current => Decision::Apply,
        Some(current) if current.0 && !proposed.0 => Decision::Ignore(Ignored::Terminal),
        Some(_) => Decision::Ignore(Ignored::Stale),
    }
}

/// The subscription rule. `current` is the stored status and the Stripe time of the evidence
/// that set it (`None` before Stripe reported any status); `at` is the new evidence's time.
/// Evidence equal to the current one applies (a repeat changes nothing).
pub fn decide(
    current: Option<(SubscriptionStatus, i64)>,
    proposed: SubscriptionStatus,
    at: i64,
) -> Decision {
    decide_by_key(
        current.map(|(s, t)| (s.is_terminal(), t, s.rank())),
        (proposed.is_terminal(), at, proposed.rank()),
    )
}

/// The invoice rule, the same shape as [`decide`].
pub fn decide_invoice(
    current: Option<(InvoiceStatus, i64)>,
    proposed: InvoiceStatus,
    at: i64,
) -> Decision {
    decide_by_key(
        current.map(|(s, t)| (s.is_terminal(), t, s.rank())),
        (proposed.is_terminal(), at, proposed.rank()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use SubscriptionStatus::*;

    fn replay(evidence: &[(SubscriptionStatus, i64)]) -> Option<(SubscriptionStatus, i64)> {
        let mut current = None;
        for &(status, at) in evidence {
            if decide(current, status, at) == Decision::Apply {
                current = Some((status, at));
            }
        }
        current
    }

    fn shuffle<T>(items: &mut [T], seed: u64) {
        let mut x = seed;
        for i in (1..items.len()).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            items.swap(i, (x >> 33) as usize % (i + 1));
        }
    }

    #[test]
    fn table() {
        for (current, proposed, at, want) in [
            (None, Active, 5, "apply"),
            (Some((Incomplete, 5)), Active, 6, "apply"),
            (Some((Active, 6)), PastDue, 7, "apply"),
            (Some((PastDue, 7)), Active, 6, "ignore:stale"),
            (Some((Active, 7)), PastDue, 7, "apply"),
            (Some((PastDue, 7)), Active, 7, "ignore:stale"),
            (Some((Active, 7)), Active, 7, "apply"),
            (Some((Canceled, 7)), Active, 9, "ignore:terminal"),
            (Some((IncompleteExpired, 7)), Active, 9, "ignore:terminal"),
            (Some((Active, 9)), Canceled, 3, "apply"),
            (Some((Canceled, 9)), Canceled, 9, "apply"),
            (Some((Canceled, 9)), Canceled, 3, "ignore:stale"),
        ] {
            assert_eq!(
                decide(current, proposed, at).as_str(),
                want,
                "{current:?} {proposed} {at}"
            );
        }
    }

    #[test]
    fn invoice_table() {
        use InvoiceStatus::*;
        for (current, proposed, at, want) in [
            (None, Draft, 1, "apply"),
            (Some((Draft, 1)), Open, 2, "apply"),
            (Some((Open, 2)), Paid, 3, "apply"),
            (Some((Paid, 3)), Open, 9, "ignore:terminal"),
            (Some((Open, 5)), Draft, 4, "ignore:stale"),
            (Some((Uncollectible, 5)), Paid, 6, "apply"),
            (Some((Paid, 5)), Paid, 9, "apply"),
        ] {
            assert_eq!(decide_invoice(current, proposed, at).as_str(), want);
        }
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_errors() {
        for s in SubscriptionStatus::ALL {
            assert_eq!(s.as_str().parse::<SubscriptionStatus>(), Ok(s));
        }
        for s in InvoiceStatus::ALL {
            assert_eq!(s.as_str().parse::<InvoiceStatus>(), Ok(s));
        }
        assert!("paused_forever".parse::<SubscriptionStatus>().is_err());
        assert!("PAID".parse::<InvoiceStatus>().is_err());
    }

    fn status() -> impl Strategy<Value = SubscriptionStatus> {
        prop::sample::select(SubscriptionStatus::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn order_of_evidence_does_not_matter(
            evidence in proptest::collection::vec((status(), 0i64..20), 1..10),
            seed in any::<u64>(),
        ) {
            let mut shuffled = evidence.clone();
            shuffle(&mut shuffled, seed);
            prop_assert_eq!(replay(&evidence), replay(&shuffled));
        }

        #[test]
        fn terminal_statuses_absorb(
            current in status(), at in 0i64..100, proposed in status(), proposed_at in 0i64..100,
        ) {
            if current.is_terminal() && !proposed.is_terminal() {
                prop_assert_eq!(decide(Some((current, at)), proposed, proposed_at), Decision::Ignore(Ignored::Terminal));
            }
        }

        #[test]
        fn newest_non_terminal_evidence_wins(
            evidence in proptest::collection::vec((status(), 0i64..1000), 1..10),
        ) {
            // Without a terminal status, the final status is the one of the newest evidence.
            let evidence: Vec<_> = evidence.into_iter().filter(|(s, _)| !s.is_terminal()).collect();
            if let Some(newest) = evidence.iter().map(|(_, t)| *t).max() {
                let (status, at) = replay(&evidence).expect("some evidence applies");
                prop_assert_eq!(at, newest);
                prop_assert!(evidence.contains(&(status, at)));
            }
        }

        #[test]
        fn order_of_invoice_evidence_does_not_matter_and_paid_stays_paid(
            evidence in proptest::collection::vec(
                (prop::sample::select(InvoiceStatus::ALL.to_vec()), 0i64..20), 1..10),
            seed in any::<u64>(),
        ) {
            let replay_invoice = |evidence: &[(InvoiceStatus, i64)]| {
                let mut current = None;
                for &(status, at) in evidence {
                    if decide_invoice(current, status, at) == Decision::Apply {
                        current = Some((status, at));
                    }
                }
                current
            };
            let mut shuffled = evidence.clone();
            shuffle(&mut shuffled, seed);
            let (a, b) = (replay_invoice(&evidence), replay_invoice(&shuffled));
            prop_assert_eq!(a, b);
            if evidence.iter().any(|(s, _)| *s == InvoiceStatus::Paid)
                && !evidence.iter().any(|(s, _)| *s == InvoiceStatus::Void)
            {
                prop_assert_eq!(a.map(|(s, _)| s), Some(InvoiceStatus::Paid));
            }
        }

        #[test]
        fn once_terminal_always_terminal(
            evidence in proptest::collection::vec((status(), 0i64..20), 1..10),
        ) {
            if evidence.iter().any(|(s, _)| s.is_terminal()) {
                let (status, _) = replay(&evidence).expect("some evidence applies");
                prop_assert!(status.is_terminal());
            }
        }
    }
}
