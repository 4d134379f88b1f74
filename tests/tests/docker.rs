//! The Docker files keep the rules we cannot run here (no container engine on CI): a line
//! check, not a build. What it proves: the files say what the README promises; what it does
//! not: that they build (review them by hand, and build them where an engine exists).

use std::path::Path;

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The lines of one stage (`FROM ... AS name` to the next `FROM`).
fn stage<'a>(dockerfile: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = dockerfile.lines().skip_while(|l| {
        !(l.starts_with("FROM ") && l.trim_end().ends_with(&format!(" AS {name}")))
    });
    let first = lines.next().unwrap_or_else(|| panic!("no stage {name}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| !l.starts_with("FROM ")))
        .collect()
}

#[test]
fn dockerignore_keeps_build_output_and_vcs_out_of_the_context() {
    let ignore = read(".dockerignore");
    for entry in [".git", "target", "**/node_modules"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), "{entry} missing");
    }
}

#[test]
fn worker_image_builds_locked_with_cached_dependencies_and_without_stripe_fake() {
    let f = read("docker/worker.Dockerfile");
    assert!(
        f.contains("cargo chef cook --release --locked"),
        "a dependency layer"
    );
    let builds: Vec<_> = f.lines().filter(|l| l.contains("cargo build")).collect();
    assert!(
        !builds.is_empty() && builds.iter().all(|l| l.contains("--locked")),
        "{builds:?}"
    );
    let worker = stage(&f, "worker");
    assert!(
        f.lines().rev().find(|l| l.starts_with("FROM ")) == Some(worker[0]),
        "the worker is the default (last) target"
    );
    assert!(
        !worker.iter().any(|l| l.contains("stripe-fake")),
        "{worker:#?}"
    );
    assert!(worker
        .iter()
        .any(|l| l.starts_with("HEALTHCHECK") && l.contains(r#"["pgpay-worker", "healthcheck"]"#)));
    let fake = stage(&f, "stripe-fake");
    assert!(fake
        .iter()
        .any(|l| l.contains("ENTRYPOINT [\"stripe-fake\"]")));
}

#[test]
fn postgres_image_takes_the_major_as_a_build_argument() {
    let f = read("docker/postgres.Dockerfile");
    assert!(
        f.lines().any(|l| l.trim() == "ARG PG_MAJOR=15"),
        "a default major"
    );
    let froms: Vec<_> = f
        .lines()
        .filter(|l| l.starts_with("FROM postgres:"))
        .collect();
    assert!(!froms.is_empty());
    assert!(froms.iter().all(|l| l.contains("${PG_MAJOR}")), "{froms:?}");
    assert!(
        !f.contains("postgresql/15") && !f.contains("pg15"),
        "no hard-coded 15"
    );
    assert!(f.contains("--features pg${PG_MAJOR}"));
    assert!(f.contains("cargo chef cook --release --locked"));
    assert!(f.contains(r#"["pg_isready", "-h", "127.0.0.1""#));
}

#[test]
fn compose_uses_the_targets_healthchecks_and_a_worker_login_role() {
    let c = read("docker/compose.yaml");
    assert!(c.contains("PG_MAJOR: ${PG_MAJOR:-15}"));
    assert!(c.contains(r#"test: ["CMD", "pg_isready", "-h", "127.0.0.1""#));
    assert!(c.contains(r#"test: ["CMD", "pgpay-worker", "healthcheck"]"#));
    assert!(c.contains("target: stripe-fake") && c.contains("target: worker"));
    let url = c
        .lines()
        .find(|l| l.trim_start().starts_with("DATABASE_URL:"))
        .expect("the worker's DATABASE_URL");
    assert!(url.contains("postgres://pgpay_worker:"), "{url}");
    let init = read("docker/initdb/10-pgpay.sql");
    assert!(init.contains("CREATE ROLE pgpay_worker LOGIN") && init.contains("IN ROLE pay_worker"));
}
