//! What waits for an upstream slot. Data fragments wait as references and are wrapped in
//! their Sphinx packet only when their slot comes, so a packet always uses the keys of the
//! epoch it leaves in (a long queue does not outlive its keys). Replies through a SURB are
//! built already (the SURB fixed their route).
//!
//! Two queues: the application's traffic, and in the background what the client sends on
//! others' behalf (SURB top-ups a recipient asked for), which only takes slots the
//! application leaves empty, so a recipient asking for SURBs cannot slow its sender down.
//! The application's queue is bounded: a message that does not fit is refused with
//! [`OutboxFull`] instead of growing the client's memory without end.

use std::collections::VecDeque;

use crate::keys::NodeId;
use crate::mixnet::sphinx::{IDENTIFIER_SIZE, PacketBytes};

use super::chunking::MessageId;

/// A fragment of a message: its id and its index.
pub type FragmentKey = (MessageId, u16);

/// A packet ready to leave.
pub struct Ready {
    pub first_hop: NodeId,
    pub packet: PacketBytes,
    /// The fragment it carries and how long its round trip should take, if acknowledged.
    pub tracked: Option<(FragmentKey, [u8; IDENTIFIER_SIZE], std::time::Duration)>,
}

/// One item waiting for a slot.
pub enum Queued {
    /// A data fragment, built when its slot comes.
    Fragment(FragmentKey),
    /// A packet built already (through a reply SURB).
    Packet(Ready),
}

/// Which queue an item goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Application,
    Background,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the outbox is full: {queued} packets wait for their slots and this message needs {needed} more than the {limit} allowed; send more slowly or raise the client's rate"
)]
pub struct OutboxFull {
    pub queued: usize,
    pub needed: usize,
    pub limit: usize,
}

pub struct Outbox {
    application: VecDeque<Queued>,
    background: VecDeque<Queued>,
    limit: usize,
    background_limit: usize,
}

impl Outbox {
    /// At most `limit` application items and `background_limit` background ones.
    pub fn new(limit: usize, background_limit: usize) -> Outbox {
        Outbox {
            application: VecDeque::new(),
            background: VecDeque::new(),
            limit,
            background_limit,
        }
    }

    /// Whether `needed` more new items fit in `priority`'s queue.
    pub fn make_room(&self, priority: Priority, needed: usize) -> Result<(), OutboxFull> {
        let (queued, limit) = match priority {
            Priority::Application => (self.application.len(), self.limit),
            Priority::Background => (self.background.len(), self.background_limit),
        };
        match queued + needed <= limit {
            true => Ok(()),
            false => Err(OutboxFull {
                queued,
                needed,
                limit,
            }),
        }
    }

    /// Queues an item. Not checked against the limit: a new message checks first
    /// ([`Outbox::make_room`]); what was accepted (a retransmission) is always queued.
    pub fn push(&mut self, priority: Priority, item: Queued) {
        match priority {
            Priority::Application => self.application.push_back(item),
            Priority::Background => self.background.push_back(item),
        }
    }

    /// Puts back an item that could not leave, first in its queue.
    pub fn put_back(&mut self, priority: Priority, item: Queued) {
        match priority {
            Priority::Application => self.application.push_front(item),
            Priority::Background => self.background.push_front(item),
        }
    }

    /// The next item for a slot: the application's first.
    pub fn pop(&mut self) -> Option<(Priority, Queued)> {
        if let Some(item) = self.application.pop_front() {
            return Some((Priority::Application, item));
        }
        self.background
            .pop_front()
            .map(|item| (Priority::Background, item))
    }

    pub fn len(&self) -> usize {
        self.application.len() + self.background.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(n: u8) -> Queued {
        Queued::Fragment(([n; 16], 0))
    }

    fn key(item: Option<(Priority, Queued)>) -> Option<(Priority, u8)> {
        match item? {
            (p, Queued::Fragment((id, _))) => Some((p, id[0])),
            (p, Queued::Packet(_)) => Some((p, 0)),
        }
    }

    #[test]
    fn the_application_goes_first_and_background_fills_what_is_left() {
        let mut outbox = Outbox::new(10, 10);
        outbox.push(Priority::Background, fragment(1));
        outbox.push(Priority::Application, fragment(2));
        outbox.push(Priority::Application, fragment(3));
        assert_eq!(key(outbox.pop()), Some((Priority::Application, 2)));
        outbox.put_back(Priority::Application, fragment(4));
        assert_eq!(key(outbox.pop()), Some((Priority::Application, 4)));
        assert_eq!(key(outbox.pop()), Some((Priority::Application, 3)));
        assert_eq!(key(outbox.pop()), Some((Priority::Background, 1)));
        assert!(outbox.pop().is_none());
    }

    #[test]
    fn a_message_that_does_not_fit_is_refused_whole() {
        let mut outbox = Outbox::new(3, 1);
        outbox.make_room(Priority::Application, 3).unwrap();
        for n in 0..2 {
            outbox.push(Priority::Application, fragment(n));
        }
        let full = outbox.make_room(Priority::Application, 2).unwrap_err();
        assert_eq!((full.queued, full.needed, full.limit), (2, 2, 3));
        assert!(full.to_string().contains("outbox is full"));
        outbox.make_room(Priority::Application, 1).unwrap();
        // The background's own bound does not depend on the application's.
        outbox.make_room(Priority::Background, 1).unwrap();
        assert!(outbox.make_room(Priority::Background, 2).is_err());
    }
}
