//! How many reply SURBs the client hands out when recipients ask for more. Each SURB costs
//! the sender a share of a packet and keeps its recovery keys on disk, so a recipient (or
//! anyone who got hold of our SURBs) asking again and again must not be able to spend the
//! sender's bandwidth and storage without bound: each asker gets at most
//! [`PER_ASKER_PER_MINUTE`] SURBs a minute, and all askers together [`TOTAL_PER_MINUTE`].

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// SURBs one recipient may get in a minute.
pub const PER_ASKER_PER_MINUTE: usize = 200;
/// SURBs every recipient together may get in a minute.
pub const TOTAL_PER_MINUTE: usize = 1000;
const WINDOW: Duration = Duration::from_secs(60);

/// Fixed one-minute windows of SURBs granted, per asker and in total.
pub struct TopUpBudget<K> {
    window_start: Instant,
    total: usize,
    per_asker: HashMap<K, usize>,
}

impl<K: Eq + Hash> TopUpBudget<K> {
    pub fn new(now: Instant) -> Self {
        TopUpBudget {
            window_start: now,
            total: 0,
            per_asker: HashMap::new(),
        }
    }

    /// How many of the `wanted` SURBs `asker` gets now (0 when its budget or the total is
    /// spent this minute); those granted are counted.
    pub fn grant(&mut self, asker: K, wanted: usize, now: Instant) -> usize {
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.total = 0;
            self.per_asker.clear();
        }
        let given = self.per_asker.entry(asker).or_default();
        let granted = wanted
            .min(PER_ASKER_PER_MINUTE - *given)
            .min(TOTAL_PER_MINUTE - self.total);
        *given += granted;
        self.total += granted;
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_asker_gets_its_share_a_minute_and_no_more() {
        let start = Instant::now();
        let mut budget = TopUpBudget::new(start);
        assert_eq!(budget.grant(1, 100, start), 100);
        assert_eq!(budget.grant(1, 150, start), PER_ASKER_PER_MINUTE - 100);
        assert_eq!(budget.grant(1, 10, start + Duration::from_secs(59)), 0);
        // Others still get theirs; a new minute starts afresh.
        assert_eq!(budget.grant(2, 10, start), 10);
        assert_eq!(budget.grant(1, 10, start + WINDOW), 10);
    }

    #[test]
    fn many_askers_together_get_the_total_and_no_more() {
        let start = Instant::now();
        let mut budget = TopUpBudget::new(start);
        let granted: usize = (0..100).map(|asker| budget.grant(asker, 100, start)).sum();
        assert_eq!(granted, TOTAL_PER_MINUTE);
    }
}
