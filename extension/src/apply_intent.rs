//! Applying a PaymentIntent object to a locked payment: the writes of the one transition rule
//! (`pgpay_core::transition::decide`), for webhooks, outbox answers and reconciliation alike.
//!
//! Written in Rust rather than plpgsql because it runs inside every webhook: plpgsql spent more
//! on evaluating the rule's forty-odd small expressions, afresh in every transaction, than on the
//! writes themselves (callgrind). The writes are prepared statements, planned once per backend.

use pgpay_core::event::{field_i64, field_text, intent_problem, success_mismatch, NotAnInteger};
use pgpay_core::transition::{decide, Decision, IgnoreReason, PaymentStatus};
use pgrx::pg_sys::BuiltinOid::{INT8OID, JSONBOID, TEXTOID, UUIDOID};
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiTupleTable};
use pgrx::{JsonB, Uuid};
use serde_json::Value;

use crate::errors::{raise_internal, raise_invalid_parameter};
use crate::plans::{first, run, Statement};

/// What the rule needs to know about a payment, read under its row lock.
pub struct LockedPayment {
    pub id: Uuid,
    pub status: String,
    pub status_evidence_at: Option<i64>,
    pub intent_id: Option<String>,
    pub client_secret: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub order_ref: String,
}

/// The columns `LockedPayment::read` expects, in order; every locking query selects these.
macro_rules! locked_payment_columns {
    () => {
        "SELECT p.id, p.status::text, p.status_evidence_at, p.stripe_payment_intent_id, \
         p.client_secret, p.amount::bigint, p.currency::text, p.order_ref FROM pay.payments p "
    };
}
pub(crate) use locked_payment_columns;

static LOCK_BY_ID: Statement = Statement {
    sql: concat!(
        locked_payment_columns!(),
        "WHERE p.id = $1 FOR NO KEY UPDATE"
    ),
    args: &[UUIDOID],
};

impl LockedPayment {
    /// The payment of the first row of a `locked_payment_columns!()` query, if any.
    pub fn read(table: SpiTupleTable<'_>) -> Option<LockedPayment> {
        if table.is_empty() {
            return None;
        }
        let row = table.first();
        fn required<T>(what: &str) -> T {
            raise_internal(format!("a payment row without {what}"))
        }
        let read = || -> Result<LockedPayment, pgrx::spi::SpiError> {
            Ok(LockedPayment {
                id: row.get(1)?.unwrap_or_else(|| required("id")),
                status: row.get(2)?.unwrap_or_else(|| required("status")),
                status_evidence_at: row.get(3)?,
                intent_id: row.get(4)?,
                client_secret: row.get(5)?,
                amount: row.get(6)?.unwrap_or_else(|| required("amount")),
                currency: row.get(7)?.unwrap_or_else(|| required("currency")),
                order_ref: row.get(8)?.unwrap_or_else(|| required("order_ref")),
            })
        };
        Some(read().unwrap_or_else(|e| raise_internal(format!("reading a payment: {e}"))))
    }

    /// An audit row that leaves the status where it is.
    fn unchanged<'a>(
        &'a self,
        cause: &'a str,
        evidence_id: Option<&'a str>,
        proposed: Option<&'a str>,
    ) -> AuditRow<'a> {
        AuditRow {
            from: &self.status,
            to: &self.status,
            cause,
            evidence_id,
            proposed,
        }
    }

    /// Locks payment `id` for this transaction and reads it.
    pub fn lock(client: &mut SpiClient<'_>, id: Uuid) -> Option<LockedPayment> {
        Self::read(run(client, &LOCK_BY_ID, &[id.into()]))
    }
}

