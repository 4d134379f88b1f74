//! The outbox job: claim commands (`pay.claim_outbox`), send each to Stripe with its stored
//! Idempotency-Key, and write the answer back through the fenced outbox functions
//! (docs/outbox-contract.md).
//!
//! - [`listener`]: the LISTEN doorbell connection;
//! - [`dispatcher`]: the main loop (claims, one task per command, shutdown);
//! - [`attempt`]: one command from its row to its write-back;
//! - [`command`]: an outbox row's `request` read as a Stripe request;
//! - [`write_back`]: the fenced write-backs and the release of unsent commands;
//! - [`sql`]: the outbox functions those call.

mod attempt;
mod command;
mod dispatcher;
mod listener;
mod sql;
mod write_back;

pub use command::{parse_request, MalformedCommand};
pub(crate) use dispatcher::Dispatcher;
