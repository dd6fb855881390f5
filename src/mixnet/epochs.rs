//! Sphinx key epochs on the node: which keys are live, each with its own replay filter.
//!
//! At time `t` in epoch `e` the node holds the key of `e`, the key of `e + 1` (made fresh
//! and published when `e` began; accepted early from clients whose clocks run fast), and
//! the key of `e - 1` until `end(e - 1) + overlap`, for packets built for it that are still
//! on their way. Then that key's secret is erased from memory and from the key file, and
//! its replay state deleted. A packet under none of the live keys is `expired_key`.
//!
//! Each key's replay state is a filter snapshot (saved periodically and at shutdown) and a
//! journal of the tags recorded since (`tag_journal.rs`), written before their packets go
//! on: a packet seen before any kind of stop is still a replay after it. A key's journal is
//! made before the key is first used; a key that had one and finds none at start lost its
//! state, and is not used again: it is replaced by a fresh key (published at once) if its
//! epoch has not ended, else dropped. Only that key's packets are refused meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sphinx_packet::header::{HEADER_SIZE, SphinxHeader};
use x25519_dalek::StaticSecret;

use tokio_util::sync::CancellationToken;

use crate::keys::{EpochKey, EpochSchedule, KeyError, SphinxKeys, X25519, unix_ms};
use crate::metrics::Metrics;
use crate::mixnet::replay::{ReplayFileError, ReplayFilter};
use crate::mixnet::tag_journal::{JournalError, OpenError, TagJournal};

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Filter(#[from] ReplayFileError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the node's key epochs run.
#[derive(Debug, Clone)]
pub struct EpochSettings {
    pub schedule: EpochSchedule,
    /// How long a retired key is still accepted.
    pub overlap: Duration,
    /// Tags one replay filter is sized for (a stage; a busier epoch adds stages).
    pub filter_capacity: u64,
    pub filter_fp_rate: f64,
    /// The key file, rewritten as keys are made and erased.
    pub keys_path: PathBuf,
    /// Where each key's replay state (snapshot and journal) is kept.
    pub filter_dir: PathBuf,
    /// Flush every journal append to stable storage (else to the OS only).
    pub journal_sync: bool,
}

/// One live key and its replay state.
pub struct LiveKey {
    pub epoch: u64,
    pub secret: StaticSecret,
    pub public: EpochKey,
    /// Replay tag of an all-zero Diffie-Hellman output under this key: every low-order
    /// group element gives it, and such a packet must not be processed (the crate does not
    /// check).
    pub low_order_tag: [u8; 32],
    pub filter: ReplayFilter,
    /// `None` for a fixed ring's key, whose state lives in memory only.
    pub journal: Option<TagJournal>,
}

/// What a call to [`KeyRing::rotate`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    pub added: Vec<u64>,
    pub retired: Vec<u64>,
    /// Keys whose replay state was missing or unreadable: replaced (or dropped, if their
    /// epoch is over) rather than used without it.
    pub filters_lost: Vec<u64>,
    /// Tags read back from journals (what the last snapshot before a crash missed).
    pub tags_recovered: u64,
}

/// The node's live Sphinx keys. Workers read them lock-free; rotation swaps the set.
pub struct KeyRing {
    settings: EpochSettings,
    /// `None` for a fixed ring, which never rotates or saves.
    keys: Option<Mutex<SphinxKeys>>,
    live: ArcSwap<Vec<Arc<LiveKey>>>,
}

impl KeyRing {
    /// One key valid at all times, its filter in memory only: for tools and tests that
    /// measure or exercise unwrapping without epochs.
    pub fn fixed(secret: StaticSecret, filter_capacity: u64) -> Self {
        let public = crate::keys::EpochKey::always(crate::keys::KeyBytes(
            x25519_dalek::PublicKey::from(&secret).to_bytes(),
        ));
        let settings = EpochSettings {
            schedule: EpochSchedule::new(Duration::from_millis(u64::MAX)),
            overlap: Duration::ZERO,
            filter_capacity,
            filter_fp_rate: 1e-9,
            keys_path: PathBuf::new(),
            filter_dir: PathBuf::new(),
            journal_sync: false,
        };
        let key = LiveKey {
            epoch: 0,
            low_order_tag: low_order_tag(&secret),
            secret,
            public,
            filter: ReplayFilter::new(filter_capacity, 1e-9),
            journal: None,
        };
        KeyRing {
            settings,
            keys: None,
            live: ArcSwap::from_pointee(vec![Arc::new(key)]),
        }
    }

