//! The entry gateway: authenticated clients, a durable mailbox that survives SIGKILL,
//! acknowledgements and retransmission over a lossy mix, quotas, and SURB replies.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use nym_node::client::{ClientAddress, ClientConfig, Event, MixClient, connection};
use nym_node::gateway::channel;
use nym_node::gateway::protocol::{self, ClientMessage, ServerMessage};
use nym_node::keys::{Identity, random_bytes};
use nym_node::metrics::DropReason;
use nym_node::node::TestHooks;
use tokio_tungstenite::tungstenite::Message;

/// The registration stamp test gateways ask for (8 bits, see `common::base_config`).
fn stamp(gateway: &Member, client: &Identity) -> u64 {
    nym_node::gateway::stamp::make(&gateway.entry.identity_key, &client.public(), 8, 0)
}

const NODE: &str = env!("CARGO_BIN_EXE_nym-node");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_survives_sigkill_and_delivers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(40);
    let nodes = one_per_layer(dir.path(), base);
    let topology = common::prepare_from_keys(&nodes, dir.path());
    let mut children = Vec::new();
    for n in &nodes {
        children.push(nym_node::localnet::spawn_node(Path::new(NODE), n, &topology).unwrap());
    }
    nym_node::localnet::wait_ready(&nodes, Duration::from_secs(30))
        .await
        .unwrap();
    let gw = nym_node::keys::NodeKeys::load(&nodes[3].dir.join("keys"))
        .unwrap()
        .public()
        .identity_key;

    // The recipient exists but is offline.
    let recipient_secret = random_bytes().unwrap();
    let recipient = ClientAddress::of(&Identity::from_secret(recipient_secret), gw);
    let mut sender = MixClient::start(client_config(&topology, gw), Identity::generate().unwrap())
        .await
        .unwrap();
    for i in 0..100u32 {
        sender
            .send(recipient, format!("message {i}").into_bytes(), 0)
            .await
            .unwrap();
    }
    // Every message is acknowledged, i.e. stored durably by the gateway.
    assert_eq!(
        acknowledged(&mut sender, 100, Duration::from_secs(60)).await,
        100
    );
    sender.stop().await;

    // SIGKILL: no drain, no flush. Then the same gateway starts again.
    children[3].start_kill().unwrap();
    children[3].wait().await.unwrap();
    children[3] = nym_node::localnet::spawn_node(Path::new(NODE), &nodes[3], &topology).unwrap();
    nym_node::localnet::wait_ready(&nodes[3..], Duration::from_secs(30))
        .await
        .unwrap();

    let mut back = MixClient::start(
        client_config(&topology, gw),
        Identity::from_secret(recipient_secret),
    )
    .await
    .unwrap();
    let got = receive(&mut back, 100, Duration::from_secs(30)).await;
    // Anything beyond the 100 would be a duplicate: give it time to show up.
    let extra = receive(&mut back, 1, Duration::from_secs(2)).await;
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for b in got.iter().chain(extra.iter()) {
        *counts.entry(b.clone()).or_default() += 1;
    }
    println!(
        "delivered after SIGKILL: {} distinct, {} total",
        counts.len(),
        got.len() + extra.len()
    );
    assert_eq!(counts.len(), 100, "all 100 delivered");
    assert!(counts.values().all(|c| *c == 1), "each exactly once");
    // Once the client acknowledged them, nothing of the recipient's is left in the store
    // (checked in the store itself, after the gateway stops; late acks for the departed
    // sender may legitimately wait there for it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    back.stop().await;
    for c in children.iter_mut() {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let store = nym_node::gateway::mailbox::Mailbox::open(
        &nodes[3].dir.join("data").join("mailbox.redb"),
        1 << 30,
    )
    .unwrap();
    assert!(
        store
            .fetch_after(&recipient.identity, 0, 10)
            .unwrap()
            .is_empty(),
        "acknowledged payloads are deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_payloads_are_deleted_and_the_rest_redelivered() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let gw = net.member("gateway");
    let addr = gw.entry.client_address.clone().unwrap();
    let me = Identity::generate().unwrap();
    let my_address = ClientAddress::of(&me, gw.entry.identity_key);
    let mut sender = MixClient::start(
        client_config(&net.topology_path, gw.entry.identity_key),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    for i in 0..5u8 {
        sender.send(my_address, vec![i], 0).await.unwrap();
    }
    assert_eq!(
        acknowledged(&mut sender, 5, Duration::from_secs(30)).await,
        5
    );

    // A raw session: take the five, acknowledge three.
    let (mut tx, mut rx) = connection::connect(
        &addr,
        &gw.entry.noise_key,
        &me,
        stamp(gw, &me),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ServerMessage::Deliver { id, .. } => ids.push(id),
            other => panic!("unexpected {other:?}"),
        }
    }
    tx.send(&ClientMessage::Ack {
        ids: ids[..3].to_vec(),
    })
    .await
    .unwrap();
    let metrics = net.node("gateway").metrics.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            metrics.sample();
            metrics.mailbox_payloads.get() == 2
        })
        .await,
        "three deleted"
    );
    connection::close((tx, rx), Duration::from_secs(2)).await;

    // The next session gets exactly the two that were not acknowledged.
    let (_tx, mut rx) = connection::connect(
        &addr,
        &gw.entry.noise_key,
        &me,
        stamp(gw, &me),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut again = Vec::new();
    while let Ok(Ok(ServerMessage::Deliver { id, .. })) =
        tokio::time::timeout(Duration::from_millis(700), rx.recv()).await
    {
        again.push(id);
    }
    assert_eq!(again, ids[3..].to_vec());
    sender.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmission_recovers_every_message_through_a_lossy_mix() {
    let lossy = |name: &str| TestHooks {
        lose_every: name.starts_with("mix-2").then_some(10),
        ..TestHooks::default()
    };
    let net = Net::start(&three_layers(), |_, _| {}, lossy).await;
    let gw = net.member("gateway").entry.identity_key;
    const N: usize = 100;

    // Without acknowledgements some messages are lost for good: the test can fail.
    let mut plain = MixClient::start(
        ClientConfig {
            acks: false,
            ..client_config(&net.topology_path, gw)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let me = plain.address();
    for i in 0..N as u32 {
        plain.send(me, i.to_be_bytes().to_vec(), 0).await.unwrap();
    }
    let without = receive(&mut plain, N, Duration::from_secs(5)).await.len();
    plain.stop().await;

    let mut acked = MixClient::start(
        client_config(&net.topology_path, gw),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let me = acked.address();
    for i in 0..N as u32 {
        acked.send(me, i.to_be_bytes().to_vec(), 0).await.unwrap();
    }
    let got = receive(&mut acked, N, Duration::from_secs(60)).await;
    let extra = receive(&mut acked, 1, Duration::from_secs(2)).await;
    let retransmissions = acked
        .stats()
        .retransmissions
        .load(std::sync::atomic::Ordering::Relaxed);
    let duplicates = acked
        .stats()
        .duplicates_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "without acks: {without}/{N}; with acks: {}/{N}, retransmissions={retransmissions}, duplicates dropped={duplicates}",
        got.len()
    );
    assert!(
        without < N,
        "a lossy mix loses messages when nobody retransmits ({without}/{N})"
    );
    let distinct: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), N, "every message arrives");
    assert_eq!(
        got.len() + extra.len(),
        N,
        "exactly once: duplicates from retransmission are removed"
    );
    assert!(retransmissions > 0);
    acked.stop().await;
    net.stop().await;
}

/// Waits for the gateway to close `ws`; returns the close code.
async fn close_code(ws: &mut WsClient) -> Option<u16> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

type WsClient =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_binary(ws: &mut WsClient) -> Vec<u8> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return b.to_vec(),
            Some(Ok(_)) => continue,
            other => panic!("no binary message: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_make_way_for_a_client_that_authenticates() {
    let net = Net::start(
        &three_layers(),
        |_, c| {
            c.client_max_pending_sessions = 8;
            c.client_max_pending_per_address = 2;
        },
        no_hooks,
    )
    .await;
    let gw = net.member("gateway");
    let addr = gw.entry.client_address.clone().unwrap();
    let url = format!("ws://{addr}/v1/client");
    let m = net.node("gateway").metrics.clone();
    // Forty upgraded WebSockets that never start their handshake, from this address.
    let mut idle = Vec::new();
    for _ in 0..40 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await {
            idle.push(ws);
        }
    }
    assert_eq!(idle.len(), 40, "each newcomer got a place");
    let evicted = nym_node::metrics::RefusalReason::Evicted;
    assert!(
        eventually(Duration::from_secs(10), || m
            .client_connection_refused_count(evicted)
            == 32)
        .await,
        "evicted {}",
        m.client_connection_refused_count(evicted)
    );
    // A client from the same address authenticates and gets its messages while they sit.
    let mut client = MixClient::start(
        client_config(&net.topology_path, gw.entry.identity_key),
        Identity::generate().unwrap(),
    )
    .await
    .expect("a client gets in during the flood");
    let me = client.address();
    client.send(me, b"through".to_vec(), 0).await.unwrap();
    assert_eq!(
        receive(&mut client, 1, Duration::from_secs(30)).await,
        vec![b"through".to_vec()]
    );
    client.stop().await;
    drop(idle);
    net.stop().await;
}

