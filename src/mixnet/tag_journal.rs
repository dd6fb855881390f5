//! The replay journal of one Sphinx key: every replay tag the key's filter records is
//! appended here before its packet goes on, so a node killed at any moment (SIGKILL, the
//! OOM killer, a lost machine) still refuses every packet it forwarded before.
//!
//! The filter is snapshotted periodically (`replay.rs`); the journal holds what came after
//! the last snapshot. It is a sequence of generation files, `STEM.GEN.tags`, each a plain
//! run of 32-byte tags. A snapshot first rolls the journal to a new generation, then writes
//! the filter (which by then holds every tag of the older generations: a tag is inserted in
//! the filter before it is journaled), and only then deletes the older generations. A crash
//! anywhere in between leaves the old snapshot with its journal, or the new one with more.
//!
//! A snapshot names the last generation it holds (`STEM.GEN.bloom`, written by the key ring),
//! so opening knows exactly which generations must follow it: every one from the next on,
//! without a gap. A missing one (a file lost outside any crash) is lost state, and the key
//! fails closed rather than run with a filter that forgot tags.
//!
//! A torn last record (a crash inside a write) is ignored: its packet was never forwarded,
//! since a packet goes on only after its tag's write returned. A write that fails without a
//! crash (a full disk) is cut back and the journal moves to a new generation, so a torn
//! record is only ever the last of its file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::mixnet::replay::ReplayFilter;

/// Bytes of one journal record: a replay tag.
pub const TAG_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError {
        path: path.to_path_buf(),
        source,
    }
}

/// One key's journal: the generation being appended to.
pub struct TagJournal {
    dir: PathBuf,
    stem: String,
    /// Flush each append to stable storage (else it reaches the OS only).
    sync: bool,
    current: Mutex<Generation>,
}

struct Generation {
    number: u64,
    file: Arc<File>,
    /// Bytes written so far: where a failed write is cut back to.
    len: u64,
}

/// Why an existing journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Generations are missing or unreadable: the key's replay state is incomplete.
    #[error("replay state incomplete: {0}")]
    Lost(String),
    /// The next generation could not be created (a full disk, no file handles): retry.
    #[error(transparent)]
    Io(#[from] JournalError),
}

/// What opening an existing journal found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Tags read back into the filter.
    pub tags: u64,
    /// Generation files read.
    pub files: usize,
}

impl TagJournal {
    /// The journal of a key made now: an empty first generation, flushed with its directory,
    /// so the key's replay state is on disk before the key itself is saved. A key found
    /// later without any journal file lost its state.
    pub fn create(dir: &Path, stem: &str, sync: bool) -> Result<Self, JournalError> {
        let journal = TagJournal {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            sync,
            current: Mutex::new(Generation {
                number: 0,
                file: Arc::new(open_append(&generation_path(dir, stem, 0))?),
                len: 0,
            }),
        };
        sync_dir(dir)?;
        Ok(journal)
    }

    /// True when `dir` holds any generation of the journal `stem` (or cannot be listed).
    pub fn exists(dir: &Path, stem: &str) -> bool {
        generations(dir, stem).is_ok_and(|g| !g.is_empty())
    }

