//! `/v1/customers`: create (optionally on a test clock), retrieve, update (email, name, metadata,
//! and `invoice_settings[default_payment_method]`, the card renewals are charged to), list.

use serde_json::Value;

use crate::billing::{self, check_attachable};
use crate::customer::Customer;
use crate::error::ApiError;
use crate::form::Params;
use crate::list::{list_body, page, Body, ListQuery};
use crate::params::Reader;
use crate::state::{Ctx, State};

const IGNORED: &[&str] = &[
    "expand",
    "address",
    "phone",
    "shipping",
    "preferred_locales",
    "tax_exempt",
    "balance",
    "invoice_prefix",
    "tax",
    "tax_id_data",
    "source",
    "next_invoice_sequence",
];

struct Fields {
    email: Option<Option<String>>,
    name: Option<Option<String>>,
    description: Option<Option<String>>,
    metadata: Option<crate::params::MetadataUpdate>,
    default_payment_method: Option<String>,
}

fn read_fields(r: &mut Reader) -> Result<Fields, ApiError> {
    let email = r.nullable_string("email", 512)?;
    let name = r.nullable_string("name", 256)?;
    let description = r.nullable_string("description", 350)?;
    let metadata = r.metadata()?;
    let payment_method = r.string("payment_method")?;
    let mut default_payment_method = None;
    if let Some(mut settings) = r.hash("invoice_settings")? {
        default_payment_method = settings.string("default_payment_method")?;
        settings.ignore(&["custom_fields", "footer", "rendering_options"]);
        settings.finish()?;
    }
    if let Some(pm) = payment_method.as_deref() {
        check_attachable(pm, "payment_method")?;
    }
    if let Some(pm) = default_payment_method.as_deref() {
        check_attachable(pm, "invoice_settings[default_payment_method]")?;
    }
    Ok(Fields {
        email,
        name,
        description,
        metadata,
        // A PaymentMethod given at creation is attached; Stripe makes it the default only when
        // asked, but for the fake's test tokens attaching and defaulting are the same card.
        default_payment_method: default_payment_method.or(payment_method),
    })
}

pub fn create(state: &mut State, ctx: &Ctx, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let fields = read_fields(&mut r)?;
    let test_clock = r.string("test_clock")?;
    r.ignore(IGNORED);
    r.finish()?;
    if let Some(clock) = &test_clock {
        if state.test_clocks.get(clock).is_none() {
            return Err(ApiError::no_such(
                "test_helpers.test_clock",
                clock,
                "test_clock",
            ));
        }
    }
    let at = billing::time_on(state, test_clock.as_deref(), ctx.now);
    let mut customer = billing::new_customer(
        at,
        fields.email.flatten(),
        test_clock,
        fields.default_payment_method,
    );
    customer.name = fields.name.flatten();
    customer.description = fields.description.flatten();
    if let Some(update) = fields.metadata {
        update.apply(&mut customer.metadata)?;
    }
    let json = customer.to_json();
    state.customers.insert(customer.id.clone(), at, customer);
    state.emit(ctx, "customer.created", json.clone());
    Ok(json)
}

pub fn retrieve(state: &State, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    r.ignore(&["expand"]);
    r.finish()?;
    state
        .customers
        .get(id)
        .map(Customer::to_json)
        .ok_or_else(|| ApiError::no_such("customer", id, "id"))
}

pub fn update(state: &mut State, ctx: &Ctx, id: &str, params: Params) -> Result<Value, ApiError> {
    let mut r = Reader::new(params);
    let fields = read_fields(&mut r)?;
    r.ignore(IGNORED);
    r.finish()?;
    let customer = state
        .customers
        .get_mut(id)
        .ok_or_else(|| ApiError::no_such("customer", id, "id"))?;
    let before = customer.to_json();
    if let Some(email) = fields.email {
        customer.email = email;
    }
    if let Some(name) = fields.name {
        customer.name = name;
    }
    if let Some(description) = fields.description {
        customer.description = description;
    }
    if let Some(update) = fields.metadata {
        update.apply(&mut customer.metadata)?;
    }
    if let Some(pm) = fields.default_payment_method {
        customer.default_payment_method = Some(pm);
    }
    let json = customer.to_json();
    if json != before {
        let previous = previous_attributes(&before, &json);
        state.emit_update(ctx, "customer.updated", json.clone(), previous);
    }
    Ok(json)
}

/// The top-level fields that changed, with their old values.
pub fn previous_attributes(before: &Value, after: &Value) -> Value {
    let mut previous = serde_json::Map::new();
    if let (Some(before), Some(after)) = (before.as_object(), after.as_object()) {
        for (key, old) in before {
            if after.get(key) != Some(old) {
                previous.insert(key.clone(), old.clone());
            }
        }
    }
    Value::Object(previous)
}

pub fn list(state: &State, params: Params) -> Result<Body, ApiError> {
    let mut r = Reader::new(params);
    let query = ListQuery::read(&mut r)?;
    let email = r.string("email")?;
    let test_clock = r.string("test_clock")?;
    r.ignore(&["expand"]);
    r.finish()?;
    let found = page(&state.customers, &query, "customer", |c| {
        email.as_ref().is_none_or(|e| c.email.as_ref() == Some(e)) && c.test_clock == test_clock
    })?;
    let data: Vec<Value> = found.items.iter().map(|c| c.to_json()).collect();
    Ok(list_body(data, found.has_more, "/v1/customers"))
}
