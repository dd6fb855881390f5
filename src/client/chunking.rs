//! Messages larger than one packet: split into fragments, reassembled on receipt.
//! Pure; duplicates (from retransmission) are absorbed here.
//!
//! A fragment is `[message id: 16][index: u16 BE][count: u16 BE][data]`. A message is
//! `[receipt SURB length: u16 BE][receipt SURB][flags: u8][sender tag: 16, if flagged]
//! [reply SURB count: u8]([SURB length: u16 BE][SURB])*[body]`: the receipt SURB (length 0
//! when none) carries the recipient's delivery receipt back, the reply SURBs let it answer,
//! the sender tag groups one sender's SURBs; none of them tells it who sent the message. The
//! receipt comes first so that fragment 0 alone yields it (see [`receipt_in_first_fragment`]).
//! The flags' kind bits say whether the message is for the application or asks for, or
//! brings, more reply SURBs.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

pub const MESSAGE_ID_SIZE: usize = 16;
pub const FRAGMENT_HEADER: usize = MESSAGE_ID_SIZE + 4;
/// A message's header with no receipt, no sender tag and no SURBs: receipt length (2),
/// flags (1), SURB count (1).
pub const MESSAGE_HEADER_PLAIN: usize = 4;
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
    pub kind: MessageKind,
    /// The sender's tag for this recipient, when it attached reply SURBs.
    pub sender_tag: Option<[u8; 16]>,
    pub body: Vec<u8>,
    /// SURBs the sender attached for replies (serialised `sphinx_packet::SURB`s).
    pub reply_surbs: Vec<Vec<u8>>,
    /// The SURB through which the recipient confirms it has the whole message, when the
    /// sender asked for a delivery receipt.
    pub receipt: Option<Vec<u8>>,
}

/// What a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageKind {
    /// For the application.
    #[default]
    Data,
    /// Sent back through a SURB: the recipient is running low on SURBs for our tag and asks
    /// for as many as the body's u16 says.
    SurbRequest,
    /// Only reply SURBs, answering a [`MessageKind::SurbRequest`].
    SurbTopUp,
}

const FLAG_TAG: u8 = 0x01;
const KIND_SHIFT: u8 = 4;

impl MessageKind {
    fn bits(self) -> u8 {
        match self {
            MessageKind::Data => 0,
            MessageKind::SurbRequest => 1,
            MessageKind::SurbTopUp => 2,
        }
    }

    fn from_bits(b: u8) -> Result<Self, ChunkError> {
        match b {
            0 => Ok(MessageKind::Data),
            1 => Ok(MessageKind::SurbRequest),
            2 => Ok(MessageKind::SurbTopUp),
            _ => Err(ChunkError::Malformed),
        }
    }
}

