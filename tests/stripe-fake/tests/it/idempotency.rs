//! Idempotency keys: replay, conflict, in flight, what is and is not stored, lost answers, and
//! retention on the fake's clock.

use stripe_fake::{FaultAction, FaultRule};

use crate::helpers::{start, Api, DEADLINE};

const CREATE: &str = "/v1/payment_intents";

fn order(order_ref: &str) -> Vec<(&'static str, String)> {
    vec![
        ("amount", "2000".into()),
        ("currency", "usd".into()),
        ("metadata[order_ref]", order_ref.into()),
        ("metadata[pgpay_payment_id]", format!("pay-{order_ref}")),
    ]
}

fn form<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn same_key_same_params_replays_without_side_effect() {
    let fake = start().await;
    let api = Api::new(&fake);
    let params = order("o-1");
    let first = api.post(CREATE, Some("key-1"), &form(&params)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(first.header("idempotency-key"), Some("key-1"));
    let mut reordered = params.clone();
    reordered.reverse();
    let second = api.post(CREATE, Some("key-1"), &form(&reordered)).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json, first.json, "the stored answer, byte for byte");
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        second.header("original-request"),
        first.header("request-id")
    );
    assert_ne!(second.header("request-id"), first.header("request-id"));

    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(ledger.idempotency.replays, 1);
    assert_eq!(ledger.events.total, 1, "no second payment_intent.created");
    assert_eq!(ledger.payment_intents_with("order_ref", "o-1").len(), 1);
    // The event names the key that caused it.
    assert_eq!(fake.events()[0]["request"]["idempotency_key"], "key-1");
}

#[tokio::test]
async fn same_key_other_params_or_endpoint_is_a_conflict() {
    let fake = start().await;
    let api = Api::new(&fake);
    let first = api.post(CREATE, Some("key-2"), &form(&order("o-1"))).await;
    let changed = api.post(CREATE, Some("key-2"), &form(&order("o-2"))).await;
    assert_eq!(changed.status, 400);
    assert_eq!(changed.error()["type"], "idempotency_error");
    let message = changed.error()["message"].as_str().expect("message");
    assert!(message.starts_with("Keys for idempotent requests can only be used with the same parameters they were first used with."), "{message}");
    let elsewhere = api
        .post(
            &format!("/v1/payment_intents/{}/cancel", first.id()),
            Some("key-2"),
            &[],
        )
        .await;
    assert_eq!(elsewhere.status, 400);
    assert_eq!(elsewhere.error()["type"], "idempotency_error");
    // GETs ignore the header entirely.
    let listed = api
        .http
        .get(format!("{}/v1/payment_intents", api.base))
        .bearer_auth(&api.key)
        .header("Idempotency-Key", "key-2")
        .send()
        .await
        .expect("answer");
    assert_eq!(listed.status(), 200);
    let ledger = fake.ledger();
    assert_eq!(ledger.idempotency.conflicts, 2);
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(ledger.status_count("requires_payment_method"), 1);
}

#[tokio::test]
async fn key_in_flight_is_a_retryable_409() {
    let fake = start().await;
    let api = Api::new(&fake);
    fake.add_fault(
        FaultRule::new("POST", CREATE, FaultAction::Latency)
            .latency_ms(600)
            .times(1),
    )
    .expect("valid rule");
    let params = order("o-1");
    let slow = {
        let (api, params) = (api.clone(), params.clone());
        tokio::spawn(async move { api.post(CREATE, Some("key-3"), &form(&params)).await })
    };
    fake.wait_for(DEADLINE, |l| l.idempotency.in_flight == 1)
        .await
        .expect("key taken");
    let concurrent = api.post(CREATE, Some("key-3"), &form(&params)).await;
    assert_eq!(concurrent.status, 409);
    assert_eq!(concurrent.error()["type"], "idempotency_error");
    assert_eq!(concurrent.header("stripe-should-retry"), Some("true"));
    let slow = slow.await.expect("task");
    assert_eq!(slow.status, 200);
    let later = api.post(CREATE, Some("key-3"), &form(&params)).await;
    assert_eq!(later.header("idempotent-replayed"), Some("true"));
    assert_eq!(later.json, slow.json);
    let ledger = fake.ledger();
    assert_eq!(ledger.idempotency.in_flight_409, 1);
    assert_eq!(ledger.idempotency.in_flight, 0);
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(ledger.fault_count("latency"), 1);
}

