//! Load generation for the benchmarks (`cargo bench --bench forward`, `--bench load`).
//!
//! One mix node runs as its own process; this process plays both its neighbours: N Noise
//! links into the node as topology peers (the previous hop), and a counting sink as the next
//! hop. Packets are real Sphinx packets (2048-byte payload, route node → sink, zero delay),
//! built before the run, and each link's frames are encrypted before its clock starts, so
//! during a run the generator only writes bytes and the sink only decrypts and counts: the
//! CPU the node gets is not eaten by packet building. The node's CPU time per forwarded
//! packet comes from `/proc/<pid>/stat`; the floor is the raw `sphinx-packet` unwrap of the
//! same packets, single-threaded, measured in the same run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::packet;
use crate::client::route::Hop;
use crate::config::Mode;
use crate::keys::{KeyBytes, NodeKeys};
use crate::mixnet::framing::{self, FRAME_CIPHERTEXT_LEN, FRAME_PLAINTEXT_LEN, WIRE_FRAME_LEN};
use crate::mixnet::noise;
use crate::mixnet::sphinx::{PACKET_SIZE, PacketBytes};
use crate::topology::{NodeEntry, TopologyDocument};

/// Every `LATENCY_SAMPLE`-th packet is followed through the node for latency.
pub const LATENCY_SAMPLE: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("load generator: {0}")]
pub struct LoadError(String);

fn err(e: impl std::fmt::Display) -> LoadError {
    LoadError(e.to_string())
}

/// Keys, ports and topology of the node under test, its peers and the sink.
pub struct Setup {
    pub dir: PathBuf,
    pub topology: PathBuf,
    pub node: NodeKeys,
    pub node_mixnet: SocketAddr,
    pub node_http: SocketAddr,
    pub peers: Vec<NodeKeys>,
    pub sink: NodeKeys,
    sink_listener: Option<std::net::TcpListener>,
    pub sink_addr: SocketAddr,
    /// The bearer token the node under test serves `/metrics` to.
    pub metrics_token: String,
}

fn free_addr() -> Result<SocketAddr, LoadError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
    l.local_addr().map_err(err)
}

fn entry(name: &str, keys: &NodeKeys, layer: u8, addr: SocketAddr) -> Result<NodeEntry, LoadError> {
    let p = keys.public();
    Ok(NodeEntry {
        name: name.into(),
        identity_key: p.identity_key,
        sphinx_keys: p.sphinx_keys.clone(),
        noise_key: p.noise_key,
        mode: Mode::Mixnode,
        layer: Some(layer),
        mixnet_address: addr.to_string().parse().map_err(err)?,
        client_address: None,
        http_address: None,
        network_requester: None,
        ip_packet_router: None,
        serving: true,
        statement: crate::statement::NodeStatement::of(&p, Mode::Mixnode).sign(&keys.identity),
    })
}

impl Setup {
    /// Creates keys for the node, `peers` peers and the sink under `dir`, and the topology.
    pub fn new(dir: &Path, peers: usize) -> Result<Setup, LoadError> {
        // The node runs with the default rotation; the topology lists this epoch and the next.
        let rotation = crate::config::Config::default().key_rotation_interval.get();
        let node = NodeKeys::generate(rotation).map_err(err)?;
        node.write(&dir.join("node-keys")).map_err(err)?;
        let sink = NodeKeys::generate(rotation).map_err(err)?;
        let peers: Vec<NodeKeys> = (0..peers)
            .map(|_| NodeKeys::generate(rotation))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let sink_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
        let sink_addr = sink_listener.local_addr().map_err(err)?;
        let node_mixnet = free_addr()?;
        let node_http = free_addr()?;
        let mut nodes = vec![
            entry("node", &node, 1, node_mixnet)?,
            entry("sink", &sink, 2, sink_addr)?,
        ];
        for (i, p) in peers.iter().enumerate() {
            // Peers only dial; their address is never used.
            nodes.push(entry(
                &format!("peer-{i}"),
                p,
                1,
                "127.0.0.1:9".parse().map_err(err)?,
            )?);
        }
        let topology = dir.join("topology.json");
        let doc = TopologyDocument::issue(1, nodes);
        std::fs::write(&topology, serde_json::to_vec(&doc).map_err(err)?).map_err(err)?;
        Ok(Setup {
            dir: dir.to_path_buf(),
            topology,
            node,
            node_mixnet,
            node_http,
            peers,
            sink,
            sink_listener: Some(sink_listener),
            sink_addr,
            metrics_token: crate::keys::random_token().map_err(err)?,
        })
    }

