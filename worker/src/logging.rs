//! Logging for the binary: `RUST_LOG` (default `info`) as text or one JSON object a line,
//! on stderr, with colours only on a terminal.
//!
//! Whatever `RUST_LOG` asks for, the libraries that would print secrets are capped at INFO:
//! tokio-postgres logs every statement's parameters at DEBUG (webhook bodies, signature
//! headers), and hyper, h2, reqwest and rustls log connection and header details at
//! DEBUG/TRACE. Our own code never logs a body, a header value, a key or a client secret.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal only).
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message`, then the event's
    /// own fields (worker/README.md, Logging).
    Json,
}

/// Targets whose DEBUG/TRACE output can carry statement parameters, bodies or headers.
const CAPPED: &[&str] = &[
    "tokio_postgres",
    "postgres_protocol",
    "deadpool_postgres",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "tower_http",
    "axum",
];

/// The cap applied on top of `RUST_LOG`.
pub fn secret_safe_targets() -> Targets {
    CAPPED.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, name| t.with_target(*name, LevelFilter::INFO),
    )
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(env).with_filter(secret_safe_targets()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn libraries_that_log_secrets_are_capped_at_info() {
        let t = secret_safe_targets();
        assert!(!t.would_enable("tokio_postgres::query", &Level::DEBUG));
        assert!(!t.would_enable("hyper::proto::h1::io", &Level::TRACE));
        assert!(!t.would_enable("reqwest::connect", &Level::DEBUG));
        assert!(t.would_enable("tokio_postgres::connection", &Level::INFO));
        assert!(t.would_enable("pgpay_worker::outbox", &Level::TRACE));
    }
}
