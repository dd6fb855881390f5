//! The exit gateway's services: the exit policy, the network requester (TCP streams) and
//! the IP packet router (whole IP packets through a TUN device).
//!
//! Each service is a mixnet client of its own gateway, connected over loopback like any
//! other client: so this module sits above both [`crate::gateway`] and [`crate::client`],
//! and the gateway itself knows nothing of clients.

pub mod ip_router;
pub mod network_requester;
pub mod own_addresses;
pub mod policy;
pub mod service;
pub mod stream_admission;
