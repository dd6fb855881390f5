//! The IP tunnel protocol between `nym-client tun` and an exit gateway's IP packet router:
//! whole IP packets carried in mixnet messages, the router's answers through the client's
//! reply SURBs (see `docs/protocol.md` §7).
//!
//! ```text
//! message = version:u8 (1) || kind:u8 || body
//! kind    = 1 connect     client → router   request:u64
//!           2 connected   router → client   request:u64 || ipv4 (4) || ipv6 (16) || mtu:u16 || idle:u32 (s)
//!           3 refused     router → client   request:u64 || reason:u8
//!           4 data        both ways         (len:u16 || packet)*   at least one packet
//!           5 keep-alive  client → router   empty
//!           6 disconnect  client → router   empty
//! ```
//!
//! A client is its sender tag: the router keeps one lease (one IPv4 and one IPv6 address)
//! per tag, and a `connect` from a tag that holds one is answered with the same addresses.
//! A lease with no message from its client for `idle` seconds returns to the pool; the
//! client sends a `keep-alive` every [`KEEP_ALIVE`] when it has nothing else to send.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

pub const VERSION: u8 = 1;
/// Version and kind.
pub const HEADER: usize = 2;
/// Bytes in front of each packet of a `data` message.
pub const PACKET_HEADER: usize = 2;
/// A client with nothing to send says it is alive this often.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The largest IP packet the tunnel carries (both devices' MTU): one packet in a `data`
/// message that fits one reply SURB, and no more than an Ethernet frame, so the exit's own
/// uplink never has to fragment what it forwards.
pub fn max_packet(message_capacity: usize) -> usize {
    message_capacity
        .saturating_sub(HEADER + PACKET_HEADER)
        .min(1500)
}

/// Why the router refused a `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// Every address is leased, and no lease has been idle long enough to take back.
    PoolFull,
    /// Too many new clients at once.
    Busy,
    /// The router is shutting down.
    Stopping,
}

impl RefusedReason {
    pub fn code(self) -> u8 {
        match self {
            RefusedReason::PoolFull => 1,
            RefusedReason::Busy => 2,
            RefusedReason::Stopping => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(RefusedReason::PoolFull),
            2 => Some(RefusedReason::Busy),
            3 => Some(RefusedReason::Stopping),
            _ => None,
        }
    }

    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedReason::PoolFull => "pool_full",
            RefusedReason::Busy => "busy",
            RefusedReason::Stopping => "stopping",
        }
    }
}

/// The addresses a router leased to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The largest packet the router takes and sends.
    pub mtu: u16,
    /// How long the router keeps the addresses of a silent client.
    pub idle: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Connect { request: u64 },
    Connected { request: u64, lease: Lease },
    Refused { request: u64, reason: u8 },
    Data(Vec<Vec<u8>>),
    KeepAlive,
    Disconnect,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("tunnel message too short")]
    Truncated,
    #[error("tunnel protocol version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown tunnel message kind {0}")]
    Kind(u8),
    #[error("a data message without packets")]
    Empty,
    #[error("trailing bytes after a tunnel message")]
    Trailing,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Message::Connect { request } => {
                out.push(1);
                out.extend_from_slice(&request.to_be_bytes());
            }
            Message::Connected { request, lease } => {
                out.push(2);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(&lease.ipv4.octets());
                out.extend_from_slice(&lease.ipv6.octets());
                out.extend_from_slice(&lease.mtu.to_be_bytes());
                let idle = u32::try_from(lease.idle.as_secs()).unwrap_or(u32::MAX);
                out.extend_from_slice(&idle.to_be_bytes());
            }
            Message::Refused { request, reason } => {
                out.push(3);
                out.extend_from_slice(&request.to_be_bytes());
                out.push(*reason);
            }
            Message::Data(packets) => {
                out.push(4);
                for p in packets {
                    // Packets are at most an MTU; a longer one cannot be framed and is cut
                    // to what its length says (the sender's own bug, the reader drops it).
                    let len = u16::try_from(p.len()).unwrap_or(u16::MAX);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&p[..usize::from(len)]);
                }
            }
            Message::KeepAlive => out.push(5),
            Message::Disconnect => out.push(6),
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(MessageError::Version(version));
        }
        let message = match r.u8()? {
            1 => Message::Connect { request: r.u64()? },
            2 => Message::Connected {
                request: r.u64()?,
                lease: Lease {
                    ipv4: Ipv4Addr::from(r.array::<4>()?),
                    ipv6: Ipv6Addr::from(r.array::<16>()?),
                    mtu: u16::from_be_bytes(r.array()?),
                    idle: Duration::from_secs(u64::from(u32::from_be_bytes(r.array()?))),
                },
            },
            3 => Message::Refused {
                request: r.u64()?,
                reason: r.u8()?,
            },
            4 => {
                let mut packets = Vec::new();
                while !r.0.is_empty() {
                    let len = usize::from(u16::from_be_bytes(r.array()?));
                    packets.push(r.take(len)?.to_vec());
                }
                if packets.is_empty() {
                    return Err(MessageError::Empty);
                }
                Message::Data(packets)
            }
            5 => Message::KeepAlive,
            6 => Message::Disconnect,
            other => return Err(MessageError::Kind(other)),
        };
        if !r.0.is_empty() {
            return Err(MessageError::Trailing);
        }
        Ok(message)
    }
}

