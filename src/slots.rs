//! Poisson clocks of slots, as Loopix has them, for both ends of a client's link. The
//! client runs two: the upstream stream, whose slots carry the application's packets,
//! acknowledgements to the gateway and drop cover when there is nothing else, and the loop
//! stream, whose slots carry loop cover and nothing else, so real traffic never replaces a
//! loop. The gateway runs one per session for the downstream (`gateway::downstream`). All
//! run whether the client talks or not: an observer of the link sees rates that never change.

use std::time::Duration;

use rand_distr::{Distribution, Exp};
use tokio::time::Instant;

/// How far behind its schedule a clock may fall and catch up: slots missed while a slot's
/// work (or its write) was slow are served back to back, up to this much of them.
pub const SLOT_CATCH_UP: Duration = Duration::from_millis(250);

/// Where the next slot is counted from: the slot just served (so the time its work took
/// does not lower the rate an observer sees), unless that is more than [`SLOT_CATCH_UP`]
/// ago; now when there was none.
pub fn catch_up_from(slot: Option<Instant>) -> Instant {
    let now = Instant::now();
    let floor = now.checked_sub(SLOT_CATCH_UP).unwrap_or(now);
    slot.map_or(now, |slot| slot.max(floor))
}

/// Sleeps until the slot, forever when there is none.
pub async fn sleep_until(slot: Option<Instant>) {
    match slot {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A Poisson process of slots; a rate of 0 has none.
pub struct PoissonClock {
    gaps: Option<Exp<f64>>,
}

impl PoissonClock {
    /// `rate` slots a second on average (0, negative or non-finite: none).
    pub fn new(rate: f64) -> PoissonClock {
        PoissonClock {
            gaps: Exp::new(rate)
                .ok()
                .filter(|_| rate > 0.0 && rate.is_finite()),
        }
    }

    pub fn is_running(&self) -> bool {
        self.gaps.is_some()
    }

    /// The slot after one at `after`; `None` when the clock has no slots.
    pub fn next(&self, after: Instant) -> Option<Instant> {
        let gap = self.gaps.as_ref()?.sample(&mut rand::rng());
        Some(after + Duration::from_secs_f64(gap.min(3600.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_at_the_rate_and_none_at_zero() {
        assert!(PoissonClock::new(0.0).next(Instant::now()).is_none());
        assert!(PoissonClock::new(f64::NAN).next(Instant::now()).is_none());
        let clock = PoissonClock::new(50.0);
        let start = Instant::now();
        let mut at = start;
        for _ in 0..5000 {
            at = clock.next(at).unwrap();
        }
        // 5000 gaps of mean 20 ms: 100 s, within a few percent.
        let mean = at.duration_since(start).as_secs_f64() / 5000.0;
        assert!((0.018..0.022).contains(&mean), "mean gap {mean}");
    }
}
