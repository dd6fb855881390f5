//! Ingress: the mixnet listener and one read loop per peer connection.
//!
//! - Admission in two stages, so strangers cannot crowd out peers. During the handshake a
//!   connection holds a place (`admission.rs`: a silent connection gives its place up to a
//!   newer one; one past its first message is capped per address group); after it, an
//!   authenticated link holds one of `NYM_NODE_MAX_INGRESS_CONNECTIONS` link slots instead.
//! - The first handshake message must arrive within
//!   `NYM_NODE_HANDSHAKE_FIRST_MESSAGE_TIMEOUT`, the whole Noise handshake within
//!   `NYM_NODE_HANDSHAKE_TIMEOUT`, and the initiator must be a node of the topology.
//! - Reads are batched: many frames per syscall, decoded from one buffer. A frame whose
//!   length, version or authentication is wrong closes the connection (the stream cannot
//!   be trusted after it) and is counted; other connections are untouched.
//! - A connection idle for `NYM_NODE_CONNECTION_IDLE_TIMEOUT` is closed and counted; one that
//!   starts a frame and does not finish it within `NYM_NODE_FRAME_READ_TIMEOUT` is closed.
//! - Decrypted packets go to the intake, which sheds them if the workers are saturated.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{Admission, Place};
use crate::health::Health;
use crate::keys::KeyBytes;
use crate::metrics::{DropReason, GaugeGuard, HandshakeFailure, Metrics, RefusalReason};
use crate::mixnet::framing::{
    self, FRAME_CIPHERTEXT_LEN, FRAME_PLAINTEXT_LEN, FrameError, WIRE_FRAME_LEN,
};
use crate::mixnet::intake::{ConnectionBudget, Intake};
use crate::mixnet::noise::{self, LinkReceiver, ResponderTimeouts};
use crate::mixnet::sphinx::PACKET_SIZE;
use crate::telemetry::Throttle;
use crate::topology::TopologyHandle;

/// Read buffer per connection: room for many frames per syscall.
const READ_BUFFER: usize = 32 * WIRE_FRAME_LEN;

#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub handshake_timeout: Duration,
    pub first_message_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub frame_read_timeout: Duration,
    /// Authenticated links.
    pub max_connections: usize,
    pub max_handshakes_per_address: usize,
    pub max_pending_handshakes: usize,
    /// Links one peer (Noise key) may hold; a newer one replaces the oldest.
    pub max_links_per_peer: usize,
}

/// The open links of each peer, oldest first, so a newer link can replace the oldest.
#[derive(Default)]
struct PeerLinks {
    links: parking_lot::Mutex<HashMap<KeyBytes, VecDeque<(u64, CancellationToken)>>>,
    next: std::sync::atomic::AtomicU64,
}

/// A link's place among its peer's; removed however the link ends.
struct PeerLink {
    registry: Arc<PeerLinks>,
    key: KeyBytes,
    id: u64,
    replaced: CancellationToken,
}

impl PeerLinks {
    /// Registers a new link of `key`, closing the oldest ones beyond `max`.
    fn register(self: &Arc<Self>, key: KeyBytes, max: usize) -> PeerLink {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let replaced = CancellationToken::new();
        let mut links = self.links.lock();
        let list = links.entry(key).or_default();
        list.push_back((id, replaced.clone()));
        while list.len() > max {
            if let Some((_, oldest)) = list.pop_front() {
                oldest.cancel();
            }
        }
        PeerLink {
            registry: self.clone(),
            key,
            id,
            replaced,
        }
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        let mut links = self.registry.links.lock();
        if let Some(list) = links.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                links.remove(&self.key);
            }
        }
    }
}

