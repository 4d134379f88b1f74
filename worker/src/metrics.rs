//! Prometheus metrics, one registry per worker (no globals, so tests can run several
//! workers in one process and read each one's counters).

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Outcome of one claimed command (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx recorded with `complete_outbox`.
    Completed,
    /// Retryable failure recorded with `retry_outbox`.
    Retried,
    /// Permanent failure recorded with `fail_outbox` (Stripe 4xx or a malformed row).
    Failed,
    /// The write-back was refused: another worker holds a newer attempt.
    Fenced,
    /// Handed back unsent (shutdown, or the lease ran too short to send safely).
    Released,
    /// The write-back could not reach the database; the lease will expire and the
    /// command will be re-sent with the same key.
    Abandoned,
}

impl Outcome {
    /// Stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Fenced => "fenced",
            Outcome::Released => "released",
            Outcome::Abandoned => "abandoned",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    kind: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event_type: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
    status: String,
    phase: String,
}

/// Which part of the worker sent a request to Stripe (the `phase` label of
/// `pgpay_worker_stripe_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripePhase {
    /// Outbox commands, and the key-retention lookups made before re-sending a create.
    Outbox,
    /// Reconciliation's list pages (PaymentIntents, Checkout Sessions, events).
    Reconcile,
    /// The refresh of stuck payments (one GET each).
    Refresh,
}

