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
