//! The client's task: it owns the gateway session and everything in flight. Its jobs, one
//! file each: [`sending`] (the upstream and loop slots, building packets at send time,
//! acknowledgements and retransmission), [`receiving`] (frames from the gateway,
//! reassembly, handing messages over), [`replies`] (reply SURBs: using them, asking for more,
//! handing them out) and [`receipts`] (delivery receipts, either side).

mod receipts;
mod receiving;
mod replies;
mod sending;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sphinx_packet::SurbReplyRecovery;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gateway::protocol::{ClientMessage, Rate, ServerMessage};
use crate::keys::{Identity, NodeId};
use crate::message::{DROP_COVER_DESTINATION, Envelope};
use crate::mixnet::delay::DelayQueue;
use crate::mixnet::sphinx::IDENTIFIER_SIZE;
use crate::topology::{self, Topology, TopologyHandle};

use super::chunking::{self, Message, MessageId, MessageKind, Reassembler};
use super::outbox::{FragmentKey, Outbox, Priority, Queued, Ready};
use super::{
    ClientAddress, ClientConfig, ClientError, ClientStats, Command, Event, SURB_ACK_SIZE,
    SenderTag, completed, connection, e2e, inbox, new_id, new_identifier, packet, registration,
    route, surbs, top_up,
};
use crate::slots::{PoissonClock, catch_up_from, sleep_until};

/// Packets queued on others' behalf (SURB top-ups) at most.
const MAX_BACKGROUND: usize = 512;
/// Mean downstream gaps an ack or loop is allowed to wait for its slot (the chance that
/// it waits longer at idle is e^-5).
const DOWNSTREAM_SLOTS: f64 = 5.0;
/// At stop, what is queued still leaves in its slots for this long at most; what is left
/// then is reported failed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A session with `gateway`, paying for the registration with a stamp the first time the
/// gateway asks for one (the gateway closes that session; the next one carries the stamp).
pub(super) async fn open_session(
    topology: &Topology,
    gateway: &NodeId,
    identity: &Identity,
    address_override: Option<&topology::PeerAddress>,
    stamps: &registration::Stamps,
    downstream: Rate,
) -> Result<(connection::Sender, connection::Receiver), ClientError> {
    let entry = topology.node(gateway);
    let address = address_override
        .cloned()
        .or_else(|| entry.and_then(|n| n.client_address.clone()))
        .ok_or(ClientError::NoClientAddress(*gateway))?;
    let noise = entry
        .map(|n| n.noise_key)
        .ok_or(ClientError::NoClientAddress(*gateway))?;
    let connect = |stamp| {
        connection::connect_paced(
            &address,
            &noise,
            identity,
            stamp,
            downstream,
            SESSION_TIMEOUT,
        )
    };
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
    /// Which queue it waits in for its slots.
    priority: Priority,
    /// Times its deadline was put off for a backlog downstream (at most
    /// [`MAX_POSTPONEMENTS`]: a downstream saturated for good must not stop retransmission).
    postponed: u32,
}

/// Times a fragment's retransmission may be put off while our downstream is backlogged.
const MAX_POSTPONEMENTS: u32 = 10;

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

/// What a client starts its task with.
pub(super) struct Parts {
    pub config: ClientConfig,
    pub identity: Identity,
    pub encryption: e2e::EncryptionKey,
    pub address: ClientAddress,
    pub topology: TopologyHandle,
    pub session: (connection::Sender, connection::Receiver),
    pub stamps: Arc<registration::Stamps>,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<Event>,
    pub stats: Arc<ClientStats>,
    pub surbs: surbs::SurbStore,
    pub reassembler: Reassembler,
    pub completed: Option<completed::CompletedLog>,
    pub inbox: Option<inbox::Inbox>,
    pub reply_origin: HashMap<MessageId, ClientAddress>,
}

