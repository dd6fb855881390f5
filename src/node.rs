//! A running node: binds its listeners, wires the pipeline together in data-flow order,
//! and, when stopped, lets it empty in the same order (see `shutdown.rs`).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::Admission;
use crate::config::{Config, Mode};
use crate::dns::{DnsSettings, Resolver};
use crate::exit::ip_router::{self, IpPacketRouter, Plumbing};
use crate::exit::network_requester::{self, Exit, NetworkRequester};
use crate::exit::own_addresses::{self, OwnAddresses};
use crate::exit::policy::ExitPolicy;
use crate::exit::service::Loopback;
use crate::gateway::{
    self, client_api::ClientApi, delivery::Delivery, mailbox::Mailbox, sessions::Sessions,
};
use crate::health::Health;
use crate::http::{self, HttpState, description::Description};
use crate::keys::{KeyBytes, NodeKeys, PublicKeys, unix_ms};
use crate::metrics::{DropReason, Metrics};
use crate::mixnet::egress::{Egress, EgressContext, EgressSettings};
use crate::mixnet::epochs::{self, KeyRing};
use crate::mixnet::forward::Forwarder;
use crate::mixnet::ingress::{self, IngressContext, IngressSettings};
use crate::mixnet::intake::{Downstream, ForwardItem, Intake};
use crate::mixnet::sphinx::{FinalHop, SphinxProcessor};
use crate::shutdown::Shutdown;
use crate::topology::{self, PeerAddress, TopologyHandle, TopologySource};

/// Once ingress has stopped, how long the rest of the pipeline may take to empty.
const FLUSH_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting Sphinx workers: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error(transparent)]
    Mailbox(#[from] crate::gateway::mailbox::MailboxError),
    #[error(transparent)]
    ExitPolicy(#[from] crate::exit::policy::LoadError),
    #[error(transparent)]
    Router(#[from] crate::exit::ip_router::RouterError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("Sphinx keys: {0}")]
    Epochs(#[from] crate::mixnet::epochs::EpochError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The node's sockets, bound before anything else so a port clash fails fast.
pub struct Listeners {
    pub mixnet: TcpListener,
    pub http: TcpListener,
    /// Gateways only.
    pub client: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, NodeError> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind { what, addr, source })
        };
        Ok(Listeners {
            mixnet: bind("the mixnet listener", config.mixnet_bind).await?,
            http: bind("the HTTP listener", config.http_bind).await?,
            client: if config.mode.is_gateway() {
                Some(bind("the client API listener", config.client_bind).await?)
            } else {
                None
            },
        })
    }
}

/// Knobs for tests only (read from `NYM_TESTHOOK_*`; never set them in production).
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Extra time spent per unwrap, to make a node slower than its peers.
    pub slow_unwrap: Option<Duration>,
    /// Lose every n-th packet this node forwards, as a lossy link would.
    pub lose_every: Option<u64>,
    /// Gateways: the mailbox writer takes nothing for this long, as a stalled disk would
    /// (in-process tests only; no variable sets it).
    pub stall_delivery: Option<Duration>,
}

impl TestHooks {
    /// The hooks the environment asks for. Only a build with the `test-hooks` feature reads
    /// them: release builds and the image ignore `NYM_TESTHOOK_*`, so no setting can make a
    /// production node drop packets on purpose.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        if !cfg!(feature = "test-hooks") {
            if var("NYM_TESTHOOK_LOSE_EVERY").is_some()
                || var("NYM_TESTHOOK_SLOW_UNWRAP_US").is_some()
            {
                tracing::warn!("NYM_TESTHOOK_* ignored: this build has no test hooks");
            }
            return TestHooks::default();
        }
        let num = |name: &str| var(name).and_then(|v| v.parse::<u64>().ok());
        let hooks = TestHooks {
            slow_unwrap: num("NYM_TESTHOOK_SLOW_UNWRAP_US").map(Duration::from_micros),
            lose_every: num("NYM_TESTHOOK_LOSE_EVERY"),
            stall_delivery: None,
        };
        if hooks.slow_unwrap.is_some() || hooks.lose_every.is_some() {
            tracing::warn!(?hooks, "TEST HOOKS ACTIVE: this node misbehaves on purpose");
        }
        hooks
    }
}

