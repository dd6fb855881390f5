//! Sphinx key epochs on the node: which keys are live, each with its own replay filter.
//!
//! At time `t` in epoch `e` the node holds the key of `e`, the key of `e + 1` (published a
//! whole epoch ahead; accepted early from clients whose clocks run fast), and the key of
//! `e - 1` until `end(e - 1) + overlap`, for packets built for it that are still on their
//! way. Then that key and its filter are dropped, its filter file deleted, and the seed on
//! disk ratcheted past it. A packet under none of the live keys is `expired_key`.
//!
//! Filters are saved periodically and at shutdown and loaded at start, so a packet seen
//! before a restart is still a replay after it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sphinx_packet::header::{HEADER_SIZE, SphinxHeader};
use x25519_dalek::StaticSecret;

use tokio_util::sync::CancellationToken;

use crate::keys::{EpochKey, EpochSchedule, KeyError, SphinxSeed, unix_ms};
use crate::metrics::Metrics;
use crate::mixnet::replay::{ReplayFileError, ReplayFilter};

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Filter(#[from] ReplayFileError),
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
    /// The seed file, rewritten as epochs retire.
    pub seed_path: PathBuf,
    /// Where filters are saved, one file per epoch.
    pub filter_dir: PathBuf,
}

/// One live key and its replay filter.
pub struct LiveKey {
    pub epoch: u64,
    pub secret: StaticSecret,
    pub public: EpochKey,
    /// Replay tag of an all-zero Diffie-Hellman output under this key: every low-order
    /// group element gives it, and such a packet must not be processed (the crate does not
    /// check).
    pub low_order_tag: [u8; 32],
    pub filter: ReplayFilter,
}

/// What a call to [`KeyRing::rotate`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    pub added: Vec<u64>,
    pub retired: Vec<u64>,
    /// Filters that could not be loaded and started empty.
    pub filters_lost: Vec<u64>,
}

