//! The probe: a client sends numbered messages through the mixnet to itself and reports
//! how many came back, how late, and how much retransmission it took.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::client::{Event, MixClient};

const MAGIC: &[u8; 8] = b"nymprobe";

#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    pub sent: usize,
    pub delivered: usize,
    /// Messages the client gave up on after every retransmission.
    pub failed: usize,
    pub duplicates: usize,
    pub retransmissions: u64,
    pub packets_sent: u64,
    pub cover_sent: u64,
    /// Loop cover sent, come back, and not back in time (dropped or late in the network).
    pub loops_sent: u64,
    pub loops_returned: u64,
    pub loops_missing: u64,
    /// End-to-end latency of each delivered message (send call to receipt).
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl ProbeReport {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut l = self.latencies.clone();
        l.sort();
        let idx = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[idx.min(l.len() - 1)]
    }

    pub fn ok(&self) -> bool {
        self.delivered == self.sent
    }

    /// One line a script can grep: `sent=N delivered=M ...`.
    pub fn summary(&self) -> String {
        format!(
            "sent={} delivered={} failed={} duplicates={} retransmissions={} packets_sent={} cover_sent={} loops_returned={} loops_missing={} p50_ms={:.1} p99_ms={:.1} elapsed_s={:.1}",
            self.sent,
            self.delivered,
            self.failed,
            self.duplicates,
            self.retransmissions,
            self.packets_sent,
            self.cover_sent,
            self.loops_returned,
            self.loops_missing,
            self.percentile(0.5).as_secs_f64() * 1000.0,
            self.percentile(0.99).as_secs_f64() * 1000.0,
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Sends `count` messages of `size` bytes to the client itself and waits up to `timeout`
/// for them.
pub async fn run(
    client: &mut MixClient,
    count: usize,
    size: usize,
    timeout: Duration,
) -> ProbeReport {
    let start = Instant::now();
    let me = client.address();
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(count);
    let mut report = ProbeReport::default();
    let run_id: u64 = rand::random();
    for seq in 0..count as u64 {
        let mut body = Vec::with_capacity(size.max(24));
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&run_id.to_be_bytes());
        body.extend_from_slice(&seq.to_be_bytes());
        while body.len() < size {
            body.push((body.len() % 251) as u8);
        }
        sent_at.insert(seq, Instant::now());
        if client.send(me, body, 0).await.is_err() {
            break;
        }
        report.sent += 1;
    }
    let mut received: HashMap<u64, ()> = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while received.len() + report.failed < report.sent {
        let event = tokio::time::timeout_at(deadline, client.next_event()).await;
        match event {
            Ok(Some(Event::Received { body, .. })) => {
                if body.len() < 24 || &body[..8] != MAGIC {
                    continue;
                }
                let run = u64::from_be_bytes(body[8..16].try_into().unwrap_or_default());
                let seq = u64::from_be_bytes(body[16..24].try_into().unwrap_or_default());
                if run != run_id {
                    continue;
                }
                if received.insert(seq, ()).is_some() {
                    report.duplicates += 1;
                    continue;
                }
                if let Some(t) = sent_at.get(&seq) {
                    report.latencies.push(t.elapsed());
                }
            }
            Ok(Some(Event::Failed { .. })) => report.failed += 1,
            Ok(Some(Event::Delivered { .. } | Event::Confirmed { .. })) => {}
            Ok(None) | Err(_) => break,
        }
    }
    report.delivered = received.len();
    let stats = client.stats();
    report.retransmissions = stats.retransmissions.load(Ordering::Relaxed);
    report.packets_sent = stats.packets_sent.load(Ordering::Relaxed);
    report.cover_sent = stats.cover_sent.load(Ordering::Relaxed);
    report.loops_sent = stats.loops_sent.load(Ordering::Relaxed);
    report.loops_returned = stats.loops_returned.load(Ordering::Relaxed);
    report.loops_missing = stats.loops_missing.load(Ordering::Relaxed);
    report.elapsed = start.elapsed();
    report
}
