//! Signed webhook delivery and its misbehaviours.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use pgpay_core::signature::{verify, Tolerance};
use stripe_fake::{Config, DeliveryOptionsPatch, WebhookEndpoint};

use crate::helpers::{start, start_with, types, Api, Receiver, DEADLINE, KEY, SECRET};

fn wall_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

async fn with_receiver() -> (stripe_fake::StripeFake, Api, Receiver) {
    let receiver = Receiver::start().await;
    let fake = start_with(Config {
        api_key: KEY.into(),
        webhook: Some(WebhookEndpoint::new(receiver.url.clone(), SECRET).expect("endpoint")),
        ..Config::default()
    })
    .await;
    let api = Api::new(&fake);
    (fake, api, receiver)
}

#[tokio::test]
async fn deliveries_are_signed_and_match_the_events() {
    let (fake, api, receiver) = with_receiver().await;
    let id = api.create("2000", "o-1").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    fake.confirm(&id, "pm_card_visa").await.expect("confirmed");
    // Advancing the fake's clock must not make signatures look stale to the receiver.
    fake.advance_clock(3 * 24 * 3600);
    let received = receiver.wait_for(3).await;
    assert_eq!(
        types(&received),
        [
            "payment_intent.created",
            "charge.succeeded",
            "payment_intent.succeeded"
        ]
    );
    for delivery in &received {
        assert_eq!(delivery.content_type, "application/json");
        verify(
            &delivery.body,
            &delivery.signature,
            SECRET.as_bytes(),
            Tolerance::Seconds(300),
            wall_clock(),
        )
        .unwrap_or_else(|e| panic!("signature {}: {e}", delivery.signature));
        assert!(verify(
            &delivery.body,
            &delivery.signature,
            b"whsec_other",
            Tolerance::Off,
            0
        )
        .is_err());
        let event_id = delivery.json["id"].as_str().expect("id");
        let stored = api.get(&format!("/v1/events/{event_id}"), &[]).await;
        assert_eq!(stored.json, delivery.json);
        assert_eq!(delivery.json["pending_webhooks"], 1);
        assert_eq!(delivery.json["livemode"], false);
    }
    assert_eq!(received[2].json["data"]["object"]["status"], "succeeded");
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.ok == 3)
        .await
        .expect("counted");
    assert_eq!(ledger.webhooks.queued, 3);
    assert_eq!(ledger.webhooks.attempted, 3);
    assert_eq!(ledger.deliveries.len(), 3);
    assert!(ledger
        .deliveries
        .iter()
        .all(|d| d.status == Some(200) && d.outcome == "ok"));
}

#[tokio::test]
async fn non_2xx_answers_are_retried() {
    let (fake, api, receiver) = with_receiver().await;
    fake.update_webhook_options(DeliveryOptionsPatch {
        retry_backoff_ms: Some(1),
        ..Default::default()
    })
    .expect("valid");
    receiver.answer_next(&[500, 503]);
    api.create("100", "o-1").await;
    let received = receiver.wait_for(1).await;
    assert_eq!(types(&received), ["payment_intent.created"]);
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.ok == 1)
        .await
        .expect("delivered");
    assert_eq!(ledger.webhooks.attempted, 3);
    assert_eq!(ledger.webhooks.retried, 2);
    let statuses: Vec<Option<u16>> = ledger.deliveries.iter().map(|d| d.status).collect();
    assert_eq!(statuses, [Some(500), Some(503), Some(200)]);

    // A receiver that never says yes: the delivery fails after max_attempts.
    fake.update_webhook_options(DeliveryOptionsPatch {
        max_attempts: Some(2),
        ..Default::default()
    })
    .expect("valid");
    receiver.answer_next(&[500, 500]);
    api.create("100", "o-2").await;
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.failed == 1)
        .await
        .expect("gave up");
    assert_eq!(
        ledger.deliveries.last().map(|d| d.outcome.as_str()),
        Some("failed")
    );
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn unreachable_endpoint_counts_as_failed() {
    let fake = start().await;
    // Port 9 on loopback: nothing listens there.
    fake.set_webhook("http://127.0.0.1:9/hook", SECRET)
        .expect("endpoint");
    fake.update_webhook_options(DeliveryOptionsPatch {
        max_attempts: Some(2),
        retry_backoff_ms: Some(1),
        ..Default::default()
    })
    .expect("valid");
    Api::new(&fake).create("100", "o-1").await;
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.failed == 1)
        .await
        .expect("gave up");
    assert!(ledger
        .deliveries
        .iter()
        .all(|d| d.status.is_none() && d.error.is_some()));
}

