//! The upgrade state machine: one pod of the whole namespace at a time, and nothing lost.
//!
//! ```text
//!  Idle ──(an outdated pod; every other pod ready and serving)──► Withdrawing
//!  Withdrawing: the pod is published as not serving at revision R;
//!     wait until every serving node reports revision ≥ R, then the largest per-hop delay
//!     (nothing is routed to the pod or held for it any more) ──► delete it ──► Replacing
//!  Replacing: wait until the new pod (same name, new uid) is ready, up to date and serving
//!     ──► Idle                   (not ready within the deadline ──► Halted)
//!  Halted: no pod is touched until the NymNode's pod template changes.
//! ```
//!
//! Pure: it reads a snapshot and the clock it is given and returns the next state and at
//! most one action, so tests drive it exactly. The state is persisted by the reconciler
//! (an annotation on the topology ConfigMap) in the same write that publishes a withdrawal,
//! so a restarted or newly elected operator resumes where the last one stopped.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Rollout {
    #[default]
    Idle,
    #[serde(rename_all = "camelCase")]
    Withdrawing {
        pod: String,
        nymnode: String,
        uid: String,
        /// Revision that first listed the pod as not serving (set when published).
        revision: Option<u64>,
        /// When every serving node first reported `revision` (unix seconds).
        caught_up_at: Option<i64>,
    },
    #[serde(rename_all = "camelCase")]
    Replacing {
        pod: String,
        nymnode: String,
        old_uid: String,
        deleted_at: i64,
    },
    #[serde(rename_all = "camelCase")]
    Halted {
        pod: String,
        nymnode: String,
        /// The template hash the halted rollout was heading for; a different one resumes.
        template_hash: String,
        reason: String,
    },
}

impl Rollout {
    /// The pod the topology must list as not serving: from its withdrawal until its
    /// replacement is ready (the old pod keeps serving the packets in flight, but nothing
    /// new is routed to it; the new one is listed once it is ready and up to date).
    pub fn withdrawn(&self) -> Option<&str> {
        match self {
            Rollout::Withdrawing { pod, .. } | Rollout::Replacing { pod, .. } => Some(pod),
            _ => None,
        }
    }

    /// The `NymNode` whose pod is being upgraded (or whose rollout is halted).
    pub fn nymnode(&self) -> Option<&str> {
        match self {
            Rollout::Idle => None,
            Rollout::Withdrawing { nymnode, .. }
            | Rollout::Replacing { nymnode, .. }
            | Rollout::Halted { nymnode, .. } => Some(nymnode),
        }
    }

    /// Words for the `Progressing` or `Degraded` condition.
    pub fn describe(&self) -> String {
        match self {
            Rollout::Idle => "no upgrade in progress".into(),
            Rollout::Withdrawing {
                pod,
                revision,
                caught_up_at: None,
                ..
            } => format!(
                "upgrading {pod}: withdrawn from the topology (revision {}), waiting for every serving node to load it",
                revision.map_or("pending".into(), |r| r.to_string())
            ),
            Rollout::Withdrawing { pod, .. } => format!(
                "upgrading {pod}: every node stopped routing to it; waiting out the largest per-hop delay"
            ),
            Rollout::Replacing { pod, .. } => {
                format!(
                    "upgrading {pod}: deleted; waiting for its replacement to be ready and serving"
                )
            }
            Rollout::Halted { reason, .. } => reason.clone(),
        }
    }
}

/// One pod of the namespace, as the rollout sees it.
#[derive(Debug, Clone)]
pub struct PodState {
    pub name: String,
    pub nymnode: String,
    pub uid: String,
    pub ready: bool,
    pub terminating: bool,
    /// Carries its `NymNode`'s current template hash.
    pub up_to_date: bool,
    /// Listed as serving in the published topology document.
    pub serving: bool,
    /// The topology revision its verified description reports.
    pub reported_revision: Option<u64>,
}

/// Everything a step looks at.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub pods: &'a [PodState],
    /// Pods each `NymNode` should have (its replicas).
    pub desired: &'a BTreeMap<String, usize>,
    /// Current template hash of each `NymNode`.
    pub template_hashes: &'a BTreeMap<String, String>,
    /// Unix seconds.
    pub now: i64,
    /// Largest per-hop delay any node of the namespace accepts.
    pub settle: Duration,
    /// How long a replacement pod may take to become ready.
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Delete this pod (its drain releases what it holds); the uid guards against deleting
    /// a replacement that already took the name.
    DeletePod { name: String, uid: String },
}

