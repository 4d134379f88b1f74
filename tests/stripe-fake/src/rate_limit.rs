//! Optional emulation of Stripe's request rate limit (off by default): at most `per_second`
//! requests in each one-second window of real time; the rest get 429.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimit {
    per_second: Option<u32>,
    window_start: Instant,
    in_window: u32,
}

impl RateLimit {
    pub fn new(per_second: Option<u32>) -> RateLimit {
        RateLimit {
            per_second,
            window_start: Instant::now(),
            in_window: 0,
        }
    }

    pub fn per_second(&self) -> Option<u32> {
        self.per_second
    }

    pub fn set(&mut self, per_second: Option<u32>) {
        *self = RateLimit::new(per_second);
    }

    /// Counts a request; false when it is over the limit.
    pub fn admit(&mut self) -> bool {
        let Some(limit) = self.per_second else {
            return true;
        };
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window >= limit {
            return false;
        }
        self.in_window += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_within_a_window() {
        let mut limit = RateLimit::new(Some(3));
        let admitted = (0..10).filter(|_| limit.admit()).count();
        assert_eq!(admitted, 3);
        let mut off = RateLimit::new(None);
        assert!((0..1000).all(|_| off.admit()));
    }
}
