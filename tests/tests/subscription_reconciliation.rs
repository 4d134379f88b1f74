//! Reconciliation of subscriptions: lost renewal webhooks repaired once from the API, a drifted
//! status corrected through the rule, a lost session create adopted (and re-keyed), a live
//! subscription Stripe does not list recorded once.

use pgpay_tests::billing::{self, Shape, Sub};
use pgpay_tests::billing_world::{deliver, setup, sign_up_events, World, DAY, SHAPES};
use pgpay_tests::count;
use pgpay_tests::stripe_sdk::unix_now;
use serde_json::Value;
use uuid::Uuid;

#[tokio::test]
async fn lost_renewal_webhooks_are_repaired_by_reconciliation_once() {
    let (_db, client) = setup().await;
    for shape in SHAPES {
        let w = World::begin(&client, shape, &format!("acct-rec-{}", shape.api_version())).await;
        let t = unix_now() - 100;
        let p1 = (t, t + 30 * DAY);
        for payload in sign_up_events(&w, t, p1) {
            deliver(&client, &payload).await;
        }
        assert_eq!(w.fulfillments(&client).await, 1);
        // The renewal happened at Stripe; every webhook of it was lost. Reconciliation lists the
        // subscription (past_due then paid: active, new period) and the paid invoice.
        let p2 = (p1.1, p1.1 + 30 * DAY);
        let subscription = billing::subscription(shape, &w.sub("active", 2, p2));
        let invoice = billing::invoice(
            shape,
            &format!("in_{}_2", w.reference),
            &w.sub("active", 2, p2),
            "paid",
            4000,
            "subscription_cycle",
            p2,
        );
        let page = Value::Array(vec![subscription, invoice]);
        let run: i64 = client
            .query_one(
                "SELECT pay.start_reconciliation('test', now() - interval '1 day')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        for pass in 0..2 {
            let rows = client
                .query("SELECT stripe_object_id, outcome FROM pay.apply_stripe_objects($1, 'reconcile', $2)", &[&page, &run])
                .await
                .unwrap();
            let outcomes: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
            if pass == 0 {
                assert_eq!(outcomes, ["applied", "applied"], "{shape:?}");
            } else {
                assert_eq!(
                    outcomes,
                    ["unchanged", "unchanged"],
                    "{shape:?}: a second pass finds nothing"
                );
            }
        }
        client
            .execute("SELECT pay.finish_reconciliation($1)", &[&run])
            .await
            .unwrap();
        assert_eq!(
            w.fulfillments(&client).await,
            2,
            "{shape:?}: the lost renewal provisioned once"
        );
        assert_eq!(w.state(&client).await, (Some("active".into()), 2, false));
        let kinds: Vec<String> = client
            .query(
                "SELECT kind FROM pay.findings WHERE run_id = $1 ORDER BY id",
                &[&run],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(kinds, ["invoice_fulfillment_repaired"], "{shape:?}");
        // The lost webhook arrives after all: still one fulfillment.
        let late = w.invoice_event(
            &format!("evt_{}_late", w.reference),
            "invoice.paid",
            t + 50,
            &format!("in_{}_2", w.reference),
            "paid",
            "subscription_cycle",
            p2,
        );
        deliver(&client, &late).await;
        assert_eq!(w.fulfillments(&client).await, 2);
    }
    // A subscription whose status drifted is corrected through the rule and recorded.
    let w = World::begin(&client, Shape::V2025, "acct-drift").await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    deliver(&client, &w.completed("evt_d1", t)).await;
    deliver(
        &client,
        &w.subscription_event(
            "evt_d2",
            "customer.subscription.created",
            t,
            &w.sub("active", 1, p),
        ),
    )
    .await;
    let drifted = Value::Array(vec![billing::subscription(
        Shape::V2025,
        &w.sub("unpaid", 1, p),
    )]);
    let rows = client
        .query(
            "SELECT outcome FROM pay.apply_stripe_objects($1, 'reconcile', NULL)",
            &[&drifted],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "applied");
    assert_eq!(w.entitlement(&client).await, (false, "unpaid".into()));
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.findings WHERE kind = 'status_drift_fixed' AND expected = 'active' AND actual = 'unpaid'").await,
        1
    );
    // Not ours: stored nowhere, said so.
    let stranger = Value::Array(vec![billing::subscription(
        Shape::V2024,
        &Sub {
            id: "sub_stranger",
            pgpay_id: Uuid::new_v4(),
            subscription_ref: "x",
            status: "active",
            price: "price_x",
            quantity: 1,
            period: p,
            cancel_at_period_end: false,
        },
    )]);
    let rows = client
        .query(
            "SELECT outcome FROM pay.apply_stripe_objects($1, 'reconcile', NULL)",
            &[&stranger],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "not_ours");
}

