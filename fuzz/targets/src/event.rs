//! Reading a signed body as a Stripe event and its PaymentIntent (`pgpay_core::event`), as
//! `pay.ingest_webhook` does after the signature matched.
//!
//! Input: the payload. Checks: an accepted event is a JSON object with `"object": "event"`, an id
//! of at most 255 characters, a type, and no NUL anywhere (jsonb could not store it); the field
//! readers agree with each other and stay total.

use pgpay_core::event::{
    event_created, field_i64, field_text, intent_problem, parse_uuid, read_event, success_mismatch,
    MAX_EVENT_ID_CHARS,
};
use serde_json::Value;

use crate::text;

pub fn run(data: &[u8]) {
    let payload = text(data);
    let Some(event) = read_event(&payload) else {
        return;
    };
    assert_eq!(event.get("object").and_then(Value::as_str), Some("event"));
    let id = field_text(&event, "id").expect("an accepted event has an id");
    assert!(id.chars().count() <= MAX_EVENT_ID_CHARS);
    assert!(field_text(&event, "type").is_some());
    assert!(
        !has_nul(&event),
        "an accepted event holds a NUL: {payload:?}"
    );
    if let Some(created) = event_created(&event) {
        assert!((0..=999_999_999_999).contains(&created));
    }

    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    let problem = intent_problem(object);
    if problem.is_none() {
        assert!(field_text(object, "id").is_some() && field_text(object, "status").is_some());
        let amount = field_i64(object, "amount").expect("intent_problem checked the amount");
        let currency = field_text(object, "currency");
        if let (Some(amount), Some(currency)) = (amount, currency) {
            // The payment's own amount and currency never mismatch with themselves unless the
            // amount received says otherwise.
            let received = field_i64(object, "amount_received").expect("checked");
            let verdict = success_mismatch(object, amount, &currency.to_lowercase())
                .expect("integers were checked");
            if received.unwrap_or(0) == 0 || received == Some(amount) {
                assert_eq!(verdict, None, "{object}");
            } else {
                assert!(verdict.is_some());
            }
        }
    }
    if let Some(claimed) = object
        .pointer("/metadata/pgpay_payment_id")
        .and_then(Value::as_str)
    {
        if let Some(bytes) = parse_uuid(claimed) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, claimed.replace('-', "").to_lowercase());
        }
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
