//! Which stream open requests the exit takes. A client is only its sender tag, and tags are
//! the client's to choose, so per-tag bounds alone bound nothing: every table here has a
//! bound of its own too.
//!
//! - open streams: `per_client` per tag, `total` in all (refusals do not count: they only
//!   wait for the client's ack of the refusal);
//! - refusals waiting for their ack: at most [`MAX_REFUSING`]; beyond it a request is dropped
//!   unanswered (the client's open times out);
//! - opens per tag: [`OPEN_RATE`] a second, bursts of [`OPEN_BURST`];
//! - tags tracked: at most [`MAX_TAGS`]; a new tag pushes out the one idle longest that has
//!   no stream open, else it is refused.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::client::SenderTag;
use crate::exit::network_requester::{Limits, Refused, reply};
use crate::gateway::rate_limit::TokenBucket;

/// Stream opens one tag may ask for per second, on average.
pub const OPEN_RATE: u32 = 5;
/// Stream opens one tag may ask for at once.
pub const OPEN_BURST: u32 = 20;
/// Sender tags the exit keeps state for.
pub const MAX_TAGS: usize = 10_000;
/// Refusals waiting for their ack at once.
pub const MAX_REFUSING: usize = 1_024;

struct Tag {
    open: usize,
    opens: TokenBucket,
    seen: Instant,
}

/// What to do with an open request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Open,
    /// Answered with a refusal (which waits for its ack).
    Refuse(Refused),
    /// Not answered at all (counted under this reason).
    Drop(&'static str),
}

pub struct StreamAdmission {
    limits: Limits,
    tags: HashMap<SenderTag, Tag>,
    open: usize,
    refusing: usize,
}

impl StreamAdmission {
    pub fn new(limits: Limits) -> Self {
        StreamAdmission {
            limits,
            tags: HashMap::new(),
            open: 0,
            refusing: 0,
        }
    }

    /// Decides an open request from `tag`, and counts what it decided.
    pub fn decide(&mut self, tag: SenderTag) -> Decision {
        let decision = self.judge(tag);
        match decision {
            Decision::Open => {
                self.open += 1;
                if let Some(t) = self.tags.get_mut(&tag) {
                    t.open += 1;
                }
            }
            Decision::Refuse(_) => self.refusing += 1,
            Decision::Drop(_) => {}
        }
        decision
    }

    fn judge(&mut self, tag: SenderTag) -> Decision {
        if !self.tags.contains_key(&tag) && !self.make_room() {
            return self.refuse("too_many_clients");
        }
        let now = Instant::now();
        let t = self.tags.entry(tag).or_insert_with(|| Tag {
            open: 0,
            opens: TokenBucket::new(OPEN_RATE, OPEN_BURST),
            seen: now,
        });
        t.seen = now;
        if !t.opens.take() {
            return self.refuse("rate_limited");
        }
        let tag_open = t.open;
        if self.open >= self.limits.total {
            self.refuse("capacity")
        } else if tag_open >= self.limits.per_client {
            self.refuse("too_many_streams")
        } else {
            Decision::Open
        }
    }

    fn refuse(&self, reason: &'static str) -> Decision {
        if self.refusing >= MAX_REFUSING {
            Decision::Drop(reason)
        } else {
            Decision::Refuse(Refused {
                reason,
                code: reply::GENERAL_FAILURE,
            })
        }
    }

    /// Room for one more tag: there is some, or the tag idle longest without an open
    /// stream goes.
    fn make_room(&mut self) -> bool {
        if self.tags.len() < MAX_TAGS {
            return true;
        }
        let idle = self
            .tags
            .iter()
            .filter(|(_, t)| t.open == 0)
            .min_by_key(|(_, t)| t.seen)
            .map(|(tag, _)| *tag);
        match idle {
            Some(tag) => {
                self.tags.remove(&tag);
                true
            }
            None => false,
        }
    }

    /// A stream of `tag` ended: `opened` if it was taken, else it was a refusal.
    pub fn ended(&mut self, tag: SenderTag, opened: bool) {
        if !opened {
            self.refusing = self.refusing.saturating_sub(1);
            return;
        }
        self.open = self.open.saturating_sub(1);
        if let Some(t) = self.tags.get_mut(&tag) {
            t.open = t.open.saturating_sub(1);
        }
    }

    /// Tags tracked now.
    pub fn tags(&self) -> usize {
        self.tags.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(60),
            per_client: 4,
            total: 100,
        }
    }

    fn tag(i: u32) -> SenderTag {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_be_bytes());
        t
    }

    #[tokio::test(start_paused = true)]
    async fn random_tags_cannot_take_every_stream_or_grow_the_tag_table() {
        let mut a = StreamAdmission::new(limits());
        let mut opened = 0;
        for i in 0..(MAX_TAGS as u32 + 2_000) {
            match a.decide(tag(i)) {
                Decision::Open => opened += 1,
                Decision::Refuse(_) => {}
                Decision::Drop(_) => {}
            }
            assert!(a.tags() <= MAX_TAGS);
        }
        assert_eq!(opened, 100, "total caps the streams however many tags ask");
        assert!(a.refusing <= MAX_REFUSING);
        // The refusals end, streams end: a real client gets in again.
        for i in 0..MAX_REFUSING as u32 {
            a.ended(tag(i), false);
        }
        for i in 0..100 {
            a.ended(tag(i), true);
        }
        assert_eq!(a.decide(tag(u32::MAX)), Decision::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn one_tag_is_held_to_its_open_rate_and_its_stream_cap() {
        let mut a = StreamAdmission::new(Limits {
            per_client: 100,
            ..limits()
        });
        let burst = (0..100)
            .filter(|_| a.decide(tag(1)) == Decision::Open)
            .count();
        assert_eq!(burst, OPEN_BURST as usize);
        tokio::time::advance(Duration::from_secs(1)).await;
        let more = (0..100)
            .filter(|_| a.decide(tag(1)) == Decision::Open)
            .count();
        assert_eq!(more, OPEN_RATE as usize);
        let mut b = StreamAdmission::new(limits());
        for _ in 0..4 {
            assert_eq!(b.decide(tag(2)), Decision::Open);
        }
        assert!(matches!(b.decide(tag(2)), Decision::Refuse(r) if r.reason == "too_many_streams"));
    }
}
