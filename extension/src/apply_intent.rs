//! Applying a PaymentIntent object to a locked payment: the writes of the one transition rule
//! (`pgpay_core::transition::decide`), for webhooks, outbox answers and reconciliation alike.
//! Checkout Sessions are read by `apply_session.rs` and applied through the same writes
//! ([`Evidence`]).
//!
//! Written in Rust rather than plpgsql because it runs inside every webhook: plpgsql spent more
//! on evaluating the rule's forty-odd small expressions, afresh in every transaction, than on the
//! writes themselves (callgrind). The writes are prepared statements, planned once per backend.

use pgpay_core::event::{field_i64, field_text, intent_problem, success_mismatch, NotAnInteger};
use pgpay_core::outcome::Outcome;
use pgpay_core::session::session_mismatch;
use pgpay_core::transition::{decide, Decision, IgnoreReason, PaymentStatus};
use pgrx::datum::DatumWithOid;
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
    pub(crate) fn unchanged<'a>(
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

static INTENT_HOLDER: Statement = Statement {
    sql: "SELECT p.id FROM pay.payments p WHERE p.stripe_payment_intent_id = $1 AND p.id <> $2",
    args: &[TEXTOID, UUIDOID],
};
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
          SET status = $2::pay.payment_status, stripe_payment_intent_id = coalesce($3, p.stripe_payment_intent_id), \
              client_secret = coalesce(p.client_secret, $4), status_evidence_at = $5, \
              amount_received = greatest(p.amount_received, $6), \
              last_error = CASE WHEN $2 = 'succeeded' THEN NULL ELSE coalesce($7, p.last_error) END, \
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
// The command itself is built by pay._enqueue_refund, as for pay.refund.
static ENQUEUE_DUPLICATE_REFUND: Statement = Statement {
    sql: "SELECT pay._enqueue_refund($1, $2, NULL, 'duplicate', \
              jsonb_build_object('why', 'superseded_attempt_succeeded'))",
    args: &[UUIDOID, TEXTOID],
};

/// One Stripe object, one payment: evidence about `payment` that names a `what` (`id`) another
/// payment already holds (`holder`: a statement selecting that payment's id from `id` and
/// `payment`) is refused with 22023 naming both payments, before anything is written. Otherwise
/// the unique constraint would refuse the write as a bare 23505.
pub(crate) fn refuse_if_held_elsewhere(
    client: &mut SpiClient<'_>,
    holder: &'static Statement,
    what: &str,
    id: &str,
    payment: Uuid,
) {
    if let Some(other) = first::<Uuid>(run(client, holder, &[id.into(), payment.into()])) {
        raise_invalid_parameter(format!(
            "evidence for payment {payment} names {what} {id}, which belongs to payment {other}"
        ));
    }
}

/// One audit row, from `from` to `to`; `proposed` is what the evidence asked for when it was not
/// applied.
pub(crate) struct AuditRow<'a> {
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) cause: &'a str,
    pub(crate) evidence_id: Option<&'a str>,
    pub(crate) proposed: Option<&'a str>,
}

