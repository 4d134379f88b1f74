//! Statements the Rust hot paths run through SPI, each prepared once per backend and kept
//! (`SPI_keepplan`): PostgreSQL's plan cache revalidates them when the schema changes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{PgBuiltInOids, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};

/// A statement and the types of its parameters. Every SQL text names its tables with the schema,
/// so a plan never depends on the caller's search_path.
pub struct Statement {
    pub sql: &'static str,
    pub args: &'static [PgBuiltInOids],
}

thread_local! {
    static KEPT: RefCell<HashMap<usize, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs `statement` with `args` on `client`, preparing it on first use in this backend.
pub fn run<'conn>(
    client: &mut SpiClient<'conn>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> SpiTupleTable<'conn> {
    let key = statement as *const Statement as usize;
    let kept = KEPT.with(|kept| kept.borrow().get(&key).cloned());
    let plan = match kept {
        Some(plan) => plan,
        None => {
            let types: Vec<PgOid> = statement.args.iter().map(|&t| PgOid::BuiltIn(t)).collect();
            let plan = Rc::new(
                client
                    .prepare_mut(statement.sql, &types)
                    .unwrap_or_else(|e| spi_failed(statement, e))
                    .keep(),
            );
            KEPT.with(|kept| kept.borrow_mut().insert(key, plan.clone()));
            plan
        }
    };
    client
        .update(&*plan, None, args)
        .unwrap_or_else(|e| spi_failed(statement, e))
}

/// The first column of the first row, or `None` when there is no row or the value is NULL.
pub fn first<T: FromDatum + IntoDatum>(table: SpiTupleTable<'_>) -> Option<T> {
    if table.is_empty() {
        return None;
    }
    table
        .first()
        .get::<T>(1)
        .unwrap_or_else(|e| crate::errors::raise_internal(format!("reading a result: {e}")))
}

fn spi_failed(statement: &Statement, error: pgrx::spi::SpiError) -> ! {
    crate::errors::raise_internal(format!("statement failed ({error}): {}", statement.sql))
}
