//! The exit policy: which addresses and ports an exit gateway's network requester may open
//! streams to, checked on the **resolved** address just before connecting, and which
//! packets the IP packet router may send on, checked on every packet.
//!
//! A policy is an ordered list of rules, one per line, in the style of Tor's exit policies;
//! the first rule that matches decides, and an address no rule matches is refused:
//!
//! ```text
//! # comments and blank lines are ignored
//! accept 203.0.113.0/24:443
//! reject *:25                      # no SMTP
//! accept 127.0.0.1:8080            # a named internal address must be named to be allowed
//! accept [2001:db8::]/32:80,443
//! accept udp *:53                  # DNS over UDP (IP packet router only)
//! accept icmp *                    # ping (IP packet router only)
//! accept *:1-65535
//! ```
//!
//! Addresses: `*`, an IP, a CIDR network (IPv6 in brackets when a port follows), `internal`
//! (every address in [`is_internal`]) or `own` (the node's own addresses). Ports: `*`, a
//! port, a range `a-b`, or a comma-separated list of those.
//!
//! Protocols: a rule may name one, `tcp`, `udp` or `icmp` (ICMP and ICMPv6), before its
//! address; it then matches only that protocol, and an `icmp` rule has no ports (`:*` is
//! allowed). A rule without a protocol matches every protocol when its ports are `*`, and
//! only TCP and UDP on those ports otherwise. Streams are TCP.
//!
//! **`*` matches only public addresses.** Loopback, private, shared (CGNAT), link-local
//! (cloud metadata at 169.254.169.254 among them), multicast, unspecified and broadcast
//! addresses, and the node's own addresses, are reached only through a rule that names them
//! (`accept 10.1.2.3:80`, `accept internal:*`): `accept *:*` cannot open the node's own
//! network by accident. Without a policy the default is `accept *:*`, so everything public.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::exit::own_addresses::OwnAddresses;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AddrSpec {
    /// Any public address.
    Any,
    Internal,
    Own,
    Net {
        base: IpAddr,
        prefix: u8,
    },
}

/// The transport of a packet, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
    /// Any other IP protocol, by number: only rules without protocol or ports match it.
    Other(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    action: Action,
    /// `None`: every protocol (see the module doc).
    protocol: Option<Protocol>,
    addr: AddrSpec,
    /// Inclusive ranges; empty means any port.
    ports: Vec<(u16, u16)>,
}

/// Why a stream was refused (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `reject` rule matched.
    Rejected,
    /// An internal or own address that no rule names.
    Internal,
    /// No rule matched.
    NoRule,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Rejected => "policy_reject",
            Refusal::Internal => "internal_address",
            Refusal::NoRule => "no_rule",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("exit policy line {line}: {message}")]
pub struct PolicyError {
    pub line: usize,
    pub message: String,
}

/// Why `NYM_NODE_EXIT_POLICY` could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("NYM_NODE_EXIT_POLICY: cannot read {0}: {1}")]
    Read(String, String),
    #[error("NYM_NODE_EXIT_POLICY: {0}: {1}")]
    Parse(String, PolicyError),
}

/// Loads the policy named by `NYM_NODE_EXIT_POLICY`: empty for the default, else a file
/// path or an http(s) URL. Read once, at start: a policy that changes under a running
/// exit would change what streams already open were promised.
pub async fn load(source: &str, own: OwnAddresses) -> Result<ExitPolicy, LoadError> {
    if source.is_empty() {
        return Ok(ExitPolicy::default_policy(own));
    }
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        let bytes = crate::topology::fetch(source)
            .await
            .map_err(|e| LoadError::Read(source.to_string(), e.to_string()))?;
        String::from_utf8(bytes)
            .map_err(|_| LoadError::Read(source.to_string(), "not UTF-8 text".into()))?
    } else {
        tokio::fs::read_to_string(source)
            .await
            .map_err(|e| LoadError::Read(source.to_string(), e.to_string()))?
    };
    ExitPolicy::parse(&text, own).map_err(|e| LoadError::Parse(source.to_string(), e))
}

