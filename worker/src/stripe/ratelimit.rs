//! A client-side rate limiter shared by every request of one worker.
//!
//! GCRA with a burst of one: each caller reserves the next free slot (`interval` after the
//! previous one) under a mutex and sleeps until it. Slots are handed out in the order callers
//! ask, so nothing — a retry, a cancel, a refund — can be starved by a stream of newer work,
//! and in any window of `t` seconds at most `t * rate + 1` requests start. Stripe allows 25
//! requests/s in test mode and 100 in live mode; the default of 20/s leaves headroom for the
//! reconciler and the dashboard.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// See the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `rate` requests per second; `0` (or anything not positive and finite) means unlimited.
    pub fn new(rate: f64) -> Self {
        let interval = (rate.is_finite() && rate > 0.0)
            .then(|| Duration::try_from_secs_f64(1.0 / rate).ok())
            .flatten();
        Self {
            interval,
            next: Mutex::new(None),
        }
    }

    /// Waits for the caller's slot. Cancel-safe: dropping the future forfeits the slot,
    /// which only makes the limiter more conservative.
    pub async fn acquire(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            // A poisoned lock only means another task panicked between two plain
            // assignments; the value is still a valid instant.
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = match *next {
                Some(n) if n > now => n,
                _ => now,
            };
            *next = Some(slot + interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn keeps_the_rate() {
        let limiter = Arc::new(RateLimiter::new(20.0));
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..100 {
            let l = limiter.clone();
            handles.push(tokio::spawn(async move {
                l.acquire().await;
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for h in handles {
            times.push(h.await.unwrap() - start);
        }
        times.sort();
        // 100 requests at 20/s: the last starts at 99 * 50 ms.
        assert_eq!(*times.last().unwrap(), Duration::from_millis(4950));
        // In every one-second window, at most 20 + 1 requests start.
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(1))
                .count();
            assert!(in_window <= 21, "window at {t:?}: {in_window}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn serves_in_arrival_order() {
        let limiter = Arc::new(RateLimiter::new(10.0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..20 {
            let l = limiter.clone();
            let o = order.clone();
            handles.push(tokio::spawn(async move {
                l.acquire().await;
                o.lock().unwrap().push(i);
            }));
            // Let task i reserve its slot before task i+1 exists.
            tokio::task::yield_now().await;
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_does_not_bank_a_burst() {
        let limiter = RateLimiter::new(10.0);
        limiter.acquire().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire().await;
        }
        assert_eq!(Instant::now() - start, Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0.0);
        let start = Instant::now();
        for _ in 0..10_000 {
            limiter.acquire().await;
        }
        assert_eq!(Instant::now(), start);
    }
}
