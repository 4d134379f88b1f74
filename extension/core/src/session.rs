//! Reading Checkout Session objects (payment mode) as evidence about a payment: which status of
//! the one transition rule a session proposes, and whether what it charged is the payment's.
//! The writes are the extension's (`extension/src/apply_intent.rs`), shared with PaymentIntents.

use serde_json::Value;

use crate::event::{field_i64, field_text, NotAnInteger};
use crate::transition::PaymentStatus;

/// Stripe's type of the event that says a delayed payment (SEPA, ACH, Boleto...) failed. The
/// session object alone reads like `checkout.session.completed` with `payment_status=unpaid`.
pub const ASYNC_PAYMENT_FAILED: &str = "checkout.session.async_payment_failed";

/// Why a session object cannot be applied to a payment, or `None` when it can.
pub fn session_problem(session: &Value) -> Option<&'static str> {
    if session.get("object").and_then(Value::as_str) != Some("checkout.session") {
        return Some("it is not a Checkout Session object");
    }
    if field_text(session, "id").is_none() {
        return Some("the Checkout Session has no id");
    }
    if field_text(session, "status").is_none() {
        return Some("the Checkout Session has no status");
    }
    if field_i64(session, "amount_total").is_err() {
        return Some("the Checkout Session's amount_total is not an integer");
    }
    None
}

/// The payment status a session proposes; `event_type` is the event that carried it (`None` for
/// an API answer). `open` waits for the customer, `complete` is paid (succeeded) or a delayed
/// payment still on its way (processing), `expired` and a failed delayed payment end the attempt
/// (canceled: the order may begin again). `None` for a status this version does not know.
pub fn session_status(session: &Value, event_type: Option<&str>) -> Option<PaymentStatus> {
    if event_type == Some(ASYNC_PAYMENT_FAILED) {
        return Some(PaymentStatus::Canceled);
    }
    match field_text(session, "status")?.as_str() {
        "open" => Some(PaymentStatus::RequiresPaymentMethod),
        "expired" => Some(PaymentStatus::Canceled),
        "complete" => match field_text(session, "payment_status")?.as_str() {
            "paid" | "no_payment_required" => Some(PaymentStatus::Succeeded),
            "unpaid" => Some(PaymentStatus::Processing),
            _ => None,
        },
        _ => None,
    }
}

/// The session's PaymentIntent id: a string, or the id of an expanded object.
pub fn session_intent_id(session: &Value) -> Option<String> {
    match session.get("payment_intent")? {
        Value::String(id) => Some(id.clone()),
        Value::Object(expanded) => expanded.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Why a paid session must not be fulfilled: its `currency` or `amount_total` is not the
/// payment's. `None` when both match.
pub fn session_mismatch(
    session: &Value,
    payment_amount: i64,
    payment_currency: &str,
) -> Result<Option<String>, NotAnInteger> {
    let currency = field_text(session, "currency").map(|c| c.to_lowercase());
    if currency.as_deref() != Some(payment_currency) {
        return Ok(Some(format!(
            "currency {} differs from the payment's {payment_currency}",
            currency.as_deref().unwrap_or("missing")
        )));
    }
    let total = field_i64(session, "amount_total")?;
    if total != Some(payment_amount) {
        return Ok(Some(format!(
            "amount_total {} differs from the payment's {payment_amount}",
            total.map_or_else(|| "missing".to_owned(), |a| a.to_string())
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(status: &str, payment_status: &str) -> Value {
        json!({"object": "checkout.session", "id": "cs_test_1", "status": status,
               "payment_status": payment_status, "amount_total": 1999, "currency": "usd",
               "payment_intent": "pi_1"})
    }

    #[test]
    fn each_session_state_proposes_one_status() {
        use PaymentStatus::*;
        for (status, paid, event, want) in [
            ("open", "unpaid", None, Some(RequiresPaymentMethod)),
            (
                "complete",
                "paid",
                Some("checkout.session.completed"),
                Some(Succeeded),
            ),
            (
                "complete",
                "unpaid",
                Some("checkout.session.completed"),
                Some(Processing),
            ),
            (
                "complete",
                "paid",
                Some("checkout.session.async_payment_succeeded"),
                Some(Succeeded),
            ),
            (
                "complete",
                "unpaid",
                Some(ASYNC_PAYMENT_FAILED),
                Some(Canceled),
            ),
            ("complete", "no_payment_required", None, Some(Succeeded)),
            (
                "expired",
                "unpaid",
                Some("checkout.session.expired"),
                Some(Canceled),
            ),
            ("complete", "refunded_someday", None, None),
            ("archived", "unpaid", None, None),
        ] {
            assert_eq!(
                session_status(&session(status, paid), event),
                want,
                "{status} {paid} {event:?}"
            );
        }
    }

    #[test]
    fn a_session_needs_an_id_a_status_and_an_integer_total() {
        assert_eq!(session_problem(&session("open", "unpaid")), None);
        for key in ["id", "status", "object"] {
            let mut s = session("open", "unpaid");
            s.as_object_mut().unwrap().remove(key);
            assert!(session_problem(&s).is_some(), "without {key}");
        }
        let mut s = session("open", "unpaid");
        s["amount_total"] = json!("12.5");
        assert!(session_problem(&s).is_some());
        assert!(session_problem(
            &json!({"object": "payment_intent", "id": "pi_1", "status": "open"})
        )
        .is_some());
    }

    #[test]
    fn the_payment_intent_is_read_plain_or_expanded() {
        assert_eq!(
            session_intent_id(&session("complete", "paid")).as_deref(),
            Some("pi_1")
        );
        assert_eq!(
            session_intent_id(
                &json!({"payment_intent": {"id": "pi_2", "object": "payment_intent"}})
            )
            .as_deref(),
            Some("pi_2")
        );
        assert_eq!(session_intent_id(&json!({"payment_intent": null})), None);
        assert_eq!(session_intent_id(&json!({})), None);
    }

    #[test]
    fn mismatch_names_currency_then_amount_total() {
        let s = session("complete", "paid");
        assert_eq!(session_mismatch(&s, 1999, "usd"), Ok(None));
        assert_eq!(
            session_mismatch(&s, 1999, "eur").unwrap().as_deref(),
            Some("currency usd differs from the payment's eur")
        );
        assert_eq!(
            session_mismatch(&s, 2999, "usd").unwrap().as_deref(),
            Some("amount_total 1999 differs from the payment's 2999")
        );
        let mut no_total = s.clone();
        no_total.as_object_mut().unwrap().remove("amount_total");
        assert_eq!(
            session_mismatch(&no_total, 1999, "usd").unwrap().as_deref(),
            Some("amount_total missing differs from the payment's 1999")
        );
    }
}
