//! An in-memory Kubernetes API behind kube's mock service (`tower-test`), for driving the
//! reconciler as a cluster would: server-side apply, lists with label selectors, the
//! status subresource, deletes with preconditions, Events, and injected API errors. A
//! `tick` plays the StatefulSet controller, the kubelet and the nodes themselves: it
//! creates missing pods from the template, turns them ready some ticks later, removes
//! deleted ones, and lets every node load the published topology one tick late. Each pod
//! keeps its keys across replacements (its volume) and serves a signed description.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use nym_node::http::description::{Description, SignedDescription};
use nym_node::keys::NodeKeys;
use nym_node::topology::TopologyDocument;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::controller::{Context, Describer, Settings};
use crate::crd::NymNode;
use crate::metrics::Metrics;

pub const NS: &str = "mixnet";

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub body: Value,
}

struct FakeNode {
    keys: NodeKeys,
    /// Topology revision the node runs on, and the one it will load next tick.
    loaded: u64,
    seen: u64,
    forged: bool,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    log: Vec<Logged>,
    failures: VecDeque<(String, String, u16)>,
    counter: u64,
    now: i64,
    nodes: BTreeMap<String, FakeNode>,
    ages: BTreeMap<String, u32>,
    ready_after: u32,
    /// Pods (by name) whose next incarnation never becomes ready.
    stuck: BTreeSet<String>,
    stuck_uids: BTreeSet<String>,
    /// Every pod delete: the pod and whether the topology listed it as not serving then.
    pub deletions: Vec<(String, bool)>,
}

#[derive(Clone)]
pub struct Cluster(Arc<Mutex<State>>);

fn status_error(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

/// `/api/v1/namespaces/ns/pods/name/status` → (collection path, name, subresource).
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let at = parts
        .iter()
        .position(|p| *p == "namespaces")
        .map(|i| i + 2)
        .unwrap_or(parts.len() - 1);
    let collection = format!("/{}", parts[..=at].join("/"));
    (
        collection,
        parts.get(at + 1).map(|s| s.to_string()),
        parts.get(at + 2).map(|s| s.to_string()),
    )
}

