//! The per-event-type circuit breaker, from the ingest hot path: one primary-key lookup per
//! applied event while its type is closed; the state changes themselves are plpgsql
//! (`pay._breaker_*` in sql/11_safety.sql), run only when a type is not closed or fails.

use std::cell::Cell;

use pgrx::pg_sys::BuiltinOid::{BOOLOID, TEXTOID};
use pgrx::spi::SpiClient;

use crate::plans::{first, run, Statement};
use crate::subxact::Failure;

static SAFETY_NET_INSTALLED: Statement = Statement {
    sql: "SELECT to_regclass('pay.event_type_health') IS NOT NULL",
    args: &[],
};

thread_local! {
    /// Once seen, the safety net's tables stay (a downgrade is not possible).
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this database's pgpay schema has the safety net (0.2.0 on). Between installing a
/// new library and `ALTER EXTENSION pgpay UPDATE`, a 0.1.0 schema runs with it: its events are
/// applied as 0.1.0 applied them, and a failure raises. Asked once per backend after it is
/// true, so it costs nothing on the hot path.
pub fn installed(client: &mut SpiClient<'_>) -> bool {
    if INSTALLED.get() {
        return true;
    }
    let yes = first::<bool>(run(client, &SAFETY_NET_INSTALLED, &[])) == Some(true);
    INSTALLED.set(yes);
    yes
}

static NOT_CLOSED: Statement = Statement {
    sql: "SELECT true FROM pay.event_type_health h WHERE h.event_type = $1 AND h.state <> 'closed'",
    args: &[TEXTOID],
};
static ADMIT: Statement = Statement {
    sql: "SELECT pay._breaker_admit($1)",
    args: &[TEXTOID],
};
static FAILED: Statement = Statement {
    sql: "SELECT pay._breaker_failure($1, $2, $3, $4)",
    args: &[TEXTOID, TEXTOID, TEXTOID, BOOLOID],
};
static CLOSE: Statement = Statement {
    sql: "SELECT pay._breaker_close($1, $2)",
    args: &[TEXTOID, TEXTOID],
};

/// What an event of a type may do now.
pub enum Admission {
    /// The breaker is closed: apply.
    Closed,
    /// The breaker was open for longer than `pay.breaker_cooldown`: this event is the one
    /// half-open try; its success closes the breaker, its failure opens it again.
    Probe,
    /// The breaker is open: store the event `deferred`, do not apply it.
    Defer,
}

/// Whether an event of type `event_type` may be applied now.
pub fn admit(client: &mut SpiClient<'_>, event_type: &str) -> Admission {
    let not_closed: Option<bool> = first(run(client, &NOT_CLOSED, &[event_type.into()]));
    if not_closed != Some(true) {
        return Admission::Closed;
    }
    let admission: Option<String> = first(run(client, &ADMIT, &[event_type.into()]));
    match admission.as_deref() {
        Some("probe") => Admission::Probe,
        Some("closed") => Admission::Closed,
        _ => Admission::Defer,
    }
}

/// Counts a failure against `event_type` (opening its breaker after `pay.breaker_failures`
/// in `pay.breaker_window`, or again when `probe` was the half-open try).
pub fn record_failure(
    client: &mut SpiClient<'_>,
    event_type: &str,
    failure: &Failure,
    probe: bool,
) {
    run(
        client,
        &FAILED,
        &[
            event_type.into(),
            failure.sqlstate.as_str().into(),
            failure.message.as_str().into(),
            probe.into(),
        ],
    );
}

/// Closes the breaker of `event_type` (a probe or a replay applied).
pub fn close(client: &mut SpiClient<'_>, event_type: &str, why: &str) {
    run(client, &CLOSE, &[event_type.into(), why.into()]);
}
