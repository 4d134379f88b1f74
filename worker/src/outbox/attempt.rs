//! One command's attempt, from the claimed row to the write-back: parse the row, wait for
//! a rate-limit slot with enough lease left, look a stale create up at Stripe first (past
//! Stripe's key retention), send, classify.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::command::parse_request;
use super::sql::{self, ClaimedRow};
use super::write_back::{finish, release};
use crate::config::LEASE_MARGIN;
use crate::error_chain::ErrorChain;
use crate::metrics::StripePhase;
use crate::shared::Shared;
use crate::stripe::{
    decide, Decision, Method, RetryReason, SendError, StripeRequest, StripeResponse,
};

/// Do not start a request with less time than this before `lease - LEASE_MARGIN`.
const MIN_SEND_WINDOW: Duration = Duration::from_millis(500);

/// The kinds whose re-send past Stripe's key retention could create a second object.
const CREATE_INTENT: &str = "create_payment_intent";
const CREATE_SESSION: &str = "create_checkout_session";
const CREATE_SUBSCRIPTION_SESSION: &str = "create_subscription_session";

/// Pages of Checkout Sessions a key-retention lookup reads before giving up for this attempt
/// (Stripe has no search for sessions: they are listed by `created` and matched on metadata).
const MAX_SESSION_PAGES: usize = 10;
/// Seconds before the first attempt from which sessions are listed (clock skew with Stripe).
const SESSION_LIST_SLACK_SECS: i64 = 300;

/// One command, from parse to write-back. Never returns an error: every failure ends in
/// a write-back (or, if the database is unreachable, in the lease running out). Returns the
/// retry delay when the command was handed back for a retry.
pub(super) async fn process(
    shared: Arc<Shared>,
    row: ClaimedRow,
    lease_deadline: Instant,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) -> Option<Duration> {
    let prepared = parse_request(&row.request, row.idempotency_key.as_deref())
        .map_err(|e| e.to_string())
        .and_then(|req| match shared.stripe.url_for(&req) {
            Ok(url) => Ok((req, url)),
            Err(e) => Err(e.to_string()),
        });
    let (mut req, url) = match prepared {
        Ok(p) => p,
        Err(msg) => {
            warn!(error = %msg, "malformed command; failing it permanently");
            let decision = Decision::Fail {
                http_status: None,
                error: worker_error(format!("malformed outbox command: {msg}")),
            };
            return finish(&shared, &row, decision).await;
        }
    };

    let mut timeout = send_slot(&shared, &row, lease_deadline, &cancel).await?;
    let is_create =
        [CREATE_INTENT, CREATE_SESSION, CREATE_SUBSCRIPTION_SESSION].contains(&row.kind.as_str());
    if row.past_key_retention && is_create && req.method == Method::Post {
        match key_retention_lookup(&shared, &row, timeout).await {
            Lookup::Rekeyed(key) => req.idempotency_key = Some(key),
            Lookup::Done(decision) => return finish(&shared, &row, decision).await,
            Lookup::Release(why) => {
                release(&shared, &row, why).await;
                return None;
            }
        }
        timeout = send_slot(&shared, &row, lease_deadline, &cancel).await?;
    }

    let result = send_timed(&shared, &row.kind, &req, url, timeout).await;
    if matches!(&result, Ok(resp) if resp.status == 401) {
        // The key is wrong, not the command: hand it back untouched and stop the worker
        // (failing it would turn every queued payment into create_failed).
        release(&shared, &row, "Stripe refused the API key (HTTP 401)").await;
        shared.stop_unauthorized();
        return None;
    }
    let decision = decide(
        result,
        row.attempt,
        &shared.cfg.retry,
        &mut fastrand::Rng::new(),
    );
    finish(&shared, &row, decision).await
}

/// Waits for a rate-limit slot and checks the lease. Returns the timeout for the request,
/// or `None` after releasing the command (shutdown, or too little lease left to send).
async fn send_slot(
    shared: &Shared,
    row: &ClaimedRow,
    lease_deadline: Instant,
    cancel: &CancellationToken,
) -> Option<Duration> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => {
            release(shared, row, "released at shutdown").await;
            return None;
        }
        _ = shared.limiter.acquire() => {}
    }
    let remaining = lease_deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(LEASE_MARGIN);
    if remaining < MIN_SEND_WINDOW {
        // Sending now could overlap with another worker that takes over the lease.
        warn!("lease nearly expired before the request could start; releasing");
        release(shared, row, "lease nearly expired before send").await;
        return None;
    }
    Some(shared.stripe.request_timeout().min(remaining))
}

