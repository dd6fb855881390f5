//! The mixnet client used by `nym-client` and the tests.
//!
//! A client is one task that owns its gateway session:
//! - messages are split into fragments, each sent in its own Sphinx packet through a fresh
//!   random route (one mix per layer, then the recipient's gateway);
//! - each packet carries a SURB-ACK; the recipient's gateway sends it back once the payload
//!   is stored, and a fragment whose ack does not arrive within its expected round trip
//!   (the delays the client itself drew, plus `ack_slack`) is sent again through a new
//!   route, at most `max_retransmissions` times, after which the message is reported failed;
//! - with cover traffic on, packets leave at Poisson-distributed times (`cover_rate` per
//!   second) and a loop cover packet goes out whenever no real packet is waiting, so an
//!   observer cannot tell when the client talks;
//! - with delivery receipts on, a message also carries a receipt SURB, sealed with it: the
//!   recipient sends it back once it holds the whole message, and a message whose receipt
//!   does not come (lost, or a fragment altered at the recipient's gateway) is sent again,
//!   at most `receipt_resends` times, after which it is reported failed;
//! - received fragments are reassembled (duplicates from retransmission dropped) and the
//!   gateway is told each payload was received so it can delete it;
//! - a lost session is re-established with backoff; the gateway redelivers what was not
//!   acknowledged.

pub mod chunking;
pub mod completed;
pub mod connection;
pub mod daemon;
pub mod e2e;
pub mod packet;
pub mod probe;
pub mod prober;
pub mod registration;
pub mod route;
pub mod socks5;
pub mod state;
pub mod surbs;
pub mod websocket;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand_distr::{Distribution, Exp};
use sphinx_packet::SurbReplyRecovery;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gateway::protocol::ClientMessage;
use crate::gateway::protocol::ServerMessage;
use crate::keys::{Identity, KeyBytes, NodeId, random_bytes};
use crate::message::Envelope;
use crate::mixnet::delay::DelayQueue;
use crate::mixnet::sphinx::{IDENTIFIER_SIZE, PacketBytes};
use crate::topology::{self, Topology, TopologyHandle, TopologySource};
use chunking::{Message, MessageId, MessageKind, Reassembler};
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
    /// Poisson rate of outgoing packets (real or cover) per second; 0 sends at once, no cover.
    pub cover_rate: f64,
    /// Share of cover slots that carry drop cover (to a made-up client of a random gateway)
    /// instead of a loop back to ourselves.
    pub drop_cover_ratio: f64,
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
            drop_cover_ratio: 0.0,
            acks: true,
            ack_slack: Duration::from_millis(1500),
            max_retransmissions: 6,
            receipt_timeout: None,
            receipt_resends: 3,
            surb_store: None,
            stamps: None,
            completed_ids: None,
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
}

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
}