    /// Opens the ring at `now_ms`: keys are made or erased for the live epochs (and the key
    /// file saved), and each live key's replay state is loaded, or made for a new key.
    pub fn open(
        settings: EpochSettings,
        keys: SphinxKeys,
        now_ms: u64,
    ) -> Result<(Self, Rotation), EpochError> {
        std::fs::create_dir_all(&settings.filter_dir).map_err(|source| EpochError::Io {
            path: settings.filter_dir.clone(),
            source,
        })?;
        let ring = KeyRing {
            settings,
            keys: Some(Mutex::new(keys)),
            live: ArcSwap::from_pointee(Vec::new()),
        };
        let rotation = ring.rotate(now_ms)?;
        Ok((ring, rotation))
    }

    /// Epochs live at `now_ms`.
    fn wanted(&self, now_ms: u64) -> std::ops::RangeInclusive<u64> {
        let schedule = &self.settings.schedule;
        let e = schedule.epoch_at(now_ms);
        let overlap = self.settings.overlap.as_millis() as u64;
        let first = if e > 0 && now_ms < schedule.end_ms(e - 1).saturating_add(overlap) {
            e - 1
        } else {
            e
        };
        first..=e + 1
    }

    /// Brings the live set to what `now_ms` needs: makes coming keys (their journals first,
    /// then the key file), retires keys past their overlap (erasing their secrets and
    /// deleting their replay state).
    pub fn rotate(&self, now_ms: u64) -> Result<Rotation, EpochError> {
        let mut rotation = Rotation::default();
        let Some(keys) = &self.keys else {
            return Ok(rotation);
        };
        let schedule = self.settings.schedule;
        let wanted = self.wanted(now_ms);
        let current_epoch = schedule.epoch_at(now_ms);
        let current = self.live.load_full();
        let mut keys = keys.lock();
        if keys
            .bring_to(&schedule, wanted.clone(), current_epoch)?
            .interval_changed
        {
            tracing::warn!("the Sphinx key rotation interval changed: fresh Sphinx keys");
        }
        let mut next = Vec::new();
        for epoch in keys.epochs().collect::<Vec<_>>() {
            let Some(pair) = keys.key(epoch) else {
                continue;
            };
            if let Some(k) = current
                .iter()
                .find(|k| k.epoch == epoch && k.public.key == pair.public())
            {
                next.push(k.clone());
                continue;
            }
            let live = match self.open_state(&mut keys, epoch, &pair)? {
                Some(state) => self.live_key(epoch, pair, state),
                None => {
                    rotation.filters_lost.push(epoch);
                    if epoch < current_epoch {
                        keys.erase(epoch);
                        continue;
                    }
                    keys.replace(epoch)?;
                    let Some(pair) = keys.key(epoch) else {
                        continue;
                    };
                    let state = self.create_state(&mut keys, epoch, &pair)?;
                    self.live_key(epoch, pair, state)
                }
            };
            rotation.tags_recovered += live.1;
            next.push(Arc::new(live.0));
            rotation.added.push(epoch);
        }
        // Every new key's journal exists before the file naming the key is saved.
        keys.save(&self.settings.keys_path)?;
        drop(keys);
        for old in current.iter() {
            if !next.iter().any(|k| Arc::ptr_eq(k, old)) {
                rotation.retired.push(old.epoch);
            }
        }
        // Kept in the order unwrapping tries them: the current key (nearly every packet's),
        // then the previous, then the next. Rotation runs at every boundary, so the order
        // holds until the next one and the per-packet path only loads it.
        next.sort_by_key(|k| (k.epoch != current_epoch, k.epoch > current_epoch));
        let stems: Vec<String> = next.iter().map(|k| stem(k.epoch, &k.public)).collect();
        self.live.store(Arc::new(next));
        self.remove_state_except(&stems);
        Ok(rotation)
    }

    fn live_key(&self, epoch: u64, pair: X25519, state: KeyState) -> (LiveKey, u64) {
        let schedule = &self.settings.schedule;
        let secret = pair.secret().clone();
        let key = LiveKey {
            epoch,
            public: EpochKey {
                epoch,
                valid_from_ms: schedule.start_ms(epoch),
                valid_until_ms: schedule.end_ms(epoch),
                key: pair.public(),
            },
            low_order_tag: low_order_tag(&secret),
            secret,
            filter: state.filter,
            journal: Some(state.journal),
        };
        (key, state.recovered)
    }

