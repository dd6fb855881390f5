//! The load generator's own counting is right: in a lossless run, what it sent is exactly
//! what the node received and forwarded and what its sink counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nym_node::loadgen::{self, Pace, SendTimes, Setup, SinkStats};

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_counts_match_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(dir.path(), 2).unwrap();
    const N: usize = 1500;
    let packets = setup.build_packets(N, 2);
    assert_eq!(packets.len(), N);
    let (_, expected) = setup.unwrap_floor(&packets);
    let node = setup
        .spawn_node(std::path::Path::new(env!("CARGO_BIN_EXE_nym-node")), &[])
        .unwrap();
    let stats = Arc::new(SinkStats::default());
    let sent_times = SendTimes::new(N);
    tokio::spawn(loadgen::run_sink(
        setup.sink_listener().unwrap(),
        setup.sink.clone(),
        vec![setup.node.public().noise_key],
        Arc::new(expected),
        sent_times.clone(),
        stats.clone(),
    ));
    let links = loadgen::prepare_links(&setup, &packets, 0..N)
        .await
        .unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    loadgen::send(
        links,
        Pace::Rate(1500.0),
        sent_times,
        stats.clone(),
        sent.clone(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.received.load(Ordering::Relaxed) < N as u64
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exposition = loadgen::scrape(setup.node_http, &setup.metrics_token).unwrap();
    let drops = loadgen::drops(setup.node_http, &setup.metrics_token);
    node.stop();
    let sent = sent.load(Ordering::Relaxed);
    let counted = stats.received.load(Ordering::Relaxed);
    assert_eq!(sent, N as u64, "the generator sent every packet");
    assert!(drops.is_empty(), "a lossless run: {drops:?}");
    assert_eq!(
        metric(&exposition, "nym_node_packets_received_total"),
        sent,
        "node received = sent"
    );
    assert_eq!(
        metric(&exposition, "nym_node_packets_forwarded_total"),
        sent,
        "node forwarded = sent"
    );
    assert_eq!(
        counted, sent,
        "sink counted = forwarded + drops (drops = 0)"
    );
    let latencies = stats.take_latencies();
    assert_eq!(
        latencies.len(),
        N.div_ceil(loadgen::LATENCY_SAMPLE),
        "every sampled packet was recognised at the sink"
    );
}
