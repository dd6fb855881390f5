//! Messages larger than one packet: split into fragments, reassembled on receipt.
//! Pure; duplicates (from retransmission) are absorbed here.
//!
//! A fragment is `[message id: 16][index: u16 BE][count: u16 BE][data]`. A message is
//! `[reply SURB count: u8]([SURB length: u16 BE][SURB])*[body]`: the SURBs let the
//! receiver answer without learning who sent it.

use std::collections::{HashMap, VecDeque};

pub const MESSAGE_ID_SIZE: usize = 16;
const FRAGMENT_HEADER: usize = MESSAGE_ID_SIZE + 4;
/// Most fragments one message may have.
pub const MAX_FRAGMENTS: usize = u16::MAX as usize;

pub type MessageId = [u8; MESSAGE_ID_SIZE];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("message needs {0} fragments; at most {MAX_FRAGMENTS} are allowed")]
    TooLarge(usize),
    #[error("fragment too short")]
    Truncated,
    #[error("fragment index {0} outside count {1}")]
    BadIndex(u16, u16),
    #[error("malformed message")]
    Malformed,
}

/// A reassembled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub body: Vec<u8>,
    /// SURBs the sender attached for replies (serialised `sphinx_packet::SURB`s).
    pub reply_surbs: Vec<Vec<u8>>,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.body.len());
        out.push(self.reply_surbs.len().min(255) as u8);
        for s in self.reply_surbs.iter().take(255) {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ChunkError> {
        let (&count, mut rest) = bytes.split_first().ok_or(ChunkError::Malformed)?;
        let mut reply_surbs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = rest.get(..2).ok_or(ChunkError::Malformed)?;
            let len = u16::from_be_bytes([len[0], len[1]]) as usize;
            let surb = rest.get(2..2 + len).ok_or(ChunkError::Malformed)?;
            reply_surbs.push(surb.to_vec());
            rest = &rest[2 + len..];
        }
        Ok(Message {
            body: rest.to_vec(),
            reply_surbs,
        })
    }
}

/// Splits `message` into fragments whose data parts are at most `capacity - 20` bytes.
pub fn split(id: MessageId, message: &[u8], capacity: usize) -> Result<Vec<Vec<u8>>, ChunkError> {
    let per = capacity.saturating_sub(FRAGMENT_HEADER).max(1);
    let count = message.len().div_ceil(per).max(1);
    if count > MAX_FRAGMENTS {
        return Err(ChunkError::TooLarge(count));
    }
    Ok((0..count)
        .map(|i| {
            let data = &message[(i * per).min(message.len())..((i + 1) * per).min(message.len())];
            let mut f = Vec::with_capacity(FRAGMENT_HEADER + data.len());
            f.extend_from_slice(&id);
            f.extend_from_slice(&(i as u16).to_be_bytes());
            f.extend_from_slice(&(count as u16).to_be_bytes());
            f.extend_from_slice(data);
            f
        })
        .collect())
}

/// The id and position of a fragment, without copying it.
pub fn fragment_header(fragment: &[u8]) -> Result<(MessageId, u16, u16), ChunkError> {
    if fragment.len() < FRAGMENT_HEADER {
        return Err(ChunkError::Truncated);
    }
    let mut id = [0u8; MESSAGE_ID_SIZE];
    id.copy_from_slice(&fragment[..MESSAGE_ID_SIZE]);
    let index = u16::from_be_bytes([fragment[16], fragment[17]]);
    let count = u16::from_be_bytes([fragment[18], fragment[19]]);
    if count == 0 || index >= count {
        return Err(ChunkError::BadIndex(index, count));
    }
    Ok((id, index, count))
}

struct Partial {
    count: u16,
    parts: Vec<Option<Vec<u8>>>,
    received: u16,
}

/// Collects fragments until messages are complete. Memory is bounded: at most
/// `max_partial` incomplete messages (the oldest is forgotten first), and the ids of the
/// last `remember_completed` complete messages are kept to drop late duplicates.
pub struct Reassembler {
    partial: HashMap<MessageId, Partial>,
    partial_order: VecDeque<MessageId>,
    completed: HashMap<MessageId, ()>,
    completed_order: VecDeque<MessageId>,
    max_partial: usize,
    remember_completed: usize,
    /// Fragments dropped as duplicates so far.
    pub duplicates: u64,
}