    fn route(&self) -> Vec<Hop> {
        [&self.node, &self.sink]
            .iter()
            .map(|k| {
                let p = k.public();
                Hop {
                    identity: p.identity_key,
                    sphinx_keys: p.sphinx_keys.clone(),
                }
            })
            .collect()
    }

    /// Builds `n` packets node → sink with zero delay, on `threads` threads.
    pub fn build_packets(&self, n: usize, threads: usize) -> Vec<PacketBytes> {
        self.build_packets_delayed(n, threads, Duration::ZERO)
    }

    /// Like [`build_packets`](Self::build_packets), each asking the node to hold it `delay`.
    pub fn build_packets_delayed(
        &self,
        n: usize,
        threads: usize,
        delay: Duration,
    ) -> Vec<PacketBytes> {
        let route = self.route();
        let dest = KeyBytes([7u8; 32]);
        let threads = threads.max(1);
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let route = route.clone();
                    s.spawn(move || {
                        let count = per.min(n.saturating_sub(t * per));
                        (0..count)
                            .filter_map(|i| {
                                let body = ((t * per + i) as u64).to_be_bytes();
                                packet::build_forward(
                                    &route,
                                    &dest,
                                    &body,
                                    &[delay, Duration::ZERO],
                                )
                                .ok()
                                .map(|(_, p)| p)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    /// The floor: raw `sphinx-packet` forward-hop unwrap, one thread, of every
    /// [`LATENCY_SAMPLE`]-th packet (the ones followed for latency). Returns the time per
    /// unwrap and, for each of those packets, what the node will send on (its next group
    /// element), so the sink can recognise it.
    pub fn unwrap_floor(&self, packets: &[PacketBytes]) -> (Duration, HashMap<[u8; 32], usize>) {
        let seed = &self.node.sphinx;
        let Some(key) = seed.key(seed.schedule().epoch_at(crate::keys::unix_ms())) else {
            return (Duration::ZERO, HashMap::new());
        };
        let secret = key.secret().clone();
        let mut expected = HashMap::new();
        let start = Instant::now();
        let mut done = 0u32;
        for (i, p) in packets.iter().enumerate().step_by(LATENCY_SAMPLE) {
            let Ok(packet) = sphinx_packet::SphinxPacket::from_bytes(&p[..]) else {
                continue;
            };
            if let Ok(processed) = packet.process(&secret) {
                done += 1;
                if let sphinx_packet::ProcessedPacketData::ForwardHop {
                    next_hop_packet, ..
                } = processed.data
                {
                    expected.insert(*next_hop_packet.header.shared_secret.as_bytes(), i);
                }
            }
        }
        let per = start.elapsed() / done.max(1);
        (per, expected)
    }

    /// Starts the node under test as a child process and waits until it is ready. Its data
    /// directory starts empty every time: the node keeps its replay filters across restarts,
    /// and the same pre-built packets are sent to each run.
    pub fn spawn_node(
        &self,
        exe: &Path,
        extra_env: &[(&str, String)],
    ) -> Result<NodeProcess, LoadError> {
        let data = self.dir.join("node-data");
        if data.exists() {
            std::fs::remove_dir_all(&data).map_err(err)?;
        }
        let log = std::fs::File::create(self.dir.join("node.log")).map_err(err)?;
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .env_clear()
            .env("NYM_NODE_ID", "node-under-test")
            .env("NYM_NODE_TOPOLOGY", &self.topology)
            .env("NYM_NODE_KEYS_DIR", self.dir.join("node-keys"))
            .env("NYM_NODE_DATA_DIR", &data)
            .env("NYM_NODE_MIXNET_BIND", self.node_mixnet.to_string())
            .env("NYM_NODE_HTTP_BIND", self.node_http.to_string())
            .env("NYM_NODE_LOG_LEVEL", "warn")
            .env("NYM_NODE_METRICS_TOKEN", &self.metrics_token)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(err)?;
        let process = NodeProcess { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.node_mixnet).is_ok()
                && http_status(self.node_http, "/readyz") == Some(200)
            {
                return Ok(process);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(LoadError("node under test did not become ready".into()))
    }

    /// Takes the sink's listening socket (once).
    pub fn sink_listener(&mut self) -> Result<TcpListener, LoadError> {
        let l = self
            .sink_listener
            .take()
            .ok_or_else(|| LoadError("sink already started".into()))?;
        l.set_nonblocking(true).map_err(err)?;
        TcpListener::from_std(l).map_err(err)
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// Fetches a node's metrics exposition, presenting `token`.
pub fn scrape(addr: SocketAddr, token: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.split_once("\r\n\r\n")?.1.to_string())
}

/// Non-zero `nym_node_packets_dropped_total` series, as `reason=count` pairs.
pub fn drops(addr: SocketAddr, token: &str) -> Vec<(String, u64)> {
    let Some(text) = scrape(addr, token) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("nym_node_packets_dropped_total{reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            let v: f64 = value.trim().parse().ok()?;
            (v > 0.0).then(|| (reason.to_string(), v as u64))
        })
        .collect()
}

/// The node under test.
pub struct NodeProcess {
    child: Child,
}

impl NodeProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.child.id()).unwrap_or_default()
    }

    /// CPU time of the Sphinx worker threads and of everything else (the async runtime:
    /// Noise, sockets, forwarder).
    pub fn cpu_split(&self) -> (Duration, Duration) {
        let mut workers = Duration::ZERO;
        let mut rest = Duration::ZERO;
        for (name, t) in thread_cpu_times(self.child.id()) {
            if name.starts_with("sphinx-") {
                workers += t;
            } else {
                rest += t;
            }
        }
        (workers, rest)
    }

    /// SIGTERM, then wait (SIGKILL after 10 s).
    pub fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU time of a process's threads, summed by thread name (e.g. `sphinx-0`, `nym-node`).
pub fn thread_cpu_times(pid: u32) -> HashMap<String, Duration> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if let Some(t) = stat_cpu(&path.join("stat").display().to_string()) {
            *out.entry(name).or_default() += t;
        }
    }
    out
}

fn stat_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// What the sink saw.
#[derive(Default)]
pub struct SinkStats {
    pub received: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

impl SinkStats {
    pub fn take_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.latencies.lock())
    }
}

/// Send times of packets, by index, in nanoseconds since `epoch` (0 = not sent).
pub struct SendTimes {
    epoch: Instant,
    times: Vec<AtomicU64>,
}

impl SendTimes {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(SendTimes {
            epoch: Instant::now(),
            times: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn mark(&self, i: usize) {
        if let Some(t) = self.times.get(i) {
            t.store(
                self.epoch.elapsed().as_nanos() as u64 + 1,
                Ordering::Relaxed,
            );
        }
    }

    fn since(&self, i: usize) -> Option<Duration> {
        let t = self.times.get(i)?.load(Ordering::Relaxed);
        (t != 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(t - 1))
        })
    }
}

/// Accepts links from the node and counts (and, for sampled packets, times) what arrives.
pub async fn run_sink(
    listener: TcpListener,
    sink: NodeKeys,
    known: Vec<KeyBytes>,
    expected: Arc<HashMap<[u8; 32], usize>>,
    sent: Arc<SendTimes>,
    stats: Arc<SinkStats>,
) {
    let secret = sink.noise.secret_bytes();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let (known, expected, sent, stats) =
            (known.clone(), expected.clone(), sent.clone(), stats.clone());
        tokio::spawn(async move {
            let Ok((mut rx, _)) =
                noise::respond_to(&mut stream, &secret, Duration::from_secs(5), &known).await
            else {
                return;
            };
            let mut buf = vec![0u8; 64 * WIRE_FRAME_LEN];
            let mut filled = 0;
            let mut plain = [0u8; FRAME_PLAINTEXT_LEN];
            loop {
                let n = match stream.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                filled += n;
                let mut at = 0;
                while let Ok(Some(body)) =
                    framing::next_frame(&buf[at..filled], FRAME_CIPHERTEXT_LEN, true)
                {
                    if rx.decrypt(body, &mut plain).is_err() {
                        return;
                    }
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let mut alpha = [0u8; 32];
                    alpha.copy_from_slice(&plain[2..34]);
                    if let Some(i) = expected.get(&alpha)
                        && let Some(l) = sent.since(*i)
                    {
                        stats.latencies.lock().push(l);
                    }
                    at += WIRE_FRAME_LEN;
                }
                buf.copy_within(at..filled, 0);
                filled -= at;
            }
        });
    }
}