pub(crate) fn audit(client: &mut SpiClient<'_>, payment_id: Uuid, row: AuditRow<'_>) {
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

/// Which Stripe object the evidence is: what a success is checked against.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// A PaymentIntent: `amount`, `amount_received`, `currency`.
    Intent(&'a Value),
    /// A Checkout Session: `amount_total`, `currency`.
    Session(&'a Value),
}

/// A Stripe object read as evidence about one payment, with the rule's decision.
pub(crate) struct Evidence<'a> {
    payment: &'a LockedPayment,
    source: Source<'a>,
    /// The PaymentIntent the object speaks of (a Checkout Session may not have one yet).
    intent_id: Option<String>,
    proposed: String,
    decision: Decision,
    client_secret: Option<String>,
    received: i64,
    error: Option<Value>,
    cause: &'a str,
    evidence_id: Option<&'a str>,
    evidence_at: i64,
}

/// How the PaymentIntent relates to the one the payment knows.
enum Link {
    /// The payment knew it already.
    Known,
    /// First word about it, recorded on its own (the status does not move).
    Recorded,
    /// First word about it, to be recorded with the transition (one UPDATE, one audit row).
    WithTransition,
    /// A second PaymentIntent: flagged for a human, nothing else applied.
    Second,
}

impl<'a> Evidence<'a> {
    /// Reads `intent` and decides; `Err` (before anything is written) when it cannot be
    /// applied (`pgpay_core::event::intent_problem`).
    fn read(
        payment: &'a LockedPayment,
        intent: &'a Value,
        cause: &'a str,
        evidence_id: Option<&'a str>,
        evidence_at: i64,
    ) -> Result<Self, &'static str> {
        if let Some(problem) = intent_problem(intent) {
            return Err(problem);
        }
        let (Some(intent_id), Some(proposed)) =
            (field_text(intent, "id"), field_text(intent, "status"))
        else {
            return Err("the PaymentIntent has no id or status");
        };
        // A status from a newer Stripe API is ignored rather than raised: the evidence is kept.
        let decision = decide_for(payment, proposed.parse::<PaymentStatus>().ok(), evidence_at);
        // intent_problem has checked that the amounts are integers.
        let received = field_i64(intent, "amount_received")
            .ok()
            .flatten()
            .unwrap_or(0);
        Ok(Evidence {
            payment,
            source: Source::Intent(intent),
            client_secret: field_text(intent, "client_secret"),
            error: intent
                .get("last_payment_error")
                .filter(|e| !e.is_null())
                .cloned(),
            intent_id: Some(intent_id),
            proposed,
            decision,
            received,
            cause,
            evidence_id,
            evidence_at,
        })
    }

    fn id(&self) -> DatumWithOid<'static> {
        self.payment.id.into()
    }

    /// An audit row that leaves the status where it is.
    fn audit_unchanged(&self, client: &mut SpiClient<'_>, why: &str, proposed: bool) {
        let proposed = proposed.then_some(self.proposed.as_str());
        audit(
            client,
            self.payment.id,
            self.payment.unchanged(why, self.evidence_id, proposed),
        );
    }

    /// Records the PaymentIntent id (and client secret) the payment did not know yet, or
    /// flags a second one (invariant 1: never let a second PaymentIntent speak for a payment).
    fn link(&self, client: &mut SpiClient<'_>) -> Link {
        let Some(intent_id) = self.intent_id.as_deref() else {
            return Link::Known;
        };
        match self.payment.intent_id.as_deref() {
            None => {
                refuse_if_held_elsewhere(
                    client,
                    &INTENT_HOLDER,
                    "PaymentIntent",
                    intent_id,
                    self.payment.id,
                );
                run(client, &RELEASE_WAITING, &[self.id(), intent_id.into()]);
                if self.decision == Decision::Apply {
                    return Link::WithTransition;
                }
                run(
                    client,
                    &RECORD_INTENT,
                    &[
                        self.id(),
                        intent_id.into(),
                        self.client_secret.as_deref().into(),
                    ],
                );
                let why = format!("PaymentIntent {intent_id} recorded ({})", self.cause);
                self.audit_unchanged(client, &why, false);
                Link::Recorded
            }
            Some(known) if known != intent_id => {
                let reason = format!("a second PaymentIntent {intent_id} claims this payment");
                run(client, &FLAG, &[self.id(), reason.as_str().into()]);
                let why = format!(
                    "flagged: evidence about a second PaymentIntent {intent_id} ({})",
                    self.cause
                );
                self.audit_unchanged(client, &why, true);
                Link::Second
            }
            Some(_) => {
                if self.payment.client_secret.is_none() && self.client_secret.is_some() {
                    run(
                        client,
                        &SET_CLIENT_SECRET,
                        &[self.id(), self.client_secret.as_deref().into()],
                    );
                }
                Link::Known
            }
        }
    }

    /// `Decision::Apply`: move the status; a success is fulfilled exactly once, in this
    /// transaction, unless its amount or currency differs (then it is flagged instead).
    fn transition(self, client: &mut SpiClient<'_>, recorded_with_it: bool) -> Outcome {
        let succeeded = self.proposed == "succeeded";
        let mismatch = if succeeded {
            let (amount, currency) = (self.payment.amount, &self.payment.currency);
            match self.source {
                Source::Intent(intent) => success_mismatch(intent, amount, currency),
                Source::Session(session) => session_mismatch(session, amount, currency),
            }
            .unwrap_or_else(|NotAnInteger| {
                raise_invalid_parameter(format!(
                    "evidence for payment {}: the amount is not an integer",
                    self.payment.id
                ))
            })
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
                self.id(),
                self.proposed.as_str().into(),
                self.intent_id.as_deref().into(),
                self.client_secret.as_deref().into(),
                self.evidence_at.into(),
                self.received.into(),
                self.error.clone().map(JsonB).into(),
                flagged.as_deref().into(),
            ],
        );
        let why = match (&self.intent_id, recorded_with_it) {
            (Some(intent_id), true) => {
                format!("{} (PaymentIntent {intent_id} recorded)", self.cause)
            }
            _ => self.cause.to_owned(),
        };
        let moved = AuditRow {
            from: &self.payment.status,
            to: &self.proposed,
            cause: &why,
            evidence_id: self.evidence_id,
            proposed: None,
        };
        audit(client, self.payment.id, moved);
        match &mismatch {
            Some(m) => {
                let why = format!("flagged, not fulfilled: {m}");
                let flagged = AuditRow {
                    from: &self.proposed,
                    to: &self.proposed,
                    cause: &why,
                    evidence_id: self.evidence_id,
                    proposed: None,
                };
                audit(client, self.payment.id, flagged);
                Outcome::Flagged
            }
            None => {
                if succeeded {
                    run(
                        client,
                        &FULFILL,
                        &[self.id(), self.payment.order_ref.as_str().into()],
                    );
                }
                Outcome::Applied
            }
        }
    }

    /// `Decision::Unchanged`: the status stays. A decline (a failed attempt leaves the status
    /// at requires_payment_method) is news, so it is recorded and audited; otherwise only the
    /// evidence time and the received amount advance.
    fn keep_status(self, client: &mut SpiClient<'_>) -> Outcome {
        if let Some(error) = &self.error {
            let why = format!(
                "{}: {} {}",
                self.cause,
                field_text(error, "code").unwrap_or_else(|| "error".into()),
                field_text(error, "message").unwrap_or_default()
            );
            let changed: Option<bool> = first(run(
                client,
                &RECORD_DECLINE,
                &[
                    self.id(),
                    JsonB(error.clone()).into(),
                    self.evidence_at.into(),
                ],
            ));
            if changed == Some(true) {
                self.audit_unchanged(client, &why, false);
                return Outcome::Applied;
            }
        }
        run(
            client,
            &RECORD_EVIDENCE,
            &[self.id(), self.evidence_at.into(), self.received.into()],
        );
        Outcome::Unchanged
    }

    /// `Decision::SuccessAfterGiveUp`: two tabs, and an attempt pgpay had superseded was paid
    /// anyway. One order, one kept charge: flag it and refund it under a key derived from the
    /// payment.
    fn refund_superseded(self, client: &mut SpiClient<'_>) -> Outcome {
        run(
            client,
            &FLAG_PAID_AFTER_SUPERSEDED,
            &[self.id(), self.received.into(), self.evidence_at.into()],
        );
        let why = format!(
            "flagged: Stripe reports succeeded for a superseded attempt; refund requested ({})",
            self.cause
        );
        self.audit_unchanged(client, &why, true);
        // Money moved only through a PaymentIntent; without one there is nothing to refund.
        if let Some(intent_id) = self.intent_id.as_deref() {
            run(
                client,
                &ENQUEUE_DUPLICATE_REFUND,
                &[self.id(), intent_id.into()],
            );
        }
        Outcome::Flagged
    }

    /// `Decision::Ignore`: audited with the reason, nothing else.
    fn ignore(self, client: &mut SpiClient<'_>, reason: IgnoreReason) -> Outcome {
        let why = format!("{}: {}", self.cause, reason.as_str());
        self.audit_unchanged(client, &why, true);
        Outcome::Ignored
    }
}

