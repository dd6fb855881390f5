//! The directory of a small network (the localnet, the compose testnet): it lists a planned
//! set of nodes from their own signed descriptions, fetched over HTTP, and signs the
//! topology with its key, as the operator does in Kubernetes. It never reads a node's key
//! files: every key it publishes is one the node itself signed, so a node's fresh Sphinx
//! key reaches the document when the node publishes it, and no future key exists anywhere
//! before its node makes it.
//!
//! A node's identity is pinned the first time it answers (or from the document already
//! on disk): a node that comes back under another identity is refused, not re-listed. A
//! node that does not answer keeps its last entry, so a restart does not drop it.
//!
//! A new revision is signed when an entry changes, and when half the document's validity
//! has passed (`topology::DOCUMENT_VALIDITY`), so readers never hold an expired one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::http::description::SignedDescription;
use crate::keys::{Identity, KeyBytes};
use crate::localnet::{Advertised, LocalNode, LocalnetError};
use crate::topology::{NodeEntry, Topology, TopologyDocument, unix_now};

/// How long one description fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a directory finds its nodes and writes the document.
pub struct Directory {
    nodes: Vec<LocalNode>,
    advertise: Box<dyn Fn(&LocalNode) -> Advertised + Send + Sync>,
    path: PathBuf,
    signer: Identity,
    client: reqwest::Client,
    /// Identity of each node by name, from its first answer.
    pinned: HashMap<String, KeyBytes>,
    /// The last entry of each node listed.
    listed: HashMap<String, NodeEntry>,
    revision: u64,
    /// The last document written (for its validity).
    last: Option<TopologyDocument>,
}

