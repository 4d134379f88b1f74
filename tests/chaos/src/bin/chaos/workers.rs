//! The workers: `pgpay-worker run` processes, each serving the webhook relay on its own port,
//! killed with SIGKILL and restarted by the fault schedule. Children are killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::cluster::Cluster;

pub struct Workers {
    bin: PathBuf,
    database_url: String,
    api_key: String,
    api_base: String,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
    logs: PathBuf,
    spawned: Vec<u32>,
}

impl Workers {
    pub fn new(n: usize, cluster: &Cluster, api_key: &str, seed: u64) -> Result<Workers, String> {
        let bin = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("pgpay-worker");
        if !bin.exists() {
            return Err(format!(
                "{} is missing: cargo build -p pgpay-worker (scripts/chaos does)",
                bin.display()
            ));
        }
        let ports = (0..n)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let logs =
            std::env::temp_dir().join(format!("pgpay-chaos-{seed}-{}-logs", std::process::id()));
        std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
        Ok(Workers {
            bin,
            database_url: cluster.url("chaos_worker", crate::DB),
            api_key: api_key.into(),
            api_base: String::new(),
            ports,
            children: (0..n).map(|_| None).collect(),
            logs,
            spawned: vec![0; n],
        })
    }

    pub fn set_api_base(&mut self, base: &str) {
        self.api_base = base.into();
    }

    pub fn count(&self) -> usize {
        self.ports.len()
    }

    pub fn relay_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/webhooks/stripe", self.ports[i])
    }

    pub fn log_dir(&self) -> &Path {
        &self.logs
    }

    pub fn remove_logs(&self) {
        let _ = std::fs::remove_dir_all(&self.logs);
    }

    fn command(&self, args: &[&str], log: &str) -> Result<Command, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(log))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("STRIPE_SECRET_KEY", &self.api_key)
            .env("STRIPE_API_BASE", &self.api_base)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Starts worker `i` unless it is running. Returns its pid.
    pub fn spawn(&mut self, i: usize) -> Result<Option<u32>, String> {
        if let Some(child) = self.children[i].as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(None);
            }
        }
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let id = format!("w{i}.{}", self.spawned[i]);
        self.spawned[i] += 1;
        let args = [
            "run",
            "--http-listen",
            &listen,
            "--worker-id",
            &id,
            "--lease",
            "8s",
            "--request-timeout",
            "3s",
            "--connect-timeout",
            "1s",
            "--poll-interval",
            "500ms",
            "--retry-base",
            "100ms",
            "--retry-max",
            "2s",
            "--retry-after-cap",
            "2s",
            "--db-pool-size",
            "3",
            "--concurrency",
            "8",
            "--shutdown-timeout",
            "2s",
            "--refresh-stuck-every",
            "0",
        ];
        let mut cmd = self.command(&args, &format!("worker-{i}.log"))?;
        cmd.stdout(Stdio::null());
        let child = cmd.spawn().map_err(|e| format!("worker {i}: {e}"))?;
        let pid = child.id();
        self.children[i] = Some(child);
        Ok(pid)
    }

    /// SIGKILL, at any moment. Returns the pid killed.
    pub async fn kill(&mut self, i: usize) -> Option<u32> {
        let mut child = self.children[i].take()?;
        let pid = child.id();
        let _ = child.start_kill();
        let _ = child.wait().await;
        pid
    }

    pub async fn kill_all(&mut self) {
        for i in 0..self.count() {
            self.kill(i).await;
        }
    }

    /// `pgpay-worker reconcile --since 48h`, waited for; its summary.
    pub async fn reconcile(&self) -> Result<String, String> {
        let mut cmd = self.command(&["reconcile", "--since", "48h"], "reconcile.log")?;
        cmd.stdout(Stdio::piped());
        let child = cmd.spawn().map_err(|e| e.to_string())?;
        let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
            .await
            .map_err(|_| "reconcile took more than 5 minutes".to_owned())?
            .map_err(|e| e.to_string())?;
        let summary = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if out.status.success() {
            Ok(summary)
        } else {
            Err(format!("exit {:?}: {summary}", out.status.code()))
        }
    }
}
