//! The per-event-type circuit breaker, from the ingest hot path. While every breaker is closed
//! (the usual state) an applied event costs nothing here: each backend keeps "no breaker is
//! open" in memory, and drops it when `pay.event_type_health` changes. Only while some type is
//! not closed does each event look its own type up (one primary-key read). The state changes
//! themselves are plpgsql (`pay._breaker_*` in sql/11_safety.sql), run only when a type is not
//! closed or fails.
//!
//! The copy is kept correct as the webhook secrets' is (`secrets.rs`): every statement that
//! changes `pay.event_type_health` fires the statement trigger `event_type_health_changed`
//! (ENABLE ALWAYS), which queues a relcache invalidation of the table; every backend processes it
//! before its next transaction (this one at its next command), and the callback registered here
//! drops the copy. A breaker opened by another backend is therefore seen by every transaction
//! that starts after the opening commits, as a fresh read would see it under READ COMMITTED.
//! Measured on scripts/bench-ingest (README, "Performance").

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;
use pgrx::pg_sys::BuiltinOid::{BOOLOID, TEXTOID};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::plans::{first, run, Statement};
use crate::secrets::uses_transaction_snapshot;
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

static ANY_NOT_CLOSED: Statement = Statement {
    sql: "SELECT EXISTS (SELECT 1 FROM pay.event_type_health h WHERE h.state <> 'closed')",
    args: &[],
};
static HEALTH_TABLE: Statement = Statement {
    sql: "SELECT 'pay.event_type_health'::regclass::oid::bigint",
    args: &[],
};

#[derive(Default)]
struct Cache {
    callback_registered: bool,
    table: Option<pg_sys::Oid>,
    /// `Some(true)`: no breaker is open or half-open; `None`: not known (read it).
    all_closed: Option<bool>,
    /// Counts invalidations, so that a read overtaken by one is used once and not kept.
    generation: u64,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_breakers(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        // InvalidOid: the whole relcache was reset (the invalidation queue overflowed).
        if relid == pg_sys::InvalidOid || cache.table == Some(relid) {
            cache.all_closed = None;
            // Looked up again: a dropped and re-created extension has a new table.
            cache.table = None;
            cache.generation += 1;
        }
    });
}

/// Whether every event type's breaker is closed, from this backend's copy when it has one.
fn all_closed(client: &mut SpiClient<'_>) -> bool {
    if let Some(known) = CACHE.with(|cache| cache.borrow().all_closed) {
        return known;
    }
    if CACHE.with(|cache| cache.borrow().table.is_none()) {
        let oid: Option<i64> = first(run(client, &HEALTH_TABLE, &[]));
        let table = oid
            .and_then(|oid| u32::try_from(oid).ok())
            .map(pg_sys::Oid::from)
            .unwrap_or_else(|| crate::errors::raise_internal("pay.event_type_health has no oid"));
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if !cache.callback_registered {
                // SAFETY: registers a callback that only touches this backend's own cache.
                unsafe {
                    pg_sys::CacheRegisterRelcacheCallback(
                        Some(forget_breakers),
                        pg_sys::Datum::from(0),
                    )
                };
                cache.callback_registered = true;
            }
            cache.table = Some(table);
        });
    }
    let generation = CACHE.with(|cache| cache.borrow().generation);
    // No answer counts as "something is open": the per-type lookup then decides.
    let all_closed = first::<bool>(run(client, &ANY_NOT_CLOSED, &[])) == Some(false);
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        // A change seen while reading, or a read under the transaction's snapshot (which may
        // predate a change already processed): used for this event, not kept.
        if cache.generation == generation && !uses_transaction_snapshot() {
            cache.all_closed = Some(all_closed);
        }
    });
    all_closed
}

/// `pay._event_type_health_changed()`: the statement trigger on `pay.event_type_health`. Queues
/// the relcache invalidation that makes every backend (this one included) drop its copy of
/// "no breaker is open".
#[pg_trigger]
fn _event_type_health_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let relid = trigger.relation()?.oid();
    // SAFETY: queues an invalidation message for a relation that exists (the trigger's own).
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    Ok(None)
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
    if all_closed(client) {
        return Admission::Closed;
    }
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