/// A started node.
pub struct RunningNode {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Shutdown,
    pub topology: TopologyHandle,
    pub mixnet_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub client_addr: Option<SocketAddr>,
    accept_loop: tokio::task::AbortHandle,
    task: JoinHandle<()>,
}

impl RunningNode {
    /// Waits until the node has stopped and emptied its pipeline.
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Test hook: kills the mixnet accept loop, as a bug or a panic would.
    #[doc(hidden)]
    pub fn kill_accept_loop(&self) {
        self.accept_loop.abort();
    }

    /// Drains for `grace`, then stops and waits.
    pub async fn drain_and_wait(self, grace: Duration) {
        self.shutdown.drain_for(grace).await;
        self.wait().await;
    }
}

/// Answers the peers' resolver caches (far more than any topology has names).
const PEER_DNS_CACHE_ENTRIES: usize = 10_000;
/// Answers the exit's resolver caches for clients' stream targets.
const EXIT_DNS_CACHE_ENTRIES: usize = 4_096;

/// The exit policy, with the node's own addresses it keeps closed: those the listeners are
/// bound to (returned too, they stay) and the interfaces' now; `own_addresses::keep_current`
/// adds what the directory publishes and follows changes.
async fn load_exit_policy(
    config: &Config,
    listeners: [Option<SocketAddr>; 3],
) -> Result<(ExitPolicy, OwnAddresses, HashSet<IpAddr>), NodeError> {
    let listening: HashSet<IpAddr> = listeners
        .into_iter()
        .flatten()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let mut now = listening.clone();
    now.extend(own_addresses::interface_addresses());
    let own = OwnAddresses::from(now);
    let policy = crate::exit::policy::load(&config.exit_policy, own.clone()).await?;
    Ok((policy, own, listening))
}

/// What an exit needs before anything starts: a bad policy is a start-up error, not a
/// silent open exit, and a router that cannot have its device, forwarding and NAT stops the
/// start, saying why.
async fn prepare_exit(
    config: &Config,
    bound: &Bound,
) -> Result<
    (
        Option<(ExitPolicy, OwnAddresses, HashSet<IpAddr>)>,
        Option<Plumbing>,
    ),
    NodeError,
> {
    if config.mode != Mode::ExitGateway {
        return Ok((None, None));
    }
    let listeners = [Some(bound.mixnet), Some(bound.http), bound.client];
    let policy = load_exit_policy(config, listeners).await?;
    let router = match config.ipr_enabled {
        true => Some(Plumbing::set_up(&router_settings(config)).await?),
        false => None,
    };
    Ok((Some(policy), router))
}

/// The handles every part of the node is wired with.
struct Core {
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    topology: TopologyHandle,
    health: Arc<Health>,
    ring: Arc<KeyRing>,
    /// Cancelled once the pipeline has drained: what outlives it (keys, topology, HTTP).
    background: CancellationToken,
}

/// The addresses the listeners ended up on (a port of 0 picks one).
struct Bound {
    mixnet: SocketAddr,
    http: SocketAddr,
    client: Option<SocketAddr>,
}

impl Bound {
    fn of(config: &Config, listeners: &Listeners) -> Result<Self, NodeError> {
        let bound = |what: &'static str, listener: &TcpListener, addr: SocketAddr| {
            listener
                .local_addr()
                .map_err(|source| NodeError::Bind { what, addr, source })
        };
        Ok(Bound {
            mixnet: bound("the mixnet listener", &listeners.mixnet, config.mixnet_bind)?,
            http: bound("the HTTP listener", &listeners.http, config.http_bind)?,
            client: listeners.client.as_ref().and_then(|l| l.local_addr().ok()),
        })
    }
}

/// Tasks that run until [`Core::background`] is cancelled.
struct Background {
    key_epochs: JoinHandle<()>,
    refresh: JoinHandle<()>,
    own_addresses: Option<JoinHandle<()>>,
}

/// The mixnet pipeline, in data-flow order: ingress → Sphinx workers → forwarder → egress.
struct Pipeline {
    ingress: JoinHandle<()>,
    connections: TaskTracker,
    workers: Vec<std::thread::JoinHandle<()>>,
    forwarder: JoinHandle<()>,
    links: TaskTracker,
    /// For gateways' own producers (client sessions, SURB-ACKs); dropped once they have theirs.
    forward: mpsc::Sender<ForwardItem>,
    /// Gateways: what the workers unwrapped for a client of this gateway.
    deliver: Option<mpsc::Receiver<FinalHop>>,
}

