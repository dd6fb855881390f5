//! The exit gateway's IP packet router: whole IP packets of `nym-client tun` between the
//! mixnet and a TUN device, NATed out of the node's uplink (see [`crate::ip_tunnel`] for
//! the protocol, [`leases`] for who holds which address, [`nat`] for what the node changes
//! in its host's network).
//!
//! Upstream, every packet a client sends is checked before it reaches the kernel: its
//! source must be the client's own address, its destination, protocol and port must pass
//! the exit policy (internal and own addresses refused unless named, as for streams), and
//! the client must be within its packet and byte rates. Downstream, the kernel routes
//! answers (de-NATed) into the device; the router hands each to the client holding its
//! destination address, packed into messages through that client's reply SURBs.
//!
//! It is an exit service ([`crate::exit::service`]): a client is only its sender tag.

pub mod leases;
pub mod nat;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{ClientAddress, Event, MixClient, MixSender, SINGLE_FRAGMENT_REPLY, SenderTag};
use crate::config::{Ipv4Pool, Ipv6Pool};
use crate::exit::policy::{ExitPolicy, Protocol};
use crate::exit::service::{self, Loopback};
use crate::ip_tunnel::{self, Lease, Message, Packer, PacketHeader};
use crate::keys::Identity;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tun::{self, TunDevice, TunError};
use leases::{Addresses, Connected, Down, Leases, Limits};
use nat::{Nat, NatError};

/// Label under which the router's identity is derived from the node's.
const IDENTITY_LABEL: &str = "ip-packet-router";
/// Answers waiting for one client's downstream at most; more are dropped (TCP resends).
const DOWN_QUEUE: usize = 256;
/// How often silent clients' leases are returned to the pool.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The router's identity, derived from the node's.
pub fn identity(node: &Identity) -> Identity {
    service::identity(node, IDENTITY_LABEL)
}

/// The router's client address at the node whose identity is `node`.
pub fn address(node: &Identity) -> ClientAddress {
    service::address(node, IDENTITY_LABEL)
}

/// The largest packet the tunnel carries (both devices' MTU).
pub fn mtu() -> u16 {
    u16::try_from(ip_tunnel::max_packet(SINGLE_FRAGMENT_REPLY)).unwrap_or(1280)
}

