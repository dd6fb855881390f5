//! Shared harness for whole-node tests: real nodes in this process on 127.0.0.1 ports,
//! real Noise and Sphinx, plus test-driven peers (initiators) and sinks (responders).
#![allow(dead_code)]

pub mod dns_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use nym_node::client::packet;
use nym_node::client::route::Hop;
use nym_node::config::{Config, DurationKnob, Mode};
use nym_node::keys::{KeyBytes, NodeKeys};
use nym_node::mixnet::framing::{self, FRAME_CIPHERTEXT_LEN, FRAME_PLAINTEXT_LEN};
use nym_node::mixnet::noise::{self, LinkSender};
use nym_node::mixnet::sphinx::{PACKET_SIZE, PacketBytes};
use nym_node::node::{self, Listeners, RunningNode, TestHooks};
use nym_node::topology::{NodeEntry, TopologyDocument};

/// What a member of the test network is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Role {
    /// A real node started in this process.
    Node(Mode, Option<u8>),
    /// A topology member the test connects *from* (its address is never dialled).
    Peer,
    /// A topology member the test listens as (a responder standing in for a node).
    Sink(Option<u8>),
}

pub struct Member {
    pub name: String,
    pub role: Role,
    pub keys: NodeKeys,
    pub entry: NodeEntry,
}

impl Member {
    pub fn hop(&self) -> Hop {
        Hop {
            identity: self.entry.identity_key,
            sphinx_keys: self.entry.sphinx_keys.clone(),
        }
    }
}

pub struct Net {
    /// The directory key the topology is signed with, when the test uses one.
    pub directory: Option<nym_node::keys::Identity>,
    pub dir: TempDir,
    pub topology_path: PathBuf,
    pub members: Vec<Member>,
    pub nodes: HashMap<String, RunningNode>,
    pub sinks: HashMap<String, TcpListener>,
}

/// The bearer token test nodes serve `/metrics` to (the test Prometheus sends it).
pub const TEST_METRICS_TOKEN: &str = "test-metrics-token";

/// Default test tweaks: fast topology reload, short grace, one worker, metrics behind
/// [`TEST_METRICS_TOKEN`].
pub fn base_config(
    dir: &std::path::Path,
    name: &str,
    mode: Mode,
    topology: &std::path::Path,
) -> Config {
    Config {
        id: name.to_string(),
        mode,
        topology: topology.display().to_string(),
        topology_refresh: DurationKnob(Duration::from_millis(200)),
        data_dir: dir.join(name),
        keys_dir: dir.join(name).join("keys"),
        drain_grace: DurationKnob(Duration::from_millis(500)),
        sphinx_workers: 1,
        // A real stamp, at a price a debug build pays in milliseconds.
        registration_stamp_bits: nym_node::config::StampBits(8),
        metrics_token: TEST_METRICS_TOKEN.into(),
        ..Config::default()
    }
}

impl Net {
    /// Builds and starts a network. `tweak` adjusts each node's config.
    pub async fn start(
        spec: &[(&str, Role)],
        tweak: impl Fn(&str, &mut Config),
        hooks: impl Fn(&str) -> TestHooks,
    ) -> Net {
        Self::start_with(spec, tweak, hooks, None).await
    }

    /// Like [`Net::start`], the topology signed by `directory` and every node requiring it.
    pub async fn start_signed(
        spec: &[(&str, Role)],
        tweak: impl Fn(&str, &mut Config),
        hooks: impl Fn(&str) -> TestHooks,
        directory: nym_node::keys::Identity,
    ) -> Net {
        let signer = directory.public().to_base58();
        let tweak = move |name: &str, c: &mut Config| {
            c.topology_signer = signer.clone();
            tweak(name, c)
        };
        Self::start_with(spec, tweak, hooks, Some(directory)).await
    }