/// Starts every part of the node. It runs until `RunningNode::shutdown` is stopped.
pub async fn start(
    config: Config,
    mut keys: NodeKeys,
    listeners: Listeners,
    hooks: TestHooks,
) -> Result<RunningNode, NodeError> {
    let bound = Bound::of(&config, &listeners)?;
    let (exit_policy, router) = prepare_exit(&config, &bound).await?;
    // The key ring takes the Sphinx secrets: no copy outlives their erasure.
    let core = open_core(&config, &keys.identity, keys.sphinx.take())?;
    let signer = config.topology_signer()?;
    let (dns, resolver) = peer_resolver(&config, &core)?;
    let background = start_background(
        &config,
        &keys,
        &core,
        signer,
        exit_policy.as_ref(),
        resolver.clone(),
    );
    let mut pipeline = start_pipeline(&config, &keys, &core, resolver, &hooks, listeners.mixnet)?;
    let accept_loop = pipeline.ingress.abort_handle();
    let gateway_tasks = match (pipeline.deliver.take(), listeners.client) {
        (Some(deliver), Some(client_listener)) => {
            let gateway = GatewayParts {
                deliver,
                client_listener,
                forward: pipeline.forward.clone(),
                exit: exit_policy.map(|(policy, ..)| (policy, dns, signer)),
                router,
                client_addr: bound.client,
            };
            start_gateway(&config, &keys, &core, &hooks, gateway)?
        }
        _ => Vec::new(),
    };
    let http = start_http(&config, &keys, &core, listeners.http, &bound);
    core.health.set_listeners_bound();
    tracing::info!(
        mode = %config.mode,
        identity = %keys.identity.public(),
        mixnet = %bound.mixnet,
        http = %bound.http,
        client = ?bound.client,
        "node started"
    );
    let Core {
        metrics,
        shutdown,
        topology,
        health,
        ..
    } = &core;
    let running = RunningNode {
        metrics: metrics.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
        topology: topology.clone(),
        mixnet_addr: bound.mixnet,
        http_addr: bound.http,
        client_addr: bound.client,
        accept_loop,
        task: tokio::spawn(run_until_stopped(
            core,
            pipeline,
            gateway_tasks,
            background,
            http,
        )),
    };
    Ok(running)
}

/// Metrics, health, the topology handle and the key ring. The ring opens before anything
/// can receive: its replay filters must be loaded first.
fn open_core(
    config: &Config,
    identity: &crate::keys::Identity,
    sphinx: crate::keys::SphinxKeys,
) -> Result<Core, NodeError> {
    let metrics = Metrics::new(config.mode.as_str());
    let shutdown = Shutdown::new();
    let topology = TopologyHandle::new();
    let health = Health::new(topology.clone(), shutdown.clone());
    health.set_keys_loaded();
    let (ring, opened) = KeyRing::open(config.epoch_settings(), sphinx, unix_ms())?;
    let ring = Arc::new(ring);
    metrics
        .replay_state_lost
        .inc_by(opened.filters_lost.len() as u64);
    metrics.replay_tags_recovered.inc_by(opened.tags_recovered);
    if !opened.filters_lost.is_empty() {
        tracing::error!(epochs = ?opened.filters_lost, "Sphinx keys without their replay state were replaced by fresh keys (or dropped, past their epoch): packets built for the old keys are refused until clients have the new ones");
    }
    if opened.tags_recovered > 0 {
        tracing::warn!(
            tags = opened.tags_recovered,
            "the node did not stop cleanly: replay tags recovered from the journal"
        );
    }
    tracing::info!(epochs = ?opened.added, "Sphinx keys live");
    {
        let ring = ring.clone();
        metrics.add_sampler(Box::new(move |m| epochs::sample(&ring, m)));
    }
    {
        let (handle, me, mode) = (topology.clone(), identity.public(), config.mode);
        metrics.add_sampler(Box::new(move |m| topology::sample(&handle, &me, mode, m)));
    }
    Ok(Core {
        metrics,
        shutdown,
        topology,
        health,
        ring,
        background: CancellationToken::new(),
    })
}

