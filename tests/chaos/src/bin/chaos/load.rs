//! The application: checkouts in both modes (a PaymentIntent the page confirms, or a hosted
//! Checkout Session), superseding changes, cancels, customers paying (some declined, some paying
//! an attempt that was already replaced, some paying a session by bank debit that settles or fails
//! later, some walking away from a session), refunds with and without the application's
//! `refund_ref` (a call again with one is a retry); and fulfillment consumers that provision in
//! the transaction that completes, sometimes fail, and sometimes die in between. Each kind of call
//! is one generator.

use std::sync::Arc;
use std::time::Duration;

use pgpay_chaos::history::{AskedCheckout, AskedRefund};
use rand::rngs::StdRng;
use rand::RngExt;
use stripe_fake::CheckoutPayment;
use tokio_postgres::Client;

use crate::{connect, why, Ctx, Phase};

type Outcome = Result<(), String>;

/// An order as the application last asked for it.
#[derive(Clone)]
struct Order {
    order_ref: String,
    amount: i64,
    /// Hosted Checkout Session rather than a PaymentIntent confirmed on the shop's page.
    session: bool,
}

/// A refund the application asked for under its own reference: (payment, refund_ref, amount).
type RefRefund = (String, String, Option<i64>);

/// The application's calls, at `ctx.rate` a second, until the drain begins.
pub async fn app(ctx: Arc<Ctx>, mut rng: StdRng) {
    let mut client: Option<Client> = None;
    let mut orders: Vec<Order> = Vec::new();
    let mut refund_refs: Vec<RefRefund> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / u64::from(ctx.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while ctx.phase() == Phase::Chaos {
        tick.tick().await;
        let Some(c) = client.as_ref().filter(|c| !c.is_closed()) else {
            client = connect(&ctx.app_url()).await.ok();
            continue;
        };
        let roll = rng.random_range(0..100);
        let (name, outcome) = if roll < 25 || orders.is_empty() {
            let order = Order {
                order_ref: format!("o{}", orders.len() + 1),
                amount: rng.random_range(1..=50) * 100,
                session: rng.random_bool(0.35),
            };
            orders.push(order.clone());
            let name = if order.session {
                "begin_checkout (session)"
            } else {
                "begin_checkout"
            };
            (name, checkout(&ctx, c, &order).await)
        } else if roll < 35 {
            let i = rng.random_range(0..orders.len());
            orders[i].amount = rng.random_range(1..=50) * 100 + 1;
            let order = orders[i].clone();
            // Sometimes the customer still has the old attempt open and pays it right after the
            // change: a second charge for the order, which pgpay must refund.
            let old_tab = rng.random_bool(0.3);
            ("supersede", supersede(&ctx, c, &order, old_tab).await)
        } else if roll < 40 {
            let order = orders[rng.random_range(0..orders.len())].clone();
            ("checkout again", checkout(&ctx, c, &order).await)
        } else if roll < 46 {
            ("cancel_checkout", cancel(&ctx, c).await)
        } else if roll < 76 {
            let old_tab = rng.random_bool(0.1);
            let status = if old_tab {
                "superseded"
            } else {
                "requires_payment_method"
            };
            let declined = rng.random_bool(0.15);
            let how = rng.random_range(0..100);
            customer(&ctx, c, status, declined, how).await
        } else if roll < 80 {
            let pick = rng.random_range(0..usize::MAX);
            (
                "settle a bank debit",
                settle(&ctx, rng.random_bool(0.75), pick).await,
            )
        } else {
            let whole = rng.random_bool(0.4);
            let share = rng.random_range(2..=5);
            if !refund_refs.is_empty() && rng.random_bool(0.25) {
                // The application retries a refund it asked for (its answer may have been lost).
                let earlier = refund_refs[rng.random_range(0..refund_refs.len())].clone();
                (
                    "refund again under its refund_ref",
                    refund_again(&ctx, c, earlier).await,
                )
            } else if rng.random_bool(0.5) {
                let reference = format!("return-{}", refund_refs.len() + 1);
                let (asked, outcome) = refund(&ctx, c, whole, share, Some(&reference)).await;
                // Kept even when the answer was lost: that is when an application retries.
                refund_refs.extend(asked);
                ("refund with a refund_ref", outcome)
            } else {
                ("refund", refund(&ctx, c, whole, share, None).await.1)
            }
        };
        ctx.ops.add(name);
        if let Err(reason) = outcome {
            ctx.refused.add(format!("{name}: {reason}"));
        }
    }
}

async fn checkout(ctx: &Ctx, c: &Client, order: &Order) -> Outcome {
    if let Ok(mut app) = ctx.app.lock() {
        app.orders.push(order.order_ref.clone());
    }
    let answer = if order.session {
        c.query_one(
            "SELECT id::text FROM pay.begin_checkout($1::text, $2::bigint, 'usd', mode => 'session',
                                                     success_url => 'https://shop.example/thanks',
                                                     cancel_url => 'https://shop.example/cart')",
            &[&order.order_ref, &order.amount],
        )
        .await
    } else {
        c.query_one(
            "SELECT id::text FROM pay.begin_checkout($1::text, $2::bigint, 'usd')",
            &[&order.order_ref, &order.amount],
        )
        .await
    };
    let payment_id = answer.as_ref().ok().map(|row| row.get::<_, String>(0));
    if let Ok(mut app) = ctx.app.lock() {
        app.checkouts.push(AskedCheckout {
            order_ref: order.order_ref.clone(),
            amount: order.amount,
            payment_id,
        });
    }
    answer.map(|_| ()).map_err(|e| why(&e))
}

