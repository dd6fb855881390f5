//! The exit gateway's network requester: it carries clients' streams (see [`crate::stream`])
//! out of the mixnet to TCP targets on the internet, behind the exit policy. It is an exit
//! service ([`crate::exit::service`]): a client is only its sender tag.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{ClientAddress, Event, MixClient, MixSender, SINGLE_FRAGMENT_REPLY, SenderTag};
use crate::dns::Resolver;
use crate::exit::policy::ExitPolicy;
use crate::exit::service::{self, Loopback};
use crate::exit::stream_admission::{Decision, StreamAdmission};
use crate::keys::Identity;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::stream::relay::{ByteCounters, End, Outgoing, Settings as RelaySettings, Stream};
use crate::stream::{self, Body, Frame, StreamId, Target};

/// Label under which the requester's identity is derived from the node's.
const IDENTITY_LABEL: &str = "network-requester";
/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A refusal waits this long for the client's ack, resending meanwhile.
const REFUSAL_SETTLE: Duration = Duration::from_secs(30);
/// A finished stream's id is remembered this long, so a late copy of its open request
/// does not open it again.
const FINISHED_MEMORY: Duration = Duration::from_secs(300);
/// Finished streams remembered at most.
const MAX_FINISHED: usize = 65_536;
/// Frames waiting for one stream's task; beyond it they are dropped (and resent).
const STREAM_QUEUE: usize = 256;

/// SOCKS5 reply codes (RFC 1928 §6) an `opened` frame carries.
pub mod reply {
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const CONNECTION_REFUSED: u8 = 0x05;
}

/// The requester's identity, derived from the node's.
pub fn identity(node: &Identity) -> Identity {
    service::identity(node, IDENTITY_LABEL)
}

/// The requester's client address at the node whose identity is `node`.
pub fn address(node: &Identity) -> ClientAddress {
    service::address(node, IDENTITY_LABEL)
}

/// How the exit relays a stream: the requester sends through SURBs, one per frame, so a
/// data frame carries what fits in one.
pub fn relay_settings(idle_timeout: Duration) -> RelaySettings {
    RelaySettings {
        window: 64,
        rto: Duration::from_secs(3),
        max_sends: 10,
        ack_delay: Duration::from_millis(100),
        idle_timeout,
        chunk: SINGLE_FRAGMENT_REPLY - stream::HEADER,
        surb_target: None,
        surb_first: 0,
        // Four of its own resend timeouts (the client's is longer, but the client's
        // messages are retransmitted by the client itself first).
        linger: Duration::from_secs(12),
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub per_client: usize,
    pub total: usize,
}

/// Why an open request was refused: a metric label and the SOCKS5 reply the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    pub code: u8,
}

/// Everything a stream task needs.
pub struct Exit {
    pub policy: ExitPolicy,
    pub resolver: Arc<Resolver>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
}

impl Exit {
    /// Resolves the target with the node's resolver, checks every address against the
    /// policy, and connects to the first allowed one that answers.
    pub async fn connect(&self, target: &Target) -> Result<TcpStream, Refused> {
        let (addresses, port) = match target {
            Target::Ip(ip, port) => (vec![*ip], *port),
            // The resolver answers IP literals itself.
            Target::Name(name, port) => match self.resolver.resolve(name).await {
                Ok(a) if !a.is_empty() => (a, *port),
                _ => {
                    return Err(Refused {
                        reason: "resolve_failed",
                        code: reply::HOST_UNREACHABLE,
                    });
                }
            },
        };
        let mut refusal = None;
        let allowed: Vec<IpAddr> = addresses
            .into_iter()
            .filter(|ip| match self.policy.check(*ip, port) {
                Ok(()) => true,
                Err(r) => {
                    refusal.get_or_insert(r);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(Refused {
                reason: refusal.map_or("no_rule", |r| r.as_str()),
                code: reply::NOT_ALLOWED,
            });
        }
        let mut code = reply::CONNECTION_REFUSED;
        for ip in allowed {
            match tokio::time::timeout(
                CONNECT_TIMEOUT,
                TcpStream::connect(SocketAddr::new(ip, port)),
            )
            .await
            {
                Ok(Ok(socket)) => {
                    let _ = socket.set_nodelay(true);
                    return Ok(socket);
                }
                Ok(Err(_)) => {}
                Err(_) => code = reply::HOST_UNREACHABLE,
            }
        }
        Err(Refused {
            reason: "connect_failed",
            code,
        })
    }
}

/// The requester of one exit gateway.
pub struct NetworkRequester {
    pub exit: Arc<Exit>,
    pub loopback: Loopback,
}

impl NetworkRequester {
    /// Serves streams until the node stops, reconnecting to the gateway if its session ends.
    pub async fn run(self, shutdown: Shutdown) {
        let exit = self.exit;
        let serving = shutdown.clone();
        self.loopback
            .run("network-requester", shutdown, move |client| {
                serve(client, exit.clone(), serving.clone())
            })
            .await;
    }
}

type Key = (SenderTag, StreamId);

/// Dispatches frames to stream tasks until the node drains (true) or the client stops (false).
async fn serve(mut client: MixClient, exit: Arc<Exit>, shutdown: Shutdown) -> bool {
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(1024);
    let (done_tx, mut done_rx) = mpsc::channel::<(Key, bool)>(1024);
    let sender = tokio::spawn(send_frames(client.sender(), out_rx));
    let mut streams: HashMap<Key, mpsc::Sender<Frame>> = HashMap::new();
    let mut admission = StreamAdmission::new(exit.limits.clone());
    let mut finished: HashMap<Key, Instant> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    let drained = loop {
        tokio::select! {
            _ = shutdown.draining() => break true,
            event = client.next_event() => match event {
                Some(Event::Received { body, sender_tag: Some(tag), .. }) => {
                    let frame = match Frame::decode(&body) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::debug!(error = %e, "undecodable stream frame");
                            continue;
                        }
                    };
                    let key = (tag, frame.stream);
                    if let Some(tx) = streams.get(&key) {
                        // Full: dropped here, resent by the client.
                        let _ = tx.try_send(frame);
                        continue;
                    }
                    if finished.contains_key(&key) {
                        continue;
                    }
                    if !matches!(frame.body, Body::Open { .. }) {
                        continue;
                    }
                    let refusal = match admission.decide(tag) {
                        Decision::Open => None,
                        Decision::Refuse(r) => Some(r),
                        Decision::Drop(reason) => {
                            exit.metrics.exit_refused(reason);
                            continue;
                        }
                    };
                    let opened = refusal.is_none();
                    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                    let mut stream = Stream::new(
                        frame.stream,
                        relay_settings(exit.limits.idle_timeout),
                        rx,
                        out_tx.clone(),
                        Some(tag),
                    );
                    // The open frame is the stream's first: taken like any other, it is
                    // acknowledged with the answer.
                    let _ = tx.try_send(frame);
                    streams.insert(key, tx);
                    let (exit, done) = (exit.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        // The open frame comes back first (with whatever came right behind it).
                        if let Ok(bodies) = stream.next_bodies().await {
                            let mut bodies = bodies.into_iter();
                            if let Some(Body::Open { target, data }) = bodies.next() {
                                stream.put_back(bodies);
                                exit_stream(stream, target, data, refusal, &exit).await;
                            }
                        }
                        let _ = done.send((key, opened)).await;
                    });
                }
                Some(Event::Received { sender_tag: None, .. }) => {
                    tracing::debug!("message without reply SURBs: cannot answer, ignored");
                }
                Some(_) => {}
                None => break false,
            },
            Some((key, opened)) = done_rx.recv() => {
                streams.remove(&key);
                admission.ended(key.0, opened);
                remember_finished(&mut finished, key);
            }
            _ = sweep.tick() => finished.retain(|_, at| at.elapsed() < FINISHED_MEMORY),
        }
    };
    drop(streams);
    sender.abort();
    client.stop().await;
    drained
}

