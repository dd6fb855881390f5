//! The gateway's durable mailbox: every final-hop payload for a client is written here
//! before anything else happens to it, and deleted only when the client acknowledges it
//! or when it is older than `NYM_NODE_MAILBOX_RETENTION`.
//!
//! Storage is `redb`: a pure-Rust, ACID, crash-safe embedded B-tree store. No C library
//! to build, no server to run, and a committed transaction survives SIGKILL, which is the
//! property the mailbox exists for. Writes are batched (one transaction, one fsync, per
//! batch of payloads) so durability does not cost a disk flush per packet.
//!
//! Limits, all in bytes, checked for every payload in the same transaction that stores it:
//! - each client may hold `NYM_NODE_MAILBOX_QUOTA_BYTES`;
//! - all clients together may hold `NYM_NODE_MAILBOX_MAX_BYTES`, so no mix of destinations
//!   can fill the disk;
//! - clients not registered here (made-up destinations, drop cover, a new client not yet
//!   online, a registration that expired) share `NYM_NODE_MAILBOX_UNREGISTERED_BYTES`, so
//!   they cannot crowd out the gateway's own clients;
//! - payloads are stored durably up to `NYM_NODE_MAILBOX_PRESENT_RESERVE_PERCENT` of the cap
//!   short of it. The reserve is for clients with a session open, each up to an equal share:
//!   a payload for such a client that finds the durable space full is *held* (see [`held`]).
//!   A held payload is pushed like any other, but its sender is acknowledged only once the
//!   client acknowledges it, and it is dropped (the sender retransmits) if the client leaves
//!   or does not acknowledge it in time. So the reserve is a delivery buffer that no client
//!   keeps by leaving or by not acknowledging, and dormant clients, however many and however
//!   they filled the durable space, cannot shut out a client that is online. Nothing
//!   acknowledged to a sender is ever deleted to make room.
//!
//! Registration (see [`registry`]) is what a client's first session, paid for with a stamp,
//! buys: its payloads leave the unregistered budget. It lapses after a stated inactivity.
//!
//! A payload over a limit is refused (the newest is dropped, what is stored is kept),
//! counted, and, since no acknowledgement goes back to the sender for it, retransmitted by
//! the sender later. Ids are per client, so they say nothing about other clients' traffic.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::keys::KeyBytes;
use crate::mixnet::sphinx::IDENTIFIER_SIZE;
use presence::Presence;

pub mod held;
mod presence;
pub mod registry;

/// client ‖ id (big-endian, so a client's entries sort by id) → identifier ‖ stored_at ‖ body
const MESSAGES: TableDefinition<&[u8; 40], &[u8]> = TableDefinition::new("messages");
/// stored_at ‖ client ‖ id → () : finds expired entries without a scan.
const BY_AGE: TableDefinition<&[u8; 48], ()> = TableDefinition::new("messages_by_age");
/// client → bytes stored
const USAGE: TableDefinition<&[u8; 32], u64> = TableDefinition::new("usage");
/// client → next id to give one of its payloads (ids are per client)
const NEXT_IDS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("next_ids");
/// client → unix time its last session here opened or closed
const REGISTERED: TableDefinition<&[u8; 32], u64> = TableDefinition::new("registered");
/// last seen ‖ client → () : finds lapsed registrations without a scan.
const BY_SEEN: TableDefinition<&[u8; 40], ()> = TableDefinition::new("registered_by_seen");
/// client ‖ id → stored_at ‖ the SURB-ACK to send when the client acknowledges it (may be
/// empty): the held payloads (see [`held`]).
const HELD: TableDefinition<&[u8; 40], &[u8]> = TableDefinition::new("held");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Bytes stored for all clients, for unregistered ones, and held.
const TOTAL: &str = "total_bytes";
const UNREGISTERED: &str = "unregistered_bytes";
const HELD_BYTES: &str = "held_bytes";
/// Expired entries deleted per transaction, so a sweep never holds the store for long.
pub const EXPIRY_BATCH: usize = 1024;

/// The byte counters kept in `META`, read and written once per transaction.
struct Totals {
    total: u64,
    unregistered: u64,
    held: u64,
}

