//! The upgrade state machine: one pod of the whole namespace at a time, and nothing lost.
//!
//! ```text
//!  Idle/Blocked ──(an outdated pod that serves nobody already, or else an outdated pod
//!                  while every other wanted pod is in service)──► Withdrawing
//!  Idle/Blocked ──(outdated pods, none can be taken)──► Blocked (Degraded after the
//!                  ready timeout, naming the pods it waits for)
//!  Withdrawing: published as not serving; every running node loads that revision, then the
//!     largest per-hop delay passes (withdrawal.rs) ──► re-check: if the pod still serves
//!     traffic and another wanted pod is out of service, give it back (Idle); else delete
//!     it ──► Replacing
//!     (not caught up within the withdrawal timeout ──► Halted, the pod given back)
//!  Replacing: the new pod (same name, new uid) is ready and its description verifies
//!     ──► Idle      (not within the ready timeout ──► Halted)
//!  Halted: nothing is touched until its NymNode's template changes, or what it waited for
//!     happened after all (the pod turned ready; every node caught up).
//!  Any phase ──(its NymNode deleted, or the pod scaled away)──► Idle (retirement.rs
//!     withdraws pods that are no longer wanted).
//! ```
//!
//! Pure: it reads a snapshot and returns the next state and at most one action, so tests
//! drive it exactly. The reconciler persists the state (an annotation on the topology
//! ConfigMap) in the same write that publishes its effect, so a restarted or newly elected
//! operator resumes where the last one stopped.

use serde::{Deserialize, Serialize};

use crate::snapshot::{PodState, Snapshot};
use crate::withdrawal::{Progress, Withdrawal};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Rollout {
    #[default]
    Idle,
    /// Outdated pods wait because these wanted pods are out of service.
    #[serde(rename_all = "camelCase")]
    Blocked {
        since: i64,
        waiting_for: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Withdrawing {
        pod: String,
        nymnode: String,
        withdrawal: Withdrawal,
    },
    #[serde(rename_all = "camelCase")]
    Replacing {
        pod: String,
        nymnode: String,
        old_uid: String,
        deleted_at: i64,
        /// When the pod's upgrade began (its withdrawal), for the time one pod takes; 0 in
        /// state an older operator wrote.
        #[serde(default)]
        since: i64,
    },
    #[serde(rename_all = "camelCase")]
    Halted {
        pod: String,
        nymnode: String,
        /// The template hash the halted rollout was heading for; a different one resumes.
        template_hash: String,
        cause: HaltCause,
        reason: String,
    },
}

/// Why a rollout halted, and so what resumes it besides a new template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum HaltCause {
    /// The replacement was not ready in time; resumes once it is.
    NotReady,
    /// Running nodes did not load the withdrawing revision in time; resumes once every
    /// running node reports the document published after the halt.
    NotCaughtUp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Delete this pod (its drain releases what it holds); the uid guards against deleting
    /// a replacement that already took the name.
    DeletePod { name: String, uid: String },
}

impl Rollout {
    /// The pod the topology must list as not serving: from its withdrawal until its
    /// replacement is ready (the old pod keeps serving the packets in flight, but nothing
    /// new is routed to it; the new one is listed once it is ready).
    pub fn withdrawn(&self) -> Option<&str> {
        match self {
            Rollout::Withdrawing { pod, .. } | Rollout::Replacing { pod, .. } => Some(pod),
            _ => None,
        }
    }

    /// The `NymNode` whose pod is being upgraded (or whose rollout is halted).
    pub fn nymnode(&self) -> Option<&str> {
        match self {
            Rollout::Idle | Rollout::Blocked { .. } => None,
            Rollout::Withdrawing { nymnode, .. }
            | Rollout::Replacing { nymnode, .. }
            | Rollout::Halted { nymnode, .. } => Some(nymnode),
        }
    }

    /// The pod being upgraded and when its upgrade began (its withdrawal), while one is.
    pub fn upgrading(&self) -> Option<(&str, &str, i64)> {
        match self {
            Rollout::Withdrawing {
                pod,
                nymnode,
                withdrawal,
            } => Some((pod, nymnode, withdrawal.since)),
            Rollout::Replacing {
                pod,
                nymnode,
                since,
                deleted_at,
                ..
            } => Some((pod, nymnode, if *since > 0 { *since } else { *deleted_at })),
            _ => None,
        }
    }

