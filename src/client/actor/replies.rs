//! Replies: SURBs we hand out and use, requests for more and the top-ups that answer them.

use super::*;

impl Actor {
    /// Our tag towards `to`: the same for every message to it (so its SURBs pool), unlike
    /// for any other recipient, and telling nothing about us. Ed25519 signatures are
    /// deterministic, so a signature over the recipient serves as a keyed hash.
    pub(super) fn sender_tag(&self, to: &ClientAddress) -> SenderTag {
        let mut input = b"nym-node-rs/sender-tag/1".to_vec();
        input.extend_from_slice(&to.identity.0);
        input.extend_from_slice(&to.encryption.0);
        let signature = self.identity.sign(&input);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&signature[32..48]);
        tag
    }

    /// A fresh SURB that brings a packet back to us through our gateway.
    pub(super) fn surb_to_self(
        &self,
        topology: &Topology,
    ) -> Result<(Vec<u8>, [u8; IDENTIFIER_SIZE], SurbReplyRecovery), ClientError> {
        let identifier = new_identifier()?;
        let route = route::choose(topology, &self.address.gateway)?;
        let delays = packet::sample_delays(route.len(), self.config.mean_delay);
        let (surb, recovery) =
            packet::build_surb(&route, &self.address.identity, identifier, &delays)?;
        Ok((surb, identifier, recovery))
    }

    /// Replies go through the sender's SURBs: no route choice and no ack (the SURB's
    /// route is fixed and ends at the sender).
    pub(super) fn queue_reply(
        &mut self,
        tag: SenderTag,
        body: Vec<u8>,
        id: MessageId,
    ) -> Result<(), ClientError> {
        let fragments = chunking::split(
            id,
            &Message::data(body.clone()).encode(),
            Envelope::fragment_capacity(0),
        )?;
        let have = self.surbs.received_count(&tag)?;
        if have == 0 && !self.requested.contains_key(&tag) {
            return Err(ClientError::NoReplySurbs);
        }
        if have < fragments.len() {
            // One SURB carries the request; the reply waits for the sender's top-up.
            let queue = self.pending_replies.entry(tag).or_default();
            if queue.len() >= MAX_PENDING_REPLIES {
                return Err(ClientError::NoReplySurbs);
            }
            queue.push_back((id, body));
            self.request_surbs(&tag, fragments.len() + SURB_TOP_UP);
            return Ok(());
        }
        self.outbox
            .make_room(Priority::Application, fragments.len())?;
        let surbs = self.surbs.take_received(&tag, fragments.len())?;
        if surbs.len() < fragments.len() {
            return Err(ClientError::NoReplySurbs);
        }
        let used = fragments.len();
        for (fragment, surb) in fragments.into_iter().zip(surbs) {
            self.send_through_surb(&surb, fragment, Priority::Application)?;
        }
        if have - used < SURB_LOW_WATER {
            self.request_surbs(&tag, SURB_TOP_UP);
        }
        Ok(())
    }

    pub(super) fn send_through_surb(
        &mut self,
        surb: &[u8],
        fragment: Vec<u8>,
        priority: Priority,
    ) -> Result<(), ClientError> {
        let envelope = Envelope::Data {
            ack: None,
            fragment,
        }
        .encode()
        .map_err(|e| packet::PacketError::from_message(e.to_string()))?;
        let (first_hop, packet) = packet::use_surb(surb, &envelope)?;
        let ready = Ready {
            first_hop,
            packet,
            tracked: None,
        };
        self.outbox.push(priority, Queued::Packet(ready));
        Ok(())
    }

    /// Asks the sender behind `tag` for `n` more SURBs, through one of its own (at most once
    /// per [`SURB_REQUEST_INTERVAL`] unless a top-up came meanwhile).
    pub(super) fn request_surbs(&mut self, tag: &SenderTag, n: usize) {
        if self
            .requested
            .get(tag)
            .is_some_and(|at| at.elapsed() < SURB_REQUEST_INTERVAL)
        {
            return;
        }
        let asked = (|| -> Result<(), ClientError> {
            let surb = self
                .surbs
                .take_received(tag, 1)?
                .pop()
                .ok_or(ClientError::NoReplySurbs)?;
            let message = Message {
                kind: MessageKind::SurbRequest,
                body: (n.min(MAX_SURBS_PER_REQUEST) as u16).to_be_bytes().to_vec(),
                ..Message::data(Vec::new())
            };
            let mut fragments =
                chunking::split(new_id()?, &message.encode(), Envelope::fragment_capacity(0))?;
            let fragment = fragments.pop().unwrap_or_default();
            self.send_through_surb(&surb, fragment, Priority::Application)
        })();
        match asked {
            Ok(()) => {
                self.requested.insert(*tag, Instant::now());
            }
            Err(e) => tracing::debug!(error = %e, "cannot ask for more reply SURBs"),
        }
    }

    /// A message for the client itself: a request for more of our SURBs, or a top-up.
    pub(super) fn handle_control(&mut self, message: Message, origin: Option<ClientAddress>) {
        match message.kind {
            MessageKind::SurbRequest => {
                let Some(to) = origin else {
                    return; // not through one of our SURBs: nobody to answer
                };
                let wanted = message
                    .body
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .unwrap_or(0)
                    .min(MAX_SURBS_PER_REQUEST);
                let wanted = self.top_ups.grant(to, wanted, Instant::now());
                if wanted == 0 {
                    self.stats
                        .surb_requests_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let sent = new_id().and_then(|id| {
                    self.queue_message(to, Vec::new(), wanted, id, MessageKind::SurbTopUp)
                });
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "cannot send more reply SURBs");
                }
            }
            MessageKind::SurbTopUp => {
                let Some(tag) = message.sender_tag else {
                    return;
                };
                if let Err(e) = self.surbs.add_received(&tag, &message.reply_surbs) {
                    tracing::warn!(error = %e, "cannot keep reply SURBs");
                    return;
                }
                self.requested.remove(&tag);
                for (id, body) in self.pending_replies.remove(&tag).unwrap_or_default() {
                    if let Err(e) = self.queue_reply(tag, body, id) {
                        tracing::warn!(error = %e, "a held reply cannot be sent");
                    }
                }
            }
            MessageKind::Data => {}
        }
    }
}
