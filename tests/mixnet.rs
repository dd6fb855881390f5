//! Whole-node behaviour over real sockets: delivery through three layers, chunking,
//! replays, unknown keys, per-hop delays and every kind of bad input.

mod common;

use std::time::Duration;

use common::*;
use nym_node::client::{ClientConfig, MixClient};
use nym_node::config::Mode;
use nym_node::keys::{Identity, KeyBytes, NodeKeys};
use nym_node::metrics::{DropReason, HandshakeFailure};
use nym_node::mixnet::framing::{
    FRAME_CIPHERTEXT_LEN, FRAME_PLAINTEXT_LEN, FRAME_VERSION, KIND_PACKET,
};
use nym_node::mixnet::sphinx::{PACKET_SIZE, Processed, SphinxProcessor};

const WAIT: Duration = Duration::from_secs(10);

async fn client(net: &Net, gateway: &str) -> MixClient {
    let config = ClientConfig {
        topology: net.topology_path.display().to_string(),
        gateway: Some(net.member(gateway).entry.identity_key),
        mean_delay: Duration::from_millis(5),
        cover_rate: 0.0,
        ..ClientConfig::default()
    };
    MixClient::start(config, Identity::generate().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layer_network_delivers_every_message_intact() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let mut c = client(&net, "gateway").await;
    let me = c.address();
    let mut sent: Vec<Vec<u8>> = (0..40u32)
        .map(|i| {
            let mut body = i.to_be_bytes().to_vec();
            body.extend((0..200).map(|_| rand::random::<u8>()));
            body
        })
        .collect();
    for body in &sent {
        c.send(me, body.clone(), 0).await.unwrap();
    }
    let mut got = receive(&mut c, sent.len(), Duration::from_secs(60)).await;
    sent.sort();
    got.sort();
    assert_eq!(got.len(), sent.len(), "every message arrives");
    assert_eq!(got, sent, "byte for byte");
    // Every packet crossed all three layers: each layer forwarded at least the messages.
    for layer in ["1", "2", "3"] {
        let forwarded: u64 = ["a", "b"]
            .iter()
            .map(|s| {
                net.node(&format!("mix-{layer}{s}"))
                    .metrics
                    .packets_forwarded
                    .get()
            })
            .sum();
        assert!(forwarded >= 40, "layer {layer} forwarded {forwarded}");
    }
    c.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_bigger_than_a_packet_is_chunked_and_reassembled() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let mut c = client(&net, "gateway").await;
    let me = c.address();
    let body: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
    c.send(me, body.clone(), 0).await.unwrap();
    let got = receive(&mut c, 1, Duration::from_secs(60)).await;
    assert_eq!(got, vec![body]);
    let packets = c
        .stats()
        .packets_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(packets >= 30, "50 kB needs ~31 packets, sent {packets}");
    c.stop().await;
    net.stop().await;
}

fn relay_spec() -> Vec<(&'static str, Role)> {
    vec![
        ("peer", Role::Peer),
        ("peer2", Role::Peer),
        ("mix", Role::Node(Mode::Mixnode, Some(1))),
        ("next", Role::Sink(Some(2))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_packet_is_dropped_at_the_node_that_saw_it_first() {
    let mut net = Net::start(&relay_spec(), |_, _| {}, no_hooks).await;
    let mut sink = net.take_sink("next");
    let packet = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"once",
        &[Duration::ZERO; 2],
    );
    let mut link = net.link("peer", "mix").await;
    link.send_packet(&packet).await.unwrap();
    // The replay comes over another link, as an attacker's would.
    let mut link2 = net.link("peer2", "mix").await;
    link2.send_packet(&packet).await.unwrap();
    let metrics = &net.node("mix").metrics;
    assert!(eventually(WAIT, || metrics.drop_count(DropReason::Replay) == 1).await);
    assert!(
        sink.next(WAIT).await.is_some(),
        "the first copy is forwarded"
    );
    assert!(
        sink.next(Duration::from_millis(500)).await.is_none(),
        "the replay is not"
    );
    assert_eq!(metrics.packets_received.get(), 2);
    assert_eq!(metrics.packets_forwarded.get(), 1);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_noise_key_is_refused_and_other_links_keep_working() {
    let mut net = Net::start(&relay_spec(), |_, _| {}, no_hooks).await;
    let mut sink = net.take_sink("next");
    let mut good = net.link("peer", "mix").await;
    let stranger = NodeKeys::generate(Duration::from_secs(3600)).unwrap();
    let mix = net.member("mix");
    let addr = mix.entry.mixnet_address.to_string().parse().unwrap();
    let refused = Link::connect(addr, &stranger, &mix.entry.noise_key).await;
    // XK completes on the initiator's side before the responder sees its key; the node then closes.
    if let Ok(mut link) = refused {
        let _ = link.send_packet(&[0u8; PACKET_SIZE]).await;
        assert!(
            link.closed_within(WAIT).await,
            "the node closes a stranger's link"
        );
    }
    let metrics = &net.node("mix").metrics;
    assert!(
        eventually(WAIT, || metrics
            .handshake_failures(true, HandshakeFailure::UnknownKey)
            == 1)
        .await
    );
    assert_eq!(
        metrics.packets_received.get(),
        0,
        "nothing from the stranger was accepted"
    );
    let packet = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"still works",
        &[Duration::ZERO; 2],
    );
    good.send_packet(&packet).await.unwrap();
    assert!(sink.next(WAIT).await.is_some());
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_hop_delays_are_honoured() {
    let mut net = Net::start(&relay_spec(), |_, _| {}, no_hooks).await;
    let mut sink = net.take_sink("next");
    let next_keys = net.member("next").keys.clone();
    let delays_ms = [400u64, 100, 250, 0, 50, 175];
    let mut link = net.link("peer", "mix").await;
    let mut sent_at = Vec::new();
    for (i, d) in delays_ms.iter().enumerate() {
        let packet = net.packet(
            &["mix", "next"],
            KeyBytes([1; 32]),
            &[i as u8],
            &[Duration::from_millis(*d), Duration::ZERO],
        );
        sent_at.push(tokio::time::Instant::now());
        link.send_packet(&packet).await.unwrap();
    }
    let arrivals = sink.collect(delays_ms.len(), WAIT).await;
    assert_eq!(arrivals.len(), delays_ms.len());
    // Identify each packet by unwrapping it at the sink (the final hop).
    let unwrap = SphinxProcessor::new(
        std::sync::Arc::new(nym_node::mixnet::epochs::KeyRing::fixed(
            next_keys.sphinx.current().unwrap().secret().clone(),
            1024,
        )),
        Duration::from_secs(10),
    );
    let mut order = Vec::new();
    for a in &arrivals {
        let Ok(Processed::Final(hop)) = unwrap.process(&a.packet) else {
            panic!("final hop expected")
        };
        let plain = sphinx_packet::payload::Payload::from_bytes(&hop.payload)
            .unwrap()
            .recover_plaintext()
            .unwrap();
        let i = plain[0] as usize;
        // Never before the delay the header asked for.
        assert!(
            a.at >= sent_at[i] + Duration::from_millis(delays_ms[i]),
            "packet {i} left before its {} ms delay",
            delays_ms[i]
        );
        order.push(i);
    }
    let mut by_delay: Vec<usize> = (0..delays_ms.len()).collect();
    by_delay.sort_by_key(|i| delays_ms[*i]);
    assert_eq!(
        order, by_delay,
        "packets leave in the order of their delays"
    );
    net.stop().await;
}

/// Sends `bad` on one link and checks: counted under `reason`, that link closed (or not),
/// and a packet on another link still goes through.
async fn bad_input_case(reason: DropReason, closes: bool, bad: impl AsyncFnOnce(&mut Link, &Net)) {
    let mut net = Net::start(&relay_spec(), |_, _| {}, no_hooks).await;
    let mut sink = net.take_sink("next");
    let mut other = net.link("peer2", "mix").await;
    let mut link = net.link("peer", "mix").await;
    bad(&mut link, &net).await;
    let metrics = net.node("mix").metrics.clone();
    assert!(
        eventually(WAIT, || metrics.drop_count(reason) == 1).await,
        "{reason:?} counted once (got {})",
        metrics.drop_count(reason)
    );
    for r in DropReason::ALL {
        if r != reason {
            assert_eq!(
                metrics.drop_count(r),
                0,
                "only {reason:?} is counted, not {r:?}"
            );
        }
    }
    if closes {
        assert!(
            link.closed_within(WAIT).await,
            "the offending link is closed"
        );
    } else {
        let p = net.packet(
            &["mix", "next"],
            KeyBytes([2; 32]),
            b"same link",
            &[Duration::ZERO; 2],
        );
        link.send_packet(&p).await.unwrap();
        assert!(sink.next(WAIT).await.is_some(), "the link stays usable");
    }
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"other link",
        &[Duration::ZERO; 2],
    );
    other.send_packet(&p).await.unwrap();
    assert!(
        sink.next(WAIT).await.is_some(),
        "other links are undisturbed"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_with_wrong_length_is_rejected() {
    bad_input_case(
        DropReason::MalformedFrame,
        true,
        async |l: &mut Link, _: &Net| {
            l.send_plaintext(&[FRAME_VERSION, KIND_PACKET, 1, 2, 3])
                .await
                .unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_rejected_without_buffering_it() {
    bad_input_case(
        DropReason::OversizedFrame,
        true,
        async |l: &mut Link, _: &Net| {
            // Only the length prefix is needed to refuse it.
            l.send_bytes(&60_000u16.to_be_bytes()).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_with_unknown_version_is_rejected() {
    bad_input_case(
        DropReason::BadVersion,
        true,
        async |l: &mut Link, _: &Net| {
            let mut plain = vec![0u8; FRAME_PLAINTEXT_LEN];
            plain[0] = FRAME_VERSION + 1;
            l.send_plaintext(&plain).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_failing_authentication_is_rejected() {
    bad_input_case(
        DropReason::DecryptFailed,
        true,
        async |l: &mut Link, _: &Net| {
            let mut bytes = (FRAME_CIPHERTEXT_LEN as u16).to_be_bytes().to_vec();
            bytes.extend((0..FRAME_CIPHERTEXT_LEN).map(|_| rand::random::<u8>()));
            l.send_bytes(&bytes).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_with_an_altered_header_is_dropped_and_the_link_survives() {
    // Links are authenticated, so an altered header comes from its sender: its MAC verifies
    // under none of the node's keys, exactly like a packet built for a retired key.
    bad_input_case(
        DropReason::ExpiredKey,
        false,
        async |l: &mut Link, net: &Net| {
            let mut p = net.packet(
                &["mix", "next"],
                KeyBytes([1; 32]),
                b"x",
                &[Duration::ZERO; 2],
            );
            p[100] ^= 0xff;
            l.send_packet(&p).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_with_a_low_order_group_element_is_malformed_and_the_link_survives() {
    bad_input_case(
        DropReason::MalformedPacket,
        false,
        async |l: &mut Link, net: &Net| {
            let mut p = net.packet(
                &["mix", "next"],
                KeyBytes([1; 32]),
                b"x",
                &[Duration::ZERO; 2],
            );
            p[..32].copy_from_slice(&[0u8; 32]);
            l.send_packet(&p).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_asking_for_too_long_a_delay_is_dropped() {
    bad_input_case(
        DropReason::ExcessiveDelay,
        false,
        async |l: &mut Link, net: &Net| {
            let p = net.packet(
                &["mix", "next"],
                KeyBytes([1; 32]),
                b"x",
                &[Duration::from_secs(3600), Duration::ZERO],
            );
            l.send_packet(&p).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_for_a_next_hop_outside_the_topology_is_dropped() {
    bad_input_case(
        DropReason::UnknownPeer,
        false,
        async |l: &mut Link, net: &Net| {
            let stranger = NodeKeys::generate(Duration::from_secs(3600))
                .unwrap()
                .public();
            let hops = vec![
                net.member("mix").hop(),
                nym_node::client::route::Hop {
                    identity: stranger.identity_key,
                    sphinx_keys: stranger.sphinx_keys,
                },
            ];
            let p = nym_node::client::packet::build_forward(
                &hops,
                &KeyBytes([1; 32]),
                b"x",
                &[Duration::ZERO; 2],
            )
            .unwrap()
            .1;
            l.send_packet(&p).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_hop_packet_at_a_mix_node_is_dropped() {
    bad_input_case(
        DropReason::NoRoute,
        false,
        async |l: &mut Link, net: &Net| {
            let p = net.packet(&["mix"], KeyBytes([1; 32]), b"x", &[Duration::ZERO]);
            l.send_packet(&p).await.unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_revision_an_expired_or_re_keyed_document_a_bad_signature_or_junk_is_refused_and_the_last_good_document_kept()
 {
    let directory = nym_node::keys::Identity::generate().unwrap();
    let mut net = Net::start_signed(&relay_spec(), |_, _| {}, no_hooks, directory).await;
    let mut sink = net.take_sink("next");
    let node = net.node("mix");
    let (topology, m) = (node.topology.clone(), node.metrics.clone());
    net.write_topology(5);
    assert!(
        eventually(WAIT, || topology
            .current()
            .is_some_and(|t| t.revision() == 5))
        .await
    );

    // An older revision that would drop `next`: refused, revision 5 stays.
    let failed = m.topology_reloads_failed.get();
    let next = net.member("next").entry.identity_key;
    let stale = nym_node::topology::TopologyDocument::issue(
        3,
        net.members
            .iter()
            .filter(|x| x.entry.identity_key != next)
            .map(|x| x.entry.clone())
            .collect(),
    );
    net.write_document(&stale);
    assert!(eventually(WAIT, || m.topology_reloads_failed.get() > failed).await);
    assert_eq!(topology.current().unwrap().revision(), 5);

    // A newer revision dropping `next`, but unsigned, signed by another key, or signed and
    // then changed: each refused, revision 5 stays.
    let forged = nym_node::topology::TopologyDocument {
        revision: 9,
        ..stale.clone()
    };
    let other = nym_node::keys::Identity::generate().unwrap();
    let signed =
        nym_node::topology::sign_document(&forged, net.directory.as_ref().unwrap()).unwrap();
    let changed =
        String::from_utf8(signed)
            .unwrap()
            .replacen("\"revision\":9", "\"revision\":10", 1);
    for bytes in [
        serde_json::to_vec(&forged).unwrap(),
        nym_node::topology::sign_document(&forged, &other).unwrap(),
        changed.into_bytes(),
    ] {
        let failed = m.topology_reloads_failed.get();
        std::fs::write(&net.topology_path, bytes).unwrap();
        assert!(eventually(WAIT, || m.topology_reloads_failed.get() > failed).await);
        assert_eq!(topology.current().unwrap().revision(), 5);
    }

    // 10 MB of junk: refused unread beyond the size limit.
    let failed = m.topology_reloads_failed.get();
    std::fs::write(&net.topology_path, vec![b'x'; 10 * 1024 * 1024]).unwrap();
    assert!(eventually(WAIT, || m.topology_reloads_failed.get() > failed).await);
    assert_eq!(topology.current().unwrap().revision(), 5);

    // Signed by the directory itself: a newer revision that expired, and one where the
    // directory put its own Noise key in `next`'s entry (a man in the middle of the link).
    // Each refused, revision 5 stays.
    let whole = || net.members.iter().map(|x| x.entry.clone()).collect();
    let mut expired = nym_node::topology::TopologyDocument::issue(11, whole());
    expired.issued_at -= 7200;
    expired.valid_until = expired.issued_at + 3600;
    let mut rekeyed = nym_node::topology::TopologyDocument::issue(12, whole());
    let entry = rekeyed
        .nodes
        .iter_mut()
        .find(|n| n.identity_key == next)
        .unwrap();
    entry.noise_key = nym_node::keys::NodeKeys::generate(Duration::from_secs(3600))
        .unwrap()
        .public()
        .noise_key;
    for (what, doc) in [("expired", &expired), ("re-keyed", &rekeyed)] {
        let failed = m.topology_reloads_failed.get();
        net.write_document(doc);
        assert!(
            eventually(WAIT, || m.topology_reloads_failed.get() > failed).await,
            "{what}"
        );
        assert_eq!(topology.current().unwrap().revision(), 5, "{what}");
    }

    // A restart with only an older revision to read (3, validly signed and unexpired): the
    // node starts from the last good document it kept, revision 5, and refuses 3.
    net.write_document(&stale);
    let signer = net.directory.as_ref().unwrap().public().to_base58();
    net.restart("mix", |_, c| c.topology_signer = signer.clone())
        .await;
    let node = net.node("mix");
    let (topology, m) = (node.topology.clone(), node.metrics.clone());
    assert_eq!(topology.current().unwrap().revision(), 5, "restored");
    assert!(
        eventually(WAIT, || m.topology_reloads_failed.get() > 0).await,
        "revision 3 refused after the restart"
    );
    assert_eq!(topology.current().unwrap().revision(), 5);

    // The node keeps forwarding on the last good document.
    let mut link = net.link("peer", "mix").await;
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([3; 32]),
        b"still",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&p).await.unwrap();
    assert!(sink.next(WAIT).await.is_some(), "forwarded on revision 5");
    net.stop().await;
}
