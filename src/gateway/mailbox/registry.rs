//! Registrations: the clients that are this gateway's own. A client registers with its
//! first session (the client API makes it pay a stamp for that, see
//! [`crate::gateway::stamp`]); from then on its payloads leave the unregistered budget.
//! A registration records when the client was last seen (a session opened or closed) and
//! lapses after `NYM_NODE_REGISTRATION_EXPIRY` without one: what the client has stored stays
//! until its retention, counted as unregistered again.
//!
//! A session also makes its client *present* (see [`super::presence`]) for as long as the
//! returned [`Attendance`] lives.

use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{
    BY_SEEN, EXPIRY_BATCH, META, Mailbox, MailboxError, NEXT_IDS, REGISTERED, Totals, USAGE, err,
    unix_now,
};
use crate::keys::KeyBytes;

/// How stale a registration's last-seen time may be before a session rewrites it.
const SEEN_GRANULARITY_SECS: u64 = 3600;

/// The index key of a registration last seen at `seen`.
pub(super) fn seen_key(seen: u64, client: &[u8; 32]) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&seen.to_be_bytes());
    k[8..].copy_from_slice(client);
    k
}

/// A client's open session, as the mailbox sees it: while it lives, the client's payloads
/// may be held in the reserve kept for clients online. End it with [`Attendance::end`]
/// (which drops what is held and records when the client was last seen); dropping it only
/// ends the presence, and the minute sweep drops what was held.
pub struct Attendance {
    mailbox: Arc<Mailbox>,
    client: KeyBytes,
    ended: bool,
}

impl Attendance {
    /// Ends the session: the client is last seen now and is present no more. Blocks on
    /// the store (call it off the async runtime).
    pub fn end(mut self) -> Result<(), MailboxError> {
        self.ended = true;
        let mut presence = self.mailbox.writer.lock();
        if presence.leave(&self.client) {
            // Held payloads are for clients online: their senders retransmit them.
            self.mailbox.release_held_of(&mut presence, &self.client)?;
        }
        self.mailbox.record_seen(&self.client, false).map(|_| ())
    }
}

impl Drop for Attendance {
    fn drop(&mut self) {
        if !self.ended {
            self.mailbox.writer.lock().leave(&self.client);
        }
    }
}

