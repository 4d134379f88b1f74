//! `/v1/test_helpers/test_clocks`: create, retrieve, list, advance. Advancing runs every
//! renewal, retry and cancellation that falls due on the clock's customers, in time order, before
//! it answers (Stripe advances in the background; the fake answers `advancing` as Stripe does, and
//! the clock reads `ready` as soon as the call returns, its events all recorded).

use serde_json::Value;

use crate::billing;
use crate::error::ApiError;
use crate::form::Params;
use crate::ids::new_id;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::state::{Ctx, State};
use crate::test_clock::TestClock;

pub fn create(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let frozen_time = r.integer("frozen_time")?;
    let name = r.bounded_string("name", 300)?;
    r.ignore(&["expand"]);
    r.finish()?;
    let frozen_time = frozen_time.ok_or_else(|| ApiError::missing_param("frozen_time"))?;
    let clock = TestClock {
        id: new_id("clock_"),
        created: ctx.now,
        frozen_time,
        name,
    };
    let json = clock.to_json("ready");
    state.test_clocks.insert(clock.id.clone(), ctx.now, clock);
    state.emit(ctx, "test_helpers.test_clock.created", json.clone());
    Ok(json)
}

fn find<'a>(state: &'a State, id: &str) -> Result<&'a TestClock, ApiError> {
    state
        .test_clocks
        .get(id)
        .ok_or_else(|| ApiError::no_such("test_helpers.test_clock", id, "test_clock"))
}

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    Ok(find(state, id)?.to_json("ready"))
}

pub fn list(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    r.ignore(&["expand"]);
    r.finish()?;
    let found = page(
        &state.test_clocks,
        &query,
        "test_helpers.test_clock",
        |_| true,
    )?;
    let data: Vec<Value> = found.items.iter().map(|c| c.to_json("ready")).collect();
    Ok(list_body(
        data,
        found.has_more,
        "/v1/test_helpers/test_clocks",
    ))
}

pub fn advance(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let frozen_time = r.integer("frozen_time")?;
    r.ignore(&["expand"]);
    r.finish()?;
    let frozen_time = frozen_time.ok_or_else(|| ApiError::missing_param("frozen_time"))?;
    let mut clock = find(state, id)?.clone();
    if frozen_time <= clock.frozen_time {
        return Err(ApiError::invalid_param(
            "frozen_time",
            format!(
                "The frozen_time must be after the test clock's current frozen_time ({}).",
                clock.frozen_time
            ),
        ));
    }
    clock.frozen_time = frozen_time;
    let advancing = clock.to_json("advancing");
    state.emit(ctx, "test_helpers.test_clock.advancing", advancing.clone());
    // What falls due happens on Stripe's own initiative: those events carry no request.
    billing::advance_clock(state, &Ctx::internal(ctx.now), id, frozen_time)?;
    let ready = find(state, id)?.to_json("ready");
    state.emit(ctx, "test_helpers.test_clock.ready", ready);
    // Stripe answers while the clock is still advancing; a GET afterwards reads `ready`.
    Ok(advancing)
}
