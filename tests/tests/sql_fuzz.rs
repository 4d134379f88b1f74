//! Random and adversarial inputs through the SQL API itself: `pay.begin_checkout`,
//! `pay.begin_subscription` (and billing objects in events and reconciliation),
//! `pay.ingest_webhook` (correctly signed, so the event reader and the transition rule see the
//! garbage), `pay.verify_stripe_signature`, `pay.idempotency_key`, `pay.complete_outbox` (for
//! commands really in flight) and `pay.apply_stripe_object` (naming real payments).
//!
//! A seeded generator (`PGPAY_SQL_FUZZ_SEED` replays another seed) builds huge strings, deep JSON,
//! NUL characters and `\u0000` escapes, lone surrogates, numbers at the edges, wrong types and SQL
//! metacharacters. The server must never restart and every refusal must carry one of the
//! SQLSTATEs README.md lists under "Errors you can get".

use std::collections::BTreeMap;
use std::time::Instant;

use pgpay_core::signature::sign_header;
use pgpay_tests::tokio_postgres::types::ToSql;
use pgpay_tests::{sqlstate, TestDb};
use serde_json::{json, Value};

/// README.md, "Errors you can get": what pgpay's functions raise for a bad argument or state.
const RAISED_BY_PGPAY: &[&str] = &[
    "22023", // invalid_parameter_value: a bad argument, named in the message
    "P0002", // no_data_found: no such payment or command
    "55000", // object_not_in_prerequisite_state: not now (order paid, no webhook secret, ...)
    "40001", // serialization_failure: a concurrent delivery won; retry
    "54000", // program_limit_exceeded: a value beyond PostgreSQL's limits (an index entry)
];

/// README.md, "Errors you can get": what PostgreSQL raises while reading an argument, before any
/// pgpay code runs (such an error carries no function context).
const RAISED_READING_ARGUMENTS: &[&str] = &[
    "22P02", // invalid_text_representation: not a bigint, not JSON, a lone \ud800
    "22P05", // untranslatable_character: \u0000 in JSON
    "22003", // numeric_value_out_of_range: too large for bigint / int
    "22021", // character_not_in_repertoire: a NUL character in text
    "54001", // statement_too_complex: JSON nested beyond the stack limit
];

const SECRET: &str = "whsec_sql_fuzz_0123456789abcdef";
const CALLS: usize = 3000;

