//! The exit gateway's services: the exit policy and the network requester (TCP streams).
//!
//! Each service is a mixnet client of its own gateway, connected over loopback like any
//! other client: so this module sits above both [`crate::gateway`] and [`crate::client`],
//! and the gateway itself knows nothing of clients.

pub mod network_requester;
pub mod own_addresses;
pub mod policy;
pub mod stream_admission;
