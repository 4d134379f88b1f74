//! Reading Stripe events and PaymentIntent objects, with the meanings the SQL side gives them:
//! a field's text is what jsonb's `->>` would return (a string is itself, a JSON null or a missing
//! key is nothing, any other value is its JSON text).

use serde_json::Value;

/// Longest event id pgpay stores (the column's rule, checked before anything is written).
pub const MAX_EVENT_ID_CHARS: usize = 255;

/// Largest event body read (bytes). Stripe's events are a few kilobytes; a larger body is refused
/// before it is verified or parsed, so its size never decides how much memory is allocated.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Latest `created` taken as a Stripe time (unix seconds); beyond it the event has no usable time.
const MAX_CREATED: i64 = 999_999_999_999;

/// `obj ->> key`.
pub fn field_text(obj: &Value, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// `obj ->> key` as an integer, the way `(obj ->> key)::bigint` reads it: `Ok(None)` when the
/// field is missing or null, `Err` when it holds something that is not an integer.
pub fn field_i64(obj: &Value, key: &str) -> Result<Option<i64>, NotAnInteger> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or(NotAnInteger),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| NotAnInteger),
        Some(_) => Err(NotAnInteger),
    }
}

/// A field that must be an integer (an amount) is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an integer")]
pub struct NotAnInteger;

/// A signed body that is a Stripe event: a JSON object with `"object": "event"`, an id of at most
/// 255 characters and a type. `None` for anything else, including JSON that PostgreSQL's jsonb
/// refuses (a `\u0000` escape), so that what is accepted here is what the SQL side can store.
pub fn read_event(payload: &str) -> Option<Value> {
    if payload.len() > MAX_EVENT_BYTES {
        return None;
    }
    let event: Value = serde_json::from_str(payload).ok()?;
    if has_nul_escape(payload) {
        return None;
    }
    let is_event = event.is_object()
        && event.get("object").and_then(Value::as_str) == Some("event")
        && field_text(&event, "id").is_some_and(|id| id.chars().count() <= MAX_EVENT_ID_CHARS)
        && field_text(&event, "type").is_some();
    is_event.then_some(event)
}

/// Whether valid JSON `text` has a `\u0000` escape (jsonb refuses NUL in text). A backslash
/// starts an escape only when an even number of backslashes precedes it.
fn has_nul_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(found) = text[from..].find("\\u0000") {
        let at = from + found;
        let preceding = bytes[..at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if preceding % 2 == 0 {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Stripe's time of the event: `created` when it is a whole number of seconds in range.
pub fn event_created(event: &Value) -> Option<i64> {
    let n = event.get("created")?.as_number()?;
    let seconds = n
        .as_i64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))?;
    (0..=MAX_CREATED).contains(&seconds).then_some(seconds)
}

/// Why a succeeded PaymentIntent must not be fulfilled: its currency or amount is not the
/// payment's. `None` when both match.
pub fn success_mismatch(
    intent: &Value,
    payment_amount: i64,
    payment_currency: &str,
) -> Result<Option<String>, NotAnInteger> {
    let currency = field_text(intent, "currency").map(|c| c.to_lowercase());
    if currency.as_deref() != Some(payment_currency) {
        return Ok(Some(format!(
            "currency {} differs from the payment's {payment_currency}",
            currency.as_deref().unwrap_or("missing")
        )));
    }
    let amount = field_i64(intent, "amount")?;
    let received = field_i64(intent, "amount_received")?.unwrap_or(0);
    if amount != Some(payment_amount) || (received != 0 && received != payment_amount) {
        let reported = if received != 0 {
            Some(received)
        } else {
            amount
        };
        return Ok(Some(format!(
            "amount {} differs from the payment's {payment_amount}",
            reported.map_or_else(|| "missing".to_owned(), |a| a.to_string())
        )));
    }
    Ok(None)
}

/// Why a PaymentIntent object cannot be applied to a payment, or `None` when it can: it needs an
/// id and a status, and its amounts, when present, must be integers.
pub fn intent_problem(intent: &Value) -> Option<&'static str> {
    if intent.get("object").and_then(Value::as_str) != Some("payment_intent") {
        return Some("it is not a PaymentIntent object");
    }
    if field_text(intent, "id").is_none() {
        return Some("the PaymentIntent has no id");
    }
    if field_text(intent, "status").is_none() {
        return Some("the PaymentIntent has no status");
    }
    if field_i64(intent, "amount").is_err() || field_i64(intent, "amount_received").is_err() {
        return Some("the PaymentIntent's amount is not an integer");
    }
    None
}