    async fn start_with(
        spec: &[(&str, Role)],
        tweak: impl Fn(&str, &mut Config),
        hooks: impl Fn(&str) -> TestHooks,
        directory: Option<nym_node::keys::Identity>,
    ) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let topology_path = dir.path().join("topology.json");
        let mut members = Vec::new();
        let mut listeners: HashMap<String, Listeners> = HashMap::new();
        let mut sinks = HashMap::new();
        for (name, role) in spec {
            // Keys rotate at the interval the member's node will run with.
            let mut probe = base_config(dir.path(), name, Mode::Mixnode, &topology_path);
            tweak(name, &mut probe);
            let keys = NodeKeys::generate(probe.key_rotation_interval.get()).unwrap();
            let (mode, layer, mixnet_address, client_address, http_address) = match role {
                Role::Node(mode, layer) => {
                    let l = Listeners {
                        mixnet: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                        client: if mode.is_gateway() {
                            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
                        } else {
                            None
                        },
                    };
                    let m = l.mixnet.local_addr().unwrap();
                    let h = l.http.local_addr().unwrap();
                    let c = l.client.as_ref().map(|c| c.local_addr().unwrap());
                    listeners.insert(name.to_string(), l);
                    (
                        *mode,
                        *layer,
                        m.to_string(),
                        c.map(|c| c.to_string()),
                        Some(h.to_string()),
                    )
                }
                Role::Peer => (
                    Mode::Mixnode,
                    Some(1),
                    "127.0.0.1:9".to_string(),
                    None,
                    None,
                ),
                Role::Sink(layer) => {
                    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let a = l.local_addr().unwrap();
                    sinks.insert(name.to_string(), l);
                    let mode = if layer.is_some() {
                        Mode::Mixnode
                    } else {
                        Mode::EntryGateway
                    };
                    (mode, *layer, a.to_string(), None, None)
                }
            };
            let public = keys.public();
            members.push(Member {
                name: name.to_string(),
                role: *role,
                entry: NodeEntry {
                    name: name.to_string(),
                    identity_key: public.identity_key,
                    sphinx_keys: public.sphinx_keys.clone(),
                    noise_key: public.noise_key,
                    mode,
                    layer,
                    mixnet_address: mixnet_address.parse().unwrap(),
                    client_address: client_address.map(|c| c.parse().unwrap()),
                    http_address: http_address.map(|h| h.parse().unwrap()),
                    network_requester: requester_of(mode, &keys),
                    ip_packet_router: None,
                    serving: true,
                    statement: statement_of(&keys, &public, mode),
                },
                keys,
            });
        }
        let net_members = Net {
            directory,
            dir,
            topology_path,
            members,
            nodes: HashMap::new(),
            sinks,
        };
        net_members.write_topology(1);
        let mut net = net_members;
        for m in &net.members {
            if let Role::Node(mode, _) = m.role {
                let mut config = base_config(net.dir.path(), &m.name, mode, &net.topology_path);
                tweak(&m.name, &mut config);
                let l = listeners.remove(&m.name).unwrap();
                let running = node::start(config, m.keys.clone(), l, hooks(&m.name))
                    .await
                    .unwrap();
                net.nodes.insert(m.name.clone(), running);
            }
        }
        for (name, n) in &net.nodes {
            let mut ready = false;
            for _ in 0..200 {
                if n.health.readiness().is_ok() {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                ready,
                "{name} never became ready: {:?}",
                n.health.readiness()
            );
        }
        net
    }

    /// Writes the topology document from the members' entries (signed when the network
    /// has a directory key).
    pub fn write_topology(&self, revision: u64) {
        let nodes = self.members.iter().map(|m| m.entry.clone()).collect();
        self.write_document(&TopologyDocument::issue(revision, nodes));
    }

    /// Writes `doc` as the topology (signed when the network has a directory key).
    pub fn write_document(&self, doc: &TopologyDocument) {
        let bytes = match &self.directory {
            Some(d) => nym_node::topology::sign_document(doc, d).unwrap(),
            None => serde_json::to_vec_pretty(doc).unwrap(),
        };
        std::fs::write(&self.topology_path, bytes).unwrap();
    }

