//! The run's own PostgreSQL cluster: initdb under a temporary directory from the installation
//! `$PG_CONFIG --bindir` names, run as `postgres` on a free port, so it can be stopped in
//! immediate mode (crash recovery on the next start) without touching any other server. Dropping
//! the cluster stops it and removes its files.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

pub struct Cluster {
    pub root: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    pub port: u16,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_postgres_user() -> bool {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "postgres")
        .unwrap_or(false)
}

impl Cluster {
    /// The installation's bindir: `$PG_CONFIG --bindir`, else the system PostgreSQL 15.
    fn bindir() -> Result<PathBuf, String> {
        let pg_config = std::env::var("PG_CONFIG")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
        let out = Command::new(&pg_config)
            .arg("--bindir")
            .output()
            .map_err(|e| format!("{pg_config} --bindir: {e}"))?;
        if !out.status.success() {
            return Err(format!("{pg_config} --bindir failed"));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    fn as_postgres(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        if is_postgres_user() {
            Command::new(program)
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "-u", "postgres"]).arg(program);
            c
        }
    }

    pub fn create(tag: &str) -> Result<Cluster, String> {
        let bindir = Cluster::bindir()?;
        let root = std::env::temp_dir().join(format!("pgpay-chaos-{tag}-{}", std::process::id()));
        let data = root.join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let cluster = Cluster {
            root,
            data,
            bindir,
            port,
        };
        if !is_postgres_user() {
            run(Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&cluster.root))?;
        }
        run(cluster
            .as_postgres("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-N",
            ])
            .arg("-D")
            .arg(&cluster.data))?;
        cluster.start()?;
        Ok(cluster)
    }

    pub fn start(&self) -> Result<(), String> {
        // fsync off: an immediate stop kills the server, not the machine, so the page cache
        // keeps every write and crash recovery is still exercised; the disk is spared.
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c max_connections=60 -c shared_buffers=32MB",
            self.port,
            self.data.display()
        );
        run(self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "120", "-o", &options, "start"]))
    }

    /// Kills the server without a checkpoint: the next start runs crash recovery.
    pub fn stop_immediate(&self) -> Result<(), String> {
        run(self.as_postgres("pg_ctl").arg("-D").arg(&self.data).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]))
    }

    pub fn admin_url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{dbname}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
        if std::fs::remove_dir_all(&self.root).is_err() {
            let _ = run(Command::new("sudo")
                .args(["-n", "rm", "-rf"])
                .arg(&self.root));
        }
    }
}
