//! The delay queue: packets held until their per-hop delay has passed. Pure: the caller
//! says what time it is, so tests drive it exactly. Ties leave in arrival order.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use tokio::time::Instant;

struct Entry<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: BinaryHeap is a max-heap and the earliest due time must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .due
            .cmp(&self.due)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

pub struct DelayQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
}

impl<T> Default for DelayQueue<T> {
    fn default() -> Self {
        DelayQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> DelayQueue<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, due: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Entry {
            due,
            seq: self.seq,
            item,
        });
    }

    /// When the earliest held item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.due)
    }

    /// Removes and returns the earliest item if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, T)> {
        if self.heap.peek()?.due > now {
            return None;
        }
        self.heap.pop().map(|e| (e.due, e.item))
    }

    /// Removes everything, earliest first (used when the node shuts down).
    pub fn drain_all(&mut self) -> Vec<(Instant, T)> {
        let mut out = Vec::with_capacity(self.heap.len());
        while let Some(e) = self.heap.pop() {
            out.push((e.due, e.item));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn releases_in_due_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new();
        q.push(t0 + Duration::from_millis(30), "c");
        q.push(t0 + Duration::from_millis(10), "a");
        q.push(t0 + Duration::from_millis(20), "b");
        q.push(t0 + Duration::from_millis(10), "a2");
        assert_eq!(q.next_due(), Some(t0 + Duration::from_millis(10)));
        assert!(q.pop_due(t0 + Duration::from_millis(9)).is_none());
        let now = t0 + Duration::from_millis(20);
        let out: Vec<_> = std::iter::from_fn(|| q.pop_due(now).map(|(_, x)| x)).collect();
        assert_eq!(out, vec!["a", "a2", "b"]);
        assert_eq!(q.len(), 1);
        assert_eq!(
            q.drain_all()
                .into_iter()
                .map(|(_, x)| x)
                .collect::<Vec<_>>(),
            vec!["c"]
        );
        assert!(q.is_empty());
    }

    proptest! {
        #[test]
        fn never_releases_early_and_keeps_order(delays in proptest::collection::vec(0u64..1000, 1..200), step in 1u64..50) {
            let t0 = Instant::now();
            let mut q = DelayQueue::new();
            for (i, d) in delays.iter().enumerate() {
                q.push(t0 + Duration::from_millis(*d), i);
            }
            let mut released = Vec::new();
            let mut now = t0;
            while !q.is_empty() {
                while let Some((due, i)) = q.pop_due(now) {
                    prop_assert!(due <= now);
                    released.push((due, i));
                }
                now += Duration::from_millis(step);
            }
            prop_assert_eq!(released.len(), delays.len());
            prop_assert!(released.windows(2).all(|w| w[0].0 <= w[1].0));
        }
    }
}
