//! Decides from a [`History`] whether each of pgpay's guarantees held: one [`Verdict`] per
//! guarantee, with how many things were checked, how many broke it, and the first counterexample.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use pgpay_core::transition::{decide, Decision, PaymentStatus};

use crate::history::{History, Payment};

/// The outcome of one guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub name: &'static str,
    /// What was checked, e.g. `120 orders`.
    pub checked: String,
    pub violations: usize,
    pub first: Option<String>,
    /// A note that is not a violation (a check this version cannot make).
    pub note: Option<String>,
}

impl Verdict {
    fn new(name: &'static str) -> Verdict {
        Verdict {
            name,
            checked: String::new(),
            violations: 0,
            first: None,
            note: None,
        }
    }

    fn violation(&mut self, what: impl FnOnce() -> String) {
        self.violations += 1;
        if self.first.is_none() {
            self.first = Some(what());
        }
    }

    pub fn ok(&self) -> bool {
        self.violations == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok() { "ok  " } else { "FAIL" };
        write!(
            f,
            "{mark} {}: {}, {} violation{}",
            self.name,
            self.checked,
            self.violations,
            if self.violations == 1 { "" } else { "s" }
        )?;
        if let Some(first) = &self.first {
            write!(f, "; first: {first}")?;
        }
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Every guarantee, in a fixed order.
pub fn check(history: &History) -> Vec<Verdict> {
    let index = Index::new(history);
    vec![
        one_kept_charge_per_order(history, &index),
        one_create_per_attempt(history, &index),
        delivered_events_stored_once(history),
        fulfilled_exactly_once(history),
        refunds_within_received(history, &index),
        status_equals_stripe(history, &index),
        audit_follows_the_rule(history),
        nothing_stuck(history),
    ]
}

/// Lookups shared by several checks.
struct Index<'h> {
    /// Stripe's refunds per PaymentIntent: (count, amount).
    refunded_at_stripe: HashMap<&'h str, i64>,
    /// PaymentIntents at Stripe by `metadata.pgpay_payment_id`.
    intents_by_payment: HashMap<&'h str, Vec<&'h stripe_fake::PaymentIntentSummary>>,
    /// Checkout Sessions at Stripe by `metadata.pgpay_payment_id`, and by id.
    sessions_by_payment: HashMap<&'h str, Vec<&'h stripe_fake::CheckoutSessionSummary>>,
    sessions: HashMap<&'h str, &'h stripe_fake::CheckoutSessionSummary>,
    intents: HashMap<&'h str, &'h stripe_fake::PaymentIntentSummary>,
    payments: HashMap<&'h str, &'h Payment>,
}

impl<'h> Index<'h> {
    fn new(history: &'h History) -> Index<'h> {
        let mut refunded_at_stripe: HashMap<&str, i64> = HashMap::new();
        for refund in &history.ledger.refunds.list {
            *refunded_at_stripe
                .entry(refund.payment_intent.as_str())
                .or_default() += refund.amount;
        }
        let mut intents_by_payment: HashMap<&str, Vec<_>> = HashMap::new();
        for pi in &history.ledger.payment_intents.list {
            if let Some(payment) = pi.metadata.get("pgpay_payment_id") {
                intents_by_payment
                    .entry(payment.as_str())
                    .or_default()
                    .push(pi);
            }
        }
        let mut sessions_by_payment: HashMap<&str, Vec<_>> = HashMap::new();
        for session in &history.ledger.checkout_sessions.list {
            if let Some(payment) = session.metadata.get("pgpay_payment_id") {
                sessions_by_payment
                    .entry(payment.as_str())
                    .or_default()
                    .push(session);
            }
        }
        let sessions = history
            .ledger
            .checkout_sessions
            .list
            .iter()
            .map(|s| (s.id.as_str(), s))
            .collect();
        let intents = history
            .ledger
            .payment_intents
            .list
            .iter()
            .map(|pi| (pi.id.as_str(), pi))
            .collect();
        let payments = history
            .db
            .payments
            .iter()
            .map(|p| (p.id.as_str(), p))
            .collect();
        Index {
            refunded_at_stripe,
            intents_by_payment,
            sessions_by_payment,
            sessions,
            intents,
            payments,
        }
    }

    /// What Stripe says of a session-mode payment, as pgpay's rule reads a Checkout Session
    /// (`pgpay_core::session::session_status`): open waits for the customer, expired ends the
    /// attempt, complete is paid (succeeded), a delayed payment on its way (processing), or one
    /// that failed (canceled: its PaymentIntent is no longer processing).
    fn session_status(&self, session: &stripe_fake::CheckoutSessionSummary) -> &'static str {
        match (session.status.as_str(), session.payment_status.as_str()) {
            ("open", _) => "requires_payment_method",
            ("expired", _) => "canceled",
            ("complete", "paid" | "no_payment_required") => "succeeded",
            ("complete", _) => {
                let processing = session
                    .payment_intent
                    .as_deref()
                    .and_then(|pi| self.intents.get(pi))
                    .is_some_and(|pi| pi.status == "processing");
                if processing {
                    "processing"
                } else {
                    "canceled"
                }
            }
            _ => "unknown",
        }
    }