pub struct IngressContext {
    pub settings: IngressSettings,
    pub noise_secret: [u8; 32],
    pub topology: TopologyHandle,
    pub intake: Intake,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Accepts connections until `stop` fires. Every connection task watches `stop` too, so
/// when this returns and the tasks end, the last `Intake` handle is dropped.
pub async fn run(
    listener: TcpListener,
    ctx: Arc<IngressContext>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let _alive = ctx.health.accept_loop_guard();
    let permits = Arc::new(Semaphore::new(ctx.settings.max_connections));
    let peer_links = Arc::new(PeerLinks::default());
    let metrics = ctx.metrics.clone();
    let admission = Admission::new(
        ctx.settings.max_pending_handshakes,
        ctx.settings.max_handshakes_per_address,
        Arc::new(move |reason| metrics.refused(reason)),
    );
    let refusal_log = Arc::new(Throttle::new(Duration::from_secs(30)));
    let unknown_key_log = Arc::new(Throttle::new(Duration::from_secs(30)));
    let mut accept_backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(x) => {
                accept_backoff = Duration::from_millis(1);
                x
            }
            Err(e) => {
                // Usually out of file descriptors: wait and try again rather than die.
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(accept_backoff).await;
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let place = {
            use std::os::fd::AsRawFd;
            let fd = stream.as_raw_fd();
            admission.admit(
                remote.ip(),
                Some(Box::new(move || first_message_waiting(fd))),
            )
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        let unknown_key_log = unknown_key_log.clone();
        let admitted = Admitted {
            place,
            permits: permits.clone(),
            peer_links: peer_links.clone(),
            refusal_log: refusal_log.clone(),
        };
        tracker.spawn(async move {
            handle(stream, remote, ctx, stop, admitted, unknown_key_log).await;
        });
    }
    tracing::info!("mixnet listener closed");
}

/// Whether a whole first handshake message is already waiting on a just-accepted
/// connection (a real peer writes it the moment its connect completes). A peek, without
/// waiting and without reading.
fn first_message_waiting(fd: std::os::fd::RawFd) -> bool {
    let mut buf = [0u8; noise::FIRST_MESSAGE_WIRE_LEN];
    // Straight to the socket: tokio's own peek answers from its readiness cache, which has
    // not heard of a connection accepted a moment ago. The admission calls this until the
    // connection's place is released, which its task does before it closes the socket
    // (and a peek of a reused descriptor would read nothing and change nothing).
    // SAFETY: `buf` is valid for `buf.len()` bytes and outlives the call; recv with
    // MSG_PEEK | MSG_DONTWAIT neither blocks nor consumes.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= noise::FIRST_MESSAGE_WIRE_LEN as isize
}

/// What a new connection holds and needs to become a link.
struct Admitted {
    place: Place,
    permits: Arc<Semaphore>,
    peer_links: Arc<PeerLinks>,
    refusal_log: Arc<Throttle>,
}

async fn handle(
    mut stream: TcpStream,
    remote: SocketAddr,
    ctx: Arc<IngressContext>,
    stop: CancellationToken,
    admitted: Admitted,
    unknown_key_log: Arc<Throttle>,
) {
    let Admitted {
        place,
        permits,
        peer_links,
        refusal_log,
    } = admitted;
    let _ = stream.set_nodelay(true);
    let Some((receiver, key)) =
        handshake(&mut stream, remote, &ctx, &stop, place, &unknown_key_log).await
    else {
        return;
    };
    // Authenticated: the handshake place went back, a link slot is needed now.
    let Ok(_permit) = permits.try_acquire_owned() else {
        ctx.metrics.refused(RefusalReason::Capacity);
        if refusal_log.allow() {
            tracing::warn!(
                %remote,
                limit = ctx.settings.max_connections,
                "closing ingress link: at capacity (counted; logged at most every 30s)"
            );
        }
        return;
    };
    let link = peer_links.register(key, ctx.settings.max_links_per_peer);
    let peer = ctx
        .topology
        .current()
        .and_then(|t| t.node_by_noise_key(&key).map(|n| n.name.clone()))
        .unwrap_or_default();
    let span = tracing::info_span!("ingress_connection", %peer, %remote);
    read_link(stream, receiver, key, &ctx, &stop, &link)
        .instrument(span)
        .await;
}

/// The responder's Noise handshake, holding the connection's admission `place` until it
/// ends. None if it failed (counted), was cut short, or lost its place.
async fn handshake(
    stream: &mut TcpStream,
    remote: SocketAddr,
    ctx: &IngressContext,
    stop: &CancellationToken,
    place: Place,
    unknown_key_log: &Throttle,
) -> Option<(LinkReceiver, KeyBytes)> {
    let topology = ctx.topology.clone();
    let span = tracing::info_span!("handshake", direction = "ingress", %remote);
    let timeouts = ResponderTimeouts {
        first_message: ctx.settings.first_message_timeout,
        whole: ctx.settings.handshake_timeout,
    };
    let is_member = |key: &KeyBytes| {
        topology
            .current()
            .is_some_and(|t| t.node_by_noise_key(key).is_some())
    };
    let result = tokio::select! {
        _ = stop.cancelled() => return None,
        // A newer connection took the place (counted by the admission).
        _ = place.closed() => return None,
        r = noise::respond(stream, &ctx.noise_secret, timeouts, is_member, || place.greeted())
            .instrument(span.clone()) => r,
    };
    match result {
        Ok(ok) => Some(ok),
        Err(e) => {
            let reason = e.reason();
            ctx.metrics.handshake_failed(true, reason);
            if reason == HandshakeFailure::UnknownKey {
                if unknown_key_log.allow() {
                    tracing::warn!(parent: &span, error = %e, "refused ingress link from a key outside the topology (counted; logged at most every 30s)");
                }
            } else {
                tracing::debug!(parent: &span, error = %e, "ingress handshake failed");
            }
            None
        }
    }
}

/// Reads an authenticated link until it ends: batched reads, every complete frame to the
/// intake, an idle deadline between frames and a whole-frame deadline within one.
async fn read_link(
    mut stream: TcpStream,
    mut receiver: LinkReceiver,
    key: KeyBytes,
    ctx: &IngressContext,
    stop: &CancellationToken,
    link: &PeerLink,
) {
    let _active = GaugeGuard::new(&ctx.metrics.active_ingress);
    tracing::debug!("ingress connection established");
    let budget = ctx.intake.peer_budget(&key);
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut plain = Box::new([0u8; FRAME_PLAINTEXT_LEN]);
    let metrics = &ctx.metrics;
    // When the frame being read must be complete: one deadline for the whole frame, so a
    // peer trickling a byte at a time cannot hold a half-read frame (and its slot).
    let mut frame_deadline: Option<tokio::time::Instant> = None;
    // A peer removed from the topology loses its links at the reload that removes it.
    let mut changes = ctx.topology.changes();
    let mut watching = true;
    loop {
        match take_frames(&mut buf, &mut receiver, &mut plain, ctx, &budget) {
            Ok(true) => frame_deadline = None,
            Ok(false) => {}
            Err(()) => return,
        }
        if buf.capacity() - buf.len() < WIRE_FRAME_LEN {
            buf.reserve(READ_BUFFER);
        }
        let deadline = if buf.is_empty() {
            frame_deadline = None;
            ctx.settings
                .idle_timeout
                .map(|t| tokio::time::Instant::now() + t)
        } else {
            Some(*frame_deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + ctx.settings.frame_read_timeout
            }))
        };
        let read = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, stream.read_buf(&mut buf)).await,
                None => Ok(stream.read_buf(&mut buf).await),
            }
        };
        let read = tokio::select! {
            _ = stop.cancelled() => {
                tracing::debug!(exit_reason = "shutdown", "closing ingress connection");
                return;
            }
            _ = link.replaced.cancelled() => {
                tracing::debug!(exit_reason = "replaced", "closing ingress connection: the peer opened a newer link");
                return;
            }
            changed = changes.changed(), if watching => {
                watching = changed.is_ok();
                let member = ctx
                    .topology
                    .current()
                    .is_some_and(|t| t.node_by_noise_key(&key).is_some());
                if !member {
                    tracing::info!(exit_reason = "left_topology", "closing ingress connection: the peer is no longer in the topology");
                    return;
                }
                continue;
            }
            r = read => r,
        };
        if !still_open(read, buf.is_empty(), metrics) {
            return;
        }
    }
}

