//! An exit service (the network requester, the IP packet router) is a mixnet client of its
//! own gateway, connected over loopback like any other client, with an identity derived
//! from the node's: so its address is known to whoever knows the node's keys, and it is
//! published in the node's signed statement. Clients reach it with messages carrying reply
//! SURBs; it answers through those SURBs, so it never learns who a client is.

use std::future::Future;
use std::time::Duration;

use crate::client::{ClientAddress, ClientConfig, MixClient};
use crate::keys::{Identity, KeyBytes, NodeId};
use crate::shutdown::Shutdown;
use crate::topology::PeerAddress;

/// How a service reaches its gateway.
#[derive(Clone)]
pub struct Loopback {
    pub identity: Identity,
    pub topology: String,
    /// The directory key the node's topology is signed by.
    pub topology_signer: Option<KeyBytes>,
    pub gateway: NodeId,
    /// The gateway's own client API, reached over loopback.
    pub gateway_address: PeerAddress,
}

/// A service's identity, derived from the node's under `label`.
pub fn identity(node: &Identity, label: &str) -> Identity {
    node.derive(label)
}

/// A service's client address at the node whose identity is `node`.
pub fn address(node: &Identity, label: &str) -> ClientAddress {
    ClientAddress::of(&identity(node, label), node.public())
}

impl Loopback {
    /// Connects to the gateway and hands the client to `serve`, until the node drains or
    /// `serve` says so (true); a session that ends otherwise (false) is made again, with
    /// backoff.
    pub async fn run<F, Fut>(self, name: &'static str, shutdown: Shutdown, mut serve: F)
    where
        F: FnMut(MixClient) -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut wait = Duration::from_millis(200);
        loop {
            let config = ClientConfig {
                topology: self.topology.clone(),
                topology_signer: self.topology_signer,
                gateway: Some(self.gateway),
                gateway_address: Some(self.gateway_address.clone()),
                // It answers at once: its packets are replies through clients' SURBs, whose
                // delays the clients chose.
                cover_rate: 0.0,
                ..ClientConfig::default()
            };
            let started = tokio::select! {
                _ = shutdown.draining() => return,
                c = MixClient::start(config, self.identity.clone()) => c,
            };
            match started {
                Ok(client) => {
                    tracing::info!(service = name, address = %client.address(), "exit service serving");
                    wait = Duration::from_millis(200);
                    if serve(client).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(service = name, error = %e, "exit service cannot reach its gateway; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.draining() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}
