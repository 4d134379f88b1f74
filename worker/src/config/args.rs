//! The command line: `pgpay-worker run` flags, each with an environment variable. Flags win
//! over the environment, which wins over the defaults ([`super::defaults`], shown by
//! `--help`). The Stripe key is read from `STRIPE_SECRET_KEY` or a file, never from a flag
//! (argv is visible to every local user).

use std::net::SocketAddr;
use std::path::PathBuf;

use humantime::Duration as Human;

use super::{defaults, ConfigError, WorkerConfig};
use crate::secret::SecretString;
use crate::stripe::RetryPolicy;

/// Parses `500ms`, `60s`, `2m`, `48h`, ... (humantime).
pub fn parse_duration(s: &str) -> Result<Human, String> {
    s.parse::<Human>()
        .map_err(|e| format!("{e} (examples: 500ms, 1s, 60s, 2m)"))
}

/// `pgpay-worker run` flags.
#[derive(Clone, clap::Args)]
#[command(
    after_help = "The Stripe key comes from STRIPE_SECRET_KEY or --stripe-secret-key-file (never a flag: argv is world-readable).\nLogging: RUST_LOG (default info), --log-format text|json.\nExit codes: 0 stopped by SIGTERM/SIGINT, 1 failure, 2 bad settings or setup (the message says the fix)."
)]
pub struct RunArgs {
    /// PostgreSQL connection string of the database with the pgpay extension.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// File holding the Stripe secret key (alternative to STRIPE_SECRET_KEY).
    #[arg(long, env = "STRIPE_SECRET_KEY_FILE", value_name = "PATH")]
    pub stripe_secret_key_file: Option<PathBuf>,
    /// Base URL of Stripe's API (point it at stripe-fake for the demo and tests).
    #[arg(long, env = "STRIPE_API_BASE", default_value = defaults::API_BASE)]
    pub stripe_api_base: String,
    /// Pinned Stripe-Version header.
    #[arg(long, env = "STRIPE_API_VERSION", default_value = defaults::STRIPE_VERSION)]
    pub stripe_api_version: String,
    /// Commands in flight at once.
    #[arg(long, env = "PGPAY_WORKER_CONCURRENCY", default_value_t = defaults::CONCURRENCY)]
    pub concurrency: usize,
    /// Rows per claim.
    #[arg(long, env = "PGPAY_WORKER_BATCH_SIZE", default_value_t = defaults::BATCH_SIZE)]
    pub batch_size: u32,
    /// Lease per claimed command.
    #[arg(long, env = "PGPAY_WORKER_LEASE", default_value_t = defaults::LEASE.into(), value_parser = parse_duration)]
    pub lease: Human,
    /// Poll interval (the fallback for lost notifications).
    #[arg(long, env = "PGPAY_WORKER_POLL_INTERVAL", default_value_t = defaults::POLL_INTERVAL.into(), value_parser = parse_duration)]
    pub poll_interval: Human,
    /// Requests per second to Stripe (0 = unlimited, for benchmarks against stripe-fake).
    #[arg(long, env = "PGPAY_WORKER_RATE_LIMIT", default_value_t = defaults::RATE_LIMIT)]
    pub rate_limit: f64,
    /// Serve /healthz, /metrics and /webhooks/stripe on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "PGPAY_WORKER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "PGPAY_WORKER_SHUTDOWN_TIMEOUT", default_value_t = defaults::SHUTDOWN_TIMEOUT.into(), value_parser = parse_duration)]
    pub shutdown_timeout: Human,
    /// Timeout for one request to Stripe.
    #[arg(long, env = "PGPAY_WORKER_REQUEST_TIMEOUT", default_value_t = defaults::REQUEST_TIMEOUT.into(), value_parser = parse_duration)]
    pub request_timeout: Human,
    /// Connect timeout for requests to Stripe.
    #[arg(long, env = "PGPAY_WORKER_CONNECT_TIMEOUT", default_value_t = defaults::CONNECT_TIMEOUT.into(), value_parser = parse_duration)]
    pub connect_timeout: Human,
    /// Database connections for claims, write-backs and HTTP endpoints.
    #[arg(long, env = "PGPAY_WORKER_DB_POOL_SIZE", default_value_t = defaults::DB_POOL_SIZE)]
    pub db_pool_size: usize,
    /// Backoff ceiling of the first retry (doubles per attempt, full jitter).
    #[arg(long, env = "PGPAY_WORKER_RETRY_BASE", default_value_t = RetryPolicy::DEFAULT.base.into(), value_parser = parse_duration)]
    pub retry_base: Human,
    /// Largest backoff ceiling.
    #[arg(long, env = "PGPAY_WORKER_RETRY_MAX", default_value_t = RetryPolicy::DEFAULT.max.into(), value_parser = parse_duration)]
    pub retry_max: Human,
    /// Retry-After values are honoured up to this.
    #[arg(long, env = "PGPAY_WORKER_RETRY_AFTER_CAP", default_value_t = RetryPolicy::DEFAULT.retry_after_cap.into(), value_parser = parse_duration)]
    pub retry_after_cap: Human,
    /// lease_owner name (default: hostname-pid-random).
    #[arg(long, env = "PGPAY_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Creates first attempted longer ago than this are looked up at Stripe before a re-send
    /// (Stripe forgets Idempotency-Keys after 24h).
    #[arg(long, env = "PGPAY_WORKER_KEY_RETENTION_GUARD", default_value_t = defaults::KEY_RETENTION_GUARD.into(), value_parser = parse_duration)]
    pub key_retention_guard: Human,
    /// HTTP endpoint: request line and headers must arrive within this (else 408); also the
    /// idle keep-alive limit.
    #[arg(long, env = "PGPAY_WORKER_HTTP_HEADER_TIMEOUT", default_value_t = defaults::HTTP_HEADER_TIMEOUT.into(), value_parser = parse_duration)]
    pub http_header_timeout: Human,
    /// HTTP endpoint: a request body must arrive within this (else 408).
    #[arg(long, env = "PGPAY_WORKER_HTTP_BODY_TIMEOUT", default_value_t = defaults::HTTP_BODY_TIMEOUT.into(), value_parser = parse_duration)]
    pub http_body_timeout: Human,
    /// HTTP endpoint: connections served at once (more wait to be accepted).
    #[arg(long, env = "PGPAY_WORKER_HTTP_MAX_CONNECTIONS", default_value_t = defaults::HTTP_MAX_CONNECTIONS)]
    pub http_max_connections: usize,
}

