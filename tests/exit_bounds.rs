//! Memory the exit's stores take when strangers fill them with made-up sender tags: measured
//! as this process's resident memory, in a test binary of its own so no other test's
//! allocations run beside it.

use std::time::Duration;

use nym_node::client::packet::build_surb;
use nym_node::client::route::Hop;
use nym_node::client::surbs::{SurbLimits, SurbStore};
use nym_node::keys::{EpochKey, KeyBytes};
use nym_node::mixnet::sphinx::IDENTIFIER_SIZE;

/// Resident memory of this process, from /proc (Linux).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
fn a_full_reply_surb_store_of_made_up_tags_stays_within_its_memory() {
    let total = SurbLimits::default().total;
    // The exit's store (in memory) at its default bound.
    let store = SurbStore::open(None, SurbLimits::default()).unwrap();
    // A real SURB: three mixes and a gateway, as a client's reply SURB.
    let hop = Hop {
        identity: KeyBytes([9; 32]),
        sphinx_keys: vec![EpochKey::always(KeyBytes([9; 32]))],
    };
    let (surb, _) = build_surb(
        &vec![hop; 4],
        &KeyBytes([3; 32]),
        [5; IDENTIFIER_SIZE],
        &[Duration::ZERO; 4],
    )
    .unwrap();
    let before = resident_bytes();
    // Twice the bound in made-up tags (five SURBs each), then six times, twice: the store's
    // memory settles after the first churn and stays there.
    let mut grown = Vec::new();
    for (round, fills) in [(1u8, 2u32), (2, 6), (3, 6)] {
        for i in 0..(total as u32 / 5) * fills {
            let mut tag = [0u8; 16];
            tag[..4].copy_from_slice(&i.to_be_bytes());
            tag[4] = round;
            store.add_received(&tag, &vec![surb.clone(); 5]).unwrap();
        }
        assert_eq!(store.received_total().unwrap(), total as u64);
        let now = resident_bytes().saturating_sub(before);
        eprintln!(
            "{total} SURBs of {} B held after round {round} ({} added): resident memory grew {:.1} MB",
            surb.len(),
            total * fills as usize,
            now as f64 / 1e6
        );
        grown.push(now);
    }
    assert!(
        grown[2] <= grown[1] + grown[1] / 10,
        "still growing under churn: {grown:?}"
    );
    assert!(grown[2] < 192 << 20, "{grown:?}");
}
