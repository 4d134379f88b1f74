//! Search by metadata and status.

use serde_json::Value;
use stripe_fake::SeedRequest;

use crate::helpers::{start, Api};

const SEARCH: &str = "/v1/payment_intents/search";

fn ids(answer: &Value) -> Vec<String> {
    answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn finds_by_metadata_and_status() {
    let fake = start().await;
    let api = Api::new(&fake);
    let mut target = None;
    for i in 0..20 {
        let pi = api
            .post(
                "/v1/payment_intents",
                None,
                &[
                    ("amount", "1000"),
                    ("currency", "usd"),
                    (
                        "metadata[pgpay_payment_id]",
                        &format!("8c0e7f5a-0000-4000-8000-{i:012}"),
                    ),
                    ("metadata[batch]", if i < 10 { "a" } else { "b" }),
                ],
            )
            .await;
        if i == 7 {
            target = Some(pi.id());
        }
        if i % 2 == 0 {
            fake.confirm(&pi.id(), "pm_card_visa")
                .await
                .expect("confirmed");
        }
    }
    let target = target.expect("target");
    let found = api
        .get(
            SEARCH,
            &[(
                "query",
                "metadata['pgpay_payment_id']:'8c0e7f5a-0000-4000-8000-000000000007'",
            )],
        )
        .await;
    assert_eq!(found.status, 200, "{}", found.json);
    assert_eq!(found.json["object"], "search_result");
    assert_eq!(found.json["url"], SEARCH);
    assert_eq!(found.json["has_more"], false);
    assert_eq!(ids(&found.json), std::slice::from_ref(&target));

    let none = api
        .get(SEARCH, &[("query", "metadata['pgpay_payment_id']:'nope'")])
        .await;
    assert!(ids(&none.json).is_empty());
    let succeeded_a = api
        .get(
            SEARCH,
            &[
                ("query", "metadata['batch']:'a' AND status:'succeeded'"),
                ("limit", "100"),
            ],
        )
        .await;
    assert_eq!(ids(&succeeded_a.json).len(), 5);
    let succeeded = api
        .get(SEARCH, &[("query", "status:'succeeded'"), ("limit", "100")])
        .await;
    assert_eq!(ids(&succeeded.json).len(), 10);

    // Pages of 4 over the 10 PaymentIntents of batch b.
    let mut all = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let mut query = vec![("query", "metadata['batch']:'b'"), ("limit", "4")];
        if let Some(p) = &page {
            query.push(("page", p));
        }
        let answer = api.get(SEARCH, &query).await;
        all.extend(ids(&answer.json));
        match answer.json["next_page"].as_str() {
            Some(next) => page = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(all.len(), 10);
    assert_eq!(
        all.iter().collect::<std::collections::HashSet<_>>().len(),
        10
    );

    // Metadata updates move a PaymentIntent between index entries.
    api.post(
        &format!("/v1/payment_intents/{target}"),
        None,
        &[("metadata[batch]", "c")],
    )
    .await;
    let moved = api.get(SEARCH, &[("query", "metadata['batch']:'c'")]).await;
    assert_eq!(ids(&moved.json), [target]);
}

#[tokio::test]
async fn bad_queries_are_400s_on_query() {
    let fake = start().await;
    let api = Api::new(&fake);
    for query in [
        "",
        "colour:'red'",
        "status:'a' AND status:'b' OR status:'c'",
        "metadata['k':'v'",
        "status>'x'",
    ] {
        let answer = api.get(SEARCH, &[("query", query)]).await;
        assert_eq!(answer.status, 400, "{query}: {}", answer.json);
        assert_eq!(answer.error()["param"], "query", "{query}");
    }
    let bad_page = api
        .get(
            SEARCH,
            &[("query", "status:'succeeded'"), ("page", "garbage")],
        )
        .await;
    assert_eq!(bad_page.error()["param"], "page");
}

#[tokio::test]
async fn metadata_search_among_many_is_a_lookup() {
    let fake = start().await;
    let api = Api::new(&fake);
    let mut seed = SeedRequest::new(50_000);
    seed.metadata
        .insert("pgpay_payment_id".into(), "seed-{i}".into());
    fake.seed(seed).expect("seed");
    let started = std::time::Instant::now();
    for i in [0, 12_345, 49_999] {
        let found = api
            .get(
                SEARCH,
                &[("query", &format!("metadata['pgpay_payment_id']:'seed-{i}'"))],
            )
            .await;
        let data = found.json["data"].as_array().expect("data");
        assert_eq!(data.len(), 1);
        assert_eq!(data[0]["metadata"]["pgpay_payment_id"], format!("seed-{i}"));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