/// The schedules of `pgpay-worker run` (reconciliation and stuck-payment refresh).
#[derive(Clone, clap::Args)]
pub struct ScheduleArgs {
    /// Reconcile with Stripe this often inside `run` (off by default); one replica at a time.
    #[arg(long, env = "PGPAY_WORKER_RECONCILE_EVERY", value_parser = parse_duration)]
    pub reconcile_every: Option<Human>,
    /// Window of a scheduled reconciliation.
    #[arg(long, env = "PGPAY_WORKER_RECONCILE_WINDOW", default_value_t = defaults::RECONCILE_WINDOW.into(), value_parser = parse_duration)]
    pub reconcile_window: Human,
    /// Refresh stuck payments (pay.stuck_payments) from Stripe this often; 0 turns it off.
    #[arg(long, env = "PGPAY_WORKER_REFRESH_STUCK_EVERY", default_value_t = defaults::REFRESH_STUCK_EVERY.into(), value_parser = parse_duration)]
    pub refresh_stuck_every: Human,
}

impl ScheduleArgs {
    /// Sets the schedule fields of `cfg` and validates it again.
    pub fn apply(&self, cfg: &mut WorkerConfig) -> Result<(), ConfigError> {
        cfg.reconcile_every = self.reconcile_every.map(Into::into);
        cfg.reconcile_window = self.reconcile_window.into();
        let every: std::time::Duration = self.refresh_stuck_every.into();
        cfg.refresh_stuck_every = Some(every).filter(|d| !d.is_zero());
        cfg.validate()
    }
}

