//! What became of a piece of Stripe evidence: one spelling of each outcome, shared by the
//! extension (which returns them to SQL as text) and the worker (which counts them).

use std::fmt;
use std::str::FromStr;

/// The outcome of applying a Stripe object or event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The payment changed.
    Applied,
    /// The payment already said this.
    Unchanged,
    /// Older than, or contradicted by, what the payment knows; audited, not applied.
    Ignored,
    /// Applied or kept, but marked for a human (amount or currency differs, a second
    /// PaymentIntent, a paid superseded attempt).
    Flagged,
    /// Reconciliation found a PaymentIntent carrying our metadata that its payment did not know.
    Adopted,
    /// The object names no payment of this database.
    NotOurs,
    /// An event kept without changing anything (no handler, not about a pgpay payment, or a
    /// signed object that cannot be applied).
    Stored,
    /// An event received before.
    Duplicate,
    /// A delivery refused before anything was stored (bad signature, not an event).
    Rejected,
    /// A signed event whose application failed: stored with the error, answered 200, kept
    /// for `pay.replay_events`.
    Quarantined,
    /// A signed event of a type whose circuit breaker is open: stored, answered 200, not
    /// applied; kept for `pay.replay_events`.
    Deferred,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Applied,
        Outcome::Unchanged,
        Outcome::Ignored,
        Outcome::Flagged,
        Outcome::Adopted,
        Outcome::NotOurs,
        Outcome::Stored,
        Outcome::Duplicate,
        Outcome::Rejected,
        Outcome::Quarantined,
        Outcome::Deferred,
    ];

    /// The spelling SQL callers see.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Ignored => "ignored",
            Outcome::Flagged => "flagged",
            Outcome::Adopted => "adopted",
            Outcome::NotOurs => "not_ours",
            Outcome::Stored => "stored",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
            Outcome::Quarantined => "quarantined",
            Outcome::Deferred => "deferred",
        }
    }

    /// Whether a payment changed (reconciliation counts these as its changes).
    pub fn changed_a_payment(self) -> bool {
        matches!(self, Outcome::Applied | Outcome::Flagged | Outcome::Adopted)
    }

    /// What `pay.ingest_webhook` and `pay.apply_stripe_event` answer for a stored event:
    /// `stored`, `quarantined` and `deferred` stay what they are, every other outcome of an
    /// applied event is `applied`.
    pub fn event_status(self) -> Outcome {
        match self {
            Outcome::Stored
            | Outcome::Duplicate
            | Outcome::Rejected
            | Outcome::Quarantined
            | Outcome::Deferred => self,
            _ => Outcome::Applied,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown outcome {0:?}")]
pub struct UnknownOutcome(pub String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOutcome(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_one_spelling_that_reads_back() {
        let mut seen = std::collections::HashSet::new();
        for o in Outcome::ALL {
            assert!(seen.insert(o.as_str()), "{o} spelled twice");
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(o));
        }
        assert!("Applied".parse::<Outcome>().is_err());
        assert!("".parse::<Outcome>().is_err());
    }

    #[test]
    fn event_status_collapses_applied_outcomes() {
        use Outcome::*;
        for (o, want) in [
            (Applied, Applied),
            (Unchanged, Applied),
            (Ignored, Applied),
            (Flagged, Applied),
            (Stored, Stored),
            (Duplicate, Duplicate),
            (Quarantined, Quarantined),
            (Deferred, Deferred),
        ] {
            assert_eq!(o.event_status(), want, "{o}");
        }
    }
}
