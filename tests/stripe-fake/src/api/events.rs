//! `GET /v1/events` (newest first, `type` with a trailing `*` wildcard, `types[]`) and
//! `GET /v1/events/:id`.

use serde_json::Value;

use crate::error::ApiError;
use crate::form::Params;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::state::{Event, State};

/// Stripe allows up to 20 entries in `types[]`.
const MAX_TYPES: usize = 20;

pub fn list(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut reader = Reader::new(params);
    let query = ListQuery::read(&mut reader)?;
    let single = reader.string("type")?;
    let types = reader.string_list("types")?;
    reader.ignore(&["expand", "delivery_success"]);
    reader.finish()?;
    if single.is_some() && !types.is_empty() {
        return Err(ApiError::invalid_param(
            "types",
            "You may only specify one of these parameters: type, types.",
        ));
    }
    if types.len() > MAX_TYPES {
        return Err(ApiError::invalid_param(
            "types",
            format!("You may pass at most {MAX_TYPES} types."),
        ));
    }
    let keep = |event: &Event| match &single {
        Some(pattern) => type_matches(pattern, &event.kind),
        None => types.is_empty() || types.contains(&event.kind),
    };
    let found = page(&state.events, &query, "event", keep)?;
    let data: Vec<&Value> = found.items.iter().map(|e| &e.json).collect();
    Ok(list_body(data, found.has_more, "/v1/events"))
}

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut reader = Reader::new(params);
    reader.ignore(&["expand"]);
    reader.finish()?;
    state
        .events
        .get(id)
        .map(|event| event.json.clone())
        .ok_or_else(|| ApiError::no_such("event", id, "id"))
}

/// `payment_intent.*` matches every PaymentIntent event.
fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}
