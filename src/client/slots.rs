//! The client's Poisson clocks, as Loopix has them: the upstream stream, whose slots carry
//! the application's packets, acknowledgements to the gateway and drop cover when there
//! is nothing else, and the loop stream, whose slots carry loop cover and nothing else, so
//! real traffic never replaces a loop. Both run whether the client talks or not: an
//! observer of its link sees the sum of two Poisson rates, always the same.

use std::time::Duration;

use rand_distr::{Distribution, Exp};
use tokio::time::Instant;

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
