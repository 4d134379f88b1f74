//! `pay._replay_event`: applies one stored event again, through the same guarded path as a
//! delivery (`webhook::apply_event` in a subtransaction), for `pay.replay_events`.
//!
//! Safe beside live ingest and other replays: the payment's row lock is taken first (as ingest
//! does), then the event's row, and whether the event still needs a replay is decided under
//! both. An event that is already reflected changes nothing (the transition rule finds the
//! payment where the event would put it).

use pgpay_core::billing::subscription_ref;
use pgpay_core::event::{field_text, read_event};
use pgpay_core::outcome::Outcome;
use pgrx::pg_sys::BuiltinOid::{TEXTOID, UUIDOID};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;
use serde_json::Value;

use crate::lookup::{lock_payment_for, lock_subscription_for, subscriptions_installed};
use crate::plans::{first, run, Statement};
use crate::subxact::tentatively;
use crate::webhook::{apply_billing_event, apply_event, raise_if_infrastructure};

static READ_EVENT: Statement = Statement {
    sql: "SELECT e.payload FROM pay.webhook_events e WHERE e.event_id = $1",
    args: &[TEXTOID],
};
static LOCK_EVENT: Statement = Statement {
    sql: "SELECT e.outcome FROM pay.webhook_events e WHERE e.event_id = $1 FOR UPDATE",
    args: &[TEXTOID],
};
static REPLAYED: Statement = Statement {
    sql: "UPDATE pay.webhook_events e \
          SET outcome = $2, detail = $3, payment_id = coalesce($4, e.payment_id), \
              replays = e.replays + 1, replayed_at = now() \
          WHERE e.event_id = $1",
    args: &[TEXTOID, TEXTOID, TEXTOID, UUIDOID],
};
static REPLAY_FAILED: Statement = Statement {
    sql: "UPDATE pay.webhook_events e \
          SET outcome = 'quarantined', detail = $2, held_at = coalesce(e.held_at, now()), \
              failures = e.failures + 1, last_error = $3, last_sqlstate = $4, failed_at = now(), \
              replays = e.replays + 1, replayed_at = now() \
          WHERE e.event_id = $1",
    args: &[TEXTOID, TEXTOID, TEXTOID, TEXTOID],
};
// Events applied by plpgsql (refunds, charges, disputes) carry their own audit causes; a replay
// that changed a payment says so in one more row.
static AUDIT_REPLAY: Statement = Statement {
    sql: "SELECT pay._audit(p.id, p.status, p.status, $2, $3) FROM pay.payments p WHERE p.id = $1",
    args: &[UUIDOID, TEXTOID, TEXTOID],
};

fn replayable(outcome: Option<&str>, include_applied: bool) -> bool {
    include_applied || matches!(outcome, Some("quarantined" | "deferred"))
}

/// The replay of one event, under its payment's and its own row lock, and whether to keep it:
/// a replay of an event that had been applied and that changes no payment now (unchanged,
/// ignored as older, stored) is undone whole, so replaying twice changes nothing, not even the
/// audit log.
fn replay(
    client: &mut SpiClient<'_>,
    event_id: &str,
    payload: &str,
    event: &Value,
    include_applied: bool,
) -> (Option<(Outcome, Option<String>)>, bool) {
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    // A billing object (subscription, invoice, subscription-mode session) is about a
    // subscription, never a payment: the same routing as a delivery.
    let billing = subscription_ref(object).filter(|_| subscriptions_installed(client));
    let subscription = billing
        .as_ref()
        .and_then(|r| lock_subscription_for(client, r));
    let is_billing = billing.is_some();
    let payment = match billing {
        Some(_) => None,
        None => lock_payment_for(client, object),
    };
    let current: Option<String> = first(run(client, &LOCK_EVENT, &[event_id.into()]));
    if !replayable(current.as_deref(), include_applied) {
        // Another replay got there first.
        return (None, false);
    }
    let (outcome, detail) = match (&payment, subscription) {
        (Some(payment), _) => apply_event(client, payload, event, payment, "replay: webhook"),
        (None, Some(subscription)) => {
            apply_billing_event(client, payload, event, subscription, "replay: webhook")
        }
        (None, None) => (
            Outcome::Stored,
            Some(
                if is_billing {
                    "not about a pgpay subscription"
                } else {
                    "not about a pgpay payment"
                }
                .to_owned(),
            ),
        ),
    };
    let payment_id: Option<Uuid> = payment.as_ref().map(|p| p.id);
    run(
        client,
        &REPLAYED,
        &[
            event_id.into(),
            outcome.as_str().into(),
            detail.as_deref().into(),
            payment_id.into(),
        ],
    );
    let kind = field_text(event, "type").unwrap_or_default();
    if let Some(id) = payment_id {
        if outcome.changed_a_payment() && !kind.starts_with("payment_intent.") {
            let why = format!("replay: {kind} -> {outcome}");
            run(
                client,
                &AUDIT_REPLAY,
                &[id.into(), why.as_str().into(), event_id.into()],
            );
        }
    }
    let held = matches!(current.as_deref(), Some("quarantined" | "deferred"));
    let keep = held || outcome.changed_a_payment();
    (Some((outcome, detail)), keep)
}

/// `pay._replay_event(event_id, include_applied)`: the outcome of applying stored event
/// `event_id` again (as the transition rule says: applied, unchanged, ignored, flagged, stored;
/// `quarantined` when it failed again), or `skipped` when it no longer needs a replay.
/// Infrastructure failures raise.
#[pg_extern(volatile, name = "_replay_event")]
fn replay_event(
    event_id: &str,
    include_applied: bool,
) -> TableIterator<'static, (name!(outcome, String), name!(detail, Option<String>))> {
    let row = Spi::connect_mut(|client| {
        let payload: Option<String> = first(run(client, &READ_EVENT, &[event_id.into()]));
        let Some(payload) = payload else {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
                format!("replay: no stored event {event_id}")
            );
        };
        let Some(event) = read_event(&payload) else {
            crate::errors::raise_internal(format!(
                "replay: stored event {event_id} is not a Stripe event object"
            ));
        };
        match tentatively(|| replay(client, event_id, &payload, &event, include_applied)) {
            Ok(Some((outcome, detail))) => (outcome.as_str().to_owned(), detail),
            Ok(None) => ("skipped".to_owned(), None),
            Err(failure) => {
                raise_if_infrastructure(&failure);
                let detail = format!(
                    "{} quarantined again on replay: {}",
                    field_text(&event, "type").unwrap_or_default(),
                    failure.message
                );
                run(
                    client,
                    &REPLAY_FAILED,
                    &[
                        event_id.into(),
                        detail.as_str().into(),
                        failure.message.as_str().into(),
                        failure.sqlstate.as_str().into(),
                    ],
                );
                (Outcome::Quarantined.as_str().to_owned(), Some(detail))
            }
        }
    });
    TableIterator::once(row)
}