impl StripePhase {
    /// Stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StripePhase::Outbox => "outbox",
            StripePhase::Reconcile => "reconcile",
            StripePhase::Refresh => "refresh",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointOnly {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnomalyLabels {
    kind: String,
    subject: String,
}

/// A Stripe API path with its object ids replaced by `{id}` (`/v1/payment_intents/{id}/cancel`),
/// so the `endpoint` label has a handful of values. An id is a segment with an underscore after
/// a prefix of two to four lower-case letters (`pi_`, `re_`, `cus_`, `seti_`, ...); the few
/// collection names of that shape are kept.
pub fn endpoint_label(method: &str, path: &str) -> String {
    const COLLECTIONS: [&str; 4] = ["tax_rates", "tax_ids", "tax_codes", "test_helpers"];
    let path = path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path
        .split('/')
        .map(|seg| match seg.split_once('_') {
            Some((prefix, rest))
                if !rest.is_empty()
                    && (2..=4).contains(&prefix.len())
                    && prefix.bytes().all(|b| b.is_ascii_lowercase())
                    && !COLLECTIONS.contains(&seg) =>
            {
                "{id}"
            }
            _ => seg,
        })
        .collect();
    format!("{method} {}", segments.join("/"))
}

fn status_label(status: Option<u16>) -> String {
    status.map_or_else(|| "error".to_owned(), |s| s.to_string())
}

fn apply_histogram() -> Histogram {
    // 0.5 ms .. ~4 s: an ingest commits in a few ms; lock waits and slow triggers go higher.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

fn lock_wait_histogram() -> Histogram {
    // 10 µs .. ~80 ms and above: uncontended locks take microseconds.
    Histogram::new(exponential_buckets(0.00001, 2.0, 14))
}

/// The outbox kinds (`pay.outbox_kind` in sql/01_schema.sql); anything else is counted as
/// `other` to bound cardinality.
const OUTBOX_KINDS: [&str; 8] = [
    "create_payment_intent",
    "cancel_payment_intent",
    "refund",
    "create_checkout_session",
    "expire_checkout_session",
    "create_subscription_session",
    "update_subscription",
    "cancel_subscription",
];

fn kind_label(kind: &str) -> &str {
    if OUTBOX_KINDS.contains(&kind) {
        kind
    } else {
        "other"
    }
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~41 s: Stripe answers in 100 ms–2 s; timeouts land in the top buckets.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// All of one worker's metrics. Names (with the `_total` suffix on counters):
/// see [`Metrics::new`].
pub struct Metrics {
    registry: Mutex<Registry>,
    commands: Family<CommandLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    fenced: Counter,
    replayed: Counter,
    latency: Family<KindLabels, Histogram, fn() -> Histogram>,
    queue_depth: Family<StatusLabels, Gauge>,
    notifications: Counter,
    polls: Counter,
    claimed: Counter,
    in_flight: Gauge,
    listener_connected: Gauge,
    listener_reconnects: Counter,
    db_errors: Family<OpLabels, Counter>,
    webhooks: Family<StatusLabels, Counter>,
    key_lookups: Family<ResultLabels, Counter>,
    webhook_events: Family<EventLabels, Counter>,
    webhook_apply: Family<EventLabels, Histogram, fn() -> Histogram>,
    lock_wait: Histogram,
    stripe_requests: Family<EndpointLabels, Counter>,
    stripe_replayed: Family<EndpointOnly, Counter>,
    outbox_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    anomalies: Family<AnomalyLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    reconcile_pages: Family<PhaseLabels, Counter>,
    reconcile_objects: Family<PhaseLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers:
    /// - `pgpay_worker_commands_total{kind,outcome}`
    /// - `pgpay_worker_retries_total{reason}`
    /// - `pgpay_worker_fenced_completions_total`
    /// - `pgpay_worker_idempotent_replays_total`
    /// - `pgpay_worker_stripe_request_duration_seconds{kind}` (histogram)
    /// - `pgpay_worker_queue_depth{status}` (gauge, refreshed on scrape)
    /// - `pgpay_worker_notifications_total`, `pgpay_worker_polls_total`
    /// - `pgpay_worker_claimed_total`, `pgpay_worker_in_flight` (gauge)
    /// - `pgpay_worker_listener_connected` (gauge), `pgpay_worker_listener_reconnects_total`
    /// - `pgpay_worker_db_errors_total{op}`
    /// - `pgpay_worker_webhooks_total{status}`
    /// - `pgpay_worker_key_retention_lookups_total{result}` (adopted, rekeyed, failed)
    /// - `pgpay_worker_webhook_events_total{event_type,outcome}` (signed deliveries relayed)
    /// - `pgpay_worker_webhook_apply_duration_seconds{event_type,outcome}` (histogram)
    /// - `pgpay_worker_webhook_lock_wait_seconds` (histogram)
    /// - `pgpay_worker_stripe_requests_total{endpoint,status,phase}` (phase: outbox, reconcile,
    ///   refresh)
    /// - `pgpay_worker_stripe_idempotent_replayed_total{endpoint}`
    /// - `pgpay_worker_outbox_lag_seconds` (gauge, refreshed on scrape)
    /// - `pgpay_worker_anomaly_score{kind,subject}` (gauge, refreshed by the anomaly check)
    /// - `pgpay_worker_reconcile_pages_total{phase}`, `pgpay_worker_reconcile_objects_total{phase}`
    ///   (scheduled reconciliation; phase `payments`, `subscriptions`, `invoices`, `events`)
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("pgpay_worker")),
            commands: Family::default(),
            retries: Family::default(),
            fenced: Counter::default(),
            replayed: Counter::default(),
            latency: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            notifications: Counter::default(),
            polls: Counter::default(),
            claimed: Counter::default(),
            in_flight: Gauge::default(),
            listener_connected: Gauge::default(),
            listener_reconnects: Counter::default(),
            db_errors: Family::default(),
            webhooks: Family::default(),
            key_lookups: Family::default(),
            webhook_events: Family::default(),
            webhook_apply: Family::new_with_constructor(apply_histogram),
            lock_wait: lock_wait_histogram(),
            stripe_requests: Family::default(),
            stripe_replayed: Family::default(),
            outbox_lag: Gauge::default(),
            reconcile_pages: Family::default(),
            reconcile_objects: Family::default(),
            anomalies: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register(
                "commands",
                "Outbox commands handled, by kind and outcome",
                m.commands.clone(),
            );
            r.register(
                "retries",
                "Commands handed back for a retry, by reason",
                m.retries.clone(),
            );
            r.register(
                "fenced_completions",
                "Write-backs refused because another worker holds a newer attempt",
                m.fenced.clone(),
            );
            r.register(
                "idempotent_replays",
                "Stripe answers served from Stripe's idempotency store (Idempotent-Replayed: true)",
                m.replayed.clone(),
            );
            r.register(
                "stripe_request_duration_seconds",
                "Latency of requests to Stripe, by command kind",
                m.latency.clone(),
            );
            r.register(
                "queue_depth",
                "Outbox commands by status (pending, in_flight), sampled at scrape time",
                m.queue_depth.clone(),
            );
            r.register(
                "notifications",
                "NOTIFY pay_outbox doorbells received",
                m.notifications.clone(),
            );
            r.register("polls", "Periodic outbox polls", m.polls.clone());
            r.register("claimed", "Commands claimed", m.claimed.clone());
            r.register(
                "in_flight",
                "Commands claimed by this worker and not yet written back",
                m.in_flight.clone(),
            );
            r.register(
                "listener_connected",
                "1 while the LISTEN connection is up",
                m.listener_connected.clone(),
            );
            r.register(
                "listener_reconnects",
                "LISTEN connections (re)established",
                m.listener_reconnects.clone(),
            );
            r.register(
                "db_errors",
                "Database calls that failed, by operation",
                m.db_errors.clone(),
            );
            r.register(
                "webhooks",
                "Webhook deliveries relayed to pay.ingest_webhook, by status",
                m.webhooks.clone(),
            );
            r.register(
                "key_retention_lookups",
                "Creates past Stripe's key retention looked up before a re-send, by result",
                m.key_lookups.clone(),
            );
            r.register(
                "webhook_events",
                "Signed webhook deliveries relayed, by event type and outcome (applied, duplicate, stored, quarantined, deferred)",
                m.webhook_events.clone(),
            );
            r.register(
                "webhook_apply_duration_seconds",
                "Time of the ingest call for a signed delivery, measured in the relay, by event type and outcome",
                m.webhook_apply.clone(),
            );
            r.register(
                "webhook_lock_wait_seconds",
                "Time ingest spent finding and locking the payment's row (reported by the database)",
                m.lock_wait.clone(),
            );
            r.register(
                "stripe_requests",
                "Requests to Stripe, by endpoint, HTTP status (error: no answer) and phase (outbox, reconcile, refresh)",
                m.stripe_requests.clone(),
            );
            r.register(
                "stripe_idempotent_replayed",
                "Stripe answers carrying Idempotent-Replayed: true, by endpoint",
                m.stripe_replayed.clone(),
            );
            r.register(
                "outbox_lag_seconds",
                "Age of the oldest due pending outbox command (0 when none), sampled at scrape time",
                m.outbox_lag.clone(),
            );
            r.register(
                "anomaly_score",
                "Current anomalies of pay.anomalies by kind and subject (the rule's score); gone when resolved",
                m.anomalies.clone(),
            );
            r.register(
                "reconcile_pages",
                "Stripe list pages read by scheduled reconciliation runs, by phase (payments: PaymentIntents and Checkout Sessions; subscriptions; invoices; events)",
                m.reconcile_pages.clone(),
            );
            r.register(
                "reconcile_objects",
                "Stripe objects handed to the database by scheduled reconciliation runs, by phase",
                m.reconcile_objects.clone(),
            );
        }
        m
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }

    pub(crate) fn command(&self, kind: &str, outcome: Outcome) {
        self.commands
            .get_or_create(&CommandLabels {
                kind: kind_label(kind).to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
        if outcome == Outcome::Fenced {
            self.fenced.inc();
        }
    }
    pub(crate) fn retry(&self, reason: &str) {
        self.retries
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
    pub(crate) fn replayed(&self) {
        self.replayed.inc();
    }
    pub(crate) fn observe_latency(&self, kind: &str, secs: f64) {
        self.latency
            .get_or_create(&KindLabels {
                kind: kind_label(kind).to_owned(),
            })
            .observe(secs);
    }
    pub(crate) fn set_queue_depth(&self, status: &str, n: i64) {
        self.queue_depth
            .get_or_create(&StatusLabels {
                status: status.to_owned(),
            })
            .set(n);
    }
    pub(crate) fn notification(&self) {
        self.notifications.inc();
    }
    pub(crate) fn poll(&self) {
        self.polls.inc();
    }
    pub(crate) fn claimed_n(&self, n: u64) {
        self.claimed.inc_by(n);
    }
    pub(crate) fn set_in_flight(&self, n: i64) {
        self.in_flight.set(n);
    }
    pub(crate) fn listener_up(&self, up: bool) {
        self.listener_connected.set(i64::from(up));
        if up {
            self.listener_reconnects.inc();
        }
    }
    pub(crate) fn db_error(&self, op: &str) {
        self.db_errors
            .get_or_create(&OpLabels { op: op.to_owned() })
            .inc();
    }
    pub(crate) fn webhook(&self, status: &str) {
        self.webhooks
            .get_or_create(&StatusLabels {
                status: status.to_owned(),
            })
            .inc();
    }

    /// One signed delivery relayed: its type, outcome, how long the ingest call took and, when
    /// it named a payment, how long the database waited for that payment's row.
    pub(crate) fn webhook_event(
        &self,
        event_type: &str,
        outcome: &str,
        took: std::time::Duration,
        lock_wait: Option<std::time::Duration>,
    ) {
        let labels = EventLabels {
            event_type: event_type.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.webhook_events.get_or_create(&labels).inc();
        self.webhook_apply
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(wait) = lock_wait {
            self.lock_wait.observe(wait.as_secs_f64());
        }
    }
    /// One request to Stripe from `phase`: `status` is the HTTP status, `None` when no answer
    /// came.
    pub(crate) fn stripe_request(
        &self,
        phase: StripePhase,
        method: &str,
        path: &str,
        status: Option<u16>,
        replayed: bool,
    ) {
        let endpoint = endpoint_label(method, path);
        self.stripe_requests
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.clone(),
                status: status_label(status),
                phase: phase.as_str().to_owned(),
            })
            .inc();
        if replayed {
            self.stripe_replayed
                .get_or_create(&EndpointOnly { endpoint })
                .inc();
        }
    }
    pub(crate) fn set_outbox_lag(&self, seconds: f64) {
        self.outbox_lag.set(seconds);
    }
    /// Replaces the anomaly gauges with `current` (kind, subject, score).
    pub(crate) fn set_anomalies(&self, current: &[(String, String, f64)]) {
        self.anomalies.clear();
        for (kind, subject, score) in current {
            self.anomalies
                .get_or_create(&AnomalyLabels {
                    kind: kind.clone(),
                    subject: subject.clone(),
                })
                .set(*score);
        }
    }

    /// One finished reconciliation run: its pages and objects by phase.
    pub(crate) fn reconciled(&self, c: &crate::jobs::reconcile::Counts) {
        for (phase, pages, objects) in [
            ("payments", c.pages, c.objects),
            ("subscriptions", c.subscription_pages, c.subscriptions),
            ("invoices", c.invoice_pages, c.invoices),
            ("events", c.event_pages, c.events_seen),
        ] {
            let labels = PhaseLabels { phase };
            self.reconcile_pages.get_or_create(&labels).inc_by(pages);
            self.reconcile_objects
                .get_or_create(&labels)
                .inc_by(objects);
        }
    }

    /// Objects handed to the database by reconciliation runs in `phase` (for tests).
    pub fn reconciled_objects(&self, phase: &'static str) -> u64 {
        self.reconcile_objects
            .get(&PhaseLabels { phase })
            .map_or(0, |c| c.get())
    }

    pub(crate) fn key_lookup(&self, result: &str) {
        self.key_lookups
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }
    /// Requests to Stripe counted for `endpoint` (as [`endpoint_label`] writes it), `status`
    /// (`None`: no answer) and `phase`.
    pub fn stripe_requests(&self, endpoint: &str, status: Option<u16>, phase: StripePhase) -> u64 {
        self.stripe_requests
            .get(&EndpointLabels {
                endpoint: endpoint.to_owned(),
                status: status_label(status),
                phase: phase.as_str().to_owned(),
            })
            .map_or(0, |c| c.get())
    }
    /// Key-retention lookups with `result` (`adopted`, `rekeyed`, `failed`).
    pub fn key_lookups(&self, result: &str) -> u64 {
        self.key_lookups
            .get(&ResultLabels {
                result: result.to_owned(),
            })
            .map_or(0, |c| c.get())
    }
    /// Commands of `kind` that ended with `outcome` so far (for tests and status output).
    pub fn commands(&self, kind: &str, outcome: Outcome) -> u64 {
        self.commands
            .get(&CommandLabels {
                kind: kind_label(kind).to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .map_or(0, |c| c.get())
    }
    /// Commands with `outcome`, all kinds.
    pub fn commands_with(&self, outcome: Outcome) -> u64 {
        OUTBOX_KINDS
            .iter()
            .chain(&["other"])
            .map(|k| self.commands(k, outcome))
            .sum()
    }
    /// Retries for `reason` (`http_429`, `timeout`, ...: the `reason` label).
    pub fn retries(&self, reason: &str) -> u64 {
        self.retries
            .get(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .map_or(0, |c| c.get())
    }
    /// Write-backs refused by fencing.
    pub fn fenced_completions(&self) -> u64 {
        self.fenced.get()
    }
    /// Answers Stripe replayed from its idempotency store.
    pub fn idempotent_replays(&self) -> u64 {
        self.replayed.get()
    }
    /// Doorbells received.
    pub fn notifications(&self) -> u64 {
        self.notifications.get()
    }
    /// Periodic polls done.
    pub fn polls(&self) -> u64 {
        self.polls.get()
    }
    /// Commands claimed.
    pub fn claimed(&self) -> u64 {
        self.claimed.get()
    }
    /// Whether the LISTEN connection is up.
    pub fn listener_is_connected(&self) -> bool {
        self.listener_connected.get() == 1
    }
    /// LISTEN connections established so far.
    pub fn listener_connections(&self) -> u64 {
        self.listener_reconnects.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::new();
        m.command("create_payment_intent", Outcome::Completed);
        m.command("weird_kind", Outcome::Fenced);
        m.retry("http_429");
        m.replayed();
        m.observe_latency("refund", 0.12);
        m.set_queue_depth("pending", 3);
        m.notification();
        m.poll();
        m.listener_up(true);
        m.webhook("applied");
        m.db_error("claim");
        m.webhook_event(
            "payment_intent.succeeded",
            "quarantined",
            std::time::Duration::from_millis(3),
            Some(std::time::Duration::from_micros(50)),
        );
        m.stripe_request(
            StripePhase::Outbox,
            "POST",
            "/v1/payment_intents/pi_123/cancel",
            Some(200),
            true,
        );
        m.stripe_request(StripePhase::Outbox, "POST", "/v1/refunds", None, false);
        m.stripe_request(
            StripePhase::Reconcile,
            "GET",
            "/v1/checkout/sessions",
            Some(200),
            false,
        );
        m.stripe_request(
            StripePhase::Refresh,
            "GET",
            "/v1/payment_intents/pi_9",
            Some(404),
            false,
        );
        m.set_outbox_lag(12.5);
        m.set_anomalies(&[("silence".into(), "payment successes".into(), 4.5)]);
        let text = m.encode();
        for needle in [
            "pgpay_worker_commands_total{kind=\"create_payment_intent\",outcome=\"completed\"} 1",
            "pgpay_worker_commands_total{kind=\"other\",outcome=\"fenced\"} 1",
            "pgpay_worker_retries_total{reason=\"http_429\"} 1",
            "pgpay_worker_fenced_completions_total 1",
            "pgpay_worker_idempotent_replays_total 1",
            "pgpay_worker_stripe_request_duration_seconds_bucket{le=\"0.16\",kind=\"refund\"} 1",
            "pgpay_worker_queue_depth{status=\"pending\"} 3",
            "pgpay_worker_notifications_total 1",
            "pgpay_worker_polls_total 1",
            "pgpay_worker_listener_connected 1",
            "pgpay_worker_webhooks_total{status=\"applied\"} 1",
            "pgpay_worker_db_errors_total{op=\"claim\"} 1",
            "pgpay_worker_webhook_events_total{event_type=\"payment_intent.succeeded\",outcome=\"quarantined\"} 1",
            "pgpay_worker_webhook_apply_duration_seconds_count{event_type=\"payment_intent.succeeded\",outcome=\"quarantined\"} 1",
            "pgpay_worker_webhook_lock_wait_seconds_count 1",
            "pgpay_worker_stripe_requests_total{endpoint=\"POST /v1/payment_intents/{id}/cancel\",status=\"200\",phase=\"outbox\"} 1",
            "pgpay_worker_stripe_requests_total{endpoint=\"POST /v1/refunds\",status=\"error\",phase=\"outbox\"} 1",
            "pgpay_worker_stripe_requests_total{endpoint=\"GET /v1/checkout/sessions\",status=\"200\",phase=\"reconcile\"} 1",
            "pgpay_worker_stripe_requests_total{endpoint=\"GET /v1/payment_intents/{id}\",status=\"404\",phase=\"refresh\"} 1",
            "pgpay_worker_stripe_idempotent_replayed_total{endpoint=\"POST /v1/payment_intents/{id}/cancel\"} 1",
            "pgpay_worker_outbox_lag_seconds 12.5",
            "pgpay_worker_anomaly_score{kind=\"silence\",subject=\"payment successes\"} 4.5",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert_eq!(m.commands("create_payment_intent", Outcome::Completed), 1);
        assert_eq!(m.commands_with(Outcome::Fenced), 1);
        assert_eq!(m.fenced_completions(), 1);
        assert_eq!(
            m.stripe_requests(
                "GET /v1/checkout/sessions",
                Some(200),
                StripePhase::Reconcile
            ),
            1
        );
        assert_eq!(
            m.stripe_requests("GET /v1/checkout/sessions", Some(200), StripePhase::Outbox),
            0,
            "phases are apart"
        );
        m.set_anomalies(&[]);
        assert!(
            !m.encode().contains("anomaly_score{"),
            "a resolved anomaly's gauge goes"
        );
    }

    #[test]
    fn endpoints_hide_object_ids() {
        for (path, want) in [
            ("/v1/payment_intents", "POST /v1/payment_intents"),
            (
                "/v1/payment_intents/pi_3MtwBw/cancel",
                "POST /v1/payment_intents/{id}/cancel",
            ),
            (
                "/v1/payment_intents/search?query=x",
                "POST /v1/payment_intents/search",
            ),
            ("/v1/refunds", "POST /v1/refunds"),
            (
                "/v1/checkout/sessions/cs_test_a1",
                "POST /v1/checkout/sessions/{id}",
            ),
            ("/v1/payment_intents/", "POST /v1/payment_intents/"),
            ("/v1/setup_intents/seti_1Abc", "POST /v1/setup_intents/{id}"),
            (
                "/v1/customers/cus_9s6XKzkNRiz8i3",
                "POST /v1/customers/{id}",
            ),
            ("/v1/tax_rates", "POST /v1/tax_rates"),
        ] {
            assert_eq!(endpoint_label("POST", path), want, "{path}");
        }
    }
}