#[derive(Debug, Clone)]
pub struct ExitPolicy {
    rules: Vec<Rule>,
    own: OwnAddresses,
}

impl ExitPolicy {
    /// The policy used when none is configured: every public address, every port.
    pub fn default_policy(own: impl Into<OwnAddresses>) -> Self {
        ExitPolicy {
            rules: vec![Rule {
                action: Action::Accept,
                protocol: None,
                addr: AddrSpec::Any,
                ports: Vec::new(),
            }],
            own: own.into(),
        }
    }

    /// Parses a policy document; `own` are the node's addresses (the `own` keyword, and
    /// never reached through `*`).
    pub fn parse(text: &str, own: impl Into<OwnAddresses>) -> Result<Self, PolicyError> {
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            rules.push(parse_rule(line).map_err(|message| PolicyError {
                line: i + 1,
                message,
            })?);
        }
        Ok(ExitPolicy {
            rules,
            own: own.into(),
        })
    }

    /// Whether a stream to `ip:port` may be opened.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        self.check_packet(ip, Protocol::Tcp, Some(port))
    }

    /// Whether a packet of `protocol` to `ip` (and `port`, for TCP and UDP) may be sent.
    pub fn check_packet(
        &self,
        ip: IpAddr,
        protocol: Protocol,
        port: Option<u16>,
    ) -> Result<(), Refusal> {
        let ip = canonical(ip);
        let own = self.own.contains(ip)
            || matches!(ip, IpAddr::V6(v6) if embedded_ipv4(v6).is_some_and(|v4| self.own.contains(v4.into())));
        let internal = is_internal(ip) || own;
        for rule in &self.rules {
            let addr_matches = match &rule.addr {
                AddrSpec::Any => !internal,
                AddrSpec::Internal => is_internal(ip),
                AddrSpec::Own => own,
                AddrSpec::Net { base, prefix } => in_network(ip, *base, *prefix),
            };
            let protocol_matches = rule.protocol.is_none_or(|p| p == protocol);
            let port_matches = rule.ports.is_empty()
                || port
                    .is_some_and(|port| rule.ports.iter().any(|(a, b)| (*a..=*b).contains(&port)));
            if protocol_matches && addr_matches && port_matches {
                return match rule.action {
                    Action::Accept => Ok(()),
                    Action::Reject => Err(Refusal::Rejected),
                };
            }
        }
        Err(if internal {
            Refusal::Internal
        } else {
            Refusal::NoRule
        })
    }
}

fn parse_rule(line: &str) -> Result<Rule, String> {
    let mut words = line.split_whitespace();
    let action = match words.next() {
        Some("accept") => Action::Accept,
        Some("reject") => Action::Reject,
        Some(other) => return Err(format!("expected accept or reject, got {other:?}")),
        None => return Err("empty rule".into()),
    };
    let mut target = words
        .next()
        .ok_or("expected ADDRESS:PORTS after the action")?;
    let protocol = match target {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "icmp" => Some(Protocol::Icmp),
        _ => None,
    };
    if protocol.is_some() {
        target = words
            .next()
            .ok_or_else(|| format!("expected ADDRESS after {target:?}"))?;
    }
    if let Some(extra) = words.next() {
        return Err(format!("unexpected {extra:?} after {target:?}"));
    }
    // The port part follows the last ':' outside brackets.
    let split = match target.rfind(']') {
        Some(close) => target[close..].find(':').map(|i| close + i),
        None if target.parse::<IpAddr>().is_ok() => None,
        None => target.rfind(':'),
    };
    let (addr, ports) = match (split, protocol) {
        (Some(i), _) => (&target[..i], &target[i + 1..]),
        // ICMP has no ports.
        (None, Some(Protocol::Icmp)) => (target, "*"),
        (None, _) => return Err(format!("{target:?}: expected ADDRESS:PORTS (e.g. *:443)")),
    };
    let ports = parse_ports(ports)?;
    if protocol == Some(Protocol::Icmp) && !ports.is_empty() {
        return Err(format!("{target:?}: ICMP has no ports"));
    }
    Ok(Rule {
        action,
        protocol,
        addr: parse_addr(addr)?,
        ports,
    })
}