/// A connection that sends an HTTP request line, then a header line every 300 ms, never
/// ending its request. Returns when the gateway closed it.
async fn trickle_request(addr: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
        return;
    };
    if stream
        .write_all(b"GET /v1/client HTTP/1.1\r\nHost: gw\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
            _ = tick.tick() => {
                if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_http_requests_make_way_and_are_closed_at_the_deadline() {
    let net = Net::start(
        &three_layers(),
        |_, c| c.client_max_pending_sessions = 8,
        no_hooks,
    )
    .await;
    let gw = net.member("gateway");
    let addr = gw.entry.client_address.clone().unwrap().to_string();
    let m = net.node("gateway").metrics.clone();
    let evicted = nym_node::metrics::RefusalReason::Evicted;
    // Forty requests trickled header by header, never finished: they hold places from
    // accept on, so each newcomer closes the oldest.
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    for _ in 0..40 {
        let (addr, closed) = (addr.clone(), closed.clone());
        tokio::spawn(async move {
            trickle_request(addr).await;
            closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    assert!(
        eventually(Duration::from_secs(10), || m
            .client_connection_refused_count(evicted)
            >= 32)
        .await,
        "the trickled requests held places outside the admission ({} evicted)",
        m.client_connection_refused_count(evicted)
    );
    // A client gets in and is served while they trickle.
    let mut client = MixClient::start(
        client_config(&net.topology_path, gw.entry.identity_key),
        Identity::generate().unwrap(),
    )
    .await
    .expect("a client gets in during the trickle");
    let me = client.address();
    client.send(me, b"through".to_vec(), 0).await.unwrap();
    assert_eq!(
        receive(&mut client, 1, Duration::from_secs(30)).await,
        vec![b"through".to_vec()]
    );
    // Those that kept their places are closed at the HTTP-stage deadline.
    assert!(
        eventually(Duration::from_secs(15), || closed
            .load(std::sync::atomic::Ordering::SeqCst)
            == 40)
        .await,
        "{} of 40 trickled requests closed",
        closed.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(started.elapsed() >= nym_node::gateway::client_listener::HTTP_STAGE_TIMEOUT);
    client.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_bad_signature_is_refused() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let gw = net.member("gateway");
    let url = format!(
        "ws://{}/v1/client",
        gw.entry.client_address.clone().unwrap()
    );
    // A genuine channel, but the identity is signed for by someone else.
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let (init, first) = channel::Initiator::start(&gw.entry.noise_key).unwrap();
    ws.send(Message::Binary(first.into())).await.unwrap();
    let channel = init.finish(&next_binary(&mut ws).await).unwrap();
    let me = Identity::generate().unwrap();
    let mallory = Identity::generate().unwrap();
    let signature = mallory.sign(&channel.auth_message());
    let (mut tx, _) = channel.split();
    let auth = ClientMessage::Auth {
        identity: me.public(),
        signature,
        stamp: stamp(gw, &me),
        downstream: nym_node::gateway::protocol::Rate::UNPACED,
    };
    ws.send(Message::Binary(tx.seal(&auth.encode()).unwrap().into()))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut ws).await,
        Some(protocol::close::AUTH_FAILED)
    );
    assert_eq!(net.node("gateway").metrics.client_messages_refused.get(), 1);
    assert_eq!(net.node("gateway").metrics.clients_connected.get(), 0);

    // Garbage after a good handshake gets the protocol close code.
    let (mut tx, mut rx) = connection::connect(
        &gw.entry.client_address.clone().unwrap(),
        &gw.entry.noise_key,
        &me,
        stamp(gw, &me),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    tx.send_raw(vec![0x7f, 1, 2, 3]).await.unwrap();
    match rx.recv().await {
        Err(connection::ConnectionError::Closed { code, .. }) => {
            assert_eq!(code, protocol::close::PROTOCOL)
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(net.node("gateway").metrics.client_messages_refused.get(), 2);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_take_over_a_session_and_a_fake_gateway_is_refused() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let gw = net.member("gateway");
    let gateway_url = format!(
        "ws://{}/v1/client",
        gw.entry.client_address.clone().unwrap()
    );

    // A relay on the path: it forwards every message between the client and the real
    // gateway, and keeps what the client sent.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr: nym_node::topology::PeerAddress =
        relay.local_addr().unwrap().to_string().parse().unwrap();
    let captured = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<Vec<u8>>::new()));
    let seen = captured.clone();
    let upstream = gateway_url.clone();
    tokio::spawn(async move {
        let (tcp, _) = relay.accept().await.unwrap();
        let client = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let (gateway, _) = tokio_tungstenite::connect_async(upstream.as_str())
            .await
            .unwrap();
        let (mut c_tx, mut c_rx) = client.split();
        let (mut g_tx, mut g_rx) = gateway.split();
        let up = async {
            while let Some(Ok(m)) = c_rx.next().await {
                if let Message::Binary(b) = &m {
                    seen.lock().push(b.to_vec());
                }
                if g_tx.send(m).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            while let Some(Ok(m)) = g_rx.next().await {
                if c_tx.send(m).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(up, down);
    });
    let me = Identity::generate().unwrap();
    let (mut tx, mut rx) = connection::connect(
        &relay_addr,
        &gw.entry.noise_key,
        &me,
        stamp(gw, &me),
        Duration::from_secs(5),
    )
    .await
    .expect("a transparent relay does not stop the real gateway's handshake");
    let frames = captured.lock().clone();
    assert_eq!(frames.len(), 2, "handshake message and the sealed Auth");
    assert_eq!(frames[1].len(), channel::FRAME_LEN);
    assert_eq!(net.node("gateway").metrics.clients_connected.get(), 1);

    // The relay replays the client's handshake message and its Auth frame in a session of
    // its own: the gateway answers with fresh keys, so the Auth frame does not even open.
    let (mut ws, _) = tokio_tungstenite::connect_async(gateway_url.as_str())
        .await
        .unwrap();
    ws.send(Message::Binary(frames[0].clone().into()))
        .await
        .unwrap();
    let _answer = next_binary(&mut ws).await;
    ws.send(Message::Binary(frames[1].clone().into()))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut ws).await,
        Some(protocol::close::AUTH_FAILED)
    );
    // The client's own session was not replaced and still works both ways.
    assert_eq!(net.node("gateway").metrics.clients_connected.get(), 1);
    tx.send(&ClientMessage::Ack { ids: vec![1] }).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "session still open (nothing to deliver)"
    );

    // A fake gateway at the right address but without the topology's key is refused.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr: nym_node::topology::PeerAddress =
        fake.local_addr().unwrap().to_string().parse().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = fake.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _first = ws.next().await;
        // Its best answer: a handshake of its own key.
        let own = nym_node::keys::X25519::generate().unwrap();
        let (_, own_first) = channel::Initiator::start(&own.public()).unwrap();
        let (_, answer) = channel::respond(&own.secret_bytes(), &own_first).unwrap();
        let _ = ws.send(Message::Binary(answer.into())).await;
        let _ = ws.next().await;
    });
    match connection::connect(
        &fake_addr,
        &gw.entry.noise_key,
        &me,
        stamp(gw, &me),
        Duration::from_secs(5),
    )
    .await
    {
        Err(connection::ConnectionError::WrongGateway(..)) => {}
        Err(e) => panic!("refused, but for another reason: {e}"),
        Ok(_) => panic!("a gateway without the topology's key was accepted"),
    }
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_quota_gets_drops_and_others_are_unaffected() {
    // Room for about four payloads per client.
    let net = Net::start(
        &three_layers(),
        |_, c| c.mailbox_quota_bytes = 4 * 2100,
        no_hooks,
    )
    .await;
    let gw = net.member("gateway").entry.identity_key;
    let (full, fine) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let full_addr = ClientAddress::of(&full, gw);
    let fine_addr = ClientAddress::of(&fine, gw);
    let sender = MixClient::start(
        ClientConfig {
            // No acks: their SURB-ACKs would land in the sender's own mailbox on this gateway
            // and blur the count of what the recipients' mailboxes hold.
            acks: false,
            ..client_config(&net.topology_path, gw)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    for i in 0..10u8 {
        sender.send(full_addr, vec![i; 1500], 0).await.unwrap();
    }
    for i in 0..3u8 {
        sender.send(fine_addr, vec![i; 1500], 0).await.unwrap();
    }
    let m = net.node("gateway").metrics.clone();
    // Every payload is either stored or dropped and counted.
    assert!(
        eventually(Duration::from_secs(20), || {
            m.sample();
            m.drop_count(DropReason::MailboxFull) + m.mailbox_payloads.get() as u64 == 13
        })
        .await,
        "stored {} + dropped {} != 13",
        m.mailbox_payloads.get(),
        m.drop_count(DropReason::MailboxFull)
    );
    let dropped = m.drop_count(DropReason::MailboxFull);
    assert!(
        dropped >= 4,
        "payloads beyond the quota are dropped and counted ({dropped})"
    );
    let mut fine_client = MixClient::start(client_config(&net.topology_path, gw), fine)
        .await
        .unwrap();
    assert_eq!(
        receive(&mut fine_client, 3, Duration::from_secs(20))
            .await
            .len(),
        3,
        "another client is unaffected"
    );
    let mut full_client = MixClient::start(client_config(&net.topology_path, gw), full)
        .await
        .unwrap();
    let got = receive(&mut full_client, 10, Duration::from_secs(3)).await;
    assert_eq!(
        got.len() as u64,
        10 - dropped,
        "the client over quota gets what fitted, nothing more"
    );
    sender.stop().await;
    fine_client.stop().await;
    full_client.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_through_a_surb_reaches_the_original_sender() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let gw = net.member("gateway").entry.identity_key;
    let mut alice = MixClient::start(
        client_config(&net.topology_path, gw),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let mut bob = MixClient::start(
        client_config(&net.topology_path, gw),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    alice
        .send(bob.address(), b"who am I talking to?".to_vec(), 2)
        .await
        .unwrap();
    let tag = loop {
        match tokio::time::timeout(Duration::from_secs(20), bob.next_event())
            .await
            .unwrap()
        {
            Some(Event::Received {
                body, sender_tag, ..
            }) => {
                assert_eq!(body, b"who am I talking to?");
                break sender_tag.expect("a message with SURBs carries its sender's tag");
            }
            Some(_) => {}
            None => panic!("bob stopped"),
        }
    };
    // Bob answers three times without knowing Alice's address. Alice attached two SURBs:
    // the first reply leaves one, which carries Bob's request for more; Alice's client
    // answers it with a top-up, and the later replies travel in those.
    for i in 0..3 {
        let answer = format!("an anonymous friend, #{i}").into_bytes();
        bob.reply(tag, answer.clone()).await.unwrap();
        let got = receive(&mut alice, 1, Duration::from_secs(30)).await;
        assert_eq!(got, vec![answer]);
    }
    // A tag nobody gave SURBs under cannot be answered.
    assert!(matches!(
        bob.reply([0; 16], b"?".to_vec()).await,
        Err(nym_node::client::ClientError::NoReplySurbs)
    ));
    alice.stop().await;
    bob.stop().await;
    net.stop().await;
}

/// The mailbox of a stopped in-process gateway, once its last task let go of the file
/// (drop every clone of its metrics first: their sampler reads the store).
async fn open_stopped_mailbox(path: &Path) -> nym_node::gateway::mailbox::Mailbox {
    for _ in 0..100 {
        if let Ok(m) = nym_node::gateway::mailbox::Mailbox::open(path, 1 << 30) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the stopped gateway still holds {}", path.display());
}

/// Payloads stored and acks sent by the gateway while `phase` runs, once both settled.
/// `phase` gives back how many acks at least it expects, so a slow straggler under a busy
/// machine is waited for (for up to 30 s) rather than mistaken for a loss.
async fn gateway_counts<T>(
    net: &Net,
    phase: impl std::future::Future<Output = (T, u64)>,
) -> (T, u64, u64) {
    let m = net.node("gateway").metrics.clone();
    let (d0, a0) = (m.packets_delivered.get(), m.acks_sent.get());
    let (out, expected) = phase.await;
    // Let everything in flight land: the expected acks are in and the counters stop
    // moving (for a second).
    let mut last = (0, 0);
    let mut still = 0;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = (m.packets_delivered.get() - d0, m.acks_sent.get() - a0);
        still = if now == last { still + 1 } else { 0 };
        if still >= 4 && now.1 >= expected {
            break;
        }
        last = now;
    }
    (out, last.0, last.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cover_and_messages_look_the_same_at_the_gateway() {
    const N: u64 = 1000;
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let gw = net.member("gateway").entry.identity_key;

    // 1,000 loop cover packets and (nearly) nothing else.
    let looping = MixClient::start(
        ClientConfig {
            cover_rate: 1.0,
            loop_rate: 200.0,
            ..client_config(&net.topology_path, gw)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let ((), cover_stored, cover_acks) = gateway_counts(&net, async {
        while looping
            .stats()
            .loops_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            < N
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        looping.stop().await;
        ((), N)
    })
    .await;

    // 1,000 one-packet messages to an offline client of the same gateway, at the same
    // pace (idle slots carry drop cover, and a few loops go out, which count the same way).
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, gw);
    let mut sender = MixClient::start(
        ClientConfig {
            cover_rate: 200.0,
            loop_rate: 1.0,
            ..client_config(&net.topology_path, gw)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let (packets, real_stored, real_acks) = gateway_counts(&net, async {
        for i in 0..N {
            sender.send(to, i.to_be_bytes().to_vec(), 0).await.unwrap();
        }
        let acked = acknowledged(&mut sender, N as usize, Duration::from_secs(60)).await;
        let st = sender.stats();
        assert_eq!(
            acked,
            N as usize,
            "sent {} retransmitted {} acks {}",
            st.packets_sent.load(std::sync::atomic::Ordering::Relaxed),
            st.retransmissions
                .load(std::sync::atomic::Ordering::Relaxed),
            st.acks_received.load(std::sync::atomic::Ordering::Relaxed)
        );
        // Stopped here, so no loop of its own is still on its way when counting ends;
        // counted after the stop, which may still send what was queued.
        let stats = sender.stats_handle();
        sender.stop().await;
        // Drop cover in the idle slots ends at the gateway, discarded and unacknowledged.
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let packets = stats.packets_sent.load(relaxed) - stats.drop_cover_sent.load(relaxed);
        ((packets, stats.drop_cover_sent.load(relaxed)), packets)
    })
    .await;
    let (packets, drops) = packets;
    let discarded = net.node("gateway").metrics.drop_cover_received.get();
    assert!(drops > 0, "idle slots carried drop cover");
    assert!(
        discarded >= drops,
        "every drop cover ended at the gateway, discarded ({discarded} of {drops})"
    );

    // Both kinds: every packet stored, acknowledged once, and its ack stored for its sender.
    println!(
        "cover: stored {cover_stored} acks {cover_acks}; messages ({packets} packets): stored {real_stored} acks {real_acks}"
    );
    assert!(cover_acks >= N, "every loop acknowledged ({cover_acks})");
    assert_eq!(
        cover_stored,
        2 * cover_acks,
        "a loop and its ack, each stored once"
    );
    assert_eq!(
        real_acks, packets,
        "one ack per packet (messages and the loops between them)"
    );
    assert_eq!(
        real_stored,
        2 * real_acks,
        "a message and its ack, each stored once"
    );

    // What the gateway holds for the offline recipient: sealed fragments, all one size,
    // the size a loop's sealed fragment has too (read from the store once the node stopped).
    let mut net = net;
    let dir = std::mem::replace(&mut net.dir, tempfile::tempdir().unwrap());
    net.stop().await;
    let store = open_stopped_mailbox(&dir.path().join("gateway").join("mailbox.redb")).await;
    let stored = store.fetch_after(&to.identity, 0, 2 * N as usize).unwrap();
    // Every message, and any copy a late ack made the sender retransmit (the recipient drops
    // duplicates when it reassembles).
    assert!(stored.len() as u64 >= N, "{} stored", stored.len());
    let sizes: std::collections::BTreeSet<usize> = stored.iter().map(|s| s.body.len()).collect();
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        vec![nym_node::message::Envelope::fragment_capacity(
            nym_node::client::SURB_ACK_SIZE
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_dropped_in_the_network_are_reported_missing() {
    use std::sync::atomic::Ordering::Relaxed;
    async fn run(net: &Net) -> (u64, u64, u64) {
        let gw = net.member("gateway").entry.identity_key;
        let c = MixClient::start(
            ClientConfig {
                cover_rate: 1.0,
                loop_rate: 50.0,
                // Generous, so a busy test machine does not make a healthy loop late.
                ack_slack: Duration::from_secs(3),
                ..client_config(&net.topology_path, gw)
            },
            Identity::generate().unwrap(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let s = c.stats();
        let counts = (
            s.loops_sent.load(Relaxed),
            s.loops_returned.load(Relaxed),
            s.loops_missing.load(Relaxed),
        );
        c.stop().await;
        counts
    }
    let healthy = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let (sent, returned, missing) = run(&healthy).await;
    println!("healthy: loops sent {sent} returned {returned} missing {missing}");
    assert!(sent >= 100, "about 50 loops a second ({sent})");
    assert!(
        returned >= sent / 2,
        "loops come back ({returned} of {sent})"
    );
    assert!(
        missing <= (returned + missing) / 20,
        "a healthy network loses none ({missing} missing, {returned} back)"
    );
    healthy.stop().await;

    // Layer 2 loses every second packet: about half the loops never come back.
    let lossy = |name: &str| TestHooks {
        lose_every: name.starts_with("mix-2").then_some(2),
        ..TestHooks::default()
    };
    let broken = Net::start(&three_layers(), |_, _| {}, lossy).await;
    let (sent, returned, missing) = run(&broken).await;
    println!("lossy: loops sent {sent} returned {returned} missing {missing}");
    // Of the loops whose time is up, about half are missing.
    assert!(
        missing >= (returned + missing) / 4 && missing > 20,
        "lost loops are reported missing ({missing} missing, {returned} back, {sent} sent)"
    );
    assert!(returned > 0);
    broken.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_is_limited_and_a_draining_gateway_takes_no_new_packets() {
    let net = Net::start(
        &three_layers(),
        |name, c| {
            if name == "gateway" {
                c.client_rate = 10;
                c.client_burst = 10;
            }
        },
        no_hooks,
    )
    .await;
    let gw = net.member("gateway");
    let addr = gw.entry.client_address.clone().unwrap();
    let me = Identity::generate().unwrap();
    let to = ClientAddress::of(&me, gw.entry.identity_key);
    let hops: Vec<_> = ["mix-1a", "mix-2a", "mix-3a", "gateway"]
        .iter()
        .map(|n| net.member(n).hop())
        .collect();
    let (mut tx, _rx) = connection::connect(
        &addr,
        &gw.entry.noise_key,
        &me,
        stamp(gw, &me),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let m = net.node("gateway").metrics.clone();
    // A client packet as the client would send it: for the gateway's own client, through every layer.
    let send = |fragment: Vec<u8>| {
        let envelope = nym_node::message::Envelope::Data {
            ack: None,
            fragment,
        }
        .encode()
        .unwrap();
        let (first_hop, packet) = nym_node::client::packet::build_forward(
            &hops,
            &to.identity,
            &envelope,
            &[Duration::ZERO; 4],
        )
        .unwrap();
        ClientMessage::Send { first_hop, packet }
    };
    for i in 0..50u32 {
        tx.send(&send(i.to_be_bytes().to_vec())).await.unwrap();
    }
    // Every packet was either taken (and forwarded to its first hop) or dropped for the rate.
    assert!(
        eventually(Duration::from_secs(10), || m
            .drop_count(DropReason::RateLimited)
            + m.packets_forwarded.get()
            == 50)
        .await,
        "limited {} + forwarded {} != 50",
        m.drop_count(DropReason::RateLimited),
        m.packets_forwarded.get()
    );
    assert!(
        m.drop_count(DropReason::RateLimited) >= 35,
        "beyond the burst, packets are dropped ({})",
        m.drop_count(DropReason::RateLimited)
    );

    // Draining: the session stays, but client packets are no longer taken.
    net.node("gateway").shutdown.start_drain();
    let before = m.drop_count(DropReason::Shutdown);
    tokio::time::sleep(Duration::from_secs(1)).await; // let the bucket refill
    tx.send(&send(b"late".to_vec())).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || m
            .drop_count(DropReason::Shutdown)
            == before + 1)
        .await,
        "a draining gateway drops client packets, counted as shutdown"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_destinations_cannot_fill_the_mailbox() {
    const FLOOD: u32 = 10_000;
    let mut spec = three_layers();
    spec.push(("peer", Role::Peer));
    let net = Net::start(
        &spec,
        |name, c| {
            if name == "gateway" {
                c.mailbox_unregistered_bytes = 300_000;
                c.mailbox_max_bytes = 600_000;
                c.mailbox_present_reserve_percent = nym_node::config::Percent(20);
            }
        },
        no_hooks,
    )
    .await;
    let gw = net.member("gateway").entry.identity_key;
    // A registered client (it has a session) talks to itself throughout.
    let mut mine = MixClient::start(
        client_config(&net.topology_path, gw),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let me = mine.address();

    // 10,000 final-hop packets for made-up clients, straight into the gateway from a peer.
    let envelope = nym_node::message::Envelope::Data {
        ack: None,
        fragment: vec![0xab; 1600],
    }
    .encode()
    .unwrap();
    let mut link = net.link("peer", "gateway").await;
    let m = net.node("gateway").metrics.clone();
    for chunk in 0..FLOOD / 100 {
        for i in 0..100u32 {
            let mut nobody = [0u8; 32];
            nobody[..4].copy_from_slice(&(chunk * 100 + i).to_be_bytes());
            nobody[31] = 0x5a;
            let packet = net.packet(
                &["gateway"],
                nym_node::keys::KeyBytes(nobody),
                &envelope,
                &[Duration::ZERO],
            );
            link.send_packet(&packet).await.unwrap();
        }
        if chunk % 10 == 0 {
            mine.send(me, format!("still here {chunk}").into_bytes(), 0)
                .await
                .unwrap();
        }
        // Stay within the link's intake share: this test is about the mailbox, not shedding.
        let landed = (chunk as u64 + 1) * 100 - 100;
        assert!(
            eventually(Duration::from_secs(20), || m.packets_delivered.get()
                + m.drop_count(DropReason::MailboxFull)
                >= landed)
            .await,
            "the gateway stopped taking the flood in ({} dropped for overload)",
            m.drop_count(DropReason::Overload)
        );
    }
    let got = receive(&mut mine, 10, Duration::from_secs(20)).await;
    assert_eq!(
        got.len(),
        10,
        "the registered client's messages were stored and delivered"
    );
    assert!(
        eventually(Duration::from_secs(10), || m
            .drop_count(DropReason::MailboxFull)
            >= 9_000)
        .await,
        "the flood reached the mailbox and was refused ({} refused)",
        m.drop_count(DropReason::MailboxFull)
    );
    mine.stop().await;
    // The metrics' scrape-time sampler holds the store open; let go of both.
    drop((link, m));
    let mut net = net;
    let dir = std::mem::replace(&mut net.dir, tempfile::tempdir().unwrap());
    net.stop().await;
    let store = open_stopped_mailbox(&dir.path().join("gateway").join("mailbox.redb")).await;
    let (total, unregistered) = store.totals().unwrap();
    println!(
        "after {FLOOD} made-up destinations: {total} bytes stored, {unregistered} for unregistered clients"
    );
    assert!(unregistered <= 300_000 && total <= 600_000);
    assert!(
        unregistered > 250_000,
        "the budget was used, not bypassed ({unregistered})"
    );
}

/// Opens and closes a session for a made-up identity, registering it with a stamp.
async fn register_made_up(gw: &Member, addr: &nym_node::topology::PeerAddress) -> Identity {
    let id = Identity::generate().unwrap();
    let session = connection::connect(
        addr,
        &gw.entry.noise_key,
        &id,
        stamp(gw, &id),
        Duration::from_secs(20),
    )
    .await
    .expect("a stamped registration is accepted");
    connection::close(session, Duration::from_secs(2)).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_registrations_cannot_shut_out_an_active_client() {
    const REGISTRATIONS: usize = 1_000;
    const _: () = assert!(REGISTRATIONS.is_multiple_of(8));
    const ABSENT_CAP: u64 = 1_000_000 - 300_000;
    let mut spec = three_layers();
    spec.push(("peer", Role::Peer));
    let net = Net::start(
        &spec,
        |name, c| {
            if name == "gateway" {
                c.mailbox_quota_bytes = 100_000;
                c.mailbox_max_bytes = 1_000_000;
                c.mailbox_present_reserve_percent = nym_node::config::Percent(30);
                c.mailbox_unregistered_bytes = 100_000;
            }
        },
        no_hooks,
    )
    .await;
    let gw = net.member("gateway");
    let addr = gw.entry.client_address.clone().unwrap();
    let m = net.node("gateway").metrics.clone();

    // The active client starts without a stamp: the gateway asks, it pays and comes back.
    let mut mine = MixClient::start(
        client_config(&net.topology_path, gw.entry.identity_key),
        Identity::generate().unwrap(),
    )
    .await
    .expect("a client pays its stamp and registers");
    assert_eq!(m.registration_count("stamp_required"), 1);
    let me = mine.address();

    // Without a stamp, a new identity is told the price and closed.
    for _ in 0..20 {
        let id = Identity::generate().unwrap();
        match connection::connect(&addr, &gw.entry.noise_key, &id, 0, Duration::from_secs(5)).await
        {
            Err(connection::ConnectionError::StampRequired { bits }) => assert_eq!(bits, 8),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("registered without a stamp"),
        }
    }
    assert_eq!(m.registration_count("stamp_required"), 21);

    // 1,000 made-up identities register (each pays a cheap stamp) and go dormant, eight at
    // a time (what one address may have past its first handshake message).
    let started = std::time::Instant::now();
    let mut dormant = Vec::new();
    for _ in 0..REGISTRATIONS / 8 {
        let batch = (0..8).map(|_| register_made_up(gw, &addr));
        dormant.extend(futures_util::future::join_all(batch).await);
    }
    println!(
        "{REGISTRATIONS} registrations in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    m.sample();
    assert_eq!(m.registration_count("registered"), REGISTRATIONS as u64 + 1);
    assert_eq!(m.registered_clients.get(), REGISTRATIONS as i64 + 1);

    // Then they are sent what their quotas take: two payloads each, straight from a peer.
    let envelope = nym_node::message::Envelope::Data {
        ack: None,
        fragment: vec![0xcd; 1600],
    }
    .encode()
    .unwrap();
    let mut link = net.link("peer", "gateway").await;
    let mut sent = 0u64;
    for round in 0..2 {
        for chunk in dormant.chunks(100) {
            for id in chunk {
                let packet = net.packet(&["gateway"], id.public(), &envelope, &[Duration::ZERO]);
                link.send_packet(&packet).await.unwrap();
            }
            sent += chunk.len() as u64;
            let landed = sent - chunk.len() as u64;
            assert!(
                eventually(Duration::from_secs(20), || m.packets_delivered.get()
                    + m.drop_count(DropReason::MailboxFull)
                    >= landed)
                .await,
                "round {round}: the gateway stopped taking the flood in"
            );
        }
    }
    let refused_flood = m.drop_count(DropReason::MailboxFull);
    assert!(
        refused_flood > 1_000,
        "dormant clients were stopped below the cap ({refused_flood} refused)"
    );

    // A registered client comes online, takes what it is sent and never acknowledges it:
    // it is held no more than its share of the reserve, and takes none of it away on leaving.
    let hog = &dormant[1];
    let hog_session =
        connection::connect(&addr, &gw.entry.noise_key, hog, 0, Duration::from_secs(5))
            .await
            .expect("a registered client needs no stamp");
    let (before, refused_before) = (
        m.packets_delivered.get(),
        m.drop_count(DropReason::MailboxFull),
    );
    for _ in 0..300 {
        let packet = net.packet(&["gateway"], hog.public(), &envelope, &[Duration::ZERO]);
        link.send_packet(&packet).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || m.packets_delivered.get()
            + m.drop_count(DropReason::MailboxFull)
            >= before + refused_before + 300)
        .await,
        "the gateway stopped taking payloads in"
    );
    let hog_held = m.packets_delivered.get() - before;
    println!("a client online that never acknowledges was held {hog_held} of 300 payloads");
    assert!(
        hog_held > 0 && hog_held <= 150_000 / 1624 + 1,
        "held beyond its half of the reserve ({hog_held})"
    );

    // The active client still stores and fetches, with the dormant ones at their cap.
    for i in 0..10 {
        mine.send(me, format!("still here {i}").into_bytes(), 0)
            .await
            .unwrap();
    }
    let got = receive(&mut mine, 10, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 10, "the active client was shut out");

    // Nothing stored was given up: a dormant client coming back gets what was kept for it.
    let first = &dormant[0];
    let (_tx, mut rx) =
        connection::connect(&addr, &gw.entry.noise_key, first, 0, Duration::from_secs(5))
            .await
            .expect("a registered client needs no stamp");
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Ok(ServerMessage::Deliver { body, .. })) => assert_eq!(body.len(), 1600),
        other => panic!("the dormant client's payload is gone: {other:?}"),
    }
    connection::close(hog_session, Duration::from_secs(2)).await;
    mine.stop().await;
    drop((link, m, rx));
    let mut net = net;
    let dir = std::mem::replace(&mut net.dir, tempfile::tempdir().unwrap());
    net.stop().await;
    let store = open_stopped_mailbox(&dir.path().join("gateway").join("mailbox.redb")).await;
    let (total, _) = store.totals().unwrap();
    println!(
        "after {REGISTRATIONS} dormant registrations were flooded: {total} bytes stored, {refused_flood} payloads refused"
    );
    assert!(
        total <= ABSENT_CAP + 100_000,
        "absent clients stayed under the cap minus the reserve ({total})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_mailbox_never_stalls_the_packets_a_gateway_forwards() {
    const QUEUE: usize = 16;
    let mut net = Net::start(
        &[
            ("peer", Role::Peer),
            (
                "gateway",
                Role::Node(nym_node::config::Mode::EntryGateway, None),
            ),
            ("next", Role::Sink(Some(1))),
        ],
        |_, c| {
            c.delivery_queue = QUEUE;
            c.forwarder_queue = QUEUE;
        },
        // The mailbox writer takes nothing for 10 s, as a stalled disk would.
        |_| TestHooks {
            stall_delivery: Some(Duration::from_secs(10)),
            ..TestHooks::default()
        },
    )
    .await;
    let mut sink = net.take_sink("next");
    let m = net.node("gateway").metrics.clone();
    let mut link = net.link("peer", "gateway").await;
    let envelope = nym_node::message::Envelope::Data {
        ack: None,
        fragment: vec![0xcd; 1600],
    }
    .encode()
    .unwrap();
    for i in 1..=100u8 {
        // (Not the all-zero destination: that is drop cover, discarded.)
        let p = net.packet(
            &["gateway"],
            nym_node::keys::KeyBytes([i; 32]),
            &envelope,
            &[Duration::ZERO],
        );
        link.send_packet(&p).await.unwrap();
    }
    // Beyond the delivery queue, final hops are dropped, not waited for.
    assert!(
        eventually(Duration::from_secs(20), || m
            .drop_count(DropReason::DeliveryQueueFull)
            == (100 - QUEUE) as u64)
        .await,
        "dropped {}",
        m.drop_count(DropReason::DeliveryQueueFull)
    );
    for i in 0..20u8 {
        let p = net.packet(
            &["gateway", "next"],
            nym_node::keys::KeyBytes([200 + i; 32]),
            b"through the gateway",
            &[Duration::ZERO; 2],
        );
        link.send_packet(&p).await.unwrap();
    }
    assert_eq!(
        sink.collect(20, Duration::from_secs(30)).await.len(),
        20,
        "the gateway forwards"
    );
    assert_eq!(
        m.packets_delivered.get(),
        0,
        "...while its mailbox still takes nothing"
    );
    // When storage comes back, what was queued is stored.
    assert!(
        eventually(Duration::from_secs(30), || m.packets_delivered.get()
            == QUEUE as u64)
        .await,
        "stored {}",
        m.packets_delivered.get()
    );
    assert_eq!(m.drop_count(DropReason::Overload), 0);
    net.stop().await;
}
