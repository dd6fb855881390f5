//! The replay filter: remembers the replay tag of every Sphinx packet this node has
//! unwrapped, so a second copy of a packet is dropped.
//!
//! Memory is bounded: the filter keeps two generations of tags, and when the current one
//! reaches its capacity the older one is forgotten. A replay is caught as long as the
//! original is among the last `capacity` to `2 x capacity` packets (at 20k packets/s and
//! the default 2M, 100 to 200 seconds). Tags are stored as 64-bit fingerprints: the replay
//! tag is a hash output, so two different packets collide with probability about
//! `2 x capacity / 2^64`, never in practice.
//!
//! There is no global lock: the filter is split into shards by tag, each with its own
//! mutex, so Sphinx workers on different cores rarely meet.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use parking_lot::Mutex;

const SHARDS: usize = 64;

/// The tag is already uniformly random, so its first 8 bytes are a perfect hash.
#[derive(Default)]
struct Fingerprint(u64);

impl Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type TagSet = HashSet<u64, BuildHasherDefault<Fingerprint>>;

struct Shard {
    current: TagSet,
    previous: TagSet,
}

pub struct ReplayFilter {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl ReplayFilter {
    /// A filter that remembers at least `capacity` and at most `2 x capacity` recent tags.
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(16);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    current: TagSet::with_capacity_and_hasher(per_shard, Default::default()),
                    previous: TagSet::with_capacity_and_hasher(per_shard, Default::default()),
                })
            })
            .collect();
        ReplayFilter { shards, per_shard }
    }

    fn locate(tag: &[u8; 32]) -> (usize, u64) {
        let fingerprint = u64::from_le_bytes([
            tag[0], tag[1], tag[2], tag[3], tag[4], tag[5], tag[6], tag[7],
        ]);
        // Shard by other bits than the ones the set hashes on.
        let shard = usize::from(u16::from_le_bytes([tag[8], tag[9]])) % SHARDS;
        (shard, fingerprint)
    }

    /// True if `tag` was recorded before (without recording it).
    pub fn contains(&self, tag: &[u8; 32]) -> bool {
        let (shard, fingerprint) = Self::locate(tag);
        let s = self.shards[shard].lock();
        s.current.contains(&fingerprint) || s.previous.contains(&fingerprint)
    }

    /// Records `tag`; returns `true` if it is new and `false` if it was seen before.
    pub fn check_and_insert(&self, tag: &[u8; 32]) -> bool {
        let (shard, fingerprint) = Self::locate(tag);
        let mut s = self.shards[shard].lock();
        if s.previous.contains(&fingerprint) {
            return false;
        }
        if !s.current.insert(fingerprint) {
            return false;
        }
        if s.current.len() >= self.per_shard {
            // Rotate: forget the oldest generation, keeping its allocation for reuse.
            let shard = &mut *s;
            std::mem::swap(&mut shard.current, &mut shard.previous);
            shard.current.clear();
        }
        true
    }

    /// Tags currently remembered.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.current.len() + s.previous.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u64) -> [u8; 32] {
        // Spread the counter over the whole tag the way a hash would.
        let mut t = [0u8; 32];
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        t[..8].copy_from_slice(&x.to_le_bytes());
        t[8..16].copy_from_slice(&x.rotate_left(29).to_le_bytes());
        t
    }

    #[test]
    fn second_sighting_is_a_replay() {
        let f = ReplayFilter::new(10_000);
        assert!(f.check_and_insert(&tag(1)));
        assert!(f.check_and_insert(&tag(2)));
        assert!(!f.check_and_insert(&tag(1)));
        assert!(!f.check_and_insert(&tag(2)));
    }

    #[test]
    fn memory_is_bounded_and_recent_tags_are_kept() {
        let capacity = 4096;
        let f = ReplayFilter::new(capacity);
        for i in 0..100_000 {
            assert!(f.check_and_insert(&tag(i)));
        }
        assert!(f.len() <= 2 * capacity + SHARDS, "len {}", f.len());
        // The most recent `capacity` tags are all still caught.
        for i in (100_000 - capacity as u64 / 2)..100_000 {
            assert!(!f.check_and_insert(&tag(i)), "recent tag {i} forgotten");
        }
        // Long-forgotten tags are accepted again (bounded memory has a window).
        assert!(f.check_and_insert(&tag(0)));
    }

    #[test]
    fn concurrent_duplicates_pass_exactly_once() {
        let f = std::sync::Arc::new(ReplayFilter::new(100_000));
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
