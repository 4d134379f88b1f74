//! The `stripe-fake` binary: prints its base URL, serves, exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn prints_its_url_and_exits_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stripe-fake"))
        .args(["--listen", "127.0.0.1:0", "--api-key", "sk_test_binary"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let base = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("task")
    .expect("a line");
    let base = base.trim().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{base:?}");

    let answer = reqwest::Client::new()
        .post(format!("{base}/v1/payment_intents"))
        .bearer_auth("sk_test_binary")
        .form(&[("amount", "100"), ("currency", "usd")])
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status(), 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the fake did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn refuses_half_a_webhook_configuration() {
    let output = Command::new(env!("CARGO_BIN_EXE_stripe-fake"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--webhook-url",
            "http://127.0.0.1:1/",
        ])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("webhook-secret"));
}
