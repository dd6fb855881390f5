//! Delivery receipts: waiting for them and resending as a sender, sending them (with consent,
//! after a random delay) as a recipient.

use super::*;

impl Actor {
    /// Sends (again) a message that asks for a receipt, with a fresh receipt SURB: a SURB
    /// is single-use, as mixes drop a header they have seen.
    pub(super) fn send_awaiting(&mut self, id: MessageId) -> Result<(), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let (surb, identifier, recovery) = self.surb_to_self(&topology)?;
        let Some(awaiting) = self.awaiting.get_mut(&id) else {
            return Ok(());
        };
        awaiting.latest = identifier;
        let to = awaiting.to;
        let message = Message {
            receipt: Some(surb),
            ..awaiting.message.clone()
        };
        self.receipts.insert(identifier, (id, recovery));
        if !self.config.acks {
            // Nothing will say when it was stored: the wait starts now.
            self.await_receipt(id);
        }
        self.queue_fragments(id, to, &message)
    }

    /// Starts the wait for a message's receipt.
    pub(super) fn await_receipt(&mut self, id: MessageId) {
        let (Some(timeout), Some(awaiting)) = (self.config.receipt_timeout, self.awaiting.get(&id))
        else {
            return;
        };
        self.deadlines.push(
            Instant::now() + timeout,
            (awaiting.latest, (id, RECEIPT_INDEX)),
        );
    }

    /// No receipt came for the newest copy of a message: send it again, or give up.
    pub(super) fn receipt_overdue(&mut self, id: MessageId, identifier: [u8; IDENTIFIER_SIZE]) {
        let Some(awaiting) = self.awaiting.get_mut(&id) else {
            return;
        };
        if awaiting.latest != identifier {
            return;
        }
        if awaiting.resends >= self.config.receipt_resends {
            self.awaiting.remove(&id);
            self.receipts.retain(|_, (m, _)| *m != id);
            let _ = self.events.try_send(Event::Failed { id });
            return;
        }
        awaiting.resends += 1;
        self.stats.resends.fetch_add(1, Ordering::Relaxed);
        self.messages.remove(&id);
        if let Err(e) = self.send_awaiting(id) {
            tracing::warn!(error = %e, "cannot resend a message; will retry");
            // Under the identifier the failed attempt may have made newest, so it counts.
            let latest = self.awaiting.get(&id).map_or(identifier, |a| a.latest);
            if let Some(timeout) = self.config.receipt_timeout {
                self.deadlines
                    .push(Instant::now() + timeout, (latest, (id, RECEIPT_INDEX)));
            }
        }
    }

    /// Every fragment of (a copy of) a message was stored by its recipient's gateway.
    pub(super) async fn stored(&mut self, id: MessageId) {
        let first = match self.awaiting.get_mut(&id) {
            Some(awaiting) => !std::mem::replace(&mut awaiting.stored, true),
            None => true,
        };
        if first {
            let _ = self.events.send(Event::Delivered { id }).await;
        }
        self.await_receipt(id);
    }

    /// The recipient holds the whole message: nothing of it needs sending any more.
    pub(super) async fn confirm(&mut self, id: MessageId) {
        let Some(awaiting) = self.awaiting.remove(&id) else {
            return; // a second receipt, for a copy sent before the first came back
        };
        self.receipts.retain(|_, (m, _)| *m != id);
        self.forget_fragments(id);
        self.messages.remove(&id);
        if !awaiting.stored {
            // Its receipt overtook the last of its gateway acks.
            let _ = self.events.send(Event::Delivered { id }).await;
        }
        let _ = self.events.send(Event::Confirmed { id }).await;
    }

    /// Schedules the delivery receipt for message `id`, when this client sends receipts,
    /// after a random delay (up to [`ClientConfig::receipt_delay`]).
    pub(super) fn schedule_receipt(&mut self, id: MessageId, surb: Vec<u8>) {
        if !self.config.send_receipts {
            return;
        }
        let delay = self.config.receipt_delay.mul_f64(rand::random::<f64>());
        self.receipts_due.push(Instant::now() + delay, (id, surb));
    }

    /// Sends the receipts whose delay is over, each through the SURB its sender attached.
    /// A receipt is the message id, which only the recipient of the sealed message knows.
    pub(super) fn send_receipts_due(&mut self) {
        let now = Instant::now();
        while let Some((_, (id, surb))) = self.receipts_due.pop_due(now) {
            // Receipts can come due faster than free slots take them: bounded, the rest
            // are not sent (their senders resend, and are told the message failed).
            if let Err(e) = self.outbox.make_room(Priority::Background, 1) {
                tracing::debug!(error = %e, "receipt not sent");
                continue;
            }
            match self.send_through_surb(&surb, id.to_vec(), Priority::Background) {
                Ok(()) => {
                    self.stats.receipts_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(error = %e, "cannot use a receipt SURB"),
            }
        }
    }
}