    /// The replay state of a key made now (or never used before): an empty filter and a
    /// fresh journal, recorded in the keys as existing.
    fn create_state(
        &self,
        keys: &mut SphinxKeys,
        epoch: u64,
        pair: &X25519,
    ) -> Result<KeyState, EpochError> {
        let stem = stem(epoch, &self.epoch_key(epoch, pair));
        let journal =
            TagJournal::create(&self.settings.filter_dir, &stem, self.settings.journal_sync)?;
        keys.mark_journaled(epoch);
        Ok(KeyState {
            filter: self.empty_filter(),
            journal,
            recovered: 0,
        })
    }

    /// The replay state of a key already in the key file: made if the key was never used
    /// (no mark and nothing on disk), loaded (snapshot, then journal) otherwise; `None` if it
    /// is missing, incomplete or unreadable. State on disk counts whatever the key file says,
    /// so a key file older than its state (restored, or handed in by a caller) cannot make
    /// the node start the key afresh over it.
    fn open_state(
        &self,
        keys: &mut SphinxKeys,
        epoch: u64,
        pair: &X25519,
    ) -> Result<Option<KeyState>, EpochError> {
        let dir = &self.settings.filter_dir;
        let stem = stem(epoch, &self.epoch_key(epoch, pair));
        let snapshots = snapshots(dir, &stem).map_err(|source| EpochError::Io {
            path: dir.clone(),
            source,
        })?;
        if !keys.is_journaled(epoch) && snapshots.is_empty() && !TagJournal::exists(dir, &stem) {
            return self.create_state(keys, epoch, pair).map(Some);
        }
        let lost = |why: &dyn std::fmt::Display| {
            tracing::error!(epoch, error = %why, "the replay state of this Sphinx key is missing or incomplete: the key is not used again");
            Ok(None)
        };
        let (filter, upto) = match snapshots.last() {
            Some((upto, path)) => match ReplayFilter::load(
                path,
                self.settings.filter_capacity,
                self.settings.filter_fp_rate,
            ) {
                Ok(f) => (f, Some(*upto)),
                Err(e) => return lost(&e),
            },
            None => (self.empty_filter(), None),
        };
        match TagJournal::open(dir, &stem, self.settings.journal_sync, upto, &filter) {
            Ok((journal, recovered)) => {
                keys.mark_journaled(epoch);
                Ok(Some(KeyState {
                    filter,
                    journal,
                    recovered: recovered.tags,
                }))
            }
            Err(OpenError::Lost(why)) => lost(&why),
            Err(OpenError::Io(e)) => Err(e.into()),
        }
    }

    fn empty_filter(&self) -> ReplayFilter {
        ReplayFilter::new(self.settings.filter_capacity, self.settings.filter_fp_rate)
    }

    fn epoch_key(&self, epoch: u64, pair: &X25519) -> EpochKey {
        EpochKey {
            epoch,
            valid_from_ms: 0,
            valid_until_ms: 0,
            key: pair.public(),
        }
    }

