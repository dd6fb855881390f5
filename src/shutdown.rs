//! Graceful drain.
//!
//! On SIGTERM or SIGINT the node turns `/readyz` false and stops taking client traffic
//! (phase *draining*), keeps accepting and forwarding peers' packets for
//! `NYM_NODE_DRAIN_GRACE`, then stops ingress (phase *stopping*). From there the pipeline
//! empties itself in data-flow order: when ingress is gone the Sphinx workers finish their
//! queue, the forwarder releases every held packet (those not yet due leave early and are
//! counted), and each egress link flushes what it holds and closes. A second signal exits
//! at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The signals that move a node through its drain. Clone freely.
#[derive(Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    stopping: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain: readiness false, client intake stops.
    pub fn start_drain(&self) {
        self.draining.cancel();
    }

    /// Ends the grace period: ingress stops and the pipeline empties.
    pub fn stop(&self) {
        self.draining.cancel();
        self.stopping.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    pub async fn draining(&self) {
        self.draining.cancelled().await
    }

    pub async fn stopping(&self) {
        self.stopping.cancelled().await
    }

    pub fn stopping_token(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Starts the drain and ends it after `grace` (or at once if `stop` is called).
    pub async fn drain_for(&self, grace: Duration) {
        self.start_drain();
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = self.stopping() => {}
        }
        self.stop();
    }
}

/// SIGTERM and SIGINT handlers, installed before the node can report ready: a signal
/// that arrives between readiness and the first poll of a spawned handler would
/// otherwise meet the default disposition and kill the process without a drain.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// Waits for the first signal, drains for `grace`, and exits the process on a second.
    pub async fn drive(mut self, shutdown: Shutdown, grace: Duration) {
        let first = self.next().await;
        tracing::info!(
            signal = first,
            grace_ms = grace.as_millis() as u64,
            "draining: readiness is false, client intake stopped, peers' packets still accepted"
        );
        tokio::select! {
            _ = shutdown.drain_for(grace) => {
                tracing::info!("grace period over: stopping ingress and releasing held packets");
            }
            _ = self.next() => {
                tracing::warn!("second signal: exiting without finishing the drain");
                std::process::exit(1);
            }
        }
        // Keep honouring a second signal while the pipeline empties.
        self.next().await;
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(1);
    }
}