/// One Noise link into the node with its frames encrypted in advance.
pub struct PreparedLink {
    stream: TcpStream,
    /// Encrypted frames, in order, and the index of the packet each carries.
    wire: Vec<u8>,
    indices: Vec<usize>,
}

/// Opens `peers.len()` links and encrypts packets `start..end` round-robin across them.
pub async fn prepare_links(
    setup: &Setup,
    packets: &[PacketBytes],
    range: std::ops::Range<usize>,
) -> Result<Vec<PreparedLink>, LoadError> {
    let mut links = Vec::new();
    for peer in &setup.peers {
        let mut stream = TcpStream::connect(setup.node_mixnet).await.map_err(err)?;
        let _ = stream.set_nodelay(true);
        let sender = noise::initiate(
            &mut stream,
            &peer.noise.secret_bytes(),
            &setup.node.public().noise_key,
            Duration::from_secs(5),
        )
        .await
        .map_err(err)?;
        links.push((stream, sender, Vec::new(), Vec::new()));
    }
    let n = links.len().max(1);
    let mut plain = [0u8; FRAME_PLAINTEXT_LEN];
    for i in range {
        let (_, sender, wire, indices) = &mut links[i % n];
        let Some(p) = packets.get(i) else { break };
        let p: &[u8; PACKET_SIZE] = p;
        sender.encrypt_packet(p, &mut plain, wire).map_err(err)?;
        indices.push(i);
    }
    Ok(links
        .into_iter()
        .map(|(stream, _, wire, indices)| PreparedLink {
            stream,
            wire,
            indices,
        })
        .collect())
}

