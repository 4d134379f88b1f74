//! The `stripe-fake` binary: prints its base URL, serves, exits cleanly on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn prints_its_url_and_exits_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stripe-fake"))
        .args(["--listen", "127.0.0.1:0", "--api-key", "sk_test_binary"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("a line in time")
        .expect("readable")
        .expect("a line");
    assert!(base.starts_with("http://127.0.0.1:"), "{base:?}");

    let answer = reqwest::Client::new()
        .post(format!("{base}/v1/payment_intents"))
        .bearer_auth("sk_test_binary")
        .form(&[("amount", "100"), ("currency", "usd")])
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status(), 200);

    let pid = child.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the fake exits on SIGTERM")
        .expect("exit status");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn refuses_half_a_webhook_configuration() {
    let output = Command::new(env!("CARGO_BIN_EXE_stripe-fake"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--webhook-url",
            "http://127.0.0.1:1/",
        ])
        .output()
        .await
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("webhook-secret"));
}

/// `METHOD /_fake/...` of every endpoint line of the control API text.
fn documented_endpoints() -> Vec<(String, String)> {
    stripe_fake::CONTROL_API
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let method = words.next()?;
            let path = words.next()?;
            (["GET", "POST", "DELETE"].contains(&method) && path.starts_with("/_fake/"))
                .then(|| (method.to_owned(), path.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn the_control_api_is_documented_in_help_and_readme_as_routed() {
    let endpoints = documented_endpoints();
    // The router (src/control.rs) has 27 arms; a new one must be documented here too.
    assert_eq!(endpoints.len(), 27, "{endpoints:?}");
    let help = Command::new(env!("CARGO_BIN_EXE_stripe-fake"))
        .arg("--help")
        .output()
        .await
        .expect("--help runs");
    let help = String::from_utf8_lossy(&help.stdout);
    let readme = include_str!("../../README.md");
    for (method, path) in &endpoints {
        let line = format!("{method:<6} {path}");
        assert!(help.contains(&line), "--help lacks {line}");
        assert!(readme.contains(&line), "README lacks {line}");
    }
    // Every documented endpoint is routed (an unknown id is fine; an unknown URL is not).
    let fake = stripe_fake::StripeFake::start(stripe_fake::Config::default())
        .await
        .expect("start");
    let http = reqwest::Client::new();
    let ask = |method: &str, path: &str| {
        let url = format!("{}{}", fake.base_url(), path.replace(":id", "x"));
        let req = match method {
            "GET" => http.get(url),
            "POST" => http.post(url),
            _ => http.delete(url),
        };
        req.body("{}").send()
    };
    for (method, path) in &endpoints {
        let body = ask(method, path)
            .await
            .expect("answer")
            .text()
            .await
            .unwrap();
        assert!(
            !body.contains("Unrecognized request URL"),
            "{method} {path}: {body}"
        );
    }
    let body = ask("POST", "/_fake/not_an_endpoint")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("Unrecognized request URL"), "{body}");
}