/// Packs packets into `data` messages of at most `capacity` bytes each.
pub struct Packer {
    capacity: usize,
    packets: Vec<Vec<u8>>,
    len: usize,
}

impl Packer {
    pub fn new(capacity: usize) -> Self {
        Packer {
            capacity,
            packets: Vec::new(),
            len: HEADER,
        }
    }

    /// Whether `packet` still fits in the message being packed.
    pub fn fits(&self, packet: &[u8]) -> bool {
        self.len + PACKET_HEADER + packet.len() <= self.capacity
    }

    /// Adds `packet`; the caller checked [`Packer::fits`] (or the message is empty, and
    /// the packet is at most [`max_packet`]).
    pub fn push(&mut self, packet: Vec<u8>) {
        self.len += PACKET_HEADER + packet.len();
        self.packets.push(packet);
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// The packed message, leaving the packer empty.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        if self.packets.is_empty() {
            return None;
        }
        self.len = HEADER;
        Some(Message::Data(std::mem::take(&mut self.packets)).encode())
    }
}

/// What the router and the client read of an IP packet's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The IP protocol number of the transport (IPv6: after the extension headers).
    pub protocol: u8,
    /// The destination port of a TCP or UDP packet that carries its transport header.
    pub destination_port: Option<u16>,
    /// Where the transport header starts, in a packet that carries it (not a later
    /// fragment); IPv6: past the extension headers.
    pub transport: Option<usize>,
}

pub const PROTOCOL_ICMP: u8 = 1;
pub const PROTOCOL_TCP: u8 = 6;
pub const PROTOCOL_UDP: u8 = 17;
pub const PROTOCOL_ICMPV6: u8 = 58;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("not an IPv4 or IPv6 packet")]
    Version,
    #[error("IP packet shorter than its header")]
    Truncated,
}

impl PacketHeader {
    /// The header of the packet an ICMP or ICMPv6 error message quotes, when `packet` is
    /// one (destination unreachable, time exceeded, parameter problem; ICMPv4's source
    /// quench and redirect too, and ICMPv6's packet too big).
    pub fn quoted(
        packet: &[u8],
        header: &PacketHeader,
    ) -> Option<Result<PacketHeader, PacketError>> {
        let icmp = packet.get(header.transport?..)?;
        let error = match header.protocol {
            PROTOCOL_ICMP => matches!(icmp.first(), Some(3 | 4 | 5 | 11 | 12)),
            PROTOCOL_ICMPV6 => matches!(icmp.first(), Some(1..=4)),
            _ => false,
        };
        error.then(|| Self::parse(icmp.get(8..).unwrap_or_default()))
    }

    pub fn parse(packet: &[u8]) -> Result<Self, PacketError> {
        match packet.first().map(|b| b >> 4) {
            Some(4) => Self::parse_v4(packet),
            Some(6) => Self::parse_v6(packet),
            _ => Err(PacketError::Version),
        }
    }

    fn parse_v4(p: &[u8]) -> Result<Self, PacketError> {
        let header_len = usize::from(p[0] & 0x0f) * 4;
        if header_len < 20 || p.len() < header_len {
            return Err(PacketError::Truncated);
        }
        let octets = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
        let fragment_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
        let protocol = p[9];
        // Only the first fragment carries the transport header.
        let transport = (fragment_offset == 0).then_some(header_len);
        Ok(PacketHeader {
            source: octets(12).into(),
            destination: octets(16).into(),
            protocol,
            destination_port: transport.and_then(|at| port(protocol, &p[at..])),
            transport,
        })
    }

    fn parse_v6(p: &[u8]) -> Result<Self, PacketError> {
        if p.len() < 40 {
            return Err(PacketError::Truncated);
        }
        let address = |at: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[at..at + 16]);
            Ipv6Addr::from(a)
        };
        let (mut next, mut at, mut first_fragment, mut fragment_headers) = (p[6], 40, true, 0);
        // Hop-by-hop, routing, fragment and destination options headers precede the
        // transport; a packet whose chain runs past its end has no port to read.
        loop {
            match next {
                0 | 43 | 60 => {
                    let ext = p.get(at..at + 2).ok_or(PacketError::Truncated)?;
                    next = ext[0];
                    at += 8 + usize::from(ext[1]) * 8;
                }
                44 => {
                    // A second fragment header only serves to hide what the first says.
                    fragment_headers += 1;
                    if fragment_headers > 1 {
                        return Err(PacketError::Truncated);
                    }
                    let ext = p.get(at..at + 4).ok_or(PacketError::Truncated)?;
                    next = ext[0];
                    first_fragment = u16::from_be_bytes([ext[2], ext[3]]) >> 3 == 0;
                    at += 8;
                }
                _ => break,
            }
        }
        let transport = first_fragment.then_some(at);
        Ok(PacketHeader {
            source: address(8).into(),
            destination: address(24).into(),
            protocol: next,
            destination_port: transport
                .and_then(|at| p.get(at..))
                .and_then(|rest| port(next, rest)),
            transport,
        })
    }
}

