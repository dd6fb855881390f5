//! The operator's metrics, all in one registry with the `nym_operator_` prefix.

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use nym_node::metrics::TOPOLOGY_NODE_KINDS;
use nym_node::topology::TopologyDocument;

use crate::rollout::Rollout;

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub descriptions_rejected: IntCounter,
    pods_replaced: IntCounterVec,
    pub topology_revision: IntGaugeVec,
    pub topology_nodes: IntGaugeVec,
    pub rollout_phase: IntGaugeVec,
    rollout_pod: IntGaugeVec,
    rollout_pod_seconds: HistogramVec,
    degraded: IntGaugeVec,
    events: IntCounterVec,
    pub leader: IntGauge,
    /// The label values last set per namespace (the pod under upgrade) and per `NymNode`
    /// (its `Degraded` reason), so a series that stops being true is removed, not left at 1.
    upgrading: Mutex<HashMap<String, [String; 4]>>,
    degraded_reasons: Mutex<HashMap<(String, String), String>>,
}

const PHASES: [&str; 5] = ["idle", "blocked", "withdrawing", "replacing", "halted"];

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nym_operator".into()), None).unwrap_or_default();
        let m = Metrics {
            reconciles: IntCounterVec::new(
                opts("reconciles_total", "Reconciles of NymNode resources, by result (ok, error)."),
                &["result"],
            )
            .expect("static metric definition"),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new("reconcile_duration_seconds", "Time one reconcile took.")
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .expect("static metric definition"),
            descriptions_rejected: IntCounter::new(
                "descriptions_rejected_total",
                "Ready pods whose description could not be fetched, did not verify or claimed another mode (left out of service), counted per sync.",
            )
            .expect("static metric definition"),
            pods_replaced: IntCounterVec::new(
                opts(
                    "rollout_pods_replaced_total",
                    "Pods deleted for their upgrade after being withdrawn from the topology, per namespace.",
                ),
                &["namespace"],
            )
            .expect("static metric definition"),
            topology_revision: IntGaugeVec::new(
                opts("topology_revision", "Revision of the published topology document, per namespace."),
                &["namespace"],
            )
            .expect("static metric definition"),
            topology_nodes: IntGaugeVec::new(
                opts(
                    "topology_nodes",
                    "Nodes in the published topology document, per namespace, mode, mix layer (empty for gateways) and serving state; every mix layer is listed, at 0 when empty.",
                ),
                &["namespace", "mode", "layer", "serving"],
            )
            .expect("static metric definition"),
            rollout_phase: IntGaugeVec::new(
                opts("rollout_phase", "1 for the namespace's current rollout phase (idle, blocked, withdrawing, replacing, halted)."),
                &["namespace", "phase"],
            )
            .expect("static metric definition"),
            rollout_pod: IntGaugeVec::new(
                opts(
                    "rollout_pod_started_timestamp_seconds",
                    "The pod being upgraded (withdrawing or replacing), with the unix time its upgrade began.",
                ),
                &["namespace", "nymnode", "pod", "phase"],
            )
            .expect("static metric definition"),
            rollout_pod_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "rollout_pod_duration_seconds",
                    "Time one pod's upgrade took, from its withdrawal to its replacement serving.",
                )
                .buckets(vec![15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0]),
                &["namespace"],
            )
            .expect("static metric definition"),
            degraded: IntGaugeVec::new(
                opts(
                    "nymnode_degraded",
                    "1 while a NymNode's Degraded condition is True, labelled with its reason.",
                ),
                &["namespace", "nymnode", "reason"],
            )
            .expect("static metric definition"),
            events: IntCounterVec::new(
                opts("events_total", "Kubernetes Events the operator published, by namespace, type (Normal, Warning) and reason."),
                &["namespace", "type", "reason"],
            )
            .expect("static metric definition"),
            leader: IntGauge::new("leader", "1 while this replica holds the leader lease.")
                .expect("static metric definition"),
            registry,
            upgrading: Mutex::new(HashMap::new()),
            degraded_reasons: Mutex::new(HashMap::new()),
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.descriptions_rejected.clone()),
            Box::new(m.pods_replaced.clone()),
            Box::new(m.topology_revision.clone()),
            Box::new(m.topology_nodes.clone()),
            Box::new(m.rollout_phase.clone()),
            Box::new(m.rollout_pod.clone()),
            Box::new(m.rollout_pod_seconds.clone()),
            Box::new(m.degraded.clone()),
            Box::new(m.events.clone()),
            Box::new(m.leader.clone()),
        ] {
            // Names are distinct constants; registration cannot clash.
            let _ = m.registry.register(c);
        }
        // Both results exist from the start: "no successful reconcile" reads 0, not nothing.
        for result in ["ok", "error"] {
            m.reconciles.with_label_values(&[result]);
        }
        m
    }

    /// The namespace after a sync: its document, its rollout (`previous` is the one the
    /// sync started from: a replacement that ended is one pod's upgrade done) at `now`.
    pub fn observe_network(
        &self,
        ns: &str,
        doc: &TopologyDocument,
        previous: &Rollout,
        rollout: &Rollout,
        now: i64,
    ) {
        self.topology_revision
            .with_label_values(&[ns])
            .set(doc.revision as i64);
        self.observe_nodes(ns, doc);
        let current = rollout.phase();
        for phase in PHASES {
            self.rollout_phase
                .with_label_values(&[ns, phase])
                .set((phase == current) as i64);
        }
        self.observe_upgrading(ns, rollout);
        if let Rollout::Replacing { since, .. } = previous
            && *since > 0
            && !matches!(rollout, Rollout::Replacing { .. } | Rollout::Halted { .. })
        {
            self.rollout_pod_seconds
                .with_label_values(&[ns])
                .observe(now.saturating_sub(*since) as f64);
        }
    }

    fn observe_nodes(&self, ns: &str, doc: &TopologyDocument) {
        for (mode, layer) in TOPOLOGY_NODE_KINDS {
            for serving in [true, false] {
                let count = doc
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.mode.as_str() == mode
                            && n.layer.map(|l| l.to_string()).unwrap_or_default() == layer
                            && n.serving == serving
                    })
                    .count();
                self.topology_nodes
                    .with_label_values(&[ns, mode, layer, if serving { "true" } else { "false" }])
                    .set(count as i64);
            }
        }
    }

    fn observe_upgrading(&self, ns: &str, rollout: &Rollout) {
        let mut upgrading = self.upgrading.lock();
        let now = rollout.upgrading().map(|(pod, nymnode, since)| {
            (
                [
                    ns.to_string(),
                    nymnode.to_string(),
                    pod.to_string(),
                    rollout.phase().to_string(),
                ],
                since,
            )
        });
        if let Some(old) = upgrading.get(ns)
            && now.as_ref().is_none_or(|(labels, _)| labels != old)
        {
            let old: Vec<&str> = old.iter().map(String::as_str).collect();
            let _ = self.rollout_pod.remove_label_values(&old);
        }
        match now {
            Some((labels, since)) => {
                let values: Vec<&str> = labels.iter().map(String::as_str).collect();
                self.rollout_pod.with_label_values(&values).set(since);
                upgrading.insert(ns.to_string(), labels);
            }
            None => {
                upgrading.remove(ns);
            }
        }
    }

    /// Drops every series describing a network (documents, rollouts, Degraded NymNodes):
    /// a replica that lost the lease must not keep reporting a rollout it no longer runs.
    /// Counters and histograms stay (they count what this replica did).
    pub fn forget_networks(&self) {
        self.topology_revision.reset();
        self.topology_nodes.reset();
        self.rollout_phase.reset();
        self.rollout_pod.reset();
        self.degraded.reset();
        self.upgrading.lock().clear();
        self.degraded_reasons.lock().clear();
    }

    /// A pod deleted for its upgrade.
    pub fn pod_replaced(&self, ns: &str) {
        self.pods_replaced.with_label_values(&[ns]).inc();
    }

    /// The `Degraded` condition a `NymNode`'s status now has (`None`: not degraded, or the
    /// `NymNode` is gone).
    pub fn observe_degraded(&self, ns: &str, nymnode: &str, reason: Option<&str>) {
        let key = (ns.to_string(), nymnode.to_string());
        let mut reasons = self.degraded_reasons.lock();
        if let Some(old) = reasons.get(&key)
            && reason != Some(old.as_str())
        {
            let _ = self.degraded.remove_label_values(&[ns, nymnode, old]);
        }
        match reason {
            Some(r) => {
                self.degraded.with_label_values(&[ns, nymnode, r]).set(1);
                reasons.insert(key, r.to_string());
            }
            None => {
                reasons.remove(&key);
            }
        }
    }

    /// An Event published.
    pub fn event(&self, ns: &str, type_: &str, reason: &str) {
        self.events.with_label_values(&[ns, type_, reason]).inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::withdrawal::Withdrawal;

    fn document() -> TopologyDocument {
        TopologyDocument::issue(7, vec![])
    }

    fn withdrawing(pod: &str, since: i64) -> Rollout {
        Rollout::Withdrawing {
            pod: pod.into(),
            nymnode: "mix".into(),
            withdrawal: Withdrawal::new("uid", since),
        }
    }

    fn replacing(pod: &str, since: i64) -> Rollout {
        Rollout::Replacing {
            pod: pod.into(),
            nymnode: "mix".into(),
            old_uid: "uid".into(),
            deleted_at: since + 40,
            since,
        }
    }

    #[test]
    fn the_pod_under_upgrade_is_one_series_and_a_finished_pod_is_timed() {
        let m = Metrics::new();
        let doc = document();
        m.observe_network(
            "ns",
            &doc,
            &Rollout::Idle,
            &withdrawing("mix-0", 1000),
            1000,
        );
        m.observe_network(
            "ns",
            &doc,
            &withdrawing("mix-0", 1000),
            &replacing("mix-0", 1000),
            1050,
        );
        let text = m.render();
        assert!(text.contains(
            r#"nym_operator_rollout_pod_started_timestamp_seconds{namespace="ns",nymnode="mix",phase="replacing",pod="mix-0"} 1000"#
        ), "{text}");
        assert!(
            !text.contains(r#"phase="withdrawing",pod="mix-0""#),
            "the old phase's series is gone: {text}"
        );
        // The replacement serves: one pod took 90 s; the next pod starts.
        m.observe_network(
            "ns",
            &doc,
            &replacing("mix-0", 1000),
            &withdrawing("mix-1", 1090),
            1090,
        );
        let text = m.render();
        assert!(
            text.contains(r#"nym_operator_rollout_pod_duration_seconds_sum{namespace="ns"} 90"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pod="mix-1""#) && !text.contains(r#"pod="mix-0""#),
            "{text}"
        );
        m.observe_network(
            "ns",
            &doc,
            &withdrawing("mix-1", 1090),
            &Rollout::Idle,
            1100,
        );
        let text = m.render();
        assert!(
            !text.contains("nym_operator_rollout_pod_started_timestamp_seconds{"),
            "{text}"
        );
        assert!(
            text.contains(r#"nym_operator_rollout_pod_duration_seconds_count{namespace="ns"} 1"#)
        );
        // Every mix layer has a series, even with no node in it.
        assert!(text.contains(
            r#"nym_operator_topology_nodes{layer="3",mode="mixnode",namespace="ns",serving="true"} 0"#
        ), "{text}");
    }

    #[test]
    fn a_degraded_nymnode_has_one_series_with_its_current_reason_until_it_recovers() {
        let m = Metrics::new();
        m.observe_degraded("ns", "exit", Some("InvalidSpec"));
        m.observe_degraded("ns", "exit", Some("RolloutStuck"));
        let text = m.render();
        assert!(text.contains(r#"nym_operator_nymnode_degraded{namespace="ns",nymnode="exit",reason="RolloutStuck"} 1"#));
        assert!(!text.contains("InvalidSpec"), "{text}");
        m.observe_degraded("ns", "exit", None);
        assert!(!m.render().contains("nym_operator_nymnode_degraded{"));
    }

    #[test]
    fn a_replica_that_lost_the_lease_reports_no_network() {
        let m = Metrics::new();
        m.observe_network(
            "ns",
            &document(),
            &Rollout::Idle,
            &withdrawing("mix-0", 10),
            10,
        );
        m.observe_degraded("ns", "exit", Some("InvalidSpec"));
        m.forget_networks();
        let text = m.render();
        for gone in [
            "topology_revision{",
            "topology_nodes{",
            "rollout_phase{",
            "rollout_pod_started",
            "nymnode_degraded{",
        ] {
            assert!(
                !text.contains(&format!("nym_operator_{gone}")),
                "{gone}: {text}"
            );
        }
        // Leading again, the same NymNode's state is reported afresh.
        m.observe_degraded("ns", "exit", Some("InvalidSpec"));
        assert!(m.render().contains("nym_operator_nymnode_degraded{"));
    }
}
