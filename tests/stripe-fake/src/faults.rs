//! Fault injection: rules matching method and path, firing for the next N matching requests or with
//! a probability drawn from a seeded generator, so a failing chaos run can be replayed exactly.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// Longest injectable latency: long enough to hold a key in flight, short enough not to hang a test.
pub const MAX_LATENCY_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Do the work and store the idempotent answer, then close the connection without answering:
    /// the client cannot tell whether its request happened.
    DropResponseAfterCommit,
    /// Answer 500 `api_error` with `Stripe-Should-Retry: true`; nothing happens, nothing is stored.
    FailBeforeCommit,
    /// Answer 429 with `Retry-After: retry_after_secs`.
    RateLimit,
    /// Wait `latency_ms` after taking the idempotency key and before doing the work.
    Latency,
    /// Close the connection without reading further or doing anything.
    ResetConnection,
}

impl FaultAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultAction::DropResponseAfterCommit => "drop_response_after_commit",
            FaultAction::FailBeforeCommit => "fail_before_commit",
            FaultAction::RateLimit => "rate_limit",
            FaultAction::Latency => "latency",
            FaultAction::ResetConnection => "reset_connection",
        }
    }
}

/// One rule. JSON: `{"method":"POST","path":"/v1/payment_intents/*","action":"latency",
/// "latency_ms":300,"times":1}`. `method` defaults to `*`; in `path`, `*` matches any run of
/// characters, `/` included. With neither `times` nor `probability` the rule fires on every match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default = "any")]
    pub method: String,
    pub path: String,
    pub action: FaultAction,
    /// Fire for at most this many matching requests.
    #[serde(default)]
    pub times: Option<u32>,
    /// Fire on each matching request with this probability (0..=1).
    #[serde(default)]
    pub probability: Option<f64>,
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default = "one")]
    pub retry_after_secs: u64,
}

fn any() -> String {
    "*".into()
}

fn one() -> u64 {
    1
}

impl FaultRule {
    pub fn new(
        method: impl Into<String>,
        path: impl Into<String>,
        action: FaultAction,
    ) -> FaultRule {
        FaultRule {
            method: method.into(),
            path: path.into(),
            action,
            times: None,
            probability: None,
            latency_ms: 0,
            retry_after_secs: 1,
        }
    }

    pub fn times(mut self, times: u32) -> FaultRule {
        self.times = Some(times);
        self
    }

    pub fn probability(mut self, probability: f64) -> FaultRule {
        self.probability = Some(probability);
        self
    }

    pub fn latency_ms(mut self, ms: u64) -> FaultRule {
        self.latency_ms = ms;
        self
    }

    pub fn retry_after_secs(mut self, secs: u64) -> FaultRule {
        self.retry_after_secs = secs;
        self
    }

    fn validate(&self) -> Result<(), FaultError> {
        if self.path.is_empty() {
            return Err(FaultError::EmptyPath);
        }
        if let Some(p) = self.probability {
            if !(0.0..=1.0).contains(&p) {
                return Err(FaultError::Probability(p));
            }
        }
        if self.action == FaultAction::Latency && !(1..=MAX_LATENCY_MS).contains(&self.latency_ms) {
            return Err(FaultError::Latency(self.latency_ms));
        }
        Ok(())
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method.eq_ignore_ascii_case(method))
            && glob_match(self.path.as_bytes(), path.as_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultError {
    #[error("path must not be empty (use \"*\" for every path)")]
    EmptyPath,
    #[error("probability must be between 0 and 1, got {0}")]
    Probability(f64),
    #[error("a latency rule needs latency_ms between 1 and {MAX_LATENCY_MS}, got {0}")]
    Latency(u64),
}

/// A rule as it stands: how often it fired and how many firings it has left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultStatus {
    pub id: u64,
    pub rule: FaultRule,
    pub fired: u64,
    pub remaining: Option<u32>,
}

/// What fired for one request. Several rules may fire at once (say latency and a dropped answer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fired {
    pub reset_connection: bool,
    pub rate_limit_secs: Option<u64>,
    pub fail_before_commit: bool,
    pub latency_ms: u64,
    pub drop_response_after_commit: bool,
    pub actions: Vec<FaultAction>,
}

#[derive(Debug)]
pub struct Faults {
    rules: Vec<FaultStatus>,
    next_id: u64,
    rng: StdRng,
}

