//! `pay.ingest_webhook`: verify, parse, store once and apply, in one call and one transaction.
//! Invariants 3 and 6: a valid event is stored before the 2xx answer whatever its type, applied
//! at most once (the event id is the key); nothing unsigned changes anything.
//!
//! Every webhook runs this, so it is Rust over prepared statements (see `apply_intent` for why).

use std::time::{Duration, Instant};

use pgpay_core::billing::{billing_problem, subscription_ref};
use pgpay_core::event::{event_created, field_text, read_event, MAX_EVENT_BYTES};
use pgpay_core::failure::is_infrastructure;
use pgpay_core::object::payment_ref;
use pgpay_core::outcome::Outcome;
use pgpay_core::signature::{verify_any, Tolerance};
use pgrx::pg_sys::BuiltinOid::{BOOLOID, INT4OID, INT8OID, TEXTOID, UUIDOID};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;
use serde_json::Value;

use crate::apply_intent::{apply_intent, LockedPayment};
use crate::apply_session::apply_session;
use crate::breaker::{self, Admission};
use crate::errors::{raise_internal, raise_with_hint};
use crate::lookup::{lock_payment_for, lock_subscription_for, subscriptions_installed};
use crate::plans::{first, run, Statement};
use crate::secrets::live_secrets;
use crate::signature::unix_now;
use crate::subxact::{in_subtransaction, Failure};
use crate::text_bytes::TextBytes;

/// Signatures older than this are refused (Stripe's SDKs use the same default).
const TOLERANCE_SECONDS: u32 = 300;

// Rejections are counted by reason and day; attacker payloads are never stored.
static COUNT_REJECTION: Statement = Statement {
    sql: "INSERT INTO pay.webhook_rejections AS r (day, reason, count, last_at) \
          VALUES (current_date, $1, 1, now()) \
          ON CONFLICT (day, reason) DO UPDATE SET count = r.count + 1, last_at = excluded.last_at",
    args: &[TEXTOID],
};
static EVENT_SEEN: Statement = Statement {
    sql: "SELECT true FROM pay.webhook_events e WHERE e.event_id = $1",
    args: &[TEXTOID],
};
static COUNT_DUPLICATE: Statement = Statement {
    sql: "UPDATE pay.webhook_events e \
          SET duplicate_deliveries = e.duplicate_deliveries + 1, last_duplicate_at = now() \
          WHERE e.event_id = $1",
    args: &[TEXTOID],
};
static STORE_EVENT: Statement = Statement {
    sql: "INSERT INTO pay.webhook_events \
              (event_id, type, payload, stripe_created, livemode, outcome, payment_id, detail, source) \
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
          ON CONFLICT (event_id) DO NOTHING RETURNING true",
    args: &[
        TEXTOID, TEXTOID, TEXTOID, INT8OID, BOOLOID, TEXTOID, UUIDOID, TEXTOID, TEXTOID,
    ],
};
// Quarantined and deferred events: the same row, with when it was held back and why.
static STORE_HELD_EVENT: Statement = Statement {
    sql: "INSERT INTO pay.webhook_events \
              (event_id, type, payload, stripe_created, livemode, outcome, payment_id, detail, source, \
               held_at, failures, last_error, last_sqlstate, failed_at) \
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), $10, $11, $12, CASE WHEN $10 > 0 THEN now() END) \
          ON CONFLICT (event_id) DO NOTHING RETURNING true",
    args: &[
        TEXTOID, TEXTOID, TEXTOID, INT8OID, BOOLOID, TEXTOID, UUIDOID, TEXTOID, TEXTOID, INT4OID,
        TEXTOID, TEXTOID,
    ],
};
// Refunds, charges and disputes: rare, and written in plpgsql (pay._apply_event).
static APPLY_OTHER_EVENT: Statement = Statement {
    sql: "SELECT a.outcome, a.detail FROM pay.payments p, pay._apply_event($1::jsonb, p) a WHERE p.id = $2",
    args: &[TEXTOID, UUIDOID],
};

// Subscriptions, invoices and subscription-mode Checkout Sessions: written in plpgsql, the rule
// asked of pgpay-core for every decision (sql/13_subscription_evidence.sql).
static APPLY_BILLING_OBJECT: Statement = Statement {
    sql: "SELECT a.outcome, a.detail \
          FROM pay._apply_billing_object($1, ($2::jsonb) #> '{data,object}', $3, $4, $5, $6) a",
    args: &[UUIDOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT8OID],
};

