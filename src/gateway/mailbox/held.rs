//! Held payloads: what the mailbox takes for a client online once its durable space is
//! full, out of the reserve kept for clients online.
//!
//! A held payload is stored and pushed like any other, but it is not yet *acknowledged*:
//! its SURB-ACK is kept with it and sent into the mixnet only when the client acknowledges
//! the payload ([`Mailbox::ack_releasing`]). Until then its sender treats it as not
//! delivered. So the mailbox may drop it without losing anything a sender was told was
//! safe, and it does, when:
//! - the client's last session ends (the reserve is for clients online);
//! - the client has not acknowledged it within [`HELD_TTL`] (a client that takes payloads
//!   and never acknowledges them cannot keep its share);
//! - the gateway restarts.
//!
//! Its sender retransmits, and it lands again, durably if there is room by then. Nobody
//! keeps the reserve by leaving, by not acknowledging, or by having filled it first.

use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable};

use super::presence::Presence;
use super::{EXPIRY_BATCH, HELD, Mailbox, MailboxError, err, message_key, unix_now};
use crate::keys::KeyBytes;

/// How long a held payload waits for its client's acknowledgement.
pub const HELD_TTL: Duration = Duration::from_secs(120);

impl Mailbox {
    /// Drops every held payload that `pick(client, stored_at)` selects. Returns how many.
    pub(super) fn release_held(
        &self,
        pick: impl Fn(&KeyBytes, u64) -> bool,
    ) -> Result<usize, MailboxError> {
        let mut presence = self.writer.lock();
        let entries = self.held_entries(None, |c, at| pick(c, at))?;
        self.drop_held(&mut presence, &entries)
    }

    /// Drops the held payloads whose client is absent or that waited past [`HELD_TTL`]
    /// (the minute sweep). Returns how many.
    pub fn release_stale_held(&self) -> Result<usize, MailboxError> {
        let mut presence = self.writer.lock();
        let cutoff = unix_now().saturating_sub(HELD_TTL.as_secs());
        let entries = self.held_entries(None, |client, stored_at| {
            !presence.is_present(client) || stored_at < cutoff
        })?;
        self.drop_held(&mut presence, &entries)
    }

    /// Drops every held payload of `client` (its last session ended, or its first one
    /// started with some left behind). The caller holds the writer lock.
    pub(super) fn release_held_of(
        &self,
        presence: &mut Presence,
        client: &KeyBytes,
    ) -> Result<usize, MailboxError> {
        let entries = self.held_entries(Some(client), |_, _| true)?;
        self.drop_held(presence, &entries)
    }

    /// Brings every present client's held bytes down to its equal share of the reserve,
    /// dropping its newest held payloads (a newcomer's share is free at once). The caller
    /// holds the writer lock.
    pub(super) fn trim_held_to_shares(&self, presence: &mut Presence) -> Result<(), MailboxError> {
        let share = self.limits.present_reserve / presence.count().max(1) as u64;
        for (client, mut held) in presence.over_share(share) {
            let mut newest_first = self.held_entries(Some(&client), |_, _| true)?;
            newest_first.reverse();
            let mut excess = Vec::new();
            let txn = self.db.begin_read().map_err(err)?;
            let messages = txn.open_table(super::MESSAGES).map_err(err)?;
            for (c, id) in newest_first {
                if held <= share {
                    break;
                }
                let Some(value) = messages.get(&message_key(&c, id)).map_err(err)? else {
                    continue;
                };
                let body = value
                    .value()
                    .get(super::IDENTIFIER_SIZE + 8..)
                    .unwrap_or_default();
                held = held.saturating_sub(super::cost(body));
                excess.push((c, id));
            }
            drop(messages);
            drop(txn);
            self.drop_held(presence, &excess)?;
        }
        Ok(())
    }

    /// Held payloads (of `client`, or of everyone) that `pick` selects.
    fn held_entries(
        &self,
        client: Option<&KeyBytes>,
        pick: impl Fn(&KeyBytes, u64) -> bool,
    ) -> Result<Vec<(KeyBytes, u64)>, MailboxError> {
        let txn = self.db.begin_read().map_err(err)?;
        let held = txn.open_table(HELD).map_err(err)?;
        let mut out = Vec::new();
        let mut take = |key: &[u8; 40], record: &[u8]| {
            let mut c = [0u8; 32];
            c.copy_from_slice(&key[..32]);
            let mut id = [0u8; 8];
            id.copy_from_slice(&key[32..]);
            let mut at = [0u8; 8];
            at.copy_from_slice(record.get(..8).unwrap_or(&[0; 8]));
            let c = KeyBytes(c);
            if pick(&c, u64::from_be_bytes(at)) {
                out.push((c, u64::from_be_bytes(id)));
            }
        };
        match client {
            Some(c) => {
                let (from, to) = (message_key(c, 0), message_key(c, u64::MAX));
                for entry in held.range::<&[u8; 40]>(&from..=&to).map_err(err)? {
                    let (k, v) = entry.map_err(err)?;
                    take(k.value(), v.value());
                }
            }
            None => {
                for entry in held.iter().map_err(err)? {
                    let (k, v) = entry.map_err(err)?;
                    take(k.value(), v.value());
                }
            }
        }
        Ok(out)
    }

    /// Deletes held payloads without acknowledging their senders.
    fn drop_held(
        &self,
        presence: &mut Presence,
        entries: &[(KeyBytes, u64)],
    ) -> Result<usize, MailboxError> {
        let mut dropped = 0;
        for chunk in entries.chunks(EXPIRY_BATCH) {
            dropped += self.delete_locked(presence, chunk)?.0;
        }
        Ok(dropped)
    }
}
