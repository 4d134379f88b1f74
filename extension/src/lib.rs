//! pgpay: exactly-once Stripe payments enforced inside PostgreSQL.
//!
//! The `#[pg_extern]` functions here are thin: the logic lives in `pgpay-core`, and what reads
//! best as SQL (tables, constraints, plpgsql glue, grants) lives in `sql/`.

use pgrx::prelude::*;

mod apply_intent;
mod apply_session;
mod breaker;
mod checkout;
mod errors;
mod keys;
mod lookup;
mod plans;
mod replay;
mod secrets;
mod signature;
mod stats;
mod subscription;
mod subxact;
mod text_bytes;
mod webhook;

::pgrx::pg_module_magic!(name, version);

// The schema, in dependency order. Functions written in Rust are named where SQL needs them.
extension_sql_file!("../../sql/01_schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../../sql/02_audit.sql",
    name = "audit",
    requires = ["schema"]
);
extension_sql_file!(
    "../../sql/03_outbox.sql",
    name = "outbox",
    requires = ["audit"]
);
extension_sql_file!(
    "../../sql/04_evidence.sql",
    name = "evidence",
    requires = ["outbox"]
);
extension_sql_file!(
    "../../sql/05_checkout.sql",
    name = "checkout",
    requires = [
        "evidence",
        keys::idempotency_key_of_text,
        checkout::checkout_validate,
        checkout::checkout_validate_mode
    ]
);
extension_sql_file!(
    "../../sql/06_webhooks.sql",
    name = "webhooks",
    requires = ["checkout", secrets::_webhook_secrets_changed]
);
extension_sql_file!(
    "../../sql/07_fulfillment.sql",
    name = "fulfillment",
    requires = ["webhooks"]
);
extension_sql_file!(
    "../../sql/08_views.sql",
    name = "views",
    requires = ["fulfillment"]
);
extension_sql_file!(
    "../../sql/10_reconciliation.sql",
    name = "reconciliation",
    requires = ["views"]
);
extension_sql_file!(
    "../../sql/12_subscriptions.sql",
    name = "subscriptions",
    requires = [
        "reconciliation",
        subscription::subscription_validate,
        subscription::billing_facts_sql,
        subscription::subscription_decide,
        subscription::invoice_decide,
        lookup::subscription_for
    ]
);
extension_sql_file!(
    "../../sql/13_subscription_evidence.sql",
    name = "subscription_evidence",
    requires = ["subscriptions"]
);
extension_sql_file!(
    "../../sql/14_invoice_fulfillments.sql",
    name = "invoice_fulfillments",
    requires = ["subscription_evidence"]
);
extension_sql_file!(
    "../../sql/98_backups.sql",
    name = "backups",
    requires = ["invoice_fulfillments"]
);
extension_sql_file!(
    "../../sql/11_safety.sql",
    name = "safety",
    requires = [
        "backups",
        stats::poisson_upper_tail,
        stats::binomial_upper_tail,
        breaker::_event_type_health_changed
    ]
);
extension_sql_file!("../../sql/99_roles.sql", name = "roles", finalize);
