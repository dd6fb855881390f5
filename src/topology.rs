//! Who the peers are: the topology document (see `docs/protocol.md`), validated and
//! indexed, loaded from a file or an http(s) URL and reloaded in the background.
//! A bad document is logged and the last good one is kept.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::keys::{EpochKey, KeyBytes, NodeId};
use crate::metrics::Metrics;
use crate::statement::SignedStatement;

/// The schema version this node reads and writes.
pub const SCHEMA_VERSION: u32 = 3;

/// How long a document is valid from its issue. Its producer signs a new revision once half
/// of it has passed, so readers that miss a few re-signings still hold a valid one.
pub const DOCUMENT_VALIDITY: Duration = Duration::from_secs(3600);

/// How far ahead of a reader's clock a document's `issued_at` may be (clocks drift): one
/// issued later is refused, so nobody can sign today what takes effect next week.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

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
    #[error(
        "revision {revision} expired at {valid_until} (unix seconds; now {now}); keeping the last good document"
    )]
    Expired {
        revision: u64,
        valid_until: u64,
        now: u64,
    },
    #[error(
        "the entry of {0} lists keys, a mode or a requester that the node did not sign (its own statement says otherwise)"
    )]
    NotVouched(String),
    #[error("the document is not signed, and NYM_NODE_TOPOLOGY_SIGNER requires a signature by {0}")]
    Unsigned(KeyBytes),
    #[error("the document is signed by {got}, not by the configured directory {want}")]
    WrongSigner { got: KeyBytes, want: KeyBytes },
    #[error("the document's signature does not verify")]
    BadSignature,
    #[error(
        "{0}: a plain http:// source can be trusted only with a signed document; set NYM_NODE_TOPOLOGY_SIGNER (or use https://)"
    )]
    PlainHttpUnsigned(String),
}

/// What a directory signs: this prefix, then the document's exact bytes.
const SIGNING_CONTEXT: &[u8] = b"nym-node-rs/topology/1/";

/// A signed document as written: the document's compact JSON, verbatim, with who signed it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedEnvelope<'a> {
    signed_by: KeyBytes,
    /// base58 ed25519 signature over [`SIGNING_CONTEXT`] followed by the bytes of `document`.
    signature: String,
    #[serde(borrow)]
    document: &'a serde_json::value::RawValue,
}

/// Only to tell a signed document from a plain one.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    signature: Option<serde::de::IgnoredAny>,
}

/// Signs `document` with the directory key `signer`: the signed form readers verify.
pub fn sign_document(
    document: &TopologyDocument,
    signer: &crate::keys::Identity,
) -> Result<Vec<u8>, TopologyError> {
    let compact =
        serde_json::to_string(document).map_err(|e| TopologyError::Parse(e.to_string()))?;
    let mut message = SIGNING_CONTEXT.to_vec();
    message.extend_from_slice(compact.as_bytes());
    let raw = serde_json::value::RawValue::from_string(compact)
        .map_err(|e| TopologyError::Parse(e.to_string()))?;
    let envelope = SignedEnvelope {
        signed_by: signer.public(),
        signature: bs58::encode(signer.sign(&message)).into_string(),
        document: &raw,
    };
    serde_json::to_vec_pretty(&envelope).map_err(|e| TopologyError::Parse(e.to_string()))
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
    /// Increases with every change and every re-signing; readers never go back to a lower
    /// one (nodes and clients remember the highest across restarts).
    pub revision: u64,
    /// Unix seconds: when the directory signed this revision.
    pub issued_at: u64,
    /// Unix seconds: from here on readers refuse the document (and keep their last good one).
    pub valid_until: u64,
    pub nodes: Vec<NodeEntry>,
}

impl TopologyDocument {
    /// Revision `revision` listing `nodes`, issued now for [`DOCUMENT_VALIDITY`].
    pub fn issue(revision: u64, nodes: Vec<NodeEntry>) -> Self {
        let (issued_at, valid_until) = validity_from(unix_now());
        TopologyDocument {
            schema: SCHEMA_VERSION,
            revision,
            issued_at,
            valid_until,
            nodes,
        }
    }

    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.valid_until
    }

    /// Whether its producer should sign a new revision: half its validity has passed.
    pub fn due_for_resigning(&self, now: u64) -> bool {
        let half = self.valid_until.saturating_sub(self.issued_at) / 2;
        now >= self.issued_at.saturating_add(half)
    }
}

