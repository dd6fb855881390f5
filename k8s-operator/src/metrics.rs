//! The operator's metrics, all in one registry with the `nym_operator_` prefix.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use nym_node::topology::TopologyDocument;

use crate::rollout::Rollout;

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub descriptions_rejected: IntCounter,
    pub pods_replaced: IntCounter,
    pub topology_revision: IntGaugeVec,
    pub topology_nodes: IntGaugeVec,
    pub rollout_phase: IntGaugeVec,
    pub leader: IntGauge,
}

const PHASES: [&str; 5] = ["idle", "blocked", "withdrawing", "replacing", "halted"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nym_operator".into()), None).unwrap_or_default();
        let m = Metrics {
            reconciles: IntCounterVec::new(
                Opts::new("reconciles_total", "Reconciles of NymNode resources, by result (ok, error)."),
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
                "Ready pods whose description could not be fetched, did not verify or claimed another mode (left out of service).",
            )
            .expect("static metric definition"),
            pods_replaced: IntCounter::new(
                "rollout_pods_replaced_total",
                "Pods deleted for their upgrade after being withdrawn from the topology.",
            )
            .expect("static metric definition"),
            topology_revision: IntGaugeVec::new(
                Opts::new("topology_revision", "Revision of the published topology document, per namespace."),
                &["namespace"],
            )
            .expect("static metric definition"),
            topology_nodes: IntGaugeVec::new(
                Opts::new("topology_nodes", "Nodes in the published topology document, per namespace and serving state."),
                &["namespace", "serving"],
            )
            .expect("static metric definition"),
            rollout_phase: IntGaugeVec::new(
                Opts::new("rollout_phase", "1 for the namespace's current rollout phase (idle, blocked, withdrawing, replacing, halted)."),
                &["namespace", "phase"],
            )
            .expect("static metric definition"),
            leader: IntGauge::new("leader", "1 while this replica holds the leader lease.")
                .expect("static metric definition"),
            registry,
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.descriptions_rejected.clone()),
            Box::new(m.pods_replaced.clone()),
            Box::new(m.topology_revision.clone()),
            Box::new(m.topology_nodes.clone()),
            Box::new(m.rollout_phase.clone()),
            Box::new(m.leader.clone()),
        ] {
            // Names are distinct constants; registration cannot clash.
            let _ = m.registry.register(c);
        }
        m
    }

    pub fn observe_network(&self, ns: &str, doc: &TopologyDocument, rollout: &Rollout) {
        self.topology_revision
            .with_label_values(&[ns])
            .set(doc.revision as i64);
        let serving = doc.nodes.iter().filter(|n| n.serving).count() as i64;
        self.topology_nodes
            .with_label_values(&[ns, "true"])
            .set(serving);
        self.topology_nodes
            .with_label_values(&[ns, "false"])
            .set(doc.nodes.len() as i64 - serving);
        let current = rollout.phase();
        for phase in PHASES {
            self.rollout_phase
                .with_label_values(&[ns, phase])
                .set((phase == current) as i64);
        }
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