/// The resolver for peers' host names, and the settings an exit's own resolver copies.
fn peer_resolver(config: &Config, core: &Core) -> Result<(DnsSettings, Arc<Resolver>), NodeError> {
    let dns = DnsSettings {
        servers: config.dns_servers.0.clone(),
        max_ttl: config.dns_max_ttl.get(),
        negative_ttl: config.dns_negative_ttl.get(),
        timeout: config.dns_timeout.get(),
        max_entries: PEER_DNS_CACHE_ENTRIES,
    };
    let resolver = Resolver::new(dns.clone(), core.metrics.clone())?;
    Ok((dns, resolver))
}

/// Key rotation, topology refresh and (exits) the watch on the node's own addresses.
fn start_background(
    config: &Config,
    keys: &NodeKeys,
    core: &Core,
    signer: Option<KeyBytes>,
    exit_policy: Option<&(ExitPolicy, OwnAddresses, HashSet<IpAddr>)>,
    resolver: Arc<Resolver>,
) -> Background {
    let key_epochs = tokio::spawn(epochs::run(
        core.ring.clone(),
        config.replay_filter_save_interval.get(),
        core.metrics.clone(),
        core.background.clone(),
    ));
    if signer.is_none() {
        tracing::warn!(
            "NYM_NODE_TOPOLOGY_SIGNER is not set: topology documents are not authenticated"
        );
    }
    let refresh = tokio::spawn(topology::refresh_loop(
        TopologySource::parse(&config.topology)
            .signed_by(signer)
            .remembered_in(Some(config.data_dir.join("topology.json"))),
        core.topology.clone(),
        config.topology_refresh.get(),
        Some(core.metrics.clone()),
        core.background.clone(),
    ));
    let own_addresses = exit_policy.map(|(_, own, listening)| {
        tokio::spawn(own_addresses::keep_current(
            own.clone(),
            listening.clone(),
            core.topology.clone(),
            keys.identity.public(),
            resolver,
            core.background.clone(),
        ))
    });
    Background {
        key_epochs,
        refresh,
        own_addresses,
    }
}

