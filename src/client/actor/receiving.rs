//! Receiving: frames from the gateway, acknowledgements and loops coming back, fragments
//! reassembled, and whole messages handed to the application (remembered on disk first).

use super::*;

impl Actor {
    pub(super) async fn handle_server(&mut self, msg: ServerMessage) {
        let (id, identifier, body) = match msg {
            ServerMessage::Deliver {
                id,
                identifier,
                body,
            } => (id, identifier, body),
            ServerMessage::Dummy => {
                self.last_dummy = Instant::now();
                return;
            }
            _ => return,
        };
        if identifier == [0u8; IDENTIFIER_SIZE] {
            match self.encryption.open(&body) {
                Ok(fragment) if self.is_returning_loop(&fragment) => {
                    self.stats.loops_returned.fetch_add(1, Ordering::Relaxed);
                    self.to_ack.push(id);
                }
                Ok(fragment) => self.receive_fragment(&fragment, id).await,
                Err(e) => {
                    // Acknowledged to the gateway all the same, so it is not redelivered.
                    self.stats
                        .fragments_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "delivered fragment rejected");
                    self.to_ack.push(id);
                }
            }
            return;
        }
        // Everything else (acks, replies) is done with once handled below.
        self.handle_surb_delivery(identifier, id, &body).await;
    }

    pub(super) async fn handle_surb_delivery(
        &mut self,
        identifier: [u8; IDENTIFIER_SIZE],
        id: u64,
        body: &[u8],
    ) {
        if let Some((message, recovery)) = self.receipts.remove(&identifier) {
            self.to_ack.push(id);
            let confirms = packet::open_reply(&recovery, body)
                .ok()
                .and_then(|p| Envelope::decode(&p).ok())
                .is_some_and(|Envelope::Data { fragment, .. }| fragment == message);
            if confirms {
                self.stats.receipts_received.fetch_add(1, Ordering::Relaxed);
                self.confirm(message).await;
            } else {
                tracing::debug!("a receipt that does not open to its message");
            }
            return;
        }
        // Acknowledgements (the most frequent by far) are known in memory: nothing to hand
        // on, done with at once, and the SURB store is not touched for them.
        if let Some(key) = self.by_identifier.remove(&identifier) {
            self.to_ack.push(id);
            self.stats.acks_received.fetch_add(1, Ordering::Relaxed);
            if let Some(fragment) = self.fragments.remove(&key) {
                for i in fragment.identifiers {
                    self.by_identifier.remove(&i);
                }
                if let Some(m) = self.messages.get_mut(&key.0) {
                    m.remaining = m.remaining.saturating_sub(1);
                    if m.remaining == 0 {
                        self.messages.remove(&key.0);
                        self.stored(key.0).await;
                    }
                }
            }
            return;
        }
        if self.cover_acks.remove(&identifier) {
            self.to_ack.push(id);
            return;
        }
        let handed_out = match self.surbs.take_handed_out(&identifier) {
            Ok(found) => found,
            Err(e) => {
                // Not acknowledged: the gateway delivers it again next session.
                tracing::warn!(error = %e, "reply SURB store");
                return;
            }
        };
        if let Some((recovery, origin)) = handed_out {
            match packet::open_reply(&recovery, body) {
                Ok(plaintext) => match Envelope::decode(&plaintext) {
                    Ok(Envelope::Data { fragment, .. }) => {
                        if let Ok((message, _, _)) = chunking::fragment_header(&fragment) {
                            self.reply_origin.insert(message, origin);
                        }
                        return self.receive_fragment(&fragment, id).await;
                    }
                    _ => tracing::debug!("reply with an unexpected envelope"),
                },
                Err(e) => tracing::debug!(error = %e, "cannot open a reply"),
            }
            self.to_ack.push(id);
            return;
        }
        self.to_ack.push(id);
        // A late ack for a copy we had already given up on or that was acked already.
        self.stats
            .duplicates_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The application has message `id`: remember that on disk, then let the gateway delete
    /// its fragments (stored as `mailbox_ids`). In that order, so a restart in between shows
    /// the message again rather than losing it, and a later copy is never shown.
    pub(super) fn take_for_good(&mut self, id: MessageId, mailbox_ids: Vec<u64>) {
        if let Some(log) = &mut self.completed
            && let Err(e) = log.record(id, topology::unix_now())
        {
            tracing::warn!(error = %e, "cannot remember a completed message: a copy delivered after a restart would be shown again");
        }
        self.done_with(&id);
        self.to_ack.extend(mailbox_ids);
    }

    /// Message `id` needs none of its kept fragments any more.
    fn done_with(&mut self, id: &MessageId) {
        if let Some(inbox) = &self.inbox
            && let Err(e) = inbox.forget(id)
        {
            tracing::warn!(error = %e, "cannot forget a message's kept fragments");
        }
    }

    /// A fragment of a message not complete yet: kept in the inbox and acknowledged in the
    /// next ack slot, or, without an inbox (or when it cannot be written), left at the
    /// gateway until its message completes.
    fn hold_fragment(&mut self, fragment: &[u8], mailbox_id: u64) {
        let Ok((id, index, _)) = chunking::fragment_header(fragment) else {
            return;
        };
        if let Some(inbox) = &self.inbox {
            let kept = inbox::Kept {
                fragment: fragment.to_vec(),
                reply_from: self.reply_origin.get(&id).copied(),
            };
            match inbox.keep(&id, index, &kept) {
                Ok(()) => {
                    self.to_ack.push(mailbox_id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot keep a fragment; the gateway keeps it")
                }
            }
        }
        self.pending_acks.entry(id).or_default().push(mailbox_id);
    }

    /// True (and the loop forgotten) when an opened fragment is one of our loops.
    pub(super) fn is_returning_loop(&mut self, fragment: &[u8]) -> bool {
        let Some(id) = fragment.get(..chunking::MESSAGE_ID_SIZE) else {
            return false;
        };
        let Ok(id) = MessageId::try_from(id) else {
            return false;
        };
        self.loops.remove(&id)
    }

    /// Adds a fragment to its message. The gateway is told to delete the fragment (acked)
    /// once it is safe here: kept in the inbox, or its whole message handed to the
    /// application, or when it can never complete (malformed, a duplicate, or a message
    /// given up on). Until then it stays stored at the gateway and comes again next session.
    pub(super) async fn receive_fragment(&mut self, fragment: &[u8], mailbox_id: u64) {
        let before = self.reassembler.duplicates;
        match self.reassembler.add(fragment, Instant::now()) {
            Ok(Some((id, bytes))) => {
                let mut ids = self.pending_acks.remove(&id).unwrap_or_default();
                ids.push(mailbox_id);
                let origin = self.reply_origin.remove(&id);
                match Message::decode(&bytes) {
                    Ok(message) if message.kind == MessageKind::Data => {
                        if let (Some(tag), false) =
                            (message.sender_tag, message.reply_surbs.is_empty())
                            && let Err(e) = self.surbs.add_received(&tag, &message.reply_surbs)
                        {
                            tracing::warn!(error = %e, "cannot keep reply SURBs");
                        }
                        let handed = self
                            .events
                            .send(Event::Received {
                                id,
                                body: message.body,
                                sender_tag: message.sender_tag,
                                reply_from: origin,
                            })
                            .await;
                        if handed.is_ok() {
                            if self.config.hold_until_consumed {
                                self.held.insert(id, ids);
                            } else {
                                self.take_for_good(id, ids);
                            }
                            if let Some(surb) = message.receipt {
                                self.schedule_receipt(id, surb);
                            }
                        }
                    }
                    Ok(message) => {
                        self.done_with(&id);
                        self.to_ack.extend(ids);
                        self.handle_control(message, origin);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "malformed message");
                        self.done_with(&id);
                        self.to_ack.extend(ids);
                    }
                }
            }
            Ok(None) if self.reassembler.duplicates > before => {
                // A copy of what we have gets no receipt: answering every copy would tell
                // the sender, as often as it likes, whether we are online.
                self.to_ack.push(mailbox_id);
            }
            Ok(None) => self.hold_fragment(fragment, mailbox_id),
            Err(e) => {
                tracing::debug!(error = %e, "malformed fragment");
                self.to_ack.push(mailbox_id);
            }
        }
        for gone in self.reassembler.take_abandoned() {
            self.done_with(&gone);
            self.to_ack
                .extend(self.pending_acks.remove(&gone).unwrap_or_default());
        }
        let dup = self.reassembler.duplicates - before;
        self.stats
            .duplicates_dropped
            .fetch_add(dup, Ordering::Relaxed);
    }
}
