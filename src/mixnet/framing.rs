//! Frames on a mixnet link. Pure: no sockets, no clocks.
//!
//! On the wire every frame is `[length: u16 big-endian][Noise message of that length]`.
//! During the handshake the messages are small (at most [`MAX_HANDSHAKE_FRAME`]); after it
//! every frame has exactly [`FRAME_CIPHERTEXT_LEN`] bytes, so all frames look alike on the
//! wire and a length that is anything else is an error that closes the link. Decrypted, a
//! transport frame is `[version][kind][Sphinx packet]` (see `docs/protocol.md`).

use crate::mixnet::sphinx::PACKET_SIZE;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 2;
/// Version byte this node speaks.
pub const FRAME_VERSION: u8 = 1;
/// Kind byte of a frame carrying one Sphinx packet.
pub const KIND_PACKET: u8 = 0;
/// Plaintext of a transport frame: version, kind, packet.
pub const FRAME_PLAINTEXT_LEN: usize = 2 + PACKET_SIZE;
/// Noise adds a 16-byte authentication tag.
pub const NOISE_TAG_LEN: usize = 16;
/// The only ciphertext length a transport frame may have.
pub const FRAME_CIPHERTEXT_LEN: usize = FRAME_PLAINTEXT_LEN + NOISE_TAG_LEN;
/// A whole transport frame on the wire.
pub const WIRE_FRAME_LEN: usize = LENGTH_PREFIX + FRAME_CIPHERTEXT_LEN;
/// Largest handshake message accepted (XK's are 48, 48 and 64 bytes).
pub const MAX_HANDSHAKE_FRAME: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit")]
    Oversized(usize),
    #[error("frame of {0} bytes does not have the protocol's fixed size")]
    WrongLength(usize),
    #[error("frame version {0} is not spoken here")]
    BadVersion(u8),
    #[error("frame kind {0} is unknown")]
    UnknownKind(u8),
}

/// Finds the next complete frame at the start of `buf`.
///
/// Returns the frame body (without its prefix) once all of it is in `buf`, `None` if more
/// bytes are needed, and an error as soon as the prefix alone shows the frame is invalid
/// (so an attacker cannot make us buffer an oversized frame). With `exact`, any other
/// length is wrong; otherwise lengths up to `limit` are accepted.
pub fn next_frame(buf: &[u8], limit: usize, exact: bool) -> Result<Option<&[u8]>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
    if len > limit {
        return Err(FrameError::Oversized(len));
    }
    if (exact && len != limit) || len == 0 {
        return Err(FrameError::WrongLength(len));
    }
    Ok(buf.get(LENGTH_PREFIX..LENGTH_PREFIX + len))
}

/// Writes the length prefix for a body of `len` bytes.
pub fn prefix(len: usize) -> [u8; LENGTH_PREFIX] {
    debug_assert!(len <= u16::MAX as usize);
    (len as u16).to_be_bytes()
}

/// Fills the plaintext header of a packet frame and copies the packet after it.
pub fn encode_packet(packet: &[u8; PACKET_SIZE], out: &mut [u8; FRAME_PLAINTEXT_LEN]) {
    out[0] = FRAME_VERSION;
    out[1] = KIND_PACKET;
    out[2..].copy_from_slice(packet);
}

/// Checks a decrypted frame's header and returns the packet it carries.
pub fn decode_packet(plaintext: &[u8]) -> Result<&[u8; PACKET_SIZE], FrameError> {
    if plaintext.len() != FRAME_PLAINTEXT_LEN {
        return Err(FrameError::WrongLength(plaintext.len()));
    }
    if plaintext[0] != FRAME_VERSION {
        return Err(FrameError::BadVersion(plaintext[0]));
    }
    if plaintext[1] != KIND_PACKET {
        return Err(FrameError::UnknownKind(plaintext[1]));
    }
    plaintext[2..]
        .try_into()
        .map_err(|_| FrameError::WrongLength(plaintext.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn incomplete_then_complete() {
        let mut buf = prefix(5).to_vec();
        assert_eq!(next_frame(&buf, 10, false), Ok(None));
        buf.extend_from_slice(b"hel");
        assert_eq!(next_frame(&buf, 10, false), Ok(None));
        buf.extend_from_slice(b"lo+next");
        assert_eq!(next_frame(&buf, 10, false), Ok(Some(&b"hello"[..])));
    }

    #[test]
    fn oversized_is_rejected_from_the_prefix_alone() {
        let buf = prefix(FRAME_CIPHERTEXT_LEN + 1);
        assert_eq!(
            next_frame(&buf, FRAME_CIPHERTEXT_LEN, true),
            Err(FrameError::Oversized(FRAME_CIPHERTEXT_LEN + 1))
        );
        let buf = prefix(10);
        assert_eq!(
            next_frame(&buf, FRAME_CIPHERTEXT_LEN, true),
            Err(FrameError::WrongLength(10))
        );
        assert_eq!(
            next_frame(&prefix(0), 10, false),
            Err(FrameError::WrongLength(0))
        );
    }

    #[test]
    fn packet_frames_round_trip_and_check_header() {
        let packet = [7u8; PACKET_SIZE];
        let mut plain = [0u8; FRAME_PLAINTEXT_LEN];
        encode_packet(&packet, &mut plain);
        assert_eq!(decode_packet(&plain).unwrap(), &packet);
        plain[0] = 9;
        assert_eq!(decode_packet(&plain), Err(FrameError::BadVersion(9)));
        plain[0] = FRAME_VERSION;
        plain[1] = 3;
        assert_eq!(decode_packet(&plain), Err(FrameError::UnknownKind(3)));
        assert!(decode_packet(&plain[..100]).is_err());
    }

    proptest! {
        // The decoder never panics and never claims a frame longer than the limit.
        #[test]
        fn decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..4096), exact in any::<bool>()) {
            if let Ok(Some(body)) = next_frame(&bytes, FRAME_CIPHERTEXT_LEN, exact) {
                prop_assert!(body.len() <= FRAME_CIPHERTEXT_LEN);
                prop_assert!(!exact || body.len() == FRAME_CIPHERTEXT_LEN);
            }
            let _ = decode_packet(&bytes);
        }
    }
}
