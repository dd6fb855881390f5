//! Links that survive bad peers: idle reaping, write timeouts, connection floods, peers
//! that move, and garbage on the wire.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use nym_node::config::{DurationKnob, Mode};
use nym_node::keys::KeyBytes;
use nym_node::metrics::{DropReason, Metrics, RefusalReason};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(10);

fn relay(extra: &[(&'static str, Role)]) -> Vec<(&'static str, Role)> {
    let mut spec = vec![
        ("peer", Role::Peer),
        ("peer2", Role::Peer),
        ("mix", Role::Node(Mode::Mixnode, Some(1))),
        ("next", Role::Sink(Some(2))),
    ];
    spec.extend_from_slice(extra);
    spec
}

/// A relay whose mix closes links idle for `idle`, with one packet already through it.
async fn relay_after_one_packet(idle: Duration) -> (Net, Sink, Arc<Metrics>, Link) {
    let mut net = Net::start(
        &relay(&[]),
        move |_, c| c.connection_idle_timeout = DurationKnob(idle),
        no_hooks,
    )
    .await;
    let mut sink = net.take_sink("next");
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    assert!(net.forward_one(&mut link, "mix", "next", &mut sink).await);
    (net, sink, m, link)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_reaped_after_the_idle_timeout() {
    let (net, mut sink, m, mut link) = relay_after_one_packet(Duration::from_millis(400)).await;
    assert_eq!(m.active_ingress.get(), 1);
    assert_eq!(m.active_egress.get(), 1);

    // Then silence: both the ingress link and the egress link are closed, once each.
    assert!(
        link.closed_within(WAIT).await,
        "silent ingress link is closed"
    );
    assert!(
        eventually(WAIT, || m.idle_closed_ingress.get() == 1
            && m.idle_closed_egress.get() == 1)
        .await
    );
    assert!(
        eventually(WAIT, || m.active_ingress.get() == 0
            && m.active_egress.get() == 0)
        .await
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(m.idle_closed_ingress.get(), 1, "reaped exactly once");
    assert_eq!(m.idle_closed_egress.get(), 1, "reaped exactly once");

    // The next packet for that peer opens a new egress link.
    let mut link = net.link("peer", "mix").await;
    assert!(net.forward_one(&mut link, "mix", "next", &mut sink).await);
    assert_eq!(m.active_egress.get(), 1);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_idle_timeout_never_reaps() {
    let (net, mut sink, m, mut link) = relay_after_one_packet(Duration::ZERO).await;
    // Longer than every other timeout of the test config (frame read 10 s is not involved: no partial frame).
    assert!(!link.closed_within(Duration::from_secs(2)).await);
    assert_eq!(
        (m.idle_closed_ingress.get(), m.idle_closed_egress.get()),
        (0, 0)
    );
    assert_eq!((m.active_ingress.get(), m.active_egress.get()), (1, 1));
    assert!(net.forward_one(&mut link, "mix", "next", &mut sink).await);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_times_out_without_slowing_the_others() {
    let mut net = Net::start(
        &relay(&[("slow", Role::Sink(Some(2)))]),
        |_, c| c.connection_write_timeout = DurationKnob(Duration::from_millis(150)),
        no_hooks,
    )
    .await;
    let mut fast = net.take_sink("next");
    let slow = net.take_stalled_sink("slow");
    let m = net.node("mix").metrics.clone();
    let to_slow = net.packets(&["mix", "slow"], 2500);
    let to_fast = net.packets(&["mix", "next"], 250);
    let mut link = net.link("peer", "mix").await;

    // Watch the link to the slow peer: (timeouts so far, open egress links).
    let watch = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2000 {
                seen.push((m.write_timeouts.get(), m.active_egress.get()));
                if m.write_timeouts.get() >= 3 && m.active_egress.get() <= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        })
    };
    let mut fast_sent = 0;
    for (i, p) in to_slow.iter().enumerate() {
        link.send_packet(p).await.unwrap();
        if i % 10 == 0 && fast_sent < to_fast.len() {
            link.send_packet(&to_fast[fast_sent]).await.unwrap();
            fast_sent += 1;
        }
        // Well within what the mix unwraps, even on a busy test machine: nothing is shed.
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let seen = watch.await.unwrap();
    // Packets to the healthy peer all arrived while the other one was stuck.
    let arrived = fast.collect(fast_sent, WAIT).await;
    assert_eq!(
        arrived.len(),
        fast_sent,
        "the healthy peer got every packet"
    );

    assert!(
        m.write_timeouts.get() >= 3,
        "timeouts: {}",
        m.write_timeouts.get()
    );
    for (timeouts, active) in &seen {
        if *timeouts == 1 || *timeouts == 2 {
            assert_eq!(*active, 2, "the link survives its first two timeouts");
        }
    }
    let closed_after_third =
        seen.iter().any(|(t, a)| *t >= 3 && *a <= 1) || slow.accepted.load(Ordering::SeqCst) >= 2;
    assert!(
        closed_after_third,
        "the third timeout in a row closes the link: {:?}",
        seen.last()
    );
    assert!(
        m.drop_count(DropReason::WriteTimeout) > 0,
        "abandoned packets are counted"
    );
    assert_eq!(m.drop_count(DropReason::Overload), 0);
    slow.abort();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_silent_connections_from_one_address_do_not_keep_a_peer_out() {
    // One link slot only: the stranger's connections must not count against it.
    let mut net = Net::start(&relay(&[]), |_, c| c.max_ingress_connections = 1, no_hooks).await;
    let mut sink = net.take_sink("next");
    let m = net.node("mix").metrics.clone();
    let addr = net.mixnet_addr("mix");
    let mut flood = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            flood.push(s);
        }
    }
    assert_eq!(flood.len(), 2000);
    // 256 places: every newcomer past them closed the oldest silent connection.
    assert!(
        eventually(WAIT, || m.refused_count(RefusalReason::Evicted)
            == 2000 - 256)
        .await,
        "evicted {}",
        m.refused_count(RefusalReason::Evicted)
    );
    // A topology peer on the flood's own address connects and forwards while the flood sits.
    let peer = net.member("peer");
    let mut link = Link::connect_from(None, addr, &peer.keys, &net.member("mix").entry.noise_key)
        .await
        .expect("the peer links despite the flood");
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([5; 32]),
        b"through",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&p).await.unwrap();
    assert!(
        sink.next(WAIT).await.is_some(),
        "the peer's packet is forwarded"
    );
    // Links have their own limit: a second authenticated link is closed and counted.
    let mut second = Link::connect_from(
        Some("127.0.0.3".parse().unwrap()),
        addr,
        &net.member("peer2").keys,
        &net.member("mix").entry.noise_key,
    )
    .await
    .unwrap();
    assert!(second.closed_within(WAIT).await, "over the link limit");
    assert_eq!(m.refused_count(RefusalReason::Capacity), 1);
    assert_eq!(m.refused_count(RefusalReason::Handshakes), 0);
    drop(flood);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_flood_makes_way_for_real_peers_and_existing_links_keep_forwarding() {
    let mut net = Net::start(
        &relay(&[]),
        |_, c| {
            c.max_ingress_connections = 4;
            c.max_pending_handshakes = 8;
        },
        no_hooks,
    )
    .await;
    let mut sink = net.take_sink("next");
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    let addr = net.mixnet_addr("mix");
    let mut flood = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            flood.push(s);
        }
    }
    // Eight places, all silent: each newcomer closed the oldest silent one.
    assert!(
        eventually(WAIT, || m.refused_count(RefusalReason::Evicted) == 32).await,
        "evicted {}",
        m.refused_count(RefusalReason::Evicted)
    );
    assert_eq!(m.refused_count(RefusalReason::Handshakes), 0);
    assert_eq!(m.refused_count(RefusalReason::Capacity), 0);
    for i in 0..20u8 {
        let p = net.packet(
            &["mix", "next"],
            KeyBytes([i; 32]),
            b"during the flood",
            &[Duration::ZERO; 2],
        );
        link.send_packet(&p).await.unwrap();
    }
    assert_eq!(
        sink.collect(20, WAIT).await.len(),
        20,
        "the existing peer is served"
    );
    // While the flood still holds every place, a real peer from the same address gets in:
    // it greets at once, the silent connections do not.
    let mut l2 = net
        .try_link("peer2", "mix")
        .await
        .expect("a real peer links during the flood");
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([9; 32]),
        b"during",
        &[Duration::ZERO; 2],
    );
    l2.send_packet(&p).await.unwrap();
    assert!(sink.next(WAIT).await.is_some());
    assert_eq!(m.refused_count(RefusalReason::Evicted), 33);
    drop(flood);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_greets_is_closed_at_the_first_message_deadline() {
    use tokio::io::AsyncReadExt;
    let net = Net::start(
        &relay(&[]),
        |_, c| {
            c.handshake_first_message_timeout = DurationKnob(Duration::from_millis(500));
            // Far beyond the test's wait: only the first-message deadline can close it.
            c.handshake_timeout = DurationKnob(Duration::from_secs(600));
        },
        no_hooks,
    )
    .await;
    let m = net.node("mix").metrics.clone();
    let mut silent = tokio::net::TcpStream::connect(net.mixnet_addr("mix"))
        .await
        .unwrap();
    // A byte now and then: never a whole first message.
    silent.write_all(&[0]).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the node closed it: {closed:?}"
    );
    assert!(
        eventually(WAIT, || m.handshake_failures(
            true,
            nym_node::metrics::HandshakeFailure::Timeout
        ) == 1)
        .await
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_restarts_on_a_new_port_is_reached_again() {
    let mut net = Net::start(&relay(&[]), |_, _| {}, no_hooks).await;
    let sink = net.take_sink("next");
    let mut link = net.link("peer", "mix").await;
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"before",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&p).await.unwrap();
    let mut sink = sink;
    assert!(sink.next(WAIT).await.is_some());

    // The peer dies and comes back elsewhere with the same keys; the topology says where.
    sink.abort();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let new_addr = listener.local_addr().unwrap();
    net.member_mut("next").entry.mixnet_address = new_addr.to_string().parse().unwrap();
    net.write_topology(2);
    let mut moved = net.sink_at("next", listener);
    let topo = net.node("mix").topology.clone();
    assert!(eventually(WAIT, || topo.current().is_some_and(|t| t.revision() == 2)).await);
    assert!(
        net.send_until_received(&mut link, "mix", "next", &mut moved)
            .await,
        "packets reach the peer at its new address without restarting the sender"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_trickled_a_byte_at_a_time_is_cut_off_at_the_frame_deadline() {
    use tokio::io::AsyncReadExt;
    let net = Net::start(
        &relay(&[]),
        |_, c| c.frame_read_timeout = DurationKnob(Duration::from_secs(1)),
        no_hooks,
    )
    .await;
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    let malformed = m.drop_count(DropReason::MalformedFrame);
    // A byte every 200 ms: each read comes well within the frame timeout, but the frame
    // (thousands of bytes) would take minutes. The node must close the link at the frame's
    // deadline, long before the trickle ends.
    link.stream
        .write_all(&(nym_node::mixnet::framing::FRAME_CIPHERTEXT_LEN as u16).to_be_bytes())
        .await
        .unwrap();
    let mut sent = 0;
    let mut probe = [0u8; 1];
    let closed = loop {
        if sent == 50 {
            break false;
        }
        tokio::select! {
            r = link.stream.read(&mut probe) => break matches!(r, Ok(0) | Err(_)),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if link.stream.write_all(&[0x09]).await.is_err() {
                    break true;
                }
                sent += 1;
            }
        }
    };
    assert!(
        closed,
        "a trickled frame kept the link open for {sent} bytes"
    );
    assert!(sent < 50);
    assert!(
        eventually(WAIT, || m.drop_count(DropReason::MalformedFrame)
            > malformed)
        .await
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_never_leaks_a_connection() {
    let mut net = Net::start(&relay(&[]), |_, _| {}, no_hooks).await;
    let mut sink = net.take_sink("next");
    let m = net.node("mix").metrics.clone();
    let addr = net.mixnet_addr("mix");
    let cases = std::env::var("WIRE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for case in 0..cases {
        let len = 1 + rand::random::<u16>() as usize % 6000;
        let mut bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        if case % 2 == 0 {
            // After a real handshake: random frames, sometimes with the right length prefix.
            let mut link = net.link("peer", "mix").await;
            if case % 4 == 0 && bytes.len() > 2 {
                bytes[..2].copy_from_slice(
                    &(nym_node::mixnet::framing::FRAME_CIPHERTEXT_LEN as u16).to_be_bytes(),
                );
            }
            let _ = link.send_bytes(&bytes).await;
            let _ = link.stream.shutdown().await;
        } else {
            // Garbage instead of a handshake.
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
            }
        }
    }
    assert!(
        eventually(WAIT, || m.active_ingress.get() == 0).await,
        "active {}",
        m.active_ingress.get()
    );
    assert_eq!(m.packets_forwarded.get(), 0, "no garbage was forwarded");
    let mut link = net.link("peer2", "mix").await;
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"fine",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&p).await.unwrap();
    assert!(sink.next(WAIT).await.is_some(), "the node still forwards");
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_egress_queue_drops_and_counts_without_blocking() {
    let mut net = Net::start(
        &relay(&[("slow", Role::Sink(Some(2)))]),
        |_, c| {
            c.egress_queue = 8;
            c.connection_write_timeout = DurationKnob(Duration::ZERO);
        },
        no_hooks,
    )
    .await;
    let mut fast = net.take_sink("next");
    let slow = net.take_stalled_sink("slow");
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    for i in 0..3000u32 {
        let p = net.packet(
            &["mix", "slow"],
            KeyBytes([1; 32]),
            &i.to_be_bytes(),
            &[Duration::ZERO; 2],
        );
        link.send_packet(&p).await.unwrap();
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(
        eventually(WAIT, || m.drop_count(DropReason::QueueFull) > 0).await,
        "a full peer queue drops"
    );
    // The forwarder never waited on the stuck peer: a packet for another peer goes straight through.
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([2; 32]),
        b"unblocked",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&p).await.unwrap();
    assert!(fast.next(WAIT).await.is_some());
    slow.abort();
    net.stop().await;
}

/// Sends `n` fresh packets `peer` → mix → next on `link`, a few milliseconds apart.
async fn send_to_next(net: &Net, link: &mut Link, n: u32) {
    for i in 0..n {
        let p = net.packet(
            &["mix", "next"],
            KeyBytes([1; 32]),
            &i.to_be_bytes(),
            &[Duration::ZERO; 2],
        );
        link.send_packet(&p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_backed_off_and_its_packets_counted() {
    let mut net = Net::start(&relay(&[]), |_, _| {}, no_hooks).await;
    // Nobody listens where the topology says "next" is.
    drop(net.sinks.remove("next"));
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    send_to_next(&net, &mut link, 20).await;
    // Held for the retries, then dropped once they waited too long (5 s).
    assert!(
        eventually(WAIT, || m.drop_count(DropReason::Backoff) == 20).await,
        "every packet is counted: backoff {} unreachable {}",
        m.drop_count(DropReason::Backoff),
        m.drop_count(DropReason::Unreachable)
    );
    assert_eq!(m.drop_count(DropReason::Unreachable), 0);
    let attempts = m.egress_connect_failures.get();
    assert!(
        (1..20).contains(&attempts),
        "it backs off rather than retrying per packet: {attempts} attempts"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_wait_for_a_peer_that_comes_back_within_the_hold() {
    let mut net = Net::start(&relay(&[]), |_, _| {}, no_hooks).await;
    // "next" refuses connections (restarting, say) until its listener is back.
    let listener = net.sinks.remove("next").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let m = net.node("mix").metrics.clone();
    let mut link = net.link("peer", "mix").await;
    send_to_next(&net, &mut link, 10).await;
    assert!(
        eventually(WAIT, || m.egress_connect_failures.get() >= 1).await,
        "the first connect is refused"
    );
    let mut sink = net.sink_at(
        "next",
        tokio::net::TcpListener::bind(address).await.unwrap(),
    );
    let arrived = sink.collect(10, WAIT).await;
    assert_eq!(arrived.len(), 10, "every held packet is sent at the retry");
    assert_eq!(m.drop_count(DropReason::Backoff), 0);
    assert_eq!(m.drop_count(DropReason::Unreachable), 0);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_removed_from_the_topology_loses_its_links_at_the_next_reload() {
    use tokio::io::AsyncReadExt;
    let mut net = Net::start(&relay(&[]), |_, _| {}, no_hooks).await;
    let mut sink = net.take_sink("next");
    let m = net.node("mix").metrics.clone();
    // Both directions exist: peer → mix (ingress) and mix → next (egress).
    let mut link = net.link("peer", "mix").await;
    assert!(net.forward_one(&mut link, "mix", "next", &mut sink).await);
    let for_next = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"after removal",
        &[Duration::ZERO; 2],
    );
    let mut link2 = net.link("peer2", "mix").await;

    // A new revision without `peer` and `next`.
    let doc = nym_node::topology::TopologyDocument::issue(
        2,
        net.members
            .iter()
            .filter(|x| x.name != "peer" && x.name != "next")
            .map(|x| x.entry.clone())
            .collect(),
    );
    std::fs::write(&net.topology_path, serde_json::to_vec(&doc).unwrap()).unwrap();

    // Ingress: the removed peer's open link is closed, though it sent nothing since.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, link.stream.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the removed peer's link stayed open: {read:?}"
    );
    // Egress: the link to `next` is still up, but nothing more is written to it.
    let unknown = m.drop_count(DropReason::UnknownPeer);
    link2.send_packet(&for_next).await.unwrap();
    assert!(eventually(WAIT, || m.drop_count(DropReason::UnknownPeer) > unknown).await);
    assert!(sink.next(Duration::from_secs(1)).await.is_none());
    net.stop().await;
}
