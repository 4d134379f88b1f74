//! Pure logic of pgpay, free of pgrx so that it can be unit- and property-tested with plain
//! `cargo test` and shared by the extension, the worker and stripe-fake.
#![forbid(unsafe_code)]

pub mod billing;
pub mod canonical_json;
pub mod checkout;
pub mod event;
pub mod failure;
pub mod idempotency;
pub mod object;
pub mod outcome;
pub mod session;
pub mod signature;
pub mod stats;
pub mod subscribe;
pub mod subscription;
pub mod transition;
