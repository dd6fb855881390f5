//! The replay filter of one Sphinx key epoch: remembers the replay tag of every packet
//! unwrapped with that epoch's key, so a second copy is dropped. It lives exactly as long
//! as its key (a packet for a deleted key cannot be unwrapped at all, so its tags need not
//! be remembered), and is saved to disk so a restart opens no replay window.
//!
//! It is a Bloom filter sized for the packets one epoch can carry: `n` expected tags at a
//! false-positive rate `p` take `m = -n ln p / (ln 2)^2` bits and `k = (m / n) ln 2` probes.
//! A false positive drops one honest packet as a replay (the sender's retransmission
//! recovers it); a replay is never missed. Written here rather than taken from a crate:
//! the replay tag is already a uniform hash output, so it seeds the probes directly (no
//! rehashing), the bits are split into independently locked shards so workers
//! on different cores rarely meet and a check-and-set is atomic per tag, and the file is
//! the bit array itself, written sparsely.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

const SHARDS: usize = 64;
const MAGIC: &[u8; 8] = b"NYMRPLY2";
/// Magic, shard count, words per shard, probes, stages: 8 bytes each; then per stage its
/// tag count and bits.
const HEADER_BYTES: usize = 40;
/// Zero blocks of this size are skipped when saving, so a lightly used filter is a small
/// sparse file.
const BLOCK_WORDS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ReplayFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a replay filter of this size (the filter's sizing knobs changed?)")]
    Mismatch(PathBuf),
}

/// One Bloom filter of fixed size.
struct Stage {
    shards: Box<[Mutex<Box<[u64]>>]>,
    /// Bits per shard (a multiple of 64).
    bits: u64,
    probes: u32,
    inserted: AtomicU64,
}

