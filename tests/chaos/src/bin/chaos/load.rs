//! The application: checkouts, superseding changes, cancels, customers paying (some declined,
//! some paying an attempt that was already replaced), refunds; and fulfillment consumers that
//! provision in the transaction that completes, sometimes fail, and sometimes die in between.
//! Each kind of call is one generator (a new mode, say Checkout Sessions, is one more arm).

use std::sync::Arc;
use std::time::Duration;

use pgpay_chaos::history::{AskedCheckout, AskedRefund};
use rand::rngs::StdRng;
use rand::RngExt;
use tokio_postgres::Client;

use crate::{connect, why, Ctx, Phase};

type Outcome = Result<(), String>;

/// The application's calls, at `ctx.rate` a second, until the drain begins.
pub async fn app(ctx: Arc<Ctx>, mut rng: StdRng) {
    let mut client: Option<Client> = None;
    // (order_ref, amount last asked)
    let mut orders: Vec<(String, i64)> = Vec::new();
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
            let order = format!("o{}", orders.len() + 1);
            let amount = rng.random_range(1..=50) * 100;
            orders.push((order.clone(), amount));
            ("begin_checkout", checkout(&ctx, c, &order, amount).await)
        } else if roll < 35 {
            let i = rng.random_range(0..orders.len());
            let amount = rng.random_range(1..=50) * 100 + 1;
            orders[i].1 = amount;
            let order = orders[i].0.clone();
            // Sometimes the customer still has the old attempt open and pays it right after the
            // change: a second charge for the order, which pgpay must refund.
            let old_tab = rng.random_bool(0.3);
            (
                "supersede",
                supersede(&ctx, c, &order, amount, old_tab).await,
            )
        } else if roll < 40 {
            let (order, amount) = orders[rng.random_range(0..orders.len())].clone();
            ("checkout again", checkout(&ctx, c, &order, amount).await)
        } else if roll < 47 {
            ("cancel_checkout", cancel(&ctx, c).await)
        } else if roll < 80 {
            let old_tab = rng.random_bool(0.1);
            let method = if rng.random_bool(0.15) {
                "pm_card_chargeDeclined"
            } else {
                "pm_card_visa"
            };
            if old_tab {
                (
                    "customer pays a replaced attempt",
                    pay(&ctx, c, "superseded", method).await,
                )
            } else {
                (
                    "customer pays",
                    pay(&ctx, c, "requires_payment_method", method).await,
                )
            }
        } else {
            let whole = rng.random_bool(0.4);
            let share = rng.random_range(2..=5);
            ("refund", refund(&ctx, c, whole, share).await)
        };
        match outcome {
            Ok(()) => ctx.ops.add(name),
            Err(reason) => {
                ctx.ops.add(name);
                ctx.refused.add(format!("{name}: {reason}"));
            }
        }
    }
}

async fn checkout(ctx: &Ctx, c: &Client, order: &str, amount: i64) -> Outcome {
    if let Ok(mut app) = ctx.app.lock() {
        app.orders.push(order.to_owned());
    }
    let answer = c
        .query_one(
            "SELECT id::text FROM pay.begin_checkout($1::text, $2::bigint, 'usd')",
            &[&order, &amount],
        )
        .await;
    let payment_id = answer.as_ref().ok().map(|row| row.get::<_, String>(0));
    if let Ok(mut app) = ctx.app.lock() {
        app.checkouts.push(AskedCheckout {
            order_ref: order.to_owned(),
            amount,
            payment_id,
        });
    }
    answer.map(|_| ()).map_err(|e| why(&e))
}

async fn supersede(ctx: &Ctx, c: &Client, order: &str, amount: i64, old_tab: bool) -> Outcome {
    let old = c
        .query_opt(
            "SELECT stripe_payment_intent_id FROM pay.payments
             WHERE order_ref = $1 AND status = 'requires_payment_method' AND stripe_payment_intent_id IS NOT NULL",
            &[&order],
        )
        .await
        .map_err(|e| why(&e))?;
    checkout(ctx, c, order, amount).await?;
    if let (true, Some(old)) = (old_tab, old) {
        let intent: String = old.get(0);
        let paid = ctx.fake.confirm(&intent, "pm_card_visa").await;
        ctx.ops.add("customer pays the attempt just replaced");
        if let Err(e) = paid {
            ctx.refused.add(format!(
                "customer pays the attempt just replaced: stripe {}",
                e.status
            ));
        }
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

/// The customer confirms a PaymentIntent at Stripe.
async fn pay(ctx: &Ctx, c: &Client, status: &str, method: &str) -> Outcome {
    let row = c
        .query_opt(
            "SELECT stripe_payment_intent_id FROM pay.payments
             WHERE status = $1::text::pay.payment_status AND stripe_payment_intent_id IS NOT NULL
             ORDER BY random() LIMIT 1",
            &[&status],
        )
        .await
        .map_err(|e| why(&e))?;
    let Some(row) = row else {
        return Err("nothing to pay".into());
    };
    let intent: String = row.get(0);
    ctx.fake
        .confirm(&intent, method)
        .await
        .map(|_| ())
        .map_err(|e| format!("stripe {}", e.status))
}

async fn refund(ctx: &Ctx, c: &Client, whole: bool, share: i64) -> Outcome {
    let row = c
        .query_opt(
            "SELECT id::text, amount_received - amount_refunded FROM pay.payments
             WHERE status = 'succeeded' AND amount_received > amount_refunded
             ORDER BY random() LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| why(&e))?;
    let Some(row) = row else {
        return Err("nothing to refund".into());
    };
    let id: String = row.get(0);
    let left: i64 = row.get(1);
    let amount = (!whole).then(|| (left / share).max(1));
    let answer = c
        .query_one(
            "SELECT pay.refund($1::text::uuid, $2::bigint)",
            &[&id, &amount],
        )
        .await;
    let command_id = answer.as_ref().ok().map(|row| row.get::<_, i64>(0));
    if let Ok(mut app) = ctx.app.lock() {
        app.refunds.push(AskedRefund {
            payment_id: id,
            amount,
            command_id,
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
