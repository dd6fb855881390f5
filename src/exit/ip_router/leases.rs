//! Who holds which of the IP packet router's addresses, and how fast each may send.
//!
//! A client is only its sender tag, and tags are free to make up, so every bound here
//! holds whatever the tags:
//! - one lease (an IPv4 and an IPv6 address with the same index in their pools) per tag;
//! - at most `max` leases in all; when full, a newcomer takes the lease of the client
//!   silent longest if it has been silent [`MIN_SILENCE_TO_TAKE`], else it is refused;
//! - new leases at [`CONNECT_RATE`] a second (bursts of [`CONNECT_BURST`]) in all, so
//!   strangers cycling tags cannot churn the pool;
//! - a lease with no message from its client for `idle` returns to the pool;
//! - each lease's packets and bytes, each way, go through token buckets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use rand::RngExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::SenderTag;
use crate::config::{Ipv4Pool, Ipv6Pool};
use crate::gateway::rate_limit::TokenBucket;
use crate::ip_tunnel::RefusedReason;

/// New leases a second, across all tags.
pub const CONNECT_RATE: u32 = 20;
pub const CONNECT_BURST: u32 = 100;
/// A full pool takes back the lease of a client silent at least this long: three
/// keep-alive intervals, so an honest client's jitter never costs it its addresses.
pub const MIN_SILENCE_TO_TAKE: Duration = Duration::from_secs(90);
/// A freed address is not leased again for this long while others are free, so the
/// kernel's connection tracking of its last holder (answers still on their way, NAT
/// entries) has lapsed before someone else holds it.
pub const QUARANTINE: Duration = Duration::from_secs(600);

/// The limits a lease is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_clients: usize,
    pub idle: Duration,
    pub packet_rate: u32,
    pub byte_rate: u32,
}

/// What flows to one client: answers from the internet, and the router's own messages.
#[derive(Debug)]
pub enum Down {
    Packet(Vec<u8>),
    Message(Vec<u8>),
}

/// One way of one lease: packets and bytes a second.
struct Rate {
    packets: TokenBucket,
    bytes: TokenBucket,
}

impl Rate {
    fn new(limits: &Limits) -> Self {
        Rate {
            packets: TokenBucket::new(limits.packet_rate, limits.packet_rate.saturating_mul(2)),
            bytes: TokenBucket::new(limits.byte_rate, limits.byte_rate.saturating_mul(2)),
        }
    }

    fn allow(&mut self, bytes: usize) -> bool {
        self.packets.take() && self.bytes.take_n(u32::try_from(bytes).unwrap_or(u32::MAX))
    }
}

struct Held {
    index: u32,
    seen: Instant,
    up: Rate,
    down: Rate,
    /// Towards the client's downstream task.
    tx: mpsc::Sender<Down>,
}

/// The addresses a lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// What [`Leases::connect`] did.
#[derive(Debug)]
pub enum Connected {
    /// A new lease: its downstream task takes from `rx`.
    New(Addresses, mpsc::Receiver<Down>),
    /// The tag already held this one.
    Again(Addresses),
}

pub struct Leases {
    v4: Ipv4Pool,
    v6: Ipv6Pool,
    limits: Limits,
    /// Client indexes run from 2 (the network's address is 0, the router's 1) to `last`.
    last: u32,
    by_tag: HashMap<SenderTag, Held>,
    by_index: HashMap<u32, SenderTag>,
    /// Freed indexes and when (at most one entry per index of the pool).
    freed: HashMap<u32, Instant>,
    connects: TokenBucket,
    queue: usize,
}

impl Leases {
    /// `queue`: answers waiting for one client's downstream task at most.
    pub fn new(v4: Ipv4Pool, v6: Ipv6Pool, limits: Limits, queue: usize) -> Self {
        let addresses = v4.client_addresses().min(v6.client_addresses());
        let limits = Limits {
            max_clients: limits
                .max_clients
                .min(usize::try_from(addresses).unwrap_or(usize::MAX)),
            ..limits
        };
        Leases {
            v4,
            v6,
            limits,
            last: u32::try_from(addresses + 1).unwrap_or(u32::MAX),
            by_tag: HashMap::new(),
            by_index: HashMap::new(),
            freed: HashMap::new(),
            connects: TokenBucket::new(CONNECT_RATE, CONNECT_BURST),
            queue,
        }
    }

    /// The router's own addresses (index 1 of each pool).
    pub fn router_addresses(&self) -> Addresses {
        self.addresses(1)
    }

    fn addresses(&self, index: u32) -> Addresses {
        Addresses {
            ipv4: self.v4.nth(index),
            ipv6: self.v6.nth(index),
        }
    }

    pub fn len(&self) -> usize {
        self.by_tag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tag.is_empty()
    }