impl Totals {
    fn load(meta: &impl ReadableTable<&'static str, u64>) -> Result<Self, MailboxError> {
        let get = |k: &str| -> Result<u64, MailboxError> {
            Ok(meta.get(k).map_err(err)?.map_or(0, |v| v.value()))
        };
        Ok(Totals {
            total: get(TOTAL)?,
            unregistered: get(UNREGISTERED)?,
            held: get(HELD_BYTES)?,
        })
    }

    fn save(&self, meta: &mut redb::Table<&'static str, u64>) -> Result<(), MailboxError> {
        meta.insert(TOTAL, self.total).map_err(err)?;
        meta.insert(UNREGISTERED, self.unregistered).map_err(err)?;
        meta.insert(HELD_BYTES, self.held).map_err(err)?;
        Ok(())
    }
}

/// The mailbox's byte limits (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_client: u64,
    pub total: u64,
    pub unregistered: u64,
    /// The last bytes under `total`, kept for clients with a session open.
    pub present_reserve: u64,
}

impl Limits {
    /// Only a per-client quota (tests and tools).
    pub fn per_client(bytes: u64) -> Self {
        Limits {
            per_client: bytes,
            total: u64::MAX,
            unregistered: u64::MAX,
            present_reserve: 0,
        }
    }

    /// Where a payload of `cost` bytes goes, for a client holding `used` bytes of which
    /// `held` are held; `None`: refused.
    fn admit(
        &self,
        cost: u64,
        used: u64,
        held: u64,
        client: ClientStanding,
        room: &Room,
    ) -> Option<Placement> {
        let after = |bytes: u64| bytes.saturating_add(cost);
        if after(used) > self.per_client || after(room.total) > self.total {
            return None;
        }
        let durable_cap = self.total.saturating_sub(self.present_reserve);
        let durable = after(room.total.saturating_sub(room.held)) <= durable_cap
            && (client != ClientStanding::Unregistered
                || after(room.unregistered) <= self.unregistered);
        if durable {
            return Some(Placement::Durable);
        }
        // The reserve: for clients online, each up to an equal share of it.
        let share = self.present_reserve / room.present_clients.max(1) as u64;
        let fits = after(room.held) <= self.present_reserve && after(held) <= share;
        (client == ClientStanding::Present && fits).then_some(Placement::Held)
    }
}

/// Where an admitted payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Stored until acknowledged or past the retention; its sender is acknowledged now.
    Durable,
    /// Held for a client online (see [`held`]).
    Held,
}

/// What a client is to the mailbox's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientStanding {
    /// A session is open.
    Present,
    /// Registered, no session open.
    Registered,
    Unregistered,
}

/// The bytes the limits compare against, for one store transaction.
struct Room {
    total: u64,
    unregistered: u64,
    held: u64,
    present_clients: usize,
}

/// What became of a payload offered to the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored durably under this id: acknowledge its sender now.
    Stored(u64),
    /// Held under this id: its sender is acknowledged when the client acknowledges it.
    Held(u64),
    /// Over a limit: not stored, not acknowledged (its sender retransmits).
    Refused,
}

impl Outcome {
    pub fn id(&self) -> Option<u64> {
        match self {
            Outcome::Stored(id) | Outcome::Held(id) => Some(*id),
            Outcome::Refused => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("mailbox: {0}")]
pub struct MailboxError(String);

impl MailboxError {
    /// A blocking mailbox task that panicked or was cancelled.
    pub fn from_task(e: &tokio::task::JoinError) -> Self {
        MailboxError(format!("mailbox task: {e}"))
    }
}

fn err(e: impl std::fmt::Display) -> MailboxError {
    MailboxError(e.to_string())
}

/// A payload waiting for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: u64,
    pub identifier: [u8; IDENTIFIER_SIZE],
    pub body: Vec<u8>,
}

/// A payload to store.
pub struct Incoming {
    pub client: KeyBytes,
    pub identifier: [u8; IDENTIFIER_SIZE],
    pub body: Vec<u8>,
}

pub struct Mailbox {
    db: Database,
    limits: Limits,
    /// Held by every write, with its transaction: writes are serialised by redb anyway,
    /// and the present clients' held bytes must change with the store.
    writer: Mutex<Presence>,
    /// Payloads stored, kept exact by every store, ack and expiry (for the gauge).
    stored: std::sync::atomic::AtomicU64,
}

fn message_key(client: &KeyBytes, id: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(client.as_bytes());
    k[32..].copy_from_slice(&id.to_be_bytes());
    k
}

fn age_key(stored_at: u64, client: &[u8], id: u64) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..8].copy_from_slice(&stored_at.to_be_bytes());
    k[8..40].copy_from_slice(client);
    k[40..].copy_from_slice(&id.to_be_bytes());
    k
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes an entry counts against its client's quota.
fn cost(body: &[u8]) -> u64 {
    (body.len() + IDENTIFIER_SIZE + 8) as u64
}

