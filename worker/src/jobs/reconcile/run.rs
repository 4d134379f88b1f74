//! One run: start, the PaymentIntent, Checkout Session, subscription and invoice pages, the event
//! pages, the missing ones, finish.

use std::time::Instant;

use pgpay_core::outcome::Outcome;
use serde_json::Value;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use super::{Change, Counts, Finding, Phase, ReconcileOptions, Report, Started, MAX_CHANGES_KEPT};
use crate::error_chain::ErrorChain;
use crate::jobs::{db_op, JobError};
use crate::stripe::{Page, ReadError, StripeReader};

const START: &str = "SELECT run_id, floor(extract(epoch FROM w.window_start))::bigint \
     FROM (SELECT now() - make_interval(secs => $2::float8) AS window_start) w, \
     LATERAL pay.start_reconciliation($1::text, w.window_start, now(), make_interval(secs => $3::float8)) run_id";
const APPLY_OBJECTS: &str = "SELECT stripe_object_id, outcome, payment_id::text, detail \
     FROM pay.apply_stripe_objects($1::jsonb, $2::text, $3::bigint)";
const APPLY_EVENTS: &str =
    "SELECT r.status FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY e(value, n) \
     CROSS JOIN LATERAL pay.apply_stripe_event(e.value) r ORDER BY e.n";
const PROGRESS: &str =
    "SELECT pay.progress_reconciliation($1::bigint, $2::int, $3::int, $4::int, $5::int, \
     $6::int, $7::int, make_interval(secs => $8::float8))";
const MISSING: &str = "SELECT pay.record_missing_at_stripe($1::bigint, $2::text[])";
const MISSING_SUBSCRIPTIONS: &str =
    "SELECT pay.record_missing_subscriptions_at_stripe($1::bigint, $2::text[])";
/// Pages of test clocks read before giving up on listing their subscriptions (test mode only).
const MAX_CLOCK_PAGES: usize = 10;
const FINISH: &str = "SELECT findings::bigint FROM pay.finish_reconciliation($1::bigint, $2::text)";
const FINDINGS: &str = "SELECT kind, payment_id::text, stripe_object_id, expected, actual \
     FROM pay.findings WHERE run_id = $1 ORDER BY id";

fn int(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// What one run works with: a dedicated connection, the Stripe reader, who runs it, how, and the
/// callback told after every page.
pub(super) struct Job<'a> {
    pub client: &'a Client,
    pub reader: &'a StripeReader<'a>,
    pub worker_id: &'a str,
    pub options: &'a ReconcileOptions,
    pub progress: &'a (dyn Fn(Phase, &Counts) + Send + Sync),
}

pub(super) async fn run(job: &Job<'_>) -> Result<Started, JobError> {
    let Job {
        client,
        worker_id,
        options,
        ..
    } = *job;
    let started = Instant::now();
    let row = client
        .query_one(
            START,
            &[
                &worker_id,
                &options.window.as_secs_f64(),
                &options.lease.as_secs_f64(),
            ],
        )
        .await
        .map_err(db_op("start_reconciliation"))?;
    let Some(run_id) = row.get::<_, Option<i64>>(0) else {
        return Ok(Started::AlreadyRunning);
    };
    let window_start: i64 = row.get(1);
    info!(
        run_id,
        window = %humantime::format_duration(options.window),
        dry_run = options.dry_run,
        "reconciliation started"
    );
    let mut state = RunState {
        counts: Counts::default(),
        changes: Vec::new(),
        seen: Vec::new(),
        seen_subscriptions: Vec::new(),
    };
    let result = state.pages(job, run_id, window_start).await;
    let error = result.as_ref().err().map(|e| ErrorChain(e).to_string());
    let finished = client
        .query_one(FINISH, &[&run_id, &error])
        .await
        .map_err(db_op("finish_reconciliation"));
    result?;
    state.counts.findings = finished?.get::<_, i64>(0).max(0) as u64;
    let findings = if options.dry_run {
        list_findings(client, run_id).await?
    } else {
        Vec::new()
    };
    let report = Report {
        run_id,
        dry_run: options.dry_run,
        counts: state.counts,
        elapsed: started.elapsed(),
        changes: state.changes,
        findings,
    };
    info!(
        run_id,
        dry_run = report.dry_run,
        elapsed = ?report.elapsed,
        "reconciliation finished: {}",
        report.counts
    );
    Ok(Started::Ran(report))
}

/// The run's findings, if this role may read them (a savepoint keeps a refusal from
/// aborting the dry run's transaction).
async fn list_findings(client: &Client, run_id: i64) -> Result<Vec<Finding>, JobError> {
    client
        .batch_execute("SAVEPOINT pgpay_findings")
        .await
        .map_err(db_op("savepoint"))?;
    match client.query(FINDINGS, &[&run_id]).await {
        Ok(rows) => {
            client
                .batch_execute("RELEASE SAVEPOINT pgpay_findings")
                .await
                .map_err(db_op("release savepoint"))?;
            Ok(rows
                .iter()
                .map(|r| Finding {
                    kind: r.get(0),
                    payment_id: r.get(1),
                    stripe_object_id: r.get(2),
                    expected: r.get(3),
                    actual: r.get(4),
                })
                .collect())
        }
        Err(e) => {
            debug!(error = %e, "cannot list findings (no SELECT on pay.findings?)");
            client
                .batch_execute("ROLLBACK TO SAVEPOINT pgpay_findings")
                .await
                .map_err(db_op("rollback to savepoint"))?;
            Ok(Vec::new())
        }
    }
}