fn port(protocol: u8, transport: &[u8]) -> Option<u16> {
    match protocol {
        PROTOCOL_TCP | PROTOCOL_UDP => transport
            .get(2..4)
            .map(|b| u16::from_be_bytes([b[0], b[1]])),
        _ => None,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if self.0.len() < n {
            return Err(MessageError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease() -> Lease {
        Lease {
            ipv4: Ipv4Addr::new(10, 64, 0, 2),
            ipv6: "fd00:6e79:6d00::2".parse().unwrap(),
            mtu: 1400,
            idle: Duration::from_secs(180),
        }
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Connect { request: 7 },
            Message::Connected {
                request: 7,
                lease: lease(),
            },
            Message::Refused {
                request: 9,
                reason: RefusedReason::PoolFull.code(),
            },
            Message::Data(vec![vec![0x45; 20], vec![0x60; 40], vec![1]]),
            Message::KeepAlive,
            Message::Disconnect,
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn bad_messages_are_refused() {
        assert_eq!(Message::decode(&[]), Err(MessageError::Truncated));
        assert_eq!(Message::decode(&[2, 5]), Err(MessageError::Version(2)));
        assert_eq!(Message::decode(&[1, 99]), Err(MessageError::Kind(99)));
        assert_eq!(Message::decode(&[1, 4]), Err(MessageError::Empty));
        assert_eq!(
            Message::decode(&[1, 4, 0, 5, 1]),
            Err(MessageError::Truncated)
        );
        assert_eq!(Message::decode(&[1, 5, 0]), Err(MessageError::Trailing));
    }

    #[test]
    fn the_packer_fills_a_message_up_to_its_capacity() {
        let mut packer = Packer::new(100);
        let packet = vec![0x45u8; 30];
        let mut count = 0;
        while packer.fits(&packet) {
            packer.push(packet.clone());
            count += 1;
        }
        assert_eq!(count, 3, "2 + 3 × 32 = 98 ≤ 100");
        let message = packer.take().unwrap();
        assert!(message.len() <= 100);
        assert_eq!(
            Message::decode(&message),
            Ok(Message::Data(vec![packet; 3]))
        );
        assert!(packer.is_empty() && packer.take().is_none());
    }

    fn ipv4_udp(fragment_offset: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&fragment_offset.to_be_bytes());
        p[9] = PROTOCOL_UDP;
        p[12..16].copy_from_slice(&[10, 64, 0, 2]);
        p[16..20].copy_from_slice(&[198, 51, 100, 2]);
        p[22..24].copy_from_slice(&7u16.to_be_bytes());
        p
    }

    #[test]
    fn headers_give_addresses_protocol_and_port() {
        let h = PacketHeader::parse(&ipv4_udp(0)).unwrap();
        assert_eq!(h.source, IpAddr::from([10, 64, 0, 2]));
        assert_eq!(h.destination, IpAddr::from([198, 51, 100, 2]));
        assert_eq!((h.protocol, h.destination_port), (PROTOCOL_UDP, Some(7)));
        // A later fragment has no transport header to read.
        assert_eq!(
            PacketHeader::parse(&ipv4_udp(100))
                .unwrap()
                .destination_port,
            None
        );

        // IPv6, TCP behind a destination options header.
        let mut p = vec![0u8; 40 + 8 + 20];
        p[0] = 0x60;
        p[6] = 60;
        p[8..24].copy_from_slice(&"fd00:6e79:6d00::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        p[40] = PROTOCOL_TCP;
        p[50..52].copy_from_slice(&443u16.to_be_bytes());
        let h = PacketHeader::parse(&p).unwrap();
        assert_eq!(h.destination, "2001:db8::2".parse::<IpAddr>().unwrap());
        assert_eq!((h.protocol, h.destination_port), (PROTOCOL_TCP, Some(443)));

        assert_eq!(
            PacketHeader::parse(&[0x45; 10]),
            Err(PacketError::Truncated)
        );
        assert_eq!(PacketHeader::parse(&[0x20; 40]), Err(PacketError::Version));
        // An extension chain running past the packet's end.
        let mut cut = vec![0u8; 40];
        cut[0] = 0x60;
        cut[6] = 0;
        assert_eq!(PacketHeader::parse(&cut), Err(PacketError::Truncated));
    }

    proptest! {
        #[test]
        fn no_bytes_make_the_parsers_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes);
            let _ = PacketHeader::parse(&bytes);
        }
    }
}