    fn refunded(&self, intent: &str) -> i64 {
        self.refunded_at_stripe.get(intent).copied().unwrap_or(0)
    }
}

/// Every order has at most one kept charge at Stripe: a second paid attempt was refunded in
/// full. Also: every order in the database is one the application asked for.
fn one_kept_charge_per_order(history: &History, index: &Index) -> Verdict {
    let mut v = Verdict::new("at most one kept charge per order");
    let mut kept: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for pi in &history.ledger.payment_intents.list {
        let Some(order) = pi.metadata.get("order_ref") else {
            continue;
        };
        let entry = kept.entry(order.as_str()).or_default();
        if pi.status == "succeeded" && pi.amount_received - index.refunded(&pi.id) > 0 {
            entry.push(&pi.id);
        }
    }
    for (order, intents) in &kept {
        if intents.len() > 1 {
            v.violation(|| format!("order {order} keeps {} charges: {intents:?}", intents.len()));
        }
    }
    let asked: HashSet<&str> = history.app.orders.iter().map(String::as_str).collect();
    for payment in &history.db.payments {
        if !asked.contains(payment.order_ref.as_str()) {
            v.violation(|| {
                format!(
                    "payment {} is for order {}, which the application never asked for",
                    payment.id, payment.order_ref
                )
            });
        }
    }
    v.checked = format!(
        "{} orders at Stripe, {} payments",
        kept.len(),
        history.db.payments.len()
    );
    v
}

/// Every create reached Stripe under the one key its command holds; no attempt has two
/// PaymentIntents or two Checkout Sessions; no PaymentIntent or session of ours belongs to no
/// payment; no key was ever sent with other parameters. In session mode Stripe makes the
/// PaymentIntent when the customer pays: it must be the session's, and the payment's session the
/// one Stripe holds for it.
fn one_create_per_attempt(history: &History, index: &Index) -> Verdict {
    let mut v = Verdict::new(
        "one PaymentIntent or Checkout Session per attempt, created under its one key",
    );
    let create_key: HashMap<&str, &str> = history
        .db
        .outbox
        .iter()
        .filter(|c| c.kind == "create_payment_intent")
        .map(|c| (c.payment_id.as_str(), c.idempotency_key.as_str()))
        .collect();
    let created_with: HashMap<&str, Option<&str>> = history
        .ledger
        .events
        .list
        .iter()
        .filter(|e| e.kind == "payment_intent.created")
        .filter_map(|e| Some((e.object_id.as_deref()?, e.idempotency_key.as_deref())))
        .collect();
    for payment in &history.db.payments {
        let intents = index
            .intents_by_payment
            .get(payment.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if intents.len() > 1 {
            let ids: Vec<&str> = intents.iter().map(|pi| pi.id.as_str()).collect();
            v.violation(|| {
                format!(
                    "payment {} has {} PaymentIntents: {ids:?}",
                    payment.id,
                    ids.len()
                )
            });
        }
        if payment.mode == "session" {
            session_created_once(&mut v, payment, intents, index);
            continue;
        }
        for pi in intents {
            let expected = create_key.get(payment.id.as_str()).copied();
            let used = created_with.get(pi.id.as_str()).copied().flatten();
            if expected.is_none() || used != expected {
                v.violation(|| {
                    format!(
                        "{} of payment {} was created under key {:?}, its create command holds {:?}",
                        pi.id, payment.id, used, expected
                    )
                });
            }
        }
    }
    for (payment, intents) in &index.intents_by_payment {
        if !index.payments.contains_key(payment) {
            v.violation(|| {
                format!(
                    "{} names payment {payment}, which the database does not have",
                    intents[0].id
                )
            });
        }
    }
    for (payment, sessions) in &index.sessions_by_payment {
        if !index.payments.contains_key(payment) {
            v.violation(|| {
                format!(
                    "{} names payment {payment}, which the database does not have",
                    sessions[0].id
                )
            });
        }
    }
    let conflicts = history.ledger.idempotency.conflicts;
    if conflicts > 0 {
        v.violation(|| format!("{conflicts} requests reused a key with other parameters"));
    }
    v.checked = format!(
        "{} payments, {} PaymentIntents, {} Checkout Sessions",
        history.db.payments.len(),
        history.ledger.payment_intents.list.len(),
        history.ledger.checkout_sessions.list.len()
    );
    v
}

/// A session-mode payment: at most one Checkout Session at Stripe, the one the payment records,
/// and its PaymentIntent (if the customer got that far) the session's own.
fn session_created_once(
    v: &mut Verdict,
    payment: &Payment,
    intents: &[&stripe_fake::PaymentIntentSummary],
    index: &Index,
) {
    let sessions = index
        .sessions_by_payment
        .get(payment.id.as_str())
        .map(Vec::as_slice)
        .unwrap_or_default();
    if sessions.len() > 1 {
        let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
        v.violation(|| {
            format!(
                "payment {} has {} Checkout Sessions: {ids:?}",
                payment.id,
                ids.len()
            )
        });
    }
    if let Some(known) = payment.session.as_deref() {
        if !sessions.iter().any(|s| s.id == known) {
            v.violation(|| {
                format!(
                    "payment {} records Checkout Session {known}, which Stripe does not hold for it",
                    payment.id
                )
            });
        }
    }
    for pi in intents {
        let of_a_session = sessions
            .iter()
            .any(|s| s.payment_intent.as_deref() == Some(pi.id.as_str()));
        if !of_a_session {
            v.violation(|| {
                format!(
                    "{} names session-mode payment {} but is not its Checkout Session's",
                    pi.id, payment.id
                )
            });
        }
    }
}

/// Every event Stripe delivered with a 2xx answer is stored, once, as a webhook (not recovered
/// later by reconciliation).
fn delivered_events_stored_once(history: &History) -> Verdict {
    let mut v = Verdict::new("every event answered 2xx is stored exactly once");
    let mut stored: HashMap<&str, (usize, &str)> = HashMap::new();
    for event in &history.db.events {
        let entry = stored
            .entry(event.event_id.as_str())
            .or_insert((0, event.source.as_str()));
        entry.0 += 1;
    }
    let mut delivered = 0;
    for event in &history.ledger.events.list {
        if event.delivery.ok == 0 {
            continue;
        }
        delivered += 1;
        match stored.get(event.id.as_str()) {
            None => v.violation(|| {
                format!(
                    "{} ({}) was answered 2xx {} time(s) but is not stored",
                    event.id, event.kind, event.delivery.ok
                )
            }),
            Some((_, source)) if *source != "webhook" => v.violation(|| {
                format!(
                    "{} ({}) was answered 2xx but stored only by {source}: the delivery was lost",
                    event.id, event.kind
                )
            }),
            Some(_) => {}
        }
    }
    for (id, (n, _)) in &stored {
        if *n > 1 {
            v.violation(|| format!("{id} is stored {n} times"));
        }
    }
    let undelivered = history
        .ledger
        .events
        .list
        .iter()
        .filter(|e| e.delivery.ok == 0)
        .count();
    v.checked = format!(
        "{delivered} events delivered, {} stored, {undelivered} never delivered",
        history.db.events.len()
    );
    v
}

/// Every succeeded payment has exactly one completed fulfillment and was provisioned exactly once;
/// every other payment has neither.
fn fulfilled_exactly_once(history: &History) -> Verdict {
    let mut v = Verdict::new("one completed fulfillment per succeeded payment, none otherwise");
    let mut rows: HashMap<&str, Vec<&crate::history::Fulfillment>> = HashMap::new();
    for f in &history.db.fulfillments {
        rows.entry(f.payment_id.as_str()).or_default().push(f);
    }
    let mut provisioned: HashMap<&str, usize> = HashMap::new();
    for p in &history.db.provisions {
        *provisioned.entry(p.payment_id.as_str()).or_default() += 1;
    }
    let mut succeeded = 0;
    for payment in &history.db.payments {
        let fulfillments = rows
            .get(payment.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let provisions = provisioned.get(payment.id.as_str()).copied().unwrap_or(0);
        if payment.status == "succeeded" && payment.flagged_reason.is_none() {
            succeeded += 1;
            let completed = fulfillments.iter().filter(|f| f.completed).count();
            if fulfillments.len() != 1 || completed != 1 {
                v.violation(|| {
                    format!(
                        "succeeded payment {} has {} fulfillment rows, {completed} completed",
                        payment.id,
                        fulfillments.len()
                    )
                });
            }
            if provisions != 1 {
                v.violation(|| {
                    format!(
                        "succeeded payment {} was provisioned {provisions} times",
                        payment.id
                    )
                });
            }
        } else if !fulfillments.is_empty() || provisions > 0 {
            v.violation(|| {
                format!(
                    "payment {} is {}{} but has {} fulfillment rows and {provisions} provisions",
                    payment.id,
                    payment.status,
                    if payment.flagged_reason.is_some() {
                        " (flagged)"
                    } else {
                        ""
                    },
                    fulfillments.len()
                )
            });
        }
    }
    v.checked = format!(
        "{succeeded} succeeded of {} payments, {} provisions",
        history.db.payments.len(),
        history.db.provisions.len()
    );
    v
}

/// Refunds never exceed what was received (at Stripe and in the database), the database's refunds
/// are Stripe's, and each refund command refunded at most once (exactly once when it is done).
fn refunds_within_received(history: &History, index: &Index) -> Verdict {
    let mut v = Verdict::new("refunds within what was received, each refund command once");
    for pi in &history.ledger.payment_intents.list {
        let refunded = index.refunded(&pi.id);
        if refunded > pi.amount_received {
            v.violation(|| {
                format!(
                    "{} refunded {refunded} of {} received",
                    pi.id, pi.amount_received
                )
            });
        }
    }
    let mut stored_by_payment: HashMap<&str, i64> = HashMap::new();
    for refund in &history.db.refunds {
        *stored_by_payment
            .entry(refund.payment_id.as_str())
            .or_default() += refund.amount;
    }
    for payment in &history.db.payments {
        if payment.amount_refunded > payment.amount_received {
            v.violation(|| {
                format!(
                    "payment {} has {} refunded of {} received",
                    payment.id, payment.amount_refunded, payment.amount_received
                )
            });
        }
        let at_stripe = payment.intent.as_deref().map_or(0, |pi| index.refunded(pi));
        let stored = stored_by_payment
            .get(payment.id.as_str())
            .copied()
            .unwrap_or(0);
        if stored != at_stripe {
            v.violation(|| {
                format!(
                    "payment {} stores {stored} refunded, Stripe refunded {at_stripe} of {:?}",
                    payment.id, payment.intent
                )
            });
        }
    }
    let mut by_key: HashMap<&str, usize> = HashMap::new();
    for event in &history.ledger.events.list {
        if event.kind == "refund.created" {
            if let Some(key) = event.idempotency_key.as_deref() {
                *by_key.entry(key).or_default() += 1;
            }
        }
    }
    let mut commands = 0;
    for command in history.db.outbox.iter().filter(|c| c.kind == "refund") {
        commands += 1;
        let n = by_key
            .get(command.idempotency_key.as_str())
            .copied()
            .unwrap_or(0);
        let expected_ok = if command.status == "done" {
            n == 1
        } else {
            n == 0
        };
        if !expected_ok {
            v.violation(|| {
                format!(
                    "refund command {} ({}) made {n} refunds at Stripe",
                    command.id, command.status
                )
            });
        }
    }
    // A refund_ref is one refund: one command, which every call with it (the application's
    // retries) answered, and which made one refund at Stripe (the key check above).
    let mut by_ref: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    for command in history.db.outbox.iter().filter(|c| c.kind == "refund") {
        if let Some(r) = command.refund_ref.as_deref() {
            by_ref
                .entry((command.payment_id.as_str(), r))
                .or_default()
                .push(command.id);
        }
    }
    for ((payment, r), ids) in &by_ref {
        if ids.len() > 1 {
            v.violation(|| {
                format!(
                    "refund_ref {r} of payment {payment} has {} refund commands: {ids:?}",
                    ids.len()
                )
            });
        }
    }
    let mut calls_with_ref = 0;
    for asked in &history.app.refunds {
        let (Some(r), Some(id)) = (asked.refund_ref.as_deref(), asked.command_id) else {
            continue;
        };
        let commands = by_ref
            .get(&(asked.payment_id.as_str(), r))
            .map(Vec::as_slice)
            .unwrap_or_default();
        if commands != [id] {
            v.violation(|| {
                format!(
                    "pay.refund answered command {id} for refund_ref {r} of payment {}, the outbox holds {commands:?} for it",
                    asked.payment_id
                )
            });
        }
        calls_with_ref += 1;
    }
    let asked: HashSet<i64> = history
        .app
        .refunds
        .iter()
        .filter_map(|r| r.command_id)
        .collect();
    let known: HashSet<i64> = history.db.outbox.iter().map(|c| c.id).collect();
    for id in &asked {
        if !known.contains(id) {
            v.violation(|| {
                format!("pay.refund returned command {id}, which the outbox does not have")
            });
        }
    }
    v.checked = format!(
        "{} refunds at Stripe, {commands} refund commands ({} refund_refs, answered to {calls_with_ref} calls), {} asked by the application",
        history.ledger.refunds.list.len(),
        by_ref.len(),
        history.app.refunds.len()
    );
    v
}

/// After the final reconciliation every payment's status is Stripe's (superseded counts as
/// canceled, or as a double charge refunded in full), or an open finding says why not; a payment
/// without a PaymentIntent has none at Stripe either. A session-mode payment is held to its
/// Checkout Session (read as pgpay's rule reads it), and knows the session Stripe holds for it.
fn status_equals_stripe(history: &History, index: &Index) -> Verdict {
    let mut v = Verdict::new("after reconciliation every payment's status is Stripe's");
    let explained: HashSet<&str> = history
        .db
        .open_findings
        .iter()
        .filter_map(|f| f.payment_id.as_deref())
        .collect();
    let mut sessions = 0;
    for payment in &history.db.payments {
        if explained.contains(payment.id.as_str()) {
            continue;
        }
        // What Stripe says, and whether all the money it took was given back.
        let (object, stripe_status, refunded_in_full) = if payment.mode == "session" {
            sessions += 1;
            let Some(known) = payment.session.as_deref() else {
                if let Some(at_stripe) = index.sessions_by_payment.get(payment.id.as_str()) {
                    v.violation(|| {
                        format!(
                            "payment {} ({}) knows no Checkout Session, Stripe has {}",
                            payment.id, payment.status, at_stripe[0].id
                        )
                    });
                }
                continue;
            };
            let Some(session) = index.sessions.get(known) else {
                v.violation(|| {
                    format!(
                        "payment {} names {known}, which Stripe does not have",
                        payment.id
                    )
                });
                continue;
            };
            let refunded_in_full = session.payment_intent.as_deref().is_some_and(|pi| {
                index.refunded(pi) >= index.intents.get(pi).map_or(0, |pi| pi.amount_received)
            });
            (known, index.session_status(session), refunded_in_full)
        } else {
            let Some(intent) = payment.intent.as_deref() else {
                if let Some(pis) = index.intents_by_payment.get(payment.id.as_str()) {
                    v.violation(|| {
                        format!(
                            "payment {} ({}) knows no PaymentIntent, Stripe has {}",
                            payment.id, payment.status, pis[0].id
                        )
                    });
                }
                continue;
            };
            let Some(pi) = index.intents.get(intent) else {
                v.violation(|| {
                    format!(
                        "payment {} names {intent}, which Stripe does not have",
                        payment.id
                    )
                });
                continue;
            };
            (
                intent,
                pi.status.as_str(),
                index.refunded(&pi.id) >= pi.amount_received,
            )
        };
        let same = payment.status == stripe_status
            || (payment.status == "superseded"
                && (stripe_status == "canceled"
                    || (stripe_status == "succeeded" && refunded_in_full)));
        if !same {
            v.violation(|| {
                format!(
                    "payment {} is {}, Stripe's {object} is {stripe_status}",
                    payment.id, payment.status
                )
            });
        }
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for finding in &history.db.open_findings {
        *kinds.entry(finding.kind.as_str()).or_default() += 1;
    }
    v.checked = format!(
        "{} payments ({sessions} in session mode), {} explained by open findings {kinds:?}",
        history.db.payments.len(),
        explained.len()
    );
    v
}

/// Every audited change of status is one the transition rule allows: from nothing to `creating`,
/// pgpay's own moves (superseding a live attempt, canceling or failing one that never reached
/// Stripe), or Stripe evidence that `transition::decide` applies; evidence from events is applied in
/// the order Stripe created it. The audit chain verifies, when this version can say.
fn audit_follows_the_rule(history: &History) -> Verdict {
    let mut v = Verdict::new("every audited transition is allowed, in evidence order");
    let event_time: HashMap<&str, i64> = history
        .ledger
        .events
        .list
        .iter()
        .map(|e| (e.id.as_str(), e.created))
        .collect();
    let mut rows: Vec<&crate::history::AuditRow> = history.db.audit.iter().collect();
    rows.sort_by_key(|r| r.id);
    let mut newest_applied: HashMap<&str, i64> = HashMap::new();
    let mut transitions = 0;
    for row in rows {
        if row.from_status.as_deref() == Some(row.to_status.as_str()) {
            continue;
        }
        transitions += 1;
        let parse = |s: &str| s.parse::<PaymentStatus>().ok();
        let to = parse(&row.to_status);
        let from = row.from_status.as_deref().map(parse);
        let allowed = match (from, to) {
            (None, Some(PaymentStatus::Creating)) => true,
            (Some(Some(from)), Some(to)) => allowed(from, to),
            _ => false,
        };
        if !allowed {
            v.violation(|| {
                format!(
                    "audit row {} moves payment {} from {:?} to {} ({})",
                    row.id, row.payment_id, row.from_status, row.to_status, row.cause
                )
            });
            continue;
        }
        let evidence_at = row.evidence_id.as_deref().and_then(|e| event_time.get(e));
        if let (Some(&at), Some(to)) = (evidence_at, to) {
            let newest = newest_applied.entry(row.payment_id.as_str()).or_insert(at);
            if at < *newest && !to.is_terminal() {
                v.violation(|| {
                    format!(
                        "audit row {} applies {} of {} (created {at}) after evidence created {}",
                        row.id,
                        row.to_status,
                        row.evidence_id.as_deref().unwrap_or_default(),
                        *newest
                    )
                });
            }
            *newest = (*newest).max(at);
        }
    }
    match &history.db.audit_chain {
        None => v.note = Some("audit chain: pay.verify_audit_log() not in this version".into()),
        Some(chain) if !chain.ok => v.violation(|| {
            format!(
                "pay.verify_audit_log() fails: {}",
                chain.detail.as_deref().unwrap_or("no detail")
            )
        }),
        Some(_) => v.note = Some("audit chain verifies".into()),
    }
    v.checked = format!(
        "{transitions} transitions in {} audit rows",
        history.db.audit.len()
    );
    v
}

/// A change of status the rule allows. pgpay's own moves first, then Stripe evidence.
fn allowed(from: PaymentStatus, to: PaymentStatus) -> bool {
    use PaymentStatus::*;
    match (from, to) {
        (_, Superseded) => !from.is_terminal(),
        (Creating, Canceled | CreateFailed) => true,
        _ => matches!(decide(from, None, to, 0), Decision::Apply),
    }
}

/// Nothing is stuck after the drain: no command in flight without a live lease, no command still
/// open, no payment in `creating`.
fn nothing_stuck(history: &History) -> Verdict {
    let mut v = Verdict::new("nothing stuck");
    for command in &history.db.outbox {
        match command.status.as_str() {
            "in_flight" if !command.lease_live => v.violation(|| {
                format!(
                    "command {} ({}) is in flight without a live lease",
                    command.id, command.kind
                )
            }),
            "in_flight" | "pending" | "waiting" => v.violation(|| {
                format!(
                    "command {} ({}) is still {} after the drain",
                    command.id, command.kind, command.status
                )
            }),
            _ => {}
        }
    }
    for payment in &history.db.payments {
        if payment.status == "creating" {
            v.violation(|| format!("payment {} is still creating", payment.id));
        }
    }
    let dead = history
        .db
        .outbox
        .iter()
        .filter(|c| c.status == "dead")
        .count();
    v.checked = format!(
        "{} commands ({dead} dead), {} payments",
        history.db.outbox.len(),
        history.db.payments.len()
    );
    v
}

#[cfg(test)]
mod tests;
