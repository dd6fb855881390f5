//! A Linux TUN device: whole IP packets in and out of the kernel's network stack, for the
//! exit's IP packet router and for `nym-client tun`.
//!
//! The device is made with the `TUNSETIFF` ioctl on `/dev/net/tun` (no crate needed for one
//! call) and lives as long as its file descriptor: when the process exits, however it
//! exits, the kernel removes the device and every route through it. Addresses, MTU, routes
//! and the link state are set over rtnetlink (the `rtnetlink` crate, maintained by the
//! rust-netlink project, which also maintains the message types it builds on).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::io::unix::AsyncFd;

/// Longest interface name Linux takes (IFNAMSIZ less the terminating zero).
pub const MAX_NAME: usize = 15;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error(
        "cannot open /dev/net/tun: {0} (the device node is missing, or the container was not given it)"
    )]
    Open(io::Error),
    #[error("cannot create TUN device {name}: {source} (it needs CAP_NET_ADMIN)")]
    Create { name: String, source: io::Error },
    #[error("interface name {0:?}: 1 to 15 characters, no '/', ':' or spaces")]
    Name(String),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("TUN device {0} vanished")]
    Vanished(String),
}

/// An open TUN device (no packet information header: each read is one IP packet).
pub struct TunDevice {
    fd: AsyncFd<OwnedFd>,
    name: String,
    index: u32,
    netlink: Handle,
}

impl TunDevice {
    /// Creates the device `name` (or takes it over, if a persistent one of that name is
    /// free), sets its MTU, addresses it and brings it up.
    pub async fn create(
        name: &str,
        mtu: u16,
        addresses: &[(IpAddr, u8)],
    ) -> Result<Self, TunError> {
        let fd = open(name)?;
        let (connection, netlink, _) =
            rtnetlink::new_connection().map_err(|e| TunError::Netlink(e.to_string()))?;
        tokio::spawn(connection);
        let index = index_of(&netlink, name).await?;
        for (ip, prefix) in addresses {
            netlink
                .address()
                .add(index, *ip, *prefix)
                .replace()
                .execute()
                .await
                .map_err(|e| TunError::Netlink(format!("address {ip}/{prefix} on {name}: {e}")))?;
        }
        netlink
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| TunError::Netlink(format!("bringing {name} up: {e}")))?;
        // SAFETY: an OwnedFd's descriptor stays open and the same until it is dropped, which
        // only the AsyncFd holding it does.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| TunError::Open(e.into()))?;
        Ok(TunDevice {
            fd,
            name: name.to_string(),
            index,
            netlink,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Routes `prefix` into the device (in the main table; the kernel removes the route with
    /// the device).
    pub async fn route(&self, destination: IpAddr, prefix: u8) -> Result<(), TunError> {
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(destination, prefix)
            .map_err(|e| TunError::Netlink(e.to_string()))?
            .output_interface(self.index)
            .scope(RouteScope::Link)
            .build();
        self.netlink
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                TunError::Netlink(format!(
                    "route {destination}/{prefix} via {}: {e}",
                    self.name
                ))
            })
    }

    /// Adds a host route to `destination` along the path the kernel takes to it now, so
    /// that a default route into the device does not swallow the tunnel's own connection.
    /// Loopback and addresses already routed into the device need none (`None`).
    pub async fn pin_route(&self, destination: IpAddr) -> Result<Option<RouteMessage>, TunError> {
        if destination.is_loopback() {
            return Ok(None);
        }
        let host = if destination.is_ipv4() { 32 } else { 128 };
        let query = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(destination, host)
            .map_err(|e| TunError::Netlink(e.to_string()))?
            .build();
        let mut found = self.netlink.route().get(query).execute();
        let now = match found.try_next().await {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(None),
            Err(e) => return Err(TunError::Netlink(format!("route to {destination}: {e}"))),
        };
        let mut pinned = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(destination, host)
            .map_err(|e| TunError::Netlink(e.to_string()))?;
        for attribute in &now.attributes {
            match attribute {
                RouteAttribute::Oif(index) if *index == self.index => return Ok(None),
                RouteAttribute::Oif(index) => pinned = pinned.output_interface(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => {
                    pinned = pinned
                        .gateway(IpAddr::V4(*gw))
                        .map_err(|e| TunError::Netlink(e.to_string()))?
                }
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => {
                    pinned = pinned
                        .gateway(IpAddr::V6(*gw))
                        .map_err(|e| TunError::Netlink(e.to_string()))?
                }
                _ => {}
            }
        }
        let pinned = pinned.build();
        self.netlink
            .route()
            .add(pinned.clone())
            .replace()
            .execute()
            .await
            .map_err(|e| TunError::Netlink(format!("pinning the route to {destination}: {e}")))?;
        Ok(Some(pinned))
    }

    /// Removes a route [`TunDevice::pin_route`] added (routes into the device go with it).
    pub async fn unpin_route(&self, route: RouteMessage) {
        if let Err(e) = self.netlink.route().del(route).execute().await {
            tracing::warn!(error = %e, "could not remove a pinned route");
        }
    }

    /// The next packet the kernel routed into the device.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: reads at most buf.len() bytes into buf from a descriptor we own.
            match guard.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Hands one packet to the kernel, as if it had arrived on the device.
    pub async fn send(&self, packet: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            // SAFETY: writes packet.len() bytes from packet to a descriptor we own.
            match guard.try_io(|fd| {
                let n =
                    unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Whether `name` can name an interface.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

fn open(name: &str) -> Result<OwnedFd, TunError> {
    if !valid_name(name) {
        return Err(TunError::Name(name.to_string()));
    }
    let mut raw = open_clone_device();
    if raw < 0 && io::Error::last_os_error().kind() == io::ErrorKind::NotFound {
        // Container runtimes allow the TUN device (10:200) but do not always make its
        // node: with CAP_MKNOD the process makes it.
        make_clone_device();
        raw = open_clone_device();
    }
    if raw < 0 {
        return Err(TunError::Open(io::Error::last_os_error()));
    }
    // SAFETY: raw is a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut request) } < 0 {
        return Err(TunError::Create {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

fn open_clone_device() -> libc::c_int {
    // SAFETY: a plain open(2) of a constant path; the caller checks the result.
    unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    }
}

fn make_clone_device() {
    let _ = std::fs::create_dir_all("/dev/net");
    // SAFETY: mknod(2) of a constant path with the TUN clone device's numbers.
    let made = unsafe {
        libc::mknod(
            c"/dev/net/tun".as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(10, 200),
        )
    };
    if made == 0 {
        tracing::info!("made /dev/net/tun (10:200), which this container lacked");
    }
}

async fn index_of(netlink: &Handle, name: &str) -> Result<u32, TunError> {
    let mut links = netlink.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(TunError::Vanished(name.to_string())),
        Err(e) => Err(TunError::Netlink(format!("looking up {name}: {e}"))),
    }
}

/// Whether the process may configure the network: CAP_NET_ADMIN in its effective set
/// (read from `/proc/self/status`).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernels_rules() {
        assert!(valid_name("nym-ipr0"));
        assert!(valid_name("a234567890abcde"));
        for bad in ["", "a234567890abcdef", "a/b", "a:b", "a b", "."] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(open("a/b"), Err(TunError::Name(_))));
    }
}
