//! What the planners (`rollout`, `retirement`) see of one namespace at one instant: its
//! pods and `NymNode`s reduced to the facts a decision needs, and the clock. Pure data, so
//! the planners are tested without an API server.

use std::collections::BTreeMap;
use std::time::Duration;

/// One pod of the namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    pub name: String,
    pub nymnode: String,
    pub uid: String,
    /// The StatefulSet ordinal (the number after the last `-` of the name).
    pub ordinal: Option<usize>,
    /// One run of its node (uid and restart count): a restart is a new process.
    pub process: String,
    /// Its node's process runs (ready or not): it may route.
    pub running: bool,
    /// Its readiness probe passes and it is not terminating.
    pub ready: bool,
    pub terminating: bool,
    /// Carries its `NymNode`'s current template hash (pods of an invalid `NymNode` count as
    /// up to date: nothing is rolled out from a spec the node would refuse).
    pub up_to_date: bool,
    /// Listed as serving in the published document.
    pub serving: bool,
    /// Its description verified in this pass: unless withdrawn, it is listed as serving.
    pub verified: bool,
    /// The topology revision its description reports (a lower bound of what it runs).
    pub reported_revision: Option<u64>,
}

/// One `NymNode` of the namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct NymNodeState {
    /// Hash of the pod template its spec builds; `None` when the spec is invalid (its pods
    /// keep running as they are and keep their place in the topology).
    pub template_hash: Option<String>,
    /// Pods its spec asks for.
    pub replicas: usize,
    /// Being deleted: its pods are withdrawn, then its finalizer is removed.
    pub deleting: bool,
}

/// Everything a planning pass looks at.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub pods: &'a [PodState],
    pub nymnodes: &'a BTreeMap<String, NymNodeState>,
    /// Revision of the document published before this pass.
    pub revision: u64,
    /// Unix seconds.
    pub now: i64,
    /// Largest per-hop delay any node of the namespace accepts.
    pub settle: Duration,
    /// How long a replaced pod may take to be ready and serving, and how long an upgrade may
    /// wait for an unhealthy pod before the waiting `NymNode`s turn `Degraded`.
    pub ready_timeout: Duration,
    /// How long every running node may take to load a withdrawing revision.
    pub withdrawal_timeout: Duration,
}