/// The node's live Sphinx keys. Workers read them lock-free; rotation swaps the set.
pub struct KeyRing {
    settings: EpochSettings,
    /// `None` for a fixed ring, which never rotates or saves.
    seed: Option<Mutex<SphinxSeed>>,
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
            seed_path: PathBuf::new(),
            filter_dir: PathBuf::new(),
        };
        let key = LiveKey {
            epoch: 0,
            low_order_tag: low_order_tag(&secret),
            secret,
            public,
            filter: ReplayFilter::new(filter_capacity, 1e-9),
        };
        KeyRing {
            settings,
            seed: None,
            live: ArcSwap::from_pointee(vec![Arc::new(key)]),
        }
    }

    /// Opens the ring at `now_ms`: the seed is brought to the oldest live epoch (and saved),
    /// and each live key's filter is loaded from disk or started empty.
    pub fn open(
        settings: EpochSettings,
        seed: SphinxSeed,
        now_ms: u64,
    ) -> Result<(Self, Rotation), EpochError> {
        std::fs::create_dir_all(&settings.filter_dir).map_err(|source| EpochError::Io {
            path: settings.filter_dir.clone(),
            source,
        })?;
        let ring = KeyRing {
            settings,
            seed: Some(Mutex::new(seed)),
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

    /// Brings the live set to what `now_ms` needs: adds coming keys, retires keys past their
    /// overlap (deleting their filters and ratcheting the seed file past them).
    pub fn rotate(&self, now_ms: u64) -> Result<Rotation, EpochError> {
        let mut rotation = Rotation::default();
        let Some(seed) = &self.seed else {
            return Ok(rotation);
        };
        let wanted = self.wanted(now_ms);
        let current = self.live.load_full();
        let mut seed = seed.lock();
        if seed.bring_to(&self.settings.schedule, wanted.clone())? {
            tracing::warn!(
                epoch = *wanted.start(),
                "the Sphinx seed could not reach this epoch (new rotation interval, or the clock went back): fresh Sphinx keys"
            );
        }
        seed.save(&self.settings.seed_path)?;
        let mut next = Vec::new();
        for epoch in wanted.clone() {
            if let Some(k) = current.iter().find(|k| k.epoch == epoch) {
                next.push(k.clone());
                continue;
            }
            let Some(pair) = seed.key(epoch) else {
                continue;
            };
            let filter = match ReplayFilter::load(
                &self.filter_path(epoch),
                self.settings.filter_capacity,
                self.settings.filter_fp_rate,
            ) {
                Ok(f) => f,
                Err(ReplayFileError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    ReplayFilter::new(self.settings.filter_capacity, self.settings.filter_fp_rate)
                }
                Err(e) => {
                    tracing::error!(error = %e, epoch, "replay filter unreadable; starting it empty");
                    rotation.filters_lost.push(epoch);
                    ReplayFilter::new(self.settings.filter_capacity, self.settings.filter_fp_rate)
                }
            };
            let secret = pair.secret().clone();
            let schedule = &self.settings.schedule;
            next.push(Arc::new(LiveKey {
                epoch,
                public: EpochKey {
                    epoch,
                    valid_from_ms: schedule.start_ms(epoch),
                    valid_until_ms: schedule.end_ms(epoch),
                    key: pair.public(),
                },
                low_order_tag: low_order_tag(&secret),
                secret,
                filter,
            }));
            rotation.added.push(epoch);
        }
        drop(seed);
        for old in current.iter().filter(|k| !wanted.contains(&k.epoch)) {
            rotation.retired.push(old.epoch);
        }
        // Kept in the order unwrapping tries them: the current key (nearly every packet's),
        // then the previous, then the next. Rotation runs at every boundary, so the order
        // holds until the next one and the per-packet path only loads it.
        let current_epoch = self.settings.schedule.epoch_at(now_ms);
        next.sort_by_key(|k| (k.epoch != current_epoch, k.epoch > current_epoch));
        self.live.store(Arc::new(next));
        // Filter files of epochs no longer live (including any left by an earlier run).
        if let Ok(entries) = std::fs::read_dir(&self.settings.filter_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let epoch = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("epoch-"))
                    .and_then(|n| n.strip_suffix(".bloom"))
                    .and_then(|n| n.parse::<u64>().ok());
                if epoch.is_some_and(|e| !wanted.contains(&e)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(rotation)
    }

    /// The live keys in the order to try them: current, previous, next.
    pub fn live(&self) -> arc_swap::Guard<Arc<Vec<Arc<LiveKey>>>> {
        self.live.load()
    }

    /// The keys a description publishes at `now_ms`: the current and the next.
    pub fn published(&self, now_ms: u64) -> Vec<EpochKey> {
        let e = self.settings.schedule.epoch_at(now_ms);
        self.live
            .load()
            .iter()
            .filter(|k| k.epoch >= e)
            .map(|k| k.public)
            .collect()
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

    fn filter_path(&self, epoch: u64) -> PathBuf {
        self.settings
            .filter_dir
            .join(format!("epoch-{epoch}.bloom"))
    }

    /// Saves every live filter; returns the bytes of filter state written.
    pub fn save_filters(&self) -> Result<u64, EpochError> {
        let mut bytes = 0;
        if self.seed.is_none() {
            return Ok(0);
        }
        for k in self.live.load().iter() {
            k.filter.save(&self.filter_path(k.epoch))?;
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
    loop {
        let now = unix_ms();
        let change = Duration::from_millis(ring.next_change_ms(now).saturating_sub(now));
        let next_change = tokio::time::Instant::now() + change;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next_change.min(next_save)) => {}
        }
        if tokio::time::Instant::now() >= next_change {
            match ring.rotate(unix_ms()) {
                Ok(r) => {
                    metrics.sphinx_keys_retired.inc_by(r.retired.len() as u64);
                    if !r.added.is_empty() || !r.retired.is_empty() {
                        tracing::info!(added = ?r.added, retired = ?r.retired, "Sphinx keys rotated");
                    }
                }
                Err(e) => tracing::error!(error = %e, "Sphinx key rotation failed; retrying"),
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
        seed_path: dir.join("sphinx.key"),
        filter_dir: dir.join("replay"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(dir: &std::path::Path, interval_ms: u64, now: u64) -> (KeyRing, Rotation) {
        let interval = Duration::from_millis(interval_ms);
        let settings = test_settings(dir, interval, interval / 4);
        let schedule = settings.schedule;
        let seed = match SphinxSeed::load(&settings.seed_path) {
            Ok(s) => s,
            Err(_) => {
                let mut s = SphinxSeed::generate(&schedule).unwrap();
                s.advance_to(&schedule, schedule.epoch_at(now)).unwrap();
                s
            }
        };
        KeyRing::open(settings, seed, now).unwrap()
    }

    fn epochs(ring: &KeyRing) -> Vec<u64> {
        ring.live().iter().map(|k| k.epoch).collect()
    }

    #[test]
    fn keys_come_ahead_and_retire_after_the_overlap() {
        let dir = tempfile::tempdir().unwrap();
        // Epochs of 1000 ms, overlap 250 ms; start in the middle of epoch 100.
        let (ring, opened) = ring(dir.path(), 1000, 100_500);
        assert_eq!(opened.added, vec![100, 101]);
        assert_eq!(epochs(&ring), vec![100, 101]);
        let published: Vec<u64> = ring.published(100_500).iter().map(|k| k.epoch).collect();
        assert_eq!(published, vec![100, 101]);
        assert_eq!(ring.next_change_ms(100_500), 101_000);

        // Into epoch 101: 100 stays for the overlap, 102 comes.
        let r = ring.rotate(101_000).unwrap();
        assert_eq!(r.added, vec![102]);
        assert_eq!(epochs(&ring), vec![101, 100, 102]);
        assert_eq!(ring.next_change_ms(101_000), 101_250);
        let published: Vec<u64> = ring.published(101_000).iter().map(|k| k.epoch).collect();
        assert_eq!(published, vec![101, 102]);

        // Past the overlap: 100 retires, and the seed on disk no longer reaches it.
        let key_100 = ring
            .live()
            .iter()
            .find(|k| k.epoch == 100)
            .unwrap()
            .public
            .key;
        ring.save_filters().unwrap();
        assert!(dir.path().join("replay/epoch-100.bloom").exists());
        let r = ring.rotate(101_250).unwrap();
        assert_eq!(r.retired, vec![100]);
        assert_eq!(epochs(&ring), vec![101, 102]);
        assert!(!dir.path().join("replay/epoch-100.bloom").exists());
        let seed = SphinxSeed::load(&dir.path().join("sphinx.key")).unwrap();
        assert_eq!(seed.epoch(), 101);
        assert!(seed.key(100).is_none());
        assert_ne!(seed.key(101).unwrap().public(), key_100);
    }

    #[test]
    fn filters_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let tag = [7u8; 32];
        {
            let (ring, _) = ring(dir.path(), 1000, 100_500);
            assert!(ring.live()[0].filter.check_and_insert(&tag));
            ring.save_filters().unwrap();
        }
        let (ring, opened) = ring(dir.path(), 1000, 100_600);
        assert!(opened.filters_lost.is_empty());
        assert!(!ring.live()[0].filter.check_and_insert(&tag));
        // The same keys as before the restart.
        assert_eq!(opened.added, vec![100, 101]);
    }
    #[test]
    fn a_seed_made_during_an_overlap_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let schedule = EpochSchedule::new(Duration::from_millis(1000));
        let mut seed = SphinxSeed::generate(&schedule).unwrap();
        // Bound to epoch 100, opened 100 ms into it (inside 99's overlap).
        seed.advance_to(&schedule, 100).unwrap();
        let published = seed.public_keys(100..=101);
        let settings = test_settings(
            dir.path(),
            Duration::from_millis(1000),
            Duration::from_millis(250),
        );
        let (ring, opened) = KeyRing::open(settings, seed, 100_100).unwrap();
        assert_eq!(opened.added, vec![100, 101]);
        assert_eq!(ring.published(100_100), published);
    }
}
