//! Configuration: defaults, then environment, then flags (clap's precedence, see [`args`]),
//! validated once at startup into a [`WorkerConfig`]. Library users (tests) build a
//! [`WorkerConfig`] directly with [`WorkerConfig::new`] and adjust fields.

mod args;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

pub use self::args::{parse_duration, RunArgs, ScheduleArgs};
use crate::secret::SecretString;
use crate::stripe::{RetryPolicy, StripeConfig};

/// Safety margin between the end of our send and the end of our lease, for clock-rate
/// differences and the time the claim itself took. `validate` requires
/// `lease >= request_timeout + 2 * LEASE_MARGIN`.
pub(crate) const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// The defaults, written once: [`WorkerConfig::new`] starts from them and the flags show
/// them (the retry defaults are [`RetryPolicy::DEFAULT`]).
mod defaults {
    use std::time::Duration;

    /// Stripe's API.
    pub const API_BASE: &str = "https://api.stripe.com";
    /// The API version the worker (and the extension's response handling) is written against.
    pub const STRIPE_VERSION: &str = "2024-06-20";
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const CONCURRENCY: usize = 16;
    pub const BATCH_SIZE: u32 = 32;
    pub const LEASE: Duration = Duration::from_secs(60);
    pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// Stripe allows 25 requests/s in test mode: headroom for reconciliation and the dashboard.
    pub const RATE_LIMIT: f64 = 20.0;
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DB_POOL_SIZE: usize = 4;
    /// An hour of margin before Stripe forgets an Idempotency-Key (24 h).
    pub const KEY_RETENTION_GUARD: Duration = Duration::from_secs(23 * 3600);
    pub const RECONCILE_WINDOW: Duration = Duration::from_secs(48 * 3600);
    pub const REFRESH_STUCK_EVERY: Duration = Duration::from_secs(300);
    pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HTTP_BODY_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HTTP_MAX_CONNECTIONS: usize = 256;
}

/// Everything `run` needs. `Debug` is safe to log: the database password and the Stripe key
/// are redacted.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where the outbox lives (`DATABASE_URL`), parsed. Its `Debug` hides the password.
    pub database: crate::tls::DatabaseConfig,
    /// How to reach Stripe.
    pub stripe: StripeConfig,
    /// `lease_owner` written by `claim_outbox`: hostname-pid-random by default.
    pub worker_id: String,
    /// Commands in flight at once (claimed and not yet written back).
    pub concurrency: usize,
    /// Rows per `claim_outbox` call.
    pub batch_size: u32,
    /// Lease per claimed row. A command is never started with less than its request
    /// timeout left on the lease, so a lease taken over never overlaps a send of ours.
    pub lease: Duration,
    /// Periodic poll, the fallback for lost notifications and for retries coming due.
    pub poll_interval: Duration,
    /// Requests per second to Stripe; `0` lifts the limit.
    pub rate_limit: f64,
    /// Optional HTTP endpoint for `/healthz`, `/metrics`, `/webhooks/stripe`.
    pub http_listen: Option<SocketAddr>,
    /// How long shutdown waits for in-flight requests before releasing them.
    pub shutdown_timeout: Duration,
    /// Connections in the pool used for claim/complete and the HTTP endpoints.
    pub db_pool_size: usize,
    /// Retry delays.
    pub retry: RetryPolicy,
    /// `LISTEN pay_outbox`. Off only in tests that prove the poll alone delivers.
    pub listen_for_notifications: bool,
    /// A create first attempted longer ago than this may have outlived Stripe's 24-hour
    /// Idempotency-Key retention: it is looked up by metadata (and adopted, or re-keyed)
    /// instead of being re-sent blindly. Default 23 h: an hour of margin.
    pub key_retention_guard: Duration,
    /// Reconcile on this schedule inside `run` (off: `None`). One replica at a time: the
    /// others find the run lease taken and skip their turn.
    pub reconcile_every: Option<Duration>,
    /// The window of a scheduled reconciliation.
    pub reconcile_window: Duration,
    /// Refresh stuck payments (GET their PaymentIntent) this often (off: `None`).
    pub refresh_stuck_every: Option<Duration>,
    /// Timeouts and caps of the HTTP endpoint.
    pub http_limits: HttpLimits,
}

