//! TLS to PostgreSQL with libpq's `sslmode` semantics, against a throwaway cluster with
//! `ssl = on` and a server certificate from a CA this test makes (rcgen). The cluster is
//! initdb'd from the installation under test (`$PG_CONFIG --bindir`, which holds the pgpay
//! extension), owned by `postgres`, on a free port, and removed at the end.
//!
//! One test function, so the cluster starts once; each case is a labelled assertion.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use pgpay_tests::tokio_postgres::Client;
use pgpay_worker::tls::DatabaseConfig;
use pgpay_worker::ErrorChain;
use pgpay_worker::{CancellationToken, WorkerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

const PASSWORD: &str = "s3cr3t-over-tls";

/// The certificates: a CA, the server's (localhost and 127.0.0.1), a client's, and an
/// unrelated CA.
struct Pki {
    ca_pem: String,
    wrong_ca_pem: String,
    server_pem: String,
    server_key: String,
    client_pem: String,
    client_key: String,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn pki() -> Pki {
    let ca = new_ca("pgpay test CA");
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = params.signed_by(&server_key, &*ca).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "pgpay_cert");
    let client = params.signed_by(&client_key, &*ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        wrong_ca_pem: new_ca("someone else's CA").pem(),
        server_pem: server.pem(),
        server_key: server_key.serialize_pem(),
        client_pem: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_postgres_user() -> bool {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "postgres"
}

/// A command run as `postgres` (directly, or through sudo when we are root, as on CI).
fn as_postgres(program: &Path) -> Command {
    if is_postgres_user() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "-u", "postgres"]).arg(program);
        c
    }
}

fn give_to_postgres(path: &Path) {
    if !is_postgres_user() {
        run(Command::new("chown").args(["-R", "postgres:"]).arg(path));
    }
}

/// A throwaway cluster with `ssl = on`; stopped and removed on drop.
struct TlsServer {
    root: PathBuf,
    data: PathBuf,
    port: u16,
}

impl TlsServer {
    fn start(pki: &Pki) -> TlsServer {
        let root = std::env::temp_dir().join(format!(
            "pgpay-tls-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        give_to_postgres(&data);
        run(as_postgres(&pgpay_tests::pg_program("initdb"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-N",
            ])
            .arg("-D")
            .arg(&data));
        for (file, content) in [
            ("server.crt", &pki.server_pem),
            ("server.key", &pki.server_key),
            ("ca.crt", &pki.ca_pem),
        ] {
            std::fs::write(data.join(file), content).unwrap();
        }
        // The client certificate logs in as pgpay_cert; pgpay_scram needs its password over
        // TLS; everyone else is trusted on loopback, with or without TLS.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all pgpay_cert 127.0.0.1/32 cert\n\
             hostssl all pgpay_scram 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        give_to_postgres(&data);
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")));

        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c ssl_ca_file=ca.crt \
             -c fsync=off -c max_connections=40",
            data.display()
        );
        let server = TlsServer { root, data, port };
        run(as_postgres(&pgpay_tests::pg_program("pg_ctl"))
            .arg("-D")
            .arg(&server.data)
            .arg("-l")
            .arg(server.data.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]));
        server
    }

    /// A URL for `user` on this server (TCP to 127.0.0.1 unless `host` says otherwise).
    fn url(&self, host: &str, user: &str, dbname: &str, params: &str) -> String {
        format!("postgres://{user}@{host}:{}/{dbname}?{params}", self.port)
    }