impl Mailbox {
    /// Whether `client` holds a registration.
    pub fn is_registered(&self, client: &KeyBytes) -> Result<bool, MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let registered = txn.open_table(REGISTERED).map_err(err)?;
        Ok(registered.get(client.as_bytes()).map_err(err)?.is_some())
    }

    /// Clients registered now.
    pub fn registered_count(&self) -> Result<u64, MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(REGISTERED).map_err(err)?.len().map_err(err)
    }

    /// Registers `client` (or renews its registration) without a session. Returns whether
    /// it is new.
    pub fn register(&self, client: &KeyBytes) -> Result<bool, MailboxError> {
        let _presence = self.writer.lock();
        self.record_seen(client, true)
    }

    /// A session of `client` opened: registers it (or renews its registration) and makes it
    /// present. Returns the attendance and whether the registration is new.
    pub fn attend(self: &Arc<Self>, client: &KeyBytes) -> Result<(Attendance, bool), MailboxError> {
        let mut presence = self.writer.lock();
        let new = self.record_seen(client, true)?;
        if !presence.is_present(client) {
            // Left by a session that ended without `end` and not swept yet.
            self.release_held_of(&mut presence, client)?;
        }
        presence.arrive(*client);
        if let Err(e) = self.trim_held_to_shares(&mut presence) {
            // No attendance will ever end this presence: undo it before failing.
            presence.leave(client);
            return Err(e);
        }
        let attendance = Attendance {
            mailbox: self.clone(),
            client: *client,
            ended: false,
        };
        Ok((attendance, new))
    }

    /// Records that `client` was seen now. With `register`, an unknown client is
    /// registered (its stored bytes leave the unregistered budget); without, only a
    /// registration it holds is renewed. The caller holds the writer lock.
    fn record_seen(&self, client: &KeyBytes, register: bool) -> Result<bool, MailboxError> {
        let now = unix_now();
        // A write (and its fsync) per session would let one client reconnecting in a loop
        // stall every store: last-seen times are kept to the hour.
        let seen = {
            let txn = self.db.begin_read().map_err(err)?;
            let registered = txn.open_table(REGISTERED).map_err(err)?;
            registered
                .get(client.as_bytes())
                .map_err(err)?
                .map(|v| v.value())
        };
        match seen {
            Some(seen) if seen.saturating_add(SEEN_GRANULARITY_SECS) > now => return Ok(false),
            None if !register => return Ok(false),
            _ => {}
        }
        let txn = self.db.begin_write().map_err(err)?;
        let new;
        {
            let mut registered = txn.open_table(REGISTERED).map_err(err)?;
            let mut by_seen = txn.open_table(BY_SEEN).map_err(err)?;
            let before = registered
                .get(client.as_bytes())
                .map_err(err)?
                .map(|v| v.value());
            new = before.is_none();
            if new && !register {
                return Ok(false);
            }
            if let Some(before) = before {
                by_seen
                    .remove(&seen_key(before, client.as_bytes()))
                    .map_err(err)?;
            }
            registered.insert(client.as_bytes(), now).map_err(err)?;
            by_seen
                .insert(&seen_key(now, client.as_bytes()), ())
                .map_err(err)?;
            if new {
                let used = txn
                    .open_table(USAGE)
                    .map_err(err)?
                    .get(client.as_bytes())
                    .map_err(err)?
                    .map_or(0, |v| v.value());
                let mut meta = txn.open_table(META).map_err(err)?;
                let mut totals = Totals::load(&meta)?;
                totals.unregistered = totals.unregistered.saturating_sub(used);
                totals.save(&mut meta)?;
            }
        }
        txn.commit().map_err(err)?;
        Ok(new)
    }

    /// Ends every registration whose client has not been seen for `idle` and has no session
    /// open, [`EXPIRY_BATCH`] per transaction. Returns how many ended.
    pub fn expire_registrations(&self, idle: Duration) -> Result<usize, MailboxError> {
        let cutoff = unix_now().saturating_sub(idle.as_secs());
        let candidates = self.idle_registrations(cutoff)?;
        let mut ended = 0;
        for chunk in candidates.chunks(EXPIRY_BATCH) {
            ended += self.end_registrations(chunk, cutoff)?;
        }
        Ok(ended)
    }

    /// Clients last seen before `cutoff` (a range of the index, not a scan).
    fn idle_registrations(&self, cutoff: u64) -> Result<Vec<KeyBytes>, MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let by_seen = txn.open_table(BY_SEEN).map_err(err)?;
        let end = seen_key(cutoff, &[0u8; 32]);
        let mut out = Vec::new();
        for entry in by_seen.range::<&[u8; 40]>(..&end).map_err(err)? {
            let (key, _) = entry.map_err(err)?;
            let mut client = [0u8; 32];
            client.copy_from_slice(&key.value()[8..]);
            out.push(KeyBytes(client));
        }
        Ok(out)
    }

    /// Ends the registrations of `clients` that are still idle, in one transaction; their
    /// stored bytes count as unregistered again.
    fn end_registrations(&self, clients: &[KeyBytes], cutoff: u64) -> Result<usize, MailboxError> {
        let presence = self.writer.lock();
        let txn = self.db.begin_write().map_err(err)?;
        let mut ended = 0;
        {
            let mut registered = txn.open_table(REGISTERED).map_err(err)?;
            let mut by_seen = txn.open_table(BY_SEEN).map_err(err)?;
            let usage = txn.open_table(USAGE).map_err(err)?;
            let mut next_ids = txn.open_table(NEXT_IDS).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut totals = Totals::load(&meta)?;
            for client in clients {
                let key = client.as_bytes();
                // Seen again, or in a session, since the scan: it stays.
                let seen = registered.get(key).map_err(err)?.map(|v| v.value());
                let Some(seen) = seen.filter(|s| *s < cutoff && !presence.is_present(client))
                else {
                    continue;
                };
                registered.remove(key).map_err(err)?;
                by_seen.remove(&seen_key(seen, key)).map_err(err)?;
                let used = usage.get(key).map_err(err)?.map_or(0, |v| v.value());
                if used == 0 {
                    next_ids.remove(key).map_err(err)?;
                }
                totals.unregistered += used;
                ended += 1;
            }
            totals.save(&mut meta)?;
        }
        if ended == 0 {
            txn.abort().map_err(err)?;
        } else {
            txn.commit().map_err(err)?;
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Incoming, Limits, Outcome, cost};
    use super::*;

    fn payload(client: KeyBytes, n: usize) -> Vec<Incoming> {
        (0..n)
            .map(|_| Incoming {
                client,
                identifier: [0; 16],
                body: vec![0; 100],
            })
            .collect()
    }

    fn stored(m: &Mailbox, items: &[Incoming]) -> usize {
        m.store(items).unwrap().iter().flatten().count()
    }

    #[test]
    fn the_seen_index_is_rebuilt_for_a_store_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let limits = Limits::per_client(1 << 20);
        let m = Mailbox::open_with(&path, limits).unwrap();
        m.register(&KeyBytes([1; 32])).unwrap();
        m.register(&KeyBytes([2; 32])).unwrap();
        let txn = m.db.begin_write().unwrap();
        txn.open_table(BY_SEEN)
            .unwrap()
            .retain(|_, _| false)
            .unwrap();
        txn.commit().unwrap();
        assert!(m.idle_registrations(unix_now() + 1).unwrap().is_empty());
        drop(m);
        let m = Mailbox::open_with(&path, limits).unwrap();
        assert_eq!(m.idle_registrations(unix_now() + 1).unwrap().len(), 2);
    }

    #[test]
    fn dormant_registrations_cannot_shut_out_a_present_client() {
        let dir = tempfile::tempdir().unwrap();
        let each = cost(&[0; 100]);
        let limits = Limits {
            per_client: 30 * each,
            total: 100 * each,
            unregistered: 10 * each,
            present_reserve: 40 * each,
        };
        let m = Arc::new(Mailbox::open_with(&dir.path().join("m.redb"), limits).unwrap());
        // 1,000 registered clients that never come back, each sent what its quota takes.
        for i in 0..1000u32 {
            let mut key = [9u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let dormant = KeyBytes(key);
            m.register(&dormant).unwrap();
            m.store(&payload(dormant, 30)).unwrap();
        }
        let (total, _) = m.totals().unwrap();
        assert_eq!(total, 60 * each, "absent clients stop at total - reserve");
        // Two clients with sessions share the reserve, and each gets its half.
        let (a, b) = (KeyBytes([1; 32]), KeyBytes([2; 32]));
        let (_at_a, new) = m.attend(&a).unwrap();
        assert!(new);
        let (_at_b, _) = m.attend(&b).unwrap();
        assert_eq!(stored(&m, &payload(a, 30)), 20, "a's share of the reserve");
        assert_eq!(stored(&m, &payload(b, 30)), 20, "b's share is still there");
        // What a present client acknowledges makes room for it again.
        let ids: Vec<u64> = m
            .fetch_after(&a, 0, 5)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        m.ack(&a, &ids).unwrap();
        assert_eq!(stored(&m, &payload(a, 10)), 5);
        assert_eq!(m.totals().unwrap().0, limits.total);
    }

    #[test]
    fn a_client_that_leaves_counts_as_absent_and_nothing_stored_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let each = cost(&[0; 100]);
        let limits = Limits {
            per_client: 50 * each,
            total: 100 * each,
            unregistered: 100 * each,
            present_reserve: 50 * each,
        };
        let m = Arc::new(Mailbox::open_with(&dir.path().join("m.redb"), limits).unwrap());
        let a = KeyBytes([1; 32]);
        let (attendance, _) = m.attend(&a).unwrap();
        assert_eq!(stored(&m, &payload(a, 60)), 50);
        attendance.end().unwrap();
        // Absent now, and absent clients hold 50 of the 50 they may: others wait.
        let b = KeyBytes([2; 32]);
        m.register(&b).unwrap();
        assert_eq!(stored(&m, &payload(b, 1)), 0);
        assert_eq!(m.fetch_after(&a, 0, 100).unwrap().len(), 50);
        // b comes online: the reserve is there for it.
        let (b_here, _) = m.attend(&b).unwrap();
        assert_eq!(stored(&m, &payload(b, 60)), 50);
        // What b was held goes when b does; what a stored stays.
        b_here.end().unwrap();
        assert_eq!(m.totals().unwrap().0, 50 * each);
        assert_eq!(m.usage(&b).unwrap(), 0);
        assert_eq!(m.fetch_after(&a, 0, 100).unwrap().len(), 50);
    }

    #[test]
    fn the_reserve_goes_to_whoever_is_online_whoever_filled_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let each = cost(&[0; 100]);
        let limits = Limits {
            per_client: 50 * each,
            total: 100 * each,
            unregistered: 100 * each,
            present_reserve: 40 * each,
        };
        let m = Arc::new(Mailbox::open_with(&dir.path().join("m.redb"), limits).unwrap());
        // Dormant clients fill the durable space.
        for i in 0..2u8 {
            let dormant = KeyBytes([100 + i; 32]);
            m.register(&dormant).unwrap();
            assert_eq!(stored(&m, &payload(dormant, 30)), 30);
        }
        // a, alone online, is held the whole reserve and acknowledges none of it.
        let a = KeyBytes([1; 32]);
        let (a_here, _) = m.attend(&a).unwrap();
        let acks: Vec<Option<Vec<u8>>> = (0..50).map(|i| Some(vec![i as u8; 3])).collect();
        let outcomes = m.store_acked(&payload(a, 50), &acks).unwrap();
        let held: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Held(id) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(held.len(), 40);
        // b comes online: a keeps its half, b gets the other half at once.
        let b = KeyBytes([2; 32]);
        let (b_here, _) = m.attend(&b).unwrap();
        assert_eq!(m.usage(&a).unwrap(), 20 * each, "a's newest held went");
        assert_eq!(stored(&m, &payload(b, 50)), 20);
        // A held payload acknowledged by its client releases its SURB-ACK, once.
        let (removed, released) = m.ack_releasing(&a, &held[..2]).unwrap();
        assert_eq!((removed, released), (2, vec![vec![0; 3], vec![1; 3]]));
        assert_eq!(m.ack_releasing(&a, &held[..2]).unwrap(), (0, vec![]));
        // Held payloads no one acknowledged in time are dropped; durable ones never.
        assert_eq!(m.release_held(|_, _| true).unwrap(), 18 + 20);
        assert_eq!(m.totals().unwrap().0, 60 * each);
        assert_eq!(m.usage(&a).unwrap(), 0);
        a_here.end().unwrap();
        // A restart drops whatever was held (nobody is online after it).
        assert_eq!(stored(&m, &payload(b, 5)), 5);
        drop((b_here, m));
        let m = Mailbox::open_with(&dir.path().join("m.redb"), limits).unwrap();
        assert_eq!(m.totals().unwrap().0, 60 * each);
        assert_eq!(m.usage(&b).unwrap(), 0);
    }

    #[test]
    fn registrations_lapse_after_inactivity_but_not_in_a_session() {
        let dir = tempfile::tempdir().unwrap();
        let each = cost(&[0; 100]);
        let limits = Limits {
            per_client: 50 * each,
            total: 1000 * each,
            unregistered: 1000 * each,
            present_reserve: 0,
        };
        let m = Arc::new(Mailbox::open_with(&dir.path().join("m.redb"), limits).unwrap());
        let (idle, online, empty) = (KeyBytes([1; 32]), KeyBytes([2; 32]), KeyBytes([3; 32]));
        m.register(&idle).unwrap();
        m.register(&empty).unwrap();
        m.store(&payload(idle, 3)).unwrap();
        let (_online, _) = m.attend(&online).unwrap();
        assert_eq!(
            m.expire_registrations(Duration::from_secs(3600)).unwrap(),
            0
        );
        assert_eq!(m.totals().unwrap().1, 0);
        // "Idle for 0 s" covers everyone last seen before now + 1 s: use the cutoff directly.
        let candidates = m.idle_registrations(unix_now() + 1).unwrap();
        assert_eq!(candidates.len(), 3);
        assert_eq!(m.end_registrations(&candidates, unix_now() + 1).unwrap(), 2);
        assert!(m.is_registered(&online).unwrap(), "a present client stays");
        assert_eq!(m.idle_registrations(unix_now() + 1).unwrap(), vec![online]);
        assert!(!m.is_registered(&idle).unwrap());
        assert_eq!(m.registered_count().unwrap(), 1);
        // The lapsed client's payloads are kept, counted as unregistered.
        assert_eq!(m.fetch_after(&idle, 0, 10).unwrap().len(), 3);
        assert_eq!(m.totals().unwrap().1, 3 * each);
        // Its ids go on where they were; the empty one starts over.
        m.store(&payload(idle, 1)).unwrap();
        assert_eq!(m.fetch_after(&idle, 3, 10).unwrap()[0].id, 4);
        assert_eq!(m.store(&payload(empty, 1)).unwrap(), vec![Some(1)]);
        // Registering again moves its bytes back out of the unregistered budget.
        assert!(m.register(&idle).unwrap());
        assert_eq!(m.totals().unwrap().1, each);
    }
}
