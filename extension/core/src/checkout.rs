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
/// Stripe's limit on a Checkout Session's `success_url` and `cancel_url`.
pub const MAX_URL_CHARS: usize = 5000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckoutError {
    #[error("order_ref {0}")]
    OrderRef(String),
    #[error("amount must be between 1 and {MAX_AMOUNT} minor units, got {0}")]
    Amount(i64),
    #[error(
        "amount {amount} is below Stripe's minimum charge for {currency}: {minimum} minor units ({shown})",
        currency = .currency.to_ascii_uppercase()
    )]
    BelowMinimum {
        amount: i64,
        currency: String,
        minimum: i64,
        shown: &'static str,
    },
    #[error("currency must be a three-letter ISO 4217 code such as 'usd', got {0:?}")]
    Currency(String),
    #[error("currency {0:?} is not a currency Stripe supports")]
    UnsupportedCurrency(String),
    #[error("customer_ref {0}")]
    CustomerRef(String),
    #[error("description {0}")]
    Description(&'static str),
    #[error("metadata {0}")]
    Metadata(String),
    #[error("mode must be 'payment_intent' or 'session', got {0:?}")]
    Mode(String),
    #[error("{field} {why}")]
    Url {
        field: &'static str,
        why: &'static str,
    },
}

/// How a checkout is paid: a PaymentIntent the app confirms itself (Stripe Elements), or a hosted
/// Checkout Session the customer is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutMode {
    PaymentIntent,
    Session,
}

impl CheckoutMode {
    pub fn parse(mode: &str) -> Result<Self, CheckoutError> {
        match mode {
            "payment_intent" => Ok(CheckoutMode::PaymentIntent),
            "session" => Ok(CheckoutMode::Session),
            other => Err(CheckoutError::Mode(other.chars().take(40).collect())),
        }
    }
}

/// The mode's own arguments: session mode needs `success_url` and may take `cancel_url`;
/// payment_intent mode takes neither (the app confirms the PaymentIntent on its own page).
pub fn validate_mode(
    mode: &str,
    success_url: Option<&str>,
    cancel_url: Option<&str>,
) -> Result<CheckoutMode, CheckoutError> {
    let mode = CheckoutMode::parse(mode)?;
    match mode {
        CheckoutMode::Session => {
            let Some(success_url) = success_url else {
                return Err(CheckoutError::Url {
                    field: "success_url",
                    why: "is required in session mode",
                });
            };
            validate_redirect_url("success_url", success_url)?;
            if let Some(cancel_url) = cancel_url {
                validate_redirect_url("cancel_url", cancel_url)?;
            }
        }
        CheckoutMode::PaymentIntent => {
            for (field, url) in [("success_url", success_url), ("cancel_url", cancel_url)] {
                if url.is_some() {
                    return Err(CheckoutError::Url {
                        field,
                        why: "is only taken in session mode",
                    });
                }
            }
        }
    }
    Ok(mode)
}

/// Stripe's rule for `success_url` and `cancel_url`: an absolute http or https URL with a host,
/// no whitespace, at most 5,000 characters. stripe-fake applies the same rule.
pub fn validate_redirect_url(field: &'static str, url: &str) -> Result<(), CheckoutError> {
    let bad = |why| Err(CheckoutError::Url { field, why });
    if url.chars().count() > MAX_URL_CHARS {
        return bad("is longer than 5000 characters");
    }
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    else {
        return bad("must be an absolute http or https URL");
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return bad("must name a host");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain whitespace or control characters");
    }
    Ok(())
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
    } else if lower.len() == 3 && lower.bytes().all(|b| b.is_ascii_lowercase()) {
        Err(CheckoutError::UnsupportedCurrency(lower))
    } else {
        Err(CheckoutError::Currency(currency.chars().take(16).collect()))
    }
}

/// Stripe's minimum charge amounts, in minor units, for the currencies its table lists
/// (docs.stripe.com/currencies, "Minimum and maximum charge amounts"). Stripe applies the minimum
/// of the account's settlement currency after conversion, so a charge in another currency can
/// still be refused by Stripe; for a charge in the settlement currency this check is exact.
/// Sorted by currency (binary search).
const MINIMUM_CHARGE: [(&str, i64, &str); 24] = [
    ("aed", 200, "2.00 AED"),
    ("aud", 50, "A$0.50"),
    ("bgn", 100, "1.00 BGN"),
    ("brl", 50, "R$0.50"),
    ("cad", 50, "CA$0.50"),
    ("chf", 50, "0.50 CHF"),
    ("czk", 1500, "15.00 CZK"),
    ("dkk", 250, "2.50 DKK"),
    ("eur", 50, "€0.50"),
    ("gbp", 30, "£0.30"),
    ("hkd", 400, "HK$4.00"),
    ("huf", 17500, "175.00 HUF"),
    ("inr", 50, "₹0.50"),
    ("jpy", 50, "¥50"),
    ("mxn", 1000, "MX$10.00"),
    ("myr", 200, "RM 2.00"),
    ("nok", 300, "3.00 NOK"),
    ("nzd", 50, "NZ$0.50"),
    ("pln", 200, "2.00 PLN"),
    ("ron", 200, "2.00 RON"),
    ("sek", 300, "3.00 SEK"),
    ("sgd", 50, "S$0.50"),
    ("thb", 1000, "฿10.00"),
    ("usd", 50, "$0.50"),
];

