//! The customer on the hosted page: pay by card, by a delayed debit that settles or fails, abandon
//! or let the session expire; with the events Stripe emits, signed and delivered with the usual
//! delivery faults.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use pgpay_core::signature::{verify, Tolerance};
use reqwest::Method;
use serde_json::{json, Value};
use stripe_fake::{CheckoutPayment, Config, DeliveryOptionsPatch, StripeFake, WebhookEndpoint};

use crate::checkout::{form, session_form, SESSIONS};
use crate::helpers::{start_with, types, Api, Receiver, KEY, SECRET};

async fn with_receiver() -> (StripeFake, Api, Receiver) {
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

async fn session(api: &Api, order_ref: &str, extra: &[(&str, &str)]) -> String {
    let mut params = session_form(order_ref);
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let answer = api.post(SESSIONS, None, &form(&params)).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    answer.id()
}

fn card() -> CheckoutPayment {
    CheckoutPayment::Card("pm_card_visa".into())
}

fn object<'a>(received: &'a [crate::helpers::Received], kind: &str) -> &'a Value {
    &received
        .iter()
        .find(|r| r.json["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
        .json["data"]["object"]
}

#[tokio::test]
async fn card_payment_completes_with_stripes_events() {
    let (fake, api, receiver) = with_receiver().await;
    let id = session(&api, "o-1", &[]).await;
    let paid = api
        .control(
            Method::POST,
            &format!("/_fake/checkout/sessions/{id}/pay"),
            Some(json!({ "payment_method": "pm_card_visa" })),
        )
        .await;
    assert_eq!(paid.status, 200, "{}", paid.json);
    assert_eq!(paid.json["status"], "complete");
    assert_eq!(paid.json["payment_status"], "paid");
    assert!(paid.json["url"].is_null());
    assert_eq!(
        paid.json["customer_details"]["email"],
        "jenny.rosen@example.com"
    );
    let pi_id = paid.json["payment_intent"].as_str().expect("pi").to_owned();

    let received = receiver.wait_for(4).await;
    assert_eq!(
        types(&received),
        [
            "payment_intent.created",
            "charge.succeeded",
            "payment_intent.succeeded",
            "checkout.session.completed",
        ]
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    for delivery in &received {
        verify(
            &delivery.body,
            &delivery.signature,
            SECRET.as_bytes(),
            Tolerance::Seconds(300),
            now,
        )
        .expect("signed");
        assert!(
            delivery.json["request"]["id"].is_null(),
            "the customer, not an API call"
        );
    }
    let completed = object(&received, "checkout.session.completed");
    assert_eq!(completed["id"], id.as_str());
    assert_eq!(completed["payment_intent"], pi_id.as_str());
    assert_eq!(completed["amount_total"], 2500);
    let pi = object(&received, "payment_intent.succeeded");
    assert_eq!(pi["id"], pi_id.as_str());
    assert_eq!(pi["amount"], 2500);
    assert_eq!(pi["amount_received"], 2500);
    assert_eq!(pi["description"], "Order");
    assert_eq!(
        pi["metadata"],
        json!({ "order_ref": "o-1", "pgpay_payment_id": "pay-1" }),
        "payment_intent_data[metadata], not the session's"
    );
    let charge = object(&received, "charge.succeeded");
    assert_eq!(charge["payment_intent"], pi_id.as_str());
    assert_eq!(pi["latest_charge"], charge["id"]);

    // Done: no second payment; the PaymentIntent is the session's, not the API's to touch.
    let again = fake.pay_checkout(&id, card()).await;
    assert_eq!(again.map_err(|e| e.status), Err(400));
    for action in ["cancel", "confirm"] {
        let refused = api
            .post(&format!("/v1/payment_intents/{pi_id}/{action}"), None, &[])
            .await;
        assert_eq!(refused.status, 400, "{action}");
        assert_eq!(refused.error()["code"], "payment_intent_unexpected_state");
    }
    let refund = api
        .post("/v1/refunds", None, &[("payment_intent", &pi_id)])
        .await;
    assert_eq!(refund.status, 200, "{}", refund.json);

    let ledger = fake.ledger();
    assert_eq!(ledger.checkout_sessions.created, 1);
    assert_eq!(ledger.session_status_count("complete"), 1);
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(
        ledger.checkout_sessions.list[0].payment_intent.as_deref(),
        Some(pi_id.as_str())
    );
    assert_eq!(ledger.checkout_sessions.list[0].payment_status, "paid");
}

#[tokio::test]
async fn declined_card_keeps_the_session_open_for_another_try() {
    let (fake, api, receiver) = with_receiver().await;
    let id = session(&api, "o-1", &[]).await;
    let declined = fake
        .pay_checkout(&id, CheckoutPayment::Card("pm_card_chargeDeclined".into()))
        .await
        .expect_err("declined");
    assert_eq!(declined.status, 402);
    let open = fake.checkout_session(&id).expect("session");
    assert_eq!(open["status"], "open");
    let pi_id = open["payment_intent"].as_str().expect("pi").to_owned();
    assert_eq!(
        fake.payment_intent(&pi_id).expect("pi")["status"],
        "requires_payment_method"
    );
    let threeds = fake
        .pay_checkout(
            &id,
            CheckoutPayment::Card("pm_card_authenticationRequired".into()),
        )
        .await;
    assert_eq!(
        threeds.map_err(|e| e.status),
        Err(400),
        "3-D Secure is not modelled"
    );

    let paid = fake.pay_checkout(&id, card()).await.expect("paid");
    assert_eq!(
        paid["payment_intent"],
        pi_id.as_str(),
        "the same PaymentIntent"
    );
    let received = receiver.wait_for(6).await;
    assert_eq!(
        types(&received),
        [
            "payment_intent.created",
            "charge.failed",
            "payment_intent.payment_failed",
            "charge.succeeded",
            "payment_intent.succeeded",
            "checkout.session.completed",
        ]
    );
    assert_eq!(fake.ledger().payment_intents.created, 1);
}

#[tokio::test]
async fn delayed_payment_then_async_success() {
    let (fake, api, receiver) = with_receiver().await;
    let id = session(&api, "o-1", &[]).await;
    let completed = api
        .control(
            Method::POST,
            &format!("/_fake/checkout/sessions/{id}/pay"),
            Some(json!({ "delayed": true })),
        )
        .await;
    assert_eq!(completed.status, 200, "{}", completed.json);
    assert_eq!(completed.json["status"], "complete");
    assert_eq!(completed.json["payment_status"], "unpaid");
    let pi_id = completed.json["payment_intent"]
        .as_str()
        .expect("pi")
        .to_owned();
    let pi = fake.payment_intent(&pi_id).expect("pi");
    assert_eq!(pi["status"], "processing");
    assert_eq!(pi["payment_method_types"], json!(["us_bank_account"]));
    let received = receiver.wait_for(4).await;
    assert_eq!(
        types(&received),
        [
            "payment_intent.created",
            "charge.pending",
            "payment_intent.processing",
            "checkout.session.completed",
        ]
    );
    assert_eq!(
        object(&received, "checkout.session.completed")["payment_status"],
        "unpaid"
    );
    assert_eq!(object(&received, "charge.pending")["status"], "pending");

    let settled = api
        .control(
            Method::POST,
            &format!("/_fake/checkout/sessions/{id}/settle"),
            Some(json!({ "succeed": true })),
        )
        .await;
    assert_eq!(settled.status, 200, "{}", settled.json);
    assert_eq!(settled.json["payment_status"], "paid");
    let received = receiver.wait_for(7).await;
    assert_eq!(
        types(&received[4..]),
        [
            "charge.succeeded",
            "payment_intent.succeeded",
            "checkout.session.async_payment_succeeded",
        ]
    );
    assert_eq!(
        object(&received[4..], "checkout.session.async_payment_succeeded")["payment_status"],
        "paid"
    );
    assert_eq!(
        fake.payment_intent(&pi_id).expect("pi")["amount_received"],
        2500
    );
    let twice = fake.settle_checkout(&id, true).await;
    assert_eq!(twice.map_err(|e| e.status), Err(400));
    // A card session never settles.
    let carded = session(&api, "o-2", &[]).await;
    fake.pay_checkout(&carded, card()).await.expect("paid");
    assert!(fake.settle_checkout(&carded, true).await.is_err());
}

#[tokio::test]
async fn delayed_payment_then_async_failure() {
    let (fake, api, receiver) = with_receiver().await;
    let eur = [("line_items[0][price_data][currency]", "eur")];
    let id = session(&api, "o-1", &eur).await;
    fake.pay_checkout(&id, CheckoutPayment::Delayed)
        .await
        .expect("completed");
    let failed = fake.settle_checkout(&id, false).await.expect("settled");
    assert_eq!(failed["status"], "complete");
    assert_eq!(failed["payment_status"], "unpaid");
    let received = receiver.wait_for(7).await;
    assert_eq!(
        types(&received[4..]),
        [
            "charge.failed",
            "payment_intent.payment_failed",
            "checkout.session.async_payment_failed",
        ]
    );
    let pi = object(&received, "payment_intent.payment_failed");
    assert_eq!(pi["status"], "requires_payment_method");
    assert_eq!(pi["payment_method_types"], json!(["sepa_debit"]));
    assert_eq!(pi["last_payment_error"]["code"], "insufficient_funds");

    // No delayed method exists for gbp.
    let gbp = [("line_items[0][price_data][currency]", "gbp")];
    let id = session(&api, "o-2", &gbp).await;
    let refused = fake.pay_checkout(&id, CheckoutPayment::Delayed).await;
    assert_eq!(refused.map_err(|e| e.status), Err(400));
}

#[tokio::test]
async fn abandoned_or_past_expires_at_the_session_expires() {
    let (fake, api, receiver) = with_receiver().await;
    let abandoned = session(&api, "o-1", &[]).await;
    let answer = api
        .control(
            Method::POST,
            &format!("/_fake/checkout/sessions/{abandoned}/abandon"),
            None,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["status"], "expired");
    let received = receiver.wait_for(1).await;
    assert_eq!(types(&received), ["checkout.session.expired"]);
    assert!(received[0].json["request"]["id"].is_null());
    assert!(fake.pay_checkout(&abandoned, card()).await.is_err());

    // A session with a declined attempt: its PaymentIntent is canceled with it.
    let expires_at = (fake.now() + 1800).to_string();
    let timed = session(&api, "o-2", &[("expires_at", expires_at.as_str())]).await;
    let later = session(&api, "o-3", &[]).await;
    fake.pay_checkout(
        &timed,
        CheckoutPayment::Card("pm_card_chargeDeclined".into()),
    )
    .await
    .expect_err("declined");
    let received = receiver.wait_for(4).await;
    fake.advance_clock(1700);
    assert_eq!(fake.checkout_session(&timed).expect("s")["status"], "open");
    fake.advance_clock(200);
    let received_after = receiver.wait_for(6).await;
    assert_eq!(
        types(&received_after[received.len()..]),
        ["payment_intent.canceled", "checkout.session.expired"]
    );
    assert_eq!(
        object(&received_after[received.len()..], "payment_intent.canceled")["cancellation_reason"],
        "abandoned"
    );
    assert_eq!(fake.checkout_session(&later).expect("s")["status"], "open");
    let ledger = fake.ledger();
    assert_eq!(ledger.session_status_count("expired"), 2);
    assert_eq!(ledger.session_status_count("open"), 1);

    // Past its 24 h, the last one expires at the next API request as well as on a clock push.
    fake.advance_clock(24 * 3600);
    let listed = api.get(SESSIONS, &[("status", "expired")]).await;
    assert_eq!(listed.json["data"].as_array().map(Vec::len), Some(3));
    let unknown = api
        .control(
            Method::POST,
            "/_fake/checkout/sessions/cs_test_x/abandon",
            None,
        )
        .await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test]
async fn events_go_through_the_delivery_faults() {
    let (fake, api, receiver) = with_receiver().await;
    fake.update_webhook_options(DeliveryOptionsPatch {
        duplicate: Some(1),
        reorder_window: Some(4),
        ..DeliveryOptionsPatch::default()
    })
    .expect("options");
    fake.hold_webhooks();
    let id = session(&api, "o-1", &[]).await;
    fake.pay_checkout(&id, card()).await.expect("paid");
    assert_eq!(fake.release_webhooks(), 4);
    let received = receiver.wait_for(8).await;
    let ids: BTreeSet<&str> = received
        .iter()
        .filter_map(|r| r.json["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 4, "each event twice");
    let kinds: BTreeSet<String> = types(&received).into_iter().collect();
    assert!(kinds.contains("checkout.session.completed"));

    // Dropped deliveries are counted, and the event can be sent again.
    fake.update_webhook_options(DeliveryOptionsPatch {
        duplicate: Some(0),
        reorder_window: Some(0),
        drop_next: Some(1),
        ..DeliveryOptionsPatch::default()
    })
    .expect("options");
    let abandoned = session(&api, "o-2", &[]).await;
    fake.abandon_checkout(&abandoned).await.expect("expired");
    let expired_event = fake
        .events()
        .into_iter()
        .find(|e| e["type"] == "checkout.session.expired")
        .expect("event");
    fake.resend_event(expired_event["id"].as_str().expect("id"))
        .expect("resent");
    let received = receiver.wait_for(9).await;
    assert_eq!(received[8].json["type"], "checkout.session.expired");
    assert_eq!(fake.ledger().webhooks.dropped, 1);
}
