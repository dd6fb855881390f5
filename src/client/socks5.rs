//! `nym-client socks5`: a local SOCKS5 proxy (RFC 1928: CONNECT to a name, IPv4 or IPv6
//! target, "no authentication") whose streams leave the mixnet at an exit gateway's
//! network requester. The wire format is `socks5-impl`'s; the streams are
//! [`crate::stream`]'s, carried by this process's [`MixClient`].
//!
//! Every frame to the exit carries reply SURBs (the exit answers through them and never
//! learns who we are); how many is set so the exit keeps about a window's worth.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use socks5_impl::protocol::{AuthMethod, Command, Reply, Request, Response, handshake};
use socks5_impl::{Address, AsyncStreamOperation};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ClientAddress, Event, MixClient, MixSender};
use crate::stream::relay::{End, Outgoing, Settings as RelaySettings, Stream};
use crate::stream::{Body, Frame, StreamId, Target};
use crate::topology::Topology;

/// Default address of the proxy (loopback only: anyone reaching it can use the client).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1080";
/// How long the exit may take to answer an open request before the application is told
/// the host is unreachable.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames waiting for one stream's task.
const STREAM_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no serving exit gateway with a network requester in the topology")]
    NoExit,
    #[error("exit {0:?} is not a serving exit gateway with a network requester")]
    UnknownExit(String),
    #[error("exit {0}: bad network requester address: {1}")]
    BadAddress(String, String),
}

/// The network requester to use: the exit gateway named (by name or identity key), or a
/// random serving one.
pub fn choose_exit(topology: &Topology, named: Option<&str>) -> Result<ClientAddress, ProxyError> {
    let Some(exit) = topology.choose_exit_service(named, |n| n.network_requester.as_deref()) else {
        return Err(match named {
            Some(n) => ProxyError::UnknownExit(n.to_string()),
            None => ProxyError::NoExit,
        });
    };
    let address = exit.network_requester.as_deref().unwrap_or_default();
    address
        .parse()
        .map_err(|e: String| ProxyError::BadAddress(exit.name.clone(), e))
}

/// How this side relays a stream. Frames to the exit go as ordinary messages, acknowledged
/// and retransmitted by the client itself, so the stream's own resend is a slow backstop.
pub fn relay_settings() -> RelaySettings {
    RelaySettings {
        window: 64,
        rto: Duration::from_secs(8),
        max_sends: 8,
        ack_delay: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(600),
        chunk: 1400,
        surb_target: Some(96),
        surb_first: 8,
        // Four of the exit's resend timeouts (network_requester::relay_settings).
        linger: Duration::from_secs(12),
    }
}

/// Checks that the proxy's address is loopback unless remote use is asked for.
pub fn check_listen(listen: SocketAddr, allow_remote: bool) -> Result<SocketAddr, String> {
    if !listen.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "--listen {listen} is not a loopback address: anyone who reaches it could use this client; pass --allow-remote to mean it"
        ));
    }
    Ok(listen)
}

type Streams = Arc<Mutex<HashMap<StreamId, mpsc::Sender<Frame>>>>;

