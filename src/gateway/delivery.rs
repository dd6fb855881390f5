//! Final-hop delivery: payloads the Sphinx workers unwrapped for a client of this gateway.
//!
//! Each batch is stored in the mailbox in one transaction first; only then is the
//! SURB-ACK sent back through the mixnet (an acknowledgement means "stored durably") and
//! the client's session woken. Loop cover is stored and acknowledged like everything else:
//! it is sealed end to end, so the gateway cannot tell it from a message (its client
//! recognises it after decryption). A payload the mailbox refuses (quota) gets no
//! acknowledgement, so its sender retransmits it later; one it only *holds* for a client
//! online is acknowledged when that client acknowledges it (`mailbox::held`).

use std::sync::Arc;

use sphinx_packet::payload::Payload;
use tokio::sync::mpsc;

use crate::gateway::mailbox::{Incoming, Mailbox, Outcome};
use crate::gateway::sessions::Sessions;
use crate::gateway::surb_ack;
use crate::keys::KeyBytes;
use crate::message::{DROP_COVER_DESTINATION, Envelope};
use crate::metrics::{DropReason, Metrics};
use crate::mixnet::intake::ForwardItem;
use crate::mixnet::sphinx::{FinalHop, IDENTIFIER_SIZE};
use crate::telemetry::Throttle;

const BATCH: usize = 256;

pub struct Delivery {
    pub rx: mpsc::Receiver<FinalHop>,
    pub forward: mpsc::Sender<ForwardItem>,
    pub mailbox: Arc<Mailbox>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    /// Test hook: wait this long before taking anything (a stalled disk).
    pub stall: Option<std::time::Duration>,
}

/// A payload taken apart: what to store and which ack to send once it is stored.
struct Parsed {
    incoming: Incoming,
    ack: Option<Vec<u8>>,
}

impl Delivery {
    pub async fn run(mut self) {
        if let Some(stall) = self.stall {
            tokio::time::sleep(stall).await;
        }
        let mut batch = Vec::with_capacity(BATCH);
        let failure_log = Throttle::new(std::time::Duration::from_secs(30));
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            let parsed: Vec<Parsed> = batch.drain(..).filter_map(|hop| self.parse(hop)).collect();
            if parsed.is_empty() {
                continue;
            }
            let (incoming, acks): (Vec<Incoming>, Vec<Option<Vec<u8>>>) =
                parsed.into_iter().map(|p| (p.incoming, p.ack)).unzip();
            let mailbox = self.mailbox.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let outcomes = mailbox.store_acked(&incoming, &acks);
                (outcomes.map(|o| (o, acks)), incoming)
            })
            .await;
            let ((outcomes, acks), incoming) = match stored {
                Ok((Ok(stored), incoming)) => (stored, incoming),
                Ok((Err(e), incoming)) => {
                    // Not stored, so not acknowledged: the senders will retransmit.
                    self.metrics
                        .dropped_n(DropReason::MailboxFull, incoming.len() as u64);
                    if failure_log.allow() {
                        tracing::error!(error = %e, "mailbox write failed");
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "mailbox task failed");
                    continue;
                }
            };
            let mut woken: Vec<KeyBytes> = Vec::new();
            for ((outcome, item), ack) in outcomes.into_iter().zip(incoming).zip(acks) {
                match outcome {
                    Outcome::Refused => {
                        self.metrics.dropped(DropReason::MailboxFull);
                        continue;
                    }
                    // Acknowledged when its client acknowledges it (see `mailbox::held`).
                    Outcome::Held(_) => {}
                    Outcome::Stored(_) => {
                        if let Some(ack) = ack {
                            self.send_ack(&ack).await;
                        }
                    }
                }
                self.metrics.packets_delivered.inc();
                if !woken.contains(&item.client) {
                    woken.push(item.client);
                }
            }
            for client in woken {
                self.sessions.notify(&client);
            }
        }
    }

    fn parse(&self, hop: FinalHop) -> Option<Parsed> {
        if hop.destination == DROP_COVER_DESTINATION {
            self.metrics.drop_cover_received.inc();
            return None;
        }
        if hop.identifier != [0u8; IDENTIFIER_SIZE] {
            // A reply or an acknowledgement sent with a SURB: only its client can open it.
            return Some(Parsed {
                incoming: Incoming {
                    client: hop.destination,
                    identifier: hop.identifier,
                    body: hop.payload,
                },
                ack: None,
            });
        }
        let plaintext = Payload::from_bytes(&hop.payload).and_then(|p| p.recover_plaintext());
        let envelope = match plaintext {
            Ok(p) => Envelope::decode(&p),
            Err(_) => {
                self.metrics.dropped(DropReason::MalformedPacket);
                return None;
            }
        };
        match envelope {
            Ok(Envelope::Data { ack, fragment }) => Some(Parsed {
                incoming: Incoming {
                    client: hop.destination,
                    identifier: hop.identifier,
                    body: fragment,
                },
                ack,
            }),
            Err(_) => {
                self.metrics.dropped(DropReason::MalformedPacket);
                None
            }
        }
    }

    /// Sends a SURB-ACK: the SURB carries its own route and delays; its payload is empty.
    async fn send_ack(&self, surb: &[u8]) {
        let Some(item) = surb_ack::packet(surb) else {
            tracing::debug!("ignoring an unusable SURB-ACK");
            return;
        };
        if self.forward.send(item).await.is_ok() {
            self.metrics.acks_sent.inc();
        }
    }
}
