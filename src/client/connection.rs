//! The client's WebSocket session with its gateway: connect, run the Noise handshake
//! against the gateway's key from the topology, prove the client's identity inside the
//! channel, then exchange protocol messages in fixed-size frames (see
//! [`crate::gateway::channel`]).

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::gateway::channel::{self, ChannelHalf, Initiator};
use crate::gateway::protocol::{ClientMessage, Rate, ServerMessage};
use crate::keys::{Identity, KeyBytes};
use crate::topology::PeerAddress;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connecting to the gateway at {0}: {1}")]
    Connect(String, String),
    #[error("gateway closed the session (code {code}: {reason})")]
    Closed { code: u16, reason: String },
    #[error("gateway sent an unexpected message")]
    Unexpected,
    #[error("the gateway registers new clients for a stamp of {bits} bits")]
    StampRequired { bits: u8 },
    #[error("gateway at {0} did not complete the handshake for the topology's key: {1}")]
    WrongGateway(String, String),
    #[error("channel: {0}")]
    Channel(#[from] channel::ChannelError),
    #[error("timed out")]
    Timeout,
    #[error("websocket: {0}")]
    Ws(String),
}

pub struct Sender {
    sink: SplitSink<Ws, Message>,
    channel: ChannelHalf,
}

pub struct Receiver {
    stream: SplitStream<Ws>,
    channel: ChannelHalf,
    /// The downstream rate the gateway agreed to (unpaced: payloads as they arrive).
    pub downstream: Rate,
}

/// Connects to the gateway at `address` whose Noise key (from the topology) is
/// `gateway_noise`, and proves `identity`, with `stamp` to pay for its registration if the
/// gateway does not know it yet (see [`crate::gateway::stamp`]). A gateway that cannot
/// complete the handshake for that key is refused. The session is unpaced (see
/// [`connect_paced`]).
pub async fn connect(
    address: &PeerAddress,
    gateway_noise: &KeyBytes,
    identity: &Identity,
    stamp: u64,
    timeout: Duration,
) -> Result<(Sender, Receiver), ConnectionError> {
    connect_paced(
        address,
        gateway_noise,
        identity,
        stamp,
        Rate::UNPACED,
        timeout,
    )
    .await
}

/// [`connect`], asking the gateway to send frames at the Poisson rate `downstream` (it may
/// grant less: [`Receiver::downstream`] says what it agreed to).
pub async fn connect_paced(
    address: &PeerAddress,
    gateway_noise: &KeyBytes,
    identity: &Identity,
    stamp: u64,
    downstream: Rate,
    timeout: Duration,
) -> Result<(Sender, Receiver), ConnectionError> {
    let run = async {
        let url = format!("ws://{address}/v1/client");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| ConnectionError::Connect(url.clone(), e.to_string()))?;
        let (mut sink, mut stream) = ws.split();
        let (initiator, first) = Initiator::start(gateway_noise)?;
        sink.send(Message::Binary(first.into()))
            .await
            .map_err(|e| ConnectionError::Ws(e.to_string()))?;
        let answer = next_binary(&mut stream).await?;
        let channel = initiator
            .finish(&answer)
            .map_err(|e| ConnectionError::WrongGateway(address.to_string(), e.to_string()))?;
        let signature = identity.sign(&channel.auth_message());
        let (tx, rx) = channel.split();
        let mut sender = Sender { sink, channel: tx };
        let mut receiver = Receiver {
            stream,
            channel: rx,
            downstream: Rate::UNPACED,
        };
        sender
            .send(&ClientMessage::Auth {
                identity: identity.public(),
                signature,
                stamp,
                downstream,
            })
            .await?;
        match receiver.recv().await? {
            ServerMessage::AuthOk { rate } => {
                receiver.downstream = rate;
                Ok((sender, receiver))
            }
            ServerMessage::StampRequired { bits } => Err(ConnectionError::StampRequired { bits }),
            _ => Err(ConnectionError::Unexpected),
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ConnectionError::Timeout)?
}

async fn next_binary(rx: &mut SplitStream<Ws>) -> Result<Vec<u8>, ConnectionError> {
    loop {
        match rx.next().await {
            None => {
                return Err(ConnectionError::Closed {
                    code: 1006,
                    reason: "connection lost".into(),
                });
            }
            Some(Err(e)) => return Err(ConnectionError::Ws(e.to_string())),
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
            Some(Ok(_)) => continue,
        }
    }
}

fn closed(frame: Option<CloseFrame>) -> ConnectionError {
    match frame {
        Some(f) => ConnectionError::Closed {
            code: f.code.into(),
            reason: f.reason.to_string(),
        },
        None => ConnectionError::Closed {
            code: 1005,
            reason: String::new(),
        },
    }
}

impl Sender {
    pub async fn send(&mut self, msg: &ClientMessage) -> Result<(), ConnectionError> {
        self.send_raw(msg.encode()).await
    }

    /// Sends arbitrary bytes as one message inside the channel (tests use it to send
    /// malformed messages).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ConnectionError> {
        let frame = self.channel.seal(&bytes)?;
        self.sink
            .send(Message::Binary(frame.into()))
            .await
            .map_err(|e| ConnectionError::Ws(e.to_string()))
    }
}

/// Closes a session without losing what was last sent: sends a Close frame, then reads
/// (and discards) until the gateway answers it or hangs up, at most `within`. Dropping the
/// socket with unread data in it would send a TCP reset, and a reset can destroy frames the
/// gateway had received but not yet read (the client's last packets and acks).
pub async fn close(session: (Sender, Receiver), within: Duration) {
    let (mut sender, mut receiver) = session;
    let _ = tokio::time::timeout(within, async {
        let _ = sender.sink.close().await;
        while let Some(Ok(message)) = receiver.stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

impl Receiver {
    pub async fn recv(&mut self) -> Result<ServerMessage, ConnectionError> {
        let frame = next_binary(&mut self.stream).await?;
        let bytes = self.channel.open(&frame)?;
        ServerMessage::decode(&bytes).map_err(|_| ConnectionError::Unexpected)
    }
}