/// What the HTTP endpoint allows a client: slow or idle clients are cut off, and only so
/// many connections are served at once (more wait in the kernel's accept queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// The request line and headers must arrive within this (else 408 and close); also
    /// how long an idle keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// The body must arrive within this once the headers are in (else 408).
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Largest webhook body (else 413). Stripe's events are a few KB.
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: defaults::HTTP_HEADER_TIMEOUT,
            body_timeout: defaults::HTTP_BODY_TIMEOUT,
            max_connections: defaults::HTTP_MAX_CONNECTIONS,
            max_body_bytes: 1 << 20,
        }
    }
}

/// A configuration that cannot work. Messages name the setting, never its secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `DATABASE_URL` is a URL of another scheme (`postgress://`, `mysql://`, ...).
    #[error("DATABASE_URL has the unknown scheme {0:?}: a PostgreSQL URL starts with postgres:// or postgresql:// (or use the key=value form, host=... dbname=...)")]
    DatabaseUrlScheme(String),
    /// `DATABASE_URL` does not parse, or its TLS settings cannot be used.
    #[error("DATABASE_URL is not usable")]
    DatabaseUrl(#[source] crate::tls::DatabaseUrlError),
    /// No key given.
    #[error("STRIPE_SECRET_KEY (or --stripe-secret-key-file) is required")]
    MissingSecretKey,
    /// Both the variable and the file are set.
    #[error("set STRIPE_SECRET_KEY or --stripe-secret-key-file, not both")]
    TwoSecretKeys,
    /// The key file cannot be read.
    #[error("cannot read the Stripe key file {path}")]
    SecretKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key is not shaped like a Stripe secret or restricted key.
    #[error("STRIPE_SECRET_KEY {0}")]
    BadSecretKey(&'static str),
    /// A live key would go somewhere other than Stripe.
    #[error("STRIPE_SECRET_KEY is a live key, and a live key is only ever sent to {LIVE_API_BASE}, but STRIPE_API_BASE is {api_base}: use a test key (sk_test_... or rk_test_...) with stripe-fake, or unset STRIPE_API_BASE")]
    LiveKeyElsewhere {
        /// The configured base (never carries credentials).
        api_base: String,
    },
    /// `STRIPE_API_BASE` is not a usable base URL.
    #[error("STRIPE_API_BASE {value:?} is not usable: {reason}")]
    ApiBase {
        /// A URL without credentials.
        value: String,
        reason: &'static str,
    },
    /// A setting outside its range.
    #[error("{name}: {reason}")]
    OutOfRange {
        /// Flag name.
        name: &'static str,
        /// The rule it broke.
        reason: String,
    },
}

fn out_of_range(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::OutOfRange {
        name,
        reason: reason.into(),
    }
}

/// hostname-pid-random: unique per process, readable in `pay.outbox.lease_owner`.
fn default_worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    let mut rng = fastrand::Rng::new();
    let suffix: String = (0..6)
        .map(|_| rng.alphanumeric().to_ascii_lowercase())
        .collect();
    format!("{host}-{}-{suffix}", std::process::id())
}

/// Where a live key may go.
pub const LIVE_API_BASE: &str = "https://api.stripe.com";

/// Parses `DATABASE_URL`: a `postgres://` / `postgresql://` URL or libpq's key=value form.
/// Another scheme is named as such (tokio-postgres would read `postgress://...` as key=value
/// text and say "unexpected EOF").
pub fn parse_database_url(value: &str) -> Result<crate::tls::DatabaseConfig, ConfigError> {
    if let Some((scheme, _)) = value.split_once("://") {
        let looks_like_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if looks_like_scheme && !matches!(scheme, "postgres" | "postgresql") {
            return Err(ConfigError::DatabaseUrlScheme(
                scheme.chars().take(32).collect(),
            ));
        }
    }
    value.parse().map_err(ConfigError::DatabaseUrl)
}

/// What is wrong with a Stripe API key's shape, if anything. Never includes the key.
pub fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Some("is empty or contains whitespace or control characters");
    }
    if key.starts_with("pk_") {
        return Some("is a publishable key (pk_...): the worker needs a secret key (sk_...) or a restricted key (rk_...)");
    }
    if key.starts_with("whsec_") {
        return Some("is a webhook signing secret (whsec_...): that one goes to pay.add_webhook_secret; STRIPE_SECRET_KEY takes the API key (sk_... or rk_...)");
    }
    let Some(rest) = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"]
        .iter()
        .find_map(|p| key.strip_prefix(p))
    else {
        return Some("is not a Stripe secret key: it must start with sk_test_, sk_live_, rk_test_ or rk_live_");
    };
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Some("has characters after its sk_/rk_ prefix that a Stripe key never has (letters, digits and _ only)");
    }
    None
}