/// The row an event is about, locked.
enum Subject {
    Payment(LockedPayment),
    Subscription(Uuid),
}

impl Subject {
    fn payment_id(&self) -> Option<Uuid> {
        match self {
            Subject::Payment(p) => Some(p.id),
            Subject::Subscription(_) => None,
        }
    }
}

/// Applies a billing event (Subscription, Invoice, subscription-mode Checkout Session) to
/// `subscription`, locked by the caller: the outcome and a detail. An object that cannot be
/// applied is stored for a human, like a broken PaymentIntent.
pub fn apply_billing_event(
    client: &mut SpiClient<'_>,
    payload: &str,
    event: &Value,
    subscription: Uuid,
    cause: &str,
) -> (Outcome, Option<String>) {
    let event_id = field_text(event, "id");
    let kind = field_text(event, "type").unwrap_or_default();
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    if let Some(problem) = billing_problem(object) {
        return (
            Outcome::Stored,
            Some(format!("{kind} not applied: {problem}")),
        );
    }
    let at = event_created(event).unwrap_or_else(unix_now);
    let table = run(
        client,
        &APPLY_BILLING_OBJECT,
        &[
            subscription.into(),
            payload.into(),
            kind.as_str().into(),
            format!("{cause} {kind}").as_str().into(),
            event_id.as_deref().into(),
            at.into(),
        ],
    )
    .first();
    match (table.get::<String>(1), table.get::<String>(2)) {
        (Ok(Some(outcome)), Ok(detail)) => match outcome.parse::<Outcome>() {
            Ok(outcome) => (outcome, detail),
            Err(e) => raise_internal(format!("pay._apply_billing_object: {e}")),
        },
        _ => raise_internal("pay._apply_billing_object returned no outcome"),
    }
}

/// What became of an event: `None` outcome when it had been received before.
pub struct Stored {
    pub outcome: Option<Outcome>,
    pub payment_id: Option<Uuid>,
    pub detail: Option<String>,
    /// How long finding and locking the payment's row took (mostly waiting for the lock when
    /// another transaction holds it); `None` when the event names no payment.
    pub lock_wait: Option<Duration>,
}

/// What the guarded part of an event's application came to.
enum Attempt {
    /// Received before (found under the payment's lock).
    Duplicate,
    /// Applied (whatever the outcome), or deferred by an open breaker.
    Done {
        outcome: Outcome,
        detail: Option<String>,
        payment_id: Option<Uuid>,
    },
}

/// Applies `event` to `payment` (locked by the caller) through the transition rule or
/// `pay._apply_event`: the outcome and a detail. `cause` names the source in the audit rows.
pub fn apply_event(
    client: &mut SpiClient<'_>,
    payload: &str,
    event: &Value,
    payment: &LockedPayment,
    cause: &str,
) -> (Outcome, Option<String>) {
    let event_id = field_text(event, "id");
    let kind = field_text(event, "type").unwrap_or_default();
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    // An event without a usable time counts as now.
    let at = event_created(event).unwrap_or_else(unix_now);
    let applied = match object.get("object").and_then(Value::as_str) {
        Some("payment_intent") if kind.starts_with("payment_intent.") => Some(apply_intent(
            client,
            payment,
            object,
            &format!("{cause} {kind}"),
            event_id.as_deref(),
            at,
        )),
        Some("checkout.session") if kind.starts_with("checkout.session.") => Some(apply_session(
            client,
            payment,
            object,
            Some(&kind),
            &format!("{cause} {kind}"),
            event_id.as_deref(),
            at,
        )),
        _ => None,
    };
    if let Some(applied) = applied {
        match applied {
            Ok(outcome) => (outcome, Some(format!("{kind} -> {outcome}"))),
            // Signed, so Stripe's own: kept for a human, answered 200 (a 5xx would only
            // bring the same body back for days).
            Err(problem) => (
                Outcome::Stored,
                Some(format!("{kind} not applied: {problem}")),
            ),
        }
    } else {
        let table = run(
            client,
            &APPLY_OTHER_EVENT,
            &[payload.into(), payment.id.into()],
        )
        .first();
        let read = (table.get::<String>(1), table.get::<String>(2));
        match read {
            (Ok(Some(outcome)), Ok(detail)) => match outcome.parse::<Outcome>() {
                Ok(outcome) => (outcome, detail),
                Err(e) => raise_internal(format!("pay._apply_event: {e}")),
            },
            _ => raise_internal("pay._apply_event returned no outcome"),
        }
    }
}

