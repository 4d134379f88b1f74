//! `pgpay-worker`: the sidecar that talks to Stripe for the database.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use humantime::Duration as Human;
use pgpay_worker::config::{parse_duration, ScheduleArgs};
use pgpay_worker::jobs::reconcile::{Counts, Phase, ReconcileOptions, Report, Started};
use pgpay_worker::jobs::JobError;
use pgpay_worker::logging::LogFormat;
use pgpay_worker::preflight::{self, Checked};
use pgpay_worker::stripe::ReadError;
use pgpay_worker::{CancellationToken, ErrorChain, RunArgs, WorkerError};

/// Exit codes beyond 0 (success) and 1 (failure, or something needs a human).
const EXIT_CONFIG: u8 = 2;
const EXIT_ALREADY_RUNNING: u8 = 3;
/// `status`: the status could not be read (database unreachable, no extension, ...).
const EXIT_STATUS_UNREADABLE: u8 = 3;
/// How long `reconcile` waits for an unreachable database before giving up.
const RECONCILE_DB_WAIT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(
    name = "pgpay-worker",
    version,
    about = "Drains the pgpay outbox to Stripe, reconciles with Stripe's ledger, reports status"
)]
struct Cli {
    /// Log lines as text (coloured on a terminal only) or one JSON object a line.
    #[arg(long, global = true, env = "PGPAY_WORKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send outbox commands to Stripe until SIGTERM/SIGINT.
    Run(Box<RunCmd>),
    /// Compare the database with Stripe's ledger for a window and repair or flag every
    /// difference. Exit 0 when done, 1 on failure, 2 for bad settings, 3 when another
    /// replica is reconciling.
    Reconcile(Box<ReconcileCmd>),
    /// Summarise pay.status_report(). Exit 0 when nothing needs a human, 1 when something
    /// does, 3 when the status cannot be read (database unreachable, no pgpay, no grant).
    Status(StatusCmd),
    /// For a container HEALTHCHECK (no curl needed): with PGPAY_WORKER_HTTP_LISTEN set, GET
    /// the running worker's /readyz; otherwise run the worker's startup checks against
    /// DATABASE_URL. Exit 0 healthy, 1 not (the reason on stderr).
    Healthcheck(HealthcheckCmd),
}

#[derive(clap::Args)]
struct HealthcheckCmd {
    /// The running worker's --http-listen address (0.0.0.0 and [::] are asked on loopback).
    #[arg(long, env = "PGPAY_WORKER_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Without an HTTP address: the database to check.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    timeout: Human,
}

#[derive(clap::Args)]
struct RunCmd {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
}