    /// Superuser connection without TLS, for setup.
    async fn admin(&self, dbname: &str) -> Client {
        pgpay_tests::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        ))
        .await
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = as_postgres(&pgpay_tests::pg_program("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Connects with the worker's connector; answers whether the server sees TLS and the
/// client certificate's DN.
async fn try_connect(s: &str) -> Result<(bool, Option<String>), String> {
    let cfg = DatabaseConfig::parse(s, None).map_err(|e| ErrorChain(&e).to_string())?;
    let (client, conn) = cfg
        .connect()
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    Ok((row.get(0), row.get(1)))
}

async fn encrypted(case: &str, s: &str) -> Option<String> {
    match try_connect(s).await {
        Ok((true, dn)) => dn,
        Ok((false, _)) => panic!("{case}: connected, but the server sees no TLS"),
        Err(e) => panic!("{case}: {e}"),
    }
}

async fn refused(case: &str, s: &str, reason: &str) {
    match try_connect(s).await {
        Ok(_) => panic!("{case}: connected, but should have been refused"),
        Err(e) => {
            assert!(e.contains(reason), "{case}: {e:?} does not say {reason:?}");
            assert!(!e.contains(PASSWORD), "{case}: the password leaked: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_against_a_tls_server_and_the_worker_over_verify_full() {
    init_tracing();
    let pki = pki();
    let server = TlsServer::start(&pki);
    // Client-side files, readable by this process only.
    let files = server.root.join("client");
    std::fs::create_dir_all(&files).unwrap();
    let path = |name: &str, content: &str| {
        let p = files.join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    };
    let ca = path("ca.pem", &pki.ca_pem);
    let wrong_ca = path("wrong-ca.pem", &pki.wrong_ca_pem);
    let client_crt = path("client.pem", &pki.client_pem);
    let client_key = path("client.key", &pki.client_key);
    let admin = server.admin("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE pgpay_cert LOGIN; CREATE ROLE pgpay_scram LOGIN PASSWORD '{PASSWORD}'"
        ))
        .await
        .unwrap();
    let url = |host: &str, params: &str| server.url(host, "postgres", "postgres", params);

    // Encrypted without any check; disable stays plain.
    encrypted("require", &url("127.0.0.1", "sslmode=require")).await;
    encrypted("prefer", &url("127.0.0.1", "sslmode=prefer")).await;
    encrypted("default (prefer)", &url("127.0.0.1", "")).await;
    assert_eq!(
        try_connect(&url("127.0.0.1", "sslmode=disable")).await,
        Ok((false, None)),
        "disable"
    );

    // verify-ca: the chain, not the name.
    let verify_ca = format!("sslmode=verify-ca&sslrootcert={ca}");
    encrypted("verify-ca, right CA", &url("127.0.0.1", &verify_ca)).await;
    refused(
        "verify-ca, wrong CA",
        &url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={wrong_ca}"),
        ),
        "certificate verify failed (chain checked): unknown issuer",
    )
    .await;
    // libpq: require with a root certificate checks like verify-ca.
    refused(
        "require with a wrong CA",
        &url(
            "127.0.0.1",
            &format!("sslmode=require&sslrootcert={wrong_ca}"),
        ),
        "unknown issuer",
    )
    .await;
    let elsewhere = |mode: &str| {
        format!(
            "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode} sslrootcert='{ca}'",
            server.port
        )
    };
    encrypted(
        "verify-ca, name not in the certificate",
        &elsewhere("verify-ca"),
    )
    .await;

    // verify-full: the chain and the name (a DNS name and an IP address in the certificate).
    let verify_full = format!("sslmode=verify-full&sslrootcert={ca}");
    encrypted("verify-full, 127.0.0.1", &url("127.0.0.1", &verify_full)).await;
    encrypted("verify-full, localhost", &url("localhost", &verify_full)).await;
    refused(
        "verify-full, name not in the certificate",
        &elsewhere("verify-full"),
        "host name mismatch",
    )
    .await;
    refused(
        "verify-full, wrong CA",
        &url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={wrong_ca}"),
        ),
        "unknown issuer",
    )
    .await;
    refused(
        "verify-full, public roots only",
        &url("localhost", "sslrootcert=system"),
        "unknown issuer",
    )
    .await;

    // A client certificate (the server's `cert` method), and SCRAM with channel binding.
    let dn = encrypted(
        "client certificate",
        &server.url(
            "localhost",
            "pgpay_cert",
            "postgres",
            &format!("{verify_full}&sslcert={client_crt}&sslkey={client_key}"),
        ),
    )
    .await;
    assert_eq!(dn.as_deref(), Some("/CN=pgpay_cert"));
    refused(
        "cert login without a client certificate",
        &server.url("localhost", "pgpay_cert", "postgres", &verify_full),
        "requires a valid client certificate",
    )
    .await;
    encrypted(
        "SCRAM with channel_binding=require",
        &server.url(
            "localhost",
            &format!("pgpay_scram:{PASSWORD}"),
            "postgres",
            &format!("{verify_full}&channel_binding=require"),
        ),
    )
    .await;
    refused(
        "wrong CA with a password in the URL",
        &server.url(
            "localhost",
            &format!("pgpay_scram:{PASSWORD}"),
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={wrong_ca}"),
        ),
        "unknown issuer",
    )
    .await;

    // prefer falls back to plain text against a server without TLS (the suite's own server,
    // when it runs with ssl off, as scripts/local-postgres starts it); require then refuses.
    let plain_port = std::env::var("PGPAY_TEST_PORT").unwrap_or_else(|_| "5432".into());
    let plain =
        |mode: &str| format!("postgres://postgres@127.0.0.1:{plain_port}/postgres?sslmode={mode}");
    let suite_ssl: String = pgpay_tests::connect(&pgpay_tests::admin_url())
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    if suite_ssl == "off" {
        assert_eq!(try_connect(&plain("prefer")).await, Ok((false, None)));
        refused(
            "require, server without TLS",
            &plain("require"),
            "server does not support TLS",
        )
        .await;
    }

    // The worker drains a command with every connection over verify-full.
    admin
        .batch_execute("CREATE DATABASE pgpay_tls")
        .await
        .unwrap();
    let db = server.admin("pgpay_tls").await;
    db.batch_execute("CREATE EXTENSION pgpay")
        .await
        .expect("CREATE EXTENSION pgpay (is it installed? run scripts/install-extension)");
    let stripe = ScriptedStripe::start(|_, _| Reply::ok()).await;
    let mut cfg = WorkerConfig::new(
        &server.url("localhost", "postgres", "pgpay_tls", &verify_full),
        &stripe.base_url(),
        API_KEY,
    )
    .unwrap();
    cfg.poll_interval = Duration::from_millis(200);
    cfg.rate_limit = 0.0;
    cfg.shutdown_timeout = Duration::from_secs(5);
    let worker = pgpay_worker::start(cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let payment = checkout(&db, "tls-order", 1234).await;
    let (id, _) = create_command(&db, &payment).await;
    assert!(
        wait_for_status(&db, id, "done", WAIT).await,
        "drained over TLS"
    );
    // The pool and the LISTEN connection, all encrypted.
    let worker_connections = "SELECT count(*) FILTER (WHERE s.ssl), count(*) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = 'pgpay_tls' AND a.application_name LIKE 'pgpay-worker%'";
    assert!(
        pgpay_tests::wait_until(WAIT, || async {
            let r = db.query_one(worker_connections, &[]).await.unwrap();
            let (tls, all): (i64, i64) = (r.get(0), r.get(1));
            tls == all && all >= 2
        })
        .await,
        "every worker connection is encrypted"
    );
    // Reconcile and status connect the same way.
    let client = pgpay_worker::jobs::connect(&cfg.database, "pgpay-worker reconcile")
        .await
        .unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "reconcile's connection is encrypted");
    worker.shutdown();
    worker.wait().await.unwrap();
    drop(db);
    drop(admin);
}
