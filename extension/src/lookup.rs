//! The one lookup of "the payment this Stripe object speaks of": by its PaymentIntent id,
//! else by the payment id our metadata claims (a PaymentIntent whose create answer was lost).
//! Webhooks use it with a row lock; reconciliation calls it from SQL as `pay._payment_for`.
//! Which field names the PaymentIntent, per object kind, is `pgpay_core::object`.

use pgpay_core::billing::{subscription_ref, SubscriptionRef};
use pgpay_core::object::{claimed_payment_id, payment_ref};
use pgrx::pg_sys::BuiltinOid::{TEXTOID, UUIDOID};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;
use serde_json::Value;

use crate::apply_intent::{locked_payment_columns, LockedPayment};
use crate::plans::{first, run, Statement};

static LOCK_BY_INTENT: Statement = Statement {
    sql: concat!(
        locked_payment_columns!(),
        "WHERE p.stripe_payment_intent_id = $1 FOR NO KEY UPDATE"
    ),
    args: &[TEXTOID],
};
static ID_BY_INTENT: Statement = Statement {
    sql: "SELECT p.id FROM pay.payments p WHERE p.stripe_payment_intent_id = $1",
    args: &[TEXTOID],
};
static ID_BY_ID: Statement = Statement {
    sql: "SELECT p.id FROM pay.payments p WHERE p.id = $1",
    args: &[UUIDOID],
};

