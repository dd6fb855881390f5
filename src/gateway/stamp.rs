//! Registration stamps: the proof of work a client pays once to become one of a gateway's
//! own clients (see `docs/protocol.md` §5).
//!
//! A stamp for client `C` at gateway `G` is a nonce `n` such that
//! `SHA-256("nym-node-rs/registration-stamp/1" || G || C || n)` starts with at least
//! `NYM_NODE_REGISTRATION_STAMP_BITS` zero bits. Making one takes 2^bits hashes on average;
//! checking one takes a single hash. It binds both identities, so it buys a registration at
//! one gateway for one identity: a thousand made-up identities cost a thousand stamps. It
//! does not expire, so a client makes it once per gateway and keeps it.

use ring::digest::{Context, SHA256};

use crate::keys::{KeyBytes, NodeId};

const CONTEXT: &[u8] = b"nym-node-rs/registration-stamp/1";

/// Most bits a client agrees to work for (2^28 hashes: about 15 s of a desktop core, a few
/// minutes of a phone's): past this a gateway asks for hours of CPU, which is a broken or
/// hostile gateway, not a price.
pub const MAX_BITS: u8 = 28;

/// The hash state after the context and both identities, shared by every nonce tried.
fn prefix(gateway: &NodeId, client: &KeyBytes) -> Context {
    let mut h = Context::new(&SHA256);
    h.update(CONTEXT);
    h.update(gateway.as_bytes());
    h.update(client.as_bytes());
    h
}

fn leading_zeros(hash: &[u8]) -> u32 {
    let mut n = 0;
    for byte in hash {
        if *byte != 0 {
            return n + byte.leading_zeros();
        }
        n += 8;
    }
    n
}

fn meets(prefix: &Context, nonce: u64, bits: u8) -> bool {
    let mut h = prefix.clone();
    h.update(&nonce.to_be_bytes());
    leading_zeros(h.finish().as_ref()) >= u32::from(bits)
}

/// Whether `nonce` is a stamp of `bits` for `client` at `gateway`.
pub fn verify(gateway: &NodeId, client: &KeyBytes, nonce: u64, bits: u8) -> bool {
    meets(&prefix(gateway, client), nonce, bits)
}

/// Makes a stamp of `bits` for `client` at `gateway`, searching from `start` (a random start
/// keeps two searches for the same pair from doing the same work). Blocks for about
/// 2^bits hashes: run it off the async runtime.
pub fn make(gateway: &NodeId, client: &KeyBytes, bits: u8, start: u64) -> u64 {
    let prefix = prefix(gateway, client);
    let mut nonce = start;
    while !meets(&prefix, nonce, bits) {
        nonce = nonce.wrapping_add(1);
    }
    nonce
}

/// Hashes per second this machine tries, measured over `hashes` tries: with 2^bits it
/// gives a stamp's expected cost here.
pub fn hash_rate(hashes: u64) -> f64 {
    let prefix = prefix(&KeyBytes([1; 32]), &KeyBytes([2; 32]));
    let started = std::time::Instant::now();
    let mut found = 0u64;
    for nonce in 0..hashes {
        found += u64::from(meets(&prefix, nonce, 8));
    }
    std::hint::black_box(found);
    hashes as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_verifies_for_its_pair_and_bits_only() {
        let (g, c) = (KeyBytes([7; 32]), KeyBytes([8; 32]));
        let nonce = make(&g, &c, 12, 0);
        assert!(verify(&g, &c, nonce, 12));
        assert!(verify(&g, &c, nonce, 0));
        assert!(
            !verify(&KeyBytes([6; 32]), &c, nonce, 12),
            "another gateway"
        );
        assert!(!verify(&g, &KeyBytes([9; 32]), nonce, 12), "another client");
        // Twelve bits are met by about one nonce in 4096: most neighbours fail.
        let neighbours = (1..=64)
            .filter(|d| verify(&g, &c, nonce.wrapping_add(*d), 12))
            .count();
        assert!(neighbours < 8, "{neighbours} of 64 neighbours met 12 bits");
    }

    #[test]
    fn the_hash_is_plain_sha256_of_the_documented_input() {
        use sha2::Digest;
        let (g, c, nonce) = (
            KeyBytes([1; 32]),
            KeyBytes([2; 32]),
            0x0102_0304_0506_0708u64,
        );
        let mut input = CONTEXT.to_vec();
        input.extend_from_slice(g.as_bytes());
        input.extend_from_slice(c.as_bytes());
        input.extend_from_slice(&nonce.to_be_bytes());
        let mut h = prefix(&g, &c);
        h.update(&nonce.to_be_bytes());
        assert_eq!(h.finish().as_ref(), sha2::Sha256::digest(&input).as_slice());
    }

    #[test]
    fn leading_zero_bits_are_counted_across_bytes() {
        assert_eq!(leading_zeros(&[0x80]), 0);
        assert_eq!(leading_zeros(&[0x00, 0x01]), 15);
        assert_eq!(leading_zeros(&[0, 0]), 16);
    }
}