/// Remembers a finished stream for [`FINISHED_MEMORY`], so a late copy of its open request
/// does not open it again; at most [`MAX_FINISHED`] (tags are free to make up): when full,
/// the expired are swept, and if none had expired the stream is not remembered.
fn remember_finished(finished: &mut HashMap<Key, Instant>, key: Key) {
    if finished.len() >= MAX_FINISHED {
        finished.retain(|_, at| at.elapsed() < FINISHED_MEMORY);
    }
    if finished.len() < MAX_FINISHED {
        finished.insert(key, Instant::now());
    }
}

/// Sends stream frames back through their client's SURBs.
async fn send_frames(sender: MixSender, mut frames: mpsc::Receiver<Outgoing>) {
    while let Some(out) = frames.recv().await {
        let Some(tag) = out.reply_tag else { continue };
        if let Err(e) = sender.reply(tag, out.frame.encode()).await {
            // Resent when due, by which time the client may have sent more SURBs.
            tracing::debug!(error = %e, "stream frame not sent");
        }
    }
}

/// One stream at the exit: refuse it, or connect, answer and relay.
async fn exit_stream(
    mut stream: Stream,
    target: Target,
    first: Vec<u8>,
    refusal: Option<Refused>,
    exit: &Exit,
) {
    let opened_at = std::time::Instant::now();
    let connected = match refusal {
        Some(r) => Err(r),
        None => exit.connect(&target).await,
    };
    let socket = match connected {
        Ok(s) => s,
        Err(r) => {
            tracing::debug!(reason = r.reason, ?target, "stream refused");
            exit.metrics.exit_refused(r.reason);
            if stream.send(Body::Opened { status: r.code }).await.is_ok() {
                stream.settle(REFUSAL_SETTLE).await;
            }
            return;
        }
    };
    if stream.send(Body::Opened { status: 0 }).await.is_err() {
        return;
    }
    exit.metrics.exit_streams_opened.inc();
    exit.metrics.exit_streams_open.inc();
    let mut socket = socket;
    let wrote_first = if first.is_empty() {
        Ok(())
    } else {
        exit.metrics.exit_bytes_to_target.inc_by(first.len() as u64);
        tokio::io::AsyncWriteExt::write_all(&mut socket, &first).await
    };
    let end = match wrote_first {
        Ok(()) => {
            let ttfb = exit.metrics.exit_first_byte.clone();
            stream
                .pump(
                    socket,
                    Some(ByteCounters {
                        from_socket: exit.metrics.exit_bytes_from_target.clone(),
                        to_socket: exit.metrics.exit_bytes_to_target.clone(),
                    }),
                    Some(Box::new(move || {
                        ttfb.observe(opened_at.elapsed().as_secs_f64())
                    })),
                )
                .await
        }
        Err(e) => End::Socket(e.kind()),
    };
    exit.metrics.exit_streams_open.dec();
    tracing::debug!(?end, ?target, "stream ended");
    if end == End::Finished {
        stream.linger().await;
    }
}