impl Message {
    /// A message for the application with nothing attached.
    pub fn data(body: Vec<u8>) -> Self {
        Message {
            kind: MessageKind::Data,
            sender_tag: None,
            body,
            reply_surbs: Vec::new(),
            receipt: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let receipt = self.receipt.as_deref().unwrap_or(&[]);
        let mut out = Vec::with_capacity(20 + receipt.len() + self.body.len());
        out.extend_from_slice(&(receipt.len() as u16).to_be_bytes());
        out.extend_from_slice(receipt);
        let tag_flag = if self.sender_tag.is_some() {
            FLAG_TAG
        } else {
            0
        };
        out.push(tag_flag | (self.kind.bits() << KIND_SHIFT));
        if let Some(tag) = &self.sender_tag {
            out.extend_from_slice(tag);
        }
        out.push(self.reply_surbs.len().min(255) as u8);
        for s in self.reply_surbs.iter().take(255) {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ChunkError> {
        let (receipt, rest) = split_receipt(bytes)?;
        let (&flags, rest) = rest.split_first().ok_or(ChunkError::Malformed)?;
        let kind = MessageKind::from_bits(flags >> KIND_SHIFT)?;
        let (sender_tag, rest) = if flags & FLAG_TAG != 0 {
            let tag = rest.get(..16).ok_or(ChunkError::Malformed)?;
            let mut t = [0u8; 16];
            t.copy_from_slice(tag);
            (Some(t), &rest[16..])
        } else {
            (None, rest)
        };
        let (&count, mut rest) = rest.split_first().ok_or(ChunkError::Malformed)?;
        let mut reply_surbs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = rest.get(..2).ok_or(ChunkError::Malformed)?;
            let len = u16::from_be_bytes([len[0], len[1]]) as usize;
            let surb = rest.get(2..2 + len).ok_or(ChunkError::Malformed)?;
            reply_surbs.push(surb.to_vec());
            rest = &rest[2 + len..];
        }
        Ok(Message {
            kind,
            sender_tag,
            body: rest.to_vec(),
            reply_surbs,
            receipt: receipt.map(<[u8]>::to_vec),
        })
    }
}

/// The receipt SURB at the start of an encoded message, and what follows it.
fn split_receipt(bytes: &[u8]) -> Result<(Option<&[u8]>, &[u8]), ChunkError> {
    let len = bytes.get(..2).ok_or(ChunkError::Malformed)?;
    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
    let receipt = bytes.get(2..2 + len).ok_or(ChunkError::Malformed)?;
    Ok(((len > 0).then_some(receipt), &bytes[2 + len..]))
}

/// The receipt SURB carried by a message's first fragment, without the rest of the message:
/// a copy of a message already handed over is confirmed again through it, since the
/// sender would not resend it unless the first receipt was lost.
pub fn receipt_in_first_fragment(fragment: &[u8]) -> Option<(MessageId, Vec<u8>)> {
    let (id, index, _) = fragment_header(fragment).ok()?;
    if index != 0 {
        return None;
    }
    let (receipt, _) = split_receipt(&fragment[FRAGMENT_HEADER..]).ok()?;
    Some((id, receipt?.to_vec()))
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
    /// Only what arrived: a made-up `count` costs nothing until its fragments do.
    parts: HashMap<u16, Vec<u8>>,
    bytes: usize,
    started: Instant,
}

/// What the reassembler may hold. Senders are anonymous, so the bounds are per message and
/// in total.
#[derive(Debug, Clone, Copy)]
pub struct ReassemblyLimits {
    /// Incomplete messages held at once (the oldest is forgotten first).
    pub max_partial: usize,
    /// Bytes of fragments held across all incomplete messages (the oldest go first).
    pub max_bytes: usize,
    /// Fragments one message may have (bounds a message's size).
    pub max_fragments: u16,
    /// An incomplete message older than this is forgotten.
    pub max_age: Duration,
    /// Ids of completed messages remembered, to drop late duplicates.
    pub remember_completed: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_partial: 1024,
            max_bytes: 64 << 20,
            // 16 MiB messages at the smallest fragment size.
            max_fragments: 16_384,
            max_age: Duration::from_secs(600),
            remember_completed: 65_536,
        }
    }
}