    /// Deletes replay state of keys not live (retired, replaced, or left by an earlier run).
    fn remove_state_except(&self, stems: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.settings.filter_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with("epoch-") {
                continue;
            }
            let stem = name.split('.').next().unwrap_or_default();
            if !stems.iter().any(|s| s == stem) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The live keys in the order to try them: current, previous, next.
    pub fn live(&self) -> arc_swap::Guard<Arc<Vec<Arc<LiveKey>>>> {
        self.live.load()
    }

    /// The keys a description publishes at `now_ms`: the current and the next.
    pub fn published(&self, now_ms: u64) -> Vec<EpochKey> {
        let e = self.settings.schedule.epoch_at(now_ms);
        let mut keys: Vec<EpochKey> = self
            .live
            .load()
            .iter()
            .filter(|k| k.epoch >= e)
            .map(|k| k.public)
            .collect();
        keys.sort_by_key(|k| k.epoch);
        keys
    }

    /// When the live set next changes after `now_ms` (a boundary or an overlap's end).
    pub fn next_change_ms(&self, now_ms: u64) -> u64 {
        let schedule = &self.settings.schedule;
        let e = schedule.epoch_at(now_ms);
        let overlap_end = schedule
            .end_ms(e.saturating_sub(1))
            .saturating_add(self.settings.overlap.as_millis() as u64);
        let boundary = schedule.end_ms(e);
        if overlap_end > now_ms {
            overlap_end.min(boundary)
        } else {
            boundary
        }
    }

    /// Snapshots every live filter: its journal rolls to a new generation, the filter
    /// (holding every tag of the older generations) is written, and those generations are
    /// deleted. Returns the bytes of filter state written.
    pub fn save_filters(&self) -> Result<u64, EpochError> {
        let mut bytes = 0;
        if self.keys.is_none() {
            return Ok(0);
        }
        let dir = &self.settings.filter_dir;
        for k in self.live.load().iter() {
            let Some(journal) = &k.journal else { continue };
            let last = journal.roll()?;
            let stem = stem(k.epoch, &k.public);
            // Named by the last generation it holds: opening knows which must follow.
            k.filter.save(&dir.join(format!("{stem}.{last}.bloom")))?;
            crate::mixnet::tag_journal::sync_dir(dir)?;
            for (n, old) in snapshots(dir, &stem).unwrap_or_default() {
                if n < last {
                    let _ = std::fs::remove_file(old);
                }
            }
            journal.remove_through(last);
            bytes += k.filter.size_bytes();
        }
        Ok(bytes)
    }

    /// Bytes of all live filters and their fill as `(epoch, inserted, capacity)`.
    pub fn filter_stats(&self) -> (u64, Vec<(u64, u64, u64)>) {
        let live = self.live.load();
        let size = live.iter().map(|k| k.filter.size_bytes()).sum();
        let fill = live
            .iter()
            .map(|k| (k.epoch, k.filter.inserted(), k.filter.capacity()))
            .collect();
        (size, fill)
    }
}

/// A key's filter snapshots, `STEM.GEN.bloom`, by the last journal generation each holds.
fn snapshots(dir: &std::path::Path, stem: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    crate::mixnet::tag_journal::numbered(dir, stem, ".bloom")
}

/// A key's replay state as opened: its filter, its journal, and the tags read back.
struct KeyState {
    filter: ReplayFilter,
    journal: TagJournal,
    recovered: u64,
}

/// File-name stem of a key's replay state: its epoch and the start of its public key, so a
/// replaced key never meets its predecessor's state.
fn stem(epoch: u64, key: &EpochKey) -> String {
    format!("epoch-{epoch}-{}", key.key.short())
}

/// Drives the ring: rotates at every boundary and overlap end, saves the filters every
/// `save_every`, and once more when `stop` fires (the node cancels it only after its
/// Sphinx workers have finished, so every tag they recorded is in the last save).
pub async fn run(
    ring: Arc<KeyRing>,
    save_every: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let publish = |ring: &KeyRing| {
        let now = unix_ms();
        metrics
            .sphinx_key_epoch
            .set(ring.settings.schedule.epoch_at(now) as i64);
    };
    publish(&ring);
    let mut next_save = tokio::time::Instant::now() + save_every;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let now = unix_ms();
        let change = Duration::from_millis(ring.next_change_ms(now).saturating_sub(now));
        let mut next_change = tokio::time::Instant::now() + change;
        if let Some(retry) = retry_at {
            next_change = next_change.min(retry);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next_change.min(next_save)) => {}
        }
        if tokio::time::Instant::now() >= next_change {
            retry_at = None;
            match ring.rotate(unix_ms()) {
                Ok(r) => {
                    metrics.sphinx_keys_retired.inc_by(r.retired.len() as u64);
                    metrics
                        .replay_state_lost
                        .inc_by(r.filters_lost.len() as u64);
                    if !r.added.is_empty() || !r.retired.is_empty() {
                        tracing::info!(added = ?r.added, retired = ?r.retired, "Sphinx keys rotated");
                    }
                }
                Err(e) => {
                    // A retired secret must not outlive its overlap by a whole epoch.
                    tracing::error!(error = %e, "Sphinx key rotation failed; retrying in 5s");
                    retry_at = Some(tokio::time::Instant::now() + ROTATION_RETRY);
                }
            }
            publish(&ring);
        }
        if tokio::time::Instant::now() >= next_save {
            save(&ring).await;
            next_save = tokio::time::Instant::now() + save_every;
        }
    }
    save(&ring).await;
}