#[tokio::test]
async fn reconciliation_adopts_a_session_whose_create_answer_was_lost_and_rekeying_knows_the_kind()
{
    let (_db, client) = setup().await;
    let id = billing::begin(&client, "acct-adopt", "price_pro", 1).await;
    // The worker sent the create (in flight), Stripe made the session, the answer was lost.
    let command: i64 = client
        .query_one(
            "SELECT id FROM pay.claim_outbox('w', 10, '1 minute') WHERE subscription_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    // Past Stripe's key retention, the worker found no session and asks for a new key.
    let key: Option<String> = client
        .query_one(
            "SELECT pay.rekey_create_command($1, 1, 'no session found')",
            &[&command],
        )
        .await
        .unwrap()
        .get(0);
    let key = key.expect("a new key for the subscription's create");
    assert!(key.starts_with("pgpay.sub_create.rekeyed:"), "{key}");
    let session = Value::Array(vec![billing::subscription_session(
        "cs_adopt",
        id,
        "acct-adopt",
        "open",
        None,
    )]);
    let outcome: String = client
        .query_one(
            "SELECT outcome FROM pay.apply_stripe_objects($1, 'reconcile', NULL)",
            &[&session],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "adopted");
    let row = client
        .query_one(
            "SELECT o.status, s.checkout_url FROM pay.outbox o JOIN pay.subscriptions s ON s.id = o.subscription_id
             WHERE o.id = $1",
            &[&command],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "done",
        "the create is never sent again"
    );
    assert_eq!(
        row.get::<_, String>(1),
        "https://checkout.stripe.com/c/pay/cs_adopt"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM pay.findings WHERE kind = 'orphan_adopted' AND stripe_object_id = 'cs_adopt'").await,
        1
    );
    // Known now: nothing left to re-key.
    let again: Option<String> = client
        .query_one(
            "SELECT pay.rekey_create_command($1, 1, 'again')",
            &[&command],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, None);
    let causes: Vec<String> = client
        .query(
            "SELECT cause FROM pay.subscription_timeline('acct-adopt')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        causes.iter().any(|c| c.starts_with("create re-keyed")),
        "{causes:?}"
    );
}

#[tokio::test]
async fn a_live_subscription_stripe_does_not_list_is_a_finding_once() {
    let (_db, client) = setup().await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    let mut worlds = Vec::new();
    for (reference, status) in [
        ("acct-m1", "active"),
        ("acct-m2", "active"),
        ("acct-m3", "canceled"),
    ] {
        let w = World::begin(&client, Shape::V2025, reference).await;
        deliver(&client, &w.completed(&format!("evt_{reference}_1"), t)).await;
        deliver(
            &client,
            &w.subscription_event(
                &format!("evt_{reference}_2"),
                "customer.subscription.updated",
                t,
                &w.sub(status, 1, p),
            ),
        )
        .await;
        worlds.push(w);
    }
    client
        .execute(
            "UPDATE pay.subscriptions SET created_at = now() - interval '1 hour'",
            &[],
        )
        .await
        .unwrap();
    let run: i64 = client
        .query_one(
            "SELECT pay.start_reconciliation('test', now() - interval '1 day')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let seen = vec![worlds[0].stripe_id.clone()];
    for expected in [1, 0] {
        let missing: i32 = client
            .query_one(
                "SELECT pay.record_missing_subscriptions_at_stripe($1, $2)",
                &[&run, &seen],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(missing, expected, "acct-m2 once; acct-m3 has ended");
    }
    let found: String = client
        .query_one(
            "SELECT stripe_object_id FROM pay.findings WHERE kind = 'missing_at_stripe'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, worlds[1].stripe_id);
}
