//! Egress: one task per peer, fed by a bounded channel.
//!
//! - A full channel drops the packet (`queue_full`); the forwarder never waits for a peer.
//! - Packets are written in batches: encrypted into one buffer, flushed with few syscalls.
//! - A flush that takes longer than `NYM_NODE_CONNECTION_WRITE_TIMEOUT` abandons the rest of
//!   its batch (`write_timeout`) but keeps the connection; frames already encrypted stay
//!   queued in order, because Noise nonces are sequential and the peer expects them. Three
//!   timeouts in a row close the connection; the next packet reconnects.
//! - Failed connects back off exponentially (`NYM_NODE_RECONNECT_BACKOFF_INITIAL`, doubling,
//!   capped at `NYM_NODE_RECONNECT_BACKOFF_MAX`, +-20% jitter). The packets of the failed
//!   attempt, and those that arrive while the peer is backed off, are held for the retry:
//!   at most `NYM_NODE_EGRESS_QUEUE` of them and none longer than `HOLD_LIMIT`; beyond
//!   either bound the oldest are dropped (`backoff`). So one refused connect (a peer
//!   restarting, a handshake lost to a flood) costs a retry's delay, not every packet sent
//!   meanwhile.
//! - A link with no traffic for `NYM_NODE_CONNECTION_IDLE_TIMEOUT` closes and its task ends;
//!   the next packet for that peer starts a new one.
//! - When the forwarder goes away (shutdown) each link flushes what it holds and closes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dns::Resolver;
use crate::keys::NodeId;
use crate::metrics::{DropReason, GaugeGuard, Metrics, Stage};
use crate::mixnet::framing::{FRAME_PLAINTEXT_LEN, WIRE_FRAME_LEN};
use crate::mixnet::noise::{self, LinkSender};
use crate::mixnet::sphinx::PacketBytes;
use crate::topology::TopologyHandle;

/// Packets taken from the channel per wake-up.
const BATCH: usize = 64;
/// Encrypted bytes handed to one `write` call (16 frames).
const CHUNK_BYTES: usize = 16 * WIRE_FRAME_LEN;
/// Consecutive write timeouts that close a connection.
const MAX_CONSECUTIVE_TIMEOUTS: u32 = 3;
/// How long a link may take to flush what it holds at shutdown when no write timeout is set.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
/// How long a packet may wait for a peer that cannot be reached. Longer, and its sender's
/// acknowledgement timer has most likely sent it again: it would arrive as a duplicate.
const HOLD_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct EgressSettings {
    pub queue: usize,
    pub idle_timeout: Option<Duration>,
    pub write_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// What every link needs; shared.
pub struct EgressContext {
    pub settings: EgressSettings,
    pub topology: TopologyHandle,
    pub noise_secret: [u8; 32],
    pub resolver: Arc<Resolver>,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
}

/// A packet on its way out.
pub struct Outgoing {
    pub packet: PacketBytes,
    pub released_at: std::time::Instant,
}

/// The forwarder's handle on all links. Owned by the forwarder alone: no locks.
pub struct Egress {
    ctx: Arc<EgressContext>,
    links: HashMap<NodeId, mpsc::Sender<Outgoing>>,
}

impl Egress {
    pub fn new(ctx: Arc<EgressContext>) -> Self {
        Egress {
            ctx,
            links: HashMap::new(),
        }
    }

    /// Hands `packet` to the link for `peer`, starting one if needed. Never waits.
    pub fn send(&mut self, peer: NodeId, packet: PacketBytes) {
        let mut out = Outgoing {
            packet,
            released_at: std::time::Instant::now(),
        };
        // Checked for every packet, not only when a link starts: a peer removed from the
        // topology gets nothing more, and dropping its sender ends its link.
        if !self.ctx.topology.contains(&peer) {
            self.links.remove(&peer);
            self.ctx.metrics.dropped(DropReason::UnknownPeer);
            return;
        }
        if let Some(tx) = self.links.get(&peer) {
            match tx.try_send(out) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    self.ctx.metrics.dropped(DropReason::QueueFull);
                    return;
                }
                // The link ended (idle or closed); start a new one below.
                Err(TrySendError::Closed(o)) => out = o,
            }
        }
        let (tx, rx) = mpsc::channel(self.ctx.settings.queue);
        let link = Link::new(peer, rx, self.ctx.clone());
        let span = tracing::info_span!("egress_link", peer = %peer.short());
        self.ctx.tracker.spawn(link.run().instrument(span));
        // A fresh channel has room for one packet.
        let _ = tx.try_send(out);
        self.links.insert(peer, tx);
    }

    /// Links currently running.
    pub fn link_count(&self) -> usize {
        self.links.values().filter(|tx| !tx.is_closed()).count()
    }
}

