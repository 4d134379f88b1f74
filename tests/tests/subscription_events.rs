//! Subscription, invoice and subscription-mode Checkout Session events through the one rule, in
//! both API shapes (objects built on Stripe's published fixtures of each version), signed as
//! Stripe signs them: duplicates and every order leave one fulfillment per paid invoice and the
//! newest state; late, unknown, foreign and broken events; replay and API-read events.

use pgpay_tests::billing::{self, Shape, Sub};
use pgpay_tests::billing_world::{
    deliver, deliver_all, setup, sign_up_events, World, DAY, SECRET, SHAPES,
};
use pgpay_tests::stripe_sdk::unix_now;
use pgpay_tests::{count, TestDb};
use serde_json::Value;
use std::sync::Arc;
use uuid::Uuid;

#[tokio::test]
async fn both_shapes_sign_up_renew_and_provision_once_per_paid_invoice() {
    let (_db, client) = setup().await;
    for shape in SHAPES {
        let w = World::begin(&client, shape, &format!("acct-{}", shape.api_version())).await;
        let t = unix_now() - 10;
        let first = (t, t + 30 * DAY);
        for payload in sign_up_events(&w, t, first) {
            let (status, detail) = deliver(&client, &payload).await;
            assert_eq!(status, "applied", "{shape:?}: {detail}");
        }
        // Each again, and invoice.paid under both names: nothing new.
        for payload in sign_up_events(&w, t, first) {
            assert_eq!(deliver(&client, &payload).await.0, "duplicate");
        }
        assert_eq!(
            w.state(&client).await,
            (Some("active".into()), 1, false),
            "{shape:?}"
        );
        assert_eq!(w.fulfillments(&client).await, 1, "{shape:?}");
        let row = client
            .query_one(
                "SELECT stripe_subscription_id, stripe_subscription_item_id, stripe_customer_id, checkout_status,
                        extract(epoch FROM current_period_end)::bigint
                 FROM pay.subscriptions WHERE id = $1",
                &[&w.id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), w.stripe_id);
        assert!(row.get::<_, String>(1).starts_with("si_"));
        assert_eq!(row.get::<_, String>(2), "cus_test_1");
        assert_eq!(row.get::<_, String>(3), "complete");
        assert_eq!(
            row.get::<_, i64>(4),
            first.1,
            "{shape:?}: the period, wherever the shape keeps it"
        );
        assert_eq!(w.entitlement(&client).await, (true, "active".into()));

        // A renewal: its invoice paid, announced three times under two names.
        let second = (first.1, first.1 + 30 * DAY);
        let r = &w.reference;
        let renewal = [
            w.invoice_event(
                &format!("evt_{r}_r1"),
                "invoice.paid",
                t + 5,
                &format!("in_{r}_2"),
                "paid",
                "subscription_cycle",
                second,
            ),
            w.invoice_event(
                &format!("evt_{r}_r2"),
                "invoice.payment_succeeded",
                t + 5,
                &format!("in_{r}_2"),
                "paid",
                "subscription_cycle",
                second,
            ),
            w.invoice_event(
                &format!("evt_{r}_r3"),
                "invoice.paid",
                t + 6,
                &format!("in_{r}_2"),
                "paid",
                "subscription_cycle",
                second,
            ),
            w.subscription_event(
                &format!("evt_{r}_r4"),
                "customer.subscription.updated",
                t + 5,
                &w.sub("active", 1, second),
            ),
        ];
        for payload in &renewal {
            deliver(&client, payload).await;
        }
        assert_eq!(
            w.fulfillments(&client).await,
            2,
            "{shape:?}: one per paid invoice"
        );
        let invoice = client
            .query_one(
                "SELECT status, amount_paid, currency, billing_reason, extract(epoch FROM period_end)::bigint,
                        paid_at IS NOT NULL, subscription_ref
                 FROM pay.invoices WHERE stripe_invoice_id = $1",
                &[&format!("in_{r}_2")],
            )
            .await
            .unwrap();
        assert_eq!(invoice.get::<_, String>(0), "paid");
        assert_eq!(invoice.get::<_, i64>(1), 2000);
        assert_eq!(invoice.get::<_, String>(2), "usd");
        assert_eq!(invoice.get::<_, String>(3), "subscription_cycle");
        assert_eq!(invoice.get::<_, i64>(4), second.1);
        assert!(invoice.get::<_, bool>(5));
        assert_eq!(invoice.get::<_, String>(6), w.reference);
        let period_end: i64 = client
            .query_one(
                "SELECT extract(epoch FROM current_period_end)::bigint FROM pay.subscriptions WHERE id = $1",
                &[&w.id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(period_end, second.1);
    }
    // Claim, complete: provisioned once each.
    let claimed = client
        .query(
            "SELECT stripe_invoice_id FROM pay.claim_invoice_fulfillments('app', 10, '1 minute')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    for row in &claimed {
        let invoice: String = row.get(0);
        let first: bool = client
            .query_one(
                "SELECT pay.complete_invoice_fulfillment($1, 'app')",
                &[&invoice],
            )
            .await
            .unwrap()
            .get(0);
        assert!(first);
        let again: bool = client
            .query_one("SELECT pay.complete_invoice_fulfillment($1)", &[&invoice])
            .await
            .unwrap()
            .get(0);
        assert!(!again);
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.verify_audit_log()").await,
        0,
        "the subscriptions' audit chains verify"
    );
}

#[tokio::test]
async fn every_order_of_the_events_leaves_the_newest_state_and_one_fulfillment() {
    let (_db, client) = setup().await;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..8 {
        let shape = SHAPES[round % 2];
        let w = World::begin(&client, shape, &format!("acct-order-{round}")).await;
        let t = unix_now() - 1000;
        let p1 = (t, t + 30 * DAY);
        let p2 = (p1.1, p1.1 + 30 * DAY);
        let r = &w.reference;
        let mut events = sign_up_events(&w, t, p1);
        events.extend([
            // The renewal fails, then is paid: past_due, then active again.
            w.invoice_event(
                &format!("evt_{r}_f1"),
                "invoice.payment_failed",
                t + 100,
                &format!("in_{r}_2"),
                "open",
                "subscription_cycle",
                p2,
            ),
            w.subscription_event(
                &format!("evt_{r}_f2"),
                "customer.subscription.updated",
                t + 100,
                &w.sub("past_due", 1, p2),
            ),
            w.invoice_event(
                &format!("evt_{r}_f3"),
                "invoice.paid",
                t + 200,
                &format!("in_{r}_2"),
                "paid",
                "subscription_cycle",
                p2,
            ),
            w.invoice_event(
                &format!("evt_{r}_f4"),
                "invoice.payment_succeeded",
                t + 200,
                &format!("in_{r}_2"),
                "paid",
                "subscription_cycle",
                p2,
            ),
            w.subscription_event(
                &format!("evt_{r}_f5"),
                "customer.subscription.updated",
                t + 200,
                &w.sub("active", 3, p2),
            ),
        ]);
        // A deterministic shuffle per round, each event delivered twice somewhere in it.
        let mut deliveries: Vec<&String> = events.iter().chain(events.iter()).collect();
        for i in (1..deliveries.len()).rev() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            deliveries.swap(i, (seed >> 33) as usize % (i + 1));
        }
        deliver_all(&client, &deliveries).await;
        assert_eq!(
            w.state(&client).await,
            (Some("active".into()), 3, false),
            "round {round}"
        );
        assert_eq!(
            w.fulfillments(&client).await,
            2,
            "round {round}: one per paid invoice"
        );
        let invoices = client
            .query(
                "SELECT status FROM pay.invoices WHERE subscription_id = $1 ORDER BY stripe_invoice_id",
                &[&w.id],
            )
            .await
            .unwrap();
        let statuses: Vec<String> = invoices.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            statuses,
            ["paid", "paid"],
            "round {round}: a late open never reopens a paid invoice"
        );
    }
}

