//! Who may hold a place in a listener's handshake (the mixnet's, and the client API's until
//! a client authenticates), decided from what costs an attacker something rather than from
//! arrival order.
//!
//! ```text
//!  accepted ──► silent, or arrived (a whole first message was already waiting at accept):
//!               nothing proven. Up to a capacity in all (mixnet:
//!               NYM_NODE_MAX_PENDING_HANDSHAKES; clients: NYM_NODE_CLIENT_MAX_PENDING_SESSIONS);
//!               when full, the
//!               OLDEST silent connection is closed to admit the newest, else the oldest
//!               arrived one (a flood of silent or trickling connections churns itself, and a
//!               peer that greets at once is not refused). The mixnet closes one whose first
//!               message is not complete within NYM_NODE_HANDSHAKE_FIRST_MESSAGE_TIMEOUT.
//!     │ a valid first Noise message (it costs the sender a Diffie-Hellman)
//!     ▼
//!  greeted: when every place is greeted, a newcomer closes the oldest greeted one.
//!           At most a number per address group (an IPv4 address, an IPv6 /64; mixnet:
//!           NYM_NODE_MAX_HANDSHAKES_PER_ADDRESS; clients: NYM_NODE_CLIENT_MAX_PENDING_PER_ADDRESS);
//!           a newer one from a full group closes that group's oldest.
//!           Never closed for silent newcomers. Done at the end of the handshake.
//! ```
//!
//! A real peer sends its first message the moment its connect completes, so by the time it
//! is accepted its message is usually waiting (arrived), and it leaves the pool's reach as
//! soon as its task reads it; silent and trickling connections are always closed first.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::metrics::RefusalReason;

/// Counts a connection closed or refused by the admission (into the metric of its listener).
pub type Count = Arc<dyn Fn(RefusalReason) + Send + Sync>;

/// Addresses one party can hold many of cheaply count as one: an IPv4 address, an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressGroup {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl AddressGroup {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressGroup::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                AddressGroup::V6(prefix)
            }
        }
    }
}

/// Whether a connection's whole first message is waiting in its socket (a peek).
pub type Waiting = Box<dyn Fn() -> bool + Send>;

struct Entry {
    group: AddressGroup,
    close: CancellationToken,
    waiting: Option<Waiting>,
}

/// Silent connections looked at (their sockets peeked) per eviction, oldest first.
const EVICTION_CHECKS: usize = 16;

#[derive(Default)]
struct Pool {
    next: u64,
    /// By arrival: the smallest id is the oldest.
    silent: BTreeMap<u64, Entry>,
    arrived: BTreeMap<u64, Entry>,
    greeted: BTreeMap<u64, Entry>,
    greeted_per_group: HashMap<AddressGroup, usize>,
}

/// The connections in their handshake.
pub struct Admission {
    pool: parking_lot::Mutex<Pool>,
    capacity: usize,
    per_group: usize,
    count: Count,
}

/// A connection's place; given back however its handshake ends. `closed()` fires when the
/// connection lost its place to a newer one.
pub struct Place {
    admission: Arc<Admission>,
    id: u64,
    close: CancellationToken,
}

impl Admission {
    pub fn new(capacity: usize, per_group: usize, count: Count) -> Arc<Self> {
        Arc::new(Admission {
            pool: parking_lot::Mutex::new(Pool::default()),
            capacity: capacity.max(1),
            per_group: per_group.max(1),
            count,
        })
    }

