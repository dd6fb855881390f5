//! The client API: a WebSocket per client session on `NYM_NODE_CLIENT_BIND`.
//!
//! A session starts with a Noise handshake against this gateway's Noise key (see
//! [`super::channel`]); inside the channel the client proves its ed25519 identity by
//! signing the handshake hash. After that it sends Sphinx packets (forwarded to their first
//! hop at once) and receives the payloads stored for it, which it acknowledges so the
//! mailbox can delete them. What was not acknowledged is delivered again on the next
//! session. Every frame after the handshake has the same size, and the gateway sends them
//! at the Poisson rate the client asked for (capped by `NYM_NODE_CLIENT_DOWNSTREAM_MAX_RATE`,
//! see [`super::downstream`]), so its link shows nothing of what it receives.
//!
//! A client not registered here must attach a registration stamp ([`super::stamp`]) to
//! its authentication; one without gets the bits wanted and is closed, to come back with
//! it. The exit's own service clients (its network requester) are exempt.
//!
//! From accept until it authenticates, a connection holds a place in the same admission as
//! the mixnet's (`admission.rs`, taken by [`super::client_listener`]): a connection that has
//! not sent a valid first handshake message gives its place up to a newer one, and those
//! past it are capped per address group, so neither a flood of idle connections, trickled
//! HTTP requests or idle WebSockets, nor one address, can keep clients out.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::admission::{Admission, Place};
use crate::gateway::channel::{self, ChannelHalf};
use crate::gateway::client_listener::{AdmittingListener, ClientConn};
use crate::gateway::downstream::Downstream;
use crate::gateway::mailbox::Mailbox;
use crate::gateway::mailbox::registry::Attendance;
use crate::gateway::protocol::{ClientMessage, Rate, ServerMessage, close};
use crate::gateway::rate_limit::TokenBucket;
use crate::gateway::sessions::{Session, Sessions};
use crate::gateway::{stamp, surb_ack};
use crate::keys::{KeyBytes, NodeId, verify_signature};
use crate::metrics::{DropReason, Metrics};
use crate::mixnet::intake::ForwardItem;
use crate::shutdown::Shutdown;
use crate::slots::{catch_up_from, sleep_until};

/// Time a client has for the handshake and its authentication.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take one frame off the socket once the kernel's buffers are full.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Stored payloads pushed per mailbox read (unpaced sessions).
const PUSH_BATCH: usize = 64;
/// A session's acknowledgements are deleted together, one transaction per interval...
const ACK_FLUSH: Duration = Duration::from_millis(200);
/// ... and at most this many ids per interval: more are ignored (those payloads are simply
/// delivered again next session), so a client cannot make the gateway write without bound.
const MAX_ACKS_PER_FLUSH: usize = 4096;

pub struct ClientApi {
    /// This gateway's identity, which registration stamps are made for.
    pub identity: NodeId,
    /// This gateway's Noise secret (its public half is in the topology).
    pub noise_secret: [u8; 32],
    /// Leading zero bits a registration stamp must have.
    pub stamp_bits: u8,
    /// Clients that register without a stamp: the exit's own in-process services.
    pub exempt: Vec<KeyBytes>,
    pub forward: mpsc::Sender<ForwardItem>,
    pub mailbox: Arc<Mailbox>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub rate: u32,
    pub burst: u32,
    /// The highest downstream rate (frames a second) a client may ask for.
    pub downstream_max_rate: u32,
    /// Places for connections not yet authenticated.
    pub admission: Arc<Admission>,
}

/// Serves the client API until the node stops.
pub async fn serve(listener: TcpListener, api: Arc<ClientApi>) -> std::io::Result<()> {
    let shutdown = api.shutdown.clone();
    let listener = AdmittingListener::new(listener, api.admission.clone());
    let app = Router::new()
        .route("/v1/client", get(upgrade))
        .with_state(api);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<ClientConn>(),
    )
    .with_graceful_shutdown(async move { shutdown.stopping().await })
    .await
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(api): State<Arc<ClientApi>>,
    ConnectInfo(conn): ConnectInfo<ClientConn>,
) -> Response {
    // One session per connection: its place went to the first upgrade.
    let Some(place) = conn.stage.take() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let remote = conn.remote;
    ws.max_message_size(channel::FRAME_LEN)
        .max_frame_size(channel::FRAME_LEN)
        .on_upgrade(move |socket| {
            run_session(socket, api, place)
                .instrument(tracing::info_span!("client_session", %remote))
        })
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let close = socket.send(Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    })));
    let _ = tokio::time::timeout(SEND_TIMEOUT, close).await;
}

/// Seals a message into one fixed-size frame and sends it; false if the socket failed or
/// the client has not taken it within [`SEND_TIMEOUT`] (a client that stops reading would
/// otherwise keep its session, its presence and what is held for it, forever).
async fn send(socket: &mut WebSocket, tx: &mut ChannelHalf, msg: ServerMessage) -> bool {
    let Ok(frame) = tx.seal(&msg.encode()) else {
        return false;
    };
    let sent = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Binary(frame.into())));
    matches!(sent.await, Ok(Ok(())))
}

