//! Sending: what leaves in each upstream and loop slot, packets built at send time (the
//! keys of that moment), acknowledgements to the gateway, and retransmission of what its
//! recipient's gateway did not acknowledge.

use super::*;

impl Actor {
    pub(super) fn queue_message(
        &mut self,
        to: ClientAddress,
        body: Vec<u8>,
        reply_surbs: usize,
        id: MessageId,
        kind: MessageKind,
    ) -> Result<(), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        // A full outbox refuses before any SURB is made and kept for nothing.
        self.outbox.make_room(Self::priority_of(kind), 1)?;
        let mut surbs = Vec::with_capacity(reply_surbs);
        for _ in 0..reply_surbs {
            let (surb, identifier, recovery) = self.surb_to_self(&topology)?;
            self.surbs.add_handed_out(&identifier, &recovery, &to)?;
            self.stats.surbs_handed_out.fetch_add(1, Ordering::Relaxed);
            surbs.push(surb);
        }
        let message = Message {
            kind,
            sender_tag: (reply_surbs > 0).then(|| self.sender_tag(&to)),
            body,
            reply_surbs: surbs,
            receipt: None,
        };
        match self.config.receipt_timeout {
            Some(_) if kind == MessageKind::Data => {
                self.awaiting.insert(
                    id,
                    AwaitingReceipt {
                        to,
                        message,
                        resends: 0,
                        stored: false,
                        latest: [0; IDENTIFIER_SIZE],
                    },
                );
                let queued = self.send_awaiting(id);
                if queued.is_err() {
                    // Refused (the outbox is full): nothing of it is kept.
                    self.awaiting.remove(&id);
                    self.receipts.retain(|_, (m, _)| *m != id);
                }
                queued
            }
            _ => self.queue_fragments(id, to, &message),
        }
    }

    /// Which queue a message's fragments wait in: what we send on a recipient's behalf
    /// only takes slots the application leaves.
    fn priority_of(kind: MessageKind) -> Priority {
        match kind {
            MessageKind::SurbTopUp => Priority::Background,
            MessageKind::Data | MessageKind::SurbRequest => Priority::Application,
        }
    }

    /// Splits an encoded message into sealed fragments and queues each.
    pub(super) fn queue_fragments(
        &mut self,
        id: MessageId,
        to: ClientAddress,
        message: &Message,
    ) -> Result<(), ClientError> {
        let fragments = chunking::split(id, &message.encode(), self.sealed_len() - e2e::OVERHEAD)?;
        let priority = Self::priority_of(message.kind);
        self.outbox.make_room(priority, fragments.len())?;
        self.messages.insert(
            id,
            Outgoing {
                remaining: fragments.len(),
                failed: false,
            },
        );
        for (i, bytes) in fragments.into_iter().enumerate() {
            let key = (id, i as u16);
            self.fragments.insert(
                key,
                Fragment {
                    to,
                    bytes,
                    attempts: 0,
                    identifiers: Vec::new(),
                    last_mixes: Vec::new(),
                    priority,
                    postponed: 0,
                },
            );
            self.prepare(key)?;
        }
        Ok(())
    }

    /// Every sealed fragment of this client has this size, so a gateway sees no difference
    /// between a message's pieces and a loop.
    pub(super) fn sealed_len(&self) -> usize {
        Envelope::fragment_capacity(if self.config.acks { SURB_ACK_SIZE } else { 0 })
    }

    /// Seals `fragment` to `to` and wraps it in a Sphinx packet along a fresh route, with a
    /// fresh SURB-ACK back to us when acks are on.
    pub(super) fn build_data(
        &self,
        topology: &Topology,
        to: &ClientAddress,
        fragment: &[u8],
        avoid: &[NodeId],
    ) -> Result<Built, ClientError> {
        self.build_packet(topology, to, fragment, avoid, self.config.acks)
    }

    /// [`Actor::build_data`], with a SURB-ACK only when `acked`.
    fn build_packet(
        &self,
        topology: &Topology,
        to: &ClientAddress,
        fragment: &[u8],
        avoid: &[NodeId],
        acked: bool,
    ) -> Result<Built, ClientError> {
        let route = route::choose_avoiding(topology, &to.gateway, avoid)?;
        let mut mixes: Vec<NodeId> = route[..route.len() - 1]
            .iter()
            .map(|h| h.identity)
            .collect();
        let delays = packet::sample_delays(route.len(), self.config.mean_delay);
        let (ack, tracked) = if acked {
            let identifier = new_identifier()?;
            let ack_route = route::choose_avoiding(topology, &self.address.gateway, avoid)?;
            mixes.extend(ack_route[..ack_route.len() - 1].iter().map(|h| h.identity));
            let ack_delays = packet::sample_delays(ack_route.len(), self.config.mean_delay);
            let (surb, _recovery) =
                packet::build_surb(&ack_route, &self.address.identity, identifier, &ack_delays)?;
            let expected: Duration = delays.iter().chain(ack_delays.iter()).sum();
            (Some(surb), Some((identifier, expected)))
        } else {
            (None, None)
        };
        // Sealed anew for every transmission: the recipient's gateway sees only ciphertext,
        // and two copies of one fragment do not look alike.
        let envelope = Envelope::Data {
            ack,
            fragment: e2e::seal(&to.identity, &to.encryption, fragment, self.sealed_len())?,
        }
        .encode()
        .map_err(|e| packet::PacketError::from_message(e.to_string()))?;
        let (first_hop, packet) = packet::build_forward(&route, &to.identity, &envelope, &delays)?;
        Ok(Built {
            ready: Ready {
                first_hop,
                packet,
                tracked: None,
            },
            forward_delay: delays.iter().sum(),
            ack: tracked,
            mixes,
        })
    }

    /// Queues a fragment for its next slot (built only then, see [`outbox`]).
    pub(super) fn prepare(&mut self, key: FragmentKey) -> Result<(), ClientError> {
        if let Some(fragment) = self.fragments.get(&key) {
            self.outbox.push(fragment.priority, Queued::Fragment(key));
        }
        Ok(())
    }

    /// Builds the packet for a queued fragment now, with a fresh route and SURB-ACK and
    /// the keys of this moment; `None` when the fragment is done with meanwhile.
    pub(super) fn build_fragment(
        &mut self,
        key: FragmentKey,
    ) -> Result<Option<Ready>, ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let Some(fragment) = self.fragments.get(&key) else {
            return Ok(None);
        };
        let (to, bytes) = (fragment.to, fragment.bytes.clone());
        let avoid = fragment.last_mixes.clone();
        let Built {
            mut ready,
            ack,
            mixes,
            ..
        } = self.build_data(&topology, &to, &bytes, &avoid)?;
        match ack {
            Some((identifier, expected)) => {
                if let Some(fragment) = self.fragments.get_mut(&key) {
                    fragment.last_mixes = mixes;
                    fragment.identifiers.push(identifier);
                }
                self.by_identifier.insert(identifier, key);
                ready.tracked = Some((key, identifier, expected));
            }
            // Nothing will say it arrived: nothing to keep.
            None => {
                self.fragments.remove(&key);
            }
        }
        Ok(Some(ready))
    }

    /// The next packet of the outbox, built; `None` when the outbox is empty. A fragment
    /// that cannot be built (no route now) waits for a later slot, up to its retransmission
    /// budget, and its message fails after that.
    pub(super) fn next_packet(&mut self) -> Option<(Priority, Ready)> {
        while let Some((priority, item)) = self.outbox.pop() {
            let key = match item {
                Queued::Packet(ready) => return Some((priority, ready)),
                Queued::Fragment(key) => key,
            };
            match self.build_fragment(key) {
                Ok(Some(ready)) => return Some((priority, ready)),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build a packet; will retry");
                    let Some(fragment) = self.fragments.get_mut(&key) else {
                        continue;
                    };
                    fragment.attempts += 1;
                    if fragment.attempts > self.config.max_retransmissions {
                        self.fail_message(key.0);
                    } else {
                        self.outbox.push(priority, Queued::Fragment(key));
                    }
                    return None;
                }
            }
        }
        None
    }

    /// One upstream slot: a packet of the application or acks to the gateway (taking turns
    /// when both wait), else background packets, else drop cover.
    pub(super) async fn send_slot(&mut self) {
        let acks_waiting = !self.to_ack.is_empty();
        if acks_waiting && (self.ack_turn || self.outbox.is_empty()) {
            self.ack_turn = false;
            self.send_ack_slot().await;
            return;
        }
        self.ack_turn = acks_waiting;
        if let Some((priority, ready)) = self.next_packet() {
            if let Err(ready) = self.transmit(ready).await {
                self.put_back_unsent(priority, ready);
            }
            return;
        }
        match self.drop_cover() {
            Ok(built) => {
                if self.transmit(built.ready).await.is_ok() {
                    self.stats.cover_sent.fetch_add(1, Ordering::Relaxed);
                    self.stats.drop_cover_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot build a cover packet"),
        }
    }

    /// One loop slot: a loop cover packet, whatever else waits.
    pub(super) async fn send_loop(&mut self) {
        let (built, id) = match self.loop_cover() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot build a cover packet");
                return;
            }
        };
        if self.transmit(built.ready).await.is_err() {
            return;
        }
        self.stats.cover_sent.fetch_add(1, Ordering::Relaxed);
        self.stats.loops_sent.fetch_add(1, Ordering::Relaxed);
        let ack = built
            .ack
            .map_or([0; IDENTIFIER_SIZE], |(identifier, _)| identifier);
        if built.ack.is_some() {
            self.cover_acks.insert(ack);
        }
        self.loops.insert(id);
        // Back in our mailbox after its forward delays; the slack covers the rest.
        self.deadlines.push(
            Instant::now() + built.forward_delay + self.slack(),
            (ack, (id, LOOP_INDEX)),
        );
    }

    /// A packet whose write failed waits for the next session: a fragment's is built anew
    /// then (keys and route of that moment), a reply's (fixed by its SURB) as it is.
    fn put_back_unsent(&mut self, priority: Priority, ready: Ready) {
        match ready.tracked {
            Some((key, _, _)) => self.outbox.put_back(priority, Queued::Fragment(key)),
            None => self.outbox.put_back(priority, Queued::Packet(ready)),
        }
    }

    /// An empty fragment (one piece of an empty message) under a fresh id.
    pub(super) fn empty_fragment(&self) -> Result<(MessageId, Vec<u8>), ClientError> {
        let id = new_id()?;
        let fragment = chunking::split(id, &[], self.sealed_len() - e2e::OVERHEAD)?
            .pop()
            .unwrap_or_default();
        Ok((id, fragment))
    }

    /// Loop cover: a sealed, acknowledged packet to ourselves through the mixnet, like any
    /// message. Our gateway stores and acknowledges it as it does everything; only we can
    /// tell it is a loop, once it comes back and opens. One that does not come back in time
    /// is counted missing: packets are being dropped or delayed somewhere.
    pub(super) fn loop_cover(&self) -> Result<(Built, MessageId), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let (id, fragment) = self.empty_fragment()?;
        Ok((
            self.build_data(&topology, &self.address, &fragment, &[])?,
            id,
        ))
    }

    /// Drop cover: a sealed packet for the drop destination at a random gateway
    /// ([`DROP_COVER_DESTINATION`]), which discards it. (Sent to a made-up client instead, it
    /// would be stored under the gateway's budget for unknown clients, and a client's drop
    /// cover alone fills that budget in minutes, shutting out first messages to new clients.)
    pub(super) fn drop_cover(&self) -> Result<Built, ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let gateway = route::choose_gateway(&topology)?.identity_key;
        let nobody = Identity::generate().map_err(|e| ClientError::Random(e.to_string()))?;
        let (_, fragment) = self.empty_fragment()?;
        let to = ClientAddress {
            identity: DROP_COVER_DESTINATION,
            ..ClientAddress::of(&nobody, gateway)
        };
        // No SURB-ACK: the gateway discards it unacknowledged.
        self.build_packet(&topology, &to, &fragment, &[], false)
    }

    /// Sends the whole outbox at once (no cover traffic: nothing to hide the rate in).
    pub(super) async fn flush_outbox(&mut self) {
        while let Some((priority, ready)) = self.next_packet() {
            if let Err(ready) = self.transmit(ready).await {
                self.put_back_unsent(priority, ready);
                break;
            }
        }
    }

    /// An upstream slot carrying acknowledgements to the gateway (as many as one frame holds).
    pub(super) async fn send_ack_slot(&mut self) {
        let Some((sender, _)) = self.session.as_mut() else {
            return;
        };
        let take = self.to_ack.len().min(crate::gateway::protocol::MAX_ACK_IDS);
        let ids: Vec<u64> = self.to_ack.drain(..take).collect();
        if sender.send(&ClientMessage::Ack { ids }).await.is_err() {
            // Not deleted: the gateway delivers them again next session, acked then.
            self.session = None;
        }
    }

    /// Writes one packet to the gateway; the packet back if the session failed.
    pub(super) async fn transmit(&mut self, ready: Ready) -> Result<(), Ready> {
        let Some((sender, _)) = self.session.as_mut() else {
            return Err(ready);
        };
        let msg = ClientMessage::Send {
            first_hop: ready.first_hop,
            packet: ready.packet.clone(),
        };
        if sender.send(&msg).await.is_err() {
            self.session = None;
            return Err(ready);
        }
        self.stats.packets_sent.fetch_add(1, Ordering::Relaxed);
        if let Some((key, identifier, expected)) = ready.tracked {
            self.deadlines
                .push(Instant::now() + expected + self.slack(), (identifier, key));
        }
        Ok(())
    }

    pub(super) fn retransmit_due(&mut self) {
        let now = Instant::now();
        // Acks and loops wait in our downstream's backlog at the gateway: late, not lost.
        let backlogged = self.downstream_backlogged();
        while let Some((_, (identifier, key))) = self.deadlines.pop_due(now) {
            if backlogged && self.postpone(key) {
                self.deadlines.push(now + self.slack(), (identifier, key));
                continue;
            }
            if key.1 == LOOP_INDEX {
                if self.loops.remove(&key.0) {
                    self.stats.loops_missing.fetch_add(1, Ordering::Relaxed);
                }
                // Its ack, had it been coming, would be in by now too.
                self.cover_acks.remove(&identifier);
                continue;
            }
            if key.1 == RECEIPT_INDEX {
                self.receipt_overdue(key.0, identifier);
                continue;
            }
            // Only the newest copy's deadline counts; older copies were already replaced.
            let Some(fragment) = self.fragments.get_mut(&key) else {
                continue;
            };
            if fragment.identifiers.last() != Some(&identifier) {
                continue;
            }
            fragment.attempts += 1;
            if fragment.attempts > self.config.max_retransmissions {
                self.fail_message(key.0);
                continue;
            }
            self.stats.retransmissions.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.prepare(key) {
                tracing::warn!(error = %e, "cannot retransmit; will retry");
                self.deadlines
                    .push(now + self.config.ack_slack, (identifier, key));
            }
        }
    }

    /// Whether a deadline due while our downstream is backlogged is put off: a loop's
    /// always, a fragment's up to [`MAX_POSTPONEMENTS`] times, a receipt's never (its wait
    /// is the sender's to choose).
    fn postpone(&mut self, key: FragmentKey) -> bool {
        match key.1 {
            LOOP_INDEX => true,
            RECEIPT_INDEX => false,
            _ => match self.fragments.get_mut(&key) {
                Some(f) if f.postponed < MAX_POSTPONEMENTS => {
                    f.postponed += 1;
                    true
                }
                _ => false,
            },
        }
    }

    /// Stops tracking (and retransmitting) every fragment of message `id`.
    pub(super) fn forget_fragments(&mut self, id: MessageId) {
        let keys: Vec<FragmentKey> = self
            .fragments
            .keys()
            .filter(|k| k.0 == id)
            .copied()
            .collect();
        for key in keys {
            if let Some(f) = self.fragments.remove(&key) {
                for i in f.identifiers {
                    self.by_identifier.remove(&i);
                }
            }
        }
    }

    pub(super) fn fail_message(&mut self, id: MessageId) {
        self.forget_fragments(id);
        if let Some(m) = self.messages.get_mut(&id)
            && !m.failed
        {
            m.failed = true;
            let _ = self.events.try_send(Event::Failed { id });
        }
        self.messages.remove(&id);
        self.awaiting.remove(&id);
        self.receipts.retain(|_, (m, _)| *m != id);
    }

    /// Tells the gateway which payloads we have, so it deletes them.
    pub(super) async fn flush_acks(&mut self) {
        if self.to_ack.is_empty() {
            return;
        }
        let Some((sender, _)) = self.session.as_mut() else {
            return;
        };
        let ids = std::mem::take(&mut self.to_ack);
        // One Ack message must fit one frame.
        for chunk in ids.chunks(crate::gateway::protocol::MAX_ACK_IDS) {
            let ack = ClientMessage::Ack {
                ids: chunk.to_vec(),
            };
            if sender.send(&ack).await.is_err() {
                self.session = None;
                return;
            }
        }
    }
}
