//! Pods leaving the network for good: those beyond a lowered `spec.replicas` and every pod
//! of a `NymNode` being deleted. Each is withdrawn from the topology first (withdrawal.rs);
//! only once nothing is routed to it does the operator lower the StatefulSet's replicas
//! (the StatefulSet controller then deletes it, and its drain releases what it holds) or
//! remove the `NymNode`'s finalizer (garbage collection then deletes its pods).
//!
//! Pure, like the rollout: the reconciler persists the set on the topology ConfigMap and
//! applies what [`Plan`] says.

use std::collections::{BTreeMap, BTreeSet};

use crate::snapshot::{PodState, Snapshot};
use crate::withdrawal::{Progress, Withdrawal};

/// The pods being retired, by name.
pub type Retirements = BTreeMap<String, Withdrawal>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Every pod being retired, withdrawn from the topology.
    pub retiring: Retirements,
    /// Retiring pods whose withdrawal is complete: they may go.
    pub released: BTreeSet<String>,
    /// Retiring pods still waiting past the withdrawal timeout, with the nodes they wait for.
    pub stuck: BTreeMap<String, Vec<String>>,
}

impl Plan {
    /// Replicas the StatefulSet of `nymnode` must keep: its spec's count, raised to keep
    /// every pod whose withdrawal is not complete (the StatefulSet removes the highest
    /// ordinals first).
    pub fn replicas(&self, nymnode: &str, desired: usize, pods: &[PodState]) -> usize {
        pods.iter()
            .filter(|p| p.nymnode == nymnode && !p.terminating)
            .filter(|p| self.retiring.contains_key(&p.name) && !self.released.contains(&p.name))
            .filter_map(|p| p.ordinal.map(|o| o + 1))
            .fold(desired, usize::max)
    }

    /// Whether every pod of a `NymNode` being deleted has been withdrawn (or is gone).
    pub fn all_released(&self, nymnode: &str, pods: &[PodState]) -> bool {
        pods.iter()
            .filter(|p| p.nymnode == nymnode && !p.terminating)
            .all(|p| self.released.contains(&p.name))
    }
}

/// Advances every retirement; starts one for each pod that is no longer wanted.
pub fn step(previous: &Retirements, s: &Snapshot) -> Plan {
    let mut plan = Plan::default();
    for p in s.pods.iter().filter(|p| !p.terminating && !s.pod_wanted(p)) {
        let withdrawal = previous
            .get(&p.name)
            .filter(|w| w.uid == p.uid)
            .cloned()
            .unwrap_or_else(|| Withdrawal::new(&p.uid, s.now));
        let (withdrawal, progress) = withdrawal.advance(&p.name, s);
        match progress {
            Progress::Done => {
                plan.released.insert(p.name.clone());
            }
            // The pod stays withdrawn and waits on: removing it while a node may still
            // route to it would lose packets.
            Progress::TimedOut { laggards } => {
                plan.stuck.insert(p.name.clone(), laggards);
            }
            Progress::Publishing | Progress::Waiting { .. } | Progress::Settling => {}
        }
        plan.retiring.insert(p.name.clone(), withdrawal);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{nymnodes, pod, snapshot};

    fn publish(plan: &Plan, revision: u64) -> Retirements {
        plan.retiring
            .iter()
            .map(|(k, w)| {
                let mut w = w.clone();
                w.revision.get_or_insert(revision);
                (k.clone(), w)
            })
            .collect()
    }

    #[test]
    fn scale_down_keeps_the_pods_until_their_withdrawal_is_complete() {
        let mut nn = nymnodes(&[("mix", 3)]);
        let pods = vec![pod("mix", 0), pod("mix", 1), pod("mix", 2)];
        let s = snapshot(&pods, &nn, 1, 0);
        assert_eq!(step(&Retirements::new(), &s), Plan::default());
        nn.get_mut("mix").unwrap().replicas = 1;
        let s = snapshot(&pods, &nn, 1, 0);
        let plan = step(&Retirements::new(), &s);
        assert_eq!(plan.retiring.keys().collect::<Vec<_>>(), ["mix-1", "mix-2"]);
        assert_eq!(plan.replicas("mix", 1, &pods), 3);
        // Published at revision 1, which every node runs: settle, then release.
        let retiring = publish(&plan, 1);
        let plan = step(&retiring, &snapshot(&pods, &nn, 1, 1));
        assert!(plan.released.is_empty());
        let retiring = publish(&plan, 1);
        let s = snapshot(&pods, &nn, 1, 11);
        let plan = step(&retiring, &s);
        assert_eq!(plan.released.len(), 2);
        assert_eq!(plan.replicas("mix", 1, &pods), 1);
        // Scaled back up before the end: the pod is wanted again and leaves the set.
        nn.get_mut("mix").unwrap().replicas = 2;
        let plan = step(&retiring, &snapshot(&pods, &nn, 1, 11));
        assert_eq!(plan.retiring.keys().collect::<Vec<_>>(), ["mix-2"]);
    }

    #[test]
    fn a_deleted_nymnode_is_released_once_all_its_pods_are_withdrawn() {
        let mut nn = nymnodes(&[("gw", 2), ("mix", 1)]);
        nn.get_mut("gw").unwrap().deleting = true;
        let mut pods = vec![pod("gw", 0), pod("gw", 1), pod("mix", 0)];
        pods[2].reported_revision = Some(1);
        let plan = step(&Retirements::new(), &snapshot(&pods, &nn, 1, 0));
        assert!(!plan.all_released("gw", &pods));
        let retiring = publish(&plan, 2);
        // mix-0 has not loaded revision 2 yet.
        let plan = step(&retiring, &snapshot(&pods, &nn, 2, 100));
        assert!(plan.released.is_empty());
        assert_eq!(plan.stuck["gw-0"], ["gw-1", "mix-0"]);
        pods[2].reported_revision = Some(2);
        pods[0].reported_revision = Some(2);
        pods[1].reported_revision = Some(2);
        let plan = step(&plan.retiring, &snapshot(&pods, &nn, 2, 101));
        let plan = step(&plan.retiring, &snapshot(&pods, &nn, 2, 111));
        assert!(plan.all_released("gw", &pods));
    }
}
