//! The PaymentIntent lifecycle, refunds and validation, as a Stripe client sees them.

use serde_json::Value;

use crate::helpers::{start, Api};

#[tokio::test]
async fn authentication_is_required() {
    let fake = start().await;
    let mut api = Api::new(&fake);
    let anonymous = api
        .http
        .get(format!("{}/v1/payment_intents", api.base))
        .send()
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("request-id"));

    api.key = "sk_test_wrong_key_1234".into();
    let wrong = api.get("/v1/payment_intents", &[]).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.error()["type"], "invalid_request_error");
    let message = wrong.error()["message"].as_str().expect("message");
    assert!(message.contains("sk_test_****1234"), "{message}");
    assert!(
        !message.contains("wrong_key"),
        "the key is redacted: {message}"
    );
    assert_eq!(fake.ledger().requests_to("GET /v1/payment_intents"), 0);
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_param() {
    let fake = start().await;
    let api = Api::new(&fake);
    let long_key = format!("metadata[{}]", "k".repeat(41));
    let long_value = "v".repeat(501);
    // (form, the param the error must name, the code if Stripe gives one)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec![("currency", "usd")],
            "amount",
            Some("parameter_missing"),
        ),
        (
            vec![("amount", "100")],
            "currency",
            Some("parameter_missing"),
        ),
        (
            vec![("amount", "0"), ("currency", "usd")],
            "amount",
            Some("parameter_invalid_integer"),
        ),
        (
            vec![("amount", "-5"), ("currency", "usd")],
            "amount",
            Some("parameter_invalid_integer"),
        ),
        (
            vec![("amount", "100000000"), ("currency", "usd")],
            "amount",
            Some("amount_too_large"),
        ),
        (
            vec![("amount", "12.5"), ("currency", "usd")],
            "amount",
            Some("parameter_invalid_integer"),
        ),
        (
            vec![
                ("amount", "340282366920938463463374607431768211456"),
                ("currency", "usd"),
            ],
            "amount",
            Some("parameter_invalid_integer"),
        ),
        (
            vec![("amount", "100"), ("currency", "zz")],
            "currency",
            None,
        ),
        (
            vec![
                ("amount", "100"),
                ("currency", "usd"),
                (long_key.as_str(), "v"),
            ],
            long_key.as_str(),
            None,
        ),
        (
            vec![
                ("amount", "100"),
                ("currency", "usd"),
                ("metadata[k]", long_value.as_str()),
            ],
            "metadata[k]",
            None,
        ),
        (
            vec![
                ("amount", "100"),
                ("currency", "usd"),
                ("metadata[a][b]", "v"),
            ],
            "metadata[a]",
            None,
        ),
        (
            vec![("amount", "100"), ("currency", "usd"), ("colour", "blue")],
            "colour",
            Some("parameter_unknown"),
        ),
        (
            vec![("amount", "100"), ("currency", "usd"), ("confirm", "yes")],
            "confirm",
            None,
        ),
        (
            vec![
                ("amount", "100"),
                ("currency", "usd"),
                ("payment_method", "pm_nope"),
            ],
            "payment_method",
            Some("resource_missing"),
        ),
        (
            vec![("amount", "100"), ("currency", "usd"), ("amount[x]", "1")],
            "amount[x]",
            None,
        ),
        (
            vec![("amount", "100"), ("currency", "usd"), ("a[b", "1")],
            "a[b",
            None,
        ),
    ];
    for (form, param, code) in cases {
        let answer = api.post("/v1/payment_intents", None, &form).await;
        assert_eq!(answer.status, 400, "{form:?}: {}", answer.json);
        assert_eq!(answer.error()["type"], "invalid_request_error", "{form:?}");
        assert_eq!(answer.error()["param"], param, "{form:?}: {}", answer.json);
        if let Some(code) = code {
            assert_eq!(answer.error()["code"], code, "{form:?}");
        }
    }
    // A JSON body is not Stripe's encoding.
    let json = api
        .http
        .post(format!("{}/v1/payment_intents", api.base))
        .bearer_auth(&api.key)
        .header("Content-Type", "application/json")
        .body(r#"{"amount":100}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(json.status(), 400);
    // Raw bytes that are not UTF-8.
    let raw = api
        .http
        .post(format!("{}/v1/payment_intents", api.base))
        .bearer_auth(&api.key)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(b"amount=1&currency=%FF%FE".to_vec())
        .send()
        .await
        .expect("answer");
    assert_eq!(raw.status(), 400);
    let unknown = api.get("/v1/payouts", &[]).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(fake.ledger().payment_intents.created, 0);
}