#[tokio::test]
async fn sixteen_concurrent_deliveries_of_one_payment_under_two_names_provision_once() {
    let (db, client) = setup().await;
    let w = World::begin(&client, Shape::V2025, "acct-conc").await;
    let t = unix_now();
    let p = (t, t + 30 * DAY);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let kind = if i % 2 == 0 {
            "invoice.paid"
        } else {
            "invoice.payment_succeeded"
        };
        let payload = w.invoice_event(
            &format!("evt_conc_{}", i % 4),
            kind,
            t,
            "in_conc",
            "paid",
            "subscription_create",
            p,
        );
        let client = Arc::new(db.connect().await);
        tasks.push(tokio::spawn(
            async move { deliver(&client, &payload).await.0 },
        ));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "applied").count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "duplicate").count(),
        12,
        "{statuses:?}"
    );
    assert_eq!(w.fulfillments(&client).await, 1);
}

#[tokio::test]
async fn late_events_after_the_end_are_audited_as_ignored_and_unknown_statuses_never_raise() {
    let (_db, client) = setup().await;
    let w = World::begin(&client, Shape::V2024, "acct-late").await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    deliver(&client, &w.completed("evt_l1", t)).await;
    deliver(
        &client,
        &w.subscription_event(
            "evt_l2",
            "customer.subscription.deleted",
            t + 50,
            &w.sub("canceled", 1, p),
        ),
    )
    .await;
    // Older and newer non-terminal news after the end: ignored, audited, answered 200.
    let (status, detail) = deliver(
        &client,
        &w.subscription_event(
            "evt_l3",
            "customer.subscription.updated",
            t + 10,
            &w.sub("active", 1, p),
        ),
    )
    .await;
    assert_eq!(status, "applied", "answered 200 as handled");
    assert!(detail.contains("-> ignored"), "{detail}");
    let (_, detail) = deliver(
        &client,
        &w.subscription_event(
            "evt_l4",
            "customer.subscription.resumed",
            t + 90,
            &w.sub("active", 1, p),
        ),
    )
    .await;
    assert!(detail.contains("-> ignored (ignore:terminal)"), "{detail}");
    assert_eq!(w.state(&client).await.0.as_deref(), Some("canceled"));
    assert_eq!(w.entitlement(&client).await, (false, "canceled".into()));
    // A status this version does not know: stored, ignored, never raised.
    let w2 = World::begin(&client, Shape::V2025, "acct-unknown").await;
    deliver(&client, &w2.completed("evt_u1", t)).await;
    let (status, detail) = deliver(
        &client,
        &w2.subscription_event(
            "evt_u2",
            "customer.subscription.updated",
            t + 1,
            &w2.sub("hibernating", 1, p),
        ),
    )
    .await;
    assert_eq!(status, "applied");
    assert!(
        detail.contains("-> ignored (ignore:unknown_status)"),
        "{detail}"
    );
    let events: Vec<String> = client
        .query(
            "SELECT event FROM pay.subscription_timeline('acct-late')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events.first().map(String::as_str), Some("created"));
    assert!(
        events.contains(&"none -> canceled".to_owned()),
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| *e == "ignored active").count(),
        2,
        "{events:?}"
    );
    let unknown: Vec<String> = client
        .query(
            "SELECT event FROM pay.subscription_timeline('acct-unknown')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        unknown.contains(&"ignored hibernating".to_owned()),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn events_not_about_our_subscriptions_or_broken_are_stored_and_answered_200() {
    let (_db, client) = setup().await;
    let w = World::begin(&client, Shape::V2024, "acct-broken").await;
    let t = unix_now();
    let p = (t, t + DAY);
    let stranger = billing::event(
        Shape::V2024,
        "evt_s1",
        "customer.subscription.created",
        t,
        billing::subscription(
            Shape::V2024,
            &Sub {
                id: "sub_other",
                pgpay_id: Uuid::new_v4(),
                subscription_ref: "y",
                status: "active",
                price: "price_y",
                quantity: 1,
                period: p,
                cancel_at_period_end: false,
            },
        ),
    );
    let (status, detail) = deliver(&client, &stranger).await;
    assert_eq!(status, "stored");
    assert!(
        detail.contains("not about a pgpay subscription"),
        "{detail}"
    );
    let mut broken = billing::invoice(
        Shape::V2024,
        "in_broken",
        &w.sub("active", 1, p),
        "paid",
        2000,
        "subscription_cycle",
        p,
    );
    broken["amount_paid"] = serde_json::json!("lots");
    let (status, detail) = deliver(
        &client,
        &billing::event(Shape::V2024, "evt_s2", "invoice.paid", t, broken),
    )
    .await;
    assert_eq!(status, "stored", "{detail}");
    assert_eq!(w.fulfillments(&client).await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.webhook_events").await,
        2
    );
}

#[tokio::test]
async fn a_quarantined_invoice_payment_is_replayed_into_one_fulfillment() {
    let (_db, client) = setup().await;
    let w = World::begin(&client, Shape::V2025, "acct-replay").await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    deliver(&client, &w.completed("evt_rp1", t)).await;
    // The application's own trigger on the queue fails: the payment is quarantined, not lost.
    client
        .batch_execute(
            "CREATE FUNCTION public.provision_down() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'billing system is down' USING ERRCODE = 'P0001'; END; $$;
             CREATE TRIGGER provision_down BEFORE INSERT ON pay.invoice_fulfillments
                 FOR EACH ROW EXECUTE FUNCTION public.provision_down();",
        )
        .await
        .unwrap();
    let paid = w.invoice_event(
        "evt_rp2",
        "invoice.paid",
        t + 1,
        "in_replay",
        "paid",
        "subscription_create",
        p,
    );
    let (status, detail) = deliver(&client, &paid).await;
    assert_eq!(status, "quarantined", "{detail}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.invoices").await,
        0,
        "nothing of it stayed"
    );
    client
        .batch_execute("DROP TRIGGER provision_down ON pay.invoice_fulfillments")
        .await
        .unwrap();
    for expected in ["applied", "skipped"] {
        let rows = client
            .query("SELECT outcome FROM pay.replay_events()", &[])
            .await
            .unwrap();
        let outcomes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if expected == "applied" {
            assert_eq!(outcomes, ["applied"]);
        } else {
            assert!(outcomes.is_empty(), "{outcomes:?}");
        }
    }
    assert_eq!(w.fulfillments(&client).await, 1);
    // The late invoice.payment_succeeded for the same invoice: still one.
    let succeeded = w.invoice_event(
        "evt_rp3",
        "invoice.payment_succeeded",
        t + 1,
        "in_replay",
        "paid",
        "subscription_create",
        p,
    );
    deliver(&client, &succeeded).await;
    assert_eq!(w.fulfillments(&client).await, 1);
}

