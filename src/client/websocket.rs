//! Nym's client WebSocket API, as `nym-client run` serves it to local applications.
//!
//! Both of Nym's forms are spoken. **Text** frames carry JSON:
//!
//! | request | fields | answer |
//! |---|---|---|
//! | `send` | `recipient`, `message`, `withReplySurb` (optional), `connectionId` (optional) | none (errors: `error`) |
//! | `sendAnonymous` | `recipient`, `message`, `replySurbs`, `connectionId` (optional) | none (errors: `error`) |
//! | `reply` | `senderTag`, `message`, `connectionId` (optional) | none (errors: `error`) |
//! | `selfAddress` | | `{"type":"selfAddress","address":…}` |
//! | `closedConnection` | `connectionId` | none |
//!
//! Incoming messages arrive as `{"type":"received","message":…,"senderTag":…}` (`senderTag`
//! null when the sender attached no SURBs); errors as `{"type":"error","message":…}`.
//!
//! **Binary** frames use Nym's layout (u8 tags, u64 big-endian lengths, a recipient as its 96
//! bytes identity || encryption key || gateway):
//!
//! ```text
//! send            0x00 || recipient || connection_id:u64 || len:u64 || message
//! sendAnonymous   0x01 || reply_surbs:u32 || recipient || connection_id:u64 || len:u64 || message
//! reply           0x02 || sender_tag (16) || connection_id:u64 || len:u64 || message
//! selfAddress     0x03
//! closedConn.     0x04 || connection_id:u64
//! -> error        0x00 || kind:u8 || len:u64 || message
//! -> received     0x01 || has_tag:u8 || sender_tag (16, if has_tag) || len:u64 || message
//! -> selfAddress  0x02 || recipient
//! ```
//!
//! As in Nym, answers and received messages take the form of the application's last request
//! (text until it sends one). `getLaneQueueLength` (0x05) is not supported: this client has
//! no per-connection lanes; it gets an error. Only one application at a time receives: the
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

use super::{ClientAddress, SenderTag};

/// SURBs attached by `send` with `withReplySurb: true` (Nym's default reply-SURB count
/// is of this order).
pub const DEFAULT_REPLY_SURBS: usize = 10;
/// Most SURBs one `sendAnonymous` may attach.
pub const MAX_REPLY_SURBS: usize = 100;

/// A text request, as JSON.
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_id: Option<u64>,
    },
    SendAnonymous {
        recipient: String,
        message: String,
        reply_surbs: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_id: Option<u64>,
    },
    Reply {
        sender_tag: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_id: Option<u64>,
    },
    SelfAddress,
    ClosedConnection {
        connection_id: u64,
    },
    GetLaneQueueLength {
        connection_id: u64,
    },
}

/// A request in either form, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    Send {
        to: ClientAddress,
        message: Vec<u8>,
        reply_surbs: usize,
    },
    Reply {
        tag: SenderTag,
        message: Vec<u8>,
    },
    SelfAddress,
    /// Nym's socks5 bookkeeping: nothing to do here.
    ClosedConnection,
}

/// Nym's error kinds (the byte in a binary error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    EmptyRequest = 0x01,
    TooShortRequest = 0x02,
    UnknownRequest = 0x03,
    MalformedRequest = 0x04,
    Other = 0xFF,
}

/// What the client tells an application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Received {
        message: Vec<u8>,
        sender_tag: Option<SenderTag>,
    },
    SelfAddress(ClientAddress),
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// A response as JSON (what text frames carry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum TextResponse {
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