/// Advances the rollout by at most one transition.
pub fn step(state: &Rollout, s: &Snapshot) -> (Rollout, Option<Action>) {
    let pod = |name: &str| s.pods.iter().find(|p| p.name == name);
    match state {
        Rollout::Halted {
            nymnode,
            template_hash,
            ..
        } if s.template_hashes.get(nymnode) == Some(template_hash) => (state.clone(), None),
        Rollout::Idle | Rollout::Halted { .. } => match next_candidate(s) {
            Some(p) => (
                Rollout::Withdrawing {
                    pod: p.name.clone(),
                    nymnode: p.nymnode.clone(),
                    uid: p.uid.clone(),
                    revision: None,
                    caught_up_at: None,
                },
                None,
            ),
            None => (Rollout::Idle, None),
        },
        Rollout::Withdrawing {
            pod: name,
            nymnode,
            uid,
            revision,
            caught_up_at,
        } => {
            let Some(p) = pod(name).filter(|p| &p.uid == uid && !p.terminating) else {
                // Deleted by someone else meanwhile: carry on as if we had.
                return (
                    Rollout::Replacing {
                        pod: name.clone(),
                        nymnode: nymnode.clone(),
                        old_uid: uid.clone(),
                        deleted_at: s.now,
                    },
                    None,
                );
            };
            let Some(revision) = revision else {
                return (state.clone(), None);
            };
            let caught_up = s
                .pods
                .iter()
                .filter(|q| q.serving && q.name != p.name)
                .all(|q| q.reported_revision.is_some_and(|r| r >= *revision));
            match caught_up_at {
                None if caught_up => (
                    Rollout::Withdrawing {
                        pod: name.clone(),
                        nymnode: nymnode.clone(),
                        uid: uid.clone(),
                        revision: Some(*revision),
                        caught_up_at: Some(s.now),
                    },
                    None,
                ),
                Some(t) if s.now - t >= s.settle.as_secs() as i64 => (
                    Rollout::Replacing {
                        pod: name.clone(),
                        nymnode: nymnode.clone(),
                        old_uid: uid.clone(),
                        deleted_at: s.now,
                    },
                    Some(Action::DeletePod {
                        name: name.clone(),
                        uid: uid.clone(),
                    }),
                ),
                _ => (state.clone(), None),
            }
        }
        Rollout::Replacing {
            pod: name,
            nymnode,
            old_uid,
            deleted_at,
        } => match pod(name) {
            // The delete did not happen (or failed): ask again.
            Some(p) if &p.uid == old_uid && !p.terminating => (
                state.clone(),
                Some(Action::DeletePod {
                    name: name.clone(),
                    uid: old_uid.clone(),
                }),
            ),
            // Ready and up to date: back in service with this step's document.
            Some(p) if &p.uid != old_uid && p.ready && p.up_to_date && !p.terminating => {
                (Rollout::Idle, None)
            }
            _ if s.now - deleted_at > s.ready_timeout.as_secs() as i64 => (
                Rollout::Halted {
                    pod: name.clone(),
                    nymnode: nymnode.clone(),
                    template_hash: s.template_hashes.get(nymnode).cloned().unwrap_or_default(),
                    reason: format!(
                        "rollout stopped: {name} was not ready and serving within {}s of its replacement; no further pod is touched until the spec changes",
                        s.ready_timeout.as_secs()
                    ),
                },
                None,
            ),
            _ => (state.clone(), None),
        },
    }
}