/// Applies PaymentIntent `intent` to `payment`, which the caller has locked. Returns the
/// outcome (applied, unchanged, ignored or flagged), or, before writing anything, why the
/// object cannot be applied (`pgpay_core::event::intent_problem`): each caller decides what
/// that means.
pub fn apply_intent(
    client: &mut SpiClient<'_>,
    payment: &LockedPayment,
    intent: &Value,
    cause: &str,
    evidence_id: Option<&str>,
    evidence_at: i64,
) -> Result<Outcome, &'static str> {
    let evidence = Evidence::read(payment, intent, cause, evidence_id, evidence_at)?;
    Ok(evidence.apply(client))
}

/// The rule's decision for evidence proposing `proposed` (`None`: a status this version does not
/// know, kept and ignored).
fn decide_for(
    payment: &LockedPayment,
    proposed: Option<PaymentStatus>,
    evidence_at: i64,
) -> Decision {
    let Ok(current) = payment.status.parse::<PaymentStatus>() else {
        raise_internal(format!(
            "payment {} has status {:?}, which the transition rule does not know",
            payment.id, payment.status
        ));
    };
    match proposed {
        Some(to) => decide(current, payment.status_evidence_at, to, evidence_at),
        None => Decision::Ignore(IgnoreReason::UnknownStatus),
    }
}

