//! The checker on hand-built histories: a clean one passes every guarantee; each planted violation
//! is reported by the guarantee it breaks, with a counterexample.

use std::collections::BTreeMap;

use stripe_fake::{
    CheckoutSessionSummary, EventDelivery, EventSummary, PaymentIntentSummary, RefundSummary,
};

use super::check;
use crate::history::*;

fn pi(id: &str, payment: &str, order: &str, status: &str, received: i64) -> PaymentIntentSummary {
    PaymentIntentSummary {
        id: id.into(),
        status: status.into(),
        amount: 1000,
        amount_received: received,
        currency: "usd".into(),
        created: 100,
        metadata: BTreeMap::from([
            ("pgpay_payment_id".to_owned(), payment.to_owned()),
            ("order_ref".to_owned(), order.to_owned()),
        ]),
    }
}

fn event(id: &str, kind: &str, created: i64, object: &str, key: Option<&str>) -> EventSummary {
    EventSummary {
        id: id.into(),
        kind: kind.into(),
        created,
        object_id: Some(object.into()),
        payment_intent: None,
        idempotency_key: key.map(str::to_owned),
        delivery: EventDelivery {
            ok: 1,
            open: 0,
            lost: 0,
        },
    }
}

fn payment(id: &str, order: &str, attempt: i32, status: &str, intent: Option<&str>) -> Payment {
    Payment {
        id: id.into(),
        order_ref: order.into(),
        attempt,
        amount: 1000,
        status: status.into(),
        intent: intent.map(str::to_owned),
        amount_received: 0,
        amount_refunded: 0,
        flagged_reason: None,
        mode: "payment_intent".into(),
        session: None,
    }
}

fn session(
    id: &str,
    payment: &str,
    order: &str,
    status: &str,
    paid: &str,
    intent: Option<&str>,
) -> CheckoutSessionSummary {
    CheckoutSessionSummary {
        id: id.into(),
        status: status.into(),
        payment_status: paid.into(),
        amount_total: 1000,
        currency: "usd".into(),
        client_reference_id: Some(order.into()),
        payment_intent: intent.map(str::to_owned),
        created: 100,
        expires_at: 86_500,
        metadata: BTreeMap::from([
            ("pgpay_payment_id".to_owned(), payment.to_owned()),
            ("order_ref".to_owned(), order.to_owned()),
        ]),
    }
}

fn command(id: i64, payment: &str, kind: &str, key: &str) -> Command {
    Command {
        id,
        payment_id: payment.into(),
        kind: kind.into(),
        idempotency_key: key.into(),
        status: "done".into(),
        lease_live: false,
        refund_ref: None,
    }
}

fn audit(id: i64, payment: &str, from: Option<&str>, to: &str, evidence: Option<&str>) -> AuditRow {
    AuditRow {
        id,
        payment_id: payment.into(),
        from_status: from.map(str::to_owned),
        to_status: to.into(),
        cause: "test".into(),
        evidence_id: evidence.map(str::to_owned),
    }
}

