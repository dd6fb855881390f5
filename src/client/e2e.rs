//! End-to-end encryption of message fragments, so the recipient's gateway stores and
//! delivers only ciphertext.
//!
//! HPKE (RFC 9180) in base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and
//! ChaCha20-Poly1305, single-shot: each fragment (each transmission of it) gets its own
//! encapsulated key. The plaintext is padded to a fixed length first, so every sealed
//! fragment of a client is the same size whatever it carries (a message's last piece, a
//! loop):
//!
//! ```text
//! sealed = enc (32) || HPKE-seal(len:u16 || fragment || zero padding) (+16)
//! associated data = recipient identity (32) || recipient encryption key (32)
//! ```
//!
//! The associated data binds each ciphertext to the address it was sealed for; the message
//! id and fragment index travel in the fragment's header, inside the authenticated plaintext,
//! so a ciphertext cannot be relabelled as part of another message either (and one delivered
//! again is recognised by its id: see [`super::completed`]).
//!
//! A client's encryption key pair is derived from its identity secret (HPKE's own
//! `DeriveKeyPair` over a domain-separated input), so one identity file holds both keys and
//! the public half travels in the address: `IDENTITY.ENCRYPTION@GATEWAY`.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};

use crate::keys::{Identity, KeyBytes};

/// Bytes a sealed fragment adds: the encapsulated key, the AEAD tag and the length prefix.
pub const OVERHEAD: usize = 32 + 16 + 2;

/// HPKE `info`: binds every ciphertext to this protocol and its purpose.
const INFO: &[u8] = b"nym-node-rs/fragment/2";
/// Domain separation of the key derivation from the identity secret.
const DERIVE_LABEL: &[u8] = b"nym-node-rs/client-encryption-key/1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum E2eError {
    #[error("sealed fragment of {0} bytes is shorter than the HPKE overhead")]
    Truncated(usize),
    #[error("fragment does not decrypt (altered, or not for this client)")]
    Open,
    #[error("recipient encryption key is not a valid X25519 key")]
    BadKey,
    #[error("sealing failed")]
    Seal,
    #[error("a fragment of {0} bytes does not fit a sealed size of {1}")]
    TooLarge(usize, usize),
    #[error("padding announces more than the sealed fragment holds")]
    BadPadding,
}

/// A client's encryption key pair.
#[derive(Clone)]
pub struct EncryptionKey {
    secret: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: KeyBytes,
    /// The identity it belongs to (half of the associated data).
    identity: KeyBytes,
}

/// The associated data of a fragment sealed for `identity`'s `encryption` key.
fn associated_data(identity: &KeyBytes, encryption: &KeyBytes) -> [u8; 64] {
    let mut ad = [0u8; 64];
    ad[..32].copy_from_slice(&identity.0);
    ad[32..].copy_from_slice(&encryption.0);
    ad
}

impl EncryptionKey {
    pub fn derive(identity: &Identity) -> Self {
        let mut ikm = DERIVE_LABEL.to_vec();
        ikm.extend_from_slice(&identity.secret_bytes());
        let (secret, public) = X25519HkdfSha256::derive_keypair(&ikm);
        let mut key = [0u8; 32];
        key.copy_from_slice(&public.to_bytes());
        EncryptionKey {
            secret,
            public: KeyBytes(key),
            identity: identity.public(),
        }
    }

    pub fn public(&self) -> KeyBytes {
        self.public
    }

    /// Opens a fragment sealed to this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, E2eError> {
        if sealed.len() < OVERHEAD {
            return Err(E2eError::Truncated(sealed.len()));
        }
        let (enc, ciphertext) = sealed.split_at(32);
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(enc)
            .map_err(|_| E2eError::Open)?;
        let padded = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.secret,
            &enc,
            INFO,
            ciphertext,
            &associated_data(&self.identity, &self.public),
        )
        .map_err(|_| E2eError::Open)?;
        let [hi, lo, ..] = padded[..] else {
            return Err(E2eError::BadPadding);
        };
        let len = u16::from_be_bytes([hi, lo]) as usize;
        padded
            .get(2..2 + len)
            .map(<[u8]>::to_vec)
            .ok_or(E2eError::BadPadding)
    }
}

/// Seals a fragment for the client `identity` whose encryption key is `to`, padded so the
/// result is exactly `sealed_len` bytes.
pub fn seal(
    identity: &KeyBytes,
    to: &KeyBytes,
    fragment: &[u8],
    sealed_len: usize,
) -> Result<Vec<u8>, E2eError> {
    if fragment.len() + OVERHEAD > sealed_len || sealed_len - OVERHEAD + 2 > u16::MAX as usize {
        return Err(E2eError::TooLarge(fragment.len(), sealed_len));
    }
    let mut plaintext = vec![0u8; sealed_len - OVERHEAD + 2];
    plaintext[..2].copy_from_slice(&(fragment.len() as u16).to_be_bytes());
    plaintext[2..2 + fragment.len()].copy_from_slice(fragment);
    let public = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&to.0)
        .map_err(|_| E2eError::BadKey)?;
    let (enc, ciphertext) =
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeS::Base,
            &public,
            INFO,
            &plaintext,
            &associated_data(identity, to),
        )
        .map_err(|_| E2eError::Seal)?;
    let mut out = Vec::with_capacity(sealed_len);
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_any_change_is_refused() {
        let me = Identity::generate().unwrap();
        let key = EncryptionKey::derive(&me);
        // Derivation is deterministic: the address can be recomputed from the identity.
        assert_eq!(key.public(), EncryptionKey::derive(&me).public());
        let sealed = seal(&me.public(), &key.public(), b"a fragment", 500).unwrap();
        assert_eq!(sealed.len(), 500, "padded to the fixed size");
        assert_eq!(key.open(&sealed).unwrap(), b"a fragment");
        assert_eq!(
            seal(&me.public(), &key.public(), &[7; 450], 500)
                .unwrap()
                .len(),
            500
        );
        assert_eq!(
            key.open(&seal(&me.public(), &key.public(), &[], 500).unwrap())
                .unwrap(),
            b""
        );
        assert!(seal(&me.public(), &key.public(), &[7; 451], 500).is_err());
        // Two seals of the same plaintext differ (fresh encapsulation each time).
        assert_ne!(
            sealed,
            seal(&me.public(), &key.public(), b"a fragment", 500).unwrap()
        );
        for i in [0, 31, 32, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(key.open(&bad), Err(E2eError::Open), "byte {i}");
        }
        let other = EncryptionKey::derive(&Identity::generate().unwrap());
        assert_eq!(other.open(&sealed), Err(E2eError::Open));
        // Sealed to the right key for another identity: the associated data differs.
        let elsewhere = seal(&other.identity, &key.public(), b"a fragment", 500).unwrap();
        assert_eq!(key.open(&elsewhere), Err(E2eError::Open));
        assert_eq!(key.open(&sealed[..10]), Err(E2eError::Truncated(10)));
    }
}