/// One established connection to a peer.
struct Connection {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    sender: LinkSender,
    plain: Box<[u8; FRAME_PLAINTEXT_LEN]>,
    /// Encrypted bytes not yet written; `pending[start..]` is still to go.
    pending: Vec<u8>,
    start: usize,
    /// Bytes written since the connection opened (counts whole frames forwarded).
    written: u64,
    consecutive_timeouts: u32,
    _active: GaugeGuard,
}

enum Flush {
    Done,
    /// The write timeout fired; `abandoned` packets of the batch were never encrypted.
    TimedOut {
        abandoned: usize,
    },
}

impl Connection {
    fn pending_frames(&self) -> u64 {
        // Frames already encrypted but not completely written.
        let unwritten = (self.pending.len() - self.start) as u64;
        unwritten.div_ceil(WIRE_FRAME_LEN as u64)
    }

    /// Writes `batch` (and anything pending from before) within `timeout`.
    /// On an I/O error the packets not yet encrypted are left in `batch`.
    async fn flush(
        &mut self,
        batch: &mut Vec<Outgoing>,
        timeout: Option<Duration>,
        metrics: &Metrics,
    ) -> std::io::Result<Flush> {
        let started = std::time::Instant::now();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut next = 0;
        let result = 'flush: loop {
            while self.pending.len() - self.start < CHUNK_BYTES && next < batch.len() {
                // Only fails when the 2^64 nonces of the session are used up.
                if let Err(e) = self.sender.encrypt_packet(
                    &batch[next].packet,
                    &mut self.plain,
                    &mut self.pending,
                ) {
                    break 'flush Err(std::io::Error::other(e));
                }
                next += 1;
            }
            if self.pending.len() == self.start {
                break Ok(Flush::Done);
            }
            let write = self.writer.write(&self.pending[self.start..]);
            let n = match deadline {
                Some(d) => match tokio::time::timeout_at(d, write).await {
                    Ok(r) => r,
                    Err(_) => break Ok(Flush::TimedOut { abandoned: 0 }),
                },
                None => write.await,
            };
            let n = match n {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            let frames_before = self.written / WIRE_FRAME_LEN as u64;
            self.written += n as u64;
            metrics
                .packets_forwarded
                .inc_by(self.written / WIRE_FRAME_LEN as u64 - frames_before);
            self.start += n;
            if self.start == self.pending.len() {
                self.pending.clear();
                self.start = 0;
            }
        };
        metrics
            .stage(Stage::SocketWrite)
            .observe(started.elapsed().as_secs_f64());
        let rest = batch.split_off(next);
        batch.clear();
        match result {
            Ok(Flush::TimedOut { .. }) => Ok(Flush::TimedOut {
                abandoned: rest.len(),
            }),
            Ok(Flush::Done) => Ok(Flush::Done),
            Err(e) => {
                *batch = rest;
                Err(e)
            }
        }
    }

    /// Resolves when the peer closes the connection (a responder never sends after the handshake).
    async fn closed(&mut self) {
        // End of stream, an error, or bytes (a responder never sends: a protocol
        // violation) all mean the link is done.
        let mut buf = [0u8; 64];
        let _ = self.reader.read(&mut buf).await;
    }
}

