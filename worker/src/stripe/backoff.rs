//! Retry delays: exponential growth from the row's attempt number, full jitter, and
//! Stripe's `Retry-After` honoured but clamped.
//!
//! The exponential ceiling comes from `backon`'s [`ExponentialBuilder`] (without its own
//! jitter, which *adds* up to one delay on top, i.e. "equal jitter"). We then draw the
//! delay uniformly from `[0, ceiling]` — AWS's "full jitter", which spreads a burst of
//! retries (e.g. after a Stripe 5xx blip hit many commands at once) across the whole
//! window instead of re-synchronising them. The attempt number comes from the outbox row,
//! not from an in-memory counter, so the schedule survives worker restarts and hand-overs.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How long to wait before a retryable command may be claimed again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Ceiling for the first attempt.
    pub base: Duration,
    /// The ceiling never grows past this.
    pub max: Duration,
    /// `Retry-After` values above this are clamped to it.
    pub retry_after_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

// After 64 doublings any base has passed any sane max; stop iterating there.
const MAX_DOUBLINGS: u32 = 64;

impl RetryPolicy {
    /// The worker's default (and its flags' defaults).
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        base: Duration::from_millis(500),
        max: Duration::from_secs(120),
        retry_after_cap: Duration::from_secs(60),
    };

    /// The upper bound of the jitter window after attempt number `attempt` (1-based, as
    /// stored in `pay.outbox.attempts`): `min(max, base * 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let n = attempt.clamp(1, MAX_DOUBLINGS as i32) as usize;
        ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(n - 1)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A full-jitter delay: uniform in `[0, ceiling(attempt)]`.
    pub fn full_jitter(&self, attempt: i32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        ceiling.mul_f64(rng.f64())
    }

    /// The delay before the next attempt: full jitter, but never earlier than Stripe's
    /// `Retry-After` (clamped to `retry_after_cap`).
    pub fn delay(
        &self,
        attempt: i32,
        retry_after: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        let jitter = self.full_jitter(attempt, rng);
        match retry_after {
            Some(ra) => jitter.max(ra.min(self.retry_after_cap)),
            None => jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
            retry_after_cap: Duration::from_secs(60),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let want = [500u64, 1000, 2000, 4000, 8000, 16000, 30000, 30000];
        for (i, ms) in want.iter().enumerate() {
            assert_eq!(
                p.ceiling(i as i32 + 1),
                Duration::from_millis(*ms),
                "attempt {}",
                i + 1
            );
        }
        // Attempt 0 or negative (never stored, but be total) behaves like attempt 1.
        assert_eq!(p.ceiling(0), Duration::from_millis(500));
        assert_eq!(p.ceiling(-5), Duration::from_millis(500));
        // Huge attempt numbers neither overflow nor loop for long.
        assert_eq!(p.ceiling(i32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_ceiling_and_spreads() {
        let p = policy();
        let mut rng = fastrand::Rng::with_seed(7);
        for attempt in 1..=12 {
            let cap = p.ceiling(attempt);
            let mut below_half = 0;
            let n = 2000;
            for _ in 0..n {
                let d = p.full_jitter(attempt, &mut rng);
                assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
                if d < cap / 2 {
                    below_half += 1;
                }
            }
            // Uniform over [0, cap]: about half land below cap/2 (not "cap + jitter").
            assert!(
                (800..1200).contains(&below_half),
                "attempt {attempt}: {below_half}/{n}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_is_clamped() {
        let p = policy();
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..500 {
            let d = p.delay(1, Some(Duration::from_secs(3)), &mut rng);
            assert!(d >= Duration::from_secs(3) && d <= Duration::from_secs(3).max(p.ceiling(1)));
            let d = p.delay(1, Some(Duration::from_secs(3600)), &mut rng);
            assert_eq!(d, Duration::from_secs(60), "clamped to retry_after_cap");
            let d = p.delay(10, Some(Duration::ZERO), &mut rng);
            assert!(d <= p.ceiling(10));
        }
    }
}
