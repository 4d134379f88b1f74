//! What the application gates on: `pay.entitlements` through the grace period of a past_due
//! subscription, a cancellation at period end, and a change of quantity, each driven by the
//! events Stripe sends.

use pgpay_tests::billing::Shape;
use pgpay_tests::billing_world::{deliver, setup, World, DAY, SHAPES};
use pgpay_tests::sqlstate;
use pgpay_tests::stripe_sdk::unix_now;

#[tokio::test]
async fn past_due_is_entitled_within_the_grace_period_only() {
    let (_db, client) = setup().await;
    let now = unix_now();
    for (reference, became_past_due, grace, entitled) in [
        ("acct-g1", now - DAY, None, true),
        ("acct-g2", now - 4 * DAY, None, false),
        ("acct-g3", now - DAY, Some("12 hours"), false),
        ("acct-g4", now - 4 * DAY, Some("7 days"), true),
    ] {
        let w = World::begin(&client, Shape::V2025, reference).await;
        let p = (now - 10 * DAY, now + 20 * DAY);
        deliver(
            &client,
            &w.completed(&format!("evt_{reference}_1"), now - 10 * DAY),
        )
        .await;
        deliver(
            &client,
            &w.subscription_event(
                &format!("evt_{reference}_2"),
                "customer.subscription.updated",
                now - 10 * DAY,
                &w.sub("active", 1, p),
            ),
        )
        .await;
        deliver(
            &client,
            &w.subscription_event(
                &format!("evt_{reference}_3"),
                "customer.subscription.updated",
                became_past_due,
                &w.sub("past_due", 1, p),
            ),
        )
        .await;
        match grace {
            Some(g) => client
                .execute("SELECT set_config('pay.past_due_grace', $1, false)", &[&g])
                .await
                .unwrap(),
            None => client
                .execute("RESET pay.past_due_grace", &[])
                .await
                .unwrap(),
        };
        let (is, reason) = w.entitlement(&client).await;
        assert_eq!(is, entitled, "{reference}: {reason}");
        assert!(reason.starts_with("past_due"), "{reason}");
    }
    client
        .batch_execute("SET pay.past_due_grace = 'soon'")
        .await
        .unwrap();
    let err = client
        .query("SELECT * FROM pay.entitlements", &[])
        .await
        .expect_err("a bad grace period");
    assert_eq!(sqlstate(&err), Some("22023"));
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("pay.past_due_grace"));
}

#[tokio::test]
async fn cancel_at_period_end_keeps_access_until_the_period_ends() {
    let (_db, client) = setup().await;
    for shape in SHAPES {
        let w = World::begin(
            &client,
            shape,
            &format!("acct-cape-{}", shape.api_version()),
        )
        .await;
        let now = unix_now();
        let p = (now - 29 * DAY, now + DAY);
        deliver(
            &client,
            &w.completed(&format!("evt_c1_{}", w.reference), now - 29 * DAY),
        )
        .await;
        deliver(
            &client,
            &w.subscription_event(
                &format!("evt_c2_{}", w.reference),
                "customer.subscription.created",
                now - 29 * DAY,
                &w.sub("active", 1, p),
            ),
        )
        .await;
        let mut canceling = w.sub("active", 1, p);
        canceling.cancel_at_period_end = true;
        deliver(
            &client,
            &w.subscription_event(
                &format!("evt_c3_{}", w.reference),
                "customer.subscription.updated",
                now - DAY,
                &canceling,
            ),
        )
        .await;
        assert_eq!(w.state(&client).await, (Some("active".into()), 1, true));
        assert_eq!(
            w.entitlement(&client).await,
            (true, "active, cancels at period end".into())
        );
        // The period has ended but Stripe's deletion has not arrived: no access past the end.
        client
            .execute(
                "UPDATE pay.subscriptions SET current_period_end = now() - interval '1 minute' WHERE id = $1",
                &[&w.id],
            )
            .await
            .unwrap();
        assert_eq!(
            w.entitlement(&client).await,
            (false, "canceled at period end".into())
        );
        deliver(
            &client,
            &w.subscription_event(
                &format!("evt_c4_{}", w.reference),
                "customer.subscription.deleted",
                now,
                &w.sub("canceled", 1, p),
            ),
        )
        .await;
        assert_eq!(w.entitlement(&client).await, (false, "canceled".into()));
    }
}

#[tokio::test]
async fn a_change_of_quantity_is_mirrored_and_audited() {
    let (_db, client) = setup().await;
    let w = World::begin(&client, Shape::V2025, "acct-qty").await;
    let t = unix_now() - 100;
    let p = (t, t + 30 * DAY);
    deliver(&client, &w.completed("evt_q1", t)).await;
    deliver(
        &client,
        &w.subscription_event(
            "evt_q2",
            "customer.subscription.created",
            t,
            &w.sub("active", 1, p),
        ),
    )
    .await;
    let (status, _) = deliver(
        &client,
        &w.subscription_event(
            "evt_q3",
            "customer.subscription.updated",
            t + 5,
            &w.sub("active", 7, p),
        ),
    )
    .await;
    assert_eq!(status, "applied");
    assert_eq!(w.state(&client).await, (Some("active".into()), 7, false));
    let causes: Vec<String> = client
        .query(
            "SELECT cause FROM pay.subscription_timeline('acct-qty')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        causes.iter().any(|c| c.contains("quantity 1 -> 7")),
        "{causes:?}"
    );
    // The older news of quantity 1 arriving late changes nothing.
    let (_, detail) = deliver(
        &client,
        &w.subscription_event(
            "evt_q4",
            "customer.subscription.updated",
            t + 1,
            &w.sub("active", 1, p),
        ),
    )
    .await;
    assert!(detail.contains("-> ignored (ignore:stale)"), "{detail}");
    assert_eq!(w.state(&client).await.1, 7);
}
