//! `pay.ingest_webhook`: verify, parse, store once and apply, in one call and one transaction.
//! Invariants 3 and 6: a valid event is stored before the 2xx answer whatever its type, applied
//! at most once (the event id is the key); nothing unsigned changes anything.
//!
//! Every webhook runs this, so it is Rust over prepared statements (see `apply_intent` for why).

use pgpay_core::event::{event_created, field_text, read_event, MAX_EVENT_BYTES};
use pgpay_core::outcome::Outcome;
use pgpay_core::signature::{verify_any, Tolerance};
use pgrx::pg_sys::BuiltinOid::{BOOLOID, INT8OID, TEXTOID, UUIDOID};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;
use serde_json::Value;

use crate::apply_intent::apply_intent;
use crate::apply_session::apply_session;
use crate::errors::{raise_internal, raise_with_hint};
use crate::lookup::lock_payment_for;
use crate::plans::{first, run, Statement};
use crate::secrets::live_secrets;
use crate::signature::unix_now;
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
// Refunds, charges and disputes: rare, and written in plpgsql (pay._apply_event).
static APPLY_OTHER_EVENT: Statement = Statement {
    sql: "SELECT a.outcome, a.detail FROM pay.payments p, pay._apply_event($1::jsonb, p) a WHERE p.id = $2",
    args: &[TEXTOID, UUIDOID],
};

/// What became of an event: `None` outcome when it had been received before.
pub struct Stored {
    pub outcome: Option<Outcome>,
    pub payment_id: Option<Uuid>,
    pub detail: Option<String>,
}

impl Stored {
    const DUPLICATE: Stored = Stored {
        outcome: None,
        payment_id: None,
        detail: None,
    };
}

/// Stores an event once and applies it: one write of the event row, with its outcome.
///
/// Dedup without a second write: every event about a payment first takes that payment's row
/// lock, so two deliveries of one event serialise there and the second finds the first's row.
/// Events about no payment go straight to the insert, where the primary key does the same job.
pub fn store_and_apply(
    client: &mut SpiClient<'_>,
    payload: &str,
    event: &Value,
    source: &str,
) -> Stored {
    let event_id = field_text(event, "id");
    let event_type = field_text(event, "type");
    let created = event_created(event);
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);

    let payment = lock_payment_for(client, object);
    let (outcome, detail) = match &payment {
        Some(payment) => {
            let seen: Option<bool> = first(run(client, &EVENT_SEEN, &[event_id.as_deref().into()]));
            if seen == Some(true) {
                run(client, &COUNT_DUPLICATE, &[event_id.as_deref().into()]);
                return Stored::DUPLICATE;
            }
            let kind = event_type.as_deref().unwrap_or("");
            // An event without a usable time counts as now.
            let at = created.unwrap_or_else(unix_now);
            let cause = format!("webhook {kind}");
            let evidence = event_id.as_deref();
            let applied = match object.get("object").and_then(Value::as_str) {
                Some("payment_intent") if kind.starts_with("payment_intent.") => {
                    Some(apply_intent(client, payment, object, &cause, evidence, at))
                }
                Some("checkout.session") if kind.starts_with("checkout.session.") => Some(
                    apply_session(client, payment, object, Some(kind), &cause, evidence, at),
                ),
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
        None => (
            Outcome::Stored,
            Some("not about a pgpay payment".to_owned()),
        ),
    };
    let payment_id = payment.as_ref().map(|p| p.id);
    let livemode = event.get("livemode").and_then(Value::as_bool);
    let inserted: Option<bool> = first(run(
        client,
        &STORE_EVENT,
        &[
            event_id.as_deref().into(),
            event_type.as_deref().into(),
            payload.into(),
            created.into(),
            livemode.into(),
            outcome.as_str().into(),
            payment_id.into(),
            detail.as_deref().into(),
            source.into(),
        ],
    ));
    if inserted != Some(true) {
        if payment_id.is_some() {
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
        return Stored::DUPLICATE;
    }
    Stored {
        outcome: Some(outcome),
        payment_id,
        detail,
    }
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
    let row = Spi::connect_mut(|client| {
        let secrets = live_secrets(client);
        if secrets.is_empty() {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "ingest_webhook: no live webhook secret is configured",
                "Add the endpoint's signing secret with pay.add_webhook_secret.",
            );
        }
        let Some(TextBytes(payload)) = payload else {
            return rejected(
                client,
                "missing_payload",
                "missing_payload: no request body".into(),
            );
        };
        if payload.len() > MAX_EVENT_BYTES {
            return rejected(
                client,
                "payload_too_large",
                format!("payload_too_large: more than {MAX_EVENT_BYTES} bytes"),
            );
        }
        // A header that is not UTF-8 (a SQL_ASCII database lets any bytes through) is malformed.
        let header = match signature_header.map(TextBytes::as_utf8) {
            None => "",
            Some(Some(header)) => header,
            Some(None) => return rejected(client, "malformed_header", "malformed_header".into()),
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
            return rejected(client, reason, reason.to_owned());
        }
        let event = std::str::from_utf8(payload)
            .ok()
            .and_then(|payload| read_event(payload).map(|event| (payload, event)));
        let Some((payload, event)) = event else {
            return rejected(
                client,
                "not_an_event",
                "not_an_event: signed, but not a Stripe event object".into(),
            );
        };
        let event_id = field_text(&event, "id");
        let stored = store_and_apply(client, payload, &event, "webhook");
        match stored.outcome {
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
        }
    });
    TableIterator::once(row)
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
