//! Stripe's idempotency keys, per (API key, `Idempotency-Key`), kept for a retention period on the
//! fake's clock (24 hours by default):
//! - first use: the request runs; its answer is stored unless it is a 5xx, a 429, or a failure of
//!   parameter validation (Stripe saves a result only once the endpoint began executing);
//! - same key, same method, path and parameters: the stored answer is replayed, nothing runs;
//! - same key, anything else different: 400 `idempotency_error`;
//! - same key while the first request is still running: 409 `idempotency_error`, retryable.

use std::collections::HashMap;

use bytes::Bytes;

use crate::error::{shorten, ApiError};

pub const DEFAULT_RETENTION_SECS: i64 = 24 * 60 * 60;
/// Stripe refuses longer keys.
pub const MAX_KEY_CHARS: usize = 255;
/// Expired keys are swept every this many new keys, so memory stays bounded without a timer.
const PRUNE_EVERY: u32 = 1024;

/// What identifies "the same request".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub method: String,
    pub path: String,
    /// Canonical JSON of the parsed parameters: the order they were sent in does not matter.
    pub params: String,
}

/// An answer kept for replay, byte for byte.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Bytes,
    /// The `Request-Id` of the request that produced it, sent back as `Original-Request`.
    pub request_id: String,
}

#[derive(Debug)]
enum Slot {
    InFlight { token: u64 },
    Done(StoredResponse),
}

#[derive(Debug)]
struct Entry {
    first_seen: i64,
    fingerprint: Fingerprint,
    slot: Slot,
}

/// The outcome of presenting a key.
#[derive(Debug)]
pub enum Begin {
    /// Run the request, then call [`IdempotencyStore::complete`] with this token.
    Proceed(u64),
    Replay(StoredResponse),
    Mismatch(ApiError),
    InFlight(ApiError),
}

#[derive(Debug)]
pub struct IdempotencyStore {
    entries: HashMap<(String, String), Entry>,
    retention_secs: i64,
    next_token: u64,
    since_prune: u32,
}

impl IdempotencyStore {
    pub fn new(retention_secs: i64) -> IdempotencyStore {
        IdempotencyStore {
            entries: HashMap::new(),
            retention_secs,
            next_token: 0,
            since_prune: 0,
        }
    }

    pub fn retention_secs(&self) -> i64 {
        self.retention_secs
    }

    /// Applies to keys already stored too: expiry is judged when a key is presented.
    pub fn set_retention(&mut self, secs: i64) {
        self.retention_secs = secs;
    }

    pub fn begin(&mut self, api_key: &str, key: &str, fingerprint: Fingerprint, now: i64) -> Begin {
        self.since_prune += 1;
        if self.since_prune >= PRUNE_EVERY {
            self.prune(now);
        }
        let slot_key = (api_key.to_owned(), key.to_owned());
        if let Some(entry) = self.entries.get(&slot_key) {
            if !self.expired(entry, now) {
                return judge(entry, &fingerprint, key);
            }
        }
        self.next_token += 1;
        let token = self.next_token;
        self.entries.insert(
            slot_key,
            Entry {
                first_seen: now,
                fingerprint,
                slot: Slot::InFlight { token },
            },
        );
        Begin::Proceed(token)
    }

    /// Stores the answer of the request holding `token`, or forgets the key (`None`) so that a
    /// retry runs afresh. A stale token (the key expired and was reused meanwhile) changes nothing.
    pub fn complete(
        &mut self,
        api_key: &str,
        key: &str,
        token: u64,
        answer: Option<StoredResponse>,
    ) {
        let slot_key = (api_key.to_owned(), key.to_owned());
        let Some(entry) = self.entries.get_mut(&slot_key) else {
            return;
        };
        if !matches!(entry.slot, Slot::InFlight { token: t } if t == token) {
            return;
        }
        match answer {
            Some(answer) => entry.slot = Slot::Done(answer),
            None => {
                self.entries.remove(&slot_key);
            }
        }
    }

