//! The fake's own clock: wall-clock time plus an offset that tests push forward, so that
//! "25 hours later" (idempotency keys forgotten, `created` filters) takes no real time.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct Clock {
    offset_secs: AtomicI64,
}

impl Clock {
    /// Unix seconds on the fake's clock.
    pub fn now(&self) -> i64 {
        wall_clock().saturating_add(self.offset_secs.load(Ordering::Relaxed))
    }

    pub fn offset_secs(&self) -> i64 {
        self.offset_secs.load(Ordering::Relaxed)
    }

    /// Moves the clock forward (never back: Stripe's time does not run backwards, and `created`
    /// order would stop matching creation order). Returns the new time.
    pub fn advance(&self, secs: u32) -> i64 {
        self.offset_secs
            .fetch_add(i64::from(secs), Ordering::Relaxed);
        self.now()
    }

    pub fn reset(&self) {
        self.offset_secs.store(0, Ordering::Relaxed);
    }
}

/// Real unix seconds; webhook signatures use this, since the receiver checks them against its own
/// wall clock, not against the fake's.
pub fn wall_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
