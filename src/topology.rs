//! Who the peers are: the topology document (see `docs/protocol.md`), validated and
//! indexed, loaded from a file or an http(s) URL and reloaded in the background.
//! A bad document is logged and the last good one is kept.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::keys::{KeyBytes, NodeId};
use crate::metrics::Metrics;

/// The schema version this node reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Number of mix layers a route crosses.
pub const MIX_LAYERS: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("parsing topology: {0}")]
    Parse(String),
    #[error("invalid topology: {0}")]
    Invalid(String),
    #[error("{0}: larger than {MAX_DOCUMENT_BYTES} bytes; refused")]
    TooLarge(String),
    #[error("revision {got} is older than the current {have}; keeping the current document")]
    OlderRevision { got: u64, have: u64 },
}

/// Largest topology document read (about 10,000 nodes); a larger one is refused unread, so
/// a broken or hostile source cannot exhaust memory.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// The document as written on disk or served over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopologyDocument {
    /// Schema version; this node reads [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Increases with every change; lets readers tell documents apart.
    pub revision: u64,
    pub nodes: Vec<NodeEntry>,
}

/// One node of the network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Human-readable name (not used for routing).
    pub name: String,
    pub identity_key: NodeId,
    pub sphinx_key: KeyBytes,
    pub noise_key: KeyBytes,
    pub mode: Mode,
    /// Mix layer 1..=3; absent for gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u8>,
    /// `host:port` of the Noise mixnet listener; the host may be a DNS name.
    pub mixnet_address: PeerAddress,
    /// `host:port` of the client WebSocket API (gateways only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<PeerAddress>,
    /// `host:port` of the HTTP API, for operators and tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_address: Option<PeerAddress>,
    /// Exit gateways: the client address (`IDENTITY.ENCRYPTION@GATEWAY`) of the network
    /// requester that carries SOCKS5 streams out of the mixnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_requester: Option<String>,
    /// Whether clients should route through this node. Draining nodes are `false` but stay
    /// listed so packets already in flight still find them.
    #[serde(default = "yes")]
    pub serving: bool,
}

fn yes() -> bool {
    true
}

/// A `host:port` pair whose host is a DNS name or an IP literal (`[v6]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddress {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for PeerAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}' is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{s}' has no valid port"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || (host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err()) {
            return Err(format!("'{s}' has no valid host"));
        }
        Ok(PeerAddress {
            host: host.to_string(),
            port,
        })
    }
}

impl Serialize for PeerAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PeerAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A validated, indexed topology.
#[derive(Debug)]
pub struct Topology {
    document: TopologyDocument,
    by_identity: HashMap<NodeId, usize>,
    by_noise_key: HashMap<KeyBytes, usize>,
}

impl Topology {
    pub fn from_document(document: TopologyDocument) -> Result<Self, TopologyError> {
        if document.schema != SCHEMA_VERSION {
            return Err(TopologyError::Invalid(format!(
                "schema {} is not supported (this node reads {SCHEMA_VERSION})",
                document.schema
            )));
        }
        let mut by_identity = HashMap::new();
        let mut by_noise_key = HashMap::new();
        for (i, node) in document.nodes.iter().enumerate() {
            match (node.mode, node.layer) {
                (Mode::Mixnode, Some(l)) if (1..=MIX_LAYERS).contains(&l) => {}
                (Mode::Mixnode, _) => {
                    return Err(TopologyError::Invalid(format!(
                        "mix node {} needs a layer between 1 and {MIX_LAYERS}",
                        node.name
                    )));
                }
                (_, Some(_)) => {
                    return Err(TopologyError::Invalid(format!(
                        "gateway {} must not have a layer",
                        node.name
                    )));
                }
                (_, None) => {}
            }
            if by_identity.insert(node.identity_key, i).is_some() {
                return Err(TopologyError::Invalid(format!(
                    "identity key of {} appears twice",
                    node.name
                )));
            }
            if by_noise_key.insert(node.noise_key, i).is_some() {
                return Err(TopologyError::Invalid(format!(
                    "noise key of {} appears twice",
                    node.name
                )));
            }
        }
        Ok(Topology {
            document,
            by_identity,
            by_noise_key,
        })
    }

    pub fn parse(json: &[u8]) -> Result<Self, TopologyError> {
        let doc: TopologyDocument =
            serde_json::from_slice(json).map_err(|e| TopologyError::Parse(e.to_string()))?;
        Self::from_document(doc)
    }

    pub fn document(&self) -> &TopologyDocument {
        &self.document
    }

    pub fn revision(&self) -> u64 {
        self.document.revision
    }

    pub fn nodes(&self) -> &[NodeEntry] {
        &self.document.nodes
    }

    pub fn node(&self, id: &NodeId) -> Option<&NodeEntry> {
        self.by_identity.get(id).map(|i| &self.document.nodes[*i])
    }