/// Downstream first (egress and the forwarder), then the Sphinx workers feeding it, then
/// ingress feeding them.
fn start_pipeline(
    config: &Config,
    keys: &NodeKeys,
    core: &Core,
    resolver: Arc<Resolver>,
    hooks: &TestHooks,
    mixnet: TcpListener,
) -> Result<Pipeline, NodeError> {
    let links = TaskTracker::new();
    let egress = Egress::new(Arc::new(EgressContext {
        settings: EgressSettings {
            queue: config.egress_queue,
            idle_timeout: config.idle_timeout(),
            write_timeout: config.write_timeout(),
            connect_timeout: config.connect_timeout.get(),
            handshake_timeout: config.handshake_timeout.get(),
            backoff_initial: config.reconnect_backoff_initial.get(),
            backoff_max: config.reconnect_backoff_max.get(),
        },
        topology: core.topology.clone(),
        noise_secret: keys.noise.secret_bytes(),
        resolver,
        metrics: core.metrics.clone(),
        tracker: links.clone(),
    }));
    let (forward, forward_rx) = mpsc::channel(config.forwarder_queue);
    let forwarder = tokio::spawn(
        Forwarder::new(
            forward_rx,
            egress,
            core.metrics.clone(),
            core.health.clone(),
            config.delay_queue_capacity,
            hooks.lose_every,
        )
        .run(),
    );
    let (deliver_tx, deliver) = match config.mode.is_gateway() {
        true => {
            let (tx, rx) = mpsc::channel(config.delivery_queue);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let processor = Arc::new(SphinxProcessor::new(
        core.ring.clone(),
        config.max_packet_delay.get(),
    ));
    let (intake, workers) = Intake::start(
        processor,
        config.sphinx_worker_count(),
        config.sphinx_queue,
        config.sphinx_queue_per_connection,
        Downstream {
            forward: forward.clone(),
            deliver: deliver_tx,
        },
        core.metrics.clone(),
        hooks.slow_unwrap,
    )
    .map_err(NodeError::Workers)?;
    let connections = TaskTracker::new();
    let ingress = tokio::spawn(ingress::run(
        mixnet,
        Arc::new(IngressContext {
            settings: ingress_settings(config),
            noise_secret: keys.noise.secret_bytes(),
            topology: core.topology.clone(),
            intake,
            metrics: core.metrics.clone(),
            health: core.health.clone(),
        }),
        core.shutdown.stopping_token(),
        connections.clone(),
    ));
    Ok(Pipeline {
        ingress,
        connections,
        workers,
        forwarder,
        links,
        forward,
        deliver,
    })
}

fn ingress_settings(config: &Config) -> IngressSettings {
    IngressSettings {
        handshake_timeout: config.handshake_timeout.get(),
        first_message_timeout: config.handshake_first_message_timeout.get(),
        idle_timeout: config.idle_timeout(),
        frame_read_timeout: config.frame_read_timeout.get(),
        max_connections: config.max_ingress_connections,
        max_handshakes_per_address: config.max_handshakes_per_address,
        max_pending_handshakes: config.max_pending_handshakes,
        max_links_per_peer: config.max_links_per_peer,
    }
}

/// What a gateway's duties are started from.
struct GatewayParts {
    deliver: mpsc::Receiver<FinalHop>,
    client_listener: TcpListener,
    forward: mpsc::Sender<ForwardItem>,
    /// Exit gateways: the policy, resolver settings to copy and the directory key.
    exit: Option<(ExitPolicy, DnsSettings, Option<KeyBytes>)>,
    /// Exit gateways running the IP packet router: its device and NAT table, set up.
    router: Option<Plumbing>,
    client_addr: Option<SocketAddr>,
}

/// The mailbox, final-hop delivery, the client API, the mailbox's sweep and (exits) the
/// network requester. Returns their tasks.
fn start_gateway(
    config: &Config,
    keys: &NodeKeys,
    core: &Core,
    hooks: &TestHooks,
    parts: GatewayParts,
) -> Result<Vec<JoinHandle<()>>, NodeError> {
    let mailbox = open_mailbox(config, &core.metrics)?;
    let sessions = Sessions::new(core.metrics.clients_connected.clone());
    let mut tasks = vec![tokio::spawn(
        Delivery {
            rx: parts.deliver,
            forward: parts.forward.clone(),
            mailbox: mailbox.clone(),
            sessions: sessions.clone(),
            metrics: core.metrics.clone(),
            stall: hooks.stall_delivery,
        }
        .run(),
    )];
    let requester_identity = network_requester::identity(&keys.identity);
    let router_identity = ip_router::identity(&keys.identity);
    let api = Arc::new(ClientApi {
        identity: keys.identity.public(),
        noise_secret: keys.noise.secret_bytes(),
        stamp_bits: config.registration_stamp_bits.0,
        exempt: match parts.exit {
            Some(_) => vec![requester_identity.public(), router_identity.public()],
            None => Vec::new(),
        },
        forward: parts.forward,
        mailbox: mailbox.clone(),
        sessions,
        metrics: core.metrics.clone(),
        shutdown: core.shutdown.clone(),
        rate: config.client_rate,
        burst: config.client_burst,
        downstream_max_rate: config.client_downstream_max_rate,
        admission: {
            let m = core.metrics.clone();
            Admission::new(
                config.client_max_pending_sessions,
                config.client_max_pending_per_address,
                Arc::new(move |reason| m.client_connection_refused(reason)),
            )
        },
    });
    let client_listener = parts.client_listener;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = gateway::client_api::serve(client_listener, api).await {
            tracing::error!(error = %e, "client API server failed");
        }
    }));
    if let (Some((policy, dns, signer)), Some(api_addr)) = (parts.exit, parts.client_addr) {
        if let Some(plumbing) = parts.router {
            let router = IpPacketRouter {
                settings: router_settings(config),
                policy: policy.clone(),
                metrics: core.metrics.clone(),
                loopback: loopback(config, keys, router_identity, signer, api_addr),
            };
            tasks.push(tokio::spawn(router.run(plumbing, core.shutdown.clone())));
        }
        let requester = network_requester_for(
            config,
            core,
            (policy, dns),
            loopback(config, keys, requester_identity, signer, api_addr),
        )?;
        tasks.push(tokio::spawn(requester.run(core.shutdown.clone())));
    }
    tasks.push(tokio::spawn(gateway::sweep_mailbox(
        mailbox,
        gateway::Sweep {
            retention: config.mailbox_retention.get(),
            registration_expiry: config.registration_expiry.get(),
        },
        core.metrics.clone(),
        core.shutdown.clone(),
    )));
    Ok(tasks)
}

