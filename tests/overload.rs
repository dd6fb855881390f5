//! Overload is shed before the expensive unwrap, and one flooding peer cannot starve the others.

mod common;

use std::time::Duration;

use common::*;
use nym_node::config::Mode;
use nym_node::metrics::{DropReason, Stage};
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