/// The router's settings, from `NYM_NODE_IPR_*`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device: String,
    pub ipv4_pool: Ipv4Pool,
    pub ipv6_pool: Ipv6Pool,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(
        "NYM_NODE_IPR_ENABLED: the IP packet router needs CAP_NET_ADMIN (to create its TUN device, address it and install its NAT rules); give the node that capability (docker: --cap-add NET_ADMIN --device /dev/net/tun; the Helm chart: ipPacketRouter.enabled), or turn the router off"
    )]
    NoCapability,
    #[error("NYM_NODE_IPR_ENABLED: {0}")]
    Tun(#[from] TunError),
    #[error("NYM_NODE_IPR_ENABLED: {0}")]
    Nat(#[from] NatError),
}

/// What the router holds in the host: its device and its NAT table.
pub struct Plumbing {
    tun: Arc<TunDevice>,
    nat: Nat,
    /// Whether IPv6 works here; without it clients get no IPv6 address.
    ipv6: bool,
}

impl Plumbing {
    /// Checks the capability, turns forwarding on, creates and addresses the device and
    /// installs the NAT table; a router that cannot have all of them does not start.
    pub async fn set_up(settings: &Settings) -> Result<Plumbing, RouterError> {
        if !tun::has_net_admin() {
            return Err(RouterError::NoCapability);
        }
        let ipv6 = nat::ipv6_available();
        if !ipv6 {
            tracing::warn!(
                "IPv6 is disabled in the node's network namespace: the IP packet router carries IPv4 only"
            );
        }
        let turned_on = nat::enable_forwarding(ipv6)?;
        let router = Leases::new(settings.ipv4_pool, settings.ipv6_pool, settings.limits, 1)
            .router_addresses();
        let mut addresses = vec![(IpAddr::V4(router.ipv4), settings.ipv4_pool.prefix)];
        if ipv6 {
            addresses.push((IpAddr::V6(router.ipv6), settings.ipv6_pool.prefix));
        }
        let tun = TunDevice::create(&settings.device, mtu(), &addresses).await?;
        let nat = Nat::install(
            &settings.device,
            settings.ipv4_pool,
            settings.ipv6_pool,
            turned_on,
        )
        .await?;
        tracing::info!(
            device = %settings.device,
            ipv4 = %router.ipv4,
            ipv6 = %router.ipv6,
            mtu = mtu(),
            "IP packet router device and NAT rules in place"
        );
        Ok(Plumbing {
            tun: Arc::new(tun),
            nat,
            ipv6,
        })
    }
}

/// The router of one exit gateway.
pub struct IpPacketRouter {
    pub settings: Settings,
    pub policy: ExitPolicy,
    pub metrics: Arc<Metrics>,
    pub loopback: Loopback,
}

impl IpPacketRouter {
    /// Routes packets until the node stops, then takes its NAT rules back (the device goes
    /// with the process).
    pub async fn run(self, plumbing: Plumbing, shutdown: Shutdown) {
        let Plumbing { tun, nat, ipv6 } = plumbing;
        let router = Arc::new(Router {
            leases: Mutex::new(Leases::new(
                self.settings.ipv4_pool,
                self.settings.ipv6_pool,
                self.settings.limits,
                DOWN_QUEUE,
            )),
            policy: self.policy,
            metrics: self.metrics,
            tun,
            idle: self.settings.limits.idle,
            ipv6,
            pools: (self.settings.ipv4_pool, self.settings.ipv6_pool),
        });
        let reader = tokio::spawn(read_device(router.clone()));
        let serving = shutdown.clone();
        let r = router.clone();
        self.loopback
            .run("ip-packet-router", shutdown, move |client| {
                serve(client, r.clone(), serving.clone())
            })
            .await;
        reader.abort();
        router.release_all();
        match nat.remove().await {
            Ok(()) => tracing::info!("IP packet router NAT rules removed"),
            Err(e) => {
                tracing::error!(error = %e, "IP packet router NAT rules could not be removed")
            }
        }
    }
}

/// What the router's tasks share.
struct Router {
    leases: Mutex<Leases>,
    policy: ExitPolicy,
    metrics: Arc<Metrics>,
    tun: Arc<TunDevice>,
    idle: Duration,
    ipv6: bool,
    pools: (Ipv4Pool, Ipv6Pool),
}

impl Router {
    fn release(&self, tag: &SenderTag) {
        let mut leases = self.leases.lock();
        if leases.release(tag) {
            self.metrics.ipr_clients.set(leases.len() as i64);
        }
    }

    fn release_all(&self) {
        self.leases.lock().clear();
        self.metrics.ipr_clients.set(0);
    }

    /// Answers a connect: the client's lease (and its downstream task when new), or why not.
    fn connect(&self, tag: SenderTag, request: u64, sender: &MixSender) {
        let result = self.leases.lock().connect(tag, Instant::now());
        let answer = match result {
            Ok(Connected::New(addresses, rx)) => {
                tokio::spawn(downstream(tag, rx, sender.clone()));
                self.connected(tag, request, addresses)
            }
            Ok(Connected::Again(addresses)) => self.connected(tag, request, addresses),
            Err(reason) => {
                self.metrics.ipr_refused(reason.as_str());
                let refused = Message::Refused {
                    request,
                    reason: reason.code(),
                }
                .encode();
                let sender = sender.clone();
                tokio::spawn(async move { sender.reply(tag, refused).await });
                return;
            }
        };
        let leases = self.leases.lock();
        if let Some(tx) = leases.downstream(&tag) {
            let _ = tx.try_send(Down::Message(answer));
        }
        self.metrics.ipr_clients.set(leases.len() as i64);
    }

    fn connected(&self, tag: SenderTag, request: u64, addresses: Addresses) -> Vec<u8> {
        tracing::debug!(tag = %hex(&tag), ipv4 = %addresses.ipv4, "router client connected");
        Message::Connected {
            request,
            lease: Lease {
                ipv4: addresses.ipv4,
                // Unspecified: no IPv6 through this router.
                ipv6: if self.ipv6 {
                    addresses.ipv6
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED
                },
                mtu: mtu(),
                idle: self.idle,
            },
        }
        .encode()
    }

    /// Checks each of a client's packets and hands those that pass to the kernel.
    async fn upstream(&self, tag: &SenderTag, packets: Vec<Vec<u8>>) {
        let Some(own) = self.leases.lock().touch(tag, Instant::now()) else {
            for _ in &packets {
                self.metrics.ipr_refused("no_lease");
            }
            return;
        };
        for packet in packets {
            if let Err(reason) = self.admit(tag, own, &packet) {
                self.metrics.ipr_refused(reason);
                continue;
            }
            match self.tun.send(&packet).await {
                Ok(()) => {
                    self.metrics.ipr_packets_to_internet.inc();
                    self.metrics
                        .ipr_bytes_to_internet
                        .inc_by(packet.len() as u64);
                }
                // The kernel refuses what it cannot route; nothing to tell the client.
                Err(e) => tracing::debug!(error = %e, "the kernel refused a client's packet"),
            }
        }
    }

    /// Why a client's packet may not go out, if it may not.
    fn admit(&self, tag: &SenderTag, own: Addresses, packet: &[u8]) -> Result<(), &'static str> {
        judge(&self.policy, self.pools, own, packet)?;
        if !self.leases.lock().allow_up(tag, packet.len()) {
            return Err("rate_limited");
        }
        Ok(())
    }
}

