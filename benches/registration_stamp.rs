//! The registration stamp's price: what a client pays once per gateway (2^bits SHA-256
//! hashes on average, measured by making stamps) and what the gateway pays to check one,
//! beside the ed25519 signature check every session already costs (the floor).
//!
//!   cargo bench --bench registration_stamp

use std::time::Instant;

use nym_node::gateway::stamp;
use nym_node::keys::{Identity, KeyBytes, verify_signature};

fn main() {
    let rate = stamp::hash_rate(1 << 22);
    println!(
        "stamp hashes on this machine: {:.1} M/s (one core)",
        rate / 1e6
    );
    println!("making a stamp (expected 2^bits / rate; measured, mean of the runs):");
    let gateway = KeyBytes([7; 32]);
    for (bits, runs) in [(16u8, 32u64), (18, 16), (20, 8), (22, 8), (24, 4)] {
        let started = Instant::now();
        for run in 0..runs {
            let mut client = [0u8; 32];
            client[..8].copy_from_slice(&run.to_be_bytes());
            std::hint::black_box(stamp::make(&gateway, &KeyBytes(client), bits, 0));
        }
        let measured = started.elapsed().as_secs_f64() / runs as f64;
        let expected = 2f64.powi(i32::from(bits)) / rate;
        println!(
            "  {bits} bits: expected {:>8.1} ms, measured {:>8.1} ms{}",
            expected * 1e3,
            measured * 1e3,
            if bits == 22 { "  <- the default" } else { "" }
        );
    }

    // What the gateway pays per session: one hash for the stamp beside the signature check.
    let identity = Identity::generate().expect("randomness");
    let client = identity.public();
    let nonce = stamp::make(&gateway, &client, 12, 0);
    let message = b"handshake hash of the channel....";
    let signature = identity.sign(message);
    const CHECKS: u32 = 20_000;
    let started = Instant::now();
    for _ in 0..CHECKS {
        assert!(stamp::verify(
            &gateway,
            &client,
            std::hint::black_box(nonce),
            12
        ));
    }
    let stamp_check = started.elapsed().as_secs_f64() / f64::from(CHECKS);
    let started = Instant::now();
    for _ in 0..CHECKS {
        assert!(verify_signature(
            &client,
            std::hint::black_box(message),
            &signature
        ));
    }
    let signature_check = started.elapsed().as_secs_f64() / f64::from(CHECKS);
    println!(
        "gateway, per session: stamp check {:.2} us, ed25519 signature check (floor) {:.2} us",
        stamp_check * 1e6,
        signature_check * 1e6
    );
}