impl RunArgs {
    /// Resolves the key (from `stripe_secret_key_env`, the value of `STRIPE_SECRET_KEY`, or
    /// the key file) and validates everything.
    pub fn into_config(
        self,
        stripe_secret_key_env: Option<String>,
    ) -> Result<WorkerConfig, ConfigError> {
        let env_key = stripe_secret_key_env.filter(|k| !k.is_empty());
        let key = match (env_key, &self.stripe_secret_key_file) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoSecretKeys),
            (Some(k), None) => SecretString::new(k),
            (None, Some(path)) => {
                let raw =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretKeyFile {
                        path: path.clone(),
                        source,
                    })?;
                SecretString::new(raw.trim())
            }
            (None, None) => return Err(ConfigError::MissingSecretKey),
        };
        let mut cfg = WorkerConfig::new(&self.database_url, &self.stripe_api_base, key)?;
        cfg.stripe.api_version = self.stripe_api_version;
        cfg.stripe.request_timeout = self.request_timeout.into();
        cfg.stripe.connect_timeout = self.connect_timeout.into();
        if let Some(id) = self.worker_id {
            cfg.worker_id = id;
        }
        cfg.concurrency = self.concurrency;
        cfg.batch_size = self.batch_size;
        cfg.lease = self.lease.into();
        cfg.poll_interval = self.poll_interval.into();
        cfg.rate_limit = self.rate_limit;
        cfg.http_listen = self.http_listen;
        cfg.shutdown_timeout = self.shutdown_timeout.into();
        cfg.db_pool_size = self.db_pool_size;
        cfg.key_retention_guard = self.key_retention_guard.into();
        cfg.http_limits.header_read_timeout = self.http_header_timeout.into();
        cfg.http_limits.body_timeout = self.http_body_timeout.into();
        cfg.http_limits.max_connections = self.http_max_connections;
        cfg.retry = RetryPolicy {
            base: self.retry_base.into(),
            max: self.retry_max.into(),
            retry_after_cap: self.retry_after_cap.into(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        schedule: ScheduleArgs,
    }

    const DB: &str = "postgres://pay_worker:hunter2@127.0.0.1:5432/pgpay";
    const KEY: &str = "sk_test_51Hsupersecretvalue";

    // All environment-dependent parsing lives in this one test: the process environment
    // is shared by every test thread.
    #[test]
    fn layering_defaults_env_flags_and_key_sources() {
        std::env::remove_var("PGPAY_WORKER_CONCURRENCY");
        std::env::remove_var("PGPAY_WORKER_POLL_INTERVAL");
        std::env::remove_var("STRIPE_SECRET_KEY_FILE");
        std::env::set_var("DATABASE_URL", DB);

        // Defaults: the flags' defaults are WorkerConfig::new's, field for field.
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let mut c = cli.run.clone().into_config(Some(KEY.into())).unwrap();
        assert_eq!(c.concurrency, 16);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.stripe.api_base.as_str(), "https://api.stripe.com/");
        cli.schedule.apply(&mut c).unwrap();
        let mut built = WorkerConfig::new(DB, defaults::API_BASE, KEY).unwrap();
        built.worker_id = c.worker_id.clone();
        assert_eq!(format!("{c:?}"), format!("{built:?}"));

        // Environment over defaults.
        std::env::set_var("PGPAY_WORKER_CONCURRENCY", "3");
        std::env::set_var("PGPAY_WORKER_POLL_INTERVAL", "250ms");
        let c = Cli::try_parse_from(["x"])
            .unwrap()
            .run
            .into_config(Some(KEY.into()))
            .unwrap();
        assert_eq!(c.concurrency, 3);
        assert_eq!(c.poll_interval, Duration::from_millis(250));

        // Flags over the environment.
        let c = Cli::try_parse_from([
            "x",
            "--concurrency",
            "5",
            "--poll-interval",
            "2s",
            "--rate-limit",
            "0",
            "--lease",
            "90s",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .unwrap()
        .run
        .into_config(Some(KEY.into()))
        .unwrap();
        assert_eq!(c.concurrency, 5);
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.rate_limit, 0.0);
        assert_eq!(c.lease, Duration::from_secs(90));
        assert_eq!(c.http_listen, Some("127.0.0.1:0".parse().unwrap()));
        std::env::remove_var("PGPAY_WORKER_CONCURRENCY");
        std::env::remove_var("PGPAY_WORKER_POLL_INTERVAL");

        // Bad duration is a parse error naming the flag.
        let err = Cli::try_parse_from(["x", "--lease", "forever"])
            .err()
            .unwrap();
        assert!(err.to_string().contains("--lease"), "{err}");

        // Key sources.
        let args = Cli::try_parse_from(["x"]).unwrap().run;
        assert!(matches!(
            args.clone().into_config(None),
            Err(ConfigError::MissingSecretKey)
        ));
        assert!(matches!(
            args.clone().into_config(Some(String::new())),
            Err(ConfigError::MissingSecretKey)
        ));
        let dir = std::env::temp_dir().join(format!("pgpay-worker-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, format!("{KEY}\n")).unwrap();
        let with_file =
            Cli::try_parse_from(["x", "--stripe-secret-key-file", file.to_str().unwrap()])
                .unwrap()
                .run;
        let c = with_file.clone().into_config(None).unwrap();
        assert_eq!(c.stripe.secret_key.expose(), KEY);
        assert!(matches!(
            with_file.into_config(Some(KEY.into())),
            Err(ConfigError::TwoSecretKeys)
        ));
        let missing = Cli::try_parse_from(["x", "--stripe-secret-key-file", "/nonexistent/key"])
            .unwrap()
            .run;
        assert!(matches!(
            missing.into_config(None),
            Err(ConfigError::SecretKeyFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();

        // No flag takes the key itself.
        assert!(Cli::try_parse_from(["x", "--stripe-secret-key", KEY]).is_err());
        std::env::remove_var("DATABASE_URL");
    }
}
