//! `pgpay-worker status`: `pay.status_report()` as a human-readable summary, and whether
//! something needs a human (the exit code cron and monitoring act on).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

/// The report and the age of the last reconciliation (seconds since it finished, or
/// started if still open), both by the database's clock.
const REPORT: &str = "SELECT r, floor(extract(epoch FROM now() - coalesce( \
     (r #>> '{last_reconciliation,finished_at}')::timestamptz, \
     (r #>> '{last_reconciliation,started_at}')::timestamptz)))::bigint \
     FROM pay.status_report() r";

/// `pay.status_report()` plus the last reconciliation's age.
#[derive(Debug, Clone)]
pub struct Status {
    /// The raw report.
    pub report: Value,
    /// Seconds since the last reconciliation finished (or started, if open).
    pub last_reconciliation_age: Option<i64>,
}

/// Reads the report.
pub async fn read(client: &Client) -> Result<Status, tokio_postgres::Error> {
    let row = client.query_one(REPORT, &[]).await?;
    Ok(Status {
        report: row.get(0),
        last_reconciliation_age: row.get(1),
    })
}

fn n(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn age(secs: i64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0) as u64)).to_string()
}

impl Status {
    /// What needs a human, one line each; empty when all is well.
    pub fn problems(&self, stale_after: Duration) -> Vec<String> {
        let r = &self.report;
        let mut p = Vec::new();
        let mut count = |key: &str, what: &str| {
            let k = n(r, key);
            if k > 0 {
                p.push(format!("{k} {what}"));
            }
        };
        count("dead_commands", "dead outbox command(s)");
        count(
            "expired_leases",
            "in-flight command(s) with an expired lease",
        );
        count("stuck_payments", "stuck payment(s)");
        count("flagged_payments", "flagged payment(s)");
        count(
            "dead_fulfillments",
            "payment fulfillment(s) given up (pay.dead_fulfillments)",
        );
        count(
            "dead_invoice_fulfillments",
            "invoice fulfillment(s) given up (pay.dead_invoice_fulfillments)",
        );
        count("flagged_subscriptions", "flagged subscription(s)");
        count("open_findings", "open reconciliation finding(s)");
        if let Some(last) = r.get("last_reconciliation").filter(|v| v.is_object()) {
            if let Some(err) = last.get("error").and_then(Value::as_str) {
                p.push(format!(
                    "the last reconciliation (#{}) failed: {err}",
                    n(last, "id")
                ));
            }
            if let Some(a) = self.last_reconciliation_age {
                if a > stale_after.as_secs() as i64 {
                    p.push(format!(
                        "the last reconciliation is stale ({} ago, more than {})",
                        age(a),
                        humantime::format_duration(stale_after)
                    ));
                }
            }
        }
        if n(r, "live_webhook_secrets") == 0 {
            p.push("no live webhook secret: every webhook is rejected".into());
        }
        if let Some(ago) = r
            .get("last_signature_mismatch_seconds")
            .and_then(Value::as_i64)
            .filter(|&s| s < 3600)
        {
            if n(r, "webhooks_accepted_1h") == 0 {
                p.push(format!(
                    "every webhook in the last hour was rejected: is the endpoint secret the one Stripe shows? \
                     ({} signature mismatches today, the last {} ago; no signed delivery accepted in the last hour)",
                    n(r, "signature_mismatches_today"),
                    age(ago)
                ));
            }
        }
        p
    }

    /// The report with the verdict, for `status --json`: `{"ok", "problems", "report"}`.
    pub fn to_json(&self, stale_after: Duration) -> Value {
        let problems = self.problems(stale_after);
        serde_json::json!({
            "ok": problems.is_empty(),
            "problems": problems,
            "last_reconciliation_age_seconds": self.last_reconciliation_age,
            "report": self.report,
        })
    }

