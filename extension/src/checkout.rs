//! Input rules for `pay.begin_checkout`, applied before anything is written.

use pgpay_core::checkout;
use pgrx::prelude::*;

use crate::errors::raise_invalid_parameter;

/// Validates a checkout's arguments like Stripe would and returns the currency in lower case.
/// Raises 22023 naming the field.
#[pg_extern(immutable, parallel_safe, name = "_checkout_validate")]
fn checkout_validate(
    order_ref: Option<&str>,
    amount: Option<i64>,
    currency: Option<&str>,
    customer_ref: Option<&str>,
    metadata: Option<pgrx::JsonB>,
    description: Option<&str>,
) -> String {
    let result = (|| {
        checkout::validate_order_ref(order_ref.unwrap_or(""))?;
        checkout::validate_amount(amount.unwrap_or(0))?;
        let currency = checkout::normalize_currency(currency.unwrap_or(""))?;
        checkout::validate_minimum_charge(amount.unwrap_or(0), &currency)?;
        if let Some(customer_ref) = customer_ref {
            checkout::validate_customer_ref(customer_ref)?;
        }
        if let Some(description) = description {
            checkout::validate_description(description)?;
        }
        let metadata = metadata.map_or(serde_json::Value::Object(Default::default()), |m| m.0);
        checkout::validate_metadata(&metadata)?;
        Ok::<_, checkout::CheckoutError>(currency)
    })();
    result.unwrap_or_else(|e| raise_invalid_parameter(e))
}

/// Validates a checkout's mode and its redirect URLs (`pgpay_core::checkout::validate_mode`).
/// Raises 22023 naming the field.
#[pg_extern(immutable, parallel_safe, name = "_checkout_validate_mode")]
fn checkout_validate_mode(mode: Option<&str>, success_url: Option<&str>, cancel_url: Option<&str>) {
    if let Err(e) =
        checkout::validate_mode(mode.unwrap_or("payment_intent"), success_url, cancel_url)
    {
        raise_invalid_parameter(e)
    }
}
