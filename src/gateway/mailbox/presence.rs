//! Which clients have a session open right now, and the bytes stored for them: the
//! mailbox keeps the last part of its global cap for these clients (see the module doc of
//! [`super`]). Kept in memory only: after a restart no client is present, which is true.
//!
//! Every change happens under the mailbox's writer lock, together with the transaction
//! that changes the bytes, so `bytes` always equals the sum of the present clients' usage.

use std::collections::HashMap;

use crate::keys::KeyBytes;

#[derive(Debug, Default)]
struct Present {
    /// Sessions open (a newer session overlaps the one it replaces for a moment).
    sessions: u32,
    bytes: u64,
}

#[derive(Debug, Default)]
pub(super) struct Presence {
    clients: HashMap<KeyBytes, Present>,
    bytes: u64,
}

impl Presence {
    pub fn is_present(&self, client: &KeyBytes) -> bool {
        self.clients.contains_key(client)
    }

    /// Clients with a session open.
    pub fn count(&self) -> usize {
        self.clients.len()
    }

    /// Bytes stored for all present clients.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A session of `client` opened; `stored` is what the client has in the mailbox.
    pub fn arrive(&mut self, client: KeyBytes, stored: u64) {
        let entry = self.clients.entry(client).or_default();
        if entry.sessions == 0 {
            entry.bytes = stored;
            self.bytes += stored;
        }
        entry.sessions += 1;
    }

    /// A session of `client` closed.
    pub fn leave(&mut self, client: &KeyBytes) {
        let Some(entry) = self.clients.get_mut(client) else {
            return;
        };
        entry.sessions = entry.sessions.saturating_sub(1);
        if entry.sessions == 0 {
            self.bytes = self.bytes.saturating_sub(entry.bytes);
            self.clients.remove(client);
        }
    }

    /// `client`'s stored bytes grew (a committed store); no-op for an absent client.
    pub fn grew(&mut self, client: &KeyBytes, by: u64) {
        if let Some(entry) = self.clients.get_mut(client) {
            entry.bytes += by;
            self.bytes += by;
        }
    }

    /// `client`'s stored bytes shrank (a committed delete); no-op for an absent client.
    pub fn shrank(&mut self, client: &KeyBytes, by: u64) {
        if let Some(entry) = self.clients.get_mut(client) {
            // The bytes come from the same transaction's usage, so they cannot exceed it.
            debug_assert!(by <= entry.bytes, "present bytes drifted from usage");
            let by = by.min(entry.bytes);
            entry.bytes -= by;
            self.bytes -= by;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_sessions_and_overlapping_sessions_count_once() {
        let mut p = Presence::default();
        let (a, b) = (KeyBytes([1; 32]), KeyBytes([2; 32]));
        p.arrive(a, 100);
        p.arrive(a, 999); // a replacing session: the stored bytes are already counted
        p.arrive(b, 10);
        assert_eq!((p.count(), p.bytes()), (2, 110));
        p.grew(&a, 5);
        p.shrank(&b, 10);
        assert_eq!(p.bytes(), 105);
        p.leave(&a);
        assert!(p.is_present(&a), "one of its two sessions is still open");
        p.leave(&a);
        assert!(!p.is_present(&a));
        assert_eq!(p.bytes(), 0);
        p.grew(&a, 7);
        assert_eq!(
            p.bytes(),
            0,
            "an absent client's bytes are not present bytes"
        );
    }
}
