//! Subscriptions over HTTP: prices, a subscription-mode Checkout Session paid on a test clock,
//! renewals that succeed, fail and recover, retries running out, cancellation at period end and
//! now, changes of quantity and price, lists, both API shapes, and idempotency and faults on the
//! new routes.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{json, Value};
use stripe_fake::{AfterRetries, BillingSettings, FaultAction, FaultRule, StripeFake};

use crate::helpers::{start, Api};

const DAY: i64 = 86_400;
const H: &str = "2024-06-20";
const BASIL: &str = "2025-03-31.basil";

/// A monthly price of 1500 for "Pro seat".
async fn price(api: &Api) -> String {
    let answer = api
        .post(
            "/v1/prices",
            None,
            &[
                ("currency", "usd"),
                ("unit_amount", "1500"),
                ("recurring[interval]", "month"),
                ("product_data[name]", "Pro seat"),
            ],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["type"], "recurring");
    assert_eq!(answer.json["recurring"]["interval"], "month");
    answer.id()
}

async fn clock(api: &Api, at: i64) -> String {
    let answer = api
        .post(
            "/v1/test_helpers/test_clocks",
            None,
            &[("frozen_time", &at.to_string())],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["object"], "test_helpers.test_clock");
    answer.id()
}

async fn session(api: &Api, price: &str, quantity: &str, reference: &str) -> Value {
    let answer = api
        .post(
            "/v1/checkout/sessions",
            Some(&format!("sub-session-{reference}")),
            &[
                ("mode", "subscription"),
                ("success_url", "https://app.example/ok"),
                ("line_items[0][price]", price),
                ("line_items[0][quantity]", quantity),
                ("client_reference_id", reference),
                (
                    "metadata[pgpay_subscription_id]",
                    "0b5d7b0e-3f3c-4a51-8a4e-7f0a7f1d2c3b",
                ),
                ("metadata[subscription_ref]", reference),
                (
                    "subscription_data[metadata][pgpay_subscription_id]",
                    "0b5d7b0e-3f3c-4a51-8a4e-7f0a7f1d2c3b",
                ),
                ("subscription_data[metadata][subscription_ref]", reference),
            ],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    answer.json
}

async fn advance(api: &Api, clock: &str, to: i64) {
    let answer = api
        .post(
            &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
            None,
            &[("frozen_time", &to.to_string())],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["status"], "advancing");
    let now = api
        .get(&format!("/v1/test_helpers/test_clocks/{clock}"), &[])
        .await;
    assert_eq!(now.json["status"], "ready");
    assert_eq!(now.json["frozen_time"], to);
}

/// The ids of every event so far.
fn mark(fake: &StripeFake) -> HashSet<String> {
    fake.events()
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

/// The events recorded since `before`, in the order they were emitted (the event list is in
/// `created` order, and a recovery's events are created a second later than a failure's).
fn events_since(fake: &StripeFake, before: &HashSet<String>) -> Vec<Value> {
    fake.events_emitted()
        .into_iter()
        .filter(|e| !before.contains(e["id"].as_str().unwrap_or_default()))
        .filter(|e| {
            !e["type"]
                .as_str()
                .unwrap_or_default()
                .starts_with("test_helpers.")
        })
        .collect()
}

fn types_since(fake: &StripeFake, before: &HashSet<String>) -> Vec<String> {
    events_since(fake, before)
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn set_card(api: &Api, customer: &str, pm: &str) {
    let answer = api
        .post(
            &format!("/v1/customers/{customer}"),
            None,
            &[("invoice_settings[default_payment_method]", pm)],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(
        answer.json["invoice_settings"]["default_payment_method"],
        pm
    );
}

/// Signs up on a fresh test clock; returns (clock, start time, subscription id, customer id).
async fn sign_up(fake: &StripeFake, api: &Api, quantity: &str) -> (String, i64, String, String) {
    let price = price(api).await;
    let t0 = fake.now();
    let clock = clock(api, t0).await;
    let s = session(api, &price, quantity, "acct-1").await;
    assert_eq!(s["mode"], "subscription");
    assert_eq!(s["status"], "open");
    assert!(s["subscription"].is_null());
    assert_eq!(
        s["amount_total"],
        1500 * quantity.parse::<i64>().expect("n")
    );
    let paid = api
        .control(
            Method::POST,
            &format!(
                "/_fake/checkout/sessions/{}/pay",
                s["id"].as_str().expect("id")
            ),
            Some(json!({ "payment_method": "pm_card_visa", "test_clock": clock })),
        )
        .await;
    assert_eq!(paid.status, 200, "{}", paid.json);
    let sub = paid.json["subscription"]
        .as_str()
        .expect("a subscription")
        .to_owned();
    let customer = paid.json["customer"]
        .as_str()
        .expect("a customer")
        .to_owned();
    (clock, t0, sub, customer)
}

#[tokio::test]
async fn sign_up_renew_fail_recover_and_cancel_at_period_end() {
    let fake = start().await;
    let api = Api::new(&fake);
    let (clock, t0, sub_id, customer) = sign_up(&fake, &api, "2").await;
    assert_eq!(
        types_since(&fake, &HashSet::new()),
        [
            "product.created",
            "price.created",
            "customer.created",
            "customer.subscription.created",
            "invoice.created",
            "invoice.finalized",
            "invoice.paid",
            "invoice.payment_succeeded",
            "customer.subscription.updated",
            "checkout.session.completed",
        ]
    );
    let events = fake.events();
    let created = events
        .iter()
        .find(|e| e["type"] == "customer.subscription.created")
        .expect("created");
    assert_eq!(created["data"]["object"]["status"], "incomplete");
    assert_eq!(created["api_version"], H);
    let completed = events.last().expect("completed");
    assert_eq!(completed["data"]["object"]["subscription"], sub_id.as_str());
    assert!(completed["data"]["object"]["invoice"].as_str().is_some());
    let sub = api
        .get(&format!("/v1/subscriptions/{sub_id}"), &[])
        .await
        .json;
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["quantity"], 2);
    assert_eq!(sub["metadata"]["subscription_ref"], "acct-1");
    assert_eq!(sub["test_clock"], clock.as_str());
    assert_eq!(sub["current_period_start"], t0);
    let end1 = sub["current_period_end"].as_i64().expect("period end");
    assert!(end1 >= t0 + 28 * DAY && end1 <= t0 + 31 * DAY, "{end1}");
    let sessions = api
        .get("/v1/checkout/sessions", &[("subscription", &sub_id)])
        .await
        .json;
    assert_eq!(sessions["data"].as_array().expect("list").len(), 1);
    assert_eq!(sessions["data"][0]["status"], "complete");
    let first = api
        .get("/v1/invoices", &[("subscription", &sub_id)])
        .await
        .json;
    assert_eq!(first["data"][0]["billing_reason"], "subscription_create");
    assert_eq!(first["data"][0]["amount_paid"], 3000);
    assert_eq!(
        first["data"][0]["subscription_details"]["metadata"]["subscription_ref"],
        "acct-1"
    );

    // Renewal 1 succeeds: the period moves at period end, the draft is charged an hour later.
    let before = mark(&fake);
    advance(&api, &clock, end1 + 2 * 3600).await;
    assert_eq!(
        types_since(&fake, &before),
        [
            "customer.subscription.updated",
            "invoice.created",
            "invoice.finalized",
            "invoice.paid",
            "invoice.payment_succeeded",
        ]
    );
    let update = events_since(&fake, &before)
        .into_iter()
        .find(|e| e["type"] == "customer.subscription.updated")
        .expect("update");
    assert_eq!(
        update["data"]["previous_attributes"]["current_period_end"],
        end1
    );
    assert_eq!(update["data"]["object"]["current_period_start"], end1);
    assert!(
        update["request"]["id"].is_null(),
        "a renewal is Stripe's own doing"
    );
    let renewal = api
        .get(
            "/v1/invoices",
            &[("subscription", &sub_id), ("status", "paid")],
        )
        .await
        .json;
    assert_eq!(renewal["data"].as_array().expect("list").len(), 2);
    assert_eq!(renewal["data"][0]["billing_reason"], "subscription_cycle");
    assert_eq!(
        renewal["data"][0]["lines"]["data"][0]["period"]["start"],
        end1
    );

    // Renewal 2 fails, the subscription goes past_due; a good card pays at the next retry.
    set_card(&api, &customer, "pm_card_chargeCustomerFail").await;
    let end2 = api
        .get(&format!("/v1/subscriptions/{sub_id}"), &[])
        .await
        .json["current_period_end"]
        .as_i64()
        .expect("end");
    let before = mark(&fake);
    advance(&api, &clock, end2 + 2 * 3600).await;
    assert_eq!(
        types_since(&fake, &before),
        [
            "customer.subscription.updated",
            "invoice.created",
            "invoice.finalized",
            "invoice.payment_failed",
            "customer.subscription.updated",
        ]
    );
    let sub = api
        .get(&format!("/v1/subscriptions/{sub_id}"), &[])
        .await
        .json;
    assert_eq!(sub["status"], "past_due");
    let failed = api
        .get(
            "/v1/invoices",
            &[("subscription", &sub_id), ("status", "open")],
        )
        .await
        .json;
    let failed = &failed["data"][0];
    assert_eq!(failed["attempt_count"], 1);
    assert_eq!(failed["next_payment_attempt"], end2 + 3600 + 3 * DAY);
    let before = mark(&fake);
    set_card(&api, &customer, "pm_card_visa").await;
    advance(&api, &clock, end2 + 3600 + 3 * DAY + 60).await;
    assert_eq!(
        types_since(&fake, &before),
        [
            "customer.updated",
            "invoice.paid",
            "invoice.payment_succeeded",
            "customer.subscription.updated",
        ]
    );
    let sub = api
        .get(&format!("/v1/subscriptions/{sub_id}"), &[])
        .await
        .json;
    assert_eq!(sub["status"], "active");
    let paid = api
        .get(
            &format!("/v1/invoices/{}", failed["id"].as_str().expect("id")),
            &[],
        )
        .await
        .json;
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["attempt_count"], 2);

    // Cancel at period end: an update now, the deletion at the period end, nothing after.
    let before = mark(&fake);
    let answer = api
        .post(
            &format!("/v1/subscriptions/{sub_id}"),
            Some("cancel-1"),
            &[("cancel_at_period_end", "true")],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["cancel_at_period_end"], true);
    let end3 = answer.json["current_period_end"].as_i64().expect("end");
    assert_eq!(answer.json["cancel_at"], end3);
    advance(&api, &clock, end3 + 40 * DAY).await;
    assert_eq!(
        types_since(&fake, &before),
        [
            "customer.subscription.updated",
            "customer.subscription.deleted"
        ]
    );
    let sub = api
        .get(&format!("/v1/subscriptions/{sub_id}"), &[])
        .await
        .json;
    assert_eq!(sub["status"], "canceled");
    assert_eq!(sub["ended_at"], end3);
    assert_eq!(
        sub["cancellation_details"]["reason"],
        "cancellation_requested"
    );
    let ledger = fake.ledger();
    assert_eq!(ledger.subscriptions.created, 1);
    assert_eq!(ledger.invoices.created, 3);
    assert_eq!(ledger.invoices.by_status.get("paid"), Some(&3));
}

#[tokio::test]
async fn retries_run_out_then_canceled_or_unpaid() {
    for (after, expect_status, last_event) in [
        (
            AfterRetries::Canceled,
            "canceled",
            "customer.subscription.deleted",
        ),
        (
            AfterRetries::Unpaid,
            "unpaid",
            "customer.subscription.updated",
        ),
    ] {
        let fake = start().await;
        let api = Api::new(&fake);
        fake.set_billing(BillingSettings {
            retry_days: vec![1, 2],
            after_retries: after,
            mark_uncollectible: true,
        })
        .expect("settings");
        let (clock, _, sub_id, customer) = sign_up(&fake, &api, "1").await;
        set_card(&api, &customer, "pm_card_chargeCustomerFail").await;
        let end = api
            .get(&format!("/v1/subscriptions/{sub_id}"), &[])
            .await
            .json["current_period_end"]
            .as_i64()
            .expect("end");
        let before = mark(&fake);
        advance(&api, &clock, end + 3600 + 3 * DAY + 60).await;
        let types = types_since(&fake, &before);
        assert_eq!(
            types
                .iter()
                .filter(|t| *t == "invoice.payment_failed")
                .count(),
            3,
            "{types:?}"
        );
        assert_eq!(
            types[types.len() - 2],
            "invoice.marked_uncollectible",
            "{types:?}"
        );
        assert_eq!(
            types.last().map(String::as_str),
            Some(last_event),
            "{types:?}"
        );
        let sub = api
            .get(&format!("/v1/subscriptions/{sub_id}"), &[])
            .await
            .json;
        assert_eq!(sub["status"], expect_status);
        let invoice = api
            .get(
                "/v1/invoices",
                &[("subscription", &sub_id), ("status", "uncollectible")],
            )
            .await
            .json;
        assert_eq!(invoice["data"][0]["attempt_count"], 3);
        assert!(invoice["data"][0]["next_payment_attempt"].is_null());
    }
}

#[tokio::test]
async fn quantity_change_cancel_now_and_idempotency() {
    let fake = start().await;
    let api = Api::new(&fake);
    let (_clock, _, sub_id, _) = sign_up(&fake, &api, "1").await;
    let sub = api
        .get(&format!("/v1/subscriptions/{sub_id}"), &[])
        .await
        .json;
    let item = sub["items"]["data"][0]["id"]
        .as_str()
        .expect("item")
        .to_owned();
    let price = sub["items"]["data"][0]["price"]["id"]
        .as_str()
        .expect("price")
        .to_owned();
    let path = format!("/v1/subscriptions/{sub_id}");
    let form = [
        ("items[0][id]", item.as_str()),
        ("items[0][price]", price.as_str()),
        ("items[0][quantity]", "5"),
    ];
    let before = mark(&fake);
    let first = api.post(&path, Some("qty-5"), &form).await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.json["quantity"], 5);
    assert_eq!(first.json["items"]["data"][0]["quantity"], 5);
    let again = api.post(&path, Some("qty-5"), &form).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json, first.json);
    // The same change under a new key changes nothing, so Stripe emits nothing.
    let same = api.post(&path, Some("qty-5-b"), &form).await;
    assert_eq!(same.status, 200);
    let updates = types_since(&fake, &before);
    assert_eq!(updates, ["customer.subscription.updated"]);
    let update = fake.events().last().expect("event").clone();
    assert_eq!(update["data"]["previous_attributes"]["quantity"], 1);
    // Errors name the parameter.
    let bad = api
        .post(
            &path,
            None,
            &[("items[0][id]", "si_nope"), ("items[0][quantity]", "2")],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error()["param"], "items[0][id]");
    let bad = api
        .post(
            &path,
            None,
            &[("items[0][id]", item.as_str()), ("items[0][quantity]", "0")],
        )
        .await;
    assert_eq!(bad.error()["param"], "items[0][quantity]");
    let bad = api.post(&path, None, &[("bogus", "1")]).await;
    assert_eq!(bad.error()["param"], "bogus");

    // DELETE cancels now; a second DELETE answers the same canceled subscription, no event.
    let gone = api.delete(&path, Some("cancel-now")).await;
    assert_eq!(gone.status, 200, "{}", gone.json);
    assert_eq!(gone.json["status"], "canceled");
    let n = fake.events().len();
    let again = api.delete(&path, Some("cancel-now")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json["status"], "canceled");
    assert_eq!(fake.events().len(), n);
    assert_eq!(
        fake.events().last().expect("event")["type"],
        "customer.subscription.deleted"
    );
    let refused = api
        .post(&path, None, &[("cancel_at_period_end", "true")])
        .await;
    assert_eq!(refused.status, 400, "{}", refused.json);
    assert!(api.delete("/v1/subscriptions/sub_nope", None).await.status == 404);
}

