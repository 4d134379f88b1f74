//! Running one piece of work in its own subtransaction and catching whatever it raises, the way
//! plpgsql's `BEGIN ... EXCEPTION WHEN OTHERS` does (`exec_stmt_block` in pl_exec.c): on an
//! error the subtransaction's writes, locks, snapshots and SPI state are rolled back and the
//! enclosing transaction goes on. The only `unsafe` of the quarantine lives here.

use std::panic::AssertUnwindSafe;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;

/// An error caught from the work: its SQLSTATE (five characters) and message.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: PgSqlErrorCode,
    pub sqlstate: String,
    pub message: String,
}

impl Failure {
    fn from_caught(caught: CaughtError) -> Failure {
        let (report, panicked) = match &caught {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => (r, false),
            CaughtError::RustPanic { ereport, .. } => (ereport, true),
        };
        let sqlstate = if panicked {
            "XX000".to_owned()
        } else {
            sqlstate_text(report.sql_error_code() as isize)
        };
        Failure {
            code: if panicked {
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
            } else {
                report.sql_error_code()
            },
            sqlstate,
            message: report.message().chars().take(2000).collect(),
        }
    }
}

impl Failure {
    /// Raises the caught error again, with its SQLSTATE and message.
    pub fn raise(&self) -> ! {
        ErrorReport::new(self.code, self.message.clone(), "pgpay").report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// The five characters of a SQLSTATE packed by PostgreSQL's MAKE_SQLSTATE (six bits each).
fn sqlstate_text(code: isize) -> String {
    (0..5)
        .map(|i| char::from(((code >> (6 * i)) & 0x3F) as u8 + b'0'))
        .collect()
}

/// Runs `work` in a new subtransaction. `Ok` with its result after releasing (committing into
/// the enclosing transaction) the subtransaction; `Err` with the error after rolling it back.
///
/// Errors are caught whatever their SQLSTATE: the caller decides which ones to raise again
/// (`pgpay_core::failure::is_infrastructure`). FATAL and PANIC never get here (they end the
/// backend), and a query cancel or shutdown arrives as a 57xxx error the caller raises again.
pub fn in_subtransaction<T>(work: impl FnOnce() -> T) -> Result<T, Failure> {
    tentatively(|| (work(), true))
}

/// As [`in_subtransaction`], but `work` also says whether to keep what it did: when it answers
/// `false`, the subtransaction is rolled back and its result returned all the same.
pub fn tentatively<T>(work: impl FnOnce() -> (T, bool)) -> Result<T, Failure> {
    // SAFETY: we are in a transaction (inside a function call), on the backend's one thread.
    // As plpgsql does, the memory context and resource owner of the caller are saved before
    // BeginInternalSubTransaction (which switches both to the subtransaction's) and restored
    // after it, and again after the subtransaction ends either way, so the caller's
    // allocations (and its SPI connection, opened outside) live on unchanged. SPI tuple tables
    // created inside are freed by Rust's drops while unwinding, before the rollback; anything
    // PostgreSQL allocated for the subtransaction is released by the rollback itself
    // (AtEOSubXact_SPI, resource owners, snapshots, locks). pgrx has already copied and
    // flushed the error state (pg_guard_ffi_boundary) when the catch handler runs.
    let (context, owner) = unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::CurrentMemoryContext = context;
        (context, owner)
    };
    let result = PgTryBuilder::new(AssertUnwindSafe(|| Ok(work())))
        .catch_others(|e| Err(Failure::from_caught(e)))
        .catch_rust_panic(|e| Err(Failure::from_caught(e)))
        .execute();
    // SAFETY: the subtransaction begun above is the current one: `work` either returned (every
    // subtransaction it may have opened through SPI or plpgsql is closed) or raised (its
    // own subtransactions were rolled back by whoever caught inside, or are rolled back with
    // ours, as PostgreSQL's RollbackAndReleaseCurrentSubTransaction aborts the innermost).
    unsafe {
        match result {
            Ok((_, true)) => pg_sys::ReleaseCurrentSubTransaction(),
            Ok((_, false)) | Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::CurrentMemoryContext = context;
        pg_sys::CurrentResourceOwner = owner;
    }
    result.map(|(value, _)| value)
}