/// The mailbox, with its gauges sampled at scrape time.
fn open_mailbox(config: &Config, metrics: &Arc<Metrics>) -> Result<Arc<Mailbox>, NodeError> {
    let mailbox = Arc::new(Mailbox::open_with(
        &config.data_dir.join("mailbox.redb"),
        crate::gateway::mailbox::Limits {
            per_client: config.mailbox_quota_bytes,
            total: config.mailbox_max_bytes,
            unregistered: config.mailbox_unregistered_bytes,
            present_reserve: config
                .mailbox_present_reserve_percent
                .of(config.mailbox_max_bytes),
        },
    )?);
    let stored = mailbox.clone();
    metrics.add_sampler(Box::new(move |m| {
        m.mailbox_payloads.set(stored.stored() as i64);
        if let Ok(n) = stored.registered_count() {
            m.registered_clients.set(n as i64);
        }
    }));
    Ok(mailbox)
}

/// How an exit service reaches this gateway: its client API over loopback.
fn loopback(
    config: &Config,
    keys: &NodeKeys,
    identity: crate::keys::Identity,
    signer: Option<KeyBytes>,
    api_addr: SocketAddr,
) -> Loopback {
    let ip = match api_addr.ip() {
        ip if !ip.is_unspecified() => ip,
        IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    Loopback {
        identity,
        topology: config.topology.clone(),
        topology_signer: signer,
        gateway: keys.identity.public(),
        gateway_address: PeerAddress {
            host: ip.to_string(),
            port: api_addr.port(),
        },
    }
}

/// The IP packet router's settings, from `NYM_NODE_IPR_*`.
fn router_settings(config: &Config) -> ip_router::Settings {
    ip_router::Settings {
        device: config.ipr_device.clone(),
        ipv4_pool: config.ipr_ipv4_pool,
        ipv6_pool: config.ipr_ipv6_pool,
        limits: ip_router::leases::Limits {
            max_clients: config.ipr_max_clients,
            idle: config.ipr_idle_timeout.get(),
            packet_rate: config.ipr_client_packet_rate,
            byte_rate: config.ipr_client_byte_rate,
        },
    }
}

/// The exit's network requester, exempt from the registration stamp, with a resolver of
/// its own so clients' unique names cannot push out the peers' cached addresses.
fn network_requester_for(
    config: &Config,
    core: &Core,
    (policy, dns): (ExitPolicy, DnsSettings),
    loopback: Loopback,
) -> Result<NetworkRequester, NodeError> {
    let resolver = Resolver::new(
        DnsSettings {
            max_entries: EXIT_DNS_CACHE_ENTRIES,
            ..dns
        },
        core.metrics.clone(),
    )?;
    Ok(NetworkRequester {
        exit: Arc::new(Exit {
            policy,
            resolver,
            metrics: core.metrics.clone(),
            limits: network_requester::Limits {
                idle_timeout: config.exit_stream_idle_timeout.get(),
                per_client: config.exit_max_streams_per_client,
                total: config.exit_max_streams,
            },
        }),
        loopback,
    })
}

/// Health, readiness, metrics and the description, until the background stops.
fn start_http(
    config: &Config,
    keys: &NodeKeys,
    core: &Core,
    listener: TcpListener,
    bound: &Bound,
) -> JoinHandle<std::io::Result<()>> {
    let describe = describer(config, keys, &core.ring, &core.topology, bound);
    let metrics_access = config
        .metrics_access()
        .unwrap_or(http::MetricsAccess::Closed);
    if metrics_access == http::MetricsAccess::Closed {
        tracing::warn!(
            "GET /metrics answers 401 to everyone: set NYM_NODE_METRICS_TOKEN (or NYM_NODE_METRICS_TOKEN_FILE) for your Prometheus, or NYM_NODE_METRICS_PUBLIC=true"
        );
    }
    let state = Arc::new(HttpState {
        health: core.health.clone(),
        metrics: core.metrics.clone(),
        describe,
        metrics_access,
    });
    let stop = core.background.clone();
    tokio::spawn(http::serve(listener, state, async move {
        stop.cancelled().await
    }))
}

/// Waits for the stop, then empties the pipeline in data-flow order, then stops what
/// outlives it.
async fn run_until_stopped(
    core: Core,
    pipeline: Pipeline,
    gateway_tasks: Vec<JoinHandle<()>>,
    background: Background,
    http: JoinHandle<std::io::Result<()>>,
) {
    core.shutdown.draining().await;
    // One span from the first signal to the last flushed packet.
    let drain = tracing::info_span!("drain");
    drain_pipeline(&core, pipeline, gateway_tasks)
        .instrument(drain)
        .await;
    core.background.cancel();
    // The last save of the replay filters, now that no worker records tags.
    let _ = background.key_epochs.await;
    let _ = background.refresh.await;
    if let Some(task) = background.own_addresses {
        let _ = task.await;
    }
    let _ = http.await;
}

async fn drain_pipeline(core: &Core, pipeline: Pipeline, gateway_tasks: Vec<JoinHandle<()>>) {
    core.shutdown.stopping().await;
    let started = std::time::Instant::now();
    // Every producer holds its own sender; when they are gone the forwarder drains.
    drop(pipeline.forward);
    // Ingress first: no new packets enter.
    let _ = pipeline.ingress.await;
    pipeline.connections.close();
    pipeline.connections.wait().await;
    // Workers finish their queue once the last ingress handle is gone.
    let workers = pipeline.workers;
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    for t in gateway_tasks {
        let _ = t.await;
    }
    // The forwarder releases what it holds and drops egress; links flush and close.
    let _ = pipeline.forwarder.await;
    pipeline.links.close();
    if tokio::time::timeout(FLUSH_BOUND, pipeline.links.wait())
        .await
        .is_err()
    {
        tracing::warn!("egress links did not finish flushing in time");
    }
    let m = &core.metrics;
    let dropped: u64 = DropReason::ALL.iter().map(|r| m.drop_count(*r)).sum();
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        received = m.packets_received.get(),
        forwarded = m.packets_forwarded.get(),
        delivered = m.packets_delivered.get(),
        dropped,
        released_early = m.packets_released_early.get(),
        "pipeline drained"
    );
}