#[tokio::test]
async fn a_database_still_at_0_1_0_stores_billing_events_as_it_always_did() {
    // The new library serves a 0.1.0 schema until ALTER EXTENSION pgpay UPDATE: its billing
    // events are stored (not about a payment), never a 5xx on a missing table.
    let db = TestDb::create_at(Some("0.1.0")).await;
    let client = db.connect().await;
    client
        .execute("SELECT pay.add_webhook_secret($1, 'primary')", &[&SECRET])
        .await
        .unwrap();
    let t = unix_now();
    let s = Sub {
        id: "sub_old_schema",
        pgpay_id: Uuid::new_v4(),
        subscription_ref: "acct-old",
        status: "active",
        price: "price_pro",
        quantity: 1,
        period: (t, t + DAY),
        cancel_at_period_end: false,
    };
    for (i, object) in [
        billing::subscription(Shape::V2025, &s),
        billing::invoice(
            Shape::V2024,
            "in_old",
            &s,
            "paid",
            100,
            "subscription_cycle",
            (t, t + DAY),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let payload = billing::event(
            Shape::V2025,
            &format!("evt_old_{i}"),
            "invoice.paid",
            t,
            object,
        );
        let (status, detail) = deliver(&client, &payload).await;
        assert_eq!(status, "stored", "{detail}");
    }
}

#[tokio::test]
async fn a_completion_before_the_create_answer_links_everything_once() {
    let (_db, client) = setup().await;
    let id = billing::begin(&client, "acct-early", "price_pro", 1).await;
    let w = World {
        shape: Shape::V2024,
        id,
        reference: "acct-early".into(),
        stripe_id: "sub_acct_early".into(),
    };
    let t = unix_now() - 10;
    let p = (t, t + 30 * DAY);
    // The customer finished before the worker's answer came back (it was slow, or lost).
    for payload in [
        w.subscription_event(
            "evt_e1",
            "customer.subscription.created",
            t,
            &w.sub("active", 1, p),
        ),
        w.completed("evt_e2", t),
    ] {
        assert_eq!(deliver(&client, &payload).await.0, "applied");
    }
    let session = billing::subscription_session("cs_acct-early", id, "acct-early", "open", None);
    assert!(
        billing::answer(&client, id, "create_subscription_session", session)
            .await
            .1
    );
    let row = client
        .query_one(
            "SELECT checkout_status, stripe_checkout_session_id, stripe_subscription_id, status
             FROM pay.wait_for_subscription_checkout('acct-early', 100)",
            &[],
        )
        .await
        .expect("a completed checkout is not waited for");
    assert_eq!(
        row.get::<_, String>(0),
        "complete",
        "a late open never reopens it"
    );
    assert_eq!(row.get::<_, String>(1), "cs_acct-early");
    assert_eq!(row.get::<_, String>(2), "sub_acct_early");
    assert_eq!(row.get::<_, String>(3), "active");
    assert_eq!(w.entitlement(&client).await, (true, "active".into()));
}

#[tokio::test]
async fn events_read_from_the_api_take_the_same_path_once() {
    let (_db, client) = setup().await;
    let w = World::begin(&client, Shape::V2025, "acct-api").await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    deliver(&client, &w.completed("evt_a1", t)).await;
    let paid: Value = serde_json::from_str(&w.invoice_event(
        "evt_a2",
        "invoice.paid",
        t + 1,
        "in_api",
        "paid",
        "subscription_create",
        p,
    ))
    .unwrap();
    for expected in ["applied", "duplicate"] {
        let status: String = client
            .query_one("SELECT status FROM pay.apply_stripe_event($1)", &[&paid])
            .await
            .unwrap()
            .get(0);
        assert_eq!(status, expected);
    }
    // The webhook of the same event, delivered late: a duplicate too.
    let payload = w.invoice_event(
        "evt_a2",
        "invoice.paid",
        t + 1,
        "in_api",
        "paid",
        "subscription_create",
        p,
    );
    assert_eq!(deliver(&client, &payload).await.0, "duplicate");
    assert_eq!(w.fulfillments(&client).await, 1);
}

#[tokio::test]
async fn a_second_stripe_subscription_claiming_one_row_is_flagged_not_applied() {
    let (_db, client) = setup().await;
    let w = World::begin(&client, Shape::V2024, "acct-twice").await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    deliver(&client, &w.completed("evt_t1", t)).await;
    deliver(
        &client,
        &w.subscription_event(
            "evt_t2",
            "customer.subscription.created",
            t,
            &w.sub("active", 1, p),
        ),
    )
    .await;
    let other = World {
        shape: Shape::V2024,
        id: w.id,
        reference: w.reference.clone(),
        stripe_id: "sub_someone_else".into(),
    };
    let (_, detail) = deliver(
        &client,
        &other.subscription_event(
            "evt_t3",
            "customer.subscription.updated",
            t + 5,
            &other.sub("canceled", 1, p),
        ),
    )
    .await;
    assert!(detail.contains("-> flagged"), "{detail}");
    let paid = other.invoice_event(
        "evt_t4",
        "invoice.paid",
        t + 6,
        "in_other",
        "paid",
        "subscription_create",
        p,
    );
    let (_, detail) = deliver(&client, &paid).await;
    assert!(detail.contains("-> flagged"), "{detail}");
    let row = client
        .query_one(
            "SELECT stripe_subscription_id, status, flagged_reason FROM pay.subscriptions WHERE id = $1",
            &[&w.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), w.stripe_id);
    assert_eq!(row.get::<_, String>(1), "active");
    assert!(row.get::<_, String>(2).contains("sub_someone_else"));
    assert_eq!(
        count(
            &client,
            "SELECT (pay.status_report() ->> 'flagged_subscriptions')::bigint"
        )
        .await,
        1,
        "pgpay-worker status counts it"
    );
    assert_eq!(
        w.fulfillments(&client).await,
        0,
        "nothing provisioned for a stranger's invoice"
    );
}
