//! Stripe's input rules for a checkout, checked before anything is written so that a bad call
//! fails in the caller's transaction with a message naming the field, instead of as a 400 from
//! Stripe minutes later.

use serde_json::Value;

pub const MAX_AMOUNT: i64 = 99_999_999;
pub const MAX_ORDER_REF_CHARS: usize = 200;
pub const MAX_CUSTOMER_REF_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
/// Stripe allows 50 metadata keys; pgpay sends these of its own with every PaymentIntent.
pub const RESERVED_METADATA_KEYS: [&str; 3] = ["pgpay_payment_id", "order_ref", "customer_ref"];
pub const MAX_METADATA_KEYS: usize = 50 - RESERVED_METADATA_KEYS.len();
pub const MAX_METADATA_KEY_CHARS: usize = 40;
pub const MAX_METADATA_VALUE_CHARS: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckoutError {
    #[error("order_ref {0}")]
    OrderRef(String),
    #[error("amount must be between 1 and {MAX_AMOUNT} minor units, got {0}")]
    Amount(i64),
    #[error("currency must be a three-letter ISO 4217 code such as 'usd', got {0:?}")]
    Currency(String),
    #[error("customer_ref {0}")]
    CustomerRef(String),
    #[error("description {0}")]
    Description(&'static str),
    #[error("metadata {0}")]
    Metadata(String),
}

pub fn validate_order_ref(order_ref: &str) -> Result<(), CheckoutError> {
    validate_text(order_ref, MAX_ORDER_REF_CHARS).map_err(CheckoutError::OrderRef)
}

pub fn validate_amount(amount: i64) -> Result<(), CheckoutError> {
    if (1..=MAX_AMOUNT).contains(&amount) {
        Ok(())
    } else {
        Err(CheckoutError::Amount(amount))
    }
}

/// Returns the currency in the lower case Stripe uses.
pub fn normalize_currency(currency: &str) -> Result<String, CheckoutError> {
    // Checked before the lower-case copy, whose size would otherwise be the caller's to choose.
    if currency.len() != 3 {
        return Err(CheckoutError::Currency(currency.chars().take(16).collect()));
    }
    let lower = currency.to_ascii_lowercase();
    if ISO_4217.binary_search(&lower.as_str()).is_ok() {
        Ok(lower)
    } else {
        Err(CheckoutError::Currency(currency.chars().take(16).collect()))
    }
}

pub fn validate_customer_ref(customer_ref: &str) -> Result<(), CheckoutError> {
    validate_text(customer_ref, MAX_CUSTOMER_REF_CHARS).map_err(CheckoutError::CustomerRef)
}

pub fn validate_description(description: &str) -> Result<(), CheckoutError> {
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(CheckoutError::Description("is longer than 1000 characters"));
    }
    if description.contains('\0') {
        return Err(CheckoutError::Description("contains a NUL character"));
    }
    Ok(())
}

/// Metadata must be a flat object of strings, within Stripe's limits.
pub fn validate_metadata(metadata: &Value) -> Result<(), CheckoutError> {
    let object = metadata
        .as_object()
        .ok_or_else(|| CheckoutError::Metadata("must be a JSON object of string values".into()))?;
    if object.len() > MAX_METADATA_KEYS {
        return Err(CheckoutError::Metadata(format!(
            "has {} keys; at most {MAX_METADATA_KEYS} are allowed (Stripe's 50 less pgpay's own {})",
            object.len(),
            RESERVED_METADATA_KEYS.len()
        )));
    }
    for (key, value) in object {
        let shown: String = key.chars().take(48).collect();
        if key.is_empty() {
            return Err(CheckoutError::Metadata("has an empty key".into()));
        }
        if key.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(CheckoutError::Metadata(format!(
                "key {shown:?} is longer than {MAX_METADATA_KEY_CHARS} characters"
            )));
        }
        if key.contains(['[', ']']) || key.chars().any(char::is_control) {
            return Err(CheckoutError::Metadata(format!(
                "key {shown:?} contains square brackets or control characters"
            )));
        }
        if RESERVED_METADATA_KEYS.contains(&key.as_str()) {
            return Err(CheckoutError::Metadata(format!(
                "key {shown:?} is reserved by pgpay"
            )));
        }
        let text = value.as_str().ok_or_else(|| {
            CheckoutError::Metadata(format!(
                "value of {shown:?} must be a string, got {}",
                kind(value)
            ))
        })?;
        if text.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(CheckoutError::Metadata(format!(
                "value of {shown:?} is longer than {MAX_METADATA_VALUE_CHARS} characters"
            )));
        }
        if text.contains('\0') {
            return Err(CheckoutError::Metadata(format!(
                "value of {shown:?} contains a NUL character"
            )));
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn validate_text(text: &str, max_chars: usize) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if text.chars().count() > max_chars {
        return Err(format!("is longer than {max_chars} characters"));
    }
    if text.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    Ok(())
}