    pub fn node_by_noise_key(&self, key: &KeyBytes) -> Option<&NodeEntry> {
        self.by_noise_key.get(key).map(|i| &self.document.nodes[*i])
    }

    /// Serving mix nodes of one layer.
    pub fn serving_layer(&self, layer: u8) -> impl Iterator<Item = &NodeEntry> {
        self.document
            .nodes
            .iter()
            .filter(move |n| n.serving && n.mode == Mode::Mixnode && n.layer == Some(layer))
    }

    /// Serving gateways (entry or exit).
    pub fn serving_gateways(&self) -> impl Iterator<Item = &NodeEntry> {
        self.document
            .nodes
            .iter()
            .filter(|n| n.serving && n.mode.is_gateway())
    }
}

/// Where the document comes from.
#[derive(Debug, Clone)]
pub enum TopologySource {
    File(PathBuf),
    Http(String),
}

impl TopologySource {
    pub fn parse(raw: &str) -> Self {
        if raw.starts_with("http://") || raw.starts_with("https://") {
            TopologySource::Http(raw.to_string())
        } else {
            TopologySource::File(PathBuf::from(raw))
        }
    }

    pub async fn load(&self) -> Result<Topology, TopologyError> {
        let bytes = match self {
            TopologySource::File(path) => {
                let name = path.display().to_string();
                let read = |e: std::io::Error| TopologyError::Read(name.clone(), e.to_string());
                let file = tokio::fs::File::open(path).await.map_err(read)?;
                let mut bytes = Vec::new();
                // One byte more than allowed tells an oversized file without reading it all.
                tokio::io::AsyncReadExt::read_to_end(
                    &mut tokio::io::AsyncReadExt::take(file, MAX_DOCUMENT_BYTES as u64 + 1),
                    &mut bytes,
                )
                .await
                .map_err(read)?;
                if bytes.len() > MAX_DOCUMENT_BYTES {
                    return Err(TopologyError::TooLarge(name));
                }
                bytes
            }
            TopologySource::Http(url) => fetch(url).await?,
        };
        Topology::parse(&bytes)
    }
}

impl fmt::Display for TopologySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologySource::File(p) => write!(f, "{}", p.display()),
            TopologySource::Http(u) => f.write_str(u),
        }
    }
}

/// Fetches a document over http(s) (also the exit policy's source).
pub(crate) async fn fetch(url: &str) -> Result<Vec<u8>, TopologyError> {
    let read_err = |e: reqwest::Error| TopologyError::Read(url.to_string(), e.to_string());
    // rustls needs its process-wide provider chosen once; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(read_err)?;
    let response = client.get(url).send().await.map_err(read_err)?;
    let mut response = response.error_for_status().map_err(read_err)?;
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(read_err)? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(TopologyError::TooLarge(url.to_string()));
        }
    }
    Ok(bytes)
}

/// The current topology, shared by every part of the node; lock-free to read. Parts that
/// must act when it changes (links of peers that left) watch [`TopologyHandle::changes`].
#[derive(Clone)]
pub struct TopologyHandle(Arc<HandleInner>);

struct HandleInner {
    current: ArcSwapOption<Topology>,
    /// Bumped on every store.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for TopologyHandle {
    fn default() -> Self {
        TopologyHandle(Arc::new(HandleInner {
            current: ArcSwapOption::empty(),
            version: tokio::sync::watch::Sender::new(0),
        }))
    }
}

impl TopologyHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(topology: Topology) -> Self {
        let h = Self::new();
        h.store(topology);
        h
    }

    pub fn current(&self) -> Option<Arc<Topology>> {
        self.0.current.load_full()
    }

    pub fn is_loaded(&self) -> bool {
        self.0.current.load().is_some()
    }

    pub fn store(&self, topology: Topology) {
        self.0.current.store(Some(Arc::new(topology)));
        self.0.version.send_modify(|v| *v += 1);
    }

    /// Whether `id` is in the current topology (cheap: no reference count taken, as the
    /// egress path asks this for every packet).
    pub fn contains(&self, id: &NodeId) -> bool {
        self.0
            .current
            .load()
            .as_ref()
            .is_some_and(|t| t.node(id).is_some())
    }

    /// Fires (`changed().await`) after every store.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.version.subscribe()
    }
}