fn parse_addr(s: &str) -> Result<AddrSpec, String> {
    match s {
        "*" => return Ok(AddrSpec::Any),
        "internal" | "private" => return Ok(AddrSpec::Internal),
        "own" => return Ok(AddrSpec::Own),
        _ => {}
    }
    let unbracket = |a: &str| a.trim_start_matches('[').trim_end_matches(']').to_string();
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (unbracket(ip), Some(p)),
        None => (unbracket(s), None),
    };
    let base = IpAddr::from_str(&ip).map_err(|_| format!("{s:?}: not an address or network"))?;
    let max = if base.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        None => max,
    };
    Ok(AddrSpec::Net {
        base: canonical(base),
        prefix,
    })
}

fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    if s == "*" {
        return Ok(Vec::new());
    }
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?}: expected a port from 1 to 65535"))
    };
    s.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    Err(format!("{part:?}: range runs backwards"))
                } else {
                    Ok((a, b))
                }
            }
            None => port(part).map(|p| (p, p)),
        })
        .collect()
}

/// IPv4-mapped IPv6 addresses are their IPv4 address: `::ffff:127.0.0.1` is loopback.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn in_network(ip: IpAddr, base: IpAddr, prefix: u8) -> bool {
    match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Addresses an exit must not reach through `*`: they lead into the node's own host or
/// network, not the internet. IPv6 forms that carry an IPv4 address to a translator (NAT64,
/// 6to4) are judged by the IPv4 address they carry: behind a NAT64 gateway `64:ff9b::a00:5`
/// reaches 10.0.0.5.
pub fn is_internal(ip: IpAddr) -> bool {
    const V4: &[(&str, u8)] = &[
        ("0.0.0.0", 8),      // "this network"
        ("10.0.0.0", 8),     // private
        ("100.64.0.0", 10),  // shared address space (CGNAT)
        ("127.0.0.0", 8),    // loopback
        ("169.254.0.0", 16), // link-local, cloud metadata
        ("172.16.0.0", 12),  // private
        ("192.0.0.0", 24),   // IETF protocol assignments
        ("192.168.0.0", 16), // private
        ("198.18.0.0", 15),  // benchmarking
        ("224.0.0.0", 4),    // multicast
        ("240.0.0.0", 4),    // reserved, broadcast
    ];
    const V6: &[(&str, u8)] = &[
        ("::", 96),          // unspecified, loopback, IPv4-compatible (deprecated)
        ("64:ff9b:1::", 48), // local-use NAT64
        ("100::", 64),       // discard-only
        ("fc00::", 7),       // unique local
        ("fe80::", 10),      // link-local
        ("fec0::", 10),      // site-local (deprecated, still routed inside some sites)
        ("ff00::", 8),       // multicast
    ];
    let ip = canonical(ip);
    if let IpAddr::V6(v6) = ip
        && let Some(carried) = embedded_ipv4(v6)
    {
        return is_internal(IpAddr::V4(carried));
    }
    let table = if ip.is_ipv4() { V4 } else { V6 };
    table.iter().any(|(base, prefix)| {
        IpAddr::from_str(base).is_ok_and(|base| in_network(ip, base, *prefix))
    })
}