/// The form of frames an application speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Text,
    Binary,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            kind: ErrorKind::Other,
            message: message.into(),
        }
    }

    fn request_error((kind, message): (ErrorKind, String)) -> Self {
        Response::Error { kind, message }
    }

    pub fn to_text(&self) -> String {
        let text = match self {
            Response::Received {
                message,
                sender_tag,
            } => TextResponse::Received {
                message: String::from_utf8_lossy(message).into_owned(),
                sender_tag: sender_tag.as_ref().map(tag_to_string),
            },
            Response::SelfAddress(a) => TextResponse::SelfAddress {
                address: a.to_string(),
            },
            Response::Error { message, .. } => TextResponse::Error {
                message: message.clone(),
            },
        };
        serde_json::to_string(&text).unwrap_or_else(|_| {
            r#"{"type":"error","message":"cannot encode a response"}"#.to_string()
        })
    }

    pub fn to_binary(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Response::Error { kind, message } => {
                out.push(0x00);
                out.push(*kind as u8);
                out.extend_from_slice(&(message.len() as u64).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Response::Received {
                message,
                sender_tag,
            } => {
                out.push(0x01);
                match sender_tag {
                    Some(tag) => {
                        out.push(1);
                        out.extend_from_slice(tag);
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&(message.len() as u64).to_be_bytes());
                out.extend_from_slice(message);
            }
            Response::SelfAddress(a) => {
                out.push(0x02);
                out.extend_from_slice(&a.to_bytes());
            }
        }
        out
    }

    fn encode(&self, form: Form) -> WsMessage {
        match form {
            Form::Text => WsMessage::Text(self.to_text().into()),
            Form::Binary => WsMessage::Binary(self.to_binary().into()),
        }
    }
}

type RequestError = (ErrorKind, String);

impl Request {
    /// Checks a text request: addresses and tags parsed, limits applied.
    pub fn check(self) -> Result<ApiRequest, RequestError> {
        let bad = |m: String| (ErrorKind::MalformedRequest, m);
        let recipient = |r: &str| -> Result<ClientAddress, RequestError> {
            r.parse().map_err(|e| bad(format!("recipient {r:?}: {e}")))
        };
        Ok(match self {
            Request::Send {
                recipient: r,
                message,
                with_reply_surb,
                ..
            } => ApiRequest::Send {
                to: recipient(&r)?,
                message: message.into_bytes(),
                reply_surbs: if with_reply_surb {
                    DEFAULT_REPLY_SURBS
                } else {
                    0
                },
            },
            Request::SendAnonymous {
                recipient: r,
                message,
                reply_surbs,
                ..
            } => ApiRequest::Send {
                to: recipient(&r)?,
                message: message.into_bytes(),
                reply_surbs: (reply_surbs as usize).min(MAX_REPLY_SURBS),
            },
            Request::Reply {
                sender_tag,
                message,
                ..
            } => ApiRequest::Reply {
                tag: tag_from_str(&sender_tag).map_err(bad)?,
                message: message.into_bytes(),
            },
            Request::SelfAddress => ApiRequest::SelfAddress,
            Request::ClosedConnection { .. } => ApiRequest::ClosedConnection,
            Request::GetLaneQueueLength { .. } => return Err(lanes_unsupported()),
        })
    }

    pub fn parse_text(text: &str) -> Result<ApiRequest, RequestError> {
        serde_json::from_str::<Request>(text)
            .map_err(|e| (ErrorKind::MalformedRequest, format!("invalid request: {e}")))?
            .check()
    }
}

fn lanes_unsupported() -> RequestError {
    (
        ErrorKind::UnknownRequest,
        "getLaneQueueLength is not supported: this client has no per-connection lanes".into(),
    )
}

/// Parses a binary request in Nym's layout.
pub fn parse_binary(b: &[u8]) -> Result<ApiRequest, RequestError> {
    let short = |what: &str| {
        (
            ErrorKind::TooShortRequest,
            format!("not enough data for '{what}'"),
        )
    };
    let u64_at =
        |i: usize| -> Option<u64> { Some(u64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    // `len:u64 || message` from `i` to the end, the length checked.
    let message_at = |i: usize, what: &str| -> Result<Vec<u8>, RequestError> {
        let len = u64_at(i).ok_or_else(|| short(what))?;
        let message = &b[i + 8..];
        if message.len() as u64 != len {
            return Err((
                ErrorKind::MalformedRequest,
                format!(
                    "'{what}': length says {len}, {} bytes follow",
                    message.len()
                ),
            ));
        }
        Ok(message.to_vec())
    };
    let recipient_at = |i: usize, what: &str| -> Result<ClientAddress, RequestError> {
        b.get(i..)
            .and_then(ClientAddress::from_bytes)
            .ok_or_else(|| short(what))
    };
    match b.first() {
        None => Err((ErrorKind::EmptyRequest, "no data provided".into())),
        Some(0x00) => Ok(ApiRequest::Send {
            to: recipient_at(1, "send")?,
            message: message_at(1 + ClientAddress::LEN + 8, "send")?,
            reply_surbs: 0,
        }),
        Some(0x01) => {
            let surbs = b.get(1..5).ok_or_else(|| short("sendAnonymous"))?;
            let surbs = u32::from_be_bytes([surbs[0], surbs[1], surbs[2], surbs[3]]);
            Ok(ApiRequest::Send {
                to: recipient_at(5, "sendAnonymous")?,
                message: message_at(5 + ClientAddress::LEN + 8, "sendAnonymous")?,
                reply_surbs: (surbs as usize).min(MAX_REPLY_SURBS),
            })
        }
        Some(0x02) => {
            let tag: SenderTag = b
                .get(1..17)
                .and_then(|t| t.try_into().ok())
                .ok_or_else(|| short("reply"))?;
            Ok(ApiRequest::Reply {
                tag,
                message: message_at(17 + 8, "reply")?,
            })
        }
        Some(0x03) => Ok(ApiRequest::SelfAddress),
        Some(0x04) => u64_at(1)
            .map(|_| ApiRequest::ClosedConnection)
            .ok_or_else(|| short("closedConnection")),
        Some(0x05) => Err(lanes_unsupported()),
        Some(t) => Err((
            ErrorKind::UnknownRequest,
            format!("{t} does not correspond to any valid request tag"),
        )),
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

/// A response for an application; `delivered` fires once it was written.
pub struct Outgoing {
    pub response: Response,
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
        request: Result<ApiRequest, Response>,
    },
    Disconnected {
        conn: u64,
    },
}

#[derive(Clone)]
struct Api {
    events: mpsc::Sender<AppEvent>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    origins: std::sync::Arc<AllowedOrigins>,
    token: std::sync::Arc<Option<String>>,
}

/// The web origins whose pages may use the API. A browser sends `Origin` with every
/// WebSocket upgrade and lets any page open one to 127.0.0.1, so without this check any web
/// page the user visits could learn the client's address, take its incoming messages and
/// send as it. Native applications send no `Origin` and are served.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<String>);

impl AllowedOrigins {
    /// Origins as given to `--allow-origin` (`scheme://host[:port]`).
    pub fn new(origins: impl IntoIterator<Item = String>) -> Self {
        AllowedOrigins(origins.into_iter().map(|o| normalise(&o)).collect())
    }

    /// Whether an upgrade carrying these headers may be served.
    pub fn allows(&self, headers: &axum::http::HeaderMap) -> Result<(), String> {
        let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().map(normalise).unwrap_or_default();
        if self.0.contains(&origin) {
            return Ok(());
        }
        Err(format!(
            "a WebSocket from a web page ({origin}) is refused: start the client with --allow-origin {origin} to let that page use it"
        ))
    }
}

/// Whether an upgrade presents `token` (when one is required), as `Authorization: Bearer`
/// or, for a web page (which cannot set headers on a WebSocket), as the `token` query
/// parameter.
fn presents_token(
    token: Option<&str>,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> bool {
    let Some(token) = token else {
        return true;
    };
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let in_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("token="));
    [bearer, in_query]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

/// Compares without returning early, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random API token (32 bytes, base58).
pub fn new_token() -> Result<String, String> {
    crate::keys::random_bytes()
        .map(|b| bs58::encode(&b[..32]).into_string())
        .map_err(|e| e.to_string())
}

/// Origins compare as browsers write them: lower case, no trailing slash.
fn normalise(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Serves the API on `listener` until `stop`; every connection reports to `events`.
/// Upgrades carrying an `Origin` must name one of `origins`; with a `token`, every upgrade
/// must present it.
pub async fn serve(
    listener: TcpListener,
    events: mpsc::Sender<AppEvent>,
    origins: AllowedOrigins,
    token: Option<String>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let api = Api {
        events,
        next: Default::default(),
        origins: std::sync::Arc::new(origins),
        token: std::sync::Arc::new(token),
    };
    let app = Router::new().route("/", get(upgrade)).with_state(api);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn upgrade(
    ws: WebSocketUpgrade,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    State(api): State<Api>,
) -> HttpResponse {
    use axum::response::IntoResponse;
    if let Err(refusal) = api.origins.allows(&headers) {
        tracing::warn!("{refusal}");
        return (axum::http::StatusCode::FORBIDDEN, refusal).into_response();
    }
    if !presents_token(api.token.as_deref(), &headers, query.as_deref()) {
        tracing::warn!("a WebSocket without the API token is refused");
        let refusal = "this client's API needs its token (run.json in the client's directory)";
        return (axum::http::StatusCode::UNAUTHORIZED, refusal).into_response();
    }
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
    // Answers and deliveries take the form of the application's last request.
    let mut form = Form::Text;
    loop {
        tokio::select! {
            out = out_rx.recv() => {
                let Some(out) = out else { break };
                if sink.send(out.response.encode(form)).await.is_err() {
                    break;
                }
                if let Some(done) = out.delivered {
                    let _ = done.send(());
                }
            }
            frame = stream.next() => {
                let request = match frame {
                    Some(Ok(WsMessage::Text(text))) => {
                        form = Form::Text;
                        Request::parse_text(&text)
                    }
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        form = Form::Binary;
                        parse_binary(&bytes)
                    }
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue, // ping/pong: answered by the library
                };
                let request = request.map_err(Response::request_error);
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
    use crate::keys::KeyBytes;

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
        let e = Request::parse_text(r#"{"type":"send","recipient":"nobody","message":"m"}"#)
            .unwrap_err();
        assert_eq!(e.0, ErrorKind::MalformedRequest);
        assert!(e.1.contains("recipient \"nobody\""), "{}", e.1);
        let e =
            Request::parse_text(r#"{"type":"getLaneQueueLength","connectionId":1}"#).unwrap_err();
        assert!(e.1.contains("not supported"), "{}", e.1);
        assert_eq!(
            Request::parse_text(r#"{"type":"closedConnection","connectionId":3}"#).unwrap(),
            ApiRequest::ClosedConnection
        );
        assert!(serde_json::from_str::<Request>(r#"{"type":"send","message":"m"}"#).is_err());
    }

    #[test]
    fn responses_are_written_as_nym_writes_them() {
        let text = |r: Response| serde_json::from_str::<serde_json::Value>(&r.to_text()).unwrap();
        assert_eq!(
            text(Response::Received {
                message: b"hi".to_vec(),
                sender_tag: Some([7; 16]),
            }),
            serde_json::json!({"type": "received", "message": "hi", "senderTag": tag_to_string(&[7; 16])})
        );
        assert_eq!(
            text(Response::Received {
                message: b"hi".to_vec(),
                sender_tag: None,
            }),
            serde_json::json!({"type": "received", "message": "hi", "senderTag": null})
        );
        let me = address();
        assert_eq!(
            text(Response::SelfAddress(me)),
            serde_json::json!({"type": "selfAddress", "address": me.to_string()})
        );
        assert_eq!(
            text(Response::error("nope")),
            serde_json::json!({"type": "error", "message": "nope"})
        );
        // Binary: Nym's layouts, byte for byte.
        let mut received = vec![0x01, 1];
        received.extend_from_slice(&[7; 16]);
        received.extend_from_slice(&2u64.to_be_bytes());
        received.extend_from_slice(b"hi");
        assert_eq!(
            Response::Received {
                message: b"hi".to_vec(),
                sender_tag: Some([7; 16]),
            }
            .to_binary(),
            received
        );
        let mut addr = vec![0x02];
        addr.extend_from_slice(&me.to_bytes());
        assert_eq!(Response::SelfAddress(me).to_binary(), addr);
        let mut err = vec![0x00, 0xFF];
        err.extend_from_slice(&4u64.to_be_bytes());
        err.extend_from_slice(b"nope");
        assert_eq!(Response::error("nope").to_binary(), err);
    }

    fn address() -> ClientAddress {
        ClientAddress {
            identity: KeyBytes([1; 32]),
            encryption: KeyBytes([2; 32]),
            gateway: KeyBytes([3; 32]),
        }
    }

    #[test]
    fn binary_requests_parse_in_nyms_layout_and_bad_ones_say_why() {
        let to = address();
        let mut send = vec![0x00];
        send.extend_from_slice(&to.to_bytes());
        send.extend_from_slice(&42u64.to_be_bytes());
        send.extend_from_slice(&3u64.to_be_bytes());
        send.extend_from_slice(&[0, 255, 9]);
        assert_eq!(
            parse_binary(&send).unwrap(),
            ApiRequest::Send {
                to,
                message: vec![0, 255, 9],
                reply_surbs: 0
            }
        );
        let mut anon = vec![0x01];
        anon.extend_from_slice(&5u32.to_be_bytes());
        anon.extend_from_slice(&to.to_bytes());
        anon.extend_from_slice(&0u64.to_be_bytes());
        anon.extend_from_slice(&1u64.to_be_bytes());
        anon.push(b'x');
        assert_eq!(
            parse_binary(&anon).unwrap(),
            ApiRequest::Send {
                to,
                message: b"x".to_vec(),
                reply_surbs: 5
            }
        );
        let mut reply = vec![0x02];
        reply.extend_from_slice(&[9; 16]);
        reply.extend_from_slice(&0u64.to_be_bytes());
        reply.extend_from_slice(&2u64.to_be_bytes());
        reply.extend_from_slice(b"ok");
        assert_eq!(
            parse_binary(&reply).unwrap(),
            ApiRequest::Reply {
                tag: [9; 16],
                message: b"ok".to_vec()
            }
        );
        assert_eq!(parse_binary(&[0x03]).unwrap(), ApiRequest::SelfAddress);
        assert_eq!(parse_binary(&[]).unwrap_err().0, ErrorKind::EmptyRequest);
        assert_eq!(
            parse_binary(&[0x00, 1, 2]).unwrap_err().0,
            ErrorKind::TooShortRequest
        );
        assert_eq!(
            parse_binary(&[0x09]).unwrap_err().0,
            ErrorKind::UnknownRequest
        );
        let mut lying = reply.clone();
        lying.push(b'!');
        let e = parse_binary(&lying).unwrap_err();
        assert_eq!(e.0, ErrorKind::MalformedRequest);
        assert!(e.1.contains("length says 2"), "{}", e.1);
        assert_eq!(
            parse_binary(&[0x05, 0, 0, 0, 0, 0, 0, 0, 1]).unwrap_err().0,
            ErrorKind::UnknownRequest
        );
    }

    #[test]
    fn tags_round_trip_in_base58_and_bad_ones_are_named() {
        let tag = [7u8; 16];
        assert_eq!(tag_from_str(&tag_to_string(&tag)).unwrap(), tag);
        assert!(tag_from_str("0OIl").unwrap_err().contains("senderTag"));
        assert!(tag_from_str("abc").unwrap_err().contains("16 bytes"));
    }

    #[test]
    fn only_named_web_origins_may_use_the_api() {
        let mut headers = axum::http::HeaderMap::new();
        let origins = AllowedOrigins::new(["https://App.example/".to_string()]);
        assert!(origins.allows(&headers).is_ok(), "a native application");
        headers.insert("origin", "https://evil.example".parse().unwrap());
        let refusal = origins.allows(&headers).unwrap_err();
        assert!(
            refusal.contains("--allow-origin https://evil.example"),
            "{refusal}"
        );
        headers.insert("origin", "https://app.example".parse().unwrap());
        assert!(origins.allows(&headers).is_ok());
        headers.insert("origin", "null".parse().unwrap());
        assert!(
            origins.allows(&headers).is_err(),
            "a sandboxed page or a file"
        );
        assert!(AllowedOrigins::default().allows(&headers).is_err());
    }

    #[test]
    fn a_required_token_is_taken_from_the_header_or_the_query_only_when_right() {
        let mut headers = axum::http::HeaderMap::new();
        assert!(presents_token(None, &headers, None), "no token required");
        assert!(!presents_token(Some("s3cret"), &headers, None));
        assert!(presents_token(
            Some("s3cret"),
            &headers,
            Some("a=1&token=s3cret")
        ));
        assert!(!presents_token(
            Some("s3cret"),
            &headers,
            Some("token=s3cre")
        ));
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(presents_token(Some("s3cret"), &headers, None));
        headers.insert("authorization", "Bearer s3creT".parse().unwrap());
        assert!(!presents_token(Some("s3cret"), &headers, None));
        assert_ne!(new_token().unwrap(), new_token().unwrap());
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