/// Refuses an amount below Stripe's minimum charge for `currency` (lower case, as
/// [`normalize_currency`] returns it).
pub fn validate_minimum_charge(amount: i64, currency: &str) -> Result<(), CheckoutError> {
    let Ok(index) = MINIMUM_CHARGE.binary_search_by(|(code, _, _)| (*code).cmp(currency)) else {
        return Ok(());
    };
    let (_, minimum, shown) = MINIMUM_CHARGE[index];
    if amount < minimum {
        return Err(CheckoutError::BelowMinimum {
            amount,
            currency: currency.to_string(),
            minimum,
            shown,
        });
    }
    Ok(())
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
        assert!(MINIMUM_CHARGE.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(MINIMUM_CHARGE
            .iter()
            .all(|(code, _, _)| ISO_4217.binary_search(code).is_ok()));
    }

    #[test]
    fn stripes_minimum_charge_is_refused_naming_the_minimum() {
        let cases = [
            ("usd", 49, Some("amount 49 is below Stripe's minimum charge for USD: 50 minor units ($0.50)")),
            ("usd", 50, None),
            ("gbp", 29, Some("amount 29 is below Stripe's minimum charge for GBP: 30 minor units (£0.30)")),
            ("gbp", 30, None),
            ("eur", 1, Some("amount 1 is below Stripe's minimum charge for EUR: 50 minor units (€0.50)")),
            ("jpy", 49, Some("amount 49 is below Stripe's minimum charge for JPY: 50 minor units (¥50)")),
            ("jpy", 50, None),
            ("huf", 17_499, Some("amount 17499 is below Stripe's minimum charge for HUF: 17500 minor units (175.00 HUF)")),
            // Not in Stripe's table: Stripe checks the converted amount itself.
            ("isk", 1, None),
        ];
        for (currency, amount, expected) in cases {
            let got = validate_minimum_charge(amount, currency)
                .err()
                .map(|e| e.to_string());
            assert_eq!(got.as_deref(), expected, "{currency} {amount}");
        }
    }

    #[test]
    fn an_unknown_three_letter_code_is_not_a_format_error() {
        assert_eq!(
            normalize_currency("XYZ").unwrap_err().to_string(),
            "currency \"xyz\" is not a currency Stripe supports"
        );
        assert!(normalize_currency("u$d")
            .unwrap_err()
            .to_string()
            .starts_with("currency must be a three-letter ISO 4217 code"));
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

    #[test]
    fn redirect_urls_follow_stripes_rule() {
        for (url, ok) in [
            (
                "https://example.com/success?session_id={CHECKOUT_SESSION_ID}",
                true,
            ),
            ("http://127.0.0.1:8080/done", true),
            ("HTTPS://EXAMPLE.COM", true),
            ("example.com/success", false),
            ("ftp://example.com", false),
            ("https://", false),
            ("https:///path", false),
            ("https://exa mple.com", false),
            ("https://example.com/a\u{7}b", false),
            ("javascript:alert(1)", false),
        ] {
            assert_eq!(
                validate_redirect_url("success_url", url).is_ok(),
                ok,
                "{url:?}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert_eq!(
            validate_redirect_url("cancel_url", &long)
                .unwrap_err()
                .to_string(),
            "cancel_url is longer than 5000 characters"
        );
    }

    #[test]
    fn each_mode_takes_its_own_arguments() {
        let ok = "https://shop.example/ok";
        assert_eq!(
            validate_mode("payment_intent", None, None),
            Ok(CheckoutMode::PaymentIntent)
        );
        assert_eq!(
            validate_mode("session", Some(ok), None),
            Ok(CheckoutMode::Session)
        );
        assert_eq!(
            validate_mode("session", Some(ok), Some(ok)),
            Ok(CheckoutMode::Session)
        );
        for (mode, success, cancel, starts) in [
            ("sessions", Some(ok), None, "mode"),
            ("session", None, None, "success_url"),
            ("session", Some("/ok"), None, "success_url"),
            ("session", Some(ok), Some("nope"), "cancel_url"),
            ("payment_intent", Some(ok), None, "success_url"),
            ("payment_intent", None, Some(ok), "cancel_url"),
        ] {
            let message = validate_mode(mode, success, cancel)
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(starts),
                "{mode} {success:?} {cancel:?}: {message}"
            );
        }
    }
}
