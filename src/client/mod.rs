//! The mixnet client used by `nym-client` and the tests.
//!
//! A client is one task that owns its gateway session:
//! - messages are split into fragments, each sent in its own Sphinx packet through a fresh
//!   random route (one mix per layer, then the recipient's gateway);
//! - each packet carries a SURB-ACK; the recipient's gateway sends it back once the payload
//!   is stored, and a fragment whose ack does not arrive within its expected round trip
//!   (the delays the client itself drew, plus `ack_slack`) is sent again through a new
//!   route, at most `max_retransmissions` times, after which the message is reported failed;
//! - with cover traffic on, frames leave in the slots of two Poisson streams (see
//!   [`crate::slots`]): upstream slots (`cover_rate` a second) carry the application's packets,
//!   acknowledgements to the gateway and drop cover when there is nothing else, loop slots
//!   (`loop_rate`) carry loop cover only; the gateway sends frames back at the rate the
//!   client asked for (`downstream_rate`, see [`crate::gateway::downstream`]), so an
//!   observer of the link cannot tell when the client talks or receives;
//! - with delivery receipts on, a message also carries a receipt SURB, sealed with it: a
//!   recipient started to send receipts (`send_receipts`) sends it back after a random
//!   delay once it holds the whole message (once: never for a copy it already has), and a
//!   message whose receipt does not come is sent again, at most `receipt_resends` times,
//!   after which it is reported failed;
//! - received fragments are reassembled (duplicates from retransmission dropped) and the
//!   gateway is told each payload was received so it can delete it;
//! - a lost session is re-established with backoff; the gateway redelivers what was not
//!   acknowledged.

mod actor;
pub mod chunking;
pub mod completed;
pub mod connection;
pub mod daemon;
pub mod e2e;
pub mod inbox;
pub mod outbox;
pub mod packet;
pub mod probe;
pub mod prober;
pub mod registration;
pub mod route;
pub mod socks5;
pub mod state;
pub mod surbs;
pub mod top_up;
pub mod tunnel;
pub mod websocket;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::gateway::protocol::Rate;
use crate::keys::{Identity, KeyBytes, NodeId, random_bytes};
use crate::message::Envelope;
use crate::mixnet::sphinx::IDENTIFIER_SIZE;
use crate::topology::{self, TopologyHandle, TopologySource};
use actor::{Actor, open_session};
use chunking::{MessageId, Reassembler};
use outbox::OutboxFull;
pub use surbs::SenderTag;

/// Size of a serialised SURB-ACK for a route of three mixes and a gateway.
pub const SURB_ACK_SIZE: usize = 348 + 32 + 16;

/// Where a client can be reached: its identity, the key its messages are encrypted to, and
/// its gateway. Written `IDENTITY.ENCRYPTION@GATEWAY` (base58), as Nym writes addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddress {
    pub identity: KeyBytes,
    /// X25519 key every fragment for this client is sealed to (HPKE, see [`e2e`]).
    pub encryption: KeyBytes,
    pub gateway: NodeId,
}

impl ClientAddress {
    /// The address of the client holding `identity`, at `gateway`.
    pub fn of(identity: &Identity, gateway: NodeId) -> Self {
        ClientAddress {
            identity: identity.public(),
            encryption: e2e::EncryptionKey::derive(identity).public(),
            gateway,
        }
    }
}

impl ClientAddress {
    /// Length of [`ClientAddress::to_bytes`].
    pub const LEN: usize = 96;

    /// identity || encryption key || gateway, as Nym lays a recipient out in binary.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(&self.identity.0);
        out[32..64].copy_from_slice(&self.encryption.0);
        out[64..].copy_from_slice(&self.gateway.0);
        out
    }

    /// Reads [`ClientAddress::to_bytes`]' layout; `None` when fewer than 96 bytes are given.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let key = |r: std::ops::Range<usize>| Some(KeyBytes(b.get(r)?.try_into().ok()?));
        Some(ClientAddress {
            identity: key(0..32)?,
            encryption: key(32..64)?,
            gateway: key(64..96)?,
        })
    }
}