/// The lookup itself: `by_intent` first, then `by_id` with the claimed id.
fn find<T>(
    client: &mut SpiClient<'_>,
    intent_id: Option<&str>,
    claimed: Option<Uuid>,
    by_intent: impl FnOnce(&mut SpiClient<'_>, &str) -> Option<T>,
    by_id: impl FnOnce(&mut SpiClient<'_>, Uuid) -> Option<T>,
) -> Option<T> {
    if let Some(found) = intent_id.and_then(|intent| by_intent(client, intent)) {
        return Some(found);
    }
    by_id(client, claimed?)
}

/// The payment `object` speaks of, locked for this transaction; `None` when it is not ours.
pub fn lock_payment_for(client: &mut SpiClient<'_>, object: &Value) -> Option<LockedPayment> {
    let r = payment_ref(object)?;
    find(
        client,
        r.intent_id.as_deref(),
        r.claimed.map(Uuid::from_bytes),
        |c, intent| LockedPayment::read(run(c, &LOCK_BY_INTENT, &[intent.into()])),
        LockedPayment::lock,
    )
}

/// `pay._payment_for(intent_id, claimed)`: the payment a Stripe object speaks of, given its
/// PaymentIntent id and our metadata's `pgpay_payment_id` (either may be NULL), without a
/// lock; NULL when it is not ours.
#[pg_extern(stable, name = "_payment_for")]
fn payment_for(intent_id: Option<&str>, claimed: Option<&str>) -> Option<Uuid> {
    let claimed = claimed.and_then(claimed_payment_id).map(Uuid::from_bytes);
    Spi::connect_mut(|client| {
        find(
            client,
            intent_id,
            claimed,
            |c, intent| first(run(c, &ID_BY_INTENT, &[intent.into()])),
            |c, id| first(run(c, &ID_BY_ID, &[id.into()])),
        )
    })
}

/// `pay._claimed_payment_id(claimed)`: our metadata's payment id when it is a well-formed
/// UUID, else NULL (never a cast error).
#[pg_extern(immutable, strict, parallel_safe, name = "_claimed_payment_id")]
fn claimed_payment_uuid(claimed: &str) -> Option<Uuid> {
    claimed_payment_id(claimed).map(Uuid::from_bytes)
}

// Subscriptions are not tied to a PaymentIntent: their own lookup, by Stripe's subscription id,
// else by the Checkout Session that made it, else by the subscription id our metadata claims
// (an event that arrives before the one that links the Stripe ids).
static LOCK_SUBSCRIPTION_BY_STRIPE_ID: Statement = Statement {
    sql:
        "SELECT s.id FROM pay.subscriptions s WHERE s.stripe_subscription_id = $1 FOR NO KEY UPDATE",
    args: &[TEXTOID],
};
static LOCK_SUBSCRIPTION_BY_SESSION: Statement = Statement {
    sql: "SELECT s.id FROM pay.subscriptions s WHERE s.stripe_checkout_session_id = $1 FOR NO KEY UPDATE",
    args: &[TEXTOID],
};
static LOCK_SUBSCRIPTION_BY_ID: Statement = Statement {
    sql: "SELECT s.id FROM pay.subscriptions s WHERE s.id = $1 FOR NO KEY UPDATE",
    args: &[UUIDOID],
};
static SUBSCRIPTION_BY_STRIPE_ID: Statement = Statement {
    sql: "SELECT s.id FROM pay.subscriptions s WHERE s.stripe_subscription_id = $1",
    args: &[TEXTOID],
};
static SUBSCRIPTION_BY_SESSION: Statement = Statement {
    sql: "SELECT s.id FROM pay.subscriptions s WHERE s.stripe_checkout_session_id = $1",
    args: &[TEXTOID],
};
static SUBSCRIPTION_BY_ID: Statement = Statement {
    sql: "SELECT s.id FROM pay.subscriptions s WHERE s.id = $1",
    args: &[UUIDOID],
};

/// The subscription lookup itself, with the three statements to use (locking or not).
fn find_subscription(
    client: &mut SpiClient<'_>,
    r: &SubscriptionRef,
    [by_stripe_id, by_session, by_id]: [&'static Statement; 3],
) -> Option<Uuid> {
    if let Some(found) = r
        .subscription
        .as_deref()
        .and_then(|id| first(run(client, by_stripe_id, &[id.into()])))
    {
        return Some(found);
    }
    if let Some(found) = r
        .session
        .as_deref()
        .and_then(|id| first(run(client, by_session, &[id.into()])))
    {
        return Some(found);
    }
    let claimed = Uuid::from_bytes(r.claimed?);
    first(run(client, by_id, &[claimed.into()]))
}

/// The subscription a billing object speaks of, locked for this transaction; `None` when it
/// is not ours.
pub fn lock_subscription_for(client: &mut SpiClient<'_>, r: &SubscriptionRef) -> Option<Uuid> {
    find_subscription(
        client,
        r,
        [
            &LOCK_SUBSCRIPTION_BY_STRIPE_ID,
            &LOCK_SUBSCRIPTION_BY_SESSION,
            &LOCK_SUBSCRIPTION_BY_ID,
        ],
    )
}

/// `pay._subscription_for(object)`: the subscription a billing object (its jsonb's text)
/// speaks of, without a lock; NULL when it is not ours (or not a readable billing object).
#[pg_extern(stable, strict, name = "_subscription_for")]
fn subscription_for(object: &str) -> Option<Uuid> {
    let object: Value = serde_json::from_str(object).ok()?;
    let r = subscription_ref(&object)?;
    Spi::connect_mut(|client| {
        find_subscription(
            client,
            &r,
            [
                &SUBSCRIPTION_BY_STRIPE_ID,
                &SUBSCRIPTION_BY_SESSION,
                &SUBSCRIPTION_BY_ID,
            ],
        )
    })
}

static SUBSCRIPTIONS_INSTALLED: Statement = Statement {
    sql: "SELECT to_regclass('pay.subscriptions') IS NOT NULL",
    args: &[],
};

thread_local! {
    /// Once seen, the subscriptions' tables stay (a downgrade is not possible).
    static SUBSCRIPTIONS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this database's schema has subscriptions (0.2.0 with issue 14). Between installing a
/// new library and `ALTER EXTENSION pgpay UPDATE`, a 0.1.0 schema stores billing events as it
/// always did (not about a payment) instead of failing on a missing table. Asked only for
/// billing objects, and once per backend after it is true.
pub fn subscriptions_installed(client: &mut SpiClient<'_>) -> bool {
    if SUBSCRIPTIONS.get() {
        return true;
    }
    let yes = first::<bool>(run(client, &SUBSCRIPTIONS_INSTALLED, &[])) == Some(true);
    SUBSCRIPTIONS.set(yes);
    yes
}