impl Faults {
    pub fn new(seed: u64) -> Faults {
        Faults {
            rules: Vec::new(),
            next_id: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn add(&mut self, rule: FaultRule) -> Result<u64, FaultError> {
        rule.validate()?;
        self.next_id += 1;
        self.rules.push(FaultStatus {
            id: self.next_id,
            remaining: rule.times,
            rule,
            fired: 0,
        });
        Ok(self.next_id)
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn list(&self) -> Vec<FaultStatus> {
        self.rules.clone()
    }

    /// Decides which rules fire for this request, consuming their `times`.
    pub fn fire(&mut self, method: &str, path: &str) -> Fired {
        let mut fired = Fired::default();
        for status in &mut self.rules {
            if status.remaining == Some(0) || !status.rule.matches(method, path) {
                continue;
            }
            if let Some(p) = status.rule.probability {
                if !self.rng.random_bool(p) {
                    continue;
                }
            }
            if let Some(remaining) = &mut status.remaining {
                *remaining -= 1;
            }
            status.fired += 1;
            let rule = &status.rule;
            fired.actions.push(rule.action);
            match rule.action {
                FaultAction::ResetConnection => fired.reset_connection = true,
                FaultAction::RateLimit => {
                    fired.rate_limit_secs.get_or_insert(rule.retry_after_secs);
                }
                FaultAction::FailBeforeCommit => fired.fail_before_commit = true,
                FaultAction::Latency => fired.latency_ms += rule.latency_ms,
                FaultAction::DropResponseAfterCommit => fired.drop_response_after_commit = true,
            }
        }
        fired.latency_ms = fired.latency_ms.min(MAX_LATENCY_MS);
        fired
    }
}

/// `*` matches any run of bytes; everything else matches itself. Linear-time backtracking on the
/// last star, so a hostile pattern cannot blow up.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let cases = [
            ("/v1/payment_intents", "/v1/payment_intents", true),
            ("/v1/payment_intents", "/v1/payment_intents/pi_1", false),
            ("/v1/payment_intents/*", "/v1/payment_intents/pi_1", true),
            (
                "/v1/payment_intents/*",
                "/v1/payment_intents/pi_1/confirm",
                true,
            ),
            ("/v1/payment_intents/*", "/v1/payment_intents", false),
            ("*/confirm", "/v1/payment_intents/pi_1/confirm", true),
            ("*", "/anything", true),
            ("/v1/*/cancel", "/v1/payment_intents/pi_1/cancel", true),
            ("/v1/*/cancel", "/v1/payment_intents/pi_1/confirm", false),
            ("**a", "bbbb", false),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), path.as_bytes()),
                expected,
                "{pattern} {path}"
            );
        }
    }

    #[test]
    fn times_and_probability() {
        let mut faults = Faults::new(7);
        faults
            .add(
                FaultRule::new("POST", "/v1/payment_intents", FaultAction::FailBeforeCommit)
                    .times(2),
            )
            .expect("valid");
        assert!(faults.fire("GET", "/v1/payment_intents").actions.is_empty());
        assert!(
            faults
                .fire("post", "/v1/payment_intents")
                .fail_before_commit
        );
        assert!(
            faults
                .fire("POST", "/v1/payment_intents")
                .fail_before_commit
        );
        assert!(
            !faults
                .fire("POST", "/v1/payment_intents")
                .fail_before_commit
        );

        let draws = |seed| {
            let mut faults = Faults::new(seed);
            faults
                .add(FaultRule::new("*", "*", FaultAction::RateLimit).probability(0.5))
                .expect("valid");
            (0..64)
                .map(|_| faults.fire("GET", "/x").rate_limit_secs.is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1), "same seed, same faults");
        let hits = draws(1).into_iter().filter(|&b| b).count();
        assert!((10..=54).contains(&hits), "{hits} of 64 at p=0.5");
    }

    #[test]
    fn invalid_rules() {
        let mut faults = Faults::new(0);
        assert_eq!(
            faults.add(FaultRule::new("*", "*", FaultAction::Latency)),
            Err(FaultError::Latency(0))
        );
        assert_eq!(
            faults.add(FaultRule::new("*", "*", FaultAction::RateLimit).probability(1.5)),
            Err(FaultError::Probability(1.5))
        );
        assert_eq!(
            faults.add(FaultRule::new("*", "", FaultAction::RateLimit)),
            Err(FaultError::EmptyPath)
        );
    }
}