struct RunState {
    counts: Counts,
    changes: Vec<Change>,
    seen: Vec<String>,
    seen_subscriptions: Vec<String>,
}

impl RunState {
    async fn pages(
        &mut self,
        job: &Job<'_>,
        run_id: i64,
        window_start: i64,
    ) -> Result<(), JobError> {
        const EV: &str = "the event list";
        let Job {
            client,
            reader,
            progress,
            ..
        } = *job;
        let apply = client
            .prepare(APPLY_OBJECTS)
            .await
            .map_err(db_op("prepare"))?;
        let apply_events = client
            .prepare(APPLY_EVENTS)
            .await
            .map_err(db_op("prepare"))?;
        let progress_stmt = client.prepare(PROGRESS).await.map_err(db_op("prepare"))?;

        // PaymentIntents, then Checkout Sessions (adopting sessions whose create answer was lost),
        // then subscriptions (every status: Stripe leaves canceled ones out unless asked) and
        // their invoices (a paid one whose webhooks were lost is provisioned here).
        for (what, path, phase, filters) in [
            (
                "the PaymentIntent list",
                "/v1/payment_intents",
                Phase::PaymentIntents,
                &[][..],
            ),
            (
                "the Checkout Session list",
                "/v1/checkout/sessions",
                Phase::CheckoutSessions,
                &[][..],
            ),
            (
                "the subscription list",
                "/v1/subscriptions",
                Phase::Subscriptions,
                &[("status", "all")][..],
            ),
            ("the invoice list", "/v1/invoices", Phase::Invoices, &[][..]),
        ] {
            self.object_pages(
                job,
                &apply,
                &progress_stmt,
                run_id,
                window_start,
                (what, path, phase, filters),
            )
            .await?;
            if phase == Phase::Subscriptions {
                // Stripe lists subscriptions on test clocks only when asked per clock (or per
                // customer): without this, a complete listing would not be complete in test mode.
                self.test_clock_subscriptions(job, &apply, &progress_stmt, run_id, window_start)
                    .await?;
            }
        }

        // Events the webhooks may have missed, through the same dedup and transition path.
        let mut cursor: Option<String> = None;
        loop {
            let Page { data, next } = reader
                .list_page(EV, "/v1/events", window_start, cursor.as_deref())
                .await?;
            cursor = next;
            self.counts.event_pages += 1;
            self.counts.events_seen += data.len() as u64;
            let rows = client
                .query(&apply_events, &[&Value::Array(data)])
                .await
                .map_err(db_op("apply_stripe_event"))?;
            self.counts.events_replayed += rows
                .iter()
                .filter(|r| {
                    r.get::<_, Option<String>>(0).and_then(|s| s.parse().ok())
                        != Some(Outcome::Duplicate)
                })
                .count() as u64;
            self.save_progress(job, &progress_stmt, run_id).await?;
            progress(Phase::Events, &self.counts);
            if cursor.is_none() {
                break;
            }
            if reader.is_cancelled() {
                return Err(JobError::Canceled);
            }
        }

        // The listing was complete: payments whose PaymentIntent Stripe did not list.
        let seen = std::mem::take(&mut self.seen);
        let missing: Option<i32> = client
            .query_one(MISSING, &[&run_id, &seen])
            .await
            .map_err(db_op("record_missing_at_stripe"))?
            .get(0);
        self.counts.missing_at_stripe = missing.unwrap_or(0).max(0) as u64;
        let seen = std::mem::take(&mut self.seen_subscriptions);
        let missing: Option<i32> = client
            .query_one(MISSING_SUBSCRIPTIONS, &[&run_id, &seen])
            .await
            .map_err(db_op("record_missing_subscriptions_at_stripe"))?
            .get(0);
        self.counts.missing_at_stripe += missing.unwrap_or(0).max(0) as u64;
        Ok(())
    }