#[derive(clap::Args)]
struct ReconcileCmd {
    /// PaymentIntents and events created this long ago or later (e.g. 48h).
    #[arg(long, value_parser = parse_duration)]
    since: Human,
    /// Do everything in a transaction that is rolled back, and print what would change.
    #[arg(long)]
    dry_run: bool,
    /// The run's lease (renewed after every page); another replica may take over after it.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    run_lease: Human,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct StatusCmd {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Print {"ok", "problems", "report"} as JSON instead of the summary; the exit code is
    /// the same.
    #[arg(long)]
    json: bool,
    /// A last reconciliation that finished longer ago than this needs a human.
    #[arg(long, default_value = "50h", value_parser = parse_duration)]
    reconcile_stale_after: Human,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pgpay_worker::logging::init(cli.log_format);
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
    match cli.command {
        Command::Run(cmd) => {
            let config = match cmd
                .run
                .into_config(std::env::var("STRIPE_SECRET_KEY").ok())
                .and_then(|mut c| cmd.schedule.apply(&mut c).map(|()| c))
            {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            runtime.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(stop_on_signal(cancel.clone()));
                match pgpay_worker::run(config, cancel).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e @ (WorkerError::Setup(_) | WorkerError::Unauthorized(_))) => {
                        tracing::error!(error = %ErrorChain(&e), "pgpay-worker cannot work with this setup");
                        eprintln!("pgpay-worker: {}", ErrorChain(&e));
                        ExitCode::from(EXIT_CONFIG)
                    }
                    Err(WorkerError::Config(e)) => config_error(&e),
                    Err(e) => {
                        tracing::error!(error = %ErrorChain(&e), "pgpay-worker stopped");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Reconcile(cmd) => runtime.block_on(reconcile(*cmd)),
        Command::Status(cmd) => runtime.block_on(status(cmd)),
        Command::Healthcheck(cmd) => runtime.block_on(healthcheck(cmd)),
    }
}

fn config_error(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("pgpay-worker: {}", ErrorChain(e));
    ExitCode::from(EXIT_CONFIG)
}

/// Progress: a spinner on a terminal, a log line every 5 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_log: Mutex<Instant>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            last_log: Mutex::new(Instant::now()),
        }
    }

    fn update(&self, phase: Phase, c: &Counts) {
        let line = match phase {
            Phase::PaymentIntents | Phase::CheckoutSessions => format!(
                "PaymentIntents and Checkout Sessions: {} pages, {} objects ({} applied, {} adopted, {} flagged, {} not ours)",
                c.pages, c.objects, c.applied, c.adopted, c.flagged, c.not_ours
            ),
            Phase::Subscriptions | Phase::Invoices => format!(
                "subscriptions and invoices: {} pages, {} subscriptions, {} invoices ({} applied so far)",
                c.subscription_pages + c.invoice_pages,
                c.subscriptions,
                c.invoices,
                c.applied
            ),
            Phase::Events => format!(
                "events: {} pages, {} seen, {} replayed",
                c.event_pages, c.events_seen, c.events_replayed
            ),
        };
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => {
                let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= Duration::from_secs(5) {
                    *last = Instant::now();
                    tracing::info!("reconcile progress: {line}");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn reconcile(cmd: ReconcileCmd) -> ExitCode {
    let config = match cmd.run.into_config(std::env::var("STRIPE_SECRET_KEY").ok()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let options = ReconcileOptions {
        window: cmd.since.into(),
        dry_run: cmd.dry_run,
        lease: cmd.run_lease.into(),
    };
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    match preflight::wait_until_ready(
        &config.database,
        "pgpay-worker reconcile",
        Some(RECONCILE_DB_WAIT),
        &cancel,
    )
    .await
    {
        Ok(()) => {}
        Err(Some(e)) => return config_error(&e),
        Err(None) if cancel.is_cancelled() => return ExitCode::FAILURE,
        Err(None) => {
            eprintln!(
                "pgpay-worker: reconciliation not started: the database could not be reached for {} (see the WARN lines above)",
                humantime::format_duration(RECONCILE_DB_WAIT)
            );
            return ExitCode::FAILURE;
        }
    }
    let progress = Progress::new();
    let result = pgpay_worker::jobs::reconcile::reconcile_with_config(
        &config,
        &options,
        &cancel,
        &|phase, counts| progress.update(phase, counts),
    )
    .await;
    progress.finish();
    match result {
        Ok(Started::Ran(report)) => {
            print!("{}", summary(&report));
            ExitCode::SUCCESS
        }
        Ok(Started::AlreadyRunning) => {
            eprintln!(
                "pgpay-worker: another reconciliation is running (see pay.reconciliation_runs); not started"
            );
            ExitCode::from(EXIT_ALREADY_RUNNING)
        }
        Err(WorkerError::Config(e)) => config_error(&e),
        Err(WorkerError::Reconcile(JobError::Stripe(ReadError::Unauthorized(e)))) => {
            config_error(&e)
        }
        Err(e) => {
            eprintln!("pgpay-worker: reconciliation failed: {}", ErrorChain(&e));
            ExitCode::FAILURE
        }
    }
}

fn summary(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    // The same counts, in the same words, as the "reconciliation finished" log line.
    let _ = writeln!(
        s,
        "{} #{} in {:.1}s: {}",
        if r.dry_run {
            "dry run (rolled back; nothing changed)"
        } else {
            "reconciliation"
        },
        r.run_id,
        r.elapsed.as_secs_f64(),
        r.counts,
    );
    if r.dry_run {
        if !r.changes.is_empty() {
            let _ = writeln!(s, "would change:");
            for ch in &r.changes {
                let _ = writeln!(
                    s,
                    "  {} {} payment {} (Stripe: {})",
                    ch.outcome,
                    ch.stripe_object_id,
                    ch.payment_id.as_deref().unwrap_or("-"),
                    ch.detail.as_deref().unwrap_or("-")
                );
            }
        }
        if !r.findings.is_empty() {
            let _ = writeln!(s, "would record findings:");
            for f in &r.findings {
                let _ = writeln!(
                    s,
                    "  {} payment {} {}: expected {}, actual {}",
                    f.kind,
                    f.payment_id.as_deref().unwrap_or("-"),
                    f.stripe_object_id.as_deref().unwrap_or("-"),
                    f.expected.as_deref().unwrap_or("-"),
                    f.actual.as_deref().unwrap_or("-")
                );
            }
        }
    }
    s
}

async fn status(cmd: StatusCmd) -> ExitCode {
    let unreadable = |why: String| {
        eprintln!("pgpay-worker: cannot read the status: {why}");
        if cmd.json {
            println!("{:#}", serde_json::json!({"ok": false, "error": why}));
        }
        ExitCode::from(EXIT_STATUS_UNREADABLE)
    };
    let pg = match pgpay_worker::config::parse_database_url(&cmd.database_url) {
        Ok(c) => c,
        Err(e) => return unreadable(ErrorChain(&e).to_string()),
    };
    let stale_after: Duration = cmd.reconcile_stale_after.into();
    let client = match pgpay_worker::jobs::connect(&pg, "pgpay-worker status").await {
        Ok(c) => c,
        Err(JobError::Connect(e)) => return unreadable(preflight::describe_unreachable(&e)),
        Err(e) => return unreadable(ErrorChain(&e).to_string()),
    };
    match preflight::check_client(&client).await {
        Checked::Ready => {}
        Checked::Broken(e) => return unreadable(e.to_string()),
        Checked::Unreachable(why) => return unreadable(why),
    }
    let status = match pgpay_worker::jobs::status::read(&client).await {
        Ok(s) => s,
        Err(e) => return unreadable(ErrorChain(&e).to_string()),
    };
    if cmd.json {
        println!("{:#}", status.to_json(stale_after));
    } else {
        print!("{}", status.render(stale_after));
    }
    if status.problems(stale_after).is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `healthcheck`: 0 healthy, 1 not. Never 2 (Docker reserves it).
async fn healthcheck(cmd: HealthcheckCmd) -> ExitCode {
    let timeout: Duration = cmd.timeout.into();
    let verdict = match (cmd.http_listen, cmd.database_url) {
        (Some(addr), _) => tokio::time::timeout(timeout, readyz(addr))
            .await
            .unwrap_or_else(|_| Err(format!("no answer from the worker within {}", humantime::format_duration(timeout)))),
        (None, Some(url)) => match pgpay_worker::config::parse_database_url(&url) {
            Err(e) => Err(ErrorChain(&e).to_string()),
            Ok(pg) => match tokio::time::timeout(timeout, preflight::check(&pg, "pgpay-worker healthcheck")).await {
                Ok(Checked::Ready) => Ok(()),
                Ok(Checked::Broken(e)) => Err(e.to_string()),
                Ok(Checked::Unreachable(why)) => Err(format!("database unreachable: {why}")),
                Err(_) => Err(format!("the database did not answer within {}", humantime::format_duration(timeout))),
            },
        },
        (None, None) => Err("set PGPAY_WORKER_HTTP_LISTEN (ask the running worker) or DATABASE_URL (check the database)".into()),
    };
    match verdict {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("pgpay-worker healthcheck: unhealthy: {why}");
            ExitCode::FAILURE
        }
    }
}

/// GET /readyz on the worker's own address (a wildcard address is asked on loopback).
async fn readyz(mut addr: std::net::SocketAddr) -> Result<(), String> {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot reach the worker at {addr}: {}",
                ErrorChain(&e.without_url())
            )
        })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "/readyz answered {status}: {}",
            body.trim().replace('\n', "; ")
        ))
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