impl Stage {
    fn new(words: usize, probes: u32) -> Self {
        // Zeroed allocations are mapped lazily: memory is touched only as bits are set.
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(vec![0u64; words].into_boxed_slice()))
            .collect();
        Stage {
            shards,
            bits: words as u64 * 64,
            probes,
            inserted: AtomicU64::new(0),
        }
    }

    /// The shard and the probe sequence of `tag`.
    fn locate(&self, tag: &[u8; 32]) -> (usize, impl Iterator<Item = u64> + use<>) {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&tag[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let shard = usize::from(u16::from_le_bytes([tag[30], tag[31]])) % SHARDS;
        // Each probe from a SplitMix64 step seeded by the tag: double hashing (`h1 + i h2`)
        // measured about twice the modelled false-positive rate in shards of a few hundred
        // words (15 against 7 in 120 million inserts), independent probes do not.
        let bits = self.bits;
        let mut state = word(0) ^ word(8).rotate_left(32);
        let probes = (0..self.probes).map(move |_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % bits
        });
        (shard, probes)
    }

    fn contains(&self, tag: &[u8; 32]) -> bool {
        let (shard, mut probes) = self.locate(tag);
        let bits = self.shards[shard].lock();
        probes.all(|b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    fn check_and_insert(&self, tag: &[u8; 32]) -> bool {
        let (shard, probes) = self.locate(tag);
        let mut bits = self.shards[shard].lock();
        let mut new = false;
        for b in probes {
            let (w, mask) = ((b / 64) as usize, 1u64 << (b % 64));
            new |= bits[w] & mask == 0;
            bits[w] |= mask;
        }
        if new {
            self.inserted.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    fn inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }

    fn size_bytes(&self) -> u64 {
        self.bits / 8 * SHARDS as u64
    }

    fn false_positive_rate(&self) -> f64 {
        let m = (self.bits * SHARDS as u64) as f64;
        let k = f64::from(self.probes);
        (1.0 - (-k * self.inserted() as f64 / m).exp()).powf(k)
    }
}

/// The filter of one epoch: one Bloom filter sized for the epoch's expected packets, and
/// another of the same size each time the last one is full, so a node busier than its
/// sizing keeps its false-positive rate (about `p` per stage) instead of saturating; memory
/// grows with the traffic actually seen, bounded by what the node can unwrap in an epoch.
pub struct ReplayFilter {
    stages: RwLock<Vec<Arc<Stage>>>,
    /// Tags per stage.
    capacity: u64,
    words: usize,
    probes: u32,
}

impl ReplayFilter {
    /// A filter for `expected` tags at false-positive rate `fp_rate` once full.
    pub fn new(expected: u64, fp_rate: f64) -> Self {
        let (words, probes) = sizing(expected, fp_rate);
        ReplayFilter {
            stages: RwLock::new(vec![Arc::new(Stage::new(words, probes))]),
            capacity: expected.max(1),
            words,
            probes,
        }
    }

    /// True if `tag` was recorded before (without recording it).
    pub fn contains(&self, tag: &[u8; 32]) -> bool {
        self.stages.read().iter().any(|s| s.contains(tag))
    }

    /// Records `tag`; returns `true` if it is new and `false` if it was seen before.
    /// Atomic per tag: of two racing copies exactly one gets `true`.
    pub fn check_and_insert(&self, tag: &[u8; 32]) -> bool {
        // The insert happens under the same read lock as the check of the full stages: a
        // new stage (which needs the write lock) cannot appear between them, so two copies
        // racing across a stage boundary still meet in one stage.
        let last = {
            let stages = self.stages.read();
            let (last, full) = stages.split_last().expect("a filter has a stage");
            if full.iter().any(|s| s.contains(tag)) || !last.check_and_insert(tag) {
                return false;
            }
            last.clone()
        };
        if last.inserted() >= self.capacity {
            let mut stages = self.stages.write();
            if stages.last().is_some_and(|s| Arc::ptr_eq(s, &last)) {
                stages.push(Arc::new(Stage::new(self.words, self.probes)));
            }
        }
        true
    }

    /// Tags recorded so far.
    pub fn inserted(&self) -> u64 {
        self.stages.read().iter().map(|s| s.inserted()).sum()
    }

    /// Tags one stage was sized for.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of the bit arrays.
    pub fn size_bytes(&self) -> u64 {
        self.stages.read().iter().map(|s| s.size_bytes()).sum()
    }

    /// The false-positive rate at the current fill (the stages' rates added up).
    pub fn false_positive_rate(&self) -> f64 {
        self.stages
            .read()
            .iter()
            .map(|s| s.false_positive_rate())
            .sum()
    }

    /// Writes the filter to `path` (through a temporary file and a rename, so a crash
    /// leaves the previous copy whole). All-zero blocks are left as holes.
    pub fn save(&self, path: &Path) -> Result<(), ReplayFileError> {
        let io = |source| ReplayFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stages: Vec<Arc<Stage>> = self.stages.read().clone();
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let mut header = Vec::with_capacity(HEADER_BYTES);
        header.extend_from_slice(MAGIC);
        for v in [
            SHARDS as u64,
            self.words as u64,
            u64::from(self.probes),
            stages.len() as u64,
        ] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        file.write_all_at(&header, 0).map_err(io)?;
        let stage_bytes = (8 + self.words * SHARDS * 8) as u64;
        file.set_len(HEADER_BYTES as u64 + stage_bytes * stages.len() as u64)
            .map_err(io)?;
        let mut block = Vec::with_capacity(BLOCK_WORDS * 8);
        for (i, stage) in stages.iter().enumerate() {
            let base = HEADER_BYTES as u64 + stage_bytes * i as u64;
            file.write_all_at(&stage.inserted().to_le_bytes(), base)
                .map_err(io)?;
            for (s, shard) in stage.shards.iter().enumerate() {
                // Copy out under the lock, write without it.
                let copy: Vec<u64> = shard.lock().to_vec();
                for (c, chunk) in copy.chunks(BLOCK_WORDS).enumerate() {
                    if chunk.iter().all(|w| *w == 0) {
                        continue;
                    }
                    block.clear();
                    for w in chunk {
                        block.extend_from_slice(&w.to_le_bytes());
                    }
                    let offset = base + 8 + ((s * self.words + c * BLOCK_WORDS) * 8) as u64;
                    file.write_all_at(&block, offset).map_err(io)?;
                }
            }
        }
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    }

    /// Loads a filter saved by [`save`](Self::save) for the same sizing.
    pub fn load(path: &Path, expected: u64, fp_rate: f64) -> Result<Self, ReplayFileError> {
        let io = |source| ReplayFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (words, probes) = sizing(expected, fp_rate);
        let mut file = File::open(path).map_err(io)?;
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact(&mut header).map_err(io)?;
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[8 + i * 8..16 + i * 8]);
            u64::from_le_bytes(b)
        };
        if &header[..8] != MAGIC
            || field(0) != SHARDS as u64
            || field(1) != words as u64
            || field(2) != u64::from(probes)
            || field(3) == 0
        {
            return Err(ReplayFileError::Mismatch(path.to_path_buf()));
        }
        let mut stages = Vec::new();
        let mut bytes = vec![0u8; words * 8];
        for _ in 0..field(3) {
            let stage = Stage::new(words, probes);
            let mut count = [0u8; 8];
            file.read_exact(&mut count).map_err(io)?;
            stage
                .inserted
                .store(u64::from_le_bytes(count), Ordering::Relaxed);
            for shard in stage.shards.iter() {
                file.read_exact(&mut bytes).map_err(io)?;
                let mut bits = shard.lock();
                for (w, b) in bits.iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    *w = u64::from_le_bytes(a);
                }
            }
            stages.push(Arc::new(stage));
        }
        Ok(ReplayFilter {
            stages: RwLock::new(stages),
            capacity: expected.max(1),
            words,
            probes,
        })
    }
}

