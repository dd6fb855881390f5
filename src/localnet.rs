//! `nym-node localnet`: a whole mixnet on one machine.
//!
//! Every node is its own child process running this same binary, configured only through
//! its environment, exactly as in production: a node that crashes or is SIGTERMed affects
//! only itself, each has its own metrics endpoint and log file, and the drain on shutdown
//! is the real one. Keys persist in `DIR/<node>/keys`, so restarting the localnet keeps
//! the same identities.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::client::{ClientConfig, Event, MixClient};
use crate::config::Mode;
use crate::directory::Directory;
use crate::keys::{Identity, KeyBytes, NodeKeys};

#[derive(Debug, Clone)]
pub struct LocalnetOptions {
    pub dir: PathBuf,
    pub base_port: u16,
    pub traffic: bool,
    pub mean_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalnetError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error("port {0} is in use; pick another --base-port")]
    PortInUse(u16),
    #[error("node {0} did not become ready; see {1}")]
    NotReady(String, String),
    #[error("{0}")]
    Other(String),
}

/// One node of the testnet.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub name: String,
    pub mode: Mode,
    pub layer: Option<u8>,
    pub mixnet: SocketAddr,
    pub http: SocketAddr,
    pub client: SocketAddr,
    pub dir: PathBuf,
}

/// The eight nodes of the standard testnet: two per mix layer and two gateways.
pub fn plan(dir: &Path, base_port: u16) -> Vec<LocalNode> {
    plan_nodes(
        dir,
        base_port,
        &[
            ("mix-1a", Mode::Mixnode, Some(1)),
            ("mix-1b", Mode::Mixnode, Some(1)),
            ("mix-2a", Mode::Mixnode, Some(2)),
            ("mix-2b", Mode::Mixnode, Some(2)),
            ("mix-3a", Mode::Mixnode, Some(3)),
            ("mix-3b", Mode::Mixnode, Some(3)),
            ("entry-gw", Mode::EntryGateway, None),
            ("exit-gw", Mode::ExitGateway, None),
        ],
    )
}

/// Any set of nodes; node `i` takes ports `base_port + 10 i` (mixnet), `+1` (HTTP), `+2` (client API).
pub fn plan_nodes(
    dir: &Path,
    base_port: u16,
    specs: &[(&str, Mode, Option<u8>)],
) -> Vec<LocalNode> {
    specs
        .iter()
        .enumerate()
        .map(|(i, (name, mode, layer))| {
            let port = |k: u16| SocketAddr::from(([127, 0, 0, 1], base_port + 10 * i as u16 + k));
            LocalNode {
                name: (*name).to_string(),
                mode: *mode,
                layer: *layer,
                mixnet: port(0),
                http: port(1),
                client: port(2),
                dir: dir.join(name),
            }
        })
        .collect()
}

/// Creates each node's keys where it has none (what `nym-node keygen` does on a node's own
/// machine) and the directory's signing key; returns where the directory will write the
/// topology. The nodes then start, and the directory ([`crate::directory`]) lists them from
/// their own signed descriptions.
pub fn prepare(nodes: &[LocalNode], dir: &Path) -> Result<PathBuf, LocalnetError> {
    prepare_keys(
        nodes,
        dir,
        crate::config::Config::default().key_rotation_interval.get(),
    )
}

/// Like [`prepare`], for nodes whose Sphinx keys rotate every `rotation` (they must run
/// with the same `NYM_NODE_KEY_ROTATION_INTERVAL`; a node also adopts it by itself).
pub fn prepare_keys(
    nodes: &[LocalNode],
    dir: &Path,
    rotation: Duration,
) -> Result<PathBuf, LocalnetError> {
    for node in nodes {
        let keys_dir = node.dir.join("keys");
        if !NodeKeys::exist_in(&keys_dir) {
            NodeKeys::generate(rotation)?.write(&keys_dir)?;
        }
    }
    directory_identity(dir)?;
    metrics_token(dir)?;
    Ok(dir.join("topology.json"))
}

/// The bearer token the network's nodes serve `/metrics` to, `DIR/metrics.token` (made on
/// first use, mode 0600): nodes read it through `NYM_NODE_METRICS_TOKEN_FILE`, and so can
/// a Prometheus (`credentials_file`).
pub fn metrics_token(dir: &Path) -> Result<String, LocalnetError> {
    let path = dir.join(METRICS_TOKEN);
    if let Ok(token) = std::fs::read_to_string(&path)
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_string());
    }
    let token = crate::keys::random_token()?;
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| LocalnetError::Io(path.display().to_string(), e))?;
    writeln!(file, "{token}").map_err(|e| LocalnetError::Io(path.display().to_string(), e))?;
    Ok(token)
}

