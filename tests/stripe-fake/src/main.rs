//! `stripe-fake --listen 127.0.0.1:12111 --api-key sk_test_...`: prints its base URL on stdout and
//! serves until SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use stripe_fake::{Config, StripeFake, WebhookEndpoint, DEFAULT_RETENTION_SECS};

#[derive(Debug, Parser)]
#[command(
    name = "stripe-fake",
    version,
    about = "A stateful Stripe stand-in with fault injection (control API under /_fake/).",
    after_help = stripe_fake::CONTROL_API
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:12111", env = "STRIPE_FAKE_LISTEN")]
    listen: SocketAddr,
    /// The secret key clients must send as `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "STRIPE_FAKE_API_KEY",
        default_value = "sk_test_fake",
        hide_env_values = true
    )]
    api_key: String,
    /// Deliver events to this URL.
    #[arg(long, env = "STRIPE_FAKE_WEBHOOK_URL", requires = "webhook_secret")]
    webhook_url: Option<String>,
    /// Sign deliveries with this endpoint secret (whsec_...).
    #[arg(
        long,
        env = "STRIPE_FAKE_WEBHOOK_SECRET",
        requires = "webhook_url",
        hide_env_values = true
    )]
    webhook_secret: Option<String>,
    /// Webhook requests in flight at once (1 keeps deliveries in event order).
    #[arg(long, default_value_t = 1)]
    webhook_concurrency: usize,
    /// How long idempotency keys are remembered, in seconds of the fake's clock.
    #[arg(long, default_value_t = DEFAULT_RETENTION_SECS)]
    idempotency_retention_secs: i64,
    /// Emulate Stripe's rate limit: at most this many API requests per second.
    #[arg(long)]
    rate_limit_per_second: Option<u32>,
    /// The account's Stripe API version: events render in it (2025-03-31.basil and later: the new
    /// Billing shapes). Switchable at runtime with POST /_fake/api_version.
    #[arg(long, env = "STRIPE_FAKE_API_VERSION", default_value = stripe_fake::API_VERSION)]
    api_version: String,
    /// Seed for fault probabilities, delivery drops and reordering.
    #[arg(long, default_value_t = Config::default().seed)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("stripe-fake: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let webhook = match (args.webhook_url, args.webhook_secret) {
        (Some(url), Some(secret)) => match WebhookEndpoint::new(url, secret) {
            Ok(endpoint) => Some(endpoint),
            Err(error) => {
                eprintln!("stripe-fake: {error}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let config = Config {
        api_key: args.api_key,
        listen: args.listen,
        webhook,
        idempotency_retention_secs: args.idempotency_retention_secs,
        rate_limit_per_second: args.rate_limit_per_second,
        seed: args.seed,
        webhook_concurrency: args.webhook_concurrency,
        api_version: args.api_version,
        ..Config::default()
    };
    let fake = match StripeFake::start(config).await {
        Ok(fake) => fake,
        Err(error) => {
            eprintln!("stripe-fake: {}", error_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    println!("{}", fake.base_url());
    if let Err(error) = shutdown_signal().await {
        eprintln!("stripe-fake: cannot listen for signals: {error}");
        fake.shutdown().await;
        return ExitCode::FAILURE;
    }
    fake.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
