//! The client's reply SURBs, kept in a redb file so they outlive the process:
//! - **received**: SURBs other clients attached to their messages, by the sender tag they
//!   came with, for answering them (`reply`); oldest first, bounded per tag, in all (sender
//!   tags are the sender's to choose, so made-up ones cannot grow the store: the oldest SURB
//!   of any tag goes first) and in age;
//! - **handed out**: the recovery material of SURBs we attached to our own messages, by SURB
//!   identifier, with the recipient they went to, so a reply that comes back after a restart
//!   still opens, and a recipient's request for more SURBs can be answered.
//!
//! Without a path the same store lives in memory (one-shot commands, tests).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sphinx_packet::SurbReplyRecovery;

use crate::mixnet::sphinx::IDENTIFIER_SIZE;

use super::ClientAddress;

/// What a sender puts on its anonymous messages so the recipient can group the SURBs it
/// gets from it, without learning who it is. Stable per sender and recipient.
pub type SenderTag = [u8; 16];

/// received: tag (16) || sequence (8, BE) → added_at (8, BE) || SURB
const RECEIVED: TableDefinition<&[u8; 24], &[u8]> = TableDefinition::new("received_surbs");
/// received, by arrival: sequence → tag, to find the oldest of all tags at once
const RECEIVED_ORDER: TableDefinition<u64, &[u8; 16]> = TableDefinition::new("received_order");
/// handed out: SURB identifier → added_at (8, BE) || recipient (96) || recovery
const HANDED_OUT: TableDefinition<&[u8; IDENTIFIER_SIZE], &[u8]> =
    TableDefinition::new("handed_out_surbs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
#[error("reply SURB store: {0}")]
pub struct SurbStoreError(String);

fn err(e: impl std::fmt::Display) -> SurbStoreError {
    SurbStoreError(e.to_string())
}

/// How many SURBs the store keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct SurbLimits {
    /// Received SURBs kept per sender tag (the oldest go first).
    pub per_tag: usize,
    /// Received SURBs kept in all, whatever their tags (the oldest go first).
    pub total: usize,
    /// Recovery material kept for SURBs we handed out (the oldest go first).
    pub handed_out: usize,
    /// A SURB older than this is dropped: its route's nodes may have gone.
    pub max_age: Duration,
}

