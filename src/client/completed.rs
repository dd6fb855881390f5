//! The ids of messages this client has taken for good (handed to the application and
//! acknowledged to the gateway), kept across restarts: a gateway that delivers an old
//! ciphertext again (after its own restart, or on purpose) cannot make the application see
//! a message twice.
//!
//! A file of fixed records, `id (16) || unix seconds (8)`, appended and flushed before the
//! gateway is told it may delete the message. At open, records older than the retention (a
//! gateway keeps nothing longer, so nothing older can come again) and beyond the capacity
//! (the oldest first) are dropped and the file is rewritten; it is rewritten again whenever
//! it holds twice the capacity.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::chunking::{MESSAGE_ID_SIZE, MessageId};

const RECORD: usize = MESSAGE_ID_SIZE + 8;

/// How long a message id is remembered: the longest a gateway keeps a stored message by
/// default (`NYM_NODE_MAILBOX_RETENTION`).
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
#[error("completed message ids in {path}: {source}")]
pub struct CompletedError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// The log of completed message ids.
pub struct CompletedLog {
    path: PathBuf,
    file: File,
    /// What the file holds, oldest first.
    records: VecDeque<(MessageId, u64)>,
    capacity: usize,
}

impl CompletedLog {
    /// Opens (or creates) the log at `path`, keeping at most `capacity` ids of the last
    /// [`RETENTION`]; returns it with the ids it holds, oldest first.
    pub fn open(path: &Path, capacity: usize, now: u64) -> Result<Self, CompletedError> {
        let err = |source| CompletedError {
            path: path.display().to_string(),
            source,
        };
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        // A torn last record (a crash mid-append) is ignored.
        let mut records: VecDeque<(MessageId, u64)> = bytes
            .chunks_exact(RECORD)
            .filter_map(|r| {
                let id: MessageId = r[..MESSAGE_ID_SIZE].try_into().ok()?;
                let at = u64::from_be_bytes(r[MESSAGE_ID_SIZE..].try_into().ok()?);
                Some((id, at))
            })
            .filter(|(_, at)| now.saturating_sub(*at) < RETENTION.as_secs())
            .collect();
        while records.len() > capacity {
            records.pop_front();
        }
        let file = rewrite(path, &records).map_err(err)?;
        Ok(CompletedLog {
            path: path.to_path_buf(),
            file,
            records,
            capacity: capacity.max(1),
        })
    }

    /// The ids held, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = &MessageId> {
        self.records.iter().map(|(id, _)| id)
    }

    /// Records `id` as taken for good, on disk before it returns.
    pub fn record(&mut self, id: MessageId, now: u64) -> Result<(), CompletedError> {
        let err = |source| CompletedError {
            path: self.path.display().to_string(),
            source,
        };
        let mut record = [0u8; RECORD];
        record[..MESSAGE_ID_SIZE].copy_from_slice(&id);
        record[MESSAGE_ID_SIZE..].copy_from_slice(&now.to_be_bytes());
        self.file.write_all(&record).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.records.push_back((id, now));
        if self.records.len() >= 2 * self.capacity {
            while self.records.len() > self.capacity {
                self.records.pop_front();
            }
            self.file = rewrite(&self.path, &self.records).map_err(err)?;
        }
        Ok(())
    }
}

/// Replaces the file with `records` (whole or not at all) and opens it for appending.
fn rewrite(path: &Path, records: &VecDeque<(MessageId, u64)>) -> std::io::Result<File> {
    let tmp = path.with_extension("tmp");
    let mut out = File::create(&tmp)?;
    for (id, at) in records {
        out.write_all(id)?;
        out.write_all(&at.to_be_bytes())?;
    }
    out.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        [n; MESSAGE_ID_SIZE]
    }

    #[test]
    fn ids_outlive_a_restart_within_the_retention_and_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("completed");
        let now = 1_000_000;
        let mut log = CompletedLog::open(&path, 3, now).unwrap();
        assert_eq!(log.ids().count(), 0);
        log.record(id(1), now - RETENTION.as_secs()).unwrap();
        for n in 2..=5 {
            log.record(id(n), now).unwrap();
        }
        drop(log);
        // Reopened: id 1 is past the retention, and of 2..=5 only the newest three stay.
        let log = CompletedLog::open(&path, 3, now).unwrap();
        let ids: Vec<MessageId> = log.ids().copied().collect();
        assert_eq!(ids, [id(3), id(4), id(5)]);
        // A torn record at the end (a crash mid-append) is ignored.
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[7; 5]).unwrap();
        drop(f);
        let log = CompletedLog::open(&path, 3, now).unwrap();
        assert_eq!(log.ids().count(), 3);
    }

    #[test]
    fn a_message_taken_before_a_restart_is_a_duplicate_after_it() {
        use crate::client::chunking::{Message, Reassembler, ReassemblyLimits, split};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("completed");
        let message = Message::data(b"hello".to_vec());
        let fragments = split([4; MESSAGE_ID_SIZE], &message.encode(), 100).unwrap();
        let now = tokio::time::Instant::now();

        let mut before = Reassembler::new(ReassemblyLimits::default());
        let (id, _) = before.add(&fragments[0], now).unwrap().unwrap();
        CompletedLog::open(&path, 16, 100)
            .unwrap()
            .record(id, 100)
            .unwrap();

        // After the restart the same ciphertext's fragment comes again (a gateway replaying).
        let mut after = Reassembler::new(ReassemblyLimits::default());
        let log = CompletedLog::open(&path, 16, 100).unwrap();
        log.ids().for_each(|id| after.remember_completed(*id));
        assert_eq!(after.add(&fragments[0], now).unwrap(), None);
        assert_eq!(after.duplicates, 1);
        // Without the log it would have been handed over again.
        let mut forgetful = Reassembler::new(ReassemblyLimits::default());
        assert!(forgetful.add(&fragments[0], now).unwrap().is_some());
    }

    #[test]
    fn the_file_is_compacted_when_it_holds_twice_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("completed");
        let mut log = CompletedLog::open(&path, 4, 10).unwrap();
        for n in 0..20 {
            log.record(id(n), 10).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        assert!(len < 8 * RECORD, "{len} bytes");
        assert_eq!(log.ids().last(), Some(&id(19)));
    }
}
