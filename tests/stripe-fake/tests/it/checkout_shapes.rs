//! What stripe-fake emits has the keys of the objects Stripe publishes (fixtures in
//! `tests/fixtures/stripe/`, copied from the Stripe API reference), at every level of nesting the
//! fixtures show, so a strict client that reads Stripe's shape reads the fake's too.

use serde_json::Value;
use stripe_fake::CheckoutPayment;

use crate::checkout::{form, session_form, SESSIONS};
use crate::helpers::{start, Api};

const SESSION: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fixtures/stripe/checkout_session.json"
));
const COMPLETED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fixtures/stripe/checkout_session_completed_event.json"
));

/// Keys of `published` (recursively through objects) that `ours` lacks, and keys whose JSON kind
/// differs where both are non-null.
fn differences(published: &Value, ours: &Value, path: &str, out: &mut Vec<String>) {
    let (Value::Object(published), Value::Object(ours)) = (published, ours) else {
        return;
    };
    for (key, value) in published {
        let here = format!("{path}.{key}");
        match ours.get(key) {
            None => out.push(format!("missing {here}")),
            Some(mine) => {
                let kind = |v: &Value| match v {
                    Value::Null => "null",
                    Value::Bool(_) => "bool",
                    Value::Number(_) => "number",
                    Value::String(_) => "string",
                    Value::Array(_) => "array",
                    Value::Object(_) => "object",
                };
                if !value.is_null() && !mine.is_null() && kind(value) != kind(mine) {
                    out.push(format!("{here}: {} vs {}", kind(value), kind(mine)));
                }
                differences(value, mine, &here, out);
            }
        }
    }
}

fn fixture(text: &str) -> Value {
    serde_json::from_str(text).expect("a JSON fixture")
}

#[tokio::test]
async fn session_and_completed_event_have_stripes_keys() {
    let fake = start().await;
    let api = Api::new(&fake);
    let created = api.post(SESSIONS, None, &form(&session_form("o-1"))).await;
    let mut found = Vec::new();
    differences(&fixture(SESSION), &created.json, "session", &mut found);
    assert!(found.is_empty(), "{found:#?}");

    fake.pay_checkout(&created.id(), CheckoutPayment::Card("pm_card_visa".into()))
        .await
        .expect("paid");
    let event = fake
        .events()
        .into_iter()
        .find(|e| e["type"] == "checkout.session.completed")
        .expect("completed event");
    let published = fixture(COMPLETED);
    differences(&published, &event, "event", &mut found);
    assert!(found.is_empty(), "{found:#?}");

    // The fields pgpay reads, with the values the published event has in the same situation.
    let (theirs, ours) = (&published["data"]["object"], &event["data"]["object"]);
    for field in [
        "object",
        "mode",
        "status",
        "payment_status",
        "livemode",
        "url",
    ] {
        assert_eq!(ours[field], theirs[field], "{field}");
    }
    for field in ["payment_intent", "client_reference_id", "currency"] {
        assert!(ours[field].is_string(), "{field}: {}", ours[field]);
    }
    assert_eq!(event["api_version"], published["api_version"]);
    assert!(ours["metadata"]["order_ref"].is_string());
}

#[test]
fn the_check_can_fail() {
    let mut found = Vec::new();
    let ours = serde_json::json!({ "id": 1, "nested": { "a": null } });
    let theirs = serde_json::json!({ "id": "x", "nested": { "a": 1, "b": 2 }, "c": null });
    differences(&theirs, &ours, "o", &mut found);
    assert_eq!(
        found,
        [
            "missing o.c",
            "o.id: string vs number",
            "missing o.nested.b"
        ]
    );
}
