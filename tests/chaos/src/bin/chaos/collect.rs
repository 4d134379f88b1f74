//! The end of a run: wait for the system to settle, then read the history (stripe-fake's ledger
//! over its control API, the database as the superuser, the application's own record).

use std::time::{Duration, Instant};

use pgpay_chaos::history::*;
use tokio_postgres::Client;

use crate::{connect, describe, Ctx};

/// Waits until no outbox command is open, every event Stripe made got a 2xx, and no fulfillment
/// is open (a dead one is handed out again). Err names what was left at the deadline.
pub async fn drain(ctx: &Ctx, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let left = match left_over(ctx).await {
            Ok(None) => return Ok(()),
            Ok(Some(what)) => what,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn left_over(ctx: &Ctx) -> Result<Option<String>, String> {
    let db = connect(&ctx.admin_url()).await?;
    db.execute(
        "SELECT pay.retry_fulfillment(payment_id) FROM pay.dead_fulfillments",
        &[],
    )
    .await
    .map_err(|e| describe(&e))?;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM pay.outbox WHERE status IN ('waiting', 'pending', 'in_flight')),
                    (SELECT count(*) FROM pay.fulfillments WHERE completed_at IS NULL)",
            &[],
        )
        .await
        .map_err(|e| describe(&e))?;
    let (commands, fulfillments): (i64, i64) = (row.get(0), row.get(1));
    let ledger = ctx.fake.ledger();
    let undelivered = ledger
        .events
        .list
        .iter()
        .filter(|e| e.delivery.ok == 0)
        .count();
    if commands == 0 && fulfillments == 0 && undelivered == 0 {
        Ok(None)
    } else {
        Ok(Some(format!(
            "{commands} open commands, {fulfillments} open fulfillments, {undelivered} events without a 2xx"
        )))
    }
}

pub async fn history(ctx: &Ctx) -> Result<History, String> {
    let url = format!("{}/_fake/ledger", ctx.fake.base_url());
    let body = reqwest::get(&url)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let ledger = serde_json::from_slice(&body).map_err(|e| format!("the ledger: {e}"))?;
    let db = connect(&ctx.admin_url()).await?;
    let app = ctx.app.lock().map(|a| a.clone()).unwrap_or_default();
    Ok(History {
        ledger,
        db: snapshot(&db).await.map_err(|e| describe(&e))?,
        app,
    })
}

async fn snapshot(db: &Client) -> Result<DbSnapshot, tokio_postgres::Error> {
    let payments = db
        .query(
            "SELECT id::text, order_ref, attempt::int, amount::bigint, status::text, stripe_payment_intent_id,
                    amount_received, amount_refunded, flagged_reason, mode::text, stripe_checkout_session_id
             FROM pay.payments",
            &[],
        )
        .await?
        .iter()
        .map(|r| Payment {
            id: r.get(0),
            order_ref: r.get(1),
            attempt: r.get(2),
            amount: r.get(3),
            status: r.get(4),
            intent: r.get(5),
            amount_received: r.get(6),
            amount_refunded: r.get(7),
            flagged_reason: r.get(8),
            mode: r.get(9),
            session: r.get(10),
        })
        .collect();
    let outbox = db
        .query(
            "SELECT id, payment_id::text, kind::text, idempotency_key::text, status,
                    coalesce(lease_expires > now(), false), request #>> '{params,metadata[pgpay_refund_ref]}'
             FROM pay.outbox",
            &[],
        )
        .await?
        .iter()
        .map(|r| Command {
            id: r.get(0),
            payment_id: r.get(1),
            kind: r.get(2),
            idempotency_key: r.get(3),
            status: r.get(4),
            lease_live: r.get(5),
            refund_ref: r.get(6),
        })
        .collect();
    let events = db
        .query("SELECT event_id, source FROM pay.webhook_events", &[])
        .await?
        .iter()
        .map(|r| StoredEvent {
            event_id: r.get(0),
            source: r.get(1),
        })
        .collect();
    let fulfillments = db
        .query(
            "SELECT payment_id::text, completed_at IS NOT NULL, dead_at IS NOT NULL FROM pay.fulfillments",
            &[],
        )
        .await?
        .iter()
        .map(|r| Fulfillment {
            payment_id: r.get(0),
            completed: r.get(1),
            dead: r.get(2),
        })
        .collect();
    let provisions = db
        .query(
            "SELECT payment_id::text, consumer FROM public.app_provisions",
            &[],
        )
        .await?
        .iter()
        .map(|r| Provision {
            payment_id: r.get(0),
            consumer: r.get(1),
        })
        .collect();
    let refunds = db
        .query(
            "SELECT refund_id, payment_id::text, amount FROM pay.refunds",
            &[],
        )
        .await?
        .iter()
        .map(|r| StoredRefund {
            refund_id: r.get(0),
            payment_id: r.get(1),
            amount: r.get(2),
        })
        .collect();
    let audit = db
        .query(
            "SELECT id, payment_id::text, from_status::text, to_status::text, cause, evidence_id FROM pay.audit_log",
            &[],
        )
        .await?
        .iter()
        .map(|r| AuditRow {
            id: r.get(0),
            payment_id: r.get(1),
            from_status: r.get(2),
            to_status: r.get(3),
            cause: r.get(4),
            evidence_id: r.get(5),
        })
        .collect();
    // Findings that explain a difference from Stripe; a drift already fixed or an orphan adopted
    // explains nothing.
    let open_findings = db
        .query(
            "SELECT payment_id::text, kind FROM pay.findings
             WHERE resolved_at IS NULL AND kind NOT IN ('status_drift_fixed', 'orphan_adopted')",
            &[],
        )
        .await?
        .iter()
        .map(|r| Finding {
            payment_id: r.get(0),
            kind: r.get(1),
        })
        .collect();
    let has_chain: bool = db
        .query_one(
            "SELECT to_regprocedure('pay.verify_audit_log()') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let audit_chain = if has_chain {
        let row = db
            .query_one(
                "SELECT count(*), min(audit_id::text || ': ' || problem) FROM pay.verify_audit_log()",
                &[],
            )
            .await?;
        let problems: i64 = row.get(0);
        Some(AuditChain {
            ok: problems == 0,
            detail: row.get(1),
        })
    } else {
        None
    };
    Ok(DbSnapshot {
        payments,
        outbox,
        events,
        fulfillments,
        provisions,
        refunds,
        audit,
        open_findings,
        audit_chain,
    })
}
