//! `nym-client tun`: a TUN device whose packets go through the mixnet to an exit's IP
//! packet router and out to the internet, and whose answers come back through our reply
//! SURBs (the protocol is [`crate::ip_tunnel`]).
//!
//! The router learns only our sender tag; the messages ride our upstream slots like any
//! other, so a link observer sees the same stream whether the tunnel is busy or idle. The
//! device lives as long as the process: however it ends, the kernel removes the device and
//! its routes; the one route outside it (pinning the gateway's path under a default route)
//! is removed on a clean stop.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use rand::RngExt;
use rtnetlink::packet_route::route::RouteMessage;
use tokio::time::Instant;

use crate::client::{ClientAddress, ClientError, Event, MixClient};
use crate::ip_tunnel::{self, Lease, Message, Packer, PacketHeader, RefusedReason};
use crate::topology::Topology;
use crate::tun::{TunDevice, TunError};

/// SURBs a connect carries, so the router can answer and send the first packets.
const CONNECT_SURBS: usize = 32;
/// Below this many SURBs believed at the router, the next message carries [`SURB_TOP_UP`];
/// any other carries one (a message without SURBs carries no sender tag, and the router
/// answers only tags).
const SURB_LOW: i64 = 64;
const SURB_TOP_UP: usize = 48;
/// A connect unanswered this long is sent again, at most [`CONNECT_TRIES`] times.
const CONNECT_RETRY: Duration = Duration::from_secs(15);
const CONNECT_TRIES: u32 = 4;
/// How long a packet waits for others to share its message: about the gap between
/// upstream slots at the tunnel's rate, which it would mostly wait for anyway.
const COALESCE: Duration = Duration::from_millis(50);
/// Bytes of a `data` message to the router: with one reply SURB (398 bytes) and the
/// message's header (20), one fragment holds about 1,140 (2,031 of Sphinx payload, less the
/// SURB-ACK, the sealing and the fragment header). A full-size packet goes alone, in two.
const UPSTREAM_MESSAGE: usize = 1100;
/// How long a clean stop waits for the disconnect to reach the router's gateway.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no serving exit gateway runs an IP packet router")]
    NoRouter,
    #[error("no serving exit gateway {0} with an IP packet router")]
    UnknownExit(String),
    #[error("exit {0}: bad IP packet router address: {1}")]
    BadAddress(String, String),
    #[error("the IP packet router refused us: {0}")]
    Refused(&'static str),
    #[error("the IP packet router did not answer")]
    NoAnswer,
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Tun(#[from] TunError),
}

/// What to route into the tunnel.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Everything (as two halves of each address family, so the default route stays), with
    /// the gateway's own address pinned to the path it has now.
    pub default: bool,
    /// These networks.
    pub prefixes: Vec<(IpAddr, u8)>,
}

/// What the tunnel carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelStats {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Packets dropped because our outbox was full (the mixnet's pace, not ours).
    pub dropped: u64,
}

/// The IP packet router to use: the exit gateway named (by name or identity key), or a
/// random serving one that runs a router.
pub fn choose_router(
    topology: &Topology,
    named: Option<&str>,
) -> Result<ClientAddress, TunnelError> {
    let Some(exit) = topology.choose_exit_service(named, |n| n.ip_packet_router.as_deref()) else {
        return Err(match named {
            Some(n) => TunnelError::UnknownExit(n.to_string()),
            None => TunnelError::NoRouter,
        });
    };
    exit.ip_packet_router
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|e: String| TunnelError::BadAddress(exit.name.clone(), e))
}

/// Asks the router for addresses.
pub async fn connect(client: &mut MixClient, router: ClientAddress) -> Result<Lease, TunnelError> {
    let request: u64 = rand::rng().random();
    for _ in 0..CONNECT_TRIES {
        client
            .send(router, Message::Connect { request }.encode(), CONNECT_SURBS)
            .await?;
        let deadline = Instant::now() + CONNECT_RETRY;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.next_event()).await {
            let Event::Received {
                body,
                reply_from: Some(from),
                ..
            } = event
            else {
                continue;
            };
            if from != router {
                continue;
            }
            match Message::decode(&body) {
                Ok(Message::Connected { request: r, lease }) if r == request => return Ok(lease),
                Ok(Message::Refused { request: r, reason }) if r == request => {
                    return Err(TunnelError::Refused(
                        RefusedReason::from_code(reason)
                            .map_or("unknown reason", RefusedReason::as_str),
                    ));
                }
                _ => {}
            }
        }
    }
    Err(TunnelError::NoAnswer)
}

/// The device for `lease`, with `routes` into it; gives back the route pinned outside it.
pub async fn open_device(
    name: &str,
    lease: &Lease,
    routes: &Routes,
    gateway: Option<IpAddr>,
) -> Result<(TunDevice, Option<RouteMessage>), TunnelError> {
    let mut addresses = vec![(IpAddr::V4(lease.ipv4), 32)];
    // An unspecified IPv6 address: the router carries IPv4 only.
    let ipv6 = !lease.ipv6.is_unspecified();
    if ipv6 {
        addresses.push((IpAddr::V6(lease.ipv6), 128));
    }
    let device = TunDevice::create(name, lease.mtu, &addresses).await?;
    let mut pinned = None;
    if routes.default {
        if let Some(gateway) = gateway {
            pinned = device.pin_route(gateway).await?;
        }
        for (half, len) in [("0.0.0.0", 1), ("128.0.0.0", 1), ("::", 1), ("8000::", 1)] {
            let half: IpAddr = half
                .parse()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            if half.is_ipv4() || ipv6 {
                device.route(half, len).await?;
            }
        }
    }
    for (prefix, len) in &routes.prefixes {
        if prefix.is_ipv6() && !ipv6 {
            tracing::warn!(%prefix, "the router carries IPv4 only: not routed into the tunnel");
            continue;
        }
        device.route(*prefix, *len).await?;
    }
    Ok((device, pinned))
}