    /// (stored answers, requests in flight), counting only live keys.
    pub fn counts(&self, now: i64) -> (u64, u64) {
        let mut stored = 0;
        let mut in_flight = 0;
        for entry in self.entries.values().filter(|e| !self.expired(e, now)) {
            match entry.slot {
                Slot::Done(_) => stored += 1,
                Slot::InFlight { .. } => in_flight += 1,
            }
        }
        (stored, in_flight)
    }

    fn expired(&self, entry: &Entry, now: i64) -> bool {
        // A request still running keeps its key however long it takes.
        matches!(entry.slot, Slot::Done(_))
            && now.saturating_sub(entry.first_seen) >= self.retention_secs
    }

    fn prune(&mut self, now: i64) {
        self.since_prune = 0;
        let retention = self.retention_secs;
        self.entries.retain(|_, e| {
            matches!(e.slot, Slot::InFlight { .. }) || now.saturating_sub(e.first_seen) < retention
        });
    }
}

fn judge(entry: &Entry, fingerprint: &Fingerprint, key: &str) -> Begin {
    let first = &entry.fingerprint;
    let key = shorten(key);
    if first.method != fingerprint.method || first.path != fingerprint.path {
        return Begin::Mismatch(ApiError::idempotency_mismatch(format!(
            "Keys for idempotent requests can only be used for the same endpoint they were first used for ('{} {}' vs '{} {}'). Try using a key other than '{key}' if you meant to execute a different request.",
            first.method,
            shorten(&first.path),
            fingerprint.method,
            shorten(&fingerprint.path)
        )));
    }
    if first.params != fingerprint.params {
        return Begin::Mismatch(ApiError::idempotency_mismatch(format!(
            "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
        )));
    }
    match &entry.slot {
        Slot::InFlight { .. } => Begin::InFlight(ApiError::idempotency_in_flight()),
        Slot::Done(answer) => Begin::Replay(answer.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(params: &str) -> Fingerprint {
        Fingerprint {
            method: "POST".into(),
            path: "/v1/payment_intents".into(),
            params: params.into(),
        }
    }

    fn answer() -> StoredResponse {
        StoredResponse {
            status: 200,
            body: Bytes::from_static(b"{}"),
            request_id: "req_1".into(),
        }
    }

    #[test]
    fn lifecycle() {
        let mut store = IdempotencyStore::new(100);
        let Begin::Proceed(token) = store.begin("sk", "k", fp("a"), 1000) else {
            panic!("first use proceeds")
        };
        assert!(matches!(
            store.begin("sk", "k", fp("a"), 1000),
            Begin::InFlight(_)
        ));
        assert!(matches!(
            store.begin("sk", "k", fp("b"), 1000),
            Begin::Mismatch(_)
        ));
        assert!(matches!(
            store.begin("other", "k", fp("b"), 1000),
            Begin::Proceed(_)
        ));
        store.complete("sk", "k", token, Some(answer()));
        assert!(matches!(store.begin("sk", "k", fp("a"), 1099), Begin::Replay(a) if a == answer()));
        assert!(matches!(
            store.begin("sk", "k", fp("b"), 1099),
            Begin::Mismatch(_)
        ));
        // Retention passed: the key is new again.
        assert!(matches!(
            store.begin("sk", "k", fp("b"), 1100),
            Begin::Proceed(_)
        ));
    }

    #[test]
    fn forgotten_answers_and_stale_tokens() {
        let mut store = IdempotencyStore::new(100);
        let Begin::Proceed(token) = store.begin("sk", "k", fp("a"), 0) else {
            panic!("first use proceeds")
        };
        store.complete("sk", "k", token, None);
        let Begin::Proceed(second) = store.begin("sk", "k", fp("b"), 0) else {
            panic!("a forgotten key is new")
        };
        store.complete("sk", "k", token, Some(answer()));
        assert_eq!(store.counts(0), (0, 1), "a stale token stores nothing");
        store.complete("sk", "k", second, Some(answer()));
        assert_eq!(store.counts(0), (1, 0));
        assert_eq!(store.counts(100), (0, 0));
    }
}