/// Raises `failure` again when the infrastructure failed (Stripe must deliver again later);
/// returns when the failure is the event's own (it is quarantined).
pub fn raise_if_infrastructure(failure: &Failure) {
    if is_infrastructure(&failure.sqlstate) {
        failure.raise();
    }
}

/// Stores an event once and applies it: one write of the event row, with its outcome.
///
/// Dedup without a second write: every event about a payment first takes that payment's row
/// lock, so two deliveries of one event serialise there and the second finds the first's row.
/// Events about no payment go straight to the insert, where the primary key does the same job.
///
/// The safety net: finding and locking the payment, the breaker check and the application run
/// in one subtransaction (only for events that name a payment: nothing else can fail there).
/// When it raises, nothing of it stays; unless the infrastructure failed, the event is stored
/// `quarantined` with the error and counted against its type's breaker.
pub fn store_and_apply(
    client: &mut SpiClient<'_>,
    payload: &str,
    event: &Value,
    source: &str,
) -> Stored {
    let event_id = field_text(event, "id");
    let event_type = field_text(event, "type");
    let kind = event_type.as_deref().unwrap_or("");
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);

    let safety_net = breaker::installed(client);
    let mut lock_wait = None;
    let mut locked: Option<Uuid> = None;
    let mut locked_subscription: Option<Uuid> = None;
    let mut probe = false;
    let billing = subscription_ref(object).filter(|_| subscriptions_installed(client));
    let attempt = if billing.is_none() && payment_ref(object).is_none() {
        Ok(Attempt::Done {
            outcome: Outcome::Stored,
            detail: Some("not about a pgpay payment".to_owned()),
            payment_id: None,
        })
    } else {
        in_subtransaction(|| {
            let started = Instant::now();
            let subject = match &billing {
                Some(r) => lock_subscription_for(client, r).map(Subject::Subscription),
                None => lock_payment_for(client, object).map(Subject::Payment),
            };
            lock_wait = Some(started.elapsed());
            let Some(subject) = subject else {
                return Attempt::Done {
                    outcome: Outcome::Stored,
                    detail: Some(
                        if billing.is_some() {
                            "not about a pgpay subscription"
                        } else {
                            "not about a pgpay payment"
                        }
                        .to_owned(),
                    ),
                    payment_id: None,
                };
            };
            match &subject {
                Subject::Payment(payment) => locked = Some(payment.id),
                Subject::Subscription(id) => locked_subscription = Some(*id),
            }
            let seen: Option<bool> = first(run(client, &EVENT_SEEN, &[event_id.as_deref().into()]));
            if seen == Some(true) {
                run(client, &COUNT_DUPLICATE, &[event_id.as_deref().into()]);
                return Attempt::Duplicate;
            }
            let admission = if safety_net {
                breaker::admit(client, kind)
            } else {
                Admission::Closed
            };
            match admission {
                Admission::Closed => {}
                Admission::Probe => probe = true,
                Admission::Defer => {
                    return Attempt::Done {
                        outcome: Outcome::Deferred,
                        detail: Some(format!("{kind} deferred: its circuit breaker is open")),
                        payment_id: subject.payment_id(),
                    }
                }
            }
            let (outcome, detail) = match &subject {
                Subject::Payment(payment) => {
                    apply_event(client, payload, event, payment, "webhook")
                }
                Subject::Subscription(id) => {
                    apply_billing_event(client, payload, event, *id, "webhook")
                }
            };
            Attempt::Done {
                outcome,
                detail,
                payment_id: subject.payment_id(),
            }
        })
    };
    let (outcome, detail, payment_id, failure) = match attempt {
        Ok(Attempt::Duplicate) => {
            return Stored {
                lock_wait,
                ..Stored::DUPLICATE
            }
        }
        Ok(Attempt::Done {
            outcome,
            detail,
            payment_id,
        }) => {
            if probe {
                breaker::close(client, kind, "the half-open probe applied");
            }
            (outcome, detail, payment_id, None)
        }
        Err(failure) => {
            if !safety_net {
                failure.raise();
            }
            raise_if_infrastructure(&failure);
            // Every event about a payment is stored under the payment's lock (the rollback
            // released the one taken inside).
            if let Some(id) = locked {
                LockedPayment::lock(client, id);
            }
            if let Some(id) = locked_subscription {
                let r = pgpay_core::billing::SubscriptionRef {
                    kind: pgpay_core::billing::BillingKind::Subscription,
                    subscription: None,
                    session: None,
                    claimed: Some(*id.as_bytes()),
                };
                lock_subscription_for(client, &r);
            }
            breaker::record_failure(client, kind, &failure, probe);
            let detail = format!("{kind} quarantined: {}", failure.message);
            (Outcome::Quarantined, Some(detail), locked, Some(failure))
        }
    };
    let livemode = event.get("livemode").and_then(Value::as_bool);
    let created = event_created(event);
    let mut args: Vec<pgrx::datum::DatumWithOid<'_>> = vec![
        event_id.as_deref().into(),
        event_type.as_deref().into(),
        payload.into(),
        created.into(),
        livemode.into(),
        outcome.as_str().into(),
        payment_id.into(),
        detail.as_deref().into(),
        source.into(),
    ];
    let statement = if matches!(outcome, Outcome::Quarantined | Outcome::Deferred) {
        let failures = i32::from(failure.is_some());
        let (error, sqlstate) = match &failure {
            Some(f) => (Some(f.message.as_str()), Some(f.sqlstate.as_str())),
            None => (None, None),
        };
        args.extend([failures.into(), error.into(), sqlstate.into()]);
        &STORE_HELD_EVENT
    } else {
        &STORE_EVENT
    };
    let inserted: Option<bool> = first(run(client, statement, &args));
    if inserted != Some(true) {
        if payment_id.is_some() || locked_subscription.is_some() {
            // Cannot happen under the payment lock; if it ever does, undo the apply (the caller
            // answers 5xx and Stripe's retry finds the event).
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                format!(
                    "event {} was stored concurrently while its payment was locked",
                    event_id.as_deref().unwrap_or("")
                )
            );
        }
        run(client, &COUNT_DUPLICATE, &[event_id.as_deref().into()]);
        return Stored {
            lock_wait,
            ..Stored::DUPLICATE
        };
    }
    Stored {
        outcome: Some(outcome),
        payment_id,
        detail,
        lock_wait,
    }
}