/// How soon a failed rotation is tried again.
const ROTATION_RETRY: Duration = Duration::from_secs(5);

async fn save(ring: &Arc<KeyRing>) {
    let r = ring.clone();
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || r.save_filters()).await {
        Ok(Ok(bytes)) => tracing::debug!(
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "replay filters saved"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "saving the replay filters failed"),
        Err(e) => tracing::error!(error = %e, "saving the replay filters failed"),
    }
}

/// Reads the filters into the metrics at scrape time.
pub fn sample(ring: &KeyRing, metrics: &Metrics) {
    let (bytes, fill) = ring.filter_stats();
    metrics.replay_filter_bytes.set(bytes as i64);
    let e = ring.settings.schedule.epoch_at(unix_ms());
    let current = fill
        .iter()
        .find(|(epoch, ..)| *epoch == e)
        .map_or(0.0, |(_, inserted, capacity)| {
            *inserted as f64 / *capacity as f64
        });
    metrics.replay_filter_fill.set(current);
}

/// The replay tag an all-zero Diffie-Hellman output gives under `secret` (u = 0 is a
/// low-order point, and x25519 with any of them yields all zeros).
fn low_order_tag(secret: &StaticSecret) -> [u8; 32] {
    SphinxHeader::from_bytes(&[0u8; HEADER_SIZE])
        .map(|h| *h.compute_expanded_shared_secret(secret).replay_tag())
        .unwrap_or([0u8; 32])
}