/// Carries packets both ways until `stop`, then tells the router we are gone.
pub async fn pump(
    client: &mut MixClient,
    router: ClientAddress,
    lease: &Lease,
    device: &TunDevice,
    stop: impl Future<Output = ()>,
) -> TunnelStats {
    let mut up = Upstream::new(router);
    let mut buf = vec![0u8; 65_536];
    // Ticks at half the interval: a keep-alive goes when a whole tick passed silent, so the
    // router never waits more than the interval between two messages.
    let mut keep_alive = tokio::time::interval(ip_tunnel::KEEP_ALIVE / 2);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            read = device.recv(&mut buf) => {
                // Not from our addresses (the kernel's link-local chatter): the router
                // would refuse it anyway.
                if let Ok(n) = read && from_lease(lease, &buf[..n]) {
                    up.add(client, buf[..n].to_vec()).await;
                }
            }
            _ = crate::slots::sleep_until(up.flush_at) => up.flush(client).await,
            event = client.next_event() => match event {
                Some(Event::Received { body, reply_from: Some(from), .. }) if from == router => {
                    up.surbs -= 1;
                    if let Ok(Message::Data(packets)) = Message::decode(&body) {
                        deliver(device, lease, packets, &mut up.stats).await;
                    }
                }
                Some(_) => {}
                None => break,
            },
            _ = keep_alive.tick() => up.keep_alive(client).await,
        }
    }
    up.flush(client).await;
    disconnect(client, router).await;
    up.stats
}

/// Hands the router's packets to the kernel: only those to our own addresses, so an exit
/// cannot reach past this machine into its networks.
async fn deliver(
    device: &TunDevice,
    lease: &Lease,
    packets: Vec<Vec<u8>>,
    stats: &mut TunnelStats,
) {
    for p in packets {
        let to_us = PacketHeader::parse(&p).is_ok_and(|h| {
            h.destination == IpAddr::V4(lease.ipv4) || h.destination == IpAddr::V6(lease.ipv6)
        });
        if !to_us {
            continue;
        }
        stats.packets_in += 1;
        stats.bytes_in += p.len() as u64;
        if let Err(e) = device.send(&p).await {
            tracing::debug!(error = %e, "the kernel refused a packet from the tunnel");
        }
    }
}

/// What goes to the router: packets gathered for up to [`COALESCE`] into one message, so a
/// TCP download's stream of small acks takes a few upstream slots rather than one each.
struct Upstream {
    router: ClientAddress,
    packer: Packer,
    packets: u64,
    flush_at: Option<Instant>,
    /// SURBs we believe the router holds: those we gave less the messages it sent us.
    surbs: i64,
    sent_since_tick: bool,
    stats: TunnelStats,
}

impl Upstream {
    fn new(router: ClientAddress) -> Self {
        Upstream {
            router,
            packer: Packer::new(UPSTREAM_MESSAGE),
            packets: 0,
            flush_at: None,
            surbs: CONNECT_SURBS as i64,
            sent_since_tick: false,
            stats: TunnelStats::default(),
        }
    }

    async fn add(&mut self, client: &MixClient, packet: Vec<u8>) {
        if !self.packer.is_empty() && !self.packer.fits(&packet) {
            self.flush(client).await;
        }
        self.stats.packets_out += 1;
        self.stats.bytes_out += packet.len() as u64;
        self.packets += 1;
        self.packer.push(packet);
        self.flush_at.get_or_insert(Instant::now() + COALESCE);
    }

    async fn flush(&mut self, client: &MixClient) {
        self.flush_at = None;
        let packets = std::mem::take(&mut self.packets);
        if let Some(message) = self.packer.take()
            && !self.send(client, message).await
        {
            self.stats.dropped += packets;
        }
    }

    /// Sends `message` with the SURBs the router needs; false when the outbox refused it.
    async fn send(&mut self, client: &MixClient, message: Vec<u8>) -> bool {
        let top_up = if self.surbs < SURB_LOW {
            SURB_TOP_UP
        } else {
            1
        };
        self.sent_since_tick = true;
        match client.send(self.router, message, top_up).await {
            Ok(_) => {
                self.surbs += top_up as i64;
                true
            }
            Err(_) => false,
        }
    }

    /// A keep-alive when nothing else went since the last tick (or the router runs low).
    async fn keep_alive(&mut self, client: &MixClient) {
        if !self.sent_since_tick || self.surbs < SURB_LOW {
            self.send(client, Message::KeepAlive.encode()).await;
        }
        self.sent_since_tick = false;
    }
}

fn from_lease(lease: &Lease, packet: &[u8]) -> bool {
    PacketHeader::parse(packet)
        .is_ok_and(|h| h.source == IpAddr::V4(lease.ipv4) || h.source == IpAddr::V6(lease.ipv6))
}

/// Tells the router our addresses are free, and waits (a little) for it to be delivered.
async fn disconnect(client: &mut MixClient, router: ClientAddress) {
    let Ok(id) = client.send(router, Message::Disconnect.encode(), 1).await else {
        return;
    };
    let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
        while let Some(event) = client.next_event().await {
            if matches!(event, Event::Delivered { id: d } | Event::Failed { id: d } if d == id) {
                return;
            }
        }
    })
    .await;
}