struct Link {
    peer: NodeId,
    rx: mpsc::Receiver<Outgoing>,
    ctx: Arc<EgressContext>,
    conn: Option<Connection>,
    failures: u32,
    retry_at: Option<Instant>,
    connected_before: bool,
}

enum Event {
    Packets(usize),
    Idle,
    PeerClosed,
    /// Packets added to those held for a backed-off peer.
    Held(usize),
    /// A backed-off peer may be tried again.
    Retry,
}

impl Link {
    fn new(peer: NodeId, rx: mpsc::Receiver<Outgoing>, ctx: Arc<EgressContext>) -> Self {
        Link {
            peer,
            rx,
            ctx,
            conn: None,
            failures: 0,
            retry_at: None,
            connected_before: false,
        }
    }

    async fn run(mut self) {
        // Packets taken from the channel and not yet written: one batch, or those held for
        // a peer being backed off.
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let event = match self.retry_due(&batch) {
                Some(at) => self.wait_for_retry(&mut batch, at).await,
                None => self.next_event(&mut batch).await,
            };
            match event {
                Event::Packets(0) | Event::Held(0) => {
                    // The forwarder is gone and the peer cannot be reached: nothing to wait for.
                    self.drop_all_held(&mut batch);
                    self.close_for_shutdown().await;
                    return;
                }
                Event::Packets(n) => {
                    self.observe_queue(&batch[batch.len() - n..]);
                    self.deliver(&mut batch).await;
                }
                Event::Held(n) => {
                    self.observe_queue(&batch[batch.len() - n..]);
                    self.drop_beyond_hold(&mut batch);
                }
                Event::Retry => {
                    self.drop_beyond_hold(&mut batch);
                    self.deliver(&mut batch).await;
                }
                Event::PeerClosed => {
                    tracing::info!(
                        exit_reason = "peer_closed",
                        "egress connection closed by the peer"
                    );
                    self.drop_connection(DropReason::Unreachable);
                }
                Event::Idle => {
                    // Refuse new packets (the forwarder starts a new link for them), then
                    // send whatever slipped in before the close.
                    self.rx.close();
                    while let Ok(p) = self.rx.try_recv() {
                        batch.push(p);
                    }
                    if !batch.is_empty() {
                        self.deliver(&mut batch).await;
                        // Held for a peer backed off meanwhile: this link is ending.
                        self.drop_all_held(&mut batch);
                    }
                    if self.conn.is_some() {
                        self.ctx.metrics.idle_closed_egress.inc();
                        let idle = self.ctx.settings.idle_timeout;
                        tracing::info!(
                            exit_reason = "idle_timeout",
                            idle_ms = idle.map_or(0, |d| d.as_millis() as u64),
                            "closing idle egress connection"
                        );
                        self.graceful_close().await;
                    }
                    return;
                }
            }
        }
    }

    /// What happens next on a link that holds nothing for a backed-off peer: packets, the
    /// idle timeout, or the peer closing.
    async fn next_event(&mut self, batch: &mut Vec<Outgoing>) -> Event {
        let idle = self.ctx.settings.idle_timeout;
        let conn = &mut self.conn;
        let peer_closed = async {
            match conn {
                Some(c) => c.closed().await,
                None => std::future::pending().await,
            }
        };
        let idle_timer = async {
            match idle {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = self.rx.recv_many(batch, BATCH) => Event::Packets(n),
            _ = idle_timer => Event::Idle,
            _ = peer_closed => Event::PeerClosed,
        }
    }

    /// When packets held for a peer that could not be reached may be tried again; None if
    /// nothing is held. (Held packets are what a failed connect left in the batch.)
    fn retry_due(&self, batch: &[Outgoing]) -> Option<Instant> {
        if self.conn.is_some() || batch.is_empty() {
            return None;
        }
        Some(self.retry_at.unwrap_or_else(Instant::now))
    }

    /// Keeps taking packets (the channel is drained, so a shutdown is seen at once) until
    /// the retry is due.
    async fn wait_for_retry(&mut self, batch: &mut Vec<Outgoing>, at: Instant) -> Event {
        tokio::select! {
            n = self.rx.recv_many(batch, BATCH) => Event::Held(n),
            _ = tokio::time::sleep_until(at) => Event::Retry,
        }
    }

    fn observe_queue(&self, taken: &[Outgoing]) {
        let queue = self.ctx.metrics.stage(Stage::EgressQueue);
        for p in taken {
            queue.observe(p.released_at.elapsed().as_secs_f64());
        }
    }

    /// Drops the oldest held packets beyond the hold's bounds: more than the queue's size,
    /// or waiting longer than `HOLD_LIMIT`. Held packets are in release order.
    fn drop_beyond_hold(&self, batch: &mut Vec<Outgoing>) {
        let too_many = batch.len().saturating_sub(self.ctx.settings.queue);
        let too_old = batch.partition_point(|p| p.released_at.elapsed() > HOLD_LIMIT);
        self.drop_held(batch, too_many.max(too_old));
    }

    fn drop_all_held(&self, batch: &mut Vec<Outgoing>) {
        self.drop_held(batch, batch.len());
    }

    /// Drops the `n` oldest held packets, counted as `backoff`.
    fn drop_held(&self, batch: &mut Vec<Outgoing>, n: usize) {
        if n > 0 {
            self.ctx.metrics.dropped_n(DropReason::Backoff, n as u64);
            batch.drain(..n);
        }
    }

    /// Sends one batch, connecting first if needed; every packet is either written or
    /// counted as dropped with exactly one reason, or (the peer cannot be reached) left in
    /// `batch`, held for the retry.
    async fn deliver(&mut self, batch: &mut Vec<Outgoing>) {
        if batch.is_empty() {
            return;
        }
        let metrics = self.ctx.metrics.clone();
        // One reconnect per batch: a peer that restarted gets the rest of the batch.
        for attempt in 0..2 {
            if self.conn.is_none() {
                if self.retry_at.is_some_and(|t| Instant::now() < t) {
                    return;
                }
                match self.connect().await {
                    Ok(conn) => {
                        if self.failures > 0 {
                            tracing::info!(
                                after_failures = self.failures,
                                "egress connection re-established"
                            );
                        }
                        if self.connected_before {
                            metrics.egress_reconnects.inc();
                        }
                        self.connected_before = true;
                        self.failures = 0;
                        self.retry_at = None;
                        self.conn = Some(conn);
                    }
                    Err(message) => {
                        metrics.egress_connect_failures.inc();
                        self.failures += 1;
                        let wait = backoff(
                            self.failures,
                            self.ctx.settings.backoff_initial,
                            self.ctx.settings.backoff_max,
                        );
                        self.retry_at = Some(Instant::now() + wait);
                        if self.failures == 1 {
                            tracing::warn!(error = %message, retry_in_ms = wait.as_millis() as u64, "cannot connect to peer; backing off");
                        } else {
                            tracing::debug!(error = %message, failures = self.failures, retry_in_ms = wait.as_millis() as u64, "still cannot connect to peer");
                        }
                        return;
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn
                .flush(batch, self.ctx.settings.write_timeout, &metrics)
                .await
            {
                Ok(Flush::Done) => {
                    conn.consecutive_timeouts = 0;
                    return;
                }
                Ok(Flush::TimedOut { abandoned }) => {
                    metrics.write_timeouts.inc();
                    metrics.dropped_n(DropReason::WriteTimeout, abandoned as u64);
                    conn.consecutive_timeouts += 1;
                    tracing::debug!(
                        abandoned,
                        consecutive = conn.consecutive_timeouts,
                        "egress write timed out"
                    );
                    if conn.consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS {
                        tracing::warn!(
                            exit_reason = "write_timeout",
                            "closing egress connection after {MAX_CONSECUTIVE_TIMEOUTS} write timeouts in a row"
                        );
                        self.drop_connection(DropReason::WriteTimeout);
                    }
                    return;
                }
                Err(e) => {
                    tracing::info!(exit_reason = "io_error", error = %e, "egress connection broke");
                    self.drop_connection(DropReason::Unreachable);
                    if attempt == 1 || batch.is_empty() {
                        metrics.dropped_n(DropReason::Unreachable, batch.len() as u64);
                        batch.clear();
                        return;
                    }
                }
            }
        }
    }

    /// Closes the connection, counting frames it still held under `reason`.
    fn drop_connection(&mut self, reason: DropReason) {
        if let Some(conn) = self.conn.take() {
            self.ctx.metrics.dropped_n(reason, conn.pending_frames());
        }
    }

    async fn connect(&self) -> Result<Connection, String> {
        let topology = self
            .ctx
            .topology
            .current()
            .ok_or_else(|| "no topology loaded".to_string())?;
        let node = topology
            .node(&self.peer)
            .ok_or_else(|| "peer is no longer in the topology".to_string())?;
        let address = node.mixnet_address.clone();
        let noise_key = node.noise_key;
        drop(topology);
        let stream = self
            .ctx
            .resolver
            .connect(&address, self.ctx.settings.connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let mut stream = stream;
        let handshake =
            tracing::info_span!("handshake", direction = "egress", peer_address = %address);
        let sender = noise::initiate(
            &mut stream,
            &self.ctx.noise_secret,
            &noise_key,
            self.ctx.settings.handshake_timeout,
        )
        .instrument(handshake)
        .await
        .map_err(|e| {
            self.ctx.metrics.handshake_failed(false, e.reason());
            // Whoever answers there is not our peer (or not any more): resolve afresh next time.
            self.ctx.resolver.invalidate(&address.host);
            format!("handshake with {address}: {e}")
        })?;
        let (reader, writer) = stream.into_split();
        Ok(Connection {
            reader,
            writer,
            sender,
            plain: Box::new([0u8; FRAME_PLAINTEXT_LEN]),
            pending: Vec::with_capacity(CHUNK_BYTES + WIRE_FRAME_LEN),
            start: 0,
            written: 0,
            consecutive_timeouts: 0,
            _active: GaugeGuard::new(&self.ctx.metrics.active_egress),
        })
    }

    /// The forwarder is gone: flush what is held, close cleanly.
    async fn close_for_shutdown(&mut self) {
        if self.conn.is_some() {
            tracing::info!(exit_reason = "shutdown", "closing egress connection");
            self.graceful_close().await;
        }
    }

    /// Writes out pending frames (bounded) and closes the write side so the peer reads
    /// everything before it sees the end of the stream.
    async fn graceful_close(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let limit = self.ctx.settings.write_timeout.unwrap_or(SHUTDOWN_FLUSH);
        let mut empty = Vec::new();
        match conn.flush(&mut empty, Some(limit), &self.ctx.metrics).await {
            Ok(Flush::Done) => {
                let _ = tokio::time::timeout(limit, conn.writer.shutdown()).await;
            }
            _ => {
                self.ctx
                    .metrics
                    .dropped_n(DropReason::Shutdown, conn.pending_frames());
            }
        }
    }
}

/// Reconnect delay after `failures` consecutive failures: exponential, capped, +-20% jitter.
pub fn backoff(failures: u32, initial: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (i, m) = (Duration::from_millis(200), Duration::from_secs(30));
        for _ in 0..100 {
            let first = backoff(1, i, m);
            assert!(first >= Duration::from_millis(160) && first <= Duration::from_millis(240));
            let third = backoff(3, i, m);
            assert!(third >= Duration::from_millis(640) && third <= Duration::from_millis(960));
            let capped = backoff(50, i, m);
            assert!(capped >= Duration::from_secs(24) && capped <= Duration::from_secs(36));
        }
    }
}