async fn supersede(ctx: &Ctx, c: &Client, order: &Order, old_tab: bool) -> Outcome {
    let old = c
        .query_opt(
            "SELECT stripe_payment_intent_id, stripe_checkout_session_id FROM pay.payments
             WHERE order_ref = $1 AND status = 'requires_payment_method'
               AND (stripe_payment_intent_id IS NOT NULL OR stripe_checkout_session_id IS NOT NULL)",
            &[&order.order_ref],
        )
        .await
        .map_err(|e| why(&e))?;
    checkout(ctx, c, order).await?;
    let Some(old) = old.filter(|_| old_tab) else {
        return Ok(());
    };
    let (intent, session): (Option<String>, Option<String>) = (old.get(0), old.get(1));
    let paid = match (session, intent) {
        (Some(session), _) => {
            let card = CheckoutPayment::Card("pm_card_visa".into());
            ctx.fake.pay_checkout(&session, card).await
        }
        (None, Some(intent)) => ctx.fake.confirm(&intent, "pm_card_visa").await,
        (None, None) => return Ok(()),
    };
    ctx.ops.add("customer pays the attempt just replaced");
    if let Err(e) = paid {
        ctx.refused.add(format!(
            "customer pays the attempt just replaced: stripe {}",
            e.status
        ));
    }
    Ok(())
}

async fn cancel(ctx: &Ctx, c: &Client) -> Outcome {
    let row = c
        .query_opt(
            "SELECT id::text FROM pay.payments
             WHERE status IN ('creating', 'requires_payment_method', 'requires_confirmation', 'requires_action')
             ORDER BY random() LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| why(&e))?;
    let Some(row) = row else {
        return Err("nothing to cancel".into());
    };
    let id: String = row.get(0);
    if let Ok(mut app) = ctx.app.lock() {
        app.cancels.push(id.clone());
    }
    c.execute("SELECT pay.cancel_checkout($1::text::uuid)", &[&id])
        .await
        .map(|_| ())
        .map_err(|e| why(&e))
}