    /// Opens the journal of an existing key whose snapshot holds the generations up to
    /// `snapshot_upto` (`None`: no snapshot), and records every tag of the generations after
    /// it into `filter`; appends go to a new generation after the last one found.
    pub fn open(
        dir: &Path,
        stem: &str,
        sync: bool,
        snapshot_upto: Option<u64>,
        filter: &ReplayFilter,
    ) -> Result<(Self, Recovered), OpenError> {
        let first = snapshot_upto.map_or(0, |n| n + 1);
        let found: Vec<(u64, PathBuf)> = generations(dir, stem)
            .map_err(|e| OpenError::Lost(e.to_string()))?
            .into_iter()
            .filter(|(n, _)| *n >= first)
            .collect();
        // Every generation after the snapshot, from the first on, without a gap.
        let expected = first..first + found.len() as u64;
        if found.is_empty() || !found.iter().map(|(n, _)| *n).eq(expected) {
            return Err(OpenError::Lost(format!(
                "generations {:?} of {stem} do not continue a snapshot up to {snapshot_upto:?}",
                found.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            )));
        }
        let mut recovered = Recovered::default();
        let mut bytes = Vec::new();
        for (_, path) in &found {
            bytes.clear();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| OpenError::Lost(format!("{}: {e}", path.display())))?;
            for tag in bytes.chunks_exact(TAG_BYTES) {
                let tag: &[u8; TAG_BYTES] = tag.try_into().unwrap_or(&[0; TAG_BYTES]);
                filter.check_and_insert(tag);
                recovered.tags += 1;
            }
            recovered.files += 1;
        }
        let next = found.last().map_or(first, |(n, _)| n + 1);
        let journal = TagJournal {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            sync,
            current: Mutex::new(Generation {
                number: next,
                file: Arc::new(open_append(&generation_path(dir, stem, next))?),
                len: 0,
            }),
        };
        sync_dir(dir)?;
        Ok((journal, recovered))
    }

    /// Appends `tags` in one write, then (with `sync`) flushes them to stable storage.
    /// Concurrent appenders share the file; their flushes need no lock.
    pub fn append(&self, tags: &[[u8; TAG_BYTES]]) -> Result<(), JournalError> {
        if tags.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = tags.iter().flatten().copied().collect();
        let (file, number) = {
            let mut current = self.current.lock();
            if let Err(source) = (&*current.file).write_all(&bytes) {
                let path = generation_path(&self.dir, &self.stem, current.number);
                // Cut the partial record off, and never append after one again.
                let _ = current.file.set_len(current.len);
                if let Ok(next) = self.next_generation(current.number + 1) {
                    *current = next;
                }
                return Err(JournalError { path, source });
            }
            current.len += bytes.len() as u64;
            (current.file.clone(), current.number)
        };
        if self.sync {
            file.sync_data().map_err(|source| JournalError {
                path: generation_path(&self.dir, &self.stem, number),
                source,
            })?;
        }
        Ok(())
    }

    /// Starts a new generation for appends; returns the last one of the old.
    pub fn roll(&self) -> Result<u64, JournalError> {
        let mut current = self.current.lock();
        let next = self.next_generation(current.number + 1)?;
        Ok(std::mem::replace(&mut *current, next).number)
    }

    /// Creates generation `number`, its directory entry flushed.
    fn next_generation(&self, number: u64) -> Result<Generation, JournalError> {
        let file = open_append(&generation_path(&self.dir, &self.stem, number))?;
        sync_dir(&self.dir)?;
        Ok(Generation {
            number,
            file: Arc::new(file),
            len: 0,
        })
    }

    /// Deletes the generations up to `last` (a snapshot holding their tags is on disk).
    pub fn remove_through(&self, last: u64) {
        for (n, path) in generations(&self.dir, &self.stem).unwrap_or_default() {
            if n <= last {
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// `STEM.GEN.tags` files of `stem` in `dir`, in generation order.
fn generations(dir: &Path, stem: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    numbered(dir, stem, ".tags")
}

/// `STEM.N{suffix}` files in `dir` by `N`, in order; a directory that cannot be read is an
/// error, never "none".
pub fn numbered(dir: &Path, stem: &str, suffix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|n| n.strip_prefix(stem))
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn generation_path(dir: &Path, stem: &str, number: u64) -> PathBuf {
    dir.join(format!("{stem}.{number}.tags"))
}

fn open_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io_at(path))
}

/// Flushes `dir`'s entries, so files created or renamed in it survive a lost machine.
pub fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u8) -> [u8; 32] {
        [i; 32]
    }

    #[test]
    fn tags_come_back_across_generations_and_rolled_ones_can_go() {
        let dir = tempfile::tempdir().unwrap();
        let j = TagJournal::create(dir.path(), "k", true).unwrap();
        assert!(TagJournal::exists(dir.path(), "k"));
        assert!(!TagJournal::exists(dir.path(), "other"));
        j.append(&[tag(1), tag(2)]).unwrap();
        let last = j.roll().unwrap();
        j.append(&[tag(3)]).unwrap();
        drop(j);

        let filter = ReplayFilter::new(100, 1e-6);
        let (j, recovered) = TagJournal::open(dir.path(), "k", false, None, &filter).unwrap();
        assert_eq!(recovered, Recovered { tags: 3, files: 2 });
        for i in 1..=3 {
            assert!(filter.contains(&tag(i)), "tag {i}");
        }
        assert!(!filter.contains(&tag(4)));
        // Generations up to the rolled one go (a snapshot holds them); later ones stay.
        j.remove_through(last);
        let filter = ReplayFilter::new(100, 1e-6);
        let (_, recovered) = TagJournal::open(dir.path(), "k", false, Some(last), &filter).unwrap();
        assert_eq!(recovered.tags, 1);
        assert!(filter.contains(&tag(3)) && !filter.contains(&tag(1)));
    }

    #[test]
    fn a_missing_generation_is_lost_state_not_an_empty_journal() {
        let dir = tempfile::tempdir().unwrap();
        let j = TagJournal::create(dir.path(), "k", false).unwrap();
        j.append(&[tag(1)]).unwrap();
        j.roll().unwrap();
        j.append(&[tag(2)]).unwrap();
        drop(j);
        let filter = ReplayFilter::new(100, 1e-6);
        // Without a snapshot, generation 0 must be there.
        std::fs::remove_file(generation_path(dir.path(), "k", 0)).unwrap();
        assert!(matches!(
            TagJournal::open(dir.path(), "k", false, None, &filter),
            Err(OpenError::Lost(_))
        ));
        // A snapshot up to 0 needs generation 1 on: present, so this opens.
        assert!(TagJournal::open(dir.path(), "k", false, Some(0), &filter).is_ok());
        // A snapshot up to 5 with nothing after it lost the journal.
        assert!(matches!(
            TagJournal::open(dir.path(), "k", false, Some(5), &filter),
            Err(OpenError::Lost(_))
        ));
    }

    #[test]
    fn a_torn_last_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let j = TagJournal::create(dir.path(), "k", false).unwrap();
        j.append(&[tag(1)]).unwrap();
        drop(j);
        let mut f = open_append(&generation_path(dir.path(), "k", 0)).unwrap();
        f.write_all(&[7u8; 10]).unwrap();
        let filter = ReplayFilter::new(100, 1e-6);
        let (_, recovered) = TagJournal::open(dir.path(), "k", false, None, &filter).unwrap();
        assert_eq!(recovered.tags, 1);
    }
}