#[tokio::test]
async fn create_confirm_succeed_and_refund() {
    let fake = start().await;
    let api = Api::new(&fake);
    let created = api
        .post(
            "/v1/payment_intents",
            None,
            &[
                ("amount", "2000"),
                ("currency", "USD"),
                ("description", "Order o-1"),
                ("customer", "cus_123"),
                ("metadata[order_ref]", "o-1"),
                ("expand[]", "latest_charge"),
            ],
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.json);
    let pi = created.json.clone();
    let id = created.id();
    assert!(id.starts_with("pi_"));
    assert_eq!(pi["object"], "payment_intent");
    assert_eq!(pi["status"], "requires_payment_method");
    assert_eq!(pi["currency"], "usd");
    assert_eq!(pi["amount"], 2000);
    assert_eq!(pi["amount_received"], 0);
    assert_eq!(pi["livemode"], false);
    assert_eq!(pi["metadata"]["order_ref"], "o-1");
    assert_eq!(pi["customer"], "cus_123");
    assert!(pi["client_secret"]
        .as_str()
        .expect("secret")
        .starts_with(&format!("{id}_secret_")));
    assert!(created
        .header("request-id")
        .expect("request id")
        .starts_with("req_"));

    let confirmed = api
        .post(
            &format!("/v1/payment_intents/{id}/confirm"),
            None,
            &[("payment_method", "pm_card_visa")],
        )
        .await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.json);
    assert_eq!(confirmed.json["status"], "succeeded");
    assert_eq!(confirmed.json["amount_received"], 2000);
    let charge_id = confirmed.json["latest_charge"]
        .as_str()
        .expect("charge")
        .to_owned();
    assert!(charge_id.starts_with("ch_"));
    let fetched = api.get(&format!("/v1/payment_intents/{id}"), &[]).await;
    assert_eq!(fetched.json, confirmed.json);

    let cancel = api
        .post(&format!("/v1/payment_intents/{id}/cancel"), None, &[])
        .await;
    assert_eq!(cancel.status, 400);
    assert_eq!(cancel.error()["code"], "payment_intent_unexpected_state");
    let reprice = api
        .post(
            &format!("/v1/payment_intents/{id}"),
            None,
            &[("amount", "5")],
        )
        .await;
    assert_eq!(reprice.status, 400);
    assert_eq!(reprice.error()["code"], "payment_intent_unexpected_state");
    // Metadata may still change, as on Stripe.
    let tagged = api
        .post(
            &format!("/v1/payment_intents/{id}"),
            None,
            &[("metadata[shipped]", "yes")],
        )
        .await;
    assert_eq!(tagged.json["metadata"]["shipped"], "yes");
    assert_eq!(tagged.json["metadata"]["order_ref"], "o-1");

    let partial = api
        .post(
            "/v1/refunds",
            None,
            &[
                ("payment_intent", &id),
                ("amount", "500"),
                ("reason", "requested_by_customer"),
            ],
        )
        .await;
    assert_eq!(partial.status, 200, "{}", partial.json);
    assert!(partial.id().starts_with("re_"));
    assert_eq!(partial.json["charge"], charge_id.as_str());
    assert_eq!(partial.json["status"], "succeeded");
    let too_much = api
        .post(
            "/v1/refunds",
            None,
            &[("payment_intent", &id), ("amount", "1600")],
        )
        .await;
    assert_eq!(too_much.status, 400);
    assert_eq!(too_much.error()["code"], "amount_too_large");
    assert_eq!(too_much.error()["param"], "amount");
    let rest = api
        .post("/v1/refunds", None, &[("payment_intent", &id)])
        .await;
    assert_eq!(rest.json["amount"], 1500);
    let again = api
        .post("/v1/refunds", None, &[("charge", &charge_id)])
        .await;
    assert_eq!(again.error()["code"], "charge_already_refunded");
    let charge = api.get(&format!("/v1/charges/{charge_id}"), &[]).await;
    assert_eq!(charge.json["amount_refunded"], 2000);
    assert_eq!(charge.json["refunded"], true);

    let events = api.get("/v1/events", &[("limit", "100")]).await;
    let kinds: Vec<&str> = events.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .rev()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        kinds,
        [
            "payment_intent.created",
            "charge.succeeded",
            "payment_intent.succeeded",
            "charge.refunded",
            "refund.created",
            "charge.refunded",
            "refund.created",
        ]
    );
    let last_charge_refunded = events.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|e| e["type"] == "charge.refunded")
        .expect("charge.refunded");
    let object = &last_charge_refunded["data"]["object"];
    assert_eq!(object["payment_intent"], id.as_str());
    assert_eq!(
        (
            object["amount"].clone(),
            object["amount_refunded"].clone(),
            object["refunded"].clone()
        ),
        (2000.into(), 2000.into(), true.into())
    );

    let ledger = fake.ledger();
    assert_eq!(ledger.status_count("succeeded"), 1);
    assert_eq!(ledger.refunds.count, 2);
    assert_eq!(ledger.refunds.amount, 2000);
    assert_eq!(ledger.charges, 1);
    assert_eq!(ledger.requests_to("POST /v1/refunds"), 4);
}

