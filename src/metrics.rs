//! The node's one metrics registry. Every metric is defined here, once, with the
//! `nym_node_` prefix; hot paths hold pre-resolved label children so counting a packet
//! is one atomic add, never a label lookup.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a packet was dropped. Every drop site counts exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A frame whose length or layout is wrong (the connection is closed).
    MalformedFrame,
    /// A frame longer than the protocol allows (the connection is closed).
    OversizedFrame,
    /// A frame whose version byte this node does not speak (the connection is closed).
    BadVersion,
    /// A frame that failed Noise authentication (the connection is closed).
    DecryptFailed,
    /// A Sphinx packet that does not parse or process (a low-order group element, a bad payload).
    MalformedPacket,
    /// A Sphinx packet this node has already processed.
    Replay,
    /// A Sphinx packet whose header authenticates under none of this node's live keys: built for a key past its overlap, for another node, or altered by its sender (links are authenticated, so nothing else can alter it).
    ExpiredKey,
    /// A packet asking to be held longer than `NYM_NODE_MAX_PACKET_DELAY`.
    ExcessiveDelay,
    /// A next hop that is not in the topology.
    UnknownPeer,
    /// A packet this node cannot route: a final hop at a mix node, or a peer without a usable address.
    NoRoute,
    /// Shed before unwrapping because the Sphinx workers are saturated.
    Overload,
    /// The queue towards one egress peer is full.
    QueueFull,
    /// The forwarder already holds `NYM_NODE_DELAY_QUEUE_CAPACITY` packets for their delays.
    DelayQueueFull,
    /// Abandoned because a flush to the peer exceeded `NYM_NODE_CONNECTION_WRITE_TIMEOUT`.
    WriteTimeout,
    /// Held for a peer that could not be reached, and still unsent after 5 s (or beyond the
    /// egress queue's size) while it is backed off.
    Backoff,
    /// The connection to the peer broke while the packet was on its way out.
    Unreachable,
    /// Still queued when the node exited and the peer could not take it, or refused because the node's pipeline has stopped.
    Shutdown,
    /// A final-hop payload refused because its client's mailbox is over quota.
    MailboxFull,
    /// A client packet beyond the client's rate limit.
    RateLimited,
    /// A final-hop payload for which `NYM_NODE_DELIVERY_QUEUE` payloads already wait for the mailbox.
    DeliveryQueueFull,
    /// An unwrapped packet whose replay tag could not be written to the replay journal (it could be replayed after a crash, so it does not go on).
    ReplayJournal,
}

impl DropReason {
    pub const ALL: [DropReason; 21] = [
        DropReason::MalformedFrame,
        DropReason::OversizedFrame,
        DropReason::BadVersion,
        DropReason::DecryptFailed,
        DropReason::MalformedPacket,
        DropReason::Replay,
        DropReason::ExpiredKey,
        DropReason::ExcessiveDelay,
        DropReason::UnknownPeer,
        DropReason::NoRoute,
        DropReason::Overload,
        DropReason::QueueFull,
        DropReason::WriteTimeout,
        DropReason::Backoff,
        DropReason::Unreachable,
        DropReason::Shutdown,
        DropReason::MailboxFull,
        DropReason::RateLimited,
        DropReason::DelayQueueFull,
        DropReason::DeliveryQueueFull,
        DropReason::ReplayJournal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MalformedFrame => "malformed_frame",
            DropReason::OversizedFrame => "oversized_frame",
            DropReason::BadVersion => "bad_version",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::MalformedPacket => "malformed_packet",
            DropReason::Replay => "replay",
            DropReason::ExpiredKey => "expired_key",
            DropReason::ExcessiveDelay => "excessive_delay",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NoRoute => "no_route",
            DropReason::Overload => "overload",
            DropReason::QueueFull => "queue_full",
            DropReason::WriteTimeout => "write_timeout",
            DropReason::Backoff => "backoff",
            DropReason::Unreachable => "unreachable",
            DropReason::Shutdown => "shutdown",
            DropReason::MailboxFull => "mailbox_full",
            DropReason::RateLimited => "rate_limited",
            DropReason::DelayQueueFull => "delay_queue_full",
            DropReason::DeliveryQueueFull => "delivery_queue_full",
            DropReason::ReplayJournal => "replay_journal",
        }
    }

    /// Position in [`DropReason::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Where a packet waits on its way through the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From decryption at ingress to the end of Sphinx unwrapping (queue wait + unwrap).
    ForwarderQueue,
    /// How late a held packet leaves compared to its due time.
    DelayOverrun,
    /// From release by the forwarder to being handed to the peer's socket.
    EgressQueue,
    /// Time to flush one batch to the peer's socket.
    SocketWrite,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::ForwarderQueue,
        Stage::DelayOverrun,
        Stage::EgressQueue,
        Stage::SocketWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::ForwarderQueue => "forwarder_queue",
            Stage::DelayOverrun => "delay_overrun",
            Stage::EgressQueue => "egress_queue",
            Stage::SocketWrite => "socket_write",
        }
    }
}