#[tokio::test]
async fn a_client_that_gives_up_does_not_stop_the_work() {
    let fake = start().await;
    let mut api = Api::new(&fake);
    fake.add_fault(
        FaultRule::new("POST", CREATE, FaultAction::Latency)
            .latency_ms(300)
            .times(1),
    )
    .expect("valid rule");
    let params = order("o-timeout");
    api.http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(50))
        .build()
        .expect("client");
    assert!(
        api.try_post(CREATE, Some("key-11"), &form(&params))
            .await
            .is_err(),
        "timed out"
    );
    api.http = reqwest::Client::new();
    // Stripe keeps going: the retry finds the key in flight, then the stored answer.
    let early = api.post(CREATE, Some("key-11"), &form(&params)).await;
    assert_eq!(early.status, 409, "{}", early.json);
    fake.wait_for(DEADLINE, |l| l.idempotency.stored_keys == 1)
        .await
        .expect("finished");
    let late = api.post(CREATE, Some("key-11"), &form(&params)).await;
    assert_eq!(late.status, 200);
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 1);
    assert_eq!(
        ledger.payment_intents_with("order_ref", "o-timeout")[0].id,
        late.id()
    );
}

#[tokio::test]
async fn server_errors_rate_limits_and_bad_params_are_not_stored() {
    let fake = start().await;
    let api = Api::new(&fake);
    let params = order("o-1");
    fake.add_fault(FaultRule::new("POST", CREATE, FaultAction::FailBeforeCommit).times(1))
        .expect("valid rule");
    let failed = api.post(CREATE, Some("key-4"), &form(&params)).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.error()["type"], "api_error");
    assert_eq!(failed.header("stripe-should-retry"), Some("true"));
    fake.add_fault(
        FaultRule::new("*", "/v1/*", FaultAction::RateLimit)
            .retry_after_secs(2)
            .times(1),
    )
    .expect("valid rule");
    let limited = api.post(CREATE, Some("key-4"), &form(&params)).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("2"));
    assert_eq!(fake.ledger().payment_intents.created, 0);

    let created = api.post(CREATE, Some("key-4"), &form(&params)).await;
    assert_eq!(
        created.status, 200,
        "a fresh attempt, not a replay of the 500"
    );
    assert_eq!(created.header("idempotent-replayed"), None);

    // Parameter validation fails before the endpoint runs: the key stays free.
    let invalid = api
        .post(
            CREATE,
            Some("key-5"),
            &[("amount", "abc"), ("currency", "usd")],
        )
        .await;
    assert_eq!(invalid.status, 400);
    let corrected = api
        .post(
            CREATE,
            Some("key-5"),
            &[("amount", "100"), ("currency", "usd")],
        )
        .await;
    assert_eq!(corrected.status, 200, "{}", corrected.json);
    assert_eq!(corrected.header("idempotent-replayed"), None);

    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 2);
    assert_eq!(ledger.idempotency.replays, 0);
    assert_eq!(ledger.idempotency.conflicts, 0);
    assert_eq!(ledger.fault_count("fail_before_commit"), 1);
    assert_eq!(ledger.fault_count("rate_limit"), 1);
}

#[tokio::test]
async fn card_errors_are_stored_and_replayed() {
    let fake = start().await;
    let api = Api::new(&fake);
    let mut params = order("o-1");
    params.push(("confirm", "true".into()));
    params.push(("payment_method", "pm_card_chargeDeclined".into()));
    let declined = api.post(CREATE, Some("key-6"), &form(&params)).await;
    assert_eq!(declined.status, 402);
    let replayed = api.post(CREATE, Some("key-6"), &form(&params)).await;
    assert_eq!(replayed.status, 402);
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(replayed.json, declined.json);
    assert_eq!(fake.ledger().payment_intents.created, 1);
}