impl Snapshot<'_> {
    pub fn pod(&self, name: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Whether a pod of this name belongs in the network: its `NymNode` exists and is not
    /// being deleted, and the ordinal is below its replicas (an invalid `NymNode` keeps
    /// every pod it has).
    pub fn wanted(&self, nymnode: &str, ordinal: Option<usize>) -> bool {
        self.nymnodes.get(nymnode).is_some_and(|n| {
            !n.deleting && (n.template_hash.is_none() || ordinal.is_some_and(|o| o < n.replicas))
        })
    }

    pub fn pod_wanted(&self, p: &PodState) -> bool {
        self.wanted(&p.nymnode, p.ordinal)
    }

    /// Due for an upgrade: wanted, alive, and built from an older template of a valid spec.
    pub fn outdated(&self, p: &PodState) -> bool {
        !p.up_to_date
            && !p.terminating
            && self.pod_wanted(p)
            && self
                .nymnodes
                .get(&p.nymnode)
                .is_some_and(|n| n.template_hash.is_some())
    }

    /// In service: ready and listed as serving.
    pub fn healthy(p: &PodState) -> bool {
        p.ready && p.serving && !p.terminating
    }

    /// Running nodes, other than `except`, that may still route on a document older than
    /// `revision`: every running node whose description does not report `revision` yet
    /// (one whose description could not be read counts, since it may still route).
    pub fn laggards(&self, except: &str, revision: u64) -> Vec<String> {
        self.running(except)
            .filter(|p| p.reported_revision.is_none_or(|r| r < revision))
            .map(|p| p.name.clone())
            .collect()
    }

    /// The node processes, other than `except`'s, that run now.
    pub fn running<'s>(&'s self, except: &'s str) -> impl Iterator<Item = &'s PodState> + 's {
        self.pods
            .iter()
            .filter(move |p| p.name != except && p.running && !p.terminating)
    }

    /// Wanted pods that are not in service, and wanted ordinals with no pod at all.
    pub fn out_of_service(&self, except: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.name != except && self.pod_wanted(p) && !Self::healthy(p))
            .map(|p| p.name.clone())
            .collect();
        for (name, n) in self.nymnodes {
            if n.deleting || n.template_hash.is_none() {
                continue;
            }
            for ordinal in 0..n.replicas {
                let pod = format!("{name}-{ordinal}");
                if pod != except && self.pod(&pod).is_none() {
                    out.push(pod);
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Seconds since `t`, as a duration (zero if `t` is in the future).
    pub fn elapsed_since(&self, t: i64) -> Duration {
        Duration::from_secs(self.now.saturating_sub(t).max(0) as u64)
    }
}

/// The ordinal of a StatefulSet pod name (`mix-l1-3` → 3).
pub fn ordinal_of(pod: &str) -> Option<usize> {
    pod.rsplit_once('-')?.1.parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ready, serving, up-to-date pod of `nymnode` on revision 1.
    pub fn pod(nymnode: &str, ordinal: usize) -> PodState {
        let name = format!("{nymnode}-{ordinal}");
        PodState {
            uid: format!("{name}-uid"),
            process: format!("{name}-uid/0"),
            running: true,
            name,
            nymnode: nymnode.into(),
            ordinal: Some(ordinal),
            ready: true,
            terminating: false,
            up_to_date: true,
            serving: true,
            verified: true,
            reported_revision: Some(1),
        }
    }

    pub fn nymnodes(entries: &[(&str, usize)]) -> BTreeMap<String, NymNodeState> {
        entries
            .iter()
            .map(|(name, replicas)| {
                (
                    name.to_string(),
                    NymNodeState {
                        template_hash: Some("new".into()),
                        replicas: *replicas,
                        deleting: false,
                    },
                )
            })
            .collect()
    }

    pub fn snapshot<'a>(
        pods: &'a [PodState],
        nymnodes: &'a BTreeMap<String, NymNodeState>,
        revision: u64,
        now: i64,
    ) -> Snapshot<'a> {
        Snapshot {
            pods,
            nymnodes,
            revision,
            now,
            settle: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(60),
            withdrawal_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn laggards_are_every_ready_pod_behind_even_without_a_description() {
        let mut pods = vec![pod("mix", 0), pod("mix", 1), pod("mix", 2)];
        pods[1].reported_revision = None; // description failed: it may still route
        pods[2].running = false; // not running: routes nothing
        let nn = nymnodes(&[("mix", 3)]);
        let s = snapshot(&pods, &nn, 2, 0);
        assert_eq!(s.laggards("mix-0", 2), ["mix-1"]);
        pods[1].reported_revision = Some(2);
        let s = snapshot(&pods, &nn, 2, 0);
        assert!(s.laggards("mix-0", 2).is_empty());
    }

    #[test]
    fn wanted_follows_replicas_deletion_and_validity() {
        let pods = [pod("mix", 0), pod("mix", 1)];
        let mut nn = nymnodes(&[("mix", 1)]);
        let s = snapshot(&pods, &nn, 1, 0);
        assert!(s.pod_wanted(&pods[0]) && !s.pod_wanted(&pods[1]));
        assert_eq!(s.out_of_service(""), Vec::<String>::new());
        nn.get_mut("mix").unwrap().template_hash = None;
        let s = snapshot(&pods, &nn, 1, 0);
        assert!(s.pod_wanted(&pods[1]), "an invalid NymNode keeps its pods");
        nn.get_mut("mix").unwrap().deleting = true;
        let s = snapshot(&pods, &nn, 1, 0);
        assert!(!s.pod_wanted(&pods[0]));
        assert_eq!(ordinal_of("mix-l1-12"), Some(12));
    }
}