/// Order o1: paid (p1, pi_1), 300 refunded by command 4 under refund_ref ret-1 (asked twice: a
/// retry). Order o2: attempt p2 superseded (pi_2 canceled) by p3, still open (pi_3). Order o3:
/// paid in session mode (p5, Checkout Session cs_5 by command 10, whose PaymentIntent pi_5 Stripe
/// made).
fn clean() -> History {
    let mut h = History::default();
    let mut p1 = payment("p1", "o1", 1, "succeeded", Some("pi_1"));
    p1.amount_received = 1000;
    p1.amount_refunded = 300;
    h.db.payments = vec![
        p1,
        payment("p2", "o2", 1, "superseded", Some("pi_2")),
        payment("p3", "o2", 2, "requires_payment_method", Some("pi_3")),
    ];
    let mut p5 = payment("p5", "o3", 1, "succeeded", Some("pi_5"));
    p5.amount_received = 1000;
    p5.mode = "session".into();
    p5.session = Some("cs_5".into());
    h.db.payments.push(p5);
    h.ledger.payment_intents.list = vec![
        pi("pi_1", "p1", "o1", "succeeded", 1000),
        pi("pi_2", "p2", "o2", "canceled", 0),
        pi("pi_3", "p3", "o2", "requires_payment_method", 0),
        pi("pi_5", "p5", "o3", "succeeded", 1000),
    ];
    h.ledger.checkout_sessions.list = vec![session(
        "cs_5",
        "p5",
        "o3",
        "complete",
        "paid",
        Some("pi_5"),
    )];
    h.ledger.refunds.list = vec![RefundSummary {
        id: "re_1".into(),
        payment_intent: "pi_1".into(),
        charge: "ch_1".into(),
        amount: 300,
        created: 130,
    }];
    h.ledger.events.list = vec![
        event("evt_1", "payment_intent.created", 100, "pi_1", Some("k1")),
        event("evt_2", "payment_intent.succeeded", 110, "pi_1", None),
        event("evt_3", "payment_intent.created", 100, "pi_2", Some("k2")),
        event("evt_4", "payment_intent.created", 120, "pi_3", Some("k3")),
        event("evt_5", "payment_intent.canceled", 121, "pi_2", Some("k2c")),
        event("evt_6", "refund.created", 130, "re_1", Some("kr1")),
        event("evt_s1", "payment_intent.created", 140, "pi_5", None),
        event("evt_s2", "checkout.session.completed", 141, "cs_5", None),
    ];
    h.db.events = h
        .ledger
        .events
        .list
        .iter()
        .map(|e| StoredEvent {
            event_id: e.id.clone(),
            source: "webhook".into(),
        })
        .collect();
    h.db.outbox = vec![
        command(1, "p1", "create_payment_intent", "k1"),
        command(2, "p2", "create_payment_intent", "k2"),
        command(3, "p3", "create_payment_intent", "k3"),
        Command {
            refund_ref: Some("ret-1".into()),
            ..command(4, "p1", "refund", "kr1")
        },
        command(5, "p2", "cancel_payment_intent", "k2c"),
        command(10, "p5", "create_checkout_session", "kcs5"),
    ];
    h.db.fulfillments = ["p1", "p5"]
        .map(|p| Fulfillment {
            payment_id: p.into(),
            completed: true,
            dead: false,
        })
        .into();
    h.db.provisions = ["p1", "p5"]
        .map(|p| Provision {
            payment_id: p.into(),
            consumer: "c1".into(),
        })
        .into();
    h.db.refunds = vec![StoredRefund {
        refund_id: "re_1".into(),
        payment_id: "p1".into(),
        amount: 300,
    }];
    h.db.audit = vec![
        audit(1, "p1", None, "creating", None),
        audit(
            2,
            "p1",
            Some("creating"),
            "requires_payment_method",
            Some("evt_1"),
        ),
        audit(
            3,
            "p1",
            Some("requires_payment_method"),
            "succeeded",
            Some("evt_2"),
        ),
        audit(4, "p2", None, "creating", None),
        audit(
            5,
            "p2",
            Some("creating"),
            "requires_payment_method",
            Some("evt_3"),
        ),
        audit(
            6,
            "p2",
            Some("requires_payment_method"),
            "superseded",
            Some("p3"),
        ),
        audit(7, "p3", None, "creating", None),
        audit(
            8,
            "p3",
            Some("creating"),
            "requires_payment_method",
            Some("evt_4"),
        ),
        audit(9, "p5", None, "creating", None),
        audit(
            10,
            "p5",
            Some("creating"),
            "requires_payment_method",
            Some("outbox:10#1"),
        ),
        audit(
            11,
            "p5",
            Some("requires_payment_method"),
            "succeeded",
            Some("evt_s2"),
        ),
    ];
    h.db.audit_chain = Some(AuditChain {
        ok: true,
        detail: None,
    });
    h.app.orders = vec!["o1".into(), "o2".into(), "o3".into()];
    let asked = AskedRefund {
        payment_id: "p1".into(),
        amount: Some(300),
        command_id: Some(4),
        refund_ref: Some("ret-1".into()),
    };
    h.app.refunds = vec![asked.clone(), asked];
    h
}