/// Where the network's metrics token is kept, beside its topology.
pub const METRICS_TOKEN: &str = "metrics.token";

fn local_addresses(n: &LocalNode) -> Advertised {
    Advertised {
        mixnet: n.mixnet.to_string(),
        client: n.client.to_string(),
        http: n.http.to_string(),
    }
}

/// Where a node is reached, as the topology says it (host names allowed).
pub struct Advertised {
    pub mixnet: String,
    pub client: String,
    pub http: String,
}

/// The local directory's signing key, `DIR/directory.key` (created on first use, with its
/// public half in `DIR/directory.pub` for nodes and clients to be configured with).
pub fn directory_identity(dir: &Path) -> Result<Identity, LocalnetError> {
    std::fs::create_dir_all(dir).map_err(|e| LocalnetError::Io(dir.display().to_string(), e))?;
    let path = dir.join(DIRECTORY_KEY);
    let identity = if path.exists() {
        Identity::load(&path)?
    } else {
        let id = Identity::generate()?;
        id.write(&path)?;
        id
    };
    let public = dir.join(DIRECTORY_PUB);
    std::fs::write(&public, format!("{}\n", identity.public()))
        .map_err(|e| LocalnetError::Io(public.display().to_string(), e))?;
    Ok(identity)
}

const DIRECTORY_KEY: &str = "directory.key";
const DIRECTORY_PUB: &str = "directory.pub";

/// How often the localnet and compose directories ask the nodes for their descriptions.
pub const DIRECTORY_POLL: Duration = Duration::from_secs(2);

/// The compose testnet (`docker-compose.yml`): the standard eight nodes, each a service
/// named after it, listening on the default ports, found by service name.
pub fn prepare_compose(dir: &Path, rotation: Duration) -> Result<PathBuf, LocalnetError> {
    prepare_keys(&plan(dir, 21000), dir, rotation)
}

/// The compose testnet's directory, until `stop`: it lists the nodes once all of them have
/// started, then follows their key rotations.
pub async fn run_compose_directory(
    dir: PathBuf,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), LocalnetError> {
    let mut directory = Directory::new(
        plan(&dir, 21000),
        &dir,
        directory_identity(&dir)?,
        compose_addresses,
    );
    tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = directory.publish_first(Duration::from_secs(600)) => r?,
    }
    directory.run(DIRECTORY_POLL, stop).await;
    Ok(())
}

fn compose_addresses(n: &LocalNode) -> Advertised {
    Advertised {
        mixnet: format!("{}:1789", n.name),
        client: format!("{}:9000", n.name),
        http: format!("{}:8080", n.name),
    }
}

/// The environment that runs `node` as a child process.
pub fn node_env(node: &LocalNode, topology: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        ("NYM_NODE_ID", node.name.clone()),
        ("NYM_NODE_MODE", node.mode.as_str().to_string()),
        ("NYM_NODE_TOPOLOGY", topology.display().to_string()),
        ("NYM_NODE_TOPOLOGY_REFRESH", "2s".into()),
        (
            "NYM_NODE_KEYS_DIR",
            node.dir.join("keys").display().to_string(),
        ),
        (
            "NYM_NODE_DATA_DIR",
            node.dir.join("data").display().to_string(),
        ),
        ("NYM_NODE_MIXNET_BIND", node.mixnet.to_string()),
        ("NYM_NODE_HTTP_BIND", node.http.to_string()),
        ("NYM_NODE_CLIENT_BIND", node.client.to_string()),
        ("NYM_NODE_DRAIN_GRACE", "2s".into()),
    ];
    // Two cores shared by eight nodes: one Sphinx worker each is plenty.
    env.push(("NYM_NODE_SPHINX_WORKERS", "1".into()));
    env.push(("NYM_NODE_RUNTIME_THREADS", "1".into()));
    let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    // The topology beside it is signed by the directory key beside it.
    if let Ok(directory) = Identity::load(&topology.with_file_name(DIRECTORY_KEY)) {
        env.push((
            "NYM_NODE_TOPOLOGY_SIGNER".into(),
            directory.public().to_base58(),
        ));
    }
    // Metrics go only to holders of the network's token (nodes refuse everyone without one).
    let token = topology.with_file_name(METRICS_TOKEN);
    if token.exists() {
        env.push((
            "NYM_NODE_METRICS_TOKEN_FILE".into(),
            token.display().to_string(),
        ));
    }
    // Key rotation is network-wide: the nodes rotate as the localnet's directory publishes.
    env.extend(std::env::vars().filter(|(k, _)| k.starts_with("NYM_NODE_KEY_")));
    if node.mode == Mode::ExitGateway {
        // The exit knobs (its policy above all) pass from localnet's own environment, so a
        // local test server can be allowed without editing anything.
        env.extend(
            std::env::vars()
                .filter(|(k, _)| k.starts_with("NYM_NODE_EXIT_") || k.starts_with("NYM_NODE_IPR_")),
        );
    }
    env
}

