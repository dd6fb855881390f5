//! Which clients have a session right now. One session per client: a newer one replaces
//! the older, which is told to close. The delivery side uses this only to wake a session
//! up when something was stored for its client.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus::IntGauge;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyBytes;

struct Entry {
    id: u64,
    notify: Arc<Notify>,
    replaced: CancellationToken,
}

pub struct Sessions {
    inner: Mutex<HashMap<KeyBytes, Entry>>,
    next_id: AtomicU64,
    connected: IntGauge,
}

/// A live session; dropping it detaches the client (unless a newer session took over).
pub struct Session {
    sessions: Arc<Sessions>,
    pub client: KeyBytes,
    id: u64,
    /// Woken when a payload for this client is stored.
    pub notify: Arc<Notify>,
    /// Cancelled when a newer session of the same client replaces this one.
    pub replaced: CancellationToken,
}

impl Sessions {
    pub fn new(connected: IntGauge) -> Arc<Self> {
        Arc::new(Sessions {
            inner: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            connected,
        })
    }

    /// Registers a session for `client`, replacing any older one.
    pub fn attach(self: &Arc<Self>, client: KeyBytes) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let replaced = CancellationToken::new();
        let old = self.inner.lock().insert(
            client,
            Entry {
                id,
                notify: notify.clone(),
                replaced: replaced.clone(),
            },
        );
        match old {
            Some(old) => old.replaced.cancel(),
            None => self.connected.inc(),
        }
        Session {
            sessions: self.clone(),
            client,
            id,
            notify,
            replaced,
        }
    }

    /// Wakes `client`'s session, if it has one.
    pub fn notify(&self, client: &KeyBytes) {
        if let Some(e) = self.inner.lock().get(client) {
            e.notify.notify_one();
        }
    }

    pub fn is_attached(&self, client: &KeyBytes) -> bool {
        self.inner.lock().contains_key(client)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut inner = self.sessions.inner.lock();
        if inner.get(&self.client).is_some_and(|e| e.id == self.id) {
            inner.remove(&self.client);
            self.sessions.connected.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_session_replaces_older_and_gauge_stays_exact() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let s = Sessions::new(gauge.clone());
        let c = KeyBytes([1; 32]);
        let first = s.attach(c);
        assert_eq!(gauge.get(), 1);
        let second = s.attach(c);
        assert!(first.replaced.is_cancelled());
        assert!(!second.replaced.is_cancelled());
        assert_eq!(gauge.get(), 1);
        drop(first);
        assert!(
            s.is_attached(&c),
            "the old session must not detach the new one"
        );
        drop(second);
        assert!(!s.is_attached(&c));
        assert_eq!(gauge.get(), 0);
    }
}