/// Whether a client holding `own` may send `packet` out (its rate aside): at most the MTU,
/// a parsable IP header, its own source address, a destination outside the pools (whatever
/// the policy says of internal addresses, one client never reaches another), and a
/// destination, protocol and port the exit policy accepts. The refusal is a metric label.
fn judge(
    policy: &ExitPolicy,
    (v4, v6): (Ipv4Pool, Ipv6Pool),
    own: Addresses,
    packet: &[u8],
) -> Result<(), &'static str> {
    if packet.len() > usize::from(mtu()) {
        return Err("too_large");
    }
    let header = PacketHeader::parse(packet).map_err(|_| "malformed")?;
    if header.source != IpAddr::V4(own.ipv4) && header.source != IpAddr::V6(own.ipv6) {
        return Err("spoofed_source");
    }
    // An ICMP error speaks of a packet the client received, so of a packet to its own
    // address: one quoting anything else would reset or throttle someone else's traffic.
    if let Some(quoted) = PacketHeader::quoted(packet, &header) {
        let quoted = quoted.map_err(|_| "malformed")?;
        if quoted.destination != IpAddr::V4(own.ipv4) && quoted.destination != IpAddr::V6(own.ipv6)
        {
            return Err("spoofed_source");
        }
    }
    let in_pools = match header.destination {
        IpAddr::V4(ip) => v4.contains(ip),
        IpAddr::V6(ip) => v6.contains(ip),
    };
    if in_pools {
        return Err("internal_address");
    }
    let protocol = match header.protocol {
        ip_tunnel::PROTOCOL_TCP => Protocol::Tcp,
        ip_tunnel::PROTOCOL_UDP => Protocol::Udp,
        ip_tunnel::PROTOCOL_ICMP | ip_tunnel::PROTOCOL_ICMPV6 => Protocol::Icmp,
        other => Protocol::Other(other),
    };
    policy
        .check_packet(header.destination, protocol, header.destination_port)
        .map_err(|r| r.as_str())
}

/// Dispatches clients' messages until the node drains (true) or the client stops (false).
async fn serve(mut client: MixClient, router: Arc<Router>, shutdown: Shutdown) -> bool {
    let sender = client.sender();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let drained = loop {
        tokio::select! {
            _ = shutdown.draining() => break true,
            event = client.next_event() => match event {
                Some(Event::Received { body, sender_tag: Some(tag), .. }) => {
                    handle(&router, &sender, tag, &body).await;
                }
                Some(Event::Received { sender_tag: None, .. }) => {
                    tracing::debug!("message without reply SURBs: cannot answer, ignored");
                }
                Some(_) => {}
                None => break false,
            },
            _ = sweep.tick() => {
                let mut leases = router.leases.lock();
                if leases.expire(Instant::now()) > 0 {
                    router.metrics.ipr_clients.set(leases.len() as i64);
                }
            }
        }
    };
    // Leases die with the session: their downstream tasks hold its sender.
    router.release_all();
    client.stop().await;
    drained
}

async fn handle(router: &Router, sender: &MixSender, tag: SenderTag, body: &[u8]) {
    match Message::decode(body) {
        Ok(Message::Connect { request }) => router.connect(tag, request, sender),
        Ok(Message::Data(packets)) => router.upstream(&tag, packets).await,
        Ok(Message::KeepAlive) => {
            router.leases.lock().touch(&tag, Instant::now());
        }
        Ok(Message::Disconnect) => router.release(&tag),
        Ok(other) => tracing::debug!(?other, "a router-to-client message sent to the router"),
        Err(e) => {
            router.metrics.ipr_refused("malformed");
            tracing::debug!(error = %e, "undecodable tunnel message");
        }
    }
}