    /// A new connection from `ip` (`waiting` peeks whether its whole first message is in its
    /// socket): admitted, closing another if the pool is full (see `make_room`).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, waiting: Option<Waiting>) -> Place {
        let arrived = waiting.as_ref().is_some_and(|w| w());
        let mut pool = self.pool.lock();
        if pool.silent.len() + pool.arrived.len() + pool.greeted.len() >= self.capacity {
            self.make_room(&mut pool);
        }
        let id = pool.next;
        pool.next += 1;
        let close = CancellationToken::new();
        let entry = Entry {
            group: AddressGroup::of(ip),
            close: close.clone(),
            waiting,
        };
        if arrived {
            pool.arrived.insert(id, entry);
        } else {
            pool.silent.insert(id, entry);
        }
        Place {
            admission: self.clone(),
            id,
            close,
        }
    }

    /// Closes one connection: the oldest silent one whose first message has not come since
    /// (those whose has are moved to arrived: their task may just not have run yet), else
    /// the oldest arrived, else the oldest greeted (rather than refusing the newcomer, so a
    /// flood of first messages is a race, not a lockout).
    fn make_room(&self, pool: &mut Pool) {
        for _ in 0..EVICTION_CHECKS {
            let Some((id, entry)) = pool.silent.pop_first() else {
                break;
            };
            if entry.waiting.as_ref().is_some_and(|w| w()) {
                pool.arrived.insert(id, entry);
                continue;
            }
            entry.close.cancel();
            (self.count)(RefusalReason::Evicted);
            return;
        }
        if let Some((_, oldest)) = pool.silent.pop_first().or_else(|| pool.arrived.pop_first()) {
            oldest.close.cancel();
            (self.count)(RefusalReason::Evicted);
        } else if let Some((_, oldest)) = pool.greeted.pop_first() {
            oldest.close.cancel();
            Self::count_down(pool, oldest.group);
            (self.count)(RefusalReason::Handshakes);
        }
    }

    fn greet(&self, id: u64) {
        let mut pool = self.pool.lock();
        let Some(entry) = pool.silent.remove(&id).or_else(|| pool.arrived.remove(&id)) else {
            return;
        };
        let group = entry.group;
        let held = pool.greeted_per_group.get(&group).copied().unwrap_or(0);
        if held >= self.per_group {
            let oldest = pool
                .greeted
                .iter()
                .find(|(_, e)| e.group == group)
                .map(|(id, _)| *id);
            if let Some(old) = oldest.and_then(|id| pool.greeted.remove(&id)) {
                old.close.cancel();
                (self.count)(RefusalReason::PerAddress);
                Self::count_down(&mut pool, group);
            }
        }
        *pool.greeted_per_group.entry(group).or_default() += 1;
        pool.greeted.insert(id, entry);
    }

    fn release(&self, id: u64) {
        let mut pool = self.pool.lock();
        if pool.silent.remove(&id).is_some() || pool.arrived.remove(&id).is_some() {
            return;
        }
        if let Some(entry) = pool.greeted.remove(&id) {
            Self::count_down(&mut pool, entry.group);
        }
    }

    fn count_down(pool: &mut Pool, group: AddressGroup) {
        if let Some(n) = pool.greeted_per_group.get_mut(&group) {
            *n -= 1;
            if *n == 0 {
                pool.greeted_per_group.remove(&group);
            }
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let pool = self.pool.lock();
        (pool.silent.len() + pool.arrived.len(), pool.greeted.len())
    }
}

impl Place {
    /// The connection's first handshake message was valid: it leaves the silent stage.
    pub fn greeted(&self) {
        self.admission.greet(self.id);
    }