static RELEASE_WAITING: Statement = Statement {
    sql: "SELECT pay._release_waiting_commands($1, $2)",
    args: &[UUIDOID, TEXTOID],
};
static RECORD_INTENT: Statement = Statement {
    sql: "UPDATE pay.payments p SET stripe_payment_intent_id = $2, client_secret = $3, updated_at = now() \
          WHERE p.id = $1",
    args: &[UUIDOID, TEXTOID, TEXTOID],
};
static FLAG: Statement = Statement {
    sql: "UPDATE pay.payments p SET flagged_reason = $2, updated_at = now() WHERE p.id = $1",
    args: &[UUIDOID, TEXTOID],
};
static SET_CLIENT_SECRET: Statement = Statement {
    sql: "UPDATE pay.payments p SET client_secret = $2, updated_at = now() WHERE p.id = $1",
    args: &[UUIDOID, TEXTOID],
};
static TRANSITION: Statement = Statement {
    sql: "UPDATE pay.payments p \
          SET status = $2::pay.payment_status, stripe_payment_intent_id = $3, \
              client_secret = coalesce(p.client_secret, $4), status_evidence_at = $5, \
              amount_received = greatest(p.amount_received, $6), last_error = coalesce($7, p.last_error), \
              flagged_reason = coalesce($8, p.flagged_reason), updated_at = now() \
          WHERE p.id = $1",
    args: &[
        UUIDOID, TEXTOID, TEXTOID, TEXTOID, INT8OID, INT8OID, JSONBOID, TEXTOID,
    ],
};
static AUDIT: Statement = Statement {
    sql: "INSERT INTO pay.audit_log (payment_id, from_status, to_status, proposed_status, cause, evidence_id) \
          VALUES ($1, $2::pay.payment_status, $3::pay.payment_status, $4, $5, $6)",
    args: &[UUIDOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID],
};
static FULFILL: Statement = Statement {
    sql: "INSERT INTO pay.fulfillments (payment_id, order_ref) VALUES ($1, $2)",
    args: &[UUIDOID, TEXTOID],
};
static RECORD_DECLINE: Statement = Statement {
    sql: "UPDATE pay.payments p \
          SET last_error = $2, status_evidence_at = greatest(p.status_evidence_at, $3), updated_at = now() \
          WHERE p.id = $1 AND p.last_error IS DISTINCT FROM $2 RETURNING true",
    args: &[UUIDOID, JSONBOID, INT8OID],
};
static RECORD_EVIDENCE: Statement = Statement {
    sql: "UPDATE pay.payments p \
          SET status_evidence_at = greatest(p.status_evidence_at, $2), amount_received = greatest(p.amount_received, $3) \
          WHERE p.id = $1 AND (p.status_evidence_at IS DISTINCT FROM greatest(p.status_evidence_at, $2) \
                               OR p.amount_received < $3)",
    args: &[UUIDOID, INT8OID, INT8OID],
};
static FLAG_PAID_AFTER_SUPERSEDED: Statement = Statement {
    sql: "UPDATE pay.payments p \
          SET flagged_reason = 'paid after being superseded; refunded as a duplicate charge', \
              amount_received = greatest(p.amount_received, $2), \
              status_evidence_at = greatest(p.status_evidence_at, $3), updated_at = now() \
          WHERE p.id = $1",
    args: &[UUIDOID, INT8OID, INT8OID],
};
// One order, one kept charge: the refund's key is derived from the payment, so it is asked once.
static ENQUEUE_DUPLICATE_REFUND: Statement = Statement {
    sql: "SELECT pay._enqueue($1, 'refund', \
              pay.idempotency_key('pgpay.refund', jsonb_build_object('payment_id', $1, 'why', 'superseded_attempt_succeeded')), \
              'POST', '/v1/refunds', \
              jsonb_build_object('payment_intent', $2::text, 'reason', 'duplicate', 'metadata[pgpay_payment_id]', $1::text))",
    args: &[UUIDOID, TEXTOID],
};

/// One audit row, from `from` to `to`; `proposed` is what the evidence asked for when it was not
/// applied.
struct AuditRow<'a> {
    from: &'a str,
    to: &'a str,
    cause: &'a str,
    evidence_id: Option<&'a str>,
    proposed: Option<&'a str>,
}

fn audit(client: &mut SpiClient<'_>, payment_id: Uuid, row: AuditRow<'_>) {
    let AuditRow {
        from,
        to,
        cause,
        evidence_id,
        proposed,
    } = row;
    run(
        client,
        &AUDIT,
        &[
            payment_id.into(),
            from.into(),
            to.into(),
            proposed.into(),
            cause.into(),
            evidence_id.into(),
        ],
    );
}

