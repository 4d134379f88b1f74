//! Input rules for `pay.begin_subscription` and `pay.change_subscription`, applied before
//! anything is written. Each error names its argument (SQLSTATE 22023 on the SQL side).

use serde_json::Value;

use crate::billing::CLAIM_KEY;
use crate::checkout::{self, CheckoutError};

/// Longest `subscription_ref`, as `order_ref`.
pub const MAX_SUBSCRIPTION_REF_CHARS: usize = 200;
/// Stripe's ids are short; a price id longer than this is not one.
pub const MAX_PRICE_CHARS: usize = 255;
/// A subscription item's quantity: Stripe takes a positive integer; pgpay caps it so that a
/// typo (a price in cents passed as the quantity) is refused rather than billed.
pub const MAX_QUANTITY: i32 = 1_000_000;
/// Metadata keys pgpay writes itself on the session and the subscription.
pub const RESERVED_KEYS: [&str; 3] = [CLAIM_KEY, "subscription_ref", "customer_ref"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("subscription_ref {0}")]
    SubscriptionRef(String),
    #[error("price must be a Stripe Price id such as 'price_1MoBy5LkdIwHu7ixZhnattbh', got {0:?}")]
    Price(String),
    #[error("quantity must be between 1 and {MAX_QUANTITY}, got {0}")]
    Quantity(i64),
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    #[error("metadata key {0:?} is reserved by pgpay")]
    ReservedKey(String),
}

pub fn validate_subscription_ref(subscription_ref: &str) -> Result<(), SubscribeError> {
    let bad = |why: &str| Err(SubscribeError::SubscriptionRef(why.to_owned()));
    if subscription_ref.trim().is_empty() {
        return bad("must not be empty");
    }
    if subscription_ref.chars().count() > MAX_SUBSCRIPTION_REF_CHARS {
        return bad("is longer than 200 characters");
    }
    if subscription_ref.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
}

/// A Price id: `price_` (or a legacy plan id) of ASCII letters, digits and underscores.
pub fn validate_price(price: &str) -> Result<(), SubscribeError> {
    let ok = !price.is_empty()
        && price.len() <= MAX_PRICE_CHARS
        && price
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        let shown: String = price.chars().take(48).collect();
        Err(SubscribeError::Price(shown))
    }
}

pub fn validate_quantity(quantity: i64) -> Result<(), SubscribeError> {
    if (1..=i64::from(MAX_QUANTITY)).contains(&quantity) {
        Ok(())
    } else {
        Err(SubscribeError::Quantity(quantity))
    }
}

/// Stripe's metadata rules (as for a checkout, whose reserved keys stay reserved: a
/// `pgpay_payment_id` on a subscription would claim a payment), and none of pgpay's
/// subscription keys.
pub fn validate_metadata(metadata: &Value) -> Result<(), SubscribeError> {
    if let Some(object) = metadata.as_object() {
        if let Some(key) = RESERVED_KEYS.iter().find(|k| object.contains_key(**k)) {
            return Err(SubscribeError::ReservedKey((*key).to_owned()));
        }
    }
    checkout::validate_metadata(metadata)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_argument_is_named_when_wrong() {
        for (result, named) in [
            (validate_subscription_ref(""), "subscription_ref"),
            (validate_subscription_ref(" "), "subscription_ref"),
            (
                validate_subscription_ref(&"x".repeat(201)),
                "subscription_ref",
            ),
            (validate_subscription_ref("a\nb"), "subscription_ref"),
            (validate_price(""), "price"),
            (validate_price("price 1"), "price"),
            (validate_price("price_1; DROP"), "price"),
            (validate_quantity(0), "quantity"),
            (validate_quantity(-3), "quantity"),
            (validate_quantity(1_000_001), "quantity"),
            (
                validate_metadata(&json!({"pgpay_subscription_id": "x"})),
                "metadata",
            ),
            (
                validate_metadata(&json!({"subscription_ref": "x"})),
                "metadata",
            ),
            (validate_metadata(&json!({"plan": 3})), "metadata"),
            (validate_metadata(&json!([1])), "metadata"),
        ] {
            let message = result.expect_err(named).to_string();
            assert!(message.starts_with(named), "{message}");
        }
        assert!(validate_subscription_ref("acct-42/seat 3").is_ok());
        assert!(validate_price("price_1MoBy5LkdIwHu7ixZhnattbh").is_ok());
        assert!(validate_quantity(1).is_ok() && validate_quantity(1_000_000).is_ok());
        assert!(validate_metadata(&json!({"plan": "pro"})).is_ok());
    }
}