/// `(issued_at, valid_until)` for a document signed at `now` (unix seconds).
pub fn validity_from(now: u64) -> (u64, u64) {
    (now, now.saturating_add(DOCUMENT_VALIDITY.as_secs()))
}

/// The clock in unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One node of the network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Human-readable name (not used for routing).
    pub name: String,
    pub identity_key: NodeId,
    /// Sphinx keys with their windows (the current and the next epoch); a client encrypts
    /// each hop to the key valid when the packet reaches it.
    pub sphinx_keys: Vec<EpochKey>,
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
    /// Exit gateways running one: the client address of the IP packet router that carries
    /// `nym-client tun`'s packets out of the mixnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_packet_router: Option<String>,
    /// Whether clients should route through this node. Draining nodes are `false` but stay
    /// listed so packets already in flight still find them.
    #[serde(default = "yes")]
    pub serving: bool,
    /// The node's own signed statement of its keys, mode and requester, copied verbatim from
    /// its description: the fields above must say the same (readers check).
    pub statement: SignedStatement,
}

impl NodeEntry {
    /// Whether a client may route through it at `unix_ms`: one of its Sphinx keys is live or
    /// only just over. A node whose keys are all long over is listed from a stale statement
    /// (offline since, or replayed by a directory): its secrets are erased, so a packet
    /// could only be opened by whoever stole them then.
    pub fn routable_at(&self, unix_ms: u64) -> bool {
        crate::keys::key_at(&self.sphinx_keys, unix_ms).is_some()
    }

