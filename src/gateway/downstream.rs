//! What a gateway sends a client, and when: at the Poisson rate agreed when the session
//! opened, one frame per slot, a stored payload (oldest first) when one waits and a dummy
//! frame when none does. An observer of the link then sees the same rate whether the
//! client receives or not; what arrives faster than the rate waits in the mailbox, under
//! its quotas. An unpaced session (rate 0: the exit's own services, or a client that asks
//! for none) gets payloads pushed as they arrive.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use crate::gateway::mailbox::{Mailbox, Stored};
use crate::gateway::protocol::{Rate, ServerMessage};
use crate::keys::KeyBytes;
use crate::slots::PoissonClock;

/// Stored payloads a paced session reads ahead per mailbox read: few, as they wait in
/// memory for their slots.
const READ_AHEAD: usize = 8;

/// A session's downstream: its rate and the payloads read ahead of their slots.
pub struct Downstream {
    rate: Rate,
    clock: PoissonClock,
    client: KeyBytes,
    /// Mailbox id of the newest payload read: the next read starts after it.
    cursor: u64,
    ahead: VecDeque<Stored>,
    /// Something was stored since the mailbox was last found empty.
    maybe_more: bool,
}

impl Downstream {
    pub fn new(client: KeyBytes, rate: Rate) -> Downstream {
        Downstream {
            rate,
            clock: PoissonClock::new(rate.as_per_second()),
            client,
            cursor: 0,
            ahead: VecDeque::new(),
            // What was stored while the client was away goes out first.
            maybe_more: true,
        }
    }

    pub fn is_paced(&self) -> bool {
        self.clock.is_running()
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// When the next slot is, counted from `after`; `None` when unpaced.
    pub fn next_slot(&self, after: Instant) -> Option<Instant> {
        self.clock.next(after)
    }

    /// A payload was stored for the client.
    pub fn stored(&mut self) {
        self.maybe_more = true;
    }

    /// The frame for this slot: the oldest payload not yet sent this session, else a dummy.
    /// A failed mailbox read is logged and the slot goes out as a dummy.
    pub async fn fill_slot(&mut self, mailbox: &Arc<Mailbox>) -> ServerMessage {
        if self.ahead.is_empty() && self.maybe_more {
            match self.read(mailbox, READ_AHEAD).await {
                Ok(items) => {
                    self.maybe_more = items.len() == READ_AHEAD;
                    self.ahead.extend(items);
                }
                Err(e) => tracing::error!(error = %e, "mailbox read failed"),
            }
        }
        match self.ahead.pop_front() {
            Some(item) => deliver(item),
            None => ServerMessage::Dummy,
        }
    }

    /// Every payload stored after those already sent, for an unpaced session, in batches
    /// of `batch` (a failed read is logged and ends the batch).
    pub async fn take_all(&mut self, mailbox: &Arc<Mailbox>, batch: usize) -> Vec<ServerMessage> {
        match self.read(mailbox, batch).await {
            Ok(items) => items.into_iter().map(deliver).collect(),
            Err(e) => {
                tracing::error!(error = %e, "mailbox read failed");
                Vec::new()
            }
        }
    }

    async fn read(&mut self, mailbox: &Arc<Mailbox>, limit: usize) -> Result<Vec<Stored>, String> {
        let (mailbox, client, after) = (mailbox.clone(), self.client, self.cursor);
        let items = tokio::task::spawn_blocking(move || mailbox.fetch_after(&client, after, limit))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if let Some(last) = items.last() {
            self.cursor = last.id;
        }
        Ok(items)
    }
}

fn deliver(item: Stored) -> ServerMessage {
    ServerMessage::Deliver {
        id: item.id,
        identifier: item.identifier,
        body: item.body,
    }
}
