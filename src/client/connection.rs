//! The client's WebSocket session with its gateway: connect, answer the challenge, then
//! exchange protocol messages.

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::gateway::protocol::{self, ClientMessage, ServerMessage};
use crate::keys::{Identity, NodeId};
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
    #[error("gateway at {0} is not the gateway the topology names")]
    WrongGateway(String),
    #[error("timed out")]
    Timeout,
    #[error("websocket: {0}")]
    Ws(String),
}

pub struct Sender(SplitSink<Ws, Message>);
pub struct Receiver(SplitStream<Ws>);

/// Connects to the gateway at `address`, proving `identity`; `gateway` is the identity the
/// gateway must sign its challenge for.
pub async fn connect(
    address: &PeerAddress,
    gateway: &NodeId,
    identity: &Identity,
    timeout: Duration,
) -> Result<(Sender, Receiver), ConnectionError> {
    let run = async {
        let url = format!("ws://{address}/v1/client");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| ConnectionError::Connect(url.clone(), e.to_string()))?;
        let (mut tx, mut rx) = ws.split();
        let nonce = match next_message(&mut rx).await? {
            ServerMessage::Challenge { nonce, gateway: g } if g == *gateway => nonce,
            ServerMessage::Challenge { .. } => {
                return Err(ConnectionError::WrongGateway(address.to_string()));
            }
            _ => return Err(ConnectionError::Unexpected),
        };
        let signature = identity.sign(&protocol::auth_message(gateway, &nonce));
        let auth = ClientMessage::Auth {
            identity: identity.public(),
            signature,
        };
        tx.send(Message::Binary(auth.encode().into()))
            .await
            .map_err(|e| ConnectionError::Ws(e.to_string()))?;
        match next_message(&mut rx).await? {
            ServerMessage::AuthOk => Ok((Sender(tx), Receiver(rx))),
            _ => Err(ConnectionError::Unexpected),
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ConnectionError::Timeout)?
}

async fn next_message(rx: &mut SplitStream<Ws>) -> Result<ServerMessage, ConnectionError> {
    loop {
        match rx.next().await {
            None => {
                return Err(ConnectionError::Closed {
                    code: 1006,
                    reason: "connection lost".into(),
                });
            }
            Some(Err(e)) => return Err(ConnectionError::Ws(e.to_string())),
            Some(Ok(Message::Binary(b))) => {
                return ServerMessage::decode(&b).map_err(|_| ConnectionError::Unexpected);
            }
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
        self.0
            .send(Message::Binary(msg.encode().into()))
            .await
            .map_err(|e| ConnectionError::Ws(e.to_string()))
    }

    /// Sends raw bytes (tests use it to send malformed messages).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ConnectionError> {
        self.0
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| ConnectionError::Ws(e.to_string()))
    }

    pub async fn close(mut self) {
        let _ = self.0.close().await;
    }
}

impl Receiver {
    pub async fn recv(&mut self) -> Result<ServerMessage, ConnectionError> {
        next_message(&mut self.0).await
    }
}
