//! `chaos [--seed N] [--minutes M | --seconds S] [--workers K]`: the whole pgpay system under
//! random, combined faults, then a drain, one reconciliation and the history checker. Prints the
//! seed and every fault as it happens, one line per guarantee at the end, and exits 0 when no
//! guarantee was broken, 1 when one was, 2 when the harness itself could not run. The fault
//! schedule follows from the seed; the interleaving with the system's own timing does not, so a
//! replay reproduces the faults, not every race.
#![forbid(unsafe_code)]

mod cluster;
mod collect;
mod faults;
mod load;
mod workers;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgpay_chaos::history::AppRecord;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stripe_fake::{Config, DeliveryOptions, StripeFake};
use tokio_postgres::{Client, NoTls};

use cluster::Cluster;
use workers::Workers;

const API_KEY: &str = "sk_test_chaos";
const DB: &str = "chaos";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Chaos = 0,
    Drain = 1,
    Stopped = 2,
}

/// Counts by name, printed at the end.
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, name: impl Into<String>) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(name.into()).or_default() += 1;
        }
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn line(&self) -> String {
        let map = self.snapshot();
        let total: u64 = map.values().sum();
        let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!("{total} ({})", parts.join(", "))
    }
}

pub struct Ctx {
    start: Instant,
    phase: AtomicU8,
    pub seed: u64,
    pub cluster: Cluster,
    pub fake: StripeFake,
    pub workers: tokio::sync::Mutex<Workers>,
    pub secret: String,
    pub ops: Tally,
    pub refused: Tally,
    pub faults: Tally,
    pub app: Mutex<AppRecord>,
    pub rate: u32,
}

impl Ctx {
    pub fn say(&self, message: impl AsRef<str>) {
        println!(
            "[{:7.1}s] {}",
            self.start.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }

    /// A fault: counted by kind and printed, so a failing run can be read back.
    pub fn fault(&self, kind: &str, detail: impl AsRef<str>) {
        self.faults.add(kind);
        self.say(format!("fault {kind}: {}", detail.as_ref()));
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Chaos,
            1 => Phase::Drain,
            _ => Phase::Stopped,
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    pub fn admin_url(&self) -> String {
        self.cluster.admin_url(DB)
    }

    pub fn app_url(&self) -> String {
        self.cluster.url("chaos_app", DB)
    }
}

/// Connects with a deadline; the connection is driven on its own task.
pub async fn connect(url: &str) -> Result<Client, String> {
    let connecting = tokio_postgres::connect(url, NoTls);
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// A database error with the server's message.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// The SQLSTATE (or the error's text) of a failed call, for counting refusals.
pub fn why(error: &tokio_postgres::Error) -> String {
    match error.code() {
        Some(code) => code.code().to_owned(),
        None if error.is_closed() => "connection closed".into(),
        None => "connection error".into(),
    }
}

struct Args {
    seed: u64,
    duration: Duration,
    workers: usize,
    rate: u32,
}

fn usage() -> ! {
    eprintln!(
        "usage: chaos [--seed N] [--minutes M | --seconds S] [--workers K (>= 3)] [--rate OPS_PER_S]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        seed: rand::rng().random_range(1..1_000_000_000),
        duration: Duration::from_secs(120),
        workers: 3,
        rate: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| usage())
        };
        match flag.as_str() {
            "--seed" => args.seed = value(),
            "--minutes" => args.duration = Duration::from_secs(value() * 60),
            "--seconds" => args.duration = Duration::from_secs(value()),
            "--workers" => args.workers = value() as usize,
            "--rate" => args.rate = value().clamp(1, 100) as u32,
            "-h" | "--help" => {
                println!(
                    "chaos [--seed N] [--minutes M | --seconds S] [--workers K] [--rate OPS_PER_S]\n\
                     Runs pgpay under random, combined faults on a throwaway cluster, then checks the history.\n\
                     Defaults: a random seed, 2 minutes, 3 workers, 20 application operations a second."
                );
                std::process::exit(0)
            }
            _ => usage(),
        }
    }
    if args.workers < 3 {
        usage()
    }
    args
}

fn main() -> ExitCode {
    let args = parse_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        // SIGINT or SIGTERM ends the run; its children and cluster clean up on drop.
        let Ok(mut terminate) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            eprintln!("chaos: cannot listen for SIGTERM");
            return ExitCode::from(2);
        };
        tokio::select! {
            code = run(args) => code,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("chaos: interrupted; cleaning up");
                ExitCode::from(2)
            }
            _ = terminate.recv() => {
                eprintln!("chaos: terminated; cleaning up");
                ExitCode::from(2)
            }
        }
    })
}

