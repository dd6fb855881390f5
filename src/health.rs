//! Liveness and readiness, fed by the node's parts and read by the HTTP server.
//!
//! Ready means: keys loaded, a topology loaded, listeners bound, not draining.
//! Live means: the mixnet accept loop and the forwarder are running, and the forwarder has
//! woken up recently (a wedged forwarder is not live even though its task exists).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;
use crate::topology::TopologyHandle;

/// How long the forwarder may go without waking before the node is reported dead.
/// It wakes at least every second on its own.
pub const FORWARDER_STALL: Duration = Duration::from_secs(15);

pub struct Health {
    start: Instant,
    keys_loaded: AtomicBool,
    listeners_bound: AtomicBool,
    accept_loop_alive: AtomicBool,
    forwarder_alive: AtomicBool,
    /// Milliseconds since `start` of the forwarder's last wake-up.
    forwarder_beat: AtomicU64,
    topology: TopologyHandle,
    shutdown: Shutdown,
}

/// Why the node is not ready or not live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOk {
    KeysNotLoaded,
    TopologyNotLoaded,
    ListenersNotBound,
    Draining,
    AcceptLoopDead,
    ForwarderDead,
    ForwarderStalled,
}

impl NotOk {
    pub fn as_str(&self) -> &'static str {
        match self {
            NotOk::KeysNotLoaded => "keys not loaded",
            NotOk::TopologyNotLoaded => "topology not loaded",
            NotOk::ListenersNotBound => "listeners not bound",
            NotOk::Draining => "draining",
            NotOk::AcceptLoopDead => "mixnet accept loop stopped",
            NotOk::ForwarderDead => "forwarder stopped",
            NotOk::ForwarderStalled => "forwarder stalled",
        }
    }
}

impl Health {
    pub fn new(topology: TopologyHandle, shutdown: Shutdown) -> Arc<Self> {
        Arc::new(Health {
            start: Instant::now(),
            keys_loaded: AtomicBool::new(false),
            listeners_bound: AtomicBool::new(false),
            accept_loop_alive: AtomicBool::new(false),
            forwarder_alive: AtomicBool::new(false),
            forwarder_beat: AtomicU64::new(0),
            topology,
            shutdown,
        })
    }

    pub fn set_keys_loaded(&self) {
        self.keys_loaded.store(true, Ordering::Relaxed);
    }

    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::Relaxed);
    }

    /// Marks the accept loop alive until the returned guard drops.
    pub fn accept_loop_guard(self: &Arc<Self>) -> AliveGuard {
        AliveGuard::new(self.clone(), Part::AcceptLoop)
    }

    /// Marks the forwarder alive until the returned guard drops.
    pub fn forwarder_guard(self: &Arc<Self>) -> AliveGuard {
        self.forwarder_beat();
        AliveGuard::new(self.clone(), Part::Forwarder)
    }

    pub fn forwarder_beat(&self) {
        self.forwarder_beat
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn readiness(&self) -> Result<(), NotOk> {
        if !self.keys_loaded.load(Ordering::Relaxed) {
            return Err(NotOk::KeysNotLoaded);
        }
        if !self.topology.is_loaded() {
            return Err(NotOk::TopologyNotLoaded);
        }
        if !self.listeners_bound.load(Ordering::Relaxed) {
            return Err(NotOk::ListenersNotBound);
        }
        if self.shutdown.is_draining() {
            return Err(NotOk::Draining);
        }
        self.liveness()
    }

    pub fn liveness(&self) -> Result<(), NotOk> {
        // Before the node has started its parts there is nothing to be dead yet.
        if !self.listeners_bound.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Once stopping, the parts end on purpose; the process is about to exit.
        if self.shutdown.is_stopping() {
            return Ok(());
        }
        if !self.accept_loop_alive.load(Ordering::Relaxed) {
            return Err(NotOk::AcceptLoopDead);
        }
        if !self.forwarder_alive.load(Ordering::Relaxed) {
            return Err(NotOk::ForwarderDead);
        }
        let now = self.start.elapsed().as_millis() as u64;
        let beat = self.forwarder_beat.load(Ordering::Relaxed);
        if now.saturating_sub(beat) > FORWARDER_STALL.as_millis() as u64 {
            return Err(NotOk::ForwarderStalled);
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Part {
    AcceptLoop,
    Forwarder,
}

/// Held by a long-running part; dropping it (however the part ends) marks the part dead.
pub struct AliveGuard {
    health: Arc<Health>,
    part: Part,
}

impl AliveGuard {
    fn new(health: Arc<Health>, part: Part) -> Self {
        health.flag(part).store(true, Ordering::Relaxed);
        AliveGuard { health, part }
    }
}

impl Health {
    fn flag(&self, part: Part) -> &AtomicBool {
        match part {
            Part::AcceptLoop => &self.accept_loop_alive,
            Part::Forwarder => &self.forwarder_alive,
        }
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.health.flag(self.part).store(false, Ordering::Relaxed);
    }
}