#[tokio::test]
async fn duplicates_and_drops() {
    let (fake, api, receiver) = with_receiver().await;
    fake.update_webhook_options(DeliveryOptionsPatch {
        duplicate: Some(2),
        ..Default::default()
    })
    .expect("valid");
    api.create("100", "o-1").await;
    let received = receiver.wait_for(3).await;
    assert!(
        received
            .iter()
            .all(|r| r.json["id"] == received[0].json["id"]),
        "three copies of one event"
    );
    fake.wait_for(DEADLINE, |l| {
        l.webhooks.ok == 3 && l.webhooks.duplicated == 2
    })
    .await
    .expect("counted");

    fake.update_webhook_options(DeliveryOptionsPatch {
        duplicate: Some(0),
        drop_next: Some(1),
        ..Default::default()
    })
    .expect("valid");
    api.create("100", "o-dropped").await;
    api.create("100", "o-kept").await;
    let received = receiver.wait_for(4).await;
    assert_eq!(
        received[3].json["data"]["object"]["metadata"]["order_ref"],
        "o-kept"
    );
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.ok == 4)
        .await
        .expect("counted");
    assert_eq!(ledger.webhooks.dropped, 1);
    assert!(ledger.deliveries.iter().any(|d| d.outcome == "dropped"));

    fake.update_webhook_options(DeliveryOptionsPatch {
        drop_probability: Some(1.0),
        ..Default::default()
    })
    .expect("valid");
    for i in 0..5 {
        api.create("100", &format!("o-lost-{i}")).await;
    }
    fake.wait_for(DEADLINE, |l| l.webhooks.dropped == 6)
        .await
        .expect("all dropped");
    assert_eq!(receiver.received().len(), 4);

    // Resend delivers a recorded event again.
    fake.update_webhook_options(DeliveryOptionsPatch {
        drop_probability: Some(0.0),
        ..Default::default()
    })
    .expect("valid");
    let lost = fake.events().last().cloned().expect("an event");
    fake.resend_event(lost["id"].as_str().expect("id"))
        .expect("resent");
    let received = receiver.wait_for(5).await;
    assert_eq!(received[4].json, lost);
}

#[tokio::test]
async fn held_deliveries_are_released_reordered() {
    let (fake, api, receiver) = with_receiver().await;
    fake.hold_webhooks();
    for i in 0..12 {
        api.create("100", &format!("o-{i:02}")).await;
    }
    let ledger = fake.ledger();
    assert_eq!(ledger.webhooks.held, 12);
    assert!(receiver.received().is_empty());
    fake.update_webhook_options(DeliveryOptionsPatch {
        reorder_window: Some(12),
        ..Default::default()
    })
    .expect("valid");
    assert_eq!(fake.release_webhooks(), 12);
    let received = receiver.wait_for(12).await;
    let order: Vec<String> = received
        .iter()
        .map(|r| {
            r.json["data"]["object"]["metadata"]["order_ref"]
                .as_str()
                .expect("ref")
                .to_owned()
        })
        .collect();
    let sorted: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(sorted.len(), 12, "each event exactly once: {order:?}");
    assert_ne!(order, sorted.into_iter().collect::<Vec<_>>(), "shuffled");
    assert_eq!(fake.ledger().webhooks.held, 0);
}

#[tokio::test]
async fn delayed_deliveries_still_arrive() {
    let (fake, api, receiver) = with_receiver().await;
    fake.update_webhook_options(DeliveryOptionsPatch {
        delay_ms: Some(50),
        ..Default::default()
    })
    .expect("valid");
    api.create("100", "o-1").await;
    api.create("100", "o-2").await;
    assert_eq!(receiver.wait_for(2).await.len(), 2);
    fake.clear_webhook();
    api.create("100", "o-3").await;
    let ledger = fake.ledger();
    assert_eq!(ledger.webhooks.queued, 2, "no endpoint, nothing queued");
    assert_eq!(
        fake.events().last().map(|e| e["pending_webhooks"].clone()),
        Some(0.into())
    );
}

#[tokio::test]
async fn lost_deliveries_come_again_until_one_gets_a_2xx() {
    let (fake, api, receiver) = with_receiver().await;
    fake.update_webhook_options(DeliveryOptionsPatch {
        drop_next: Some(1),
        max_attempts: Some(2),
        retry_backoff_ms: Some(1),
        redeliver_after_ms: Some(20),
        ..Default::default()
    })
    .expect("valid");
    // Dropped once, then two attempts answered 500 (out of attempts), then a 2xx.
    receiver.answer_next(&[500, 500]);
    api.create("100", "o-1").await;
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.ok == 1)
        .await
        .expect("delivered in the end");
    assert_eq!(ledger.webhooks.dropped, 1);
    assert_eq!(ledger.webhooks.failed, 1);
    assert_eq!(ledger.webhooks.redelivered, 2);
    let event = &ledger.events.list[0];
    assert_eq!(event.kind, "payment_intent.created");
    assert_eq!(event.delivery.ok, 1);
    assert_eq!(event.delivery.lost, 2);
    assert_eq!(event.delivery.open, 0);
    assert!(event
        .object_id
        .as_deref()
        .is_some_and(|id| id.starts_with("pi_")));
    assert_eq!(
        receiver.received().len(),
        1,
        "only the 2xx counts as received"
    );

    // Once a copy got through, nothing comes again: the original fails, the duplicate gets in.
    fake.update_webhook_options(DeliveryOptionsPatch {
        duplicate: Some(1),
        max_attempts: Some(1),
        ..Default::default()
    })
    .expect("valid");
    receiver.answer_next(&[500]);
    api.create("100", "o-2").await;
    let ledger = fake
        .wait_for(DEADLINE, |l| l.webhooks.ok == 2 && l.webhooks.failed == 2)
        .await
        .expect("one copy delivered, one out of attempts");
    assert_eq!(ledger.events.list[1].delivery.ok, 1);
    // Give a wrong redelivery time to show up: it would arrive within 20 ms.
    assert!(fake
        .wait_for(std::time::Duration::from_millis(300), |l| l
            .webhooks
            .redelivered
            > 2)
        .await
        .is_err());
}
