//! `GET /v1/charges/:id`.

use serde_json::Value;

use crate::error::ApiError;
use crate::form::Params;
use crate::params::Reader;
use crate::state::State;

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut reader = Reader::new(params);
    reader.ignore(&["expand"]);
    reader.finish()?;
    state
        .charges
        .get(id)
        .map(|charge| charge.to_json())
        .ok_or_else(|| ApiError::no_such("charge", id, "charge"))
}