/// A customer with a payment in `status`: confirms its PaymentIntent on the shop's page, or, in
/// session mode, pays on the hosted page (by card, or `how` < 15 by a bank debit that settles
/// later) or (`how` >= 85) walks away, and the session expires.
async fn customer(
    ctx: &Ctx,
    c: &Client,
    status: &str,
    declined: bool,
    how: u32,
) -> (&'static str, Outcome) {
    let row = c
        .query_opt(
            "SELECT stripe_payment_intent_id, stripe_checkout_session_id FROM pay.payments
             WHERE status = $1::text::pay.payment_status
               AND (stripe_payment_intent_id IS NOT NULL AND mode = 'payment_intent'
                    OR stripe_checkout_session_id IS NOT NULL)
             ORDER BY random() LIMIT 1",
            &[&status],
        )
        .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return ("customer pays", Err("nothing to pay".into())),
        Err(e) => return ("customer pays", Err(why(&e))),
    };
    let replaced = status == "superseded";
    let card = if declined {
        "pm_card_chargeDeclined"
    } else {
        "pm_card_visa"
    };
    let (intent, session): (Option<String>, Option<String>) = (row.get(0), row.get(1));
    let stripe = |e: stripe_fake::ApiError| format!("stripe {}", e.status);
    match (session, intent) {
        (Some(session), _) if how >= 85 && !replaced => (
            "customer abandons a session",
            ctx.fake
                .abandon_checkout(&session)
                .await
                .map(|_| ())
                .map_err(stripe),
        ),
        (Some(session), _) => {
            let (name, payment) = if how < 15 && !replaced {
                (
                    "customer pays a session by bank debit",
                    CheckoutPayment::Delayed,
                )
            } else if replaced {
                (
                    "customer pays a replaced session",
                    CheckoutPayment::Card(card.into()),
                )
            } else {
                (
                    "customer pays a session",
                    CheckoutPayment::Card(card.into()),
                )
            };
            let paid = ctx.fake.pay_checkout(&session, payment).await;
            (name, paid.map(|_| ()).map_err(stripe))
        }
        (None, Some(intent)) => {
            let name = if replaced {
                "customer pays a replaced attempt"
            } else {
                "customer pays"
            };
            let paid = ctx.fake.confirm(&intent, card).await;
            (name, paid.map(|_| ()).map_err(stripe))
        }
        (None, None) => ("customer pays", Err("nothing to pay".into())),
    }
}

/// A bank debit paid on a Checkout Session settles days later: it succeeds, or fails (the
/// attempt ends; the order may begin again). The bank does not ask pgpay: any session whose debit
/// is still on its way at Stripe may settle, the attempt's payment superseded meanwhile or not.
async fn settle(ctx: &Ctx, succeed: bool, pick: usize) -> Outcome {
    let pending = debits_on_their_way(ctx);
    if pending.is_empty() {
        return Err("nothing to settle".into());
    }
    ctx.fake
        .settle_checkout(&pending[pick % pending.len()], succeed)
        .await
        .map(|_| ())
        .map_err(|e| format!("stripe {}", e.status))
}

/// Checkout Sessions completed unpaid whose PaymentIntent is still processing at Stripe.
fn debits_on_their_way(ctx: &Ctx) -> Vec<String> {
    let ledger = ctx.fake.ledger();
    let processing: std::collections::HashSet<&str> = ledger
        .payment_intents
        .list
        .iter()
        .filter(|pi| pi.status == "processing")
        .map(|pi| pi.id.as_str())
        .collect();
    ledger
        .checkout_sessions
        .list
        .iter()
        .filter(|s| s.status == "complete" && s.payment_status == "unpaid")
        .filter(|s| {
            s.payment_intent
                .as_deref()
                .is_some_and(|pi| processing.contains(pi))
        })
        .map(|s| s.id.clone())
        .collect()
}

/// At the end of the run the banks settle every debit still on its way (three in four succeed),
/// so that the history ends with no money in flight.
pub async fn settle_every_debit(ctx: &Ctx) {
    for (n, session) in debits_on_their_way(ctx).into_iter().enumerate() {
        let succeed = n % 4 != 3;
        let settled = ctx.fake.settle_checkout(&session, succeed).await;
        ctx.say(format!(
            "the bank settles {session} ({}): {}",
            if succeed { "paid" } else { "failed" },
            match settled {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("stripe {}", e.status),
            }
        ));
    }
}

/// A refund of part or all of what is left of a succeeded payment, under the application's
/// `refund_ref` if given. Returns what was asked under a refund_ref, whatever the answer.
async fn refund(
    ctx: &Ctx,
    c: &Client,
    whole: bool,
    share: i64,
    refund_ref: Option<&str>,
) -> (Option<RefRefund>, Outcome) {
    let row = c
        .query_opt(
            "SELECT id::text, amount_received - amount_refunded FROM pay.payments
             WHERE status = 'succeeded' AND amount_received > amount_refunded
             ORDER BY random() LIMIT 1",
            &[],
        )
        .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return (None, Err("nothing to refund".into())),
        Err(e) => return (None, Err(why(&e))),
    };
    let id: String = row.get(0);
    let left: i64 = row.get(1);
    let amount = (!whole).then(|| (left / share).max(1));
    let outcome = ask_refund(ctx, c, &id, amount, refund_ref).await;
    (refund_ref.map(|r| (id, r.to_owned(), amount)), outcome)
}