/// What one read of a link says: true if the link stays open. Closes (counted, logged) on
/// the peer's close, an I/O error, the idle deadline (`between_frames`) or an unfinished
/// frame's deadline.
fn still_open(
    read: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
    between_frames: bool,
    metrics: &Metrics,
) -> bool {
    match read {
        Ok(Ok(0)) => {
            if !between_frames {
                metrics.dropped(DropReason::MalformedFrame);
                tracing::debug!("peer closed the connection in the middle of a frame");
            }
            tracing::debug!(
                exit_reason = "peer_closed",
                "ingress connection closed by the peer"
            );
            false
        }
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(exit_reason = "io_error", error = %e, "ingress connection broke");
            false
        }
        Err(_) if between_frames => {
            metrics.idle_closed_ingress.inc();
            tracing::info!(
                exit_reason = "idle_timeout",
                "closing idle ingress connection"
            );
            false
        }
        Err(_) => {
            metrics.dropped(DropReason::MalformedFrame);
            tracing::warn!(
                exit_reason = "frame_read_timeout",
                "closing ingress connection: frame not completed in time"
            );
            false
        }
    }
}

/// Hands every complete frame already in `buf` to the intake; true if there was one.
/// Err: a frame whose length, authentication or header is wrong (counted): the stream
/// cannot be trusted after it, so the link closes.
fn take_frames(
    buf: &mut BytesMut,
    receiver: &mut LinkReceiver,
    plain: &mut [u8; FRAME_PLAINTEXT_LEN],
    ctx: &IngressContext,
    budget: &ConnectionBudget,
) -> Result<bool, ()> {
    let metrics = &ctx.metrics;
    let mut took = false;
    loop {
        let body = match framing::next_frame(buf, FRAME_CIPHERTEXT_LEN, true) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(took),
            Err(e) => {
                let reason = match e {
                    FrameError::Oversized(_) => DropReason::OversizedFrame,
                    _ => DropReason::MalformedFrame,
                };
                metrics.dropped(reason);
                tracing::warn!(error = %e, "closing ingress connection: bad frame");
                return Err(());
            }
        };
        if receiver.decrypt(body, plain).is_err() {
            metrics.dropped(DropReason::DecryptFailed);
            tracing::warn!("closing ingress connection: frame failed authentication");
            return Err(());
        }
        let packet = match framing::decode_packet(&plain[..]) {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    FrameError::BadVersion(_) => DropReason::BadVersion,
                    _ => DropReason::MalformedFrame,
                };
                metrics.dropped(reason);
                tracing::warn!(error = %e, "closing ingress connection: bad frame header");
                return Err(());
            }
        };
        let mut boxed = Box::new([0u8; PACKET_SIZE]);
        boxed.copy_from_slice(packet);
        metrics.packets_received.inc();
        ctx.intake.submit(budget, boxed, std::time::Instant::now());
        buf.advance(WIRE_FRAME_LEN);
        took = true;
    }
}
