//! List pagination: newest first, cursors both ways, `created` filters, and speed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use stripe_fake::SeedRequest;

use crate::helpers::{start, Api};

const T0: i64 = 1_700_000_000;

fn ids(answer: &Value) -> Vec<String> {
    answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect()
}

/// 250 PaymentIntents one second apart, then 50 more sharing one second (ties on `created`).
async fn seeded(api: &Api, fake: &stripe_fake::StripeFake) {
    let mut spread = SeedRequest::new(250);
    spread.created_from = Some(T0);
    spread.metadata.insert("n".into(), "{i}".into());
    fake.seed(spread).expect("seed");
    let mut tied = SeedRequest::new(50);
    tied.created_from = Some(T0 + 1000);
    tied.interval_secs = 0;
    fake.seed(tied).expect("seed");
    assert_eq!(
        api.get("/v1/payment_intents", &[]).await.json["data"]
            .as_array()
            .map(Vec::len),
        Some(10)
    );
}

#[tokio::test]
async fn pages_forward_and_back_across_300() {
    let fake = start().await;
    let api = Api::new(&fake);
    seeded(&api, &fake).await;
    let expected: Vec<String> = fake
        .ledger()
        .payment_intents
        .list
        .iter()
        .rev()
        .map(|p| p.id.clone())
        .collect();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("limit", "100".to_owned())];
        if let Some(c) = &cursor {
            query.push(("starting_after", c.clone()));
        }
        let q: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = api.get("/v1/payment_intents", &q).await;
        assert_eq!(page.status, 200, "{}", page.json);
        assert_eq!(page.json["object"], "list");
        assert_eq!(page.json["url"], "/v1/payment_intents");
        let page_ids = ids(&page.json);
        pages += 1;
        seen.extend(page_ids.clone());
        if page.json["has_more"] != true {
            break;
        }
        cursor = page_ids.last().cloned();
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen, expected,
        "newest first, ties in reverse creation order, no gaps"
    );
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 300);

    // Walk back from the oldest with ending_before.
    let mut back = Vec::new();
    let mut cursor = expected.last().cloned().expect("oldest");
    back.push(cursor.clone());
    loop {
        let page = api
            .get(
                "/v1/payment_intents",
                &[("limit", "70"), ("ending_before", &cursor)],
            )
            .await;
        let page_ids = ids(&page.json);
        if page_ids.is_empty() {
            break;
        }
        // Each page is still newest first; prepend it.
        let mut next = page_ids.clone();
        next.extend(back);
        back = next;
        cursor = page_ids.first().cloned().expect("first");
        if page.json["has_more"] != true {
            break;
        }
    }
    assert_eq!(back, expected);
}

#[tokio::test]
async fn created_filters() {
    let fake = start().await;
    let api = Api::new(&fake);
    seeded(&api, &fake).await;
    let count = |answer: &Value| answer["data"].as_array().map(Vec::len).unwrap_or(0);
    let gte = (T0 + 200).to_string();
    let lt = (T0 + 210).to_string();
    let window = api
        .get(
            "/v1/payment_intents",
            &[
                ("limit", "100"),
                ("created[gte]", &gte),
                ("created[lt]", &lt),
            ],
        )
        .await;
    assert_eq!(count(&window.json), 10);
    assert_eq!(window.json["has_more"], false);
    let createds: Vec<i64> = window.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|p| p["created"].as_i64().expect("created"))
        .collect();
    assert_eq!(createds, (T0 + 200..T0 + 210).rev().collect::<Vec<_>>());

    let gt = (T0 + 249).to_string();
    let after = api
        .get(
            "/v1/payment_intents",
            &[("limit", "100"), ("created[gt]", &gt)],
        )
        .await;
    assert_eq!(count(&after.json), 50, "only the tied batch");
    let exact = (T0 + 1000).to_string();
    let tied = api
        .get(
            "/v1/payment_intents",
            &[("limit", "20"), ("created", &exact)],
        )
        .await;
    assert_eq!(count(&tied.json), 20);
    assert_eq!(tied.json["has_more"], true);
    // A cursor combined with a filter stays inside the filter.
    let last = ids(&tied.json).last().cloned().expect("last");
    let rest = api
        .get(
            "/v1/payment_intents",
            &[
                ("limit", "100"),
                ("created", &exact),
                ("starting_after", &last),
            ],
        )
        .await;
    assert_eq!(count(&rest.json), 30);
    let lte = (T0 + 4).to_string();
    let oldest = api
        .get("/v1/payment_intents", &[("created[lte]", &lte)])
        .await;
    assert_eq!(count(&oldest.json), 5);
}

