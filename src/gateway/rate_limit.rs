//! A token bucket: `rate` tokens (packets, bytes) per second on average, bursts of up to
//! `burst`. Runs on tokio's clock so tests can drive it with paused time.

use tokio::time::Instant;

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        self.take_n(1)
    }

    /// Takes `n` tokens if there are that many (a packet's bytes, say).
    pub fn take_n(&mut self, n: u32) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= f64::from(n) {
            self.tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn allows_bursts_then_the_rate() {
        let mut b = TokenBucket::new(10, 5);
        assert_eq!((0..20).filter(|_| b.take()).count(), 5);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..20).filter(|_| b.take()).count(), 5);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            (0..20).filter(|_| b.take()).count(),
            5,
            "never more than the burst"
        );
    }
}