impl Directory {
    /// A directory writing `dir/topology.json` signed by `signer`; it continues the
    /// document already there (its revision and its nodes' identities).
    pub fn new(
        nodes: Vec<LocalNode>,
        dir: &Path,
        signer: Identity,
        advertise: impl Fn(&LocalNode) -> Advertised + Send + Sync + 'static,
    ) -> Self {
        // rustls needs its process-wide provider chosen once; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let path = dir.join("topology.json");
        let previous = std::fs::read(&path)
            .ok()
            .and_then(|b| Topology::parse_signed(&b, Some(&signer.public())).ok());
        let mut pinned = HashMap::new();
        let mut listed = HashMap::new();
        if let Some(t) = &previous {
            for n in t.nodes() {
                pinned.insert(n.name.clone(), n.identity_key);
                listed.insert(n.name.clone(), n.clone());
            }
        }
        Directory {
            nodes,
            advertise: Box::new(advertise),
            path,
            signer,
            client: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()
                .unwrap_or_default(),
            pinned,
            listed,
            revision: previous.as_ref().map_or(0, |t| t.revision()),
            last: previous.map(|t| t.document().clone()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks every node for its description and writes a new revision if any entry changed,
    /// or if the last one is due for re-signing. Returns how many nodes answered with a
    /// description that verified.
    pub async fn poll(&mut self) -> Result<usize, LocalnetError> {
        let (answered, changed) = self.collect().await;
        let due = self
            .last
            .as_ref()
            .is_some_and(|d| d.due_for_resigning(unix_now()));
        if changed || due {
            self.write()?;
        }
        Ok(answered)
    }

    /// Asks every node for its description and takes in the entries that changed; returns
    /// how many nodes answered with a usable description, and whether anything changed.
    async fn collect(&mut self) -> (usize, bool) {
        let mut fetches = tokio::task::JoinSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let (client, http) = (self.client.clone(), (self.advertise)(n).http);
            fetches.spawn(async move { (i, fetch_description(&client, &http).await) });
        }
        let mut answers: Vec<Result<SignedDescription, String>> =
            vec![Err("no answer".into()); self.nodes.len()];
        while let Some(Ok((i, answer))) = fetches.join_next().await {
            answers[i] = answer;
        }
        let mut answered = 0;
        let mut changed = false;
        for (node, answer) in self.nodes.clone().iter().zip(answers) {
            let entry = match answer.and_then(|d| self.entry_for(node, d)) {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::debug!(node = %node.name, error = %e, "directory: no usable description");
                    continue;
                }
            };
            answered += 1;
            if self.listed.get(&node.name) != Some(&entry) {
                self.listed.insert(node.name.clone(), entry);
                changed = true;
            }
        }
        (answered, changed)
    }

    /// Polls until every node has answered once (or `deadline` passes): the first document
    /// lists the whole network rather than whoever started first.
    pub async fn publish_first(&mut self, deadline: Duration) -> Result<(), LocalnetError> {
        let until = tokio::time::Instant::now() + deadline;
        let mut changed = false;
        loop {
            let (answered, now_changed) = self.collect().await;
            changed |= now_changed;
            if answered == self.nodes.len() {
                return if changed { self.write() } else { Ok(()) };
            }
            if tokio::time::Instant::now() >= until {
                let missing: Vec<&str> = self
                    .nodes
                    .iter()
                    .filter(|n| !self.listed.contains_key(&n.name))
                    .map(|n| n.name.as_str())
                    .collect();
                return Err(LocalnetError::Other(format!(
                    "directory: only {answered} of {} nodes published a usable description (never: {missing:?})",
                    self.nodes.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Polls every `every` until `stop`: a node's new key (made as an epoch begins) is
    /// listed within one poll of the node publishing it.
    pub async fn run(mut self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.poll().await {
                tracing::error!(error = %e, "directory: publishing the topology failed");
            }
        }
    }

    /// The entry of `node` from its signed description, if the description is its own.
    fn entry_for(
        &mut self,
        node: &LocalNode,
        signed: SignedDescription,
    ) -> Result<NodeEntry, String> {
        if !signed.verify() {
            return Err("the description's signature does not verify".into());
        }
        let d = &signed.description;
        // The directory places nodes in layers; the mode is the node's own.
        if d.mode != node.mode {
            return Err(format!(
                "describes itself as {}, planned as {}",
                d.mode, node.mode
            ));
        }
        let pinned = *self
            .pinned
            .entry(node.name.clone())
            .or_insert(d.identity_key);
        if pinned != d.identity_key {
            tracing::warn!(node = %node.name, "directory: a node answered under another identity; not listed");
            return Err("another identity than the one pinned".into());
        }
        // An exit's services are clients of the exit itself, and only exits list them.
        let own = |address: &Option<String>| {
            crate::statement::service_at(address.as_deref(), &d.identity_key)
                .filter(|_| node.mode == Mode::ExitGateway)
        };
        let (requester, router) = (own(&d.network_requester), own(&d.ip_packet_router));
        // The entry lists what the node signed or nothing: a service elsewhere is refused.
        if requester != d.network_requester {
            return Err("publishes a network requester that is not its own".into());
        }
        if router != d.ip_packet_router {
            return Err("publishes an IP packet router that is not its own".into());
        }
        let at = (self.advertise)(node);
        Ok(NodeEntry {
            name: node.name.clone(),
            identity_key: d.identity_key,
            sphinx_keys: d.sphinx_keys.clone(),
            noise_key: d.noise_key,
            mode: node.mode,
            layer: node.layer,
            mixnet_address: at.mixnet.parse()?,
            client_address: if node.mode.is_gateway() {
                Some(at.client.parse()?)
            } else {
                None
            },
            http_address: Some(at.http.parse()?),
            network_requester: requester,
            ip_packet_router: router,
            serving: true,
            statement: signed.statement.clone(),
        })
    }

    /// Signs and writes the next revision (atomically: readers reload on their own time).
    fn write(&mut self) -> Result<(), LocalnetError> {
        let nodes = self
            .nodes
            .iter()
            .filter_map(|n| self.listed.get(&n.name).cloned())
            .collect();
        // At least the clock in milliseconds (as the operator's): a directory whose document
        // was lost still publishes above what nodes remember.
        self.revision = (self.revision + 1).max(crate::keys::unix_ms());
        let doc = TopologyDocument::issue(self.revision, nodes);
        let json = crate::topology::sign_document(&doc, &self.signer)
            .map_err(|e| LocalnetError::Other(e.to_string()))?;
        let tmp = self.path.with_file_name(".topology.json.tmp");
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |e| LocalnetError::Io(p, e)
        };
        std::fs::write(&tmp, json).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        tracing::info!(revision = self.revision, "directory: topology published");
        self.last = Some(doc);
        Ok(())
    }
}

/// `GET http://{http}/api/v1/description` (`http` is `host:port`, an IPv6 host bracketed):
/// a node's signed description, unverified. The operator asks its pods the same way.
pub async fn fetch_description(
    client: &reqwest::Client,
    http: &str,
) -> Result<SignedDescription, String> {
    let response = client
        .get(format!("http://{http}/api/v1/description"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}