/// The 16 bytes of a UUID written in its canonical form (8-4-4-4-12 hexadecimal digits, either
/// case), as our metadata carries a payment id. `None` for anything else.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 || [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
        return None;
    }
    let digits: Vec<u8> = bytes.iter().copied().filter(|&b| b != b'-').collect();
    if digits.len() != 32 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_text_reads_like_jsonb_arrow() {
        let v = json!({"s": "x", "n": 12, "b": true, "z": null, "o": {"a": 1}});
        assert_eq!(field_text(&v, "s").as_deref(), Some("x"));
        assert_eq!(field_text(&v, "n").as_deref(), Some("12"));
        assert_eq!(field_text(&v, "b").as_deref(), Some("true"));
        assert_eq!(field_text(&v, "z"), None);
        assert_eq!(field_text(&v, "missing"), None);
        assert_eq!(field_text(&v, "o").as_deref(), Some(r#"{"a":1}"#));
    }

    #[test]
    fn integers_are_read_like_a_bigint_cast() {
        let v = json!({"a": 1999, "s": "42", "f": 19.5, "z": null, "t": "x"});
        assert_eq!(field_i64(&v, "a"), Ok(Some(1999)));
        assert_eq!(field_i64(&v, "s"), Ok(Some(42)));
        assert_eq!(field_i64(&v, "z"), Ok(None));
        assert_eq!(field_i64(&v, "missing"), Ok(None));
        assert_eq!(field_i64(&v, "f"), Err(NotAnInteger));
        assert_eq!(field_i64(&v, "t"), Err(NotAnInteger));
    }

    #[test]
    fn events_need_object_id_and_type() {
        let ok = r#"{"object": "event", "id": "evt_1", "type": "payment_intent.succeeded"}"#;
        assert!(read_event(ok).is_some());
        for bad in [
            r#"{"object": "event", "id": "evt_1"}"#,
            r#"{"object": "event", "type": "x"}"#,
            r#"{"object": "charge", "id": "evt_1", "type": "x"}"#,
            r#"{"object": "event", "id": null, "type": "x"}"#,
            r#"["not", "an", "object"]"#,
            r#"{"object": "event", "id": "evt_1", "type": "x""#,
            r#"{"object": "event", "id": "evt_1", "type": "x", "note": "nul \u0000 here"}"#,
            "",
        ] {
            assert!(read_event(bad).is_none(), "{bad}");
        }
        let long_id = format!(
            r#"{{"object": "event", "id": "{}", "type": "x"}}"#,
            "é".repeat(255)
        );
        assert!(
            read_event(&long_id).is_some(),
            "255 characters (not bytes) are allowed"
        );
        let too_long = format!(
            r#"{{"object": "event", "id": "{}", "type": "x"}}"#,
            "e".repeat(256)
        );
        assert!(read_event(&too_long).is_none());
    }

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(has_nul_escape(r#"{"a": "x\u0000y"}"#));
        assert!(has_nul_escape(r#"{"a\u0000": 1}"#));
        assert!(
            has_nul_escape(r#"{"a": "\\\u0000"}"#),
            "an escaped backslash, then NUL"
        );
        assert!(
            !has_nul_escape(r#"{"a": "\\u0000"}"#),
            "a backslash, then the text u0000"
        );
        assert!(!has_nul_escape(r#"{"a": "\u0001 u0000"}"#));
    }

    #[test]
    fn intents_need_an_id_a_status_and_integer_amounts() {
        let ok =
            json!({"object": "payment_intent", "id": "pi_1", "status": "succeeded", "amount": 5});
        assert_eq!(intent_problem(&ok), None);
        let without = |key: &str| {
            let mut v = ok.clone();
            v.as_object_mut().unwrap().remove(key);
            v
        };
        assert!(intent_problem(&without("id")).is_some());
        assert!(intent_problem(&without("status")).is_some());
        assert!(intent_problem(&without("object")).is_some());
        let mut fractional = ok.clone();
        fractional["amount_received"] = json!(2.5);
        assert!(intent_problem(&fractional).is_some());
    }

    #[test]
    fn uuids_in_canonical_form_only() {
        let id = parse_uuid("0f8fad5b-d9cb-469f-a165-70867728950E").unwrap();
        assert_eq!(id[0], 0x0f);
        assert_eq!(id[15], 0x0e);
        for bad in [
            "",
            "0f8fad5bd9cb469fa16570867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950ex",
            "0f8fad5b-d9cb-469f-a165+70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950g",
            "+f8fad5b-d9cb-469f-a165-70867728950e",
            "0f8fad5b-d9c--469f-a165-70867728950e",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }

    #[test]
    fn created_is_a_whole_number_of_seconds() {
        assert_eq!(
            event_created(&json!({"created": 1700000000})),
            Some(1700000000)
        );
        assert_eq!(event_created(&json!({"created": 1.7e9})), Some(1700000000));
        assert_eq!(event_created(&json!({"created": 1.5})), None);
        assert_eq!(event_created(&json!({"created": -1})), None);
        assert_eq!(event_created(&json!({"created": 1e13})), None);
        assert_eq!(event_created(&json!({"created": "1700000000"})), None);
        assert_eq!(event_created(&json!({})), None);
    }

    #[test]
    fn mismatch_names_currency_then_amount() {
        let pi = |amount: Value, received: Value, currency: &str| json!({"amount": amount, "amount_received": received, "currency": currency});
        assert_eq!(
            success_mismatch(&pi(json!(1999), json!(1999), "USD"), 1999, "usd"),
            Ok(None)
        );
        assert_eq!(
            success_mismatch(&pi(json!(1999), json!(1999), "eur"), 1999, "usd")
                .unwrap()
                .as_deref(),
            Some("currency eur differs from the payment's usd")
        );
        assert_eq!(
            success_mismatch(&pi(json!(1999), json!(999), "usd"), 1999, "usd")
                .unwrap()
                .as_deref(),
            Some("amount 999 differs from the payment's 1999")
        );
        assert_eq!(
            success_mismatch(&pi(json!(2999), json!(0), "usd"), 1999, "usd")
                .unwrap()
                .as_deref(),
            Some("amount 2999 differs from the payment's 1999")
        );
        assert_eq!(
            success_mismatch(&json!({"currency": "usd"}), 1999, "usd")
                .unwrap()
                .as_deref(),
            Some("amount missing differs from the payment's 1999")
        );
        assert!(success_mismatch(&pi(json!(19.5), json!(0), "usd"), 1999, "usd").is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::json;

        fn scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "\\PC{0,20}".prop_map(Value::from),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
                let _ = read_event(&text);
            }

            // An event is accepted exactly when its id and type read as text and the id fits.
            #[test]
            fn acceptance_follows_the_shape_rule(id in scalar(), kind in scalar(), object in scalar()) {
                let payload = json!({"id": id, "type": kind, "object": "event", "data": {"object": object}});
                let accepted = read_event(&payload.to_string()).is_some();
                let id_ok = field_text(&payload, "id")
                    .is_some_and(|id| id.chars().count() <= MAX_EVENT_ID_CHARS && !id.contains('\0'));
                let type_ok = field_text(&payload, "type").is_some_and(|t| !t.contains('\0'));
                let object_ok = !matches!(&object, Value::String(s) if s.contains('\0'));
                prop_assert_eq!(accepted, id_ok && type_ok && object_ok);
            }
        }
    }
}