/// Keeps `handle` up to date with `source` until `stop` fires. The first load is retried
/// every `interval` until it succeeds (the node is not ready before that).
pub async fn refresh_loop(
    source: TopologySource,
    handle: TopologyHandle,
    interval: Duration,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
) {
    let mut last_error: Option<String> = None;
    loop {
        let span = tracing::info_span!("topology_reload", source = %source);
        let result = {
            let _enter = span.enter();
            source.load()
        }
        .await
        .and_then(|t| match handle.current() {
            // Documents only move forward: an older one (a stale cache, a replay) is refused.
            Some(now) if t.revision() < now.revision() => Err(TopologyError::OlderRevision {
                got: t.revision(),
                have: now.revision(),
            }),
            _ => Ok(t),
        });
        match result {
            Ok(topology) => {
                if let Some(m) = &metrics {
                    m.topology_reloads_ok.inc();
                    m.topology_nodes.set(topology.nodes().len() as i64);
                }
                let changed = handle
                    .current()
                    .is_none_or(|old| old.document() != topology.document());
                if changed {
                    tracing::info!(
                        parent: &span,
                        revision = topology.revision(),
                        nodes = topology.nodes().len(),
                        "topology loaded"
                    );
                    handle.store(topology);
                }
                last_error = None;
            }
            Err(e) => {
                if let Some(m) = &metrics {
                    m.topology_reloads_failed.inc();
                }
                let message = e.to_string();
                // Log each distinct failure once, not every refresh.
                if last_error.as_deref() != Some(message.as_str()) {
                    if handle.is_loaded() {
                        tracing::warn!(parent: &span, error = %message, "topology reload failed; keeping the last good document");
                    } else {
                        tracing::warn!(parent: &span, error = %message, "topology not loaded yet; retrying");
                    }
                    last_error = Some(message);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, seed: u8, mode: Mode, layer: Option<u8>) -> NodeEntry {
        NodeEntry {
            name: name.into(),
            identity_key: KeyBytes([seed; 32]),
            sphinx_key: KeyBytes([seed.wrapping_add(100); 32]),
            noise_key: KeyBytes([seed.wrapping_add(200); 32]),
            mode,
            layer,
            mixnet_address: "127.0.0.1:1789".parse().unwrap(),
            client_address: None,
            http_address: None,
            network_requester: None,
            serving: true,
        }
    }

    #[test]
    fn document_round_trips_and_indexes() {
        let doc = TopologyDocument {
            schema: 1,
            revision: 3,
            nodes: vec![
                entry("mix1", 1, Mode::Mixnode, Some(1)),
                entry("gw", 2, Mode::EntryGateway, None),
            ],
        };
        let json = serde_json::to_vec(&doc).unwrap();
        let t = Topology::parse(&json).unwrap();
        assert_eq!(t.node(&KeyBytes([1; 32])).unwrap().name, "mix1");
        assert_eq!(
            t.node_by_noise_key(&KeyBytes([202; 32])).unwrap().name,
            "gw"
        );
        assert_eq!(t.serving_layer(1).count(), 1);
        assert_eq!(t.serving_gateways().count(), 1);
    }

    #[test]
    fn invalid_documents_are_rejected_with_reason() {
        let mut doc = TopologyDocument {
            schema: 1,
            revision: 1,
            nodes: vec![entry("mix1", 1, Mode::Mixnode, None)],
        };
        let err = Topology::from_document(doc.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a layer"), "{err}");
        doc.nodes = vec![
            entry("a", 1, Mode::Mixnode, Some(1)),
            entry("b", 1, Mode::Mixnode, Some(2)),
        ];
        let err = Topology::from_document(doc.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("appears twice"), "{err}");
        doc.schema = 9;
        assert!(Topology::from_document(doc).is_err());
        assert!(Topology::parse(b"{not json").is_err());
    }

    #[test]
    fn peer_addresses_parse_names_and_ips() {
        let a: PeerAddress = "mix-1.mix.svc:1789".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("mix-1.mix.svc", 1789));
        let b: PeerAddress = "[::1]:9000".parse().unwrap();
        assert_eq!(b.host, "::1");
        assert_eq!(b.to_string(), "[::1]:9000");
        assert!("nohost".parse::<PeerAddress>().is_err());
        assert!("host:99999".parse::<PeerAddress>().is_err());
    }

    #[tokio::test]
    async fn bad_reload_keeps_last_good_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let doc = TopologyDocument {
            schema: 1,
            revision: 1,
            nodes: vec![entry("mix1", 1, Mode::Mixnode, Some(1))],
        };
        std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
        let handle = TopologyHandle::new();
        let metrics = Metrics::new("mixnode");
        let stop = CancellationToken::new();
        let task = tokio::spawn(refresh_loop(
            TopologySource::File(path.clone()),
            handle.clone(),
            Duration::from_millis(20),
            Some(metrics.clone()),
            stop.clone(),
        ));
        while !handle.is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::write(&path, b"{ broken").unwrap();
        while metrics.topology_reloads_failed.get() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(handle.current().unwrap().revision(), 1);
        let mut doc2 = doc.clone();
        doc2.revision = 2;
        std::fs::write(&path, serde_json::to_vec(&doc2).unwrap()).unwrap();
        while handle.current().unwrap().revision() != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        task.await.unwrap();
    }
}