    /// The phase's name, for metrics and logs.
    pub fn phase(&self) -> &'static str {
        match self {
            Rollout::Idle => "idle",
            Rollout::Blocked { .. } => "blocked",
            Rollout::Withdrawing { .. } => "withdrawing",
            Rollout::Replacing { .. } => "replacing",
            Rollout::Halted { .. } => "halted",
        }
    }

    /// Words for the `Progressing` or `Degraded` condition.
    pub fn describe(&self) -> String {
        match self {
            Rollout::Idle => "no upgrade in progress".into(),
            Rollout::Blocked { waiting_for, .. } => format!(
                "upgrades wait: {} out of service (the network upgrades one pod at a time, and only while the others serve)",
                waiting_for.join(", ")
            ),
            Rollout::Withdrawing {
                pod, withdrawal, ..
            } => {
                let progress = match (withdrawal.revision, withdrawal.caught_up_at) {
                    (None, _) => Progress::Publishing,
                    (Some(_), Some(_)) => Progress::Settling,
                    (Some(_), None) => Progress::Waiting {
                        laggards: vec!["every running node".into()],
                    },
                };
                format!("upgrading {}", withdrawal.describe(pod, &progress))
            }
            Rollout::Replacing { pod, .. } => {
                format!(
                    "upgrading {pod}: deleted; waiting for its replacement to be ready and serving"
                )
            }
            Rollout::Halted { reason, .. } => reason.clone(),
        }
    }
}

/// Advances the rollout by at most one transition.
pub fn step(state: &Rollout, s: &Snapshot) -> (Rollout, Option<Action>) {
    match state {
        Rollout::Idle | Rollout::Blocked { .. } => (start(state, s), None),
        Rollout::Halted { .. } if resumes(state, s) => (start(&Rollout::Idle, s), None),
        Rollout::Halted { .. } => (state.clone(), None),
        Rollout::Withdrawing {
            pod,
            nymnode,
            withdrawal,
        } => withdraw(pod, nymnode, withdrawal, s),
        Rollout::Replacing {
            pod,
            nymnode,
            old_uid,
            deleted_at,
            ..
        } => replace(state, pod, nymnode, old_uid, *deleted_at, s),
    }
}

/// Picks the next pod to upgrade, or says what the upgrades wait for.
fn start(state: &Rollout, s: &Snapshot) -> Rollout {
    let mut outdated: Vec<&PodState> = s.pods.iter().filter(|p| s.outdated(p)).collect();
    outdated.sort_by(|a, b| (&a.nymnode, &a.name).cmp(&(&b.nymnode, &b.name)));
    // One that serves nobody already (crash-looping, unready): replacing it first takes
    // nothing more out of service, and may be what heals the network.
    let idle = outdated.iter().find(|p| !p.serving);
    let next = idle.or_else(|| {
        let first = outdated.first()?;
        s.out_of_service(&first.name).is_empty().then_some(first)
    });
    match (next, outdated.is_empty()) {
        (Some(p), _) => Rollout::Withdrawing {
            pod: p.name.clone(),
            nymnode: p.nymnode.clone(),
            withdrawal: Withdrawal::new(&p.uid, s.now),
        },
        (None, true) => Rollout::Idle,
        (None, false) => Rollout::Blocked {
            since: match state {
                Rollout::Blocked { since, .. } => *since,
                _ => s.now,
            },
            waiting_for: s.out_of_service(""),
        },
    }
}

/// Whether a halted rollout may go on.
fn resumes(state: &Rollout, s: &Snapshot) -> bool {
    let Rollout::Halted {
        pod,
        nymnode,
        template_hash,
        cause,
        ..
    } = state
    else {
        return true;
    };
    let Some(n) = s.nymnodes.get(nymnode).filter(|n| !n.deleting) else {
        return true;
    };
    if n.template_hash.as_ref().is_some_and(|h| h != template_hash) {
        return true;
    }
    match cause {
        HaltCause::NotReady => s
            .pod(pod)
            .is_none_or(|p| !s.pod_wanted(p) || (p.ready && p.verified && !p.terminating)),
        HaltCause::NotCaughtUp => s.laggards("", s.revision).is_empty(),
    }
}

