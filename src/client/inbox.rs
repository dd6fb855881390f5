//! Fragments of messages not yet complete, kept in the client's directory (`inbox.redb`).
//!
//! A fragment is written here before the gateway is told to delete it, so the client can
//! acknowledge each fragment as it comes, in the next ack slot, instead of all of a
//! message's fragments together once it completes (which would tell the gateway which
//! fragments make one message). A client killed at any moment loses nothing the gateway
//! deleted: a restart reads the fragments back into its reassembly. A message's fragments
//! are forgotten here once the application took it for good, or when its reassembly gives
//! up on it; the reassembly's own bounds (bytes, messages, age) so bound this file too.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::ClientAddress;
use super::chunking::MessageId;

/// message id (16) || fragment index (2, BE) → origin flag (1) || origin (96) || fragment
const FRAGMENTS: TableDefinition<&[u8; 18], &[u8]> = TableDefinition::new("fragments");

#[derive(Debug, thiserror::Error)]
#[error("client inbox: {0}")]
pub struct InboxError(String);

fn err(e: impl std::fmt::Display) -> InboxError {
    InboxError(e.to_string())
}

/// A fragment kept, with who it answers when it came back through our SURBs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub fragment: Vec<u8>,
    pub reply_from: Option<ClientAddress>,
}

pub struct Inbox {
    db: Database,
}

fn key(id: &MessageId, index: u16) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..16].copy_from_slice(id);
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

impl Inbox {
    /// Opens (or creates) the inbox at `path`, readable by its owner only.
    pub fn open(path: &Path) -> Result<Inbox, InboxError> {
        let db = crate::private_store::open(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(FRAGMENTS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Inbox { db })
    }

    /// Keeps fragment `index` of message `id`, durably (the write is committed to disk
    /// before this returns).
    pub fn keep(&self, id: &MessageId, index: u16, kept: &Kept) -> Result<(), InboxError> {
        let mut value = Vec::with_capacity(1 + ClientAddress::LEN + kept.fragment.len());
        match &kept.reply_from {
            Some(origin) => {
                value.push(1);
                value.extend_from_slice(&origin.to_bytes());
            }
            None => value.extend_from_slice(&[0u8; 1 + ClientAddress::LEN]),
        }
        value.extend_from_slice(&kept.fragment);
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(FRAGMENTS)
            .map_err(err)?
            .insert(&key(id, index), value.as_slice())
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    /// Forgets every fragment of message `id`.
    pub fn forget(&self, id: &MessageId) -> Result<(), InboxError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut table = txn.open_table(FRAGMENTS).map_err(err)?;
            let (from, to) = (key(id, 0), key(id, u16::MAX));
            table
                .retain_in::<&[u8; 18], _>(&from..=&to, |_, _| false)
                .map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// Every fragment kept, message by message (a malformed record is skipped).
    pub fn load(&self) -> Result<Vec<Kept>, InboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(FRAGMENTS).map_err(err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(err)? {
            let (_, value) = entry.map_err(err)?;
            let value = value.value();
            let Some((head, fragment)) = value.split_at_checked(1 + ClientAddress::LEN) else {
                continue;
            };
            let reply_from = match head[0] {
                1 => ClientAddress::from_bytes(&head[1..]),
                _ => None,
            };
            out.push(Kept {
                fragment: fragment.to_vec(),
                reply_from,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyBytes;

    #[test]
    fn fragments_outlive_a_reopen_until_their_message_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.redb");
        let origin = ClientAddress {
            identity: KeyBytes([1; 32]),
            encryption: KeyBytes([2; 32]),
            gateway: KeyBytes([3; 32]),
        };
        let (a, b) = ([7u8; 16], [9u8; 16]);
        {
            let inbox = Inbox::open(&path).unwrap();
            let kept = |bytes: &[u8], reply_from| Kept {
                fragment: bytes.to_vec(),
                reply_from,
            };
            inbox.keep(&a, 0, &kept(b"a0", None)).unwrap();
            inbox.keep(&a, 2, &kept(b"a2", None)).unwrap();
            inbox.keep(&b, 1, &kept(b"b1", Some(origin))).unwrap();
        }
        let inbox = Inbox::open(&path).unwrap();
        let all = inbox.load().unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].reply_from, Some(origin));
        assert_eq!(all[0].fragment, b"a0");
        inbox.forget(&a).unwrap();
        let left = inbox.load().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].fragment, b"b1");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