/// The next binary message, skipping pings; `None` when the socket closed or failed.
async fn next_binary(socket: &mut WebSocket) -> Option<Result<Vec<u8>, ()>> {
    loop {
        match socket.recv().await? {
            Ok(Message::Binary(b)) => return Some(Ok(b.to_vec())),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Text(_)) => return Some(Err(())),
            Ok(Message::Close(_)) | Err(_) => return None,
        }
    }
}

async fn run_session(mut socket: WebSocket, api: Arc<ClientApi>, place: Place) {
    if api.shutdown.is_draining() {
        close_with(&mut socket, close::GOING_AWAY, "gateway is shutting down").await;
        return;
    }
    let authenticated = tokio::select! {
        a = authenticate(&mut socket, &api, &place) => a,
        // A newer connection took the place (counted by the admission).
        _ = place.closed() => None,
    };
    drop(place);
    let Some((session, attendance, mut tx, mut rx, rate)) = authenticated else {
        return;
    };
    tracing::debug!(client = %session.client.short(), rate = rate.as_per_second(), "client session opened");
    let mut bucket = TokenBucket::new(api.rate, api.burst);
    let mut downstream = Downstream::new(session.client, rate);
    let mut next_slot = downstream.next_slot(tokio::time::Instant::now());
    let mut acked: Vec<u64> = Vec::new();
    let mut ack_flush = tokio::time::interval(ACK_FLUSH);
    ack_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Anything stored while the client was away goes out first.
    session.notify.notify_one();
    loop {
        tokio::select! {
            _ = session.replaced.cancelled() => {
                close_with(&mut socket, close::REPLACED, "replaced by a newer session").await;
                break;
            }
            _ = api.shutdown.stopping() => {
                close_with(&mut socket, close::GOING_AWAY, "gateway is shutting down").await;
                break;
            }
            _ = ack_flush.tick() => flush_acks(&api, &session, &mut acked).await,
            _ = session.notify.notified() => {
                if downstream.is_paced() {
                    downstream.stored();
                } else if !push_stored(&mut socket, &mut tx, &api, &mut downstream).await {
                    break;
                }
            }
            _ = sleep_until(next_slot) => {
                let frame = downstream.fill_slot(&api.mailbox).await;
                if matches!(frame, ServerMessage::Dummy) {
                    api.metrics.client_dummy_frames.inc();
                }
                if !send(&mut socket, &mut tx, frame).await {
                    break;
                }
                // Counted from the slot, not from now: a slow write must not lower the rate.
                next_slot = next_slot.and_then(|slot| downstream.next_slot(catch_up_from(Some(slot))));
            }
            msg = next_binary(&mut socket) => {
                let bytes = match msg {
                    None => break,
                    Some(Ok(frame)) => match rx.open(&frame) {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            api.metrics.client_messages_refused.inc();
                            tracing::info!(error = %e, "closing client session: bad frame");
                            close_with(&mut socket, close::PROTOCOL, "bad frame").await;
                            break;
                        }
                    },
                    Some(Err(())) => {
                        api.metrics.client_messages_refused.inc();
                        close_with(&mut socket, close::PROTOCOL, "binary messages only").await;
                        break;
                    }
                };
                match ClientMessage::decode(&bytes) {
                    Ok(ClientMessage::Send { first_hop, packet }) => {
                        if api.shutdown.is_draining() {
                            api.metrics.dropped(DropReason::Shutdown);
                            continue;
                        }
                        if !bucket.take() {
                            api.metrics.dropped(DropReason::RateLimited);
                            continue;
                        }
                        api.metrics.packets_received.inc();
                        let item = ForwardItem { next_hop: first_hop, delay: Duration::ZERO, ready_at: tokio::time::Instant::now(), packet };
                        if api.forward.send(item).await.is_err() {
                            api.metrics.dropped(DropReason::Shutdown);
                        }
                    }
                    Ok(ClientMessage::Ack { ids }) => {
                        let room = MAX_ACKS_PER_FLUSH.saturating_sub(acked.len());
                        acked.extend(ids.into_iter().take(room));
                    }
                    Ok(ClientMessage::Auth { .. }) | Err(_) => {
                        api.metrics.client_messages_refused.inc();
                        tracing::info!("closing client session: unexpected or malformed message");
                        close_with(&mut socket, close::PROTOCOL, "malformed or unexpected message").await;
                        break;
                    }
                }
            }
        }
    }
    flush_acks(&api, &session, &mut acked).await;
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || attendance.end()).await {
        tracing::warn!(error = %e, "recording the client's last session failed");
    }
    tracing::debug!(client = %session.client.short(), "client session closed");
}