/// Checks `history` and returns the verdict of the guarantee whose name starts with `name`, after
/// asserting it failed with a counterexample mentioning `needle`.
fn reported(history: &History, name: &str, needle: &str) {
    let verdicts = check(history);
    let verdict = verdicts
        .iter()
        .find(|v| v.name.starts_with(name))
        .unwrap_or_else(|| panic!("no guarantee named {name}"));
    assert!(!verdict.ok(), "not reported: {verdict}");
    let first = verdict.first.as_deref().unwrap_or_default();
    assert!(
        first.contains(needle),
        "{verdict} does not mention {needle}"
    );
    assert!(verdict.to_string().starts_with("FAIL"), "{verdict}");
}

#[test]
fn a_clean_history_passes_every_guarantee() {
    let verdicts = check(&clean());
    assert_eq!(verdicts.len(), 8);
    for verdict in &verdicts {
        assert!(verdict.ok(), "{verdict}");
        assert!(verdict.to_string().starts_with("ok"), "{verdict}");
    }
}

#[test]
fn a_second_kept_charge_for_an_order() {
    let mut h = clean();
    // A paid second attempt of o1 that was not refunded.
    let mut p = payment("p4", "o1", 2, "superseded", Some("pi_4"));
    p.amount_received = 1000;
    h.db.payments.push(p);
    h.db.outbox
        .push(command(6, "p4", "create_payment_intent", "k4"));
    h.ledger
        .payment_intents
        .list
        .push(pi("pi_4", "p4", "o1", "succeeded", 1000));
    h.ledger.events.list.push(event(
        "evt_7",
        "payment_intent.created",
        140,
        "pi_4",
        Some("k4"),
    ));
    reported(&h, "at most one kept charge", "order o1 keeps 2 charges");
    // Refunded in full, it is no longer kept.
    h.ledger.refunds.list.push(RefundSummary {
        id: "re_4".into(),
        payment_intent: "pi_4".into(),
        charge: "ch_4".into(),
        amount: 1000,
        created: 150,
    });
    let verdict = check(&h).remove(0);
    assert!(verdict.ok(), "{verdict}");
}

#[test]
fn a_payment_for_an_order_nobody_asked_for() {
    let mut h = clean();
    h.app.orders.retain(|o| o != "o2");
    reported(&h, "at most one kept charge", "never asked for");
}

#[test]
fn two_payment_intents_for_one_attempt() {
    let mut h = clean();
    h.ledger
        .payment_intents
        .list
        .push(pi("pi_9", "p3", "o2", "requires_payment_method", 0));
    reported(
        &h,
        "one PaymentIntent or Checkout Session per attempt",
        "payment p3 has 2 PaymentIntents",
    );
}

#[test]
fn a_create_under_another_key() {
    let mut h = clean();
    h.ledger.events.list[3].idempotency_key = Some("fresh-key".into());
    reported(
        &h,
        "one PaymentIntent or Checkout Session per attempt",
        "pi_3 of payment p3 was created under key",
    );
}

#[test]
fn a_key_reused_with_other_parameters() {
    let mut h = clean();
    h.ledger.idempotency.conflicts = 1;
    reported(
        &h,
        "one PaymentIntent or Checkout Session per attempt",
        "reused a key",
    );
}

#[test]
fn an_event_answered_2xx_and_lost() {
    let mut h = clean();
    h.db.events.retain(|e| e.event_id != "evt_2");
    reported(
        &h,
        "every event answered 2xx",
        "evt_2 (payment_intent.succeeded) was answered 2xx",
    );
}

#[test]
fn an_event_answered_2xx_recovered_only_by_reconciliation() {
    let mut h = clean();
    h.db.events[1].source = "api".into();
    reported(&h, "every event answered 2xx", "stored only by api");
}

#[test]
fn an_event_stored_twice() {
    let mut h = clean();
    h.db.events.push(h.db.events[0].clone());
    reported(&h, "every event answered 2xx", "evt_1 is stored 2 times");
}