/// Serves SOCKS5 on `listener` until `stop`, carrying streams to `requester`.
pub async fn serve(
    listener: TcpListener,
    mut client: MixClient,
    requester: ClientAddress,
    stop: CancellationToken,
) {
    let streams: Streams = Arc::default();
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(1024);
    let sender = tokio::spawn(send_frames(client.sender(), requester, out_rx));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let _ = conn.set_nodelay(true);
                    tokio::spawn(proxy(conn, streams.clone(), out_tx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SOCKS5 accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            event = client.next_event() => match event {
                // Only the exit's answers, through the SURBs we sent it: anyone may write to
                // this client, and a guessed stream id must not let them into a stream.
                Some(Event::Received { reply_from, .. }) if reply_from != Some(requester) => {
                    tracing::debug!("a message not from the exit; ignored");
                }
                Some(Event::Received { body, .. }) => match Frame::decode(&body) {
                    Ok(frame) => {
                        let tx = streams.lock().get(&frame.stream).cloned();
                        if let Some(tx) = tx {
                            // Full: dropped here, resent by the exit.
                            let _ = tx.try_send(frame);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "not a stream frame; ignored"),
                },
                Some(_) => {}
                None => break,
            },
        }
    }
    sender.abort();
    client.stop().await;
}

/// Sends frames to the exit, each with reply SURBs (at least one: the exit answers only
/// messages it can answer).
async fn send_frames(
    sender: MixSender,
    requester: ClientAddress,
    mut frames: mpsc::Receiver<Outgoing>,
) {
    while let Some(out) = frames.recv().await {
        let surbs = out.surbs.max(1) as usize;
        if let Err(e) = sender.send(requester, out.frame.encode(), surbs).await {
            tracing::warn!(error = %e, "stream frame not sent");
            return;
        }
    }
}

/// Removes a stream from the dispatch table when its task ends, however it ends.
struct Registered {
    streams: Streams,
    id: StreamId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

async fn reply(conn: &mut TcpStream, reply: Reply) -> io::Result<()> {
    Response::new(reply, Address::unspecified_v4())
        .write_to_async_stream(conn)
        .await
}

/// One application connection: the SOCKS5 exchange, the open request to the exit, its
/// answer passed on as the SOCKS5 reply, then the relay.
async fn proxy(conn: TcpStream, streams: Streams, out: mpsc::Sender<Outgoing>) {
    if let Err(e) = proxy_inner(conn, streams, out).await {
        tracing::debug!(error = %e, "SOCKS5 connection ended");
    }
}

async fn proxy_inner(
    mut socket: TcpStream,
    streams: Streams,
    out: mpsc::Sender<Outgoing>,
) -> io::Result<()> {
    let conn = &mut socket;
    let greeting = handshake::Request::retrieve_from_async_stream(conn).await?;
    if !greeting.evaluate_method(AuthMethod::NoAuth) {
        handshake::Response::new(AuthMethod::NoAcceptableMethods)
            .write_to_async_stream(conn)
            .await?;
        return Ok(());
    }
    handshake::Response::new(AuthMethod::NoAuth)
        .write_to_async_stream(conn)
        .await?;
    let request = match Request::retrieve_from_async_stream(conn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = reply(conn, Reply::AddressTypeNotSupported).await;
            return Err(e);
        }
    };
    if request.command != Command::Connect {
        return reply(conn, Reply::CommandNotSupported).await;
    }
    let target = match request.address {
        Address::SocketAddress(a) => Target::Ip(a.ip(), a.port()),
        Address::DomainAddress(name, port) => Target::Name(name.to_string(), port),
    };
    let settings = relay_settings();
    // Bytes the application sent without waiting for our reply ride with the open request.
    let mut first = vec![0u8; settings.chunk];
    let n = conn.try_read(&mut first).unwrap_or(0);
    first.truncate(n);

    let id: StreamId = rand::random();
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    streams.lock().insert(id, tx);
    let _registered = Registered {
        streams: streams.clone(),
        id,
    };
    let mut stream = Stream::new(id, settings, rx, out, None);
    stream
        .send(Body::Open {
            target,
            data: first,
        })
        .await
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    let status = match tokio::time::timeout(OPEN_TIMEOUT, opened(&mut stream)).await {
        Ok(Some(status)) => status,
        Ok(None) => Reply::GeneralFailure as u8,
        Err(_) => Reply::HostUnreachable as u8,
    };
    let answer = Reply::try_from(status).unwrap_or(Reply::GeneralFailure);
    reply(conn, answer).await?;
    if status != 0 {
        return Ok(());
    }
    let end = stream.pump(socket, None, None).await;
    tracing::debug!(?end, stream = id, "stream ended");
    if end == End::Finished {
        stream.linger().await;
    }
    Ok(())
}

/// Waits for the exit's answer to the open request; what came with it stays for the pump.
async fn opened(stream: &mut Stream) -> Option<u8> {
    loop {
        let mut bodies = stream.next_bodies().await.ok()?.into_iter();
        while let Some(body) = bodies.next() {
            if let Body::Opened { status } = body {
                stream.put_back(bodies);
                return Some(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_listen_address_needs_allow_remote() {
        let remote: SocketAddr = "0.0.0.0:1080".parse().unwrap();
        let err = check_listen(remote, false).unwrap_err();
        assert!(err.contains("--allow-remote"), "{err}");
        assert_eq!(check_listen(remote, true), Ok(remote));
        let local: SocketAddr = "[::1]:1080".parse().unwrap();
        assert_eq!(check_listen(local, false), Ok(local));
    }
}
