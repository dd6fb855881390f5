//! The exit gateway: a real `curl` speaks SOCKS5 to `nym-client`'s proxy, and its streams
//! cross the mixnet (real Noise links, real Sphinx packets) to the exit's network requester,
//! which opens them to a local HTTP server behind the exit policy.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nym_node::client::{ClientConfig, MixClient, socks5};
use nym_node::config::Mode;
use nym_node::keys::Identity;
use nym_node::node::TestHooks;
use nym_node::topology::TopologySource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An HTTP server on loopback: `/file/N` answers the N-th body with a length, `/close/N`
/// answers it without one and ends the response by closing the connection.
async fn http_server(bodies: Vec<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(bodies);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut parts = path.trim_start_matches('/').split('/');
                let (kind, n) = (parts.next(), parts.next().and_then(|n| n.parse().ok()));
                let body: &Vec<u8> = match n.and_then(|n: usize| bodies.get(n)) {
                    Some(b) => b,
                    None => return,
                };
                if kind == Some("hold") {
                    // Answers nothing and keeps the connection: a stream that stays open.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let head = match kind {
                    Some("file") => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    ),
                    _ => "HTTP/1.0 200 OK\r\n\r\n".to_string(),
                };
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

fn random_body(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// Three mix layers, an entry gateway, an exit whose policy names the test server
/// (`exit`), and an exit with the default policy (`exit-default`).
async fn network(server: SocketAddr, hooks: impl Fn(&str) -> TestHooks) -> Net {
    network_with(server, hooks, |_| {}).await
}

/// Like [`network`], with `exit` adjusting the two exits' configuration.
async fn network_with(
    server: SocketAddr,
    hooks: impl Fn(&str) -> TestHooks,
    exit: impl Fn(&mut nym_node::config::Config),
) -> Net {
    let mut spec = three_layers();
    spec.push(("exit", Role::Node(Mode::ExitGateway, None)));
    spec.push(("exit-default", Role::Node(Mode::ExitGateway, None)));
    let policy_dir = tempfile::tempdir().unwrap().keep();
    let policy = policy_dir.join("exit-policy.txt");
    std::fs::write(
        &policy,
        format!("# the test server only, and the public internet\naccept {server}\naccept *:*\n"),
    )
    .unwrap();
    Net::start(
        &spec,
        |name, config| {
            if name == "exit" {
                config.exit_policy = policy.display().to_string();
            }
            if name.starts_with("exit") {
                exit(config);
            }
        },
        hooks,
    )
    .await
}

/// A SOCKS5 proxy of a fresh client (default delays and cover rate), leaving at `exit`.
async fn proxy(net: &Net, exit: &str) -> (SocketAddr, CancellationToken) {
    let topology = net.topology_path.display().to_string();
    let current = TopologySource::parse(&topology).load().await.unwrap();
    let requester = socks5::choose_exit(&current, Some(exit)).unwrap();
    let client = MixClient::start(
        ClientConfig {
            topology,
            ..ClientConfig::default()
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(socks5::serve(listener, client, requester, stop.clone()));
    (addr, stop)
}

struct Fetched {
    code: Option<i32>,
    body: Vec<u8>,
    stderr: String,
    took: Duration,
}

/// `curl --socks5-hostname`, bounded so that a hang shows as curl's own timeout (code 28).
async fn curl(proxy: SocketAddr, url: &str) -> Fetched {
    let started = Instant::now();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "180", "--socks5-hostname"])
        .arg(proxy.to_string())
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl is installed (scripts/install-test-deps.sh)");
    Fetched {
        code: out.status.code(),
        body: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn report(what: &str, f: &Fetched) {
    let kib = f.body.len() as f64 / 1024.0;
    println!(
        "{what}: {:.0} KiB in {:.2} s = {:.1} KiB/s (curl exit {:?})",
        kib,
        f.took.as_secs_f64(),
        kib / f.took.as_secs_f64(),
        f.code
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_file_through_the_exit_and_the_bytes_match() {
    let body = random_body(300 * 1024);
    let server = http_server(vec![body.clone()]).await;
    let net = network(server, no_hooks).await;
    let (proxy, stop) = proxy(&net, "exit").await;

    let got = curl(proxy, &format!("http://{server}/file/0")).await;
    report("fetch", &got);
    assert_eq!(got.code, Some(0), "curl failed: {}", got.stderr);
    assert_eq!(got.body.len(), body.len());
    assert!(got.body == body, "the bytes differ");

    let m = &net.node("exit").metrics;
    assert_eq!(m.exit_streams_opened.get(), 1);
    assert!(m.exit_bytes_from_target.get() >= body.len() as u64);
    assert!(m.exit_first_byte.get_sample_count() == 1);
    stop.cancel();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_the_policy_forbids_get_a_socks5_failure_reply_not_a_hang() {
    let server = http_server(vec![b"secret".to_vec()]).await;
    let net = network(server, no_hooks).await;

    // The default policy: loopback (v4 and v6), private and metadata addresses are refused,
    // the test server among them.
    let (default_proxy, stop_default) = proxy(&net, "exit-default").await;
    for url in [
        format!("http://{server}/file/0"),
        format!("http://[::1]:{}/file/0", server.port()),
        "http://10.0.0.1/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let got = curl(default_proxy, &url).await;
        println!("refused {url} in {:.2} s", got.took.as_secs_f64());
        // 97: the proxy answered the CONNECT with a failure reply.
        assert_eq!(got.code, Some(97), "{url}: {}", got.stderr);
        assert!(got.body.is_empty(), "{url}: bytes leaked through");
    }
    let m = &net.node("exit-default").metrics;
    assert_eq!(m.exit_refused_count("internal_address"), 4);
    assert_eq!(m.exit_streams_opened.get(), 0);

    // The named exit allows the server's port only: another loopback port stays refused.
    let (proxy, stop) = proxy(&net, "exit").await;
    let got = curl(proxy, &format!("http://127.0.0.1:{}/", server.port() ^ 1)).await;
    assert_eq!(got.code, Some(97), "{}", got.stderr);
    let got = curl(proxy, &format!("http://{server}/file/0")).await;
    assert_eq!(got.code, Some(0), "{}", got.stderr);
    assert_eq!(got.body, b"secret");
    stop.cancel();
    stop_default.cancel();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_everything_still_refuses_the_exits_own_addresses_and_translated_internal_ones() {
    let server = http_server(vec![b"secret".to_vec()]).await;
    let mut net = network(server, no_hooks).await;
    // The directory publishes a public-looking address for the exit (its HTTP API behind a
    // load balancer, say): the exit's own, so `accept *:*` must not reach it.
    net.member_mut("exit").entry.http_address = Some("203.0.113.7:8080".parse().unwrap());
    net.write_topology(2);
    let exit = net.node("exit").topology.clone();
    assert!(
        eventually(Duration::from_secs(10), || exit
            .current()
            .is_some_and(|t| t.revision() == 2))
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (proxy, stop) = proxy(&net, "exit").await;
    let m = &net.node("exit").metrics;
    let mut urls = vec![
        "http://203.0.113.7/".to_string(),
        // NAT64 and 6to4 forms of 10.0.0.5, and the IPv4-compatible form of loopback.
        "http://[64:ff9b::a00:5]/".to_string(),
        "http://[2002:a00:5::1]/".to_string(),
        format!("http://[::7f00:1]:{}/file/0", server.port()),
    ];
    // Every address of this host's interfaces (loopback among them).
    for ip in nym_node::exit::own_addresses::interface_addresses() {
        if let std::net::IpAddr::V4(v4) = ip {
            urls.push(format!("http://{v4}:{}/file/0", server.port() ^ 1));
        }
    }
    for url in &urls {
        let got = curl(proxy, url).await;
        assert_eq!(got.code, Some(97), "{url}: {}", got.stderr);
        assert!(got.body.is_empty(), "{url}: bytes leaked through");
    }
    assert_eq!(m.exit_refused_count("internal_address"), urls.len() as u64);
    assert_eq!(m.exit_streams_opened.get(), 0);
    stop.cancel();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_ten_percent_loss_between_mixes() {
    let body = random_body(200 * 1024);
    let server = http_server(vec![body.clone()]).await;
    let lossy = |name: &str| TestHooks {
        lose_every: name.starts_with("mix-").then_some(10),
        ..TestHooks::default()
    };
    let net = network(server, lossy).await;
    let (proxy, stop) = proxy(&net, "exit").await;

    let got = curl(proxy, &format!("http://{server}/file/0")).await;
    report("fetch with 10% loss at every mix", &got);
    assert_eq!(got.code, Some(0), "curl failed: {}", got.stderr);
    assert!(got.body == body, "the bytes differ");
    stop.cancel();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_never_mix_and_a_server_close_reaches_curl() {
    let a = random_body(150 * 1024);
    let b = vec![b'b'; 150 * 1024];
    let c = random_body(20 * 1024);
    let server = http_server(vec![a.clone(), b.clone(), c.clone()]).await;
    let net = network(server, no_hooks).await;
    let (proxy, stop) = proxy(&net, "exit").await;

    let (url_a, url_b) = (
        format!("http://{server}/file/0"),
        format!("http://{server}/file/1"),
    );
    let (ga, gb) = tokio::join!(curl(proxy, &url_a), curl(proxy, &url_b));
    assert_eq!(ga.code, Some(0), "{}", ga.stderr);
    assert_eq!(gb.code, Some(0), "{}", gb.stderr);
    assert!(ga.body == a, "stream A's bytes differ");
    assert!(gb.body == b, "stream B's bytes differ");

    // No length: curl knows the response is over only when the server's close reaches it.
    let gc = curl(proxy, &format!("http://{server}/close/2")).await;
    assert_eq!(gc.code, Some(0), "{}", gc.stderr);
    assert!(gc.body == c, "the bytes differ");
    stop.cancel();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_stream_cap_is_refused_and_others_are_not() {
    let server = http_server(vec![b"ok".to_vec()]).await;
    let net = network_with(server, no_hooks, |c| c.exit_max_streams_per_client = 1).await;
    let (proxy_a, stop_a) = proxy(&net, "exit").await;

    // Client A's one stream stays open (the server never answers /hold).
    let hold = format!("http://{server}/hold/0");
    let held = tokio::spawn(async move { curl(proxy_a, &hold).await });
    let m = net.node("exit").metrics.clone();
    assert!(
        eventually(Duration::from_secs(60), || m.exit_streams_open.get() == 1).await,
        "the held stream never opened"
    );
    // A second stream of client A is over its cap: refused with a SOCKS5 failure.
    let got = curl(proxy_a, &format!("http://{server}/file/0")).await;
    assert_eq!(got.code, Some(97), "{}", got.stderr);
    assert_eq!(m.exit_refused_count("too_many_streams"), 1);
    // Another client is not held back by A's streams.
    let (proxy_b, stop_b) = proxy(&net, "exit").await;
    let got = curl(proxy_b, &format!("http://{server}/file/0")).await;
    assert_eq!(got.code, Some(0), "{}", got.stderr);
    assert_eq!(got.body, b"ok");
    held.abort();
    stop_a.cancel();
    stop_b.cancel();
    net.stop().await;
}
