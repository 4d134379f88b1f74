//! The doorbell: a dedicated connection that runs `LISTEN pay_outbox`, reconnecting with
//! backoff when it drops. Correctness never rests on it (the dispatcher polls); it only
//! shortens the wait for new commands.

use std::future::{pending, poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_postgres::{AsyncMessage, Client, Socket};
use tracing::{info, warn};

use crate::config::WorkerConfig;
use crate::error_chain::ErrorChain;
use crate::metrics::Metrics;

/// The outbox doorbell channel.
const CHANNEL: &str = "pay_outbox";

type PgConnection = tokio_postgres::Connection<Socket, crate::tls::PgTlsStream<Socket>>;
type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<Box<Listening>, tokio_postgres::Error>> + Send>>;

/// An open LISTEN connection.
pub(super) struct Listening {
    // Dropping the client would close the connection.
    _client: Client,
    conn: PgConnection,
}

/// The connection's state. Futures that must survive a `select!` iteration (a connect in
/// progress, a reconnect delay) are boxed here, so selecting on another branch never
/// cancels them.
enum State {
    Off,
    Waiting(Pin<Box<tokio::time::Sleep>>),
    Connecting(ConnectFuture),
    Connected(Box<Listening>),
}

/// Something happened on the listener; hand it to [`Listener::on_event`].
pub(super) enum ListenerEvent {
    ReconnectDue,
    Connected(Box<Listening>),
    ConnectFailed(tokio_postgres::Error),
    Notification,
    Other,
    Lost(Option<tokio_postgres::Error>),
}

pub(super) struct Listener {
    state: State,
    config: crate::tls::DatabaseConfig,
    reconnect: backon::ExponentialBackoff,
    metrics: Arc<Metrics>,
}

impl Listener {
    /// Starts connecting, unless `cfg` turns notifications off.
    pub(super) fn new(cfg: &WorkerConfig, metrics: Arc<Metrics>) -> Self {
        let config = listener_config(cfg);
        let state = if cfg.listen_for_notifications {
            State::Connecting(Box::pin(connect_and_listen(config.clone())))
        } else {
            State::Off
        };
        Self {
            state,
            config,
            reconnect: reconnect_backoff(),
            metrics,
        }
    }

    /// Cancel-safe: every await point is on a future stored in `self` or on `poll_message`.
    pub(super) async fn next_event(&mut self) -> ListenerEvent {
        match &mut self.state {
            State::Off => pending().await,
            State::Waiting(sleep) => {
                sleep.as_mut().await;
                ListenerEvent::ReconnectDue
            }
            State::Connecting(fut) => match fut.as_mut().await {
                Ok(listening) => ListenerEvent::Connected(listening),
                Err(e) => ListenerEvent::ConnectFailed(e),
            },
            State::Connected(l) => match poll_fn(|cx| l.conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                    ListenerEvent::Notification
                }
                Some(Ok(_)) => ListenerEvent::Other,
                Some(Err(e)) => ListenerEvent::Lost(Some(e)),
                None => ListenerEvent::Lost(None),
            },
        }
    }

    /// Moves the connection along; returns whether the outbox should be looked at now.
    pub(super) fn on_event(&mut self, ev: ListenerEvent) -> bool {
        match ev {
            ListenerEvent::ReconnectDue => {
                self.state = State::Connecting(Box::pin(connect_and_listen(self.config.clone())));
                false
            }
            ListenerEvent::Connected(listening) => {
                info!("listening on {CHANNEL}");
                self.metrics.listener_up(true);
                self.reconnect = reconnect_backoff();
                self.state = State::Connected(listening);
                // Doorbells rung while we were not listening are gone: look now.
                true
            }
            ListenerEvent::ConnectFailed(e) => {
                let delay = self.next_reconnect_delay();
                warn!(error = %ErrorChain(&e), ?delay, "LISTEN connection failed; retrying");
                self.metrics.db_error("listen");
                self.state = State::Waiting(Box::pin(tokio::time::sleep(delay)));
                false
            }
            ListenerEvent::Notification => {
                self.metrics.notification();
                true
            }
            ListenerEvent::Other => false,
            ListenerEvent::Lost(e) => {
                let delay = self.next_reconnect_delay();
                match e {
                    Some(e) => {
                        warn!(error = %ErrorChain(&e), ?delay, "LISTEN connection lost; reconnecting")
                    }
                    None => warn!(?delay, "LISTEN connection closed; reconnecting"),
                }
                self.metrics.listener_up(false);
                self.metrics.db_error("listen");
                self.state = State::Waiting(Box::pin(tokio::time::sleep(delay)));
                false
            }
        }
    }

    /// Closes the connection for good (shutdown).
    pub(super) fn stop(&mut self) {
        self.state = State::Off;
        self.metrics.listener_up(false);
    }

    fn next_reconnect_delay(&mut self) -> Duration {
        self.reconnect.next().unwrap_or(Duration::from_secs(10))
    }
}

/// Opens the dedicated connection and runs `LISTEN pay_outbox`, driving the connection
/// with `poll_message` while the statement runs.
async fn connect_and_listen(
    config: crate::tls::DatabaseConfig,
) -> Result<Box<Listening>, tokio_postgres::Error> {
    let (client, mut conn) = config.connect().await?;
    {
        let listen = client.batch_execute("LISTEN pay_outbox");
        tokio::pin!(listen);
        loop {
            tokio::select! {
                r = &mut listen => {
                    r?;
                    break;
                }
                m = poll_fn(|cx| conn.poll_message(cx)) => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    // Closed: the LISTEN future now fails with the reason.
                    None => {
                        listen.await?;
                        break;
                    }
                },
            }
        }
    }
    Ok(Box::new(Listening {
        _client: client,
        conn,
    }))
}

fn listener_config(cfg: &WorkerConfig) -> crate::tls::DatabaseConfig {
    let mut pg = cfg.database.clone();
    pg.application_name("pgpay-worker listener");
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    // A silently dead TCP connection loses doorbells; the poll covers that, keepalives
    // shorten it.
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg
}

/// Reconnect delays: short, jittered, never more than 10 s.
fn reconnect_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_is_bounded() {
        for d in reconnect_backoff().take(50) {
            assert!(d <= Duration::from_secs(20), "{d:?}");
        }
    }
}
