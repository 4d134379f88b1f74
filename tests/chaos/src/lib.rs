//! The chaos harness's library: the recorded [`history::History`] of a run and the
//! [`checker`] that decides from it whether any of pgpay's guarantees was broken. The harness
//! itself (`src/bin/chaos`) only produces histories; everything that judges one lives here, so it
//! can be tested on histories with planted violations.
#![forbid(unsafe_code)]

pub mod checker;
pub mod history;