    /// Publishes each member's Sphinx keys of this epoch and the next again, as a directory
    /// does once nodes have made their next key: nodes' from the key file they keep on disk
    /// (each epoch adds a fresh key to it), the others' from memory.
    pub fn republish(&mut self, revision: u64) {
        for m in &mut self.members {
            let keys_path = NodeKeys::sphinx_path(&self.dir.path().join(&m.name).join("keys"));
            if let Ok(keys) = nym_node::keys::SphinxKeys::load(&keys_path) {
                m.keys.sphinx = keys;
            }
            let public = m.keys.public();
            m.entry.sphinx_keys = public.sphinx_keys.clone();
            m.entry.statement = statement_of(&m.keys, &public, m.entry.mode);
        }
        self.write_topology(revision);
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    pub fn member_mut(&mut self, name: &str) -> &mut Member {
        self.members.iter_mut().find(|m| m.name == name).unwrap()
    }

    pub fn node(&self, name: &str) -> &RunningNode {
        &self.nodes[name]
    }

    pub fn take_sink(&mut self, name: &str) -> Sink {
        let listener = self.sinks.remove(name).unwrap();
        self.sink_at(name, listener)
    }

    /// Opens a Noise link from `peer` (a topology member) to node `to`.
    pub async fn link(&self, peer: &str, to: &str) -> Link {
        self.try_link(peer, to).await.unwrap()
    }

    /// Like [`Net::link`], for tests that expect the node to refuse.
    pub async fn try_link(&self, peer: &str, to: &str) -> Result<Link, String> {
        let target = self.member(to);
        Link::connect(
            self.mixnet_addr(to),
            &self.member(peer).keys,
            &target.entry.noise_key,
        )
        .await
    }

    /// A member's mixnet listener (an IP literal in these tests).
    pub fn mixnet_addr(&self, name: &str) -> SocketAddr {
        self.member(name)
            .entry
            .mixnet_address
            .to_string()
            .parse()
            .unwrap()
    }

    /// Builds a packet along `route` (member names) to `destination` with per-hop `delays`.
    pub fn packet(
        &self,
        route: &[&str],
        destination: KeyBytes,
        plaintext: &[u8],
        delays: &[Duration],
    ) -> PacketBytes {
        let hops: Vec<Hop> = route.iter().map(|n| self.member(n).hop()).collect();
        packet::build_forward(&hops, &destination, plaintext, delays)
            .unwrap()
            .1
    }

    /// `n` packets along `route`, numbered in their plaintext, with zero delays.
    pub fn packets(&self, route: &[&str], n: u32) -> Vec<PacketBytes> {
        (0..n)
            .map(|i| {
                self.packet(
                    route,
                    KeyBytes([1; 32]),
                    &i.to_be_bytes(),
                    &vec![Duration::ZERO; route.len()],
                )
            })
            .collect()
    }

    /// Stops node `name` (a drain with its short grace) and starts it again on the same
    /// addresses, keys and data directory, configured by `tweak` as at the start.
    pub async fn restart(&mut self, name: &str, tweak: impl Fn(&str, &mut Config)) {
        let old = self
            .nodes
            .remove(name)
            .unwrap_or_else(|| panic!("no node {name}"));
        let (mixnet, http, client) = (old.mixnet_addr, old.http_addr, old.client_addr);
        old.shutdown.stop();
        old.wait().await;
        let member = self.member(name);
        let Role::Node(mode, _) = member.role else {
            panic!("{name} is not a node")
        };
        let listeners = Listeners {
            mixnet: TcpListener::bind(mixnet).await.unwrap(),
            http: TcpListener::bind(http).await.unwrap(),
            client: match client {
                Some(c) => Some(TcpListener::bind(c).await.unwrap()),
                None => None,
            },
        };
        let mut config = base_config(self.dir.path(), name, mode, &self.topology_path);
        tweak(name, &mut config);
        let running = node::start(config, member.keys.clone(), listeners, TestHooks::default())
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || running
                .health
                .readiness()
                .is_ok())
            .await,
            "{name} not ready after its restart"
        );
        self.nodes.insert(name.to_string(), running);
    }

    /// Stops every node (drain with a short grace) and waits for them.
    pub async fn stop(mut self) {
        for (_, n) in self.nodes.drain() {
            n.shutdown.stop();
            n.wait().await;
        }
    }
}

/// A test-driven initiator link: sends frames of its choosing.
pub struct Link {
    pub stream: TcpStream,
    pub sender: LinkSender,
}

impl Link {
    pub async fn connect(
        addr: SocketAddr,
        keys: &NodeKeys,
        responder: &KeyBytes,
    ) -> Result<Link, String> {
        Self::connect_from(None, addr, keys, responder).await
    }

