//! Intake: the bounded queue between ingress and the Sphinx workers, and the workers.
//!
//! Unwrapping is ~95% of the cost of a packet, so this is where overload is shed: a packet
//! that cannot be queued is dropped *before* it is unwrapped (reason `overload`), so the
//! work the node does is work that gets forwarded. Fairness between peers is a per-peer
//! budget: all links of one peer (one Noise key) share at most
//! `NYM_NODE_SPHINX_QUEUE_PER_CONNECTION` waiting packets, so one flooding peer fills its
//! own budget and sheds its own packets while the others keep their share of the queue,
//! however many links it opens.
//!
//! The workers are plain threads (one per core by default), not async tasks: unwrapping is
//! CPU-bound and would otherwise stall the runtime's I/O. They hand each batch to the group
//! commit (`commit.rs`, which journals its replay tags before the packets go on) with a
//! blocking send, which backs up into this queue (and so into `overload` drops) rather
//! than dropping unwrapped work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::mpsc;

use crate::keys::{KeyBytes, NodeId};
use crate::metrics::{DropReason, Metrics, Stage};
use crate::mixnet::commit::{self, Unwrapped};
use crate::mixnet::sphinx::{FinalHop, PacketBytes, Processed, SphinxProcessor, TagBatch};
use crate::telemetry::Throttle;

/// Most packets a worker unwraps before handing its results on.
const WORKER_BATCH: usize = 8;

/// A packet waiting to be unwrapped.
struct Job {
    packet: PacketBytes,
    received_at: Instant,
    budget: Arc<AtomicUsize>,
}

/// An unwrapped packet on its way to the forwarder.
pub struct ForwardItem {
    pub next_hop: NodeId,
    /// Per-hop delay the packet asked for (already checked against the cap).
    pub delay: Duration,
    /// When the packet was ready (unwrapped, or handed over by a client): its delay runs
    /// from here, so time spent waiting for the forwarder counts against it.
    pub ready_at: tokio::time::Instant,
    pub packet: PacketBytes,
}

/// Where the workers send their results.
pub struct Downstream {
    pub forward: mpsc::Sender<ForwardItem>,
    /// Final-hop payloads; `None` on a mix node, which cannot deliver to clients.
    pub deliver: Option<mpsc::Sender<FinalHop>>,
}

/// The submitting side, cloned into every ingress connection.
#[derive(Clone)]
pub struct Intake {
    tx: Sender<Job>,
    per_connection: usize,
    metrics: Arc<Metrics>,
    /// The budget each peer's links share, while any of them is open.
    peers: Arc<parking_lot::Mutex<HashMap<KeyBytes, Weak<AtomicUsize>>>>,
}

/// One peer's share of the queue (shared by all its links).
pub struct ConnectionBudget(Arc<AtomicUsize>);

/// Hook for tests: extra work per packet, to make a node slower than its peers.
pub type SlowUnwrap = Option<Duration>;

impl Intake {
    /// Starts `workers` Sphinx threads; they stop once every `Intake` clone is dropped and
    /// the queue is empty. Returns the submitting side and the threads' handles.
    pub fn start(
        processor: Arc<SphinxProcessor>,
        workers: usize,
        capacity: usize,
        per_connection: usize,
        downstream: Downstream,
        metrics: Arc<Metrics>,
        slow_unwrap: SlowUnwrap,
    ) -> std::io::Result<(Intake, Vec<std::thread::JoinHandle<()>>)> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let can_deliver = downstream.deliver.is_some();
        let (committed, committer) = commit::start(commit::Handoff {
            forward: downstream.forward,
            deliver: downstream.deliver,
            metrics: metrics.clone(),
        })?;
        // One throttle per drop reason, so a flood of one kind does not hide another.
        let throttles: Arc<Vec<Throttle>> = Arc::new(
            DropReason::ALL
                .iter()
                .map(|_| Throttle::new(Duration::from_secs(30)))
                .collect(),
        );
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers.max(1) {
            let worker = Worker {
                rx: rx.clone(),
                processor: processor.clone(),
                commit: committed.clone(),
                can_deliver,
                metrics: metrics.clone(),
                throttles: throttles.clone(),
                slow_unwrap,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("sphinx-{i}"))
                    .spawn(move || worker.run())?,
            );
        }
        // Only the workers hold the committer's channel: it stops after the last of them,
        // having handed on everything they unwrapped (so it is joined last).
        drop(committed);
        handles.push(committer);
        Ok((
            Intake {
                tx,
                per_connection,
                metrics,
                peers: Arc::default(),
            },
            handles,
        ))
    }

    /// The budget of the peer with this Noise key: the same for all of its open links.
    pub fn peer_budget(&self, peer: &KeyBytes) -> ConnectionBudget {
        let mut peers = self.peers.lock();
        if let Some(b) = peers.get(peer).and_then(Weak::upgrade) {
            return ConnectionBudget(b);
        }
        // Forget peers with no open link left (the map stays as large as the live peers).
        peers.retain(|_, b| b.strong_count() > 0);
        let budget = Arc::new(AtomicUsize::new(0));
        peers.insert(*peer, Arc::downgrade(&budget));
        ConnectionBudget(budget)
    }

    /// Queues a packet for unwrapping, or sheds it (counted as `overload`) if this
    /// connection's budget or the whole queue is full (as `shutdown` once the workers have
    /// stopped). Never blocks.
    pub fn submit(
        &self,
        budget: &ConnectionBudget,
        packet: PacketBytes,
        received_at: Instant,
    ) -> bool {
        if budget.0.fetch_add(1, Ordering::Relaxed) >= self.per_connection {
            budget.0.fetch_sub(1, Ordering::Relaxed);
            self.metrics.dropped(DropReason::Overload);
            return false;
        }
        let job = Job {
            packet,
            received_at,
            budget: budget.0.clone(),
        };
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(job)) => {
                job.budget.fetch_sub(1, Ordering::Relaxed);
                self.metrics.dropped(DropReason::Overload);
                false
            }
            // The workers are gone: the node is stopping, not overloaded.
            Err(TrySendError::Disconnected(job)) => {
                job.budget.fetch_sub(1, Ordering::Relaxed);
                self.metrics.dropped(DropReason::Shutdown);
                false
            }
        }
    }

    /// Packets waiting for a worker.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