    /// Leases `tag` its addresses: the ones it holds, or new ones.
    pub fn connect(&mut self, tag: SenderTag, now: Instant) -> Result<Connected, RefusedReason> {
        if let Some(held) = self.by_tag.get_mut(&tag) {
            held.seen = now;
            let index = held.index;
            return Ok(Connected::Again(self.addresses(index)));
        }
        if self.by_tag.len() >= self.limits.max_clients && !self.take_back_silent(now) {
            return Err(RefusedReason::PoolFull);
        }
        if !self.connects.take() {
            return Err(RefusedReason::Busy);
        }
        let index = self.free_index(now);
        let (tx, rx) = mpsc::channel(self.queue);
        self.by_tag.insert(
            tag,
            Held {
                index,
                seen: now,
                up: Rate::new(&self.limits),
                down: Rate::new(&self.limits),
                tx,
            },
        );
        self.by_index.insert(index, tag);
        Ok(Connected::New(self.addresses(index), rx))
    }

    /// Frees the lease of the client silent longest, if it was silent long enough.
    fn take_back_silent(&mut self, now: Instant) -> bool {
        let oldest = self
            .by_tag
            .iter()
            .min_by_key(|(_, h)| h.seen)
            .filter(|(_, h)| now.saturating_duration_since(h.seen) >= MIN_SILENCE_TO_TAKE)
            .map(|(tag, _)| *tag);
        oldest.is_some_and(|tag| self.release(&tag))
    }

    /// A random free index, so addresses say nothing of how many clients came before; one
    /// out of quarantine when there is one.
    fn free_index(&mut self, now: Instant) -> u32 {
        self.freed
            .retain(|_, at| now.saturating_duration_since(*at) < QUARANTINE);
        let span = self.last - 1;
        let start = rand::rng().random_range(0..span);
        let free = |i: &u32| !self.by_index.contains_key(i);
        let candidates = || (0..span).map(|i| 2 + (start + i) % span);
        candidates()
            .find(|i| free(i) && !self.freed.contains_key(i))
            .or_else(|| candidates().find(free))
            // connect checked there is room: max_clients ≤ the pool's client addresses.
            .unwrap_or(2)
    }

    /// The client's lease, marked seen now; `None` without one.
    pub fn touch(&mut self, tag: &SenderTag, now: Instant) -> Option<Addresses> {
        let held = self.by_tag.get_mut(tag)?;
        held.seen = now;
        let index = held.index;
        Some(self.addresses(index))
    }

    /// Whether the client may send a packet of `bytes` now.
    pub fn allow_up(&mut self, tag: &SenderTag, bytes: usize) -> bool {
        self.by_tag.get_mut(tag).is_some_and(|h| h.up.allow(bytes))
    }