#[tokio::test]
async fn lists_filter_like_stripes() {
    let fake = start().await;
    let api = Api::new(&fake);
    let (clock, _, sub_id, customer) = sign_up(&fake, &api, "1").await;
    // Subscriptions on test clocks are left out unless the clock or the customer is named.
    let plain = api
        .get("/v1/subscriptions", &[("status", "all")])
        .await
        .json;
    assert_eq!(plain["data"].as_array().expect("list").len(), 0);
    let by_clock = api
        .get(
            "/v1/subscriptions",
            &[("status", "all"), ("test_clock", &clock)],
        )
        .await
        .json;
    assert_eq!(by_clock["data"][0]["id"], sub_id.as_str());
    let by_customer = api
        .get("/v1/subscriptions", &[("customer", &customer)])
        .await
        .json;
    assert_eq!(by_customer["data"][0]["id"], sub_id.as_str());
    api.delete(&format!("/v1/subscriptions/{sub_id}"), None)
        .await;
    let default = api
        .get("/v1/subscriptions", &[("customer", &customer)])
        .await
        .json;
    assert_eq!(
        default["data"].as_array().expect("list").len(),
        0,
        "canceled ones need status=all"
    );
    let ended = api
        .get(
            "/v1/subscriptions",
            &[("customer", &customer), ("status", "ended")],
        )
        .await
        .json;
    assert_eq!(ended["data"][0]["status"], "canceled");
    let bad = api.get("/v1/subscriptions", &[("status", "gone")]).await;
    assert_eq!(bad.error()["param"], "status");
    let future = (fake.now() + 3600).to_string();
    let none = api
        .get("/v1/invoices", &[("created[gte]", &future)])
        .await
        .json;
    assert_eq!(none["data"].as_array().expect("list").len(), 0);
    let all = api
        .get("/v1/invoices", &[("customer", &customer)])
        .await
        .json;
    assert_eq!(all["data"].as_array().expect("list").len(), 1);
}