async fn send_timed(
    shared: &Shared,
    kind: &str,
    req: &StripeRequest,
    url: reqwest::Url,
    timeout: Duration,
) -> Result<StripeResponse, SendError> {
    let started = Instant::now();
    let result = shared.stripe.send(req, url, timeout).await;
    let elapsed = started.elapsed();
    shared.metrics.observe_latency(kind, elapsed.as_secs_f64());
    let (status, replayed) = match &result {
        Ok(resp) => (Some(resp.status), resp.replayed),
        Err(_) => (None, false),
    };
    shared.metrics.stripe_request(
        StripePhase::Outbox,
        req.method.as_str(),
        &req.path,
        status,
        replayed,
    );
    match &result {
        Ok(resp) => debug!(
            status = resp.status,
            request_id = resp.request_id.as_deref().unwrap_or(""),
            replayed = resp.replayed,
            ?elapsed,
            "Stripe answered"
        ),
        Err(e) => debug!(error = %ErrorChain(e), ?elapsed, "no answer from Stripe"),
    }
    result
}

enum Lookup {
    /// Nothing at Stripe: send the create with this new key.
    Rekeyed(String),
    /// Adopted (complete) or the lookup failed (retry).
    Done(Decision),
    /// The re-key was declined (adopted meanwhile, or fenced): hand the command back.
    Release(&'static str),
}

/// Invariant 2 past Stripe's 24-hour key retention: a create whose first attempt is older
/// than the guard is never re-sent with its old key (Stripe may have forgotten it and would
/// create a second PaymentIntent or Checkout Session). Look for it by our metadata instead
/// (PaymentIntents: search; Checkout Sessions: list by `created` and match): found, it is
/// adopted as the create's answer; not found, the extension re-keys the command and it is sent
/// anew.
async fn key_retention_lookup(shared: &Shared, row: &ClaimedRow, timeout: Duration) -> Lookup {
    let retry = |error: String| {
        shared.metrics.key_lookup("failed");
        Lookup::Done(Decision::Retry {
            http_status: None,
            error,
            delay: shared
                .cfg
                .retry
                .delay(row.attempt, None, &mut fastrand::Rng::new()),
            reason: RetryReason::LookupFailed,
        })
    };
    // What our metadata carries: the payment's id, or the subscription's for its session.
    let (what, meta_key, ours) = if row.kind == CREATE_SUBSCRIPTION_SESSION {
        (
            "Checkout Session",
            "pgpay_subscription_id",
            row.subscription_id.as_deref(),
        )
    } else if row.kind == CREATE_SESSION {
        (
            "Checkout Session",
            "pgpay_payment_id",
            row.payment_id.as_deref(),
        )
    } else {
        (
            "PaymentIntent",
            "pgpay_payment_id",
            row.payment_id.as_deref(),
        )
    };
    let Some(ours) = ours else {
        return retry(format!(
            "key-retention lookup: the command has no {}",
            if meta_key == "pgpay_subscription_id" {
                "subscription id"
            } else {
                "payment id"
            }
        ));
    };
    info!("create is past Stripe's key retention; looking for what it created before re-sending");
    let found = if what == "PaymentIntent" {
        find_intent(shared, row, ours, timeout).await
    } else {
        find_session(shared, row, meta_key, ours, timeout).await
    };
    let (status, found) = match found {
        Ok(found) => found,
        Err(error) => return retry(format!("key-retention lookup failed: {error}")),
    };
    if let Some(object) = found {
        shared.metrics.key_lookup("adopted");
        info!("found the object at Stripe; adopting it instead of creating another");
        return Lookup::Done(Decision::Complete {
            http_status: status,
            response: object,
            replayed: false,
        });
    }
    let reason =
        format!("no {what} with metadata {meta_key}={ours} at Stripe after the key's retention");
    match sql::rekey_create(&shared.pool, row.id, row.attempt, &reason).await {
        Ok(Some(key)) => {
            shared.metrics.key_lookup("rekeyed");
            info!("nothing at Stripe; the create was re-keyed and is sent anew");
            Lookup::Rekeyed(key)
        }
        Ok(None) => Lookup::Release("re-key declined: adopted meanwhile or taken over"),
        Err(e) => {
            shared.metrics.db_error("rekey");
            retry(format!(
                "key-retention lookup: re-key failed: {}",
                e.last_error_text()
            ))
        }
    }
}

/// What a lookup read: the HTTP status of the answer, and the object when one was ours.
type Found = (u16, Option<serde_json::Value>);

/// The PaymentIntent carrying this payment's id, by Stripe's search.
async fn find_intent(
    shared: &Shared,
    row: &ClaimedRow,
    payment_id: &str,
    timeout: Duration,
) -> Result<Found, String> {
    let search = StripeRequest::get(
        "/v1/payment_intents/search",
        vec![
            ("limit".into(), "10".into()),
            (
                "query".into(),
                format!("metadata['pgpay_payment_id']:'{payment_id}'"),
            ),
        ],
    );
    let (status, data, _) = get_list(shared, row, search, timeout).await?;
    if data.len() > 1 {
        warn!(
            found = data.len(),
            "more than one PaymentIntent carries this payment's id; adopting the first"
        );
    }
    Ok((
        status,
        data.into_iter().find(|pi| pi["object"] == "payment_intent"),
    ))
}

/// The Checkout Session carrying our id in `metadata[meta_key]` (the payment's, or the
/// subscription's for a subscription-mode session): sessions created since the first attempt,
/// newest first, matched on our metadata.
async fn find_session(
    shared: &Shared,
    row: &ClaimedRow,
    meta_key: &str,
    ours: &str,
    timeout: Duration,
) -> Result<Found, String> {
    let since = (row.first_attempt_unix - SESSION_LIST_SLACK_SECS).max(0);
    let mut after: Option<String> = None;
    for _ in 0..MAX_SESSION_PAGES {
        let mut params = vec![
            ("limit".to_owned(), "100".to_owned()),
            ("created[gte]".to_owned(), since.to_string()),
        ];
        if let Some(after) = &after {
            params.push(("starting_after".to_owned(), after.clone()));
        }
        let list = StripeRequest::get("/v1/checkout/sessions", params);
        let (status, data, has_more) = get_list(shared, row, list, timeout).await?;
        after = data
            .last()
            .and_then(|s| s["id"].as_str())
            .map(str::to_owned);
        let ours = data
            .into_iter()
            .find(|s| s["object"] == "checkout.session" && s["metadata"][meta_key] == ours);
        if ours.is_some() || !has_more || after.is_none() {
            return Ok((status, ours));
        }
    }
    Err(format!(
        "more than {MAX_SESSION_PAGES} pages of Checkout Sessions since the first attempt"
    ))
}

/// One GET of a list answer: its status, `data` and `has_more`. A failed read never fails the
/// create: the caller retries.
async fn get_list(
    shared: &Shared,
    row: &ClaimedRow,
    req: StripeRequest,
    timeout: Duration,
) -> Result<(u16, Vec<serde_json::Value>, bool), String> {
    let Ok(url) = shared.stripe.url_for(&req) else {
        return Err("cannot build the lookup URL".into());
    };
    let resp = match send_timed(shared, &row.kind, &req, url, timeout).await {
        Ok(resp) if (200..300).contains(&resp.status) => resp,
        result => {
            let error = match decide(
                result,
                row.attempt,
                &shared.cfg.retry,
                &mut fastrand::Rng::new(),
            ) {
                Decision::Retry { error, .. } => error,
                Decision::Fail { error, http_status } => format!(
                    "HTTP {} {}",
                    http_status.unwrap_or(0),
                    error["error"]["message"].as_str().unwrap_or("")
                ),
                Decision::Complete { .. } => String::new(),
            };
            return Err(error);
        }
    };
    let mut body = serde_json::from_slice::<serde_json::Value>(&resp.body)
        .map_err(|_| "the lookup answer is not JSON".to_owned())?;
    let has_more = body["has_more"].as_bool().unwrap_or(false);
    match body.get_mut("data").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(data)) => Ok((resp.status, data, has_more)),
        _ => Err("the lookup answer has no data list".into()),
    }
}

/// A permanent failure of our own making (a malformed row), in Stripe's error shape.
fn worker_error(message: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({"error": {"type": "pgpay_worker_error", "message": message.to_string()}})
}
