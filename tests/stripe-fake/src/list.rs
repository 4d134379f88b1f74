//! Stripe's list pagination, newest first: `limit`, `starting_after`, `ending_before` and
//! `created[...]`, over a [`Collection`] in key order.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::collection::{predecessor, successor, Collection, Key};
use crate::error::{shorten, ApiError};
use crate::params::{CreatedRange, Reader};

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: usize,
    pub starting_after: Option<String>,
    pub ending_before: Option<String>,
    pub created: CreatedRange,
}

impl ListQuery {
    /// Reads the parameters every list endpoint shares.
    pub fn read(reader: &mut Reader) -> Result<ListQuery, ApiError> {
        let query = ListQuery {
            limit: reader.limit()?,
            starting_after: reader.string("starting_after")?,
            ending_before: reader.string("ending_before")?,
            created: reader.created()?,
        };
        if query.starting_after.is_some() && query.ending_before.is_some() {
            return Err(ApiError::invalid_param(
                "ending_before",
                "You may only specify one of these parameters: ending_before, starting_after.",
            ));
        }
        Ok(query)
    }
}

/// One page, newest first, and whether more objects lie beyond it in the direction of travel.
pub struct Page<'a, T> {
    pub items: Vec<&'a T>,
    pub has_more: bool,
}

/// Pages through `collection`, keeping objects for which `keep` holds. `object` names the type in
/// the error for an unknown cursor (`No such payment_intent: 'pi_x'`).
pub fn page<'a, T>(
    collection: &'a Collection<T>,
    query: &ListQuery,
    object: &str,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<'a, T>, ApiError> {
    let (low_created, high_created) = query.created.bounds();
    let mut low: Option<Key> = Some((low_created, 0));
    let mut high: Option<Key> = Some((high_created, u64::MAX));
    let cursor = |param: &str, id: &str| {
        collection.key_of(id).ok_or_else(|| {
            ApiError::invalid_param(param, format!("No such {object}: '{}'", shorten(id)))
                .with_code("resource_missing")
        })
    };
    if let Some(id) = &query.starting_after {
        let key = cursor("starting_after", id)?;
        high = high.min(predecessor(key));
    }
    if let Some(id) = &query.ending_before {
        let key = cursor("ending_before", id)?;
        low = match (low, successor(key)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let (Some(low), Some(high)) = (low, high) else {
        return Ok(Page {
            items: Vec::new(),
            has_more: false,
        });
    };
    let matching = collection.range(low, high).filter(|(_, obj)| keep(obj));
    let mut items: Vec<&T> = if query.ending_before.is_some() {
        // The page just newer than the cursor: walk up from it, then present newest first.
        matching.take(query.limit + 1).map(|(_, obj)| obj).collect()
    } else {
        matching
            .rev()
            .take(query.limit + 1)
            .map(|(_, obj)| obj)
            .collect()
    };
    let has_more = items.len() > query.limit;
    items.truncate(query.limit);
    if query.ending_before.is_some() {
        items.reverse();
    }
    Ok(Page { items, has_more })
}

#[derive(Serialize)]
struct ListBody<'a, T> {
    object: &'static str,
    data: Vec<T>,
    has_more: bool,
    url: &'a str,
}

/// `{"object":"list","data":[...],"has_more":...,"url":...}`, serialized at once.
pub fn list_body<T: Serialize>(data: Vec<T>, has_more: bool, url: &str) -> Body {
    Body::serialize(&ListBody {
        object: "list",
        data,
        has_more,
        url,
    })
}

/// An answer's body: a JSON value, or JSON already serialized (lists and search results skip
/// building a tree of 100 objects only to serialize it).
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Value(Value),
    Raw(Bytes),
}

impl Body {
    pub fn serialize<T: Serialize>(value: &T) -> Body {
        // Our bodies have string keys only, so serializing cannot fail.
        Body::Raw(Bytes::from(serde_json::to_vec(value).unwrap_or_default()))
    }

    pub fn into_bytes(self) -> Bytes {
        match self {
            Body::Value(value) => Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
            Body::Raw(bytes) => bytes,
        }
    }
}

impl From<Value> for Body {
    fn from(value: Value) -> Body {
        Body::Value(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collection(n: usize) -> Collection<String> {
        let mut c = Collection::default();
        for i in 0..n {
            // Three objects per second, to exercise ties on `created`.
            c.insert(format!("o{i}"), 100 + (i / 3) as i64, format!("o{i}"));
        }
        c
    }

    fn ids(page: &Page<'_, String>) -> Vec<String> {
        page.items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn walks_forward_and_back() {
        let c = collection(10);
        let mut q = ListQuery {
            limit: 4,
            ..ListQuery::default()
        };
        let p = page(&c, &q, "thing", |_| true).expect("page");
        assert_eq!(ids(&p), ["o9", "o8", "o7", "o6"]);
        assert!(p.has_more);
        q.starting_after = Some("o6".into());
        let p = page(&c, &q, "thing", |_| true).expect("page");
        assert_eq!(ids(&p), ["o5", "o4", "o3", "o2"]);
        q.starting_after = Some("o2".into());
        let p = page(&c, &q, "thing", |_| true).expect("page");
        assert_eq!(ids(&p), ["o1", "o0"]);
        assert!(!p.has_more);
        q.starting_after = None;
        q.ending_before = Some("o5".into());
        let p = page(&c, &q, "thing", |_| true).expect("page");
        assert_eq!(ids(&p), ["o9", "o8", "o7", "o6"]);
        assert!(!p.has_more);
        q.ending_before = Some("o1".into());
        let p = page(&c, &q, "thing", |_| true).expect("page");
        assert_eq!(ids(&p), ["o5", "o4", "o3", "o2"]);
        assert!(p.has_more);
    }

    #[test]
    fn created_bounds_and_filters() {
        let c = collection(10);
        let q = ListQuery {
            limit: 100,
            created: CreatedRange {
                gte: Some(101),
                lt: Some(103),
                ..CreatedRange::default()
            },
            ..ListQuery::default()
        };
        let p = page(&c, &q, "thing", |s| s != "o4").expect("page");
        assert_eq!(ids(&p), ["o8", "o7", "o6", "o5", "o3"]);
        let q = ListQuery {
            limit: 10,
            created: CreatedRange {
                gt: Some(200),
                lt: Some(100),
                ..CreatedRange::default()
            },
            ..ListQuery::default()
        };
        assert!(page(&c, &q, "thing", |_| true)
            .expect("page")
            .items
            .is_empty());
    }

    #[test]
    fn unknown_cursor_is_named() {
        let c = collection(1);
        let q = ListQuery {
            limit: 1,
            starting_after: Some("nope".into()),
            ..ListQuery::default()
        };
        let error = page(&c, &q, "thing", |_| true)
            .err()
            .expect("unknown cursor");
        assert_eq!(error.param.as_deref(), Some("starting_after"));
        assert_eq!(error.code, Some("resource_missing"));
    }
}