impl Mailbox {
    /// Opens (or creates) the store at `path` with only a per-client quota.
    pub fn open(path: &Path, quota_bytes: u64) -> Result<Self, MailboxError> {
        Self::open_with(path, Limits::per_client(quota_bytes))
    }

    /// Opens (or creates) the store at `path`.
    pub fn open_with(path: &Path, limits: Limits) -> Result<Self, MailboxError> {
        // Only the node may read what it stores for its clients (ciphertext, but also who
        // receives how much and when).
        let db = crate::private_store::open(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(MESSAGES).map_err(err)?;
            txn.open_table(BY_AGE).map_err(err)?;
            txn.open_table(USAGE).map_err(err)?;
            txn.open_table(NEXT_IDS).map_err(err)?;
            let registered = txn.open_table(REGISTERED).map_err(err)?;
            let mut by_seen = txn.open_table(BY_SEEN).map_err(err)?;
            // A store from before the index, or one it fell out of step with: rebuild it.
            if by_seen.len().map_err(err)? != registered.len().map_err(err)? {
                by_seen.retain(|_, _| false).map_err(err)?;
                for entry in registered.iter().map_err(err)? {
                    let (client, seen) = entry.map_err(err)?;
                    by_seen
                        .insert(&registry::seen_key(seen.value(), client.value()), ())
                        .map_err(err)?;
                }
            }
            txn.open_table(HELD).map_err(err)?;
            txn.open_table(META).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        let stored = {
            let txn = db.begin_read().map_err(err)?;
            let messages = txn.open_table(MESSAGES).map_err(err)?;
            messages.len().map_err(err)?
        };
        let mailbox = Mailbox {
            db,
            limits,
            writer: Mutex::new(Presence::default()),
            stored: std::sync::atomic::AtomicU64::new(stored),
        };
        // Nobody is online after a start: what was held is dropped (never acknowledged to
        // its senders, so they retransmit it).
        mailbox.release_held(|_, _| true)?;
        Ok(mailbox)
    }

    /// Payloads currently stored, for all clients.
    pub fn stored(&self) -> u64 {
        self.stored.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a batch in one transaction. Returns, per item, its id (stored or held), or
    /// `None` if a limit refused it.
    pub fn store(&self, items: &[Incoming]) -> Result<Vec<Option<u64>>, MailboxError> {
        let acks = vec![None; items.len()];
        Ok(self
            .store_acked(items, &acks)?
            .iter()
            .map(Outcome::id)
            .collect())
    }

    /// Stores a batch in one transaction; `acks[i]` is the SURB-ACK of `items[i]`, kept with
    /// it if it is held (sent when the client acknowledges it).
    pub fn store_acked(
        &self,
        items: &[Incoming],
        acks: &[Option<Vec<u8>>],
    ) -> Result<Vec<Outcome>, MailboxError> {
        let now = unix_now();
        let mut presence = self.writer.lock();
        let txn = self.db.begin_write().map_err(err)?;
        let mut outcomes = Vec::with_capacity(items.len());
        // Applied to `presence` only once the transaction commits.
        let mut held_now: Vec<(KeyBytes, u64)> = Vec::new();
        {
            let mut messages = txn.open_table(MESSAGES).map_err(err)?;
            let mut by_age = txn.open_table(BY_AGE).map_err(err)?;
            let mut usage = txn.open_table(USAGE).map_err(err)?;
            let mut next_ids = txn.open_table(NEXT_IDS).map_err(err)?;
            let mut held = txn.open_table(HELD).map_err(err)?;
            let registered = txn.open_table(REGISTERED).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut totals = Totals::load(&meta)?;
            for (i, item) in items.iter().enumerate() {
                let client = item.client.as_bytes();
                let used = usage.get(client).map_err(err)?.map_or(0, |v| v.value());
                let standing = if presence.is_present(&item.client) {
                    ClientStanding::Present
                } else if registered.get(client).map_err(err)?.is_some() {
                    ClientStanding::Registered
                } else {
                    ClientStanding::Unregistered
                };
                let c = cost(&item.body);
                let room = Room {
                    total: totals.total,
                    unregistered: totals.unregistered,
                    held: totals.held,
                    present_clients: presence.count(),
                };
                let held_by = presence.held_by(&item.client)
                    + held_now
                        .iter()
                        .filter(|(c, _)| *c == item.client)
                        .map(|(_, b)| b)
                        .sum::<u64>();
                let Some(placement) = self.limits.admit(c, used, held_by, standing, &room) else {
                    outcomes.push(Outcome::Refused);
                    continue;
                };
                let id = next_ids.get(client).map_err(err)?.map_or(1, |v| v.value());
                next_ids.insert(client, id + 1).map_err(err)?;
                let mut value = Vec::with_capacity(IDENTIFIER_SIZE + 8 + item.body.len());
                value.extend_from_slice(&item.identifier);
                value.extend_from_slice(&now.to_be_bytes());
                value.extend_from_slice(&item.body);
                let key = message_key(&item.client, id);
                messages.insert(&key, value.as_slice()).map_err(err)?;
                by_age.insert(&age_key(now, client, id), ()).map_err(err)?;
                usage.insert(client, used + c).map_err(err)?;
                totals.total += c;
                if standing == ClientStanding::Unregistered {
                    totals.unregistered += c;
                }
                outcomes.push(match placement {
                    Placement::Held => {
                        let ack = acks.get(i).and_then(Option::as_deref).unwrap_or_default();
                        let record = [&now.to_be_bytes()[..], ack].concat();
                        held.insert(&key, record.as_slice()).map_err(err)?;
                        totals.held += c;
                        held_now.push((item.client, c));
                        Outcome::Held(id)
                    }
                    Placement::Durable => Outcome::Stored(id),
                });
            }
            totals.save(&mut meta)?;
        }
        txn.commit().map_err(err)?;
        for (client, bytes) in held_now {
            presence.hold(&client, bytes);
        }
        let added = outcomes.iter().filter(|o| o.id().is_some()).count() as u64;
        self.stored
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        Ok(outcomes)
    }

    /// Bytes stored for all clients, and for unregistered ones.
    pub fn totals(&self) -> Result<(u64, u64), MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let totals = Totals::load(&txn.open_table(META).map_err(err)?)?;
        Ok((totals.total, totals.unregistered))
    }

    /// Up to `limit` stored payloads of `client` with an id greater than `after`, oldest first.
    pub fn fetch_after(
        &self,
        client: &KeyBytes,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let messages = txn.open_table(MESSAGES).map_err(err)?;
        let from = message_key(client, after.saturating_add(1));
        let to = message_key(client, u64::MAX);
        let mut out = Vec::new();
        for entry in messages.range::<&[u8; 40]>(&from..=&to).map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let key = k.value();
            let value = v.value();
            if value.len() < IDENTIFIER_SIZE + 8 {
                continue;
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&key[32..]);
            let mut identifier = [0u8; IDENTIFIER_SIZE];
            identifier.copy_from_slice(&value[..IDENTIFIER_SIZE]);
            out.push(Stored {
                id: u64::from_be_bytes(id),
                identifier,
                body: value[IDENTIFIER_SIZE + 8..].to_vec(),
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes acknowledged payloads in one transaction; ids that are not stored (already
    /// gone) are ignored.
    pub fn ack(&self, client: &KeyBytes, ids: &[u64]) -> Result<usize, MailboxError> {
        Ok(self.ack_releasing(client, ids)?.0)
    }

    /// [`Mailbox::ack`], returning also the SURB-ACKs of the held payloads among them: their
    /// senders are to be acknowledged now.
    pub fn ack_releasing(
        &self,
        client: &KeyBytes,
        ids: &[u64],
    ) -> Result<(usize, Vec<Vec<u8>>), MailboxError> {
        let entries: Vec<(KeyBytes, u64)> = ids.iter().map(|id| (*client, *id)).collect();
        let mut presence = self.writer.lock();
        self.delete_locked(&mut presence, &entries)
    }

    /// Deletes entries (of any clients) in one transaction, keeping every counter exact.
    /// Returns how many were deleted and the SURB-ACKs kept with the held ones.
    fn delete_locked(
        &self,
        presence: &mut Presence,
        entries: &[(KeyBytes, u64)],
    ) -> Result<(usize, Vec<Vec<u8>>), MailboxError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut removed = 0;
        let mut acks = Vec::new();
        let mut unheld: Vec<(KeyBytes, u64)> = Vec::new();
        {
            let mut messages = txn.open_table(MESSAGES).map_err(err)?;
            let mut by_age = txn.open_table(BY_AGE).map_err(err)?;
            let mut usage = txn.open_table(USAGE).map_err(err)?;
            let mut next_ids = txn.open_table(NEXT_IDS).map_err(err)?;
            let mut held = txn.open_table(HELD).map_err(err)?;
            let registered = txn.open_table(REGISTERED).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut totals = Totals::load(&meta)?;
            for (client, id) in entries {
                let key = message_key(client, *id);
                let Some(value) = messages
                    .remove(&key)
                    .map_err(err)?
                    .map(|v| v.value().to_vec())
                else {
                    continue;
                };
                let mut stored_at = [0u8; 8];
                stored_at.copy_from_slice(&value[IDENTIFIER_SIZE..IDENTIFIER_SIZE + 8]);
                by_age
                    .remove(&age_key(
                        u64::from_be_bytes(stored_at),
                        client.as_bytes(),
                        *id,
                    ))
                    .map_err(err)?;
                let freed = cost(&value[IDENTIFIER_SIZE + 8..]);
                removed += 1;
                totals.total = totals.total.saturating_sub(freed);
                if let Some(record) = held.remove(&key).map_err(err)? {
                    totals.held = totals.held.saturating_sub(freed);
                    unheld.push((*client, freed));
                    let ack = record.value().get(8..).unwrap_or_default().to_vec();
                    if !ack.is_empty() {
                        acks.push(ack);
                    }
                }
                let known = registered.get(client.as_bytes()).map_err(err)?.is_some();
                if !known {
                    totals.unregistered = totals.unregistered.saturating_sub(freed);
                }
                let used = usage
                    .get(client.as_bytes())
                    .map_err(err)?
                    .map_or(0, |v| v.value());
                let left = used.saturating_sub(freed);
                if left == 0 {
                    usage.remove(client.as_bytes()).map_err(err)?;
                    // A made-up destination leaves nothing behind once its last payload goes.
                    if !known {
                        next_ids.remove(client.as_bytes()).map_err(err)?;
                    }
                } else {
                    usage.insert(client.as_bytes(), left).map_err(err)?;
                }
            }
            totals.save(&mut meta)?;
        }
        txn.commit().map_err(err)?;
        for (client, bytes) in unheld {
            presence.unhold(&client, bytes);
        }
        self.stored
            .fetch_sub(removed as u64, std::sync::atomic::Ordering::Relaxed);
        Ok((removed, acks))
    }

    /// Deletes every payload stored longer ago than `retention`, [`EXPIRY_BATCH`] entries per
    /// transaction. Returns how many.
    pub fn expire(&self, retention: Duration) -> Result<usize, MailboxError> {
        let cutoff = unix_now().saturating_sub(retention.as_secs());
        let mut removed = 0;
        loop {
            let n = self.expire_batch(cutoff, EXPIRY_BATCH)?;
            removed += n;
            if n < EXPIRY_BATCH {
                return Ok(removed);
            }
        }
    }

    /// Deletes up to `limit` entries stored before `cutoff`, in one transaction.
    fn expire_batch(&self, cutoff: u64, limit: usize) -> Result<usize, MailboxError> {
        let expired: Vec<(KeyBytes, u64)> = {
            let txn = self.db.begin_read().map_err(err)?;
            let by_age = txn.open_table(BY_AGE).map_err(err)?;
            let end = age_key(cutoff, &[0u8; 32], 0);
            let mut out = Vec::new();
            for entry in by_age.range::<&[u8; 48]>(..&end).map_err(err)?.take(limit) {
                let (k, _) = entry.map_err(err)?;
                let key = k.value();
                let mut client = [0u8; 32];
                client.copy_from_slice(&key[8..40]);
                let mut id = [0u8; 8];
                id.copy_from_slice(&key[40..]);
                out.push((KeyBytes(client), u64::from_be_bytes(id)));
            }
            out
        };
        if expired.is_empty() {
            return Ok(0);
        }
        let mut presence = self.writer.lock();
        Ok(self.delete_locked(&mut presence, &expired)?.0)
    }

    /// Bytes `client` has stored.
    pub fn usage(&self, client: &KeyBytes) -> Result<u64, MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let usage = txn.open_table(USAGE).map_err(err)?;
        Ok(usage
            .get(client.as_bytes())
            .map_err(err)?
            .map_or(0, |v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(client: u8, body: &[u8]) -> Incoming {
        Incoming {
            client: KeyBytes([client; 32]),
            identifier: [0; 16],
            body: body.to_vec(),
        }
    }

    #[test]
    fn stored_until_acked_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailbox.redb");
        {
            let m = Mailbox::open(&path, 1 << 20).unwrap();
            let ids = m
                .store(&[incoming(1, b"a"), incoming(1, b"b"), incoming(2, b"c")])
                .unwrap();
            assert!(ids.iter().all(Option::is_some));
        }
        let m = Mailbox::open(&path, 1 << 20).unwrap();
        let c1 = KeyBytes([1; 32]);
        let got = m.fetch_after(&c1, 0, 10).unwrap();
        assert_eq!(
            got.iter().map(|s| s.body.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(m.fetch_after(&c1, got[0].id, 10).unwrap().len(), 1);
        assert_eq!(m.ack(&c1, &[got[0].id, 999]).unwrap(), 1);
        let left = m.fetch_after(&c1, 0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].body, b"b");
        assert_eq!(m.usage(&c1).unwrap(), cost(b"b"));
        // ids keep growing across reopen
        let new = m.store(&[incoming(1, b"d")]).unwrap()[0].unwrap();
        assert!(new > left[0].id);
    }

    #[test]
    fn quota_refuses_the_newest_and_frees_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mailbox::open(&dir.path().join("m.redb"), 3 * cost(&[0; 100])).unwrap();
        let items: Vec<_> = (0..5).map(|_| incoming(1, &[0; 100])).collect();
        let ids = m.store(&items).unwrap();
        assert_eq!(ids.iter().filter(|i| i.is_some()).count(), 3);
        assert!(ids[3].is_none() && ids[4].is_none());
        // another client is unaffected
        assert!(m.store(&[incoming(2, &[0; 100])]).unwrap()[0].is_some());
        m.ack(&KeyBytes([1; 32]), &[ids[0].unwrap()]).unwrap();
        assert!(m.store(&[incoming(1, &[0; 100])]).unwrap()[0].is_some());
    }

    #[test]
    fn expiry_removes_old_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mailbox::open(&dir.path().join("m.redb"), 1 << 20).unwrap();
        m.store(&[incoming(1, b"x"), incoming(2, b"y")]).unwrap();
        assert_eq!(m.expire(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(m.stored(), 2);
        assert_eq!(m.expire_batch(unix_now() + 1, EXPIRY_BATCH).unwrap(), 2);
        assert_eq!(m.stored(), 0);
        assert_eq!(m.usage(&KeyBytes([1; 32])).unwrap(), 0);
    }

    #[test]
    fn made_up_destinations_stay_within_their_budget_and_the_global_cap() {
        let dir = tempfile::tempdir().unwrap();
        let each = cost(&[0; 100]);
        let limits = Limits {
            per_client: 50 * each,
            total: 180 * each,
            unregistered: 100 * each,
            present_reserve: 0,
        };
        let m = Mailbox::open_with(&dir.path().join("m.redb"), limits).unwrap();
        let mine = KeyBytes([7; 32]);
        m.register(&mine).unwrap();
        // 10,000 made-up destinations, one payload each, in batches as the gateway stores.
        let mut kept = 0;
        for batch in 0..100u32 {
            let items: Vec<Incoming> = (0..100u32)
                .map(|i| {
                    let mut client = [0u8; 32];
                    client[..4].copy_from_slice(&(batch * 100 + i).to_be_bytes());
                    client[31] = 1;
                    Incoming {
                        client: KeyBytes(client),
                        identifier: [0; 16],
                        body: vec![0; 100],
                    }
                })
                .collect();
            kept += m.store(&items).unwrap().iter().flatten().count();
            // Meanwhile the registered client's messages are still stored.
            assert!(
                m.store(&[Incoming {
                    client: mine,
                    identifier: [0; 16],
                    body: vec![1; 100]
                }])
                .unwrap()[0]
                    .is_some()
                    || batch >= 50
            );
        }
        assert_eq!(kept, 100, "the unregistered budget holds 100 payloads");
        let (total, unregistered) = m.totals().unwrap();
        assert_eq!(unregistered, 100 * each);
        assert!(total <= limits.total);
        assert_eq!(m.usage(&mine).unwrap(), 50 * each, "up to its own quota");
        // The global cap binds everyone: a second registered client fills it, then stops.
        let other = KeyBytes([8; 32]);
        m.register(&other).unwrap();
        let items: Vec<_> = (0..200)
            .map(|_| Incoming {
                client: other,
                identifier: [0; 16],
                body: vec![2; 100],
            })
            .collect();
        let stored = m.store(&items).unwrap().iter().flatten().count();
        assert_eq!(
            stored, 30,
            "150 of 180 were taken: the global cap leaves room for 30"
        );
        assert_eq!(m.totals().unwrap().0, limits.total);
    }

    #[test]
    fn registering_moves_a_client_out_of_the_unregistered_budget() {
        let dir = tempfile::tempdir().unwrap();
        let each = cost(&[0; 10]);
        let m = Mailbox::open_with(
            &dir.path().join("m.redb"),
            Limits {
                per_client: 100 * each,
                total: 1000 * each,
                unregistered: 2 * each,
                present_reserve: 0,
            },
        )
        .unwrap();
        let newcomer = KeyBytes([3; 32]);
        let three: Vec<_> = (0..3)
            .map(|_| Incoming {
                client: newcomer,
                identifier: [0; 16],
                body: vec![0; 10],
            })
            .collect();
        assert_eq!(m.store(&three).unwrap().iter().flatten().count(), 2);
        m.register(&newcomer).unwrap();
        assert_eq!(m.totals().unwrap(), (2 * each, 0));
        assert_eq!(m.store(&three).unwrap().iter().flatten().count(), 3);
        // Ids are the client's own, counting from 1.
        let ids: Vec<u64> = m
            .fetch_after(&newcomer, 0, 10)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        assert_eq!(m.store(&[incoming(9, b"z")]).unwrap(), vec![Some(1)]);
    }

    #[test]
    fn expiry_works_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mailbox::open(&dir.path().join("m.redb"), 1 << 30).unwrap();
        let items: Vec<_> = (0..2500u32)
            .map(|i| incoming((i % 250) as u8, b"x"))
            .collect();
        m.store(&items).unwrap();
        assert_eq!(
            m.expire_batch(unix_now() + 1, EXPIRY_BATCH).unwrap(),
            EXPIRY_BATCH
        );
        assert_eq!(m.stored(), 2500 - EXPIRY_BATCH as u64);
        assert_eq!(
            m.expire_batch(unix_now() + 1, usize::MAX).unwrap(),
            2500 - EXPIRY_BATCH
        );
        assert_eq!(m.totals().unwrap(), (0, 0));
    }
}