#[tokio::test]
async fn answer_lost_after_commit_then_retry_replays_the_same_payment_intent() {
    let fake = start().await;
    let api = Api::new(&fake);
    fake.add_fault(FaultRule::new("POST", CREATE, FaultAction::DropResponseAfterCommit).times(1))
        .expect("valid rule");
    let params = order("o-lost");
    let lost = api.try_post(CREATE, Some("key-7"), &form(&params)).await;
    assert!(lost.is_err(), "no answer: {lost:?}");
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents.created, 1, "the work was done");
    assert_eq!(ledger.idempotency.stored_keys, 1, "and its answer stored");

    let retry = api.post(CREATE, Some("key-7"), &form(&params)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    let ledger = fake.ledger();
    let pis = ledger.payment_intents_with("order_ref", "o-lost");
    assert_eq!(pis.len(), 1, "one order, one PaymentIntent");
    assert_eq!(pis[0].id, retry.id());
    assert_eq!(ledger.fault_count("drop_response_after_commit"), 1);
}

#[tokio::test]
async fn reset_connection_does_nothing() {
    let fake = start().await;
    let api = Api::new(&fake);
    fake.add_fault(
        FaultRule::new("*", "/v1/payment_intents*", FaultAction::ResetConnection).times(1),
    )
    .expect("valid rule");
    let params = order("o-reset");
    assert!(api
        .try_post(CREATE, Some("key-8"), &form(&params))
        .await
        .is_err());
    assert_eq!(fake.ledger().payment_intents.created, 0);
    let retry = api.post(CREATE, Some("key-8"), &form(&params)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(
        retry.header("idempotent-replayed"),
        None,
        "nothing was stored"
    );
    assert_eq!(fake.ledger().payment_intents.created, 1);
}

#[tokio::test]
async fn keys_are_forgotten_after_retention() {
    let fake = start().await;
    let api = Api::new(&fake);
    let params = order("o-old");
    let first = api.post(CREATE, Some("key-9"), &form(&params)).await;
    fake.advance_clock(24 * 3600 - 1);
    let within = api.post(CREATE, Some("key-9"), &form(&params)).await;
    assert_eq!(within.header("idempotent-replayed"), Some("true"));
    assert_eq!(within.id(), first.id());
    fake.advance_clock(1);
    let after = api.post(CREATE, Some("key-9"), &form(&params)).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.header("idempotent-replayed"), None);
    assert_ne!(
        after.id(),
        first.id(),
        "past retention the key is new: a second PaymentIntent"
    );
    assert_eq!(after.json["created"].as_i64(), Some(fake.now()));
    let ledger = fake.ledger();
    assert_eq!(ledger.payment_intents_with("order_ref", "o-old").len(), 2);
    assert_eq!(ledger.clock_offset_secs, 24 * 3600);

    // A shorter retention applies to keys already stored.
    fake.set_idempotency_retention(60);
    let short = api
        .post(CREATE, Some("key-10"), &form(&order("o-short")))
        .await;
    fake.advance_clock(60);
    let renewed = api
        .post(CREATE, Some("key-10"), &form(&order("o-short")))
        .await;
    assert_ne!(renewed.id(), short.id());
}

#[tokio::test]
async fn long_and_odd_keys() {
    let fake = start().await;
    let api = Api::new(&fake);
    let long = "k".repeat(256);
    let refused = api.post(CREATE, Some(&long), &form(&order("o-1"))).await;
    assert_eq!(refused.status, 400);
    let max = "k".repeat(255);
    assert_eq!(
        api.post(CREATE, Some(&max), &form(&order("o-1")))
            .await
            .status,
        200
    );
    assert_eq!(fake.ledger().payment_intents.created, 1);
}
