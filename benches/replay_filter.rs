//! The replay filter at the node's sizing: memory per key epoch at the stated rates, the
//! false-positive rate measured (not modelled) once a stage is full, and the cost of a
//! check-and-insert beside the Diffie-Hellman every packet already pays (the floor).
//!
//!   cargo bench --bench replay_filter

use std::time::{Duration, Instant};

use nym_node::mixnet::replay::ReplayFilter;
use sha2::Digest;

fn tag(i: u64) -> [u8; 32] {
    sha2::Sha256::digest(i.to_le_bytes()).into()
}

fn main() {
    // Memory of one epoch's filter with the defaults (1 h epochs, 2 min overlap, 1 in 10^6).
    let epoch = Duration::from_secs(3600 + 120);
    println!("replay filter per key epoch (1 h + 2 min overlap, false positives 1 in 10^6):");
    for rate in [2_000u64, 10_000, 20_000] {
        let f = ReplayFilter::new(rate * epoch.as_secs(), 1e-6);
        println!(
            "  {rate:>6} packets/s: {:>7.1} MB ({:.2} bytes a packet)",
            f.size_bytes() as f64 / 1e6,
            f.size_bytes() as f64 / (rate * epoch.as_secs()) as f64
        );
    }

    // Measured false positives of a full stage: new tags wrongly seen as replays.
    for (n, p, trials) in [
        (1_000_000u64, 1e-6, 50_000_000u64),
        (1_000_000, 1e-4, 5_000_000),
    ] {
        let f = ReplayFilter::new(n, p);
        for i in 0..n {
            f.check_and_insert(&tag(i));
        }
        let hits = (n..n + trials).filter(|i| f.contains(&tag(*i))).count();
        println!(
            "  full stage of {n} at target {p:e}: {hits} false positives in {trials} new tags = {:.2e} (model {:.2e})",
            hits as f64 / trials as f64,
            f.false_positive_rate()
        );
    }

    // Cost per packet against the floor: one x25519 Diffie-Hellman.
    let n = 1_000_000u64;
    let f = ReplayFilter::new(10_000 * epoch.as_secs(), 1e-6);
    let tags: Vec<[u8; 32]> = (0..n).map(|i| tag(i + 1_000_000_000)).collect();
    let start = Instant::now();
    for t in &tags {
        std::hint::black_box(f.contains(t));
        std::hint::black_box(f.check_and_insert(t));
    }
    let filter = start.elapsed() / n as u32;
    let secret = x25519_dalek::StaticSecret::from([7u8; 32]);
    let public = x25519_dalek::PublicKey::from([9u8; 32]);
    let rounds = 20_000u32;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(secret.diffie_hellman(std::hint::black_box(&public)));
    }
    let dh = start.elapsed() / rounds;
    println!(
        "  check + insert at 10,000/s sizing: {filter:?} a packet; one x25519 DH (floor): {dh:?} ({:.1}% of it)",
        filter.as_secs_f64() / dh.as_secs_f64() * 100.0
    );
}
