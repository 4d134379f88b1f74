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
struct OpLabels {
    op: String,
}

/// The outbox kinds (`pay.outbox_kind` in sql/01_schema.sql); anything else is counted as
/// `other` to bound cardinality.
const OUTBOX_KINDS: [&str; 5] = [
    "create_payment_intent",
    "cancel_payment_intent",
    "refund",
    "create_checkout_session",
    "expire_checkout_session",
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

    pub(crate) fn key_lookup(&self, result: &str) {
        self.key_lookups
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
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
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert_eq!(m.commands("create_payment_intent", Outcome::Completed), 1);
        assert_eq!(m.commands_with(Outcome::Fenced), 1);
        assert_eq!(m.fenced_completions(), 1);
    }
}