/// Reads what the kernel routes into the device and queues each packet for the client
/// holding its destination.
async fn read_device(router: Arc<Router>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match router.tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the IP packet router's device failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let packet = &buf[..n];
        let Ok(header) = PacketHeader::parse(packet) else {
            router.metrics.ipr_refused("malformed");
            continue;
        };
        let queued = match router.leases.lock().route_down(header.destination, n) {
            Ok(tx) => tx
                .try_send(Down::Packet(packet.to_vec()))
                .map_err(|_| "queue_full"),
            Err(reason) => Err(reason),
        };
        match queued {
            Ok(()) => {
                router.metrics.ipr_packets_to_clients.inc();
                router.metrics.ipr_bytes_to_clients.inc_by(n as u64);
            }
            Err(reason) => router.metrics.ipr_refused(reason),
        }
    }
}

/// Sends one client what waits for it, packed into messages that fit one reply SURB each.
async fn downstream(tag: SenderTag, mut rx: mpsc::Receiver<Down>, sender: MixSender) {
    let mut packer = Packer::new(SINGLE_FRAGMENT_REPLY);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(down) = next.take() {
            match down {
                Down::Message(message) => send(&sender, tag, message).await,
                Down::Packet(packet) => {
                    if !packer.fits(&packet)
                        && let Some(message) = packer.take()
                    {
                        send(&sender, tag, message).await;
                    }
                    packer.push(packet);
                }
            }
            next = rx.try_recv().ok();
        }
        if let Some(message) = packer.take() {
            send(&sender, tag, message).await;
        }
    }
}

async fn send(sender: &MixSender, tag: SenderTag, message: Vec<u8>) {
    if let Err(e) = sender.reply(tag, message).await {
        tracing::debug!(error = %e, "tunnel message not sent");
    }
}