    /// Fires when a newer connection took this place.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// Cancelled when a newer connection took this place (for holders that cannot borrow).
    pub fn token(&self) -> CancellationToken {
        self.close.clone()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn counting(metrics: &Arc<Metrics>) -> Count {
        let m = metrics.clone();
        Arc::new(move |r| m.refused(r))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_pool_closes_its_oldest_silent_connection_for_a_newcomer() {
        let metrics = Metrics::new("mixnode");
        let a = Admission::new(3, 8, counting(&metrics));
        let flood: Vec<Place> = (0..3).map(|_| a.admit(ip("10.0.0.1"), None)).collect();
        let peer = a.admit(ip("10.0.0.1"), None);
        assert!(flood[0].close.is_cancelled(), "the oldest made room");
        assert!(!flood[1].close.is_cancelled() && !peer.close.is_cancelled());
        assert_eq!(metrics.refused_count(RefusalReason::Evicted), 1);
        // Once greeted, the peer is out of the flood's reach.
        peer.greeted();
        for _ in 0..10 {
            let _ = a.admit(ip("10.0.0.2"), None);
        }
        assert!(!peer.close.is_cancelled());
        drop(flood);
        assert_eq!(
            a.counts(),
            (0, 1),
            "places of dropped connections come back"
        );
    }

    #[test]
    fn silent_connections_go_before_those_whose_first_message_was_waiting() {
        let a = Admission::new(3, 8, counting(&Metrics::new("mixnode")));
        let peer = a.admit(ip("10.0.0.1"), Some(Box::new(|| true)));
        let silent: Vec<Place> = (0..2).map(|_| a.admit(ip("10.0.0.1"), None)).collect();
        let _next = a.admit(ip("10.0.0.1"), None);
        assert!(silent[0].close.is_cancelled() && !peer.close.is_cancelled());
        let _more = a.admit(ip("10.0.0.1"), None);
        let _more2 = a.admit(ip("10.0.0.1"), None);
        assert!(!peer.close.is_cancelled(), "silent ones keep going first");
        // Only arrived and greeted left: the oldest arrived goes.
        let held: Vec<Place> = (0..2)
            .map(|_| a.admit(ip("10.0.0.2"), Some(Box::new(|| true))))
            .collect();
        held.iter().for_each(Place::greeted);
        let _late = a.admit(ip("10.0.0.3"), Some(Box::new(|| true)));
        assert!(peer.close.is_cancelled());
    }

    #[test]
    fn a_silent_connection_whose_first_message_came_since_is_not_the_one_closed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let a = Admission::new(2, 8, counting(&Metrics::new("mixnode")));
        let came = Arc::new(AtomicBool::new(false));
        let peer = {
            let came = came.clone();
            a.admit(
                ip("10.0.0.1"),
                Some(Box::new(move || came.load(Ordering::Relaxed))),
            )
        };
        let flood = a.admit(ip("10.0.0.1"), Some(Box::new(|| false)));
        // The peer's message arrives; its task has not run yet when the next one comes.
        came.store(true, Ordering::Relaxed);
        let _next = a.admit(ip("10.0.0.1"), Some(Box::new(|| false)));
        assert!(!peer.close.is_cancelled() && flood.close.is_cancelled());
    }

    #[test]
    fn a_pool_of_greeted_connections_closes_its_oldest_for_a_newcomer() {
        let metrics = Metrics::new("mixnode");
        let a = Admission::new(2, 8, counting(&metrics));
        let held: Vec<Place> = (0..2).map(|_| a.admit(ip("10.0.0.1"), None)).collect();
        held.iter().for_each(Place::greeted);
        let newcomer = a.admit(ip("10.0.0.9"), None);
        assert!(held[0].close.is_cancelled() && !held[1].close.is_cancelled());
        assert_eq!(metrics.refused_count(RefusalReason::Handshakes), 1);
        newcomer.greeted();
        drop(held);
        assert_eq!(a.counts(), (0, 1));
    }

    #[test]
    fn greeted_connections_of_one_address_group_are_capped_oldest_first() {
        let metrics = Metrics::new("mixnode");
        let a = Admission::new(100, 2, counting(&metrics));
        // One /64: three addresses, one group.
        let places: Vec<Place> = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
            .iter()
            .map(|s| a.admit(ip(s), Some(Box::new(|| true))))
            .collect();
        places.iter().for_each(Place::greeted);
        assert!(places[0].close.is_cancelled());
        assert!(!places[2].close.is_cancelled());
        assert_eq!(metrics.refused_count(RefusalReason::PerAddress), 1);
        // Another /64 is another group.
        let other = a.admit(ip("2001:db8:0:1::1"), Some(Box::new(|| true)));
        other.greeted();
        assert!(!other.close.is_cancelled() && !places[1].close.is_cancelled());
        assert_eq!(
            AddressGroup::of(ip("::ffff:10.0.0.1")),
            AddressGroup::of(ip("10.0.0.1"))
        );
    }
}