#[tokio::test]
async fn declines_and_three_d_secure() {
    let fake = start().await;
    let api = Api::new(&fake);
    let id = api.create("1500", "o-2").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let declined = api
        .post(
            &format!("/v1/payment_intents/{id}/confirm"),
            None,
            &[("payment_method", "pm_card_chargeDeclined")],
        )
        .await;
    assert_eq!(declined.status, 402);
    assert_eq!(declined.error()["type"], "card_error");
    assert_eq!(declined.error()["code"], "card_declined");
    assert_eq!(declined.error()["decline_code"], "generic_decline");
    let pi = &declined.error()["payment_intent"];
    assert_eq!(pi["status"], "requires_payment_method");
    assert_eq!(pi["last_payment_error"]["code"], "card_declined");

    let action = fake
        .confirm(&id, "pm_card_authenticationRequired")
        .await
        .expect("requires action");
    assert_eq!(action["status"], "requires_action");
    assert_eq!(action["next_action"]["type"], "use_stripe_sdk");
    let done = fake.authenticate(&id, true).await.expect("authenticated");
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["last_payment_error"], Value::Null);
    let again = fake
        .confirm(&id, "pm_card_visa")
        .await
        .expect_err("already succeeded");
    assert_eq!(again.code, Some("payment_intent_unexpected_state"));

    // confirm=true at creation.
    let direct = api
        .post(
            "/v1/payment_intents",
            None,
            &[
                ("amount", "700"),
                ("currency", "eur"),
                ("confirm", "true"),
                ("payment_method", "pm_card_visa"),
            ],
        )
        .await;
    assert_eq!(direct.json["status"], "succeeded");

    let kinds: Vec<String> = fake
        .events()
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .collect();
    for kind in [
        "charge.failed",
        "payment_intent.payment_failed",
        "payment_intent.requires_action",
        "payment_intent.succeeded",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    let failed = fake
        .events()
        .into_iter()
        .find(|e| e["type"] == "payment_intent.payment_failed")
        .expect("payment_failed");
    assert_eq!(
        failed["data"]["object"]["last_payment_error"]["decline_code"],
        "generic_decline"
    );
    assert_eq!(
        failed["request"]["id"]
            .as_str()
            .map(|r| r.starts_with("req_")),
        Some(true)
    );
}

#[tokio::test]
async fn cancel_and_update() {
    let fake = start().await;
    let api = Api::new(&fake);
    let id = api.create("900", "o-3").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let updated = api
        .post(
            &format!("/v1/payment_intents/{id}"),
            None,
            &[
                ("amount", "950"),
                ("description", "new"),
                ("metadata[order_ref]", ""),
                ("metadata[x]", "1"),
            ],
        )
        .await;
    assert_eq!(updated.status, 200, "{}", updated.json);
    assert_eq!(updated.json["amount"], 950);
    assert_eq!(updated.json["description"], "new");
    assert_eq!(updated.json["metadata"], serde_json::json!({ "x": "1" }));

    let bad_reason = api
        .post(
            &format!("/v1/payment_intents/{id}/cancel"),
            None,
            &[("cancellation_reason", "bored")],
        )
        .await;
    assert_eq!(bad_reason.error()["param"], "cancellation_reason");
    let canceled = api
        .post(
            &format!("/v1/payment_intents/{id}/cancel"),
            None,
            &[("cancellation_reason", "abandoned")],
        )
        .await;
    assert_eq!(canceled.json["status"], "canceled");
    assert_eq!(canceled.json["cancellation_reason"], "abandoned");
    assert_eq!(canceled.json["canceled_at"], fake.now());
    let twice = api
        .post(&format!("/v1/payment_intents/{id}/cancel"), None, &[])
        .await;
    assert_eq!(twice.status, 400);
    assert_eq!(twice.error()["code"], "payment_intent_unexpected_state");
    let refund = api
        .post("/v1/refunds", None, &[("payment_intent", &id)])
        .await;
    assert_eq!(refund.status, 400);
    let missing = api.get("/v1/payment_intents/pi_missing", &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error()["code"], "resource_missing");
    assert_eq!(
        fake.ledger().events.by_type.get("payment_intent.canceled"),
        Some(&1)
    );
}

#[tokio::test]
async fn emulated_rate_limit() {
    let fake = start().await;
    let api = Api::new(&fake);
    fake.set_rate_limit(Some(3));
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let answer = api.get("/v1/payment_intents", &[]).await;
        if answer.status == 429 {
            assert_eq!(answer.header("retry-after"), Some("1"));
            assert_eq!(answer.error()["code"], "rate_limit");
        }
        statuses.push(answer.status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    // Three per one-second window; the requests span at most this many windows.
    let windows = started.elapsed().as_secs() + 2;
    assert!(admitted >= 3 && admitted <= 3 * windows, "{statuses:?}");
    assert_eq!(fake.ledger().rate_limited, 10 - admitted);
    fake.set_rate_limit(None);
    assert_eq!(api.get("/v1/payment_intents", &[]).await.status, 200);
}
