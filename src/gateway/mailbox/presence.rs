//! Which clients have a session open right now, and the bytes held for each (see
//! [`super::held`]): the reserve is shared equally among them. Kept in memory only: after a
//! restart no client is present, which is true, and nothing is held.
//!
//! Every change happens under the mailbox's writer lock, together with the transaction
//! that changes the held bytes.

use std::collections::HashMap;

use crate::keys::KeyBytes;

#[derive(Debug, Default)]
struct Present {
    /// Sessions open (a newer session overlaps the one it replaces for a moment).
    sessions: u32,
    held: u64,
}

#[derive(Debug, Default)]
pub(super) struct Presence {
    clients: HashMap<KeyBytes, Present>,
}

impl Presence {
    pub fn is_present(&self, client: &KeyBytes) -> bool {
        self.clients.contains_key(client)
    }

    /// Clients with a session open.
    pub fn count(&self) -> usize {
        self.clients.len()
    }

    /// Bytes held for `client` (0 for an absent one).
    pub fn held_by(&self, client: &KeyBytes) -> u64 {
        self.clients.get(client).map_or(0, |p| p.held)
    }

    /// Present clients holding more than `share` bytes, with what they hold.
    pub fn over_share(&self, share: u64) -> Vec<(KeyBytes, u64)> {
        self.clients
            .iter()
            .filter(|(_, p)| p.held > share)
            .map(|(c, p)| (*c, p.held))
            .collect()
    }

    /// A session of `client` opened.
    pub fn arrive(&mut self, client: KeyBytes) {
        self.clients.entry(client).or_default().sessions += 1;
    }

    /// A session of `client` closed. Returns whether the client is absent now.
    pub fn leave(&mut self, client: &KeyBytes) -> bool {
        let Some(entry) = self.clients.get_mut(client) else {
            return true;
        };
        entry.sessions = entry.sessions.saturating_sub(1);
        if entry.sessions == 0 {
            self.clients.remove(client);
            return true;
        }
        false
    }

    /// A payload of `bytes` was held for `client` (a committed store).
    pub fn hold(&mut self, client: &KeyBytes, bytes: u64) {
        if let Some(entry) = self.clients.get_mut(client) {
            entry.held += bytes;
        }
    }

    /// A held payload of `client` went (acknowledged, released or expired).
    pub fn unhold(&mut self, client: &KeyBytes, bytes: u64) {
        if let Some(entry) = self.clients.get_mut(client) {
            entry.held = entry.held.saturating_sub(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_follow_sessions_and_overlapping_sessions_count_once() {
        let mut p = Presence::default();
        let (a, b) = (KeyBytes([1; 32]), KeyBytes([2; 32]));
        p.arrive(a);
        p.arrive(a); // a replacing session
        p.arrive(b);
        assert_eq!(p.count(), 2);
        p.hold(&a, 100);
        p.hold(&b, 10);
        p.unhold(&b, 4);
        assert_eq!((p.held_by(&a), p.held_by(&b)), (100, 6));
        assert!(!p.leave(&a), "one of its two sessions is still open");
        assert!(p.leave(&a));
        assert_eq!(p.held_by(&a), 0);
        p.hold(&a, 7);
        assert_eq!(p.held_by(&a), 0, "nothing is held for an absent client");
    }
}
