//! Bulk creation of PaymentIntents for benchmarks, straight into the store: 100,000 objects take a
//! fraction of a second instead of 100,000 HTTP requests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::charge::{Charge, ChargeStatus};
use crate::ids;
use crate::params::{MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS};
use crate::payment_intent::{PaymentIntent, Status};
use crate::state::{Ctx, State};

pub const MAX_SEED: u32 = 1_000_000;

/// `POST /_fake/seed` body. Every field but `count` is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    pub count: u32,
    /// Metadata for every PaymentIntent; `{i}` in a value becomes the object's index (0-based), so
    /// `{"pgpay_payment_id": "seed-{i}"}` gives each one its own value.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// `created` of the first object; defaults to `now - count * interval_secs`, so that all of
    /// them lie in the past.
    #[serde(default)]
    pub created_from: Option<i64>,
    /// Seconds between consecutive objects' `created`.
    #[serde(default = "one")]
    pub interval_secs: u32,
    #[serde(default = "default_amount")]
    pub amount: i64,
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Relative weights by status, e.g. `{"succeeded": 7, "canceled": 1, "requires_payment_method": 2}`.
    /// Statuses are dealt in a fixed repeating pattern, so the proportions are exact and the
    /// result is reproducible. Default: all `requires_payment_method`.
    #[serde(default)]
    pub status_mix: BTreeMap<String, u32>,
    /// Also record the events these objects would have produced (never delivered to webhooks).
    #[serde(default)]
    pub events: bool,
}

fn one() -> u32 {
    1
}

fn default_amount() -> i64 {
    1000
}

fn default_currency() -> String {
    "usd".into()
}

impl SeedRequest {
    pub fn new(count: u32) -> SeedRequest {
        SeedRequest {
            count,
            metadata: BTreeMap::new(),
            created_from: None,
            interval_secs: 1,
            amount: default_amount(),
            currency: default_currency(),
            status_mix: BTreeMap::new(),
            events: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedReport {
    pub created: u32,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub first_created: Option<i64>,
    pub last_created: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    #[error("count must be at most {MAX_SEED}")]
    TooMany,
    #[error("amount must be between 1 and 99999999")]
    Amount,
    #[error("currency {0:?} is not a three-letter ISO 4217 code")]
    Currency(String),
    #[error("metadata {0}")]
    Metadata(String),
    #[error("status_mix: {0}")]
    StatusMix(String),
}

pub fn seed(state: &mut State, now: i64, request: &SeedRequest) -> Result<SeedReport, SeedError> {
    if request.count > MAX_SEED {
        return Err(SeedError::TooMany);
    }
    if !(1..=pgpay_core::checkout::MAX_AMOUNT).contains(&request.amount) {
        return Err(SeedError::Amount);
    }
    let currency = pgpay_core::checkout::normalize_currency(&request.currency)
        .map_err(|_| SeedError::Currency(crate::error::shorten(&request.currency)))?;
    check_metadata(&request.metadata)?;
    let pattern = status_pattern(&request.status_mix)?;

    let count = i64::from(request.count);
    let interval = i64::from(request.interval_secs);
    let first_created = request
        .created_from
        .unwrap_or_else(|| now.saturating_sub(count.saturating_mul(interval)));
    let mut report = SeedReport {
        created: request.count,
        first_id: None,
        last_id: None,
        first_created: None,
        last_created: None,
    };
    for i in 0..request.count {
        let created = first_created.saturating_add(i64::from(i).saturating_mul(interval));
        let status = pattern[i as usize % pattern.len()];
        let id = ids::new_id("pi_");
        let mut pi = PaymentIntent::new(
            id.clone(),
            ids::client_secret(&id),
            request.amount,
            currency.clone(),
            created,
        );
        pi.metadata = request
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.replace("{i}", &i.to_string())))
            .collect();
        pi.status = status;
        match status {
            Status::Succeeded => {
                let charge = Charge {
                    id: ids::new_id("ch_"),
                    amount: request.amount,
                    amount_refunded: 0,
                    currency: currency.clone(),
                    created,
                    payment_intent: id.clone(),
                    payment_method: "pm_card_visa".into(),
                    status: ChargeStatus::Succeeded,
                    failure_code: None,
                    failure_message: None,
                };
                pi.amount_received = request.amount;
                pi.payment_method = Some(charge.payment_method.clone());
                pi.latest_charge = Some(charge.id.clone());
                state.charges.insert(charge.id.clone(), charge);
            }
            Status::Canceled => {
                pi.canceled_at = Some(created);
                pi.cancellation_reason = Some("abandoned".into());
            }
            Status::RequiresConfirmation => pi.payment_method = Some("pm_card_visa".into()),
            Status::RequiresAction => {
                pi.payment_method = Some("pm_card_authenticationRequired".into())
            }
            _ => {}
        }
        if request.events {
            let ctx = Ctx::internal(created);
            let mut at_creation = pi.clone();
            at_creation.status = Status::RequiresPaymentMethod;
            state.record_event(&ctx, "payment_intent.created", at_creation.to_json(), false);
            let follow_up = match status {
                Status::Succeeded => Some("payment_intent.succeeded"),
                Status::Canceled => Some("payment_intent.canceled"),
                Status::RequiresAction => Some("payment_intent.requires_action"),
                _ => None,
            };
            if let Some(kind) = follow_up {
                state.record_event(&ctx, kind, pi.to_json(), false);
            }
        }
        if i == 0 {
            report.first_id = Some(id.clone());
            report.first_created = Some(created);
        }
        report.last_id = Some(id);
        report.last_created = Some(created);
        state.payment_intents.insert(pi);
        state.counters.payment_intents_created += 1;
    }
    Ok(report)
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), SeedError> {
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(SeedError::Metadata(format!(
            "has more than {MAX_METADATA_KEYS} keys"
        )));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(SeedError::Metadata(format!(
                "key {:?} must have 1 to {MAX_METADATA_KEY_CHARS} characters",
                crate::error::shorten(key)
            )));
        }
        if value.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(SeedError::Metadata(format!(
                "value of {key:?} is longer than {MAX_METADATA_VALUE_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// One cycle of statuses with each status repeated by its weight.
fn status_pattern(mix: &BTreeMap<String, u32>) -> Result<Vec<Status>, SeedError> {
    if mix.is_empty() {
        return Ok(vec![Status::RequiresPaymentMethod]);
    }
    let mut pattern = Vec::new();
    for (name, weight) in mix {
        let status = Status::parse(name)
            .filter(|s| *s != Status::Processing && *s != Status::RequiresCapture)
            .ok_or_else(|| {
                SeedError::StatusMix(format!(
                    "unsupported status {:?}",
                    crate::error::shorten(name)
                ))
            })?;
        if pattern.len() + *weight as usize > 10_000 {
            return Err(SeedError::StatusMix(
                "weights must add up to at most 10000".into(),
            ));
        }
        pattern.extend(std::iter::repeat_n(status, *weight as usize));
    }
    if pattern.is_empty() {
        return Err(SeedError::StatusMix("weights must not all be zero".into()));
    }
    Ok(pattern)
}