    /// The summary `status` prints.
    pub fn render(&self, stale_after: Duration) -> String {
        let r = &self.report;
        let mut s = String::from("pgpay status\n");
        let outbox = match r.get("outbox").and_then(Value::as_object) {
            Some(m) if !m.is_empty() => m
                .iter()
                .map(|(k, v)| format!("{k} {}", v.as_i64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "empty".into(),
        };
        let _ = writeln!(s, "  outbox:                   {outbox}");
        let oldest = match r.get("oldest_pending_seconds").and_then(Value::as_i64) {
            Some(secs) => age(secs),
            None => "none open".into(),
        };
        let _ = writeln!(s, "  oldest open command:      {oldest}");
        for (key, label) in [
            ("dead_commands", "dead commands:"),
            ("expired_leases", "expired leases:"),
            ("stuck_payments", "stuck payments:"),
            ("flagged_payments", "flagged payments:"),
            ("dead_fulfillments", "dead fulfillments:"),
            ("dead_invoice_fulfillments", "dead invoice fulfillments:"),
            ("flagged_subscriptions", "flagged subscriptions:"),
            ("open_findings", "open findings:"),
            ("webhook_rejections_24h", "webhook rejections (24h):"),
            ("live_webhook_secrets", "live webhook secrets:"),
        ] {
            let _ = writeln!(s, "  {label:<26}{}", n(r, key));
        }
        match r.get("last_reconciliation").filter(|v| v.is_object()) {
            None => {
                let _ = writeln!(s, "  last reconciliation:      never");
            }
            Some(last) => {
                let open = last.get("finished_at").is_none_or(Value::is_null);
                let when = match self.last_reconciliation_age {
                    Some(a) if open => format!("running, started {} ago", age(a)),
                    Some(a) => format!("finished {} ago", age(a)),
                    None => "unknown".into(),
                };
                let _ = writeln!(
                    s,
                    "  last reconciliation:      #{} by {}, {when}: {} pages, {} objects, {} applied, \
                     {} adopted, {} not ours, {} events replayed, {} findings{}",
                    n(last, "id"),
                    last.get("worker").and_then(Value::as_str).unwrap_or("?"),
                    n(last, "pages"),
                    n(last, "objects"),
                    n(last, "applied"),
                    n(last, "adopted"),
                    n(last, "not_ours"),
                    n(last, "events_replayed"),
                    n(last, "findings"),
                    match last.get("error").and_then(Value::as_str) {
                        Some(e) => format!("; error: {e}"),
                        None => String::new(),
                    }
                );
            }
        }
        let problems = self.problems(stale_after);
        if problems.is_empty() {
            s.push_str("ok: nothing needs attention\n");
        } else {
            s.push_str("needs attention:\n");
            for p in problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn clean() -> Value {
        json!({
            "outbox": {"done": 3}, "oldest_pending_seconds": null, "dead_commands": 0,
            "expired_leases": 0, "stuck_payments": 0, "flagged_payments": 0, "open_findings": 0,
            "last_reconciliation": null, "webhook_rejections_24h": 2, "live_webhook_secrets": 1
        })
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn what_needs_a_human_table() {
        let last_ok =
            json!({"id": 4, "worker": "w", "finished_at": "2026-01-01T00:00:00Z", "error": null});
        let last_failed =
            json!({"id": 5, "worker": "w", "finished_at": "2026-01-01T00:00:00Z", "error": "boom"});
        // (patch, age of the last run, how many problems)
        let table: Vec<(Value, Option<i64>, usize)> = vec![
            (json!({}), None, 0),
            (json!({"webhook_rejections_24h": 50}), None, 0),
            (json!({"dead_commands": 1}), None, 1),
            (json!({"expired_leases": 2}), None, 1),
            (json!({"stuck_payments": 1}), None, 1),
            (json!({"flagged_payments": 1}), None, 1),
            (json!({"dead_fulfillments": 2}), None, 1),
            (json!({"dead_invoice_fulfillments": 1}), None, 1),
            (json!({"flagged_subscriptions": 1}), None, 1),
            (json!({"open_findings": 3}), None, 1),
            (json!({"live_webhook_secrets": 0}), None, 1),
            (json!({"last_reconciliation": last_ok.clone()}), Some(60), 0),
            (json!({"last_reconciliation": last_ok}), Some(2 * 86_400), 1),
            (json!({"last_reconciliation": last_failed}), Some(60), 1),
            (json!({"dead_commands": 1, "open_findings": 1}), None, 2),
            // A wrong endpoint secret: mismatches this hour and nothing accepted.
            (
                json!({"last_signature_mismatch_seconds": 60, "webhooks_accepted_1h": 0}),
                None,
                1,
            ),
            (
                json!({"last_signature_mismatch_seconds": 60, "webhooks_accepted_1h": 3}),
                None,
                0,
            ),
            (
                json!({"last_signature_mismatch_seconds": 7200, "webhooks_accepted_1h": null}),
                None,
                0,
            ),
        ];
        for (patch, age, want) in table {
            let mut report = clean();
            for (k, v) in patch.as_object().unwrap() {
                report[k] = v.clone();
            }
            let status = Status {
                report,
                last_reconciliation_age: age,
            };
            let problems = status.problems(DAY);
            assert_eq!(problems.len(), want, "{patch}: {problems:?}");
            let text = status.render(DAY);
            assert_eq!(text.contains("needs attention:\n"), want > 0, "{text}");
        }
    }

    #[test]
    fn render_shows_the_last_run() {
        let mut report = clean();
        report["last_reconciliation"] = json!({"id": 7, "worker": "w1", "pages": 2, "objects": 150,
            "applied": 3, "adopted": 1, "not_ours": 4, "events_replayed": 5, "findings": 2,
            "finished_at": "2026-01-01T00:00:00Z", "error": null});
        let text = Status {
            report,
            last_reconciliation_age: Some(90),
        }
        .render(DAY);
        assert!(text.contains("#7 by w1, finished 1m 30s ago: 2 pages, 150 objects, 3 applied, 1 adopted, 4 not ours, 5 events replayed, 2 findings"), "{text}");
        assert!(text.contains("outbox:                   done 3"), "{text}");
        assert!(text.contains("ok: nothing needs attention"), "{text}");
    }
}