impl Stored {
    const DUPLICATE: Stored = Stored {
        outcome: None,
        payment_id: None,
        detail: None,
        lock_wait: None,
    };
}

/// status, http_status, event_id, detail.
type IngestRow = (String, i32, Option<String>, Option<String>);

fn rejected(client: &mut SpiClient<'_>, reason: &str, detail: String) -> IngestRow {
    run(client, &COUNT_REJECTION, &[reason.into()]);
    (
        Outcome::Rejected.as_str().to_owned(),
        400,
        None,
        Some(detail),
    )
}

/// `pay.ingest_webhook(payload, signature_header)`. `applied` / `duplicate` / `stored` answer
/// 200, `rejected` 400 (nothing stored, counted by reason). Never raises on bad input; raises when
/// no live secret is configured (not the sender's fault: 5xx, so Stripe keeps the event).
#[pg_extern(volatile, security_definer, name = "ingest_webhook")]
#[search_path(pg_catalog, pay, pg_temp)]
fn ingest_webhook(
    payload: Option<TextBytes<'_>>,
    signature_header: Option<TextBytes<'_>>,
) -> TableIterator<
    'static,
    (
        name!(status, String),
        name!(http_status, i32),
        name!(event_id, Option<String>),
        name!(detail, Option<String>),
    ),
> {
    TableIterator::once(ingest(payload, signature_header).row)
}

/// `pay.ingest_webhook_measured(payload, signature_header)`: `pay.ingest_webhook` for the
/// worker's relay, which also exports metrics: the same row, plus the event's type (NULL when
/// rejected: an unsigned body names no type worth a label) and how long finding and locking the
/// payment's row took, in microseconds (NULL when the event names no payment).
// pgrx names the result's columns from the `name!` tuple, which must be written out here.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, security_definer, name = "ingest_webhook_measured")]
#[search_path(pg_catalog, pay, pg_temp)]
fn ingest_webhook_measured(
    payload: Option<TextBytes<'_>>,
    signature_header: Option<TextBytes<'_>>,
) -> TableIterator<
    'static,
    (
        name!(status, String),
        name!(http_status, i32),
        name!(event_id, Option<String>),
        name!(detail, Option<String>),
        name!(event_type, Option<String>),
        name!(lock_wait_us, Option<i64>),
    ),