/// The description follows the topology: layer and public addresses come from this node's
/// entry when it has one, otherwise from the bound sockets.
fn describer(
    config: &Config,
    keys: &NodeKeys,
    ring: &Arc<KeyRing>,
    topology: &TopologyHandle,
    bound: &Bound,
) -> http::Describe {
    let (mixnet_addr, http_addr, client_addr) = (bound.mixnet, bound.http, bound.client);
    let router = config.ipr_enabled;
    let (name, mode, keys, topology, ring) = (
        config.id.clone(),
        config.mode,
        keys.clone(),
        topology.clone(),
        ring.clone(),
    );
    Arc::new(move || {
        let public = PublicKeys {
            identity_key: keys.identity.public(),
            sphinx_keys: ring.published(unix_ms()),
            noise_key: keys.noise.public(),
        };
        let current = topology.current();
        let entry = current.as_ref().and_then(|t| t.node(&public.identity_key));
        let description = Description::new(
            &name,
            mode,
            entry.and_then(|e| e.layer),
            public,
            entry.map_or(mixnet_addr.to_string(), |e| e.mixnet_address.to_string()),
            entry
                .and_then(|e| e.client_address.as_ref().map(|a| a.to_string()))
                .or(client_addr.map(|a| a.to_string())),
            entry
                .and_then(|e| e.http_address.as_ref().map(|a| a.to_string()))
                .unwrap_or(http_addr.to_string()),
        )
        .on_topology_revision(current.as_ref().map_or(0, |t| t.revision()));
        let description = if mode == Mode::ExitGateway {
            description
                .with_network_requester(network_requester::address(&keys.identity).to_string())
        } else {
            description
        };
        let description = if mode == Mode::ExitGateway && router {
            description.with_ip_packet_router(ip_router::address(&keys.identity).to_string())
        } else {
            description
        };
        description.sign(&keys.identity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hooks_come_from_the_environment_only_in_builds_that_have_them() {
        let vars = |name: &str| (name == "NYM_TESTHOOK_LOSE_EVERY").then(|| "3".to_string());
        let hooks = TestHooks::from_vars(vars);
        if cfg!(feature = "test-hooks") {
            assert_eq!(hooks.lose_every, Some(3));
        } else {
            assert_eq!(
                hooks.lose_every, None,
                "a production build lost packets on request"
            );
        }
    }
}
