//! `pgpay-worker`: the sidecar that talks to Stripe for the database.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgpay_worker::classify::ErrorChain;
use pgpay_worker::{CancellationToken, RunArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "pgpay-worker",
    version,
    about = "Drains the pgpay outbox to Stripe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send outbox commands to Stripe until SIGTERM/SIGINT.
    Run(Box<RunArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Run(args) => {
            let config = match args.into_config(std::env::var("STRIPE_SECRET_KEY").ok()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pgpay-worker: {}", ErrorChain(&e));
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pgpay-worker: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(stop_on_signal(cancel.clone()));
                match pgpay_worker::run(config, cancel).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %ErrorChain(&e), "pgpay-worker stopped");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: exit at once (leases expire).
async fn stop_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the worker with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    cancel.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now; claimed commands return when their leases expire");
    std::process::exit(130);
}