/// Starts `node` as a child process of `exe`, logging to `DIR/<node>/node.log`.
pub fn spawn_node(exe: &Path, node: &LocalNode, topology: &Path) -> Result<Child, LocalnetError> {
    spawn_node_with(exe, node, topology, &[])
}

/// Like [`spawn_node`], with extra environment variables (which override the defaults).
pub fn spawn_node_with(
    exe: &Path,
    node: &LocalNode,
    topology: &Path,
    extra: &[(&str, &str)],
) -> Result<Child, LocalnetError> {
    std::fs::create_dir_all(&node.dir)
        .map_err(|e| LocalnetError::Io(node.dir.display().to_string(), e))?;
    let log_path = node.dir.join("node.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| LocalnetError::Io(log_path.display().to_string(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| LocalnetError::Io(log_path.display().to_string(), e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .env_clear()
        .envs(node_env(node, topology))
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true);
    // SAFETY: prctl only changes this child's own death signal; it is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| LocalnetError::Io(exe.display().to_string(), e))
}

/// Waits until every node answers `/readyz` with 200.
pub async fn wait_ready(nodes: &[LocalNode], timeout: Duration) -> Result<(), LocalnetError> {
    let deadline = Instant::now() + timeout;
    for node in nodes {
        loop {
            if let Some((200, _)) = crate::http::probe::get(node.http, "/readyz").await {
                break;
            }
            if Instant::now() > deadline {
                return Err(LocalnetError::NotReady(
                    node.name.clone(),
                    node.dir.join("node.log").display().to_string(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Sums one counter (all label sets) over every node's `/metrics`, presenting `token`.
pub async fn sum_metric(nodes: &[LocalNode], token: &str, name: &str) -> u64 {
    let mut total = 0.0;
    let auth = format!("Bearer {token}");
    for node in nodes {
        let scraped =
            crate::http::probe::request(node.http, "/metrics", &[("Authorization", &auth)]).await;
        if let Some((200, body)) = scraped {
            total += body
                .lines()
                .filter(|l| {
                    l.starts_with(name)
                        && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total as u64
}

pub fn check_ports_free(nodes: &[LocalNode]) -> Result<(), LocalnetError> {
    for n in nodes {
        for addr in [n.mixnet, n.http, n.client] {
            TcpListener::bind(addr).map_err(|_| LocalnetError::PortInUse(addr.port()))?;
        }
    }
    Ok(())
}

/// Runs the testnet until SIGINT or SIGTERM.
pub async fn run(options: LocalnetOptions, exe: PathBuf) -> Result<(), LocalnetError> {
    let nodes = plan(&options.dir, options.base_port);
    check_ports_free(&nodes)?;
    let rotation = crate::config::key_rotation_interval_from_env()
        .map_err(|e| LocalnetError::Other(e.to_string()))?;
    let topology = prepare_keys(&nodes, &options.dir, rotation)?;
    let signer = directory_identity(&options.dir)?;
    let signed_by = signer.public();
    let mut children = Vec::new();
    for node in &nodes {
        children.push((node.name.clone(), spawn_node(&exe, node, &topology)?));
    }
    let mut directory = Directory::new(nodes.clone(), &options.dir, signer, local_addresses);
    directory.publish_first(Duration::from_secs(30)).await?;
    let directory_stop = tokio_util::sync::CancellationToken::new();
    let directory = tokio::spawn(directory.run(DIRECTORY_POLL, directory_stop.clone()));
    wait_ready(&nodes, Duration::from_secs(30)).await?;
    print_banner(&nodes, &options.dir, &topology, &signed_by);
    let traffic = match options.traffic {
        true => Some(start_traffic(&options, &nodes, &topology, signed_by).await?),
        false => None,
    };
    let failure = wait_for_stop(&mut children, &options.dir).await?;
    if let Some(t) = traffic {
        t.abort();
    }
    directory_stop.cancel();
    let _ = directory.await;
    stop_nodes(&mut children).await;
    match failure {
        Some(f) => Err(LocalnetError::Other(f)),
        None => Ok(()),
    }
}

/// What is running and how to use it.
fn print_banner(nodes: &[LocalNode], dir: &Path, topology: &Path, signed_by: &KeyBytes) {
    let topology_abs = std::fs::canonicalize(topology).unwrap_or(topology.to_path_buf());
    println!(
        "localnet: {} nodes running (3 mix layers x 2, entry-gw, exit-gw)",
        nodes.len()
    );
    println!("localnet: topology   {}", topology_abs.display());
    println!("localnet: logs       {}/<node>/node.log", dir.display());
    println!(
        "localnet: metrics    http://<node http>/metrics with Authorization: Bearer $(cat {})",
        std::fs::canonicalize(dir.join(METRICS_TOKEN))
            .unwrap_or(dir.join(METRICS_TOKEN))
            .display()
    );
    for n in nodes {
        println!(
            "localnet:   {:<9} mixnet {}  http http://{}",
            n.name, n.mixnet, n.http
        );
    }
    let signer = topology_abs.with_file_name(DIRECTORY_PUB);
    println!(
        "localnet: signed by  {} (directory key {})",
        signed_by,
        signer.display()
    );
    println!(
        "localnet: try        nym-client --topology {} --topology-signer {} probe --count 20",
        topology_abs.display(),
        signer.display()
    );
    println!(
        "localnet: browse     nym-client --topology {} --topology-signer {} socks5   then  curl --socks5-hostname 127.0.0.1:1080 URL",
        topology_abs.display(),
        signer.display()
    );
    println!("localnet: Ctrl-C stops every node (each drains before it exits)");
}

/// The traffic client and its progress lines.
async fn start_traffic(
    options: &LocalnetOptions,
    nodes: &[LocalNode],
    topology: &Path,
    signed_by: KeyBytes,
) -> Result<tokio::task::JoinHandle<()>, LocalnetError> {
    let config = ClientConfig {
        topology: topology.display().to_string(),
        topology_signer: Some(signed_by),
        mean_delay: options.mean_delay,
        cover_rate: 0.0,
        ..ClientConfig::default()
    };
    let client = MixClient::start(config, Identity::generate()?)
        .await
        .map_err(|e| LocalnetError::Other(format!("traffic client: {e}")))?;
    let token = metrics_token(&options.dir)?;
    Ok(tokio::spawn(traffic_loop(client, nodes.to_vec(), token)))
}

/// Waits for SIGINT, SIGTERM or a node that exits on its own (returned as the failure).
async fn wait_for_stop(
    children: &mut [(String, Child)],
    dir: &Path,
) -> Result<Option<String>, LocalnetError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| LocalnetError::Io("signal handler".into(), e))?;
    let exited = async {
        loop {
            for (name, child) in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return (name.clone(), status);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    Ok(tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        (name, status) = exited => Some(format!(
            "node {name} exited unexpectedly ({status}); see {}/{name}/node.log",
            dir.display()
        )),
    })
}

/// SIGTERMs every node (each drains), and kills one that takes longer than 15 s.
async fn stop_nodes(children: &mut [(String, Child)]) {
    println!("localnet: stopping nodes");
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            // SAFETY: signalling our own child by its pid.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for (name, child) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            eprintln!("localnet: {name} did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Sends a message to itself every 200 ms and prints a progress line every 5 s.
async fn traffic_loop(mut client: MixClient, nodes: Vec<LocalNode>, metrics_token: String) {
    let me = client.address();
    let mut sent = 0u64;
    let mut delivered = 0u64;
    let mut latencies: Vec<Duration> = Vec::new();
    let mut sent_at = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let body = sent.to_be_bytes().to_vec();
                sent_at.insert(sent, Instant::now());
                if client.send(me, body, 0).await.is_ok() {
                    sent += 1;
                }
            }
            ev = client.next_event() => match ev {
                Some(Event::Received { body, .. }) if body.len() == 8 => {
                    let seq = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
                    if let Some(t) = sent_at.remove(&seq) {
                        delivered += 1;
                        latencies.push(t.elapsed());
                    }
                }
                Some(_) => {}
                None => return,
            },
            _ = report.tick() => {
                latencies.sort();
                let pct = |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or_default();
                let drops = sum_metric(&nodes, &metrics_token, "nym_node_packets_dropped_total").await;
                println!(
                    "traffic: sent={sent} delivered={delivered} p50={:.0}ms p99={:.0}ms retransmissions={} node_drops={drops}",
                    pct(0.5).as_secs_f64() * 1000.0,
                    pct(0.99).as_secs_f64() * 1000.0,
                    client.stats().retransmissions.load(std::sync::atomic::Ordering::Relaxed),
                );
                latencies.clear();
            }
        }
    }
}