/// Active ISO 4217 codes, sorted (binary search).
const ISO_4217: [&str; 169] = [
    "aed", "afn", "all", "amd", "ang", "aoa", "ars", "aud", "awg", "azn", "bam", "bbd", "bdt",
    "bgn", "bhd", "bif", "bmd", "bnd", "bob", "bov", "brl", "bsd", "btn", "bwp", "byn", "bzd",
    "cad", "cdf", "che", "chf", "chw", "clf", "clp", "cny", "cop", "cou", "crc", "cuc", "cup",
    "cve", "czk", "djf", "dkk", "dop", "dzd", "egp", "ern", "etb", "eur", "fjd", "fkp", "gbp",
    "gel", "ghs", "gip", "gmd", "gnf", "gtq", "gyd", "hkd", "hnl", "htg", "huf", "idr", "ils",
    "inr", "iqd", "irr", "isk", "jmd", "jod", "jpy", "kes", "kgs", "khr", "kmf", "kpw", "krw",
    "kwd", "kyd", "kzt", "lak", "lbp", "lkr", "lrd", "lsl", "lyd", "mad", "mdl", "mga", "mkd",
    "mmk", "mnt", "mop", "mru", "mur", "mvr", "mwk", "mxn", "mxv", "myr", "mzn", "nad", "ngn",
    "nio", "nok", "npr", "nzd", "omr", "pab", "pen", "pgk", "php", "pkr", "pln", "pyg", "qar",
    "ron", "rsd", "rub", "rwf", "sar", "sbd", "scr", "sdg", "sek", "sgd", "shp", "sle", "sll",
    "sos", "srd", "ssp", "stn", "svc", "syp", "szl", "thb", "tjs", "tmt", "tnd", "top", "try",
    "ttd", "twd", "tzs", "uah", "ugx", "usd", "usn", "uyi", "uyu", "uyw", "uzs", "ved", "ves",
    "vnd", "vuv", "wst", "xaf", "xcd", "xcg", "xof", "xpf", "yer", "zar", "zmw", "zwg", "zwl",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn currency_list_is_sorted_and_unique() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn accepts_stripes_rules() {
        assert_eq!(normalize_currency("USD"), Ok("usd".into()));
        assert_eq!(normalize_currency("eur"), Ok("eur".into()));
        validate_amount(1).unwrap();
        validate_amount(MAX_AMOUNT).unwrap();
        validate_order_ref(&"o".repeat(200)).unwrap();
        validate_metadata(&json!({})).unwrap();
        let full: serde_json::Map<String, Value> = (0..MAX_METADATA_KEYS)
            .map(|i| (format!("k{i}"), json!("v".repeat(500))))
            .collect();
        validate_metadata(&Value::Object(full)).unwrap();
        validate_metadata(&json!({"k".repeat(40): "x"})).unwrap();
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(Result<(), CheckoutError>, &str)> = vec![
            (validate_amount(0), "amount"),
            (validate_amount(-5), "amount"),
            (validate_amount(MAX_AMOUNT + 1), "amount"),
            (normalize_currency("us").map(|_| ()), "currency"),
            (normalize_currency("usdd").map(|_| ()), "currency"),
            (normalize_currency("xyz").map(|_| ()), "currency"),
            (normalize_currency("").map(|_| ()), "currency"),
            (validate_order_ref(""), "order_ref"),
            (validate_order_ref("   "), "order_ref"),
            (validate_order_ref(&"o".repeat(201)), "order_ref"),
            (validate_order_ref("a\nb"), "order_ref"),
            (validate_customer_ref(""), "customer_ref"),
            (validate_description(&"d".repeat(1001)), "description"),
            (validate_metadata(&json!([])), "metadata"),
            (validate_metadata(&json!({"a": 1})), "metadata"),
            (validate_metadata(&json!({"a": {"b": "c"}})), "metadata"),
            (validate_metadata(&json!({"k".repeat(41): "x"})), "metadata"),
            (
                validate_metadata(&json!({"a": "v".repeat(501)})),
                "metadata",
            ),
            (validate_metadata(&json!({"a[b]": "x"})), "metadata"),
            (validate_metadata(&json!({"": "x"})), "metadata"),
            (validate_metadata(&json!({"order_ref": "x"})), "metadata"),
        ];
        for (i, (result, field)) in cases.into_iter().enumerate() {
            let message = result.expect_err(&format!("case {i} passed")).to_string();
            assert!(message.starts_with(field), "case {i}: {message}");
        }
        let too_many: serde_json::Map<String, Value> = (0..=MAX_METADATA_KEYS)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect();
        assert!(validate_metadata(&Value::Object(too_many)).is_err());
    }
}
