//! Which shape of Stripe's Billing objects the fake renders. Stripe moved fields in API version
//! `2025-03-31.basil`: an invoice names its subscription in `parent.subscription_details`
//! (formerly `subscription` and `subscription_details`), billing periods live on subscription items
//! (formerly `current_period_start/end` on the subscription), and invoice line items describe
//! their origin in `parent` and their price in `pricing`. Events are rendered in the account's
//! version (configurable, switchable at runtime); API answers in the request's `Stripe-Version`
//! when it sends one, as Stripe does.

use crate::error::{shorten, ApiError};

/// The first version with the new Billing shapes.
pub const BASIL: &str = "2025-03-31.basil";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Before 2025-03-31 (`2024-06-20`, the fake's default).
    Legacy,
    /// 2025-03-31.basil and later.
    Basil,
}

impl Shape {
    /// The shape a version renders: dates compare as text (`YYYY-MM-DD[.name]`).
    pub fn of(version: &str) -> Shape {
        if version.get(..10).is_some_and(|date| date >= &BASIL[..10]) {
            Shape::Basil
        } else {
            Shape::Legacy
        }
    }
}

/// Checks a version's form (`2024-06-20`, `2025-03-31.basil`): Stripe refuses anything else.
pub fn validate(version: &str) -> Result<(), ApiError> {
    let bytes = version.as_bytes();
    let date_ok = bytes.len() >= 10
        && bytes[..10].iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    let suffix_ok = match version.get(10..) {
        Some("") => true,
        Some(rest) => {
            rest.len() <= 40
                && rest.starts_with('.')
                && rest[1..].bytes().all(|b| b.is_ascii_lowercase())
                && rest.len() > 1
        }
        None => false,
    };
    if date_ok && suffix_ok {
        Ok(())
    } else {
        Err(ApiError::invalid_request(format!(
            "Invalid Stripe API version: {}. Versions look like 2024-06-20 or 2025-03-31.basil.",
            shorten(version)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_by_date() {
        assert_eq!(Shape::of("2024-06-20"), Shape::Legacy);
        assert_eq!(Shape::of("2025-02-24.acacia"), Shape::Legacy);
        assert_eq!(Shape::of("2025-03-31.basil"), Shape::Basil);
        assert_eq!(Shape::of("2025-09-30.clover"), Shape::Basil);
        assert_eq!(Shape::of("x"), Shape::Legacy);
    }

    #[test]
    fn version_forms() {
        for good in ["2024-06-20", "2025-03-31.basil"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2024-6-20",
            "2024-06-20.",
            "2024-06-20.Basil",
            "latest",
            "2024-06-20x",
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}