#[tokio::test]
async fn both_api_shapes_and_runtime_switch() {
    let fake = start().await;
    let api = Api::new(&fake);
    let (clock, _, sub_id, _) = sign_up(&fake, &api, "1").await;
    let path = format!("/v1/subscriptions/{sub_id}");
    let legacy = api.get(&path, &[]).await;
    assert_eq!(legacy.header("stripe-version"), Some(H));
    assert!(legacy.json["current_period_end"].is_i64());
    // A request's own Stripe-Version picks the answer's shape.
    let basil = api.get_version(&path, BASIL).await;
    assert_eq!(basil.header("stripe-version"), Some(BASIL));
    assert!(basil.json.get("current_period_end").is_none());
    assert!(basil.json["items"]["data"][0]["current_period_end"].is_i64());
    let bad = api.get_version(&path, "yesterday").await;
    assert_eq!(bad.status, 400);

    // Switch the account at runtime: later events carry the new version and shapes.
    let switched = api
        .control(
            Method::POST,
            "/_fake/api_version",
            Some(json!({ "api_version": BASIL })),
        )
        .await;
    assert_eq!(switched.json["api_version"], BASIL);
    let refused = api
        .control(
            Method::POST,
            "/_fake/api_version",
            Some(json!({ "api_version": "v2" })),
        )
        .await;
    assert_eq!(refused.status, 400);
    let end = basil.json["items"]["data"][0]["current_period_end"]
        .as_i64()
        .expect("end");
    let before = mark(&fake);
    advance(&api, &clock, end + 2 * 3600).await;
    let events = events_since(&fake, &before);
    assert!(events.iter().all(|e| e["api_version"] == BASIL));
    let update = &events[0];
    assert_eq!(update["type"], "customer.subscription.updated");
    assert!(update["data"]["object"].get("current_period_end").is_none());
    assert_eq!(
        update["data"]["previous_attributes"]["items"]["data"][0]["current_period_end"],
        end
    );
    let paid = events
        .iter()
        .find(|e| e["type"] == "invoice.paid")
        .expect("paid");
    let invoice = &paid["data"]["object"];
    assert!(invoice.get("subscription").is_none());
    assert_eq!(
        invoice["parent"]["subscription_details"]["subscription"],
        sub_id.as_str()
    );
    assert_eq!(
        invoice["parent"]["subscription_details"]["metadata"]["subscription_ref"],
        "acct-1"
    );
    // Older events keep the version they were made in.
    assert_eq!(fake.events()[0]["api_version"], H);
    // The request's version still wins for answers.
    let old = api.get_version(&path, H).await;
    assert!(old.json["current_period_end"].is_i64());
}