#[test]
fn a_succeeded_payment_provisioned_twice() {
    let mut h = clean();
    h.db.provisions.push(Provision {
        payment_id: "p1".into(),
        consumer: "c2".into(),
    });
    reported(
        &h,
        "one completed fulfillment",
        "p1 was provisioned 2 times",
    );
}

#[test]
fn a_succeeded_payment_never_fulfilled() {
    let mut h = clean();
    h.db.fulfillments[0].completed = false;
    reported(
        &h,
        "one completed fulfillment",
        "1 fulfillment rows, 0 completed",
    );
}

#[test]
fn an_unpaid_payment_fulfilled() {
    let mut h = clean();
    h.db.fulfillments.push(Fulfillment {
        payment_id: "p3".into(),
        completed: true,
        dead: false,
    });
    reported(
        &h,
        "one completed fulfillment",
        "payment p3 is requires_payment_method",
    );
}

#[test]
fn refunds_beyond_what_was_received() {
    let mut h = clean();
    h.ledger.refunds.list.push(RefundSummary {
        id: "re_2".into(),
        payment_intent: "pi_1".into(),
        charge: "ch_1".into(),
        amount: 800,
        created: 140,
    });
    reported(&h, "refunds within", "pi_1 refunded 1100 of 1000 received");
}

#[test]
fn one_refund_command_refunded_twice() {
    let mut h = clean();
    h.ledger
        .events
        .list
        .push(event("evt_8", "refund.created", 131, "re_3", Some("kr1")));
    reported(
        &h,
        "refunds within",
        "refund command 4 (done) made 2 refunds",
    );
}

#[test]
fn a_refund_stripe_made_that_the_database_does_not_know() {
    let mut h = clean();
    h.db.refunds.clear();
    reported(
        &h,
        "refunds within",
        "payment p1 stores 0 refunded, Stripe refunded 300",
    );
}

#[test]
fn a_status_that_is_not_stripes() {
    let mut h = clean();
    h.ledger.payment_intents.list[2].status = "canceled".into();
    reported(
        &h,
        "after reconciliation",
        "payment p3 is requires_payment_method, Stripe's pi_3 is canceled",
    );
    // An open finding explains it.
    h.db.open_findings.push(Finding {
        payment_id: Some("p3".into()),
        kind: "status_mismatch".into(),
    });
    let verdict = check(&h).remove(5);
    assert!(verdict.ok(), "{verdict}");
}

#[test]
fn a_payment_intent_the_database_never_learned() {
    let mut h = clean();
    h.db.payments[2].intent = None;
    h.db.payments[2].status = "canceled".into();
    reported(
        &h,
        "after reconciliation",
        "knows no PaymentIntent, Stripe has pi_3",
    );
}

#[test]
fn a_terminal_status_left() {
    let mut h = clean();
    h.db.audit.push(audit(
        9,
        "p1",
        Some("succeeded"),
        "requires_payment_method",
        Some("evt_1"),
    ));
    reported(
        &h,
        "every audited transition",
        "audit row 9 moves payment p1 from Some(\"succeeded\")",
    );
}

#[test]
fn evidence_applied_out_of_order() {
    let mut h = clean();
    // p3 moves on at 125, then older evidence from 120 is applied.
    h.ledger.events.list.push(event(
        "evt_9",
        "payment_intent.requires_action",
        125,
        "pi_3",
        None,
    ));
    h.db.audit.push(audit(
        9,
        "p3",
        Some("requires_payment_method"),
        "requires_action",
        Some("evt_9"),
    ));
    h.db.audit.push(audit(
        10,
        "p3",
        Some("requires_action"),
        "requires_payment_method",
        Some("evt_4"),
    ));
    reported(
        &h,
        "every audited transition",
        "audit row 10 applies requires_payment_method of evt_4 (created 120)",
    );
}

