//! The forwarder: one task owns the delay queue.
//!
//! On every wake it takes a bounded batch from the intake channel (packets the Sphinx
//! workers unwrapped, and packets gateway clients sent), then releases every packet that is
//! due, so a flood of new packets cannot hold back due ones and a long run of due packets
//! cannot stall intake. When the intake channel closes (the node is stopping and every
//! producer is gone) it releases whatever it still holds at once, counting those not yet
//! due as `released_early`, and drops its egress handle so each link flushes and closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::health::Health;
use crate::keys::NodeId;
use crate::metrics::{DropReason, Metrics, Stage};
use crate::mixnet::delay::DelayQueue;
use crate::mixnet::egress::Egress;
use crate::mixnet::intake::ForwardItem;
use crate::mixnet::sphinx::PacketBytes;

/// Items taken from the intake channel per wake.
const INTAKE_BATCH: usize = 256;
/// The forwarder wakes at least this often, so liveness can tell it is not wedged.
const HEARTBEAT: Duration = Duration::from_secs(1);

pub struct Forwarder {
    intake: mpsc::Receiver<ForwardItem>,
    queue: DelayQueue<(NodeId, PacketBytes)>,
    egress: Egress,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Most packets held for their delays at once.
    capacity: usize,
    /// Test hook: silently lose every n-th packet, as a lossy link would.
    lose_every: Option<u64>,
    released: u64,
}

impl Forwarder {
    pub fn new(
        intake: mpsc::Receiver<ForwardItem>,
        egress: Egress,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        capacity: usize,
        lose_every: Option<u64>,
    ) -> Self {
        Forwarder {
            intake,
            queue: DelayQueue::new(),
            egress,
            metrics,
            health,
            capacity,
            lose_every,
            released: 0,
        }
    }

    fn release(&mut self, peer: NodeId, packet: PacketBytes) {
        self.released += 1;
        if self
            .lose_every
            .is_some_and(|n| n > 0 && self.released.is_multiple_of(n))
        {
            tracing::trace!("test hook: losing a packet");
            return;
        }
        self.egress.send(peer, packet);
    }

    pub async fn run(mut self) {
        let _alive = self.health.forwarder_guard();
        let mut batch = Vec::with_capacity(INTAKE_BATCH);
        loop {
            let next_due = self.queue.next_due();
            let wake = next_due.map_or(Instant::now() + HEARTBEAT, |due| {
                due.min(Instant::now() + HEARTBEAT)
            });
            tokio::select! {
                biased;
                n = self.intake.recv_many(&mut batch, INTAKE_BATCH) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            self.health.forwarder_beat();
            let now = Instant::now();
            let overrun = self.metrics.stage(Stage::DelayOverrun).clone();
            for item in batch.drain(..) {
                let due = item.ready_at + item.delay;
                if due <= now {
                    overrun.observe(now.saturating_duration_since(due).as_secs_f64());
                    self.release(item.next_hop, item.packet);
                } else if self.queue.len() >= self.capacity {
                    // Packets due now still pass: only holding more is refused.
                    self.metrics.dropped(DropReason::DelayQueueFull);
                } else {
                    self.queue.push(due, (item.next_hop, item.packet));
                }
            }
            self.release_due(Instant::now());
        }
        self.release_all();
    }

    fn release_due(&mut self, now: Instant) {
        let overrun = self.metrics.stage(Stage::DelayOverrun).clone();
        while let Some((due, (peer, packet))) = self.queue.pop_due(now) {
            overrun.observe(now.saturating_duration_since(due).as_secs_f64());
            self.release(peer, packet);
        }
        self.metrics
            .delay_queue_packets
            .set(self.queue.len() as i64);
    }

    fn release_all(&mut self) {
        let now = Instant::now();
        let held = self.queue.drain_all();
        let early = held.iter().filter(|(due, _)| *due > now).count();
        if !held.is_empty() {
            tracing::info!(
                released = held.len(),
                released_early = early,
                "forwarder stopping: released every held packet"
            );
        }
        self.metrics.packets_released_early.inc_by(early as u64);
        for (_, (peer, packet)) in held {
            self.release(peer, packet);
        }
        self.metrics.delay_queue_packets.set(0);
    }
}
