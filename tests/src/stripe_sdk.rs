//! The official Stripe SDK (stripe-node, installed by scripts/setup under tests/sdk) as a peer:
//! it signs webhook deliveries exactly as Stripe does.

use std::io::Write;
use std::process::{Command, Stdio};

/// One delivery to sign.
pub struct ToSign<'a> {
    pub payload: &'a str,
    pub secret: &'a str,
    pub timestamp: i64,
}

/// `Stripe-Signature` header values made by `stripe.webhooks.generateTestHeaderString`.
pub fn sign(deliveries: &[ToSign<'_>]) -> Vec<String> {
    let input: Vec<serde_json::Value> = deliveries
        .iter()
        .map(|d| serde_json::json!({"payload": d.payload, "secret": d.secret, "timestamp": d.timestamp}))
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/sign.js");
    let mut child = Command::new("node")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs tests/sdk/sign.js (scripts/setup installs the SDK)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&input).expect("json").as_bytes())
        .expect("write to the signer");
    let output = child.wait_with_output().expect("signer output");
    assert!(output.status.success(), "the Stripe SDK signer failed");
    serde_json::from_slice(&output.stdout).expect("a JSON array of headers")
}

/// Signs one payload now.
pub fn sign_now(payload: &str, secret: &str) -> String {
    sign(&[ToSign {
        payload,
        secret,
        timestamp: unix_now(),
    }])
    .remove(0)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}
