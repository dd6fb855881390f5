//! The gateway's durable mailbox: every final-hop payload for a client is written here
//! before anything else happens to it, and deleted only when the client acknowledges it
//! or when it is older than `NYM_NODE_MAILBOX_RETENTION`.
//!
//! Storage is `redb`: a pure-Rust, ACID, crash-safe embedded B-tree store. No C library
//! to build, no server to run, and a committed transaction survives SIGKILL, which is the
//! property the mailbox exists for. Writes are batched (one transaction, one fsync, per
//! batch of payloads) so durability does not cost a disk flush per packet.
//!
//! Quota: each client may hold `NYM_NODE_MAILBOX_QUOTA_BYTES`. A payload that would exceed
//! it is refused (the newest is dropped, what is stored is kept), counted, and, since no
//! acknowledgement goes back to the sender for it, retransmitted by the sender later.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::keys::KeyBytes;
use crate::mixnet::sphinx::IDENTIFIER_SIZE;

/// client ‖ id (big-endian, so a client's entries sort by id) → identifier ‖ stored_at ‖ body
const MESSAGES: TableDefinition<&[u8; 40], &[u8]> = TableDefinition::new("messages");
/// stored_at ‖ client ‖ id → () : finds expired entries without a scan.
const BY_AGE: TableDefinition<&[u8; 48], ()> = TableDefinition::new("messages_by_age");
/// client → bytes stored
const USAGE: TableDefinition<&[u8; 32], u64> = TableDefinition::new("usage");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

#[derive(Debug, thiserror::Error)]
#[error("mailbox: {0}")]
pub struct MailboxError(String);

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
    quota_bytes: u64,
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
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, quota_bytes: u64) -> Result<Self, MailboxError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let db = Database::create(path).map_err(err)?;
        // Only the node may read what it stores for its clients (ciphertext, but also who
        // receives how much and when).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(MESSAGES).map_err(err)?;
            txn.open_table(BY_AGE).map_err(err)?;
            txn.open_table(USAGE).map_err(err)?;
            txn.open_table(META).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        let stored = {
            let txn = db.begin_read().map_err(err)?;
            let messages = txn.open_table(MESSAGES).map_err(err)?;
            messages.len().map_err(err)?
        };
        Ok(Mailbox {
            db,
            quota_bytes,
            stored: std::sync::atomic::AtomicU64::new(stored),
        })
    }

    /// Payloads currently stored, for all clients.
    pub fn stored(&self) -> u64 {
        self.stored.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a batch in one transaction. Returns, per item, its id, or `None` if the
    /// client's quota refused it.
    pub fn store(&self, items: &[Incoming]) -> Result<Vec<Option<u64>>, MailboxError> {
        let now = unix_now();
        let txn = self.db.begin_write().map_err(err)?;
        let mut ids = Vec::with_capacity(items.len());
        {
            let mut messages = txn.open_table(MESSAGES).map_err(err)?;
            let mut by_age = txn.open_table(BY_AGE).map_err(err)?;
            let mut usage = txn.open_table(USAGE).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut next_id = meta.get(NEXT_ID).map_err(err)?.map_or(1, |v| v.value());
            for item in items {
                let used = usage
                    .get(item.client.as_bytes())
                    .map_err(err)?
                    .map_or(0, |v| v.value());
                let c = cost(&item.body);
                if used + c > self.quota_bytes {
                    ids.push(None);
                    continue;
                }
                let id = next_id;
                next_id += 1;
                let mut value = Vec::with_capacity(IDENTIFIER_SIZE + 8 + item.body.len());
                value.extend_from_slice(&item.identifier);
                value.extend_from_slice(&now.to_be_bytes());
                value.extend_from_slice(&item.body);
                messages
                    .insert(&message_key(&item.client, id), value.as_slice())
                    .map_err(err)?;
                by_age
                    .insert(&age_key(now, item.client.as_bytes(), id), ())
                    .map_err(err)?;
                usage
                    .insert(item.client.as_bytes(), used + c)
                    .map_err(err)?;
                ids.push(Some(id));
            }
            meta.insert(NEXT_ID, next_id).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        let added = ids.iter().filter(|i| i.is_some()).count() as u64;
        self.stored
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        Ok(ids)
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

    /// Deletes acknowledged payloads; ids that are not stored (already gone) are ignored.
    pub fn ack(&self, client: &KeyBytes, ids: &[u64]) -> Result<usize, MailboxError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut removed = 0;
        {
            let mut messages = txn.open_table(MESSAGES).map_err(err)?;
            let mut by_age = txn.open_table(BY_AGE).map_err(err)?;
            let mut usage = txn.open_table(USAGE).map_err(err)?;
            let mut freed = 0u64;
            for id in ids {
                let removed_value = messages
                    .remove(&message_key(client, *id))
                    .map_err(err)?
                    .map(|v| v.value().to_vec());
                if let Some(value) = removed_value {
                    let mut stored_at = [0u8; 8];
                    stored_at.copy_from_slice(&value[IDENTIFIER_SIZE..IDENTIFIER_SIZE + 8]);
                    by_age
                        .remove(&age_key(
                            u64::from_be_bytes(stored_at),
                            client.as_bytes(),
                            *id,
                        ))
                        .map_err(err)?;
                    freed += cost(&value[IDENTIFIER_SIZE + 8..]);
                    removed += 1;
                }
            }
            if freed > 0 {
                let used = usage
                    .get(client.as_bytes())
                    .map_err(err)?
                    .map_or(0, |v| v.value());
                let left = used.saturating_sub(freed);
                if left == 0 {
                    usage.remove(client.as_bytes()).map_err(err)?;
                } else {
                    usage.insert(client.as_bytes(), left).map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)?;
        self.stored
            .fetch_sub(removed as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(removed)
    }

    /// Deletes every payload stored longer ago than `retention`. Returns how many.
    pub fn expire(&self, retention: Duration) -> Result<usize, MailboxError> {
        self.expire_before(unix_now().saturating_sub(retention.as_secs()))
    }

    fn expire_before(&self, cutoff: u64) -> Result<usize, MailboxError> {
        let expired: Vec<(KeyBytes, u64)> = {
            let txn = self.db.begin_read().map_err(err)?;
            let by_age = txn.open_table(BY_AGE).map_err(err)?;
            let end = age_key(cutoff, &[0u8; 32], 0);
            let mut out = Vec::new();
            for entry in by_age.range::<&[u8; 48]>(..&end).map_err(err)? {
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
        let mut removed = 0;
        let mut by_client: std::collections::HashMap<KeyBytes, Vec<u64>> = Default::default();
        for (client, id) in expired {
            by_client.entry(client).or_default().push(id);
        }
        for (client, ids) in by_client {
            removed += self.ack(&client, &ids)?;
        }
        Ok(removed)
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
        assert_eq!(m.expire_before(unix_now() + 1).unwrap(), 2);
        assert_eq!(m.stored(), 0);
        assert_eq!(m.usage(&KeyBytes([1; 32])).unwrap(), 0);
    }
}