#[tokio::test]
async fn adversarial_inputs_never_crash_the_server_and_refusals_are_documented() {
    let seed = std::env::var("PGPAY_SQL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_615u64);
    println!("seed {seed} (PGPAY_SQL_FUZZ_SEED replays it)");
    let db = TestDb::create().await;
    let client = db.connect().await;
    let started_at =
        |row: pgpay_tests::tokio_postgres::Row| -> (String, i32) { (row.get(0), row.get(1)) };
    let before = started_at(
        client
            .query_one(
                "SELECT pg_postmaster_start_time()::text, pg_backend_pid()",
                &[],
            )
            .await
            .unwrap(),
    );
    client
        .execute("SELECT pay.add_webhook_secret($1)", &[&SECRET])
        .await
        .unwrap();

    let mut g = Gen {
        rng: fastrand::Rng::with_seed(seed),
        payments: Vec::new(),
        intents: Vec::new(),
        subscriptions: Vec::new(),
        completed: 0,
    };
    let mut calls: BTreeMap<&str, usize> = BTreeMap::new();
    let mut refusals: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut undocumented: BTreeMap<(&str, String), String> = BTreeMap::new();
    let began = Instant::now();
    for i in 0..CALLS {
        // Keep commands in flight so that complete_outbox meets real rows.
        if i % 50 == 0 {
            g.refill(&client).await;
        }
        let call = g.call();
        *calls.entry(call.function).or_default() += 1;
        let params: Vec<&(dyn ToSql + Sync)> =
            call.args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        match client.query(call.sql, &params).await {
            Ok(rows) => g.learn(call.function, &rows),
            Err(e) => {
                let Some(code) = sqlstate(&e) else {
                    panic!(
                        "{} lost the connection ({e}) on input {}",
                        call.function,
                        call.shown()
                    );
                };
                *refusals
                    .entry((call.function, code.to_owned()))
                    .or_default() += 1;
                let db_error = e.as_db_error();
                let message = db_error.map_or(e.to_string(), |d| d.message().to_owned());
                // Inside pgpay's code the context names a function or a statement it runs;
                // reading an argument names only the parameter or the JSON text.
                let context = db_error.and_then(|d| d.where_()).unwrap_or("");
                let inside = ["PL/pgSQL function", "SQL function", "SQL statement"]
                    .iter()
                    .any(|marker| context.contains(marker));
                let reading_argument = db_error.is_some() && !inside;
                let documented = RAISED_BY_PGPAY.contains(&code)
                    || (reading_argument && RAISED_READING_ARGUMENTS.contains(&code));
                if !documented {
                    let (code, message) = if inside {
                        (
                            format!("{code} inside pgpay"),
                            format!("{message} ({context})"),
                        )
                    } else {
                        (code.to_owned(), message)
                    };
                    undocumented
                        .entry((call.function, code))
                        .or_insert_with(|| format!("{} -> {}", call.shown(), shorten(&message)));
                }
            }
        }
    }
    let after = started_at(
        client
            .query_one(
                "SELECT pg_postmaster_start_time()::text, pg_backend_pid()",
                &[],
            )
            .await
            .expect("the test's own connection is still alive"),
    );
    println!(
        "{CALLS} calls in {:.1} s: {calls:?}",
        began.elapsed().as_secs_f64()
    );
    println!("refusals by function and SQLSTATE: {refusals:?}");
    assert_eq!(
        before, after,
        "the server restarted (or the session was replaced)"
    );
    assert!(
        undocumented.is_empty(),
        "refusals with an undocumented SQLSTATE (first input of each):\n{}",
        undocumented
            .iter()
            .map(|((f, code), input)| format!("  {f} {code}: {input}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The generator reaches past the argument checks: every function answered at least once.
    for function in [
        "begin_checkout",
        "begin_subscription",
        "ingest_webhook",
        "verify_stripe_signature",
        "idempotency_key",
        "complete_outbox",
        "apply_stripe_object",
    ] {
        assert!(
            calls.get(function).copied().unwrap_or(0) >= 100,
            "{function}: {calls:?}"
        );
    }
    assert!(
        g.completed >= 20,
        "only {} complete_outbox calls met a command in flight",
        g.completed
    );
}

/// One call: the statement, its text arguments (cast in SQL, so that wrong types reach the
/// server as they would from any client) and the function's name.
struct Call {
    function: &'static str,
    sql: &'static str,
    args: Vec<Option<String>>,
}

impl Call {
    fn shown(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                a.as_deref()
                    .map_or("NULL".into(), |s| format!("{:?}", shorten(s)))
            })
            .collect();
        format!("{}({})", self.function, args.join(", "))
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 300;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}... ({} bytes)", s.len())
    }
}

struct Gen {
    rng: fastrand::Rng,
    /// Payments created so far (ids), so that objects and events can name them.
    payments: Vec<String>,
    /// PaymentIntent ids put into objects, so that later objects name them again.
    intents: Vec<String>,
    /// Subscriptions created so far (ids), so that billing objects can claim them.
    subscriptions: Vec<String>,
    /// complete_outbox calls that completed a command in flight.
    completed: usize,
}

impl Gen {
    /// Starts a few valid checkouts and takes their create commands in flight.
    async fn refill(&mut self, client: &pgpay_tests::tokio_postgres::Client) {
        for _ in 0..5 {
            let order = format!("fuzz-order-{}", self.rng.u64(..));
            let row = client
                .query_one(
                    "SELECT id::text FROM pay.begin_checkout($1, $2, 'usd')",
                    &[&order, &self.rng.i64(50..100_000)],
                )
                .await
                .unwrap();
            self.payments.push(row.get(0));
        }
        for _ in 0..2 {
            let reference = format!("fuzz-sub-{}", self.rng.u64(..));
            let row = client
                .query_one(
                    "SELECT id::text FROM pay.begin_subscription($1, 'price_fuzz', success_url => 'https://x.example/')",
                    &[&reference],
                )
                .await
                .unwrap();
            self.subscriptions.push(row.get(0));
        }
        client
            .query("SELECT 1 FROM pay.claim_outbox('fuzz', 1000)", &[])
            .await
            .unwrap();
    }

    fn learn(&mut self, function: &str, rows: &[pgpay_tests::tokio_postgres::Row]) {
        let Some(row) = rows.first() else {
            return;
        };
        match function {
            "begin_checkout" => self.payments.push(row.get(0)),
            "begin_subscription" => self.subscriptions.push(row.get(0)),
            "complete_outbox" if row.get::<_, bool>(0) => self.completed += 1,
            _ => {}
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.usize(..items.len())]
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.u32(..100) < percent
    }

    fn call(&mut self) -> Call {
        match self.rng.u32(..7) {
            0 => self.begin_checkout(),
            1 => self.ingest_webhook(),
            2 => self.verify_stripe_signature(),
            3 => self.idempotency_key(),
            4 => self.complete_outbox(),
            5 => self.begin_subscription(),
            _ => self.apply_stripe_object(),
        }
    }

    fn begin_checkout(&mut self) -> Call {
        let metadata = if self.chance(70) {
            Some(self.metadata().to_string())
        } else {
            self.maybe(|g| g.json_text())
        };
        Call {
            function: "begin_checkout",
            sql: "SELECT id::text FROM pay.begin_checkout($1::text, $2::text::bigint, $3::text, $4::text, $5::text::jsonb, $6::text)",
            args: vec![
                self.maybe(|g| {
                    if g.chance(50) {
                        format!("o-{}", g.rng.u32(..40))
                    } else {
                        g.text()
                    }
                }),
                self.maybe(|g| g.number_text()),
                self.maybe(|g| {
                    g.pick(&["usd", "USD", "eur", "jpy", "xxx", "us", "usdd", "", "ü$d", "u\u{0}d"])
                        .to_string()
                }),
                self.maybe(|g| g.text()),
                metadata,
                self.maybe(|g| g.text()),
            ],
        }
    }

    fn begin_subscription(&mut self) -> Call {
        let metadata = if self.chance(70) {
            Some(self.metadata().to_string())
        } else {
            self.maybe(|g| g.json_text())
        };
        Call {
            function: "begin_subscription",
            sql: "SELECT id::text FROM pay.begin_subscription($1::text, $2::text, $3::text::int, $4::text, $5::text::jsonb, $6::text, $7::text)",
            args: vec![
                self.maybe(|g| {
                    if g.chance(50) {
                        format!("s-{}", g.rng.u32(..40))
                    } else {
                        g.text()
                    }
                }),
                self.maybe(|g| {
                    if g.chance(60) {
                        g.pick(&["price_1", "price_pro", "plan-basic_2"]).to_string()
                    } else {
                        g.text()
                    }
                }),
                self.maybe(|g| g.number_text()),
                self.maybe(|g| g.text()),
                metadata,
                self.maybe(|g| {
                    if g.chance(70) {
                        "https://app.example/welcome".to_owned()
                    } else {
                        g.text()
                    }
                }),
                if self.chance(50) { None } else { Some(self.text()) },
            ],
        }
    }

    fn ingest_webhook(&mut self) -> Call {
        let payload = if self.chance(85) {
            self.event()
        } else {
            self.json_text()
        };
        let header = match self.rng.u32(..10) {
            0 => self.text(),
            1 => sign_header(payload.as_bytes(), b"whsec_wrong_secret_xx", now()),
            2 => sign_header(payload.as_bytes(), SECRET.as_bytes(), now() - 100_000),
            _ => sign_header(payload.as_bytes(), SECRET.as_bytes(), now()),
        };
        Call {
            function: "ingest_webhook",
            sql: "SELECT status FROM pay.ingest_webhook($1::text, $2::text)",
            args: vec![self.maybe_not(payload), self.maybe_not(header)],
        }
    }

    fn verify_stripe_signature(&mut self) -> Call {
        let payload = if self.chance(50) {
            self.json_text()
        } else {
            self.text()
        };
        let secret = if self.chance(50) {
            SECRET.to_owned()
        } else {
            self.text()
        };
        let header = if self.chance(60) {
            let t = self.number_text().parse::<i64>().unwrap_or_else(|_| now());
            let signed = sign_header(payload.as_bytes(), secret.as_bytes(), t.max(0));
            if self.chance(30) {
                format!("{signed},{}", self.text())
            } else {
                signed
            }
        } else {
            self.text()
        };
        Call {
            function: "verify_stripe_signature",
            sql: "SELECT pay.verify_stripe_signature($1::text, $2::text, $3::text, $4::text::int, $5::text::bigint)",
            args: vec![
                self.maybe_not(payload),
                self.maybe_not(header),
                self.maybe_not(secret),
                Some(self.number_text()),
                self.maybe(|g| g.number_text()),
            ],
        }
    }

    fn idempotency_key(&mut self) -> Call {
        Call {
            function: "idempotency_key",
            sql: "SELECT pay.idempotency_key($1::text, $2::text::jsonb)",
            args: vec![
                self.maybe(|g| {
                    if g.chance(50) {
                        g.pick(&["pgpay.checkout", "x", "a:b.c-d_e", "x".repeat(190).as_str()])
                            .to_string()
                    } else {
                        g.text()
                    }
                }),
                self.maybe(|g| g.json_text()),
            ],
        }
    }

    fn complete_outbox(&mut self) -> Call {
        let response = if self.chance(80) {
            self.intent_or_refund().to_string()
        } else {
            self.json_text()
        };
        Call {
            function: "complete_outbox",
            // Mostly a command really in flight (its id and attempt), else anything.
            sql: "SELECT pay.complete_outbox(coalesce($1::text::bigint, (SELECT min(id) FROM pay.outbox WHERE status = 'in_flight' AND payment_id IS NOT NULL)),
                                             coalesce($2::text::int, (SELECT attempts FROM pay.outbox WHERE status = 'in_flight' AND payment_id IS NOT NULL ORDER BY id LIMIT 1)),
                                             $3::text::int, $4::text::jsonb)",
            args: vec![
                self.maybe_not_often(|g| g.number_text()),
                self.maybe_not_often(|g| g.number_text()),
                Some(if self.chance(70) { "200".into() } else { self.number_text() }),
                self.maybe_not(response),
            ],
        }
    }

    fn apply_stripe_object(&mut self) -> Call {
        let object = if self.chance(85) {
            self.intent_or_refund().to_string()
        } else {
            self.json_text()
        };
        Call {
            function: "apply_stripe_object",
            sql: "SELECT outcome FROM pay.apply_stripe_object($1::text::jsonb, $2::text, $3::text::bigint)",
            args: vec![
                self.maybe_not(object),
                Some(if self.chance(80) { "reconcile".into() } else { self.text() }),
                if self.chance(90) { None } else { Some(self.number_text()) },
            ],
        }
    }

    /// `Some(value)` mostly, NULL sometimes.
    fn maybe(&mut self, make: impl FnOnce(&mut Gen) -> String) -> Option<String> {
        (!self.chance(8)).then(|| make(self))
    }

    fn maybe_not(&mut self, value: String) -> Option<String> {
        (!self.chance(5)).then_some(value)
    }

    /// NULL mostly (the statement then picks a real row), a random value sometimes.
    fn maybe_not_often(&mut self, make: impl FnOnce(&mut Gen) -> String) -> Option<String> {
        self.chance(15).then(|| make(self))
    }

    /// A Subscription, an Invoice (in either API shape) or a subscription-mode Checkout
    /// Session claiming a real subscription mostly, with adversarial fields.
    fn billing_object(&mut self) -> Value {
        let claimed = if self.subscriptions.is_empty() || self.chance(10) {
            self.weird_uuid()
        } else {
            let s = self.pick(&self.subscriptions.clone()).clone();
            s
        };
        let sub_id = format!("sub_fuzz_{}", self.rng.u32(..50));
        let metadata = json!({"pgpay_subscription_id": claimed});
        let time = |g: &mut Gen| -> Value {
            if g.chance(80) {
                Value::from(now() + g.rng.i64(-100_000..100_000))
            } else {
                g.json()
            }
        };
        let mut object = match self.rng.u32(..3) {
            0 => {
                let mut item = json!({"id": format!("si_fuzz_{}", self.rng.u32(..50)),
                    "price": {"id": "price_fuzz"}, "quantity": self.amount()});
                if self.chance(50) {
                    item["current_period_start"] = time(self);
                    item["current_period_end"] = time(self);
                }
                let mut sub = json!({"id": sub_id, "object": "subscription", "metadata": metadata,
                    "status": self.pick(&["incomplete", "incomplete_expired", "trialing", "active",
                        "past_due", "unpaid", "paused", "canceled", "", "ACTIVE", "hibernating"]).to_string(),
                    "items": {"object": "list", "data": [item]},
                    "cancel_at_period_end": self.json()});
                if self.chance(50) {
                    sub["current_period_start"] = time(self);
                    sub["current_period_end"] = time(self);
                }
                sub
            }
            1 => {
                let mut invoice = json!({"id": format!("in_fuzz_{}", self.rng.u32(..200)), "object": "invoice",
                    "status": self.pick(&["draft", "open", "paid", "void", "uncollectible", "", "deleted"]).to_string(),
                    "amount_due": self.amount(), "amount_paid": self.amount(),
                    "currency": self.pick(&["usd", "USD", ""]).to_string(),
                    "billing_reason": "subscription_cycle",
                    "status_transitions": {"paid_at": time(self)},
                    "lines": {"data": [{"period": {"start": time(self), "end": time(self)}}]}});
                if self.chance(50) {
                    invoice["subscription"] = Value::from(sub_id);
                    invoice["subscription_details"] = json!({"metadata": metadata});
                } else {
                    invoice["parent"] = json!({"type": "subscription_details",
                        "subscription_details": {"subscription": sub_id, "metadata": metadata}});
                }
                invoice
            }
            _ => {
                json!({"id": format!("cs_fuzz_{}", self.rng.u32(..50)), "object": "checkout.session",
                "mode": "subscription", "metadata": metadata,
                "status": self.pick(&["open", "complete", "expired", "", "archived"]).to_string(),
                "subscription": if self.chance(50) { Value::from(sub_id) } else { Value::Null },
                "url": "https://checkout.stripe.com/c/pay/x", "expires_at": time(self)})
            }
        };
        let fields = [
            "id",
            "object",
            "status",
            "metadata",
            "items",
            "subscription",
            "parent",
            "amount_paid",
        ];
        for _ in 0..self.rng.usize(..3) {
            let field = *self.pick(&fields);
            if self.chance(50) {
                object.as_object_mut().expect("object").remove(field);
            } else {
                object[field] = self.json();
            }
        }
        object
    }

    /// A PaymentIntent or Refund naming a real payment or PaymentIntent, with adversarial fields;
    /// now and then a billing object instead.
    fn intent_or_refund(&mut self) -> Value {
        if self.chance(20) {
            return self.billing_object();
        }
        let payment = if self.payments.is_empty() || self.chance(10) {
            self.weird_uuid()
        } else {
            let p = self.pick(&self.payments.clone()).clone();
            p
        };
        let intent_id = if !self.intents.is_empty() && self.chance(40) {
            self.pick(&self.intents.clone()).clone()
        } else if self.chance(80) {
            format!("pi_fuzz_{}", self.rng.u32(..1000))
        } else {
            self.text()
        };
        if self.chance(25) {
            return json!({
                "id": if self.chance(80) { Value::from(format!("re_fuzz_{}", self.rng.u32(..100))) } else { self.json() },
                "object": "refund",
                "amount": self.amount(),
                "payment_intent": intent_id,
                "status": self.pick(&["succeeded", "pending", "failed", "canceled", "bogus"]).to_string(),
                "metadata": {"pgpay_payment_id": payment},
            });
        }
        let mut intent = json!({
            "id": intent_id,
            "object": "payment_intent",
            "amount": self.amount(),
            "amount_received": self.amount(),
            "currency": self.pick(&["usd", "USD", "eur", "", "usdx"]).to_string(),
            "status": self.pick(&["requires_payment_method", "requires_confirmation", "requires_action",
                "processing", "requires_capture", "canceled", "succeeded", "", "SUCCEEDED", "new_status"]).to_string(),
            "client_secret": format!("{intent_id}_secret"),
            "metadata": {"pgpay_payment_id": payment},
        });
        // Drop or replace a field now and then.
        let fields = [
            "id",
            "object",
            "amount",
            "amount_received",
            "currency",
            "status",
            "client_secret",
            "metadata",
        ];
        for _ in 0..self.rng.usize(..3) {
            let field = *self.pick(&fields);
            if self.chance(50) {
                intent.as_object_mut().expect("object").remove(field);
            } else {
                intent[field] = self.json();
            }
        }
        if intent_id.starts_with("pi_") && self.chance(50) {
            self.remember_intent(&intent_id);
        }
        intent
    }

    fn remember_intent(&mut self, id: &str) {
        if !self.intents.iter().any(|i| i == id) {
            self.intents.push(id.to_owned());
        }
    }

    /// An event as Stripe would send it, about a real payment mostly, with adversarial parts.
    fn event(&mut self) -> String {
        let object = if self.chance(80) {
            self.intent_or_refund()
        } else {
            self.json()
        };
        let kind = self
            .pick(&[
                "payment_intent.succeeded",
                "payment_intent.payment_failed",
                "payment_intent.canceled",
                "payment_intent.processing",
                "charge.refunded",
                "refund.updated",
                "checkout.session.completed",
                "customer.subscription.updated",
                "invoice.paid",
                "invoice.payment_succeeded",
                "payment_intent.",
                "",
            ])
            .to_string();
        let mut event = json!({
            "id": format!("evt_fuzz_{}", self.rng.u32(..2000)),
            "object": "event",
            "api_version": "2024-06-20",
            "created": now(),
            "type": kind,
            "livemode": false,
            "data": {"object": object},
        });
        let fields = ["id", "object", "created", "type", "livemode", "data"];
        for _ in 0..self.rng.usize(..3) {
            let field = *self.pick(&fields);
            if self.chance(40) {
                event.as_object_mut().expect("object").remove(field);
            } else {
                event[field] = self.json();
            }
        }
        let text = event.to_string();
        match self.rng.u32(..12) {
            // A `\u0000` escape or a lone surrogate, which serde_json would never write.
            0 => text.replacen("evt_fuzz", "evt\\u0000fuzz", 1),
            1 => text.replacen("evt_fuzz", "evt\\ud800fuzz", 1),
            // Damaged in transit.
            2 => text.chars().rev().collect(),
            3 => {
                let keep = self.rng.usize(..=text.chars().count());
                text.chars().take(keep).collect()
            }
            _ => text,
        }
    }

    fn amount(&mut self) -> Value {
        match self.rng.u32(..12) {
            0 => json!(1.5),
            1 => json!("1999"),
            2 => json!(-1),
            3 => json!(i64::MAX),
            4 => json!(u64::MAX),
            5 => serde_json::from_str("1e30").expect("json"),
            6 => json!(null),
            7 => self.json(),
            _ => json!(self.rng.i64(0..200_000)),
        }
    }

    fn weird_uuid(&mut self) -> String {
        self.pick(&[
            "------------------------------------",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "00000000-0000-0000-0000-000000000000",
            "0f8fad5bd9cb469fa16570867728950e0000",
            "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
            "",
        ])
        .to_string()
    }

    fn metadata(&mut self) -> Value {
        let mut map = serde_json::Map::new();
        for _ in 0..self.rng.usize(..4) {
            let key = if self.chance(70) {
                format!("k{}", self.rng.u32(..10))
            } else {
                self.text()
            };
            let value = if self.chance(70) {
                Value::from(self.text())
            } else {
                self.json()
            };
            map.insert(key, value);
        }
        Value::Object(map)
    }

    /// Text of JSON: valid mostly; deep, truncated, NUL-escaped or not JSON at all sometimes.
    fn json_text(&mut self) -> String {
        match self.rng.u32(..14) {
            0 => {
                let depth = *self.pick(&[100, 129, 1_000, 100_000]);
                format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
            }
            1 => {
                let depth = *self.pick(&[100, 200, 5_000]);
                format!("{}{{}}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            }
            2 => self.text(),
            3 => r#"{"a": "\u0000"}"#.to_owned(),
            4 => r#"{"a": "\ud800"}"#.to_owned(),
            5 => (*self.pick(&[
                "1e1000000",
                "-1e-1000000",
                "1e400",
                "123456789012345678901234567890.5",
                "NaN",
                "-0",
            ]))
            .to_string(),
            6 => r#"{"a": 1, "a": 2}"#.to_owned(),
            _ => self.json().to_string(),
        }
    }

    /// A random JSON value of small depth.
    fn json(&mut self) -> Value {
        self.json_at(0)
    }

    fn json_at(&mut self, depth: u32) -> Value {
        let leaf = depth >= 4 || self.chance(60);
        if leaf {
            return match self.rng.u32(..7) {
                0 => Value::Null,
                1 => Value::Bool(self.rng.bool()),
                2 => json!(self.rng.i64(..)),
                3 => json!(self.rng.f64() * 1e20 - 5e19),
                4 => {
                    let lexeme = self.pick::<&str>(&[
                        "1e308",
                        "-0.0",
                        "0.000000000000000000001",
                        "18446744073709551616",
                    ]);
                    serde_json::from_str(lexeme).expect("json")
                }
                _ => Value::from(self.text()),
            };
        }
        if self.rng.bool() {
            (0..self.rng.usize(..5))
                .map(|_| self.json_at(depth + 1))
                .collect()
        } else {
            let mut map = serde_json::Map::new();
            for _ in 0..self.rng.usize(..5) {
                let key = if self.chance(50) {
                    format!("k{}", self.rng.u32(..5))
                } else {
                    self.text()
                };
                map.insert(key, self.json_at(depth + 1));
            }
            Value::Object(map)
        }
    }

    /// A number as text: edges of bigint and int, Stripe's amount limits, and things that are
    /// almost numbers.
    fn number_text(&mut self) -> String {
        match self.rng.u32(..4) {
            0 => self
                .pick(&[
                    "0",
                    "-1",
                    "1",
                    "49",
                    "50",
                    "99999999",
                    "100000000",
                    "2147483647",
                    "2147483648",
                    "-2147483648",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "9223372036854775808",
                    "1e3",
                    "1.5",
                    " 12 ",
                    "0x10",
                    "NaN",
                    "",
                    "--1",
                    "١٢",
                ])
                .to_string(),
            1 => self.rng.i64(..).to_string(),
            2 => self.rng.i32(..).to_string(),
            _ => self.rng.i64(-10..2_000_000_000).to_string(),
        }
    }

    /// A string: short and plain, Unicode corner cases, SQL metacharacters, NUL, or huge.
    fn text(&mut self) -> String {
        match self.rng.u32(..16) {
            0 => String::new(),
            1 => "x".repeat(*self.pick(&[199, 200, 201, 255, 256, 1_000, 1_001, 3_000, 70_000])),
            2 if self.chance(20) => "é".repeat(600_000),
            3 => "a\u{0}b".to_owned(),
            4 => self
                .pick(&[
                    "'; DROP TABLE pay.payments; --",
                    "$$; SELECT 1; $$",
                    "\\",
                    "%s%n%x",
                    "\"",
                    "E'\\x00'",
                    "{payment_intent}",
                    "metadata[x][y]",
                ])
                .to_string(),
            5 => self
                .pick(&[
                    "\u{FEFF}bom",
                    "\u{202E}rtl",
                    "e\u{301}",
                    "😀",
                    "\u{FFFF}",
                    "\u{10FFFF}",
                    "\u{7}\u{1b}[31m",
                    "\r\n\t",
                    "\\u0000",
                    "\\ud800",
                ])
                .to_string(),
            _ => {
                let len = self.rng.usize(1..20);
                (0..len).map(|_| self.rng.alphanumeric()).collect()
            }
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
