//! Test harness: every test gets a fresh database with the pgpay extension created, on the local
//! PostgreSQL (`PGPAY_TEST_ADMIN_URL`, default `host=127.0.0.1 port=5432 user=postgres dbname=postgres`).
//! The extension must be installed first (`scripts/install-extension`, which `scripts/test` runs).

pub mod billing;
pub mod billing_world;
pub mod fixtures;
pub mod stripe_sdk;

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

pub use tokio_postgres;

/// The admin connection string tests use to create and drop their databases.
pub fn admin_url() -> String {
    std::env::var("PGPAY_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".to_string())
}

/// Connects and drives the connection on the current runtime.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        // A closed connection ends the task; the test sees the error on its next query.
        let _ = connection.await;
    });
    client
}

/// A database created for one test and dropped when the value is dropped.
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// Creates `pgpay_test_<random>` and runs `CREATE EXTENSION pgpay` in it.
    pub async fn create() -> TestDb {
        TestDb::create_at(None).await
    }

    /// Like [`TestDb::create`], at an older released version of the extension (upgrade tests).
    pub async fn create_at(version: Option<&str>) -> TestDb {
        let db = TestDb::create_empty().await;
        db.connect()
            .await
            .batch_execute(&match version {
                Some(v) => format!("CREATE EXTENSION pgpay VERSION '{v}'"),
                None => "CREATE EXTENSION pgpay".to_string(),
            })
            .await
            .expect("CREATE EXTENSION pgpay (is it installed? run scripts/install-extension)");
        db
    }

    /// A fresh database without the extension (restore tests create it from a dump).
    pub async fn create_empty() -> TestDb {
        let name = format!("pgpay_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = with_dbname(&admin_url(), &name);
        TestDb { name, url }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A libpq-style connection string for this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The same connection string as a URL, for programs that take `DATABASE_URL`.
    pub fn database_url(&self) -> String {
        self.database_url_as("postgres")
    }

    /// [`TestDb::database_url`] logging in as `user` (a role the test created).
    pub fn database_url_as(&self, user: &str) -> String {
        let port = std::env::var("PGPAY_TEST_PORT").unwrap_or_else(|_| "5432".into());
        format!("postgres://{user}@127.0.0.1:{port}/{}", self.name)
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: use a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url(), NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

fn with_dbname(url: &str, dbname: &str) -> String {
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|part| !part.starts_with("dbname="))
        .collect();
    format!("{} dbname={dbname}", kept.join(" "))
}

/// A program of the PostgreSQL installation under test (`pg_dump`, `initdb`, ...): the one whose
/// `pg_config` is in `PG_CONFIG`, else the system PostgreSQL 15.
pub fn pg_program(name: &str) -> std::path::PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let output = std::process::Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .unwrap_or_else(|e| panic!("{pg_config} --bindir: {e}"));
    assert!(output.status.success(), "{pg_config} --bindir failed");
    let bindir = String::from_utf8(output.stdout).expect("a UTF-8 path");
    std::path::Path::new(bindir.trim()).join(name)
}

/// Polls `condition` until it is true or `timeout` passes; returns whether it became true.
/// Tests wait on conditions like this, never on bare sleeps.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The SQLSTATE of a failed query, for asserting on error codes.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(|code| code.code())
}

/// The single bigint a counting query returns (`SELECT count(*) ...`).
pub async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