#[tokio::test]
async fn faults_and_keys_apply_to_the_new_routes() {
    let fake = start().await;
    let api = Api::new(&fake);
    let price = price(&api).await;
    fake.add_fault(
        FaultRule::new(
            "POST",
            "/v1/checkout/sessions",
            FaultAction::DropResponseAfterCommit,
        )
        .times(1),
    )
    .expect("fault");
    let form = [
        ("mode", "subscription"),
        ("success_url", "https://app.example/ok"),
        ("line_items[0][price]", price.as_str()),
    ];
    let lost = api
        .try_post("/v1/checkout/sessions", Some("lost-1"), &form)
        .await;
    assert!(lost.is_err(), "the answer is dropped");
    let replay = api
        .post("/v1/checkout/sessions", Some("lost-1"), &form)
        .await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(fake.ledger().checkout_sessions.created, 1);
    // Validation: a one-time price, an unknown price, payment_intent_data.
    let one_time = api
        .post(
            "/v1/prices",
            None,
            &[
                ("currency", "usd"),
                ("unit_amount", "100"),
                ("product_data[name]", "x"),
            ],
        )
        .await
        .id();
    for (params, param) in [
        (
            vec![("line_items[0][price]", one_time.as_str())],
            "line_items[0][price]",
        ),
        (
            vec![("line_items[0][price]", "price_nope")],
            "line_items[0][price]",
        ),
        (
            vec![
                ("line_items[0][price]", price.as_str()),
                ("payment_intent_data[description]", "x"),
            ],
            "payment_intent_data",
        ),
    ] {
        let mut form = vec![
            ("mode", "subscription"),
            ("success_url", "https://app.example/ok"),
        ];
        form.extend(params);
        let answer = api.post("/v1/checkout/sessions", None, &form).await;
        assert_eq!(answer.status, 400, "{}", answer.json);
        assert_eq!(answer.error()["param"], param, "{}", answer.json);
    }
    // A declining card at sign-up leaves the session open and creates nothing.
    let s = replay.id();
    let declined = fake
        .pay_subscription_checkout(&s, "pm_card_chargeCustomerFail", None)
        .await
        .expect_err("declined");
    assert_eq!(declined.status, 402);
    assert_eq!(
        fake.checkout_session(&s).expect("session")["status"],
        "open"
    );
    assert_eq!(fake.ledger().subscriptions.created, 0);
    // Without a test clock the fake's own clock renews.
    fake.pay_subscription_checkout(&s, "pm_card_visa", None)
        .await
        .expect("paid");
    fake.advance_clock(32 * 86_400);
    let ledger = fake.ledger();
    assert_eq!(ledger.invoices.created, 2, "{:?}", ledger.invoices);
    assert_eq!(ledger.invoices.by_status.get("paid"), Some(&2));
}