fn withdraw(pod: &str, nymnode: &str, w: &Withdrawal, s: &Snapshot) -> (Rollout, Option<Action>) {
    let Some(p) = s.pod(pod).filter(|p| p.uid == w.uid && !p.terminating) else {
        // Deleted by someone else meanwhile: wait for its replacement as if we had deleted it.
        return if s.wanted(nymnode, crate::snapshot::ordinal_of(pod)) {
            (replacing(pod, nymnode, &w.uid, w.since, s.now), None)
        } else {
            (Rollout::Idle, None)
        };
    };
    // Scaled away, its NymNode deleted or invalid, or the spec reverted: give it back.
    if !s.outdated(p) {
        return (Rollout::Idle, None);
    }
    let (next, progress) = w.advance(pod, s);
    match progress {
        Progress::Publishing | Progress::Waiting { .. } | Progress::Settling => (
            Rollout::Withdrawing {
                pod: pod.into(),
                nymnode: nymnode.into(),
                withdrawal: next,
            },
            None,
        ),
        Progress::TimedOut { laggards } => (
            Rollout::Halted {
                pod: pod.into(),
                nymnode: nymnode.into(),
                template_hash: template_hash(s, nymnode),
                cause: HaltCause::NotCaughtUp,
                reason: format!(
                    "rollout stopped: {} did not load revision {} (which withdrew {pod}) within {}s; {pod} serves again, and the rollout resumes once every running node reports the current document",
                    laggards.join(", "),
                    w.revision.unwrap_or_default(),
                    s.withdrawal_timeout.as_secs()
                ),
            },
            None,
        ),
        // Re-checked at the last moment: deleting a pod that still works while another is
        // out of service would take two out at once.
        Progress::Done if p.ready && !s.out_of_service(pod).is_empty() => (Rollout::Idle, None),
        Progress::Done => (
            replacing(pod, nymnode, &w.uid, w.since, s.now),
            Some(Action::DeletePod {
                name: pod.into(),
                uid: w.uid.clone(),
            }),
        ),
    }
}

fn replacing(pod: &str, nymnode: &str, uid: &str, since: i64, now: i64) -> Rollout {
    Rollout::Replacing {
        pod: pod.into(),
        nymnode: nymnode.into(),
        old_uid: uid.into(),
        deleted_at: now,
        since,
    }
}

fn template_hash(s: &Snapshot, nymnode: &str) -> String {
    s.nymnodes
        .get(nymnode)
        .and_then(|n| n.template_hash.clone())
        .unwrap_or_default()
}

