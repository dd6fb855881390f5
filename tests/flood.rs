//! Pre-handshake floods against the layer-1 mixes of a localnet, started before any link
//! exists: silent connections and slow trickles, reopened as the nodes close them, from 100
//! loopback addresses that are not the nodes', and from the nodes' own address (peers behind
//! one NAT, a cluster's SNAT). Links must still form and a probe arrive whole.
//!
//! One test, so the floods run alone (test binaries run one at a time); it raises its own
//! file-descriptor limit.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use nym_node::client::{ClientConfig, MixClient, probe};
use nym_node::keys::Identity;
use nym_node::metrics::RefusalReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Flooding connections held open at once against each target.
const PER_TARGET: usize = 1500;
const PROBE: usize = 100;
const MAX_RETRANSMISSIONS: u64 = 5;

fn raise_fd_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let want = 65_536.max(limit.rlim_cur);
            limit.rlim_max = limit.rlim_max.max(want);
            limit.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// One flooding connection after another from `source` to `target`: silent, or sending a
/// byte every 200 ms (never a whole handshake message), each held until the node closes it.
async fn flood(
    source: IpAddr,
    target: SocketAddr,
    trickle: bool,
    opened: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if socket.bind(SocketAddr::new(source, 0)).is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(2), socket.connect(target)) => r,
        };
        let Ok(Ok(mut stream)) = connected else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = stream.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { break },
                _ = tokio::time::sleep(Duration::from_millis(200)), if trickle => {
                    if stream.write_all(&[0]).await.is_err() { break }
                }
            }
        }
    }
}

/// The flood, on threads and a runtime of its own: an attacker is another machine, not a
/// set of tasks taking turns on the nodes' own worker threads (on which it would starve
/// the nodes' tasks in a way no outsider can). It still shares the machine's two cores.
fn start_flooder(
    sources: Vec<IpAddr>,
    targets: [SocketAddr; 2],
    opened: Arc<AtomicU64>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the flood");
        runtime.block_on(async move {
            let mut floods = tokio::task::JoinSet::new();
            for target in targets {
                for i in 0..PER_TARGET {
                    floods.spawn(flood(
                        sources[i % sources.len()],
                        target,
                        i % 3 == 0,
                        opened.clone(),
                        stop.clone(),
                    ));
                }
            }
            while floods.join_next().await.is_some() {}
        });
    })
}

struct Outcome {
    opened: u64,
    evicted: u64,
    delivered: usize,
    retransmissions: u64,
}

/// A localnet whose layer-1 mixes take `PER_TARGET` flooding connections each from
/// `sources` (a third of them trickling) before any link exists, then a probe.
async fn probe_under_flood(sources: Vec<IpAddr>) -> Outcome {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let stop = CancellationToken::new();
    let opened = Arc::new(AtomicU64::new(0));
    let targets = ["mix-1a", "mix-1b"].map(|t| net.mixnet_addr(t));
    let flooder = start_flooder(sources, targets, opened.clone(), stop.clone());
    // The flood holds every place before the first link is made.
    let mixes = [
        net.node("mix-1a").metrics.clone(),
        net.node("mix-1b").metrics.clone(),
    ];
    assert!(
        eventually(Duration::from_secs(60), || mixes
            .iter()
            .all(|m| m.refused_count(RefusalReason::Evicted) > 1000))
        .await,
        "the flood fills the handshake places"
    );
    let config = ClientConfig {
        topology: net.topology_path.display().to_string(),
        gateway: Some(net.member("gateway").entry.identity_key),
        cover_rate: 0.0,
        // The flooder runs on the same two cores as the nodes: a late ack is its CPU, not
        // the admission; a retransmission should mean a packet that did not get through.
        ack_slack: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    let mut client = MixClient::start(config, Identity::generate().unwrap())
        .await
        .unwrap();
    let report = probe::run(&mut client, PROBE, 64, Duration::from_secs(120)).await;
    eprintln!("{}", report.summary());
    client.stop().await;
    stop.cancel();
    flooder.join().expect("the flooder ends when stopped");
    let outcome = Outcome {
        opened: opened.load(Ordering::Relaxed),
        evicted: mixes
            .iter()
            .map(|m| m.refused_count(RefusalReason::Evicted))
            .sum(),
        delivered: report.delivered,
        retransmissions: report.retransmissions,
    };
    net.stop().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_silent_and_trickling_connections_do_not_stop_links_from_forming() {
    raise_fd_limit();
    let strangers: Vec<IpAddr> = (0..100u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1 + i / 50, 2 + i % 50)))
        .collect();
    let own = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    for (name, sources) in [
        ("100 other addresses", strangers),
        ("the nodes' own address", own),
    ] {
        let o = probe_under_flood(sources).await;
        eprintln!(
            "flood from {name}: {} connections opened, {} evicted silent; probe delivered {}/{PROBE} with {} retransmissions",
            o.opened, o.evicted, o.delivered, o.retransmissions
        );
        assert_eq!(o.delivered, PROBE, "flood from {name}");
        assert!(
            o.retransmissions <= MAX_RETRANSMISSIONS,
            "flood from {name}: {} retransmissions",
            o.retransmissions
        );
    }
}