/// The same refund again, under its refund_ref: pgpay must answer the same command and queue
/// nothing.
async fn refund_again(ctx: &Ctx, c: &Client, (id, reference, amount): RefRefund) -> Outcome {
    ask_refund(ctx, c, &id, amount, Some(&reference)).await
}

async fn ask_refund(
    ctx: &Ctx,
    c: &Client,
    payment_id: &str,
    amount: Option<i64>,
    refund_ref: Option<&str>,
) -> Outcome {
    let answer = c
        .query_one(
            "SELECT pay.refund($1::text::uuid, $2::bigint, refund_ref => $3::text)",
            &[&payment_id, &amount, &refund_ref],
        )
        .await;
    let command_id = answer.as_ref().ok().map(|row| row.get::<_, i64>(0));
    if let Ok(mut app) = ctx.app.lock() {
        app.refunds.push(AskedRefund {
            payment_id: payment_id.to_owned(),
            amount,
            command_id,
            refund_ref: refund_ref.map(str::to_owned),
        });
    }
    answer.map(|_| ()).map_err(|e| why(&e))
}

/// A fulfillment consumer: claims, provisions and completes in one transaction. During the chaos
/// phase it sometimes fails (`pay.fail_fulfillment`) and sometimes dies between provisioning and
/// completing (its transaction never commits; the claim's lease runs out and another consumer
/// takes it). Runs until the run stops.
pub async fn consumer(ctx: Arc<Ctx>, k: usize, mut rng: StdRng) {
    let mut incarnation = 0;
    let mut client: Option<Client> = None;
    while ctx.phase() != Phase::Stopped {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let name = format!("c{k}.{incarnation}");
        let Some(c) = client.as_mut().filter(|c| !c.is_closed()) else {
            client = connect(&ctx.app_url()).await.ok();
            continue;
        };
        let claimed = c
            .query(
                "SELECT payment_id::text FROM pay.claim_fulfillments($1, 5, '3 seconds')",
                &[&name],
            )
            .await;
        let Ok(rows) = claimed else {
            continue;
        };
        for row in rows {
            let id: String = row.get(0);
            let roll = if ctx.phase() == Phase::Chaos {
                rng.random_range(0..100)
            } else {
                0
            };
            if roll < 85 {
                match provision(c, &id, &name).await {
                    Ok(true) => ctx.ops.add("provision and complete"),
                    Ok(false) => ctx.refused.add("provision: already completed, rolled back"),
                    Err(e) => ctx.refused.add(format!("provision: {e}")),
                }
            } else if roll < 96 {
                ctx.ops.add("fail_fulfillment");
                let _ = c
                    .execute(
                        "SELECT pay.fail_fulfillment($1::text::uuid, 'chaos: provisioning failed', '1 second', $2)",
                        &[&id, &name],
                    )
                    .await;
            } else {
                // Provisioned, then dead before completing: the connection goes with the process.
                if let Ok(tx) = c.transaction().await {
                    let _ = tx
                        .execute(
                            "INSERT INTO public.app_provisions (payment_id, consumer) VALUES ($1::text::uuid, $2)",
                            &[&id, &name],
                        )
                        .await;
                    std::mem::drop(tx);
                }
                client = None;
                incarnation += 1;
                ctx.fault(
                    "consumer dies mid-provisioning",
                    format!("{name} on payment {id}"),
                );
                break;
            }
        }
    }
}

/// Provisions and completes in one transaction; rolls back when the fulfillment was already
/// completed (false) or the claim was lost (an error).
async fn provision(c: &mut Client, id: &str, consumer: &str) -> Result<bool, String> {
    let tx = c.transaction().await.map_err(|e| why(&e))?;
    tx.execute(
        "INSERT INTO public.app_provisions (payment_id, consumer) VALUES ($1::text::uuid, $2)",
        &[&id, &consumer],
    )
    .await
    .map_err(|e| why(&e))?;
    let first: bool = tx
        .query_one(
            "SELECT pay.complete_fulfillment($1::text::uuid, $2)",
            &[&id, &consumer],
        )
        .await
        .map_err(|e| why(&e))?
        .get(0);
    if first {
        tx.commit().await.map_err(|e| why(&e))?;
    } else {
        tx.rollback().await.map_err(|e| why(&e))?;
    }
    Ok(first)
}
