//! Sphinx key epochs over real sockets: traffic keeps flowing while every node rotates its
//! key, a packet replayed after a restart is still a replay, and a packet for a key past
//! its overlap is refused as `expired_key`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use nym_node::client::{ClientConfig, Event, MixClient};
use nym_node::config::{Config, DurationKnob, Mode};
use nym_node::keys::{EpochSchedule, Identity, KeyBytes, unix_ms};
use nym_node::metrics::DropReason;

const INTERVAL: Duration = Duration::from_secs(3);
const OVERLAP: Duration = Duration::from_millis(1200);

/// Short epochs: the overlap must cover 4 x the largest delay + the topology refresh.
fn rotating(_: &str, config: &mut Config) {
    config.key_rotation_interval = DurationKnob(INTERVAL);
    config.key_overlap = DurationKnob(OVERLAP);
    config.max_packet_delay = DurationKnob(Duration::from_millis(200));
    config.replay_filter_rate = 100;
}

fn schedule() -> EpochSchedule {
    EpochSchedule::new(INTERVAL)
}

/// Sleeps until `ms` past the start of the next epoch.
async fn just_after_next_boundary(ms: u64) -> u64 {
    let now = unix_ms();
    let next = schedule().epoch_at(now) + 1;
    tokio::time::sleep(Duration::from_millis(schedule().start_ms(next) + ms - now)).await;
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_across_three_key_rotations_without_loss() {
    let mut net = Net::start(&three_layers(), rotating, no_hooks).await;
    let gateway = net.member("gateway").entry.identity_key;
    // No acknowledgements and so no retransmission: a packet lost is a message lost.
    let config = ClientConfig {
        topology: net.topology_path.display().to_string(),
        gateway: Some(gateway),
        mean_delay: Duration::from_millis(10),
        cover_rate: 0.0,
        acks: false,
        topology_refresh: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    let mut receiver = MixClient::start(config.clone(), Identity::generate().unwrap())
        .await
        .unwrap();
    let to = receiver.address();
    let sender = MixClient::start(config, Identity::generate().unwrap())
        .await
        .unwrap();

    let first = schedule().epoch_at(unix_ms());
    let collector = tokio::spawn(async move {
        let mut got: HashMap<Vec<u8>, usize> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, receiver.next_event()).await {
            if let Event::Received { body, .. } = event {
                let done = body == b"end";
                *got.entry(body).or_default() += 1;
                if done {
                    break;
                }
            }
        }
        got
    });

    // One message every 100 ms until three boundaries have passed and their overlaps ended;
    // the directory's part (republishing each node's next key) is done after each boundary.
    let mut published = first;
    let mut revision = 1;
    let mut sent = 0u32;
    loop {
        let now = unix_ms();
        let epoch = schedule().epoch_at(now);
        if epoch > published && now >= schedule().start_ms(epoch) + 200 {
            revision += 1;
            net.republish(revision);
            published = epoch;
        }
        if epoch >= first + 3 && now > schedule().start_ms(first + 3) + OVERLAP.as_millis() as u64 {
            break;
        }
        sender
            .send(to, format!("message {sent}").into_bytes(), 0)
            .await
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Mixing may reorder: the end marker goes a second after the last message.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sender.send(to, b"end".to_vec(), 0).await.unwrap();
    let got = collector.await.unwrap();

    let missing: Vec<u32> = (0..sent)
        .filter(|i| got.get(format!("message {i}").as_bytes()) != Some(&1))
        .collect();
    let drops: Vec<(String, DropReason, u64)> = net
        .nodes
        .iter()
        .flat_map(|(name, n)| {
            DropReason::ALL
                .iter()
                .map(|r| (name.clone(), *r, n.metrics.drop_count(*r)))
                .filter(|(.., c)| *c > 0)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {sent} messages not received exactly once: {missing:?}; first epoch {first}; drops {drops:?}",
        missing.len()
    );
    assert!(sent >= 50, "{sent}");
    for (name, node) in &net.nodes {
        let m = &node.metrics;
        assert_eq!(m.drop_count(DropReason::ExpiredKey), 0, "{name}");
        assert_eq!(m.drop_count(DropReason::Replay), 0, "{name}");
        // Every node retired the key of the first epoch, then the next two.
        assert!(
            m.sphinx_keys_retired.get() >= 3,
            "{name}: {}",
            m.sphinx_keys_retired.get()
        );
        assert_eq!(
            m.sphinx_key_epoch.get() as u64,
            schedule().epoch_at(unix_ms()),
            "{name}"
        );
    }
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_restart_is_caught_and_a_key_past_its_overlap_is_refused() {
    let spec = [
        ("peer", Role::Peer),
        ("mix", Role::Node(Mode::Mixnode, Some(1))),
        ("next", Role::Sink(Some(2))),
    ];
    let mut net = Net::start(&spec, rotating, no_hooks).await;
    let mut sink = net.take_sink("next");
    // Early in an epoch, so the restart happens while the packet's key is current.
    let epoch = just_after_next_boundary(100).await;
    net.republish(2);
    let captured = net.packet(
        &["mix", "next"],
        KeyBytes([3; 32]),
        b"captured",
        &[Duration::ZERO; 2],
    );
    let mut link = net.link("peer", "mix").await;
    link.send_packet(&captured).await.unwrap();
    assert!(
        sink.next(Duration::from_secs(5)).await.is_some(),
        "the original is forwarded"
    );

    // A drain saves the filters; the restarted node loads them.
    net.restart("mix", rotating).await;
    assert_eq!(
        schedule().epoch_at(unix_ms()),
        epoch,
        "the restart outlasted the epoch"
    );
    let mut link = net.link("peer", "mix").await;
    link.send_packet(&captured).await.unwrap();
    let m = net.node("mix").metrics.clone();
    assert!(
        eventually(Duration::from_secs(5), || m.drop_count(DropReason::Replay)
            == 1)
        .await,
        "the replay after the restart was not caught"
    );
    assert!(sink.next(Duration::from_millis(500)).await.is_none());

    // Once the epoch and its overlap are over, the key is gone: the packet is not for any
    // key the node holds.
    let gone = schedule().end_ms(epoch) + OVERLAP.as_millis() as u64 + 300;
    tokio::time::sleep(Duration::from_millis(gone.saturating_sub(unix_ms()))).await;
    link.send_packet(&captured).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || m
            .drop_count(DropReason::ExpiredKey)
            == 1)
        .await,
        "a packet for a retired key was not refused as expired_key"
    );
    assert_eq!(m.drop_count(DropReason::Replay), 1);
    assert!(sink.next(Duration::from_millis(500)).await.is_none());
    // Its filter went with it.
    let filters = net.dir.path().join("mix").join("replay");
    assert!(!filters.join(format!("epoch-{epoch}.bloom")).exists());
    net.stop().await;
}

/// The node's own process, SIGKILLed: no shutdown, no last snapshot of its replay filters.
fn sigkill(child: &tokio::process::Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_at_any_moment_forwards_no_captured_packet_again() {
    use std::collections::HashSet;
    use std::path::Path;
    let dir = tempfile::tempdir().unwrap();
    let nodes = nym_node::localnet::plan_nodes(
        dir.path(),
        free_base_port(30),
        &[
            ("peer", Mode::Mixnode, Some(1)),
            ("mix", Mode::Mixnode, Some(2)),
            ("sink", Mode::Mixnode, Some(3)),
        ],
    );
    let topology = prepare_from_keys(&nodes, dir.path());
    let listed = nym_node::topology::Topology::parse(&std::fs::read(&topology).unwrap()).unwrap();
    let hops: Vec<nym_node::client::route::Hop> =
        listed.nodes()[1..].iter().map(Into::into).collect();
    let keys = |i: usize| nym_node::keys::NodeKeys::load(&nodes[i].dir.join("keys")).unwrap();
    let (peer, mix_noise) = (keys(0), keys(1).public().noise_key);
    let mut sink = Sink::start(
        tokio::net::TcpListener::bind(nodes[2].mixnet)
            .await
            .unwrap(),
        keys(2),
        vec![mix_noise],
    );
    let spawn = || {
        nym_node::localnet::spawn_node_with(
            Path::new(env!("CARGO_BIN_EXE_nym-node")),
            &nodes[1],
            &topology,
            &[("NYM_NODE_REPLAY_FILTER_SAVE_INTERVAL", "1s")],
        )
        .unwrap()
    };
    let mut captured: Vec<nym_node::mixnet::sphinx::PacketBytes> = Vec::new();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut duplicates = 0;
    let mut drain = |sink: &mut Sink, seen: &mut HashSet<Vec<u8>>| {
        while let Ok(a) = sink.rx.try_recv() {
            if !seen.insert(a.packet.to_vec()) {
                duplicates += 1;
            }
        }
    };
    let mut child = spawn();
    // Kill points: early, between snapshots, just after one, and while replays are fed in.
    for (round, kill_after_ms) in [150u64, 700, 1100, 420].into_iter().enumerate() {
        let mut link = ready_link(&nodes[1], &peer, &mix_noise).await;
        // First every packet captured so far (each forwarded before, or lost in a kill),
        // then fresh ones, until the kill.
        feed(&mut link, &captured).await;
        let kill_at = tokio::time::Instant::now() + Duration::from_millis(kill_after_ms);
        send_fresh_until(&mut link, &hops, round, kill_at, &mut captured).await;
        sigkill(&child);
        child.wait().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drain(&mut sink, &mut seen);
        child = spawn();
    }
    // The last restart is fed every capture once more, and left running.
    let mut link = ready_link(&nodes[1], &peer, &mix_noise).await;
    let forwarded_before = seen.len();
    feed(&mut link, &captured).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drain(&mut sink, &mut seen);
    let replays = replays_refused(&nodes[1], dir.path()).await;
    sigkill(&child);
    let _ = child.wait().await;
    let log = std::fs::read_to_string(nodes[1].dir.join("node.log")).unwrap_or_default();
    println!(
        "captured={} forwarded_distinct={} duplicates={duplicates} recovered_logs={}",
        captured.len(),
        seen.len(),
        log.matches("replay tags recovered").count()
    );
    assert!(seen.len() > 100, "traffic flowed: {}", seen.len());
    assert_eq!(
        duplicates, 0,
        "a packet forwarded before a kill was forwarded again"
    );
    assert!(
        log.contains("replay tags recovered"),
        "the kills came between snapshots: the journal carried tags across"
    );
    assert!(
        replays >= forwarded_before,
        "every packet forwarded before was refused as a replay: {replays} of {forwarded_before}"
    );
}

/// Packets `node` (of the localnet in `dir`) refused as replays since it started, from its
/// metrics (read with the localnet's token).
async fn replays_refused(node: &nym_node::localnet::LocalNode, dir: &std::path::Path) -> usize {
    let token = std::fs::read_to_string(dir.join("metrics.token")).unwrap();
    let (_, metrics) = nym_node::http::probe::request(
        node.http,
        "/metrics",
        &[("Authorization", &format!("Bearer {}", token.trim()))],
    )
    .await
    .unwrap();
    metrics
        .lines()
        .find(|l| {
            l.starts_with("nym_node_packets_dropped_total") && l.contains("reason=\"replay\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as usize
}

/// A link from `peer` to `node` once the node is ready.
async fn ready_link(
    node: &nym_node::localnet::LocalNode,
    peer: &nym_node::keys::NodeKeys,
    noise: &KeyBytes,
) -> Link {
    nym_node::localnet::wait_ready(std::slice::from_ref(node), Duration::from_secs(30))
        .await
        .unwrap();
    Link::connect(node.mixnet, peer, noise).await.unwrap()
}

/// Sends fresh packets along `hops` until `until` (or the link breaks), keeping each sent
/// one in `captured` as an observer on the link would.
async fn send_fresh_until(
    link: &mut Link,
    hops: &[nym_node::client::route::Hop],
    round: usize,
    until: tokio::time::Instant,
    captured: &mut Vec<nym_node::mixnet::sphinx::PacketBytes>,
) {
    let mut i = 0u32;
    while tokio::time::Instant::now() < until {
        let p = nym_node::client::packet::build_forward(
            hops,
            &KeyBytes([1; 32]),
            format!("round {round} packet {i}").as_bytes(),
            &[Duration::ZERO, Duration::ZERO],
        )
        .unwrap()
        .1;
        if link.send_packet(&p).await.is_err() {
            return;
        }
        captured.push(p);
        i += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends `packets` at a pace the node's per-peer queue takes without shedding.
async fn feed(link: &mut Link, packets: &[nym_node::mixnet::sphinx::PacketBytes]) {
    for chunk in packets.chunks(64) {
        for p in chunk {
            let _ = link.send_packet(p).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}