#[test]
fn an_audit_chain_that_does_not_verify() {
    let mut h = clean();
    h.db.audit_chain = Some(AuditChain {
        ok: false,
        detail: Some("row 3: hash mismatch".into()),
    });
    reported(&h, "every audited transition", "row 3: hash mismatch");
    h.db.audit_chain = None;
    let verdict = check(&h).remove(6);
    assert!(verdict.ok(), "{verdict}");
    assert!(
        verdict.to_string().contains("not in this version"),
        "{verdict}"
    );
}

#[test]
fn a_command_in_flight_without_a_lease() {
    let mut h = clean();
    h.db.outbox[2].status = "in_flight".into();
    reported(
        &h,
        "nothing stuck",
        "command 3 (create_payment_intent) is in flight without a live lease",
    );
}

#[test]
fn a_payment_still_creating() {
    let mut h = clean();
    h.db.payments.push(payment("p5", "o2", 3, "creating", None));
    reported(&h, "nothing stuck", "payment p5 is still creating");
}

#[test]
fn two_checkout_sessions_for_one_attempt() {
    let mut h = clean();
    h.ledger
        .checkout_sessions
        .list
        .push(session("cs_9", "p5", "o3", "open", "unpaid", None));
    reported(
        &h,
        "one PaymentIntent or Checkout Session per attempt",
        "payment p5 has 2 Checkout Sessions",
    );
}

#[test]
fn a_session_payment_recording_a_session_stripe_does_not_hold_for_it() {
    let mut h = clean();
    h.db.payments[3].session = Some("cs_other".into());
    reported(
        &h,
        "one PaymentIntent or Checkout Session per attempt",
        "records Checkout Session cs_other",
    );
}

#[test]
fn a_payment_intent_that_is_not_its_sessions() {
    let mut h = clean();
    h.ledger.checkout_sessions.list[0].payment_intent = Some("pi_elsewhere".into());
    reported(
        &h,
        "one PaymentIntent or Checkout Session per attempt",
        "pi_5 names session-mode payment p5 but is not its Checkout Session's",
    );
}

#[test]
fn a_session_payment_whose_status_is_not_its_sessions() {
    let mut h = clean();
    h.ledger.checkout_sessions.list[0].status = "expired".into();
    reported(
        &h,
        "after reconciliation",
        "payment p5 is succeeded, Stripe's cs_5 is canceled",
    );
}

#[test]
fn a_session_payment_that_never_learned_its_session() {
    let mut h = clean();
    h.db.payments[3].session = None;
    reported(
        &h,
        "after reconciliation",
        "payment p5 (succeeded) knows no Checkout Session, Stripe has cs_5",
    );
}

#[test]
fn a_failed_bank_debit_is_canceled_not_processing() {
    let mut h = clean();
    // The customer paid by bank debit; it failed: the session stays complete and unpaid, its
    // PaymentIntent is back at requires_payment_method, the payment is canceled.
    h.ledger.checkout_sessions.list[0].payment_status = "unpaid".into();
    h.ledger.payment_intents.list[3].status = "requires_payment_method".into();
    h.ledger.payment_intents.list[3].amount_received = 0;
    h.db.payments[3].status = "canceled".into();
    let verdict = check(&h).remove(5);
    assert!(verdict.ok(), "{verdict}");
    h.db.payments[3].status = "processing".into();
    reported(
        &h,
        "after reconciliation",
        "payment p5 is processing, Stripe's cs_5 is canceled",
    );
}

#[test]
fn a_refund_ref_with_two_refund_commands() {
    let mut h = clean();
    h.db.outbox.push(Command {
        refund_ref: Some("ret-1".into()),
        status: "pending".into(),
        ..command(11, "p1", "refund", "kr-again")
    });
    reported(
        &h,
        "refunds within",
        "refund_ref ret-1 of payment p1 has 2 refund commands",
    );
}

#[test]
fn a_refund_ref_answered_with_another_command() {
    let mut h = clean();
    h.app.refunds[1].command_id = Some(5);
    reported(
        &h,
        "refunds within",
        "pay.refund answered command 5 for refund_ref ret-1 of payment p1",
    );
}
