//! A seeded simulation of the operator on the strict fake cluster, after TigerBeetle's VOPR:
//! one seed picks every event (image and env changes, scaling, `NymNode`s deleted and
//! re-created, invalid specs, pods that crash, hang or are evicted, descriptions that fail,
//! the topology ConfigMap deleted or garbled, operator restarts, a stale leader that keeps
//! writing, API errors), the invariants are checked after every step, and a failing seed is
//! printed with its events so it replays exactly.
//!
//! Invariants, after every step:
//! 1. at most one pod that served is out of service because of the operator (a pod a fault
//!    took out is the fault's until it has been ready again for a few seconds);
//! 2. no pod is deleted by the operator (an upgrade's delete, a scale-down, a deleted
//!    `NymNode`'s garbage collection) unless it was listed as not serving and every node
//!    running then had loaded that listing at least the largest per-hop delay earlier;
//! 3. revisions only go up: every document published is above the one before, and no node
//!    ever refuses one as older than its own (or as signed by another key);
//! 4. a pod the network still wants is never dropped from the topology;
//! 5. once the faults stop, within a bounded number of steps every `NymNode` is up to date
//!    and serving, or `Degraded` with a reason.
//!
//! `NYM_OPERATOR_SIM_SEEDS` scenarios (default 12) from `NYM_OPERATOR_SIM_SEED_START`
//! (default 0); replay one with `NYM_OPERATOR_SIM_SEED_START=<seed> NYM_OPERATOR_SIM_SEEDS=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Arc;

use nym_node::topology::TopologyDocument;
use nym_operator::controller::{Context, reconcile};
use nym_operator::crd::{NodeMode, NymNode};
use nym_operator::fixtures::{Cluster, DeletionCause, SplitMix64};

/// Ticks a pod needs from container start to ready.
const READY_AFTER: u32 = 2;
/// The largest per-hop delay every node is given (seconds).
const SETTLE: i64 = 3;
/// Steps with events, then quiet steps allowed for everything to settle.
const ACTIVE_STEPS: usize = 160;
const QUIET_STEPS: usize = 400;
/// Seconds after a fault ends during which its pod's absence is still the fault's.
const FAULT_GRACE: usize = READY_AFTER as usize + 4;

const NYMNODES: [(&str, NodeMode, Option<u8>); 5] = [
    ("mix-l1", NodeMode::Mixnode, Some(1)),
    ("mix-l2", NodeMode::Mixnode, Some(2)),
    ("mix-l3", NodeMode::Mixnode, Some(3)),
    ("entry", NodeMode::EntryGateway, None),
    ("exit", NodeMode::ExitGateway, None),
];

fn nymnode(name: &str, mode: NodeMode, layer: Option<u8>, replicas: i32) -> NymNode {
    nym_operator::fixtures::nymnode(name, mode, layer, replicas, SETTLE as u64)
}

/// One scenario.
struct Sim {
    rng: SplitMix64,
    cluster: Cluster,
    leader: Arc<Context>,
    /// A replica that still believes it leads, and for how many more steps.
    stale: Option<(Arc<Context>, usize)>,
    step: usize,
    events: Vec<String>,
    /// Pods a timed fault affects, with the step its effect ends.
    faults: BTreeMap<String, usize>,
    /// Pods hung until they come back.
    hung: BTreeSet<String>,
    /// Pods a fault touched, until they have been ready again for a while: the step since
    /// which they are ready (`None`: not ready yet). A pod evicted while its spec names a
    /// broken image never is, and stays the fault's.
    recovering: BTreeMap<String, Option<usize>>,
    /// Pods that served since they last became wanted.
    served: BTreeSet<String>,
    documents_checked: usize,
    deletions_checked: usize,
    operators: usize,
}

