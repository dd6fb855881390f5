//! nym-node: a Sphinx mixnet node (mix node, entry gateway, exit gateway) and its client.
//!
//! Data flows one way: `mixnet::ingress` → `mixnet::intake` (Sphinx workers) →
//! `mixnet::forward` (delay queue) → `mixnet::egress`, with `gateway` taking final-hop
//! payloads for its clients. See `docs/protocol.md` for the wire formats.

pub mod admission;
pub mod client;
pub mod config;
pub mod directory;
pub mod dns;
pub mod exit;
pub mod gateway;
pub mod health;
pub mod http;
pub mod ip_tunnel;
pub mod keys;
pub mod loadgen;
pub mod localnet;
pub mod message;
pub mod metrics;
pub mod mixnet;
pub mod node;
pub mod private_store;
pub mod shutdown;
pub mod slots;
pub mod statement;
pub mod stream;
pub mod telemetry;
pub mod topology;
pub mod tun;

/// Commit this binary was built from (see `build.rs`).
pub const BUILD_COMMIT: &str = env!("NYM_BUILD_COMMIT");
