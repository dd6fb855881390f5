//! What a node says about itself that no directory may change: its identity, its mode, its
//! Noise and Sphinx keys and (an exit) its network requester's address, signed with its own
//! identity key.
//!
//! A node serves its statement with its description; a directory copies it verbatim into
//! the node's topology entry, and every reader (node or client) checks that the entry's
//! keys are the ones the node signed. So whoever holds the directory key decides who is
//! listed, where, and whether it serves, but cannot put its own key in a gateway's entry
//! (a man in the middle of every client link), nor another Sphinx key or requester.
//!
//! The statement holds nothing that changes with the topology (unlike the description's
//! `topology_revision`): a directory re-lists a node only when its keys change.

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::keys::{EpochKey, Identity, KeyBytes, PublicKeys, verify_signature};

/// What a node signs: this prefix, then the statement's compact JSON.
const SIGNING_CONTEXT: &[u8] = b"nym-node-rs/statement/1/";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeStatement {
    pub identity_key: KeyBytes,
    pub mode: Mode,
    pub noise_key: KeyBytes,
    /// The Sphinx keys the node publishes now (the current and the next epoch).
    pub sphinx_keys: Vec<EpochKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_requester: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_packet_router: Option<String>,
}

/// An exit service's address as a node publishes it, if it is an address at that very node
/// (a node cannot send clients' streams or packets to someone else's exit).
pub fn service_at(address: Option<&str>, node: &KeyBytes) -> Option<String> {
    let address: crate::client::ClientAddress = address?.parse().ok()?;
    (address.gateway == *node).then(|| address.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignedStatement {
    pub statement: NodeStatement,
    /// base58 ed25519 signature by `statement.identity_key` over [`SIGNING_CONTEXT`] and
    /// the compact JSON of `statement` (fields in the order above).
    pub signature: String,
}

impl NodeStatement {
    /// The statement of a node with these keys in `mode` (no requester).
    pub fn of(keys: &PublicKeys, mode: Mode) -> Self {
        NodeStatement {
            identity_key: keys.identity_key,
            mode,
            noise_key: keys.noise_key,
            sphinx_keys: keys.sphinx_keys.clone(),
            network_requester: None,
            ip_packet_router: None,
        }
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut message = SIGNING_CONTEXT.to_vec();
        // Serialising keys and strings cannot fail.
        message.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        message
    }

    /// Signs with the node's identity, which must be `identity_key`'s secret half.
    pub fn sign(self, identity: &Identity) -> SignedStatement {
        let signature = bs58::encode(identity.sign(&self.signed_bytes())).into_string();
        SignedStatement {
            statement: self,
            signature,
        }
    }
}

impl SignedStatement {
    /// True when the statement is signed by the identity it names.
    pub fn verify(&self) -> bool {
        let Some(signature) = bs58::decode(&self.signature)
            .into_vec()
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
        else {
            return false;
        };
        verify_signature(
            &self.statement.identity_key,
            &self.statement.signed_bytes(),
            &signature,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(identity: &Identity) -> NodeStatement {
        NodeStatement {
            identity_key: identity.public(),
            mode: Mode::ExitGateway,
            noise_key: KeyBytes([2; 32]),
            sphinx_keys: vec![EpochKey::always(KeyBytes([3; 32]))],
            network_requester: Some("requester".into()),
            ip_packet_router: None,
        }
    }

    #[test]
    fn a_statement_verifies_only_as_its_node_signed_it() {
        let node = Identity::from_secret([1; 32]);
        let signed = statement(&node).sign(&node);
        assert!(signed.verify());
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedStatement = serde_json::from_str(&json).unwrap();
        assert!(back.verify());

        let mut rekeyed = signed.clone();
        rekeyed.statement.noise_key = KeyBytes([9; 32]);
        assert!(!rekeyed.verify(), "a changed Noise key");
        let mut redirected = signed.clone();
        redirected.statement.network_requester = Some("elsewhere".into());
        assert!(!redirected.verify(), "a changed requester");
        // Signed by someone else (a directory) in the node's name.
        let directory = Identity::from_secret([7; 32]);
        let forged = statement(&node).sign(&directory);
        assert!(!forged.verify());
    }
}