impl Default for SurbLimits {
    fn default() -> Self {
        SurbLimits {
            per_tag: 500,
            total: 50_000,
            handed_out: 20_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct SurbStore {
    db: Database,
    limits: SurbLimits,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SurbStore {
    /// Opens (or creates) the store at `path` (mode 0600), or an in-memory one.
    pub fn open(path: Option<&Path>, limits: SurbLimits) -> Result<Self, SurbStoreError> {
        let db = match path {
            Some(path) => crate::private_store::open(path).map_err(err)?,
            None => Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(err)?,
        };
        let txn = db.begin_write().map_err(err)?;
        {
            let received = txn.open_table(RECEIVED).map_err(err)?;
            let mut order = txn.open_table(RECEIVED_ORDER).map_err(err)?;
            // A store written before the order table existed: index what it holds.
            if order.len().map_err(err)? != received.len().map_err(err)? {
                order.retain(|_, _| false).map_err(err)?;
                for entry in received.iter().map_err(err)? {
                    let (k, _) = entry.map_err(err)?;
                    let (tag, seq) = split_key(k.value());
                    order.insert(seq, &tag).map_err(err)?;
                }
            }
            txn.open_table(HANDED_OUT).map_err(err)?;
            txn.open_table(META).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(SurbStore { db, limits })
    }

    /// Keeps SURBs received from the sender behind `tag`, dropping its oldest beyond the bound.
    pub fn add_received(&self, tag: &SenderTag, surbs: &[Vec<u8>]) -> Result<(), SurbStoreError> {
        if surbs.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut seq = meta
                .get("next_seq")
                .map_err(err)?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut table = txn.open_table(RECEIVED).map_err(err)?;
            let mut order = txn.open_table(RECEIVED_ORDER).map_err(err)?;
            for surb in surbs {
                let mut value = now.to_be_bytes().to_vec();
                value.extend_from_slice(surb);
                table
                    .insert(&key(tag, seq), value.as_slice())
                    .map_err(err)?;
                order.insert(seq, tag).map_err(err)?;
                seq += 1;
            }
            meta.insert("next_seq", seq).map_err(err)?;
            let held: Vec<[u8; 24]> = table
                .range::<&[u8; 24]>(&key(tag, 0)..=&key(tag, u64::MAX))
                .map_err(err)?
                .filter_map(|e| e.ok().map(|(k, _)| *k.value()))
                .collect();
            for old in held
                .iter()
                .take(held.len().saturating_sub(self.limits.per_tag))
            {
                table.remove(old).map_err(err)?;
                order.remove(split_key(old).1).map_err(err)?;
            }
            while table.len().map_err(err)? > self.limits.total as u64 {
                let Some((seq, oldest_tag)) = order
                    .pop_first()
                    .map_err(err)?
                    .map(|(s, t)| (s.value(), *t.value()))
                else {
                    break;
                };
                table.remove(&key(&oldest_tag, seq)).map_err(err)?;
            }
        }
        txn.commit().map_err(err)
    }

    /// Received SURBs held, of every tag.
    pub fn received_total(&self) -> Result<u64, SurbStoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(RECEIVED).map_err(err)?;
        table.len().map_err(err)
    }

    /// How many usable SURBs the sender behind `tag` has left us.
    pub fn received_count(&self, tag: &SenderTag) -> Result<usize, SurbStoreError> {
        let oldest = now_secs().saturating_sub(self.limits.max_age.as_secs());
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(RECEIVED).map_err(err)?;
        let mut n = 0;
        for entry in table
            .range::<&[u8; 24]>(&key(tag, 0)..=&key(tag, u64::MAX))
            .map_err(err)?
        {
            let (_, v) = entry.map_err(err)?;
            if added_at(v.value()) >= oldest {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Takes (and deletes) up to `n` of the oldest usable SURBs for `tag`; each is single-use.
    pub fn take_received(&self, tag: &SenderTag, n: usize) -> Result<Vec<Vec<u8>>, SurbStoreError> {
        let oldest = now_secs().saturating_sub(self.limits.max_age.as_secs());
        let txn = self.db.begin_write().map_err(err)?;
        let mut out = Vec::with_capacity(n);
        {
            let mut table = txn.open_table(RECEIVED).map_err(err)?;
            let mut gone = Vec::new();
            for entry in table
                .range::<&[u8; 24]>(&key(tag, 0)..=&key(tag, u64::MAX))
                .map_err(err)?
            {
                let (k, v) = entry.map_err(err)?;
                if out.len() == n {
                    break;
                }
                gone.push(*k.value());
                let v = v.value();
                if added_at(v) >= oldest {
                    out.push(v[8..].to_vec());
                }
            }
            let mut order = txn.open_table(RECEIVED_ORDER).map_err(err)?;
            for k in gone {
                table.remove(&k).map_err(err)?;
                order.remove(split_key(&k).1).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        Ok(out)
    }

    /// Remembers a SURB we attached to a message for `recipient`.
    pub fn add_handed_out(
        &self,
        identifier: &[u8; IDENTIFIER_SIZE],
        recovery: &SurbReplyRecovery,
        recipient: &ClientAddress,
    ) -> Result<(), SurbStoreError> {
        let mut value = now_secs().to_be_bytes().to_vec();
        value.extend_from_slice(&recipient.to_bytes());
        value.extend_from_slice(&recovery.to_bytes());
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut table = txn.open_table(HANDED_OUT).map_err(err)?;
            table.insert(identifier, value.as_slice()).map_err(err)?;
            let len = table.len().map_err(err)? as usize;
            if len > self.limits.handed_out {
                // Identifiers are random, so age decides: drop the oldest entries.
                let mut by_age: Vec<(u64, [u8; IDENTIFIER_SIZE])> = table
                    .iter()
                    .map_err(err)?
                    .filter_map(|e| e.ok().map(|(k, v)| (added_at(v.value()), *k.value())))
                    .collect();
                by_age.sort_unstable();
                for (_, k) in by_age.iter().take(len - self.limits.handed_out) {
                    table.remove(k).map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)
    }

    /// Takes (and deletes) what opens a reply that came through one of our SURBs, and who we
    /// handed that SURB to.
    pub fn take_handed_out(
        &self,
        identifier: &[u8; IDENTIFIER_SIZE],
    ) -> Result<Option<(SurbReplyRecovery, ClientAddress)>, SurbStoreError> {
        // Most identifiers asked about are not ours to open (late acks): a read answers
        // those without a write transaction.
        {
            let txn = self.db.begin_read().map_err(err)?;
            let table = txn.open_table(HANDED_OUT).map_err(err)?;
            if table.get(identifier).map_err(err)?.is_none() {
                return Ok(None);
            }
        }
        let txn = self.db.begin_write().map_err(err)?;
        let found = {
            let mut table = txn.open_table(HANDED_OUT).map_err(err)?;
            let removed = table.remove(identifier).map_err(err)?;
            removed.and_then(|v| {
                let v = v.value();
                let recipient = ClientAddress::from_bytes(v.get(8..8 + ClientAddress::LEN)?)?;
                let recovery =
                    SurbReplyRecovery::from_bytes(v.get(8 + ClientAddress::LEN..)?).ok()?;
                Some((recovery, recipient))
            })
        };
        txn.commit().map_err(err)?;
        Ok(found)
    }
}

fn key(tag: &SenderTag, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(tag);
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_key(k: &[u8; 24]) -> (SenderTag, u64) {
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&k[..16]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&k[16..]);
    (tag, u64::from_be_bytes(seq))
}

fn added_at(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Identity;

    fn surbs(n: u8) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i; 396]).collect()
    }

    #[test]
    fn received_surbs_are_taken_oldest_first_once_and_bounded_per_tag() {
        let store = SurbStore::open(
            None,
            SurbLimits {
                per_tag: 5,
                ..SurbLimits::default()
            },
        )
        .unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        store.add_received(&a, &surbs(8)).unwrap();
        store.add_received(&b, &surbs(2)).unwrap();
        assert_eq!(store.received_count(&a).unwrap(), 5, "the 3 oldest dropped");
        let taken = store.take_received(&a, 2).unwrap();
        assert_eq!(taken, vec![vec![3; 396], vec![4; 396]]);
        assert_eq!(store.received_count(&a).unwrap(), 3);
        assert_eq!(store.received_count(&b).unwrap(), 2, "tags are separate");
        assert_eq!(store.take_received(&a, 10).unwrap().len(), 3);
        assert!(store.take_received(&a, 1).unwrap().is_empty());
    }

    #[test]
    fn made_up_tags_cannot_grow_the_store_past_its_total_and_the_oldest_go_first() {
        let store = SurbStore::open(
            None,
            SurbLimits {
                per_tag: 5,
                total: 100,
                ..SurbLimits::default()
            },
        )
        .unwrap();
        let real = [0xaa; 16];
        store.add_received(&real, &surbs(3)).unwrap();
        for i in 0..1000u32 {
            let mut tag = [0u8; 16];
            tag[..4].copy_from_slice(&i.to_be_bytes());
            store.add_received(&tag, &surbs(2)).unwrap();
            assert!(store.received_total().unwrap() <= 100);
        }
        assert_eq!(store.received_total().unwrap(), 100);
        assert_eq!(
            store.received_count(&real).unwrap(),
            0,
            "the oldest went first"
        );
        // The newest tags are whole.
        let mut last = [0u8; 16];
        last[..4].copy_from_slice(&999u32.to_be_bytes());
        assert_eq!(store.take_received(&last, 5).unwrap().len(), 2);
        assert_eq!(store.received_total().unwrap(), 98);
        store.add_received(&real, &surbs(1)).unwrap();
        assert_eq!(store.received_count(&real).unwrap(), 1);
    }

    #[test]
    fn what_was_stored_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("surbs.redb");
        let id = Identity::generate().unwrap();
        let recipient = ClientAddress::of(&id, crate::keys::KeyBytes([7; 32]));
        let hop = crate::client::route::Hop {
            identity: crate::keys::KeyBytes([9; 32]),
            sphinx_keys: vec![crate::keys::EpochKey::always(crate::keys::KeyBytes(
                [9; 32],
            ))],
        };
        let route = vec![hop; 2];
        let (_, recovery) = crate::client::packet::build_surb(
            &route,
            &id.public(),
            [5; IDENTIFIER_SIZE],
            &[Duration::ZERO; 2],
        )
        .unwrap();
        {
            let store = SurbStore::open(Some(&path), SurbLimits::default()).unwrap();
            store.add_received(&[3; 16], &surbs(4)).unwrap();
            store
                .add_handed_out(&[5; IDENTIFIER_SIZE], &recovery, &recipient)
                .unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let store = SurbStore::open(Some(&path), SurbLimits::default()).unwrap();
        assert_eq!(store.received_count(&[3; 16]).unwrap(), 4);
        let (back, to) = store
            .take_handed_out(&[5; IDENTIFIER_SIZE])
            .unwrap()
            .unwrap();
        assert_eq!(to, recipient);
        assert_eq!(back.to_bytes(), recovery.to_bytes());
        assert!(
            store
                .take_handed_out(&[5; IDENTIFIER_SIZE])
                .unwrap()
                .is_none(),
            "single use"
        );
    }
}
