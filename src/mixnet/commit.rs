//! Group commit: the stage between the Sphinx workers and the forwarder that writes the
//! replay tags of unwrapped packets to disk before those packets go on.
//!
//! Workers hand over each batch they unwrapped with its tags and go back to unwrapping; this
//! thread takes every batch waiting, writes all their tags in one write per key and flushes
//! them with one `fdatasync` (`NYM_NODE_REPLAY_JOURNAL_SYNC`), then hands the packets on. A
//! flush's latency so overlaps the workers' next unwraps instead of stalling them, and its
//! cost is shared by every packet that arrived meanwhile. A batch whose tags cannot be
//! written is dropped (`replay_journal`): forwarded, it could be replayed after a crash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::mpsc;

use crate::metrics::{DropReason, Metrics};
use crate::mixnet::intake::ForwardItem;
use crate::mixnet::sphinx::{FinalHop, TagBatch};
use crate::telemetry::Throttle;

/// Batches waiting for a commit; beyond it workers wait (which backs up into the Sphinx
/// queue, and so into `overload` drops) rather than unwrapping work that cannot go on.
const PENDING_BATCHES: usize = 64;

/// What a worker unwrapped in one batch.
pub struct Unwrapped {
    pub tags: TagBatch,
    pub forward: Vec<ForwardItem>,
    pub deliver: Vec<FinalHop>,
}

/// Where committed packets go.
pub struct Handoff {
    pub forward: mpsc::Sender<ForwardItem>,
    /// Final-hop payloads; `None` on a mix node.
    pub deliver: Option<mpsc::Sender<FinalHop>>,
    pub metrics: Arc<Metrics>,
}

/// Starts the committer thread; it stops once every returned sender is dropped and what
/// they sent is handed on.
pub fn start(
    handoff: Handoff,
) -> std::io::Result<(Sender<Unwrapped>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(PENDING_BATCHES);
    let handle = std::thread::Builder::new()
        .name("replay-commit".into())
        .spawn(move || run(rx, handoff))?;
    Ok((tx, handle))
}

fn run(rx: Receiver<Unwrapped>, handoff: Handoff) {
    let throttle = Throttle::new(Duration::from_secs(30));
    let mut group = Vec::with_capacity(PENDING_BATCHES);
    let mut tags = TagBatch::default();
    while let Ok(first) = rx.recv() {
        group.push(first);
        group.extend(rx.try_iter().take(PENDING_BATCHES));
        for batch in &mut group {
            tags.append(&mut batch.tags);
        }
        let committed = commit(&mut tags, &handoff.metrics);
        for batch in group.drain(..) {
            match &committed {
                Ok(()) => handoff.hand_on(batch),
                Err(e) => {
                    let lost = (batch.forward.len() + batch.deliver.len()) as u64;
                    handoff.metrics.dropped_n(DropReason::ReplayJournal, lost);
                    if throttle.allow() {
                        tracing::error!(error = %e, packets = lost, "the replay journal cannot be written: dropping the packets it should protect (logged at most every 30s)");
                    }
                }
            }
        }
    }
}

fn commit(
    tags: &mut TagBatch,
    metrics: &Metrics,
) -> Result<(), crate::mixnet::tag_journal::JournalError> {
    if tags.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let result = tags.commit();
    metrics
        .replay_journal_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

impl Handoff {
    fn hand_on(&self, batch: Unwrapped) {
        for item in batch.forward {
            if self.forward.blocking_send(item).is_err() {
                self.metrics.dropped(DropReason::Shutdown);
            }
        }
        // Final hops never make the pipeline wait: slow mailbox storage must not stall the
        // packets this node forwards. Beyond the delivery queue they are dropped (not
        // acknowledged, so their senders retry).
        let Some(tx) = &self.deliver else {
            return;
        };
        for hop in batch.deliver {
            match tx.try_send(hop) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.dropped(DropReason::DeliveryQueueFull)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.metrics.dropped(DropReason::Shutdown)
                }
            }
        }
    }
}