/// Why a Noise handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    UnknownKey,
    Protocol,
    Io,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::UnknownKey,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::UnknownKey => "unknown_key",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }
}

/// Why an ingress connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `NYM_NODE_MAX_INGRESS_CONNECTIONS` authenticated links are open already.
    Capacity,
    /// A connection past its first handshake message closed: its address group had
    /// `NYM_NODE_MAX_HANDSHAKES_PER_ADDRESS` newer ones in their handshake.
    PerAddress,
    /// A connection past its first handshake message, closed for a newcomer: every place
    /// (`NYM_NODE_MAX_PENDING_HANDSHAKES`) was held past the first message.
    Handshakes,
    /// A connection not yet past its first handshake message, closed to make room for a
    /// newer one.
    Evicted,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 4] = [
        RefusalReason::Capacity,
        RefusalReason::PerAddress,
        RefusalReason::Handshakes,
        RefusalReason::Evicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Capacity => "capacity",
            RefusalReason::PerAddress => "per_address",
            RefusalReason::Handshakes => "handshake_capacity",
            RefusalReason::Evicted => "evicted",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
const HELD_DELAY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Keeps a gauge exact whatever way a connection ends: +1 now, -1 on drop.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What became of a gateway registration (the `outcome` label of
/// `nym_node_gateway_registrations_total`).
pub const REGISTRATION_OUTCOMES: [&str; 3] = ["registered", "stamp_required", "expired"];

/// Why an exit refuses a stream (the `reason` label of `nym_node_exit_streams_refused_total`):
/// the exit policy's three, then the network requester's own.
pub const EXIT_REFUSAL_REASONS: [&str; 9] = [
    "policy_reject",
    "internal_address",
    "no_rule",
    "resolve_failed",
    "connect_failed",
    "too_many_streams",
    "capacity",
    "rate_limited",
    "too_many_clients",
];

/// Why the IP packet router refused a packet or a client (`nym_node_ipr_refused_total`).
pub const IPR_REFUSAL_REASONS: [&str; 12] = [
    "policy_reject",
    "internal_address",
    "no_rule",
    "spoofed_source",
    "rate_limited",
    "malformed",
    "no_lease",
    "unknown_destination",
    "queue_full",
    "too_large",
    "pool_full",
    "busy",
];

/// Every kind of node a topology document lists, as (mode, layer) labels: each keeps a
/// series in the node's and the operator's node counts, so a layer that empties reads 0.
pub const TOPOLOGY_NODE_KINDS: [(&str, &str); 5] = [
    ("mixnode", "1"),
    ("mixnode", "2"),
    ("mixnode", "3"),
    ("entry-gateway", ""),
    ("exit-gateway", ""),
];

/// Reads a value that lives elsewhere into a gauge, at scrape time.
pub type Sampler = Box<dyn Fn(&Metrics) + Send + Sync>;

/// All metrics of one node. Cheap to share: clone the `Arc`.
pub struct Metrics {
    registry: Registry,
    samplers: parking_lot::Mutex<Vec<Sampler>>,
    pub packets_received: IntCounter,
    pub packets_forwarded: IntCounter,
    pub packets_delivered: IntCounter,
    pub packets_released_early: IntCounter,
    drops: Vec<IntCounter>,
    pub delay_queue_packets: IntGauge,
    pub sphinx_key_epoch: IntGauge,
    pub sphinx_keys_retired: IntCounter,
    pub replay_journal_seconds: Histogram,
    pub replay_state_lost: IntCounter,
    pub replay_tags_recovered: IntCounter,
    pub replay_filter_bytes: IntGauge,
    pub replay_filter_fill: Gauge,
    pub sphinx_queue_packets: IntGauge,
    pub held_delay: Histogram,
    stages: Vec<Histogram>,
    pub active_ingress: IntGauge,
    pub active_egress: IntGauge,
    pub idle_closed_ingress: IntCounter,
    pub idle_closed_egress: IntCounter,
    pub write_timeouts: IntCounter,
    pub egress_reconnects: IntCounter,
    pub egress_connect_failures: IntCounter,
    handshake_failures: Vec<IntCounter>,
    refused: Vec<IntCounter>,
    client_refused: Vec<IntCounter>,
    pub topology_reloads_ok: IntCounter,
    pub topology_reloads_failed: IntCounter,
    pub topology_revision: IntGauge,
    pub topology_valid_until: IntGauge,
    pub topology_nodes: IntGaugeVec,
    pub topology_serving: IntGaugeVec,
    pub clients_connected: IntGauge,
    pub mailbox_payloads: IntGauge,
    pub client_messages_refused: IntCounter,
    pub client_dummy_frames: IntCounter,
    pub drop_cover_received: IntCounter,
    pub acks_sent: IntCounter,
    pub dns_cache_hits: IntCounter,
    pub dns_queries: IntCounter,
    pub dns_not_found: IntCounter,
    pub dns_timeouts: IntCounter,
    pub dns_errors: IntCounter,
    pub dns_evictions: IntCounter,
    pub exit_streams_open: IntGauge,
    pub exit_streams_opened: IntCounter,
    exit_streams_refused: IntCounterVec,
    registrations: IntCounterVec,
    pub registered_clients: IntGauge,
    pub exit_bytes_to_target: IntCounter,
    pub exit_bytes_from_target: IntCounter,
    pub exit_first_byte: Histogram,
    /// The IP packet router: clients holding addresses, and packets and bytes each way.
    pub ipr_clients: IntGauge,
    pub ipr_packets_to_internet: IntCounter,
    pub ipr_packets_to_clients: IntCounter,
    pub ipr_bytes_to_internet: IntCounter,
    pub ipr_bytes_to_clients: IntCounter,
    ipr_refused: IntCounterVec,
    pub tokio_workers: IntGauge,
    pub tokio_alive_tasks: IntGauge,
    pub tokio_global_queue_depth: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(format!("nym_node_{name}"), help).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(format!("nym_node_{name}"), help).expect("valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(format!("nym_node_{name}"), help), labels)
        .expect("valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(format!("nym_node_{name}"), help), labels)
        .expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(format!("nym_node_{name}"), help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Metrics {
    /// Builds the registry. `mode` labels the packet counters so one dashboard can show all kinds of nodes.
    pub fn new(mode: &str) -> Arc<Self> {
        let registry = Registry::new();
        let r = &registry;

        let by_mode = |name: &str, help: &str| {
            counter_vec(r, name, help, &["mode"]).with_label_values(&[mode])
        };
        let packets_received = by_mode(
            "packets_received_total",
            "Sphinx packets accepted from peers (after link decryption) and from clients.",
        );
        let packets_forwarded = by_mode(
            "packets_forwarded_total",
            "Sphinx packets handed to an egress peer's socket.",
        );
        let packets_delivered = by_mode(
            "packets_delivered_total",
            "Final-hop payloads handed to a client or queued for it.",
        );
        let drops_vec = counter_vec(
            r,
            "packets_dropped_total",
            "Packets dropped, by reason.",
            &["reason"],
        );
        let drops = DropReason::ALL
            .iter()
            .map(|reason| drops_vec.with_label_values(&[reason.as_str()]))
            .collect();
        let stage_vec = histogram_vec(
            r,
            "packet_stage_seconds",
            "Where packets wait: forwarder_queue (ingress decrypt to unwrapped), delay_overrun (release minus due time), egress_queue (release to socket), socket_write (one batch flush).",
            &["stage"],
            LATENCY_BUCKETS,
        );
        let stages = Stage::ALL
            .iter()
            .map(|s| stage_vec.with_label_values(&[s.as_str()]))
            .collect();
        let held = histogram_vec(
            r,
            "packet_held_delay_seconds",
            "Per-hop delay that packets asked this node to hold them for.",
            &[],
            HELD_DELAY_BUCKETS,
        );
        let handshake_vec = counter_vec(
            r,
            "network_handshake_failures_total",
            "Noise handshakes that failed, by reason.",
            &["direction", "reason"],
        );
        let handshake_failures = ["ingress", "egress"]
            .iter()
            .flat_map(|dir| {
                HandshakeFailure::ALL
                    .iter()
                    .map(|reason| handshake_vec.with_label_values(&[*dir, reason.as_str()]))
                    .collect::<Vec<_>>()
            })
            .collect();
        let client_refused = counter_vec(
            r,
            "gateway_client_connections_refused_total",
            "Client API connections closed or refused before they authenticated, by reason: evicted (no valid first handshake message yet; made room for a newer connection), per_address (its address group had too many past their first message), handshake_capacity (past its first message; closed for a newcomer when every place was).",
            &["reason"],
        );
        let refused = counter_vec(
            r,
            "network_refused_ingress_mixnet_connections_total",
            "Ingress mixnet connections refused or closed before they became links, by reason: evicted (not yet past its first handshake message; made room for a newer connection), per_address (its address group had too many past their first message), handshake_capacity (past its first message; closed for a newcomer when every place was), capacity (links full after the handshake).",
            &["reason"],
        );
        let reloads = counter_vec(
            r,
            "topology_reloads_total",
            "Topology reload attempts, by result (a failed reload keeps the last good document).",
            &["result"],
        );

        let build_info = IntGaugeVec::new(
            Opts::new("nym_node_build_info", "Build of this node; always 1."),
            &["version", "commit"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(build_info.clone()))
            .expect("metric registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::BUILD_COMMIT])
            .set(1);
        // The standard process metrics, under our prefix (nym_node_process_cpu_seconds_total, ...).
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "nym_node",
            ),
        ));
        let dns_failures = counter_vec(
            r,
            "dns_failures_total",
            "Failed peer name lookups, by reason (not_found, timeout, error).",
            &["reason"],
        );

        let exit_bytes = counter_vec(
            r,
            "exit_stream_bytes_total",
            "Bytes the exit's network requester relayed, by direction (to_target: from clients to the internet; from_target: back).",
            &["direction"],
        );
        let exit_first_byte = histogram_vec(
            r,
            "exit_time_to_first_byte_seconds",
            "From a stream's open request reaching the exit to the target's first byte.",
            &[],
            &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        );

        let exit_streams_refused = counter_vec(
            r,
            "exit_streams_refused_total",
            "Stream open requests the exit refused (or, past its bound on pending refusals, dropped), by reason (policy_reject, internal_address, no_rule, resolve_failed, connect_failed, too_many_streams, capacity, rate_limited: a tag opening too fast, too_many_clients: every tracked tag has streams open).",
            &["reason"],
        );
        // Every reason exported from the start, at 0, so rates and alerts see a series.
        for reason in EXIT_REFUSAL_REASONS {
            exit_streams_refused.with_label_values(&[reason]);
        }

        let ipr_packets = counter_vec(
            r,
            "ipr_packets_total",
            "IP packets the exit's IP packet router passed on, by direction (to_internet: from clients out of the node's uplink; to_clients: answers back through the mixnet).",
            &["direction"],
        );
        let ipr_bytes = counter_vec(
            r,
            "ipr_bytes_total",
            "Bytes of IP packets the exit's IP packet router passed on, by direction (to_internet, to_clients).",
            &["direction"],
        );
        let ipr_refused = counter_vec(
            r,
            "ipr_refused_total",
            "Packets and connects the IP packet router refused, by reason: policy_reject, internal_address, no_rule (the exit policy), spoofed_source (a source that is not the client's address), rate_limited (over the client's packet or byte rate), malformed, no_lease (data from a client holding no addresses), unknown_destination (an answer for an address nobody holds), queue_full (a client's answers waiting beyond their bound), too_large (a packet over the tunnel MTU), pool_full and busy (connects).",
            &["reason"],
        );
        for reason in IPR_REFUSAL_REASONS {
            ipr_refused.with_label_values(&[reason]);
        }

        let registrations = counter_vec(
            r,
            "gateway_registrations_total",
            "Client registrations at this gateway, by outcome: registered (a new client paid its stamp), stamp_required (a client new here came without a valid stamp and was told the bits), expired (lapsed after NYM_NODE_REGISTRATION_EXPIRY without a session).",
            &["outcome"],
        );
        for outcome in REGISTRATION_OUTCOMES {
            registrations.with_label_values(&[outcome]);
        }

        let metrics = Arc::new(Metrics {
            exit_streams_open: gauge(
                r,
                "exit_streams_open",
                "Streams the exit's network requester has open to targets.",
            ),
            exit_streams_opened: counter(
                r,
                "exit_streams_opened_total",
                "Streams the exit's network requester opened to targets.",
            ),
            exit_streams_refused,
            registrations,
            registered_clients: gauge(
                r,
                "gateway_registered_clients",
                "Clients registered at this gateway (their payloads are out of the unregistered budget).",
            ),
            exit_bytes_to_target: exit_bytes.with_label_values(&["to_target"]),
            exit_bytes_from_target: exit_bytes.with_label_values(&["from_target"]),
            exit_first_byte: exit_first_byte.with_label_values(&[] as &[&str]),
            ipr_clients: gauge(
                r,
                "ipr_clients",
                "Clients of the exit's IP packet router holding addresses.",
            ),
            ipr_packets_to_internet: ipr_packets.with_label_values(&["to_internet"]),
            ipr_packets_to_clients: ipr_packets.with_label_values(&["to_clients"]),
            ipr_bytes_to_internet: ipr_bytes.with_label_values(&["to_internet"]),
            ipr_bytes_to_clients: ipr_bytes.with_label_values(&["to_clients"]),
            ipr_refused,
            packets_received,
            packets_forwarded,
            packets_delivered,
            packets_released_early: counter(
                r,
                "packets_released_early_total",
                "Held packets released before their due time because the node was shutting down.",
            ),
            drops,
            delay_queue_packets: gauge(
                r,
                "delay_queue_packets",
                "Packets currently held in the delay queue.",
            ),
            sphinx_key_epoch: gauge(
                r,
                "sphinx_key_epoch",
                "The Sphinx key epoch this node is in (unix time / NYM_NODE_KEY_ROTATION_INTERVAL).",
            ),
            sphinx_keys_retired: counter(
                r,
                "sphinx_keys_retired_total",
                "Sphinx keys whose secrets were erased, with their replay state, after their epoch and overlap ended.",
            ),
            replay_journal_seconds: histogram_vec(
                r,
                "replay_journal_seconds",
                "Time to write one batch of replay tags to the journal (and flush it to stable storage, with NYM_NODE_REPLAY_JOURNAL_SYNC) before the batch's packets go on.",
                &[],
                LATENCY_BUCKETS,
            )
            .with_label_values(&[] as &[&str]),
            replay_state_lost: counter(
                r,
                "replay_state_lost_total",
                "Sphinx keys found at start without their replay state: replaced by fresh keys (or dropped, if their epoch was over) rather than used without it.",
            ),
            replay_tags_recovered: counter(
                r,
                "replay_tags_recovered_total",
                "Replay tags read back from the journals at start: what the last snapshot before an unclean stop did not hold.",
            ),
            replay_filter_bytes: gauge(
                r,
                "replay_filter_bytes",
                "Bytes of the replay filters of all live Sphinx keys.",
            ),
            replay_filter_fill: {
                let g = Gauge::new(
                    "nym_node_replay_filter_fill_ratio",
                    "Packets recorded in the current epoch's replay filter, as a fraction of the packets one filter stage is sized for (above 1 the filter has grown a stage).",
                )
                .expect("valid metric definition");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            sphinx_queue_packets: gauge(
                r,
                "sphinx_queue_packets",
                "Packets waiting for a Sphinx worker (sampled by the workers); near NYM_NODE_SPHINX_QUEUE means overload shedding.",
            ),
            held_delay: held.with_label_values(&[] as &[&str]),
            stages,
            active_ingress: gauge(
                r,
                "network_active_ingress_mixnet_connections",
                "Open ingress mixnet connections (after the handshake).",
            ),
            active_egress: gauge(
                r,
                "network_active_egress_mixnet_connections",
                "Open egress mixnet connections (after the handshake).",
            ),
            idle_closed_ingress: counter(
                r,
                "network_idle_closed_ingress_mixnet_connections_total",
                "Ingress mixnet connections closed for having no traffic for the idle timeout.",
            ),
            idle_closed_egress: counter(
                r,
                "network_idle_closed_egress_mixnet_connections_total",
                "Egress mixnet connections closed for having no traffic for the idle timeout.",
            ),
            write_timeouts: counter(
                r,
                "network_egress_write_timeouts_total",
                "Egress batch flushes that exceeded the write timeout.",
            ),
            egress_reconnects: counter(
                r,
                "network_egress_reconnects_total",
                "Egress connections re-established to a peer after a previous connection closed or failed.",
            ),
            egress_connect_failures: counter(
                r,
                "network_egress_connect_failures_total",
                "Attempts to connect to a peer (TCP connect and Noise handshake) that failed; each starts or extends that peer's backoff, its packets held meanwhile.",
            ),
            handshake_failures,
            refused: RefusalReason::ALL
                .iter()
                .map(|r| refused.with_label_values(&[r.as_str()]))
                .collect(),
            // (capacity stays 0 here: an authenticated session holds no slot.)
            client_refused: RefusalReason::ALL
                .iter()
                .map(|r| client_refused.with_label_values(&[r.as_str()]))
                .collect(),
            topology_reloads_ok: reloads.with_label_values(&["ok"]),
            topology_reloads_failed: reloads.with_label_values(&["error"]),
            topology_revision: gauge(
                r,
                "topology_revision",
                "Revision of the topology document this node routes by (the directory's is nym_operator_topology_revision).",
            ),
            topology_valid_until: gauge(
                r,
                "topology_valid_until_timestamp_seconds",
                "When the topology document this node routes by expires (unix seconds). Past it the node still routes on it, the last good one, until its directory signs a newer revision.",
            ),
            topology_nodes: gauge_vec(
                r,
                "topology_nodes",
                "Nodes in the current topology document, by mode, mix layer (empty for gateways) and serving; every mix layer is listed, at 0 when empty.",
                &["mode", "layer", "serving"],
            ),
            topology_serving: gauge_vec(
                r,
                "topology_serving",
                "1 while the current topology document lists this node as serving, labelled with the mode and layer it gives the node (0 while listed as not serving or absent).",
                &["mode", "layer"],
            ),
            clients_connected: gauge(
                r,
                "gateway_clients_connected",
                "Clients with an authenticated session on this gateway.",
            ),
            mailbox_payloads: gauge(
                r,
                "gateway_mailbox_payloads",
                "Final-hop payloads stored in the mailbox, waiting for their client's acknowledgement.",
            ),
            client_messages_refused: counter(
                r,
                "gateway_client_messages_refused_total",
                "Client API connections closed for a bad message or failed authentication.",
            ),
            client_dummy_frames: counter(
                r,
                "gateway_client_dummy_frames_total",
                "Dummy frames sent to paced client sessions: downstream slots with nothing stored to fill them (the cost of constant-rate downstream).",
            ),
            drop_cover_received: counter(
                r,
                "gateway_drop_cover_total",
                "Drop cover packets that ended here: discarded unread, unstored and unacknowledged.",
            ),
            acks_sent: counter(
                r,
                "gateway_acks_sent_total",
                "SURB-ACKs sent back into the mixnet for payloads delivered here.",
            ),
            dns_cache_hits: counter(
                r,
                "dns_cache_hits_total",
                "Peer name lookups answered from the cache.",
            ),
            dns_queries: counter(
                r,
                "dns_queries_total",
                "Peer name lookups sent to a name server.",
            ),
            dns_not_found: dns_failures.with_label_values(&["not_found"]),
            dns_timeouts: dns_failures.with_label_values(&["timeout"]),
            dns_errors: dns_failures.with_label_values(&["error"]),
            dns_evictions: counter(
                r,
                "dns_evictions_total",
                "Cached answers dropped early: a peer's after a hard connection failure, or the one expiring soonest when a cache is full (10,000 answers for peers, 4,096 for the exit's stream targets).",
            ),
            tokio_workers: gauge(r, "tokio_workers", "Worker threads of the async runtime."),
            tokio_alive_tasks: gauge(r, "tokio_alive_tasks", "Tasks alive in the async runtime."),
            tokio_global_queue_depth: gauge(
                r,
                "tokio_global_queue_depth",
                "Tasks waiting in the runtime's global queue.",
            ),
            registry,
            samplers: parking_lot::Mutex::new(Vec::new()),
        });
        // Every series exists from the start (README's table and dashboards list them);
        // the samplers overwrite them once a document is loaded.
        metrics.clear_topology_nodes();
        metrics.topology_serving.with_label_values(&[mode, ""]);
        metrics
    }

    /// Adds a sampler run before every scrape (for gauges whose truth lives elsewhere,
    /// like the mailbox's size: sampling it beats keeping two counters in step).
    pub fn add_sampler(&self, sampler: Sampler) {
        self.samplers.lock().push(sampler);
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets every kind of node of `nym_node_topology_nodes` to 0: each mix layer and each
    /// gateway mode keeps a series, so a layer that empties reads 0 rather than vanishing.
    pub fn clear_topology_nodes(&self) {
        self.topology_nodes.reset();
        for (mode, layer) in TOPOLOGY_NODE_KINDS {
            for serving in ["true", "false"] {
                self.topology_nodes
                    .with_label_values(&[mode, layer, serving]);
            }
        }
    }

    /// A stream open request the exit refused (`reason` is one of a fixed few).
    pub fn exit_refused(&self, reason: &str) {
        debug_assert!(
            EXIT_REFUSAL_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        self.exit_streams_refused.with_label_values(&[reason]).inc();
    }

    /// A registration outcome (one of [`REGISTRATION_OUTCOMES`]).
    pub fn registration(&self, outcome: &str) {
        self.registrations_n(outcome, 1);
    }

    pub fn registrations_n(&self, outcome: &str, n: u64) {
        debug_assert!(
            REGISTRATION_OUTCOMES.contains(&outcome),
            "unknown outcome {outcome}"
        );
        self.registrations.with_label_values(&[outcome]).inc_by(n);
    }

    pub fn registration_count(&self, outcome: &str) -> u64 {
        self.registrations.with_label_values(&[outcome]).get()
    }

    /// A packet or connect the IP packet router refused (one of [`IPR_REFUSAL_REASONS`]).
    pub fn ipr_refused(&self, reason: &str) {
        debug_assert!(
            IPR_REFUSAL_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        self.ipr_refused.with_label_values(&[reason]).inc();
    }

    pub fn exit_refused_count(&self, reason: &str) -> u64 {
        self.exit_streams_refused.with_label_values(&[reason]).get()
    }

    pub fn dropped(&self, reason: DropReason) {
        self.drops[reason.index()].inc();
    }

    pub fn dropped_n(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].inc_by(n);
    }

    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].get()
    }

    pub fn stage(&self, stage: Stage) -> &Histogram {
        &self.stages[Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0)]
    }

    /// Index of a (direction, reason) series: ingress reasons first, then egress.
    fn handshake_slot(ingress: bool, reason: HandshakeFailure) -> usize {
        let dir = if ingress {
            0
        } else {
            HandshakeFailure::ALL.len()
        };
        dir + HandshakeFailure::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)
    }

    pub fn handshake_failed(&self, ingress: bool, reason: HandshakeFailure) {
        self.handshake_failures[Self::handshake_slot(ingress, reason)].inc();
    }

    pub fn handshake_failures(&self, ingress: bool, reason: HandshakeFailure) -> u64 {
        self.handshake_failures[Self::handshake_slot(ingress, reason)].get()
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refused[reason.index()].inc();
    }

    /// A client API connection closed or refused before it authenticated.
    pub fn client_connection_refused(&self, reason: RefusalReason) {
        self.client_refused[reason.index()].inc();
    }

    pub fn client_connection_refused_count(&self, reason: RefusalReason) -> u64 {
        self.client_refused[reason.index()].get()
    }

    pub fn refused_count(&self, reason: RefusalReason) -> u64 {
        self.refused[reason.index()].get()
    }

    /// Samples the async runtime's gauges and runs the samplers; called at scrape time.
    pub fn sample(&self) {
        for s in self.samplers.lock().iter() {
            s(self);
        }
        self.sample_runtime();
    }

    fn sample_runtime(&self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let m = handle.metrics();
            self.tokio_workers.set(m.num_workers() as i64);
            self.tokio_alive_tasks.set(m.num_alive_tasks() as i64);
            self.tokio_global_queue_depth
                .set(m.global_queue_depth() as i64);
        }
    }

    /// Every metric family: (name, type, labels, help), sorted by name. Feeds README's table.
    pub fn describe(&self) -> Vec<(String, String, Vec<String>, String)> {
        let mut out: Vec<_> = self
            .registry
            .gather()
            .into_iter()
            .map(|mf| {
                let kind = format!("{:?}", mf.get_field_type()).to_lowercase();
                let mut labels: Vec<String> = mf
                    .get_metric()
                    .iter()
                    .flat_map(|m| m.get_label().iter().map(|l| l.name().to_string()))
                    .collect();
                labels.sort();
                labels.dedup();
                (mf.name().to_string(), kind, labels, mf.help().to_string())
            })
            .collect();
        out.sort();
        out
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.sample();
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Markdown table of every metric, as README.md carries it.
pub fn metrics_markdown() -> String {
    let mut out = String::from("| Metric | Type | Labels | Meaning |\n|---|---|---|---|\n");
    for (name, kind, labels, help) in Metrics::new("mixnode").describe() {
        let labels = if labels.is_empty() {
            "—".to_string()
        } else {
            labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!("| `{name}` | {kind} | {labels} | {help} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_drop_reason_has_its_own_series() {
        let m = Metrics::new("mixnode");
        m.dropped(DropReason::Replay);
        m.dropped_n(DropReason::Overload, 3);
        assert_eq!(m.drop_count(DropReason::Replay), 1);
        assert_eq!(m.drop_count(DropReason::Overload), 3);
        assert_eq!(m.drop_count(DropReason::QueueFull), 0);
        let text = m.render();
        assert!(
            text.contains(r#"nym_node_packets_dropped_total{reason="overload"} 3"#),
            "{text}"
        );
        assert!(text.contains("nym_node_build_info{"));
    }

    #[test]
    fn drop_reason_labels_are_unique() {
        let mut labels: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