impl Sim {
    async fn new(seed: u64) -> Sim {
        let cluster = Cluster::simulated(READY_AFTER, seed);
        let leader = cluster.operator("op-0").await;
        for (name, mode, layer) in NYMNODES {
            cluster.insert_nymnode(&nymnode(
                name,
                mode,
                layer,
                if mode == NodeMode::Mixnode { 2 } else { 1 },
            ));
        }
        Sim {
            rng: SplitMix64::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed),
            cluster,
            leader,
            stale: None,
            step: 0,
            events: Vec::new(),
            faults: BTreeMap::new(),
            hung: BTreeSet::new(),
            recovering: BTreeMap::new(),
            served: BTreeSet::new(),
            documents_checked: 0,
            deletions_checked: 0,
            operators: 1,
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.rng.below(items.len() as u64) as usize])
    }

    fn pod_names(&self) -> Vec<String> {
        self.cluster
            .pods()
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect()
    }

    fn log(&mut self, event: String) {
        self.events.push(format!("step {}: {event}", self.step));
    }

    /// One random event (or none).
    async fn event(&mut self) {
        if self.rng.below(100) >= 30 {
            return;
        }
        let names = self.cluster.nymnode_names();
        let nn = self.pick(&names).cloned();
        let pods = self.pod_names();
        let pod = self.pick(&pods).cloned();
        match self.rng.below(17) {
            0 | 1 => {
                if let Some(nn) = nn {
                    let image = if self.rng.below(8) == 0 {
                        "nym-node:broken".to_string()
                    } else {
                        format!("nym-node:1.{}", 1 + self.rng.below(5))
                    };
                    self.log(format!("{nn}: image {image}"));
                    self.cluster.edit_nymnode(&nn, |n| n.spec.image = image);
                }
            }
            2 => {
                if let Some(nn) = nn {
                    let rate = 100 + 100 * self.rng.below(5);
                    self.log(format!("{nn}: NYM_NODE_CLIENT_RATE={rate}"));
                    self.cluster.edit_nymnode(&nn, |n| {
                        n.spec
                            .env
                            .insert("NYM_NODE_CLIENT_RATE".into(), rate.to_string());
                    });
                }
            }
            3 => {
                if let Some(nn) = nn {
                    let replicas = 1 + self.rng.below(3) as i32;
                    self.log(format!("{nn}: replicas {replicas}"));
                    self.cluster
                        .edit_nymnode(&nn, |n| n.spec.replicas = replicas);
                }
            }
            4 => {
                let choice = self.rng.below(NYMNODES.len() as u64) as usize;
                let (name, mode, layer) = NYMNODES[choice];
                if self.cluster.try_nymnode(name).is_some() {
                    self.log(format!("{name}: deleted"));
                    self.cluster.delete_nymnode(name);
                } else {
                    self.log(format!("{name}: created again"));
                    self.cluster.insert_nymnode(&nymnode(
                        name,
                        mode,
                        layer,
                        1 + self.rng.below(2) as i32,
                    ));
                }
            }
            5 => {
                if let Some(nn) = nn {
                    let invalid = self.rng.below(2) == 0;
                    self.log(format!(
                        "{nn}: env {}",
                        if invalid { "invalid" } else { "fixed" }
                    ));
                    self.cluster.edit_nymnode(&nn, |n| {
                        if invalid {
                            n.spec
                                .env
                                .insert("NYM_NODE_DRAIN_GRACE".into(), "forever".into());
                        } else {
                            n.spec.env.remove("NYM_NODE_DRAIN_GRACE");
                        }
                    });
                }
            }
            6 | 7 => {
                if let Some(pod) = pod {
                    let ticks = 1 + self.rng.below(8) as u32;
                    self.log(format!("{pod}: crashes for {ticks}s"));
                    self.cluster.crash(&pod, ticks);
                    self.fault(&pod, self.step + ticks as usize);
                }
            }
            8 => {
                if let Some(pod) = pod {
                    let hung = !self.hung.contains(&pod);
                    self.log(format!(
                        "{pod}: {}",
                        if hung { "hangs unready" } else { "comes back" }
                    ));
                    self.cluster.hang(&pod, hung);
                    if hung {
                        self.fault(&pod, self.step);
                        self.hung.insert(pod);
                    } else {
                        self.hung.remove(&pod);
                        self.fault(&pod, self.step);
                    }
                }
            }
            9 | 10 => {
                if let Some(pod) = pod {
                    let n = if self.rng.below(4) == 0 {
                        60
                    } else {
                        1 + self.rng.below(4) as u32
                    };
                    self.log(format!("{pod}: next {n} descriptions fail"));
                    self.cluster.fail_descriptions(&pod, n);
                    self.fault(&pod, self.step + n as usize);
                }
            }
            11 => {
                if let Some(pod) = pod {
                    self.log(format!("{pod}: evicted"));
                    self.cluster.delete_pod_externally(&pod);
                    self.fault(&pod, self.step + 8);
                }
            }
            12 => {
                if self.rng.below(2) == 0 {
                    self.log("topology ConfigMap deleted".into());
                    self.cluster.delete_topology_configmap();
                } else {
                    self.log("topology ConfigMap garbled".into());
                    self.cluster
                        .garble_topology_configmap("{\"not\": \"a document\"}");
                }
            }
            13 => {
                self.log("operator restarts".into());
                self.operators += 1;
                self.leader = self
                    .cluster
                    .operator(&format!("op-{}", self.operators))
                    .await;
            }
            14 => {
                self.log("leader changes; the old one writes on for a few steps".into());
                self.operators += 1;
                let new = self
                    .cluster
                    .operator(&format!("op-{}", self.operators))
                    .await;
                let old = std::mem::replace(&mut self.leader, new);
                self.stale = Some((old, 1 + self.rng.below(3) as usize));
            }
            _ => {
                let targets = [
                    ("PATCH", "/statefulsets/"),
                    ("PATCH", "/configmaps/nym-topology"),
                    ("POST", "/configmaps"),
                    ("DELETE", "/pods/"),
                    ("GET", "/pods"),
                    ("PATCH", "/status"),
                    ("PATCH", "/nymnodes/"),
                    ("GET", "/nymnodes"),
                ];
                let (method, path) = *self.pick(&targets).unwrap_or(&("GET", "/pods"));
                let code = if self.rng.below(2) == 0 { 409 } else { 500 };
                self.log(format!("API answers {code} to the next {method} {path}"));
                self.cluster.fail_next(method, path, code);
            }
        }
    }

    fn fault(&mut self, pod: &str, until: usize) {
        let end = self.faults.entry(pod.into()).or_insert(0);
        *end = (*end).max(until);
        self.recovering.insert(pod.into(), None);
    }

    /// Follows faulted pods back to readiness.
    fn track_recovery(&mut self) {
        let ready = self.ready();
        let step = self.step;
        let active = |p: &String| {
            self.hung.contains(p)
                || self.faults.get(p).is_some_and(|e| step <= *e)
                || self.cluster.failing_descriptions(p) > 0
        };
        let mut done = Vec::new();
        let active: BTreeSet<String> = self
            .recovering
            .keys()
            .filter(|p| active(p))
            .cloned()
            .collect();
        for (pod, since) in self.recovering.iter_mut() {
            if active.contains(pod) || !ready.contains(pod) {
                *since = None;
            } else if let Some(s) = since {
                if step > *s + FAULT_GRACE {
                    done.push(pod.clone());
                }
            } else {
                *since = Some(step);
            }
        }
        for pod in done {
            self.recovering.remove(&pod);
        }
    }

    /// Reconciles a random subset of the NymNodes in a random order (the controller's timing
    /// varies), with the stale leader writing after the leader.
    async fn reconcile(&mut self) {
        let mut names = self.cluster.nymnode_names();
        for i in (1..names.len()).rev() {
            names.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        for name in names {
            if self.rng.below(100) < 85
                && let Some(nn) = self.cluster.try_nymnode(&name)
            {
                let _ = reconcile(Arc::new(nn), self.leader.clone()).await;
            }
        }
        if let Some((stale, left)) = self.stale.take() {
            let names = self.cluster.nymnode_names();
            if let Some(name) = self.pick(&names).cloned()
                && let Some(nn) = self.cluster.try_nymnode(&name)
            {
                let _ = reconcile(Arc::new(nn), stale.clone()).await;
            }
            if left > 1 {
                self.stale = Some((stale, left - 1));
            }
        }
    }

    /// Pods the network wants now: (NymNode, pod) for every ordinal below its replicas.
    fn wanted(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for name in self.cluster.nymnode_names() {
            let nn = self.cluster.nymnode(&name);
            if nn.metadata.deletion_timestamp.is_some() {
                continue;
            }
            for i in 0..nn.spec.replicas {
                out.insert(format!("{name}-{i}"));
            }
        }
        out
    }

    /// Pods whose readiness probe passes.
    fn ready(&self) -> BTreeSet<String> {
        self.cluster
            .runtimes()
            .values()
            .filter(|rt| rt.ready)
            .map(|rt| rt.pod.clone())
            .collect()
    }

    fn faulted(&self, pod: &str) -> bool {
        self.hung.contains(pod)
            || self.faults.get(pod).is_some_and(|end| self.step <= *end)
            || self.cluster.failing_descriptions(pod) > 0
            || self.recovering.contains_key(pod)
    }

    fn check(&mut self) -> Result<(), String> {
        self.track_recovery();
        self.check_deletions()?;
        self.check_out_of_service()?;
        for rt in self.cluster.runtimes().values() {
            if rt.refused_older > 0 || rt.refused_foreign > 0 {
                return Err(format!(
                    "{} refused a document ({} older than its own, {} signed by another key)",
                    rt.pod, rt.refused_older, rt.refused_foreign
                ));
            }
        }
        Ok(())
    }

    /// Invariants 3 and 4 over every document published since the last check, right after
    /// the reconciles that published them (so "wanted" is what the operator saw).
    fn check_documents(&mut self) -> Result<(), String> {
        let documents = self.cluster.documents();
        let wanted = self.wanted();
        let ready = self.ready();
        let start = self.documents_checked.max(1);
        for i in start..documents.len() {
            let (before, after) = (&documents[i - 1].1, &documents[i].1);
            if after.revision <= before.revision {
                return Err(format!(
                    "revision went from {} to {}",
                    before.revision, after.revision
                ));
            }
            for n in &before.nodes {
                let healthy =
                    wanted.contains(&n.name) && ready.contains(&n.name) && !self.faulted(&n.name);
                if healthy && !after.nodes.iter().any(|m| m.name == n.name) {
                    return Err(format!(
                        "{} is wanted and healthy but was dropped at revision {}",
                        n.name, after.revision
                    ));
                }
            }
        }
        self.documents_checked = documents.len();
        Ok(())
    }

    /// Invariant 2 for every deletion since the last check.
    fn check_deletions(&mut self) -> Result<(), String> {
        let documents = self.cluster.documents();
        let deletions = self.cluster.deletion_log();
        for d in &deletions[self.deletions_checked..] {
            if d.cause == DeletionCause::External {
                continue;
            }
            if d.serving {
                return Err(format!(
                    "{} deleted ({:?}) while listed as serving",
                    d.pod, d.cause
                ));
            }
            let published: Vec<&(i64, TopologyDocument)> =
                documents.iter().filter(|(t, _)| *t <= d.at).collect();
            let withdrawn_from = published
                .iter()
                .rev()
                .take_while(|(_, doc)| !doc.nodes.iter().any(|n| n.name == d.pod && n.serving))
                .last()
                .map(|(_, doc)| doc.revision);
            let Some(revision) = withdrawn_from else {
                continue;
            };
            for (node, loads) in &d.running {
                let had_older = loads.iter().any(|(r, _)| *r < revision);
                if !had_older {
                    continue;
                }
                let last_older = loads.iter().rposition(|(r, _)| *r < revision).unwrap_or(0);
                let caught_up = loads[last_older..]
                    .iter()
                    .find(|(r, _)| *r >= revision)
                    .map(|(_, t)| *t);
                match caught_up {
                    Some(t) if d.at - t >= SETTLE => {}
                    Some(t) => {
                        return Err(format!(
                            "{} deleted ({:?}) {}s after {node} loaded revision {revision} that withdrew it (the delay is {SETTLE}s)",
                            d.pod,
                            d.cause,
                            d.at - t
                        ));
                    }
                    None => {
                        return Err(format!(
                            "{} deleted ({:?}) while {node} still ran on a revision before {revision}, which withdrew it",
                            d.pod, d.cause
                        ));
                    }
                }
            }
        }
        self.deletions_checked = deletions.len();
        Ok(())
    }

    /// Invariant 1.
    fn check_out_of_service(&mut self) -> Result<(), String> {
        let wanted = self.wanted();
        self.served.retain(|p| wanted.contains(p));
        let document = self.cluster.topology();
        let serving: BTreeSet<String> = document
            .iter()
            .flat_map(|d| d.nodes.iter())
            .filter(|n| n.serving)
            .map(|n| n.name.clone())
            .collect();
        self.served.extend(serving.iter().cloned());
        let out: Vec<&String> = self
            .served
            .iter()
            .filter(|p| !serving.contains(*p) && !self.faulted(p))
            .collect();
        if out.len() > 1 {
            return Err(format!(
                "{} pods out of service because of the operator: {out:?}",
                out.len()
            ));
        }
        Ok(())
    }

    /// Invariant 5: every NymNode up to date and serving, or Degraded with a reason.
    fn settled(&self) -> Result<(), String> {
        let mut waiting = Vec::new();
        for name in self.cluster.nymnode_names() {
            let nn = self.cluster.nymnode(&name);
            let Some(status) = &nn.status else {
                waiting.push(format!("{name}: no status"));
                continue;
            };
            let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
            let degraded =
                condition("Degraded").is_some_and(|c| c.status == "True" && !c.reason.is_empty());
            let ready = condition("Ready").is_some_and(|c| c.status == "True")
                && condition("Progressing").is_some_and(|c| c.status == "False")
                && status.observed_generation == nn.metadata.generation;
            if !(degraded || ready) {
                waiting.push(format!(
                    "{name}: {:?}",
                    condition("Progressing").map(|c| &c.message)
                ));
            }
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting.join("; "))
        }
    }

    async fn run(&mut self) -> Result<usize, String> {
        for _ in 0..ACTIVE_STEPS {
            self.event().await;
            self.reconcile().await;
            self.check_documents()?;
            self.cluster.tick();
            self.step += 1;
            self.check()?;
        }
        self.stop_faults();
        for quiet in 0..QUIET_STEPS {
            self.reconcile().await;
            self.check_documents()?;
            self.cluster.tick();
            self.step += 1;
            self.check()?;
            if quiet > 10 && self.settled().is_ok() {
                return Ok(self.step);
            }
        }
        self.settled().map(|_| self.step)
    }

    fn stop_faults(&mut self) {
        self.log("faults stop".into());
        self.cluster.clear_failures();
        for pod in self.pod_names() {
            self.cluster.hang(&pod, false);
            self.cluster.fail_descriptions(&pod, 0);
        }
        for pod in std::mem::take(&mut self.hung) {
            self.fault(&pod, self.step);
        }
        self.stale = None;
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run_seed(seed: u64) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut sim = Sim::new(seed).await;
        sim.run().await.map_err(|violation| {
            let mut report = format!("seed {seed}: {violation} (at step {})\nevents:\n", sim.step);
            for e in &sim.events {
                let _ = writeln!(report, "  {e}");
            }
            report
        })
    })
}

#[test]
fn simulation() {
    let start = env_u64("NYM_OPERATOR_SIM_SEED_START", 0);
    let seeds = env_u64("NYM_OPERATOR_SIM_SEEDS", 12);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(seeds.max(1) as usize);
    let next = std::sync::atomic::AtomicU64::new(start);
    let failures = parking_lot::Mutex::new(Vec::new());
    let steps = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= start + seeds {
                        return;
                    }
                    match run_seed(seed) {
                        Ok(n) => {
                            steps.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(report) => failures.lock().push(report),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner();
    println!(
        "{seeds} scenarios (seeds {start}..{}), {} steps, {} failed",
        start + seeds,
        steps.into_inner(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