    /// The subscriptions of every test clock (`GET /v1/test_helpers/test_clocks`, then
    /// `GET /v1/subscriptions?test_clock=…` per clock). Live mode has no test clocks: a refusal
    /// of the clock list means there are none.
    async fn test_clock_subscriptions(
        &mut self,
        job: &Job<'_>,
        apply: &tokio_postgres::Statement,
        progress_stmt: &tokio_postgres::Statement,
        run_id: i64,
        window_start: i64,
    ) -> Result<(), JobError> {
        const CLOCKS: &str = "the test clock list";
        let reader = job.reader;
        let mut clocks = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_CLOCK_PAGES {
            let page = match reader
                .list_page_with(
                    CLOCKS,
                    "/v1/test_helpers/test_clocks",
                    &[],
                    None,
                    after.as_deref(),
                )
                .await
            {
                Ok(page) => page,
                Err(ReadError::Stripe { status, .. }) if (400..500).contains(&status) => {
                    debug!(status, "no test clocks to list (live mode)");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            clocks.extend(
                page.data
                    .iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_owned)),
            );
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        for clock in &clocks {
            self.object_pages(
                job,
                apply,
                progress_stmt,
                run_id,
                window_start,
                (
                    "the subscription list of a test clock",
                    "/v1/subscriptions",
                    Phase::Subscriptions,
                    &[("status", "all"), ("test_clock", clock.as_str())],
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Every page of one object list, each applied while the next is fetched.
    async fn object_pages(
        &mut self,
        job: &Job<'_>,
        apply: &tokio_postgres::Statement,
        progress_stmt: &tokio_postgres::Statement,
        run_id: i64,
        window_start: i64,
        (what, path, phase, filters): (&'static str, &str, Phase, &[(&str, &str)]),
    ) -> Result<(), JobError> {
        let Job {
            client,
            reader,
            progress,
            ..
        } = *job;
        let mut page = reader
            .list_page_with(what, path, filters, Some(window_start), None)
            .await?;
        loop {
            let Page { data, next: cursor } = page;
            let fetch = async {
                match &cursor {
                    Some(after) => reader
                        .list_page_with(what, path, filters, Some(window_start), Some(after))
                        .await
                        .map(Some),
                    None => Ok(None),
                }
            };
            let (applied, next) = tokio::join!(
                self.apply_objects(client, apply, run_id, phase, data),
                fetch
            );
            applied?;
            self.save_progress(job, progress_stmt, run_id).await?;
            progress(phase, &self.counts);
            match next? {
                Some(p) => page = p,
                None => return Ok(()),
            }
            if reader.is_cancelled() {
                return Err(JobError::Canceled);
            }
        }
    }

    async fn apply_objects(
        &mut self,
        client: &Client,
        stmt: &tokio_postgres::Statement,
        run_id: i64,
        phase: Phase,
        data: Vec<Value>,
    ) -> Result<(), JobError> {
        let n = data.len() as u64;
        let c = &mut self.counts;
        let (pages, objects) = match phase {
            Phase::Subscriptions => (&mut c.subscription_pages, &mut c.subscriptions),
            Phase::Invoices => (&mut c.invoice_pages, &mut c.invoices),
            Phase::PaymentIntents | Phase::CheckoutSessions | Phase::Events => {
                (&mut c.pages, &mut c.objects)
            }
        };
        *pages += 1;
        *objects += n;
        if data.is_empty() {
            return Ok(());
        }
        self.seen.extend(
            data.iter()
                .filter(|o| o["object"] == "payment_intent")
                .filter_map(|o| o["id"].as_str().map(str::to_owned)),
        );
        self.seen_subscriptions.extend(
            data.iter()
                .filter(|o| o["object"] == "subscription")
                .filter_map(|o| o["id"].as_str().map(str::to_owned)),
        );
        let rows = client
            .query(stmt, &[&Value::Array(data), &"reconcile", &run_id])
            .await
            .map_err(db_op("apply_stripe_objects"))?;
        for r in &rows {
            let text: Option<String> = r.get(1);
            let text = text.unwrap_or_default();
            let Ok(outcome) = text.parse::<Outcome>() else {
                warn!(outcome = text, "unknown outcome from apply_stripe_objects");
                continue;
            };
            let c = &mut self.counts;
            match outcome {
                Outcome::Applied => c.applied += 1,
                Outcome::Unchanged => c.unchanged += 1,
                Outcome::Ignored => c.ignored += 1,
                Outcome::Flagged => c.flagged += 1,
                Outcome::Adopted => c.adopted += 1,
                Outcome::NotOurs => c.not_ours += 1,
                other => warn!(outcome = %other, "unexpected outcome from apply_stripe_objects"),
            }
            if outcome.changed_a_payment() && self.changes.len() < MAX_CHANGES_KEPT {
                self.changes.push(Change {
                    stripe_object_id: r.get::<_, Option<String>>(0).unwrap_or_default(),
                    outcome,
                    payment_id: r.get(2),
                    detail: r.get(3),
                });
            }
        }
        Ok(())
    }

    async fn save_progress(
        &self,
        job: &Job<'_>,
        stmt: &tokio_postgres::Statement,
        run_id: i64,
    ) -> Result<(), JobError> {
        let c = &self.counts;
        let ours: bool = job
            .client
            .query_one(
                stmt,
                &[
                    &run_id,
                    &int(c.pages + c.subscription_pages + c.invoice_pages + c.event_pages),
                    &int(c.objects + c.subscriptions + c.invoices),
                    &int(c.applied + c.flagged),
                    &int(c.adopted),
                    &int(c.not_ours),
                    &int(c.events_replayed),
                    &job.options.lease.as_secs_f64(),
                ],
            )
            .await
            .map_err(db_op("progress_reconciliation"))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        if ours {
            Ok(())
        } else {
            Err(JobError::LeaseLost)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_into_sql_ints() {
        assert_eq!(int(5), 5);
        assert_eq!(int(u64::MAX), i32::MAX);
    }
}
