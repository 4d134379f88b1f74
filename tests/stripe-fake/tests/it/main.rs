//! Integration tests over real HTTP on 127.0.0.1: one binary, one module per concern.

mod binary;
mod checkout;
mod checkout_customer;
mod checkout_shapes;
mod control;
mod helpers;
mod idempotency;
mod lifecycle;
mod pagination;
mod search;
mod subscriptions;
mod webhooks;