/// Settings for unit tests: small filters kept under `dir`.
#[cfg(test)]
pub(crate) fn test_settings(
    dir: &std::path::Path,
    interval: Duration,
    overlap: Duration,
) -> EpochSettings {
    EpochSettings {
        schedule: EpochSchedule::new(interval),
        overlap,
        filter_capacity: 1000,
        filter_fp_rate: 1e-6,
        keys_path: dir.join("sphinx.key"),
        filter_dir: dir.join("replay"),
        journal_sync: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_ring(dir: &std::path::Path, interval_ms: u64, now: u64) -> (KeyRing, Rotation) {
        let interval = Duration::from_millis(interval_ms);
        let settings = test_settings(dir, interval, interval / 4);
        let schedule = settings.schedule;
        let keys = match SphinxKeys::load(&settings.keys_path) {
            Ok(k) => k,
            Err(_) => {
                let mut k = SphinxKeys::generate(&schedule).unwrap();
                let e = schedule.epoch_at(now);
                k.bring_to(&schedule, e..=e + 1, e).unwrap();
                k
            }
        };
        KeyRing::open(settings, keys, now).unwrap()
    }

    /// Settings of 1000 ms epochs, and fresh keys for epochs 100 and 101 (none journaled).
    fn keys_of_epoch_100(dir: &std::path::Path) -> (EpochSettings, SphinxKeys) {
        let settings = test_settings(dir, Duration::from_millis(1000), Duration::from_millis(250));
        let schedule = settings.schedule;
        let mut keys = SphinxKeys::generate(&schedule).unwrap();
        keys.bring_to(&schedule, 100..=101, 100).unwrap();
        (settings, keys)
    }

    /// Deletes the replay-state files whose names start with `prefix` and end with `suffix`
    /// (a data directory that lost them).
    fn forget_state(dir: &std::path::Path, prefix: &str, suffix: &str) {
        for e in std::fs::read_dir(dir.join("replay")).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(prefix) && name.ends_with(suffix) {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }

    fn epochs(ring: &KeyRing) -> Vec<u64> {
        ring.live().iter().map(|k| k.epoch).collect()
    }

    fn key_of(ring: &KeyRing, epoch: u64) -> crate::keys::KeyBytes {
        ring.live()
            .iter()
            .find(|k| k.epoch == epoch)
            .unwrap()
            .public
            .key
    }

    fn record(ring: &KeyRing, epoch: u64, tag: &[u8; 32]) -> bool {
        let live = ring.live();
        let key = live.iter().find(|k| k.epoch == epoch).unwrap();
        let new = key.filter.check_and_insert(tag);
        key.journal.as_ref().unwrap().append(&[*tag]).unwrap();
        new
    }

    #[test]
    fn keys_come_ahead_and_retire_after_the_overlap() {
        let dir = tempfile::tempdir().unwrap();
        // Epochs of 1000 ms, overlap 250 ms; start in the middle of epoch 100.
        let (ring, opened) = open_ring(dir.path(), 1000, 100_500);
        assert_eq!(opened.added, vec![100, 101]);
        assert_eq!(epochs(&ring), vec![100, 101]);
        let published: Vec<u64> = ring.published(100_500).iter().map(|k| k.epoch).collect();
        assert_eq!(published, vec![100, 101]);
        assert_eq!(ring.next_change_ms(100_500), 101_000);

        // Into epoch 101: 100 stays for the overlap, 102 is made.
        let r = ring.rotate(101_000).unwrap();
        assert_eq!(r.added, vec![102]);
        assert_eq!(epochs(&ring), vec![101, 100, 102]);
        assert_eq!(ring.next_change_ms(101_000), 101_250);
        let published: Vec<u64> = ring.published(101_000).iter().map(|k| k.epoch).collect();
        assert_eq!(published, vec![101, 102]);

        // Past the overlap: 100 retires; its secret leaves the key file, its state the disk.
        let key_100 = key_of(&ring, 100);
        ring.save_filters().unwrap();
        let state_of_100 = || {
            std::fs::read_dir(dir.path().join("replay"))
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("epoch-100-"))
        };
        assert!(state_of_100());
        let r = ring.rotate(101_250).unwrap();
        assert_eq!(r.retired, vec![100]);
        assert_eq!(epochs(&ring), vec![101, 102]);
        assert!(!state_of_100());
        let keys = SphinxKeys::load(&dir.path().join("sphinx.key")).unwrap();
        assert_eq!(keys.epochs().collect::<Vec<_>>(), vec![101, 102]);
        assert!(keys.key(100).is_none());
        assert_ne!(keys.key(101).unwrap().public(), key_100);
    }

    #[test]
    fn a_key_file_stolen_in_epoch_e_does_not_open_a_packet_for_epoch_e_plus_2() {
        use crate::mixnet::sphinx::{Processed, Rejection, SphinxProcessor, tests::build};
        let dir = tempfile::tempdir().unwrap();
        let (ring, _) = open_ring(dir.path(), 1000, 100_500);
        // The thief copies every secret the node holds in epoch 100 (its whole key file).
        let stolen = SphinxKeys::load(&dir.path().join("sphinx.key")).unwrap();
        assert_eq!(stolen.epochs().collect::<Vec<_>>(), vec![100, 101]);
        // Epoch 101 makes the key of 102; a packet is built for it, as clients do.
        ring.rotate(101_000).unwrap();
        let key_102 = ring
            .live()
            .iter()
            .find(|k| k.epoch == 102)
            .unwrap()
            .secret
            .clone();
        let target = X25519::from_secret(key_102.to_bytes());
        let other = X25519::generate().unwrap();
        let packet = build(&[(&target, [1; 32]), (&other, [2; 32])], &[1, 0], b"x");
        for epoch in stolen.epochs() {
            let thief = SphinxProcessor::new(
                Arc::new(KeyRing::fixed(
                    stolen.key(epoch).unwrap().secret().clone(),
                    16,
                )),
                Duration::from_secs(10),
            );
            assert!(
                matches!(thief.process(&packet), Err(Rejection::ExpiredKey)),
                "the stolen key of epoch {epoch} must not open it"
            );
        }
        let node = SphinxProcessor::new(Arc::new(ring), Duration::from_secs(10));
        assert!(matches!(
            node.process(&packet),
            Ok(Processed::Forward { .. })
        ));
    }

    #[test]
    fn tags_survive_a_crash_between_snapshots_and_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = ([7u8; 32], [8u8; 32], [9u8; 32]);
        {
            let (ring, _) = open_ring(dir.path(), 1000, 100_500);
            assert!(record(&ring, 100, &a));
            ring.save_filters().unwrap();
            // After the snapshot, in the journal only; then the process dies (no save).
            assert!(record(&ring, 100, &b));
            assert!(record(&ring, 101, &c));
        }
        let (ring, opened) = open_ring(dir.path(), 1000, 100_600);
        assert!(opened.filters_lost.is_empty());
        assert_eq!(opened.tags_recovered, 2);
        assert_eq!(opened.added, vec![100, 101]);
        let live = ring.live();
        let k100 = live.iter().find(|k| k.epoch == 100).unwrap();
        let k101 = live.iter().find(|k| k.epoch == 101).unwrap();
        assert!(k100.filter.contains(&a) && k100.filter.contains(&b));
        assert!(k101.filter.contains(&c));
        drop(live);
        // A clean stop snapshots and leaves nothing to recover.
        ring.save_filters().unwrap();
        drop(ring);
        let (ring, opened) = open_ring(dir.path(), 1000, 100_700);
        assert_eq!(opened.tags_recovered, 0);
        assert!(!record(&ring, 100, &b), "still a replay");
    }

    #[test]
    fn a_key_whose_state_is_lost_is_replaced_and_no_other_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let (before_100, before_101) = {
            let (ring, _) = open_ring(dir.path(), 1000, 100_500);
            record(&ring, 100, &[1; 32]);
            ring.save_filters().unwrap();
            (key_of(&ring, 100), key_of(&ring, 101))
        };
        // The data directory loses epoch 100's state (snapshot and journal).
        forget_state(dir.path(), "epoch-100-", "");
        let (ring, opened) = open_ring(dir.path(), 1000, 100_600);
        assert_eq!(opened.filters_lost, vec![100]);
        assert_ne!(
            key_of(&ring, 100),
            before_100,
            "a fresh key, published at once"
        );
        assert_eq!(key_of(&ring, 101), before_101);
        let published: Vec<_> = ring.published(100_600).iter().map(|k| k.key).collect();
        assert_eq!(published, vec![key_of(&ring, 100), before_101]);
        // The old secret is gone from the key file.
        let keys = SphinxKeys::load(&dir.path().join("sphinx.key")).unwrap();
        assert_eq!(keys.key(100).unwrap().public(), key_of(&ring, 100));
        // In the overlap of an epoch that is over, a lost key is dropped, not replaced.
        drop(ring);
        forget_state(dir.path(), "epoch-100-", "");
        let (ring, opened) = open_ring(dir.path(), 1000, 101_100);
        assert_eq!(opened.filters_lost, vec![100]);
        assert_eq!(epochs(&ring), vec![101, 102]);
    }

    #[test]
    fn state_on_disk_wins_over_a_key_file_that_forgot_it() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, keys) = keys_of_epoch_100(dir.path());
        // The caller keeps its unmarked copy (a restored key file, or a test harness).
        let unmarked = keys.clone();
        {
            let (ring, _) = KeyRing::open(settings.clone(), keys, 100_100).unwrap();
            assert!(record(&ring, 100, &[5; 32]));
            ring.save_filters().unwrap();
            assert!(record(&ring, 100, &[6; 32]));
        }
        let (ring, opened) = KeyRing::open(settings, unmarked, 100_200).unwrap();
        assert!(opened.filters_lost.is_empty());
        assert!(!record(&ring, 100, &[5; 32]), "from the snapshot");
        assert!(!record(&ring, 100, &[6; 32]), "from the journal");
    }

    #[test]
    fn a_lost_snapshot_or_a_gap_in_the_journal_fails_the_key_closed() {
        let dir = tempfile::tempdir().unwrap();
        let key_100 = {
            let (ring, _) = open_ring(dir.path(), 1000, 100_500);
            record(&ring, 100, &[1; 32]);
            ring.save_filters().unwrap();
            record(&ring, 100, &[2; 32]);
            key_of(&ring, 100)
        };
        // Only the snapshot goes: the journal after it remains, but it is not the whole state.
        forget_state(dir.path(), "epoch-100-", ".bloom");
        let (ring, opened) = open_ring(dir.path(), 1000, 100_600);
        assert_eq!(opened.filters_lost, vec![100]);
        assert_ne!(key_of(&ring, 100), key_100);
    }

    #[test]
    fn keys_written_before_the_first_start_get_fresh_state_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, keys) = keys_of_epoch_100(dir.path());
        keys.save(&settings.keys_path).unwrap();
        let published = keys.public_keys(100..=101);
        let keys = SphinxKeys::load(&settings.keys_path).unwrap();
        let (ring, opened) = KeyRing::open(settings, keys, 100_100).unwrap();
        assert!(opened.filters_lost.is_empty());
        assert_eq!(ring.published(100_100), published);
    }
}
