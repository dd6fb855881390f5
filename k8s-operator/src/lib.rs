//! nym-operator: reconciles `NymNode` resources into StatefulSets, keeps the namespace's
//! topology document true, and upgrades the network one pod at a time without losing a
//! packet. Laid out after kube-rs's controller-rs: the CRD types, pure resource builders,
//! the pure rollout state machine, and the reconciler that only orchestrates them.

pub mod config;
pub mod controller;
pub mod crd;
pub mod http;
pub mod metrics;
pub mod resources;
pub mod rollout;
pub mod topology;

#[cfg(test)]
mod fixtures;
