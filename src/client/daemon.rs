//! `nym-client run`: one named client, held online, serving Nym's WebSocket API.
//!
//! The daemon owns the client's gateway session (it holds the state directory's lock, so
//! no one-shot command opens a second one) and its reply-SURB store. A received message is
//! handed to the connected application and only then, once the frame was written, is the
//! gateway told to delete it: a message the daemon held when it was killed is delivered
//! again by the gateway when it comes back. Received messages wait (at most
//! [`MAX_WAITING`]; the rest stay at the gateway) while no application is connected.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::chunking::MessageId;
use super::state::{ClientDir, Running, StateError};
use super::websocket::{self, ApiRequest, AppEvent, Outgoing, Response};
use super::{ClientAddress, ClientConfig, ClientError, Event, MixClient};

/// Received messages held for an application that is not connected.
pub const MAX_WAITING: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}: another nym-client already runs this client")]
    Busy(std::path::PathBuf),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("making the API token: {0}")]
    Token(String),
    #[error("--listen {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// Who may use the local API.
#[derive(Debug, Clone, Default)]
pub struct ApiAccess {
    /// Web origins whose pages may use it (native applications always may).
    pub origins: websocket::AllowedOrigins,
    /// Require a fresh token, kept in `run.json`, on every connection.
    pub require_token: bool,
}

/// Runs the client in `dir` until `stop`, serving the API on `listen` as `access` says;
/// `ready` gets the API's address once it serves.
pub async fn run(
    mut config: ClientConfig,
    dir: ClientDir,
    listen: SocketAddr,
    access: ApiAccess,
    stop: CancellationToken,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), DaemonError> {
    let Some(_lock) = dir.try_lock()? else {
        return Err(DaemonError::Busy(dir.path.clone()));
    };
    let identity = dir.identity()?;
    if let Some(settings) = dir.settings()? {
        config.gateway = Some(settings.gateway);
    }
    config.surb_store = Some(dir.surb_store());
    config.stamps = Some(dir.stamps());
    config.hold_until_consumed = true;
    let mut client = MixClient::start(config, identity).await?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| DaemonError::Listen {
            addr: listen,
            error,
        })?;
    let local = listener.local_addr().map_err(|error| DaemonError::Listen {
        addr: listen,
        error,
    })?;
    let token = match access.require_token {
        true => Some(websocket::new_token().map_err(DaemonError::Token)?),
        false => None,
    };
    dir.write_running(&Running {
        websocket: local,
        pid: std::process::id(),
        token: token.clone(),
    })?;
    tracing::info!(address = %client.address(), websocket = %local, "client running");
    let (app_tx, app_rx) = mpsc::channel(1024);
    let server_stop = stop.child_token();
    let server = tokio::spawn(websocket::serve(
        listener,
        app_tx,
        access.origins,
        token,
        server_stop.clone(),
    ));
    if let Some(ready) = ready {
        let _ = ready.send(local);
    }

    let mut daemon = Daemon {
        address: client.address(),
        conns: HashMap::new(),
        current: None,
        waiting: VecDeque::new(),
        delivered: mpsc::unbounded_channel(),
    };
    daemon.serve(&mut client, app_rx, &stop).await;

    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    // Acknowledgements of what the application got go out before the session closes.
    client.stop().await;
    dir.clear_running();
    Ok(())
}

/// How handing a message to an application went: written (consumed), or not (it waits
/// for the next application).
type HandOver = Result<MessageId, Waiting>;

/// A received message on its way to an application.
struct Waiting {
    id: MessageId,
    response: Response,
}

struct Daemon {
    address: ClientAddress,
    conns: HashMap<u64, mpsc::Sender<Outgoing>>,
    /// The application that receives: the one connected last.
    current: Option<u64>,
    waiting: VecDeque<Waiting>,
    /// Frames written (Ok: consumed) or not (Err: to be handed over again).
    delivered: (
        mpsc::UnboundedSender<HandOver>,
        mpsc::UnboundedReceiver<HandOver>,
    ),
}

impl Daemon {
    async fn serve(
        &mut self,
        client: &mut MixClient,
        mut apps: mpsc::Receiver<AppEvent>,
        stop: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                event = client.next_event(), if self.waiting.len() < MAX_WAITING => match event {
                    Some(Event::Received { id, body, sender_tag, .. }) => {
                        let response = Response::Received { message: body, sender_tag };
                        self.waiting.push_back(Waiting { id, response });
                        self.hand_over();
                    }
                    Some(Event::Failed { id }) => {
                        tracing::warn!(message = %hex(&id), "message not delivered");
                    }
                    Some(_) => {}
                    None => break,
                },
                app = apps.recv() => match app {
                    Some(AppEvent::Connected { conn, outgoing }) => {
                        self.conns.insert(conn, outgoing);
                        self.current = Some(conn);
                        self.hand_over();
                    }
                    Some(AppEvent::Disconnected { conn }) => {
                        self.conns.remove(&conn);
                        if self.current == Some(conn) {
                            self.current = self.conns.keys().max().copied();
                        }
                        self.hand_over();
                    }
                    Some(AppEvent::Request { conn, request }) => {
                        let answer = match request {
                            Ok(request) => self.handle(client, request).await,
                            Err(error) => Some(error),
                        };
                        if let (Some(response), Some(out)) = (answer, self.conns.get(&conn)) {
                            let _ = out.try_send(Outgoing { response, delivered: None });
                        }
                    }
                    None => break,
                },
                Some(done) = self.delivered.1.recv() => match done {
                    Ok(id) => {
                        if client.consumed(id).await.is_err() {
                            break;
                        }
                    }
                    Err(back) => {
                        self.waiting.push_front(back);
                        self.hand_over();
                    }
                },
            }
        }
    }

    /// Passes waiting messages to the current application.
    fn hand_over(&mut self) {
        while let Some(conn) = self.current {
            let Some(out) = self.conns.get(&conn) else {
                self.current = None;
                return;
            };
            let Ok(permit) = out.try_reserve() else {
                return; // full: the rest wait; closed: Disconnected follows
            };
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            let (done, written) = oneshot::channel();
            permit.send(Outgoing {
                response: w.response.clone(),
                delivered: Some(done),
            });
            let report = self.delivered.0.clone();
            tokio::spawn(async move {
                let _ = report.send(match written.await {
                    Ok(()) => Ok(w.id),
                    Err(_) => Err(w),
                });
            });
        }
    }

    async fn handle(&mut self, client: &MixClient, request: ApiRequest) -> Option<Response> {
        let sent = match request {
            ApiRequest::SelfAddress => return Some(Response::SelfAddress(self.address)),
            ApiRequest::ClosedConnection => return None,
            ApiRequest::Send {
                to,
                message,
                reply_surbs,
            } => client.send(to, message, reply_surbs).await.map(|_| ()),
            ApiRequest::Reply { tag, message } => client.reply(tag, message).await.map(|_| ()),
        };
        sent.err().map(|e| Response::error(e.to_string()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