/// The IPv4 address an IPv6 address hands to a translator: the well-known NAT64 prefix
/// `64:ff9b::/96` carries it in its last 32 bits, 6to4 `2002::/16` in bits 16-47.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let nat64 = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];
    if o[..12] == nat64 {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if o[..2] == [0x20, 0x02] {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_purpose_ipv6_prefixes_are_internal_and_translated_addresses_judged_by_their_ipv4() {
        for internal in [
            "64:ff9b::a00:5",   // NAT64 of 10.0.0.5
            "64:ff9b::7f00:1",  // NAT64 of 127.0.0.1
            "64:ff9b:1::1",     // local-use NAT64
            "2002:a9fe:a9fe::", // 6to4 of 169.254.169.254
            "::7f00:1",         // IPv4-compatible 127.0.0.1
            "::a00:1",
            "100::1",
            "fec0::1",
        ] {
            assert!(is_internal(ip(internal)), "{internal}");
        }
        for public in [
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_internal(ip(public)), "{public}");
        }
        let open = ExitPolicy::parse("accept *:*", HashSet::new()).unwrap();
        assert!(open.check(ip("64:ff9b::a00:5"), 80).is_err());
        assert!(open.check(ip("64:ff9b::808:808"), 80).is_ok());
    }

    #[test]
    fn own_addresses_follow_their_updates() {
        let own = OwnAddresses::from(HashSet::new());
        let open = ExitPolicy::parse("accept *:*", own.clone()).unwrap();
        assert!(open.check(ip("203.0.113.7"), 80).is_ok());
        own.replace(HashSet::from([ip("203.0.113.7")]));
        assert!(open.check(ip("203.0.113.7"), 80).is_err());
        assert!(open.check(ip("::ffff:203.0.113.7"), 80).is_err());
        // Its NAT64 and 6to4 forms lead to it too.
        assert!(open.check(ip("64:ff9b::cb00:7107"), 80).is_err());
        assert!(open.check(ip("2002:cb00:7107::1"), 80).is_err());
    }

    #[test]
    fn the_default_policy_refuses_internal_addresses_and_accepts_public_ones() {
        let p = ExitPolicy::default_policy(HashSet::from([ip("203.0.113.7")]));
        for internal in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "169.254.169.254",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert_eq!(
                p.check(ip(internal), 80),
                Err(Refusal::Internal),
                "{internal}"
            );
        }
        assert_eq!(
            p.check(ip("203.0.113.7"), 80),
            Err(Refusal::Internal),
            "own"
        );
        assert_eq!(p.check(ip("93.184.216.34"), 443), Ok(()));
        assert_eq!(p.check(ip("2606:2800:220:1::1"), 443), Ok(()));
    }

    #[test]
    fn the_first_matching_rule_decides_and_named_internal_addresses_can_be_allowed() {
        let p = ExitPolicy::parse(
            "# a test server on loopback, SMTP nowhere, the rest of the web\n\
             accept 127.0.0.1:8080\n\
             reject *:25\n\
             accept 198.51.100.0/24:22,8000-8100\n\
             accept *:80,443   # web\n\
             accept [2001:db8::]/32:*\n",
            HashSet::new(),
        )
        .unwrap();
        assert_eq!(p.check(ip("127.0.0.1"), 8080), Ok(()));
        assert_eq!(p.check(ip("127.0.0.1"), 8081), Err(Refusal::Internal));
        assert_eq!(p.check(ip("93.184.216.34"), 25), Err(Refusal::Rejected));
        assert_eq!(p.check(ip("93.184.216.34"), 443), Ok(()));
        assert_eq!(p.check(ip("93.184.216.34"), 22), Err(Refusal::NoRule));
        assert_eq!(p.check(ip("198.51.100.9"), 22), Ok(()));
        assert_eq!(p.check(ip("198.51.100.9"), 8050), Ok(()));
        assert_eq!(p.check(ip("198.51.100.9"), 8101), Err(Refusal::NoRule));
        assert_eq!(p.check(ip("2001:db8::5"), 9), Ok(()));
        // `accept *:*` still does not open the node's own network.
        let open = ExitPolicy::parse("accept *:*", HashSet::new()).unwrap();
        assert_eq!(open.check(ip("10.0.0.1"), 80), Err(Refusal::Internal));
        let lan = ExitPolicy::parse("accept internal:*\nreject own:*", HashSet::new()).unwrap();
        assert_eq!(lan.check(ip("10.0.0.1"), 80), Ok(()));
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line_and_the_problem() {
        for (text, expect) in [
            ("allow *:80", "expected accept or reject"),
            ("accept *", "expected ADDRESS:PORTS"),
            ("accept 300.1.1.1:80", "not an address"),
            ("accept 10.0.0.0/33:80", "prefix length"),
            ("accept *:0", "port from 1 to 65535"),
            ("accept *:90-80", "backwards"),
            ("accept *:80 extra", "unexpected"),
            ("accept icmp *:80", "ICMP has no ports"),
            ("accept udp *", "expected ADDRESS:PORTS"),
            ("accept tcp", "expected ADDRESS after"),
        ] {
            let e = ExitPolicy::parse(&format!("# header\n{text}"), HashSet::new()).unwrap_err();
            assert_eq!(e.line, 2, "{text}");
            assert!(e.message.contains(expect), "{text}: {e}");
        }
    }

    #[test]
    fn packets_are_judged_by_protocol_and_port() {
        let p = ExitPolicy::parse(
            "reject udp *:25\n\
             accept udp 198.51.100.0/24:53,7\n\
             accept icmp 198.51.100.0/24\n\
             accept icmp [2001:db8::]/32:*\n\
             accept 203.0.113.0/24:443\n\
             accept 192.0.2.0/24:*\n",
            HashSet::new(),
        )
        .unwrap();
        let net = ip("198.51.100.2");
        assert_eq!(p.check_packet(net, Protocol::Udp, Some(7)), Ok(()));
        assert_eq!(
            p.check_packet(net, Protocol::Udp, Some(8)),
            Err(Refusal::NoRule)
        );
        assert_eq!(
            p.check_packet(net, Protocol::Tcp, Some(7)),
            Err(Refusal::NoRule)
        );
        assert_eq!(p.check_packet(net, Protocol::Icmp, None), Ok(()));
        assert_eq!(
            p.check_packet(ip("2001:db8::2"), Protocol::Icmp, None),
            Ok(())
        );
        assert_eq!(
            p.check_packet(ip("203.0.113.1"), Protocol::Icmp, None),
            Err(Refusal::NoRule)
        );
        // A rule without protocol: TCP and UDP on its ports, everything when its ports are `*`.
        assert_eq!(
            p.check_packet(ip("203.0.113.1"), Protocol::Udp, Some(443)),
            Ok(())
        );
        assert_eq!(
            p.check_packet(ip("203.0.113.1"), Protocol::Tcp, Some(443)),
            Ok(())
        );
        assert_eq!(
            p.check_packet(ip("192.0.2.1"), Protocol::Other(47), None),
            Ok(())
        );
        assert_eq!(
            p.check_packet(ip("192.0.2.1"), Protocol::Icmp, None),
            Ok(())
        );
        assert_eq!(
            p.check_packet(ip("93.184.216.34"), Protocol::Udp, Some(25)),
            Err(Refusal::Rejected)
        );
        // Streams are TCP: the UDP rule opens no stream.
        assert_eq!(p.check(net, 53), Err(Refusal::NoRule));
        // Internal addresses stay closed to `*` for every protocol.
        let open = ExitPolicy::parse("accept *:*", HashSet::new()).unwrap();
        assert_eq!(
            open.check_packet(ip("10.0.0.1"), Protocol::Icmp, None),
            Err(Refusal::Internal)
        );
        assert_eq!(
            open.check_packet(ip("8.8.8.8"), Protocol::Udp, Some(53)),
            Ok(())
        );
    }
}