fn integer_field(payment: &LockedPayment, intent: &Value, key: &str) -> Option<i64> {
    field_i64(intent, key).unwrap_or_else(|NotAnInteger| {
        raise_invalid_parameter(format!(
            "evidence for payment {}: PaymentIntent field {key} is not an integer",
            payment.id
        ))
    })
}

/// Applies PaymentIntent `intent` to `payment`, which the caller has locked. Returns `applied`,
/// `unchanged`, `ignored` or `flagged`, or, before writing anything, why the object cannot be
/// applied (`pgpay_core::event::intent_problem`): each caller decides what that means.
pub fn apply_intent(
    client: &mut SpiClient<'_>,
    payment: &LockedPayment,
    intent: &Value,
    cause: &str,
    evidence_id: Option<&str>,
    evidence_at: i64,
) -> Result<&'static str, &'static str> {
    if let Some(problem) = intent_problem(intent) {
        return Err(problem);
    }
    let (Some(intent_id), Some(proposed)) =
        (field_text(intent, "id"), field_text(intent, "status"))
    else {
        return Err("the PaymentIntent has no id or status");
    };
    let Ok(current) = payment.status.parse::<PaymentStatus>() else {
        raise_internal(format!(
            "payment {} has status {:?}, which the transition rule does not know",
            payment.id, payment.status
        ));
    };
    // A status from a newer Stripe API is ignored rather than raised: the evidence is kept.
    let decision = match proposed.parse::<PaymentStatus>() {
        Ok(to) => decide(current, payment.status_evidence_at, to, evidence_at),
        Err(_) => Decision::Ignore(IgnoreReason::UnknownStatus),
    };
    let client_secret = field_text(intent, "client_secret");

    let mut recorded = false;
    match payment.intent_id.as_deref() {
        None => {
            // The first word about this payment's PaymentIntent. When it also moves the status
            // (the create answer, usually) one UPDATE and one audit row record both.
            run(
                client,
                &RELEASE_WAITING,
                &[payment.id.into(), intent_id.as_str().into()],
            );
            if decision == Decision::Apply {
                recorded = true;
            } else {
                run(
                    client,
                    &RECORD_INTENT,
                    &[
                        payment.id.into(),
                        intent_id.as_str().into(),
                        client_secret.as_deref().into(),
                    ],
                );
                let why = format!("PaymentIntent {intent_id} recorded ({cause})");
                audit(
                    client,
                    payment.id,
                    payment.unchanged(&why, evidence_id, None),
                );
            }
        }
        Some(known) if known != intent_id => {
            // Never let a second PaymentIntent speak for a payment (invariant 1): keep it for a human.
            let reason = format!("a second PaymentIntent {intent_id} claims this payment");
            run(client, &FLAG, &[payment.id.into(), reason.as_str().into()]);
            let why =
                format!("flagged: evidence about a second PaymentIntent {intent_id} ({cause})");
            audit(
                client,
                payment.id,
                payment.unchanged(&why, evidence_id, Some(&proposed)),
            );
            return Ok("flagged");
        }
        Some(_) => {
            if payment.client_secret.is_none() && client_secret.is_some() {
                run(
                    client,
                    &SET_CLIENT_SECRET,
                    &[payment.id.into(), client_secret.as_deref().into()],
                );
            }
        }
    }

    let received = integer_field(payment, intent, "amount_received").unwrap_or(0);
    let error = intent
        .get("last_payment_error")
        .filter(|e| !e.is_null())
        .cloned();

    match decision {
        Decision::Apply => {
            let mismatch = if proposed == "succeeded" {
                success_mismatch(intent, payment.amount, &payment.currency).unwrap_or_else(
                    |NotAnInteger| {
                        raise_invalid_parameter(format!(
                            "evidence for payment {}: PaymentIntent amount is not an integer",
                            payment.id
                        ))
                    },
                )
            } else {
                None
            };
            let flagged = mismatch
                .as_ref()
                .map(|m| format!("success not fulfilled: {m}"));
            run(
                client,
                &TRANSITION,
                &[
                    payment.id.into(),
                    proposed.as_str().into(),
                    intent_id.as_str().into(),
                    client_secret.as_deref().into(),
                    evidence_at.into(),
                    received.into(),
                    error.map(JsonB).into(),
                    flagged.as_deref().into(),
                ],
            );
            let why = if recorded {
                format!("{cause} (PaymentIntent {intent_id} recorded)")
            } else {
                cause.to_owned()
            };
            let moved = AuditRow {
                from: &payment.status,
                to: &proposed,
                cause: &why,
                evidence_id,
                proposed: None,
            };
            audit(client, payment.id, moved);
            match &mismatch {
                Some(m) => {
                    let why = format!("flagged, not fulfilled: {m}");
                    let flagged = AuditRow {
                        from: &proposed,
                        to: &proposed,
                        cause: &why,
                        evidence_id,
                        proposed: None,
                    };
                    audit(client, payment.id, flagged);
                }
                None if proposed == "succeeded" => {
                    // Exactly one fulfillment per success, in the transaction of the transition.
                    run(
                        client,
                        &FULFILL,
                        &[payment.id.into(), payment.order_ref.as_str().into()],
                    );
                }
                None => {}
            }
            Ok(if mismatch.is_some() {
                "flagged"
            } else {
                "applied"
            })
        }
        Decision::Unchanged => {
            if let Some(error) = error {
                // A failed attempt leaves the status where it was (requires_payment_method): the
                // decline itself is the news, so it is recorded and audited.
                let why = format!(
                    "{cause}: {} {}",
                    field_text(&error, "code").unwrap_or_else(|| "error".into()),
                    field_text(&error, "message").unwrap_or_default()
                );
                let changed: Option<bool> = first(run(
                    client,
                    &RECORD_DECLINE,
                    &[payment.id.into(), JsonB(error).into(), evidence_at.into()],
                ));
                if changed == Some(true) {
                    audit(
                        client,
                        payment.id,
                        payment.unchanged(&why, evidence_id, None),
                    );
                    return Ok("applied");
                }
            }
            run(
                client,
                &RECORD_EVIDENCE,
                &[payment.id.into(), evidence_at.into(), received.into()],
            );
            Ok("unchanged")
        }
        Decision::SuccessAfterGiveUp => {
            // Two tabs: an attempt pgpay had superseded was paid anyway. One order, one kept
            // charge: refund it under a key derived from the payment.
            run(
                client,
                &FLAG_PAID_AFTER_SUPERSEDED,
                &[payment.id.into(), received.into(), evidence_at.into()],
            );
            let why = format!(
                "flagged: Stripe reports succeeded for a superseded attempt; refund requested ({cause})"
            );
            audit(
                client,
                payment.id,
                payment.unchanged(&why, evidence_id, Some(&proposed)),
            );
            run(
                client,
                &ENQUEUE_DUPLICATE_REFUND,
                &[payment.id.into(), intent_id.as_str().into()],
            );
            Ok("flagged")
        }
        Decision::Ignore(reason) => {
            let why = format!("{cause}: {}", reason.as_str());
            audit(
                client,
                payment.id,
                payment.unchanged(&why, evidence_id, Some(&proposed)),
            );
            Ok("ignored")
        }
    }
}

/// `pay._apply_payment_intent(payment_id, intent, cause, evidence_id, evidence_at)`: locks the
/// payment and applies a PaymentIntent to it. Used by `pay.complete_outbox` (API answers) and by
/// reconciliation; webhooks call `apply_intent` directly.
#[pg_extern(volatile, name = "_apply_payment_intent")]
fn apply_payment_intent(
    payment_id: Uuid,
    intent: JsonB,
    cause: &str,
    evidence_id: Option<&str>,
    evidence_at: i64,
) -> &'static str {
    Spi::connect_mut(|client| {
        let Some(payment) = LockedPayment::lock(client, payment_id) else {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
                format!("no payment {payment_id}")
            );
        };
        apply_intent(client, &payment, &intent.0, cause, evidence_id, evidence_at).unwrap_or_else(
            |problem| {
                raise_invalid_parameter(format!(
                    "evidence for payment {payment_id} cannot be applied: {problem}"
                ))
            },
        )
    })
}