/// How fast to send.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Packets per second in total, each packet at its own time (i / rate), round-robin over
    /// the links: arrivals are smooth, not bursts per timer tick.
    Rate(f64),
    /// As fast as possible while at most this many packets are in flight (sent, not yet at the sink).
    Window(u64),
}

/// Sends every prepared frame; returns when all are written.
pub async fn send(
    links: Vec<PreparedLink>,
    pace: Pace,
    sent: Arc<SendTimes>,
    sink: Arc<SinkStats>,
    counter: Arc<AtomicU64>,
) {
    match pace {
        Pace::Rate(rate) => {
            // tokio's timers tick in milliseconds; a thread of its own paces to the microsecond.
            let _ =
                tokio::task::spawn_blocking(move || send_paced(links, rate, &sent, &counter)).await;
        }
        Pace::Window(window) => send_windowed(links, window, sent, sink, counter).await,
    }
}

fn send_paced(links: Vec<PreparedLink>, rate: f64, sent: &SendTimes, counter: &AtomicU64) {
    use std::io::Write;
    let mut streams = Vec::new();
    for link in links {
        let Ok(std_stream) = link.stream.into_std() else {
            return;
        };
        if std_stream.set_nonblocking(false).is_err() {
            return;
        }
        streams.push((std_stream, link.wire, link.indices, 0usize));
    }
    let total: usize = streams.iter().map(|s| s.2.len()).sum();
    let start = Instant::now();
    let mut k = 0;
    while k < total {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        // Sleep only for gaps worth a context switch; packets due within the next 100 µs
        // go out now (arrivals stay smooth at the 0.1 ms scale without a wake-up per packet).
        if due > now + Duration::from_micros(100) {
            std::thread::sleep(due - now);
        }
        let horizon = start.elapsed() + Duration::from_micros(100);
        while k < total && Duration::from_secs_f64(k as f64 / rate) <= horizon {
            let n = streams.len();
            let (stream, wire, indices, done) = &mut streams[k % n];
            k += 1;
            let Some(i) = indices.get(*done) else {
                continue;
            };
            if i % LATENCY_SAMPLE == 0 {
                sent.mark(*i);
            }
            if stream
                .write_all(&wire[*done * WIRE_FRAME_LEN..(*done + 1) * WIRE_FRAME_LEN])
                .is_err()
            {
                return;
            }
            *done += 1;
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn send_windowed(
    links: Vec<PreparedLink>,
    window: u64,
    sent: Arc<SendTimes>,
    sink: Arc<SinkStats>,
    counter: Arc<AtomicU64>,
) {
    let mut tasks = Vec::new();
    for mut link in links {
        let (sent, sink, counter) = (sent.clone(), sink.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let frames = link.indices.len();
            let mut done = 0usize;
            while done < frames {
                let in_flight = counter
                    .load(Ordering::Relaxed)
                    .saturating_sub(sink.received.load(Ordering::Relaxed));
                if in_flight >= window {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    continue;
                }
                let upto = (done + 16).min(frames);
                for i in &link.indices[done..upto] {
                    if i % LATENCY_SAMPLE == 0 {
                        sent.mark(*i);
                    }
                }
                let bytes = &link.wire[done * WIRE_FRAME_LEN..upto * WIRE_FRAME_LEN];
                if link.stream.write_all(bytes).await.is_err() {
                    return;
                }
                counter.fetch_add((upto - done) as u64, Ordering::Relaxed);
                done = upto;
            }
            let _ = link.stream.flush().await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// p-th percentile of `v` (sorted in place).
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Finds `nym-node` next to the running benchmark or test binary (`target/<profile>/`).
pub fn node_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("nym-node"), dir.parent()?.join("nym-node")]
        .into_iter()
        .find(|p| p.exists())
}