impl Cluster {
    /// A cluster and a reconcile context talking to it.
    pub fn start(ready_after: u32) -> (Cluster, Arc<Context>) {
        let cluster = Cluster(Arc::new(Mutex::new(State {
            ready_after,
            now: 1_800_000_000,
            ..Default::default()
        })));
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = cluster.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                send.send_response(server.handle(parts.method.as_str(), &parts.uri, &bytes));
            }
        });
        let client = Client::new(service, NS);
        let clock = cluster.clone();
        let ctx = Arc::new(Context::new(
            client,
            Settings {
                pod_ready_timeout: std::time::Duration::from_secs(20),
                ..Settings::default()
            },
            Arc::new(Metrics::new()),
            Arc::new(cluster.clone()),
            Arc::new(move || clock.0.lock().now),
            "test".into(),
        ));
        (cluster, ctx)
    }

    fn handle(&self, method: &str, uri: &http::Uri, body: &[u8]) -> Response<Body> {
        let mut s = self.0.lock();
        let path = uri.path().to_string();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), decode(v)))
            .collect();
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        s.log.push(Logged {
            method: method.into(),
            path: path.clone(),
            body: body.clone(),
        });
        if let Some(i) = s
            .failures
            .iter()
            .position(|(m, p, _)| m == method && path.contains(p.as_str()))
        {
            let (_, _, code) = s.failures.remove(i).unwrap();
            return status_error(
                code,
                if code == 409 {
                    "Conflict"
                } else {
                    "InternalError"
                },
                "injected failure",
            );
        }
        let (collection, name, sub) = split(&path);
        s.counter += 1;
        let counter = s.counter;
        match (method, name) {
            ("GET", None) => {
                let selector = query.get("labelSelector").cloned().unwrap_or_default();
                let items: Vec<Value> = s
                    .objects
                    .get(&collection)
                    .map(|c| {
                        c.values()
                            .filter(|o| labels_match(o, &selector))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                ok(
                    200,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": counter.to_string()}, "items": items}),
                )
            }
            ("GET", Some(name)) => match s.objects.get(&collection).and_then(|c| c.get(&name)) {
                Some(o) => ok(200, o),
                None => status_error(404, "NotFound", "not found"),
            },
            ("POST", None) => {
                let mut obj = body;
                let name = obj["metadata"]["name"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| {
                        format!(
                            "{}{counter}",
                            obj["metadata"]["generateName"].as_str().unwrap_or("obj-")
                        )
                    });
                obj["metadata"]["name"] = json!(name);
                s.objects
                    .entry(collection)
                    .or_default()
                    .insert(name, obj.clone());
                ok(201, &obj)
            }
            ("PATCH", Some(name)) => {
                let existing = s
                    .objects
                    .get(&collection)
                    .and_then(|c| c.get(&name))
                    .cloned();
                let obj = match (sub.as_deref(), existing) {
                    (Some("status"), Some(mut o)) => {
                        o["status"] = body["status"].clone();
                        o
                    }
                    (Some("status"), None) => return status_error(404, "NotFound", "not found"),
                    (_, Some(o)) if collection.ends_with("/events") => o,
                    (_, Some(o)) => {
                        let mut n = body;
                        n["metadata"]["uid"] = o["metadata"]["uid"].clone();
                        n["metadata"]["generation"] = o["metadata"]["generation"].clone();
                        if !o["status"].is_null() {
                            n["status"] = o["status"].clone();
                        }
                        n
                    }
                    (_, None) if collection.ends_with("/events") => {
                        return status_error(404, "NotFound", "not found");
                    }
                    (_, None) => {
                        let mut n = body;
                        n["metadata"]["uid"] = json!(format!("uid-{counter}"));
                        n
                    }
                };
                let mut obj = obj;
                obj["metadata"]["resourceVersion"] = json!(counter.to_string());
                s.objects
                    .entry(collection)
                    .or_default()
                    .insert(name, obj.clone());
                ok(200, &obj)
            }
            ("DELETE", Some(name)) => {
                let Some(existing) = s
                    .objects
                    .get(&collection)
                    .and_then(|c| c.get(&name))
                    .cloned()
                else {
                    return status_error(404, "NotFound", "not found");
                };
                if let Some(uid) = body["preconditions"]["uid"].as_str()
                    && existing["metadata"]["uid"].as_str() != Some(uid)
                {
                    return status_error(409, "Conflict", "uid precondition failed");
                }
                if collection.ends_with("/pods") {
                    let unserving = !s.serving(&name);
                    s.deletions.push((name.clone(), unserving));
                    let pod = s
                        .objects
                        .get_mut(&collection)
                        .unwrap()
                        .get_mut(&name)
                        .unwrap();
                    pod["metadata"]["deletionTimestamp"] = json!("2027-01-01T00:00:00Z");
                    pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
                    ok(200, pod)
                } else {
                    s.objects.get_mut(&collection).unwrap().remove(&name);
                    ok(200, &existing)
                }
            }
            _ => status_error(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    pub fn insert_nymnode(&self, nn: &NymNode) {
        let mut v = serde_json::to_value(nn).unwrap();
        let mut s = self.0.lock();
        s.counter += 1;
        v["metadata"]["namespace"] = json!(NS);
        v["metadata"]["uid"] = json!(format!("nn-{}", nn.metadata.name.as_deref().unwrap()));
        v["metadata"]["generation"] = json!(1);
        s.objects
            .entry(format!(
                "/apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes"
            ))
            .or_default()
            .insert(nn.metadata.name.clone().unwrap(), v);
    }

    /// Changes a NymNode's spec as `kubectl apply` would (generation goes up).
    pub fn edit_nymnode(&self, name: &str, edit: impl FnOnce(&mut NymNode)) {
        let mut nn = self.nymnode(name);
        edit(&mut nn);
        let mut s = self.0.lock();
        let o = s
            .objects
            .get_mut(&format!(
                "/apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes"
            ))
            .unwrap()
            .get_mut(name)
            .unwrap();
        o["spec"] = serde_json::to_value(&nn.spec).unwrap();
        let g = o["metadata"]["generation"].as_i64().unwrap();
        o["metadata"]["generation"] = json!(g + 1);
    }

    pub fn nymnode(&self, name: &str) -> NymNode {
        let s = self.0.lock();
        serde_json::from_value(
            s.objects[&format!("/apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes")]
                [name]
                .clone(),
        )
        .unwrap()
    }

    pub fn nymnode_names(&self) -> Vec<String> {
        let s = self.0.lock();
        s.objects
            .get(&format!(
                "/apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes"
            ))
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn fail_next(&self, method: &str, path_contains: &str, code: u16) {
        self.0
            .lock()
            .failures
            .push_back((method.into(), path_contains.into(), code));
    }

    pub fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut self.0.lock().log)
    }

    pub fn deletions(&self) -> Vec<(String, bool)> {
        self.0.lock().deletions.clone()
    }

    pub fn topology(&self) -> Option<TopologyDocument> {
        self.0.lock().topology()
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.0
            .lock()
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned()
    }

    pub fn forge(&self, pod: &str) {
        self.0.lock().nodes.get_mut(pod).unwrap().forged = true;
    }

    pub fn stick(&self, pod: &str) {
        self.0.lock().stuck.insert(pod.into());
    }

    pub fn pods(&self) -> Vec<Value> {
        let s = self.0.lock();
        s.objects
            .get(&format!("/api/v1/namespaces/{NS}/pods"))
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Pods that should exist but are not ready and serving in the published topology.
    pub fn out_of_service(&self) -> Vec<String> {
        let s = self.0.lock();
        let mut out = Vec::new();
        for sts in s
            .objects
            .get(&format!("/apis/apps/v1/namespaces/{NS}/statefulsets"))
            .map(|c| c.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let name = sts["metadata"]["name"].as_str().unwrap();
            for i in 0..sts["spec"]["replicas"].as_i64().unwrap() {
                let pod = format!("{name}-{i}");
                let ready = s
                    .objects
                    .get(&format!("/api/v1/namespaces/{NS}/pods"))
                    .and_then(|c| c.get(&pod))
                    .is_some_and(|p| {
                        p["metadata"]["deletionTimestamp"].is_null()
                            && p["status"]["conditions"][0]["status"] == "True"
                    });
                if !ready || !s.serving(&pod) {
                    out.push(pod);
                }
            }
        }
        out
    }

    /// One step of everything that is not the operator: time, kubelet, StatefulSet
    /// controller, and the nodes loading the topology.
    pub fn tick(&self) {
        let mut s = self.0.lock();
        s.now += 1;
        let pods_path = format!("/api/v1/namespaces/{NS}/pods");
        let revision = s.topology().map_or(0, |t| t.revision);
        // Nodes load the document one tick late (a ConfigMap volume's delay).
        for node in s.nodes.values_mut() {
            node.loaded = node.seen;
            node.seen = revision;
        }
        let pods = s.objects.entry(pods_path.clone()).or_default();
        pods.retain(|_, p| p["metadata"]["deletionTimestamp"].is_null());
        let statefulsets: Vec<Value> = s
            .objects
            .get(&format!("/apis/apps/v1/namespaces/{NS}/statefulsets"))
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        let mut wanted = BTreeSet::new();
        for sts in statefulsets {
            let name = sts["metadata"]["name"].as_str().unwrap().to_string();
            for i in 0..sts["spec"]["replicas"].as_i64().unwrap() {
                let pod = format!("{name}-{i}");
                wanted.insert(pod.clone());
                if s.objects[&pods_path].contains_key(&pod) {
                    continue;
                }
                s.counter += 1;
                let uid = format!("pod-uid-{}", s.counter);
                let mut labels = sts["spec"]["template"]["metadata"]["labels"].clone();
                labels["statefulset.kubernetes.io/pod-name"] = json!(pod);
                let ip = format!("10.9.{}.{}", s.counter / 250, s.counter % 250);
                let obj = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": NS, "uid": uid, "labels": labels},
                    "spec": sts["spec"]["template"]["spec"],
                    "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "False"}]},
                });
                if s.stuck.remove(&pod) {
                    s.stuck_uids.insert(uid.clone());
                }
                s.ages.insert(uid, 0);
                s.objects
                    .get_mut(&pods_path)
                    .unwrap()
                    .insert(pod.clone(), obj);
                s.nodes.entry(pod).or_insert_with(|| FakeNode {
                    keys: NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap(),
                    loaded: 0,
                    seen: 0,
                    forged: false,
                });
            }
        }
        let ready_after = s.ready_after;
        let stuck = s.stuck_uids.clone();
        let mut ages = std::mem::take(&mut s.ages);
        let pods = s.objects.get_mut(&pods_path).unwrap();
        pods.retain(|name, _| wanted.contains(name));
        for pod in pods.values_mut() {
            let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
            let age = ages.entry(uid.clone()).or_default();
            *age += 1;
            if *age >= ready_after && !stuck.contains(&uid) {
                pod["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
            }
        }
        s.ages = ages;
    }
}

impl State {
    fn topology(&self) -> Option<TopologyDocument> {
        let cm = self
            .objects
            .get(&format!("/api/v1/namespaces/{NS}/configmaps"))?
            .get("nym-topology")?;
        let json = cm["data"]["topology.json"].as_str()?;
        nym_node::topology::Topology::parse(json.as_bytes())
            .ok()
            .map(|t| t.document().clone())
    }

    fn serving(&self, pod: &str) -> bool {
        self.topology()
            .is_some_and(|t| t.nodes.iter().any(|n| n.name == pod && n.serving))
    }
}

/// Pods answer description requests from their fake node.
impl Describer for Cluster {
    fn describe(
        &self,
        pod_ip: String,
        _port: i32,
    ) -> BoxFuture<'static, Result<SignedDescription, String>> {
        let s = self.0.lock();
        let result = (|| {
            let pod = s
                .objects
                .get(&format!("/api/v1/namespaces/{NS}/pods"))?
                .values()
                .find(|p| p["status"]["podIP"] == pod_ip.as_str())?;
            let name = pod["metadata"]["name"].as_str()?;
            let mode: nym_node::config::Mode =
                pod["metadata"]["labels"]["app.kubernetes.io/component"]
                    .as_str()?
                    .parse()
                    .ok()?;
            let node = s.nodes.get(name)?;
            let d = Description::new(
                name,
                mode,
                None,
                node.keys.public(),
                "0.0.0.0:1789".into(),
                None,
                "0.0.0.0:8080".into(),
            )
            .on_topology_revision(node.loaded);
            Some(if node.forged {
                d.sign(
                    &NodeKeys::generate(std::time::Duration::from_secs(3600))
                        .ok()?
                        .identity,
                )
            } else {
                d.sign(&node.keys.identity)
            })
        })();
        Box::pin(std::future::ready(
            result.ok_or_else(|| "connection refused".to_string()),
        ))
    }
}
