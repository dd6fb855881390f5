//! Peers by host name, against a real DNS server on a loopback port.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns_server::DnsServer;
use common::*;
use nym_node::config::Mode;
use nym_node::dns::{DnsSettings, Resolver};
use nym_node::keys::KeyBytes;
use nym_node::metrics::Metrics;
use nym_node::topology::PeerAddress;

fn resolver(dns: &DnsServer) -> (Arc<Resolver>, Arc<Metrics>) {
    let metrics = Metrics::new("mixnode");
    let settings = DnsSettings {
        servers: vec![dns.addr],
        ..DnsSettings::default()
    };
    (Resolver::new(settings, metrics.clone()).unwrap(), metrics)
}

/// Moves tokio's clock forward without touching the network (paused only meanwhile).
async fn skip(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d).await;
    tokio::time::resume();
}

#[tokio::test]
async fn an_hour_long_ttl_is_cached_for_sixty_seconds_at_most() {
    let dns = DnsServer::start().await;
    dns.set("peer.mixnet.test", &[Ipv4Addr::new(10, 0, 0, 1)], 3600);
    let (r, metrics) = resolver(&dns);
    assert_eq!(
        r.resolve("peer.mixnet.test").await.unwrap(),
        vec![Ipv4Addr::new(10, 0, 0, 1)]
    );
    assert_eq!(dns.queries(), 1);
    r.resolve("peer.mixnet.test").await.unwrap();
    assert_eq!(dns.queries(), 1, "second lookup from the cache");
    skip(Duration::from_secs(59)).await;
    r.resolve("peer.mixnet.test").await.unwrap();
    assert_eq!(dns.queries(), 1, "still cached at 59 s");
    skip(Duration::from_secs(2)).await;
    r.resolve("peer.mixnet.test").await.unwrap();
    assert_eq!(
        dns.queries(),
        2,
        "re-resolved after the 60 s cap despite TTL 3600"
    );
    assert_eq!(metrics.dns_cache_hits.get(), 2);
    assert_eq!(metrics.dns_queries.get(), 2);
}