/// The next pod to upgrade, if the network can spare it: every other pod exists, is ready
/// and is serving, so taking this one out leaves at most one node out of service.
fn next_candidate<'a>(s: &Snapshot<'a>) -> Option<&'a PodState> {
    let outdated = s
        .pods
        .iter()
        .filter(|p| !p.up_to_date && !p.terminating)
        .min_by(|a, b| (&a.nymnode, &a.name).cmp(&(&b.nymnode, &b.name)))?;
    let complete = s
        .desired
        .iter()
        .all(|(nn, want)| s.pods.iter().filter(|p| &p.nymnode == nn).count() >= *want);
    let others_healthy = s
        .pods
        .iter()
        .filter(|p| p.name != outdated.name)
        .all(|p| p.ready && p.serving && !p.terminating);
    (complete && others_healthy).then_some(outdated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, up_to_date: bool) -> PodState {
        PodState {
            name: name.into(),
            nymnode: "mix".into(),
            uid: format!("{name}-uid"),
            ready: true,
            terminating: false,
            up_to_date,
            serving: true,
            reported_revision: Some(1),
        }
    }

    fn snapshot<'a>(
        pods: &'a [PodState],
        desired: &'a BTreeMap<String, usize>,
        hashes: &'a BTreeMap<String, String>,
        now: i64,
    ) -> Snapshot<'a> {
        Snapshot {
            pods,
            desired,
            template_hashes: hashes,
            now,
            settle: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn withdraw_wait_for_revision_and_delay_then_delete() {
        let desired = BTreeMap::from([("mix".to_string(), 2)]);
        let hashes = BTreeMap::from([("mix".to_string(), "new".to_string())]);
        let mut pods = vec![pod("mix-0", false), pod("mix-1", true)];
        let (s1, a) = step(&Rollout::Idle, &snapshot(&pods, &desired, &hashes, 0));
        assert!(a.is_none());
        assert_eq!(s1.withdrawn(), Some("mix-0"));
        // Published at revision 2; mix-1 still reports 1: keep waiting.
        let s1 = match s1 {
            Rollout::Withdrawing {
                pod, nymnode, uid, ..
            } => Rollout::Withdrawing {
                pod,
                nymnode,
                uid,
                revision: Some(2),
                caught_up_at: None,
            },
            other => panic!("{other:?}"),
        };
        pods[0].serving = false;
        let (s2, a) = step(&s1, &snapshot(&pods, &desired, &hashes, 5));
        assert_eq!((s2.clone(), a), (s1.clone(), None));
        pods[1].reported_revision = Some(2);
        let (s3, a) = step(&s2, &snapshot(&pods, &desired, &hashes, 6));
        assert!(
            a.is_none()
                && matches!(
                    s3,
                    Rollout::Withdrawing {
                        caught_up_at: Some(6),
                        ..
                    }
                )
        );
        // Not before the largest per-hop delay has passed since.
        assert!(
            step(&s3, &snapshot(&pods, &desired, &hashes, 15))
                .1
                .is_none()
        );
        let (s4, a) = step(&s3, &snapshot(&pods, &desired, &hashes, 16));
        assert_eq!(
            a,
            Some(Action::DeletePod {
                name: "mix-0".into(),
                uid: "mix-0-uid".into()
            })
        );
        assert!(matches!(s4, Rollout::Replacing { .. }));
    }

    #[test]
    fn no_withdrawal_while_another_pod_is_out_of_service() {
        let desired = BTreeMap::from([("mix".to_string(), 2)]);
        let hashes = BTreeMap::from([("mix".to_string(), "new".to_string())]);
        let mut pods = vec![pod("mix-0", false), pod("mix-1", true)];
        pods[1].ready = false;
        assert_eq!(
            step(&Rollout::Idle, &snapshot(&pods, &desired, &hashes, 0)).0,
            Rollout::Idle
        );
        // A missing pod (still being created) also holds the rollout back.
        let pods = vec![pod("mix-0", false)];
        assert_eq!(
            step(&Rollout::Idle, &snapshot(&pods, &desired, &hashes, 0)).0,
            Rollout::Idle
        );
    }

    #[test]
    fn a_replacement_that_never_gets_ready_halts_until_the_spec_changes() {
        let desired = BTreeMap::from([("mix".to_string(), 2)]);
        let mut hashes = BTreeMap::from([("mix".to_string(), "new".to_string())]);
        let mut new = pod("mix-0", true);
        new.uid = "fresh".into();
        new.ready = false;
        new.serving = false;
        let pods = vec![new, pod("mix-1", false)];
        let replacing = Rollout::Replacing {
            pod: "mix-0".into(),
            nymnode: "mix".into(),
            old_uid: "mix-0-uid".into(),
            deleted_at: 0,
        };
        assert_eq!(
            step(&replacing, &snapshot(&pods, &desired, &hashes, 60)).0,
            replacing
        );
        let (halted, _) = step(&replacing, &snapshot(&pods, &desired, &hashes, 61));
        assert!(matches!(&halted, Rollout::Halted { template_hash, .. } if template_hash == "new"));
        // mix-1 is outdated but is not touched while halted ...
        assert_eq!(
            step(&halted, &snapshot(&pods, &desired, &hashes, 1000)).0,
            halted
        );
        // ... until the template changes (and then only once the network is healthy again).
        hashes.insert("mix".into(), "newer".into());
        assert_eq!(
            step(&halted, &snapshot(&pods, &desired, &hashes, 1001)).0,
            Rollout::Idle
        );
    }
}