impl fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.identity, self.encryption, self.gateway)
    }
}

impl FromStr for ClientAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str = "expected IDENTITY.ENCRYPTION@GATEWAY (base58 keys)";
        let (keys, gateway) = s.split_once('@').ok_or_else(|| FORM.to_string())?;
        let (identity, encryption) = keys.split_once('.').ok_or_else(|| FORM.to_string())?;
        Ok(ClientAddress {
            identity: identity
                .parse()
                .map_err(|e| format!("{FORM}: identity: {e}"))?,
            encryption: encryption
                .parse()
                .map_err(|e| format!("{FORM}: encryption key: {e}"))?,
            gateway: gateway
                .parse()
                .map_err(|e| format!("{FORM}: gateway: {e}"))?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub topology: String,
    /// The gateway to use; a random serving one when `None`.
    pub gateway: Option<NodeId>,
    /// Mean of the exponential per-hop delay.
    pub mean_delay: Duration,
    /// Poisson rate (slots a second) of the upstream stream: each slot carries a packet of
    /// the application, an acknowledgement to the gateway, or drop cover. 0 sends at once
    /// and no cover at all (no loops either).
    pub cover_rate: f64,
    /// Poisson rate of the loop cover stream, which real traffic never replaces.
    pub loop_rate: f64,
    /// Poisson rate of frames asked of the gateway (it may grant less); 0 asks it to push
    /// payloads as they arrive.
    pub downstream_rate: f64,
    /// Packets of the application waiting for their slots at most: a message that does not
    /// fit is refused ([`ClientError::Outbox`]).
    pub max_outbox: usize,
    /// Answer the receipt SURB of a message that carries one (see the module doc).
    pub send_receipts: bool,
    /// A receipt leaves after a delay drawn uniformly up to this, so its arrival does not
    /// tell the sender when its recipient came online or read the message.
    pub receipt_delay: Duration,
    /// Send SURB-ACKs and retransmit what is not acknowledged.
    pub acks: bool,
    /// Added to a packet's expected round trip before it is retransmitted.
    pub ack_slack: Duration,
    pub max_retransmissions: u32,
    /// Ask each recipient for a delivery receipt, and send a message again when none came
    /// this long after its recipient's gateway stored it. `None`: no receipts; a message
    /// is done once stored.
    pub receipt_timeout: Option<Duration>,
    /// Times a message without a receipt is sent again before it is reported failed.
    pub receipt_resends: u32,
    pub topology_refresh: Duration,
    /// Where reply SURBs (received, and the recovery material of those handed out) are
    /// kept across restarts; in memory when `None`.
    pub surb_store: Option<std::path::PathBuf>,
    /// Where the gateways' registration stamps are kept across restarts; in memory when
    /// `None` (a new process makes them again).
    pub stamps: Option<std::path::PathBuf>,
    /// Where the ids of messages taken for good are kept across restarts (a client
    /// directory's `completed`), so a gateway delivering an old ciphertext again cannot show
    /// the application a message twice; in memory when `None`.
    pub completed_ids: Option<std::path::PathBuf>,
    /// Where fragments of incomplete messages are kept (a client directory's
    /// `inbox.redb`), so each is acknowledged to the gateway as it comes rather than all of
    /// a message's together (which shows the gateway where messages begin and end); without
    /// it they stay at the gateway until their message completes.
    pub inbox: Option<std::path::PathBuf>,
    /// Keep a received message at the gateway until the application calls
    /// [`MixClient::consumed`], so a crash between hand-over and use loses nothing.
    pub hold_until_consumed: bool,
    /// Where to reach the gateway's client API instead of the topology's address (an exit's
    /// own network requester connects over loopback).
    pub gateway_address: Option<topology::PeerAddress>,
    /// The directory key the topology must be signed by; `None` accepts any document (a
    /// signed one must still verify under the key it names).
    pub topology_signer: Option<KeyBytes>,
    /// Where the last good topology document is kept (a client directory's
    /// `topology.json`): a restart starts from it and never takes an older revision.
    pub topology_memory: Option<std::path::PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            topology: String::new(),
            gateway: None,
            mean_delay: Duration::from_millis(50),
            cover_rate: 20.0,
            loop_rate: 5.0,
            downstream_rate: 0.0,
            max_outbox: DEFAULT_MAX_OUTBOX,
            send_receipts: false,
            receipt_delay: Duration::from_secs(10),
            acks: true,
            ack_slack: Duration::from_millis(1500),
            max_retransmissions: 6,
            receipt_timeout: None,
            receipt_resends: 3,
            surb_store: None,
            stamps: None,
            completed_ids: None,
            inbox: None,
            hold_until_consumed: false,
            gateway_address: None,
            topology_signer: None,
            topology_memory: None,
            topology_refresh: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Route(#[from] route::RouteError),
    #[error(transparent)]
    Packet(#[from] packet::PacketError),
    #[error(transparent)]
    Connection(#[from] connection::ConnectionError),
    #[error(transparent)]
    Stamp(#[from] registration::StampError),
    #[error(transparent)]
    Chunk(#[from] chunking::ChunkError),
    #[error("gateway {0} has no client address in the topology")]
    NoClientAddress(NodeId),
    #[error(transparent)]
    Encryption(#[from] e2e::E2eError),
    #[error("no randomness: {0}")]
    Random(String),
    #[error("the client has stopped")]
    Stopped,
    #[error(transparent)]
    Surbs(#[from] surbs::SurbStoreError),
    #[error(transparent)]
    Completed(#[from] completed::CompletedError),
    #[error("no reply SURBs from this sender tag")]
    NoReplySurbs,
    #[error(transparent)]
    Outbox(#[from] OutboxFull),
    #[error(transparent)]
    Inbox(#[from] inbox::InboxError),
}

/// [`ClientConfig::max_outbox`]'s default: 4096 packets, about 10 MB.
pub const DEFAULT_MAX_OUTBOX: usize = 4096;

/// What the client reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A whole message arrived.
    Received {
        id: MessageId,
        body: Vec<u8>,
        /// Present when the sender attached reply SURBs: pass it to [`MixClient::reply`] to
        /// answer without learning who the sender is.
        sender_tag: Option<SenderTag>,
        /// Set when the message came back through reply SURBs we attached to a message to
        /// this address: its answer, which nobody else could have sent that way.
        reply_from: Option<ClientAddress>,
    },
    /// Every fragment of a message we sent was stored by the recipient's gateway.
    Delivered { id: MessageId },
    /// The recipient confirmed it holds the whole message, intact (delivery receipts on).
    Confirmed { id: MessageId },
    /// A fragment of a message was not acknowledged after every retransmission, or no
    /// receipt came after every resend.
    Failed { id: MessageId },
}

/// Counters of what the client did.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub packets_sent: AtomicU64,
    pub retransmissions: AtomicU64,
    pub cover_sent: AtomicU64,
    pub acks_received: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub reconnects: AtomicU64,
    /// Delivered fragments that did not decrypt (altered on the way or at the gateway, or
    /// not for us): dropped, never passed on.
    pub fragments_rejected: AtomicU64,
    /// Loop cover packets sent, come back, and not back within their expected time.
    pub loops_sent: AtomicU64,
    pub loops_returned: AtomicU64,
    pub loops_missing: AtomicU64,
    /// Drop cover packets sent (to made-up clients).
    pub drop_cover_sent: AtomicU64,
    /// Delivery receipts we sent (as recipient) and received (as sender).
    pub receipts_sent: AtomicU64,
    pub receipts_received: AtomicU64,
    /// Whole messages sent again because no receipt came.
    pub resends: AtomicU64,
    /// Requests for more reply SURBs not answered: their asker had what a minute allows.
    pub surb_requests_refused: AtomicU64,
    /// Reply SURBs handed out (attached to messages and in top-ups).
    pub surbs_handed_out: AtomicU64,
}

enum Command {
    Send {
        to: ClientAddress,
        body: Vec<u8>,
        reply_surbs: usize,
        id: MessageId,
        done: tokio::sync::oneshot::Sender<Result<(), ClientError>>,
    },
    Reply {
        tag: SenderTag,
        body: Vec<u8>,
        id: MessageId,
        done: tokio::sync::oneshot::Sender<Result<(), ClientError>>,
    },
    Consumed(MessageId),
}

/// A running client.
pub struct MixClient {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    address: ClientAddress,
    stats: Arc<ClientStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl MixClient {
    /// Loads the topology, connects to the gateway and starts the client task.
    pub async fn start(config: ClientConfig, identity: Identity) -> Result<MixClient, ClientError> {
        let source = TopologySource::parse(&config.topology)
            .signed_by(config.topology_signer)
            .remembered_in(config.topology_memory.clone());
        let first = source.load_or_remembered().await?;
        let topology = TopologyHandle::with(first);
        let stop = CancellationToken::new();
        tokio::spawn(topology::refresh_loop(
            source,
            topology.clone(),
            config.topology_refresh,
            None,
            stop.clone(),
        ));
        let current = topology.current().ok_or(ClientError::Stopped)?;
        let gateway = match config.gateway {
            Some(g) => g,
            None => route::choose_gateway(&current)?.identity_key,
        };
        let encryption = e2e::EncryptionKey::derive(&identity);
        let address = ClientAddress {
            identity: identity.public(),
            encryption: encryption.public(),
            gateway,
        };
        let surbs =
            surbs::SurbStore::open(config.surb_store.as_deref(), surbs::SurbLimits::default())?;
        let stamps = Arc::new(registration::Stamps::open(config.stamps.clone()));
        let limits = chunking::ReassemblyLimits::default();
        let mut reassembler = Reassembler::new(limits);
        let completed = match &config.completed_ids {
            Some(path) => {
                let log = completed::CompletedLog::open(
                    path,
                    limits.remember_completed,
                    topology::unix_now(),
                )?;
                log.ids().for_each(|id| reassembler.remember_completed(*id));
                Some(log)
            }
            None => None,
        };
        let (inbox, reply_origin) = restore_inbox(config.inbox.as_deref(), &mut reassembler)?;
        let (sender, receiver) = open_session(
            &current,
            &gateway,
            &identity,
            config.gateway_address.as_ref(),
            &stamps,
            Rate::per_second(config.downstream_rate),
        )
        .await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let stats = Arc::new(ClientStats::default());
        let actor = Actor::new(
            actor::Parts {
                config,
                identity,
                encryption,
                address,
                topology,
                session: (sender, receiver),
                stamps,
                commands: cmd_rx,
                events: ev_tx,
                stats: stats.clone(),
                surbs,
                reassembler,
                completed,
                inbox,
                reply_origin,
            },
            stop.clone(),
        );
        let task = tokio::spawn(actor.run());
        Ok(MixClient {
            commands: cmd_tx,
            events: ev_rx,
            address,
            stats,
            stop,
            task,
        })
    }

    pub fn address(&self) -> ClientAddress {
        self.address
    }

    /// A handle that sends and replies through this client from another task, while this
    /// one waits for events.
    pub fn sender(&self) -> MixSender {
        MixSender {
            commands: self.commands.clone(),
        }
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The counters, readable after [`MixClient::stop`] (for the final count of a run).
    pub fn stats_handle(&self) -> Arc<ClientStats> {
        self.stats.clone()
    }

    /// Queues a message for `to`, with `reply_surbs` SURBs attached for its answer.
    pub async fn send(
        &self,
        to: ClientAddress,
        body: Vec<u8>,
        reply_surbs: usize,
    ) -> Result<MessageId, ClientError> {
        self.sender().send(to, body, reply_surbs).await
    }

    /// Answers the sender behind `tag` through the SURBs it attached (one per fragment).
    /// When they run low, the client asks the sender for more through one of them, and a
    /// reply that needs more than are left waits for them.
    pub async fn reply(&self, tag: SenderTag, body: Vec<u8>) -> Result<MessageId, ClientError> {
        self.sender().reply(tag, body).await
    }

    /// The application has what [`Event::Received`] handed it: with `hold_until_consumed`,
    /// only now is the gateway told to delete it.
    pub async fn consumed(&self, id: MessageId) -> Result<(), ClientError> {
        self.commands
            .send(Command::Consumed(id))
            .await
            .map_err(|_| ClientError::Stopped)
    }

    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Stops the client and closes its session.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Sends and replies through a [`MixClient`] (see [`MixClient::sender`]).
#[derive(Clone)]
pub struct MixSender {
    commands: mpsc::Sender<Command>,
}

impl MixSender {
    /// Queues a message for `to`, with `reply_surbs` SURBs attached for its answer.
    pub async fn send(
        &self,
        to: ClientAddress,
        body: Vec<u8>,
        reply_surbs: usize,
    ) -> Result<MessageId, ClientError> {
        let id = new_id()?;
        let (done, result) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Send {
                to,
                body,
                reply_surbs,
                id,
                done,
            })
            .await
            .map_err(|_| ClientError::Stopped)?;
        result.await.map_err(|_| ClientError::Stopped)??;
        Ok(id)
    }

    /// Answers the sender behind `tag` through the SURBs it attached (one per fragment).
    /// When they run low, the client asks the sender for more through one of them, and a
    /// reply that needs more than are left waits for them.
    pub async fn reply(&self, tag: SenderTag, body: Vec<u8>) -> Result<MessageId, ClientError> {
        let id = new_id()?;
        let (done, result) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Reply {
                tag,
                body,
                id,
                done,
            })
            .await
            .map_err(|_| ClientError::Stopped)?;
        result.await.map_err(|_| ClientError::Stopped)??;
        Ok(id)
    }
}

/// Most bytes of one reply that travel in a single fragment, so through a single SURB.
pub const SINGLE_FRAGMENT_REPLY: usize =
    Envelope::fragment_capacity(0) - chunking::FRAGMENT_HEADER - chunking::MESSAGE_HEADER_PLAIN;

/// Opens the inbox (when the client has one) and puts the fragments it kept back into
/// reassembly; gives back who each message answers, for those that came through our SURBs.
fn restore_inbox(
    path: Option<&std::path::Path>,
    reassembler: &mut Reassembler,
) -> Result<
    (
        Option<inbox::Inbox>,
        std::collections::HashMap<MessageId, ClientAddress>,
    ),
    ClientError,
> {
    let mut reply_origin = std::collections::HashMap::new();
    let Some(path) = path else {
        return Ok((None, reply_origin));
    };
    let inbox = inbox::Inbox::open(path)?;
    let now = tokio::time::Instant::now();
    for kept in inbox.load()? {
        if let (Ok((id, _, _)), Some(origin)) =
            (chunking::fragment_header(&kept.fragment), kept.reply_from)
        {
            reply_origin.insert(id, origin);
        }
        // None completes: the fragment that completes a message is never kept.
        let _ = reassembler.add(&kept.fragment, now);
    }
    Ok((Some(inbox), reply_origin))
}

fn new_id() -> Result<MessageId, ClientError> {
    let b = random_bytes().map_err(|e| ClientError::Random(e.to_string()))?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[..16]);
    Ok(id)
}

fn new_identifier() -> Result<[u8; IDENTIFIER_SIZE], ClientError> {
    // Non-zero: an all-zero identifier means "not a SURB" at the gateway.
    loop {
        let id = new_id()?;
        if id != [0u8; IDENTIFIER_SIZE] {
            return Ok(id);
        }
    }
}