pub(super) struct Actor {
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
    outbox: Outbox,
    /// Upstream slots (application packets, acks, drop cover) and loop slots.
    upstream: PoissonClock,
    loop_clock: PoissonClock,
    /// When the gateway last sent a dummy frame: while it sends none, our downstream has a
    /// backlog, and acks and loops are late for that, not lost.
    last_dummy: Instant,
    /// Whose turn a slot is when both packets and acks wait.
    ack_turn: bool,
    /// SURBs granted to recipients that asked for more.
    top_ups: top_up::TopUpBudget<ClientAddress>,
    /// Receipts waiting for their random delay: the message and its receipt SURB.
    receipts_due: DelayQueue<(MessageId, Vec<u8>)>,
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
    /// Fragments of incomplete messages, on disk (see [`inbox`]).
    inbox: Option<inbox::Inbox>,
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
    pub(super) fn new(parts: Parts, stop: CancellationToken) -> Actor {
        let upstream = PoissonClock::new(parts.config.cover_rate);
        // No upstream stream means no cover at all: no loops either.
        let loop_clock = PoissonClock::new(if upstream.is_running() {
            parts.config.loop_rate
        } else {
            0.0
        });
        Actor {
            outbox: Outbox::new(parts.config.max_outbox, MAX_BACKGROUND),
            upstream,
            loop_clock,
            config: parts.config,
            identity: parts.identity,
            encryption: parts.encryption,
            address: parts.address,
            topology: parts.topology,
            session: Some(parts.session),
            stamps: parts.stamps,
            commands: parts.commands,
            events: parts.events,
            stats: parts.stats,
            last_dummy: Instant::now(),
            ack_turn: false,
            top_ups: top_up::TopUpBudget::new(Instant::now()),
            receipts_due: DelayQueue::new(),
            fragments: HashMap::new(),
            by_identifier: HashMap::new(),
            deadlines: DelayQueue::new(),
            messages: HashMap::new(),
            surbs: parts.surbs,
            reply_origin: parts.reply_origin,
            inbox: parts.inbox,
            pending_replies: HashMap::new(),
            requested: HashMap::new(),
            held: HashMap::new(),
            awaiting: HashMap::new(),
            receipts: HashMap::new(),
            reassembler: parts.reassembler,
            completed: parts.completed,
            pending_acks: HashMap::new(),
            to_ack: Vec::new(),
            loops: HashSet::new(),
            cover_acks: HashSet::new(),
            stop,
        }
    }

