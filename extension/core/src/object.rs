//! Which pgpay payment a Stripe object speaks of. Each object kind pgpay reads names its
//! PaymentIntent in one field; every object may also carry our metadata
//! (`pgpay_payment_id`), which is how a PaymentIntent whose create answer was lost is found.
//! The database lookup that uses this (by PaymentIntent id, else by the claimed id) is
//! `pay._payment_for` in the extension: webhooks and reconciliation both go through it.

use serde_json::Value;

use crate::event::{field_text, parse_uuid};

/// What an object says about its payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRef {
    /// The PaymentIntent it belongs to.
    pub intent_id: Option<String>,
    /// The payment id our metadata claims, when it is a well-formed UUID.
    pub claimed: Option<[u8; 16]>,
}

/// The field naming an object's PaymentIntent, per object kind; `None` for kinds pgpay does
/// not read (their events are stored, never applied).
pub fn intent_field(object_kind: &str) -> Option<&'static str> {
    match object_kind {
        "payment_intent" => Some("id"),
        "refund" | "charge" | "dispute" | "checkout.session" => Some("payment_intent"),
        _ => None,
    }
}

/// The payment id our metadata claims, if it is a canonical UUID (anything else, such as 36
/// hyphens, claims nothing).
pub fn claimed_payment_id(claimed: &str) -> Option<[u8; 16]> {
    parse_uuid(claimed)
}

/// What `object` says about its payment; `None` when pgpay does not read its kind.
pub fn payment_ref(object: &Value) -> Option<PaymentRef> {
    let field = intent_field(object.get("object")?.as_str()?)?;
    Some(PaymentRef {
        intent_id: field_text(object, field),
        claimed: object
            .get("metadata")
            .and_then(|m| field_text(m, "pgpay_payment_id"))
            .and_then(|c| claimed_payment_id(&c)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const ID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    #[test]
    fn each_kind_names_its_payment_intent() {
        let table = [
            (
                json!({"object": "payment_intent", "id": "pi_1"}),
                Some("pi_1"),
            ),
            (
                json!({"object": "refund", "id": "re_1", "payment_intent": "pi_2"}),
                Some("pi_2"),
            ),
            (
                json!({"object": "charge", "id": "ch_1", "payment_intent": "pi_3"}),
                Some("pi_3"),
            ),
            (
                json!({"object": "dispute", "id": "dp_1", "payment_intent": "pi_4"}),
                Some("pi_4"),
            ),
            (
                json!({"object": "checkout.session", "id": "cs_1", "payment_intent": "pi_5"}),
                Some("pi_5"),
            ),
            (
                json!({"object": "checkout.session", "id": "cs_2", "payment_intent": null}),
                None,
            ),
            (json!({"object": "refund", "id": "re_2"}), None),
        ];
        for (object, want) in table {
            let r = payment_ref(&object).expect("a kind pgpay reads");
            assert_eq!(r.intent_id.as_deref(), want, "{object}");
            assert_eq!(r.claimed, None);
        }
        for other in [
            json!({"object": "customer", "id": "cus_1", "metadata": {"pgpay_payment_id": ID}}),
            json!({"id": "pi_1"}),
            json!("payment_intent"),
        ] {
            assert_eq!(payment_ref(&other), None, "{other}");
        }
    }

    #[test]
    fn only_a_well_formed_claim_counts() {
        let with = |claim: Value| {
            payment_ref(&json!({"object": "payment_intent", "id": "pi_1", "metadata": {"pgpay_payment_id": claim}}))
                .unwrap()
                .claimed
        };
        assert!(with(json!(ID)).is_some());
        assert!(with(json!(ID.to_uppercase())).is_some());
        for bad in [
            json!("-".repeat(36)),
            json!("0f8fad5bd9cb469fa16570867728950e"),
            json!("0f8fad5b-d9cb-469f-a165-70867728950"),
            json!("zf8fad5b-d9cb-469f-a165-70867728950e"),
            json!(12),
            Value::Null,
        ] {
            assert_eq!(with(bad.clone()), None, "{bad}");
        }
    }

    proptest! {
        // Whatever the metadata holds, a claim is either a real UUID or nothing: the SQL side
        // never casts an unchecked string.
        #[test]
        fn a_claim_is_a_uuid_or_nothing(s in "[0-9a-fA-F-]{30,40}") {
            if let Some(bytes) = claimed_payment_id(&s) {
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                prop_assert_eq!(hex, s.replace('-', "").to_lowercase());
                prop_assert_eq!(s.len(), 36);
            }
        }
    }
}