/// Collects fragments until messages are complete, within [`ReassemblyLimits`]; the ids of
/// messages it gave up on are kept for [`Reassembler::take_abandoned`].
pub struct Reassembler {
    partial: HashMap<MessageId, Partial>,
    partial_order: VecDeque<MessageId>,
    completed: HashMap<MessageId, ()>,
    completed_order: VecDeque<MessageId>,
    limits: ReassemblyLimits,
    bytes: usize,
    abandoned: Vec<MessageId>,
    /// Fragments dropped as duplicates so far.
    pub duplicates: u64,
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            partial: HashMap::new(),
            partial_order: VecDeque::new(),
            completed: HashMap::new(),
            completed_order: VecDeque::new(),
            limits,
            bytes: 0,
            abandoned: Vec::new(),
            duplicates: 0,
        }
    }

    /// Bytes of fragments held for incomplete messages.
    pub fn bytes_held(&self) -> usize {
        self.bytes
    }

    /// Incomplete messages that were forgotten (too old, or to make room) since the last call.
    pub fn take_abandoned(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.abandoned)
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self.partial_order.pop_front()
            && let Some(p) = self.partial.remove(&oldest)
        {
            self.bytes -= p.bytes;
            self.abandoned.push(oldest);
        }
    }

    /// Forgets incomplete messages older than the age limit.
    pub fn expire(&mut self, now: Instant) {
        while let Some(oldest) = self.partial_order.front() {
            let started = self.partial.get(oldest).map(|p| p.started);
            match started {
                Some(t) if now.saturating_duration_since(t) > self.limits.max_age => {
                    self.forget_oldest()
                }
                _ => break,
            }
        }
    }

    /// Treats message `id` as completed (one taken before a restart): its fragments are
    /// duplicates from now on.
    pub fn remember_completed(&mut self, id: MessageId) {
        if self.completed.insert(id, ()).is_none() {
            self.completed_order.push_back(id);
            if self.completed_order.len() > self.limits.remember_completed
                && let Some(old) = self.completed_order.pop_front()
            {
                self.completed.remove(&old);
            }
        }
    }

    /// Whether the message was completed (and is still remembered).
    pub fn is_completed(&self, id: &MessageId) -> bool {
        self.completed.contains_key(id)
    }

    /// Adds a fragment; returns the whole message when this was its last missing part.
    pub fn add(
        &mut self,
        fragment: &[u8],
        now: Instant,
    ) -> Result<Option<(MessageId, Vec<u8>)>, ChunkError> {
        self.expire(now);
        let (id, index, count) = fragment_header(fragment)?;
        if count > self.limits.max_fragments {
            return Err(ChunkError::TooLarge(count as usize));
        }
        if self.completed.contains_key(&id) {
            self.duplicates += 1;
            return Ok(None);
        }
        let data = &fragment[FRAGMENT_HEADER..];
        if !self.partial.contains_key(&id) {
            if self.partial.len() >= self.limits.max_partial {
                self.forget_oldest();
            }
            self.partial.insert(
                id,
                Partial {
                    count,
                    parts: HashMap::new(),
                    bytes: 0,
                    started: now,
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
        if p.parts.contains_key(&index) {
            self.duplicates += 1;
            return Ok(None);
        }
        p.parts.insert(index, data.to_vec());
        p.bytes += data.len();
        self.bytes += data.len();
        if p.parts.len() < p.count as usize {
            // Over the byte budget: older messages make room (never the one just added to).
            while self.bytes > self.limits.max_bytes && self.partial_order.front() != Some(&id) {
                self.forget_oldest();
            }
            if self.bytes > self.limits.max_bytes {
                // This message alone is over the budget: it cannot be held.
                if let Some(p) = self.partial.remove(&id) {
                    self.bytes -= p.bytes;
                    self.partial_order.retain(|x| *x != id);
                    self.abandoned.push(id);
                }
            }
            return Ok(None);
        }
        let Some(mut done) = self.partial.remove(&id) else {
            return Ok(None);
        };
        self.bytes -= done.bytes;
        self.partial_order.retain(|x| *x != id);
        self.remember_completed(id);
        let message = (0..done.count)
            .filter_map(|i| done.parts.remove(&i))
            .flatten()
            .collect();
        Ok(Some((id, message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_fragment_alone_yields_the_receipt_surb() {
        let receipt = vec![9u8; 396];
        let msg = Message {
            kind: MessageKind::SurbTopUp,
            sender_tag: None,
            body: vec![5; 3000],
            reply_surbs: vec![vec![1; 396]],
            receipt: Some(receipt.clone()),
        };
        let frags = split([4; 16], &msg.encode(), 1000).unwrap();
        assert_eq!(
            receipt_in_first_fragment(&frags[0]),
            Some(([4; 16], receipt))
        );
        assert_eq!(receipt_in_first_fragment(&frags[1]), None);
        let without = Message {
            receipt: None,
            ..msg
        };
        let frags = split([4; 16], &without.encode(), 1000).unwrap();
        assert_eq!(receipt_in_first_fragment(&frags[0]), None);
        assert_eq!(Message::decode(&without.encode()).unwrap(), without);
    }

    #[test]
    fn large_message_splits_and_reassembles_in_any_order_with_duplicates() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let msg = Message {
            kind: MessageKind::Data,
            sender_tag: Some([6; 16]),
            body: body.clone(),
            reply_surbs: vec![vec![1; 396], vec![2; 396]],
            receipt: Some(vec![3; 396]),
        };
        let frags = split([7; 16], &msg.encode(), 1000).unwrap();
        assert!(frags.len() > 10);
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut out = None;
        for f in frags.iter().rev().chain(frags.iter()) {
            if let Some(done) = r.add(f, Instant::now()).unwrap() {
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
        let mut r = Reassembler::new(ReassemblyLimits::default());
        assert_eq!(
            r.add(&frags[0], Instant::now()).unwrap(),
            Some(([1; 16], vec![]))
        );
    }

    #[test]
    fn bad_fragments_are_errors() {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        assert_eq!(r.add(&[0; 5], Instant::now()), Err(ChunkError::Truncated));
        let mut f = split([1; 16], b"abc", 100).unwrap().remove(0);
        f[16] = 0;
        f[17] = 9;
        assert!(matches!(
            r.add(&f, Instant::now()),
            Err(ChunkError::BadIndex(9, 1))
        ));
    }

    #[test]
    fn incomplete_messages_are_bounded_in_bytes_and_time() {
        let limits = ReassemblyLimits {
            max_partial: 100,
            max_bytes: 10_000,
            max_fragments: 1000,
            max_age: Duration::from_secs(60),
            remember_completed: 16,
        };
        let mut r = Reassembler::new(limits);
        let t0 = Instant::now();
        // Ten messages of 5 x 1000 bytes, each missing its last fragment.
        for m in 0..10u8 {
            let frags = split([m; 16], &[m; 5000], 1020).unwrap();
            assert_eq!(frags.len(), 5);
            for f in &frags[..4] {
                assert_eq!(r.add(f, t0).unwrap(), None);
            }
            assert!(r.bytes_held() <= 10_000, "{}", r.bytes_held());
        }
        // Only the newest two fit; the rest were given up, oldest first.
        let abandoned = r.take_abandoned();
        assert_eq!(abandoned, (0..8u8).map(|m| [m; 16]).collect::<Vec<_>>());
        // A made-up fragment count is refused before anything is kept.
        let mut huge = split([50; 16], b"x", 100).unwrap().remove(0);
        huge[18..20].copy_from_slice(&60_000u16.to_be_bytes());
        assert!(matches!(
            r.add(&huge, t0),
            Err(ChunkError::TooLarge(60_000))
        ));
        // Time: past the age limit the rest goes too.
        r.expire(t0 + Duration::from_secs(61));
        assert_eq!(r.bytes_held(), 0);
        assert_eq!(r.take_abandoned(), vec![[8; 16], [9; 16]]);
    }

    proptest! {
        #[test]
        fn round_trip(body in proptest::collection::vec(any::<u8>(), 0..5000), cap in 21usize..600) {
            let frags = split([3; 16], &body, cap).unwrap();
            let mut r = Reassembler::new(ReassemblyLimits::default());
            let mut got = None;
            for f in &frags { if let Some(d) = r.add(f, Instant::now()).unwrap() { got = Some(d.1); } }
            prop_assert_eq!(got, Some(body));
        }

        #[test]
        fn add_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = Reassembler::new(ReassemblyLimits::default());
            let _ = r.add(&bytes, Instant::now());
            let _ = Message::decode(&bytes);
        }
    }
}