    /// Like [`Link::connect`], from a chosen local address (another loopback address, for
    /// a peer that is not the flooder).
    pub async fn connect_from(
        source: Option<std::net::IpAddr>,
        addr: SocketAddr,
        keys: &NodeKeys,
        responder: &KeyBytes,
    ) -> Result<Link, String> {
        let mut stream = match source {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|e| e.to_string())?;
                socket.connect(addr).await
            }
        }
        .map_err(|e| e.to_string())?;
        let sender = noise::initiate(
            &mut stream,
            &keys.noise.secret_bytes(),
            responder,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(Link { stream, sender })
    }

    pub async fn send_packet(&mut self, packet: &[u8; PACKET_SIZE]) -> std::io::Result<()> {
        let mut plain = [0u8; FRAME_PLAINTEXT_LEN];
        let mut out = Vec::new();
        self.sender
            .encrypt_packet(packet, &mut plain, &mut out)
            .unwrap();
        self.stream.write_all(&out).await
    }

    /// Sends an arbitrary plaintext, correctly encrypted, with its length prefix.
    pub async fn send_plaintext(&mut self, plaintext: &[u8]) -> std::io::Result<()> {
        let body = self.sender.encrypt_raw(plaintext).unwrap();
        let mut out = framing::prefix(body.len()).to_vec();
        out.extend_from_slice(&body);
        self.stream.write_all(&out).await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// True once the node has closed the connection (reads EOF or an error).
    pub async fn closed_within(&mut self, t: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(t, self.stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A received packet and when it arrived.
pub struct Arrival {
    pub packet: Box<[u8; PACKET_SIZE]>,
    pub at: tokio::time::Instant,
}

/// A responder standing in for a node: accepts links from topology members and records
/// every packet it receives.
pub struct Sink {
    pub rx: mpsc::UnboundedReceiver<Arrival>,
    pub addr: SocketAddr,
    pub keys: NodeKeys,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub fn start(listener: TcpListener, keys: NodeKeys, known: Vec<KeyBytes>) -> Sink {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let secret = keys.noise.secret_bytes();
        let task = tokio::spawn(async move {
            // Connection tasks live in this set, so aborting the sink closes them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let known = known.clone();
                connections.spawn(async move {
                    let Ok((mut receiver, _)) =
                        noise::respond_to(&mut stream, &secret, Duration::from_secs(5), &known)
                            .await
                    else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = vec![0u8; 65536];
                    let mut plain = [0u8; FRAME_PLAINTEXT_LEN];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Ok(Some(body)) =
                            framing::next_frame(&buf, FRAME_CIPHERTEXT_LEN, true)
                        {
                            if receiver.decrypt(body, &mut plain).is_err() {
                                return;
                            }
                            let packet = framing::decode_packet(&plain).unwrap();
                            let _ = tx.send(Arrival {
                                packet: Box::new(*packet),
                                at: tokio::time::Instant::now(),
                            });
                            buf.drain(..framing::WIRE_FRAME_LEN);
                        }
                    }
                });
            }
        });
        Sink {
            rx,
            addr,
            keys,
            task,
        }
    }

    /// Waits for the next packet, up to `t`.
    pub async fn next(&mut self, t: Duration) -> Option<Arrival> {
        tokio::time::timeout(t, self.rx.recv()).await.ok().flatten()
    }

    /// Collects packets until `n` arrived or `t` passed.
    pub async fn collect(&mut self, n: usize, t: Duration) -> Vec<Arrival> {
        let deadline = tokio::time::Instant::now() + t;
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(a)) => out.push(a),
                _ => break,
            }
        }
        out
    }

    /// Closes the listener and every link (the sink "dies").
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Polls `f` until it is true or `t` passes; returns its last value.
pub async fn eventually(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + t;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The standard 3-layer network: two mixes per layer, one gateway.
pub fn three_layers() -> Vec<(&'static str, Role)> {
    vec![
        ("mix-1a", Role::Node(Mode::Mixnode, Some(1))),
        ("mix-1b", Role::Node(Mode::Mixnode, Some(1))),
        ("mix-2a", Role::Node(Mode::Mixnode, Some(2))),
        ("mix-2b", Role::Node(Mode::Mixnode, Some(2))),
        ("mix-3a", Role::Node(Mode::Mixnode, Some(3))),
        ("mix-3b", Role::Node(Mode::Mixnode, Some(3))),
        ("gateway", Role::Node(Mode::EntryGateway, None)),
    ]
}

pub fn no_hooks(_: &str) -> TestHooks {
    TestHooks::default()
}

/// A responder that completes the handshake and then never reads: a peer that stopped
/// reading. Its receive buffer is tiny so the sender's writes block quickly.
pub struct StalledSink {
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StalledSink {
    pub fn start(listener: TcpListener, keys: NodeKeys, known: Vec<KeyBytes>) -> StalledSink {
        let _ = socket2::SockRef::from(&listener).set_recv_buffer_size(4096);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let secret = keys.noise.secret_bytes();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(4096);
                let known = known.clone();
                if noise::respond_to(&mut stream, &secret, Duration::from_secs(5), &known)
                    .await
                    .is_ok()
                {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    held.push(stream);
                }
            }
        });
        StalledSink { accepted, task }
    }

    pub fn abort(self) {
        self.task.abort();
    }
}