fn replace(
    state: &Rollout,
    pod: &str,
    nymnode: &str,
    old_uid: &str,
    deleted_at: i64,
    s: &Snapshot,
) -> (Rollout, Option<Action>) {
    if !s.wanted(nymnode, crate::snapshot::ordinal_of(pod)) {
        return (Rollout::Idle, None);
    }
    match s.pod(pod) {
        // The delete did not happen (or failed): ask again.
        Some(p) if p.uid == old_uid && !p.terminating => (
            state.clone(),
            Some(Action::DeletePod {
                name: pod.into(),
                uid: old_uid.into(),
            }),
        ),
        // Back in service with this pass's document (up to date or not: a spec that changed
        // meanwhile is the next step's business).
        Some(p) if p.uid != old_uid && p.ready && p.verified && !p.terminating => {
            (Rollout::Idle, None)
        }
        _ if s.elapsed_since(deleted_at) > s.ready_timeout => (
            Rollout::Halted {
                pod: pod.into(),
                nymnode: nymnode.into(),
                template_hash: template_hash(s, nymnode),
                cause: HaltCause::NotReady,
                reason: format!(
                    "rollout stopped: {pod} was not ready and serving within {}s of its replacement; no further pod is touched until it is, or until the spec changes",
                    s.ready_timeout.as_secs()
                ),
            },
            None,
        ),
        _ => (state.clone(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{nymnodes, pod, snapshot};

    fn outdated(nymnode: &str, ordinal: usize) -> PodState {
        PodState {
            up_to_date: false,
            ..pod(nymnode, ordinal)
        }
    }

    /// Runs `step` and marks a fresh withdrawal as published at `revision`.
    fn published(state: Rollout, revision: u64) -> Rollout {
        match state {
            Rollout::Withdrawing {
                pod,
                nymnode,
                withdrawal,
            } => Rollout::Withdrawing {
                pod,
                nymnode,
                withdrawal: Withdrawal {
                    revision: Some(revision),
                    ..withdrawal
                },
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn withdraw_wait_for_revision_and_delay_then_delete() {
        let nn = nymnodes(&[("mix", 2)]);
        let mut pods = vec![outdated("mix", 0), pod("mix", 1)];
        let (s1, a) = step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 0));
        assert!(a.is_none());
        assert_eq!(s1.withdrawn(), Some("mix-0"));
        let s1 = published(s1, 2);
        pods[0].serving = false;
        // mix-1 still reports 1: keep waiting.
        let (s2, a) = step(&s1, &snapshot(&pods, &nn, 2, 5));
        assert_eq!((s2.clone(), a), (s1.clone(), None));
        pods[1].reported_revision = Some(2);
        let (s3, _) = step(&s2, &snapshot(&pods, &nn, 2, 6));
        // Not before the largest per-hop delay has passed since.
        assert!(step(&s3, &snapshot(&pods, &nn, 2, 15)).1.is_none());
        let (s4, a) = step(&s3, &snapshot(&pods, &nn, 2, 16));
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
    fn no_withdrawal_while_another_pod_is_out_of_service_and_blocked_says_why() {
        let nn = nymnodes(&[("mix", 2)]);
        let mut pods = vec![outdated("mix", 0), pod("mix", 1)];
        pods[1].ready = false;
        let blocked = step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 0)).0;
        assert_eq!(
            blocked,
            Rollout::Blocked {
                since: 0,
                waiting_for: vec!["mix-1".into()]
            }
        );
        // The wait keeps its start, for the deadline.
        let again = step(&blocked, &snapshot(&pods, &nn, 1, 50)).0;
        assert!(matches!(again, Rollout::Blocked { since: 0, .. }));
        // A missing pod (still being created) also holds the rollout back.
        let pods = vec![outdated("mix", 0)];
        assert!(matches!(
            step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 0)).0,
            Rollout::Blocked { waiting_for, .. } if waiting_for == ["mix-1"]
        ));
    }

    #[test]
    fn crash_looping_outdated_pods_are_replaced_without_waiting_for_health() {
        // Two pods of one NymNode crash-loop on a bad image; the fix must reach them.
        let nn = nymnodes(&[("mix", 3)]);
        let mut pods = vec![outdated("mix", 0), outdated("mix", 1), pod("mix", 2)];
        for p in &mut pods[..2] {
            p.ready = false;
            p.running = false;
            p.serving = false;
            p.verified = false;
        }
        let s1 = published(step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 0)).0, 1);
        assert_eq!(s1.withdrawn(), Some("mix-0"));
        let (s2, _) = step(&s1, &snapshot(&pods, &nn, 1, 1));
        let (_, a) = step(&s2, &snapshot(&pods, &nn, 1, 11));
        assert!(
            matches!(a, Some(Action::DeletePod { ref name, .. }) if name == "mix-0"),
            "{a:?}"
        );
    }

    #[test]
    fn a_working_pod_is_given_back_if_another_fell_out_before_the_delete() {
        let nn = nymnodes(&[("mix", 3)]);
        let mut pods = vec![outdated("mix", 0), pod("mix", 1), pod("mix", 2)];
        let s1 = published(step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 0)).0, 1);
        let (s2, _) = step(&s1, &snapshot(&pods, &nn, 1, 1));
        pods[2].ready = false;
        pods[2].running = false;
        pods[2].reported_revision = None;
        assert_eq!(
            step(&s2, &snapshot(&pods, &nn, 1, 11)),
            (Rollout::Idle, None)
        );
    }

    #[test]
    fn a_node_that_never_loads_the_withdrawal_halts_the_rollout_and_gives_the_pod_back() {
        let nn = nymnodes(&[("mix", 2)]);
        let mut pods = vec![outdated("mix", 0), pod("mix", 1)];
        pods[1].reported_revision = None; // its description fails: it may still route
        let s1 = published(step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 0)).0, 2);
        let (halted, a) = step(&s1, &snapshot(&pods, &nn, 2, 31));
        assert!(a.is_none());
        assert!(
            matches!(&halted, Rollout::Halted { cause: HaltCause::NotCaughtUp, reason, .. } if reason.contains("mix-1")),
            "{halted:?}"
        );
        assert_eq!(halted.withdrawn(), None);
        // Resumes once every running node reports the current document.
        assert_eq!(step(&halted, &snapshot(&pods, &nn, 3, 40)).0, halted);
        pods[0].reported_revision = Some(3);
        pods[1].reported_revision = Some(3);
        assert!(matches!(
            step(&halted, &snapshot(&pods, &nn, 3, 41)).0,
            Rollout::Withdrawing { .. }
        ));
    }

    #[test]
    fn a_replacement_that_never_gets_ready_halts_until_it_does_or_the_spec_changes() {
        let mut nn = nymnodes(&[("mix", 2)]);
        let mut new = pod("mix", 0);
        new.uid = "fresh".into();
        new.ready = false;
        new.serving = false;
        new.verified = false;
        let mut pods = vec![new, outdated("mix", 1)];
        let replacing = replacing("mix-0", "mix", "mix-0-uid", 0, 0);
        assert_eq!(step(&replacing, &snapshot(&pods, &nn, 1, 60)).0, replacing);
        let (halted, _) = step(&replacing, &snapshot(&pods, &nn, 1, 61));
        assert!(matches!(&halted, Rollout::Halted { template_hash, .. } if template_hash == "new"));
        // mix-1 is outdated but is not touched while halted ...
        assert_eq!(step(&halted, &snapshot(&pods, &nn, 1, 1000)).0, halted);
        // ... until the template changes (then it waits for the network to be whole) ...
        nn.get_mut("mix").unwrap().template_hash = Some("newer".into());
        assert!(matches!(
            step(&halted, &snapshot(&pods, &nn, 1, 1001)).0,
            Rollout::Blocked { waiting_for, .. } if waiting_for == ["mix-0"]
        ));
        // ... or the replacement turns ready after all.
        nn.get_mut("mix").unwrap().template_hash = Some("new".into());
        pods[0].ready = true;
        pods[0].verified = true;
        pods[0].serving = true;
        assert!(matches!(
            step(&halted, &snapshot(&pods, &nn, 1, 1002)).0,
            Rollout::Withdrawing { pod, .. } if pod == "mix-1"
        ));
    }

    #[test]
    fn scaling_away_or_deleting_the_nymnode_under_upgrade_frees_the_rollout() {
        let mut nn = nymnodes(&[("mix", 2), ("other", 1)]);
        let pods = vec![pod("mix", 0), outdated("mix", 1), outdated("other", 0)];
        let replacing = replacing("mix-1", "mix", "old", 0, 0);
        nn.get_mut("mix").unwrap().replicas = 1;
        assert_eq!(
            step(&replacing, &snapshot(&pods, &nn, 1, 1)).0,
            Rollout::Idle
        );
        nn.get_mut("mix").unwrap().replicas = 2;
        nn.get_mut("mix").unwrap().deleting = true;
        assert_eq!(
            step(&replacing, &snapshot(&pods, &nn, 1, 1)).0,
            Rollout::Idle
        );
        let withdrawing = Rollout::Withdrawing {
            pod: "mix-1".into(),
            nymnode: "mix".into(),
            withdrawal: Withdrawal::new("mix-1-uid", 0),
        };
        assert_eq!(
            step(&withdrawing, &snapshot(&pods, &nn, 1, 1)).0,
            Rollout::Idle
        );
        nn.remove("mix");
        assert_eq!(
            step(&withdrawing, &snapshot(&pods, &nn, 1, 1)).0,
            Rollout::Idle
        );
    }

    #[test]
    fn a_spec_change_during_the_replacement_does_not_halt_it() {
        let nn = nymnodes(&[("mix", 2)]);
        // The replacement came up from the previous template: not up to date, but back.
        let mut new = outdated("mix", 0);
        new.uid = "fresh".into();
        let pods = vec![new, pod("mix", 1)];
        let replacing = replacing("mix-0", "mix", "mix-0-uid", 0, 0);
        assert_eq!(
            step(&replacing, &snapshot(&pods, &nn, 1, 5)).0,
            Rollout::Idle
        );
        // And the next pass takes it again for the newer template.
        assert!(matches!(
            step(&Rollout::Idle, &snapshot(&pods, &nn, 1, 6)).0,
            Rollout::Withdrawing { pod, .. } if pod == "mix-0"
        ));
    }

    #[test]
    fn state_round_trips_through_its_annotation() {
        for state in [
            Rollout::Idle,
            Rollout::Blocked {
                since: 3,
                waiting_for: vec!["a-0".into()],
            },
            published(
                Rollout::Withdrawing {
                    pod: "a-0".into(),
                    nymnode: "a".into(),
                    withdrawal: Withdrawal::new("u", 1),
                },
                4,
            ),
            replacing("a-0", "a", "u", 0, 2),
            Rollout::Halted {
                pod: "a-0".into(),
                nymnode: "a".into(),
                template_hash: "h".into(),
                cause: HaltCause::NotCaughtUp,
                reason: "r".into(),
            },
        ] {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(
                serde_json::from_str::<Rollout>(&json).unwrap(),
                state,
                "{json}"
            );
        }
    }
}
