//! Integration tests over real HTTP on 127.0.0.1: one binary, one module per concern.

mod binary;
mod control;
mod helpers;
mod idempotency;
mod lifecycle;
mod pagination;
mod search;
mod webhooks;
