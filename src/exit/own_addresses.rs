//! The exit's own addresses, which `accept *:*` must never open: a service bound to all
//! interfaces but firewalled from outside answers a stream the exit opens to its own public
//! address over loopback.
//!
//! Listeners bind `0.0.0.0`, so they say nothing; the addresses come from the interfaces
//! (`getifaddrs`), the listeners bound to a specific address, and what the directory
//! publishes for this node (its entry's hosts, names resolved). Kept current: the
//! interfaces and the entry are read again whenever the topology changes and every minute.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::dns::Resolver;
use crate::keys::NodeId;
use crate::topology::{NodeEntry, TopologyHandle};

/// How often the interfaces are read again without a topology change.
const REFRESH: Duration = Duration::from_secs(60);

/// A shared, current set of the node's addresses.
#[derive(Clone, Default)]
pub struct OwnAddresses(Arc<ArcSwap<HashSet<IpAddr>>>);

impl From<HashSet<IpAddr>> for OwnAddresses {
    fn from(set: HashSet<IpAddr>) -> Self {
        OwnAddresses(Arc::new(ArcSwap::from_pointee(canonical_set(set))))
    }
}

impl std::fmt::Debug for OwnAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.load().iter()).finish()
    }
}

impl OwnAddresses {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.load().contains(&ip.to_canonical())
    }

    pub fn replace(&self, set: HashSet<IpAddr>) {
        self.0.store(Arc::new(canonical_set(set)));
    }

    pub fn snapshot(&self) -> HashSet<IpAddr> {
        self.0.load().as_ref().clone()
    }
}

fn canonical_set(set: HashSet<IpAddr>) -> HashSet<IpAddr> {
    set.into_iter().map(|ip| ip.to_canonical()).collect()
}

/// Every address of every interface of this host (empty if they cannot be read).
pub fn interface_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we only read and then free once
    // with freeifaddrs; every pointer is checked for null, and each address is read as the
    // sockaddr type its family says it is.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let addr = (*cursor).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(addr as *const libc::sockaddr_in);
                        out.insert(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(addr as *const libc::sockaddr_in6);
                        out.insert(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cursor = (*cursor).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The addresses the directory publishes for this node: IP literals as they are, names
/// resolved (a name that does not resolve now adds nothing).
pub async fn published_addresses(entry: &NodeEntry, resolver: &Resolver) -> HashSet<IpAddr> {
    let hosts = [
        Some(&entry.mixnet_address),
        entry.client_address.as_ref(),
        entry.http_address.as_ref(),
    ];
    let mut out = HashSet::new();
    for host in hosts.into_iter().flatten().map(|a| a.host.as_str()) {
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                out.insert(ip);
            }
            Err(_) => {
                if let Ok(ips) = resolver.resolve(host).await {
                    out.extend(ips);
                }
            }
        }
    }
    out
}

/// Keeps `own` at `fixed` (the listeners') plus the interfaces' and the published
/// addresses until `stop` fires.
pub async fn keep_current(
    own: OwnAddresses,
    fixed: HashSet<IpAddr>,
    topology: TopologyHandle,
    me: NodeId,
    resolver: Arc<Resolver>,
    stop: CancellationToken,
) {
    let mut changes = topology.changes();
    loop {
        let mut set = fixed.clone();
        set.extend(interface_addresses());
        let entry = topology.current().and_then(|t| t.node(&me).cloned());
        if let Some(entry) = entry {
            set.extend(published_addresses(&entry, &resolver).await);
        }
        if set != own.snapshot() {
            tracing::info!(addresses = ?set, "the exit's own addresses (refused unless a rule names them)");
        }
        own.replace(set);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() {
                // No more documents will come: the interfaces are still worth a look.
                tokio::time::sleep(REFRESH).await;
            },
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interfaces_include_loopback() {
        let all = interface_addresses();
        assert!(
            all.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()),
            "{all:?}"
        );
    }

    #[test]
    fn mapped_addresses_match_their_ipv4_form() {
        let own = OwnAddresses::from(HashSet::from(["::ffff:203.0.113.7".parse().unwrap()]));
        assert!(own.contains("203.0.113.7".parse().unwrap()));
        assert!(own.contains("::ffff:203.0.113.7".parse().unwrap()));
        assert!(!own.contains("203.0.113.8".parse().unwrap()));
    }
}
