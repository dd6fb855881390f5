//! Overload is shed before the expensive unwrap, and one flooding peer cannot starve the others.

mod common;

use std::time::Duration;

use common::*;
use nym_node::config::Mode;
use nym_node::metrics::{DropReason, Stage};
use nym_node::mixnet::sphinx::PacketBytes;
use nym_node::node::TestHooks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_shed_before_unwrap_and_a_quiet_peer_still_gets_through() {
    let mut net = Net::start(
        &[
            ("flooder", Role::Peer),
            ("quiet", Role::Peer),
            ("mix", Role::Node(Mode::Mixnode, Some(1))),
            ("flood-sink", Role::Sink(Some(2))),
            ("quiet-sink", Role::Sink(Some(2))),
        ],
        |_, c| {
            c.sphinx_queue = 256;
            c.sphinx_queue_per_connection = 32;
        },
        // A node that unwraps at ~500 packets/s: easy to push past capacity.
        |_| TestHooks {
            slow_unwrap: Some(Duration::from_millis(2)),
            ..TestHooks::default()
        },
    )
    .await;
    let mut flood_sink = net.take_sink("flood-sink");
    let mut quiet_sink = net.take_sink("quiet-sink");
    let flood = net.packets(&["mix", "flood-sink"], 3000);
    let quiet = net.packets(&["mix", "quiet-sink"], 40);
    let mut flood_link = net.link("flooder", "mix").await;
    let mut quiet_link = net.link("quiet", "mix").await;

    let flooding = tokio::spawn(async move {
        for p in &flood {
            flood_link.send_packet(p).await.unwrap();
        }
        flood_link
    });
    for p in &quiet {
        quiet_link.send_packet(p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _flood_link = flooding.await.unwrap();
    assert_eq!(
        quiet_sink
            .collect(quiet.len(), Duration::from_secs(20))
            .await
            .len(),
        quiet.len(),
        "every packet of the quiet peer arrives"
    );

    let m = net.node("mix").metrics.clone();
    let unwrapped = || m.stage(Stage::ForwarderQueue).get_sample_count();
    // Wait until every received packet was either shed or unwrapped.
    assert!(
        eventually(Duration::from_secs(20), || m.packets_received.get()
            == m.drop_count(DropReason::Overload) + unwrapped())
        .await
    );
    let shed = m.drop_count(DropReason::Overload);
    println!(
        "received={} shed={shed} unwrapped={} forwarded={}",
        m.packets_received.get(),
        unwrapped(),
        m.packets_forwarded.get()
    );
    assert!(shed > 1000, "the flood is shed ({shed})");
    assert!(
        eventually(Duration::from_secs(20), || m.packets_forwarded.get()
            == unwrapped())
        .await,
        "every packet that was unwrapped was forwarded: no work is thrown away after the unwrap"
    );
    for r in DropReason::ALL {
        if r != DropReason::Overload {
            assert_eq!(m.drop_count(r), 0, "{r:?}");
        }
    }
    let flooded = flood_sink
        .collect(unwrapped() as usize - quiet.len(), Duration::from_secs(20))
        .await
        .len() as u64;
    assert_eq!(flooded + quiet.len() as u64, unwrapped());
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_asking_for_long_delays_hits_the_delay_queue_cap_and_packets_due_now_still_pass() {
    const CAP: usize = 50;
    let mut net = Net::start(
        &[
            ("peer", Role::Peer),
            ("mix", Role::Node(Mode::Mixnode, Some(1))),
            ("next", Role::Sink(Some(2))),
        ],
        |_, c| c.delay_queue_capacity = CAP,
        no_hooks,
    )
    .await;
    let mut sink = net.take_sink("next");
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    // 200 packets each asking the mix to hold them for 3 s: only CAP may wait.
    let held: Vec<_> = (0..200u32)
        .map(|i| {
            net.packet(
                &["mix", "next"],
                nym_node::keys::KeyBytes([1; 32]),
                &i.to_be_bytes(),
                &[Duration::from_secs(3), Duration::ZERO],
            )
        })
        .collect();
    for p in &held {
        link.send_packet(p).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || m
            .drop_count(DropReason::DelayQueueFull)
            == 200 - CAP as u64)
        .await,
        "dropped {}",
        m.drop_count(DropReason::DelayQueueFull)
    );
    assert_eq!(m.delay_queue_packets.get(), CAP as i64);
    // A packet with no delay is not held, so a full delay queue does not stop it.
    let now = net.packet(
        &["mix", "next"],
        nym_node::keys::KeyBytes([1; 32]),
        b"due now",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&now).await.unwrap();
    let first = sink.next(Duration::from_secs(2)).await;
    assert!(
        first.is_some(),
        "a packet due now passed a full delay queue"
    );
    // The held ones leave when due: exactly CAP of them.
    let rest = sink.collect(CAP, Duration::from_secs(10)).await;
    assert_eq!(rest.len(), CAP);
    assert!(sink.next(Duration::from_secs(1)).await.is_none());
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_twenty_links_gets_no_more_of_the_sphinx_queue_than_a_peer_with_one() {
    let mut net = Net::start(
        &[
            ("many", Role::Peer),
            ("one", Role::Peer),
            ("mix", Role::Node(Mode::Mixnode, Some(1))),
            ("many-sink", Role::Sink(Some(2))),
            ("one-sink", Role::Sink(Some(2))),
        ],
        |_, c| {
            c.sphinx_queue = 1024;
            c.sphinx_queue_per_connection = 16;
            c.max_links_per_peer = 20;
        },
        |_| TestHooks {
            // Slow enough that what each peer gets is what it may queue, not how long its burst
            // happens to last: ~40 unwraps/s.
            slow_unwrap: Some(Duration::from_millis(25)),
            ..TestHooks::default()
        },
    )
    .await;
    let mut many_sink = net.take_sink("many-sink");
    let mut one_sink = net.take_sink("one-sink");
    let mut links = Vec::new();
    for _ in 0..20 {
        links.push(net.link("many", "mix").await);
    }
    let one = net.link("one", "mix").await;
    // Both peers offer the same load for the same 2 s: 1000 packets/s, the first spread
    // over 20 links (one every 20 ms each), the second on one link (one every 1 ms).
    async fn paced(mut link: Link, packets: Vec<PacketBytes>, every: Duration) -> Link {
        let mut tick = tokio::time::interval(every);
        for p in &packets {
            tick.tick().await;
            let _ = link.send_packet(p).await;
        }
        link
    }
    // Every packet is built first, so both floods start together.
    let many_packets: Vec<_> = (0..20)
        .map(|_| net.packets(&["mix", "many-sink"], 100))
        .collect();
    let one_packets = net.packets(&["mix", "one-sink"], 2000);
    let mut tasks = Vec::new();
    for (link, packets) in links.into_iter().zip(many_packets) {
        tasks.push(tokio::spawn(paced(
            link,
            packets,
            Duration::from_millis(20),
        )));
    }
    let single = tokio::spawn(paced(one, one_packets, Duration::from_millis(1)));
    let mut _keep = Vec::new();
    for t in tasks {
        _keep.push(t.await.unwrap());
    }
    let _one = single.await.unwrap();
    let m = net.node("mix").metrics.clone();
    let unwrapped = || m.stage(Stage::ForwarderQueue).get_sample_count();
    assert!(
        eventually(Duration::from_secs(30), || m.packets_received.get()
            == m.drop_count(DropReason::Overload) + unwrapped())
        .await
    );
    let total = unwrapped() as usize;
    let mut got_many = 0;
    let mut got_one = 0;
    while got_many + got_one < total {
        tokio::select! {
            a = many_sink.next(Duration::from_secs(10)) => match a { Some(_) => got_many += 1, None => break },
            a = one_sink.next(Duration::from_secs(10)) => match a { Some(_) => got_one += 1, None => break },
        }
    }
    println!("unwrapped: peer with 20 links {got_many}, peer with one link {got_one}");
    // With a budget per link the first peer would hold 20 times the second's share.
    assert!(got_one > 0);
    assert!(
        got_many <= 2 * got_one,
        "20 links bought {got_many} unwraps against {got_one}"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_newest_link_replaces_its_oldest_beyond_the_limit() {
    let net = Net::start(
        &[
            ("peer", Role::Peer),
            ("mix", Role::Node(Mode::Mixnode, Some(1))),
        ],
        |_, c| c.max_links_per_peer = 2,
        no_hooks,
    )
    .await;
    let mut first = net.link("peer", "mix").await;
    let mut second = net.link("peer", "mix").await;
    assert!(!first.closed_within(Duration::from_millis(300)).await);
    let mut third = net.link("peer", "mix").await;
    assert!(
        first.closed_within(Duration::from_secs(5)).await,
        "the oldest link is closed"
    );
    assert!(!second.closed_within(Duration::from_millis(300)).await);
    assert!(!third.closed_within(Duration::from_millis(300)).await);
    net.stop().await;
}

/// Peak and current resident memory of a process, in bytes, from `/proc/<pid>/status`.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmHWM:"), kb("VmRSS:"))
}

/// The node as it ships (a process of its own), flooded with packets that all ask for a
/// delay longer than the test: memory is bounded by the queues, not by the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_flood_is_capped_and_memory_stays_within_the_queues_bound() {
    use nym_node::loadgen::{self, Pace, SendTimes, Setup, SinkStats};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    const CAP: u64 = 10_000;
    const QUEUES: u64 = 1024 + 1024;
    const FLOOD: usize = 40_000;
    // Per queued packet: its 2396 bytes, the allocator's rounding and the queue's entry,
    // with room to spare (measured: see the printout).
    const PER_PACKET: u64 = 4096;

    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(dir.path(), 1).unwrap();
    let packets = setup.build_packets_delayed(FLOOD, 2, Duration::from_secs(120));
    let node = setup
        .spawn_node(
            std::path::Path::new(env!("CARGO_BIN_EXE_nym-node")),
            &[
                ("NYM_NODE_MAX_PACKET_DELAY", "120s".into()),
                ("NYM_NODE_KEY_OVERLAP", "9m".into()),
                ("NYM_NODE_DELAY_QUEUE_CAPACITY", CAP.to_string()),
                ("NYM_NODE_SPHINX_QUEUE", "1024".into()),
                ("NYM_NODE_SPHINX_QUEUE_PER_CONNECTION", "1024".into()),
                ("NYM_NODE_FORWARDER_QUEUE", "1024".into()),
                // A small replay filter (1.5 MB), so the bound is about the queues, yet roomy
                // enough that a false positive among the flood's 40,000 is out of reach (about
                // 10^-24 each; sized for 10/s one came up once in a CI run).
                ("NYM_NODE_REPLAY_FILTER_RATE", "100".into()),
            ],
        )
        .unwrap();
    let pid = node.pid();
    let (_, baseline) = memory(pid);
    let _sink = setup.sink_listener().unwrap();
    let links = loadgen::prepare_links(&setup, &packets, 0..FLOOD)
        .await
        .unwrap();
    loadgen::send(
        links,
        Pace::Rate(6000.0),
        SendTimes::new(FLOOD),
        Arc::new(SinkStats::default()),
        Arc::new(AtomicU64::new(0)),
    )
    .await;
    // Every packet is accounted for: held (up to the cap), dropped at the cap, or shed.
    let counted = || {
        let drops: std::collections::HashMap<String, u64> =
            loadgen::drops(setup.node_http, &setup.metrics_token)
                .into_iter()
                .collect();
        let held = loadgen::scrape(setup.node_http, &setup.metrics_token)
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("nym_node_delay_queue_packets "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0) as u64;
        (held, drops)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (held, drops) = loop {
        let (held, drops) = counted();
        if held + drops.values().sum::<u64>() >= FLOOD as u64
            || std::time::Instant::now() > deadline
        {
            break (held, drops);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (peak, now) = memory(pid);
    node.stop();
    let full = drops.get("delay_queue_full").copied().unwrap_or(0);
    let shed = drops.get("overload").copied().unwrap_or(0);
    println!(
        "delay flood: {FLOOD} packets, held {held}, delay_queue_full {full}, overload {shed}; \
         RSS baseline {} MB, now {} MB, peak {} MB; per held packet {} B",
        baseline / 1_000_000,
        now / 1_000_000,
        peak / 1_000_000,
        now.saturating_sub(baseline) / held.max(1)
    );
    assert_eq!(held, CAP, "the delay queue filled to its cap");
    assert_eq!(
        held + full + shed,
        FLOOD as u64,
        "every packet counted: {drops:?}"
    );
    assert!(full > 0);
    let bound = baseline + (CAP + QUEUES) * PER_PACKET;
    assert!(
        peak <= bound,
        "peak RSS {peak} over the stated bound {bound} (baseline {baseline})"
    );
}