    /// Whether the keys, mode and requester listed are the ones the node itself signed.
    pub fn is_vouched_for(&self) -> bool {
        let s = &self.statement.statement;
        s.identity_key == self.identity_key
            && s.mode == self.mode
            && s.noise_key == self.noise_key
            && s.sphinx_keys == self.sphinx_keys
            && s.network_requester == self.network_requester
            && s.ip_packet_router == self.ip_packet_router
            && self.statement.verify()
    }
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
        if document.valid_until <= document.issued_at {
            return Err(TopologyError::Invalid(format!(
                "valid_until {} is not after issued_at {}",
                document.valid_until, document.issued_at
            )));
        }
        // A longer validity would let one signature (a key held for a moment) outlive
        // every re-signing.
        if document.valid_until - document.issued_at > DOCUMENT_VALIDITY.as_secs() {
            return Err(TopologyError::Invalid(format!(
                "valid for {} s, longer than the {} s directories sign for",
                document.valid_until - document.issued_at,
                DOCUMENT_VALIDITY.as_secs()
            )));
        }
        let mut by_identity = HashMap::new();
        let mut by_noise_key = HashMap::new();
        for (i, node) in document.nodes.iter().enumerate() {
            if !node.is_vouched_for() {
                return Err(TopologyError::NotVouched(node.name.clone()));
            }
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
            if node.sphinx_keys.is_empty() {
                return Err(TopologyError::Invalid(format!(
                    "{} lists no Sphinx key",
                    node.name
                )));
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

    /// Parses a plain or a signed document, without a directory to trust: a signed one
    /// must still verify under the key it names.
    pub fn parse(json: &[u8]) -> Result<Self, TopologyError> {
        Self::parse_signed(json, None)
    }

    /// Parses a document; with `signer`, only one signed by that directory key is accepted.
    pub fn parse_signed(json: &[u8], signer: Option<&KeyBytes>) -> Result<Self, TopologyError> {
        let parse = |e: serde_json::Error| TopologyError::Parse(e.to_string());
        let probe: Probe = serde_json::from_slice(json).map_err(parse)?;
        let doc: TopologyDocument = if probe.signature.is_some() {
            let envelope: SignedEnvelope = serde_json::from_slice(json).map_err(parse)?;
            if let Some(want) = signer
                && *want != envelope.signed_by
            {
                return Err(TopologyError::WrongSigner {
                    got: envelope.signed_by,
                    want: *want,
                });
            }
            let signature: [u8; 64] = bs58::decode(&envelope.signature)
                .into_vec()
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(TopologyError::BadSignature)?;
            let document = envelope.document.get().as_bytes();
            let mut message = SIGNING_CONTEXT.to_vec();
            message.extend_from_slice(document);
            if !crate::keys::verify_signature(&envelope.signed_by, &message, &signature) {
                return Err(TopologyError::BadSignature);
            }
            serde_json::from_slice(document).map_err(parse)?
        } else {
            if let Some(want) = signer {
                return Err(TopologyError::Unsigned(*want));
            }
            serde_json::from_slice(json).map_err(parse)?
        };
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

    /// Serving mix nodes of one layer (with a Sphinx key to route by: see
    /// [`NodeEntry::routable_now`]).
    pub fn serving_layer(&self, layer: u8) -> impl Iterator<Item = &NodeEntry> {
        let now = crate::keys::unix_ms();
        self.document.nodes.iter().filter(move |n| {
            n.serving && n.mode == Mode::Mixnode && n.layer == Some(layer) && n.routable_at(now)
        })
    }

    /// Serving gateways (entry or exit) with a Sphinx key to route by.
    pub fn serving_gateways(&self) -> impl Iterator<Item = &NodeEntry> {
        let now = crate::keys::unix_ms();
        self.document
            .nodes
            .iter()
            .filter(move |n| n.serving && n.mode.is_gateway() && n.routable_at(now))
    }

    /// A serving exit that runs the service `service` reads from its entry: the one
    /// `named` (by name or identity key), or one at random.
    pub fn choose_exit_service(
        &self,
        named: Option<&str>,
        service: impl Fn(&NodeEntry) -> Option<&str>,
    ) -> Option<&NodeEntry> {
        use rand::prelude::IndexedRandom;
        let exits: Vec<_> = self
            .serving_gateways()
            .filter(|n| service(n).is_some())
            .filter(|n| named.is_none_or(|x| n.name == x || n.identity_key.to_string() == x))
            .collect();
        exits.choose(&mut rand::rng()).copied()
    }
}

/// Where the document comes from, whose signature it must carry, and where the last good
/// one is kept.
#[derive(Debug, Clone)]
pub struct TopologySource {
    location: Location,
    signer: Option<KeyBytes>,
    memory: Option<Arc<Memory>>,
}

/// The last good document, kept in a file: a restart starts from it and never accepts a
/// lower revision (an old signed document replayed by a cache or an attacker).
#[derive(Debug)]
struct Memory {
    path: PathBuf,
    /// The revision in the file; None before anything was read or written.
    floor: parking_lot::Mutex<Option<u64>>,
}

#[derive(Debug, Clone)]
enum Location {
    File(PathBuf),
    Http(String),
}

impl TopologySource {
    /// A file path or an http(s) URL; no directory key (see [`signed_by`](Self::signed_by)).
    pub fn parse(raw: &str) -> Self {
        let location = if raw.starts_with("http://") || raw.starts_with("https://") {
            Location::Http(raw.to_string())
        } else {
            Location::File(PathBuf::from(raw))
        };
        TopologySource {
            location,
            signer: None,
            memory: None,
        }
    }

    /// Keeps the last good document in `path` (see [`Memory`]); None keeps nothing.
    pub fn remembered_in(mut self, path: Option<PathBuf>) -> Self {
        self.memory = path.map(|path| {
            Arc::new(Memory {
                path,
                floor: parking_lot::Mutex::new(None),
            })
        });
        self
    }

    /// The remembered document, verified as a fetched one is (its expiry is the caller's
    /// to judge); from now on no lower revision is accepted.
    pub fn remembered(&self) -> Option<Topology> {
        let memory = self.memory.as_ref()?;
        let bytes = match std::fs::read(&memory.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %memory.path.display(), error = %e, "cannot read the remembered topology");
                return None;
            }
        };
        match Topology::parse_signed(&bytes, self.signer.as_ref()) {
            Ok(t) => {
                let mut floor = memory.floor.lock();
                *floor = Some(floor.unwrap_or(0).max(t.revision()));
                Some(t)
            }
            Err(e) => {
                tracing::warn!(path = %memory.path.display(), error = %e, "the remembered topology is not usable; ignoring it");
                None
            }
        }
    }

    /// Loads the document, or (the source out of reach, or serving something refused) the
    /// remembered one while it is valid: a client started during a directory outage.
    pub async fn load_or_remembered(&self) -> Result<Topology, TopologyError> {
        match self.load().await {
            Ok(t) => Ok(t),
            Err(e) => self
                .remembered()
                .filter(|t| !t.document().is_expired(unix_now()))
                .ok_or(e),
        }
    }

    /// Refuses what a reader must not take: an expired document, or one below the
    /// remembered revision. Remembers it otherwise.
    fn admit(&self, topology: &Topology, bytes: &[u8]) -> Result<(), TopologyError> {
        let now = unix_now();
        let doc = topology.document();
        if doc.issued_at > now.saturating_add(CLOCK_SKEW.as_secs()) {
            return Err(TopologyError::Invalid(format!(
                "issued at {} (unix seconds), ahead of this clock ({now})",
                doc.issued_at
            )));
        }
        if doc.is_expired(now) {
            return Err(TopologyError::Expired {
                revision: doc.revision,
                valid_until: doc.valid_until,
                now,
            });
        }
        let Some(memory) = &self.memory else {
            return Ok(());
        };
        if memory.floor.lock().is_none() {
            // Not read yet: its revision is the floor all the same.
            let _ = self.remembered();
        }
        let mut floor = memory.floor.lock();
        match *floor {
            Some(have) if doc.revision < have => {
                return Err(TopologyError::OlderRevision {
                    got: doc.revision,
                    have,
                });
            }
            Some(have) if doc.revision == have => return Ok(()),
            _ => {}
        }
        match write_atomically(&memory.path, bytes) {
            Ok(()) => *floor = Some(doc.revision),
            Err(e) => {
                tracing::warn!(path = %memory.path.display(), error = %e, "cannot remember the topology; a restart may accept an older revision")
            }
        }
        Ok(())
    }

    /// Requires documents signed by the directory key `signer`.
    pub fn signed_by(mut self, signer: Option<KeyBytes>) -> Self {
        self.signer = signer;
        self
    }

    /// A plain `http://` source: anyone on the path can change what it serves.
    pub fn is_plain_http(&self) -> bool {
        matches!(&self.location, Location::Http(u) if u.starts_with("http://"))
    }

    pub async fn load(&self) -> Result<Topology, TopologyError> {
        if self.is_plain_http() && self.signer.is_none() {
            return Err(TopologyError::PlainHttpUnsigned(self.to_string()));
        }
        let bytes = match &self.location {
            Location::File(path) => {
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
            Location::Http(url) => fetch(url).await?,
        };
        let topology = Topology::parse_signed(&bytes, self.signer.as_ref())?;
        self.admit(&topology, &bytes)?;
        Ok(topology)
    }
}

/// Replaces `path` with `bytes` whole (a crash leaves the old file or the new one).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl fmt::Display for TopologySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Http(u) => f.write_str(u),
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

/// Reads the current document into the metrics at scrape time: its revision, its nodes by
/// kind (a thin layer shows as a small number, an empty one as 0) and where it places the
/// node `me`, whose own mode is `mode`.
pub fn sample(handle: &TopologyHandle, me: &NodeId, mode: Mode, metrics: &Metrics) {
    let Some(topology) = handle.current() else {
        return;
    };
    metrics.topology_revision.set(topology.revision() as i64);
    metrics
        .topology_valid_until
        .set(topology.document().valid_until as i64);
    metrics.clear_topology_nodes();
    for n in topology.nodes() {
        let layer = n.layer.map(|l| l.to_string()).unwrap_or_default();
        let serving = if n.serving { "true" } else { "false" };
        metrics
            .topology_nodes
            .with_label_values(&[n.mode.as_str(), &layer, serving])
            .inc();
    }
    metrics.topology_serving.reset();
    let entry = topology.node(me);
    let layer = entry
        .and_then(|n| n.layer)
        .map(|l| l.to_string())
        .unwrap_or_default();
    metrics
        .topology_serving
        .with_label_values(&[entry.map_or(mode, |n| n.mode).as_str(), &layer])
        .set(entry.is_some_and(|n| n.serving) as i64);
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
    restore(&source, &handle);
    let mut expiry_warned = None;
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
        warn_if_expired(&handle, &mut expiry_warned);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Starts from the remembered document while it is still valid: a restart during a
/// directory outage is not an outage of this node.
fn restore(source: &TopologySource, handle: &TopologyHandle) {
    let Some(t) = source.remembered() else {
        return;
    };
    if handle.is_loaded() || t.document().is_expired(unix_now()) {
        return;
    }
    tracing::info!(
        revision = t.revision(),
        nodes = t.nodes().len(),
        "topology restored from the last good document"
    );
    handle.store(t);
}

/// Routing goes on with an expired document (the last good one: stopping would turn a
/// directory outage into a network outage), but once per revision it is said loudly.
fn warn_if_expired(handle: &TopologyHandle, warned: &mut Option<u64>) {
    let Some(t) = handle.current() else {
        return;
    };
    let doc = t.document();
    if doc.is_expired(unix_now()) && *warned != Some(doc.revision) {
        tracing::error!(
            revision = doc.revision,
            valid_until = doc.valid_until,
            "the topology document has expired and no valid newer one came; still routing on it"
        );
        *warned = Some(doc.revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity key of node `seed` (signing its own statement needs a real key).
    fn id(seed: u8) -> KeyBytes {
        crate::keys::Identity::from_secret([seed; 32]).public()
    }

    fn entry(name: &str, seed: u8, mode: Mode, layer: Option<u8>) -> NodeEntry {
        let node = crate::keys::Identity::from_secret([seed; 32]);
        let statement = crate::statement::NodeStatement {
            identity_key: node.public(),
            mode,
            noise_key: KeyBytes([seed.wrapping_add(200); 32]),
            sphinx_keys: vec![crate::keys::EpochKey::always(KeyBytes(
                [seed.wrapping_add(100); 32],
            ))],
            network_requester: None,
            ip_packet_router: None,
        };
        NodeEntry {
            name: name.into(),
            identity_key: statement.identity_key,
            sphinx_keys: statement.sphinx_keys.clone(),
            noise_key: statement.noise_key,
            mode,
            layer,
            mixnet_address: "127.0.0.1:1789".parse().unwrap(),
            client_address: None,
            http_address: None,
            network_requester: None,
            ip_packet_router: None,
            serving: true,
            statement: statement.sign(&node),
        }
    }

    #[test]
    fn document_round_trips_and_indexes() {
        let doc = TopologyDocument::issue(
            3,
            vec![
                entry("mix1", 1, Mode::Mixnode, Some(1)),
                entry("gw", 2, Mode::EntryGateway, None),
            ],
        );
        let json = serde_json::to_vec(&doc).unwrap();
        let t = Topology::parse(&json).unwrap();
        assert_eq!(t.node(&id(1)).unwrap().name, "mix1");
        assert_eq!(
            t.node_by_noise_key(&KeyBytes([202; 32])).unwrap().name,
            "gw"
        );
        assert_eq!(t.serving_layer(1).count(), 1);
        assert_eq!(t.serving_gateways().count(), 1);
    }

    #[test]
    fn the_sampled_metrics_count_nodes_by_kind_and_place_this_node() {
        let mut drained = entry("mix2", 2, Mode::Mixnode, Some(2));
        drained.serving = false;
        let doc = TopologyDocument::issue(
            42,
            vec![
                entry("mix1", 1, Mode::Mixnode, Some(1)),
                drained,
                entry("gw", 3, Mode::ExitGateway, None),
            ],
        );
        let handle = TopologyHandle::new();
        handle.store(Topology::from_document(doc).unwrap());
        let m = Metrics::new("mixnode");
        let nodes = |mode: &str, layer: &str, serving: &str| {
            m.topology_nodes
                .with_label_values(&[mode, layer, serving])
                .get()
        };
        sample(&handle, &id(2), Mode::Mixnode, &m);
        assert_eq!(m.topology_revision.get(), 42);
        assert_eq!(nodes("mixnode", "1", "true"), 1);
        assert_eq!(nodes("mixnode", "2", "false"), 1);
        // An empty layer is a zero, not a missing series: alerts can see it.
        assert_eq!(nodes("mixnode", "3", "true"), 0);
        assert_eq!(nodes("exit-gateway", "", "true"), 1);
        assert_eq!(
            m.topology_serving
                .with_label_values(&["mixnode", "2"])
                .get(),
            0,
            "listed as not serving"
        );
        // Absent from the document: one series, at 0, without a layer.
        sample(&handle, &id(9), Mode::Mixnode, &m);
        let families = m.registry().gather();
        let serving = families
            .iter()
            .find(|f| f.name() == "nym_node_topology_serving")
            .unwrap();
        assert_eq!(serving.get_metric().len(), 1);
        assert_eq!(
            m.topology_serving.with_label_values(&["mixnode", ""]).get(),
            0
        );
        sample(&handle, &id(1), Mode::Mixnode, &m);
        assert_eq!(
            m.topology_serving
                .with_label_values(&["mixnode", "1"])
                .get(),
            1
        );
    }

    #[test]
    fn invalid_documents_are_rejected_with_reason() {
        let mut doc = TopologyDocument::issue(1, vec![entry("mix1", 1, Mode::Mixnode, None)]);
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
        let doc = TopologyDocument::issue(1, vec![entry("mix1", 1, Mode::Mixnode, Some(1))]);
        std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
        let handle = TopologyHandle::new();
        let metrics = Metrics::new("mixnode");
        let stop = CancellationToken::new();
        let task = tokio::spawn(refresh_loop(
            TopologySource::parse(&path.display().to_string()),
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
    #[test]
    fn an_entry_whose_keys_are_not_what_its_node_signed_is_refused() {
        let good = entry("gw", 2, Mode::EntryGateway, None);
        assert!(Topology::from_document(TopologyDocument::issue(1, vec![good.clone()])).is_ok());
        // The directory's own Noise key in the gateway's entry.
        let mut rekeyed = good.clone();
        rekeyed.noise_key = KeyBytes([9; 32]);
        // Another Sphinx key; a requester the node never named.
        let mut resphinxed = good.clone();
        resphinxed.sphinx_keys[0].key = KeyBytes([9; 32]);
        let mut redirected = good.clone();
        redirected.network_requester = Some("elsewhere".into());
        // Some other node's (valid) statement under this identity.
        let mut borrowed = good.clone();
        borrowed.statement = entry("other", 3, Mode::EntryGateway, None).statement;
        for bad in [rekeyed, resphinxed, redirected, borrowed] {
            let err = Topology::from_document(TopologyDocument::issue(1, vec![bad])).unwrap_err();
            assert!(
                matches!(err, TopologyError::NotVouched(ref n) if n == "gw"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn the_remembered_revision_outlives_a_restart_and_expired_documents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let memory = dir.path().join("last.json");
        let source = || {
            TopologySource::parse(&path.display().to_string()).remembered_in(Some(memory.clone()))
        };
        let doc = |revision| {
            TopologyDocument::issue(revision, vec![entry("m", 1, Mode::Mixnode, Some(1))])
        };
        let write =
            |d: &TopologyDocument| std::fs::write(&path, serde_json::to_vec(d).unwrap()).unwrap();
        write(&doc(5));
        assert_eq!(source().load().await.unwrap().revision(), 5);

        // A restart (a new source, the same memory) whose source now serves revision 3.
        write(&doc(3));
        let restarted = source();
        assert_eq!(restarted.remembered().unwrap().revision(), 5);
        let err = restarted.load().await.unwrap_err();
        assert!(
            matches!(err, TopologyError::OlderRevision { got: 3, have: 5 }),
            "{err}"
        );
        // Even without reading the memory first.
        assert!(matches!(
            source().load().await,
            Err(TopologyError::OlderRevision { .. })
        ));

        // Revision 6, expired an hour ago: refused.
        let mut expired = doc(6);
        expired.issued_at -= 7200;
        expired.valid_until = expired.issued_at + 3600;
        write(&expired);
        let err = restarted.load().await.unwrap_err();
        assert!(
            matches!(err, TopologyError::Expired { revision: 6, .. }),
            "{err}"
        );

        // Signed to last a week, or issued an hour from now: refused (one signature must not
        // outlive the re-signings, nor take effect later).
        let mut long = doc(8);
        long.valid_until = long.issued_at + 7 * 24 * 3600;
        write(&long);
        assert!(matches!(
            restarted.load().await,
            Err(TopologyError::Invalid(_))
        ));
        let mut ahead = doc(8);
        ahead.issued_at += 3600;
        ahead.valid_until += 3600;
        write(&ahead);
        assert!(matches!(
            restarted.load().await,
            Err(TopologyError::Invalid(_))
        ));

        // A valid revision 7 is taken and remembered.
        write(&doc(7));
        assert_eq!(restarted.load().await.unwrap().revision(), 7);
        assert_eq!(source().remembered().unwrap().revision(), 7);
    }

    #[test]
    fn a_document_is_due_for_re_signing_at_half_its_validity() {
        let mut d = TopologyDocument::issue(1, vec![]);
        d.issued_at = 1000;
        d.valid_until = 1000 + 3600;
        assert!(!d.due_for_resigning(1000 + 1799));
        assert!(d.due_for_resigning(1000 + 1800));
        assert!(!d.is_expired(1000 + 3599));
        assert!(d.is_expired(1000 + 3600));
    }

    #[tokio::test]
    async fn signed_documents_verify_and_everything_else_is_refused() {
        let directory = crate::keys::Identity::generate().unwrap();
        let doc = TopologyDocument::issue(3, vec![entry("mix1", 1, Mode::Mixnode, Some(1))]);
        let signed = sign_document(&doc, &directory).unwrap();
        let me = directory.public();
        let t = Topology::parse_signed(&signed, Some(&me)).unwrap();
        assert_eq!(t.document(), &doc);
        // Without a directory to trust, a signed document is still checked.
        assert_eq!(Topology::parse(&signed).unwrap().document(), &doc);
        // Another directory's signature.
        let other = crate::keys::Identity::generate().unwrap();
        assert!(matches!(
            Topology::parse_signed(&sign_document(&doc, &other).unwrap(), Some(&me)),
            Err(TopologyError::WrongSigner { .. })
        ));
        // One changed byte of the document (its revision 3 -> 4).
        let text = String::from_utf8(signed.clone()).unwrap();
        let tampered = text.replacen("\"revision\":3", "\"revision\":4", 1);
        assert_ne!(tampered, text);
        assert!(matches!(
            Topology::parse_signed(tampered.as_bytes(), Some(&me)),
            Err(TopologyError::BadSignature)
        ));
        assert!(matches!(
            Topology::parse(tampered.as_bytes()),
            Err(TopologyError::BadSignature)
        ));
        // A plain document where a signature is required.
        let plain = serde_json::to_vec(&doc).unwrap();
        assert!(matches!(
            Topology::parse_signed(&plain, Some(&me)),
            Err(TopologyError::Unsigned(_))
        ));
        // Plain http:// is refused before anything is fetched unless a signer is set.
        let source = TopologySource::parse("http://127.0.0.1:9/topology.json");
        assert!(matches!(
            source.load().await,
            Err(TopologyError::PlainHttpUnsigned(_))
        ));
        assert!(matches!(
            source.signed_by(Some(me)).load().await,
            Err(TopologyError::Read(..))
        ));
    }
}