impl Net {
    pub fn take_stalled_sink(&mut self, name: &str) -> StalledSink {
        let listener = self.sinks.remove(name).unwrap();
        let keys = self.member(name).keys.clone();
        let known: Vec<KeyBytes> = self.members.iter().map(|m| m.entry.noise_key).collect();
        StalledSink::start(listener, keys, known)
    }
}

/// A base port with `count` consecutive free ports above it (for process-level tests).
pub fn free_base_port(count: u16) -> u16 {
    for _ in 0..100 {
        let base = 30000 + (rand::random::<u16>() % 300) * 100;
        if (base..base + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

/// Reads `key=value` (a number) from the last log line containing `message`.
pub fn log_field(log: &str, message: &str, key: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(message))?;
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Debian's Prometheus, started by the test on a loopback port, scraping `targets` every second.
pub struct Prometheus {
    pub addr: SocketAddr,
    child: std::process::Child,
    _dir: TempDir,
}

impl Prometheus {
    /// `targets`: (address, labels) of each `/metrics` endpoint.
    pub fn start(targets: &[(SocketAddr, Vec<(&str, &str)>)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: nym-node\n",
        );
        // Nodes serve metrics only to holders of their token (others ignore the header).
        config.push_str(&format!(
            "    authorization:\n      credentials: '{TEST_METRICS_TOKEN}'\n    static_configs:\n"
        ));
        for (addr, labels) in targets {
            config.push_str(&format!("      - targets: ['{addr}']\n"));
            if !labels.is_empty() {
                config.push_str("        labels:\n");
                for (k, v) in labels {
                    config.push_str(&format!("          {k}: '{v}'\n"));
                }
            }
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`; scripts/install-test-deps.sh installs it)");
        Prometheus {
            addr,
            child,
            _dir: dir,
        }
    }

    /// Runs an instant query; returns (labels, value) per series, or None if Prometheus is not up.
    pub async fn query(
        &self,
        q: &str,
    ) -> Option<Vec<(serde_json::Map<String, serde_json::Value>, f64)>> {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) =
            nym_node::http::probe::get(self.addr, &format!("/api/v1/query?query={encoded}"))
                .await?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
        let result = v["data"]["result"].as_array()?;
        Some(
            result
                .iter()
                .filter_map(|r| {
                    let labels = r["metric"].as_object()?.clone();
                    let value = r["value"][1].as_str()?.parse().ok()?;
                    Some((labels, value))
                })
                .collect(),
        )
    }

    /// Every metric name Prometheus holds samples of, or None if it is not up.
    pub async fn metric_names(&self) -> Option<Vec<String>> {
        let (status, body) =
            nym_node::http::probe::get(self.addr, "/api/v1/label/__name__/values").await?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
        Some(
            v["data"]
                .as_array()?
                .iter()
                .filter_map(|n| Some(n.as_str()?.to_string()))
                .collect(),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects `Received` bodies until `n` arrived or `t` passed (duplicates included).
pub async fn receive(c: &mut nym_node::client::MixClient, n: usize, t: Duration) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + t;
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout_at(deadline, c.next_event()).await {
            Ok(Some(nym_node::client::Event::Received { body, .. })) => got.push(body),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    got
}

/// The smallest full route as child processes' plan: one mix per layer and a gateway.
pub fn one_per_layer(dir: &std::path::Path, base: u16) -> Vec<nym_node::localnet::LocalNode> {
    nym_node::localnet::plan_nodes(
        dir,
        base,
        &[
            ("mix-1", Mode::Mixnode, Some(1)),
            ("mix-2", Mode::Mixnode, Some(2)),
            ("mix-3", Mode::Mixnode, Some(3)),
            ("gw", Mode::EntryGateway, None),
        ],
    )
}

impl Net {
    /// A sink standing in for member `name` (same keys) on a listener of the test's choosing.
    pub fn sink_at(&self, name: &str, listener: TcpListener) -> Sink {
        let keys = self.member(name).keys.clone();
        let known: Vec<KeyBytes> = self.members.iter().map(|m| m.entry.noise_key).collect();
        Sink::start(listener, keys, known)
    }

    /// Sends one fresh packet `mix` → `to` on `link`; true once `sink` received a packet.
    pub async fn forward_one(&self, link: &mut Link, mix: &str, to: &str, sink: &mut Sink) -> bool {
        let p = self.packet(
            &[mix, to],
            KeyBytes(rand::random()),
            b"one",
            &[Duration::ZERO; 2],
        );
        link.send_packet(&p).await.is_ok() && sink.next(Duration::from_secs(10)).await.is_some()
    }

    /// Sends fresh packets `mix` → `to` on `link` until one reaches `sink` (at most 100).
    pub async fn send_until_received(
        &self,
        link: &mut Link,
        mix: &str,
        to: &str,
        sink: &mut Sink,
    ) -> bool {
        for i in 0..100u32 {
            let p = self.packet(
                &[mix, to],
                KeyBytes([2; 32]),
                &i.to_be_bytes(),
                &[Duration::ZERO; 2],
            );
            if link.send_packet(&p).await.is_err() {
                return false;
            }
            if sink.next(Duration::from_millis(200)).await.is_some() {
                return true;
            }
        }
        false
    }
}

/// A client of `gateway` for tests: short delays, no cover, a short ack slack.
pub fn client_config(
    topology: &std::path::Path,
    gateway: nym_node::keys::NodeId,
) -> nym_node::client::ClientConfig {
    nym_node::client::ClientConfig {
        topology: topology.display().to_string(),
        gateway: Some(gateway),
        mean_delay: Duration::from_millis(10),
        cover_rate: 0.0,
        ack_slack: Duration::from_millis(800),
        ..nym_node::client::ClientConfig::default()
    }
}

/// Waits for `Delivered` (acknowledged) events for `n` messages.
pub async fn acknowledged(c: &mut nym_node::client::MixClient, n: usize, t: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + t;
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout_at(deadline, c.next_event()).await {
            Ok(Some(nym_node::client::Event::Delivered { .. })) => acked += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    acked
}

/// An exit's network requester address (none for other modes).
pub fn requester_of(mode: Mode, keys: &NodeKeys) -> Option<String> {
    (mode == Mode::ExitGateway)
        .then(|| nym_node::exit::network_requester::address(&keys.identity).to_string())
}

/// The node's own signed statement of `public` in `mode`, as its description carries it.
pub fn statement_of(
    keys: &NodeKeys,
    public: &nym_node::keys::PublicKeys,
    mode: Mode,
) -> nym_node::statement::SignedStatement {
    nym_node::statement::NodeStatement {
        network_requester: requester_of(mode, keys),
        ..nym_node::statement::NodeStatement::of(public, mode)
    }
    .sign(&keys.identity)
}

/// Keys for `nodes` (as the localnet makes them) and a topology listing all of them, written
/// by the test from the key files it made rather than by a directory asking running nodes:
/// for tests that list nodes they never start, or want the document before any node runs.
/// Nodes keep their keys for the test's length (the default hour-long epochs).
pub fn prepare_from_keys(
    nodes: &[nym_node::localnet::LocalNode],
    dir: &std::path::Path,
) -> PathBuf {
    let path = nym_node::localnet::prepare(nodes, dir).unwrap();
    let entries = nodes
        .iter()
        .map(|node| {
            let keys = NodeKeys::load(&node.dir.join("keys")).unwrap();
            let public = keys.public();
            NodeEntry {
                name: node.name.clone(),
                identity_key: public.identity_key,
                sphinx_keys: public.sphinx_keys.clone(),
                noise_key: public.noise_key,
                mode: node.mode,
                layer: node.layer,
                mixnet_address: node.mixnet.to_string().parse().unwrap(),
                client_address: node
                    .mode
                    .is_gateway()
                    .then(|| node.client.to_string().parse().unwrap()),
                http_address: Some(node.http.to_string().parse().unwrap()),
                network_requester: requester_of(node.mode, &keys),
                ip_packet_router: None,
                serving: true,
                statement: statement_of(&keys, &public, node.mode),
            }
        })
        .collect();
    let doc = TopologyDocument::issue(1, entries);
    let signer = nym_node::localnet::directory_identity(dir).unwrap();
    std::fs::write(
        &path,
        nym_node::topology::sign_document(&doc, &signer).unwrap(),
    )
    .unwrap();
    path
}