/// Whether the key is a live-mode key.
pub fn is_live_key(key: &str) -> bool {
    key.starts_with("sk_live_") || key.starts_with("rk_live_")
}

fn parse_api_base(value: &str) -> Result<Url, ConfigError> {
    let bad = |reason| ConfigError::ApiBase {
        value: value.to_owned(),
        reason,
    };
    let url = Url::parse(value).map_err(|_| bad("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("scheme must be https (or http for a local stand-in)"));
    }
    if url.host_str().is_none() {
        return Err(bad("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::ApiBase {
            value: "[a URL with credentials]".into(),
            reason: "must not carry credentials",
        });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(url)
}

/// Whether the base URL points at this machine (so plain http is harmless).
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl WorkerConfig {
    /// A configuration with the defaults, for the given database, Stripe base and key.
    pub fn new(
        database_url: &str,
        stripe_api_base: &str,
        stripe_secret_key: impl Into<SecretString>,
    ) -> Result<Self, ConfigError> {
        let database = parse_database_url(database_url)?;
        let cfg = Self {
            database,
            stripe: StripeConfig {
                api_base: parse_api_base(stripe_api_base)?,
                secret_key: stripe_secret_key.into(),
                api_version: defaults::STRIPE_VERSION.to_owned(),
                connect_timeout: defaults::CONNECT_TIMEOUT,
                request_timeout: defaults::REQUEST_TIMEOUT,
            },
            worker_id: default_worker_id(),
            concurrency: defaults::CONCURRENCY,
            batch_size: defaults::BATCH_SIZE,
            lease: defaults::LEASE,
            poll_interval: defaults::POLL_INTERVAL,
            rate_limit: defaults::RATE_LIMIT,
            http_listen: None,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            db_pool_size: defaults::DB_POOL_SIZE,
            retry: RetryPolicy::DEFAULT,
            listen_for_notifications: true,
            key_retention_guard: defaults::KEY_RETENTION_GUARD,
            reconcile_every: None,
            reconcile_window: defaults::RECONCILE_WINDOW,
            refresh_stuck_every: Some(defaults::REFRESH_STUCK_EVERY),
            http_limits: HttpLimits::default(),
        };
        Ok(cfg)
    }

    /// Checks every rule; `run` calls this before doing anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = self.stripe.secret_key.expose();
        if let Some(problem) = key_problem(key) {
            return Err(ConfigError::BadSecretKey(problem));
        }
        let base = self.stripe.api_base.as_str().trim_end_matches('/');
        if is_live_key(key) && base != LIVE_API_BASE {
            return Err(ConfigError::LiveKeyElsewhere {
                api_base: base.to_owned(),
            });
        }
        let v = &self.stripe.api_version;
        if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(out_of_range(
                "--stripe-api-version",
                "must be a non-empty version like 2024-06-20",
            ));
        }
        let w = &self.worker_id;
        if w.is_empty() || w.len() > 200 || w.chars().any(char::is_control) {
            return Err(out_of_range(
                "--worker-id",
                "must be 1 to 200 characters without control characters",
            ));
        }
        if !(1..=1024).contains(&self.concurrency) {
            return Err(out_of_range("--concurrency", "must be between 1 and 1024"));
        }
        if !(1..=1000).contains(&self.batch_size) {
            return Err(out_of_range("--batch-size", "must be between 1 and 1000"));
        }
        let ms = Duration::from_millis;
        let rt = self.stripe.request_timeout;
        if !(ms(100)..=Duration::from_secs(600)).contains(&rt) {
            return Err(out_of_range(
                "--request-timeout",
                "must be between 100ms and 10m",
            ));
        }
        if !(ms(100)..=rt).contains(&self.stripe.connect_timeout) {
            return Err(out_of_range(
                "--connect-timeout",
                "must be at least 100ms and at most --request-timeout",
            ));
        }
        if self.lease < rt + LEASE_MARGIN * 2 || self.lease > Duration::from_secs(3600) {
            return Err(out_of_range(
                "--lease",
                format!(
                    "must be at least --request-timeout + {:?} (so a send always ends before the lease does) and at most 1h (claim_outbox's limit)",
                    LEASE_MARGIN * 2
                ),
            ));
        }
        if !(ms(10)..=Duration::from_secs(3600)).contains(&self.poll_interval) {
            return Err(out_of_range(
                "--poll-interval",
                "must be between 10ms and 1h",
            ));
        }
        if !self.rate_limit.is_finite() || !(0.0..=10_000.0).contains(&self.rate_limit) {
            return Err(out_of_range(
                "--rate-limit",
                "must be between 0 (unlimited) and 10000 requests/s",
            ));
        }
        if self.shutdown_timeout > Duration::from_secs(3600) {
            return Err(out_of_range("--shutdown-timeout", "must be at most 1h"));
        }
        if !(1..=64).contains(&self.db_pool_size) {
            return Err(out_of_range("--db-pool-size", "must be between 1 and 64"));
        }
        let r = &self.retry;
        if r.base < ms(1) || r.max < r.base || r.max > Duration::from_secs(86_400) {
            return Err(out_of_range(
                "--retry-base/--retry-max",
                "need 1ms <= base <= max <= 24h",
            ));
        }
        if r.retry_after_cap > Duration::from_secs(3600) {
            return Err(out_of_range("--retry-after-cap", "must be at most 1h"));
        }
        if !(Duration::from_secs(60)..=Duration::from_secs(24 * 3600))
            .contains(&self.key_retention_guard)
        {
            return Err(out_of_range(
                "--key-retention-guard",
                "must be between 1m and 24h (Stripe keeps keys for 24h)",
            ));
        }
        if self
            .reconcile_every
            .is_some_and(|d| d < Duration::from_millis(100))
        {
            return Err(out_of_range(
                "--reconcile-every",
                "must be at least 100ms (or unset)",
            ));
        }
        if !(Duration::from_secs(60)..=Duration::from_secs(400 * 86_400))
            .contains(&self.reconcile_window)
        {
            return Err(out_of_range(
                "--reconcile-window",
                "must be between 1m and 400 days",
            ));
        }
        if self
            .refresh_stuck_every
            .is_some_and(|d| d < Duration::from_millis(100))
        {
            return Err(out_of_range(
                "--refresh-stuck-every",
                "must be at least 100ms (or 0 to turn it off)",
            ));
        }
        let h = &self.http_limits;
        for (name, d) in [
            ("--http-header-timeout", h.header_read_timeout),
            ("--http-body-timeout", h.body_timeout),
        ] {
            if !(ms(100)..=Duration::from_secs(600)).contains(&d) {
                return Err(out_of_range(name, "must be between 100ms and 10m"));
            }
        }
        if !(1..=65_536).contains(&h.max_connections) {
            return Err(out_of_range(
                "--http-max-connections",
                "must be between 1 and 65536",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: &str = "postgres://pay_worker:hunter2@127.0.0.1:5432/pgpay";
    const KEY: &str = "sk_test_51Hsupersecretvalue";

    fn base() -> WorkerConfig {
        WorkerConfig::new(DB, "http://127.0.0.1:12111", KEY).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        base().validate().unwrap();
        let c = base();
        assert_eq!(c.stripe.api_version, "2024-06-20");
        assert_eq!(c.rate_limit, 20.0);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn debug_never_contains_secrets() {
        let c = base();
        let dbg = format!("{c:?} {:#?}", c);
        assert!(!dbg.contains("supersecret"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("[redacted]"), "{dbg}");
    }

    #[test]
    fn errors_never_contain_secrets() {
        let mut c = base();
        c.stripe.secret_key = SecretString::new("sk_live_abc def");
        let e = c.validate().unwrap_err();
        assert!(matches!(e, ConfigError::BadSecretKey(_)));
        assert!(!format!("{e} {e:?}").contains("abc"));
        // Every shape rule and the live-key rule: the message names the rule, never the key.
        for (key, api_base, needle) in [
            ("pk_test_canary123", "http://127.0.0.1:1", "publishable key"),
            ("whsec_canary123", "http://127.0.0.1:1", "pay.add_webhook_secret"),
            ("canary123", "http://127.0.0.1:1", "must start with sk_test_"),
            ("sk_canary123", "http://127.0.0.1:1", "must start with sk_test_"),
            ("sk_test_", "http://127.0.0.1:1", "after its sk_/rk_ prefix"),
            ("sk_test_canary-123", "http://127.0.0.1:1", "after its sk_/rk_ prefix"),
            ("sk_live_canary123", "http://127.0.0.1:1", "only ever sent to https://api.stripe.com, but STRIPE_API_BASE is http://127.0.0.1:1"),
            ("rk_live_canary123", "https://stripe-proxy.example", "live key"),
        ] {
            let mut c = base();
            c.stripe.api_base = Url::parse(api_base).unwrap();
            c.stripe.secret_key = SecretString::new(key);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{key}: {e}");
            assert!(!e.contains("canary"), "{key}: {e}");
        }
        for (key, api_base) in [
            ("sk_test_51Habc", "https://api.stripe.com"),
            ("rk_test_51Habc", "https://api.stripe.com"),
            ("sk_test_fake", "http://stripe-fake:12111"),
            ("sk_live_51Habc", "https://api.stripe.com/"),
            ("rk_live_51Habc", "https://api.stripe.com"),
        ] {
            let mut c = base();
            c.stripe.api_base = Url::parse(api_base).unwrap();
            c.stripe.secret_key = SecretString::new(key);
            c.validate()
                .unwrap_or_else(|e| panic!("{key} at {api_base}: {e}"));
        }
        let e = WorkerConfig::new("postgress://u:hunter2@h/db", defaults::API_BASE, KEY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown scheme \"postgress\""), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        WorkerConfig::new("postgresql://u@h/db", defaults::API_BASE, KEY).unwrap();
        WorkerConfig::new("host=h dbname=db user=u", defaults::API_BASE, KEY).unwrap();

        let e = WorkerConfig::new(DB, "http://user:pw@127.0.0.1", KEY).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("pw@"), "{e}");
    }

    #[test]
    fn validation_table() {
        type Tweak = fn(&mut WorkerConfig);
        let bad: &[(&str, Tweak)] = &[
            ("concurrency 0", |c| c.concurrency = 0),
            ("concurrency huge", |c| c.concurrency = 5000),
            ("batch 0", |c| c.batch_size = 0),
            ("lease below request timeout", |c| {
                c.lease = Duration::from_secs(30)
            }),
            ("poll 0", |c| c.poll_interval = Duration::ZERO),
            ("rate negative", |c| c.rate_limit = -1.0),
            ("rate NaN", |c| c.rate_limit = f64::NAN),
            ("pool 0", |c| c.db_pool_size = 0),
            ("key guard past Stripe's retention", |c| {
                c.key_retention_guard = Duration::from_secs(25 * 3600)
            }),
            ("retry max < base", |c| {
                c.retry.max = Duration::from_millis(1)
            }),
            ("empty key", |c| c.stripe.secret_key = SecretString::new("")),
            ("empty version", |c| c.stripe.api_version = String::new()),
            ("empty worker id", |c| c.worker_id = String::new()),
            ("connect > request timeout", |c| {
                c.stripe.connect_timeout = Duration::from_secs(31)
            }),
            ("live key over http", |c| {
                c.stripe.api_base = Url::parse("http://stripe-fake:12111").unwrap();
                c.stripe.secret_key = SecretString::new("sk_live_x");
            }),
            ("live key to loopback", |c| {
                c.stripe.secret_key = SecretString::new("sk_live_x")
            }),
        ];
        for (name, tweak) in bad {
            let mut c = base();
            tweak(&mut c);
            assert!(c.validate().is_err(), "{name} should be rejected");
        }
        let good: &[(&str, Tweak)] = &[
            ("rate 0 = unlimited", |c| c.rate_limit = 0.0),
            ("test key over http to a compose host", |c| {
                c.stripe.api_base = Url::parse("http://stripe-fake:12111").unwrap()
            }),
            ("live key over https", |c| {
                c.stripe.api_base = Url::parse("https://api.stripe.com").unwrap();
                c.stripe.secret_key = SecretString::new("sk_live_x");
            }),
            ("short lease with short timeout", |c| {
                c.stripe.request_timeout = Duration::from_secs(1);
                c.stripe.connect_timeout = Duration::from_millis(500);
                c.lease = Duration::from_secs(6);
            }),
            ("shutdown timeout 0", |c| {
                c.shutdown_timeout = Duration::ZERO
            }),
        ];
        for (name, tweak) in good {
            let mut c = base();
            tweak(&mut c);
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for bad_base in [
            "ftp://x",
            "not a url",
            "https://api.stripe.com/?x=1",
            "http:/",
        ] {
            assert!(WorkerConfig::new(DB, bad_base, KEY).is_err(), "{bad_base}");
        }
        assert!(matches!(
            WorkerConfig::new("postgres://x:y@h:notaport/db", defaults::API_BASE, KEY),
            Err(ConfigError::DatabaseUrl(_))
        ));
        WorkerConfig::new(
            "postgres://u@127.0.0.1/db?sslmode=require",
            defaults::API_BASE,
            KEY,
        )
        .unwrap()
        .validate()
        .unwrap();
    }
}