/// Words per shard and probes per tag for `expected` tags at `fp_rate`.
fn sizing(expected: u64, fp_rate: f64) -> (usize, u32) {
    let n = expected.max(1) as f64;
    let p = fp_rate.clamp(1e-12, 0.5);
    let ln2 = std::f64::consts::LN_2;
    let total_bits = (-n * p.ln() / (ln2 * ln2)).ceil().max(64.0 * SHARDS as f64);
    let words = (total_bits / (64.0 * SHARDS as f64)).ceil() as usize;
    let probes = ((total_bits / n) * ln2).round().clamp(1.0, 32.0) as u32;
    (words, probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay tag is a hash output; so are these.
    fn tag(i: u64) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(i.to_le_bytes()).into()
    }

    #[test]
    fn second_sighting_is_a_replay() {
        let f = ReplayFilter::new(10_000, 1e-6);
        assert!(f.check_and_insert(&tag(1)));
        assert!(f.check_and_insert(&tag(2)));
        assert!(!f.check_and_insert(&tag(1)));
        assert!(!f.check_and_insert(&tag(2)));
        assert!(f.contains(&tag(1)));
        assert!(!f.contains(&tag(3)));
        assert_eq!(f.inserted(), 2);
    }

    #[test]
    fn sizing_follows_the_formula() {
        // 1M tags at 1e-6: 28.76 bits a tag, 20 probes.
        let f = ReplayFilter::new(1_000_000, 1e-6);
        let bits_per_tag = f.size_bytes() as f64 * 8.0 / 1e6;
        assert!((28.7..29.0).contains(&bits_per_tag), "{bits_per_tag}");
        assert_eq!(f.probes, 20);
        assert_eq!(f.stages.read().len(), 1);
    }

    #[test]
    fn measured_false_positive_rate_is_near_the_target_when_full() {
        let (n, p) = (200_000u64, 1e-3);
        let f = ReplayFilter::new(n, p);
        for i in 0..n {
            f.check_and_insert(&tag(i));
        }
        let trials = 1_000_000u64;
        let fp = (n..n + trials).filter(|i| f.contains(&tag(*i))).count() as f64 / trials as f64;
        // Within a factor of two of the target, and the model agrees.
        assert!(fp > p / 2.0 && fp < p * 2.0, "measured {fp}");
        let model = f.false_positive_rate();
        assert!(model > p / 2.0 && model < p * 2.0, "model {model}");
    }

    #[test]
    fn a_full_filter_grows_a_stage_and_keeps_its_rate() {
        let (n, p) = (20_000u64, 1e-4);
        let f = ReplayFilter::new(n, p);
        // A few new tags are false positives of the full stages (about 6 expected here).
        let new = (0..3 * n).filter(|i| f.check_and_insert(&tag(*i))).count() as u64;
        assert!(new > 3 * n - 40, "{new}");
        assert!(f.stages.read().len() >= 3);
        for i in 0..3 * n {
            assert!(!f.check_and_insert(&tag(i)), "tag {i} forgotten");
        }
        let trials = 200_000u64;
        let fp = (10 * n..10 * n + trials)
            .filter(|i| f.contains(&tag(*i)))
            .count() as f64
            / trials as f64;
        // Three full stages at about p each (60 expected in 200k trials).
        assert!(fp < 5.0 * p, "measured {fp}");
    }

    #[test]
    fn saved_filter_loads_with_every_tag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epoch.bloom");
        let f = ReplayFilter::new(500, 1e-6);
        for i in 0..1000 {
            f.check_and_insert(&tag(i));
        }
        f.save(&path).unwrap();
        let loaded = ReplayFilter::load(&path, 500, 1e-6).unwrap();
        assert_eq!(loaded.stages.read().len(), 3);
        assert_eq!(loaded.inserted(), 1000);
        for i in 0..1000 {
            assert!(!loaded.check_and_insert(&tag(i)), "tag {i} forgotten");
        }
        assert!(loaded.check_and_insert(&tag(5000)));
        // Another sizing is refused rather than misread.
        assert!(matches!(
            ReplayFilter::load(&path, 60_000, 1e-6),
            Err(ReplayFileError::Mismatch(_))
        ));
        // A truncated file is an error, not a half-empty filter.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(ReplayFilter::load(&path, 500, 1e-6).is_err());
    }

    #[test]
    fn concurrent_duplicates_pass_exactly_once() {
        let f = std::sync::Arc::new(ReplayFilter::new(100_000, 1e-9));
        let passes: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let f = f.clone();
                    scope
                        .spawn(move || (0..10_000).filter(|i| f.check_and_insert(&tag(*i))).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passes, 10_000);
    }
}
