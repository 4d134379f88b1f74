//! What the server, the webhook dispatcher and the library handle share.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::state::State;
use crate::webhooks::Sender;

#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub clock: Clock,
    state: Mutex<State>,
    /// Bumped after every change, so waiters re-check their condition instead of polling.
    changes: watch::Sender<u64>,
    pub shutdown: CancellationToken,
}

impl Shared {
    pub fn new(config: Config, tx: Sender, base_url: String) -> Shared {
        let state = State::new(&config, config.webhook.clone(), tx, 0, base_url);
        Shared {
            config,
            clock: Clock::default(),
            state: Mutex::new(state),
            changes: watch::Sender::new(0),
            shutdown: CancellationToken::new(),
        }
    }

    /// Runs `f` under the lock and wakes waiters. Never hold it across an await.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.changes
            .send_modify(|version| *version = version.wrapping_add(1));
        result
    }

    /// Runs `f` under the lock without waking anyone (for readers such as the ledger).
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Handlers do not panic; if one ever did, its half-made change is still better than
        // wedging every later request.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