struct Worker {
    rx: Receiver<Job>,
    processor: Arc<SphinxProcessor>,
    /// To the group commit, which journals the batch's tags and hands its packets on.
    commit: crossbeam_channel::Sender<Unwrapped>,
    /// Whether this node delivers final hops (a gateway).
    can_deliver: bool,
    metrics: Arc<Metrics>,
    throttles: Arc<Vec<Throttle>>,
    slow_unwrap: SlowUnwrap,
}

impl Worker {
    fn run(self) {
        let mut forward = Vec::with_capacity(WORKER_BATCH);
        let mut deliver = Vec::new();
        let mut tags = TagBatch::default();
        while let Ok(first) = self.rx.recv() {
            // Unwrap what is already queued (up to a small batch) before handing results
            // on: the forwarder is woken once per batch instead of once per packet. Only
            // jobs that were already waiting are batched, so an idle node adds no latency.
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(job) = next.take() {
                self.unwrap(job, &mut forward, &mut deliver, &mut tags);
                taken += 1;
                if taken < WORKER_BATCH {
                    next = self.rx.try_recv().ok();
                }
            }
            self.metrics.sphinx_queue_packets.set(self.rx.len() as i64);
            if forward.is_empty() && deliver.is_empty() {
                // Nothing goes on (every packet refused): no tag needs the disk first.
                tags = TagBatch::default();
                continue;
            }
            let batch = Unwrapped {
                tags: std::mem::take(&mut tags),
                forward: std::mem::take(&mut forward),
                deliver: std::mem::take(&mut deliver),
            };
            if let Err(lost) = self.commit.send(batch) {
                let n = (lost.0.forward.len() + lost.0.deliver.len()) as u64;
                self.metrics.dropped_n(DropReason::Shutdown, n);
            }
        }
    }

    fn unwrap(
        &self,
        job: Job,
        forward: &mut Vec<ForwardItem>,
        deliver: &mut Vec<FinalHop>,
        tags: &mut TagBatch,
    ) {
        job.budget.fetch_sub(1, Ordering::Relaxed);
        if let Some(extra) = self.slow_unwrap {
            std::thread::sleep(extra);
        }
        let result = self.processor.process_into(&job.packet, tags);
        self.metrics
            .stage(Stage::ForwarderQueue)
            .observe(job.received_at.elapsed().as_secs_f64());
        {
            match result {
                Ok(Processed::Forward {
                    next_hop,
                    delay,
                    packet,
                }) => {
                    self.metrics.held_delay.observe(delay.as_secs_f64());
                    forward.push(ForwardItem {
                        next_hop,
                        delay,
                        ready_at: tokio::time::Instant::now(),
                        packet,
                    });
                }
                Ok(Processed::Final(hop)) => match self.can_deliver {
                    true => deliver.push(hop),
                    false => {
                        self.metrics.dropped(DropReason::NoRoute);
                        if self.throttles[DropReason::NoRoute.index()].allow() {
                            tracing::warn!(
                                "dropping a final-hop packet: a mix node cannot deliver to clients"
                            );
                        }
                    }
                },
                Err(rejection) => {
                    let reason = rejection.drop_reason();
                    self.metrics.dropped(reason);
                    // Replays and bad packets come from whoever built them, not from the
                    // authenticated peer that relayed them: count each, log rarely.
                    if self.throttles[reason.index()].allow() {
                        tracing::warn!(reason = reason.as_str(), error = %rejection, "dropping packet (drops are counted; this is logged at most every 30s)");
                    } else {
                        tracing::debug!(reason = reason.as_str(), error = %rejection, "dropping packet");
                    }
                }
            }
        }
    }
}
