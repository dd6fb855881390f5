//! A node that gets SIGTERM mid-stream delivers every packet it had accepted.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{free_base_port, log_field, one_per_layer};
use nym_node::client::{ClientConfig, Event, MixClient};
use nym_node::config::Mode;
use nym_node::keys::Identity;
use nym_node::localnet::{self, LocalNode};

const NODE: &str = env!("CARGO_BIN_EXE_nym-node");

async fn start(dir: &Path, nodes: &[LocalNode], topology: &Path) -> Vec<tokio::process::Child> {
    let mut children = Vec::new();
    for n in nodes {
        children.push(
            localnet::spawn_node_with(
                Path::new(NODE),
                n,
                topology,
                &[("NYM_NODE_DRAIN_GRACE", "2s")],
            )
            .unwrap(),
        );
    }
    localnet::wait_ready(nodes, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| {
            for n in nodes {
                eprintln!(
                    "{}:\n{}",
                    n.name,
                    std::fs::read_to_string(dir.join(&n.name).join("node.log")).unwrap_or_default()
                );
            }
            panic!("{e}")
        });
    children
}

fn sigterm(child: &tokio::process::Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_no_accepted_packet() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(40);
    // Layer 2 has a single node, so every packet crosses the node we stop.
    let nodes = one_per_layer(dir.path(), base);
    let topology = common::prepare_from_keys(&nodes, dir.path());
    let mut children = start(dir.path(), &nodes, &topology).await;

    // One packet per message, no acks or cover: what the stopped node accepted is exactly
    // the set of messages that can still arrive.
    let config = ClientConfig {
        topology: topology.display().to_string(),
        mean_delay: Duration::from_millis(300),
        cover_rate: 0.0,
        acks: false,
        ..ClientConfig::default()
    };
    let mut client = MixClient::start(config, Identity::generate().unwrap())
        .await
        .unwrap();
    let me = client.address();
    let mut sent = 0u32;
    let mut received = std::collections::HashSet::new();
    let mut stopped = false;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    // Send through the drain (the node still accepts peers' packets) until it is gone.
    while children[1].try_wait().unwrap().is_none() {
        tokio::select! {
            _ = tick.tick() => {
                if started.elapsed() > Duration::from_secs(1) && !stopped {
                    sigterm(&children[1]);
                    stopped = true;
                }
                client.send(me, sent.to_be_bytes().to_vec(), 0).await.unwrap();
                sent += 1;
            }
            ev = client.next_event() => {
                if let Some(Event::Received { body, .. }) = ev {
                    received.insert(body);
                }
            }
        }
    }
    let status = children[1].wait().await.unwrap();
    assert!(status.success(), "the drained node exits 0, got {status}");

    let log = std::fs::read_to_string(dir.path().join("mix-2/node.log")).unwrap();
    let accepted = log_field(&log, "pipeline drained", "received").expect("drain summary logged");
    let forwarded = log_field(&log, "pipeline drained", "forwarded").unwrap();
    let dropped = log_field(&log, "pipeline drained", "dropped").unwrap();
    let early = log_field(&log, "pipeline drained", "released_early").unwrap();
    // What left the stopped node is still crossing layer 3 and the gateway.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while (received.len() as u64) < accepted {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(Event::Received { body, .. })) => {
                received.insert(body);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    println!(
        "sent={sent} accepted_by_stopped_node={accepted} forwarded={forwarded} dropped={dropped} released_early={early} delivered={}",
        received.len()
    );
    assert!(
        accepted > 50,
        "the node was carrying traffic when stopped ({accepted})"
    );
    assert_eq!(dropped, 0, "the draining node dropped nothing");
    assert_eq!(forwarded, accepted, "every accepted packet left the node");
    assert_eq!(
        received.len() as u64,
        accepted,
        "every accepted packet reached its destination"
    );
    assert!(
        log.contains("grace period over") || log.contains("draining"),
        "drain was logged"
    );

    client.stop().await;
    for (i, c) in children.iter_mut().enumerate() {
        if i != 1 {
            sigterm(c);
            let _ = c.wait().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once_and_readiness_drops_during_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(10);
    let nodes = localnet::plan_nodes(dir.path(), base, &[("mix", Mode::Mixnode, Some(1))]);
    let topology = common::prepare_from_keys(&nodes, dir.path());
    let mut child = localnet::spawn_node_with(
        Path::new(NODE),
        &nodes[0],
        &topology,
        &[("NYM_NODE_DRAIN_GRACE", "60s")],
    )
    .unwrap();
    localnet::wait_ready(&nodes, Duration::from_secs(30))
        .await
        .unwrap();

    sigterm(&child);
    // Draining: not ready, still alive.
    let mut saw_not_ready = false;
    for _ in 0..50 {
        if let Some((503, body)) = nym_node::http::probe::get(nodes[0].http, "/readyz").await {
            assert!(body.contains("draining"), "{body}");
            saw_not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_not_ready, "/readyz turns 503 when the drain starts");
    assert_eq!(
        nym_node::http::probe::get(nodes[0].http, "/livez")
            .await
            .map(|r| r.0),
        Some(200)
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal starts a 60 s drain"
    );

    let t = tokio::time::Instant::now();
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(t.elapsed() < Duration::from_secs(5));
}