/// What a Checkout Session says, read by `apply_session.rs`.
pub(crate) struct SessionFacts<'a> {
    pub session: &'a Value,
    pub intent_id: Option<String>,
    /// The status it proposes; `None` for one this version does not know.
    pub proposed: Option<PaymentStatus>,
    /// Stripe's text of that status, for the audit log when it is not known.
    pub proposed_text: String,
    pub received: i64,
}

impl<'a> Evidence<'a> {
    /// A Checkout Session as evidence: the same rule and writes as a PaymentIntent.
    pub(crate) fn of_session(
        payment: &'a LockedPayment,
        facts: SessionFacts<'a>,
        cause: &'a str,
        evidence_id: Option<&'a str>,
        evidence_at: i64,
    ) -> Self {
        Evidence {
            payment,
            source: Source::Session(facts.session),
            intent_id: facts.intent_id,
            proposed: facts
                .proposed
                .map_or(facts.proposed_text, |p| p.as_str().to_owned()),
            decision: decide_for(payment, facts.proposed, evidence_at),
            client_secret: None,
            received: facts.received,
            error: None,
            cause,
            evidence_id,
            evidence_at,
        }
    }

    /// Links the PaymentIntent, then applies the rule's decision.
    pub(crate) fn apply(self, client: &mut SpiClient<'_>) -> Outcome {
        let recorded_with_transition = match self.link(client) {
            Link::Second => return Outcome::Flagged,
            Link::WithTransition => true,
            Link::Known | Link::Recorded => false,
        };
        match self.decision {
            Decision::Apply => self.transition(client, recorded_with_transition),
            Decision::Unchanged => self.keep_status(client),
            Decision::SuccessAfterGiveUp => self.refund_superseded(client),
            Decision::Ignore(reason) => self.ignore(client, reason),
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
        apply_intent(client, &payment, &intent.0, cause, evidence_id, evidence_at)
            .unwrap_or_else(|problem| {
                raise_invalid_parameter(format!(
                    "evidence for payment {payment_id} cannot be applied: {problem}"
                ))
            })
            .as_str()
    })
}