enum Command {
    Send {
        to: ClientAddress,
        body: Vec<u8>,
        reply_surbs: usize,
        id: MessageId,
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
        let (sender, receiver) = open_session(
            &current,
            &gateway,
            &identity,
            config.gateway_address.as_ref(),
            &stamps,
        )
        .await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let stats = Arc::new(ClientStats::default());
        let actor = Actor {
            config,
            identity,
            encryption,
            address,
            topology,
            session: Some((sender, receiver)),
            stamps,
            commands: cmd_rx,
            events: ev_tx,
            stats: stats.clone(),
            outbox: VecDeque::new(),
            fragments: HashMap::new(),
            by_identifier: HashMap::new(),
            deadlines: DelayQueue::new(),
            messages: HashMap::new(),
            surbs,
            reply_origin: HashMap::new(),
            pending_replies: HashMap::new(),
            requested: HashMap::new(),
            held: HashMap::new(),
            awaiting: HashMap::new(),
            receipts: HashMap::new(),
            reassembler,
            completed,
            pending_acks: HashMap::new(),
            to_ack: Vec::new(),
            loops: HashSet::new(),
            cover_acks: HashSet::new(),
            stop: stop.clone(),
        };
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
        self.commands
            .send(Command::Send {
                to,
                body,
                reply_surbs,
                id,
            })
            .await
            .map_err(|_| ClientError::Stopped)?;
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

/// A session with `gateway`, paying for the registration with a stamp the first time the
/// gateway asks for one (the gateway closes that session; the next one carries the stamp).
async fn open_session(
    topology: &Topology,
    gateway: &NodeId,
    identity: &Identity,
    address_override: Option<&topology::PeerAddress>,
    stamps: &registration::Stamps,
) -> Result<(connection::Sender, connection::Receiver), ClientError> {
    let entry = topology.node(gateway);
    let address = address_override
        .cloned()
        .or_else(|| entry.and_then(|n| n.client_address.clone()))
        .ok_or(ClientError::NoClientAddress(*gateway))?;
    let noise = entry
        .map(|n| n.noise_key)
        .ok_or(ClientError::NoClientAddress(*gateway))?;
    let connect = |stamp| connection::connect(&address, &noise, identity, stamp, SESSION_TIMEOUT);
    match connect(stamps.get(gateway)).await {
        Err(connection::ConnectionError::StampRequired { bits }) => {
            let stamp = stamps.make(*gateway, identity.public(), bits).await?;
            Ok(connect(stamp).await?)
        }
        session => Ok(session?),
    }
}

/// Time a gateway has to complete the handshake and accept the client's authentication.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A packet ready to leave.
struct Ready {
    first_hop: NodeId,
    packet: PacketBytes,
    /// The fragment it carries and how long its round trip should take, if acknowledged.
    tracked: Option<(FragmentKey, [u8; IDENTIFIER_SIZE], Duration)>,
}

type FragmentKey = (MessageId, u16);

/// Fragment index under which a loop's deadline is kept (messages never have this many).
const LOOP_INDEX: u16 = u16::MAX;
/// Fragment index under which a message's receipt deadline is kept.
const RECEIPT_INDEX: u16 = u16::MAX - 1;

/// A recipient asks its sender for more SURBs when a reply leaves fewer than this.
const SURB_LOW_WATER: usize = 10;
/// How many SURBs it asks for.
const SURB_TOP_UP: usize = 20;
/// The most SURBs one request may ask for (a top-up is a message the sender pays for).
const MAX_SURBS_PER_REQUEST: usize = 100;
const SURB_REQUEST_INTERVAL: Duration = Duration::from_secs(10);
/// Replies held per sender tag while waiting for its SURBs.
const MAX_PENDING_REPLIES: usize = 64;

/// A data packet ready to go, and what it should take.
struct Built {
    ready: Ready,
    /// Sum of its per-hop delays: when it should reach its destination's mailbox.
    forward_delay: Duration,
    /// Its SURB-ACK's identifier and expected round trip, when acks are on.
    ack: Option<([u8; IDENTIFIER_SIZE], Duration)>,
    /// The mixes its route and its ack's route go through.
    mixes: Vec<NodeId>,
}

struct Fragment {
    to: ClientAddress,
    /// The fragment as sent (header + data), or the reply SURB it must go through.
    bytes: Vec<u8>,
    attempts: u32,
    identifiers: Vec<[u8; IDENTIFIER_SIZE]>,
    /// Mixes the last attempt (and its ack) went through: a retransmission avoids them.
    last_mixes: Vec<NodeId>,
}

struct Outgoing {
    remaining: usize,
    failed: bool,
}

/// A message sent with a receipt SURB, kept until its recipient confirms it.
struct AwaitingReceipt {
    to: ClientAddress,
    /// The message without its receipt SURB (each copy gets a fresh one).
    message: Message,
    resends: u32,
    /// `Delivered` was reported (for the first copy stored): later copies do not repeat it.
    stored: bool,
    /// Identifier of the newest receipt SURB: only its deadline counts.
    latest: [u8; IDENTIFIER_SIZE],
}

struct Actor {
    config: ClientConfig,
    identity: Identity,
    encryption: e2e::EncryptionKey,
    address: ClientAddress,
    topology: TopologyHandle,
    session: Option<(connection::Sender, connection::Receiver)>,
    stamps: Arc<registration::Stamps>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    stats: Arc<ClientStats>,
    outbox: VecDeque<Ready>,
    fragments: HashMap<FragmentKey, Fragment>,
    by_identifier: HashMap<[u8; IDENTIFIER_SIZE], FragmentKey>,
    deadlines: DelayQueue<([u8; IDENTIFIER_SIZE], FragmentKey)>,
    messages: HashMap<MessageId, Outgoing>,
    /// Reply SURBs: those received, by sender tag, and those handed out.
    surbs: surbs::SurbStore,
    /// Who a message coming back through our SURBs answers (by its message id).
    reply_origin: HashMap<MessageId, ClientAddress>,
    /// Replies waiting for more SURBs from their sender, and when we last asked for them.
    pending_replies: HashMap<SenderTag, VecDeque<(MessageId, Vec<u8>)>>,
    requested: HashMap<SenderTag, Instant>,
    /// Mailbox ids of messages handed to the application but not yet consumed.
    held: HashMap<MessageId, Vec<u64>>,
    /// Messages waiting for their recipient's receipt, and the receipt SURBs out for them
    /// (any copy's receipt confirms the message).
    awaiting: HashMap<MessageId, AwaitingReceipt>,
    receipts: HashMap<[u8; IDENTIFIER_SIZE], (MessageId, SurbReplyRecovery)>,
    reassembler: Reassembler,
    /// Ids of messages taken for good, on disk (see [`completed`]).
    completed: Option<completed::CompletedLog>,
    /// Gateway mailbox ids of fragments of incomplete messages: acked once the message is
    /// handed to the application.
    pending_acks: HashMap<MessageId, Vec<u64>>,
    to_ack: Vec<u64>,
    /// Loops out in the mixnet, by their fragment's message id.
    loops: HashSet<MessageId>,
    /// SURB-ACK identifiers of cover packets (absorbed when they come back).
    cover_acks: HashSet<[u8; IDENTIFIER_SIZE]>,
    stop: CancellationToken,
}

impl Actor {
    async fn run(mut self) {
        let mut next_slot = self.next_slot();
        let mut reconnect_at: Option<Instant> = None;
        let mut reconnect_wait = Duration::from_millis(200);
        loop {
            let deadline = self.deadlines.next_due();
            let connected = self.session.is_some();
            tokio::select! {
                _ = self.stop.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                msg = recv(&mut self.session), if connected => match msg {
                    Ok(msg) => self.handle_server(msg).await,
                    Err(e) => {
                        tracing::info!(error = %e, "gateway session lost; reconnecting");
                        self.session = None;
                        reconnect_at = Some(Instant::now());
                    }
                },
                _ = sleep_until_opt(deadline) => self.retransmit_due(),
                _ = sleep_until_opt(next_slot), if connected => {
                    self.send_slot().await;
                    next_slot = self.next_slot();
                }
                _ = sleep_until_opt(reconnect_at), if !connected => {
                    match self.reconnect().await {
                        Ok(()) => {
                            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            reconnect_at = None;
                            reconnect_wait = Duration::from_millis(200);
                            next_slot = self.next_slot();
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "reconnect failed");
                            reconnect_wait = (reconnect_wait * 2).min(Duration::from_secs(5));
                            reconnect_at = Some(Instant::now() + reconnect_wait);
                        }
                    }
                }
            }
            if self.config.cover_rate <= 0.0 && self.session.is_some() {
                self.flush_outbox().await;
            }
            self.flush_acks().await;
        }
        // What the application was told is sent, and the acks for what it consumed, leave
        // before the session closes (bounded: a dead gateway must not hold the stop up).
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if self.session.is_some() {
                self.flush_outbox().await;
            }
            self.flush_acks().await;
        })
        .await;
        if let Some(session) = self.session.take() {
            connection::close(session, Duration::from_secs(2)).await;
        }
    }

    async fn reconnect(&mut self) -> Result<(), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        self.session = Some(
            open_session(
                &topology,
                &self.address.gateway,
                &self.identity,
                self.config.gateway_address.as_ref(),
                &self.stamps,
            )
            .await?,
        );
        Ok(())
    }

    /// When the next Poisson slot is; `None` when sending at once (no cover traffic).
    fn next_slot(&self) -> Option<Instant> {
        if self.config.cover_rate <= 0.0 {
            return None;
        }
        let gap = Exp::new(self.config.cover_rate)
            .map(|e| e.sample(&mut rand::rng()))
            .unwrap_or(1.0);
        Some(Instant::now() + Duration::from_secs_f64(gap))
    }

    fn handle_command(&mut self, cmd: Command) {
        let result = match cmd {
            Command::Send {
                to,
                body,
                reply_surbs,
                id,
            } => self.queue_message(to, body, reply_surbs, id, MessageKind::Data),
            Command::Reply {
                tag,
                body,
                id,
                done,
            } => {
                let _ = done.send(self.queue_reply(tag, body, id));
                Ok(())
            }
            Command::Consumed(id) => {
                if let Some(ids) = self.held.remove(&id) {
                    self.take_for_good(id, ids);
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot send message");
        }
    }

    fn queue_message(
        &mut self,
        to: ClientAddress,
        body: Vec<u8>,
        reply_surbs: usize,
        id: MessageId,
        kind: MessageKind,
    ) -> Result<(), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let mut surbs = Vec::with_capacity(reply_surbs);
        for _ in 0..reply_surbs {
            let (surb, identifier, recovery) = self.surb_to_self(&topology)?;
            self.surbs.add_handed_out(&identifier, &recovery, &to)?;
            surbs.push(surb);
        }
        let message = Message {
            kind,
            sender_tag: (reply_surbs > 0).then(|| self.sender_tag(&to)),
            body,
            reply_surbs: surbs,
            receipt: None,
        };
        match self.config.receipt_timeout {
            Some(_) if kind == MessageKind::Data => {
                self.awaiting.insert(
                    id,
                    AwaitingReceipt {
                        to,
                        message,
                        resends: 0,
                        stored: false,
                        latest: [0; IDENTIFIER_SIZE],
                    },
                );
                self.send_awaiting(id)
            }
            _ => self.queue_fragments(id, to, &message),
        }
    }

    /// Our tag towards `to`: the same for every message to it (so its SURBs pool), unlike
    /// for any other recipient, and telling nothing about us. Ed25519 signatures are
    /// deterministic, so a signature over the recipient serves as a keyed hash.
    fn sender_tag(&self, to: &ClientAddress) -> SenderTag {
        let mut input = b"nym-node-rs/sender-tag/1".to_vec();
        input.extend_from_slice(&to.identity.0);
        input.extend_from_slice(&to.encryption.0);
        let signature = self.identity.sign(&input);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&signature[32..48]);
        tag
    }

    /// A fresh SURB that brings a packet back to us through our gateway.
    fn surb_to_self(
        &self,
        topology: &Topology,
    ) -> Result<(Vec<u8>, [u8; IDENTIFIER_SIZE], SurbReplyRecovery), ClientError> {
        let identifier = new_identifier()?;
        let route = route::choose(topology, &self.address.gateway)?;
        let delays = packet::sample_delays(route.len(), self.config.mean_delay);
        let (surb, recovery) =
            packet::build_surb(&route, &self.address.identity, identifier, &delays)?;
        Ok((surb, identifier, recovery))
    }

    /// Sends (again) a message that asks for a receipt, with a fresh receipt SURB: a SURB
    /// is single-use, as mixes drop a header they have seen.
    fn send_awaiting(&mut self, id: MessageId) -> Result<(), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let (surb, identifier, recovery) = self.surb_to_self(&topology)?;
        let Some(awaiting) = self.awaiting.get_mut(&id) else {
            return Ok(());
        };
        awaiting.latest = identifier;
        let to = awaiting.to;
        let message = Message {
            receipt: Some(surb),
            ..awaiting.message.clone()
        };
        self.receipts.insert(identifier, (id, recovery));
        if !self.config.acks {
            // Nothing will say when it was stored: the wait starts now.
            self.await_receipt(id);
        }
        self.queue_fragments(id, to, &message)
    }

    /// Starts the wait for a message's receipt.
    fn await_receipt(&mut self, id: MessageId) {
        let (Some(timeout), Some(awaiting)) = (self.config.receipt_timeout, self.awaiting.get(&id))
        else {
            return;
        };
        self.deadlines.push(
            Instant::now() + timeout,
            (awaiting.latest, (id, RECEIPT_INDEX)),
        );
    }

    /// No receipt came for the newest copy of a message: send it again, or give up.
    fn receipt_overdue(&mut self, id: MessageId, identifier: [u8; IDENTIFIER_SIZE]) {
        let Some(awaiting) = self.awaiting.get_mut(&id) else {
            return;
        };
        if awaiting.latest != identifier {
            return;
        }
        if awaiting.resends >= self.config.receipt_resends {
            self.awaiting.remove(&id);
            self.receipts.retain(|_, (m, _)| *m != id);
            let _ = self.events.try_send(Event::Failed { id });
            return;
        }
        awaiting.resends += 1;
        self.stats.resends.fetch_add(1, Ordering::Relaxed);
        self.messages.remove(&id);
        if let Err(e) = self.send_awaiting(id) {
            tracing::warn!(error = %e, "cannot resend a message; will retry");
            if let Some(timeout) = self.config.receipt_timeout {
                self.deadlines
                    .push(Instant::now() + timeout, (identifier, (id, RECEIPT_INDEX)));
            }
        }
    }

    /// Splits an encoded message into sealed fragments and queues each.
    fn queue_fragments(
        &mut self,
        id: MessageId,
        to: ClientAddress,
        message: &Message,
    ) -> Result<(), ClientError> {
        let fragments = chunking::split(id, &message.encode(), self.sealed_len() - e2e::OVERHEAD)?;
        self.messages.insert(
            id,
            Outgoing {
                remaining: fragments.len(),
                failed: false,
            },
        );
        for (i, bytes) in fragments.into_iter().enumerate() {
            let key = (id, i as u16);
            self.fragments.insert(
                key,
                Fragment {
                    to,
                    bytes,
                    attempts: 0,
                    identifiers: Vec::new(),
                    last_mixes: Vec::new(),
                },
            );
            self.prepare(key)?;
        }
        Ok(())
    }

    /// Replies go through the sender's SURBs: no route choice and no ack (the SURB's
    /// route is fixed and ends at the sender).
    fn queue_reply(
        &mut self,
        tag: SenderTag,
        body: Vec<u8>,
        id: MessageId,
    ) -> Result<(), ClientError> {
        let fragments = chunking::split(
            id,
            &Message::data(body.clone()).encode(),
            Envelope::fragment_capacity(0),
        )?;
        let have = self.surbs.received_count(&tag)?;
        if have == 0 && !self.requested.contains_key(&tag) {
            return Err(ClientError::NoReplySurbs);
        }
        if have < fragments.len() {
            // One SURB carries the request; the reply waits for the sender's top-up.
            let queue = self.pending_replies.entry(tag).or_default();
            if queue.len() >= MAX_PENDING_REPLIES {
                return Err(ClientError::NoReplySurbs);
            }
            queue.push_back((id, body));
            self.request_surbs(&tag, fragments.len() + SURB_TOP_UP);
            return Ok(());
        }
        let surbs = self.surbs.take_received(&tag, fragments.len())?;
        if surbs.len() < fragments.len() {
            return Err(ClientError::NoReplySurbs);
        }
        let used = fragments.len();
        for (fragment, surb) in fragments.into_iter().zip(surbs) {
            self.send_through_surb(&surb, fragment)?;
        }
        if have - used < SURB_LOW_WATER {
            self.request_surbs(&tag, SURB_TOP_UP);
        }
        Ok(())
    }

    fn send_through_surb(&mut self, surb: &[u8], fragment: Vec<u8>) -> Result<(), ClientError> {
        let envelope = Envelope::Data {
            ack: None,
            fragment,
        }
        .encode()
        .map_err(|e| packet::PacketError::from_message(e.to_string()))?;
        let (first_hop, packet) = packet::use_surb(surb, &envelope)?;
        self.outbox.push_back(Ready {
            first_hop,
            packet,
            tracked: None,
        });
        Ok(())
    }

    /// Asks the sender behind `tag` for `n` more SURBs, through one of its own (at most once
    /// per [`SURB_REQUEST_INTERVAL`] unless a top-up came meanwhile).
    fn request_surbs(&mut self, tag: &SenderTag, n: usize) {
        if self
            .requested
            .get(tag)
            .is_some_and(|at| at.elapsed() < SURB_REQUEST_INTERVAL)
        {
            return;
        }
        let asked = (|| -> Result<(), ClientError> {
            let surb = self
                .surbs
                .take_received(tag, 1)?
                .pop()
                .ok_or(ClientError::NoReplySurbs)?;
            let message = Message {
                kind: MessageKind::SurbRequest,
                body: (n.min(MAX_SURBS_PER_REQUEST) as u16).to_be_bytes().to_vec(),
                ..Message::data(Vec::new())
            };
            let mut fragments =
                chunking::split(new_id()?, &message.encode(), Envelope::fragment_capacity(0))?;
            let fragment = fragments.pop().unwrap_or_default();
            self.send_through_surb(&surb, fragment)
        })();
        match asked {
            Ok(()) => {
                self.requested.insert(*tag, Instant::now());
            }
            Err(e) => tracing::debug!(error = %e, "cannot ask for more reply SURBs"),
        }
    }

    /// Every sealed fragment of this client has this size, so a gateway sees no difference
    /// between a message's pieces and a loop.
    fn sealed_len(&self) -> usize {
        Envelope::fragment_capacity(if self.config.acks { SURB_ACK_SIZE } else { 0 })
    }

    /// Seals `fragment` to `to` and wraps it in a Sphinx packet along a fresh route, with a
    /// fresh SURB-ACK back to us when acks are on.
    fn build_data(
        &self,
        topology: &Topology,
        to: &ClientAddress,
        fragment: &[u8],
        avoid: &[NodeId],
    ) -> Result<Built, ClientError> {
        let route = route::choose_avoiding(topology, &to.gateway, avoid)?;
        let mut mixes: Vec<NodeId> = route[..route.len() - 1]
            .iter()
            .map(|h| h.identity)
            .collect();
        let delays = packet::sample_delays(route.len(), self.config.mean_delay);
        let (ack, tracked) = if self.config.acks {
            let identifier = new_identifier()?;
            let ack_route = route::choose_avoiding(topology, &self.address.gateway, avoid)?;
            mixes.extend(ack_route[..ack_route.len() - 1].iter().map(|h| h.identity));
            let ack_delays = packet::sample_delays(ack_route.len(), self.config.mean_delay);
            let (surb, _recovery) =
                packet::build_surb(&ack_route, &self.address.identity, identifier, &ack_delays)?;
            let expected: Duration = delays.iter().chain(ack_delays.iter()).sum();
            (Some(surb), Some((identifier, expected)))
        } else {
            (None, None)
        };
        // Sealed anew for every transmission: the recipient's gateway sees only ciphertext,
        // and two copies of one fragment do not look alike.
        let envelope = Envelope::Data {
            ack,
            fragment: e2e::seal(&to.encryption, fragment, self.sealed_len())?,
        }
        .encode()
        .map_err(|e| packet::PacketError::from_message(e.to_string()))?;
        let (first_hop, packet) = packet::build_forward(&route, &to.identity, &envelope, &delays)?;
        Ok(Built {
            ready: Ready {
                first_hop,
                packet,
                tracked: None,
            },
            forward_delay: delays.iter().sum(),
            ack: tracked,
            mixes,
        })
    }

    /// Builds a packet (with a fresh route and SURB-ACK) for a fragment and queues it.
    fn prepare(&mut self, key: FragmentKey) -> Result<(), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let Some(fragment) = self.fragments.get(&key) else {
            return Ok(());
        };
        let (to, bytes) = (fragment.to, fragment.bytes.clone());
        let avoid = fragment.last_mixes.clone();
        let Built {
            mut ready,
            ack,
            mixes,
            ..
        } = self.build_data(&topology, &to, &bytes, &avoid)?;
        if let Some(fragment) = self.fragments.get_mut(&key) {
            fragment.last_mixes = mixes;
        }
        if let Some((identifier, expected)) = ack {
            if let Some(fragment) = self.fragments.get_mut(&key) {
                fragment.identifiers.push(identifier);
            }
            self.by_identifier.insert(identifier, key);
            ready.tracked = Some((key, identifier, expected));
        }
        self.outbox.push_back(ready);
        Ok(())
    }

    async fn send_slot(&mut self) {
        if let Some(ready) = self.outbox.pop_front() {
            self.transmit(ready).await;
            return;
        }
        let drop = self.config.drop_cover_ratio > 0.0
            && rand::random::<f64>() < self.config.drop_cover_ratio;
        let cover = if drop {
            self.drop_cover()
        } else {
            self.loop_cover()
        };
        let (built, loop_id) = match cover {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot build a cover packet");
                return;
            }
        };
        if !self.transmit(built.ready).await {
            return;
        }
        self.stats.cover_sent.fetch_add(1, Ordering::Relaxed);
        if let Some((identifier, _)) = built.ack {
            self.cover_acks.insert(identifier);
        }
        match loop_id {
            Some(id) => {
                self.stats.loops_sent.fetch_add(1, Ordering::Relaxed);
                self.loops.insert(id);
                // Back in our mailbox after its forward delays; the slack covers the rest.
                self.deadlines.push(
                    Instant::now() + built.forward_delay + self.config.ack_slack,
                    ([0; IDENTIFIER_SIZE], (id, LOOP_INDEX)),
                );
            }
            None => {
                self.stats.drop_cover_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An empty fragment (one piece of an empty message) under a fresh id.
    fn empty_fragment(&self) -> Result<(MessageId, Vec<u8>), ClientError> {
        let id = new_id()?;
        let fragment = chunking::split(id, &[], self.sealed_len() - e2e::OVERHEAD)?
            .pop()
            .unwrap_or_default();
        Ok((id, fragment))
    }

    /// Loop cover: a sealed, acknowledged packet to ourselves through the mixnet, like any
    /// message. Our gateway stores and acknowledges it as it does everything; only we can
    /// tell it is a loop, once it comes back and opens. One that does not come back in time
    /// is counted missing: packets are being dropped or delayed somewhere.
    fn loop_cover(&self) -> Result<(Built, Option<MessageId>), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let (id, fragment) = self.empty_fragment()?;
        Ok((
            self.build_data(&topology, &self.address, &fragment, &[])?,
            Some(id),
        ))
    }

    /// Drop cover: a sealed packet to a made-up client of a random gateway, which keeps it
    /// under its budget for unknown clients until it expires; nobody can open it.
    fn drop_cover(&self) -> Result<(Built, Option<MessageId>), ClientError> {
        let topology = self.topology.current().ok_or(ClientError::Stopped)?;
        let gateway = route::choose_gateway(&topology)?.identity_key;
        let nobody = Identity::generate().map_err(|e| ClientError::Random(e.to_string()))?;
        let (_, fragment) = self.empty_fragment()?;
        let built = self.build_data(
            &topology,
            &ClientAddress::of(&nobody, gateway),
            &fragment,
            &[],
        )?;
        Ok((built, None))
    }

    async fn flush_outbox(&mut self) {
        while let Some(ready) = self.outbox.pop_front() {
            if !self.transmit(ready).await {
                break;
            }
        }
    }

    /// Writes one packet to the gateway; false (and the packet requeued) if the session failed.
    async fn transmit(&mut self, ready: Ready) -> bool {
        let Some((sender, _)) = self.session.as_mut() else {
            self.outbox.push_front(ready);
            return false;
        };
        let msg = ClientMessage::Send {
            first_hop: ready.first_hop,
            packet: ready.packet.clone(),
        };
        if sender.send(&msg).await.is_err() {
            self.session = None;
            self.outbox.push_front(ready);
            return false;
        }
        self.stats.packets_sent.fetch_add(1, Ordering::Relaxed);
        if let Some((key, identifier, expected)) = ready.tracked {
            self.deadlines.push(
                Instant::now() + expected + self.config.ack_slack,
                (identifier, key),
            );
        }
        true
    }

    fn retransmit_due(&mut self) {
        let now = Instant::now();
        while let Some((_, (identifier, key))) = self.deadlines.pop_due(now) {
            if key.1 == LOOP_INDEX {
                if self.loops.remove(&key.0) {
                    self.stats.loops_missing.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if key.1 == RECEIPT_INDEX {
                self.receipt_overdue(key.0, identifier);
                continue;
            }
            // Only the newest copy's deadline counts; older copies were already replaced.
            let Some(fragment) = self.fragments.get_mut(&key) else {
                continue;
            };
            if fragment.identifiers.last() != Some(&identifier) {
                continue;
            }
            fragment.attempts += 1;
            if fragment.attempts > self.config.max_retransmissions {
                self.fail_message(key.0);
                continue;
            }
            self.stats.retransmissions.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.prepare(key) {
                tracing::warn!(error = %e, "cannot retransmit; will retry");
                self.deadlines
                    .push(now + self.config.ack_slack, (identifier, key));
            }
        }
    }

    /// Stops tracking (and retransmitting) every fragment of message `id`.
    fn forget_fragments(&mut self, id: MessageId) {
        let keys: Vec<FragmentKey> = self
            .fragments
            .keys()
            .filter(|k| k.0 == id)
            .copied()
            .collect();
        for key in keys {
            if let Some(f) = self.fragments.remove(&key) {
                for i in f.identifiers {
                    self.by_identifier.remove(&i);
                }
            }
        }
    }

    fn fail_message(&mut self, id: MessageId) {
        self.forget_fragments(id);
        if let Some(m) = self.messages.get_mut(&id)
            && !m.failed
        {
            m.failed = true;
            let _ = self.events.try_send(Event::Failed { id });
        }
        self.messages.remove(&id);
        self.awaiting.remove(&id);
        self.receipts.retain(|_, (m, _)| *m != id);
    }

    async fn handle_server(&mut self, msg: ServerMessage) {
        let ServerMessage::Deliver {
            id,
            identifier,
            body,
        } = msg
        else {
            return;
        };
        if identifier == [0u8; IDENTIFIER_SIZE] {
            match self.encryption.open(&body) {
                Ok(fragment) if self.is_returning_loop(&fragment) => {
                    self.stats.loops_returned.fetch_add(1, Ordering::Relaxed);
                    self.to_ack.push(id);
                }
                Ok(fragment) => self.receive_fragment(&fragment, id).await,
                Err(e) => {
                    // Acknowledged to the gateway all the same, so it is not redelivered.
                    self.stats
                        .fragments_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "delivered fragment rejected");
                    self.to_ack.push(id);
                }
            }
            return;
        }
        // Everything else (acks, replies) is done with once handled below.
        self.handle_surb_delivery(identifier, id, &body).await;
    }

    async fn handle_surb_delivery(
        &mut self,
        identifier: [u8; IDENTIFIER_SIZE],
        id: u64,
        body: &[u8],
    ) {
        if let Some((message, recovery)) = self.receipts.remove(&identifier) {
            self.to_ack.push(id);
            let confirms = packet::open_reply(&recovery, body)
                .ok()
                .and_then(|p| Envelope::decode(&p).ok())
                .is_some_and(|Envelope::Data { fragment, .. }| fragment == message);
            if confirms {
                self.stats.receipts_received.fetch_add(1, Ordering::Relaxed);
                self.confirm(message).await;
            } else {
                tracing::debug!("a receipt that does not open to its message");
            }
            return;
        }
        // Acknowledgements (the most frequent by far) are known in memory: nothing to hand
        // on, done with at once, and the SURB store is not touched for them.
        if let Some(key) = self.by_identifier.remove(&identifier) {
            self.to_ack.push(id);
            self.stats.acks_received.fetch_add(1, Ordering::Relaxed);
            if let Some(fragment) = self.fragments.remove(&key) {
                for i in fragment.identifiers {
                    self.by_identifier.remove(&i);
                }
                if let Some(m) = self.messages.get_mut(&key.0) {
                    m.remaining = m.remaining.saturating_sub(1);
                    if m.remaining == 0 {
                        self.messages.remove(&key.0);
                        self.stored(key.0).await;
                    }
                }
            }
            return;
        }
        if self.cover_acks.remove(&identifier) {
            self.to_ack.push(id);
            return;
        }
        let handed_out = match self.surbs.take_handed_out(&identifier) {
            Ok(found) => found,
            Err(e) => {
                // Not acknowledged: the gateway delivers it again next session.
                tracing::warn!(error = %e, "reply SURB store");
                return;
            }
        };
        if let Some((recovery, origin)) = handed_out {
            match packet::open_reply(&recovery, body) {
                Ok(plaintext) => match Envelope::decode(&plaintext) {
                    Ok(Envelope::Data { fragment, .. }) => {
                        if let Ok((message, _, _)) = chunking::fragment_header(&fragment) {
                            self.reply_origin.insert(message, origin);
                        }
                        return self.receive_fragment(&fragment, id).await;
                    }
                    _ => tracing::debug!("reply with an unexpected envelope"),
                },
                Err(e) => tracing::debug!(error = %e, "cannot open a reply"),
            }
            self.to_ack.push(id);
            return;
        }
        self.to_ack.push(id);
        // A late ack for a copy we had already given up on or that was acked already.
        self.stats
            .duplicates_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every fragment of (a copy of) a message was stored by its recipient's gateway.
    async fn stored(&mut self, id: MessageId) {
        let first = match self.awaiting.get_mut(&id) {
            Some(awaiting) => !std::mem::replace(&mut awaiting.stored, true),
            None => true,
        };
        if first {
            let _ = self.events.send(Event::Delivered { id }).await;
        }
        self.await_receipt(id);
    }

    /// The recipient holds the whole message: nothing of it needs sending any more.
    async fn confirm(&mut self, id: MessageId) {
        let Some(awaiting) = self.awaiting.remove(&id) else {
            return; // a second receipt, for a copy sent before the first came back
        };
        self.receipts.retain(|_, (m, _)| *m != id);
        self.forget_fragments(id);
        self.messages.remove(&id);
        if !awaiting.stored {
            // Its receipt overtook the last of its gateway acks.
            let _ = self.events.send(Event::Delivered { id }).await;
        }
        let _ = self.events.send(Event::Confirmed { id }).await;
    }

    /// The application has message `id`: remember that on disk, then let the gateway delete
    /// its fragments (stored as `mailbox_ids`). In that order, so a restart in between shows
    /// the message again rather than losing it, and a later copy is never shown.
    fn take_for_good(&mut self, id: MessageId, mailbox_ids: Vec<u64>) {
        if let Some(log) = &mut self.completed
            && let Err(e) = log.record(id, topology::unix_now())
        {
            tracing::warn!(error = %e, "cannot remember a completed message: a copy delivered after a restart would be shown again");
        }
        self.to_ack.extend(mailbox_ids);
    }

    /// Sends a delivery receipt for message `id` through the SURB its sender attached. The
    /// receipt is the message id, which only the recipient of the sealed message knows.
    fn send_receipt(&mut self, id: MessageId, surb: &[u8]) {
        match self.send_through_surb(surb, id.to_vec()) {
            Ok(()) => {
                self.stats.receipts_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "cannot use a receipt SURB"),
        }
    }

    /// True (and the loop forgotten) when an opened fragment is one of our loops.
    fn is_returning_loop(&mut self, fragment: &[u8]) -> bool {
        let Some(id) = fragment.get(..chunking::MESSAGE_ID_SIZE) else {
            return false;
        };
        let Ok(id) = MessageId::try_from(id) else {
            return false;
        };
        self.loops.remove(&id)
    }

    /// Adds a fragment to its message. The gateway is told to delete the fragment (acked)
    /// only once its whole message was handed to the application, or when it can never
    /// complete (malformed, a duplicate, or a message given up on): until then it stays
    /// stored at the gateway and comes again next session.
    async fn receive_fragment(&mut self, fragment: &[u8], mailbox_id: u64) {
        let before = self.reassembler.duplicates;
        match self.reassembler.add(fragment, Instant::now()) {
            Ok(Some((id, bytes))) => {
                let mut ids = self.pending_acks.remove(&id).unwrap_or_default();
                ids.push(mailbox_id);
                let origin = self.reply_origin.remove(&id);
                match Message::decode(&bytes) {
                    Ok(message) if message.kind == MessageKind::Data => {
                        if let (Some(tag), false) =
                            (message.sender_tag, message.reply_surbs.is_empty())
                            && let Err(e) = self.surbs.add_received(&tag, &message.reply_surbs)
                        {
                            tracing::warn!(error = %e, "cannot keep reply SURBs");
                        }
                        let handed = self
                            .events
                            .send(Event::Received {
                                id,
                                body: message.body,
                                sender_tag: message.sender_tag,
                            })
                            .await;
                        if handed.is_ok() {
                            if self.config.hold_until_consumed {
                                self.held.insert(id, ids);
                            } else {
                                self.take_for_good(id, ids);
                            }
                            if let Some(surb) = message.receipt {
                                self.send_receipt(id, &surb);
                            }
                        }
                    }
                    Ok(message) => {
                        self.to_ack.extend(ids);
                        self.handle_control(message, origin);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "malformed message");
                        self.to_ack.extend(ids);
                    }
                }
            }
            Ok(None) if self.reassembler.duplicates > before => {
                self.to_ack.push(mailbox_id);
                // The sender resent a message we have: our receipt was lost on the way.
                if let Some((id, surb)) = chunking::receipt_in_first_fragment(fragment)
                    && self.reassembler.is_completed(&id)
                {
                    self.send_receipt(id, &surb);
                }
            }
            Ok(None) => {
                if let Ok((id, _, _)) = chunking::fragment_header(fragment) {
                    self.pending_acks.entry(id).or_default().push(mailbox_id);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed fragment");
                self.to_ack.push(mailbox_id);
            }
        }
        for gone in self.reassembler.take_abandoned() {
            self.to_ack
                .extend(self.pending_acks.remove(&gone).unwrap_or_default());
        }
        let dup = self.reassembler.duplicates - before;
        self.stats
            .duplicates_dropped
            .fetch_add(dup, Ordering::Relaxed);
    }

    /// A message for the client itself: a request for more of our SURBs, or a top-up.
    fn handle_control(&mut self, message: Message, origin: Option<ClientAddress>) {
        match message.kind {
            MessageKind::SurbRequest => {
                let Some(to) = origin else {
                    return; // not through one of our SURBs: nobody to answer
                };
                let wanted = message
                    .body
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .unwrap_or(0)
                    .min(MAX_SURBS_PER_REQUEST);
                if wanted == 0 {
                    return;
                }
                let sent = new_id().and_then(|id| {
                    self.queue_message(to, Vec::new(), wanted, id, MessageKind::SurbTopUp)
                });
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "cannot send more reply SURBs");
                }
            }
            MessageKind::SurbTopUp => {
                let Some(tag) = message.sender_tag else {
                    return;
                };
                if let Err(e) = self.surbs.add_received(&tag, &message.reply_surbs) {
                    tracing::warn!(error = %e, "cannot keep reply SURBs");
                    return;
                }
                self.requested.remove(&tag);
                for (id, body) in self.pending_replies.remove(&tag).unwrap_or_default() {
                    if let Err(e) = self.queue_reply(tag, body, id) {
                        tracing::warn!(error = %e, "a held reply cannot be sent");
                    }
                }
            }
            MessageKind::Data => {}
        }
    }

    /// Tells the gateway which payloads we have, so it deletes them.
    async fn flush_acks(&mut self) {
        if self.to_ack.is_empty() {
            return;
        }
        let Some((sender, _)) = self.session.as_mut() else {
            return;
        };
        let ids = std::mem::take(&mut self.to_ack);
        // One Ack message must fit one frame.
        for chunk in ids.chunks(crate::gateway::protocol::MAX_ACK_IDS) {
            let ack = ClientMessage::Ack {
                ids: chunk.to_vec(),
            };
            if sender.send(&ack).await.is_err() {
                self.session = None;
                return;
            }
        }
    }
}

async fn recv(
    session: &mut Option<(connection::Sender, connection::Receiver)>,
) -> Result<ServerMessage, connection::ConnectionError> {
    match session {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