#[tokio::test]
async fn a_short_ttl_is_honoured_and_a_missing_name_is_a_clear_error() {
    let dns = DnsServer::start().await;
    dns.set("short.mixnet.test", &[Ipv4Addr::new(10, 0, 0, 2)], 5);
    let (r, metrics) = resolver(&dns);
    r.resolve("short.mixnet.test").await.unwrap();
    skip(Duration::from_secs(6)).await;
    r.resolve("short.mixnet.test").await.unwrap();
    assert_eq!(
        dns.queries(),
        2,
        "the record's own TTL (5 s) applies below the cap"
    );
    let err = r
        .resolve("nowhere.mixnet.test")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere.mixnet.test"), "{err}");
    assert_eq!(metrics.dns_not_found.get(), 1);
    // Negative answers are cached briefly.
    assert!(r.resolve("nowhere.mixnet.test").await.is_err());
    assert_eq!(metrics.dns_not_found.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_shuffled_and_a_dial_walks_past_a_refusing_address() {
    let dns = DnsServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    // 127.0.0.2 has nothing listening on that port: it refuses.
    let (live, dead) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    dns.set("two.mixnet.test", &[dead, live], 3600);
    let (r, _) = resolver(&dns);
    let mut first_seen = std::collections::HashSet::new();
    for _ in 0..64 {
        first_seen.insert(r.resolve("two.mixnet.test").await.unwrap()[0]);
    }
    assert_eq!(first_seen.len(), 2, "both orders occur");
    let peer = PeerAddress {
        host: "two.mixnet.test".into(),
        port,
    };
    for _ in 0..20 {
        let stream = r
            .connect(&peer, Duration::from_secs(2))
            .await
            .expect("reaches the live address");
        assert_eq!(stream.peer_addr().unwrap(), SocketAddr::from((live, port)));
    }
    assert_eq!(
        dns.queries(),
        1,
        "a refusal on one address of a working name does not evict it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_hard_failure_the_next_dial_follows_the_changed_record() {
    let dns = DnsServer::start().await;
    let old = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = old.local_addr().unwrap().port();
    dns.set("moving.mixnet.test", &[Ipv4Addr::new(127, 0, 0, 1)], 3600);
    let (r, metrics) = resolver(&dns);
    let peer = PeerAddress {
        host: "moving.mixnet.test".into(),
        port,
    };
    r.connect(&peer, Duration::from_secs(2)).await.unwrap();

    // The peer moves: old address gone, record changed, long TTL still cached.
    drop(old);
    let new = tokio::net::TcpListener::bind(("127.0.0.2", port))
        .await
        .unwrap();
    dns.set("moving.mixnet.test", &[Ipv4Addr::new(127, 0, 0, 2)], 3600);
    assert!(
        r.connect(&peer, Duration::from_secs(2)).await.is_err(),
        "the cached address refuses"
    );
    assert_eq!(
        metrics.dns_evictions.get(),
        1,
        "the hard failure evicts the name"
    );
    let stream = r
        .connect(&peer, Duration::from_secs(2))
        .await
        .expect("next dial re-resolves");
    assert_eq!(stream.peer_addr().unwrap(), new.local_addr().unwrap());
    assert_eq!(dns.queries(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_node_forwards_to_a_peer_named_by_host_name_and_follows_it() {
    let dns = DnsServer::start().await;
    let dns_addr = dns.addr;
    let mut net = Net::start(
        &[
            ("peer", Role::Peer),
            ("mix", Role::Node(Mode::Mixnode, Some(1))),
            ("next", Role::Sink(Some(2))),
        ],
        |_, c| c.dns_servers = nym_node::config::DnsServers(vec![dns_addr]),
        no_hooks,
    )
    .await;
    let sink = net.take_sink("next");
    let port = sink.addr.port();
    dns.set("next.mixnet.test", &[Ipv4Addr::new(127, 0, 0, 1)], 3600);
    net.member_mut("next").entry.mixnet_address =
        format!("next.mixnet.test:{port}").parse().unwrap();
    net.write_topology(2);
    let topo = net.node("mix").topology.clone();
    assert!(
        eventually(Duration::from_secs(10), || topo
            .current()
            .is_some_and(|t| t.revision() == 2))
        .await
    );

    let mut link = net.link("peer", "mix").await;
    let mut sink = sink;
    let p = net.packet(
        &["mix", "next"],
        KeyBytes([1; 32]),
        b"by name",
        &[Duration::ZERO; 2],
    );
    link.send_packet(&p).await.unwrap();
    assert!(
        sink.next(Duration::from_secs(10)).await.is_some(),
        "forwarded to the named peer"
    );

    // The peer restarts at another address under the same name.
    sink.abort();
    let listener = tokio::net::TcpListener::bind(("127.0.0.2", port))
        .await
        .unwrap();
    let mut moved = net.sink_at("next", listener);
    dns.set("next.mixnet.test", &[Ipv4Addr::new(127, 0, 0, 2)], 3600);
    assert!(
        net.send_until_received(&mut link, "mix", "next", &mut moved)
            .await,
        "packets follow the name to its new address, long before the 60 s cap"
    );
    assert!(net.node("mix").metrics.dns_evictions.get() >= 1);
    net.stop().await;
}

#[tokio::test]
async fn unique_names_cannot_grow_the_cache_past_its_bound_and_expired_answers_are_swept() {
    let dns = DnsServer::start().await;
    dns.set("peer.mixnet.test", &[Ipv4Addr::new(10, 0, 0, 1)], 3600);
    let metrics = Metrics::new("exit-gateway");
    let r = Resolver::new(
        DnsSettings {
            servers: vec![dns.addr],
            max_entries: 64,
            ..DnsSettings::default()
        },
        metrics.clone(),
    )
    .unwrap();
    r.resolve("peer.mixnet.test").await.unwrap();
    // A client asking for a thousand made-up names (each a negative answer, cached 5 s).
    for i in 0..1000 {
        let _ = r.resolve(&format!("n{i}.made-up.test")).await;
        assert!(r.cached() <= 64, "{} answers cached", r.cached());
    }
    assert!(metrics.dns_evictions.get() >= 1000 - 64);
    // Once they expire, one sweep clears them all.
    skip(Duration::from_secs(6)).await;
    let _ = r.resolve("after.made-up.test").await;
    assert!(
        r.cached() <= 2,
        "{} answers left after the sweep",
        r.cached()
    );
}