    /// Where an answer for `destination` goes: the owning client's downstream queue, if the
    /// client holds that address and is within its rate. `Err` carries the refusal reason.
    pub fn route_down(
        &mut self,
        destination: IpAddr,
        bytes: usize,
    ) -> Result<&mpsc::Sender<Down>, &'static str> {
        let index = match destination {
            IpAddr::V4(ip) if self.v4.contains(ip) => u32::from(ip) - u32::from(self.v4.network),
            IpAddr::V6(ip) if self.v6.contains(ip) => {
                u32::try_from(u128::from(ip) - u128::from(self.v6.network)).unwrap_or(0)
            }
            _ => return Err("unknown_destination"),
        };
        let tag = self.by_index.get(&index).ok_or("unknown_destination")?;
        let held = self.by_tag.get_mut(tag).ok_or("unknown_destination")?;
        if !held.down.allow(bytes) {
            return Err("rate_limited");
        }
        Ok(&held.tx)
    }

    /// The client's downstream queue (for the router's own messages to it).
    pub fn downstream(&self, tag: &SenderTag) -> Option<&mpsc::Sender<Down>> {
        self.by_tag.get(tag).map(|h| &h.tx)
    }

    /// Returns the client's addresses to the pool; false when it held none.
    pub fn release(&mut self, tag: &SenderTag) -> bool {
        match self.by_tag.remove(tag) {
            Some(held) => {
                self.by_index.remove(&held.index);
                self.freed.insert(held.index, Instant::now());
                true
            }
            None => false,
        }
    }

    /// Returns every lease to the pool (the session they were made in has ended).
    pub fn clear(&mut self) {
        self.by_tag.clear();
        self.by_index.clear();
    }

    /// Returns to the pool the leases of clients silent for the idle time; how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let idle = self.limits.idle;
        let silent: Vec<SenderTag> = self
            .by_tag
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.seen) >= idle)
            .map(|(tag, _)| *tag)
            .collect();
        silent.iter().filter(|tag| self.release(tag)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(max_clients: usize, v4_prefix: u8) -> Leases {
        Leases::new(
            Ipv4Pool {
                network: "10.64.0.0".parse().unwrap(),
                prefix: v4_prefix,
            },
            Ipv6Pool {
                network: "fd6e:796d:6970::".parse().unwrap(),
                prefix: 112,
            },
            Limits {
                max_clients,
                idle: Duration::from_secs(180),
                packet_rate: 10,
                byte_rate: 3000,
            },
            4,
        )
    }

    fn tag(n: u8) -> SenderTag {
        [n; 16]
    }

    fn addresses(c: Connected) -> Addresses {
        match c {
            Connected::New(a, _) | Connected::Again(a) => a,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_keeps_its_addresses_and_gets_the_same_again() {
        let mut l = leases(10, 24);
        let now = Instant::now();
        let first = addresses(l.connect(tag(1), now).unwrap());
        assert!(matches!(l.connect(tag(1), now), Ok(Connected::Again(a)) if a == first));
        assert_eq!(l.len(), 1);
        // Both addresses share one index, past the router's own.
        let index = u32::from(first.ipv4) - u32::from(Ipv4Addr::new(10, 64, 0, 0));
        assert!(index >= 2);
        assert_eq!(u128::from(first.ipv6) & 0xffff, u128::from(index));
        assert_eq!(l.router_addresses().ipv4, Ipv4Addr::new(10, 64, 0, 1));
        assert!(l.route_down(first.ipv4.into(), 100).is_ok());
        assert!(l.route_down(first.ipv6.into(), 100).is_ok());
        let other = if first.ipv4.octets()[3] == 200 {
            "10.64.0.201"
        } else {
            "10.64.0.200"
        };
        assert_eq!(
            l.route_down(other.parse().unwrap(), 100).err(),
            Some("unknown_destination")
        );
        assert_eq!(
            l.route_down("198.51.100.1".parse().unwrap(), 100).err(),
            Some("unknown_destination")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn random_tags_cannot_take_more_than_the_bound_and_silent_leases_go_back() {
        // A /29 holds 5 client addresses (8 less the network's, the router's and the last).
        let mut l = leases(100, 29);
        let mut held = Vec::new();
        for n in 0..5 {
            held.push(addresses(l.connect(tag(n), Instant::now()).unwrap()));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let now = Instant::now();
        let distinct: std::collections::HashSet<_> = held.iter().map(|a| a.ipv4).collect();
        assert_eq!(distinct.len(), 5);
        assert!(
            held.iter().all(|a| a.ipv4 != Ipv4Addr::new(10, 64, 0, 7)),
            "never the last"
        );
        assert!(matches!(
            l.connect(tag(9), now),
            Err(RefusedReason::PoolFull)
        ));
        // A minute's silence: the silent longest makes room.
        tokio::time::advance(MIN_SILENCE_TO_TAKE).await;
        l.touch(&tag(1), Instant::now());
        assert!(matches!(
            l.connect(tag(9), Instant::now()),
            Ok(Connected::New(..))
        ));
        assert!(
            l.touch(&tag(0), Instant::now()).is_none(),
            "tag 0 was silent longest"
        );
        // The idle time returns the rest.
        tokio::time::advance(Duration::from_secs(181)).await;
        assert_eq!(l.expire(Instant::now()), 5);
        assert!(l.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_address_rests_before_anyone_else_gets_it_while_others_are_free() {
        // A /29: five client addresses.
        let mut l = leases(100, 29);
        let first = addresses(l.connect(tag(0), Instant::now()).unwrap());
        assert!(l.release(&tag(0)));
        // The next four take the other four, never the one just freed.
        let mut held = Vec::new();
        for n in 1..5 {
            let a = addresses(l.connect(tag(n), Instant::now()).unwrap());
            assert_ne!(a.ipv4, first.ipv4, "tag {n} got the resting address");
            held.push(a.ipv4);
        }
        // With nothing else free it is leased again rather than refusing anyone.
        assert_eq!(
            addresses(l.connect(tag(5), Instant::now()).unwrap()).ipv4,
            first.ipv4
        );
        // One address rested its ten minutes, another was just freed: the rested one goes.
        l.release(&tag(1));
        tokio::time::advance(QUARANTINE).await;
        l.release(&tag(2));
        let next = addresses(l.connect(tag(6), Instant::now()).unwrap());
        assert_eq!(next.ipv4, held[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn new_leases_are_rate_bounded_in_all() {
        let mut l = leases(1000, 16);
        let now = Instant::now();
        let taken = (0..200u16)
            .filter(|n| {
                let mut t = [0u8; 16];
                t[..2].copy_from_slice(&n.to_be_bytes());
                l.connect(t, now).is_ok()
            })
            .count();
        assert_eq!(taken, CONNECT_BURST as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn each_way_is_held_to_its_packet_and_byte_rates() {
        let mut l = leases(10, 24);
        let a = addresses(l.connect(tag(1), Instant::now()).unwrap());
        // Bursts of two seconds: 20 packets, 6000 bytes.
        assert_eq!((0..30).filter(|_| l.allow_up(&tag(1), 100)).count(), 20);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!((0..30).filter(|_| l.allow_up(&tag(1), 1000)).count(), 6);
        assert_eq!(
            (0..30)
                .filter(|_| l.route_down(a.ipv4.into(), 100).is_ok())
                .count(),
            20
        );
        assert!(!l.allow_up(&tag(2), 1), "no lease, no sending");
    }
}
