//! Nym's client WebSocket API, as `nym-client run` serves it to local applications.
//!
//! JSON text frames, as Nym's native client speaks them:
//!
//! | request | fields | answer |
//! |---|---|---|
//! | `send` | `recipient`, `message`, `withReplySurb` (optional) | none (errors: `error`) |
//! | `sendAnonymous` | `recipient`, `message`, `replySurbs` | none (errors: `error`) |
//! | `reply` | `senderTag`, `message` | none (errors: `error`) |
//! | `selfAddress` | | `{"type":"selfAddress","address":…}` |
//!
//! Incoming messages arrive as `{"type":"received","message":…,"senderTag":…}` (`senderTag`
//! null when the sender attached no SURBs). Anything else gets `{"type":"error","message":…}`.
//! Binary frames are refused with an error. Only one application at a time receives: the
//! one connected last.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response as HttpResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::SenderTag;

/// SURBs attached by `send` with `withReplySurb: true` (Nym's default reply-SURB count
/// is of this order).
pub const DEFAULT_REPLY_SURBS: usize = 10;
/// Most SURBs one `sendAnonymous` may attach.
pub const MAX_REPLY_SURBS: usize = 100;

/// A request from an application.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Request {
    Send {
        recipient: String,
        message: String,
        #[serde(default)]
        with_reply_surb: bool,
        /// Accepted and ignored (Nym's socks5 multiplexing field).
        #[serde(default, skip_serializing)]
        connection_id: Option<u64>,
    },
    SendAnonymous {
        recipient: String,
        message: String,
        reply_surbs: u32,
        #[serde(default, skip_serializing)]
        connection_id: Option<u64>,
    },
    Reply {
        sender_tag: String,
        message: String,
        #[serde(default, skip_serializing)]
        connection_id: Option<u64>,
    },
    SelfAddress,
}

/// What the client tells an application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Response {
    Received {
        message: String,
        sender_tag: Option<String>,
    },
    SelfAddress {
        address: String,
    },
    Error {
        message: String,
    },
}

impl Response {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","message":"cannot encode a response"}"#.to_string()
        })
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
        }
    }
}

/// Sender tags are written in base58, as Nym writes them.
pub fn tag_to_string(tag: &SenderTag) -> String {
    bs58::encode(tag).into_string()
}

pub fn tag_from_str(s: &str) -> Result<SenderTag, String> {
    let bytes = bs58::decode(s)
        .into_vec()
        .map_err(|e| format!("senderTag: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| "senderTag: expected 16 bytes in base58".to_string())
}

/// A frame for an application; `delivered` fires once the frame was written to it.
pub struct Outgoing {
    pub text: String,
    pub delivered: Option<oneshot::Sender<()>>,
}

/// What the WebSocket side tells the client's loop.
pub enum AppEvent {
    Connected {
        conn: u64,
        outgoing: mpsc::Sender<Outgoing>,
    },
    Request {
        conn: u64,
        request: Result<Request, String>,
    },
    Disconnected {
        conn: u64,
    },
}

#[derive(Clone)]
struct Api {
    events: mpsc::Sender<AppEvent>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Serves the API on `listener` until `stop`; every connection reports to `events`.
pub async fn serve(
    listener: TcpListener,
    events: mpsc::Sender<AppEvent>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let api = Api {
        events,
        next: Default::default(),
    };
    let app = Router::new().route("/", get(upgrade)).with_state(api);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn upgrade(ws: WebSocketUpgrade, State(api): State<Api>) -> HttpResponse {
    ws.on_upgrade(move |socket| connection(socket, api))
}

async fn connection(socket: WebSocket, api: Api) {
    use futures_util::{SinkExt, StreamExt};
    let conn = api.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(256);
    if api
        .events
        .send(AppEvent::Connected {
            conn,
            outgoing: out_tx,
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            out = out_rx.recv() => {
                let Some(out) = out else { break };
                if sink.send(WsMessage::Text(out.text.into())).await.is_err() {
                    break;
                }
                if let Some(done) = out.delivered {
                    let _ = done.send(());
                }
            }
            frame = stream.next() => {
                let request = match frame {
                    Some(Ok(WsMessage::Text(text))) => serde_json::from_str::<Request>(&text)
                        .map_err(|e| format!("invalid request: {e}")),
                    Some(Ok(WsMessage::Binary(_))) => Err(
                        "binary requests are not supported: send JSON text frames".to_string(),
                    ),
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue, // ping/pong: answered by the library
                };
                if api.events.send(AppEvent::Request { conn, request }).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = api.events.send(AppEvent::Disconnected { conn }).await;
}

/// The address the API listens on, checked: a non-loopback address needs `allow_remote`,
/// since anyone who reaches it can send as this client and read what it receives.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<SocketAddr, String> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(addr)
    } else {
        Err(format!(
            "--listen {addr}: not a loopback address; anyone who reaches it can send as this \
             client and read its messages (pass --allow-remote to bind it anyway)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_nym_writes_them() {
        let r: Request = serde_json::from_str(
            r#"{"type":"sendAnonymous","recipient":"a.b@c","message":"hi","replySurbs":5}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::SendAnonymous {
                recipient: "a.b@c".into(),
                message: "hi".into(),
                reply_surbs: 5,
                connection_id: None
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"type":"send","recipient":"a.b@c","message":"hi","withReplySurb":true,"connectionId":7}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Send {
                with_reply_surb: true,
                ..
            }
        ));
        let r: Request =
            serde_json::from_str(r#"{"type":"reply","senderTag":"x","message":"m"}"#).unwrap();
        assert!(matches!(r, Request::Reply { .. }));
        let r: Request = serde_json::from_str(r#"{"type":"selfAddress"}"#).unwrap();
        assert_eq!(r, Request::SelfAddress);
        assert!(serde_json::from_str::<Request>(r#"{"type":"teleport"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"send","message":"m"}"#).is_err());
    }

    #[test]
    fn responses_are_written_as_nym_writes_them() {
        let v: serde_json::Value = serde_json::from_str(
            &Response::Received {
                message: "hi".into(),
                sender_tag: Some("T".into()),
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "received", "message": "hi", "senderTag": "T"})
        );
        let v: serde_json::Value = serde_json::from_str(
            &Response::SelfAddress {
                address: "a".into(),
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "selfAddress", "address": "a"})
        );
        let v: serde_json::Value =
            serde_json::from_str(&Response::error("nope").to_json()).unwrap();
        assert_eq!(v, serde_json::json!({"type": "error", "message": "nope"}));
    }

    #[test]
    fn tags_round_trip_in_base58_and_bad_ones_are_named() {
        let tag = [7u8; 16];
        assert_eq!(tag_from_str(&tag_to_string(&tag)).unwrap(), tag);
        assert!(tag_from_str("0OIl").unwrap_err().contains("senderTag"));
        assert!(tag_from_str("abc").unwrap_err().contains("16 bytes"));
    }

    #[test]
    fn a_public_listen_address_needs_consent() {
        assert!(check_listen("127.0.0.1:1977".parse().unwrap(), false).is_ok());
        assert!(check_listen("[::1]:1977".parse().unwrap(), false).is_ok());
        let e = check_listen("0.0.0.0:1977".parse().unwrap(), false).unwrap_err();
        assert!(e.contains("--allow-remote"), "{e}");
        assert!(check_listen("0.0.0.0:1977".parse().unwrap(), true).is_ok());
    }
}