    pub(super) async fn run(mut self) {
        let mut next_slot = self.upstream.next(Instant::now());
        let mut next_loop = self.loop_clock.next(Instant::now());
        let mut reconnect_at: Option<Instant> = None;
        let mut reconnect_wait = Duration::from_millis(200);
        loop {
            let deadline = self.deadlines.next_due();
            let receipt_due = self.receipts_due.next_due();
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
                _ = sleep_until(deadline) => self.retransmit_due(),
                _ = sleep_until(receipt_due) => self.send_receipts_due(),
                _ = sleep_until(next_slot), if connected => {
                    self.send_slot().await;
                    next_slot = self.upstream.next(catch_up_from(next_slot));
                }
                _ = sleep_until(next_loop), if connected => {
                    self.send_loop().await;
                    next_loop = self.loop_clock.next(catch_up_from(next_loop));
                }
                _ = sleep_until(reconnect_at), if !connected => {
                    match self.reconnect().await {
                        Ok(()) => {
                            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            reconnect_at = None;
                            reconnect_wait = Duration::from_millis(200);
                            next_slot = self.upstream.next(Instant::now());
                            next_loop = self.loop_clock.next(Instant::now());
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "reconnect failed");
                            reconnect_wait = (reconnect_wait * 2).min(Duration::from_secs(5));
                            reconnect_at = Some(Instant::now() + reconnect_wait);
                        }
                    }
                }
            }
            if !self.upstream.is_running() && self.session.is_some() {
                self.flush_outbox().await;
                self.flush_acks().await;
            }
            // A write that failed dropped the session: reconnect as after a failed read.
            if self.session.is_none() && reconnect_at.is_none() {
                tracing::info!("gateway session lost; reconnecting");
                reconnect_at = Some(Instant::now());
            }
        }
        self.drain_at_stop().await;
        if let Some(session) = self.session.take() {
            connection::close(session, Duration::from_secs(2)).await;
        }
    }

    /// What the application queued, and the acks for what it took, still leave before the
    /// session closes: in their slots, at the normal rate (a burst at stop would show when
    /// the client stops talking), for [`STOP_GRACE`] at most; a dead gateway must not hold
    /// the stop up either. What is left then is reported failed.
    async fn drain_at_stop(&mut self) {
        let drain = async {
            if !self.upstream.is_running() {
                self.flush_outbox().await;
                self.flush_acks().await;
                return;
            }
            // Both streams keep their rates: loops stopping would show something was pending.
            let mut next_slot = self.upstream.next(Instant::now());
            let mut next_loop = self.loop_clock.next(Instant::now());
            while self.session.is_some() && (!self.outbox.is_empty() || !self.to_ack.is_empty()) {
                tokio::select! {
                    _ = sleep_until(next_slot) => {
                        self.send_slot().await;
                        next_slot = self.upstream.next(catch_up_from(next_slot));
                    }
                    _ = sleep_until(next_loop) => {
                        self.send_loop().await;
                        next_loop = self.loop_clock.next(catch_up_from(next_loop));
                    }
                }
            }
        };
        let _ = tokio::time::timeout(STOP_GRACE, drain).await;
        let mut unsent = HashSet::new();
        while let Some((_, item)) = self.outbox.pop() {
            if let Queued::Fragment((id, _)) = item {
                unsent.insert(id);
            }
        }
        if !unsent.is_empty() || !self.to_ack.is_empty() {
            tracing::warn!(
                messages = unsent.len(),
                acks = self.to_ack.len(),
                "stopped before everything queued was sent: those messages are reported failed, and unacknowledged payloads come again next session"
            );
        }
        for id in unsent {
            if self.messages.contains_key(&id) {
                let _ = self.events.try_send(Event::Failed { id });
            }
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
                Rate::per_second(self.config.downstream_rate),
            )
            .await?,
        );
        self.last_dummy = Instant::now();
        Ok(())
    }

    /// How long a frame may wait for a downstream slot at the gateway, at most but for a
    /// backlog: [`DOWNSTREAM_SLOTS`] mean gaps of the agreed rate (0 when unpaced).
    fn downstream_wait(&self) -> Duration {
        match &self.session {
            Some((_, rx)) if rx.downstream.is_paced() => {
                Duration::from_secs_f64(DOWNSTREAM_SLOTS / rx.downstream.as_per_second())
            }
            _ => Duration::ZERO,
        }
    }

    /// What an ack or a loop may take beyond its route's delays before it counts as lost.
    fn slack(&self) -> Duration {
        self.config.ack_slack + self.downstream_wait()
    }

    /// Whether our downstream is backlogged: paced, and no dummy frame for longer than
    /// [`DOWNSTREAM_SLOTS`] gaps (at idle, 1 chance in 150).
    fn downstream_backlogged(&self) -> bool {
        let wait = self.downstream_wait();
        !wait.is_zero() && self.last_dummy.elapsed() > wait.max(self.config.ack_slack)
    }

    fn handle_command(&mut self, cmd: Command) {
        let result: Result<(), ClientError> = match cmd {
            Command::Send {
                to,
                body,
                reply_surbs,
                id,
                done,
            } => {
                let queued = self.queue_message(to, body, reply_surbs, id, MessageKind::Data);
                let _ = done.send(queued);
                Ok(())
            }
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
}

async fn recv(
    session: &mut Option<(connection::Sender, connection::Receiver)>,
) -> Result<ServerMessage, connection::ConnectionError> {
    match session {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}
