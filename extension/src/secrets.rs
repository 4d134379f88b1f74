//! The webhook secrets, kept in backend memory between deliveries so that a webhook does not read
//! the table every time (one statement of the few a delivery runs).
//!
//! Kept correct the way PostgreSQL keeps its own caches: every change to `pay.webhook_secrets`
//! (the statement trigger `webhook_secrets_changed`) queues a relcache invalidation for the table,
//! which every backend processes before its next transaction (and this one at its next command,
//! or at its rollback), and the callback registered here drops the copy. A revoked secret stops
//! verifying as soon as the revocation commits; expiry is checked against the transaction's time
//! on every use, as `now()` would be.
//!
//! Only a read under a statement snapshot is kept. Under REPEATABLE READ or SERIALIZABLE the read
//! sees the transaction's snapshot, which may be older than an invalidation this backend has
//! already processed: such a copy would miss a revocation and, with no further invalidation to
//! come, be kept for good (issue #9). That read is used for its transaction and not kept.

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::plans::{first, run, Statement};

static UNREVOKED_SECRETS: Statement = Statement {
    sql: "SELECT s.secret, (extract(epoch FROM s.expires_at) * 1000000)::bigint \
          FROM pay.webhook_secrets s WHERE s.revoked_at IS NULL ORDER BY s.id DESC",
    args: &[],
};
static SECRETS_TABLE: Statement = Statement {
    sql: "SELECT 'pay.webhook_secrets'::regclass::oid::bigint",
    args: &[],
};

struct Secret {
    value: String,
    /// Unix microseconds.
    expires_at: Option<i64>,
}

#[derive(Default)]
struct Cache {
    callback_registered: bool,
    table: Option<pg_sys::Oid>,
    secrets: Option<Vec<Secret>>,
    /// Counts invalidations, so that a read overtaken by one is used once and not kept.
    generation: u64,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_secrets(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        // InvalidOid: the whole relcache was reset (the invalidation queue overflowed).
        if relid == pg_sys::InvalidOid || cache.table == Some(relid) {
            cache.secrets = None;
            // Looked up again: a dropped and re-created extension has a new table.
            cache.table = None;
            cache.generation += 1;
        }
    });
}

/// Unix microseconds of the current transaction's start (what `now()` returns).
fn transaction_now() -> i64 {
    const POSTGRES_EPOCH_IN_UNIX_MICROS: i64 = 946_684_800_000_000;
    // SAFETY: reads the start time of the transaction we are in.
    let since_postgres_epoch = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    since_postgres_epoch + POSTGRES_EPOCH_IN_UNIX_MICROS
}

/// The secrets that are live now (not revoked, not expired), newest first; empty when none is.
pub fn live_secrets(client: &mut SpiClient<'_>) -> Vec<String> {
    let (cached, known_table) = CACHE.with(|cache| {
        let cache = cache.borrow();
        (cache.secrets.is_some(), cache.table.is_some())
    });
    if !cached {
        if !known_table {
            let oid: Option<i64> = first(run(client, &SECRETS_TABLE, &[]));
            let table = oid
                .and_then(|oid| u32::try_from(oid).ok())
                .map(pg_sys::Oid::from)
                .unwrap_or_else(|| crate::errors::raise_internal("pay.webhook_secrets has no oid"));
            CACHE.with(|cache| {
                let mut cache = cache.borrow_mut();
                if !cache.callback_registered {
                    // SAFETY: registers a callback that only touches this backend's own cache.
                    unsafe {
                        pg_sys::CacheRegisterRelcacheCallback(
                            Some(forget_secrets),
                            pg_sys::Datum::from(0),
                        )
                    };
                    cache.callback_registered = true;
                }
                cache.table = Some(table);
            });
        }
        let generation = CACHE.with(|cache| cache.borrow().generation);
        let mut secrets = Vec::new();
        for row in run(client, &UNREVOKED_SECRETS, &[]) {
            let (Ok(Some(value)), Ok(expires_at)) = (row.get::<String>(1), row.get::<i64>(2))
            else {
                crate::errors::raise_internal("reading pay.webhook_secrets");
            };
            secrets.push(Secret { value, expires_at });
        }
        let overtaken = CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.generation == generation && !uses_transaction_snapshot() {
                cache.secrets = Some(secrets);
                None
            } else {
                Some(secrets)
            }
        });
        if let Some(secrets) = overtaken {
            // A change was seen while reading, or the read may predate one: use it, keep nothing.
            return live(&secrets);
        }
    }
    CACHE.with(|cache| live(cache.borrow().secrets.as_deref().unwrap_or_default()))
}

/// Whether statements see the transaction's snapshot (REPEATABLE READ and SERIALIZABLE), taken
/// when it began, rather than a new one each (READ COMMITTED).
pub(crate) fn uses_transaction_snapshot() -> bool {
    // SAFETY: reads the backend's current isolation level, set for the running transaction.
    let level = unsafe { pg_sys::XactIsoLevel };
    level >= pg_sys::XACT_REPEATABLE_READ as i32
}

fn live(secrets: &[Secret]) -> Vec<String> {
    let now = transaction_now();
    secrets
        .iter()
        .filter(|s| s.expires_at.is_none_or(|at| at > now))
        .map(|s| s.value.clone())
        .collect()
}

/// `pay._webhook_secrets_changed()`: the statement trigger on `pay.webhook_secrets`. Queues the
/// relcache invalidation that makes every backend (this one included) drop its copy.
#[pg_trigger]
fn _webhook_secrets_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let relid = trigger.relation()?.oid();
    // SAFETY: queues an invalidation message for a relation that exists (the trigger's own).
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    Ok(None)
}
