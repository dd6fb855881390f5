//! Taking one pod out of service without losing a packet, the wait that upgrades,
//! scale-downs and `NymNode` deletions share:
//!
//! ```text
//!  published as not serving at revision R
//!    → every running node reports R or later
//!    → the largest per-hop delay passes (nothing is routed to the pod or held for it)
//!    → done: the pod may be deleted
//!  a node that falls behind, or a node process that was not counted (a restart, a new
//!  pod: it may have started from an older document) starts the wait again
//!  not caught up within the withdrawal timeout → timed out (the caller decides)
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Withdrawal {
    /// The pod incarnation being withdrawn (a replacement under the same name is another).
    pub uid: String,
    /// First revision that listed the pod as not serving (set once published).
    pub revision: Option<u64>,
    /// When the withdrawal began (unix seconds); its deadline runs from here.
    pub since: i64,
    /// When every running node was first seen on `revision`.
    pub caught_up_at: Option<i64>,
    /// The node processes running at `caught_up_at`: one that starts later begins the
    /// delay again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub counted: BTreeSet<String>,
}

/// Where a withdrawal stands after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not published yet.
    Publishing,
    /// These running nodes have not reported the withdrawing revision.
    Waiting { laggards: Vec<String> },
    /// Every node caught up; waiting out the largest per-hop delay.
    Settling,
    /// Nothing is routed to the pod or held for it any more.
    Done,
    /// Still waiting for `laggards` past the withdrawal timeout.
    TimedOut { laggards: Vec<String> },
}

impl Withdrawal {
    pub fn new(uid: &str, now: i64) -> Self {
        Withdrawal {
            uid: uid.into(),
            revision: None,
            since: now,
            caught_up_at: None,
            counted: BTreeSet::new(),
        }
    }

    /// Advances the wait for `pod` by what the snapshot shows.
    pub fn advance(&self, pod: &str, s: &Snapshot) -> (Withdrawal, Progress) {
        let Some(revision) = self.revision else {
            return (self.clone(), Progress::Publishing);
        };
        let laggards = s.laggards(pod, revision);
        if !laggards.is_empty() {
            let next = Withdrawal {
                caught_up_at: None,
                counted: BTreeSet::new(),
                ..self.clone()
            };
            return if s.elapsed_since(self.since) > s.withdrawal_timeout {
                (next, Progress::TimedOut { laggards })
            } else {
                (next, Progress::Waiting { laggards })
            };
        }
        let running: BTreeSet<String> = s.running(pod).map(|p| p.process.clone()).collect();
        match self.caught_up_at {
            Some(t) if running.is_subset(&self.counted) && s.elapsed_since(t) >= s.settle => {
                (self.clone(), Progress::Done)
            }
            Some(_) if running.is_subset(&self.counted) => (self.clone(), Progress::Settling),
            // First caught up, or a node process started since: the delay starts now.
            _ => (
                Withdrawal {
                    caught_up_at: Some(s.now),
                    counted: running,
                    ..self.clone()
                },
                Progress::Settling,
            ),
        }
    }

    /// Words for conditions and logs.
    pub fn describe(&self, pod: &str, progress: &Progress) -> String {
        let revision = self.revision.map_or("pending".into(), |r| r.to_string());
        match progress {
            Progress::Publishing => format!("{pod} is being withdrawn from the topology"),
            Progress::Waiting { laggards } | Progress::TimedOut { laggards } => format!(
                "{pod} withdrawn at revision {revision}; waiting for {} to load it",
                laggards.join(", ")
            ),
            Progress::Settling => format!(
                "{pod} withdrawn at revision {revision}; every node loaded it, waiting out the largest per-hop delay"
            ),
            Progress::Done => format!("{pod} withdrawn; nothing is routed to it any more"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{nymnodes, pod, snapshot};

    #[test]
    fn waits_for_every_running_node_then_the_delay_and_restarts_if_one_falls_behind() {
        let mut pods = vec![pod("mix", 0), pod("mix", 1), pod("mix", 2)];
        let nn = nymnodes(&[("mix", 3)]);
        let w = Withdrawal::new("mix-0-uid", 0);
        let (w, p) = w.advance("mix-0", &snapshot(&pods, &nn, 1, 0));
        assert_eq!(p, Progress::Publishing);
        let w = Withdrawal {
            revision: Some(2),
            ..w
        };
        pods[1].reported_revision = Some(2);
        let (w, p) = w.advance("mix-0", &snapshot(&pods, &nn, 2, 1));
        assert_eq!(
            p,
            Progress::Waiting {
                laggards: vec!["mix-2".into()]
            }
        );
        pods[2].reported_revision = Some(3);
        let (w, p) = w.advance("mix-0", &snapshot(&pods, &nn, 2, 2));
        assert_eq!((p, w.caught_up_at), (Progress::Settling, Some(2)));
        // A node restarted with an older document: the delay starts again once it catches up.
        pods[1].reported_revision = Some(1);
        let (w, p) = w.advance("mix-0", &snapshot(&pods, &nn, 2, 5));
        assert!(matches!(p, Progress::Waiting { .. }) && w.caught_up_at.is_none());
        pods[1].reported_revision = Some(2);
        let (w, _) = w.advance("mix-0", &snapshot(&pods, &nn, 2, 6));
        assert_eq!(
            w.advance("mix-0", &snapshot(&pods, &nn, 2, 15)).1,
            Progress::Settling
        );
        assert_eq!(
            w.advance("mix-0", &snapshot(&pods, &nn, 2, 16)).1,
            Progress::Done
        );
    }

    #[test]
    fn a_node_that_never_catches_up_times_out() {
        let mut pods = vec![pod("mix", 0), pod("mix", 1)];
        pods[1].reported_revision = None;
        let nn = nymnodes(&[("mix", 2)]);
        let w = Withdrawal {
            revision: Some(2),
            ..Withdrawal::new("mix-0-uid", 0)
        };
        assert!(matches!(
            w.advance("mix-0", &snapshot(&pods, &nn, 2, 30)).1,
            Progress::Waiting { .. }
        ));
        assert_eq!(
            w.advance("mix-0", &snapshot(&pods, &nn, 2, 31)).1,
            Progress::TimedOut {
                laggards: vec!["mix-1".into()]
            }
        );
    }
}
