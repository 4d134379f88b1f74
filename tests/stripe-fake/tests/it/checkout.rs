//! `/v1/checkout/sessions`: create with Stripe's validation errors, retrieve, list, expire, and the
//! idempotency and faults every POST has.

use std::time::Duration;

use reqwest::Method;
use stripe_fake::{CheckoutPayment, FaultAction, FaultRule};

use crate::helpers::{start, Api, DEADLINE};

pub const SESSIONS: &str = "/v1/checkout/sessions";

/// A payment-mode session for one order, as pgpay's worker will send it.
pub fn session_form(order_ref: &str) -> Vec<(String, String)> {
    [
        ("mode", "payment"),
        (
            "success_url",
            "https://shop.example/done?session_id={CHECKOUT_SESSION_ID}",
        ),
        ("cancel_url", "https://shop.example/cart"),
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][price_data][unit_amount]", "1250"),
        ("line_items[0][price_data][product_data][name]", "Order"),
        ("line_items[0][quantity]", "2"),
        ("client_reference_id", order_ref),
        ("metadata[order_ref]", order_ref),
        ("payment_intent_data[metadata][order_ref]", order_ref),
        ("payment_intent_data[metadata][pgpay_payment_id]", "pay-1"),
        ("payment_intent_data[description]", "Order"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

pub fn form(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// `pairs` with `name` removed, or set to `value`.
fn with(pairs: &[(String, String)], name: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<_> = pairs.iter().filter(|(k, _)| k != name).cloned().collect();
    if let Some(value) = value {
        out.push((name.to_owned(), value.to_owned()));
    }
    out
}

#[tokio::test]
async fn create_and_retrieve_in_stripes_shape() {
    let fake = start().await;
    let api = Api::new(&fake);
    let created = api.post(SESSIONS, None, &form(&session_form("o-1"))).await;
    assert_eq!(created.status, 200, "{}", created.json);
    let s = &created.json;
    let id = created.id();
    assert!(id.starts_with("cs_test_"), "{id}");
    assert_eq!(s["object"], "checkout.session");
    assert_eq!(s["mode"], "payment");
    assert_eq!(s["status"], "open");
    assert_eq!(s["payment_status"], "unpaid");
    assert_eq!(s["amount_subtotal"], 2500);
    assert_eq!(s["amount_total"], 2500);
    assert_eq!(s["currency"], "usd");
    assert_eq!(s["client_reference_id"], "o-1");
    assert_eq!(s["metadata"]["order_ref"], "o-1");
    assert_eq!(s["metadata"].as_object().map(|m| m.len()), Some(1));
    assert!(
        s["payment_intent"].is_null(),
        "created when the customer pays"
    );
    assert_eq!(
        s["success_url"],
        "https://shop.example/done?session_id={CHECKOUT_SESSION_ID}"
    );
    assert_eq!(s["cancel_url"], "https://shop.example/cart");
    assert_eq!(
        s["expires_at"].as_i64(),
        s["created"].as_i64().map(|c| c + 24 * 3600)
    );
    assert_eq!(s["livemode"], false);
    assert!(s["customer"].is_null());
    assert_eq!(
        s["payment_method_types"],
        serde_json::json!(["card", "us_bank_account"])
    );
    assert_eq!(
        s["url"].as_str(),
        Some(format!("{}/c/pay/{id}", fake.base_url()).as_str())
    );

    let got = api.get(&format!("{SESSIONS}/{id}"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json, created.json);
    let missing = api.get(&format!("{SESSIONS}/cs_test_nope"), &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error()["code"], "resource_missing");
    // Stripe has no search endpoint for Checkout Sessions: the path reads as an unknown id.
    let search = api.get(&format!("{SESSIONS}/search"), &[]).await;
    assert_eq!(search.status, 404);

    let ledger = fake.ledger();
    assert_eq!(ledger.checkout_sessions.created, 1);
    assert_eq!(ledger.session_status_count("open"), 1);
    assert_eq!(ledger.checkout_sessions_with("order_ref", "o-1").len(), 1);
    assert_eq!(ledger.payment_intents.created, 0);
    assert_eq!(
        ledger.events.total, 0,
        "Stripe sends no event for a new session"
    );
}

#[tokio::test]
async fn validation_errors_are_stripes_and_create_nothing() {
    let fake = start().await;
    let api = Api::new(&fake);
    let good = session_form("o-1");
    let item = |rest: &str| format!("line_items[0]{rest}");
    // (parameters, the param Stripe names, the code if it sends one)
    type Case<'a> = (Vec<(String, String)>, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (with(&good, "mode", None), "mode", Some("parameter_missing")),
        (with(&good, "mode", Some("setup")), "mode", None),
        (
            with(&good, "mode", Some("subscription")),
            "line_items[0][price_data]",
            None,
        ),
        (with(&good, "mode", Some("donate")), "mode", None),
        (
            with(&good, "success_url", None),
            "success_url",
            Some("parameter_missing"),
        ),
        (
            with(&good, "success_url", Some("shop.example/done")),
            "success_url",
            Some("url_invalid"),
        ),
        (
            with(
                &good,
                "success_url",
                Some(&format!("https://a.example/{}", "x".repeat(5000))),
            ),
            "success_url",
            None,
        ),
        (
            with(&good, "cancel_url", Some("ftp://shop.example")),
            "cancel_url",
            Some("url_invalid"),
        ),
        (
            good.iter()
                .filter(|(k, _)| !k.starts_with("line_items"))
                .cloned()
                .collect(),
            "line_items",
            Some("parameter_missing"),
        ),
        (
            with(&good, &item("[quantity]"), None),
            "line_items[0][quantity]",
            Some("parameter_missing"),
        ),
        (
            with(&good, &item("[quantity]"), Some("0")),
            "line_items[0][quantity]",
            None,
        ),
        (
            with(&good, &item("[price_data][unit_amount]"), Some("-1")),
            "line_items[0][price_data][unit_amount]",
            None,
        ),
        (
            with(&good, &item("[price_data][unit_amount]"), Some("12.5")),
            "line_items[0][price_data][unit_amount]",
            Some("parameter_invalid_integer"),
        ),
        (
            with(&good, &item("[price_data][unit_amount]"), Some("0")),
            "line_items",
            None,
        ),
        (
            with(&good, &item("[price_data][unit_amount]"), Some("99999999")),
            "line_items",
            Some("amount_too_large"),
        ),
        (
            with(&good, &item("[price_data][currency]"), Some("dollars")),
            "line_items[0][price_data][currency]",
            None,
        ),
        (
            with(&good, &item("[price_data][product_data][name]"), None),
            "line_items[0][price_data][product_data]",
            Some("parameter_missing"),
        ),
        (
            with(
                &with(&good, &item("[price_data][product_data][name]"), None),
                &item("[price_data][product_data][description]"),
                Some("no name"),
            ),
            "line_items[0][price_data][product_data][name]",
            Some("parameter_missing"),
        ),
        (
            with(&good, &item("[price]"), Some("price_123")),
            "line_items[0][price]",
            None,
        ),
        (
            with(
                &with(&good, &item("[price_data][product_data][name]"), None),
                &item("[price]"),
                Some("price_123"),
            )
            .into_iter()
            .filter(|(k, _)| !k.contains("price_data"))
            .collect(),
            "line_items[0][price]",
            Some("resource_missing"),
        ),
        (
            with(
                &good,
                &item("[price_data][recurring][interval]"),
                Some("month"),
            ),
            "line_items[0][price_data]",
            None,
        ),
        (
            with(&good, &item("[colour]"), Some("red")),
            "line_items[0][colour]",
            Some("parameter_unknown"),
        ),
        (
            [
                good.clone(),
                vec![
                    ("line_items[1][price_data][currency]".into(), "eur".into()),
                    (
                        "line_items[1][price_data][unit_amount]".into(),
                        "100".into(),
                    ),
                    (
                        "line_items[1][price_data][product_data][name]".into(),
                        "Extra".into(),
                    ),
                    ("line_items[1][quantity]".into(), "1".into()),
                ],
            ]
            .concat(),
            "line_items[1][price_data][currency]",
            None,
        ),
        (
            with(&good, "payment_intent_data[capture_method]", Some("manual")),
            "payment_intent_data[capture_method]",
            None,
        ),
        (
            with(&good, "payment_intent_data[colour]", Some("red")),
            "payment_intent_data[colour]",
            Some("parameter_unknown"),
        ),
        (
            with(
                &with(&good, "customer", Some("cus_1")),
                "customer_email",
                Some("a@example.com"),
            ),
            "customer_email",
            None,
        ),
        (with(&good, "expires_at", Some("1")), "expires_at", None),
        (
            with(
                &good,
                "payment_intent_data[metadata][k]",
                Some(&"v".repeat(501)),
            ),
            "payment_intent_data[metadata][k]",
            None,
        ),
    ];
    for (params, param, code) in cases {
        let answer = api.post(SESSIONS, None, &form(&params)).await;
        assert_eq!(answer.status, 400, "{param}: {}", answer.json);
        assert_eq!(answer.error()["type"], "invalid_request_error", "{param}");
        assert_eq!(answer.error()["param"], param, "{}", answer.json);
        if let Some(code) = code {
            assert_eq!(answer.error()["code"], code, "{param}: {}", answer.json);
        }
    }
    // The same failures with a key are not stored: corrected parameters go through on that key.
    let bad = api
        .post(
            SESSIONS,
            Some("k-fix"),
            &form(&with(&good, "success_url", None)),
        )
        .await;
    assert_eq!(bad.status, 400);
    let fixed = api.post(SESSIONS, Some("k-fix"), &form(&good)).await;
    assert_eq!(fixed.status, 200, "{}", fixed.json);
    assert_eq!(fake.ledger().checkout_sessions.created, 1);

    // Indexed arrays as the SDKs send them, and an explicit list of payment method types.
    let listed = api
        .post(
            SESSIONS,
            None,
            &form(&with(&good, "payment_method_types[0]", Some("card"))),
        )
        .await;
    assert_eq!(listed.status, 200, "{}", listed.json);
    assert_eq!(
        listed.json["payment_method_types"],
        serde_json::json!(["card"])
    );
    let unavailable = api
        .post(
            SESSIONS,
            None,
            &form(&with(&good, "payment_method_types[0]", Some("sepa_debit"))),
        )
        .await;
    assert_eq!(unavailable.status, 400, "sepa_debit needs eur");
}

#[tokio::test]
async fn expires_at_bounds_and_expire_endpoint() {
    let fake = start().await;
    let api = Api::new(&fake);
    let now = fake.now();
    let soon = (now + 30 * 60 + 5).to_string();
    let created = api
        .post(
            SESSIONS,
            None,
            &form(&with(&session_form("o-1"), "expires_at", Some(&soon))),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.json);
    assert_eq!(created.json["expires_at"].as_i64(), soon.parse().ok());
    let late = (now + 25 * 3600).to_string();
    let refused = api
        .post(
            SESSIONS,
            None,
            &form(&with(&session_form("o-1"), "expires_at", Some(&late))),
        )
        .await;
    assert_eq!(refused.status, 400);

    let id = created.id();
    let path = format!("{SESSIONS}/{id}/expire");
    let expired = api.post(&path, Some("exp-1"), &[]).await;
    assert_eq!(expired.status, 200, "{}", expired.json);
    assert_eq!(expired.json["status"], "expired");
    assert!(
        expired.json["url"].is_null(),
        "no URL once the session is over"
    );
    let replayed = api.post(&path, Some("exp-1"), &[]).await;
    assert_eq!(replayed.json, expired.json);
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    let again = api.post(&path, None, &[]).await;
    assert_eq!(again.status, 400);
    assert_eq!(again.error()["type"], "invalid_request_error");
    assert!(again.error()["message"]
        .as_str()
        .is_some_and(|m| m.contains("status of expired")));
    let events = fake.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "checkout.session.expired");
    assert_eq!(events[0]["request"]["idempotency_key"], "exp-1");

    // A completed session cannot be expired either.
    let paid = api.post(SESSIONS, None, &form(&session_form("o-2"))).await;
    fake.pay_checkout(&paid.id(), CheckoutPayment::Card("pm_card_visa".into()))
        .await
        .expect("paid");
    let refused = api
        .post(&format!("{SESSIONS}/{}/expire", paid.id()), None, &[])
        .await;
    assert_eq!(refused.status, 400);
    let missing = api
        .post(&format!("{SESSIONS}/cs_test_x/expire"), None, &[])
        .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn list_newest_first_with_filters_and_cursors() {
    let fake = start().await;
    let api = Api::new(&fake);
    let (mut ids, mut created) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let answer = api
            .post(SESSIONS, None, &form(&session_form(&format!("o-{i}"))))
            .await;
        ids.push(answer.id());
        created.push(answer.json["created"].as_i64().expect("created"));
        fake.advance_clock(10);
    }
    let page = api.get(SESSIONS, &[("limit", "2")]).await;
    assert_eq!(page.status, 200, "{}", page.json);
    assert_eq!(page.json["object"], "list");
    assert_eq!(page.json["url"], SESSIONS);
    let got = |a: &crate::helpers::Answer| -> Vec<String> {
        a.json["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_owned())
            .collect()
    };
    assert_eq!(got(&page), [ids[4].clone(), ids[3].clone()]);
    assert_eq!(page.json["has_more"], true);
    let next = api
        .get(SESSIONS, &[("limit", "2"), ("starting_after", &ids[3])])
        .await;
    assert_eq!(got(&next), [ids[2].clone(), ids[1].clone()]);
    let window = api
        .get(
            SESSIONS,
            &[
                ("created[gte]", &created[1].to_string()),
                ("created[lt]", &created[3].to_string()),
            ],
        )
        .await;
    assert_eq!(got(&window), [ids[2].clone(), ids[1].clone()]);
    assert_eq!(window.json["has_more"], false);

    let paid = fake
        .pay_checkout(&ids[1], CheckoutPayment::Card("pm_card_visa".into()))
        .await
        .expect("paid");
    let pi = paid["payment_intent"].as_str().expect("pi").to_owned();
    let by_pi = api.get(SESSIONS, &[("payment_intent", &pi)]).await;
    assert_eq!(got(&by_pi), [ids[1].clone()]);
    let complete = api.get(SESSIONS, &[("status", "complete")]).await;
    assert_eq!(got(&complete), [ids[1].clone()]);
    let open = api
        .get(SESSIONS, &[("status", "open"), ("limit", "100")])
        .await;
    assert_eq!(got(&open).len(), 4);
    let bad = api.get(SESSIONS, &[("status", "paid")]).await;
    assert_eq!(bad.status, 400);
    let bad = api
        .get(SESSIONS, &[("starting_after", "cs_test_nope")])
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error()["param"], "starting_after");
    let bad = api.get(SESSIONS, &[("shipping", "x")]).await;
    assert_eq!(bad.error()["code"], "parameter_unknown");
}

#[tokio::test]
async fn idempotency_replays_conflicts_and_in_flight() {
    let fake = start().await;
    let api = Api::new(&fake);
    let params = session_form("o-1");
    let first = api.post(SESSIONS, Some("cs-key"), &form(&params)).await;
    assert_eq!(first.status, 200);
    let second = api.post(SESSIONS, Some("cs-key"), &form(&params)).await;
    assert_eq!(second.json, first.json);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    let other = api
        .post(SESSIONS, Some("cs-key"), &form(&session_form("o-2")))
        .await;
    assert_eq!(other.status, 400);
    assert_eq!(other.error()["type"], "idempotency_error");
    assert_eq!(fake.ledger().checkout_sessions.created, 1);

    // A slow first request: the racing retry with the same key is a 409, then the replay.
    fake.add_fault(
        FaultRule::new("POST", SESSIONS, FaultAction::Latency)
            .latency_ms(300)
            .times(1),
    )
    .expect("fault");
    let slow = {
        let (api, params) = (api.clone(), session_form("o-3"));
        tokio::spawn(async move { api.post(SESSIONS, Some("slow"), &form(&params)).await })
    };
    let ledger = fake
        .wait_for(DEADLINE, |l| l.idempotency.in_flight == 1)
        .await
        .expect("in flight");
    assert_eq!(ledger.idempotency.in_flight, 1);
    let racing = api
        .post(SESSIONS, Some("slow"), &form(&session_form("o-3")))
        .await;
    assert_eq!(racing.status, 409);
    assert_eq!(racing.header("stripe-should-retry"), Some("true"));
    let slow = slow.await.expect("joined");
    assert_eq!(slow.status, 200);
    let replay = api
        .post(SESSIONS, Some("slow"), &form(&session_form("o-3")))
        .await;
    assert_eq!(replay.json, slow.json);
    assert_eq!(fake.ledger().checkout_sessions.created, 2);
}

#[tokio::test]
async fn faults_apply_to_the_session_endpoints() {
    let fake = start().await;
    let api = Api::new(&fake);
    let params = session_form("o-1");

    // Lost after commit: the retry with the key gets the one session.
    fake.add_fault(FaultRule::new("POST", SESSIONS, FaultAction::DropResponseAfterCommit).times(1))
        .expect("fault");
    assert!(api
        .try_post(SESSIONS, Some("k1"), &form(&params))
        .await
        .is_err());
    let retried = api.post(SESSIONS, Some("k1"), &form(&params)).await;
    assert_eq!(retried.status, 200);
    assert_eq!(retried.header("idempotent-replayed"), Some("true"));
    assert_eq!(fake.ledger().checkout_sessions.created, 1);

    // Failed before commit, rate limited, reset: nothing is created, the key stays free.
    fake.add_fault(FaultRule::new("POST", SESSIONS, FaultAction::FailBeforeCommit).times(1))
        .expect("fault");
    let failed = api.post(SESSIONS, Some("k2"), &form(&params)).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.header("stripe-should-retry"), Some("true"));
    fake.add_fault(
        FaultRule::new("POST", SESSIONS, FaultAction::RateLimit)
            .retry_after_secs(2)
            .times(1),
    )
    .expect("fault");
    let limited = api.post(SESSIONS, Some("k2"), &form(&params)).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("2"));
    fake.add_fault(FaultRule::new("POST", SESSIONS, FaultAction::ResetConnection).times(1))
        .expect("fault");
    assert!(api
        .try_post(SESSIONS, Some("k2"), &form(&params))
        .await
        .is_err());
    assert_eq!(fake.ledger().checkout_sessions.created, 1);
    let created = api.post(SESSIONS, Some("k2"), &form(&params)).await;
    assert_eq!(created.status, 200);
    assert_eq!(created.header("idempotent-replayed"), None);

    // The wildcard reaches expire too; latency delays without changing the answer.
    fake.add_fault(
        FaultRule::new(
            "POST",
            "/v1/checkout/sessions/*/expire",
            FaultAction::Latency,
        )
        .latency_ms(50)
        .times(1),
    )
    .expect("fault");
    let started = std::time::Instant::now();
    let expired = api
        .post(&format!("{SESSIONS}/{}/expire", created.id()), None, &[])
        .await;
    assert_eq!(expired.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(50));
    fake.add_fault(
        FaultRule::new(
            "GET",
            "/v1/checkout/sessions*",
            FaultAction::FailBeforeCommit,
        )
        .times(1),
    )
    .expect("fault");
    assert_eq!(api.get(SESSIONS, &[]).await.status, 500);

    let ledger = fake.ledger();
    assert_eq!(ledger.fault_count("drop_response_after_commit"), 1);
    assert_eq!(ledger.fault_count("fail_before_commit"), 2);
    assert_eq!(ledger.fault_count("rate_limit"), 1);
    assert_eq!(ledger.fault_count("reset_connection"), 1);
    assert_eq!(ledger.fault_count("latency"), 1);
    assert_eq!(ledger.requests_to("POST /v1/checkout/sessions"), 6);
    assert_eq!(
        ledger.requests_to("POST /v1/checkout/sessions/:id/expire"),
        1
    );
    // The control endpoints answer the same way over HTTP.
    let over_http = api
        .control(Method::GET, "/_fake/ledger?lists=false", None)
        .await;
    assert_eq!(over_http.json["checkout_sessions"]["created"], 2);
}
