//! The node's public description, signed with its identity key so anyone holding the
//! identity (from the topology) can check that the node itself published it.
//!
//! The signature covers the compact JSON text of `description` with its fields in the
//! order of [`Description`] (the order they are served in). See `docs/protocol.md`.

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::keys::{EpochKey, Identity, KeyBytes, PublicKeys, verify_signature};
use crate::statement::{NodeStatement, SignedStatement};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Description {
    pub name: String,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<u8>,
    pub identity_key: KeyBytes,
    /// The Sphinx keys of the current and the next epoch, each with its window.
    pub sphinx_keys: Vec<EpochKey>,
    pub noise_key: KeyBytes,
    pub mixnet_address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    pub http_address: String,
    /// Exit gateways: the client address of the network requester that carries SOCKS5
    /// streams out (its identity is derived from this node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_requester: Option<String>,
    /// Exit gateways running one: the client address of the IP packet router that carries
    /// `nym-client tun`'s packets out (its identity is derived from this node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_packet_router: Option<String>,
    pub version: String,
    /// Revision of the topology document this node runs on (0 before one is loaded). An
    /// operator rolling the network waits until every serving node reports a revision at
    /// least as new as the one that withdrew a node, before it stops that node.
    pub topology_revision: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignedDescription {
    pub description: Description,
    /// base58 ed25519 signature over the compact JSON of `description`.
    pub signature: String,
    /// The keys of `description`, signed apart from what changes with the topology: what
    /// a directory copies into the node's entry (see [`crate::statement`]).
    pub statement: SignedStatement,
}

impl Description {
    pub fn new(
        name: &str,
        mode: Mode,
        layer: Option<u8>,
        keys: PublicKeys,
        mixnet_address: String,
        client_address: Option<String>,
        http_address: String,
    ) -> Self {
        Description {
            name: name.to_string(),
            mode,
            layer,
            identity_key: keys.identity_key,
            sphinx_keys: keys.sphinx_keys,
            noise_key: keys.noise_key,
            mixnet_address,
            client_address,
            http_address,
            network_requester: None,
            ip_packet_router: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
            topology_revision: 0,
        }
    }

    /// Publishes the address of this exit's network requester.
    pub fn with_network_requester(mut self, address: String) -> Self {
        self.network_requester = Some(address);
        self
    }

    /// Publishes the address of this exit's IP packet router.
    pub fn with_ip_packet_router(mut self, address: String) -> Self {
        self.ip_packet_router = Some(address);
        self
    }

    /// The revision of the topology document the node runs on.
    pub fn on_topology_revision(mut self, revision: u64) -> Self {
        self.topology_revision = revision;
        self
    }

    fn signed_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// What no directory may change of this description.
    pub fn statement(&self) -> NodeStatement {
        NodeStatement {
            identity_key: self.identity_key,
            mode: self.mode,
            noise_key: self.noise_key,
            sphinx_keys: self.sphinx_keys.clone(),
            network_requester: self.network_requester.clone(),
            ip_packet_router: self.ip_packet_router.clone(),
        }
    }

    pub fn sign(self, identity: &Identity) -> SignedDescription {
        let signature = identity.sign(&self.signed_bytes());
        SignedDescription {
            statement: self.statement().sign(identity),
            description: self,
            signature: bs58::encode(signature).into_string(),
        }
    }
}

impl SignedDescription {
    /// True when the signature is the described identity's, over this exact description,
    /// and its statement is the same identity's statement of the same keys.
    pub fn verify(&self) -> bool {
        let Ok(sig) = bs58::decode(&self.signature).into_vec() else {
            return false;
        };
        let Ok(sig): Result<[u8; 64], _> = sig.try_into() else {
            return false;
        };
        verify_signature(
            &self.description.identity_key,
            &self.description.signed_bytes(),
            &sig,
        ) && self.statement.statement == self.description.statement()
            && self.statement.verify()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeKeys;

    #[test]
    fn signature_verifies_and_breaks_when_changed() {
        let keys = NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap();
        let d = Description::new(
            "mix1",
            Mode::Mixnode,
            Some(1),
            keys.public(),
            "127.0.0.1:1789".into(),
            None,
            "127.0.0.1:8080".into(),
        )
        .on_topology_revision(7);
        let signed = d.sign(&keys.identity);
        assert!(signed.verify());
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedDescription = serde_json::from_str(&json).unwrap();
        assert!(back.verify());
        let mut tampered = signed.clone();
        tampered.description.layer = Some(2);
        assert!(!tampered.verify());
        let mut older = signed.clone();
        older.description.topology_revision = 6;
        assert!(!older.verify());
        let mut other_key = signed;
        other_key.description.identity_key =
            NodeKeys::generate(std::time::Duration::from_secs(3600))
                .unwrap()
                .public()
                .identity_key;
        assert!(!other_key.verify());
    }
}