> {
    let Ingested {
        row: (status, http_status, event_id, detail),
        event_type,
        lock_wait,
    } = ingest(payload, signature_header);
    let lock_wait_us = lock_wait.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    TableIterator::once((
        status,
        http_status,
        event_id,
        detail,
        event_type,
        lock_wait_us,
    ))
}

/// One delivery's answer, with what the relay measures.
struct Ingested {
    row: IngestRow,
    event_type: Option<String>,
    lock_wait: Option<Duration>,
}

impl Ingested {
    fn plain(row: IngestRow) -> Ingested {
        Ingested {
            row,
            event_type: None,
            lock_wait: None,
        }
    }
}

/// Verify, parse, store once and apply: the body of both entry points.
fn ingest(payload: Option<TextBytes<'_>>, signature_header: Option<TextBytes<'_>>) -> Ingested {
    Spi::connect_mut(|client| {
        let secrets = live_secrets(client);
        if secrets.is_empty() {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "ingest_webhook: no live webhook secret is configured",
                "Add the endpoint's signing secret with pay.add_webhook_secret.",
            );
        }
        let Some(TextBytes(payload)) = payload else {
            return Ingested::plain(rejected(
                client,
                "missing_payload",
                "missing_payload: no request body".into(),
            ));
        };
        if payload.len() > MAX_EVENT_BYTES {
            return Ingested::plain(rejected(
                client,
                "payload_too_large",
                format!("payload_too_large: more than {MAX_EVENT_BYTES} bytes"),
            ));
        }
        // A header that is not UTF-8 (a SQL_ASCII database lets any bytes through) is malformed.
        let header = match signature_header.map(TextBytes::as_utf8) {
            None => "",
            Some(Some(header)) => header,
            Some(None) => {
                return Ingested::plain(rejected(
                    client,
                    "malformed_header",
                    "malformed_header".into(),
                ))
            }
        };
        let verified = verify_any(
            payload,
            header,
            &secrets,
            Tolerance::from_seconds(TOLERANCE_SECONDS),
            unix_now(),
        );
        if let Err(failure) = verified {
            let reason = failure.reason();
            return Ingested::plain(rejected(client, reason, reason.to_owned()));
        }
        let event = std::str::from_utf8(payload)
            .ok()
            .and_then(|payload| read_event(payload).map(|event| (payload, event)));
        let Some((payload, event)) = event else {
            return Ingested::plain(rejected(
                client,
                "not_an_event",
                "not_an_event: signed, but not a Stripe event object".into(),
            ));
        };
        let event_id = field_text(&event, "id");
        let event_type = field_text(&event, "type");
        let stored = store_and_apply(client, payload, &event, "webhook");
        let row = match stored.outcome {
            None => (
                Outcome::Duplicate.as_str().to_owned(),
                200,
                event_id,
                Some("already received".into()),
            ),
            Some(outcome) => (
                outcome.event_status().as_str().to_owned(),
                200,
                event_id,
                stored.detail,
            ),
        };
        Ingested {
            row,
            event_type,
            lock_wait: stored.lock_wait,
        }
    })
}

/// `pay._store_and_apply_event(payload, source)`: the same store-once-and-apply for events read
/// from Stripe's API (`pay.apply_stripe_event`, trusted: only the worker calls it).
#[pg_extern(volatile, name = "_store_and_apply_event")]
fn store_and_apply_event(
    payload: &str,
    source: &str,
) -> TableIterator<
    'static,
    (
        name!(outcome, Option<String>),
        name!(payment_id, Option<Uuid>),
        name!(detail, Option<String>),
    ),
> {
    if payload.len() > MAX_EVENT_BYTES {
        crate::errors::raise_invalid_parameter(format!(
            "_store_and_apply_event: event is larger than {MAX_EVENT_BYTES} bytes"
        ));
    }
    let Some(event) = read_event(payload) else {
        crate::errors::raise_invalid_parameter("_store_and_apply_event: not a Stripe event object");
    };
    let stored = Spi::connect_mut(|client| store_and_apply(client, payload, &event, source));
    TableIterator::once((
        stored.outcome.map(|o| o.as_str().to_owned()),
        stored.payment_id,
        stored.detail,
    ))
}