fn hex(tag: &SenderTag) -> String {
    tag.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn own() -> Addresses {
        Addresses {
            ipv4: Ipv4Addr::new(10, 64, 0, 2),
            ipv6: "fd6e:796d:6970::2".parse().unwrap(),
        }
    }

    fn v4(source: [u8; 4], destination: [u8; 4], protocol: u8, port: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(24)];
        p[0] = 0x45;
        p[9] = protocol;
        p[12..16].copy_from_slice(&source);
        p[16..20].copy_from_slice(&destination);
        p[22..24].copy_from_slice(&port.to_be_bytes());
        p
    }

    fn v6(source: Ipv6Addr, destination: &str, protocol: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = protocol;
        p[8..24].copy_from_slice(&source.octets());
        p[24..40].copy_from_slice(&destination.parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    #[test]
    fn a_clients_packets_go_out_only_from_its_own_address_and_as_the_policy_says() {
        let policy = ExitPolicy::parse(
            "accept 198.51.100.1:8080\naccept udp 198.51.100.1:7\naccept icmp 198.51.100.1\naccept icmp [2001:db8::1]\n",
            HashSet::new(),
        )
        .unwrap();
        let me = [10, 64, 0, 2];
        let host = [198, 51, 100, 1];
        let pools = (
            Ipv4Pool {
                network: Ipv4Addr::new(10, 64, 0, 0),
                prefix: 16,
            },
            Ipv6Pool {
                network: "fd6e:796d:6970::".parse().unwrap(),
                prefix: 112,
            },
        );
        let judged = |p: Vec<u8>| judge(&policy, pools, own(), &p);
        assert_eq!(
            judged(v4(me, host, ip_tunnel::PROTOCOL_TCP, 8080, 40)),
            Ok(())
        );
        assert_eq!(judged(v4(me, host, ip_tunnel::PROTOCOL_UDP, 7, 40)), Ok(()));
        assert_eq!(
            judged(v4(me, host, ip_tunnel::PROTOCOL_ICMP, 0, 40)),
            Ok(())
        );
        assert_eq!(
            judged(v6(own().ipv6, "2001:db8::1", ip_tunnel::PROTOCOL_ICMPV6)),
            Ok(())
        );
        // Another port, protocol or host: no rule names it.
        assert_eq!(
            judged(v4(me, host, ip_tunnel::PROTOCOL_TCP, 7, 40)),
            Err("no_rule")
        );
        assert_eq!(
            judged(v4(me, host, ip_tunnel::PROTOCOL_UDP, 9, 40)),
            Err("no_rule")
        );
        assert_eq!(
            judged(v4(me, [198, 51, 100, 2], ip_tunnel::PROTOCOL_UDP, 7, 40)),
            Err("no_rule")
        );
        assert_eq!(
            judged(v6(own().ipv6, "2001:db8::1", ip_tunnel::PROTOCOL_TCP)),
            Err("no_rule")
        );
        // Another client's address, or the router's own network: internal.
        assert_eq!(
            judged(v4(me, [10, 64, 0, 3], ip_tunnel::PROTOCOL_ICMP, 0, 40)),
            Err("internal_address")
        );
        // Even under a policy that opens internal addresses, clients never reach each other.
        let lan = ExitPolicy::parse("accept internal:*", HashSet::new()).unwrap();
        let to_peer = v4(me, [10, 64, 0, 3], ip_tunnel::PROTOCOL_ICMP, 0, 40);
        assert_eq!(judge(&lan, pools, own(), &to_peer), Err("internal_address"));
        let to_lan = v4(me, [10, 1, 0, 3], ip_tunnel::PROTOCOL_ICMP, 0, 40);
        assert_eq!(judge(&lan, pools, own(), &to_lan), Ok(()));
        // Someone else's source address: a client cannot send as another.
        assert_eq!(
            judged(v4([10, 64, 0, 3], host, ip_tunnel::PROTOCOL_TCP, 8080, 40)),
            Err("spoofed_source")
        );
        assert_eq!(
            judged(v4(
                [203, 0, 113, 9],
                host,
                ip_tunnel::PROTOCOL_TCP,
                8080,
                40
            )),
            Err("spoofed_source")
        );
        assert_eq!(
            judged(v6(
                "fe80::1".parse().unwrap(),
                "2001:db8::1",
                ip_tunnel::PROTOCOL_ICMPV6
            )),
            Err("spoofed_source")
        );
        // An ICMP error (port unreachable) about a packet to us passes; one about a packet
        // to someone else does not.
        let mut unreachable = v4(me, host, ip_tunnel::PROTOCOL_ICMP, 0, 60);
        unreachable[20] = 3;
        let quoted = v4(host, me, ip_tunnel::PROTOCOL_UDP, 5353, 28);
        unreachable[28..56].copy_from_slice(&quoted);
        assert_eq!(judged(unreachable.clone()), Ok(()));
        let other = v4(host, [10, 64, 0, 9], ip_tunnel::PROTOCOL_UDP, 5353, 28);
        unreachable[28..56].copy_from_slice(&other);
        assert_eq!(judged(unreachable), Err("spoofed_source"));
        // The same behind an IPv6 destination options header: still found, still refused.
        let mut behind = v6(own().ipv6, "2001:db8::1", 60);
        behind.resize(40 + 8 + 8 + 40, 0);
        behind[40] = ip_tunnel::PROTOCOL_ICMPV6;
        behind[48] = 1; // destination unreachable
        let quoted = v6(
            "2001:db8::1".parse().unwrap(),
            "fd6e:796d:6970::9",
            ip_tunnel::PROTOCOL_UDP,
        );
        behind[56..96].copy_from_slice(&quoted[..40]);
        let policy_v6 = ExitPolicy::parse("accept icmp [2001:db8::1]", HashSet::new()).unwrap();
        assert_eq!(
            judge(&policy_v6, pools, own(), &behind),
            Err("spoofed_source")
        );
        let ours = v6(
            "2001:db8::1".parse().unwrap(),
            "fd6e:796d:6970::2",
            ip_tunnel::PROTOCOL_UDP,
        );
        behind[56..96].copy_from_slice(&ours[..40]);
        assert_eq!(judge(&policy_v6, pools, own(), &behind), Ok(()));
        // Over the MTU, or not IP at all.
        let too_large = usize::from(mtu()) + 1;
        assert_eq!(
            judged(v4(me, host, ip_tunnel::PROTOCOL_TCP, 8080, too_large)),
            Err("too_large")
        );
        assert_eq!(judged(vec![0x20; 40]), Err("malformed"));
    }

    #[test]
    fn a_full_packet_of_the_tunnels_mtu_fits_one_reply_surb() {
        let mtu = usize::from(mtu());
        assert!(mtu >= 1280, "IPv6 needs at least 1280, got {mtu}");
        let mut packer = Packer::new(SINGLE_FRAGMENT_REPLY);
        assert!(packer.fits(&vec![0u8; mtu]));
        packer.push(vec![0u8; mtu]);
        assert!(packer.take().unwrap().len() <= SINGLE_FRAGMENT_REPLY);
    }
}