impl Reassembler {
    pub fn new(max_partial: usize, remember_completed: usize) -> Self {
        Reassembler {
            partial: HashMap::new(),
            partial_order: VecDeque::new(),
            completed: HashMap::new(),
            completed_order: VecDeque::new(),
            max_partial,
            remember_completed,
            duplicates: 0,
        }
    }

    /// Adds a fragment; returns the whole message when this was its last missing part.
    pub fn add(&mut self, fragment: &[u8]) -> Result<Option<(MessageId, Vec<u8>)>, ChunkError> {
        let (id, index, count) = fragment_header(fragment)?;
        if self.completed.contains_key(&id) {
            self.duplicates += 1;
            return Ok(None);
        }
        if !self.partial.contains_key(&id) {
            if self.partial.len() >= self.max_partial
                && let Some(oldest) = self.partial_order.pop_front()
            {
                self.partial.remove(&oldest);
            }
            self.partial.insert(
                id,
                Partial {
                    count,
                    parts: vec![None; count as usize],
                    received: 0,
                },
            );
            self.partial_order.push_back(id);
        }
        let Some(p) = self.partial.get_mut(&id) else {
            return Ok(None);
        };
        if p.count != count {
            return Err(ChunkError::BadIndex(index, count));
        }
        let slot = &mut p.parts[index as usize];
        if slot.is_some() {
            self.duplicates += 1;
            return Ok(None);
        }
        *slot = Some(fragment[FRAGMENT_HEADER..].to_vec());
        p.received += 1;
        if p.received < p.count {
            return Ok(None);
        }
        let done = self.partial.remove(&id);
        self.partial_order.retain(|x| *x != id);
        self.completed.insert(id, ());
        self.completed_order.push_back(id);
        if self.completed_order.len() > self.remember_completed
            && let Some(old) = self.completed_order.pop_front()
        {
            self.completed.remove(&old);
        }
        Ok(done.map(|p| (id, p.parts.into_iter().flatten().flatten().collect())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn large_message_splits_and_reassembles_in_any_order_with_duplicates() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let msg = Message {
            body: body.clone(),
            reply_surbs: vec![vec![1; 396], vec![2; 396]],
        };
        let frags = split([7; 16], &msg.encode(), 1000).unwrap();
        assert!(frags.len() > 10);
        let mut r = Reassembler::new(16, 16);
        let mut out = None;
        for f in frags.iter().rev().chain(frags.iter()) {
            if let Some(done) = r.add(f).unwrap() {
                assert!(out.is_none(), "delivered twice");
                out = Some(done);
            }
        }
        let (id, bytes) = out.unwrap();
        assert_eq!(id, [7; 16]);
        assert_eq!(Message::decode(&bytes).unwrap(), msg);
        assert_eq!(r.duplicates, frags.len() as u64);
    }

    #[test]
    fn empty_message_is_one_fragment() {
        let frags = split([1; 16], &[], 100).unwrap();
        assert_eq!(frags.len(), 1);
        let mut r = Reassembler::new(4, 4);
        assert_eq!(r.add(&frags[0]).unwrap(), Some(([1; 16], vec![])));
    }

    #[test]
    fn bad_fragments_are_errors() {
        let mut r = Reassembler::new(4, 4);
        assert_eq!(r.add(&[0; 5]), Err(ChunkError::Truncated));
        let mut f = split([1; 16], b"abc", 100).unwrap().remove(0);
        f[16] = 0;
        f[17] = 9;
        assert!(matches!(r.add(&f), Err(ChunkError::BadIndex(9, 1))));
    }

    proptest! {
        #[test]
        fn round_trip(body in proptest::collection::vec(any::<u8>(), 0..5000), cap in 21usize..600) {
            let frags = split([3; 16], &body, cap).unwrap();
            let mut r = Reassembler::new(4, 4);
            let mut got = None;
            for f in &frags { if let Some(d) = r.add(f).unwrap() { got = Some(d.1); } }
            prop_assert_eq!(got, Some(body));
        }

        #[test]
        fn add_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = Reassembler::new(4, 4);
            let _ = r.add(&bytes);
            let _ = Message::decode(&bytes);
        }
    }
}