async fn run(args: Args) -> ExitCode {
    println!(
        "chaos: seed {} ({} s, {} workers, {} ops/s); replay with scripts/chaos --seed {} --seconds {}",
        args.seed,
        args.duration.as_secs(),
        args.workers,
        args.rate,
        args.seed,
        args.duration.as_secs()
    );
    match setup(&args).await {
        Ok(ctx) => {
            let ctx = Arc::new(ctx);
            let code = exercise(&ctx, &args).await;
            ctx.set_phase(Phase::Stopped);
            ctx.workers.lock().await.kill_all().await;
            code
        }
        Err(e) => {
            eprintln!("chaos: setup failed: {e}");
            ExitCode::from(2)
        }
    }
}

async fn setup(args: &Args) -> Result<Ctx, String> {
    let cluster = Cluster::create(&args.seed.to_string())?;
    let admin = connect(&cluster.admin_url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .map_err(|e| describe(&e))?;
    let db = connect(&cluster.admin_url(DB)).await?;
    let secret = format!("whsec_chaos_harness_{:016}", args.seed);
    db.batch_execute(
        "CREATE EXTENSION pgpay;
         CREATE ROLE chaos_worker LOGIN IN ROLE pay_worker;
         CREATE ROLE chaos_app LOGIN IN ROLE pay_app;
         -- The application's provisioning: one row per provisioning transaction that committed.
         CREATE TABLE public.app_provisions (payment_id uuid NOT NULL, consumer text NOT NULL,
                                             at timestamptz NOT NULL DEFAULT now());
         GRANT INSERT, SELECT ON public.app_provisions TO chaos_app;
         -- Consumers fail often here; a dead letter would only need a human.
         ALTER DATABASE chaos SET pay.fulfillment_max_attempts = 1000;",
    )
    .await
    .map_err(|e| describe(&e))?;
    db.execute("SELECT pay.add_webhook_secret($1, 'chaos')", &[&secret])
        .await
        .map_err(|e| describe(&e))?;

    let workers = Workers::new(args.workers, &cluster, API_KEY, args.seed)?;
    let fake = StripeFake::start(Config {
        api_key: API_KEY.into(),
        webhook: Some(
            stripe_fake::WebhookEndpoint::new(workers.relay_url(0), secret.clone())
                .map_err(|e| e.to_string())?,
        ),
        webhook_options: clean_delivery(),
        webhook_concurrency: 4,
        seed: args.seed,
        ..Config::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let ctx = Ctx {
        start: Instant::now(),
        phase: AtomicU8::new(Phase::Chaos as u8),
        seed: args.seed,
        cluster,
        fake,
        workers: tokio::sync::Mutex::new(workers),
        secret,
        ops: Tally::default(),
        refused: Tally::default(),
        faults: Tally::default(),
        app: Mutex::new(AppRecord::default()),
        rate: args.rate,
    };
    {
        let mut workers = ctx.workers.lock().await;
        workers.set_api_base(&ctx.fake.base_url());
        for i in 0..args.workers {
            workers.spawn(i)?;
        }
    }
    ctx.say(format!(
        "cluster on port {}, stripe-fake at {}, {} workers, logs in {}",
        ctx.cluster.port,
        ctx.fake.base_url(),
        args.workers,
        ctx.workers.lock().await.log_dir().display()
    ));
    Ok(ctx)
}

/// Deliveries without misbehaviour, but with Stripe's retries: several attempts with backoff, and
/// a lost event comes again later until a copy gets a 2xx.
pub fn clean_delivery() -> DeliveryOptions {
    DeliveryOptions {
        max_attempts: 6,
        retry_backoff_ms: 100,
        redeliver_after_ms: 2_000,
        ..DeliveryOptions::default()
    }
}

async fn exercise(ctx: &Arc<Ctx>, args: &Args) -> ExitCode {
    let mut seeds = StdRng::seed_from_u64(args.seed);
    let load = tokio::spawn(load::app(
        ctx.clone(),
        StdRng::seed_from_u64(seeds.random()),
    ));
    let consumers: Vec<_> = (0..2)
        .map(|k| {
            tokio::spawn(load::consumer(
                ctx.clone(),
                k,
                StdRng::seed_from_u64(seeds.random()),
            ))
        })
        .collect();
    let chaos = tokio::spawn(faults::schedule(
        ctx.clone(),
        StdRng::seed_from_u64(seeds.random()),
    ));

    tokio::time::sleep(args.duration).await;
    ctx.say("faults off: draining");
    ctx.set_phase(Phase::Drain);
    let _ = load.await;
    let _ = chaos.await;
    if let Err(e) = faults::all_off(ctx).await {
        eprintln!("chaos: cannot turn faults off: {e}");
        return ExitCode::from(2);
    }
    load::settle_every_debit(ctx).await;
    let drained = collect::drain(ctx, Duration::from_secs(180)).await;
    ctx.say(match &drained {
        Ok(()) => "drained".to_owned(),
        Err(left) => format!("drain deadline passed with work left: {left}"),
    });
    match ctx.workers.lock().await.reconcile().await {
        Ok(summary) => ctx.say(format!("reconciliation: {summary}")),
        Err(e) => ctx.say(format!("reconciliation failed: {e}")),
    }
    // Reconciliation may hand out fulfillments (a success it had to repair): let consumers finish.
    let _ = collect::drain(ctx, Duration::from_secs(60)).await;
    ctx.set_phase(Phase::Stopped);
    for consumer in consumers {
        let _ = consumer.await;
    }

    let history = match collect::history(ctx).await {
        Ok(history) => history,
        Err(e) => {
            eprintln!("chaos: cannot read the history: {e}");
            return ExitCode::from(2);
        }
    };
    let verdicts = pgpay_chaos::checker::check(&history);
    println!("== seed {}", ctx.seed);
    println!("operations: {}", ctx.ops.line());
    println!(
        "refused by the database or Stripe (expected): {}",
        ctx.refused.line()
    );
    println!("faults: {}", ctx.faults.line());
    let ledger = &history.ledger;
    println!(
        "stripe: {} PaymentIntents ({} succeeded), {} Checkout Sessions {:?}, {} refunds, {} events; deliveries {} ok, {} retried, {} dropped, {} duplicated, {} redelivered; faults fired {:?}",
        ledger.payment_intents.list.len(),
        ledger.status_count("succeeded"),
        ledger.checkout_sessions.list.len(),
        ledger.checkout_sessions.by_status,
        ledger.refunds.list.len(),
        ledger.events.list.len(),
        ledger.webhooks.ok,
        ledger.webhooks.retried,
        ledger.webhooks.dropped,
        ledger.webhooks.duplicated,
        ledger.webhooks.redelivered,
        ledger.faults_fired
    );
    let mut violations = 0;
    for verdict in &verdicts {
        println!("{verdict}");
        violations += verdict.violations;
    }
    println!("violations: {violations}");
    if violations == 0 {
        ctx.workers.lock().await.remove_logs();
        ExitCode::SUCCESS
    } else {
        let path = std::env::temp_dir().join(format!("pgpay-chaos-history-{}.json", ctx.seed));
        if let Ok(json) = serde_json::to_vec(&history) {
            if std::fs::write(&path, json).is_ok() {
                println!("history saved to {}", path.display());
            }
        }
        println!(
            "worker logs kept in {}",
            ctx.workers.lock().await.log_dir().display()
        );
        ExitCode::from(1)
    }
}