#[tokio::test]
async fn list_parameter_errors() {
    let fake = start().await;
    let api = Api::new(&fake);
    let id = api.create("100", "o-1").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("limit", "0")], "limit"),
        (vec![("limit", "101")], "limit"),
        (vec![("limit", "ten")], "limit"),
        (vec![("starting_after", "pi_nope")], "starting_after"),
        (vec![("ending_before", "pi_nope")], "ending_before"),
        (
            vec![("starting_after", &id), ("ending_before", &id)],
            "ending_before",
        ),
        (vec![("created[gte]", "yesterday")], "created[gte]"),
        (vec![("created[after]", "1")], "created[after]"),
        (vec![("sort", "asc")], "sort"),
    ];
    for (query, param) in cases {
        let answer = api.get("/v1/payment_intents", &query).await;
        assert_eq!(answer.status, 400, "{query:?}: {}", answer.json);
        assert_eq!(answer.error()["param"], param, "{query:?}");
    }
}

#[tokio::test]
async fn events_list_by_type_and_page() {
    let fake = start().await;
    let api = Api::new(&fake);
    for i in 0..6 {
        let id = api.create("100", &format!("o-{i}")).await["id"]
            .as_str()
            .expect("id")
            .to_owned();
        if i % 2 == 0 {
            fake.confirm(&id, "pm_card_visa").await.expect("confirmed");
        }
    }
    let succeeded = api
        .get("/v1/events", &[("type", "payment_intent.succeeded")])
        .await;
    assert_eq!(succeeded.json["data"].as_array().map(Vec::len), Some(3));
    let intents = api
        .get(
            "/v1/events",
            &[("type", "payment_intent.*"), ("limit", "100")],
        )
        .await;
    assert_eq!(intents.json["data"].as_array().map(Vec::len), Some(9));
    let both = api
        .get(
            "/v1/events",
            &[
                ("types[]", "charge.succeeded"),
                ("types[]", "payment_intent.created"),
                ("limit", "4"),
            ],
        )
        .await;
    assert_eq!(both.json["has_more"], true);
    let first_page = ids(&both.json);
    let next = api
        .get(
            "/v1/events",
            &[
                ("types[]", "charge.succeeded"),
                ("types[]", "payment_intent.created"),
                ("limit", "100"),
                ("starting_after", first_page.last().expect("last")),
            ],
        )
        .await;
    assert_eq!(ids(&next.json).len(), 5);
    let one = api.get(&format!("/v1/events/{}", first_page[0]), &[]).await;
    assert_eq!(one.json["object"], "event");
    assert_eq!(one.json["api_version"], stripe_fake::API_VERSION);
    let created = api
        .get(
            "/v1/events",
            &[("created[gte]", &fake.now().to_string()), ("limit", "100")],
        )
        .await;
    assert_eq!(ids(&created.json).len(), 12);
}

#[tokio::test]
async fn twenty_thousand_in_pages_of_one_hundred() {
    let fake = start().await;
    let api = Api::new(&fake);
    let mut seed = SeedRequest::new(20_000);
    seed.status_mix = [("succeeded".to_owned(), 3), ("canceled".to_owned(), 1)].into();
    let report = fake.seed(seed).expect("seed");
    assert_eq!(report.created, 20_000);
    // Parsed into just what is needed: a debug-build JSON tree of every page would dominate.
    #[derive(serde::Deserialize)]
    struct Page {
        data: Vec<Id>,
        has_more: bool,
    }
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    let started = Instant::now();
    let mut total = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "100")];
        if let Some(c) = &cursor {
            query.push(("starting_after", c));
        }
        let body = api
            .http
            .get(format!("{}/v1/payment_intents", api.base))
            .bearer_auth(&api.key)
            .query(&query)
            .send()
            .await
            .expect("answer")
            .bytes()
            .await
            .expect("body");
        let page: Page = serde_json::from_slice(&body).expect("a list");
        total += page.data.len();
        if !page.has_more {
            break;
        }
        cursor = page.data.last().map(|p| p.id.clone());
    }
    assert_eq!(total, 20_000);
    // 100,000 take about five times as long; far under the benchmark's minute even in debug builds.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let ledger = fake
        .wait_for_counts(crate::helpers::DEADLINE, |l| {
            l.requests_to("GET /v1/payment_intents") == 200
        })
        .await
        .expect("every page counted");
    assert_eq!(ledger.status_count("succeeded"), 15_000);
    assert_eq!(ledger.status_count("canceled"), 5_000);
    assert!(ledger.payment_intents.list.is_empty());
}
