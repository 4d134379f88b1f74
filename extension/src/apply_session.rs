//! Applying a Checkout Session object to a locked payment: the session is recorded (its id, the
//! URL the customer is sent to, when it expires), then its status goes through the same rule and
//! writes as a PaymentIntent's (`apply_intent::Evidence`). Its PaymentIntent, once it has one, is
//! recorded on the payment, so every later `payment_intent.*`, `charge.*` and refund event finds
//! the same payment, whichever arrives first.

use pgpay_core::event::{field_i64, field_text};
use pgpay_core::outcome::Outcome;
use pgpay_core::session::{session_intent_id, session_problem, session_status};
use pgpay_core::transition::PaymentStatus;
use pgrx::pg_sys::BuiltinOid::{INT8OID, TEXTOID, UUIDOID};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, Uuid};
use serde_json::Value;

use crate::apply_intent::{audit, refuse_if_held_elsewhere, Evidence, LockedPayment, SessionFacts};
use crate::errors::raise_invalid_parameter;
use crate::plans::{first, run, Statement};

// Read apart from `LockedPayment`, whose query also serves a database still at 0.1.0 (whose
// payments have no session columns) through the same library.
static SESSION_OF: Statement = Statement {
    sql: "SELECT p.stripe_checkout_session_id FROM pay.payments p WHERE p.id = $1",
    args: &[UUIDOID],
};
static SESSION_HOLDER: Statement = Statement {
    sql: "SELECT p.id FROM pay.payments p WHERE p.stripe_checkout_session_id = $1 AND p.id <> $2",
    args: &[TEXTOID, UUIDOID],
};
static RECORD_SESSION: Statement = Statement {
    sql: "UPDATE pay.payments p \
          SET stripe_checkout_session_id = $2, checkout_url = coalesce($3, p.checkout_url), \
              checkout_expires_at = coalesce(to_timestamp($4), p.checkout_expires_at), updated_at = now() \
          WHERE p.id = $1",
    args: &[UUIDOID, TEXTOID, TEXTOID, INT8OID],
};
static RELEASE_WAITING: Statement = Statement {
    sql: "SELECT pay._release_waiting($1, '{checkout_session}', $2)",
    args: &[UUIDOID, TEXTOID],
};
static FLAG: Statement = Statement {
    sql: "UPDATE pay.payments p SET flagged_reason = $2, updated_at = now() WHERE p.id = $1",
    args: &[UUIDOID, TEXTOID],
};

/// Applies Checkout Session `session` to `payment`, which the caller has locked; `event_type` is
/// the event that carried it (`None` for an API answer). Returns the outcome, or, before writing
/// anything, why the object cannot be applied.
pub fn apply_session(
    client: &mut SpiClient<'_>,
    payment: &LockedPayment,
    session: &Value,
    event_type: Option<&str>,
    cause: &str,
    evidence_id: Option<&str>,
    evidence_at: i64,
) -> Result<Outcome, &'static str> {
    if let Some(problem) = session_problem(session) {
        return Err(problem);
    }
    let session_id = field_text(session, "id").unwrap_or_default();
    let known: Option<String> = first(run(client, &SESSION_OF, &[payment.id.into()]));
    match known.as_deref() {
        None => {
            refuse_if_held_elsewhere(
                client,
                &SESSION_HOLDER,
                "Checkout Session",
                &session_id,
                payment.id,
            );
            let url = field_text(session, "url");
            let expires_at = field_i64(session, "expires_at").ok().flatten();
            run(
                client,
                &RECORD_SESSION,
                &[
                    payment.id.into(),
                    session_id.as_str().into(),
                    url.as_deref().into(),
                    expires_at.into(),
                ],
            );
            run(
                client,
                &RELEASE_WAITING,
                &[payment.id.into(), session_id.as_str().into()],
            );
            let why = format!("Checkout Session {session_id} recorded ({cause})");
            audit(
                client,
                payment.id,
                payment.unchanged(&why, evidence_id, None),
            );
        }
        // One payment, one session: a second one claiming it is for a human (invariant 1).
        Some(known) if known != session_id => {
            let reason = format!("a second Checkout Session {session_id} claims this payment");
            run(client, &FLAG, &[payment.id.into(), reason.as_str().into()]);
            let why =
                format!("flagged: evidence about a second Checkout Session {session_id} ({cause})");
            audit(
                client,
                payment.id,
                payment.unchanged(&why, evidence_id, None),
            );
            return Ok(Outcome::Flagged);
        }
        Some(_) => {}
    }
    let proposed = session_status(session, event_type);
    let received = match proposed {
        Some(PaymentStatus::Succeeded) => field_i64(session, "amount_total")
            .ok()
            .flatten()
            .unwrap_or(0),
        _ => 0,
    };
    let facts = SessionFacts {
        session,
        intent_id: session_intent_id(session),
        proposed,
        proposed_text: format!(
            "session {}/{}",
            field_text(session, "status").unwrap_or_default(),
            field_text(session, "payment_status").unwrap_or_default()
        ),
        received,
    };
    Ok(Evidence::of_session(payment, facts, cause, evidence_id, evidence_at).apply(client))
}

/// `pay._apply_checkout_session(payment_id, session, cause, evidence_id, evidence_at,
/// event_type)`: locks the payment and applies a Checkout Session to it. Used by
/// `pay.complete_outbox` (API answers) and by reconciliation; webhooks call `apply_session`
/// directly.
#[pg_extern(volatile, name = "_apply_checkout_session")]
fn apply_checkout_session(
    payment_id: Uuid,
    session: JsonB,
    cause: &str,
    evidence_id: Option<&str>,
    evidence_at: i64,
    event_type: Option<&str>,
) -> &'static str {
    Spi::connect_mut(|client| {
        let Some(payment) = LockedPayment::lock(client, payment_id) else {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
                format!("no payment {payment_id}")
            );
        };
        apply_session(
            client,
            &payment,
            &session.0,
            event_type,
            cause,
            evidence_id,
            evidence_at,
        )
        .unwrap_or_else(|problem| {
            raise_invalid_parameter(format!(
                "evidence for payment {payment_id} cannot be applied: {problem}"
            ))
        })
        .as_str()
    })
}