/// Deletes what the client acknowledged since the last flush, in one transaction, and
/// acknowledges to their senders the held payloads among them.
async fn flush_acks(api: &ClientApi, session: &Session, acked: &mut Vec<u64>) {
    if acked.is_empty() {
        return;
    }
    let ids = std::mem::take(acked);
    let (mailbox, client) = (api.mailbox.clone(), session.client);
    let released =
        match tokio::task::spawn_blocking(move || mailbox.ack_releasing(&client, &ids)).await {
            Ok(Ok((_, released))) => released,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mailbox delete failed");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "mailbox delete task failed");
                return;
            }
        };
    for surb in released {
        let Some(item) = surb_ack::packet(&surb) else {
            continue;
        };
        if api.forward.send(item).await.is_ok() {
            api.metrics.acks_sent.inc();
        }
    }
}

/// What a client's authentication carried, once it verified.
struct Authenticated {
    identity: KeyBytes,
    stamp: u64,
    downstream: Rate,
    tx: ChannelHalf,
    rx: ChannelHalf,
}

/// The handshake and the client's signature within [`AUTH_TIMEOUT`], then its registration
/// (a stamp if it needs one); the session is attached once both passed.
async fn authenticate(
    socket: &mut WebSocket,
    api: &ClientApi,
    place: &Place,
) -> Option<(Session, Attendance, ChannelHalf, ChannelHalf, Rate)> {
    let Ok(Some(auth)) = tokio::time::timeout(AUTH_TIMEOUT, handshake(socket, api, place)).await
    else {
        api.metrics.client_messages_refused.inc();
        tracing::info!("refusing client: handshake or authentication failed");
        close_with(socket, close::AUTH_FAILED, "authentication failed").await;
        return None;
    };
    let Authenticated {
        identity,
        stamp,
        downstream,
        mut tx,
        rx,
    } = auth;
    // The exit's own services are not observed from outside: no pacing for them.
    let rate = match api.exempt.contains(&identity) {
        true => Rate::UNPACED,
        false => downstream.capped(api.downstream_max_rate),
    };
    let attendance = match register(api, identity, stamp).await {
        Ok(Some(attendance)) => attendance,
        Ok(None) => {
            api.metrics.registration("stamp_required");
            tracing::debug!(client = %identity.short(), "registration without a valid stamp");
            let bits = api.stamp_bits;
            send(socket, &mut tx, ServerMessage::StampRequired { bits }).await;
            close_with(socket, close::STAMP_REQUIRED, "registration stamp required").await;
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "mailbox registration failed");
            close_with(socket, close::SERVER_ERROR, "gateway storage failed").await;
            return None;
        }
    };
    let session = api.sessions.attach(identity);
    if !send(socket, &mut tx, ServerMessage::AuthOk { rate }).await {
        return None;
    }
    Some((session, attendance, tx, rx, rate))
}

/// The Noise handshake, then the client's signature over its hash.
async fn handshake(
    socket: &mut WebSocket,
    api: &ClientApi,
    place: &Place,
) -> Option<Authenticated> {
    let Some(Ok(first)) = next_binary(socket).await else {
        return None;
    };
    let (channel, answer) = channel::respond(&api.noise_secret, &first).ok()?;
    place.greeted();
    socket.send(Message::Binary(answer.into())).await.ok()?;
    let expected = channel.auth_message();
    let (tx, mut rx) = channel.split();
    let Some(Ok(frame)) = next_binary(socket).await else {
        return None;
    };
    match ClientMessage::decode(&rx.open(&frame).ok()?) {
        Ok(ClientMessage::Auth {
            identity,
            signature,
            stamp,
            downstream,
        }) if verify_signature(&identity, &expected, &signature) => Some(Authenticated {
            identity,
            stamp,
            downstream,
            tx,
            rx,
        }),
        _ => None,
    }
}

/// Makes `identity` present in the mailbox, registering it if it is new here and its stamp
/// pays for that. `None`: it is new and the stamp does not.
async fn register(
    api: &ClientApi,
    identity: KeyBytes,
    stamp: u64,
) -> Result<Option<Attendance>, crate::gateway::mailbox::MailboxError> {
    let mailbox = api.mailbox.clone();
    let exempt = api.exempt.contains(&identity);
    let (gateway, bits) = (api.identity, api.stamp_bits);
    let attended = tokio::task::spawn_blocking(move || {
        let paid = exempt || stamp::verify(&gateway, &identity, stamp, bits);
        if !paid && !mailbox.is_registered(&identity)? {
            return Ok(None);
        }
        mailbox.attend(&identity).map(Some)
    })
    .await
    .map_err(|e| crate::gateway::mailbox::MailboxError::from_task(&e))??;
    Ok(attended.map(|(attendance, new)| {
        if new {
            api.metrics.registration("registered");
        }
        attendance
    }))
}

/// Sends an unpaced session every stored payload not yet sent; false if the socket failed.
async fn push_stored(
    socket: &mut WebSocket,
    tx: &mut ChannelHalf,
    api: &ClientApi,
    downstream: &mut Downstream,
) -> bool {
    loop {
        let batch = downstream.take_all(&api.mailbox, PUSH_BATCH).await;
        if batch.is_empty() {
            return true;
        }
        for msg in batch {
            if !send(socket, tx, msg).await {
                return false;
            }
        }
    }
}
